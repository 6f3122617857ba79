"""The unit's HTTPS admin server, run as ``unitcert device serve`` in a real process.

Clients are real: ``openssl s_client``, ``curl`` and Python's ``ssl``; the
admin pages are driven over real TLS with :mod:`http.client`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from support import (
    Browser,
    Reply,
    code_of_der,
    free_port,
    port_open,
    served_code,
    serving,
    wait_until,
)
from support import (
    ServedUnit as Server,
)
from unitcert import code, device
from unitcert.errors import InputError
from unitcert.store import Part, StateStore
from unitcert.web import pages, run_server

NEW_PASSWORD = "correct horse battery staple"

# --- a server in its own process ---------------------------------------------


@contextlib.contextmanager
def _serving(tmp_path: Path, *, verbose: bool = True) -> Iterator[Server]:
    store = StateStore(tmp_path / "state")
    device.init_unit(store)
    with serving(store, tmp_path, verbose=verbose) as running:
        yield running


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with _serving(tmp_path) as running:
        yield running


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the tests that change no state and fail at most a login."""
    with _serving(tmp_path_factory.mktemp("shared")) as running:
        yield running


# --- TLS clients ---------------------------------------------------------------


def _client_context() -> ssl.SSLContext:
    # The unit's certificate is self-signed: these clients check its key by
    # the fingerprint code, as a customer does, not by a CA.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@contextlib.contextmanager
def _tls(port: int) -> Iterator[ssl.SSLSocket]:
    """A handshaken TLS connection that sends no SNI."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        _client_context().wrap_socket(raw, server_hostname=None) as tls,
    ):
        yield tls


def _read_response(tls: ssl.SSLSocket) -> bytes:
    chunks = []
    while chunk := tls.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _wait_for_code(server: Server, expected: str, timeout: float = 2.0) -> float:
    return wait_until(
        lambda: served_code(server.https_port) == expected, timeout, f"code {expected}"
    )


# --- a small browser -------------------------------------------------------------


def _setup_credential(server: Server) -> str:
    admin = server.unit().admin
    assert admin is not None and admin.setup is not None
    return admin.setup


# --- the certificate the clients receive ---------------------------------------

_S_CLIENT = ["openssl", "s_client", "-connect"]
# -k: the certificate is self-signed; the pin or the code is what is checked.
_CURL = ["curl", "-sSk"]


def test_openssl_s_client_receives_the_unit_certificate(shared_server: Server) -> None:
    result = subprocess.run(
        [*_S_CLIENT, f"127.0.0.1:{shared_server.https_port}", "-servername", "x"],
        input=b"",
        capture_output=True,
        timeout=20,
        check=True,
    )

    cert = x509.load_pem_x509_certificate(result.stdout)
    received = code_of_der(cert.public_bytes(Encoding.DER))
    assert received == str(shared_server.unit().info.code)


def test_curl_with_the_unit_pin_gets_the_login_page(shared_server: Server) -> None:
    pin = shared_server.unit().info.pin
    url = f"https://127.0.0.1:{shared_server.https_port}/login"

    result = subprocess.run(
        [*_CURL, "--pinnedpubkey", f"sha256//{pin}", "-w", "%{certs}", "-D", "-", url],
        capture_output=True,
        timeout=20,
        check=True,
        text=True,
    )

    assert result.stdout.startswith("HTTP/1.1 200")
    assert "Log in to this unit" in result.stdout
    cert = x509.load_pem_x509_certificate(result.stdout.encode())
    received = code_of_der(cert.public_bytes(Encoding.DER))
    assert received == str(shared_server.unit().info.code)


def test_curl_with_a_wrong_pin_fails(shared_server: Server) -> None:
    wrong = code.spki_pin(b"not the unit's key")
    url = f"https://127.0.0.1:{shared_server.https_port}/login"

    result = subprocess.run(
        [*_CURL, "--pinnedpubkey", f"sha256//{wrong}", url],
        capture_output=True,
        timeout=20,
        text=True,
    )

    assert result.returncode == 90  # CURLE_SSL_PINNEDPUBKEYNOTMATCH
    assert "Log in" not in result.stdout


def test_python_ssl_without_sni_receives_the_unit_certificate(
    shared_server: Server,
) -> None:
    with _tls(shared_server.https_port) as tls:
        der = tls.getpeercert(binary_form=True)
        version = tls.version()

    assert der is not None
    assert code_of_der(der) == str(shared_server.unit().info.code)
    assert version in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize(
    ("options", "accepted"),
    [
        (["-tls1_2"], True),
        (["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"], False),
        (["-tls1_2", "-cipher", "AES128-SHA"], False),  # no forward secrecy
    ],
)
def test_only_tls_1_2_and_up_with_forward_secrecy_is_accepted(
    shared_server: Server, options: list[str], accepted: bool
) -> None:
    result = subprocess.run(
        [*_S_CLIENT, f"127.0.0.1:{shared_server.https_port}", *options],
        input=b"",
        capture_output=True,
        timeout=20,
    )

    assert (b"Cipher is (NONE)" not in result.stdout) is accepted
    assert (result.returncode == 0) is accepted
    assert shared_server.alive()


# --- hot reload -----------------------------------------------------------------


def test_new_identity_is_served_without_restart_and_open_connections_finish(
    server: Server,
) -> None:
    old_code = str(server.unit().info.code)
    pid = server.process.pid

    with _tls(server.https_port) as before:
        before_der = before.getpeercert(binary_form=True)
        assert before_der is not None
        assert code_of_der(before_der) == old_code

        new_code = str(
            device.reset_unit(server.store, regenerate_identity=True).unit.info.code
        )
        took = _wait_for_code(server, new_code, timeout=2.0)

        before.sendall(
            b"GET /login HTTP/1.1\r\nHost: unit\r\nConnection: close\r\n\r\n"
        )
        response = _read_response(before)

    assert new_code != old_code
    assert took < 2.0
    assert server.alive() and server.process.pid == pid
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = re.search(rb"Content-Length: (\d+)", head)
    assert length is not None and len(body) == int(length.group(1))
    assert body.rstrip().endswith(b"</html>")
    server.wait_for_log(f"now serving {new_code} (self-signed)")


def test_sighup_reloads_at_once(server: Server) -> None:
    old_code = str(server.unit().info.code)

    server.process.send_signal(signal.SIGHUP)
    server.wait_for_log("reloading the certificate on SIGHUP")
    server.wait_for_log(f"now serving {old_code}", count=2)
    new_code = str(
        device.reset_unit(server.store, regenerate_identity=True).unit.info.code
    )
    server.process.send_signal(signal.SIGHUP)
    took = _wait_for_code(server, new_code, timeout=2.0)

    assert took < 2.0
    assert server.alive()
    assert server.log().count("reloading the certificate on SIGHUP") == 2


def test_damaged_state_keeps_the_old_certificate_served(server: Server) -> None:
    old_code = str(server.unit().info.code)
    current = server.store.root / Part.IDENTITY.value / "current"
    good_target = os.readlink(current)

    def point_current_at(target: str) -> None:
        tmp = current.with_name(".current.test")
        os.symlink(target, tmp)
        os.replace(tmp, current)

    point_current_at("g99999999")
    server.wait_for_log("could not load the new state, still serving")

    assert server.alive()
    assert served_code(server.https_port) == old_code
    assert Browser(server.https_port).get("/login").status == 200
    assert "ERROR unitcert.web.tls: could not load the new state" in server.log()

    point_current_at(good_target)
    server.wait_for_log(f"now serving {old_code}", count=2)
    assert served_code(server.https_port) == old_code


# --- plain HTTP -------------------------------------------------------------------


def _raw_http(port: int, request: bytes) -> tuple[str, dict[str, str]]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return head[0], headers


@pytest.mark.parametrize(
    ("host_header", "path", "expected_host"),
    [
        ("unit.example:8080", "/status?tab=1&x=%20y", "unit.example"),
        ("unit.example", "/", "unit.example"),
        ("[::1]:8080", "/a", "[::1]"),
        (None, "/", "127.0.0.1"),
        ("<script>:80", "/", "127.0.0.1"),
        ("a:b:c", "/", "127.0.0.1"),
    ],
)
def test_http_port_redirects_to_https_on_the_https_port(
    shared_server: Server, host_header: str | None, path: str, expected_host: str
) -> None:
    request = f"GET {path} HTTP/1.0\r\n"
    if host_header is not None:
        request += f"Host: {host_header}\r\n"
    request += "\r\n"

    status, headers = _raw_http(shared_server.http_port, request.encode())

    assert status.split()[1] == "301"
    expected = f"https://{expected_host}:{shared_server.https_port}{path}"
    assert headers["location"] == expected


def test_http_redirect_cannot_inject_headers(shared_server: Server) -> None:
    request = (
        b"GET /x%0d%0aSet-Cookie:%20a=b HTTP/1.1\r\n"
        b"Host: unit\r\nConnection: close\r\n\r\n"
    )

    status, headers = _raw_http(shared_server.http_port, request)

    assert status.split()[1] == "301"
    assert "set-cookie" not in headers
    port = shared_server.https_port
    assert headers["location"] == f"https://unit:{port}/x%0d%0aSet-Cookie:%20a=b"


# --- pages, headers, errors -------------------------------------------------------


def test_root_shows_the_login_form_when_not_logged_in(shared_server: Server) -> None:
    reply = Browser(shared_server.https_port).get("/")

    assert reply.status == 200
    assert 'action="/login"' in reply.body
    assert "unit's fingerprint code" not in reply.body


@pytest.mark.parametrize("path", ["/", "/login", "/style.css", "/nowhere"])
def test_every_response_carries_the_security_headers(
    shared_server: Server, path: str
) -> None:
    reply = Browser(shared_server.https_port).get(path)

    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["X-Frame-Options"] == "DENY"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["Referrer-Policy"] == "no-referrer"
    assert reply.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert "aiohttp" not in reply.headers["Server"]


def test_errors_get_plain_pages_without_tracebacks(shared_server: Server) -> None:
    browser = Browser(shared_server.https_port)

    missing = browser.get("/nowhere")
    wrong_method = browser.request("PUT", "/login", body=b"")
    too_large = browser.post("/login", {"password": "x" * 100_000})

    assert missing.status == 404 and "Page not found" in missing.body
    assert wrong_method.status == 405 and "GET" in wrong_method.headers["Allow"]
    assert too_large.status == 413 and "Form too large" in too_large.body
    for reply in (missing, wrong_method, too_large):
        assert reply.headers["Content-Type"].startswith("text/html")
        assert "Traceback" not in reply.body


# --- login, sessions, CSRF --------------------------------------------------------


def test_login_with_a_wrong_password_fails(shared_server: Server) -> None:
    browser = Browser(shared_server.https_port)

    reply = browser.login("not-the-password")

    assert reply.status == 200
    assert "That password is not right." in reply.body
    assert "unitcert_session" not in browser.cookies
    assert 'action="/login"' in browser.get("/").body


def test_session_cookie_is_secure_httponly_and_samesite_strict(
    shared_server: Server,
) -> None:
    browser = Browser(shared_server.https_port)

    login_form = browser.get("/login")
    reply = browser.post(
        "/login",
        {
            "csrf_token": login_form.csrf_token(),
            "password": _setup_credential(shared_server),
        },
    )

    assert reply.status == 303
    (session_cookie,) = [
        c for c in reply.set_cookies() if c.startswith("unitcert_session=")
    ]
    (login_cookie,) = [c for c in login_form.set_cookies() if "unitcert_login=" in c]
    for cookie in (session_cookie, login_cookie):
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"secure", "httponly", "samesite=strict", "path=/"} <= flags
    token = browser.cookies["unitcert_session"]
    assert len(token) >= 43  # 256 bits in URL-safe base64


@pytest.mark.parametrize(
    ("token", "headers"),
    [
        (None, {}),
        ("wrong", {}),
        ("right", {"Origin": "https://evil.example"}),
        ("right", {"Sec-Fetch-Site": "cross-site"}),
    ],
)
def test_login_post_without_a_valid_csrf_token_or_from_another_site_is_refused(
    shared_server: Server, token: str | None, headers: dict[str, str]
) -> None:
    browser = Browser(shared_server.https_port)
    right = browser.get("/login").csrf_token()
    fields = {"password": _setup_credential(shared_server)}
    if token is not None:
        fields["csrf_token"] = right if token == "right" else token + right[5:]

    reply = browser.post("/login", fields, headers=headers)

    assert reply.status == 403
    assert "another site" in reply.body
    assert "unitcert_session" not in browser.cookies


def test_login_token_does_not_work_without_its_cookie(shared_server: Server) -> None:
    browser = Browser(shared_server.https_port)
    token = browser.get("/login").csrf_token()
    browser.cookies.clear()

    reply = browser.post(
        "/login",
        {"csrf_token": token, "password": _setup_credential(shared_server)},
    )

    assert reply.status == 403


def test_same_origin_post_is_accepted(shared_server: Server) -> None:
    browser = Browser(shared_server.https_port)
    token = browser.get("/login").csrf_token()
    host = f"127.0.0.1:{shared_server.https_port}"

    reply = browser.post(
        "/login",
        {"csrf_token": token, "password": _setup_credential(shared_server)},
        headers={
            "Host": host,
            "Origin": f"https://{host}",
            "Sec-Fetch-Site": "same-origin",
        },
    )

    assert reply.status == 303


def test_session_is_invalid_after_logout(shared_server: Server) -> None:
    browser = Browser(shared_server.https_port)
    browser.login(_setup_credential(shared_server))
    token = browser.cookies["unitcert_session"]
    csrf = browser.get("/password").csrf_token()

    refused = browser.post("/logout", {"csrf_token": "wrong"})
    still_in = browser.get("/password")
    reply = browser.post("/logout", {"csrf_token": csrf})
    browser.cookies["unitcert_session"] = token
    after = browser.get("/password")

    assert refused.status == 403 and still_in.status == 200
    assert reply.status == 303 and reply.location == "/login"
    assert any(c.startswith("unitcert_session=") for c in reply.set_cookies())
    assert after.status == 303 and after.location == "/login"


def test_setup_credential_forces_a_new_password_at_first_login(server: Server) -> None:
    setup = _setup_credential(server)
    other = Browser(server.https_port)
    assert other.login(setup).location == "/password"
    browser = Browser(server.https_port)

    first = browser.login(setup)
    assert first.status == 303 and first.location == "/password"
    assert browser.get("/").location == "/password"
    assert browser.get("/login").location == "/password"
    form = browser.get("/password")
    assert "Choose your own password" in form.body
    csrf = form.csrf_token()

    def change(current: str, new: str, confirm: str) -> Reply:
        fields = {
            "csrf_token": csrf,
            "current": current,
            "new": new,
            "confirm": confirm,
        }
        return browser.post("/password", fields)

    assert "not right" in change("WRONG-SETUP", NEW_PASSWORD, NEW_PASSWORD).body
    assert "differ" in change(setup, NEW_PASSWORD, NEW_PASSWORD + "x").body
    assert "too short" in change(setup, "short", "short").body
    assert "setup credential" in change(setup, setup, setup).body
    changed = change(setup, NEW_PASSWORD, NEW_PASSWORD)

    assert changed.status == 303
    status = browser.get(changed.location or "")
    assert status.status == 200
    assert "Your new password is set." in status.body
    unit = server.unit()
    assert unit.admin is not None and not unit.admin.must_change
    groups = str(unit.info.code).split("-")
    assert "".join(f"<span>{g}</span>" for g in groups) in status.body
    assert "compare it with the code on your sticker" in status.body.lower()
    assert f"sha256//{unit.info.pin}" in status.body
    logged_out = other.get("/")  # a browser logged in before the change
    assert logged_out.status == 200 and 'action="/login"' in logged_out.body
    assert "not right" in Browser(server.https_port).login(setup).body
    again = Browser(server.https_port)
    assert again.login(NEW_PASSWORD).location == "/"
    assert again.get("/").status == 200


def test_login_is_refused_after_five_wrong_passwords(server: Server) -> None:
    browser = Browser(server.https_port)

    failures = [browser.login(f"wrong-{i}") for i in range(5)]
    blocked = browser.login(_setup_credential(server))

    assert all("not right" in r.body for r in failures)
    assert blocked.status == 429
    assert 0 < int(blocked.headers["Retry-After"]) <= 300
    assert "Too many" in blocked.body
    assert "unitcert_session" not in browser.cookies
    server.wait_for_log("failed admin login from 127.0.0.1", count=5)
    assert "wrong-0" not in server.log()


def test_logs_hold_no_key_password_or_session_token(server: Server) -> None:
    setup = _setup_credential(server)
    key_pem = server.unit().key_path.read_text()
    browser = Browser(server.https_port)
    browser.login("a wrong guess")
    browser.login(setup)
    secrets_seen = [browser.cookies["unitcert_session"]]
    csrf = browser.get("/password").csrf_token()
    fields = {"current": setup, "new": NEW_PASSWORD, "confirm": NEW_PASSWORD}
    browser.post("/password", {"csrf_token": csrf, **fields})
    secrets_seen.append(browser.cookies["unitcert_session"])
    assert browser.get("/").status == 200
    server.wait_for_log("now serving", count=2)

    assert server.stop() == 0
    log = server.log()
    assert "DEBUG" in log and "admin password changed" in log
    key_lines = [line for line in key_pem.splitlines() if "-----" not in line]
    for secret in [*key_lines, setup, setup.replace("-", ""), NEW_PASSWORD]:
        assert secret not in log
    assert "a wrong guess" not in log
    for token in secrets_seen:
        assert token not in log


# --- in-process ---------------------------------------------------------------------


def test_status_page_warns_about_a_copied_state_and_a_failed_reload(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path / "state")
    unit = device.init_unit(store).unit
    copied = dataclasses.replace(unit, binding_ok=False)

    page = pages.status_page(copied, "token", reload_error="the state is <damaged>")
    healthy = pages.status_page(unit, "token")

    assert "made on another machine" in page
    assert "keeps serving the certificate below: the state is &lt;damaged&gt;" in page
    assert 'class="warning"' not in healthy
    assert str(unit.info.code).replace("-", "</span><span>") in healthy


def test_run_server_reports_a_busy_port_as_input_error(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    device.init_unit(store)
    https_port = free_port()
    called = threading.Event()

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        http_port = busy.getsockname()[1]
        with pytest.raises(
            InputError, match=f"port {http_port} on 127.0.0.1 is already"
        ):
            run_server(
                store,
                https_port=https_port,
                http_port=http_port,
                on_listening=called.set,
            )

    assert not called.is_set()
    assert not port_open(https_port)
