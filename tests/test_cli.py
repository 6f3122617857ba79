"""The command line contract: help everywhere, one-sentence errors, exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from support import ServedUnit, free_port, leaf_der, serving
from unitcert import device
from unitcert.cli import main, run
from unitcert.code import code_for_spki, spki_from_cert_der
from unitcert.store import Part, StateStore

UNITCERT = [sys.executable, "-m", "unitcert"]
OTHER_CODE = "B9X7-HK54-M3T2-1PDW-CAXP-X"  # DESIGN.md's vector: an RFC example key


@pytest.fixture(scope="module")
def served_unit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedUnit]:
    directory = tmp_path_factory.mktemp("unit")
    with serving(StateStore(directory / "state"), directory, verbose=False) as served:
        yield served


def _all_commands(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    yield prefix
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None, name
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


def test_every_command_has_help() -> None:
    runner = CliRunner()
    commands = list(_all_commands(main))
    assert ("device", "serve") in commands and ("verify",) in commands

    for path in commands:
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage: " in result.output


def test_serve_prints_url_code_and_setup_credential_then_reuses_identity(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    outputs = []
    for _ in range(2):
        https_port, http_port = free_port(), free_port()
        process = subprocess.Popen(
            [
                *UNITCERT,
                "device",
                "serve",
                "--state",
                str(state),
                "--https-port",
                str(https_port),
                "--http-port",
                str(http_port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Press Ctrl+C"):
                break
        process.terminate()
        process.communicate(timeout=10)
        outputs.append("".join(lines))
    unit = device.load_unit(StateStore(state))

    first, second = outputs
    assert "First start: made this unit's identity" in first
    assert "Reusing this unit's identity" in second
    for output in outputs:
        assert "https://127.0.0.1:" in output
        assert str(unit.info.code) in output
        assert unit.admin is not None and unit.admin.setup in output


def test_verify_exits_0_when_the_served_key_matches(served_unit: ServedUnit) -> None:
    code = str(code_for_spki(spki_from_cert_der(leaf_der(served_unit.https_port))))

    result = subprocess.run(
        [
            *UNITCERT,
            "verify",
            served_unit.address,
            "--code",
            code.lower().replace("-", " "),
        ],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and code in result.stdout


def test_verify_exits_1_and_says_not_your_device_for_another_key(
    served_unit: ServedUnit,
) -> None:
    result = subprocess.run(
        [*UNITCERT, "verify", served_unit.address, "--code", OTHER_CODE],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 1
    assert "NOT YOUR DEVICE" in result.stderr


def test_verify_exits_2_for_a_mistyped_code_before_connecting(
    served_unit: ServedUnit,
) -> None:
    mistyped = OTHER_CODE[:-1] + "Y"

    result = subprocess.run(
        [*UNITCERT, "verify", served_unit.address, "--code", mistyped],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 2
    assert "mistyped" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "code", ["B9X7", "B9X7-HK54-M3T2-1PDW-CAXP-U", "not a code at all"]
)
def test_verify_exits_2_for_a_malformed_code(
    served_unit: ServedUnit, code: str
) -> None:
    assert run(["verify", served_unit.address, "--code", code]) == 2


def test_verify_exits_3_when_nothing_listens_or_no_tls(served_unit: ServedUnit) -> None:
    closed = free_port()

    nothing = subprocess.run(
        [*UNITCERT, "verify", f"127.0.0.1:{closed}", "--code", OTHER_CODE],
        capture_output=True,
        text=True,
    )
    plain_http = run(
        ["verify", f"127.0.0.1:{served_unit.http_port}", "--code", OTHER_CODE]
    )

    assert nothing.returncode == 3
    assert "cannot connect" in nothing.stderr
    assert plain_http == 3


def test_status_json_and_pin_match_what_a_client_receives(
    served_unit: ServedUnit,
) -> None:
    result = subprocess.run(
        [
            *UNITCERT,
            "device",
            "status",
            "--state",
            str(served_unit.store.root),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    status = json.loads(result.stdout)
    der = leaf_der(served_unit.https_port)

    assert status["code"] == str(code_for_spki(spki_from_cert_der(der)))
    assert status["source"] == "self"
    assert status["key_type"] == "ECDSA P-256"
    assert status["binding"]["matches_this_machine"] is True
    assert isinstance(status["generation"], int)
    fetched = subprocess.run(
        [
            "curl",
            "-sS",
            "-k",
            "--pinnedpubkey",
            status["spki_pin"],
            f"https://{served_unit.address}/",
        ],
        capture_output=True,
        text=True,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert "password" in fetched.stdout.lower()


def test_code_command_prints_the_code_of_a_certificate(tmp_path: Path) -> None:
    unit = device.init_unit(StateStore(tmp_path / "s")).unit
    result = CliRunner().invoke(main, ["code", str(unit.chain_path)])

    assert result.exit_code == 0
    assert result.output.strip() == str(unit.info.code)


@pytest.mark.parametrize(
    "argv",
    [
        ["device", "status", "--state", "/nonexistent/unitcert-state"],
        ["device", "reset", "--state", "/nonexistent/unitcert-state", "--yes"],
        ["code", "/nonexistent/cert.pem"],
        ["verify", "127.0.0.1:99999", "--code", OTHER_CODE],
        ["label", "--state", "/nonexistent/unitcert-state", "-o", "/tmp/x.png"],
    ],
)
def test_errors_are_one_sentence_without_traceback(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(argv)

    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_reset_without_yes_changes_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    unit = device.init_unit(store).unit
    generation = store.generation()

    assert run(["device", "reset", "--state", str(store.root)]) == 1
    assert store.generation() == generation
    assert device.load_unit(store).info.code == unit.info.code


# --- ordinary OS conditions are the user's to fix, not internal errors ----------


def _os_refusals(tmp_path: Path) -> list[tuple[list[str], str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    long_name = tmp_path / ("a" * 300)
    return [
        (["device", "init", "--state", "/sys/unitcert-x"], "/sys/unitcert-x"),
        (["device", "init", "--state", "/proc/unitcert-x"], "/proc/unitcert-x"),
        (["device", "init", "--state", str(a_file / "x")], str(a_file)),
        (["device", "init", "--state", str(long_name)], str(long_name)),
        (["device", "status", "--state", "/dev/null"], "/dev/null"),
        (["label", "--state", "/dev/null", "-o", str(tmp_path / "l.png")], "/dev/null"),
    ]


def test_os_refusals_are_one_sentence_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, path in _os_refusals(tmp_path):
        code = run(argv)

        err = capsys.readouterr().err
        assert code == 1, (argv, err)
        assert "Traceback" not in err and "internal error" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"unitcert: error: cannot use {path}"), err


def test_os_refusal_shows_its_traceback_with_verbose(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = run(["device", "status", "--state", "/dev/null", "-v"])

    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" in err and "NotADirectoryError" in err
    assert err.strip().splitlines()[-1].startswith("unitcert: error: cannot use")


# --- -v before or after the command --------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "device", "status", "--state", "/nonexistent/unitcert-state"],
        ["device", "-v", "status", "--state", "/nonexistent/unitcert-state"],
        ["device", "status", "--state", "/nonexistent/unitcert-state", "-v"],
        ["device", "status", "--verbose", "--state", "/nonexistent/unitcert-state"],
        ["verify", "127.0.0.1:0", "--code", OTHER_CODE, "-v"],
    ],
)
def test_verbose_is_accepted_before_and_after_the_command(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = run(argv)

    err = capsys.readouterr().err
    assert code != 0
    assert "DEBUG" in err and "Traceback" in err, err


def test_every_command_accepts_verbose_after_its_name() -> None:
    runner = CliRunner()
    for path in _all_commands(main):
        result = runner.invoke(main, [*path, "-v", "--help"])
        assert result.exit_code == 0, (path, result.output)


# --- device init and status ------------------------------------------------------


def test_init_refuses_an_empty_serial_and_makes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"

    for serial in ["", "  "]:
        code = run(["device", "init", "--state", str(state), "--serial", serial])

        err = capsys.readouterr().err
        assert code == 2
        assert "--serial" in err and "empty" in err
        assert not StateStore(state).exists()


def test_status_of_a_unit_without_admin_credential_says_serve_makes_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = StateStore(tmp_path / "state")
    device.init_unit(store)
    with store.lock():
        store.wipe(Part.LOCAL)
    assert device.load_unit(store).admin is None

    assert run(["device", "status", "--state", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert run(["device", "status", "--state", str(store.root), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)

    assert "no admin credential yet" in out and "device serve" in out
    assert "run as root" not in out
    assert status["setup_credential"] is None
    assert status["admin_password_set"] is False
    assert status["source_name"] == device.describe_source("self") == "self-signed"


def test_status_json_always_carries_setup_credential_and_source_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = StateStore(tmp_path / "state")
    unit = device.init_unit(store).unit
    assert unit.admin is not None

    assert run(["device", "status", "--state", str(store.root), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)

    assert status["source_name"] == "self-signed"
    expected = unit.admin.setup if os.geteuid() == 0 else None
    assert status["setup_credential"] == expected


# --- code ----------------------------------------------------------------------


def test_code_of_a_chain_file_is_the_first_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = device.init_unit(StateStore(tmp_path / "leaf")).unit
    other = device.init_unit(StateStore(tmp_path / "other")).unit
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf.chain_path.read_bytes() + other.chain_path.read_bytes())

    assert run(["code", str(chain)]) == 0

    captured = capsys.readouterr()
    assert captured.out.strip() == str(leaf.info.code)
    assert captured.err.strip() == (
        "the file holds 2 certificates; this is the code of the first"
    )


# --- serve on IPv6 -----------------------------------------------------------------


def test_serve_on_ipv6_brackets_the_address_it_prints_and_logs(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        https_port = probe.getsockname()[1]
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        http_port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            *UNITCERT,
            "device",
            "serve",
            "--state",
            str(tmp_path / "state"),
            "--bind",
            "::1",
            "--https-port",
            str(https_port),
            "--http-port",
            str(http_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Press Ctrl+C"):
            break
    process.terminate()
    process.communicate(timeout=10)
    output = "".join(lines)

    assert f"admin pages at https://[::1]:{https_port}/" in output
    assert f"https://[::1]:{https_port}/" in output.split("URL:")[1]
    assert f"unitcert verify [::1]:{https_port}" in output
    assert "https://::1" not in output
