"""The batching producer: `client.producer(...)` on an AsyncClient (AsyncProducer, whose
send() returns asyncio futures) or a Client (Producer, whose send() returns
concurrent.futures futures, from any thread).

    producer = client.producer(linger_ms=5)
    future = producer.send("orders", b"...", key="customer-1")
    producer.flush()                 # everything sent so far is acknowledged, or SendFailed
    partition, offset = future.result()
    partition, offset = producer.send_and_wait("orders", b"...")   # one message, no linger

flush() raises SendFailed when messages sent before it failed (how many, and the first
error; each future holds its own), so a loop of send() and one flush() need not check
every future. Each failure is reported by one flush; close() logs those no flush
reported, it does not raise them.

Options: linger_ms (5), batch_bytes_max (256 KiB), acks ("durable"), idempotent (True),
compression ("none", "gzip", "snappy", "lz4" or "zstd"), max_in_flight (32 batches), delivery_timeout_ms (120 s),
buffer_bytes_max (32 MiB of messages not yet acknowledged: beyond it the sync send()
blocks, up to timeout_ms, and the async send() raises BufferFull until
`await wait_for_space()`), timeout_ms (per request; the client's by default).

Each producer is two objects, as aiokafka's is: a RecordAccumulator (accumulator.py:
buffers per partition, batching by size and linger, partitioning, back-pressure; called
from any thread) and a Sender (sender.py: the task on the client's loop that builds and
sends the batches: in-flight limits, idempotence, retries, publish dedup). Their
docstrings say how each works.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from functools import partial
from typing import TYPE_CHECKING, Any

from nodi.storage.errors import NodiError
from nodi.storage.limits import KIB, MIB

from .accumulator import RecordAccumulator
from .core import RESULT_GRACE_S
from .errors import Timeout
from .features import with_features
from .futures import MessageFuture
from .sender import Sender
from .types import partition_for_key, timestamp_ms_of, to_bytes, to_headers

if TYPE_CHECKING:
    from .async_client import AsyncClient
    from .sync_client import Client


def producer_options(
    linger_ms: float = 5,
    batch_bytes_max: int = 256 * KIB,
    acks: str = "durable",
    idempotent: bool = True,
    compression: str = "none",
    max_in_flight: int = 32,
    delivery_timeout_ms: int = 120_000,
    buffer_bytes_max: int = 32 * MIB,
    timeout_ms: int | None = None,
) -> dict:
    """The producer options with their defaults (the module docstring documents them)."""
    return dict(
        linger_ms=linger_ms,
        batch_bytes_max=batch_bytes_max,
        acks=acks,
        idempotent=idempotent,
        compression=compression,
        max_in_flight=max_in_flight,
        delivery_timeout_ms=delivery_timeout_ms,
        buffer_bytes_max=buffer_bytes_max,
        timeout_ms=timeout_ms,
    )


def producer_parts(
    client: AsyncClient, loop: asyncio.AbstractEventLoop, *, threadsafe: bool, **options: Any
) -> tuple[RecordAccumulator, Sender]:
    """The accumulator and the sender of one producer, the accumulator waking the
    sender's task on `loop` (from any thread when `threadsafe`)."""
    settings = producer_options(**options)
    wake_event = asyncio.Event()
    wake = partial(loop.call_soon_threadsafe, wake_event.set) if threadsafe else wake_event.set
    accumulator = RecordAccumulator(
        linger_ms=settings["linger_ms"],
        batch_bytes_max=settings["batch_bytes_max"],
        buffer_bytes_max=settings["buffer_bytes_max"],
        wake=wake,
    )
    sender = Sender(
        client,
        loop,
        accumulator,
        wake_event,
        acks=settings["acks"],
        idempotent=settings["idempotent"],
        compression=settings["compression"],
        max_in_flight=settings["max_in_flight"],
        delivery_timeout_ms=settings["delivery_timeout_ms"],
        timeout_ms=settings["timeout_ms"],
    )
    return accumulator, sender


async def wait_for_space(accumulator: RecordAccumulator, sender: Sender, timeout_ms: int) -> None:
    """Wait (on the client's loop) until at most half of buffer_bytes_max is held by
    messages not yet acknowledged; Timeout after timeout_ms."""
    try:
        async with asyncio.timeout(timeout_ms / 1000):
            while not accumulator.has_space():
                await sender.wait_for_progress()
    except TimeoutError:
        raise Timeout(f"no room in the producer's buffer within {timeout_ms} ms") from None


class AsyncProducer:
    """A batching producer on an AsyncClient; see the module docstring. Options:
    linger_ms (5), batch_bytes_max (256 KiB), acks ("durable"), idempotent (True),
    compression ("none", "gzip", "snappy", "lz4" or "zstd"), max_in_flight (32 batches), delivery_timeout_ms
    (120 s), timeout_ms (per request; the client's by default)."""

    def __init__(self, client: AsyncClient, **options: Any) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._accumulator, self._sender = producer_parts(client, self._loop, threadsafe=False, **options)
        self._partition_counts = client.core.partition_counts  # read by send(), the hot path
        # Messages for topics whose partition count is being looked up, in send order.
        self._unrouted: dict[str, list[tuple]] = {}
        self._lookups: dict[str, asyncio.Task] = {}
        # Futures of send_and_wait() messages among those waiting for a lookup: their
        # batch is sealed as soon as they are appended (at most one per waiting call).
        self._urgent: set[asyncio.Future] = set()
        client.core.own(self)

    async def __aenter__(self) -> AsyncProducer:
        self._sender.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def send(
        self,
        topic: str,
        value,
        *,
        key=None,
        headers=None,
        partition: int | None = None,
        timestamp=None,
        ttl_ms: int | None = None,
        delay_ms: int | None = None,
        deliver_at=None,
        idempotency_key=None,
    ) -> asyncio.Future:
        """Queue one message; the future resolves to (partition, offset) once the batch
        holding it is acknowledged. BufferFull when buffer_bytes_max of messages wait
        for acknowledgement (see wait_for_space). ttl_ms, delay_ms / deliver_at and
        idempotency_key as for client.produce(): a message whose key the topic saw within
        its dedup window resolves to the original's (partition, offset)."""
        future = self._loop.create_future()
        if key is not None:
            key = to_bytes(key, "key")
        if type(value) is not bytes:
            value = to_bytes(value)
        headers = to_headers(headers) if headers else ()
        if (
            headers
            or ttl_ms is not None
            or delay_ms is not None
            or deliver_at is not None
            or idempotency_key is not None
        ):
            headers = with_features(
                headers, ttl_ms=ttl_ms, delay_ms=delay_ms, deliver_at=deliver_at, idempotency_key=idempotency_key
            )
        timestamp_ms = None if timestamp is None else timestamp_ms_of(timestamp)
        count = self._partition_counts.get(topic)
        if topic in self._unrouted or (count is None and partition is None):
            # Behind the messages already waiting for this topic's partition count.
            self._unrouted.setdefault(topic, []).append((key, value, headers, timestamp_ms, partition, future))
            if topic not in self._lookups:
                self._lookups[topic] = self._loop.create_task(self._route_later(topic))
            return future
        if count is None:
            count = 0
        if partition is None and key is not None:
            partition = partition_for_key(key, count)
        if self._sender.task is None:
            self._sender.start()
        self._accumulator.append(topic, partition, count, key, value, headers, timestamp_ms, future)
        return future

    async def _route_later(self, topic: str) -> None:
        failure: NodiError | None = None
        try:
            count = await self._client.partition_count(topic, timeout_ms=self._sender.timeout_ms)
        except NodiError as error:
            count, failure = 0, error
        finally:
            del self._lookups[topic]
        waiting = self._unrouted.pop(topic, [])
        for key, value, headers, timestamp_ms, partition, future in waiting:
            if failure is not None:
                self._fail_unrouted(future, failure)
                continue
            if partition is None and key is not None:
                partition = partition_for_key(key, count)
            try:
                self._sender.start()
                self._accumulator.append(topic, partition, count, key, value, headers, timestamp_ms, future)
            except NodiError as error:
                self._fail_unrouted(future, error)
                continue
            if future in self._urgent:
                self._urgent.discard(future)
                self._accumulator.seal_holding(future)

    def _fail_unrouted(self, future: asyncio.Future, error: BaseException) -> None:
        """A message that never reached the accumulator failed: its future, and the
        next flush, report it."""
        self._urgent.discard(future)
        if not future.done():
            future.set_exception(error)
        self._sender.record_failure(1, error)

    async def send_and_wait(
        self,
        topic: str,
        value,
        *,
        key=None,
        headers=None,
        partition: int | None = None,
        timestamp=None,
        ttl_ms: int | None = None,
        delay_ms: int | None = None,
        deliver_at=None,
        idempotency_key=None,
    ) -> tuple[int, int]:
        """Wait for buffer space, send() one message and wait for its (partition,
        offset). Its batch goes out at once, without waiting for linger_ms (with the
        messages already buffered for that partition); its failure is raised here."""
        await self.wait_for_space()
        future = self.send(
            topic,
            value,
            key=key,
            headers=headers,
            partition=partition,
            timestamp=timestamp,
            ttl_ms=ttl_ms,
            delay_ms=delay_ms,
            deliver_at=deliver_at,
            idempotency_key=idempotency_key,
        )
        if topic in self._unrouted and not future.done():
            self._urgent.add(future)  # sealed once its topic's partition count is known
        else:
            self._accumulator.seal_holding(future)
        return await future

    async def wait_for_space(self, timeout_ms: int | None = None) -> None:
        """Wait until at most half of buffer_bytes_max is held by messages not yet
        acknowledged."""
        await wait_for_space(
            self._accumulator, self._sender, self._client.timeout_ms if timeout_ms is None else timeout_ms
        )

    async def flush(self, timeout_ms: int | None = None) -> None:
        """Wait until every message sent so far is acknowledged or failed. SendFailed
        when some failed that no flush reported yet: how many (`failed`) and the first
        error (`first`); each message's future holds its own."""
        for task in list(self._lookups.values()):
            await task
        await self._sender.flush(timeout_ms)

    async def close(self, timeout_ms: int | None = None) -> None:
        """Flush, then stop. Failures no flush reported are logged, not raised."""
        try:
            for task in list(self._lookups.values()):
                await task
            await self._sender.close(timeout_ms)
        finally:
            self._client.core.disown(self)


class Producer:
    """The batching producer of a sync Client; send() may be called from any thread and
    returns a concurrent.futures.Future. Same options as AsyncProducer."""

    def __init__(self, client: Client, **options: Any) -> None:
        self._core = client.core  # the sync Client's
        self._async_client = client.core.async_client
        self._client = client
        self._accumulator, self._sender = producer_parts(
            self._async_client, self._core.loop, threadsafe=True, **options
        )
        self._block_s = (self._sender.timeout_ms or self._async_client.timeout_ms) / 1000
        self._partition_counts = self._async_client.core.partition_counts  # read by send(), the hot path
        self._core.run(self._start(), None)
        self._core.own(self)

    async def _start(self) -> None:
        self._sender.start()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def send(
        self,
        topic: str,
        value,
        *,
        key=None,
        headers=None,
        partition: int | None = None,
        timestamp=None,
        ttl_ms: int | None = None,
        delay_ms: int | None = None,
        deliver_at=None,
        idempotency_key=None,
    ) -> MessageFuture:
        """Queue one message; the future resolves to (partition, offset) once the batch
        holding it is acknowledged. The first message for a topic looks up its partition
        count (a blocking call); a full buffer blocks until there is room (Timeout after
        timeout_ms). ttl_ms, delay_ms / deliver_at and idempotency_key as for
        client.produce()."""
        key = to_bytes(key, "key")
        value = to_bytes(value)
        headers = to_headers(headers) if headers else ()
        if (
            headers
            or ttl_ms is not None
            or delay_ms is not None
            or deliver_at is not None
            or idempotency_key is not None
        ):
            headers = with_features(
                headers, ttl_ms=ttl_ms, delay_ms=delay_ms, deliver_at=deliver_at, idempotency_key=idempotency_key
            )
        count = self._partition_counts.get(topic)
        if count is None:
            if partition is None:
                count = self._client.partition_count(topic)
            else:
                count = 0
        if partition is None and key is not None:
            partition = partition_for_key(key, count)
        future = MessageFuture()
        self._accumulator.append(
            topic,
            partition,
            count,
            key,
            value,
            headers,
            None if timestamp is None else timestamp_ms_of(timestamp),
            future,
            self._block_s,
        )
        return future

    def send_and_wait(
        self,
        topic: str,
        value,
        *,
        key=None,
        headers=None,
        partition: int | None = None,
        timestamp=None,
        ttl_ms: int | None = None,
        delay_ms: int | None = None,
        deliver_at=None,
        idempotency_key=None,
    ) -> tuple[int, int]:
        """send() one message and wait for its (partition, offset). Its batch goes out
        at once, without waiting for linger_ms (with the messages already buffered for
        that partition); its failure is raised here. Timeout past delivery_timeout_ms
        plus the request timeout."""
        future = self.send(
            topic,
            value,
            key=key,
            headers=headers,
            partition=partition,
            timestamp=timestamp,
            ttl_ms=ttl_ms,
            delay_ms=delay_ms,
            deliver_at=deliver_at,
            idempotency_key=idempotency_key,
        )
        self._accumulator.seal_holding(future)
        wait_s = self._sender.delivery_timeout_s + self._block_s + RESULT_GRACE_S
        try:
            return future.result(wait_s)
        except concurrent.futures.TimeoutError:
            if future.done() and not future.cancelled():
                raise  # the message's own Timeout
            raise Timeout(f"no acknowledgement within {wait_s * 1000:.0f} ms") from None

    def wait_for_space(self, timeout_ms: int | None = None) -> None:
        """Wait until at most half of buffer_bytes_max is held by messages not yet
        acknowledged (send() itself blocks only while the buffer is full)."""
        timeout_ms = self._async_client.timeout_ms if timeout_ms is None else timeout_ms
        self._core.run(wait_for_space(self._accumulator, self._sender, timeout_ms), timeout_ms)

    def flush(self, timeout_ms: int | None = None) -> None:
        """Wait until every message sent so far is acknowledged or failed. SendFailed
        when some failed that no flush reported yet: how many (`failed`) and the first
        error (`first`); each message's future holds its own."""
        self._core.run(self._sender.flush(timeout_ms), timeout_ms)

    def close(self, timeout_ms: int | None = None) -> None:
        """Flush, then stop. Failures no flush reported are logged, not raised."""
        try:
            self._core.run(self._sender.close(timeout_ms), timeout_ms)
        finally:
            self._core.disown(self)

    async def _close_async(self) -> None:
        await self._sender.close()


__all__ = ["AsyncProducer", "Producer", "producer_options"]
