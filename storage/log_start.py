"""The log start offset file of one partition: where a `delete records` moved its start.

    log-start-offset (20 bytes, big-endian)
      0  4  magic "NDLS"
      4  2  version (1)
      6  2  reserved (0)
      8  8  log_start_offset  no offset below it is served (I21)
     16  4  CRC-32C of bytes 0..15

Written with write_file_atomically (I11) only by Log.delete_records, after every offset
below the new start is durable and before any segment below it is removed. A directory
without the file (every directory written before it existed) starts at its first
segment's base offset, as before. A file that fails its checks is reported and ignored:
the deleted records are served again rather than more being hidden than was asked.
"""

from __future__ import annotations

import os
import struct

import crc32c as _crc32c

from .fileio import FileSystem, read_whole_file, write_file_atomically

LOG_START_FILE = "log-start-offset"
_MAGIC = b"NDLS"
_VERSION = 1
_LAYOUT = struct.Struct(">4sHHq")
_CRC = struct.Struct(">I")
LOG_START_FILE_BYTES = _LAYOUT.size + _CRC.size


def encode_log_start(offset: int) -> bytes:
    assert offset >= 0, "a negative log start offset"
    body = _LAYOUT.pack(_MAGIC, _VERSION, 0, offset)
    return body + _CRC.pack(_crc32c.crc32c(body))


def decode_log_start(data: bytes) -> int | None:
    """The offset, or None for anything that is not a whole, checksummed version-1 file."""
    if len(data) != LOG_START_FILE_BYTES:
        return None
    body = data[: _LAYOUT.size]
    (crc,) = _CRC.unpack_from(data, _LAYOUT.size)
    if _crc32c.crc32c(body) != crc:
        return None
    magic, version, _reserved, offset = _LAYOUT.unpack(body)
    if magic != _MAGIC or version != _VERSION or offset < 0:
        return None
    return offset


def read_log_start(fs: FileSystem, directory: str) -> tuple[int | None, str | None]:
    """(the stored log start offset or None, why the file was ignored or None)."""
    path = os.path.join(directory, LOG_START_FILE)
    data = read_whole_file(fs, path)
    if data is None:
        return None, None
    offset = decode_log_start(data)
    if offset is None:
        return None, f"{path}: unreadable log start offset file ({len(data)} bytes), ignored"
    return offset, None


def write_log_start(fs: FileSystem, directory: str, offset: int) -> None:
    write_file_atomically(fs, os.path.join(directory, LOG_START_FILE), encode_log_start(offset))
