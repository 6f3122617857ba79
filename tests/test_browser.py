"""The owner's certificate upload in a real browser: headless Chromium via Playwright.

Debian's ``chromium`` is driven through ``executable_path``; Playwright never
downloads a browser. The screenshots are written to the test's directory
(and to ``$UNITCERT_SCREENSHOTS`` when set, for a person to look at).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from support import ServedUnit as Served
from support import serving
from test_custom_support import (
    Pki,
    ec_key,
    key_pem,
    make_pki,
    make_unit,
    pems,
    rsa_key,
)
from unitcert import device

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
OWNER_PASSWORD = "a long owner password"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[Served]:
    store = make_unit(tmp_path / "state")
    with serving(store, tmp_path) as served:
        yield served


def _shot(page: Page, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("UNITCERT_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    return path


def _log_in_first_time(page: Page, served: Served) -> None:
    admin = device.load_unit(served.store).admin
    assert admin is not None and admin.setup is not None
    page.goto(f"https://127.0.0.1:{served.https_port}/")
    page.get_by_label("Password").fill(admin.setup)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Choose your own password")).to_be_visible()
    page.get_by_label("Setup credential").fill(admin.setup)
    page.get_by_label("New password", exact=True).fill(OWNER_PASSWORD)
    page.get_by_label("New password again").fill(OWNER_PASSWORD)
    page.get_by_role("button", name="Set the password").click()
    expect(
        page.get_by_role("heading", name="This unit's fingerprint code")
    ).to_be_visible()


def _spaced(code: str) -> str:
    return " ".join(code.split("-"))


def test_owner_uploads_a_certificate_and_a_wrong_key_in_chromium(
    browser: Browser, unit: Served, tmp_path: Path
) -> None:
    pki: Pki = make_pki()
    leaf = pki.leaf(rsa_key(13))
    good = tmp_path / "unit-chain-and-key.pem"
    good.write_bytes(pems(leaf, pki.inter, pki.root) + key_pem(leaf.key))
    own = unit.code()

    context = browser.new_context(
        ignore_https_errors=True, viewport={"width": 1000, "height": 900}
    )
    page = context.new_page()
    try:
        _log_in_first_time(page, unit)
        page.get_by_role("link", name="Your own certificate").click()
        expect(page.get_by_role("heading", name="Your own certificate")).to_be_visible()
        _shot(page, tmp_path, "1-certificate-page")

        page.get_by_label("Certificate file").set_input_files(str(good))
        page.get_by_role("button", name="Check the certificate").click()
        expect(
            page.get_by_role("heading", name="Check before installing")
        ).to_be_visible()
        expect(page.get_by_text("Nothing is installed yet")).to_be_visible()
        expect(page.locator(".code")).to_have_text(_spaced(leaf.code).replace(" ", ""))
        _shot(page, tmp_path, "2-preview")
        assert unit.code() == own

        page.get_by_role("button", name="Install this certificate").click()
        expect(page.get_by_text("Done. The unit now serves")).to_be_visible()
        expect(page.locator(".code").first).to_have_text(
            _spaced(leaf.code).replace(" ", "")
        )
        _shot(page, tmp_path, "3-installed")
        assert unit.code() == leaf.code

        other = pki.leaf(ec_key())
        chain = tmp_path / "new-chain.pem"
        chain.write_bytes(pems(other, pki.inter))
        wrong_key = tmp_path / "wrong.key"
        wrong_key.write_bytes(key_pem(ec_key()))
        page.get_by_label("Certificate file").set_input_files(str(chain))
        page.get_by_label("Private key file").set_input_files(str(wrong_key))
        page.get_by_role("button", name="Check the certificate").click()
        alert = page.locator(".error")
        expect(alert).to_contain_text("does not match the private key")
        expect(alert).to_contain_text(other.code)
        expect(alert).to_contain_text("still serves the one below")
        _shot(page, tmp_path, "4-mismatched-key")
        assert unit.code() == leaf.code
    finally:
        context.close()
