"""The metadata store: topics and their settings, consumer-group committed offsets and
queue-group state, in one LMDB environment per data directory (DATA_DIR/meta/).

LMDB layout (see docs/storage-format.md, "Metadata store (LMDB)"): one environment,
opened with sync=True, metasync=True, writemap=False, and three named sub-databases:

    sub-database  key                              value
    topics        topic name (ASCII)               TopicConfig.to_dict() as JSON (UTF-8)
    offsets       group-partition key (below)      offset value (below)
    queue_state   group-partition key (below)      opaque bytes owned by the queue groups

Topic writes are rare and commit at once. Offsets and queue state are written often, so
they are *staged* in memory (latest value per key wins) and written by `flush()` in one
write transaction; the store also flushes by itself when `staged_entries_max` entries are
staged. Every read sees staged values over committed ones. Every write transaction (a
topic change too) carries whatever is staged at that moment, so writes reach the disk in
the order they were made.

The log is the truth (invariant I6 in docs/fault-model.md): at start-up the broker calls
`clamp_offsets()` with each partition's recovered log end, and committed offsets beyond
it are lowered (or dropped with their partition).

LMDB's own errors never escape: each becomes a MetadataError naming the store and the
operation. A full map grows the map and retries at once.

A failed commit (ENOSPC, EIO: F8, F7) is not sticky, unlike a log's failed fsync. LMDB
aborts the failed transaction and nothing of it becomes current: the data pages it wrote
went to pages the committed tree does not use, and the meta page that would have made
them current is written last (a failed meta write leaves the environment unusable until
it is reopened, so the store reopens it after any failed commit). The entries that
transaction carried go back to the staged entries (a newer value staged meanwhile wins),
so nothing is lost and nothing applied twice: staged entries are whole values, latest
wins. The store then refuses commits (MetadataDiskFullError for ENOSPC, else
MetadataUnavailableError) until a backoff ends (`commit_retry_ms_min`, doubling up to
`commit_retry_ms_max`); the next commit after it (a caller's, or the broker's retry
timer's `flush()`) tries again, and the first that succeeds ends the failure. Staging
goes on meanwhile, bounded by `staged_entries_max`, and reads are served throughout.
statistics() reports the state and counts the failed commits.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import lmdb

from .errors import (
    InvalidConfigError,
    MetadataDiskFullError,
    MetadataError,
    MetadataUnavailableError,
    TopicExistsError,
    UnknownTopicError,
)
from .limits import GIB, KIB, MIB
from .lmdb_file import check_data_file
from .topic_settings import PARTITIONS_MAX, TopicConfig  # declared there; imported from here too

log = logging.getLogger("nodi.metadata")

DAY_MS = 24 * 60 * 60 * 1000
INT64_MAX = 2**63 - 1
PARTITION_MAX = 2**31 - 1  # partitions are int32 on the wire, as in Kafka

# ---------------------------------------------------------------------------
# Limits


@dataclass(frozen=True, slots=True)
class MetadataLimits:
    # LMDB map size at open. It is address space, not disk: the file grows as pages are
    # used. On MapFullError the map is doubled and the commit retried.
    map_size_bytes: int = 1 * GIB
    # The map never grows past this; a commit that would need more raises MetadataError.
    map_size_bytes_max: int = 64 * GIB
    # Staged (unflushed) offset and queue-state entries; reaching it flushes.
    staged_entries_max: int = 10_000
    # A group name, UTF-8. At most 255: its length is one byte in the key.
    group_name_bytes_max: int = 255
    # The metadata string of one committed offset, UTF-8 (Kafka's offset.metadata.max.bytes).
    offset_metadata_bytes_max: int = 4 * KIB
    # One partition's queue-group state blob.
    queue_state_bytes_max: int = 16 * MIB
    # After a failed commit, commits are refused for this long before the next try;
    # each failed try doubles it, up to the max.
    commit_retry_ms_min: int = 100
    commit_retry_ms_max: int = 5000

    def validate(self) -> None:
        if not 0 < self.map_size_bytes <= self.map_size_bytes_max:
            raise InvalidConfigError(
                f"map_size_bytes must be in [1, map_size_bytes_max={self.map_size_bytes_max}], "
                f"got {self.map_size_bytes}"
            )
        if self.staged_entries_max < 1:
            raise InvalidConfigError(f"staged_entries_max must be at least 1, got {self.staged_entries_max}")
        if not 1 <= self.group_name_bytes_max <= 255:
            raise InvalidConfigError(
                f"group_name_bytes_max must be in [1, 255] (a one-byte length in the key), "
                f"got {self.group_name_bytes_max}"
            )
        if self.offset_metadata_bytes_max < 0 or self.queue_state_bytes_max < 0:
            raise InvalidConfigError("offset_metadata_bytes_max and queue_state_bytes_max must be >= 0")
        if not 1 <= self.commit_retry_ms_min <= self.commit_retry_ms_max:
            raise InvalidConfigError(
                f"commit_retry_ms_min must be in [1, commit_retry_ms_max={self.commit_retry_ms_max}], "
                f"got {self.commit_retry_ms_min}"
            )


DEFAULT_METADATA_LIMITS = MetadataLimits()

# ---------------------------------------------------------------------------
# Topic names (their settings: topic_settings.py)

TOPIC_NAME_CHARACTERS_MAX = 249

_TOPIC_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{TOPIC_NAME_CHARACTERS_MAX}}}")


def validate_topic_name(name: str) -> None:
    """1..249 characters of [A-Za-z0-9._-], and not "." or ".." (Kafka's rule)."""
    if not isinstance(name, str):
        raise InvalidConfigError(f"topic name must be a string, got {type(name).__name__}")
    if _TOPIC_NAME.fullmatch(name) is None:
        raise InvalidConfigError(
            f"invalid topic name {name!r}: use 1 to {TOPIC_NAME_CHARACTERS_MAX} characters from A-Z a-z 0-9 . _ -"
        )
    if name in (".", ".."):
        raise InvalidConfigError(f"invalid topic name {name!r}: '.' and '..' are reserved")


def validate_group_name(group: str, group_name_bytes_max: int = 255) -> bytes:
    """A non-empty string of at most `group_name_bytes_max` bytes in UTF-8.
    Returns its UTF-8 encoding."""
    if not isinstance(group, str):
        raise InvalidConfigError(f"group name must be a string, got {type(group).__name__}")
    try:
        encoded = group.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidConfigError(f"group name {group!r} is not valid UTF-8: {error}") from None
    if not 1 <= len(encoded) <= group_name_bytes_max:
        raise InvalidConfigError(
            f"group name must be 1 to {group_name_bytes_max} bytes in UTF-8, got {len(encoded)} bytes"
        )
    return encoded


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# Keys and values


class CommittedOffset(NamedTuple):
    """A group's committed position in one partition: the next offset it will read."""

    offset: int
    metadata: str
    commit_time_ms: int


class QueueState(NamedTuple):
    group: str
    topic: str
    partition: int
    state: bytes


@dataclass(frozen=True, slots=True)
class ClampedOffset:
    """A committed offset changed by clamp_offsets. new_offset None: the partition no
    longer exists and the offset was dropped."""

    group: str
    topic: str
    partition: int
    old_offset: int
    new_offset: int | None


@dataclass(frozen=True, slots=True)
class MetadataStatistics:
    topics: int
    # Offset and queue-state entries not yet committed (distinct keys).
    staged_entries: int
    # Write transactions that carried staged entries.
    flushes: int
    # Staged entries written by those transactions.
    entries_written: int
    # All committed write transactions (flushes, topic and group changes, clamps).
    write_transactions: int
    map_size_bytes: int
    map_growths: int
    # A commit failed and none has succeeded since: commits are refused until the retry.
    failed: bool = False
    # Commits that failed (ENOSPC, EIO, a failed map growth), retries included.
    failed_commits: int = 0
    # Failures ended by a commit that succeeded.
    recoveries: int = 0
    # While failed: the last failure, since when (wall ms), and ms until the next try.
    failure: str = ""
    failed_since_ms: int | None = None
    retry_in_ms: int | None = None


# Group-partition key, the key of `offsets` and `queue_state` (big-endian):
#
#     size  field
#        1  group_length   1..255
#        n  group          UTF-8
#        1  topic_length   1..249
#        m  topic          ASCII, [A-Za-z0-9._-]
#        4  partition      uint32, 0..2**31-1
#
# The length prefix makes `group_length + group` a prefix that no other group's keys
# share, so a cursor range scan lists one group; `prefix + b"\xff"` sorts after all of
# them (a topic_length is at most 249), which lets list_groups jump group to group.
# The longest key is 510 bytes, within LMDB's default 511.

_PARTITION = struct.Struct(">I")
KEY_BYTES_MAX = 1 + 255 + 1 + TOPIC_NAME_CHARACTERS_MAX + _PARTITION.size
assert KEY_BYTES_MAX <= 511


def _check_partition(partition: int) -> None:
    if not _is_integer(partition) or not 0 <= partition <= PARTITION_MAX:
        raise InvalidConfigError(f"partition must be an integer in [0, {PARTITION_MAX}], got {partition!r}")


def encode_group_prefix(group: str, group_name_bytes_max: int = 255) -> bytes:
    encoded = validate_group_name(group, group_name_bytes_max)
    return bytes((len(encoded),)) + encoded


@functools.lru_cache(maxsize=4096)
def _group_topic_prefix(group: str, topic: str, group_name_bytes_max: int) -> bytes:
    validate_topic_name(topic)
    encoded_topic = topic.encode("ascii")
    return encode_group_prefix(group, group_name_bytes_max) + bytes((len(encoded_topic),)) + encoded_topic


def encode_group_key(group: str, topic: str, partition: int, group_name_bytes_max: int = 255) -> bytes:
    _check_partition(partition)
    return _group_topic_prefix(group, topic, group_name_bytes_max) + _PARTITION.pack(partition)


def decode_group_key(key: bytes) -> tuple[str, str, int]:
    """(group, topic, partition); MetadataError when the bytes are not such a key."""
    try:
        group_end = 1 + key[0]
        topic_end = group_end + 1 + key[group_end]
        if len(key) != topic_end + _PARTITION.size or key[0] == 0 or key[group_end] == 0:
            raise ValueError(f"length fields do not add up to {len(key)} bytes")
        group = key[1:group_end].decode("utf-8")
        topic = key[group_end + 1 : topic_end].decode("ascii")
        (partition,) = _PARTITION.unpack_from(key, topic_end)
    except (IndexError, ValueError, struct.error) as error:
        raise MetadataError(f"unreadable group-partition key {bytes(key)!r}: {error}") from None
    return group, topic, partition


# Offset value, the value of `offsets` (big-endian):
#
#     offset  size  field
#          0     1  format_version     1
#          1     8  offset             int64, >= 0: the next offset the group reads
#          9     8  commit_time_ms     int64, ms since the Unix epoch
#         17     4  metadata_length    uint32
#         21     n  metadata           UTF-8, the client's commit metadata

OFFSET_VALUE_VERSION = 1
_OFFSET_VALUE = struct.Struct(">BqqI")


def encode_offset_value(entry: CommittedOffset, offset_metadata_bytes_max: int = 4 * KIB) -> bytes:
    offset, metadata, commit_time_ms = entry
    if not _is_integer(offset) or not 0 <= offset <= INT64_MAX:
        raise InvalidConfigError(f"offset must be an integer in [0, {INT64_MAX}], got {offset!r}")
    if not _is_integer(commit_time_ms) or not 0 <= commit_time_ms <= INT64_MAX:
        raise InvalidConfigError(f"commit_time_ms must be an integer >= 0, got {commit_time_ms!r}")
    if not isinstance(metadata, str):
        raise InvalidConfigError(f"offset metadata must be a string, got {type(metadata).__name__}")
    try:
        encoded = metadata.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidConfigError(f"offset metadata is not valid UTF-8: {error}") from None
    if len(encoded) > offset_metadata_bytes_max:
        raise InvalidConfigError(
            f"offset metadata of {len(encoded)} bytes exceeds offset_metadata_bytes_max {offset_metadata_bytes_max}"
        )
    return _OFFSET_VALUE.pack(OFFSET_VALUE_VERSION, offset, commit_time_ms, len(encoded)) + encoded


def decode_offset_value(value: bytes) -> CommittedOffset:
    """MetadataError when the bytes are not an offset value."""
    try:
        version, offset, commit_time_ms, metadata_length = _OFFSET_VALUE.unpack_from(value)
        if version != OFFSET_VALUE_VERSION:
            raise ValueError(f"format_version {version}, expected {OFFSET_VALUE_VERSION}")
        if len(value) != _OFFSET_VALUE.size + metadata_length:
            raise ValueError(f"metadata_length {metadata_length} does not match {len(value)} bytes")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        metadata = bytes(value[_OFFSET_VALUE.size :]).decode("utf-8")
    except (ValueError, struct.error) as error:
        raise MetadataError(f"unreadable committed-offset value: {error}") from None
    return CommittedOffset(offset, metadata, commit_time_ms)


# Deletion value, the value of `deleted_topics` (key: the topic name, ASCII):
#
#     offset  size  field
#          0     1  format_version     1
#          1     4  partitions         uint32: the topic's partition count when deleted
#          5     8  deleted_time_ms    int64, ms since the Unix epoch

DELETION_VALUE_VERSION = 1
_DELETION_VALUE = struct.Struct(">BIq")


def encode_deletion_value(partitions: int, deleted_time_ms: int) -> bytes:
    return _DELETION_VALUE.pack(DELETION_VALUE_VERSION, partitions, deleted_time_ms)


def decode_deletion_value(value: bytes) -> tuple[int, int]:
    """(partitions, deleted_time_ms); MetadataError when the bytes are not one."""
    try:
        version, partitions, deleted_time_ms = _DELETION_VALUE.unpack(value)
        if version != DELETION_VALUE_VERSION:
            raise ValueError(f"format_version {version}, expected {DELETION_VALUE_VERSION}")
        if not 1 <= partitions <= PARTITIONS_MAX:
            raise ValueError(f"partitions {partitions} outside [1, {PARTITIONS_MAX}]")
    except (ValueError, struct.error) as error:
        raise MetadataError(f"unreadable topic-deletion value: {error}") from None
    return partitions, deleted_time_ms


def encode_topic_value(config: TopicConfig) -> bytes:
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_topic_value(name: str, value: bytes) -> TopicConfig:
    try:
        return TopicConfig.from_dict(json.loads(value))
    except (ValueError, TypeError, InvalidConfigError) as error:
        raise MetadataError(f"unreadable settings of topic {name!r}: {error}") from None


# ---------------------------------------------------------------------------
# The store

_TOPICS = b"topics"
_OFFSETS = b"offsets"
_QUEUE_STATE = b"queue_state"
_DELETED_TOPICS = b"deleted_topics"
# The sub-databases every store has (`nodi segments verify` reads each; a store made
# before deleted_topics existed gets it at its next open).
TABLES = (_TOPICS, _OFFSETS, _QUEUE_STATE, _DELETED_TOPICS)
# Room for later kinds (producer state, dedup windows) without reopening differently.
DATABASES_MAX = 8
_PROBE_KEY = b"\x00probe"

_Staged = dict[tuple[bytes, bytes], "bytes | None"]  # (sub-database, key) -> value; None deletes
_MISSING = object()
_Result = TypeVar("_Result")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class _Gate:
    """Shared by reads, exclusive for a write transaction, writer first.

    py-lmdb takes one environment-wide mutex in every call and holds it through a
    commit's fsync, so readers in other threads wait for a commit either way; that mutex
    is not fair, though, and busy readers can starve a commit for seconds. Here a waiting
    writer holds back new readers. A map resize needs the gate too: set_mapsize
    invalidates every transaction open in the process, other threads' included.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0
        self._exclusive = False
        # Threads in a wait() on the condition: a release with none skips notify_all
        # (a commit's path: Condition.notify_all is Python, not free).
        self._waiting = 0

    def _wait(self) -> None:
        self._waiting += 1
        try:
            self._condition.wait()
        finally:
            self._waiting -= 1

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            while self._exclusive:
                self._wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if self._readers == 0 and self._waiting:
                    self._condition.notify_all()

    def acquire_exclusive(self) -> None:
        with self._condition:
            while self._exclusive:
                self._wait()
            self._exclusive = True
            while self._readers:
                self._wait()

    def release_exclusive(self) -> None:
        with self._condition:
            self._exclusive = False
            if self._waiting:
                self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


class MetadataStore:
    """The LMDB environment at DATA_DIR/meta/, opened by the constructor.

    Thread-safe. Three locks, always taken in this order: the write lock serialises write
    transactions; the gate keeps reads out of a commit or a map resize; the stage lock
    guards the staged entries (held for dict operations only, never across I/O).
    """

    def __init__(
        self,
        data_directory: str | os.PathLike[str],
        limits: MetadataLimits = DEFAULT_METADATA_LIMITS,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        limits.validate()
        self._limits = limits
        # The clock of the commit-retry backoff (tests pass a manual one).
        self._monotonic = monotonic
        self.path = os.path.join(os.fspath(data_directory), "meta")
        self._write_lock = threading.RLock()
        self._stage_lock = threading.Lock()
        self._gate = _Gate()
        self._staged: _Staged = {}
        # Taken out of _staged by the write transaction under way; still read from.
        self._flushing: _Staged = {}
        # Set while commits fail (see the module docstring): the last failure, the
        # monotonic time of the next try, the backoff that led to it.
        self._failure: MetadataUnavailableError | None = None
        self._retry_at = 0.0
        self._retry_delay_s = 0.0
        self._failed_since_ms: int | None = None
        self._failed_commits = 0
        self._episode_failed_commits = 0
        self._recoveries = 0
        self._env_closed = False  # a reopen after a failed commit did not complete
        self._closed = False
        self._flushes = 0
        self._entries_written = 0
        self._write_transactions = 0
        self._map_growths = 0
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as error:
            raise MetadataError(f"cannot create the metadata store at {self.path}: {error}") from error
        # LMDB maps the file and trusts it: a truncated file would SIGBUS the process.
        check_data_file(self.path)
        self._open_environment(limits.map_size_bytes)
        try:
            # The data and lock files' directory entries must survive a power loss (F4).
            _fsync_directory(self.path)
            _fsync_directory(os.path.dirname(self.path))
        except OSError as error:
            self._env.close()
            raise MetadataError(f"cannot open the metadata store at {self.path}: {error}") from error

    def _open_environment(self, map_size_bytes: int) -> None:
        """Open the LMDB environment and its sub-databases (creating them when new)."""
        try:
            env = lmdb.open(
                self.path,
                map_size=map_size_bytes,
                subdir=True,
                sync=True,
                metasync=True,
                writemap=False,
                max_dbs=DATABASES_MAX,
            )
        except lmdb.Error as error:
            raise MetadataError(f"cannot open the metadata store at {self.path}: {error}") from error
        except OSError as error:
            raise MetadataError(f"cannot create the metadata store at {self.path}: {error}") from error
        try:
            if env.max_key_size() < KEY_BYTES_MAX:
                raise MetadataError(
                    f"this LMDB build allows {env.max_key_size()}-byte keys; the metadata store needs {KEY_BYTES_MAX}"
                )
            databases = {name: env.open_db(name) for name in TABLES}
        except lmdb.Error as error:
            env.close()
            raise MetadataError(f"cannot open the metadata store at {self.path}: {error}") from error
        except BaseException:
            env.close()
            raise
        self._env = env
        self._databases = databases
        self._topics = databases[_TOPICS]
        self._offsets = databases[_OFFSETS]
        self._queue_state = databases[_QUEUE_STATE]
        self._deleted_topics = databases[_DELETED_TOPICS]

    @property
    def limits(self) -> MetadataLimits:
        return self._limits

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        """Flush what is staged, then close. Repeat calls do nothing. If the flush fails
        the store is closed all the same and the error raised: the staged entries are lost,
        as they would be in a crash. A store whose commits are failing tries once more
        at once (its backoff cut short)."""
        with self._write_lock:
            if self._closed:
                return
            try:
                self._retry_at = 0.0
                self.flush()
            finally:
                self._closed = True
                with self._gate.exclusive():
                    self._env.close()

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def statistics(self) -> MetadataStatistics:
        """Counts and the failure state. Answers while commits fail (topics and map size
        -1 when the environment cannot be read at all)."""
        try:
            with self._read() as transaction:
                topics = transaction.stat(self._topics)["entries"]
                map_size_bytes = self._env.info()["map_size"]
        except MetadataUnavailableError:
            topics = map_size_bytes = -1
        with self._stage_lock:
            staged_entries = len(self._staged) + len(self._flushing.keys() - self._staged.keys())
            failure = self._failure
            return MetadataStatistics(
                topics=topics,
                staged_entries=staged_entries,
                flushes=self._flushes,
                entries_written=self._entries_written,
                write_transactions=self._write_transactions,
                map_size_bytes=map_size_bytes,
                map_growths=self._map_growths,
                failed=failure is not None,
                failed_commits=self._failed_commits,
                recoveries=self._recoveries,
                failure="" if failure is None else str(failure),
                failed_since_ms=self._failed_since_ms if failure is not None else None,
                retry_in_ms=None if failure is None else max(0, int((self._retry_at - self._monotonic()) * 1000)),
            )

    def retry_in_s(self) -> float | None:
        """While commits fail: seconds until the next try may run (0: now). None when
        the store commits normally. The broker's retry timer flushes then."""
        failure = self._failure
        if failure is None or self._closed:
            return None
        return max(0.0, self._retry_at - self._monotonic())

    # -- topics (committed at once) -------------------------------------------

    def create_topic(self, name: str, config: TopicConfig = TopicConfig()) -> None:
        validate_topic_name(name)
        config.validate()
        key = name.encode("ascii")
        value = encode_topic_value(config)

        def apply(transaction: lmdb.Transaction[bytes]) -> None:
            if transaction.get(key, db=self._deleted_topics) is not None:
                raise TopicExistsError(f"topic {name!r} is still being deleted (its files are not removed yet)")
            if not transaction.put(key, value, db=self._topics, overwrite=False):
                raise TopicExistsError(f"topic {name!r} already exists")
            # Group entries of a topic that does not exist can only be left over from a
            # deleted one of the same name (staged after its deletion): never inherited.
            self._delete_group_entries(transaction, name)

        self._commit(apply, discard=lambda group_key: decode_group_key(group_key)[1] == name)

    def get_topic(self, name: str) -> TopicConfig | None:
        validate_topic_name(name)
        with self._read() as transaction:
            value = transaction.get(name.encode("ascii"), db=self._topics)
        return None if value is None else decode_topic_value(name, value)

    def update_topic(self, name: str, config: TopicConfig) -> None:
        """Replace a topic's settings. Partitions can be added, never removed (their
        offsets and data would be orphaned)."""
        validate_topic_name(name)
        config.validate()
        key = name.encode("ascii")
        value = encode_topic_value(config)

        def apply(transaction: lmdb.Transaction[bytes]) -> None:
            old = transaction.get(key, db=self._topics)
            if old is None:
                raise UnknownTopicError(f"unknown topic {name!r}")
            old_partitions = decode_topic_value(name, old).partitions
            if config.partitions < old_partitions:
                raise InvalidConfigError(
                    f"topic {name!r} has {old_partitions} partitions; "
                    f"partitions can only grow, not shrink to {config.partitions}"
                )
            transaction.put(key, value, db=self._topics)

        self._commit(apply)

    def delete_topic(self, name: str) -> None:
        """Remove a topic with every group's committed offsets and queue state in it, and
        record it in `deleted_topics` (its partition count and the time), all in one
        transaction: the commit point of a topic deletion (storage/store.py). The entry
        says which partition directories are to be removed; finish_topic_deletion drops
        it once they are."""
        validate_topic_name(name)
        key = name.encode("ascii")

        def apply(transaction: lmdb.Transaction[bytes]) -> None:
            old = transaction.get(key, db=self._topics)
            if old is None:
                raise UnknownTopicError(f"unknown topic {name!r}")
            partitions = decode_topic_value(name, old).partitions
            transaction.delete(key, db=self._topics)
            self._delete_group_entries(transaction, name)
            transaction.put(key, encode_deletion_value(partitions, _now_ms()), db=self._deleted_topics)

        self._commit(apply, discard=lambda group_key: decode_group_key(group_key)[1] == name)

    def _delete_group_entries(self, transaction: lmdb.Transaction[bytes], topic: str) -> None:
        """Every group's committed offsets and queue state in `topic` (a scan: the keys
        are ordered by group)."""
        for database in (self._offsets, self._queue_state):
            doomed = [
                group_key
                for group_key in transaction.cursor(db=database).iternext(values=False)
                if decode_group_key(group_key)[1] == topic
            ]
            for group_key in doomed:
                transaction.delete(group_key, db=database)

    def topic_deletions(self) -> dict[str, int]:
        """Topics deleted whose partition directories may still be on disk: name ->
        partition count at the deletion."""
        with self._read() as transaction:
            items = list(transaction.cursor(db=self._deleted_topics))
        return {bytes(key).decode("ascii", errors="replace"): decode_deletion_value(value)[0] for key, value in items}

    def finish_topic_deletion(self, name: str) -> None:
        """Drop the `deleted_topics` entry of `name` (its directories are gone)."""
        validate_topic_name(name)
        key = name.encode("ascii")

        def apply(transaction: lmdb.Transaction[bytes]) -> None:
            transaction.delete(key, db=self._deleted_topics)

        self._commit(apply)

    def list_topics(self) -> dict[str, TopicConfig]:
        with self._read() as transaction:
            items = list(transaction.cursor(db=self._topics))
        topics = {}
        for key, value in items:
            name = key.decode("ascii", errors="replace")
            topics[name] = decode_topic_value(name, value)
        return topics

    # -- committed offsets (staged) -------------------------------------------

    def stage_offset(
        self,
        group: str,
        topic: str,
        partition: int,
        offset: int,
        metadata: str = "",
        *,
        commit_time_ms: int | None = None,
    ) -> None:
        """Record a commit in memory (latest wins); it is durable after the next flush.
        commit_time_ms defaults to now. When this makes `staged_entries_max` entries the
        caller's thread runs the flush (one commit and its fsync)."""
        key = encode_group_key(group, topic, partition, self._limits.group_name_bytes_max)
        entry = CommittedOffset(offset, metadata, _now_ms() if commit_time_ms is None else commit_time_ms)
        self._stage(_OFFSETS, key, encode_offset_value(entry, self._limits.offset_metadata_bytes_max))

    def committed_offset(self, group: str, topic: str, partition: int) -> CommittedOffset | None:
        key = encode_group_key(group, topic, partition, self._limits.group_name_bytes_max)
        value = self._get(_OFFSETS, key)
        return None if value is None else decode_offset_value(value)

    def group_offsets(self, group: str) -> dict[tuple[str, int], CommittedOffset]:
        """(topic, partition) -> committed offset, staged values included."""
        prefix = encode_group_prefix(group, self._limits.group_name_bytes_max)
        offsets = {}
        for key, value in self._scan_prefix(_OFFSETS, prefix):
            _, topic, partition = decode_group_key(key)
            offsets[topic, partition] = decode_offset_value(value)
        return offsets

    def list_groups(self) -> list[str]:
        """Groups with a committed offset or queue state (staged or committed), sorted."""
        groups: set[str] = set()
        with self._read() as transaction:
            for database in (self._offsets, self._queue_state):
                cursor = transaction.cursor(db=database)
                found = cursor.first()
                while found:
                    group, _, _ = decode_group_key(cursor.key())
                    groups.add(group)
                    prefix = encode_group_prefix(group)
                    found = cursor.set_range(prefix + b"\xff")
        pending = self._pending_snapshot()
        deleted_in = set()
        for (_, key), value in pending.items():
            group = decode_group_key(key)[0]
            if value is None:
                deleted_in.add(group)
            else:
                groups.add(group)
        # A group whose entries are all staged for deletion is gone already.
        for group in deleted_in & groups:
            prefix = encode_group_prefix(group, 255)
            if not any(True for _ in self._scan_prefix(_OFFSETS, prefix)) and not any(
                True for _ in self._scan_prefix(_QUEUE_STATE, prefix)
            ):
                groups.discard(group)
        return sorted(groups)

    def delete_group(self, group: str) -> int:
        """Remove a group's committed offsets and queue state, staged ones included.
        Committed at once. Returns how many entries were removed (0: no such group)."""
        prefix = encode_group_prefix(group, self._limits.group_name_bytes_max)

        def apply(transaction: lmdb.Transaction[bytes]) -> int:
            removed = 0
            for database in (self._offsets, self._queue_state):
                cursor = transaction.cursor(db=database)
                doomed = []
                if cursor.set_range(prefix):
                    for key in cursor.iternext(values=False):
                        if not key.startswith(prefix):
                            break
                        doomed.append(key)
                for key in doomed:
                    transaction.delete(key, db=database)
                removed += len(doomed)
            return removed

        return self._commit(apply, discard=lambda key: key.startswith(prefix))

    # -- queue-group state (staged) -------------------------------------------

    def put_queue_state(self, group: str, topic: str, partition: int, state: bytes | bytearray | memoryview) -> None:
        """Stage a partition's queue-group state (opaque bytes; latest wins)."""
        key = encode_group_key(group, topic, partition, self._limits.group_name_bytes_max)
        if not isinstance(state, (bytes, bytearray, memoryview)):
            raise InvalidConfigError(f"queue state must be bytes, got {type(state).__name__}")
        state = bytes(state)
        if len(state) > self._limits.queue_state_bytes_max:
            raise InvalidConfigError(
                f"queue state of {len(state)} bytes exceeds queue_state_bytes_max {self._limits.queue_state_bytes_max}"
            )
        self._stage(_QUEUE_STATE, key, state)

    def delete_queue_state(self, group: str, topic: str, partition: int) -> None:
        """Stage the removal of a partition's queue-group state."""
        key = encode_group_key(group, topic, partition, self._limits.group_name_bytes_max)
        self._stage(_QUEUE_STATE, key, None)

    def get_queue_state(self, group: str, topic: str, partition: int) -> bytes | None:
        key = encode_group_key(group, topic, partition, self._limits.group_name_bytes_max)
        return self._get(_QUEUE_STATE, key)

    def iter_queue_state(self, group: str | None = None) -> Iterator[QueueState]:
        """Every partition's queue state (of one group, or of all), staged values
        included, in key order. A snapshot: later writes do not show up in it."""
        prefix = b"" if group is None else encode_group_prefix(group, self._limits.group_name_bytes_max)
        entries = self._scan_prefix(_QUEUE_STATE, prefix)
        return iter([QueueState(*decode_group_key(key), value) for key, value in entries])

    # -- flushing -------------------------------------------------------------

    def flush(self) -> int:
        """Write everything staged in one write transaction. Returns the entries written."""
        with self._write_lock:
            with self._stage_lock:
                count = len(self._staged)
            if count == 0:
                self._check_open()
                if self._failure is not None:
                    self._commit(self._probe)  # nothing to write: prove that a commit works again
                return 0
            self._commit(None)
            return count

    def clamp_offsets(self, log_end_offset: Callable[[str, int], int | None]) -> list[ClampedOffset]:
        """Hold committed offsets to the log (I6). `log_end_offset(topic, partition)` is the
        partition's recovered log end, or None when the partition no longer exists. An
        offset above the end is lowered to it (metadata and commit time kept); an offset of
        a missing partition is dropped. All in one transaction; returns what changed."""
        with self._write_lock:
            ends: dict[tuple[str, int], int | None] = {}
            planned: list[tuple[bytes, bytes, ClampedOffset, bytes | None]] = []
            for key, value in self._scan_prefix(_OFFSETS, b""):
                group, topic, partition = decode_group_key(key)
                if (topic, partition) not in ends:
                    ends[topic, partition] = log_end_offset(topic, partition)
                end = ends[topic, partition]
                entry = decode_offset_value(value)
                if end is None:
                    planned.append((key, value, ClampedOffset(group, topic, partition, entry.offset, None), None))
                elif entry.offset > end:
                    new_value = encode_offset_value(entry._replace(offset=end), INT64_MAX)
                    clamped = ClampedOffset(group, topic, partition, entry.offset, end)
                    planned.append((key, value, clamped, new_value))

            def apply(transaction: lmdb.Transaction[bytes]) -> list[ClampedOffset]:
                changed = []
                for key, seen, clamped, new_value in planned:
                    # Compare and set: a commit staged meanwhile is newer than the clamp.
                    if transaction.get(key, db=self._offsets) != seen:
                        continue
                    if new_value is None:
                        transaction.delete(key, db=self._offsets)
                    else:
                        transaction.put(key, new_value, db=self._offsets)
                    changed.append(clamped)
                return changed

            if not planned:
                return []
            return self._commit(apply)

    # -- internals ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise MetadataError(f"the metadata store at {self.path} is closed")

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction[bytes]]:
        self._check_open()
        with self._gate.shared():
            self._check_open()
            if self._env_closed:
                raise MetadataUnavailableError(
                    f"the metadata store at {self.path} could not be reopened after a failed commit: {self._failure}"
                )
            try:
                with self._env.begin(write=False) as transaction:
                    yield transaction
            except lmdb.Error as error:
                raise MetadataError(f"reading the metadata store at {self.path} failed: {error}") from error

    def _stage(self, database: bytes, key: bytes, value: bytes | None) -> None:
        """Staged in memory, latest wins. While commits fail, a key not yet staged is
        refused once `staged_entries_max` are waiting (the caller's value would be
        neither kept nor written); otherwise reaching the max flushes."""
        self._check_open()
        with self._stage_lock:
            if (
                self._failure is not None
                and len(self._staged) >= self._limits.staged_entries_max
                and (database, key) not in self._staged
            ):
                raise self._refusal()
            self._staged[database, key] = value
            full = len(self._staged) >= self._limits.staged_entries_max
        if full and self._failure is None:
            self.flush()

    def _pending(self, database: bytes, key: bytes) -> object:
        """The staged value (bytes, or None for a staged delete), or _MISSING."""
        with self._stage_lock:
            value = self._staged.get((database, key), _MISSING)
            if value is _MISSING:
                value = self._flushing.get((database, key), _MISSING)
        return value

    def _pending_snapshot(self) -> _Staged:
        with self._stage_lock:
            snapshot = dict(self._flushing)
            snapshot.update(self._staged)
        return snapshot

    def _get(self, database: bytes, key: bytes) -> bytes | None:
        value = self._pending(database, key)
        if value is not _MISSING:
            return value  # type: ignore[return-value]
        with self._read() as transaction:
            return transaction.get(key, db=self._databases[database])

    def _scan_prefix(self, database: bytes, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """(key, value) of every key starting with `prefix`, staged values over committed
        ones, in key order."""
        # Snapshot the staged values first: an entry flushed after this point is in LMDB
        # by the time the read transaction below starts.
        pending = {
            key: value
            for (kind, key), value in self._pending_snapshot().items()
            if kind == database and key.startswith(prefix)
        }
        merged: dict[bytes, bytes] = {}
        with self._read() as transaction:
            cursor = transaction.cursor(db=self._databases[database])
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    merged[key] = value
        for key, staged in pending.items():
            if staged is None:
                merged.pop(key, None)
            else:
                merged[key] = staged
        return sorted(merged.items())

    def _commit(
        self,
        apply: Callable[[lmdb.Transaction[bytes]], _Result] | None,
        discard: Callable[[bytes], bool] | None = None,
    ) -> _Result:
        """One write transaction: everything staged, then `apply`. After it commits,
        staged group-partition keys matching `discard` (staged while it ran) are dropped."""
        with self._write_lock:
            self._check_open()
            if self._failure is not None and self._monotonic() < self._retry_at:
                raise self._refusal()
            with self._stage_lock:
                assert not self._flushing
                batch = self._staged
                self._staged = {}
                self._flushing = batch
            try:
                result = self._write(batch, apply)
            except BaseException:
                with self._stage_lock:
                    batch.update(self._staged)  # values staged meanwhile are newer
                    self._staged = batch
                    self._flushing = {}
                raise
            if self._failure is not None:
                self._recovered()
            with self._stage_lock:
                self._flushing = {}
                if discard is not None:
                    self._staged = {
                        (kind, key): value
                        for (kind, key), value in self._staged.items()
                        if kind == _TOPICS or not discard(key)
                    }
                self._write_transactions += 1
                if batch:
                    self._flushes += 1
                    self._entries_written += len(batch)
            return result

    def _write(self, batch: _Staged, apply: Callable[[lmdb.Transaction[bytes]], _Result] | None) -> _Result:
        """Run the transaction, growing the map and retrying while it is full. `apply`
        must only use the transaction (a read through the store would wait on the gate).
        A failed commit puts the store in the failed state (raised typed) and reopens
        the environment."""
        self._gate.acquire_exclusive()  # not `with gate.exclusive()`: a commit's path, each call counts
        try:
            if self._env_closed:
                self._reopen()
            databases = self._databases
            while True:
                try:
                    with self._env.begin(write=True) as transaction:
                        for (database, key), value in batch.items():
                            if value is None:
                                transaction.delete(key, db=databases[database])
                            else:
                                transaction.put(key, value, db=databases[database])
                        result = apply(transaction) if apply is not None else None
                    return result  # type: ignore[return-value]
                except lmdb.MapFullError:
                    self._grow_map()
                    databases = self._databases
                except lmdb.Error as error:
                    failure = self._fail(f"commit to the metadata store at {self.path} failed: {error}", error)
                    self._reopen()
                    raise failure from error
        finally:
            self._gate.release_exclusive()

    def _grow_map(self) -> None:
        current = self._env.info()["map_size"]
        if current >= self._limits.map_size_bytes_max:
            raise MetadataError(
                f"the metadata store at {self.path} is full: its map reached "
                f"map_size_bytes_max ({self._limits.map_size_bytes_max} bytes)"
            )
        new_size = min(current * 2, self._limits.map_size_bytes_max)
        try:
            self._env.set_mapsize(new_size)  # the caller holds the gate exclusively
        except lmdb.Error as error:
            raise self._fail(f"growing the map of {self.path} to {new_size} bytes failed: {error}", error) from error
        self._map_growths += 1

    # -- failed commits -------------------------------------------------------

    def _fail(self, message: str, error: lmdb.Error) -> MetadataUnavailableError:
        """Enter (or stay in) the failed state after a failed commit; returns the error
        to raise. The caller holds the write lock."""
        disk_full = isinstance(error, lmdb.DiskError) or getattr(error, "code", None) == errno.ENOSPC
        failure = (MetadataDiskFullError if disk_full else MetadataUnavailableError)(message)
        minimum_s = self._limits.commit_retry_ms_min / 1000
        maximum_s = self._limits.commit_retry_ms_max / 1000
        first = self._failure is None
        self._retry_delay_s = minimum_s if first else min(self._retry_delay_s * 2, maximum_s)
        self._retry_at = self._monotonic() + self._retry_delay_s
        self._failed_commits += 1
        self._episode_failed_commits = 1 if first else self._episode_failed_commits + 1
        if first:
            self._failed_since_ms = _now_ms()
            log.error(
                "%s; refusing commits, retrying from %.1f s on (staged entries are kept)", message, self._retry_delay_s
            )
        else:
            log.debug("%s (retry %d)", message, self._episode_failed_commits)
        self._failure = failure
        return failure

    def _refusal(self) -> MetadataUnavailableError:
        """The error for a commit refused while the store waits to retry."""
        failure = self._failure
        assert failure is not None
        retry_in_s = max(0.0, self._retry_at - self._monotonic())
        return type(failure)(
            f"the metadata store at {self.path} is not committing: {self._episode_failed_commits} commit(s) "
            f"failed, the last: {failure}; next try in {retry_in_s:.1f} s"
        )

    def _recovered(self) -> None:
        seconds = (_now_ms() - (self._failed_since_ms or _now_ms())) / 1000
        log.warning(
            "the metadata store at %s commits again after %d failed commit(s) over %.1f s",
            self.path,
            self._episode_failed_commits,
            seconds,
        )
        self._failure = None
        self._failed_since_ms = None
        self._retry_delay_s = 0.0
        self._recoveries += 1

    def _probe(self, transaction: lmdb.Transaction[bytes]) -> None:
        """A write that leaves nothing behind yet writes pages and a meta page: a key no
        topic name can be (it starts with NUL), put and deleted."""
        transaction.put(_PROBE_KEY, b"", db=self._topics)
        transaction.delete(_PROBE_KEY, db=self._topics)

    def _reopen(self) -> None:
        """Close and reopen the environment (the caller holds the gate exclusively): a
        failed meta page write leaves LMDB's environment refusing every transaction until
        it is reopened; reopening reads the last committed meta page. If it cannot be
        reopened, reads fail and the next commit tries again."""
        try:
            map_size_bytes = self._env.info()["map_size"]
        except lmdb.Error:
            map_size_bytes = self._limits.map_size_bytes
        self._env.close()
        self._env_closed = True
        try:
            self._open_environment(map_size_bytes)
        except MetadataError as error:
            log.error("the metadata store at %s could not be reopened after a failed commit: %s", self.path, error)
            return
        self._env_closed = False
