"""First boot: from launching the unit's server on an empty state to its first TLS
handshake, and the serving process's peak memory, beside the OpenSSL CLI.

For each key type and run, two jobs are timed from launch to the first completed
TLS handshake, polled by a Python ``ssl`` client every 10 ms:

- ours: ``unitcert device serve`` on an empty state (which makes the p256
  identity itself); for other key types ``unitcert device init --key-type K``
  and then ``serve``, the init time included in the figure;
- OpenSSL: ``openssl req -x509 -newkey ...`` then ``openssl s_server``.

The peak RSS is the serving process's ``VmHWM`` (from ``/proc/<pid>/status``),
read after the handshake, before the process is stopped. The figures are
medians over the runs; one warm-up round runs first and is not counted, so the
page cache is warm (a unit's very first boot reads from cold flash).

Run: ``.venv/bin/python bench/first_boot.py [--runs N]``. It prints a table and
rewrites the ``## first_boot`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## first_boot"
POLL_INTERVAL = 0.010
DEADLINE = 120.0
TARGET_SECONDS = {"p256": 1.5}
TARGET_RSS_MB = 80.0
UNITCERT = [sys.executable, "-m", "unitcert"]
OPENSSL_NEWKEY = {
    "p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "p384": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
    "rsa2048": ["-newkey", "rsa:2048"],
    "rsa3072": ["-newkey", "rsa:3072"],
    "rsa4096": ["-newkey", "rsa:4096"],
}


@dataclass(frozen=True)
class Sample:
    """One timed job: seconds from launch to first handshake, peak RSS in MB."""

    seconds: float
    rss_mb: float


@dataclass(frozen=True)
class Row:
    """The medians for one key type, and the fastest runs."""

    key_type: str
    ours: Sample
    openssl: Sample
    runs: int
    ours_best: float
    openssl_best: float


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no VmHWM for process {pid}")
    return int(match.group(1)) * 1024 / 1e6


def handshake(port: int) -> bytes | None:
    """Try one TLS handshake; return the served certificate, or None if refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            return tls.getpeercert(binary_form=True)
    except OSError:
        # Not listening yet, or listening before the TLS context is ready.
        return None


def wait_for_handshake(
    server: subprocess.Popen[bytes], port: int, log: Path, started: float
) -> tuple[float, bytes]:
    while True:
        served = handshake(port)
        elapsed = time.perf_counter() - started
        if served is not None:
            return elapsed, served
        if server.poll() is not None:
            raise RuntimeError(
                f"the server exited with {server.returncode} before a handshake:\n"
                + log.read_text(errors="replace")
            )
        if elapsed > DEADLINE:
            raise RuntimeError(f"no handshake within {DEADLINE:.0f} s")
        time.sleep(POLL_INTERVAL)


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.stdin is not None:
        server.stdin.close()
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def check_served_key(der: bytes, key_type: str) -> None:
    key = x509.load_der_x509_certificate(der).public_key()
    expected: dict[str, tuple[type, int]] = {
        "p256": (ec.EllipticCurvePublicKey, 256),
        "p384": (ec.EllipticCurvePublicKey, 384),
        "rsa2048": (rsa.RSAPublicKey, 2048),
        "rsa3072": (rsa.RSAPublicKey, 3072),
        "rsa4096": (rsa.RSAPublicKey, 4096),
    }
    kind, bits = expected[key_type]
    size = key.curve.key_size if isinstance(key, ec.EllipticCurvePublicKey) else None
    if isinstance(key, rsa.RSAPublicKey):
        size = key.key_size
    if not isinstance(key, kind) or size != bits:
        raise RuntimeError(f"the server served a {type(key).__name__} of {size} bits")


def run_job(
    prepare: Sequence[Sequence[str]],
    serve: Sequence[str],
    port: int,
    key_type: str,
    workdir: Path,
    stdin: int | None = subprocess.DEVNULL,
) -> Sample:
    """Launch ``prepare`` commands in turn, then ``serve``; time to first handshake."""
    log = workdir / "server.log"
    started = time.perf_counter()
    for command in prepare:
        subprocess.run(command, check=True, cwd=workdir, capture_output=True)
    with log.open("wb") as out:
        server = subprocess.Popen(
            serve, cwd=workdir, stdin=stdin, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        seconds, served = wait_for_handshake(server, port, log, started)
        rss = peak_rss_mb(server.pid)
    finally:
        stop(server)
    check_served_key(served, key_type)
    return Sample(seconds, rss)


def ours(key_type: str, workdir: Path) -> Sample:
    state = workdir / "state"
    https, http = free_port(), free_port()
    prepare = []
    if key_type != "p256":
        prepare.append(
            [*UNITCERT, "device", "init", "--state", str(state), "--key-type", key_type]
        )
    serve = [
        *UNITCERT,
        "device",
        "serve",
        "--state",
        str(state),
        "--bind",
        "127.0.0.1",
        "--https-port",
        str(https),
        "--http-port",
        str(http),
    ]
    return run_job(prepare, serve, https, key_type, workdir)


def openssl(key_type: str, workdir: Path) -> Sample:
    port = free_port()
    req = [
        "openssl",
        "req",
        "-x509",
        *OPENSSL_NEWKEY[key_type],
        "-nodes",
        "-subj",
        "/CN=x",
        "-days",
        "825",
        "-keyout",
        "key.pem",
        "-out",
        "cert.pem",
    ]
    server = [
        "openssl",
        "s_server",
        "-accept",
        f"127.0.0.1:{port}",
        "-cert",
        "cert.pem",
        "-key",
        "key.pem",
        "-www",
        "-quiet",
    ]
    # s_server reads commands from stdin; an open pipe keeps it serving.
    return run_job([req], server, port, key_type, workdir, stdin=subprocess.PIPE)


def measure(job: Callable[[str, Path], Sample], key_type: str) -> Sample:
    with tempfile.TemporaryDirectory(prefix="first-boot-") as tmp:
        return job(key_type, Path(tmp))


def median(samples: list[Sample]) -> Sample:
    return Sample(
        statistics.median(s.seconds for s in samples),
        statistics.median(s.rss_mb for s in samples),
    )


def bench(key_types: Sequence[str], runs: int) -> list[Row]:
    for key_type in key_types:
        measure(ours, key_type)
        measure(openssl, key_type)
    samples: dict[tuple[str, str], list[Sample]] = {}
    for run in range(runs):
        for key_type in key_types:
            for name, job in (("ours", ours), ("openssl", openssl)):
                sample = measure(job, key_type)
                samples.setdefault((name, key_type), []).append(sample)
                print(
                    f"  run {run + 1}/{runs} {key_type:8} {name:8} "
                    f"{sample.seconds * 1000:8.0f} ms {sample.rss_mb:6.1f} MB",
                    flush=True,
                )
    return [
        Row(
            key_type,
            median(samples[("ours", key_type)]),
            median(samples[("openssl", key_type)]),
            runs,
            min(s.seconds for s in samples[("ours", key_type)]),
            min(s.seconds for s in samples[("openssl", key_type)]),
        )
        for key_type in key_types
    ]


def verdicts(row: Row) -> list[str]:
    notes = []
    target = TARGET_SECONDS.get(row.key_type)
    if target is not None:
        met = "met" if row.ours.seconds <= target else "MISSED"
        notes.append(f"handshake target {target} s {met}")
    met = "met" if row.ours.rss_mb < TARGET_RSS_MB else "MISSED"
    notes.append(f"RSS target {TARGET_RSS_MB:.0f} MB {met}")
    return notes


def table(rows: list[Row]) -> str:
    lines = [
        "| key type | ours: launch to handshake | OpenSSL | ratio | "
        "ours: serving peak RSS | OpenSSL | ratio | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        what = row.key_type
        if row.key_type != "p256":
            what += " (init+serve)"
        lines.append(
            f"| {what} | {row.ours.seconds * 1000:.0f} ms "
            f"(best {row.ours_best * 1000:.0f}) "
            f"| {row.openssl.seconds * 1000:.0f} ms "
            f"(best {row.openssl_best * 1000:.0f}) "
            f"| {row.ours.seconds / row.openssl.seconds:.1f}x "
            f"| {row.ours.rss_mb:.1f} MB | {row.openssl.rss_mb:.1f} MB "
            f"| {row.ours.rss_mb / row.openssl.rss_mb:.1f}x "
            f"| {'; '.join(verdicts(row))} |"
        )
    return "\n".join(lines)


def machine() -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    meminfo = Path("/proc/meminfo").read_text()
    match = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    ram = f"{int(match.group(1)) / 1024**2:.1f} GiB" if match else "unknown"
    openssl_version = subprocess.run(
        ["openssl", "version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return [
        f"nproc {os.cpu_count()}, CPU {cpu}, RAM {ram}",
        f"Python {platform.python_version()}, {openssl_version}, "
        f"Linux {platform.release()}, unitcert at {commit or 'unknown'}",
    ]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def section(rows: list[Row], command: str, loads: tuple[str, str]) -> str:
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            SECTION,
            "",
            f"Run {today} with `{command}`, median of {rows[0].runs} runs per cell "
            "after one uncounted warm-up round (warm page cache).",
            "",
            *(f"- {line}" for line in machine()),
            f"- load average (1, 5, 15 min) before the run {loads[0]}, after "
            f"{loads[1]}: other work on the machine shares its {os.cpu_count()} cores",
            "",
            table(rows),
            "",
            "Times are medians, with the fastest run in brackets; the ratios are "
            "of the medians. Launch to handshake: from starting the first process "
            "of the job to the first completed TLS handshake of a Python `ssl` "
            "client polling every 10 ms. Ours: `python -m unitcert device serve "
            "--state EMPTY` (it makes the p256 identity itself); for other key "
            "types `unitcert device init --key-type K` then `serve`, init "
            "included. OpenSSL: `openssl req -x509 -newkey ... -nodes -subj /CN=x "
            "-days 825` then `openssl s_server -www`. Peak RSS: `VmHWM` of the "
            "serving process only (1 MB = 10^6 bytes), read after the handshake. "
            "Targets (p256 handshake within 1.5 s, serving RSS under 80 MB) are "
            "for this machine.",
            "",
        ]
    )


def write_results(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new.rstrip("\n") + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per cell (>= 1)")
    parser.add_argument(
        "--key-types",
        default="p256,rsa3072",
        help="comma-separated key types (p256, p384, rsa2048, rsa3072, rsa4096)",
    )
    parser.add_argument(
        "--no-results", action="store_true", help="do not rewrite bench/RESULTS.md"
    )
    args = parser.parse_args(argv)
    key_types = [k.strip() for k in args.key_types.split(",") if k.strip()]
    unknown = [k for k in key_types if k not in OPENSSL_NEWKEY]
    if args.runs < 1 or unknown or not key_types:
        parser.error(f"need --runs >= 1 and known key types, not {unknown}")

    command = shlex.join(
        [".venv/bin/python", "bench/first_boot.py", *(argv or sys.argv[1:])]
    )
    print(f"first_boot: {', '.join(key_types)}, {args.runs} runs (+1 warm-up)")
    load_before = load_average()
    rows = bench(key_types, args.runs)
    loads = (load_before, load_average())
    print()
    print(table(rows))
    print(f"load average before {loads[0]}, after {loads[1]}")
    if not args.no_results:
        write_results(section(rows, command, loads))
        print(f"\nwrote the {SECTION} section of {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
