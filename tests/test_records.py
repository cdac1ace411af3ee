"""The RecordBatch v2 codec (storage/records.py): round trips, named limits, torn and
garbage input, unsupported codecs, and byte compatibility with Apache Kafka's format.

The decoders' promise under test: any input either decodes or raises an
InvalidRecordError (a NodiError); never IndexError, struct.error, UnicodeDecodeError,
zlib.error, ValueError or anything else. Torn tails (F2) and bit rot (F6) are detected.
"""

from __future__ import annotations

import dataclasses
import struct
import warnings
import zlib

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodi.storage import codecs, records
from nodi.storage.errors import (
    CorruptBatchError,
    InvalidRecordError,
    LimitExceededError,
    NodiError,
    UnsupportedCompressionError,
)
from nodi.storage.limits import DEFAULT_RECORD_LIMITS, KIB, MIB, RecordLimits
from nodi.storage.records import Compression, NewRecord

try:  # an independent implementation of the format (the dev extra installs it)
    with warnings.catch_warnings():  # kafka-python's import-time deprecation noise
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
except ImportError:  # pragma: no cover - only without the dev extra
    DefaultRecordBatch = DefaultRecordBatchBuilder = None

needs_kafka_python = pytest.mark.skipif(DefaultRecordBatch is None, reason="kafka-python (dev extra) is not installed")

INT16_MAX = (1 << 15) - 1
INT32_MAX = (1 << 31) - 1
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

SMALL_LIMITS = RecordLimits(
    batch_bytes_max=64 * KIB,
    record_bytes_max=4 * KIB,
    headers_per_record_max=8,
    records_per_batch_max=32,
    decompressed_batch_bytes_max=256 * KIB,
)
SUPPORTED_CODECS = tuple(Compression)
UNSUPPORTED_CODEC_NUMBERS = (5, 6, 7)

QUICK = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------
# Strategies

optional_bytes = st.none() | st.binary(max_size=48)
header_keys = st.text(max_size=10)  # any code point but lone surrogates
header_values = st.none() | st.binary(max_size=16)
headers_lists = st.lists(st.tuples(header_keys, header_values), max_size=SMALL_LIMITS.headers_per_record_max)
# Plausible millisecond timestamps, negative ones included.
timestamps = st.integers(-(1 << 40), 1 << 42)
optional_timestamps = st.none() | timestamps

new_records = st.builds(
    NewRecord,
    key=optional_bytes,
    value=optional_bytes,
    headers=headers_lists,
    timestamp_ms=optional_timestamps,
)
record_lists = st.lists(new_records, min_size=1, max_size=10)
buffer_types = st.sampled_from([bytes, bytearray, memoryview])
flag_attributes = st.sampled_from(
    [
        0,
        records.ATTRIBUTE_TRANSACTIONAL,
        records.ATTRIBUTE_CONTROL | records.ATTRIBUTE_TRANSACTIONAL,
        records.ATTRIBUTE_DELETE_HORIZON,
    ]
)


@st.composite
def batch_arguments(draw, record_strategy=record_lists):
    """Keyword arguments for build_batch, valid under SMALL_LIMITS."""
    return {
        "records": draw(record_strategy),
        "base_offset": draw(st.integers(0, 1 << 62)),
        "compression": draw(st.sampled_from(SUPPORTED_CODECS)),
        "producer_id": draw(st.sampled_from([-1]) | st.integers(0, INT64_MAX)),
        "producer_epoch": draw(st.integers(-1, INT16_MAX)),
        "base_sequence": draw(st.integers(-1, INT32_MAX)),
        "base_timestamp": draw(st.none() | timestamps),
        "attributes": draw(flag_attributes),
        "limits": SMALL_LIMITS,
    }


@st.composite
def valid_batches(draw):
    """Deterministic bytes for the drawn choices (no "now" timestamps): the mutation
    strategies draw positions from the batch's length, and hypothesis needs a replayed
    example to make the same draws."""
    few_records = st.lists(
        st.builds(NewRecord, key=optional_bytes, value=optional_bytes, headers=headers_lists, timestamp_ms=timestamps),
        min_size=1,
        max_size=4,
    )
    arguments = draw(batch_arguments(few_records))
    return records.build_batch(**arguments)


# ---------------------------------------------------------------------------
# Helpers


def reseal(batch: bytes | bytearray) -> bytes:
    """Rewrite batch_length and the CRC so that damage behind them reaches the record
    decoder instead of being caught by the CRC check."""
    out = bytearray(batch)
    if len(out) >= records.BATCH_HEADER_BYTES:
        struct.pack_into(">i", out, 8, len(out) - records.LOG_OVERHEAD_BYTES)
        struct.pack_into(">I", out, 17, crc32c.crc32c(bytes(out[records.CRC_START :])))
    return bytes(out)


def with_section(batch: bytes, section: bytes, codec: int, records_count: int | None = None) -> bytes:
    """`batch`'s header around a new (plain) records section, compressed with `codec`."""
    header = bytearray(batch[: records.BATCH_HEADER_BYTES])
    attributes = struct.unpack_from(">h", header, 21)[0]
    struct.pack_into(">h", header, 21, (attributes & ~records.ATTRIBUTE_CODEC_MASK) | codec)
    if records_count is not None:
        struct.pack_into(">i", header, 57, records_count)
    body = codecs.compress(codec, section) if codec != Compression.NONE else section
    return reseal(header + body)


def plain_section(batch: bytes) -> bytes:
    header = records.check_batch(batch, SMALL_LIMITS)
    return records.records_section(batch, header, SMALL_LIMITS)


def payload_bytes(record: NewRecord) -> int:
    """What record_bytes_max counts: key + value + UTF-8 header keys + header values."""
    size = len(record.key or b"") + len(record.value or b"")
    for key, value in record.headers:
        size += len(key.encode()) + len(value or b"")
    return size


def _split_batches(buffer, limits):
    return records.split_batches(buffer, limits)


def _check_batch(buffer, limits):
    return records.check_batch(buffer, limits)


def _decode_batches(buffer, limits):
    return records.decode_batches(buffer, limits)


def _iter_batches(buffer, limits):
    return list(records.iter_batches(buffer, limits))


def _iter_records(buffer, limits):
    return list(records.iter_records(buffer, limits))


def _iter_records_unverified(buffer, limits):
    return list(records.iter_records(buffer, limits, verify=False))


def _parse_header(buffer, limits):
    return records.parse_header(buffer)


def _read_length_prefix(buffer, limits):
    return records.read_length_prefix(buffer)


DECODERS = (
    _split_batches,
    _check_batch,
    _decode_batches,
    _iter_batches,
    _iter_records,
    _iter_records_unverified,
    _parse_header,
    _read_length_prefix,
)
# The decoders that must reject anything but whole, valid batches.
STRICT_DECODERS = (_split_batches, _check_batch, _decode_batches, _iter_records)


def decode_every_way(buffer, limits: RecordLimits = SMALL_LIMITS) -> None:
    """Every decoder either succeeds or raises InvalidRecordError. Any other exception
    (IndexError, struct.error, zlib.error, UnicodeDecodeError...) fails the test."""
    for decoder in DECODERS:
        try:
            decoder(buffer, limits)
        except InvalidRecordError:
            pass


def expected_timestamps(arguments: dict, decoded: list[records.Record]) -> list[int]:
    """Record timestamps as written; records without one all get the same "now"."""
    defaulted = {record.timestamp_ms for record, new in zip(decoded, arguments["records"]) if new.timestamp_ms is None}
    assert len(defaulted) <= 1
    if not defaulted:  # every record carries its own timestamp
        return [new.timestamp_ms for new in arguments["records"]]
    now_ms = defaulted.pop()
    return [now_ms if new.timestamp_ms is None else new.timestamp_ms for new in arguments["records"]]


def assert_round_trip(batch: bytes, arguments: dict, buffer_type=bytes):
    new = arguments["records"]
    limits = arguments["limits"]
    buffer = buffer_type(batch)
    header = records.check_batch(buffer, limits)

    assert header.size == len(batch)
    assert header.batch_length == len(batch) - records.LOG_OVERHEAD_BYTES
    assert header.magic == records.MAGIC
    assert header.partition_leader_epoch == -1
    assert header.crc == crc32c.crc32c(batch[records.CRC_START :])
    assert header.compression == arguments["compression"]
    assert header.attributes & ~records.ATTRIBUTE_CODEC_MASK == arguments["attributes"]
    assert header.records_count == len(new)
    assert header.last_offset_delta == len(new) - 1
    assert header.base_offset == arguments["base_offset"]
    assert header.last_offset == arguments["base_offset"] + len(new) - 1
    assert header.producer_id == arguments["producer_id"]
    assert header.producer_epoch == arguments["producer_epoch"]
    assert header.base_sequence == arguments["base_sequence"]
    assert records.split_batches(buffer, limits) == [(0, header)]

    decoded = records.decode_batches(buffer, limits)
    assert list(records.iter_records(buffer, limits)) == decoded
    assert records.decode_records(buffer, header, limits) == decoded
    assert len(decoded) == len(new)

    stamps = expected_timestamps(arguments, decoded)
    for index, (record, original, stamp) in enumerate(zip(decoded, new, stamps)):
        assert record.offset == arguments["base_offset"] + index
        assert record.timestamp_ms == stamp
        assert record.key == original.key
        assert record.value == original.value
        assert record.headers == tuple(original.headers)
        for value in (record.key, record.value):
            assert value is None or type(value) is bytes
    if arguments["base_timestamp"] is None:
        assert header.base_timestamp == min(stamps)
    else:
        assert header.base_timestamp == arguments["base_timestamp"]
    assert header.max_timestamp == max(stamps)


# ---------------------------------------------------------------------------
# Round trips


@THOROUGH
@given(arguments=batch_arguments(), buffer_type=buffer_types)
def test_round_trip(arguments, buffer_type):
    assert_round_trip(records.build_batch(**arguments), arguments, buffer_type)


@QUICK
@given(arguments=batch_arguments())
def test_tuples_encode_like_new_records(arguments):
    arguments["records"] = [
        record._replace(timestamp_ms=1_000 + index) for index, record in enumerate(arguments["records"])
    ]
    as_tuples = dict(arguments, records=[tuple(record) for record in arguments["records"]])
    assert records.build_batch(**as_tuples) == records.build_batch(**arguments)


@pytest.mark.parametrize("codec", SUPPORTED_CODECS)
@pytest.mark.parametrize(
    "record",
    [
        NewRecord(None, None),
        NewRecord(b"", b""),
        NewRecord(None, b""),
        NewRecord(b"", None),
        NewRecord(b"k", None),  # a tombstone
        NewRecord(None, b"v", [("", b"")]),
        NewRecord(None, b"v", [("only-null", None)]),
        NewRecord(b"\x00" * 200, b"\xff" * 300, [("ключ", b"\x80"), ("鍵🔑", None), ("k", b"")]),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_edge_records_round_trip(record, codec):
    arguments = {
        "records": [record],
        "base_offset": 0,
        "compression": codec,
        "producer_id": -1,
        "producer_epoch": -1,
        "base_sequence": -1,
        "base_timestamp": None,
        "attributes": 0,
        "limits": DEFAULT_RECORD_LIMITS,
    }
    assert_round_trip(records.build_batch(**arguments), arguments)


class FixedClock:
    """Stands in for the time module inside records: build_batch reads time.time()."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def time(self) -> float:
        return self.seconds


def test_default_timestamps_use_the_clock(monkeypatch):
    monkeypatch.setattr(records, "time", FixedClock(1_700_000_000.123))
    batch = records.build_batch(records.make_records([b"a", b"b", b"c"]))
    header = records.check_batch(batch)
    assert header.base_timestamp == header.max_timestamp == 1_700_000_000_123
    decoded = records.decode_batches(batch)
    assert [record.value for record in decoded] == [b"a", b"b", b"c"]
    assert [record.timestamp_ms for record in decoded] == [1_700_000_000_123] * 3


def test_default_and_explicit_timestamps_mix(monkeypatch):
    monkeypatch.setattr(records, "time", FixedClock(5.0))
    new = [
        NewRecord(None, b"a", (), 7_000),
        NewRecord(None, b"b"),  # gets "now": 5 s
        NewRecord(None, b"c", (), 4_000),
    ]
    batch = records.build_batch(new)
    header = records.check_batch(batch)
    assert (header.base_timestamp, header.max_timestamp) == (4_000, 7_000)
    decoded = records.decode_batches(batch)
    assert [record.timestamp_ms for record in decoded] == [7_000, 5_000, 4_000]


def test_negative_timestamp_deltas():
    stamps = [9_000, 10_000, 12_345, 9_999]
    batch = records.build_batch([NewRecord(None, b"v", (), stamp) for stamp in stamps], base_timestamp=10_000)
    header = records.check_batch(batch)
    assert header.base_timestamp == 10_000
    assert header.max_timestamp == 12_345  # the greatest record timestamp, not the base
    assert [record.timestamp_ms for record in records.decode_batches(batch)] == stamps
    # first record: length, attributes, then timestamp delta -1000 (zig-zag 1999 = 0xcf 0x0f)
    assert batch[61 + 1 : 61 + 4] == b"\x00\xcf\x0f"


def test_max_timestamp_ignores_an_explicit_base_above_every_record():
    batch = records.build_batch([NewRecord(None, b"v", (), 100)], base_timestamp=200)
    header = records.check_batch(batch)
    assert (header.base_timestamp, header.max_timestamp) == (200, 100)
    assert records.decode_batches(batch)[0].timestamp_ms == 100


@THOROUGH
@given(
    stamps=st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=1, max_size=4),
    base_timestamp=st.none() | st.integers(INT64_MIN, INT64_MAX),
)
def test_extreme_timestamps_round_trip_or_raise_typed(stamps, base_timestamp):
    """Kafka's timestamp delta is an int64 varlong: a delta outside int64 cannot be
    written, and must be refused rather than silently mis-encoded."""
    new = [NewRecord(None, b"v", (), stamp) for stamp in stamps]
    base = min(stamps) if base_timestamp is None else base_timestamp
    fits = all(INT64_MIN <= stamp - base <= INT64_MAX for stamp in stamps)
    if not fits:
        with pytest.raises(InvalidRecordError):
            records.build_batch(new, base_timestamp=base_timestamp)
        return
    batch = records.build_batch(new, base_timestamp=base_timestamp)
    header = records.check_batch(batch)
    assert header.base_timestamp == base
    assert header.max_timestamp == max(stamps)
    assert [record.timestamp_ms for record in records.decode_batches(batch)] == stamps


@pytest.mark.parametrize("stamp", [INT64_MAX + 1, INT64_MIN - 1, 1 << 80])
def test_timestamps_outside_int64_are_refused(stamp):
    with pytest.raises(InvalidRecordError):
        records.build_batch([NewRecord(None, b"v", (), stamp)])
    with pytest.raises(InvalidRecordError):
        records.build_batch([NewRecord(None, b"v", (), 0)], base_timestamp=stamp)


@pytest.mark.parametrize(
    "field, value",
    [
        ("producer_id", INT64_MAX + 1),
        ("producer_epoch", INT16_MAX + 1),
        ("base_sequence", INT32_MAX + 1),
    ],
)
def test_header_fields_outside_their_types_are_refused(field, value):
    with pytest.raises(InvalidRecordError):
        records.build_batch(records.make_records([b"v"]), **{field: value})


def test_header_key_that_is_not_utf8_encodable_is_refused():
    with pytest.raises(InvalidRecordError):
        records.build_batch([NewRecord(None, b"v", [("\udc80", b"x")])])


def test_empty_batch_is_refused():
    with pytest.raises(InvalidRecordError):
        records.build_batch([])


def test_flag_attributes_are_kept_and_codec_bits_come_from_compression():
    flags = records.ATTRIBUTE_TRANSACTIONAL | records.ATTRIBUTE_CONTROL
    batch = records.build_batch(
        [NewRecord(struct.pack(">hh", 0, 1), b"\x00" * 6, (), 5)],
        attributes=flags | Compression.ZSTD,  # stray codec bits are overridden
        compression=Compression.GZIP,
    )
    header = records.check_batch(batch)
    assert header.compression == Compression.GZIP
    assert header.is_control and header.is_transactional
    assert header.attributes == flags | Compression.GZIP
    assert records.decode_batches(batch)[0].key == b"\x00\x00\x00\x01"


TWO_TIMED_RECORDS = [NewRecord(None, b"a", (), 10), NewRecord(None, b"b", (), 20)]


def test_log_append_time_gives_every_record_the_max_timestamp():
    """Kafka's DefaultRecord.readFrom: with timestamp type 1 (log-append time) every
    record's timestamp is the batch's max_timestamp, whatever its delta says."""
    batch = bytearray(records.build_batch(TWO_TIMED_RECORDS))
    append_time_ms = 1_700_000_000_000
    struct.pack_into(">h", batch, 21, records.ATTRIBUTE_TIMESTAMP_TYPE)
    struct.pack_into(">q", batch, 35, append_time_ms)
    batch = reseal(batch)
    assert [record.timestamp_ms for record in records.decode_batches(batch)] == [append_time_ms] * 2


# ---------------------------------------------------------------------------
# base_offset and leader epoch patching keep the CRC valid


@THOROUGH
@given(
    batch=valid_batches(),
    base_offset=st.integers(INT64_MIN, INT64_MAX - 64),
    buffer_type=st.sampled_from([bytearray, memoryview]),
)
def test_set_base_offset_keeps_crc_valid(batch, base_offset, buffer_type):
    before = records.decode_batches(batch, SMALL_LIMITS)
    storage = bytearray(batch)
    target = storage if buffer_type is bytearray else memoryview(storage)
    records.set_base_offset(target, base_offset)
    patched = bytes(storage)
    assert patched[:8] == records.encode_base_offset(base_offset)
    assert patched[8:] == batch[8:]  # CRC included: it does not cover base_offset
    header = records.check_batch(patched, SMALL_LIMITS)
    assert header.base_offset == base_offset
    assert records.read_length_prefix(patched) == (base_offset, len(batch))
    after = records.decode_batches(patched, SMALL_LIMITS)
    old_base = records.parse_header(batch).base_offset
    assert [record.offset - base_offset for record in after] == [record.offset - old_base for record in before]
    assert [record[1:] for record in after] == [record[1:] for record in before]


@QUICK
@given(batches=st.lists(valid_batches(), min_size=1, max_size=4), log_start=st.integers(0, 1 << 40))
def test_set_base_offset_at_positions_assigns_dense_offsets(batches, log_start):
    """What the log does on append: patch each batch's base offset in place (I3)."""
    buffer = bytearray(b"".join(batches))
    next_offset = log_start
    for position, header in records.split_batches(buffer, SMALL_LIMITS):
        records.set_base_offset(buffer, next_offset, position)
        next_offset += header.last_offset_delta + 1
    decoded = records.decode_batches(buffer, SMALL_LIMITS)
    assert [record.offset for record in decoded] == list(range(log_start, next_offset))


def test_leader_epoch_is_outside_the_crc():
    batch = bytearray(records.build_batch(records.make_records([b"v"])))
    struct.pack_into(">i", batch, 12, 42)
    assert records.check_batch(batch).partition_leader_epoch == 42


# ---------------------------------------------------------------------------
# Named limits


def limits_with(**overrides) -> RecordLimits:
    return dataclasses.replace(SMALL_LIMITS, **overrides)


@pytest.mark.parametrize("codec", SUPPORTED_CODECS)
def test_batch_bytes_max(codec):
    new = [NewRecord(None, bytes(range(256)) * 4)]
    size = len(records.build_batch(new, compression=codec, limits=SMALL_LIMITS))
    at_limit = limits_with(batch_bytes_max=size)
    below = limits_with(batch_bytes_max=size - 1)
    batch = records.build_batch(new, compression=codec, limits=at_limit)
    assert records.decode_batches(batch, at_limit)[0].value == new[0].value
    with pytest.raises(LimitExceededError):
        records.build_batch(new, compression=codec, limits=below)
    for decoder in STRICT_DECODERS:
        with pytest.raises(LimitExceededError):
            decoder(batch, below)


@pytest.mark.parametrize("codec", SUPPORTED_CODECS)
@pytest.mark.parametrize(
    "record",
    [
        NewRecord(b"k" * 40, None),
        NewRecord(None, b"v" * 40),
        NewRecord(None, None, [("é" * 20, None)]),  # 40 bytes of UTF-8
        NewRecord(None, None, [("h", b"x" * 39)]),
        NewRecord(b"k" * 10, b"v" * 10, [("ab", b"12345"), ("c", None), ("d", b"e" * 11)]),
    ],
    ids=["key", "value", "header-key", "header-value", "everything"],
)
def test_record_bytes_max(record, codec):
    assert payload_bytes(record) == 40
    at_limit = limits_with(record_bytes_max=40)
    below = limits_with(record_bytes_max=39)
    batch = records.build_batch([NewRecord(None, b"small"), record], compression=codec, limits=at_limit)
    decoded = records.decode_batches(batch, at_limit)[1]
    assert (decoded.key, decoded.value, decoded.headers) == (record.key, record.value, tuple(record.headers))
    with pytest.raises(LimitExceededError):
        records.build_batch([record], compression=codec, limits=below)
    # A batch from a producer with larger limits is refused where it is parsed.
    for decoder in (_decode_batches, _iter_records):
        with pytest.raises(LimitExceededError):
            decoder(batch, below)


@QUICK
@given(record=new_records)
def test_record_bytes_max_counts_key_value_and_headers(record):
    size = payload_bytes(record)
    at_limit = limits_with(record_bytes_max=size)
    batch = records.build_batch([record], limits=at_limit)
    assert len(records.decode_batches(batch, at_limit)) == 1
    if size > 0:
        below = limits_with(record_bytes_max=size - 1)
        with pytest.raises(LimitExceededError):
            records.build_batch([record], limits=below)
        with pytest.raises(LimitExceededError):
            records.decode_batches(batch, below)


@pytest.mark.parametrize("codec", SUPPORTED_CODECS)
def test_headers_per_record_max(codec):
    limit = SMALL_LIMITS.headers_per_record_max
    headers = [(f"h{index}", None if index % 2 else b"x") for index in range(limit)]
    batch = records.build_batch([NewRecord(None, b"v", headers)], compression=codec, limits=SMALL_LIMITS)
    assert records.decode_batches(batch, SMALL_LIMITS)[0].headers == tuple(headers)
    with pytest.raises(LimitExceededError):
        records.build_batch([NewRecord(None, b"v", headers + [("one-more", b"")])], limits=SMALL_LIMITS)
    fewer = limits_with(headers_per_record_max=limit - 1)
    for decoder in (_decode_batches, _iter_records):
        with pytest.raises(LimitExceededError):
            decoder(batch, fewer)


def test_headers_per_record_max_default_limit():
    limit = DEFAULT_RECORD_LIMITS.headers_per_record_max
    headers = [(f"header-{index}", str(index).encode()) for index in range(limit)]
    batch = records.build_batch([NewRecord(b"k", b"v", headers)], compression=Compression.GZIP)
    assert records.decode_batches(batch)[0].headers == tuple(headers)
    with pytest.raises(LimitExceededError):
        records.build_batch([NewRecord(b"k", b"v", headers + [("x", None)])])


@pytest.mark.parametrize("codec", SUPPORTED_CODECS)
def test_records_per_batch_max(codec):
    limit = SMALL_LIMITS.records_per_batch_max
    values = [str(index).encode() for index in range(limit)]
    batch = records.build_batch(records.make_records(values), compression=codec, limits=SMALL_LIMITS)
    assert [record.value for record in records.decode_batches(batch, SMALL_LIMITS)] == values
    with pytest.raises(LimitExceededError):
        records.build_batch(records.make_records(values + [b"x"]), limits=SMALL_LIMITS)
    fewer = limits_with(records_per_batch_max=limit - 1)
    for decoder in STRICT_DECODERS:
        with pytest.raises(LimitExceededError):
            decoder(batch, fewer)


def test_decompressed_batch_bytes_max_exact():
    new = [NewRecord(None, b"z" * 3000, (), 0), NewRecord(b"k", b"y" * 1000, (), 7)]
    batch = records.build_batch(new, compression=Compression.GZIP, base_timestamp=0, limits=SMALL_LIMITS)
    section, _ = records.encode_records(new, 0, 0, SMALL_LIMITS)
    at_limit = limits_with(decompressed_batch_bytes_max=len(section))
    decoded = records.decode_batches(batch, at_limit)
    assert [record.value for record in decoded] == [record.value for record in new]
    with pytest.raises(LimitExceededError):
        records.decode_batches(batch, limits_with(decompressed_batch_bytes_max=len(section) - 1))


def test_gzip_bomb_is_refused():
    """32 MiB of zeros gzip to ~32 KiB: small enough for batch_bytes_max, and it must stop
    inflating at decompressed_batch_bytes_max instead of allocating it all."""
    inflated_bytes = 32 * MIB
    generous = RecordLimits(record_bytes_max=64 * MIB)
    bomb = records.build_batch([NewRecord(None, bytes(inflated_bytes))], compression=Compression.GZIP, limits=generous)
    assert len(bomb) < DEFAULT_RECORD_LIMITS.batch_bytes_max
    records.check_batch(bomb)  # a well-formed batch: only its inflated size is wrong
    for decoder in (_decode_batches, _iter_records, _iter_records_unverified):
        with pytest.raises(LimitExceededError):
            decoder(bomb, DEFAULT_RECORD_LIMITS)
        with pytest.raises(LimitExceededError):
            decoder(bomb, SMALL_LIMITS)
    # The same bomb with a records section that is garbage once inflated.
    garbage = with_section(bomb, b"\xff" * (4 * MIB), Compression.GZIP)
    with pytest.raises(LimitExceededError):
        records.decode_batches(garbage, SMALL_LIMITS)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "trailing-bytes", "second-member", "not-gzip", "raw-deflate"],
)
def test_broken_gzip_streams_are_corrupt(damage):
    batch = records.build_batch(records.make_records([b"x" * 100]), compression=Compression.GZIP)
    section = plain_section(batch)
    stream = records.gzip_compress(section)
    body = {
        "truncated": stream[:-5],
        "trailing-bytes": stream + b"\x00",
        "second-member": stream + stream,
        "not-gzip": section,
        "raw-deflate": zlib.compress(section)[2:-4],
    }[damage]
    broken = reseal(batch[: records.BATCH_HEADER_BYTES] + body)
    records.check_batch(broken)
    with pytest.raises(CorruptBatchError):
        records.decode_batches(broken)


# ---------------------------------------------------------------------------
# Torn input: fed one byte at a time (F2), and trailing garbage


@QUICK
@given(batch=valid_batches())
def test_every_strict_prefix_of_a_batch_is_refused(batch):
    for end in range(len(batch)):
        prefix = batch[:end]
        for decoder in STRICT_DECODERS:
            with pytest.raises(InvalidRecordError):
                decoder(prefix, SMALL_LIMITS)
    decoded = records.decode_batches(batch, SMALL_LIMITS)
    assert len(decoded) == records.parse_header(batch).records_count


@QUICK
@given(batches=st.lists(valid_batches(), min_size=2, max_size=3))
def test_batches_fed_one_byte_at_a_time(batches):
    """A reader that receives the bytes one at a time can decode exactly at batch
    boundaries; everywhere else it gets an InvalidRecordError, never a partial result."""
    stream = b"".join(batches)
    boundaries = {}
    position = 0
    for count, batch in enumerate(batches, start=1):
        position += len(batch)
        boundaries[position] = count
    received = bytearray()
    for byte in stream:
        received.append(byte)
        if len(received) in boundaries:
            count = boundaries[len(received)]
            split = records.split_batches(received, SMALL_LIMITS)
            starts = [sum(map(len, batches[:index])) for index in range(count)]
            assert [position for position, _ in split] == starts
            expected = [record for batch in batches[:count] for record in records.decode_batches(batch, SMALL_LIMITS)]
            assert records.decode_batches(received, SMALL_LIMITS) == expected
        else:
            for decoder in (_split_batches, _decode_batches):
                with pytest.raises(InvalidRecordError):
                    decoder(received, SMALL_LIMITS)


def test_short_headers_and_length_prefixes_are_corrupt():
    batch = records.build_batch(records.make_records([b"v"]))
    for end in range(records.BATCH_HEADER_BYTES):
        with pytest.raises(CorruptBatchError):
            records.parse_header(batch[:end])
        if end < records.LOG_OVERHEAD_BYTES:
            with pytest.raises(CorruptBatchError):
                records.read_length_prefix(batch[:end])
        else:
            assert records.read_length_prefix(batch[:end]) == (0, len(batch))
    with pytest.raises(CorruptBatchError):
        records.read_length_prefix(batch, len(batch) - 3)
    with pytest.raises(CorruptBatchError):
        records.parse_header(batch, len(batch) - 60)


@THOROUGH
@given(
    batches=st.lists(valid_batches(), min_size=1, max_size=2),
    garbage=st.binary(min_size=1, max_size=200),
)
def test_trailing_garbage_is_refused(batches, garbage):
    buffer = b"".join(batches) + garbage
    for decoder in (_split_batches, _decode_batches, _iter_batches):
        with pytest.raises(InvalidRecordError):
            decoder(buffer, SMALL_LIMITS)
    with pytest.raises(InvalidRecordError):
        records.check_batch(batches[0] + garbage, SMALL_LIMITS)
    with pytest.raises(InvalidRecordError):
        records.iter_records(batches[0] + garbage, SMALL_LIMITS)


@pytest.mark.parametrize(
    "garbage",
    [b"\x00", bytes(12), bytes(61), b"\xff" * 61, "truncated-copy", "corrupt-copy"],
    ids=["zero", "zero-prefix", "zero-header", "ones-header", "truncated-copy", "corrupt-copy"],
)
def test_trailing_garbage_examples(garbage):
    batch = records.build_batch(records.make_records([b"a", b"b"]))
    if garbage == "truncated-copy":
        garbage = batch[:-1]
    elif garbage == "corrupt-copy":
        garbage = batch[:-1] + bytes([batch[-1] ^ 1])
    for decoder in (_split_batches, _decode_batches):
        with pytest.raises(InvalidRecordError):
            decoder(batch + garbage, SMALL_LIMITS)


def test_empty_buffer_is_refused():
    for decoder in STRICT_DECODERS:
        with pytest.raises(CorruptBatchError):
            decoder(b"", SMALL_LIMITS)


def test_error_position_names_the_bad_batch():
    first = records.build_batch(records.make_records([b"a"]))
    second = bytearray(records.build_batch(records.make_records([b"b"])))
    second[-1] ^= 0x01
    with pytest.raises(CorruptBatchError) as caught:
        records.split_batches(first + bytes(second))
    assert caught.value.position == len(first)


# ---------------------------------------------------------------------------
# Garbage and mutations: only nodi's own errors


@THOROUGH
@given(buffer=st.binary(max_size=300), buffer_type=buffer_types)
def test_random_bytes_raise_only_nodi_errors(buffer, buffer_type):
    decode_every_way(buffer_type(buffer))


@THOROUGH
@given(
    prefix=st.builds(
        struct.pack,
        st.just(">qiibIhiqqqhii"),
        st.integers(INT64_MIN, INT64_MAX),
        st.integers(-(1 << 31), INT32_MAX),
        st.integers(-(1 << 31), INT32_MAX),
        st.sampled_from([2, 2, 2, 0, 1, -1]),
        st.integers(0, (1 << 32) - 1),
        st.integers(-(1 << 15), INT16_MAX),
        st.integers(-(1 << 31), INT32_MAX),
        st.integers(INT64_MIN, INT64_MAX),
        st.integers(INT64_MIN, INT64_MAX),
        st.integers(INT64_MIN, INT64_MAX),
        st.integers(-(1 << 15), INT16_MAX),
        st.integers(-(1 << 31), INT32_MAX),
        st.integers(-(1 << 31), INT32_MAX),
    ),
    body=st.binary(max_size=200),
    resealed=st.booleans(),
)
def test_random_headers_raise_only_nodi_errors(prefix, body, resealed):
    buffer = prefix + body
    decode_every_way(reseal(buffer) if resealed else buffer)


def record_like_tokens():
    """Bytes that look like a records section: plausible varints mixed with raw bytes."""
    token = st.one_of(
        st.integers(-3, 80).map(records._encode_varint),
        st.integers(INT64_MIN, INT64_MAX).map(records._encode_varint),
        st.binary(min_size=1, max_size=6),
        st.text(max_size=3).map(str.encode),
    )
    return st.lists(token, max_size=40).map(b"".join)


@THOROUGH
@given(
    section=st.binary(max_size=200) | record_like_tokens(),
    records_count=st.integers(-2, 12),
    codec=st.sampled_from(SUPPORTED_CODECS),
    log_append_time=st.booleans(),
)
def test_random_records_sections_raise_only_nodi_errors(section, records_count, codec, log_append_time):
    """A valid header and CRC around random records: the record decoder itself must
    raise only InvalidRecordError."""
    template = records.build_batch(records.make_records([b"v"]))
    batch = bytearray(with_section(template, section, codec, records_count))
    if log_append_time:
        struct.pack_into(">h", batch, 21, records.ATTRIBUTE_TIMESTAMP_TYPE | codec)
    batch = reseal(batch)
    if records_count >= 0:
        records.check_batch(batch, SMALL_LIMITS)  # only the records are random
    decode_every_way(batch)


@st.composite
def mutated(draw, data: bytes, start: int = 0):
    """`data` with 1-4 random edits (bit flip, byte set, insert, delete, truncate) at or
    after `start`."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if len(out) <= start:
            kind = "insert"
        if kind == "insert":
            position = draw(st.integers(start, len(out)))
            out[position:position] = draw(st.binary(min_size=1, max_size=8))
            continue
        position = draw(st.integers(start, len(out) - 1))
        if kind == "flip":
            out[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            out[position] = draw(st.integers(0, 255))
        elif kind == "delete":
            del out[position : position + draw(st.integers(1, 8))]
        else:
            del out[position:]
    return bytes(out)


@THOROUGH
@given(data=st.data(), batch=valid_batches())
def test_mutated_batches_raise_only_nodi_errors(data, batch):
    decode_every_way(data.draw(mutated(batch)))


@THOROUGH
@given(data=st.data(), batch=valid_batches(), records_only=st.booleans())
def test_mutated_batches_with_crc_recomputed_raise_only_nodi_errors(data, batch, records_only):
    """Damage behind a fresh CRC (from attributes on, or in the records section only)."""
    start = records.BATCH_HEADER_BYTES if records_only else records.CRC_START
    decode_every_way(reseal(data.draw(mutated(batch, start))))


@THOROUGH
@given(data=st.data(), batch=valid_batches(), codec=st.sampled_from(SUPPORTED_CODECS))
def test_mutated_plain_records_sections_raise_only_nodi_errors(data, batch, codec):
    """Damage to the uncompressed records, then (re)compressed and resealed, so the gzip
    path reaches the record decoder too."""
    section = data.draw(mutated(plain_section(batch)))
    decode_every_way(with_section(batch, section, codec))


def test_bad_utf8_header_key_is_corrupt():
    batch = records.build_batch([NewRecord(None, b"v", [("ab", b"x")], 0)], base_timestamp=0)
    section = plain_section(batch)
    damaged = section.replace(b"ab", b"\xc3\x28")  # an invalid UTF-8 sequence
    assert damaged != section
    for codec in SUPPORTED_CODECS:
        with pytest.raises(CorruptBatchError):
            records.decode_batches(with_section(batch, damaged, codec))


@pytest.mark.parametrize("codec", SUPPORTED_CODECS)
def test_every_single_bit_flip_is_detected(codec):
    """Bit rot (F6): a flipped bit anywhere the CRC or the length checks cover is caught.
    Only base_offset and the leader epoch lie outside the CRC, by design."""
    batch = records.build_batch(
        [NewRecord(b"key", b"value", [("h", b"v")], 1_000), NewRecord(None, None, (), 1_300)],
        producer_id=7,
        producer_epoch=1,
        base_sequence=3,
        compression=codec,
    )
    outside_crc = set(range(0, 8)) | set(range(12, 16))
    for position in range(len(batch)):
        for bit in range(8):
            flipped = bytearray(batch)
            flipped[position] ^= 1 << bit
            if position in outside_crc:
                assert len(records.decode_batches(flipped)) == 2
            else:
                for decoder in STRICT_DECODERS:
                    with pytest.raises(InvalidRecordError):
                        decoder(flipped, DEFAULT_RECORD_LIMITS)


# ---------------------------------------------------------------------------
# Compression codecs nodi does not decode


@pytest.mark.parametrize("codec", UNSUPPORTED_CODEC_NUMBERS)
@pytest.mark.parametrize("source_codec", SUPPORTED_CODECS)
def test_unsupported_codec_bits_are_refused(codec, source_codec):
    batch = records.build_batch(records.make_records([b"a", b"b"]), compression=source_codec)
    relabelled = bytearray(batch)
    attributes = struct.unpack_from(">h", relabelled, 21)[0]
    struct.pack_into(">h", relabelled, 21, (attributes & ~records.ATTRIBUTE_CODEC_MASK) | codec)
    relabelled = reseal(relabelled)
    # The header and CRC are fine: the log can store and serve such a batch as bytes...
    header = records.check_batch(relabelled)
    assert header.compression == codec
    assert records.split_batches(relabelled) == [(0, header)]
    # ...but nodi never decodes it into garbage.
    with pytest.raises(UnsupportedCompressionError):
        records.records_section(relabelled, header)
    for decoder in (_decode_batches, _iter_records, _iter_records_unverified):
        with pytest.raises(UnsupportedCompressionError):
            decoder(relabelled, DEFAULT_RECORD_LIMITS)


@pytest.mark.parametrize(
    "compression",
    [5, 7, -1, "gzip"],
)
def test_build_batch_refuses_unsupported_codecs(compression):
    with pytest.raises(UnsupportedCompressionError):
        records.build_batch(records.make_records([b"v"]), compression=compression)


# ---------------------------------------------------------------------------
# Byte compatibility with Apache Kafka's RecordBatch v2, by hand

# Three records, base offset 5, producer 7 / epoch 1 / sequence 3, base timestamp 1000.
KNOWN_RECORDS = [
    NewRecord(b"key", b"value", (("h", b"v"),), 1_000),
    NewRecord(None, None, (), 1_300),
    NewRecord(b"", b"", (("k", None),), 999),
]
KNOWN_SECTION = bytes.fromhex(
    # record 0: length 18 (zig-zag 0x24), attributes 0, timestamp delta 0, offset delta 0,
    # key length 3 (0x06) "key", value length 5 (0x0a) "value", 1 header (0x02),
    # header key length 1 (0x02) "h", header value length 1 (0x02) "v"
    "24"
    "00"
    "00"
    "00"
    "06"
    "6b6579"
    "0a"
    "76616c7565"
    "02"
    "02"
    "68"
    "02"
    "76"
    # record 1: length 7 (0x0e), timestamp delta 300 (zig-zag 600 = 0xd8 0x04),
    # offset delta 1 (0x02), null key (-1 = 0x01), null value, no headers
    "0e"
    "00"
    "d804"
    "02"
    "01"
    "01"
    "00"
    # record 2: length 9 (0x12), timestamp delta -1 (0x01), offset delta 2 (0x04), empty
    # key (0x00), empty value, 1 header: key "k", null value (0x01)
    "12"
    "00"
    "01"
    "04"
    "00"
    "00"
    "02"
    "02"
    "6b"
    "01"
)
KNOWN_BATCH = (
    bytes.fromhex(
        "0000000000000005"  # 0  base_offset 5
        "00000056"  # 8  batch_length 86 = 49 + 37 bytes of records
        "ffffffff"  # 12 partition_leader_epoch -1
        "02"  # 16 magic
        "4da93e75"  # 17 crc: CRC-32C of bytes 21..end
        "0000"  # 21 attributes
        "00000002"  # 23 last_offset_delta
        "00000000000003e8"  # 27 base_timestamp 1000
        "0000000000000514"  # 35 max_timestamp 1300
        "0000000000000007"  # 43 producer_id
        "0001"  # 51 producer_epoch
        "00000003"  # 53 base_sequence
        "00000003"  # 57 records_count
    )
    + KNOWN_SECTION
)


def test_known_batch_is_byte_exact():
    batch = records.build_batch(
        KNOWN_RECORDS,
        base_offset=5,
        producer_id=7,
        producer_epoch=1,
        base_sequence=3,
        base_timestamp=1_000,
    )
    assert len(KNOWN_SECTION) == 37
    assert len(KNOWN_BATCH) == 98 == records.LOG_OVERHEAD_BYTES + 86
    assert batch == KNOWN_BATCH


def test_known_batch_decodes():
    header = records.check_batch(KNOWN_BATCH)
    assert header == records.BatchHeader(
        base_offset=5,
        batch_length=86,
        partition_leader_epoch=-1,
        magic=2,
        crc=0x4DA93E75,
        attributes=0,
        last_offset_delta=2,
        base_timestamp=1_000,
        max_timestamp=1_300,
        producer_id=7,
        producer_epoch=1,
        base_sequence=3,
        records_count=3,
    )
    assert records.decode_batches(KNOWN_BATCH) == [
        records.Record(5, 1_000, b"key", b"value", (("h", b"v"),)),
        records.Record(6, 1_300, None, None, ()),
        records.Record(7, 999, b"", b"", (("k", None),)),
    ]


def test_header_field_offsets():
    """Each field at its documented byte offset (Kafka's DefaultRecordBatch)."""
    fields = {
        0: (">q", 5),
        8: (">i", 86),
        12: (">i", -1),
        16: (">b", 2),
        17: (">I", 0x4DA93E75),
        21: (">h", 0),
        23: (">i", 2),
        27: (">q", 1_000),
        35: (">q", 1_300),
        43: (">q", 7),
        51: (">h", 1),
        53: (">i", 3),
        57: (">i", 3),
    }
    for offset, (layout, value) in fields.items():
        assert struct.unpack_from(layout, KNOWN_BATCH, offset)[0] == value, offset
    assert records.BATCH_HEADER_BYTES == 61
    assert records.CRC_START == 21
    assert records.LOG_OVERHEAD_BYTES == 12
    assert records.BATCH_LENGTH_MIN == 49


def test_crc_is_castagnoli_over_attributes_to_end():
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert zlib.crc32(b"123456789") != 0xE3069283  # not plain CRC-32
    assert records.compute_crc(KNOWN_BATCH) == crc32c.crc32c(KNOWN_BATCH[21:]) == 0x4DA93E75


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, "00"),
        (-1, "01"),
        (1, "02"),
        (-2, "03"),
        (2, "04"),
        (63, "7e"),
        (-64, "7f"),
        (64, "8001"),
        (-65, "8101"),
        (300, "d804"),
        (-1000, "cf0f"),
        (INT32_MAX, "feffffff0f"),
        (-(1 << 31), "ffffffff0f"),
        (INT64_MAX, "feffffffffffffffff01"),
        (INT64_MIN, "ffffffffffffffffff01"),
    ],
)
def test_zigzag_varints(value, encoded):
    assert records._encode_varint(value) == bytes.fromhex(encoded)
    assert records._decode_varint(bytes.fromhex(encoded) + b"\xaa", 0) == (value, len(encoded) // 2)


@THOROUGH
@given(value=st.integers(INT64_MIN, INT64_MAX))
def test_varint_round_trip(value):
    encoded = records._encode_varint(value)
    assert 1 <= len(encoded) <= 10
    assert records._decode_varint(encoded, 0) == (value, len(encoded))
    for end in range(len(encoded)):
        with pytest.raises(CorruptBatchError):
            records._decode_varint(encoded[:end], 0)


@pytest.mark.parametrize("value", [INT64_MAX + 1, INT64_MIN - 1, 1 << 70, -(1 << 70)])
def test_varints_outside_int64_are_refused(value):
    with pytest.raises(InvalidRecordError):
        records._encode_varint(value)


def test_overlong_varints_are_corrupt():
    with pytest.raises(CorruptBatchError):
        records._decode_varint(b"\x80" * 10 + b"\x00", 0)
    with pytest.raises(CorruptBatchError):
        records._decode_varint(b"\x80" * 5 + b"\x00", 0, 5)


# ---------------------------------------------------------------------------
# Cross-check against kafka-python, an independent implementation of the format

kafka_records = st.lists(
    st.builds(
        NewRecord,
        key=optional_bytes,
        value=optional_bytes,
        headers=headers_lists,
        timestamp_ms=optional_timestamps,
    ),
    min_size=1,
    max_size=8,
)


def build_with_kafka_python(new, codec, producer_id=-1, producer_epoch=-1, base_sequence=-1):
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=int(codec),
        is_transactional=False,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        base_sequence=base_sequence,
        batch_size=1 << 30,
    )
    stamps = []
    for offset, record in enumerate(new):
        metadata = builder.append(offset, record.timestamp_ms, record.key, record.value, list(record.headers))
        stamps.append(metadata.timestamp)
    return bytes(builder.build()), stamps


def read_with_kafka_python(batch):
    reader = DefaultRecordBatch(batch)
    assert reader.validate_crc()
    return reader, [
        (record.offset, record.timestamp, record.key, record.value, tuple(record.headers)) for record in reader
    ]


@needs_kafka_python
@THOROUGH
@given(
    new=kafka_records,
    codec=st.sampled_from(SUPPORTED_CODECS),
    producer=st.sampled_from([(-1, -1, -1), (1234, 5, 678), (INT64_MAX, INT16_MAX, INT32_MAX)]),
)
def test_kafka_python_batches_decode(new, codec, producer):
    batch, stamps = build_with_kafka_python(new, codec, *producer)
    header = records.check_batch(batch)
    assert header.compression == DefaultRecordBatch(batch).compression_type
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == producer
    assert header.base_timestamp == stamps[0]  # Kafka's base is the first record's
    assert header.max_timestamp == max(stamps)
    decoded = records.decode_batches(batch)
    assert [tuple(record) for record in decoded] == [
        (offset, stamp, record.key, record.value, tuple(record.headers))
        for offset, (stamp, record) in enumerate(zip(stamps, new))
    ]


@needs_kafka_python
@THOROUGH
@given(arguments=batch_arguments(kafka_records))
def test_nodi_batches_decode_with_kafka_python(arguments):
    arguments["attributes"] = 0  # kafka-python would read a control batch's key as a marker
    batch = records.build_batch(**arguments)
    reader, kafka_decoded = read_with_kafka_python(batch)
    header = records.check_batch(batch, SMALL_LIMITS)
    assert reader.base_offset == header.base_offset
    assert reader.compression_type == arguments["compression"]
    assert reader.last_offset_delta == len(arguments["records"]) - 1
    assert reader.first_timestamp == header.base_timestamp
    assert reader.max_timestamp == header.max_timestamp
    assert (reader.producer_id, reader.producer_epoch, reader.base_sequence) == (
        arguments["producer_id"],
        arguments["producer_epoch"],
        arguments["base_sequence"],
    )
    decoded = records.decode_batches(batch, SMALL_LIMITS)
    assert kafka_decoded == [tuple(record) for record in decoded]


@needs_kafka_python
@THOROUGH
@given(
    new=st.lists(
        st.builds(
            NewRecord,
            key=optional_bytes,
            value=optional_bytes,
            headers=headers_lists,
            timestamp_ms=timestamps,
        ),
        min_size=1,
        max_size=8,
    ),
    producer=st.sampled_from([(-1, -1, -1), (1234, 5, 678)]),
)
def test_uncompressed_bytes_equal_kafka_python(new, producer):
    """Same records, same bytes: kafka-python writes leader epoch 0 where nodi writes -1
    (the field is the broker's and outside the CRC); every other byte, CRC included, is equal."""
    theirs, _ = build_with_kafka_python(new, Compression.NONE, *producer)
    producer_id, producer_epoch, base_sequence = producer
    ours = records.build_batch(
        new,
        base_timestamp=new[0].timestamp_ms,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
        base_sequence=base_sequence,
    )
    assert theirs[12:16] == b"\x00\x00\x00\x00" and ours[12:16] == b"\xff\xff\xff\xff"
    assert ours[:12] + ours[16:] == theirs[:12] + theirs[16:]


@needs_kafka_python
def test_known_batch_with_kafka_python():
    _, decoded = read_with_kafka_python(KNOWN_BATCH)
    assert decoded == [
        (5, 1_000, b"key", b"value", (("h", b"v"),)),
        (6, 1_300, None, None, ()),
        (7, 999, b"", b"", (("k", None),)),
    ]


@needs_kafka_python
def test_log_append_time_agrees_with_kafka_python():
    batch = bytearray(records.build_batch(TWO_TIMED_RECORDS))
    struct.pack_into(">h", batch, 21, records.ATTRIBUTE_TIMESTAMP_TYPE)
    struct.pack_into(">q", batch, 35, 1_700_000_000_000)
    batch = reseal(batch)
    _, kafka_decoded = read_with_kafka_python(batch)
    assert kafka_decoded == [tuple(record) for record in records.decode_batches(batch)]


@needs_kafka_python
def test_control_batch_reads_as_a_kafka_marker():
    commit_marker = NewRecord(struct.pack(">hh", 0, 1), struct.pack(">hi", 0, 0), (), 5)
    batch = records.build_batch(
        [commit_marker],
        producer_id=9,
        producer_epoch=0,
        base_sequence=-1,
        attributes=records.ATTRIBUTE_CONTROL | records.ATTRIBUTE_TRANSACTIONAL,
    )
    reader = DefaultRecordBatch(batch)
    assert reader.is_control_batch and reader.is_transactional
    (marker,) = list(reader)
    assert (marker.version, marker.type, marker.commit) == (0, 1, True)


def test_nodi_error_is_the_root():
    assert issubclass(InvalidRecordError, NodiError)
    for error in (CorruptBatchError, LimitExceededError, UnsupportedCompressionError):
        assert issubclass(error, InvalidRecordError)


def test_records_without_headers_knows_only_uniform_headerless_batches():
    """A queue receive searches a batch's bytes for header names unless this says no
    record has a header: true only when every record is uniform and the first has none."""
    plain = records.build_batch([records.NewRecord(None, b"v%03d" % i) for i in range(100)])
    header = records.parse_header(plain)
    assert records.records_without_headers(plain, header)
    with_headers = records.build_batch([records.NewRecord(None, b"v", [("nodi.ttl-ms", b"1")]) for _ in range(5)])
    assert not records.records_without_headers(with_headers, records.parse_header(with_headers))
    # The first record has none, a later one has: not uniform, so nothing is known.
    mixed = records.build_batch([records.NewRecord(None, b"v"), records.NewRecord(None, b"v", [("nodi.ttl-ms", b"1")])])
    assert not records.records_without_headers(mixed, records.parse_header(mixed))
    compressed = records.build_batch(
        [records.NewRecord(None, b"v%03d" % i) for i in range(100)], compression=records.Compression.GZIP
    )
    assert not records.records_without_headers(compressed, records.parse_header(compressed))
    assert not records.records_without_headers(plain[:-3], header)  # cut short: never an error


# -- the header walk (records.walk_header: a read's walk over stored batches) ------------


@given(
    base_offset=st.integers(0, 2**40),
    count=st.integers(1, 20),
    value_bytes=st.integers(0, 300),
    codec=st.sampled_from([Compression.NONE, Compression.GZIP]),
)
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
def test_walk_header_agrees_with_parse_header(base_offset, count, value_bytes, codec) -> None:
    batch = bytearray(records.build_batch([NewRecord(None, b"v" * value_bytes)] * count, compression=codec))
    records.set_base_offset(batch, base_offset)
    framed = b"\x00" * 5 + bytes(batch) + b"trailing"
    header = records.parse_header(framed, 5)
    walked = records.walk_header(framed, 5, DEFAULT_RECORD_LIMITS)
    assert walked == (header.base_offset, header.size, header.last_offset)
    # Only its first HEADER_WALK_BYTES are read.
    assert records.walk_header(bytes(batch[: records.HEADER_WALK_BYTES]), 0, DEFAULT_RECORD_LIMITS) == walked


@pytest.mark.parametrize(
    ("field_format", "field_offset", "value", "words"),
    [
        (">i", 8, records.BATCH_LENGTH_MIN - 1, "batch_length"),
        (">i", 8, 2 * MIB, "batch_bytes_max"),
        (">b", 16, 1, "magic"),
        (">i", 23, -1, "last_offset_delta"),
    ],
)
def test_walk_header_refuses_what_check_header_refuses(field_format, field_offset, value, words) -> None:
    batch = bytearray(records.build_batch([NewRecord(None, b"x")]))
    struct.pack_into(field_format, batch, field_offset, value)
    limits = RecordLimits(batch_bytes_max=MIB)
    with pytest.raises(CorruptBatchError, match=words):
        records.walk_header(batch, 0, limits)
    with pytest.raises((CorruptBatchError, LimitExceededError)):  # the same header, checked whole
        records.check_header(records.parse_header(batch), limits)
