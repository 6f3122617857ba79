"""The maker's certificate authority: an offline root and a constrained issuing CA.

Layout of a factory directory (mode 0700)::

    factory.json     domain, product, default validity, registry kind
    root.pem         the root certificate, for customers to install
    root-key.pem     the root's key, encrypted (keep it offline after init)
    issuing.pem      the issuing CA certificate, sent with every unit's chain
    issuing-key.pem  the issuing CA's key, encrypted
    registry.db      the SQLite registry (unless PostgreSQL is used)

Both CA certificates carry the same name constraints (RFC 5280 4.2.1.10):
the only permitted dNSName subtree is ``<product>.<domain>``, and every IPv4
and IPv6 address is excluded, so neither a stolen issuing key nor a root
installed by a customer can vouch for any other name. The issuing CA has path
length 0: it cannot make another CA.

CA keys sit behind :class:`unitcert.keys.KeyStore`. Today they are PEM files
encrypted with a passphrase (:class:`EncryptedFileKeyStore`); a PKCS#11 store
for an HSM returns a token-backed key object from ``signing_key`` and the
rest of this module does not change.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from unitcert import certs, keys, quality
from unitcert.device import check_label
from unitcert.errors import InputError, StateError
from unitcert.store import write_file_atomic

__all__ = [
    "CA_KEY_ENV",
    "CA_KEY_TYPES",
    "DEFAULT_VALIDITY_DAYS",
    "EncryptedFileKeyStore",
    "FactoryCa",
    "FactoryConfig",
    "RevokedEntry",
    "build_crl",
    "build_unit_cert",
    "check_validity_days",
    "init_factory",
    "load_factory",
    "read_passphrase_file",
]

logger = logging.getLogger(__name__)

CA_KEY_ENV = "UNITCERT_CA_PASSPHRASE"
DEFAULT_VALIDITY_DAYS = 825
CA_KEY_TYPES = (keys.KeyType.P256, keys.KeyType.P384)
MIN_PASSPHRASE_LENGTH = 8

CONFIG_FILE = "factory.json"
ROOT_CERT = "root.pem"
ROOT_KEY = "root-key.pem"
ISSUING_CERT = "issuing.pem"
ISSUING_KEY = "issuing-key.pem"

_ROOT_VALIDITY = dt.timedelta(days=20 * 365)
_ISSUING_VALIDITY = dt.timedelta(days=10 * 365)
# Clocks on a line and in customers' hands are a little off.
_BACKDATE = dt.timedelta(hours=1)
_DIR_MODE = 0o700


@dataclass(frozen=True)
class EncryptedFileKeyStore:
    """A CA key kept as a passphrase-encrypted PKCS#8 PEM file (mode 0600).

    Attributes:
        path: the key file.
        passphrase: the passphrase that opens it (never shown in a repr).
    """

    path: Path
    passphrase: bytes = field(repr=False)

    @property
    def location(self) -> str:
        """The key file as a ``file:`` URI."""
        return f"file:{self.path}"

    def public_key(self) -> quality.PublicKey:
        """Return the public key of the file's private key.

        Raises:
            InputError: the file is missing, or the passphrase does not open it.
        """
        return self.signing_key().public_key()

    def signing_key(self) -> keys.PrivateKey:
        """Decrypt and return the private key.

        Raises:
            InputError: the file is missing, or the passphrase does not open it.
        """
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise InputError(
                f"cannot read the CA key {self.path}: {exc.strerror}"
            ) from exc
        try:
            key = serialization.load_pem_private_key(data, password=self.passphrase)
        except (ValueError, TypeError) as exc:
            raise InputError(
                f"the passphrase does not open the CA key {self.path}: give the "
                f"passphrase chosen at 'factory init' (--passphrase-file or "
                f"{CA_KEY_ENV})"
            ) from exc
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise InputError(f"the CA key {self.path} is neither RSA nor ECDSA")
        return key

    @classmethod
    def create(
        cls, path: Path, key: keys.PrivateKey, passphrase: bytes
    ) -> EncryptedFileKeyStore:
        """Write ``key`` encrypted with ``passphrase`` to a new 0600 file."""
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
        write_file_atomic(path, data)
        return cls(path, passphrase)


def read_passphrase_file(path: Path) -> bytes:
    """Read a CA passphrase from a file (one line; the newline is not part of it).

    Raises:
        InputError: the file cannot be read or is empty.
    """
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise InputError(
            f"cannot read the passphrase file {path}: {exc.strerror}"
        ) from exc
    passphrase = text.rstrip(b"\r\n")
    if not passphrase:
        raise InputError(
            f"the passphrase file {path} is empty: put the passphrase in it"
        )
    return passphrase


@dataclass(frozen=True)
class FactoryConfig:
    """A factory's fixed facts (``factory.json``).

    Attributes:
        domain: the maker's domain.
        product: the product name (a DNS label).
        validity_days: the default validity of unit certificates.
        registry: ``sqlite`` or ``postgresql``: where the registry lives.
    """

    domain: str
    product: str
    validity_days: int = DEFAULT_VALIDITY_DAYS
    registry: str = "sqlite"

    @property
    def subtree(self) -> str:
        """The one DNS subtree the CAs may sign for: ``<product>.<domain>``."""
        return f"{self.product}.{self.domain}"

    def hostname(self, serial: str) -> str:
        """The unit's name, ``<serial>.<product>.<domain>``."""
        return f"{serial}.{self.subtree}"

    def to_json(self) -> bytes:
        """Serialise for ``factory.json``."""
        raw = {
            "domain": self.domain,
            "product": self.product,
            "validity_days": self.validity_days,
            "registry": self.registry,
        }
        return json.dumps(raw, indent=2).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> FactoryConfig:
        """Load from ``factory.json``.

        Raises:
            StateError: the file is damaged.
        """
        try:
            raw = json.loads(data)
            return cls(
                domain=str(raw["domain"]),
                product=str(raw["product"]),
                validity_days=int(raw["validity_days"]),
                registry=str(raw["registry"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(
                f"the factory's {CONFIG_FILE} is damaged: restore it from a backup"
            ) from exc


@dataclass(frozen=True)
class FactoryCa:
    """A loaded factory: its configuration, CA certificates and issuing key.

    Attributes:
        directory: the factory directory.
        config: its fixed facts.
        root_cert: the root CA certificate.
        issuing_cert: the issuing CA certificate.
        issuing_key: where the issuing CA's key lives.
    """

    directory: Path
    config: FactoryConfig
    root_cert: x509.Certificate
    issuing_cert: x509.Certificate
    issuing_key: keys.KeyStore


def _check_domain(domain: str) -> str:
    labels = domain.lower().rstrip(".").split(".")
    if len(labels) < 2:
        raise InputError(
            f"the domain {domain!r} has a single label: give the maker's "
            "registered domain, like example.com"
        )
    for label in labels:
        check_label("domain part", label)
    return ".".join(labels)


def _name_constraints(subtree: str) -> x509.NameConstraints:
    return x509.NameConstraints(
        permitted_subtrees=[x509.DNSName(subtree)],
        excluded_subtrees=[
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ],
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _hash_for(key: keys.PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _ca_name(config: FactoryConfig, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, config.domain),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"{config.domain} {config.product} {role}"
            ),
        ]
    )


def _build_ca_cert(
    *,
    subject: x509.Name,
    public_key: quality.PublicKey,
    issuer: x509.Name,
    signer: keys.PrivateKey,
    issuer_ski: x509.SubjectKeyIdentifier | None,
    path_length: int,
    subtree: str,
    now: dt.datetime,
    validity: dt.timedelta,
) -> x509.Certificate:
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    authority = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        issuer_ski or ski
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now - _BACKDATE + validity)
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=path_length), critical=True
        )
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_name_constraints(subtree), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(authority, critical=False)
    )
    return builder.sign(signer, _hash_for(signer))


def init_factory(
    directory: Path,
    *,
    domain: str,
    product: str,
    passphrase: bytes,
    root_key_type: keys.KeyType = keys.KeyType.P384,
    issuing_key_type: keys.KeyType = keys.KeyType.P256,
    validity_days: int = DEFAULT_VALIDITY_DAYS,
    registry: str = "sqlite",
    now: dt.datetime | None = None,
) -> FactoryCa:
    """Create a factory: a root CA, an issuing CA under it, and ``factory.json``.

    Args:
        directory: the factory directory; it must not hold a factory yet.
        domain: the maker's domain, like ``example.com``.
        product: the product name, like ``router``.
        passphrase: encrypts both CA keys.
        root_key_type: the root's key type (P-384 by default).
        issuing_key_type: the issuing CA's key type (P-256 by default).
        validity_days: the default validity of unit certificates.
        registry: ``sqlite`` or ``postgresql``, recorded for later commands.
        now: the issue time (defaults to now).

    Raises:
        InputError: a bad name, key type, validity or passphrase, or the
            directory already holds a factory.
    """
    config = FactoryConfig(
        domain=_check_domain(domain),
        product=check_label("product", product),
        validity_days=check_validity_days(validity_days),
        registry=registry,
    )
    for key_type in (root_key_type, issuing_key_type):
        if key_type not in CA_KEY_TYPES:
            raise InputError(
                f"a CA key of type {key_type.value} is not supported: use p256 or p384"
            )
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise InputError(
            f"the CA passphrase is shorter than {MIN_PASSPHRASE_LENGTH} characters: "
            "choose a longer one"
        )
    if (directory / CONFIG_FILE).exists():
        raise InputError(
            f"{directory} already holds a factory: nothing was changed (use another "
            "directory for a new CA)"
        )
    now = now or dt.datetime.now(dt.UTC)

    root_key = keys.generate_checked_key(root_key_type)
    issuing_key = keys.generate_checked_key(issuing_key_type)
    root_name = _ca_name(config, "root CA")
    root_cert = _build_ca_cert(
        subject=root_name,
        public_key=root_key.public_key(),
        issuer=root_name,
        signer=root_key,
        issuer_ski=None,
        path_length=1,
        subtree=config.subtree,
        now=now,
        validity=_ROOT_VALIDITY,
    )
    issuing_cert = _build_ca_cert(
        subject=_ca_name(config, "issuing CA 1"),
        public_key=issuing_key.public_key(),
        issuer=root_name,
        signer=root_key,
        issuer_ski=x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()),
        path_length=0,
        subtree=config.subtree,
        now=now,
        validity=_ISSUING_VALIDITY,
    )

    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(directory, _DIR_MODE)
    EncryptedFileKeyStore.create(directory / ROOT_KEY, root_key, passphrase)
    store = EncryptedFileKeyStore.create(
        directory / ISSUING_KEY, issuing_key, passphrase
    )
    public = 0o644
    write_file_atomic(directory / ROOT_CERT, certs.pem_chain([root_cert]), mode=public)
    write_file_atomic(
        directory / ISSUING_CERT, certs.pem_chain([issuing_cert]), mode=public
    )
    # Written last: its presence means the factory is complete.
    write_file_atomic(directory / CONFIG_FILE, config.to_json(), mode=public)
    logger.info(
        "created the factory CA for %s in %s (root %s, issuing %s)",
        config.subtree,
        directory,
        root_key_type.value,
        issuing_key_type.value,
    )
    return FactoryCa(directory, config, root_cert, issuing_cert, store)


def load_factory(directory: Path, passphrase: bytes) -> FactoryCa:
    """Load a factory made by :func:`init_factory`.

    The issuing key is not decrypted here; ``issuing_key.signing_key()`` does
    that (and says so when the passphrase is wrong).

    Raises:
        InputError: the directory holds no factory.
        StateError: a factory file is damaged.
    """
    try:
        config = FactoryConfig.from_json((directory / CONFIG_FILE).read_bytes())
    except FileNotFoundError:
        raise InputError(
            f"{directory} holds no factory: run 'unitcert factory init --dir "
            f"{directory} ...' first"
        ) from None
    loaded = []
    for name in (ROOT_CERT, ISSUING_CERT):
        try:
            loaded.append(
                x509.load_pem_x509_certificate((directory / name).read_bytes())
            )
        except (OSError, ValueError) as exc:
            raise StateError(
                f"the factory's {name} is missing or damaged: restore it from a backup"
            ) from exc
    root_cert, issuing_cert = loaded
    store = EncryptedFileKeyStore(directory / ISSUING_KEY, passphrase)
    return FactoryCa(directory, config, root_cert, issuing_cert, store)


def check_validity_days(days: int) -> int:
    """Return ``days`` if it is a validity a unit certificate may have.

    Raises:
        InputError: it is below 1 or above 825 (Apple refuses longer TLS
            certificates, https://support.apple.com/en-us/103769).
    """
    limit = certs.MAX_VALIDITY.days
    if not 1 <= days <= limit:
        raise InputError(
            f"a validity of {days} days is not allowed: choose 1 to {limit} days "
            "(Apple devices refuse longer TLS certificates)"
        )
    return days


def build_unit_cert(
    ca: FactoryCa,
    signer: keys.PrivateKey,
    *,
    public_key: quality.PublicKey,
    serial: str,
    hostname: str,
    validity: dt.timedelta,
    now: dt.datetime,
) -> x509.Certificate:
    """Sign a unit's TLS server certificate with the issuing CA.

    Subject ``serialNumber=<serial>, CN=<hostname>``, the hostname in
    subjectAltName, serverAuth, a random serial number (159 bits), AKID/SKID.

    Args:
        ca: the factory.
        signer: the issuing CA's key, from ``ca.issuing_key.signing_key()``.
        public_key: the unit's public key, from its checked CSR.
        serial: the unit's serial.
        hostname: its name.
        validity: how long the certificate is valid (at most 825 days).
        now: the issue time.

    Raises:
        ValueError: the validity is over 825 days.
    """
    if validity > certs.MAX_VALIDITY:
        raise ValueError("validity must be at most 825 days")
    issuer_ski = ca.issuing_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
            x509.NameAttribute(NameOID.COMMON_NAME, hostname),
        ]
    )
    builder = certs.tls_server_builder(
        subject=subject,
        issuer=ca.issuing_cert.subject,
        public_key=public_key,
        names=[hostname],
        issuer_key_id=issuer_ski,
        now=now,
        validity=validity,
    )
    return builder.sign(signer, _hash_for(signer))


@dataclass(frozen=True)
class RevokedEntry:
    """One revoked certificate, for a CRL.

    Attributes:
        cert_serial: the certificate's serial number.
        revoked_at: when it was revoked.
        reason: the RFC 5280 reason.
    """

    cert_serial: int
    revoked_at: dt.datetime
    reason: x509.ReasonFlags


def build_crl(
    ca: FactoryCa,
    signer: keys.PrivateKey,
    entries: Sequence[RevokedEntry],
    *,
    number: int,
    now: dt.datetime,
    next_update: dt.timedelta,
) -> x509.CertificateRevocationList:
    """Sign a CRL of the issuing CA (RFC 5280 5).

    Args:
        ca: the factory.
        signer: the issuing CA's key.
        entries: the revoked certificates.
        number: the CRL number; it must grow with every CRL.
        now: thisUpdate.
        next_update: how long until the next CRL is due.
    """
    issuer_ski = ca.issuing_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.issuing_cert.subject)
        .last_update(now)
        .next_update(now + next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    )
    for entry in entries:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.cert_serial)
            .revocation_date(entry.revoked_at)
        )
        if entry.reason is not x509.ReasonFlags.unspecified:
            revoked = revoked.add_extension(
                x509.CRLReason(entry.reason), critical=False
            )
        builder = builder.add_revoked_certificate(revoked.build())
    return builder.sign(signer, _hash_for(signer))
