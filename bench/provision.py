"""How fast the factory issues: units per second through `issue`, beside OpenSSL.

For each registry backend (SQLite, and PostgreSQL on a throwaway local server)
and each key type (p256, rsa2048), a fresh factory issues unit after unit
through `Issuer.issue` (CSR check, duplicate and shared-prime check, sign,
register), and the rate is measured over a window of units ending at each
size (1,000 and 10,000 registered by default). The same is measured for the
batch path of `provision-batch` (`Issuer.issue_batch`, 1,000 CSRs per call).
The OpenSSL CLI signs the same CSRs with the same issuing key in a loop
(`openssl x509 -req ...`, one process per certificate, as a shell script on a
line would), in the same run. Finally the whole `provision-batch` flow (the
station makes the units' keys and CSRs, the CA issues, the station writes
each unit's whole state in two fsync-ed commits) runs for p256 on SQLite,
median of 3, beside how many file fsyncs per second the disk takes (the
bound of any flow that makes every unit's state durable).

RSA-2048 CSRs come from keys built from a pool of 1024-bit primes, each prime
used once (no shared primes): the pool is made once in parallel and cached.

Usage: .venv/bin/python bench/provision.py [--sizes 1000,10000] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gmpy2
import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from unitcert import certs, keys
from unitcert.factory.ca import init_factory, load_factory
from unitcert.factory.issue import Issuer
from unitcert.factory.provision import batch_serials, provision_batch
from unitcert.factory.registry import Registry, default_url

PASSPHRASE = b"bench passphrase"
RESULTS = Path(__file__).with_name("RESULTS.md")
DOMAIN, PRODUCT = "example.com", "router"


# --- inputs ------------------------------------------------------------------


def _prime(seed: int) -> int:
    rng = random.Random(seed)
    return int(gmpy2.next_prime(rng.getrandbits(1024) | (3 << 1022) | 1))


def prime_pool(count: int, cache: Path) -> list[int]:
    """``count`` distinct 1024-bit primes, cached in ``cache`` between runs."""
    primes: list[int] = []
    if cache.exists():
        primes = [int(line, 16) for line in cache.read_text().split()]
    if len(primes) < count:
        print(f"making {count - len(primes)} primes for RSA keys (cached in {cache})")
        with multiprocessing.Pool() as pool:
            primes += pool.map(_prime, range(len(primes), count), chunksize=64)
        cache.write_text("\n".join(format(p, "x") for p in primes))
    if len(set(primes[:count])) != count:
        raise SystemExit(f"the prime cache {cache} repeats a prime: delete it")
    return primes[:count]


def _rsa_key(p: int, q: int) -> rsa.RSAPrivateKey:
    e = 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    return rsa.RSAPrivateNumbers(
        p,
        q,
        d,
        rsa.rsa_crt_dmp1(d, p),
        rsa.rsa_crt_dmq1(d, q),
        rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, p * q),
    ).private_key(unsafe_skip_rsa_key_validation=True)


def make_csrs(key_type: str, count: int, cache: Path) -> list[tuple[str, bytes]]:
    """``count`` (serial, CSR) pairs of distinct keys of ``key_type``."""
    primes: list[int] = []
    if key_type == "rsa2048":
        # A prime p with 65537 dividing p - 1 cannot take e = 65537.
        pool = prime_pool(2 * count + count // 50 + 8, cache)
        primes = [p for p in pool if (p - 1) % 65537][: 2 * count]
    csrs = []
    for n in range(count):
        serial = f"u{n:06d}"
        key: keys.PrivateKey = (
            _rsa_key(primes[2 * n], primes[2 * n + 1])
            if key_type == "rsa2048"
            else ec.generate_private_key(ec.SECP256R1())
        )
        csr = certs.build_csr(
            key, [f"{serial}.{PRODUCT}.{DOMAIN}"], serial_number=serial
        )
        csrs.append((serial, csr.public_bytes(serialization.Encoding.PEM)))
    return csrs


# --- PostgreSQL ----------------------------------------------------------------


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server on loopback; yields its base URL."""
    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bindirs:
        raise SystemExit("PostgreSQL is not installed: run scripts/system-deps")
    bindir = bindirs[-1].parent
    base = Path(tempfile.mkdtemp(prefix="unitcert-bench-pg-", dir="/tmp"))
    shutil.chown(base, "postgres", "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    as_postgres = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    subprocess.run(
        [
            *as_postgres,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
        ],
        check=True,
        capture_output=True,
    )
    # Default durability (fsync on): the figures are for a real registry.
    subprocess.run(
        [
            *as_postgres,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(base / "log"),
            "-o",
            f"-p {port} -k {base} -h 127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


def new_database(base_url: str) -> str:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    dsn = base_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{base_url}/{name}"


# --- measurements --------------------------------------------------------------


@dataclass
class Window:
    size: int
    rate: float  # units per second over the window ending at ``size``
    cpu_ms: float  # CPU time of this process per unit over the window


def fresh_factory(work: Path, url: str | None) -> tuple[Path, Issuer]:
    directory = work / f"F-{uuid.uuid4().hex[:8]}"
    init_factory(directory, domain=DOMAIN, product=PRODUCT, passphrase=PASSPHRASE)
    registry = Registry(url or default_url(directory), create=True)
    return directory, Issuer(load_factory(directory, PASSPHRASE), registry)


def measure_issue(
    issuer: Issuer, csrs: Sequence[tuple[str, bytes]], sizes: Sequence[int], window: int
) -> list[Window]:
    """Issue one at a time; the rate over the last ``window`` units before each size."""
    marks: dict[int, tuple[float, float]] = {}
    wanted = {s - window for s in sizes} | set(sizes)
    start = time.perf_counter()
    marks[0] = (start, time.process_time())
    for n, (serial, csr) in enumerate(csrs, start=1):
        issuer.issue(csr, serial)
        if n in wanted:
            marks[n] = (time.perf_counter(), time.process_time())
        if n % 1000 == 0:
            print(f"    issued {n} ({n / (time.perf_counter() - start):.0f}/s)")
    return [
        Window(
            s,
            window / (marks[s][0] - marks[s - window][0]),
            1000 * (marks[s][1] - marks[s - window][1]) / window,
        )
        for s in sizes
    ]


def measure_batch(
    issuer: Issuer, csrs: Sequence[tuple[str, bytes]], sizes: Sequence[int], chunk: int
) -> list[Window]:
    """Issue in batches of ``chunk``; the rate of the batch that ends at each size."""
    results = []
    for begin in range(0, len(csrs), chunk):
        part = csrs[begin : begin + chunk]
        start, cpu = time.perf_counter(), time.process_time()
        outcome = issuer.issue_batch(part)
        elapsed = time.perf_counter() - start
        cpu_ms = 1000 * (time.process_time() - cpu) / len(part)
        if outcome.refused:
            raise SystemExit(f"the batch refused {outcome.refused[0]}")
        if begin + len(part) in sizes:
            results.append(Window(begin + len(part), len(part) / elapsed, cpu_ms))
    return results


def measure_openssl(
    directory: Path, csrs: Sequence[tuple[str, bytes]], work: Path
) -> float:
    """Units per second of `openssl x509 -req` signing the same CSRs in a loop."""
    folder = work / f"openssl-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    (folder / "pass").write_bytes(PASSPHRASE)
    (folder / "ext.cnf").write_text(
        "[unit]\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        "subjectAltName=DNS:$ENV::UNIT_NAME\n"
    )
    for serial, csr in csrs:
        (folder / f"{serial}.csr").write_bytes(csr)
    start = time.perf_counter()
    for serial, _ in csrs:
        subprocess.run(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                str(folder / f"{serial}.csr"),
                "-CA",
                str(directory / "issuing.pem"),
                "-CAkey",
                str(directory / "issuing-key.pem"),
                "-passin",
                f"file:{folder / 'pass'}",
                "-days",
                "825",
                "-set_serial",
                str(random.getrandbits(120)),
                "-extfile",
                str(folder / "ext.cnf"),
                "-extensions",
                "unit",
                "-out",
                str(folder / f"{serial}.pem"),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "UNIT_NAME": f"{serial}.{PRODUCT}.{DOMAIN}"},
        )
    return len(csrs) / (time.perf_counter() - start)


def measure_fsync_rate(directory: Path, threads: int = 4, count: int = 2000) -> float:
    """New small files created, written and fsync-ed per second in ``directory``,
    from ``threads`` threads (as the station writes its units' states)."""
    root = Path(tempfile.mkdtemp(dir=directory))

    def one(n: int) -> None:
        fd = os.open(root / f"f{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x" * 400)
            os.fsync(fd)
        finally:
            os.close(fd)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))
    elapsed = time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)
    return count / elapsed


def measure_provision_batch(work: Path, out: Path, count: int) -> float:
    """Units per second of the whole provision-batch flow, p256, SQLite."""
    _, issuer = fresh_factory(work, None)
    start = time.perf_counter()
    result = provision_batch(issuer, out, batch_serials("pb", count))
    elapsed = time.perf_counter() - start
    issuer.registry.close()
    shutil.rmtree(out, ignore_errors=True)
    return len(result.provisioned) / elapsed


# --- report --------------------------------------------------------------------


def _machine() -> str:
    load = os.getloadavg()
    ssl_version = subprocess.run(
        ["openssl", "version"], capture_output=True, text=True
    ).stdout.strip()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"- nproc {os.cpu_count()}, Python {platform.python_version()}, "
        f"{ssl_version}, unitcert at {commit}\n"
        f"- load average before the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def _verdict(at_small: Window, at_large: Window) -> str:
    wall = at_small.rate / at_large.rate
    cpu = at_large.cpu_ms / at_small.cpu_ms
    if max(wall, cpu) <= 1.5:
        met = "met"
    elif cpu <= 1.5:
        met = "met in CPU time only"
    elif wall <= 1.5:
        met = "met in wall time only"
    else:
        met = "NOT met"
    return f"wall {wall:.2f}x, CPU {cpu:.2f}x ({met})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--key-types", default="p256,rsa2048")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--openssl-count", type=int, default=200)
    parser.add_argument("--flow-count", type=int, default=1000)
    parser.add_argument(
        "--flow-out",
        type=Path,
        default=None,
        help="Where provision-batch writes the units' states (default: a folder "
        "under /tmp, on disk).",
    )
    parser.add_argument(
        "--prime-cache", type=Path, default=Path("/tmp/unitcert-bench-primes.txt")
    )
    parser.add_argument("--write", action="store_true", help="Update RESULTS.md.")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    key_types = args.key_types.split(",")
    backends = args.backends.split(",")
    total = sizes[-1]
    began = dt.datetime.now(dt.UTC)
    machine = _machine()

    work = Path(tempfile.mkdtemp(prefix="unitcert-bench-provision-"))
    rows: list[str] = []
    batch_rows: list[str] = []
    try:
        with contextmanager_for(backends) as pg_url:
            for key_type in key_types:
                print(f"making {total} {key_type} CSRs")
                csrs = make_csrs(key_type, total, args.prime_cache)
                openssl_rate: float | None = None
                for backend in backends:
                    url = new_database(pg_url) if backend == "postgresql" else None
                    print(f"{key_type} on {backend}: issue, one at a time")
                    directory, issuer = fresh_factory(work, url)
                    windows = measure_issue(issuer, csrs, sizes, args.window)
                    issuer.registry.close()
                    if openssl_rate is None:
                        print("  openssl x509 -req in a loop")
                        openssl_rate = measure_openssl(
                            directory, csrs[: args.openssl_count], work
                        )
                    for window in windows:
                        rows.append(
                            f"| {key_type} | {backend} | issue | {window.size:,} | "
                            f"{window.rate:.0f} | {1000 / window.rate:.2f} ms | "
                            f"{window.cpu_ms:.2f} ms | "
                            f"{openssl_rate:.0f} | {window.rate / openssl_rate:.1f}x |"
                        )
                    rows.append(
                        f"| {key_type} | {backend} | issue | cost at "
                        f"{sizes[-1]:,} vs {sizes[0]:,} | | "
                        f"{_verdict(windows[0], windows[-1])} | | | |"
                    )
                    url = new_database(pg_url) if backend == "postgresql" else None
                    print(f"{key_type} on {backend}: issue_batch, 1,000 per batch")
                    _, issuer = fresh_factory(work, url)
                    batches = measure_batch(issuer, csrs, sizes, 1000)
                    issuer.registry.close()
                    for window in batches:
                        batch_rows.append(
                            f"| {key_type} | {backend} | {window.size:,} | "
                            f"{window.rate:.0f} | {1000 / window.rate:.2f} ms | "
                            f"{window.cpu_ms:.2f} ms | "
                            f"{window.rate / openssl_rate:.1f}x |"
                        )
                    batch_rows.append(
                        f"| {key_type} | {backend} | cost at {sizes[-1]:,} vs "
                        f"{sizes[0]:,} | | {_verdict(batches[0], batches[-1])} | | |"
                    )
        print(f"provision-batch, whole flow, {args.flow_count} p256 units")
        flow_out = args.flow_out or work / "units"
        flow_rate = statistics.median(
            measure_provision_batch(work, flow_out, args.flow_count) for _ in range(3)
        )
        fsyncs = statistics.median(
            measure_fsync_rate(flow_out.parent) for _ in range(3)
        )
        flow_shm = None
        if Path("/dev/shm").is_dir():
            flow_shm = measure_provision_batch(
                work, Path(tempfile.mkdtemp(dir="/dev/shm")) / "units", args.flow_count
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = render(
        began, machine, rows, batch_rows, (flow_rate, flow_shm, fsyncs), args, sizes
    )
    print(report)
    if args.write:
        write_section(report)


@contextmanager
def contextmanager_for(backends: Sequence[str]) -> Iterator[str]:
    if "postgresql" in backends:
        with postgres_server() as url:
            yield url
    else:
        yield ""


def render(
    began: dt.datetime,
    machine: str,
    rows: list[str],
    batch_rows: list[str],
    flow: tuple[float, float | None, float],
    args: argparse.Namespace,
    sizes: Sequence[int],
) -> str:
    flow_rate, flow_shm, fsyncs = flow
    flow_target = "met" if flow_rate >= 500 else "NOT met"
    shm = (
        f"; with the units' states on tmpfs (/dev/shm) {flow_shm:.0f} units/s"
        if flow_shm is not None
        else ""
    )
    return "\n".join(
        [
            "## provision",
            "",
            f"Run {began:%Y-%m-%d %H:%M} UTC with `.venv/bin/python "
            f"bench/provision.py --sizes {','.join(map(str, sizes))}`.",
            "",
            machine,
            "- load average after the run "
            + " ".join(f"{x:.2f}" for x in os.getloadavg())
            + ": other work shares the 2 cores, so rates vary from run to run",
            "",
            "One unit at a time through `Issuer.issue` (what `factory issue` does "
            "per CSR, without the process start): CSR check with badkeys, "
            "duplicate serial and key lookups, shared-prime check of RSA moduli "
            "against the registry's product, signing, registering in one "
            f"transaction. Rate over the {args.window} units before each size. "
            f"OpenSSL: `openssl x509 -req` with the same encrypted issuing key, "
            f"one process per CSR, {args.openssl_count} CSRs, no checks and no "
            "registry. Per unit (CPU) is the CPU time of the benchmark's own "
            "process (it leaves out the PostgreSQL server's work) and is less "
            "disturbed by other work on the machine than wall time.",
            "",
            "| key | registry | path | registered | units/s | per unit (wall) | "
            "per unit (CPU) | OpenSSL units/s | ours / OpenSSL |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "The CA side of `provision-batch` (`Issuer.issue_batch`, batches of "
            "1,000 CSRs: per-CSR checks, one product tree of the batch against "
            "the registry, signing, chunked commits); the rate of the batch that "
            "ends at each size:",
            "",
            "| key | registry | registered | units/s | per unit (wall) | "
            "per unit (CPU) | ours / OpenSSL |",
            "|---|---|---:|---:|---:|---:|---:|",
            *batch_rows,
            "",
            f"Whole `provision-batch` flow, {args.flow_count} p256 units on SQLite "
            "(the station makes the units' keys and CSRs, the CA issues, the "
            "station writes each unit's whole state: one identity and one local "
            "commit, about 11 fsyncs a unit), median of 3: "
            f"{flow_rate:.0f} units/s with the states on disk, target 500: "
            f"{flow_target}{shm}. The disk takes {fsyncs:.0f} file fsyncs/s "
            f"from 4 threads, which bounds the flow near {fsyncs / 11:.0f} "
            "units/s.",
            "",
        ]
    )


def write_section(report: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    start = text.find("## provision\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + report
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + report + ("" if end == -1 else text[end + 1 :])
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
