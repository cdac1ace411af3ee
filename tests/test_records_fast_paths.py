"""The encoder's and decoder's fast paths (storage/records.py: precomputed varints for
records without headers, inline one- and two-byte varints when decoding) against a
plain reference written from the record format (../shared/KAFKA-FACTS.md), byte for
byte, around the varint size boundaries where the fast paths switch."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nodi.storage.records import build_batch, build_batch_buffer, check_batch, decode_records, encode_records

BASE_TIMESTAMP = 1_700_000_000_000
# Sizes on both sides of the one/two/three-byte zig-zag varint boundaries (64, 8192).
SIZES = st.sampled_from([0, 1, 63, 64, 65, 1000, 1024, 8100, 8191, 8192, 8300])


def reference_varint(value: int) -> bytes:
    zigzag = (value << 1) ^ (value >> 63)
    out = bytearray()
    while zigzag >= 0x80:
        out.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    out.append(zigzag)
    return bytes(out)


def reference_records(records, offset_deltas) -> bytes:
    """The records section as the format describes it, one field after another."""
    out = bytearray()
    for offset_delta, (key, value, timestamp_ms) in zip(offset_deltas, records):
        body = bytearray(b"\x00")  # attributes
        body += reference_varint(timestamp_ms - BASE_TIMESTAMP)
        body += reference_varint(offset_delta)
        for field in (key, value):
            if field is None:
                body += reference_varint(-1)
            else:
                body += reference_varint(len(field)) + field
        body += reference_varint(0)  # no headers
        out += reference_varint(len(body)) + body
    return bytes(out)


def byte_strings():
    return st.one_of(st.none(), SIZES.map(lambda size: bytes(range(256)) * (size // 256) + bytes(size % 256)))


records_strategy = st.lists(
    st.tuples(byte_strings(), byte_strings(), st.integers(-70_000, 70_000).map(lambda delta: BASE_TIMESTAMP + delta)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(records=records_strategy, spread=st.integers(1, 300), data=st.data())
def test_encoder_matches_the_reference_byte_for_byte(records, spread, data):
    deltas = sorted(
        data.draw(st.sets(st.integers(0, len(records) * spread), min_size=len(records), max_size=len(records)))
    )
    tuples = [(key, value, (), timestamp) for key, value, timestamp in records]
    dense, _ = encode_records(tuples, BASE_TIMESTAMP, BASE_TIMESTAMP)
    assert dense == reference_records(records, range(len(records)))
    sparse, _ = encode_records(tuples, BASE_TIMESTAMP, BASE_TIMESTAMP, offset_deltas=deltas)
    assert sparse == reference_records(records, deltas)


@settings(max_examples=100, deadline=None)
@given(records=records_strategy)
def test_batch_buffer_equals_the_batch_and_decodes_back(records):
    tuples = [(key, value, (), timestamp) for key, value, timestamp in records]
    batch = build_batch(tuples, base_timestamp=BASE_TIMESTAMP)
    buffer = build_batch_buffer(tuples, base_timestamp=BASE_TIMESTAMP)
    assert isinstance(buffer, bytearray)
    assert bytes(buffer) == batch
    decoded = decode_records(batch, check_batch(batch))
    assert [(record.key, record.value, record.timestamp_ms) for record in decoded] == records
    assert [record.offset for record in decoded] == list(range(len(records)))
