"""The queue client's decode of a receive (no server): every delivered offset comes
exactly once as a message, held by the run it was delivered in, or the answer is refused
with InvalidRecords (broker/client/queue.py decode_receive_batches); and the client's
lease runs and ack runs, against a fake core that answers settles."""

from __future__ import annotations

import asyncio
import time

import pytest

from nodi.broker.client.errors import InvalidRecords
from nodi.broker.client.queue import (
    SETTLEMENTS_PER_REQUEST_MAX,
    AsyncQueue,
    _held_pieces,
    _LeaseRun,
    _spread,
    decode_receive_batches,
)
from nodi.broker.protocol import messages as m
from nodi.storage.records import NewRecord, build_batch

TOPIC, GROUP = "jobs", "workers"
DEADLINE_MS = 1_000_000


def batch_of(base_offset: int, count: int) -> bytes:
    records = [NewRecord(key=None, value=b"v%d" % (base_offset + i), timestamp_ms=1_000 + i) for i in range(count)]
    return build_batch(records, base_offset=base_offset)


def delivery(offset: int, count: int, partition: int = 0, delivery_count: int = 1) -> m.QueueDelivery:
    return m.QueueDelivery(
        partition=partition, offset=offset, delivery_count=delivery_count, lease_deadline_ms=DEADLINE_MS, count=count
    )


def response(deliveries: list[m.QueueDelivery], spans: list[tuple[int, bytes]]) -> m.QueueReceiveBatchesResponse:
    return m.QueueReceiveBatchesResponse(
        deliveries=deliveries,
        spans=[m.QueueBatchSpan(partition=partition, records_bytes=len(data)) for partition, data in spans],
        records=b"".join(data for _, data in spans),
    )


def decode(answer: m.QueueReceiveBatchesResponse, cache: dict | None = None):
    return decode_receive_batches(answer, TOPIC, GROUP, None, {} if cache is None else cache)


def test_each_delivered_offset_is_one_message_of_its_run() -> None:
    answer = response(
        [delivery(10, 3), delivery(14, 2, delivery_count=2)],  # offset 13 is in the batch, not delivered
        [(0, batch_of(10, 6))],
    )
    messages, runs = decode(answer)
    assert [(message.offset, message.value, message.delivery_count) for message in messages] == [
        (10, b"v10", 1),
        (11, b"v11", 1),
        (12, b"v12", 1),
        (14, b"v14", 2),
        (15, b"v15", 2),
    ]
    assert [(run.partition, run.first, run.count, run.delivery_count) for run in runs] == [(0, 10, 3, 1), (0, 14, 2, 2)]
    assert [message._lease for message in messages] == [runs[0]] * 3 + [runs[1]] * 2
    assert all(message.lease_deadline_ms == DEADLINE_MS and message.topic == TOPIC for message in messages)


def test_a_batch_decoded_for_the_last_receive_serves_the_next_from_the_cache() -> None:
    data = batch_of(0, 8)
    cache: dict = {}
    first, _ = decode(response([delivery(0, 4)], [(0, data)]), cache)
    second, _ = decode(response([delivery(4, 4)], [(0, data)]), cache)
    assert [message.offset for message in first + second] == list(range(8))


def test_a_batch_sent_twice_is_refused_even_when_the_count_matches() -> None:
    # Runs name 0..7, the records hold 0..3 twice: as many records as offsets delivered.
    data = batch_of(0, 4)
    with pytest.raises(InvalidRecords, match="came twice"):
        decode(response([delivery(0, 8)], [(0, data + data)]))
    with pytest.raises(InvalidRecords, match="came twice"):
        decode(response([delivery(0, 8)], [(0, data), (0, data)]))


def test_runs_that_name_one_offset_twice_are_refused() -> None:
    with pytest.raises(InvalidRecords, match="delivered twice"):
        decode(response([delivery(0, 4), delivery(3, 2)], [(0, batch_of(0, 5))]))


def test_a_delivered_offset_missing_from_the_records_is_refused() -> None:
    with pytest.raises(InvalidRecords, match="records for 6 delivered offsets"):
        decode(response([delivery(0, 6)], [(0, batch_of(0, 5))]))


def test_a_run_of_no_offsets_is_refused() -> None:
    with pytest.raises(InvalidRecords, match="run of 0 offsets"):
        decode(response([delivery(0, 0), delivery(0, 2)], [(0, batch_of(0, 2))]))


def test_records_of_another_partition_are_not_taken_for_this_one() -> None:
    # Partition 1's runs name 0..1; its records are in a span of partition 0.
    with pytest.raises(InvalidRecords):
        decode(response([delivery(0, 2, partition=1)], [(0, batch_of(0, 2))]))


# ---------------------------------------------------------------------------
# Acks without waiting go out as runs (a fake broker core: the bound on a run is more
# than a real broker's window lets one consumer hold)


class FakeCore:
    """Answers every QueueSettleRequest with one NONE result per settlement, keeping
    the requests."""

    def __init__(self) -> None:
        self.settles: list[m.QueueSettleRequest] = []

    def own(self, part) -> None:
        pass

    def disown(self, part) -> None:
        pass

    async def call(self, request, timeout_ms, **options):
        assert isinstance(request, m.QueueSettleRequest), request
        self.settles.append(request)
        return m.QueueSettleResponse(
            results=[
                m.SettleResult(
                    partition=one.partition,
                    offset=one.offset,
                    error_code=m.ErrorCode.NONE,
                    lease_deadline_ms=m.NO_OFFSET,
                    count=one.count,
                )
                for one in request.settlements
            ]
        )


class FakeClient:
    def __init__(self) -> None:
        self.core = FakeCore()


def test_acks_without_waiting_go_as_runs_of_at_most_the_request_bound() -> None:
    total = 2 * SETTLEMENTS_PER_REQUEST_MAX + 500

    async def scenario() -> FakeCore:
        client = FakeClient()
        queue = AsyncQueue(client, TOPIC, GROUP, ack_wait_ms=60_000, max_lease_ms=0)
        records = batch_of(0, total)
        messages, runs = decode_receive_batches(response([delivery(0, total)], [(0, records)]), TOPIC, GROUP, queue, {})
        await queue._accept(messages, runs, time.monotonic())
        assert queue.statistics().outstanding == total
        # Flow control's bytes: the receive's record bytes, freed an even share per ack.
        assert queue.statistics().outstanding_bytes == len(records)
        half = total // 2
        for message in messages[:half]:
            message.ack(wait=False)
        assert queue.statistics().outstanding_bytes == len(records) - half * (len(records) // total)
        for message in messages[half:]:
            message.ack(wait=False)
        assert queue.statistics().outstanding_bytes == 0
        await queue.flush()
        assert queue.statistics().outstanding == 0 and queue.statistics().stale_settles == 0
        await queue.close()
        return client.core

    core = asyncio.run(scenario())
    settlements = [one for request in core.settles for one in request.settlements]
    assert all(one.action is m.SettleAction.ACK and one.delivery_count == 1 for one in settlements)
    assert all(sum(one.count for one in request.settlements) <= SETTLEMENTS_PER_REQUEST_MAX for request in core.settles)
    assert all(one.count <= SETTLEMENTS_PER_REQUEST_MAX for one in settlements)
    # Every offset acked once, in order, in a few runs (not one entry per message).
    covered = [offset for one in settlements for offset in range(one.offset, one.offset + one.count)]
    assert covered == list(range(total))
    assert len(settlements) <= 2 * len(core.settles) + 3


def test_held_pieces_are_the_stretches_a_run_still_holds() -> None:
    run = _LeaseRun(0, 100, 8, 1, DEADLINE_MS)
    run.held = bytearray([1, 1, 0, 1, 0, 0, 1, 1])
    assert list(_held_pieces(run)) == [(0, 2), (3, 1), (6, 2)]
    run.held = bytearray(8)
    assert list(_held_pieces(run)) == []


def test_outcomes_spread_over_entries_split_where_either_side_changes() -> None:
    entries = [("a", 10, 3), ("b", 20, 2)]  # (what, first, count)
    results = [
        m.SettleResult(partition=0, offset=10, error_code=m.ErrorCode.NONE, lease_deadline_ms=5, count=2),
        m.SettleResult(partition=0, offset=12, error_code=m.ErrorCode.STALE_DELIVERY, lease_deadline_ms=-1, count=2),
        m.SettleResult(partition=0, offset=21, error_code=m.ErrorCode.NONE, lease_deadline_ms=6, count=1),
    ]
    assert list(_spread(entries, results)) == [
        (("a", 10, 2), m.ErrorCode.NONE, 5, 2),
        (("a", 12, 1), m.ErrorCode.STALE_DELIVERY, -1, 1),
        (("b", 20, 1), m.ErrorCode.STALE_DELIVERY, -1, 1),
        (("b", 21, 1), m.ErrorCode.NONE, 6, 1),
    ]
