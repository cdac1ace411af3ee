"""The wire frame: the one codec for every message between a nodi client and server.

Frame layout (big-endian; docs/protocol.md):

    offset  size  field
         0     4  frame_length  uint32: bytes after this field (10 + body). The whole
                                frame (4 + frame_length) is at most frame_bytes_max,
                                checked from these 4 bytes before the body is buffered.
         4     1  kind          0 request, 1 response, 2 event
         5     1  flags         bit 0 ERROR: a response whose body is only error_code and
                                error_message (see messages.ErrorResponse); bits 1-7 are 0
         6     2  api_key       uint16: the API (requests, responses) or the event type
         8     2  api_version   uint16: of that API's request or response layout
        10     4  request_id    uint32: picked by the client, unique among its requests
                                in flight and never 0; a response echoes it; 0 on events
        14     -  body          the message's fields (broker/protocol/schema.py, broker/protocol/messages.py);
                                a records field is always last, so a sender can write the
                                frame up to it and then the batches from a file

`encode_message` and `decode_message` are the pair; the connection (broker/protocol/connection.py)
uses the steps below them: `check_frame_length` as soon as 4 bytes are in,
`decode_frame_header`, then `message_class` and `decode_message_body`.

Errors: a bad length, kind, flag or request id is MALFORMED_FRAME and an oversize length
FRAME_TOO_LARGE (both close the connection). An unknown API key is UNKNOWN_API, an
unsupported version UNSUPPORTED_VERSION, an undecodable body INVALID_REQUEST or
LIMIT_EXCEEDED: on a request these are answered and the connection carries on; the
connection decides what they mean for a response.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .errors import ErrorCode, ProtocolError
from .limits import DEFAULT_PROTOCOL_LIMITS, FRAME_LENGTH_PREFIX_BYTES, UINT32_MAX, ProtocolLimits
from .messages import API_BY_KEY, EVENT_VERSION, EVENTS, MESSAGES_BY_VERSION, ErrorResponse, Kind, Message
from .schema import decode_body, schema_of

# kind, flags, api_key, api_version, request_id: the bytes frame_length counts first.
FRAME_HEADER_BYTES = 10
FRAME_OVERHEAD_BYTES = FRAME_LENGTH_PREFIX_BYTES + FRAME_HEADER_BYTES
FLAG_ERROR = 0x01
KNOWN_FLAGS = FLAG_ERROR

_PREFIX = struct.Struct(">I")
_PREFIX_AND_HEADER = struct.Struct(">IBBHHI")
assert _PREFIX_AND_HEADER.size == FRAME_OVERHEAD_BYTES
_KINDS = {kind.value: kind for kind in Kind}


class FrameHeader(NamedTuple):
    kind: Kind
    flags: int
    api_key: int
    api_version: int
    request_id: int


def _malformed(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED_FRAME, message)


def check_frame_length(frame_length: int, limits: ProtocolLimits = DEFAULT_PROTOCOL_LIMITS) -> int:
    """The whole frame's size from its length prefix, or MALFORMED_FRAME /
    FRAME_TOO_LARGE (both close the connection)."""
    if frame_length < FRAME_HEADER_BYTES:
        raise _malformed(f"frame length {frame_length} is below the {FRAME_HEADER_BYTES}-byte header")
    size = FRAME_LENGTH_PREFIX_BYTES + frame_length
    if size > limits.frame_bytes_max:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame of {size} bytes exceeds frame_bytes_max {limits.frame_bytes_max}",
        )
    return size


def read_frame_length(buffer: bytes | bytearray | memoryview, position: int = 0) -> int:
    """The length prefix at `position` (the caller has checked that 4 bytes are there)."""
    return _PREFIX.unpack_from(buffer, position)[0]


_HEADER = struct.Struct(">BBHHI")


def read_frame_header(frame: bytes | memoryview) -> tuple[int, int, int, int, int]:
    """kind, flags, api_key, api_version, request_id of a whole frame, unchecked: for a
    caller that checks them itself (the connection's fast path for the requests it
    serves) and gives anything else to decode_frame_header."""
    return _HEADER.unpack_from(frame, FRAME_LENGTH_PREFIX_BYTES)


def decode_frame_header(frame: bytes | memoryview) -> FrameHeader:
    """The header of one whole frame (prefix included), checked."""
    if len(frame) < FRAME_OVERHEAD_BYTES:
        raise _malformed(f"frame of {len(frame)} bytes is shorter than its header")
    length, kind, flags, api_key, api_version, request_id = _PREFIX_AND_HEADER.unpack_from(frame)
    if FRAME_LENGTH_PREFIX_BYTES + length != len(frame):
        raise _malformed(f"length prefix says {length} bytes, frame has {len(frame) - 4}")
    kind_member = _KINDS.get(kind)
    if kind_member is None:
        raise _malformed(f"unknown frame kind {kind}")
    kind = kind_member
    if flags & ~KNOWN_FLAGS:
        raise _malformed(f"unknown frame flags {flags:#04x}")
    if flags & FLAG_ERROR and kind is not Kind.RESPONSE:
        raise _malformed("the ERROR flag on a frame that is not a response")
    if (request_id == 0) != (kind is Kind.EVENT):
        raise _malformed(f"request id {request_id} on a {kind.name.lower()} frame")
    return FrameHeader(kind, flags, api_key, api_version, request_id)


def message_class(header: FrameHeader) -> type[Message]:
    """The message class a frame's body decodes as; UNKNOWN_API or UNSUPPORTED_VERSION."""
    if header.kind is Kind.EVENT:
        cls = EVENTS.get(header.api_key)
        if cls is None:
            raise ProtocolError(ErrorCode.UNKNOWN_API, f"unknown event type {header.api_key}")
        if header.api_version != EVENT_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"event version {header.api_version}")
        return cls
    if header.flags & FLAG_ERROR:
        return ErrorResponse  # the same body whatever the API and version it answers
    api = API_BY_KEY.get(header.api_key)
    if api is None:
        raise ProtocolError(ErrorCode.UNKNOWN_API, f"unknown API key {header.api_key}")
    found = MESSAGES_BY_VERSION.get((header.api_key, header.api_version))
    if found is None:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"{api.key.name} version {header.api_version}; supported {api.version_min}..{api.version_max}",
        )
    return found[0] if header.kind is Kind.REQUEST else found[1]


def decode_message_body(
    header: FrameHeader, frame: bytes | bytearray | memoryview, limits: ProtocolLimits = DEFAULT_PROTOCOL_LIMITS
) -> Message:
    """Decode the body of one whole frame whose header is `header`. Records come out as
    a memoryview of `frame` (no copy)."""
    cls = message_class(header)
    if cls is not ErrorResponse:
        return decode_body_as(cls, frame, header.request_id, limits)
    body = memoryview(frame)[FRAME_OVERHEAD_BYTES:]
    message = decode_body(cls, body, limits, request_id=header.request_id, api_key=header.api_key)
    if message.error_code == ErrorCode.NONE:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "an error response with error code none")
    return message


def decode_body_as(
    cls: type[Message], frame: bytes | bytearray | memoryview, request_id: int, limits: ProtocolLimits
) -> Message:
    """The body of one whole frame as `cls` (any message class but ErrorResponse, whose
    api_key comes from the header), the frame's request id given."""
    return decode_body(cls, memoryview(frame)[FRAME_OVERHEAD_BYTES:], limits, request_id=request_id)


def decode_message(frame: bytes, limits: ProtocolLimits = DEFAULT_PROTOCOL_LIMITS) -> tuple[FrameHeader, Message]:
    """One whole frame (length prefix included) to its header and message."""
    if len(frame) < FRAME_LENGTH_PREFIX_BYTES:
        raise _malformed(f"{len(frame)} bytes cannot hold a length prefix")
    check_frame_length(read_frame_length(frame), limits)
    header = decode_frame_header(frame)
    return header, decode_message_body(header, frame, limits)


def frame_api_key(message: Message) -> int:
    return message.api_key if isinstance(message, ErrorResponse) else message.API_KEY


def _check_header_values(message: Message, request_id: int, api_key: int, api_version: int) -> None:
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"request id {request_id!r} is not an integer")
    if message.KIND is Kind.EVENT:
        if request_id != 0:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"an event with request id {request_id}")
    elif not 1 <= request_id <= UINT32_MAX:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"request id {request_id} is outside 1..{UINT32_MAX}")
    if not 0 <= api_key <= 0xFFFF or not 0 <= api_version <= 0xFFFF:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "api key and version are uint16")


def encode_message(
    message: Message,
    api_version: int,
    *,
    records_bytes: int | None = None,
    frame_bytes_max: int | None = None,
    request_id: int | None = None,
) -> bytes:
    """One whole frame for `message`, under `request_id` when given (else the
    message's own). With `records_bytes`, only the frame up to and
    including the records length: the caller sends exactly `records_bytes` bytes of
    batches right after it. Raises ProtocolError (INVALID_REQUEST for a value outside its
    type, FRAME_TOO_LARGE over `frame_bytes_max`) before anything is returned."""
    schema = schema_of(type(message))
    if records_bytes is not None and not schema.has_records:
        raise ProtocolError(ErrorCode.INVALID_REQUEST, f"a {type(message).__name__} has no records field")
    if isinstance(message, ErrorResponse):
        if message.error_code == ErrorCode.NONE:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, "an error response needs an error code")
        api_key, flags = message.api_key, FLAG_ERROR
    else:
        api_key, flags = message.API_KEY, 0
    if request_id is None:
        request_id = message.request_id
    _check_header_values(message, request_id, api_key, api_version)
    body = bytearray()
    schema.encode(message, body, records_bytes=records_bytes)  # all of it, or nothing: it raises
    frame_length = FRAME_HEADER_BYTES + len(body) + (records_bytes or 0)
    size = FRAME_LENGTH_PREFIX_BYTES + frame_length
    if frame_length > UINT32_MAX or (frame_bytes_max is not None and size > frame_bytes_max):
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"a {type(message).__name__} frame of {size} bytes exceeds frame_bytes_max {frame_bytes_max}",
            closes_connection=False,
        )
    header = _PREFIX_AND_HEADER.pack(frame_length, message.KIND, flags, api_key, api_version, request_id)
    return header + body
