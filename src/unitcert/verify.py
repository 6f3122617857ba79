"""The customer's check of a live unit against the code on its sticker.

Browsers hide certificate details, so ``unitcert verify`` connects to the
unit, computes the fingerprint code of the key it serves, and compares it with
the code the customer typed. With a root certificate it also checks the chain
to the maker's root and the unit's name, the way a browser that trusts that
root would (OpenSSL's verifier through Python's ``ssl``): the name checked is
the one given, else the host connected to (a DNS name, or an IP address
against the certificate's IP addresses).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from unitcert.code import FingerprintCode, code_for_spki, parse_code, spki_from_cert_der
from unitcert.errors import ConnectError, InputError

__all__ = [
    "DEFAULT_PORT",
    "Outcome",
    "VerifyResult",
    "check_server_name",
    "fetch_leaf_der",
    "format_address",
    "load_roots",
    "parse_address",
    "verify_unit",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 443
_MAX_NAME_LENGTH = 253
_MAX_LABEL_LENGTH = 63
_LABEL_RE = re.compile(r"[A-Za-z0-9_-]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_DOTTED_NUMBERS_RE = re.compile(r"[0-9.]+")
_MAX_ROOT_BYTES = 1024 * 1024
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, _EMAIL_MISMATCH and _IP_ADDRESS_MISMATCH
# (include/openssl/x509_vfy.h): the chain verified, the name did not.
_NAME_MISMATCH_CODES = frozenset({62, 63, 64})
_ADDRESS_EXAMPLES = "like 192.168.1.20:8443, unit.example.com or [fe80::1]:8443"


class Outcome(enum.Enum):
    """How a check ended; the value is the command's exit code (DESIGN.md)."""

    MATCH = 0
    MISMATCH = 1
    UNTRUSTED = 4


@dataclass(frozen=True)
class VerifyResult:
    """The result of checking one unit.

    Attributes:
        address: ``host:port`` that was checked (IPv6 in brackets).
        expected: the code the customer gave.
        served: the code of the key the unit served.
        outcome: match, mismatch, or untrusted chain or name.
        trust_error: why the chain or name check failed, when it did.
        checked_name: the name checked against the roots, when they were given.
        name_mismatch: True when the chain verified but not for ``checked_name``.
    """

    address: str
    expected: FingerprintCode
    served: FingerprintCode
    outcome: Outcome
    trust_error: str | None = None
    checked_name: str | None = None
    name_mismatch: bool = False


def _shown(text: str) -> str:
    """Quote ``text`` for a message, shortened when it is too long to read."""
    if len(text) > 60:
        return f"{text[:40]!r}... ({len(text)} characters)"
    return repr(text)


def _clause(text: str) -> str:
    """Return an error text fit to sit inside our sentence (no closing period)."""
    return text.strip().rstrip(".")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _dns_name_problem(name: str) -> str | None:
    """Say why ``name`` (ASCII, no trailing dot) is not a DNS host name, or None."""
    if len(name) > _MAX_NAME_LENGTH:
        return (
            f"it is {len(name)} characters long, and a DNS name has at most "
            f"{_MAX_NAME_LENGTH}"
        )
    if _DOTTED_NUMBERS_RE.fullmatch(name):
        return "it is not a valid IPv4 address"
    for label in name.split("."):
        if not label:
            return "it has an empty part (a leading dot, or two dots in a row)"
        if len(label) > _MAX_LABEL_LENGTH:
            return (
                f"its part {_shown(label)} is {len(label)} characters long, and a "
                f"DNS label has at most {_MAX_LABEL_LENGTH}"
            )
        if not _LABEL_RE.fullmatch(label):
            return (
                f"its part {_shown(label)} has characters that no host name has "
                "(use letters, digits, hyphens and dots)"
            )
    return None


def _ascii_host(host: str) -> tuple[str, str | None]:
    """Return the host in ASCII (IDNA for other scripts) and why it is unusable."""
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if not host:
        return host, "it is empty"
    if _is_ip(host):
        return host, None
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return host, "it is not a valid internationalised host name"
    return host, _dns_name_problem(host)


def _bad_address(address: str, why: str) -> ConnectError:
    return ConnectError(
        f"cannot use the address {_shown(address)}: {why}", address=address
    )


def _parse_port(address: str, text: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise _bad_address(
            address, f"the port {_shown(text)} is not a number from 1 to 65535"
        )
    return int(text)


def _split_host_port(address: str, text: str) -> tuple[str, int]:
    if text.startswith("["):
        closing = text.find("]")
        if closing < 0:
            raise _bad_address(
                address, "it opens '[' without closing it: write IPv6 like [::1]:8443"
            )
        host, rest = text[1:closing], text[closing + 1 :]
        if not _is_ipv6(host):
            raise _bad_address(
                address,
                f"{_shown(host)} is not an IPv6 address, and brackets are only for "
                "IPv6 addresses",
            )
        if not rest:
            return host, DEFAULT_PORT
        if not rest.startswith(":"):
            raise _bad_address(address, "the text after ']' is not ':PORT'")
        return host, _parse_port(address, rest[1:])

    colons = text.count(":")
    if colons == 0:
        return text, DEFAULT_PORT
    if colons == 1:
        host, port_text = text.split(":")
        if not host:
            raise _bad_address(address, f"it has no host: give one {_ADDRESS_EXAMPLES}")
        return host, _parse_port(address, port_text)

    head, _, tail = text.rpartition(":")
    if _PORT_RE.fullmatch(tail) and _is_ipv6(head):
        raise _bad_address(
            address,
            f"an IPv6 address with a port needs brackets: write [{head}]:{tail} for "
            f"port {tail}, or [{text}] for that address on port {DEFAULT_PORT}"
            if _is_ipv6(text)
            else f"an IPv6 address with a port needs brackets: write [{head}]:{tail}",
        )
    if _is_ipv6(text):
        return text, DEFAULT_PORT
    raise _bad_address(
        address,
        f"it is neither HOST[:PORT] nor an IPv6 address: give one {_ADDRESS_EXAMPLES}",
    )


def parse_address(address: str) -> tuple[str, int]:
    """Read the unit's address as a customer may give it.

    Accepted: ``HOST``, ``HOST:PORT``, ``[IPv6]``, ``[IPv6]:PORT``, a bare IPv6
    address (port 443), and the URL that ``device serve`` prints
    (``https://HOST:PORT/``, any path ignored). Surrounding whitespace is
    ignored; the port defaults to 443. A host name in another script is
    returned in its IDNA (ASCII) form, without a trailing dot.

    Raises:
        ConnectError: the address cannot be used (empty, no host, a port that
            is not 1 to 65535, an invalid host name, an ``http://`` URL, or an
            IPv6 address with a port but without brackets): there is nothing
            to connect to.
    """
    text = address.strip()
    if not text:
        raise _bad_address(
            address, f"it is empty: give the unit's address, {_ADDRESS_EXAMPLES}"
        )
    scheme, separator, rest = text.partition("://")
    if separator:
        if scheme.lower() == "http":
            raise _bad_address(
                address,
                "it is a plain-HTTP URL, and the unit's code is checked on its HTTPS "
                "port: give the https:// address that 'device serve' prints",
            )
        if scheme.lower() != "https":
            raise _bad_address(
                address, f"only https:// URLs lead to the unit, not {scheme}://"
            )
        text = rest
    text = re.split(r"[/?#]", text, maxsplit=1)[0].rpartition("@")[2]
    if not text:
        raise _bad_address(address, f"it has no host: give one {_ADDRESS_EXAMPLES}")

    given, port = _split_host_port(address, text)
    host, problem = _ascii_host(given)
    if problem is not None:
        where = "" if given == address.strip() else f"its host {_shown(given)}: "
        raise _bad_address(address, where + problem)
    return host, port


def check_server_name(name: str) -> str:
    """Return ``name`` ready to send as SNI and to check: a DNS name or an IP address.

    Surrounding whitespace and one trailing dot are dropped, and a name in
    another script is returned in its IDNA (ASCII) form.

    Raises:
        InputError: the name is empty or is not a valid host name.
    """
    text = name.strip()
    if text.startswith("[") and text.endswith("]") and _is_ipv6(text[1:-1]):
        text = text[1:-1]
    if not text:
        raise InputError(
            "the name is empty: give the unit's DNS name, like "
            "ab12.router.example.com, or leave the name out"
        )
    checked, problem = _ascii_host(text)
    if problem is not None:
        raise InputError(
            f"the name {_shown(name)} is not a host name: {problem}; give the "
            "unit's DNS name, like ab12.router.example.com"
        )
    return checked


def format_address(host: str, port: int) -> str:
    """Return ``host:port``, with an IPv6 host in brackets (``[::1]:8443``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_roots(ca_path: Path) -> ssl.SSLContext:
    """Return a TLS client context that trusts only the root(s) in ``ca_path``.

    The context checks the chain and the host name; the file holds one or
    more certificates in PEM, or one in DER.

    Raises:
        InputError: the file cannot be read or holds no certificate; the
            message names the file.
    """
    try:
        with ca_path.open("rb") as handle:
            data = handle.read(_MAX_ROOT_BYTES + 1)
    except OSError as exc:
        raise InputError(
            f"cannot read the root certificate {ca_path} ({exc.strerror or exc}): "
            "give the maker's root certificate file (PEM or DER)"
        ) from None
    if len(data) > _MAX_ROOT_BYTES:
        raise InputError(
            f"the root certificate file {ca_path} is over 1 MiB: give the maker's "
            "root certificate (PEM or DER)"
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if b"-----BEGIN" in data:
            context.load_verify_locations(cadata=data.decode("ascii"))
        else:
            context.load_verify_locations(cadata=data)
    except (ssl.SSLError, ValueError) as exc:
        logger.debug("cannot load %s as roots: %s", ca_path, exc)
        raise InputError(
            f"{ca_path} holds no certificate that can be the maker's root: give "
            "the maker's root certificate (PEM or DER)"
        ) from None
    return context


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    address = format_address(host, port)
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise ConnectError(
            f"no answer from {address} within {timeout:g} s: check the address and "
            "that the unit is on",
            address=address,
        ) from None
    except OSError as exc:
        raise ConnectError(
            f"cannot connect to {address} ({_clause(exc.strerror or str(exc))}): "
            "check the address and that the unit is on",
            address=address,
        ) from None


def fetch_leaf_der(
    host: str, port: int, *, servername: str | None, timeout: float
) -> bytes:
    """Complete a TLS handshake without trusting anything and return the leaf (DER).

    Raises:
        ConnectError: no connection, or the peer does not speak TLS.
    """
    address = format_address(host, port)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock = _connect(host, port, timeout)
    try:
        with context.wrap_socket(sock, server_hostname=servername) as tls:
            der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise ConnectError(
            f"{address} accepted a connection but no TLS handshake "
            f"({_clause(str(exc))}): is this the unit's HTTPS port?",
            address=address,
        ) from None
    if not der:
        raise ConnectError(
            f"{address} sent no certificate: is this the unit's HTTPS port?",
            address=address,
        )
    return der


@dataclass(frozen=True)
class _TrustProblem:
    reason: str
    name_mismatch: bool


def _check_trust(
    host: str, port: int, *, name: str, roots: ssl.SSLContext, timeout: float
) -> _TrustProblem | None:
    """Return None when the chain verifies with ``roots`` for ``name``, else why not."""
    sock = _connect(host, port, timeout)
    try:
        with roots.wrap_socket(sock, server_hostname=name):
            return None
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason or str(exc)
        return _TrustProblem(_clause(reason), exc.verify_code in _NAME_MISMATCH_CODES)
    except (ssl.SSLError, OSError) as exc:
        return _TrustProblem(_clause(str(exc)), name_mismatch=False)
    finally:
        sock.close()


def verify_unit(
    address: str,
    code: FingerprintCode | str,
    *,
    servername: str | None = None,
    roots: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> VerifyResult:
    """Check the unit at ``address`` against the code from its sticker.

    Args:
        address: ``HOST[:PORT]`` or a URL (see :func:`parse_address`); the
            port defaults to 443.
        code: the code, parsed or as the customer typed it.
        servername: the SNI to send and, with ``roots``, the name to check;
            by default the host of ``address``, as a browser would.
        roots: the maker's root(s), from :func:`load_roots`: also check the
            chain and the name.
        timeout: seconds for connecting and for the handshake.

    Raises:
        CodeFormatError: the code is malformed or mistyped (checked before
            anything is sent).
        InputError: ``servername`` is not a host name.
        ConnectError: the address is unusable, or the unit cannot be reached
            or speaks no TLS.
    """
    expected = code if isinstance(code, FingerprintCode) else parse_code(code)
    host, port = parse_address(address)
    name = check_server_name(servername) if servername is not None else None
    where = format_address(host, port)
    # The host without an IPv6 zone: what a browser checks the certificate for.
    checked = name if name is not None else host.partition("%")[0]

    der = fetch_leaf_der(host, port, servername=checked, timeout=timeout)
    served = code_for_spki(spki_from_cert_der(der))
    logger.debug("%s serves a key with code %s", where, served)
    if served != expected:
        return VerifyResult(where, expected, served, Outcome.MISMATCH)

    if roots is None:
        return VerifyResult(where, expected, served, Outcome.MATCH)
    problem = _check_trust(host, port, name=checked, roots=roots, timeout=timeout)
    if problem is not None:
        return VerifyResult(
            where,
            expected,
            served,
            Outcome.UNTRUSTED,
            trust_error=problem.reason,
            checked_name=checked,
            name_mismatch=problem.name_mismatch,
        )
    return VerifyResult(where, expected, served, Outcome.MATCH, checked_name=checked)
