"""The Kafka listener's sans-IO codec (broker/kafka/connection.py, schema.py): every
served API and version round-trips through the request decoder, fed whole, one byte at
a time and in any chunking; garbage, truncation, trailing bytes and oversize sizes raise
only KafkaDecodeError; keys and versions nodi does not serve are answered, not dropped."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodi.broker.kafka.apis import API_VERSIONS, APIS, PRODUCE
from nodi.broker.kafka.connection import (
    KafkaConnection,
    KafkaLimits,
    KafkaRequest,
    api_versions_body,
    decode_request,
    encode_response,
    encode_unsupported,
)
from nodi.broker.kafka.errors import KafkaDecodeError, KafkaError
from nodi.broker.kafka.schema import Reader, decode, encode

SERVED = [(api.key, version) for api in APIS.values() for version in range(api.accepted_from, api.max_version + 1)]

_PRIMITIVES = {
    "int8": st.integers(-128, 127),
    "int16": st.integers(-(2**15), 2**15 - 1),
    "int32": st.integers(-(2**31), 2**31 - 1),
    "int64": st.integers(-(2**63), 2**63 - 1),
    "bool": st.booleans(),
    "string": st.text(max_size=8),
    "nullable_string": st.none() | st.text(max_size=8),
    "bytes": st.binary(max_size=16),
    "nullable_bytes": st.none() | st.binary(max_size=16),
    "records": st.none() | st.binary(max_size=32),
}


def _values(schema, version):
    """A hypothesis strategy for one struct of `schema` at `version`."""
    fields = {}
    for name, kind, first, last in schema:
        if not first <= version <= last:
            continue
        if isinstance(kind, str):
            fields[name] = _PRIMITIVES[kind]
        else:
            item = kind[1]
            element = _PRIMITIVES[item] if isinstance(item, str) else _values(item, version)
            elements = st.lists(element, max_size=3)
            fields[name] = (st.none() | elements) if kind[0] == "nullable_array" else elements
    return st.fixed_dictionaries(fields)


@st.composite
def requests(draw, served=SERVED):
    key, version = draw(st.sampled_from(served))
    body = draw(_values(APIS[key].request, version))
    correlation_id = draw(st.integers(-(2**31), 2**31 - 1))
    client_id = draw(st.none() | st.text(max_size=8))
    return key, version, correlation_id, client_id, body


def _frame(key: int, version: int, correlation_id: int, client_id: str | None, body: dict) -> bytes:
    parts: list[bytes] = [struct.pack(">hhi", key, version, correlation_id)]
    encode((("client_id", "nullable_string", 0, 1 << 15),), 0, {"client_id": client_id}, parts)
    encode(APIS[key].request, version, body, parts)
    payload = b"".join(parts)
    return struct.pack(">i", len(payload)) + payload


def _normalized(value):
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {name: _normalized(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_normalized(item) for item in value]
    return value


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_every_served_request_round_trips_through_the_decoder(request) -> None:
    key, version, correlation_id, client_id, body = request
    connection = KafkaConnection()
    connection.receive_data(_frame(*request))
    decoded = connection.next_request()
    assert decoded is not None and decoded.supported
    assert (decoded.api_key, decoded.api_version, decoded.correlation_id, decoded.client_id) == (
        key,
        version,
        correlation_id,
        client_id,
    )
    assert _normalized(decoded.body) == body
    assert connection.next_request() is None


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_one_byte_at_a_time_needs_data_until_the_last_byte(request) -> None:
    frame = _frame(*request)
    connection = KafkaConnection()
    for index in range(len(frame) - 1):
        connection.receive_data(frame[index : index + 1])
        assert connection.next_request() is None
    connection.receive_data(frame[-1:])
    decoded = connection.next_request()
    assert decoded is not None and _normalized(decoded.body) == request[4]


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=4), st.data())
def test_a_stream_of_requests_decodes_the_same_in_any_chunking(batch, data) -> None:
    stream = b"".join(_frame(*request) for request in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    connection = KafkaConnection()
    decoded = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        connection.receive_data(stream[start:end])
        while (request := connection.next_request()) is not None:
            decoded.append(request)
    assert [(r.api_key, r.api_version, r.correlation_id, _normalized(r.body)) for r in decoded] == [
        (key, version, correlation_id, body) for key, version, correlation_id, _, body in batch
    ]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_a_truncated_body_is_a_decode_error(request, data) -> None:
    frame = _frame(*request)
    payload = frame[4:]
    cut = data.draw(st.integers(10, len(payload) - 1)) if len(payload) > 10 else None
    if cut is None:
        return
    try:
        decode_request(memoryview(payload[:cut]), 100)
    except KafkaDecodeError:
        return
    raise AssertionError("a truncated request decoded")


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.binary(min_size=1, max_size=8))
def test_trailing_bytes_after_the_last_field_are_a_decode_error(request, garbage) -> None:
    payload = _frame(*request)[4:] + garbage
    with pytest.raises(KafkaDecodeError, match="after the last field"):
        decode_request(memoryview(payload), 100)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SERVED), st.binary(max_size=200))
def test_garbage_bodies_raise_only_decode_errors(served, body) -> None:
    key, version = served
    payload = struct.pack(">hhih", key, version, 7, -1) + body
    try:
        decode_request(memoryview(payload), 1000)
    except KafkaDecodeError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_mutated_requests_raise_only_decode_errors(request, data) -> None:
    frame = bytearray(_frame(*request))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(4, len(frame) - 1))
        frame[position] = data.draw(st.integers(0, 255))
    connection = KafkaConnection(KafkaLimits(array_items_max=1000))
    connection.receive_data(bytes(frame))
    try:
        connection.next_request()
    except KafkaDecodeError:
        pass


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_a_connection_fed_garbage_raises_only_decode_errors(chunks) -> None:
    connection = KafkaConnection(KafkaLimits(request_bytes_max=4096, array_items_max=1000))
    try:
        for chunk in chunks:
            connection.receive_data(chunk)
            while connection.next_request() is not None:
                pass
    except KafkaDecodeError:
        pass


def test_an_oversize_request_is_refused_from_its_size_prefix() -> None:
    connection = KafkaConnection(KafkaLimits(request_bytes_max=1000))
    connection.receive_data(struct.pack(">i", 1001))
    with pytest.raises(KafkaDecodeError, match="request_bytes_max 1000"):
        connection.next_request()


@pytest.mark.parametrize("size", [-1, 0, 9])
def test_a_size_below_the_header_is_refused(size: int) -> None:
    connection = KafkaConnection()
    connection.receive_data(struct.pack(">i", size))
    with pytest.raises(KafkaDecodeError):
        connection.next_request()


def test_an_array_count_over_the_limit_is_refused_before_any_item_is_read() -> None:
    reader = Reader(memoryview(struct.pack(">i", 11) + b"\x00" * 100), array_items_max=10)
    with pytest.raises(KafkaDecodeError, match="array_items_max 10"):
        decode((("names", ("array", "int8"), 0, 9),), 0, reader)


def test_an_array_count_past_the_end_of_the_request_is_refused() -> None:
    reader = Reader(memoryview(struct.pack(">i", 50) + b"\x00" * 10), array_items_max=1000)
    with pytest.raises(KafkaDecodeError, match="50 items in 10 bytes"):
        decode((("names", ("array", "int8"), 0, 9),), 0, reader)


def test_invalid_utf8_in_a_string_is_a_decode_error() -> None:
    payload = struct.pack(">hhih", API_VERSIONS.key, 0, 1, 2) + b"\xff\xfe"
    with pytest.raises(KafkaDecodeError, match="UTF-8"):
        decode_request(memoryview(payload), 10)


def _response(parts: list[bytes]) -> bytes:
    data = b"".join(parts)
    (size,) = struct.unpack_from(">i", data)
    assert size == len(data) - 4
    return data[4:]


def test_a_key_nodi_does_not_serve_is_answered_unsupported_version() -> None:
    request = decode_request(memoryview(struct.pack(">hhih", 57, 0, 42, -1) + b"anything"), 10)
    assert not request.supported
    assert _response(encode_unsupported(request)) == struct.pack(">ih", 42, KafkaError.UNSUPPORTED_VERSION)


def test_produce_before_v3_is_answered_unsupported_version_though_v0_is_advertised() -> None:
    assert PRODUCE.min_version == 0 and PRODUCE.accepted_from == 3
    request = decode_request(memoryview(struct.pack(">hhih", PRODUCE.key, 2, 9, -1)), 10)
    assert not request.supported


def test_api_versions_v3_gets_the_v0_answer_with_the_ranges() -> None:
    # A v3 request: header v2 (client id, then tagged fields) and a flexible body.
    payload = struct.pack(">hhih", API_VERSIONS.key, 3, 5, 3) + b"cli" + b"\x00" + b"\x04kcat\x061.7.1\x00"
    request = decode_request(memoryview(payload), 10)
    assert not request.supported
    body = _response(encode_unsupported(request))
    reader = Reader(memoryview(body), 1000)
    assert reader.int32() == 5
    decoded = decode(API_VERSIONS.response, 0, reader)
    assert reader.position == len(body)
    assert decoded["error_code"] == KafkaError.UNSUPPORTED_VERSION
    ranges = {entry["api_key"]: (entry["min_version"], entry["max_version"]) for entry in decoded["api_keys"]}
    assert ranges == {api.key: (api.min_version, api.max_version) for api in APIS.values()}


@pytest.mark.parametrize("version", [0, 1, 2])
def test_api_versions_answers_in_the_version_asked(version: int) -> None:
    request = KafkaRequest(API_VERSIONS.key, version, 3, "c", body={})
    body = _response(encode_response(request, api_versions_body()))
    reader = Reader(memoryview(body), 1000)
    assert reader.int32() == 3
    decoded = decode(API_VERSIONS.response, version, reader)
    assert reader.position == len(body)
    assert decoded["error_code"] == 0
    assert ("throttle_time_ms" in decoded) == (version >= 1)


def test_every_advertised_range_covers_the_accepted_one() -> None:
    for api in APIS.values():
        assert api.min_version <= api.accepted_from <= api.max_version, api.name
