"""What many test modules need: free loopback ports, polling, TLS clients, and a
real ``unitcert device serve`` in its own process."""

from __future__ import annotations

import contextlib
import html
import http.client
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from unitcert import code, device
from unitcert.store import StateStore

UNITCERT = [sys.executable, "-m", "unitcert"]


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until it holds; return the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def port_open(port: int) -> bool:
    """Say whether something accepts TCP connections on the loopback port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def leaf_der(port: int, server_name: str | None = None) -> bytes:
    """Complete a handshake without trusting anything; return the served leaf."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def code_of_der(der: bytes) -> str:
    """The fingerprint code of a DER certificate, as a client computes it."""
    return str(code.code_for_spki(code.spki_from_cert_der(der)))


def served_code(port: int, server_name: str | None = None) -> str:
    """The fingerprint code of the key served on the loopback port."""
    return code_of_der(leaf_der(port, server_name))


@dataclass
class ServedUnit:
    """A running ``unitcert device serve`` and its state."""

    store: StateStore
    https_port: int
    http_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.https_port}"

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")

    def wait_for_log(self, text: str, *, count: int = 1, timeout: float = 3.0) -> None:
        wait_until(
            lambda: self.log().count(text) >= count, timeout, f"{text!r} in the log"
        )

    def unit(self) -> device.Unit:
        return device.load_unit(self.store)

    def code(self) -> str:
        return served_code(self.https_port)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=15)


@contextlib.contextmanager
def serving(
    store: StateStore, log_dir: Path, *, verbose: bool = True
) -> Iterator[ServedUnit]:
    """Run ``unitcert device serve`` on ``store`` on free loopback ports.

    Yields once both ports listen and the serve holds the state's serving lock
    (so tests that compare the state tree start from a settled one); asserts
    at the end that the process stopped cleanly on SIGTERM.
    """
    https_port, http_port = free_port(), free_port()
    log_path = log_dir / "serve.log"
    command = [*UNITCERT, *(["-v"] if verbose else []), "device", "serve"]
    command += ["--state", str(store.root), "--https-port", str(https_port)]
    command += ["--http-port", str(http_port)]
    with (
        open(log_path, "wb") as log,
        open(log_dir / "serve.out", "wb") as out,
        subprocess.Popen(command, stdout=out, stderr=log) as process,
    ):
        served = ServedUnit(store, https_port, http_port, process, log_path)
        try:
            wait_until(
                lambda: (
                    not served.alive()
                    or (
                        port_open(https_port)
                        and port_open(http_port)
                        and store.serving_pid() is not None
                    )
                ),
                20,
                "the server to listen",
            )
            assert served.alive(), served.log()
            yield served
        finally:
            returncode = served.stop()
        assert returncode == 0, f"serve exited with {returncode}:\n{served.log()}"


@dataclass
class Reply:
    """One HTTP response, its body decoded."""

    status: int
    headers: http.client.HTTPMessage
    body: str

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")

    @property
    def text(self) -> str:
        """The page's text with the HTML tags removed and entities decoded."""
        return html.unescape(re.sub(r"<[^>]+>", " ", self.body))

    def set_cookies(self) -> list[str]:
        return self.headers.get_all("Set-Cookie") or []

    def field(self, name: str) -> str:
        """The value of the page's form field ``name``."""
        match = re.search(rf'name="{name}" value="([^"]+)"', self.body)
        assert match, self.body
        return match.group(1)

    def csrf_token(self) -> str:
        return self.field("csrf_token")


@dataclass
class Browser:
    """Talks HTTPS to the unit and keeps its cookies, like a browser would.

    It checks the unit's key by its code elsewhere, as a customer does, not by
    a CA: the certificate is not verified here.
    """

    port: int
    cookies: dict[str, str] = field(default_factory=dict)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=context, timeout=20
        )
        all_headers = dict(headers or {})
        if self.cookies:
            all_headers["Cookie"] = "; ".join(
                f"{k}={v}" for k, v in self.cookies.items()
            )
        if body is not None:
            all_headers.setdefault(
                "Content-Type", content_type or "application/x-www-form-urlencoded"
            )
        try:
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            reply = Reply(
                response.status, response.headers, response.read().decode("utf-8")
            )
        finally:
            connection.close()
        for header in reply.set_cookies():
            for name, morsel in SimpleCookie(header).items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return reply

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(
        self, path: str, fields: dict[str, str], headers: dict[str, str] | None = None
    ) -> Reply:
        return self.request(
            "POST", path, body=urlencode(fields).encode(), headers=headers
        )

    def upload(
        self,
        path: str,
        fields: dict[str, str],
        files: Sequence[tuple[str, str, bytes]],
    ) -> Reply:
        """POST multipart/form-data: ``files`` are (field, file name, bytes)."""
        boundary = secrets.token_hex(16)
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
            f"\r\n\r\n{value}\r\n".encode()
            for name, value in fields.items()
        ]
        for name, filename, data in files:
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: application/octet-stream'
                "\r\n\r\n".encode()
                + data
                + b"\r\n"
            )
        parts.append(f"--{boundary}--\r\n".encode())
        return self.request(
            "POST",
            path,
            body=b"".join(parts),
            content_type=f"multipart/form-data; boundary={boundary}",
        )

    def login(self, password: str) -> Reply:
        token = self.get("/login").csrf_token()
        return self.post("/login", {"csrf_token": token, "password": password})
