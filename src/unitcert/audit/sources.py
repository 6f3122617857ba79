"""Where the audit's keys come from: files and folders, live TLS hosts, a registry.

Every source yields :class:`KeyRecord` values, one per key it found, each
naming the unit it belongs to; any object with a ``describe()`` method and a
``records()`` generator (the :class:`Source` protocol) plugs in, so a factory
registry source is one more class. Problems that do not stop the audit (a
host that does not answer, a file in a folder that holds no key) are reported
through ``records()``'s ``problems`` list rather than raised.

Unit names:

* a file's unit is its path without the extension, so ``unit-42.pem`` and
  ``unit-42.csr`` are one unit; a file holding several unit keys numbers them
  (``bundle#2``), and a ``known_hosts`` line names its host;
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
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

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
        unit: the unit's name: a serial, a file path without its extension,
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
    except x509.ExtensionNotFound:
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
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        cert = None
    if cert is not None:
        if chain_member and _is_ca(cert):
            return None
        subject = _subject_text(cert.subject)
        issued = cert.not_valid_before_utc
        if serial is None:
            serial = _stated_serial(cert.subject)
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
    except ValueError:
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
    """One key-carrying item in a file, before it is turned into a record."""

    kind: str  # "certificate", "csr", "public key", "rsa public key", "ssh"
    data: bytes
    host: str | None = None


class _NotKeys(Exception):
    """The file holds nothing the audit reads (said in the message)."""


def _pem_blocks(data: bytes) -> list[_Block]:
    blocks = []
    for match in _PEM_RE.finditer(data):
        label = match.group(1).decode("ascii")
        if "PRIVATE KEY" in label:
            # Never decoded: the audit has no business with private keys.
            continue
        try:
            der = base64.b64decode(match.group(2), validate=False)
        except (ValueError, binascii.Error):
            continue
        if label in _CERT_LABELS:
            blocks.append(_Block("certificate", der))
        elif label in _CSR_LABELS:
            blocks.append(_Block("csr", der))
        elif label == "PUBLIC KEY":
            blocks.append(_Block("public key", der))
        elif label == "RSA PUBLIC KEY":
            blocks.append(_Block("rsa public key", der))
    return blocks


def _ssh_blocks(text: str) -> list[_Block]:
    blocks = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if fields[0].startswith("@"):
            # known_hosts markers: @cert-authority keys are the maker's CA,
            # @revoked keys are already known bad; neither is a unit's key.
            continue
        if fields[0] in _SSH_KEY_TYPES and len(fields) >= 2:
            blocks.append(_Block("ssh", f"{fields[0]} {fields[1]}".encode()))
        elif len(fields) >= 3 and fields[1] in _SSH_KEY_TYPES:
            host = fields[0].split(",")[0]
            blocks.append(_Block("ssh", f"{fields[1]} {fields[2]}".encode(), host))
    return blocks


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


def _file_blocks(data: bytes) -> list[_Block]:
    if b"-----BEGIN" in data:
        blocks = _pem_blocks(data)
        if not blocks:
            raise _NotKeys("it holds no certificate, CSR or public key")
        return blocks
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and any(kind in text for kind in _SSH_KEY_TYPES):
        blocks = _ssh_blocks(text)
        if blocks:
            return blocks
    if not data:
        raise _NotKeys("it is empty")
    return [_der_block(data)]


def _ssh_spki(blob: bytes) -> bytes:
    key = serialization.load_ssh_public_key(blob)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


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
        try:
            spki = _ssh_spki(block.data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise InputError(f"{location}: the SSH public key is unreadable") from exc
        return key_record(
            spki,
            unit=block.host or unit,
            source="file",
            location=location,
            form="ssh host key",
        )
    return key_record(
        block.data, unit=unit, source="file", location=location, form="public key"
    )


class FileSource:
    """Certificates, CSRs, public keys and SSH host keys in files and folders.

    Files may be PEM (any number of blocks), DER, OpenSSH public keys (one
    per line) or ``known_hosts``. Folders are read recursively, in name
    order; files in them that hold no key are reported as problems.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        """Remember the paths; nothing is read until :meth:`records`.

        Raises:
            InputError: a path does not exist.
        """
        for path in paths:
            if not path.exists():
                raise InputError(
                    f"{path} does not exist: give files or folders of certificates, "
                    "CSRs, public keys or SSH host keys"
                )
        self.paths = tuple(paths)

    def describe(self) -> str:
        """Return "N paths"."""
        return f"{len(self.paths)} path" + ("" if len(self.paths) == 1 else "s")

    def size(self) -> int:
        """Return how many files the paths hold."""
        return sum(1 for _ in self.files())

    def files(self) -> Iterator[tuple[Path, bool]]:
        """Yield every file to read, and whether it was named explicitly."""
        for path in self.paths:
            if path.is_dir():
                for folder, dirs, names in os.walk(path):
                    dirs.sort()
                    for name in sorted(names):
                        yield Path(folder) / name, False
            else:
                yield path, True

    def records(
        self,
        problems: list[SourceProblem],
        advance: Callable[[int], None] | None = None,
    ) -> Iterator[KeyRecord]:
        """Yield the keys of every file (see :class:`Source`).

        Raises:
            InputError: a file named explicitly cannot be read or holds no key.
        """
        for path, explicit in self.files():
            try:
                yield from self._file_records(path)
            except (InputError, _NotKeys, OSError) as exc:
                reason = _reason(exc)
                if explicit:
                    raise InputError(f"cannot audit {path}: {reason}") from None
                logger.debug("skipping %s: %s", path, reason)
                problems.append(SourceProblem(str(path), reason))
            if advance is not None:
                advance(1)

    def _file_records(self, path: Path) -> Iterator[KeyRecord]:
        if not path.is_file():
            raise _NotKeys("it is not a regular file")
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise _NotKeys(f"it is over {MAX_FILE_BYTES // (1024 * 1024)} MiB")
        blocks = _file_blocks(data)
        unit = str(path.with_suffix("")) if path.suffix else str(path)
        first_cert = next(
            (i for i, block in enumerate(blocks) if block.kind == "certificate"), None
        )
        records = [
            record
            for number, block in enumerate(blocks, start=1)
            if (
                record := _block_record(
                    block,
                    unit=unit,
                    location=f"{path}#{number}",
                    chain_member=block.kind == "certificate"
                    and number - 1 != first_cert,
                )
            )
            is not None
        ]
        if len(records) == 1:
            # One unit key in the file (a chain's CA certificates are skipped).
            yield replace(records[0], location=str(path))
            return
        for number, record in enumerate(records, start=1):
            named = record.unit if record.unit != unit else f"{unit}#{number}"
            yield replace(record, unit=named)


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

    Raises:
        InputError: the file cannot be read or a line is not ``host:port``.
    """
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not text"
        raise InputError(f"cannot read the hosts file {path}: {reason}") from None
    addresses = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            addresses.append(_parse_address(line, f"{path}, line {number}"))
    return addresses


def _client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The audit reads whatever certificate a unit serves, weak or not: no
    # verification, and OpenSSL's security level 0 so that a unit serving a
    # 1024-bit RSA key is seen (and reported) rather than refused.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
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
        self.addresses = tuple(addresses)
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
        if not der:
            return "it sent no certificate"
        return bytes(der)
