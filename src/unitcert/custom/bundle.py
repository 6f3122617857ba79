"""Reading what customers really send: certificates and keys in any common format.

One file may hold certificates and keys in any order and any of these
encodings, which :func:`load_bundle` tells apart by their content, never by
the file name:

- PEM, with CRLF or LF line ends, a byte-order mark, and text around the
  blocks (``openssl x509 -text`` writes the decoded certificate first);
  ``CERTIFICATE``, ``PKCS7`` and private-key blocks (PKCS#8, encrypted
  PKCS#8, and traditional ``RSA``/``EC`` keys with or without a password);
- DER: one certificate, a PKCS#7 chain (``.p7b``), a private key;
- PKCS#12 (``.pfx``, ``.p12``), including legacy-encrypted ones (RC2, 3DES).

Every file is at most :data:`unitcert.spki.MAX_INPUT_BYTES` (1 MiB). Errors
name the file and say what is wrong with it in one sentence.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12

from unitcert.errors import InputError
from unitcert.spki import MAX_INPUT_BYTES

__all__ = [
    "MAX_CERTIFICATES",
    "Bundle",
    "InputFile",
    "check_size",
    "load_bundle",
    "read_input_file",
    "read_password_file",
]

logger = logging.getLogger(__name__)

# A served chain is two to four certificates; a bundle with far more is a
# trust store or an attack on the path builder, not a chain.
MAX_CERTIFICATES = 16

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 #]+)-----\n(.*?)-----END ([A-Z0-9 #]+)-----", re.DOTALL
)
_BEGIN = re.compile(rb"-----BEGIN [A-Z0-9 #]+-----")
# Control bytes that no text file holds (tab, line ends and form feed aside).
_BINARY = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_CERT_LABELS = {b"CERTIFICATE", b"X509 CERTIFICATE", b"TRUSTED CERTIFICATE"}
_PKCS7_LABELS = {b"PKCS7", b"PKCS #7 SIGNED DATA", b"CERTIFICATE CHAIN"}
_KEY_LABELS = {
    b"PRIVATE KEY",
    b"ENCRYPTED PRIVATE KEY",
    b"RSA PRIVATE KEY",
    b"EC PRIVATE KEY",
    b"DSA PRIVATE KEY",
}
# Blocks that tools put beside a key or chain and that serving does not need.
_IGNORED_LABELS = {b"EC PARAMETERS", b"DH PARAMETERS", b"X9.42 DH PARAMETERS"}
_REQUEST_LABELS = {b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"}

_SEQUENCE = 0x30
_INTEGER = 0x02
_OID = 0x06
# 1.2.840.113549.1.7.1, PKCS#7 "data": the content type of a PFX's authSafe.
_PKCS7_DATA_OID = bytes.fromhex("2a864886f70d010701")


@dataclass(frozen=True)
class InputFile:
    """One file as the user gave it.

    Attributes:
        name: how to call it in messages (the file name).
        data: its bytes.
    """

    name: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Bundle:
    """The certificates and private keys found in the files, without duplicates.

    Attributes:
        certs: the certificates, in the order found.
        keys: the private keys, in the order found (never shown in a repr).
        names: the files they came from.
    """

    certs: tuple[x509.Certificate, ...]
    keys: tuple[PrivateKeyTypes, ...] = field(repr=False)
    names: tuple[str, ...]


def read_input_file(path: Path) -> InputFile:
    """Read a certificate or key file of at most 1 MiB.

    Raises:
        InputError: it cannot be read, or it is over 1 MiB.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise InputError(
            f"cannot read {path} ({exc.strerror or exc}): check the file name"
        ) from None
    return check_size(InputFile(path.name, data))


def check_size(file: InputFile) -> InputFile:
    """Return ``file`` when it is at most 1 MiB.

    Raises:
        InputError: it is larger.
    """
    if len(file.data) > MAX_INPUT_BYTES:
        raise InputError(
            f"{file.name} is over 1 MiB, far more than any certificate chain or "
            "key: choose the right file"
        )
    return file


def read_password_file(path: Path) -> bytes:
    """Return the password in the first line of ``path`` (without its line end).

    Raises:
        InputError: the file cannot be read, or is empty.
    """
    try:
        with path.open("rb") as handle:
            first = handle.read(4096).splitlines()
    except OSError as exc:
        raise InputError(
            f"cannot read the password file {path} ({exc.strerror or exc})"
        ) from None
    if not first or not first[0]:
        raise InputError(
            f"the password file {path} is empty: put the password on its first line"
        )
    return first[0]


def _tlv(data: bytes, offset: int) -> tuple[int, int, int] | None:
    """Read the DER element at ``offset``: (tag, content start, end), or None."""
    if offset + 2 > len(data):
        return None
    tag, length = data[offset], data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            return None
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > len(data):
        return None
    return tag, start, start + length


def _looks_like_pkcs12(data: bytes) -> bool:
    """Say whether ``data`` starts like a PFX (RFC 7292 4): version 3, then data."""
    outer = _tlv(data, 0)
    if outer is None or outer[0] != _SEQUENCE:
        return False
    version = _tlv(data, outer[1])
    if (
        version is None
        or version[0] != _INTEGER
        or data[version[1] : version[2]] != b"\x03"
    ):
        return False
    auth_safe = _tlv(data, version[2])
    if auth_safe is None or auth_safe[0] != _SEQUENCE:
        return False
    oid = _tlv(data, auth_safe[1])
    return (
        oid is not None and oid[0] == _OID and data[oid[1] : oid[2]] == _PKCS7_DATA_OID
    )


def _der_is_complete(data: bytes) -> bool:
    outer = _tlv(data, 0)
    return outer is not None and outer[0] == _SEQUENCE


@dataclass
class _Found:
    certs: list[x509.Certificate] = field(default_factory=list)
    keys: list[PrivateKeyTypes] = field(default_factory=list)


def _load_key(
    loader_input: bytes, name: str, password: bytes | None, *, pem: bool
) -> PrivateKeyTypes:
    load = (
        serialization.load_pem_private_key
        if pem
        else serialization.load_der_private_key
    )
    try:
        return load(loader_input, password)
    except TypeError as exc:
        if password is None:
            raise InputError(
                f"the private key in {name} is encrypted: give its password "
                "(--password-file on the command line)"
            ) from exc
        # A password was given for this run, but this key has none.
        return load(loader_input, None)
    except ValueError as exc:
        if password is not None and _is_encrypted(load, loader_input):
            raise _wrong_password(name) from exc
        raise InputError(
            f"the private key in {name} is damaged or of a kind the unit cannot "
            "read: export it again as PEM"
        ) from exc
    except UnsupportedAlgorithm as exc:
        raise InputError(
            f"the private key in {name} is of a kind the unit cannot use: give an "
            "RSA or ECDSA key"
        ) from exc


def _wrong_password(name: str) -> InputError:
    # A wrong password mostly fails the decryption's padding check; about
    # once in 256 it passes and the garbage fails to parse instead: both are
    # this error, whatever cryptography's message.
    return InputError(
        f"the password for the private key in {name} is wrong (or the key is "
        "damaged): check it and try again"
    )


def _is_encrypted(load: Callable[[bytes, bytes | None], Any], data: bytes) -> bool:
    """Whether a private key needs a password (loading it without one says so)."""
    try:
        load(data, None)
    except TypeError:
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return False


def _load_pkcs12(data: bytes, name: str, password: bytes | None, found: _Found) -> None:
    attempts: list[bytes | None] = [password] if password is not None else []
    # Files exported "without a password" use an empty one or none at all.
    attempts += [None, b""]
    for attempt in attempts:
        try:
            key, cert, extra = pkcs12.load_key_and_certificates(data, attempt)
        except ValueError:
            continue
        if key is not None:
            found.keys.append(key)
        if cert is not None:
            found.certs.append(cert)
        found.certs.extend(extra)
        return
    if password is None:
        raise InputError(
            f"{name} is a password-protected PKCS#12 file: give its password "
            "(--password-file on the command line)"
        )
    raise InputError(
        f"the password for the PKCS#12 file {name} is wrong (or the file is "
        "damaged): check the password and try again"
    )


def _load_pem_block(
    label: bytes,
    block: bytes,
    body: bytes,
    name: str,
    password: bytes | None,
    found: _Found,
) -> None:
    text = label.decode("ascii")
    if label in _CERT_LABELS or label in _PKCS7_LABELS:
        try:
            der = base64.b64decode(body, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise InputError(
                f"a {text} block in {name} is damaged (its base64 is broken): "
                "copy the file again"
            ) from exc
        if label in _PKCS7_LABELS:
            found.certs.extend(_pkcs7_certs(der, name))
            return
        if label == b"TRUSTED CERTIFICATE":
            # OpenSSL appends its trust settings after the certificate.
            element = _tlv(der, 0)
            der = der[: element[2]] if element is not None else der
        try:
            found.certs.append(x509.load_der_x509_certificate(der))
        except ValueError as exc:
            raise InputError(
                f"a {text} block in {name} is damaged or truncated: copy the file again"
            ) from exc
        return
    if label in _KEY_LABELS:
        found.keys.append(_load_key(block, name, password, pem=True))
        return
    if label in _IGNORED_LABELS:
        return
    if label in _REQUEST_LABELS:
        raise InputError(
            f"{name} holds a certificate request, not a certificate: send it to "
            "your CA and import the certificate it returns"
        )
    raise InputError(
        f"{name} holds a block labelled {text}, which is neither a certificate "
        "nor a private key: give the certificate chain and its key"
    )


def _pkcs7_certs(der: bytes, name: str) -> list[x509.Certificate]:
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError as exc:
        raise InputError(
            f"the PKCS#7 chain in {name} is damaged or truncated: export it again"
        ) from exc
    if not certs:
        raise InputError(f"the PKCS#7 file {name} holds no certificate")
    return certs


def _normalise_text(data: bytes) -> bytes:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # Windows tools sometimes save PEM text as UTF-16.
        try:
            data = data.decode("utf-16").encode("ascii", "ignore")
        except UnicodeDecodeError:
            return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _load_pem(data: bytes, name: str, password: bytes | None, found: _Found) -> None:
    text = _normalise_text(data)
    blocks = list(_PEM_BLOCK.finditer(text))
    if _BINARY.search(_PEM_BLOCK.sub(b"", text)):
        # PEM text inside binary data: an archive or document, not a PEM file.
        raise InputError(
            f"{name} is binary data with PEM text inside (an archive or a "
            "document?): extract the certificate file and give that"
        )
    for match in blocks:
        label, body, end_label = match.group(1), match.group(2), match.group(3)
        if label != end_label:
            raise InputError(
                f"a {label.decode('ascii')} block in {name} has no END line of its "
                "own: the file is cut or two files were mixed; copy it again"
            )
        _load_pem_block(label, match.group(0), body, name, password, found)
    if len(_BEGIN.findall(text)) > len(blocks):
        raise InputError(
            f"{name} ends inside a PEM block: the file is truncated; copy it again"
        )


def _load_der(data: bytes, name: str, password: bytes | None, found: _Found) -> None:
    if not _der_is_complete(data):
        raise InputError(
            f"{name} is neither PEM text nor a complete DER certificate, PKCS#7 or "
            "PKCS#12 file: it is truncated or not a certificate at all"
        )
    if _looks_like_pkcs12(data):
        _load_pkcs12(data, name, password, found)
        return
    try:
        found.certs.append(x509.load_der_x509_certificate(data))
        return
    except ValueError:
        pass
    try:
        found.certs.extend(pkcs7.load_der_pkcs7_certificates(data))
        return
    except ValueError:
        pass
    try:
        found.keys.append(serialization.load_der_private_key(data, password))
        return
    except TypeError:
        # Encrypted without a password given, or the other way round.
        found.keys.append(_load_key(data, name, password, pem=False))
        return
    except ValueError as exc:
        if password is not None and _is_encrypted(
            serialization.load_der_private_key, data
        ):
            raise _wrong_password(name) from exc
    except UnsupportedAlgorithm as exc:
        raise InputError(
            f"the private key in {name} is of a kind the unit cannot use: give an "
            "RSA or ECDSA key"
        ) from exc
    raise InputError(
        f"{name} is DER data but neither a certificate, a PKCS#7 chain, a PKCS#12 "
        "file nor a private key: check that it is the right file"
    )


def _load_file(file: InputFile, password: bytes | None, found: _Found) -> None:
    check_size(file)
    if not file.data.strip():
        raise InputError(f"{file.name} is empty: choose the file that holds it")
    if _BEGIN.search(_normalise_text(file.data)):
        _load_pem(file.data, file.name, password, found)
    elif file.data[:1] == bytes([_SEQUENCE]):
        _load_der(file.data, file.name, password, found)
    else:
        raise InputError(
            f"{file.name} holds no certificate or key (no PEM block and no DER "
            "data): check that it is the right file"
        )


def _unique_certs(certs: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    seen: dict[bytes, x509.Certificate] = {}
    for cert in certs:
        seen.setdefault(cert.public_bytes(serialization.Encoding.DER), cert)
    return tuple(seen.values())


def _unique_keys(keys: Iterable[PrivateKeyTypes]) -> tuple[PrivateKeyTypes, ...]:
    seen: dict[bytes, PrivateKeyTypes] = {}
    for key in keys:
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        seen.setdefault(spki, key)
    return tuple(seen.values())


def load_bundle(files: Sequence[InputFile], password: bytes | None = None) -> Bundle:
    """Read every certificate and private key in ``files``.

    Args:
        files: the files, each at most 1 MiB.
        password: the password of encrypted keys and PKCS#12 files, if any.

    Raises:
        InputError: a file is empty, too large, damaged, truncated, of an
            unknown kind, or needs a password that is missing or wrong.
    """
    found = _Found()
    for file in files:
        _load_file(file, password, found)
    certs = _unique_certs(found.certs)
    if len(certs) > MAX_CERTIFICATES:
        raise InputError(
            f"the files hold {len(certs)} certificates, more than any chain needs "
            f"(at most {MAX_CERTIFICATES}): give only the certificate and its chain"
        )
    return Bundle(
        certs=certs,
        keys=_unique_keys(found.keys),
        names=tuple(f.name for f in files),
    )
