"""A partition log: append, read, group-committed fsync, roll, retention, close.

Threading: appends, reads and retention may come from any thread. One lock guards the
segment list and the write position; reads copy what they need under it and do their
I/O outside it. With fsync policy `always` or `interval` the log's fsyncs run on a
shared worker pool (storage/fsync_pool.py), one at a time per log: an append hands the
log to the pool when no fsync of it is queued or running; that job syncs whatever was
written when it started, resolves every waiter the sync covered (group commit, I8), and
syncs again at once while more was written meanwhile (queueing behind other logs' jobs
when some wait). Under `interval` the job is due fsync_interval_ms after the log's last
fsync, and the next one again an interval later: at most one fsync per interval. Hand-offs per group commit: one, appender -> worker (none while the
log's job is running: it sees the new data itself), then the waiters' futures resolve
on the worker. An append that is alone (nothing on the pool, no fsync of its log
pending) may instead leave the same job to its caller, which runs it in its own thread
(append_checked_nowait's `fsync_here_max_s`, run_fsync_job_here: the server's event
loop, no hand-off at all). An fsync is never retried (I9).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import errno
import heapq
import itertools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .checkpoint import Checkpoint, clear_clean_shutdown, mark_clean_shutdown, write_checkpoint
from .config import FsyncPolicy, LogConfig
from .errors import (
    CorruptBatchError,
    CorruptSegmentError,
    DiskFullError,
    DurableWaitTimeoutError,
    InvalidRecordError,
    LogClosedError,
    LogDamagedError,
    LogReadOnlyError,
    NodiError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceError,
    SegmentReadError,
    UnsupportedCompressionError,
)
from .file_budget import BudgetedFile
from .fileio import OS_FILE_SYSTEM, File, FileSystem, read_whole_file, write_file_atomically
from .fsync_pool import FsyncPool, default_fsync_pool
from .histogram import FSYNC_SECONDS_BUCKETS, GROUP_COMMIT_APPENDS_BUCKETS, Histogram, HistogramSnapshot
from .log_start import read_log_start, write_log_start
from .producers import SEQUENCE_MODULUS, SNAPSHOT_FILE, ProducerStateTable, RememberedBatch
from .records import (
    BATCH_HEADER_BYTES,
    HEADER_WALK_BYTES,
    SUPPORTED_COMPRESSION,
    BatchHeader,
    check_batch,
    decode_records,
    encode_base_offset,
    stamp_log_append_time,
    walk_batches,
    walk_header,
)
from .recovery import LogDamage, RecoveryReport, recover, remove_segment_files
from .segment import BatchScanner, Segment

logger = logging.getLogger("nodi.storage")

READ_SCAN_WINDOW_BYTES = 16 * 1024
# Undecodable batches a log remembers having reported (note_undecodable).
UNDECODABLE_REMEMBERED_MAX = 1024


@dataclass(frozen=True, slots=True)
class AppendResult:
    first_offset: int
    last_offset: int
    batch_count: int
    byte_count: int
    log_append_time_ms: int
    # An idempotent producer's retry of batches already in the log: nothing was written
    # and the offsets are the originals.
    duplicate: bool = False
    # The append's fsync job was left to its caller (append_checked_nowait's
    # `fsync_here_max_s`), who must call Log.run_fsync_job_here().
    fsync_left_to_caller: bool = False


@dataclass(frozen=True, slots=True)
class CheckedAppend:
    """Batches a log accepts (check_append): the buffer, each batch's (position,
    header), and whether some record carries a header (False: none does, as the walk
    found). What a produce path may ask of them between the check and the write."""

    view: memoryview
    batches: list[tuple[int, BatchHeader]]
    headers: bool


@dataclass(frozen=True, slots=True)
class FileSlice:
    """Whole batches at [position, position + length) of `file`, ready for sendfile."""

    file: File
    position: int
    length: int
    first_offset: int
    last_offset: int
    # The sum of the base offsets of the slice's batches when the read scanned them
    # (None: not recorded). Base offsets are outside the batch CRC, so read() checks
    # them (and the batch lengths) against the scan: a consumer's CRC check cannot.
    base_offset_sum: int | None = None

    def read(self) -> bytes:
        """The slice's bytes, exactly the batches the read scanned: a failed read, a
        short one, or bytes whose batch framing or base offsets differ from the scan's
        is SegmentReadError (G2)."""
        try:
            data = self.file.pread(self.length, self.position)
        except OSError as error:
            raise SegmentReadError(self.file.path, self.position, str(error)) from error
        if len(data) != self.length:
            raise SegmentReadError(self.file.path, self.position, f"{len(data)} of {self.length} bytes read")
        if self.base_offset_sum is not None:
            problem = _framing_problem(data, self.base_offset_sum, self.last_offset)
            if problem is not None:
                raise SegmentReadError(
                    self.file.path, self.position, f"the bytes read are not the batches scanned: {problem}"
                )
        return data


_BASE_AND_LENGTH = struct.Struct(">qi")
_LAST_OFFSET_DELTA = struct.Struct(">i")
_LAST_OFFSET_DELTA_AT = 23


def _framing_problem(data: bytes, base_offset_sum: int, last_offset: int) -> str | None:
    """Why `data` is not whole batches with these base offsets ending at last_offset
    (None when it is). Header fields only: the CRC is the reader's to check."""
    size = len(data)
    unpack = _BASE_AND_LENGTH.unpack_from
    position = total = 0
    last_position = base_offset = -1
    while position < size:
        if size - position < 12:
            return f"{size - position} bytes at {position}, less than a batch header"
        base_offset, batch_length = unpack(data, position)
        if batch_length < BATCH_HEADER_BYTES - 12:
            return f"batch length {batch_length} at {position}"
        total += base_offset
        last_position = position
        position += 12 + batch_length
    if position != size or size - last_position < BATCH_HEADER_BYTES:
        return "batch lengths do not add up to the slice"
    last = base_offset + _LAST_OFFSET_DELTA.unpack_from(data, last_position + _LAST_OFFSET_DELTA_AT)[0]
    if total != base_offset_sum or last != last_offset:
        return "base offsets differ"
    return None


@dataclass(frozen=True, slots=True)
class ReadResult:
    slices: tuple[FileSlice, ...]
    log_start_offset: int
    # The readable end when the read was served (with fsync `always`, the durable end).
    end_offset: int

    @property
    def byte_count(self) -> int:
        return sum(piece.length for piece in self.slices)

    @property
    def next_offset(self) -> int | None:
        return self.slices[-1].last_offset + 1 if self.slices else None

    def to_bytes(self) -> bytes:
        return b"".join(piece.read() for piece in self.slices)


@dataclass(frozen=True, slots=True)
class DeletedSegment:
    base_offset: int
    next_offset: int
    byte_count: int
    reason: str  # "retention-ms" | "retention-bytes" | "delete-records"


# Log.delete_records(DELETE_TO_END): move the log start to the readable end (Kafka's
# high watermark), deleting every record served so far.
DELETE_TO_END = -1


@dataclass(frozen=True, slots=True)
class DeleteRecordsResult:
    # The log start offset afterwards (Kafka's low watermark).
    log_start_offset: int
    deleted_segments: tuple[DeletedSegment, ...]


@dataclass(frozen=True, slots=True)
class LogStatistics:
    segment_count: int
    byte_count: int
    log_start_offset: int
    next_offset: int
    durable_offset: int
    appends: int
    appended_bytes: int
    fsyncs: int
    fsync_covered_appends: int
    read_only: bool
    corrupt_segments: tuple[int, ...]
    # Damage below the recovery point found at open (G4): the log ends at its offset
    # and is read-only until repaired. None when undamaged.
    damage: LogDamage | None = None
    # Seconds each segment fsync took (every one: group commit, roll, flush, close).
    fsync_seconds: HistogramSnapshot | None = None
    # Appends each group-commit fsync made durable (fsyncs that covered any).
    group_commit_appends: HistogramSnapshot | None = None
    # Distinct stored batches readers skipped because their records do not decode
    # (written before produce walked records; docs/fault-model.md "Undecodable batches").
    undecodable_batches: int = 0


def _now_ms() -> int:
    return int(time.time() * 1000)


class Log:
    """One partition's log in `directory`. Use Log.open()."""

    def __init__(
        self,
        directory: str,
        config: LogConfig,
        fs: FileSystem,
        segments: list[Segment],
        report: RecoveryReport,
        clock_ms: Callable[[], int],
        fsync_pool: FsyncPool | None = None,
    ) -> None:
        self.directory = directory
        self.config = config
        self.fs = fs
        self.recovery_report = report
        self._clock_ms = clock_ms
        self._segments = segments
        self._base_offsets = [segment.base_offset for segment in segments]
        # No offset below it is served (I21): the first segment's base offset, or above
        # it where delete_records moved it (Log.open reads its file).
        self._start_offset = segments[0].base_offset
        # Why a log start offset file was ignored at open, or None.
        self.log_start_problem: str | None = None
        self._lock = threading.Lock()
        self._condition = threading.Condition(self._lock)
        self._next_offset = segments[-1].next_offset
        self._durable_offset = self._next_offset  # recovery synced everything it kept
        self._waiters: list[tuple[int, int, concurrent.futures.Future]] = []
        self._waiter_sequence = itertools.count()
        self._error: LogReadOnlyError | None = None
        self.damage = report.damage
        if report.damage is not None:
            damage = report.damage
            self._error = LogDamagedError(damage.path, damage.position, damage.offset, damage.reason)
        # Segment fsyncs run one at a time; after one fails no other starts (I9, F7).
        self._sync_lock = threading.Lock()
        self._sync_failure: OSError | None = None
        self._closed = False
        # segment_ms counts from the segment's creation or, after a restart, from the
        # open: producer timestamps may be old and must not force a roll per append.
        self._active_since_ms = clock_ms()
        self._appends = 0
        self._appended_bytes = 0
        self._fsyncs = 0
        self._fsync_covered_appends = 0
        self._undecodable: set[int] = set()  # base offsets of the batches readers skipped
        self._undecodable_count = 0
        self._appends_since_fsync = 0
        self._fsync_seconds = Histogram(FSYNC_SECONDS_BUCKETS)
        self._last_fsync_seconds = 0.0  # how long the last segment fsync took
        self._group_commit_appends = Histogram(GROUP_COMMIT_APPENDS_BUCKETS)
        self._readable_listeners: list[Callable[[], None]] = []
        self._producers = self._load_producer_state()
        # Group commit on the shared pool: at most one fsync job of this log queued or
        # running (_fsync_job_pending), and close() waits for a running one.
        self._fsync_pool: FsyncPool | None = None
        # The clean-shutdown marker is still on disk: nothing was changed since the
        # clean close the open found (cleared before the first change).
        self._clean_shutdown_marked = report.clean_shutdown and report.damage is None
        self._fsync_job_pending = False
        self._fsync_running = False
        # Under `interval`: seconds between fsyncs, counted from the last one (monotonic).
        self._fsync_interval_s: float | None = None
        if config.fsync_policy is FsyncPolicy.INTERVAL:
            self._fsync_interval_s = config.fsync_interval_ms / 1000
        self._last_sync_monotonic = time.monotonic()
        if config.fsync_policy is not FsyncPolicy.NEVER and self._error is None:
            self._fsync_pool = fsync_pool or default_fsync_pool()

    @classmethod
    def open(
        cls,
        directory: str,
        config: LogConfig | None = None,
        *,
        fs: FileSystem = OS_FILE_SYSTEM,
        clock_ms: Callable[[], int] = _now_ms,
        truncate_damaged: bool = False,
        fsync_pool: FsyncPool | None = None,
    ) -> Log:
        """Open (creating or recovering) the log in `directory`; see recovery_report.

        Damage below the recovery point is cut only with `truncate_damaged` (an
        operator's repair); otherwise the log opens damaged (`damage`, G4): served up
        to the damage, read-only, and it writes nothing into its directory (no marker
        removed, no checkpoint moved back), so the next open finds the same damage.
        Its fsyncs run on `fsync_pool` (a Store's), else on default_fsync_pool()."""
        config = config or LogConfig()
        segments, report = recover(fs, directory, config, truncate_damaged=truncate_damaged)
        stored_start, problem = read_log_start(fs, directory)
        if problem is not None:
            logger.warning("%s: records deleted before its offset are served again", problem)
        if report.damage is not None:
            log = cls(directory, config, fs, segments, report, clock_ms, fsync_pool)
            log._load_start_offset(stored_start, problem)
            return log
        # A clean start leaves the clean-shutdown marker in place until the first change
        # to the directory (_forget_clean_shutdown_locked): the files stay exactly as
        # the clean close left them until then, and an idle partition's open costs no
        # directory fsync (nor its close any write).
        log = cls(directory, config, fs, segments, report, clock_ms, fsync_pool)
        log._load_start_offset(stored_start, problem)
        if not report.clean_shutdown and not report.created:
            # Recovery fsynced what it kept: say so, and never leave a recovery point
            # beyond a truncated end (I5).
            write_checkpoint(fs, directory, Checkpoint(segments[-1].next_offset, log.log_start_offset))
        with log._lock:
            # A delete_records that stopped after its file was written (I21).
            log._remove_segments_below_start_locked()
        return log

    def _load_start_offset(self, stored: int | None, problem: str | None) -> None:
        """At open: the stored start (I21), never below the first segment's base nor
        above the log end (a start above it names offsets the log no longer has)."""
        self.log_start_problem = problem
        if stored is None or stored <= self._start_offset:
            return
        if stored > self._next_offset:
            logger.warning(
                "%s: the log start offset %d is beyond the recovered log end %d; starting at the end",
                self.directory,
                stored,
                self._next_offset,
            )
            stored = self._next_offset
        self._start_offset = stored

    # -- properties ---------------------------------------------------------------

    @property
    def log_start_offset(self) -> int:
        """The first offset served (I21; Kafka's low watermark)."""
        return self._start_offset

    @property
    def next_offset(self) -> int:
        """One past the last appended offset (the log end offset)."""
        return self._next_offset

    @property
    def durable_offset(self) -> int:
        """Every offset below this is fsynced."""
        return self._durable_offset

    @property
    def durable_failure(self) -> Exception | None:
        """Why no further offset will become durable (the sticky error, or the log is
        closed); None while fsyncs go on. Readable listeners are called when it is set,
        so a waiter kept outside the log (the server's, on its loop) learns of it."""
        if self._error is not None:
            return self._error
        if self._closed:
            return LogClosedError(f"log {self.directory} is closed")
        return None

    @property
    def readable_end_offset(self) -> int:
        """Readers see offsets below this. Under fsync `always` that is the durable end,
        so a consumer never sees a message a power loss could take back."""
        if self.config.fsync_policy is FsyncPolicy.ALWAYS:
            return self._durable_offset
        return self._next_offset

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(self._segments)

    # -- append -------------------------------------------------------------------

    def append(self, data: bytes | bytearray | memoryview, *, timeout_ms: int | None = None) -> AppendResult:
        """Append one or more whole batches. Under fsync `always`, return once durable."""
        result = self.append_nowait(data)
        if self.config.fsync_policy is FsyncPolicy.ALWAYS:
            self.wait_durable(result.last_offset, timeout_ms=timeout_ms)
        return result

    def append_nowait(self, data: bytes | bytearray | memoryview) -> AppendResult:
        """Validate and write; never waits for an fsync (see durable_future)."""
        return self.append_checked_nowait(self.check_append(data))

    def check_append(self, data: bytes | bytearray | memoryview) -> CheckedAppend:
        """What append_nowait checks before it writes: bounds, magic, CRC and every
        record's framing (docs/fault-model.md "Undecodable batches"), then what a log
        accepts of a producer's batch. Raises as append_nowait does; takes no lock and
        changes nothing."""
        view = memoryview(data)
        batches, headers = walk_batches(view, self.config.limits)
        for position, header in batches:
            _check_producer_batch(header, position)
        return CheckedAppend(view, batches, headers)

    def append_checked_nowait(self, checked: CheckedAppend, *, fsync_here_max_s: float | None = None) -> AppendResult:
        """append_nowait of batches check_append of this log accepted.

        `fsync_here_max_s`: the caller offers to run the fsync job itself, on its own
        thread, when the append is alone: fsync `always`, no fsync of this log queued or
        running (none that the append could join), the pool idle (no other log's fsync
        to overlap with), and this log's last fsync took at most that many seconds (a
        slow disk would hold the caller that long). Then the result says
        `fsync_left_to_caller` and the caller must call run_fsync_job_here() (soon:
        every append until then waits for it); otherwise the pool has the job as usual."""
        view, batches = checked.view, checked.batches
        with self._lock:
            self._check_writable()
            now_ms = self._clock_ms()
            duplicates = self._check_producers_locked(batches)
            if duplicates is not None:
                # Not stamped again: on a log-append-time topic the answer carries the
                # time the original got (as Kafka's does).
                append_time_ms = duplicates[-1].max_timestamp if self.config.log_append_time else now_ms
                return AppendResult(
                    duplicates[0].first_offset,
                    duplicates[-1].last_offset,
                    len(batches),
                    0,
                    append_time_ms,
                    duplicate=True,
                )
            self._forget_clean_shutdown_locked()
            active = self._segments[-1]
            record_count = sum(header.last_offset_delta + 1 for _, header in batches)
            if active.size and (
                active.size + len(view) > self.config.segment_bytes
                or now_ms - self._active_since_ms >= self.config.segment_ms
                or self._next_offset + record_count - active.base_offset >= 2**32
            ):
                self._roll_locked(now_ms)
                active = self._segments[-1]
            first_offset = base_offset = self._next_offset
            parts: list[bytes | memoryview] = []
            placed: list[tuple[int, BatchHeader]] = []
            position = appended_from = active.size
            log_append_time = self.config.log_append_time
            for batch_position, header in batches:
                parts.append(encode_base_offset(base_offset))
                if log_append_time:  # under the lock: the time index stays in append order
                    stamped, header = stamp_log_append_time(view, header, now_ms, batch_position)
                    parts.append(stamped)
                    parts.append(view[batch_position + BATCH_HEADER_BYTES : batch_position + header.size])
                else:
                    parts.append(view[batch_position + 8 : batch_position + header.size])
                placed.append((position, header._replace(base_offset=base_offset)))
                position += header.size
                base_offset += header.last_offset_delta + 1
            self._write_locked(active, parts, len(view))
            interval = self.config.index_interval_bytes
            for batch_position, header in placed:
                active.note_batch(batch_position, header, interval)
                self._producers.record(header, now_ms)
            # Checked above; the bytes before them only if they were (I12).
            active.note_appended(appended_from)
            self._next_offset = base_offset
            self._appends += 1
            self._appends_since_fsync += 1
            self._appended_bytes += len(view)
            hand_over = self._claim_fsync_job_locked()
        if hand_over:
            if (
                fsync_here_max_s is not None
                and self.config.fsync_policy is FsyncPolicy.ALWAYS
                and self._last_fsync_seconds <= fsync_here_max_s
                and self._fsync_pool is not None
                and self._fsync_pool.idle_nowait()
            ):
                return AppendResult(
                    first_offset, base_offset - 1, len(batches), len(view), now_ms, fsync_left_to_caller=True
                )
            self._hand_to_pool()  # outside the lock: the woken worker takes it first
        if self.config.fsync_policy is not FsyncPolicy.ALWAYS:
            self._notify_readable()
        return AppendResult(first_offset, base_offset - 1, len(batches), len(view), now_ms)

    def _check_producers_locked(self, batches: list[tuple[int, BatchHeader]]) -> list[RememberedBatch] | None:
        """The remembered originals when every batch is an idempotent retry; None when
        all are new. Raises for fenced epochs, sequence gaps, or a mix of both."""
        found: list[RememberedBatch | None] = []
        # producer id -> (its previous batch in this append, whether that was a retry)
        previous: dict[int, tuple[BatchHeader, bool]] = {}
        for _, header in batches:
            before, retried = previous.get(header.producer_id, (None, False))
            if header.producer_id < 0:
                found.append(None)
            elif before is None or retried:
                found.append(self._producers.check(header))
            else:
                expected = (before.base_sequence + before.last_offset_delta + 1) % SEQUENCE_MODULUS
                if header.producer_epoch != before.producer_epoch or header.base_sequence != expected:
                    raise OutOfOrderSequenceError(
                        f"producer {header.producer_id}: batches in one append do not continue each other"
                    )
                found.append(None)
            previous[header.producer_id] = (header, found[-1] is not None)
        if all(entry is None for entry in found):
            return None
        if any(entry is None for entry in found):
            raise OutOfOrderSequenceError("an append mixes already-written and new idempotent batches")
        return [entry for entry in found if entry is not None]  # all of them, checked above

    # -- producer state (derived from the log, I6) -----------------------------------

    def _load_producer_state(self) -> ProducerStateTable:
        """The snapshot, if it describes a prefix of this log, plus the batch headers
        after it; otherwise every batch header of the log."""
        data = read_whole_file(self.fs, os.path.join(self.directory, SNAPSHOT_FILE))
        loaded = None if data is None else ProducerStateTable.decode_snapshot(data)
        if loaded is not None and self.log_start_offset <= loaded[0] <= self._next_offset:
            offset, table = loaded
        else:
            offset, table = self.log_start_offset, ProducerStateTable()
        for segment in self._segments:
            if segment.next_offset <= offset and segment is not self._segments[-1]:
                continue
            start = segment.position_floor(offset) if offset > segment.base_offset else 0
            scanner = BatchScanner(segment.open_file(), start, segment.size, verify=False, limits=self.config.limits)
            try:
                for batch in scanner:
                    if batch.header.last_offset >= offset and batch.header.producer_id >= 0:
                        table.record(batch.header, self._clock_ms())
            except CorruptBatchError:
                # A sealed segment not rescanned at open (G4: a read reports it): its
                # producers' later batches are missed, as if the table had forgotten them.
                continue
        return table

    def _write_producer_snapshot_locked(self) -> None:
        write_file_atomically(
            self.fs, os.path.join(self.directory, SNAPSHOT_FILE), self._producers.encode_snapshot(self._next_offset)
        )

    # -- readers waiting for data ---------------------------------------------------

    def add_readable_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (from any thread) whenever readable_end_offset may have
        grown: a server wakes its long-polling fetches with it. Keep it cheap."""
        self._readable_listeners.append(callback)

    def remove_readable_listener(self, callback: Callable[[], None]) -> None:
        if callback in self._readable_listeners:
            self._readable_listeners.remove(callback)

    def _notify_readable(self) -> None:
        for callback in list(self._readable_listeners):
            callback()

    def _check_writable(self) -> None:
        if self._closed:
            raise LogClosedError(f"log {self.directory} is closed")
        if self._error is not None:
            raise self._error

    def _forget_clean_shutdown_locked(self) -> None:
        """Remove the clean-shutdown marker (durably) before the first change to the
        log's files after a clean start: a crash after the change must not find it."""
        if not self._clean_shutdown_marked:
            return
        try:
            clear_clean_shutdown(self.fs, self.directory)
        except OSError as error:  # a failed unlink or directory fsync is final (I9)
            raise self._fail_locked(
                LogReadOnlyError(f"removing the clean-shutdown marker of {self.directory} failed: {error}")
            ) from error
        self._clean_shutdown_marked = False

    def _write_locked(self, segment: Segment, parts: list, length: int) -> None:
        file = segment.open_file()
        position = segment.size
        try:
            file.pwritev(parts, position)
        except OSError as error:
            undone = False
            try:
                file.truncate(position)
                undone = True
            except OSError:
                pass
            if error.errno == errno.ENOSPC and undone:
                raise DiskFullError(f"disk full appending {length} bytes to {segment.log_path}") from error
            raise self._fail_locked(LogReadOnlyError(f"write to {segment.log_path} failed: {error}")) from error

    # -- durability (group commit) ----------------------------------------------------

    def durable_future(self, offset: int) -> concurrent.futures.Future:
        """A future resolved once `offset` is fsynced (or failed with the sticky error)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if offset < self._durable_offset:
                future.set_result(None)
            elif self._error is not None:
                future.set_exception(self._error)
            elif self._closed:
                future.set_exception(LogClosedError(f"log {self.directory} is closed"))
            else:
                heapq.heappush(self._waiters, (offset, next(self._waiter_sequence), future))
        return future

    def wait_durable(self, offset: int, *, timeout_ms: int | None = None) -> None:
        timeout_ms = self.config.durable_wait_timeout_ms if timeout_ms is None else timeout_ms
        try:
            self.durable_future(offset).result(timeout=timeout_ms / 1000)
        except concurrent.futures.TimeoutError:
            raise DurableWaitTimeoutError(
                f"offset {offset} of {self.directory} not durable within {timeout_ms} ms"
            ) from None

    def flush(self) -> None:
        """fsync everything written so far, now, in the calling thread."""
        with self._lock:
            self._check_writable()
            target = self._next_offset
            segment = self._segments[-1]
        self._sync_and_resolve(segment, target)

    def _claim_fsync_job_locked(self) -> bool:
        """True when the caller must hand _run_fsync_job to the pool (after releasing
        the lock): data is waiting and no job of this log is queued or running (that
        one's next fsync covers it: group commit)."""
        if self._fsync_pool is None or self._fsync_job_pending or self._closed or self._error is not None:
            return False
        self._fsync_job_pending = True
        return True

    def run_fsync_job_here(self) -> None:
        """Run the fsync job an append left to its caller (`fsync_left_to_caller`), in
        the calling thread, when the pool is still idle; else hand it to the pool (work
        came meanwhile: the fsync overlaps with it there). The job is the pool's own
        (_run_fsync_job): the same fsync, the same waiters resolved, the same failure
        rules (I9, F7). Never raises for an fsync's failure: the waiters fail with it."""
        pool = self._fsync_pool
        assert pool is not None and self._fsync_job_pending  # claimed by the append
        if pool.idle_nowait():
            self._run_fsync_job()
        else:
            self._hand_to_pool()

    def hand_fsync_job_to_pool(self) -> None:
        """Give the pool the fsync job an append left to its caller, who will not run
        it (`fsync_left_to_caller`)."""
        assert self._fsync_job_pending  # claimed by the append
        self._hand_to_pool()

    def _hand_to_pool(self) -> None:
        """Queue this log's fsync job (claimed): at once, or under `interval` for one
        interval after the last fsync (a roll's or flush()'s counts)."""
        pool = self._fsync_pool
        assert pool is not None
        if self._fsync_interval_s is None:
            pool.submit(self._run_fsync_job)
        else:
            pool.submit_at(self._last_sync_monotonic + self._fsync_interval_s, self._run_fsync_job)

    def _run_fsync_job(self) -> None:
        """A pool worker's fsyncs of this log (or the appender's: run_fsync_job_here):
        sync what is written now, resolve the waiters it covers; while more was written
        meanwhile, sync again at once, unless other logs' jobs wait: then queue behind
        them (fairness)."""
        pool = self._fsync_pool
        assert pool is not None
        with self._lock:
            if self._closed or self._error is not None or self._next_offset <= self._durable_offset:
                self._fsync_job_pending = False  # closed, or a roll or flush got there first
                return
            self._fsync_running = True
            target = self._next_offset
            segment = self._segments[-1]
        while True:
            try:
                self._sync_and_resolve(segment, target)
            except LogReadOnlyError:
                pass  # sticky: every waiter failed with it (I9)
            except Exception as error:  # a bug below: fail the log rather than leave its waiters hanging
                logger.exception("fsync of %s failed", segment.log_path)
                with self._lock:
                    self._fail_locked(LogReadOnlyError(f"fsync of {segment.log_path} failed: {error!r}"))
            with self._lock:
                wanted = not self._closed and self._error is None and self._next_offset > self._durable_offset
                if wanted and self._fsync_interval_s is None and not pool.has_queued_nowait():
                    target = self._next_offset  # group commit: the next fsync, right away
                    segment = self._segments[-1]
                    continue
                self._fsync_running = False
                self._fsync_job_pending = wanted
                if self._closed:
                    self._condition.notify_all()  # close() waits for a running job
            if wanted:
                self._hand_to_pool()
            return

    def _sync_segment(self, segment: Segment) -> None:
        """The one way the log fsyncs a segment. A caller racing a failing fsync (flush,
        roll, close) waits for it and then fails too: its fsync would be a retry (F7).
        Takes no other lock, so it may be called with the log lock held."""
        with self._sync_lock:
            if self._sync_failure is not None:
                raise OSError(errno.EIO, f"an earlier fsync failed: {self._sync_failure}")
            started = time.perf_counter()
            try:
                segment.sync()
                self._last_sync_monotonic = time.monotonic()
            except OSError as error:
                self._sync_failure = error
                raise
            finally:
                seconds = time.perf_counter() - started
                self._last_fsync_seconds = seconds
                self._fsync_seconds.observe(seconds)

    def _sync_and_resolve(self, segment: Segment, target: int) -> None:
        try:
            self._sync_segment(segment)
        except OSError as error:
            with self._lock:
                raise self._fail_locked(LogReadOnlyError(f"fsync of {segment.log_path} failed: {error}")) from error
        self._advance_durable(target)

    def _advance_durable(self, target: int) -> None:
        ready = []
        with self._lock:
            self._fsyncs += 1
            if self._appends_since_fsync:
                self._group_commit_appends.observe(self._appends_since_fsync)
            self._fsync_covered_appends += self._appends_since_fsync
            self._appends_since_fsync = 0
            if target > self._durable_offset:
                self._durable_offset = target
            while self._waiters and self._waiters[0][0] < self._durable_offset:
                ready.append(heapq.heappop(self._waiters)[2])
        for future in ready:
            if not future.done():
                future.set_result(None)
        self._notify_readable()

    def _fail_locked(self, error: LogReadOnlyError) -> LogReadOnlyError:
        """I9: sticky read-only; every waiter fails; the flusher stops. Returns the
        sticky error (the first), which the caller raises."""
        if self._error is None:
            self._error = error
        self._fail_waiters_locked(self._error)
        return self._error

    def _fail_waiters_locked(self, error: Exception) -> None:
        failed = [entry[2] for entry in self._waiters]
        self._waiters.clear()
        self._condition.notify_all()
        for future in failed:
            if not future.done():
                future.set_exception(error)
        self._notify_readable()  # listeners' own durable waiters read durable_failure

    # -- roll and retention ---------------------------------------------------------

    def roll(self) -> None:
        """Seal the active segment now (when it holds anything)."""
        with self._lock:
            self._check_writable()
            if self._segments[-1].size:
                self._forget_clean_shutdown_locked()
                self._roll_locked(self._clock_ms())

    def _roll_locked(self, now_ms: int) -> None:
        sealed = self._segments[-1]
        try:
            self._sync_segment(sealed)
            sealed.write_indexes()
        except OSError as error:
            raise self._fail_locked(LogReadOnlyError(f"sealing {sealed.log_path} failed: {error}")) from error
        sealed.index.release_memory()
        sealed.time_index.release_memory()
        fresh = Segment(self.fs, self.directory, sealed.next_offset)
        try:
            fresh.open_file(create=True)
            fresh.start_in_memory_indexes()
            self.fs.sync_directory(self.directory)
            self._segments.append(fresh)
            self._base_offsets.append(fresh.base_offset)
            self._active_since_ms = now_ms
            # Everything up to the new segment is now synced (I5).
            write_checkpoint(self.fs, self.directory, Checkpoint(fresh.base_offset, self.log_start_offset))
            self._write_producer_snapshot_locked()
        except OSError as error:  # a failed write or fsync is final (I9)
            raise self._fail_locked(LogReadOnlyError(f"rolling to {fresh.log_path} failed: {error}")) from error
        if sealed.next_offset > self._durable_offset:
            self._durable_offset = sealed.next_offset
            ready = []
            while self._waiters and self._waiters[0][0] < self._durable_offset:
                ready.append(heapq.heappop(self._waiters)[2])
            for future in ready:
                future.set_result(None)
            self._notify_readable()

    def apply_retention(self, now_ms: int | None = None) -> list[DeletedSegment]:
        """Delete whole sealed segments past retention_ms (by their largest timestamp) or
        while the log would still hold retention_bytes without them. Never the active."""
        now_ms = self._clock_ms() if now_ms is None else now_ms
        retention_ms, retention_bytes = self.config.retention_ms, self.config.retention_bytes
        deleted: list[DeletedSegment] = []
        if self.damage is not None:  # nothing leaves a damaged log but by its repair
            return deleted
        with self._lock:
            if self._closed:  # closed (idle, or the store's close) after the caller took it
                return deleted
            deleted.extend(self._remove_segments_below_start_locked(write=False))
            total = sum(segment.size for segment in self._segments)
            while len(self._segments) > 1:
                oldest = self._segments[0]
                if retention_ms is not None and oldest.max_timestamp < now_ms - retention_ms:
                    reason = "retention-ms"
                elif retention_bytes is not None and total - oldest.size >= retention_bytes:
                    reason = "retention-bytes"
                else:
                    break
                total -= oldest.size
                deleted.append(self._remove_oldest_locked(reason))
            if deleted:
                self._write_checkpoint_after_removal_locked()
        return deleted

    def _remove_oldest_locked(self, reason: str) -> DeletedSegment:
        """Remove the first segment (never the active one; I10), the log start moving to
        the next segment's base offset unless it already lies beyond it (I21)."""
        assert len(self._segments) > 1, "the active segment is never removed"
        self._forget_clean_shutdown_locked()
        oldest = self._segments[0]
        try:
            remove_segment_files(self.fs, self.directory, oldest)
        except OSError as error:  # a failed rename or directory fsync (I9)
            raise self._fail_locked(LogReadOnlyError(f"deleting {oldest.log_path} failed: {error}")) from error
        self._segments.pop(0)
        self._base_offsets.pop(0)
        self._start_offset = max(self._start_offset, self._segments[0].base_offset)
        return DeletedSegment(oldest.base_offset, oldest.next_offset, oldest.size, reason)

    def _write_checkpoint_after_removal_locked(self) -> None:
        # The durable offset, not the active base: a clean close may already have put
        # the recovery point past the active base, and it never moves back (I5).
        try:
            write_checkpoint(self.fs, self.directory, Checkpoint(self._durable_offset, self._start_offset))
        except OSError as error:  # a failed write or fsync is final (I9)
            raise self._fail_locked(LogReadOnlyError(f"checkpoint of {self.directory} failed: {error}")) from error

    def _remove_segments_below_start_locked(self, *, write: bool = True) -> list[DeletedSegment]:
        """Remove the sealed segments whose every offset lies below the log start (the
        next segment begins at or below it), oldest first. A damaged log keeps them."""
        deleted: list[DeletedSegment] = []
        if self.damage is not None:
            return deleted
        while len(self._segments) > 1 and self._segments[1].base_offset <= self._start_offset:
            deleted.append(self._remove_oldest_locked("delete-records"))
        if deleted and write:
            self._write_checkpoint_after_removal_locked()
        return deleted

    def delete_records(self, offset: int) -> DeleteRecordsResult:
        """Move the log start offset forward to `offset` (Kafka's DeleteRecords; I21):
        no offset below it is served again, and the segments wholly below it are removed
        now. DELETE_TO_END means the readable end. An offset at or below the current
        start changes nothing; one above the readable end is OffsetOutOfRangeError.

        Every offset below the new start is made durable first (a flush, under fsync
        policies other than `always`), so no crash can leave a log that ends below its
        start. The new start is written to its file (atomically, I11) before anything is
        removed: a crash after the write finishes the removal at the next open. A full
        disk while writing it is DiskFullError with nothing changed; any other failed
        write or fsync makes the log read-only (I9)."""
        with self._lock:
            self._check_writable()
            end = self.readable_end_offset
            target = end if offset == DELETE_TO_END else offset
            if target < 0 or target > end:
                raise OffsetOutOfRangeError(
                    offset,
                    self._start_offset,
                    end,
                    f"cannot delete records below offset {offset}: it is out of range, beyond the high watermark {end}",
                )
            if target <= self._start_offset:
                return DeleteRecordsResult(self._start_offset, ())
            durable = target <= self._durable_offset
        if not durable:
            self.flush()
        with self._lock:
            self._check_writable()
            if target <= self._start_offset:  # a concurrent call got there first
                return DeleteRecordsResult(self._start_offset, ())
            self._forget_clean_shutdown_locked()
            try:
                write_log_start(self.fs, self.directory, target)
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise DiskFullError(f"disk full writing the log start offset of {self.directory}") from error
                raise self._fail_locked(
                    LogReadOnlyError(f"writing the log start offset of {self.directory} failed: {error}")
                ) from error
            self._start_offset = target
            active = self._segments[-1]
            if target >= active.next_offset and active.size:
                # Every record of the active segment is deleted too: seal it, so its
                # file can go now rather than at the next roll.
                self._roll_locked(self._clock_ms())
            deleted = self._remove_segments_below_start_locked()
            return DeleteRecordsResult(self._start_offset, tuple(deleted))

    def replace_sealed_segments(self, olds: list[Segment], install: Callable[[bool], Segment | None]) -> bool:
        """Compaction's swap of consecutive sealed segments (storage/compaction.py, I14,
        I15). Under the lock, so reads and retention see the old segments or the new
        one: `install(first)` renames the files and returns the new segment, which takes
        the old ones' place, or None when they left the log (compacted to nothing; never
        when `first`, the log's first segment is among them: the log start would move).
        A reader that took an old segment keeps its open files. False, and nothing done,
        when `olds` are no longer consecutive sealed segments of this log."""
        with self._lock:
            self._check_writable()
            number = next((n for n, segment in enumerate(self._segments) if segment is olds[0]), None)
            if (
                number is None
                or (end := number + len(olds)) > len(self._segments) - 1
                or any(segment is not old for segment, old in zip(self._segments[number:end], olds))
            ):
                return False
            self._forget_clean_shutdown_locked()
            try:
                fresh = install(number == 0)
            except OSError as error:  # a failed rename or directory fsync (I9)
                raise self._fail_locked(
                    LogReadOnlyError(f"compaction swap of {olds[0].log_path} failed: {error}")
                ) from error
            if fresh is None:
                assert number > 0
                # Their offsets become part of the gap after the previous segment, as an
                # open would see them.
                self._segments[number - 1].next_offset = olds[-1].next_offset
                self._segments[number:end] = []
                self._base_offsets[number:end] = []
            else:
                assert fresh.base_offset == olds[0].base_offset
                self._segments[number:end] = [fresh]
                self._base_offsets[number:end] = [fresh.base_offset]
        return True

    # -- read -----------------------------------------------------------------------

    def read(self, offset: int, bytes_max: int, *, end_offset: int | None = None) -> ReadResult:
        """Whole batches from the one holding `offset`: the first always, then more
        while they fit in `bytes_max`. Returned as file slices (sendfile-ready)."""
        with self._lock:
            segments = self._segments[max(0, bisect.bisect_right(self._base_offsets, offset) - 1) :]
            sizes = [segment.size for segment in segments]
            log_start = self._start_offset
            log_end = self._next_offset
            end = self.readable_end_offset
        if offset < log_start or offset > log_end:
            raise OffsetOutOfRangeError(offset, log_start, log_end)
        if end_offset is not None:
            end = min(end, end_offset)
        elif offset == end:
            # A consumer waiting at the tail: nothing to scan (the readable end is a
            # batch boundary; a caller's end_offset may not be, so that one scans).
            return ReadResult((), log_start, end)
        slices: list[FileSlice] = []
        budget = bytes_max
        for segment, size in zip(segments, sizes):
            if segment.base_offset >= end or (slices and budget <= 0):
                break
            piece = self._read_segment(segment, size, offset, end, budget, first=not slices)
            if piece is None:
                if slices:
                    break  # the next batch does not fit: never skip it for a later one
                continue
            slices.append(piece)
            budget -= piece.length
            if piece.position + piece.length < size and piece.last_offset + 1 < end:
                break  # stopped for the budget inside this segment
        return ReadResult(tuple(slices), log_start, end)

    def _read_segment(
        self, segment: Segment, size: int, offset: int, end: int, budget: int, *, first: bool
    ) -> FileSlice | None:
        file = segment.file
        if file is None:  # retention removed it after the read took its snapshot
            raise OffsetOutOfRangeError(offset, self.log_start_offset, self._next_offset)
        try:
            entry = None
            if offset > segment.base_offset:
                try:
                    entry = segment.index.floor(offset - segment.base_offset)
                except (OSError, NodiError):
                    entry = None  # the index is a cache (I6): read the log from its start
                if entry is not None and entry[0] > offset - segment.base_offset:
                    entry = None  # not a floor: a bad read misled the search
            if entry is not None:
                try:
                    return self._scan_for_read(segment, file, size, entry, offset, end, budget, first=first)
                except _IndexEntryMismatch:
                    pass  # a damaged entry or a bad read of it (I6, I7): from the start
            return self._scan_for_read(segment, file, size, None, offset, end, budget, first=first)
        except OSError as error:
            raise SegmentReadError(segment.log_path, 0, str(error)) from error

    def _scan_for_read(
        self,
        segment: Segment,
        file: File,
        size: int,
        entry: tuple[int, int] | None,
        offset: int,
        end: int,
        budget: int,
        *,
        first: bool,
    ) -> FileSlice | None:
        """The read's slice of `segment`, scanning from the index entry `entry` (which
        must name a batch start, I7, else _IndexEntryMismatch) or from the start."""
        start, expected = (0, segment.base_offset) if entry is None else (entry[1], segment.base_offset + entry[0])
        if entry is not None and start >= size:
            raise _IndexEntryMismatch()
        # The header walk (records.walk_header): each batch's first bytes read through a
        # window, not its records; served bytes are CRC-checked once (I12), here only
        # when the segment does not say so already.
        limits = self.config.limits
        dense = self.config.dense_offsets
        window = b""
        window_start = 0
        verified_bytes = segment.verified_bytes
        verified_from = segment.verified_from
        slice_start: int | None = None  # None until the first batch is taken
        length = first_offset = last_offset = 0
        base_offset_sum = 0
        position = start
        try:
            while position < size:
                try:
                    if size - position < BATCH_HEADER_BYTES:
                        raise CorruptBatchError(f"{size - position} trailing bytes, less than a batch header")
                    at = position - window_start
                    if at < 0 or at + HEADER_WALK_BYTES > len(window):
                        window = file.pread(min(READ_SCAN_WINDOW_BYTES, size - position), position)
                        window_start, at = position, 0
                        if len(window) < HEADER_WALK_BYTES:
                            raise CorruptBatchError(f"file ends {len(window)} bytes into a batch header")
                    base_offset, batch_size, batch_last_offset = walk_header(window, at, limits)
                    if position + batch_size > size:
                        raise CorruptBatchError(
                            f"batch of {batch_size} bytes runs past the end ({size - position} left)"
                        )
                except CorruptBatchError as error:
                    error.position = position
                    raise
                if entry is not None and position == start and base_offset != expected:
                    raise _IndexEntryMismatch()
                # base_offset is outside the CRC: check continuity, as recovery does (I3, G4).
                if base_offset < expected or (dense and base_offset != expected):
                    raise CorruptBatchError(f"batch at offset {base_offset}, expected {expected}", position=position)
                expected = batch_last_offset + 1
                if base_offset >= end:
                    break
                if batch_last_offset < offset:
                    position += batch_size
                    continue
                if slice_start is not None or not first:
                    if length + batch_size > budget:
                        break
                if not (
                    (
                        position + batch_size <= verified_bytes
                        or (verified_from is not None and position >= verified_from)
                    )
                    and segment.corrupt_position is None
                ):
                    self._verify_for_read(segment, file, position, batch_size)
                if slice_start is None:
                    slice_start, length, first_offset = position, 0, max(offset, base_offset)
                length += batch_size
                last_offset = batch_last_offset
                base_offset_sum += base_offset
                position += batch_size
        except CorruptSegmentError:
            if slice_start is None:
                raise
        except CorruptBatchError as error:
            if entry is not None and error.position == start:
                raise _IndexEntryMismatch() from None
            if slice_start is None:
                raise self._mark_corrupt(segment, error.position, str(error)) from None
        if slice_start is None:
            return None
        if isinstance(file, BudgetedFile):
            # The real file, held by the slice: a send keeps its descriptor even if the
            # descriptor budget closes the segment's file meanwhile.
            file = file.handle()
        return FileSlice(file, slice_start, length, first_offset, last_offset, base_offset_sum)

    def _verify_for_read(self, segment: Segment, file: File, position: int, size: int) -> None:
        """I12: every served batch passed its CRC check in this process."""
        if segment.corrupt_position is not None and position >= segment.corrupt_position:
            reason = segment.corrupt_reason or "marked corrupt"  # set together with corrupt_position
            raise CorruptSegmentError(segment.log_path, segment.corrupt_position, None, reason)
        if segment.is_verified(position, size):
            return
        try:
            check_batch(file.pread(size, position), self.config.limits)
        except InvalidRecordError as error:
            raise CorruptBatchError(str(error), position=position) from None
        segment.note_verified(position, size)

    def _mark_corrupt(self, segment: Segment, position: int | None, reason: str) -> CorruptSegmentError:
        position = 0 if position is None else position
        if segment.corrupt_position is None or position < segment.corrupt_position:
            segment.corrupt_position = position
            segment.corrupt_reason = reason
        return CorruptSegmentError(segment.log_path, position, None, reason)

    def read_bytes(self, offset: int, bytes_max: int) -> bytes:
        return self.read(offset, bytes_max).to_bytes()

    def offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        """The first offset at or above the log start whose record timestamp is >=
        timestamp_ms, or None."""
        with self._lock:
            segments = list(self._segments)
            end = self.readable_end_offset
            log_start = self._start_offset
        for segment in segments:
            if segment.max_timestamp < timestamp_ms or segment.base_offset >= end:
                continue
            try:
                entry = segment.time_index.floor(timestamp_ms - 1)
                start = 0 if entry is None else segment.position_floor(segment.base_offset + entry[1])
            except (OSError, NodiError):
                start = 0  # the indexes are caches (I6): scan the segment instead
            if start >= segment.size:
                start = 0  # an entry beyond the log names no batch (I7)
            file = segment.open_file()
            scanner = BatchScanner(file, start, segment.size, verify=False, limits=self.config.limits)
            try:
                for batch in scanner:
                    header = batch.header
                    if header.base_offset >= end:
                        return None
                    if header.max_timestamp < timestamp_ms or header.last_offset < log_start:
                        continue
                    self._verify_for_read(segment, file, batch.position, header.size)
                    data = file.pread(header.size, batch.position)
                    try:
                        decoded = decode_records(data, header, self.config.limits)
                    except InvalidRecordError as error:  # RecordFramingError, or a codec nodi does not decode
                        # Stored before produce walked records: its records' times are
                        # unknown, its max_timestamp is not below the one sought. Start
                        # there (a consumer skips it and reports it); the segment is fine.
                        self.note_undecodable(header, error, "a lookup by timestamp")
                        return max(header.base_offset, log_start)
                    for record in decoded:
                        if record.timestamp_ms >= timestamp_ms and log_start <= record.offset < end:
                            return record.offset
            except CorruptBatchError as error:  # G4: reported like any read of bad bytes
                raise self._mark_corrupt(segment, error.position, str(error)) from None
            except OSError as error:
                raise SegmentReadError(segment.log_path, start, str(error)) from error
        return None

    # -- life cycle -----------------------------------------------------------------

    def statistics(self) -> LogStatistics:
        with self._lock:
            return LogStatistics(
                segment_count=len(self._segments),
                byte_count=sum(segment.size for segment in self._segments),
                log_start_offset=self.log_start_offset,
                next_offset=self._next_offset,
                durable_offset=self._durable_offset,
                appends=self._appends,
                appended_bytes=self._appended_bytes,
                fsyncs=self._fsyncs,
                fsync_covered_appends=self._fsync_covered_appends,
                read_only=self._error is not None,
                corrupt_segments=tuple(s.base_offset for s in self._segments if s.corrupt_position is not None),
                damage=self.damage,
                fsync_seconds=self._fsync_seconds.snapshot(),
                group_commit_appends=self._group_commit_appends.snapshot(),
                undecodable_batches=self._undecodable_count,
            )

    def note_undecodable(self, header: BatchHeader, error: Exception, reader: str) -> None:
        """A reader (`reader` names it) skips the stored batch of `header`: its CRC
        holds but its records do not decode (`error`: a RecordFramingError, or a codec
        nodi does not decode). Counted and logged once per batch (the first
        UNDECODABLE_REMEMBERED_MAX batches; each meeting after that)."""
        with self._lock:
            if header.base_offset in self._undecodable:
                return
            if len(self._undecodable) < UNDECODABLE_REMEMBERED_MAX:
                self._undecodable.add(header.base_offset)
            self._undecodable_count += 1
        logger.warning(
            "%s: readers skip offsets %d..%d: the stored batch does not decode (%s); met by %s. It was "
            "written before produce checked records; `nodi segments verify` lists such batches",
            self.directory,
            header.base_offset,
            header.last_offset,
            error,
            reader,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failed(self) -> bool:
        """Whether the log refuses writes (a sticky error, or damage found at open)."""
        return self._error is not None

    @property
    def busy(self) -> bool:
        """Whether an fsync is queued or running, or a caller waits for one: a log the
        store must not close for being idle."""
        with self._lock:
            return self._fsync_job_pending or self._fsync_running or bool(self._waiters)

    def close(self) -> None:
        """Clean close: fsync, write indexes and checkpoint, then the clean-shutdown
        marker, so the next open needs no scan. After a sticky error, close without it.
        A log unchanged since a clean start still has its marker and writes nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # A queued fsync job finds the log closed and does nothing; a running one
            # is waited for, so no pool work is left on a closed file.
            deadline = time.monotonic() + self.config.durable_wait_timeout_ms / 1000
            while self._fsync_running and time.monotonic() < deadline:
                self._condition.wait(timeout=deadline - time.monotonic())
        if self._fsync_interval_s is not None and self._fsync_pool is not None:
            self._fsync_pool.cancel_timed(self._run_fsync_job)  # not held for up to an interval
        active = self._segments[-1]
        if self._error is None and not self._clean_shutdown_marked:
            try:
                self._sync_segment(active)
                self._advance_durable(self._next_offset)
                active.write_indexes()
                self._write_producer_snapshot_locked()
                write_checkpoint(self.fs, self.directory, Checkpoint(self._next_offset, self.log_start_offset))
                mark_clean_shutdown(self.fs, self.directory)
            except OSError as error:
                with self._lock:
                    self._fail_locked(LogReadOnlyError(f"clean close of {self.directory} failed: {error}"))
        with self._lock:
            self._fail_waiters_locked(self._error or LogClosedError(f"log {self.directory} closed"))
        for segment in self._segments:
            segment.close()

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _IndexEntryMismatch(Exception):
    """An index entry that does not name a batch start of its segment (I7)."""


def _check_producer_batch(header: BatchHeader, position: int) -> None:
    """What a log accepts beyond a batch whose records decode: dense offsets, a codec
    readers can decode, no control batches (transactions are not supported)."""
    if header.records_count < 1 or header.last_offset_delta != header.records_count - 1:
        raise InvalidRecordError(
            f"batch at byte {position}: records_count {header.records_count} and "
            f"last_offset_delta {header.last_offset_delta} must describe dense offsets"
        )
    if header.compression not in SUPPORTED_COMPRESSION:
        raise UnsupportedCompressionError(
            f"batch at byte {position}: compression codec {header.compression} is not supported"
        )
    if header.is_control or header.is_transactional:
        raise InvalidRecordError(f"batch at byte {position}: transactional/control batches are not supported")
