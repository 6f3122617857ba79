"""``unitcert audit``: find shared, weak and known keys across a fleet.

Exit codes: 0 clean, 1 findings, 2 the audit could not run (bad input, an
unreadable source, a failed worker) or could not read everything it was told
to (a host in the hosts file, a registry row), with one sentence on stderr.
Findings win: a run that found something exits 1 even when it is incomplete.

In a pipeline: a summary that cannot be printed because standard output was
closed early (``unitcert audit F | head -c 10``) exits 2, not 1 (findings) and
not 0, since the caller did not get the verdict; a run with findings still
exits 1. Interrupted (Ctrl-C, SIGINT), the audit stops and exits 130, as
shells report a command ended by SIGINT, with one sentence and no traceback;
the batch GCD's worker processes ignore the Ctrl-C and are ended by it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from unitcert.audit.progress import AuditProgress
from unitcert.audit.report import (
    print_summary,
    terminal_text,
    write_html,
    write_json,
)
from unitcert.audit.runner import AuditReport, AuditSettings, count, run_audit
from unitcert.audit.sources import (
    DEFAULT_CONCURRENCY,
    DEFAULT_TIMEOUT,
    FileSource,
    HostSource,
    Source,
    read_hosts_file,
)
from unitcert.errors import UnitcertError

if TYPE_CHECKING:
    from unitcert.audit.registry import RegistrySource

__all__ = [
    "EXIT_CLEAN",
    "EXIT_ERROR",
    "EXIT_FINDINGS",
    "EXIT_INTERRUPTED",
    "audit",
    "parse_size",
]

logger = logging.getLogger(__name__)

EXIT_CLEAN = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

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


def _report_option(
    ctx: click.Context, param: click.Parameter, value: Path | None
) -> Path | None:
    # An empty argument is Path("."), which has no file name to write.
    if value is not None and (not value.name or str(value) in ("", ".", "..")):
        raise click.BadParameter(
            "give the report a file name (e.g. audit.json or audit.html)", ctx, param
        )
    return value


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
                f"{terminal_text(str(path))} is one of the audit's inputs: write the "
                "report to a new file",
                param_hint=option,
            )
        if real in seen:
            raise click.BadParameter(
                f"{terminal_text(str(path))} is also the {seen[real]} report: give "
                "each report its own file",
                param_hint=option,
            )
        seen[real] = option


def _refuse_unwritable(path: Path, option: str) -> None:
    """Refuse a report path that cannot be written, before a long audit runs."""
    folder = path.parent if str(path.parent) else Path()
    if not folder.is_dir():
        raise click.BadParameter(
            f"the folder {terminal_text(str(folder))} does not exist: create it or "
            "write the report elsewhere",
            param_hint=option,
        )
    if not os.access(folder, os.W_OK) or (
        path.exists() and not os.access(path, os.W_OK)
    ):
        raise click.BadParameter(
            f"{terminal_text(str(path))} cannot be written: choose a file in a "
            "folder you can write to",
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
    "db_urls",
    metavar="URL",
    multiple=True,
    help="Audit the factory registry at this database URL "
    "(sqlite:///F/registry.db, postgresql+psycopg://USER@HOST/DB); repeat for "
    "several registries.",
)
@click.option(
    "--dir",
    "factory_dirs",
    type=click.Path(path_type=Path, file_okay=False),
    multiple=True,
    help="Audit the registry of this factory folder (its registry.db); repeat for "
    "several factories.",
)
@click.option(
    "--hosts",
    "hosts_files",
    type=click.Path(path_type=Path, dir_okay=False),
    multiple=True,
    help="Collect certificates from live TLS endpoints: a file of host:port lines; "
    "repeat for several files (each address is audited once).",
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
    callback=_report_option,
    help="Write the verdict, every finding and every unit not read to this JSON file.",
)
@click.option(
    "--html",
    "html_out",
    type=click.Path(path_type=Path, dir_okay=False),
    callback=_report_option,
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
    db_urls: tuple[str, ...],
    factory_dirs: tuple[Path, ...],
    hosts_files: tuple[Path, ...],
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

    Sources combine in one run: give PATHs, --hosts, --db and --dir together,
    each option as often as needed.

    Exit status: 0 clean, 1 findings, 2 the audit could not run, or found
    nothing but could not read every host or registry row it was given, or
    could not print its summary; 130 interrupted.
    """
    try:
        report = _run(
            ctx,
            paths=paths,
            db_urls=db_urls,
            factory_dirs=factory_dirs,
            hosts_files=hosts_files,
            concurrency=concurrency,
            timeout=timeout,
            json_out=json_out,
            html_out=html_out,
            jobs=jobs,
            memory_limit=memory_limit,
            workdir=workdir,
            dask_address=dask_address,
            quiet=quiet,
        )
    except UnitcertError as exc:
        logger.debug("audit failed", exc_info=True)
        # One line, even when a driver's message spans several.
        _error(" ".join(str(exc).split()))
        ctx.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        logger.debug("audit interrupted", exc_info=True)
        _error("interrupted: the audit stopped before its verdict")
        ctx.exit(EXIT_INTERRUPTED)

    try:
        print_summary(report)
        sys.stdout.flush()
    except OSError as exc:
        # Not even the verdict could be shown: the run did not do its job.
        logger.debug("cannot print the summary", exc_info=True)
        if isinstance(exc, BrokenPipeError):
            # Nothing more may reach the closed pipe, not even at exit.
            _silence_stdout()
        _error(
            f"cannot print the audit's summary ({exc.strerror or exc}): use --json "
            "or --html to keep the results"
        )
        ctx.exit(EXIT_FINDINGS if report.findings else EXIT_ERROR)
    except KeyboardInterrupt:
        ctx.exit(EXIT_INTERRUPTED)
    if report.findings:
        ctx.exit(EXIT_FINDINGS)
    if report.incomplete:
        missed = report.missed
        _error(
            f"{count(len(missed), 'item')} that may hold keys (hosts, registry "
            "rows, key files) could not be audited "
            f"(first: {missed[0].location}: {missed[0].reason}), so the "
            "fleet is not known to be clean: see --json for every one"
        )
        ctx.exit(EXIT_ERROR)
    ctx.exit(EXIT_CLEAN)


def _error(sentence: str) -> None:
    """Print one error sentence on stderr, with names made safe to show."""
    try:
        click.echo(f"unitcert: error: {terminal_text(sentence)}", err=True)
    except OSError:
        logger.debug("cannot print an error", exc_info=True)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        logger.debug("cannot point stdout at %s", os.devnull, exc_info=True)


def _registries(
    db_urls: Sequence[str], factory_dirs: Sequence[Path]
) -> list[RegistrySource]:
    """One source per registry, each registry once however it was named."""
    from unitcert.audit.registry import RegistrySource

    registries: dict[str, RegistrySource] = {}
    for registry in [
        *(RegistrySource(url) for url in db_urls),
        *(RegistrySource.for_directory(folder) for folder in factory_dirs),
    ]:
        files = registry.files()
        key = os.path.realpath(files[0]) if files else registry.url
        registries.setdefault(key, registry)
    return list(registries.values())


def _run(
    ctx: click.Context,
    *,
    paths: tuple[Path, ...],
    db_urls: tuple[str, ...],
    factory_dirs: tuple[Path, ...],
    hosts_files: tuple[Path, ...],
    concurrency: int,
    timeout: float,
    json_out: Path | None,
    html_out: Path | None,
    jobs: int,
    memory_limit: int | None,
    workdir: Path | None,
    dask_address: str | None,
    quiet: bool,
) -> AuditReport:
    """Check the options, run the audit and write the reports."""
    sources: list[Source] = []
    registry_files: list[Path] = []
    for registry in _registries(db_urls, factory_dirs):
        sources.append(registry)
        registry_files.extend(registry.files())
    if paths:
        sources.append(FileSource(paths))
    if hosts_files:
        sources.append(
            # HostSource audits each address once, however many files list it.
            HostSource(
                [a for path in hosts_files for a in read_hosts_file(path)],
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
        inputs=[*paths, *hosts_files, *registry_files],
    )
    if dask_address is not None:
        from unitcert.audit.distributed import check_dask_address

        check_dask_address(dask_address)
    if workdir is not None and not workdir.is_dir():
        raise click.BadParameter(
            f"{terminal_text(str(workdir))} is not a folder", param_hint="--workdir"
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
    return report


if __name__ == "__main__":
    audit()
