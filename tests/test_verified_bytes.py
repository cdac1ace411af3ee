"""Bytes of the active segment not CRC-checked at open are checked when first read (I12):
an append vouches only for its own bytes, never for the unchecked ones before it."""

from __future__ import annotations

import os
import random

import pytest

from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.errors import CorruptSegmentError
from nodi.storage.fileio import OS_FILE_SYSTEM
from nodi.storage.log import Log
from nodi.storage.records import NewRecord, build_batch, decode_batches
from nodi.storage.segment import BatchScanner, parse_segment_name

BASE_TIMESTAMP_MS = 1_700_000_000_000
FSYNCED_BATCHES = 300  # enough for index entries in the active segment
READ_BYTES_MAX = 64 * 1024


def make_config() -> LogConfig:
    return LogConfig(
        segment_bytes=1024 * 1024, index_interval_bytes=1024, fsync_policy=FsyncPolicy.NEVER, retention_ms=None
    )


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


def active_path(directory) -> str:
    names = sorted(name for name in os.listdir(directory) if parse_segment_name(name) is not None)
    return os.path.join(directory, names[-1])


def batches_in(path: str) -> list:
    file = OS_FILE_SYSTEM.open(path)
    try:
        return list(BatchScanner(file, 0, file.size(), verify=True))
    finally:
        file.close()


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
