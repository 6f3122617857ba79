"""Building and reading X.509: self-signed certificates, CSRs, and what a cert says.

Every certificate a unit serves meets what browsers enforce even under a
privately installed root: names in subjectAltName, extendedKeyUsage
serverAuth, SHA-256 or better, and at most 825 days of validity (Apple
refuses longer TLS server certificates, https://support.apple.com/en-us/103769).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from unitcert.code import FingerprintCode, code_for_spki, spki_from_cert_der, spki_pin
from unitcert.errors import InputError
from unitcert.keys import PrivateKey, describe_key

__all__ = [
    "MAX_VALIDITY",
    "CertInfo",
    "build_csr",
    "build_self_signed",
    "cert_info",
    "load_pem_chain",
    "pem_chain",
    "tls_server_builder",
]

MAX_VALIDITY = dt.timedelta(days=825)
# A unit's clock may be a little behind the client's.
_BACKDATE = dt.timedelta(hours=1)


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _general_names(names: Sequence[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in names:
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


# RFC 5280 Appendix A: ub-common-name is 64 characters.
_MAX_COMMON_NAME = 64


def _subject(name: str, serial_number: str | None) -> x509.Name:
    """The subject: CN (when the name fits in one) and the unit's serial.

    The name always goes into subjectAltName, which is what clients check; a
    name over 64 characters cannot be a CN, so it is only there.
    """
    attributes = []
    if len(name) <= _MAX_COMMON_NAME:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, name))
    if serial_number:
        attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
    return x509.Name(attributes)


def tls_server_builder(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    names: Sequence[str],
    issuer_key_id: x509.SubjectKeyIdentifier,
    now: dt.datetime,
    validity: dt.timedelta,
) -> x509.CertificateBuilder:
    """The one profile of every TLS server certificate unitcert signs.

    Names in subjectAltName, basicConstraints CA:FALSE, keyUsage for the key's
    type, extendedKeyUsage serverAuth, SKID and AKID, a random serial of 159
    bits, backdated an hour for clients whose clock is a little behind.

    Raises:
        ValueError: no names, or a validity over 825 days.
    """
    if not names:
        raise ValueError("a certificate needs at least one name")
    if validity > MAX_VALIDITY:
        raise ValueError("validity must be at most 825 days")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now - _BACKDATE + validity)
        .add_extension(
            x509.SubjectAlternativeName(_general_names(names)), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                issuer_key_id
            ),
            critical=False,
        )
    )


def build_self_signed(
    key: PrivateKey,
    names: Sequence[str],
    *,
    now: dt.datetime | None = None,
    validity: dt.timedelta = MAX_VALIDITY,
    serial_number: str | None = None,
) -> x509.Certificate:
    """Sign a self-signed TLS server certificate for ``names`` with ``key``.

    Args:
        key: the unit's key (any object ``cryptography`` can sign with).
        names: DNS names or IP literals; the first is the subject CN.
        now: the issue time (defaults to the current time).
        validity: how long it is valid; at most 825 days.
        serial_number: the unit's serial, put in the subject's serialNumber.

    Raises:
        ValueError: no names, or a validity over 825 days.
    """
    if not names:
        raise ValueError("a certificate needs at least one name")
    now = now or dt.datetime.now(dt.UTC)
    subject = _subject(names[0], serial_number)
    public_key = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = tls_server_builder(
        subject=subject,
        issuer=subject,
        public_key=public_key,
        names=names,
        issuer_key_id=ski,
        now=now,
        validity=validity,
    )
    return builder.sign(key, _hash_for(key))


def build_csr(
    key: PrivateKey, names: Sequence[str], *, serial_number: str | None = None
) -> x509.CertificateSigningRequest:
    """Make a CSR for ``names`` signed by ``key`` (names in the SAN extension).

    Raises:
        ValueError: no names.
    """
    if not names:
        raise ValueError("a CSR needs at least one name")
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(names[0], serial_number))
        .add_extension(
            x509.SubjectAlternativeName(_general_names(names)), critical=False
        )
        .sign(key, _hash_for(key))
    )


def pem_chain(certs: Sequence[x509.Certificate]) -> bytes:
    """Serialise certificates as concatenated PEM, leaf first."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def load_pem_chain(data: bytes) -> list[x509.Certificate]:
    """Load every certificate of a PEM bundle, in file order.

    Raises:
        InputError: the data holds no readable certificate.
    """
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InputError("the file holds no readable PEM certificate") from exc
    return certs


@dataclass(frozen=True)
class CertInfo:
    """What a user needs to know about a served certificate.

    Attributes:
        subject: the subject, RFC 4514 string.
        issuer: the issuer, RFC 4514 string.
        names: the DNS names and IP addresses in subjectAltName.
        not_before: start of validity (UTC).
        not_after: end of validity (UTC).
        key_type: e.g. ``ECDSA P-256``.
        code: the fingerprint code of its key.
        pin: base64 SHA-256 of its SPKI (``curl --pinnedpubkey sha256//...``).
        self_signed: whether subject and issuer are the same.
    """

    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str
    code: FingerprintCode
    pin: str
    self_signed: bool

    def expired(self, now: dt.datetime | None = None) -> bool:
        """Say whether the certificate is outside its validity at ``now``."""
        now = now or dt.datetime.now(dt.UTC)
        return not (self.not_before <= now <= self.not_after)


def cert_info(cert: x509.Certificate) -> CertInfo:
    """Describe ``cert`` for status output and pages."""
    der = cert.public_bytes(serialization.Encoding.DER)
    spki = spki_from_cert_der(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(
            [str(n) for n in san.get_values_for_type(x509.DNSName)]
            + [str(n) for n in san.get_values_for_type(x509.IPAddress)]
        )
    except x509.ExtensionNotFound:
        names = ()
    public_key = cert.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        key_type = type(public_key).__name__
    else:
        key_type = describe_key(public_key)
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        names=names,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key_type=key_type,
        code=code_for_spki(spki),
        pin=spki_pin(spki),
        self_signed=cert.subject == cert.issuer,
    )
