"""The producer's accumulator: messages waiting to become batches (the batching half of
AsyncProducer and Producer; sender.py is the sending half, producer.py wires the two).

The hot path. append() does the least it can per message: the caller has normalised the
value and picked a partition for a keyed message; append() picks one for a keyless
message and adds a (key, value, headers, timestamp) tuple and its future to the open
buffer of that partition, under one lock (the sync Producer is called from any thread;
the sender drains on the client's event loop). A buffer is sealed when it reaches
batch_bytes_max (or records_per_batch_max) or when linger_ms has passed since its first
message; the sender then builds it once into a RecordBatch v2 and sends it.

Partitions: `partition` when given; else xxh32(key) % partitions for a keyed message
(client_types.partition_for_key, stable; the caller computes it); else "sticky
round-robin": keyless messages fill the current partition's buffer, and each new buffer
moves to the next partition.

Back-pressure: every message counts (an estimate of its size) from append() until its
batch is resolved (release()). When the messages held reach buffer_bytes_max, append()
waits up to `block_s` for room (the sync Producer; then Timeout), or with None raises
BufferFull at once (the AsyncProducer, whose caller awaits wait_for_space()).

Flush: every buffer belongs to a generation; flush() starts a new one and seals every
open buffer at the sender's next drain, and waits until no buffer or batch of an older
generation is left (pending_at()).

The lock guards every field below; the sender is woken through `wake`, a callable the
producer gives (thread-safe for the sync Producer), only when it must act sooner than it
planned: a buffer was sealed, or a new buffer's linger ends before the sender's deadline.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from nodi.storage.limits import DEFAULT_RECORD_LIMITS, KIB

from ..protocol.headers import IDEMPOTENCY_KEY
from .errors import BufferFull, ClientClosed, Timeout

# Bytes a record adds besides its key, value and headers (varints, attributes): an
# estimate, for sealing buffers near batch_bytes_max.
RECORD_OVERHEAD_BYTES = 16
INFINITY = float("inf")

# One message as it waits: key, value, headers, timestamp (ms, None: the broker's now).
Record = tuple[bytes | None, bytes | None, tuple, int | None]


class Buffer:
    """Messages of one partition waiting to become a batch."""

    __slots__ = ("topic", "partition", "records", "futures", "size", "created", "generation", "keyed")

    def __init__(self, topic: str, partition: int, now: float, generation: int) -> None:
        self.topic = topic
        self.partition = partition
        self.records: list[Record] = []
        self.futures: list = []
        self.size = 0
        self.created = now
        self.generation = generation
        self.keyed = False  # holds an idempotency key: sent uncompressed (broker/server/dedup.py)


class RecordAccumulator:
    """Buffers per partition, sealing by size and linger, back-pressure. append() may be
    called from any thread; drain(), release() and the rest are the sender's (on the
    loop), all under the one lock."""

    def __init__(
        self, *, linger_ms: float, batch_bytes_max: int, buffer_bytes_max: int, wake: Callable[[], object]
    ) -> None:
        if linger_ms < 0:
            raise ValueError("linger_ms must be >= 0")
        if batch_bytes_max < 1:
            raise ValueError("batch_bytes_max must be positive")
        self.linger_s = linger_ms / 1000
        self.batch_bytes_max = min(batch_bytes_max, DEFAULT_RECORD_LIMITS.batch_bytes_max - 4 * KIB)
        self.records_per_batch_max = DEFAULT_RECORD_LIMITS.records_per_batch_max
        self.buffer_bytes_max = buffer_bytes_max
        self._wake = wake
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._space_waiters = 0
        self._buffered_bytes = 0  # messages appended and not yet resolved (estimated)
        self._open: dict[tuple[str, int], Buffer] = {}
        self._sealed: list[Buffer] = []
        self._sticky: dict[str, tuple[int, int]] = {}  # topic -> (partition, count)
        # (topic, partition asked for, count, buffer) of the last append while that buffer
        # is open: append's hot path.
        self._hot: tuple[str, int | None, int, Buffer] | None = None
        self._sender_deadline = INFINITY  # when the sender wakes by itself
        self._wake_requested = False
        self._flush_all = False
        self._generation = 0
        self._outstanding: dict[int, int] = {}  # generation -> buffers and batches not done
        self._closed = False
        self._error: BaseException | None = None  # fatal: every later append fails

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
            if partition is None:
                current = self._sticky.get(topic)
                if current is None or current[1] != count:
                    current = (random.randrange(count), count)
                    self._sticky[topic] = current
                chosen = current[0]
            else:
                chosen = partition
            open_buffer = self._open.get((topic, chosen))
            if open_buffer is not None and (
                open_buffer.size + size > self.batch_bytes_max or len(open_buffer.records) >= self.records_per_batch_max
            ):
                self._seal_locked(open_buffer)
                open_buffer = None
                wake = True
                if partition is None:  # this batch is full: the next goes to the next partition
                    chosen = (chosen + 1) % count
                    self._sticky[topic] = (chosen, count)
                    open_buffer = self._open.get((topic, chosen))
            if open_buffer is None:
                buffer = Buffer(topic, chosen, time.monotonic(), self._generation)
                self._open[topic, chosen] = buffer
                self._outstanding[buffer.generation] = self._outstanding.get(buffer.generation, 0) + 1
                if buffer.created + self.linger_s < self._sender_deadline:
                    wake = True
            else:
                buffer = open_buffer
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
            self._wake()
        return chosen

    def seal_holding(self, future) -> None:
        """Seal the open buffer holding `future`'s message, if it is still open, and wake
        the sender: that batch goes out without waiting for linger_ms (send_and_wait).
        The message is usually its buffer's last (one look per open buffer); a scan of
        the buffers finds it otherwise (another thread appended behind it)."""
        with self._lock:
            holding = next((b for b in self._open.values() if b.futures and b.futures[-1] is future), None)
            if holding is None:
                holding = next((b for b in self._open.values() if any(f is future for f in b.futures)), None)
            if holding is None:
                return  # sealed already (full, or its linger passed)
            self._seal_locked(holding)
            if self._wake_requested:
                return
            self._wake_requested = True
        self._wake()

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

    def _seal_locked(self, buffer: Buffer) -> None:
        self._hot = None
        del self._open[buffer.topic, buffer.partition]
        self._sealed.append(buffer)
        current = self._sticky.get(buffer.topic)
        if current is not None and current[0] == buffer.partition:
            self._sticky[buffer.topic] = ((buffer.partition + 1) % current[1], current[1])

    # -- the sender's (on the loop) -----------------------------------------------------

    def drain(self) -> tuple[list[Buffer], float, float]:
        """Seal the buffers whose linger has passed (every open one after a flush());
        returns the sealed buffers in the order they were sealed, the time it looked,
        and when the next open buffer's linger ends (INFINITY: none). Wakes requested
        before this are served by it."""
        with self._lock:
            self._wake_requested = False
            now = time.monotonic()
            deadline = INFINITY
            for buffer in list(self._open.values()):
                if self._flush_all or buffer.created + self.linger_s <= now:
                    self._seal_locked(buffer)  # after those sealed earlier: order kept
                else:
                    deadline = min(deadline, buffer.created + self.linger_s)
            ready, self._sealed = self._sealed, []
            self._flush_all = False
            self._sender_deadline = deadline
        return ready, now, deadline

    def release(self, generation: int, size: int) -> None:
        """A buffer or batch of `generation` holding `size` bytes is resolved: its room
        is free again."""
        with self._lock:
            left = self._outstanding[generation] - 1
            if left:
                self._outstanding[generation] = left
            else:
                del self._outstanding[generation]
            self._buffered_bytes -= size
            if self._space_waiters:
                self._space.notify_all()

    def begin_flush(self) -> int:
        """Seal every open buffer at the next drain; the generation a flush waits for."""
        with self._lock:
            generation = self._generation
            self._generation += 1
            self._flush_all = True
        return generation

    @property
    def generation(self) -> int:
        """The generation new buffers belong to (the next flush waits for it)."""
        with self._lock:
            return self._generation

    def pending_at(self, generation: int) -> bool:
        """Buffers or batches of `generation` or older are not resolved yet."""
        with self._lock:
            return any(g <= generation for g in self._outstanding)

    def fail(self, error: BaseException) -> None:
        """A fatal error (the producer was fenced): every later append raises it."""
        with self._lock:
            self._error = error

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """No more appends; appends waiting for room raise ClientClosed."""
        with self._lock:
            self._closed = True
            self._space.notify_all()

    def take_unsent(self) -> list[Buffer]:
        """Every buffer not drained yet, open or sealed (on close)."""
        with self._lock:
            leftovers = list(self._open.values()) + self._sealed
            self._open.clear()
            self._hot = None
            self._sealed = []
        return leftovers


__all__ = ["Buffer", "RecordAccumulator", "RECORD_OVERHEAD_BYTES"]
