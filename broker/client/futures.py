"""MessageFuture: the concurrent.futures.Future the sync Producer returns for each message.

A plain concurrent.futures.Future builds a threading.Condition (a lock, a deque, lists)
when it is made: about 1 us, and enough garbage-collected containers that, with 100,000
futures alive, the collector's passes cost several times that. A producer makes one
future per message, so MessageFuture defers all of it: its condition and its waiter and
callback lists are made the first time anything looks at the future (result(), done(),
add_done_callback(), concurrent.futures.wait...). A future nobody looked at before it was
resolved is resolved without them (`resolve`), under one module lock shared with that
lazy creation, so a thread that starts waiting at the same moment either sees the result
or is notified.

It relies on the attributes CPython's concurrent.futures.Future keeps (_state, _result,
_exception, _condition, _waiters, _done_callbacks), stable since Python 3.8;
tests/test_client.py checks the behaviour with result(), callbacks, wait() and
as_completed().
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from concurrent.futures._base import FINISHED, PENDING

_LOCK = threading.Lock()


class MessageFuture(concurrent.futures.Future):
    def __init__(self) -> None:  # noqa: D107 - deliberately not calling Future.__init__
        self._state = PENDING
        self._result = None
        self._exception = None
        self._lazy_condition: threading.Condition | None = None

    # Future.__init__ sets these three as plain attributes; here they are properties
    # that build them on first use (the point of this class), which mypy reads as
    # narrowing a writable attribute.
    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        condition = self._lazy_condition
        if condition is None:
            with _LOCK:
                condition = self._lazy_condition
                if condition is None:
                    condition = self._lazy_condition = threading.Condition()
        return condition

    @property
    def _waiters(self) -> list:  # type: ignore[override]
        return self.__dict__.setdefault("_lazy_waiters", [])

    @property
    def _done_callbacks(self) -> list:
        return self.__dict__.setdefault("_lazy_callbacks", [])


def resolve(futures: list, results: list | None, error: BaseException | None) -> None:
    """Set each future's result (results[i]) or `error`. MessageFutures nobody has looked
    at are set directly; any other future (or one being waited on) through its own
    set_result / set_exception. Futures already done (cancelled) are skipped."""
    if error is None and results is None:
        raise ValueError("resolve() needs results when there is no error")
    if futures and type(futures[0]) is asyncio.Future:
        # An AsyncProducer's: the loop's futures (only ever set from the loop), in one pass.
        if error is None:
            for future, result in zip(futures, results or ()):
                if not future.done():
                    future.set_result(result)
        else:
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        return
    slow = []
    with _LOCK:
        for index, future in enumerate(futures):
            if type(future) is MessageFuture and future._lazy_condition is None:
                # Nothing looked at it, so nothing cancelled it: it is PENDING.
                if results is not None:
                    future._result = results[index]
                else:
                    future._exception = error
                future._state = FINISHED
            else:
                slow.append(index)
    for index in slow:
        future = futures[index]
        if future.done():
            continue
        if results is not None and error is None:
            future.set_result(results[index])
        else:
            future.set_exception(error)
