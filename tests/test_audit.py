"""``unitcert audit`` end to end: files, folders and live TLS hosts, every mode.

The fleet: about 2,600 good keys (RSA-2048 from a session pool of 1024-bit
primes, ECDSA P-256 and Ed25519 SSH host keys) in PEM and DER certificates,
CSRs, public keys and a known_hosts file, with planted faults among them. The
audit must report exactly the planted ones.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import json
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gmpy2
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import NameOID

from unitcert.audit.cli import audit

DATA = Path(__file__).parent / "data"
GOOD_RSA = 300
GOOD_EC = 1_800
GOOD_SSH = 300


def _prime(seed: int, bits: int) -> int:
    state = gmpy2.random_state(seed)
    # The top two bits set: the product of two such primes has all its bits.
    return int(gmpy2.next_prime(gmpy2.mpz_urandomb(state, bits) | (3 << (bits - 2))))


@pytest.fixture(scope="session")
def prime_pool() -> list[int]:
    """1024-bit primes, made once per session (two processes)."""
    count = 2 * GOOD_RSA + 24
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        primes = list(pool.map(_prime, range(count), [1024] * count, chunksize=40))
    assert len(set(primes)) == count
    return primes


def _rsa_private(p: int, q: int, e: int = 65537) -> rsa.RSAPrivateKey:
    d = rsa.rsa_recover_private_exponent(e, p, q)
    numbers = rsa.RSAPrivateNumbers(
        p,
        q,
        d,
        rsa.rsa_crt_dmp1(d, p),
        rsa.rsa_crt_dmq1(d, q),
        rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, p * q),
    )
    return numbers.private_key()


def _rsa_public(n: int, e: int = 65537) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(e, n).public_key()


@dataclass
class _CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        name: str,
        serial: str | None = None,
    ) -> x509.Certificate:
        now = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        if serial is not None:
            attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=800))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .sign(self.key, hashes.SHA256())
        )


def _self_signed(
    key: ec.EllipticCurvePrivateKey,
    name: x509.Name,
    *,
    start: dt.datetime,
    days: int,
    path_length: int | None,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), True)
        .sign(key, hashes.SHA256())
    )


def _make_ca() -> _CA:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Maker CA")])
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return _CA(key, _self_signed(key, name, start=start, days=3650, path_length=0))


def _default_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """What a firmware build puts in every unit: self-signed, CA:TRUE."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "router.local"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "0000"),
        ]
    )
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    return _self_signed(key, name, start=start, days=7300, path_length=None)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki_pem(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _openssh(key: ed25519.Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def _csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _spki_der_rsa_e1(n: int) -> bytes:
    """An RSA SPKI with public exponent 1, which cryptography refuses to build."""

    def element(tag: int, body: bytes) -> bytes:
        size = len(body)
        if size < 0x80:
            return bytes([tag, size]) + body
        width = (size.bit_length() + 7) // 8
        return bytes([tag, 0x80 | width]) + size.to_bytes(width, "big") + body

    modulus = n.to_bytes((n.bit_length() + 8) // 8, "big")
    pkcs1 = element(0x30, element(0x02, modulus) + element(0x02, b"\x01"))
    algorithm = bytes.fromhex("300d06092a864886f70d0101010500")
    return element(0x30, algorithm + element(0x03, b"\x00" + pkcs1))


@dataclass
class Fleet:
    """The fleet folder, the servers' material, and what the audit must find."""

    root: Path
    expected: set[tuple[str, frozenset[str]]]
    servers: list[tuple[bytes, bytes]]  # (cert PEM, key PEM) per live host
    secrets: list[int]  # primes that must never appear in a report
    ca: _CA
    spare: list[int]  # unused pool primes, for the registry test


def _unit(path: Path) -> str:
    return str(path)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, prime_pool: list[int]) -> Fleet:
    root = tmp_path_factory.mktemp("fleet")
    ca = _make_ca()
    good, spare = prime_pool[: 2 * GOOD_RSA], prime_pool[2 * GOOD_RSA :]
    for folder in ("certs", "der", "keys", "ec", "csr", "ssh", "planted", "misc"):
        (root / folder).mkdir()

    for i in range(GOOD_RSA):
        public = _rsa_public(good[2 * i] * good[2 * i + 1])
        if i < 150:
            chain = _pem(ca.issue(public, f"r{i}.cam.example")) + _pem(ca.cert)
            (root / "certs" / f"unit-{i:04}.pem").write_bytes(chain)
        elif i < 250:
            der = ca.issue(public, f"r{i}.cam.example").public_bytes(
                serialization.Encoding.DER
            )
            (root / "der" / f"unit-{i:04}.der").write_bytes(der)
        else:
            (root / "keys" / f"unit-{i:04}.pem").write_bytes(_spki_pem(public))
    for i in range(GOOD_EC):
        key = ec.generate_private_key(ec.SECP256R1())
        if i < 1_600:
            cert = ca.issue(key.public_key(), f"e{i}.router.example")
            (root / "ec" / f"router-{i:04}.pem").write_bytes(_pem(cert))
        else:
            (root / "csr" / f"router-{i:04}.csr").write_bytes(_csr(key, f"e{i}"))
    ssh_lines = [
        f"cam-{i} {_openssh(ed25519.Ed25519PrivateKey.generate().public_key())}"
        for i in range(GOOD_SSH)
    ]
    (root / "misc" / "README.txt").write_text("Not a key.\n")
    private = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (root / "misc" / "stray.key").write_bytes(private)

    planted = root / "planted"
    expected: set[tuple[str, frozenset[str]]] = set()
    servers: list[tuple[bytes, bytes]] = []

    def key_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    # A prime shared between a file and a live host (host 0).
    p1, q1, r1 = spare[0:3]
    (planted / "sp-a.pem").write_bytes(_pem(ca.issue(_rsa_public(p1 * q1), "sp-a")))
    host_key = _rsa_private(p1, r1)
    servers.append((_pem(ca.issue(host_key.public_key(), "host0")), key_pem(host_key)))
    expected.add(("shared-prime", frozenset({_unit(planted / "sp-a.pem"), "@host0"})))

    # A modulus that shares both of its primes with two others.
    p2, q2, r2, s2 = spare[3:7]
    (planted / "both-1.pem").write_bytes(_pem(ca.issue(_rsa_public(p2 * q2), "b1")))
    (planted / "both-2.pem").write_bytes(_spki_pem(_rsa_public(p2 * r2)))
    (planted / "both-3.der").write_bytes(
        ca.issue(_rsa_public(q2 * s2), "b3").public_bytes(serialization.Encoding.DER)
    )
    both = [
        _unit(planted / name) for name in ("both-1.pem", "both-2.pem", "both-3.der")
    ]
    expected.add(("shared-prime", frozenset({both[0], both[1]})))
    expected.add(("shared-prime", frozenset({both[0], both[2]})))

    # The same RSA key on two units, and the same modulus with two exponents.
    dup = _rsa_public(spare[7] * spare[8])
    (planted / "dup-rsa-1.pem").write_bytes(_pem(ca.issue(dup, "d1")))
    (planted / "dup-rsa-2.pem").write_bytes(_pem(ca.issue(dup, "d2")))
    expected.add(
        (
            "duplicate-key",
            frozenset({_unit(planted / f"dup-rsa-{i}.pem") for i in (1, 2)}),
        )
    )
    same_n = spare[9] * spare[10]
    (planted / "same-n-1.pem").write_bytes(_spki_pem(_rsa_public(same_n, 65537)))
    (planted / "same-n-2.pem").write_bytes(_spki_pem(_rsa_public(same_n, 3)))
    expected.add(
        (
            "duplicate-key",
            frozenset({_unit(planted / f"same-n-{i}.pem") for i in (1, 2)}),
        )
    )

    # The same ECDSA key in a certificate and in another unit's CSR.
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (planted / "dup-ec-1.pem").write_bytes(_pem(ca.issue(ec_key.public_key(), "e1")))
    (planted / "dup-ec-2.csr").write_bytes(_csr(ec_key, "e2"))
    expected.add(
        (
            "duplicate-key",
            frozenset(
                {_unit(planted / "dup-ec-1.pem"), _unit(planted / "dup-ec-2.csr")}
            ),
        )
    )

    # The same Ed25519 SSH host key on two cameras.
    shared_ssh = _openssh(ed25519.Ed25519PrivateKey.generate().public_key())
    ssh_lines += [f"cam-900 {shared_ssh}", f"cam-901,10.0.0.9 {shared_ssh}"]
    (root / "ssh" / "known_hosts").write_text("\n".join(ssh_lines) + "\n")
    expected.add(("duplicate-key", frozenset({"cam-900", "cam-901"})))

    # Single-key weaknesses.
    shutil.copy(DATA / "audit" / "rsa-roca.pem", planted / "roca.pem")
    expected.add(("roca", frozenset({_unit(planted / "roca.pem")})))
    p_f = spare[11]
    q_f = int(gmpy2.next_prime(p_f + (1 << 400)))
    (planted / "fermat.pem").write_bytes(_spki_pem(_rsa_public(p_f * q_f)))
    expected.add(("fermat", frozenset({_unit(planted / "fermat.pem")})))
    big = _prime(99, 2033)
    (planted / "smallfactor.pem").write_bytes(_spki_pem(_rsa_public(65521 * big)))
    expected.add(("smallfactors", frozenset({_unit(planted / "smallfactor.pem")})))
    shutil.copy(DATA / "rfc-example-keys" / "rsa2048-rfc9500.key", planted / "rfc.pem")
    expected.add(("published", frozenset({_unit(planted / "rfc.pem")})))
    small = _rsa_public(_prime(7, 512) * _prime(8, 512))
    (planted / "small.pem").write_bytes(_spki_pem(small))
    expected.add(("rsasize", frozenset({_unit(planted / "small.pem")})))
    (planted / "e1.der").write_bytes(_spki_der_rsa_e1(spare[12] * spare[13]))
    expected.add(("rsainvalid", frozenset({_unit(planted / "e1.der")})))

    # A unit whose certificate is both in the folder and served live (host 1):
    # one unit seen twice, not a duplicate. Host 2 serves a good key.
    seen_key = _rsa_private(spare[14], spare[15])
    seen_cert = _pem(ca.issue(seen_key.public_key(), "seen-twice"))
    (planted / "seen-twice.pem").write_bytes(seen_cert)
    servers.append((seen_cert, key_pem(seen_key)))
    good_host = ec.generate_private_key(ec.SECP256R1())
    servers.append(
        (_pem(ca.issue(good_host.public_key(), "host2")), key_pem(good_host))
    )

    # A firmware's default certificate (self-signed, CA:TRUE, a fixed serial)
    # in a firmware dump and served by hosts 3 and 4: three units, one key.
    default_key = ec.generate_private_key(ec.SECP256R1())
    default_cert = _pem(_default_certificate(default_key))
    (planted / "firmware-dump.pem").write_bytes(default_cert)
    servers += [(default_cert, key_pem(default_key))] * 2
    expected.add(
        (
            "duplicate-key",
            frozenset({_unit(planted / "firmware-dump.pem"), "@host3", "@host4"}),
        )
    )

    # One unit's certificate and its reissue (same key, same serial), in two
    # files: one unit, no finding.
    reissued = ec.generate_private_key(ec.SECP256R1()).public_key()
    (planted / "unit-77-2025.pem").write_bytes(_pem(ca.issue(reissued, "u77", "U77")))
    (planted / "unit-77-2026.pem").write_bytes(_pem(ca.issue(reissued, "u77", "u77")))

    return Fleet(root, expected, servers, [p1, q1, r1, p2, q2, r2, s2], ca, spare[16:])


class _TLSServer:
    """A loopback TLS server that completes handshakes and hangs up."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, folder: Path) -> None:
        cert_file, key_file = folder / "cert.pem", folder / "key.pem"
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file, key_file)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    with self.context.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    continue

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.listener.close()


@pytest.fixture(scope="module")
def hosts(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Start the fleet's live hosts; yield a hosts file that also lists a dead one."""
    servers = []
    for index, (cert, key) in enumerate(fleet.servers):
        folder = tmp_path_factory.mktemp(f"host{index}")
        servers.append(_TLSServer(cert, key, folder))
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    hosts_file = tmp_path_factory.mktemp("hosts") / "hosts.txt"
    lines = ["# the fleet's live units"]
    lines += [f"127.0.0.1:{s.port}" for s in servers] + [f"127.0.0.1:{dead_port}"]
    hosts_file.write_text("\n".join(lines) + "\n")
    live = {f"@host{i}": f"127.0.0.1:{server.port}" for i, server in enumerate(servers)}
    fleet.expected = {
        (kind, frozenset(live.get(u, u) for u in units))
        for kind, units in fleet.expected
    }
    try:
        yield hosts_file
    finally:
        for server in servers:
            server.close()


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(audit, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _findings(report: Path) -> set[tuple[str, frozenset[str]]]:
    data = json.loads(report.read_text())
    return {
        (f["kind"], frozenset(u["name"] for u in f["units"])) for f in data["findings"]
    }


@pytest.fixture(scope="module")
def dask_address() -> Iterator[str]:
    import warnings

    distributed = pytest.importorskip("distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None, host="127.0.0.1"
        )
    try:
        yield cluster.scheduler_address
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cluster.close()


@pytest.mark.parametrize(
    "mode",
    [[], ["--jobs", "2"], ["--memory-limit", "64K"], ["--dask", "cluster"]],
    ids=["default", "jobs", "memory-limit", "dask"],
)
def test_audit_finds_exactly_the_planted_faults_in_every_mode(
    fleet: Fleet,
    hosts: Path,
    tmp_path: Path,
    mode: list[str],
    request: pytest.FixtureRequest,
) -> None:
    if mode and mode[0] == "--dask":
        mode = ["--dask", request.getfixturevalue("dask_address")]
    report = tmp_path / "report.json"

    code, out, err = _run(
        str(fleet.root), "--hosts", str(hosts), "--json", str(report), "--quiet", *mode
    )

    assert code == 1, err
    assert _findings(report) == fleet.expected
    data = json.loads(report.read_text())
    assert data["units"] > GOOD_RSA + GOOD_EC + GOOD_SSH
    assert "Findings" in out
    problems = {p["location"]: p["reason"] for p in data["problems"]}
    assert str(fleet.root / "misc" / "README.txt") in problems
    assert any("cannot connect" in reason for reason in problems.values())


def test_audit_reports_carry_no_prime(
    fleet: Fleet, hosts: Path, tmp_path: Path
) -> None:
    report, page = tmp_path / "r.json", tmp_path / "r.html"

    code, _, _ = _run(
        str(fleet.root),
        "--hosts",
        str(hosts),
        "--json",
        str(report),
        "--html",
        str(page),
    )

    assert code == 1
    text = report.read_text() + page.read_text()
    for prime in fleet.secrets:
        assert str(prime) not in text
        assert format(prime, "x") not in text
    assert "factored" in text


def test_audit_html_report_is_self_contained_with_charts(
    fleet: Fleet, tmp_path: Path
) -> None:
    page = tmp_path / "report.html"

    code, _, _ = _run(str(fleet.root / "planted"), "--html", str(page), "-q")

    html = page.read_text()
    assert code == 1
    assert html.count("<svg") == 3
    for caption in ("Findings by kind", "by key type", "by issue month"):
        assert caption in html
    assert "<script" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )


def test_audit_exits_zero_for_a_clean_fleet(fleet: Fleet, tmp_path: Path) -> None:
    report = tmp_path / "clean.json"

    code, out, _ = _run(str(fleet.root / "ec"), "--json", str(report))

    assert code == 0
    assert json.loads(report.read_text())["clean"] is True
    assert "No findings" in out


def test_audit_skips_ca_certificates_in_chain_files(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Every chain file carries the maker's CA: it is not a unit's duplicate key.
    code, _, _ = _run(str(fleet.root / "certs"))

    assert code == 0


@pytest.mark.parametrize("option", ["--json", "--html"])
def test_audit_refuses_a_report_path_it_cannot_write_before_auditing(
    fleet: Fleet, tmp_path: Path, option: str
) -> None:
    for target, reason in (
        (tmp_path, "is a directory"),
        (tmp_path / "missing" / "report", "does not exist"),
    ):
        code, out, err = _run(str(fleet.root / "planted"), option, str(target), "-q")

        assert code == 2
        assert reason in err
        assert "Audited" not in out


def test_audit_exits_two_for_a_path_that_does_not_exist(tmp_path: Path) -> None:
    code, _, err = _run(str(tmp_path / "missing"))

    assert code == 2
    assert "does not exist" in err
    assert "Traceback" not in err


def test_audit_exits_two_for_a_bad_hosts_line(tmp_path: Path) -> None:
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("127.0.0.1:443\nrouter-without-port\n")

    code, _, err = _run("--hosts", str(hosts_file))

    assert code == 2
    assert "line 2" in err and "host:port" in err
    assert err.count("\n") == 1


def test_audit_exits_two_for_a_named_file_without_keys(fleet: Fleet) -> None:
    code, _, err = _run(str(fleet.root / "misc" / "stray.key"))

    assert code == 2
    assert "holds only a private key" in err


def test_audit_exits_two_when_no_host_answers(tmp_path: Path) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text(f"127.0.0.1:{port}\n")

    code, _, err = _run("--hosts", str(hosts_file), "--timeout", "2")

    assert code == 2
    assert "found no keys" in err


def test_audit_names_an_unreachable_dask_scheduler() -> None:
    from unitcert.audit.distributed import batch_gcd_on_dask
    from unitcert.errors import InputError

    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()

    with pytest.raises(InputError, match="cannot reach the Dask scheduler"):
        batch_gcd_on_dask([15, 21], f"tcp://127.0.0.1:{port}", connect_timeout=1)


def test_audit_refuses_a_memory_limit_that_is_not_a_size(fleet: Fleet) -> None:
    code, _, err = _run(str(fleet.root / "planted"), "--memory-limit", "lots")

    assert code == 2
    assert "not a size" in err


def _register(directory: Path, units: list[tuple[str, x509.Certificate]]) -> str:
    """Write units straight into a factory registry, as an old import might have.

    The factory's issuer refuses duplicate keys and shared primes, so a faulty
    registry can only be made by writing its rows directly.
    """
    from unitcert.factory.registry import Registry, UnitRow, default_url

    directory.mkdir()
    url = default_url(directory)
    with Registry(url, create=True) as registry, registry.transaction() as session:
        for serial, cert in units:
            key = cert.public_key()
            modulus = (
                key.public_numbers().n.to_bytes(256, "big")
                if isinstance(key, rsa.RSAPublicKey)
                else None
            )
            session.add(
                UnitRow(
                    serial=serial,
                    hostname=f"{serial}.router.example.com",
                    spki_sha256=hashlib.sha256(
                        key.public_bytes(
                            serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo,
                        )
                    ).hexdigest(),
                    key_type="RSA-2048" if modulus else "ECDSA P-256",
                    rsa_modulus=modulus,
                    prime_check="clean" if modulus else "n/a",
                    cert_serial=format(cert.serial_number, "x"),
                    cert_pem=_pem(cert).decode(),
                    not_after=cert.not_valid_after_utc,
                    issued_at=cert.not_valid_before_utc,
                    first_issued_at=cert.not_valid_before_utc,
                    status="active",
                    label_printed=False,
                )
            )
    return url


def test_audit_reads_the_factory_registry_with_files(
    fleet: Fleet, tmp_path: Path
) -> None:
    ca, (g1, g2, p, q, r) = fleet.ca, fleet.spare[:5]
    twin = ec.generate_private_key(ec.SECP256R1()).public_key()
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(30)]
    units = [
        (f"r-{i:03}", ca.issue(key, f"r{i}", f"r-{i:03}")) for i, key in enumerate(keys)
    ]
    units += [
        ("r-100", ca.issue(twin, "r100")),
        ("r-101", ca.issue(twin, "r101")),
        ("r-102", ca.issue(_rsa_public(g1 * g2), "r102")),
        ("r-103", ca.issue(_rsa_public(p * q), "r103")),
    ]
    url = _register(tmp_path / "F", units)
    files = tmp_path / "files"
    files.mkdir()
    (files / "legacy.pem").write_bytes(_spki_pem(_rsa_public(p * r)))
    # The same units seen again: r-005's registered certificate, and a
    # reissue of r-006's for the same key. Neither is a second unit.
    (files / "exported.pem").write_bytes(_pem(units[5][1]))
    (files / "r6-reissue.pem").write_bytes(_pem(ca.issue(keys[6], "r6", "R-006")))
    expected = {
        ("duplicate-key", frozenset({"r-100", "r-101"})),
        ("shared-prime", frozenset({"r-103", str(files / "legacy.pem")})),
    }

    for source in (["--dir", str(tmp_path / "F")], ["--db", url]):
        report = tmp_path / "report.json"
        code, _, err = _run(*source, str(files), "--json", str(report), "-q")

        assert code == 1, err
        assert _findings(report) == expected
        assert json.loads(report.read_text())["units"] == 35


def test_audit_exits_two_for_a_folder_without_a_registry(tmp_path: Path) -> None:
    code, _, err = _run("--dir", str(tmp_path))

    assert code == 2
    assert "no registry" in err


def _self_signed_ca_true(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    """What a plain `openssl req -x509` makes: a self-signed cert with CA:TRUE."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    return _pem(cert)


def test_default_certificates_marked_ca_are_audited_as_units(tmp_path: Path) -> None:
    shared = ec.generate_private_key(ec.SECP256R1())
    for name in ("u1", "u2"):
        (tmp_path / f"{name}.crt").write_bytes(_self_signed_ca_true(shared, name))
    report = tmp_path / "report.json"

    code, _, _ = _run(str(tmp_path), "--quiet", "--json", str(report))

    assert code == 1
    assert (
        "duplicate-key",
        frozenset({str(tmp_path / "u1.crt"), str(tmp_path / "u2.crt")}),
    ) in (_findings(report))


def test_the_issuers_in_chain_files_are_not_units(tmp_path: Path) -> None:
    ca = _make_ca()
    for name in ("u1", "u2"):
        leaf = ca.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), name)
        (tmp_path / f"{name}.pem").write_bytes(_pem(leaf) + _pem(ca.cert))

    code, out, _ = _run(str(tmp_path), "--quiet")

    assert code == 0, out


def _closed_port() -> int:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    return port


def test_audit_is_not_clean_when_a_named_host_could_not_be_read(
    tmp_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server = _TLSServer(_self_signed_ca_true(key, "clean"), key_pem, tmp_path)
    dead = f"127.0.0.1:{_closed_port()}"
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text(f"127.0.0.1:{server.port}\n{dead}\n")
    report = tmp_path / "report.json"
    try:
        code, _, err = _run(
            "--hosts", str(hosts_file), "--timeout", "2", "--json", str(report), "-q"
        )
    finally:
        server.close()

    assert code == 2
    assert "1 item that may hold keys" in err and dead in err
    assert "not known to be clean" in err
    data = json.loads(report.read_text())
    assert data["units"] == 1 and data["findings"] == []


def test_audit_refuses_to_write_a_report_over_one_of_its_inputs(
    fleet: Fleet, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    shutil.copytree(fleet.root / "planted", folder)
    victim = sorted(folder.iterdir())[0]
    before = victim.read_bytes()

    for args in (
        [str(folder), "--json", str(victim)],
        [str(victim), "--html", str(victim)],
    ):
        code, out, err = _run(*args, "-q")

        assert code == 2
        assert "one of the audit's inputs" in err
        assert "Audited" not in out
    assert victim.read_bytes() == before


def test_audit_refuses_one_path_for_both_reports(fleet: Fleet, tmp_path: Path) -> None:
    both = str(tmp_path / "report")

    code, _, err = _run(str(fleet.root / "ec"), "--json", both, "--html", both)

    assert code == 2
    assert "give each report its own file" in err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("not an address", "is not a Dask scheduler address"),
        ("tcp://10.0.0.5", "is not a Dask scheduler address"),
        ("gopher://10.0.0.5:8786", "unknown protocol 'gopher'"),
    ],
)
def test_audit_refuses_a_malformed_dask_address_before_reading(
    tmp_path: Path, address: str, message: str
) -> None:
    pytest.importorskip("distributed")
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "unit.crt").write_bytes(_self_signed_ca_true(key, "unit"))

    code, out, err = _run(str(tmp_path), "--dask", address)

    assert code == 2
    assert message in err
    assert "Audited" not in out and "Traceback" not in err


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "7200"])
def test_audit_refuses_a_timeout_that_is_not_a_sane_number(
    tmp_path: Path, timeout: str
) -> None:
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("127.0.0.1:443\n")

    code, _, err = _run("--hosts", str(hosts_file), "--timeout", timeout)

    assert code == 2
    assert "--timeout" in err


def test_audit_caps_jobs_at_the_machines_cpus(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    import os

    with caplog.at_level("WARNING"):
        code, _, _ = _run(str(fleet.root / "ec"), "--jobs", "512", "-q")

    assert code == 0
    assert f"using {os.cpu_count()} processes" in caplog.text


def test_audit_summary_prints_file_names_as_they_are(tmp_path: Path) -> None:
    # A file name is data: rich must not read "[red]" in it as a style.
    shared = ec.generate_private_key(ec.SECP256R1())
    for name in ("[red]a", "[bold]b"):
        (tmp_path / f"{name}.crt").write_bytes(_self_signed_ca_true(shared, name))

    code, out, _ = _run(str(tmp_path), "-q")

    assert code == 1
    assert "[red]a" in out and "[bold]b" in out


def test_audit_reports_a_registry_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "registry.db").write_bytes(b"not sqlite at all\n" * 200)

    code, _, err = _run("--dir", str(tmp_path))

    assert code == 2
    assert "registry" in err and "not a database" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("exponent", [2, 4, 65536])
def test_an_even_rsa_exponent_is_invalid(prime_pool: list[int], exponent: int) -> None:
    from unitcert.quality import check_rsa_numbers

    findings = check_rsa_numbers(prime_pool[0] * prime_pool[1], exponent)

    invalid = [f for f in findings if f.check == "rsainvalid"]
    assert len(invalid) == 1
    assert str(exponent) in invalid[0].detail


def test_files_differing_only_in_extension_are_one_unit_only_for_one_key(
    prime_pool: list[int], tmp_path: Path
) -> None:
    ca = _make_ca()
    p, q, r = prime_pool[:3]
    # Two keys that share a prime, in x.pem and x.der: two units.
    (tmp_path / "x.pem").write_bytes(_spki_pem(_rsa_public(p * q)))
    (tmp_path / "x.der").write_bytes(
        ca.issue(_rsa_public(p * r), "x").public_bytes(serialization.Encoding.DER)
    )
    # One key under two names, in y.pem and y.crt: two units sharing a key.
    twin = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "y.pem").write_bytes(_pem(ca.issue(twin, "ec-unit1")))
    (tmp_path / "y.crt").write_bytes(_pem(ca.issue(twin, "ec-unit2")))
    # A unit's certificate and its CSR: one unit.
    own = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "unit-42.crt").write_bytes(_pem(ca.issue(own.public_key(), "u42")))
    (tmp_path / "unit-42.csr").write_bytes(_csr(own, "u42"))
    report = tmp_path.parent / f"{tmp_path.name}-report.json"

    code, _, err = _run(str(tmp_path), "-q", "--json", str(report))

    assert code == 1, err
    assert _findings(report) == {
        ("shared-prime", frozenset({str(tmp_path / "x.pem"), str(tmp_path / "x.der")})),
        (
            "duplicate-key",
            frozenset({str(tmp_path / "y.pem"), str(tmp_path / "y.crt")}),
        ),
    }
    assert json.loads(report.read_text())["units"] == 5
