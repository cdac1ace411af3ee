"""QueueReceiveBatches (protocol version 3): stored batches sent as they are, or cut to
the delivered records (broker/server/queue_batches.py), with the runs of offsets
delivered; the old QueueReceive still answered for clients of protocol 1 and 2."""

from __future__ import annotations

import functools
import time

import pytest

from nodi.broker import Client
from nodi.broker.client import connection as client_connection
from nodi.broker.protocol import messages as m
from nodi.broker.protocol.headers import NOT_BEFORE_MS, TTL_MS
from nodi.broker.server.queue_batches import StoredBatch
from nodi.storage.records import Compression, NewRecord, Record, build_batch, decode_records, iter_batches

WAIT_MS = 20_000  # generous: the machine is shared


def stored(batch: bytes) -> StoredBatch:
    [(header, data)] = list(iter_batches(batch))
    return StoredBatch(header, bytes(data))


def value_of(record: Record) -> bytes:
    assert record.value is not None, f"no value at offset {record.offset}"
    return record.value


def values_and_offsets(batch: bytes) -> list[tuple[int, bytes]]:
    return [
        (record.offset, bytes(value_of(record)))
        for header, data in iter_batches(batch)
        for record in decode_records(data, header)
    ]


# ---------------------------------------------------------------------------
# Slices (no server)


def test_a_slice_is_a_valid_batch_of_the_records_it_names_with_their_offsets() -> None:
    records = [
        NewRecord(b"k%d" % i if i % 3 else None, b"v" * (i * 37 % 200), [("h", b"%d" % i)] if i % 4 == 0 else [], None)
        for i in range(300)
    ]
    batch = stored(build_batch(records, base_offset=1_000))
    assert batch.sliceable
    whole = values_and_offsets(batch.data)
    for first, last in [(1_000, 1_000), (1_000, 1_049), (1_050, 1_149), (1_299, 1_299), (1_123, 1_299)]:
        cut = batch.slice(first, last)
        assert len(cut) < len(batch.data)
        assert values_and_offsets(cut) == whole[first - 1_000 : last - 1_000 + 1]  # iter_batches checked its CRC
    assert batch.slice(1_000, 1_299) is batch.data  # all of it: sent as stored


def test_a_batch_that_cannot_be_cut_is_sent_whole() -> None:
    compressed = stored(build_batch([NewRecord(None, b"x" * 100)] * 10, compression=Compression.GZIP))
    assert not compressed.sliceable
    gaps = stored(
        build_batch([NewRecord(None, b"a"), NewRecord(None, b"b")], offset_deltas=[0, 5], last_offset_delta=5)
    )
    assert not gaps.sliceable  # which offsets it holds needs a decode
    damaged = stored(build_batch([NewRecord(None, b"a"), NewRecord(None, b"b")]))
    bad = bytearray(damaged.data)
    bad[61] = 0x7E  # the first record's length (zig-zag 63): past the batch's end
    damaged.data = bytes(bad)
    assert damaged.record_positions() is None
    assert damaged.slice(damaged.header.base_offset, damaged.header.base_offset) is damaged.data


# ---------------------------------------------------------------------------
# Against a real server


def call(client: Client, request):
    return client._run(client._async._call(request, None), None)


def test_receives_get_only_their_records_cut_from_the_stored_batches(broker) -> None:
    with Client(broker.address) as client:
        client.create_topic("cut")
        for start in (0, 100, 200):  # three stored batches of 100 records
            client.produce_batch(
                "cut", 0, build_batch([NewRecord(None, b"%04d" % i + b"." * 500) for i in range(start, start + 100)])
            )
        got: list[int] = []
        sizes = []
        while len(got) < 300:
            response = call(
                client, m.QueueReceiveBatchesRequest(group="g", topic="cut", messages_max=40, wait_ms=WAIT_MS)
            )
            offsets = [o for run in response.deliveries for o in range(run.offset, run.offset + run.count)]
            assert offsets and all(run.delivery_count == 1 for run in response.deliveries)
            assert sum(span.records_bytes for span in response.spans) == len(response.records)
            records = dict(values_and_offsets(bytes(response.records)))
            assert sorted(records) == offsets  # cut to exactly the delivered records
            assert all(records[o][:4] == b"%04d" % o for o in offsets)
            sizes.append(len(response.records))
            got.extend(offsets)
            results = call(
                client,
                m.QueueSettleRequest(
                    group="g",
                    topic="cut",
                    settlements=[
                        m.Settlement(
                            partition=0, offset=run.offset, delivery_count=1, action=m.SettleAction.ACK, count=run.count
                        )
                        for run in response.deliveries
                    ],
                ),
            ).results
            assert all(result.error_code == m.ErrorCode.NONE for result in results)
        assert got == list(range(300))
        assert max(sizes) < 40 * 520 + 2 * 61  # never a whole stored batch of 100


def test_delayed_and_expired_records_inside_a_batch_are_held_back_or_dropped(broker) -> None:
    now = int(time.time() * 1000)
    records = []
    for i in range(30):
        headers = []
        if i % 10 == 3:
            headers = [(NOT_BEFORE_MS, b"%d" % (now + 1_500))]  # due in 1.5 s
        elif i % 10 == 7:
            headers = [(TTL_MS, b"1")]  # expired long before the receive
        records.append(NewRecord(None, b"%d" % i, headers, now - 1_000))
    with Client(broker.address) as client:
        client.create_topic("mixed")
        client.produce_batch("mixed", 0, build_batch(records))
        seen: dict[int, float] = {}
        with client.queue("mixed", "g", ack_wait_ms=5_000) as queue:
            deadline = time.monotonic() + WAIT_MS / 1000
            while len(seen) < 27 and time.monotonic() < deadline:
                message = queue.receive(timeout_ms=500)
                if message is not None:
                    assert message.value == b"%d" % message.offset
                    assert message.offset not in seen
                    seen[message.offset] = time.time() * 1000
                    message.ack()
        assert sorted(seen) == [i for i in range(30) if i % 10 != 7]
        assert all(seen[i] >= now + 1_500 for i in (3, 13, 23))  # not before their time
        description = client.describe_queue("mixed", "g")
        assert description.expired_messages == 3


def test_a_client_of_protocol_2_still_gets_queue_receive(broker, monkeypatch) -> None:
    monkeypatch.setattr(
        client_connection.m, "HandshakeRequest", functools.partial(m.HandshakeRequest, protocol_version_max=2)
    )
    with Client(broker.address) as client:
        client.create_topic("old")
        client.produce_batch("old", 0, build_batch([NewRecord(None, b"%d" % i) for i in range(50)]))
        with pytest.raises(Exception) as refused:
            call(client, m.QueueReceiveBatchesRequest(group="g", topic="old", messages_max=5))
        assert "protocol version 3" in str(refused.value)
        with client.queue("old", "g", ack_wait_ms=5_000) as queue:
            got: list[tuple[int, bytes | None]] = []
            deadline = time.monotonic() + WAIT_MS / 1000
            while len(got) < 50 and time.monotonic() < deadline:
                message = queue.receive(timeout_ms=500)
                if message is not None:
                    got.append((message.offset, message.value))
                    message.ack()
            assert not queue._async._stored_batches  # it fell back to QueueReceive
        assert got == [(i, b"%d" % i) for i in range(50)]
