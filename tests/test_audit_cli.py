"""``unitcert audit`` as a shell sees it: verdicts, odd names, options, exits.

Each test runs the command on real files, real sockets on loopback and real
registries; the ones about signals and pipes run it as its own process.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from unitcert.audit.cli import audit

UNITCERT = [sys.executable, "-m", "unitcert"]


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(audit, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _cert(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=800))
        .sign(key, hashes.SHA256())
    )


def _pem(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    return _cert(key, name).public_bytes(serialization.Encoding.PEM)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _clean_folder(folder: Path, units: int = 2) -> Path:
    folder.mkdir()
    for number in range(units):
        (folder / f"unit{number}.pem").write_bytes(_pem(_new_key(), f"u{number}"))
    return folder


def _closed_port() -> int:
    closed = socket.create_server(("127.0.0.1", 0))
    port: int = closed.getsockname()[1]
    closed.close()
    return port


def _register(directory: Path, units: list[tuple[str, x509.Certificate]]) -> None:
    from unitcert.factory.registry import Registry, UnitRow, default_url

    directory.mkdir()
    with (
        Registry(default_url(directory), create=True) as registry,
        registry.transaction() as session,
    ):
        for serial, cert in units:
            spki = cert.public_key().public_bytes(
                serialization.Encoding.DER,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
            session.add(
                UnitRow(
                    serial=serial,
                    hostname=f"{serial}.router.example.com",
                    spki_sha256=hashlib.sha256(spki).hexdigest(),
                    key_type="ECDSA P-256",
                    rsa_modulus=None,
                    prime_check="n/a",
                    cert_serial=format(cert.serial_number, "x"),
                    cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                    not_after=cert.not_valid_after_utc,
                    issued_at=cert.not_valid_before_utc,
                    first_issued_at=cert.not_valid_before_utc,
                    status="active",
                    label_printed=False,
                )
            )


# --- an incomplete run is not called clean -------------------------------------


def test_an_incomplete_run_says_so_in_json_html_and_terminal(tmp_path: Path) -> None:
    folder = _clean_folder(tmp_path / "units")
    dead = f"127.0.0.1:{_closed_port()}"
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(f"{dead}\n")
    report, page = tmp_path / "audit.json", tmp_path / "audit.html"

    code, out, err = _run(
        str(folder),
        "--hosts",
        str(hosts),
        "--timeout",
        "2",
        "--json",
        str(report),
        "--html",
        str(page),
        "-q",
    )

    assert code == 2
    assert "not known to be clean" in err
    assert "Not known to be clean" in out and "No findings" not in out
    data = json.loads(report.read_text())
    assert data["verdict"] == "incomplete"
    assert data["clean"] is False and data["complete"] is False
    assert data["not_read"] == 1
    assert "incomplete" in data["verdicts"]
    assert data["problems"] == [
        {"location": dead, "reason": data["problems"][0]["reason"], "named": True}
    ]
    text = page.read_text()
    assert "verdict clean" not in text and "Clean:" not in text
    verdict = re.search(r'<div class="verdict incomplete">(.*?)</div>', text, re.S)
    assert verdict is not None
    assert "Incomplete" in verdict.group(1) and "1 host or registry unit" in (
        verdict.group(1)
    )
    assert dead in verdict.group(1)


def test_a_complete_clean_run_is_clean_everywhere(tmp_path: Path) -> None:
    folder = _clean_folder(tmp_path / "units")
    report, page = tmp_path / "audit.json", tmp_path / "audit.html"

    code, out, _ = _run(str(folder), "--json", str(report), "--html", str(page), "-q")

    assert code == 0
    assert "No findings" in out
    data = json.loads(report.read_text())
    assert data["verdict"] == "clean" and data["clean"] is True
    assert data["complete"] is True and data["not_read"] == 0
    assert '<div class="verdict clean">' in page.read_text()


def test_findings_win_over_an_incomplete_run_but_the_missed_hosts_show(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "units"
    folder.mkdir()
    shared = _new_key()
    for name in ("a", "b"):
        (folder / f"{name}.pem").write_bytes(_pem(shared, name))
    dead = f"127.0.0.1:{_closed_port()}"
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(f"{dead}\n")
    report, page = tmp_path / "audit.json", tmp_path / "audit.html"

    code, out, _ = _run(
        str(folder),
        "--hosts",
        str(hosts),
        "--timeout",
        "2",
        "--json",
        str(report),
        "--html",
        str(page),
        "-q",
    )

    assert code == 1
    data = json.loads(report.read_text())
    assert data["verdict"] == "findings" and data["complete"] is False
    assert dead in out
    assert "Also, 1 host or registry unit" in page.read_text()


# --- crashes -----------------------------------------------------------------


@pytest.mark.parametrize("option", ["--json", "--html"])
def test_an_empty_report_path_is_refused_in_one_sentence(
    tmp_path: Path, option: str
) -> None:
    folder = _clean_folder(tmp_path / "units")

    code, out, err = _run(str(folder), option, "", "-q")

    assert code == 2
    assert "give the report a file name" in err and option in err
    assert "Traceback" not in err and "Audited" not in out


def test_a_file_name_that_is_not_utf8_is_shown_escaped_in_every_report(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "units"
    folder.mkdir()
    shared = _new_key()
    raw = os.fsencode(folder)
    for name in (b"bad\xff.pem", b"good.pem"):
        with open(raw + b"/" + name, "wb") as handle:
            handle.write(_pem(shared, "twin"))
    report, page = tmp_path / "audit.json", tmp_path / "audit.html"

    code, out, err = _run(str(folder), "--json", str(report), "--html", str(page))

    assert code == 1, err
    assert "bad\\xff" in out and "Traceback" not in err
    text = report.read_text("utf-8")
    assert "\\udcff" not in text
    names = {u["name"] for f in json.loads(text)["findings"] for u in f["units"]}
    assert str(folder / "bad\\xff.pem") in names
    assert "bad\\xff" in page.read_text("utf-8")


# --- terminal escapes ------------------------------------------------------------


def test_escape_sequences_in_file_names_are_printed_escaped(tmp_path: Path) -> None:
    folder = tmp_path / "units"
    folder.mkdir()
    shared = _new_key()
    for name in ("\x1b[31mANSI\x1b[0m", "plain"):
        (folder / f"{name}.pem").write_bytes(_pem(shared, "twin"))
    page = tmp_path / "audit.html"

    code, out, _ = _run(str(folder), "--html", str(page), "-q")

    assert code == 1
    assert "\x1b" not in out
    assert "\\x1b[31mANSI\\x1b[0m" in out
    assert "\x1b" not in page.read_text()


def test_escape_sequences_in_error_sentences_are_printed_escaped(
    tmp_path: Path,
) -> None:
    named = tmp_path / "\x1b]0;owned\x07notes.txt"
    named.write_text("no key here\n")

    code, _, err = _run(str(named), "-q")

    assert code == 2
    assert "\x1b" not in err and "\x07" not in err
    assert "\\x1b]0;owned\\x07notes.txt" in err


# --- repeated options combine ----------------------------------------------------


def test_repeated_dir_options_audit_every_registry(tmp_path: Path) -> None:
    shared = _new_key()
    _register(tmp_path / "F1", [("s-1", _cert(shared, "one"))])
    _register(tmp_path / "F2", [("s-2", _cert(shared, "two"))])
    _register(tmp_path / "F3", [("s-3", _cert(_new_key(), "three"))])
    report = tmp_path / "audit.json"

    code, _, err = _run(
        "--dir",
        str(tmp_path / "F1"),
        "--dir",
        str(tmp_path / "F2"),
        "--dir",
        str(tmp_path / "F3"),
        "--dir",
        str(tmp_path / "F3"),
        "--json",
        str(report),
        "-q",
    )

    assert code == 1, err
    data = json.loads(report.read_text())
    assert data["units"] == 3 and len(data["sources"]) == 3
    names = {u["name"] for f in data["findings"] for u in f["units"]}
    assert names == {"s-1", "s-2"}


def test_repeated_hosts_options_read_every_file_and_each_address_once(
    tmp_path: Path,
) -> None:
    folder = _clean_folder(tmp_path / "units", units=1)
    first, second = (f"127.0.0.1:{_closed_port()}" for _ in range(2))
    (tmp_path / "a.txt").write_text(f"{first}\n{first}\n")
    (tmp_path / "b.txt").write_text(f"{second}\n{first}\n")
    report = tmp_path / "audit.json"

    code, out, _ = _run(
        str(folder),
        "--hosts",
        str(tmp_path / "a.txt"),
        "--hosts",
        str(tmp_path / "b.txt"),
        "--timeout",
        "2",
        "--json",
        str(report),
        "-q",
    )

    assert code == 2
    assert "2 hosts" in out
    locations = [p["location"] for p in json.loads(report.read_text())["problems"]]
    assert locations == [first, second]


# --- exit codes in a shell ----------------------------------------------------------


def test_a_closed_stdout_is_not_reported_as_findings(tmp_path: Path) -> None:
    folder = _clean_folder(tmp_path / "units")

    with subprocess.Popen(
        [*UNITCERT, "audit", str(folder), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        err = process.stderr.read().decode()
        code = process.wait(timeout=60)

    assert code == 2, err
    assert "cannot print the audit's summary (Broken pipe)" in err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_an_interrupted_audit_exits_130_without_a_traceback(tmp_path: Path) -> None:
    folder = _clean_folder(tmp_path / "units", units=1)
    # A host that accepts the connection but never answers the handshake.
    silent = socket.create_server(("127.0.0.1", 0))
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(f"127.0.0.1:{silent.getsockname()[1]}\n")
    try:
        process = subprocess.Popen(
            [*UNITCERT, "audit", str(folder), "--hosts", str(hosts), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        silent.settimeout(30)
        connection, _ = silent.accept()
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        connection.close()
    finally:
        silent.close()

    assert process.returncode == 130, err
    assert b"interrupted" in err
    assert b"Traceback" not in err and b"Aborted" not in err
    assert b"Audited" not in out


# --- Dask and the summary's words -----------------------------------------------


def test_a_dask_cluster_without_workers_is_named_as_such() -> None:
    import warnings

    distributed = pytest.importorskip("distributed")
    from unitcert.audit.distributed import batch_gcd_on_dask
    from unitcert.errors import InputError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(
            n_workers=0, dashboard_address=None, host="127.0.0.1"
        )
    try:
        with pytest.raises(InputError, match="has no workers") as raised:
            batch_gcd_on_dask(
                [15, 21, 35], cluster.scheduler_address, connect_timeout=1
            )
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cluster.close()

    assert "--workdir" not in str(raised.value)


def test_the_summary_says_what_the_reports_hold(tmp_path: Path) -> None:
    folder = tmp_path / "units"
    folder.mkdir()
    shared = _new_key()
    for name in ("a", "b"):
        (folder / f"{name}.pem").write_bytes(_pem(shared, name))

    code, out, _ = _run(str(folder), "-q")

    assert code == 1
    assert "for every unit" not in out
    assert "--json lists every unit of every finding" in " ".join(out.split())
