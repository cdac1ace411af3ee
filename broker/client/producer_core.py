"""The engine behind AsyncProducer and Producer (producer.py): buffers, batches, the
sender task, retries and idempotence.

The hot path. send() does the least it can per message: normalise the value, pick the
partition, append a (key, value, headers, timestamp) tuple and its future to the open
buffer of that partition, under one lock (the sync Producer is called from any thread;
the sender runs on the client's event loop). A buffer is sealed when it reaches
batch_bytes_max or when linger_ms has passed since its first message; the sender task
then builds it ONCE into a RecordBatch v2 (storage.records.build_batch_buffer: one copy of
the records, into a bytearray that is only read from then on; optionally gzip)
and sends it as one Produce request. Several batches are in flight at once: up to
max_in_flight for the producer and PARTITION_IN_FLIGHT_MAX per partition.

Partitions: `partition` when given; else xxh32(key) % partitions for a keyed message
(client_types.partition_for_key, stable); else "sticky round-robin": keyless messages
fill the current partition's batch, and each new batch moves to the next partition.

Idempotence (the default): one InitProducerId when the producer starts; each batch
carries the producer id, epoch and the partition's next sequence number. A batch whose
outcome is unknown (the connection broke, NOT_DURABLE, a timeout) is sent again with the
same bytes and sequence, and the server answers a batch it already has with the original
offsets: nothing is written twice. Order within a partition is kept: once a batch of a
partition needs a retry, nothing else of that partition is sent until the retries went
through, one at a time, in sequence order. A batch that fails for good (an unknown topic,
a full disk...) fails its messages' futures; the partition then gets a fresh producer id
and the batches behind it are restamped from sequence 0, so the sequence has no gap.
A batch still unacknowledged delivery_timeout_ms after it was sealed fails with Timeout
(it may or may not have been written).

Without idempotence nothing is retried: a failure fails the batch's futures.

Publish dedup (broker/server/dedup.py): a batch holding an idempotency key is built
uncompressed (the broker reads keys only there). When the broker answers that records
were written before, their futures get the originals; when only some were
(PARTLY_DUPLICATE, nothing written), the others are rebuilt into a new batch and sent
again. Either way the broker did not take the batch's sequences, so the partition moves
to a new producer id, and the batches behind are restamped. Until the broker has written
a batch of a producer id on a partition, that partition sends one batch at a time (the
broker accepts an unknown producer at any sequence, so a batch behind a refused one
could otherwise be written ahead of it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import threading
import time
from collections import deque

from nodi.storage.errors import NodiError
from nodi.storage.limits import DEFAULT_RECORD_LIMITS, KIB, MIB
from nodi.storage.records import Compression, build_batch, build_batch_buffer, compute_crc, decode_records, parse_header

from .errors import (
    BufferFull,
    ClientClosed,
    LimitExceeded,
    InvalidRecords,
    NodiClientError,
    OutOfOrderSequence,
    PartlyDuplicate,
    ProducerFenced,
    Timeout,
    UnknownPartition,
    UnknownProducerId,
    is_retriable,
)
from .futures import resolve
from .features import split_duplicates
from .types import acks_value
from ..protocol.headers import IDEMPOTENCY_KEY

log = logging.getLogger("nodi.client")

# Batches of one partition in flight at once (the server remembers the last 5 batches of
# each producer for deduplication, as Kafka does).
PARTITION_IN_FLIGHT_MAX = 5
SEQUENCE_MODULUS = 1 << 31
RETRY_BACKOFF_MS = 50
RETRY_BACKOFF_MAX_MS = 1_000
# Bytes a record adds besides its key, value and headers (varints, attributes): an
# estimate, for sealing buffers near batch_bytes_max.
RECORD_OVERHEAD_BYTES = 16
_INFINITY = float("inf")

# RecordBatch v2 header fields a restamp rewrites (storage/records.py layout).
_PRODUCER_FIELDS = struct.Struct(">qhi")  # producer_id, producer_epoch, base_sequence
_PRODUCER_FIELDS_AT = 43
_CRC = struct.Struct(">I")
_CRC_AT = 17


def restamp(batch: bytes, producer_id: int, producer_epoch: int, base_sequence: int) -> bytes:
    """The same batch with other producer id, epoch and base sequence (and its CRC)."""
    data = bytearray(batch)
    _PRODUCER_FIELDS.pack_into(data, _PRODUCER_FIELDS_AT, producer_id, producer_epoch, base_sequence)
    _CRC.pack_into(data, _CRC_AT, compute_crc(data))
    return bytes(data)


class _Buffer:
    """Messages of one partition waiting to become a batch."""

    __slots__ = ("topic", "partition", "records", "futures", "size", "created", "generation", "keyed")

    def __init__(self, topic: str, partition: int, now: float, generation: int) -> None:
        self.topic = topic
        self.partition = partition
        self.records: list[tuple] = []
        self.futures: list = []
        self.size = 0
        self.created = now
        self.generation = generation
        self.keyed = False  # holds an idempotency key: sent uncompressed (broker/server/dedup.py)


class _Batch:
    """A built batch: its bytes, its messages' futures, where it stands."""

    __slots__ = ("data", "futures", "count", "base_sequence", "sealed", "generation", "size", "maybe_written",
                 "attempts", "leaders")

    def __init__(self, data: bytes, buffer: _Buffer, base_sequence: int, sealed: float) -> None:
        self.data = data
        self.futures = buffer.futures
        self.count = len(buffer.futures)
        self.base_sequence = base_sequence
        self.sealed = sealed
        self.generation = buffer.generation
        self.size = buffer.size  # the estimate counted against buffer_bytes_max
        self.maybe_written = False  # a send ended without a known outcome
        self.attempts = 0
        # Publish dedup: futures[count:] are repeats of an idempotency key in this batch;
        # each takes the result of record leaders[i].
        self.leaders: list[int] = []


class _Partition:
    """Sending state of one (topic, partition)."""

    __slots__ = ("topic", "partition", "waiting", "in_flight", "producer_id", "producer_epoch", "next_sequence",
                 "retrying", "new_id_needed", "retry_at", "failures", "known")

    def __init__(self, topic: str, partition: int, producer_id: int, producer_epoch: int) -> None:
        self.topic = topic
        self.partition = partition
        self.waiting: deque[_Batch] = deque()  # built, not in flight, in sequence order
        self.in_flight = 0
        self.producer_id = producer_id
        self.producer_epoch = producer_epoch
        self.next_sequence = 0
        self.retrying = False  # a batch needs resending: one at a time until done
        self.new_id_needed = False  # the sequence has a gap: restamp under a new id
        # The broker has written a batch of this producer id here. Until then one batch
        # at a time: a broker accepts an unknown producer's batch at any sequence, so a
        # batch behind one that publish dedup refused would be written ahead of it.
        self.known = False
        self.retry_at = 0.0
        self.failures = 0


class ProducerCore:
    """The state and the sender task shared by AsyncProducer and Producer. append() may
    be called from any thread; everything else runs on the client's loop."""

    def __init__(
        self,
        client,
        loop: asyncio.AbstractEventLoop,
        *,
        linger_ms: float,
        batch_bytes_max: int,
        acks: str,
        idempotent: bool,
        compression: str,
        max_in_flight: int,
        delivery_timeout_ms: int,
        buffer_bytes_max: int,
        timeout_ms: int | None,
        threadsafe: bool,
    ) -> None:
        if linger_ms < 0:
            raise ValueError("linger_ms must be >= 0")
        if batch_bytes_max < 1:
            raise ValueError("batch_bytes_max must be positive")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be positive")
        self.acks = acks_value(acks)
        if idempotent and self.acks == 0:
            raise ValueError('an idempotent producer needs acks "written" or "durable"')
        try:
            self.compression = {"none": Compression.NONE, "gzip": Compression.GZIP}[compression]
        except KeyError:
            raise ValueError(f'compression must be "none" or "gzip", not {compression!r}') from None
        self.client = client
        self.loop = loop
        self.linger_s = linger_ms / 1000
        self.batch_bytes_max = min(batch_bytes_max, DEFAULT_RECORD_LIMITS.batch_bytes_max - 4 * KIB)
        self.records_per_batch_max = DEFAULT_RECORD_LIMITS.records_per_batch_max
        self.idempotent = idempotent
        self.max_in_flight = max_in_flight
        self.delivery_timeout_s = delivery_timeout_ms / 1000
        self.timeout_ms = timeout_ms
        self._threadsafe = threadsafe
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._space_waiters = 0
        self._buffered_bytes = 0  # messages appended and not yet resolved (estimated)
        self.buffer_bytes_max = buffer_bytes_max
        self._open: dict[tuple[str, int], _Buffer] = {}
        self._sealed: list[_Buffer] = []
        self._sticky: dict[str, tuple[int, int]] = {}  # topic -> (partition, count)
        # (topic, partition asked for, count, buffer) of the last append while that buffer
        # is open: append's hot path.
        self._hot: tuple[str, int | None, int, _Buffer] | None = None
        self._sender_deadline = _INFINITY  # when the sender wakes by itself
        self._wake_requested = False
        self._flush_all = False
        self._generation = 0
        self._outstanding: dict[int, int] = {}  # generation -> buffers and batches not done
        self._closed = False
        self._error: BaseException | None = None  # fatal: every later send fails
        self._partitions: dict[tuple[str, int], _Partition] = {}
        self._in_flight = 0
        self._producer_id = -1
        self._producer_epoch = -1
        self._wake_event = asyncio.Event()
        self._progress = asyncio.Event()
        self._sender: asyncio.Task | None = None
        self._sends: set[asyncio.Task] = set()
        self._closing_now = False

    # -- any thread ---------------------------------------------------------------------

    def append(
        self,
        topic: str,
        partition: int | None,
        count: int,
        key: bytes | None,
        value: bytes | None,
        headers: tuple,
        timestamp_ms: int | None,
        future,
        block_s: float | None = None,
    ) -> int:
        """Add one message to its partition's buffer; returns the partition. `count` is
        the topic's partition count (for keyless messages without a partition). When
        the messages not yet acknowledged hold buffer_bytes_max, wait up to `block_s`
        for room (then Timeout), or with None raise BufferFull at once."""
        size = RECORD_OVERHEAD_BYTES
        if value is not None:
            size += len(value)
        if key is not None:
            size += len(key)
        if headers:
            for header_key, header_value in headers:
                size += len(header_key) + (len(header_value) if header_value is not None else 0) + 2
        wake = False
        with self._lock:
            if self._closed or self._error is not None:
                raise self._error or ClientClosed("the producer is closed")
            if self._buffered_bytes + size > self.buffer_bytes_max and self._buffered_bytes:
                self._wait_for_space_locked(size, block_s)
            hot = self._hot
            if hot is not None and not headers and hot[0] == topic and hot[1] == partition and hot[2] == count:
                buffer = hot[3]
                records = buffer.records
                buffer_size = buffer.size + size
                if buffer_size < self.batch_bytes_max and len(records) < self.records_per_batch_max:
                    # The hot path: the open buffer the last message with this topic and
                    # partition choice went to has room (and stays below batch_bytes_max):
                    # what the general path below does, without its lookups.
                    records.append((key, value, headers, timestamp_ms))
                    buffer.futures.append(future)
                    buffer.size = buffer_size
                    self._buffered_bytes += size
                    return buffer.partition
            requested = partition
            sticky = partition is None
            if sticky:
                current = self._sticky.get(topic)
                if current is None or current[1] != count:
                    current = (random.randrange(count), count)
                    self._sticky[topic] = current
                partition = current[0]
            buffer = self._open.get((topic, partition))
            if buffer is not None and (
                buffer.size + size > self.batch_bytes_max or len(buffer.records) >= self.records_per_batch_max
            ):
                self._seal_locked(buffer)
                buffer = None
                wake = True
                if sticky:  # this batch is full: the next goes to the next partition
                    partition = (partition + 1) % count
                    self._sticky[topic] = (partition, count)
                    buffer = self._open.get((topic, partition))
            if buffer is None:
                buffer = _Buffer(topic, partition, time.monotonic(), self._generation)
                self._open[topic, partition] = buffer
                self._outstanding[buffer.generation] = self._outstanding.get(buffer.generation, 0) + 1
                if buffer.created + self.linger_s < self._sender_deadline:
                    wake = True
            buffer.records.append((key, value, headers, timestamp_ms))
            buffer.futures.append(future)
            if headers and headers[-1][0] == IDEMPOTENCY_KEY:
                buffer.keyed = True
            buffer.size += size
            self._buffered_bytes += size
            self._hot = (topic, requested, count, buffer)  # until _seal_locked
            if buffer.size >= self.batch_bytes_max:
                self._seal_locked(buffer)
                wake = True
            if wake:
                if self._wake_requested:
                    wake = False
                else:
                    self._wake_requested = True
        if wake:
            if self._threadsafe:
                self.loop.call_soon_threadsafe(self._wake_event.set)
            else:
                self._wake_event.set()
        return partition

    def _wait_for_space_locked(self, size: int, block_s: float | None) -> None:
        if block_s is None:
            raise BufferFull(
                f"{self._buffered_bytes} bytes of messages wait for acknowledgement (buffer_bytes_max "
                f"{self.buffer_bytes_max}): wait for space or flush"
            )
        deadline = time.monotonic() + block_s
        self._space_waiters += 1
        try:
            while self._buffered_bytes + size > self.buffer_bytes_max and self._buffered_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"no room in the producer's buffer within {block_s * 1000:.0f} ms")
                self._space.wait(remaining)
                if self._closed or self._error is not None:
                    raise self._error or ClientClosed("the producer is closed")
        finally:
            self._space_waiters -= 1

    def has_space(self) -> bool:
        """At most half of buffer_bytes_max waits for acknowledgement (the low-water
        mark wait_for_space waits for)."""
        return self._buffered_bytes <= self.buffer_bytes_max // 2

    def _seal_locked(self, buffer: _Buffer) -> None:
        self._hot = None
        del self._open[buffer.topic, buffer.partition]
        self._sealed.append(buffer)
        current = self._sticky.get(buffer.topic)
        if current is not None and current[0] == buffer.partition:
            self._sticky[buffer.topic] = ((buffer.partition + 1) % current[1], current[1])

    # -- the loop -----------------------------------------------------------------------

    def start(self) -> None:
        if self._sender is None:
            self._sender = self.loop.create_task(self._run(), name="nodi-producer-sender")

    async def _run(self) -> None:
        while True:
            with self._lock:
                self._wake_event.clear()
                self._wake_requested = False
                now = time.monotonic()
                deadline = _INFINITY
                for buffer in list(self._open.values()):
                    if self._flush_all or buffer.created + self.linger_s <= now:
                        self._seal_locked(buffer)  # after those sealed earlier: order kept
                    else:
                        deadline = min(deadline, buffer.created + self.linger_s)
                ready, self._sealed = self._sealed, []
                self._flush_all = False
                self._sender_deadline = deadline
            if ready:
                await self._build(ready, now)
            deadline = min(deadline, self._dispatch())
            timeout = None if deadline == _INFINITY else max(0.0, deadline - time.monotonic())
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake_event.wait()

    async def _ensure_producer_id(self) -> None:
        if self._producer_id < 0:
            self._producer_id, self._producer_epoch = await self.client.init_producer_id(timeout_ms=self.timeout_ms)

    async def _build(self, buffers: list[_Buffer], now: float) -> None:
        if self.idempotent:
            try:
                await self._ensure_producer_id()
            except NodiError as error:
                for buffer in buffers:
                    self._finish(buffer, error)
                return
        for buffer in buffers:
            key = (buffer.topic, buffer.partition)
            state = self._partitions.get(key)
            if state is None:
                state = self._partitions[key] = _Partition(
                    buffer.topic, buffer.partition, self._producer_id, self._producer_epoch
                )
            count = len(buffer.records)
            sequence = state.next_sequence if self.idempotent else -1
            try:
                data = build_batch_buffer(
                    buffer.records,
                    compression=Compression.NONE if buffer.keyed else self.compression,
                    producer_id=state.producer_id if self.idempotent else -1,
                    producer_epoch=state.producer_epoch if self.idempotent else -1,
                    base_sequence=sequence,
                )
            except NodiError as error:
                code_error = LimitExceeded if "exceed" in str(error) else InvalidRecords
                self._finish(buffer, code_error(str(error)))
                continue
            if self.idempotent:
                state.next_sequence = (sequence + count) % SEQUENCE_MODULUS
            state.waiting.append(_Batch(data, buffer, sequence, now))

    def _dispatch(self) -> float:
        """Start every send the limits allow; the earliest time a retry waits for."""
        deadline = _INFINITY
        now = time.monotonic()
        for state in self._partitions.values():
            if not state.waiting:
                continue
            self._expire(state, now)
            while state.waiting and self._in_flight < self.max_in_flight:
                if state.retry_at > now:
                    deadline = min(deadline, state.retry_at)
                    break
                careful = state.retrying or state.new_id_needed
                if careful and state.in_flight:
                    break  # one at a time until the outcome of the doubtful ones is known
                if state.new_id_needed and not any(batch.maybe_written for batch in state.waiting):
                    self._start(state, self._new_producer_id(state))
                    break
                if careful:
                    batch = next(batch for batch in state.waiting if batch.maybe_written) if (
                        state.new_id_needed) else state.waiting[0]
                    state.waiting.remove(batch)
                else:
                    if state.in_flight >= PARTITION_IN_FLIGHT_MAX or (
                            self.idempotent and not state.known and state.in_flight):
                        break
                    batch = state.waiting.popleft()
                self._start(state, self._send(state, batch))
                if careful:
                    break
        return deadline

    def _start(self, state: _Partition, coroutine) -> None:
        """Run a request of `state`'s partition, counted in flight from now on."""
        state.in_flight += 1
        self._in_flight += 1
        task = self.loop.create_task(coroutine)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _done_sending(self, state: _Partition) -> None:
        state.in_flight -= 1
        self._in_flight -= 1
        self._wake_event.set()

    def _expire(self, state: _Partition, now: float) -> None:
        """Fail batches past delivery_timeout_ms (not in flight)."""
        if not state.waiting or now - state.waiting[0].sealed < self.delivery_timeout_s:
            return
        kept = deque()
        for batch in state.waiting:
            if now - batch.sealed >= self.delivery_timeout_s:
                self._finish(batch, Timeout(
                    f"not acknowledged within delivery_timeout_ms {self.delivery_timeout_s * 1000:.0f} "
                    f"({batch.attempts} attempts); it may or may not have been written"
                ))
                if self.idempotent:
                    state.new_id_needed = True
            else:
                kept.append(batch)
        state.waiting = kept
        if not any(batch.maybe_written for batch in kept):
            state.retrying = False

    async def _new_producer_id(self, state: _Partition) -> None:
        """A fresh producer id for a partition whose sequence has a gap; restamp the
        batches waiting there from sequence 0."""
        try:
            producer_id, epoch = await self.client.init_producer_id(timeout_ms=self.timeout_ms)
        except NodiError as error:
            log.warning("producer: no new producer id for %s-%d: %s", state.topic, state.partition, error)
            state.retry_at = time.monotonic() + self._backoff_s(state)
            return
        finally:
            self._done_sending(state)
        state.producer_id, state.producer_epoch = producer_id, epoch
        sequence = 0
        for batch in state.waiting:
            batch.data = restamp(batch.data, producer_id, epoch, sequence)
            batch.base_sequence = sequence
            sequence = (sequence + batch.count) % SEQUENCE_MODULUS
        state.next_sequence = sequence
        state.new_id_needed = False
        state.known = False
        state.retrying = False
        state.failures = 0

    def _backoff_s(self, state: _Partition) -> float:
        state.failures += 1
        delay_ms = min(RETRY_BACKOFF_MAX_MS, RETRY_BACKOFF_MS * 2 ** min(state.failures - 1, 10))
        return delay_ms * random.uniform(0.5, 1.5) / 1000

    async def _send(self, state: _Partition, batch: _Batch) -> None:
        batch.attempts += 1
        response = error = None
        try:
            response = await self.client.produce_batch(
                state.topic, state.partition, batch.data, acks=self.acks, timeout_ms=self.timeout_ms
            )
        except NodiClientError as failure:
            error = failure
        except Exception as failure:  # a bug: fail the batch rather than leave it hanging
            log.exception("producer: sending a batch to %s-%d failed", state.topic, state.partition)
            error = failure
        finally:
            self._done_sending(state)
        if error is None:
            batch.maybe_written = False
            state.failures = 0
            if not any(b.maybe_written for b in state.waiting):
                state.retrying = False
            base = response.base_offset
            partition = state.partition
            count = batch.count
            if response.duplicates:  # publish dedup: nothing written, each an original
                results = [(partition, -1)] * count
                for duplicate in response.duplicates:
                    if 0 <= duplicate.index < count:
                        results[duplicate.index] = (duplicate.partition, duplicate.offset)
                if self.idempotent:
                    state.new_id_needed = True  # the broker did not take these sequences
            elif base < 0:
                results = [(partition, -1)] * count
            else:
                results = [(partition, offset) for offset in range(base, base + count)]
                state.known = True
            results.extend(results[leader] for leader in batch.leaders)
            self._finish(batch, None, results)
            return
        if isinstance(error, PartlyDuplicate):
            self._resend_new_records(state, batch, error.duplicates)
            return
        if isinstance(error, UnknownPartition):
            self.client._partition_counts.pop(state.topic, None)
        if self.idempotent and isinstance(error, (OutOfOrderSequence, UnknownProducerId)):
            # Not written: send again under a new producer id, after what may have been.
            batch.maybe_written = False
            state.new_id_needed = True
            self._requeue(state, batch)
            return
        if self.idempotent and is_retriable(error) and not self._closing_now:
            batch.maybe_written = True
            state.retrying = True
            state.retry_at = time.monotonic() + self._backoff_s(state)
            self._requeue(state, batch)
            return
        self._finish(batch, error)
        if self.idempotent:
            state.new_id_needed = True
            if isinstance(error, ProducerFenced):
                self._error = error

    def _resend_new_records(self, state: _Partition, batch: _Batch, duplicates) -> None:
        """PARTLY_DUPLICATE: nothing was written. Resolve the duplicates with their
        originals, and send the other records again as a new batch (its sequences are
        restamped under a new producer id: the broker did not take the old ones)."""
        records = decode_records(batch.data, parse_header(batch.data))
        done_futures, done_results, kept, futures, leaders = split_duplicates(
            records, batch.futures, batch.count, batch.leaders, duplicates
        )
        resolve(done_futures, done_results, None)
        if not kept:  # every record was a duplicate after all
            batch.futures = []
            self._finish(batch, None, [])
            return
        batch.data = build_batch(kept, producer_id=state.producer_id if self.idempotent else -1,
                                 producer_epoch=state.producer_epoch if self.idempotent else -1,
                                 base_sequence=batch.base_sequence)
        batch.futures = futures
        batch.count = len(kept)
        batch.leaders = leaders
        batch.maybe_written = False
        if self.idempotent:
            state.new_id_needed = True
            self._requeue(state, batch)
        else:
            state.waiting.appendleft(batch)

    @staticmethod
    def _requeue(state: _Partition, batch: _Batch) -> None:
        """Back into the waiting queue at its place in sequence order."""
        index = 0
        for index, other in enumerate(state.waiting):  # noqa: B007
            if _sequence_before(batch.base_sequence, other.base_sequence):
                state.waiting.insert(index, batch)
                return
        state.waiting.append(batch)

    def _finish(self, item: _Buffer | _Batch, error: BaseException | None, results: list | None = None) -> None:
        """Resolve one buffer's or batch's futures and count it done."""
        resolve(item.futures, results, error)
        generation = item.generation
        with self._lock:
            left = self._outstanding[generation] - 1
            if left:
                self._outstanding[generation] = left
            else:
                del self._outstanding[generation]
            self._buffered_bytes -= item.size
            if self._space_waiters:
                self._space.notify_all()
        self._progress.set()

    # -- flush and close (on the loop) -----------------------------------------------------

    async def flush(self, timeout_ms: int | None = None) -> None:
        """Wait until every message sent before this call is acknowledged or failed."""
        self.start()
        with self._lock:
            generation = self._generation
            self._generation += 1
            self._flush_all = True
        self._wake_event.set()
        timeout_ms = self.client.timeout_ms if timeout_ms is None else timeout_ms
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                while self._pending_at(generation):
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            raise Timeout(f"flush did not complete within {timeout_ms} ms") from None

    def _pending_at(self, generation: int) -> bool:
        with self._lock:
            return any(g <= generation for g in self._outstanding)

    async def close(self, timeout_ms: int | None = None) -> None:
        """Flush, then stop the sender; whatever is still unsent fails with
        ClientClosed."""
        if self._closed and self._sender is None:
            return
        try:
            if not self._closed and self._sender is not None:
                await self.flush(timeout_ms)
        finally:
            with self._lock:
                self._closed = True
                self._space.notify_all()
            self._closing_now = True
            await self._stop()

    async def _stop(self) -> None:
        tasks = list(self._sends)
        if self._sender is not None:
            tasks.append(self._sender)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self._sender = None
        closed = ClientClosed("the producer was closed before this message was acknowledged")
        with self._lock:
            leftovers = list(self._open.values()) + self._sealed
            self._open.clear()
            self._hot = None
            self._sealed = []
        for buffer in leftovers:
            self._finish(buffer, closed)
        for state in self._partitions.values():
            while state.waiting:
                batch = state.waiting.popleft()
                self._finish(batch, closed)


def _sequence_before(a: int, b: int) -> bool:
    """a comes before b in the wrapping sequence space."""
    return a != b and (b - a) % SEQUENCE_MODULUS < SEQUENCE_MODULUS // 2


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
    """The producer options with their defaults (producer.py documents them)."""
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


__all__ = ["ProducerCore", "restamp", "producer_options"]
