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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from unitcert import certs, keys
from unitcert.code import ALPHABET, code_for_spki, qr_payload, spki_from_cert_der
from unitcert.credential import AdminCredential, new_setup_credential
from unitcert.errors import InputError, KeyMismatchError, StateError, UnitcertError
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
    "describe_source",
    "init_unit",
    "load_unit",
    "machine_id",
    "renew_self_signed_if_due",
    "reset_unit",
    "save_admin_credential",
    "start_unit",
    "write_station_state",
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
# A setup credential printed on the sticker (factory units), in the identity part.
_SETUP_CREDENTIAL_FILE = "setup-credential"
# The owner's choice of what to serve, in the local part; absent means the identity.
SOURCE_FILE = "source"
# Certificates the owner adds live in the local part: source -> (key, chain).
LOCAL_SOURCES: dict[str, tuple[str, str]] = {
    "acme": ("acme-key.pem", "acme-chain.pem"),
    "custom": ("custom-key.pem", "custom-chain.pem"),
}


_SOURCE_NAMES = {
    "self": "self-signed",
    "factory": "factory (the maker's CA)",
    "acme": "ACME (Let's Encrypt or another ACME CA)",
    "custom": "custom (installed by the owner)",
}


def _remedy(store_root: Path) -> str:
    return (
        f"run 'unitcert device reset --state {store_root} --yes "
        "--regenerate-identity' to make a new identity (the sticker code changes)"
    )


def describe_source(source: str) -> str:
    """Return the name users see for a certificate source (``self`` is self-signed)."""
    return _SOURCE_NAMES.get(source, source)


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
    if labels[-1].isdigit():
        raise InputError(
            f"the domain {value!r} ends in a number, like an IP address: give a "
            "DNS domain such as example.com"
        )
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
            if raw["source"] not in ("self", "factory"):
                raise ValueError(f"unknown identity source {raw['source']!r}")
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
        source: which source is served (``self``, ``factory``, ``acme``,
            ``custom``).
        admin: the admin credential.
        generation: the state's generation number.
        binding_ok: False when the state was made on another machine.
        served_note: a sentence for status and pages when what is served is
            not what the owner chose (an expired factory, ACME or custom
            certificate), saying what is served instead and why.
        identity_info: the identity certificate, whose code is on the sticker;
            the same as ``info`` unless a local source is served.
        chosen: the source the owner chose in the local part (``acme`` or
            ``custom``), or None for the unit's own identity.
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
    identity_info: certs.CertInfo | None = None
    chosen: str | None = None

    @property
    def spki_der(self) -> bytes:
        """The DER SPKI of the served key, as the certificate carries it."""
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
    keep_previous: bool = True,
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
    store.commit(
        Part.IDENTITY,
        _identity_files(key, certs.pem_chain([cert]), meta),
        keep_previous=keep_previous,
    )
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


@dataclass(frozen=True)
class _Served:
    """A key and chain that can be served, checked to belong together."""

    source: str
    key_path: Path
    chain_path: Path
    cert: x509.Certificate
    info: certs.CertInfo


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _read_served(
    generation: Generation, source: str, key_name: str, chain_name: str
) -> _Served:
    """Load a key and chain from a generation and check that they match.

    Raises:
        StateError: a file is missing or unreadable.
        KeyMismatchError: the certificate is not for the key.
    """
    try:
        chain = x509.load_pem_x509_certificates(generation.read(chain_name))
    except ValueError as exc:
        raise StateError(
            f"the state is damaged: the {source} certificate "
            f"{generation.path / chain_name} is unreadable"
        ) from exc
    key_path = generation.path / key_name
    try:
        key = keys.FileKeyStore(key_path).signing_key()
    except InputError as exc:
        raise StateError(
            f"the state is damaged: the {source} key {key_path} is unreadable"
        ) from exc
    leaf = chain[0]
    info = certs.cert_info(leaf)
    key_spki = _spki(key.public_key())
    if key_spki != _spki(leaf.public_key()):
        key_code = str(code_for_spki(key_spki))
        raise KeyMismatchError(
            f"the state is damaged: its {source} certificate (key {info.code}) does "
            f"not match its private key ({key_code})",
            cert_code=str(info.code),
            key_code=key_code,
        )
    return _Served(source, key_path, generation.path / chain_name, leaf, info)


def _identity_served(
    identity: Generation, meta: IdentityMeta
) -> tuple[_Served, str | None]:
    """The identity's certificate, or its self-signed fallback when a factory
    certificate has expired; with a note when the fallback is used."""
    served = _read_served(identity, meta.source, KEY_FILE, CERT_FILE)
    if meta.source != "factory" or served.info.not_after >= _now():
        return served, None
    expired = f"the factory certificate expired on {served.info.not_after:%Y-%m-%d}"
    if not identity.has(FALLBACK_FILE):
        return served, f"{expired}: have the maker re-issue it"
    fallback = _read_served(identity, "self", KEY_FILE, FALLBACK_FILE)
    return fallback, (
        f"{expired}: serving a self-signed certificate for the same key "
        "(the sticker code still applies) until the maker re-issues it"
    )


def _local_served(
    local: Generation, chosen: str, fallback: _Served
) -> tuple[_Served, str | None]:
    """The owner's chosen certificate, or the identity with a note saying why not.

    The unit never serves an expired certificate when a valid one exists, and
    a damaged local certificate never stops it from serving.
    """
    key_name, chain_name = LOCAL_SOURCES[chosen]
    if not (local.has(key_name) and local.has(chain_name)):
        return fallback, (
            f"the {chosen} certificate is missing: serving the unit's own identity"
        )
    try:
        served = _read_served(local, chosen, key_name, chain_name)
    except (StateError, KeyMismatchError, InputError) as exc:
        logger.error("cannot serve the %s certificate: %s", chosen, exc)
        return fallback, (
            f"the {chosen} certificate cannot be served ({exc}): serving the "
            "unit's own identity"
        )
    now = _now()
    if served.info.not_after < now:
        return fallback, (
            f"the {chosen} certificate expired on {served.info.not_after:%Y-%m-%d}: "
            "serving the unit's own identity until it is renewed or replaced"
        )
    if served.info.not_before > now:
        return fallback, (
            f"the {chosen} certificate is not valid before "
            f"{served.info.not_before:%Y-%m-%d %H:%M} UTC: serving the unit's own "
            "identity until then"
        )
    return served, None


def chosen_source(local: Generation | None) -> str | None:
    """Return the local source the owner chose (``acme``/``custom``), or None."""
    if local is None or not local.has(SOURCE_FILE):
        return None
    choice = local.read(SOURCE_FILE).decode("ascii", "replace").strip()
    if choice not in LOCAL_SOURCES:
        logger.warning("ignoring an unknown certificate source %r in the state", choice)
        return None
    return choice


def _read_meta(identity: Generation, store_root: Path) -> IdentityMeta:
    try:
        return IdentityMeta.from_json(identity.read(META_FILE))
    except StateError as exc:
        raise StateError(
            f"the state is damaged: {identity.path / META_FILE} is unreadable: "
            f"{_remedy(store_root)}"
        ) from exc


def _identity_complete(identity: Generation) -> bool:
    """Say whether a generation holds a whole identity (record, key, matching cert)."""
    try:
        meta = IdentityMeta.from_json(identity.read(META_FILE))
        _read_served(identity, meta.source, KEY_FILE, CERT_FILE)
    except (UnitcertError, OSError, ValueError):
        return False
    return True


def _repair_identity(store: StateStore) -> str | None:
    """Point a missing or broken identity link at the newest whole generation.

    Call with the lock held. A lost link must never turn into a new key: the
    sticker would silently stop applying.

    Returns:
        A note for the operator when something was repaired.
    """
    try:
        if store.current(Part.IDENTITY) is not None:
            return None
    except StateError:
        pass
    if not store.generations(Part.IDENTITY):
        return None
    restored = store.recover(Part.IDENTITY, _identity_complete)
    if restored is None:
        return None
    return (
        "the identity's current link was missing or damaged: restored it to "
        f"generation {restored.number}, the newest whole identity"
    )


def load_unit(store: StateStore) -> Unit:
    """Load the unit from its state: what it serves, and why.

    The identity (self-signed or factory) is served unless the owner chose a
    local source (``acme`` or ``custom``) that holds a currently valid
    certificate.

    Raises:
        StateError: there is no identity, or the identity is damaged.
        KeyMismatchError: the identity's key and certificate do not belong
            together.
    """
    try:
        identity = store.current(Part.IDENTITY)
    except StateError as exc:
        raise StateError(
            f"{exc}: start the unit ('unitcert device serve') or run 'unitcert "
            f"device init --state {store.root}' to restore it from a whole "
            "generation"
        ) from None
    if identity is None:
        if store.root.is_dir() and store.generations(Part.IDENTITY):
            raise StateError(
                f"the state at {store.root} has lost its identity link: start the "
                "unit ('unitcert device serve') or run 'unitcert device init' to "
                "restore it"
            )
        raise StateError(
            f"there is no unit identity at {store.root}: run "
            f"'unitcert device init --state {store.root}' first"
        )
    meta = _read_meta(identity, store.root)
    try:
        own, note = _identity_served(identity, meta)
    except (StateError, KeyMismatchError) as exc:
        raise StateError(f"{exc}: {_remedy(store.root)}") from exc
    local = store.current(Part.LOCAL)
    chosen = chosen_source(local)
    served = own
    if local is not None and chosen is not None:
        served, local_note = _local_served(local, chosen, own)
        note = local_note or note
    admin = (
        AdminCredential.from_json(local.read(ADMIN_FILE))
        if local is not None and local.has(ADMIN_FILE)
        else None
    )
    return Unit(
        meta=meta,
        identity=identity,
        key_path=served.key_path,
        chain_path=served.chain_path,
        cert=served.cert,
        info=served.info,
        source=served.source,
        admin=admin,
        generation=store.generation(),
        binding_ok=_binding_matches(meta),
        served_note=note,
        identity_info=own.info,
        chosen=chosen,
    )


def install_local_source(
    store: StateStore,
    source: str,
    *,
    key_pem: bytes,
    chain_pem: bytes,
    extra_files: Mapping[str, bytes] | None = None,
    select: bool = True,
) -> Unit:
    """Put a key and chain for ``source`` into the local part in one atomic commit.

    The caller has checked them (chain, key match, weakness); this only
    stores them, with ``extra_files`` (e.g. ACME account data), and makes
    ``source`` the one served when ``select`` is true.

    Raises:
        ValueError: ``source`` is not a local source.
    """
    if source not in LOCAL_SOURCES:
        raise ValueError(f"not a local certificate source: {source!r}")
    key_name, chain_name = LOCAL_SOURCES[source]
    with store.lock():
        local = store.current(Part.LOCAL)
        files = local.files() if local is not None else {}
        files.update(extra_files or {})
        files[key_name] = key_pem
        files[chain_name] = chain_pem
        if select:
            files[SOURCE_FILE] = source.encode("ascii")
        store.commit(Part.LOCAL, files)
    return load_unit(store)


def select_source(store: StateStore, source: str | None) -> Unit:
    """Serve ``source`` (``acme``/``custom``), or the unit's own identity for None.

    Raises:
        ValueError: ``source`` is not a local source.
        InputError: the state holds no certificate for ``source``.
    """
    with store.lock():
        local = store.current(Part.LOCAL)
        files = local.files() if local is not None else {}
        if source is None:
            files.pop(SOURCE_FILE, None)
        else:
            if source not in LOCAL_SOURCES:
                raise ValueError(f"not a local certificate source: {source!r}")
            if not all(name in files for name in LOCAL_SOURCES[source]):
                raise InputError(
                    f"the unit has no {source} certificate to serve: install one first"
                )
            files[SOURCE_FILE] = source.encode("ascii")
        store.commit(Part.LOCAL, files)
    return load_unit(store)


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
    serial = check_label("serial", serial) if serial is not None else None

    store.create()
    with store.lock():
        repaired = _repair_identity(store)
        if store.exists():
            unit = load_unit(store)
            notes = [repaired] if repaired else []
            notes.append(
                f"the unit already has its identity ({unit.info.code}); kept it"
            )
            ignored = _ignored_options(unit.meta, serial=serial, key_type=key_type)
            if ignored:
                notes.append(ignored)
            return InitResult(unit, created=False, notes=tuple(notes))
        if store.generations(Part.IDENTITY) and _has_admin(store):
            # Generations exist but none is whole, after first boot finished:
            # this is damage, not a first boot; never replace a key silently.
            raise StateError(
                f"the state at {store.root} holds no whole identity: "
                f"{_remedy(store.root)}"
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
        unit = load_unit(store)
        _ensure_admin(store, unit.meta)
        return InitResult(load_unit(store), created=True)


def write_station_state(
    store: StateStore,
    *,
    key: keys.PrivateKey,
    chain_pem: bytes,
    meta: IdentityMeta,
    setup_credential: str | None = None,
) -> Unit:
    """Write a new unit's whole state on a factory station, in two commits.

    One identity commit holds the key (made with
    :func:`unitcert.keys.generate_checked_key`), the chain (leaf first), the
    identity record and the setup credential printed on the sticker; one
    local commit holds the admin credential. The state must bind to the
    serial (the unit adopts it on its first start). The caller has checked
    the chain (a factory chain is checked by the CA that issued it); this
    checks that its leaf is for ``key`` before writing, and reads the key and
    leaf back once afterwards.

    Args:
        store: the unit's state; it must hold no identity yet.
        key: the unit's identity key.
        chain_pem: the certificate chain to serve, leaf first.
        meta: the identity's facts (``binding`` of kind ``serial``).
        setup_credential: the printed setup credential, kept in the identity
            so that a factory reset brings it back; None makes a new one in
            the local part only.

    Returns:
        The unit as loaded afterwards.

    Raises:
        ValueError: ``meta`` is not bound to its serial, or the chain is
            unreadable.
        StateError: the state already holds a unit, or what was written does
            not read back.
        KeyMismatchError: the chain's leaf is not for ``key`` (nothing is
            written).
    """
    if meta.binding != Binding("serial", meta.serial):
        raise ValueError("a station writes states bound to the unit's serial")
    leaf = x509.load_pem_x509_certificate(chain_pem)
    key_spki = _spki(key.public_key())
    if key_spki != _spki(leaf.public_key()):
        cert_code = str(certs.cert_info(leaf).code)
        key_code = str(code_for_spki(key_spki))
        raise KeyMismatchError(
            f"the certificate's key ({cert_code}) is not the unit's key "
            f"({key_code}): write the chain issued for this unit's own CSR",
            cert_code=cert_code,
            key_code=key_code,
        )
    identity = _identity_files(key, chain_pem, meta)
    if setup_credential is not None:
        identity[_SETUP_CREDENTIAL_FILE] = setup_credential.encode("utf-8") + b"\n"
    admin = AdminCredential(setup=setup_credential or new_setup_credential())
    store.create()
    with store.lock():
        if store.generations(Part.IDENTITY) or store.generations(Part.LOCAL):
            raise StateError(
                f"the state at {store.root} already holds a unit: give an empty "
                "state directory"
            )
        written = store.commit(Part.IDENTITY, identity)
        # The one check of what was written: the stored key and leaf match.
        served = _read_served(written, meta.source, KEY_FILE, CERT_FILE)
        store.commit(Part.LOCAL, {ADMIN_FILE: admin.to_json()})
    logger.info("wrote the %s identity of %s", meta.source, meta.hostname)
    return Unit(
        meta=meta,
        identity=written,
        key_path=served.key_path,
        chain_path=served.chain_path,
        cert=served.cert,
        info=served.info,
        source=served.source,
        admin=admin,
        generation=store.generation(),
        binding_ok=True,
        identity_info=served.info,
    )


def _has_admin(store: StateStore) -> bool:
    try:
        local = store.current(Part.LOCAL)
    except StateError:
        return True
    return local is not None and local.has(ADMIN_FILE)


def _ignored_options(
    meta: IdentityMeta, *, serial: str | None, key_type: keys.KeyType
) -> str | None:
    """Say which identity options an existing identity did not take."""
    ignored = []
    if serial is not None and serial != meta.serial:
        ignored.append(f"--serial (it stays {meta.serial})")
    if key_type is not keys.KeyType.P256 and key_type.value != meta.key_type:
        ignored.append(f"--key-type (it stays {meta.key_type})")
    if not ignored:
        return None
    return (
        f"options for a new identity were not applied: {', '.join(ignored)}; a "
        "factory reset with --regenerate-identity makes a new one"
    )


def start_unit(
    store: StateStore,
    *,
    serial: str | None = None,
    product: str = DEFAULT_PRODUCT,
    domain: str = DEFAULT_DOMAIN,
    key_type: keys.KeyType = keys.KeyType.P256,
    entropy_timeout: float = keys.DEFAULT_ENTROPY_TIMEOUT,
    generator: Callable[[keys.KeyType], keys.PrivateKey] = keys.generate_key,
    now: dt.datetime | None = None,
) -> InitResult:
    """What a unit does when its agent starts: init if needed, check the machine
    binding, adopt a station binding, keep the self-signed certificate fresh.

    The identity options are used only when the unit has no identity yet.

    Raises:
        The errors of :func:`init_unit` and :func:`load_unit`.
    """
    result = init_unit(
        store,
        serial=serial,
        product=product,
        domain=domain,
        key_type=key_type,
        entropy_timeout=entropy_timeout,
        generator=generator,
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
            clone_notes = _handle_clone(
                store, meta, entropy_timeout=entropy_timeout, generator=generator
            )
            if meta.source != "factory":
                # The identity that init kept is gone: do not report it.
                notes = [n for n in notes if "kept it" not in n]
                created = True
            notes.extend(clone_notes)
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
        keep_previous=False,
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

    The old identity key (when remade) and every earlier generation of the
    owner's part are removed, so that nothing of the previous owner and no
    retired key stays behind. A damaged identity is repaired from its newest
    whole generation, or, with ``regenerate_identity``, replaced.

    Raises:
        StateError: there is no unit state, or the identity is damaged and
            ``regenerate_identity`` was not asked for.
    """
    if not store.root.is_dir():
        raise StateError(f"there is no unit state at {store.root} to reset")
    with store.lock():
        _repair_identity(store)
        meta = _last_known_meta(store)
        if meta is None and not regenerate_identity:
            raise StateError(
                f"the state at {store.root} holds no readable identity: "
                f"{_remedy(store.root)}"
            )
        store.wipe(Part.LOCAL)
        notes = ["wiped the owner's settings and certificates"]
        regenerate = (
            regenerate_identity
            or meta is None
            or meta.source != "factory"
            or not _identity_whole(store)
        )
        if regenerate:
            _make_identity(
                store,
                serial=meta.serial if meta else _random_serial(),
                product=meta.product if meta else DEFAULT_PRODUCT,
                domain=meta.domain if meta else DEFAULT_DOMAIN,
                key_type=keys.KeyType.parse(meta.key_type)
                if meta
                else keys.KeyType.P256,
                entropy_timeout=entropy_timeout,
                generator=generator,
                keep_previous=False,
            )
            notes.append(
                "made a new identity key: the old sticker code no longer applies"
            )
        else:
            notes.append("kept the factory identity: the sticker still applies")
        unit = load_unit(store)
        _ensure_admin(store, unit.meta)
    return InitResult(load_unit(store), created=regenerate, notes=tuple(notes))


def _identity_whole(store: StateStore) -> bool:
    try:
        current = store.current(Part.IDENTITY)
    except StateError:
        return False
    return current is not None and _identity_complete(current)


def _last_known_meta(store: StateStore) -> IdentityMeta | None:
    """The identity record in force, else the newest readable one, else None."""
    candidates = []
    try:
        current = store.current(Part.IDENTITY)
    except StateError:
        current = None
    if current is not None:
        candidates.append(current)
    candidates.extend(store.generations(Part.IDENTITY))
    for generation in candidates:
        try:
            return IdentityMeta.from_json(generation.read(META_FILE))
        except (StateError, OSError):
            continue
    return None


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
