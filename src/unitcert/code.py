"""The fingerprint code of a unit's key, its SPKI pin, and the sticker's QR payload.

The code is computed over the DER SubjectPublicKeyInfo exactly as the
certificate carries it: we slice those bytes out of the certificate (or CSR)
rather than re-encode the key, so that two encoders can never disagree.

Code layout (DESIGN.md): SHA-256 of the SPKI, its first 100 bits written as 20
Crockford base32 symbols, most significant first, then one Luhn mod 32 check
symbol; shown as five groups of four and the check, ``B9X7-HK54-M3T2-1PDW-CAXP-X``.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from unitcert.errors import CodeFormatError, InputError

__all__ = [
    "ALPHABET",
    "FingerprintCode",
    "code_for_spki",
    "parse_code",
    "qr_payload",
    "spki_from_cert_der",
    "spki_from_csr_der",
    "spki_pin",
]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_VALUE = {symbol: value for value, symbol in enumerate(ALPHABET)}
# Crockford's decoding rules: the letters people confuse with digits.
_ALIASES = {"I": "1", "L": "1", "O": "0"}
_BODY_SYMBOLS = 20
_BODY_BITS = 5 * _BODY_SYMBOLS


@dataclass(frozen=True)
class FingerprintCode:
    """A unit's fingerprint code: 20 body symbols and one check symbol.

    Attributes:
        symbols: the 21 symbols, without separators.
    """

    symbols: str

    def __str__(self) -> str:
        body = self.symbols[:_BODY_SYMBOLS]
        groups = [body[i : i + 4] for i in range(0, _BODY_SYMBOLS, 4)]
        return "-".join([*groups, self.symbols[_BODY_SYMBOLS]])


def _check_symbol(body: str) -> str:
    """Return the Luhn mod 32 check symbol for ``body`` (DESIGN.md)."""
    total = 0
    factor = 2
    for symbol in reversed(body):
        product = _VALUE[symbol] * factor
        total += product // 32 + product % 32
        factor = 1 if factor == 2 else 2
    return ALPHABET[(32 - total % 32) % 32]


def code_for_spki(spki_der: bytes) -> FingerprintCode:
    """Compute the fingerprint code of a DER SubjectPublicKeyInfo.

    Args:
        spki_der: the SPKI bytes exactly as the certificate carries them.

    Returns:
        The code.
    """
    digest = hashlib.sha256(spki_der).digest()
    value = int.from_bytes(digest, "big") >> (256 - _BODY_BITS)
    body = "".join(
        ALPHABET[(value >> (5 * (_BODY_SYMBOLS - 1 - i))) & 31]
        for i in range(_BODY_SYMBOLS)
    )
    return FingerprintCode(body + _check_symbol(body))


def parse_code(text: str) -> FingerprintCode:
    """Read a code as a person typed it.

    Case does not matter, hyphens and spaces are ignored, ``I`` and ``L`` read
    as ``1`` and ``O`` as ``0``.

    Raises:
        CodeFormatError: the text is not 21 symbols of the alphabet
            (``mistyped=False``), or the check symbol does not fit
            (``mistyped=True``).
    """
    cleaned = "".join(_ALIASES.get(ch, ch) for ch in text.upper() if ch not in "- \t")
    bad = sorted({ch for ch in cleaned if ch not in _VALUE})
    if bad:
        raise CodeFormatError(
            f"the code contains {', '.join(repr(c) for c in bad)}, which no code "
            "has: codes use the digits 0-9 and the letters A-Z except I, L, O "
            "and U",
            mistyped=False,
        )
    if len(cleaned) != _BODY_SYMBOLS + 1:
        raise CodeFormatError(
            f"the code has {len(cleaned)} symbols but a code has 21 (five groups "
            "of four and a check symbol, like B9X7-HK54-M3T2-1PDW-CAXP-X): "
            "copy it again from the sticker",
            mistyped=False,
        )
    if _check_symbol(cleaned[:_BODY_SYMBOLS]) != cleaned[_BODY_SYMBOLS]:
        raise CodeFormatError(
            "the code's check symbol does not fit: it was mistyped, so compare it "
            "with the sticker symbol by symbol",
            mistyped=True,
        )
    return FingerprintCode(cleaned)


def spki_pin(spki_der: bytes) -> str:
    """Return the base64 SHA-256 of the SPKI, as ``curl --pinnedpubkey`` uses it."""
    return base64.b64encode(hashlib.sha256(spki_der).digest()).decode("ascii")


def qr_payload(*, hostname: str, serial: str, spki_der: bytes) -> str:
    """Return the sticker's QR payload (DESIGN.md), shaped like a Wi-Fi DPP URI.

    Raises:
        ValueError: the hostname or serial contains a character that the
            payload uses as a separator.
    """
    for name, value in (("hostname", hostname), ("serial", serial)):
        if any(ch in value for ch in ";:"):
            raise ValueError(f"{name} must not contain ';' or ':': {value!r}")
    digest = hashlib.sha256(spki_der).digest()
    key = base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
    return f"UNITCERT:V:1;N:{hostname};S:{serial};K:{key};;"


# --- slicing the SPKI out of DER, without re-encoding it --------------------


def _read_tlv(data: bytes, offset: int) -> tuple[int, int, int]:
    """Read one DER TLV at ``offset``; return (tag, content start, end)."""
    if offset + 2 > len(data):
        raise InputError("the DER data ends inside an element: it is truncated")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise InputError("the DER data uses a multi-byte tag, which X.509 does not")
    length = data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise InputError("the DER data has an invalid length field")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise InputError("the DER data ends inside an element: it is truncated")
    return tag, start, end


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """Return (tag, element start, element end) for each element in a SEQUENCE body."""
    items = []
    offset = start
    while offset < end:
        tag, _, element_end = _read_tlv(data, offset)
        items.append((tag, offset, element_end))
        offset = element_end
    return items


_SEQUENCE = 0x30
_CONTEXT_0 = 0xA0


def _first_sequence_body(der: bytes) -> tuple[int, int]:
    tag, start, _end = _read_tlv(der, 0)
    if tag != _SEQUENCE:
        raise InputError("the DER data is not a SEQUENCE")
    inner_tag, inner_start, inner_end = _read_tlv(der, start)
    if inner_tag != _SEQUENCE:
        raise InputError("the DER data does not start with a signed SEQUENCE")
    return inner_start, inner_end


def spki_from_cert_der(der: bytes) -> bytes:
    """Return the SubjectPublicKeyInfo bytes of a DER certificate (RFC 5280 4.1).

    Raises:
        InputError: the data is not a well-formed certificate.
    """
    start, end = _first_sequence_body(der)
    fields = _children(der, start, end)
    if fields and fields[0][0] == _CONTEXT_0:  # optional [0] version
        fields = fields[1:]
    # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
    if len(fields) < 6 or fields[5][0] != _SEQUENCE:
        raise InputError(
            "the certificate has no subjectPublicKeyInfo where X.509 puts it"
        )
    _, spki_start, spki_end = fields[5]
    return der[spki_start:spki_end]


def spki_from_csr_der(der: bytes) -> bytes:
    """Return the SubjectPublicKeyInfo bytes of a DER CSR (RFC 2986 4.1).

    Raises:
        InputError: the data is not a well-formed certification request.
    """
    start, end = _first_sequence_body(der)
    fields = _children(der, start, end)
    # version, subject, subjectPKInfo, attributes
    if len(fields) < 3 or fields[2][0] != _SEQUENCE:
        raise InputError("the request has no subjectPKInfo where PKCS#10 puts it")
    _, spki_start, spki_end = fields[2]
    return der[spki_start:spki_end]
