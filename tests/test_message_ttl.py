"""Message TTL for stream readers against a real server: fetch and the consumer skip
expired messages by default (counted in the consumer's statistics) and return them with
include_expired=True; expiry is the message timestamp plus its TTL header, else the
topic's default TTL. TTLs are small and waits generous; no timing is asserted."""

from __future__ import annotations

import asyncio
import datetime
import time

import pytest

from nodi.broker import AsyncClient, Client
from nodi.broker.client.types import Message
from nodi.broker.protocol.headers import TTL_MS

HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def broker(server):
    """The module's one server (conftest.server) for every test here."""
    return server


def produce_three(client: Client, topic: str) -> None:
    client.produce(topic, b"short", ttl_ms=100)
    client.produce(topic, b"plain")
    client.produce(topic, b"long", ttl_ms=HOUR_MS)
    # An old timestamp: its TTL counts from it, so it is expired on arrival.
    client.produce(topic, b"old", ttl_ms=60_000, timestamp=int(time.time() * 1000) - HOUR_MS)


def test_fetch_and_consumer_skip_expired_messages_unless_asked(broker):
    with Client(broker.address) as client:
        client.create_topic("ttl")
        produce_three(client, "ttl")
        time.sleep(0.5)  # five times the short TTL
        assert [m.value for m in client.fetch("ttl", 0, 0)] == [b"plain", b"long"]
        everything = client.fetch("ttl", 0, 0, include_expired=True)
        assert [m.value for m in everything] == [b"short", b"plain", b"long", b"old"]
        short, plain, long_lived, _ = everything
        assert short.header(TTL_MS) == b"100" and short.expired()
        assert short.expires_at == short.datetime + datetime.timedelta(milliseconds=100)
        assert plain.expires_at is None and not plain.expired()
        assert long_lived.expires_at_ms == long_lived.timestamp + HOUR_MS
        with client.consumer("ttl", idle_timeout_ms=1_000) as consumer:
            assert [m.value for m in consumer] == [b"plain", b"long"]
            statistics = consumer.statistics()
            assert statistics.expired_skipped == 2 and statistics.messages_delivered == 2
        with client.consumer("ttl", idle_timeout_ms=1_000, include_expired=True) as consumer:
            assert len(list(consumer)) == 4
            assert consumer.statistics().expired_skipped == 0


def test_the_topic_default_ttl_applies_without_a_header(broker):
    with Client(broker.address) as client:
        settings = client.create_topic("short-lived", ttl_ms=100)
        assert settings.ttl_ms == 100 and client.describe_topic("short-lived").settings.ttl_ms == 100
        client.produce("short-lived", b"default")
        client.produce("short-lived", b"own ttl", ttl_ms=HOUR_MS)
        time.sleep(0.5)
        kept = client.fetch("short-lived", 0, 0)
        assert [m.value for m in kept] == [b"own ttl"]
        expired = client.fetch("short-lived", 0, 0, include_expired=True)[0]
        assert expired.expires_at_ms == expired.timestamp + 100
    # A client that never created or described the topic learns its default TTL.
    with Client(broker.address) as other:
        assert [m.value for m in other.fetch("short-lived", 0, 0)] == [b"own ttl"]


def test_the_async_consumer_skips_expired_messages(broker):
    async def scenario() -> None:
        async with AsyncClient(broker.address) as client:
            await client.create_topic("async-ttl", partitions=2)
            await client.produce("async-ttl", b"gone", ttl_ms=50, partition=0)
            await client.produce("async-ttl", b"kept", partition=1)
            async with client.producer() as producer:  # send() takes ttl_ms too
                await producer.send("async-ttl", b"gone too", ttl_ms=50, partition=1)
            await asyncio.sleep(0.4)
            async with client.consumer("async-ttl", idle_timeout_ms=1_000) as consumer:
                assert [m.value async for m in consumer] == [b"kept"]
                assert consumer.statistics().expired_skipped == 2

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_message_expiry_is_computed_from_its_own_fields():
    message = Message("t", 0, 5, 1_000, None, b"v", ((TTL_MS, b"250"),))
    assert message.expires_at_ms == 1_250 and message.expired(1_250) and not message.expired(1_249)
    bad_header = Message("t", 0, 5, 1_000, None, b"v", ((TTL_MS, b"soon"),), default_ttl_ms=10)
    assert bad_header.expires_at_ms == 1_010  # an unreadable TTL header is ignored
    assert Message("t", 0, 5, 1_000, None, b"v").expires_at is None
