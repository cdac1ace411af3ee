"""The protocol's precomputed paths give what the general ones give (issue 12).

- A schema's packed runs (integers and enumerations encoded and decoded with one
  struct call) against the same fields encoded and decoded one by one, for every
  message class and nested struct.
- A READY server connection's table of what it serves (connection._served_at: a request
  it serves is decoded, and its response encoded, after one look-up) against the same
  connection with the table off, which checks everything one by one: the same events,
  the same RejectedRequests, the same bytes and the same errors, at every protocol
  version, for every API and version.
- A READY client connection's tables (connection._sent_at: a request the server serves
  is encoded, and a response to one in flight decoded, after one look-up) against the
  same client with the tables off: the same frames, request ids, events and errors,
  for good responses and bad ones (trailing garbage, truncated, another version, the
  ERROR flag, no such request in flight, another API).
"""

from __future__ import annotations

import functools
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodi.broker.protocol import connection as connection_module
from nodi.broker.protocol import schema
from nodi.broker.protocol.connection import (
    NEED_DATA,
    PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
    ApiKey,
    ClosingEvent,
    Connection,
    ErrorCode,
    ErrorResponse,
    HandshakeRequest,
    HandshakeResponse,
    ListOffsetsRequest,
    ProtocolError,
    RejectedRequest,
    Role,
    State,
    encode_message,
    handshake_response,
)
from nodi.broker.protocol.limits import DEFAULT_PROTOCOL_LIMITS
from nodi.broker.protocol.messages import MESSAGES_BY_VERSION, api_served, api_version_served

from test_protocol import message_strategy, raw_frame

QUICK = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LAYOUTS = sorted({(api_key, version) for api_key, version in MESSAGES_BY_VERSION if api_key != ApiKey.HANDSHAKE})
# Marks: a test run at every protocol version; a test run for every (API, version) layout.
every_protocol_version = pytest.mark.parametrize(
    "protocol_version", range(PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX + 1)
)
every_layout = pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{ApiKey(layout[0]).name}-v{layout[1]}")
MESSAGE_CLASSES = sorted(
    {cls for request, response, _ in MESSAGES_BY_VERSION.values() for cls in (request, response)}
    | {ErrorResponse, ClosingEvent},
    key=lambda cls: cls.__name__,
)


def _structs_of(cls: type, found: set[type]) -> set[type]:
    for field in schema.schema_of(cls).fields:
        item = field.type.item if isinstance(field.type, schema.Array) else field.type
        if isinstance(item, schema.Struct) and item.cls not in found:
            found.add(item.cls)
            _structs_of(item.cls, found)
    return found


STRUCT_CLASSES = sorted(
    set().union(*(_structs_of(cls, set()) for cls in MESSAGE_CLASSES)), key=lambda cls: cls.__name__
)


def encode_field_by_field(value: object) -> bytearray:
    out = bytearray()
    for field in schema.schema_of(type(value)).fields:
        field.type.encode(getattr(value, field.name), out)
    return out


def decode_field_by_field(cls: type, body: bytes, **extra: object) -> object:
    view = memoryview(body)
    position = 0
    for field in schema.schema_of(cls).fields:
        extra[field.name], position = field.type.decode(view, position, len(body), DEFAULT_PROTOCOL_LIMITS)
    assert position == len(body)
    return cls(**extra)


def test_the_hot_messages_have_packed_runs_with_enumerations() -> None:
    runs = schema.schema_of(ListOffsetsRequest)._runs
    assert [run.names for run in runs] == [("topic",), ("partition", "spec", "timestamp_ms")]
    assert runs[1].packed is not None


@pytest.mark.parametrize("cls", MESSAGE_CLASSES + STRUCT_CLASSES, ids=lambda cls: cls.__name__)
@QUICK
@given(data=st.data())
def test_packed_runs_encode_and_decode_as_the_fields_one_by_one(cls, data) -> None:
    value = data.draw(message_strategy(cls))
    body = schema.encode_body(value)
    assert body == encode_field_by_field(value)
    extra = {name: getattr(value, name) for name in ("request_id", "api_key") if hasattr(value, name)}
    assert schema.decode_body(cls, memoryview(bytes(body)), DEFAULT_PROTOCOL_LIMITS, **extra) == value
    assert decode_field_by_field(cls, bytes(body), **extra) == value


def test_a_value_a_packed_run_cannot_take_as_is_is_checked_field_by_field() -> None:
    good = ListOffsetsRequest(request_id=1, topic="t", partition=3, spec=1, timestamp_ms=5)  # type: ignore[arg-type]  # an int for the enum
    assert schema.encode_body(good) == encode_field_by_field(good)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"partition": True}, "partition: expected an integer for int32, got bool"),
        ({"partition": 1 << 40}, "partition: 1099511627776 is outside int32"),
        ({"spec": 99}, "spec: 99 is not a OffsetSpec"),
        ({"timestamp_ms": 1.5}, "timestamp_ms: expected an integer for int64, got float"),
    ]
    for fields, message in cases:
        bad = ListOffsetsRequest(**{"request_id": 1, "topic": "t", "partition": 3, **fields})
        with pytest.raises(ProtocolError) as raised:
            schema.encode_body(bad)
        assert raised.value.code is ErrorCode.INVALID_REQUEST
        assert raised.value.message.startswith(message)


def test_an_unknown_enumeration_value_in_a_packed_run_is_the_same_invalid_request() -> None:
    body = struct.pack(">H1sibq", 1, b"t", 0, 99, -1)
    with pytest.raises(ProtocolError) as packed:
        schema.decode_body(ListOffsetsRequest, memoryview(body), DEFAULT_PROTOCOL_LIMITS, request_id=1)
    with pytest.raises(ProtocolError) as one_by_one:
        decode_field_by_field(ListOffsetsRequest, body, request_id=1)
    assert packed.value.code is ErrorCode.INVALID_REQUEST
    assert packed.value.message == f"spec: {one_by_one.value.message}" == "spec: 99 is not a OffsetSpec"


def ready_server(protocol_version: int, *, fast: bool) -> Connection:
    server = Connection(Role.SERVER)
    server.receive_data(
        encode_message(
            HandshakeRequest(
                request_id=1, protocol_version_min=protocol_version, protocol_version_max=protocol_version
            ),
            1,
        )
    )
    request = server.next_event()
    assert isinstance(request, HandshakeRequest)
    server.send(handshake_response(request, server_id="s", limits={}))
    assert server.state is State.READY and server.protocol_version == protocol_version
    if not fast:
        server._requests_served = server._responses_served = None  # the checks one by one
    else:
        assert server._requests_served is not None
    return server


def outcome(call):
    try:
        return call()
    except ProtocolError as error:
        return ("raised", error.code, error.message, error.closes_connection)


def both_ways(protocol_version: int, frames: list[bytes], answer) -> None:
    """Feed the same frames to a server with its table and one without; answer each
    request with answer(request); everything must come out the same."""
    results = []
    for fast in (True, False):
        server = ready_server(protocol_version, fast=fast)
        seen = []
        for frame in frames:
            server.receive_data(frame)
            while True:
                event = outcome(server.next_event)
                seen.append(event)
                if event is NEED_DATA or isinstance(event, tuple):
                    break
                response = event.response() if isinstance(event, RejectedRequest) else answer(event)
                if response is not None:
                    seen.append(outcome(functools.partial(server.send, response)))
                seen.append(server.state)
            if server.state is not State.READY:
                break
        seen.append(server.statistics())
        results.append(seen)
    assert results[0] == results[1]


@every_protocol_version
@every_layout
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_ready_server_serves_every_api_the_same_by_its_table_as_by_the_checks(layout, protocol_version, data):
    api_key, version = layout
    request_class, response_class, _ = MESSAGES_BY_VERSION[layout]
    served = api_served(api_key, protocol_version) and api_version_served(api_key, version, protocol_version)
    request = data.draw(message_strategy(request_class, request_id=st.integers(1, 1000)))
    frame = encode_message(request, version)
    body = frame[14:]
    frames = [
        frame,  # the request, well formed
        raw_frame(0, api_key, 2000, body + b"\x00", version=version),  # trailing garbage: rejected
        raw_frame(0, api_key, 2001, body[:-1], version=version) if body else frame,  # truncated
        raw_frame(0, api_key, 2002, body, version=version + 50),  # no such version
        raw_frame(0, api_key, 2003, body, version=version, flags=1),  # the ERROR flag on a request
    ]

    response = data.draw(message_strategy(response_class, request_id=st.just(request.request_id)))
    both_ways(protocol_version, frames, lambda event: response if type(event) is request_class else None)
    both_ways(protocol_version, [frame, frame], lambda event: None)  # the same id twice: closes
    if served:
        # A response of another API, of another version, to no request, and a good one twice.
        wrong = ErrorResponse(request_id=request.request_id, api_key=api_key, error_code=ErrorCode.INVALID_REQUEST)
        both_ways(protocol_version, [frame], lambda event: wrong)
        other_id = data.draw(message_strategy(response_class, request_id=st.just(request.request_id + 1)))
        both_ways(protocol_version, [frame], lambda event: other_id)
        for other_layout in (layout for layout in LAYOUTS if layout != (api_key, version)):
            other = MESSAGES_BY_VERSION[other_layout][1]
            if other is response_class:
                continue
            stray = data.draw(message_strategy(other, request_id=st.just(request.request_id)))
            both_ways(protocol_version, [frame], lambda event, stray=stray: stray)
            break


def test_too_many_requests_in_flight_take_the_general_path() -> None:
    frames = [
        encode_message(ListOffsetsRequest(request_id=index, topic="t", partition=0), 1)
        for index in range(1, DEFAULT_PROTOCOL_LIMITS.in_flight_requests_max + 3)
    ]
    both_ways(PROTOCOL_VERSION_MAX, [b"".join(frames)], lambda event: None)
    server = ready_server(PROTOCOL_VERSION_MAX, fast=True)
    server.receive_data(b"".join(frames))
    events = [server.next_event() for _ in frames]
    assert all(isinstance(event, ListOffsetsRequest) for event in events[:-2])
    assert [getattr(event, "error_code", None) for event in events[-2:]] == [ErrorCode.TOO_MANY_REQUESTS] * 2
    assert all(isinstance(event, RejectedRequest) for event in events[-2:])


def ready_client(protocol_version: int, *, fast: bool, in_flight_requests_max: int = 0) -> Connection:
    client = Connection(Role.CLIENT)
    handshake = HandshakeRequest(
        request_id=client.next_request_id(),
        protocol_version_min=protocol_version,
        protocol_version_max=protocol_version,
    )
    client.send(handshake)
    limits = {"in_flight_requests_max": in_flight_requests_max} if in_flight_requests_max else {}
    client.receive_data(encode_message(handshake_response(handshake, server_id="s", limits=limits), 1))
    assert isinstance(client.next_event(), HandshakeResponse)
    assert client.state is State.READY
    if not fast:
        client._requests_sent = client._responses_received = None  # the checks one by one
    else:
        assert client._requests_sent is not None
    return client


def client_both_ways(protocol_version: int, requests: list, frames: list[bytes], **kwargs: Any) -> None:
    """Send the same requests from a client with its tables and one without, then feed
    both the same frames; everything must come out the same."""
    results = []
    for fast in (True, False):
        client = ready_client(protocol_version, fast=fast, **kwargs)
        seen: list[Any] = []
        for request, records_bytes in requests:
            seen.append(outcome(functools.partial(client.send_request, request, records_bytes)))
        seen.append(client.in_flight_request_ids())
        for frame in frames:
            client.receive_data(frame)
            while True:
                event = outcome(client.next_event)
                seen.append(event)
                if event is NEED_DATA or isinstance(event, tuple):
                    break
            seen.append(client.state)
            if client.state is not State.READY:
                break
        seen.append((client.in_flight_request_ids(), client.statistics()))
        results.append(seen)
    assert results[0] == results[1]


@every_protocol_version
@every_layout
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_ready_client_sends_and_receives_the_same_by_its_tables_as_by_the_checks(layout, protocol_version, data):
    api_key, version = layout
    request_class, response_class, _ = MESSAGES_BY_VERSION[layout]
    request = data.draw(message_strategy(request_class))  # its request id is the connection's to pick
    records_bytes = data.draw(st.sampled_from([None, 0, 100])) if schema.schema_of(request_class).has_records else None
    sent = [(request, records_bytes)]
    client_both_ways(protocol_version, sent, [])
    request_id = 2  # the Handshake was 1
    response = data.draw(message_strategy(response_class, request_id=st.just(request_id)))
    frame = encode_message(response, version)
    body = frame[14:]
    error = ErrorResponse(request_id=request_id, api_key=api_key, error_code=ErrorCode.INVALID_REQUEST)
    other_layout = next(other for other in LAYOUTS if MESSAGES_BY_VERSION[other][1] is not response_class)
    other = data.draw(message_strategy(MESSAGES_BY_VERSION[other_layout][1], request_id=st.just(request_id)))
    cases = [
        [frame],  # the response, well formed
        [frame, frame],  # twice: the second answers nothing in flight
        [frame[:7], frame[7:]],  # in two pieces
        [raw_frame(1, api_key, request_id, body + b"\x00", version=version)],  # trailing garbage
        [raw_frame(1, api_key, request_id, body + b"\x00\x00\x00", version=version)],
        [raw_frame(1, api_key, request_id, body[:-1], version=version) if body else frame],  # truncated
        [raw_frame(1, api_key, request_id, body, version=version + 50)],  # another version
        [raw_frame(1, api_key, request_id, body, version=version, flags=1)],  # the ERROR flag on its body
        [raw_frame(1, api_key, request_id, body, version=version, flags=2)],  # an unknown flag
        [raw_frame(0, api_key, request_id, body, version=version)],  # a request
        [raw_frame(1, api_key, request_id + 1, body, version=version)],  # no such request in flight
        [raw_frame(1, api_key, 0, body, version=version)],  # request id 0
        [encode_message(error, version)],  # an error response
        [encode_message(other, other_layout[1])],  # another API's response
    ]
    for frames in cases:
        client_both_ways(protocol_version, sent, frames)


def test_a_client_request_over_the_limits_takes_the_general_path() -> None:
    request = ListOffsetsRequest(topic="t", partition=0)
    # More in flight than the server allows: TOO_MANY_REQUESTS, nothing emitted.
    client_both_ways(PROTOCOL_VERSION_MAX, [(request, None)] * 4, [], in_flight_requests_max=2)
    client = ready_client(PROTOCOL_VERSION_MAX, fast=True, in_flight_requests_max=2)
    assert [client.send_request(request)[0] for _ in range(2)] == [2, 3]
    with pytest.raises(ProtocolError) as raised:
        client.send_request(request)
    assert raised.value.code is ErrorCode.TOO_MANY_REQUESTS
    # A value outside its type and a bad records length raise with the connection unchanged.
    bad = ListOffsetsRequest(topic="t", partition=1 << 40)
    client_both_ways(PROTOCOL_VERSION_MAX, [(bad, None), (request, -1), (request, None)], [])


@every_protocol_version
def test_a_ready_client_has_a_table_entry_for_every_api_its_server_serves(protocol_version) -> None:
    client = ready_client(protocol_version, fast=True)
    assert client._requests_sent is not None and client._responses_received is not None
    for layout in LAYOUTS:
        request_class, response_class, _ = MESSAGES_BY_VERSION[layout]
        served = api_served(layout[0], protocol_version) and api_version_served(*layout, protocol_version)
        assert (client._requests_sent.get(request_class) == layout) is served
        assert (client._responses_received.get(layout) is response_class) is served


@every_protocol_version
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_ready_connection_whose_protocol_version_changes_takes_its_tables_to_the_new_one(protocol_version, data):
    """Why client-path was first reverted: the tables were built at the handshake's
    protocol version and kept when protocol_version was lowered afterwards (as
    test_fetch_commit's consumer "against a server without Fetch version 2" does), so a
    client sent a Fetch version 2 the checks refuse, and its commit rode a fetch the
    server it speaks to would not serve. Client and server, lowered or raised to every
    version, must send and serve exactly what the checks one by one allow there."""
    requests = [data.draw(message_strategy(MESSAGES_BY_VERSION[layout][0])) for layout in LAYOUTS]
    for handshake_version in (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX):
        clients = []
        for fast in (True, False):
            client = ready_client(handshake_version, fast=fast)
            client.protocol_version = protocol_version
            sent = [outcome(functools.partial(client.send_request, request)) for request in requests]
            clients.append((sent, client.in_flight_request_ids(), client.statistics()))
        assert clients[0] == clients[1]
        refused = [
            layout
            for layout, result in zip(LAYOUTS, clients[0][0], strict=True)
            if isinstance(result, tuple) and result[0] == "raised"
        ]
        assert refused == [
            layout
            for layout in LAYOUTS
            if not (api_served(layout[0], protocol_version) and api_version_served(*layout, protocol_version))
        ]
        servers = []
        for fast in (True, False):
            server = ready_server(handshake_version, fast=fast)
            server.protocol_version = protocol_version
            seen = []
            for request_id, (layout, request) in enumerate(zip(LAYOUTS, requests, strict=True), start=2):
                server.receive_data(
                    raw_frame(0, layout[0], request_id, encode_message(request, layout[1])[14:], version=layout[1])
                )
                seen.append(outcome(server.next_event))
            servers.append((seen, server.statistics()))
        assert servers[0] == servers[1]


def test_a_connection_without_its_tables_keeps_taking_the_checks_when_its_version_changes() -> None:
    client = ready_client(PROTOCOL_VERSION_MAX, fast=False)
    client.protocol_version = PROTOCOL_VERSION_MIN
    assert client._requests_sent is None and client._responses_received is None
    client = ready_client(PROTOCOL_VERSION_MAX, fast=True)
    client.protocol_version = PROTOCOL_VERSION_MIN
    assert client._requests_sent is not None
    assert client._requests_sent == connection_module._sent_at(PROTOCOL_VERSION_MIN)[0]
