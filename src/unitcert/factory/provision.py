"""The station flows: provision one unit, or a batch of simulated units.

A station that can reach a unit's state runs the unit's steps itself. For a
new state it makes the unit's key (entropy gate, self-check) and CSR in
memory, issues it, and writes the whole state at once with
:func:`unitcert.device.write_station_state`: one identity commit (key, chain,
record bound to the serial, which the unit adopts on its first start, and the
printed setup credential) and one local commit (the admin credential). The
key is written only into the unit's state, never anywhere else. A state that
already holds a unit (it has booted) keeps its key: the unit makes its CSR
and installs the chain as on the unit itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from unitcert import device, keys
from unitcert.code import FingerprintCode
from unitcert.credential import new_setup_credential
from unitcert.errors import DuplicateError, InputError, UnitcertError
from unitcert.factory.issue import Issuer
from unitcert.factory.unit import (
    StationUnit,
    install_factory_identity,
    make_identity_csr,
    new_station_unit,
    write_station_unit,
)
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
    """The unit's own steps on an existing state: its identity and its CSR.

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


def _has_state(state_dir: Path) -> bool:
    """Say whether ``state_dir`` holds anything of a unit's state."""
    return state_dir.exists() and any(state_dir.iterdir())


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

    config = issuer.ca.config
    if _has_state(state_dir):
        # A unit that has booted already: it keeps its key and makes the CSR.
        store, result, csr = _make_unit(
            state_dir,
            serial,
            product=config.product,
            domain=config.domain,
            key_type=key_type,
            entropy_timeout=entropy_timeout,
            generator=generator,
        )
        issued = issuer.issue(csr, serial, validity_days=validity_days)
        setup = _setup_credential(result)
        unit = install_factory_identity(store, issued.chain_pem, setup_credential=setup)
    else:
        # A new state: the key is made now and written once, with its chain.
        made = new_station_unit(
            serial,
            product=config.product,
            domain=config.domain,
            key_type=key_type,
            entropy_timeout=entropy_timeout,
            generator=generator,
        )
        issued = issuer.issue(made.csr_pem, serial, validity_days=validity_days)
        setup = new_setup_credential()
        unit = write_station_unit(
            StateStore(state_dir), made, issued.chain_pem, setup_credential=setup
        )

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
    """What the station needs to make one simulated unit."""

    serial: str
    product: str
    domain: str
    key_type: keys.KeyType
    entropy_timeout: float


def _in_threads(function: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    # The units' writes wait on fsync, which releases the GIL: threads overlap it.
    with ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(function, items))


def _in_chunks(
    function: Callable[[_T], _R],
    items: Sequence[_T],
    progress: Callable[[int], None],
) -> list[_R]:
    """Run ``function`` over ``items`` in threads, a chunk at a time, in order."""
    results: list[_R] = []
    for start in range(0, len(items), _CHUNK):
        done = _in_threads(function, items[start : start + _CHUNK])
        results.extend(done)
        progress(len(done))
    return results


def _make_units(
    jobs: Sequence[_UnitJob],
    generator: Callable[[keys.KeyType], keys.PrivateKey],
    progress: Callable[[int], None],
) -> list[StationUnit]:
    """The units' keys (entropy gate, self-check) and CSRs, in memory only.

    Raises:
        InputError: a unit could not be made (the error names it).
    """

    def make(job: _UnitJob) -> StationUnit:
        try:
            return new_station_unit(
                job.serial,
                product=job.product,
                domain=job.domain,
                key_type=job.key_type,
                entropy_timeout=job.entropy_timeout,
                generator=generator,
            )
        except UnitcertError as error:
            raise InputError(f"unit {job.serial}: {error}") from None

    return _in_chunks(make, jobs, progress)


def _write_units(
    items: Sequence[tuple[Path, StationUnit, bytes | None]],
    progress: Callable[[int], None],
) -> list[ProvisionedUnit | None]:
    """Write each unit's whole state: ``(state_dir, unit, chain)`` each; a None
    chain (refused by the CA) gives a self-signed identity.

    Returns:
        The provisioned unit, or None for a refused one, in item order.

    Raises:
        InputError: a unit's state could not be written (the error names it).
    """

    def write(item: tuple[Path, StationUnit, bytes | None]) -> ProvisionedUnit | None:
        state_dir, made, chain_pem = item
        setup = new_setup_credential() if chain_pem is not None else None
        try:
            unit = write_station_unit(
                StateStore(state_dir), made, chain_pem, setup_credential=setup
            )
        except UnitcertError as error:
            raise InputError(f"unit {made.meta.serial}: {error}") from None
        if chain_pem is None:
            return None
        return ProvisionedUnit(
            serial=made.meta.serial,
            hostname=unit.meta.hostname,
            code=unit.info.code,
            state_dir=state_dir,
        )

    return _in_chunks(write, items, progress)


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

    The units' keys and CSRs are made in memory; the CA checks every CSR,
    checks all RSA moduli at once with a product tree against the registry,
    signs and registers in chunks; then each unit's whole state is written
    (two commits). A unit the CA refused gets a self-signed identity for its
    key, as if it had booted unprovisioned.

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
        _UnitJob(serial, config.product, config.domain, key_type, entropy_timeout)
        for serial in serials
    ]
    made = _make_units(jobs, generator, report("keys"))
    outcome = issuer.issue_batch(
        [(unit.meta.serial, unit.csr_pem) for unit in made],
        validity_days=validity_days,
        on_progress=report("issue"),
    )
    chains: dict[str, bytes | None] = {i.serial: i.chain_pem for i in outcome.issued}
    writes = [
        (out_dir / unit.meta.serial, unit, chains.get(unit.meta.serial))
        for unit in made
    ]
    written = _write_units(writes, report("install"))
    provisioned = [unit for unit in written if unit is not None]
    return BatchResult(tuple(provisioned), outcome.refused, outcome.flagged)
