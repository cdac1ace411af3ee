"""The descriptor budget (storage/file_budget.py): at most open_files_max real files,
the least recently used closed and opened again on use; a dirty file fsynced before it
is closed, a failed fsync there sticky for its owner (I9, F7); a reopen never reads a
file renamed over the original (I15); logs on it keep their data across a power loss."""

from __future__ import annotations

import errno
import random

import pytest

from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.file_budget import OPEN_FILES_MIN, BudgetedFileSystem, FileBudget
from nodi.storage.log import Log
from nodi.storage.records import NewRecord, build_batch
from nodi.storage.simfs import SimulatedFileSystem


def _budgeted(limit: int = OPEN_FILES_MIN) -> tuple[SimulatedFileSystem, BudgetedFileSystem]:
    inner = SimulatedFileSystem()
    inner.make_directory("/d")
    return inner, BudgetedFileSystem(inner, FileBudget(limit))


def test_the_least_recently_used_files_are_closed_and_opened_again_on_use() -> None:
    _, fs = _budgeted()
    files = [fs.open(f"/d/f{number}", create=True) for number in range(OPEN_FILES_MIN * 3)]
    for number, file in enumerate(files):
        file.pwritev([b"file %d" % number], 0)
        file.sync()
    statistics = fs.budget.statistics()
    assert statistics.open_files == OPEN_FILES_MIN
    assert statistics.closes >= OPEN_FILES_MIN * 2 and statistics.dirty_closes == 0
    for number, file in enumerate(files):  # every one reads its own bytes back
        assert file.pread(16, 0) == b"file %d" % number
        assert fs.budget.statistics().open_files <= OPEN_FILES_MIN
    assert fs.budget.statistics().reopens >= OPEN_FILES_MIN * 2


def test_a_dirty_file_is_fsynced_before_the_budget_closes_it() -> None:
    inner, fs = _budgeted()
    dirty = [fs.open(f"/d/dirty{number}", create=True) for number in range(OPEN_FILES_MIN)]
    fs.sync_directory("/d")  # the names are durable (F4); the bytes are not yet
    for file in dirty:
        file.pwritev([b"unsynced"], 0)
    fs.open("/d/one-more", create=True)  # every open file is dirty: one is synced and closed
    assert fs.budget.statistics().dirty_closes == 1
    inner.crash(random.Random(1), mode="drop")
    assert inner.read_bytes("/d/dirty0") == b"unsynced"  # the budget's fsync made it durable


def test_a_failed_fsync_of_the_budget_is_sticky_for_the_files_owner_F7() -> None:
    inner, fs = _budgeted()
    files = [fs.open(f"/d/f{number}", create=True) for number in range(OPEN_FILES_MIN)]
    for file in files:
        file.pwritev([b"unsynced"], 0)
    inner.fail_sync(1, path_endswith="/d/f0")
    fs.open("/d/one-more", create=True)  # closes f0 after a failing fsync
    attempts = inner.sync_attempts("/d/f0")
    with pytest.raises(OSError):
        files[0].sync()
    with pytest.raises(OSError):
        files[0].sync()
    assert inner.sync_attempts("/d/f0") == attempts, "a failed fsync was retried (F7)"
    files[1].sync()  # the others are unaffected


def test_a_file_renamed_over_is_never_read_through_a_reopen_I15(tmp_path) -> None:
    from nodi.storage.fileio import OS_FILE_SYSTEM

    fs = BudgetedFileSystem(OS_FILE_SYSTEM, FileBudget(OPEN_FILES_MIN))
    first = fs.open(str(tmp_path / "segment"), create=True)
    first.pwritev([b"old bytes"], 0)
    first.sync()
    handle = first.handle()  # what a file slice being sent holds
    for number in range(OPEN_FILES_MIN):  # push `first` out of the budget
        fs.open(str(tmp_path / f"other{number}"), create=True).sync()
    replacement = tmp_path / "replacement"
    replacement.write_bytes(b"new bytes")
    OS_FILE_SYSTEM.rename(str(replacement), str(tmp_path / "segment"))
    assert handle.pread(9, 0) == b"old bytes"  # the slice's descriptor stayed open
    with pytest.raises(OSError) as raised:
        first.pread(9, 0)
    assert raised.value.errno == errno.ESTALE


def test_logs_on_a_small_budget_keep_every_durable_append_across_a_power_loss() -> None:
    inner, fs = _budgeted()
    config = LogConfig(segment_bytes=4096, fsync_policy=FsyncPolicy.ALWAYS, retention_ms=None)
    logs = [Log.open(f"/d/p{number}", config, fs=fs) for number in range(OPEN_FILES_MIN * 2)]
    for round_number in range(30):
        for number, log in enumerate(logs):
            log.append(build_batch([NewRecord(b"k", b"%d-%d" % (number, round_number) * 20)]))
    assert fs.budget.statistics().over_limit == 0
    for log in logs:
        log.statistics()  # no close: the power goes
    inner.crash(random.Random(7), mode="garble")
    for number in range(OPEN_FILES_MIN * 2):
        with Log.open(f"/d/p{number}", config, fs=inner) as reopened:
            assert reopened.next_offset == 30
            assert reopened.read_bytes(0, 1 << 20)
