"""Sparse segment indexes: `.index` (offset -> file position) and `.timeindex`
(timestamp -> offset).

    .index entry (8 bytes, big-endian)       .timeindex entry (12 bytes, big-endian)
      0  4  relative offset (uint32)           0  8  timestamp ms (int64): the largest
      4  4  file position  (uint32)                  timestamp in the segment up to and
                                                     including the batch named next
                                               8  4  relative offset (uint32) of a batch

Both are caches of the `.log` (I6). While a segment is active its entries live in memory
(bounded by segment bytes / index interval) and nothing is written per append; the files
are written whole when the segment is sealed or the log is closed cleanly, and an unclean
start rebuilds the active segment's index from its scan. A sealed segment's index is
searched in place with a binary search of small preads, so memory does not grow with
retained bytes.
"""

from __future__ import annotations

import bisect
import struct
from array import array

from .errors import SegmentReadError
from .file_budget import BudgetedFile
from .fileio import File, FileSystem


class SparseIndex:
    """Sorted (key, value) pairs; keys strictly increase. Subclasses fix the layout."""

    ENTRY: struct.Struct
    KEY_TYPECODE: str
    VALUE_TYPECODE = "I"

    def __init__(self, fs: FileSystem, path: str) -> None:
        self.fs = fs
        self.path = path
        # (keys, values) while the segment is active, else None. One attribute, so a
        # reader thread that took it keeps a consistent pair while a roll releases it.
        self._memory: tuple[array, array] | None = None
        self._file: File | None = None
        self._file_entries = 0

    # -- in-memory (active segment) ----------------------------------------------

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def reset_in_memory(self) -> None:
        self._memory = (array(self.KEY_TYPECODE), array(self.VALUE_TYPECODE))

    def load_into_memory(self) -> None:
        keys, values = array(self.KEY_TYPECODE), array(self.VALUE_TYPECODE)
        for key, value in self.ENTRY.iter_unpack(self._read_all()):
            keys.append(key)
            values.append(value)
        self._memory = (keys, values)

    def append(self, key: int, value: int) -> None:
        assert self._memory is not None, "append only to an active (in-memory) index"
        keys, values = self._memory
        keys.append(key)
        values.append(value)

    def __len__(self) -> int:
        memory = self._memory
        if memory is not None:
            return len(memory[0])
        return self._entry_count()

    # -- files ------------------------------------------------------------------

    def write_file(self) -> None:
        """Write the in-memory entries as the whole file and fsync it."""
        assert self._memory is not None
        pack = self.ENTRY.pack
        data = b"".join(pack(key, value) for key, value in zip(*self._memory))
        self.close()
        file = self.fs.open(self.path, create=True)
        try:
            file.truncate(0)
            if data:
                file.pwritev([data], 0)
            file.sync()
        finally:
            file.close()

    def release_memory(self) -> None:
        """After the file was written: search it in place from now on."""
        self._memory = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> File:
        if self._file is None:
            self._file = self.fs.open(self.path)
            self._file_entries = self._file.size() // self.ENTRY.size
        return self._file

    def pin(self) -> None:
        """Open the file now (when there is one): lookups keep reading it after a
        rename replaces the file at `path` (Segment.pin_files)."""
        if self._file is None and self.fs.exists(self.path):
            self._open()
        if isinstance(self._file, BudgetedFile):  # never closed and opened again by path
            self._file.keep_open()

    def _entry_count(self) -> int:
        if self._file is None and not self.fs.exists(self.path):
            return 0
        self._open()
        return self._file_entries

    def _read_all(self) -> bytes:
        if self._file is None and not self.fs.exists(self.path):
            return b""
        file = self._open()
        size = file.size()
        return file.pread(size - size % self.ENTRY.size, 0)

    def _file_entry_at(self, index: int) -> tuple[int, int]:
        data = self._open().pread(self.ENTRY.size, index * self.ENTRY.size)
        if len(data) != self.ENTRY.size:  # the file shrank under us, or a bad read
            raise SegmentReadError(self.path, index * self.ENTRY.size, f"{len(data)} of {self.ENTRY.size} bytes read")
        return self.ENTRY.unpack(data)

    # -- lookups ----------------------------------------------------------------

    def floor(self, key: int) -> tuple[int, int] | None:
        """The entry with the greatest key <= `key`, or None."""
        memory = self._memory
        if memory is not None:
            keys, values = memory
            count = min(len(keys), len(values))  # an append may be half done
            slot = bisect.bisect_right(keys, key, 0, count) - 1
            return None if slot < 0 else (keys[slot], values[slot])
        low, high = 0, self._entry_count()  # answer in [low - 1, high)
        while low < high:
            middle = (low + high) // 2
            if self._file_entry_at(middle)[0] <= key:
                low = middle + 1
            else:
                high = middle
        return None if low == 0 else self._file_entry_at(low - 1)

    def last(self) -> tuple[int, int] | None:
        memory = self._memory
        if memory is not None:
            keys, values = memory
            count = min(len(keys), len(values))  # an append may be half done
            return (keys[count - 1], values[count - 1]) if count else None
        count = self._entry_count()
        return None if count == 0 else self._file_entry_at(count - 1)

    def entries(self) -> list[tuple[int, int]]:
        memory = self._memory
        if memory is not None:
            return list(zip(*memory))
        return list(self.ENTRY.iter_unpack(self._read_all()))

    def check_file(self) -> str | None:
        """I7's structural half: None when the file looks sane, else why not."""
        if not self.fs.exists(self.path):
            return "missing"
        file = self._open()
        if file.size() % self.ENTRY.size:
            return f"size {file.size()} is not a multiple of {self.ENTRY.size}"
        return None


class OffsetIndex(SparseIndex):
    ENTRY = struct.Struct(">II")
    KEY_TYPECODE = "I"

    def check_entries(self, log_size: int) -> str | None:
        previous_offset = previous_position = -1
        for relative_offset, position in self.entries():
            if relative_offset <= previous_offset or position <= previous_position:
                return f"entries not increasing at relative offset {relative_offset}"
            if position >= log_size:
                return f"position {position} beyond the log size {log_size}"
            previous_offset, previous_position = relative_offset, position
        return None


class TimeIndex(SparseIndex):
    ENTRY = struct.Struct(">qI")
    KEY_TYPECODE = "q"

    def check_entries(self, relative_offset_end: int) -> str | None:
        previous_timestamp = None
        previous_offset = -1
        for timestamp, relative_offset in self.entries():
            if previous_timestamp is not None and timestamp <= previous_timestamp:
                return f"timestamps not increasing at {timestamp}"
            if relative_offset < previous_offset or relative_offset >= relative_offset_end:
                return f"relative offset {relative_offset} out of order or beyond the log"
            previous_timestamp, previous_offset = timestamp, relative_offset
        return None
