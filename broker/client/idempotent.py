"""The idempotent consumer: a wrapper around a consumer (stream or queue) that records
the key of every message it handled and skips messages whose key it has seen, so a
redelivered message (after a consumer restart, a rebalance, a lease expiry) is handled
once. The consumer-side third of effectively-once (docs/guarantees.md).

    with client.consumer("orders", group="billing") as consumer:
        with IdempotentConsumer(consumer, "/var/lib/billing/processed") as messages:
            for message in messages:
                handle(message)          # recorded once the loop asks for the next one

A message's key is its idempotency-key header (client.produce(idempotency_key=...)),
else "topic/partition/offset". Keys live in a KeyStore: an LMDB environment at the path
you give (LmdbKeyStore), or any object with two methods (the protocol):

    seen(key: bytes) -> bool       was this key recorded?
    mark(key: bytes) -> None       record it (may be buffered; flush() if the store has one)

A message counts as handled when the loop comes back for the next one or leaves (a
`break`), the rule the consumer's own commits follow; a process that dies inside the
loop body has not recorded it, so it is handled again after a restart. Records are
written in batches: marks are buffered and flushed in one LMDB transaction (one fsync)
before the wrapper asks a stream consumer for more messages (so before its next
auto-commit), after write_batch_max marks, and at close. A crash loses only marks not
yet flushed: those messages are handled again, as with at-least-once. The store keeps at
most keys_max keys; the oldest are evicted first.

A queue (an object with receive(timeout_ms) instead of poll()) is read one message at a
time; a duplicate from it is acked, since it was handled before. Stream and queue:
idle_timeout_ms (None: for ever) ends the iteration after that long without a message.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import lmdb
import xxhash

from ..protocol.headers import IDEMPOTENCY_KEY

# Keys an LmdbKeyStore keeps; past it the oldest are evicted (about 120 bytes per key on
# disk, measured: 1,000,000 keys take about 120 MB of the MAP_SIZE_BYTES map).
KEYS_MAX = 1_000_000
# Marks buffered before they are written in one transaction.
WRITE_BATCH_MAX = 1_000
MAP_SIZE_BYTES = 256 * 1024 * 1024
# A queue's receive() waits this long per call (the loop then checks idle_timeout_ms).
QUEUE_RECEIVE_WAIT_MS = 500

_SEQUENCE = struct.Struct(">Q")


class KeyStore(Protocol):
    def seen(self, key: bytes) -> bool: ...

    def mark(self, key: bytes) -> None: ...


def message_key(message: Any) -> bytes:
    """The idempotency-key header, else b"topic/partition/offset" (a prefix byte keeps
    the two kinds apart)."""
    key = message.header(IDEMPOTENCY_KEY)
    if key:
        return b"k" + key
    return f"p{message.topic}/{message.partition}/{message.offset}".encode()


@dataclass(frozen=True, slots=True)
class KeyStoreStatistics:
    keys: int  # recorded (flushed) keys
    pending: int  # marked, not yet written
    flushes: int  # write transactions
    evicted: int  # keys removed for keys_max


class LmdbKeyStore:
    """Processed keys in an LMDB environment at `path` (a directory, created). Keys are
    stored as xxh3-128 digests; a second table orders them by age for eviction."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        keys_max: int = KEYS_MAX,
        write_batch_max: int = WRITE_BATCH_MAX,
        map_size_bytes: int = MAP_SIZE_BYTES,
    ) -> None:
        if keys_max < 1 or write_batch_max < 1:
            raise ValueError("keys_max and write_batch_max must be positive")
        self.path = os.fspath(path)
        self.keys_max = keys_max
        self.write_batch_max = write_batch_max
        os.makedirs(self.path, exist_ok=True)
        self._env = lmdb.open(self.path, map_size=map_size_bytes, subdir=True, max_dbs=2, sync=True, metasync=True)
        self._keys = self._env.open_db(b"keys")  # digest -> sequence
        self._ages = self._env.open_db(b"ages")  # sequence (big-endian) -> digest
        with self._env.begin(db=self._ages) as transaction:
            cursor = transaction.cursor()
            self._next_sequence = _SEQUENCE.unpack(cursor.key())[0] + 1 if cursor.last() else 0
            self._count = transaction.stat(self._ages)["entries"]
        self._pending: dict[bytes, None] = {}
        self._flushes = 0
        self._evicted = 0
        self._closed = False

    @staticmethod
    def _digest(key: bytes) -> bytes:
        return xxhash.xxh3_128_digest(key)

    def seen(self, key: bytes) -> bool:
        digest = self._digest(key)
        if digest in self._pending:
            return True
        with self._env.begin(db=self._keys) as transaction:
            return transaction.get(digest) is not None

    def mark(self, key: bytes) -> None:
        self._pending[self._digest(key)] = None
        if len(self._pending) >= self.write_batch_max:
            self.flush()

    def flush(self) -> None:
        """Write the pending marks (and evictions) in one transaction. On a failure
        (the map is full, a disk error) nothing is written and the marks stay pending."""
        if not self._pending or self._closed:
            return
        sequence, count, evicted = self._next_sequence, self._count, 0
        with self._env.begin(write=True) as transaction:
            for digest in self._pending:
                if transaction.get(digest, db=self._keys) is not None:
                    continue
                packed = _SEQUENCE.pack(sequence)
                sequence += 1
                transaction.put(digest, packed, db=self._keys)
                transaction.put(packed, digest, db=self._ages)
                count += 1
            if count > self.keys_max:
                cursor = transaction.cursor(db=self._ages)
                cursor.first()
                while count > self.keys_max:
                    transaction.delete(cursor.value(), db=self._keys)
                    cursor.delete()
                    count -= 1
                    evicted += 1
        self._pending = {}
        self._next_sequence, self._count = sequence, count
        self._evicted += evicted
        self._flushes += 1

    def statistics(self) -> KeyStoreStatistics:
        return KeyStoreStatistics(
            keys=self._count, pending=len(self._pending), flushes=self._flushes, evicted=self._evicted
        )

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._env.close()

    def __enter__(self) -> LmdbKeyStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class IdempotentConsumerStatistics:
    delivered: int  # handed to the loop
    duplicates_skipped: int  # seen before: not handed out


class _Base:
    def __init__(
        self, consumer: Any, path: str | os.PathLike | None, store: KeyStore | None, keys_max: int, write_batch_max: int
    ) -> None:
        if (path is None) == (store is None):
            raise ValueError("give a path for an LMDB key store, or a store, not both")
        self.consumer = consumer
        self.idle_timeout_ms: int | None = None  # set by the subclass from its argument
        self._owned: LmdbKeyStore | None = None
        if store is None:
            assert path is not None  # checked above
            store = self._owned = LmdbKeyStore(path, keys_max=keys_max, write_batch_max=write_batch_max)
        self.store: KeyStore = store
        self._delivered = 0
        self._skipped = 0
        self._unmarked: bytes | None = None  # the key of the message handed out last

    def _settle_previous(self) -> None:
        if self._unmarked is not None:
            self.store.mark(self._unmarked)
            self._unmarked = None

    def _take(self, message: Any) -> bool:
        """True to hand `message` out; False for a duplicate (skipped, counted)."""
        key = message_key(message)
        if self.store.seen(key):
            self._skipped += 1
            return False
        self._unmarked = key
        self._delivered += 1
        return True

    def _idle(self, since: float) -> bool:
        return self.idle_timeout_ms is not None and (time.monotonic() - since) * 1000 >= self.idle_timeout_ms

    def flush(self) -> None:
        flush = getattr(self.store, "flush", None)
        if flush is not None:
            flush()

    def statistics(self) -> IdempotentConsumerStatistics:
        return IdempotentConsumerStatistics(delivered=self._delivered, duplicates_skipped=self._skipped)

    def _close_store(self) -> None:
        self.flush()
        if self._owned is not None:
            self._owned.close()


class IdempotentConsumer(_Base):
    """Wraps a sync Consumer (poll()) or Queue (iteration); see the module docstring.
    Give `path` (an LMDB directory beside the consumer) or `store` (a KeyStore)."""

    def __init__(
        self,
        consumer: Any,
        path: str | os.PathLike | None = None,
        *,
        store: KeyStore | None = None,
        keys_max: int = KEYS_MAX,
        write_batch_max: int = WRITE_BATCH_MAX,
        idle_timeout_ms: int | None = None,
    ) -> None:
        super().__init__(consumer, path, store, keys_max, write_batch_max)
        self.idle_timeout_ms = idle_timeout_ms

    def __enter__(self) -> IdempotentConsumer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        idle_since = time.monotonic()
        if not hasattr(self.consumer, "poll"):  # a queue: receive() one at a time
            while not self.consumer.closed:
                self._settle_previous()
                message = self.consumer.receive(QUEUE_RECEIVE_WAIT_MS)
                if message is None:
                    if self._idle(idle_since):
                        return
                    continue
                idle_since = time.monotonic()
                if self._take(message):
                    yield message
                else:
                    message.ack()
            self._settle_previous()
            return
        while not self.consumer.closed:
            self._settle_previous()
            self.flush()  # marks are durable before poll() may auto-commit past them
            batch = self.consumer.poll()
            if not batch:
                if self._idle(idle_since):
                    return
                continue
            idle_since = time.monotonic()
            for index, message in enumerate(batch):
                self._settle_previous()
                if not self._take(message):
                    continue
                try:
                    yield message
                except GeneratorExit:  # the loop left (break): this one counts as handled
                    self._settle_previous()
                    self.flush()
                    self.consumer.rewind(batch[index + 1 :])
                    raise
            self._settle_previous()

    def close(self) -> None:
        """Record the last message handed out, flush, close an owned store (the
        consumer stays open: it is yours)."""
        self._settle_previous()
        self._close_store()


class AsyncIdempotentConsumer(_Base):
    """IdempotentConsumer for an AsyncConsumer or AsyncQueue: `async for`."""

    def __init__(
        self,
        consumer: Any,
        path: str | os.PathLike | None = None,
        *,
        store: KeyStore | None = None,
        keys_max: int = KEYS_MAX,
        write_batch_max: int = WRITE_BATCH_MAX,
        idle_timeout_ms: int | None = None,
    ) -> None:
        super().__init__(consumer, path, store, keys_max, write_batch_max)
        self.idle_timeout_ms = idle_timeout_ms

    async def __aenter__(self) -> AsyncIdempotentConsumer:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()

    async def __aiter__(self) -> AsyncIterator[Any]:
        idle_since = time.monotonic()
        if not hasattr(self.consumer, "poll"):
            while not self.consumer.closed:
                self._settle_previous()
                message = await self.consumer.receive(QUEUE_RECEIVE_WAIT_MS)
                if message is None:
                    if self._idle(idle_since):
                        return
                    continue
                idle_since = time.monotonic()
                if self._take(message):
                    yield message
                else:
                    await message.ack()
            self._settle_previous()
            return
        while not self.consumer.closed:
            self._settle_previous()
            self.flush()
            batch = await self.consumer.poll()
            if not batch:
                if self._idle(idle_since):
                    return
                continue
            idle_since = time.monotonic()
            for index, message in enumerate(batch):
                self._settle_previous()
                if not self._take(message):
                    continue
                try:
                    yield message
                except GeneratorExit:
                    self._settle_previous()
                    self.flush()
                    self.consumer.rewind(batch[index + 1 :])
                    raise
            self._settle_previous()

    def close(self) -> None:
        self._settle_previous()
        self._close_store()


__all__ = [
    "AsyncIdempotentConsumer",
    "IdempotentConsumer",
    "IdempotentConsumerStatistics",
    "KEYS_MAX",
    "KeyStore",
    "KeyStoreStatistics",
    "LmdbKeyStore",
    "WRITE_BATCH_MAX",
    "message_key",
]
