"""The owner's certificate in the unit's state: CSR, import, choice, revert.

Everything lives in the local part (a factory reset wipes it), under the
names :data:`unitcert.device.LOCAL_SOURCES` gives the ``custom`` source::

    custom-key.pem          the key of the installed custom certificate (0600)
    custom-chain.pem        its chain as served: leaf first, no root
    custom-pending-key.pem  a key made by 'device csr --custom', waiting for
                            its certificate (0600)
    custom-pending.csr      that CSR, which also records the names asked for
    source                  the owner's choice of what to serve

Every change is one commit of a new local generation, made under the state
lock, so ``serve`` sees the old state or the new one and never a mix. A
refused import writes nothing at all.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from unitcert import certs, device, keys
from unitcert.custom.bundle import InputFile, load_bundle
from unitcert.custom.check import Candidate, KnownKey, check_bundle
from unitcert.errors import InputError, StateError
from unitcert.store import Generation, Part, StateStore

__all__ = [
    "IDENTITY_CHOICES",
    "PENDING_CSR_FILE",
    "PENDING_KEY_FILE",
    "Change",
    "can_revert",
    "install_custom",
    "make_custom_csr",
    "pending_names",
    "prepare_import",
    "revert_choice",
    "unit_names",
    "use_source",
]

logger = logging.getLogger(__name__)

KEY_FILE, CHAIN_FILE = device.LOCAL_SOURCES["custom"]
PENDING_KEY_FILE = "custom-pending-key.pem"
PENDING_CSR_FILE = "custom-pending.csr"
# What 'revert' brings back from the previous generation: the owner's choice
# and the custom certificate, never the admin password or other settings.
_REVERTED_FILES = (device.SOURCE_FILE, KEY_FILE, CHAIN_FILE)
IDENTITY_CHOICES = ("self", "factory")
_MAX_CSR_NAMES = 50


def _local(store: StateStore) -> Generation | None:
    return store.current(Part.LOCAL)


def _load_key(generation: Generation, name: str) -> keys.PrivateKey:
    try:
        return keys.load_key_pem(generation.read(name))
    except InputError as exc:
        raise StateError(
            f"the state is damaged: {name} is not a readable key; make a new CSR "
            "or reset the unit"
        ) from exc


def pending_names(store: StateStore) -> tuple[str, ...]:
    """Return the names of the pending custom CSR, empty when there is none."""
    return tuple(_pending_names(_local(store)))


def _pending_names(local: Generation | None) -> list[str]:
    if local is None or not local.has(PENDING_CSR_FILE):
        return []
    try:
        csr = x509.load_pem_x509_csr(local.read(PENDING_CSR_FILE))
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        logger.warning("the pending custom CSR in the state is unreadable")
        return []
    return [str(n) for n in san.value.get_values_for_type(x509.DNSName)] + [
        str(n) for n in san.value.get_values_for_type(x509.IPAddress)
    ]


def unit_names(store: StateStore) -> tuple[str, ...]:
    """Return the names the unit answers to, for the check of a new certificate.

    They are the identity's host name, the names of a pending custom CSR, and
    the names of the custom certificate in force (so that its renewal for
    the same names needs no ``--force``).

    Raises:
        StateError: the unit has no identity.
    """
    identity = store.current(Part.IDENTITY)
    if identity is None:
        raise StateError(
            f"there is no unit identity at {store.root}: run 'unitcert device init "
            f"--state {store.root}' first"
        )
    names = [device.IdentityMeta.from_json(identity.read(device.META_FILE)).hostname]
    local = _local(store)
    names += _pending_names(local)
    if local is not None and local.has(CHAIN_FILE):
        try:
            current = x509.load_pem_x509_certificates(local.read(CHAIN_FILE))[0]
            names += certs.cert_info(current).names
        except ValueError:
            logger.warning("the installed custom chain is unreadable")
    return tuple(dict.fromkeys(names))


def _known_keys(store: StateStore) -> list[KnownKey]:
    local = _local(store)
    known = []
    if local is not None and local.has(PENDING_KEY_FILE):
        known.append(KnownKey("pending", _load_key(local, PENDING_KEY_FILE)))
    if local is not None and local.has(KEY_FILE):
        known.append(KnownKey("installed", _load_key(local, KEY_FILE)))
    return known


def prepare_import(
    store: StateStore,
    files: Sequence[InputFile],
    *,
    password: bytes | None = None,
    ca_files: Sequence[InputFile] = (),
    now: dt.datetime | None = None,
) -> Candidate:
    """Read and check certificate files for this unit without changing anything.

    Args:
        store: the unit's state (read only).
        files: the certificate, chain and key files, in any order and format.
        password: the password of an encrypted key or PKCS#12 file.
        ca_files: the customer's root(s) to verify the chain against.
        now: the time to check validity at (default: now).

    Raises:
        The errors of :func:`unitcert.custom.bundle.load_bundle` and
        :func:`unitcert.custom.check.check_bundle`; StateError when the
        unit has no identity.
    """
    if not files:
        raise InputError("no certificate file was given: give the certificate file")
    bundle = load_bundle(files, password)
    roots: tuple[x509.Certificate, ...] = ()
    if ca_files:
        ca_bundle = load_bundle(ca_files, None)
        if ca_bundle.keys:
            raise InputError(
                "the root certificate file holds a private key: give only the "
                "root's certificate (a CA key never belongs on a unit)"
            )
        if not ca_bundle.certs:
            raise InputError("the root certificate file holds no certificate")
        roots = ca_bundle.certs
    return check_bundle(
        bundle,
        roots=roots,
        # Loading a key checks it, which costs tens of milliseconds for RSA:
        # only a certificate given without its key needs the unit's keys.
        known_keys=() if bundle.keys else _known_keys(store),
        unit_names=unit_names(store),
        now=now,
    )


def install_custom(
    store: StateStore, candidate: Candidate, *, force: bool = False
) -> device.Unit:
    """Install a checked certificate as the custom source and serve it.

    One commit of the local part: the key and chain, ``source`` set to
    ``custom``, and a pending key removed once its certificate is installed.

    Args:
        store: the unit's state.
        candidate: from :func:`prepare_import`.
        force: install although the certificate names none of the unit's
            names.

    Raises:
        InputError: the certificate names none of the unit's names and
            ``force`` is false, or the pending key changed since the check.
    """
    if candidate.name_warning is not None and not force:
        raise InputError(
            f"{candidate.name_warning}: install it anyway with --force if that is "
            "what you want"
        )
    with store.lock():
        local = _local(store)
        files = local.files() if local is not None else {}
        if candidate.key_origin == "pending":
            if files.get(PENDING_KEY_FILE) != candidate.key_pem:
                raise InputError(
                    "the pending key changed while the certificate was checked (a new "
                    "'device csr --custom'?): import the certificate again"
                )
            files.pop(PENDING_KEY_FILE)
            files.pop(PENDING_CSR_FILE, None)
        files[KEY_FILE] = candidate.key_pem
        files[CHAIN_FILE] = candidate.chain_pem
        files[device.SOURCE_FILE] = b"custom"
        store.commit(Part.LOCAL, files)
    logger.info(
        "installed the custom certificate %s for %s",
        candidate.info.code,
        ", ".join(candidate.info.names),
    )
    return device.load_unit(store)


def _check_csr_name(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.lower().rstrip(".").split(".")
    if len(labels) < 2 and labels != ["localhost"]:
        raise InputError(
            f"the name {name!r} is not a full host name: give it with its domain, "
            "like host.corp.example"
        )
    for index, label in enumerate(labels):
        if index == 0 and label == "*":
            continue
        device.check_label("name part", label)
    return ".".join(labels)


def make_custom_csr(
    store: StateStore,
    names: Sequence[str],
    *,
    key_type: keys.KeyType = keys.KeyType.P256,
    entropy_timeout: float = keys.DEFAULT_ENTROPY_TIMEOUT,
) -> bytes:
    """Make a new key on the unit and a CSR for ``names``; keep the key pending.

    The key stays in the local part (``custom-pending-key.pem``, 0600) until
    ``device import`` installs the certificate the customer's CA issues for
    the CSR. A new CSR replaces an earlier pending key.

    Returns:
        The CSR, PEM.

    Raises:
        InputError: no names, or a name is not a host name or IP address.
        StateError: the unit has no identity.
        EntropyError: the random pool never became ready.
    """
    if not names:
        raise InputError(
            "a CSR for your CA needs the unit's names: give --name host.corp.example "
            "(repeat --name for more)"
        )
    if len(names) > _MAX_CSR_NAMES:
        raise InputError(f"give at most {_MAX_CSR_NAMES} names")
    checked = list(dict.fromkeys(_check_csr_name(n) for n in names))
    device.load_unit(store)
    key = keys.generate_checked_key(key_type, entropy_timeout=entropy_timeout)
    csr = certs.build_csr(key, checked).public_bytes(serialization.Encoding.PEM)
    with store.lock():
        local = _local(store)
        files = local.files() if local is not None else {}
        if PENDING_KEY_FILE in files:
            logger.warning(
                "replaced the earlier pending custom key: a certificate for its CSR "
                "can no longer be imported"
            )
        files[PENDING_KEY_FILE] = keys.key_pem(key)
        files[PENDING_CSR_FILE] = csr
        store.commit(Part.LOCAL, files)
    logger.info("made a pending %s key and a CSR for %s", key_type.value, checked)
    return csr


@dataclass(frozen=True)
class Change:
    """What a ``use`` or ``revert`` did.

    Attributes:
        unit: the unit as loaded afterwards.
        message: one sentence for the owner.
    """

    unit: device.Unit
    message: str


def use_source(store: StateStore, choice: str) -> Change:
    """Serve ``choice``: ``self`` or ``factory`` (the identity), ``acme``, ``custom``.

    Raises:
        InputError: the choice is unknown, or the unit has no such certificate.
    """
    if choice in IDENTITY_CHOICES:
        meta = device.load_unit(store).meta
        if choice != meta.source:
            other = "self-signed" if meta.source == "self" else "factory"
            raise InputError(
                f"this unit's own identity is {other}, not {choice}: use "
                f"'{meta.source}' to serve it"
            )
        unit = device.select_source(store, None)
    elif choice in device.LOCAL_SOURCES:
        unit = device.select_source(store, choice)
    else:
        options = ", ".join([*IDENTITY_CHOICES, *device.LOCAL_SOURCES])
        raise InputError(f"unknown certificate source {choice!r}: choose {options}")
    logger.info("the owner chose to serve %s", choice)
    return Change(unit, _serving_sentence(unit))


def _serving_sentence(unit: device.Unit) -> str:
    text = (
        f"The unit now serves its {device.describe_source(unit.source)} certificate "
        f"({unit.info.code})"
    )
    if unit.served_note:
        text += f", because {unit.served_note}"
    return text + "."


def _reverted_files(generation: Generation | None) -> dict[str, bytes]:
    if generation is None:
        return {}
    return {n: generation.read(n) for n in _REVERTED_FILES if generation.has(n)}


def can_revert(store: StateStore) -> bool:
    """Say whether :func:`revert_choice` would change what the unit serves."""
    local, previous = _local(store), store.previous(Part.LOCAL)
    if local is None or previous is None:
        return False
    return _reverted_files(previous) != _reverted_files(local)


def revert_choice(store: StateStore) -> Change:
    """Go back to what the previous local generation served.

    Only the owner's choice of source and the custom certificate come back;
    the admin password and every other file stay as they are now, so a
    revert can never bring back an old password. Reverting twice undoes the
    revert.

    Raises:
        InputError: there is no previous generation, or it serves the same.
    """
    with store.lock():
        local = _local(store)
        previous = store.previous(Part.LOCAL)
        if local is None or previous is None:
            raise InputError(
                "there is no earlier certificate setting to go back to: nothing "
                "was changed"
            )
        before = _reverted_files(previous)
        now = _reverted_files(local)
        if before == now:
            raise InputError(
                "the previous state generation serves the same certificate: there "
                "is nothing to revert"
            )
        files = local.files()
        for name in _REVERTED_FILES:
            files.pop(name, None)
        files.update(before)
        store.commit(Part.LOCAL, files)
    unit = device.load_unit(store)
    logger.info("reverted the certificate choice to generation %d", previous.number)
    return Change(unit, _serving_sentence(unit))
