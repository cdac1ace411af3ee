"""The idempotent-consumer helper (broker/client/idempotent.py): processed keys recorded in LMDB
beside the consumer (or a store the user passes) make a redelivered message be skipped,
also after the consumer restarts; the store is bounded and written in batches."""

from __future__ import annotations

import pytest

from nodi.broker import Client, IdempotentConsumer, LmdbKeyStore
from nodi.broker.client.idempotent import message_key


@pytest.fixture(scope="module")
def broker(server):
    """The module's one server (conftest.server) for every test here."""
    return server


def test_a_redelivered_message_is_skipped_after_a_consumer_restart(broker, tmp_path) -> None:
    keys = tmp_path / "processed"
    handled: list[bytes] = []
    with Client(broker.address) as client:
        client.create_topic("jobs", partitions=2)
        for i in range(6):
            client.produce("jobs", f"job {i}", idempotency_key=f"job-{i}", partition=i % 2)
        # The same job published twice with its key on a topic without publish dedup: the
        # broker writes both, and only the consumer can tell.
        client.create_topic("jobs-nodedup", dedup_window_ms=0)
        client.produce("jobs-nodedup", b"job 0", idempotency_key="job-0")
        client.produce("jobs-nodedup", b"job 0 again", idempotency_key="job-0")
        client.produce("jobs-nodedup", b"keyless")

        # A consumer that handles some messages and dies before committing its offsets.
        consumer = client.consumer("jobs", group="workers", auto_commit=False)
        with IdempotentConsumer(consumer, keys, idle_timeout_ms=1_000) as messages:
            for message in messages:
                handled.append(message.value)
                if len(handled) == 4:
                    break
        consumer.close()  # nothing committed: every message is delivered again

        with client.consumer("jobs", group="workers") as consumer:
            with IdempotentConsumer(consumer, keys, idle_timeout_ms=1_000) as messages:
                for message in messages:
                    handled.append(message.value)
                statistics = messages.statistics()
        assert sorted(handled) == sorted(f"job {i}".encode() for i in range(6))
        assert statistics.duplicates_skipped == 4 and statistics.delivered == 2

        # Keys are shared by messages, not offsets: the second copy of job-0 is skipped;
        # a message without a key is known by topic/partition/offset.
        with client.consumer("jobs-nodedup") as consumer:
            with IdempotentConsumer(consumer, keys, idle_timeout_ms=1_000) as messages:
                assert [m.value for m in messages] == [b"keyless"]


class MemoryStore:
    """A user's own store: the two-method protocol."""

    def __init__(self) -> None:
        self.keys: set[bytes] = set()

    def seen(self, key: bytes) -> bool:
        return key in self.keys

    def mark(self, key: bytes) -> None:
        self.keys.add(key)


def test_a_store_the_user_passes(broker):
    store = MemoryStore()
    with Client(broker.address) as client:
        client.create_topic("events")
        client.produce("events", b"a", idempotency_key="a")
        client.produce("events", b"b")
        for _ in range(2):
            with client.consumer("events") as consumer:
                with IdempotentConsumer(consumer, store=store, idle_timeout_ms=500) as messages:
                    seen = [m.value for m in messages]
            assert seen == ([b"a", b"b"] if _ == 0 else [])
        assert store.keys == {b"ka", b"pevents/0/1"}


def test_the_lmdb_store_is_bounded_and_batches_its_writes(tmp_path):
    with LmdbKeyStore(tmp_path / "keys", keys_max=5, write_batch_max=3) as store:
        for i in range(4):
            store.mark(f"key-{i}".encode())
        statistics = store.statistics()
        assert statistics.flushes == 1 and statistics.pending == 1  # one transaction for three marks
        assert store.seen(b"key-3")  # pending marks count as seen
        for i in range(4, 12):
            store.mark(f"key-{i}".encode())
        store.flush()
        assert store.statistics().keys == 5 and store.statistics().evicted == 7
        assert not store.seen(b"key-0") and store.seen(b"key-11")
    with LmdbKeyStore(tmp_path / "keys", keys_max=5) as reopened:  # durable, order kept
        assert reopened.statistics().keys == 5 and reopened.seen(b"key-7") and not reopened.seen(b"key-6")
        reopened.mark(b"key-12")
        reopened.flush()
        assert not reopened.seen(b"key-7")


def test_message_key_prefers_the_idempotency_key():
    class Fake:
        topic, partition, offset = "t", 1, 9

        def __init__(self, key):
            self.key = key

        def header(self, name):
            return self.key

    assert message_key(Fake(b"order-1")) == b"korder-1"
    assert message_key(Fake(None)) == b"pt/1/9"


def test_a_queue_duplicate_is_skipped_and_acked(broker, tmp_path):
    keys = tmp_path / "queue-keys"
    with Client(broker.address) as client:
        client.create_topic("tasks", dedup_window_ms=0)
        client.produce("tasks", b"t1", idempotency_key="t1")
        with LmdbKeyStore(keys) as store:
            store.mark(b"kt1")  # handled earlier, by a consumer that crashed before acking
        client.produce("tasks", b"t1 copy", idempotency_key="t1")
        client.produce("tasks", b"t2", idempotency_key="t2")
        handled = []
        with client.queue("tasks", "workers", ack_wait_ms=60_000) as queue:
            with IdempotentConsumer(queue, keys, idle_timeout_ms=1_500) as messages:
                for message in messages:
                    handled.append(message.value)
                    message.ack()
                assert messages.statistics().duplicates_skipped == 2
            assert queue.receive(timeout_ms=500) is None  # the duplicates were acked too
        assert handled == [b"t2"]


def test_the_async_wrapper_skips_what_it_handled(broker, tmp_path):
    import asyncio

    from nodi.broker import AsyncClient, AsyncIdempotentConsumer

    async def scenario() -> list[list[bytes]]:
        runs = []
        async with AsyncClient(broker.address) as client:
            await client.create_topic("async-jobs")
            for value in (b"x", b"y"):
                await client.produce("async-jobs", value, idempotency_key=value)
            for _ in range(2):
                async with client.consumer("async-jobs") as consumer:
                    async with AsyncIdempotentConsumer(
                        consumer, tmp_path / "async-keys", idle_timeout_ms=1_000
                    ) as messages:
                        runs.append([message.value async for message in messages])
        return runs

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == [[b"x", b"y"], []]
