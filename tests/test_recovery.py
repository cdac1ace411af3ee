"""Recovery of a damaged log directory (docs/fault-model.md, "Recovery procedure").

Real files in tmp_path for damage done on disk: torn tails (F2), bit flips in every
batch header field (F3, F6), damaged indexes (I6, I7), stale and garbage checkpoints
(I5, I6), leftovers of interrupted atomic writes and deletions (I10, I11). The simulated
disk (storage/simfs.py) for what a real disk will not do on demand: a failed fsync (F7,
I9) and a full disk (F8).
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from nodi.storage.checkpoint import CHECKPOINT_FILE, CLEAN_SHUTDOWN_FILE, Checkpoint, encode_checkpoint
from nodi.storage.config import LogConfig
from nodi.storage.errors import CorruptSegmentError, DiskFullError, LogDamagedError, LogReadOnlyError, NodiError
from nodi.storage.fileio import OS_FILE_SYSTEM
from nodi.storage.log import Log
from nodi.storage.records import BATCH_HEADER_BYTES, Compression, NewRecord, build_batch, decode_batches
from nodi.storage.segment import BatchScanner, parse_segment_name
from nodi.storage.simfs import SimulatedFileSystem

BASE_TIMESTAMP_MS = 1_700_000_000_000
BATCH_COUNT = 40
READ_BYTES_MAX = 64 * 1024


def make_config(policy: str = "never", **overrides) -> LogConfig:
    settings: dict[str, Any] = dict(
        segment_bytes=4096, index_interval_bytes=256, fsync_policy=policy, retention_ms=None
    )
    settings.update(overrides)
    return LogConfig(**settings)


CONFIG = make_config()


def records_for(number: int) -> list[NewRecord]:
    rng = random.Random(number)
    timestamp_ms = BASE_TIMESTAMP_MS + 10 * number
    return [
        NewRecord(f"key-{number}-{index}".encode(), rng.randbytes(rng.randint(20, 200)), (), timestamp_ms + index)
        for index in range(rng.randint(1, 4))
    ]


def expected_of(first_offset: int, records: list[NewRecord]) -> list[tuple]:
    return [
        (first_offset + index, record.timestamp_ms, record.key, record.value, tuple(record.headers))
        for index, record in enumerate(records)
    ]


def append_batch(log: Log, number: int, compression: Compression = Compression.NONE) -> list[tuple]:
    records = records_for(number)
    result = log.append(build_batch(records, compression=compression))
    return expected_of(result.first_offset, records)


def write_log(directory, compression: Compression = Compression.NONE) -> list[tuple]:
    """A cleanly closed log of BATCH_COUNT batches over several segments."""
    expected: list[tuple] = []
    with Log.open(str(directory), CONFIG) as log:
        for number in range(BATCH_COUNT):
            expected += append_batch(log, number, compression)
        assert len(log.segments) >= 4
    return expected


def read_all(log: Log) -> list[tuple]:
    found: list[tuple] = []
    offset = log.log_start_offset
    while offset < log.readable_end_offset:
        result = log.read(offset, READ_BYTES_MAX)
        for record in decode_batches(result.to_bytes()):
            if record.offset >= offset:
                found.append((record.offset, record.timestamp_ms, record.key, record.value, record.headers))
        assert result.next_offset is not None, f"nothing readable at {offset} below {log.readable_end_offset}"
        offset = result.next_offset
    return found


def before(expected: list[tuple], offset: int) -> list[tuple]:
    return [record for record in expected if record[0] < offset]


def log_paths(directory) -> list[str]:
    names = sorted(name for name in os.listdir(directory) if parse_segment_name(name) is not None)
    return [os.path.join(directory, name) for name in names]


def batches_in(path: str) -> list:
    file = OS_FILE_SYSTEM.open(path)
    try:
        return list(BatchScanner(file, 0, file.size(), verify=True))
    finally:
        file.close()


def remove_marker(directory) -> None:
    os.unlink(os.path.join(directory, CLEAN_SHUTDOWN_FILE))


def unsynced_active_segment(directory) -> None:
    """The checkpoint a crash leaves: at the active segment's base (its last roll), so
    the active segment's batches were never vouched for as fsynced (F1-F3 may tear or
    garble them). A clean close puts it at the log end instead (G4 then protects it)."""
    base = parse_segment_name(os.path.basename(log_paths(directory)[-1]))
    assert base is not None  # log_paths lists .log files
    (Path(directory) / CHECKPOINT_FILE).write_bytes(encode_checkpoint(Checkpoint(base, 0)))


def file_contents(directory) -> dict[str, bytes]:
    return {os.path.basename(path): Path(path).read_bytes() for path in log_paths(directory)}


def check_damaged(log: Log, expected: list[tuple], path: str, position: int, offset: int) -> None:
    """G4: nothing cut; served up to the damage; appends refused with a typed error."""
    damage = log.recovery_report.damage
    assert damage is not None
    assert (damage.path, damage.position, damage.offset) == (path, position, offset)
    assert not log.recovery_report.lost_anything
    assert log.damage == damage and log.statistics().damage == damage and log.statistics().read_only
    assert log.next_offset == log.readable_end_offset == offset
    assert read_all(log) == before(expected, offset)
    with pytest.raises(LogDamagedError) as refused:
        append_batch(log, 2000)
    assert path in str(refused.value) and f"offset {offset}" in str(refused.value)
    assert isinstance(refused.value, LogReadOnlyError)


def flip_bit(path: str, position: int, bit: int) -> None:
    with open(path, "r+b") as file:
        file.seek(position)
        byte = file.read(1)[0]
        file.seek(position)
        file.write(bytes([byte ^ (1 << bit)]))


def check_append_and_reopen(directory, log: Log, expected: list[tuple]) -> None:
    """After recovery: an append lands at the recovered end, and a clean reopen holds
    exactly the recovered prefix plus it."""
    assert read_all(log) == expected
    expected = expected + append_batch(log, 1000)
    assert expected[-1][0] == log.next_offset - 1
    log.close()
    with Log.open(str(directory), CONFIG) as reopened:
        assert not reopened.recovery_report.lost_anything
        assert read_all(reopened) == expected


# -- torn tails (F2) ---------------------------------------------------------------


def torn_cuts(start: int, end: int) -> list[int]:
    """Every byte of the batch header, then a sample of the records."""
    header = range(start, min(end, start + BATCH_HEADER_BYTES + 1))
    return sorted({*header, *range(start, end, 23), end - 1})


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.GZIP])
@pytest.mark.parametrize("marker", ["clean-shutdown-marker", "no-marker"])
def test_torn_tail_is_truncated_and_reported_F2_I2_G3(tmp_path, marker, compression) -> None:
    """A tail cut inside the last batch, not yet fsynced (the checkpoint at the active
    segment's base), with or without the clean-shutdown marker (the marker must not make
    recovery trust a torn tail): truncated at the batch start, reported from its base
    offset, and the next append takes that offset. (Cut after a clean close, the same
    tail is damage: test_bit_flip_in_fsynced_active_segment_is_damage_never_cut_G4.)"""
    pristine = tmp_path / "pristine"
    expected = write_log(pristine, compression=compression)
    active = log_paths(pristine)[-1]
    last = batches_in(active)[-1]
    lost_from = last.header.base_offset
    kept = before(expected, lost_from)
    for cut in torn_cuts(last.position, last.position + last.header.size):
        directory = tmp_path / f"cut-{cut}"
        shutil.copytree(pristine, directory)
        os.truncate(os.path.join(directory, os.path.basename(active)), cut)
        unsynced_active_segment(directory)
        if marker == "no-marker":
            remove_marker(directory)
        log = Log.open(str(directory), CONFIG)
        report = log.recovery_report
        assert log.next_offset == lost_from, cut
        assert os.path.getsize(os.path.join(directory, os.path.basename(active))) == last.position
        if cut > last.position:
            assert not report.clean_shutdown
            assert report.first_lost_offset == lost_from
            assert report.truncated_bytes == cut - last.position
        else:
            assert not report.lost_anything
        check_append_and_reopen(directory, log, kept)
        shutil.rmtree(directory)


# -- bit flips (F3, F6) -------------------------------------------------------------

# (field, first byte, size) of the RecordBatch v2 header; docs/storage-format.md.
HEADER_FIELDS = [
    ("base_offset", 0, 8),
    ("batch_length", 8, 4),
    ("magic", 16, 1),
    ("crc", 17, 4),
    ("attributes", 21, 2),
    ("last_offset_delta", 23, 4),
    ("base_timestamp", 27, 8),
    ("max_timestamp", 35, 8),
    ("producer_id", 43, 8),
    ("producer_epoch", 51, 2),
    ("base_sequence", 53, 4),
    ("records_count", 57, 4),
    ("first_record_byte", 61, 1),
    ("last_record_byte", -1, 1),
]
# The fields the CRC covers (and the CRC itself): the damage leaves the headers after it
# readable, so the loss report knows the old end.
CRC_DETECTED = {
    "crc",
    "attributes",
    "base_timestamp",
    "max_timestamp",
    "producer_id",
    "producer_epoch",
    "base_sequence",
    "first_record_byte",
    "last_record_byte",
}
FLIPS = [
    pytest.param(name, first, size, bit_in_field, id=f"{name}-{'high' if bit_in_field else 'low'}")
    for name, first, size in HEADER_FIELDS
    for bit_in_field in (True, False)
]


def flip_position(batch, first: int, size: int, high: bool) -> tuple[int, int]:
    """(file position, bit): the highest bit of the field's first byte or the lowest bit
    of its last byte."""
    start = batch.position + (batch.header.size - 1 if first < 0 else first)
    return (start, 7) if high else (start + size - 1, 0)


@pytest.mark.parametrize(("field", "first", "size", "high"), FLIPS)
def test_bit_flip_in_active_segment_is_truncated_there_F3_I2_I3_G3(tmp_path, field, first, size, high):
    """Unclean start, the active segment not yet fsynced (F3 garbles unsynced bytes): it
    is rescanned; a flip in any header field of a batch in its middle truncates the log
    at that batch and reports it."""
    expected = write_log(tmp_path)
    remove_marker(tmp_path)
    unsynced_active_segment(tmp_path)
    active = log_paths(tmp_path)[-1]
    batches = batches_in(active)
    assert len(batches) >= 3
    victim = batches[len(batches) // 2]
    flip_bit(active, *flip_position(victim, first, size, high))
    log = Log.open(str(tmp_path), CONFIG)
    report = log.recovery_report
    lost_from = victim.header.base_offset
    assert log.next_offset == lost_from
    assert report.first_lost_offset == lost_from
    assert os.path.getsize(active) == victim.position
    assert report.last_lost_offset is None or report.last_lost_offset >= lost_from
    if field in CRC_DETECTED:
        assert report.last_lost_offset == expected[-1][0]
    check_append_and_reopen(tmp_path, log, before(expected, lost_from))


@pytest.mark.parametrize("marker", ["clean-shutdown-marker", "no-marker"])
@pytest.mark.parametrize(("field", "first", "size", "high"), FLIPS)
def test_bit_flip_in_fsynced_active_segment_is_damage_never_cut_G4(tmp_path, field, first, size, high, marker):
    """After a clean close the checkpoint vouches for the whole active segment: a flip
    in any header field of its last or middle batch is found (the marker does not vouch
    for a tail that fails its checks; without the marker the active segment is rescanned)
    but nothing is cut: the log is served up to the
    bad batch and refuses appends, writes nothing, and the next open finds the same
    damage. Only an explicit repair (truncate_damaged) cuts it, reporting the loss as
    fsynced data (issue 8 item 6)."""
    # With the marker only the batches after the last index entry are checked at open
    # (a flip before them is found when first read, I12): the middle is for a rescan.
    for which in ("last",) if marker == "clean-shutdown-marker" else ("last", "middle"):
        directory = tmp_path / which
        expected = write_log(directory)
        if marker == "no-marker":
            remove_marker(directory)
        active = log_paths(directory)[-1]
        batches = batches_in(active)
        victim = batches[-1] if which == "last" else batches[len(batches) // 2]
        flip_bit(active, *flip_position(victim, first, size, high))
        lost_from = victim.header.base_offset
        names = sorted(os.listdir(directory))
        before_open = file_contents(directory)
        log = Log.open(str(directory), CONFIG)
        assert not log.recovery_report.clean_shutdown
        check_damaged(log, expected, active, victim.position, lost_from)
        assert log.recovery_report.damage.last_offset == expected[-1][0]
        log.close()
        assert file_contents(directory) == before_open
        assert sorted(os.listdir(directory)) == names
        with Log.open(str(directory), CONFIG) as reopened:
            check_damaged(reopened, expected, active, victim.position, lost_from)
        repaired = Log.open(str(directory), CONFIG, truncate_damaged=True)
        report = repaired.recovery_report
        assert report.damage is None
        assert report.first_lost_offset == lost_from
        assert report.last_lost_offset == expected[-1][0]
        assert report.lost_durable_data
        assert os.path.getsize(active) == victim.position
        check_append_and_reopen(directory, repaired, before(expected, lost_from))


@pytest.mark.parametrize("checkpoint", ["vouches-for-all", "none"])
@pytest.mark.parametrize("marker", ["clean-shutdown-marker", "no-marker"])
@pytest.mark.parametrize("cut", ["mid-batch", "at-batch-start", "to-zero"])
def test_truncated_sealed_segment_is_damage_never_cut_G4(tmp_path, cut, marker, checkpoint) -> None:
    """A sealed segment cut short (F6; issue 8 item 7) is found at open even without a
    rescan (its last batches no longer end the file) and even when no checkpoint vouches
    for it (a roll fsyncs a segment before the next one exists): the log ends at the
    first batch the cut broke, later segments are kept on disk but not served, appends
    are refused. The repair cuts there and drops the later segments, reporting them."""
    expected = write_log(tmp_path)
    if marker == "no-marker":
        remove_marker(tmp_path)
    if checkpoint == "none":
        os.unlink(tmp_path / CHECKPOINT_FILE)
    paths = log_paths(tmp_path)
    sealed = paths[1]
    batches = batches_in(sealed)
    victim = batches[len(batches) // 2]
    position = {"mid-batch": victim.position + 17, "at-batch-start": victim.position, "to-zero": 0}[cut]
    os.truncate(sealed, position)
    if cut == "to-zero":
        # An empty file named for base B after a segment ending at B - 1: the log ends
        # with the segment before it.
        damaged_at, lost_from, damaged_path = 0, batches[0].header.base_offset, paths[2]
    elif cut == "at-batch-start":
        # The file now ends at a batch boundary: the next segment's name is the damage.
        damaged_at, lost_from, damaged_path = 0, victim.header.base_offset, paths[2]
    else:
        damaged_at, lost_from, damaged_path = victim.position, victim.header.base_offset, sealed
    before_open = file_contents(tmp_path)
    log = Log.open(str(tmp_path), CONFIG)
    check_damaged(log, expected, damaged_path, damaged_at, lost_from)
    log.close()
    assert file_contents(tmp_path) == before_open
    repaired = Log.open(str(tmp_path), CONFIG, truncate_damaged=True)
    report = repaired.recovery_report
    assert report.damage is None and report.lost_durable_data
    assert report.first_lost_offset == lost_from and report.last_lost_offset == expected[-1][0]
    # The segment holding the cut stays, shortened (emptied: it still names the log end).
    kept = [os.path.basename(path) for path in paths if parse_segment_name(os.path.basename(path)) <= lost_from]
    assert [os.path.basename(path) for path in log_paths(tmp_path)] == kept
    check_append_and_reopen(tmp_path, repaired, before(expected, lost_from))


@pytest.mark.parametrize("marker", ["clean-shutdown-marker", "no-marker"])
@pytest.mark.parametrize(("field", "first", "size", "high"), FLIPS)
def test_bit_flip_in_sealed_segment_is_reported_never_served_G4_I12(tmp_path, field, first, size, high, marker):
    """A flip in a sealed segment below the recovery point is not found at open (no
    rescan) and not truncated; a read that reaches it raises CorruptSegmentError naming
    the file and position; the batches before it and every other segment still read."""
    expected = write_log(tmp_path)
    if marker == "no-marker":
        remove_marker(tmp_path)
    sealed = log_paths(tmp_path)[1]
    sealed_size = os.path.getsize(sealed)
    batches = batches_in(sealed)
    assert len(batches) >= 3
    victim = batches[len(batches) // 2]
    flip_bit(sealed, *flip_position(victim, first, size, high))
    bad = range(victim.header.base_offset, victim.header.last_offset + 1)
    # From the damaged batch to the segment's end nothing can be served (I12).
    unreadable = range(victim.header.base_offset, batches[-1].header.last_offset + 1)
    noticed_at = {victim.position}
    if field == "last_offset_delta":
        noticed_at.add(victim.position + victim.header.size)
    with Log.open(str(tmp_path), CONFIG) as log:
        assert not log.recovery_report.lost_anything
        assert log.next_offset == expected[-1][0] + 1
        for offset in [*range(log.log_start_offset, log.next_offset), batches[0].header.base_offset]:
            try:
                result = log.read(offset, READ_BYTES_MAX)
            except CorruptSegmentError as error:
                assert offset in unreadable, f"read at {offset}, before the damage, refused"
                # A damaged last_offset_delta shows as a break in offsets at the next batch.
                assert error.path == sealed and error.position in noticed_at
                continue
            assert offset not in bad, f"offset {offset} of the damaged batch was served"
            got = [record[:5] for record in decode_batches(result.to_bytes()) if record.offset >= offset]
            want = [record for record in expected if record[0] >= offset]
            assert got and got == want[: len(got)], f"read at {offset} served wrong records"
        assert victim_segment_base(sealed) in log.statistics().corrupt_segments
    assert os.path.getsize(sealed) == sealed_size, "a sealed segment was truncated (G4)"
    with Log.open(str(tmp_path), CONFIG) as log:
        with pytest.raises(CorruptSegmentError):
            log.read(victim.header.base_offset, READ_BYTES_MAX)
    assert os.path.getsize(sealed) == sealed_size


def victim_segment_base(path: str) -> int:
    base = parse_segment_name(os.path.basename(path))
    assert base is not None, f"{path} is not a segment's .log file"
    return base


def test_flip_in_leader_epoch_is_harmless_F6(tmp_path) -> None:
    """partition_leader_epoch is outside the CRC (as in Kafka): a flip there changes no
    record, so it is neither detected nor harmful."""
    expected = write_log(tmp_path)
    remove_marker(tmp_path)
    for path in log_paths(tmp_path)[1:]:
        victim = batches_in(path)[1]
        flip_bit(path, victim.position + 12, 3)
    with Log.open(str(tmp_path), CONFIG) as log:
        assert not log.recovery_report.lost_anything
        assert read_all(log) == expected


# -- indexes (I6, I7) ---------------------------------------------------------------


def damage(path: str, kind: str, entry_bytes: int) -> None:
    rng = random.Random(kind)
    size = os.path.getsize(path) if os.path.exists(path) else 0
    if kind == "missing":
        os.unlink(path)
    elif kind == "torn":
        os.truncate(path, max(0, size - entry_bytes // 2 - 1))
    elif kind == "empty":
        os.truncate(path, 0)
    elif kind == "zeroed":
        with open(path, "wb") as file:
            file.write(bytes(max(size, 2 * entry_bytes)))
    elif kind == "garbage":
        with open(path, "wb") as file:
            file.write(rng.randbytes(max(size, 2 * entry_bytes)))
    elif kind == "last-entry-shifted":  # the last entry's second field + 1
        with open(path, "r+b") as file:
            file.seek(size - 4)
            (value,) = struct.unpack(">I", file.read(4))
            file.seek(size - 4)
            file.write(struct.pack(">I", value + 1))
    else:
        raise AssertionError(kind)


def check_indexes_on_disk(directory) -> None:
    """I7 on every sealed segment's files: entries name batch starts and increase."""
    for path in log_paths(directory)[:-1]:
        base = parse_segment_name(os.path.basename(path))
        starts = {batch.position: batch.header.base_offset for batch in batches_in(path)}
        stem = path[: -len(".log")]
        with open(stem + ".index", "rb") as file:
            entries = list(struct.iter_unpack(">II", file.read()))
        assert entries == sorted(set(entries))
        for relative_offset, position in entries:
            assert starts.get(position) == base + relative_offset
        with open(stem + ".timeindex", "rb") as file:
            times = list(struct.iter_unpack(">qI", file.read()))
        assert times, path
        assert [stamp for stamp, _ in times] == sorted({stamp for stamp, _ in times})
        max_timestamp = max(batch.header.max_timestamp for batch in batches_in(path))
        assert times[-1][0] == max_timestamp


@pytest.mark.parametrize("marker", ["clean-shutdown-marker", "no-marker"])
@pytest.mark.parametrize("segment", ["sealed", "active"])
@pytest.mark.parametrize("kind", ["missing", "torn", "empty", "zeroed", "garbage", "last-entry-shifted"])
@pytest.mark.parametrize("suffix", [".index", ".timeindex"])
def test_damaged_index_is_rebuilt_and_reads_stay_correct_I6_I7(tmp_path, suffix, kind, segment, marker):
    """A missing or damaged .index/.timeindex never makes a read wrong: every offset and
    every timestamp lookup still answers from the .log, and what is on disk after the
    next clean close satisfies I7 again."""
    expected = write_log(tmp_path)
    if marker == "no-marker":
        remove_marker(tmp_path)
    paths = log_paths(tmp_path)
    target = (paths[1] if segment == "sealed" else paths[-1])[: -len(".log")] + suffix
    damage(target, kind, 8 if suffix == ".index" else 12)
    with Log.open(str(tmp_path), CONFIG) as log:
        assert not log.recovery_report.lost_anything
        assert read_all(log) == expected
        for offset in range(log.log_start_offset, log.next_offset, 3):
            first = decode_batches(log.read(offset, 1).to_bytes())
            assert [record for record in first if record[0] >= offset][0][0] == offset
        for offset, timestamp_ms, *_ in expected[::5]:
            assert log.offset_for_timestamp(timestamp_ms) == offset
        assert log.offset_for_timestamp(expected[-1][1] + 1) is None
        if segment == "sealed" and kind in ("missing", "torn", "garbage", "last-entry-shifted"):
            assert target in log.recovery_report.rebuilt_indexes
    check_indexes_on_disk(tmp_path)
    with Log.open(str(tmp_path), CONFIG) as log:
        assert read_all(log) == expected
        assert not log.recovery_report.rebuilt_indexes


def test_time_retention_trusts_no_damaged_time_index_I6(tmp_path) -> None:
    """Retention reads a sealed segment's largest timestamp from its .timeindex; a zeroed
    one must not make fresh data look expired."""
    expected = write_log(tmp_path)
    oldest = log_paths(tmp_path)[0]
    damage(oldest[: -len(".log")] + ".timeindex", "zeroed", 12)
    config = make_config(retention_ms=60_000)
    with Log.open(str(tmp_path), config, clock_ms=lambda: BASE_TIMESTAMP_MS + 10_000) as log:
        assert log.apply_retention() == []
        assert read_all(log) == expected


# -- checkpoint (I5, I6, I11) ----------------------------------------------------------


@pytest.mark.parametrize("marker", ["clean-shutdown-marker", "no-marker"])
def test_stale_checkpoint_still_recovers_everything_I5_I6(tmp_path, marker) -> None:
    """A checkpoint copied from earlier (a backup) only moves the scan start back."""
    expected: list[tuple] = []
    with Log.open(str(tmp_path), CONFIG) as log:
        for number in range(BATCH_COUNT // 2):
            expected += append_batch(log, number)
        log.roll()
        old = (tmp_path / CHECKPOINT_FILE).read_bytes()
        for number in range(BATCH_COUNT // 2, BATCH_COUNT):
            expected += append_batch(log, number)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() != old
    (tmp_path / CHECKPOINT_FILE).write_bytes(old)
    if marker == "no-marker":
        remove_marker(tmp_path)
    log = Log.open(str(tmp_path), CONFIG)
    assert not log.recovery_report.lost_anything
    check_append_and_reopen(tmp_path, log, expected)


def test_stale_checkpoint_with_torn_tail_F2_I5_I6(tmp_path) -> None:
    """A stale checkpoint plus an unclean stop with a torn tail: everything up to the
    torn batch is kept, the torn batch reported."""
    expected: list[tuple] = []
    with Log.open(str(tmp_path), CONFIG) as log:
        for number in range(5):
            expected += append_batch(log, number)
        log.roll()
        old = (tmp_path / CHECKPOINT_FILE).read_bytes()
        for number in range(5, BATCH_COUNT):
            expected += append_batch(log, number)
    (tmp_path / CHECKPOINT_FILE).write_bytes(old)
    remove_marker(tmp_path)
    active = log_paths(tmp_path)[-1]
    last = batches_in(active)[-1]
    os.truncate(active, last.position + 30)
    log = Log.open(str(tmp_path), CONFIG)
    assert log.recovery_report.first_lost_offset == last.header.base_offset
    assert log.recovery_report.scanned_segments >= 2
    check_append_and_reopen(tmp_path, log, before(expected, last.header.base_offset))


@pytest.mark.parametrize(
    "content",
    [b"", b"NDCP", os.urandom(28), os.urandom(100), encode_checkpoint(Checkpoint(10**12, 0))[:-1] + b"\x00"],
    ids=["empty", "short", "random", "long", "bad-crc"],
)
def test_garbage_checkpoint_means_full_scan_I6(tmp_path, content: bytes) -> None:
    """An unreadable checkpoint reads as recovery point 0: every segment is rescanned."""
    expected = write_log(tmp_path)
    remove_marker(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(content)
    log = Log.open(str(tmp_path), CONFIG)
    assert log.recovery_report.scanned_segments == len(log_paths(tmp_path))
    assert not log.recovery_report.lost_anything
    check_append_and_reopen(tmp_path, log, expected)


def test_checkpoint_beyond_the_log_is_not_believed_I6_G4(tmp_path) -> None:
    """A checkpoint claiming more than the log holds (restored from a newer backup) does
    not stop the active segment's tail from being checked; since it vouches for the cut
    batch, the cut is damage (G4): served up to it, nothing cut until the repair."""
    expected = write_log(tmp_path)
    remove_marker(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(encode_checkpoint(Checkpoint(10**9, 0)))
    active = log_paths(tmp_path)[-1]
    last = batches_in(active)[-1]
    os.truncate(active, last.position + 20)
    with Log.open(str(tmp_path), CONFIG) as log:
        check_damaged(log, expected, active, last.position, last.header.base_offset)
        assert log.recovery_report.damage is not None, "the truncated tail is damage"
        assert log.recovery_report.damage.last_offset == 10**9 - 1
    assert os.path.getsize(active) == last.position + 20
    log = Log.open(str(tmp_path), CONFIG, truncate_damaged=True)
    assert log.recovery_report.first_lost_offset == last.header.base_offset
    check_append_and_reopen(tmp_path, log, before(expected, last.header.base_offset))


# -- leftovers (I10, I11) --------------------------------------------------------------


@pytest.mark.parametrize("marker", ["clean-shutdown-marker", "no-marker"])
def test_leftover_tmp_deleted_cleaned_files_are_removed_I10_I11(tmp_path, marker) -> None:
    """Interrupted atomic writes (.tmp), deletions (.deleted, including a whole retired
    segment that must not come back) and compactions (.cleaned) are removed at open, and
    an index without its .log goes with them."""
    expected = write_log(tmp_path)
    if marker == "no-marker":
        remove_marker(tmp_path)
    first = log_paths(tmp_path)[0]
    stem = first[: -len(".log")]
    retired_base = parse_segment_name(os.path.basename(first))
    assert retired_base is not None  # log_paths lists .log files
    # The oldest segment was being deleted by retention: renamed, not yet unlinked.
    for suffix in (".log", ".index", ".timeindex"):
        os.rename(stem + suffix, stem + suffix + ".deleted")
    new_start = batches_in(log_paths(tmp_path)[0])[0].header.base_offset
    expected = [record for record in expected if record[0] >= new_start]
    leftovers = [
        CHECKPOINT_FILE + ".tmp",
        CLEAN_SHUTDOWN_FILE + ".tmp",
        os.path.basename(log_paths(tmp_path)[-1]) + ".cleaned",
        "99999999999999999999.index",
        "99999999999999999999.timeindex",
    ]
    for name in leftovers:
        (tmp_path / name).write_bytes(os.urandom(40))
    log = Log.open(str(tmp_path), CONFIG)
    removed = set(log.recovery_report.removed_files)
    retired = {os.path.basename(stem) + suffix + ".deleted" for suffix in (".log", ".index", ".timeindex")}
    assert removed >= set(leftovers) | retired
    names = os.listdir(tmp_path)
    assert not [name for name in names if name.endswith((".tmp", ".deleted", ".cleaned"))]
    assert not [name for name in names if name.startswith("99999999999999999999")]
    assert log.log_start_offset > retired_base
    check_append_and_reopen(tmp_path, log, expected)


# -- failed fsync (F7, I9) and full disk (F8) on the simulated disk ------------------------

SIM_DIRECTORY = "/data/partition-0"


@pytest.mark.parametrize("policy", ["always", "interval", "never"])
def test_failed_fsync_is_sticky_and_never_retried_I9_F7(policy: str) -> None:
    """After the active segment's fsync fails, every append, flush and roll raises
    LogReadOnlyError, that file is never synced again (not even by close), and after a
    power loss the reopened log holds every offset acknowledged before the failure."""
    fs = SimulatedFileSystem()
    config = make_config(policy, segment_bytes=64 * 1024, fsync_interval_ms=1)
    log = Log.open(SIM_DIRECTORY, config, fs=fs)
    expected: list[tuple] = []
    for number in range(5):
        expected += append_batch(log, number)
    log.flush()
    acknowledged = log.next_offset
    active = log.segments[-1].log_path
    fs.fail_sync(1, path_endswith=".log")
    attempts = fs.sync_attempts(active)
    with pytest.raises(LogReadOnlyError):
        expected += append_batch(log, 5)  # expected only if it returns: it must not
        log.flush()
    failed_attempts = fs.sync_attempts(active)
    assert failed_attempts == attempts + 1
    assert log.statistics().read_only
    for operation in (lambda: append_batch(log, 6), log.flush, log.roll):
        with pytest.raises(LogReadOnlyError):
            operation()
    with pytest.raises(LogReadOnlyError):
        log.durable_future(log.next_offset - 1).result(timeout=10)
    log.close()
    assert fs.sync_attempts(active) == failed_attempts, "a failed fsync was retried (F7)"
    assert CLEAN_SHUTDOWN_FILE not in fs.list_directory(SIM_DIRECTORY)
    fs.halt()
    fs.crash(random.Random(policy), "drop")
    with Log.open(SIM_DIRECTORY, config, fs=fs) as reopened:
        assert reopened.next_offset >= acknowledged
        assert read_all(reopened) == expected[: reopened.next_offset]


def test_failed_write_is_sticky_I9() -> None:
    """A write that fails with EIO (not a cleanly undone ENOSPC) makes the log read-only;
    nothing of the failed append is served, before or after a reopen."""
    fs = SimulatedFileSystem()
    config = make_config("always")
    log = Log.open(SIM_DIRECTORY, config, fs=fs)
    expected: list[tuple] = []
    for number in range(3):
        expected += append_batch(log, number)
    fs.fail_write(1, path_endswith=".log")
    with pytest.raises(LogReadOnlyError):
        append_batch(log, 3)
    with pytest.raises(LogReadOnlyError):
        append_batch(log, 4)
    assert read_all(log) == expected
    log.close()
    with Log.open(SIM_DIRECTORY, config, fs=fs) as reopened:
        assert read_all(reopened) == expected
        expected += append_batch(reopened, 5)
        assert read_all(reopened) == expected


@pytest.mark.parametrize("racer", ["flush", "roll", "close"])
def test_fsync_racing_a_failed_fsync_is_no_retry_I9_F7(racer: str) -> None:
    """A flush, roll or close from another thread that arrives while a failed fsync is
    still being reported must not fsync the segment again: that second fsync would
    "succeed" without the dropped pages (F7) and vouch for data that is gone."""
    fs = SimulatedFileSystem()
    log = Log.open(SIM_DIRECTORY, make_config("never", segment_bytes=64 * 1024), fs=fs)
    for number in range(3):
        append_batch(log, number)
    active = log.segments[-1].log_path
    attempts = fs.sync_attempts(active)
    racers: list[threading.Thread] = []
    outcome: list = []

    def race() -> None:
        try:
            getattr(log, racer)()
            outcome.append("returned")
        except NodiError as error:
            outcome.append(error)

    def start_racer() -> None:  # runs inside the failing fsync, before it raises
        racers.append(threading.Thread(target=race))
        racers[0].start()
        racers[0].join(timeout=0.5)  # a correct log makes it wait for the failure

    fs.fail_sync(1, path_endswith=".log", before_raise=start_racer)
    with pytest.raises(LogReadOnlyError):
        log.flush()
    racers[0].join(timeout=30)
    assert fs.sync_attempts(active) == attempts + 1, f"{racer} retried the failed fsync"
    if racer == "close":
        assert CLEAN_SHUTDOWN_FILE not in fs.list_directory(SIM_DIRECTORY)
    else:
        assert isinstance(outcome[0], LogReadOnlyError), outcome
    assert log.statistics().read_only
    log.close()


@pytest.mark.parametrize(
    ("path_endswith", "nth_sync"),
    [(".log", 1), (".log", 9), (".index", 1), (".index", 2), (".timeindex", 1), (".timeindex", 3)]
    + [(".checkpoint.tmp", nth) for nth in range(1, 7)],
)
def test_any_failed_fsync_leaves_the_log_read_only_I9_F7(path_endswith: str, nth_sync: int) -> None:
    """The nth fsync of a segment, an index or a checkpoint (at a roll or after retention)
    fails: the operation raises LogReadOnlyError, never a bare OSError; the log accepts
    no more appends; no file is synced again, so neither is the one that failed."""
    fs = SimulatedFileSystem()
    config = make_config("always", retention_bytes=8000)
    log = Log.open(SIM_DIRECTORY, config, fs=fs)
    fs.fail_sync(nth_sync, path_endswith=path_endswith)
    failure = None
    for number in range(60):
        try:
            append_batch(log, number)
            if number % 7 == 6:
                log.apply_retention()
        except NodiError as error:
            failure = error
            break
    assert isinstance(failure, LogReadOnlyError), failure
    assert log.statistics().read_only
    counts = {name: fs.sync_attempts(f"{SIM_DIRECTORY}/{name}") for name in fs.list_directory(SIM_DIRECTORY)}
    with pytest.raises(LogReadOnlyError):
        append_batch(log, 100)
    log.close()
    for name, count in counts.items():
        assert fs.sync_attempts(f"{SIM_DIRECTORY}/{name}") == count, f"{name} synced after a failed fsync"
    with Log.open(SIM_DIRECTORY, config, fs=fs) as reopened:
        offsets = [record[0] for record in read_all(reopened)]
        assert offsets == list(range(reopened.log_start_offset, reopened.next_offset))


@pytest.mark.parametrize("policy", ["always", "never"])
def test_disk_full_is_clean_and_recoverable_F8(policy: str) -> None:
    """ENOSPC in the middle of an append: DiskFullError, the partial write removed, the
    log valid and writable again once space is freed; a reopen shows no garbage."""
    fs = SimulatedFileSystem()
    config = make_config(policy, segment_bytes=64 * 1024)
    log = Log.open(SIM_DIRECTORY, config, fs=fs)
    expected: list[tuple] = []
    for number in range(5):
        expected += append_batch(log, number)
    log.flush()
    fs.quota_bytes = fs.used_bytes() + 40  # the next batch is larger: a partial write
    size_before = log.segments[-1].size
    with pytest.raises(DiskFullError):
        append_batch(log, 5)
    assert fs.used_bytes() <= fs.quota_bytes
    assert len(fs.read_bytes(log.segments[-1].log_path)) == size_before, "partial write left behind"
    assert not log.statistics().read_only
    assert read_all(log) == expected
    with pytest.raises(DiskFullError):  # still full: same answer, nothing written
        append_batch(log, 5)
    fs.quota_bytes = None  # space freed
    for number in range(5, 10):
        expected += append_batch(log, number)
    assert read_all(log) == expected
    log.close()
    with Log.open(SIM_DIRECTORY, config, fs=fs) as reopened:
        assert read_all(reopened) == expected
    fs.halt()
    fs.crash(random.Random(0), "garble")
    with Log.open(SIM_DIRECTORY, config, fs=fs) as reopened:
        assert read_all(reopened) == expected


def test_disk_full_anywhere_gives_typed_errors_and_no_garbage_F8_I9() -> None:
    """The disk fills at every point of a workload with rolls (segment, index or
    checkpoint writes; swept by the bytes left free): each failure is DiskFullError (the
    log still writable) or LogReadOnlyError (sticky), never a bare OSError; acknowledged
    appends survive a power loss, and nothing unacknowledged comes back as garbage."""
    outcomes = set()
    for spare_bytes in range(0, 6000, 23):
        try:
            outcomes.add(fill_the_disk(spare_bytes))
        except BaseException as error:
            error.add_note(f"spare_bytes={spare_bytes}")
            raise
    assert outcomes == {"disk-full", "read-only"}  # both the data write and a roll were hit


def fill_the_disk(spare_bytes: int) -> str:
    fs = SimulatedFileSystem()
    config = make_config("always")
    log = Log.open(SIM_DIRECTORY, config, fs=fs)
    expected: list[tuple] = []
    for number in range(3):
        expected += append_batch(log, number)
    fs.quota_bytes = fs.used_bytes() + spare_bytes
    outcome = "fits"
    for number in range(3, 30):
        try:
            expected += append_batch(log, number)
        except DiskFullError:
            outcome = "disk-full"
            assert not log.statistics().read_only
            assert read_all(log) == expected
        except LogReadOnlyError:
            outcome = "read-only"
            break
    fs.quota_bytes = None  # space freed
    if outcome != "read-only":
        expected += append_batch(log, 99)
        assert read_all(log) == expected
    log.close()
    fs.halt()
    fs.crash(random.Random(spare_bytes), "drop")
    with Log.open(SIM_DIRECTORY, config, fs=fs) as reopened:
        assert read_all(reopened) == expected
        expected += append_batch(reopened, 100)
        assert read_all(reopened) == expected
    return outcome


# -- random damage at open (G3, G4, I19) ---------------------------------------------------

RANDOM_DAMAGE_TRIALS = 120


def damage_at_random(directory, rng: random.Random) -> None:
    """One to three of: a flipped bit, a cut, a deleted file, a zeroed range, in any file
    of the partition (segments, indexes, checkpoint, snapshot, marker)."""
    for _ in range(rng.randint(1, 3)):
        path = os.path.join(directory, rng.choice(sorted(os.listdir(directory))))
        size = os.path.getsize(path)
        kind = rng.choice(["flip", "cut", "delete", "zero"])
        if kind == "flip" and size:
            flip_bit(path, rng.randrange(size), rng.randrange(8))
        elif kind == "cut":
            os.truncate(path, rng.randrange(size + 1))
        elif kind == "delete":
            os.unlink(path)
        elif kind == "zero" and size:
            position = rng.randrange(size)
            with open(path, "r+b") as file:
                file.seek(position)
                file.write(bytes(min(rng.randrange(1, 200), size - position)))


def test_random_damage_never_raises_never_cuts_fsynced_data_G3_G4_I19(tmp_path) -> None:
    """Whatever is damaged, the open returns (no exception), serves a prefix of what
    was appended (from the first remaining segment), never cuts data the recovery point
    vouches for without truncate_damaged, and a damaged log changes no `.log` file and
    reports the same damage at the next open."""
    pristine = tmp_path / "pristine"
    expected = write_log(pristine)
    rng = random.Random(8)
    outcomes = set()
    for trial in range(RANDOM_DAMAGE_TRIALS):
        directory = tmp_path / f"trial-{trial}"
        shutil.copytree(pristine, directory)
        damage_at_random(directory, rng)
        before_open = file_contents(directory)
        log = Log.open(str(directory), CONFIG)
        report = log.recovery_report
        try:
            served = read_all(log)
        except CorruptSegmentError:  # a flip inside a sealed segment: found when read (I12)
            served = None
        log.close()
        assert not report.lost_durable_data, (trial, report)
        if served is not None:
            assert served == [
                record for record in before(expected, log.next_offset) if record[0] >= log.log_start_offset
            ], (trial, report)
        if report.damage is not None:
            outcomes.add("damaged")
            assert file_contents(directory) == before_open, trial
            with Log.open(str(directory), CONFIG) as again:
                assert again.recovery_report.damage == report.damage, trial
        else:
            outcomes.add("truncated" if report.lost_anything else "intact")
        shutil.rmtree(directory)
    assert {"damaged", "intact"} <= outcomes
