"""The recovery checkpoint and the clean-shutdown marker of one partition log.

    recovery-point.checkpoint (28 bytes, big-endian)
      0  4  magic "NDCP"
      4  2  version (1)
      6  2  reserved (0)
      8  8  recovery_offset   every byte of every batch below it is fsynced (I5)
     16  8  log_start_offset  informational; the first segment's name is the truth (I10)
     24  4  CRC-32C of bytes 0..23

    clean-shutdown  (empty file) present from a clean close until the next change to the log

Both are written with write_file_atomically (I11). A checkpoint that fails its CRC or is
missing reads as recovery_offset 0: a full scan, never a trusted lie (I6).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import crc32c as _crc32c

from .fileio import FileSystem, read_whole_file, write_file_atomically

CHECKPOINT_FILE = "recovery-point.checkpoint"
CLEAN_SHUTDOWN_FILE = "clean-shutdown"
_MAGIC = b"NDCP"
_VERSION = 1
_LAYOUT = struct.Struct(">4sHHqq")
_CRC = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    recovery_offset: int
    log_start_offset: int


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    body = _LAYOUT.pack(_MAGIC, _VERSION, 0, checkpoint.recovery_offset, checkpoint.log_start_offset)
    return body + _CRC.pack(_crc32c.crc32c(body))


def decode_checkpoint(data: bytes) -> Checkpoint | None:
    """None for anything that is not a whole, checksummed version-1 checkpoint."""
    if len(data) != _LAYOUT.size + _CRC.size:
        return None
    body = data[: _LAYOUT.size]
    (crc,) = _CRC.unpack_from(data, _LAYOUT.size)
    if _crc32c.crc32c(body) != crc:
        return None
    magic, version, _reserved, recovery_offset, log_start_offset = _LAYOUT.unpack(body)
    if magic != _MAGIC or version != _VERSION or recovery_offset < 0 or log_start_offset < 0:
        return None
    return Checkpoint(recovery_offset, log_start_offset)


def read_checkpoint(fs: FileSystem, directory: str) -> Checkpoint | None:
    data = read_whole_file(fs, os.path.join(directory, CHECKPOINT_FILE))
    return None if data is None else decode_checkpoint(data)


def write_checkpoint(fs: FileSystem, directory: str, checkpoint: Checkpoint) -> None:
    write_file_atomically(fs, os.path.join(directory, CHECKPOINT_FILE), encode_checkpoint(checkpoint))


def clean_shutdown_marked(fs: FileSystem, directory: str) -> bool:
    return fs.exists(os.path.join(directory, CLEAN_SHUTDOWN_FILE))


def mark_clean_shutdown(fs: FileSystem, directory: str) -> None:
    write_file_atomically(fs, os.path.join(directory, CLEAN_SHUTDOWN_FILE), b"")


def clear_clean_shutdown(fs: FileSystem, directory: str) -> None:
    path = os.path.join(directory, CLEAN_SHUTDOWN_FILE)
    if fs.exists(path):
        fs.unlink(path)
        fs.sync_directory(directory)
