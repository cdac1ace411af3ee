"""The four codecs of Kafka's RecordBatch v2 records section: gzip, snappy, lz4, zstd.

A batch stores its records section compressed as a whole (attributes bits 0-2 name the
codec) and nodi keeps it verbatim; these functions are only used where records are
needed: nodi's own producer (compress) and every reader that decodes records (the
client, TTL and delay headers, dedup, compaction, queue groups, the segment tools).

What each codec writes, and what it reads, is what Kafka's clients do:
- gzip: one RFC 1952 member (zlib, level 6).
- snappy: written in the "xerial" framing Kafka's Java client and kafka-python use (an
  8-byte magic, two 4-byte version words, then blocks of [4-byte length][raw snappy]);
  read in that framing or as one raw snappy block, which is what librdkafka writes.
- lz4: the LZ4 frame format (Kafka's own since message format v1 fixed its header
  checksum), independent blocks.
- zstd: one zstd frame.

Decompression is bounded: a section that would inflate past `limit` bytes is refused
(LimitExceededError) after holding at most about twice `limit` bytes (gzip, snappy and
lz4 about `limit`); a section that does
not decode, or leaves bytes behind, is CorruptBatchError. The codec libraries (zlib,
cramjam for snappy, lz4, zstandard) are declared in pyproject.toml.
"""

from __future__ import annotations

import struct
import zlib

import cramjam
import lz4.frame
import zstandard

from .errors import CorruptBatchError, LimitExceededError

GZIP, SNAPPY, LZ4, ZSTD = 1, 2, 3, 4

# A compressed section is inflated this many bytes at a time, so refusing one that
# inflates past its limit holds about the limit in memory, not twice it.
INFLATE_CHUNK_BYTES = 1 << 20
# nodi's own snappy writer cuts the section into blocks of this size (as the Java
# client's default block size does).
SNAPPY_BLOCK_BYTES = 32 * 1024
XERIAL_MAGIC = b"\x82SNAPPY\x00"
_XERIAL_HEADER = struct.Struct(">8sii")  # magic, version, compatible version
_XERIAL_VERSION = 1
_BLOCK_LENGTH = struct.Struct(">I")
GZIP_LEVEL = 6
# zstd: the longest frame header (where the content size is read from), the most one
# input byte can inflate to (a 128 KiB RLE block from a 3-byte header and 1 byte), and
# the smallest piece of input fed at a time.
ZSTD_FRAME_HEADER_BYTES_MAX = 18
ZSTD_BYTES_PER_BYTE_MAX = 32 * 1024
ZSTD_INPUT_STEP_MIN = 256
ZSTD_LEVEL = 3

_zstd_compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
_zstd_decompressor = zstandard.ZstdDecompressor()


def compress(codec: int, data: bytes) -> bytes:
    """The records section `data` compressed with `codec` (GZIP, SNAPPY, LZ4 or ZSTD)."""
    if codec == GZIP:
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        return compressor.compress(data) + compressor.flush()
    if codec == SNAPPY:
        parts = [_XERIAL_HEADER.pack(XERIAL_MAGIC, _XERIAL_VERSION, _XERIAL_VERSION)]
        view = memoryview(data)
        for start in range(0, len(data), SNAPPY_BLOCK_BYTES):
            block = bytes(cramjam.snappy.compress_raw(view[start : start + SNAPPY_BLOCK_BYTES]))
            parts.append(_BLOCK_LENGTH.pack(len(block)))
            parts.append(block)
        return b"".join(parts)
    if codec == LZ4:
        return lz4.frame.compress(data, block_linked=False, store_size=False)
    if codec == ZSTD:
        return _zstd_compressor.compress(data)
    raise ValueError(f"no codec {codec}")


def decompress(codec: int, data: bytes | memoryview, limit: int) -> bytes:
    """The records section `data` inflated with `codec`, refused past `limit` bytes."""
    if codec == GZIP:
        return _gzip(data, limit)
    if codec == SNAPPY:
        return _snappy(data, limit)
    if codec == LZ4:
        return _lz4(data, limit)
    if codec == ZSTD:
        return _zstd(data, limit)
    raise ValueError(f"no codec {codec}")


def _too_big(limit: int) -> LimitExceededError:
    return LimitExceededError(f"batch inflates past decompressed_batch_bytes_max {limit}")


def _gzip(data: bytes | memoryview, limit: int) -> bytes:
    decompressor = zlib.decompressobj(31)
    chunks: list[bytes] = []
    inflated = 0
    pending = data
    try:
        while True:
            chunk = decompressor.decompress(pending, min(INFLATE_CHUNK_BYTES, limit + 1 - inflated))
            chunks.append(chunk)
            inflated += len(chunk)
            if inflated > limit:
                raise _too_big(limit)
            pending = decompressor.unconsumed_tail
            if decompressor.eof or not (pending or chunk):
                break
    except zlib.error as error:
        raise CorruptBatchError(f"gzip: {error}") from None
    if not decompressor.eof:
        raise CorruptBatchError("gzip: truncated stream")
    if decompressor.unused_data:
        raise CorruptBatchError("gzip: trailing bytes after the stream")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _raw_snappy_length(block: bytes | memoryview) -> int:
    """The uncompressed length a raw snappy block declares (its leading varint), read
    before anything is allocated for it."""
    length = shift = 0
    for index in range(min(len(block), 5)):
        byte = block[index]
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return length
        shift += 7
    raise CorruptBatchError("snappy: the block's length is cut short or too long")


# The most a raw snappy block can inflate by: its densest element is a 3-byte copy of 64
# bytes. A block declaring more than this many bytes per byte it holds is not snappy.
_SNAPPY_EXPANSION_MAX = 22


def _raw_snappy(block: bytes | memoryview, room: int, limit: int) -> bytes:
    declared = _raw_snappy_length(block)
    if declared > len(block) * _SNAPPY_EXPANSION_MAX:
        raise CorruptBatchError(
            f"snappy: a block of {len(block)} bytes declares {declared} bytes, more than it can hold"
        )
    if declared > room:
        raise _too_big(limit)
    try:
        return bytes(cramjam.snappy.decompress_raw(bytes(block)))
    except cramjam.DecompressionError as error:
        raise CorruptBatchError(f"{error}") from None


def _snappy(data: bytes | memoryview, limit: int) -> bytes:
    view = memoryview(data)
    if bytes(view[: len(XERIAL_MAGIC)]) != XERIAL_MAGIC:
        return _raw_snappy(view, limit, limit)
    if len(view) < _XERIAL_HEADER.size:
        raise CorruptBatchError("snappy: the xerial header is cut short")
    blocks: list[bytes] = []
    inflated = 0
    position = _XERIAL_HEADER.size
    while position < len(view):
        if position + _BLOCK_LENGTH.size > len(view):
            raise CorruptBatchError(f"snappy: a block length at byte {position} is cut short")
        (length,) = _BLOCK_LENGTH.unpack_from(view, position)
        position += _BLOCK_LENGTH.size
        if length == 0 or position + length > len(view):
            raise CorruptBatchError(f"snappy: a block of {length} bytes at byte {position} runs past the section")
        block = _raw_snappy(view[position : position + length], limit - inflated, limit)
        inflated += len(block)
        blocks.append(block)
        position += length
    return b"".join(blocks)


def _lz4(data: bytes | memoryview, limit: int) -> bytes:
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        inflated = decompressor.decompress(bytes(data), max_length=limit + 1)
    except RuntimeError as error:  # what the lz4 binding raises for a frame that does not decode
        raise CorruptBatchError(f"lz4: {error}") from None
    if len(inflated) > limit:
        raise _too_big(limit)
    if not decompressor.eof:
        raise CorruptBatchError("lz4: truncated frame")
    if decompressor.unused_data:
        raise CorruptBatchError("lz4: trailing bytes after the frame")
    return inflated


def _zstd(data: bytes | memoryview, limit: int) -> bytes:
    """zstd's streaming decoder returns all a piece of input inflates to, so the input
    goes in pieces small enough that one piece cannot inflate far past what is left of
    `limit` (a zstd block of at most 128 KiB needs at least 4 bytes: ZSTD_BYTES_PER_BYTE_MAX)."""
    view = memoryview(data)
    try:
        declared = zstandard.frame_content_size(bytes(view[:ZSTD_FRAME_HEADER_BYTES_MAX]))
    except zstandard.ZstdError as error:
        raise CorruptBatchError(f"zstd: {error}") from None
    if declared > limit:  # -1 when the frame does not say
        raise _too_big(limit)
    decompressor = _zstd_decompressor.decompressobj()
    chunks: list[bytes] = []
    inflated = position = 0
    try:
        while position < len(view) and not decompressor.eof:
            step = max(ZSTD_INPUT_STEP_MIN, (limit + 1 - inflated) // ZSTD_BYTES_PER_BYTE_MAX)
            chunk = decompressor.decompress(view[position : position + step])
            position += step
            if chunk:
                chunks.append(chunk)
                inflated += len(chunk)
                if inflated > limit:
                    raise _too_big(limit)
    except zstandard.ZstdError as error:
        raise CorruptBatchError(f"zstd: {error}") from None
    if not decompressor.eof:
        raise CorruptBatchError("zstd: truncated frame")
    if decompressor.unused_data or position < len(view):
        raise CorruptBatchError("zstd: trailing bytes after the frame")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
