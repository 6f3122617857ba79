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

The operands and the result stay in gmpy2's own numbers: the multiplication
reads the operands' limbs where they are and writes the result's limbs into
a new number, through the object layout gmpy2 publishes for C extensions
(``MPZ_Object`` in its ``gmpy2.h``: the object header, then GMP's ``mpz_t``).
Copying the numbers in and out instead costs about a fifth more time and
doubles the memory the largest numbers take. The layout is checked on a
known number before anything is written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gmpy2

__all__ = ["WrapMultiplier", "wrap_multiplier"]

logger = logging.getLogger(__name__)

_LIMB_BITS = 64
_LIMB = ctypes.c_uint64
_SIZE = ctypes.c_long
_SUPPORTED_MAJOR = 6
# Operand sizes (in limbs) for the self-test: below, around and above GMP's
# thresholds for the wrap-around product (about 10-30 limbs) and its FFT.
_SELF_TEST_LIMBS = (1, 3, 17, 40, 129, 700, 3000, 9000)


class _MpzStruct(ctypes.Structure):
    """GMP's ``__mpz_struct``: allocated limbs, signed used limbs, the limbs."""

    _fields_ = [
        ("alloc", ctypes.c_int),
        ("size", ctypes.c_int),
        ("limbs", ctypes.c_void_p),
    ]


class _MpzLayout:
    """Where a gmpy2 ``mpz`` keeps its ``mpz_t``: right after the object header."""

    def __init__(self, offset: int) -> None:
        self._offset = offset

    def struct(self, number: Any) -> _MpzStruct:
        """Return ``number``'s ``mpz_t``; valid while ``number`` is alive."""
        # On CPython, id() is the object's address.
        return _MpzStruct.from_address(id(number) + self._offset)


def _mpz_layout() -> _MpzLayout | None:
    """Return the ``mpz`` layout once it is confirmed on a known number."""
    if platform.python_implementation() != "CPython":
        return None
    offset = object.__basicsize__
    expected = offset + ctypes.sizeof(_MpzStruct) + ctypes.sizeof(ctypes.c_ssize_t)
    if type(gmpy2.mpz(0)).__basicsize__ != expected:
        return None
    layout = _MpzLayout(offset)
    probe = gmpy2.mpz(int.from_bytes(b"unitcert-limbs-probe", "little"))
    size = -(-int(gmpy2.num_digits(probe, 2)) // _LIMB_BITS)
    for number, signed in ((probe, size), (-probe, -size)):
        struct = layout.struct(number)
        if struct.size != signed or struct.alloc < size or not struct.limbs:
            return None
        stored = ctypes.string_at(struct.limbs, size * _LIMB_BITS // 8)
        if stored != int(probe).to_bytes(len(stored), "little"):
            return None
    return layout


class WrapMultiplier:
    """``a * b mod (2**N - 1)`` for big numbers, on GMP's ``mpn_mulmod_bnm1``.

    Get one from :func:`wrap_multiplier`, which checks the library first.
    """

    def __init__(self, multiply: Any, next_size: Any, layout: _MpzLayout) -> None:
        self._multiply = multiply
        self._next_size = next_size
        self._layout = layout

    def modulus_bits(self, at_least: int) -> int:
        """Return the ``N`` GMP computes fastest among those of ``at_least`` bits."""
        limbs = -(-at_least // _LIMB_BITS)
        return int(self._next_size(limbs)) * _LIMB_BITS

    def multiply(self, a: Any, b: Any, modulus_bits: int) -> Any:
        """Return ``c`` with ``c = a * b (mod 2**modulus_bits - 1)``, ``0 <= c < 2**N``.

        ``c`` may be ``2**N - 1`` where the product is a multiple of the
        modulus; callers that read bits of ``c`` treat that as the same class.

        Args:
            a: a non-negative integer of at most ``modulus_bits`` bits.
            b: the same.
            modulus_bits: ``N``, from :meth:`modulus_bits`.

        Raises:
            ValueError: an operand is negative or wider than ``N`` bits, or
                ``N`` is not a whole number of limbs.
        """
        if modulus_bits % _LIMB_BITS:
            raise ValueError("the modulus must be a whole number of 64-bit limbs")
        rn = modulus_bits // _LIMB_BITS
        first, second = gmpy2.mpz(a), gmpy2.mpz(b)
        if first < 0 or second < 0:
            raise ValueError("operands must not be negative")
        first_struct = self._layout.struct(first)
        second_struct = self._layout.struct(second)
        if first_struct.size > rn or second_struct.size > rn:
            raise ValueError("an operand is wider than the modulus")
        if first_struct.size < second_struct.size:
            first, second = second, first
            first_struct, second_struct = second_struct, first_struct
        an, bn = first_struct.size, second_struct.size
        if bn == 0:
            return gmpy2.mpz(0)
        if an + bn <= rn:
            # The whole product fits below the modulus.
            return first * second
        # A new number with room for rn limbs (bit N sets limb rn + 1), which
        # GMP's result overwrites; nothing else refers to it yet.
        result = gmpy2.bit_set(gmpy2.mpz(0), modulus_bits)
        result_struct = self._layout.struct(result)
        if result_struct.alloc < rn:
            raise RuntimeError("gmpy2 gave a number with fewer limbs than asked")
        scratch = (_LIMB * (2 * rn + 4))()
        # GMP's contract: 0 < bn <= an <= rn and an + bn > rn / 2.
        self._multiply(
            result_struct.limbs,
            rn,
            first_struct.limbs,
            an,
            second_struct.limbs,
            bn,
            scratch,
        )
        limbs = (_LIMB * rn).from_address(result_struct.limbs)
        used = rn
        while used and not limbs[used - 1]:
            used -= 1
        result_struct.size = used
        return result


@functools.cache
def wrap_multiplier() -> WrapMultiplier | None:
    """Return GMP's wrap-around multiplication, or ``None`` where it cannot be trusted.

    ``None`` when the GMP that gmpy2 uses cannot be found, is not GMP 6 with
    64-bit limbs, lacks the function, when gmpy2's numbers are not laid out
    as its ``gmpy2.h`` says, or when the self-test gives a wrong result.
    """
    layout = _mpz_layout()
    if layout is None:
        logger.debug("gmpy2's numbers are not laid out as expected: full products")
        return None
    library = _load_gmp()
    if library is None:
        return None
    try:
        version = ctypes.c_char_p.in_dll(library, "__gmp_version").value or b""
        limb_bits = ctypes.c_int.in_dll(library, "__gmp_bits_per_limb").value
        multiply = library.__gmpn_mulmod_bnm1
        next_size = library.__gmpn_mulmod_bnm1_next_size
    except (AttributeError, ValueError):
        logger.debug("GMP without a wrap-around multiplication: full products")
        return None
    major = version.split(b".")[0]
    if not major.isdigit() or int(major) != _SUPPORTED_MAJOR or limb_bits != 64:
        shown = version.decode(errors="replace")
        logger.debug(
            "GMP %s (%d-bit limbs) is not supported: full products", shown, limb_bits
        )
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
    candidate = WrapMultiplier(multiply, next_size, layout)
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
