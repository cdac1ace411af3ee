"""Typed error codes of the wire protocol, and the exception that carries one.

Every response starts with an error code (uint16) and a message. Two kinds of failure:

- The byte stream can no longer be trusted (a bad length prefix, an oversize frame, a
  malformed frame header, a first frame that is not a handshake, a message the connection
  state does not allow). The connection goes to ERROR; a server sends a Closing event with
  the code and closes. `ProtocolError.closes_connection` is True.
- A well-framed request the server cannot serve (unknown API, unsupported version,
  invalid or over-limit fields, any operating condition). The server answers it with an
  error response and the connection carries on.
"""

from __future__ import annotations

import enum

from nodi.storage.errors import NodiError


class ErrorCode(enum.IntEnum):
    NONE = 0
    # The protocol itself (1-19).
    UNKNOWN_API = 1
    UNSUPPORTED_VERSION = 2
    MALFORMED_FRAME = 3
    FRAME_TOO_LARGE = 4
    HANDSHAKE_REQUIRED = 5
    UNEXPECTED_MESSAGE = 6
    INVALID_REQUEST = 7
    LIMIT_EXCEEDED = 8
    TOO_MANY_REQUESTS = 9
    # Topics and logs (20-39).
    UNKNOWN_TOPIC = 20
    TOPIC_EXISTS = 21
    UNKNOWN_PARTITION = 22
    INVALID_CONFIG = 23
    OFFSET_OUT_OF_RANGE = 24
    INVALID_RECORDS = 25
    CORRUPT_DATA = 26
    NOT_DURABLE = 27
    TIMEOUT = 28
    READ_ONLY_LOG = 29
    DISK_FULL = 30
    PARTITION_NOT_READY = 31
    # Consumer groups (40-59).
    UNKNOWN_GROUP = 40
    GROUP_NOT_EMPTY = 41
    REBALANCE_IN_PROGRESS = 42
    UNKNOWN_MEMBER = 43
    ILLEGAL_GENERATION = 44
    # Idempotent producers (60-79).
    UNKNOWN_PRODUCER_ID = 60
    INVALID_PRODUCER_EPOCH = 61
    DUPLICATE_SEQUENCE = 62
    OUT_OF_ORDER_SEQUENCE = 63
    # The server (80-99).
    SERVER_SHUTTING_DOWN = 80
    INTERNAL = 81
    METADATA_UNAVAILABLE = 82
    # Queue groups (100-119).
    QUEUE_SETTINGS_MISMATCH = 100
    UNKNOWN_DELIVERY = 101
    STALE_DELIVERY = 102
    DELIVERY_SETTLED = 103
    UNKNOWN_QUEUE_GROUP = 104
    UNKNOWN_INBOX = 105
    # Publish dedup (140-149).
    PARTLY_DUPLICATE = 140
    # Compaction (120-129).
    KEY_REQUIRED = 120
    # Security (150-159).
    AUTHENTICATION_REQUIRED = 150
    AUTHENTICATION_FAILED = 151
    NOT_AUTHORIZED = 152


# The codes after which the byte stream can no longer be trusted: the connection closes.
CONNECTION_CLOSING_CODES = frozenset(
    {
        ErrorCode.MALFORMED_FRAME,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.HANDSHAKE_REQUIRED,
        ErrorCode.UNEXPECTED_MESSAGE,
        ErrorCode.AUTHENTICATION_REQUIRED,
        ErrorCode.AUTHENTICATION_FAILED,
    }
)

# One line per code for docs/protocol.md: (closes the connection?, meaning).
ERROR_DESCRIPTIONS: dict[ErrorCode, tuple[str, str]] = {
    ErrorCode.NONE: ("no", "success"),
    ErrorCode.UNKNOWN_API: ("no", "a well-framed request with an API key the server does not know"),
    ErrorCode.UNSUPPORTED_VERSION: (
        "no; yes in a refused handshake",
        "an API version the server does not serve, or no protocol version in the client's range",
    ),
    ErrorCode.MALFORMED_FRAME: (
        "yes",
        "a length prefix below the header size, an unknown frame kind or flag, request id 0 "
        "on a request, a frame cut short by the end of the stream, an undecodable response",
    ),
    ErrorCode.FRAME_TOO_LARGE: ("yes", "a length prefix above frame_bytes_max"),
    ErrorCode.HANDSHAKE_REQUIRED: ("yes", "a first frame that is not a valid Handshake request"),
    ErrorCode.UNEXPECTED_MESSAGE: (
        "yes",
        "a message the connection's state or the peer's role does not allow: a second "
        "handshake, a request id already in flight, a response to no request",
    ),
    ErrorCode.INVALID_REQUEST: (
        "no",
        "a field outside its type: truncated body, bad UTF-8, null where not allowed, "
        "an unknown enum value, trailing bytes",
    ),
    ErrorCode.LIMIT_EXCEEDED: (
        "no; yes in a Closing event",
        "a field or the connection over a named limit (array_items_max, batch_bytes_max, connections_max)",
    ),
    ErrorCode.TOO_MANY_REQUESTS: ("no", "more than in_flight_requests_max requests in flight"),
    ErrorCode.UNKNOWN_TOPIC: ("no", "no topic by that name"),
    ErrorCode.TOPIC_EXISTS: ("no", "CreateTopic for a name already taken"),
    ErrorCode.UNKNOWN_PARTITION: ("no", "a partition number the topic does not have"),
    ErrorCode.INVALID_CONFIG: ("no", "a topic setting or name outside its allowed range"),
    ErrorCode.OFFSET_OUT_OF_RANGE: ("no", "an offset below the log start or above the log end"),
    ErrorCode.INVALID_RECORDS: (
        "no",
        "a batch that fails its checks (length, magic, CRC, codec, count) or whose records do not decode "
        "(the message names the batch's byte position, the record and the field: see Produce checks); nothing "
        "of the request was written",
    ),
    ErrorCode.CORRUPT_DATA: ("no", "stored data failed its checks; it is never served"),
    ErrorCode.NOT_DURABLE: (
        "no",
        "written but the fsync did not complete in time: the batch may or may not survive a crash",
    ),
    ErrorCode.TIMEOUT: (
        "no; yes in a Closing event",
        "the request's timeout passed before it completed; in a Closing event: the connection's "
        "handshake, frame or idle deadline passed",
    ),
    ErrorCode.READ_ONLY_LOG: ("no", "an earlier write or fsync failed; the partition refuses appends"),
    ErrorCode.DISK_FULL: (
        "no",
        "no space left; nothing of the request was written (from the metadata store: nothing committed yet, "
        "and the store retries by itself once there is room, as for METADATA_UNAVAILABLE)",
    ),
    ErrorCode.PARTITION_NOT_READY: (
        "no",
        "the partition is still being opened after a start (one not closed cleanly is recovered first): "
        "nothing of the request was done; retry in a moment (the clients do, within the call's timeout)",
    ),
    ErrorCode.UNKNOWN_GROUP: ("no", "no consumer group by that name"),
    ErrorCode.GROUP_NOT_EMPTY: ("no", "ResetGroup on a group that has members"),
    ErrorCode.REBALANCE_IN_PROGRESS: ("no", "the group's membership changed: join again"),
    ErrorCode.UNKNOWN_MEMBER: ("no", "a member id the group does not know (expired or left)"),
    ErrorCode.ILLEGAL_GENERATION: ("no", "a generation other than the group's current one"),
    ErrorCode.UNKNOWN_PRODUCER_ID: ("no", "a producer id the broker did not hand out"),
    ErrorCode.INVALID_PRODUCER_EPOCH: ("no", "a producer epoch older than the current one (fenced)"),
    ErrorCode.DUPLICATE_SEQUENCE: (
        "no",
        "the batch was written before; the response carries its original offsets: a success",
    ),
    ErrorCode.OUT_OF_ORDER_SEQUENCE: ("no", "a sequence gap: an earlier batch of this producer is missing"),
    ErrorCode.SERVER_SHUTTING_DOWN: (
        "yes, as a Closing event; no, as a response",
        "the server is stopping; retry on a new connection",
    ),
    ErrorCode.INTERNAL: ("no", "an unexpected failure while handling one request (a server bug)"),
    ErrorCode.METADATA_UNAVAILABLE: (
        "no",
        "a metadata commit failed (an I/O error) and the store is retrying by itself: nothing of the request "
        "is committed yet (a staged offset or queue-group change may be committed by the retry); retry later",
    ),
    ErrorCode.QUEUE_SETTINGS_MISMATCH: (
        "no",
        "a queue receive gave settings that differ from the ones the group was created with",
    ),
    ErrorCode.UNKNOWN_DELIVERY: ("no", "a settle of an offset never delivered to this queue group"),
    ErrorCode.STALE_DELIVERY: (
        "no",
        "a settle naming an older delivery of a message that was delivered again since",
    ),
    ErrorCode.DELIVERY_SETTLED: ("no", "a nack, in-progress or reject of a message already acked or dead-lettered"),
    ErrorCode.UNKNOWN_QUEUE_GROUP: ("no", "no queue group by that name on that topic (receive creates one)"),
    ErrorCode.UNKNOWN_INBOX: (
        "no",
        "no inbox by that name: closed, idle past inbox_idle_timeout_ms, or from before a restart",
    ),
    ErrorCode.PARTLY_DUPLICATE: (
        "no",
        "some records of a produce carry an idempotency key seen within the topic's dedup window: nothing was "
        "written; the response names the duplicates and their originals; send the others again",
    ),
    ErrorCode.KEY_REQUIRED: (
        "no",
        "a record without a key produced to a compacted topic; nothing of the request was written",
    ),
    ErrorCode.AUTHENTICATION_REQUIRED: (
        "yes",
        "a request other than Authenticate before the connection authenticated, on a server with a users file",
    ),
    ErrorCode.AUTHENTICATION_FAILED: (
        "yes",
        "an unknown user or a wrong password (the message does not say which), a second Authenticate, or "
        "connections_per_principal_max reached",
    ),
    ErrorCode.NOT_AUTHORIZED: (
        "no",
        "the connection's principal may not do this (produce, consume or admin) on this topic or group",
    ),
}
assert set(ERROR_DESCRIPTIONS) == set(ErrorCode)


class ProtocolError(NodiError):
    """A protocol violation or an unservable request, with its typed code.

    `closes_connection` is True when the byte stream can no longer be trusted; a
    ProtocolError raised by `Connection.next_event` with it set has put the connection in
    ERROR. Raised by `Connection.send` for a value outside its type or an over-limit
    frame it is False: nothing was emitted and the connection is unchanged."""

    def __init__(self, code: ErrorCode, message: str, *, closes_connection: bool | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.closes_connection = code in CONNECTION_CLOSING_CODES if closes_connection is None else closes_connection
