"""The console's logins: a server-side session table and a per-address login limit.

A session is created by a right user name and password (checked by Security.authenticate,
scrypt off the event loop). The browser holds only a random session id in an HttpOnly,
SameSite=Strict cookie (Secure under TLS); the table keys on the id's SHA-256, so the
table's contents do not let anyone act as a user. A session holds the user's name (its
permissions are looked up in the users file on every request, so a SIGHUP that changes
them or removes the user applies at once) and a random form token (CSRF: every POST
form carries it). A session idle for `session_idle_ms` is gone; the table holds at most
`sessions_max`, and a login beyond that ends the least recently used session.

Failed sign-ins are limited per source address: after `login_attempts_max` within
`login_window_ms`, the address is answered 429 (before any password check) until the
window has passed; the limiter remembers at most `login_sources_max` addresses (the
oldest forgotten first).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

SESSION_COOKIE = "nodi_console_session"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    # Sessions at once; a login beyond it ends the least recently used one.
    sessions_max: int = 1_000
    # A session unused this long is ended (its next request gets the login form).
    session_idle_ms: int = 30 * 60 * 1000
    # A session ends this long after its login, used or not.
    session_lifetime_ms: int = 12 * 60 * 60 * 1000
    # Failed sign-ins from one address within login_window_ms; then 429 until it passes.
    login_attempts_max: int = 10
    login_window_ms: int = 60_000
    # Addresses the login limiter remembers.
    login_sources_max: int = 10_000


DEFAULT_SESSION_LIMITS = SessionLimits()


@dataclass(slots=True)
class Session:
    user: str
    form_token: str
    created_monotonic: float
    used_monotonic: float


def _digest(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", errors="replace")).digest()


class Sessions:
    """The session table and the login limiter (used on the broker's loop only)."""

    def __init__(self, limits: SessionLimits = DEFAULT_SESSION_LIMITS, clock=time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self._attempts: OrderedDict[str, deque[float]] = OrderedDict()
        self.sessions_evicted = 0
        self.sessions_expired = 0
        self.logins_limited = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, user: str) -> tuple[str, Session]:
        """A new session of `user`: its id (for the cookie only) and the session."""
        now = self._clock()
        session_id = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(24), now, now)
        self._sessions[_digest(session_id)] = session
        while len(self._sessions) > self.limits.sessions_max:
            self._sessions.popitem(last=False)
            self.sessions_evicted += 1
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of this id (marked used), or None (unknown, idle too long,
        or too old: then ended)."""
        if not session_id:
            return None
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        if self._expired(session):
            del self._sessions[key]
            self.sessions_expired += 1
            return None
        session.used_monotonic = self._clock()
        self._sessions.move_to_end(key)
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)

    def end_expired(self) -> None:
        """Drop every session idle or old past its limits (a periodic sweep)."""
        for key in [key for key, session in self._sessions.items() if self._expired(session)]:
            del self._sessions[key]
            self.sessions_expired += 1

    def _expired(self, session: Session) -> bool:
        now = self._clock()
        return (
            now - session.used_monotonic > self.limits.session_idle_ms / 1000
            or now - session.created_monotonic > self.limits.session_lifetime_ms / 1000
        )

    def login_allowed(self, address: str) -> bool:
        """Whether `address` may try to sign in now: False (counted) when it failed
        login_attempts_max times within login_window_ms."""
        attempts = self._attempts.get(address)
        if attempts is None:
            return True
        window_s = self.limits.login_window_ms / 1000
        now = self._clock()
        while attempts and now - attempts[0] > window_s:
            attempts.popleft()
        if len(attempts) >= self.limits.login_attempts_max:
            self.logins_limited += 1
            return False
        return True

    def login_failed(self, address: str) -> None:
        """Count one failed sign-in from `address`."""
        attempts = self._attempts.get(address)
        if attempts is None:
            attempts = self._attempts[address] = deque()
            while len(self._attempts) > self.limits.login_sources_max:
                self._attempts.popitem(last=False)
        self._attempts.move_to_end(address)
        attempts.append(self._clock())
        while len(attempts) > self.limits.login_attempts_max:
            attempts.popleft()


def cookie_value(header: str, name: str = SESSION_COOKIE) -> str | None:
    """The value of cookie `name` in a Cookie header, or None."""
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def set_cookie(session_id: str, *, secure: bool) -> str:
    """The Set-Cookie value for a session: no lifetime (ends with the browser; the
    server ends it sooner when idle), HttpOnly, SameSite=Strict, Secure under TLS."""
    return f"{SESSION_COOKIE}={session_id}; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")


def clear_cookie(*, secure: bool) -> str:
    return f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
