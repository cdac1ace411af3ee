"""The stream a connection is read from (broker/server/session_reader.py): its
read_available gives what StreamReader.read gives, with the same flow control, and the
server reads requests whatever the TCP writes cut them into."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.connection import Connection, ConnectionClosed, Role
from nodi.broker.protocol.errors import ErrorCode
from nodi.broker.server.session_reader import SessionReader

from test_server import RawClient, _address, _batch

LIMIT_BYTES = 16  # a small StreamReader limit: reading pauses past 32 bytes buffered


class _Transport:
    """What a StreamReader asks of its transport: pause and resume, recorded."""

    def __init__(self) -> None:
        self.paused = False
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.paused = False
        self.calls.append("resume")


# Steps fed to both readers: bytes fed, ("read", n), or "eof".
_STEPS = [
    [b"abc", ("read", 100), b"de", b"f", ("read", 2), ("read", 100), "eof", ("read", 5), ("read", 5)],
    [b"x" * 40, ("read", 10), ("read", 10), ("read", 100), b"y" * 33, b"z", ("read", 1000), "eof", ("read", 1)],
    [b"0123456789" * 5, ("read", 64), b"q" * 20, ("read", 3), ("read", 30)],
    [b"", b"ab", "eof", ("read", 1), ("read", 1), ("read", 1)],
]


@pytest.mark.parametrize("steps", _STEPS)
def test_read_available_gives_what_read_gives_with_the_same_pauses(steps):
    async def run(reader_type: type[asyncio.StreamReader]) -> tuple[list[bytes], list[str]]:
        reader = reader_type(limit=LIMIT_BYTES)
        transport = _Transport()
        reader.set_transport(transport)  # type: ignore[arg-type]
        reads = []
        for step in steps:
            if step == "eof":
                reader.feed_eof()
            elif isinstance(step, tuple):
                if isinstance(reader, SessionReader):
                    data = await reader.read_available(step[1])
                    assert data is not None  # not interrupted
                    reads.append(bytes(data))
                else:
                    reads.append(await reader.read(step[1]))
                reads.append(b"paused" if transport.paused else b"reading")
            else:
                reader.feed_data(step)
        return reads, transport.calls

    assert asyncio.run(run(SessionReader)) == asyncio.run(run(asyncio.StreamReader))


def test_read_available_waits_for_data_and_hands_over_the_buffer():
    async def run() -> None:
        reader = SessionReader(limit=LIMIT_BYTES)
        transport = _Transport()
        reader.set_transport(transport)  # type: ignore[arg-type]
        waiting = asyncio.create_task(reader.read_available(1000))
        await asyncio.sleep(0)
        assert not waiting.done()
        reader.feed_data(b"hello")
        reader.feed_data(b" world")
        assert await waiting == b"hello world"
        for _ in range(3):
            reader.feed_data(b"w" * 20)  # past 2 x limit: paused
        assert transport.paused
        assert await reader.read_available(1000) == b"w" * 60
        assert not transport.paused  # the read took it all: resumed
        reader.feed_data(b"more")
        assert await reader.read_available(1000) == b"more"  # a new buffer, not the one handed over

    asyncio.run(run())


def test_read_available_raises_the_connection_error():
    async def run() -> None:
        reader = SessionReader(limit=LIMIT_BYTES)
        waiting = asyncio.create_task(reader.read_available(10))
        await asyncio.sleep(0)
        reader.set_exception(ConnectionResetError("reset"))
        with pytest.raises(ConnectionResetError):
            await waiting
        with pytest.raises(ConnectionResetError):
            await reader.read_available(10)

    asyncio.run(run())


def test_take_nowait_is_offered_a_chunk_only_while_a_read_waits_on_an_empty_buffer():
    async def run() -> None:
        reader = SessionReader(limit=LIMIT_BYTES)
        taken: list[bytes] = []
        keep = True

        def take(data: bytes | bytearray | memoryview) -> bool:
            taken.append(bytes(data))
            return keep

        reader.take_nowait = take
        reader.feed_data(b"early")  # no read waits: buffered
        assert await reader.read_available(100) == b"early" and taken == []
        waiting = asyncio.create_task(reader.read_available(100))
        await asyncio.sleep(0)
        reader.feed_data(b"one")  # taken: the read still waits
        assert taken == [b"one"] and not waiting.done()
        keep = False
        reader.feed_data(b"two")  # declined: buffered and read
        assert await waiting == b"two" and taken == [b"one", b"two"]
        waiting = asyncio.create_task(reader.read_available(100))
        await asyncio.sleep(0)
        reader.interrupt()
        assert await waiting is None
        reader.feed_data(b"three")  # no read waits: buffered, not offered
        assert taken == [b"one", b"two"]
        assert await reader.read_available(100) == b"three"
        keep = True
        waiting = asyncio.create_task(reader.read_available(100))
        await asyncio.sleep(0)
        waiting.cancel()  # as a read deadline does: its waiter is cancelled at once
        reader.feed_data(b"late")  # not offered: the read is ending, nothing more is served
        assert taken == [b"one", b"two"]
        with pytest.raises(asyncio.CancelledError):
            await waiting
        reader.feed_eof()
        assert await reader.read_available(100) == b"late"
        assert await reader.read_available(100) == b""

    asyncio.run(run())


def _answers(client: RawClient, count: int) -> list:
    return [client.next_message() for _ in range(count)]


def test_a_request_split_into_one_byte_writes_is_served(broker):
    client = RawClient(_address(broker)).handshake()
    client.call(m.CreateTopicRequest, name="bytes")
    client.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = m.ProduceRequest(
        request_id=client.connection.next_request_id(), topic="bytes", partition=0, records=_batch(b"a" * 300)
    )
    frame = client.connection.send(request)
    for index in range(len(frame)):
        client.socket.sendall(frame[index : index + 1])
    produced = client.next_message()
    assert produced.request_id == request.request_id and produced.error_code == ErrorCode.NONE
    assert client.call(m.ListOffsetsRequest, topic="bytes", partition=0).offset == 1


def test_many_requests_in_one_write_are_each_answered(broker):
    client = RawClient(_address(broker)).handshake()
    client.call(m.CreateTopicRequest, name="many")
    requests = [
        m.ListOffsetsRequest(request_id=client.connection.next_request_id(), topic="many", partition=0)
        for _ in range(100)
    ]
    client.socket.sendall(b"".join(client.connection.send(request) for request in requests))
    answers = _answers(client, len(requests))
    assert sorted(answer.request_id for answer in answers) == sorted(request.request_id for request in requests)
    assert all(answer.error_code == ErrorCode.NONE for answer in answers)


def test_a_paused_reader_resumes_and_serves_everything_written(broker):
    """Far more than the reader buffers before it pauses the transport (2 x 64 KiB), in
    one write: every produce is answered, and the log holds them all."""
    client = RawClient(_address(broker)).handshake()
    client.call(m.CreateTopicRequest, name="paused")
    records = _batch(b"p" * 4000)
    requests = [
        m.ProduceRequest(request_id=client.connection.next_request_id(), topic="paused", partition=0, records=records)
        for _ in range(200)
    ]
    client.socket.sendall(b"".join(client.connection.send(request) for request in requests))
    answers = _answers(client, len(requests))
    assert all(answer.error_code == ErrorCode.NONE for answer in answers)
    assert client.call(m.ListOffsetsRequest, topic="paused", partition=0).offset == len(requests)


def test_the_stream_ending_inside_a_frame_is_a_malformed_frame(broker):
    client = RawClient(_address(broker)).handshake()
    request = m.ListTopicsRequest(request_id=client.connection.next_request_id())
    frame = client.connection.send(request)
    client.socket.sendall(frame[: len(frame) - 2])
    client.socket.shutdown(socket.SHUT_WR)
    received = bytearray()
    while chunk := client.socket.recv(65536):
        received += chunk
    reader = Connection(Role.CLIENT)
    reader._state = client.connection._state  # past the handshake, as the client is
    reader.protocol_version = client.connection.protocol_version
    reader.receive_data(bytes(received))
    closing = reader.next_event()
    assert isinstance(closing, m.ClosingEvent)
    assert closing.error_code == ErrorCode.MALFORMED_FRAME
    assert isinstance(reader.next_event(), ConnectionClosed)  # nothing after it: the server closed


IDLE_TIMEOUT_MS = 1000


def test_requests_keep_a_connection_from_its_idle_timeout_and_silence_does_not(broker_factory, tmp_path):
    """Requests served straight from the reader (session_reader.py, take_nowait) move the
    idle deadline on as the read loop's own reads do: a connection asking every fifth of
    the idle timeout for three times it stays open, then silent it is closed, TIMEOUT."""
    path = tmp_path / "idle.toml"
    path.write_text(f"[server]\nidle_timeout_ms = {IDLE_TIMEOUT_MS}\n")
    process = broker_factory(extra_args=["--config", str(path)]).start()
    client = RawClient((process.host, process.port)).handshake()
    client.call(m.CreateTopicRequest, name="busy")
    for _ in range(15):
        time.sleep(IDLE_TIMEOUT_MS / 5000)
        answer = client.call(m.ListOffsetsRequest, topic="busy", partition=0)
        assert isinstance(answer, m.ListOffsetsResponse) and answer.error_code == ErrorCode.NONE
    closing = client.next_message()  # waits past the idle timeout
    assert isinstance(closing, m.ClosingEvent) and closing.error_code == ErrorCode.TIMEOUT
    assert "idle_timeout_ms" in closing.error_message
