"""The customer's check of a live unit against the code on its sticker.

Browsers hide certificate details, so ``unitcert verify`` connects to the
unit, computes the fingerprint code of the key it serves, and compares it with
the code the customer typed. With ``--ca`` it also checks the chain to the
maker's root and the unit's name, the way a browser that trusts that root
would (OpenSSL's verifier through Python's ``ssl``).
"""

from __future__ import annotations

import enum
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from unitcert.code import FingerprintCode, code_for_spki, parse_code, spki_from_cert_der
from unitcert.errors import ConnectError, InputError

__all__ = [
    "Outcome",
    "VerifyResult",
    "fetch_leaf_der",
    "parse_address",
    "verify_unit",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 443


class Outcome(enum.Enum):
    """How a check ended; the value is the command's exit code (DESIGN.md)."""

    MATCH = 0
    MISMATCH = 1
    UNTRUSTED = 4


@dataclass(frozen=True)
class VerifyResult:
    """The result of checking one unit.

    Attributes:
        address: ``host:port`` that was checked.
        expected: the code the customer gave.
        served: the code of the key the unit served.
        outcome: match, mismatch, or untrusted chain or name.
        trust_error: why the chain or name check failed, when it did.
    """

    address: str
    expected: FingerprintCode
    served: FingerprintCode
    outcome: Outcome
    trust_error: str | None = None


def parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST[:PORT]`` (IPv6 in brackets: ``[::1]:8443``).

    Raises:
        InputError: the port is not a number from 1 to 65535, or the host is empty.
    """
    host, port_text = address, ""
    if address.startswith("["):
        closing = address.find("]")
        if closing < 0:
            raise InputError(f"the address {address!r} opens '[' without closing it")
        host, rest = address[1:closing], address[closing + 1 :]
        if rest and not rest.startswith(":"):
            raise InputError(
                f"the address {address!r} has text after ']' that is not a port"
            )
        port_text = rest[1:]
    elif address.count(":") == 1:
        host, port_text = address.split(":")
    if not host:
        raise InputError(f"the address {address!r} has no host")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InputError(f"the port in {address!r} must be a number from 1 to 65535")
    return host, int(port_text)


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    address = f"{host}:{port}"
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
            f"cannot connect to {address} ({exc.strerror or exc}): check the address "
            "and that the unit is on",
            address=address,
        ) from None


def fetch_leaf_der(
    host: str, port: int, *, servername: str | None, timeout: float
) -> bytes:
    """Complete a TLS handshake without trusting anything and return the leaf (DER).

    Raises:
        ConnectError: no connection, or the peer does not speak TLS.
    """
    address = f"{host}:{port}"
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
            f"{address} accepted a connection but no TLS handshake ({exc}): is this "
            "the unit's HTTPS port?",
            address=address,
        ) from None
    if not der:
        raise ConnectError(f"{address} sent no certificate", address=address)
    return der


def _check_trust(
    host: str, port: int, *, name: str | None, ca_path: Path, timeout: float
) -> str | None:
    """Return None when the chain verifies to ``ca_path`` for ``name``, else why not."""
    try:
        context = ssl.create_default_context(cafile=str(ca_path))
    except (ssl.SSLError, OSError) as exc:
        raise InputError(
            f"cannot use {ca_path} as the maker's root: {exc}; give the root "
            "certificate in PEM"
        ) from None
    context.check_hostname = name is not None
    sock = _connect(host, port, timeout)
    try:
        with context.wrap_socket(sock, server_hostname=name):
            return None
    except ssl.SSLCertVerificationError as exc:
        return str(exc.verify_message or exc.reason or exc)
    except (ssl.SSLError, OSError) as exc:
        return str(exc)
    finally:
        sock.close()


def verify_unit(
    address: str,
    code_text: str,
    *,
    servername: str | None = None,
    ca_path: Path | None = None,
    timeout: float = 10.0,
) -> VerifyResult:
    """Check the unit at ``address`` against the code from its sticker.

    Args:
        address: ``HOST[:PORT]``; the port defaults to 443.
        code_text: the code as the customer typed it.
        servername: the SNI to send and, with ``ca_path``, the name to check.
        ca_path: the maker's root certificate (PEM) to check the chain against.
        timeout: seconds for connecting and for the handshake.

    Raises:
        CodeFormatError: the code is malformed or mistyped (checked before
            anything is sent).
        InputError: the address is malformed.
        ConnectError: the unit cannot be reached or speaks no TLS.
    """
    expected = parse_code(code_text)
    host, port = parse_address(address)
    where = f"{host}:{port}"

    der = fetch_leaf_der(host, port, servername=servername, timeout=timeout)
    served = code_for_spki(spki_from_cert_der(der))
    logger.debug("%s serves a key with code %s", where, served)
    if served != expected:
        return VerifyResult(where, expected, served, Outcome.MISMATCH)

    if ca_path is not None:
        problem = _check_trust(
            host, port, name=servername, ca_path=ca_path, timeout=timeout
        )
        if problem is not None:
            return VerifyResult(where, expected, served, Outcome.UNTRUSTED, problem)
    return VerifyResult(where, expected, served, Outcome.MATCH)
