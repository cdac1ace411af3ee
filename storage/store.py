"""A data directory as one thing: the metadata store plus every partition log of every
topic (docs/storage-format.md, "Data directory layout"). What the broker opens at start.

Opening runs each log's recovery, then clamps committed offsets that point past a
recovered log end (I6: the log is the truth) and reports both.

Deleting a topic is all or nothing (I16 in docs/fault-model.md). One LMDB transaction
is the commit point: it removes the topic and its groups' offsets and queue state, and
records the deletion (`deleted_topics`: the name and partition count). Before it
commits nothing has changed, on disk or in memory: a failed commit (a full disk) leaves
the topic whole and serving. After it the topic is gone, and its files go: each
partition directory is renamed to `*.deleting`, the logs directory fsynced, the
deletion record dropped, then the renamed directories removed. A crash or an I/O error
at any of those steps leaves files that the next open removes: the directories a
deletion record names (the steps are run again), and every `*.deleting` directory
(renamed only after the commit, so never a live partition). A topic of the same name
cannot be created before its old directories are gone (create finishes the deletion
first).
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .checkpoint import CLEAN_SHUTDOWN_FILE, read_checkpoint
from .config import FsyncPolicy, LogConfig
from .errors import (
    FileLimitTooLowError,
    LogClosedError,
    NodiError,
    PartitionNotReadyError,
    PartitionOpenError,
    TopicExistsError,
    UnknownTopicError,
)
from .file_budget import (
    FILES_LIMIT_MIN,
    OPEN_FILES_MIN,
    BudgetedFileSystem,
    FileBudget,
    files_soft_limit,
    open_files_max_for,
)
from .fileio import OS_FILE_SYSTEM, FileSystem
from .fsync_pool import FSYNC_WORKERS_DEFAULT, FsyncPool, check_fsync_workers_max
from .layout import iter_partition_directories, logs_directory, partition_directory
from .lock import DataDirectoryLock
from .log import DeletedSegment, Log
from .metadata import ClampedOffset, MetadataStore, TopicConfig
from .recovery import RecoveryReport
from .topic_settings import TIMESTAMP_TYPE_LOG_APPEND

# A partition directory of a deleted topic being removed: renamed to this suffix first
# (after the deletion committed), so a crash in the middle of its removal leaves nothing
# that looks like a live partition; every start removes them.
DELETING_SUFFIX = ".deleting"
# Opening the data directory's logs (recovery included), and closing them, waits at most
# this long.
STORE_OPEN_TIMEOUT_S = 3600.0
STORE_CLOSE_TIMEOUT_S = 3600.0
# The log end a damaged partition gives the clamp of committed offsets: none is above it.
NO_CLAMP_OFFSET = 2**63 - 1
# Threads of a background open (Store.open(open_in_background=True)): the partitions are
# opened by these, not by the fsync pool, whose workers serve the produces meanwhile.
# An open is mostly Python (held by the GIL): more threads take the loop's share of it.
PARTITION_OPENERS_MAX = 2
# A caller that needs a partition another thread is opening (Store.log with
# recover_now, a topic deletion, close) waits at most this long for it.
PARTITION_OPEN_WAIT_S = 600.0
# Clean partitions stay registered, not open, until something uses them (issue 18).
# Retention and compaction still reach the ones never used: each apply_retention()
# opens at most this many of them whose directory holds more than one segment (a
# single, active segment is never deleted by retention nor compacted), so a sweep
# costs at most about this many clean opens (each well under a millisecond).
DORMANT_OPENS_PER_SWEEP_MAX = 200
# close_idle(): at most this many logs closed per call, one after the other (one
# unchanged since it opened writes nothing; a changed one makes a few fsyncs).
IDLE_CLOSES_PER_SWEEP_MAX = 500

logger = logging.getLogger("nodi.storage")


def log_config_for(topic: TopicConfig) -> LogConfig:
    return LogConfig(
        segment_bytes=topic.segment_bytes,
        segment_ms=topic.segment_ms,
        fsync_policy=FsyncPolicy(topic.fsync_policy),
        fsync_interval_ms=topic.fsync_interval_ms,
        retention_ms=topic.retention_ms if "delete" in topic.cleanup_policy else None,
        retention_bytes=topic.retention_bytes if "delete" in topic.cleanup_policy else None,
        dense_offsets="compact" not in topic.cleanup_policy,
        log_append_time=topic.timestamp_type == TIMESTAMP_TYPE_LOG_APPEND,
    )


@dataclass(frozen=True, slots=True)
class StoreOpenReport:
    recoveries: tuple[RecoveryReport, ...]
    clamped_offsets: tuple[ClampedOffset, ...]
    # Partition directories on disk that no topic in the metadata claims; left alone.
    orphan_directories: tuple[str, ...]
    removed_directories: tuple[str, ...] = ()
    duration_ms: float = 0.0
    # Deleted topics whose files this open removed (a deletion a crash interrupted).
    finished_deletions: tuple[str, ...] = ()
    # Deleted topics whose files could not be removed (retried at the next open).
    unfinished_deletions: tuple[str, ...] = ()

    @property
    def damaged(self) -> tuple[RecoveryReport, ...]:
        """The partitions opened damaged (G4): served up to the damage, read-only."""
        return tuple(report for report in self.recoveries if report.damage is not None)

    def error_lines(self) -> list[str]:
        """One line per damaged partition (file, byte position, offset, what to do)."""
        return [report.describe() for report in self.damaged]

    def lines(self) -> list[str]:
        """What else the open did that an operator should hear of (error_lines aside)."""
        out = [
            report.describe()
            for report in self.recoveries
            if report.damage is None and (not report.clean_shutdown or report.lost_anything)
        ]
        for clamped in self.clamped_offsets:
            target = "dropped (partition gone)" if clamped.new_offset is None else f"clamped to {clamped.new_offset}"
            out.append(
                f"group {clamped.group!r} {clamped.topic}-{clamped.partition}: committed offset "
                f"{clamped.old_offset} beyond the recovered log, {target}"
            )
        out.extend(f"orphan partition directory (no such topic): {path}" for path in self.orphan_directories)
        out.extend(
            f"deleted topic {name}: its partition directories removed (the deletion was interrupted)"
            for name in self.finished_deletions
        )
        out.extend(f"deleted topic {reason}" for reason in self.unfinished_deletions)
        return out


class _SlotState(enum.Enum):
    PENDING = "pending"  # registered, not opened (a background open)
    OPENING = "opening"  # one thread is opening it
    OPEN = "open"
    CLOSING = "closing"  # idle: its log is being closed, then PENDING (clean) again
    FAILED = "failed"  # Log.open raised: the partition serves nothing (PartitionOpenError)
    GONE = "gone"  # its topic was deleted, or the store closed before it opened


class _Slot:
    """One partition of a topic: its log once opened. State changes under Store._lock;
    `log` is set once, with the state OPEN, after the on_partition_opened hook ran.

    A clean slot PENDING and not hurried is dormant: registered, its files untouched
    since their clean close, opened on first use; `summary` and `segment_files` cache
    what is read of it meanwhile (its directory does not change while it is dormant)."""

    __slots__ = (
        "topic",
        "partition",
        "config",
        "state",
        "log",
        "clean",
        "error",
        "hurried",
        "summary",
        "segment_files",
        "last_used",
        "cleanup_after_ms",
    )

    def __init__(self, topic: str, partition: int, config: TopicConfig, log: Log | None = None) -> None:
        self.topic = topic
        self.partition = partition
        self.config = config
        self.state = _SlotState.PENDING if log is None else _SlotState.OPEN
        self.log = log
        # The clean-shutdown marker was there at the store's open: opening it reads no
        # more than its checkpoint covers (cheap, done on first use by the caller).
        self.clean = False
        self.error: PartitionOpenError | None = None
        # Moved to the front of the background open by a request (_hurry_locked).
        self.hurried = False
        # While not open: its offsets from the checkpoint, read once (partition_summary).
        self.summary: PartitionSummary | None = None
        # While not open: how many segment files its directory holds (read once).
        self.segment_files: int | None = None
        # time.monotonic() of the last log()/opened_log() that asked for it.
        self.last_used = time.monotonic()
        # After an idle close: retention need not look at it before this time (ms of
        # the store's clock; inf: not while it stays closed). None: unknown.
        self.cleanup_after_ms: float | None = None


@dataclass
class _Topic:
    config: TopicConfig
    slots: list[_Slot] = field(default_factory=list)

    def opened(self) -> list[tuple[int, Log]]:
        return [(slot.partition, slot.log) for slot in self.slots if slot.log is not None]


@dataclass(frozen=True, slots=True)
class PartitionSummary:
    """A partition's offsets (Store.partition_summary), read without opening it."""

    log_start_offset: int
    log_end_offset: int
    # What consumers may read: the durable end under fsync `always`.
    high_watermark: int
    # None while the partition is not open (its files are not looked at).
    byte_count: int | None
    segment_count: int | None


@dataclass(frozen=True, slots=True)
class PartitionOpenStatistics:
    """How far a background open of the partitions has come (Store.open_statistics)."""

    partitions: int
    # Registered and not open (a clean one stays so until first used; pending or
    # being opened), and of those the ones whose clean-shutdown marker was missing
    # (recovered by the background open: scanned past their checkpoint).
    not_open: int
    not_open_unclean: int
    failed: int
    # Opened on first use: by a request (in its thread, or hurried to an opener
    # thread) or by the retention sweep (DORMANT_OPENS_PER_SWEEP_MAX).
    opened_on_demand: int
    # Requests answered "not ready, retry" (PartitionNotReadyError).
    not_ready_refusals: int
    # Seconds the background recovery of the unclean partitions has taken (so far,
    # or in all when done; 0 before it starts).
    background_seconds: float
    background_done: bool
    # Partitions open now (a log being closed as idle counts until its close is done).
    open: int = 0
    # Of opened_on_demand, those the retention sweep opened (never used since the start).
    opened_for_cleanup: int = 0
    # Logs closed for being idle (close_idle), since the store opened.
    idle_closed: int = 0


class Store:
    """Use Store.open(data_dir). Thread-safe for topic admin; logs are thread-safe."""

    def __init__(
        self,
        data_dir: str,
        metadata: MetadataStore,
        clock_ms: Callable[[], int],
        fs: FileSystem = OS_FILE_SYSTEM,
        lock: DataDirectoryLock | None = None,
        fsync_workers_max: int = FSYNC_WORKERS_DEFAULT,
        open_files_max: int = OPEN_FILES_MIN,
    ) -> None:
        self.data_dir = data_dir
        # Every partition's files, under one limit of open descriptors
        # (storage/file_budget.py): the least recently used are closed.
        self.file_budget = FileBudget(open_files_max)
        self._log_fs = BudgetedFileSystem(OS_FILE_SYSTEM, self.file_budget)
        # Every partition log's fsyncs, and the logs' clean closes, run on these few
        # threads (storage/fsync_pool.py); close() stops them.
        self.fsync_pool = FsyncPool(fsync_workers_max)
        self.metadata = metadata
        self._directory_lock = lock
        self._clock_ms = clock_ms
        # The file operations of a topic deletion (a test injects faults here).
        self.fs = fs
        self._topics: dict[str, _Topic] = {}
        self._lock = threading.Lock()
        # Notified (under _lock) whenever a partition's opening ends: OPEN, FAILED or GONE.
        self._opening_ended = threading.Condition(self._lock)
        # Serialises topic creation and deletion (their metadata commit and files).
        self._admin_lock = threading.Lock()
        self.open_report = StoreOpenReport((), (), ())
        # A background open (open_in_background): the slots still to open, the ones
        # found unclean first; the threads opening them.
        self._pending: collections.deque[_Slot] = collections.deque()
        self._openers: list[threading.Thread] = []
        self._openers_running = 0
        self._closing = False
        self._background_started: float | None = None
        self._background_ended: float | None = None
        self._opened_on_demand = 0
        self._opened_for_cleanup = 0
        self._idle_closed = 0
        # id(log) -> holders (pin()): such a log is not closed for being idle.
        self._pinned: dict[int, int] = {}
        self._not_ready_refusals = 0
        self._registered = False  # the partitions were registered, not opened (a background open)
        self._registered_unclean = 0
        # Called with (topic, partition, log) in the thread that opened the log, before
        # the log is handed to anyone (a background open only): the broker's per-partition
        # preparation (watchers, publish dedup). An exception fails the partition's open.
        self.on_partition_opened: Callable[[str, int, Log], None] | None = None
        # Called by close_idle() with (topic, partition, log) once nobody can get the
        # log from the store any more: False keeps it open (the broker has a reader
        # waiting on it); True, and the caller has let go of it (no listener left).
        self.on_partition_closing: Callable[[str, int, Log], bool] | None = None

    @classmethod
    def open(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        clock_ms: Callable[[], int] | None = None,
        fs: FileSystem = OS_FILE_SYSTEM,
        fsync_workers_max: int = FSYNC_WORKERS_DEFAULT,
        open_files_max: int | None = None,
        lock: DataDirectoryLock | None = None,
        open_in_background: bool = False,
    ) -> Store:
        """Take the data directory's lock (DataDirectoryLockedError, having touched
        nothing, when another process holds it), then open the metadata (a damaged
        metadata file is refused before anything changes) and every log. At most
        `fsync_workers_max` threads run the logs' fsyncs, and the partitions keep at
        most `open_files_max` files open (None: sized from RLIMIT_NOFILE;
        FileLimitTooLowError when that is below FILES_LIMIT_MIN). `lock`: the directory's
        lock, taken by the caller beforehand (the embedded mode binds its attach socket in
        between); the store owns it from here on, and releases it when the open fails.

        `open_in_background`: register the partitions without opening them (a look for
        each one's clean-shutdown marker; committed offsets are held to the checkpoints
        of clean ones, I6); start_background_open() then recovers the unclean ones on
        PARTITION_OPENERS_MAX threads, and log() opens a clean one at once on first use
        (PartitionNotReadyError for one still being recovered). A clean partition
        nothing uses stays registered: its files are not opened (issue 18). The open
        report then holds no recoveries: each is logged as its partition opens."""
        check_fsync_workers_max(fsync_workers_max)
        if open_files_max is None:
            soft_limit = files_soft_limit()
            open_files_max = open_files_max_for(soft_limit)
            if open_files_max < OPEN_FILES_MIN:
                raise FileLimitTooLowError(soft_limit, FILES_LIMIT_MIN)
        started = time.monotonic()
        data_dir = os.fspath(data_dir)
        clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        if lock is None:
            lock = DataDirectoryLock.acquire(data_dir)
        assert lock.held, "a released lock"
        assert os.path.samefile(lock.data_dir, data_dir), "the lock of another directory"
        try:
            metadata = MetadataStore(data_dir)
        except BaseException:
            lock.release()
            raise
        store = cls(data_dir, metadata, clock_ms, fs, lock, fsync_workers_max, open_files_max)
        try:
            os.makedirs(logs_directory(data_dir), exist_ok=True)
            removed = _remove_half_deleted(data_dir)
            finished, unfinished = store._finish_deletions()
            topics = sorted(store.metadata.list_topics().items())
            if open_in_background:
                recoveries = []
                store._register_logs(topics)
                clamped = store.metadata.clamp_offsets(store._registered_end_offset)
            else:
                recoveries = store._open_logs(topics)
                clamped = store.metadata.clamp_offsets(store._log_end_offset)
            orphans = tuple(
                entry.path
                for entry in iter_partition_directories(data_dir)
                if entry.topic not in store._topics or entry.partition >= store._topics[entry.topic].config.partitions
            )
        except BaseException:
            store.close()
            raise
        store.open_report = StoreOpenReport(
            tuple(recoveries),
            tuple(clamped),
            orphans,
            removed,
            (time.monotonic() - started) * 1000,
            finished,
            unfinished,
        )
        return store

    def _open_logs(self, topics: list[tuple[str, TopicConfig]]) -> list[RecoveryReport]:
        """Open (recover) every partition log of `topics` into self._topics; their
        recovery reports in topic and partition order."""
        opened = iter(
            self._open_partition_logs(
                [(name, config, partition) for name, config in topics for partition in range(config.partitions)]
            )
        )
        reports: list[RecoveryReport] = []
        for name, config in topics:
            topic = _Topic(config)
            for partition, log in enumerate(itertools.islice(opened, config.partitions)):
                topic.slots.append(_Slot(name, partition, config, log))
                reports.append(log.recovery_report)
            self._topics[name] = topic
        return reports

    def _register_logs(self, topics: list[tuple[str, TopicConfig]]) -> None:
        """A slot per partition of `topics`, none opened: the ones without a
        clean-shutdown marker queued for the background open (recovery); the clean
        ones stay registered until first use."""
        unclean: list[_Slot] = []
        for name, config in topics:
            topic = _Topic(config)
            for partition in range(config.partitions):
                slot = _Slot(name, partition, config)
                directory = partition_directory(self.data_dir, name, partition)
                slot.clean = os.path.exists(os.path.join(directory, CLEAN_SHUTDOWN_FILE))
                if not slot.clean:
                    unclean.append(slot)
                topic.slots.append(slot)
            self._topics[name] = topic
        self._pending.extend(unclean)
        self._registered_unclean = len(unclean)
        self._registered = True

    def _registered_end_offset(self, topic: str, partition: int) -> int | None:
        """clamp_offsets at a background open: a clean partition ends where its
        checkpoint says (a clean close wrote it with the log end, and nothing changed
        since); an unclean one is held to its log when it opens (_prepare_opened)."""
        entry = self._topics.get(topic)
        if entry is None or partition >= len(entry.slots):
            return None
        slot = entry.slots[partition]
        if not slot.clean:
            return NO_CLAMP_OFFSET
        summary = self._dormant_summary(slot)
        return NO_CLAMP_OFFSET if summary is None else summary.log_end_offset

    def _open_partition_logs(self, specs: list[tuple[str, TopicConfig, int]]) -> list[Log]:
        """Log.open of every (topic, config, partition), in parallel on the fsync pool
        (recovery and creation wait on reads and directory fsyncs), in order. The first
        error is raised after every open has ended, the logs that did open closed."""
        opened: list[Log | None] = [None] * len(specs)

        def opener(number: int, name: str, config: TopicConfig, partition: int) -> Callable[[], None]:
            def run() -> None:
                opened[number] = Log.open(
                    partition_directory(self.data_dir, name, partition),
                    log_config_for(config),
                    fs=self._log_fs,
                    clock_ms=self._clock_ms,
                    fsync_pool=self.fsync_pool,
                )

            return run

        errors = self.fsync_pool.run_all(
            [opener(number, *spec) for number, spec in enumerate(specs)], timeout_s=STORE_OPEN_TIMEOUT_S
        )
        logs = [log for log in opened if log is not None]
        if errors:
            for log in logs:
                log.close()
            raise errors[0]
        return logs

    def _finish_deletions(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Remove the directories of every deletion record (deletions a crash or an I/O
        error interrupted); (finished, unfinished with the reason)."""
        finished, unfinished = [], []
        topics = self.metadata.list_topics()
        for name, partitions in sorted(self.metadata.topic_deletions().items()):
            if name in topics:  # never made by nodi (create finishes a deletion first)
                unfinished.append(f"{name}: a deletion record beside a live topic of that name; its files are kept")
                continue
            try:
                self._remove_deleted(name, partitions)
            except (OSError, NodiError) as error:
                unfinished.append(f"{name}: removing its files failed, retried at the next start: {error}")
            else:
                finished.append(name)
        return tuple(finished), tuple(unfinished)

    def _log_end_offset(self, topic: str, partition: int) -> int | None:
        entry = self._topics.get(topic)
        if entry is None or partition >= len(entry.slots):
            return None
        partition_log = entry.slots[partition].log
        assert partition_log is not None, "an eager open opened every log"
        if partition_log.damage is not None:
            # Committed offsets past the damage stay until the repair decides (a restore
            # brings the offsets back): no committed offset is above this.
            return NO_CLAMP_OFFSET
        return partition_log.next_offset

    # -- topics ---------------------------------------------------------------------

    def create_topic(self, name: str, config: TopicConfig = TopicConfig()) -> None:
        """Metadata first, then the partition logs: a crash in between leaves a topic
        whose logs the next open creates empty. The files of a deleted topic of the same
        name that are still there are removed first (never inherited)."""
        config.validate()
        with self._admin_lock:
            with self._lock:
                if name in self._topics:
                    raise TopicExistsError(f"topic {name!r} already exists")
            deleted_partitions = self.metadata.topic_deletions().get(name)
            if deleted_partitions is not None:
                self._remove_deleted(name, deleted_partitions)
            self.metadata.create_topic(name, config)
            topic = _Topic(config)
            logs = self._open_partition_logs([(name, config, partition) for partition in range(config.partitions)])
            topic.slots.extend(_Slot(name, partition, config, log) for partition, log in enumerate(logs))
            with self._lock:
                self._topics[name] = topic

    def delete_topic(self, name: str) -> None:
        """All or nothing (the module docstring): the metadata commit first, then the
        files. An error before the commit (a full disk: MetadataDiskFullError) leaves the
        topic whole and serving; after it the deletion has happened, and files that
        could not be removed now are removed by the next open."""
        with self._admin_lock:
            with self._lock:
                topic = self._topics.get(name)
            if topic is None:
                raise UnknownTopicError(f"topic {name!r} does not exist")
            self.metadata.delete_topic(name)  # the commit point
            with self._lock:
                self._topics.pop(name, None)
                for slot in topic.slots:
                    if slot.state is _SlotState.PENDING:
                        slot.state = _SlotState.GONE
            # A partition being opened now is left to its opener; its log is closed below
            # and its files renamed only after that.
            for slot in topic.slots:
                if not self._wait_opening_ended(slot):
                    raise PartitionNotReadyError(f"topic {name!r}: partition {slot.partition} still opening")
            for _, log in topic.opened():
                try:
                    log.close()
                except (OSError, NodiError):  # its files are removed anyway
                    pass
            try:
                doomed = self._remove_deleted(name, topic.config.partitions, remove_now=False)
            except (OSError, NodiError):  # the deletion record stays: the next open finishes it
                return
        for path in doomed:  # renamed aside and no longer recorded: removed at every start if not now
            try:
                _remove_tree(self.fs, path)
            except OSError:
                pass

    def _remove_deleted(self, topic: str, partitions: int, *, remove_now: bool = True) -> list[str]:
        """The steps after a deletion's commit, each safe to run again: rename the
        partition directories aside, fsync the logs directory, drop the deletion record,
        then (remove_now) remove the renamed directories. Returns those directories."""
        logs = logs_directory(self.data_dir)
        suffix = f".{self._clock_ms()}{DELETING_SUFFIX}"
        doomed = []
        for partition in range(partitions):
            path = partition_directory(self.data_dir, topic, partition)
            if self.fs.exists(path):
                self.fs.rename(path, path + suffix)
                doomed.append(path + suffix)
        if doomed:
            self.fs.sync_directory(logs)
        self.metadata.finish_topic_deletion(topic)
        if remove_now:
            for path in doomed:
                _remove_tree(self.fs, path)
        return doomed

    def topics(self) -> dict[str, TopicConfig]:
        with self._lock:
            return {name: topic.config for name, topic in self._topics.items()}

    def topic_config(self, name: str) -> TopicConfig | None:
        """One topic's settings, or None (topics() copies the whole table)."""
        with self._lock:
            entry = self._topics.get(name)
            return None if entry is None else entry.config

    def log(self, topic: str, partition: int, *, recover_now: bool = False) -> Log:
        """The partition's log. After a background open, one not yet opened is opened
        now in the calling thread when it was closed cleanly (its open reads only what
        its checkpoint and indexes name); one being recovered (or opened by another
        thread) is PartitionNotReadyError, and moves to the front of the background
        open, unless `recover_now`: then it is opened (scanned) here, or waited for."""
        entry = self._topics.get(topic)
        if entry is None:
            raise UnknownTopicError(f"topic {topic!r} does not exist")
        if not 0 <= partition < len(entry.slots):
            raise UnknownTopicError(f"topic {topic!r} has no partition {partition}")
        slot = entry.slots[partition]
        slot.last_used = time.monotonic()  # before reading slot.log: close_idle checks it after clearing it
        log = slot.log
        if log is not None:
            return log
        return self._open_on_demand(slot, recover_now)

    def opened_log(self, topic: str, partition: int) -> Log | None:
        """The partition's log if it is open, else None (never opens it here: a
        pending one moves to the front of the background open). For callers that visit
        many partitions and may skip one for now (a queue group's partitions)."""
        entry = self._topics.get(topic)
        if entry is None or not 0 <= partition < len(entry.slots):
            return None
        slot = entry.slots[partition]
        slot.last_used = time.monotonic()
        log = slot.log
        if log is None:
            with self._lock:
                self._hurry_locked(slot)
        return log

    def recovering(self, topic: str, partition: int) -> bool:
        """Whether the partition was not closed cleanly and is not open yet: what it
        holds, and so the committed offsets held to it (I6), is known only once it is."""
        entry = self._topics.get(topic)
        if entry is None or not 0 <= partition < len(entry.slots):
            return False
        slot = entry.slots[partition]
        return slot.log is None and not slot.clean and slot.state in (_SlotState.PENDING, _SlotState.OPENING)

    def partition_summary(self, topic: str, partition: int) -> PartitionSummary:
        """The partition's offsets without opening it: an open log's own; one not open
        yet, its checkpoint's (a clean close wrote the log end and start there; for one
        being recovered, the recovery point: the durable prefix the scan starts from, a
        lower bound of its end). Sizes are None until it is open. A partition with no
        readable checkpoint is opened (log()) to say."""
        entry = self._topics.get(topic)
        if entry is None:
            raise UnknownTopicError(f"topic {topic!r} does not exist")
        if not 0 <= partition < len(entry.slots):
            raise UnknownTopicError(f"topic {topic!r} has no partition {partition}")
        slot = entry.slots[partition]
        log = slot.log
        if log is None:
            summary = self._dormant_summary(slot)
            if summary is not None and slot.log is None:
                return summary
            log = self.log(topic, partition)
        statistics = log.statistics()
        return PartitionSummary(
            statistics.log_start_offset,
            statistics.next_offset,
            log.readable_end_offset,
            statistics.byte_count,
            statistics.segment_count,
        )

    def _dormant_summary(self, slot: _Slot) -> PartitionSummary | None:
        """A partition not open: its checkpoint's offsets (None without a readable
        one), read once and kept while it stays not open (its files do not change);
        one closed for being idle: its log's last figures, sizes included."""
        summary = slot.summary
        if summary is None:
            checkpoint = read_checkpoint(self._log_fs, partition_directory(self.data_dir, slot.topic, slot.partition))
            if checkpoint is None:
                return None
            end = checkpoint.recovery_offset
            summary = PartitionSummary(min(checkpoint.log_start_offset, end), end, end, None, None)
            with self._lock:
                # An unclean one's recovery point is a lower bound until it is recovered.
                if slot.clean and slot.state is _SlotState.PENDING and slot.summary is None:
                    slot.summary = summary
        return summary

    # -- closing idle partitions ------------------------------------------------------

    def pin(self, log: Log) -> bool:
        """Hold `log` open (close_idle leaves it) until unpin(); False, and nothing
        held, when it was closed already (the caller gets it again from log())."""
        with self._lock:
            if log.closed:
                return False
            self._pinned[id(log)] = self._pinned.get(id(log), 0) + 1
            return True

    def unpin(self, log: Log) -> None:
        with self._lock:
            left = self._pinned.get(id(log), 0) - 1
            if left > 0:
                self._pinned[id(log)] = left
            else:
                self._pinned.pop(id(log), None)

    def close_idle(self, idle_s: float, closes_max: int = IDLE_CLOSES_PER_SWEEP_MAX) -> int:
        """Close cleanly up to `closes_max` partition logs nothing asked for (log(),
        opened_log()) in `idle_s` seconds, and none that is pinned, damaged or
        read-only, has an fsync queued, running or waited for, or that the
        on_partition_closing hook keeps (a reader waiting). Each goes back to
        registered, as a clean partition after a start: its marker written, its files
        and buffers released, opened again on next use. Returns how many closed."""
        cutoff = time.monotonic() - idle_s
        claimed: list[tuple[_Slot, Log]] = []
        with self._lock:
            if self._closing:
                return 0
            for topic in self._topics.values():
                for slot in topic.slots:
                    log = slot.log
                    if len(claimed) >= closes_max:
                        break
                    if log is None or slot.state is not _SlotState.OPEN or slot.last_used > cutoff:
                        continue
                    if id(log) in self._pinned or log.failed or log.closed or log.busy:
                        continue
                    slot.summary = _summary_of(log)  # what describe says while it closes
                    slot.log, slot.state = None, _SlotState.CLOSING
                    claimed.append((slot, log))
        closing: list[tuple[_Slot, Log]] = []
        for slot, log in claimed:
            # log() sets last_used before it reads slot.log: one that got this log
            # before it was taken away above shows here.
            keep = slot.last_used > cutoff or (
                self.on_partition_closing is not None and not self.on_partition_closing(slot.topic, slot.partition, log)
            )
            if keep:
                with self._lock:
                    slot.summary = None
                    slot.log, slot.state = log, _SlotState.OPEN
                    self._opening_ended.notify_all()
            else:
                closing.append((slot, log))
        if not closing:
            return 0
        for slot, log in closing:
            # One after the other in this thread: most idle logs are unchanged since
            # they opened and write nothing; the pool's threads (and the memory each
            # new thread's allocator arena holds) are left to the produces.
            after_ms = _cleanup_after_ms(log)
            try:
                log.close()
            except (OSError, NodiError) as error:  # the log is read-only now (I9)
                logger.error("closing idle partition %s-%d failed: %s", slot.topic, slot.partition, error)
            with self._lock:
                if log.failed:  # the clean close failed: read-only until a restart recovers it (I9)
                    slot.state = _SlotState.FAILED
                    slot.error = PartitionOpenError(
                        f"partition {slot.topic}-{slot.partition}: its clean close failed; it serves nothing "
                        "until a restart"
                    )
                    logger.error("%s", slot.error)
                else:
                    slot.summary = _summary_of(log)
                    slot.segment_files = len(log.segments)
                    slot.cleanup_after_ms = after_ms
                    slot.clean, slot.hurried = True, False
                    slot.state = _SlotState.PENDING
                    self._idle_closed += 1
                self._opening_ended.notify_all()
        return len(closing)

    def high_watermark_nowait(self, topic: str, partition: int) -> int | None:
        """What consumers may read up to, without opening the partition nor moving it
        forward in the background open: an open log's readable end; one closed
        cleanly and not open, its checkpoint's end (read once, kept); None for one
        being recovered, failed, or unknown."""
        entry = self._topics.get(topic)
        if entry is None or not 0 <= partition < len(entry.slots):
            return None
        slot = entry.slots[partition]
        log = slot.log
        if log is not None:
            return log.readable_end_offset
        if not slot.clean or slot.state is not _SlotState.PENDING:
            return None
        summary = self._dormant_summary(slot)
        return None if summary is None else summary.high_watermark

    def summaries_read(self, topic: str) -> bool:
        """Whether partition_summary() of every partition of `topic` reads no file
        now (each is open or its summary is kept): a caller on an event loop may then
        call it there, else in a thread."""
        entry = self._topics.get(topic)
        if entry is None:
            return True
        return all(slot.log is not None or slot.summary is not None for slot in entry.slots)

    def open_failed(self, topic: str, partition: int) -> bool:
        """Whether the partition's open after a start failed (PartitionOpenError)."""
        entry = self._topics.get(topic)
        if entry is None or not 0 <= partition < len(entry.slots):
            return False
        return entry.slots[partition].state is _SlotState.FAILED

    def logs(self) -> list[tuple[str, int, Log]]:
        """Every opened partition log (after a background open, the partitions not yet
        opened are left out: open_statistics() counts them)."""
        with self._lock:
            return [(name, number, log) for name, topic in self._topics.items() for number, log in topic.opened()]

    def open_statistics(self) -> PartitionOpenStatistics:
        with self._lock:
            slots = [slot for topic in self._topics.values() for slot in topic.slots]
            not_open = [slot for slot in slots if slot.state in (_SlotState.PENDING, _SlotState.OPENING)]
            started, ended = self._background_started, self._background_ended
            return PartitionOpenStatistics(
                # A log being closed (idle) still holds its files and buffers: open until
                # its close is done, when idle_closed counts it (both under this lock).
                open=sum(1 for slot in slots if slot.log is not None or slot.state is _SlotState.CLOSING),
                opened_for_cleanup=self._opened_for_cleanup,
                idle_closed=self._idle_closed,
                partitions=len(slots),
                not_open=len(not_open),
                not_open_unclean=sum(1 for slot in not_open if not slot.clean),
                failed=sum(1 for slot in slots if slot.state is _SlotState.FAILED),
                opened_on_demand=self._opened_on_demand,
                not_ready_refusals=self._not_ready_refusals,
                background_seconds=0.0 if started is None else (ended or time.monotonic()) - started,
                background_done=ended is not None,
            )

    # -- opening partitions after a background open ------------------------------------

    def start_background_open(self) -> None:
        """Recover every registered partition not closed cleanly on
        PARTITION_OPENERS_MAX threads (and open those a caller hurried); close() stops
        them. Logs one line when they are done. Clean partitions stay registered."""
        with self._lock:
            if self._background_started is not None or self._closing:
                return
            self._background_started = time.monotonic()
            count = min(PARTITION_OPENERS_MAX, len(self._pending))
            if count == 0:
                self._background_ended = self._background_started
            for _ in range(count):
                self._start_opener_locked()
        if count == 0:
            self._log_background_done()

    def _start_opener_locked(self) -> None:
        """One more opener thread (the finished ones are forgotten here)."""
        self._openers = [thread for thread in self._openers if thread.is_alive()]
        thread = threading.Thread(
            target=self._open_pending, name=f"nodi-partition-opener-{len(self._openers)}", daemon=True
        )
        self._openers.append(thread)
        self._openers_running += 1
        thread.start()  # it waits for the lock the caller holds

    def _open_pending(self) -> None:
        """One opener thread: take the next pending slot and open it, until none is left."""
        try:
            while True:
                with self._lock:
                    slot = None
                    while self._pending and not self._closing:
                        candidate = self._pending.popleft()
                        if candidate.state is _SlotState.PENDING:
                            slot = candidate
                            slot.state = _SlotState.OPENING
                            if slot.clean:  # hurried by a caller (opened_log)
                                self._opened_on_demand += 1
                            break
                    if slot is None:
                        return
                try:
                    self._open_slot(slot)
                except PartitionOpenError:
                    pass  # logged, and answered to every request for the partition
        finally:
            with self._lock:
                self._openers_running -= 1
                first_end = self._openers_running == 0 and self._background_ended is None
                if first_end:
                    self._background_ended = time.monotonic()
            if first_end and self._closing:
                logger.info("partitions: the background open stopped for the close")
            elif first_end:
                self._log_background_done()

    def _log_background_done(self) -> None:
        statistics = self.open_statistics()
        logger.info(
            "partitions: %d not closed cleanly recovered after %.2f s in the background (%d failed); "
            "%d open, %d registered until first use",
            self._registered_unclean,
            statistics.background_seconds,
            statistics.failed,
            statistics.open,
            statistics.not_open,
        )

    def _open_on_demand(self, slot: _Slot, recover_now: bool) -> Log:
        with self._lock:
            state = slot.state
            if slot.log is not None:
                return slot.log
            if state is _SlotState.FAILED:
                assert slot.error is not None
                raise slot.error
            if self._closing:
                raise LogClosedError(f"partition {slot.topic}-{slot.partition}: the data directory is closing")
            if state is _SlotState.GONE:
                raise UnknownTopicError(f"topic {slot.topic!r} was deleted")
            if state is _SlotState.CLOSING and not recover_now:
                self._not_ready_refusals += 1
                raise PartitionNotReadyError(
                    f"partition {slot.topic}-{slot.partition} is being closed for being idle: retry in a moment"
                )
            claimed = state is _SlotState.PENDING and (slot.clean or recover_now)
            if claimed:
                slot.state = _SlotState.OPENING
                self._opened_on_demand += 1
            elif not recover_now:
                self._hurry_locked(slot)
                self._not_ready_refusals += 1
                raise PartitionNotReadyError(
                    f"partition {slot.topic}-{slot.partition} is not open yet (recovering after an unclean stop, "
                    "or being opened): retry in a moment"
                )
        if claimed:
            return self._open_slot(slot)
        if not self._wait_opening_ended(slot):
            raise PartitionNotReadyError(f"partition {slot.topic}-{slot.partition} still opening")
        return self._open_on_demand(slot, recover_now=False)

    def _hurry_locked(self, slot: _Slot) -> None:
        """Put a pending slot at the front of the background open, once: the queue
        holds each slot at most twice however often it is asked for. Once the start's
        background open has begun, an opener thread is started for it if none runs
        (a clean partition a queue group or publish dedup asks for)."""
        if slot.state is _SlotState.PENDING and not slot.hurried:
            slot.hurried = True
            self._pending.appendleft(slot)
            if self._background_started is not None and not self._closing and self._openers_running == 0:
                self._start_opener_locked()

    def _wait_opening_ended(self, slot: _Slot) -> bool:
        """Wait up to PARTITION_OPEN_WAIT_S while another thread opens `slot`; False
        when it still does."""
        deadline = time.monotonic() + PARTITION_OPEN_WAIT_S
        with self._lock:
            while slot.state in (_SlotState.OPENING, _SlotState.CLOSING):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._opening_ended.wait(remaining)
        return True

    def _open_slot(self, slot: _Slot) -> Log:
        """Open the log of a slot this thread claimed (OPENING; nobody else changes
        its state meanwhile), prepare it, then hand it out: OPEN, or FAILED
        (PartitionOpenError, raised)."""
        assert slot.state is _SlotState.OPENING
        directory = partition_directory(self.data_dir, slot.topic, slot.partition)
        log: Log | None = None
        try:
            log = Log.open(
                directory,
                log_config_for(slot.config),
                fs=self._log_fs,
                clock_ms=self._clock_ms,
                fsync_pool=self.fsync_pool,
            )
            self._prepare_opened(slot, log)
        except Exception as error:
            failure = PartitionOpenError(
                f"opening partition {slot.topic}-{slot.partition} ({directory}) failed: {error}"
            )
            logger.error("%s; it serves nothing until a restart", failure)
            if log is not None:
                try:
                    log.close()
                except (OSError, NodiError):
                    pass
            with self._lock:
                slot.state, slot.error = _SlotState.FAILED, failure
                self._opening_ended.notify_all()
            raise failure from error
        with self._lock:
            slot.log, slot.state = log, _SlotState.OPEN
            slot.summary = slot.segment_files = slot.cleanup_after_ms = None  # its log says from now on
            slot.last_used = time.monotonic()
            self._opening_ended.notify_all()
        return log

    def _prepare_opened(self, slot: _Slot, log: Log) -> None:
        """What a start did for each partition, done as it opens: report a recovery
        that was not clean, hold committed offsets to a log that was recovered (I6),
        then the caller's hook."""
        report = log.recovery_report
        if report.damage is not None:
            logger.error("%s", report.describe())
        elif not report.clean_shutdown or report.lost_anything:
            logger.warning("%s", report.describe())
        if not report.clean_shutdown or report.damage is not None:
            end = NO_CLAMP_OFFSET if log.damage is not None else log.next_offset
            target = (slot.topic, slot.partition)
            for clamped in self.metadata.clamp_offsets(
                lambda topic, partition: end if (topic, partition) == target else NO_CLAMP_OFFSET
            ):
                logger.warning(
                    "group %r %s-%d: committed offset %d beyond the recovered log, clamped to %s",
                    clamped.group,
                    clamped.topic,
                    clamped.partition,
                    clamped.old_offset,
                    clamped.new_offset,
                )
        if self.on_partition_opened is not None:
            self.on_partition_opened(slot.topic, slot.partition, log)

    # -- background work ------------------------------------------------------------

    def apply_retention(self, now_ms: int | None = None) -> dict[tuple[str, int], list[DeletedSegment]]:
        """Retention on every open log, then on up to DORMANT_OPENS_PER_SWEEP_MAX
        partitions never used since the start that it may concern (open_for_cleanup);
        those stay open, so the compaction job sees them too."""
        deleted = {}
        for name, partition, log in self.logs() + self.open_for_cleanup():
            removed = log.apply_retention(now_ms)
            if removed:
                deleted[(name, partition)] = removed
        return deleted

    def open_for_cleanup(self, opens_max: int = DORMANT_OPENS_PER_SWEEP_MAX) -> list[tuple[str, int, Log]]:
        """Open up to `opens_max` partitions not open since the start (registered,
        closed cleanly) that retention or compaction may act on: of a topic with a
        retention limit or compaction, whose directory holds more than one segment
        (the active segment is neither deleted nor compacted). Each directory is
        listed once while it stays not open (nothing changes it meanwhile)."""
        with self._lock:
            candidates = [
                slot
                for topic in self._topics.values()
                if _cleanup_applies(topic.config)
                for slot in topic.slots
                if slot.state is _SlotState.PENDING and slot.clean and not slot.hurried
            ]
        opened: list[tuple[str, int, Log]] = []
        for slot in candidates:
            if len(opened) >= opens_max:
                break
            if slot.segment_files is None:
                directory = partition_directory(self.data_dir, slot.topic, slot.partition)
                try:
                    names = self._log_fs.list_directory(directory)
                except OSError:
                    names = []  # opened (and its error reported) when first used
                slot.segment_files = sum(1 for name in names if name.endswith(".log"))
            if slot.segment_files <= 1 or slot.log is not None:
                continue
            if slot.cleanup_after_ms is not None and self._clock_ms() < slot.cleanup_after_ms:
                continue  # closed for being idle with nothing for retention to do before then
            try:
                log = self.log(slot.topic, slot.partition)
            except NodiError:  # failed (logged), deleted, or another thread opens it now
                continue
            with self._lock:
                self._opened_for_cleanup += 1
            opened.append((slot.topic, slot.partition, log))
        return opened

    def close(self) -> None:
        """Stop a background open (a partition being opened is finished), then close
        every opened log; a partition never opened is never written to."""
        with self._lock:
            self._closing = True
            openers, self._openers = self._openers, []
        for thread in openers:
            thread.join(PARTITION_OPEN_WAIT_S)
        with self._lock:
            topics, self._topics = self._topics, {}
            for topic in topics.values():
                for slot in topic.slots:
                    if slot.state is _SlotState.PENDING:
                        slot.state = _SlotState.GONE
        for topic in topics.values():
            for slot in topic.slots:
                self._wait_opening_ended(slot)  # an open on demand in another thread
        try:
            # In parallel on the pool: each clean close makes several fsyncs (segment,
            # indexes, snapshot, checkpoint, marker), and the file system joins
            # concurrent ones into one journal commit.
            errors = self.fsync_pool.run_all(
                [log.close for topic in topics.values() for _, log in topic.opened()], timeout_s=STORE_CLOSE_TIMEOUT_S
            )
            if errors:
                raise errors[0]
            self.metadata.close()
        finally:
            self.fsync_pool.stop()
            if self._directory_lock is not None:
                self._directory_lock.release()  # last: every file is closed and marked

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _summary_of(log: Log) -> PartitionSummary:
    segments = log.segments
    return PartitionSummary(
        log.log_start_offset,
        log.next_offset,
        log.readable_end_offset,
        sum(segment.size for segment in segments),
        len(segments),
    )


def _cleanup_after_ms(log: Log) -> float:
    """When retention may next act on `log` if nothing changes it (its files stay as
    they are while it is closed): now for a log over retention_bytes, the oldest sealed
    segment's expiry under retention_ms, never for a single segment or a compacted log
    (compaction had its runs while it was open)."""
    segments = log.segments
    config = log.config
    if len(segments) <= 1 or not config.dense_offsets:
        return math.inf
    due = math.inf
    if config.retention_bytes is not None:
        total = sum(segment.size for segment in segments)
        if total - segments[0].size >= config.retention_bytes:
            due = 0.0
    if config.retention_ms is not None:
        due = min(due, segments[0].max_timestamp + config.retention_ms)
    return due


def _cleanup_applies(config: TopicConfig) -> bool:
    """Whether retention or compaction may remove anything of the topic's logs."""
    log_config = log_config_for(config)
    return log_config.retention_ms is not None or log_config.retention_bytes is not None or not log_config.dense_offsets


def _remove_tree(fs: FileSystem, path: str) -> None:
    """Unlink every file under `path`, then the directories, deepest first."""
    for name in fs.list_directory(path):
        child = os.path.join(path, name)
        try:
            fs.unlink(child)
        except IsADirectoryError:
            _remove_tree(fs, child)
    fs.remove_directory(path)


def _remove_half_deleted(data_dir: str) -> tuple[str, ...]:
    root = logs_directory(data_dir)
    removed = []
    for name in sorted(os.listdir(root)):
        if name.endswith(DELETING_SUFFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return tuple(removed)
