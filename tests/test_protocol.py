"""The wire protocol (broker/protocol/connection.py, frames.py, messages.py, schema.py): round trips
of every API, decoders fed one byte at a time and with trailing garbage, garbage input,
the frame limit checked from the length prefix, the connection state table, and
pipelined requests answered out of order.

The decoders' promise under test: any input either decodes or raises a ProtocolError (a
NodiError); never IndexError, struct.error, UnicodeDecodeError, ValueError or anything
else. Frames in these tests are built by hand with struct where the point is to check the
codec against an independent writer.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodi.broker.protocol import docs as protocol_docs
from nodi.broker.protocol import schema
from nodi.broker.protocol.connection import (
    APIS,
    DEFAULT_PROTOCOL_LIMITS,
    NEED_DATA,
    PROTOCOL_VERSION_MAX,
    TRANSITIONS,
    Acks,
    ApiKey,
    ClosingEvent,
    CommitOffsetsRequest,
    Connection,
    ConnectionClosed,
    DeleteTopicRequest,
    Direction,
    ErrorCode,
    ErrorResponse,
    FetchRequest,
    FetchResponse,
    HandshakeRequest,
    HandshakeResponse,
    Kind,
    ListTopicsRequest,
    ListTopicsResponse,
    OffsetCommit,
    ProduceRequest,
    ProduceResponse,
    ProtocolError,
    ProtocolLimits,
    RejectedRequest,
    Response,
    Role,
    State,
    Trigger,
    decode_message,
    encode_message,
    handshake_response,
)
from nodi.broker.protocol.errors import ERROR_DESCRIPTIONS
from nodi.broker.protocol.frames import decode_frame_header, decode_message_body
from nodi.broker.server.reply import error_code_for
from nodi.storage import errors as storage_errors
from nodi.storage.errors import NodiError

UINT32_MAX = (1 << 32) - 1
QUICK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

MESSAGE_CLASSES = [cls for api in APIS for cls in (api.request, api.response)]


# ---------------------------------------------------------------------------
# Helpers


def raw_frame(kind: int, api_key: int, request_id: int, body: bytes, *, flags: int = 0, version: int = 1) -> bytes:
    """A frame written independently of the codec, from the documented layout."""
    return struct.pack(">IBBHHI", 10 + len(body), kind, flags, api_key, version, request_id) + body


def raw_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(data)) + data


def strategy_for(type_: schema.WireType) -> st.SearchStrategy:
    if isinstance(type_, schema.Integer):
        return st.integers(type_.low, type_.high)
    if isinstance(type_, schema.Boolean):
        return st.booleans()
    if isinstance(type_, schema.Enumeration):
        return st.sampled_from(list(type_.enum_class))
    if isinstance(type_, schema.Magic):
        return st.just(type_.constant)
    if isinstance(type_, schema.String):
        text = st.text(max_size=12)
        return st.none() | text if type_.nullable else text
    if isinstance(type_, (schema.Bytes, schema.Records)):
        return st.binary(max_size=48)
    if isinstance(type_, schema.Array):
        return st.lists(strategy_for(type_.item), max_size=3)
    if isinstance(type_, schema.Struct):
        return message_strategy(type_.cls)
    raise AssertionError(f"no strategy for {type_!r}")


def message_strategy(cls: type, **fixed) -> st.SearchStrategy:
    fields = {field.name: strategy_for(field.type) for field in schema.schema_of(cls).fields}
    fields.update(fixed)
    if hasattr(cls, "KIND") and cls.KIND is not Kind.EVENT and "request_id" not in fields:
        fields["request_id"] = st.integers(1, UINT32_MAX)
    return st.builds(cls, **fields)


def connected_pair(
    client_limits: ProtocolLimits = DEFAULT_PROTOCOL_LIMITS,
    server_limits: ProtocolLimits = DEFAULT_PROTOCOL_LIMITS,
    announced: dict[str, int] | None = None,
) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, client_limits)
    server = Connection(Role.SERVER, server_limits)
    server.receive_data(client.send(HandshakeRequest(request_id=client.next_request_id(), client_id="test")))
    request = server.next_event()
    assert isinstance(request, HandshakeRequest)
    limits = server_limits.announced() if announced is None else announced
    client.receive_data(server.send(handshake_response(request, server_id="server-1", limits=limits)))
    assert isinstance(client.next_event(), HandshakeResponse)
    assert client.state is State.READY and server.state is State.READY
    assert client.protocol_version == server.protocol_version == PROTOCOL_VERSION_MAX
    return client, server


def drain(connection: Connection) -> list:
    events: list = []
    while True:
        event = connection.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def feed_one_byte_at_a_time(connection: Connection, data: bytes) -> list:
    events = []
    for index in range(len(data)):
        connection.receive_data(data[index : index + 1])
        events.extend(drain(connection))
    return events


def with_id(message, request_id: int):
    return dataclasses.replace(message, request_id=request_id)


# ---------------------------------------------------------------------------
# Round trips


def test_every_api_key_is_declared_with_a_request_and_a_response() -> None:
    assert {api.key for api in APIS} == set(ApiKey)
    for api in APIS:
        assert api.request.KIND is Kind.REQUEST and api.response.KIND is Kind.RESPONSE
        assert api.request.API_KEY == api.key == api.response.API_KEY
        response_fields = [field.name for field in schema.schema_of(api.response).fields]
        assert response_fields[:2] == ["error_code", "error_message"]


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda cls: cls.__name__)
@QUICK
@given(data=st.data())
def test_every_message_round_trips_through_the_frame_codec(cls, data) -> None:
    message = data.draw(message_strategy(cls))
    frame = encode_message(message, 1)
    header, decoded = decode_message(frame)
    assert decoded == message
    assert type(decoded) is cls
    assert (header.kind, header.api_key, header.api_version, header.request_id) == (
        cls.KIND,
        cls.API_KEY,
        1,
        message.request_id,
    )
    # The same bytes whatever the route: a second encoding of the decoded message.
    assert encode_message(decoded, 1) == frame


@QUICK
@given(
    error=message_strategy(
        ErrorResponse, api_key=st.integers(0, 0xFFFF), error_code=st.sampled_from([code for code in ErrorCode if code])
    ),
    closing=message_strategy(ClosingEvent),
)
def test_error_responses_and_events_round_trip(error, closing) -> None:
    header, decoded = decode_message(encode_message(error, 3))
    assert decoded == error and header.flags == 1 and header.api_version == 3
    header, decoded = decode_message(encode_message(closing, 1))
    assert decoded == closing and header.kind is Kind.EVENT and header.request_id == 0


@pytest.mark.parametrize("api", APIS, ids=lambda api: api.key.name)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_api_through_a_connection_pair_one_byte_at_a_time(api, data) -> None:
    if api.key == ApiKey.HANDSHAKE:
        return  # the handshake itself is exercised by connected_pair
    client, server = connected_pair()
    request = data.draw(message_strategy(api.request, request_id=st.just(client.next_request_id())))
    received = feed_one_byte_at_a_time(server, client.send(request))
    assert received == [request]
    response = data.draw(message_strategy(api.response, request_id=st.just(request.request_id)))
    assert feed_one_byte_at_a_time(client, server.send(response)) == [response]
    assert client.in_flight_count == server.in_flight_count == 0
    assert client.state is server.state is State.READY


def test_records_come_out_as_a_slice_of_the_frame_without_a_copy() -> None:
    batches = bytes(range(256)) * 3
    frame = encode_message(ProduceRequest(request_id=7, topic="t", partition=1, records=batches), 1)
    _, decoded = decode_message(frame)
    assert isinstance(decoded, ProduceRequest)
    assert isinstance(decoded.records, memoryview)
    assert decoded.records.obj is frame
    assert decoded.records == batches
    assert frame.endswith(struct.pack(">I", len(batches)) + batches)


def test_send_header_then_the_batches_is_the_same_frame_as_send() -> None:
    client, server = connected_pair()
    batches = b"\x00" * 100 + b"batch-bytes"
    produce = ProduceRequest(request_id=client.next_request_id(), topic="orders", partition=2, records=b"ignored")
    header = client.send_header(produce, len(batches))
    assert header.endswith(struct.pack(">I", len(batches)))
    assert feed_one_byte_at_a_time(server, header + batches) == [dataclasses.replace(produce, records=batches)]

    fetch = FetchRequest(request_id=client.next_request_id(), topic="orders", partition=2, offset=0)
    server.receive_data(client.send(fetch))
    assert server.next_event() == fetch
    whole = FetchResponse(request_id=fetch.request_id, high_watermark=9, log_start_offset=0, records=batches)
    response_header = server.send_header(dataclasses.replace(whole, records=b""), len(batches))
    assert response_header + batches == encode_message(whole, 1)
    client.receive_data(response_header)
    assert client.next_event() is NEED_DATA
    client.receive_data(batches)
    assert client.next_event() == whole
    with pytest.raises(ProtocolError):  # no records field to send after the header
        client.send_header(ListTopicsRequest(request_id=client.next_request_id()), 10)
    assert client.state is State.READY


# ---------------------------------------------------------------------------
# Byte at a time, trailing garbage, garbage


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_stream_of_frames_decodes_the_same_in_any_chunking(data) -> None:
    client, server = connected_pair()
    requests = [
        data.draw(message_strategy(cls, request_id=st.just(client.next_request_id())))
        for cls in data.draw(st.lists(st.sampled_from([api.request for api in APIS[1:]]), min_size=1, max_size=6))
    ]
    stream = b"".join(client.send(request) for request in requests)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    events = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        if end > start:  # b"" would mean the end of the stream
            server.receive_data(stream[start:end])
            events.extend(drain(server))
    assert events == requests


def test_one_byte_at_a_time_needs_data_until_the_last_byte() -> None:
    client, server = connected_pair()
    frame = client.send(DeleteTopicRequest(request_id=client.next_request_id(), name="orders"))
    for index in range(len(frame) - 1):
        server.receive_data(frame[index : index + 1])
        assert server.next_event() is NEED_DATA
    server.receive_data(frame[-1:])
    assert isinstance(server.next_event(), DeleteTopicRequest)
    assert server.next_event() is NEED_DATA


@pytest.mark.parametrize("cls", [api.request for api in APIS[1:]], ids=lambda cls: cls.__name__)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_trailing_bytes_in_a_body_are_an_invalid_request_and_the_connection_carries_on(cls, data) -> None:
    client, server = connected_pair()
    request = data.draw(message_strategy(cls, request_id=st.just(99)))
    garbage = data.draw(st.binary(min_size=1, max_size=16))
    frame = encode_message(request, 1)
    # Re-frame the body with garbage after it: framing stays sane.
    body = frame[14:] + garbage
    server.receive_data(raw_frame(0, cls.API_KEY, 99, body))
    (event,) = drain(server)
    assert isinstance(event, RejectedRequest)
    assert event.error_code is ErrorCode.INVALID_REQUEST
    assert event.request_id == 99
    client_frame = server.send(event.response())
    _, answer = decode_message(client_frame)
    assert isinstance(answer, ErrorResponse) and answer.api_key == cls.API_KEY
    server.receive_data(client.send(ListTopicsRequest(request_id=client.next_request_id())))
    assert isinstance(server.next_event(), ListTopicsRequest)


@THOROUGH
@given(data=st.data())
def test_trailing_garbage_in_the_stream_never_raises_anything_but_a_protocol_error(data) -> None:
    client, server = connected_pair()
    request = data.draw(message_strategy(FetchRequest, request_id=st.just(client.next_request_id())))
    garbage = data.draw(st.binary(min_size=1, max_size=64))
    server.receive_data(client.send(request) + garbage)
    assert server.next_event() == request
    try:
        drain(server)
    except ProtocolError:
        assert server.state is State.ERROR


frame_like = st.builds(
    lambda kind, flags, api_key, version, request_id, body: raw_frame(
        kind, api_key, request_id, body, flags=flags, version=version
    ),
    st.sampled_from([0, 0, 0, 1, 2, 3]),
    st.sampled_from([0, 0, 1, 2]),
    st.integers(0, 20),
    st.sampled_from([1, 1, 1, 0, 2]),
    st.sampled_from([0, 1, 2, UINT32_MAX]),
    st.binary(max_size=80),
)


@THOROUGH
@given(frame=frame_like | st.binary(max_size=64))
def test_decode_message_on_garbage_raises_only_protocol_errors(frame) -> None:
    try:
        decode_message(frame)
    except ProtocolError:
        pass


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda cls: cls.__name__)
@settings(max_examples=40, deadline=None)
@given(body=st.binary(max_size=96))
def test_random_bodies_raise_only_protocol_errors(cls, body) -> None:
    frame = raw_frame(cls.KIND, cls.API_KEY, 5, body)
    try:
        decode_message_body(decode_frame_header(frame), frame)
    except ProtocolError as error:
        assert error.code in (ErrorCode.INVALID_REQUEST, ErrorCode.LIMIT_EXCEEDED)


@THOROUGH
@given(data=st.data())
def test_mutated_frames_raise_only_protocol_errors(data) -> None:
    cls = data.draw(st.sampled_from(MESSAGE_CLASSES))
    frame = bytearray(encode_message(data.draw(message_strategy(cls)), 1))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(frame) - 1))
        frame[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    try:
        decode_message(bytes(frame[:cut]))
    except ProtocolError:
        pass


@pytest.mark.parametrize("role", list(Role))
@THOROUGH
@given(chunks=st.lists(frame_like | st.binary(max_size=40), max_size=6))
def test_a_connection_fed_garbage_raises_only_protocol_errors(role, chunks) -> None:
    client, server = connected_pair()
    connection = client if role is Role.CLIENT else server
    if role is Role.CLIENT:  # requests in flight for garbage responses to match
        for _ in range(3):
            client.send(ListTopicsRequest(request_id=client.next_request_id()))
    try:
        for chunk in chunks:
            connection.receive_data(chunk)
            for event in drain(connection):
                if isinstance(event, RejectedRequest):
                    connection.send(event.response())
        connection.receive_data(b"")
        drain(connection)
    except ProtocolError as error:
        assert error.closes_connection
        assert connection.state is State.ERROR
        with pytest.raises(ProtocolError):
            connection.next_event()


def test_invalid_utf8_and_unknown_enum_values_are_invalid_requests() -> None:
    client, server = connected_pair()
    server.receive_data(raw_frame(0, ApiKey.DELETE_TOPIC, 1, raw_string(b"\xff\xfe")))
    (event,) = drain(server)
    assert event.error_code is ErrorCode.INVALID_REQUEST and "UTF-8" in event.error_message
    body = raw_string("t") + struct.pack(">ibiI", 0, 7, 1000, 0)  # acks 7
    server.receive_data(raw_frame(0, ApiKey.PRODUCE, 2, body))
    (event,) = drain(server)
    assert event.error_code is ErrorCode.INVALID_REQUEST and "Acks" in event.error_message
    assert server.state is State.READY


def test_an_array_count_over_the_limit_is_refused_before_any_item_is_read() -> None:
    client, server = connected_pair(server_limits=ProtocolLimits(array_items_max=10))
    body = raw_string("group") + struct.pack(">i", -1) + raw_string("") + struct.pack(">I", 11)
    server.receive_data(raw_frame(0, ApiKey.COMMIT_OFFSETS, 1, body))
    (event,) = drain(server)
    assert event.error_code is ErrorCode.LIMIT_EXCEEDED
    # A count that cannot fit in the bytes left is invalid, whatever the limit.
    body = raw_string("group") + struct.pack(">i", -1) + raw_string("") + struct.pack(">I", 5)
    server.receive_data(raw_frame(0, ApiKey.COMMIT_OFFSETS, 2, body))
    (event,) = drain(server)
    assert event.error_code is ErrorCode.INVALID_REQUEST


def test_records_length_must_reach_exactly_to_the_end_of_the_frame() -> None:
    client, server = connected_pair()
    body = raw_string("t") + struct.pack(">ibi", 0, 2, 1000)
    for records in (struct.pack(">I", 5) + b"abc", struct.pack(">I", 2) + b"abc"):
        server.receive_data(raw_frame(0, ApiKey.PRODUCE, 1, body + records))
        (event,) = drain(server)
        assert event.error_code is ErrorCode.INVALID_REQUEST
        server.send(event.response())
    server.receive_data(raw_frame(0, ApiKey.PRODUCE, 1, body + struct.pack(">I", 3) + b"abc"))
    (event,) = drain(server)
    assert isinstance(event, ProduceRequest) and event.records == b"abc"


# ---------------------------------------------------------------------------
# Frame limits


def test_an_oversize_length_prefix_is_refused_from_its_four_bytes() -> None:
    client, server = connected_pair()
    server.receive_data(struct.pack(">I", UINT32_MAX))
    with pytest.raises(ProtocolError) as raised:
        server.next_event()
    assert raised.value.code is ErrorCode.FRAME_TOO_LARGE and raised.value.closes_connection
    assert server.state is State.ERROR
    assert server.statistics().buffered_bytes == 4
    # In ERROR, later bytes are dropped and the same error is raised again.
    server.receive_data(b"\x00" * 1000)
    assert server.statistics().buffered_bytes == 4
    with pytest.raises(ProtocolError):
        server.next_event()


def test_the_frame_limit_counts_the_whole_frame() -> None:
    limits = ProtocolLimits(frame_bytes_max=1024, receive_buffer_bytes_max=4096)
    for length, allowed in ((1020, True), (1021, False)):
        _, server = connected_pair(server_limits=limits)
        server.receive_data(struct.pack(">I", length) + b"\x00\x00")
        if allowed:
            assert server.next_event() is NEED_DATA
        else:
            with pytest.raises(ProtocolError, match="FRAME_TOO_LARGE"):
                server.next_event()


def test_a_length_below_the_header_is_malformed() -> None:
    _, server = connected_pair()
    server.receive_data(struct.pack(">I", 9) + b"\x00" * 9)
    with pytest.raises(ProtocolError) as raised:
        server.next_event()
    assert raised.value.code is ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize(
    "frame",
    [
        raw_frame(3, ApiKey.LIST_TOPICS, 1, b""),  # unknown kind
        raw_frame(0, ApiKey.LIST_TOPICS, 1, b"", flags=2),  # unknown flag
        raw_frame(0, ApiKey.LIST_TOPICS, 1, b"", flags=1),  # ERROR on a request
        raw_frame(0, ApiKey.LIST_TOPICS, 0, b""),  # request id 0
    ],
    ids=["kind", "flag", "error-flag-on-request", "request-id-0"],
)
def test_a_malformed_header_closes_the_connection(frame) -> None:
    _, server = connected_pair()
    server.receive_data(frame)
    with pytest.raises(ProtocolError) as raised:
        server.next_event()
    assert raised.value.code is ErrorCode.MALFORMED_FRAME and server.state is State.ERROR
    goodbye = server.send(ClosingEvent(error_code=raised.value.code, error_message=raised.value.message))
    assert server.state is State.CLOSED
    assert isinstance(decode_message(goodbye)[1], ClosingEvent)


def test_the_receive_buffer_is_bounded() -> None:
    limits = ProtocolLimits(frame_bytes_max=1024, receive_buffer_bytes_max=2048)
    _, server = connected_pair(server_limits=limits)
    server.receive_data(b"\x00" * 2048)
    with pytest.raises(ProtocolError) as raised:
        server.receive_data(b"\x00")
    assert raised.value.code is ErrorCode.LIMIT_EXCEEDED and raised.value.closes_connection
    assert server.state is State.ERROR


def test_a_client_keeps_to_the_servers_announced_frame_limit() -> None:
    client, _ = connected_pair(announced={"frame_bytes_max": 200, "in_flight_requests_max": 256})
    assert client.peer_limits["frame_bytes_max"] == 200
    too_big = ProduceRequest(request_id=client.next_request_id(), topic="t", partition=0, records=b"x" * 200)
    with pytest.raises(ProtocolError) as raised:
        client.send(too_big)
    assert raised.value.code is ErrorCode.FRAME_TOO_LARGE and not raised.value.closes_connection
    assert client.state is State.READY and client.in_flight_count == 0
    client.send(dataclasses.replace(too_big, records=b"x" * 100))


# ---------------------------------------------------------------------------
# The state table


def test_a_request_before_the_handshake_puts_the_server_in_error() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(raw_frame(0, ApiKey.LIST_TOPICS, 1, b""))
    with pytest.raises(ProtocolError) as raised:
        server.next_event()
    assert raised.value.code is ErrorCode.HANDSHAKE_REQUIRED and raised.value.closes_connection
    assert server.state is State.ERROR and server.error is raised.value
    with pytest.raises(ProtocolError):
        server.next_event()
    with pytest.raises(ProtocolError):  # in ERROR a server only says goodbye
        server.send(ListTopicsResponse(request_id=1))
    assert server.state is State.ERROR
    server.send(ClosingEvent(error_code=ErrorCode.HANDSHAKE_REQUIRED))
    assert server.state is State.CLOSED
    with pytest.raises(ProtocolError):
        server.send(ClosingEvent(error_code=ErrorCode.HANDSHAKE_REQUIRED))
    assert isinstance(server.next_event(), ConnectionClosed)


@pytest.mark.parametrize(
    "body",
    [b"NODX" + struct.pack(">HH", 1, 1) + raw_string("c"), b"NODI" + struct.pack(">HH", 1, 1), b"NO"],
    ids=["bad-magic", "truncated", "short"],
)
def test_an_invalid_handshake_closes_the_connection(body) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(raw_frame(0, ApiKey.HANDSHAKE, 1, body))
    with pytest.raises(ProtocolError) as raised:
        server.next_event()
    assert raised.value.code is ErrorCode.HANDSHAKE_REQUIRED and server.state is State.ERROR


def test_a_refused_handshake_closes_both_ends() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    hello = HandshakeRequest(request_id=1, protocol_version_min=PROTOCOL_VERSION_MAX + 1, protocol_version_max=9)
    server.receive_data(client.send(hello))
    request = server.next_event()
    assert isinstance(request, HandshakeRequest)
    refusal = handshake_response(request, server_id="s", limits={})
    assert refusal.error_code is ErrorCode.UNSUPPORTED_VERSION
    client.receive_data(server.send(refusal))
    assert server.state is State.CLOSED
    assert client.next_event() == refusal
    assert client.state is State.CLOSED


def test_a_client_refuses_a_version_it_did_not_offer() -> None:
    client = Connection(Role.CLIENT)
    client.send(HandshakeRequest(request_id=1))
    forged = encode_message(HandshakeResponse(request_id=1, protocol_version=7), 1)
    client.receive_data(forged)
    with pytest.raises(ProtocolError) as raised:
        client.next_event()
    assert raised.value.code is ErrorCode.UNSUPPORTED_VERSION and client.state is State.ERROR


def test_a_client_sends_nothing_but_a_handshake_until_ready() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(ProtocolError) as raised:
        client.send(ListTopicsRequest(request_id=1))
    assert raised.value.code is ErrorCode.UNEXPECTED_MESSAGE and client.state is State.ERROR

    client = Connection(Role.CLIENT)
    client.send(HandshakeRequest(request_id=1))
    with pytest.raises(ProtocolError):
        client.send(ListTopicsRequest(request_id=2))
    assert client.state is State.ERROR


def receive_and_read(connection: Connection, data: bytes) -> object:
    connection.receive_data(data)
    return connection.next_event()


@pytest.mark.parametrize(
    "step",
    [
        "client-second-handshake",
        "server-second-handshake",
        "client-sends-response",
        "server-sends-request",
        "server-answers-unknown-id",
        "server-answers-with-wrong-api",
        "client-receives-unknown-id",
        "client-receives-wrong-api",
        "client-receives-request",
        "server-receives-response",
        "server-receives-in-flight-id",
    ],
)
def test_messages_out_of_sequence_put_the_connection_in_error(step) -> None:
    client, server = connected_pair()
    pending = ListTopicsRequest(request_id=client.next_request_id())
    server.receive_data(client.send(pending))
    assert server.next_event() == pending
    actions = {
        "client-second-handshake": (client, lambda: client.send(HandshakeRequest(request_id=50))),
        "server-second-handshake": (
            server,
            lambda: receive_and_read(server, raw_frame(0, 0, 50, b"NODI\x00\x01\x00\x01\x00\x00")),
        ),
        "client-sends-response": (client, lambda: client.send(ListTopicsResponse(request_id=pending.request_id))),
        "server-sends-request": (server, lambda: server.send(ListTopicsRequest(request_id=50))),
        "server-answers-unknown-id": (server, lambda: server.send(ListTopicsResponse(request_id=50))),
        "server-answers-with-wrong-api": (server, lambda: server.send(ProduceResponse(request_id=pending.request_id))),
        "client-receives-unknown-id": (
            client,
            lambda: receive_and_read(client, encode_message(ListTopicsResponse(request_id=50), 1)),
        ),
        "client-receives-wrong-api": (
            client,
            lambda: receive_and_read(client, encode_message(ProduceResponse(request_id=pending.request_id), 1)),
        ),
        "client-receives-request": (
            client,
            lambda: receive_and_read(client, encode_message(ListTopicsRequest(request_id=50), 1)),
        ),
        "server-receives-response": (
            server,
            lambda: receive_and_read(server, encode_message(ListTopicsResponse(request_id=50), 1)),
        ),
        "server-receives-in-flight-id": (
            server,
            lambda: receive_and_read(server, encode_message(ListTopicsRequest(request_id=pending.request_id), 1)),
        ),
    }
    connection, action = actions[step]
    with pytest.raises(ProtocolError) as raised:
        action()
    assert raised.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert raised.value.closes_connection
    assert connection.state is State.ERROR


def test_bad_contents_raise_on_send_and_leave_the_connection_as_it_was() -> None:
    client, server = connected_pair(client_limits=ProtocolLimits(in_flight_requests_max=2))
    first = client.next_request_id()
    client.send(ListTopicsRequest(request_id=first))
    bad = [
        ListTopicsRequest(request_id=first),  # id in flight
        ListTopicsRequest(request_id=0),
        ListTopicsRequest(request_id=UINT32_MAX + 1),
        ProduceRequest(request_id=90, topic="t", partition=1 << 31, records=b""),
        ProduceRequest(request_id=90, topic="t", partition=True, records=b""),
        # Wrong types on purpose (send() validates what it encodes): hence the ignores.
        ProduceRequest(request_id=90, topic="t", partition=0, acks=9, records=b""),  # type: ignore[arg-type]
        ProduceRequest(request_id=90, topic="\ud800", partition=0, records=b""),
        ProduceRequest(request_id=90, topic="t" * 70_000, partition=0, records=b""),
        ProduceRequest(request_id=90, topic=None, partition=0, records=b""),  # type: ignore[arg-type]
        CommitOffsetsRequest(request_id=90, group="g", offsets=[OffsetCommit(topic="t", partition=0, offset="1")]),  # type: ignore[arg-type]
        CommitOffsetsRequest(request_id=90, group="g", offsets="not a list"),  # type: ignore[arg-type]
    ]
    for message in bad:
        with pytest.raises(ProtocolError) as raised:
            client.send(message)
        assert raised.value.code is ErrorCode.INVALID_REQUEST, message
        assert not raised.value.closes_connection
        assert client.state is State.READY and client.in_flight_request_ids() == [first]
    client.send(ListTopicsRequest(request_id=client.next_request_id()))
    with pytest.raises(ProtocolError) as raised:
        client.send(ListTopicsRequest(request_id=client.next_request_id()))
    assert raised.value.code is ErrorCode.TOO_MANY_REQUESTS and client.state is State.READY
    with pytest.raises(ProtocolError):
        server.send(ErrorResponse(request_id=1, api_key=ApiKey.LIST_TOPICS, error_code=ErrorCode.NONE))


def test_a_closing_event_closes_the_client_with_its_requests_still_listed() -> None:
    client, server = connected_pair()
    ids = [client.next_request_id() for _ in range(3)]
    for request_id in ids:
        server.receive_data(client.send(ListTopicsRequest(request_id=request_id)))
    assert len(drain(server)) == 3
    goodbye = ClosingEvent(error_code=ErrorCode.SERVER_SHUTTING_DOWN, error_message="bye")
    client.receive_data(server.send(goodbye))
    assert server.state is State.CLOSED
    assert client.next_event() == goodbye
    assert client.state is State.CLOSED
    assert client.in_flight_request_ids() == ids
    assert isinstance(client.next_event(), ConnectionClosed)


def test_a_server_may_turn_a_client_away_before_its_handshake() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    client.receive_data(server.send(ClosingEvent(error_code=ErrorCode.LIMIT_EXCEEDED, error_message="connections_max")))
    assert isinstance(client.next_event(), ClosingEvent)
    assert client.state is server.state is State.CLOSED


def test_end_of_stream() -> None:
    client, server = connected_pair()
    frame = client.send(ListTopicsRequest(request_id=client.next_request_id()))
    server.receive_data(frame)
    server.receive_data(b"")
    assert isinstance(server.next_event(), ListTopicsRequest)
    assert isinstance(server.next_event(), ConnectionClosed)
    assert server.state is State.CLOSED

    client, server = connected_pair()
    server.receive_data(frame[:-1])
    server.receive_data(b"")
    with pytest.raises(ProtocolError) as raised:
        server.next_event()
    assert raised.value.code is ErrorCode.MALFORMED_FRAME

    client, server = connected_pair()
    server.receive_data(b"")
    with pytest.raises(ProtocolError):
        server.receive_data(b"more")


def test_close_from_any_state() -> None:
    client, server = connected_pair()
    client.close()
    assert client.state is State.CLOSED
    assert isinstance(client.next_event(), ConnectionClosed)
    with pytest.raises(ProtocolError):
        client.send(ListTopicsRequest(request_id=client.next_request_id()))
    assert client.state is State.CLOSED
    fresh = Connection(Role.SERVER)
    fresh.close()
    assert fresh.state is State.CLOSED


def test_the_state_table_leaves_error_only_by_a_servers_closing_event() -> None:
    assert not [key for key in TRANSITIONS if key[1] is State.CLOSED]
    error_rows = [key for key in TRANSITIONS if key[1] is State.ERROR]
    assert error_rows == [(Role.SERVER, State.ERROR, Direction.SEND, Trigger.CLOSING)]
    assert TRANSITIONS[error_rows[0]] is State.CLOSED
    reachable = {State.AWAITING_HANDSHAKE} | set(TRANSITIONS.values())
    assert reachable | {State.ERROR} == set(State)


# ---------------------------------------------------------------------------
# Pipelining


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_pipelined_requests_answered_out_of_order_are_matched_by_request_id(data) -> None:
    client, server = connected_pair()
    classes = data.draw(st.lists(st.sampled_from(APIS[1:]), min_size=1, max_size=12))
    requests = {}
    stream = bytearray()
    for api in classes:
        request = data.draw(message_strategy(api.request, request_id=st.just(client.next_request_id())))
        requests[request.request_id] = (api, request)
        stream += client.send(request)
    assert client.in_flight_count == len(requests)
    server.receive_data(bytes(stream))
    received = drain(server)
    assert [event.request_id for event in received] == list(requests)
    order = data.draw(st.permutations(received))
    answers = bytearray()
    expected = []
    for request in order:
        api, _ = requests[request.request_id]
        response = data.draw(message_strategy(api.response, request_id=st.just(request.request_id)))
        expected.append(response)
        answers += server.send(response)
    assert server.in_flight_count == 0
    client.receive_data(bytes(answers))
    got = drain(client)
    assert got == expected
    for response in got:
        assert type(response) is requests[response.request_id][0].response
    assert client.in_flight_count == 0


def test_the_server_rejects_requests_over_its_in_flight_limit_and_carries_on() -> None:
    client, server = connected_pair(
        server_limits=ProtocolLimits(in_flight_requests_max=2),
        announced={"in_flight_requests_max": 1000},
    )
    for _ in range(3):
        server.receive_data(client.send(ListTopicsRequest(request_id=client.next_request_id())))
    first, second, third = drain(server)
    assert isinstance(first, ListTopicsRequest) and isinstance(second, ListTopicsRequest)
    assert isinstance(third, RejectedRequest) and third.error_code is ErrorCode.TOO_MANY_REQUESTS
    client.receive_data(server.send(third.response()) + server.send(ListTopicsResponse(request_id=first.request_id)))
    rejected, answered = drain(client)
    assert isinstance(rejected, ErrorResponse) and rejected.error_code is ErrorCode.TOO_MANY_REQUESTS
    assert rejected.api_key == ApiKey.LIST_TOPICS and rejected.request_id == third.request_id
    assert isinstance(answered, ListTopicsResponse)
    assert client.in_flight_request_ids() == [second.request_id]


@pytest.mark.parametrize(
    ("api_key", "version", "code"),
    [(999, 1, ErrorCode.UNKNOWN_API), (ApiKey.LIST_TOPICS, 2, ErrorCode.UNSUPPORTED_VERSION)],
)
def test_an_unknown_api_or_version_is_answered_and_the_connection_carries_on(api_key, version, code) -> None:
    _, server = connected_pair()
    server.receive_data(raw_frame(0, api_key, 77, b"whatever", version=version))
    (event,) = drain(server)
    assert isinstance(event, RejectedRequest) and event.error_code is code
    frame = server.send(event.response())
    header, answer = decode_message(frame)
    assert header.flags == 1 and (header.api_key, header.api_version, header.request_id) == (api_key, version, 77)
    assert isinstance(answer, Response)
    assert answer.error_code is code
    server.receive_data(raw_frame(0, ApiKey.LIST_TOPICS, 78, b""))
    assert isinstance(server.next_event(), ListTopicsRequest)
    assert server.state is State.READY


def test_next_request_id_skips_ids_in_flight_and_wraps() -> None:
    client, _ = connected_pair()
    client._next_request_id = UINT32_MAX  # the wrap point, without sending 2**32 requests
    client.send(ListTopicsRequest(request_id=UINT32_MAX))
    assert client.next_request_id() == 1  # the handshake's id 1 is answered
    client.send(ListTopicsRequest(request_id=2))
    client._next_request_id = 2
    assert client.next_request_id() == 3


# ---------------------------------------------------------------------------
# Declarations, docs, errors


def test_records_must_be_the_last_field() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Misdeclared:
        records: bytes = schema.wire(schema.RECORDS)
        after: int = schema.wire(schema.INT32)

    with pytest.raises(AssertionError):
        schema.schema_of(Misdeclared)


def test_docs_protocol_md_is_up_to_date() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert protocol_docs.update_document(text) == text, (
        "docs/protocol.md is stale: run python -m nodi.broker.protocol.docs docs/protocol.md"
    )


def test_every_error_code_is_documented_and_errors_are_nodi_errors() -> None:
    assert set(ERROR_DESCRIPTIONS) == set(ErrorCode)
    assert issubclass(ProtocolError, NodiError)
    assert ProtocolError(ErrorCode.FRAME_TOO_LARGE, "x").closes_connection
    assert not ProtocolError(ErrorCode.UNKNOWN_TOPIC, "x").closes_connection


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (storage_errors.UnknownTopicError("t"), ErrorCode.UNKNOWN_TOPIC),
        (storage_errors.TopicExistsError("t"), ErrorCode.TOPIC_EXISTS),
        (storage_errors.OffsetOutOfRangeError(9, 0, 5), ErrorCode.OFFSET_OUT_OF_RANGE),
        (storage_errors.CorruptBatchError("crc"), ErrorCode.INVALID_RECORDS),
        (storage_errors.LimitExceededError("big"), ErrorCode.LIMIT_EXCEEDED),
        (storage_errors.CorruptSegmentError("p", 0, 0, "crc"), ErrorCode.CORRUPT_DATA),
        (storage_errors.LogReadOnlyError("ro"), ErrorCode.READ_ONLY_LOG),
        (storage_errors.DiskFullError("full"), ErrorCode.DISK_FULL),
        (storage_errors.DurableWaitTimeoutError("slow"), ErrorCode.NOT_DURABLE),
        (storage_errors.InvalidConfigError("bad"), ErrorCode.INVALID_CONFIG),
        (ProtocolError(ErrorCode.UNKNOWN_MEMBER, "who"), ErrorCode.UNKNOWN_MEMBER),
        (RuntimeError("bug"), ErrorCode.INTERNAL),
    ],
)
def test_error_code_for_maps_storage_errors(error, code) -> None:
    assert error_code_for(error) is code


def test_acks_none_still_gets_a_response() -> None:
    client, server = connected_pair()
    produce = ProduceRequest(request_id=client.next_request_id(), topic="t", partition=0, acks=Acks.NONE, records=b"")
    server.receive_data(client.send(produce))
    assert server.next_event() == produce
    assert client.in_flight_count == 1 and server.in_flight_count == 1


def test_statistics_count_frames_and_bytes() -> None:
    client, server = connected_pair()
    frame = client.send(ListTopicsRequest(request_id=client.next_request_id()))
    server.receive_data(frame)
    drain(server)
    client_stats, server_stats = client.statistics(), server.statistics()
    assert client_stats.frames_sent == server_stats.frames_received == 2
    assert client_stats.bytes_sent == server_stats.bytes_received
    assert client_stats.in_flight_requests == server_stats.in_flight_requests == 1


def test_random_chunking_of_a_long_pipelined_stream() -> None:
    rng = random.Random(1234)
    client, server = connected_pair()
    requests = [
        FetchRequest(request_id=client.next_request_id(), topic=f"topic-{index}", partition=index % 7, offset=index)
        for index in range(200)
    ]
    stream = b"".join(client.send(request) for request in requests)
    events, position = [], 0
    while position < len(stream):
        step = rng.randint(1, 97)
        server.receive_data(stream[position : position + step])
        position += step
        events.extend(drain(server))
    assert events == requests


# ---------------------------------------------------------------------------
# Protocol version 2 (issue 17): APIs added later, and clients that speak only 1


def test_a_version_1_client_is_served_and_a_version_2_api_is_refused_clearly() -> None:
    from nodi.broker.protocol.messages import GroupWaitRequest, HeartbeatRequest

    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    hello = HandshakeRequest(
        request_id=client.next_request_id(), client_id="old", protocol_version_min=1, protocol_version_max=1
    )
    server.receive_data(client.send(hello))
    request = server.next_event()
    assert isinstance(request, HandshakeRequest)
    client.receive_data(server.send(handshake_response(request, server_id="s", limits={})))
    assert isinstance(client.next_event(), HandshakeResponse)
    assert client.protocol_version == server.protocol_version == 1
    # A version-1 API is served as before.
    beat = HeartbeatRequest(request_id=client.next_request_id(), group="g", member_id="m", generation=1)
    server.receive_data(client.send(beat))
    assert server.next_event() == beat
    # The client itself refuses to send a version-2 API on a version-1 connection...
    wait = GroupWaitRequest(request_id=client.next_request_id(), group="g", member_id="m", generation=1)
    with pytest.raises(ProtocolError) as caught:
        client.send(wait)
    assert caught.value.code == ErrorCode.UNSUPPORTED_VERSION
    assert "protocol version 2" in caught.value.message
    # ...and a server answers one (from a client that sent it anyway) with
    # UNSUPPORTED_VERSION and carries on.
    server.receive_data(raw_frame(0, ApiKey.GROUP_WAIT, 4242, b""))
    rejected = server.next_event()
    assert isinstance(rejected, RejectedRequest)
    assert rejected.error_code == ErrorCode.UNSUPPORTED_VERSION
    assert "protocol version 2" in rejected.error_message
    assert server.state is State.READY


def test_queue_leases_and_delete_records_need_protocol_version_4_and_a_version_3_connection_still_works() -> None:
    from nodi.broker.protocol.messages import DeleteRecordsRequest, QueueDescribeRequest, QueueLeasesRequest

    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    hello = HandshakeRequest(
        request_id=client.next_request_id(), client_id="v3", protocol_version_min=1, protocol_version_max=3
    )
    server.receive_data(client.send(hello))
    request = server.next_event()
    assert isinstance(request, HandshakeRequest)
    client.receive_data(server.send(handshake_response(request, server_id="s", limits={})))
    assert isinstance(client.next_event(), HandshakeResponse)
    assert client.protocol_version == server.protocol_version == 3
    describe = QueueDescribeRequest(request_id=client.next_request_id(), group="g", topic="t")
    server.receive_data(client.send(describe))
    assert server.next_event() == describe
    leases = QueueLeasesRequest(request_id=client.next_request_id(), group="g", topic="t")
    deletion = DeleteRecordsRequest(request_id=client.next_request_id(), topic="t")
    for newer in (leases, deletion):  # refused before anything is sent to an older server
        with pytest.raises(ProtocolError) as caught:
            client.send(newer)
        assert caught.value.code == ErrorCode.UNSUPPORTED_VERSION and "protocol version 4" in caught.value.message
    server.receive_data(raw_frame(0, ApiKey.QUEUE_LEASES, 4343, b""))
    rejected = server.next_event()
    assert isinstance(rejected, RejectedRequest) and rejected.error_code == ErrorCode.UNSUPPORTED_VERSION
    assert server.state is State.READY


def test_a_version_2_connection_carries_group_wait() -> None:
    from nodi.broker.protocol.messages import GroupWaitRequest, GroupWaitResponse, TopicPartitions

    client, server = connected_pair()
    wait = GroupWaitRequest(
        request_id=client.next_request_id(),
        group="g",
        member_id="m",
        generation=3,
        wait_ms=2_000,
        messages_redelivered=7,
    )
    server.receive_data(client.send(wait))
    assert server.next_event() == wait
    answer = GroupWaitResponse(
        request_id=wait.request_id,
        error_code=ErrorCode.REBALANCE_IN_PROGRESS,
        generation=4,
        assignments=[TopicPartitions(topic="t", partitions=[1, 2])],
    )
    client.receive_data(server.send(answer))
    assert client.next_event() == answer
