"""The owner's own certificate from the command line: formats, checks, CSR, use, revert.

Files are made the ways customers get them: ``cryptography``'s serialisers,
``openssl x509 -text`` and ``openssl pkcs12 -export -legacy``. The CLI runs
in-process through :func:`unitcert.cli.run`.
"""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from test_custom_support import (
    PASSWORD,
    UNIT_NAME,
    Issued,
    Pki,
    ec_key,
    issue,
    key_der,
    key_pem,
    make_pki,
    make_unit,
    now,
    openssl_legacy_p12,
    p7b,
    p12,
    pems,
    rsa_key,
    tree_digest,
)
from unitcert import certs, device
from unitcert.cli import run
from unitcert.custom.install import PENDING_CSR_FILE, PENDING_KEY_FILE
from unitcert.store import Part, StateStore


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return make_unit(tmp_path / "state")


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _import(store: StateStore, *args: str) -> int:
    return run(["device", "import", "--state", str(store.root), *args])


def _chain(store: StateStore) -> list[x509.Certificate]:
    local = store.current(Part.LOCAL)
    assert local is not None
    return x509.load_pem_x509_certificates(local.read("custom-chain.pem"))


def _assert_serves(store: StateStore, leaf: Issued, *chain: Issued) -> None:
    unit = device.load_unit(store)
    assert unit.source == "custom"
    assert str(unit.info.code) == leaf.code
    assert unit.served_note is None
    assert _chain(store) == [leaf.cert, *(c.cert for c in chain)]
    key_file = unit.key_path
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


# --- formats -------------------------------------------------------------------


def test_import_accepts_a_pem_bundle_in_any_order_with_crlf_text_and_the_key(
    store: StateStore, pki: Pki, tmp_path: Path
) -> None:
    leaf = pki.leaf(ec_key())
    text = (
        b"Bag Attributes\r\n    friendlyName: unit\r\n"
        + pems(pki.root, leaf).replace(b"\n", b"\r\n")
        + b"subject=CN=Corp Issuing CA\r\n"
        + key_pem(leaf.key).replace(b"\n", b"\r\n")
        + pki.inter.pem.replace(b"\n", b"\r\n")
        + b"\r\nthe end\r\n"
    )
    assert _import(store, _write(tmp_path, "bundle.pem", text)) == 0
    _assert_serves(store, leaf, pki.inter)


def test_import_accepts_openssl_text_output_and_a_separate_key(
    store: StateStore, pki: Pki, tmp_path: Path
) -> None:
    leaf = pki.leaf(rsa_key(1))
    texts = []
    for item in (leaf, pki.inter):
        texts.append(
            subprocess.run(
                ["openssl", "x509", "-text"],
                input=item.pem,
                capture_output=True,
                check=True,
            ).stdout
        )
    bundle = _write(tmp_path, "chain.txt", b"".join(texts))
    key = _write(tmp_path, "leaf.key", key_pem(leaf.key, traditional=True))
    assert _import(store, bundle, "--key", key) == 0
    _assert_serves(store, leaf, pki.inter)


def test_import_accepts_der_certificate_p7b_chain_and_der_key(
    store: StateStore, pki: Pki, tmp_path: Path
) -> None:
    leaf = pki.leaf(ec_key(ec.SECP384R1()))
    files = [
        _write(tmp_path, "chain.p7b", p7b(pki.root, pki.inter)),
        _write(tmp_path, "leaf.cer", leaf.der),
    ]
    key = _write(tmp_path, "leaf.der", key_der(leaf.key))
    assert _import(store, *files, "--key", key) == 0
    _assert_serves(store, leaf, pki.inter)


def test_import_accepts_a_pem_pkcs7_chain(
    store: StateStore, pki: Pki, tmp_path: Path
) -> None:
    leaf = pki.leaf(ec_key())
    files = [
        _write(tmp_path, "chain.p7c", p7b(leaf, pki.inter, pki.root, pem=True)),
        _write(tmp_path, "key.pem", key_pem(leaf.key)),
    ]
    assert _import(store, *files) == 0
    _assert_serves(store, leaf, pki.inter)


@pytest.mark.parametrize("kind", ["aes", "3des", "openssl-legacy", "no-password"])
def test_import_accepts_pkcs12_files(
    store: StateStore, pki: Pki, tmp_path: Path, kind: str
) -> None:
    leaf = pki.leaf(rsa_key(2))
    if kind == "openssl-legacy":
        data = openssl_legacy_p12(tmp_path, leaf, [pki.inter, pki.root], PASSWORD)
    elif kind == "no-password":
        data = p12(leaf, [pki.inter], password=None)
    else:
        data = p12(leaf, [pki.root, pki.inter], triple_des=kind == "3des")
    args = [_write(tmp_path, "unit.pfx", data)]
    if kind != "no-password":
        args += ["--password-file", _write(tmp_path, "pw", PASSWORD + b"\r\n")]
    assert _import(store, *args) == 0
    _assert_serves(store, leaf, pki.inter)


@pytest.mark.parametrize("form", ["pkcs8-pem", "traditional-pem", "pkcs8-der"])
def test_import_accepts_encrypted_keys_with_their_password(
    store: StateStore, pki: Pki, tmp_path: Path, form: str
) -> None:
    leaf = pki.leaf(ec_key())
    if form == "pkcs8-der":
        key = key_der(leaf.key, PASSWORD)
    else:
        key = key_pem(leaf.key, PASSWORD, traditional=form == "traditional-pem")
    args = [_write(tmp_path, "chain.pem", pems(leaf, pki.inter))]
    args += ["--key", _write(tmp_path, "leaf.key", key)]
    args += ["--password-file", _write(tmp_path, "pw", PASSWORD + b"\n")]
    assert _import(store, *args) == 0
    _assert_serves(store, leaf, pki.inter)


@pytest.fixture(scope="module")
def big_rsa_keys() -> dict[int, rsa.RSAPrivateKey]:
    return {
        bits: rsa.generate_private_key(public_exponent=65537, key_size=bits)
        for bits in (3072, 4096)
    }


@pytest.mark.parametrize("kind", ["rsa2048", "rsa3072", "rsa4096", "p256", "p384"])
def test_import_accepts_rsa_2048_to_4096_and_ecdsa_p256_p384(
    store: StateStore,
    pki: Pki,
    tmp_path: Path,
    kind: str,
    big_rsa_keys: dict[int, rsa.RSAPrivateKey],
) -> None:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if kind == "rsa2048":
        key = rsa_key(3)
    elif kind.startswith("rsa"):
        key = big_rsa_keys[int(kind[3:])]
    else:
        key = ec_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())
    leaf = pki.leaf(key)
    bundle = _write(tmp_path, "b.pem", pems(leaf, pki.inter) + key_pem(key))
    assert _import(store, bundle) == 0
    _assert_serves(store, leaf, pki.inter)


# --- chains --------------------------------------------------------------------


def test_private_ca_without_leaf_akid_and_root_without_key_usage_is_accepted(
    store: StateStore, tmp_path: Path
) -> None:
    root = issue("Home Root", ec_key(), ca=True, key_usage=False, bc_critical=False)
    inter = issue("Home Issuing", ec_key(), root, ca=True, ski=False)
    leaf = issue("unit", ec_key(), inter, names=[UNIT_NAME], akid=False, ski=False)
    bundle = _write(tmp_path, "b.pem", pems(leaf, inter) + key_pem(leaf.key))
    assert _import(store, bundle, "--ca-file", _write(tmp_path, "r.pem", root.pem)) == 0
    _assert_serves(store, leaf, inter)


def test_chain_ending_at_an_intermediate_is_served_to_it(
    store: StateStore, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bought certificate: leaf and intermediate, the root is in browsers.
    leaf = pki.leaf(ec_key())
    bundle = _write(tmp_path, "b.pem", pems(pki.inter, leaf) + key_pem(leaf.key))
    assert _import(store, bundle) == 0
    _assert_serves(store, leaf, pki.inter)
    assert "Corp Root CA (root CA, not in the files" in capsys.readouterr().out


def test_a_leaf_signed_by_the_root_itself_is_served_alone(
    store: StateStore, pki: Pki, tmp_path: Path
) -> None:
    leaf = issue(UNIT_NAME, ec_key(), pki.root, names=[UNIT_NAME])
    bundle = _write(tmp_path, "b.pem", pems(leaf) + key_pem(leaf.key))
    root = _write(tmp_path, "root.pem", pki.root.pem)
    assert _import(store, bundle, "--ca-file", root) == 0
    _assert_serves(store, leaf)


def test_a_self_signed_server_certificate_installs_with_a_warning(
    store: StateStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = issue(UNIT_NAME, ec_key(), names=[UNIT_NAME])
    assert (
        _import(store, _write(tmp_path, "b.pem", pems(leaf) + key_pem(leaf.key))) == 0
    )
    _assert_serves(store, leaf)
    assert "self-signed" in capsys.readouterr().err


# --- the unit's names, warnings ------------------------------------------------


def test_certificate_for_other_names_needs_force(
    store: StateStore, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = pki.leaf(ec_key(), names=["nas.corp.example"])
    bundle = _write(tmp_path, "b.pem", pems(leaf, pki.inter) + key_pem(leaf.key))
    before = tree_digest(store.root)
    assert _import(store, bundle) == 1
    err = capsys.readouterr().err
    assert "none of which is this unit's name" in err
    assert "--force" in err
    assert tree_digest(store.root) == before
    assert _import(store, bundle, "--force") == 0
    _assert_serves(store, leaf, pki.inter)


def test_wildcard_certificate_covers_the_unit_name(
    store: StateStore, pki: Pki, tmp_path: Path
) -> None:
    leaf = pki.leaf(ec_key(), names=[f"*.{UNIT_NAME.split('.', 1)[1]}"])
    bundle = _write(tmp_path, "b.pem", pems(leaf, pki.inter) + key_pem(leaf.key))
    assert _import(store, bundle) == 0


def test_certificate_valid_over_825_days_installs_with_an_apple_warning(
    store: StateStore, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = pki.leaf(ec_key(), days=900)
    bundle = _write(tmp_path, "b.pem", pems(leaf, pki.inter) + key_pem(leaf.key))
    assert _import(store, bundle) == 0
    assert "Apple devices" in capsys.readouterr().err
    _assert_serves(store, leaf, pki.inter)


def test_certificate_valid_within_a_day_installs_and_the_identity_serves_until_then(
    store: StateStore, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = pki.leaf(ec_key(), not_before=now() + dt.timedelta(hours=3))
    bundle = _write(tmp_path, "b.pem", pems(leaf, pki.inter) + key_pem(leaf.key))
    assert _import(store, bundle) == 0
    assert "becomes valid only at" in capsys.readouterr().err
    unit = device.load_unit(store)
    assert unit.chosen == "custom"
    assert unit.source == "self"
    assert unit.served_note is not None and "not valid before" in unit.served_note


def test_dry_run_shows_the_certificate_and_changes_nothing(
    store: StateStore, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leaf = pki.leaf(ec_key())
    bundle = _write(tmp_path, "b.pem", pems(leaf, pki.inter) + key_pem(leaf.key))
    before = tree_digest(store.root)
    assert _import(store, bundle, "--dry-run") == 0
    out = capsys.readouterr().out
    for fact in (UNIT_NAME, "Corp Issuing CA", "ECDSA P-256", leaf.code, "Dry run"):
        assert fact in out
    assert tree_digest(store.root) == before


# --- a CSR from the unit ---------------------------------------------------------


def _sign_csr(csr_pem: bytes, pki: Pki, *, days: int = 90) -> x509.Certificate:
    """Sign a unit's CSR as the customer's issuing CA would."""
    csr = x509.load_pem_x509_csr(csr_pem)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(pki.inter.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(minutes=5))
        .not_valid_after(now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(pki.inter.key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _code(cert: x509.Certificate) -> str:
    return str(certs.cert_info(cert).code)


def test_csr_then_the_certificate_alone_installs_with_the_pending_key(
    store: StateStore, pki: Pki, tmp_path: Path
) -> None:
    csr_path = tmp_path / "unit.csr"
    args = ["device", "csr", "--state", str(store.root), "--custom"]
    args += ["--name", "nas.corp.example", "--name", "10.0.0.8", "-o", str(csr_path)]
    assert run(args) == 0
    local = store.current(Part.LOCAL)
    assert local is not None and local.has(PENDING_KEY_FILE)
    assert stat.S_IMODE((local.path / PENDING_KEY_FILE).stat().st_mode) == 0o600
    signed = _sign_csr(csr_path.read_bytes(), pki)
    cert = _write(tmp_path, "signed.pem", _pem(signed))
    root = _write(tmp_path, "root.pem", pki.root.pem)
    chain = _write(tmp_path, "ca.pem", pki.inter.pem)

    # The CSR's names are the unit's names: no --force needed.
    assert _import(store, cert, chain, "--ca-file", root) == 0
    assert str(device.load_unit(store).info.code) == _code(signed)
    assert _chain(store) == [signed, pki.inter.cert]
    local = store.current(Part.LOCAL)
    assert local is not None
    assert not local.has(PENDING_KEY_FILE) and not local.has(PENDING_CSR_FILE)

    # A renewal for the same key is matched to the installed key.
    renewed = _sign_csr(csr_path.read_bytes(), pki, days=120)
    files = _write(tmp_path, "renewed.pem", _pem(renewed) + pki.inter.pem)
    assert _import(store, files) == 0
    assert _chain(store) == [renewed, pki.inter.cert]


def test_csr_needs_names_and_refuses_bad_ones(
    store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["device", "csr", "--state", str(store.root)]
    before = tree_digest(store.root)
    assert run([*base, "--custom"]) == 1
    assert "--name" in capsys.readouterr().err
    assert run([*base, "--custom", "--name", "bad_name!.example"]) == 1
    assert "not a valid DNS label" in capsys.readouterr().err
    assert run([*base, "--name", "a.example"]) == 1
    assert "--custom" in capsys.readouterr().err
    assert tree_digest(store.root) == before


def test_certificate_alone_for_another_key_shows_both_codes(
    store: StateStore, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["device", "csr", "--state", str(store.root), "--custom"]
    assert run([*args, "--name", UNIT_NAME, "-o", str(tmp_path / "c.csr")]) == 0
    other = pki.leaf(ec_key())
    before = tree_digest(store.root)
    assert _import(store, _write(tmp_path, "o.pem", pems(other, pki.inter))) == 1
    err = capsys.readouterr().err
    assert "pending CSR" in err and other.code in err
    assert tree_digest(store.root) == before


# --- use and revert ----------------------------------------------------------------


def test_use_and_revert_switch_sources_and_keep_the_admin_password(
    store: StateStore, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = ["--state", str(store.root)]
    own = str(device.load_unit(store).info.code)
    first = pki.leaf(ec_key())
    second = pki.leaf(ec_key())
    for name, leaf in (("1.pem", first), ("2.pem", second)):
        bundle = _write(tmp_path, name, pems(leaf, pki.inter) + key_pem(leaf.key))
        assert _import(store, bundle) == 0
    assert str(device.load_unit(store).info.code) == second.code

    assert run(["device", "revert", *state]) == 0
    assert str(device.load_unit(store).info.code) == first.code
    assert run(["device", "revert", *state]) == 0
    assert str(device.load_unit(store).info.code) == second.code

    assert run(["device", "use", *state, "self"]) == 0
    assert str(device.load_unit(store).info.code) == own
    admin = device.load_unit(store).admin
    assert admin is not None
    device.save_admin_credential(store, admin.with_password("a brand new password"))
    # The last change was the password: the certificate stays, nothing to revert.
    assert run(["device", "revert", *state]) == 1
    assert "nothing to revert" in capsys.readouterr().err
    assert run(["device", "use", *state, "custom"]) == 0
    assert str(device.load_unit(store).info.code) == second.code
    assert run(["device", "revert", *state]) == 0
    unit = device.load_unit(store)
    assert str(unit.info.code) == own
    assert unit.admin is not None and unit.admin.check("a brand new password")


def test_use_refuses_sources_the_unit_does_not_have(
    store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    state = ["--state", str(store.root)]
    before = tree_digest(store.root)
    assert run(["device", "use", *state, "factory"]) == 1
    assert "use 'self'" in capsys.readouterr().err
    assert run(["device", "use", *state, "custom"]) == 1
    assert "no custom certificate" in capsys.readouterr().err
    assert run(["device", "use", *state, "nonsense"]) == 2
    assert tree_digest(store.root) == before


def test_status_shows_the_custom_certificate_and_the_sticker_code(
    store: StateStore, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = str(device.load_unit(store).info.code)
    leaf = pki.leaf(ec_key())
    bundle = _write(tmp_path, "b.pem", pems(leaf, pki.inter) + key_pem(leaf.key))
    assert _import(store, bundle) == 0
    capsys.readouterr()
    assert run(["device", "status", "--state", str(store.root), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["source"] == "custom"
    assert record["code"] == leaf.code
    assert record["identity_code"] == own
