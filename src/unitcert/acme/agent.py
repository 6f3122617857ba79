"""The ACME agent that runs inside ``serve``: orders, renews, backs off, installs.

``serve`` is the only process that talks to an ACME CA (DESIGN.md). Other
commands write the settings and an "order now" request into the local part
and wait for the agent to record the outcome there. Every change goes
through one locked read-modify-write of the local part, so a request written
while an order runs is never lost.

Files in the local part::

    acme-settings.json     the owner's settings (settings.py)
    acme-ca-bundle.pem     the CA's root, when the owner gave one
    acme-tsig.key          the TSIG key for RFC 2136 updates (secret)
    acme-account-key.pem   the unit's one account key, kept across --off
    acme-account.json      the account's URL at each CA it was used with
    acme-state.json        backoff, limits, renewal plan, last outcome (schedule.py)
    acme-key.pem, acme-chain.pem   the certificate (device.LOCAL_SOURCES)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import secrets
import shlex
import subprocess
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from cryptography import x509

from unitcert import certs, device, keys
from unitcert.acme.schedule import (
    DEFAULT_RATE_LIMIT_WAIT,
    STATE_FILE,
    AcmeState,
    CertFacts,
    Decision,
    Order,
    Outcome,
    Request,
    Window,
    backoff_delay,
    decide,
    pick_renewal_time,
    renewal_window,
)
from unitcert.acme.settings import (
    CA_BUNDLE_FILE,
    SETTINGS_FILE,
    TSIG_FILE,
    AcmeSettings,
    parse_dns_server,
    parse_tsig_key,
)
from unitcert.errors import AcmeError, StateError, UnitcertError
from unitcert.store import Generation, Part, StateStore

if TYPE_CHECKING:
    from unitcert.acme.client import AcmeClient, Solver

__all__ = [
    "ACCOUNT_FILE",
    "ACCOUNT_KEY_FILE",
    "AcmeAgent",
    "AcmeStatus",
    "load_cert",
    "load_settings",
    "load_state",
    "load_status",
    "request_order",
    "run_agent",
    "save_settings",
    "serve_running",
    "turn_off",
]

logger = logging.getLogger(__name__)

ACCOUNT_KEY_FILE = "acme-account-key.pem"
ACCOUNT_FILE = "acme-account.json"
SERVE_LOCK_FILE = "serve.pid"
_KEY_FILE, _CHAIN_FILE = device.LOCAL_SOURCES["acme"]
# How often the serving loop looks for a new request, and the longest it
# sleeps between two looks at the schedule (a clock that jumps is noticed).
_POLL = 0.25
_LONGEST_SLEEP = 3600.0
_ARI_RETRY = dt.timedelta(hours=1)
_NO_ARI_RECHECK = dt.timedelta(days=1)
_HOOK_TIMEOUT = 300.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fmt(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- reading the local part --------------------------------------------------


def load_settings(local: Generation | None) -> AcmeSettings | None:
    """The ACME settings in a local generation, or None.

    Raises:
        StateError: they are damaged.
    """
    if local is None or not local.has(SETTINGS_FILE):
        return None
    return AcmeSettings.from_json(local.read(SETTINGS_FILE))


def load_state(local: Generation | None) -> AcmeState:
    """The ACME record in a local generation (empty when there is none).

    Raises:
        StateError: it is damaged.
    """
    if local is None or not local.has(STATE_FILE):
        return AcmeState()
    return AcmeState.from_json(local.read(STATE_FILE))


def _state_in(files: dict[str, bytes]) -> AcmeState:
    data = files.get(STATE_FILE)
    return AcmeState.from_json(data) if data is not None else AcmeState()


def _facts(cert: x509.Certificate) -> CertFacts:
    info = certs.cert_info(cert)
    return CertFacts(
        identifiers=frozenset(n.lower() for n in info.names),
        not_before=info.not_before,
        not_after=info.not_after,
        serial=f"{cert.serial_number:x}",
    )


def load_cert(local: Generation | None) -> x509.Certificate | None:
    """The ACME leaf certificate in a local generation, or None when there is
    none or it cannot be read."""
    if local is None or not local.has(_CHAIN_FILE):
        return None
    try:
        return x509.load_pem_x509_certificates(local.read(_CHAIN_FILE))[0]
    except (ValueError, IndexError):
        logger.warning("the stored ACME certificate cannot be read; ordering anew")
        return None


def _update_local(
    store: StateStore, change: Callable[[dict[str, bytes]], None]
) -> dict[str, bytes]:
    """Read the local part, apply ``change``, commit if anything changed; all
    under the state's lock."""
    with store.lock():
        local = store.current(Part.LOCAL)
        files = local.files() if local is not None else {}
        before = dict(files)
        change(files)
        if files != before:
            store.commit(Part.LOCAL, files)
    return files


def _mutate_state(
    store: StateStore, change: Callable[[AcmeState], AcmeState]
) -> AcmeState:
    result: list[AcmeState] = []

    def apply(files: dict[str, bytes]) -> None:
        state = change(_state_in(files))
        files[STATE_FILE] = state.to_json()
        result.append(state)

    _update_local(store, apply)
    return result[0]


# --- what other commands write ------------------------------------------------


def save_settings(
    store: StateStore,
    settings: AcmeSettings,
    *,
    ca_bundle: bytes | None,
    tsig_key: bytes | None,
    now: dt.datetime | None = None,
) -> Request:
    """Save the settings and an "order now" request in one commit.

    Returns:
        The request, whose id the outcome will name.

    Raises:
        StateError: the stored ACME record is damaged.
    """
    request = Request(secrets.token_hex(8), now or _now(), select=True)

    def change(files: dict[str, bytes]) -> None:
        files[SETTINGS_FILE] = settings.to_json()
        for name, data in ((CA_BUNDLE_FILE, ca_bundle), (TSIG_FILE, tsig_key)):
            if data is None:
                files.pop(name, None)
            else:
                files[name] = data
        state = _state_in(files)
        files[STATE_FILE] = replace(state, request=request).to_json()

    _update_local(store, change)
    logger.info("saved the ACME settings for %s", ", ".join(settings.identifiers))
    return request


def request_order(
    store: StateStore, *, now: dt.datetime | None = None, button: bool = False
) -> Request:
    """Ask the agent to order now (the admin page's "retry now").

    Raises:
        StateError: ACME is not set up or is off.
    """
    now = now or _now()
    request = Request(secrets.token_hex(8), now, select=False)

    def change(files: dict[str, bytes]) -> None:
        data = files.get(SETTINGS_FILE)
        if data is None or not AcmeSettings.from_json(data).enabled:
            raise StateError(
                "ACME is not set up on this unit: set it up with 'unitcert device "
                "acme' first"
            )
        state = replace(_state_in(files), request=request)
        if button:
            state = replace(state, retry_button_at=now)
        files[STATE_FILE] = state.to_json()

    _update_local(store, change)
    return request


def turn_off(store: StateStore) -> None:
    """Stop ordering and serve the unit's own identity; keep the account key.

    The ACME certificate stays in the state but is no longer served.

    Raises:
        StateError: the stored ACME settings are damaged.
    """

    def change(files: dict[str, bytes]) -> None:
        data = files.get(SETTINGS_FILE)
        if data is not None:
            settings = AcmeSettings.from_json(data)
            files[SETTINGS_FILE] = replace(settings, enabled=False).to_json()
        if files.get(device.SOURCE_FILE, b"").strip() == b"acme":
            files.pop(device.SOURCE_FILE)
        if STATE_FILE in files:
            files[STATE_FILE] = replace(_state_in(files), request=None).to_json()

    _update_local(store, change)
    logger.info("turned ACME off; serving the unit's own identity")


# --- the serving process's marker ---------------------------------------------


def serve_running(store: StateStore) -> bool:
    """Say whether a ``serve`` process is serving this state."""
    return store.serving_pid() is not None


# --- status --------------------------------------------------------------------


@dataclass(frozen=True)
class AcmeStatus:
    """What the page and the command line show about ACME.

    Attributes:
        settings: the settings, or None when ACME was never set up.
        cert: the ACME certificate in the state, or None.
        state: the agent's record.
        decision: what the agent will do next, or None when ACME is off.
        served: True when the unit serves the ACME certificate now.
        note: why the unit serves something else, when it does.
    """

    settings: AcmeSettings | None
    cert: certs.CertInfo | None
    state: AcmeState
    decision: Decision | None
    served: bool
    note: str | None


def load_status(store: StateStore, *, now: dt.datetime | None = None) -> AcmeStatus:
    """Read the ACME status from the state (no network).

    Raises:
        StateError: the state is missing or damaged.
    """
    now = now or _now()
    unit = device.load_unit(store)
    local = store.current(Part.LOCAL)
    settings = load_settings(local)
    state = load_state(local)
    cert = load_cert(local)
    decision = None
    if settings is not None and settings.enabled:
        decision = decide(
            state,
            key=settings.key,
            identifiers=settings.identifiers,
            cert=_facts(cert) if cert is not None else None,
            now=now,
        )
    return AcmeStatus(
        settings=settings,
        cert=certs.cert_info(cert) if cert is not None else None,
        state=state,
        decision=decision,
        served=unit.source == "acme",
        note=unit.served_note if unit.chosen == "acme" else None,
    )


# --- the agent -------------------------------------------------------------------


class AcmeAgent:
    """Decides and acts, one step at a time; ``serve`` calls :meth:`run_once`.

    Args:
        store: the unit's state.
        http_responses: the HTTP listener's HTTP-01 answers (token to key
            authorization), or None when no listener runs.
        rng: the source of the random renewal moments and backoff jitter.
        entropy_timeout: for new keys (see :func:`unitcert.keys.generate_checked_key`).
    """

    def __init__(
        self,
        store: StateStore,
        *,
        http_responses: MutableMapping[str, str] | None = None,
        rng: random.Random | None = None,
        entropy_timeout: float = keys.DEFAULT_ENTROPY_TIMEOUT,
    ) -> None:
        self._store = store
        self._responses = http_responses
        self._rng = rng or random.SystemRandom()
        self._entropy_timeout = entropy_timeout
        self._client: AcmeClient | None = None
        self._client_for: tuple[str, bool] | None = None

    # --- one step ---------------------------------------------------------

    def run_once(self, now: dt.datetime | None = None) -> dt.datetime | None:
        """Do what is due at ``now``: plan the renewal, order if the schedule
        and the limits allow it, answer a waiting request.

        Returns:
            When to run again, or None when nothing is planned (ACME is off).

        Raises:
            StateError: the state is damaged.
        """
        now = now or _now()
        local = self._store.current(Part.LOCAL)
        settings = load_settings(local)
        if settings is None or not settings.enabled:
            return None
        saved = load_state(local)
        cert = load_cert(local)
        state = self._plan(settings, saved.pruned(now), cert, now)
        facts = _facts(cert) if cert is not None else None
        decision = decide(
            state,
            key=settings.key,
            identifiers=settings.identifiers,
            cert=facts,
            now=now,
        )
        if decision.order:
            self._order(settings, state, now)
            # Look again at once: plan the new certificate's renewal, or back off.
            return now
        answered = state.request
        if answered is not None:
            logger.info("an order was requested but not sent: %s", decision.reason)
        wake = decision.at
        if facts is not None and facts.not_after <= now:
            if state.expired_for != facts.serial:
                # Recorded so that the state changes and serve reloads: the
                # unit then serves its identity rather than an expired cert.
                logger.warning(
                    "the ACME certificate expired on %s and could not be renewed; "
                    "the unit serves its own identity until it is",
                    _fmt(facts.not_after),
                )
                state = replace(state, expired_for=facts.serial)
        elif facts is not None and (wake is None or facts.not_after < wake):
            wake = facts.not_after
        if state != saved or answered is not None:
            self._save_plan(state, answered, decision, now)
        return wake

    def _save_plan(
        self,
        planned: AcmeState,
        answered: Request | None,
        decision: Decision,
        now: dt.datetime,
    ) -> None:
        """Save the renewal plan, and the answer to a request that was not
        ordered, on top of whatever else changed meanwhile."""

        def change(current: AcmeState) -> AcmeState:
            state = replace(
                current.pruned(now),
                renew_at=planned.renew_at,
                renew_for=planned.renew_for,
                window=planned.window,
                ari_next_check=planned.ari_next_check,
                expired_for=planned.expired_for,
            )
            if answered is not None and current.request == answered:
                state = replace(
                    state,
                    request=None,
                    outcome=Outcome(
                        now,
                        ok=False,
                        message=f"not ordered: {decision.reason}",
                        request_id=answered.id,
                        ordered=False,
                    ),
                )
            return state

        _mutate_state(self._store, change)

    # --- renewal planning ---------------------------------------------------

    def _plan(
        self,
        settings: AcmeSettings,
        state: AcmeState,
        cert: x509.Certificate | None,
        now: dt.datetime,
    ) -> AcmeState:
        """Draw the renewal moment for the current certificate, and keep it in
        the CA's window (RFC 9773) when the CA offers one."""
        if cert is None:
            return state
        facts = _facts(cert)
        window = state.window if state.renew_for == facts.serial else None
        ari_next = state.ari_next_check if state.renew_for == facts.serial else None
        if facts.not_after > now and (ari_next is None or ari_next <= now):
            suggested, ari_next = self._ask_ari(settings, cert, now)
            if suggested is not None:
                window = suggested
        if window is None:
            window = renewal_window(facts.not_before, facts.not_after)
        if (
            state.renew_for == facts.serial
            and state.window == window
            and state.renew_at is not None
        ):
            return replace(state, ari_next_check=ari_next)
        renew_at = pick_renewal_time(window, self._rng)
        logger.info(
            "the ACME certificate is renewed at %s (window %s to %s%s)",
            _fmt(renew_at),
            _fmt(window.start),
            _fmt(window.end),
            ", from the CA" if window.from_ca else "",
        )
        return replace(
            state,
            renew_at=renew_at,
            renew_for=facts.serial,
            window=window,
            ari_next_check=ari_next,
        )

    def _ask_ari(
        self, settings: AcmeSettings, cert: x509.Certificate, now: dt.datetime
    ) -> tuple[Window | None, dt.datetime]:
        try:
            client = self._client_for_settings(settings)
            if client is None:
                return None, now + _NO_ARI_RECHECK
            info = client.renewal_info(cert)
        except AcmeError as exc:
            logger.warning("could not ask the CA for its renewal window: %s", exc)
            return None, now + _ARI_RETRY
        if info is None:
            return None, now + _NO_ARI_RECHECK
        return info.window, info.next_check

    # --- ordering -------------------------------------------------------------

    def _account_key(self, files: dict[str, bytes]) -> keys.PrivateKey:
        data = files.get(ACCOUNT_KEY_FILE)
        if data is not None:
            return keys.load_key_pem(data)
        key = keys.generate_checked_key(
            keys.KeyType.P256, entropy_timeout=self._entropy_timeout
        )
        files[ACCOUNT_KEY_FILE] = keys.key_pem(key)
        logger.info("made this unit's ACME account key")
        return key

    def _client_for_settings(self, settings: AcmeSettings) -> AcmeClient | None:
        # The protocol libraries load on first use, so that the commands that
        # only write settings or read the status start fast.
        from unitcert.acme.client import AcmeClient

        local = self._store.current(Part.LOCAL)
        if local is None or not local.has(ACCOUNT_KEY_FILE):
            return None
        ident = (settings.directory, settings.has_ca_bundle)
        if self._client is None or self._client_for != ident:
            account_key = keys.load_key_pem(local.read(ACCOUNT_KEY_FILE))
            accounts = _accounts(local.files())
            bundle = (
                self._store.root / Part.LOCAL.value / "current" / CA_BUNDLE_FILE
                if settings.has_ca_bundle
                else None
            )
            self._client = AcmeClient(
                settings.directory,
                account_key,
                account_uri=accounts.get(settings.directory),
                ca_bundle=bundle,
            )
            self._client_for = ident
        return self._client

    def _solver(self, settings: AcmeSettings, files: dict[str, bytes]) -> Solver:
        from unitcert.acme.challenges import (
            DnsHookSolver,
            Http01Solver,
            Rfc2136Solver,
        )

        if settings.challenge == "http-01":
            if self._responses is None:
                raise AcmeError(
                    "this unit's HTTP listener is not running, so HTTP-01 cannot be "
                    "answered: run 'unitcert device serve'",
                    kind="settings",
                )
            return Http01Solver(self._responses)
        if settings.dns_hook is not None:
            return DnsHookSolver(settings.dns_hook)
        assert settings.dns_server is not None
        host, port = parse_dns_server(settings.dns_server)
        tsig = files.get(TSIG_FILE)
        if tsig is None:
            raise AcmeError(
                "the TSIG key is missing from the state: set it again with "
                "--tsig-key-file",
                kind="settings",
            )
        return Rfc2136Solver(host, port, parse_tsig_key(tsig.decode("utf-8")))

    def _order(
        self, settings: AcmeSettings, state: AcmeState, now: dt.datetime
    ) -> None:
        request = state.request
        failures = state.failures if state.failures_key == settings.key else 0
        failures += 1
        # Written before the first request: a unit that dies mid-order has
        # counted the order as failed and is backing off when it comes back.
        ahead = replace(
            state,
            request=None,
            failures=failures,
            failures_key=settings.key,
            next_attempt=now + backoff_delay(failures, self._rng),
            orders=(*state.orders, Order(now, settings.key, None)),
        )
        account_key: list[keys.PrivateKey] = []

        def write_ahead(files: dict[str, bytes]) -> None:
            current = _state_in(files)
            newer = current.request if current.request != request else None
            files[STATE_FILE] = replace(ahead, request=newer).to_json()
            account_key.append(self._account_key(files))

        files = _update_local(self._store, write_ahead)
        logger.info(
            "ordering a certificate for %s from %s",
            ", ".join(settings.identifiers),
            settings.directory,
        )
        try:
            chain, key = self._issue(settings, files)
        except AcmeError as exc:
            self._record_failure(settings, exc, now, request)
        except UnitcertError as exc:
            failure = AcmeError(str(exc), kind="settings")
            self._record_failure(settings, failure, now, request)
        else:
            self._install(settings, chain, key, now, request)
            self._run_deploy_hook(settings)

    def _issue(
        self, settings: AcmeSettings, files: dict[str, bytes]
    ) -> tuple[bytes, keys.PrivateKey]:
        client = self._client_for_settings(settings)
        assert client is not None
        solver = self._solver(settings, files)
        profile = client.choose_profile(settings.profile, settings.identifiers)
        cert_key = keys.generate_checked_key(
            keys.KeyType.P256, entropy_timeout=self._entropy_timeout
        )
        try:
            chain = client.issue(
                settings.identifiers,
                cert_key,
                solver,
                email=settings.email,
                profile=profile,
            )
        finally:
            self._save_account(settings, client)
        return chain, cert_key

    def _save_account(self, settings: AcmeSettings, client: AcmeClient) -> None:
        uri = client.account_uri
        if uri is None:
            return

        def change(files: dict[str, bytes]) -> None:
            accounts = _accounts(files)
            if accounts.get(settings.directory) != uri:
                accounts[settings.directory] = uri
                files[ACCOUNT_FILE] = json.dumps({"accounts": accounts}).encode()

        _update_local(self._store, change)

    def _record_failure(
        self,
        settings: AcmeSettings,
        error: AcmeError,
        started: dt.datetime,
        request: Request | None,
    ) -> None:
        logger.error("the ACME order for %s failed: %s", settings.key, error)
        logger.debug("ACME failure", exc_info=True)
        now = max(_now(), started)
        blocked = error.retry_after
        if blocked is None and error.kind == "rate-limited":
            blocked = now + DEFAULT_RATE_LIMIT_WAIT

        def change(state: AcmeState) -> AcmeState:
            orders = tuple(
                replace(o, ok=False) if o.at == started and o.key == settings.key else o
                for o in state.orders
            )
            failed = tuple((started, ident) for ident in error.failed_identifiers)
            until = state.blocked_until
            if blocked is not None and (until is None or blocked > until):
                until = blocked
            message = str(error)
            if blocked is not None:
                message += f"; the CA asked to wait until {_fmt(blocked)}"
            return replace(
                state,
                orders=orders,
                failed_authz=state.failed_authz + failed,
                blocked_until=until,
                outcome=Outcome(
                    now,
                    ok=False,
                    message=message,
                    request_id=request.id if request else None,
                ),
            )

        _mutate_state(self._store, change)

    def _install(
        self,
        settings: AcmeSettings,
        chain: bytes,
        key: keys.PrivateKey,
        started: dt.datetime,
        request: Request | None,
    ) -> None:
        leaf = x509.load_pem_x509_certificates(chain)[0]
        facts = _facts(leaf)
        now = max(_now(), started)
        message = (
            f"got a certificate for {', '.join(settings.identifiers)}, valid until "
            f"{_fmt(facts.not_after)}"
        )

        # Planned at once from the lifetime; the next step asks the CA for its
        # window (RFC 9773) and draws again inside it if it offers one.
        window = renewal_window(facts.not_before, facts.not_after)
        renew_at = pick_renewal_time(window, self._rng)

        def change(files: dict[str, bytes]) -> None:
            state = _state_in(files)
            orders = tuple(
                replace(o, ok=True) if o.at == started and o.key == settings.key else o
                for o in state.orders
            )
            files[STATE_FILE] = replace(
                state,
                orders=orders,
                failures=0,
                next_attempt=None,
                renew_at=renew_at,
                renew_for=facts.serial,
                window=window,
                ari_next_check=None,
                outcome=Outcome(
                    now,
                    ok=True,
                    message=message,
                    request_id=request.id if request else None,
                ),
            ).to_json()
            files[_KEY_FILE] = keys.key_pem(key)
            files[_CHAIN_FILE] = chain
            chosen = files.get(device.SOURCE_FILE, b"").strip()
            asked = request is not None and request.select
            wanted = asked or chosen in (b"", b"acme")
            # ACME turned off while this order ran: keep the certificate, do
            # not serve it.
            current = files.get(SETTINGS_FILE)
            still_on = current is not None and AcmeSettings.from_json(current).enabled
            if wanted and still_on:
                files[device.SOURCE_FILE] = b"acme"

        _update_local(self._store, change)
        logger.info("%s", message[0].upper() + message[1:])

    def _run_deploy_hook(self, settings: AcmeSettings) -> None:
        if settings.deploy_hook is None:
            return
        current = self._store.root / Part.LOCAL.value / "current"
        env = dict(os.environ)
        env.update(
            {
                "UNITCERT_STATE": str(self._store.root),
                "UNITCERT_KEY_PATH": str(current / _KEY_FILE),
                "UNITCERT_CHAIN_PATH": str(current / _CHAIN_FILE),
                "UNITCERT_DOMAINS": " ".join(settings.identifiers),
            }
        )
        try:
            done = subprocess.run(
                shlex.split(settings.deploy_hook),
                env=env,
                capture_output=True,
                timeout=_HOOK_TIMEOUT,
                check=False,
            )
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            logger.error("the deploy hook could not run: %s", type(exc).__name__)
            return
        if done.returncode != 0:
            logger.error("the deploy hook failed (exit %d)", done.returncode)
            logger.debug("deploy hook output: %r", done.stderr[-2000:])
        else:
            logger.info("ran the deploy hook")


def _accounts(files: dict[str, bytes]) -> dict[str, str]:
    data = files.get(ACCOUNT_FILE)
    if data is None:
        return {}
    try:
        raw = json.loads(data)
        return {str(k): str(v) for k, v in raw["accounts"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("the stored ACME account record is unreadable; registering anew")
        return {}


async def _in_daemon_thread(
    function: Callable[[], dt.datetime | None],
) -> dt.datetime | None:
    """Run ``function`` in a daemon thread: a ``serve`` told to stop does not
    wait for an order in flight (the state already counts it, see
    :meth:`AcmeAgent._order`)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[dt.datetime | None] = loop.create_future()

    def settle(result: dt.datetime | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result = function()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name="unitcert-acme", daemon=True).start()
    return await future


async def run_agent(
    store: StateStore,
    http_responses: MutableMapping[str, str] | None,
    *,
    poll: float = _POLL,
) -> None:
    """The agent's loop inside ``serve``: run a step when one is due or the state
    changed (a new request or new settings), until cancelled.

    It runs inside the one ``serve`` that holds the state's serving lock
    (:meth:`unitcert.store.StateStore.serving`), so two processes never both
    order for one state. Failures are logged; the loop goes on.
    """
    agent = AcmeAgent(store, http_responses=http_responses)
    loop = asyncio.get_running_loop()
    token: tuple[str | None, ...] | None = None
    wake_at = 0.0
    while True:
        current = store.watch_token()
        if current != token or loop.time() >= wake_at:
            # The token is taken before the step reads the state: a request
            # committed while the step runs is then a change for the next turn,
            # not lost until the next planned wake-up.
            token = current
            try:
                due = await _in_daemon_thread(agent.run_once)
            except Exception as exc:
                logger.error("the ACME agent failed: %s", exc)
                logger.debug("ACME agent failure", exc_info=True)
                due = None
            delay = _LONGEST_SLEEP
            if due is not None:
                delay = min(max((due - _now()).total_seconds(), 0.0), delay)
            wake_at = loop.time() + delay
        await asyncio.sleep(poll)
