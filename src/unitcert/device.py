"""The unit's agent: first boot, machine binding, factory reset, what is served.

This module holds the decisions; :mod:`unitcert.store` holds the bytes and
:mod:`unitcert.web` serves what :func:`load_unit` returns.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509

from unitcert import certs, keys
from unitcert.code import ALPHABET, qr_payload, spki_from_cert_der
from unitcert.credential import AdminCredential, new_setup_credential
from unitcert.errors import InputError, KeyMismatchError, StateError
from unitcert.store import Generation, Part, StateStore

__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_PRODUCT",
    "Binding",
    "IdentityMeta",
    "InitResult",
    "Unit",
    "check_label",
    "current_binding",
    "init_unit",
    "load_unit",
    "machine_id",
    "renew_self_signed_if_due",
    "reset_unit",
    "save_admin_credential",
    "start_unit",
]

logger = logging.getLogger(__name__)

DEFAULT_PRODUCT = "unit"
# RFC 8375: the special-use domain for names inside a home network.
DEFAULT_DOMAIN = "home.arpa"
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
# Re-sign the self-signed certificate (same key, same code) when less than this
# fraction of its validity remains.
_RESIGN_FRACTION = 1 / 3

KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
META_FILE = "meta.json"
# A self-signed certificate for the identity key, served while the factory
# certificate is expired (the sticker code stays true).
FALLBACK_FILE = "fallback.pem"
ADMIN_FILE = "admin.json"


def check_label(kind: str, value: str) -> str:
    """Return ``value`` lowercased if it is a valid DNS label.

    Raises:
        InputError: it is not (letters, digits and inner hyphens, 1-63 long).
    """
    lowered = value.lower()
    if not _LABEL_RE.match(lowered):
        raise InputError(
            f"the {kind} {value!r} is not a valid DNS label: use 1 to 63 letters, "
            "digits and hyphens, not starting or ending with a hyphen"
        )
    return lowered


def _check_domain(value: str) -> str:
    labels = value.lower().rstrip(".").split(".")
    for label in labels:
        check_label("domain part", label)
    domain = ".".join(labels)
    if len(domain) > 200:
        raise InputError(f"the domain {value!r} is too long for a host name")
    return domain


def machine_id() -> str | None:
    """Return this machine's id, or None when it has none.

    ``UNITCERT_MACHINE_ID`` overrides the files, for images that keep the id
    elsewhere (and for tests).
    """
    override = os.environ.get("UNITCERT_MACHINE_ID")
    if override:
        return override.strip()
    for path in _MACHINE_ID_FILES:
        try:
            value = path.read_text("ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            return value
    return None


@dataclass(frozen=True)
class Binding:
    """Which machine a state belongs to.

    Attributes:
        kind: ``machine-id`` (a hash of the machine id), or ``serial`` for a
            state written on a factory station, which the unit adopts on its
            first start.
        value: the hash or the serial.
    """

    kind: str
    value: str

    def describe(self) -> str:
        """A short text for status output."""
        return f"{self.kind} {self.value[:16]}"


def current_binding(serial: str) -> Binding:
    """Return the binding of a state made on this machine, now."""
    ident = machine_id()
    if ident is None:
        return Binding("serial", serial)
    digest = hashlib.sha256(f"unitcert-machine:{ident}".encode()).hexdigest()
    return Binding("machine-id", digest[:32])


@dataclass(frozen=True)
class IdentityMeta:
    """The facts of a unit's identity, kept beside its key (``meta.json``).

    Attributes:
        source: ``self`` (self-signed) or ``factory``.
        serial: the unit's serial (a DNS label).
        product: the product name (a DNS label).
        domain: the maker's domain.
        key_type: the key type's name.
        binding: the machine the state belongs to.
        created: when the key was made (ISO 8601, UTC).
    """

    source: str
    serial: str
    product: str
    domain: str
    key_type: str
    binding: Binding
    created: str

    @property
    def hostname(self) -> str:
        """The unit's name, ``<serial>.<product>.<domain>``."""
        return f"{self.serial}.{self.product}.{self.domain}"

    def to_json(self) -> bytes:
        """Serialise for ``meta.json``."""
        raw = {
            "source": self.source,
            "serial": self.serial,
            "product": self.product,
            "domain": self.domain,
            "key_type": self.key_type,
            "binding": {"kind": self.binding.kind, "value": self.binding.value},
            "created": self.created,
        }
        return json.dumps(raw, indent=2).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> IdentityMeta:
        """Load from ``meta.json``.

        Raises:
            StateError: the record is damaged.
        """
        try:
            raw = json.loads(data)
            return cls(
                source=raw["source"],
                serial=raw["serial"],
                product=raw["product"],
                domain=raw["domain"],
                key_type=raw["key_type"],
                binding=Binding(raw["binding"]["kind"], raw["binding"]["value"]),
                created=raw["created"],
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(
                "the state is damaged: its identity record is unreadable"
            ) from exc


@dataclass(frozen=True)
class Unit:
    """Everything about a unit that serving and status need, loaded from its state.

    Attributes:
        meta: the identity's facts.
        identity: the identity generation in force.
        key_path: the private key file to serve.
        chain_path: the certificate chain file to serve (leaf first).
        cert: the leaf certificate served.
        info: a description of the leaf.
        source: which source is served (``self``, ``factory``, ...).
        admin: the admin credential.
        generation: the state's generation number.
        binding_ok: False when the state was made on another machine.
        served_note: a sentence for status and pages when what is served is
            not what the source would serve (an expired factory certificate).
    """

    meta: IdentityMeta
    identity: Generation
    key_path: Path
    chain_path: Path
    cert: x509.Certificate
    info: certs.CertInfo
    source: str
    admin: AdminCredential | None
    generation: int
    binding_ok: bool
    served_note: str | None = None

    @property
    def spki_der(self) -> bytes:
        """The DER SPKI of the served key, as the certificate carries it."""
        from cryptography.hazmat.primitives.serialization import Encoding

        return spki_from_cert_der(self.cert.public_bytes(Encoding.DER))

    @property
    def qr_payload(self) -> str:
        """The sticker's QR payload for the served key."""
        return qr_payload(
            hostname=self.meta.hostname, serial=self.meta.serial, spki_der=self.spki_der
        )


@dataclass(frozen=True)
class InitResult:
    """What :func:`init_unit` or :func:`start_unit` did.

    Attributes:
        unit: the unit as loaded afterwards.
        created: True when a new identity was made.
        notes: sentences for the operator about what happened.
    """

    unit: Unit
    created: bool
    notes: tuple[str, ...] = ()


def _random_serial() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(10)).lower()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _identity_files(
    key: keys.PrivateKey, cert_chain: bytes, meta: IdentityMeta
) -> dict[str, bytes]:
    return {
        KEY_FILE: keys.key_pem(key),
        CERT_FILE: cert_chain,
        META_FILE: meta.to_json(),
    }


def _make_identity(
    store: StateStore,
    *,
    serial: str,
    product: str,
    domain: str,
    key_type: keys.KeyType,
    entropy_timeout: float,
    generator: Callable[[keys.KeyType], keys.PrivateKey],
    bind_to_serial: bool = False,
) -> None:
    key = keys.generate_checked_key(
        key_type, entropy_timeout=entropy_timeout, generator=generator
    )
    meta = IdentityMeta(
        source="self",
        serial=serial,
        product=product,
        domain=domain,
        key_type=key_type.value,
        binding=(
            Binding("serial", serial) if bind_to_serial else current_binding(serial)
        ),
        created=_now().isoformat(timespec="seconds"),
    )
    cert = certs.build_self_signed(key, [meta.hostname], serial_number=serial)
    store.commit(Part.IDENTITY, _identity_files(key, certs.pem_chain([cert]), meta))
    logger.info("made a new %s identity for %s", key_type.value, meta.hostname)


def _ensure_admin(store: StateStore, meta: IdentityMeta) -> None:
    """Give the local part a setup credential if it has no admin credential."""
    local = store.current(Part.LOCAL)
    if local is not None and local.has(ADMIN_FILE):
        return
    identity = store.current(Part.IDENTITY)
    printed = identity.has("setup-credential") if identity else False
    setup = (
        identity.read("setup-credential").decode().strip()
        if identity is not None and printed
        else new_setup_credential()
    )
    files = local.files() if local is not None else {}
    files[ADMIN_FILE] = AdminCredential(setup=setup).to_json()
    store.commit(Part.LOCAL, files)
    logger.info("made a new one-time setup credential for %s", meta.hostname)


def save_admin_credential(store: StateStore, credential: AdminCredential) -> None:
    """Replace the admin credential in the local part (one atomic commit)."""
    with store.lock():
        local = store.current(Part.LOCAL)
        files = local.files() if local is not None else {}
        files[ADMIN_FILE] = credential.to_json()
        store.commit(Part.LOCAL, files)


def load_unit(store: StateStore) -> Unit:
    """Load the unit from its state, checking that key and certificate match.

    Raises:
        StateError: there is no identity, or the state is damaged.
        KeyMismatchError: the stored key and certificate do not belong together.
    """
    identity = store.current(Part.IDENTITY)
    if identity is None:
        raise StateError(
            f"there is no unit identity at {store.root}: run "
            f"'unitcert device init --state {store.root}' first"
        )
    meta = IdentityMeta.from_json(identity.read(META_FILE))
    try:
        chain = x509.load_pem_x509_certificates(identity.read(CERT_FILE))
    except ValueError as exc:
        raise StateError("the state is damaged: its certificate is unreadable") from exc
    key = keys.FileKeyStore(identity.path / KEY_FILE).signing_key()
    leaf = chain[0]
    info = certs.cert_info(leaf)
    chain_path = identity.path / CERT_FILE
    served_note = None
    if meta.source == "factory" and info.not_after < _now():
        expired = f"the factory certificate expired on {info.not_after:%Y-%m-%d}"
        if identity.has(FALLBACK_FILE):
            chain_path = identity.path / FALLBACK_FILE
            leaf = x509.load_pem_x509_certificate(identity.read(FALLBACK_FILE))
            info = certs.cert_info(leaf)
            served_note = (
                f"{expired}: serving a self-signed certificate for the same key "
                "(the sticker code still applies) until the maker re-issues it"
            )
        else:
            served_note = f"{expired}: have the maker re-issue it"
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def spki(k: object) -> bytes:
        return k.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined,no-any-return]

    if spki(key.public_key()) != spki(leaf.public_key()):
        from unitcert.code import code_for_spki

        key_code = str(code_for_spki(spki(key.public_key())))
        raise KeyMismatchError(
            f"the state is damaged: its certificate (key {info.code}) does not match "
            f"its private key ({key_code}): reset the unit",
            cert_code=str(info.code),
            key_code=key_code,
        )
    local = store.current(Part.LOCAL)
    admin = (
        AdminCredential.from_json(local.read(ADMIN_FILE))
        if local is not None and local.has(ADMIN_FILE)
        else None
    )
    return Unit(
        meta=meta,
        identity=identity,
        key_path=identity.path / KEY_FILE,
        chain_path=chain_path,
        cert=leaf,
        info=info,
        source=meta.source,
        admin=admin,
        generation=store.generation(),
        binding_ok=_binding_matches(meta),
        served_note=served_note,
    )


def _binding_matches(meta: IdentityMeta) -> bool:
    if meta.binding.kind == "serial":
        # Not yet adopted (made on a station or a machine without an id).
        return True
    return meta.binding == current_binding(meta.serial)


def init_unit(
    store: StateStore,
    *,
    serial: str | None = None,
    product: str = DEFAULT_PRODUCT,
    domain: str = DEFAULT_DOMAIN,
    key_type: keys.KeyType = keys.KeyType.P256,
    entropy_timeout: float = keys.DEFAULT_ENTROPY_TIMEOUT,
    generator: Callable[[keys.KeyType], keys.PrivateKey] = keys.generate_key,
    bind_to_serial: bool = False,
) -> InitResult:
    """First boot: make the unit's identity unless it already has one.

    ``bind_to_serial`` is for a factory station writing a unit's state: the
    state is bound to the serial, and the unit adopts it on its first start.

    Raises:
        InputError: a serial, product or domain is not a valid name.
        EntropyError: the random pool never became ready (no key is written).
        WeakKeyError: the key generator keeps making weak keys.
    """
    product = check_label("product", product)
    domain = _check_domain(domain)
    serial = check_label("serial", serial) if serial else None

    store.create()
    with store.lock():
        if store.exists():
            unit = load_unit(store)
            return InitResult(
                unit,
                created=False,
                notes=(
                    f"the unit already has its identity ({unit.info.code}); kept it",
                ),
            )
        _make_identity(
            store,
            serial=serial or _random_serial(),
            product=product,
            domain=domain,
            key_type=key_type,
            entropy_timeout=entropy_timeout,
            generator=generator,
            bind_to_serial=bind_to_serial,
        )
        meta = IdentityMeta.from_json(store.current(Part.IDENTITY).read(META_FILE))  # type: ignore[union-attr]
        _ensure_admin(store, meta)
        return InitResult(load_unit(store), created=True)


def start_unit(
    store: StateStore,
    *,
    entropy_timeout: float = keys.DEFAULT_ENTROPY_TIMEOUT,
    generator: Callable[[keys.KeyType], keys.PrivateKey] = keys.generate_key,
    now: dt.datetime | None = None,
    **init_options: str,
) -> InitResult:
    """What a unit does when its agent starts: init if needed, check the machine
    binding, adopt a station binding, keep the self-signed certificate fresh.

    Raises:
        The errors of :func:`init_unit` and :func:`load_unit`.
    """
    result = init_unit(
        store,
        entropy_timeout=entropy_timeout,
        generator=generator,
        **init_options,  # type: ignore[arg-type]
    )
    notes = list(result.notes)
    created = result.created
    with store.lock():
        identity = store.current(Part.IDENTITY)
        assert identity is not None
        meta = IdentityMeta.from_json(identity.read(META_FILE))
        here = current_binding(meta.serial)
        if meta.binding.kind == "serial" and here.kind == "machine-id":
            _rebind(store, identity, replace(meta, binding=here))
            notes.append("bound the state to this machine")
        elif meta.binding != here and not _binding_matches(meta):
            notes.extend(
                _handle_clone(
                    store, meta, entropy_timeout=entropy_timeout, generator=generator
                )
            )
            created = created or meta.source != "factory"
        _ensure_admin(store, meta)
    if renew_self_signed_if_due(store, now=now):
        notes.append("re-signed the self-signed certificate with the same key")
    return InitResult(load_unit(store), created=created, notes=tuple(notes))


def _rebind(store: StateStore, identity: Generation, meta: IdentityMeta) -> None:
    files = identity.files()
    files[META_FILE] = meta.to_json()
    store.commit(Part.IDENTITY, files)


def _handle_clone(
    store: StateStore,
    meta: IdentityMeta,
    *,
    entropy_timeout: float,
    generator: Callable[[keys.KeyType], keys.PrivateKey],
) -> list[str]:
    if meta.source == "factory":
        logger.warning(
            "this state was made on another machine (a cloned image?); the factory "
            "identity of %s is kept but flagged: have the maker check this unit",
            meta.hostname,
        )
        return ["state made on another machine: factory identity kept and flagged"]
    logger.warning(
        "this state was made on another machine (a cloned image?); making a new "
        "identity so that no two units share a key"
    )
    store.wipe(Part.LOCAL)
    _make_identity(
        store,
        serial=meta.serial,
        product=meta.product,
        domain=meta.domain,
        key_type=keys.KeyType.parse(meta.key_type),
        entropy_timeout=entropy_timeout,
        generator=generator,
    )
    return ["state made on another machine (cloned image): made a new identity"]


def reset_unit(
    store: StateStore,
    *,
    regenerate_identity: bool = False,
    entropy_timeout: float = keys.DEFAULT_ENTROPY_TIMEOUT,
    generator: Callable[[keys.KeyType], keys.PrivateKey] = keys.generate_key,
) -> InitResult:
    """Factory reset: wipe the local part; remake a non-factory identity.

    A factory identity survives, like an IEEE 802.1AR IDevID, unless
    ``regenerate_identity`` forces a new key.

    Raises:
        StateError: there is no unit state.
    """
    with store.lock():
        identity = store.current(Part.IDENTITY)
        if identity is None:
            raise StateError(f"there is no unit state at {store.root} to reset")
        meta = IdentityMeta.from_json(identity.read(META_FILE))
        store.wipe(Part.LOCAL)
        notes = ["wiped the owner's settings and certificates"]
        regenerate = regenerate_identity or meta.source != "factory"
        if regenerate:
            _make_identity(
                store,
                serial=meta.serial,
                product=meta.product,
                domain=meta.domain,
                key_type=keys.KeyType.parse(meta.key_type),
                entropy_timeout=entropy_timeout,
                generator=generator,
            )
            notes.append(
                "made a new identity key: the old sticker code no longer applies"
            )
        else:
            notes.append("kept the factory identity: the sticker still applies")
        _ensure_admin(store, meta)
    return InitResult(load_unit(store), created=regenerate, notes=tuple(notes))


def renew_self_signed_if_due(
    store: StateStore, *, now: dt.datetime | None = None
) -> bool:
    """Re-sign the self-signed certificate with the same key when a third of its
    validity remains, so the fingerprint code never changes.

    A factory unit whose certificate has expired gets a self-signed fallback
    for the same key (``fallback.pem``), kept fresh the same way, until the
    maker re-issues its certificate.

    Returns:
        True when a new certificate was committed.
    """
    now = now or _now()
    with store.lock():
        unit = load_unit(store)
        target = CERT_FILE
        served: certs.CertInfo | None = unit.info
        if unit.meta.source == "factory":
            factory = x509.load_pem_x509_certificate(unit.identity.read(CERT_FILE))
            if factory.not_valid_after_utc >= now:
                return False
            target = FALLBACK_FILE
            served = None
            if unit.identity.has(FALLBACK_FILE):
                fallback = unit.identity.read(FALLBACK_FILE)
                served = certs.cert_info(x509.load_pem_x509_certificate(fallback))
        elif unit.meta.source != "self":
            return False
        if served is not None:
            lifetime = served.not_after - served.not_before
            if served.not_after - now > lifetime * _RESIGN_FRACTION:
                return False
        key = keys.FileKeyStore(unit.key_path).signing_key()
        cert = certs.build_self_signed(
            key, [unit.meta.hostname], now=now, serial_number=unit.meta.serial
        )
        files = unit.identity.files()
        files[target] = certs.pem_chain([cert])
        store.commit(Part.IDENTITY, files)
        logger.info(
            "re-signed the self-signed certificate; code %s unchanged", unit.info.code
        )
        return True
