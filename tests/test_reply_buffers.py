"""Reply.buffers: a queue receive's stored batches sent after the frame's header as they
are. The frame a connection writes (header, then the buffers) is byte for byte the frame
of the same response with the joined buffers in its records field; embedded mode and
the console get that response object."""

from __future__ import annotations

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.connection import Connection
from nodi.broker.server.reply import Reply, response_with_buffers

from test_protocol import connected_pair


def _response(records: bytes = b"") -> m.QueueReceiveBatchesResponse:
    return m.QueueReceiveBatchesResponse(
        request_id=7,
        deliveries=[m.QueueDelivery(partition=0, offset=10, delivery_count=1, lease_deadline_ms=5, count=3)],
        spans=[m.QueueBatchSpan(partition=0, records_bytes=11)],
        records=records,
    )


def _ready_server_connection() -> Connection:
    """A server connection with the receive of request 7 to answer."""
    client, server = connected_pair()
    request = m.QueueReceiveBatchesRequest(request_id=7, group="g", topic="t", messages_max=3)
    server.receive_data(client.send(request))
    assert isinstance(server.next_event(), m.QueueReceiveBatchesRequest)
    return server


def test_records_bytes_counts_the_buffers() -> None:
    reply = Reply(_response(), buffers=(b"abcd", b"efghijk"))
    assert reply.records_bytes == 11


def test_header_and_buffers_are_the_joined_frame() -> None:
    buffers = (b"abcd", b"efghijk")
    reply = Reply(_response(), buffers=buffers)
    written = _ready_server_connection().send_header(reply.response, reply.records_bytes) + b"".join(buffers)
    whole = _ready_server_connection().send(_response(b"".join(buffers)))
    assert written == whole


def test_response_with_buffers_fills_the_records_field() -> None:
    reply = Reply(_response(), buffers=(b"abcd", b"efghijk"))
    assert response_with_buffers(reply) == _response(b"abcdefghijk")


def test_response_without_buffers_is_the_response() -> None:
    response = _response(b"xyz")
    assert response_with_buffers(Reply(response)) is response
