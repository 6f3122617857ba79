"""ACME end to end: a real Pebble (Let's Encrypt's test CA), a real bind9 for
DNS-01, ``unitcert device serve`` answering HTTP-01, ``openssl s_client``
checking what the unit serves; a fault-injecting proxy where Pebble 2.4 has no
rate limits, Retry-After, ARI or profiles. Counts come from the CA's side.

Pebble runs with ``PEBBLE_WFE_NONCEREJECT=30`` everywhere, so bad-nonce
retries happen in every test; one test keeps Pebble's random validation delay.
"""

from __future__ import annotations

import datetime as dt
import html
import http.client
import json
import random
import re
import ssl
import sys
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

import pytest
from cryptography import x509

from test_acme_support import (
    FaultProxy,
    Faults,
    Named,
    Pebble,
    Unit,
    free_port,
    make_unit,
    openssl_verify,
    serving,
    start_named,
    start_pebble,
    wait_until,
)
from unitcert import code as fingerprint
from unitcert.acme.agent import (
    ACCOUNT_KEY_FILE,
    AcmeAgent,
    load_state,
    request_order,
    save_settings,
)
from unitcert.acme.settings import AcmeSettings
from unitcert.store import Part, StateStore

pytestmark = pytest.mark.skipif(
    not (Path("/usr/bin/pebble").exists() and Path("/usr/sbin/named").exists()),
    reason="needs Debian's pebble and bind9 (scripts/system-deps installs them)",
)


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Named]:
    server = start_named(tmp_path_factory.mktemp("named"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory, named: Named) -> Iterator[Pebble]:
    server = start_pebble(
        tmp_path_factory.mktemp("pebble"), http_port=free_port(), dns_port=named.port
    )
    yield server
    server.stop()


def _served_names(unit: Unit, name: str) -> set[str]:
    cert = x509.load_pem_x509_certificate(unit.served_pem(name))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return {str(n.value) for n in san.value}


def _root_file(pebble: Pebble, directory: Path) -> Path:
    path = directory / "pebble-root.pem"
    path.write_bytes(pebble.root_pem())
    return path


def _acme(unit: Unit, directory: str, *args: str, ca: Path) -> tuple[int, str]:
    done = unit.cli(
        "device",
        "acme",
        "--state",
        str(unit.state),
        "--directory",
        directory,
        "--ca-bundle",
        str(ca),
        *args,
    )
    return done.returncode, done.stdout + done.stderr


def _identity_code(unit: Unit) -> str:
    done = unit.cli("device", "status", "--state", str(unit.state), "--json")
    return str(json.loads(done.stdout)["identity_code"])


def _served_code(unit: Unit) -> str:
    pem = unit.served_pem("x")
    cert = x509.load_pem_x509_certificate(pem)
    from cryptography.hazmat.primitives.serialization import Encoding

    spki = fingerprint.spki_from_cert_der(cert.public_bytes(Encoding.DER))
    return str(fingerprint.code_for_spki(spki))


def test_acme_http01_issues_serves_turns_off_and_back_with_one_account(
    tmp_path: Path, pebble: Pebble
) -> None:
    unit = make_unit(tmp_path / "unit", pebble.http_port)
    hook_out = tmp_path / "deployed.txt"
    hook = tmp_path / "deploy.py"
    hook.write_text(
        "import os, pathlib\n"
        f"pathlib.Path({str(hook_out)!r}).write_text("
        "os.environ['UNITCERT_DOMAINS'] + '\\n' + "
        "pathlib.Path(os.environ['UNITCERT_CHAIN_PATH']).read_text())\n"
    )
    root = _root_file(pebble, tmp_path)
    orders, accounts = pebble.orders(), pebble.accounts()
    with serving(unit):
        code, out = _acme(
            unit,
            pebble.directory,
            "--domain",
            "web.unitcert.test",
            "--domain",
            "127.0.0.1",
            "--email",
            "owner@example.com",
            "--deploy-hook",
            f"{sys.executable} {hook}",
            ca=pebble.listener_cert,
        )
        assert code == 0, out + unit.log()
        assert "Done: got a certificate for web.unitcert.test, 127.0.0.1" in out

        wait_until(
            lambda: "web.unitcert.test" in _served_names(unit, "web.unitcert.test"),
            10,
            "the ACME certificate to be served",
        )
        by_name = openssl_verify(unit.https_port, root, "web.unitcert.test")
        assert "Verify return code: 0 (ok)" in by_name.stdout, by_name.stdout
        by_ip = openssl_verify(unit.https_port, root, "127.0.0.1", ip=True)
        assert "Verify return code: 0 (ok)" in by_ip.stdout, by_ip.stdout
        deployed = hook_out.read_text()
        assert deployed.startswith("web.unitcert.test 127.0.0.1\n")
        assert "BEGIN CERTIFICATE" in deployed

        assert pebble.orders() - orders == 1
        assert pebble.accounts() - accounts == 1

        done = unit.cli("device", "acme", "--state", str(unit.state), "--off")
        assert done.returncode == 0, done.stderr
        assert "account key is kept" in done.stdout
        identity = _identity_code(unit)
        wait_until(lambda: _served_code(unit) == identity, 10, "the identity")
        local = StateStore(unit.state).current(Part.LOCAL)
        assert local is not None and local.has(ACCOUNT_KEY_FILE)

        code, out = _acme(
            unit,
            pebble.directory,
            "--domain",
            "web.unitcert.test",
            "--domain",
            "127.0.0.1",
            ca=pebble.listener_cert,
        )
        assert code == 0, out
        assert pebble.orders() - orders == 2
        # One account per unit: the second order reused it.
        assert pebble.accounts() - accounts == 1
    status = unit.cli("device", "acme", "--state", str(unit.state))
    assert "Next attempt: renewal planned for" in status.stdout, status.stdout


def test_acme_dns01_by_rfc2136_with_tsig_serves_a_wildcard(
    tmp_path: Path, pebble: Pebble, named: Named
) -> None:
    unit = make_unit(tmp_path / "unit", pebble.http_port)
    root = _root_file(pebble, tmp_path)
    with serving(unit):
        code, out = _acme(
            unit,
            pebble.directory,
            "--challenge",
            "dns-01",
            "--dns-server",
            f"127.0.0.1:{named.port}",
            "--tsig-key-file",
            str(named.key_file),
            "--domain",
            "dns.unitcert.test",
            "--domain",
            "*.wild.unitcert.test",
            ca=pebble.listener_cert,
        )
        assert code == 0, out + unit.log()
        wait_until(
            lambda: (
                "*.wild.unitcert.test" in _served_names(unit, "a.wild.unitcert.test")
            ),
            10,
            "the DNS-01 certificate to be served",
        )
        checked = openssl_verify(unit.https_port, root, "a.wild.unitcert.test")
        assert "Verify return code: 0 (ok)" in checked.stdout, checked.stdout
    assert named.txt("_acme-challenge.dns.unitcert.test") == []
    assert named.txt("_acme-challenge.wild.unitcert.test") == []
    assert named.secret not in unit.log()
    assert "published the DNS-01 TXT record" in unit.log()


def test_acme_dns01_by_hook_command(
    tmp_path: Path, pebble: Pebble, named: Named
) -> None:
    unit = make_unit(tmp_path / "unit", pebble.http_port)
    calls = tmp_path / "calls.txt"
    hook = tmp_path / "dns-hook.py"
    hook.write_text(
        "import sys, dns.update, dns.query, dns.tsigkeyring\n"
        "action, fqdn, value = sys.argv[1:4]\n"
        f"open({str(calls)!r}, 'a').write(f'{{action}} {{fqdn}}\\n')\n"
        f"ring = dns.tsigkeyring.from_text({{{named.key_name!r}: "
        f"('hmac-sha256', {named.secret!r})}})\n"
        f"u = dns.update.UpdateMessage('unitcert.test.', keyring=ring, "
        f"keyname={named.key_name!r}, keyalgorithm='hmac-sha256')\n"
        "rel = fqdn.removesuffix('.unitcert.test.')\n"
        "if action == 'present':\n"
        "    u.add(rel, 30, 'TXT', '\"' + value + '\"')\n"
        "else:\n"
        "    u.delete(rel, 'TXT', '\"' + value + '\"')\n"
        f"r = dns.query.tcp(u, '127.0.0.1', port={named.port}, timeout=5)\n"
        "sys.exit(r.rcode())\n"
    )
    with serving(unit):
        code, out = _acme(
            unit,
            pebble.directory,
            "--challenge",
            "dns-01",
            "--dns-hook",
            f"{sys.executable} {hook}",
            "--domain",
            "hook.unitcert.test",
            ca=pebble.listener_cert,
        )
        assert code == 0, out + unit.log()
    assert calls.read_text().splitlines() == [
        "present _acme-challenge.hook.unitcert.test.",
        "cleanup _acme-challenge.hook.unitcert.test.",
    ]


def test_acme_issues_with_pebbles_random_validation_delay(
    tmp_path: Path, named: Named
) -> None:
    slow = start_pebble(
        tmp_path / "pebble", http_port=free_port(), dns_port=named.port, nosleep=False
    )
    try:
        unit = make_unit(tmp_path / "unit", slow.http_port)
        with serving(unit):
            code, out = _acme(
                unit,
                slow.directory,
                "--domain",
                "slow.unitcert.test",
                ca=slow.listener_cert,
            )
            assert code == 0, out + unit.log()
        assert slow.orders() == 1
    finally:
        slow.stop()


def _in_process_unit(tmp_path: Path, directory: str, ca: Path, name: str) -> Unit:
    unit = make_unit(tmp_path / "unit", free_port())
    store = StateStore(unit.state)
    settings = AcmeSettings(
        directory=directory, identifiers=(name,), has_ca_bundle=True
    )
    save_settings(store, settings, ca_bundle=ca.read_bytes(), tsig_key=None)
    return unit


def test_acme_restarting_100_times_while_failing_stays_within_the_schedule(
    tmp_path: Path, pebble: Pebble
) -> None:
    # Nothing answers Pebble's HTTP-01 requests: every order fails validation.
    unit = _in_process_unit(
        tmp_path, pebble.directory, pebble.listener_cert, "down.unitcert.test"
    )
    store = StateStore(unit.state)
    start = dt.datetime.now(dt.UTC)
    before = pebble.orders()
    first_day = 0
    for restart in range(100):
        now = start + dt.timedelta(minutes=29 * restart)
        # A new agent each time, as after a reboot: only the state remembers.
        agent = AcmeAgent(store, http_responses={}, rng=random.Random(restart))
        agent.run_once(now)
        if now - start < dt.timedelta(days=1):
            first_day = pebble.orders() - before
    total = pebble.orders() - before
    # Schedule: at once, ~1 min later, ~10 min later; then 3 failed orders
    # a day for one name set; the 4th a day after the first.
    assert first_day == 3
    assert total == 4
    state = load_state(store.current(Part.LOCAL))
    assert state.failures == 4
    assert state.outcome is not None and not state.outcome.ok
    assert "could not validate down.unitcert.test" in state.outcome.message


def test_acme_rate_limit_and_retry_after_hold_every_order(
    tmp_path: Path, pebble: Pebble
) -> None:
    faults = Faults(rate_limit_orders=1, retry_after=3600)
    proxy = FaultProxy(pebble, faults)
    try:
        unit = _in_process_unit(
            tmp_path, proxy.directory, pebble.listener_cert, "limited.unitcert.test"
        )
        store = StateStore(unit.state)
        agent = AcmeAgent(store, http_responses={}, rng=random.Random(1))
        start = dt.datetime.now(dt.UTC)
        agent.run_once(start)
        assert faults.orders == 1
        state = load_state(store.current(Part.LOCAL))
        assert state.blocked_until is not None
        assert state.blocked_until >= start + dt.timedelta(minutes=59)
        assert state.outcome is not None and "rate limit" in state.outcome.message

        for minutes in (2, 15, 45, 58):
            request_order(store, now=start + dt.timedelta(minutes=minutes))
            agent.run_once(start + dt.timedelta(minutes=minutes))
        assert faults.orders == 1
        state = load_state(store.current(Part.LOCAL))
        assert state.outcome is not None and not state.outcome.ordered
        assert "the CA asked to wait" in state.outcome.message

        agent.run_once(start + dt.timedelta(minutes=61))
        assert faults.orders == 2
    finally:
        proxy.close()


def test_acme_renews_inside_the_window_the_ca_suggests(
    tmp_path: Path, pebble: Pebble
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    window = (now + dt.timedelta(days=20), now + dt.timedelta(days=21))
    faults = Faults(ari_window=window)
    proxy = FaultProxy(pebble, faults)
    try:
        unit = make_unit(tmp_path / "unit", pebble.http_port)
        with serving(unit):
            code, out = _acme(
                unit,
                proxy.directory,
                "--domain",
                "ari.unitcert.test",
                ca=pebble.listener_cert,
            )
            assert code == 0, out + unit.log()

            def planned() -> bool:
                state = load_state(StateStore(unit.state).current(Part.LOCAL))
                return state.window is not None and state.window.from_ca

            wait_until(planned, 10, "the renewal plan in the CA's window")
        state = load_state(StateStore(unit.state).current(Part.LOCAL))
        assert state.window is not None and state.window.from_ca
        assert state.renew_at is not None
        assert window[0] <= state.renew_at <= window[1]
        assert any(k.startswith("GET /renewal-info/") for k in faults.seen)
    finally:
        proxy.close()


def test_acme_ip_gets_the_short_lived_profile_and_an_unlisted_profile_is_refused(
    tmp_path: Path, pebble: Pebble
) -> None:
    faults = Faults(profiles={"classic": "90 days", "shortlived": "6 days"})
    proxy = FaultProxy(pebble, faults)
    try:
        unit = make_unit(tmp_path / "unit", pebble.http_port)
        with serving(unit):
            code, out = _acme(
                unit, proxy.directory, "--domain", "127.0.0.1", ca=pebble.listener_cert
            )
            assert code == 0, out + unit.log()
            assert faults.order_payloads[-1]["profile"] == "shortlived"
            assert faults.order_payloads[-1]["identifiers"] == [
                {"type": "ip", "value": "127.0.0.1"}
            ]
            orders = faults.orders

            code, out = _acme(
                unit,
                proxy.directory,
                "--domain",
                "127.0.0.1",
                "--profile",
                "tlsserver",
                ca=pebble.listener_cert,
            )
            assert code == 1
            assert "does not offer the profile 'tlsserver'" in out
            assert "classic, shortlived" in out
            assert faults.orders == orders
    finally:
        proxy.close()


class _Browser:
    """Just enough of a browser for the admin pages: cookies and forms."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(
        self, method: str, path: str, fields: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], str]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=context, timeout=10
        )
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if fields is not None:
            body = urlencode(fields)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            text = response.read().decode()
            for header in response.headers.get_all("Set-Cookie") or []:
                for name, morsel in SimpleCookie(header).items():
                    self.cookies[name] = morsel.value
            return response.status, dict(response.headers), text
        finally:
            connection.close()

    @staticmethod
    def token(page: str) -> str:
        match = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert match, page
        return html.unescape(match[1])

    def log_in(self, setup: str) -> None:
        _, _, page = self.request("GET", "/login")
        status, _, _ = self.request(
            "POST", "/login", {"csrf_token": self.token(page), "password": setup}
        )
        assert status == 303
        _, _, page = self.request("GET", "/password")
        new = "correct horse battery staple"
        status, _, page = self.request(
            "POST",
            "/password",
            {
                "csrf_token": self.token(page),
                "current": setup,
                "new": new,
                "confirm": new,
            },
        )
        assert status == 303, page


def test_acme_expired_certificate_falls_back_to_identity_and_says_why(
    tmp_path: Path, named: Named
) -> None:
    short = start_pebble(
        tmp_path / "pebble", http_port=free_port(), dns_port=named.port, validity=8
    )
    unit = make_unit(tmp_path / "unit", short.http_port)
    try:
        with serving(unit):
            code, out = _acme(
                unit,
                short.directory,
                "--domain",
                "short.unitcert.test",
                ca=short.listener_cert,
            )
            assert code == 0, out + unit.log()
            identity = _identity_code(unit)
            wait_until(lambda: _served_code(unit) != identity, 5, "the ACME cert")
            # The CA goes away: the renewal fails, and the certificate expires.
            short.stop()
            wait_until(lambda: _served_code(unit) == identity, 20, "the fallback")

            status = unit.cli("device", "status", "--state", str(unit.state))
            assert "the acme certificate expired on" in status.stdout
            shown = unit.cli("device", "acme", "--state", str(unit.state))
            assert "cannot reach the ACME CA" in shown.stdout, shown.stdout

            record = json.loads(
                unit.cli(
                    "device", "status", "--state", str(unit.state), "--json"
                ).stdout
            )
            browser = _Browser(unit.https_port)
            browser.log_in(record["setup_credential"])
            status_code, _, page = browser.request("GET", "/acme")
            assert status_code == 200
            assert "The acme certificate expired on" in page
            assert "short.unitcert.test" in page
            assert "Retry now" in page
            token = browser.token(page)
            first, headers, _ = browser.request(
                "POST", "/acme/retry", {"csrf_token": token}
            )
            assert first == 303 and headers["Location"] == "/acme?requested"
            second, headers, page = browser.request(
                "POST", "/acme/retry", {"csrf_token": token}
            )
            assert second == 429 and int(headers["Retry-After"]) > 500
            assert "wait 10 minutes" in page
    finally:
        short.stop()


def test_acme_bad_nonces_are_retried_per_request_with_the_nonce_they_carry(
    pebble: Pebble,
) -> None:
    from unitcert import keys
    from unitcert.acme.client import AcmeClient

    client = AcmeClient(
        pebble.directory,
        keys.generate_key(keys.KeyType.P256),
        ca_bundle=pebble.listener_cert,
    )
    before = pebble.requests()
    uri = client.ensure_account(None)
    # Pebble logs the route, not the account's own path.
    path = "POST /my-account/"
    assert "/my-account/" in uri
    for _ in range(30):
        client._post_as_get(uri)
    after = pebble.requests()
    handled = after[path] - before[path]
    # Pebble refused about 30% of the nonces: each refused request was sent
    # again at once, and every refusal carried the nonce for the next try.
    assert handled > 30
    assert after["HEAD /nonce-plz"] - before["HEAD /nonce-plz"] == 1
    assert client.requests_sent == sum(after.values()) - sum(before.values())
