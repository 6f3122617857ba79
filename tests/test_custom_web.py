"""The owner's certificate pages, against a real ``unitcert device serve``.

Uploads go over real TLS; what is served is checked with Python's ``ssl``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import ServedUnit as Served
from support import serving, wait_until
from test_custom_support import (
    NEW_PASSWORD,
    PASSWORD,
    Pki,
    UnitClient,
    ec_key,
    key_pem,
    make_pki,
    make_unit,
    p12,
    pems,
    rsa_key,
    set_password,
    tree_digest,
)
from unitcert import device
from unitcert.cli import run


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[Served]:
    store = make_unit(tmp_path / "state")
    set_password(store)
    with serving(store, tmp_path) as served:
        yield served


def _client(served: Served) -> tuple[UnitClient, str]:
    client = UnitClient(served.https_port)
    client.login()
    page = client.get("/certificate")
    assert page.status == 200
    return client, page.csrf_token()


def test_upload_shows_the_certificate_then_install_serves_it_within_two_seconds(
    unit: Served, pki: Pki
) -> None:
    client, csrf = _client(unit)
    own = unit.code()
    leaf = pki.leaf(rsa_key(12))
    data = p12(leaf, [pki.inter, pki.root])
    preview = client.upload(
        "/certificate/preview",
        {"csrf_token": csrf, "password": PASSWORD.decode()},
        [("bundle", "unit.pfx", data)],
    )
    assert preview.status == 200, preview.text
    text = " ".join(preview.text.split())
    for fact in (
        "CN=cust0001.router.home.arpa",
        "Corp Issuing CA (intermediate CA, served)",
        "Corp Root CA (root CA, not served)",
        "RSA 2048",
        "Nothing is installed yet",
    ):
        assert fact in text
    assert " ".join(leaf.code.split("-")) in text
    assert unit.code() == own

    start = time.monotonic()
    done = client.post(
        "/certificate/install",
        {"csrf_token": csrf, "preview": preview.field("preview")},
    )
    assert done.status == 303
    took = wait_until(lambda: unit.code() == leaf.code, 2.0, "the new certificate")
    assert time.monotonic() - start < 2.0, took
    page = client.get(done.headers["Location"])
    assert "Done" in page.text and leaf.code in page.text
    assert f"The code on the unit's sticker, {own}" in " ".join(page.text.split())

    again = client.post(
        "/certificate/install",
        {"csrf_token": csrf, "preview": preview.field("preview")},
    )
    assert again.status == 400 and "already installed" in again.text


def test_use_and_revert_buttons_switch_what_is_served(unit: Served, pki: Pki) -> None:
    client, csrf = _client(unit)
    own = unit.code()
    leaf = pki.leaf(ec_key())
    bundle = pems(leaf, pki.inter) + key_pem(leaf.key)
    preview = client.upload(
        "/certificate/preview", {"csrf_token": csrf}, [("bundle", "b.pem", bundle)]
    )
    client.post(
        "/certificate/install",
        {"csrf_token": csrf, "preview": preview.field("preview")},
    )
    assert unit.code() == leaf.code

    page = client.get("/certificate")
    assert "Serve the unit's own certificate" in page.text
    reply = client.post("/certificate/use", {"csrf_token": csrf, "source": "self"})
    assert reply.status == 303
    assert unit.code() == own
    reply = client.post("/certificate/revert", {"csrf_token": csrf})
    assert reply.status == 303
    assert unit.code() == leaf.code
    reply = client.post("/certificate/use", {"csrf_token": csrf, "source": "acme"})
    assert reply.status == 400 and "no acme certificate" in reply.text
    assert unit.code() == leaf.code


def test_certificate_for_other_names_installs_only_with_the_checkbox(
    unit: Served, pki: Pki
) -> None:
    client, csrf = _client(unit)
    leaf = pki.leaf(ec_key(), names=["nas.corp.example"])
    bundle = pems(leaf, pki.inter) + key_pem(leaf.key)
    preview = client.upload(
        "/certificate/preview", {"csrf_token": csrf}, [("bundle", "b.pem", bundle)]
    )
    assert preview.status == 200
    assert 'name="force"' in preview.body
    fields = {"csrf_token": csrf, "preview": preview.field("preview"), "force": "1"}
    assert client.post("/certificate/install", fields).status == 303
    assert unit.code() == leaf.code


def test_pending_csr_is_shown_and_the_certificate_alone_is_matched(
    unit: Served, pki: Pki, tmp_path: Path
) -> None:
    csr_path = tmp_path / "u.csr"
    args = ["device", "csr", "--state", str(unit.store.root), "--custom"]
    assert run([*args, "--name", "cam.corp.example", "-o", str(csr_path)]) == 0
    client, _ = _client(unit)
    page = client.get("/certificate")
    assert "waiting for its certificate (CSR for cam.corp.example)" in " ".join(
        page.text.split()
    )


def test_upload_needs_a_session_and_the_form_token(unit: Served, pki: Pki) -> None:
    leaf = pki.leaf(ec_key())
    bundle = pems(leaf, pki.inter) + key_pem(leaf.key)
    before = tree_digest(unit.store.root)
    stranger = UnitClient(unit.https_port)
    reply = stranger.upload("/certificate/preview", {}, [("bundle", "b.pem", bundle)])
    assert reply.status == 303 and reply.headers["Location"] == "/login"
    client, _ = _client(unit)
    reply = client.upload(
        "/certificate/preview", {"csrf_token": "forged"}, [("bundle", "b.pem", bundle)]
    )
    assert reply.status == 403
    assert stranger.get("/certificate").status == 303
    assert tree_digest(unit.store.root) == before


def test_upload_takes_a_few_mib_but_413_beyond_and_other_forms_stay_small(
    unit: Served, pki: Pki
) -> None:
    client, csrf = _client(unit)
    leaf = pki.leaf(ec_key())
    bundle = pems(leaf, pki.inter) + key_pem(leaf.key)
    padding = b"# " + b"x" * (900 * 1024) + b"\n"
    files = [
        ("bundle", "b.pem", pems(leaf, pki.inter) + padding),
        ("key", "k.pem", key_pem(leaf.key) + padding),
        ("root", "r.pem", pki.root.pem + padding),
    ]
    # About 2.7 MiB in three files under 1 MiB each: accepted and checked.
    reply = client.upload("/certificate/preview", {"csrf_token": csrf}, files)
    assert reply.status == 200
    assert " ".join(leaf.code.split("-")) in " ".join(reply.text.split())
    huge = [("bundle", "b.pem", bundle + b"#" * (5 * 1024 * 1024))]
    reply = client.upload("/certificate/preview", {"csrf_token": csrf}, huge)
    assert reply.status == 413
    big_form = {"csrf_token": csrf, "current": "x" * (100 * 1024)}
    assert client.post("/password", big_form).status == 413
    assert unit.code() == str(device.load_unit(unit.store).info.code)


def test_login_from_a_browser_that_sends_origin_null_is_accepted(unit: Served) -> None:
    # Chromium sends "Origin: null" for a form POST under the pages'
    # "Referrer-Policy: no-referrer"; its Sec-Fetch-Site says same-origin.
    client = UnitClient(unit.https_port)
    token = client.get("/login").csrf_token()
    fields = {"csrf_token": token, "password": NEW_PASSWORD}
    browser = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/login", fields, headers=browser).status == 303

    other = UnitClient(unit.https_port)
    token = other.get("/login").csrf_token()
    fields = {"csrf_token": token, "password": NEW_PASSWORD}
    for forged in ({"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        assert other.post("/login", fields, headers=forged).status == 403


def test_uploaded_file_names_are_shown_without_their_path(unit: Served) -> None:
    client, csrf = _client(unit)
    files = [("bundle", "C:\\Users\\owner\\..\\../etc/unit.pem", b"")]
    reply = client.upload("/certificate/preview", {"csrf_token": csrf}, files)
    assert reply.status == 400
    assert "unit.pem is empty" in reply.text
    assert "etc" not in reply.text and "Users" not in reply.text


def test_a_malformed_upload_is_a_clear_400_not_a_server_error(unit: Served) -> None:
    client, csrf = _client(unit)
    before = tree_digest(unit.store.root)
    files = [("bundle", "unit\x07.pem", b"-----BEGIN CERTIFICATE-----")]
    reply = client.upload("/certificate/preview", {"csrf_token": csrf}, files)
    assert reply.status == 400
    assert "could not read what the browser sent" in reply.text
    assert tree_digest(unit.store.root) == before
