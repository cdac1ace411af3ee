"""Start a request's coroutine at once, and give it a task only if it has to wait.

A task per request costs its creation, the TaskGroup's bookkeeping and, above all, a
turn of the event loop before its first step runs (one more epoll_wait). Many requests
never wait (a fetch that finds records, a produce with acks written, ListOffsets), and
the others do their decoding, checks and the log append before their first wait.
`start_eagerly` runs the coroutine up to its first suspension in the caller's task:
finished there, no task is made; suspended, `resume` carries on from that point in a
task of its own, as the task would have. (Python 3.12's eager task factory does this;
3.11 has none.)

What the caller must ensure: the coroutine's part before its first wait does not ask
for the current task (asyncio.timeout does: it would bind to the caller's task), nor set
a contextvar (it would land in the caller's context). The server starts eagerly only
the requests whose handlers it has checked for both (server.py, EAGER_REQUESTS).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


def start_eagerly(coroutine: Coroutine[Any, Any, None]) -> object | None:
    """Run `coroutine` until it finishes (None: done, its exceptions raised here) or
    waits; then what it waits on (a future, or _BARE_YIELD), to pass to `resume`."""
    try:
        yielded = coroutine.send(None)
    except StopIteration:
        return None
    return _BARE_YIELD if yielded is None else yielded


class _BareYield:
    """What a coroutine that yielded None (asyncio.sleep(0)) waits on."""


_BARE_YIELD = _BareYield()


class _Await:
    """Wait for a future without taking its result: the suspended coroutine takes it
    itself when it carries on (its own `await future` reads it)."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future) -> None:
        self.future = future

    def __await__(self) -> Generator[Any, None, None]:
        if not self.future.done():
            self.future._asyncio_future_blocking = True
            yield self.future


async def resume(coroutine: Coroutine[Any, Any, None], waiting_on: object) -> None:
    """Carry on `coroutine`, suspended by start_eagerly on `waiting_on`, in the current
    task: each time what it waits on is done it is sent None (it reads the outcome of
    its future itself); a cancel of this task reaches it where it waits."""
    while True:
        try:
            if waiting_on is _BARE_YIELD:
                await asyncio.sleep(0)
            else:
                assert isinstance(waiting_on, asyncio.Future)  # an asyncio coroutine waits on futures
                await _Await(waiting_on)
            thrown: BaseException | None = None
        except BaseException as error:
            # The future's own failure or cancel: the coroutine reads it from the future.
            # Anything else (this task cancelled once the future was done): thrown in.
            future = waiting_on if isinstance(waiting_on, asyncio.Future) else None
            own = future is not None and future.done() and (future.cancelled() or future.exception() is error)
            thrown = None if own else error
        try:
            yielded = coroutine.send(None) if thrown is None else coroutine.throw(thrown)
        except StopIteration:
            return
        waiting_on = _BARE_YIELD if yielded is None else yielded
