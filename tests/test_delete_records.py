"""Log.delete_records: the log start offset moved forward (I21, docs/fault-model.md).

Reads below it are OFFSET_OUT_OF_RANGE as below retention, it survives restarts and a
crash at every I/O point of the call (the simulated disk's walk), whole segments below it
leave, and a damaged or missing start file never hides more than was asked."""

from __future__ import annotations

import os
import random

import pytest

from nodi.storage.admin import list_segments, verify_data_dir
from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.errors import LogClosedError, OffsetOutOfRangeError
from nodi.storage.log import DELETE_TO_END, Log
from nodi.storage.log_start import LOG_START_FILE, decode_log_start, encode_log_start
from nodi.storage.records import NewRecord, build_batch, decode_batches
from nodi.storage.simfs import SimulatedFileSystem, walk_crash_points

POLICIES = ("always", "interval", "never")
READ_BYTES_MAX = 64 * 1024


def _config(policy: str = "always") -> LogConfig:
    return LogConfig(segment_bytes=4096, index_interval_bytes=256, fsync_policy=FsyncPolicy(policy), retention_ms=None)


def _fill(log: Log, batches: int, *, first_timestamp_ms: int = 1_000) -> None:
    for _ in range(batches):
        offset = log.next_offset
        records = [NewRecord(b"k", b"v%d" % (offset + i) * 60, (), first_timestamp_ms + offset + i) for i in range(3)]
        log.append(build_batch(records))


def _read_all(log: Log, start: int) -> list[int]:
    offsets: list[int] = []
    offset = start
    while offset < log.readable_end_offset:
        result = log.read(offset, READ_BYTES_MAX)
        for record in decode_batches(result.to_bytes()):
            if record.offset >= offset:
                offsets.append(record.offset)
        assert result.next_offset is not None
        offset = result.next_offset
    return offsets


@pytest.mark.parametrize("policy", POLICIES)
def test_delete_records_moves_the_start_mid_segment_and_survives_reopen_I21(tmp_path, policy: str) -> None:
    directory = str(tmp_path / "t-0")
    log = Log.open(directory, _config(policy))
    _fill(log, 40)
    end = log.next_offset
    segments_before = len(log.segments)
    assert segments_before > 3
    target = log.segments[2].base_offset + 2  # inside the third segment, inside a batch
    result = log.delete_records(target)
    assert result.log_start_offset == log.log_start_offset == target
    assert [deleted.reason for deleted in result.deleted_segments] == ["delete-records"] * 2
    assert len(log.segments) == segments_before - 2
    assert log.segments[0].base_offset < target  # the segment holding it stays
    with pytest.raises(OffsetOutOfRangeError) as caught:
        log.read(target - 1, READ_BYTES_MAX)
    assert caught.value.log_start_offset == target
    assert _read_all(log, target) == list(range(target, end))
    assert log.read(target, 100).log_start_offset == target
    assert log.statistics().log_start_offset == target
    # Timestamps below the start are not found.
    assert log.offset_for_timestamp(0) == target
    # Backwards, or to where it is: nothing changes.
    assert log.delete_records(target - 5).log_start_offset == target
    assert log.delete_records(target).deleted_segments == ()
    with pytest.raises(OffsetOutOfRangeError):
        log.delete_records(end + 1)
    log.close()
    if policy == "never":  # a clean close fsyncs; an unclean open must keep it too
        os.unlink(os.path.join(directory, "clean-shutdown"))
    reopened = Log.open(directory, _config(policy))
    assert reopened.log_start_offset == target
    assert reopened.next_offset == end
    with pytest.raises(OffsetOutOfRangeError):
        reopened.read(target - 1, READ_BYTES_MAX)
    assert _read_all(reopened, target) == list(range(target, end))
    reopened.close()


def test_delete_to_end_removes_every_record_and_appends_go_on_I21(tmp_path) -> None:
    directory = str(tmp_path / "t-0")
    log = Log.open(directory, _config("never"))
    _fill(log, 12)
    end = log.next_offset
    result = log.delete_records(DELETE_TO_END)
    assert result.log_start_offset == end
    # The active segment was sealed and removed: nothing of the records is left on disk.
    assert [segment.base_offset for segment in log.segments] == [end]
    assert log.segments[0].size == 0
    assert _read_all(log, end) == []
    _fill(log, 2)
    assert _read_all(log, end) == list(range(end, end + 6))
    log.close()
    reopened = Log.open(directory, _config("never"))
    assert (reopened.log_start_offset, reopened.next_offset) == (end, end + 6)
    reopened.close()


def test_retention_beyond_a_moved_start_moves_it_on(tmp_path) -> None:
    log = Log.open(str(tmp_path / "t-0"), _config())
    _fill(log, 30)
    log.delete_records(log.segments[0].base_offset + 1)
    log.config = LogConfig(segment_bytes=4096, retention_ms=None, retention_bytes=1)
    deleted = log.apply_retention()
    assert deleted and all(entry.reason == "retention-bytes" for entry in deleted)
    assert log.log_start_offset == log.segments[0].base_offset
    log.close()


def test_a_closed_log_refuses_delete_records(tmp_path) -> None:
    log = Log.open(str(tmp_path / "t-0"), _config())
    _fill(log, 2)
    log.close()
    with pytest.raises(LogClosedError):
        log.delete_records(1)


def test_log_start_file_codec_rejects_garbage() -> None:
    data = encode_log_start(12345)
    assert decode_log_start(data) == 12345
    for cut in range(len(data)):
        assert decode_log_start(data[:cut]) is None
    for position in range(len(data)):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        assert decode_log_start(bytes(flipped)) is None
    assert decode_log_start(data + b"\0") is None


def test_a_damaged_start_file_is_ignored_and_reported_never_hiding_more(tmp_path) -> None:
    directory = str(tmp_path / "t-0")
    log = Log.open(directory, _config())
    _fill(log, 6)
    log.delete_records(7)
    log.close()
    path = os.path.join(directory, LOG_START_FILE)
    with open(path, "r+b") as file:
        file.seek(10)
        file.write(b"\xff")
    reopened = Log.open(directory, _config())
    assert reopened.log_start_offset == 0  # the deleted records are served again
    assert reopened.log_start_problem is not None and "unreadable" in reopened.log_start_problem
    reopened.close()


def test_a_start_beyond_the_recovered_end_is_clamped(tmp_path) -> None:
    directory = str(tmp_path / "t-0")
    log = Log.open(directory, _config())
    _fill(log, 3)
    end = log.next_offset
    log.close()
    with open(os.path.join(directory, LOG_START_FILE), "wb") as file:
        file.write(encode_log_start(end + 100))
    reopened = Log.open(directory, _config())
    assert reopened.log_start_offset == end
    assert reopened.next_offset == end
    reopened.close()


def test_segment_tools_know_the_start_file(tmp_path) -> None:
    data_dir = tmp_path / "data"
    directory = str(data_dir / "logs" / "t-0")
    log = Log.open(directory, _config())
    _fill(log, 20)
    target = log.segments[1].base_offset + 1
    log.delete_records(target)
    log.close()
    assert [problem for problem in verify_data_dir(data_dir) if "t-0" in problem.path] == []
    (listing,) = list_segments(data_dir)
    assert listing.log_start_offset == target


# ---------------------------------------------------------------------------
# A crash at every I/O point of delete_records (the simulated disk's walk)

WALK_DIRECTORY = "/data/walk-0"
WALK_CONFIG = LogConfig(segment_bytes=4096, index_interval_bytes=256, fsync_policy=FsyncPolicy.NEVER, retention_ms=None)


def _walk_start() -> tuple[SimulatedFileSystem, int, int]:
    fs = SimulatedFileSystem()
    log = Log.open(WALK_DIRECTORY, WALK_CONFIG, fs=fs)
    _fill(log, 25)
    end = log.next_offset
    log.close()
    return fs, 4, end


@pytest.mark.parametrize("where", ["mid-log", "to-end"])
def test_delete_records_crashed_at_every_io_point_I10_I11_I21(where: str) -> None:
    start, old_start, end = _walk_start()
    target_holder: list[int] = []

    def run(fs: SimulatedFileSystem, arm) -> None:
        log = Log.open(WALK_DIRECTORY, WALK_CONFIG, fs=fs)
        log.delete_records(old_start)  # a start already moved once, fsynced below
        log.flush()
        arm()
        target = log.segments[3].base_offset + 1 if where == "mid-log" else DELETE_TO_END
        result = log.delete_records(target)
        target_holder[:] = [result.log_start_offset]
        log.close()

    def check(fs: SimulatedFileSystem, point) -> None:
        log = Log.open(WALK_DIRECTORY, WALK_CONFIG, fs=fs)
        try:
            first = log.log_start_offset
            # Either the old start or the new one: never between, never beyond.
            assert first in (old_start, target_holder[0]), (first, old_start, target_holder)
            assert log.next_offset == end, "delete_records lost or invented appended offsets"
            assert all(segment.next_offset > first or segment is log.segments[-1] for segment in log.segments), (
                "a segment wholly below the start outlived the open"
            )
            leftovers = [name for name in fs.list_directory(WALK_DIRECTORY) if name.endswith((".tmp", ".deleted"))]
            assert leftovers == []
            assert _read_all(log, first) == list(range(first, end))
            with pytest.raises(OffsetOutOfRangeError):
                log.read(first - 1, READ_BYTES_MAX)
        finally:
            log.close()

    rng_seed = random.Random(where).randint(0, 10**6)
    summary = walk_crash_points(start, run, check, seed=f"delete-records-{where}-{rng_seed}", every_mode=False)
    assert summary.trials > 5


def test_delete_records_after_a_clean_start_takes_the_clean_shutdown_marker_away_first(tmp_path) -> None:
    """A clean start keeps the marker until the first change (fast start); moving the log
    start and removing segments is a change, so a crash after it must not find the marker
    and trust the files unscanned."""
    directory = str(tmp_path / "t-0")
    log = Log.open(directory, _config())
    _fill(log, 40)
    end = log.next_offset
    log.close()
    log = Log.open(directory, _config())
    assert log.recovery_report.clean_shutdown
    target = log.segments[2].base_offset + 2
    result = log.delete_records(target)
    assert result.deleted_segments
    assert not os.path.exists(os.path.join(directory, "clean-shutdown"))
    # A crash here: the log is never closed.
    reopened = Log.open(directory, _config())
    try:
        assert not reopened.recovery_report.clean_shutdown
        assert reopened.log_start_offset == target
        assert _read_all(reopened, target) == list(range(target, end))
    finally:
        reopened.close()
        log.close()
