"""Shared-prime checks of RSA moduli, with products and remainders (gmpy2).

Two moduli that share a prime are both factored by one GCD, so every new
modulus is checked against every registered one. Pairwise GCDs would cost
O(n) GCDs per new key; instead the registry keeps the product of its moduli
(in buckets), and:

- one new modulus ``n`` costs one reduction of each bucket product modulo
  ``n`` and one GCD (:func:`shared_factor`);
- a batch of new moduli is checked at once with a product tree of the batch:
  the registry's product is reduced modulo the square of the batch's product
  and then pushed down a remainder tree, so that each new modulus ``n`` gets
  ``(P / n) mod n`` for ``P`` the product of everything else
  (:func:`batch_shared_factors`; Bernstein's batch GCD, as used by Heninger et
  al., "Mining your Ps and Qs", USENIX Security 2012).

This is the small part of batch GCD the factory needs; the fleet audit has its
own, built for tens of millions of moduli in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import gmpy2
from gmpy2 import mpz

__all__ = [
    "batch_shared_factors",
    "product",
    "product_tree",
    "shared_factor",
]


def product(values: Iterable[int]) -> mpz:
    """Return the product of ``values`` (1 for none), by a balanced tree."""
    level = [mpz(v) for v in values]
    if not level:
        return mpz(1)
    while len(level) > 1:
        pairs = [level[i] * level[i + 1] for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            pairs.append(level[-1])
        level = pairs
    return level[0]


def product_tree(values: Sequence[int]) -> list[list[mpz]]:
    """Return the levels of a product tree, leaves first, root last.

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("a product tree needs at least one value")
    levels = [[mpz(v) for v in values]]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append([below[i] * below[i + 1] for i in range(0, len(below) - 1, 2)])
        if len(below) % 2:
            levels[-1].append(below[-1])
    return levels


def shared_factor(modulus: int, registered: Iterable[mpz]) -> int:
    """Return ``gcd(modulus, product of registered)``: 1 means no shared prime.

    Args:
        modulus: the new RSA modulus.
        registered: the products of the registered moduli (buckets).
    """
    n = mpz(modulus)
    residue = mpz(1)
    for bucket in registered:
        residue = residue * (bucket % n) % n
    return int(gmpy2.gcd(residue, n))


def batch_shared_factors(moduli: Sequence[int], registered: Iterable[mpz]) -> list[int]:
    """Check a batch of new moduli against the registry and against each other.

    Args:
        moduli: the new moduli (distinct).
        registered: the products of the registered moduli (buckets).

    Returns:
        For each new modulus, its GCD with the product of every registered
        modulus and every other new one: 1 means no shared prime.
    """
    if not moduli:
        return []
    tree = product_tree(moduli)
    batch = tree[-1][0]
    square = batch * batch
    # P * Q mod Q^2, where P is the registry's product and Q the batch's.
    residue = mpz(1)
    for bucket in registered:
        residue = residue * (bucket % square) % square
    remainders = [residue * batch % square]
    for level in reversed(tree[:-1]):
        remainders = [remainders[i // 2] % (v * v) for i, v in enumerate(level)]
    # (X mod n^2) / n == (X / n) mod n, for X divisible by n.
    return [int(gmpy2.gcd(r // n, n)) for r, n in zip(remainders, tree[0], strict=True)]
