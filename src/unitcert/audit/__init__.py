"""The fleet audit: shared, weak and known keys across every unit a maker shipped.

Sources (files and folders, live TLS hosts, and any object that follows the
:class:`~unitcert.audit.sources.Source` protocol, such as a factory registry)
yield key records; :func:`~unitcert.audit.runner.run_audit` finds the same
key on several units, RSA moduli that share a prime (batch GCD, see
:mod:`unitcert.quality.batchgcd`) and single-key weaknesses
(:func:`unitcert.quality.check_key`), and returns an
:class:`~unitcert.audit.runner.AuditReport` that :mod:`unitcert.audit.report`
prints, writes as JSON, or renders as HTML. ``unitcert audit`` is the command.
"""

from __future__ import annotations

from unitcert.audit.checks import KINDS, AffectedUnit, Finding
from unitcert.audit.runner import AuditReport, AuditSettings, Cohort, run_audit
from unitcert.audit.sources import (
    FileSource,
    HostSource,
    KeyRecord,
    Source,
    SourceProblem,
    key_record,
)

__all__ = [
    "KINDS",
    "AffectedUnit",
    "AuditReport",
    "AuditSettings",
    "Cohort",
    "FileSource",
    "Finding",
    "HostSource",
    "KeyRecord",
    "Source",
    "SourceProblem",
    "key_record",
    "run_audit",
]
