"""``unitcert verify``: addresses as people give them, exit codes, and --ca checks.

The units here are real TLS servers on loopback serving certificates from a
CA made in the test, so that the chain and name checks meet OpenSSL's verifier.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from unitcert.cli import run
from unitcert.code import code_for_spki, spki_from_cert_der
from unitcert.errors import ConnectError, InputError
from unitcert.verify import check_server_name, format_address, parse_address

OTHER_CODE = "B9X7-HK54-M3T2-1PDW-CAXP-X"  # DESIGN.md's vector: an RFC example key
UNIT_NAME = "ab12.router.example.com"


# --- a CA and units that serve its certificates -------------------------------


@dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def write(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_authority(common_name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


@pytest.fixture(scope="module")
def authority() -> Authority:
    return _make_authority("unitcert test maker root")


@dataclass
class TlsUnit:
    port: int
    code: str
    stop: threading.Event
    thread: threading.Thread

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _serve(
    listener: socket.socket, context: ssl.SSLContext, stop: threading.Event
) -> None:
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        conn.settimeout(5)
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass
        finally:
            conn.close()


@pytest.fixture(scope="module")
def start_unit(
    authority: Authority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., TlsUnit]]:
    """Start a TLS unit whose certificate names ``names`` (DNS or IP literals)."""
    units: list[tuple[TlsUnit, socket.socket]] = []
    folder = tmp_path_factory.mktemp("units")

    def start(*names: str) -> TlsUnit:
        key = ec.generate_private_key(ec.SECP256R1())
        alt_names: list[x509.GeneralName] = []
        for name in names:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt_names.append(x509.DNSName(name))
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(authority.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    authority.key.public_key()
                ),
                critical=False,
            )
            .sign(authority.key, hashes.SHA256())
        )
        index = len(units)
        cert_path, key_path = folder / f"{index}.pem", folder / f"{index}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.2)
        stop = threading.Event()
        thread = threading.Thread(
            target=_serve, args=(listener, context, stop), daemon=True
        )
        thread.start()
        served = code_for_spki(
            spki_from_cert_der(cert.public_bytes(serialization.Encoding.DER))
        )
        unit = TlsUnit(listener.getsockname()[1], str(served), stop, thread)
        units.append((unit, listener))
        return unit

    yield start
    for unit, listener in units:
        unit.stop.set()
        unit.thread.join(timeout=5)
        listener.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    assert "internal error" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- addresses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.7", ("192.0.2.7", 443)),
        ("  192.0.2.7:8443 \n", ("192.0.2.7", 8443)),
        ("https://192.0.2.7:8443/", ("192.0.2.7", 8443)),
        ("HTTPS://unit.example/login?next=/", ("unit.example", 443)),
        ("unit.example.:8443", ("unit.example", 8443)),
        ("[::1]:8443", ("::1", 8443)),
        ("[::1]", ("::1", 443)),
        ("https://[2001:db8::1]:8443/", ("2001:db8::1", 8443)),
        ("::1", ("::1", 443)),
        ("2001:db8::1", ("2001:db8::1", 443)),
        ("bücher.example", ("xn--bcher-kva.example", 443)),
    ],
)
def test_parse_address_reads_what_people_paste(
    text: str, expected: tuple[str, int]
) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("127.0.0.1:0", "from 1 to 65535"),
        ("127.0.0.1:99999", "from 1 to 65535"),
        (":99999", "no host"),
        ("127.0.0.1:-5", "from 1 to 65535"),
        ("127.0.0.1:", "from 1 to 65535"),
        ("[::1]:x", "from 1 to 65535"),
        ("", "empty"),
        ("   ", "empty"),
        (":8443", "no host"),
        ("[::1", "without closing"),
        ("[unit.example]:8443", "only for IPv6"),
        ("::1:8443", "[::1]:8443"),
        ("fe80::1:28443", "[fe80::1]:28443"),
        ("http://127.0.0.1:8080/", "HTTPS port"),
        ("ftp://unit.example/", "https://"),
        ("a" * 300, "at most 253"),
        ("x" * 64 + ".example", "at most 63"),
        ("unit..example", "empty part"),
        ("unit example", "characters"),
        ("999.1.1.1", "IPv4"),
    ],
)
def test_verify_exits_3_with_one_sentence_for_an_unusable_address(
    text: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConnectError) as caught:
        parse_address(text)
    assert words in str(caught.value)

    code = run(["verify", text, "--code", OTHER_CODE])

    assert code == 3
    assert words in _one_line(capsys.readouterr().err)


def test_format_address_brackets_ipv6() -> None:
    assert format_address("::1", 8443) == "[::1]:8443"
    assert format_address("192.0.2.7", 443) == "192.0.2.7:443"


def test_verify_accepts_the_url_that_serve_prints_and_surrounding_spaces(
    start_unit: Callable[..., TlsUnit], capsys: pytest.CaptureFixture[str]
) -> None:
    unit = start_unit(UNIT_NAME)

    for text in [f"https://127.0.0.1:{unit.port}/", f"  127.0.0.1:{unit.port}\t"]:
        assert run(["verify", text, "--code", f" {unit.code} "]) == 0
        assert f"OK: 127.0.0.1:{unit.port}" in capsys.readouterr().out


def test_verify_reaches_a_unit_on_ipv6_loopback(
    start_unit: Callable[..., TlsUnit], capsys: pytest.CaptureFixture[str]
) -> None:
    unit = start_unit(UNIT_NAME)
    with socket.socket(socket.AF_INET6) as listener:
        try:
            listener.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
        listener.listen(1)
        port = listener.getsockname()[1]
        code = run(["verify", f"[::1]:{port}", "--code", unit.code, "--timeout", "1"])

    # Nothing speaks TLS on it: the address was read and connected to.
    assert code == 3
    assert f"[::1]:{port}" in capsys.readouterr().err


# --- --name --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "   ", ".", "a" * 300, "x" * 64 + ".example", "bad name", "a..b"]
)
def test_verify_refuses_an_unusable_name_as_a_usage_error(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(InputError):
        check_server_name(name)

    code = run(["verify", "127.0.0.1:1", "--code", OTHER_CODE, "--name", name])

    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and "internal error" not in err
    assert "--name" in err


def test_check_server_name_accepts_dns_names_and_ip_literals() -> None:
    assert check_server_name(f" {UNIT_NAME}. ") == UNIT_NAME
    assert check_server_name("192.0.2.7") == "192.0.2.7"
    assert check_server_name("[::1]") == "::1"


# --- exit codes of the command line itself ---------------------------------------


def test_verify_usage_errors_exit_2_as_its_help_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["verify", "127.0.0.1:1"]) == 2
    assert run(["verify", "127.0.0.1:1", "--code", OTHER_CODE, "--no-such"]) == 2
    capsys.readouterr()

    assert run(["verify", "--help"]) == 0
    help_text = capsys.readouterr().out
    for line in [
        "0  the unit",
        "1  a valid code",
        "2  the code",
        "3  cannot",
        "4  the",
    ]:
        assert line in help_text
    assert "missing --code" in help_text


# --- --ca ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["garbage", "empty", "missing", "directory", "key"])
def test_verify_exits_4_naming_the_file_for_an_unusable_ca_before_connecting(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / f"root-{kind}.pem"
    if kind == "garbage":
        ca.write_bytes(b"\x00\x01 this is not a certificate\n")
    elif kind == "empty":
        ca.write_bytes(b"")
    elif kind == "directory":
        ca.mkdir()
    elif kind == "key":
        ca.write_bytes(
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    code = run(
        ["verify", f"127.0.0.1:{_closed_port()}", "--code", OTHER_CODE, "--ca", str(ca)]
    )

    assert code == 4
    line = _one_line(capsys.readouterr().err)
    assert str(ca) in line
    assert ".." not in line


def test_verify_with_ca_checks_the_ip_connected_to_and_suggests_name(
    start_unit: Callable[..., TlsUnit],
    authority: Authority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = authority.write(tmp_path / "root.pem")
    named = start_unit(UNIT_NAME)
    with_ip = start_unit(UNIT_NAME, "127.0.0.1")

    refused = run(["verify", named.address, "--code", named.code, "--ca", str(root)])
    refused_err = capsys.readouterr().err
    accepted = run(
        ["verify", with_ip.address, "--code", with_ip.code, "--ca", str(root)]
    )

    assert refused == 4
    line = _one_line(refused_err)
    assert "for the name 127.0.0.1" in line
    assert "--name <the unit's DNS name>" in line
    assert ".." not in line and line.endswith(".")
    assert accepted == 0
    assert "for the name 127.0.0.1" in capsys.readouterr().out


def test_verify_with_ca_checks_the_given_name_or_the_dns_host(
    start_unit: Callable[..., TlsUnit],
    authority: Authority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = authority.write(tmp_path / "root.pem")
    unit = start_unit(UNIT_NAME, "localhost")
    base = ["--code", unit.code, "--ca", str(root)]

    by_name = run(["verify", unit.address, *base, "--name", UNIT_NAME])
    by_alias = run(["verify", unit.address, *base, "--servername", UNIT_NAME.upper()])
    by_host = run(["verify", f"localhost:{unit.port}", *base])
    capsys.readouterr()
    wrong = run(["verify", unit.address, *base, "--name", "other.example.com"])

    assert (by_name, by_alias, by_host) == (0, 0, 0)
    assert wrong == 4
    line = _one_line(capsys.readouterr().err)
    assert "for the name other.example.com" in line
    assert "--name <" not in line
    assert ".." not in line


def test_verify_exits_4_for_a_chain_to_another_root(
    start_unit: Callable[..., TlsUnit],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other_root = _make_authority("someone else's root").write(tmp_path / "other.pem")
    unit = start_unit(UNIT_NAME)

    code = run(
        [
            "verify",
            unit.address,
            "--code",
            unit.code,
            "--name",
            UNIT_NAME,
            "--ca",
            str(other_root),
        ]
    )

    assert code == 4
    line = _one_line(capsys.readouterr().err)
    assert "issuer certificate" in line
    assert ".." not in line


def test_verify_reports_a_mismatch_even_with_a_ca(
    start_unit: Callable[..., TlsUnit],
    authority: Authority,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = authority.write(tmp_path / "root.pem")
    unit = start_unit(UNIT_NAME)

    code = run(["verify", unit.address, "--code", OTHER_CODE, "--ca", str(root)])

    assert code == 1
    assert "NOT YOUR DEVICE" in capsys.readouterr().err
