"""Helpers shared by the custom-certificate tests: a customer's CA, files, a unit.

Not a test module of its own (it holds no tests); the custom tests import it.
RSA keys come from the factory tests' prime pool (no key generation).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support import Browser, Reply
from test_factory_support import pool_rsa_key
from unitcert import code, device
from unitcert.store import StateStore

SERIAL = "cust0001"
PRODUCT = "router"
DOMAIN = "home.arpa"
UNIT_NAME = f"{SERIAL}.{PRODUCT}.{DOMAIN}"
PASSWORD = b"customer pfx password"

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def rsa_key(index: int) -> rsa.RSAPrivateKey:
    """An RSA-2048 key from the pool; distinct ``index`` gives distinct keys."""
    return pool_rsa_key(2 * index, 2 * index + 1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool, rsa_key: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key and not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class Issued:
    """A certificate and its key."""

    cert: x509.Certificate
    key: Key

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def code(self) -> str:
        return str(code.code_for_spki(code.spki_from_cert_der(self.der)))


def issue(
    subject: str,
    key: Key,
    issuer: Issued | None = None,
    *,
    ca: bool = False,
    path_length: int | None = None,
    names: Sequence[str] = (),
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.SERVER_AUTH,),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    days: int = 90,
    key_usage: bool = True,
    akid: bool = True,
    ski: bool = True,
    bc: bool = True,
    bc_critical: bool = True,
    issuer_name: str | None = None,
    hash_algorithm: hashes.HashAlgorithm | None = None,
) -> Issued:
    """Sign a certificate; ``issuer`` None makes it self-signed."""
    signer_key = issuer.key if issuer else key
    start = not_before or now() - dt.timedelta(hours=1)
    end = not_after or start + dt.timedelta(days=days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(
            _name(issuer_name)
            if issuer_name
            else (issuer.cert.subject if issuer else _name(subject))
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    if bc:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None),
            critical=bc_critical,
        )
    if key_usage:
        builder = builder.add_extension(
            _key_usage(ca=ca, rsa_key=isinstance(key, rsa.RSAPrivateKey)),
            critical=True,
        )
    if ski:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    if akid:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
            critical=False,
        )
    if eku is not None and not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(eku)), critical=False
        )
    return Issued(builder.sign(signer_key, hash_algorithm or hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    """A customer's CA: a root and an issuing CA under it."""

    root: Issued
    inter: Issued

    def leaf(self, key: Key, names: Sequence[str] = (UNIT_NAME,), **kw: Any) -> Issued:
        return issue(names[0] if names else "leaf", key, self.inter, names=names, **kw)


def make_pki(label: str = "Corp", *, rsa_index: int | None = None) -> Pki:
    root_key: Key = (
        rsa_key(rsa_index) if rsa_index is not None else ec_key(ec.SECP384R1())
    )
    root = issue(f"{label} Root CA", root_key, ca=True)
    inter_key: Key = rsa_key(rsa_index + 1) if rsa_index is not None else ec_key()
    inter = issue(f"{label} Issuing CA", inter_key, root, ca=True, path_length=0)
    return Pki(root, inter)


# --- file formats -----------------------------------------------------------


def key_pem(
    key: Key, password: bytes | None = None, *, traditional: bool = False
) -> bytes:
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if traditional
        else serialization.PrivateFormat.PKCS8
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)


def key_der(key: Key, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, encryption
    )


def pems(*items: Issued) -> bytes:
    return b"".join(item.pem for item in items)


def p7b(*items: Issued, pem: bool = False) -> bytes:
    return pkcs7.serialize_certificates(
        [i.cert for i in items],
        serialization.Encoding.PEM if pem else serialization.Encoding.DER,
    )


def p12(
    leaf: Issued,
    cas: Sequence[Issued] = (),
    password: bytes | None = PASSWORD,
    *,
    triple_des: bool = False,
) -> bytes:
    encryption: serialization.KeySerializationEncryption
    if password is None:
        encryption = serialization.NoEncryption()
    elif triple_des:
        encryption = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(2048)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .build(password)
        )
    else:
        encryption = serialization.BestAvailableEncryption(password)
    return pkcs12.serialize_key_and_certificates(
        b"unit", leaf.key, leaf.cert, [c.cert for c in cas] or None, encryption
    )


def openssl_legacy_p12(
    tmp: Path, leaf: Issued, cas: Sequence[Issued], password: bytes
) -> bytes:
    """A PKCS#12 made by ``openssl pkcs12 -export -legacy`` (RC2-40 and 3DES)."""
    (tmp / "leg.key").write_bytes(key_pem(leaf.key))
    (tmp / "leg.crt").write_bytes(pems(leaf, *cas))
    (tmp / "leg.pass").write_bytes(password + b"\n")
    subprocess.run(
        [
            "openssl",
            "pkcs12",
            "-export",
            "-legacy",
            "-inkey",
            str(tmp / "leg.key"),
            "-in",
            str(tmp / "leg.crt"),
            "-passout",
            f"file:{tmp / 'leg.pass'}",
            "-out",
            str(tmp / "leg.p12"),
        ],
        check=True,
        capture_output=True,
    )
    return (tmp / "leg.p12").read_bytes()


def openssl_signed(
    tmp: Path,
    key: Key,
    issuer: Issued,
    digest: str,
    names: Sequence[str] = (UNIT_NAME,),
    *,
    ca_subject: str | None = None,
) -> Issued:
    """A certificate signed by ``issuer`` with ``digest`` (sha1, md5) by openssl.

    A leaf for ``names``, or with ``ca_subject`` an intermediate CA.
    """
    (tmp / "sig.key").write_bytes(key_pem(key))
    (tmp / "ca.key").write_bytes(key_pem(issuer.key))
    (tmp / "ca.crt").write_bytes(issuer.pem)
    if ca_subject:
        subject = ca_subject
        extensions = (
            "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n"
        )
    else:
        subject = names[0]
        extensions = (
            "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            f"subjectAltName={','.join('DNS:' + n for n in names)}\n"
        )
    (tmp / "ext.cnf").write_text(extensions)
    request = f"req -new -key {tmp}/sig.key -subj /CN={subject} -out {tmp}/sig.csr"
    subprocess.run(["openssl", *request.split()], check=True, capture_output=True)
    sign = (
        f"x509 -req -in {tmp}/sig.csr -CA {tmp}/ca.crt -CAkey {tmp}/ca.key "
        f"-set_serial 7 -days 30 -{digest} -extfile {tmp}/ext.cnf -out {tmp}/sig.crt"
    )
    subprocess.run(["openssl", *sign.split()], check=True, capture_output=True)
    cert = x509.load_pem_x509_certificate((tmp / "sig.crt").read_bytes())
    return Issued(cert, key)


# --- the unit ------------------------------------------------------------------


def make_unit(root: Path) -> StateStore:
    store = StateStore(root)
    device.init_unit(store, serial=SERIAL, product=PRODUCT, domain=DOMAIN)
    return store


def tree_digest(root: Path) -> str:
    """A hash of a state tree: every path, mode, symlink target and file's bytes."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            info = path.lstat()
            digest.update(f"{path.relative_to(root)}\0{info.st_mode:o}\0".encode())
            if path.is_symlink():
                digest.update(os.readlink(path).encode())
            elif path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


# --- a served unit and a small HTTPS client -------------------------------------

NEW_PASSWORD = "correct horse battery staple"


def set_password(store: StateStore) -> None:
    """Replace the setup credential with :data:`NEW_PASSWORD`."""
    admin = device.load_unit(store).admin
    assert admin is not None
    device.save_admin_credential(store, admin.with_password(NEW_PASSWORD))


class UnitClient(Browser):
    """A browser for the owner, whose login must succeed."""

    def login(self, password: str = NEW_PASSWORD) -> Reply:
        token = self.get("/login").csrf_token()
        reply = self.post("/login", {"csrf_token": token, "password": password})
        assert reply.status == 303, reply.body
        return reply
