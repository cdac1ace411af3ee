"""Client: the blocking Python client, the same surface as AsyncClient.

    with Client("127.0.0.1:6634") as client:
        client.create_topic("orders", partitions=3)
        partition, offset = client.produce("orders", b"hello", key="customer-1")

It owns a private event loop in a background thread, runs an AsyncClient there, and each
method submits the coroutine with asyncio.run_coroutine_threadsafe and waits for its
result (the coroutine's own timeout applies; the wait gives it a little more, then
cancels it). close() closes the AsyncClient and its producers and consumers, stops the
loop and joins the thread. Methods may be called from any thread, except from the
client's own loop thread (a producer future's callback runs there): that would deadlock,
and raises RuntimeError instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import threading
from collections.abc import Coroutine
from typing import Any

from .client_async import DEFAULT_TIMEOUT_MS, AsyncClient
from .client_errors import ClientClosed, Timeout

# How much longer than a call's own timeout the calling thread waits for its result.
RESULT_GRACE_S = 5.0
# close(): how long to wait for the loop thread to finish.
CLOSE_JOIN_TIMEOUT_S = 30.0


class Client:
    """See the module docstring. Keyword options are AsyncClient's: timeout_ms,
    client_id, reconnect_backoff_ms, reconnect_backoff_max_ms, reconnect_attempts_max,
    limits."""

    def __init__(self, address: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop_main, name="nodi-client-loop", daemon=True)
        self._closed = False
        self._owned: set = set()
        self._thread.start()
        try:
            self._async: AsyncClient = self._run(self._make_client(address, options), None)
        except BaseException:
            self._stop_loop()
            raise

    async def _make_client(self, address: str | None, options: dict) -> AsyncClient:
        return AsyncClient(address, **options)

    def _loop_main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _run(self, coroutine: Coroutine, timeout_ms: int | None, extra_ms: int = 0) -> Any:
        """Run `coroutine` on the client's loop and wait for it (its own timeout,
        `timeout_ms` or the client's, plus `extra_ms` and a grace)."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a Client method was called from the client's own event loop thread")
        if self._closed:
            coroutine.close()
            raise ClientClosed("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        if timeout_ms is None:
            timeout_ms = self._async.timeout_ms if hasattr(self, "_async") else DEFAULT_TIMEOUT_MS
        try:
            return future.result((timeout_ms + extra_ms) / 1000 + RESULT_GRACE_S)
        except concurrent.futures.TimeoutError:  # also the builtin TimeoutError, so a Timeout the call raised
            if future.done() and not future.cancelled():
                raise  # the call's own error (a Timeout with its message), not this wait running out
            future.cancel()
            raise Timeout(f"no result within {timeout_ms} ms") from None
        except concurrent.futures.CancelledError:
            raise ClientClosed("the call was cancelled: the client is closing") from None

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.address} {'closed' if self._closed else 'open'}>"

    @property
    def address(self) -> str:
        return self._async.address

    @property
    def timeout_ms(self) -> int:
        return self._async.timeout_ms

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def undecodable_batches_skipped(self) -> int:
        """Fetched batches left out because their records do not decode (each logged)."""
        return self._async.undecodable_batches_skipped

    def connect(self, timeout_ms: int | None = None) -> None:
        """Open the connection now (else the first call does)."""
        self._run(self._async.connect(timeout_ms), timeout_ms)

    def close(self) -> None:
        """Close producers and consumers (flushing, committing), the connection, the
        loop and its thread."""
        if self._closed:
            return
        for owned in list(self._owned):
            with contextlib.suppress(Exception):
                owned.close()
        try:
            self._run(self._async.close(), None)
        finally:
            self._closed = True
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_JOIN_TIMEOUT_S)

    def server_limits(self) -> dict[str, int]:
        return self._async.server_limits()

    # -- producers and consumers --------------------------------------------------------

    def producer(self, **options: Any):
        """A batching Producer (see producer.py): send() returns a
        concurrent.futures.Future of (partition, offset)."""
        from .producer import Producer

        return Producer(self, **options)

    def consumer(self, topics, group: str | None = None, **options: Any):
        """A Consumer (see consumer.py): iterate it, or poll()."""
        from .consumer import Consumer

        return Consumer(self, topics, group, **options)

    def queue(self, topic: str, group: str, **options: Any):
        """A Queue of queue group `group` on `topic` (see queue_client.py): iterate it,
        or receive(timeout_ms=...); ack, nack, in_progress or reject each message."""
        from .queue_client import Queue

        return Queue(self, topic, group, **options)


def _blocking(name: str):
    """Client.<name>: AsyncClient.<name> run on the client's loop."""
    method = getattr(AsyncClient, name)

    @functools.wraps(method)
    def call(self: Client, *args: Any, **kwargs: Any) -> Any:
        coroutine = getattr(self._async, name)(*args, **kwargs)
        return self._run(coroutine, kwargs.get("timeout_ms"), kwargs.get("wait_ms") or 0)

    call.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    return call


for _name in (
    "create_topic",
    "delete_topic",
    "list_topics",
    "describe_topic",
    "partition_count",
    "produce",
    "produce_batch",
    "fetch",
    "fetch_with_position",
    "list_offsets",
    "resolve_start",
    "init_producer_id",
    "list_groups",
    "describe_group",
    "describe_queue",
    "request",
    "list_queues",
    "reset_group",
    "commit_offsets",
    "fetch_offsets",
    "server_status",
    "compact_topic",
):
    setattr(Client, _name, _blocking(_name))
del _name

__all__ = ["Client"]
