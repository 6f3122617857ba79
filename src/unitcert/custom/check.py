"""Deciding whether a customer's certificate can be served, and describing it.

:func:`check_bundle` finds the certificate that belongs to the key, checks it
the way browsers will (and a little more: weak keys), has the chain verified
by :mod:`unitcert.custom.chain`, and returns a :class:`Candidate` to preview
and install. Each refusal is one sentence naming what is wrong; nothing here
touches the unit's state.

A certificate that names none of the unit's names is not refused outright:
the owner may reach the unit by a name of their own. It carries a
``name_warning``, and installing it needs ``--force`` (or the page's
checkbox).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID

from unitcert import certs, keys, quality
from unitcert.code import code_for_spki
from unitcert.custom.bundle import Bundle
from unitcert.custom.chain import (
    is_ca,
    is_self_signed,
    short_name,
    verify_chain,
)
from unitcert.errors import InputError, KeyMismatchError, WeakKeyError

__all__ = [
    "APPLE_MAX_DAYS",
    "Candidate",
    "ChainEntry",
    "KnownKey",
    "check_bundle",
    "name_matches",
]

logger = logging.getLogger(__name__)

# Apple refuses TLS server certificates valid longer than this
# (https://support.apple.com/en-us/103769).
APPLE_MAX_DAYS = 825
_MAX_RSA_BITS = 4096
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
_EARLY_GRACE = dt.timedelta(days=1)
_EXPIRY_WARNING = dt.timedelta(days=30)
_WEAK_SIGNATURES = {
    SignatureAlgorithmOID.RSA_WITH_MD5: "MD5",
    SignatureAlgorithmOID.RSA_WITH_SHA1: "SHA-1",
    SignatureAlgorithmOID._RSA_WITH_SHA1: "SHA-1",
    SignatureAlgorithmOID.ECDSA_WITH_SHA1: "SHA-1",
    SignatureAlgorithmOID.DSA_WITH_SHA1: "SHA-1",
    # md2WithRSAEncryption (RFC 3279 2.2.1), which cryptography does not name.
    x509.ObjectIdentifier("1.2.840.113549.1.1.2"): "MD2",
}
_WEAK_HASHES = {"sha1": "SHA-1", "md5": "MD5"}
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}


@dataclass(frozen=True)
class KnownKey:
    """A private key the unit already holds that an imported certificate may fit.

    Attributes:
        origin: ``pending`` (made by ``device csr --custom``) or ``installed``
            (the key of the custom certificate in force, for a renewal).
        key: the key (never shown in a repr).
    """

    origin: str
    key: keys.PrivateKey = field(repr=False)


@dataclass(frozen=True)
class ChainEntry:
    """One line of the chain as pages and the command line show it.

    Attributes:
        name: the certificate's subject as people say it.
        role: what it is and whether the unit serves it.
    """

    name: str
    role: str


@dataclass(frozen=True)
class Candidate:
    """A checked certificate and key, ready to preview and install.

    Attributes:
        info: the leaf, described (subject, names, validity, key type, code).
        chain: what the unit will serve: leaf first, the root left out.
        entries: the chain as shown to people, leaf first, including the root.
        key_pem: the private key as unencrypted PKCS#8 PEM (never in a repr).
        key_origin: ``file`` (given with the certificate), ``pending`` or
            ``installed`` (see :class:`KnownKey`).
        warnings: sentences about things that work but deserve attention.
        name_warning: a sentence when the certificate names none of the unit's
            names; installing it then needs ``force``.
        files: the names of the files it came from.
    """

    info: certs.CertInfo
    chain: tuple[x509.Certificate, ...]
    entries: tuple[ChainEntry, ...]
    key_pem: bytes = field(repr=False)
    key_origin: str
    warnings: tuple[str, ...]
    name_warning: str | None
    files: tuple[str, ...]

    @property
    def chain_pem(self) -> bytes:
        """The served chain as PEM, leaf first."""
        return certs.pem_chain(self.chain)


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_code(key: PrivateKeyTypes) -> str:
    return str(code_for_spki(_spki(key.public_key())))


def _cert_code(cert: x509.Certificate) -> str:
    return str(certs.cert_info(cert).code)


def _bottom(cert_list: Sequence[x509.Certificate]) -> x509.Certificate:
    """The certificate most likely meant as the leaf: one that issued no other."""
    issuers = {c.issuer for c in cert_list if c.issuer != c.subject}
    ends = [c for c in cert_list if c.subject not in issuers]
    servers = [c for c in ends if not is_ca(c)]
    return (servers or ends or list(cert_list))[0]


def _mismatch(
    cert: x509.Certificate, key: PrivateKeyTypes, whose: str
) -> KeyMismatchError:
    cert_code, key_code = _cert_code(cert), _key_code(key)
    return KeyMismatchError(
        f"the certificate does not match the {whose} (certificate key {cert_code}, "
        f"{whose} {key_code}): give the key that belongs to this certificate",
        cert_code=cert_code,
        key_code=key_code,
    )


def _find_leaf(
    bundle: Bundle, known_keys: Sequence[KnownKey]
) -> tuple[x509.Certificate, PrivateKeyTypes, str]:
    """Return the certificate for the key, the key, and where the key came from."""
    files = ", ".join(bundle.names)
    hold = "holds" if len(bundle.names) == 1 else "hold"
    if not bundle.certs:
        held = "a private key but no certificate" if bundle.keys else "no certificate"
        raise InputError(f"{files} {hold} {held}: give the certificate as well")
    if len(bundle.keys) > 1:
        raise InputError(
            f"{files} {hold} {len(bundle.keys)} different private keys: give only "
            "the key of this certificate"
        )
    by_spki = {_spki(c.public_key()): c for c in bundle.certs}
    if bundle.keys:
        key = bundle.keys[0]
        leaf = by_spki.get(_spki(key.public_key()))
        if leaf is not None:
            return leaf, key, "file"
    else:
        for known in known_keys:
            leaf = by_spki.get(_spki(known.key.public_key()))
            if leaf is not None:
                return leaf, known.key, known.origin
    # No key fits. A certificate whose own key is unusable (published, weak,
    # too small) is refused for that, which no other key can mend.
    bottom = _bottom(bundle.certs)
    if not is_ca(bottom):
        _check_key(bottom)
    if bundle.keys:
        raise _mismatch(bottom, bundle.keys[0], "private key")
    pending = [k for k in known_keys if k.origin == "pending"]
    if pending:
        raise _mismatch(bottom, pending[0].key, "key of the pending CSR")
    if known_keys:
        raise _mismatch(bottom, known_keys[0].key, "installed key")
    raise InputError(
        f"{files} hold no private key, and the unit has no pending key from "
        "'unitcert device csr --custom': give the key too (--key), or make a CSR first"
    )


def _check_key(leaf: x509.Certificate) -> None:
    public_key = leaf.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        if bits < quality.MIN_RSA_BITS:
            raise InputError(
                f"the certificate's RSA key has {bits} bits, under the "
                f"{quality.MIN_RSA_BITS} that browsers require: make a new key of "
                "2048 bits or more"
            )
        if bits > _MAX_RSA_BITS:
            raise InputError(
                f"the certificate's RSA key has {bits} bits; the unit serves RSA keys "
                f"of 2048 to {_MAX_RSA_BITS} bits: make a new key of that size"
            )
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in _CURVES:
            raise InputError(
                f"the certificate's key is on the curve {public_key.curve.name}, "
                "which not every browser accepts: use ECDSA P-256 or P-384"
            )
    else:
        kind = type(public_key).__name__.removesuffix("PublicKey").removeprefix("_")
        raise InputError(
            f"the certificate's key is {kind}, which browsers do not accept for "
            "HTTPS: use RSA 2048-4096 or ECDSA P-256/P-384"
        )
    findings = quality.check_key(public_key)
    if findings:
        reasons = "; ".join(f.detail for f in findings)
        raise WeakKeyError(
            f"the certificate's key must not be used because {reasons}: make a new "
            "key, for example with 'unitcert device csr --custom'",
            findings=tuple(f.check for f in findings),
        )


def _weak_signature(cert: x509.Certificate) -> str | None:
    weak = _WEAK_SIGNATURES.get(cert.signature_algorithm_oid)
    if weak is not None:
        return weak
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return None
    return _WEAK_HASHES.get(algorithm.name) if algorithm is not None else None


def _check_signatures(cert_list: Sequence[x509.Certificate]) -> None:
    for cert in cert_list:
        # A self-signed certificate's own signature is never checked by
        # clients (a root is trusted as it is), so its algorithm does not matter.
        if is_self_signed(cert):
            continue
        weak = _weak_signature(cert)
        if weak is not None:
            raise InputError(
                f"{short_name(cert.subject)} is signed with {weak}, which browsers "
                "reject as forgeable: have your CA re-issue it with SHA-256"
            )


def _check_usage(leaf: x509.Certificate) -> None:
    name = short_name(leaf.subject)
    if is_ca(leaf):
        raise InputError(
            f"the certificate for this key, {name}, is a CA certificate, not a "
            "server certificate: give the certificate your CA issued for the unit"
        )
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        listed = ", ".join(_EKU_NAMES.get(u, u.dotted_string) for u in usages)
        raise InputError(
            f"the certificate is not for web servers: its extended key usage lists "
            f"{listed or 'nothing'} but not serverAuth; ask your CA for a TLS "
            "server certificate"
        )
    if not certs.cert_info(leaf).names:
        raise InputError(
            "the certificate has no names in subjectAltName, which every browser "
            "requires (a name only in the subject CN is ignored): ask your CA to "
            "include the unit's names"
        )


def _when(moment: dt.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _check_validity(info: certs.CertInfo, now: dt.datetime) -> list[str]:
    warnings = []
    if info.not_after < now:
        raise InputError(
            f"the certificate expired on {_when(info.not_after)}: install a current one"
        )
    if info.not_before > now + _EARLY_GRACE:
        raise InputError(
            f"the certificate is not valid before {_when(info.not_before)}, more than "
            "a day from now: check the unit's clock, or install it then"
        )
    if info.not_before > now:
        warnings.append(
            f"The certificate becomes valid only at {_when(info.not_before)}; until "
            "then the unit keeps serving its own identity."
        )
    days = (info.not_after - info.not_before).days
    if days > APPLE_MAX_DAYS:
        warnings.append(
            f"The certificate is valid for {days} days, more than the "
            f"{APPLE_MAX_DAYS} that Apple devices accept: iPhones, iPads and Macs "
            "will refuse it."
        )
    left = info.not_after - now
    if left < _EXPIRY_WARNING:
        warnings.append(
            f"The certificate expires in {max(left.days, 0)} days, on "
            f"{_when(info.not_after)}: renew it soon."
        )
    return warnings


def name_matches(pattern: str, name: str) -> bool:
    """Say whether a certificate name (maybe ``*.`` wildcard) covers ``name``.

    A wildcard stands for exactly one leftmost label (RFC 6125 6.4.3).
    """
    try:
        return ipaddress.ip_address(pattern) == ipaddress.ip_address(name)
    except ValueError:
        pass
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and head != "*" and rest == pattern[2:]
    return pattern == name


def _verification_name(names: Sequence[str], covered: Sequence[str]) -> str:
    if covered:
        return covered[0]
    first = names[0]
    return f"unit.{first[2:]}" if first.startswith("*.") else first


def _entries(
    chain: Sequence[x509.Certificate], anchor: x509.Certificate, anchor_is_root: bool
) -> tuple[ChainEntry, ...]:
    entries = [ChainEntry(short_name(chain[0].subject), "the unit's certificate")]
    entries += [
        ChainEntry(short_name(c.subject), "intermediate CA, served") for c in chain[1:]
    ]
    if anchor_is_root:
        entries.append(ChainEntry(short_name(anchor.subject), "root CA, not served"))
    elif len(chain) > 1:
        entries.append(
            ChainEntry(
                short_name(anchor.issuer),
                "root CA, not in the files: clients must already trust it",
            )
        )
    return tuple(entries)


def check_bundle(
    bundle: Bundle,
    *,
    roots: Sequence[x509.Certificate] = (),
    known_keys: Sequence[KnownKey] = (),
    unit_names: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> Candidate:
    """Check a customer's certificate, chain and key; return what would be served.

    Args:
        bundle: what the files held.
        roots: the roots given with ``--ca-file``.
        known_keys: keys the unit holds that a certificate given alone may fit.
        unit_names: the unit's names; a certificate naming none of them gets a
            ``name_warning``.
        now: the time to check validity at (default: now).

    Raises:
        KeyMismatchError: the certificate is not for the key (both codes given).
        WeakKeyError: the key is on a blocklist or fails a weak-key check.
        InputError: anything else that makes the certificate unusable; the
            message says what and what to do.
    """
    now = now or dt.datetime.now(dt.UTC)
    leaf, key, origin = _find_leaf(bundle, known_keys)
    _check_usage(leaf)
    _check_key(leaf)
    _check_signatures([*bundle.certs, *roots])
    info = certs.cert_info(leaf)
    warnings = _check_validity(info, now)

    covered = [n for n in unit_names if any(name_matches(p, n) for p in info.names)]
    others = [c for c in bundle.certs if c is not leaf]
    verified = verify_chain(
        leaf,
        others,
        roots=roots,
        name=_verification_name(info.names, covered),
        now=max(now, info.not_before),
    )
    if verified.anchor is leaf:
        warnings.append(
            "The certificate is self-signed: browsers trust it only where you "
            "install it yourself."
        )
    name_warning = None
    if not covered:
        name_warning = (
            f"the certificate is for {', '.join(info.names)}, none of which is this "
            f"unit's name ({', '.join(unit_names) or 'none known'}), so browsers "
            "will warn unless they reach the unit by one of the certificate's names"
        )
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise InputError(
            "the private key is neither RSA nor ECDSA: give the RSA or ECDSA key "
            "of the certificate"
        )
    logger.info(
        "checked a %s certificate for %s (%s), chain of %d",
        info.key_type,
        ", ".join(info.names),
        info.code,
        len(verified.served),
    )
    return Candidate(
        info=info,
        chain=verified.served,
        entries=_entries(verified.served, verified.anchor, verified.anchor_is_root),
        key_pem=keys.key_pem(key),
        key_origin=origin,
        warnings=tuple(warnings),
        name_warning=name_warning,
        files=bundle.names,
    )
