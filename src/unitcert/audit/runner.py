"""One audit run: read every source, run every check, return the report.

Stages, each with its own progress bar: reading the sources, the batch GCD's
product tree and remainder tree (over the distinct RSA moduli), and the
single-key checks (over the distinct keys).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from unitcert.audit.checks import (
    KINDS,
    Finding,
    check_single_keys,
    distinct_units,
    find_duplicate_keys,
    find_shared_primes,
)
from unitcert.audit.progress import AuditProgress
from unitcert.audit.sources import KeyRecord, Source, SourceProblem
from unitcert.errors import AuditError, InputError
from unitcert.quality.batchgcd import (
    PRODUCT_STAGE,
    REMAINDER_STAGE,
    BatchGCDWorkerError,
    SharedFactor,
    batch_gcd,
    split_shared,
)

__all__ = [
    "VERDICT_CLEAN",
    "VERDICT_FINDINGS",
    "VERDICT_INCOMPLETE",
    "AuditReport",
    "AuditSettings",
    "Cohort",
    "format_size",
    "run_audit",
]

logger = logging.getLogger(__name__)

VERDICT_FINDINGS = "findings"
VERDICT_INCOMPLETE = "incomplete"
VERDICT_CLEAN = "clean"

_CHECK_STAGE = "single-key checks"
# Peak memory of the batch GCD per byte of moduli, all processes together, as
# measured by bench/batchgcd.py at 1,000,000 RSA-2048 moduli: with the tree in
# memory, and with its levels on disk (the top numbers and GMP's scratch):
# 7.10 GiB and 2.96 GiB for 256 MB of moduli (bench/RESULTS.md, 2026-12-04),
# rounded up.
_IN_MEMORY_FACTOR = 30
_SPILLED_FACTOR = 13


@dataclass(frozen=True)
class AuditSettings:
    """How to run the audit's heavy parts.

    Attributes:
        jobs: processes for the batch GCD and the single-key checks.
        memory_limit: bytes the batch GCD may hold; above that estimate its
            tree levels are written to ``workdir`` and read back.
        workdir: the folder for the batch GCD's files; the system's
            temporary folder by default.
        dask_address: run the batch GCD on this Dask scheduler instead.
    """

    jobs: int = 1
    memory_limit: int | None = None
    workdir: Path | None = None
    dask_address: str | None = None

    def describe(self) -> str:
        """Return how the batch GCD runs, for the report."""
        if self.dask_address:
            return f"Dask cluster at {self.dask_address}"
        mode = f"{self.jobs} process" + ("" if self.jobs == 1 else "es")
        if self.memory_limit is not None:
            mode += f", memory limit {format_size(self.memory_limit)}"
        return mode


@dataclass(frozen=True)
class Cohort:
    """Units of one production batch (or, without batches, one issue month).

    Attributes:
        label: the batch name, ``YYYY-MM`` of issue, or ``"unknown"``.
        units: how many units the audit saw in it.
        affected: how many of them some finding names.
    """

    label: str
    units: int
    affected: int


@dataclass(frozen=True)
class AuditReport:
    """Everything one audit found.

    Attributes:
        findings: every finding, by kind then by first unit.
        problems: what the sources could not read (skipped, not fatal).
        sources: a description of each source.
        keys_read: how many keys the sources yielded (with repeats).
        units: how many distinct units.
        distinct_keys: how many distinct keys.
        rsa_moduli: how many distinct RSA moduli went through the batch GCD.
        key_types: distinct units per key type.
        cohorts: units and affected units per batch or issue month.
        cohort_kind: ``"batch"`` or ``"issue month"``.
        mode: how the batch GCD ran.
        started: when the audit started (UTC).
        seconds: how long it took.
    """

    findings: tuple[Finding, ...]
    problems: tuple[SourceProblem, ...]
    sources: tuple[str, ...]
    keys_read: int
    units: int
    distinct_keys: int
    rsa_moduli: int
    key_types: tuple[tuple[str, int], ...]
    cohorts: tuple[Cohort, ...]
    cohort_kind: str
    mode: str
    started: dt.datetime
    seconds: float

    @property
    def clean(self) -> bool:
        """True when nothing was found and every item the user named was read."""
        return self.verdict == VERDICT_CLEAN

    @property
    def incomplete(self) -> bool:
        """True when an item the user named (a host, a registry row) was not read."""
        return any(p.named for p in self.problems)

    @property
    def missed(self) -> tuple[SourceProblem, ...]:
        """The items the user named (hosts, registry rows) that were not read."""
        return tuple(p for p in self.problems if p.named)

    @property
    def verdict(self) -> str:
        """``"findings"``, ``"incomplete"`` (none found, but not all read) or
        ``"clean"``.

        Findings win: a run that found something is ``"findings"`` even when
        it could not read everything.
        """
        if self.findings:
            return VERDICT_FINDINGS
        return VERDICT_INCOMPLETE if self.incomplete else VERDICT_CLEAN

    @property
    def affected_units(self) -> int:
        """How many distinct units some finding names."""
        return len({u.name for f in self.findings for u in f.units})


def _read_sources(
    sources: Sequence[Source], progress: AuditProgress, problems: list[SourceProblem]
) -> list[KeyRecord]:
    records: list[KeyRecord] = []
    for source in sources:
        stage = f"reading {source.describe()}"
        progress.start(stage, source.size(), "items")
        records.extend(source.records(problems, _advancer(progress, stage)))
        progress.finish(stage)
    return records


def format_size(size: float) -> str:
    """Write a byte count with a binary unit: ``512 B``, ``64.0 KiB``, ``4.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} TiB"


def count(number: int, noun: str, plural: str | None = None) -> str:
    """``1 item``, ``2 items``, ``2 RSA moduli`` (with ``plural``)."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"


def _advancer(progress: AuditProgress, stage: str) -> Callable[[int], None]:
    def advance(amount: int) -> None:
        progress.advance(stage, amount)

    return advance


def _spill(moduli: Sequence[int], settings: AuditSettings) -> bool:
    if settings.memory_limit is None or not moduli:
        return False
    total = sum((n.bit_length() + 7) // 8 for n in moduli)
    in_memory = total * _IN_MEMORY_FACTOR
    spilled = total * _SPILLED_FACTOR
    if spilled > settings.memory_limit:
        logger.warning(
            "the top of the batch GCD tree needs about %s, above the memory limit "
            "of %s; running with tree levels on disk anyway",
            format_size(spilled),
            format_size(settings.memory_limit),
        )
    return in_memory > settings.memory_limit


def _shared_factors(
    moduli: list[int], settings: AuditSettings, progress: AuditProgress
) -> list[SharedFactor]:
    progress.start(PRODUCT_STAGE, len(moduli), "moduli")
    progress.start(REMAINDER_STAGE, len(moduli), "moduli")
    if settings.dask_address:
        from unitcert.audit.distributed import batch_gcd_on_dask

        # It maps the cluster's failures to sentences of its own: a Dask
        # timeout is an OSError, but no work file of ours is involved.
        gcds = batch_gcd_on_dask(
            moduli, settings.dask_address, progress=progress.fraction
        )
        progress.finish(PRODUCT_STAGE)
        progress.finish(REMAINDER_STAGE)
        return split_shared(moduli, gcds)
    try:
        gcds = batch_gcd(
            moduli,
            jobs=settings.jobs,
            spill=_spill(moduli, settings),
            workdir=settings.workdir,
            progress=progress.fraction,
        )
    except OSError as exc:
        where = settings.workdir or "the temporary folder"
        raise InputError(
            f"the batch GCD cannot use its work files in {where} ({exc}): free space "
            "there or choose another folder with --workdir"
        ) from exc
    except BatchGCDWorkerError as exc:
        hint = (
            " (killed: probably out of memory; use --memory-limit)"
            if exc.exitcode is not None and exc.exitcode < 0
            else ""
        )
        raise AuditError(f"the batch GCD failed: {exc}{hint}") from exc
    progress.finish(PRODUCT_STAGE)
    progress.finish(REMAINDER_STAGE)
    return split_shared(moduli, gcds)


def _cohorts(
    records: Sequence[KeyRecord],
    units: Sequence[Sequence[KeyRecord]],
    findings: Sequence[Finding],
) -> tuple[tuple[Cohort, ...], str]:
    by_batch = any(r.batch for r in records)
    affected = {u.name for f in findings for u in f.units}
    totals: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    for group in units:
        if by_batch:
            label = next((r.batch for r in group if r.batch), None) or "unknown"
        else:
            issued = next((r.issued for r in group if r.issued), None)
            label = issued.strftime("%Y-%m") if issued else "unknown"
        totals[label] += 1
        if group[0].unit in affected:
            hits[label] += 1
    cohorts = tuple(
        Cohort(label, totals[label], hits[label])
        for label in sorted(totals, key=lambda x: (x == "unknown", x))
    )
    return cohorts, "batch" if by_batch else "issue month"


def run_audit(
    sources: Sequence[Source],
    settings: AuditSettings | None = None,
    *,
    progress: AuditProgress | None = None,
) -> AuditReport:
    """Audit the keys of every source together.

    Args:
        sources: where to read keys; all are audited as one fleet.
        settings: how to run the heavy parts.
        progress: where to show progress; none by default.

    Returns:
        The report.

    Raises:
        InputError: a source cannot be read, no source yields a key, or the
            batch GCD cannot write its work files.
        AuditError: a batch GCD worker or the Dask cluster failed.
    """
    settings = settings or AuditSettings()
    progress = progress or AuditProgress(enabled=False)
    started = dt.datetime.now(dt.UTC)
    clock = time.monotonic()

    problems: list[SourceProblem] = []
    records = _read_sources(sources, progress, problems)
    if not records:
        described = ", ".join(s.describe() for s in sources) or "no source"
        why = (
            f" ({count(len(problems), 'item')} could not be read; first: "
            f"{problems[0].location}: {problems[0].reason})"
            if problems
            else ""
        )
        raise InputError(
            f"found no keys to audit in {described}{why}: give certificates, CSRs, "
            "public keys or SSH host keys, or hosts that answer over TLS"
        )

    findings: list[Finding] = find_duplicate_keys(records)

    by_modulus: dict[int, list[KeyRecord]] = {}
    for record in records:
        if record.rsa_n is not None and record.rsa_n > 1:
            by_modulus.setdefault(record.rsa_n, []).append(record)
    moduli = list(by_modulus)
    if moduli:
        shared = _shared_factors(moduli, settings, progress)
        findings.extend(find_shared_primes(moduli, by_modulus, shared))

    distinct_keys = len({r.key_id for r in records})
    progress.start(_CHECK_STAGE, distinct_keys, "keys")
    findings.extend(
        check_single_keys(
            records,
            jobs=settings.jobs,
            advance=_advancer(progress, _CHECK_STAGE),
        )
    )
    progress.finish(_CHECK_STAGE)

    order = {kind: i for i, kind in enumerate(KINDS)}
    findings.sort(key=lambda f: (order.get(f.kind, len(order)), f.units[0].name))
    units = distinct_units(records)
    key_types = Counter(group[0].key_type for group in units)
    cohorts, cohort_kind = _cohorts(records, units, findings)
    return AuditReport(
        findings=tuple(findings),
        problems=tuple(problems),
        sources=tuple(s.describe() for s in sources),
        keys_read=len(records),
        units=len(units),
        distinct_keys=distinct_keys,
        rsa_moduli=len(moduli),
        key_types=tuple(sorted(key_types.items())),
        cohorts=cohorts,
        cohort_kind=cohort_kind,
        mode=settings.describe(),
        started=started,
        seconds=time.monotonic() - clock,
    )
