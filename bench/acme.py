"""One ACME issuance for one name, against one Pebble: unitcert, certbot and lego.

All three run in the same process tree against the same Pebble
(``PEBBLE_VA_NOSLEEP=1``, and ``PEBBLE_WFE_NONCEREJECT=0`` so that no client
pays for random nonce rejections the others are spared), with a bind9 that
resolves every name under ``unitcert.test`` to 127.0.0.1. Each round gives
each client a fresh account and a fresh name, so every issuance is the same
work: directory, nonce, new account, new order, HTTP-01, finalize, download.

- unitcert: ``unitcert device acme --state D --directory ... --domain NAME``
  against a ``unitcert device serve`` that already runs (a unit serves all the
  time; the command returns once serve has installed the certificate), its
  HTTP-01 answered by serve's own HTTP port;
- certbot: ``certbot certonly --standalone`` (PyPI ``certbot``);
- lego: ``lego --http run`` (Debian ``lego``).

The figures: wall time of the command, and the HTTP requests Pebble handled
while it ran (counted from Pebble's own log, one line per request; for
unitcert from the start to the stop of ``serve``, so nothing it sends later
is missed). Medians over the rounds. Target: unitcert sends no more requests
than the fewer of the two, and its wall time is within 1.2x of the faster.

Run: ``.venv/bin/python bench/acme.py [--rounds N]``. It prints a table and
rewrites the ``## acme`` section of ``bench/RESULTS.md``. It reuses the ACME
tests' helpers (``tests/test_acme_support.py``) to start Pebble and bind9.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
support = importlib.import_module("test_acme_support")
Pebble = support.Pebble

RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## acme"
CERTBOT = Path(sys.executable).with_name("certbot")
LEGO = Path("/usr/bin/lego")
REQUEST_TARGET = 1.0
TIME_TARGET = 1.2


@dataclass(frozen=True)
class Sample:
    """One issuance: wall seconds and requests Pebble handled."""

    seconds: float
    requests: int


def _requests(pebble: Pebble) -> int:
    return sum(pebble.requests().values())


def _checked(done: subprocess.CompletedProcess[str], who: str) -> None:
    if done.returncode != 0:
        raise RuntimeError(
            f"{who} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )


def run_unitcert(pebble: Pebble, work: Path, name: str) -> Sample:
    unit = support.make_unit(work / "unit", pebble.http_port)
    before = _requests(pebble)
    unit.start()
    try:
        started = time.perf_counter()
        done = unit.cli(
            "device",
            "acme",
            "--state",
            str(unit.state),
            "--directory",
            pebble.directory,
            "--domain",
            name,
            "--ca-bundle",
            str(pebble.listener_cert),
        )
        seconds = time.perf_counter() - started
        _checked(done, "unitcert")
    finally:
        unit.stop()
    return Sample(seconds, _requests(pebble) - before)


def run_certbot(pebble: Pebble, work: Path, name: str) -> Sample:
    env = dict(os.environ, REQUESTS_CA_BUNDLE=str(pebble.listener_cert))
    command = [
        str(CERTBOT),
        "certonly",
        "--standalone",
        "--non-interactive",
        "--agree-tos",
        "--register-unsafely-without-email",
        "--server",
        pebble.directory,
        "-d",
        name,
        "--http-01-port",
        str(pebble.http_port),
        "--http-01-address",
        "127.0.0.1",
        "--config-dir",
        str(work / "config"),
        "--work-dir",
        str(work / "work"),
        "--logs-dir",
        str(work / "logs"),
    ]
    before = _requests(pebble)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    _checked(done, "certbot")
    return Sample(seconds, _requests(pebble) - before)


def run_lego(pebble: Pebble, work: Path, name: str) -> Sample:
    env = dict(os.environ, LEGO_CA_CERTIFICATES=str(pebble.listener_cert))
    command = [
        str(LEGO),
        "--server",
        pebble.directory,
        "--email",
        "bench@example.com",
        "--accept-tos",
        "--domains",
        name,
        "--http",
        "--http.port",
        f"127.0.0.1:{pebble.http_port}",
        "--path",
        str(work / "lego"),
        "run",
    ]
    before = _requests(pebble)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    _checked(done, "lego")
    return Sample(seconds, _requests(pebble) - before)


CLIENTS: dict[str, Callable[[Pebble, Path, str], Sample]] = {
    "unitcert": run_unitcert,
    "certbot": run_certbot,
    "lego": run_lego,
}


def versions() -> str:
    def first_line(command: list[str]) -> str:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        return (done.stdout or done.stderr).strip().splitlines()[0]

    certbot = first_line([str(CERTBOT), "--version"])
    lego = first_line(["dpkg-query", "-W", "-f", "${Version}", "lego"])
    pebble = first_line(["dpkg-query", "-W", "-f", "${Version}", "pebble"])
    return f"{certbot}, lego {lego} (Debian), Pebble {pebble} (Debian)"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def bench(rounds: int, work: Path) -> dict[str, list[Sample]]:
    named = support.start_named(work / "named")
    pebble = support.start_pebble(
        work / "pebble",
        http_port=support.free_port(),
        dns_port=named.port,
        nonce_reject=0,
    )
    samples: dict[str, list[Sample]] = {name: [] for name in CLIENTS}
    try:
        for round_number in range(rounds):
            for client, job in CLIENTS.items():
                name = f"{client}-{round_number}.unitcert.test"
                sample = job(pebble, work / f"{client}-{round_number}", name)
                samples[client].append(sample)
                print(
                    f"round {round_number + 1}: {client:<8} {sample.seconds:6.2f} s "
                    f"{sample.requests:3d} requests",
                    flush=True,
                )
    finally:
        pebble.stop()
        named.stop()
    return samples


def section(
    samples: dict[str, list[Sample]], command: str, loads: tuple[str, str]
) -> str:
    medians = {
        client: Sample(
            statistics.median(s.seconds for s in runs),
            int(statistics.median(s.requests for s in runs)),
        )
        for client, runs in samples.items()
    }
    ours = medians["unitcert"]
    fewest = min(medians["certbot"].requests, medians["lego"].requests)
    fastest = min(medians["certbot"].seconds, medians["lego"].seconds)
    request_ratio = ours.requests / fewest
    time_ratio = ours.seconds / fastest
    rows = [
        "| client | wall time (median) | fastest | requests (median) | range |",
        "|---|---:|---:|---:|---:|",
    ]
    for client, runs in samples.items():
        median = medians[client]
        counts = [s.requests for s in runs]
        rows.append(
            f"| {client} | {median.seconds:.2f} s | "
            f"{min(s.seconds for s in runs):.2f} s | {median.requests} | "
            f"{min(counts)}-{max(counts)} |"
        )
    request_verdict = "met" if request_ratio <= REQUEST_TARGET else "NOT met"
    time_verdict = "met" if time_ratio <= TIME_TARGET else "NOT met"
    rounds = len(samples["unitcert"])
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            SECTION,
            "",
            f"Run {now} with `{command}`, {rounds} rounds, each client in turn with a "
            "fresh account and a fresh name against the same Pebble "
            "(`PEBBLE_VA_NOSLEEP=1`, `PEBBLE_WFE_NONCEREJECT=0`).",
            "",
            f"- nproc {os.cpu_count()}, Python {platform.python_version()}, "
            f"{versions()}",
            f"- load average (1, 5, 15 min) before the run {loads[0]}, after "
            f"{loads[1]}: other work on the machine shares its cores",
            "",
            *rows,
            "",
            f"- requests: unitcert {ours.requests} / fewest of the two {fewest} = "
            f"{request_ratio:.2f}x (target at most {REQUEST_TARGET:.1f}x: "
            f"{request_verdict})",
            f"- wall time: unitcert {ours.seconds:.2f} s / faster of the two "
            f"{fastest:.2f} s = {time_ratio:.2f}x (target at most {TIME_TARGET:.1f}x: "
            f"{time_verdict})",
            "",
            "Requests are those Pebble handled while the client ran, from Pebble's "
            "own log. unitcert's wall time is the `unitcert device acme` command "
            "against a `serve` that already runs (serve's start is not counted; its "
            "requests are); certbot's and lego's include starting their own HTTP-01 "
            "listener.",
            "",
        ]
    )


def write_results(text: str) -> None:
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = current.find(f"\n{SECTION}\n")
    if start == -1:
        updated = current.rstrip("\n") + "\n\n" + text
    else:
        end = current.find("\n## ", start + 1)
        after = current[end + 1 :] if end != -1 else ""
        updated = current[: start + 1] + text + ("\n" + after if after else "")
    RESULTS.write_text(updated)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    for tool in (CERTBOT, LEGO, Path("/usr/bin/pebble"), Path("/usr/sbin/named")):
        if not tool.exists():
            print(
                f"{tool} is missing: run scripts/system-deps and make", file=sys.stderr
            )
            return 2
    loads = [load_average()]
    with tempfile.TemporaryDirectory(prefix="unitcert-bench-acme-") as work:
        samples = bench(args.rounds, Path(work))
    loads.append(load_average())
    command = "python bench/acme.py" + (f" --rounds {args.rounds}")
    text = section(samples, command, (loads[0], loads[1]))
    print()
    print(text)
    write_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
