"""The agent: first boot, machine binding, factory reset, self-signed renewal."""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from unitcert import device
from unitcert.cli import run
from unitcert.errors import StateError
from unitcert.store import Part, StateStore

MACHINE_A = "0123456789abcdef0123456789abcdef"
MACHINE_B = "fedcba9876543210fedcba9876543210"


@pytest.fixture()
def on_machine(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("UNITCERT_MACHINE_ID", MACHINE_A)
    return monkeypatch


def _make_factory(store: StateStore) -> None:
    """Mark the identity as factory-provisioned (what install-identity records)."""
    identity = store.current(Part.IDENTITY)
    assert identity is not None
    meta = device.IdentityMeta.from_json(identity.read("meta.json"))
    files = identity.files()
    files["meta.json"] = device.IdentityMeta(
        source="factory",
        serial=meta.serial,
        product=meta.product,
        domain=meta.domain,
        key_type=meta.key_type,
        binding=meta.binding,
        created=meta.created,
    ).to_json()
    with store.lock():
        store.commit(Part.IDENTITY, files)


def test_init_on_existing_state_changes_nothing(
    tmp_path: Path, on_machine: object
) -> None:
    store = StateStore(tmp_path / "state")
    first = device.init_unit(
        store, serial="sn1", product="router", domain="example.com"
    )
    generation = store.generation()

    second = device.init_unit(store, serial="other")

    assert first.created and not second.created
    assert second.unit.info.code == first.unit.info.code
    assert second.unit.meta.serial == "sn1"
    assert store.generation() == generation
    assert "kept it" in second.notes[0]


def test_self_signed_certificate_meets_browser_rules(tmp_path: Path) -> None:
    unit = device.init_unit(
        StateStore(tmp_path / "s"), serial="sn1", product="router", domain="example.com"
    ).unit
    cert = unit.cert

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert san.get_values_for_type(x509.DNSName) == ["sn1.router.example.com"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name in {"sha256", "sha384"}
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(
        days=825
    )
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_each_first_boot_makes_a_different_setup_credential(tmp_path: Path) -> None:
    credentials = set()
    for index in range(5):
        unit = device.init_unit(StateStore(tmp_path / f"s{index}")).unit
        assert unit.admin is not None and unit.admin.must_change
        assert re.fullmatch(r"[0-9A-Z]{4}(-[0-9A-Z]{4}){3}", unit.admin.setup or "")
        credentials.add(unit.admin.setup)

    assert len(credentials) == 5


def test_cloned_state_gets_a_new_identity_and_a_warning(
    tmp_path: Path, on_machine: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path / "state")
    original = device.init_unit(store, serial="sn1").unit

    on_machine.setenv("UNITCERT_MACHINE_ID", MACHINE_B)
    caplog.set_level(logging.WARNING)
    result = device.start_unit(store)

    assert result.unit.info.code != original.info.code
    assert result.unit.meta.serial == "sn1"
    assert result.unit.binding_ok
    assert result.unit.admin is not None
    assert result.unit.admin.setup != original.admin.setup  # type: ignore[union-attr]
    assert any("another machine" in r.getMessage() for r in caplog.records)


def test_cloned_factory_identity_is_kept_and_flagged(
    tmp_path: Path, on_machine: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path / "state")
    original = device.init_unit(store, serial="sn1").unit
    _make_factory(store)

    on_machine.setenv("UNITCERT_MACHINE_ID", MACHINE_B)
    caplog.set_level(logging.WARNING)
    result = device.start_unit(store)

    assert result.unit.info.code == original.info.code
    assert not result.unit.binding_ok
    assert any("factory identity" in r.getMessage() for r in caplog.records)


def test_state_made_on_a_station_is_adopted_on_first_start(
    tmp_path: Path, on_machine: pytest.MonkeyPatch
) -> None:
    on_machine.delenv("UNITCERT_MACHINE_ID")
    on_machine.setattr(device, "_MACHINE_ID_FILES", ())
    store = StateStore(tmp_path / "state")
    made = device.init_unit(store, serial="sn1").unit
    assert made.meta.binding == device.Binding("serial", "sn1")

    on_machine.setenv("UNITCERT_MACHINE_ID", MACHINE_A)
    started = device.start_unit(store)

    assert started.unit.info.code == made.info.code
    assert started.unit.meta.binding.kind == "machine-id"
    assert "bound the state to this machine" in started.notes


def test_reset_of_self_signed_unit_makes_new_key_and_setup_credential(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path / "state")
    before = device.init_unit(store, serial="sn1").unit
    from unitcert.credential import AdminCredential

    device.save_admin_credential(
        store, AdminCredential(setup="X").with_password("owner password 1")
    )

    after = device.reset_unit(store).unit

    assert after.info.code != before.info.code
    assert after.meta.serial == "sn1"
    assert after.admin is not None and after.admin.must_change


def test_reset_keeps_factory_identity_unless_told_to_regenerate(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    before = device.init_unit(store, serial="sn1").unit
    _make_factory(store)

    kept = device.reset_unit(store).unit
    regenerated = device.reset_unit(store, regenerate_identity=True).unit

    assert kept.info.code == before.info.code
    assert regenerated.info.code != before.info.code


def test_self_signed_certificate_is_resigned_with_the_same_key_before_expiry(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path / "state")
    unit = device.init_unit(store).unit
    early = unit.info.not_before + dt.timedelta(days=100)
    late = unit.info.not_after - dt.timedelta(days=100)

    assert not device.renew_self_signed_if_due(store, now=early)
    assert device.renew_self_signed_if_due(store, now=late)

    renewed = device.load_unit(store)
    assert renewed.info.code == unit.info.code
    assert renewed.info.not_after > unit.info.not_after
    assert renewed.cert.serial_number != unit.cert.serial_number


def test_commands_log_no_key_material_or_credential_at_debug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    logs = []
    for argv in (
        ["-v", "device", "init", "--state", str(state)],
        ["-v", "device", "status", "--state", str(state), "--json"],
        ["-v", "device", "reset", "--state", str(state), "--yes"],
        ["-v", "device", "status", "--state", str(state)],
    ):
        assert run(argv) == 0
        logs.append(capsys.readouterr().err)
    text = "\n".join(logs)
    store = StateStore(state)
    key_pem = (store.current(Part.IDENTITY).path / "key.pem").read_text()  # type: ignore[union-attr]
    key_lines = [line for line in key_pem.splitlines() if "-----" not in line]
    setup = device.load_unit(store).admin.setup  # type: ignore[union-attr]

    assert "DEBUG" in text, "debug logging was not on"
    assert "PRIVATE KEY" not in text
    assert not any(line in text for line in key_lines)
    assert setup not in text


def test_invalid_names_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    for option, value in [
        ("--serial", "bad_serial"),
        ("--product", "-router"),
        ("--domain", "exa mple.com"),
    ]:
        state = tmp_path / option.strip("-")
        assert run(["device", "init", "--state", str(state), option, value]) == 1
        assert not state.exists()


def _custom_material(
    hostname: str, *, days: int, start: dt.datetime | None = None
) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives.asymmetric import ec

    from unitcert import certs, keys

    key = ec.generate_private_key(ec.SECP256R1())
    cert = certs.build_self_signed(
        key, [hostname], now=start, validity=dt.timedelta(days=days)
    )
    return keys.key_pem(key), certs.pem_chain([cert])


def test_chosen_local_certificate_is_served_and_identity_code_kept(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path / "state")
    own = device.init_unit(store, serial="sn1").unit
    key_pem, chain_pem = _custom_material("nas.corp.example", days=90)

    unit = device.install_local_source(
        store, "custom", key_pem=key_pem, chain_pem=chain_pem
    )

    assert unit.source == "custom" and unit.chosen == "custom"
    assert unit.info.names == ("nas.corp.example",)
    assert unit.identity_info is not None
    assert unit.identity_info.code == own.info.code != unit.info.code
    assert unit.served_note is None
    back = device.select_source(store, None)
    assert back.source == "self" and back.info.code == own.info.code


def test_expired_local_certificate_falls_back_to_identity_with_a_note(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path / "state")
    own = device.init_unit(store, serial="sn1").unit
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=200)
    key_pem, chain_pem = _custom_material("nas.corp.example", days=90, start=long_ago)

    unit = device.install_local_source(
        store, "acme", key_pem=key_pem, chain_pem=chain_pem
    )

    assert unit.chosen == "acme"
    assert unit.source == "self" and unit.info.code == own.info.code
    assert (
        unit.served_note is not None and "acme certificate expired" in unit.served_note
    )


def test_damaged_local_certificate_never_stops_the_unit_serving(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    own = device.init_unit(store, serial="sn1").unit
    key_pem, _ = _custom_material("a.example", days=90)
    _, other_chain = _custom_material("a.example", days=90)

    unit = device.install_local_source(
        store, "custom", key_pem=key_pem, chain_pem=other_chain
    )

    assert unit.source == "self" and unit.info.code == own.info.code
    assert unit.served_note is not None and "cannot be served" in unit.served_note


def test_selecting_a_source_without_a_certificate_is_refused(tmp_path: Path) -> None:
    from unitcert.errors import InputError

    store = StateStore(tmp_path / "state")
    device.init_unit(store)
    generation = store.generation()

    with pytest.raises(InputError, match="no acme certificate"):
        device.select_source(store, "acme")
    assert store.generation() == generation


def test_host_name_longer_than_a_common_name_goes_only_into_the_san(
    tmp_path: Path,
) -> None:
    serial = "s" * 63
    unit = device.init_unit(
        StateStore(tmp_path / "state"), serial=serial, product="router"
    ).unit

    assert len(unit.meta.hostname) > 64
    assert unit.info.names == (unit.meta.hostname,)
    serials = unit.cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)
    assert [a.value for a in serials] == [serial]
    assert not unit.cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)


def _identity_keys(store: StateStore) -> list[Path]:
    return sorted((store.root / "identity").glob("g*/key.pem"))


def test_lost_identity_link_is_restored_not_replaced(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    made = device.init_unit(store).unit
    (store.root / "identity" / "current").unlink()

    with pytest.raises(StateError, match="lost its identity link"):
        device.load_unit(store)
    started = device.start_unit(store)

    assert started.unit.info.code == made.info.code
    assert not started.created
    assert any("restored it to generation" in note for note in started.notes)


def test_identity_link_to_a_missing_generation_is_restored(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    made = device.init_unit(store).unit
    link = store.root / "identity" / "current"
    link.unlink()
    link.symlink_to("g00009999")

    restored = device.init_unit(store)

    assert restored.unit.info.code == made.info.code
    assert not restored.created


def test_damaged_identity_record_names_the_file_and_reset_recovers(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path / "state")
    made = device.init_unit(store, serial="sn1").unit
    meta = made.identity.path / "meta.json"
    meta.write_bytes(b"\x00garbage")

    with pytest.raises(StateError) as caught:
        device.load_unit(store)
    assert str(meta) in str(caught.value)
    assert "--regenerate-identity" in str(caught.value)
    with pytest.raises(StateError, match="no readable identity"):
        device.reset_unit(store)
    recovered = device.reset_unit(store, regenerate_identity=True).unit

    assert recovered.info.code != made.info.code
    assert device.load_unit(store).info.code == recovered.info.code


def test_reset_removes_the_old_key_and_the_owners_earlier_generations(
    tmp_path: Path,
) -> None:
    from unitcert.credential import AdminCredential

    store = StateStore(tmp_path / "state")
    device.init_unit(store)
    device.save_admin_credential(
        store, AdminCredential(setup="X").with_password("owner password 1")
    )
    device.reset_unit(store)  # a second identity, so there is a previous one
    old_keys = {p.read_bytes() for p in _identity_keys(store)}

    after = device.reset_unit(store).unit

    remaining = _identity_keys(store)
    assert remaining == [after.identity.path / "key.pem"]
    assert remaining[0].read_bytes() not in old_keys
    owner_files = [
        p
        for p in (store.root / "local").glob("g*/*")
        if p.parent != after.identity.path
    ]
    # Only the fresh setup credential remains: no password hash of the old owner.
    assert [p.name for p in owner_files] == ["admin.json"]
    assert b'"password_hash": null' in owner_files[0].read_bytes()


def test_crashed_first_boot_starts_over_with_a_fresh_identity(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.create()
    partial = store.root / "identity" / "g00000001"
    partial.mkdir()
    (partial / "key.pem").write_bytes(b"-----BEGIN PRIV")

    result = device.init_unit(store)

    assert result.created
    assert not partial.exists()


def test_empty_serial_and_numeric_domains_are_refused(tmp_path: Path) -> None:
    from unitcert.errors import InputError

    for options in (
        {"serial": ""},
        {"domain": "192.168.1.1"},
        {"domain": "example.123"},
    ):
        with pytest.raises(InputError):
            device.init_unit(StateStore(tmp_path / "s"), **options)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()


def test_identity_record_with_an_unknown_source_is_damage(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    made = device.init_unit(store).unit
    meta = made.identity.path / "meta.json"
    meta.write_text(meta.read_text().replace('"self"', "42"))

    with pytest.raises(StateError, match=r"meta\.json"):
        device.load_unit(store)


def test_init_on_existing_state_says_which_options_it_did_not_apply(
    tmp_path: Path,
) -> None:
    from unitcert import keys

    store = StateStore(tmp_path / "state")
    device.init_unit(store, serial="sn1")

    again = device.init_unit(store, serial="sn2", key_type=keys.KeyType.RSA2048)

    assert not again.created
    assert any(
        "--serial (it stays sn1)" in n and "--key-type" in n for n in again.notes
    )
