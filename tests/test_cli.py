"""The command line contract: help everywhere, one-sentence errors, exit codes."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from unitcert import device
from unitcert.cli import main, run
from unitcert.code import code_for_spki, spki_from_cert_der
from unitcert.store import StateStore

UNITCERT = [sys.executable, "-m", "unitcert"]
OTHER_CODE = "B9X7-HK54-M3T2-1PDW-CAXP-X"  # DESIGN.md's vector: an RFC example key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _served_der(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=2) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


@dataclass
class ServedUnit:
    state: Path
    https_port: int
    http_port: int
    process: subprocess.Popen[str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.https_port}"


@pytest.fixture(scope="module")
def served_unit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedUnit]:
    state = tmp_path_factory.mktemp("unit") / "state"
    https_port, http_port = _free_port(), _free_port()
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
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            _served_der(https_port)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(process.communicate()[0]) from None
            time.sleep(0.05)
    yield ServedUnit(state, https_port, http_port, process)
    process.terminate()
    process.communicate(timeout=10)


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
        https_port, http_port = _free_port(), _free_port()
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
    code = str(code_for_spki(spki_from_cert_der(_served_der(served_unit.https_port))))

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
    closed = _free_port()

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
        [*UNITCERT, "device", "status", "--state", str(served_unit.state), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    status = json.loads(result.stdout)
    der = _served_der(served_unit.https_port)

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
