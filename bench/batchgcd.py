"""Benchmark: batch GCD wall time and peak memory over 2048-bit moduli.

    .venv/bin/python bench/batchgcd.py                       # 10k and 100k, 2 jobs
    .venv/bin/python bench/batchgcd.py --sizes 1000000       # the 1M run
    .venv/bin/python bench/batchgcd.py --sizes 1000000 --spill   # levels on disk
    .venv/bin/python bench/batchgcd.py --sizes 1000000 --peer-sizes 1000000

Each size runs in a fresh process, so that its peak memory (the process and
its workers together, sampled from /proc every 50 ms) is its own. The run
checks that the batch GCD finds exactly the planted shared primes, and the
report ends with the growth exponent between sizes and the pairwise-GCD
baseline at 2,000 moduli.

The moduli: a pool of random 1024-bit primes cannot give a million moduli
that share nothing (each pool prime would sit in many moduli), and a fresh
1024-bit prime costs about 13 ms, which is hours for two million. So the
"good" moduli are each the product of 64 distinct primes just above 2**32,
from a sieve (each prime used once: no two moduli share a factor), which
gives 2049-bit numbers; the batch GCD's cost depends only on their
sizes. The planted ones are real RSA-2048 moduli from a small pool of
1024-bit primes: pairs that share one prime, and one modulus that shares
both of its primes with two others.

The peer in the same run is the plain tree the issue names: one process,
gmpy2's product tree, then ``P mod n**2`` down the remainder tree with gmpy2's
division (what a straightforward implementation does), at ``--peer-sizes``.
The C reference (fastgcd) is not in any package registry; the maintainers
run it side by side on the same machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from itertools import compress
from pathlib import Path

import gmpy2

from unitcert.quality.batchgcd import batch_gcd, split_shared

_PRIMES_PER_MODULUS = 64
_SIEVE_START = 1 << 32
_SEGMENT = 1 << 24


def _small_primes(limit: int) -> list[int]:
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    for p in range(2, math.isqrt(limit) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, limit + 1, p)))
    return [i for i in range(limit + 1) if sieve[i]]


def _primes_above_2_32() -> Iterator[list[int]]:
    """Yield the primes above 2**32 in ascending order, a sieve segment at a time."""
    base = _small_primes(1 << 17)[1:]  # odd primes up to sqrt(2**34)
    low = _SIEVE_START + 1  # odd numbers only: index i is low + 2*i
    while True:
        segment = bytearray([1]) * _SEGMENT
        for p in base:
            first = (-low) % p  # low + first is divisible by p
            if first % 2:
                first += p
            start = first // 2
            if start < _SEGMENT:
                segment[start::p] = bytes(len(range(start, _SEGMENT, p)))
        yield list(compress(range(low, low + 2 * _SEGMENT, 2), segment))
        low += 2 * _SEGMENT


def _good_moduli(count: int) -> list[int]:
    """Products of 64 distinct primes each: no two share a factor."""
    moduli: list[int] = []
    spare: list[int] = []
    for primes in _primes_above_2_32():
        spare.extend(primes)
        usable = len(spare) - len(spare) % _PRIMES_PER_MODULUS
        moduli.extend(
            math.prod(spare[i : i + _PRIMES_PER_MODULUS])
            for i in range(0, usable, _PRIMES_PER_MODULUS)
        )
        del spare[:usable]
        if len(moduli) >= count:
            return moduli[:count]
    raise AssertionError("the prime generator is endless")


def make_moduli(count: int, seed: int) -> tuple[list[int], dict[int, set[int]]]:
    """Return ``count`` moduli and the planted shared primes (prime -> positions)."""
    rng = random.Random(seed)
    moduli = _good_moduli(count)

    state = gmpy2.random_state(seed)
    pool = [
        int(gmpy2.next_prime(gmpy2.mpz_urandomb(state, 1024) | (3 << 1022)))
        for _ in range(20)
    ]
    # Five pairs that share one prime, and p*q sharing p with p*r and q with q*s.
    planted = [(pool[2 * i], pool[2 * i + 1], pool[10 + i]) for i in range(5)]
    positions = rng.sample(range(count), 2 * len(planted) + 3)
    shared: dict[int, set[int]] = {}
    pairs = zip(positions[::2], positions[1::2], strict=False)
    for (p, q, r), (a, b) in zip(planted, pairs, strict=False):
        moduli[a], moduli[b] = p * q, p * r
        shared[p] = {a, b}
    p, q, r, s = pool[15:19]
    a, b, c = positions[-3:]
    moduli[a], moduli[b], moduli[c] = p * q, p * r, q * s
    shared[p] = {a, b}
    shared[q] = {a, c}
    return moduli, shared


class _PeakMemory:
    """Samples the resident memory of this process and its children."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self) -> int:
        pids = [os.getpid()]
        total = 0
        while pids:
            pid = pids.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pids.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._tree_rss())

    def __enter__(self) -> _PeakMemory:
        self.peak = self._tree_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_one(count: int, jobs: int, spill: bool, seed: int) -> dict[str, object]:
    """Generate, run and check one size; return its figures."""
    started = time.perf_counter()
    moduli, planted = make_moduli(count, seed)
    generated = time.perf_counter() - started

    cpu_before = _cpu_seconds()
    with _PeakMemory() as memory:
        started = time.perf_counter()
        gcds = batch_gcd(moduli, jobs=jobs, spill=spill)
        seconds = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    found = {f.factor: set(f.indices) for f in split_shared(moduli, gcds)}
    return {
        "moduli": count,
        "jobs": jobs,
        "spill": spill,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 1),
        "load_average": os.getloadavg()[0],
        "peak_bytes": memory.peak,
        "generate_seconds": round(generated, 1),
        "correct": found == planted,
        "bits": [
            min(n.bit_length() for n in moduli),
            max(n.bit_length() for n in moduli),
        ],
    }


def plain_batch_gcd(moduli: list[int]) -> list[int]:
    """The peer: one process, product tree, then ``P mod n**2`` all the way down."""
    levels = [[gmpy2.mpz(n) for n in moduli]]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append(
            [below[i] * below[i + 1] for i in range(0, len(below) - 1, 2)]
            + ([below[-1]] if len(below) % 2 else [])
        )
    remainders = levels.pop()
    while levels:
        level = levels.pop()
        remainders = [remainders[i // 2] % (n * n) for i, n in enumerate(level)]
    return [int(gmpy2.gcd(r // n, n)) for r, n in zip(remainders, moduli, strict=True)]


def run_peer(count: int, seed: int) -> dict[str, object]:
    """Generate, run and check one size with the plain tree; return its figures."""
    moduli, planted = make_moduli(count, seed)
    cpu_before = _cpu_seconds()
    with _PeakMemory() as memory:
        started = time.perf_counter()
        gcds = plain_batch_gcd(moduli)
        seconds = time.perf_counter() - started
    found = {f.factor: set(f.indices) for f in split_shared(moduli, gcds)}
    return {
        "moduli": count,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(_cpu_seconds() - cpu_before, 1),
        "peak_bytes": memory.peak,
        "correct": found == planted,
    }


def _run_fresh(arguments: list[str]) -> dict[str, object]:
    """Run this script with ``arguments`` in a fresh process; return its figures."""
    command = [sys.executable, __file__, *arguments]
    output = subprocess.run(command, check=True, capture_output=True, text=True)
    row: dict[str, object] = json.loads(output.stdout.strip().splitlines()[-1])
    return row


def pairwise(count: int, seed: int) -> float:
    """Seconds for the all-pairs GCD of ``count`` moduli (the naive baseline)."""
    moduli = [gmpy2.mpz(n) for n in make_moduli(count, seed)[0]]
    started = time.perf_counter()
    for i, n in enumerate(moduli):
        for m in moduli[i + 1 :]:
            gmpy2.gcd(n, m)
    return time.perf_counter() - started


def main() -> None:
    """Run the sizes asked for, each in its own process, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--spill", action="store_true", help="tree levels on disk")
    parser.add_argument(
        "--peer-sizes",
        default="10000,100000",
        help="sizes for the plain single-process tree ('' for none)",
    )
    parser.add_argument("--pairwise", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=2012)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peer-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one, args.jobs, args.spill, args.seed)))
        return
    if args.peer_one:
        print(json.dumps(run_peer(args.peer_one, args.seed)))
        return

    rows = {}
    for size in (int(s) for s in args.sizes.split(",") if s):
        arguments = ["--one", str(size), "--jobs", str(args.jobs)]
        arguments += ["--seed", str(args.seed)] + (["--spill"] if args.spill else [])
        row = _run_fresh(arguments)
        rows[size] = row
        print(
            f"{row['moduli']:>9,} moduli  jobs={row['jobs']}  "
            f"spill={row['spill']!s:5}  {row['seconds']:>8.1f} s  "
            f"(cpu {row['cpu_seconds']:.0f} s, load {row['load_average']:.1f})  "
            f"peak {row['peak_bytes'] / 2**30:5.2f} GiB  "
            f"correct={row['correct']}  (bits {row['bits'][0]}-{row['bits'][1]}, "
            f"generated in {row['generate_seconds']} s)",
            flush=True,
        )
    for a, b in itertools.pairwise(rows.values()):
        exponent = math.log(b["seconds"] / a["seconds"]) / math.log(
            b["moduli"] / a["moduli"]
        )
        print(f"growth exponent {a['moduli']:,} -> {b['moduli']:,}: {exponent:.2f}")
    for size in (int(s) for s in args.peer_sizes.split(",") if s):
        peer = _run_fresh(["--peer-one", str(size), "--seed", str(args.seed)])
        line = (
            f"{size:>9,} moduli  plain single-process gmpy2 tree  "
            f"{peer['seconds']:>8.1f} s  (cpu {peer['cpu_seconds']:.0f} s)  "
            f"peak {peer['peak_bytes'] / 2**30:5.2f} GiB  correct={peer['correct']}"
        )
        if size in rows:
            ours = rows[size]
            line += (
                f"  ours/plain: wall {ours['seconds'] / peer['seconds']:.2f}x, "
                f"cpu {ours['cpu_seconds'] / peer['cpu_seconds']:.2f}x, "
                f"memory {ours['peak_bytes'] / peer['peak_bytes']:.2f}x"
            )
        print(line, flush=True)
    if args.pairwise:
        seconds = pairwise(args.pairwise, args.seed)
        pairs = args.pairwise * (args.pairwise - 1) / 2
        print(
            f"pairwise GCD baseline: {args.pairwise:,} moduli, {pairs:,.0f} pairs in "
            f"{seconds:.1f} s ({seconds / pairs * 1e6:.2f} us a pair; 1,000,000 moduli "
            f"would take {seconds / pairs * 5e11 / 86400:,.0f} days)"
        )


if __name__ == "__main__":
    main()
