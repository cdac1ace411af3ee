"""Offline inspection and repair of a data directory: what `nodi segments list | dump |
verify | recover` run (cli/segments.py is a thin printer around these).

Everything here reads batches through the one codec (records.py) and the one walker
(segment.BatchScanner); nothing parses a batch a second way. `list_segments`,
`dump_segment` and `verify_data_dir` open every file read-only and change nothing;
`recover_data_dir` is the only writer, and it writes only by running the log's own
recovery (Log.open, docs/fault-model.md "Recovery procedure") and a clean close.

recover_data_dir takes the data directory's lock (storage/lock.py) first and refuses a
directory in use. The readers take no lock: run them with the broker stopped, or read
their output knowing a partition being appended to changes under them (the CLI warns).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from .checkpoint import CHECKPOINT_FILE, CLEAN_SHUTDOWN_FILE, decode_checkpoint
from .config import FsyncPolicy, LogConfig
from .errors import CorruptBatchError, InvalidRecordError, MetadataError, NodiError
from .fileio import OsFile, OsFileSystem, read_whole_file
from .layout import (
    LOGS_DIRECTORY,
    PartitionDirectory,
    iter_partition_directories,
    logs_directory,
    meta_directory,
)
from .limits import DEFAULT_RECORD_LIMITS, RecordLimits
from .lmdb_file import DATA_FILE_NAME, check_data_file
from .lock import DataDirectoryLock
from .log import Log
from .log_start import LOG_START_FILE, read_log_start
from .metadata import (
    DATABASES_MAX,
    TABLES,
    MetadataStore,
    decode_deletion_value,
    decode_group_key,
    decode_offset_value,
    decode_topic_value,
    validate_topic_name,
)
from .producers import SNAPSHOT_FILE
from .records import BatchHeader, Record, check_records, compute_crc, decode_records
from .recovery import CLEANED_SUFFIX, SWAP_SUFFIX, RecoveryReport
from .segment import (
    DELETED_SUFFIX,
    INDEX_SUFFIX,
    LOG_SUFFIX,
    TIME_INDEX_SUFFIX,
    BatchScanner,
    Segment,
    parse_segment_name,
    segment_name,
)
from .store import DELETING_SUFFIX, log_config_for

# Files of a partition directory that belong to no one segment.
PARTITION_FILES = (CHECKPOINT_FILE, CLEAN_SHUTDOWN_FILE, SNAPSHOT_FILE, LOG_START_FILE)

# progress(bytes_done, bytes_total), called now and then during a long operation.
ProgressCallback = Callable[[int, int], None]
# How often (in bytes of batches walked) verify reports progress.
PROGRESS_STEP_BYTES = 4 * 1024 * 1024

ERROR = "error"
WARNING = "warning"
TRANSIENT_SUFFIXES = (".tmp", DELETED_SUFFIX, CLEANED_SUFFIX, SWAP_SUFFIX)


class ReadOnlyFileSystem(OsFileSystem):
    """The real file system, every file opened O_RDONLY: inspection cannot write, and
    works on a read-only copy of a data directory."""

    def open(self, path: str, *, create: bool = False) -> OsFile:
        assert not create, "the read-only file system creates nothing"
        return OsFile(path, os.open(path, os.O_RDONLY | os.O_CLOEXEC))


READ_ONLY_FILE_SYSTEM = ReadOnlyFileSystem()


@dataclass(frozen=True, slots=True)
class Problem:
    """Something verify (or dump) found. `position` is a byte position in `path` and
    `offset` the first offset concerned, each None when not known."""

    path: str
    position: int | None
    offset: int | None
    reason: str
    severity: str = ERROR

    def describe(self) -> str:
        where = self.path
        if self.position is not None:
            where += f" at position {self.position}"
        if self.offset is not None:
            where += f" (offset {self.offset})"
        return f"{self.severity.upper()}: {where}: {self.reason}"

    def to_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "path": self.path,
            "position": self.position,
            "offset": self.offset,
            "reason": self.reason,
        }


# ---------------------------------------------------------------------------
# list


@dataclass(frozen=True, slots=True)
class SegmentListing:
    path: str
    base_offset: int
    byte_count: int
    index_entries: int
    time_index_entries: int
    # None unless asked for (counting walks every batch header of the segment).
    batch_count: int | None
    # One past the last offset held: the next segment's base offset for a sealed
    # segment, from the last index entry and a walk of the tail for the last one.
    next_offset: int | None
    # Why next_offset / batch_count may be short (a batch that does not check out).
    note: str | None = None


@dataclass(frozen=True, slots=True)
class PartitionListing:
    topic: str
    partition: int
    path: str
    segments: tuple[SegmentListing, ...]
    # None when the checkpoint is missing or unreadable (the next open scans everything).
    recovery_offset: int | None
    clean_shutdown: bool
    # Where delete_records moved the log start (the `log-start-offset` file, I21); None
    # without one (or an unreadable one).
    stored_log_start_offset: int | None = None

    @property
    def byte_count(self) -> int:
        return sum(segment.byte_count for segment in self.segments)

    @property
    def log_start_offset(self) -> int | None:
        """The first offset the log serves: the first segment's base offset, or the
        stored start above it (clamped to the log end, as Log.open does)."""
        if not self.segments:
            return None
        start = self.segments[0].base_offset
        if self.stored_log_start_offset is None or self.stored_log_start_offset <= start:
            return start
        end = self.next_offset
        return self.stored_log_start_offset if end is None else min(self.stored_log_start_offset, end)

    @property
    def next_offset(self) -> int | None:
        return self.segments[-1].next_offset if self.segments else None


def list_segments(
    data_dir: str | os.PathLike[str],
    *,
    count_batches: bool = False,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> list[PartitionListing]:
    """Every partition and its segments, cheaply: sizes, index entry counts, and each
    segment's next offset (only the last segment's tail after its last index entry is
    walked). With `count_batches`, every batch header is walked (no CRC check) to count
    batches; that reads every segment."""
    return [_list_partition(partition, count_batches, limits) for partition in iter_partition_directories(data_dir)]


def _list_partition(partition: PartitionDirectory, count_batches: bool, limits: RecordLimits) -> PartitionListing:
    fs = READ_ONLY_FILE_SYSTEM
    bases = _segment_bases(partition.path)
    listings = []
    for number, base in enumerate(bases):
        segment = Segment(fs, partition.path, base)
        try:
            size = segment.open_file().size()
            segment.size = size
            batch_count = note = None
            if count_batches:
                batch_count, next_offset, note = _walk_headers(segment, 0, limits)
            elif number + 1 < len(bases):
                next_offset = bases[number + 1]
            else:
                _, next_offset, note = _walk_headers(segment, _tail_start(segment), limits)
            listings.append(
                SegmentListing(
                    segment.log_path,
                    base,
                    size,
                    len(segment.index),
                    len(segment.time_index),
                    batch_count,
                    next_offset,
                    note,
                )
            )
        finally:
            segment.close()
    checkpoint_data = read_whole_file(fs, os.path.join(partition.path, CHECKPOINT_FILE))
    checkpoint = None if checkpoint_data is None else decode_checkpoint(checkpoint_data)
    return PartitionListing(
        partition.topic,
        partition.partition,
        partition.path,
        tuple(listings),
        None if checkpoint is None else checkpoint.recovery_offset,
        fs.exists(os.path.join(partition.path, CLEAN_SHUTDOWN_FILE)),
        read_log_start(fs, partition.path)[0],
    )


def _tail_start(segment: Segment) -> int:
    """The position of the batch named by the last `.index` entry when that entry
    checks out, else 0 (walk the whole segment)."""
    if segment.index.check_file() is not None:
        return 0
    last = segment.index.last()
    if last is None or last[1] >= segment.size:
        return 0
    try:
        header = segment.read_header(last[1])
    except InvalidRecordError:
        return 0
    return last[1] if header.base_offset == segment.base_offset + last[0] else 0


def _walk_headers(segment: Segment, start: int, limits: RecordLimits) -> tuple[int, int, str | None]:
    """(batches, next offset, why the walk stopped early or None) from `start`."""
    count = 0
    next_offset = segment.base_offset
    scanner = segment.scanner(start, verify=False, limits=limits)
    try:
        for batch in scanner:
            count += 1
            next_offset = batch.header.last_offset + 1
    except CorruptBatchError as error:
        return count, next_offset, f"stops at position {scanner.position}: {error}"
    return count, next_offset, None


# ---------------------------------------------------------------------------
# dump


@dataclass(frozen=True, slots=True)
class DumpedBatch:
    position: int
    header: BatchHeader
    crc_ok: bool
    # Decoded when asked for and the CRC checks out; else None.
    records: tuple[Record, ...] | None = None
    # Why the records are not there although asked for.
    records_error: str | None = None


def dump_segment(
    path: str | os.PathLike[str],
    *,
    records: bool = False,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> Iterator[DumpedBatch | Problem]:
    """Every batch of one `.log` file, in order, with whether its CRC checks out (the
    walk goes on past a CRC mismatch: the length field still leads to the next batch).
    With `records`, each batch whose CRC checks out is decoded. A batch that cannot be
    walked past (length bounds, magic, a torn tail) ends the dump with a Problem."""
    path = os.fspath(path)
    file = READ_ONLY_FILE_SYSTEM.open(path)
    try:
        expected = parse_segment_name(os.path.basename(path))
        scanner = BatchScanner(file, 0, file.size(), verify=False, limits=limits)
        try:
            for batch in scanner:
                header = batch.header
                data = file.pread(header.size, batch.position)
                crc_ok = compute_crc(data) == header.crc
                decoded = error = None
                if records and not crc_ok:
                    error = "not decoded: crc mismatch"
                elif records:
                    try:
                        decoded = tuple(decode_records(data, header, limits))
                    except InvalidRecordError as decode_error:
                        error = f"not decoded: {decode_error}"
                expected = header.last_offset + 1
                yield DumpedBatch(batch.position, header, crc_ok, decoded, error)
        except CorruptBatchError as corrupt:
            yield Problem(path, scanner.position, expected, str(corrupt))
    finally:
        file.close()


# ---------------------------------------------------------------------------
# verify


class _Progress:
    """Accumulates bytes done and calls the callback at most every PROGRESS_STEP_BYTES."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0
        self._reported = -1

    def advance(self, byte_count: int) -> None:
        self.done += byte_count
        if self.done - self._reported >= PROGRESS_STEP_BYTES:
            self.report()

    def report(self) -> None:
        if self.callback is not None and self.done != self._reported:
            self._reported = self.done
            self.callback(min(self.done, self.total), self.total)


def _segment_bases(directory: str) -> list[int]:
    return sorted(base for base in map(parse_segment_name, os.listdir(directory)) if base is not None)


def _log_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(directory, segment_name(base) + LOG_SUFFIX)) for base in _segment_bases(directory)
    )


def verify_data_dir(
    data_dir: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
    limits: RecordLimits = DEFAULT_RECORD_LIMITS,
) -> list[Problem]:
    """Check every batch of every segment of every partition, read-only: length bounds,
    magic and CRC (BatchScanner with verify), every record's framing (check_records, the
    walk produce runs), offset continuity within and across
    segments (I1, I3; a gap is only a warning, compaction leaves gaps), each file ending
    exactly at its last batch (I2), and each `.index` / `.timeindex` (I7). Also warns
    about leftovers the next open removes, unknown files and the checkpoint.

    Returns the problems found, errors and warnings (Problem.severity), in file order."""
    partitions = list(iter_partition_directories(data_dir))
    problems = verify_metadata_store(data_dir)
    problems.extend(_check_logs_directory(data_dir, partitions))
    tracker = _Progress(progress, sum(_log_bytes(partition.path) for partition in partitions))
    tracker.report()
    for partition in partitions:
        problems.extend(_verify_partition(partition.path, limits, tracker))
    tracker.report()
    return problems


def verify_metadata_store(data_dir: str | os.PathLike[str]) -> list[Problem]:
    """Check the metadata store (DATA_DIR/meta/data.mdb), read-only: its header and size
    (storage/lmdb_file.py: what the broker checks before mapping it), every page's
    structure with py-lmdb's offline verifier where the installed py-lmdb has one (it
    reads the file without LMDB, so a damaged file cannot crash it), then, opened
    read-only, every entry of every table: topic names and settings, group-partition
    keys, committed-offset values. Stops at the first layer that fails: LMDB is never
    given a file that did not pass the layers below."""
    meta = meta_directory(data_dir)
    path = os.path.join(meta, DATA_FILE_NAME)
    if not os.path.exists(path):
        return [_warning(path, "no metadata store: no topics are defined in this data directory")]
    try:
        check_data_file(meta)
    except MetadataError as error:
        return [Problem(path, None, None, str(error).removeprefix(path).lstrip(": "))]
    problems = [Problem(path, None, None, f"LMDB structure: {finding}") for finding in _lmdb_structure(path)]
    if problems:
        return problems
    return _verify_metadata_tables(meta, path)


def _lmdb_structure(path: str) -> list[str]:
    """py-lmdb's offline page walk (lmdb.verify, py-lmdb 2.1 and later); [] without it."""
    try:
        from lmdb.verify import VerifyError, verify
    except ImportError:
        return []
    try:
        return list(verify(path, subdir=False))
    except (VerifyError, OSError) as error:
        return [str(error)]


def _verify_metadata_tables(meta: str, path: str) -> list[Problem]:
    import lmdb

    problems: list[Problem] = []
    try:
        env = lmdb.open(meta, subdir=True, readonly=True, max_dbs=DATABASES_MAX)
    except lmdb.Error as error:
        return [Problem(path, None, None, f"LMDB cannot open it read-only: {error}")]
    try:
        tables = {}
        for name in TABLES:
            try:
                tables[name] = env.open_db(name, create=False)
            except lmdb.NotFoundError:
                if name != b"deleted_topics":  # a store from before it: the next open adds it
                    problems.append(Problem(path, None, None, f"table {name.decode()!r} is missing"))
        with env.begin() as transaction:
            topics: set[str] = set()
            if b"topics" in tables:
                for key, value in transaction.cursor(db=tables[b"topics"]):
                    topic_name = bytes(key).decode("ascii", errors="replace")
                    try:
                        validate_topic_name(topic_name)
                        decode_topic_value(topic_name, value)
                        topics.add(topic_name)
                    except NodiError as error:
                        problems.append(Problem(path, None, None, f"table 'topics', key {bytes(key)!r}: {error}"))
            if b"deleted_topics" in tables:
                for key, value in transaction.cursor(db=tables[b"deleted_topics"]):
                    try:
                        validate_topic_name(bytes(key).decode("ascii", errors="replace"))
                        decode_deletion_value(value)
                    except NodiError as error:
                        problems.append(
                            Problem(path, None, None, f"table 'deleted_topics', key {bytes(key)!r}: {error}")
                        )
            for table in (b"offsets", b"queue_state"):
                if table not in tables:
                    continue
                for key, value in transaction.cursor(db=tables[table]):
                    where = f"table {table.decode()!r}, key {bytes(key)!r}"
                    try:
                        group, topic, partition = decode_group_key(key)
                        if table == b"offsets":
                            decode_offset_value(value)
                    except NodiError as error:
                        problems.append(Problem(path, None, None, f"{where}: {error}"))
                        continue
                    if topic not in topics:
                        problems.append(
                            _warning(
                                path,
                                f"{where}: group {group!r} has state for "
                                f"{topic}-{partition}, a topic that does not exist "
                                "(the broker ignores it)",
                            )
                        )
    except lmdb.Error as error:
        problems.append(Problem(path, None, None, f"reading it failed: {error}"))
    finally:
        env.close()
    return problems


def _warning(path: str, reason: str, *, position: int | None = None, offset: int | None = None) -> Problem:
    return Problem(path, position, offset, reason, WARNING)


def _check_logs_directory(data_dir: str | os.PathLike[str], partitions: list[PartitionDirectory]) -> list[Problem]:
    logs = logs_directory(data_dir)
    if not os.path.isdir(logs):
        return [_warning(logs, f"no {LOGS_DIRECTORY}/ directory: no partition logs here")]
    known = {os.path.basename(partition.path) for partition in partitions}
    problems = []
    for name in sorted(set(os.listdir(logs)) - known):
        if name.endswith(DELETING_SUFFIX):
            reason = "a partition of a topic being deleted (the next broker start removes it)"
        else:
            reason = "not a <topic>-<partition> log directory"
        problems.append(_warning(os.path.join(logs, name), reason))
    return problems


def _verify_partition(directory: str, limits: RecordLimits, tracker: _Progress) -> list[Problem]:
    problems = _check_partition_files(directory)
    bases = _segment_bases(directory)
    if not bases:
        problems.append(_warning(directory, "no segment (the next open starts an empty log)"))
        return problems
    expected: int | None = None  # the offset the next segment should start at
    for base in bases:
        segment = Segment(READ_ONLY_FILE_SYSTEM, directory, base)
        try:
            segment.size = segment.open_file().size()
            if expected is not None and base < expected:
                reason = f"segment starts at {base}, below the previous segment's end {expected} (I1)"
                problems.append(Problem(segment.log_path, 0, base, reason))
            elif expected is not None and base > expected:
                reason = f"offsets {expected}..{base - 1} missing before this segment"
                problems.append(_warning(segment.log_path, reason, position=0, offset=expected))
            segment_problems, expected = _verify_segment(segment, limits, tracker)
            problems.extend(segment_problems)
        finally:
            segment.close()
    problems.extend(_check_checkpoint(directory, expected))
    problems.extend(_check_log_start(directory, expected))
    return problems


def _check_partition_files(directory: str) -> list[Problem]:
    """Files that are neither a segment's nor the partition's own."""
    names = os.listdir(directory)
    logs = {name.partition(".")[0] for name in names if parse_segment_name(name) is not None}
    problems = []
    for name in sorted(names):
        path = os.path.join(directory, name)
        stem, _, suffix = name.partition(".")
        is_index = "." + suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX)
        if name.endswith(TRANSIENT_SUFFIXES):
            reason = "leftover of an interrupted write, deletion or compaction (the next open clears it)"
            problems.append(_warning(path, reason))
        elif is_index and stem not in logs:
            problems.append(_warning(path, "index without its .log (the next open removes it)"))
        elif not is_index and parse_segment_name(name) is None and name not in PARTITION_FILES:
            problems.append(_warning(path, "unknown file in a partition directory"))
    return problems


def _verify_segment(segment: Segment, limits: RecordLimits, tracker: _Progress) -> tuple[list[Problem], int | None]:
    """Walk every batch with its CRC checked. Returns the problems and the offset the
    next segment should start at (None when a bad batch hides the segment's end)."""
    problems: list[Problem] = []
    path = segment.log_path
    # Reported after the .log's own problems: the file order of `verify`'s output.
    index_problem, index_entries = _offset_index_entries(segment)
    expected = segment.base_offset
    previous: tuple[int, int] | None = None  # (position, last offset) of the batch before
    scanner = segment.scanner(0, verify=True, limits=limits)
    try:
        for batch in scanner:
            header = batch.header
            if header.base_offset < expected:
                if previous is None:
                    reason = f"batch starts at offset {header.base_offset}, below the segment's base offset (I1)"
                else:
                    reason = (
                        f"batch starts at offset {header.base_offset} but the batch at position "
                        f"{previous[0]} ends at offset {previous[1]}: offsets go backwards (I3)"
                    )
                problems.append(Problem(path, batch.position, header.base_offset, reason))
            elif header.base_offset > expected:
                reason = f"offsets {expected}..{header.base_offset - 1} missing (a gap; compaction leaves gaps)"
                problems.append(_warning(path, reason, position=batch.position, offset=expected))
            framing = _check_framing(segment, batch.position, header, limits)
            if framing is not None:
                problems.append(Problem(path, batch.position, header.base_offset, framing))
            # Follow the file: one bad base_offset yields one problem, not a cascade.
            expected = header.last_offset + 1
            previous = (batch.position, header.last_offset)
            relative_offset = index_entries.pop(batch.position, None)
            if relative_offset is not None and segment.base_offset + relative_offset != header.base_offset:
                reason = (
                    f"entry (relative offset {relative_offset}, position {batch.position}) "
                    f"names a batch at offset {header.base_offset} (I7)"
                )
                problems.append(Problem(segment.index.path, batch.position, header.base_offset, reason))
            tracker.advance(header.size)
    except CorruptBatchError as error:
        problems.append(Problem(path, scanner.position, expected, str(error)))
        tracker.advance(segment.size - scanner.position)
        problems.extend([index_problem] if index_problem else [])
        return problems, None
    for position, relative_offset in sorted(index_entries.items()):
        reason = f"entry (relative offset {relative_offset}, position {position}) is not at a batch start (I7)"
        problems.append(Problem(segment.index.path, position, segment.base_offset + relative_offset, reason))
    problems.extend([index_problem] if index_problem else [])
    problems.extend(_check_time_index(segment, expected))
    return problems, expected


def _check_framing(segment: Segment, position: int, header: BatchHeader, limits: RecordLimits) -> str | None:
    """Why the records of the batch at `position` (its CRC checked) do not decode, or
    None: the walk produce runs (records.check_records). Such a batch was stored before
    produce walked records; readers skip it (docs/fault-model.md "Undecodable
    batches")."""
    try:
        check_records(segment.open_file().pread(header.size, position), header, limits)
    except InvalidRecordError as error:
        return (
            f"offsets {header.base_offset}..{header.last_offset}: the records do not decode ({error}); "
            "readers skip this batch"
        )
    return None


REBUILT_AT_OPEN = "the next open rebuilds it"
DELETE_TO_REBUILD = "I7; delete the file and the next open rebuilds it"


def _offset_index_entries(segment: Segment) -> tuple[Problem | None, dict[int, int]]:
    """(a problem or None, {position: relative offset}) of the `.index`. A missing or
    misshapen index is a warning (the next open rebuilds it); entries out of order or
    beyond the log are an error: the open checks only the last entry (I7)."""
    index = segment.index
    problem = index.check_file()
    if problem is not None:
        return _warning(index.path, f"{problem} ({REBUILT_AT_OPEN})"), {}
    problem = index.check_entries(segment.size)
    if problem is not None:
        return Problem(index.path, None, None, f"{problem} ({DELETE_TO_REBUILD})"), {}
    return None, {position: relative_offset for relative_offset, position in index.entries()}


def _check_time_index(segment: Segment, next_offset: int) -> list[Problem]:
    index = segment.time_index
    problem = index.check_file()
    if problem is not None:
        return [_warning(index.path, f"{problem} ({REBUILT_AT_OPEN})")]
    problem = index.check_entries(next_offset - segment.base_offset)
    if problem is not None:
        return [Problem(index.path, None, None, f"{problem} ({DELETE_TO_REBUILD})")]
    return []


def _check_log_start(directory: str, log_end_offset: int | None) -> list[Problem]:
    """The `log-start-offset` file (I21): records below it were deleted on purpose, so
    the segment bytes still holding some are no damage; an unreadable file or one past
    the log end is a warning (the next open ignores or clamps it)."""
    offset, problem = read_log_start(READ_ONLY_FILE_SYSTEM, directory)
    path = os.path.join(directory, LOG_START_FILE)
    if problem is not None:
        return [_warning(path, "unreadable log start offset file (the next open ignores it: deleted records reappear)")]
    if offset is not None and log_end_offset is not None and offset > log_end_offset:
        reason = f"log start offset {offset} is beyond the log end {log_end_offset} (the next open starts at the end)"
        return [_warning(path, reason, offset=log_end_offset)]
    return []


def _check_checkpoint(directory: str, log_end_offset: int | None) -> list[Problem]:
    path = os.path.join(directory, CHECKPOINT_FILE)
    data = read_whole_file(READ_ONLY_FILE_SYSTEM, path)
    if data is None:
        return []
    checkpoint = decode_checkpoint(data)
    if checkpoint is None:
        return [_warning(path, "unreadable checkpoint (the next open scans the whole log)")]
    if log_end_offset is not None and checkpoint.recovery_offset > log_end_offset:
        reason = (
            f"recovery point {checkpoint.recovery_offset} is beyond the log end {log_end_offset}: "
            "offsets the checkpoint vouched for are gone (I5)"
        )
        return [_warning(path, reason, offset=log_end_offset)]
    return []


# ---------------------------------------------------------------------------
# recover


@dataclass(frozen=True, slots=True)
class PartitionRecovery:
    topic: str
    partition: int
    path: str
    # None when the log could not be opened; `error` says why.
    report: RecoveryReport | None
    error: str | None = None


def topic_log_configs(data_dir: str | os.PathLike[str]) -> dict[str, LogConfig]:
    """Each topic's LogConfig from the metadata store in DATA_DIR/meta/ (as the broker
    opens its logs), flusher-less: recovery and the clean close fsync what they change.
    Empty when there is no metadata store. MetadataError when it cannot be read."""
    if not os.path.isdir(meta_directory(data_dir)):
        return {}
    with MetadataStore(data_dir) as metadata:
        topics = metadata.list_topics()
    return {name: replace(log_config_for(config), fsync_policy=FsyncPolicy.NEVER) for name, config in topics.items()}


def recover_data_dir(
    data_dir: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
    config_for: Callable[[str, int], LogConfig] | None = None,
    truncate_damaged: bool = False,
) -> list[PartitionRecovery]:
    """Open every partition with Log.open, which runs recovery (truncates a torn tail
    above the recovery point, drops later segments, rebuilds indexes, removes
    leftovers), then close it cleanly. Returns what each recovery did:
    RecoveryReport.first_lost_offset..last_lost_offset are the offsets it dropped. A
    partition that fails to open is reported and skipped.

    Damage below the recovery point (fsynced data, G4) is cut the same way only with
    `truncate_damaged` (lost_durable_data then says so); without it the partition is
    left as it was and its RecoveryReport.damage says where (file, position, offset).

    Each log is opened with its topic's settings from DATA_DIR/meta/ (topic_log_configs;
    a compacted topic's offset gaps are not damage), a partition of no known topic with
    the defaults (dense offsets). Sealed segments below the recovery point are not
    rescanned (as at every open); verify_data_dir checks them.

    DataDirectoryLockedError, having changed nothing, when a broker or another tool
    holds the data directory."""
    with DataDirectoryLock.acquire(data_dir):
        return _recover_locked(data_dir, progress, config_for, truncate_damaged)


def _recover_locked(
    data_dir: str | os.PathLike[str],
    progress: ProgressCallback | None,
    config_for: Callable[[str, int], LogConfig] | None,
    truncate_damaged: bool,
) -> list[PartitionRecovery]:
    if config_for is None:
        configs = topic_log_configs(data_dir)
        default = LogConfig(fsync_policy=FsyncPolicy.NEVER)

        def config_for(topic: str, partition: int) -> LogConfig:
            return configs.get(topic, default)

    partitions = list(iter_partition_directories(data_dir))
    sizes = [_log_bytes(partition.path) for partition in partitions]
    tracker = _Progress(progress, sum(sizes))
    tracker.report()
    results = []
    for partition, size in zip(partitions, sizes):
        problem: str | None
        try:
            log = Log.open(
                partition.path, config_for(partition.topic, partition.partition), truncate_damaged=truncate_damaged
            )
        except (NodiError, OSError) as error:
            report, problem = None, str(error)
        else:
            log.close()
            report = log.recovery_report
            # close() does not raise on a failed fsync; it leaves the log read-only (I9). A
            # damaged log is read-only from its open and closes without writing.
            statistics = log.statistics()
            failed_close = statistics.read_only and statistics.damage is None
            problem = "the clean close failed (an fsync or write error)" if failed_close else None
        results.append(PartitionRecovery(partition.topic, partition.partition, partition.path, report, problem))
        tracker.done += size
        tracker.report()
    return results
