"""The maker's CA, issuing and its refusals, the unit-side steps, provisioning, CLI.

The registry here is SQLite; tests/test_factory_registry.py runs the registry
suite against SQLite and a real PostgreSQL server.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gmpy2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from test_factory_support import (
    PASSPHRASE,
    csr_pem,
    ec_key,
    hostname,
    make_factory,
    pool_prime,
    pool_rsa_key,
    rsa_key_from_primes,
)
from unitcert import certs, device, keys
from unitcert.cli import run
from unitcert.code import code_for_spki, spki_from_cert_der
from unitcert.errors import (
    DuplicateError,
    InputError,
    KeyMismatchError,
    StateError,
    WeakKeyError,
)
from unitcert.factory import ca as factory_ca
from unitcert.factory import provision
from unitcert.factory.issue import Issuer
from unitcert.factory.provision import batch_serials, provision_batch, provision_unit
from unitcert.factory.registry import Registry, default_url
from unitcert.factory.unit import (
    install_factory_identity,
    make_identity_csr,
    new_station_unit,
    write_station_unit,
)
from unitcert.store import Part, StateStore

UNITCERT = [sys.executable, "-m", "unitcert"]


@dataclass
class Factory:
    directory: Path
    passphrase_file: Path
    issuer: Issuer

    @property
    def root(self) -> Path:
        return self.directory / "root.pem"

    @property
    def issuing(self) -> Path:
        return self.directory / "issuing.pem"

    def cli(self, *args: str) -> int:
        return run(
            [
                "factory",
                args[0],
                "--dir",
                str(self.directory),
                "--passphrase-file",
                str(self.passphrase_file),
                *args[1:],
            ]
        )


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    # The CLI points the root logger at the stderr of the moment, which pytest
    # closes after the test; later tests must not log into it.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[Factory]:
    directory = tmp_path / "F"
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_bytes(PASSPHRASE + b"\n")
    ca = make_factory(directory)
    with Registry(default_url(directory), create=True) as registry:
        yield Factory(directory, passphrase_file, Issuer(ca, registry))


def _unit(tmp_path: Path, serial: str, **options: object) -> StateStore:
    store = StateStore(tmp_path / f"unit-{serial}")
    device.init_unit(
        store,
        serial=serial,
        product="router",
        domain="example.com",
        bind_to_serial=True,
        **options,  # type: ignore[arg-type]
    )
    return store


def _openssl(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, input=stdin, timeout=30
    )


# --- the CA -----------------------------------------------------------------


def test_init_makes_a_name_constrained_root_and_issuing_ca(factory: Factory) -> None:
    root = x509.load_pem_x509_certificate(factory.root.read_bytes())
    issuing = x509.load_pem_x509_certificate(factory.issuing.read_bytes())

    for cert in (root, issuing):
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
        assert constraints.critical
        assert constraints.value.permitted_subtrees == [
            x509.DNSName("router.example.com")
        ]
        excluded = {str(n.value) for n in constraints.value.excluded_subtrees or []}
        assert excluded == {"0.0.0.0/0", "::/0"}
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign and usage.crl_sign
    assert (
        issuing.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value.path_length
        == 0
    )
    issuing.verify_directly_issued_by(root)
    assert "secp384r1" in root.public_key().curve.name  # type: ignore[union-attr]


def test_init_keeps_ca_keys_encrypted_and_private(factory: Factory) -> None:
    for name in ("root-key.pem", "issuing-key.pem"):
        path = factory.directory / name
        assert path.stat().st_mode & 0o777 == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
        with pytest.raises(TypeError):
            serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert factory.directory.stat().st_mode & 0o777 == 0o700


def test_wrong_passphrase_is_one_clear_sentence(
    factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")

    code = run(
        [
            "factory",
            "reissue",
            "--dir",
            str(factory.directory),
            "--serial",
            "x1",
            "--passphrase-file",
            str(wrong),
        ]
    )

    assert code == 1
    err = capsys.readouterr().err
    assert "the passphrase does not open the CA key" in err
    assert "Traceback" not in err


def test_init_takes_the_passphrase_from_the_environment_never_an_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNITCERT_CA_PASSPHRASE", "from the environment")
    directory = tmp_path / "F"

    assert (
        run(
            [
                "factory",
                "init",
                "--dir",
                str(directory),
                "--domain",
                "example.com",
                "--product",
                "cam",
            ]
        )
        == 0
    )
    assert (
        run(
            [
                "factory",
                "init",
                "--dir",
                str(directory),
                "--passphrase",
                "x",
                "--domain",
                "example.com",
                "--product",
                "cam",
            ]
        )
        == 2
    )

    key = (directory / "issuing-key.pem").read_bytes()
    serialization.load_pem_private_key(key, password=b"from the environment")


def test_init_refuses_an_existing_factory_and_a_short_passphrase(
    factory: Factory, tmp_path: Path
) -> None:
    before = factory.root.read_bytes()
    with pytest.raises(InputError, match="already holds a factory"):
        make_factory(factory.directory)
    assert factory.root.read_bytes() == before
    with pytest.raises(InputError, match="shorter than 8"):
        factory_ca.init_factory(
            tmp_path / "G", domain="example.com", product="nas", passphrase=b"short"
        )
    assert not (tmp_path / "G").exists()


# --- the two-step flow and the certificate -----------------------------------


def test_csr_issue_install_gives_a_chain_openssl_verifies(
    factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "unit"
    assert (
        run(
            [
                "device",
                "init",
                "--state",
                str(state),
                "--serial",
                "s1",
                "--product",
                "router",
                "--domain",
                "example.com",
            ]
        )
        == 0
    )
    csr = tmp_path / "s1.csr"
    chain = tmp_path / "s1.chain.pem"
    assert run(["device", "csr", "--state", str(state), "-o", str(csr)]) == 0
    assert (
        factory.cli("issue", "--csr", str(csr), "--serial", "s1", "-o", str(chain)) == 0
    )
    code_before = str(device.load_unit(StateStore(state)).info.code)
    assert run(["device", "install-identity", "--state", str(state), str(chain)]) == 0
    capsys.readouterr()

    verified = _openssl(
        "verify",
        "-CAfile",
        str(factory.root),
        "-untrusted",
        str(factory.issuing),
        str(chain),
    )
    assert verified.returncode == 0, verified.stderr
    unit = device.load_unit(StateStore(state))
    assert unit.source == "factory"
    assert str(unit.info.code) == code_before
    assert run(["device", "status", "--state", str(state), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "factory"


def test_unit_certificate_carries_what_browsers_and_the_issue_require(
    factory: Factory, tmp_path: Path
) -> None:
    store = _unit(tmp_path, "s7")
    issued = factory.issuer.issue(make_identity_csr(store), "s7")
    cert = issued.cert

    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "s7"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "s7.router.example.com"
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["s7.router.example.com"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.serial_number.bit_length() >= 64
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(
        days=825
    )
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert issued.chain_pem.count(b"BEGIN CERTIFICATE") == 2


def test_openssl_refuses_a_name_outside_the_constraints(
    factory: Factory, tmp_path: Path
) -> None:
    # A stolen issuing key signing for another name: the constraints stop it.
    ca = factory.issuer.ca
    signer = ca.issuing_key.signing_key()
    rogue = factory_ca.build_unit_cert(
        ca,
        signer,
        public_key=ec_key().public_key(),
        serial="x",
        hostname="www.example.org",
        validity=dt.timedelta(days=30),
        now=dt.datetime.now(dt.UTC),
    )
    path = tmp_path / "rogue.pem"
    path.write_bytes(certs.pem_chain([rogue]))

    result = _openssl(
        "verify",
        "-CAfile",
        str(factory.root),
        "-untrusted",
        str(factory.issuing),
        str(path),
    )

    assert result.returncode != 0
    assert "subtree violation" in (result.stdout + result.stderr)


def test_validity_is_configurable_but_never_above_825_days(
    factory: Factory, tmp_path: Path
) -> None:
    store = _unit(tmp_path, "v1")
    with pytest.raises(InputError, match="825"):
        factory.issuer.issue(make_identity_csr(store), "v1", validity_days=826)
    assert factory.issuer.registry.find("v1") is None

    cert = factory.issuer.issue(make_identity_csr(store), "v1", validity_days=90).cert
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=90)


# --- what issuing refuses, with nothing written ------------------------------


def _refused_and_nothing_written(
    factory: Factory, error: type[Exception], match: str, csr: bytes, serial: str
) -> None:
    before = factory.issuer.registry.list_units()
    with pytest.raises(error, match=match):
        factory.issuer.issue(csr, serial)
    assert factory.issuer.registry.list_units() == before


def test_issue_refuses_a_csr_whose_signature_does_not_verify(factory: Factory) -> None:
    csr = x509.load_pem_x509_csr(csr_pem(ec_key(), "b1"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature value
    _refused_and_nothing_written(
        factory, InputError, "signature does not verify", bytes(der), "b1"
    )


def test_issue_refuses_a_key_below_policy(factory: Factory) -> None:
    # 1024 bits, from two 512-bit primes (generating one would be flagged too).
    half = [int(gmpy2.next_prime(1 << 511 | 1 << 510 | n << 300)) for n in (5, 9)]
    small = rsa_key_from_primes(*half)
    _refused_and_nothing_written(
        factory, InputError, "1024 bits, outside the policy", csr_pem(small, "b2"), "b2"
    )
    p384 = csr_pem(ec.generate_private_key(ec.SECP521R1()), "b2")
    _refused_and_nothing_written(factory, InputError, "secp521r1", p384, "b2")


def test_issue_refuses_a_key_that_badkeys_flags(factory: Factory) -> None:
    # Primes this close fall to Fermat's method at once.
    p = pool_prime(40)
    close = rsa_key_from_primes(p, int(gmpy2.next_prime(p)))
    _refused_and_nothing_written(
        factory, WeakKeyError, "Fermat", csr_pem(close, "b3"), "b3"
    )


def test_issue_refuses_a_key_registered_to_another_serial(factory: Factory) -> None:
    key = ec_key()
    factory.issuer.issue(csr_pem(key, "c1"), "c1")
    _refused_and_nothing_written(
        factory,
        DuplicateError,
        "already registered to unit c1",
        csr_pem(key, "c2"),
        "c2",
    )


def test_issue_refuses_a_serial_already_issued_unless_reissue_is_asked(
    factory: Factory,
) -> None:
    first = factory.issuer.issue(csr_pem(ec_key(), "d1"), "d1")
    _refused_and_nothing_written(
        factory, DuplicateError, "already issued", csr_pem(ec_key(), "d1"), "d1"
    )

    again = factory.issuer.issue(csr_pem(ec_key(), "d1"), "d1", reissue=True)

    assert again.code != first.code
    crl = factory.issuer.crl()
    revoked = crl.get_revoked_certificate_by_serial_number(first.cert.serial_number)
    assert revoked is not None  # the old key's certificate is superseded


@pytest.mark.parametrize(
    "serial", ["under_score", "-leading", "trailing-", "x" * 64, "dot.ted", ""]
)
def test_issue_refuses_a_serial_that_is_not_a_dns_label(
    factory: Factory, serial: str
) -> None:
    _refused_and_nothing_written(
        factory, InputError, "not a valid DNS label", csr_pem(ec_key(), "ok"), serial
    )


def test_issue_refuses_a_csr_for_another_name(factory: Factory) -> None:
    key = ec_key()
    other = certs.build_csr(key, ["e1.camera.example.com"], serial_number="e1")
    _refused_and_nothing_written(
        factory,
        InputError,
        "asks for e1.camera.example.com",
        other.public_bytes(serialization.Encoding.PEM),
        "e1",
    )


def test_issue_refuses_an_rsa_key_sharing_a_prime_with_a_registered_one(
    factory: Factory,
) -> None:
    factory.issuer.issue(csr_pem(pool_rsa_key(0, 1), "r1"), "r1")
    factory.issuer.issue(csr_pem(pool_rsa_key(2, 3), "r2"), "r2")

    _refused_and_nothing_written(
        factory,
        WeakKeyError,
        "shares a prime factor with the key of unit r2",
        csr_pem(pool_rsa_key(3, 4), "r3"),
        "r3",
    )
    # Both of its primes registered, in two other units: still named.
    _refused_and_nothing_written(
        factory,
        WeakKeyError,
        "shares a prime factor with the key of unit r",
        csr_pem(pool_rsa_key(1, 2), "r4"),
        "r4",
    )
    assert [u.prime_check for u in factory.issuer.registry.list_units()] == [
        "clean",
        "clean",
    ]


def test_batch_refuses_rsa_keys_sharing_primes_in_the_batch_and_the_registry(
    factory: Factory,
) -> None:
    factory.issuer.issue(csr_pem(pool_rsa_key(10, 11), "g0"), "g0")
    requests = [
        ("g1", csr_pem(pool_rsa_key(12, 13), "g1")),
        ("g2", csr_pem(pool_rsa_key(14, 15), "g2")),  # shares 14 with g3
        ("g3", csr_pem(pool_rsa_key(14, 16), "g3")),
        ("g4", csr_pem(pool_rsa_key(11, 17), "g4")),  # shares 11 with g0
        ("g5", csr_pem(ec_key(), "g5")),
    ]

    outcome = factory.issuer.issue_batch(requests)

    assert [u.serial for u in outcome.issued] == ["g1", "g5"]
    assert sorted(serial for serial, _ in outcome.refused) == ["g2", "g3", "g4"]
    assert all("shares a prime" in reason for _, reason in outcome.refused)


# --- reissue, revoke, CRL, list ----------------------------------------------


def test_reissue_renews_the_certificate_for_the_same_key(
    factory: Factory, tmp_path: Path
) -> None:
    store = _unit(tmp_path, "h1")
    first = factory.issuer.issue(make_identity_csr(store), "h1")
    out = tmp_path / "h1.pem"

    assert factory.cli("reissue", "--serial", "h1", "-o", str(out), "--days", "30") == 0

    renewed = x509.load_pem_x509_certificates(out.read_bytes())[0]
    assert renewed.serial_number != first.cert.serial_number
    assert renewed.public_key() == first.cert.public_key()
    unit = install_factory_identity(store, out.read_bytes())
    assert unit.info.code == first.code
    assert factory.issuer.registry.find("h1").cert_serial == format(  # type: ignore[union-attr]
        renewed.serial_number, "x"
    )


def test_revoke_puts_every_certificate_of_the_unit_on_a_crl_openssl_checks(
    factory: Factory, tmp_path: Path
) -> None:
    store = _unit(tmp_path, "k1")
    chain = tmp_path / "k1.pem"
    chain.write_bytes(factory.issuer.issue(make_identity_csr(store), "k1").chain_pem)
    crl = tmp_path / "crl.pem"

    assert factory.cli("revoke", "--serial", "k1", "--reason", "key-compromise") == 0
    assert factory.cli("crl", "-o", str(crl)) == 0

    bundle = tmp_path / "cas.pem"
    bundle.write_bytes(factory.root.read_bytes() + factory.issuing.read_bytes())
    checked = _openssl(
        "verify", "-crl_check", "-CAfile", str(bundle), "-CRLfile", str(crl), str(chain)
    )
    assert checked.returncode != 0
    assert "certificate revoked" in checked.stdout + checked.stderr
    listed = _openssl("crl", "-in", str(crl), "-noout", "-text")
    assert "Key Compromise" in listed.stdout
    with pytest.raises(InputError, match="revoked"):
        factory.issuer.reissue("k1")


def test_list_shows_what_was_issued_as_json(
    factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory.issuer.issue(csr_pem(ec_key(), "l1"), "l1")
    factory.issuer.issue(csr_pem(pool_rsa_key(20, 21), "l2"), "l2")
    capsys.readouterr()

    assert run(["factory", "list", "--dir", str(factory.directory), "--json"]) == 0

    records = json.loads(capsys.readouterr().out)
    assert [
        (r["serial"], r["key_type"], r["status"], r["prime_check"]) for r in records
    ] == [
        ("l1", "ECDSA P-256", "active", "n/a"),
        ("l2", "RSA 2048", "active", "clean"),
    ]
    assert all(len(r["spki_sha256"]) == 64 and not r["label_printed"] for r in records)


# --- the unit side -----------------------------------------------------------


def test_install_refuses_a_chain_for_another_key_and_shows_both_codes(
    factory: Factory, tmp_path: Path
) -> None:
    store = _unit(tmp_path, "m1")
    other = factory.issuer.issue(csr_pem(ec_key(), "m2"), "m2")
    generation = store.generation()

    with pytest.raises(KeyMismatchError) as caught:
        install_factory_identity(store, other.chain_pem)

    assert str(other.code) in str(caught.value)
    assert str(device.load_unit(store).info.code) in str(caught.value)
    assert store.generation() == generation


def test_install_refuses_a_leaf_without_its_issuing_ca(
    factory: Factory, tmp_path: Path
) -> None:
    store = _unit(tmp_path, "m3")
    issued = factory.issuer.issue(make_identity_csr(store), "m3")
    leaf_only = certs.pem_chain([issued.cert])

    with pytest.raises(InputError, match="only one certificate"):
        install_factory_identity(store, leaf_only)
    # A root after the issuing CA is accepted and left out of the state.
    root = factory.root.read_bytes()
    unit = install_factory_identity(store, issued.chain_pem + root)
    assert unit.chain_path.read_bytes().count(b"BEGIN CERTIFICATE") == 2


def test_factory_identity_survives_a_factory_reset(
    factory: Factory, tmp_path: Path
) -> None:
    store = _unit(tmp_path, "n1")
    issued = factory.issuer.issue(make_identity_csr(store), "n1")
    install_factory_identity(store, issued.chain_pem, setup_credential="AAAA-BBBB")

    result = device.reset_unit(store)

    assert result.unit.source == "factory"
    assert result.unit.info.code == issued.code
    assert result.unit.admin is not None and result.unit.admin.setup == "AAAA-BBBB"


def test_an_expired_factory_certificate_gives_way_to_a_self_signed_one_same_key(
    factory: Factory, tmp_path: Path
) -> None:
    store = _unit(tmp_path, "p1")
    issued = factory.issuer.issue(make_identity_csr(store), "p1")
    install_factory_identity(store, issued.chain_pem)
    # Time passes: the state now holds a factory certificate that has expired.
    ca = factory.issuer.ca
    expired = factory_ca.build_unit_cert(
        ca,
        ca.issuing_key.signing_key(),
        public_key=issued.cert.public_key(),
        serial="p1",
        hostname=hostname("p1"),
        validity=dt.timedelta(days=30),
        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=40),
    )
    with store.lock():
        files = store.current(Part.IDENTITY).files()  # type: ignore[union-attr]
        files["cert.pem"] = certs.pem_chain([expired, ca.issuing_cert])
        store.commit(Part.IDENTITY, files)

    unit = device.start_unit(store, entropy_timeout=1).unit

    assert unit.meta.source == "factory"
    assert unit.info.self_signed and unit.info.code == issued.code
    assert unit.served_note is not None and "expired" in unit.served_note
    assert unit.chain_path.name == "fallback.pem"
    renewed = factory.issuer.reissue("p1")
    unit = install_factory_identity(store, renewed.chain_pem)
    assert unit.served_note is None and not unit.info.self_signed


# --- station flows -----------------------------------------------------------


def test_provision_writes_a_serial_bound_state_and_its_label(
    factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "unit"
    label = tmp_path / "q1.png"

    assert (
        factory.cli(
            "provision", "--state", str(state), "--serial", "q1", "--label", str(label)
        )
        == 0
    )

    store = StateStore(state)
    unit = device.load_unit(store)
    assert unit.source == "factory" and unit.meta.binding == device.Binding(
        "serial", "q1"
    )
    printed = store.current(Part.IDENTITY).read("setup-credential").decode().strip()  # type: ignore[union-attr]
    assert unit.admin is not None and unit.admin.setup == printed
    assert label.read_bytes().startswith(b"\x89PNG")
    assert str(unit.info.code) in capsys.readouterr().out
    assert factory.issuer.registry.find("q1").label_printed  # type: ignore[union-attr]

    os.environ["UNITCERT_MACHINE_ID"] = "the-unit-itself"
    try:
        started = device.start_unit(store, entropy_timeout=1)
    finally:
        del os.environ["UNITCERT_MACHINE_ID"]
    assert started.unit.meta.binding.kind == "machine-id"
    assert started.unit.info.code == unit.info.code


def test_provision_refuses_a_serial_already_issued_before_making_a_key(
    factory: Factory, tmp_path: Path
) -> None:
    factory.issuer.issue(csr_pem(ec_key(), "q2"), "q2")

    with pytest.raises(DuplicateError, match="already issued"):
        provision_unit(factory.issuer, tmp_path / "unit", "q2")

    assert not (tmp_path / "unit").exists()


def test_provision_batch_provisions_units_each_in_its_own_state(
    factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "batch"

    assert (
        factory.cli(
            "provision-batch", "--out", str(out), "--count", "6", "--serial-prefix", "w"
        )
        == 0
    )

    assert "Provisioned 6 units" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [f"w000{i}" for i in range(1, 7)]
    codes = {str(device.load_unit(StateStore(p)).info.code) for p in out.iterdir()}
    assert len(codes) == 6
    assert (
        factory.cli(
            "provision-batch",
            "--out",
            str(tmp_path / "again"),
            "--count",
            "2",
            "--serial-prefix",
            "w",
        )
        == 1
    )
    assert not (tmp_path / "again").exists()


def test_provision_batch_reports_each_phase_and_keeps_the_serials_order(
    factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provision, "_CHUNK", 3)
    phases: list[str] = []

    result = provision_batch(
        factory.issuer,
        tmp_path / "many",
        batch_serials("m", 4),
        on_progress=lambda phase, n: phases.extend([phase] * n),
    )

    assert [u.serial for u in result.provisioned] == [
        "m0001",
        "m0002",
        "m0003",
        "m0004",
    ]
    for unit in result.provisioned:
        loaded = device.load_unit(StateStore(unit.state_dir))
        assert loaded.source == "factory" and loaded.info.code == unit.code
        assert loaded.meta.binding == device.Binding("serial", unit.serial)
    assert phases.count("keys") == 4 and phases.count("install") == 4


def _station_unit(factory: Factory, tmp_path: Path, serial: str) -> StateStore:
    made = new_station_unit(
        serial, product="router", domain="example.com", key_type=keys.KeyType.P256
    )
    issued = factory.issuer.issue(made.csr_pem, serial)
    store = StateStore(tmp_path / serial)
    write_station_unit(store, made, issued.chain_pem, setup_credential="AAAA-BBBB")
    return store


def test_station_state_is_two_commits_of_private_files_with_the_factory_chain(
    factory: Factory, tmp_path: Path
) -> None:
    store = _station_unit(factory, tmp_path, "st1")

    unit = device.load_unit(store)
    assert unit.source == "factory" and unit.meta.source == "factory"
    assert unit.meta.binding == device.Binding("serial", "st1")
    chain = x509.load_pem_x509_certificates(unit.chain_path.read_bytes())
    assert len(chain) == 2 and chain[0].issuer == chain[1].subject
    chain[0].verify_directly_issued_by(chain[1])
    assert not unit.info.self_signed
    assert unit.admin is not None and unit.admin.setup == "AAAA-BBBB"
    identity = store.current(Part.IDENTITY)
    assert identity is not None
    assert sorted(identity.files()) == [
        "cert.pem",
        "key.pem",
        "meta.json",
        "setup-credential",
    ]
    assert len(store.generations(Part.IDENTITY)) == 1
    assert len(store.generations(Part.LOCAL)) == 1
    for path in store.root.rglob("*"):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), path
    assert store.root.stat().st_mode & 0o777 == 0o700


def test_station_state_keeps_its_factory_identity_through_a_reset(
    factory: Factory, tmp_path: Path
) -> None:
    store = _station_unit(factory, tmp_path, "st2")
    before = device.load_unit(store)

    reset = device.reset_unit(store, entropy_timeout=1)

    assert not reset.created
    assert reset.unit.source == "factory" and reset.unit.info.code == before.info.code
    assert reset.unit.admin is not None and reset.unit.admin.setup == "AAAA-BBBB"


def test_station_state_is_adopted_by_the_unit_on_its_first_start(
    factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _station_unit(factory, tmp_path, "st3")
    code = device.load_unit(store).info.code
    monkeypatch.setenv("UNITCERT_MACHINE_ID", "the-unit-itself")

    started = device.start_unit(store, entropy_timeout=1)

    assert not started.created
    assert started.unit.meta.binding.kind == "machine-id"
    assert started.unit.source == "factory" and started.unit.info.code == code
    assert "bound the state to this machine" in started.notes


def test_station_state_refuses_another_units_chain_and_an_existing_state(
    factory: Factory, tmp_path: Path
) -> None:
    store = _station_unit(factory, tmp_path, "st4")
    other = new_station_unit(
        "st5", product="router", domain="example.com", key_type=keys.KeyType.P256
    )
    wrong = factory.issuer.issue(csr_pem(ec_key(), "st5"), "st5").chain_pem

    with pytest.raises(KeyMismatchError):
        write_station_unit(StateStore(tmp_path / "st5"), other, wrong)
    assert not (tmp_path / "st5").exists()
    with pytest.raises(StateError, match="already holds a unit"):
        write_station_unit(store, other, None)
    assert device.load_unit(store).source == "factory"


def test_provision_batch_of_rsa_units_checks_their_moduli(
    factory: Factory, tmp_path: Path
) -> None:
    made = iter([pool_rsa_key(30, 31), pool_rsa_key(32, 33), pool_rsa_key(31, 34)])
    lock = threading.Lock()

    def generator(_: keys.KeyType) -> keys.PrivateKey:
        with lock:
            return next(made)

    result = provision_batch(
        factory.issuer,
        tmp_path / "rsa",
        batch_serials("y", 3),
        key_type=keys.KeyType.RSA2048,
        generator=generator,
    )

    assert len(result.provisioned) == 1 and len(result.refused) == 2
    good = device.load_unit(StateStore(result.provisioned[0].state_dir))
    assert good.cert.public_key() == pool_rsa_key(32, 33).public_key()
    for serial, _ in result.refused:
        assert device.load_unit(StateStore(tmp_path / "rsa" / serial)).source == "self"


# --- a unit serving its factory chain ----------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_tls(port: int, process: subprocess.Popen[str]) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + 20
    while True:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=2) as sock,
                context.wrap_socket(sock),
            ):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(process.communicate()[0]) from None
            time.sleep(0.05)


def test_a_unit_serving_its_factory_chain_passes_openssl_and_verify(
    factory: Factory, tmp_path: Path
) -> None:
    state = tmp_path / "unit"
    provision_unit(factory.issuer, state, "z1")
    name = hostname("z1")
    code = str(device.load_unit(StateStore(state)).info.code)
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
    try:
        _wait_for_tls(https_port, process)

        client = _openssl(
            "s_client",
            "-connect",
            f"127.0.0.1:{https_port}",
            "-servername",
            name,
            "-verify_return_error",
            "-CAfile",
            str(factory.root),
            "-verify_hostname",
            name,
        )
        assert client.returncode == 0, client.stdout + client.stderr
        assert "Verify return code: 0 (ok)" in client.stdout
        wrong = _openssl(
            "s_client",
            "-connect",
            f"127.0.0.1:{https_port}",
            "-servername",
            name,
            "-verify_return_error",
            "-CAfile",
            str(factory.root),
            "-verify_hostname",
            hostname("z2"),
        )
        assert wrong.returncode != 0

        verified = subprocess.run(
            [
                *UNITCERT,
                "verify",
                f"127.0.0.1:{https_port}",
                "--code",
                code,
                "--ca",
                str(factory.root),
                "--name",
                name,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert verified.returncode == 0, verified.stderr
        misnamed = subprocess.run(
            [
                *UNITCERT,
                "verify",
                f"127.0.0.1:{https_port}",
                "--code",
                code,
                "--ca",
                str(factory.root),
                "--name",
                hostname("z2"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert misnamed.returncode == 4
    finally:
        process.terminate()
        process.communicate(timeout=10)


def test_code_of_the_sticker_is_the_code_of_the_served_factory_leaf(
    factory: Factory, tmp_path: Path
) -> None:
    store = _unit(tmp_path, "z3")
    issued = factory.issuer.issue(make_identity_csr(store), "z3")
    der = issued.cert.public_bytes(serialization.Encoding.DER)
    assert code_for_spki(spki_from_cert_der(der)) == issued.code


def test_issue_to_an_unwritable_place_issues_nothing(
    factory: Factory, tmp_path: Path
) -> None:
    state = tmp_path / "unit"
    init = ["device", "init", "--state", str(state), "--serial", "s9"]
    assert run([*init, "--product", "router", "--domain", "example.com"]) == 0
    csr = tmp_path / "s9.csr"
    assert run(["device", "csr", "--state", str(state), "-o", str(csr)]) == 0
    nowhere = tmp_path / "missing" / "s9.chain.pem"

    refused = factory.cli(
        "issue", "--csr", str(csr), "--serial", "s9", "-o", str(nowhere)
    )
    label = tmp_path / "missing" / "s10.png"
    refused_label = factory.cli(
        "provision",
        "--state",
        str(tmp_path / "u10"),
        "--serial",
        "s10",
        "--label",
        str(label),
    )

    assert refused == 1 and refused_label == 1
    assert not (tmp_path / "u10").exists()
    chain = tmp_path / "s9.chain.pem"
    assert (
        factory.cli("issue", "--csr", str(csr), "--serial", "s9", "-o", str(chain)) == 0
    )
