"""Issuing a unit's certificate: every check a CSR must pass, then sign and register.

A CSR is refused, with a clear error and nothing written, when:

- its signature does not verify (the unit did not prove it holds the key);
- its key type or size is below policy (ECDSA P-256/P-384, RSA 2048-4096);
- badkeys (or unitcert's own blocklist) flags the key;
- the key is already registered to another serial (an index lookup);
- an RSA modulus shares a prime with a registered one (see
  :mod:`unitcert.factory.primes`);
- the serial was already issued, unless a re-issue is asked for;
- the serial is not a DNS label, or the CSR asks for another name or serial.

Shared primes: while the registry's moduli are small enough for one check to
stay cheap (:data:`DIRECT_CHECK_MAX_BITS`, about 20 ms), each new modulus is
checked before it is signed. Past that, a new modulus is registered as
``queued``, and the queue is checked as one batch (a product tree against the
registry) once it holds :data:`QUEUE_BATCH` moduli, and by every
``provision-batch``; a queued unit found to share a prime is marked
``shared`` and logged as an error, since its certificate is already out.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gmpy2
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from gmpy2 import mpz
from sqlalchemy import exc

from unitcert import certs, quality
from unitcert.code import FingerprintCode, code_for_spki, spki_from_cert_der
from unitcert.device import check_label
from unitcert.errors import DuplicateError, InputError, WeakKeyError
from unitcert.factory import primes
from unitcert.factory.ca import (
    FactoryCa,
    RevokedEntry,
    build_crl,
    build_unit_cert,
    check_validity_days,
)
from unitcert.factory.registry import (
    CertificateRow,
    KeyRow,
    ModulusIndex,
    Registry,
    UnitRow,
    key_taken_error,
)

__all__ = [
    "DIRECT_CHECK_MAX_BITS",
    "QUEUE_BATCH",
    "REVOCATION_REASONS",
    "BatchOutcome",
    "CheckedRequest",
    "IssuedUnit",
    "Issuer",
    "check_csr",
]

logger = logging.getLogger(__name__)

# One check reduces every registered modulus modulo the new one: about 1 ms
# per 1,000 RSA-2048 moduli on a 2020s core, so this is some 20 ms.
DIRECT_CHECK_MAX_BITS = 40_000_000
QUEUE_BATCH = 256
MAX_RSA_BITS = 4096
_EC_CURVES = {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384"}
_WEAK_HASHES = (hashes.MD5, hashes.SHA1)

REVOCATION_REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
}


@dataclass(frozen=True)
class CheckedRequest:
    """A CSR that passed every check that needs no registry.

    Attributes:
        serial: the unit's serial.
        hostname: the name it is issued for.
        public_key: the unit's public key.
        spki_sha256: hex SHA-256 of its SubjectPublicKeyInfo.
        key_type: e.g. ``ECDSA P-256``.
        modulus: the RSA modulus, or None for ECDSA.
    """

    serial: str
    hostname: str
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    spki_sha256: str
    key_type: str
    modulus: int | None


@dataclass(frozen=True)
class IssuedUnit:
    """A certificate issued and registered.

    Attributes:
        serial: the unit's serial.
        hostname: its name.
        cert: the unit's certificate.
        chain_pem: the certificate and the issuing CA's, PEM, leaf first.
        code: the fingerprint code of its key (the sticker's).
        prime_check: ``n/a``, ``clean`` or ``queued``.
    """

    serial: str
    hostname: str
    cert: x509.Certificate
    chain_pem: bytes
    code: FingerprintCode
    prime_check: str


@dataclass(frozen=True)
class BatchOutcome:
    """What :meth:`Issuer.issue_batch` did.

    Attributes:
        issued: the units issued, in request order.
        refused: ``(serial, reason)`` for each request that was refused.
        flagged: units issued earlier whose queued moduli were found, after
            this batch, to share a prime (now marked ``shared``).
    """

    issued: tuple[IssuedUnit, ...]
    refused: tuple[tuple[str, str], ...]
    flagged: tuple[str, ...] = ()


def _load_csr(data: bytes) -> x509.CertificateSigningRequest:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as error:
        raise InputError(
            "the file is not a readable certificate signing request (PEM or DER): "
            "make it on the unit with 'unitcert device csr'"
        ) from error


def _key_type(public_key: object) -> tuple[str, int | None]:
    """Return the key's type name and RSA modulus, or refuse it by policy."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = _EC_CURVES.get(public_key.curve.name)
        if name is None:
            raise InputError(
                f"the CSR's key is on curve {public_key.curve.name}, which the "
                "policy does not allow: use ECDSA P-256 or P-384, or RSA 2048-4096"
            )
        return name, None
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        if not quality.MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise InputError(
                f"the CSR's RSA key has {bits} bits, outside the policy of "
                f"{quality.MIN_RSA_BITS} to {MAX_RSA_BITS}: make a new key on the unit"
            )
        return f"RSA {bits}", public_key.public_numbers().n
    raise InputError(
        f"the CSR's key is {type(public_key).__name__.removesuffix('PublicKey')}, "
        "which the policy does not allow: use ECDSA P-256 or P-384, or RSA 2048-4096"
    )


def _check_requested_names(
    csr: x509.CertificateSigningRequest, serial: str, hostname: str
) -> None:
    """Refuse a CSR that asks for another unit's name or serial."""
    requested = [
        a.value for a in csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    ]
    if any(str(value).lower() != serial for value in requested):
        raise InputError(
            f"the CSR is from unit {requested[0]!s}, not {serial}: give the CSR "
            "that this unit made, or the right --serial"
        )
    names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names += san.value.get_values_for_type(x509.DNSName)
        if san.value.get_values_for_type(x509.IPAddress):
            raise InputError(
                "the CSR asks for an IP address, which unit certificates never "
                "carry: make the CSR with 'unitcert device csr'"
            )
    except x509.ExtensionNotFound:
        pass
    wrong = sorted({str(n).lower() for n in names} - {hostname})
    if wrong:
        raise InputError(
            f"the CSR asks for {', '.join(wrong)}, but serial {serial} of this "
            f"factory is {hostname}: initialise the unit with that serial, product "
            "and domain, then make its CSR again"
        )


def check_csr(
    csr_pem: bytes, *, serial: str, hostname_for: Callable[[str], str]
) -> CheckedRequest:
    """Check a CSR on its own: signature, policy, badkeys, names.

    Args:
        csr_pem: the CSR, PEM or DER.
        serial: the serial it is to be issued for.
        hostname_for: the factory's serial-to-name rule.

    Raises:
        InputError: the serial or name is invalid, the CSR is unreadable, its
            signature does not verify, its key is below policy, or it asks for
            another name.
        WeakKeyError: badkeys or the blocklist flags the key.
    """
    serial = check_label("serial", serial)
    hostname = hostname_for(serial)
    if len(hostname) > 253:
        raise InputError(f"the name {hostname} is longer than DNS allows (253)")

    csr = _load_csr(csr_pem)
    if not csr.is_signature_valid:
        raise InputError(
            "the CSR's signature does not verify, so it does not prove that the unit "
            "holds the key: make the CSR again on the unit"
        )
    if isinstance(csr.signature_hash_algorithm, _WEAK_HASHES):
        raise InputError(
            f"the CSR is signed with {csr.signature_hash_algorithm.name}, which is "
            "broken: make it again with SHA-256 or better"
        )
    public_key = csr.public_key()
    key_type, modulus = _key_type(public_key)
    assert isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    _check_requested_names(csr, serial, hostname)
    findings = quality.check_key(public_key)
    if findings:
        raise WeakKeyError(
            "the CSR's key is unsafe, so it was not signed: "
            + "; ".join(f.detail for f in findings)
            + ": make a new key on the unit",
            findings=tuple(f.check for f in findings),
        )
    return CheckedRequest(
        serial=serial,
        hostname=hostname,
        public_key=public_key,
        spki_sha256=quality.spki_sha256(public_key),
        key_type=key_type,
        modulus=modulus,
    )


def _shared_prime_error(serial: str, other: str | None) -> WeakKeyError:
    whom = f"unit {other}" if other else "a registered unit"
    return WeakKeyError(
        f"the RSA key of {serial} shares a prime factor with the key of {whom}, so "
        "anyone can factor both: nothing was issued; make a new key on this unit "
        "and have the other one re-keyed",
        findings=("sharedprime",),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Issuer:
    """Signs and registers unit certificates for one factory.

    The issuing key is decrypted once, when the issuer is made.

    Args:
        ca: the factory.
        registry: its registry.

    Raises:
        InputError: the passphrase does not open the issuing key.
    """

    def __init__(self, ca: FactoryCa, registry: Registry) -> None:
        self.ca = ca
        self.registry = registry
        self._signer = ca.issuing_key.signing_key()
        self._moduli = ModulusIndex()
        self._issuing_pem = ca.issuing_cert.public_bytes(serialization.Encoding.PEM)

    def _validity(self, days: int | None) -> dt.timedelta:
        return dt.timedelta(
            days=check_validity_days(days or self.ca.config.validity_days)
        )

    def check(self, csr_pem: bytes, serial: str) -> CheckedRequest:
        """Check a CSR on its own (see :func:`check_csr`).

        Raises:
            InputError: see :func:`check_csr`.
            WeakKeyError: see :func:`check_csr`.
        """
        return check_csr(csr_pem, serial=serial, hostname_for=self.ca.config.hostname)

    def _refuse_taken(
        self, request: CheckedRequest, *, reissue: bool
    ) -> UnitRow | None:
        """Refuse a serial already issued or a key registered elsewhere."""
        with self.registry.transaction() as session:
            owner = self.registry.key_owner(session, request.spki_sha256)
            if owner is not None and owner != request.serial:
                raise key_taken_error(request.spki_sha256, owner)
            row = self.registry.unit(session, request.serial)
        if row is not None and not reissue:
            raise DuplicateError(
                f"serial {request.serial} was already issued on "
                f"{row.first_issued_at:%Y-%m-%d}: nothing was issued; pass --reissue "
                "to issue it again",
                serial=request.serial,
            )
        if row is not None and row.status == "revoked":
            raise InputError(
                f"unit {request.serial} was revoked ({row.revocation_reason}): a "
                "revoked unit is not issued again"
            )
        return row

    def _owner_of_shared_prime(self, modulus: int) -> str | None:
        """Find a registered unit whose modulus shares a prime with ``modulus``.

        A scan of every registered modulus: only ever run to name the other
        unit in a refusal.
        """
        with self.registry.transaction() as session:
            rows = session.execute(
                sa.select(UnitRow.serial, UnitRow.rsa_modulus).where(
                    UnitRow.rsa_modulus.is_not(None)
                )
            )
            for serial, data in rows:
                if data and gmpy2.gcd(int.from_bytes(data, "big"), modulus) != 1:
                    return str(serial)
        return None

    def issue(
        self,
        csr_pem: bytes,
        serial: str,
        *,
        reissue: bool = False,
        validity_days: int | None = None,
        now: dt.datetime | None = None,
    ) -> IssuedUnit:
        """Check a CSR, sign it and register the unit, or refuse with nothing written.

        Args:
            csr_pem: the unit's CSR.
            serial: its serial.
            reissue: allow a serial that was already issued (same or new key).
            validity_days: the certificate's validity (default: the factory's).
            now: the issue time (defaults to now).

        Raises:
            InputError: the CSR or serial fails a check (see the module doc).
            DuplicateError: the serial or key is already registered.
            WeakKeyError: the key is weak or shares a prime.
            RegistryError: the database failed.
        """
        validity = self._validity(validity_days)
        request = self.check(csr_pem, serial)
        existing = self._refuse_taken(request, reissue=reissue)
        new_key = existing is None or existing.spki_sha256 != request.spki_sha256
        if request.modulus is None:
            prime_check = "n/a"
        elif new_key or existing is None:
            prime_check = self._check_prime_snapshot(request)
        else:
            prime_check = existing.prime_check

        cert = build_unit_cert(
            self.ca,
            self._signer,
            public_key=request.public_key,
            serial=request.serial,
            hostname=request.hostname,
            validity=validity,
            now=now or _now(),
        )
        self._register([(request, cert, prime_check, new_key)], reissue=reissue)
        if prime_check == "queued":
            self.check_prime_queue(min_batch=QUEUE_BATCH)
        logger.info(
            "issued %s for %s (certificate %x)",
            "again" if existing else "a certificate",
            request.hostname,
            cert.serial_number,
        )
        return self._issued(request, cert, prime_check)

    def _issued(
        self, request: CheckedRequest, cert: x509.Certificate, prime_check: str
    ) -> IssuedUnit:
        return IssuedUnit(
            serial=request.serial,
            hostname=request.hostname,
            cert=cert,
            chain_pem=certs.pem_chain([cert]) + self._issuing_pem,
            code=code_for_spki(
                spki_from_cert_der(cert.public_bytes(serialization.Encoding.DER))
            ),
            prime_check=prime_check,
        )

    def _check_prime_snapshot(self, request: CheckedRequest) -> str:
        """Check a new modulus against the registry as it is now (no lock held)."""
        assert request.modulus is not None
        with self.registry.transaction() as session:
            self._moduli.refresh(session)
        if self._moduli.bits > DIRECT_CHECK_MAX_BITS:
            return "queued"
        factor = primes.shared_factor(request.modulus, self._moduli.products)
        if factor != 1:
            other = self._owner_of_shared_prime(request.modulus)
            raise _shared_prime_error(request.serial, other)
        return "clean"

    def _register(
        self,
        items: Sequence[tuple[CheckedRequest, x509.Certificate, str, bool]],
        *,
        reissue: bool,
    ) -> None:
        """Write units, keys, certificates and moduli in one transaction.

        Moduli checked against an earlier snapshot are checked again against
        the moduli registered since, under the prime lock, then appended.
        """
        moduli = [r.modulus for r, _, check, new in items if check == "clean" and new]
        queued = [r.modulus for r, _, check, new in items if check == "queued" and new]
        try:
            with self.registry.transaction() as session:
                if moduli or queued:
                    self.registry.lock_primes(session)
                    added = self._moduli.refresh(session)
                    if moduli and added:
                        self._recheck(items, added)
                    self._moduli.append(session, [m for m in moduli + queued if m])
                self._write_units(session, items, reissue=reissue)
        except exc.IntegrityError as error:
            self._moduli.forget()
            request = items[0][0]
            raise self.registry.duplicate_error(
                request.serial, request.spki_sha256, error
            ) from error
        except BaseException:
            self._moduli.forget()
            raise

    def _recheck(
        self,
        items: Sequence[tuple[CheckedRequest, x509.Certificate, str, bool]],
        added: Sequence[mpz],
    ) -> None:
        for request, _, check, new_key in items:
            if check == "clean" and new_key and request.modulus is not None:
                factor = primes.shared_factor(request.modulus, added)
                if factor != 1:
                    raise _shared_prime_error(request.serial, None)

    def _write_units(
        self,
        session: sa.orm.Session,
        items: Sequence[tuple[CheckedRequest, x509.Certificate, str, bool]],
        *,
        reissue: bool,
    ) -> None:
        issued_at = _now()
        key_rows: list[dict[str, object]] = []
        cert_rows: list[dict[str, object]] = []
        unit_rows: list[dict[str, object]] = []
        for request, cert, prime_check, new_key in items:
            modulus = request.modulus
            record: dict[str, object] = {
                "spki_sha256": request.spki_sha256,
                "key_type": request.key_type,
                "rsa_modulus": (
                    None
                    if modulus is None
                    else modulus.to_bytes((modulus.bit_length() + 7) // 8, "big")
                ),
                "prime_check": prime_check,
                "cert_serial": format(cert.serial_number, "x"),
                "cert_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
                "not_after": cert.not_valid_after_utc,
                "issued_at": issued_at,
            }
            if new_key:
                key_rows.append(
                    {
                        "spki_sha256": request.spki_sha256,
                        "serial": request.serial,
                        "registered_at": issued_at,
                    }
                )
            cert_rows.append(
                {
                    "cert_serial": record["cert_serial"],
                    "serial": request.serial,
                    "spki_sha256": request.spki_sha256,
                    "issued_at": issued_at,
                    "not_after": record["not_after"],
                    "cert_pem": record["cert_pem"],
                }
            )
            row = self.registry.unit(session, request.serial) if reissue else None
            if row is None:
                unit_rows.append(
                    record
                    | {
                        "serial": request.serial,
                        "hostname": request.hostname,
                        "first_issued_at": issued_at,
                        "status": "active",
                        "label_printed": False,
                    }
                )
                continue
            if row.status == "revoked":
                raise InputError(
                    f"unit {request.serial} was revoked meanwhile: nothing was issued"
                )
            if new_key:
                self._revoke_certificates(
                    session, request.serial, x509.ReasonFlags.superseded, issued_at
                )
            for name, value in record.items():
                setattr(row, name, value)
        for model, rows in ((KeyRow, key_rows), (UnitRow, unit_rows)):
            if rows:
                session.execute(sa.insert(model), rows)
        session.execute(sa.insert(CertificateRow), cert_rows)

    def reissue(
        self,
        serial: str,
        *,
        validity_days: int | None = None,
        now: dt.datetime | None = None,
    ) -> IssuedUnit:
        """Renew a unit's certificate for the same key (no CSR needed).

        Raises:
            InputError: no such unit, or it was revoked.
            RegistryError: the database failed.
        """
        validity = self._validity(validity_days)
        serial = check_label("serial", serial)
        with self.registry.transaction() as session:
            row = self.registry.unit(session, serial)
            if row is None:
                raise InputError(
                    f"no unit {serial} was issued by this factory: check the serial "
                    "with 'factory list'"
                )
            old = x509.load_pem_x509_certificate(row.cert_pem.encode("ascii"))
            prime_check = row.prime_check
            status, reason = row.status, row.revocation_reason
        if status == "revoked":
            raise InputError(
                f"unit {serial} was revoked ({reason}): a revoked unit is not issued "
                "again"
            )
        public_key = old.public_key()
        assert isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        key_type, modulus = _key_type(public_key)
        request = CheckedRequest(
            serial=serial,
            hostname=self.ca.config.hostname(serial),
            public_key=public_key,
            spki_sha256=quality.spki_sha256(public_key),
            key_type=key_type,
            modulus=modulus,
        )
        cert = build_unit_cert(
            self.ca,
            self._signer,
            public_key=public_key,
            serial=serial,
            hostname=request.hostname,
            validity=validity,
            now=now or _now(),
        )
        self._register([(request, cert, prime_check, False)], reissue=True)
        logger.info(
            "re-issued the certificate of %s for the same key", request.hostname
        )
        return self._issued(request, cert, prime_check)

    def issue_batch(
        self,
        requests: Sequence[tuple[str, bytes]],
        *,
        validity_days: int | None = None,
        chunk: int = 500,
        on_progress: Callable[[int], None] | None = None,
    ) -> BatchOutcome:
        """Issue many new units: per-unit checks, one product tree, chunked commits.

        Each request is ``(serial, csr_pem)``. A refused request does not stop
        the others; its reason is in the outcome. RSA moduli are checked as one
        batch against the registry and against each other, and each chunk is
        checked again under the prime lock against anything registered since.

        Raises:
            InputError: the validity is not allowed.
            RegistryError: the database failed.
        """
        validity = self._validity(validity_days)
        refused: list[tuple[str, str]] = []
        checked: list[CheckedRequest] = []
        seen: dict[str, str] = {}
        for serial, csr_pem in requests:
            try:
                request = self.check(csr_pem, serial)
            except InputError as error:
                refused.append((serial, str(error)))
                continue
            except WeakKeyError as error:
                refused.append((serial, str(error)))
                continue
            if request.spki_sha256 in seen or request.serial in seen.values():
                refused.append((serial, "the batch holds this key or serial twice"))
                continue
            seen[request.spki_sha256] = request.serial
            checked.append(request)
        checked = self._refuse_batch_taken(checked, refused)
        checked = self._refuse_batch_primes(checked, refused)

        issued: list[IssuedUnit] = []
        now = _now()
        for start in range(0, len(checked), chunk):
            part = checked[start : start + chunk]
            items = []
            for request in part:
                cert = build_unit_cert(
                    self.ca,
                    self._signer,
                    public_key=request.public_key,
                    serial=request.serial,
                    hostname=request.hostname,
                    validity=validity,
                    now=now,
                )
                check = "n/a" if request.modulus is None else "clean"
                items.append((request, cert, check, True))
            try:
                self._register(items, reissue=False)
            except (DuplicateError, WeakKeyError):
                # Someone registered a clashing unit meanwhile: go one by one.
                issued.extend(self._register_one_by_one(items, refused))
            else:
                issued.extend(self._issued(r, c, p) for r, c, p, _ in items)
            if on_progress is not None:
                on_progress(len(part))
        logger.info("issued %d units in a batch, refused %d", len(issued), len(refused))
        # Moduli that single issues queued are checked here too (DESIGN.md).
        flagged = self.check_prime_queue()
        return BatchOutcome(tuple(issued), tuple(refused), flagged)

    def _register_one_by_one(
        self,
        items: Sequence[tuple[CheckedRequest, x509.Certificate, str, bool]],
        refused: list[tuple[str, str]],
    ) -> list[IssuedUnit]:
        issued = []
        for item in items:
            try:
                self._register([item], reissue=False)
            except (DuplicateError, WeakKeyError) as error:
                refused.append((item[0].serial, str(error)))
            else:
                issued.append(self._issued(item[0], item[1], item[2]))
        return issued

    def _refuse_batch_taken(
        self, checked: list[CheckedRequest], refused: list[tuple[str, str]]
    ) -> list[CheckedRequest]:
        taken = self.registry.existing_serials([r.serial for r in checked])
        owners = self.registry.key_owners([r.spki_sha256 for r in checked])
        kept = []
        for request in checked:
            owner = owners.get(request.spki_sha256)
            if request.serial in taken:
                refused.append(
                    (request.serial, f"serial {request.serial} was already issued")
                )
            elif owner is not None:
                refused.append(
                    (request.serial, str(key_taken_error(request.spki_sha256, owner)))
                )
            else:
                kept.append(request)
        return kept

    def _refuse_batch_primes(
        self, checked: list[CheckedRequest], refused: list[tuple[str, str]]
    ) -> list[CheckedRequest]:
        rsa_requests = [r for r in checked if r.modulus is not None]
        if not rsa_requests:
            return checked
        with self.registry.transaction() as session:
            self._moduli.refresh(session)
        factors = primes.batch_shared_factors(
            [r.modulus for r in rsa_requests if r.modulus is not None],
            [self._moduli.total],
        )
        bad = {r.serial for r, f in zip(rsa_requests, factors, strict=True) if f != 1}
        for serial in sorted(bad):
            refused.append((serial, str(_shared_prime_error(serial, None))))
            logger.error("refused %s: its RSA key shares a prime factor", serial)
        return [r for r in checked if r.serial not in bad]

    def check_prime_queue(self, *, min_batch: int = 1) -> tuple[str, ...]:
        """Check queued moduli as one batch against the registry, under the lock.

        Args:
            min_batch: do nothing while fewer moduli than this are queued.

        Returns:
            The serials found to share a prime (now marked ``shared``).

        Raises:
            RegistryError: the database failed.
        """
        with self.registry.transaction() as session:
            count = session.execute(
                sa.select(sa.func.count()).where(UnitRow.prime_check == "queued")
            ).scalar_one()
            if count < max(min_batch, 1):
                return ()
            self.registry.lock_primes(session)
            rows = list(
                session.execute(
                    sa.select(UnitRow).where(UnitRow.prime_check == "queued")
                ).scalars()
            )
            self._moduli.refresh(session)
            moduli = [int.from_bytes(r.rsa_modulus or b"", "big") for r in rows]
            # The registry's product already holds the queued moduli; take them
            # out so that each is compared with everything else exactly once.
            queued = primes.product(moduli)
            rest = [self._moduli.total // queued]
            factors = primes.batch_shared_factors(moduli, rest)
            hits = [
                (row, modulus)
                for row, modulus, factor in zip(rows, moduli, factors, strict=True)
                if factor != 1
            ]
            for row in rows:
                row.prime_check = "clean"
            # The units they share with have factorable keys too.
            shared = self._partners(session, [modulus for _, modulus in hits])
            for row, _ in hits:
                shared.append(row)
            for row in shared:
                row.prime_check = "shared"
                logger.error(
                    "unit %s has an RSA key that shares a prime factor with another "
                    "unit's: revoke it and re-key it",
                    row.serial,
                )
        logger.info("checked %d queued moduli; %d share a prime", len(rows), len(hits))
        return tuple(sorted({row.serial for row in shared}))

    @staticmethod
    def _partners(session: sa.orm.Session, moduli: Sequence[int]) -> list[UnitRow]:
        """The registered units whose modulus shares a prime with one of ``moduli``."""
        if not moduli:
            return []
        found = []
        rows = session.execute(
            sa.select(UnitRow).where(UnitRow.rsa_modulus.is_not(None))
        ).scalars()
        for row in rows:
            mine = int.from_bytes(row.rsa_modulus or b"", "big")
            if any(m != mine and gmpy2.gcd(m, mine) != 1 for m in moduli):
                found.append(row)
        return found

    def _revoke_certificates(
        self,
        session: sa.orm.Session,
        serial: str,
        reason: x509.ReasonFlags,
        when: dt.datetime,
    ) -> int:
        rows = session.execute(
            sa.select(CertificateRow).where(
                CertificateRow.serial == serial, CertificateRow.revoked_at.is_(None)
            )
        ).scalars()
        count = 0
        for row in rows:
            row.revoked_at = when
            row.revocation_reason = reason.name
            count += 1
        return count

    def revoke(self, serial: str, reason: str) -> int:
        """Revoke every certificate of a unit and mark it revoked.

        Args:
            serial: the unit.
            reason: one of :data:`REVOCATION_REASONS`.

        Returns:
            How many certificates were revoked.

        Raises:
            InputError: no such unit, already revoked, or an unknown reason.
            RegistryError: the database failed.
        """
        if reason not in REVOCATION_REASONS:
            raise InputError(
                f"unknown revocation reason {reason!r}: use one of "
                + ", ".join(REVOCATION_REASONS)
            )
        serial = check_label("serial", serial)
        now = _now()
        with self.registry.transaction() as session:
            row = self.registry.unit(session, serial)
            if row is None:
                raise InputError(
                    f"no unit {serial} was issued by this factory: check the serial "
                    "with 'factory list'"
                )
            if row.status == "revoked":
                raise InputError(
                    f"unit {serial} is already revoked ({row.revocation_reason})"
                )
            count = self._revoke_certificates(
                session, serial, REVOCATION_REASONS[reason], now
            )
            row.status = "revoked"
            row.revoked_at = now
            row.revocation_reason = REVOCATION_REASONS[reason].name
        logger.info("revoked unit %s (%s, %d certificates)", serial, reason, count)
        return count

    def crl(self, *, next_update_days: int = 7) -> x509.CertificateRevocationList:
        """Sign a CRL of every revoked certificate that has not expired.

        Raises:
            RegistryError: the database failed.
        """
        now = _now()
        with self.registry.transaction() as session:
            number = self.registry.next_crl_number(session)
            rows = session.execute(
                sa.select(CertificateRow).where(
                    CertificateRow.revoked_at.is_not(None),
                    CertificateRow.not_after > now,
                )
            ).scalars()
            entries = [
                RevokedEntry(
                    cert_serial=int(row.cert_serial, 16),
                    revoked_at=row.revoked_at or now,
                    reason=x509.ReasonFlags[row.revocation_reason or "unspecified"],
                )
                for row in rows
            ]
        return build_crl(
            self.ca,
            self._signer,
            entries,
            number=number,
            now=now,
            next_update=dt.timedelta(days=next_update_days),
        )
