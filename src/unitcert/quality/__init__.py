"""Weak-key checks for one key.

:func:`check_key` runs badkeys' offline checks (small factors, Fermat-close
primes, ROCA, invalid parameters, the fixed list of publicly known shared
primes, ...) and unitcert's own blocklist of keys whose private halves are
public. badkeys' downloaded blocklists are used as well when ``badkeys
--update-bl`` has put them in its cache; without them badkeys' ``blocklist``
check ends the process, so it is only asked for when the files exist.

Shared primes *inside a fleet* are not a property of one key: batch GCD over
many moduli finds them (see the audit).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from importlib import resources

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from unitcert.errors import WeakKeyError

__all__ = [
    "MIN_RSA_BITS",
    "KeyFinding",
    "PublicKey",
    "check_key",
    "check_rsa_numbers",
    "require_strong_key",
    "spki_sha256",
]

logger = logging.getLogger(__name__)

PublicKey = (
    rsa.RSAPublicKey
    | ec.EllipticCurvePublicKey
    | ed25519.Ed25519PublicKey
    | ed448.Ed448PublicKey
)

MIN_RSA_BITS = 2048

# badkeys' default checks, less "blocklist" (needs a download, see above).
_BADKEYS_RSA_CHECKS = (
    "fermat",
    "roca",
    "rsainvalid",
    "rsapoly",
    "sharedprimes",
    "smalld",
    "smallfactors",
)

_DESCRIPTIONS = {
    "fermat": "its primes are so close that Fermat's method factors it",
    "roca": "it has the ROCA flaw of Infineon chips (CVE-2017-15361)",
    "rsainvalid": "its RSA parameters are invalid",
    "rsapoly": "its modulus has a byte pattern that allows polynomial factoring",
    "sharedprimes": "it shares a prime with publicly known keys",
    "smalld": "its private exponent is small enough for Wiener's attack",
    "smallfactors": "its modulus has a small prime factor",
    "blocklist": "it is on badkeys' list of compromised keys",
    "published": "it is a key published as an example, so its private half is public",
    "rsasize": f"it is an RSA key under {MIN_RSA_BITS} bits",
}


@dataclass(frozen=True)
class KeyFinding:
    """One reason a key is weak.

    Attributes:
        check: the short name of the check that flagged the key.
        detail: a sentence fragment a user can read, e.g. "its modulus has
            a small prime factor".
    """

    check: str
    detail: str


def spki_sha256(public_key: PublicKey) -> str:
    """Return the hex SHA-256 of the key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@functools.cache
def _published_keys() -> dict[str, str]:
    """Load unitcert's own blocklist: SPKI SHA-256 to the key's name."""
    text = resources.files(__package__).joinpath("blocklist.txt").read_text("ascii")
    entries = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            entries[digest] = name
    return entries


def _badkeys_blocklist_present() -> bool:
    from badkeys.utils import _cachedir

    cache = _cachedir()
    return all(
        os.path.exists(os.path.join(cache, name))
        for name in ("badkeysdata.json", "blocklist.dat")
    )


def _finding(check: str) -> KeyFinding:
    return KeyFinding(check, _DESCRIPTIONS.get(check, f"badkeys' {check} check"))


def check_key(public_key: PublicKey) -> tuple[KeyFinding, ...]:
    """Check one public key for known weaknesses.

    Args:
        public_key: the key to check.

    Returns:
        The findings, empty when the key passed every check.
    """
    import badkeys  # deferred: a unit only pays for it when it checks a key

    findings: list[KeyFinding] = []
    name = _published_keys().get(spki_sha256(public_key))
    if name is not None:
        findings.append(
            KeyFinding("published", f"{_DESCRIPTIONS['published']} ({name})")
        )

    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        findings.extend(check_rsa_numbers(numbers.n, numbers.e))

    if _badkeys_blocklist_present():
        result = badkeys.checkpubkey(
            public_key.public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            ).decode("ascii"),
            checks=["blocklist"],
        )
        if result.get("results"):
            findings.append(_finding("blocklist"))

    return tuple(findings)


def check_rsa_numbers(n: int, e: int) -> tuple[KeyFinding, ...]:
    """Check an RSA modulus and exponent, even ones ``cryptography`` refuses to load.

    Runs the RSA part of :func:`check_key` (size and badkeys' RSA checks),
    for keys read as bare numbers, such as one with an invalid exponent.

    Returns:
        The findings, empty when the numbers passed every check.
    """
    import badkeys

    findings = [_finding("rsasize")] if n.bit_length() < MIN_RSA_BITS else []
    results = set(badkeys.checkrsa(n, e=e, checks=_BADKEYS_RSA_CHECKS))
    invalid = _invalid_rsa(n, e)
    if invalid is not None:
        results.discard("rsainvalid")
        findings.append(KeyFinding("rsainvalid", invalid))
    findings.extend(_finding(check) for check in sorted(results))
    return tuple(findings)


def _invalid_rsa(n: int, e: int) -> str | None:
    """Say what makes ``(n, e)`` unusable as an RSA key that badkeys lets pass.

    An even exponent has no inverse modulo the even phi(n), so the key has no
    private half that works. A prime modulus is not looked for: the test is a
    modular exponentiation of the modulus's size (about 2 ms at 2048 bits,
    five times every other check together), too dear for a fleet audit.
    """
    if e < 3 or e % 2 == 0:
        return f"its RSA public exponent {e} is invalid (it must be odd and above 1)"
    return None


def require_strong_key(public_key: PublicKey) -> None:
    """Raise when :func:`check_key` finds anything.

    Raises:
        WeakKeyError: the key is weak; the message names every finding.
    """
    findings = check_key(public_key)
    if findings:
        reasons = "; ".join(f.detail for f in findings)
        raise WeakKeyError(
            f"the key is unsafe to use: {reasons}",
            findings=tuple(f.check for f in findings),
        )
