"""The one codec of a queue-group partition's persisted state: the value the server
stages in the metadata store's queue_state sub-database (storage/metadata.py) once per
loop tick. See broker/server/queues.py for what the state means."""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from nodi.storage.errors import InvalidConfigError

from ..protocol.queue_settings import QueueSettings
from .queues import DeadLetterReason, Delivery, DeliveryState, LeaseRun, PartitionQueue

# ---------------------------------------------------------------------------
# Persistence: the queue_state value of one partition (big-endian)
#
#     offset  size  field
#          0     1  format_version       2 (1: without reserved_offset, read as next_offset)
#          1     8  floor                int64: every offset below is done
#          9     8  next_offset          int64: the first offset never delivered
#         17     8  reserved_offset      int64 >= next_offset: first deliveries may have
#                                        gone out up to here uncommitted (broker/server/queues.py,
#                                        "Reservation"); a restart counts each offset in
#                                        [next_offset, reserved_offset) as delivered once
#         25     4  settings_length      uint32
#         29     s  settings             QueueSettings as JSON (UTF-8)
#          .     4  entry_count          uint32: entries that follow, by offset
#   then per entry:
#          0     8  offset               int64, in [floor, next_offset)
#          8     4  delivery_count       uint32 (0: handed out, then taken back unsent)
#         12     8  first_delivery_ms    int64
#         20     8  last_delivery_ms     int64
#         28     8  not_before_ms        int64: deliver again no earlier (0: now); a
#                                        lease is stored as its deadline
#         36     1  reason               0 none; else to dead-letter: 1 max-deliveries,
#                                        2 rejected, 3 expired
#         37     2  error_length         uint16
#         39     e  last_error           UTF-8

QUEUE_STATE_VERSION = 2
_STATE_HEADER = struct.Struct(">BqqqI")
_STATE_HEADER_V1 = struct.Struct(">BqqI")
_COUNT = struct.Struct(">I")
_ENTRY = struct.Struct(">qIqqqBH")
_OFFSET = struct.Struct(">q")  # an entry's first field
ENTRY_BYTES = _ENTRY.size  # per pending message, before its error text
# Distinct group settings whose stored JSON is kept (encode_partition runs at each commit).
SETTINGS_JSON_CACHED_MAX = 256


def state_bytes_max(window_messages_max: int, error_text_bytes_max: int, backoff_delays_max: int) -> int:
    """The largest value a partition's state can encode to under these limits (the
    settings JSON: under 2 KiB plus at most 12 bytes per backoff delay)."""
    return (
        _STATE_HEADER.size
        + _COUNT.size
        + 2048
        + 12 * backoff_delays_max
        + window_messages_max * (ENTRY_BYTES + error_text_bytes_max)
    )


@functools.lru_cache(maxsize=SETTINGS_JSON_CACHED_MAX)
def _settings_json(settings: QueueSettings) -> bytes:
    """A group's settings as stored (encoded once, not at each commit of its state)."""
    return settings.to_json()


def encode_partition(queue: PartitionQueue) -> bytes:
    settings = _settings_json(queue.settings)
    reserved = max(queue.reserved_offset, queue.next_offset)
    pending = queue.pending
    parts = [
        _STATE_HEADER.pack(QUEUE_STATE_VERSION, queue.floor, queue.next_offset, reserved, len(settings)),
        settings,
        _COUNT.pack(len(pending)),
    ]
    # Every commit of the partition's state encodes its whole window (a thousand entries
    # and more with consumers of max_outstanding 1,000): the first deliveries of a take,
    # as taken, are their run's stretch of entries (encoded once, sliced); the loop over
    # the others is kept lean, and an entry without an error text (most) is one pack.
    append = parts.append
    pack = _ENTRY.pack
    leased = DeliveryState.LEASED
    offsets = sorted(pending)
    index = 0
    count = len(offsets)
    while index < count:
        offset = offsets[index]
        delivery = pending[offset]
        index += 1
        if type(delivery) is LeaseRun and delivery.intact:
            # offset is fresh_low, and every offset up to fresh_end is the run's too:
            # the rest of its stretch.
            assert offset == delivery.fresh_low
            append(_fresh_entries(delivery)[(offset - delivery.first) * ENTRY_BYTES :])
            index += delivery.fresh - 1
            continue
        not_before = delivery.lease_deadline_ms if delivery.state is leased else delivery.not_before_ms
        text = delivery.last_error
        error = text.encode("utf-8") if text else b""
        append(
            pack(
                offset,
                delivery.delivery_count,
                delivery.first_delivery_ms,
                delivery.last_delivery_ms,
                not_before,
                delivery.reason,
                len(error),
            )
        )
        if error:
            append(error)
    return b"".join(parts)


def _fresh_entries(run: LeaseRun) -> bytes:
    """The entries of the run's offsets [first, fresh_end) as first deliveries taken
    at run.taken_ms and leased until its deadline, as encode_partition writes each one:
    entries that differ only in their offset, encoded once (kept on the run)."""
    stretch = run.stretch
    if stretch is None:
        suffix = _ENTRY.pack(0, 1, run.taken_ms, run.taken_ms, run.deadline_ms, DeadLetterReason.NONE, 0)
        suffix = suffix[_OFFSET.size :]
        stretch = suffix.join(map(_OFFSET.pack, range(run.first, run.fresh_end))) + suffix
        run.stretch = stretch
    return stretch


@dataclass(frozen=True, slots=True)
class DecodedPartition:
    floor: int
    next_offset: int
    settings: QueueSettings
    deliveries: tuple[Delivery, ...]
    reserved_offset: int = -1  # -1: as next_offset (a version 1 value)

    @property
    def reservation_end(self) -> int:
        return max(self.reserved_offset, self.next_offset)


class QueueStateError(ValueError):
    """Bytes that are not a queue state value."""


def decode_partition(data: bytes) -> DecodedPartition:
    try:
        version = data[0] if data else None
        if version == 1:
            _, floor, next_offset, settings_length = _STATE_HEADER_V1.unpack_from(data)
            reserved = next_offset
            position = _STATE_HEADER_V1.size
        elif version == QUEUE_STATE_VERSION:
            _, floor, next_offset, reserved, settings_length = _STATE_HEADER.unpack_from(data)
            position = _STATE_HEADER.size
        else:
            raise QueueStateError(f"format_version {version}, expected 1 or {QUEUE_STATE_VERSION}")
        if not 0 <= floor <= next_offset <= reserved:
            raise QueueStateError(
                f"floor {floor}, next_offset {next_offset} and reserved_offset {reserved} out of order"
            )
        settings = QueueSettings.from_json(data[position : position + settings_length])
        position += settings_length
        (count,) = _COUNT.unpack_from(data, position)
        position += _COUNT.size
        deliveries = []
        previous = floor - 1
        for _ in range(count):
            offset, delivery_count, first, last, not_before, reason, error_length = _ENTRY.unpack_from(data, position)
            position += _ENTRY.size
            if not previous < offset < next_offset:
                raise QueueStateError(f"entry at offset {offset} out of order or outside the window")
            previous = offset
            delivery = Delivery(offset)
            delivery.delivery_count = delivery_count
            delivery.first_delivery_ms = first
            delivery.last_delivery_ms = last
            delivery.not_before_ms = not_before
            delivery.last_error = bytes(data[position : position + error_length]).decode("utf-8")
            position += error_length
            delivery.reason = DeadLetterReason(reason)
            if delivery.reason is not DeadLetterReason.NONE:
                delivery.state = DeliveryState.DEAD
            deliveries.append(delivery)
        if position != len(data):
            raise QueueStateError(f"{len(data) - position} bytes after the last entry")
    except (struct.error, UnicodeDecodeError, ValueError, TypeError, KeyError, InvalidConfigError) as error:
        if isinstance(error, QueueStateError):
            raise
        raise QueueStateError(f"unreadable queue state: {error}") from None
    return DecodedPartition(floor, next_offset, settings, tuple(deliveries), reserved)
