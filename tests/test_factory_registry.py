"""The registry suite, run against SQLite and a real PostgreSQL server on loopback.

PostgreSQL is Debian's (scripts/system-deps installs it): a throwaway cluster
is made with initdb as the ``postgres`` user under /tmp, started on a free
port, and removed at the end. Nothing here is skipped: without PostgreSQL the
tests fail and say how to install it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from test_factory_support import (
    PASSPHRASE,
    csr_pem,
    ec_key,
    make_factory,
    pool_rsa_key,
)
from unitcert.cli import run
from unitcert.errors import DuplicateError, RegistryError, WeakKeyError
from unitcert.factory import issue as factory_issue
from unitcert.factory import registry as factory_registry
from unitcert.factory.issue import Issuer
from unitcert.factory.registry import Registry, default_url

BACKENDS = ["sqlite", "postgresql"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
            "run scripts/system-deps as root, or apt-get install postgresql"
        )
    return found[-1].parent


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server; yields its base URL (no database)."""
    bindir = _postgres_bindir()
    # pytest's temporary directories are private to root; the server runs as
    # the postgres user, so its directory lives under /tmp and belongs to it.
    base = Path(tempfile.mkdtemp(prefix="unitcert-pg-", dir="/tmp"))
    shutil.chown(base, "postgres", "postgres")
    data, port = base / "data", _free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    try:
        subprocess.run(
            [
                *as_postgres,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                *as_postgres,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-w",
                "-l",
                str(base / "server.log"),
                "-o",
                f"-p {port} -k {base} -h 127.0.0.1 -c fsync=off",
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except subprocess.CalledProcessError as error:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {error.stderr.decode()}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [
                *as_postgres,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-m",
                "fast",
                "stop",
            ],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(base, ignore_errors=True)


def _new_database(base_url: str) -> str:
    name = f"unitcert_{uuid.uuid4().hex[:12]}"
    dsn = base_url.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{base_url}/{name}"


@pytest.fixture(params=BACKENDS)
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return default_url(tmp_path / "F")
    return _new_database(request.getfixturevalue("postgres"))


@pytest.fixture
def factory_dir(tmp_path: Path, registry_url: str) -> Path:
    directory = tmp_path / "F"
    make_factory(directory)
    Registry(registry_url, create=True).close()
    return directory


@pytest.fixture
def issuer(factory_dir: Path, registry_url: str) -> Iterator[Issuer]:
    from unitcert.factory.ca import load_factory

    with Registry(registry_url) as registry:
        yield Issuer(load_factory(factory_dir, PASSPHRASE), registry)


def _second_issuer(factory_dir: Path, registry_url: str) -> Issuer:
    """Another issuer with its own cache, as another process would have."""
    from unitcert.factory.ca import load_factory

    return Issuer(load_factory(factory_dir, PASSPHRASE), Registry(registry_url))


def test_records_hold_what_was_issued(issuer: Issuer) -> None:
    issuer.issue(csr_pem(ec_key(), "a1"), "a1")
    rsa_unit = issuer.issue(csr_pem(pool_rsa_key(0, 1), "a2"), "a2")
    issuer.registry.mark_label_printed("a2")

    first, second = issuer.registry.list_units()

    assert (first.serial, first.key_type, first.prime_check) == (
        "a1",
        "ECDSA P-256",
        "n/a",
    )
    assert second.hostname == "a2.router.example.com"
    assert second.cert_serial == format(rsa_unit.cert.serial_number, "x")
    assert second.label_printed and second.status == "active"
    assert second.issued_at.tzinfo is not None


def test_iter_units_streams_every_unit_without_holding_up_issuers(
    issuer: Issuer,
    factory_dir: Path,
    registry_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(factory_registry, "_STREAM_BATCH", 2)
    monkeypatch.setattr(factory_registry, "_BUSY_TIMEOUT_MS", 3000)
    for n in range(5):
        issuer.issue(csr_pem(ec_key(), f"s{n}"), f"s{n}")
    assert issuer.registry.count_units() == 5

    stream = issuer.registry.iter_units()
    first = next(stream)
    # A reader in the middle of its read must not block another issuer
    # (SQLite: no write lock for the reader; PostgreSQL: no row locks).
    other = _second_issuer(factory_dir, registry_url)
    try:
        other.issue(csr_pem(ec_key(), "s5"), "s5")
    finally:
        other.registry.close()
    rest = [unit.serial for unit in stream]

    # One snapshot: the unit issued during the read is not in it.
    assert [first.serial, *rest] == [f"s{n}" for n in range(5)]
    assert [u.serial for u in issuer.registry.iter_units()][-1] == "s5"


def test_duplicate_serial_and_key_are_refused(issuer: Issuer) -> None:
    key = ec_key()
    issuer.issue(csr_pem(key, "b1"), "b1")

    with pytest.raises(DuplicateError, match="already issued"):
        issuer.issue(csr_pem(ec_key(), "b1"), "b1")
    with pytest.raises(DuplicateError, match="registered to unit b1"):
        issuer.issue(csr_pem(key, "b2"), "b2")
    assert [u.serial for u in issuer.registry.list_units()] == ["b1"]


def test_shared_primes_are_found_across_buckets_and_other_issuers(
    issuer: Issuer,
    factory_dir: Path,
    registry_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(factory_registry, "BUCKET_SIZE", 3)
    for n in range(5):
        issuer.issue(csr_pem(pool_rsa_key(2 * n, 2 * n + 1), f"c{n}"), f"c{n}")
    other = _second_issuer(factory_dir, registry_url)
    try:
        other.issue(csr_pem(pool_rsa_key(20, 21), "c5"), "c5")
        with pytest.raises(WeakKeyError, match="unit c1"):
            other.issue(csr_pem(pool_rsa_key(3, 22), "c6"), "c6")
    finally:
        other.registry.close()

    # The first issuer's cache learns of c5 before it checks.
    with pytest.raises(WeakKeyError, match="unit c5"):
        issuer.issue(csr_pem(pool_rsa_key(21, 23), "c7"), "c7")
    assert len(issuer.registry.list_units()) == 6


def test_queued_moduli_are_checked_as_a_batch(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A registry past the direct-check bound: new moduli are queued.
    monkeypatch.setattr(factory_issue, "DIRECT_CHECK_MAX_BITS", 0)
    issuer.issue(csr_pem(pool_rsa_key(30, 31), "q1"), "q1")
    issuer.issue(csr_pem(pool_rsa_key(32, 33), "q2"), "q2")
    issuer.issue(csr_pem(pool_rsa_key(31, 34), "q3"), "q3")

    shared = issuer.check_prime_queue()

    assert sorted(shared) == ["q1", "q3"]
    checks = {u.serial: u.prime_check for u in issuer.registry.list_units()}
    assert checks == {"q1": "shared", "q2": "clean", "q3": "shared"}
    assert issuer.check_prime_queue() == ()


def test_a_batch_checks_the_queue_that_single_issues_left(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(factory_issue, "DIRECT_CHECK_MAX_BITS", -1)
    issuer.issue(csr_pem(pool_rsa_key(35, 36), "t1"), "t1")
    issuer.issue(csr_pem(pool_rsa_key(36, 37), "t2"), "t2")

    outcome = issuer.issue_batch([("t3", csr_pem(ec_key(), "t3"))])

    assert [u.serial for u in outcome.issued] == ["t3"]
    assert outcome.flagged == ("t1", "t2")


_WORKER = """
import json, os, sys, time
from pathlib import Path
from unitcert.errors import UnitcertError
from unitcert.factory.ca import load_factory
from unitcert.factory.issue import Issuer
from unitcert.factory.registry import Registry

directory, url, jobs, go = sys.argv[1:5]
passphrase = os.environ["UNITCERT_CA_PASSPHRASE"].encode()
issuer = Issuer(load_factory(Path(directory), passphrase), Registry(url))
Path(go + "." + str(os.getpid())).touch()
while not Path(go).exists():
    time.sleep(0.005)
results = []
for serial, csr in json.loads(Path(jobs).read_text()):
    try:
        issuer.issue(Path(csr).read_bytes(), serial)
        results.append([serial, "issued"])
    except UnitcertError as error:
        results.append([serial, type(error).__name__])
print(json.dumps(results))
"""


def test_four_processes_never_issue_a_serial_or_a_key_twice(
    factory_dir: Path, registry_url: str, tmp_path: Path
) -> None:
    shared_keys = [ec_key() for _ in range(6)]
    workers = []
    go = tmp_path / "go"
    for i in range(4):
        jobs = []
        for k in range(6):
            # The same serial with each process's own key ...
            path = tmp_path / f"serial-{i}-{k}.csr"
            path.write_bytes(csr_pem(ec_key(), f"s{k}"))
            jobs.append((f"s{k}", str(path)))
            # ... and the same key under each process's own serial.
            path = tmp_path / f"key-{i}-{k}.csr"
            path.write_bytes(csr_pem(shared_keys[k], f"k{i}x{k}"))
            jobs.append((f"k{i}x{k}", str(path)))
        # RSA keys that all share one prime: only one may be issued.
        path = tmp_path / f"rsa-{i}.csr"
        path.write_bytes(csr_pem(pool_rsa_key(40, 41 + i), f"r{i}"))
        jobs.append((f"r{i}", str(path)))
        jobs_file = tmp_path / f"jobs-{i}.json"
        jobs_file.write_text(json.dumps(jobs))
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER,
                    str(factory_dir),
                    registry_url,
                    str(jobs_file),
                    str(go),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "UNITCERT_CA_PASSPHRASE": PASSPHRASE.decode()},
            )
        )
    while len(list(tmp_path.glob("go.*"))) < 4:
        if any(w.poll() is not None for w in workers):
            break
    go.touch()
    outcomes = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        outcomes.extend(json.loads(out))

    issued = Counter(serial for serial, result in outcomes if result == "issued")
    for k in range(6):
        assert issued[f"s{k}"] == 1
        assert sum(issued[f"k{i}x{k}"] for i in range(4)) == 1
    assert sum(issued[f"r{i}"] for i in range(4)) == 1
    refusals = {result for _, result in outcomes if result != "issued"}
    assert refusals <= {"DuplicateError", "WeakKeyError"}
    with Registry(registry_url) as registry:
        assert len(registry.list_units()) == 13


def test_the_cli_runs_on_postgresql_by_url(
    postgres: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _new_database(postgres)
    directory = tmp_path / "F"
    secret = tmp_path / "passphrase"
    secret.write_bytes(PASSPHRASE)
    common = ["--dir", str(directory), "--passphrase-file", str(secret)]

    assert (
        run(
            [
                "factory",
                "init",
                *common,
                "--domain",
                "example.com",
                "--product",
                "router",
                "--db",
                url,
            ]
        )
        == 0
    )
    assert not (directory / "registry.db").exists()
    assert (
        run(
            [
                "factory",
                "provision",
                *common,
                "--db",
                url,
                "--state",
                str(tmp_path / "unit"),
                "--serial",
                "p1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert run(["factory", "list", "--dir", str(directory), "--json", "--db", url]) == 0
    assert [r["serial"] for r in json.loads(capsys.readouterr().out)] == ["p1"]

    assert run(["factory", "list", "--dir", str(directory)]) == 1
    assert "keeps its registry in postgresql: pass its URL" in capsys.readouterr().err


def test_an_unreachable_database_is_one_clear_error(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{_free_port()}/nowhere"

    with pytest.raises(RegistryError, match="cannot open the registry"):
        Registry(url)
    with pytest.raises(RegistryError, match="no registry at"):
        Registry(default_url(tmp_path))
