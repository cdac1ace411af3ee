"""The data directory as a whole: topics, logs, metadata and their agreement at open."""

from __future__ import annotations

import os

import pytest

from nodi.storage import records
from nodi.storage.checkpoint import Checkpoint, write_checkpoint
from nodi.storage.errors import TopicExistsError, UnknownTopicError
from nodi.storage.fileio import OS_FILE_SYSTEM
from nodi.storage.layout import partition_directory
from nodi.storage.metadata import TopicConfig
from nodi.storage.store import Store


def _batch(*values: bytes) -> bytes:
    return records.build_batch([records.NewRecord(None, value) for value in values])


def test_topics_and_logs_survive_reopen(tmp_path):
    with Store.open(tmp_path) as store:
        store.create_topic("orders", TopicConfig(partitions=3))
        store.create_topic("audit.log", TopicConfig(partitions=1, fsync_policy="never"))
        for partition in range(3):
            store.log("orders", partition).append(_batch(b"p%d" % partition, b"second"))
        store.log("audit.log", 0).append_nowait(_batch(b"x"))
        with pytest.raises(TopicExistsError):
            store.create_topic("orders")
    with Store.open(tmp_path) as store:
        assert set(store.topics()) == {"orders", "audit.log"}
        assert store.topics()["orders"].partitions == 3
        assert all(report.clean_shutdown for report in store.open_report.recoveries)
        decoded = records.decode_batches(store.log("orders", 2).read_bytes(0, 1 << 20))
        assert [record.value for record in decoded] == [b"p2", b"second"]
        assert store.log("audit.log", 0).next_offset == 1
        with pytest.raises(UnknownTopicError):
            store.log("orders", 3)
        with pytest.raises(UnknownTopicError):
            store.log("missing", 0)


def test_delete_topic_removes_logs_and_offsets(tmp_path):
    with Store.open(tmp_path) as store:
        store.create_topic("gone", TopicConfig(partitions=2))
        store.log("gone", 1).append(_batch(b"a"))
        store.metadata.stage_offset("g", "gone", 1, 1)
        store.metadata.flush()
        store.delete_topic("gone")
        assert "gone" not in store.topics()
        assert store.metadata.committed_offset("g", "gone", 1) is None
        assert not os.path.exists(partition_directory(tmp_path, "gone", 1))
        with pytest.raises(UnknownTopicError):
            store.delete_topic("gone")
    with Store.open(tmp_path) as store:
        assert store.topics() == {}
        assert store.open_report.orphan_directories == ()


def test_committed_offsets_beyond_recovered_end_are_clamped(tmp_path):
    """I6: a committed offset is a cache of progress through the log; after recovery
    truncated the log, an offset past the new end is clamped and reported."""
    with Store.open(tmp_path) as store:
        store.create_topic("t", TopicConfig(partitions=1))
        log = store.log("t", 0)
        for number in range(5):
            log.append(_batch(b"m%d" % number))
        store.metadata.stage_offset("readers", "t", 0, 5)
        store.metadata.stage_offset("early", "t", 0, 2)
        store.metadata.flush()
        segment_path = log.segments[-1].log_path
        last_batch_bytes = len(_batch(b"m4"))
    # Simulate a crash that tore the last two batches: no clean close of the log, so
    # the checkpoint is still at the active segment's base (nothing of it vouched for).
    os.remove(os.path.join(os.path.dirname(segment_path), "clean-shutdown"))
    write_checkpoint(OS_FILE_SYSTEM, os.path.dirname(segment_path), Checkpoint(0, 0))
    with open(segment_path, "r+b") as file:
        file.truncate(os.path.getsize(segment_path) - last_batch_bytes - 7)
    with Store.open(tmp_path) as store:
        assert store.log("t", 0).next_offset == 3
        clamped = {entry.group: entry for entry in store.open_report.clamped_offsets}
        assert set(clamped) == {"readers"}
        assert (clamped["readers"].old_offset, clamped["readers"].new_offset) == (5, 3)
        assert store.metadata.committed_offset("readers", "t", 0).offset == 3
        assert store.metadata.committed_offset("early", "t", 0).offset == 2
        # Only the torn batch's header is left to count: the lost batch after it left no trace.
        assert any("offsets 3..3 lost (at least" in line for line in store.open_report.lines())


def test_orphan_and_half_deleted_directories(tmp_path):
    with Store.open(tmp_path) as store:
        store.create_topic("kept")
    orphan = partition_directory(tmp_path, "stray", 0)
    os.makedirs(orphan)
    half = partition_directory(tmp_path, "old", 0) + ".17.deleting"
    os.makedirs(half)
    with Store.open(tmp_path) as store:
        assert store.open_report.orphan_directories == (orphan,)
        assert store.open_report.removed_directories == (os.path.basename(half),)
        assert not os.path.exists(half)
        assert os.path.exists(orphan)


def test_retention_across_topics(tmp_path):
    now = [10_000_000]
    with Store.open(tmp_path, clock_ms=lambda: now[0]) as store:
        store.create_topic("short", TopicConfig(retention_ms=1000, segment_bytes=1 << 20))
        store.create_topic("forever", TopicConfig(retention_ms=None, segment_bytes=1 << 20))
        for name in ("short", "forever"):
            log = store.log(name, 0)
            log.append(records.build_batch([records.NewRecord(None, b"old", (), now[0] - 5000)]))
            log.roll()
            log.append(_batch(b"new"))
        deleted = store.apply_retention(now_ms=now[0])
        assert list(deleted) == [("short", 0)]
        assert store.log("short", 0).log_start_offset == 1
        assert store.log("forever", 0).log_start_offset == 0
