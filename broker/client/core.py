"""The client core: the small internal interface between a client and the parts built
on it (producer.py, consumer.py, queue.py, request.py). Not for applications: they use
AsyncClient's and Client's public methods.

A part reaches its client only through `client.core`, and through the client's public
methods (produce_batch, init_producer_id, partition_count, describe_topic...):

AsyncClientCore (`async_client.core`), on the client's event loop:
- call(request, timeout_ms, expect=ResponseType, retry=, records=, extra_ms=): one
  request bounded by the call's timeout (the client's by default, plus extra_ms for a
  long poll); returns the response typed as `expect`, or raises the client error its
  error code stands for. A response of another type than `expect` is a
  ProtocolViolation (UNEXPECTED_MESSAGE), never an AttributeError further on.
  `retry`: send again on a new connection after a ConnectionLost (idempotent requests
  only). `records`: the RecordBatch bytes the request carries.
- send(request, expect=, records=, retry=): the same without a deadline and without
  checking the error code; the caller bounds the time with deadline() and reads
  `error_code` itself. Both send a request again, backing off, while the server
  answers PARTITION_NOT_READY (nothing was done: the partition is still opening after
  a start), until the caller's deadline.
- deadline(timeout_ms, what, extra_ms=0): a block bounded by a call's timeout; Timeout
  (naming `what`) when it passes.
- own(part) / disown(part): a part the client closes (awaiting part.close()) when it
  closes, until the part closed itself.
- partition_counts (a read-only mapping, for hot paths), partition_count_cached(topic),
  forget_partition_count(topic): the partition counts DescribeTopic and CreateTopic
  taught the client (None: not known); a part that got UNKNOWN_PARTITION forgets the
  topic's, so the next lookup describes it again.
- timeout_ms: the client's default call timeout.
- requester: the client's request-reply part (request.py), None until the first
  request().

SyncClientCore (`client.core` of the blocking Client), from any thread but the loop's:
- run(coroutine, timeout_ms, extra_ms=0): run it on the client's loop and wait for its
  result (its own timeout, plus extra_ms and a grace); RuntimeError from the loop's own
  thread, ClientClosed once the client is closed.
- call_soon(callback, *args): schedule a plain callback on the loop (thread-safe).
- own(part) / disown(part): as above, with part.close() blocking.
- loop, async_client: the loop and the AsyncClient the parts' async halves run on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ..protocol import messages as m
from ..protocol.errors import ErrorCode
from .errors import (
    ClientClosed,
    ConnectionLost,
    NodiClientError,
    ProtocolViolation,
    Timeout,
    error_for,
    is_retriable,
)
from .types import backoff_s

if TYPE_CHECKING:
    from .async_client import AsyncClient
    from .connection import ClientConnection
    from .request import Requester

ResponseT = TypeVar("ResponseT", bound=m.Response)
ResultT = TypeVar("ResultT")

# How much longer than a call's own timeout the calling thread waits for its result.
RESULT_GRACE_S = 5.0
# A request answered PARTITION_NOT_READY is sent again after this backoff (doubled per
# attempt up to the max, with jitter), until the caller's deadline.
NOT_READY_BACKOFF_MS = 10
NOT_READY_BACKOFF_MAX_MS = 500


def expect_response(response: m.Response, expect: type[ResponseT]) -> ResponseT:
    """`response` as the type the caller asked for; ProtocolViolation if it is another."""
    if not isinstance(response, expect):
        raise ProtocolViolation(
            f"expected a {expect.__name__}, the server answered a {type(response).__name__}",
            code=ErrorCode.UNEXPECTED_MESSAGE,
        )
    return response


def check_error_code(response: ResponseT) -> ResponseT:
    """`response`, or the client error its error code stands for."""
    if response.error_code != ErrorCode.NONE:
        raise error_for(response.error_code, response.error_message)
    return response


# typeshed marks asyncio.Timeout final (make it with timeout()); at run time it is a plain
# class, and one subclass saves a context manager per call.
class Deadline(asyncio.Timeout):  # type: ignore[misc]
    """asyncio.timeout's context manager that raises nodi's Timeout, naming `what`, when
    the time passes (and for a TimeoutError the block raised that is not a NodiClientError):
    one context manager per call, not a generator-based one around asyncio.timeout."""

    def __init__(self, when: float, what: str, total_ms: int) -> None:
        super().__init__(when)
        self._what = what
        self._total_ms = total_ms

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            await super().__aexit__(exc_type, exc_value, traceback)
        except TimeoutError:  # the time passed
            raise self._timeout() from None
        if exc_type is not None and issubclass(exc_type, TimeoutError) and not issubclass(exc_type, NodiClientError):
            raise self._timeout() from None

    def _timeout(self) -> Timeout:
        return Timeout(f"{self._what} did not complete within {self._total_ms} ms")


class AsyncClientCore:
    """The interface an AsyncClient gives its parts; see the module docstring."""

    def __init__(self, client: AsyncClient, connect: Callable[[], Awaitable[ClientConnection]]) -> None:
        self._client = client
        self._connect = connect  # the live connection, opened (again) if need be
        self.parts: set = set()  # producers, consumers, queues, requesters to close with the client
        # topic -> partition count: describe once; forgotten on UNKNOWN_PARTITION. Parts
        # read it (a producer's send() does, per message); they change it only through
        # remember_partition_count and forget_partition_count.
        self._partition_counts: dict[str, int] = {}
        self.partition_counts: Mapping[str, int] = self._partition_counts
        self.requester: Requester | None = None  # request-reply's part, made by the first request()

    @property
    def timeout_ms(self) -> int:
        return self._client.timeout_ms

    # -- calls --------------------------------------------------------------------------

    def deadline(self, timeout_ms: int | None, what: str, extra_ms: int = 0) -> Deadline:
        """Bound the block by the call's timeout; raise Timeout when it passes."""
        timeout_ms = self._client.timeout_ms if timeout_ms is None else timeout_ms
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be positive")
        total_ms = timeout_ms + extra_ms
        return Deadline(asyncio.get_running_loop().time() + total_ms / 1000, what, total_ms)

    async def send(
        self,
        message: m.Request,
        *,
        expect: type[ResponseT],
        records: bytes | bytearray | memoryview | None = None,
        retry: bool = False,
    ) -> ResponseT:
        """Send on the live connection (opening it if need be); retried on a new
        connection after a ConnectionLost only when `retry` (idempotent requests). The
        caller bounds the time. Returns the response whatever its error code (an error
        the server answered instead of the API's response is raised)."""
        client = self._client
        attempt = not_ready = 0
        while True:
            connection = await self._connect()
            try:
                response = await connection.request(message, records)
            except ConnectionLost as error:
                if not retry or client.closed or not is_retriable(error):  # a refused authentication
                    raise
                attempt += 1
                await asyncio.sleep(backoff_s(attempt, client.reconnect_backoff_ms, client.reconnect_backoff_max_ms))
                continue
            if response.error_code != ErrorCode.PARTITION_NOT_READY or client.closed:
                break
            # Nothing was done: the partition opens in a moment (the caller's deadline bounds this).
            await asyncio.sleep(backoff_s(not_ready, NOT_READY_BACKOFF_MS, NOT_READY_BACKOFF_MAX_MS))
            not_ready += 1
        if isinstance(response, m.ErrorResponse):  # the server could not take the request
            check_error_code(response)
        return expect_response(response, expect)

    async def call(
        self,
        message: m.Request,
        timeout_ms: int | None,
        *,
        expect: type[ResponseT],
        retry: bool = False,
        records: bytes | bytearray | memoryview | None = None,
        extra_ms: int = 0,
    ) -> ResponseT:
        """One request with a deadline; the response as `expect`, or the error its code
        stands for."""
        async with self.deadline(timeout_ms, type(message).__name__.removesuffix("Request"), extra_ms):
            response = await self.send(message, expect=expect, records=records, retry=retry)
        return check_error_code(response)

    # -- parts --------------------------------------------------------------------------

    def own(self, part: Any) -> None:
        self.parts.add(part)

    def disown(self, part: Any) -> None:
        self.parts.discard(part)

    # -- the partition counts -----------------------------------------------------------

    def partition_count_cached(self, topic: str) -> int | None:
        return self._partition_counts.get(topic)

    def remember_partition_count(self, topic: str, count: int) -> None:
        self._partition_counts[topic] = count

    def forget_partition_count(self, topic: str) -> None:
        self._partition_counts.pop(topic, None)


class SyncClientCore:
    """The interface a blocking Client gives its parts; see the module docstring."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        is_closed: Callable[[], bool],
        default_timeout_ms: int,
    ) -> None:
        self.loop = loop
        self._thread = thread
        self._is_closed = is_closed
        self._default_timeout_ms = default_timeout_ms  # until the AsyncClient is there
        self._async_client: AsyncClient | None = None
        self.parts: set = set()  # producers, consumers and queues to close with the client

    @property
    def async_client(self) -> AsyncClient:
        assert self._async_client is not None, "the AsyncClient is made first"
        return self._async_client

    @async_client.setter
    def async_client(self, client: AsyncClient) -> None:
        self._async_client = client

    def run(self, coroutine: Coroutine[Any, Any, ResultT], timeout_ms: int | None, extra_ms: int = 0) -> ResultT:
        """Run `coroutine` on the client's loop and wait for it (its own timeout,
        `timeout_ms` or the client's, plus `extra_ms` and a grace)."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a Client method was called from the client's own event loop thread")
        if self._is_closed():
            coroutine.close()
            raise ClientClosed("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        if timeout_ms is None:
            timeout_ms = self._async_client.timeout_ms if self._async_client is not None else self._default_timeout_ms
        try:
            return future.result((timeout_ms + extra_ms) / 1000 + RESULT_GRACE_S)
        except concurrent.futures.TimeoutError:  # also the builtin TimeoutError, so a Timeout the call raised
            if future.done() and not future.cancelled():
                raise  # the call's own error (a Timeout with its message), not this wait running out
            future.cancel()
            raise Timeout(f"no result within {timeout_ms} ms") from None
        except concurrent.futures.CancelledError:
            raise ClientClosed("the call was cancelled: the client is closing") from None

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        """Schedule `callback(*args)` on the client's loop (from any thread)."""
        self.loop.call_soon_threadsafe(callback, *args)

    def own(self, part: Any) -> None:
        self.parts.add(part)

    def disown(self, part: Any) -> None:
        self.parts.discard(part)


__all__ = ["AsyncClientCore", "Deadline", "SyncClientCore", "ResponseT", "expect_response", "check_error_code"]
