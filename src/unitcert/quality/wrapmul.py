"""Products modulo ``2**N - 1`` from GMP's wrap-around multiplication.

The scaled remainder tree (:mod:`unitcert.quality.batchgcd`) needs only the
middle bits of each product it forms: the bits above a fraction's precision
are its integer part and the bits below the child's precision are dropped. A
product modulo ``2**N - 1`` (a cyclic convolution) with ``N`` just above the
fraction's precision holds exactly those middle bits, disturbed only by a
small number added at the bottom, and GMP computes it with an FFT about half
the size of the full product's.

GMP has this multiplication (``mpn_mulmod_bnm1``, the core of its own FFT
products) but does not document it: it is exported by every GMP 6 build and
its interface has not changed since GMP 5.0, yet GMP reserves the right to
change it. So :func:`wrap_multiplier` loads it from the GMP that gmpy2 uses
only when that GMP's major version is 6, and only after a self-test against
full products over sizes on both sides of GMP's thresholds; otherwise it
returns ``None`` and callers use full products. Either way the results are
the same; only the time differs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gmpy2

__all__ = ["Operand", "WrapMultiplier", "wrap_multiplier"]

logger = logging.getLogger(__name__)

_LIMB_BITS = 64
_LIMB = ctypes.c_uint64
_SIZE = ctypes.c_long
_SUPPORTED_MAJOR = 6
# Operand sizes (in limbs) for the self-test: below, around and above GMP's
# thresholds for the wrap-around product (about 10-30 limbs) and its FFT.
_SELF_TEST_LIMBS = (1, 3, 17, 40, 129, 700, 3000, 9000)


class WrapMultiplier:
    """``a * b mod (2**N - 1)`` for big numbers, on GMP's ``mpn_mulmod_bnm1``.

    Get one from :func:`wrap_multiplier`, which checks the library first.
    """

    def __init__(self, multiply: Any, next_size: Any) -> None:
        self._multiply = multiply
        self._next_size = next_size

    def modulus_bits(self, at_least: int) -> int:
        """Return the ``N`` GMP computes fastest among those of ``at_least`` bits."""
        limbs = -(-at_least // _LIMB_BITS)
        return int(self._next_size(limbs)) * _LIMB_BITS

    def multiply(self, a: Any, b: Any, modulus_bits: int) -> Any:
        """Return ``c`` with ``c = a * b (mod 2**modulus_bits - 1)``, ``0 <= c < 2**N``.

        ``c`` may be ``2**N - 1`` where the product is a multiple of the
        modulus; callers that read bits of ``c`` treat that as the same class.

        Args:
            a: a non-negative integer of at most ``modulus_bits`` bits, or
                one prepared by :meth:`operand` to be used more than once.
            b: the same.
            modulus_bits: ``N``, from :meth:`modulus_bits`.

        Raises:
            ValueError: an operand is negative or wider than ``N`` bits, or
                ``N`` is not a whole number of limbs.
        """
        if modulus_bits % _LIMB_BITS:
            raise ValueError("the modulus must be a whole number of 64-bit limbs")
        rn = modulus_bits // _LIMB_BITS
        first, second = self.operand(a), self.operand(b)
        if first.limbs > rn or second.limbs > rn:
            raise ValueError("an operand is wider than the modulus")
        if first.limbs < second.limbs:
            first, second = second, first
        if second.limbs == 0:
            return gmpy2.mpz(0)
        if first.limbs + second.limbs <= rn:
            # The whole product fits below the modulus.
            return first.number() * second.number()
        # GMP's contract: 0 < bn <= an <= rn and an + bn > rn / 2.
        result = (_LIMB * rn)()
        scratch = (_LIMB * (2 * rn + 4))()
        self._multiply(
            result,
            rn,
            first.array,
            first.limbs,
            second.array,
            second.limbs,
            scratch,
        )
        del scratch
        return gmpy2.mpz.from_bytes(memoryview(result), "little")

    @staticmethod
    def operand(number: Any) -> Operand:
        """Return ``number`` as GMP limbs, for :meth:`multiply`.

        The copy is all that is kept: drop ``number`` to save its memory.

        Raises:
            ValueError: ``number`` is negative.
        """
        if isinstance(number, Operand):
            return number
        value = gmpy2.mpz(number)
        if value < 0:
            raise ValueError("operands must not be negative")
        limbs = -(-int(gmpy2.num_digits(value, 2)) // _LIMB_BITS) if value else 0
        array = (_LIMB * max(1, limbs)).from_buffer_copy(
            value.to_bytes(max(1, limbs) * _LIMB_BITS // 8, "little")
        )
        return Operand(limbs, array)


@dataclass(frozen=True)
class Operand:
    """A non-negative number as GMP limbs, least significant first.

    Attributes:
        limbs: how many limbs the number has (0 for zero).
        array: the limbs, a ctypes array of at least one limb.
    """

    limbs: int
    array: Any

    def number(self) -> Any:
        """Return the number as a gmpy2 ``mpz``."""
        return gmpy2.mpz.from_bytes(memoryview(self.array), "little")


@functools.cache
def wrap_multiplier() -> WrapMultiplier | None:
    """Return GMP's wrap-around multiplication, or ``None`` where it cannot be trusted.

    ``None`` when the GMP that gmpy2 uses cannot be found, is not GMP 6, lacks
    the function, or gives a wrong result in the self-test.
    """
    library = _load_gmp()
    if library is None:
        return None
    try:
        version = ctypes.c_char_p.in_dll(library, "__gmp_version").value or b""
        multiply = library.__gmpn_mulmod_bnm1
        next_size = library.__gmpn_mulmod_bnm1_next_size
    except (AttributeError, ValueError):
        logger.debug("GMP without a wrap-around multiplication: full products")
        return None
    major = version.split(b".")[0]
    if not major.isdigit() or int(major) != _SUPPORTED_MAJOR:
        shown = version.decode(errors="replace")
        logger.debug("GMP %s is not GMP 6: full products", shown)
        return None
    multiply.restype = None
    multiply.argtypes = [
        ctypes.c_void_p,
        _SIZE,
        ctypes.c_void_p,
        _SIZE,
        ctypes.c_void_p,
        _SIZE,
        ctypes.c_void_p,
    ]
    next_size.restype = _SIZE
    next_size.argtypes = [_SIZE]
    candidate = WrapMultiplier(multiply, next_size)
    if not _self_test(candidate.multiply, candidate.modulus_bits):
        logger.warning("GMP's wrap-around multiplication failed its self-test")
        return None
    return candidate


def _load_gmp() -> Any:
    """Load the GMP library gmpy2 uses: its wheel's copy, else the system's."""
    package = Path(gmpy2.__file__).resolve().parent
    bundled = sorted((package.parent / "gmpy2.libs").glob("libgmp*.so*"))
    candidates = [str(path) for path in bundled]
    system = ctypes.util.find_library("gmp")
    if system:
        candidates.append(system)
    for name in candidates:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _self_test(
    multiply: Callable[[Any, Any, int], Any], modulus_bits: Callable[[int], int]
) -> bool:
    state = gmpy2.random_state(0x5EED)
    for limbs in _SELF_TEST_LIMBS:
        n = modulus_bits(limbs * _LIMB_BITS)
        modulus = (gmpy2.mpz(1) << n) - 1
        for a_bits, b_bits in ((n, n // 2 + 65), (n - 3, n - 70), (n, n)):
            a = gmpy2.mpz_urandomb(state, a_bits)
            b = gmpy2.mpz_urandomb(state, max(1, min(n, b_bits))) | 1
            got = multiply(a, b, n)
            if got % modulus != (a * b) % modulus or not 0 <= got <= modulus:
                return False
    return True
