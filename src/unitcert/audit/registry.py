"""The factory registry as an audit source (``unitcert audit --db URL`` or ``--dir F``).

Every unit the registry holds is audited by the key of its current
certificate, under its serial; revoked units too, since their keys may still
be in the field. The registry is read through its public API
(:meth:`unitcert.factory.registry.Registry.iter_units`), a batch of rows at a
time, so a registry of millions of units is never in memory at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlalchemy as sa

from unitcert.audit.sources import KeyRecord, SourceProblem, cert_record
from unitcert.errors import InputError
from unitcert.factory.registry import RegisteredUnit, Registry, default_url

__all__ = ["RegistrySource"]

logger = logging.getLogger(__name__)


class RegistrySource:
    """The units of a factory registry, each under its serial."""

    def __init__(self, url: str) -> None:
        """Remember the registry's URL; it is opened on first use.

        Args:
            url: an SQLAlchemy URL (``sqlite:///F/registry.db``,
                ``postgresql+psycopg://user@host/db``).
        """
        self.url = url
        self._count: int | None = None
        try:
            self._name = sa.make_url(url).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            self._name = "(unreadable URL)"

    @classmethod
    def for_directory(cls, directory: Path) -> RegistrySource:
        """Return the source for the SQLite registry of a factory folder."""
        return cls(default_url(directory))

    def files(self) -> list[Path]:
        """Return the registry's database files, for an SQLite registry."""
        try:
            parsed = sa.make_url(self.url)
        except sa.exc.ArgumentError:
            return []
        if parsed.get_backend_name() != "sqlite" or not parsed.database:
            return []
        database = Path(parsed.database)
        return [database, *(Path(f"{database}{end}") for end in ("-wal", "-shm"))]

    def describe(self) -> str:
        """Return "registry URL" (without a password)."""
        return f"registry {self._name}"

    def size(self) -> int:
        """Return how many units the registry holds.

        Raises:
            RegistryError: the registry cannot be opened or read.
        """
        if self._count is None:
            with Registry(self.url) as registry:
                self._name = registry.display_url
                self._count = registry.count_units()
        return self._count

    def records(
        self,
        problems: list[SourceProblem],
        advance: Callable[[int], None] | None = None,
    ) -> Iterator[KeyRecord]:
        """Yield the key of every unit's current certificate (see ``Source``).

        Raises:
            RegistryError: the registry cannot be opened or read.
        """
        read = 0
        with Registry(self.url) as registry:
            self._name = registry.display_url
            for unit in registry.iter_units():
                read += 1
                record = self._record(unit, problems)
                if record is not None:
                    yield record
                if advance is not None:
                    advance(1)
        logger.info("read %d units from the registry %s", read, self._name)

    def _record(
        self, unit: RegisteredUnit, problems: list[SourceProblem]
    ) -> KeyRecord | None:
        location = f"{self._name}#{unit.serial}"
        try:
            return cert_record(
                _pem_to_der(unit.cert_pem),
                unit=unit.serial,
                source="registry",
                location=location,
                serial=unit.serial.lower(),
            )
        except InputError as exc:
            problems.append(SourceProblem(location, str(exc), named=True))
            return None


def _pem_to_der(pem: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise InputError("its certificate is unreadable") from exc
    return cert.public_bytes(serialization.Encoding.DER)
