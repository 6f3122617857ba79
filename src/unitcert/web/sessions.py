"""Admin sessions, CSRF tokens and the login rate limit, all kept in memory.

A session is a random 256-bit token in a ``Secure; HttpOnly; SameSite=Strict``
cookie. The server keeps only its SHA-256, so a memory dump holds no usable
token. Each session is tied to the admin credential it was opened with: when
the credential changes (here or by a reset on the command line), every
session opened with the old one ends. A restart of the server ends them all.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from unitcert.credential import AdminCredential

__all__ = [
    "ABSOLUTE_TIMEOUT",
    "IDLE_TIMEOUT",
    "LoginForms",
    "LoginLimiter",
    "Session",
    "SessionStore",
    "credential_tag",
    "tokens_match",
]

IDLE_TIMEOUT = 30 * 60.0
ABSOLUTE_TIMEOUT = 12 * 3600.0
# A unit has one owner; a few browsers at once is plenty, and the bound keeps
# a flood of logins from filling a small unit's memory.
_MAX_SESSIONS = 32
_MAX_TRACKED_CLIENTS = 1024

Clock = Callable[[], float]


def _new_token() -> str:
    return secrets.token_urlsafe(32)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def tokens_match(given: str | None, expected: str) -> bool:
    """Compare a token from a request with the expected one in constant time."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def credential_tag(credential: AdminCredential | None) -> str:
    """Return a value that changes whenever the admin credential changes."""
    if credential is None:
        return ""
    return hashlib.sha256(credential.to_json()).hexdigest()


@dataclass(frozen=True)
class Session:
    """One logged-in browser.

    Attributes:
        csrf_token: the token its forms must send back.
        credential_tag: :func:`credential_tag` of the credential it logged in with.
        created: when it began (monotonic seconds).
        last_seen: when it was last used (monotonic seconds).
    """

    csrf_token: str
    credential_tag: str
    created: float
    last_seen: float


class SessionStore:
    """The open sessions, by the SHA-256 of their tokens.

    Args:
        clock: monotonic seconds (tests may pass their own).
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, credential_tag: str) -> str:
        """Open a session for the given credential and return its token."""
        now = self._clock()
        self._expire(now)
        while len(self._sessions) >= _MAX_SESSIONS:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].last_seen)
            del self._sessions[oldest]
        token = _new_token()
        self._sessions[_digest(token)] = Session(
            csrf_token=_new_token(),
            credential_tag=credential_tag,
            created=now,
            last_seen=now,
        )
        return token

    def get(self, token: str | None, credential_tag: str) -> Session | None:
        """Return the live session of ``token`` and mark it used, or None.

        A session is dead when idle for :data:`IDLE_TIMEOUT`, older than
        :data:`ABSOLUTE_TIMEOUT`, or opened with another credential.
        """
        if not token:
            return None
        key = _digest(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock()
        if not self._alive(session, now) or not tokens_match(
            session.credential_tag, credential_tag
        ):
            del self._sessions[key]
            return None
        session = replace(session, last_seen=now)
        self._sessions[key] = session
        return session

    def delete(self, token: str | None) -> None:
        """End the session of ``token``, if there is one."""
        if token:
            self._sessions.pop(_digest(token), None)

    def clear(self) -> None:
        """End every session."""
        self._sessions.clear()

    @staticmethod
    def _alive(session: Session, now: float) -> bool:
        return (
            now - session.last_seen < IDLE_TIMEOUT
            and now - session.created < ABSOLUTE_TIMEOUT
        )

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if not self._alive(s, now)]:
            del self._sessions[key]


class LoginForms:
    """CSRF tokens for the login form, before any session exists.

    The browser gets a random value in a cookie; the form carries an HMAC of
    it under a key that lives only in this process, so a page on another
    site can neither read nor forge the pair.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    @staticmethod
    def new_cookie() -> str:
        """Return a fresh value for the login cookie."""
        return _new_token()

    def token_for(self, cookie: str) -> str:
        """Return the form token that belongs to a login cookie value."""
        return hmac.new(self._key, cookie.encode("utf-8"), hashlib.sha256).hexdigest()

    def check(self, cookie: str | None, token: str | None) -> bool:
        """Say whether a submitted form token belongs to the login cookie."""
        if not cookie:
            return False
        return tokens_match(token, self.token_for(cookie))


class LoginLimiter:
    """Counts failed logins per client address and overall, over a sliding window.

    Args:
        per_client: failures one address may make in the window.
        overall: failures all addresses together may make in the window.
        window: the window in seconds.
        clock: monotonic seconds (tests may pass their own).
    """

    def __init__(
        self,
        *,
        per_client: int = 5,
        overall: int = 30,
        window: float = 300.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._per_client = per_client
        self._overall = overall
        self._window = window
        self._clock = clock
        self._clients: dict[str, deque[float]] = {}
        self._all: deque[float] = deque(maxlen=overall)

    def retry_after(self, client: str) -> int | None:
        """Return the seconds ``client`` must wait before trying again, or None."""
        now = self._clock()
        waits = []
        failures = self._recent(self._clients.get(client), now)
        if len(failures) >= self._per_client:
            waits.append(failures[-self._per_client] + self._window - now)
        overall = self._recent(self._all, now)
        if len(overall) >= self._overall:
            waits.append(overall[-self._overall] + self._window - now)
        if not waits:
            return None
        return max(1, int(max(waits) + 0.999))

    def failures(self, client: str) -> int:
        """Return how many failures ``client`` made in the window."""
        return len(self._recent(self._clients.get(client), self._clock()))

    def record_failure(self, client: str) -> None:
        """Count one failed login from ``client``."""
        now = self._clock()
        if client not in self._clients and len(self._clients) >= _MAX_TRACKED_CLIENTS:
            self._forget_stale(now)
        failures = self._clients.setdefault(client, deque(maxlen=self._per_client))
        failures.append(now)
        self._all.append(now)

    def record_success(self, client: str) -> None:
        """Forget the failures of ``client`` after it logged in."""
        self._clients.pop(client, None)

    def _recent(self, times: deque[float] | None, now: float) -> list[float]:
        if not times:
            return []
        return [t for t in times if now - t < self._window]

    def _forget_stale(self, now: float) -> None:
        for client in [c for c, t in self._clients.items() if not self._recent(t, now)]:
            del self._clients[client]
        while len(self._clients) >= _MAX_TRACKED_CLIENTS:
            oldest = min(self._clients, key=lambda c: self._clients[c][-1])
            del self._clients[oldest]
