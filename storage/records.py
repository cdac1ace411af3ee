"""The one codec for Apache Kafka's RecordBatch v2, shared by the log, the broker, the
client and the admin tools.

Batch layout (big-endian, 61-byte header; see docs/storage-format.md):

    offset  size  field
         0     8  base_offset            assigned by the log, outside the CRC
         8     4  batch_length           bytes after this field
        12     4  partition_leader_epoch outside the CRC
        16     1  magic                  always 2
        17     4  crc                    CRC-32C of bytes 21..end
        21     2  attributes             bits 0-2 codec, 3 timestamp type, 4 transactional,
                                         5 control, 6 delete horizon
        23     4  last_offset_delta
        27     8  base_timestamp         ms
        35     8  max_timestamp          ms
        43     8  producer_id            -1 when not idempotent
        51     2  producer_epoch
        53     4  base_sequence
        57     4  records_count
        61     -  records                the whole section compressed when codec != 0

Record (varints are zig-zag, as protobuf): length, attributes int8, timestamp_delta
varlong, offset_delta varint, key_length (-1 = null), key, value_length (-1 = null),
value, header_count, then per header key_length + UTF-8 key, value_length + value.

Every decode error is an InvalidRecordError (or a subclass); nothing else escapes on
garbage input.
"""

from __future__ import annotations

import enum
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import crc32c as _crc32c

from . import codecs
from .errors import (
    CorruptBatchError,
    InvalidRecordError,
    LimitExceededError,
    RecordFramingError,
    RecordLimitError,
    UnsupportedCompressionError,
)
from .limits import DEFAULT_RECORD_LIMITS, RecordLimits

MAGIC = 2
BATCH_HEADER_BYTES = 61
# base_offset + batch_length: the bytes in front of what batch_length counts.
LOG_OVERHEAD_BYTES = 12
BATCH_LENGTH_MIN = BATCH_HEADER_BYTES - LOG_OVERHEAD_BYTES
CRC_START = 21  # attributes onwards is covered by the CRC

_HEADER = struct.Struct(">qiibIhiqqqhii")
# The header in two parts: up to the CRC, and the fields the CRC covers (attributes on).
_HEADER_UNCOVERED = struct.Struct(">qiibI")
_HEADER_COVERED = struct.Struct(">hiqqqhii")
_CRC = struct.Struct(">I")
CRC_OFFSET = 17
_BASE_OFFSET = struct.Struct(">q")
_LENGTH_PREFIX = struct.Struct(">qi")
assert _HEADER.size == BATCH_HEADER_BYTES
assert _HEADER_UNCOVERED.size == CRC_START
assert _HEADER_UNCOVERED.size + _HEADER_COVERED.size == BATCH_HEADER_BYTES

ATTRIBUTE_CODEC_MASK = 0x07
ATTRIBUTE_TIMESTAMP_TYPE = 0x08
ATTRIBUTE_TRANSACTIONAL = 0x10
ATTRIBUTE_CONTROL = 0x20
ATTRIBUTE_DELETE_HORIZON = 0x40


class Compression(enum.IntEnum):
    NONE = 0
    GZIP = 1
    SNAPPY = 2
    LZ4 = 3
    ZSTD = 4


# Every codec of Kafka's: storage/codecs.py. Bits 5-7 name none and are refused.
SUPPORTED_COMPRESSION = frozenset(Compression)


class BatchHeader(NamedTuple):
    base_offset: int
    batch_length: int
    partition_leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    records_count: int

    @property
    def size(self) -> int:
        """Bytes of the whole batch, header included."""
        return LOG_OVERHEAD_BYTES + self.batch_length

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def compression(self) -> int:
        return self.attributes & ATTRIBUTE_CODEC_MASK

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & ATTRIBUTE_CONTROL)

    @property
    def is_transactional(self) -> bool:
        return bool(self.attributes & ATTRIBUTE_TRANSACTIONAL)


class Record(NamedTuple):
    """A decoded record. headers is a tuple of (str key, bytes-or-None value)."""

    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]


class NewRecord(NamedTuple):
    """A record to encode. timestamp_ms None means "now"."""

    key: bytes | None = None
    value: bytes | None = None
    headers: Sequence[tuple[str, bytes | None]] = ()
    timestamp_ms: int | None = None


# ---------------------------------------------------------------------------
# Header


def parse_header(buffer: bytes | bytearray | memoryview, position: int = 0) -> BatchHeader:
    """Decode the 61-byte header at `position` without touching the records."""
    if len(buffer) - position < BATCH_HEADER_BYTES:
        raise CorruptBatchError(
            f"truncated batch header: {len(buffer) - position} of {BATCH_HEADER_BYTES} bytes",
            position=position,
        )
    return BatchHeader._make(_HEADER.unpack_from(buffer, position))


def read_length_prefix(buffer: bytes | bytearray | memoryview, position: int = 0) -> tuple[int, int]:
    """(base_offset, whole batch size) from the first 12 bytes at `position`."""
    if len(buffer) - position < LOG_OVERHEAD_BYTES:
        raise CorruptBatchError(
            f"truncated length prefix: {len(buffer) - position} of {LOG_OVERHEAD_BYTES} bytes",
            position=position,
        )
    base_offset, batch_length = _LENGTH_PREFIX.unpack_from(buffer, position)
    return base_offset, LOG_OVERHEAD_BYTES + batch_length


# What a walk over stored batches reads of each header: base_offset, batch_length,
# partition_leader_epoch, magic, crc, attributes, last_offset_delta (its first 27 bytes).
_HEADER_WALK = struct.Struct(">qiibIhi")
HEADER_WALK_BYTES = _HEADER_WALK.size


def walk_header(buffer: bytes | bytearray | memoryview, position: int, limits: RecordLimits) -> tuple[int, int, int]:
    """(base_offset, whole batch size, last_offset) of the batch whose header starts at
    `position` in `buffer` (HEADER_WALK_BYTES of it there at least), checked as
    check_header checks a header except for records_count, which lies past these bytes:
    for walks over batches that passed check_batch when written or first read (a read
    of the log), not for bytes never checked. CorruptBatchError when a check fails."""
    base_offset, batch_length, _, magic, _, _, last_offset_delta = _HEADER_WALK.unpack_from(buffer, position)
    size = LOG_OVERHEAD_BYTES + batch_length
    if batch_length < BATCH_LENGTH_MIN:
        raise CorruptBatchError(f"batch_length {batch_length} below {BATCH_LENGTH_MIN}")
    if size > limits.batch_bytes_max:
        raise CorruptBatchError(f"batch of {size} bytes exceeds batch_bytes_max {limits.batch_bytes_max}")
    if magic != MAGIC:
        raise CorruptBatchError(f"magic {magic}, expected {MAGIC}")
    if last_offset_delta < 0:
        raise CorruptBatchError(f"negative last_offset_delta {last_offset_delta}")
    return base_offset, size, base_offset + last_offset_delta


def compute_crc(batch: bytes | bytearray | memoryview) -> int:
    return _crc32c.crc32c(memoryview(batch)[CRC_START:])


def check_header(header: BatchHeader, limits: RecordLimits = DEFAULT_RECORD_LIMITS) -> None:
    """Length bounds and magic: what can be checked before reading the whole batch."""
    if header.batch_length < BATCH_LENGTH_MIN:
        raise CorruptBatchError(f"batch_length {header.batch_length} below {BATCH_LENGTH_MIN}")
    if header.size > limits.batch_bytes_max:
        raise LimitExceededError(f"batch of {header.size} bytes exceeds batch_bytes_max {limits.batch_bytes_max}")
    if header.magic != MAGIC:
        raise CorruptBatchError(f"magic {header.magic}, expected {MAGIC}")
    if header.records_count < 0 or header.last_offset_delta < 0:
        raise CorruptBatchError(
            f"negative records_count {header.records_count} or last_offset_delta {header.last_offset_delta}"
        )
    if header.records_count > limits.records_per_batch_max:
        raise LimitExceededError(
            f"{header.records_count} records exceed records_per_batch_max {limits.records_per_batch_max}"
        )


def check_batch(
    batch: bytes | bytearray | memoryview,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> BatchHeader:
    """Validate one whole batch (exactly `batch`): header bounds, magic, size, CRC."""
    header = parse_header(batch)
    check_header(header, limits)
    if header.size != len(batch):
        raise CorruptBatchError(f"batch_length says {header.size} bytes, have {len(batch)}")
    actual = compute_crc(batch)
    if actual != header.crc:
        raise CorruptBatchError(f"crc mismatch: stored {header.crc:#010x}, computed {actual:#010x}")
    return header


def split_batches(
    buffer: bytes | bytearray | memoryview,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> list[tuple[int, BatchHeader]]:
    """Validate a buffer that must hold one or more whole batches and nothing else.
    Returns (position, header) for each; raises on the first bad byte."""
    view = memoryview(buffer)
    found: list[tuple[int, BatchHeader]] = []
    position = 0
    end = len(view)
    if end == 0:
        raise CorruptBatchError("no batch in an empty buffer", position=0)
    while position < end:
        try:
            header = check_batch_at(view, position, limits)
        except CorruptBatchError as error:
            error.position = position
            raise
        found.append((position, header))
        position += header.size
    return found


class CheckedBatches(NamedTuple):
    """walk_batches' answer: check_batches' (position, header) of each batch, and
    whether some record of some batch carries a header (False: no record has one, known
    from the walk; compressed batches' records included)."""

    batches: list[tuple[int, BatchHeader]]
    headers: bool


def check_batches(
    buffer: bytes | bytearray | memoryview,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> list[tuple[int, BatchHeader]]:
    """split_batches, then check_records on each batch: whole batches whose records a
    reader can decode. A RecordFramingError names the batch's byte position."""
    return walk_batches(buffer, limits).batches


def walk_batches(
    buffer: bytes | bytearray | memoryview,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> CheckedBatches:
    """check_batches, keeping what its walk learns of the records' header counts: a
    produce path asks whether any record carries a header before it searches the bytes
    for one (broker/server/dedup.py)."""
    view = memoryview(buffer)
    found = split_batches(view, limits)
    headers = False
    for position, header in found:
        try:
            if check_records(view[position : position + header.size], header, limits):
                headers = True
        except RecordFramingError as error:
            error.position = position
            error.args = (f"batch at byte {position}: {error}",)
            raise
    return CheckedBatches(found, headers)


def check_batch_at(view: memoryview, position: int, limits: RecordLimits = DEFAULT_RECORD_LIMITS) -> BatchHeader:
    header = parse_header(view, position)
    check_header(header, limits)
    if position + header.size > len(view):
        raise CorruptBatchError(
            f"batch of {header.size} bytes runs past the end of the buffer ({len(view) - position} left)"
        )
    actual = _crc32c.crc32c(view[position + CRC_START : position + header.size])
    if actual != header.crc:
        raise CorruptBatchError(f"crc mismatch: stored {header.crc:#010x}, computed {actual:#010x}")
    return header


def set_base_offset(batch: bytearray | memoryview, base_offset: int, position: int = 0) -> None:
    """Patch base_offset in place. The CRC does not cover it, so it stays valid."""
    _BASE_OFFSET.pack_into(batch, position, base_offset)


def encode_base_offset(base_offset: int) -> bytes:
    return _BASE_OFFSET.pack(base_offset)


def stamp_log_append_time(
    batch: bytes | bytearray | memoryview, header: BatchHeader, append_time_ms: int, position: int = 0
) -> tuple[bytes, BatchHeader]:
    """A log-append-time topic's patch of one checked batch at `position` (Kafka's
    setMaxTimestamp with LOG_APPEND_TIME): the timestamp-type bit set in attributes,
    max_timestamp = append_time_ms, the CRC-32C computed again over the patched bytes.
    Everything else stays as the producer wrote it: base_timestamp, the records and
    their timestamp deltas (every reader takes max_timestamp as each record's time when
    the bit is set). Returns the new bytes 8..61 of the batch (batch_length through
    records_count; base_offset is the log's) and the header they describe. The records
    section is read in place, never copied."""
    patched = header._replace(
        attributes=header.attributes | ATTRIBUTE_TIMESTAMP_TYPE, max_timestamp=append_time_ms, crc=0
    )
    covered = _HEADER_COVERED.pack(*patched[5:])
    records = memoryview(batch)[position + BATCH_HEADER_BYTES : position + header.size]
    crc = _crc32c.crc32c(records, _crc32c.crc32c(covered))
    patched = patched._replace(crc=crc)
    uncovered = _HEADER_UNCOVERED.pack(*patched[:5])
    return uncovered[8:] + covered, patched


# ---------------------------------------------------------------------------
# Varints (zig-zag)

_ONE_BYTE = [bytes((value,)) for value in range(128)]
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


def _encode_varint(value: int) -> bytes:
    zigzag = (value << 1) ^ (value >> 63)
    if zigzag < 128:
        return _ONE_BYTE[zigzag]
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidRecordError(f"varint {value} is outside the int64 range")
    out = bytearray()
    while zigzag >= 0x80:
        out.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    out.append(zigzag)
    return bytes(out)


def _decode_varint(buffer: bytes | memoryview, position: int, max_bytes: int = 10) -> tuple[int, int]:
    result = 0
    shift = 0
    end = len(buffer)
    for _ in range(max_bytes):
        if position >= end:
            raise CorruptBatchError("truncated varint")
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (result >> 1) ^ -(result & 1), position
        shift += 7
    raise CorruptBatchError(f"varint longer than {max_bytes} bytes")


_NULL = _encode_varint(-1)
# The varints of 0 .. VARINT_TABLE_SIZE - 1 (record lengths, value sizes and offset
# deltas of records up to 8 KiB), for the encoder's common case.
VARINT_TABLE_SIZE = 1 << 13
_VARINTS = [_encode_varint(value) for value in range(VARINT_TABLE_SIZE)]


# ---------------------------------------------------------------------------
# Encoding


def encode_records(
    records: Sequence[NewRecord] | Sequence[tuple],
    base_timestamp: int,
    now_ms: int,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
    offset_deltas: Sequence[int] | None = None,
) -> tuple[bytes, int]:
    """Encode the records section (uncompressed). A record without a timestamp gets
    `now_ms`. Record i gets offset delta i, or offset_deltas[i] (compaction keeps the
    original offsets of the records it retains). Returns (bytes, max_timestamp): the
    greatest record timestamp (base_timestamp when there is no record).
    """
    parts, _, max_timestamp = _encode_parts(records, base_timestamp, now_ms, limits, offset_deltas)
    return b"".join(parts), max_timestamp


def _encode_parts(
    records: Sequence[NewRecord] | Sequence[tuple],
    base_timestamp: int,
    now_ms: int,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
    offset_deltas: Sequence[int] | None = None,
) -> tuple[list[bytes], int, int]:
    """encode_records' work, unjoined: (the parts that make the records section, their
    total bytes, max_timestamp), so build_batch_buffer can put the batch together with
    one copy. The one per-record loop on the producer's hot path: keep it lean. A record
    without headers (the common case) is a few precomputed varints around its key and
    value, and consecutive ones with the same value size and timestamp share them."""
    varint = _encode_varint
    varints = _VARINTS
    table_size = VARINT_TABLE_SIZE
    one_byte = _ONE_BYTE
    null = _NULL
    record_bytes_max = limits.record_bytes_max
    headers_max = limits.headers_per_record_max
    parts: list[bytes] = []
    append = parts.append
    extend = parts.extend
    max_timestamp = INT64_MIN if records else base_timestamp
    total = 0
    shared_size = shared_delta = -1  # what timestamp_part, value_size_part, fixed_bytes were made for
    timestamp_part = value_size_part = b""
    fixed_bytes = 0  # a keyless record's bytes but its offset delta and length
    for offset_delta, record in enumerate(records) if offset_deltas is None else zip(offset_deltas, records):
        key, value, headers, timestamp_ms = record
        if timestamp_ms is None:
            timestamp_ms = now_ms
        if timestamp_ms > max_timestamp:
            max_timestamp = timestamp_ms
        if not headers and value is not None:
            size = len(value)
            delta = timestamp_ms - base_timestamp
            if size != shared_size or delta != shared_delta:
                if size > record_bytes_max:
                    raise LimitExceededError(f"record of {size} bytes exceeds record_bytes_max {record_bytes_max}")
                # attributes + timestamp_delta; null key + value_length; both + the value
                # + header_count
                timestamp_part = b"\x00" + (varints[delta] if 0 <= delta < table_size else varint(delta))
                value_size_part = null + (varints[size] if size < table_size else varint(size))
                fixed_bytes = len(timestamp_part) + len(value_size_part) + size + 1
                shared_size, shared_delta = size, delta
            offset_part = varints[offset_delta] if 0 <= offset_delta < table_size else varint(offset_delta)
            if key is None:
                length = fixed_bytes + len(offset_part)
                length_part = varints[length] if length < table_size else varint(length)
                extend((length_part, timestamp_part, offset_part, value_size_part, value, b"\x00"))
            else:
                key_size = len(key)
                if key_size + size > record_bytes_max:
                    raise LimitExceededError(
                        f"record of {key_size + size} bytes exceeds record_bytes_max {record_bytes_max}"
                    )
                key_part = varints[key_size] if key_size < table_size else varint(key_size)
                # the key's length and bytes in place of the null key's one byte
                length = fixed_bytes - 1 + len(key_part) + key_size + len(offset_part)
                length_part = varints[length] if length < table_size else varint(length)
                extend((length_part, timestamp_part, offset_part, key_part, key, value_size_part[1:], value, b"\x00"))
            total += len(length_part) + length
            continue
        body = [
            b"\x00",
            varint(timestamp_ms - base_timestamp),
            one_byte[offset_delta << 1] if offset_delta < 64 else varint(offset_delta),
        ]
        size = 0
        if key is None:
            body.append(null)
        else:
            body.append(varint(len(key)))
            body.append(key)
            size += len(key)
        if value is None:
            body.append(null)
        else:
            body.append(varint(len(value)))
            body.append(value)
            size += len(value)
        if headers:
            if len(headers) > headers_max:
                raise LimitExceededError(f"{len(headers)} headers exceed headers_per_record_max {headers_max}")
            body.append(varint(len(headers)))
            for header_key, header_value in headers:
                try:
                    encoded_key = header_key.encode()
                except UnicodeEncodeError:
                    raise InvalidRecordError("header key is not encodable as UTF-8") from None
                body.append(varint(len(encoded_key)))
                body.append(encoded_key)
                size += len(encoded_key)
                if header_value is None:
                    body.append(null)
                else:
                    body.append(varint(len(header_value)))
                    body.append(header_value)
                    size += len(header_value)
        else:
            body.append(b"\x00")
        if size > record_bytes_max:
            raise LimitExceededError(f"record of {size} bytes exceeds record_bytes_max {record_bytes_max}")
        encoded = b"".join(body)
        length_part = varint(len(encoded))
        append(length_part)
        append(encoded)
        total += len(length_part) + len(encoded)
    return parts, total, max_timestamp


def build_batch(records: Sequence[NewRecord] | Sequence[tuple], **options) -> bytes:
    """One RecordBatch v2 holding `records` (each a NewRecord or a
    (key, value, headers, timestamp_ms) tuple) with a valid CRC, as bytes; the options
    are build_batch_buffer's."""
    return bytes(build_batch_buffer(records, **options))


def build_batch_buffer(
    records: Sequence[NewRecord] | Sequence[tuple],
    *,
    base_offset: int = 0,
    compression: Compression = Compression.NONE,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
    base_timestamp: int | None = None,
    attributes: int = 0,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
    offset_deltas: Sequence[int] | None = None,
    last_offset_delta: int | None = None,
) -> bytearray:
    """build_batch's batch in a new bytearray, put together with one copy of the records
    (bytes would need a second: the CRC is only known once they are in place). For a
    sender that hands it to a socket, like the producer: a fresh 256 KiB buffer costs
    page faults on top of the copy. Offsets are dense
    unless `offset_deltas` (increasing) and `last_offset_delta` say otherwise: a
    compacted batch keeps its records' original offsets and its original offset range."""
    if not records:
        raise InvalidRecordError("a batch needs at least one record")
    if len(records) > limits.records_per_batch_max:
        raise LimitExceededError(f"{len(records)} records exceed records_per_batch_max {limits.records_per_batch_max}")
    if compression not in SUPPORTED_COMPRESSION:
        known = compression in Compression._value2member_map_
        name = Compression(compression).name if known else compression
        raise UnsupportedCompressionError(f"compression {name} is not supported")
    now_ms = int(time.time() * 1000)
    if base_timestamp is None:
        stamps = [record[3] for record in records if record[3] is not None]
        if len(stamps) < len(records):
            stamps.append(now_ms)
        base_timestamp = min(stamps)
    if offset_deltas is not None and (
        len(offset_deltas) != len(records)
        or any(later <= earlier for earlier, later in zip(offset_deltas, offset_deltas[1:]))
        or offset_deltas[0] < 0
    ):
        raise InvalidRecordError("offset_deltas must be one non-negative, increasing delta per record")
    if last_offset_delta is None:
        last_offset_delta = len(records) - 1 if offset_deltas is None else offset_deltas[-1]
    elif last_offset_delta < (len(records) - 1 if offset_deltas is None else offset_deltas[-1]):
        raise InvalidRecordError(f"last_offset_delta {last_offset_delta} is below the last record's delta")
    parts, body_bytes, max_timestamp = _encode_parts(records, base_timestamp, now_ms, limits, offset_deltas)
    if compression != Compression.NONE:
        parts = [codecs.compress(compression, b"".join(parts))]
        body_bytes = len(parts[0])
    attributes = (attributes & ~ATTRIBUTE_CODEC_MASK) | int(compression)
    size = BATCH_HEADER_BYTES + body_bytes
    if size > limits.batch_bytes_max:
        raise LimitExceededError(f"batch of {size} bytes exceeds batch_bytes_max {limits.batch_bytes_max}")
    try:
        covered = _HEADER_COVERED.pack(
            attributes,
            last_offset_delta,
            base_timestamp,
            max_timestamp,
            producer_id,
            producer_epoch,
            base_sequence,
            len(records),
        )
        uncovered = _HEADER_UNCOVERED.pack(base_offset, size - LOG_OVERHEAD_BYTES, -1, MAGIC, 0)
    except struct.error as error:
        raise InvalidRecordError(f"batch header field out of range: {error}") from None
    parts[:0] = (uncovered, covered)
    batch = bytearray().join(parts)
    assert len(batch) == size
    _CRC.pack_into(batch, CRC_OFFSET, compute_crc(batch))
    return batch


def gzip_compress(data: bytes) -> bytes:
    return codecs.compress(Compression.GZIP, data)


# ---------------------------------------------------------------------------
# Decoding, and the walk a produce must pass (Kafka's LogValidator): one parser

# Batch attribute bits with a meaning (codec, timestamp type, transactional, control,
# delete horizon); a batch setting any other bit is refused on produce.
ATTRIBUTES_KNOWN_MASK = 0x7F
# The fewest bytes a record can hold after its length: attributes, timestamp delta,
# offset delta, key length, value length and header count, one byte each.
RECORD_BYTES_MIN = 6
# The fewest bytes of one record header: its key length and value length varints.
RECORD_HEADER_BYTES_MIN = 2


def records_section(
    batch: bytes | bytearray | memoryview,
    header: BatchHeader,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> bytes:
    """The uncompressed records section of a batch whose header was checked. A section
    that does not inflate (garbage, past decompressed_batch_bytes_max) raises
    RecordFramingError; a codec nodi does not decode, UnsupportedCompressionError."""
    raw = memoryview(batch)[BATCH_HEADER_BYTES : header.size]
    codec = header.compression
    if codec == Compression.NONE:
        return bytes(raw)
    if codec not in SUPPORTED_COMPRESSION:
        raise UnsupportedCompressionError(f"compression {codec} is not supported; refusing to decode")
    try:
        return codecs.decompress(codec, raw, limits.decompressed_batch_bytes_max)
    except LimitExceededError as error:
        raise RecordLimitError(f"records section: {error}", field="records") from None
    except InvalidRecordError as error:
        raise RecordFramingError(f"records section: {error}", field="records") from None


def check_records(
    batch: bytes | bytearray | memoryview,
    header: BatchHeader,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> bool:
    """Walk the records of one batch whose header and CRC were checked, building
    nothing: what Kafka's LogValidator checks before a batch is written, and what
    `segments verify` checks of stored ones. Every record's length, attributes (no bits
    set), varints, key, value, header count and header lengths in bounds; offset deltas
    increasing within 0..last_offset_delta; exactly records_count records filling the
    section; no unknown batch attribute bits. A compressed section is inflated up to
    decompressed_batch_bytes_max and walked the same way. Raises RecordFramingError
    naming the record and the field (UnsupportedCompressionError for a codec nodi does
    not decode), and nothing else. Returns whether some record carries a header (False:
    none does; True may also be a header count of 0 written in more than one byte)."""
    if header.attributes & ~ATTRIBUTES_KNOWN_MASK:
        raise RecordFramingError(
            f"batch attributes {header.attributes & 0xFFFF:#06x} set unknown bits "
            f"(known: {ATTRIBUTES_KNOWN_MASK:#06x})",
            field="attributes",
        )
    if header.compression == Compression.NONE:
        # bytes: a strided slice of bytes costs a fifth of one of a memoryview
        data = batch if type(batch) is bytes and len(batch) == header.size else bytes(memoryview(batch)[: header.size])
        position = BATCH_HEADER_BYTES
    else:
        data, position = records_section(batch, header, limits), 0
    header_count = _walk_uniform(data, position, header, limits)
    if header_count is None:
        return _scan_records(data, position, header, limits, None)
    return header_count > 0


def records_without_headers(
    batch: bytes | bytearray | memoryview,
    header: BatchHeader,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> bool:
    """Whether no record of an uncompressed batch (header and CRC checked) has a header,
    known without a walk record by record: its records are uniform (check_records' fast
    path: the header count is one of the bytes every record shares) and the first has
    none. False says nothing is known. What a queue receive asks before it searches a
    batch's bytes for the names of the headers it must honour."""
    if header.compression != Compression.NONE:
        return False
    data = batch if type(batch) is bytes and len(batch) == header.size else bytes(memoryview(batch)[: header.size])
    read = _decode_varint
    try:
        _, position = read(data, BATCH_HEADER_BYTES, 5)
        position += 3  # attributes, a one-byte timestamp delta, offset delta 0 (as _uniform_layout reads)
        for _ in range(2):  # the key, then the value: a length (-1: null) and that many bytes
            size, position = read(data, position, 5)
            position += max(size, 0)
        if data[position] != 0:  # the first record's header count
            return False
    except (IndexError, CorruptBatchError):
        return False
    return _walk_uniform(data, BATCH_HEADER_BYTES, header, limits) == 0


def iter_records(
    batch: bytes | bytearray | memoryview,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
    *,
    verify: bool = True,
) -> Iterator[Record]:
    """Decode every record of one batch. With verify (the default) the CRC and bounds are
    checked first; pass verify=False only for bytes the log already verified."""
    header = check_batch(batch, limits) if verify else parse_header(batch)
    return iter(decode_records(batch, header, limits))


def decode_records(
    batch: bytes | bytearray | memoryview,
    header: BatchHeader,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> list[Record]:
    """Every record of one batch whose header was checked: check_records' walk, keeping
    what it walks over. A batch that does not decode raises RecordFramingError (its CRC
    checked out, so it was stored that way: readers skip it and report it)."""
    records: list[Record] = []
    _scan_records(records_section(batch, header, limits), 0, header, limits, records)
    return records


def _framing_error(
    index: int, field: str, message: str, error_type: type[RecordFramingError] = RecordFramingError
) -> RecordFramingError:
    return error_type(f"record {index}: {field}: {message}", record_index=index, field=field)


def _scan_records(
    data: bytes | memoryview,
    position: int,
    header: BatchHeader,
    limits: RecordLimits,
    records: list[Record] | None,
) -> bool:
    """The one record parser, over data[position:]: with `records` a list, each record
    is decoded into it (the consumer's hot loop); with None only the framing is walked
    (the produce path's). Returns whether some record's header count was not the
    one-byte 0 (check_records' answer). The varints of one and two bytes (every field of a record of up
    to 8 KiB) are decoded inline, longer ones by _decode_varint; an index past the end
    is a truncated field, named by `field`."""
    read = _decode_varint
    make = tuple.__new__
    record_type = Record
    append = None if records is None else records.append
    end = len(data)
    count = header.records_count
    last_offset_delta = header.last_offset_delta
    base_offset = header.base_offset
    base_timestamp = header.base_timestamp
    # With log-append time every record carries the batch's max_timestamp (as in Kafka).
    log_append_time = bool(header.attributes & ATTRIBUTE_TIMESTAMP_TYPE)
    max_timestamp = header.max_timestamp
    headers_max = limits.headers_per_record_max
    record_bytes_max = limits.record_bytes_max
    previous_delta = -1
    index = 0
    field = "length"
    headers_seen = False
    headers: tuple = ()
    key = value = None
    try:
        for index in range(count):
            if position >= end:
                raise _framing_error(index, "records_count", f"records_count says {count}, the batch holds {index}")
            # length (zig-zag varint: 1 byte below 64, 2 bytes below 8192)
            field = "length"
            byte = data[position]
            if byte < 0x80:
                length = (byte >> 1) ^ -(byte & 1)
                position += 1
            elif data[position + 1] < 0x80:
                length = (byte & 0x7F) | (data[position + 1] << 7)
                length = (length >> 1) ^ -(length & 1)
                position += 2
            else:
                length, position = read(data, position, 5)
            record_end = position + length
            if length < RECORD_BYTES_MIN or record_end > end:
                raise _framing_error(
                    index,
                    field,
                    f"{length} bytes, outside {RECORD_BYTES_MIN}..{end - position} (what is left of the batch)",
                )
            field = "attributes"
            if data[position]:
                raise _framing_error(index, field, f"{data[position]:#04x} sets unknown bits")
            field = "timestamp delta"
            byte = data[position + 1]
            if byte < 0x80:
                timestamp_delta = (byte >> 1) ^ -(byte & 1)
                position += 2
            else:
                timestamp_delta, position = read(data, position + 1)
                if not INT64_MIN <= timestamp_delta <= INT64_MAX:
                    raise _framing_error(index, field, f"{timestamp_delta} is outside the int64 range")
            field = "offset delta"
            byte = data[position]
            if byte < 0x80:
                offset_delta = (byte >> 1) ^ -(byte & 1)
                position += 1
            elif data[position + 1] < 0x80:
                offset_delta = (byte & 0x7F) | (data[position + 1] << 7)
                offset_delta = (offset_delta >> 1) ^ -(offset_delta & 1)
                position += 2
            else:
                offset_delta, position = read(data, position, 5)
            if not previous_delta < offset_delta <= last_offset_delta:
                raise _framing_error(
                    index,
                    field,
                    f"{offset_delta} after {previous_delta}: deltas must increase "
                    f"within 0..{last_offset_delta} (last_offset_delta)",
                )
            previous_delta = offset_delta
            field = "key length"
            size = 0
            byte = data[position]
            if byte == 1:  # key length -1: a null key
                key = None
                position += 1
            else:
                if byte < 0x80:
                    key_length = (byte >> 1) ^ -(byte & 1)
                    position += 1
                else:
                    key_length, position = read(data, position, 5)
                if key_length < -1:
                    raise _framing_error(index, field, f"{key_length} is negative")
                if position + key_length > record_end:
                    raise _framing_error(
                        index, field, f"{key_length} runs past the record ({record_end - position} bytes left)"
                    )
                if key_length < 0:
                    key = None
                else:
                    if append is not None:
                        key = data[position : position + key_length]
                    position += key_length
                    size = key_length
            field = "value length"
            byte = data[position]
            if byte < 0x80:
                value_length = (byte >> 1) ^ -(byte & 1)
                position += 1
            elif data[position + 1] < 0x80:
                value_length = (byte & 0x7F) | (data[position + 1] << 7)
                value_length = (value_length >> 1) ^ -(value_length & 1)
                position += 2
            else:
                value_length, position = read(data, position, 5)
            if value_length < 0:
                if value_length < -1:
                    raise _framing_error(index, field, f"{value_length} is negative")
                value = None
            else:
                if position + value_length > record_end:
                    raise _framing_error(
                        index, field, f"{value_length} runs past the record ({record_end - position} bytes left)"
                    )
                if append is not None:
                    value = data[position : position + value_length]
                position += value_length
                size += value_length
            field = "header count"
            if data[position] == 0:  # no headers
                headers = ()
                position += 1
            else:
                headers_seen = True
                headers, position, size = _scan_headers(
                    data, position, record_end, size, headers_max, index, append is not None
                )
            if position != record_end:
                field = "length"
                raise _framing_error(
                    index, field, f"{length} bytes, but its fields take {position - record_end + length}"
                )
            if size > record_bytes_max:
                field = "size"
                raise _framing_error(
                    index,
                    field,
                    f"{size} bytes of key, value and headers exceed record_bytes_max {record_bytes_max}",
                    RecordLimitError,
                )
            if append is not None:
                append(
                    make(
                        record_type,
                        (
                            base_offset + offset_delta,
                            max_timestamp if log_append_time else base_timestamp + timestamp_delta,
                            key,
                            value,
                            headers,
                        ),
                    )
                )
    except IndexError:
        raise _framing_error(index, field, "truncated: the batch ends inside it") from None
    except RecordFramingError:
        raise
    except CorruptBatchError as error:  # a varint too long or cut short
        raise _framing_error(index, field, str(error)) from None
    if position != end:
        raise RecordFramingError(
            f"{end - position} bytes after the last of {count} records (records_count says {count})",
            field="records_count",
        )
    return headers_seen


# The offset deltas a uniform run may hold, as _walk_uniform compares them a column at
# a time: the one-byte varints of 0..63, the low and high bytes of those of 64..8191.
# (A record's length includes its offset delta: 64 on, every record is one byte longer.)
UNIFORM_RECORDS_MAX = 8192
_DELTA_ONE_BYTE = bytes(2 * delta for delta in range(64))
_DELTA_LOW_BYTE = bytes(((2 * delta) & 0x7F) | 0x80 for delta in range(64, UNIFORM_RECORDS_MAX))
_DELTA_HIGH_BYTE = bytes((2 * delta) >> 7 for delta in range(64, UNIFORM_RECORDS_MAX))


def _walk_uniform(data: bytes, position: int, header: BatchHeader, limits: RecordLimits) -> int | None:
    """check_records' fast path for what producers send most: records that differ only
    in their timestamp delta (one byte), offset delta (0, 1, ...) and the bytes of their
    key, value and header values; every length, the header count and the header keys
    are the same in all of them. Then the records sit at a fixed stride and each framing
    byte is checked for all of them at once, as a strided slice compared in C, instead
    of record by record. When the records section is exactly that, the header count
    every record has; None says nothing is known (never an error): _scan_records then
    walks it record by record and names what is wrong."""
    count = header.records_count
    end = len(data)
    if not 0 < count <= UNIFORM_RECORDS_MAX or count - 1 > header.last_offset_delta:
        return None
    layout = _uniform_layout(data, position, limits)
    if layout is None:
        return None
    length_one, fixed_one, header_count = layout
    index = 0
    for width, run_end_index in ((1, 64), (2, UNIFORM_RECORDS_MAX)):
        count_here = min(count, run_end_index) - index
        if count_here <= 0:
            break
        record_length = length_one + width - 1
        length_part = _VARINTS[record_length] if record_length < VARINT_TABLE_SIZE else _encode_varint(record_length)
        stride = len(length_part) + record_length
        run_end = position + count_here * stride
        if run_end > end:
            return None
        for place, byte in enumerate(length_part):
            if data[position + place : run_end : stride].count(byte) != count_here:
                return None
        # attributes 0, then the timestamp delta (any one-byte varint), then the offset delta
        attributes_place = position + len(length_part)
        if data[attributes_place:run_end:stride].count(0) != count_here:
            return None
        if not data[attributes_place + 1 : run_end : stride].isascii():
            return None
        delta_place = attributes_place + 2
        if width == 1:
            if data[delta_place:run_end:stride] != _DELTA_ONE_BYTE[index : index + count_here]:
                return None
        elif (
            data[delta_place:run_end:stride] != _DELTA_LOW_BYTE[index - 64 : index - 64 + count_here]
            or data[delta_place + 1 : run_end : stride] != _DELTA_HIGH_BYTE[index - 64 : index - 64 + count_here]
        ):
            return None
        after_delta = delta_place + width
        for place, byte in fixed_one:
            if data[after_delta + place : run_end : stride].count(byte) != count_here:
                return None
        position = run_end
        index += count_here
    return header_count if position == end else None


def _uniform_layout(data: bytes, position: int, limits: RecordLimits) -> tuple[int, list[tuple[int, int]], int] | None:
    """For _walk_uniform, from the first record (read with the codec's varint reader):
    its length as it would be with a one-byte offset delta, (place, byte) of each
    byte after the offset delta that every record must share: the key's and the
    value's length, the header count, each header's key length, key and value length;
    and its header count (every record's, since its bytes are shared). None when the first record does not have that shape or breaks a limit."""
    read = _decode_varint
    try:
        length, start = read(data, position, 5)
        # attributes 0, a one-byte timestamp delta, offset delta 0
        if data[start] or data[start + 1] >= 0x80 or data[start + 2]:
            return None
        first = start + 3
        # The key, then the value: a length (-1: null) and that many bytes. Their
        # lengths are fixed bytes; what they hold is not.
        size, after = read(data, first, 5)
        if size < -1:
            return None
        fixed = [(place - first, data[place]) for place in range(first, after)]
        cursor = after + max(size, 0)
        payload = max(size, 0)  # key, value and headers, as record_bytes_max counts them
        size, after = read(data, cursor, 5)
        if size < -1:
            return None
        fixed += [(place - first, data[place]) for place in range(cursor, after)]
        cursor = after + max(size, 0)
        payload += max(size, 0)
        header_count = data[cursor]
        if header_count == 0:  # no headers: the common case
            fixed.append((cursor - first, 0))
            cursor += 1
        else:
            header_count, after = read(data, cursor, 5)
            if not 0 <= header_count <= limits.headers_per_record_max:
                return None
            fixed += [(place - first, data[place]) for place in range(cursor, after)]
            for _ in range(header_count):
                key_length, key_start = read(data, after, 5)
                if key_length < 0:
                    return None
                str(data[key_start : key_start + key_length], "utf-8")  # every record's key is these bytes
                value_length, value_start = read(data, key_start + key_length, 5)
                if value_length < -1:
                    return None
                # its key length, key and value length are fixed; its value is not
                fixed += [(place - first, data[place]) for place in range(after, value_start)]
                payload += key_length + max(value_length, 0)
                after = value_start + max(value_length, 0)
            cursor = after
    except (IndexError, CorruptBatchError, UnicodeDecodeError):
        return None
    if cursor != start + length or cursor > len(data) or payload > limits.record_bytes_max:
        return None
    return length, fixed, header_count


def _scan_headers(
    data: bytes | memoryview, position: int, record_end: int, size: int, headers_max: int, index: int, build: bool
) -> tuple[tuple[tuple[str, bytes | None], ...], int, int]:
    """(headers, position after them, size plus their bytes) of record `index`; the
    count is bounded by the bytes left in the record and by headers_max before anything
    is allocated for it. Without `build` the headers are walked, not kept (a key is
    still decoded: it must be UTF-8)."""
    read = _decode_varint
    byte = data[position]
    if byte < 0x80:
        header_count = (byte >> 1) ^ -(byte & 1)
        position += 1
    else:
        header_count, position = read(data, position, 5)
    left = record_end - position
    if header_count < 0:
        raise _framing_error(index, "header count", f"{header_count} is negative")
    if header_count * RECORD_HEADER_BYTES_MIN > left:
        raise _framing_error(
            index, "header count", f"{header_count} headers cannot fit in the {left} bytes left of the record"
        )
    if header_count > headers_max:
        raise _framing_error(
            index,
            "header count",
            f"{header_count} headers exceed headers_per_record_max {headers_max}",
            RecordLimitError,
        )
    headers: list[tuple[str, bytes | None]] = []
    append = headers.append
    number = 0
    field = "key length"
    try:
        for _ in range(header_count):
            field = "key length"
            byte = data[position]
            if byte < 0x80:
                name_length = (byte >> 1) ^ -(byte & 1)
                position += 1
            else:
                name_length, position = read(data, position, 5)
            if name_length < 0:
                raise ValueError(f"{name_length} is negative")
            if position + name_length > record_end:
                raise ValueError(f"{name_length} runs past the record ({record_end - position} bytes left)")
            field = "key"
            name = str(data[position : position + name_length], "utf-8")
            position += name_length
            size += name_length
            field = "value length"
            byte = data[position]
            if byte < 0x80:
                header_length = (byte >> 1) ^ -(byte & 1)
                position += 1
            else:
                header_length, position = read(data, position, 5)
            if header_length < 0:
                if header_length < -1:
                    raise ValueError(f"{header_length} is negative")
                header_value = None
            else:
                if position + header_length > record_end:
                    raise ValueError(f"{header_length} runs past the record ({record_end - position} bytes left)")
                header_value = data[position : position + header_length] if build else None
                position += header_length
                size += header_length
            if build:
                # build is only set by the consumer's decode, which is given bytes (the
                # produce path's walk may pass a memoryview, but keeps nothing).
                append((name, header_value))  # type: ignore[arg-type]
    except IndexError:
        raise _framing_error(index, f"header {number} {field}", "truncated: the batch ends inside it") from None
    except UnicodeDecodeError:
        raise _framing_error(index, f"header {number} {field}", "not UTF-8") from None
    except (ValueError, CorruptBatchError) as error:  # a bound, or a varint too long or cut short
        raise _framing_error(index, f"header {number} {field}", str(error)) from None
    return tuple(headers), position, size


def iter_batches(
    buffer: bytes | bytearray | memoryview,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> Iterator[tuple[BatchHeader, memoryview]]:
    """Checked (header, batch bytes) for each whole batch in `buffer`."""
    view = memoryview(buffer)
    for position, header in split_batches(view, limits):
        yield header, view[position : position + header.size]


def decode_batches(
    buffer: bytes | bytearray | memoryview,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> list[Record]:
    """Every record of every batch in `buffer` (checked), in order."""
    out: list[Record] = []
    for header, batch in iter_batches(buffer, limits):
        out.extend(decode_records(batch, header, limits))
    return out


def make_records(values: Iterable[bytes]) -> list[NewRecord]:
    """Convenience for tools and tests: value-only records."""
    return [NewRecord(None, value) for value in values]
