"""``unitcert audit``: find shared, weak and known keys across a fleet.

Exit codes: 0 clean, 1 findings, 2 the audit could not run (bad input, an
unreadable source, a failed worker) or could not read everything it was told
to (a host in the hosts file, a registry row), with one sentence on stderr.
Findings win: a run that found something exits 1 even when it is incomplete.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import click

from unitcert.audit.progress import AuditProgress
from unitcert.audit.report import print_summary, write_html, write_json
from unitcert.audit.runner import AuditSettings, run_audit
from unitcert.audit.sources import (
    DEFAULT_CONCURRENCY,
    DEFAULT_TIMEOUT,
    FileSource,
    HostSource,
    Source,
    read_hosts_file,
)
from unitcert.errors import UnitcertError

__all__ = ["EXIT_CLEAN", "EXIT_ERROR", "EXIT_FINDINGS", "audit", "parse_size"]

logger = logging.getLogger(__name__)

EXIT_CLEAN = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2

_MAX_TIMEOUT = 3600.0
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Read a memory size such as ``4G``, ``512M``, ``1.5GiB`` or ``1000000``.

    Suffixes are powers of 1024; a bare number is bytes.

    Raises:
        ValueError: the text is not a size.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size: write one like 4G, 512M or 1.5GiB")
    return int(float(match.group(1)) * _SIZE_FACTORS[match.group(2).lower()])


def _finite_option(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value):
        raise click.BadParameter(
            f"give a number of seconds between 0 and {_MAX_TIMEOUT:g}", ctx, param
        )
    return value


def _size_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> int | None:
    if value is None:
        return None
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    if size <= 0:
        raise click.BadParameter("the memory limit must be above zero", ctx, param)
    return size


def _refuse_overwriting_inputs(
    outputs: dict[str, Path | None], *, inputs: list[Path]
) -> None:
    """Refuse a report path that is one of the audit's inputs or the other report.

    An input is a file named on the command line, a file already inside a
    folder named there, the hosts file, or the registry's database files.
    """
    named = {os.path.realpath(path) for path in inputs if not path.is_dir()}
    folders = [os.path.realpath(path) for path in inputs if path.is_dir()]
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        inside = path.exists() and any(
            os.path.commonpath([folder, real]) == folder for folder in folders
        )
        if real in named or inside:
            raise click.BadParameter(
                f"{path} is one of the audit's inputs: write the report to a new file",
                param_hint=option,
            )
        if real in seen:
            raise click.BadParameter(
                f"{path} is also the {seen[real]} report: give each report its own "
                "file",
                param_hint=option,
            )
        seen[real] = option


def _refuse_unwritable(path: Path, option: str) -> None:
    """Refuse a report path that cannot be written, before a long audit runs."""
    folder = path.parent if str(path.parent) else Path()
    if not folder.is_dir():
        raise click.BadParameter(
            f"the folder {folder} does not exist: create it or write the report "
            "elsewhere",
            param_hint=option,
        )
    if not os.access(folder, os.W_OK) or (
        path.exists() and not os.access(path, os.W_OK)
    ):
        raise click.BadParameter(
            f"{path} cannot be written: choose a file in a folder you can write to",
            param_hint=option,
        )


@click.command("audit")
@click.argument(
    "paths",
    nargs=-1,
    type=click.Path(path_type=Path, exists=False),
    metavar="[PATH]...",
)
@click.option(
    "--db",
    "db_url",
    metavar="URL",
    help="Audit the factory registry at this database URL "
    "(sqlite:///F/registry.db, postgresql+psycopg://USER@HOST/DB).",
)
@click.option(
    "--dir",
    "factory_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Audit the registry of this factory folder (its registry.db).",
)
@click.option(
    "--hosts",
    "hosts_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Collect certificates from live TLS endpoints: a file of host:port lines.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Hosts to connect to at once.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, max=_MAX_TIMEOUT, min_open=True),
    callback=_finite_option,
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for each host's TLS handshake.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write every finding to this JSON file.",
)
@click.option(
    "--html",
    "html_out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write a self-contained HTML report with charts to this file.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes for the batch GCD and the key checks.",
)
@click.option(
    "--memory-limit",
    metavar="SIZE",
    callback=_size_option,
    help="Keep the batch GCD within this memory (e.g. 4G) by writing tree levels "
    "to disk.",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for the batch GCD's tree levels (default: the temporary folder).",
)
@click.option(
    "--dask",
    "dask_address",
    metavar="ADDRESS",
    help="Run the batch GCD on this Dask scheduler (e.g. tcp://10.0.0.5:8786).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def audit(
    ctx: click.Context,
    paths: tuple[Path, ...],
    db_url: str | None,
    factory_dir: Path | None,
    hosts_file: Path | None,
    concurrency: int,
    timeout: float,
    json_out: Path | None,
    html_out: Path | None,
    jobs: int,
    memory_limit: int | None,
    workdir: Path | None,
    dask_address: str | None,
    quiet: bool,
) -> None:
    """Find shared, weak and known keys across the fleet.

    Reads certificates, CSRs, public keys and SSH host keys from PATHs (files
    and folders), from live hosts (--hosts) and from the factory registry
    (--db or --dir), all as one fleet, and reports
    keys that several units share, RSA moduli that share a prime (batch GCD),
    and keys that badkeys' checks or the published-key list flag.

    Exit status: 0 clean, 1 findings, 2 the audit could not run, or found
    nothing but could not read every host or registry row it was given.
    """
    try:
        sources: list[Source] = []
        if db_url is not None and factory_dir is not None:
            raise click.UsageError("give --db or --dir, not both", ctx)
        registry_files: list[Path] = []
        if db_url is not None or factory_dir is not None:
            from unitcert.audit.registry import RegistrySource

            registry = (
                RegistrySource(db_url)
                if db_url is not None
                else RegistrySource.for_directory(factory_dir or Path())
            )
            sources.append(registry)
            registry_files = registry.files()
        if paths:
            sources.append(FileSource(paths))
        if hosts_file is not None:
            sources.append(
                HostSource(
                    read_hosts_file(hosts_file),
                    concurrency=concurrency,
                    timeout=timeout,
                )
            )
        if not sources:
            raise click.UsageError(
                "nothing to audit: give PATHs of keys or certificates, --hosts FILE, "
                "or a registry (--db URL or --dir F)",
                ctx,
            )
        for path, option in ((json_out, "--json"), (html_out, "--html")):
            if path is not None:
                _refuse_unwritable(path, option)
        _refuse_overwriting_inputs(
            {"--json": json_out, "--html": html_out},
            inputs=[*paths, *([hosts_file] if hosts_file else []), *registry_files],
        )
        if dask_address is not None:
            from unitcert.audit.distributed import check_dask_address

            check_dask_address(dask_address)
        if workdir is not None and not workdir.is_dir():
            raise click.BadParameter(
                f"{workdir} is not a folder", param_hint="--workdir"
            )
        cpus = os.cpu_count() or 1
        if jobs > cpus:
            logger.warning(
                "--jobs %d is more than this machine's %d CPUs: using %d processes",
                jobs,
                cpus,
                cpus,
            )
            jobs = cpus
        settings = AuditSettings(
            jobs=jobs,
            memory_limit=memory_limit,
            workdir=workdir,
            dask_address=dask_address,
        )
        with AuditProgress(enabled=False if quiet else None) as progress:
            report = run_audit(sources, settings, progress=progress)
        if json_out is not None:
            write_json(report, json_out)
        if html_out is not None:
            write_html(report, html_out)
    except UnitcertError as exc:
        logger.debug("audit failed", exc_info=True)
        # One line, even when a driver's message spans several.
        click.echo(f"unitcert: error: {' '.join(str(exc).split())}", err=True)
        ctx.exit(EXIT_ERROR)

    try:
        print_summary(report)
    except OSError as exc:
        # Not even the verdict could be shown: the run did not do its job.
        logger.debug("cannot print the summary", exc_info=True)
        click.echo(
            f"unitcert: error: cannot print the audit's summary "
            f"({exc.strerror or exc}): use --json or --html to keep the results",
            err=True,
        )
        ctx.exit(EXIT_ERROR)
    if not report.clean:
        ctx.exit(EXIT_FINDINGS)
    if report.incomplete:
        missed = [p for p in report.problems if p.named]
        click.echo(
            f"unitcert: error: {len(missed):,} of the hosts or registry units given "
            f"could not be audited (first: {missed[0].location}: {missed[0].reason}), "
            "so the fleet is not known to be clean: see --json for every one",
            err=True,
        )
        ctx.exit(EXIT_ERROR)
    ctx.exit(EXIT_CLEAN)


if __name__ == "__main__":
    audit()
