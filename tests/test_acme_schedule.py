"""Politeness, measured with injected time: renewal windows, the spread of a
fleet's renewals, backoff, Retry-After and the order limits."""

from __future__ import annotations

import datetime as dt
import itertools
import random
from collections import Counter
from dataclasses import replace

from unitcert.acme.schedule import (
    BACKOFF_STEPS,
    AcmeState,
    CertFacts,
    Order,
    Outcome,
    Request,
    Window,
    backoff_delay,
    decide,
    pick_renewal_time,
    renewal_window,
)

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
KEY = "unit.example.com"
IDS = ("unit.example.com",)


def _cert(days: float, *, start: dt.datetime = T0) -> CertFacts:
    return CertFacts(
        identifiers=frozenset(IDS),
        not_before=start,
        not_after=start + dt.timedelta(days=days),
        serial="1a2b",
    )


def test_renewal_window_is_the_last_third_or_the_last_half_under_ten_days() -> None:
    long = renewal_window(T0, T0 + dt.timedelta(days=90))
    assert long.start == T0 + dt.timedelta(days=60)
    assert long.end == T0 + dt.timedelta(days=90)
    short = renewal_window(T0, T0 + dt.timedelta(days=6))
    assert short.start == T0 + dt.timedelta(days=3)
    suggested = Window(T0 + dt.timedelta(days=40), T0 + dt.timedelta(days=41))
    assert renewal_window(T0, T0 + dt.timedelta(days=90), suggested).from_ca


def _fleet_moments(window: Window, units: int = 1000) -> list[dt.datetime]:
    # Each unit draws with its own generator, as each unit's SystemRandom does.
    return [pick_renewal_time(window, random.Random(unit)) for unit in range(units)]


def _assert_spread(moments: list[dt.datetime], window: Window) -> None:
    assert all(window.start <= m <= window.end for m in moments)
    per_minute = Counter(m.replace(second=0, microsecond=0) for m in moments)
    assert max(per_minute.values()) <= len(moments) // 100
    # Never a fixed clock time: not one second of the minute, not one hour of
    # the day, holds a crowd.
    assert len({m.second for m in moments}) >= 55
    per_hour = Counter(m.hour for m in moments)
    if window.end - window.start >= dt.timedelta(days=1):
        assert max(per_hour.values()) <= 2 * len(moments) / 24


def test_a_thousand_identical_units_spread_their_renewals_over_the_window() -> None:
    for days in (90, 6):
        window = renewal_window(T0, T0 + dt.timedelta(days=days))
        _assert_spread(_fleet_moments(window), window)


def test_a_thousand_units_spread_inside_the_window_the_ca_suggests() -> None:
    window = Window(T0, T0 + dt.timedelta(days=1), from_ca=True)
    moments = _fleet_moments(window)
    _assert_spread(moments, window)
    # A CA's window is used whole (RFC 9773): both halves are used.
    middle = T0 + dt.timedelta(hours=12)
    assert sum(m > middle for m in moments) > 400


def test_backoff_is_1_10_100_minutes_then_a_day_with_jitter_never_shorter() -> None:
    rng = random.Random(7)
    for failures in range(1, 9):
        step = BACKOFF_STEPS[min(failures, len(BACKOFF_STEPS)) - 1]
        delays = {backoff_delay(failures, rng) for _ in range(50)}
        assert all(step <= d <= step * 1.5 for d in delays)
        assert len(delays) == 50
    assert (
        dt.timedelta(minutes=1),
        dt.timedelta(minutes=10),
        dt.timedelta(minutes=100),
        dt.timedelta(days=1),
    ) == BACKOFF_STEPS


def test_no_order_before_retry_after_even_when_the_owner_asks() -> None:
    state = AcmeState(
        blocked_until=T0 + dt.timedelta(hours=1),
        request=Request("r1", T0),
    )
    held = decide(state, key=KEY, identifiers=IDS, cert=None, now=T0)
    assert not held.order and held.at == T0 + dt.timedelta(hours=1)
    assert "the CA asked to wait" in held.reason
    later = decide(
        state, key=KEY, identifiers=IDS, cert=None, now=T0 + dt.timedelta(hours=1)
    )
    assert later.order


def test_backoff_holds_scheduled_orders_but_not_a_request() -> None:
    state = AcmeState(
        failures=2, failures_key=KEY, next_attempt=T0 + dt.timedelta(minutes=10)
    )
    assert not decide(state, key=KEY, identifiers=IDS, cert=None, now=T0).order
    asked = replace(state, request=Request("r2", T0))
    assert decide(asked, key=KEY, identifiers=IDS, cert=None, now=T0).order


def test_three_failed_orders_a_day_and_three_failed_validations_an_hour() -> None:
    failed = tuple(
        Order(T0 + dt.timedelta(minutes=m), KEY, ok=False) for m in (0, 2, 15)
    )
    state = AcmeState(orders=failed, request=Request("r3", T0))
    now = T0 + dt.timedelta(hours=3)
    held = decide(state, key=KEY, identifiers=IDS, cert=None, now=now)
    assert not held.order and held.at == T0 + dt.timedelta(days=1)
    # Another name set is not held by these failures.
    other = decide(
        state,
        key="other.example.com",
        identifiers=("other.example.com",),
        cert=None,
        now=now,
    )
    assert other.order

    authz = tuple((T0 + dt.timedelta(minutes=m), IDS[0]) for m in (0, 5, 10))
    state = AcmeState(failed_authz=authz, request=Request("r4", T0))
    held = decide(
        state, key=KEY, identifiers=IDS, cert=None, now=T0 + dt.timedelta(minutes=20)
    )
    assert not held.order and held.at == T0 + dt.timedelta(hours=1)


def test_never_more_than_ten_orders_a_day_even_when_they_succeed() -> None:
    done = tuple(Order(T0 + dt.timedelta(minutes=m), KEY, ok=True) for m in range(10))
    state = AcmeState(orders=done, request=Request("r5", T0))
    held = decide(
        state, key=KEY, identifiers=IDS, cert=None, now=T0 + dt.timedelta(hours=1)
    )
    assert not held.order and "10 orders were sent today" in held.reason


def test_a_valid_certificate_waits_for_its_renewal_moment() -> None:
    cert = _cert(90)
    renew_at = T0 + dt.timedelta(days=70)
    state = AcmeState(renew_at=renew_at, renew_for=cert.serial)
    waiting = decide(state, key=KEY, identifiers=IDS, cert=cert, now=T0)
    assert not waiting.order and not waiting.wanted and waiting.at == renew_at
    assert decide(state, key=KEY, identifiers=IDS, cert=cert, now=renew_at).order
    renamed = decide(
        state, key=KEY, identifiers=("new.example.com",), cert=cert, now=T0
    )
    assert renamed.order and renamed.reason == "the names changed"


def _simulate(days: int, step: dt.timedelta) -> list[dt.datetime]:
    """A unit whose every order fails, looked at every ``step`` for ``days``,
    restarting each time from its saved record (JSON round trip)."""
    rng = random.Random(3)
    state = AcmeState(request=Request("first", T0))
    sent: list[dt.datetime] = []
    now = T0
    while now < T0 + dt.timedelta(days=days):
        decision = decide(state, key=KEY, identifiers=IDS, cert=None, now=now)
        if decision.order:
            sent.append(now)
            failures = state.failures + 1
            state = replace(
                state.pruned(now),
                request=None,
                failures=failures,
                failures_key=KEY,
                next_attempt=now + backoff_delay(failures, rng),
                orders=(*state.orders, Order(now, KEY, ok=False)),
                failed_authz=(*state.failed_authz, (now, IDS[0])),
                outcome=Outcome(now, ok=False, message="failed"),
            )
        state = AcmeState.from_json(state.to_json())
        now += step
    return sent


def test_a_failing_unit_orders_on_the_schedule_for_a_week() -> None:
    sent = _simulate(7, dt.timedelta(minutes=1))
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert dt.timedelta(minutes=1) <= gaps[0] <= dt.timedelta(minutes=2)
    assert dt.timedelta(minutes=10) <= gaps[1] <= dt.timedelta(minutes=16)
    assert all(g >= dt.timedelta(hours=23) for g in gaps[2:])
    for day in range(7):
        start = T0 + dt.timedelta(days=day)
        in_day = [s for s in sent if start <= s < start + dt.timedelta(days=1)]
        assert len(in_day) <= 3
    assert len(sent) <= 3 + 6


def test_state_survives_a_json_round_trip() -> None:
    state = AcmeState(
        failures=2,
        failures_key=KEY,
        next_attempt=T0,
        blocked_until=T0,
        orders=(Order(T0, KEY, None),),
        failed_authz=((T0, KEY),),
        request=Request("abc", T0, select=False),
        outcome=Outcome(T0, ok=True, message="ok", request_id="abc", ordered=True),
        renew_at=T0,
        renew_for="ff",
        window=Window(T0, T0, from_ca=True),
        ari_next_check=T0,
        retry_button_at=T0,
        expired_for="ee",
    )
    assert AcmeState.from_json(state.to_json()) == state
