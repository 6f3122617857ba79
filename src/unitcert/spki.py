"""Reading the SubjectPublicKeyInfo out of certificates, CSRs and public-key files.

The fingerprint code hashes the SPKI exactly as it was encoded, so certificates
and CSRs are sliced (:mod:`unitcert.code`), and a ``PUBLIC KEY`` file already
is a DER SPKI. Only a PKCS#1 ``RSA PUBLIC KEY`` has to be re-encoded.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from unitcert.code import spki_from_cert_der, spki_from_csr_der
from unitcert.errors import InputError

__all__ = ["MAX_INPUT_BYTES", "load_spki", "spki_from_bytes"]

MAX_INPUT_BYTES = 1024 * 1024
_PEM_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL
)


def _from_der(der: bytes, label: str | None) -> bytes:
    if label in (None, "CERTIFICATE", "TRUSTED CERTIFICATE", "X509 CERTIFICATE"):
        try:
            return spki_from_cert_der(der)
        except InputError:
            if label is not None:
                raise
    if label in (None, "CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"):
        try:
            return spki_from_csr_der(der)
        except InputError:
            if label is not None:
                raise
    if label in (None, "PUBLIC KEY"):
        try:
            serialization.load_der_public_key(der)
        except (ValueError, TypeError):
            if label is not None:
                raise InputError("the PUBLIC KEY block is not a readable key") from None
        else:
            return der
    raise InputError(
        "the data is neither a certificate, a certificate request nor a public key"
    )


def spki_from_bytes(data: bytes) -> bytes:
    """Return the DER SPKI of the first certificate, CSR or public key in ``data``.

    Raises:
        InputError: nothing usable is found, or the data is a private key.
    """
    for match in _PEM_RE.finditer(data):
        label = match.group(1).decode("ascii")
        if "PRIVATE KEY" in label:
            raise InputError(
                "this file holds a private key: give the certificate, CSR or public "
                "key instead (a private key should never leave the unit)"
            )
        try:
            der = base64.b64decode(match.group(2), validate=False)
        except ValueError as exc:
            raise InputError(f"the {label} block is not valid base64") from exc
        if label == "RSA PUBLIC KEY":
            try:
                rsa_key = serialization.load_pem_public_key(match.group(0))
            except (ValueError, TypeError) as exc:
                raise InputError("the RSA PUBLIC KEY block is not readable") from exc
            return rsa_key.public_bytes(
                serialization.Encoding.DER,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
        if label in {
            "CERTIFICATE",
            "TRUSTED CERTIFICATE",
            "X509 CERTIFICATE",
            "CERTIFICATE REQUEST",
            "NEW CERTIFICATE REQUEST",
            "PUBLIC KEY",
        }:
            return _from_der(der, label)
    if b"-----BEGIN" in data:
        raise InputError(
            "the file holds no certificate, certificate request or public key"
        )
    if not data:
        raise InputError("the file is empty")
    return _from_der(data, None)


def load_spki(path: Path) -> bytes:
    """Read ``path`` and return the DER SPKI it carries (see :func:`spki_from_bytes`).

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
        return spki_from_bytes(data)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
