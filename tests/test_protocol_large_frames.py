"""The sans-IO connection's receive path for large frames (broker/protocol.py): a frame
of FRAME_PREALLOCATE_BYTES_MIN or more is received into one buffer of its own size,
whatever the chunking, with the frames after it intact; the size of the frame being
received is known (incomplete_frame_bytes) before its body is buffered; a server refuses
a large first frame before buffering it."""

from __future__ import annotations

import pytest

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.connection import (
    FRAME_PREALLOCATE_BYTES_MIN,
    HANDSHAKE_FRAME_BYTES_MAX,
    NEED_DATA,
    Connection,
    Role,
)
from nodi.broker.protocol.errors import ErrorCode, ProtocolError
from nodi.storage import records


def _pair() -> tuple[Connection, Connection]:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(m.HandshakeRequest(request_id=client.next_request_id(), client_id="t")))
    handshake = server.next_event()
    assert isinstance(handshake, m.HandshakeRequest)
    client.receive_data(server.send(m.HandshakeResponse(request_id=handshake.request_id, protocol_version=1)))
    assert isinstance(client.next_event(), m.HandshakeResponse)
    return client, server


def _produce(client: Connection, value: bytes) -> tuple[bytes, bytes]:
    batch = records.build_batch([records.NewRecord(None, value)])
    frame = client.send(m.ProduceRequest(request_id=client.next_request_id(), topic="t", partition=0, records=batch))
    return frame, batch


@pytest.mark.parametrize("chunk_bytes", [1000, 65536, 300_001])
def test_a_large_frame_arrives_whole_whatever_the_chunking(chunk_bytes):
    client, server = _pair()
    values = [b"s1", b"L" * (3 * FRAME_PREALLOCATE_BYTES_MIN), b"s2", b"M" * (2 * FRAME_PREALLOCATE_BYTES_MIN), b"s3"]
    frames, expected = zip(*(_produce(client, value) for value in values))
    stream = b"".join(frames)
    large = frames[1]
    got = []
    sizes_seen = set()
    for start in range(0, len(stream), chunk_bytes):
        server.receive_data(stream[start : start + chunk_bytes])
        while (event := server.next_event()) is not NEED_DATA:
            got.append(bytes(event.records))
        sizes_seen.add(server.incomplete_frame_bytes)
        assert server.buffered_bytes < len(large)
    assert got == list(expected)
    assert server.buffered_bytes == 0 and server.incomplete_frame_bytes == 0
    assert len(large) in sizes_seen or chunk_bytes > len(large)
    assert server.frames_received == 6  # the handshake and five requests


def test_a_large_frame_is_handed_out_read_only():
    client, server = _pair()
    large, _ = _produce(client, b"R" * (2 * FRAME_PREALLOCATE_BYTES_MIN))
    server.receive_data(large[:100])
    assert server.next_event() is NEED_DATA
    assert server.incomplete_frame_bytes == len(large)
    server.receive_data(large[100:])
    request = server.next_event()
    assert request.records.readonly
    with pytest.raises(TypeError):
        request.records[0] = 0


def test_the_stream_ending_inside_a_large_frame_is_malformed():
    client, server = _pair()
    large, _ = _produce(client, b"E" * (2 * FRAME_PREALLOCATE_BYTES_MIN))
    server.receive_data(large[:10])
    assert server.next_event() is NEED_DATA
    server.receive_data(large[10:-1])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(ProtocolError) as caught:
        server.next_event()
    assert caught.value.code == ErrorCode.MALFORMED_FRAME


def test_a_server_refuses_a_large_first_frame_before_buffering_it():
    server = Connection(Role.SERVER)
    server.receive_data((HANDSHAKE_FRAME_BYTES_MAX + 1 - 4).to_bytes(4, "big") + bytes(10))
    with pytest.raises(ProtocolError) as caught:
        server.next_event()
    assert caught.value.code == ErrorCode.HANDSHAKE_REQUIRED and caught.value.closes_connection
