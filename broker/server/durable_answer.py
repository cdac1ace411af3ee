"""A durable produce's acknowledgement without a task of its own.

A produce with acks durable used to be a task per request: it appended, waited on a
future that the fsync's readable notification settled, and resumed a loop turn later to
build and write its reply. A DurableAnswer takes the future's place in the partition's
durable waiters (broker/server/service.py, _PartitionWaiters: it has the three methods
they call, `done`, `set_result` and `set_exception`), and when the fsync that covers it
settles it, it builds the reply and hands it to its connection at once, in the same
callback, for every produce that fsync covers.

It ends exactly once: settled (the reply), failed (the fsync's sticky error, the log
closed), expired (its timeout: NOT_DURABLE), or cancelled (its connection closed: no
reply). The connection keeps its unanswered ones (server.py), at most
in_flight_requests_max since each is a request in flight, and cancels them when it
closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nodi.storage.errors import DurableWaitTimeoutError

from ..protocol import messages as m
from ..protocol.errors import ErrorCode
from .reply import Reply, error_code_for, error_reply

log = logging.getLogger("nodi.broker")


class DurableAnswer:
    """One durable produce waiting for its fsync; `deliver(answer, reply)` is called
    once, unless cancelled first."""

    __slots__ = ("_request", "_reply_of", "_deliver", "_expiry", "_done", "_first_offset", "_last_offset")

    def __init__(
        self,
        request: m.ProduceRequest,
        reply_of: Callable[[], Reply],
        deliver: Callable[[DurableAnswer, Reply], None],
        first_offset: int,
        last_offset: int,
    ) -> None:
        self._request = request
        self._reply_of = reply_of  # the success reply, built when durable
        self._deliver = deliver
        self._expiry: asyncio.TimerHandle | None = None
        self._done = False
        self._first_offset = first_offset
        self._last_offset = last_offset

    def expire_after(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        """No fsync within `timeout_s`: answered NOT_DURABLE (written, not durable)."""
        if not self._done:
            self._expiry = loop.call_later(timeout_s, self._expire, timeout_s)

    # What _PartitionWaiters calls, as on a future.

    def done(self) -> bool:
        return self._done

    def set_result(self, _value: object) -> None:
        self._finish(self._reply_of())

    def set_exception(self, error: BaseException) -> None:
        if error_code_for(error) is ErrorCode.INTERNAL:
            log.error("internal error serving a durable produce", exc_info=error)
        self._finish(error_reply(self._request, error))

    def cancel(self) -> None:
        """Its connection closed: no reply, and settling it later does nothing."""
        self._done = True
        if self._expiry is not None:
            self._expiry.cancel()

    def _expire(self, timeout_s: float) -> None:
        if not self._done:
            self.set_exception(
                DurableWaitTimeoutError(
                    f"written at offsets {self._first_offset}..{self._last_offset} but not fsynced within "
                    f"{timeout_s * 1000:.0f} ms"
                )
            )

    def _finish(self, reply: Reply) -> None:
        assert not self._done  # the waiters and the timer settle only what is not done
        self._done = True
        if self._expiry is not None:
            self._expiry.cancel()
        self._deliver(self, reply)
