"""Helpers for the ACME tests: a real Pebble, a real bind9, a fault-injecting
proxy in front of Pebble, and a unit served by ``unitcert device serve``.

Not a test module of its own (it holds no tests); the ACME tests import it.
Every server listens on loopback on a free port and is stopped by its owner.
Request counts come from the CA's side: Pebble's own log (one line per
request it handles) or the proxy's tally.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
from aiohttp import ClientSession, TCPConnector, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PEBBLE = "/usr/bin/pebble"
NAMED = "/usr/sbin/named"
ZONE = "unitcert.test"
UNITCERT = [sys.executable, "-m", "unitcert"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    with (
        contextlib.suppress(OSError),
        socket.create_connection(("127.0.0.1", port), timeout=0.2),
    ):
        return True
    return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def listener_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, for Pebble's and the proxy's TLS."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme test listener")])
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "listener.pem", directory / "listener-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --- bind9 ---------------------------------------------------------------------


@dataclass
class Named:
    """A real bind9 serving ``unitcert.test`` (every name is 127.0.0.1) and
    accepting TSIG-signed updates."""

    process: subprocess.Popen[bytes]
    port: int
    key_file: Path
    key_name: str
    secret: str
    directory: Path

    def txt(self, name: str) -> list[str]:
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        answer = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=2)
        return [
            b"".join(rdata.strings).decode()
            for rrset in answer.answer
            for rdata in rrset
        ]

    def stop(self) -> None:
        stop_process(self.process)


def start_named(directory: Path) -> Named:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    key_name = "unitcert-acme"
    key_text = (
        f'key "{key_name}" {{\n\talgorithm hmac-sha256;\n\tsecret "{secret}";\n}};\n'
    )
    key_file = directory / "tsig.key"
    key_file.write_text(key_text)
    (directory / f"{ZONE}.zone").write_text(
        "$TTL 5\n"
        f"@ IN SOA ns.{ZONE}. admin.{ZONE}. 1 60 60 600 5\n"
        f"@ IN NS ns.{ZONE}.\n"
        "ns IN A 127.0.0.1\n"
        "* IN A 127.0.0.1\n"
    )
    (directory / "named.conf").write_text(
        "options {\n"
        f'  directory "{directory}";\n'
        "  pid-file none;\n"
        f"  listen-on port {port} {{ 127.0.0.1; }};\n"
        "  listen-on-v6 { none; };\n"
        "  recursion no;\n"
        "  dnssec-validation no;\n"
        "  notify no;\n"
        "};\n"
        "controls { };\n"
        f"{key_text}"
        f'zone "{ZONE}" {{ type primary; file "{directory}/{ZONE}.zone"; '
        f'allow-update {{ key "{key_name}"; }}; }};\n'
    )
    with (directory / "named.log").open("wb") as log:
        process = subprocess.Popen(
            [NAMED, "-g", "-c", str(directory / "named.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    named = Named(process, port, key_file, key_name, secret, directory)

    def answers() -> bool:
        try:
            query = dns.message.make_query(f"x.{ZONE}", dns.rdatatype.A)
            dns.query.udp(query, "127.0.0.1", port=port, timeout=0.3)
        except Exception:
            return process.poll() is not None
        return True

    wait_until(answers, 20, "bind9 to answer")
    assert process.poll() is None, (directory / "named.log").read_text()
    return named


# --- Pebble --------------------------------------------------------------------


@dataclass
class Pebble:
    """A real Pebble on loopback, with its own TLS listener certificate."""

    process: subprocess.Popen[bytes]
    port: int
    management_port: int
    http_port: int
    listener_cert: Path
    log_path: Path

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.listener_cert))

    def root_pem(self) -> bytes:
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self._context()) as response:
            return bytes(response.read())

    def requests(self) -> Counter[str]:
        """Requests Pebble handled, by ``METHOD /path`` (from its own log)."""
        found: Counter[str] = Counter()
        for match in re.finditer(
            r"(GET|HEAD|POST) (\S+) -> calling handler", self.log_path.read_text()
        ):
            found[f"{match[1]} {match[2]}"] += 1
        return found

    def orders(self) -> int:
        """Orders Pebble created (a POST it refused for a bad nonce is none)."""
        return len(re.findall(r"Added order \S+ to the db", self.log_path.read_text()))

    def accounts(self) -> int:
        """Accounts Pebble created."""
        return len(re.findall(r"There are now \d+ accounts", self.log_path.read_text()))

    def stop(self) -> None:
        stop_process(self.process)


def start_pebble(
    directory: Path,
    *,
    http_port: int,
    dns_port: int,
    nosleep: bool = True,
    nonce_reject: int = 30,
    validity: int = 90 * 86400,
) -> Pebble:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = listener_cert(directory)
    port, management = free_port(), free_port()
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{port}",
            "managementListenAddress": f"127.0.0.1:{management}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": validity,
        }
    }
    (directory / "pebble.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
    env["PEBBLE_WFE_NONCEREJECT"] = str(nonce_reject)
    if nosleep:
        env["PEBBLE_VA_NOSLEEP"] = "1"
    log_path = directory / "pebble.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                PEBBLE,
                "-config",
                str(directory / "pebble.json"),
                "-dnsserver",
                f"127.0.0.1:{dns_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    wait_until(lambda: port_open(port) or process.poll() is not None, 20, "Pebble")
    assert process.poll() is None, log_path.read_text()
    return Pebble(process, port, management, http_port, cert, log_path)


# --- a proxy in front of Pebble that adds what Pebble 2.4 lacks ------------------


@dataclass
class Faults:
    """What the proxy changes. Counts are of requests that reached it."""

    rate_limit_orders: int = 0
    retry_after: int = 3600
    ari_window: tuple[dt.datetime, dt.datetime] | None = None
    ari_retry_after: int = 21600
    profiles: dict[str, str] | None = None
    seen: Counter[str] = field(default_factory=Counter)
    # Orders the CA answered: created by Pebble, or refused by a rate limit
    # (a POST that Pebble refused for a bad nonce is no order).
    orders: int = 0
    order_payloads: list[dict[str, Any]] = field(default_factory=list)


class FaultProxy:
    """A TLS reverse proxy in front of Pebble (Pebble builds its URLs from the
    Host header, so they point back at the proxy)."""

    def __init__(self, pebble: Pebble, faults: Faults) -> None:
        self.pebble = pebble
        self.faults = faults
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        client_tls = ssl.create_default_context(cafile=str(self.pebble.listener_cert))
        self.session_for = ClientSession(connector=TCPConnector(ssl=client_tls))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(
            self.pebble.listener_cert,
            self.pebble.listener_cert.with_name("listener-key.pem"),
        )
        site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=server_tls)
        await site.start()
        self._ready.set()
        await self._stop.wait()
        await self.session_for.close()
        await runner.cleanup()

    async def _nonce(self) -> str:
        url = f"https://127.0.0.1:{self.pebble.port}/nonce-plz"
        async with self.session_for.head(url) as response:
            return response.headers["Replay-Nonce"]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = await self._answer(request)
        # No keep-alive: nothing is left open when the proxy stops.
        response.force_close()
        return response

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        faults = self.faults
        path = request.rel_url.path
        faults.seen[f"{request.method} {path}"] += 1
        body = await request.read()
        if path.startswith("/renewal-info/") and faults.ari_window is not None:
            start, end = faults.ari_window
            return web.json_response(
                {
                    "suggestedWindow": {
                        "start": start.isoformat().replace("+00:00", "Z"),
                        "end": end.isoformat().replace("+00:00", "Z"),
                    }
                },
                headers={"Retry-After": str(faults.ari_retry_after)},
            )
        if path == "/order-plz" and request.method == "POST":
            payload = json.loads(body)["payload"]
            decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            faults.order_payloads.append(json.loads(decoded))
            if faults.rate_limit_orders > 0:
                faults.rate_limit_orders -= 1
                faults.orders += 1
                return web.json_response(
                    {
                        "type": "urn:ietf:params:acme:error:rateLimited",
                        "detail": "too many new orders recently",
                        "status": 429,
                    },
                    status=429,
                    content_type="application/problem+json",
                    headers={
                        "Retry-After": str(faults.retry_after),
                        "Replay-Nonce": await self._nonce(),
                    },
                )
        url = f"https://127.0.0.1:{self.pebble.port}{request.rel_url}"
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower()
            not in ("content-length", "transfer-encoding", "accept-encoding")
        }
        async with self.session_for.request(
            request.method, url, data=body, headers=headers
        ) as upstream:
            data = await upstream.read()
            out_headers = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower()
                not in ("content-length", "transfer-encoding", "content-encoding")
            }
            if path == "/order-plz" and upstream.status == 201:
                faults.orders += 1
            if path == "/dir" and upstream.status == 200:
                directory = json.loads(data)
                if faults.ari_window is not None:
                    directory["renewalInfo"] = (
                        f"https://127.0.0.1:{self.port}/renewal-info"
                    )
                if faults.profiles is not None:
                    directory.setdefault("meta", {})["profiles"] = faults.profiles
                data = json.dumps(directory).encode()
            return web.Response(status=upstream.status, body=data, headers=out_headers)

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


# --- a unit ---------------------------------------------------------------------


@dataclass
class Unit:
    """A unit's state, and its ``serve`` process when running."""

    state: Path
    https_port: int
    http_port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*UNITCERT, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> None:
        assert self.log_path is not None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *UNITCERT,
                    "device",
                    "serve",
                    "--state",
                    str(self.state),
                    "--https-port",
                    str(self.https_port),
                    "--http-port",
                    str(self.http_port),
                    "--entropy-timeout",
                    "5",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = self.process
        wait_until(
            lambda: (
                (
                    port_open(self.https_port)
                    and (self.state / "serve.pid").exists()
                    and _locked(self.state / "serve.pid")
                )
                or process.poll() is not None
            ),
            30,
            "serve to listen",
        )
        assert process.poll() is None, self.log()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def served_pem(self, server_name: str) -> bytes:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection(("127.0.0.1", self.https_port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).public_bytes(
            serialization.Encoding.PEM
        )


def _locked(path: Path) -> bool:
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def make_unit(root: Path, http_port: int) -> Unit:
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["UNITCERT_MACHINE_ID"] = f"acme-test-{secrets.token_hex(4)}"
    unit = Unit(
        root / "state", free_port(), http_port, env, log_path=root / "serve.log"
    )
    done = unit.cli(
        "device", "init", "--state", str(unit.state), "--entropy-timeout", "5"
    )
    assert done.returncode == 0, done.stderr
    return unit


def openssl_verify(
    port: int, root: Path, name: str, *, ip: bool = False
) -> subprocess.CompletedProcess[str]:
    check = ["-verify_ip", name] if ip else ["-verify_hostname", name]
    server_name = [] if ip else ["-servername", name]
    return subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            *server_name,
            "-CAfile",
            str(root),
            *check,
            "-verify_return_error",
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@contextlib.contextmanager
def serving(unit: Unit) -> Iterator[Unit]:
    unit.start()
    try:
        yield unit
    finally:
        unit.stop()
