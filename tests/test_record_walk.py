"""The record walk a produce must pass (storage.records.check_records, Kafka's
LogValidator checks): every kind of lying batch refused naming the record and the
field, garbage and truncated input refused with the codec's own error only, the gzip
bomb refused without inflating past its limit, and the column-wise fast path never
accepting what the record-by-record walk refuses."""

from __future__ import annotations

import struct
import tracemalloc

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodi.storage import records
from nodi.storage.errors import (
    InvalidRecordError,
    RecordFramingError,
    RecordLimitError,
    UnsupportedCompressionError,
)
from nodi.storage.limits import DEFAULT_RECORD_LIMITS, MIB, RecordLimits
from nodi.storage.records import Compression, NewRecord

from lying_batches import BASE_TIMESTAMP_MS, lying_batches, seal

QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIES = lying_batches()


def reseal(batch: bytes | bytearray) -> bytes:
    """batch_length and the CRC made right again, so only the records can be wrong."""
    out = bytearray(batch)
    struct.pack_into(">i", out, 8, len(out) - records.LOG_OVERHEAD_BYTES)
    struct.pack_into(">I", out, records.CRC_OFFSET, crc32c.crc32c(bytes(out[records.CRC_START :])))
    return bytes(out)


def walk(batch: bytes, limits: RecordLimits = DEFAULT_RECORD_LIMITS) -> None:
    records.check_records(batch, records.check_batch(batch, limits), limits)


@pytest.mark.parametrize("name", sorted(LIES))
def test_each_lie_is_refused_naming_record_and_field(name):
    batch, index, field = LIES[name]
    header = records.check_batch(batch)  # the header and CRC check out: only the records lie
    with pytest.raises(RecordFramingError) as caught:
        records.check_records(batch, header)
    assert (caught.value.record_index, caught.value.field) == (index, field), caught.value
    if index is not None:
        assert f"record {index}: {field}:" in str(caught.value)
    # A produce of it (after a good batch) names the batch by its position.
    good = records.build_batch(records.make_records([b"good"]))
    with pytest.raises(RecordFramingError) as caught:
        records.check_batches(good + batch)
    assert caught.value.position == len(good) and f"batch at byte {len(good)}:" in str(caught.value)
    # Readers meet the same verdict from the same parser (batch attribute bits aside:
    # a reader can decode those records, only a producer may not set the bits).
    if name == "unknown-batch-attribute-bits":
        assert [r.value for r in records.decode_records(batch, header)] == [b"only"]
    else:
        with pytest.raises(RecordFramingError):
            records.decode_records(batch, header)


def test_gzip_bomb_stops_inflating_at_the_limit():
    batch, _, _ = LIES["gzip-bomb-40-mib"]
    limit = DEFAULT_RECORD_LIMITS.decompressed_batch_bytes_max
    assert len(batch) < DEFAULT_RECORD_LIMITS.batch_bytes_max
    tracemalloc.start()
    try:
        with pytest.raises(RecordLimitError, match="decompressed_batch_bytes_max"):
            walk(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit + 2 * MIB, f"peak {peak} bytes while refusing a 40 MiB bomb"


def test_header_count_is_bounded_before_allocating():
    """10**9 headers in a record with room for none: refused by the bytes left, and a
    count that fits the bytes but not headers_per_record_max by the limit."""
    tracemalloc.start()
    try:
        with pytest.raises(RecordFramingError, match="cannot fit"):
            walk(LIES["header-count-1e9"][0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB
    limits = RecordLimits(headers_per_record_max=2)
    many = records.build_batch([NewRecord(None, b"v", [("a", b""), ("b", b""), ("c", b"")])])
    with pytest.raises(RecordLimitError, match="headers_per_record_max 2"):
        walk(many, limits)


@st.composite
def produced_batches(draw):
    """What nodi's producers send: keyless or same-length keys, same-length values (or
    none), the same header keys with same-length values (a TTL, an idempotency key, a
    correlation id), one-byte timestamp deltas, up to 200 records (past the two-byte
    offset deltas at 64), plain or gzip."""
    count = draw(st.integers(1, 200))
    key_length = draw(st.none() | st.integers(0, 20))
    value_length = draw(st.none() | st.integers(0, 300))
    header_shapes = draw(st.lists(st.tuples(st.text(max_size=8), st.none() | st.integers(0, 24)), max_size=3))
    filler = draw(st.binary(min_size=1, max_size=8))
    deltas = draw(st.lists(st.integers(0, 63), min_size=count, max_size=count))

    def make(size: int | None, index: int) -> bytes | None:
        return None if size is None else (filler * (size // len(filler) + 2))[index % len(filler) :][:size]

    new = [
        NewRecord(
            make(key_length, index),
            make(value_length, index),
            [(name, make(size, index)) for name, size in header_shapes],
            BASE_TIMESTAMP_MS + delta,
        )
        for index, delta in enumerate(deltas)
    ]
    compression = draw(st.sampled_from(list(Compression)))
    return records.build_batch(new, base_timestamp=BASE_TIMESTAMP_MS, compression=compression)


def uniform_fast_path(batch: bytes) -> bool:
    header = records.check_batch(batch)
    data = records.records_section(batch, header)
    return records._walk_uniform(data, 0, header, DEFAULT_RECORD_LIMITS) is not None


@QUICK
@given(batch=produced_batches())
def test_produced_batches_take_the_fast_path(batch):
    assert uniform_fast_path(batch)
    walk(batch)


@QUICK
@given(batch=produced_batches(), data=st.data())
def test_fast_path_never_accepts_what_the_walk_refuses(batch, data):
    """One byte of the records section changed (length, varints, offset deltas...),
    the batch resealed: where the column-wise fast path says yes, the record-by-record
    walk must agree."""
    header = records.check_batch(batch)
    section = bytearray(records.records_section(batch, header))
    position = data.draw(st.integers(0, len(section) - 1))
    section[position] = data.draw(st.integers(0, 255).filter(lambda byte: byte != section[position]))
    changed = seal(bytes(section), header.records_count, attributes=header.attributes & ~records.ATTRIBUTE_CODEC_MASK)
    changed_header = records.check_batch(changed)
    if records._walk_uniform(changed, records.BATCH_HEADER_BYTES, changed_header, DEFAULT_RECORD_LIMITS) is not None:
        records._scan_records(changed, records.BATCH_HEADER_BYTES, changed_header, DEFAULT_RECORD_LIMITS, None)


any_records = st.lists(
    st.builds(
        NewRecord,
        key=st.none() | st.binary(max_size=20),
        value=st.none() | st.binary(max_size=40),
        headers=st.lists(st.tuples(st.text(max_size=6), st.none() | st.binary(max_size=8)), max_size=3),
        timestamp_ms=st.integers(BASE_TIMESTAMP_MS - 10**6, BASE_TIMESTAMP_MS + 10**6),
    ),
    min_size=1,
    max_size=8,
)


@QUICK
@given(new=any_records, compression=st.sampled_from(list(Compression)))
def test_every_encoded_batch_passes_the_walk(new, compression):
    batch = records.build_batch(new, compression=compression)
    walk(batch)
    decoded = records.decode_batches(batch)
    assert [(r.key, r.value, r.headers) for r in decoded] == [(n.key, n.value, tuple(n.headers)) for n in new]


@QUICK
@given(new=any_records, compression=st.sampled_from(list(Compression)))
def test_the_walk_says_whether_any_record_carries_a_header(new, compression):
    """check_records' answer, record by record (any_records is rarely uniform) and
    column-wise, is exactly whether a decoded record has a header: a produce path skips
    its search for a header only on False, so False must never hide one."""
    batch = records.build_batch(new, compression=compression)
    header = records.check_batch(batch)
    assert records.check_records(batch, header) == any(
        record.headers for record in records.decode_records(batch, header)
    )


@QUICK
@given(batch=produced_batches())
def test_the_fast_path_says_whether_its_records_carry_headers(batch):
    header = records.check_batch(batch)
    decoded = records.decode_records(batch, header)
    assert records.check_records(batch, header) == bool(decoded[0].headers)
    assert records._walk_uniform(records.records_section(batch, header), 0, header, DEFAULT_RECORD_LIMITS) == len(
        decoded[0].headers
    )


def test_walk_batches_says_whether_any_batch_carries_a_header():
    """Several batches, one of them compressed: False only when no record of any batch
    has a header; a header in a later record of a later batch, or inside a compressed
    batch, makes it True; the batches are check_batches' own."""
    plain = records.build_batch([NewRecord(None, b"v" * 100) for _ in range(10)])
    late = records.build_batch([NewRecord(None, b"a"), NewRecord(None, b"b"), NewRecord(None, b"c", [("k", b"x")])])
    packed = records.build_batch([NewRecord(None, b"z", [("k", b"x")])], compression=Compression.GZIP)
    packed_plain = records.build_batch([NewRecord(None, b"z")] * 3, compression=Compression.GZIP)
    assert records.walk_batches(plain + packed_plain + plain) == (
        records.check_batches(plain + packed_plain + plain),
        False,
    )
    assert records.walk_batches(plain + late).headers
    assert records.walk_batches(plain + packed).headers


@QUICK
@given(new=any_records, data=st.data())
def test_garbage_records_raise_only_the_codecs_error(new, data):
    """Bytes inserted, deleted or replaced in the records section (resealed, so the
    CRC holds): the walk and the decoder give the same verdict, and nothing but a
    RecordFramingError escapes either."""
    batch = bytearray(records.build_batch(new))
    start = data.draw(st.integers(records.BATCH_HEADER_BYTES, len(batch)))
    stop = data.draw(st.integers(start, min(len(batch), start + 8)))
    batch[start:stop] = data.draw(st.binary(max_size=8))
    batch = reseal(batch)
    header = records.check_batch(batch)
    verdicts = []
    for check in (records.check_records, records.decode_records):
        try:
            check(batch, header)
            verdicts.append(True)
        except RecordFramingError:
            verdicts.append(False)
    assert verdicts[0] == verdicts[1]


def test_every_truncation_is_refused():
    """The records section cut one byte at a time (resealed): each prefix is refused
    with a RecordFramingError, never an IndexError or a wrong decode."""
    new = [NewRecord(b"key", b"value" * 30, [("h", b"x"), ("nodi-y", None)]), NewRecord(None, b"z" * 200)]
    batch = records.build_batch(new)
    for cut in range(records.BATCH_HEADER_BYTES, len(batch)):
        shorter = reseal(batch[:cut])
        with pytest.raises(RecordFramingError):
            walk(shorter)
        with pytest.raises(RecordFramingError):
            records.decode_records(shorter, records.check_batch(shorter))


@pytest.mark.parametrize("codec", [5, 6, 7])
def test_a_codec_nodi_does_not_decode_is_the_codecs_error(codec):
    batch = seal(b"anything", 1, attributes=codec)
    with pytest.raises(UnsupportedCompressionError):
        walk(batch)


@pytest.mark.parametrize("codec", [1, 2, 3, 4])
def test_a_section_its_codec_cannot_decode_is_a_framing_error(codec):
    batch = seal(b"anything", 1, attributes=codec)
    with pytest.raises(RecordFramingError):
        walk(batch)


def test_walk_errors_are_invalid_record_errors():
    assert issubclass(RecordFramingError, InvalidRecordError)
    assert issubclass(RecordLimitError, RecordFramingError)
