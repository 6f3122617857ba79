"""The station flows: provision one unit, or a batch of simulated units.

A station that can reach a unit's state runs the unit's steps itself: it
makes the identity with :func:`unitcert.device.init_unit` (bound to the
serial, which the unit adopts on its first start), has the unit make its CSR,
issues it, installs the chain and prints the sticker. The key is made in the
unit's state and never copied anywhere else.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import (
    Executor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
)
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TypeVar

from unitcert import device, keys
from unitcert.code import FingerprintCode
from unitcert.errors import DuplicateError, InputError, UnitcertError
from unitcert.factory.issue import Issuer
from unitcert.factory.unit import install_factory_identity, make_identity_csr
from unitcert.store import StateStore

__all__ = [
    "BatchResult",
    "ProvisionedUnit",
    "batch_serials",
    "provision_batch",
    "provision_unit",
]

logger = logging.getLogger(__name__)

# The units' steps of a batch run in chunks, each in this many threads.
_THREADS = 4
_CHUNK = 50
# Below this many units, starting worker processes costs more than it saves.
_PROCESS_MIN = 200
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class ProvisionedUnit:
    """A unit provisioned on the station.

    Attributes:
        serial: its serial.
        hostname: its name.
        code: its fingerprint code (the sticker's).
        state_dir: its state directory.
        label_path: the sticker file, when one was written.
    """

    serial: str
    hostname: str
    code: FingerprintCode
    state_dir: Path
    label_path: Path | None = None


@dataclass(frozen=True)
class BatchResult:
    """What :func:`provision_batch` did.

    Attributes:
        provisioned: the units provisioned.
        refused: ``(serial, reason)`` of units the CA refused; their states
            keep a self-signed identity.
        flagged: units issued earlier whose queued RSA moduli turned out to
            share a prime (see :meth:`Issuer.check_prime_queue`).
    """

    provisioned: tuple[ProvisionedUnit, ...]
    refused: tuple[tuple[str, str], ...]
    flagged: tuple[str, ...] = ()


def _check_label_path(path: Path | None) -> None:
    if path is not None and path.suffix.lower() not in (".png", ".pdf"):
        raise InputError(
            f"cannot write a label to {path}: name the file with .png or .pdf"
        )


def _make_unit(
    state_dir: Path,
    serial: str,
    *,
    product: str,
    domain: str,
    key_type: keys.KeyType,
    entropy_timeout: float,
    generator: Callable[[keys.KeyType], keys.PrivateKey],
) -> tuple[StateStore, device.InitResult, bytes]:
    """The unit's own steps: make its identity (station-bound) and its CSR.

    Raises:
        InputError: the unit is already factory-provisioned.
        The errors of :func:`unitcert.device.init_unit`.
    """
    store = StateStore(state_dir)
    result = device.init_unit(
        store,
        serial=serial,
        product=product,
        domain=domain,
        key_type=key_type,
        entropy_timeout=entropy_timeout,
        generator=generator,
        bind_to_serial=True,
    )
    if result.unit.meta.source == "factory":
        raise InputError(
            f"the unit in {state_dir} is already factory-provisioned as "
            f"{result.unit.meta.hostname}: use 'factory reissue' to renew it"
        )
    return store, result, make_identity_csr(store)


def _setup_credential(result: device.InitResult) -> str | None:
    admin = result.unit.admin
    return admin.setup if admin is not None and admin.must_change else None


def provision_unit(
    issuer: Issuer,
    state_dir: Path,
    serial: str,
    *,
    key_type: keys.KeyType = keys.KeyType.P256,
    label_path: Path | None = None,
    validity_days: int | None = None,
    entropy_timeout: float = keys.DEFAULT_ENTROPY_TIMEOUT,
    generator: Callable[[keys.KeyType], keys.PrivateKey] = keys.generate_key,
) -> ProvisionedUnit:
    """Provision one unit whose state the station can write: key, CSR, issue,
    install, label.

    The unit's one-time setup credential goes on the label and into the
    identity part, so that a factory reset brings back the one printed.

    Raises:
        InputError: a bad serial or label path, the unit is already
            provisioned, or the CA refused its CSR.
        DuplicateError: the serial or key is already registered.
        WeakKeyError: the key is weak or shares a prime.
        RegistryError: the database failed.
    """
    serial = device.check_label("serial", serial)
    _check_label_path(label_path)
    if issuer.registry.find(serial) is not None:
        raise DuplicateError(
            f"serial {serial} was already issued: nothing was done; use 'factory "
            "reissue' to renew its certificate",
            serial=serial,
        )

    store, result, csr = _make_unit(
        state_dir,
        serial,
        product=issuer.ca.config.product,
        domain=issuer.ca.config.domain,
        key_type=key_type,
        entropy_timeout=entropy_timeout,
        generator=generator,
    )
    issued = issuer.issue(csr, serial, validity_days=validity_days)
    setup = _setup_credential(result)
    unit = install_factory_identity(store, issued.chain_pem, setup_credential=setup)

    if label_path is not None:
        from unitcert.label import Label, write_label

        write_label(Label.for_unit(unit, setup_credential=setup), label_path)
        issuer.registry.mark_label_printed(serial)
    logger.info("provisioned %s (%s)", unit.meta.hostname, unit.info.code)
    return ProvisionedUnit(
        serial=serial,
        hostname=unit.meta.hostname,
        code=unit.info.code,
        state_dir=state_dir,
        label_path=label_path,
    )


@dataclass(frozen=True)
class _UnitJob:
    """What a worker needs to make one simulated unit (picklable)."""

    state_dir: Path
    serial: str
    product: str
    domain: str
    key_type: str
    entropy_timeout: float


def _in_threads(function: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    # The units' steps wait on fsync, which releases the GIL: threads overlap it.
    with ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(function, items))


def _make_units(
    jobs: Sequence[_UnitJob],
    generator: Callable[[keys.KeyType], keys.PrivateKey] = keys.generate_key,
) -> list[tuple[str, bytes, str | None]]:
    """The units' own steps for a chunk: identity (serial-bound) and CSR.

    Returns ``(serial, csr_pem, setup_credential)`` for each unit.

    Raises:
        InputError: a unit could not be made (the error names it); errors are
            plain so that they cross a process boundary.
    """

    def make(job: _UnitJob) -> tuple[str, bytes, str | None]:
        try:
            _, result, csr = _make_unit(
                job.state_dir,
                job.serial,
                product=job.product,
                domain=job.domain,
                key_type=keys.KeyType.parse(job.key_type),
                entropy_timeout=job.entropy_timeout,
                generator=generator,
            )
        except UnitcertError as error:
            raise InputError(f"unit {job.serial}: {error}") from None
        return job.serial, csr, _setup_credential(result)

    return _in_threads(make, jobs)


def _install_units(
    items: Sequence[tuple[Path, str, bytes, str | None]],
) -> list[ProvisionedUnit]:
    """The units install their chains: ``(state_dir, serial, chain, setup)`` each.

    Raises:
        InputError: a unit could not install its chain (the error names it).
    """

    def install(item: tuple[Path, str, bytes, str | None]) -> ProvisionedUnit:
        state_dir, serial, chain_pem, setup = item
        try:
            unit = install_factory_identity(
                StateStore(state_dir), chain_pem, setup_credential=setup
            )
        except UnitcertError as error:
            raise InputError(f"unit {serial}: {error}") from None
        return ProvisionedUnit(
            serial=serial,
            hostname=unit.meta.hostname,
            code=unit.info.code,
            state_dir=state_dir,
        )

    return _in_threads(install, items)


def _executor(
    count: int, generator: Callable[[keys.KeyType], keys.PrivateKey]
) -> Executor:
    """One process per core for large batches, else this process.

    Each chunk runs its units in threads (fsync waits overlap); processes
    spread the Python work over the cores. They start with ``spawn``: forking
    a process that runs threads (a progress bar) can hang, and a custom key
    generator (a test seam) cannot cross to another process.
    """
    if generator is keys.generate_key and count >= _PROCESS_MIN:
        workers = max(2, os.cpu_count() or 1)
        return ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    return ThreadPoolExecutor(1)


def _run_chunks(
    pool: Executor,
    work: Callable[[Sequence[_T]], list[_R]],
    items: Sequence[_T],
    progress: Callable[[int], None],
) -> list[_R]:
    """Run ``work`` over chunks of ``items`` in ``pool``; results in item order."""
    chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    futures = {pool.submit(work, chunk): n for n, chunk in enumerate(chunks)}
    results: list[list[_R]] = [[] for _ in chunks]
    for future in as_completed(futures):
        results[futures[future]] = future.result()
        progress(len(results[futures[future]]))
    return [result for chunk in results for result in chunk]


def batch_serials(prefix: str, count: int, *, start: int = 1) -> list[str]:
    """The serials of a batch: ``prefix`` and a zero-padded number.

    Raises:
        InputError: a count or start below 1, or a serial that is not a DNS label.
    """
    if count < 1 or start < 1:
        raise InputError("a batch needs a count and a start of at least 1")
    width = max(4, len(str(start + count - 1)))
    serials = [f"{prefix}{n:0{width}d}" for n in range(start, start + count)]
    device.check_label("serial", serials[0])
    device.check_label("serial", serials[-1])
    return [s.lower() for s in serials]


def provision_batch(
    issuer: Issuer,
    out_dir: Path,
    serials: Sequence[str],
    *,
    key_type: keys.KeyType = keys.KeyType.P256,
    validity_days: int | None = None,
    entropy_timeout: float = keys.DEFAULT_ENTROPY_TIMEOUT,
    generator: Callable[[keys.KeyType], keys.PrivateKey] = keys.generate_key,
    on_progress: Callable[[str, int], None] | None = None,
) -> BatchResult:
    """Provision simulated units, each in ``out_dir/<serial>``.

    The units make their keys and CSRs; the CA checks every CSR, checks all
    RSA moduli at once with a product tree against the registry, signs and
    registers in chunks; then each unit installs its chain.

    Args:
        issuer: the factory's issuer.
        out_dir: where the units' state folders go.
        serials: the serials (see :func:`batch_serials`).
        key_type: the units' key type.
        validity_days: the certificates' validity (default: the factory's).
        entropy_timeout: passed to the units' key generation.
        generator: the units' key generator (a seam for tests).
        on_progress: called with a phase (``keys``, ``issue``, ``install``)
            and how many units just finished it.

    Raises:
        InputError: a state folder or serial exists already (nothing written).
        RegistryError: the database failed.
    """
    taken = issuer.registry.existing_serials(serials)
    if taken:
        raise DuplicateError(
            f"{len(taken)} of these serials were already issued (first: "
            f"{min(taken)}): nothing was done; choose another --serial-prefix or "
            "--start",
            serial=min(taken),
        )
    existing = [s for s in serials if (out_dir / s).exists()]
    if existing:
        raise InputError(
            f"{out_dir / existing[0]} already exists: nothing was done; give an "
            "empty --out directory"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    def report(phase: str) -> Callable[[int], None]:
        return lambda done: on_progress(phase, done) if on_progress else None

    config = issuer.ca.config
    jobs = [
        _UnitJob(
            out_dir / serial,
            serial,
            config.product,
            config.domain,
            key_type.value,
            entropy_timeout,
        )
        for serial in serials
    ]
    with _executor(len(jobs), generator) as pool:
        made = _run_chunks(
            pool,
            functools.partial(_make_units, generator=generator),
            jobs,
            report("keys"),
        )
        outcome = issuer.issue_batch(
            [(serial, csr) for serial, csr, _ in made],
            validity_days=validity_days,
            on_progress=report("issue"),
        )
        setups = {serial: setup for serial, _, setup in made}
        installs = [
            (out_dir / i.serial, i.serial, i.chain_pem, setups[i.serial])
            for i in outcome.issued
        ]
        provisioned = _run_chunks(pool, _install_units, installs, report("install"))
    return BatchResult(tuple(provisioned), outcome.refused, outcome.flagged)
