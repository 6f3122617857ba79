"""The fingerprint code: DESIGN.md's vectors, checked against OpenSSL's own hashing."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from unitcert import certs
from unitcert.code import (
    ALPHABET,
    code_for_spki,
    parse_code,
    qr_payload,
    spki_from_cert_der,
    spki_from_csr_der,
    spki_pin,
)
from unitcert.errors import CodeFormatError, InputError
from unitcert.spki import load_spki, load_spki_source

RFC_KEYS = Path(__file__).parent / "data" / "rfc-example-keys"

# Published in DESIGN.md, "The fingerprint code and the sticker".
VECTORS = {
    "ecdsap256-rfc6979.key": "B9X7-HK54-M3T2-1PDW-CAXP-X",
    "rsa2048-rfc9500.key": "HYVB-NNKH-SZK9-GE9W-8MSN-B",
}


def _openssl_spki_sha256(pem_path: Path) -> bytes:
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", str(pem_path), "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    hexdigest = subprocess.run(
        ["sha256sum"], input=der, check=True, capture_output=True
    ).stdout.split()[0]
    return bytes.fromhex(hexdigest.decode())


def _code_bits(code: str) -> int:
    """Decode the 20 body symbols of a printed code back to its 100 bits."""
    body = code.replace("-", "")[:20]
    value = 0
    for symbol in body:
        value = value * 32 + ALPHABET.index(symbol)
    return value


@pytest.mark.parametrize(("name", "expected"), sorted(VECTORS.items()))
def test_code_matches_published_vector(name: str, expected: str) -> None:
    spki = load_spki(RFC_KEYS / name)

    assert str(code_for_spki(spki)) == expected


@pytest.mark.parametrize("name", sorted(p.name for p in RFC_KEYS.glob("*.key")))
def test_code_body_is_top_100_bits_of_openssl_spki_hash(name: str) -> None:
    digest = _openssl_spki_sha256(RFC_KEYS / name)
    code = str(code_for_spki(load_spki(RFC_KEYS / name)))

    assert _code_bits(code) == int.from_bytes(digest, "big") >> 156
    assert parse_code(code).symbols == code.replace("-", "")


def test_code_of_certificate_and_csr_hash_their_own_spki_bytes(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs.build_self_signed(key, ["a.unit.example"])
    csr = certs.build_csr(key, ["a.unit.example"])
    cert_pem = tmp_path / "cert.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pub = subprocess.run(
        ["openssl", "x509", "-in", str(cert_pem), "-pubkey", "-noout"],
        check=True,
        capture_output=True,
    ).stdout
    (tmp_path / "pub.pem").write_bytes(pub)

    from_cert = spki_from_cert_der(cert.public_bytes(serialization.Encoding.DER))
    from_csr = spki_from_csr_der(csr.public_bytes(serialization.Encoding.DER))

    assert hashlib.sha256(from_cert).digest() == _openssl_spki_sha256(
        tmp_path / "pub.pem"
    )
    assert code_for_spki(from_cert) == code_for_spki(from_csr)


def test_parse_code_forgives_case_spaces_and_confusable_letters() -> None:
    # B9X7-HK54-M3T2-1PDW-CAXP-X with 1 typed as l and lower case.
    assert str(parse_code("b9x7 hk54 m3t2 lpdw caxp x")) == "B9X7-HK54-M3T2-1PDW-CAXP-X"
    assert str(parse_code("B9X7HK54M3T2IPDWCAXPX")) == "B9X7-HK54-M3T2-1PDW-CAXP-X"


def test_parse_code_reads_letter_o_as_zero() -> None:
    codes = [str(code_for_spki(load_spki(p))) for p in sorted(RFC_KEYS.glob("*.key"))]
    code = next(c for c in codes if "0" in c)

    assert str(parse_code(code.replace("0", "o"))) == code
    assert str(parse_code(code.replace("0", "O"))) == code


def test_every_single_symbol_substitution_is_caught_as_mistyped() -> None:
    code = "B9X7HK54M3T21PDWCAXPX"
    for position in range(21):
        for symbol in ALPHABET:
            if symbol == code[position]:
                continue
            typo = code[:position] + symbol + code[position + 1 :]
            with pytest.raises(CodeFormatError) as caught:
                parse_code(typo)
            assert caught.value.mistyped


def test_parse_code_rejects_wrong_length_and_foreign_symbols_as_malformed() -> None:
    for text in [
        "",
        "B9X7-HK54",
        "B9X7-HK54-M3T2-1PDW-CAXP-XX",
        "B9X7-HK54-M3T2-1PDW-CAXP-U",
    ]:
        with pytest.raises(CodeFormatError) as caught:
            parse_code(text)
        assert not caught.value.mistyped


def test_qr_payload_carries_full_spki_hash_unpadded() -> None:
    spki = load_spki(RFC_KEYS / "ecdsap256-rfc6979.key")

    payload = qr_payload(
        hostname="ab12.router.example.com", serial="ab12", spki_der=spki
    )

    assert payload.startswith("UNITCERT:V:1;N:ab12.router.example.com;S:ab12;K:")
    assert payload.endswith(";;")
    key_field = payload.split(";K:")[1][:-2]
    import base64

    assert base64.urlsafe_b64decode(key_field + "=") == hashlib.sha256(spki).digest()
    assert spki_pin(spki) == base64.b64encode(hashlib.sha256(spki).digest()).decode()


def test_load_spki_refuses_private_keys_and_garbage(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private = tmp_path / "key.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x30\x82\xff\xff not a certificate")
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")

    for path, words in [
        (private, "private key"),
        (garbage, "neither a certificate"),
        (empty, "empty"),
    ]:
        with pytest.raises(InputError, match=words):
            load_spki(path)


def test_load_spki_accepts_der_certificate(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs.build_self_signed(key, ["a.example"])
    der_path = tmp_path / "cert.der"
    der_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))

    assert code_for_spki(load_spki(der_path)) == certs.cert_info(cert).code
    assert isinstance(
        x509.load_der_x509_certificate(der_path.read_bytes()), x509.Certificate
    )


def _private_der(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> list[bytes]:
    """The key in DER as PKCS#8, traditional (SEC 1 or PKCS#1) and encrypted PKCS#8."""
    der = serialization.Encoding.DER
    plain = [
        key.private_bytes(der, private_format, serialization.NoEncryption())
        for private_format in (
            serialization.PrivateFormat.PKCS8,
            serialization.PrivateFormat.TraditionalOpenSSL,
        )
    ]
    encrypted = key.private_bytes(
        der,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a passphrase"),
    )
    return [*plain, encrypted]


def test_load_spki_refuses_der_private_keys(tmp_path: Path) -> None:
    keys_der = _private_der(ec.generate_private_key(ec.SECP256R1()))
    keys_der += _private_der(rsa.generate_private_key(65537, 2048))

    for index, der in enumerate(keys_der):
        path = tmp_path / f"key{index}.der"
        path.write_bytes(der)
        with pytest.raises(InputError, match="holds a private key"):
            load_spki(path)


def test_load_spki_refuses_a_private_key_anywhere_in_a_pem_file(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs.build_self_signed(key, ["a.example"])
    combined = tmp_path / "server.pem"
    combined.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )

    with pytest.raises(InputError, match="holds a private key"):
        load_spki(combined)


@pytest.mark.parametrize(
    ("kind", "junk"), [("certificate", b"junk"), ("certificate", b"\n"), ("csr", b"x")]
)
def test_load_spki_refuses_extra_data_after_a_der_object(
    tmp_path: Path, kind: str, junk: bytes
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    if kind == "certificate":
        der = certs.build_self_signed(key, ["a.example"]).public_bytes(
            serialization.Encoding.DER
        )
        words = "extra data after the certificate"
    else:
        der = certs.build_csr(key, ["a.example"]).public_bytes(
            serialization.Encoding.DER
        )
        words = "extra data after the certificate request"
    path = tmp_path / "object.der"
    path.write_bytes(der + junk)

    with pytest.raises(InputError, match=words):
        load_spki(path)


def test_load_spki_refuses_invalid_base64_inside_pem_armor(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = certs.build_self_signed(key, ["a.example"]).public_bytes(
        serialization.Encoding.PEM
    )
    lines = pem.splitlines(keepends=True)
    lines[3] = lines[3][:10] + b"*!" + lines[3][12:]
    path = tmp_path / "broken.pem"
    path.write_bytes(b"".join(lines))

    with pytest.raises(InputError, match="not valid base64"):
        load_spki(path)


def test_load_spki_source_counts_certificates_and_returns_the_first(
    tmp_path: Path,
) -> None:
    first, second = (
        certs.build_self_signed(ec.generate_private_key(ec.SECP256R1()), [name])
        for name in ["leaf.example", "issuer.example"]
    )
    chain = tmp_path / "chain.pem"
    chain.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (first, second))
    )

    source = load_spki_source(chain)

    assert source.certificates == 2
    assert source.kind == "certificate"
    assert code_for_spki(source.spki_der) == certs.cert_info(first).code
