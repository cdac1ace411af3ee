"""The sans-IO Kafka connection: bytes in, requests out; responses in, bytes out.

Frame (every request and response): int32 size (bytes after it), then the message.

Request header v1 (every version nodi advertises is non-flexible):
    int16 api_key, int16 api_version, int32 correlation_id, nullable string client_id
Response header v0:
    int32 correlation_id

A request is refused in one of two ways:
- answered (the stream is fine, the request is not served): a key nodi does not serve,
  or a version outside the advertised range, gets UNSUPPORTED_VERSION. An ApiVersions
  request of a newer version than advertised gets the v0-format answer with the ranges,
  so the client retries with a version both know (KIP-511).
- closed (the stream can no longer be trusted): a size over `request_bytes_max`, a
  negative size, a body that ends early or runs past its fields; KafkaDecodeError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from .apis import API_VERSIONS, APIS
from .errors import KafkaDecodeError, KafkaError
from .schema import Reader, decode, encode

SIZE_PREFIX_BYTES = 4
# api_key, api_version, correlation_id, client_id length.
REQUEST_HEADER_BYTES_MIN = 10
_SIZE = struct.Struct(">i")
_HEADER = struct.Struct(">hhi")


# A SASL token sent raw after a v0 SaslHandshake (KIP-152's old framing: int32 size and
# the token, no header) comes out of next_request with this key and body
# {"auth_bytes": token}; its answer is the server's token, size-prefixed, no header.
RAW_SASL_TOKEN = -1
RAW_SASL_TOKEN_BYTES_MAX = 8192

REQUEST_BYTES_MAX = 16 * 1024 * 1024
IN_FLIGHT_REQUESTS_MAX = 16


@dataclass(frozen=True, slots=True)
class KafkaLimits:
    # One request, its size prefix excluded (Kafka's socket.request.max.bytes is 100 MiB;
    # nodi's producers send up to 1 MiB batches). Checked from the prefix.
    request_bytes_max: int = REQUEST_BYTES_MAX
    # Items in one array field, checked from the count before any item is read.
    array_items_max: int = 100_000
    # Requests read and not yet answered on one connection: past it the connection
    # stops reading until a response goes out (Kafka itself serves one at a time).
    in_flight_requests_max: int = IN_FLIGHT_REQUESTS_MAX


@dataclass(slots=True)
class KafkaRequest:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    # The decoded body; None when the request is answered UNSUPPORTED_VERSION unread.
    body: dict[str, Any] | None = None
    # The size of the frame, prefix included (for the metrics).
    size: int = 0

    @property
    def supported(self) -> bool:
        return self.body is not None


class KafkaConnection:
    """Feed `receive_data`, take requests with `next_request` until it returns None."""

    def __init__(self, limits: KafkaLimits | None = None) -> None:
        self.limits = limits or KafkaLimits()
        self._buffer = bytearray()
        self._start = 0
        # The next frame is a raw SASL token (the listener sets it after a v0 handshake).
        self.expect_raw_token = False

    def receive_data(self, data: bytes) -> None:
        if self._start and self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        self._buffer += data

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer) - self._start

    def next_request(self) -> KafkaRequest | None:
        """The next whole request, or None when more bytes are needed. Raises
        KafkaDecodeError when the stream cannot be read on."""
        available = len(self._buffer) - self._start
        if available < SIZE_PREFIX_BYTES:
            return None
        (size,) = _SIZE.unpack_from(self._buffer, self._start)
        if self.expect_raw_token:
            return self._raw_token(size, available)
        if size < REQUEST_HEADER_BYTES_MIN:
            raise KafkaDecodeError(f"request size {size} is below the {REQUEST_HEADER_BYTES_MIN}-byte header")
        if size > self.limits.request_bytes_max:
            raise KafkaDecodeError(f"request of {size} bytes over request_bytes_max {self.limits.request_bytes_max}")
        if available < SIZE_PREFIX_BYTES + size:
            return None
        start = self._start + SIZE_PREFIX_BYTES
        # The frame's own copy: the body's records are slices of it, kept past the buffer.
        frame = memoryview(bytes(self._buffer[start : start + size]))
        self._start = start + size
        if self._start > 1 << 20:  # drop what was consumed, now and then
            del self._buffer[: self._start]
            self._start = 0
        return decode_request(frame, self.limits.array_items_max)

    def _raw_token(self, size: int, available: int) -> KafkaRequest | None:
        if not 0 <= size <= RAW_SASL_TOKEN_BYTES_MAX:
            raise KafkaDecodeError(f"a raw SASL token of {size} bytes (0..{RAW_SASL_TOKEN_BYTES_MAX})")
        if available < SIZE_PREFIX_BYTES + size:
            return None
        start = self._start + SIZE_PREFIX_BYTES
        token = bytes(self._buffer[start : start + size])
        self._start = start + size
        self.expect_raw_token = False  # the listener sets it again when the exchange goes on
        return KafkaRequest(RAW_SASL_TOKEN, 0, 0, None, {"auth_bytes": token}, SIZE_PREFIX_BYTES + size)


def decode_request(frame: memoryview, array_items_max: int) -> KafkaRequest:
    """One request from its frame (size prefix excluded)."""
    if len(frame) < REQUEST_HEADER_BYTES_MIN:
        raise KafkaDecodeError(f"request of {len(frame)} bytes is shorter than its header")
    api_key, api_version, correlation_id = _HEADER.unpack_from(frame, 0)
    reader = Reader(frame, array_items_max, _HEADER.size)
    client_id = reader.nullable_string()
    request = KafkaRequest(api_key, api_version, correlation_id, client_id, size=len(frame) + SIZE_PREFIX_BYTES)
    api = APIS.get(api_key)
    if api is None or not api.accepted_from <= api_version <= api.max_version:
        return request  # answered UNSUPPORTED_VERSION; its body is not read
    request.body = decode(api.request, api_version, reader)
    if reader.position != len(frame):
        raise KafkaDecodeError(
            f"{api.name} v{api_version}: {len(frame) - reader.position} byte(s) after the last field"
        )
    return request


def encode_response(request: KafkaRequest, body: dict[str, Any]) -> list[bytes]:
    """The response frame to `request` (size, header v0, body) as a list of parts."""
    api = APIS[request.api_key]
    parts: list[bytes] = [b"", _SIZE.pack(request.correlation_id)]
    encode(api.response, request.api_version, body, parts)
    parts[0] = _SIZE.pack(sum(len(part) for part in parts))
    return parts


def encode_unsupported(request: KafkaRequest) -> list[bytes]:
    """The answer to a key or version nodi does not serve. For ApiVersions: the v0
    body with UNSUPPORTED_VERSION and the advertised ranges (the client retries with
    one of them). For any other key: the error code right after the header, where
    every Kafka response of a non-served version that a client could parse puts it."""
    if request.api_key == API_VERSIONS.key:
        version0 = KafkaRequest(request.api_key, 0, request.correlation_id, request.client_id)
        return encode_response(version0, api_versions_body(KafkaError.UNSUPPORTED_VERSION))
    body = _SIZE.pack(request.correlation_id) + struct.pack(">h", KafkaError.UNSUPPORTED_VERSION)
    return [_SIZE.pack(len(body)), body]


def encode_error_only(request: KafkaRequest, error: KafkaError) -> list[bytes]:
    """A response of just the header and `error` (as encode_unsupported's): for a key
    with no permission rule (authorization.py)."""
    body = _SIZE.pack(request.correlation_id) + struct.pack(">h", error)
    return [_SIZE.pack(len(body)), body]


def api_versions_body(error: KafkaError = KafkaError.NONE) -> dict[str, Any]:
    return {
        "error_code": int(error),
        "api_keys": [
            {"api_key": api.key, "min_version": api.min_version, "max_version": api.max_version}
            for api in APIS.values()
        ],
        "throttle_time_ms": 0,
    }
