"""Publish dedup on the broker's produce paths (broker/server/service.py): the log's check
runs first and a request none of whose records carries a header is not searched for the
idempotency key (PublishDedup.statistics().requests_skipped), on the task path (_produce,
acks written and none) and the durable path without a task (produce_durable_nowait).
A request that may carry a key is searched and decoded as before: a key in a later
record of a later batch is still deduplicated, a compressed keyed batch is still written
as sent and not remembered, and bad batches keep the log's error. Against a real
broker in process, the clock never read for timing."""

from __future__ import annotations

import asyncio

import pytest
from served_broker import run_served

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode
from nodi.broker.protocol.headers import IDEMPOTENCY_KEY, TTL_MS
from nodi.broker.server.durable_answer import DurableAnswer
from nodi.broker.server.reply import Reply
from nodi.broker.server.service import Broker
from nodi.storage.records import Compression, NewRecord, build_batch

WAIT_S = 30

PLAIN = build_batch([NewRecord(None, b"v" * 1024) for _ in range(10)])  # uniform, no headers
PLAIN_PACKED = build_batch([NewRecord(None, b"p" * 100) for _ in range(5)], compression=Compression.GZIP)


def keyed(value: bytes, key: str) -> NewRecord:
    return NewRecord(None, value, [(IDEMPOTENCY_KEY, key.encode())])


def late_key(key: str) -> bytes:
    """Headers-free records, then one carrying `key`: not uniform, walked record by record."""
    return build_batch([NewRecord(None, b"a"), NewRecord(None, b"bb"), NewRecord(None, b"ccc"), keyed(b"d", key)])


async def produce(broker: Broker, records: bytes, acks: m.Acks, request_id: int = 1) -> m.ProduceResponse:
    """One produce down the path the server takes for `acks`."""
    request = m.ProduceRequest(
        request_id=request_id, topic="t", partition=0, records=records, acks=acks, timeout_ms=WAIT_S * 1000
    )
    if acks is not m.Acks.DURABLE:
        response = (await broker.handle(request)).response
    else:
        delivered: list = []
        outcome = broker.produce_durable_nowait(request, lambda answer, reply: delivered.append(reply.response))
        if isinstance(outcome, Reply):
            response = outcome.response
        elif isinstance(outcome, DurableAnswer):
            async with asyncio.timeout(WAIT_S):
                while not delivered:
                    await asyncio.sleep(0.005)
            response = delivered[0]
        else:
            assert outcome is not None
            response = (await asyncio.wait_for(outcome, WAIT_S)).response
    assert isinstance(response, m.ProduceResponse)
    return response


ACKS = pytest.mark.parametrize("acks", [m.Acks.WRITTEN, m.Acks.DURABLE, m.Acks.NONE])


@ACKS
def test_requests_whose_records_carry_no_header_are_not_searched(tmp_path, acks) -> None:
    """Several header-free batches (one compressed): not searched, written. A header
    other than the key: searched, not decoded."""

    async def body(broker, store) -> None:
        assert store.topic_config("t").dedup_window_ms > 0  # on by default
        await produce(broker, PLAIN + PLAIN_PACKED + PLAIN, acks)
        statistics = broker.dedup.statistics()
        assert (statistics.requests_skipped, statistics.requests_searched) == (1, 0)
        ttl = build_batch([NewRecord(None, b"t", [(TTL_MS, b"60000")])])
        await produce(broker, PLAIN + ttl, acks, request_id=2)
        statistics = broker.dedup.statistics()
        assert (statistics.requests_skipped, statistics.requests_searched, statistics.batches_decoded) == (1, 1, 0)
        assert store.log("t", 0).next_offset == 10 + 5 + 10 + 10 + 1

    run_served(tmp_path, body)


@ACKS
def test_a_key_in_a_later_record_of_a_later_batch_is_deduplicated(tmp_path, acks) -> None:
    async def body(broker, store) -> None:
        first = await produce(broker, PLAIN + late_key("late"), acks)
        assert broker.dedup.statistics().batches_decoded == 1
        assert store.log("t", 0).next_offset == 14
        again = await produce(broker, late_key("late"), acks, request_id=2)
        if acks is not m.Acks.NONE:
            assert first.error_code == ErrorCode.NONE
            assert again.error_code == ErrorCode.PARTLY_DUPLICATE
            assert [(d.index, d.partition, d.offset) for d in again.duplicates] == [(3, 0, 13)]
        assert store.log("t", 0).next_offset == 14  # nothing of the resend written
        assert broker.dedup.statistics().requests_skipped == 0

    run_served(tmp_path, body)


@ACKS
def test_a_compressed_keyed_batch_is_written_as_sent_and_not_remembered(tmp_path, acks) -> None:
    """As before the skip: a compressed batch is never decoded for dedup (docs/guarantees.md)."""
    packed = build_batch([keyed(b"z", "packed")], compression=Compression.GZIP)

    async def body(broker, store) -> None:
        await produce(broker, packed, acks)
        await produce(broker, packed, acks, request_id=2)
        assert store.log("t", 0).next_offset == 2
        statistics = broker.dedup.statistics()
        assert (statistics.requests_skipped, statistics.batches_decoded, statistics.keys) == (0, 0, 0)
        # The same key uncompressed is new (the packed one was not remembered), then a duplicate.
        await produce(broker, build_batch([keyed(b"z", "packed")]), acks, request_id=3)
        again = await produce(broker, build_batch([keyed(b"z", "packed")]), acks, request_id=4)
        if acks is not m.Acks.NONE:
            assert [(d.partition, d.offset) for d in again.duplicates] == [(0, 2)]
        assert store.log("t", 0).next_offset == 3

    run_served(tmp_path, body)


@pytest.mark.parametrize("acks", [m.Acks.WRITTEN, m.Acks.DURABLE])
def test_bad_batches_get_the_logs_error_and_nothing_is_remembered(tmp_path, acks) -> None:
    """A request the log refuses is refused before dedup records a key of it."""
    good = build_batch([keyed(b"k", "refused")])
    bad = bytearray(build_batch([NewRecord(None, b"x")]))
    bad[-1] ^= 0xFF  # the CRC no longer holds

    async def body(broker, store) -> None:
        if acks is m.Acks.DURABLE:
            outcome = broker.produce_durable_nowait(
                m.ProduceRequest(
                    request_id=1, topic="t", partition=0, records=good + bytes(bad), acks=acks, timeout_ms=1000
                ),
                lambda answer, reply: None,
            )
            assert isinstance(outcome, Reply)
            response = outcome.response
        else:
            response = await produce(broker, good + bytes(bad), acks)
        assert response.error_code == ErrorCode.INVALID_RECORDS
        assert store.log("t", 0).next_offset == 0 and broker.dedup.statistics().keys == 0
        assert (await produce(broker, good, acks, request_id=2)).error_code == ErrorCode.NONE

    run_served(tmp_path, body)


def test_a_topic_without_a_window_is_neither_searched_nor_skipped(tmp_path) -> None:
    async def body(broker, store) -> None:
        await produce(broker, PLAIN + late_key("off"), m.Acks.WRITTEN)
        await produce(broker, late_key("off"), m.Acks.WRITTEN, request_id=2)
        statistics = broker.dedup.statistics()
        assert (statistics.requests_skipped, statistics.requests_searched, statistics.topics) == (0, 0, 0)
        assert store.log("t", 0).next_offset == 18

    run_served(tmp_path, body, dedup_window_ms=0)
