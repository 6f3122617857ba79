"""The batch GCD core: product tree, remainder tree, groups, disk, Dask."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterator

import gmpy2
import pytest

from unitcert.quality import batchgcd, wrapmul
from unitcert.quality.batchgcd import SharedFactor, batch_gcd, split_shared


def _primes(count: int, bits: int, seed: int) -> list[int]:
    state = gmpy2.random_state(seed)
    primes: set[int] = set()
    while len(primes) < count:
        start = gmpy2.mpz_urandomb(state, bits) | (1 << (bits - 1))
        primes.add(int(gmpy2.next_prime(start)))
    return sorted(primes)


@pytest.fixture(scope="session")
def fleet() -> tuple[list[int], dict[int, set[int]]]:
    """3,000 moduli of 256-bit primes with shared primes planted among them.

    Returns the moduli and, for each planted prime, the positions of the
    moduli it divides.
    """
    pool = _primes(6_020, 128, seed=6)
    primes, spare = pool[:6_000], pool[6_000:]
    moduli = [primes[2 * i] * primes[2 * i + 1] for i in range(3_000)]
    rng = random.Random(6)
    positions = rng.sample(range(3_000), 9)
    p, q, r, s, t, u, v = spare[:7]
    planted = {
        positions[0]: p * q,  # shares p with positions[1] and q with positions[2]
        positions[1]: p * r,
        positions[2]: q * s,
        positions[3]: t * u,  # t shared by three moduli
        positions[4]: t * v,
        positions[5]: t * spare[7],
    }
    for position, modulus in planted.items():
        moduli[position] = modulus
    expected = {
        p: {positions[0], positions[1]},
        q: {positions[0], positions[2]},
        t: {positions[3], positions[4], positions[5]},
    }
    return moduli, expected


def _reference(moduli: list[int]) -> list[int]:
    product = math.prod(moduli)
    return [math.gcd(product // n, n) for n in moduli]


def _found(moduli: list[int], gcds: list[int]) -> dict[int, set[int]]:
    return {s.factor: set(s.indices) for s in split_shared(moduli, gcds)}


def test_batch_gcd_matches_the_definition_on_random_numbers() -> None:
    rng = random.Random(1)
    for count in (1, 2, 3, 7, 64, 301):
        moduli = list({rng.getrandbits(200) | 1 | (1 << 199) for _ in range(count)})
        assert batch_gcd(moduli) == _reference(moduli)


def test_batch_gcd_scaled_remainder_tree_matches_the_definition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Force the scaled (fixed-point) walk down to small nodes, where an error
    # in its precision would show, and bound it from above, so that the walk
    # switches from plain to scaled and back.
    rng = random.Random(2)
    moduli = list({rng.getrandbits(300) | 1 for _ in range(777)})
    for smallest, largest in ((1, 1 << 40), (700, 1 << 40), (700, 20_000), (1, 5_000)):
        monkeypatch.setattr(batchgcd, "_SCALED_MIN_BITS", smallest)
        monkeypatch.setattr(batchgcd, "_SCALED_MAX_BITS", largest)
        monkeypatch.setattr(batchgcd, "_SCALED_MAX_BITS_SPILLED", largest)
        assert batch_gcd(moduli) == _reference(moduli)
        assert batch_gcd(moduli, spill=True) == _reference(moduli)


@pytest.mark.parametrize("wrap_from_bits", [64, 1 << 40])
def test_batch_gcd_scaled_walk_is_exact_with_and_without_wraparound(
    monkeypatch: pytest.MonkeyPatch, wrap_from_bits: int
) -> None:
    # The wrap-around products reach down to the smallest nodes here, where
    # the bits they fold back sit closest to the child's precision.
    assert wrapmul.wrap_multiplier() is not None
    rng = random.Random(3)
    sizes = (64, 300, 2048)
    moduli = list({rng.getrandbits(rng.choice(sizes)) | 1 for _ in range(500)})
    monkeypatch.setattr(batchgcd, "_SCALED_MIN_BITS", 1)
    monkeypatch.setattr(batchgcd, "_SCALED_MAX_BITS", 1 << 40)
    monkeypatch.setattr(batchgcd, "_WRAP_MIN_BITS", wrap_from_bits)
    assert batch_gcd(moduli) == _reference(moduli)


def test_batch_gcd_falls_back_to_full_products_without_gmp_wraparound(
    monkeypatch: pytest.MonkeyPatch, fleet: tuple[list[int], dict[int, set[int]]]
) -> None:
    moduli, expected = fleet
    monkeypatch.setattr(batchgcd, "wrap_multiplier", lambda: None)

    assert _found(moduli, batch_gcd(moduli)) == expected


def test_wrap_multiplier_matches_full_products_modulo_2n_minus_1() -> None:
    wrap = wrapmul.wrap_multiplier()
    assert wrap is not None
    rng = random.Random(4)
    for bits in (64, 640, 6_400, 64_000, 640_000, 2_000_000):
        n = wrap.modulus_bits(bits)
        modulus = (gmpy2.mpz(1) << n) - 1
        for a_bits, b_bits in ((n, min(n, n // 2 + 64)), (n - 1, n - 1), (n, 3)):
            a = gmpy2.mpz(rng.getrandbits(a_bits))
            b = gmpy2.mpz(rng.getrandbits(b_bits) | 1)
            got = wrap.multiply(a, b, n)
            assert 0 <= got <= modulus
            assert got % modulus == a * b % modulus


def test_wrap_multiplier_refuses_operands_wider_than_the_modulus() -> None:
    wrap = wrapmul.wrap_multiplier()
    assert wrap is not None
    with pytest.raises(ValueError, match="wider"):
        wrap.multiply(1 << 128, 3, 128)
    with pytest.raises(ValueError, match="negative"):
        wrap.multiply(-1, 3, 128)
    with pytest.raises(ValueError, match="limbs"):
        wrap.multiply(1, 3, 100)


def test_batch_gcd_finds_exactly_the_planted_primes(
    fleet: tuple[list[int], dict[int, set[int]]],
) -> None:
    moduli, expected = fleet

    gcds = batch_gcd(moduli)

    assert _found(moduli, gcds) == expected
    assert sum(1 for g in gcds if g != 1) == 6


def test_split_shared_splits_a_modulus_that_shares_both_primes() -> None:
    p, q, r, s = _primes(4, 64, seed=3)
    moduli = [p * q, p * r, q * s]

    gcds = batch_gcd(moduli)
    shared = split_shared(moduli, gcds)

    assert gcds[0] == p * q  # the GCD is the modulus itself
    assert shared == [
        SharedFactor(min(p, q), (0, 1) if min(p, q) == p else (0, 2), True),
        SharedFactor(max(p, q), (0, 2) if max(p, q) == q else (0, 1), True),
    ]


def test_split_shared_reports_a_modulus_given_twice_as_not_prime() -> None:
    p, q, r, s = _primes(4, 64, seed=4)
    moduli = [p * q, r * s, p * q]

    shared = split_shared(moduli, batch_gcd(moduli))

    assert shared == [SharedFactor(p * q, (0, 2), False)]


@pytest.mark.parametrize(
    ("jobs", "spill"), [(1, True), (2, False), (2, True), (3, False)]
)
def test_batch_gcd_gives_the_same_results_in_every_mode(
    fleet: tuple[list[int], dict[int, set[int]]], jobs: int, spill: bool
) -> None:
    moduli, expected = fleet
    seen: list[tuple[str, float]] = []

    gcds = batch_gcd(
        moduli, jobs=jobs, spill=spill, progress=lambda s, f: seen.append((s, f))
    )

    assert gcds == batch_gcd(moduli)
    assert _found(moduli, gcds) == expected
    assert ("remainder tree", 1.0) in seen


def test_batch_gcd_refuses_a_modulus_below_two() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        batch_gcd([15, 1])


def test_batch_gcd_of_nothing_is_nothing() -> None:
    assert batch_gcd([]) == []
    assert batch_gcd([], jobs=2) == []


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[str]:
    distributed = pytest.importorskip("distributed")
    with warnings.catch_warnings():
        # Dask's own start-up may warn about its environment; that is not ours.
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        )
    try:
        yield cluster.scheduler_address
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cluster.close()


def test_batch_gcd_on_dask_matches_the_single_machine_run(
    fleet: tuple[list[int], dict[int, set[int]]], dask_cluster: str
) -> None:
    from unitcert.audit.distributed import batch_gcd_on_dask

    moduli, expected = fleet
    fractions: list[float] = []

    gcds = batch_gcd_on_dask(
        moduli, dask_cluster, groups=5, progress=lambda s, f: fractions.append(f)
    )

    assert gcds == batch_gcd(moduli)
    assert _found(moduli, gcds) == expected
    assert fractions[-1] == 1.0


_INTERRUPTED_RUN = """
import random, sys
from unitcert.quality.batchgcd import batch_gcd
rng = random.Random(7)
moduli = [rng.getrandbits(2048) | (1 << 2047) | 1 for _ in range(200_000)]
print("ready", flush=True)
try:
    batch_gcd(moduli, jobs=2)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_ends_the_workers_at_once_and_quietly() -> None:
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    # Ctrl-C in a terminal signals the whole process group, workers included.
    process = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_RUN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
        deadline = time.monotonic() + 30
        while len(children.read_text().split()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [int(pid) for pid in children.read_text().split()]
        time.sleep(1.0)  # the workers are building their trees
        interrupted = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=30)
        took = time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert process.returncode == 130
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err
    assert took < 3, took
    assert len(workers) >= 2
    # Killed, they are gone within moments (the resource tracker, also a
    # child, leaves as soon as it sees its parent gone).
    deadline = time.monotonic() + 2
    while [pid for pid in workers if _running(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if _running(pid)]


def _running(pid: int) -> bool:
    """Whether a process is still there and not a zombie waiting to be reaped."""
    from pathlib import Path

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
