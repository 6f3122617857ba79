"""Benchmark: the whole ``unitcert audit`` command over a folder of RSA-2048 keys.

    .venv/bin/python bench/audit.py                    # 100,000 keys
    .venv/bin/python bench/audit.py --sizes 1000000    # a million
    .venv/bin/python bench/audit.py --sizes 1000000 --memory-limit 4G

For each size, the moduli of bench/batchgcd.py (distinct "good" moduli and
planted pairs that share a prime) are written as SubjectPublicKeyInfo PEM
files of 50,000 keys each, and ``unitcert audit FOLDER --jobs 2 --json OUT
-q`` runs in a fresh process: reading and parsing every key, the duplicate
check, the batch GCD and badkeys' single-key checks. The run reports its
wall time, the CPU time of the command and its workers, and the peak
resident memory of the command and its workers together, and checks that the
findings are exactly the planted shared primes.

The peer, in the same run: badkeys' own command line over the same moduli
(``badkeys -m``, a file of hex moduli), with the checks unitcert runs
(badkeys' defaults without ``blocklist``, which needs a download). It does
the single-key part only: no duplicate keys, no batch GCD, no report, and
one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batchgcd import make_moduli

_KEYS_PER_FILE = 50_000
_BADKEYS_CHECKS = "fermat,roca,rsainvalid,rsapoly,sharedprimes,smalld,smallfactors"


class _PeakMemory:
    """Samples the resident memory of a process tree every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.peak = 0
        self._root = pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree_rss(self) -> int:
        pids, total = [self._root], 0
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

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _measure(command: list[str]) -> tuple[int, float, float, int]:
    """Run ``command``; return its exit code, wall and CPU seconds, peak bytes."""
    cpu = _children_cpu()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    memory = _PeakMemory(process.pid)
    code = process.wait()
    seconds = time.perf_counter() - started
    return code, seconds, _children_cpu() - cpu, memory.stop()


def _write_keys(moduli: list[int], folder: Path) -> None:
    for start in range(0, len(moduli), _KEYS_PER_FILE):
        blocks = [
            rsa.RSAPublicNumbers(65537, n)
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
            for n in moduli[start : start + _KEYS_PER_FILE]
        ]
        name = f"keys-{start // _KEYS_PER_FILE:04}.pem"
        (folder / name).write_bytes(b"".join(blocks))


def _unit_index(name: str) -> int:
    """Turn ``.../keys-0003.pem#17`` into the position of that key in the moduli."""
    path, _, number = name.rpartition("#")
    stem = Path(path).stem
    return int(stem.rsplit("-", 1)[1]) * _KEYS_PER_FILE + int(number) - 1


def run_size(
    count: int, jobs: int, seed: int, work: Path, memory_limit: str | None
) -> dict[str, object]:
    """Write, audit and check one size, then run the peer; return the figures."""
    moduli, planted = make_moduli(count, seed)
    folder = work / f"keys-{count}"
    folder.mkdir()
    _write_keys(moduli, folder)
    report = work / f"report-{count}.json"

    unitcert = [sys.executable, "-m", "unitcert", "audit", str(folder)]
    unitcert += ["--jobs", str(jobs), "--json", str(report), "-q"]
    if memory_limit is not None:
        unitcert += ["--memory-limit", memory_limit]
    code, seconds, cpu, peak = _measure(unitcert)
    findings = json.loads(report.read_text())["findings"]
    found = {
        frozenset(_unit_index(u["name"]) for u in f["units"])
        for f in findings
        if f["kind"] == "shared-prime"
    }
    correct = (
        code == 1
        and found == {frozenset(p) for p in planted.values()}
        and all(f["kind"] == "shared-prime" for f in findings)
    )

    hex_moduli = work / f"moduli-{count}.txt"
    hex_moduli.write_text("".join(f"{n:x}\n" for n in moduli))
    badkeys = [str(Path(sys.executable).with_name("badkeys")), "-q", "-m"]
    badkeys += ["-c", _BADKEYS_CHECKS, str(hex_moduli)]
    _, peer_seconds, peer_cpu, peer_peak = _measure(badkeys)
    shutil.rmtree(folder)
    return {
        "keys": count,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "peak_bytes": peak,
        "correct": correct,
        "peer_seconds": round(peer_seconds, 1),
        "peer_cpu_seconds": round(peer_cpu, 1),
        "peer_peak_bytes": peer_peak,
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    """Run each size and print its line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2012)
    parser.add_argument("--memory-limit", help="passed to unitcert audit")
    args = parser.parse_args()
    mode = f"--jobs {args.jobs}" + (
        f" --memory-limit {args.memory_limit}" if args.memory_limit else ""
    )

    with tempfile.TemporaryDirectory(prefix="unitcert-bench-audit-") as tmp:
        for size in (int(s) for s in args.sizes.split(",") if s):
            row = run_size(size, args.jobs, args.seed, Path(tmp), args.memory_limit)
            print(
                f"{row['keys']:>9,} RSA-2048 keys  unitcert audit {mode}: "
                f"{row['seconds']:.1f} s (cpu {row['cpu_seconds']:.0f} s), peak "
                f"{row['peak_bytes'] / 2**30:.2f} GiB, correct={row['correct']}  |  "
                f"badkeys -m (single-key checks only): {row['peer_seconds']:.1f} s "
                f"(cpu {row['peer_cpu_seconds']:.0f} s), peak "
                f"{row['peer_peak_bytes'] / 2**30:.2f} GiB  |  ours/badkeys wall "
                f"{row['seconds'] / row['peer_seconds']:.2f}x  "
                f"(load {row['load_average']:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
