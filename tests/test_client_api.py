"""The client API a benchmark adapter or a re-runnable script needs (issue 11), against a
real `nodi serve`: create_topic(exist_ok=) / delete_topic(missing_ok=), a producer's
flush() that raises what failed (SendFailed) and send_and_wait() that does not sit out
the linger, poll(max_records=) on stream consumers, receive_batch() on queues, every
exception the client raises importable from nodi.broker, and the blocking
Producer / Consumer / Queue written out with their async twins' signatures.

The tests share one server (module scope), each with topics of its own."""

from __future__ import annotations

import asyncio

import pytest

from nodi.broker import (
    AsyncClient,
    Client,
    TopicExists,
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
