"""DELETE_RECORDS on a real `nodi serve`: both clients, per-partition errors, what
readers see afterwards (fetch, ListOffsets earliest, describe, a group committed below
the new start, a queue group), kill -9 right after the call, and `nodi topic truncate`."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from nodi.broker import AsyncClient, Client, OffsetOutOfRange
from nodi.broker.client.errors import NodiClientError
from nodi.broker.protocol import messages as m
from nodi.broker.server.security import Action, Resource, required_permissions

from conftest import NODI

TIMEOUT_S = 60


def _produce(client: Client, topic: str, partition: int, count: int) -> None:
    for number in range(count):
        client.produce(topic, b"%d" % number, partition=partition)


def test_delete_records_moves_the_start_and_readers_see_it(server) -> None:
    with Client(server.address, timeout_ms=10_000) as client:
        client.create_topic("dr-basic", partitions=2)
        _produce(client, "dr-basic", 0, 10)
        _produce(client, "dr-basic", 1, 4)
        starts = client.delete_records({("dr-basic", 0): 6, ("dr-basic", 1): -1})
        assert starts == {("dr-basic", 0): 6, ("dr-basic", 1): 4}
        with pytest.raises(OffsetOutOfRange):
            client.fetch("dr-basic", 0, 5)
        assert [message.offset for message in client.fetch("dr-basic", 0, 6)] == [6, 7, 8, 9]
        assert client.list_offsets("dr-basic", 0, "earliest") == 6
        assert client.list_offsets("dr-basic", 1, "earliest") == 4
        assert client.list_offsets("dr-basic", 0, 0) == 6  # by time: nothing below the start
        described = {p.partition: p for p in client.describe_topic("dr-basic").partitions}
        assert described[0].log_start_offset == 6 and described[1].log_start_offset == 4
        # Backwards changes nothing.
        assert client.delete_records({("dr-basic", 0): 2}) == {("dr-basic", 0): 6}


def test_per_partition_errors_leave_the_other_partitions_done(server) -> None:
    with Client(server.address, timeout_ms=10_000) as client:
        client.create_topic("dr-errors", partitions=2)
        _produce(client, "dr-errors", 0, 3)
        _produce(client, "dr-errors", 1, 3)
        with pytest.raises(OffsetOutOfRange, match="dr-errors-0"):
            client.delete_records({("dr-errors", 0): 99, ("dr-errors", 1): 2})
        assert client.list_offsets("dr-errors", 1, "earliest") == 2
        assert client.list_offsets("dr-errors", 0, "earliest") == 0
        with pytest.raises(NodiClientError, match="no partition 7"):
            client.delete_records({("dr-errors", 7): 1})
        with pytest.raises(NodiClientError, match="does not exist"):
            client.delete_records({("dr-missing", 0): 1})


def test_the_async_client_and_a_duplicate_partition(server) -> None:
    async def main() -> None:
        async with AsyncClient(server.address, timeout_ms=10_000) as client:
            await client.create_topic("dr-async")
            for number in range(5):
                await client.produce("dr-async", b"%d" % number, partition=0)
            assert await client.delete_records({("dr-async", 0): 3}) == {("dr-async", 0): 3}
            with pytest.raises(NodiClientError, match="more than once"):
                await client.core.call(
                    m.DeleteRecordsRequest(
                        topic="dr-async",
                        partitions=[m.RecordDeletion(partition=0, offset=4), m.RecordDeletion(partition=0, offset=4)],
                    ),
                    10_000,
                    expect=m.DeleteRecordsResponse,
                )
            assert await client.list_offsets("dr-async", 0, "earliest") == 3

    asyncio.run(main())


def test_delete_records_needs_admin_on_the_topic() -> None:
    request = m.DeleteRecordsRequest(topic="orders", partitions=[m.RecordDeletion(partition=0, offset=1)])
    assert required_permissions(request) == [(Action.ADMIN, Resource.TOPIC, "orders")]


def test_a_group_committed_below_the_start_and_a_queue_group_move_to_it(server) -> None:
    with Client(server.address, timeout_ms=10_000) as client:
        client.create_topic("dr-readers")
        _produce(client, "dr-readers", 0, 20)
        client.commit_offsets("dr-group", {("dr-readers", 0): 3})
        client.delete_records({("dr-readers", 0): 12})
        with client.consumer("dr-readers", group="dr-group", session_timeout_ms=10_000) as consumer:
            seen: list[int] = []
            deadline = time.monotonic() + TIMEOUT_S
            while len(seen) < 8 and time.monotonic() < deadline:
                seen.extend(message.offset for message in consumer.poll(500))
        assert seen == list(range(12, 20))
        with client.queue("dr-readers", "dr-queue", ack_wait_ms=60_000) as queue:
            offsets = []
            while (message := queue.receive(timeout_ms=1_000)) is not None:
                offsets.append(message.offset)
                message.ack()
        assert offsets == list(range(12, 20))


def test_the_start_survives_kill_9_right_after_the_call(broker_factory) -> None:
    process = broker_factory().start()
    with Client(process.address, timeout_ms=10_000) as client:
        client.create_topic("dr-crash", partitions=1, fsync_policy="never", segment_bytes=4096)
        for number in range(60):
            client.produce("dr-crash", b"x" * 200 + b"%d" % number, partition=0, acks="written")
        assert client.delete_records({("dr-crash", 0): 41}) == {("dr-crash", 0): 41}
    process.kill()
    restarted = broker_factory(process.data_dir).start()
    with Client(restarted.address, timeout_ms=10_000) as client:
        assert client.list_offsets("dr-crash", 0, "earliest") == 41
        assert client.list_offsets("dr-crash", 0, "latest") == 60  # made durable by the call
        with pytest.raises(OffsetOutOfRange):
            client.fetch("dr-crash", 0, 40)
        assert client.fetch("dr-crash", 0, 41)[0].offset == 41
        assert client.describe_topic("dr-crash").partitions[0].segments < 4
    restarted.stop()


def test_nodi_topic_truncate_asks_first(server) -> None:
    with Client(server.address, timeout_ms=10_000) as client:
        client.create_topic("dr-cli", partitions=2)
        _produce(client, "dr-cli", 0, 5)
        _produce(client, "dr-cli", 1, 5)

    def truncate(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
        return subprocess.run(
            NODI + ["--server", server.address, "topic", "truncate", "dr-cli", *args],
            input=stdin,
            capture_output=True,
            timeout=TIMEOUT_S,
        )

    refused = truncate("--before", "3", stdin=b"n\n")
    assert refused.returncode == 1 and b"Aborted" in refused.stderr
    done = truncate("--before", "3", "--partition", "1", stdin=b"y\n")
    assert done.returncode == 0, done.stderr
    assert b"dr-cli-1: log start offset now 3" in done.stdout
    everything = truncate("--before", "-1", "--yes", "--json")
    assert everything.returncode == 0, everything.stderr
    assert b'"log_start_offset": 5' in everything.stdout
    too_far = truncate("--before", "50", "--yes")
    assert too_far.returncode == 1 and b"out of range" in too_far.stderr.lower()
    with Client(server.address, timeout_ms=10_000) as client:
        assert [client.list_offsets("dr-cli", p, "earliest") for p in (0, 1)] == [5, 5]
