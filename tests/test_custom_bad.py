"""Over a hundred bad certificate inputs, through the command line and the upload page.

One unit serves a custom certificate. Every bad input goes through
``unitcert device import`` (in-process) and through the admin page's upload;
after each, a real TLS client (Python ``ssl``) must still receive the same
certificate, and the state tree must be unchanged byte for byte. Each
refusal must say, in its one sentence, what was wrong.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gmpy2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support import ServedUnit as Served
from support import serving
from test_custom_support import (
    PASSWORD,
    UNIT_NAME,
    Issued,
    Pki,
    UnitClient,
    ec_key,
    issue,
    key_der,
    key_pem,
    make_pki,
    make_unit,
    now,
    openssl_legacy_p12,
    openssl_signed,
    p7b,
    p12,
    pems,
    rsa_key,
    set_password,
    tree_digest,
)
from test_factory_support import rsa_key_from_primes
from unitcert.cli import run
from unitcert.store import StateStore

RFC_KEYS = Path(__file__).parent / "data" / "rfc-example-keys"


@dataclass(frozen=True)
class Bad:
    """One bad input: the files, and a fragment of the sentence expected."""

    label: str
    files: tuple[tuple[str, bytes], ...]
    expect: str
    key: tuple[str, bytes] | None = None
    root: tuple[str, bytes] | None = None
    password: bytes | None = None
    needs_force: bool = False


def _bundle(*items: Issued, key: bool = True) -> bytes:
    return pems(*items) + (key_pem(items[0].key) if key else b"")


def _parse_cases(pki: Pki) -> Iterator[Bad]:
    leaf = pki.leaf(ec_key())
    good = _bundle(leaf, pki.inter)
    pem = leaf.pem
    body = pem.split(b"\n", 1)[1]
    yield Bad("empty", (("empty.pem", b""),), "is empty")
    yield Bad("blank", (("blank.pem", b"\r\n \n\t\n"),), "is empty")
    yield Bad("random", (("r.bin", b"\x00" + os.urandom(1023)),), "no certificate")
    yield Bad(
        "random der header",
        (("r.der", b"\x30\x82\x04\x00" + os.urandom(60)),),
        "truncated",
    )
    yield Bad(
        "random der sequence",
        (("r.der", b"\x30\x10" + os.urandom(16)),),
        "neither a certificate",
    )
    yield Bad("truncated pem", (("t.pem", good[: len(good) // 3]),), "truncated")
    yield Bad(
        "begin line only",
        (("b.pem", b"-----BEGIN CERTIFICATE-----\n"),),
        "truncated",
    )
    yield Bad(
        "broken base64",
        (("b64.pem", pem.replace(body[10:30], b"!!!!@@@@####$$$$%%%%")),),
        "damaged",
    )
    yield Bad(
        "mismatched end line",
        (("m.pem", pem.replace(b"END CERTIFICATE", b"END PRIVATE KEY")),),
        "no END line",
    )
    yield Bad(
        "random der in a certificate block",
        (
            (
                "rand.pem",
                b"-----BEGIN CERTIFICATE-----\nMIIBAAECAwQFBgcICQoLDA0ODxAREhMU\n"
                b"-----END CERTIFICATE-----\n",
            ),
        ),
        "damaged",
    )
    yield Bad("truncated der", (("t.der", leaf.der[:-12]),), "truncated")
    yield Bad(
        "truncated p7b",
        (("t.p7b", p7b(leaf, pki.inter)[:-30]), ("k.pem", key_pem(leaf.key))),
        "truncated",
    )
    yield Bad(
        "truncated p12",
        (("t.pfx", p12(leaf, [pki.inter])[:-40]),),
        "truncated",
        password=PASSWORD,
    )
    whole = bytearray(p12(leaf, [pki.inter]))
    middle = len(whole) // 2
    whole[middle : middle + 16] = bytes(16)
    yield Bad("damaged p12", (("d.pfx", bytes(whole)),), "damaged", password=PASSWORD)
    yield Bad(
        "html page",
        (("page.pem", b"<!doctype html><html><body>Login</body></html>"),),
        "no certificate",
    )
    yield Bad("json", (("cert.json", b'{"certificate": "none"}'),), "no certificate")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, UNIT_NAME)]))
        .sign(leaf.key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    yield Bad("a csr", (("unit.csr", csr),), "certificate request")
    public = leaf.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    yield Bad("public key only", (("pub.pem", public),), "labelled PUBLIC KEY")
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.inter.cert.subject)
        .last_update(now())
        .next_update(now() + dt.timedelta(days=1))
        .sign(pki.inter.key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    yield Bad("a crl", (("ca.crl", crl),), "labelled X509 CRL")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("cert.pem", good)
    yield Bad("zip archive", (("cert.zip", archive.getvalue()),), "archive")
    yield Bad("gzip", (("cert.pem.gz", gzip.compress(good)),), "no certificate")
    yield Bad(
        "over 1 MiB of text",
        (("big.pem", good + b"# padding\n" * 110_000),),
        "over 1 MiB",
    )
    yield Bad("over 1 MiB of zeros", (("zero.der", bytes(1024 * 1024 + 1)),), "1 MiB")
    yield Bad(
        "key without certificate",
        (("k.pem", key_pem(leaf.key)),),
        "private key but no certificate",
    )
    yield Bad(
        "der key without certificate",
        (("k.der", key_der(leaf.key)),),
        "private key but no certificate",
    )
    yield Bad(
        "garbage pkcs7 block",
        (("g.p7b", b"-----BEGIN PKCS7-----\nMAMCAQA=\n-----END PKCS7-----\n"),),
        "PKCS#7",
    )
    yield Bad(
        "ec parameters only",
        (
            (
                "p.pem",
                b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n"
                b"-----END EC PARAMETERS-----\n",
            ),
        ),
        "no certificate",
    )
    yield Bad(
        "utf-16 text",
        (("u.pem", "not a certificate at all".encode("utf-16")),),
        "no certificate",
    )
    yield Bad(
        "root file with a key",
        (("b.pem", good),),
        "root certificate file holds a private key",
        root=("root.pem", pki.root.pem + key_pem(pki.root.key)),
    )
    yield Bad("empty root file", (("b.pem", good),), "is empty", root=("r.pem", b""))


def _password_cases(pki: Pki, tmp: Path) -> Iterator[Bad]:
    leaf = pki.leaf(rsa_key(4))
    chain = (("chain.pem", pems(leaf, pki.inter)),)
    wrong = b"not the password"
    yield Bad("p12 wrong password", (("u.pfx", p12(leaf)),), "is wrong", password=wrong)
    yield Bad("p12 no password", (("u.pfx", p12(leaf)),), "password-protected")
    legacy = openssl_legacy_p12(tmp, leaf, [pki.inter], PASSWORD)
    yield Bad("legacy p12 wrong", (("l.p12", legacy),), "is wrong", password=wrong)
    yield Bad("legacy p12 no password", (("l.p12", legacy),), "password-protected")
    des = p12(leaf, [pki.inter], triple_des=True)
    yield Bad("3des p12 wrong", (("d.p12", des),), "is wrong", password=wrong)
    encrypted = key_pem(leaf.key, PASSWORD)
    yield Bad("pkcs8 no password", chain, "is encrypted", key=("k.pem", encrypted))
    yield Bad(
        "pkcs8 wrong", chain, "is wrong", key=("k.pem", encrypted), password=wrong
    )
    traditional = key_pem(leaf.key, PASSWORD, traditional=True)
    yield Bad(
        "traditional no password", chain, "is encrypted", key=("k.pem", traditional)
    )
    yield Bad(
        "traditional wrong",
        chain,
        "is wrong",
        key=("k.pem", traditional),
        password=wrong,
    )
    der = key_der(leaf.key, PASSWORD)
    yield Bad("der key no password", chain, "is encrypted", key=("k.der", der))
    yield Bad("der key wrong", chain, "is wrong", key=("k.der", der), password=wrong)


def _mismatch_cases(pki: Pki, other: Pki) -> Iterator[Bad]:
    leaf = pki.leaf(ec_key())
    rsa_leaf = pki.leaf(rsa_key(5))
    chain = (("chain.pem", pems(leaf, pki.inter)),)
    stray = ec_key()
    yield Bad(
        "other ec key",
        chain,
        f"certificate key {leaf.code}",
        key=("k.pem", key_pem(stray)),
    )
    yield Bad(
        "other rsa key",
        (("chain.pem", pems(rsa_leaf, pki.inter)),),
        "does not match the private key",
        key=("k.pem", key_pem(rsa_key(6))),
    )
    yield Bad(
        "ec key for rsa cert",
        (("chain.pem", pems(rsa_leaf, pki.inter)),),
        f"certificate key {rsa_leaf.code}",
        key=("k.pem", key_pem(stray)),
    )
    yield Bad(
        "wrong key in the same file",
        (("all.pem", pems(leaf, pki.inter, pki.root) + key_pem(stray)),),
        "does not match the private key",
    )
    second = other.leaf(ec_key())
    yield Bad(
        "key of another certificate given with it",
        (("a.pem", leaf.pem), ("b.pem", _bundle(second, other.inter, other.root))),
        "second server certificate",
    )
    yield Bad(
        "two keys",
        (("chain.pem", _bundle(leaf, pki.inter) + key_pem(stray)),),
        "2 different private keys",
    )
    yield Bad(
        "certificate alone for no known key",
        chain,
        "does not match the installed key",
    )
    yield Bad(
        "intermediate key with the chain",
        (("chain.pem", pems(leaf, pki.inter) + key_pem(pki.inter.key)),),
        "is a CA certificate",
    )


def _usage_and_validity_cases(pki: Pki) -> Iterator[Bad]:
    ca_leaf = issue(UNIT_NAME, ec_key(), pki.inter, ca=True, names=[UNIT_NAME])
    yield Bad("leaf is a ca", (("ca.pem", _bundle(ca_leaf, pki.inter)),), "CA cert")
    self_ca = issue(UNIT_NAME, ec_key(), ca=True, names=[UNIT_NAME])
    yield Bad("self-signed ca", (("s.pem", _bundle(self_ca)),), "is a CA certificate")
    for label, usages in (
        ("client auth only", [ExtendedKeyUsageOID.CLIENT_AUTH]),
        (
            "code signing and email",
            [ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.EMAIL_PROTECTION],
        ),
    ):
        leaf = pki.leaf(ec_key(), eku=usages)
        yield Bad(label, (("e.pem", _bundle(leaf, pki.inter)),), "not for web servers")
    no_san = issue(UNIT_NAME, ec_key(), pki.inter)
    yield Bad("no san", (("n.pem", _bundle(no_san, pki.inter)),), "subjectAltName")
    expired = pki.leaf(
        ec_key(),
        not_before=now() - dt.timedelta(days=100),
        not_after=now() - dt.timedelta(days=1),
    )
    yield Bad("expired", (("x.pem", _bundle(expired, pki.inter)),), "expired on")
    future = pki.leaf(ec_key(), not_before=now() + dt.timedelta(days=3))
    yield Bad("not yet valid", (("f.pem", _bundle(future, pki.inter)),), "a day from")
    old_inter = issue(
        "Corp Issuing CA",
        pki.inter.key,
        pki.root,
        ca=True,
        not_before=now() - dt.timedelta(days=400),
        not_after=now() - dt.timedelta(days=2),
    )
    leaf = pki.leaf(ec_key())
    yield Bad(
        "expired intermediate",
        (("c.pem", _bundle(leaf, old_inter, pki.root)),),
        "expired on",
    )
    early_inter = issue(
        "Corp Issuing CA",
        pki.inter.key,
        pki.root,
        ca=True,
        not_before=now() + dt.timedelta(days=5),
    )
    yield Bad(
        "intermediate not yet valid",
        (("c.pem", _bundle(leaf, early_inter, pki.root)),),
        "not valid before",
    )
    old_root = issue(
        "Corp Root CA",
        pki.root.key,
        ca=True,
        not_before=now() - dt.timedelta(days=4000),
        not_after=now() - dt.timedelta(days=3),
    )
    yield Bad(
        "expired root",
        (("c.pem", _bundle(leaf, pki.inter, old_root)),),
        "expired on",
    )


def _chain_cases(pki: Pki, other: Pki) -> Iterator[Bad]:
    leaf = pki.leaf(ec_key())
    yield Bad(
        "missing intermediate",
        (("c.pem", _bundle(leaf, pki.root)),),
        "Corp Issuing CA, which issued",
    )
    yield Bad(
        "leaf alone",
        (("c.pem", _bundle(leaf)),),
        "its issuer, Corp Issuing CA, is missing",
    )
    yield Bad(
        "unrelated intermediate",
        (("c.pem", _bundle(leaf, pki.inter, other.inter, pki.root)),),
        "Other Issuing CA is not part of the chain",
    )
    yield Bad(
        "wrong root given",
        (("c.pem", _bundle(leaf, pki.inter)),),
        "does not lead to the given root (Other Root CA)",
        root=("root.pem", other.root.pem),
    )
    twin_root = issue("Corp Root CA", ec_key(), ca=True)
    yield Bad(
        "root with the same name and another key",
        (("c.pem", _bundle(leaf, pki.inter)),),
        "did not sign it",
        root=("root.pem", twin_root.pem),
    )
    twin_inter = issue("Corp Issuing CA", ec_key(), pki.root, ca=True)
    yield Bad(
        "impostor intermediate",
        (("c.pem", _bundle(leaf, twin_inter, pki.root)),),
        "did not sign it",
    )
    server_as_ca = issue("mid.corp.example", ec_key(), pki.inter, names=["mid.x"])
    below = issue(UNIT_NAME, ec_key(), server_as_ca, names=[UNIT_NAME])
    yield Bad(
        "issued by a server certificate",
        (("c.pem", _bundle(below, server_as_ca, pki.inter, pki.root)),),
        "mid.corp.example is not a CA certificate",
    )
    sub = issue("Corp Sub CA", ec_key(), pki.inter, ca=True)
    deep = issue(UNIT_NAME, ec_key(), sub, names=[UNIT_NAME])
    yield Bad(
        "path length exceeded",
        (("c.pem", _bundle(deep, sub, pki.inter, pki.root)),),
        "did not verify",
    )
    weak_ca_key = _small_rsa_key(1024)
    weak_ca = issue("Weak Issuing CA", weak_ca_key, pki.root, ca=True)
    weak_leaf = issue(UNIT_NAME, ec_key(), weak_ca, names=[UNIT_NAME])
    yield Bad(
        "intermediate with rsa 1024",
        (("c.pem", _bundle(weak_leaf, weak_ca, pki.root)),),
        "RSA key of 1024 bits",
    )
    constrained_key = ec_key()
    constrained = Issued(
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Narrow CA")]))
        .issuer_name(pki.root.cert.subject)
        .public_key(constrained_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(hours=1))
        .not_valid_after(now() + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.NameConstraints([x509.DNSName("other.example")], None), critical=True
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(constrained_key.public_key()),
            critical=False,
        )
        .sign(pki.root.key, hashes.SHA256()),
        constrained_key,
    )
    outside = issue(UNIT_NAME, ec_key(), constrained, names=[UNIT_NAME])
    yield Bad(
        "name constraints violated",
        (("c.pem", _bundle(outside, constrained, pki.root)),),
        "did not verify",
    )
    no_sign_key = ec_key()
    no_sign = Issued(
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Odd CA")]))
        .issuer_name(pki.root.cert.subject)
        .public_key(no_sign_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(hours=1))
        .not_valid_after(now() + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(no_sign_key.public_key()),
            critical=False,
        )
        .sign(pki.root.key, hashes.SHA256()),
        no_sign_key,
    )
    under = issue(UNIT_NAME, ec_key(), no_sign, names=[UNIT_NAME])
    yield Bad(
        "ca without keyCertSign",
        (("c.pem", _bundle(under, no_sign, pki.root)),),
        "does not allow it to sign certificates",
    )


def _signature_cases(tmp: Path) -> Iterator[Bad]:
    rsa_pki = make_pki("Legacy", rsa_index=7)
    for digest, name in (("sha1", "SHA-1"), ("md5", "MD5")):
        key = rsa_key(9 if digest == "sha1" else 10)
        leaf = openssl_signed(tmp, key, rsa_pki.inter, digest)
        yield Bad(
            f"{digest} rsa leaf",
            (("c.pem", _bundle(leaf, rsa_pki.inter, rsa_pki.root)),),
            f"signed with {name}",
        )
    ec_pki = make_pki("Curvy")
    ec_leaf = openssl_signed(tmp, ec_key(), ec_pki.inter, "sha1")
    yield Bad(
        "ecdsa-with-sha1 leaf",
        (("c.pem", _bundle(ec_leaf, ec_pki.inter, ec_pki.root)),),
        "signed with SHA-1",
    )
    old_inter = openssl_signed(
        tmp, rsa_key(11), rsa_pki.root, "sha1", ca_subject="Legacy-SHA1-CA"
    )
    leaf = issue(UNIT_NAME, ec_key(), old_inter, names=[UNIT_NAME])
    yield Bad(
        "sha1 intermediate",
        (("c.pem", _bundle(leaf, old_inter, rsa_pki.root)),),
        "Legacy-SHA1-CA is signed with SHA-1",
    )


def _fermat_key() -> rsa.RSAPrivateKey:
    p = int(gmpy2.next_prime(gmpy2.mpz(3) << 1022 | 12345))
    q = int(gmpy2.next_prime(p + 2**200))
    return rsa_key_from_primes(p, q)


def _small_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    p = int(gmpy2.next_prime(gmpy2.mpz(3) << (bits // 2 - 2)))
    q = int(gmpy2.next_prime(p + 2 ** (bits // 2 - 8)))
    return rsa_key_from_primes(p, q)


def _key_cases(pki: Pki) -> Iterator[Bad]:
    for label, key, expect in (
        ("rsa 1024", _small_rsa_key(1024), "1024 bits"),
        ("rsa 512", _small_rsa_key(512), "512 bits"),
        ("fermat primes", _fermat_key(), "Fermat"),
        ("p-521", ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
    ):
        leaf = pki.leaf(key)
        yield Bad(label, (("c.pem", _bundle(leaf, pki.inter)),), expect)
    for label, other_key, expect in (
        ("ed25519", ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
        ("ed448", ed448.Ed448PrivateKey.generate(), "Ed448"),
        ("dsa", dsa.generate_private_key(2048), "DSA"),
    ):
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)]))
            .issuer_name(pki.inter.cert.subject)
            .public_key(other_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now() - dt.timedelta(hours=1))
            .not_valid_after(now() + dt.timedelta(days=30))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(UNIT_NAME)]), critical=False
            )
            .sign(pki.inter.key, hashes.SHA256())
        )
        data = cert.public_bytes(serialization.Encoding.PEM) + pki.inter.pem
        key_data = other_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        yield Bad(label, (("c.pem", data + key_data),), expect)


def _expect_for_rfc_key(name: str) -> str:
    kind = name.split("-")[0]
    if kind in ("rsa512", "rsa768", "rsa1024"):
        return "bits, under"
    if kind.startswith("dsa"):
        return "is DSA"
    if kind.startswith("ed"):
        return "which browsers do not accept"
    if kind in ("ecdsap192", "ecdsap224", "ecdsap521"):
        return "on the curve"
    return "published as an example"


def _rfc_key_cases(pki: Pki) -> Iterator[Bad]:
    """Certificates for keys printed in RFCs, whose private halves are public."""
    stray = key_pem(ec_key())
    for path in sorted(RFC_KEYS.glob("*.key")):
        public = serialization.load_pem_public_key(path.read_bytes())
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, UNIT_NAME)])
            )
            .issuer_name(pki.inter.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now() - dt.timedelta(hours=1))
            .not_valid_after(now() + dt.timedelta(days=30))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(UNIT_NAME)]), critical=False
            )
            .sign(pki.inter.key, hashes.SHA256())
        )
        data = cert.public_bytes(serialization.Encoding.PEM) + pki.inter.pem + stray
        yield Bad(
            f"rfc key {path.stem}",
            ((f"{path.stem}.pem", data),),
            _expect_for_rfc_key(path.stem),
        )


def _name_cases(pki: Pki) -> Iterator[Bad]:
    leaf = pki.leaf(ec_key(), names=["printer.corp.example"])
    yield Bad(
        "names none of the unit's names",
        (("c.pem", _bundle(leaf, pki.inter)),),
        "none of which is this unit's name",
        needs_force=True,
    )


def _catalogue(tmp: Path) -> list[Bad]:
    pki = make_pki()
    other = make_pki("Other")
    cases = [
        *_parse_cases(pki),
        *_password_cases(pki, tmp),
        *_mismatch_cases(pki, other),
        *_usage_and_validity_cases(pki),
        *_chain_cases(pki, other),
        *_signature_cases(tmp),
        *_key_cases(pki),
        *_rfc_key_cases(pki),
        *_name_cases(pki),
    ]
    return cases


@dataclass
class Fixture:
    served: Served
    client: UnitClient
    code: str
    cases: list[Bad]


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    tmp = tmp_path_factory.mktemp("bad")
    store = make_unit(tmp / "state")
    set_password(store)
    pki = make_pki("Good")
    good = pki.leaf(ec_key())
    (tmp / "good.pem").write_bytes(_bundle(good, pki.inter, pki.root))
    assert (
        run(["device", "import", "--state", str(store.root), str(tmp / "good.pem")])
        == 0
    )
    cases = _catalogue(tmp)
    with serving(store, tmp) as served:
        client = UnitClient(served.https_port)
        client.login()
        assert served.code() == good.code
        yield Fixture(served, client, good.code, cases)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_catalogue_has_over_a_hundred_distinct_bad_inputs(unit: Fixture) -> None:
    labels = [case.label for case in unit.cases]
    assert len(labels) >= 100, len(labels)
    assert len(set(labels)) == len(labels)
    contents = {
        _digest(repr((case.files, case.key, case.root, case.password)).encode())
        for case in unit.cases
    }
    assert len(contents) == len(unit.cases)


def _cli_args(case: Bad, directory: Path, state: Path) -> list[str]:
    directory.mkdir()
    args = ["device", "import", "--state", str(state)]
    for name, data in case.files:
        (directory / name).write_bytes(data)
        args.append(str(directory / name))
    if case.key is not None:
        (directory / f"key-{case.key[0]}").write_bytes(case.key[1])
        args += ["--key", str(directory / f"key-{case.key[0]}")]
    if case.root is not None:
        (directory / f"root-{case.root[0]}").write_bytes(case.root[1])
        args += ["--ca-file", str(directory / f"root-{case.root[0]}")]
    if case.password is not None:
        (directory / "password").write_bytes(case.password + b"\n")
        args += ["--password-file", str(directory / "password")]
    return args


def test_bad_inputs_on_the_command_line_change_nothing(
    unit: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store: StateStore = unit.served.store
    before = tree_digest(store.root)
    failures = []
    for index, case in enumerate(unit.cases):
        code = run(_cli_args(case, tmp_path / f"case{index}", store.root))
        err = capsys.readouterr().err
        lines = [
            line for line in err.splitlines() if line.startswith("unitcert: error")
        ]
        if code == 0 or case.expect not in err or len(lines) != 1:
            failures.append(f"{case.label}: exit {code}: {err.strip()}")
        if tree_digest(store.root) != before:
            failures.append(f"{case.label}: the state changed")
            break
        served = unit.served.code()
        if served != unit.code:
            failures.append(f"{case.label}: now serves {served}")
            break
    assert not failures, "\n".join(failures)


def test_bad_inputs_on_the_upload_page_change_nothing(unit: Fixture) -> None:
    store: StateStore = unit.served.store
    before = tree_digest(store.root)
    csrf = unit.client.get("/certificate").csrf_token()
    failures = []
    for case in unit.cases:
        files = [("bundle", name, data) for name, data in case.files]
        if case.key is not None:
            files.append(("key", case.key[0], case.key[1]))
        if case.root is not None:
            files.append(("root", case.root[0], case.root[1]))
        fields = {"csrf_token": csrf}
        if case.password is not None:
            fields["password"] = case.password.decode()
        reply = unit.client.upload("/certificate/preview", fields, files)
        if case.needs_force:
            # Shown with a warning; the install is refused without the checkbox.
            shown = reply.status == 200 and case.expect in " ".join(reply.text.split())
            install = {"csrf_token": csrf, "preview": reply.field("preview")}
            reply = unit.client.post("/certificate/install", install)
            if not shown:
                failures.append(f"{case.label}: the preview did not warn")
        text = " ".join(reply.text.split())
        if (
            reply.status != 400
            or case.expect not in text
            or "was not installed" not in text
        ):
            failures.append(f"{case.label}: HTTP {reply.status}: {text[:400]}")
        if tree_digest(store.root) != before:
            failures.append(f"{case.label}: the state changed")
            break
        served = unit.served.code()
        if served != unit.code:
            failures.append(f"{case.label}: now serves {served}")
            break
    assert not failures, "\n".join(failures)


def test_a_wrong_password_is_named_even_when_decryption_passes_its_padding_check(
    tmp_path: Path,
) -> None:
    from unitcert.custom.bundle import load_bundle, read_input_file
    from unitcert.errors import InputError

    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"the right one"),
    )
    # About one wrong password in 256 decrypts to garbage with valid padding:
    # cryptography then says the data is malformed, not that it is wrong.
    for attempt in range(5000):
        wrong = f"wrong {attempt}".encode()
        try:
            serialization.load_pem_private_key(encrypted, wrong)
        except ValueError as exc:
            if "password" not in str(exc).lower():
                break
    else:
        pytest.skip("no wrong password that passes the padding check was found")
    (tmp_path / "k.pem").write_bytes(encrypted)

    with pytest.raises(InputError, match=r"password .* is wrong"):
        load_bundle([read_input_file(tmp_path / "k.pem")], password=wrong)
