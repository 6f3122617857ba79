"""Keys: made only behind the entropy gate, and self-checked before use."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import gmpy2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from unitcert import device, keys, quality
from unitcert.cli import run
from unitcert.errors import EntropyError, WeakKeyError
from unitcert.store import StateStore


def _rsa_key_from_primes(p: int, q: int) -> rsa.RSAPrivateKey:
    e = 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=rsa.rsa_crt_dmp1(d, p),
        dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q),
        public_numbers=rsa.RSAPublicNumbers(e, p * q),
    )
    return numbers.private_key()


def _fermat_weak_key() -> rsa.RSAPrivateKey:
    """An RSA-2048 key with neighbouring primes: Fermat factors it at once."""
    top_bits = 3 << 1022  # both top bits set: the product has exactly 2048 bits
    p = int(gmpy2.next_prime(top_bits | secrets.randbits(1022)))
    q = int(gmpy2.next_prime(p + 2))
    return _rsa_key_from_primes(q, p)


def _never_ready(size: int, flags: int) -> bytes:
    raise BlockingIOError(11, "Resource temporarily unavailable")


def test_fermat_weak_key_is_flagged_by_the_self_check() -> None:
    findings = quality.check_key(_fermat_weak_key().public_key())

    assert [f.check for f in findings] == ["fermat"]


def test_weak_generated_key_is_discarded_and_a_fresh_one_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weak = _fermat_weak_key()
    made: list[keys.PrivateKey] = []

    def generator(key_type: keys.KeyType) -> keys.PrivateKey:
        key = weak if not made else keys.generate_key(key_type)
        made.append(key)
        return key

    caplog.set_level(logging.WARNING)
    store = StateStore(tmp_path / "state")
    result = device.init_unit(store, key_type=keys.KeyType.RSA2048, generator=generator)

    served = keys.FileKeyStore(result.unit.key_path).public_key()
    assert len(made) == 2
    assert served.public_numbers() != weak.public_key().public_numbers()  # type: ignore[union-attr]
    assert quality.check_key(served) == ()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("discarded a newly made rsa2048 key" in r.getMessage() for r in warnings)
    assert any("Fermat" in r.getMessage() for r in warnings)


def test_generator_that_only_makes_weak_keys_fails_and_writes_no_key(
    tmp_path: Path,
) -> None:
    weak = _fermat_weak_key()
    store = StateStore(tmp_path / "state")

    with pytest.raises(WeakKeyError) as caught:
        device.init_unit(store, key_type=keys.KeyType.RSA2048, generator=lambda t: weak)

    assert caught.value.findings == ("fermat",)
    assert not list(store.root.rglob("key.pem"))


def test_published_example_key_is_flagged(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    from unitcert.spki import load_spki

    rfc = Path(__file__).parent / "data" / "rfc-example-keys" / "ecdsap256-rfc6979.key"
    public = load_der_public_key(load_spki(rfc))
    assert isinstance(public, ec.EllipticCurvePublicKey)

    findings = quality.check_key(public)

    assert [f.check for f in findings] == ["published"]
    assert "ecdsap256-rfc6979" in findings[0].detail


def test_init_waits_for_the_random_pool_then_fails_clearly_with_no_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keys, "getrandom", _never_ready)
    store = StateStore(tmp_path / "state")
    sleeps: list[float] = []
    clock = iter(range(1000))
    monkeypatch.setattr(keys.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(keys.time, "sleep", sleeps.append)

    with pytest.raises(EntropyError, match="random pool was not ready after 5 seconds"):
        device.init_unit(store, entropy_timeout=5)

    assert sleeps, "the gate did not wait before giving up"
    assert not list(store.root.rglob("key.pem"))
    assert not store.exists()


def test_init_command_reports_entropy_timeout_as_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(keys, "getrandom", _never_ready)
    state = tmp_path / "state"

    code = run(["device", "init", "--state", str(state), "--entropy-timeout", "0.3"])

    err = capsys.readouterr().err
    assert code == 1
    assert "unitcert: error: the kernel's random pool was not ready" in err
    assert "Traceback" not in err
    assert not list(state.rglob("key.pem"))


def test_gate_lets_keys_through_once_the_pool_is_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    def ready_on_third_call(size: int, flags: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise BlockingIOError(11, "not yet")
        return b"\x00" * size

    monkeypatch.setattr(keys, "getrandom", ready_on_third_call)
    monkeypatch.setattr(keys.time, "sleep", lambda seconds: None)

    result = device.init_unit(StateStore(tmp_path / "state"), entropy_timeout=5)

    assert calls == 3
    assert result.created


@pytest.mark.parametrize(
    ("key_type", "description"),
    [
        (keys.KeyType.P256, "ECDSA P-256"),
        (keys.KeyType.P384, "ECDSA P-384"),
        (keys.KeyType.RSA2048, "RSA 2048"),
    ],
)
def test_each_key_type_makes_a_matching_identity(
    tmp_path: Path, key_type: keys.KeyType, description: str
) -> None:
    result = device.init_unit(StateStore(tmp_path / "state"), key_type=key_type)

    assert result.unit.info.key_type == description
    assert result.unit.meta.key_type == key_type.value
