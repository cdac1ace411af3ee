"""What compaction does to files (storage/compaction.py runs it): the compaction
checkpoint, the swap of a group of segments (I14), the removal of segments compacted to
nothing (I10). docs/storage-format.md, "Compaction", has the layouts and the steps.

    compaction.checkpoint (24 bytes, big-endian; written with write_file_atomically)
      0  4  magic "NDCO"
      4  2  version (1)
      6  2  reserved (0)
      8  8  first dirty offset: below it each key appears at most once
     16  4  reserved (0)
     20  4  CRC-32C of bytes 0..19

A missing or damaged checkpoint reads as "everything is dirty" (I6: a cache, never
believed over the log), which costs a longer run, never a wrong one.
"""

from __future__ import annotations

import os
import struct

import crc32c as _crc32c

from .fileio import read_whole_file
from .log import Log
from .recovery import SWAP_SUFFIX, remove_merge_marker, remove_segment_files, write_merge_marker
from .segment import DELETED_SUFFIX, Segment

COMPACTION_CHECKPOINT_FILE = "compaction.checkpoint"

_CHECKPOINT = struct.Struct(">4sHHqI")
_CRC = struct.Struct(">I")
_MAGIC = b"NDCO"
_VERSION = 1


def encode_compaction_checkpoint(first_dirty_offset: int) -> bytes:
    body = _CHECKPOINT.pack(_MAGIC, _VERSION, 0, first_dirty_offset, 0)
    return body + _CRC.pack(_crc32c.crc32c(body))


def decode_compaction_checkpoint(data: bytes) -> int | None:
    """The first dirty offset, or None for anything but a whole version-1 checkpoint."""
    if len(data) != _CHECKPOINT.size + _CRC.size:
        return None
    body = data[: _CHECKPOINT.size]
    if _crc32c.crc32c(body) != _CRC.unpack_from(data, _CHECKPOINT.size)[0]:
        return None
    magic, version, _reserved, offset, _more = _CHECKPOINT.unpack(body)
    if magic != _MAGIC or version != _VERSION or offset < 0:
        return None
    return offset


def read_first_dirty_offset(log: Log) -> int:
    """The checkpoint's first dirty offset, clamped into [log start, active base]."""
    data = read_whole_file(log.fs, os.path.join(log.directory, COMPACTION_CHECKPOINT_FILE))
    offset = None if data is None else decode_compaction_checkpoint(data)
    segments = log.segments
    if offset is None:
        return segments[0].base_offset
    return min(max(offset, segments[0].base_offset), segments[-1].base_offset)


def dirty_ratio(log: Log) -> float:
    """Bytes of sealed segments holding dirty offsets over all sealed bytes (the active
    segment counts in neither); 0.0 when nothing is sealed or the log is damaged (it
    refuses every change until repaired)."""
    if log.damage is not None:
        return 0.0
    first_dirty = read_first_dirty_offset(log)
    sealed = log.segments[:-1]
    total = sum(segment.size for segment in sealed)
    if total == 0:
        return 0.0
    dirty = sum(segment.size for segment in sealed if segment.next_offset > first_dirty)
    return dirty / total


def swap_files(log: Log, group: list[Segment], cleaned: Segment) -> None:
    """I14, under the log's lock: .cleaned -> .swap (the .log last: it commits), fsync
    the directory, old files -> .deleted, fsync the directory, .swap -> final names
    (.log last), fsync the directory, unlink the .deleted files. A group of several
    segments first writes the merge marker naming the offsets the new segment covers,
    so that recovery, finishing the swap, also removes the group's later segments.
    Recovery finishes or undoes any prefix of this. Each directory fsync is a barrier:
    renames not yet synced may survive a crash in any combination (F4), so the new
    `.log` may take its final name only once the old files' renames are durable; else
    a crash could keep the merged segment beside the later segments it replaced."""
    fs, directory = log.fs, log.directory
    for old in group:
        old.pin_files()
    merging = len(group) > 1
    if merging:
        write_merge_marker(fs, directory, group[0].base_offset, group[-1].next_offset)
    finals = group[0].paths  # (.log, .index, .timeindex)
    order = (1, 2, 0)  # indexes first, the .log last
    for number in order:
        fs.rename(cleaned.paths[number], finals[number] + SWAP_SUFFIX)
    fs.sync_directory(directory)
    doomed = [path for old in group for path in old.paths]
    for path in doomed:
        if fs.exists(path):
            fs.rename(path, path + DELETED_SUFFIX)
    fs.sync_directory(directory)
    for number in order:
        fs.rename(finals[number] + SWAP_SUFFIX, finals[number])
    fs.sync_directory(directory)
    for path in doomed:
        if fs.exists(path + DELETED_SUFFIX):
            fs.unlink(path + DELETED_SUFFIX)
    if merging:
        remove_merge_marker(fs, directory)


def delete_files(log: Log, old: Segment) -> None:
    """A segment compacted to nothing leaves the log as retention's do (I10), but keeps
    its open files for readers that took it (I15)."""
    remove_segment_files(log.fs, log.directory, old, keep_open=True)


def remove_cleaned(log: Log, cleaned: Segment) -> None:
    cleaned.close()
    for path in cleaned.paths:
        try:
            if log.fs.exists(path):
                log.fs.unlink(path)
        except OSError:
            pass  # Log.open removes any .cleaned file it finds
