"""Batch GCD: which RSA moduli share a prime with another one.

For every modulus ``n`` in a set, :func:`batch_gcd` returns
``gcd(n, product of all the other moduli)`` in quasi-linear time (Bernstein's
product tree and remainder tree, as in Heninger et al., "Mining your Ps and
Qs", USENIX Security 2012):

1. The product tree multiplies the moduli pairwise, level by level, up to
   their product ``P``.
2. The remainder tree walks back down. The classic tree keeps
   ``P mod node**2`` at each node; this one keeps the same information at half
   the size, ``(P / node) mod node`` (which is ``(P mod node**2) / node``),
   and near the top, where GMP's division is slowest, the scaled form
   ``frac(P / node**2)`` that needs multiplications only (see the remainder
   steps below).
3. At a leaf, ``gcd((P / n) mod n, n)`` is the GCD of ``n`` with the product
   of the others.

The work is split into groups (one per process). Each group builds its own
subtree; its remainders are then taken against the product of the *other*
groups: with ``r`` the group's product and ``q`` the others',
``(P / r) mod r = q mod r``. A group needs only its own subtree and ``q``, so
groups run in separate processes, or on Dask workers
(:mod:`unitcert.audit.distributed`), with the same results as one tree.

In memory, every other level of a group's tree is kept and the others are
recomputed on the way down. With ``spill``, every level is streamed to a
file in a work directory and read back one at a time, as the classic C
implementation (fastgcd) does, so that only the few numbers being worked on
are in memory.

The result for a modulus is 1 (nothing shared), a proper factor (the prime or
primes it shares), or the modulus itself (it shares every prime, or it was
given twice): :func:`split_shared` resolves the last case pairwise among the
moduli that have a hit.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import multiprocessing.connection
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gmpy2

from unitcert.quality.wrapmul import WrapMultiplier, wrap_multiplier

__all__ = [
    "GroupTree",
    "ProgressCallback",
    "SharedFactor",
    "batch_gcd",
    "build_group_tree",
    "descend_group_tree",
    "other_products",
    "plan_groups",
    "split_shared",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float], None]
"""Called as ``callback(stage, fraction)`` with the fraction of the stage done.

The stages are ``"product tree"`` and ``"remainder tree"``.
"""

PRODUCT_STAGE = "product tree"
REMAINDER_STAGE = "remainder tree"

_LENGTH = struct.Struct("<Q")
# Nodes of at least this many bits are walked with the scaled remainder tree
# (see _scaled_step): GMP's multiplication beats its division from about here.
# Above the upper bound the walk stays plain: the switch to scaled costs one
# division of three times the node's size, whose scratch space is the peak of
# the whole run (bench/batchgcd.py: 8.3 GiB at 1,000,000 moduli without the
# bound), so it is made where nodes are smaller; more so with levels on disk.
_SCALED_MIN_BITS = 1 << 15
_SCALED_MAX_BITS = 1 << 40
_SCALED_MAX_BITS_SPILLED = 1 << 26
_GUARD_BITS = 64
# Fractions of at least this many bits are multiplied modulo 2**N - 1
# (see _times_fraction); below, GMP's full product is as fast.
_WRAP_MIN_BITS = 1 << 14
# How many nodes a level processes between two progress reports.
_REPORT_EVERY = 2048


# --- where a group's levels live ----------------------------------------------


class _Levels:
    """A group's tree levels, kept in memory or streamed through files.

    Levels are read and written as streams in both cases, so the tree code is
    the same; on disk only the few numbers being worked on are in memory.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[str, list[Any]] = {}

    def write(self, name: str, numbers: Iterator[Any]) -> int:
        if self.directory is None:
            self._memory[name] = list(numbers)
            return len(self._memory[name])
        count = 0
        with (self.directory / name).open("wb", buffering=1 << 20) as handle:
            for number in numbers:
                data = gmpy2.to_binary(number)
                handle.write(_LENGTH.pack(len(data)))
                handle.write(data)
                count += 1
        return count

    def read(self, name: str) -> Iterator[Any]:
        if self.directory is None:
            yield from self._memory[name]
            return
        with (self.directory / name).open("rb", buffering=1 << 20) as handle:
            while header := handle.read(_LENGTH.size):
                (length,) = _LENGTH.unpack(header)
                yield gmpy2.from_binary(handle.read(length))

    def take(self, name: str) -> Iterator[Any]:
        """Read a level and release it; in memory, each number as it is read."""
        if self.directory is None:
            numbers = self._memory.pop(name)
            numbers.reverse()
            while numbers:
                yield numbers.pop()
            return
        yield from self.read(name)
        self.drop(name)

    def has(self, name: str) -> bool:
        if self.directory is None:
            return name in self._memory
        return (self.directory / name).exists()

    def drop(self, name: str) -> None:
        if self.directory is None:
            del self._memory[name]
        else:
            (self.directory / name).unlink()

    def nbytes(self) -> int:
        if self.directory is not None:
            return 0
        return sum(
            _BYTES_PER_NUMBER + int(gmpy2.num_digits(x, 2)) // 8
            for level in self._memory.values()
            for x in level
        )


_BYTES_PER_NUMBER = 32


class _Reporter:
    """Turns nodes done on a level into the fraction of a stage done."""

    def __init__(
        self, stage: str, leaves: int, depth: int, callback: ProgressCallback | None
    ):
        self._stage = stage
        self._leaves = leaves
        self._total = max(1, leaves * depth)
        self._done = 0.0
        self._callback = callback

    def count(self, items: Iterator[Any], width: int) -> Iterator[Any]:
        """Yield ``items`` (one level of ``width`` nodes), reporting as they go."""
        share = self._leaves / max(1, width)
        pending = 0
        for item in items:
            yield item
            pending += 1
            if pending == _REPORT_EVERY:
                self._advance(pending * share)
                pending = 0
        self._advance(pending * share)

    def _advance(self, amount: float) -> None:
        self._done += amount
        if self._callback is not None:
            self._callback(self._stage, min(1.0, self._done / self._total))


def _pairs(numbers: Iterator[Any]) -> Iterator[tuple[Any, ...]]:
    for first in numbers:
        second = next(numbers, None)
        yield (first,) if second is None else (first, second)


def _level_width(count: int, level: int) -> int:
    width = count
    for _ in range(level):
        width = (width + 1) // 2
    return width


# --- one group's subtree --------------------------------------------------------


@dataclass
class GroupTree:
    """The product tree of one group of moduli, in memory or in files.

    Attributes:
        count: how many moduli the group has.
        depth: how many levels sit above the leaves (0 for one modulus).
        root: the product of the group's moduli.
    """

    count: int
    depth: int
    root: Any
    _levels: _Levels

    def nbytes(self) -> int:
        """Return about how many bytes of memory the tree holds."""
        return self._levels.nbytes() + int(gmpy2.num_digits(self.root, 2)) // 8


def build_group_tree(
    moduli: Sequence[int],
    *,
    spill_dir: Path | None = None,
    progress: ProgressCallback | None = None,
) -> GroupTree:
    """Build the product tree of one group of moduli.

    Args:
        moduli: the group's moduli, at least one.
        spill_dir: when given, stream each level to a file in this existing
            folder instead of keeping the levels in memory.
        progress: called with the fraction of the product stage done.

    Returns:
        The tree; its ``root`` is the product of the moduli.

    Raises:
        ValueError: the group is empty.
        OSError: a level could not be written to ``spill_dir``.
    """
    if not moduli:
        raise ValueError("a group needs at least one modulus")
    count = len(moduli)
    depth = math.ceil(math.log2(count))
    levels = _Levels(spill_dir)
    reporter = _Reporter(PRODUCT_STAGE, count, depth, progress)

    width = levels.write("level-0", (gmpy2.mpz(n) for n in moduli))
    for level in range(depth):
        products = _products(levels.read(f"level-{level}"))
        width = levels.write(
            f"level-{level + 1}", reporter.count(products, (width + 1) // 2)
        )
        if levels.directory is None and 0 < level <= depth // 2:
            # In memory, keep the leaves and the upper half of the tree: the
            # descent rebuilds the lower half from the leaves once the upper
            # half is gone. Every level holds about the same number of bits,
            # so this halves the tree's memory, and the lower levels are the
            # cheap ones to rebuild (small numbers multiply fastest).
            levels.drop(f"level-{level}")

    root = next(levels.read(f"level-{depth}"))
    if depth:
        levels.drop(f"level-{depth}")
    return GroupTree(count, depth, root, levels)


def descend_group_tree(
    tree: GroupTree, others: Any, *, progress: ProgressCallback | None = None
) -> list[int]:
    """Walk one group's remainder tree and return each leaf's GCD.

    The tree's levels are released as the walk goes down, so a tree can be
    descended once.

    Args:
        tree: the group's product tree, from :func:`build_group_tree`.
        others: the product of every other group's moduli (1 when the group
            is the whole set), as from :func:`other_products`.
        progress: called with the fraction of the remainder stage done.

    Returns:
        For each modulus of the group, in order, its GCD with the product of
        all the other moduli of the whole set.

    Raises:
        OSError: a spilled level could not be read or written.
    """
    levels = tree._levels
    reporter = _Reporter(REMAINDER_STAGE, tree.count, tree.depth, progress)
    root_bits = int(gmpy2.num_digits(tree.root, 2))
    # Levels whose nodes are too big for the scaled walk's temporaries (the
    # memory-bounded mode) are walked plainly, as are those too small for it
    # to pay; see the remainder steps below.
    largest = _SCALED_MAX_BITS if levels.directory is None else _SCALED_MAX_BITS_SPILLED
    scaled = [
        level > 0
        and _SCALED_MIN_BITS <= root_bits // _level_width(tree.count, level) <= largest
        for level in range(tree.depth + 1)
    ]
    levels.write(f"rem-{tree.depth}", iter([_top(tree.root, others, scaled[-1])]))

    for level in range(tree.depth - 1, -1, -1):
        if not levels.has(f"level-{level}"):
            _rebuild(levels, level)
        step = _scaled_step if scaled[level + 1] else _plain_step
        remainders = step(
            levels.take(f"rem-{level + 1}"),
            levels.read("level-0") if level == 0 else levels.take(f"level-{level}"),
            keep_scaled=scaled[level],
        )
        width = _level_width(tree.count, level)
        if level == 0:
            leaves = levels.read("level-0")
            results = [
                int(gmpy2.gcd(r, n))
                for r, n in zip(reporter.count(remainders, width), leaves, strict=True)
            ]
            levels.drop("level-0")
        else:
            levels.write(f"rem-{level}", reporter.count(remainders, width))

    if tree.depth == 0:
        (remainder,) = levels.read("rem-0")
        (modulus,) = levels.read("level-0")
        levels.drop("rem-0")
        levels.drop("level-0")
        return [int(gmpy2.gcd(remainder, modulus))]
    return results


def _rebuild(levels: _Levels, level: int) -> None:
    """Recompute a dropped level and the dropped ones below it."""
    below = level - 1
    while not levels.has(f"level-{below}"):
        below -= 1
    for missing in range(below + 1, level + 1):
        levels.write(f"level-{missing}", _products(levels.read(f"level-{missing - 1}")))


# --- the remainder steps ----------------------------------------------------------
#
# Below a node T, the walk carries R = (P / T) mod T, the product of every
# other modulus reduced modulo T (the classic tree's (P mod T**2) / T, at
# half the size). For a child C with sibling S, P / C = (P / T) * S, so
# R_C = ((R_T mod C) * (S mod C)) mod C; at a leaf n, gcd(R_n, n) is the
# answer.
#
# Near the top, where numbers have millions of bits and GMP's division costs
# several multiplications, the walk carries instead the fraction
# y_T = frac(P / T**2) in fixed point (Bernstein's scaled remainder tree,
# "Scaled remainder trees", 2004): y_C = frac(y_T * S**2) takes one
# multiplication and no division, and R_C = round(y_C * C) mod C switches
# back. Each value keeps 2 * bits(T) + 64 fraction bits and is stored with a
# marker bit just above them, so its precision travels with it. Truncation
# errors are at most 2**(depth + 1) units of the last place, far below what
# the final rounding tolerates, and they are errors modulo 1, which is what
# the fraction is.


def _precision(node: Any) -> int:
    return 2 * int(gmpy2.num_digits(node, 2)) + _GUARD_BITS


def _top(root: Any, others: Any, scaled: bool) -> Any:
    reduced = gmpy2.mpz(others) % root
    if not scaled:
        return reduced
    # y_root = frac(P / root**2) = (others mod root) / root
    return _to_scaled(reduced, root)


def _to_scaled(remainder: Any, node: Any) -> Any:
    """Return ``remainder / node`` in fixed point, with its marker bit.

    The quotient is taken in two divisions of about twice the node's size
    rather than one of three times: the same work, with half the scratch
    space at the peak of the run.
    """
    bits = _precision(node)
    upper = bits // 2
    high, rest = gmpy2.t_divmod(remainder << upper, node)
    low = (rest << (bits - upper)) // node
    return (gmpy2.bit_set(high, upper) << (bits - upper)) | low


def _plain_step(
    parents: Iterator[Any], nodes: Iterator[Any], *, keep_scaled: bool
) -> Iterator[Any]:
    for parent, pair in zip(parents, _pairs(nodes), strict=True):
        if len(pair) == 1:
            # An odd node is its own parent: same product, same remainder.
            yield _to_scaled(parent, pair[0]) if keep_scaled else parent
            continue
        left, right = pair
        for node, sibling in ((left, right), (right, left)):
            remainder = ((parent % node) * (sibling % node)) % node
            # frac(P / node**2) == remainder / node
            yield _to_scaled(remainder, node) if keep_scaled else remainder


def _scaled_step(
    parents: Iterator[Any], nodes: Iterator[Any], *, keep_scaled: bool
) -> Iterator[Any]:
    wrap = wrap_multiplier()
    for parent, pair in zip(parents, _pairs(nodes), strict=True):
        bits = int(gmpy2.num_digits(parent, 2)) - 1
        for index, node in enumerate(pair):
            child_bits = _precision(node)
            if len(pair) == 2:
                sibling = pair[1 - index]
                value = _times_fraction(
                    parent, bits, sibling * sibling, bits - child_bits, wrap
                )
            else:
                value = gmpy2.f_mod_2exp(parent, bits) >> (bits - child_bits)
            if keep_scaled:
                yield gmpy2.bit_set(value, child_bits)
            else:
                remainder = (value * node + (gmpy2.mpz(1) << (child_bits - 1))) >> (
                    child_bits
                )
                yield remainder - node if remainder >= node else remainder


def _times_fraction(
    parent: Any, bits: int, factor: Any, cut: int, wrap: WrapMultiplier | None
) -> Any:
    """Return ``frac(y * factor)`` to ``bits - cut`` bits, ``y`` the parent's.

    ``y`` has ``bits`` fraction bits; the result is the fraction's top
    ``bits - cut`` bits, as an integer.

    Only the middle of the product matters: its top is the integer part and
    its bottom falls below the child's precision. A product modulo
    ``2**N - 1`` with ``N`` at least ``bits + 64`` keeps that middle whole:
    the part of the product above ``N`` (the parent's marker bit included)
    is added back at the bottom, where it is below ``2**(cut - 61)`` (the
    cut is at least twice the factor's root's size, less 2); it can carry
    one unit into the child's last place, an error the walk's guard bits
    absorb like a truncation.
    """
    if wrap is not None and bits >= _WRAP_MIN_BITS:
        product = wrap.multiply(parent, factor, wrap.modulus_bits(bits + _GUARD_BITS))
    else:
        product = gmpy2.f_mod_2exp(parent, bits) * factor
    return gmpy2.f_mod_2exp(product >> cut, bits - cut)


def _products(numbers: Iterator[Any]) -> Iterator[Any]:
    """Yield the products of consecutive pairs (an odd last number as it is)."""
    for pair in _pairs(numbers):
        yield pair[0] * pair[1] if len(pair) == 2 else pair[0]


def other_products(roots: Sequence[Any]) -> list[Any]:
    """Return, for each group's product, the product of all the other groups'.

    Uses prefix and suffix products, so two groups cost no multiplication.

    Args:
        roots: each group's product, in group order.

    Returns:
        One product per group; 1 for a single group.
    """
    prefix = [gmpy2.mpz(1)]
    for root in roots[:-1]:
        prefix.append(prefix[-1] * root)
    suffix = [gmpy2.mpz(1)]
    for root in reversed(roots[1:]):
        suffix.append(suffix[-1] * root)
    suffix.reverse()
    return [
        p if s == 1 else s if p == 1 else p * s
        for p, s in zip(prefix, suffix, strict=True)
    ]


def plan_groups(count: int, groups: int) -> list[range]:
    """Split ``count`` moduli into ``groups`` contiguous, balanced ranges.

    Raises:
        ValueError: ``groups`` is below 1.
    """
    if groups < 1:
        raise ValueError(f"groups must be at least 1, not {groups}")
    groups = max(1, min(groups, count))
    bounds = [count * i // groups for i in range(groups + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(groups)]


# --- running the groups ---------------------------------------------------------


def batch_gcd(
    moduli: Sequence[int],
    *,
    jobs: int = 1,
    spill: bool = False,
    workdir: Path | None = None,
    progress: ProgressCallback | None = None,
) -> list[int]:
    """Return, for each modulus, its GCD with the product of all the others.

    Args:
        moduli: the moduli, each above 1. A modulus given twice gets itself
            as its GCD: give each modulus once.
        jobs: how many processes to use; the moduli are split into that many
            groups (see the module docstring).
        spill: stream tree levels through files in ``workdir`` instead of
            keeping them in memory.
        workdir: the folder for spilled levels and for the numbers the
            processes exchange; the system's temporary folder by default.
        progress: called with ``(stage, fraction)`` as the work goes on.

    Returns:
        One GCD per modulus, in order: 1 when the modulus shares no prime.

    Raises:
        ValueError: ``jobs`` is below 1 or a modulus is below 2.
        OSError: the work directory cannot be written.
        BatchGCDWorkerError: a worker process failed or was killed (for
            instance by the kernel when memory ran out).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    if any(n < 2 for n in moduli):
        raise ValueError("every modulus must be at least 2")
    if not moduli:
        return []

    groups = plan_groups(len(moduli), jobs)
    if len(groups) == 1 and not spill:
        tree = build_group_tree(moduli, progress=progress)
        return descend_group_tree(tree, 1, progress=progress)

    with tempfile.TemporaryDirectory(prefix="unitcert-batchgcd-", dir=workdir) as tmp:
        exchange = Path(tmp)
        if len(groups) == 1:
            return _run_in_process(moduli, exchange, spill=spill, progress=progress)
        return _run_in_processes(
            moduli, groups, exchange, spill=spill, progress=progress
        )


class BatchGCDWorkerError(RuntimeError):
    """A batch GCD worker process failed or ended without its results.

    Attributes:
        exitcode: the process's exit code (negative: the signal that killed it).
    """

    def __init__(self, message: str, *, exitcode: int | None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


def _run_in_process(
    moduli: Sequence[int],
    exchange: Path,
    *,
    spill: bool,
    progress: ProgressCallback | None,
) -> list[int]:
    spill_dir = exchange / "group-0" if spill else None
    if spill_dir is not None:
        spill_dir.mkdir()
    tree = build_group_tree(moduli, spill_dir=spill_dir, progress=progress)
    return descend_group_tree(tree, 1, progress=progress)


def _save_number(path: Path, number: Any) -> None:
    with path.open("wb") as handle:
        handle.write(gmpy2.to_binary(number))


def _load_number(path: Path) -> Any:
    return gmpy2.from_binary(path.read_bytes())


def _group_worker(
    conn: multiprocessing.connection.Connection,
    index: int,
    exchange: str,
    spill: bool,
) -> None:
    """Run one group in a child process (see :func:`_run_in_processes`).

    The moduli arrive through ``conn`` (not as arguments, which the process
    object would keep alive); the roots and the other groups' products go
    through files in ``exchange``, which costs no pickled copies.
    """
    # Ctrl-C reaches the whole process group: the parent decides what to do
    # and ends its workers; a worker never prints its own KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    folder = Path(exchange)
    last = 0.0

    def report(stage: str, fraction: float) -> None:
        nonlocal last
        if fraction >= 1.0 or fraction - last >= 0.002:
            last = 0.0 if fraction >= 1.0 else fraction
            conn.send(("progress", index, stage, fraction))

    try:
        spill_dir = folder / f"group-{index}" if spill else None
        if spill_dir is not None:
            spill_dir.mkdir()
        tree = build_group_tree(conn.recv(), spill_dir=spill_dir, progress=report)
        _save_number(folder / f"root-{index}", tree.root)
        conn.send(("root", index))
        conn.recv()
        others = _load_number(folder / f"others-{index}")
        (folder / f"others-{index}").unlink()
        results = descend_group_tree(tree, others, progress=report)
        conn.send(("results", index, results))
    except (BrokenPipeError, EOFError, ConnectionResetError):
        # The parent has gone (interrupted, or failed elsewhere): nobody is
        # left to tell, and its clean-up ends this process.
        return
    except BaseException as exc:
        try:
            conn.send(
                (
                    "error",
                    index,
                    f"{type(exc).__name__}: {exc}",
                    isinstance(exc, OSError),
                )
            )
        except OSError:
            return
        raise


def _run_in_processes(
    moduli: Sequence[int],
    groups: list[range],
    exchange: Path,
    *,
    spill: bool,
    progress: ProgressCallback | None,
) -> list[int]:
    context = multiprocessing.get_context("spawn")
    workers: list[Any] = []
    connections: dict[Any, int] = {}
    finished = False
    try:
        for index, group in enumerate(groups):
            parent, child = context.Pipe()
            process = context.Process(
                target=_group_worker,
                args=(child, index, str(exchange), spill),
                name=f"unitcert-batchgcd-{index}",
                daemon=True,
            )
            process.start()
            child.close()
            workers.append(process)
            connections[parent] = index
            parent.send([int(moduli[i]) for i in group])
        results = _collect(
            moduli, groups, exchange, dict(connections), workers, progress
        )
        finished = True
        return results
    finally:
        for conn in connections:
            conn.close()
        for process in workers:
            # Done: the workers are exiting. Failed or interrupted: they
            # would compute on for nothing.
            if finished:
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()


def _collect(
    moduli: Sequence[int],
    groups: list[range],
    exchange: Path,
    connections: dict[Any, int],
    workers: list[Any],
    progress: ProgressCallback | None,
) -> list[int]:
    sizes = [len(g) for g in groups]
    fractions = {
        stage: [0.0] * len(groups) for stage in (PRODUCT_STAGE, REMAINDER_STAGE)
    }
    roots_ready: set[int] = set()
    results: dict[int, list[int]] = {}
    by_index = {index: conn for conn, index in connections.items()}

    while len(results) < len(groups):
        ready: list[Any] = multiprocessing.connection.wait(list(connections))
        for conn in ready:
            index = connections[conn]
            try:
                message: tuple[Any, ...] = conn.recv()
            except EOFError:
                workers[index].join(timeout=5)
                code = workers[index].exitcode
                raise BatchGCDWorkerError(
                    f"batch GCD worker {index} ended without its results "
                    f"(exit code {code})",
                    exitcode=code,
                ) from None
            kind = str(message[0])
            if kind == "progress":
                stage, fraction = str(message[2]), float(message[3])
                fractions[stage][index] = fraction
                if progress is not None:
                    done = sum(
                        f * s for f, s in zip(fractions[stage], sizes, strict=True)
                    )
                    progress(stage, done / len(moduli))
            elif kind == "root":
                roots_ready.add(index)
                if len(roots_ready) == len(groups):
                    _send_others(exchange, len(groups))
                    for other in by_index.values():
                        other.send("go")
            elif kind == "results":
                results[index] = list(message[2])
                del connections[conn]
            else:
                text, is_os_error = str(message[2]), bool(message[3])
                if is_os_error:
                    raise OSError(f"batch GCD worker {index} failed: {text}")
                raise BatchGCDWorkerError(
                    f"batch GCD worker {index} failed: {text}", exitcode=None
                )
    return [gcd for index in range(len(groups)) for gcd in results[index]]


def _send_others(exchange: Path, count: int) -> None:
    roots = [_load_number(exchange / f"root-{i}") for i in range(count)]
    for index, product in enumerate(other_products(roots)):
        _save_number(exchange / f"others-{index}", product)
    for index in range(count):
        (exchange / f"root-{index}").unlink()


# --- from GCDs to shared factors ------------------------------------------------


@dataclass(frozen=True)
class SharedFactor:
    """A factor that divides two or more of the moduli.

    Attributes:
        factor: the shared factor; a prime for two-prime RSA moduli, or the
            whole modulus when the same modulus was given more than once.
        indices: the positions of the moduli it divides, ascending.
        prime: whether ``factor`` is (probably) prime; every modulus in
            ``indices`` is then factored: ``factor`` and ``n // factor``.
    """

    factor: int
    indices: tuple[int, ...]
    prime: bool


def split_shared(moduli: Sequence[int], gcds: Sequence[int]) -> list[SharedFactor]:
    """Turn :func:`batch_gcd`'s results into the factors the moduli share.

    A GCD below its modulus splits the modulus at once. A GCD equal to its
    modulus (the modulus shares each of its primes with another one, or was
    given twice) is split pairwise against the other moduli that have a hit,
    which are few in any fleet worth shipping.

    Args:
        moduli: the moduli given to :func:`batch_gcd`.
        gcds: its results, in the same order.

    Returns:
        One entry per shared factor, sorted by the first modulus it divides;
        each lists every modulus the factor divides.

    Raises:
        ValueError: the two sequences differ in length.
    """
    if len(moduli) != len(gcds):
        raise ValueError("moduli and gcds must have the same length")
    hits = [i for i, g in enumerate(gcds) if g != 1]
    owners: dict[int, set[int]] = {}

    def own(factor: int, index: int) -> None:
        owners.setdefault(factor, set()).add(index)

    unresolved = []
    for i in hits:
        n, g = int(moduli[i]), int(gcds[i])
        if g < n:
            own(g, i)
            own(n // g, i)
        else:
            unresolved.append(i)
    for i in unresolved:
        n = int(moduli[i])
        for j in hits:
            if j == i:
                continue
            d = int(gmpy2.gcd(n, moduli[j]))
            if d == n:
                own(n, i)
                own(n, j)
            elif d > 1:
                own(d, i)
                own(n // d, i)
                own(d, j)

    shared = [
        SharedFactor(f, tuple(sorted(idx)), f != _whole(moduli, idx) and _is_prime(f))
        for f, idx in owners.items()
        if len(idx) > 1
    ]
    shared.sort(key=lambda s: (s.indices, s.factor))
    return shared


def _whole(moduli: Sequence[int], indices: set[int]) -> int:
    return int(moduli[min(indices)])


def _is_prime(value: int) -> bool:
    return bool(gmpy2.is_prime(value, 40))
