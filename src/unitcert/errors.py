"""The errors unitcert raises.

Every error a user can cause or meet derives from :class:`UnitcertError`, and
its message is one sentence that says what went wrong and what to do. The tree
is shallow, and each member carries the facts it is about::

    UnitcertError
    ├── InputError            a file or value given to us is unusable
    │   ├── CodeFormatError   a fingerprint code is malformed or mistyped
    │   └── DuplicateError    a serial or key is already in the maker's registry
    ├── StateError            the unit's state is missing, locked or damaged
    ├── EntropyError          the kernel's random pool never became ready
    ├── WeakKeyError          a key failed the weak-key checks
    ├── KeyMismatchError      a certificate and a private key do not belong together
    ├── ConnectError          a unit could not be reached over TLS
    ├── RegistryError         the maker's registry cannot be opened or written
    ├── AcmeError             an ACME CA refused, failed or could not be reached
    └── AuditError            the fleet audit could not finish (a worker died)

Errors raised by libraries are mapped to these at one boundary, with
``raise ... from exc``. Misuse by a programmer is ``ValueError`` or
``TypeError``, never one of these.
"""

from __future__ import annotations

import datetime as dt

__all__ = [
    "AcmeError",
    "AuditError",
    "CodeFormatError",
    "ConnectError",
    "DuplicateError",
    "EntropyError",
    "InputError",
    "KeyMismatchError",
    "RegistryError",
    "StateError",
    "UnitcertError",
    "WeakKeyError",
]


class UnitcertError(Exception):
    """The root of every error unitcert reports to a user."""


class InputError(UnitcertError):
    """A file, value or option given to unitcert cannot be used."""


class CodeFormatError(InputError):
    """A fingerprint code is malformed, or its check symbol says it was mistyped.

    Attributes:
        mistyped: True when the code has the right shape but a wrong check
            symbol, which almost always means a typo.
    """

    def __init__(self, message: str, *, mistyped: bool) -> None:
        super().__init__(message)
        self.mistyped = mistyped


class StateError(UnitcertError):
    """The unit's state directory is missing, locked by another writer, or damaged."""


class EntropyError(UnitcertError):
    """The kernel's random pool was not ready within the allowed time.

    Attributes:
        waited: seconds spent waiting before giving up.
    """

    def __init__(self, message: str, *, waited: float) -> None:
        super().__init__(message)
        self.waited = waited


class WeakKeyError(UnitcertError):
    """A key failed one or more weak-key checks.

    Attributes:
        findings: the names of the checks that flagged the key.
    """

    def __init__(self, message: str, *, findings: tuple[str, ...]) -> None:
        super().__init__(message)
        self.findings = findings


class KeyMismatchError(UnitcertError):
    """A certificate's public key is not the one of the given private key.

    Attributes:
        cert_code: the fingerprint code of the certificate's key.
        key_code: the fingerprint code of the private key.
    """

    def __init__(self, message: str, *, cert_code: str, key_code: str) -> None:
        super().__init__(message)
        self.cert_code = cert_code
        self.key_code = key_code


class ConnectError(UnitcertError):
    """A TLS connection to a unit could not be made.

    Attributes:
        address: the ``host:port`` that was tried.
    """

    def __init__(self, message: str, *, address: str) -> None:
        super().__init__(message)
        self.address = address


class DuplicateError(InputError):
    """A serial or a public key is already registered to a unit.

    Attributes:
        serial: the serial of the unit that already holds it.
    """

    def __init__(self, message: str, *, serial: str) -> None:
        super().__init__(message)
        self.serial = serial


class RegistryError(UnitcertError):
    """The maker's registry database cannot be opened, read or written."""


class AcmeError(UnitcertError):
    """An ACME order or request failed: the CA refused it, validation failed, or
    the CA could not be reached.

    Attributes:
        kind: what failed: ``network``, ``rate-limited``, ``authorization``,
            ``refused`` (the CA answered with another error), ``timeout`` or
            ``settings`` (the settings cannot work with this CA).
        retry_after: the earliest moment the CA allows another request
            (``Retry-After``), or None when it gave none.
        failed_identifiers: the identifiers whose authorization failed.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        retry_after: dt.datetime | None = None,
        failed_identifiers: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.failed_identifiers = failed_identifiers


class AuditError(UnitcertError):
    """The fleet audit could not finish: a worker process or the cluster failed."""
