"""The broker's clock: the one place the Broker service and everything under it read the
time that decides behaviour (message TTL and delayed delivery in queues, lease expiry and
dead-letter backoff, publish-dedup windows, group session timeouts, idle inboxes,
retention and segment-roll deadlines, compaction's delete-retention).

A clock answers two questions: time_ms() (wall-clock milliseconds since the epoch, what
message timestamps are compared with) and monotonic() (seconds, for intervals). The
server and the embedded mode use SYSTEM_CLOCK unless given another one.

ManualClock is the real clock plus an offset that only moves forward when told
(advance(ms)): tests use it to make a TTL, a dedup window or a lease run out without
sleeping for it. In-process: `nodi.broker.open(dir, clock=ManualClock())` or
`LocalBroker.open(config, clock=...)` / `Server(config, clock=...)`.

For a real server process, the test-only FileClock: the environment variable
NODI_TEST_CLOCK_FILE names a file holding the offset in milliseconds (an integer, written
by the test; missing or empty: 0). It is refused unless NODI_TEST_CLOCK_ALLOWED=1 is set
too, and the server logs a warning at start while it runs on it: it is never for
production. Reading waits are not shortened: what moves is the time that deadlines are
compared with, and the timers that compare (queue timer, group sessions) wake at least
every TIMER_INTERVAL_MAX_S / 0.2 s, so an advance is seen within that.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Protocol

from nodi.storage.errors import NodiError

TEST_CLOCK_FILE_ENV = "NODI_TEST_CLOCK_FILE"
TEST_CLOCK_ALLOWED_ENV = "NODI_TEST_CLOCK_ALLOWED"
# The offset file is a test's: a longer one is refused as not an offset.
TEST_CLOCK_FILE_BYTES_MAX = 64


class Clock(Protocol):
    def time_ms(self) -> int:
        """Wall-clock milliseconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary start, never going back."""
        ...


class SystemClock:
    """The real clock."""

    def time_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """The real clock plus an offset moved forward by advance(): time never goes back,
    and between advances it runs as the real one does. Safe to advance from any thread."""

    def __init__(self) -> None:
        self._offset_ms = 0
        self._lock = threading.Lock()

    def advance(self, ms: int) -> None:
        if ms < 0:
            raise ValueError(f"a clock only moves forward: advance({ms})")
        with self._lock:
            self._offset_ms += ms

    @property
    def offset_ms(self) -> int:
        return self._offset_ms

    def time_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self._offset_ms

    def monotonic(self) -> float:
        return time.monotonic() + self._offset_ms / 1000


class TestClockRefusedError(NodiError):
    """NODI_TEST_CLOCK_FILE set without NODI_TEST_CLOCK_ALLOWED=1, or its file not an offset."""

    __test__ = False  # not a pytest test class


class FileClock:
    """Test-only: the real clock plus the offset (ms) a test writes into `path`, read on
    every call. A missing or empty file is offset 0; an offset never goes back (a
    smaller one written later is ignored); a file that is not a non-negative integer is
    refused at start (check()) and, later, leaves the last offset read in place."""

    __test__ = False  # not a pytest test class

    def __init__(self, path: str) -> None:
        self.path = path
        self._offset_ms = 0
        self._lock = threading.Lock()

    def check(self) -> None:
        """Refuse (TestClockRefusedError) a file that is not an offset: at start."""
        self._read(strict=True)

    def _read(self, *, strict: bool) -> int:
        try:
            with open(self.path, "rb") as file:
                text = file.read(TEST_CLOCK_FILE_BYTES_MAX + 1).strip()
        except FileNotFoundError:
            text = b""
        except OSError as error:
            if strict:
                raise TestClockRefusedError(f"{self.path}: {error.strerror}") from None
            return self._offset_ms  # running: the last offset read stays
        if len(text) > TEST_CLOCK_FILE_BYTES_MAX or (text and not text.isdigit()):
            if strict:
                raise TestClockRefusedError(f"{self.path}: not an offset in milliseconds: {text[:32]!r}")
            return self._offset_ms
        with self._lock:
            self._offset_ms = max(self._offset_ms, int(text or b"0"))
            return self._offset_ms

    def __repr__(self) -> str:
        return self.path

    def time_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self._read(strict=False)

    def monotonic(self) -> float:
        return time.monotonic() + self._read(strict=False) / 1000


def clock_from_environment(environ: os._Environ[str] | dict[str, str] | None = None) -> Clock:
    """SYSTEM_CLOCK, or the test-only FileClock when NODI_TEST_CLOCK_FILE is set (refused
    with TestClockRefusedError unless NODI_TEST_CLOCK_ALLOWED=1 is set as well)."""
    env = os.environ if environ is None else environ
    path = env.get(TEST_CLOCK_FILE_ENV)
    if not path:
        return SYSTEM_CLOCK
    if env.get(TEST_CLOCK_ALLOWED_ENV) != "1":
        raise TestClockRefusedError(
            f"{TEST_CLOCK_FILE_ENV} is set but {TEST_CLOCK_ALLOWED_ENV}=1 is not: the file clock is for tests only"
        )
    clock = FileClock(path)
    clock.check()  # a malformed file is refused at start, not at the first deadline
    return clock
