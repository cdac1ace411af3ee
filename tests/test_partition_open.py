"""A start that opens the partitions in the background (issue 18, "Start"): the store
registers every partition without opening it; a clean one opens on first use, one not
closed cleanly is recovered (by the background open, first) before anything of it is
served, committed offsets are held to each log as it opens (I6), and publish dedup
waits for every partition of a topic to be read back. Store- and broker-level, no
server, deterministic (the background open starts when the test says); the
real-server test is in tests/test_many_partitions.py.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode
from nodi.broker.protocol.headers import IDEMPOTENCY_KEY
from nodi.broker.server.config import ServerConfig
from nodi.broker.server.reply import response_of
from nodi.broker.server.service import Broker
from nodi.storage import records
from nodi.storage.checkpoint import CLEAN_SHUTDOWN_FILE
from nodi.storage.errors import PartitionNotReadyError, PartitionOpenError, UnknownTopicError
from nodi.storage.layout import partition_directory
from nodi.storage.metadata import TopicConfig
from nodi.storage.store import Store

PARTITIONS = 6
TORN = 4  # the partition "crashed" with a torn tail


def _batch(*values: bytes) -> bytes:
    return records.build_batch([records.NewRecord(None, value) for value in values])


def _values(store: Store, partition: int) -> list[bytes | None]:
    data = store.log("t", partition).read_bytes(0, 1 << 20)
    return [record.value for record in records.decode_batches(data)]


def _snapshot(directory: str) -> dict[str, tuple[int, int]]:
    return {
        name: (os.stat(os.path.join(directory, name)).st_size, os.stat(os.path.join(directory, name)).st_mtime_ns)
        for name in sorted(os.listdir(directory))
    }


def _wait_all_open(store: Store) -> None:
    deadline = time.monotonic() + 60
    while store.open_statistics().not_open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.open_statistics().not_open == 0


def _wait_recovered(store: Store) -> None:
    """Until the background open has recovered every partition not closed cleanly
    (the clean ones stay registered until first use)."""
    deadline = time.monotonic() + 60
    while not store.open_statistics().background_done and time.monotonic() < deadline:
        time.sleep(0.01)
    statistics = store.open_statistics()
    assert statistics.background_done and statistics.not_open_unclean == 0


@pytest.fixture
def data_dir(tmp_path):
    """Six partitions of two messages each, closed cleanly; then partition TORN loses
    its clean-shutdown marker and gets half a batch after its last one (a crash in the
    middle of a write), and a group's committed offset points past its end."""
    with Store.open(tmp_path) as store:
        store.create_topic("t", TopicConfig(partitions=PARTITIONS))
        for partition in range(PARTITIONS):
            store.log("t", partition).append(_batch(b"p%d-a" % partition))
            store.log("t", partition).append(_batch(b"p%d-b" % partition))
        store.metadata.stage_offset("readers", "t", TORN, 3)
        store.metadata.stage_offset("readers", "t", 1, 2)
        store.metadata.flush()
        torn_segment = store.log("t", TORN).segments[-1].log_path
    directory = partition_directory(tmp_path, "t", TORN)
    os.remove(os.path.join(directory, CLEAN_SHUTDOWN_FILE))
    with open(torn_segment, "ab") as segment:
        segment.write(_batch(b"never acknowledged")[:40])
    return tmp_path


def test_nothing_is_opened_at_start_and_a_clean_partition_opens_on_first_use(data_dir):
    directories = [partition_directory(data_dir, "t", partition) for partition in range(PARTITIONS)]
    before = [_snapshot(directory) for directory in directories]
    with Store.open(data_dir, open_in_background=True) as store:
        statistics = store.open_statistics()
        assert (statistics.partitions, statistics.not_open, statistics.not_open_unclean) == (PARTITIONS, PARTITIONS, 1)
        assert store.logs() == []
        assert store.open_report.recoveries == ()
        # Read before any background open: opened now, in this thread.
        assert _values(store, 2) == [b"p2-a", b"p2-b"]
        assert [partition for _, partition, _ in store.logs()] == [2]
        assert store.open_statistics().opened_on_demand == 1
        with pytest.raises(UnknownTopicError):
            store.log("t", PARTITIONS)
    # close() wrote into no log it never opened, nor into the one it opened clean and idle.
    after = [_snapshot(directory) for directory in directories]
    assert after == before


def test_an_unclean_partition_is_refused_until_recovered_and_then_served_whole(data_dir):
    with Store.open(data_dir, open_in_background=True) as store:
        # Nothing of it is served before its recovery: a typed, retriable refusal.
        with pytest.raises(PartitionNotReadyError):
            store.log("t", TORN)
        assert store.open_statistics().not_ready_refusals == 1
        store.start_background_open()
        _wait_recovered(store)
        # The background open recovered the unclean partition only (issue 18).
        assert [partition for _, partition, _ in store.logs()] == [TORN]
        assert store.open_statistics().not_open == PARTITIONS - 1
        torn = store.log("t", TORN)
        assert not torn.recovery_report.clean_shutdown
        assert torn.recovery_report.truncated_bytes == 40
        assert _values(store, TORN) == [b"p4-a", b"p4-b"]
        # I6: the committed offset past the recovered end was clamped as it opened; the
        # clean partition's offset (within its end) is left alone.
        assert store.metadata.committed_offset("readers", "t", TORN).offset == 2
        assert store.metadata.committed_offset("readers", "t", 1).offset == 2
        # The recovered log takes appends after its recovered end.
        assert torn.append(_batch(b"p4-c")).first_offset == 2
        assert store.open_statistics().background_done
    with Store.open(data_dir) as store:
        assert all(report.clean_shutdown for report in store.open_report.recoveries)
        assert _values(store, TORN) == [b"p4-a", b"p4-b", b"p4-c"]


def test_recover_now_opens_an_unclean_partition_in_the_calling_thread(data_dir):
    with Store.open(data_dir, open_in_background=True) as store:
        torn = store.log("t", TORN, recover_now=True)
        assert torn.next_offset == 2
        assert store.log("t", TORN) is torn


def test_a_committed_offset_past_a_clean_checkpoint_is_clamped_at_start(data_dir):
    with Store.open(data_dir) as store:  # every partition opened, closed cleanly again
        store.metadata.stage_offset("readers", "t", 3, 99)
        store.metadata.flush()
    with Store.open(data_dir, open_in_background=True) as store:
        assert store.open_statistics().not_open == PARTITIONS
        assert store.metadata.committed_offset("readers", "t", 3).offset == 2
        assert [(clamped.partition, clamped.new_offset) for clamped in store.open_report.clamped_offsets] == [(3, 2)]


def test_a_topic_deleted_before_its_partitions_opened_leaves_nothing(data_dir):
    with Store.open(data_dir, open_in_background=True) as store:
        _values(store, 0)
        store.delete_topic("t")
        store.start_background_open()
        _wait_recovered(store)
        assert store.logs() == []
        for partition in range(PARTITIONS):
            assert not os.path.exists(partition_directory(data_dir, "t", partition))
            with pytest.raises(UnknownTopicError):
                store.log("t", partition)


def _keyed(value: bytes, key: bytes) -> bytes:
    return records.build_batch([records.NewRecord(None, value, [(IDEMPOTENCY_KEY, key)])])


def test_keyed_produces_wait_until_every_partition_of_the_topic_was_read_back(tmp_path):
    """Publish dedup spans a topic's partitions: a key whose original sits in a
    partition not yet open is only known once that partition was read back, so keyed
    produces to the topic answer PARTITION_NOT_READY until then; unkeyed ones do not."""
    with Store.open(tmp_path) as store:
        store.create_topic("d", TopicConfig(partitions=3, dedup_window_ms=60_000))
        original = store.log("d", 0).append(_keyed(b"first", b"order-1"))
    with Store.open(tmp_path, open_in_background=True) as store:

        async def main() -> tuple[m.ProduceResponse, m.ProduceResponse, m.ProduceResponse]:
            broker = Broker(store, ServerConfig(data_dir=store.data_dir))
            broker._loop = asyncio.get_running_loop()  # as attach() sets it, without its tasks
            store.on_partition_opened = broker._partition_opened

            async def produce(records: bytes) -> m.ProduceResponse:
                request = m.ProduceRequest(topic="d", partition=2, acks=m.Acks.WRITTEN, records=records)
                return response_of(await broker.handle(request), m.ProduceResponse)

            refused = await produce(_keyed(b"again", b"order-1"))
            unkeyed = await produce(_batch(b"no key"))
            store.start_background_open()
            await asyncio.to_thread(_wait_all_open, store)
            await asyncio.sleep(0.05)  # the read-back keys reach the loop
            return refused, unkeyed, await produce(_keyed(b"again", b"order-1"))

        refused, unkeyed, deduplicated = asyncio.run(main())
    assert refused.error_code is ErrorCode.PARTITION_NOT_READY
    assert unkeyed.error_code is ErrorCode.NONE and unkeyed.base_offset == 0
    assert deduplicated.error_code is ErrorCode.NONE
    assert [(d.partition, d.offset) for d in deduplicated.duplicates] == [(0, original.first_offset)]


def test_a_partition_that_cannot_be_opened_fails_alone_and_is_reported(data_dir):
    """An operator mistake (a file where partition 5's directory belongs): that
    partition answers PartitionOpenError (READ_ONLY_LOG on the wire), counted as
    failed; the others open and serve; nothing of the file is touched."""
    directory = partition_directory(data_dir, "t", 5)
    os.rename(directory, directory + ".moved-aside")
    with open(directory, "wb") as stray:
        stray.write(b"not a partition")
    with Store.open(data_dir, open_in_background=True) as store:
        store.start_background_open()
        _wait_recovered(store)
        with pytest.raises(PartitionOpenError) as failed:
            store.log("t", 5)  # clean at the start: opened on first use, and failing there
        assert directory in str(failed.value)
        statistics = store.open_statistics()
        assert (statistics.failed, statistics.not_open, statistics.not_open_unclean) == (1, 4, 0)
        assert store.open_failed("t", 5) and not store.open_failed("t", 4)
        with pytest.raises(PartitionOpenError):
            store.log("t", 5)  # the same answer again, not a second open
        assert [_values(store, partition) for partition in range(4)] == [
            [b"p%d-a" % partition, b"p%d-b" % partition] for partition in range(4)
        ]
        assert sorted(partition for _, partition, _ in store.logs()) == [0, 1, 2, 3, 4]
        assert store.open_statistics().not_open == 0
    with open(directory, "rb") as stray:
        assert stray.read() == b"not a partition"


def test_a_clean_restart_opens_no_partition_until_used_and_describes_them_from_one_read_each(data_dir):
    with Store.open(data_dir):  # every partition recovered and closed cleanly
        pass
    with Store.open(data_dir, open_in_background=True) as store:
        store.start_background_open()
        _wait_recovered(store)
        statistics = store.open_statistics()
        assert (statistics.open, statistics.not_open, statistics.not_open_unclean) == (0, PARTITIONS, 0)
        assert store.logs() == []
        assert not store.summaries_read("t")
        summaries = [store.partition_summary("t", partition) for partition in range(PARTITIONS)]
        assert [(s.log_start_offset, s.log_end_offset, s.byte_count) for s in summaries] == [(0, 2, None)] * PARTITIONS
        # Kept: a second describe reads no file, and none of them was opened for it.
        assert store.summaries_read("t") and store.logs() == []
        # A caller that may not open in its thread (a queue group, publish dedup) gets
        # None, and an opener thread opens the partition meanwhile.
        assert store.opened_log("t", 3) is None
        deadline = time.monotonic() + 60
        while store.opened_log("t", 3) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _values(store, 3) == [b"p3-a", b"p3-b"]
        assert [partition for _, partition, _ in store.logs()] == [3]
        assert store.open_statistics().opened_on_demand == 1
        # An open partition's summary is its log's own (sizes known).
        assert store.partition_summary("t", 3).byte_count == store.log("t", 3).statistics().byte_count


def test_retention_reaches_partitions_not_used_since_the_start_and_opens_only_those_it_concerns(tmp_path):
    """Partitions 0 and 2 hold three segments each, partition 1 one; retention_bytes
    keeps the newest segment. After a clean restart nothing uses them: the retention
    sweep opens the two with segments to delete (at most opens_max per sweep) and
    never opens the one it cannot act on."""
    config = TopicConfig(partitions=3, retention_bytes=1)
    with Store.open(tmp_path) as store:
        store.create_topic("r", config)
        for partition in range(3):
            log = store.log("r", partition)
            for number in range(3 if partition != 1 else 1):
                log.append(_batch(b"r%d-%d" % (partition, number)))
                if partition != 1 and number < 2:
                    log.roll()
    with Store.open(tmp_path, open_in_background=True) as store:
        store.start_background_open()
        _wait_recovered(store)
        assert [(topic, partition) for topic, partition, _ in store.open_for_cleanup(opens_max=1)] == [("r", 0)]
        deleted = store.apply_retention()
        assert {key: len(segments) for key, segments in deleted.items()} == {("r", 0): 2, ("r", 2): 2}
        assert sorted(partition for _, partition, _ in store.logs()) == [0, 2]
        statistics = store.open_statistics()
        assert (statistics.opened_for_cleanup, statistics.opened_on_demand, statistics.not_open) == (2, 2, 1)
        assert store.apply_retention() == {}  # nothing left to do, partition 1 still not opened
        assert store.logs()[0][2].log_start_offset == 2
    with Store.open(tmp_path) as store:
        assert [store.log("r", partition).log_start_offset for partition in range(3)] == [2, 0, 2]


# -- partitions in use only: idle logs are closed and reopen on next use (issue 18) ----


def _idempotent(value: bytes, sequence: int) -> bytes:
    return records.build_batch(
        [records.NewRecord(None, value)], producer_id=77, producer_epoch=0, base_sequence=sequence
    )


def test_an_idle_log_is_closed_cleanly_and_reopens_with_its_offsets_and_producer_state(tmp_path):
    """I23: an idle close is a clean close (marker written), and the reopened log is the
    same log: offsets, and an idempotent producer's retry still deduplicated."""
    with Store.open(tmp_path, open_in_background=True) as store:
        store.start_background_open()
        store.create_topic("i", TopicConfig(partitions=2))
        first = store.log("i", 0).append(_idempotent(b"one", 0))
        store.log("i", 0).append(_idempotent(b"two", 1))
        store.log("i", 1).append(_batch(b"other"))
        time.sleep(0.05)
        store.log("i", 1)  # used just now: stays open
        assert store.close_idle(0.04) == 1
        directory = partition_directory(tmp_path, "i", 0)
        assert os.path.exists(os.path.join(directory, CLEAN_SHUTDOWN_FILE))
        statistics = store.open_statistics()
        assert (statistics.open, statistics.not_open, statistics.idle_closed) == (1, 1, 1)
        assert [partition for _, partition, _ in store.logs()] == [1]
        # Described from the closed log's last figures, sizes included; nothing opened.
        summary = store.partition_summary("i", 0)
        assert (summary.log_start_offset, summary.log_end_offset, summary.segment_count) == (0, 2, 1)
        assert summary.byte_count is not None and summary.byte_count > 0
        assert store.open_statistics().open == 1
        # The producer's retry after the reopen is still known: nothing written again.
        retried = store.log("i", 0).append(_idempotent(b"one", 0))
        assert retried.duplicate and retried.first_offset == first.first_offset
        assert store.log("i", 0).append(_idempotent(b"three", 2)).first_offset == 2
        assert _values_of(store, "i", 0) == [b"one", b"two", b"three"]
        assert not os.path.exists(os.path.join(directory, CLEAN_SHUTDOWN_FILE))  # changed since
    with Store.open(tmp_path) as store:
        assert all(report.clean_shutdown for report in store.open_report.recoveries)
        assert _values_of(store, "i", 0) == [b"one", b"two", b"three"]


def _values_of(store: Store, topic: str, partition: int) -> list[bytes | None]:
    data = store.log(topic, partition).read_bytes(0, 1 << 20)
    return [record.value for record in records.decode_batches(data)]


def test_a_pinned_or_waited_on_log_is_not_closed_and_a_closed_one_refuses_changes(tmp_path):
    """I23: what holds a log keeps it open; a retention pass that took a log before
    its idle close changes nothing; the retention job reopens it when it is due."""
    with Store.open(tmp_path, open_in_background=True) as store:
        store.start_background_open()
        store.create_topic("p", TopicConfig(partitions=2, retention_bytes=1))
        pinned = store.log("p", 0)
        assert store.pin(pinned)
        kept = store.log("p", 1)
        kept.append(_batch(b"a"))
        kept.roll()
        kept.append(_batch(b"b"))
        store.on_partition_closing = lambda topic, partition, log: False  # a reader waits on it
        time.sleep(0.02)
        assert store.close_idle(0.01) == 0
        assert store.logs()[0][2] is pinned and store.log("p", 1) is kept
        store.on_partition_closing = None
        store.unpin(pinned)
        time.sleep(0.02)
        assert store.close_idle(0.01) == 2
        assert not store.pin(pinned)  # closed: a caller must ask log() again
        # Retention that took the log before it closed leaves it alone (its files stay
        # as the clean close wrote them).
        assert kept.apply_retention() == []
        assert os.path.exists(os.path.join(partition_directory(tmp_path, "p", 1), CLEAN_SHUTDOWN_FILE))
        # The retention sweep reopens it (two segments, over retention_bytes) and applies it.
        deleted = store.apply_retention()
        assert {key: len(segments) for key, segments in deleted.items()} == {("p", 1): 1}
        assert store.log("p", 1).log_start_offset == 1


def test_a_partition_opened_on_first_use_wakes_the_queue_receives_waiting_on_its_topic(data_dir):
    """A queue group's receive skips the partitions not open and waits; the open of one
    (hurried to an opener thread by that receive) wakes it to look again, rather than
    leaving it to its timeout."""
    with Store.open(data_dir, open_in_background=True) as store:

        async def main() -> tuple[bool, bool]:
            broker = Broker(store, ServerConfig(data_dir=store.data_dir))
            broker._loop = asyncio.get_running_loop()  # as attach() sets it, without its tasks
            store.on_partition_opened = broker._partition_opened
            waiting = broker._loop.create_future()
            other_topic = broker._loop.create_future()
            broker.queues._waiters[("workers", "t")] = {waiting}
            broker.queues._waiters[("workers", "elsewhere")] = {other_topic}
            store.log("t", 2)  # opened here, on the loop's thread: the hook runs at once
            await asyncio.sleep(0)
            return waiting.done(), other_topic.done()

        assert asyncio.run(main()) == (True, False)
