"""Deleting a topic is all or nothing (issue 8, item 5; I16 in docs/fault-model.md).

A failed delete_topic used to delete the data anyway: on a full disk it answered
INTERNAL, and after a restart the topic still existed but was empty. Here every I/O point
of a deletion (the metadata commits and every file operation: renames, the directory
fsync, each unlink and rmdir) is walked, SQLite style: for each step n, one run where
step n fails (EIO; ENOSPC for the metadata commit) and one where the process "crashes"
just before it (nothing after it runs). After each run, and again after reopening the
data directory, the topic is either whole (every message, its group's offset and queue
state, usable) or gone (no directory, no deletion record, no group entry; a new topic of
the same name starts empty). A bystander topic is never touched.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from nodi.storage.errors import MetadataDiskFullError
from nodi.storage.fileio import OsFileSystem
from nodi.storage.layout import logs_directory
from nodi.storage.metadata import TopicConfig
from nodi.storage.records import NewRecord, build_batch, decode_batches
from nodi.storage.store import DELETING_SUFFIX, Store

DOOMED = "doomed"
BYSTANDER = "bystander"
PARTITIONS = 2
MESSAGES = 200  # per partition, in batches of 10
STEPS_MAX = 200


class SimulatedCrash(BaseException):
    """The process dies here: nothing after this point runs (not an Exception, so no
    handler in the code under test catches it)."""


class FaultyFileSystem(OsFileSystem):
    """The real file system, counting the mutating namespace operations (and, through
    `step`, the metadata commits) and failing or crashing at one of them."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.fail_at: int | None = None
        self.mode = "error"
        self.fired = False

    def step(self, what: str, error: BaseException) -> None:
        self.steps.append(what)
        if self.fail_at is not None and len(self.steps) == self.fail_at:
            self.fired = True
            self.fail_at = None
            raise SimulatedCrash(what) if self.mode == "crash" else error

    def _io_error(self, path: str) -> OSError:
        return OSError(errno.EIO, "injected I/O error", path)

    def rename(self, source: str, destination: str) -> None:
        self.step(f"rename {os.path.basename(source)}", self._io_error(source))
        super().rename(source, destination)

    def unlink(self, path: str) -> None:
        self.step(f"unlink {os.path.basename(path)}", self._io_error(path))
        super().unlink(path)

    def remove_directory(self, path: str) -> None:
        self.step(f"rmdir {os.path.basename(path)}", self._io_error(path))
        super().remove_directory(path)

    def sync_directory(self, path: str) -> None:
        self.step(f"fsync directory {os.path.basename(path)}", self._io_error(path))
        super().sync_directory(path)


def watch_metadata_commits(store: Store, fs: FaultyFileSystem) -> None:
    """Make the deletion's two metadata commits steps of the walk: failing one is a
    commit refused for want of space (nothing committed)."""
    metadata = store.metadata
    for name in ("delete_topic", "finish_topic_deletion"):
        real = getattr(metadata, name)

        def counted(topic, real=real, name=name):
            fs.step(f"metadata {name}", MetadataDiskFullError(f"injected: no space for {name}"))
            return real(topic)

        setattr(metadata, name, counted)


def populate(data_dir: str) -> None:
    with Store.open(data_dir) as store:
        store.create_topic(DOOMED, TopicConfig(partitions=PARTITIONS, segment_bytes=8192))
        store.create_topic(BYSTANDER, TopicConfig(partitions=1))
        for partition in range(PARTITIONS):
            for start in range(0, MESSAGES, 10):
                store.log(DOOMED, partition).append(
                    build_batch(
                        [NewRecord(None, b"%d-%d" % (partition, offset), (), 1) for offset in range(start, start + 10)]
                    )
                )
        store.log(BYSTANDER, 0).append(build_batch([NewRecord(None, b"stays", (), 1)]))
        for topic in (DOOMED, BYSTANDER):
            store.metadata.stage_offset("group", topic, 0, 1)
            store.metadata.put_queue_state("queue", topic, 0, b"state of " + topic.encode())
        store.metadata.flush()


def values(store: Store, topic: str, partition: int) -> list[bytes | None]:
    partition_log = store.log(topic, partition)
    found: list[bytes | None] = []
    offset = partition_log.log_start_offset
    while offset < partition_log.next_offset:
        data = partition_log.read(offset, 1 << 20).to_bytes()
        records = [record for record in decode_batches(data) if record.offset >= offset]
        assert records, f"nothing readable at {topic}-{partition} offset {offset}"
        found.extend(record.value for record in records)
        offset = records[-1].offset + 1
    return found


def check_whole(store: Store) -> None:
    assert DOOMED in store.topics()
    for partition in range(PARTITIONS):
        assert values(store, DOOMED, partition) == [b"%d-%d" % (partition, offset) for offset in range(MESSAGES)]
    committed = store.metadata.committed_offset("group", DOOMED, 0)
    assert committed is not None, "the doomed topic's offset is still there"
    assert committed.offset == 1
    assert store.metadata.get_queue_state("queue", DOOMED, 0) == b"state of doomed"
    assert DOOMED not in store.metadata.topic_deletions()


def check_gone(store: Store) -> None:
    assert DOOMED not in store.topics()
    assert store.metadata.committed_offset("group", DOOMED, 0) is None
    assert store.metadata.get_queue_state("queue", DOOMED, 0) is None


def check_no_leftovers(data_dir: str) -> None:
    left = [name for name in os.listdir(logs_directory(data_dir)) if name.startswith(DOOMED + "-")]
    assert left == [], left


def check_bystander(store: Store) -> None:
    assert values(store, BYSTANDER, 0) == [b"stays"]
    committed = store.metadata.committed_offset("group", BYSTANDER, 0)
    assert committed is not None, "the bystander's offset stays"
    assert committed.offset == 1
    assert store.metadata.get_queue_state("queue", BYSTANDER, 0) == b"state of bystander"


def run_deletion(data_dir: str, mode: str, fail_at: int | None) -> tuple[FaultyFileSystem, bool]:
    """Delete DOOMED with a fault at step `fail_at`; returns the file system (its steps)
    and whether delete_topic returned normally."""
    fs = FaultyFileSystem()
    store = Store.open(data_dir, fs=fs)
    watch_metadata_commits(store, fs)
    fs.mode, fs.fail_at = mode, fail_at
    deleted = False
    try:
        store.delete_topic(DOOMED)
        deleted = True
    except SimulatedCrash:
        pass
    except (OSError, MetadataDiskFullError):
        # A deletion refused: the topic is whole and serving, at once.
        check_whole(store)
        store.log(DOOMED, 0).append(build_batch([NewRecord(None, b"after a failed delete", (), 1)]))
        assert values(store, DOOMED, 0)[-1] == b"after a failed delete"
    fs.fail_at = None
    if deleted:
        check_gone(store)
    store.close()  # after a crash: what the page cache holds is what a restart sees (F5)
    return fs, deleted


@pytest.mark.parametrize("mode", ["error", "crash"])
def test_every_step_of_a_deletion_leaves_all_or_nothing(tmp_path, mode):
    clean = tmp_path / "clean"
    populate(str(clean))
    # The steps of an undisturbed deletion, for the walk's length and the report.
    reference = tmp_path / "reference"
    shutil.copytree(clean, reference)
    steps, deleted = run_deletion(str(reference), mode, None)
    assert deleted and steps.steps[0] == "metadata delete_topic"
    assert "metadata finish_topic_deletion" in steps.steps and any(s.startswith("unlink") for s in steps.steps)
    outcomes = {"whole": 0, "gone": 0}
    for step in range(1, len(steps.steps) + 1):
        data_dir = str(tmp_path / f"{mode}-{step}")
        shutil.copytree(clean, data_dir)
        fs, deleted = run_deletion(data_dir, mode, step)
        assert fs.fired, f"step {step} ({steps.steps[step - 1]}) never came"
        with Store.open(data_dir) as reopened:
            check_bystander(reopened)
            if DOOMED in reopened.topics():
                assert not deleted, f"step {step}: delete_topic returned but the topic is back"
                check_whole_after_reopen(reopened)
                outcomes["whole"] += 1
            else:
                check_gone(reopened)
                assert reopened.metadata.topic_deletions() == {}
                outcomes["gone"] += 1
        check_no_leftovers_unless_whole(data_dir)
        with Store.open(data_dir) as again:  # a new topic of the name inherits nothing
            if DOOMED not in again.topics():
                again.create_topic(DOOMED, TopicConfig(partitions=PARTITIONS))
                assert [values(again, DOOMED, p) for p in range(PARTITIONS)] == [[]] * PARTITIONS
                assert again.metadata.committed_offset("group", DOOMED, 0) is None
                assert again.metadata.get_queue_state("queue", DOOMED, 0) is None
    # Only the first step (the commit) can leave the topic whole.
    assert outcomes == {"whole": 1, "gone": len(steps.steps) - 1}, outcomes


def check_whole_after_reopen(store: Store) -> None:
    for partition in range(PARTITIONS):
        found = values(store, DOOMED, partition)
        expected = [b"%d-%d" % (partition, offset) for offset in range(MESSAGES)]
        assert found[:MESSAGES] == expected
        assert found[MESSAGES:] in ([], [b"after a failed delete"])
    committed = store.metadata.committed_offset("group", DOOMED, 0)
    assert committed is not None, "the doomed topic's offset is still there"
    assert committed.offset == 1
    assert store.metadata.get_queue_state("queue", DOOMED, 0) == b"state of doomed"


def check_no_leftovers_unless_whole(data_dir: str) -> None:
    names = os.listdir(logs_directory(data_dir))
    assert not [name for name in names if name.endswith(DELETING_SUFFIX)], names
    with Store.open(data_dir) as store:
        if DOOMED not in store.topics():
            check_no_leftovers(data_dir)
