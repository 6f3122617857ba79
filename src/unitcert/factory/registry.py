"""The registry of issued units: SQLAlchemy over SQLite (default) or PostgreSQL.

Tables::

    units             one row per serial: name, current key (SPKI SHA-256, type,
                      RSA modulus), current certificate, issue time, status,
                      shared-prime check, label printed
    unit_keys         every key ever registered, unique: the duplicate-key index
    certificates      every certificate issued, with its revocation
    modulus_products  the product of all registered RSA moduli, in buckets
    counters          the CRL number, and the row that serialises RSA issuers

Refusals that must hold across concurrent issuers are unique constraints
(``units.serial``, ``unit_keys.spki_sha256``, ``certificates.cert_serial``):
a process that loses a race gets an ``IntegrityError``, mapped here to
:class:`~unitcert.errors.DuplicateError`. The shared-prime check needs more
than a constraint: an RSA issuer checks and appends its modulus while holding
a lock (SQLite: the write lock that ``BEGIN IMMEDIATE`` takes; PostgreSQL: a
row lock, ``SELECT ... FOR UPDATE``), so two issuers cannot both miss a pair.

Moduli are stored big-endian. Bucket products are a cache that only grows by
multiplication, so a reader that remembers a bucket's product can recover the
moduli added since as an exact quotient (:meth:`ModulusIndex.refresh`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gmpy2
import sqlalchemy as sa
from gmpy2 import mpz
from sqlalchemy import event, exc, orm
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from unitcert.errors import DuplicateError, RegistryError
from unitcert.factory import primes

__all__ = [
    "BUCKET_SIZE",
    "ModulusIndex",
    "RegisteredUnit",
    "Registry",
    "default_url",
]

logger = logging.getLogger(__name__)

BUCKET_SIZE = 256
_BUSY_TIMEOUT_MS = 60_000
_PRIME_LOCK = "prime-lock"
_CRL_NUMBER = "crl-number"


class _UtcDateTime(sa.types.TypeDecorator[dt.datetime]):
    """Datetimes stored as naive UTC, returned aware (SQLite keeps no zone)."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(
        self, value: dt.datetime | None, dialect: sa.Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("registry times must be timezone-aware")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(
        self, value: dt.datetime | None, dialect: sa.Dialect
    ) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


class _Base(DeclarativeBase):
    pass


class UnitRow(_Base):
    """One unit: its name, current key and certificate, and status."""

    __tablename__ = "units"

    id: Mapped[int] = mapped_column(primary_key=True)
    serial: Mapped[str] = mapped_column(sa.String(63), unique=True)
    hostname: Mapped[str] = mapped_column(sa.String(253))
    spki_sha256: Mapped[str] = mapped_column(sa.String(64))
    key_type: Mapped[str] = mapped_column(sa.String(16))
    rsa_modulus: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    prime_check: Mapped[str] = mapped_column(sa.String(16))
    cert_serial: Mapped[str] = mapped_column(sa.String(42))
    cert_pem: Mapped[str] = mapped_column(sa.Text)
    not_after: Mapped[dt.datetime] = mapped_column(_UtcDateTime)
    issued_at: Mapped[dt.datetime] = mapped_column(_UtcDateTime)
    first_issued_at: Mapped[dt.datetime] = mapped_column(_UtcDateTime)
    status: Mapped[str] = mapped_column(sa.String(16))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(_UtcDateTime)
    revocation_reason: Mapped[str | None] = mapped_column(sa.String(32))
    label_printed: Mapped[bool] = mapped_column(default=False)


class KeyRow(_Base):
    """A key registered to a unit; the primary key is the duplicate index."""

    __tablename__ = "unit_keys"

    spki_sha256: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    serial: Mapped[str] = mapped_column(sa.String(63), index=True)
    registered_at: Mapped[dt.datetime] = mapped_column(_UtcDateTime)


class CertificateRow(_Base):
    """A certificate issued to a unit."""

    __tablename__ = "certificates"

    cert_serial: Mapped[str] = mapped_column(sa.String(42), primary_key=True)
    serial: Mapped[str] = mapped_column(sa.String(63), index=True)
    spki_sha256: Mapped[str] = mapped_column(sa.String(64))
    issued_at: Mapped[dt.datetime] = mapped_column(_UtcDateTime)
    not_after: Mapped[dt.datetime] = mapped_column(_UtcDateTime)
    cert_pem: Mapped[str] = mapped_column(sa.Text)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(_UtcDateTime)
    revocation_reason: Mapped[str | None] = mapped_column(sa.String(32))


class ModulusBucketRow(_Base):
    """The product of up to :data:`BUCKET_SIZE` registered RSA moduli."""

    __tablename__ = "modulus_products"

    bucket: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    count: Mapped[int]
    product: Mapped[bytes] = mapped_column(sa.LargeBinary)


class CounterRow(_Base):
    """A named integer: the CRL number, and the row RSA issuers lock."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    value: Mapped[int]


def _to_bytes(value: int) -> bytes:
    return int(value).to_bytes((int(value).bit_length() + 7) // 8 or 1, "big")


def _to_mpz(data: bytes) -> mpz:
    return mpz(int.from_bytes(data, "big"))


@dataclass(frozen=True)
class RegisteredUnit:
    """What the registry holds about a unit (for ``factory list``).

    Attributes:
        serial: the unit's serial.
        hostname: its name.
        spki_sha256: hex SHA-256 of its key's SubjectPublicKeyInfo.
        key_type: e.g. ``ECDSA P-256``.
        cert_serial: the current certificate's serial number (hex).
        cert_pem: the current certificate.
        issued_at: when the current certificate was issued.
        not_after: when it expires.
        status: ``active`` or ``revoked``.
        prime_check: ``n/a`` (not RSA), ``clean``, ``queued`` or ``shared``.
        label_printed: whether the station printed its sticker.
        revocation_reason: why it was revoked, if it was.
    """

    serial: str
    hostname: str
    spki_sha256: str
    key_type: str
    cert_serial: str
    cert_pem: str
    issued_at: dt.datetime
    not_after: dt.datetime
    status: str
    prime_check: str
    label_printed: bool
    revocation_reason: str | None

    @classmethod
    def from_row(cls, row: UnitRow) -> RegisteredUnit:
        """Copy a row into a value."""
        return cls(
            serial=row.serial,
            hostname=row.hostname,
            spki_sha256=row.spki_sha256,
            key_type=row.key_type,
            cert_serial=row.cert_serial,
            cert_pem=row.cert_pem,
            issued_at=row.issued_at,
            not_after=row.not_after,
            status=row.status,
            prime_check=row.prime_check,
            label_printed=row.label_printed,
            revocation_reason=row.revocation_reason,
        )


def default_url(directory: Path) -> str:
    """The SQLite registry of a factory directory."""
    return f"sqlite:///{directory / 'registry.db'}"


def _sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Take over transaction control from the sqlite3 module, so that every
    # transaction can begin with BEGIN IMMEDIATE (SQLAlchemy's "Serializable
    # isolation / Savepoints / Transactional DDL" recipe for pysqlite).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.close()


def _sqlite_begin(connection: sa.Connection) -> None:
    # A writer takes the database's write lock at the start, so two writers
    # queue on busy_timeout instead of failing to upgrade a read lock. A long
    # reader (iter_units) takes none: in WAL mode it reads one snapshot and
    # issuing goes on beside it.
    read_only = connection.get_execution_options().get(_READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


_READ_ONLY = "unitcert_read_only"
_STREAM_BATCH = 1000


class Registry:
    """A connection to the registry of issued units.

    Args:
        url: an SQLAlchemy URL (``sqlite:///F/registry.db`` or
            ``postgresql+psycopg://user@host/db``).
        create: create the tables (at ``factory init``) instead of requiring
            them.

    Raises:
        RegistryError: the database cannot be opened, or lacks the tables.
    """

    def __init__(self, url: str, *, create: bool = False) -> None:
        try:
            parsed = sa.make_url(url)
        except exc.ArgumentError as error:
            raise RegistryError(
                f"{url!r} is not a database URL: use sqlite:///PATH or "
                "postgresql+psycopg://USER@HOST/DB"
            ) from error
        self.display_url = parsed.render_as_string(hide_password=True)
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise RegistryError(
                f"the registry must be SQLite or PostgreSQL, not {self.dialect}"
            )
        if self.dialect == "sqlite":
            path = Path(parsed.database or "")
            if not create and not path.is_file():
                raise RegistryError(
                    f"there is no registry at {path}: run 'unitcert factory init' "
                    "first, or pass --db for a PostgreSQL registry"
                )
        try:
            self.engine = sa.create_engine(parsed)
        except ImportError as error:
            raise RegistryError(
                f"the database driver for {self.display_url} is not installed"
            ) from error
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._sessions = orm.sessionmaker(self.engine, expire_on_commit=False)
        with self._mapped_errors("open"):
            if create:
                _Base.metadata.create_all(self.engine)
                with self.transaction() as session:
                    for name in (_PRIME_LOCK, _CRL_NUMBER):
                        if session.get(CounterRow, name) is None:
                            session.add(CounterRow(name=name, value=0))
            elif not sa.inspect(self.engine).has_table("units"):
                raise RegistryError(
                    f"the database {self.display_url} holds no unitcert registry: "
                    "create it with 'unitcert factory init --db ...'"
                )

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _mapped_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except exc.IntegrityError:
            # A refused row: callers map it (duplicate_error), it is not a fault.
            raise
        except exc.DatabaseError as error:
            # OperationalError (cannot connect, locked) and the rest, such as
            # SQLite's "file is not a database".
            raise RegistryError(
                f"cannot {action} the registry {self.display_url}: "
                f"{str(error.orig).strip() or type(error.orig).__name__}"
            ) from error

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction, committed at the end, rolled back on error.

        Raises:
            RegistryError: the database failed.
            sqlalchemy.exc.IntegrityError: a unique constraint refused a row
                (callers map it with :meth:`duplicate_error`).
        """
        with self._mapped_errors("write"), self._sessions.begin() as session:
            yield session

    @staticmethod
    def lock_primes(session: Session) -> None:
        """Serialise shared-prime checks: hold the lock row until commit."""
        session.execute(
            sa.select(CounterRow)
            .where(CounterRow.name == _PRIME_LOCK)
            .with_for_update()
        ).scalar_one()

    def unit(self, session: Session, serial: str) -> UnitRow | None:
        """Return the unit row of ``serial``, or None."""
        return session.execute(
            sa.select(UnitRow).where(UnitRow.serial == serial)
        ).scalar_one_or_none()

    def key_owner(self, session: Session, spki_sha256: str) -> str | None:
        """Return the serial that a key is registered to, or None."""
        row = session.get(KeyRow, spki_sha256)
        return None if row is None else row.serial

    def duplicate_error(
        self, serial: str, spki_sha256: str, error: exc.IntegrityError
    ) -> DuplicateError:
        """Explain a unique-constraint refusal: which serial or key was taken.

        Args:
            serial: the serial being registered.
            spki_sha256: its key.
            error: the refusal.
        """
        with self._sessions() as session:
            owner = self.key_owner(session, spki_sha256)
            if owner is not None and owner != serial:
                return key_taken_error(spki_sha256, owner)
            return DuplicateError(
                f"serial {serial} was registered by another issuer at the same "
                "moment: nothing was issued for it; check 'factory list'",
                serial=serial,
            )

    def next_crl_number(self, session: Session) -> int:
        """Increment and return the CRL number."""
        row = session.execute(
            sa.select(CounterRow)
            .where(CounterRow.name == _CRL_NUMBER)
            .with_for_update()
        ).scalar_one()
        row.value += 1
        return row.value

    def list_units(self) -> list[RegisteredUnit]:
        """Every unit, in the order they were first issued.

        Raises:
            RegistryError: the database failed.
        """
        with self._mapped_errors("read"), self._sessions() as session:
            rows = session.execute(sa.select(UnitRow).order_by(UnitRow.id)).scalars()
            return [RegisteredUnit.from_row(row) for row in rows]

    def count_units(self) -> int:
        """How many units the registry holds.

        Raises:
            RegistryError: the database failed.
        """
        with self._mapped_errors("read"), self._sessions() as session:
            return int(
                session.execute(
                    sa.select(sa.func.count()).select_from(UnitRow)
                ).scalar_one()
            )

    def iter_units(self) -> Iterator[RegisteredUnit]:
        """Every unit, in the order they were first issued, read in batches.

        Unlike :meth:`list_units`, a registry of tens of millions of units is
        never in memory at once: rows come from a server-side cursor
        (PostgreSQL) or a stepped query (SQLite) a batch at a time, within
        one read-only transaction that does not hold up issuing.

        Raises:
            RegistryError: the database failed.
        """
        with self._mapped_errors("read"), self.engine.connect() as connection:
            connection.execution_options(**{_READ_ONLY: True})
            with orm.Session(connection) as session:
                query = (
                    sa.select(UnitRow)
                    .order_by(UnitRow.id)
                    .execution_options(yield_per=_STREAM_BATCH)
                )
                for row in session.execute(query).scalars():
                    yield RegisteredUnit.from_row(row)
                    # The session holds rows weakly; expunge keeps a caller
                    # that holds on to nothing from growing it.
                    session.expunge(row)

    def find(self, serial: str) -> RegisteredUnit | None:
        """The unit with ``serial``, or None.

        Raises:
            RegistryError: the database failed.
        """
        with self._mapped_errors("read"), self._sessions() as session:
            row = self.unit(session, serial)
            return None if row is None else RegisteredUnit.from_row(row)

    def existing_serials(self, serials: Sequence[str]) -> set[str]:
        """Those of ``serials`` that are already registered.

        Raises:
            RegistryError: the database failed.
        """
        found: set[str] = set()
        with self._mapped_errors("read"), self._sessions() as session:
            for start in range(0, len(serials), 500):
                chunk = list(serials[start : start + 500])
                found.update(
                    session.execute(
                        sa.select(UnitRow.serial).where(UnitRow.serial.in_(chunk))
                    ).scalars()
                )
        return found

    def key_owners(self, spki_hashes: Sequence[str]) -> dict[str, str]:
        """Map those of ``spki_hashes`` that are registered to their serials.

        Raises:
            RegistryError: the database failed.
        """
        found: dict[str, str] = {}
        with self._mapped_errors("read"), self._sessions() as session:
            for start in range(0, len(spki_hashes), 500):
                chunk = list(spki_hashes[start : start + 500])
                rows = session.execute(
                    sa.select(KeyRow.spki_sha256, KeyRow.serial).where(
                        KeyRow.spki_sha256.in_(chunk)
                    )
                )
                found.update({digest: serial for digest, serial in rows})
        return found

    def mark_label_printed(self, serial: str) -> None:
        """Record that the sticker of ``serial`` was printed.

        Raises:
            RegistryError: the database failed.
        """
        with self.transaction() as session:
            session.execute(
                sa.update(UnitRow)
                .where(UnitRow.serial == serial)
                .values(label_printed=True)
            )


def key_taken_error(spki_sha256: str, owner: str) -> DuplicateError:
    """The refusal of a key that is registered to another unit."""
    return DuplicateError(
        f"this public key (SPKI SHA-256 {spki_sha256[:16]}...) is already registered "
        f"to unit {owner}: two units must never share a key, so make a new key on "
        "this unit",
        serial=owner,
    )


class ModulusIndex:
    """A process's cache of the registry's bucket products of RSA moduli.

    Reading every product once per check would cost a full read of the
    registry's moduli; the cache reads only buckets whose count changed. The
    product of all buckets (:attr:`total`, for batch checks) is made once per
    process and then kept up to date by multiplication.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[int, mpz]] = {}
        self._total: mpz | None = None

    @property
    def products(self) -> list[mpz]:
        """The bucket products as last read."""
        return [product for _, product in self._buckets.values()]

    @property
    def total(self) -> mpz:
        """The product of every registered modulus, as last read."""
        if self._total is None:
            self._total = primes.product(self.products)
        return self._total

    @property
    def bits(self) -> int:
        """The size of all registered moduli together, in bits."""
        return sum(int(p.bit_length()) for _, p in self._buckets.values())

    def refresh(self, session: Session) -> list[mpz]:
        """Read the buckets that changed; return products of the moduli added since.

        The quotient of a bucket's new product by the one cached is exactly the
        product of the moduli appended to it since the last refresh.
        """
        counts = session.execute(
            sa.select(ModulusBucketRow.bucket, ModulusBucketRow.count)
        ).all()
        added = []
        for bucket, count in counts:
            cached = self._buckets.get(bucket)
            if cached is not None and cached[0] == count:
                continue
            data = session.execute(
                sa.select(ModulusBucketRow.product).where(
                    ModulusBucketRow.bucket == bucket
                )
            ).scalar_one()
            product = _to_mpz(data)
            added.append(
                product if cached is None else gmpy2.divexact(product, cached[1])
            )
            self._buckets[bucket] = (count, product)
        if added and self._total is not None:
            self._total *= primes.product(added)
        return added

    def append(self, session: Session, moduli: Sequence[int]) -> None:
        """Add ``moduli`` to the registry's products (call with the prime lock held).

        The cache must be fresh (:meth:`refresh` in the same transaction).
        """
        if not moduli:
            return
        last = max(self._buckets, default=-1)
        count, product = self._buckets.get(last, (BUCKET_SIZE, mpz(1)))
        changed: dict[int, tuple[int, mpz]] = {}
        for modulus in moduli:
            if count >= BUCKET_SIZE:
                last, count, product = last + 1, 0, mpz(1)
            count += 1
            product *= mpz(modulus)
            changed[last] = (count, product)
        for bucket, (count, product) in changed.items():
            row = session.get(ModulusBucketRow, bucket)
            if row is None:
                session.add(
                    ModulusBucketRow(
                        bucket=bucket, count=count, product=_to_bytes(product)
                    )
                )
            else:
                row.count = count
                row.product = _to_bytes(product)
        session.flush()
        self._buckets.update(changed)
        if self._total is not None:
            self._total *= primes.product(moduli)

    def forget(self) -> None:
        """Drop the cache (after a rolled-back transaction that appended)."""
        self._buckets.clear()
        self._total = None
