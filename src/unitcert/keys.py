"""Key generation behind the entropy gate, key types, and the key-store seam.

A unit makes its keys only from the OS CSPRNG (through ``cryptography``), and
only after the kernel says its random pool is initialised: the 2012 "Mining
your Ps and Qs" study factored tens of thousands of device keys that were
generated at first boot before that point. Every new key is self-checked with
:mod:`unitcert.quality` before use; a weak key is discarded and logged.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from unitcert import quality
from unitcert.errors import EntropyError, InputError, WeakKeyError

__all__ = [
    "DEFAULT_ENTROPY_TIMEOUT",
    "FileKeyStore",
    "KeyStore",
    "KeyType",
    "PrivateKey",
    "describe_key",
    "generate_checked_key",
    "generate_key",
    "getrandom",
    "key_pem",
    "load_key_pem",
    "wait_for_entropy",
]

logger = logging.getLogger(__name__)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

DEFAULT_ENTROPY_TIMEOUT = 60.0
_WEAK_KEY_ATTEMPTS = 3

# The seam around the kernel's pool: tests replace this to simulate a pool
# that is not ready yet. It must behave like os.getrandom.
getrandom: Callable[[int, int], bytes] = os.getrandom


class KeyType(enum.Enum):
    """The key types a unit can make; the value is the name users type."""

    P256 = "p256"
    P384 = "p384"
    RSA2048 = "rsa2048"
    RSA3072 = "rsa3072"
    RSA4096 = "rsa4096"

    @classmethod
    def parse(cls, name: str) -> KeyType:
        """Return the key type called ``name``.

        Raises:
            InputError: no key type has that name.
        """
        try:
            return cls(name.lower())
        except ValueError:
            names = ", ".join(t.value for t in cls)
            raise InputError(
                f"unknown key type {name!r}: choose one of {names}"
            ) from None


def wait_for_entropy(
    timeout: float = DEFAULT_ENTROPY_TIMEOUT,
    *,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> None:
    """Wait until the kernel's random pool is initialised.

    ``getrandom(2)`` with ``GRND_NONBLOCK`` fails with EAGAIN until the pool
    has been seeded, which is exactly the question (getrandom(2), "EAGAIN").

    Args:
        timeout: the longest time to wait, in seconds.
        clock: a monotonic clock (default ``time.monotonic``).
        sleep: how to wait (default ``time.sleep``).

    Raises:
        EntropyError: the pool was still not ready after ``timeout`` seconds.
    """
    clock = clock or time.monotonic
    sleep = sleep or time.sleep
    start = clock()
    warned = False
    while True:
        try:
            getrandom(1, os.GRND_NONBLOCK)
            return
        except BlockingIOError:
            pass
        waited = clock() - start
        if waited >= timeout:
            raise EntropyError(
                f"the kernel's random pool was not ready after {waited:.0f} "
                "seconds, so no key was made: check that the unit has a "
                "hardware RNG or entropy daemon, or raise --entropy-timeout",
                waited=waited,
            )
        if not warned:
            logger.warning(
                "the kernel's random pool is not ready yet; waiting up to %.0f s "
                "before making a key",
                timeout,
            )
            warned = True
        sleep(min(0.25, max(timeout - waited, 0.0)))


def generate_key(key_type: KeyType) -> PrivateKey:
    """Make a new private key of ``key_type`` from the OS CSPRNG.

    Call :func:`wait_for_entropy` first; :func:`generate_checked_key` does both.
    """
    if key_type is KeyType.P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.P384:
        return ec.generate_private_key(ec.SECP384R1())
    bits = int(key_type.value.removeprefix("rsa"))
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def generate_checked_key(
    key_type: KeyType,
    *,
    entropy_timeout: float = DEFAULT_ENTROPY_TIMEOUT,
    generator: Callable[[KeyType], PrivateKey] = generate_key,
) -> PrivateKey:
    """Wait for entropy, make a key, and self-check it; retry a weak key.

    Args:
        key_type: the type of key to make.
        entropy_timeout: passed to :func:`wait_for_entropy`.
        generator: the function that makes a key (a seam for tests).

    Raises:
        EntropyError: the random pool never became ready.
        WeakKeyError: every attempt produced a weak key, which means the
            generator itself is broken.
    """
    wait_for_entropy(entropy_timeout)
    findings: tuple[quality.KeyFinding, ...] = ()
    for attempt in range(1, _WEAK_KEY_ATTEMPTS + 1):
        key = generator(key_type)
        findings = quality.check_key(key.public_key())
        if not findings:
            return key
        logger.warning(
            "discarded a newly made %s key (attempt %d of %d) because %s",
            key_type.value,
            attempt,
            _WEAK_KEY_ATTEMPTS,
            "; ".join(f.detail for f in findings),
        )
    raise WeakKeyError(
        f"{_WEAK_KEY_ATTEMPTS} keys in a row failed the weak-key checks, so the "
        "key generator cannot be trusted: do not ship this unit",
        findings=tuple(f.check for f in findings),
    )


def describe_key(public_key: quality.PublicKey) -> str:
    """Return a short name for a key, such as ``ECDSA P-256`` or ``RSA 3072``."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"ECDSA {curve.get(public_key.curve.name, public_key.curve.name)}"
    return type(public_key).__name__.removesuffix("PublicKey")


def key_pem(key: PrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM, for a 0600 file."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key_pem(data: bytes) -> PrivateKey:
    """Load an unencrypted PEM private key of a type a unit can serve.

    Raises:
        InputError: the data is not such a key.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError("the private key file is not a readable PEM key") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise InputError("the private key is neither RSA nor ECDSA")
    return key


class KeyStore(Protocol):
    """Where a key lives: it can give its public key and sign, but never hands
    out the private key unless it is a plain file.

    Files are the only store today; a TPM 2.0 store (the key is a
    ``TSS2 PRIVATE KEY`` blob) and a PKCS#11 store for the maker's CA fit
    behind the same seam: ``signing_key`` then returns an object that
    subclasses ``cryptography``'s private-key classes and signs on the device.
    """

    @property
    def location(self) -> str:
        """A URI-like description of where the key lives, for status output."""
        ...

    def public_key(self) -> quality.PublicKey:
        """Return the public key."""
        ...

    def signing_key(self) -> PrivateKey:
        """Return an object that ``cryptography``'s builders can sign with."""
        ...


@dataclass(frozen=True)
class FileKeyStore:
    """A key kept as an unencrypted PEM file of mode 0600.

    Attributes:
        path: the key file.
    """

    path: Path

    @property
    def location(self) -> str:
        """The key file as a ``file:`` URI."""
        return f"file:{self.path}"

    def public_key(self) -> quality.PublicKey:
        """Return the public key of the file's private key."""
        return self.signing_key().public_key()

    def signing_key(self) -> PrivateKey:
        """Load the private key from its file.

        Raises:
            InputError: the file is missing or not a PEM key.
        """
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise InputError(
                f"cannot read the key file {self.path}: {exc.strerror}"
            ) from exc
        return load_key_pem(data)
