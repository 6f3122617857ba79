"""One ACME conversation, over certbot's ``acme`` library (``ClientV2``) and josepy.

All JWS signing and every ACME message come from the library. This module
adds what a unit needs around it:

- a bad nonce is retried for the request that got it (RFC 8555 section
  6.5), with the fresh nonce the error carried, never by starting a new
  order, and is never a failure for the backoff;
- polling that starts short (a quarter second) and honours ``Retry-After``;
- ``Retry-After`` of any error, and rate-limit errors, reach the caller;
- library and network errors become one :class:`~unitcert.errors.AcmeError`
  at this boundary.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import email.utils
import ipaddress
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import requests
from acme import challenges, messages
from acme import client as acme_client
from acme import errors as acme_errors
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.errors import DeserializationError
from josepy.jwa import ES256, ES384, RS256, JWASignature
from josepy.jwk import JWK, JWKEC, JWKRSA

from unitcert import __version__
from unitcert.acme.schedule import Window
from unitcert.errors import AcmeError
from unitcert.keys import PrivateKey

__all__ = [
    "AcmeClient",
    "Solver",
    "ari_cert_id",
]

logger = logging.getLogger(__name__)

_BAD_NONCE_ATTEMPTS = 10
_NETWORK_TIMEOUT = 30
# Polling starts fast (a CA that validates at once answers within a second)
# and slows down; the CA's Retry-After wins when it asks for more.
_POLL_DELAYS = (0.25, 0.25, 0.5, 1.0, 1.0, 2.0, 3.0)
_POLL_DELAY_MAX = 5.0
_ARI_DEFAULT_RECHECK = dt.timedelta(hours=6)
_ARI_MIN_RECHECK = dt.timedelta(minutes=10)
_ARI_MAX_RECHECK = dt.timedelta(days=1)
# RFC 8555 section 7.1.6: these authorization states are final and not valid.
_AUTHZ_FAILED = frozenset({"invalid", "deactivated", "expired", "revoked"})
_SHORT_LIVED_PROFILE = "shortlived"


class Solver(Protocol):
    """Publishes and removes the proof for one kind of challenge."""

    challenge_type: str

    def present(self, identifier: str, name: str, token: str, validation: str) -> None:
        """Publish ``validation`` for ``identifier``.

        Args:
            identifier: the DNS name or IP address being proven.
            name: the DNS name of the TXT record (dns-01) or the identifier.
            token: the challenge token (the HTTP-01 path's last part).
            validation: the key authorization (http-01) or the TXT value (dns-01).

        Raises:
            AcmeError: the proof could not be published.
        """

    def cleanup(self, identifier: str, name: str, token: str, validation: str) -> None:
        """Remove what :meth:`present` published; log, never raise."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def retry_after(headers: Any, now: dt.datetime) -> dt.datetime | None:
    """Read a ``Retry-After`` header (seconds or an HTTP date), or None."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    value = str(value).strip()
    if value.isdigit():
        return now + dt.timedelta(seconds=int(value))
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment


class _Network(acme_client.ClientNetwork):
    """The library's network layer, with per-request bad-nonce retries.

    It keeps the nonce of every answer, errors included (RFC 8555 section 6.5:
    a ``badNonce`` error carries a fresh one), and the last answer, whose
    ``Retry-After`` the library does not pass on with its errors.
    """

    def __init__(self, key: JWK, *, alg: JWASignature, verify: bool | str):
        # requests takes a CA bundle path where the library's annotation says bool.
        super().__init__(
            key=key,
            alg=alg,
            verify_ssl=cast(bool, verify),
            user_agent=f"unitcert/{__version__} acme-python",
            timeout=_NETWORK_TIMEOUT,
        )
        self.last_response: requests.Response | None = None
        self.sent = 0

    def _send_request(
        self, method: str, url: str, *args: Any, **kwargs: Any
    ) -> requests.Response:
        self.sent += 1
        response = super()._send_request(method, url, *args, **kwargs)
        self.last_response = response
        if not response.ok and self.REPLAY_NONCE_HEADER in response.headers:
            with contextlib.suppress(acme_errors.BadNonce):
                self._add_nonce(response)
        return response

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for attempt in range(1, _BAD_NONCE_ATTEMPTS + 1):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce" or attempt == _BAD_NONCE_ATTEMPTS:
                    raise
                logger.debug("the CA refused a nonce; sending the request again")
        raise AssertionError("unreachable")


def _jwk(key: PrivateKey) -> tuple[JWK, JWASignature]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size > 256:
            return JWKEC(key=key), ES384
        return JWKEC(key=key), ES256
    if isinstance(key, rsa.RSAPrivateKey):
        return JWKRSA(key=key), RS256
    raise ValueError(f"an ACME account key cannot be a {type(key).__name__}")


def _san(identifiers: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for identifier in identifiers:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(identifier)))
        except ValueError:
            names.append(x509.DNSName(identifier))
    return x509.SubjectAlternativeName(names)


def csr_pem(key: PrivateKey, identifiers: Sequence[str]) -> bytes:
    """A CSR with the identifiers in subjectAltName and an empty subject.

    No common name: an IP address there would be read as a DNS name.
    """
    algorithm: hashes.SHA256 | hashes.SHA384 = hashes.SHA256()
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        algorithm = hashes.SHA384()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(_san(identifiers), critical=False)
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def ari_cert_id(cert: x509.Certificate) -> str:
    """The certificate's identifier for ACME Renewal Information (RFC 9773,
    section 4.1): base64url of the authority key identifier, a dot, and
    base64url of the serial's DER integer bytes.

    Raises:
        ValueError: the certificate has no authority key identifier.
    """
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except x509.ExtensionNotFound:
        raise ValueError("the certificate has no authority key identifier") from None
    if aki.value.key_identifier is None:
        raise ValueError("the certificate's authority key identifier has no key id")
    serial = cert.serial_number
    serial_bytes = serial.to_bytes(math.ceil((serial.bit_length() + 1) / 8), "big")

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")

    return f"{b64(aki.value.key_identifier)}.{b64(serial_bytes)}"


@dataclass(frozen=True)
class RenewalInfo:
    """The CA's answer to a renewal-information request.

    Attributes:
        window: the suggested window.
        next_check: when to ask again.
    """

    window: Window
    next_check: dt.datetime


class AcmeClient:
    """One CA, one account key: account, orders, renewal information.

    Nothing is sent until a method needs it. Every method raises only
    :class:`~unitcert.errors.AcmeError` for what the CA or the network did.

    Args:
        directory_url: the CA's directory.
        account_key: the unit's account key.
        account_uri: the account's URL at this CA, when it is known.
        ca_bundle: a PEM file to verify the CA's TLS with, instead of the system's.
    """

    def __init__(
        self,
        directory_url: str,
        account_key: PrivateKey,
        *,
        account_uri: str | None = None,
        ca_bundle: Path | None = None,
    ) -> None:
        self.directory_url = directory_url
        self._jwk, alg = _jwk(account_key)
        self._net = _Network(
            self._jwk, alg=alg, verify=str(ca_bundle) if ca_bundle else True
        )
        self._client: acme_client.ClientV2 | None = None
        self.account_uri = account_uri
        self._host = urlsplit(directory_url).netloc

    @property
    def requests_sent(self) -> int:
        """HTTP requests this client has sent (for logs and benchmarks)."""
        return self._net.sent

    # --- boundary ---------------------------------------------------------

    @contextlib.contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        """Turn the library's and the network's errors into AcmeError."""
        try:
            yield
        except AcmeError:
            raise
        except messages.Error as exc:
            raise self._problem(exc, what) from exc
        except requests.exceptions.SSLError as exc:
            raise AcmeError(
                f"the ACME CA at {self._host} has a TLS certificate this unit does "
                f"not trust (while {what}): give its root with --ca-bundle",
                kind="network",
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise AcmeError(
                f"cannot reach the ACME CA at {self._host} while {what} "
                f"({type(exc).__name__}): check the unit's network and the "
                "directory URL",
                kind="network",
            ) from exc
        except (acme_errors.Error, DeserializationError, ValueError) as exc:
            raise AcmeError(
                f"the ACME CA at {self._host} sent an answer that cannot be used "
                f"while {what} ({type(exc).__name__}): check the directory URL",
                kind="refused",
            ) from exc

    def _problem(self, error: messages.Error, what: str) -> AcmeError:
        headers = self._net.last_response.headers if self._net.last_response else None
        wait = retry_after(headers, _now())
        detail = (error.detail or error.description or str(error)).rstrip(".")
        if error.code == "rateLimited":
            when = f" until {wait:%Y-%m-%d %H:%M} UTC" if wait else ""
            return AcmeError(
                f"the ACME CA's rate limit stopped {what}{when}: {detail}",
                kind="rate-limited",
                retry_after=wait,
            )
        return AcmeError(
            f"the ACME CA refused {what}: {detail} ({error.code or 'no error type'})",
            kind="refused",
            retry_after=wait,
        )

    # --- directory and account --------------------------------------------

    def client(self) -> acme_client.ClientV2:
        """The library's client, after one directory request.

        Raises:
            AcmeError: the directory cannot be fetched.
        """
        if self._client is None:
            with self._mapped("fetching the directory"):
                directory = acme_client.ClientV2.get_directory(
                    self.directory_url, self._net
                )
                self._client = acme_client.ClientV2(directory, self._net)
        return self._client

    def profiles(self) -> dict[str, str]:
        """The certificate profiles the directory lists (name to description)."""
        directory = self.client().directory
        try:
            meta = directory.meta
        except AttributeError:
            return {}
        return dict(getattr(meta, "profiles", None) or {})

    def choose_profile(
        self, requested: str | None, identifiers: Sequence[str]
    ) -> str | None:
        """The profile to order with: the requested one if the CA lists it; for
        an IP address, the CA's short-lived profile when it offers one (Let's
        Encrypt issues IP certificates only in it).

        Raises:
            AcmeError: the CA does not list the requested profile.
        """
        offered = self.profiles()
        if requested is not None:
            if requested not in offered:
                choices = ", ".join(sorted(offered)) or "none"
                raise AcmeError(
                    f"the ACME CA at {self._host} does not offer the profile "
                    f"{requested!r} (it offers: {choices}): change --profile",
                    kind="settings",
                )
            return requested
        has_ip = any(_is_ip(i) for i in identifiers)
        if has_ip and _SHORT_LIVED_PROFILE in offered:
            return _SHORT_LIVED_PROFILE
        return None

    def _register(self, email: str | None) -> None:
        client = self.client()
        registration = messages.NewRegistration.from_data(
            email=email, terms_of_service_agreed=True
        )
        with self._mapped("creating the account"):
            try:
                regr = client.new_account(registration)
                uri = regr.uri
            except acme_errors.ConflictError as exists:
                # The key already has an account here (RFC 8555 section 7.3.1).
                uri = exists.location
        if not uri:
            raise AcmeError(
                f"the ACME CA at {self._host} created an account but gave no URL "
                "for it",
                kind="refused",
            )
        self._net.account = messages.RegistrationResource(
            uri=uri, body=messages.Registration()
        )
        self.account_uri = uri
        logger.info("registered this unit's ACME account at %s", self._host)

    def ensure_account(self, email: str | None) -> str:
        """Use the known account, or register the key once.

        Returns:
            The account URL.

        Raises:
            AcmeError: the CA refused the account.
        """
        if self._net.account is None:
            if self.account_uri:
                self._net.account = messages.RegistrationResource(
                    uri=self.account_uri, body=messages.Registration()
                )
            else:
                self._register(email)
        assert self.account_uri is not None
        return self.account_uri

    # --- ordering ----------------------------------------------------------

    def issue(
        self,
        identifiers: Sequence[str],
        cert_key: PrivateKey,
        solver: Solver,
        *,
        email: str | None,
        profile: str | None,
        timeout: float = 90.0,
    ) -> bytes:
        """Order a certificate for ``identifiers`` and return its chain (PEM).

        Raises:
            AcmeError: the order failed; ``kind`` and ``retry_after`` say how.
        """
        deadline = time.monotonic() + timeout
        client = self.client()
        self.ensure_account(email)
        request = csr_pem(cert_key, identifiers)

        with self._mapped("creating the order"):
            try:
                order = client.new_order(request, profile=profile)
            except messages.Error as exc:
                if exc.code != "accountDoesNotExist":
                    raise
                # The CA forgot the account (a test CA restarted): register
                # the same key again, once.
                self._net.account = None
                self.account_uri = None
                self._register(email)
                order = client.new_order(request, profile=profile)
        logger.info("ordered a certificate for %s", ", ".join(identifiers))

        self._authorize(order, solver, deadline)
        chain = self._finalize(order, deadline)
        _check_chain(chain, cert_key, identifiers)
        return chain

    def _authorize(
        self, order: messages.OrderResource, solver: Solver, deadline: float
    ) -> None:
        client = self.client()
        pending: list[messages.AuthorizationResource] = []
        for authzr in order.authorizations:
            status = authzr.body.status.name
            if status in _AUTHZ_FAILED:
                ident = authzr.body.identifier.value
                raise AcmeError(
                    f"the ACME CA will not validate {ident} (authorization {status})",
                    kind="authorization",
                    failed_identifiers=(ident,),
                )
            if status != "valid":
                pending.append(authzr)

        published: list[tuple[str, str, str, str]] = []
        try:
            answers = []
            for authzr in pending:
                challb = self._challenge(authzr, solver.challenge_type)
                chall = cast(challenges.KeyAuthorizationChallenge, challb.chall)
                ident = str(authzr.body.identifier.value)
                response, validation = chall.response_and_validation(self._jwk)
                name = (
                    chall.validation_domain_name(ident)
                    if isinstance(chall, challenges.DNS01)
                    else ident
                )
                token = chall.encode("token")
                solver.present(ident, name, token, str(validation))
                published.append((ident, name, token, str(validation)))
                answers.append((challb, response))
            for challb, response in answers:
                with self._mapped("answering a challenge"):
                    client.answer_challenge(challb, response)
            self._poll_authorizations(pending, deadline)
        finally:
            for item in published:
                solver.cleanup(*item)

    def _challenge(
        self, authzr: messages.AuthorizationResource, kind: str
    ) -> messages.ChallengeBody:
        for challb in authzr.body.challenges:
            if challb.chall.typ == kind:
                return challb
        ident = authzr.body.identifier.value
        offered = ", ".join(c.chall.typ for c in authzr.body.challenges) or "none"
        raise AcmeError(
            f"the ACME CA offers no {kind} challenge for {ident} (it offers: "
            f"{offered}): change --challenge",
            kind="settings",
        )

    def _sleep(self, step: int, deadline: float, response: Any) -> None:
        delay = _POLL_DELAYS[step] if step < len(_POLL_DELAYS) else _POLL_DELAY_MAX
        asked = retry_after(getattr(response, "headers", None), _now())
        if asked is not None:
            delay = max(delay, (asked - _now()).total_seconds())
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AcmeError(
                f"the ACME CA at {self._host} did not finish the order in time: it "
                "is tried again later",
                kind="timeout",
            )
        time.sleep(min(delay, remaining))

    def _poll_authorizations(
        self, authzrs: list[messages.AuthorizationResource], deadline: float
    ) -> None:
        client = self.client()
        waiting = list(authzrs)
        failed: list[tuple[str, str]] = []
        step = 0
        response: Any = None
        while waiting:
            self._sleep(step, deadline, response)
            step += 1
            for authzr in list(waiting):
                with self._mapped("checking a validation"):
                    updated, response = client.poll(authzr)
                status = updated.body.status.name
                if status == "valid":
                    waiting.remove(authzr)
                elif status in _AUTHZ_FAILED:
                    waiting.remove(authzr)
                    failed.append(
                        (str(updated.body.identifier.value), _authz_error(updated))
                    )
        if failed:
            names = tuple(ident for ident, _ in failed)
            details = "; ".join(f"{ident}: {why}" for ident, why in failed)
            raise AcmeError(
                f"the ACME CA could not validate {', '.join(names)} ({details})",
                kind="authorization",
                failed_identifiers=names,
            )

    def _post_as_get(self, url: str) -> requests.Response:
        client = self.client()
        return self._net.post(url, None, new_nonce_url=client.directory["newNonce"])

    def _finalize(self, order: messages.OrderResource, deadline: float) -> bytes:
        client = self.client()
        with self._mapped("finalizing the order"):
            body = client.begin_finalization(order).body
        step = 0
        response: Any = None
        while body.status.name in ("pending", "ready", "processing"):
            self._sleep(step, deadline, response)
            step += 1
            with self._mapped("checking the order"):
                response = self._post_as_get(order.uri)
                body = messages.Order.from_json(response.json())
        if body.status.name != "valid" or not body.certificate:
            detail = body.error.detail if body.error is not None else "no reason given"
            state = body.status.name
            raise AcmeError(
                f"the ACME CA did not issue the certificate ({state}: {detail})",
                kind="refused",
            )
        with self._mapped("downloading the certificate"):
            return self._post_as_get(body.certificate).content

    # --- renewal information ----------------------------------------------

    def renewal_info(self, cert: x509.Certificate) -> RenewalInfo | None:
        """The CA's suggested renewal window (RFC 9773), or None when the CA
        offers no renewal information.

        Raises:
            AcmeError: the CA offers it but the request failed.
        """
        directory = self.client().directory
        try:
            base = str(directory["renewalInfo"])
        except KeyError:
            return None
        try:
            url = f"{base.rstrip('/')}/{ari_cert_id(cert)}"
        except ValueError:
            return None
        now = _now()
        with self._mapped("asking for renewal information"):
            response = self._net.get(url, content_type=self._net.JSON_CONTENT_TYPE)
            info = messages.RenewalInfo.from_json(response.json())
        window = info.suggested_window
        start, end = _aware(window.start), _aware(window.end)
        if end < start:
            raise AcmeError(
                f"the ACME CA at {self._host} suggested a renewal window that ends "
                "before it starts",
                kind="refused",
            )
        asked = retry_after(response.headers, now)
        wait = (asked - now) if asked is not None else _ARI_DEFAULT_RECHECK
        wait = min(max(wait, _ARI_MIN_RECHECK), _ARI_MAX_RECHECK)
        return RenewalInfo(Window(start, end, from_ca=True), now + wait)


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _is_ip(identifier: str) -> bool:
    try:
        ipaddress.ip_address(identifier)
    except ValueError:
        return False
    return True


def _authz_error(authzr: messages.AuthorizationResource) -> str:
    for challb in authzr.body.challenges:
        if challb.error is not None:
            error = challb.error
            return str(error.detail or error.description or error.code)
    return f"authorization {authzr.body.status.name}"


def _check_chain(chain: bytes, key: PrivateKey, identifiers: Sequence[str]) -> None:
    """Check that the CA sent a chain for our key and every identifier.

    Raises:
        AcmeError: it did not.
    """
    try:
        certs = x509.load_pem_x509_certificates(chain)
    except ValueError:
        certs = []
    if not certs:
        raise AcmeError(
            "the ACME CA sent a certificate that cannot be read", kind="refused"
        )
    leaf = certs[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(
        der, spki
    ):
        raise AcmeError(
            "the ACME CA sent a certificate for another key", kind="refused"
        )
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = {n.lower() for n in san.value.get_values_for_type(x509.DNSName)}
        names |= {str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)}
    except x509.ExtensionNotFound:
        names = set()
    missing = [i for i in identifiers if i not in names]
    if missing:
        raise AcmeError(
            f"the ACME CA sent a certificate without {', '.join(missing)}",
            kind="refused",
        )
