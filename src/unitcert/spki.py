"""Reading the SubjectPublicKeyInfo out of certificates, CSRs and public-key files.

The fingerprint code hashes the SPKI exactly as it was encoded, so certificates
and CSRs are sliced (:mod:`unitcert.code`), and a ``PUBLIC KEY`` file already
is a DER SPKI. Only a PKCS#1 ``RSA PUBLIC KEY`` has to be re-encoded.

A file holding a private key, in any of its encodings, is refused: a code is
computed from public data, and a private key should never leave the unit.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from unitcert.code import spki_from_cert_der, spki_from_csr_der
from unitcert.errors import InputError

__all__ = [
    "MAX_INPUT_BYTES",
    "SpkiSource",
    "load_spki",
    "load_spki_source",
    "spki_from_bytes",
    "spki_source_from_bytes",
]

MAX_INPUT_BYTES = 1024 * 1024
_PEM_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL
)
_CERTIFICATE = "certificate"
_REQUEST = "certificate request"
_PUBLIC_KEY = "public key"
_KIND_OF_LABEL = {
    "CERTIFICATE": _CERTIFICATE,
    "TRUSTED CERTIFICATE": _CERTIFICATE,
    "X509 CERTIFICATE": _CERTIFICATE,
    "CERTIFICATE REQUEST": _REQUEST,
    "NEW CERTIFICATE REQUEST": _REQUEST,
    "PUBLIC KEY": _PUBLIC_KEY,
}
# OpenSSL's TRUSTED CERTIFICATE is a certificate followed by its trust settings.
_LABELS_WITH_TRAILER = frozenset({"TRUSTED CERTIFICATE"})
_RSA_PUBLIC_KEY = "RSA PUBLIC KEY"


@dataclass(frozen=True)
class SpkiSource:
    """The SPKI found in a file, and what it came from.

    Attributes:
        spki_der: the DER SubjectPublicKeyInfo, as the file carries it.
        kind: ``certificate``, ``certificate request`` or ``public key``.
        certificates: how many certificates the file holds; when there are
            several, ``spki_der`` is the first one's (the leaf, in a chain).
    """

    spki_der: bytes
    kind: str
    certificates: int


def _private_key_error() -> InputError:
    return InputError(
        "this file holds a private key: give the certificate, CSR or public "
        "key instead (a private key should never leave the unit)"
    )


def _public_key_spki(der: bytes) -> bytes:
    try:
        serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InputError("the public key is not a readable key") from None
    return der


_EXTRACTORS: dict[str, Callable[[bytes], bytes]] = {
    _CERTIFICATE: spki_from_cert_der,
    _REQUEST: spki_from_csr_der,
    _PUBLIC_KEY: _public_key_spki,
}


def _first_element_end(der: bytes) -> int | None:
    """Return where the first DER element of ``der`` ends, or None if unreadable."""
    if len(der) < 2:
        return None
    length, start = der[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or len(der) < start + count:
            return None
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    end = start + length
    return end if end <= len(der) else None


def _is_private_key_der(der: bytes) -> bool:
    try:
        serialization.load_der_private_key(der, password=None)
    except (TypeError, UnsupportedAlgorithm):
        # Encrypted, or of a type cryptography cannot use: a private key still.
        return True
    except ValueError:
        return False
    return True


def _from_der(der: bytes, label: str | None) -> tuple[bytes, str]:
    """Return the SPKI and the kind of object in ``der`` (of ``label`` when known).

    Raises:
        InputError: the data is not that object, has extra data after it, or
            is a private key.
    """
    end = _first_element_end(der)
    element = der[:end] if end is not None else der
    kinds = [_KIND_OF_LABEL[label]] if label is not None else list(_EXTRACTORS)
    for kind in kinds:
        try:
            spki = _EXTRACTORS[kind](element)
        except InputError:
            if label is not None:
                raise
            continue
        if end is not None and end < len(der) and label not in _LABELS_WITH_TRAILER:
            raise InputError(
                f"there is extra data after the {kind} ({len(der) - end} bytes): "
                f"give the {kind} alone"
            )
        return spki, kind
    if _is_private_key_der(element):
        raise _private_key_error()
    raise InputError(
        "the data is neither a certificate, a certificate request nor a public key"
    )


def _decode_block(label: str, body: bytes) -> bytes:
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except binascii.Error:
        raise InputError(
            f"the {label} block is not valid base64: copy the file again, whole"
        ) from None


def _rsa_public_key_spki(block: bytes) -> bytes:
    try:
        rsa_key = serialization.load_pem_public_key(block)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InputError("the RSA PUBLIC KEY block is not readable") from None
    return rsa_key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def spki_source_from_bytes(data: bytes) -> SpkiSource:
    """Find the first certificate, CSR or public key in ``data`` (PEM or DER).

    Raises:
        InputError: nothing usable is found, a PEM block is not valid base64,
            a DER object has extra data after it, or the data holds a private
            key (anywhere in the file, in PEM or DER).
    """
    blocks = [
        (match.group(1).decode("ascii"), match) for match in _PEM_RE.finditer(data)
    ]
    if any("PRIVATE KEY" in label for label, _ in blocks):
        raise _private_key_error()
    certificates = sum(
        1 for label, _ in blocks if _KIND_OF_LABEL.get(label) == _CERTIFICATE
    )

    for label, match in blocks:
        if label == _RSA_PUBLIC_KEY:
            _decode_block(label, match.group(2))
            spki = _rsa_public_key_spki(match.group(0))
            return SpkiSource(spki, _PUBLIC_KEY, certificates)
        if label in _KIND_OF_LABEL:
            spki, kind = _from_der(_decode_block(label, match.group(2)), label)
            return SpkiSource(spki, kind, certificates)
    if b"-----BEGIN" in data:
        raise InputError(
            "the file holds no certificate, certificate request or public key"
        )
    if not data:
        raise InputError("the file is empty")
    spki, kind = _from_der(data, None)
    return SpkiSource(spki, kind, 1 if kind == _CERTIFICATE else 0)


def spki_from_bytes(data: bytes) -> bytes:
    """Return the DER SPKI of the first certificate, CSR or public key in ``data``.

    Raises:
        InputError: as :func:`spki_source_from_bytes`.
    """
    return spki_source_from_bytes(data).spki_der


def load_spki_source(path: Path) -> SpkiSource:
    """Read ``path`` and return the SPKI it carries, as :func:`spki_source_from_bytes`.

    Raises:
        InputError: the file cannot be read, is over 1 MiB, or holds nothing usable.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"{path} is over 1 MiB, too large for a certificate or key")
    try:
        return spki_source_from_bytes(data)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def load_spki(path: Path) -> bytes:
    """Read ``path`` and return the DER SPKI it carries (see :func:`spki_from_bytes`).

    Raises:
        InputError: the file cannot be read, is over 1 MiB, or holds nothing usable.
    """
    return load_spki_source(path).spki_der
