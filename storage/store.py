"""A data directory as one thing: the metadata store plus every partition log of every
topic (docs/storage-format.md, "Data directory layout"). What the broker opens at start.

Opening runs each log's recovery, then clamps committed offsets that point past a
recovered log end (I6: the log is the truth) and reports both.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import FsyncPolicy, LogConfig
from .errors import TopicExistsError, UnknownTopicError
from .fileio import OS_FILE_SYSTEM
from .fsync_pool import FSYNC_WORKERS_DEFAULT, FsyncPool, check_fsync_workers_max
from .layout import iter_partition_directories, logs_directory, partition_directory
from .lock import DataDirectoryLock
from .log import DeletedSegment, Log
from .metadata import ClampedOffset, MetadataStore, TopicConfig
from .recovery import RecoveryReport

# A partition directory being removed: renamed to this suffix first, so a crash in the
# middle of a topic deletion leaves nothing that looks like a live partition.
DELETING_SUFFIX = ".deleting"


def log_config_for(topic: TopicConfig) -> LogConfig:
    return LogConfig(
        segment_bytes=topic.segment_bytes,
        segment_ms=topic.segment_ms,
        fsync_policy=FsyncPolicy(topic.fsync_policy),
        fsync_interval_ms=topic.fsync_interval_ms,
        retention_ms=topic.retention_ms if "delete" in topic.cleanup_policy else None,
        retention_bytes=topic.retention_bytes if "delete" in topic.cleanup_policy else None,
        dense_offsets="compact" not in topic.cleanup_policy,
    )


@dataclass(frozen=True, slots=True)
class StoreOpenReport:
    recoveries: tuple[RecoveryReport, ...]
    clamped_offsets: tuple[ClampedOffset, ...]
    # Partition directories on disk that no topic in the metadata claims; left alone.
    orphan_directories: tuple[str, ...]
    removed_directories: tuple[str, ...] = ()
    duration_ms: float = 0.0

    def lines(self) -> list[str]:
        out = [report.describe() for report in self.recoveries if not report.clean_shutdown or report.lost_anything]
        for clamped in self.clamped_offsets:
            target = "dropped (partition gone)" if clamped.new_offset is None else f"clamped to {clamped.new_offset}"
            out.append(
                f"group {clamped.group!r} {clamped.topic}-{clamped.partition}: committed offset "
                f"{clamped.old_offset} beyond the recovered log, {target}"
            )
        out.extend(f"orphan partition directory (no such topic): {path}" for path in self.orphan_directories)
        return out


@dataclass
class _Topic:
    config: TopicConfig
    logs: list[Log] = field(default_factory=list)


class Store:
    """Use Store.open(data_dir). Thread-safe for topic admin; logs are thread-safe."""

    def __init__(
        self, data_dir: str, metadata: MetadataStore, clock_ms: Callable[[], int],
        lock: DataDirectoryLock | None = None, fsync_workers_max: int = FSYNC_WORKERS_DEFAULT,
    ) -> None:
        self.data_dir = data_dir
        # Every partition log's fsyncs run on these few threads (storage/fsync_pool.py).
        self.fsync_pool = FsyncPool(fsync_workers_max)
        self.fsync_pool.acquire()  # released last by close()
        self._holds_fsync_pool = True
        self.metadata = metadata
        self._directory_lock = lock
        self._clock_ms = clock_ms
        self._topics: dict[str, _Topic] = {}
        self._lock = threading.Lock()
        self.open_report = StoreOpenReport((), (), ())

    @classmethod
    def open(
        cls, data_dir: str | os.PathLike[str], *, clock_ms: Callable[[], int] | None = None,
        fsync_workers_max: int = FSYNC_WORKERS_DEFAULT,
    ) -> Store:
        """Take the data directory's lock (DataDirectoryLockedError, having touched
        nothing, when another process holds it), then open the metadata and every log.
        At most `fsync_workers_max` threads run the logs' fsyncs."""
        check_fsync_workers_max(fsync_workers_max)
        started = time.monotonic()
        data_dir = os.fspath(data_dir)
        clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        lock = DataDirectoryLock.acquire(data_dir)
        try:
            os.makedirs(logs_directory(data_dir), exist_ok=True)
            removed = _remove_half_deleted(data_dir)
            store = cls(data_dir, MetadataStore(data_dir), clock_ms, lock, fsync_workers_max)
        except BaseException:
            lock.release()
            raise
        try:
            recoveries = []
            for name, config in sorted(store.metadata.list_topics().items()):
                topic = _Topic(config)
                for partition in range(config.partitions):
                    log = Log.open(partition_directory(data_dir, name, partition), log_config_for(config),
                                   clock_ms=clock_ms, fsync_pool=store.fsync_pool)
                    topic.logs.append(log)
                    recoveries.append(log.recovery_report)
                store._topics[name] = topic
            clamped = store.metadata.clamp_offsets(store._log_end_offset)
            orphans = tuple(
                entry.path for entry in iter_partition_directories(data_dir)
                if entry.topic not in store._topics or entry.partition >= store._topics[entry.topic].config.partitions
            )
        except BaseException:
            store.close()
            raise
        store.open_report = StoreOpenReport(
            tuple(recoveries), tuple(clamped), orphans, removed, (time.monotonic() - started) * 1000
        )
        return store

    def _log_end_offset(self, topic: str, partition: int) -> int | None:
        entry = self._topics.get(topic)
        if entry is None or partition >= len(entry.logs):
            return None
        return entry.logs[partition].next_offset

    # -- topics ---------------------------------------------------------------------

    def create_topic(self, name: str, config: TopicConfig = TopicConfig()) -> None:
        """Metadata first, then the partition logs: a crash in between leaves a topic
        whose logs the next open creates empty."""
        config.validate()
        with self._lock:
            if name in self._topics:
                raise TopicExistsError(f"topic {name!r} already exists")
            self.metadata.create_topic(name, config)
            topic = _Topic(config)
            try:
                for partition in range(config.partitions):
                    topic.logs.append(
                        Log.open(partition_directory(self.data_dir, name, partition), log_config_for(config),
                                 clock_ms=self._clock_ms, fsync_pool=self.fsync_pool)
                    )
            except BaseException:
                for log in topic.logs:
                    log.close()
                raise
            self._topics[name] = topic

    def delete_topic(self, name: str) -> None:
        """Rename each partition directory aside, drop the metadata (and the topic's
        committed offsets), then remove the files."""
        with self._lock:
            topic = self._topics.pop(name, None)
            if topic is None:
                raise UnknownTopicError(f"topic {name!r} does not exist")
        doomed = []
        for partition, log in enumerate(topic.logs):
            log.close()
            path = partition_directory(self.data_dir, name, partition)
            if os.path.isdir(path):
                aside = f"{path}.{self._clock_ms()}{DELETING_SUFFIX}"
                os.rename(path, aside)
                doomed.append(aside)
        OS_FILE_SYSTEM.sync_directory(logs_directory(self.data_dir))
        self.metadata.delete_topic(name)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    def topics(self) -> dict[str, TopicConfig]:
        with self._lock:
            return {name: topic.config for name, topic in self._topics.items()}

    def topic_config(self, name: str) -> TopicConfig | None:
        """One topic's settings, or None (topics() copies the whole table)."""
        with self._lock:
            entry = self._topics.get(name)
            return None if entry is None else entry.config

    def log(self, topic: str, partition: int) -> Log:
        entry = self._topics.get(topic)
        if entry is None:
            raise UnknownTopicError(f"topic {topic!r} does not exist")
        if not 0 <= partition < len(entry.logs):
            raise UnknownTopicError(f"topic {topic!r} has no partition {partition}")
        return entry.logs[partition]

    def logs(self) -> list[tuple[str, int, Log]]:
        with self._lock:
            return [(name, number, log) for name, topic in self._topics.items() for number, log in enumerate(topic.logs)]

    # -- background work ------------------------------------------------------------

    def apply_retention(self, now_ms: int | None = None) -> dict[tuple[str, int], list[DeletedSegment]]:
        deleted = {}
        for name, partition, log in self.logs():
            removed = log.apply_retention(now_ms)
            if removed:
                deleted[(name, partition)] = removed
        return deleted

    def close(self) -> None:
        with self._lock:
            topics, self._topics = self._topics, {}
        try:
            for topic in topics.values():
                for log in topic.logs:
                    log.close()
            self.metadata.close()
        finally:
            if self._holds_fsync_pool:
                self._holds_fsync_pool = False
                self.fsync_pool.release()  # the last user: its threads stop
            if self._directory_lock is not None:
                self._directory_lock.release()  # last: every file is closed and marked

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _remove_half_deleted(data_dir: str) -> tuple[str, ...]:
    root = logs_directory(data_dir)
    removed = []
    for name in sorted(os.listdir(root)):
        if name.endswith(DELETING_SUFFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return tuple(removed)
