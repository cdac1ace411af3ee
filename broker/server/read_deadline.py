"""One deadline timer per connection for its read loop (broker/server/server.py).

The read loop waits under a deadline on every read (handshake, frame, idle: see
ClientSession._read_loop). `asyncio.timeout_at` per read builds a Timeout, schedules a
timer and cancels it, and asks for the running loop three times (each a getpid in
Python 3.11's C asyncio): on the request path that was several microseconds a request.
Here the connection keeps one timer. Moving the deadline later costs an assignment: the
timer stays where it was, and when it fires early it arms itself again at the deadline
then in force (an idle connection's timer fires once per idle_timeout_ms, not once per
read). Only a deadline earlier than the armed timer (a frame begun, whose
frame_timeout_ms is shorter than the idle one) reschedules it.

The semantics are asyncio.timeout's: a deadline that passes while the task waits inside
`with deadline.at(when):` cancels the task, and the block raises TimeoutError; a cancel
from anyone else stays a cancel. A deadline that passes while the task is outside the
block does nothing until the next `at`.
"""

from __future__ import annotations

import asyncio
import math

# A timer may fire this much before its time (uvloop keeps timers in milliseconds,
# asyncio runs those due within its clock resolution): within it the deadline counts
# as passed, so an early timer is not rearmed again and again.
DEADLINE_TOLERANCE_S = 0.001


class ReadDeadline:
    """The deadline of the one task that reads a connection; see the module docstring."""

    __slots__ = ("_loop", "_task", "_deadline", "_timer", "_timer_at", "_guarding", "_expired", "_cancelling")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task) -> None:
        self._loop = loop
        self._task = task
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._guarding = False
        self._expired = False
        self._cancelling = 0

    def at(self, deadline: float) -> ReadDeadline:
        """Set the deadline (loop time) for the block this is entered as."""
        self._deadline = deadline
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._fire)
            self._timer_at = deadline
        return self

    def __enter__(self) -> None:
        assert not self._guarding  # one block at a time: the read loop's
        self._guarding = True
        self._expired = False
        self._cancelling = self._task.cancelling()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
        self._guarding = False
        if self._expired:
            self._expired = False
            if self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
                raise TimeoutError from None

    def close(self) -> None:
        """The connection ended: the timer goes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self._deadline - self._loop.time() > DEADLINE_TOLERANCE_S:
            self.at(self._deadline)  # moved later since the timer was armed
        elif self._guarding and not self._expired:
            self._expired = True
            self._task.cancel()
