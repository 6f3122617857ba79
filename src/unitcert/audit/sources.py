"""Where the audit's keys come from: files and folders, live TLS hosts, a registry.

Every source yields :class:`KeyRecord` values, one per key it found, each
naming the unit it belongs to; any object with a ``describe()`` method and a
``records()`` generator (the :class:`Source` protocol) plugs in, so a factory
registry source is one more class. Problems that do not stop the audit (a
host that does not answer, a file in a folder that holds no key) are reported
through ``records()``'s ``problems`` list rather than raised.

Unit names:

* a file's unit is its path; a file holding several unit keys numbers them
  (``bundle.pem#2``), and a ``known_hosts`` line names its host. Files that
  differ only in their extension (``unit-42.pem``, ``unit-42.csr``) are one
  unit when they carry the same key under the same subject
  (:func:`unitcert.audit.checks.distinct_units`);
* a live host's unit is its ``host:port``;
* a registry's unit is the serial it records.

CA certificates (basicConstraints ``cA``) that follow a file's first
certificate (a chain's issuers) are skipped: they are the maker's keys, shared
by design, not a unit's. A file's first certificate, and every certificate a
live host serves, is a unit's, even when it says CA:TRUE: that is how many
devices' default self-signed certificates are made. Private keys are
never read: a file block labelled ``PRIVATE KEY`` is skipped unopened.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import ssl
import stat
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.utils import CryptographyDeprecationWarning

from unitcert.code import code_for_spki, spki_from_cert_der, spki_from_csr_der
from unitcert.errors import InputError

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_TIMEOUT",
    "FileSource",
    "HostAddress",
    "HostSource",
    "KeyRecord",
    "Source",
    "SourceProblem",
    "cert_record",
    "key_record",
    "read_hosts_file",
]

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 64
DEFAULT_TIMEOUT = 5.0
MAX_FILE_BYTES = 64 * 1024 * 1024

_PEM_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL
)
_CERT_LABELS = {"CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE"}
_CSR_LABELS = {"CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"}
_SSH_KEY_TYPES = (
    "ssh-rsa",
    "ssh-ed25519",
    "ssh-ed448",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
)
_RSA_OID = "1.2.840.113549.1.1.1"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One public key found by a source, and the unit it belongs to.

    Attributes:
        unit: the unit's name: a serial, a file path,
            or a ``host:port``.
        source: the kind of source: ``"file"``, ``"host"`` or ``"registry"``.
        location: exactly where the key was read (file and block, address,
            registry row), for the report.
        form: what carried the key: ``"certificate"``, ``"csr"``,
            ``"public key"`` or ``"ssh host key"``.
        key_type: ``"RSA-2048"``, ``"ECDSA P-256"``, ``"Ed25519"``, ...
        spki_der: the DER SubjectPublicKeyInfo as the source carried it (an
            SSH key's is its standard encoding).
        key_id: SHA-256 (hex) of the key's canonical SPKI encoding: two
            records have the same key exactly when their ``key_id`` match.
        rsa_n: the RSA modulus, for RSA keys.
        rsa_e: the RSA public exponent, for RSA keys.
        loadable: False when ``cryptography`` refuses the key (invalid RSA
            parameters, for instance); its numbers are still checked.
        cert_sha256: SHA-256 (hex) of the certificate, when a certificate
            carried the key.
        serial: the unit serial the record states, lowercased: the
            registry's serial, or the serialNumber in the subject of the
            certificate or CSR that carried the key.
        subject: the certificate's or CSR's subject, for the report.
        issued: the certificate's notBefore, for the report's timeline.
        batch: the production batch, when the source knows it.
    """

    unit: str
    source: str
    location: str
    form: str
    key_type: str
    spki_der: bytes = field(repr=False)
    key_id: str
    rsa_n: int | None = field(default=None, repr=False)
    rsa_e: int | None = None
    loadable: bool = True
    cert_sha256: str | None = None
    serial: str | None = None
    subject: str | None = None
    issued: dt.datetime | None = None
    batch: str | None = None

    @property
    def code(self) -> str:
        """The fingerprint code of ``spki_der``.

        Computed when asked (for the few keys a report names) rather than
        kept: a fleet audit holds a million records.
        """
        return str(code_for_spki(self.spki_der))


@dataclass(frozen=True)
class SourceProblem:
    """Something a source could not read, which the audit reports and goes past.

    Attributes:
        location: the file, block or address concerned.
        reason: what went wrong, as a sentence fragment.
        named: True when the user named the item itself (a hosts-file line, a
            registry row), so the audit is incomplete without it; False for a
            file met while walking a folder, which may well hold no key.
    """

    location: str
    reason: str
    named: bool = False


class Source(Protocol):
    """A place the audit reads keys from."""

    def describe(self) -> str:
        """Return a short description for progress and reports ("3 paths")."""
        ...

    def size(self) -> int:
        """Return how many items (files, hosts, rows) :meth:`records` will handle."""
        ...

    def records(
        self,
        problems: list[SourceProblem],
        advance: Callable[[int], None] | None = None,
    ) -> Iterator[KeyRecord]:
        """Yield every key found, appending what could not be read to ``problems``.

        Args:
            problems: where to record what was skipped and why.
            advance: called with how many items (files, hosts, rows) were
                handled since the last call, for progress.

        Raises:
            InputError: the source as a whole cannot be read.
        """
        ...


# --- one key ------------------------------------------------------------------


def _key_type(public_key: object) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA-{public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"ECDSA {names.get(public_key.curve.name, public_key.curve.name)}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(public_key, dsa.DSAPublicKey):
        return f"DSA-{public_key.key_size}"
    return type(public_key).__name__


def _read_der(data: bytes, offset: int) -> tuple[int, int, int]:
    """Return (tag, content start, end) of the DER element at ``offset``."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER")
    tag, length = data[offset], data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or start + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    if start + length > len(data):
        raise ValueError("truncated DER")
    return tag, start, start + length


def _oid_text(body: bytes) -> str:
    parts: list[int] = []
    value = 0
    for byte in body:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    first = min(parts[0] // 40, 2)
    return ".".join(str(p) for p in [first, parts[0] - 40 * first, *parts[1:]])


def _rsa_numbers_from_spki(spki: bytes) -> tuple[int, int] | None:
    """Read (n, e) from an RSA SPKI without validating them, or None if not RSA.

    ``cryptography`` refuses RSA keys with invalid parameters (an exponent of
    1, for instance); the audit still has to see and report them.
    """
    try:
        outer_tag, start, _ = _read_der(spki, 0)
        alg_tag, alg_start, alg_end = _read_der(spki, start)
        if outer_tag != 0x30 or alg_tag != 0x30:
            return None
        oid_tag, oid_start, oid_end = _read_der(spki, alg_start)
        if oid_tag != 0x06 or _oid_text(spki[oid_start:oid_end]) != _RSA_OID:
            return None
        bits_tag, bits_start, bits_end = _read_der(spki, alg_end)
        if bits_tag != 0x03:
            return None
        key = spki[bits_start + 1 : bits_end]
        seq_tag, seq_start, _ = _read_der(key, 0)
        n_tag, n_start, n_end = _read_der(key, seq_start)
        e_tag, e_start, e_end = _read_der(key, n_end)
    except (ValueError, IndexError):
        return None
    if (seq_tag, n_tag, e_tag) != (0x30, 0x02, 0x02):
        return None
    n = int.from_bytes(key[n_start:n_end], "big", signed=True)
    e = int.from_bytes(key[e_start:e_end], "big", signed=True)
    return n, e


def key_record(
    spki_der: bytes,
    *,
    unit: str,
    source: str,
    location: str,
    form: str,
    cert_sha256: str | None = None,
    serial: str | None = None,
    subject: str | None = None,
    issued: dt.datetime | None = None,
    batch: str | None = None,
) -> KeyRecord:
    """Build the record of one key from its DER SubjectPublicKeyInfo.

    Sources call this for every key they find; a registry source can too.

    Args:
        spki_der: the SPKI as the certificate, CSR or key file carried it.
        unit: the unit's name (see the module docstring).
        source: ``"file"``, ``"host"`` or ``"registry"``.
        location: where exactly the key was read.
        form: what carried the key (``"certificate"``, ``"csr"``, ...).
        cert_sha256: the certificate's SHA-256 (hex), when there is one.
        serial: the unit serial the source or the subject states.
        subject: the certificate's or CSR's subject.
        issued: the certificate's notBefore.
        batch: the production batch.

    Returns:
        The record.

    Raises:
        InputError: the bytes are not a public key of a kind the audit reads.
    """
    try:
        public_key = serialization.load_der_public_key(spki_der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        numbers = _rsa_numbers_from_spki(spki_der)
        if numbers is None:
            raise InputError(f"{location}: the public key is unreadable") from exc
        n, e = numbers
        return KeyRecord(
            unit=unit,
            source=source,
            location=location,
            form=form,
            key_type=sys.intern(f"RSA-{n.bit_length()}"),
            spki_der=spki_der,
            key_id=hashlib.sha256(spki_der).hexdigest(),
            rsa_n=n,
            rsa_e=e,
            loadable=False,
            cert_sha256=cert_sha256,
            serial=serial,
            subject=subject,
            issued=issued,
            batch=batch,
        )

    canonical = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    n_value = e_value = None
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers_rsa = public_key.public_numbers()
        n_value, e_value = numbers_rsa.n, numbers_rsa.e
    return KeyRecord(
        unit=unit,
        source=source,
        location=location,
        form=form,
        key_type=sys.intern(_key_type(public_key)),
        spki_der=spki_der,
        key_id=hashlib.sha256(canonical).hexdigest(),
        rsa_n=n_value,
        rsa_e=e_value,
        cert_sha256=cert_sha256,
        serial=serial,
        subject=subject,
        issued=issued,
        batch=batch,
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except (x509.ExtensionNotFound, ValueError):
        # None, or one that cannot be parsed: not known to be a CA.
        return False
    return constraints.value.ca


def _stated_serial(name: x509.Name) -> str | None:
    """Return the subject's serialNumber, lowercased, when it has exactly one."""
    values = [a.value for a in name.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)]
    if len(values) != 1 or not isinstance(values[0], str) or not values[0].strip():
        return None
    return values[0].strip().lower()


def _subject_text(name: x509.Name) -> str | None:
    try:
        text = name.rfc4514_string()
    except ValueError:
        return None
    return text or None


def cert_record(
    der: bytes,
    *,
    unit: str,
    source: str,
    location: str,
    chain_member: bool = False,
    serial: str | None = None,
) -> KeyRecord | None:
    """Build the record of a DER certificate's key.

    Returns None for a CA certificate that is a ``chain_member`` (an issuer
    after a file's first certificate), which is not a unit's key.

    Args:
        der: the certificate.
        unit: the unit's name (see the module docstring).
        source: ``"file"``, ``"host"`` or ``"registry"``.
        location: where exactly the certificate was read.
        chain_member: the certificate follows a file's first certificate.
        serial: the unit's serial when the source knows it (the registry);
            otherwise the subject's serialNumber, if any.

    Raises:
        InputError: the certificate or its key cannot be read.
    """
    spki = spki_from_cert_der(der)
    subject = issued = None
    try:
        with warnings.catch_warnings():
            # A serial number of zero or below, common in devices' default
            # certificates, is only warned about: the key is what is audited.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(der)
        if chain_member and _is_ca(cert):
            return None
        subject = _subject_text(cert.subject)
        issued = cert.not_valid_before_utc
        if serial is None:
            serial = _stated_serial(cert.subject)
    except (ValueError, x509.InvalidVersion):
        # The key was read from where X.509 puts it; what else the
        # certificate says (a malformed name or extension) is left unknown.
        logger.debug("%s: the certificate's fields are unreadable", location)
    return key_record(
        spki,
        unit=unit,
        source=source,
        location=location,
        form="certificate",
        cert_sha256=hashlib.sha256(der).hexdigest(),
        serial=serial,
        subject=subject,
        issued=issued,
    )


def _csr_record(der: bytes, *, unit: str, location: str) -> KeyRecord:
    spki = spki_from_csr_der(der)
    subject = serial = None
    try:
        name = x509.load_der_x509_csr(der).subject
    except (ValueError, x509.InvalidVersion):
        name = None
    if name is not None:
        subject, serial = _subject_text(name), _stated_serial(name)
    return key_record(
        spki,
        unit=unit,
        source="file",
        location=location,
        form="csr",
        serial=serial,
        subject=subject,
    )


# --- files and folders -----------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    """One key-carrying item in a file, before it is turned into a record.

    ``where`` is how a problem with the item is located in the file: ``:17``
    for a text line, empty for a numbered block (``#3``).
    """

    kind: str  # "certificate", "csr", "public key", "rsa public key", "ssh"
    data: bytes
    host: str | None = None
    where: str = ""


@dataclass(frozen=True)
class _Bad:
    """An item of a file that is meant to carry a key and cannot be read."""

    where: str  # ":17" (a line) or "#3" (a block)
    reason: str


class _NotKeys(Exception):
    """The file holds nothing the audit reads (said in the message)."""


class _Unreadable(Exception):
    """The file may hold keys but cannot be read (said in the message)."""


# A line that carries an OpenSSH key: "[host-or-options ]key-type AAAA...",
# every key blob starting with the four-byte length of its type name.
_SSH_LINE_RE = re.compile(
    rb"^[ \t]*(?:\S+[ \t]+)?(?:"
    + b"|".join(re.escape(kind.encode()) for kind in _SSH_KEY_TYPES)
    + rb")[ \t]+AAAA"
)


_PEM_KINDS = {
    **dict.fromkeys(_CERT_LABELS, "certificate"),
    **dict.fromkeys(_CSR_LABELS, "csr"),
    "PUBLIC KEY": "public key",
    "RSA PUBLIC KEY": "rsa public key",
}


def _pem_items(data: bytes) -> tuple[list[_Block | _Bad], bool]:
    """Read the PEM blocks; say too whether any text lies outside them."""
    items: list[_Block | _Bad] = []
    outside = False
    end = 0
    for match in _PEM_RE.finditer(data):
        outside = outside or bool(data[end : match.start()].strip())
        end = match.end()
        label = match.group(1).decode("ascii")
        if "PRIVATE KEY" in label:
            # Never decoded: the audit has no business with private keys.
            continue
        kind = _PEM_KINDS.get(label)
        if kind is None and label not in _PKCS7_LABELS:
            continue
        try:
            der = base64.b64decode(match.group(2), validate=False)
        except (ValueError, binascii.Error):
            line = data.count(b"\n", 0, match.start()) + 1
            items.append(_Bad(f":{line}", f"the {label} block is not valid base64"))
            continue
        if kind is None:
            items.extend(_pkcs7_items(der, data.count(b"\n", 0, match.start()) + 1))
        else:
            items.append(_Block(kind, der))
    return items, outside or bool(data[end:].strip())


_PKCS7_LABELS = frozenset({"PKCS7", "CERTIFICATE CHAIN"})


def _pkcs7_items(der: bytes, line: int) -> list[_Block | _Bad]:
    """The certificates of a PKCS#7 bundle (``openssl crl2pkcs7``, .p7b)."""
    try:
        with warnings.catch_warnings():
            # OpenSSL's bundles list their certificates unsorted (BER, not
            # DER); cryptography reads them and warns about it.
            warnings.simplefilter("ignore", UserWarning)
            certificates = pkcs7.load_der_pkcs7_certificates(der)
    except ValueError:
        return [_Bad(f":{line}", "the PKCS7 block holds no readable certificates")]
    # A bundle's order is not its chain's: its CA certificates are the
    # issuers, unless the bundle holds nothing else (a default certificate
    # marked CA).
    leaves = [cert for cert in certificates if not _is_ca(cert)] or certificates
    return [
        _Block("certificate", cert.public_bytes(serialization.Encoding.DER))
        for cert in leaves
    ]


_BEGIN_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


def _cut_off_blocks(data: bytes) -> list[_Block | _Bad]:
    """A problem for each key-carrying PEM block that has no END line.

    A file cut short (a copy interrupted, a dump truncated) is a key not
    audited, not a file without keys.
    """
    if data.count(b"-----BEGIN ") == data.count(b"-----END "):
        return []
    # Both scans go forward through the file: one pass over each.
    whole = iter(match.span() for match in _PEM_RE.finditer(data))
    span = next(whole, None)
    cut: list[_Block | _Bad] = []
    for begin in _BEGIN_RE.finditer(data):
        while span is not None and span[1] <= begin.start():
            span = next(whole, None)
        label = begin.group(1).decode("ascii")
        if label not in _PEM_KINDS and label not in _PKCS7_LABELS:
            continue
        if span is not None and span[0] <= begin.start():
            continue
        line = data.count(b"\n", 0, begin.start()) + 1
        cut.append(_Bad(f":{line}", f"its {label} block is cut off (no END line)"))
    return cut


def _unread_pem_reason(data: bytes) -> str:
    """Say why a PEM file gave no key: what its blocks are, if anything."""
    labels = sorted({m.group(1).decode("ascii") for m in _PEM_RE.finditer(data)})
    if labels and all("PRIVATE KEY" in label for label in labels):
        return (
            "it holds only a private key, which the audit does not read: give the "
            "unit's certificate or public key"
        )
    if labels:
        return (
            f"it holds no certificate, CSR or public key (its PEM blocks: "
            f"{', '.join(labels)})"
        )
    return "it holds no certificate, CSR or public key"


def _ssh_item(line: str, number: int) -> _Block | _Bad | None:
    """Read one line of an OpenSSH public key or ``known_hosts`` file."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    if fields[0].startswith("@"):
        # known_hosts markers: @cert-authority keys are the maker's CA,
        # @revoked keys are already known bad; neither is a unit's key.
        return None
    where = f":{number}"
    position = next((i for i, f in enumerate(fields) if f in _SSH_KEY_TYPES), None)
    if position is None:
        return _Bad(where, f"line {number} is not an OpenSSH public key line")
    if position + 1 >= len(fields):
        return _Bad(where, f"line {number} is cut off before its key")
    blob = f"{fields[position]} {fields[position + 1]}".encode()
    # "host key-type blob" is a known_hosts line; options before the key type
    # (authorized_keys) name no host.
    host = fields[0].split(",")[0] if position == 1 else None
    return _Block("ssh", blob, host, where)


def _ssh_items(data: bytes, *, every_line: bool) -> list[_Block | _Bad]:
    """Read the OpenSSH key lines of ``data``, each line on its own.

    With ``every_line`` (a file of OpenSSH keys) a line that is no key line is
    a problem; otherwise (text around PEM blocks, notes with a key in them)
    only the lines that look like key lines are read.
    """
    items: list[_Block | _Bad] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not every_line and not _SSH_LINE_RE.match(raw):
            continue
        line = raw.decode("utf-8", errors="replace")
        item = _ssh_item(line, number)
        if isinstance(item, _Block) and "\ufffd" in item.data.decode():
            item = _Bad(f":{number}", _not_utf8(raw, f"line {number}"))
        elif isinstance(item, _Bad) and "\ufffd" in line:
            item = _Bad(item.where, _not_utf8(raw, f"line {number}"))
        if item is not None:
            items.append(item)
    return items


def _not_utf8(raw: bytes, what: str) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"{what} is not UTF-8 text (byte {exc.start + 1} of the line)"
    return f"{what} is not UTF-8 text"


def _without_pem(data: bytes) -> bytes:
    """Blank out the PEM blocks of ``data``, keeping its line numbers."""
    return _PEM_RE.sub(lambda m: b"\n" * m.group(0).count(b"\n"), data)


def _der_items(data: bytes) -> list[_Block | _Bad]:
    """Read one DER item after another (certificates concatenated, say)."""
    items: list[_Block | _Bad] = []
    offset = 0
    last = len(data.rstrip(b"\x00 \t\r\n"))  # past it, padding or a newline
    while offset < last:
        try:
            _, _, end = _read_der(data, offset)
        except ValueError:
            end = None
        if end is None or data[offset] != 0x30:
            if not items:
                raise _NotKeys("it holds no certificate, CSR or public key")
            items.append(
                _Bad(
                    f"#{len(items) + 1}",
                    f"the {len(data) - offset} bytes after item {len(items)} are not "
                    "a DER certificate, CSR or public key",
                )
            )
            break
        try:
            items.append(_der_block(data[offset:end]))
        except _NotKeys:
            if not items:
                raise
            items.append(
                _Bad(
                    f"#{len(items) + 1}",
                    f"DER item {len(items) + 1} is no certificate, CSR or public key",
                )
            )
        offset = end
    if not items:
        raise _NotKeys("it holds no certificate, CSR or public key")
    return items


def _file_items(data: bytes) -> list[_Block | _Bad]:
    if not data.strip():
        raise _NotKeys("it is empty")
    if b"-----BEGIN" in data:
        items, outside = _pem_items(data)
        items += _cut_off_blocks(data)
        if outside:
            items += _ssh_items(_without_pem(data), every_line=False)
        if not items:
            raise _NotKeys(_unread_pem_reason(data))
        return items
    lines = [line for line in data.splitlines() if line.strip()]
    key_lines = sum(1 for line in lines if _SSH_LINE_RE.match(line))
    content = sum(1 for line in lines if not line.lstrip().startswith(b"#"))
    if key_lines and 2 * key_lines >= content:
        # A file of OpenSSH keys or known_hosts: every line is read on its own.
        items = _ssh_items(data, every_line=True)
    elif key_lines:
        items = _ssh_items(data, every_line=False)
    else:
        return _der_items(data)
    if not items:
        raise _NotKeys("it holds no certificate, CSR or public key")
    return items


def _der_block(data: bytes) -> _Block:
    for kind, loader in (
        ("certificate", spki_from_cert_der),
        ("csr", spki_from_csr_der),
    ):
        try:
            loader(data)
        except InputError:
            continue
        return _Block(kind, data)
    if _rsa_numbers_from_spki(data) is not None:
        return _Block("public key", data)
    if _rsa_numbers_from_spki(_spki_from_pkcs1(data)) is not None:
        return _Block("rsa public key", data)
    try:
        serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise _NotKeys("it holds no certificate, CSR or public key") from None
    return _Block("public key", data)


def _der_element(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + content


# AlgorithmIdentifier { rsaEncryption, NULL } (RFC 3279 2.3.1)
_RSA_ALGORITHM = bytes.fromhex("300d06092a864886f70d0101010500")


def _spki_from_pkcs1(der: bytes) -> bytes:
    """Wrap a PKCS#1 RSAPublicKey in a SubjectPublicKeyInfo, without checking it."""
    return _der_element(0x30, _RSA_ALGORITHM + _der_element(0x03, b"\x00" + der))


def _ssh_spki(blob: bytes) -> bytes:
    """Return the SPKI of an OpenSSH key line's ``type base64`` part.

    An ``ssh-rsa`` key whose numbers ``cryptography`` refuses (an exponent of
    1, a modulus of 0) is still read, as bare numbers, to be reported.

    Raises:
        InputError: the key cannot be read.
    """
    try:
        key = serialization.load_ssh_public_key(blob)
    except (ValueError, UnsupportedAlgorithm) as exc:
        numbers = _ssh_rsa_numbers(blob)
        if numbers is None:
            raise InputError(
                "the SSH public key is unreadable (its base64 is cut off or "
                "malformed, or its key type is not one the audit reads)"
            ) from exc
        n, e = numbers
        return _spki_from_pkcs1(_der_element(0x30, _der_integer(n) + _der_integer(e)))
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _der_integer(value: int) -> bytes:
    size = value.bit_length() // 8 + 1
    return _der_element(0x02, value.to_bytes(size, "big", signed=True))


def _ssh_rsa_numbers(blob: bytes) -> tuple[int, int] | None:
    """Read (n, e) from ``ssh-rsa <base64>`` (RFC 4253 6.6) without checking them."""
    kind, _, encoded = blob.partition(b" ")
    if kind != b"ssh-rsa":
        return None
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        return None
    fields: list[bytes] = []
    offset = 0
    while offset < len(raw) and len(fields) < 3:
        if offset + 4 > len(raw):
            return None
        size = int.from_bytes(raw[offset : offset + 4], "big")
        if offset + 4 + size > len(raw):
            return None
        fields.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    if len(fields) != 3 or fields[0] != b"ssh-rsa" or offset != len(raw):
        return None
    e, n = (int.from_bytes(f, "big", signed=True) for f in fields[1:])
    return n, e


def _block_record(
    block: _Block, *, unit: str, location: str, chain_member: bool = False
) -> KeyRecord | None:
    if block.kind == "certificate":
        return cert_record(
            block.data,
            unit=unit,
            source="file",
            location=location,
            chain_member=chain_member,
        )
    if block.kind == "csr":
        return _csr_record(block.data, unit=unit, location=location)
    if block.kind == "rsa public key":
        return key_record(
            _spki_from_pkcs1(block.data),
            unit=unit,
            source="file",
            location=location,
            form="public key",
        )
    if block.kind == "ssh":
        return key_record(
            _ssh_spki(block.data),
            unit=block.host or unit,
            source="file",
            location=location,
            form="ssh host key",
        )
    return key_record(
        block.data, unit=unit, source="file", location=location, form="public key"
    )


def _item_reason(exc: BaseException, location: str) -> str:
    """The reason of an item's failure, without the location it may repeat."""
    text = str(exc) or type(exc).__name__
    return text.removeprefix(f"{location}: ")


class FileSource:
    """Certificates, CSRs, public keys and SSH host keys in files and folders.

    Files may be PEM (any number of blocks, and OpenSSH key lines between
    them), DER (one item or several in a row), OpenSSH public keys (one per
    line) or ``known_hosts``. Folders are read recursively, in name order,
    following symbolic links; a file reached twice (named twice, or through
    a link) is read once. A file in a folder that holds no key is reported as
    a problem; one that cannot be read, a folder that cannot be listed, and
    each item of a file that cannot be read (a ``known_hosts`` line, a PEM
    block) are reported as problems that leave the audit incomplete.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        """Remember the paths; nothing is read until :meth:`records`.

        Raises:
            InputError: a path does not exist.
        """
        for path in paths:
            if not path.exists():
                what = (
                    "is a broken symbolic link"
                    if path.is_symlink()
                    else "does not exist"
                )
                raise InputError(
                    f"{path} {what}: give files or folders of certificates, "
                    "CSRs, public keys or SSH host keys"
                )
        self.paths = tuple(paths)

    def describe(self) -> str:
        """Return "N paths"."""
        return f"{len(self.paths)} path" + ("" if len(self.paths) == 1 else "s")

    def size(self) -> int:
        """Return how many files the paths hold."""
        return sum(1 for _ in self.files())

    def files(
        self, problems: list[SourceProblem] | None = None
    ) -> Iterator[tuple[Path, bool]]:
        """Yield every file to read once, and whether it was named explicitly.

        Args:
            problems: where to record the folders that cannot be listed.
        """
        seen_files: set[str] = set()
        seen_folders: set[str] = set()
        for path in self.paths:
            if path.is_dir():
                yield from self._walk(path, seen_files, seen_folders, problems)
                continue
            real = os.path.realpath(path)
            if real not in seen_files:
                seen_files.add(real)
                yield path, True

    @staticmethod
    def _walk(
        top: Path,
        seen_files: set[str],
        seen_folders: set[str],
        problems: list[SourceProblem] | None,
    ) -> Iterator[tuple[Path, bool]]:
        # Depth first, names sorted, a folder's files before its subfolders.
        # Only a symbolic link costs a realpath: any other entry's real path
        # is its folder's real path and its name.
        pending = [(str(top), os.path.realpath(top))]
        while pending:
            folder, real_folder = pending.pop()
            if real_folder in seen_folders:
                continue  # reached before, through a link
            seen_folders.add(real_folder)
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name)
            except OSError as exc:
                if problems is not None:
                    problems.append(
                        SourceProblem(
                            folder,
                            f"the folder could not be listed: {_reason(exc)}",
                            named=True,
                        )
                    )
                continue
            subfolders = []
            for entry in entries:
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    is_folder = os.path.isdir(real)
                else:
                    real = os.path.join(real_folder, entry.name)
                    is_folder = entry.is_dir(follow_symlinks=False)
                if is_folder:
                    subfolders.append((entry.path, real))
                elif real not in seen_files:
                    seen_files.add(real)
                    yield Path(entry.path), False
            pending.extend(reversed(subfolders))

    def records(
        self,
        problems: list[SourceProblem],
        advance: Callable[[int], None] | None = None,
    ) -> Iterator[KeyRecord]:
        """Yield the keys of every file (see :class:`Source`).

        Raises:
            InputError: a file named explicitly cannot be read or holds no key.
        """
        for path, explicit in self.files(problems):
            try:
                yield from self._file_records(path, problems)
            except (_NotKeys, _Unreadable) as exc:
                if explicit:
                    raise InputError(f"cannot audit {path}: {exc}") from None
                logger.debug("skipping %s: %s", path, exc)
                problems.append(
                    SourceProblem(
                        str(path), str(exc), named=isinstance(exc, _Unreadable)
                    )
                )
            if advance is not None:
                advance(1)

    def _file_records(
        self, path: Path, problems: list[SourceProblem]
    ) -> Iterator[KeyRecord]:
        items = _file_items(_read_file(path))
        unit = str(path)
        first_cert = next(
            (
                i
                for i, item in enumerate(items)
                if isinstance(item, _Block) and item.kind == "certificate"
            ),
            None,
        )
        records = []
        for number, item in enumerate(items, start=1):
            if isinstance(item, _Bad):
                problems.append(
                    SourceProblem(f"{path}{item.where}", item.reason, named=True)
                )
                continue
            location = f"{path}{item.where or f'#{number}'}"
            try:
                record = _block_record(
                    item,
                    unit=unit,
                    location=location,
                    chain_member=item.kind == "certificate"
                    and number - 1 != first_cert,
                )
            except (InputError, ValueError, UnsupportedAlgorithm) as exc:
                logger.debug("%s: unreadable", location, exc_info=True)
                problems.append(
                    SourceProblem(
                        location,
                        _item_reason(exc, location),
                        named=True,
                    )
                )
                continue
            if record is not None:
                records.append(record)
        if len(records) == 1:
            # One unit key in the file (a chain's CA certificates are skipped).
            yield replace(records[0], location=str(path))
            return
        for number, record in enumerate(records, start=1):
            named = record.unit if record.unit != unit else f"{unit}#{number}"
            yield replace(record, unit=named)


def _read_file(path: Path) -> bytes:
    """Read a file of at most :data:`MAX_FILE_BYTES`.

    Raises:
        _NotKeys: the path is not a regular file (a FIFO, a device).
        _Unreadable: the file may hold keys but cannot be read.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise _Unreadable("it is a broken symbolic link") from None
        raise _Unreadable("it was removed while the audit ran") from None
    except OSError as exc:
        raise _Unreadable(f"it could not be read: {_reason(exc)}") from None
    if not stat.S_ISREG(info.st_mode):
        raise _NotKeys(f"it is not a regular file ({_file_kind(info.st_mode)})")
    if info.st_size > MAX_FILE_BYTES:
        raise _Unreadable(_too_large())
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _Unreadable(f"it could not be read: {_reason(exc)}") from None
    if len(data) > MAX_FILE_BYTES:
        raise _Unreadable(_too_large())
    return data


def _too_large() -> str:
    return (
        f"it is larger than the {MAX_FILE_BYTES // (1024 * 1024)} MiB limit, so "
        "it was not read"
    )


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a special file"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


# --- live hosts ----------------------------------------------------------------


@dataclass(frozen=True)
class HostAddress:
    """One ``host:port`` line of a hosts file."""

    host: str
    port: int

    def __str__(self) -> str:
        return (
            f"[{self.host}]:{self.port}"
            if ":" in self.host
            else f"{self.host}:{self.port}"
        )


def _parse_address(text: str, where: str) -> HostAddress:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise InputError(
            f"{where}: {text!r} is not host:port (write one like 192.0.2.7:443 or "
            "[2001:db8::7]:443)"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return HostAddress(host, int(port))


def read_hosts_file(path: Path) -> list[HostAddress]:
    """Read a hosts file: one ``host:port`` per line, ``#`` comments allowed.

    An address listed twice is returned once.

    Raises:
        InputError: the file cannot be read or a line is not ``host:port``.
    """
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InputError(
                f"the hosts file {path} is not a regular file "
                f"({_file_kind(info.st_mode)}): give a text file of host:port lines"
            )
        if info.st_size > MAX_FILE_BYTES:
            raise InputError(f"the hosts file {path} is too large: {_too_large()}")
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise InputError(f"cannot read the hosts file {path}: {reason}") from None
    addresses = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            addresses.append(_parse_address(line, f"{path}, line {number}"))
    return list(dict.fromkeys(addresses))


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The audit reads whatever certificate a unit serves, weak or not, and
    # sends no data: no verification, TLS 1.0 and up, and every cipher at
    # OpenSSL's security level 0, so that an old unit (TLS 1.0 only, a
    # 1024-bit RSA key, RC4 or 3DES) is seen and reported rather than
    # refused. Anonymous suites are left out: they carry no certificate.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("ALL:!aNULL:@SECLEVEL=0")
    with warnings.catch_warnings():
        # Python deprecates TLS 1.0 and 1.1 for clients; reading an old
        # unit's certificate is exactly what they are still needed for.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
    return context


def _server_name(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


class HostSource:
    """The certificates that live TLS endpoints serve.

    Each address is connected to at most once, ``concurrency`` at a time,
    each within ``timeout`` seconds; addresses that fail are reported as
    problems.
    """

    def __init__(
        self,
        addresses: Sequence[HostAddress],
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Remember the addresses.

        Raises:
            ValueError: ``concurrency`` is below 1 or ``timeout`` not positive.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.addresses = tuple(dict.fromkeys(addresses))
        self.concurrency = concurrency
        self.timeout = timeout

    def describe(self) -> str:
        """Return "N hosts"."""
        return f"{len(self.addresses)} host" + ("" if len(self.addresses) == 1 else "s")

    def size(self) -> int:
        """Return how many addresses there are."""
        return len(self.addresses)

    def records(
        self,
        problems: list[SourceProblem],
        advance: Callable[[int], None] | None = None,
    ) -> Iterator[KeyRecord]:
        """Yield the key of every host's certificate (see :class:`Source`)."""
        fetched = asyncio.run(self._fetch_all(advance))
        for address, outcome in zip(self.addresses, fetched, strict=True):
            location = str(address)
            if isinstance(outcome, str):
                problems.append(SourceProblem(location, outcome, named=True))
                continue
            try:
                record = cert_record(
                    outcome, unit=location, source="host", location=location
                )
            except InputError as exc:
                problems.append(SourceProblem(location, str(exc), named=True))
                continue
            if record is not None:  # a served leaf is never skipped
                yield record

    async def _fetch_all(
        self, advance: Callable[[int], None] | None
    ) -> list[bytes | str]:
        context = _client_context()
        limit = asyncio.Semaphore(self.concurrency)

        async def one(address: HostAddress) -> bytes | str:
            async with limit:
                outcome = await self._fetch(address, context)
            if advance is not None:
                advance(1)
            return outcome

        return list(await asyncio.gather(*(one(a) for a in self.addresses)))

    async def _fetch(
        self, address: HostAddress, context: ssl.SSLContext
    ) -> bytes | str:
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(
                    address.host,
                    address.port,
                    ssl=context,
                    server_hostname=_server_name(address.host),
                )
                try:
                    ssl_object = writer.get_extra_info("ssl_object")
                    der = (
                        ssl_object.getpeercert(binary_form=True) if ssl_object else None
                    )
                finally:
                    writer.close()
                    try:
                        await writer.wait_closed()
                    except (OSError, ssl.SSLError):
                        logger.debug("%s: unclean TLS close", address)
        except TimeoutError:
            return f"no TLS handshake within {self.timeout:g} s"
        except ssl.SSLError as exc:
            return f"TLS failed ({exc.reason or exc})"
        except OSError as exc:
            return f"cannot connect ({exc.strerror or exc})"
        except ValueError as exc:
            # The host name cannot be encoded (IDNA refuses "a..b", an empty
            # label or one over 63 characters): no connection was attempted.
            return f"the host name is not a valid DNS name ({exc})"
        if not der:
            return "it sent no certificate"
        return bytes(der)
