"""The batching producer (nodi.broker.client.producer) against a real `nodi serve` process:
order per partition over 100k messages, key routing, the async front end, compression
and acks, idempotent retries answered with the original offsets, a failed batch that
does not leave a sequence gap, the buffer limit."""

from __future__ import annotations

import asyncio

import pytest

from nodi.broker import AsyncClient, Client
from nodi.broker.client import (
    BufferFull,
    ConnectionLost,
    DiskFull,
    SendFailed,
    UnknownTopic,
    partition_for_key,
)
from nodi.storage.records import Compression, iter_batches

MESSAGES = 100_000
KEYS = 60


@pytest.fixture
def client(server):
    with Client(server.address, timeout_ms=20_000) as client:
        yield client


def read_all(client, topic: str, partition: int, until: int | None = None) -> list:
    """Every message of a partition, with fetch. Fetches end at the durable offset, so
    after acks="written" pass `until` (the end the writes reached): the reads then
    long-poll until it is durable."""
    out = []
    end = client.list_offsets(topic, partition, "latest") if until is None else until
    offset = 0
    while offset < end:
        messages, offset = client.fetch_with_position(topic, partition, offset, bytes_max=4 << 20, wait_ms=10_000)
        out.extend(messages)
    return out


def test_order_per_partition_over_100k_messages(client) -> None:
    client.create_topic("ordered", 6)
    padding = b"." * 1000
    sent_keys = [f"k{i % KEYS}" for i in range(MESSAGES)]
    with client.producer(linger_ms=5) as producer:
        futures = [producer.send("ordered", f"{i}:".encode() + padding, key=key) for i, key in enumerate(sent_keys)]
        producer.flush(timeout_ms=60_000)
    results = [future.result() for future in futures]
    last: dict[str, tuple[int, int]] = {}
    for key, (partition, offset) in zip(sent_keys, results):
        assert partition == partition_for_key(key.encode(), 6)
        if key in last:
            assert last[key][0] == partition and last[key][1] < offset  # later send, later offset
        last[key] = (partition, offset)
    seen = 0
    for partition in range(6):
        messages = read_all(client, "ordered", partition)
        assert [message.offset for message in messages] == list(range(len(messages)))
        numbers = [int(message.value.split(b":", 1)[0]) for message in messages]
        assert numbers == sorted(numbers)  # one producer: the log is in send order
        for message, number in zip(messages, numbers):
            assert message.key == sent_keys[number].encode() and results[number] == (partition, message.offset)
        seen += len(messages)
    assert seen == MESSAGES


def test_keyless_messages_fill_batches_round_robin(client):
    client.create_topic("sticky", 3)
    with client.producer(linger_ms=1000, batch_bytes_max=10_000) as producer:
        futures = [producer.send("sticky", b"x" * 100) for _ in range(600)]
    partitions = [future.result()[0] for future in futures]
    assert set(partitions) == {0, 1, 2}
    switches = sum(1 for a, b in zip(partitions, partitions[1:]) if a != b)
    assert switches < 600 // 50  # whole batches go to one partition, not one message each
    batches = sum(len(list(iter_batches(client._run(_raw_fetch(client, "sticky", p), None)))) for p in range(3))
    assert batches == switches + 1


async def _raw_fetch(client, topic, partition):
    from nodi.broker.protocol import messages as m

    response = await client._async._call(
        m.FetchRequest(topic=topic, partition=partition, offset=0, bytes_max=8 << 20), None
    )
    return bytes(response.records)


def test_async_producer_routes_batches_and_reports_errors(server):
    async def main():
        async with AsyncClient(server.address) as client:
            await client.create_topic("async-producer", 4)
            producer = client.producer(linger_ms=2)
            # The partition count is not known yet: these wait for one DescribeTopic.
            keyed = [producer.send("async-producer", str(i), key=f"key-{i % 7}") for i in range(500)]
            pinned = producer.send("async-producer", b"pinned", partition=3)
            keyless = [producer.send("async-producer", b"free") for _ in range(50)]
            missing = producer.send("no-such-topic", b"lost")
            with pytest.raises(SendFailed) as raised:  # flush() reports what failed
                await producer.flush()
            assert raised.value.failed == 1 and isinstance(raised.value.first, UnknownTopic)
            for i, future in enumerate(keyed):
                partition, offset = future.result()
                assert partition == partition_for_key(f"key-{i % 7}".encode(), 4) and offset >= 0
            assert pinned.result()[0] == 3
            assert all(future.result()[1] >= 0 for future in keyless)
            with pytest.raises(UnknownTopic):
                missing.result()
            partition, offset = await producer.send_and_wait("async-producer", b"one more", partition=0)
            assert partition == 0 and offset == await client.list_offsets("async-producer", 0) - 1
            await producer.close()
            # Each key's messages are in send order within its partition.
            for key in range(7):
                offsets = [keyed[i].result()[1] for i in range(500) if i % 7 == key]
                assert offsets == sorted(offsets)

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("compression", ["none", "gzip", "snappy", "lz4", "zstd"])
@pytest.mark.parametrize("acks", ["written", "durable"])
def test_compression_and_acks(client, compression, acks):
    topic = f"codec-{compression}-{acks}"
    client.create_topic(topic)
    with client.producer(compression=compression, acks=acks, linger_ms=20) as producer:
        futures = [producer.send(topic, f"value-{i}" * 20, headers={"i": str(i)}) for i in range(300)]
    assert [future.result() for future in futures] == [(0, i) for i in range(300)]
    messages = read_all(client, topic, 0, until=300)
    assert [message.value for message in messages] == [f"value-{i}".encode() * 20 for i in range(300)]
    assert [message.header("i") for message in messages] == [str(i).encode() for i in range(300)]
    codecs = {header.compression for header, _ in iter_batches(client._run(_raw_fetch(client, topic, 0), None))}
    assert codecs == {Compression[compression.upper()]}


def test_acks_none_producer(client):
    client.create_topic("fire-and-forget")
    with pytest.raises(ValueError):
        client.producer(acks="none")  # idempotence needs acknowledgements
    with client.producer(acks="none", idempotent=False) as producer:
        futures = [producer.send("fire-and-forget", str(i)) for i in range(100)]
    assert {future.result() for future in futures} == {(0, -1)}


def test_a_retried_batch_gets_its_original_offsets(client, monkeypatch):
    """The ack of a written batch is lost (the connection 'breaks' after the server
    answered): the producer sends the same bytes again and the server answers with the
    original offsets; the log holds every message once."""
    client.create_topic("lost-acks", 2)
    real = client._async.produce_batch
    lost = []

    async def lose_first_ack(topic, partition, batch, **options):
        response = await real(topic, partition, batch, **options)
        if len(lost) < 3:
            lost.append((partition, response.base_offset, response.last_offset))
            raise ConnectionLost("the answer was lost")
        return response

    monkeypatch.setattr(client._async, "produce_batch", lose_first_ack)
    with client.producer(linger_ms=5) as producer:
        futures = [producer.send("lost-acks", f"m{i}", key=str(i % 5)) for i in range(2000)]
    assert len(lost) == 3
    results = [future.result() for future in futures]
    for partition, base, last in lost:
        assert (partition, base) in results and (partition, last) in results
    logged = [message.value for p in range(2) for message in read_all(client, "lost-acks", p)]
    assert sorted(logged) == sorted(f"m{i}".encode() for i in range(2000))  # nothing twice


def test_a_failed_batch_leaves_no_sequence_gap(client, monkeypatch):
    """A batch refused for good fails its messages; the next batches of the partition go
    out under a fresh producer id, restamped, instead of hitting a sequence gap."""
    client.create_topic("gap")
    real = client._async.produce_batch
    calls = []

    async def refuse_second(topic, partition, batch, **options):
        calls.append(len(calls))
        if len(calls) == 2:
            raise DiskFull("no space left")
        return await real(topic, partition, batch, **options)

    monkeypatch.setattr(client._async, "produce_batch", refuse_second)
    with client.producer(linger_ms=0, max_in_flight=1) as producer:
        first = producer.send("gap", b"first")
        producer.flush()
        second = producer.send("gap", b"second")
        with pytest.raises(SendFailed) as raised:  # flush() reports the refused batch
            producer.flush()
        assert raised.value.failed == 1 and isinstance(raised.value.first, DiskFull)
        third = [producer.send("gap", f"third-{i}") for i in range(3)]
        producer.flush()
    assert first.result() == (0, 0)
    with pytest.raises(DiskFull):
        second.result()
    assert [future.result() for future in third] == [(0, 1), (0, 2), (0, 3)]
    headers = [header for header, _ in iter_batches(client._run(_raw_fetch(client, "gap", 0), None))]
    assert headers[0].base_sequence == 0
    assert headers[1].producer_id != headers[0].producer_id and headers[1].base_sequence == 0
    assert len({header.producer_id for header in headers[1:]}) == 1


def test_the_buffer_limit_holds_senders_back(server):
    async def main():
        async with AsyncClient(server.address) as client:
            await client.create_topic("bounded")
            producer = client.producer(buffer_bytes_max=20_000, linger_ms=1000)
            futures = []
            with pytest.raises(BufferFull):
                for _ in range(1000):
                    futures.append(producer.send("bounded", b"x" * 1000))
            assert 10 < len(futures) < 30
            await producer.wait_for_space()  # the linger passes, the batch is acknowledged
            assert all(future.done() for future in futures)
            await producer.close()

    asyncio.run(asyncio.wait_for(main(), 60))
