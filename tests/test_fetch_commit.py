"""Commits riding on a fetch (Fetch version 2, protocol version 4; issue 12): the codec's
round trips and version rules, older clients still served, the server applying the
commits with CommitOffsets' rules and reporting their errors apart from the fetch's,
the consumer's commit(), commit_nowait() and auto-commit riding on its next fetch (and
falling back to CommitOffsets with an older server), and a ridden commit that survives
kill -9 of the server once it is answered."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodi.broker import Message
from nodi.broker.client import AsyncClient, Client
from nodi.broker.client.errors import OffsetOutOfRange, UnknownTopic
from nodi.broker.protocol import messages as m
from nodi.broker.protocol.connection import (
    Connection,
    ErrorCode,
    HandshakeRequest,
    HandshakeResponse,
    ProtocolError,
    RejectedRequest,
    Role,
    State,
    decode_message,
    encode_message,
    handshake_response,
)
from nodi.broker.protocol.frames import decode_frame_header, decode_message_body

from test_protocol import connected_pair, feed_one_byte_at_a_time, message_strategy

QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _fetch_commit(request_id: int, **fields) -> m.FetchCommitRequest:
    values: dict[str, Any] = {
        "topic": "orders",
        "partition": 0,
        "offset": 5,
        "group": "billing",
        "generation": 3,
        "member_id": "member-1",
        "commits": [m.OffsetCommit(topic="orders", partition=0, offset=5)],
    }
    values.update(fields)
    return m.FetchCommitRequest(request_id=request_id, **values)


def _connected(protocol_version_max: int) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    hello = HandshakeRequest(
        request_id=client.next_request_id(),
        client_id="t",
        protocol_version_min=1,
        protocol_version_max=protocol_version_max,
    )
    server.receive_data(client.send(hello))
    request = server.next_event()
    assert isinstance(request, HandshakeRequest)
    client.receive_data(server.send(handshake_response(request, server_id="s", limits={})))
    assert isinstance(client.next_event(), HandshakeResponse)
    assert client.protocol_version == server.protocol_version == protocol_version_max
    return client, server


# ---------------------------------------------------------------------------
# The codec


@pytest.mark.parametrize("cls", [m.FetchCommitRequest, m.FetchCommitResponse], ids=lambda cls: cls.__name__)
@QUICK
@given(data=st.data())
def test_fetch_version_2_round_trips_through_the_frame_codec(cls, data) -> None:
    message = data.draw(message_strategy(cls))
    frame = encode_message(message, 2)
    header, decoded = decode_message(frame)
    assert decoded == message and type(decoded) is cls
    assert (header.api_key, header.api_version) == (m.ApiKey.FETCH, 2)
    assert encode_message(decoded, 2) == frame
    # The same frame labelled version 1 is not a version-2 body read as version 1 silently.
    relabelled = frame[:8] + struct.pack(">H", 1) + frame[10:]
    try:
        _, as_version_1 = decode_message(relabelled)
    except ProtocolError as error:
        assert error.code in (ErrorCode.INVALID_REQUEST, ErrorCode.LIMIT_EXCEEDED)
    else:
        assert type(as_version_1) is not cls


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fetch_version_2_through_a_connection_pair_one_byte_at_a_time(data) -> None:
    client, server = connected_pair()
    request = data.draw(message_strategy(m.FetchCommitRequest, request_id=st.just(client.next_request_id())))
    assert feed_one_byte_at_a_time(server, client.send(request)) == [request]
    response = data.draw(message_strategy(m.FetchCommitResponse, request_id=st.just(request.request_id)))
    assert feed_one_byte_at_a_time(client, server.send(response)) == [response]
    assert client.state is server.state is State.READY


@pytest.mark.parametrize("cls", [m.FetchCommitRequest, m.FetchCommitResponse], ids=lambda cls: cls.__name__)
@settings(max_examples=40, deadline=None)
@given(body=st.binary(max_size=96))
def test_random_version_2_bodies_raise_only_protocol_errors(cls, body) -> None:
    frame = struct.pack(">IBBHHI", 10 + len(body), cls.KIND, 0, cls.API_KEY, 2, 5) + body
    try:
        decode_message_body(decode_frame_header(frame), frame)
    except ProtocolError as error:
        assert error.code in (ErrorCode.INVALID_REQUEST, ErrorCode.LIMIT_EXCEEDED)


def test_a_protocol_3_connection_neither_sends_nor_accepts_fetch_version_2_and_carries_on() -> None:
    client, server = _connected(3)
    request = _fetch_commit(client.next_request_id())
    with pytest.raises(ProtocolError) as caught:
        client.send(request)
    assert caught.value.code == ErrorCode.UNSUPPORTED_VERSION
    # A client that sends one anyway is answered UNSUPPORTED_VERSION; the connection goes on.
    frame = encode_message(dataclasses.replace(request, request_id=77), 2)
    server.receive_data(frame)
    rejected = server.next_event()
    assert isinstance(rejected, RejectedRequest)
    assert (rejected.error_code, rejected.api_version) == (ErrorCode.UNSUPPORTED_VERSION, 2)
    # Version 1 of the same API is served as before, by both.
    fetch = m.FetchRequest(request_id=client.next_request_id(), topic="orders", partition=0, offset=5)
    server.receive_data(client.send(fetch))
    assert server.next_event() == fetch
    assert server.state is State.READY


def test_a_protocol_4_connection_still_sends_fetch_version_1_as_version_1() -> None:
    client, server = connected_pair()
    fetch = m.FetchRequest(request_id=client.next_request_id(), topic="orders", partition=0, offset=5)
    frame = client.send(fetch)
    assert decode_frame_header(frame).api_version == 1
    server.receive_data(frame)
    assert server.next_event() == fetch
    # A server cannot answer it with a version-2 response (a local error: that
    # connection only closes), nor a version-2 request with a version-1 one.
    with pytest.raises(ProtocolError) as caught:
        server.send(m.FetchCommitResponse(request_id=fetch.request_id))
    assert caught.value.code == ErrorCode.UNEXPECTED_MESSAGE
    client, server = connected_pair()
    request = _fetch_commit(client.next_request_id())
    server.receive_data(client.send(request))
    assert server.next_event() == request
    with pytest.raises(ProtocolError) as caught:
        server.send(m.FetchResponse(request_id=request.request_id))
    assert caught.value.code == ErrorCode.UNEXPECTED_MESSAGE


def test_the_protocol_docs_show_fetch_version_2() -> None:
    from nodi.broker.protocol import docs as protocol_docs

    rendered = protocol_docs.render_apis()
    assert "### Fetch version 2 (api key 6, version 2, protocol version 4: FetchCommitRequest)" in rendered
    assert "`commit_wait`" in rendered and "`commit_results`" in rendered


# ---------------------------------------------------------------------------
# A real server


def _run(coroutine):
    return asyncio.run(coroutine)


async def _produce(client: AsyncClient, topic: str, count: int) -> None:
    for number in range(count):
        await client.produce(topic, f"m{number}".encode(), partition=0)


def test_the_server_commits_what_rides_and_answers_at_once_with_commit_wait(server) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.address, timeout_ms=10_000) as client:
            await client.create_topic("ride-wait", partitions=2)
            await _produce(client, "ride-wait", 3)
            # At the log's tail, a fetch that would wait a minute: with commit_wait the
            # answer comes once the commits are durable (the client's deadline is 10 s).
            fetched, commits = await client.fetch_committing(
                "ride-wait",
                0,
                3,
                group="g-wait",
                offsets={("ride-wait", 0): 3, ("ride-wait", 1): 0},
                commit_wait=True,
                wait_ms=60_000,
                timeout_ms=10_000,
            )
            assert commits == {("ride-wait", 0): None, ("ride-wait", 1): None}
            assert not isinstance(fetched, Exception)
            assert fetched[0] == [] and fetched[1] == 3
            assert await client.fetch_offsets("g-wait", ["ride-wait"]) == {("ride-wait", 0): 3, ("ride-wait", 1): 0}
            # Without commit_wait the fetch serves records as version 1 does, with the result.
            fetched, commits = await client.fetch_committing(
                "ride-wait", 0, 0, group="g-wait", offsets={("ride-wait", 0): 1}, wait_ms=1_000
            )
            assert not isinstance(fetched, Exception)
            assert [message.value for message in fetched[0]] == [b"m0", b"m1", b"m2"]
            assert commits == {("ride-wait", 0): None}
            assert (await client.fetch_offsets("g-wait", ["ride-wait"]))[("ride-wait", 0)] == 1

    _run(scenario())


def test_commit_errors_come_apart_from_the_fetch(server) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.address, timeout_ms=10_000) as client:
            await client.create_topic("ride-errors", partitions=1)
            await _produce(client, "ride-errors", 2)
            # Per partition: a partition that does not exist.
            fetched, commits = await client.fetch_committing(
                "ride-errors",
                0,
                0,
                group="g-errors",
                offsets={("ride-errors", 0): 2, ("ride-errors", 7): 1, ("no-such-topic", 0): 1},
            )
            assert not isinstance(fetched, Exception)
            assert not isinstance(commits, Exception)
            assert len(fetched[0]) == 2
            assert commits[("ride-errors", 0)] is None
            missing = commits[("ride-errors", 7)]
            assert missing is not None and missing.code in (ErrorCode.UNKNOWN_PARTITION, ErrorCode.UNKNOWN_TOPIC)
            assert isinstance(commits[("no-such-topic", 0)], UnknownTopic)
            # Fenced: a generation of a member that does not exist.
            _, commits = await client.fetch_committing(
                "ride-errors", 0, 0, group="g-errors", offsets={("ride-errors", 0): 1}, generation=5, member_id="ghost"
            )
            assert not isinstance(commits, Exception)
            fenced = commits[("ride-errors", 0)]
            assert fenced is not None
            assert fenced.code == ErrorCode.UNKNOWN_MEMBER
            # The commits as a whole: an invalid group name.
            fetched, commits = await client.fetch_committing(
                "ride-errors", 0, 0, group="", offsets={("ride-errors", 0): 1}
            )
            assert isinstance(commits, Exception) and commits.code == ErrorCode.INVALID_REQUEST
            assert not isinstance(fetched, Exception)
            assert len(fetched[0]) == 2  # the fetch is served all the same
            # The fetch fails (past the log's end); the commit is made and reported.
            fetched, commits = await client.fetch_committing(
                "ride-errors", 0, 99, group="g-errors", offsets={("ride-errors", 0): 2}
            )
            assert isinstance(fetched, OffsetOutOfRange)
            assert commits == {("ride-errors", 0): None}
            assert (await client.fetch_offsets("g-errors", ["ride-errors"]))[("ride-errors", 0)] == 2

    _run(scenario())


class _CountingCommits:
    """Counts the consumer's CommitOffsets requests (the ones that did not ride)."""

    def __init__(self, client: AsyncClient) -> None:
        self.calls = 0
        original = client.commit_offsets

        async def counted(*args, **kwargs):
            self.calls += 1
            return await original(*args, **kwargs)

        client.commit_offsets = counted  # type: ignore[method-assign]


def test_the_consumer_commits_ride_on_its_fetches(server) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.address, timeout_ms=10_000) as client:
            await client.create_topic("ride-consumer", partitions=1)
            await _produce(client, "ride-consumer", 3)
            counting = _CountingCommits(client)
            consumer = client.consumer("ride-consumer", "g-consumer", auto_commit=False, wait_ms=200)
            await consumer.start()
            seen: list[Message] = []
            while len(seen) < 3:
                seen += await consumer.poll()
            await consumer.commit()  # poll() has just started the next fetch: it rides on it
            assert counting.calls == 0
            assert (await client.fetch_offsets("g-consumer", ["ride-consumer"]))[("ride-consumer", 0)] == 3
            for number in range(3, 6):
                await client.produce("ride-consumer", f"m{number}".encode(), partition=0)
            while len(seen) < 6:
                seen += await consumer.poll()
            consumer.commit_nowait()  # goes out with the fetch poll() started
            await client.produce("ride-consumer", b"late", partition=0)
            while len(seen) < 7:
                seen += await consumer.poll()
            assert counting.calls == 0
            assert (await client.fetch_offsets("g-consumer", ["ride-consumer"]))[("ride-consumer", 0)] == 6
            consumer.commit_nowait()  # no fetch takes it before close(): close() commits it
            await consumer.close()
            assert (await client.fetch_offsets("g-consumer", ["ride-consumer"]))[("ride-consumer", 0)] == 7
            assert [message.value for message in seen] == [b"m0", b"m1", b"m2", b"m3", b"m4", b"m5", b"late"]

    _run(scenario())


def test_a_fenced_ridden_commit_lets_the_partition_go_as_a_commit_offsets_would(server) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.address, timeout_ms=10_000) as client:
            await client.create_topic("ride-fenced", partitions=1)
            await _produce(client, "ride-fenced", 2)
            consumer = client.consumer("ride-fenced", "g-fenced", auto_commit=False, wait_ms=200)
            await consumer.start()
            assert await consumer.poll()
            consumer.generation += 5  # a generation the server never gave out
            await consumer.commit()  # refused as a CommitOffsets would be: the partition is let go
            assert consumer.position("ride-fenced", 0) is None
            assert await client.fetch_offsets("g-fenced", ["ride-fenced"]) == {}
            await consumer.close()

    _run(scenario())


def test_a_consumer_commits_on_its_own_to_a_server_without_fetch_version_2(server) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.address, timeout_ms=10_000) as client:
            await client.create_topic("ride-old", partitions=1)
            await _produce(client, "ride-old", 4)
            connection = await client._live_connection()
            connection._protocol.protocol_version = 3  # as if the server spoke protocol 3
            counting = _CountingCommits(client)
            consumer = client.consumer("ride-old", "g-old", auto_commit=False, wait_ms=200)
            seen: list[Message] = []
            while len(seen) < 2:
                seen += await consumer.poll(max_records=2 - len(seen))
            consumer.commit_nowait()  # the fetch refused locally: kept for the next commit
            while len(seen) < 4:
                seen += await consumer.poll()
            await consumer.commit()
            assert counting.calls >= 1
            assert (await client.fetch_offsets("g-old", ["ride-old"]))[("ride-old", 0)] == 4
            await consumer.close()

    _run(scenario())


def test_a_ridden_commit_answered_survives_kill_9(broker_factory, tmp_path) -> None:
    data_dir = str(tmp_path / "ride-crash")
    process = broker_factory(data_dir).start()
    with Client(process.address, timeout_ms=10_000) as client:
        client.create_topic("ride-crash", 1)
        for number in range(10):
            client.produce("ride-crash", f"m{number}".encode(), partition=0)

    with Client(process.address, timeout_ms=10_000) as client:  # the blocking client's written-out method
        _, commits = client.fetch_committing(
            "ride-crash", 0, 10, group="g-crash", offsets={("ride-crash", 0): 7}, commit_wait=True, wait_ms=30_000
        )
    assert commits == {("ride-crash", 0): None}  # answered: durable
    process.kill()  # SIGKILL right after the answer
    restarted = broker_factory(data_dir).start()
    with Client(restarted.address, timeout_ms=10_000) as client:
        assert client.fetch_offsets("g-crash", ["ride-crash"]) == {("ride-crash", 0): 7}
