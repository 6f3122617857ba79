"""Proving control of a name: HTTP-01 on the unit's own HTTP port, DNS-01 by
RFC 2136 dynamic update (TSIG-signed, with dnspython) or by a hook command.

A hook is called as ``CMD present FQDN VALUE`` and later ``CMD cleanup FQDN
VALUE`` (the same arguments as lego's ``exec`` provider), with the same facts
in ``UNITCERT_ACME_ACTION``, ``UNITCERT_ACME_DOMAIN``,
``UNITCERT_ACME_TXT_NAME`` and ``UNITCERT_ACME_TXT_VALUE``. It must return
once the record is published.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time
from collections.abc import MutableMapping

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update

from unitcert.acme.settings import TsigKey
from unitcert.errors import AcmeError

__all__ = [
    "DnsHookSolver",
    "Http01Solver",
    "Rfc2136Solver",
]

logger = logging.getLogger(__name__)

_DNS_TIMEOUT = 5.0
_TXT_TTL = 60
# How long to wait for a published TXT record to be answered by the server.
_VISIBLE_WAIT = 30.0
_HOOK_TIMEOUT = 120.0


class Http01Solver:
    """Answers HTTP-01 from the mapping the plain-HTTP listener serves
    (:data:`unitcert.web.redirect.ACME_RESPONSES`).

    Args:
        responses: token to key authorization, read by the HTTP listener.
    """

    challenge_type = "http-01"

    def __init__(self, responses: MutableMapping[str, str]) -> None:
        self._responses = responses

    def present(self, identifier: str, name: str, token: str, validation: str) -> None:
        """Serve ``validation`` at ``/.well-known/acme-challenge/<token>``."""
        self._responses[token] = validation
        logger.debug("serving an HTTP-01 answer for %s", identifier)

    def cleanup(self, identifier: str, name: str, token: str, validation: str) -> None:
        """Stop serving it."""
        self._responses.pop(token, None)


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


class Rfc2136Solver:
    """Publishes TXT records by RFC 2136 dynamic update, signed with TSIG (RFC 8945).

    Args:
        host: the primary DNS server's address.
        port: its port.
        key: the TSIG key; its secret is never logged.
    """

    challenge_type = "dns-01"

    def __init__(self, host: str, port: int, key: TsigKey) -> None:
        self._host = host
        self._port = port
        self._keyname = dns.name.from_text(key.name)
        self._keyring = dns.tsigkeyring.from_text(
            {key.name: (key.algorithm, key.secret)}
        )
        self._algorithm = dns.name.from_text(key.algorithm)

    def _zone_of(self, record: dns.name.Name) -> dns.name.Name:
        """Ask the server which of its zones holds ``record`` (the SOA it answers)."""
        query = dns.message.make_query(record, dns.rdatatype.SOA)
        response = dns.query.udp(
            query, self._host, port=self._port, timeout=_DNS_TIMEOUT
        )
        for section in (response.answer, response.authority):
            for rrset in section:
                if rrset.rdtype == dns.rdatatype.SOA:
                    return rrset.name
        raise AcmeError(
            f"the DNS server {self._host}:{self._port} is not authoritative for "
            f"{record}: give the primary server of the zone with --dns-server",
            kind="settings",
        )

    def _update(self, record: dns.name.Name, value: str, *, add: bool) -> None:
        zone = self._zone_of(record)
        update = dns.update.UpdateMessage(
            zone,
            keyring=self._keyring,
            keyname=self._keyname,
            keyalgorithm=self._algorithm,
        )
        relative = record.relativize(zone)
        if add:
            update.add(relative, _TXT_TTL, "TXT", f'"{value}"')
        else:
            update.delete(relative, "TXT", f'"{value}"')
        response = dns.query.tcp(
            update, self._host, port=self._port, timeout=_DNS_TIMEOUT
        )
        if response.rcode() != dns.rcode.NOERROR:
            raise AcmeError(
                f"the DNS server {self._host}:{self._port} refused the update of "
                f"{record} ({dns.rcode.to_text(response.rcode())}): check the TSIG "
                "key and the zone's update policy",
                kind="settings",
            )

    def _visible(self, record: dns.name.Name, value: str) -> bool:
        query = dns.message.make_query(record, dns.rdatatype.TXT)
        response = dns.query.udp(
            query, self._host, port=self._port, timeout=_DNS_TIMEOUT
        )
        for rrset in response.answer:
            for rdata in rrset:
                if b"".join(getattr(rdata, "strings", ())) == value.encode("ascii"):
                    return True
        return False

    def present(self, identifier: str, name: str, token: str, validation: str) -> None:
        """Add the TXT record and wait until the server answers it.

        Raises:
            AcmeError: the server cannot be reached, refuses the update, or
                never answers the record.
        """
        record = _absolute(name)
        try:
            self._update(record, validation, add=True)
            deadline = time.monotonic() + _VISIBLE_WAIT
            while not self._visible(record, validation):
                if time.monotonic() > deadline:
                    raise AcmeError(
                        f"the DNS server {self._host}:{self._port} accepted the TXT "
                        f"record for {identifier} but does not answer it",
                        kind="settings",
                    )
                time.sleep(0.2)
        except (dns.exception.DNSException, OSError) as exc:
            raise AcmeError(
                f"cannot update the DNS server {self._host}:{self._port} "
                f"({type(exc).__name__}): check --dns-server and the TSIG key",
                kind="settings",
            ) from exc
        logger.info("published the DNS-01 TXT record for %s", identifier)

    def cleanup(self, identifier: str, name: str, token: str, validation: str) -> None:
        """Delete the TXT record; a failure is logged."""
        try:
            self._update(_absolute(name), validation, add=False)
        except (AcmeError, dns.exception.DNSException, OSError) as exc:
            logger.warning(
                "could not remove the TXT record for %s: %s", identifier, exc
            )


class DnsHookSolver:
    """Publishes TXT records through the owner's command (see the module docstring).

    Args:
        command: the hook command line.
    """

    challenge_type = "dns-01"

    def __init__(self, command: str) -> None:
        self._command = command

    def _run(self, action: str, identifier: str, name: str, value: str) -> None:
        fqdn = name.rstrip(".") + "."
        env = dict(os.environ)
        env.update(
            {
                "UNITCERT_ACME_ACTION": action,
                "UNITCERT_ACME_DOMAIN": identifier,
                "UNITCERT_ACME_TXT_NAME": fqdn,
                "UNITCERT_ACME_TXT_VALUE": value,
            }
        )
        try:
            done = subprocess.run(
                [*shlex.split(self._command), action, fqdn, value],
                env=env,
                capture_output=True,
                timeout=_HOOK_TIMEOUT,
                check=False,
            )
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            raise AcmeError(
                f"the DNS hook could not run for {identifier} ({type(exc).__name__}): "
                "check --dns-hook",
                kind="settings",
            ) from exc
        if done.returncode != 0:
            logger.debug("DNS hook output: %r", done.stderr[-2000:])
            raise AcmeError(
                f"the DNS hook failed to {action} the TXT record for {identifier} "
                f"(exit {done.returncode}): run it by hand to see why",
                kind="settings",
            )

    def present(self, identifier: str, name: str, token: str, validation: str) -> None:
        """Run ``CMD present FQDN VALUE``.

        Raises:
            AcmeError: the hook failed.
        """
        self._run("present", identifier, name, validation)
        logger.info("the DNS hook published the TXT record for %s", identifier)

    def cleanup(self, identifier: str, name: str, token: str, validation: str) -> None:
        """Run ``CMD cleanup FQDN VALUE``; a failure is logged."""
        try:
            self._run("cleanup", identifier, name, validation)
        except AcmeError as exc:
            logger.warning("%s", exc)
