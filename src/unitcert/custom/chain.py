"""Verifying a customer's chain with ``cryptography.x509.verification``.

The path is built and checked by cryptography's verifier (RFC 5280 with the
CA/Browser Forum's profile), never by hand. Its extension policy is relaxed
where customers' own CAs commonly differ from the public web's profile and
browsers still accept them under a privately installed root:

- a leaf without authorityKeyIdentifier;
- a CA (most often the root) without keyUsage, or with a basicConstraints
  extension that is not marked critical; a CA whose keyUsage is present must
  still allow keyCertSign.

The unit's own names are not checked here (see :mod:`unitcert.custom.check`),
so that the owner can install a certificate for other names on purpose.

Which certificate is trusted as the top of the chain:

- the certificates of ``--ca-file``, when given;
- else a self-signed CA certificate among the given ones (the customer
  included the root);
- else, when the files end at an intermediate, that intermediate: the unit is
  not the party that trusts the chain, its clients are, and they hold the
  root. What the unit can and does check is that the leaf chains, through the
  given certificates, up to the one it will serve last, so that a client
  holding the root can build the path. A leaf alone whose issuer is not given
  is refused, naming the missing issuer.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    Subject,
    VerificationError,
)

from unitcert.errors import InputError

__all__ = [
    "VerifiedChain",
    "ca_extension_policy",
    "ee_extension_policy",
    "is_ca",
    "is_self_signed",
    "short_name",
    "verify_chain",
]

logger = logging.getLogger(__name__)

_MIN_RSA_BITS = 2048
# Deeper than any real chain; bounds the walk that explains a failure.
_MAX_DEPTH = 8


@dataclass(frozen=True)
class VerifiedChain:
    """A chain that cryptography's verifier accepted.

    Attributes:
        served: what the unit serves: the leaf, then the CAs up to, without,
            a self-signed root.
        anchor: the certificate trusted as the top of the chain.
        anchor_is_root: True when the anchor is self-signed (a root), so it is
            not served; False when it is the top intermediate of the files.
    """

    served: tuple[x509.Certificate, ...]
    anchor: x509.Certificate
    anchor_is_root: bool


def short_name(name: x509.Name) -> str:
    """Return a name as people say it: its common name, else the whole name."""
    common = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common:
        value = common[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return name.rfc4514_string() or "(empty name)"


def is_ca(cert: x509.Certificate) -> bool:
    """Say whether ``cert`` is a CA certificate (basicConstraints cA true)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def is_self_signed(cert: x509.Certificate) -> bool:
    """Say whether ``cert`` names itself as issuer and carries its own signature."""
    if cert.subject != cert.issuer:
        return False
    return _signed_by(cert, cert)


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _check_basic_constraints(
    _: Policy, cert: x509.Certificate, value: x509.BasicConstraints
) -> None:
    if not value.ca:
        raise ValueError(f"{short_name(cert.subject)} is not a CA certificate")


def _check_ca_key_usage(
    _: Policy, cert: x509.Certificate, value: x509.KeyUsage | None
) -> None:
    if value is not None and not value.key_cert_sign:
        raise ValueError(
            f"the key usage of {short_name(cert.subject)} does not allow signing "
            "certificates"
        )


def ca_extension_policy() -> ExtensionPolicy:
    """The CA policy: the Web PKI's, relaxed for private roots (see module doc)."""
    return (
        ExtensionPolicy.webpki_defaults_ca()
        .require_present(
            x509.BasicConstraints, Criticality.AGNOSTIC, _check_basic_constraints
        )
        .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _check_ca_key_usage)
    )


def ee_extension_policy() -> ExtensionPolicy:
    """The leaf policy: the Web PKI's, with authorityKeyIdentifier optional."""
    return ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None
    )


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _without(
    certs: Sequence[x509.Certificate], removed: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    gone = {_der(c) for c in removed}
    return [c for c in certs if _der(c) not in gone]


def _anchors(
    leaf: x509.Certificate,
    others: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> list[x509.Certificate]:
    """Choose what to trust as the top of the chain (see the module doc)."""
    if roots:
        return list(roots)
    given_roots = [c for c in others if is_ca(c) and is_self_signed(c)]
    if given_roots:
        return given_roots
    if not others:
        if is_self_signed(leaf):
            return [leaf]
        raise InputError(
            f"the certificate of its issuer, {short_name(leaf.issuer)}, is missing: "
            "add the issuer's certificate to the file, or give the root with "
            "--ca-file"
        )
    subjects = {c.subject for c in others}
    return [c for c in others if c.issuer not in subjects] or list(others)


def _subject(name: str) -> Subject:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _when(moment: dt.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _explain_link(
    child: x509.Certificate,
    pool: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
) -> x509.Certificate:
    """Return the given certificate that issued ``child``, or raise why none did."""
    who, issuer = short_name(child.subject), short_name(child.issuer)
    named = [c for c in pool if c.subject == child.issuer]
    if not named:
        if roots:
            root_names = ", ".join(short_name(r.subject) for r in roots)
            raise InputError(
                f"the chain does not lead to the given root ({root_names}): {who} was "
                f"issued by {issuer}, whose certificate is missing; add it to the file"
            )
        raise InputError(
            f"the certificate of {issuer}, which issued {who}, is missing: add it "
            "to the file, or give the root with --ca-file"
        )
    signers = [c for c in named if _signed_by(child, c)]
    if not signers:
        raise InputError(
            f"{who} names {issuer} as its issuer, but the {issuer} certificate given "
            "did not sign it (same name, other key): give the matching CA certificate"
        )
    signer = signers[0]
    name = short_name(signer.subject)
    if not is_ca(signer):
        raise InputError(
            f"{name} is not a CA certificate, so it cannot have issued {who}: give "
            "the chain from your CA"
        )
    if signer.not_valid_after_utc < now:
        raise InputError(
            f"the CA certificate {name} expired on {_when(signer.not_valid_after_utc)}:"
            " get the current chain from your CA"
        )
    if signer.not_valid_before_utc > now:
        raise InputError(
            f"the CA certificate {name} is not valid before "
            f"{_when(signer.not_valid_before_utc)}: check the unit's clock, or get "
            "the current chain from your CA"
        )
    try:
        usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise InputError(
            f"the key usage of the CA certificate {name} does not allow it to sign "
            "certificates: get the right chain from your CA"
        )
    key = signer.public_key()
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
        raise InputError(
            f"the CA certificate {name} has an RSA key of {key.key_size} bits, under "
            f"the {_MIN_RSA_BITS} bits that browsers require: re-issue the chain "
            "with a stronger CA key"
        )
    return signer


def _explain(
    leaf: x509.Certificate,
    others: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    now: dt.datetime,
    reason: str,
) -> InputError:
    """Say why the verifier refused the chain, naming the certificate at fault.

    This only walks issuer names to word the error; the verifier decided.
    """
    pool = list(others) + _without(roots, others)
    anchor_der = {_der(a) for a in anchors}
    current = leaf
    seen = {_der(leaf)}
    for _ in range(_MAX_DEPTH):
        if _der(current) in anchor_der or (
            current is not leaf and is_self_signed(current)
        ):
            break
        current = _explain_link(
            current, [c for c in pool if _der(c) not in seen], roots, now
        )
        seen.add(_der(current))
    if roots and _der(current) not in anchor_der:
        root_names = ", ".join(short_name(r.subject) for r in roots)
        return InputError(
            f"the chain leads to the root {short_name(current.subject)}, not to the "
            f"root given ({root_names}): give the root of this chain"
        )
    detail = reason.split(" (encountered")[0]
    for prefix in ("validation failed: ", "candidates exhausted: "):
        detail = detail.removeprefix(prefix)
    return InputError(
        f"the certificate chain did not verify ({detail}): get the full chain from "
        "your CA again"
    )


def verify_chain(
    leaf: x509.Certificate,
    others: Sequence[x509.Certificate],
    *,
    roots: Sequence[x509.Certificate] = (),
    name: str,
    now: dt.datetime,
) -> VerifiedChain:
    """Verify that ``leaf`` chains through ``others`` to a trusted top.

    Args:
        leaf: the certificate for the unit's key.
        others: the other certificates given with it, in any order.
        roots: the roots given with ``--ca-file`` (empty: see the module doc).
        name: a name the leaf is valid for, as the verifier needs one; the
            unit's own names are checked elsewhere.
        now: the time of verification.

    Raises:
        InputError: the chain cannot be built or verified; the message names
            the missing, unrelated, expired or wrong certificate when it can.
    """
    anchors = _anchors(leaf, others, roots)
    intermediates = _without(others, [*anchors, leaf])
    builder = (
        PolicyBuilder()
        .store(Store(anchors))
        .time(now)
        .max_chain_depth(_MAX_DEPTH)
        .extension_policies(
            ca_policy=ca_extension_policy(), ee_policy=ee_extension_policy()
        )
    )
    try:
        verifier = builder.build_server_verifier(_subject(name))
    except ValueError as exc:
        raise InputError(
            f"the certificate's name {name!r} is not a valid host name: ask your CA "
            "for a certificate with proper DNS names"
        ) from exc
    try:
        path = verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        logger.debug("the verifier refused the chain: %s", exc)
        raise _explain(leaf, others, roots, anchors, now, str(exc)) from exc

    anchor = path[-1]
    in_path = {_der(c) for c in path}
    for cert in others:
        if _der(cert) in in_path:
            continue
        if not is_ca(cert):
            raise InputError(
                f"the files hold a second server certificate, "
                f"{short_name(cert.subject)}, besides the one for the key: give "
                "only the certificate that belongs to the key, with its chain"
            )
        raise InputError(
            f"the CA certificate {short_name(cert.subject)} is not part of the chain "
            f"from {short_name(leaf.subject)} to {short_name(anchor.subject)}: "
            "remove it from the file"
        )
    root = is_self_signed(anchor) and len(path) > 1
    served = tuple(path[:-1]) if root else tuple(path)
    return VerifiedChain(served=served, anchor=anchor, anchor_is_root=root)
