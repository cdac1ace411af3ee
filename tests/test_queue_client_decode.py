"""The queue client's decode of a receive (no server): every delivered offset comes
exactly once as a message, held by the run it was delivered in, or the answer is refused
with InvalidRecords (broker/client/queue.py decode_receive_batches)."""

from __future__ import annotations

import pytest

from nodi.broker.client.errors import InvalidRecords
from nodi.broker.client.queue import decode_receive_batches
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
