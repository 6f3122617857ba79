"""Helpers shared by the factory tests: a prime pool for RSA keys, CSRs, a CA.

Not a test module of its own (it holds no tests); the factory tests import it.
"""

from __future__ import annotations

import random
from pathlib import Path

import gmpy2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from unitcert import certs, keys
from unitcert.factory.ca import FactoryCa, init_factory

PASSPHRASE = b"factory test passphrase"
DOMAIN = "example.com"
PRODUCT = "router"

_rng = random.Random(20261203)
_primes: list[int] = []


def pool_prime(index: int) -> int:
    """The ``index``-th prime of a pool made once per session (1024 bits each)."""
    while len(_primes) <= index:
        # The top two bits set make the product of two of them exactly 2048 bits.
        candidate = _rng.getrandbits(1024) | (3 << 1022) | 1
        prime = int(gmpy2.next_prime(candidate))
        if (prime - 1) % 65537:  # else e = 65537 has no inverse
            _primes.append(prime)
    return _primes[index]


def rsa_key_from_primes(p: int, q: int, e: int = 65537) -> rsa.RSAPrivateKey:
    """Build an RSA private key from two pool primes (no key generation)."""
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=rsa.rsa_crt_dmp1(d, p),
        dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q),
        public_numbers=rsa.RSAPublicNumbers(e, p * q),
    )
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


def pool_rsa_key(i: int, j: int) -> rsa.RSAPrivateKey:
    """An RSA-2048 key whose primes are pool primes ``i`` and ``j``."""
    return rsa_key_from_primes(pool_prime(i), pool_prime(j))


def ec_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key."""
    return ec.generate_private_key(ec.SECP256R1())


def hostname(serial: str) -> str:
    """The test factory's name for ``serial``."""
    return f"{serial}.{PRODUCT}.{DOMAIN}"


def csr_pem(key: keys.PrivateKey, serial: str) -> bytes:
    """A CSR like the one a unit makes, for ``serial`` of the test factory."""
    csr = certs.build_csr(key, [hostname(serial)], serial_number=serial)
    return csr.public_bytes(serialization.Encoding.PEM)


def make_factory(directory: Path) -> FactoryCa:
    """A fresh test factory in ``directory``."""
    return init_factory(
        directory, domain=DOMAIN, product=PRODUCT, passphrase=PASSPHRASE
    )
