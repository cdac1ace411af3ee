"""Compaction, piece by piece: a crash at every step of a swap (I14), readers racing a
run and a file slice taken before a swap (I15), retention racing a run, corrupt input,
cancellation, the checkpoint codec, the key check for produce."""

from __future__ import annotations

import os
import threading

import pytest

from nodi.storage.compaction import (
    COMPACTION_CHECKPOINT_FILE,
    KEY_MAP_ENTRY_BYTES,
    CompactionCancelledError,
    CompactionConfig,
    Compactor,
    KeyRequiredError,
    decode_compaction_checkpoint,
    dirty_ratio,
    encode_compaction_checkpoint,
    read_first_dirty_offset,
    require_keys,
)
from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.errors import CorruptSegmentError, InvalidConfigError
from nodi.storage.fileio import OsFileSystem
from nodi.storage.log import Log
from nodi.storage.records import BATCH_HEADER_BYTES, NewRecord, build_batch, decode_batches, iter_batches, parse_header
from nodi.storage.segment import BatchScanner

CONFIG = LogConfig(
    segment_bytes=4096, index_interval_bytes=256, fsync_policy=FsyncPolicy.NEVER, retention_ms=None, dense_offsets=False
)
KEYS = 16


def fill(log: Log, batches: int, *, first: int = 0, prefix: bytes = b"key") -> dict[int, tuple[bytes, bytes | None]]:
    appended: dict[int, tuple[bytes, bytes | None]] = {}
    for number in range(first, first + batches):
        records = [
            (prefix + b"-%d" % ((number * 3 + index) % KEYS), b"value-%d-%d" % (number, index) * 3)
            for index in range(4)
        ]
        result = log.append(build_batch([NewRecord(key, value) for key, value in records]))
        for index, record in enumerate(records):
            appended[result.first_offset + index] = record
    return appended


def stored(log: Log, bytes_max: int = 1 << 20) -> list[tuple[int, bytes | None, bytes | None]]:
    out: list[tuple[int, bytes | None, bytes | None]] = []
    offset = log.log_start_offset
    while offset < log.next_offset:
        result = log.read(offset, bytes_max)
        if not result.slices:
            break
        assert result.next_offset is not None  # the read returned slices
        out.extend((r.offset, r.key, r.value) for r in decode_batches(result.to_bytes()) if r.offset >= offset)
        offset = result.next_offset
    return out


def latest_of(appended: dict[int, tuple[bytes, bytes | None]], end: int | None = None) -> list:
    latest: dict[bytes, int] = {}
    for offset, (key, _) in sorted(appended.items()):
        if end is None or offset < end:
            latest[key] = offset
    kept = set(latest.values())
    return [
        (offset, *appended[offset])
        for offset in sorted(appended)
        if (end is not None and offset >= end) or offset in kept
    ]


class CrashingFileSystem(OsFileSystem):
    """Raises at the n-th rename/unlink/directory fsync: what the directory holds then is
    what a crash at that step leaves (the page cache survives a process crash, F5)."""

    class Crash(Exception):
        pass

    def __init__(self, crash_at: int) -> None:
        self.crash_at = crash_at
        self.steps = 0
        self.paths: list[str] = []

    def _step(self, path: str) -> None:
        self.steps += 1
        self.paths.append(path)
        if self.steps == self.crash_at:
            raise self.Crash(f"crash at step {self.steps}")

    def rename(self, source: str, destination: str) -> None:
        self._step(destination)
        super().rename(source, destination)

    def unlink(self, path: str) -> None:
        self._step(path)
        super().unlink(path)

    def sync_directory(self, path: str) -> None:
        self._step(path)
        super().sync_directory(path)


def fill_mixed(log: Log, batches: int, *, first: int = 0) -> dict[int, tuple[bytes, bytes | None]]:
    """Three overwritten keys and one key written once per batch: every segment keeps
    records that must stay, so a lost segment shows."""
    appended: dict[int, tuple[bytes, bytes | None]] = {}
    for number in range(first, first + batches):
        records = [(b"hot-%d" % ((number + index) % KEYS), b"value-%d-%d" % (number, index)) for index in range(3)]
        records.append((b"once-%d" % number, b"cold-%d" % number))
        result = log.append(build_batch([NewRecord(key, value) for key, value in records]))
        for index, record in enumerate(records):
            appended[result.first_offset + index] = record
    return appended


@pytest.mark.parametrize("variant", ["fresh", "merging"])
def test_a_crash_at_every_step_of_a_run_recovers_to_the_old_or_the_new_segments(tmp_path, variant):
    """I14: for each step k of a whole run (renames, unlinks, directory fsyncs of the
    swaps, merges and the checkpoint), stop there, reopen: no leftover, valid segments,
    every key's latest record in place; a second run then gives the compacted log.
    "merging": the log was compacted once, so this run merges the shrunken segments."""
    import shutil

    base = tmp_path / "base"
    with Log.open(str(base), CONFIG) as log:
        appended = fill_mixed(log, 40)
        log.roll()
        if variant == "merging":
            Compactor().compact(log)
            appended = {offset: appended[offset] for offset, _, _ in stored(log)}
            appended.update(fill_mixed(log, 15, first=40))
            log.roll()
        end = log.segments[-1].base_offset
        segments_before = len(log.segments)
    counting = CrashingFileSystem(crash_at=0)
    shutil.copytree(base, tmp_path / "count")
    log = Log.open(str(tmp_path / "count"), CONFIG, fs=counting)
    steps_before = counting.steps
    Compactor().compact(log)
    total = counting.steps - steps_before
    if variant == "merging":
        assert any("compaction.merging" in path for path in counting.paths)
        assert len(log.segments) < segments_before
    log.close()
    assert total > 10
    for crash_at in range(1, total + 1):
        directory = tmp_path / f"crash-{crash_at}"
        shutil.copytree(base, directory)
        fs = CrashingFileSystem(crash_at=0)
        log = Log.open(str(directory), CONFIG, fs=fs)
        fs.crash_at = fs.steps + crash_at
        with pytest.raises(CrashingFileSystem.Crash):
            Compactor().compact(log)
        # Abandoned like a crashed process: its files stay as they are.
        with Log.open(str(directory), CONFIG) as reopened:
            names = os.listdir(directory)
            leftovers = [n for n in names if n.endswith((".cleaned", ".swap", ".deleted", ".merging"))]
            assert not leftovers, (crash_at, names)
            for segment in reopened.segments:
                scanner = BatchScanner(segment.open_file(), 0, segment.size, verify=True, limits=CONFIG.limits)
                assert sum(1 for _ in scanner) >= 0 and scanner.position == segment.size
            bases = [segment.base_offset for segment in reopened.segments]
            assert bases == sorted(set(bases))
            records = stored(reopened)
            assert [r[0] for r in records] == sorted({r[0] for r in records})
            for offset, key, value in records:
                assert appended[offset] == (key, value)
            present = {r[0] for r in records}
            assert set(o for o, *_ in latest_of(appended)) <= present, crash_at
            Compactor().compact(reopened)
            assert stored(reopened) == latest_of(appended, end)


def test_readers_racing_compaction_see_whole_segments_and_every_latest_value(tmp_path) -> None:
    """I15: readers reading the whole log again and again (small budgets: many segment
    lookups through the indexes) while runs swap segments under them."""
    log = Log.open(str(tmp_path / "log"), CONFIG)
    appended = fill(log, 60)
    log.roll()
    boundary = log.next_offset  # later appends use other keys: these latest values stay
    latest = {key: offset for offset, (key, _) in sorted(appended.items())}
    stop = threading.Event()
    failures: list[BaseException] = []
    reads = [0]

    def reader() -> None:
        try:
            while not stop.is_set():
                records = stored(log, bytes_max=300)
                offsets = [r[0] for r in records]
                assert offsets == sorted(set(offsets))
                for offset, key, value in records:
                    if offset < boundary:
                        assert appended[offset] == (key, value)
                assert set(latest.values()) <= set(offsets)
                reads[0] += 1
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    compactor = Compactor(CompactionConfig(KEY_MAP_ENTRY_BYTES * 3))
    for _ in range(2):
        compactor.compact(log)
        fill(log, 20, first=1000, prefix=b"other")  # new overwrites: later runs have work again
        log.roll()
    stop.set()
    for thread in threads:
        thread.join(60)
    log.close()
    assert not failures, failures[0]
    assert reads[0] > 0
    assert compactor.statistics().segments_rewritten > 0


def test_a_file_slice_taken_before_a_swap_still_reads_the_old_batches(tmp_path):
    log = Log.open(str(tmp_path / "log"), CONFIG)
    fill(log, 40)
    log.roll()
    before = log.read(0, 1 << 20)
    old_bytes = before.to_bytes()
    Compactor().compact(log)
    assert log.read(0, 1 << 20).to_bytes() != old_bytes  # the first segment was rewritten
    again = before.to_bytes()  # the slices' descriptors still name the old, unlinked file
    assert again == old_bytes
    assert all(header.size for header, _ in iter_batches(again))  # whole, CRC-valid batches
    fileno = before.slices[0].file.fileno()
    assert fileno is not None and os.fstat(fileno).st_nlink == 0  # unlinked, still readable
    log.close()


def test_a_segment_taken_before_a_swap_keeps_reading_its_own_index(tmp_path):
    """I15: a reader that took the segment list before a swap and looks the offset up
    only after it goes through the old index into the old file, never the new index."""
    log = Log.open(str(tmp_path / "log"), CONFIG)
    fill(log, 40)
    log.roll()  # sealed in this process: their index files are not opened yet
    old = log.segments[0]
    Compactor().compact(log)
    assert log.segments[0] is not old and log.segments[0].size < old.size
    entries = old.index.entries()
    assert entries
    for relative_offset, position in entries:
        header = parse_header(old.file.pread(BATCH_HEADER_BYTES, position))
        assert header.base_offset == old.base_offset + relative_offset
    last = old.base_offset + entries[-1][0]
    assert old.position_floor(last) == entries[-1][1]
    log.close()


def test_segments_compacted_to_nothing_leave_the_log_but_the_first_stays(tmp_path):
    directory = str(tmp_path / "log")
    log = Log.open(directory, CONFIG)
    appended = fill(log, 60)  # every key is written again below: all of this goes
    log.roll()
    overwrite = fill(log, KEYS // 4 + 1, first=60)
    log.roll()
    middle = log.read(log.segments[2].base_offset, 1 << 20)  # a reader inside a doomed segment
    before = len(log.segments)
    assert before > 4
    Compactor().compact(log)
    appended.update(overwrite)
    sizes = [segment.size for segment in log.segments]
    assert len(log.segments) < before
    assert log.log_start_offset == 0 and sizes[0] == 0  # the first stays, empty: the log start holds
    assert all(size > 0 for size in sizes[1:-1])
    assert stored(log) == latest_of(appended)
    assert middle.to_bytes() and decode_batches(middle.to_bytes())  # still the old batches
    assert not [n for n in os.listdir(directory) if n.endswith((".cleaned", ".swap", ".deleted"))]
    log.close()
    with Log.open(directory, CONFIG) as reopened:
        assert [segment.size for segment in reopened.segments] == sizes
        assert stored(reopened) == latest_of(appended)


def test_retention_removing_segments_during_a_run_is_not_an_error(tmp_path):
    config = LogConfig(
        segment_bytes=4096,
        index_interval_bytes=256,
        fsync_policy=FsyncPolicy.NEVER,
        retention_ms=None,
        retention_bytes=8192,
        dense_offsets=False,
    )
    log = Log.open(str(tmp_path / "log"), config)
    fill(log, 80)
    log.roll()
    compactor = Compactor(CompactionConfig(KEY_MAP_ENTRY_BYTES * 2))
    original = log.replace_sealed_segments

    def replace_after_retention(olds, install):
        log.apply_retention()  # every old segment but the last two goes now
        return original(olds, install)

    log.replace_sealed_segments = replace_after_retention
    compactor.compact(log)
    log.replace_sealed_segments = original
    assert not [n for n in os.listdir(log.directory) if n.endswith((".cleaned", ".swap", ".deleted"))]
    records = stored(log)
    assert [r[0] for r in records] == sorted({r[0] for r in records})
    log.close()
    with Log.open(str(tmp_path / "log"), config) as reopened:
        assert stored(reopened) == records


def test_a_corrupt_sealed_batch_stops_the_run_and_leaves_no_partial_file(tmp_path):
    log = Log.open(str(tmp_path / "log"), CONFIG)
    fill(log, 40)
    log.roll()
    victim = log.segments[1]
    with open(victim.log_path, "r+b") as file:
        file.seek(100)
        byte = file.read(1)
        file.seek(100)
        file.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptSegmentError):
        Compactor().compact(log)
    assert not [n for n in os.listdir(log.directory) if n.endswith((".cleaned", ".swap"))]
    assert Compactor().statistics().runs == 0
    log.close()


def test_cancel_stops_a_run_and_refuses_the_next(tmp_path):
    log = Log.open(str(tmp_path / "log"), CONFIG)
    fill(log, 40)
    log.roll()
    compactor = Compactor()
    compactor.cancel()
    with pytest.raises(CompactionCancelledError):
        compactor.compact(log)
    assert compactor.statistics(log.directory).failures == 1
    assert Compactor().compact(log).records_removed > 0  # another compactor is unaffected
    log.close()


def test_only_logs_with_offset_gaps_allowed_are_compacted(tmp_path):
    with Log.open(str(tmp_path / "log"), LogConfig(fsync_policy=FsyncPolicy.NEVER)) as log:
        with pytest.raises(InvalidConfigError):
            Compactor().compact(log)


def test_dirty_ratio_and_checkpoint(tmp_path):
    log = Log.open(str(tmp_path / "log"), CONFIG)
    assert dirty_ratio(log) == 0.0
    fill(log, 40)
    log.roll()
    assert dirty_ratio(log) == 1.0 and read_first_dirty_offset(log) == 0
    result = Compactor().compact(log)
    assert dirty_ratio(log) == 0.0
    assert read_first_dirty_offset(log) == result.first_dirty_offset == log.segments[-1].base_offset
    fill(log, 40, first=40)
    log.roll()
    assert 0.0 < dirty_ratio(log) <= 1.0
    path = os.path.join(log.directory, COMPACTION_CHECKPOINT_FILE)
    with open(path, "r+b") as file:  # damaged: everything counts as dirty again
        file.write(b"X")
    assert read_first_dirty_offset(log) == 0 and dirty_ratio(log) == 1.0
    log.close()


def test_checkpoint_codec():
    assert decode_compaction_checkpoint(encode_compaction_checkpoint(12345)) == 12345
    data = encode_compaction_checkpoint(7)
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        assert decode_compaction_checkpoint(bytes(damaged)) is None
    assert decode_compaction_checkpoint(data[:-1]) is None
    assert decode_compaction_checkpoint(b"") is None


def test_require_keys():
    require_keys(build_batch([NewRecord(b"k", b"v"), NewRecord(b"k2", None)]), CONFIG.limits)
    with pytest.raises(KeyRequiredError):
        require_keys(build_batch([NewRecord(b"k", b"v"), NewRecord(None, b"v")]), CONFIG.limits)


def test_compaction_config_limits():
    with pytest.raises(InvalidConfigError):
        CompactionConfig(key_map_bytes_max=KEY_MAP_ENTRY_BYTES - 1)
    with pytest.raises(InvalidConfigError):
        CompactionConfig(delete_retention_ms=-1)
    assert CompactionConfig(key_map_bytes_max=KEY_MAP_ENTRY_BYTES * 10).key_map_entries_max == 10
