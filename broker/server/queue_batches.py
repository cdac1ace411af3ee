"""Stored batches as QueueReceiveBatches sends them: whole, or cut down to the records
delivered, without decoding a record.

A receive delivers some offsets of a stored batch (a batch of 250 records may serve
several receives of 50). Sending the whole batch each time would send its bytes several
times over; decoding its records and encoding the delivered ones again costs a round of
Python work per record. A slice does neither: the batch's records are walked once for
where each begins (one varint per record, kept with the batch for the receives that
follow), and a slice is the stored header with four fields rewritten plus the records'
bytes as stored:

    bytes  field                  in a slice of records i..j of the stored batch
    0      base_offset            unchanged (the records' offset deltas stay valid)
    8      batch_length           49 + the records' bytes
    17     crc                    CRC-32C of byte 21 to the end, computed again
    23     last_offset_delta      j (a dense batch: record i has offset delta i)
    57     records_count          j - i + 1

Only an uncompressed batch whose offsets are dense (records_count = last_offset_delta +
1, what every producer writes) is cut; any other is sent whole. A slice's first record
may have an offset delta above 0, as a compacted batch's may: every reader of RecordBatch
v2 takes it. The timestamps are left as stored (max_timestamp is still an upper bound).
"""

from __future__ import annotations

import struct

import crc32c

from nodi.storage.errors import NodiError
from nodi.storage.records import BATCH_HEADER_BYTES, CRC_START, LOG_OVERHEAD_BYTES, BatchHeader, check_records

_INT32 = struct.Struct(">i")
_UINT32 = struct.Struct(">I")
_BATCH_LENGTH_AT = 8
_CRC_AT = 17
_LAST_OFFSET_DELTA_AT = 23
_RECORDS_COUNT_AT = 57


class StoredBatch:
    """One batch as read from a partition's log, with what receives learn about it once."""

    __slots__ = ("header", "data", "names_delivery_header", "positions", "walked", "framing_error")

    def __init__(self, header: BatchHeader, data: bytes) -> None:
        self.header = header
        self.data = data
        self.names_delivery_header: bool | None = None  # its bytes hold a TTL or not-before name
        self.positions: list[int] | None = None  # where each record begins, then the end
        self.walked = False  # its records' framing was checked
        self.framing_error: NodiError | None = None  # what that check found

    def walk(self) -> NodiError | None:
        """The records' framing checked once (storage's check_records, what produce
        checks): None when every record decodes, else the error. A batch stored before
        produce walked records may not decode; it is never sent to a consumer."""
        if not self.walked:
            try:
                check_records(self.data, self.header)
            except NodiError as error:
                self.framing_error = error
            self.walked = True
        return self.framing_error

    @property
    def sliceable(self) -> bool:
        header = self.header
        return header.compression == 0 and header.records_count == header.last_offset_delta + 1

    def record_positions(self) -> list[int] | None:
        """Where each record begins, and the batch's end (kept); None when the framing
        does not add up (the batch is then sent whole, the reader's decoder judges it)."""
        if self.positions is None:
            count = self.header.records_count
            self.positions = _stride_positions(self.data, count) or _walk_lengths(self.data, count)
        return self.positions or None

    def slice(self, first_offset: int, last_offset: int) -> bytes:
        """The batch cut down to the records of offsets first_offset..last_offset (in
        it, a sliceable batch): the whole batch when that is all of it."""
        header = self.header
        first = first_offset - header.base_offset
        last = last_offset - header.base_offset
        assert 0 <= first <= last <= header.last_offset_delta
        if first == 0 and last == header.last_offset_delta:
            return self.data
        positions = self.record_positions()
        if positions is None:
            return self.data
        records = memoryview(self.data)[positions[first] : positions[last + 1]]
        out = bytearray(self.data[:BATCH_HEADER_BYTES])
        out += records
        _INT32.pack_into(out, _BATCH_LENGTH_AT, len(out) - LOG_OVERHEAD_BYTES)
        _INT32.pack_into(out, _LAST_OFFSET_DELTA_AT, last)
        _INT32.pack_into(out, _RECORDS_COUNT_AT, last - first + 1)
        _UINT32.pack_into(out, _CRC_AT, crc32c.crc32c(memoryview(out)[CRC_START:]))
        return bytes(out)


# Where a producer's uniform records change length: the offset delta's varint takes a
# second byte from delta 64 and a third from 8,192 (zig-zag), the rest staying the same.
_STRIDE_BREAKS = (64, 8_192)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    """The zig-zag varint at `position` and its width; (0, 0) when it does not end
    within 5 bytes or the data."""
    result = shift = 0
    for width in range(1, 6):
        if position >= len(data):
            return 0, 0
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result >> 1) ^ -(result & 1), width
        shift += 7
    return 0, 0


def _stride_positions(data: bytes, count: int) -> list[int]:
    """_walk_lengths for a batch whose records sit at fixed strides (a producer's
    uniform batch: one length up to offset delta 63, one byte more from 64, and from
    8,192), found without a step per record: each stretch's length varint is read once,
    then checked at every record of the stretch as a strided slice compared in C. When
    every record's length is the one checked, walking them would land on exactly these
    positions. [] when the batch is not laid out so (the caller walks it)."""
    positions: list[int] = []
    position = BATCH_HEADER_BYTES
    index = 0
    for stretch_end in (*_STRIDE_BREAKS, count):
        stretch_end = min(stretch_end, count)
        stretch_count = stretch_end - index
        if stretch_count <= 0:
            continue
        length, width = _read_varint(data, position)
        if length <= 0:
            return []
        stride = width + length
        end = position + stretch_count * stride
        if end > len(data):
            return []
        for place in range(width):
            if data[position + place : end : stride].count(data[position + place]) != stretch_count:
                return []
        positions.extend(range(position, end, stride))
        position = end
        index = stretch_end
    if position != len(data):
        return []
    positions.append(position)
    return positions


def _walk_lengths(data: bytes, count: int) -> list[int]:
    """The start of each of `count` records (zig-zag varint length, then that many
    bytes) from the end of the batch header, then the end; [] when they do not fill
    the batch exactly."""
    positions: list[int] = []
    position = BATCH_HEADER_BYTES
    end = len(data)
    append = positions.append
    for _ in range(count):
        if position >= end:
            return []
        append(position)
        result = shift = 0
        while True:
            if position >= end or shift > 28:
                return []
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        length = (result >> 1) ^ -(result & 1)
        if length <= 0:
            return []
        position += length
    if position != end:
        return []
    append(end)
    return positions
