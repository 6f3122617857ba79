"""The unit's side of factory provisioning: make a CSR, install the chain.

Both run where the unit's key lives; the key never leaves it. The installed
factory identity is a new identity generation with ``source="factory"``, the
same key, the chain (leaf first, the maker's root left out: clients hold it),
and the identity's facts. A factory reset keeps it (IEEE 802.1AR IDevID).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from unitcert import certs, keys
from unitcert.code import code_for_spki, spki_from_cert_der
from unitcert.device import (
    CERT_FILE,
    KEY_FILE,
    META_FILE,
    Binding,
    IdentityMeta,
    Unit,
    load_unit,
    write_station_state,
)
from unitcert.errors import InputError, KeyMismatchError, StateError
from unitcert.store import Part, StateStore

__all__ = [
    "SETUP_CREDENTIAL_FILE",
    "StationUnit",
    "install_factory_identity",
    "make_identity_csr",
    "new_station_unit",
    "write_station_unit",
]

logger = logging.getLogger(__name__)

# Read by device._ensure_admin: a factory-printed credential survives resets.
SETUP_CREDENTIAL_FILE = "setup-credential"


def make_identity_csr(store: StateStore) -> bytes:
    """Make a PEM CSR for the unit's identity key and its name.

    The subject is ``CN=<serial>.<product>.<domain>, serialNumber=<serial>``
    and the name is in subjectAltName.

    Raises:
        StateError: the unit has no identity, or its state is damaged.
    """
    # A generation is never changed once written, so no lock is needed to read.
    identity = store.current(Part.IDENTITY)
    if identity is None:
        raise StateError(
            f"there is no unit identity at {store.root}: run 'unitcert device "
            f"init --state {store.root}' first"
        )
    meta = IdentityMeta.from_json(identity.read(META_FILE))
    key = keys.FileKeyStore(identity.path / KEY_FILE).signing_key()
    csr = certs.build_csr(key, [meta.hostname], serial_number=meta.serial)
    return csr.public_bytes(serialization.Encoding.PEM)


def _spki(cert: x509.Certificate) -> bytes:
    return spki_from_cert_der(cert.public_bytes(serialization.Encoding.DER))


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _check_chain(
    chain: list[x509.Certificate], hostname: str
) -> list[x509.Certificate]:
    """Return the chain to store (leaf, then CAs, without a self-signed root)."""
    if chain and len(chain) > 1 and chain[-1].subject == chain[-1].issuer:
        chain = chain[:-1]
    if len(chain) < 2:
        raise InputError(
            "the file holds only one certificate: give the chain from 'factory "
            "issue' (the unit's certificate, then the issuing CA's)"
        )
    leaf = chain[0]
    if _is_ca(leaf):
        raise InputError(
            "the first certificate is a CA, not the unit's: give the chain leaf first"
        )
    for child, parent in itertools.pairwise(chain):
        if not _is_ca(parent):
            raise InputError(
                f"{parent.subject.rfc4514_string()} is not a CA, so it cannot have "
                "signed the certificate before it: give the chain from 'factory issue'"
            )
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as error:
            raise InputError(
                f"{child.subject.rfc4514_string()} was not signed by "
                f"{parent.subject.rfc4514_string()}: the chain is broken or out of "
                "order; give the chain from 'factory issue'"
            ) from error
    info = certs.cert_info(leaf)
    if hostname not in info.names:
        names = ", ".join(info.names) or "no name"
        raise InputError(
            f"the certificate is for {names}, but this unit is {hostname}: give the "
            "chain issued for this unit's CSR"
        )
    if info.not_after < dt.datetime.now(dt.UTC):
        raise InputError(
            f"the certificate expired on {info.not_after:%Y-%m-%d}: have the maker "
            "re-issue it ('factory reissue')"
        )
    return chain


def install_factory_identity(
    store: StateStore, chain_pem: bytes, *, setup_credential: str | None = None
) -> Unit:
    """Install a chain signed by the maker's CA as the unit's factory identity.

    Args:
        store: the unit's state.
        chain_pem: the unit's certificate, then the issuing CA's (a trailing
            self-signed root is accepted and left out).
        setup_credential: the setup credential printed on the sticker, kept in
            the identity so that a factory reset brings it back (station only).

    Returns:
        The unit as loaded afterwards.

    Raises:
        InputError: the chain is unreadable, broken, expired, or for another unit.
        KeyMismatchError: the certificate's key is not the unit's identity key.
        StateError: the unit has no identity, or its state is damaged.
    """
    chain = certs.load_pem_chain(chain_pem)
    with store.lock():
        identity = store.current(Part.IDENTITY)
        if identity is None:
            raise StateError(
                f"there is no unit identity at {store.root}: run 'unitcert device "
                f"init --state {store.root}' first"
            )
        meta = IdentityMeta.from_json(identity.read(META_FILE))
        key_pem = identity.read(KEY_FILE)
        key = keys.load_key_pem(key_pem)
        key_spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if chain and _spki(chain[0]) != key_spki:
            cert_code = str(code_for_spki(_spki(chain[0])))
            key_code = str(code_for_spki(key_spki))
            raise KeyMismatchError(
                f"the certificate's key ({cert_code}) is not this unit's identity key "
                f"({key_code}): install the chain issued for this unit's own CSR",
                cert_code=cert_code,
                key_code=key_code,
            )
        chain = _check_chain(chain, meta.hostname)

        files = {
            KEY_FILE: key_pem,
            CERT_FILE: certs.pem_chain(chain),
            META_FILE: replace(meta, source="factory").to_json(),
        }
        if setup_credential is not None:
            files[SETUP_CREDENTIAL_FILE] = setup_credential.encode("utf-8") + b"\n"
        elif identity.has(SETUP_CREDENTIAL_FILE):
            files[SETUP_CREDENTIAL_FILE] = identity.read(SETUP_CREDENTIAL_FILE)
        store.commit(Part.IDENTITY, files)
    logger.info(
        "installed the factory identity of %s (issued by %s)",
        meta.hostname,
        chain[1].subject.rfc4514_string(),
    )
    return load_unit(store)


@dataclass(frozen=True)
class StationUnit:
    """A unit being made on a station: its key and CSR, before its state exists.

    Attributes:
        key: the unit's identity key (checked; it goes only into its state).
        meta: the identity's facts, bound to the serial.
        csr_pem: the CSR for the key and the unit's name, PEM.
    """

    key: keys.PrivateKey
    meta: IdentityMeta
    csr_pem: bytes


def new_station_unit(
    serial: str,
    *,
    product: str,
    domain: str,
    key_type: keys.KeyType,
    entropy_timeout: float = keys.DEFAULT_ENTROPY_TIMEOUT,
    generator: Callable[[keys.KeyType], keys.PrivateKey] = keys.generate_key,
) -> StationUnit:
    """Make a unit's key behind the entropy gate, self-check it, and make its CSR.

    The CSR is the one :func:`make_identity_csr` makes for the same identity.

    Raises:
        EntropyError: the random pool never became ready (no key is made).
        WeakKeyError: the key generator keeps making weak keys.
    """
    key = keys.generate_checked_key(
        key_type, entropy_timeout=entropy_timeout, generator=generator
    )
    meta = IdentityMeta(
        source="self",
        serial=serial,
        product=product,
        domain=domain,
        key_type=key_type.value,
        binding=Binding("serial", serial),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    csr = certs.build_csr(key, [meta.hostname], serial_number=serial)
    return StationUnit(key, meta, csr.public_bytes(serialization.Encoding.PEM))


def write_station_unit(
    store: StateStore,
    unit: StationUnit,
    chain_pem: bytes | None,
    *,
    setup_credential: str | None = None,
) -> Unit:
    """Write a station unit's whole state: its factory identity, or a self-signed
    one when ``chain_pem`` is None (the CA refused it).

    The chain is checked as :func:`install_factory_identity` checks it (key,
    order, signatures, name, expiry) before anything is written.

    Raises:
        InputError: the chain is unreadable, broken, expired, or for another unit.
        KeyMismatchError: the certificate's key is not the unit's key.
        StateError: the state already holds a unit.
    """
    meta = unit.meta
    if chain_pem is None:
        cert = certs.build_self_signed(
            unit.key, [meta.hostname], serial_number=meta.serial
        )
        stored = certs.pem_chain([cert])
    else:
        chain = certs.load_pem_chain(chain_pem)
        key_spki = unit.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if chain and _spki(chain[0]) != key_spki:
            cert_code = str(code_for_spki(_spki(chain[0])))
            key_code = str(code_for_spki(key_spki))
            raise KeyMismatchError(
                f"the certificate's key ({cert_code}) is not this unit's identity key "
                f"({key_code}): install the chain issued for this unit's own CSR",
                cert_code=cert_code,
                key_code=key_code,
            )
        stored = certs.pem_chain(_check_chain(chain, meta.hostname))
        meta = replace(meta, source="factory")
    return write_station_state(
        store,
        key=unit.key,
        chain_pem=stored,
        meta=meta,
        setup_credential=setup_credential,
    )
