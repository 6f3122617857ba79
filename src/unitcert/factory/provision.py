"""The station flows: provision one unit, or a batch of simulated units.

A station that can reach a unit's state runs the unit's steps itself: it
makes the identity with :func:`unitcert.device.init_unit` (bound to the
serial, which the unit adopts on its first start), has the unit make its CSR,
issues it, installs the chain and prints the sticker. The key is made in the
unit's state and never copied anywhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from unitcert import device, keys
from unitcert.code import FingerprintCode
from unitcert.errors import DuplicateError, InputError
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

# The unit-side steps of a batch wait mostly on fsync, which releases the GIL.
_BATCH_THREADS = 8


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
    issuer: Issuer,
    *,
    key_type: keys.KeyType,
    entropy_timeout: float,
    generator: Callable[[keys.KeyType], keys.PrivateKey],
) -> tuple[StateStore, device.InitResult, bytes]:
    """The unit's own steps: make its identity (station-bound) and its CSR."""
    store = StateStore(state_dir)
    config = issuer.ca.config
    result = device.init_unit(
        store,
        serial=serial,
        product=config.product,
        domain=config.domain,
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
        issuer,
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

    def make(serial: str) -> tuple[StateStore, device.InitResult, bytes]:
        made = _make_unit(
            out_dir / serial,
            serial,
            issuer,
            key_type=key_type,
            entropy_timeout=entropy_timeout,
            generator=generator,
        )
        report("keys")(1)
        return made

    with ThreadPoolExecutor(_BATCH_THREADS) as pool:
        units = dict(zip(serials, pool.map(make, serials), strict=True))
    outcome = issuer.issue_batch(
        [(serial, csr) for serial, (_, _, csr) in units.items()],
        validity_days=validity_days,
        on_progress=report("issue"),
    )

    def install(serial: str, chain_pem: bytes) -> ProvisionedUnit:
        store, result, _ = units[serial]
        unit = install_factory_identity(
            store, chain_pem, setup_credential=_setup_credential(result)
        )
        report("install")(1)
        return ProvisionedUnit(
            serial=serial,
            hostname=unit.meta.hostname,
            code=unit.info.code,
            state_dir=store.root,
        )

    with ThreadPoolExecutor(_BATCH_THREADS) as pool:
        provisioned = list(
            pool.map(
                install,
                [i.serial for i in outcome.issued],
                [i.chain_pem for i in outcome.issued],
            )
        )
    return BatchResult(tuple(provisioned), outcome.refused, outcome.flagged)
