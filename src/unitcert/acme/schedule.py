"""When to talk to the CA: the renewal window, backoff, and the order limits.

Everything here is a pure function of a state record, the settings, the
current certificate and an injected ``now`` (and, for the random parts, an
injected :class:`random.Random`), so that politeness is tested without
sleeping. The rules follow Let's Encrypt's integration guide:

- Renew at a random moment inside the renewal window: the window the CA
  suggests through ACME Renewal Information (RFC 9773) where it offers it,
  else the last third of the lifetime (the last half under 10 days). In a
  computed window the moment is drawn from its first half, so that half the
  window is left for retries; a CA's window is used whole, as RFC 9773 asks.
- After a failure wait about 1 minute, 10 minutes, 100 minutes, then a day,
  each stretched by up to half again at random (never shortened).
- Never earlier than a ``Retry-After`` or a rate-limit error allows.
- At most :data:`ORDERS_PER_DAY` orders a day, at most
  :data:`FAILED_ORDERS_PER_DAY` failed orders a day for one identifier set,
  and at most :data:`FAILED_AUTHZ_PER_HOUR` failed authorizations an hour for
  one identifier (Let's Encrypt allows 5).

The record (``acme-state.json``) is written before every order, so a unit
that crashes or reboots mid-order counts that order as failed and keeps its
backoff: a reboot loop cannot turn into a request storm.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from unitcert.errors import StateError

__all__ = [
    "BACKOFF_STEPS",
    "DEFAULT_RATE_LIMIT_WAIT",
    "FAILED_AUTHZ_PER_HOUR",
    "FAILED_ORDERS_PER_DAY",
    "ORDERS_PER_DAY",
    "STATE_FILE",
    "AcmeState",
    "CertFacts",
    "Decision",
    "Order",
    "Outcome",
    "Request",
    "Window",
    "backoff_delay",
    "decide",
    "pick_renewal_time",
    "renewal_window",
]

STATE_FILE = "acme-state.json"

BACKOFF_STEPS = (
    dt.timedelta(minutes=1),
    dt.timedelta(minutes=10),
    dt.timedelta(minutes=100),
    dt.timedelta(days=1),
)
_BACKOFF_STRETCH = 0.5
ORDERS_PER_DAY = 10
FAILED_ORDERS_PER_DAY = 3
FAILED_AUTHZ_PER_HOUR = 3
_DAY = dt.timedelta(days=1)
_HOUR = dt.timedelta(hours=1)
_SHORT_LIVED = dt.timedelta(days=10)
# Without a Retry-After, a rate-limit error blocks ordering this long.
DEFAULT_RATE_LIMIT_WAIT = dt.timedelta(hours=1)


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment is not None else None


def _parse(text: Any) -> dt.datetime | None:
    if text is None:
        return None
    moment = dt.datetime.fromisoformat(str(text))
    if moment.tzinfo is None:
        raise ValueError("a time without a zone")
    return moment


@dataclass(frozen=True)
class Window:
    """A renewal window.

    Attributes:
        start: its first moment.
        end: its last moment.
        from_ca: True when the CA suggested it (RFC 9773).
    """

    start: dt.datetime
    end: dt.datetime
    from_ca: bool = False


@dataclass(frozen=True)
class Request:
    """An "order now" request from ``unitcert device acme`` or the admin page.

    Attributes:
        id: a random id the requester waits for in :attr:`Outcome.request_id`.
        at: when it was made.
        select: serve the new certificate even if the owner had chosen
            another source (the request came with new settings).
    """

    id: str
    at: dt.datetime
    select: bool = True


@dataclass(frozen=True)
class Outcome:
    """The result of the latest attempt (or of a request that was not ordered).

    Attributes:
        at: when it ended.
        ok: True when a certificate was installed.
        message: one sentence for the owner.
        request_id: the request it answers, if any.
        ordered: False when no order was sent (a limit or a setting stopped it).
    """

    at: dt.datetime
    ok: bool
    message: str
    request_id: str | None = None
    ordered: bool = True


@dataclass(frozen=True)
class Order:
    """One order sent, for the daily limits.

    Attributes:
        at: when it was sent.
        key: the identifier set (:attr:`AcmeSettings.key`).
        ok: True when it gave a certificate, None while it runs (or if the unit
            stopped during it, which counts as a failure).
    """

    at: dt.datetime
    key: str
    ok: bool | None = None


@dataclass(frozen=True)
class AcmeState:
    """What the agent remembers between runs and reboots.

    Attributes:
        failures: failed attempts in a row for :attr:`failures_key`.
        failures_key: the identifier set the failures belong to.
        next_attempt: no order before this (backoff), unless requested.
        blocked_until: no order before this, even if requested (the CA's
            ``Retry-After`` or rate limit).
        orders: orders of the last day.
        failed_authz: (moment, identifier) of failed authorizations of the
            last hour.
        request: a pending "order now" request.
        outcome: the latest outcome.
        renew_at: when to renew the current certificate.
        renew_for: the serial (hex) of the certificate ``renew_at`` is for.
        window: the renewal window ``renew_at`` was drawn from.
        ari_next_check: when to ask the CA for its window again.
        retry_button_at: the last use of the admin page's "retry now".
        expired_for: the serial (hex) of an ACME certificate whose expiry was
            recorded (the state changes then, so that ``serve`` reloads and
            falls back to the unit's identity).
    """

    failures: int = 0
    failures_key: str | None = None
    next_attempt: dt.datetime | None = None
    blocked_until: dt.datetime | None = None
    orders: tuple[Order, ...] = ()
    failed_authz: tuple[tuple[dt.datetime, str], ...] = ()
    request: Request | None = None
    outcome: Outcome | None = None
    renew_at: dt.datetime | None = None
    renew_for: str | None = None
    window: Window | None = None
    ari_next_check: dt.datetime | None = None
    retry_button_at: dt.datetime | None = None
    expired_for: str | None = None

    def pruned(self, now: dt.datetime) -> AcmeState:
        """Drop orders older than a day and failed authorizations older than an hour."""
        return replace(
            self,
            orders=tuple(o for o in self.orders if now - o.at < _DAY),
            failed_authz=tuple(f for f in self.failed_authz if now - f[0] < _HOUR),
        )

    def to_json(self) -> bytes:
        """Serialise for ``acme-state.json``."""
        raw: dict[str, Any] = {
            "failures": self.failures,
            "failures_key": self.failures_key,
            "next_attempt": _iso(self.next_attempt),
            "blocked_until": _iso(self.blocked_until),
            "orders": [
                {"at": _iso(o.at), "key": o.key, "ok": o.ok} for o in self.orders
            ],
            "failed_authz": [[_iso(at), ident] for at, ident in self.failed_authz],
            "request": None,
            "outcome": None,
            "renew_at": _iso(self.renew_at),
            "renew_for": self.renew_for,
            "window": None,
            "ari_next_check": _iso(self.ari_next_check),
            "retry_button_at": _iso(self.retry_button_at),
            "expired_for": self.expired_for,
        }
        if self.request is not None:
            raw["request"] = {
                "id": self.request.id,
                "at": _iso(self.request.at),
                "select": self.request.select,
            }
        if self.outcome is not None:
            raw["outcome"] = {
                "at": _iso(self.outcome.at),
                "ok": self.outcome.ok,
                "message": self.outcome.message,
                "request_id": self.outcome.request_id,
                "ordered": self.outcome.ordered,
            }
        if self.window is not None:
            raw["window"] = {
                "start": _iso(self.window.start),
                "end": _iso(self.window.end),
                "from_ca": self.window.from_ca,
            }
        return json.dumps(raw, indent=2).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> AcmeState:
        """Load from ``acme-state.json``.

        Raises:
            StateError: the record is damaged.
        """
        try:
            raw = json.loads(data)
            request = raw.get("request")
            outcome = raw.get("outcome")
            window = raw.get("window")
            return cls(
                failures=int(raw.get("failures", 0)),
                failures_key=raw.get("failures_key"),
                next_attempt=_parse(raw.get("next_attempt")),
                blocked_until=_parse(raw.get("blocked_until")),
                orders=tuple(
                    Order(_need(o["at"]), str(o["key"]), o.get("ok"))
                    for o in raw.get("orders", [])
                ),
                failed_authz=tuple(
                    (_need(at), str(ident)) for at, ident in raw.get("failed_authz", [])
                ),
                request=(
                    Request(
                        str(request["id"]),
                        _need(request["at"]),
                        bool(request.get("select", True)),
                    )
                    if request
                    else None
                ),
                outcome=(
                    Outcome(
                        _need(outcome["at"]),
                        bool(outcome["ok"]),
                        str(outcome["message"]),
                        outcome.get("request_id"),
                        bool(outcome.get("ordered", True)),
                    )
                    if outcome
                    else None
                ),
                renew_at=_parse(raw.get("renew_at")),
                renew_for=raw.get("renew_for"),
                window=(
                    Window(
                        _need(window["start"]),
                        _need(window["end"]),
                        bool(window.get("from_ca")),
                    )
                    if window
                    else None
                ),
                ari_next_check=_parse(raw.get("ari_next_check")),
                retry_button_at=_parse(raw.get("retry_button_at")),
                expired_for=raw.get("expired_for"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateError(
                "the state is damaged: the ACME retry record is unreadable; turn "
                "ACME off and on again with 'unitcert device acme'"
            ) from exc


def _need(text: Any) -> dt.datetime:
    moment = _parse(text)
    if moment is None:
        raise ValueError("a missing time")
    return moment


def renewal_window(
    not_before: dt.datetime, not_after: dt.datetime, suggested: Window | None = None
) -> Window:
    """Return the window in which a certificate should be renewed.

    Args:
        not_before: the certificate's start of validity.
        not_after: its end of validity.
        suggested: the CA's window (RFC 9773), used when given.
    """
    if suggested is not None:
        return Window(suggested.start, suggested.end, from_ca=True)
    lifetime = not_after - not_before
    share = 2 if lifetime < _SHORT_LIVED else 3
    return Window(not_after - lifetime / share, not_after)


def pick_renewal_time(window: Window, rng: random.Random) -> dt.datetime:
    """Draw the moment to renew: uniform over a CA's window, over the first half
    of a computed one (see the module docstring); to the microsecond, so that
    no two units meet at a round clock time."""
    width = window.end - window.start
    if not window.from_ca:
        width = width / 2
    if width <= dt.timedelta(0):
        return window.start
    return window.start + dt.timedelta(
        microseconds=rng.randrange(int(width / dt.timedelta(microseconds=1)))
    )


def backoff_delay(failures: int, rng: random.Random) -> dt.timedelta:
    """How long to wait after ``failures`` failed attempts in a row (at least 1)."""
    if failures <= 0:
        return dt.timedelta(0)
    step = BACKOFF_STEPS[min(failures, len(BACKOFF_STEPS)) - 1]
    return step * (1 + rng.random() * _BACKOFF_STRETCH)


@dataclass(frozen=True)
class CertFacts:
    """What the scheduler needs to know about the current ACME certificate.

    Attributes:
        identifiers: the names and addresses it is for.
        not_before: start of validity.
        not_after: end of validity.
        serial: its serial number, hex.
    """

    identifiers: frozenset[str]
    not_before: dt.datetime
    not_after: dt.datetime
    serial: str


@dataclass(frozen=True)
class Decision:
    """What the agent should do now.

    Attributes:
        order: True to send an order now.
        at: when to look again (the next possible or planned attempt), or None.
        reason: a sentence for logs, status and pages.
        wanted: True when a certificate is needed (now or once ``at`` comes).
    """

    order: bool
    at: dt.datetime | None
    reason: str
    wanted: bool = True


def _fmt(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _limit_until(
    moments: Iterable[dt.datetime], limit: int, period: dt.timedelta
) -> dt.datetime | None:
    """The moment when fewer than ``limit`` of ``moments`` lie in the last
    ``period``, or None when that is already so."""
    ordered = sorted(moments)
    if len(ordered) < limit:
        return None
    return ordered[-limit] + period


def decide(
    state: AcmeState,
    *,
    key: str,
    identifiers: Iterable[str],
    cert: CertFacts | None,
    now: dt.datetime,
) -> Decision:
    """Decide whether to order now, and if not, when to look again.

    Args:
        state: the record (pruned or not).
        key: the identifier set of the settings.
        identifiers: the identifiers of the settings.
        cert: the current ACME certificate, or None.
        now: the current time.
    """
    state = state.pruned(now)
    wanted_ids = frozenset(identifiers)
    requested = state.request is not None
    if cert is None:
        why = "no certificate yet"
    elif cert.identifiers != wanted_ids:
        why = "the names changed"
    elif cert.not_after <= now:
        why = "the certificate has expired"
    elif state.renew_at is not None and state.renew_for == cert.serial:
        why = "the renewal time has come"
        if state.renew_at > now and not requested:
            return Decision(
                False,
                state.renew_at,
                f"renewal planned for {_fmt(state.renew_at)}",
                wanted=False,
            )
    elif requested:
        why = "an order was requested"
    else:
        # No renewal time drawn yet: the agent draws one before deciding.
        return Decision(False, None, "renewal time not planned yet", wanted=False)
    if requested:
        why = "an order was requested"

    holds: list[tuple[dt.datetime, str]] = []
    if state.blocked_until is not None and state.blocked_until > now:
        holds.append((state.blocked_until, "the CA asked to wait"))
    if not requested and state.next_attempt is not None and state.next_attempt > now:
        holds.append(
            (
                state.next_attempt,
                f"backing off after {state.failures} failed attempt"
                f"{'s' if state.failures != 1 else ''}",
            )
        )
    day_limit = _limit_until((o.at for o in state.orders), ORDERS_PER_DAY, _DAY)
    if day_limit is not None:
        holds.append((day_limit, f"{ORDERS_PER_DAY} orders were sent today"))
    failed_limit = _limit_until(
        (o.at for o in state.orders if o.key == key and o.ok is not True),
        FAILED_ORDERS_PER_DAY,
        _DAY,
    )
    if failed_limit is not None:
        holds.append(
            (
                failed_limit,
                f"{FAILED_ORDERS_PER_DAY} orders for these names failed today",
            )
        )
    for ident in sorted(wanted_ids):
        authz_limit = _limit_until(
            (at for at, name in state.failed_authz if name == ident),
            FAILED_AUTHZ_PER_HOUR,
            _HOUR,
        )
        if authz_limit is not None:
            holds.append(
                (
                    authz_limit,
                    f"{FAILED_AUTHZ_PER_HOUR} validations of {ident} failed this hour",
                )
            )
    if holds:
        until, reason = max(holds)
        return Decision(
            False, until, f"{why}, but {reason}: next attempt {_fmt(until)}"
        )
    return Decision(True, now, why)
