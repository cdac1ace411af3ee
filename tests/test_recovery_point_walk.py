"""Bytes of the active segment not CRC-checked at open are checked when first read (I12)."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from collections import Counter

import pytest

from nodi.storage.config import LogConfig
from nodi.storage.errors import CorruptSegmentError
from nodi.storage.fileio import OS_FILE_SYSTEM, File, OsFileSystem
from nodi.storage.log import Log
from nodi.storage.records import NewRecord, build_batch, decode_batches
from nodi.storage.recovery import RecoveryReport
from nodi.storage.segment import BatchScanner, parse_segment_name

BASE_TIMESTAMP_MS = 1_700_000_000_000
FSYNCED_BATCHES = 300  # below the recovery point: a clean close, then a crash later
UNSYNCED_BATCHES = 12  # appended after the clean reopen, never vouched for
READ_BYTES_MAX = 64 * 1024


def make_config(**overrides) -> LogConfig:
    settings = dict(
        segment_bytes=1024 * 1024,
        index_interval_bytes=1024,
        fsync_policy="never",
        retention_ms=None,
    )
    settings.update(overrides)
    return LogConfig(**settings)


class CountingFile:
    def __init__(self, file: File, counts: Counter, path: str) -> None:
        self._file = file
        self._counts = counts
        self._path = path

    def pread(self, size: int, position: int) -> bytes:
        data = self._file.pread(size, position)
        self._counts[self._path] += len(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self._file, name)


class CountingFileSystem(OsFileSystem):
    """The real file system, counting the bytes pread from each `.log` file."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def open(self, path: str, *, create: bool = False):  # type: ignore[override]
        file = super().open(path, create=create)
        if parse_segment_name(os.path.basename(path)) is None:
            return file
        return CountingFile(file, self.counts, os.path.basename(path))

    def log_bytes_read(self) -> int:
        return sum(self.counts.values())


def records_for(number: int) -> list[NewRecord]:
    rng = random.Random(number)
    timestamp_ms = BASE_TIMESTAMP_MS + 10 * number
    return [
        NewRecord(f"key-{number}-{index}".encode(), rng.randbytes(rng.randint(200, 900)), (), timestamp_ms + index)
        for index in range(rng.randint(1, 4))
    ]


def append_batch(log: Log, number: int) -> list[tuple]:
    records = records_for(number)
    result = log.append(build_batch(records))
    return [
        (result.first_offset + index, record.timestamp_ms, record.key, record.value, tuple(record.headers))
        for index, record in enumerate(records)
    ]


def read_all(log: Log) -> list[tuple]:
    found: list[tuple] = []
    offset = log.log_start_offset
    while offset < log.readable_end_offset:
        result = log.read(offset, READ_BYTES_MAX)
        for record in decode_batches(result.to_bytes()):
            if record.offset >= offset:
                found.append((record.offset, record.timestamp_ms, record.key, record.value, record.headers))
        offset = result.next_offset
    return found


def active_path(directory) -> str:
    names = sorted(name for name in os.listdir(directory) if parse_segment_name(name) is not None)
    return os.path.join(directory, names[-1])


def batches_in(path: str) -> list:
    file = OS_FILE_SYSTEM.open(path)
    try:
        return list(BatchScanner(file, 0, file.size(), verify=True))
    finally:
        file.close()


def crashed_log(directory) -> tuple[list[tuple], int]:
    """A log whose active segment holds FSYNCED_BATCHES batches below the checkpoint (a
    clean close put the recovery point at their end) and UNSYNCED_BATCHES after it,
    left as a kill -9 leaves it (written, no clean close). Returns (the records, the
    recovery point)."""
    expected: list[tuple] = []
    config = make_config()
    with Log.open(str(directory), config) as log:
        for number in range(FSYNCED_BATCHES):
            expected += append_batch(log, number)
        recovery_point = log.next_offset
    log = Log.open(str(directory), config)
    for number in range(FSYNCED_BATCHES, FSYNCED_BATCHES + UNSYNCED_BATCHES):
        expected += append_batch(log, number)
    assert len(log.segments) == 1, "one active segment: the case issue 18 is about"
    crashed = directory.parent / (directory.name + "-crashed")
    shutil.copytree(directory, crashed)  # the files as the killed process left them
    log.close()
    shutil.rmtree(directory)
    os.rename(crashed, directory)
    assert not (directory / "clean-shutdown").exists()
    return expected, recovery_point


def open_counting(directory, *, walk: bool) -> tuple[Log, int]:
    fs = CountingFileSystem()
    log = Log.open(str(directory), make_config(walk=walk), fs=fs)
    return log, fs.log_bytes_read()


def segment_state(log: Log) -> list[tuple]:
    return [
        (
            segment.base_offset,
            segment.size,
            segment.next_offset,
            segment.max_timestamp,
            segment.first_timestamp,
            tuple(segment.index.entries()),
            tuple(segment.time_index.entries()),
            segment.bytes_since_index_entry,
        )
        for segment in log.segments
    ]


def comparable(report: RecoveryReport) -> RecoveryReport:
    return dataclasses.replace(report, duration_ms=0.0, header_walked_bytes=0)


def test_an_append_after_a_clean_start_vouches_only_for_its_own_bytes_I12(tmp_path) -> None:
    """A clean start checks the active segment's batches after its last index entry
    only; those before it are CRC-checked when first read. An append after that start
    must not make them count as checked: a flipped record byte there is refused when
    read (it was served before the fix), the appended batch is served."""
    expected: list[tuple] = []
    with Log.open(str(tmp_path), make_config()) as log:
        for number in range(FSYNCED_BATCHES):
            expected += append_batch(log, number)
    active = active_path(tmp_path)
    victim = batches_in(active)[10]
    with open(active, "r+b") as file:
        file.seek(victim.position + victim.header.size - 3)
        byte = file.read(1)[0]
        file.seek(victim.position + victim.header.size - 3)
        file.write(bytes([byte ^ 0x04]))
    with Log.open(str(tmp_path), make_config()) as log:
        assert log.recovery_report.clean_shutdown
        appended = append_batch(log, 9000)
        with pytest.raises(CorruptSegmentError) as refused:
            log.read(victim.header.base_offset, READ_BYTES_MAX)
        assert refused.value.position == victim.position
    with Log.open(str(tmp_path), make_config()) as log:
        records = decode_batches(log.read(appended[0][0], READ_BYTES_MAX).to_bytes())
        assert [record[:5] for record in records] == appended
