"""The audit's sources read every key they can and name every one they cannot.

Real files, folders, links, FIFOs and TLS servers: one bad line of a
``known_hosts`` file, an unreadable file in a folder, a malformed key or host
name is one problem of its own, never the loss of the rest nor a traceback.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from support import free_port, port_open, wait_until
from unitcert.audit.cli import audit
from unitcert.audit.sources import (
    MAX_FILE_BYTES,
    FileSource,
    HostAddress,
    HostSource,
    KeyRecord,
    SourceProblem,
    read_hosts_file,
)


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(audit, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _read(*paths: Path) -> tuple[list[KeyRecord], list[SourceProblem]]:
    problems: list[SourceProblem] = []
    records = list(FileSource(list(paths)).records(problems))
    return records, problems


def _ssh_line() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def _cert(
    key: ec.EllipticCurvePrivateKey, name: str, *, ca: bool = False
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=365))
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), True
        )
    return builder.sign(key, hashes.SHA256())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _der_element(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    count = (size.bit_length() + 7) // 8
    return bytes([tag, 0x80 | count]) + size.to_bytes(count, "big") + content


def _rsa_spki_pem(n: int, e: int) -> bytes:
    """An RSA public key of any numbers, even ones no library would make."""

    def integer(value: int) -> bytes:
        return _der_element(
            0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
        )

    algorithm = bytes.fromhex("300d06092a864886f70d0101010500")
    key = _der_element(0x30, integer(n) + integer(e))
    spki = _der_element(0x30, algorithm + _der_element(0x03, b"\x00" + key))
    body = base64.encodebytes(spki).decode()
    return f"-----BEGIN PUBLIC KEY-----\n{body}-----END PUBLIC KEY-----\n".encode()


def _ssh_rsa_line(n: int, e: int) -> str:
    def mpint(value: int) -> bytes:
        raw = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
        return len(raw).to_bytes(4, "big") + raw

    blob = b"\x00\x00\x00\x07ssh-rsa" + mpint(e) + mpint(n)
    return f"ssh-rsa {base64.b64encode(blob).decode()}"


# --- known_hosts and OpenSSH key files, line by line ---------------------------


def _known_hosts(folder: Path) -> tuple[Path, str]:
    """A known_hosts file with good lines 1, 5, 6 and bad lines 2, 3, 4, 7."""
    shared, other = _ssh_line(), _ssh_line()
    lines = [
        f"h1 {shared}".encode(),
        f"h2 {_ssh_line()[:40]}".encode(),  # base64 cut short
        b"h3 ssh-ed25519",  # the line cut off before its key
        b"total junk here",
        f"h5 {other} caf\xe9".encode("latin-1"),  # a Latin-1 comment
        f"h6 {shared}".encode(),
        b"h7 " + _ssh_line().encode()[:30] + b"\xff\xfe",
    ]
    path = folder / "known_hosts"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, shared


def test_a_bad_known_hosts_line_is_its_own_problem_and_the_rest_is_audited(
    tmp_path: Path,
) -> None:
    path, _ = _known_hosts(tmp_path)

    records, problems = _read(tmp_path)

    assert sorted(r.unit for r in records) == ["h1", "h5", "h6"]
    assert {p.location: p.named for p in problems} == {
        f"{path}:2": True,
        f"{path}:3": True,
        f"{path}:4": True,
        f"{path}:7": True,
    }
    reasons = {p.location: p.reason for p in problems}
    assert "unreadable" in reasons[f"{path}:2"]
    assert "cut off" in reasons[f"{path}:3"]
    assert "not UTF-8 text" in reasons[f"{path}:7"]


def test_a_known_hosts_file_named_with_bad_lines_still_reports_its_findings(
    tmp_path: Path,
) -> None:
    path, _ = _known_hosts(tmp_path)
    report = tmp_path / "report.json"

    code, _, err = _run(str(path), "-q", "--json", str(report))

    assert code == 1, err
    data = json.loads(report.read_text())
    assert [
        (f["kind"], sorted(u["name"] for u in f["units"])) for f in data["findings"]
    ] == [("duplicate-key", ["h1", "h6"])]
    assert {p["location"] for p in data["problems"]} == {
        f"{path}:{line}" for line in (2, 3, 4, 7)
    }


def test_a_folder_with_a_bad_key_line_is_not_called_clean(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "good.pem").write_bytes(
        _pem(_cert(ec.generate_private_key(ec.SECP256R1()), "good"))
    )
    (keys / "known_hosts").write_text(
        f"h1 {_ssh_line()}\nh2 {_ssh_line()[:50]}\n", encoding="utf-8"
    )

    code, _, err = _run(str(keys), "-q")

    assert code == 2
    assert "Traceback" not in err


def test_a_non_utf8_file_is_not_said_to_hold_no_key(tmp_path: Path) -> None:
    path = tmp_path / "authorized_keys"
    path.write_bytes(f"{_ssh_line()} me\n".encode() + b"ssh-ed25519 AAAA\xff\n")

    records, problems = _read(path)

    assert len(records) == 1
    assert [(p.location, p.named) for p in problems] == [(f"{path}:2", True)]
    assert "line 2 is not UTF-8 text" in problems[0].reason
    assert "holds no" not in problems[0].reason


# --- files that cannot be read ---------------------------------------------------


def test_files_a_folder_cannot_give_are_problems_that_leave_the_audit_incomplete(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "good.pem").write_bytes(
        _pem(_cert(ec.generate_private_key(ec.SECP256R1()), "good"))
    )
    with (keys / "huge.pem").open("wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written
    (keys / "gone.pem").symlink_to(tmp_path / "missing.pem")
    (keys / "loop.pem").symlink_to(keys / "loop.pem")
    (keys / "README.txt").write_text("Not a key.\n")
    os.mkfifo(keys / "pipe")

    records, problems = _read(keys)

    assert [r.location for r in records] == [str(keys / "good.pem")]
    found = {Path(p.location).name: (p.named, p.reason) for p in problems}
    assert found["huge.pem"] == (
        True,
        "it is larger than the 64 MiB limit, so it was not read",
    )
    assert found["gone.pem"] == (True, "it is a broken symbolic link")
    assert found["loop.pem"][0] is True
    assert found["loop.pem"][1].startswith("it could not be read: ")
    assert found["README.txt"] == (False, "it holds no certificate, CSR or public key")
    assert found["pipe"] == (False, "it is not a regular file (a FIFO)")
    code, _, err = _run(str(keys), "-q")
    assert code == 2, err


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads files and folders whatever their mode"
)
def test_files_and_folders_without_permission_are_problems(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    (keys / "locked").mkdir(parents=True)
    (keys / "secret.pem").write_bytes(
        _pem(_cert(ec.generate_private_key(ec.SECP256R1()), "u"))
    )
    (keys / "secret.pem").chmod(0)
    (keys / "locked").chmod(0)
    try:
        _, problems = _read(keys)
    finally:
        (keys / "locked").chmod(0o700)

    found = {Path(p.location).name: (p.named, p.reason) for p in problems}
    assert found["secret.pem"] == (True, "it could not be read: Permission denied")
    assert found["locked"] == (
        True,
        "the folder could not be listed: Permission denied",
    )


# --- keys and host names that used to crash the audit ---------------------------


def test_degenerate_rsa_numbers_are_findings_not_crashes(tmp_path: Path) -> None:
    (tmp_path / "zero.pem").write_bytes(_rsa_spki_pem(0, 65537))
    (tmp_path / "one.pem").write_bytes(_rsa_spki_pem(1, 65537))
    (tmp_path / "negative.pem").write_bytes(_rsa_spki_pem(-7, 65537))
    (tmp_path / "ssh.pub").write_text(_ssh_rsa_line(3233, 1) + "\n")
    report = tmp_path / "report.json"

    code, _, err = _run(str(tmp_path), "-q", "--json", str(report))

    assert code == 1, err
    assert "Traceback" not in err
    invalid = {
        Path(u["name"]).name
        for f in json.loads(report.read_text())["findings"]
        if f["kind"] == "rsainvalid"
        for u in f["units"]
    }
    assert invalid == {"zero.pem", "one.pem", "negative.pem", "ssh.pub"}


def test_a_host_name_idna_refuses_is_a_problem_of_that_host(tmp_path: Path) -> None:
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text(f"a..b:443\n127.0.0.1:{free_port()}\n")

    problems: list[SourceProblem] = []
    source = HostSource(read_hosts_file(hosts_file), timeout=2)
    assert list(source.records(problems)) == []
    code, _, err = _run("--hosts", str(hosts_file), "--timeout", "2", "-q")

    reasons = {p.location: p.reason for p in problems}
    assert reasons["a..b:443"].startswith("the host name is not a valid DNS name")
    assert all(p.named for p in problems) and len(problems) == 2
    assert code == 2
    assert "Traceback" not in err


def test_a_hosts_file_that_is_a_device_is_refused_at_once() -> None:
    start = time.monotonic()

    code, _, err = _run("--hosts", "/dev/zero")

    assert code == 2
    assert "/dev/zero is not a regular file (a device)" in err
    assert err.count("\n") == 1
    assert time.monotonic() - start < 5


def test_malformed_certificates_and_keys_are_problems_never_exceptions(
    tmp_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    seeds = [
        _der(_cert(key, "u")),
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "u")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER),
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ]
    state = random.Random(7)
    for index in range(300):
        data = bytearray(seeds[index % len(seeds)])
        for _ in range(state.randint(1, 3)):
            data[state.randrange(len(data))] = state.randrange(256)
        if index % 4 == 0:
            data = data[: state.randrange(8, len(data))]
        (tmp_path / f"item-{index:03}.der").write_bytes(bytes(data))

    records, problems = _read(tmp_path)

    assert len(records) + len(problems) >= 300
    assert all(r.key_type for r in records)


# --- each file and host once ---------------------------------------------------


def test_a_file_named_twice_is_read_once(tmp_path: Path) -> None:
    real = tmp_path / "top" / "real"
    real.mkdir(parents=True)
    (real / "a.pem").write_bytes(
        _pem(_cert(ec.generate_private_key(ec.SECP256R1()), "a"))
    )
    (real / "again").symlink_to(real)  # a link back into the folder
    link = tmp_path / "sl"
    link.symlink_to(tmp_path / "top")
    report = tmp_path / "report.json"

    code, _, err = _run(
        str(real),
        str(real.resolve()),
        str(link / "real"),
        str(link / "real" / ".." / "real" / "a.pem"),
        "-q",
        "--json",
        str(report),
    )

    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["units"] == 1 and data["findings"] == []


def test_a_folder_reached_through_a_link_is_read(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.pem").write_bytes(
        _pem(_cert(ec.generate_private_key(ec.SECP256R1()), "b"))
    )
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "more").symlink_to(elsewhere)

    records, problems = _read(keys)

    assert [r.location for r in records] == [str(keys / "more" / "b.pem")]
    assert problems == []


def test_a_host_listed_twice_is_audited_once(tmp_path: Path) -> None:
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("192.0.2.7:443\n192.0.2.7:443  # again\n[::1]:8443\n")

    addresses = read_hosts_file(hosts_file)
    source = HostSource([*addresses, HostAddress("::1", 8443)])

    assert addresses == [HostAddress("192.0.2.7", 443), HostAddress("::1", 8443)]
    assert source.size() == 2


# --- files that carry keys in more than one form ------------------------------


def test_an_openssh_line_in_a_pem_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pem"
    cert = _cert(ec.generate_private_key(ec.SECP256R1()), "m")
    path.write_bytes(b"subject=CN = m\n" + _pem(cert) + f"{_ssh_line()}\n".encode())

    records, problems = _read(path)

    assert sorted(r.form for r in records) == ["certificate", "ssh host key"]
    assert problems == []


def test_every_der_certificate_of_a_concatenated_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "two.der"
    certs = [_cert(ec.generate_private_key(ec.SECP256R1()), n) for n in "ab"]
    path.write_bytes(_der(certs[0]) + _der(certs[1]))
    broken = tmp_path / "tail.der"
    broken.write_bytes(_der(certs[0]) + b"\x01\x02junk")

    records, problems = _read(path, broken)

    assert [(r.unit, r.subject) for r in records[:2]] == [
        (str(tmp_path / "two.der#1"), "CN=a"),
        (str(tmp_path / "two.der#2"), "CN=b"),
    ]
    assert len(records) == 3
    assert [(p.location, p.named) for p in problems] == [(f"{broken}#2", True)]


# --- old TLS ---------------------------------------------------------------------


@pytest.fixture
def tls1_server(tmp_path: Path) -> Iterator[int]:
    """An ``openssl s_server`` that speaks TLS 1.0 with one old cipher only."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command on this machine")
    key = rsa.generate_private_key(65537, 2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old-camera")])
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(_pem(cert))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    port = free_port()
    server = subprocess.Popen(
        [
            openssl,
            "s_server",
            "-accept",
            f"127.0.0.1:{port}",
            "-tls1",
            "-cipher",
            "AES128-SHA:@SECLEVEL=0",
            "-cert",
            str(tmp_path / "cert.pem"),
            "-key",
            str(tmp_path / "key.pem"),
            "-quiet",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(port) or server.poll() is not None, 10, "s_server")
        if server.poll() is not None:
            pytest.skip("this machine's openssl cannot serve TLS 1.0")
        probe = subprocess.run(
            [
                openssl,
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-tls1",
                "-cipher",
                "AES128-SHA:@SECLEVEL=0",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
        if probe.returncode != 0:
            pytest.skip("this machine's OpenSSL cannot complete a TLS 1.0 handshake")
        yield port
    finally:
        server.kill()
        server.wait()


def test_a_host_that_speaks_only_tls_1_0_is_audited(
    tls1_server: int, tmp_path: Path
) -> None:
    problems: list[SourceProblem] = []

    records = list(
        HostSource([HostAddress("127.0.0.1", tls1_server)], timeout=5).records(problems)
    )

    assert problems == []
    assert [(r.subject, r.key_type) for r in records] == [("CN=old-camera", "RSA-2048")]


def _p7b(tmp_path: Path, name: str, *certs: x509.Certificate) -> Path:
    """A PKCS#7 bundle as OpenSSL writes one (`openssl crl2pkcs7 -nocrl`)."""
    chain = tmp_path / f"{name}.chain.pem"
    chain.write_bytes(b"".join(_pem(c) for c in certs))
    out = tmp_path / f"{name}.p7b"
    subprocess.run(
        ["openssl", "crl2pkcs7", "-nocrl", "-certfile", str(chain), "-out", str(out)],
        check=True,
        capture_output=True,
    )
    chain.unlink()
    return out


def test_pkcs7_bundles_are_read_and_their_issuers_are_not_units(
    tmp_path: Path,
) -> None:
    ca = _cert(ec.generate_private_key(ec.SECP256R1()), "Maker CA", ca=True)
    shared = ec.generate_private_key(ec.SECP256R1())
    # The CA first, as bundles often have it: it is in both, and is no unit.
    first = _p7b(tmp_path, "cam-1", ca, _cert(shared, "cam-1"))
    second = _p7b(tmp_path, "cam-2", ca, _cert(shared, "cam-2"))
    assert first.read_bytes().startswith(b"-----BEGIN PKCS7-----")
    report = tmp_path.parent / f"{tmp_path.name}.json"

    code, _, err = _run(str(tmp_path), "-q", "--json", str(report))

    assert code == 1, err
    data = json.loads(report.read_text())
    assert data["units"] == 2
    assert [
        (f["kind"], sorted(u["name"] for u in f["units"])) for f in data["findings"]
    ] == [("duplicate-key", [str(first), str(second)])]


def test_a_private_key_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    crl = tmp_path / "list.crl"
    crl.write_bytes(b"-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n")

    for path, reason in (
        (key, "it holds only a private key, which the audit does not read"),
        (crl, "its PEM blocks: X509 CRL"),
    ):
        code, _, err = _run(str(path))

        assert code == 2
        assert reason in err


def test_a_certificate_cut_short_in_a_folder_makes_the_run_incomplete(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "units"
    folder.mkdir()
    whole = _pem(_cert(ec.generate_private_key(ec.SECP256R1()), "good"))
    (folder / "good.pem").write_bytes(whole)
    cut = _pem(_cert(ec.generate_private_key(ec.SECP256R1()), "cut"))
    (folder / "trunc.pem").write_bytes(cut[:300])
    # A chain file whose second block was cut: its first key is still read.
    first = _pem(_cert(ec.generate_private_key(ec.SECP256R1()), "chain"))
    (folder / "chain.pem").write_bytes(first + cut[:300])
    report = tmp_path / "report.json"

    code, _, err = _run(str(folder), "-q", "--json", str(report))

    assert code == 2, err
    data = json.loads(report.read_text())
    assert data["verdict"] == "incomplete"
    assert data["units"] == 2
    assert sorted(p["location"] for p in data["problems"]) == [
        f"{folder / 'chain.pem'}:{len(first.splitlines()) + 1}",
        f"{folder / 'trunc.pem'}:1",
    ]
    assert all("cut off" in p["reason"] for p in data["problems"])
