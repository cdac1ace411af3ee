"""nodi's wire protocol, sans-IO: bytes in, events out; messages in, bytes out.

`Connection` is one end of one connection, client or server. It knows nothing of sockets
or files: the asyncio server and the client are loops around it that feed it what they
read (`receive_data`, b"" at end of stream), act on what `next_event` returns, and write
what `send` returns. The frame codec is broker/protocol/frames.py, the messages
broker/protocol/messages.py, their body codec broker/protocol/schema.py; this module re-exports what a
server or client needs.

States and their legal transitions are the one table `TRANSITIONS` below. Besides it,
from any state: `close()` goes to CLOSED, the end of the stream (ConnectionClosed) goes to
CLOSED, and a protocol violation goes to ERROR. In ERROR the connection only closes: a
server may still send one ClosingEvent saying why, then closes the socket.

What raises, and what it does to the connection:

- `next_event` raises ProtocolError only when the stream can no longer be trusted (a bad
  length prefix, an oversize frame, a malformed header, no handshake first, a message the
  state or the peer's role does not allow, a response the client cannot decode); the
  connection is then in ERROR and `closes_connection` is True. A well-framed request the
  server cannot decode (unknown API, unsupported version, invalid fields, too many in
  flight) comes out as a RejectedRequest event instead: answer it with
  `send(event.response())` and carry on.
- `send` raises ProtocolError and puts the connection in ERROR for a message out of
  sequence (wrong state, wrong role, a response to no request in flight). For a message
  whose contents are wrong (a value outside its type, a request id in use, a frame over
  the limit, more requests than in_flight_requests_max) it raises with the connection
  unchanged: nothing was emitted.

Every request gets exactly one response, matched by request id; responses may come in
any order (pipelining). The client tracks its requests in flight (at most
in_flight_requests_max, and at most what the server announced); so does the server, to
check that it answers each request once.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass

from . import messages as _messages
from .errors import (
    CONNECTION_CLOSING_CODES,
    ERROR_DESCRIPTIONS,
    ErrorCode,
    ProtocolError,
)
from .frames import (
    FRAME_HEADER_BYTES,
    FRAME_OVERHEAD_BYTES,
    FrameHeader,
    check_frame_length,
    decode_body_as,
    decode_frame_header,
    decode_message,
    decode_message_body,
    encode_message,
    frame_api_key,
    read_frame_header,
    read_frame_length,
)
from .limits import (
    DEFAULT_PROTOCOL_LIMITS,
    FRAME_LENGTH_PREFIX_BYTES,
    UINT32_MAX,
    ProtocolLimits,
)
from .messages import *  # noqa: F403 - the protocol's public surface includes every message
from .messages import (
    API_BY_KEY,
    EVENT_VERSION,
    HANDSHAKE_API_VERSION,
    MESSAGES_BY_VERSION,
    PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
    ApiKey,
    ClosingEvent,
    ErrorResponse,
    HandshakeRequest,
    HandshakeResponse,
    Kind,
    Limit,
    Message,
    Request,
    Response,
    api_served,
    api_version_served,
    choose_protocol_version,
)


class Role(enum.Enum):
    # Members are singletons: hashed in C by identity, not by Enum's Python __hash__
    # (TRANSITIONS is looked up with four of them per frame).
    __hash__ = object.__hash__
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    __hash__ = object.__hash__
    AWAITING_HANDSHAKE = "awaiting_handshake"  # nothing sent or received yet
    HANDSHAKING = "handshaking"  # the Handshake request is in flight
    READY = "ready"  # requests and responses flow, pipelined
    CLOSED = "closed"  # closed cleanly: nothing more is sent or read
    ERROR = "error"  # the stream cannot be trusted: only close


class Direction(enum.Enum):
    __hash__ = object.__hash__
    SEND = "send"
    RECEIVE = "receive"


class Trigger(enum.Enum):
    __hash__ = object.__hash__
    HANDSHAKE_REQUEST = "Handshake request"
    HANDSHAKE_ACCEPTED = "Handshake response, error_code 0"
    HANDSHAKE_REFUSED = "Handshake response with an error"
    REQUEST = "any other request"
    RESPONSE = "any other response"
    CLOSING = "Closing event"


_C, _S = Role.CLIENT, Role.SERVER
_SEND, _RECEIVE = Direction.SEND, Direction.RECEIVE

# (role, state, direction, trigger) -> next state. Anything missing is illegal.
TRANSITIONS: dict[tuple[Role, State, Direction, Trigger], State] = {
    (_C, State.AWAITING_HANDSHAKE, _SEND, Trigger.HANDSHAKE_REQUEST): State.HANDSHAKING,
    (_C, State.AWAITING_HANDSHAKE, _RECEIVE, Trigger.CLOSING): State.CLOSED,
    (_C, State.HANDSHAKING, _RECEIVE, Trigger.HANDSHAKE_ACCEPTED): State.READY,
    (_C, State.HANDSHAKING, _RECEIVE, Trigger.HANDSHAKE_REFUSED): State.CLOSED,
    (_C, State.HANDSHAKING, _RECEIVE, Trigger.CLOSING): State.CLOSED,
    (_C, State.READY, _SEND, Trigger.REQUEST): State.READY,
    (_C, State.READY, _RECEIVE, Trigger.RESPONSE): State.READY,
    (_C, State.READY, _RECEIVE, Trigger.CLOSING): State.CLOSED,
    (_S, State.AWAITING_HANDSHAKE, _RECEIVE, Trigger.HANDSHAKE_REQUEST): State.HANDSHAKING,
    (_S, State.AWAITING_HANDSHAKE, _SEND, Trigger.CLOSING): State.CLOSED,
    (_S, State.HANDSHAKING, _SEND, Trigger.HANDSHAKE_ACCEPTED): State.READY,
    (_S, State.HANDSHAKING, _SEND, Trigger.HANDSHAKE_REFUSED): State.CLOSED,
    (_S, State.HANDSHAKING, _SEND, Trigger.CLOSING): State.CLOSED,
    (_S, State.READY, _RECEIVE, Trigger.REQUEST): State.READY,
    (_S, State.READY, _SEND, Trigger.RESPONSE): State.READY,
    (_S, State.READY, _SEND, Trigger.CLOSING): State.CLOSED,
    (_S, State.ERROR, _SEND, Trigger.CLOSING): State.CLOSED,
}


# An incomplete frame of at least this many bytes is received into one buffer of its
# exact size (allocated once, handed out as the frame: no growing, no copy at the end);
# smaller frames gather in the connection's shared receive buffer.
FRAME_PREALLOCATE_BYTES_MIN = 64 * 1024
# The largest frame a server reads before the handshake (a Handshake request is a few
# dozen bytes): a peer that has not introduced itself cannot make the server buffer more.
HANDSHAKE_FRAME_BYTES_MAX = 64 * 1024


@functools.cache
def _served_at(protocol_version: int) -> tuple[dict[tuple[int, int], type[Request]], dict[type, tuple[int, int]]]:
    """What a server's READY connection speaking `protocol_version` serves, worked out
    once per version from the same facts `_receive_request` and `_plan_server_send`
    check one by one: (api key, api version) -> the request class, for every API and
    version that exists under that protocol version, and each one's response class ->
    (api key, api version). The Handshake is left out (its exchange changes the state),
    and so is ErrorResponse (it answers any API and version): both take the general path."""
    requests: dict[tuple[int, int], type[Request]] = {}
    responses: dict[type, tuple[int, int]] = {}
    for (api_key, api_version), (request, response, _) in MESSAGES_BY_VERSION.items():
        if api_key == ApiKey.HANDSHAKE:
            continue
        if not (api_served(api_key, protocol_version) and api_version_served(api_key, api_version, protocol_version)):
            continue
        assert response.API_KEY == api_key and response.API_VERSION == api_version
        requests[(api_key, api_version)] = request
        responses[response] = (api_key, api_version)
    return requests, responses


@functools.cache
def _sent_at(protocol_version: int) -> tuple[dict[type, tuple[int, int]], dict[tuple[int, int], type[Response]]]:
    """What a client's READY connection speaking `protocol_version` sends and receives,
    from the same table as _served_at: each request class it may send -> (api key, api
    version), and (api key, api version) -> the class its response decodes as. The
    Handshake and ErrorResponse take the general path, as on the server."""
    requests, responses = _served_at(protocol_version)
    sends: dict[type, tuple[int, int]] = {}
    for layout, request in requests.items():
        assert layout == (request.API_KEY, request.API_VERSION) and request not in sends
        sends[request] = layout
    receives = {layout: response for response, layout in responses.items()}
    assert len(receives) == len(responses)
    return sends, receives


def _undecodable(kind: Kind, error: ProtocolError) -> ProtocolError:
    """A response or event from the server whose body does not decode: the stream is
    not to be trusted."""
    return ProtocolError(ErrorCode.MALFORMED_FRAME, f"undecodable {kind.name.lower()}: {error.message}")


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


# next_event(): no whole frame is buffered; feed more bytes.
NEED_DATA = _Sentinel.NEED_DATA


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The stream ended cleanly (at a frame boundary), or the connection is closed."""


@dataclass(frozen=True, slots=True)
class RejectedRequest:
    """A server-side event: a well-framed request that cannot be served as sent. It is in
    flight until answered with `send(rejected.response())`."""

    request_id: int
    api_key: int
    api_version: int
    error_code: ErrorCode
    error_message: str

    def response(self) -> ErrorResponse:
        return ErrorResponse(
            request_id=self.request_id,
            api_key=self.api_key,
            error_code=self.error_code,
            error_message=self.error_message,
        )


ConnectionEvent = Message | RejectedRequest | ConnectionClosed | _Sentinel


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    frames_received: int
    frames_sent: int
    bytes_received: int
    bytes_sent: int
    in_flight_requests: int
    buffered_bytes: int


class Connection:
    """One end of a nodi connection; see the module docstring."""

    def __init__(self, role: Role, limits: ProtocolLimits = DEFAULT_PROTOCOL_LIMITS) -> None:
        self.role = role
        self.limits = limits
        self._state = State.AWAITING_HANDSHAKE
        self._error: ProtocolError | None = None
        self._buffer = bytearray()
        self._start = 0  # bytes of _buffer already turned into events
        # The frame at the head of the stream, once next_event has seen its length
        # prefix and it is not complete: its whole size (prefix included), else 0.
        self._incomplete_bytes = 0
        # A large incomplete frame being received into a buffer of its own size, and
        # the bytes of it received so far (the bytes after it go to _buffer).
        self._frame: bytearray | None = None
        self._frame_filled = 0
        self._end_of_stream = False
        # request id -> (api key, api version) of each request sent (client) or received
        # (server) and not yet answered.
        self._in_flight: dict[int, tuple[int, int]] = {}
        self._handshake: HandshakeRequest | None = None
        self._next_request_id = 1
        self._protocol_version: int | None = None
        self.peer_limits: dict[str, int] = {}
        self._send_frame_bytes_max = limits.frame_bytes_max
        self._send_in_flight_max = limits.in_flight_requests_max
        self._frames_received = self._frames_sent = 0
        self._bytes_received = self._bytes_sent = 0
        # A server once READY: what it serves at the agreed protocol version (_served_at),
        # so that a request it serves, well framed and in sequence, and the response to
        # it take one table look-up instead of the checks one by one; None before.
        self._requests_served: dict[tuple[int, int], type[Request]] | None = None
        self._responses_served: dict[type, tuple[int, int]] | None = None
        # A client once READY: the same facts seen from its side (_sent_at), so that a
        # request the server serves, and a well-framed response to one in flight, take
        # one look-up; None before. Both pairs are derived from protocol_version, and
        # follow it when it changes (its setter): a table of an older version would send
        # what the checks refuse.
        self._requests_sent: dict[type, tuple[int, int]] | None = None
        self._responses_received: dict[tuple[int, int], type[Response]] | None = None

    # -- inspection ---------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def protocol_version(self) -> int | None:
        """The protocol version agreed in the handshake; None before."""
        return self._protocol_version

    @protocol_version.setter
    def protocol_version(self, version: int | None) -> None:
        # The fast paths' tables hold what the checks allow at one protocol version: a
        # connection READY with them keeps them for the version it speaks now, or (no
        # version) drops them and takes the checks one by one.
        self._protocol_version = version
        if self._requests_served is not None:
            self._requests_served, self._responses_served = (None, None) if version is None else _served_at(version)
        if self._requests_sent is not None:
            self._requests_sent, self._responses_received = (None, None) if version is None else _sent_at(version)

    @property
    def error(self) -> ProtocolError | None:
        """The violation that put the connection in ERROR."""
        return self._error

    @property
    def in_flight_count(self) -> int:
        return len(self._in_flight)

    def in_flight_request_ids(self) -> list[int]:
        """Requests not yet answered, oldest first: a client fails them when it closes."""
        return list(self._in_flight)

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            frames_received=self._frames_received,
            frames_sent=self._frames_sent,
            bytes_received=self._bytes_received,
            bytes_sent=self._bytes_sent,
            in_flight_requests=len(self._in_flight),
            buffered_bytes=self.buffered_bytes,
        )

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet turned into events: 0 between frames."""
        return len(self._buffer) - self._start + self._frame_filled

    @property
    def consumed_bytes(self) -> int:
        """Bytes received and turned into events so far (a frame's size is the
        difference between two readings)."""
        return self._bytes_received - self.buffered_bytes

    @property
    def incomplete_frame_bytes(self) -> int:
        """The announced size (prefix included) of the frame being received, once
        next_event has read and checked its length prefix; 0 when no frame is partly
        received or fewer than 4 of its bytes are in. A server reserves this much before
        it reads more (broker/memory_budget.py)."""
        return self._incomplete_bytes

    @property
    def frames_received(self) -> int:
        return self._frames_received

    def next_request_id(self) -> int:
        """A request id not in flight (client side): 1, 2, ... wrapping below 2**32."""
        assert len(self._in_flight) < UINT32_MAX
        while True:
            request_id = self._next_request_id
            self._next_request_id = request_id + 1 if request_id < UINT32_MAX else 1
            if request_id not in self._in_flight:
                return request_id

    # -- receiving ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes read from the peer; b"" means the peer closed its end. Call
        next_event until NEED_DATA before feeding more: at most receive_buffer_bytes_max
        bytes may wait (LIMIT_EXCEEDED, closes)."""
        if self._state in (State.CLOSED, State.ERROR):
            return
        if self._end_of_stream:
            raise self._fail(ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "data after the end of the stream"))
        if not data:
            self._end_of_stream = True
            return
        buffered = self.buffered_bytes + len(data)
        if buffered > self.limits.receive_buffer_bytes_max:
            raise self._fail(
                ProtocolError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"{buffered} bytes buffered exceed receive_buffer_bytes_max {self.limits.receive_buffer_bytes_max}",
                    closes_connection=True,
                )
            )
        self._bytes_received += len(data)
        if self._frame is None and self._incomplete_bytes >= FRAME_PREALLOCATE_BYTES_MIN:
            self._begin_large_frame()
        if self._frame is None:
            self._buffer += data
            return
        taken = min(len(self._frame) - self._frame_filled, len(data))
        with memoryview(data) as view:
            self._frame[self._frame_filled : self._frame_filled + taken] = view[:taken]
            if taken < len(view):
                self._buffer += view[taken:]  # the next frames
        self._frame_filled += taken

    def _begin_large_frame(self) -> None:
        """Move the incomplete frame at the head of _buffer (all of _buffer past
        _start) into a buffer of the frame's own size."""
        size = self._incomplete_bytes
        available = len(self._buffer) - self._start
        assert available < size
        frame = bytearray(size)
        with memoryview(self._buffer) as view:
            frame[:available] = view[self._start :]
        self._buffer = bytearray()  # lets a large shared buffer go
        self._start = 0
        self._frame = frame
        self._frame_filled = available

    def next_event(self) -> ConnectionEvent:
        """The next request (server), response or event (client), a RejectedRequest
        (server), ConnectionClosed, or NEED_DATA. Raises ProtocolError, and enters ERROR,
        when the stream can no longer be trusted; raises it again on every later call."""
        if self._state is State.ERROR:
            assert self._error is not None
            raise self._error
        if self._state is State.CLOSED:
            return ConnectionClosed()
        try:
            frame = self._next_frame()
            if frame is None:
                if not self._end_of_stream:
                    return NEED_DATA
                if self.buffered_bytes:
                    raise ProtocolError(ErrorCode.MALFORMED_FRAME, "the stream ended inside a frame")
                self._state = State.CLOSED
                return ConnectionClosed()
            self._frames_received += 1
            served = self._requests_served
            if served is not None and self._state is State.READY:
                # A server's common case: a request frame for an API and version this
                # connection serves, its id free, room in flight. Exactly what the checks
                # of decode_frame_header and _receive_request would let through, and the
                # same event (the same RejectedRequest for a body that does not decode);
                # anything else takes the general path below, which says what is wrong.
                kind, flags, api_key, api_version, request_id = read_frame_header(frame)
                cls = served.get((api_key, api_version))
                in_flight = self._in_flight
                if (
                    cls is not None
                    and kind == Kind.REQUEST
                    and not flags
                    and request_id
                    and request_id not in in_flight
                    and len(in_flight) < self.limits.in_flight_requests_max
                ):
                    in_flight[request_id] = (api_key, api_version)
                    try:
                        return decode_body_as(cls, frame, request_id, self.limits)
                    except ProtocolError as error:
                        return RejectedRequest(request_id, api_key, api_version, error.code, error.message)
            received = self._responses_received
            if received is not None and self._state is State.READY:
                # A client's common case: a response frame, no flags, answering a request
                # in flight with its API and version. Exactly what the checks of
                # decode_frame_header and _receive_from_server would let through, with
                # the same error for a body that does not decode; anything else takes
                # the general path below.
                kind, flags, api_key, api_version, request_id = read_frame_header(frame)
                layout = (api_key, api_version)
                response_class = received.get(layout)
                if (
                    response_class is not None
                    and kind == Kind.RESPONSE
                    and not flags
                    and self._in_flight.get(request_id) == layout
                ):
                    try:
                        response = decode_body_as(response_class, frame, request_id, self.limits)
                    except ProtocolError as error:
                        raise _undecodable(Kind.RESPONSE, error) from None
                    del self._in_flight[request_id]
                    return response
            header = decode_frame_header(frame)
            if self.role is Role.SERVER:
                return self._receive_request(header, frame)
            return self._receive_from_server(header, frame)
        except ProtocolError as error:
            assert error.closes_connection, error
            raise self._fail(error) from None

    def _next_frame(self) -> bytes | memoryview | None:
        """One whole frame out of the buffer, or None. The length is checked as soon as
        its 4 bytes are in, before the body is buffered. A large frame comes out as a
        read-only view of the buffer it was received into."""
        if self._frame is not None:
            if self._frame_filled < len(self._frame):
                return None
            large = memoryview(self._frame).toreadonly()
            self._frame = None
            self._frame_filled = self._incomplete_bytes = 0
            return large
        available = len(self._buffer) - self._start
        if available < FRAME_LENGTH_PREFIX_BYTES:
            self._incomplete_bytes = 0
            return None
        size = check_frame_length(read_frame_length(self._buffer, self._start), self.limits)
        if self.role is Role.SERVER and self._state is State.AWAITING_HANDSHAKE and size > HANDSHAKE_FRAME_BYTES_MAX:
            raise ProtocolError(
                ErrorCode.HANDSHAKE_REQUIRED,
                f"a first frame of {size} bytes is not a Handshake (at most {HANDSHAKE_FRAME_BYTES_MAX} bytes)",
            )
        if available < size:
            self._incomplete_bytes = size
            return None
        self._incomplete_bytes = 0
        start = self._start
        if size == available and not start:  # the buffer is this one frame: the common case
            frame = bytes(self._buffer)  # the one copy
            self._buffer.clear()
            return frame
        with memoryview(self._buffer) as view, view[start : start + size] as window:
            frame = bytes(window)  # the one copy: records are handed out as slices of it
        self._start = start + size
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        elif self._start >= 65536 and self._start * 2 >= len(self._buffer):
            del self._buffer[: self._start]
            self._start = 0
        return frame

    def _receive_request(self, header: FrameHeader, frame: bytes | memoryview) -> ConnectionEvent:
        if header.kind is not Kind.REQUEST:
            raise self._illegal(f"a client sent a {header.kind.name.lower()} frame", receiving=True)
        handshake = header.api_key == ApiKey.HANDSHAKE
        trigger = Trigger.HANDSHAKE_REQUEST if handshake else Trigger.REQUEST
        next_state = self._next_state(Direction.RECEIVE, trigger)
        if header.request_id in self._in_flight:
            raise self._illegal(f"request id {header.request_id} is already in flight", receiving=True)
        if handshake:
            try:
                if header.api_version != HANDSHAKE_API_VERSION:
                    raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"version {header.api_version}")
                request = decode_message_body(header, frame, self.limits)
            except ProtocolError as error:
                raise ProtocolError(ErrorCode.HANDSHAKE_REQUIRED, f"invalid Handshake: {error.message}") from None
            assert isinstance(request, HandshakeRequest)
            self._handshake = request
        self._in_flight[header.request_id] = (header.api_key, header.api_version)
        self._state = next_state
        if handshake:
            return request
        if len(self._in_flight) > self.limits.in_flight_requests_max:
            return self._rejected(
                header,
                ProtocolError(
                    ErrorCode.TOO_MANY_REQUESTS,
                    f"more than in_flight_requests_max {self.limits.in_flight_requests_max} in flight",
                ),
            )
        if (
            header.api_key in API_BY_KEY
            and self.protocol_version is not None
            and not api_served(header.api_key, self.protocol_version)
        ):
            return self._rejected(
                header,
                ProtocolError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"{API_BY_KEY[header.api_key].key.name} needs protocol version "
                    f"{API_BY_KEY[header.api_key].protocol_version_min}; this connection speaks "
                    f"{self.protocol_version}",
                ),
            )
        if (
            self.protocol_version is not None
            and (header.api_key, header.api_version) in MESSAGES_BY_VERSION
            and not api_version_served(header.api_key, header.api_version, self.protocol_version)
        ):
            return self._rejected(
                header,
                ProtocolError(
                    ErrorCode.UNSUPPORTED_VERSION,
                    f"{API_BY_KEY[header.api_key].key.name} version {header.api_version} needs a later protocol "
                    f"version; this connection speaks {self.protocol_version}",
                ),
            )
        try:
            return decode_message_body(header, frame, self.limits)
        except ProtocolError as error:
            return self._rejected(header, error)

    @staticmethod
    def _rejected(header: FrameHeader, error: ProtocolError) -> RejectedRequest:
        return RejectedRequest(header.request_id, header.api_key, header.api_version, error.code, error.message)

    def _receive_from_server(self, header: FrameHeader, frame: bytes | memoryview) -> Message:
        if header.kind is Kind.REQUEST:
            raise self._illegal("a server sent a request", receiving=True)
        if header.kind is Kind.EVENT:
            next_state = self._next_state(Direction.RECEIVE, Trigger.CLOSING)
            message = self._decode_from_server(header, frame)
            self._state = next_state
            return message
        expected = self._in_flight.get(header.request_id)
        if expected is None:
            raise self._illegal(f"a response to request id {header.request_id}, not in flight", receiving=True)
        if expected != (header.api_key, header.api_version):
            raise self._illegal(
                f"request {header.request_id} was API {expected[0]} version {expected[1]}, "
                f"the response says API {header.api_key} version {header.api_version}",
                receiving=True,
            )
        response = self._decode_from_server(header, frame)
        assert isinstance(response, Response)
        trigger = self._response_trigger(header.api_key, response)
        next_state = self._next_state(Direction.RECEIVE, trigger)
        if trigger is Trigger.HANDSHAKE_ACCEPTED:
            assert isinstance(response, HandshakeResponse)
            self._check_chosen_version(response.protocol_version)
            self._adopt_server_limits(response)
            self._requests_sent, self._responses_received = _sent_at(response.protocol_version)
        del self._in_flight[header.request_id]
        self._state = next_state
        return response

    def _decode_from_server(self, header: FrameHeader, frame: bytes | memoryview) -> Message:
        try:
            return decode_message_body(header, frame, self.limits)
        except ProtocolError as error:
            raise _undecodable(header.kind, error) from None

    def _check_chosen_version(self, version: int) -> None:
        assert self._handshake is not None
        low = max(self._handshake.protocol_version_min, PROTOCOL_VERSION_MIN)
        high = min(self._handshake.protocol_version_max, PROTOCOL_VERSION_MAX)
        if not low <= version <= high:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {version} chosen, outside {low}..{high}",
                closes_connection=True,
            )
        self.protocol_version = version

    def _adopt_server_limits(self, response: HandshakeResponse) -> None:
        self.peer_limits = {limit.name: limit.value for limit in response.limits}
        frame_bytes_max = self.peer_limits.get("frame_bytes_max")
        if frame_bytes_max is not None and frame_bytes_max > 0:
            self._send_frame_bytes_max = min(self._send_frame_bytes_max, frame_bytes_max)
        in_flight_max = self.peer_limits.get("in_flight_requests_max")
        if in_flight_max is not None and in_flight_max > 0:
            self._send_in_flight_max = min(self._send_in_flight_max, in_flight_max)

    # -- sending --------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """The frame for `message`, to write as is. See the module docstring for what
        raises."""
        return self._send(message, None)

    def send_header(self, message: Message, records_bytes: int) -> bytes:
        """The frame for `message` up to and including its records length; write it, then
        exactly `records_bytes` bytes of batches (sendfile from a segment, or a
        producer's buffers), with nothing in between. The message's own records are
        ignored."""
        if not isinstance(records_bytes, int) or not 0 <= records_bytes <= UINT32_MAX:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"records_bytes {records_bytes!r} is not a uint32")
        return self._send(message, records_bytes)

    def send_request(self, message: Request, records_bytes: int | None = None) -> tuple[int, bytes]:
        """A client's request under the next free request id (next_request_id; the
        message's own request_id is ignored): (that id, the frame). With `records_bytes`,
        the frame up to its records length, as send_header. Raises as send does."""
        if records_bytes is not None and (not isinstance(records_bytes, int) or not 0 <= records_bytes <= UINT32_MAX):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"records_bytes {records_bytes!r} is not a uint32")
        request_id = self.next_request_id()
        sends = self._requests_sent
        if sends is not None and self._state is State.READY:
            # The common case: a request the server serves, with room in flight (what
            # _plan_client_send checks one by one; its id is free by construction).
            layout = sends.get(type(message))
            if layout is not None and len(self._in_flight) < self._send_in_flight_max:
                data = encode_message(
                    message,
                    layout[1],
                    records_bytes=records_bytes,
                    frame_bytes_max=self._send_frame_bytes_max,
                    request_id=request_id,
                )
                self._in_flight[request_id] = layout
                self._frames_sent += 1
                self._bytes_sent += len(data) + (records_bytes or 0)
                return request_id, data
        return request_id, self._send(dataclasses.replace(message, request_id=request_id), records_bytes)

    def _send(self, message: Message, records_bytes: int | None) -> bytes:
        responses = self._responses_served
        if responses is not None and self._state is State.READY:
            # A server's common case: the response class of a request in flight, of its
            # API and version (what _plan_server_send checks one by one; anything else
            # takes the general path below, which says what is wrong).
            answers = responses.get(type(message))
            if answers is not None and self._in_flight.get(message.request_id) == answers:
                data = encode_message(
                    message, answers[1], records_bytes=records_bytes, frame_bytes_max=self._send_frame_bytes_max
                )
                del self._in_flight[message.request_id]
                self._frames_sent += 1
                self._bytes_sent += len(data) + (records_bytes or 0)
                return data
        if self.role is Role.CLIENT:
            plan = self._plan_client_send(message)
        else:
            plan = self._plan_server_send(message)
        next_state, version = plan
        data = encode_message(message, version, records_bytes=records_bytes, frame_bytes_max=self._send_frame_bytes_max)
        # Nothing can fail from here on: commit the transition.
        if message.KIND is Kind.REQUEST:
            self._in_flight[message.request_id] = (frame_api_key(message), version)
            if isinstance(message, HandshakeRequest):
                self._handshake = message
        elif message.KIND is Kind.RESPONSE:
            del self._in_flight[message.request_id]
            if next_state is State.READY and isinstance(message, HandshakeResponse):
                self.protocol_version = message.protocol_version
                self._requests_served, self._responses_served = _served_at(message.protocol_version)
        self._state = next_state
        self._frames_sent += 1
        self._bytes_sent += len(data) + (records_bytes or 0)
        return data

    def _plan_client_send(self, message: Message) -> tuple[State, int]:
        if not isinstance(message, Request):
            raise self._illegal(f"a client cannot send a {type(message).__name__}", receiving=False)
        handshake = isinstance(message, HandshakeRequest)
        trigger = Trigger.HANDSHAKE_REQUEST if handshake else Trigger.REQUEST
        next_state = self._next_state(Direction.SEND, trigger, receiving=False)
        if message.request_id in self._in_flight:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, f"request id {message.request_id} is in flight")
        if len(self._in_flight) >= self._send_in_flight_max:
            raise ProtocolError(
                ErrorCode.TOO_MANY_REQUESTS,
                f"{len(self._in_flight)} requests in flight, the limit is {self._send_in_flight_max}",
            )
        if handshake:
            return next_state, HANDSHAKE_API_VERSION
        assert self.protocol_version is not None
        if not api_served(message.API_KEY, self.protocol_version):
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"{type(message).__name__} needs protocol version "
                f"{API_BY_KEY[message.API_KEY].protocol_version_min}; the server speaks {self.protocol_version}",
            )
        if not api_version_served(message.API_KEY, message.API_VERSION, self.protocol_version):
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"{type(message).__name__} (version {message.API_VERSION}) needs a later protocol version; "
                f"the server speaks {self.protocol_version}",
            )
        return next_state, message.API_VERSION

    def _plan_server_send(self, message: Message) -> tuple[State, int]:
        if isinstance(message, ClosingEvent):
            return self._next_state(Direction.SEND, Trigger.CLOSING, receiving=False), EVENT_VERSION
        if not isinstance(message, Response):
            raise self._illegal(f"a server cannot send a {type(message).__name__}", receiving=False)
        expected = self._in_flight.get(message.request_id)
        if expected is None:
            raise self._illegal(f"a response to request id {message.request_id}, not in flight", receiving=False)
        api_key, version = expected
        if frame_api_key(message) != api_key:
            raise self._illegal(
                f"a {type(message).__name__} answering request {message.request_id} of API {api_key}",
                receiving=False,
            )
        if not isinstance(message, ErrorResponse) and message.API_VERSION != version:
            raise self._illegal(
                f"a {type(message).__name__} (version {message.API_VERSION}) answering request "
                f"{message.request_id} of version {version}",
                receiving=False,
            )
        trigger = self._response_trigger(api_key, message)
        next_state = self._next_state(Direction.SEND, trigger, receiving=False)
        if trigger is Trigger.HANDSHAKE_ACCEPTED:
            assert isinstance(message, HandshakeResponse)
            assert self._handshake is not None
            low = max(self._handshake.protocol_version_min, PROTOCOL_VERSION_MIN)
            high = min(self._handshake.protocol_version_max, PROTOCOL_VERSION_MAX)
            if not low <= message.protocol_version <= high:
                raise ProtocolError(
                    ErrorCode.INVALID_REQUEST,
                    f"protocol version {message.protocol_version} is outside {low}..{high}",
                )
        return next_state, version

    @staticmethod
    def _response_trigger(api_key: int, response: Response) -> Trigger:
        if api_key != ApiKey.HANDSHAKE:
            return Trigger.RESPONSE
        if isinstance(response, HandshakeResponse) and response.error_code == ErrorCode.NONE:
            return Trigger.HANDSHAKE_ACCEPTED
        return Trigger.HANDSHAKE_REFUSED

    # -- state ----------------------------------------------------------------

    def _next_state(self, direction: Direction, trigger: Trigger, *, receiving: bool = True) -> State:
        next_state = TRANSITIONS.get((self.role, self._state, direction, trigger))
        if next_state is None:
            raise self._illegal(
                f"{self.role.value} cannot {direction.value} a {trigger.value} in state {self._state.name}",
                receiving=receiving,
            )
        return next_state

    def _illegal(self, message: str, *, receiving: bool) -> ProtocolError:
        """The error for a message out of sequence. Receiving one while awaiting a
        handshake means the peer never sent one. Sending one puts the connection in
        ERROR here; receiving one does in next_event."""
        code = ErrorCode.UNEXPECTED_MESSAGE
        if receiving and self.role is Role.SERVER and self._state is State.AWAITING_HANDSHAKE:
            code = ErrorCode.HANDSHAKE_REQUIRED
        error = ProtocolError(code, message)
        if not receiving:
            self._fail(error)
        return error

    def _fail(self, error: ProtocolError) -> ProtocolError:
        if self._state is not State.CLOSED:
            self._state = State.ERROR
            self._error = error
        return error

    def close(self) -> None:
        """Closed from any state; later sends raise, next_event returns ConnectionClosed."""
        self._state = State.CLOSED
        self._buffer = bytearray()
        self._start = 0
        self._frame = None
        self._frame_filled = self._incomplete_bytes = 0


def handshake_response(
    request: HandshakeRequest,
    *,
    server_id: str,
    limits: dict[str, int],
) -> HandshakeResponse:
    """A server's answer to `request`: the highest common protocol version and its
    limits, or UNSUPPORTED_VERSION (which closes the connection) when there is none."""
    version = choose_protocol_version(request.protocol_version_min, request.protocol_version_max)
    if version is None:
        return HandshakeResponse(
            request_id=request.request_id,
            error_code=ErrorCode.UNSUPPORTED_VERSION,
            error_message=(
                f"server speaks protocol versions {PROTOCOL_VERSION_MIN}..{PROTOCOL_VERSION_MAX}, "
                f"client {request.protocol_version_min}..{request.protocol_version_max}"
            ),
            server_id=server_id,
        )
    return HandshakeResponse(
        request_id=request.request_id,
        protocol_version=version,
        server_id=server_id,
        limits=[Limit(name=name, value=value) for name, value in sorted(limits.items())],
    )


__all__ = _messages.__all__ + [
    "CONNECTION_CLOSING_CODES",
    "ERROR_DESCRIPTIONS",
    "FRAME_HEADER_BYTES",
    "FRAME_OVERHEAD_BYTES",
    "FRAME_PREALLOCATE_BYTES_MIN",
    "HANDSHAKE_FRAME_BYTES_MAX",
    "NEED_DATA",
    "TRANSITIONS",
    "Connection",
    "ConnectionClosed",
    "ConnectionEvent",
    "ConnectionStatistics",
    "Direction",
    "ErrorCode",
    "FrameHeader",
    "ProtocolError",
    "ProtocolLimits",
    "DEFAULT_PROTOCOL_LIMITS",
    "RejectedRequest",
    "Role",
    "State",
    "Trigger",
    "decode_message",
    "encode_message",
    "handshake_response",
]
