"""Idempotent-producer state of one partition log (Kafka's producer state, simplified).

Per producer id the log remembers the current epoch and its last few batches (first and
last sequence, first and last offset). A batch is checked under the log's append lock:

- same epoch, sequences equal to a remembered batch -> a duplicate: answered with the
  original offsets, nothing written;
- same epoch, base_sequence == last sequence + 1 (wrapping at 2**31) -> appended;
- a newer epoch must start at sequence 0; an older epoch is fenced;
- a first batch from an unknown producer id is accepted at any sequence (the state may
  have been evicted); anything else is OutOfOrderSequenceError.

It is derived from the log (I6): snapshotted at roll and clean close, and rebuilt at
open by reading the batch headers after the snapshot's offset.

    producer-state.snapshot (big-endian)
      0  4  magic "NDPS"
      4  2  version (1)
      6  8  offset: the log end offset the snapshot describes
     14  4  entry count
     18     per entry: producer_id int64, epoch int16, last_append_ms int64,
                       batch count uint8, per batch: first_sequence int32,
                       last_sequence int32, first_offset int64, last_offset int64,
                       max_timestamp int64 (version 2 on)
      -  4  CRC-32C of everything before it

Version 2 adds each batch's max_timestamp, so a duplicate on a log-append-time topic is
answered with the original append time; a version-1 snapshot is still read (the times
unknown: -1).
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import crc32c as _crc32c

from .errors import InvalidProducerEpochError, OutOfOrderSequenceError
from .records import BatchHeader

SNAPSHOT_FILE = "producer-state.snapshot"
# Batches remembered per producer (Kafka keeps 5: the most a producer has in flight).
BATCHES_REMEMBERED = 5
# Producer ids remembered per partition; the least recently used is forgotten first.
PRODUCERS_PER_PARTITION_MAX = 10_000
SEQUENCE_MODULUS = 1 << 31

_MAGIC = b"NDPS"
_HEAD = struct.Struct(">4sHqI")
_ENTRY = struct.Struct(">qhqB")
_BATCH_V1 = struct.Struct(">iiqq")
_BATCH = struct.Struct(">iiqqq")
SNAPSHOT_VERSION = 2
_CRC = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class RememberedBatch:
    first_sequence: int
    last_sequence: int
    first_offset: int
    last_offset: int
    # The stored batch's max_timestamp: on a log-append-time topic, its append time
    # (-1: unknown, read from a version-1 snapshot).
    max_timestamp: int = -1


@dataclass(slots=True)
class ProducerEntry:
    epoch: int
    last_append_ms: int
    batches: deque = field(default_factory=lambda: deque(maxlen=BATCHES_REMEMBERED))

    @property
    def last_sequence(self) -> int:
        return self.batches[-1].last_sequence


def _last_sequence(header: BatchHeader) -> int:
    return (header.base_sequence + header.last_offset_delta) % SEQUENCE_MODULUS


class ProducerStateTable:
    def __init__(self, producers_max: int = PRODUCERS_PER_PARTITION_MAX) -> None:
        self.producers_max = producers_max
        self._entries: OrderedDict[int, ProducerEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, header: BatchHeader) -> RememberedBatch | None:
        """The remembered batch when `header` is a duplicate, None when it may be
        appended; raises for a fenced epoch or a sequence gap."""
        if header.producer_id < 0:
            return None
        entry = self._entries.get(header.producer_id)
        if entry is None:
            return None
        if header.producer_epoch < entry.epoch:
            raise InvalidProducerEpochError(
                f"producer {header.producer_id} epoch {header.producer_epoch} is fenced by epoch {entry.epoch}"
            )
        if header.producer_epoch > entry.epoch:
            if header.base_sequence != 0:
                raise OutOfOrderSequenceError(
                    f"producer {header.producer_id} new epoch {header.producer_epoch} must start at sequence 0, "
                    f"got {header.base_sequence}"
                )
            return None
        last = _last_sequence(header)
        for batch in entry.batches:
            if batch.first_sequence == header.base_sequence and batch.last_sequence == last:
                return batch
        expected = (entry.last_sequence + 1) % SEQUENCE_MODULUS
        if header.base_sequence != expected:
            raise OutOfOrderSequenceError(
                f"producer {header.producer_id} epoch {header.producer_epoch}: sequence "
                f"{header.base_sequence}, expected {expected}"
            )
        return None

    def record(self, header: BatchHeader, now_ms: int) -> None:
        """Remember a batch just appended (header with its assigned base offset)."""
        if header.producer_id < 0:
            return
        entry = self._entries.get(header.producer_id)
        if entry is None or header.producer_epoch != entry.epoch:
            entry = ProducerEntry(header.producer_epoch, now_ms)
            self._entries[header.producer_id] = entry
        entry.last_append_ms = now_ms
        entry.batches.append(
            RememberedBatch(
                header.base_sequence,
                _last_sequence(header),
                header.base_offset,
                header.last_offset,
                header.max_timestamp,
            )
        )
        self._entries.move_to_end(header.producer_id)
        while len(self._entries) > self.producers_max:
            self._entries.popitem(last=False)

    def encode_snapshot(self, offset: int) -> bytes:
        parts = [_HEAD.pack(_MAGIC, SNAPSHOT_VERSION, offset, len(self._entries))]
        for producer_id, entry in self._entries.items():
            parts.append(_ENTRY.pack(producer_id, entry.epoch, entry.last_append_ms, len(entry.batches)))
            parts.extend(
                _BATCH.pack(b.first_sequence, b.last_sequence, b.first_offset, b.last_offset, b.max_timestamp)
                for b in entry.batches
            )
        body = b"".join(parts)
        return body + _CRC.pack(_crc32c.crc32c(body))

    @classmethod
    def decode_snapshot(
        cls, data: bytes, producers_max: int = PRODUCERS_PER_PARTITION_MAX
    ) -> tuple[int, ProducerStateTable] | None:
        """(offset, table), or None for anything not a whole, checksummed snapshot."""
        if len(data) < _HEAD.size + _CRC.size:
            return None
        body, (crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
        if _crc32c.crc32c(body) != crc:
            return None
        magic, version, offset, count = _HEAD.unpack_from(body, 0)
        if magic != _MAGIC or version not in (1, SNAPSHOT_VERSION):
            return None
        batch_struct = _BATCH_V1 if version == 1 else _BATCH
        table = cls(producers_max)
        position = _HEAD.size
        try:
            for _ in range(count):
                producer_id, epoch, last_append_ms, batch_count = _ENTRY.unpack_from(body, position)
                position += _ENTRY.size
                if batch_count == 0:
                    return None
                entry = ProducerEntry(epoch, last_append_ms)
                for _ in range(batch_count):
                    entry.batches.append(RememberedBatch(*batch_struct.unpack_from(body, position)))
                    position += batch_struct.size
                table._entries[producer_id] = entry
        except struct.error:
            return None
        if position != len(body):
            return None
        return offset, table
