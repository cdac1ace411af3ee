"""The client API a benchmark adapter or a re-runnable script needs (issue 11), against a
real `nodi serve`: create_topic(exist_ok=) / delete_topic(missing_ok=), a producer's
flush() that raises what failed (SendFailed) and send_and_wait() that does not sit out
the linger, poll(max_records=) on stream consumers, receive_batch() on queues, every
exception the client raises importable from nodi.broker, and the blocking
Producer / Consumer / Queue written out with their async twins' signatures.

The tests share one server (module scope), each with topics of its own."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time

import pytest

from nodi.broker import (
    AsyncClient,
    Client,
    SendFailed,
    TopicExists,
    UnknownPartition,
    UnknownTopic,
)

# A linger no test waits out: a batch that goes out while it runs was sent on purpose.
LONG_LINGER_MS = 600_000


@pytest.fixture
def client(server):
    with Client(server.address, timeout_ms=10_000) as client:
        yield client


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


# -- create_topic(exist_ok=) and delete_topic(missing_ok=) ---------------------------------


def test_create_topic_exist_ok_returns_the_existing_settings_and_delete_missing_ok_is_quiet(client):
    created = client.create_topic("api-rerun", partitions=2, retention_ms=60_000)
    with pytest.raises(TopicExists):
        client.create_topic("api-rerun", partitions=2)
    # A second run of the same script: no error, and the settings in force (not the ones
    # asked for this time: partitions=5 changes nothing).
    again = client.create_topic("api-rerun", partitions=5, exist_ok=True)
    assert again == created
    assert again.partitions == 2
    client.delete_topic("api-rerun", missing_ok=True)
    assert "api-rerun" not in [topic.name for topic in client.list_topics()]
    client.delete_topic("api-rerun", missing_ok=True)  # gone already: nothing happens
    with pytest.raises(UnknownTopic):
        client.delete_topic("api-rerun")
    # exist_ok on a new name creates it.
    assert client.create_topic("api-rerun", exist_ok=True).partitions == 1
    client.delete_topic("api-rerun")


def test_async_create_topic_exist_ok_and_delete_topic_missing_ok(server):
    async def main():
        async with AsyncClient(server.address, timeout_ms=10_000) as client:
            created = await client.create_topic("api-rerun-async", partitions=3)
            assert await client.create_topic("api-rerun-async", exist_ok=True) == created
            with pytest.raises(TopicExists):
                await client.create_topic("api-rerun-async", partitions=3)
            await client.delete_topic("api-rerun-async", missing_ok=True)
            await client.delete_topic("api-rerun-async", missing_ok=True)
            with pytest.raises(UnknownTopic):
                await client.delete_topic("api-rerun-async")

    run(main())


# -- the producer: flush() raises what failed; send_and_wait() does not linger --------------


def test_flush_raises_send_failed_naming_how_many_failed_once(client, caplog):
    client.create_topic("api-flush", partitions=1)
    with client.producer(linger_ms=1) as producer:
        good = [producer.send("api-flush", b"ok", partition=0) for _ in range(2)]
        bad = [producer.send("api-flush", b"lost", partition=7) for _ in range(3)]  # no partition 7
        with pytest.raises(SendFailed) as raised:
            producer.flush()
        assert raised.value.failed == 3
        assert isinstance(raised.value.first, UnknownPartition)
        assert raised.value.__cause__ is raised.value.first
        assert "3 messages" in str(raised.value)
        copied = pickle.loads(pickle.dumps(raised.value))  # e.g. from a multiprocessing worker
        assert copied.failed == 3 and isinstance(copied.first, UnknownPartition)
        assert [future.result()[0] for future in good] == [0, 0]
        assert all(isinstance(future.exception(), UnknownPartition) for future in bad)
        producer.flush()  # reported once: nothing new failed
        producer.send("api-flush", b"ok", partition=0).result()
        producer.flush()
        # A failure no flush reports is logged by close(), not raised.
        lost = producer.send("api-flush", b"lost", partition=9)
        with caplog.at_level(logging.WARNING, logger="nodi.client"):
            producer.close()
    assert isinstance(lost.exception(), UnknownPartition)
    assert any("1 message sent before flush() failed" in record.getMessage() for record in caplog.records)


def test_async_flush_raises_send_failed_for_an_unknown_topic_and_a_bad_partition(server):
    async def main():
        async with AsyncClient(server.address, timeout_ms=10_000) as client:
            await client.create_topic("api-flush-async", partitions=1)
            async with client.producer(linger_ms=1) as producer:
                unknown = producer.send("api-no-such-topic", b"x")  # fails at its partition lookup
                bad = producer.send("api-flush-async", b"x", partition=4)
                good = producer.send("api-flush-async", b"x")
                with pytest.raises(SendFailed) as raised:
                    await producer.flush()
                assert raised.value.failed == 2
                assert isinstance(raised.value.first, (UnknownTopic, UnknownPartition))
                assert isinstance(unknown.exception(), UnknownTopic)
                assert isinstance(bad.exception(), UnknownPartition)
                assert (await good)[0] == 0
                await producer.flush()

    run(main())


def test_send_and_wait_sends_its_batch_without_the_linger(client):
    client.create_topic("api-urgent", partitions=2)
    with client.producer(linger_ms=LONG_LINGER_MS) as producer:
        before = producer.send("api-urgent", b"buffered", partition=0)
        elsewhere = producer.send("api-urgent", b"other partition", partition=1)
        partition, offset = producer.send_and_wait("api-urgent", b"now", partition=0)
        assert (partition, offset) == (0, 1)
        assert before.result(0) == (0, 0)  # went out in the same batch
        assert not elsewhere.done()  # partition 1's buffer still lingers
        producer.flush()
        assert elsewhere.result(0) == (1, 0)
        with pytest.raises(UnknownPartition):
            producer.send_and_wait("api-urgent", b"x", partition=5)


def test_async_send_and_wait_sends_at_once_also_for_a_topic_it_has_not_looked_up(server):
    async def main():
        async with AsyncClient(server.address, timeout_ms=10_000) as setup:
            await setup.create_topic("api-urgent-async", partitions=1)
        async with AsyncClient(server.address, timeout_ms=10_000) as client:  # knows no partition count
            async with client.producer(linger_ms=LONG_LINGER_MS) as producer:
                assert await producer.send_and_wait("api-urgent-async", b"first") == (0, 0)
                assert await producer.send_and_wait("api-urgent-async", b"second", key="k") == (0, 1)
                with pytest.raises(UnknownTopic):
                    await producer.send_and_wait("api-no-such-topic", b"x")

    run(main())


# -- poll(max_records=) ----------------------------------------------------------------------


def test_poll_max_records_returns_each_message_once_and_commits_only_what_it_returned(client):
    client.create_topic("api-poll", partitions=2)
    with client.producer() as producer:
        for n in range(60):
            producer.send("api-poll", f"{n}", partition=n % 2)
    batches = []
    with client.consumer("api-poll", group="api-poll-group", auto_commit=False) as consumer:
        while sum(len(batch) for batch in batches) < 40:
            batch = consumer.poll(timeout_ms=5_000, max_records=7)
            assert 0 < len(batch) <= 7
            batches.append(batch)
        consumer.commit()
        positions = {partition: consumer.position("api-poll", partition) for partition in (0, 1)}
        assert consumer.statistics().messages_delivered == sum(len(batch) for batch in batches)
    returned = [message for batch in batches for message in batch]
    # commit() stored the offset after the last message returned, per partition: the
    # messages fetched and not returned are read again by the group.
    for partition in (0, 1):
        offsets = [message.offset for message in returned if message.partition == partition]
        assert offsets == list(range(len(offsets)))
        assert positions[partition] == len(offsets)
    with client.consumer("api-poll", group="api-poll-group", auto_commit=False) as consumer:
        rest = []
        while len(returned) + len(rest) < 60:
            rest.extend(consumer.poll(timeout_ms=5_000, max_records=1_000))
    everything = sorted((message.partition, message.offset) for message in returned + rest)
    assert everything == sorted((n % 2, n // 2) for n in range(60))
    with client.consumer("api-poll") as consumer, pytest.raises(ValueError):
        consumer.poll(max_records=0)


def test_poll_max_records_after_a_seek_reads_from_the_new_position(client):
    client.create_topic("api-poll-seek")
    with client.producer() as producer:
        for n in range(30):
            producer.send("api-poll-seek", f"{n}")
    with client.consumer("api-poll-seek") as consumer:
        first = consumer.poll(timeout_ms=5_000, max_records=10)
        assert [message.offset for message in first] == list(range(10))
        assert consumer.position("api-poll-seek", 0) == 10
        consumer.seek("api-poll-seek", 0, 3)  # what was fetched and not returned is dropped
        again = consumer.poll(timeout_ms=5_000, max_records=4)
        assert [message.offset for message in again] == [3, 4, 5, 6]


def test_async_poll_max_records_one_at_a_time(server):
    async def main():
        async with AsyncClient(server.address, timeout_ms=10_000) as client:
            await client.create_topic("api-poll-async")
            for n in range(5):
                await client.produce("api-poll-async", f"{n}")
            async with client.consumer("api-poll-async") as consumer:
                values = []
                for _ in range(5):
                    batch = await consumer.poll(timeout_ms=5_000, max_records=1)
                    assert len(batch) == 1
                    values.append(batch[0].value)
                assert values == [f"{n}".encode() for n in range(5)]
                assert consumer.position("api-poll-async", 0) == 5
                assert await consumer.poll(timeout_ms=100, max_records=1) == []

    run(main())


# -- receive_batch() on queues ---------------------------------------------------------------


def produce_values(client, topic: str, count: int) -> None:
    client.create_topic(topic)
    with client.producer() as producer:
        for n in range(count):
            producer.send(topic, b"%d" % n)


def test_receive_batch_leases_only_what_it_returns_within_flow_control(client) -> None:
    produce_values(client, "api-batch", 250)
    handled: list[int] = []
    with client.queue("api-batch", "workers", max_outstanding=100) as queue:
        with pytest.raises(ValueError):
            queue.receive_batch(0)
        batch = queue.receive_batch(40, timeout_ms=10_000)
        assert len(batch) == 40
        statistics = queue.statistics()
        assert statistics.outstanding == 40 and statistics.buffered == 0  # nothing hidden
        handled += [message.offset for message in batch]
        # Flow control: 60 more fit under max_outstanding while these 40 are unsettled.
        more = queue.receive_batch(500, timeout_ms=10_000)
        assert len(more) == 60
        handled += [message.offset for message in more]
        assert queue.receive_batch(10, timeout_ms=200) == []  # 100 held, unsettled: no room
        for message in batch + more:
            assert message.ack(wait=False) is None
        queue.flush()
        while len(handled) < 250:
            batch = queue.receive_batch(64, timeout_ms=10_000)
            assert 0 < len(batch) <= 64
            handled += [message.offset for message in batch]
            assert all(message.ack() for message in batch)
        assert queue.receive_batch(10, timeout_ms=200) == []
    assert sorted(handled) == list(range(250))  # each once
    state = client.describe_queue("api-batch", "workers")
    assert state.acked == 250 and state.redelivered == 0


def test_receive_batch_held_longer_than_ack_wait_keeps_its_leases(client):
    produce_values(client, "api-batch-slow", 20)
    with client.queue("api-batch-slow", "workers", ack_wait_ms=1_000) as queue:
        batch = queue.receive_batch(20, timeout_ms=10_000)
        assert len(batch) == 20
        time.sleep(1.5)  # a handler slower than ack_wait: the lease keeper extends them
        assert all(message.ack() for message in batch)
        statistics = queue.statistics()
    assert statistics.stale_settles == 0 and statistics.leases_extended >= 20
    state = client.describe_queue("api-batch-slow", "workers")
    assert state.redelivered == 0 and state.acked == 20


def test_async_receive_batch_and_at_most_once(server):
    async def main():
        async with AsyncClient(server.address, timeout_ms=10_000) as client:
            await client.create_topic("api-batch-async")
            async with client.queue("api-batch-async", "workers") as queue:
                assert await queue.receive_batch(5, timeout_ms=100) == []
                for n in range(12):
                    await client.produce("api-batch-async", b"%d" % n)
                first = await queue.receive_batch(5, timeout_ms=10_000)
                assert [message.offset for message in first] == [0, 1, 2, 3, 4]
                assert await asyncio.gather(*(message.ack() for message in first)) == [True] * 5
            async with client.queue("api-batch-async", "workers", guarantee="at-most-once") as queue:
                rest = await queue.receive_batch(100, timeout_ms=10_000)
                assert [message.offset for message in rest] == list(range(5, 12))  # acked on receipt
            state = await client.describe_queue("api-batch-async", "workers")
            assert state.acked == 12

    run(main())


# -- every exception the client raises is importable from nodi.broker -----------------------


def test_every_exception_class_the_client_raises_by_name_is_builtin_or_exported() -> None:
    """A static check over broker/client: `raise Name(...)` / `raise Name` of a class is
    a builtin exception or a name nodi.broker exports (so `from nodi.broker import X`
    can catch it). Errors re-raised from a variable are the client's own (error_for,
    records_error) or come back as those; the real-server test below checks the
    record limits, the one place storage's own errors used to leak through."""
    import ast
    import builtins
    from pathlib import Path

    import nodi.broker
    import nodi.broker.client

    exported = set(nodi.broker.__all__)
    raised: dict[str, list[str]] = {}
    for path in sorted(Path(nodi.broker.client.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name) and target.id[:1].isupper():
                raised.setdefault(target.id, []).append(f"{path.name}:{node.lineno}")
    assert {"BufferFull", "ClientClosed", "InvalidRecords", "Timeout", "ValueError"} <= set(
        raised
    )  # the scan sees them
    for name, places in raised.items():
        builtin = getattr(builtins, name, None)
        if isinstance(builtin, type) and issubclass(builtin, BaseException):
            continue
        assert name in exported, f"{name} (raised at {places}) is not importable from nodi.broker"
    assert issubclass(nodi.broker.SendFailed, nodi.broker.NodiClientError)


def test_every_client_error_pickles_to_the_same_text_class_code_and_fields():
    """Errors cross process boundaries (multiprocessing workers, Celery results): a copy
    keeps its text (the code prefixed once), class, code and own fields."""
    import nodi.broker
    from nodi.broker.protocol.errors import ErrorCode

    samples = []
    for name in nodi.broker.__all__:
        cls = getattr(nodi.broker, name)
        if not (isinstance(cls, type) and issubclass(cls, nodi.broker.NodiClientError)):
            continue
        if cls is nodi.broker.SendFailed:
            samples.append(cls(2, nodi.broker.UnknownTopic("gone")))
        elif cls is nodi.broker.DeadLetterWithoutSource:
            samples.append(cls("orders.dlq", 1, 42, 7))
        elif cls is nodi.broker.DeadLetterNotWaiting:
            samples.append(cls("orders.dlq", 1, 42, "it is not waiting"))
        else:
            samples.append(cls("something went wrong"))
    samples.append(nodi.broker.NodiClientError("coded", code=ErrorCode.UNKNOWN_TOPIC))
    assert len(samples) > 30
    for error in samples:
        copied = pickle.loads(pickle.dumps(error))
        assert type(copied) is type(error)
        assert str(copied) == str(error) and copied.args == error.args
        assert copied.code == error.code
        assert {k: str(v) for k, v in vars(copied).items()} == {k: str(v) for k, v in vars(error).items()}


def test_a_record_above_a_limit_is_a_limit_exceeded_from_every_path(client):
    """produce(), the producer, request() and reply() build their records in the client:
    a record above record_bytes_max is the client's LimitExceeded, not storage's own
    error, before anything is sent."""
    from nodi.broker import LimitExceeded

    client.create_topic("api-limits")
    huge = b"x" * (2 << 20)
    with pytest.raises(LimitExceeded, match="record_bytes_max"):
        client.produce("api-limits", huge)
    with pytest.raises(LimitExceeded, match="headers_per_record_max"):
        client.produce("api-limits", b"x", headers=[(f"h{n}", b"") for n in range(5_000)])
    with client.producer() as producer:
        future = producer.send("api-limits", huge)
        with pytest.raises(SendFailed) as raised:
            producer.flush()
    assert isinstance(raised.value.first, LimitExceeded) and isinstance(future.exception(), LimitExceeded)
    with pytest.raises(LimitExceeded):
        client.request("api-limits", huge, timeout_ms=5_000)
    assert client.describe_topic("api-limits").partitions[0].log_end_offset == 0  # nothing was sent


# -- the blocking parts are written out with their async twins' signatures -----------------

# Return annotations that differ by design: what each side hands back.
SYNC_RETURN_OF = {
    "asyncio.Future": "MessageFuture",  # the sync Producer's futures are concurrent.futures ones
}
# Public names only the blocking twin has: read-only views of plain attributes of the
# async twin (which tools see on its instances, not its class).
SYNC_ONLY = {
    "Producer": set(),
    "Consumer": {"group", "member_id", "generation"},
    "Queue": {"topic", "group"},
}


def _public_members(cls) -> dict[str, object]:
    return {name: value for name, value in vars(cls).items() if not name.startswith("_")}


@pytest.mark.parametrize(
    "names", [("AsyncProducer", "Producer"), ("AsyncConsumer", "Consumer"), ("AsyncQueue", "Queue")]
)
def test_the_blocking_producer_consumer_and_queue_write_out_every_async_method_with_its_signature(names):
    """Producer, Consumer and Queue have each public method and property of their async
    twin written in their own class (IDEs and type checkers see them), with the same
    parameters, defaults and return (the future type aside), and nothing else but
    SYNC_ONLY; a twin that can be iterated or used in `with` can be on both sides."""
    import inspect

    import nodi.broker

    async_class, sync_class = (getattr(nodi.broker, name) for name in names)
    async_members, sync_members = _public_members(async_class), _public_members(sync_class)
    assert set(sync_members) - set(async_members) == SYNC_ONLY[sync_class.__name__]
    for name, value in async_members.items():
        assert name in sync_members, f"{sync_class.__name__} has no written-out {name}"
        twin = sync_members[name]
        if isinstance(value, property):
            assert isinstance(twin, property), name
            continue
        assert inspect.isfunction(value) and inspect.isfunction(twin), name
        assert not inspect.iscoroutinefunction(twin), name
        assert twin.__qualname__ == f"{sync_class.__name__}.{name}", name
        expected, written = inspect.signature(value), inspect.signature(twin)
        assert list(written.parameters.values()) == list(expected.parameters.values()), name
        returned = expected.return_annotation
        assert written.return_annotation == SYNC_RETURN_OF.get(returned, returned), name
    for async_name, sync_name in (("__aenter__", "__enter__"), ("__aexit__", "__exit__"), ("__aiter__", "__iter__")):
        assert (async_name in vars(async_class)) == (sync_name in vars(sync_class)), (async_name, sync_name)


def test_the_clients_make_their_parts_with_the_same_parameters():
    import inspect

    for name in ("producer", "consumer", "queue"):
        assert (
            inspect.signature(getattr(Client, name)).parameters
            == inspect.signature(getattr(AsyncClient, name)).parameters
        ), name


def test_a_receive_batch_cancelled_midway_gives_back_what_it_had_taken(server):
    """The messages a cancelled receive_batch had taken never reach the application:
    they are released at once (not held, and extended, until max_lease_ms)."""
    from nodi.broker.protocol import messages as m

    async def main():
        async with AsyncClient(server.address, timeout_ms=10_000) as client:
            await client.create_topic("api-batch-cancel")
            for n in range(10):
                await client.produce("api-batch-cancel", b"%d" % n)
            async with client.queue("api-batch-cancel", "workers", batch_max=5) as queue:
                real_call = client.core.call
                second_trip = asyncio.Event()
                trips = []

                async def call(request, *args, **kwargs):
                    # QueueReceiveBatches from protocol 3 on, QueueReceive before it
                    if isinstance(request, (m.QueueReceiveRequest, m.QueueReceiveBatchesRequest)):
                        trips.append(request.messages_max)
                        if len(trips) == 2:
                            second_trip.set()
                            await asyncio.Event().wait()  # hangs until cancelled
                    return await real_call(request, *args, **kwargs)

                client.core.call = call
                task = asyncio.create_task(queue.receive_batch(10, timeout_ms=10_000))
                await asyncio.wait_for(second_trip.wait(), 10)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                client.core.call = real_call
                assert trips == [5, 5]  # 5 per trip (batch_max), the second for the 5 still wanted
                assert queue.statistics().outstanding == 0
                await queue.flush()
                again = await queue.receive_batch(10, timeout_ms=10_000)
                while len(again) < 10:
                    more = await queue.receive_batch(10 - len(again), timeout_ms=10_000)
                    assert more
                    again += more
                assert sorted(message.offset for message in again) == list(range(10))
                assert {message.offset for message in again if message.delivery_count == 2} == {0, 1, 2, 3, 4}
                await asyncio.gather(*(message.ack() for message in again))

    run(main())
