"""One segment of a partition log: a `.log` file of RecordBatch v2 batches named by its
base offset (20 digits), plus its `.index` and `.timeindex`.

The scanner here is the one walker over a segment's batches that checks every header
whole; recovery, index rebuilds, `nodi segments verify` and `dump` use it. A read of the
log (Log.read) walks with records.walk_header instead: the few header fields it needs,
over batches whose CRC check it makes or finds made (I12).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import crc32c as _crc32c

from .errors import CorruptBatchError, InvalidRecordError
from .file_budget import BudgetedFile
from .fileio import File, FileSystem
from .index import OffsetIndex, TimeIndex
from .limits import DEFAULT_RECORD_LIMITS, RecordLimits
from .records import (
    BATCH_HEADER_BYTES,
    CRC_START,
    BatchHeader,
    check_header,
    parse_header,
)

LOG_SUFFIX = ".log"
INDEX_SUFFIX = ".index"
TIME_INDEX_SUFFIX = ".timeindex"
DELETED_SUFFIX = ".deleted"
SEGMENT_SUFFIXES = (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX)
SCAN_WINDOW_BYTES = 1024 * 1024


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}"


def parse_segment_name(file_name: str) -> int | None:
    """The base offset of a `.log` file name, or None for any other file."""
    stem, dot, suffix = file_name.partition(".")
    if not dot or "." + suffix != LOG_SUFFIX or len(stem) != 20 or not stem.isdigit():
        return None
    return int(stem)


@dataclass(frozen=True, slots=True)
class ScannedBatch:
    position: int
    header: BatchHeader


class BatchScanner:
    """Walks the batches of a file from `position` to `end`, reading through a window.

    Each batch's length bounds and magic are checked; with `verify` its CRC too. A bad
    batch raises CorruptBatchError with its position; `position` then still names where
    the valid prefix ends.
    """

    def __init__(
        self,
        file: File,
        position: int,
        end: int,
        *,
        verify: bool,
        limits: RecordLimits = DEFAULT_RECORD_LIMITS,
        window_bytes: int = SCAN_WINDOW_BYTES,
    ) -> None:
        self.file = file
        self.position = position
        self.end = end
        self.verify = verify
        self.limits = limits
        self.window_bytes = window_bytes
        self._window = b""
        self._window_start = 0

    def _bytes(self, position: int, size: int) -> memoryview:
        offset = position - self._window_start
        if offset < 0 or offset + size > len(self._window):
            self._window_start = position
            self._window = self.file.pread(max(size, min(self.window_bytes, self.end - position)), position)
            offset = 0
            if len(self._window) < size:
                raise CorruptBatchError(
                    f"file ends {len(self._window)} bytes into a {size}-byte read", position=position
                )
        return memoryview(self._window)[offset : offset + size]

    def __iter__(self) -> Iterator[ScannedBatch]:
        while self.position < self.end:
            position = self.position
            try:
                if self.end - position < BATCH_HEADER_BYTES:
                    raise CorruptBatchError(f"{self.end - position} trailing bytes, less than a batch header")
                header = parse_header(self._bytes(position, BATCH_HEADER_BYTES))
                check_header(header, self.limits)
                if position + header.size > self.end:
                    raise CorruptBatchError(
                        f"batch of {header.size} bytes runs past the end ({self.end - position} left)"
                    )
                if self.verify:
                    body = self._bytes(position, header.size)
                    actual = _crc32c.crc32c(body[CRC_START:])
                    if actual != header.crc:
                        raise CorruptBatchError(f"crc mismatch: stored {header.crc:#010x}, computed {actual:#010x}")
            except InvalidRecordError as error:
                raise CorruptBatchError(str(error), position=position) from None
            self.position = position + header.size
            yield ScannedBatch(position, header)


class Segment:
    """A segment's files and what is known about them. The Log owns all mutation."""

    def __init__(self, fs: FileSystem, directory: str, base_offset: int, *, suffix: str = "") -> None:
        """`suffix` names a segment being built beside the live one (compaction writes
        `.log.cleaned`, `.index.cleaned`, `.timeindex.cleaned`)."""
        self.fs = fs
        self.directory = directory
        self.base_offset = base_offset
        stem = os.path.join(directory, segment_name(base_offset))
        self.log_path = stem + LOG_SUFFIX + suffix
        self.index = OffsetIndex(fs, stem + INDEX_SUFFIX + suffix)
        self.time_index = TimeIndex(fs, stem + TIME_INDEX_SUFFIX + suffix)
        self.file: File | None = None
        self.size = 0
        # One past the last offset held; base_offset while empty.
        self.next_offset = base_offset
        self.max_timestamp = -1
        self.first_timestamp: int | None = None
        # Bytes [0, verified_bytes) passed the CRC check in this process (I12), and so
        # did [verified_from, size) when it is not None: the batches appended, or checked
        # at open, after bytes that were not (a clean start's tail after the last index
        # entry, an unclean start's batches above the recovery point).
        self.verified_bytes = 0
        self.verified_from: int | None = None
        # Position of the first batch that failed its check in a sealed segment (G4).
        self.corrupt_position: int | None = None
        self.corrupt_reason: str | None = None
        self.bytes_since_index_entry = 0

    @property
    def paths(self) -> tuple[str, str, str]:
        return (self.log_path, self.index.path, self.time_index.path)

    def open_file(self, *, create: bool = False) -> File:
        if self.file is None:
            self.file = self.fs.open(self.log_path, create=create)
        return self.file

    def scanner(self, position: int = 0, *, verify: bool, limits: RecordLimits) -> BatchScanner:
        return BatchScanner(self.open_file(), position, self.size, verify=verify, limits=limits)

    # -- index maintenance (active segment) ---------------------------------------

    def start_in_memory_indexes(self) -> None:
        self.index.reset_in_memory()
        self.time_index.reset_in_memory()
        self.bytes_since_index_entry = 0

    def note_batch(self, position: int, header: BatchHeader, index_interval_bytes: int) -> None:
        """Account for a batch now at `position` (append, or a rebuild scan)."""
        if self.first_timestamp is None:
            self.first_timestamp = header.base_timestamp
        if header.max_timestamp > self.max_timestamp:
            self.max_timestamp = header.max_timestamp
        relative_offset = header.base_offset - self.base_offset
        if self.bytes_since_index_entry >= index_interval_bytes:
            self.index.append(relative_offset, position)
            last_time = self.time_index.last()
            if last_time is None or self.max_timestamp > last_time[0]:
                self.time_index.append(self.max_timestamp, relative_offset)
            self.bytes_since_index_entry = 0
        self.bytes_since_index_entry += header.size
        self.size = position + header.size
        self.next_offset = header.last_offset + 1

    def write_indexes(self) -> None:
        """Persist the in-memory indexes whole (seal or clean close). The last time index
        entry carries the segment's largest timestamp, which retention reads."""
        last_time = self.time_index.last()
        if self.size and (last_time is None or self.max_timestamp > last_time[0]):
            last_offset = self.next_offset - 1 - self.base_offset
            if last_time is None or last_offset >= last_time[1]:
                self.time_index.append(self.max_timestamp, last_offset)
        self.index.write_file()
        self.time_index.write_file()

    def reset_for_scan(self) -> None:
        """Forget derived state before note_batch() replays every batch."""
        self.start_in_memory_indexes()
        self.max_timestamp = -1
        self.first_timestamp = None
        self.size = 0
        self.next_offset = self.base_offset
        self.verified_from = None

    def rebuild_indexes(self, limits: RecordLimits, index_interval_bytes: int, *, verify: bool) -> None:
        """Rescan the whole `.log` and rebuild both indexes in memory (I6)."""
        end = self.size
        self.reset_for_scan()
        for batch in BatchScanner(self.open_file(), 0, end, verify=verify, limits=limits):
            self.note_batch(batch.position, batch.header, index_interval_bytes)
        if verify:
            self.verified_bytes = self.size

    # -- CRC checks done (I12) -----------------------------------------------------

    def is_verified(self, position: int, size: int) -> bool:
        """The batch of `size` bytes at `position` passed its CRC check in this process."""
        if position + size <= self.verified_bytes:
            return True
        return self.verified_from is not None and position >= self.verified_from

    def note_verified(self, position: int, size: int) -> None:
        """The batch of `size` bytes at `position` passed its CRC check: grow the
        verified prefix when it touches it."""
        if position <= self.verified_bytes:
            self.verified_bytes = max(self.verified_bytes, position + size)

    def note_appended(self, position: int) -> None:
        """Batches from `position` to the end were checked before they were written."""
        if self.verified_bytes >= position:
            self.verified_bytes = self.size
        elif self.verified_from is None or self.verified_from > position:
            self.verified_from = position

    # -- lookups ------------------------------------------------------------------

    def position_floor(self, offset: int) -> int:
        """A batch start at or before the batch holding `offset` (from the index; 0 when
        the entry found is no floor of `offset` or lies beyond the log: a damaged index
        or a bad read of it is never believed over the log, I6)."""
        entry = self.index.floor(offset - self.base_offset)
        if entry is None or entry[0] > offset - self.base_offset or entry[1] >= max(self.size, 1):
            return 0
        return entry[1]

    def read_header(self, position: int) -> BatchHeader:
        return parse_header(self.open_file().pread(BATCH_HEADER_BYTES, position))

    # -- life cycle -----------------------------------------------------------------

    def sync(self) -> None:
        if self.file is not None:
            self.file.sync()

    def close(self) -> None:
        self.index.close()
        self.time_index.close()
        if self.file is not None:
            self.file.close()
            self.file = None

    def pin_files(self) -> None:
        """Open every file of this segment now, so this object keeps reading these
        inodes after a rename puts other files at its paths (compaction's swap): a
        reader holding it sees the old segment whole, never old bytes with a new index."""
        if self.file is None:  # detached: retention removed it; nothing to pin
            return
        if isinstance(self.file, BudgetedFile):  # never closed and opened again by path
            self.file.keep_open()
        self.index.pin()
        self.time_index.pin()

    def detach(self) -> None:
        """Forget the files without closing the `.log` descriptor: a reader may still be
        sending a slice of it (the descriptor closes with its last reference)."""
        self.index.close()
        self.time_index.close()
        self.file = None
