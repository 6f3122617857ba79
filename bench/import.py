"""Importing an owner's certificate: validate and install, then serve it.

Three figures, each the median of ``--runs`` runs (default 20):

- validate and install a PEM bundle with a 3-certificate RSA-2048 chain
  (leaf, intermediate, root) and its key: ``prepare_import`` (parse, key
  match, weak-key checks, chain verification by ``cryptography``) then
  ``install_custom`` (one fsync-ed commit of the state);
- the same from a PKCS#12 file (AES-256 with PBKDF2, as ``cryptography``
  writes it by default) with its password;
- from the install to the first TLS handshake that presents the new key,
  against a running ``unitcert device serve``: once by a state commit (as
  ``unitcert device import`` does; serve polls the state every 0.5 s) and
  once by the admin page's "Install" button (which reloads at once).

The peer, in the same run: the OpenSSL CLI doing the core of the check on
the same files: ``openssl verify`` of the chain, and the key match (public
key of the certificate against the key's), as three processes; for PKCS#12
``openssl pkcs12`` opens the file first. It writes no state and runs no
weak-key checks, so it is a floor to compare with, not the same job.

Run: ``.venv/bin/python bench/import.py [--runs N]``. It prints a table and
rewrites the ``## import`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import os
import platform
import random
import re
import secrets
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from unitcert import code, device
from unitcert.custom.bundle import InputFile
from unitcert.custom.check import Candidate
from unitcert.custom.install import install_custom, prepare_import
from unitcert.store import StateStore

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## import"
SERIAL = "bench0001"
HOSTNAME = f"{SERIAL}.unit.home.arpa"
PASSWORD = b"bench pkcs12 password"
# A throwaway password for the admin page of the unit made for the run.
ADMIN_PASSWORD = secrets.token_urlsafe(16)
POLL = 0.01


# --- a customer's CA ----------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _sign(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None,
    *,
    ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signer = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]), critical=False
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


@dataclass(frozen=True)
class Chain:
    root: x509.Certificate
    inter: x509.Certificate
    leaf: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def code(self) -> str:
        der = self.leaf.public_bytes(serialization.Encoding.DER)
        return str(code.code_for_spki(code.spki_from_cert_der(der)))

    def pem(self, *certs: x509.Certificate) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def bundle(self) -> bytes:
        return self.pem(self.leaf, self.inter, self.root) + self.key_pem()

    def pkcs12(self) -> bytes:
        return pkcs12.serialize_key_and_certificates(
            b"unit",
            self.key,
            self.leaf,
            [self.inter, self.root],
            serialization.BestAvailableEncryption(PASSWORD),
        )


def make_chain(root_key: rsa.RSAPrivateKey, inter_key: rsa.RSAPrivateKey) -> Chain:
    root = _sign("Bench Root CA", root_key, None, ca=True)
    inter = _sign("Bench Issuing CA", inter_key, (root, root_key), ca=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = _sign(HOSTNAME, key, (inter, inter_key), ca=False)
    return Chain(root, inter, leaf, key)


# --- timing ---------------------------------------------------------------------


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000


def timed(job: Callable[[], object]) -> float:
    start = time.perf_counter()
    job()
    return time.perf_counter() - start


def ours(store: StateStore, files: list[InputFile], password: bytes | None) -> float:
    def job() -> None:
        candidate = prepare_import(store, files, password=password)
        install_custom(store, candidate)

    return timed(job)


def openssl_peer(directory: Path, chain: Chain, *, from_pkcs12: bool) -> float:
    (directory / "root.pem").write_bytes(chain.pem(chain.root))
    (directory / "inter.pem").write_bytes(chain.pem(chain.inter))
    (directory / "leaf.pem").write_bytes(chain.pem(chain.leaf))
    (directory / "leaf.key").write_bytes(chain.key_pem())
    (directory / "unit.p12").write_bytes(chain.pkcs12())
    (directory / "pass").write_bytes(PASSWORD + b"\n")
    d = directory

    def run(command: str) -> bytes:
        return subprocess.run(
            ["openssl", *command.split()], check=True, capture_output=True
        ).stdout

    def job() -> None:
        if from_pkcs12:
            run(f"pkcs12 -in {d}/unit.p12 -passin file:{d}/pass -nodes -out {d}/all")
        run(f"verify -CAfile {d}/root.pem -untrusted {d}/inter.pem {d}/leaf.pem")
        cert_key = run(f"x509 -in {d}/leaf.pem -noout -pubkey")
        private = run(f"pkey -in {d}/leaf.key -pubout")
        if cert_key != private:
            raise SystemExit("openssl: the key does not match")

    return timed(job)


# --- a running unit ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def served_code(port: int) -> str | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError:
        return None
    if der is None:
        return None
    return str(code.code_for_spki(code.spki_from_cert_der(der)))


def wait_for_code(port: int, expected: str, start: float, timeout: float = 5) -> float:
    while served_code(port) != expected:
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"the unit did not serve {expected} within {timeout} s")
        time.sleep(POLL)
    return time.perf_counter() - start


@contextmanager
def serving(store: StateStore, directory: Path) -> Iterator[int]:
    port = _free_port()
    command = [sys.executable, "-m", "unitcert", "device", "serve"]
    command += ["--state", str(store.root), "--https-port", str(port)]
    command += ["--http-port", str(_free_port())]
    with (
        open(directory / "serve.log", "wb") as log,
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log) as process,
    ):
        try:
            deadline = time.monotonic() + 30
            while served_code(port) is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("unitcert device serve did not start")
                time.sleep(0.05)
            yield port
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)


class Client:
    """Just enough of a browser for the admin page's upload and install."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, body: bytes = b"", kind: str = "") -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=context, timeout=30
        )
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        if kind:
            headers["Content-Type"] = kind
        try:
            connection.request(method, path, body=body or None, headers=headers)
            response = connection.getresponse()
            text = response.read().decode("utf-8")
            for header in response.headers.get_all("Set-Cookie") or []:
                for name, morsel in SimpleCookie(header).items():
                    self.cookies[name] = morsel.value
        finally:
            connection.close()
        return text

    def form(self, path: str, fields: dict[str, str]) -> str:
        body = urlencode(fields).encode()
        return self.request("POST", path, body, "application/x-www-form-urlencoded")

    def upload(self, fields: dict[str, str], name: str, data: bytes) -> str:
        boundary = secrets.token_hex(12)
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'
            f"{v}\r\n".encode()
            for k, v in fields.items()
        ]
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="bundle"; '
            f'filename="{name}"\r\n\r\n'.encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return self.request(
            "POST",
            "/certificate/preview",
            b"".join(parts),
            f"multipart/form-data; boundary={boundary}",
        )


def _hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]+)"', page)
    if match is None:
        raise SystemExit(f"the page has no {name} field")
    return match.group(1)


# --- the run ------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    bundle: list[float]
    bundle_peer: list[float]
    pkcs12: list[float]
    pkcs12_peer: list[float]
    by_commit: list[float]
    by_page: list[float]


def bench(runs: int) -> Figures:
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    inter_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    chains = [make_chain(root_key, inter_key) for _ in range(2)]
    with tempfile.TemporaryDirectory(prefix="unitcert-import-") as temporary:
        directory = Path(temporary)
        store = StateStore(directory / "state")
        device.init_unit(store, serial=SERIAL)
        admin = device.load_unit(store).admin
        assert admin is not None
        device.save_admin_credential(store, admin.with_password(ADMIN_PASSWORD))
        bundle = [InputFile("bundle.pem", chains[0].bundle())]
        p12 = [InputFile("unit.p12", chains[0].pkcs12())]

        ours(store, bundle, None)  # warm-up: imports, badkeys, page cache
        openssl_peer(directory, chains[0], from_pkcs12=True)
        figures = Figures([], [], [], [], [], [])
        for _ in range(runs):
            figures.bundle.append(ours(store, bundle, None))
            figures.pkcs12.append(ours(store, p12, PASSWORD))
            figures.bundle_peer.append(
                openssl_peer(directory, chains[0], from_pkcs12=False)
            )
            figures.pkcs12_peer.append(
                openssl_peer(directory, chains[0], from_pkcs12=True)
            )

        candidates: list[Candidate] = [
            prepare_import(store, [InputFile("b.pem", c.bundle())]) for c in chains
        ]
        with serving(store, directory) as port:
            for index in range(runs):
                # The first chain is served after the runs above: alternate from 1.
                chain, candidate = chains[(index + 1) % 2], candidates[(index + 1) % 2]
                if served_code(port) == chain.code:
                    raise SystemExit("the next certificate is already served")
                # Without this, every commit would follow a reload by the same
                # few milliseconds, phase-locked to serve's 0.5 s watcher.
                time.sleep(random.uniform(0, 0.5))
                start = time.perf_counter()
                install_custom(store, candidate)
                figures.by_commit.append(wait_for_code(port, chain.code, start))
            client = Client(port)
            token = _hidden(client.request("GET", "/login"), "csrf_token")
            client.form("/login", {"csrf_token": token, "password": ADMIN_PASSWORD})
            csrf = _hidden(client.request("GET", "/certificate"), "csrf_token")
            for _ in range(runs):
                chain = next(c for c in chains if c.code != served_code(port))
                page = client.upload({"csrf_token": csrf}, "b.pem", chain.bundle())
                fields = {"csrf_token": csrf, "preview": _hidden(page, "preview")}
                start = time.perf_counter()
                client.form("/certificate/install", fields)
                figures.by_page.append(wait_for_code(port, chain.code, start))
    return figures


def table(figures: Figures) -> str:
    def row(what: str, samples: list[float], peer: list[float] | None) -> str:
        ours_ms = median_ms(samples)
        best = min(samples) * 1000
        if peer is None:
            return f"| {what} | {ours_ms:.1f} ms (best {best:.1f}) | | |"
        peer_ms = median_ms(peer)
        return (
            f"| {what} | {ours_ms:.1f} ms (best {best:.1f}) | {peer_ms:.1f} ms | "
            f"{ours_ms / peer_ms:.2f}x |"
        )

    return "\n".join(
        [
            "| what | ours | OpenSSL CLI | ratio |",
            "|---|---:|---:|---:|",
            row(
                "validate + install, PEM, 3 x RSA-2048",
                figures.bundle,
                figures.bundle_peer,
            ),
            row(
                "validate + install, PKCS#12 (AES, PBKDF2)",
                figures.pkcs12,
                figures.pkcs12_peer,
            ),
            row("install (state commit) to first handshake", figures.by_commit, None),
            row("Install button to first handshake", figures.by_page, None),
        ]
    )


def machine() -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    openssl_version = subprocess.run(
        ["openssl", "version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return [
        f"nproc {os.cpu_count()}, CPU {cpu}",
        f"Python {platform.python_version()}, {openssl_version}, "
        f"Linux {platform.release()}, unitcert at {commit or 'unknown'}",
    ]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def section(figures: Figures, runs: int, command: str, loads: tuple[str, str]) -> str:
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            SECTION,
            "",
            f"Run {today} with `{command}`, median of {runs} runs per cell after "
            "one uncounted warm-up.",
            "",
            *(f"- {line}" for line in machine()),
            f"- load average (1, 5, 15 min) before the run {loads[0]}, after "
            f"{loads[1]}: other work on the machine shares its {os.cpu_count()} cores",
            "",
            table(figures),
            "",
            "Ours: `prepare_import` (parse, key match, weak-key checks with badkeys "
            "and the RFC-key blocklist, chain verification with "
            "`cryptography.x509.verification`) and `install_custom` (one fsync-ed "
            "state commit), in-process. OpenSSL CLI: `openssl verify` of the chain "
            "and the public-key match (`x509 -pubkey`, `pkey -pubout`), and for "
            "PKCS#12 `openssl pkcs12 -nodes` first: three or four processes, no "
            "weak-key checks, no state write; a floor, not the same job. Install "
            "to handshake: a Python `ssl` client polling every 10 ms against "
            "`unitcert device serve`; a state commit (what `device import` does) is "
            "picked up by serve's 0.5 s watcher (commits are made at a random "
            "moment of its cycle), the admin page's Install button reloads at "
            "once. Target: served within 2 s.",
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
    parser.add_argument("--runs", type=int, default=20, help="runs per cell (>= 1)")
    parser.add_argument(
        "--no-results", action="store_true", help="do not rewrite bench/RESULTS.md"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("need --runs >= 1")
    command = shlex.join(
        [".venv/bin/python", "bench/import.py", *(argv or sys.argv[1:])]
    )
    print(f"import: {args.runs} runs (+1 warm-up)")
    load_before = load_average()
    figures = bench(args.runs)
    loads = (load_before, load_average())
    print()
    print(table(figures))
    print(f"load average before {loads[0]}, after {loads[1]}")
    if not args.no_results:
        write_results(section(figures, args.runs, command, loads))
        print(f"\nwrote the {SECTION} section of {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
