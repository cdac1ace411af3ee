"""Batches whose header and CRC check out but whose records lie, for the tests of the
record walk (storage.records.check_records), of produce and of readers.

Each is built by hand, not by the codec's encoder (which refuses to write a lie): the
records section byte by byte, then a v2 header with records_count and
last_offset_delta that pass the log's header checks (dense, count >= 1), then the CRC.
So only a walk over the records can tell.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence

import crc32c

from nodi.storage import records
from nodi.storage.limits import MIB

BASE_TIMESTAMP_MS = 1_700_000_000_000


def varint(value: int) -> bytes:
    """A zig-zag varint of any value (lies included: the codec refuses those)."""
    zigzag = (value << 1) ^ (value >> 63)
    out = bytearray()
    while zigzag >= 0x80:
        out.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    out.append(zigzag)
    return bytes(out)


def record_body(
    offset_delta: int,
    *,
    key: bytes | None = None,
    value: bytes | None = b"value",
    headers: Sequence[tuple[bytes, bytes | None]] = (),
    attributes: int = 0,
    key_length: int | None = None,
    value_length: int | None = None,
    header_count: int | None = None,
) -> bytes:
    """A record without its length prefix; the *_length / header_count overrides lie."""
    out = bytearray([attributes])
    out += varint(0) + varint(offset_delta)
    out += varint(-1 if key is None else len(key) if key_length is None else key_length) + (key or b"")
    out += varint(-1 if value is None else len(value) if value_length is None else value_length) + (value or b"")
    out += varint(len(headers) if header_count is None else header_count)
    for name, header_value in headers:
        out += varint(len(name)) + name
        out += varint(-1 if header_value is None else len(header_value)) + (header_value or b"")
    return bytes(out)


def record(offset_delta: int, length: int | None = None, **fields) -> bytes:
    body = record_body(offset_delta, **fields)
    return varint(len(body) if length is None else length) + body


def good_section(count: int) -> bytes:
    return b"".join(record(delta, value=b"v%d" % delta) for delta in range(count))


def seal(
    section: bytes,
    records_count: int,
    *,
    gzip: bool = False,
    attributes: int = 0,
    last_offset_delta: int | None = None,
    body: bytes | None = None,
) -> bytes:
    """A v2 batch around `section` (gzipped when asked; `body` replaces the stored
    section outright) with a valid CRC."""
    if body is None:
        body = records.gzip_compress(section) if gzip else section
    attributes |= int(records.Compression.GZIP) if gzip else 0
    covered = struct.pack(
        ">hiqqqhii",
        attributes,
        records_count - 1 if last_offset_delta is None else last_offset_delta,
        BASE_TIMESTAMP_MS,
        BASE_TIMESTAMP_MS,
        -1,
        -1,
        -1,
        records_count,
    )
    batch = bytearray(struct.pack(">qiibI", 0, records.BATCH_HEADER_BYTES - 12 + len(body), -1, 2, 0))
    batch += covered + body
    struct.pack_into(">I", batch, records.CRC_OFFSET, crc32c.crc32c(bytes(batch[records.CRC_START :])))
    return bytes(batch)


def _gzip_bomb() -> bytes:
    """40 MiB of zeros, gzipped to about 40 KiB: one record claiming all of it."""
    inflated = 40 * MIB
    prefix = varint(inflated) + b"\x00" + varint(0) + varint(0) + varint(-1) + varint(inflated - 16)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(MIB)
    parts = [compressor.compress(prefix)]
    parts.extend(compressor.compress(chunk) for _ in range(40))
    parts.append(compressor.flush())
    return seal(b"", 1, gzip=True, body=b"".join(parts))


# name -> (the lying batch, the record index the refusal names or None, the field named)
@functools.cache
def lying_batches() -> dict[str, tuple[bytes, int | None, str]]:
    one = record(0, value=b"only")
    return {
        "count-says-3-holds-1": (seal(one, 3), 1, "records_count"),
        "count-says-1-holds-2": (seal(good_section(2), 1), None, "records_count"),
        "record-length-too-long": (seal(record(0, length=len(record_body(0)) + 4), 1), 0, "length"),
        "record-length-too-short": (
            seal(record(0, length=len(record_body(0)) - 2) + b"\x00\x00", 1),
            0,
            "value length",
        ),
        "record-length-negative": (seal(record(0, length=-7), 1), 0, "length"),
        "key-length-lies": (seal(record(0, key=b"abc", key_length=900), 1), 0, "key length"),
        "key-length-below-null": (seal(record(0, key=b"abc", key_length=-3), 1), 0, "key length"),
        "value-length-lies": (seal(record(0, value=b"abc", value_length=4000), 1), 0, "value length"),
        "value-length-short": (seal(record(0, value=b"abcdef", value_length=2), 1), 0, "header count"),
        "header-count-1e9": (seal(record(0, header_count=10**9), 1), 0, "header count"),
        "header-key-length-lies": (
            seal(record(0, headers=[(b"k", b"v")]).replace(b"\x02k", b"\x7ek"), 1),
            0,
            "header 0 key length",
        ),
        "header-key-not-utf8": (seal(record(0, headers=[(b"\xff\xfe", b"v")]), 1), 0, "header 0 key"),
        "offset-delta-repeats": (seal(record(0) + record(0) + record(1), 3), 1, "offset delta"),
        "offset-delta-past-last": (seal(record(0) + record(1) + record(3), 3), 2, "offset delta"),
        "offset-delta-negative": (seal(record(-1), 1), 0, "offset delta"),
        "record-attributes-set": (seal(record(0, attributes=0x40), 1), 0, "attributes"),
        "varint-never-ends": (seal(b"\xff" * 12, 1), 0, "length"),
        "garbage-gzip": (seal(b"", 1, gzip=True, body=b"\x1f\x8b" + bytes(range(200))), None, "records"),
        "gzip-lies-inside": (seal(one, 2, gzip=True), 1, "records_count"),
        "gzip-bomb-40-mib": (_gzip_bomb(), None, "records"),
        "unknown-batch-attribute-bits": (seal(one, 1, attributes=0x0100), None, "attributes"),
    }


def good_batch(values: list[bytes]) -> bytes:
    return records.build_batch(records.make_records(values))
