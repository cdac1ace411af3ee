"""Log compaction: a compacted topic keeps the latest record of each key (Kafka's log
cleaner; docs/storage-format.md "Compaction", invariants I13-I15 in docs/fault-model.md).

One run over one log, pass after pass until the dirty part is covered:

1. The first dirty offset comes from the log's `compaction.checkpoint`: below it (the
   clean head) each key appears at most once; from it to the active segment's base (or
   the end a caller asks for) is the dirty part. The active segment is never touched.
2. Map: every keyed record from the first dirty offset on is put into a key map
   (xxh3-128 digest of the key -> latest offset), within key_map_bytes_max. When the map
   is full the pass covers the dirty part only up to `map_end`, the first offset whose
   key did not fit; the next pass starts there.
3. Clean: every sealed segment holding offsets below `map_end` is recopied without the
   records the map supersedes (same key, lower offset) and without tombstones (null
   value) whose delete horizon has passed. A tombstone that stays marks its batch with
   Kafka's delete-horizon attribute (bit 6, base_timestamp = now + delete_retention_ms)
   the first time a pass sees it. Kept records keep their offsets (gaps appear, order is
   kept); each rewritten batch keeps its base offset and last offset delta, so consumers
   and producer state see the same offset ranges. A segment with nothing to change is
   not rewritten; consecutive segments that fit in segment_bytes together are recopied
   into one; segments left with nothing leave the log (never the first).
4. Swap, one group at a time (I14): `.cleaned` files written and fsynced, the merge
   marker for a group of several, renamed to `.swap` (the `.log.swap` commits), old files
   renamed to `.deleted`, `.swap` renamed to the final names, directory fsynced,
   `.deleted` unlinked. Log.open finishes or undoes each step (storage/recovery.py). The
   log's list of segments changes under its lock and readers keep the old segments'
   open files (I15).
5. The checkpoint moves to `map_end`.

The checkpoint, the swap and the removal of segments are storage/compaction_files.py.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import xxhash

from .compaction_files import (
    COMPACTION_CHECKPOINT_FILE,
    decode_compaction_checkpoint,
    delete_files,
    dirty_ratio,
    encode_compaction_checkpoint,
    read_first_dirty_offset,
    remove_cleaned,
    swap_files,
)
from .config import DAY_MS
from .errors import (
    CorruptBatchError,
    CorruptSegmentError,
    InvalidConfigError,
    InvalidRecordError,
    LimitExceededError,
    NodiError,
)
from .fileio import File, write_file_atomically
from .limits import MIB, RecordLimits
from .log import Log
from .records import (
    ATTRIBUTE_DELETE_HORIZON,
    INT64_MAX,
    BatchHeader,
    build_batch,
    decode_records,
    iter_batches,
    parse_header,
)
from .recovery import CLEANED_SUFFIX
from .segment import BatchScanner, Segment

# What one key map entry costs in this process: a 16-byte digest object, an int and a
# dict slot, with room for the dict's growth (measured ~133 bytes; docs/benchmarks.md).
KEY_MAP_ENTRY_BYTES = 160
# Output of a rewritten segment is written in pieces of about this size.
WRITE_CHUNK_BYTES = 1 * MIB
# How often (bytes read) a run reports progress and checks for cancellation.
PROGRESS_STEP_BYTES = 4 * MIB


ProgressCallback = Callable[[int, int], None]


class KeyRequiredError(InvalidRecordError):
    """A record without a key sent to a compacted topic (compaction keeps one record
    per key; a keyless record has none)."""


class CompactionCancelledError(NodiError):
    """The run was stopped (server shutdown) before it finished; what it swapped in is
    complete, the rest is left for the next run."""


@dataclass(frozen=True, slots=True)
class CompactionConfig:
    # Memory for the key map of one pass; a smaller budget means more passes.
    key_map_bytes_max: int = 64 * MIB
    # How long a tombstone stays after the first pass has seen it.
    delete_retention_ms: int = DAY_MS

    def __post_init__(self) -> None:
        if self.key_map_bytes_max < KEY_MAP_ENTRY_BYTES:
            raise InvalidConfigError(
                f"key_map_bytes_max {self.key_map_bytes_max} holds no entry ({KEY_MAP_ENTRY_BYTES} bytes each)"
            )
        if self.delete_retention_ms < 0:
            raise InvalidConfigError(f"delete_retention_ms {self.delete_retention_ms} must be >= 0")

    @property
    def key_map_entries_max(self) -> int:
        return self.key_map_bytes_max // KEY_MAP_ENTRY_BYTES


@dataclass(frozen=True, slots=True)
class CompactionResult:
    """What one run over one log did."""

    directory: str
    passes: int
    segments_rewritten: int
    bytes_read: int
    bytes_written: int
    bytes_reclaimed: int
    records_removed: int
    tombstones_removed: int
    duration_ms: float
    # The first dirty offset before and after the run.
    first_dirty_offset_before: int
    first_dirty_offset: int


@dataclass(frozen=True, slots=True)
class CompactionStatistics:
    runs: int = 0
    passes: int = 0
    segments_rewritten: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_reclaimed: int = 0
    records_removed: int = 0
    tombstones_removed: int = 0
    duration_ms: float = 0.0
    failures: int = 0

    def plus(self, other: CompactionResult | CompactionStatistics) -> CompactionStatistics:
        """These figures with one more run's (a result) or another log's added."""
        values = {name: getattr(self, name) + getattr(other, name, 0) for name in self.__slots__}
        if isinstance(other, CompactionResult):  # a result has no runs or failures field
            values["runs"] += 1
        return CompactionStatistics(**values)


def require_keys(data: bytes | bytearray | memoryview, limits: RecordLimits) -> None:
    """Refuse batches for a compacted topic that hold a record without a key."""
    for header, batch in iter_batches(data, limits):
        for record in decode_records(batch, header, limits):
            if record.key is None:
                raise KeyRequiredError(
                    f"record at offset delta {record.offset - header.base_offset} has no key; "
                    "a compacted topic needs a key on every record"
                )


# ---------------------------------------------------------------------------
# One run


@dataclass
class _Counters:
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_reclaimed: int = 0
    records_removed: int = 0
    tombstones_removed: int = 0
    segments_rewritten: int = 0
    progress_total: int = 0
    progress_reported: int = -PROGRESS_STEP_BYTES


@dataclass
class _Pass:
    """What a clean pass needs to decide each record's fate."""

    offsets: dict[bytes, int]
    map_end: int
    now_ms: int
    horizon_ms: int  # the delete horizon stamped on batches whose tombstones stay


class Compactor:
    """Runs compaction of logs (any thread) and keeps statistics per log directory.
    One run per log at a time; runs of different logs may overlap."""

    def __init__(self, config: CompactionConfig | None = None, *, clock_ms: Callable[[], int] | None = None) -> None:
        self.config = config or CompactionConfig()
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._lock = threading.Lock()
        self._log_locks: dict[str, threading.Lock] = {}
        self._statistics: dict[str, CompactionStatistics] = {}
        self._cancelled = threading.Event()

    # -- public -----------------------------------------------------------------

    def cancel(self) -> None:
        """Stop runs in progress at their next batch (CompactionCancelledError) and
        refuse new ones: for shutdown."""
        self._cancelled.set()

    def statistics(self, directory: str | None = None) -> CompactionStatistics:
        """One log's figures, or the sum over every log when `directory` is None."""
        with self._lock:
            if directory is not None:
                return self._statistics.get(directory, CompactionStatistics())
            total = CompactionStatistics()
            for entry in self._statistics.values():
                total = total.plus(entry)
            return total

    def compact(
        self,
        log: Log,
        *,
        roll: bool = False,
        now_ms: int | None = None,
        progress: ProgressCallback | None = None,
        wait_timeout_ms: int = 600_000,
        delete_retention_ms: int | None = None,
    ) -> CompactionResult:
        """Compact `log` up to its active segment (after sealing it first with `roll`,
        so everything appended before the call is covered). Blocks while another run of
        the same log is in progress, up to wait_timeout_ms (TimeoutError).
        delete_retention_ms: the log's topic setting (None: config.delete_retention_ms)."""
        if delete_retention_ms is None:
            delete_retention_ms = self.config.delete_retention_ms
        elif (
            isinstance(delete_retention_ms, bool) or not isinstance(delete_retention_ms, int) or delete_retention_ms < 0
        ):
            raise InvalidConfigError(f"delete_retention_ms {delete_retention_ms!r} must be an integer >= 0")
        if log.config.dense_offsets:
            raise InvalidConfigError(
                f"log {log.directory} keeps dense offsets (cleanup policy delete): it cannot be compacted"
            )
        with self._lock:
            log_lock = self._log_locks.setdefault(log.directory, threading.Lock())
        if not log_lock.acquire(timeout=wait_timeout_ms / 1000):
            raise TimeoutError(f"another compaction of {log.directory} is still running")
        try:
            try:
                self._check_cancelled()
                if roll:
                    log.roll()
                result = self._run(log, self._clock_ms() if now_ms is None else now_ms, delete_retention_ms, progress)
            except BaseException:
                with self._lock:
                    entry = self._statistics.get(log.directory, CompactionStatistics())
                    self._statistics[log.directory] = replace(entry, failures=entry.failures + 1)
                raise
            with self._lock:
                self._statistics[log.directory] = self._statistics.get(log.directory, CompactionStatistics()).plus(
                    result
                )
            return result
        finally:
            log_lock.release()

    # -- a run ------------------------------------------------------------------

    def _run(
        self, log: Log, now_ms: int, delete_retention_ms: int, progress: ProgressCallback | None
    ) -> CompactionResult:
        started = time.monotonic()
        counters = _Counters()
        first_dirty = before = read_first_dirty_offset(log)
        dirty_end = log.segments[-1].base_offset
        counters.progress_total = 2 * sum(segment.size for segment in log.segments[:-1])
        passes = 0
        while True:
            passes += 1
            sealed = [segment for segment in log.segments[:-1] if segment.base_offset < dirty_end]
            for segment in sealed:
                segment.pin_files()  # before any swap: readers keep these inodes (I15)
            offsets, map_end = self._build_map(log, sealed, first_dirty, dirty_end, counters, progress)
            # The horizon is a batch's int64 base_timestamp: a topic may keep tombstones
            # for ever (INT64_MAX) without overflowing it.
            work = _Pass(offsets, map_end, now_ms, min(now_ms + delete_retention_ms, INT64_MAX))
            for group in _groups(
                [segment for segment in sealed if segment.base_offset < map_end], log.config.segment_bytes
            ):
                self._clean_group(log, group, work, counters, progress)
            del offsets, work
            write_file_atomically(
                log.fs, os.path.join(log.directory, COMPACTION_CHECKPOINT_FILE), encode_compaction_checkpoint(map_end)
            )
            first_dirty = map_end
            if map_end >= dirty_end:
                break
            # A further pass reads the log again: say so in the progress total.
            counters.progress_total += 2 * sum(segment.size for segment in sealed)
        if progress is not None:
            progress(counters.progress_total, counters.progress_total)
        return CompactionResult(
            directory=log.directory,
            passes=passes,
            segments_rewritten=counters.segments_rewritten,
            bytes_read=counters.bytes_read,
            bytes_written=counters.bytes_written,
            bytes_reclaimed=counters.bytes_reclaimed,
            records_removed=counters.records_removed,
            tombstones_removed=counters.tombstones_removed,
            duration_ms=(time.monotonic() - started) * 1000,
            first_dirty_offset_before=before,
            first_dirty_offset=first_dirty,
        )

    def _build_map(
        self,
        log: Log,
        sealed: list[Segment],
        first_dirty: int,
        dirty_end: int,
        counters: _Counters,
        progress: ProgressCallback | None,
    ) -> tuple[dict[bytes, int], int]:
        """Digest -> latest offset over [first_dirty, map_end); map_end is dirty_end
        unless the map filled up first."""
        offsets: dict[bytes, int] = {}
        capacity = self.config.key_map_entries_max
        digest = xxhash.xxh3_128_digest
        limits = log.config.limits
        for segment in sealed:
            if segment.next_offset <= first_dirty:
                continue
            start = segment.position_floor(first_dirty) if first_dirty > segment.base_offset else 0
            for header, data in self._batches(log, segment, start, counters, progress):
                if header.last_offset < first_dirty:
                    continue
                try:
                    decoded = decode_records(data, header, limits)
                except InvalidRecordError as error:  # stored before produce walked records: kept as it is
                    log.note_undecodable(header, error, "compaction")
                    continue
                for record in decoded:
                    key = record.key
                    if key is None or record.offset < first_dirty:
                        continue
                    hashed = digest(key)
                    if len(offsets) >= capacity and hashed not in offsets:
                        return offsets, record.offset
                    offsets[hashed] = record.offset
        return offsets, dirty_end

    def _batches(self, log: Log, segment: Segment, start: int, counters: _Counters, progress: ProgressCallback | None):
        """(header, bytes) of each batch of a sealed segment from `start`, CRC-checked;
        a bad batch is CorruptSegmentError (compaction never copies damage, G4)."""
        file = segment.file
        if file is None:  # retention removed it (and will not swap it back)
            return
        scanner = BatchScanner(file, start, segment.size, verify=True, limits=log.config.limits)
        try:
            for batch in scanner:
                self._check_cancelled()
                header = batch.header
                counters.bytes_read += header.size
                if progress is not None and counters.bytes_read - counters.progress_reported >= PROGRESS_STEP_BYTES:
                    counters.progress_reported = counters.bytes_read
                    progress(min(counters.bytes_read, counters.progress_total), counters.progress_total)
                yield header, file.pread(header.size, batch.position)
        except CorruptBatchError as error:
            # The scanner names the position of every batch it refuses; without one the
            # whole segment is suspect.
            position = error.position if error.position is not None else 0
            raise CorruptSegmentError(segment.log_path, position, None, f"compaction: {error}") from None

    def _clean_group(
        self, log: Log, group: list[Segment], work: _Pass, counters: _Counters, progress: ProgressCallback | None
    ) -> None:
        """Recopy the consecutive sealed segments of `group` into one segment named by
        the first, without what `work` removes, then swap it in for all of them. A group
        of one with no batch to change is left alone."""
        first_segment = group[0]
        cleaned: Segment | None = None
        pending: list[bytes] = []
        pending_bytes = 0
        position = 0  # in the cleaned file
        interval = log.config.index_interval_bytes
        removed = tombstones = 0
        try:
            files = [segment.file for segment in group]
            if any(file is None for file in files):  # retention removed one meanwhile
                return
            if len(group) > 1:  # merging changes the files whatever the records
                cleaned = self._start_cleaned(log, first_segment)
            for segment, file in zip(group, files):
                for header, data in self._batches(log, segment, 0, counters, progress):
                    try:
                        replacement, dropped, dropped_tombstones = self._filter_batch(
                            data, header, work, log.config.limits
                        )
                    except InvalidRecordError as error:  # stored before produce walked records
                        log.note_undecodable(header, error, "compaction")
                        replacement, dropped, dropped_tombstones = data, 0, 0  # copied as it is
                    if replacement is data and cleaned is None:
                        continue
                    removed += dropped
                    tombstones += dropped_tombstones
                    if cleaned is None:
                        cleaned = self._start_cleaned(log, segment)
                        position = self._copy_prefix(log, segment, file, cleaned, header, interval)
                    if replacement is None:
                        continue
                    cleaned.note_batch(position, parse_header(replacement), interval)
                    pending.append(replacement)
                    pending_bytes += len(replacement)
                    position += len(replacement)
                    if pending_bytes >= WRITE_CHUNK_BYTES:
                        # One buffer: many small batches would pass IOV_MAX (1024) buffers.
                        _open_file(cleaned).pwritev([b"".join(pending)], position - pending_bytes)
                        pending, pending_bytes = [], 0
            if cleaned is None:
                return
            if pending:
                _open_file(cleaned).pwritev([b"".join(pending)], position - pending_bytes)
            cleaned.size = position
            _open_file(cleaned).sync()
            cleaned.write_indexes()
            fresh = Segment(log.fs, log.directory, first_segment.base_offset)

            def install(first: bool) -> Segment | None:
                if position == 0 and not first:  # nothing left: the segments go (I10)
                    remove_cleaned(log, cleaned)
                    for segment in group:
                        delete_files(log, segment)
                    return None
                swap_files(log, group, cleaned)
                fresh.size = position
                fresh.next_offset = group[-1].next_offset
                fresh.max_timestamp = cleaned.max_timestamp
                fresh.first_timestamp = cleaned.first_timestamp
                fresh.open_file()
                return fresh

            installed = log.replace_sealed_segments(group, install)
        except BaseException:
            if cleaned is not None:
                remove_cleaned(log, cleaned)
            raise
        if not installed:  # retention removed a segment of the group meanwhile
            remove_cleaned(log, cleaned)
            return
        cleaned.close()
        before = sum(segment.size for segment in group)
        counters.segments_rewritten += len(group)
        counters.bytes_written += position
        counters.bytes_reclaimed += before - position
        counters.records_removed += removed
        counters.tombstones_removed += tombstones

    def _filter_batch(
        self, data: bytes, header: BatchHeader, work: _Pass, limits: RecordLimits
    ) -> tuple[bytes | None, int, int]:
        """(the batch to keep: `data` itself when unchanged, new bytes, or None when no
        record stays; records removed; tombstones among them)."""
        offsets = work.offsets
        digest = xxhash.xxh3_128_digest
        has_horizon = bool(header.attributes & ATTRIBUTE_DELETE_HORIZON)
        horizon_passed = has_horizon and work.now_ms >= header.base_timestamp
        records = decode_records(data, header, limits)
        kept = []
        tombstones = 0
        tombstone_kept = False
        for record in records:
            key = record.key
            if key is not None:
                latest = offsets.get(digest(key))
                if latest is not None and record.offset < latest:
                    tombstones += record.value is None
                    continue
                if record.value is None:
                    # Below map_end every older record of the key is gone once this pass
                    # is done (I13); above it the tombstone waits for a later pass.
                    if horizon_passed and record.offset < work.map_end:
                        tombstones += 1
                        continue
                    tombstone_kept = True
            kept.append(record)
        stamp = tombstone_kept and not has_horizon
        if len(kept) == len(records) and not stamp:
            return data, 0, 0
        removed = len(records) - len(kept)
        if not kept:
            return None, removed, tombstones
        try:
            rebuilt = build_batch(
                [(record.key, record.value, record.headers, record.timestamp_ms) for record in kept],
                base_offset=header.base_offset,
                compression=header.compression,
                producer_id=header.producer_id,
                producer_epoch=header.producer_epoch,
                base_sequence=header.base_sequence,
                base_timestamp=work.horizon_ms if stamp else header.base_timestamp,
                attributes=header.attributes | (ATTRIBUTE_DELETE_HORIZON if stamp else 0),
                limits=limits,
                offset_deltas=[record.offset - header.base_offset for record in kept],
                last_offset_delta=header.last_offset_delta,
            )
        except LimitExceededError:
            # Wider timestamp deltas pushed a full batch over batch_bytes_max: keep it
            # as it is; a later pass tries again.
            return data, 0, 0
        return rebuilt, removed, tombstones

    def _start_cleaned(self, log: Log, segment: Segment) -> Segment:
        cleaned = Segment(log.fs, log.directory, segment.base_offset, suffix=CLEANED_SUFFIX)
        for path in cleaned.paths:  # leftovers of a cancelled run in this process
            if log.fs.exists(path):
                log.fs.unlink(path)
        file = cleaned.open_file(create=True)
        file.truncate(0)
        cleaned.start_in_memory_indexes()
        return cleaned

    def _copy_prefix(self, log: Log, segment: Segment, file, cleaned: Segment, stop: BatchHeader, interval: int) -> int:
        """Copy the unchanged batches before the first changed one (`stop`) as they are."""
        position = 0
        for batch in BatchScanner(file, 0, segment.size, verify=False, limits=log.config.limits):
            if batch.header.base_offset >= stop.base_offset:
                break
            cleaned.note_batch(batch.position, batch.header, interval)
            position = batch.position + batch.header.size
        copied = 0
        while copied < position:
            chunk = file.pread(min(WRITE_CHUNK_BYTES, position - copied), copied)
            _open_file(cleaned).pwritev([chunk], copied)
            copied += len(chunk)
        return position

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise CompactionCancelledError("compaction cancelled")


def _groups(segments: list[Segment], segment_bytes: int) -> list[list[Segment]]:
    """Consecutive segments whose bytes together fit in one segment (and whose offsets
    fit the index's 32-bit relative offsets) are recopied into one, as Kafka's cleaner
    groups them: compacted logs do not keep one small segment per roll for ever."""
    groups: list[list[Segment]] = []
    for segment in segments:
        if groups:
            group = groups[-1]
            if (
                sum(member.size for member in group) + segment.size <= segment_bytes
                and segment.next_offset - group[0].base_offset < 2**32
                and group[-1].next_offset == segment.base_offset
            ):
                group.append(segment)
                continue
        groups.append([segment])
    return groups


__all__ = [
    "COMPACTION_CHECKPOINT_FILE",
    "KEY_MAP_ENTRY_BYTES",
    "CompactionCancelledError",
    "CompactionConfig",
    "CompactionResult",
    "CompactionStatistics",
    "Compactor",
    "KeyRequiredError",
    "decode_compaction_checkpoint",
    "dirty_ratio",
    "encode_compaction_checkpoint",
    "read_first_dirty_offset",
    "require_keys",
]


def _open_file(segment: Segment) -> File:
    """The file of a segment compaction has just created (and so holds open)."""
    file = segment.file
    if file is None:
        raise RuntimeError(f"compaction: the cleaned segment {segment.log_path} is not open")
    return file
