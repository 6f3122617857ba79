"""``unitcert device acme`` without a CA: what it checks, saves and refuses."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

import pytest

from unitcert import device
from unitcert.acme.agent import load_settings, load_state
from unitcert.cli import run
from unitcert.store import Part, StateStore

STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UNITCERT_MACHINE_ID", "acme-cli-test")
    root = tmp_path / "state"
    device.init_unit(StateStore(root), entropy_timeout=5)
    return root


def _acme(
    state: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    code = run(["device", "acme", "--state", str(state), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _tsig_file(tmp_path: Path) -> tuple[Path, str]:
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    path = tmp_path / "key.conf"
    path.write_text(
        f'key "unit-update" {{\n  algorithm hmac-sha256;\n  secret "{secret}";\n}};\n'
    )
    return path, secret


def test_acme_saves_settings_for_the_next_serve_when_none_runs(
    state: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key_file, secret = _tsig_file(tmp_path)
    code, out = _acme(
        state,
        capsys,
        "--directory",
        STAGING,
        "--domain",
        "Unit.Example.COM.",
        "--challenge",
        "dns-01",
        "--dns-server",
        "192.0.2.53:53",
        "--tsig-key-file",
        str(key_file),
    )
    assert code == 0, out
    assert "the unit orders its certificate when it starts" in out
    local = StateStore(state).current(Part.LOCAL)
    settings = load_settings(local)
    assert settings is not None
    assert settings.identifiers == ("unit.example.com",)
    assert load_state(local).request is not None
    assert local is not None
    assert os.stat(local.path / "acme-tsig.key").st_mode & 0o777 == 0o600

    code, out = _acme(state, capsys)
    assert code == 0
    assert "DNS server:" in out and "unit.example.com" in out
    assert secret not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--directory", PRODUCTION, "--domain", "a.example.com"], "add --production"),
        (
            ["--directory", "http://ca.test/dir", "--domain", "a.example.com"],
            "https://",
        ),
        (["--directory", STAGING, "--domain", "localhost"], "neither a DNS name"),
        (
            [
                "--directory",
                STAGING,
                "--domain",
                "203.0.113.7",
                "--challenge",
                "dns-01",
                "--dns-hook",
                "/bin/true",
            ],
            "cannot be proven with DNS",
        ),
        (["--directory", STAGING, "--domain", "*.example.com"], "wildcard"),
        (
            [
                "--directory",
                STAGING,
                "--domain",
                "a.example.com",
                "--challenge",
                "dns-01",
            ],
            "exactly one way",
        ),
        (
            [
                "--directory",
                STAGING,
                "--domain",
                "a.example.com",
                "--challenge",
                "dns-01",
                "--dns-server",
                "192.0.2.1:53",
            ],
            "needs --tsig-key-file",
        ),
        (
            [
                "--directory",
                STAGING,
                "--domain",
                "a.example.com",
                "--deploy-hook",
                "/no/such/program --flag",
            ],
            "is not found",
        ),
        (
            ["--directory", STAGING, "--domain", "a.example.com", "--email", "nobody"],
            "not an email address",
        ),
        (
            [
                "--directory",
                STAGING,
                "--domain",
                "a.example.com",
                "--domain",
                "A.example.com",
            ],
            "given twice",
        ),
    ],
)
def test_acme_refuses_settings_that_cannot_work_and_changes_nothing(
    state: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    before = StateStore(state).watch_token()
    code, out = _acme(state, capsys, *args)
    assert code == 1
    assert message in out
    assert "Traceback" not in out
    assert StateStore(state).watch_token() == before


def test_acme_refuses_a_tsig_file_without_a_key(
    state: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    code, out = _acme(
        state,
        capsys,
        "--directory",
        STAGING,
        "--domain",
        "a.example.com",
        "--challenge",
        "dns-01",
        "--dns-server",
        "192.0.2.1",
        "--tsig-key-file",
        str(bad),
    )
    assert code == 1 and "tsig-keygen" in out


def test_acme_production_needs_the_explicit_flag(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _acme(
        state,
        capsys,
        "--directory",
        PRODUCTION,
        "--domain",
        "a.example.com",
        "--production",
    )
    assert code == 0, out


def test_acme_off_without_settings_serves_the_identity(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _acme(state, capsys)
    assert code == 0 and "ACME is not set up" in out
    code, out = _acme(state, capsys, "--off")
    assert code == 0 and "serves its own identity" in out
    assert device.load_unit(StateStore(state)).source == "self"
