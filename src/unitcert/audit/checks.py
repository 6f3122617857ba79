"""The audit's findings, and the checks that make them.

Three checks run over the records of every source:

* :func:`find_duplicate_keys`: the same key on more than one unit (any key
  type; for RSA, the same modulus, whatever the exponent);
* :func:`find_shared_primes`: RSA moduli that share a prime with another,
  from the batch GCD's shared factors (each such modulus is factored);
* :func:`check_single_keys`: :func:`unitcert.quality.check_key` on every
  distinct key (ROCA, Fermat, small factors, published and blocklisted keys,
  invalid or small RSA parameters).

A unit seen twice (the same unit name from two files, the same certificate
from a file and from a live host, the same serial and key in a registry and
a reissued certificate) is one unit: it is not a duplicate of itself. The
same certificate on two hosts or in two files is two units
(:func:`distinct_units`).

Findings never carry a private key or a prime: a shared prime is named by
the first 16 hex digits of its SHA-256.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import hashlib
import logging
import multiprocessing
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from unitcert import quality
from unitcert.audit.sources import KeyRecord
from unitcert.quality.batchgcd import SharedFactor

__all__ = [
    "KINDS",
    "AffectedUnit",
    "Finding",
    "check_single_keys",
    "distinct_units",
    "find_duplicate_keys",
    "find_shared_primes",
]

logger = logging.getLogger(__name__)

KINDS: dict[str, str] = {
    "duplicate-key": "Same key on several units",
    "shared-prime": "Shared RSA prime (keys factored)",
    "roca": "ROCA (CVE-2017-15361)",
    "fermat": "Fermat-close primes",
    "smallfactors": "Small prime factor",
    "published": "Published example key",
    "blocklist": "Known compromised key (badkeys list)",
    "sharedprimes": "Prime known from public keys",
    "rsainvalid": "Invalid RSA parameters",
    "rsasize": f"RSA key under {quality.MIN_RSA_BITS} bits",
    "rsapoly": "Modulus with a factorable pattern",
    "smalld": "Small private exponent",
}
"""Every kind of finding and its short title, in the order reports list them."""

_CHECK_CHUNK = 256


@dataclass(frozen=True)
class AffectedUnit:
    """A unit named by a finding.

    Attributes:
        name: the unit's name (serial, file path, ``host:port``).
        source: ``"file"``, ``"host"`` or ``"registry"``.
        locations: every place its key was read.
        key_type: the type of its key, e.g. ``"RSA-2048"``.
        code: the fingerprint code of its key.
        subject: its certificate's or CSR's subject, when known.
        batch: its production batch, when known.
        issued: the date its certificate was issued, when known.
    """

    name: str
    source: str
    locations: tuple[str, ...]
    key_type: str
    code: str
    subject: str | None
    batch: str | None
    issued: dt.date | None


@dataclass(frozen=True)
class Finding:
    """One thing the audit found, and the units it concerns.

    Attributes:
        kind: one of :data:`KINDS`.
        detail: a sentence that says what was found and what it means.
        units: the units concerned, sorted by name.
        key_type: the key type involved (the first unit's, for mixed ones).
        factored: True when the audit knows the private key of these units'
            keys (a shared prime, Fermat, small factors): replace them first.
        factor_id: for a shared prime, the first 16 hex digits of its
            SHA-256, so that findings can be told apart without the prime.
    """

    kind: str
    detail: str
    units: tuple[AffectedUnit, ...]
    key_type: str
    factored: bool = False
    factor_id: str | None = None

    @property
    def title(self) -> str:
        """The kind's short title."""
        return KINDS.get(self.kind, self.kind)


def distinct_units(records: Iterable[KeyRecord]) -> list[list[KeyRecord]]:
    """Group records into units.

    Records are one unit when any of these holds:

    * they have the same unit name (the same file, host or serial);
    * they come from files that differ only in their extension and carry the
      same key under the same subject (or one of them has none): a unit's
      certificate and its CSR or public key. Different keys, or the same key
      under two subjects, in ``x.pem`` and ``x.der`` are two units;
    * they carry the same certificate, seen once in each of several kinds of
      source (a unit's certificate in a file and served by one live host);
    * they state the same unit serial for the same key (a reissued
      certificate in two files, a registry entry and the unit serving it).

    Distinct names within one kind of source are distinct units even when
    they carry the very same certificate: the same certificate on two hosts,
    or in two firmware images, is the shared default certificate that the
    audit exists to find, so its serial (often fixed in such a certificate)
    merges nothing either.

    Returns:
        The groups, each a list of records, ordered by first appearance.
    """
    items = list(records)
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(indices: Iterable[int]) -> None:
        first = None
        for index in indices:
            if first is None:
                first = find(index)
            else:
                parent[find(index)] = first

    by_name: dict[str, list[int]] = {}
    by_cert: dict[str, list[int]] = {}
    for index, record in enumerate(items):
        by_name.setdefault(record.unit, []).append(index)
        if record.cert_sha256 is not None:
            by_cert.setdefault(record.cert_sha256, []).append(index)
    for indices in by_name.values():
        join(indices)

    by_stem: dict[tuple[str, tuple[str, object]], list[int]] = {}
    for index, record in enumerate(items):
        if record.source == "file":
            key = (_file_stem(record.unit), _key_identity(record))
            by_stem.setdefault(key, []).append(index)
    for indices in by_stem.values():
        subjects = {items[i].subject for i in indices} - {None}
        if len(indices) > 1 and len(subjects) <= 1:
            join(indices)

    shared_certs = set()
    for cert, indices in by_cert.items():
        names_by_source: dict[str, set[str]] = {}
        for index in indices:
            names_by_source.setdefault(items[index].source, set()).add(
                items[index].unit
            )
        if any(len(names) > 1 for names in names_by_source.values()):
            shared_certs.add(cert)
        else:
            join(indices)

    by_serial: dict[tuple[str, tuple[str, object]], list[int]] = {}
    for index, record in enumerate(items):
        if record.serial is not None and record.cert_sha256 not in shared_certs:
            key = (record.serial, _key_identity(record))
            by_serial.setdefault(key, []).append(index)
    for indices in by_serial.values():
        join(indices)

    # Indices ascend, so the groups come out in order of first appearance.
    groups: dict[int, list[KeyRecord]] = {}
    for index, record in enumerate(items):
        groups.setdefault(find(index), []).append(record)
    return list(groups.values())


_NUMBERED = re.compile(r"(.*?)(#\d+)", re.DOTALL)


def _file_stem(unit: str) -> str:
    """``dir/unit-42.pem`` -> ``dir/unit-42``; ``dir/b.pem#2`` -> ``dir/b#2``."""
    match = _NUMBERED.fullmatch(unit)
    path, number = (match.group(1), match.group(2)) if match else (unit, "")
    return os.path.splitext(path)[0] + number


def _affected(group: Sequence[KeyRecord]) -> AffectedUnit:
    first = group[0]
    issued = next((r.issued for r in group if r.issued is not None), None)
    return AffectedUnit(
        name=first.unit,
        source=first.source,
        locations=tuple(dict.fromkeys(r.location for r in group)),
        key_type=first.key_type,
        code=first.code,
        subject=next((r.subject for r in group if r.subject), None),
        batch=next((r.batch for r in group if r.batch), None),
        issued=issued.date() if issued is not None else None,
    )


def _units(records: Iterable[KeyRecord]) -> tuple[AffectedUnit, ...]:
    return tuple(
        sorted((_affected(g) for g in distinct_units(records)), key=lambda u: u.name)
    )


def _key_identity(record: KeyRecord) -> tuple[str, object]:
    # An RSA key is its modulus: two units with the same n know each other's
    # private key, whatever their public exponents.
    if record.rsa_n is not None:
        return ("rsa", record.rsa_n)
    return ("key", record.key_id)


def find_duplicate_keys(records: Sequence[KeyRecord]) -> list[Finding]:
    """Find keys that more than one unit carries.

    Returns:
        One finding per shared key, naming every unit that carries it.
    """
    groups: dict[tuple[str, object], list[KeyRecord]] = {}
    for record in records:
        groups.setdefault(_key_identity(record), []).append(record)
    findings = []
    for group in groups.values():
        if len(group) < 2:
            continue
        units = _units(group)
        if len(units) < 2:
            continue
        exponents = {r.rsa_e for r in group if r.rsa_e is not None}
        same = "RSA modulus" if len(exponents) > 1 else "key"
        detail = (
            f"{len(units)} units carry the same {same} ({group[0].key_type}, "
            f"code {group[0].code}), so each can impersonate the others and read "
            "their traffic"
        )
        if len(exponents) > 1:
            detail += " (their public exponents differ, the private key is the same)"
        certificates = {r.cert_sha256 for r in group}
        if len(certificates) == 1 and None not in certificates:
            detail += (
                "; it is the very same certificate on each, as a default "
                "certificate built into the firmware is"
            )
        findings.append(Finding("duplicate-key", detail, units, group[0].key_type))
    return findings


def _factor_id(factor: int) -> str:
    size = max(1, (factor.bit_length() + 7) // 8)
    return hashlib.sha256(factor.to_bytes(size, "big")).hexdigest()[:16]


def find_shared_primes(
    moduli: Sequence[int],
    by_modulus: dict[int, list[KeyRecord]],
    shared: Sequence[SharedFactor],
) -> list[Finding]:
    """Turn the batch GCD's shared factors into findings.

    Args:
        moduli: the distinct moduli given to the batch GCD, in order.
        by_modulus: the records of each modulus.
        shared: :func:`unitcert.quality.batchgcd.split_shared`'s result.

    Returns:
        One finding per shared factor whose moduli are confirmed to be
        divisible by it, naming every unit whose key it factors.
    """
    findings = []
    for item in shared:
        group_moduli = [moduli[i] for i in item.indices]
        if not all(1 < item.factor < n and n % item.factor == 0 for n in group_moduli):
            logger.warning(
                "a shared factor (%s) did not divide its moduli; dropped",
                _factor_id(item.factor),
            )
            continue
        records = [r for n in group_moduli for r in by_modulus[n]]
        units = _units(records)
        what = "prime" if item.prime else "factor"
        detail = (
            f"{len(group_moduli)} RSA moduli on {len(units)} unit"
            f"{'' if len(units) == 1 else 's'} share a {what} "
            f"({item.factor.bit_length()} bits), so anyone holding the public keys "
            "can compute their private keys: each of these keys is factored"
        )
        findings.append(
            Finding(
                "shared-prime",
                detail,
                units,
                records[0].key_type,
                factored=True,
                factor_id=_factor_id(item.factor),
            )
        )
    return findings


_FACTORING_CHECKS = {"fermat", "smallfactors", "sharedprimes"}


def _check_one(
    spki_der: bytes, loadable: bool, n: int | None, e: int | None
) -> tuple[tuple[str, str], ...]:
    if loadable:
        public_key = serialization.load_der_public_key(spki_der)
        if isinstance(public_key, quality.PublicKey):
            found = quality.check_key(public_key)
        else:
            found = ()
    elif n is not None and e is not None:
        if n < 3:
            # badkeys divides by the modulus's size: a modulus of 0, 1, 2 or
            # below is not an RSA key at all, which is the whole finding.
            return (
                ("rsainvalid", f"its RSA modulus {n} is not a modulus (it is under 3)"),
            )
        found = quality.check_rsa_numbers(n, e)
    else:
        found = ()
    return tuple((f.check, f.detail) for f in found)


def _check_chunk(
    items: list[tuple[bytes, bool, int | None, int | None]],
) -> list[tuple[tuple[str, str], ...]]:
    return [_check_one(*item) for item in items]


def check_single_keys(
    records: Sequence[KeyRecord],
    *,
    jobs: int = 1,
    advance: Callable[[int], None] | None = None,
) -> list[Finding]:
    """Run the single-key checks once per distinct key.

    Args:
        records: every record of the audit.
        jobs: how many processes to check keys in.
        advance: called with how many keys were checked since the last call.

    Returns:
        One finding per weak key and check, naming every unit with that key.
    """
    by_key: dict[str, list[KeyRecord]] = {}
    for record in records:
        by_key.setdefault(record.key_id, []).append(record)
    keys = list(by_key)
    items = [
        (r.spki_der, r.loadable, r.rsa_n, r.rsa_e) for r in (by_key[k][0] for k in keys)
    ]
    chunks = [items[i : i + _CHECK_CHUNK] for i in range(0, len(items), _CHECK_CHUNK)]

    results: list[tuple[tuple[str, str], ...]] = []
    if jobs <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            results.extend(_check_chunk(chunk))
            if advance is not None:
                advance(len(chunk))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            for chunk, outcome in zip(
                chunks, pool.map(_check_chunk, chunks), strict=True
            ):
                results.extend(outcome)
                if advance is not None:
                    advance(len(chunk))

    findings = []
    for key, found in zip(keys, results, strict=True):
        group = by_key[key]
        for check, detail in found:
            units = _units(group)
            findings.append(
                Finding(
                    check,
                    f"{len(units)} unit{'' if len(units) == 1 else 's'} with this "
                    f"{group[0].key_type} key (code {group[0].code}): {detail}",
                    units,
                    group[0].key_type,
                    factored=check in _FACTORING_CHECKS,
                )
            )
    return findings
