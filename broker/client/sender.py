"""The producer's sender: the asyncio task on the client's loop that turns the
accumulator's sealed buffers into batches and sends them (the sending half of
AsyncProducer and Producer; accumulator.py is the batching half).

Each drained buffer is built ONCE into a RecordBatch v2 (storage.records.build_batch_buffer:
one copy of the records, into a bytearray that is only read from then on; optionally
gzip) and sent as one Produce request. Several batches are in flight at once: up to
max_in_flight for the producer and PARTITION_IN_FLIGHT_MAX per partition.

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

The outcome of a send goes to one handler per kind: _on_written (offsets, or the
originals of duplicates), _on_partly_duplicate, _on_not_taken (OUT_OF_ORDER_SEQUENCE,
UNKNOWN_PRODUCER_ID), _on_doubtful (retriable: maybe written), _on_failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from nodi.storage.errors import NodiError
from nodi.storage.records import Compression, build_batch, build_batch_buffer, compute_crc, decode_records, parse_header

from .accumulator import INFINITY, Buffer, RecordAccumulator
from .errors import (
    ClientClosed,
    NodiClientError,
    OutOfOrderSequence,
    PartlyDuplicate,
    ProducerFenced,
    SendFailed,
    Timeout,
    UnknownPartition,
    UnknownProducerId,
    is_retriable,
    records_error,
)
from .features import split_duplicates
from .futures import resolve
from .types import acks_value

if TYPE_CHECKING:
    from ..protocol import messages as m
    from .async_client import AsyncClient

log = logging.getLogger("nodi.client")

# Batches of one partition in flight at once (the server remembers the last 5 batches of
# each producer for deduplication, as Kafka does).
PARTITION_IN_FLIGHT_MAX = 5
SEQUENCE_MODULUS = 1 << 31
RETRY_BACKOFF_MS = 50
RETRY_BACKOFF_MAX_MS = 1_000

# RecordBatch v2 header fields a restamp rewrites (storage/records.py layout).
_PRODUCER_FIELDS = struct.Struct(">qhi")  # producer_id, producer_epoch, base_sequence
_PRODUCER_FIELDS_AT = 43
_CRC = struct.Struct(">I")
# The producer's compression= names: Kafka's codecs (storage/codecs.py).
COMPRESSION_NAMES = {codec.name.lower(): codec for codec in Compression}
_CRC_AT = 17


def restamp(batch: bytes | bytearray, producer_id: int, producer_epoch: int, base_sequence: int) -> bytes:
    """The same batch with other producer id, epoch and base sequence (and its CRC)."""
    data = bytearray(batch)
    _PRODUCER_FIELDS.pack_into(data, _PRODUCER_FIELDS_AT, producer_id, producer_epoch, base_sequence)
    _CRC.pack_into(data, _CRC_AT, compute_crc(data))
    return bytes(data)


class Batch:
    """A built batch: its bytes, its messages' futures, where it stands."""

    __slots__ = (
        "data",
        "futures",
        "count",
        "base_sequence",
        "sealed",
        "generation",
        "size",
        "maybe_written",
        "attempts",
        "leaders",
    )

    def __init__(self, data: bytes | bytearray, buffer: Buffer, base_sequence: int, sealed: float) -> None:
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


class PartitionState:
    """Sending state of one (topic, partition)."""

    __slots__ = (
        "topic",
        "partition",
        "waiting",
        "in_flight",
        "producer_id",
        "producer_epoch",
        "next_sequence",
        "retrying",
        "new_id_needed",
        "retry_at",
        "failures",
        "known",
    )

    def __init__(self, topic: str, partition: int, producer_id: int, producer_epoch: int) -> None:
        self.topic = topic
        self.partition = partition
        self.waiting: deque[Batch] = deque()  # built, not in flight, in sequence order
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


class Sender:
    """The sender task and the state of every partition it sends to; runs on `loop`
    only. `wake_event` is set (by the accumulator's wake) when there is work sooner
    than the sender planned."""

    def __init__(
        self,
        client: AsyncClient,
        loop: asyncio.AbstractEventLoop,
        accumulator: RecordAccumulator,
        wake_event: asyncio.Event,
        *,
        acks: str,
        idempotent: bool,
        compression: str,
        max_in_flight: int,
        delivery_timeout_ms: int,
        timeout_ms: int | None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be positive")
        self.acks = acks_value(acks)
        if idempotent and self.acks == 0:
            raise ValueError('an idempotent producer needs acks "written" or "durable"')
        try:
            self.compression = COMPRESSION_NAMES[compression]
        except KeyError:
            names = ", ".join(f'"{name}"' for name in COMPRESSION_NAMES)
            raise ValueError(f"compression must be one of {names}, not {compression!r}") from None
        self.client = client
        self.loop = loop
        self.idempotent = idempotent
        self.max_in_flight = max_in_flight
        self.delivery_timeout_s = delivery_timeout_ms / 1000
        self.timeout_ms = timeout_ms
        self._accumulator = accumulator
        self._partitions: dict[tuple[str, int], PartitionState] = {}
        self._in_flight = 0
        self._producer_id = -1
        self._producer_epoch = -1
        self._wake_event = wake_event
        self._progress = asyncio.Event()
        self.task: asyncio.Task | None = None  # the sender task, once started (read-only outside)
        self._sends: set[asyncio.Task] = set()
        self._closing_now = False
        # Messages that failed, by the accumulator generation they were sent in: [count,
        # first error], until a flush of that generation reports them. A generation moves
        # on only with a flush, so this holds at most one entry per flush under way + 1.
        self._failures: dict[int, list] = {}

    # -- the task -----------------------------------------------------------------------

    def start(self) -> None:
        if self.task is None:
            self.task = self.loop.create_task(self._run(), name="nodi-producer-sender")

    async def _run(self) -> None:
        accumulator = self._accumulator
        while True:
            self._wake_event.clear()
            ready, now, deadline = accumulator.drain()
            if ready:
                await self._build(ready, now)
            deadline = min(deadline, self._dispatch())
            timeout = None if deadline == INFINITY else max(0.0, deadline - time.monotonic())
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake_event.wait()

    async def wait_for_progress(self) -> None:
        """Wait until some buffer or batch is resolved (after this call)."""
        self._progress.clear()
        await self._progress.wait()

    async def _ensure_producer_id(self) -> None:
        if self._producer_id < 0:
            self._producer_id, self._producer_epoch = await self.client.init_producer_id(timeout_ms=self.timeout_ms)

    async def _build(self, buffers: list[Buffer], now: float) -> None:
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
                state = self._partitions[key] = PartitionState(
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
                self._finish(buffer, records_error(error, f"batch for {buffer.topic}-{buffer.partition}"))
                continue
            if self.idempotent:
                state.next_sequence = (sequence + count) % SEQUENCE_MODULUS
            state.waiting.append(Batch(data, buffer, sequence, now))

    # -- dispatch: what may be sent now -------------------------------------------------

    def _dispatch(self) -> float:
        """Start every send the limits allow; the earliest time a retry waits for."""
        deadline = INFINITY
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
                    batch = (
                        next(batch for batch in state.waiting if batch.maybe_written)
                        if (state.new_id_needed)
                        else state.waiting[0]
                    )
                    state.waiting.remove(batch)
                else:
                    if state.in_flight >= PARTITION_IN_FLIGHT_MAX or (
                        self.idempotent and not state.known and state.in_flight
                    ):
                        break
                    batch = state.waiting.popleft()
                self._start(state, self._send(state, batch))
                if careful:
                    break
        return deadline

    def _start(self, state: PartitionState, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a request of `state`'s partition, counted in flight from now on."""
        state.in_flight += 1
        self._in_flight += 1
        task = self.loop.create_task(coroutine)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _done_sending(self, state: PartitionState) -> None:
        state.in_flight -= 1
        self._in_flight -= 1
        self._wake_event.set()

    def _expire(self, state: PartitionState, now: float) -> None:
        """Fail batches past delivery_timeout_ms (not in flight)."""
        if not state.waiting or now - state.waiting[0].sealed < self.delivery_timeout_s:
            return
        kept: deque[Batch] = deque()
        for batch in state.waiting:
            if now - batch.sealed >= self.delivery_timeout_s:
                self._finish(
                    batch,
                    Timeout(
                        f"not acknowledged within delivery_timeout_ms {self.delivery_timeout_s * 1000:.0f} "
                        f"({batch.attempts} attempts); it may or may not have been written"
                    ),
                )
                if self.idempotent:
                    state.new_id_needed = True
            else:
                kept.append(batch)
        state.waiting = kept
        if not any(batch.maybe_written for batch in kept):
            state.retrying = False

    async def _new_producer_id(self, state: PartitionState) -> None:
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

    @staticmethod
    def _backoff_s(state: PartitionState) -> float:
        state.failures += 1
        delay_ms = min(RETRY_BACKOFF_MAX_MS, RETRY_BACKOFF_MS * 2 ** min(state.failures - 1, 10))
        return delay_ms * random.uniform(0.5, 1.5) / 1000

    # -- one send and its outcome -------------------------------------------------------

    async def _send(self, state: PartitionState, batch: Batch) -> None:
        batch.attempts += 1
        response: m.ProduceResponse | None = None
        error: BaseException | None = None
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
            assert response is not None
            self._on_written(state, batch, response)
        elif isinstance(error, PartlyDuplicate):
            self._on_partly_duplicate(state, batch, error.duplicates)
        else:
            assert error is not None
            self._on_error(state, batch, error)

    def _on_error(self, state: PartitionState, batch: Batch, error: BaseException) -> None:
        """The broker refused the batch, or its outcome is unknown, or (a bug) sending it
        raised something else."""
        if isinstance(error, UnknownPartition):
            self.client.core.forget_partition_count(state.topic)
        if self.idempotent and isinstance(error, (OutOfOrderSequence, UnknownProducerId)):
            self._on_not_taken(state, batch)
        elif self.idempotent and is_retriable(error) and not self._closing_now:
            self._on_doubtful(state, batch)
        else:
            self._on_failed(state, batch, error)

    def _on_written(self, state: PartitionState, batch: Batch, response: m.ProduceResponse) -> None:
        """Acknowledged: the offsets, or (publish dedup) the originals of duplicates."""
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

    def _on_not_taken(self, state: PartitionState, batch: Batch) -> None:
        """OUT_OF_ORDER_SEQUENCE / UNKNOWN_PRODUCER_ID: not written. Send again under a
        new producer id, after what may have been."""
        batch.maybe_written = False
        state.new_id_needed = True
        self._requeue(state, batch)

    def _on_doubtful(self, state: PartitionState, batch: Batch) -> None:
        """Retriable (the connection broke, NOT_DURABLE, a timeout): maybe written. Send
        the same bytes again after a backoff, one at a time, in sequence order."""
        batch.maybe_written = True
        state.retrying = True
        state.retry_at = time.monotonic() + self._backoff_s(state)
        self._requeue(state, batch)

    def _on_failed(self, state: PartitionState, batch: Batch, error: BaseException) -> None:
        """Failed for good: fail its futures; the sequence now has a gap."""
        self._finish(batch, error)
        if self.idempotent:
            state.new_id_needed = True
            if isinstance(error, ProducerFenced):
                self._accumulator.fail(error)

    def _on_partly_duplicate(self, state: PartitionState, batch: Batch, duplicates: tuple) -> None:
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
        batch.data = build_batch(
            kept,
            producer_id=state.producer_id if self.idempotent else -1,
            producer_epoch=state.producer_epoch if self.idempotent else -1,
            base_sequence=batch.base_sequence,
        )
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
    def _requeue(state: PartitionState, batch: Batch) -> None:
        """Back into the waiting queue at its place in sequence order."""
        index = 0
        for index, other in enumerate(state.waiting):  # noqa: B007
            if _sequence_before(batch.base_sequence, other.base_sequence):
                state.waiting.insert(index, batch)
                return
        state.waiting.append(batch)

    def _finish(self, item: Buffer | Batch, error: BaseException | None, results: list | None = None) -> None:
        """Resolve one buffer's or batch's futures and count it done (a failure also for
        the flush that covers it)."""
        resolve(item.futures, results, error)
        if error is not None and item.futures:
            self._record_failure(item.generation, len(item.futures), error)
        self._accumulator.release(item.generation, item.size)
        self._progress.set()

    def _record_failure(self, generation: int, count: int, error: BaseException) -> None:
        entry = self._failures.get(generation)
        if entry is None:
            self._failures[generation] = [count, error]
        else:
            entry[0] += count

    def record_failure(self, count: int, error: BaseException) -> None:
        """`count` messages failed before they reached the accumulator (the producer
        could not route them): the next flush reports them."""
        self._record_failure(self._accumulator.generation, count, error)

    def take_failures(self, generation: int) -> SendFailed | None:
        """The failures of `generation` and older not reported yet, as one SendFailed
        (None when there are none); they are reported once."""
        failed = 0
        first: BaseException | None = None
        for older in sorted(g for g in self._failures if g <= generation):
            count, error = self._failures.pop(older)
            failed += count
            if first is None:
                first = error
        if first is None:
            return None
        failure = SendFailed(failed, first)
        failure.__cause__ = first
        return failure

    # -- flush and close ----------------------------------------------------------------

    async def flush(self, timeout_ms: int | None = None) -> None:
        """Wait until every message appended before this call is acknowledged or failed;
        SendFailed (how many, and the first error) when some failed that no flush
        reported yet."""
        self.start()
        generation = self._accumulator.begin_flush()
        self._wake_event.set()
        timeout_ms = self.client.timeout_ms if timeout_ms is None else timeout_ms
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                while self._accumulator.pending_at(generation):
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            raise Timeout(f"flush did not complete within {timeout_ms} ms") from None
        failure = self.take_failures(generation)
        if failure is not None:
            raise failure

    async def close(self, timeout_ms: int | None = None) -> None:
        """Flush, then stop the task; whatever is still unsent fails with ClientClosed."""
        accumulator = self._accumulator
        if accumulator.closed and self.task is None:
            return
        try:
            if not accumulator.closed and self.task is not None:
                await self.flush(timeout_ms)
        except SendFailed as failed:
            # close() does not raise what failed (it may run while another error unwinds,
            # or when the client closes): flush() before it to learn of failures.
            log.warning("producer closed: %s", failed)
        finally:
            accumulator.close()
            self._closing_now = True
            await self._stop()
            unreported = self.take_failures(accumulator.generation)
            if unreported is not None:
                log.warning("producer closed: %s", unreported)

    async def _stop(self) -> None:
        tasks = list(self._sends)
        if self.task is not None:
            tasks.append(self.task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self.task = None
        closed = ClientClosed("the producer was closed before this message was acknowledged")
        for buffer in self._accumulator.take_unsent():
            self._finish(buffer, closed)
        for state in self._partitions.values():
            while state.waiting:
                batch = state.waiting.popleft()
                self._finish(batch, closed)


def _sequence_before(a: int, b: int) -> bool:
    """a comes before b in the wrapping sequence space."""
    return a != b and (b - a) % SEQUENCE_MODULUS < SEQUENCE_MODULUS // 2


__all__ = ["Sender", "restamp", "PARTITION_IN_FLIGHT_MAX"]
