"""Every message of the wire protocol, declared once.

Each API has a request and a response dataclass whose `wire` fields, in order, are the
frame body (broker/protocol/schema.py encodes, decodes and documents them; docs/protocol.md shows
the tables). Messages are immutable and keyword-only; `request_id` is not in the body but
in the frame header (broker/protocol/frames.py). Every response begins with error_code and
error_message. The protocol checks types; what a value means (a partition that exists,
an offset in range) is for the server to check and answer with an error code.

Protocol version 1 has every API at version 1. A later version may add APIs or API
versions; Handshake stays at version 1 for ever, so any client can negotiate. Protocol
version 2 adds GroupWait and DescribeHandovers (each API names the protocol version
that brought it: `Api.protocol_version_min`); a request of an API newer than the
connection's protocol version is answered UNSUPPORTED_VERSION. Protocol version 3 adds
QueueReceiveBatches: the queue receive whose response carries the stored batches as they
are on disk plus the delivered offsets (QueueReceive, which re-encodes each delivered
record, is still answered for clients of versions 1 and 2). Protocol version 4 adds
QueueLeases, a page of a queue group's in-flight messages (the leases, the retries
waiting for their time, the dead letters being written) for the web console and
`nodi queue describe --leases`, DeleteRecords (a partition's log start offset moved
forward), and Fetch version 2 (FetchCommitRequest), a fetch that
carries a consumer group's offset commits, answered with their results (a later API
version is declared by an ApiVersion; a message class names its version in
API_VERSION, 1 unless said). Protocol version 5 adds CreateTopic and DescribeTopic
version 2, whose topic settings carry every setting (timestamp_type, for
log-append-time topics, came with it); version 1 keeps the settings it always had
(TopicSettingsV1), byte for byte.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from nodi.storage.topic_settings import TOPIC_SETTINGS

from .errors import ErrorCode
from .schema import (
    BOOL,
    INT8,
    INT16,
    INT32,
    INT64,
    NULLABLE_STRING,
    RECORDS,
    STRING,
    UINT16,
    Array,
    Enumeration,
    Magic,
    Struct,
    wire,
)

PROTOCOL_VERSION_MIN = 1
PROTOCOL_VERSION_MAX = 5
HANDSHAKE_MAGIC = b"NODI"
HANDSHAKE_API_VERSION = 1  # frozen: every server reads a version-1 Handshake

# Integer topic settings in a CreateTopic request: -1 takes the server's default.
CONFIG_DEFAULT = -1
# retention_ms / retention_bytes: keep for ever (no limit of that kind).
RETENTION_UNLIMITED = -2
# Offsets, timestamps and ids that are absent.
NO_OFFSET = -1


class Kind(enum.IntEnum):
    """What a frame carries (frame header byte 4)."""

    REQUEST = 0
    RESPONSE = 1
    EVENT = 2


class ApiKey(enum.IntEnum):
    HANDSHAKE = 0
    CREATE_TOPIC = 1
    DELETE_TOPIC = 2
    LIST_TOPICS = 3
    DESCRIBE_TOPIC = 4
    PRODUCE = 5
    FETCH = 6
    LIST_OFFSETS = 7
    JOIN_GROUP = 8
    LEAVE_GROUP = 9
    HEARTBEAT = 10
    COMMIT_OFFSETS = 11
    FETCH_OFFSETS = 12
    RESET_GROUP = 13
    INIT_PRODUCER_ID = 14
    LIST_GROUPS = 15
    DESCRIBE_GROUP = 16
    GROUP_WAIT = 17  # protocol version 2
    DESCRIBE_HANDOVERS = 18  # protocol version 2
    DELETE_RECORDS = 19  # protocol version 4
    # Operations (45-49).
    SERVER_STATUS = 45
    # Security (50-54).
    AUTHENTICATE = 50
    # Compaction (40-44).
    COMPACT_TOPIC = 40
    # Queue groups (20-39).
    QUEUE_RECEIVE = 20
    QUEUE_SETTLE = 21
    QUEUE_DESCRIBE = 22
    QUEUE_LIST = 23
    # Request-reply inboxes (broker/server/inbox_service.py).
    INBOX_OPEN = 24
    INBOX_RECEIVE = 25
    INBOX_CLOSE = 26
    REPLY = 27
    QUEUE_RECEIVE_BATCHES = 28  # protocol version 3
    QUEUE_LEASES = 29  # protocol version 4


class EventKey(enum.IntEnum):
    """Event types: frames a server sends unasked (request id 0)."""

    CLOSING = 0


class Acks(enum.IntEnum):
    NONE = 0  # answered once the request is checked, before the write
    WRITTEN = 1  # answered once written to the log (page cache)
    DURABLE = 2  # answered once fsynced (group commit)


class OffsetSpec(enum.IntEnum):
    EARLIEST = 0  # the log start offset
    LATEST = 1  # the high watermark: the next offset to be read
    TIMESTAMP = 2  # the first offset whose timestamp is >= timestamp_ms


class ResetSpec(enum.IntEnum):
    EARLIEST = 0
    LATEST = 1
    OFFSET = 2
    TIMESTAMP = 3


ERROR_CODE = Enumeration(ErrorCode, UINT16, list_values=False)


# ---------------------------------------------------------------------------
# Bases


@dataclass(frozen=True, kw_only=True, slots=True)
class Message:
    KIND: ClassVar[Kind]
    API_KEY: ClassVar[int]
    API_VERSION: ClassVar[int] = 1  # the frame header's api_version of this layout
    # In the frame header, not the body. Chosen by the client; a response echoes it.
    request_id: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Request(Message):
    KIND = Kind.REQUEST


@dataclass(frozen=True, kw_only=True, slots=True)
class Response(Message):
    KIND = Kind.RESPONSE
    error_code: ErrorCode = wire(ERROR_CODE, ErrorCode.NONE, doc="0 (none) on success; see Error codes")
    error_message: str | None = wire(NULLABLE_STRING, None, doc="detail for people; null on success")


@dataclass(frozen=True, kw_only=True, slots=True)
class ErrorResponse(Response):
    """The answer to a request that could not be decoded into its API (unknown API key,
    unsupported version, invalid fields) or that the server refused before reading it
    (too many requests). Sent with the ERROR frame flag; its body is only error_code and
    error_message, whatever the API. `api_key` comes from the frame header."""

    API_KEY = -1  # not one API: the frame header carries `api_key`
    api_key: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Event(Message):
    KIND = Kind.EVENT


@dataclass(frozen=True, kw_only=True, slots=True)
class ClosingEvent(Event):
    """The server is closing the connection and says why: after a protocol error that
    leaves the stream untrusted, at shutdown, or over a server limit. Nothing follows it."""

    API_KEY = EventKey.CLOSING
    error_code: ErrorCode = wire(ERROR_CODE, doc="why the connection closes")
    error_message: str | None = wire(NULLABLE_STRING, None)


# ---------------------------------------------------------------------------
# Nested structs


@dataclass(frozen=True, kw_only=True, slots=True)
class Limit:
    name: str = wire(STRING, doc="a limit's name, as in Limits below")
    value: int = wire(INT64)


def _with_topic_settings(cls: type, wire_version_max: int | None = None) -> type:
    """Give `cls` a wire field per topic setting (those of CreateTopic version
    `wire_version_max` and older; None: every one), in the order of their declaration
    (nodi.storage.topic_settings), before @dataclass reads its fields: an integer (-1:
    server default; -2: no limit, for a setting that has one) or a nullable string
    (null: server default)."""
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    for setting in TOPIC_SETTINGS:
        if wire_version_max is not None and setting.wire_version > wire_version_max:
            continue
        wire_type = {"int32": INT32, "int64": INT64, "string?": NULLABLE_STRING}[setting.wire_type]
        if setting.type is str:
            *others, last = (f'"{choice}"' for choice in setting.choices)
            notes = [setting.wire_note, f"{', '.join(others)} or {last}", "null: server default"]
            annotations[setting.name] = "str | None"
            default = None
        else:
            notes = [setting.wire_note, "-1: server default", "-2: unlimited" if setting.unlimited else ""]
            annotations[setting.name] = "int"
            default = CONFIG_DEFAULT
        setattr(cls, setting.name, wire(wire_type, default, doc="; ".join(note for note in notes if note)))
    cls.__annotations__ = annotations
    return cls


@dataclass(frozen=True, kw_only=True, slots=True)
@_with_topic_settings
class TopicSettings:
    """A topic's settings. In CreateTopic -1 (CONFIG_DEFAULT) or null takes the server's
    default; DescribeTopic shows the values in force."""

    if TYPE_CHECKING:  # the fields are the topic settings' (added above), typed loosely here

        def __init__(self, **settings: int | str | None) -> None: ...
        def __getattr__(self, name: str) -> Any: ...


@dataclass(frozen=True, kw_only=True, slots=True)
@functools.partial(_with_topic_settings, wire_version_max=1)
class TopicSettingsV1:
    """TopicSettings as CreateTopic and DescribeTopic version 1 carry them (protocol
    versions 1-4): the settings declared before version 2, in the same layout as
    ever. A setting added since takes the server's default in a version-1 CreateTopic
    and is left out of a version-1 answer."""

    if TYPE_CHECKING:

        def __init__(self, **settings: int | str | None) -> None: ...
        def __getattr__(self, name: str) -> Any: ...


def topic_settings_from_v1(settings: TopicSettingsV1) -> TopicSettings:
    """A version-1 struct as TopicSettings: the later settings at the server's default."""
    return TopicSettings(**{field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)})


def topic_settings_to_v1(settings: TopicSettings) -> TopicSettingsV1:
    """TopicSettings without the settings version 1 does not carry."""
    return TopicSettingsV1(
        **{field.name: getattr(settings, field.name) for field in dataclasses.fields(TopicSettingsV1)}
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class TopicSummary:
    name: str = wire(STRING)
    partitions: int = wire(INT32)


@dataclass(frozen=True, kw_only=True, slots=True)
class PartitionState:
    partition: int = wire(INT32)
    log_start_offset: int = wire(INT64, doc="first offset still stored")
    log_end_offset: int = wire(INT64, doc="offset the next batch gets")
    high_watermark: int = wire(INT64, doc="end of the durable prefix: what consumers may read")
    size_bytes: int = wire(INT64, doc="bytes of segment files; -1 while the partition is not open yet after a start")
    segments: int = wire(INT32, doc="-1 while the partition is not open yet after a start")


@dataclass(frozen=True, kw_only=True, slots=True)
class TopicPartitions:
    topic: str = wire(STRING)
    partitions: list[int] = wire(Array(INT32), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class DamagedPartition:
    topic: str = wire(STRING)
    partition: int = wire(INT32)
    path: str = wire(STRING, "", doc="the damaged segment file, relative to the data directory")
    position: int = wire(INT64, 0, doc="byte position of the first bad batch in it")
    offset: int = wire(INT64, 0, doc="the first offset not served: the partition is read up to it")
    reason: str = wire(STRING, "")


@dataclass(frozen=True, kw_only=True, slots=True)
class OffsetCommit:
    topic: str = wire(STRING)
    partition: int = wire(INT32)
    offset: int = wire(INT64, doc="the next offset the group will read")
    metadata: str | None = wire(NULLABLE_STRING, None, doc="free text stored with the offset")


@dataclass(frozen=True, kw_only=True, slots=True)
class PartitionError:
    topic: str = wire(STRING)
    partition: int = wire(INT32)
    error_code: ErrorCode = wire(ERROR_CODE, ErrorCode.NONE)


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupOffset:
    topic: str = wire(STRING)
    partition: int = wire(INT32)
    offset: int = wire(INT64, doc="committed: the next offset to read")
    metadata: str | None = wire(NULLABLE_STRING, None)
    commit_time_ms: int = wire(INT64, NO_OFFSET)


@dataclass(frozen=True, kw_only=True, slots=True)
class PartitionOffset:
    partition: int = wire(INT32)
    offset: int = wire(INT64)


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupSummary:
    group: str = wire(STRING)
    state: str = wire(STRING, doc='"empty", "rebalancing" or "stable"')
    members: int = wire(INT32)


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupMember:
    member_id: str = wire(STRING)
    client_id: str = wire(STRING, "")
    session_timeout_ms: int = wire(INT32)
    assignments: list[TopicPartitions] = wire(Array(Struct(TopicPartitions)), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupLag:
    topic: str = wire(STRING)
    partition: int = wire(INT32)
    committed_offset: int = wire(INT64, doc="-1: nothing committed")
    high_watermark: int = wire(INT64, doc="lag = high_watermark - committed_offset")


# ---------------------------------------------------------------------------
# Handshake


@dataclass(frozen=True, kw_only=True, slots=True)
class HandshakeRequest(Request):
    API_KEY = ApiKey.HANDSHAKE
    magic: bytes = wire(Magic(HANDSHAKE_MAGIC), HANDSHAKE_MAGIC, doc='"NODI"')
    protocol_version_min: int = wire(UINT16, PROTOCOL_VERSION_MIN, doc="lowest protocol version the client speaks")
    protocol_version_max: int = wire(UINT16, PROTOCOL_VERSION_MAX, doc="highest protocol version the client speaks")
    client_id: str = wire(STRING, "", doc="free text for logs and metrics")


@dataclass(frozen=True, kw_only=True, slots=True)
class HandshakeResponse(Response):
    API_KEY = ApiKey.HANDSHAKE
    protocol_version: int = wire(UINT16, 0, doc="the highest version both speak; 0 when refused")
    server_id: str = wire(STRING, "")
    limits: list[Limit] = wire(Array(Struct(Limit)), [], doc="the limits the server enforces")

    def limit(self, name: str) -> int | None:
        for limit in self.limits:
            if limit.name == name:
                return limit.value
        return None


# ---------------------------------------------------------------------------
# Security


@dataclass(frozen=True, kw_only=True, slots=True)
class AuthenticateRequest(Request):
    API_KEY = ApiKey.AUTHENTICATE
    user: str = wire(STRING, doc="the user name of the server's users file")
    # repr=False: a password never appears in a log line or an error message.
    password: str = dataclasses.field(default="", repr=False, metadata={"wire": STRING, "doc": "sent over TLS"})


@dataclass(frozen=True, kw_only=True, slots=True)
class AuthenticateResponse(Response):
    API_KEY = ApiKey.AUTHENTICATE
    principal: str = wire(STRING, "", doc="who the connection acts as; empty when refused")


# ---------------------------------------------------------------------------
# Topics


@dataclass(frozen=True, kw_only=True, slots=True)
class CreateTopicRequestV1(Request):
    API_KEY = ApiKey.CREATE_TOPIC
    name: str = wire(STRING, doc="1-249 characters of A-Z a-z 0-9 . _ -")
    settings: TopicSettingsV1 = wire(Struct(TopicSettingsV1), TopicSettingsV1())


@dataclass(frozen=True, kw_only=True, slots=True)
class CreateTopicResponseV1(Response):
    API_KEY = ApiKey.CREATE_TOPIC
    settings: TopicSettingsV1 = wire(Struct(TopicSettingsV1), TopicSettingsV1(), doc="the settings in force")


@dataclass(frozen=True, kw_only=True, slots=True)
class CreateTopicRequest(Request):
    """CreateTopic version 2 (protocol version 5): version 1 with every topic setting,
    timestamp_type too."""

    API_KEY = ApiKey.CREATE_TOPIC
    API_VERSION = 2
    name: str = wire(STRING, doc="1-249 characters of A-Z a-z 0-9 . _ -")
    settings: TopicSettings = wire(Struct(TopicSettings), TopicSettings())


@dataclass(frozen=True, kw_only=True, slots=True)
class CreateTopicResponse(Response):
    API_KEY = ApiKey.CREATE_TOPIC
    API_VERSION = 2
    settings: TopicSettings = wire(Struct(TopicSettings), TopicSettings(), doc="the settings in force")


@dataclass(frozen=True, kw_only=True, slots=True)
class DeleteTopicRequest(Request):
    API_KEY = ApiKey.DELETE_TOPIC
    name: str = wire(STRING)


@dataclass(frozen=True, kw_only=True, slots=True)
class DeleteTopicResponse(Response):
    API_KEY = ApiKey.DELETE_TOPIC


@dataclass(frozen=True, kw_only=True, slots=True)
class ListTopicsRequest(Request):
    API_KEY = ApiKey.LIST_TOPICS


@dataclass(frozen=True, kw_only=True, slots=True)
class ListTopicsResponse(Response):
    API_KEY = ApiKey.LIST_TOPICS
    topics: list[TopicSummary] = wire(Array(Struct(TopicSummary)), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class DescribeTopicRequestV1(Request):
    API_KEY = ApiKey.DESCRIBE_TOPIC
    name: str = wire(STRING)


@dataclass(frozen=True, kw_only=True, slots=True)
class DescribeTopicResponseV1(Response):
    API_KEY = ApiKey.DESCRIBE_TOPIC
    name: str = wire(STRING, "")
    settings: TopicSettingsV1 = wire(Struct(TopicSettingsV1), TopicSettingsV1())
    partitions: list[PartitionState] = wire(Array(Struct(PartitionState)), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class DescribeTopicRequest(Request):
    """DescribeTopic version 2 (protocol version 5): the same request, answered with
    every topic setting."""

    API_KEY = ApiKey.DESCRIBE_TOPIC
    API_VERSION = 2
    name: str = wire(STRING)


@dataclass(frozen=True, kw_only=True, slots=True)
class DescribeTopicResponse(Response):
    API_KEY = ApiKey.DESCRIBE_TOPIC
    API_VERSION = 2
    name: str = wire(STRING, "")
    settings: TopicSettings = wire(Struct(TopicSettings), TopicSettings())
    partitions: list[PartitionState] = wire(Array(Struct(PartitionState)), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordDeletion:
    partition: int = wire(INT32)
    offset: int = wire(INT64, doc="delete every record below it: at most the high watermark; -1: the high watermark")


@dataclass(frozen=True, kw_only=True, slots=True)
class PartitionRecordDeletion:
    partition: int = wire(INT32)
    error_code: ErrorCode = wire(ERROR_CODE, ErrorCode.NONE, doc="this partition's outcome")
    error_message: str | None = wire(NULLABLE_STRING, None)
    log_start_offset: int = wire(INT64, NO_OFFSET, doc="the log start offset now (the low watermark)")


@dataclass(frozen=True, kw_only=True, slots=True)
class DeleteRecordsRequest(Request):
    API_KEY = ApiKey.DELETE_RECORDS
    topic: str = wire(STRING)
    partitions: list[RecordDeletion] = wire(Array(Struct(RecordDeletion)), [], doc="each partition at most once")
    timeout_ms: int = wire(INT32, 30_000, doc="longest wait for the fsyncs and file removals")


@dataclass(frozen=True, kw_only=True, slots=True)
class DeleteRecordsResponse(Response):
    API_KEY = ApiKey.DELETE_RECORDS
    partitions: list[PartitionRecordDeletion] = wire(Array(Struct(PartitionRecordDeletion)), [])


# ---------------------------------------------------------------------------
# Produce and consume


@dataclass(frozen=True, kw_only=True, slots=True)
class DuplicateRecord:
    """A produced record whose idempotency key the topic saw within its dedup window."""

    index: int = wire(INT32, doc="the record's place in the request, from 0, across its batches")
    partition: int = wire(INT32, doc="where the original is")
    offset: int = wire(INT64, doc="the original's offset")


@dataclass(frozen=True, kw_only=True, slots=True)
class ProduceRequest(Request):
    API_KEY = ApiKey.PRODUCE
    topic: str = wire(STRING)
    partition: int = wire(INT32)
    acks: Acks = wire(Enumeration(Acks, INT8), Acks.DURABLE)
    timeout_ms: int = wire(INT32, 30_000, doc="longest wait for the acks")
    records: bytes | memoryview = wire(RECORDS, doc="one or more whole RecordBatch v2, back to back")


@dataclass(frozen=True, kw_only=True, slots=True)
class ProduceResponse(Response):
    API_KEY = ApiKey.PRODUCE
    base_offset: int = wire(INT64, NO_OFFSET, doc="offset of the first record; -1 with acks none or an error")
    last_offset: int = wire(INT64, NO_OFFSET, doc="offset of the last record")
    log_append_time_ms: int = wire(
        INT64,
        NO_OFFSET,
        doc="server clock at the append; on a log-append-time topic the timestamp every record got "
        "(an idempotent retry: the original's)",
    )
    log_start_offset: int = wire(INT64, NO_OFFSET)
    duplicates: list[DuplicateRecord] = wire(
        Array(Struct(DuplicateRecord)),
        [],
        doc="publish dedup: records whose idempotency key was seen; when any, nothing was written",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchRequest(Request):
    API_KEY = ApiKey.FETCH
    topic: str = wire(STRING)
    partition: int = wire(INT32)
    offset: int = wire(INT64, doc="first offset wanted; the first batch may start before it")
    bytes_max: int = wire(INT32, 1 << 20, doc="budget for the records; at least one whole batch is sent")
    wait_ms: int = wire(INT32, 0, doc="long poll: wait up to this long for min_bytes")
    min_bytes: int = wire(INT32, 1, doc="answer as soon as this many bytes are readable")


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchResponse(Response):
    API_KEY = ApiKey.FETCH
    high_watermark: int = wire(INT64, NO_OFFSET)
    log_start_offset: int = wire(INT64, NO_OFFSET)
    records: bytes | memoryview = wire(RECORDS, b"", doc="whole batches as stored (sendfile from the segment)")


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchCommitRequest(FetchRequest):
    """Fetch version 2 (protocol version 4): a fetch carrying the group's offset commits,
    so a consumer's commit rides on its next fetch instead of a CommitOffsets of its own.
    The commits are applied first, as CommitOffsets applies them (same fencing, same
    LMDB transaction per loop tick), then the fetch is served; the answer goes out only
    once the commits are durable."""

    API_VERSION = 2
    group: str = wire(STRING, doc="the group whose offsets are committed")
    generation: int = wire(INT32, -1, doc="-1 for a consumer outside group membership")
    member_id: str = wire(STRING, "")
    commits: list[OffsetCommit] = wire(
        Array(Struct(OffsetCommit)),
        [],
        doc="any partitions of the group, not only the one fetched; at least one (else the commits are answered INVALID_REQUEST)",
    )
    commit_wait: bool = wire(
        BOOL,
        False,
        doc="true: answer as soon as the commits are durable, with what is readable then (the fetch does not "
        "long-poll); false: the fetch waits as wait_ms says and its answer carries the commits' results",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchCommitResponse(Response):
    """error_code and error_message are the fetch's; the commits have their own."""

    API_KEY = ApiKey.FETCH
    API_VERSION = 2
    high_watermark: int = wire(INT64, NO_OFFSET)
    log_start_offset: int = wire(INT64, NO_OFFSET)
    commit_error_code: ErrorCode = wire(
        ERROR_CODE,
        ErrorCode.NONE,
        doc="the commits as a whole: not none when they were not made durable (disk full, metadata "
        "unavailable, an invalid group); they may still be written later, as a CommitOffsets answered so",
    )
    commit_error_message: str | None = wire(NULLABLE_STRING, None)
    commit_results: list[PartitionError] = wire(
        Array(Struct(PartitionError)), [], doc="one per commit, in the request's order"
    )
    records: bytes | memoryview = wire(RECORDS, b"", doc="whole batches as stored (sendfile from the segment)")


@dataclass(frozen=True, kw_only=True, slots=True)
class ListOffsetsRequest(Request):
    API_KEY = ApiKey.LIST_OFFSETS
    topic: str = wire(STRING)
    partition: int = wire(INT32)
    spec: OffsetSpec = wire(Enumeration(OffsetSpec, INT8), OffsetSpec.LATEST)
    timestamp_ms: int = wire(INT64, NO_OFFSET, doc="with spec timestamp")


@dataclass(frozen=True, kw_only=True, slots=True)
class ListOffsetsResponse(Response):
    API_KEY = ApiKey.LIST_OFFSETS
    offset: int = wire(INT64, NO_OFFSET, doc="the high watermark when no record is that recent")
    timestamp_ms: int = wire(INT64, NO_OFFSET, doc="timestamp of the record found; -1 for earliest, latest")


# ---------------------------------------------------------------------------
# Consumer groups (stream mode)


@dataclass(frozen=True, kw_only=True, slots=True)
class JoinGroupRequest(Request):
    API_KEY = ApiKey.JOIN_GROUP
    group: str = wire(STRING)
    member_id: str = wire(STRING, "", doc="empty on a first join; the server assigns one")
    topics: list[str] = wire(Array(STRING), [], doc="topics the member consumes")
    session_timeout_ms: int = wire(INT32, 10_000, doc="no heartbeat for this long removes the member")


@dataclass(frozen=True, kw_only=True, slots=True)
class JoinGroupResponse(Response):
    API_KEY = ApiKey.JOIN_GROUP
    generation: int = wire(INT32, -1, doc="bumped by every rebalance")
    member_id: str = wire(STRING, "")
    heartbeat_interval_ms: int = wire(INT32, 0)
    assignments: list[TopicPartitions] = wire(Array(Struct(TopicPartitions)), [], doc="this member's partitions")


@dataclass(frozen=True, kw_only=True, slots=True)
class LeaveGroupRequest(Request):
    API_KEY = ApiKey.LEAVE_GROUP
    group: str = wire(STRING)
    member_id: str = wire(STRING)


@dataclass(frozen=True, kw_only=True, slots=True)
class LeaveGroupResponse(Response):
    API_KEY = ApiKey.LEAVE_GROUP


@dataclass(frozen=True, kw_only=True, slots=True)
class HeartbeatRequest(Request):
    API_KEY = ApiKey.HEARTBEAT
    group: str = wire(STRING)
    member_id: str = wire(STRING)
    generation: int = wire(INT32)


@dataclass(frozen=True, kw_only=True, slots=True)
class HeartbeatResponse(Response):
    API_KEY = ApiKey.HEARTBEAT
    generation: int = wire(INT32, -1, doc="REBALANCE_IN_PROGRESS when it moved on: join again")
    assignments: list[TopicPartitions] = wire(Array(Struct(TopicPartitions)), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class CommitOffsetsRequest(Request):
    API_KEY = ApiKey.COMMIT_OFFSETS
    group: str = wire(STRING)
    generation: int = wire(INT32, -1, doc="-1 for a consumer outside group membership")
    member_id: str = wire(STRING, "")
    offsets: list[OffsetCommit] = wire(Array(Struct(OffsetCommit)), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class CommitOffsetsResponse(Response):
    API_KEY = ApiKey.COMMIT_OFFSETS
    results: list[PartitionError] = wire(Array(Struct(PartitionError)), [], doc="one per offset committed")


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchOffsetsRequest(Request):
    API_KEY = ApiKey.FETCH_OFFSETS
    group: str = wire(STRING)
    topics: list[str] = wire(Array(STRING), [], doc="empty: every topic")


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchOffsetsResponse(Response):
    API_KEY = ApiKey.FETCH_OFFSETS
    offsets: list[GroupOffset] = wire(Array(Struct(GroupOffset)), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class ResetGroupRequest(Request):
    API_KEY = ApiKey.RESET_GROUP
    group: str = wire(STRING, doc="must have no members (GROUP_NOT_EMPTY)")
    topic: str = wire(STRING)
    partitions: list[int] = wire(Array(INT32), [], doc="empty: every partition")
    spec: ResetSpec = wire(Enumeration(ResetSpec, INT8))
    offset: int = wire(INT64, NO_OFFSET, doc="with spec offset")
    timestamp_ms: int = wire(INT64, NO_OFFSET, doc="with spec timestamp")


@dataclass(frozen=True, kw_only=True, slots=True)
class ResetGroupResponse(Response):
    API_KEY = ApiKey.RESET_GROUP
    offsets: list[PartitionOffset] = wire(Array(Struct(PartitionOffset)), [], doc="the offsets now committed")


@dataclass(frozen=True, kw_only=True, slots=True)
class ListGroupsRequest(Request):
    API_KEY = ApiKey.LIST_GROUPS


@dataclass(frozen=True, kw_only=True, slots=True)
class ListGroupsResponse(Response):
    API_KEY = ApiKey.LIST_GROUPS
    groups: list[GroupSummary] = wire(Array(Struct(GroupSummary)), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class DescribeGroupRequest(Request):
    API_KEY = ApiKey.DESCRIBE_GROUP
    group: str = wire(STRING)


@dataclass(frozen=True, kw_only=True, slots=True)
class DescribeGroupResponse(Response):
    API_KEY = ApiKey.DESCRIBE_GROUP
    group: str = wire(STRING, "")
    state: str = wire(STRING, "", doc='"empty", "rebalancing" or "stable"')
    generation: int = wire(INT32, -1)
    members: list[GroupMember] = wire(Array(Struct(GroupMember)), [])
    lags: list[GroupLag] = wire(Array(Struct(GroupLag)), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupWaitRequest(Request):
    API_KEY = ApiKey.GROUP_WAIT
    group: str = wire(STRING)
    member_id: str = wire(STRING)
    generation: int = wire(INT32, doc="the generation whose assignment the member has adopted")
    wait_ms: int = wire(INT32, 0, doc="answer at once when the generation moves past it, else after this long")
    messages_redelivered: int = wire(
        INT64, 0, doc="handled from partitions the member let go, past what it committed for them"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupWaitResponse(Response):
    API_KEY = ApiKey.GROUP_WAIT
    generation: int = wire(INT32, -1, doc="REBALANCE_IN_PROGRESS when it moved on: adopt it")
    assignments: list[TopicPartitions] = wire(
        Array(Struct(TopicPartitions)), [], doc="the partitions the member may read in that generation"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class DescribeHandoversRequest(Request):
    API_KEY = ApiKey.DESCRIBE_HANDOVERS
    group: str = wire(STRING)


@dataclass(frozen=True, kw_only=True, slots=True)
class DescribeHandoversResponse(Response):
    API_KEY = ApiKey.DESCRIBE_HANDOVERS
    rebalances: int = wire(INT64, 0, doc="generation bumps since the broker started")
    partitions_moved: int = wire(INT64, 0, doc="partitions that went from one member to another")
    handovers: int = wire(INT64, 0, doc="of those, revoked from a live owner (the others' owner was gone)")
    handovers_forced: int = wire(INT64, 0, doc="of the handovers, taken at the owner's session timeout")
    handover_ms_total: int = wire(INT64, 0, doc="revocation to release, summed over the handovers")
    handover_ms_max: int = wire(INT64, 0)
    partitions_revoking: int = wire(INT32, 0, doc="revoked now, not yet released")
    messages_redelivered: int = wire(INT64, 0, doc="as reported by members in GroupWait")


# ---------------------------------------------------------------------------
# Idempotent producer


@dataclass(frozen=True, kw_only=True, slots=True)
class InitProducerIdRequest(Request):
    API_KEY = ApiKey.INIT_PRODUCER_ID
    producer_id: int = wire(INT64, -1, doc="-1 for a new id; a known id to bump its epoch")
    producer_epoch: int = wire(INT16, -1)


@dataclass(frozen=True, kw_only=True, slots=True)
class InitProducerIdResponse(Response):
    API_KEY = ApiKey.INIT_PRODUCER_ID
    producer_id: int = wire(INT64, -1, doc="goes in every batch header, with the epoch and a sequence")
    producer_epoch: int = wire(INT16, -1)


# ---------------------------------------------------------------------------
# Operations


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerStatusRequest(Request):
    API_KEY = ApiKey.SERVER_STATUS


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerStatusResponse(Response):
    API_KEY = ApiKey.SERVER_STATUS
    server_id: str = wire(STRING, "", doc="this server run's id (as in the handshake)")
    version: str = wire(STRING, "", doc="the nodi package version")
    started_time_ms: int = wire(INT64, -1, doc="wall clock when the server started serving")
    uptime_ms: int = wire(INT64, 0)
    data_dir: str = wire(
        STRING, "", doc="absolute path of the data directory; empty unless the connection comes from loopback"
    )
    connections_open: int = wire(INT32, 0)
    connections_accepted: int = wire(INT64, 0, doc="since start")
    connections_refused: int = wire(INT64, 0, doc="since start: over connections_max or during shutdown")
    disk_free_bytes: int = wire(INT64, -1, doc="free bytes of the data directory's file system")
    disk_total_bytes: int = wire(INT64, -1)
    read_only_partitions: list[TopicPartitions] = wire(
        Array(Struct(TopicPartitions)), [], doc="partitions refusing appends after an I/O error"
    )
    metadata_store_error: str | None = wire(
        NULLABLE_STRING, None, doc="null while the metadata store commits; else its last failed commit (it retries)"
    )
    metadata_failed_commits: int = wire(INT64, 0, doc="metadata store commits that failed since start")
    damaged_partitions: list[DamagedPartition] = wire(
        Array(Struct(DamagedPartition)),
        [],
        doc="partitions found damaged at start below the recovery point: read up to the damage, appends refused",
    )


# ---------------------------------------------------------------------------
# Queue groups (broker/server/queues.py; served by broker/server/queue_service.py)


class BackoffKind(enum.IntEnum):
    DEFAULT = 0  # as stored for the group, or the server's default for a new group
    DELAYS = 1  # delays_ms, the last one repeated
    EXPONENTIAL = 2  # base_ms * (multiplier_percent/100)**(n-1), at most max_ms, + jitter


class ExpiredAction(enum.IntEnum):
    DEFAULT = 0  # as stored for the group, or drop for a new group
    DROP = 1  # an expired message is done, counted
    DEAD_LETTER = 2  # it is dead-lettered with reason expired


class SettleAction(enum.IntEnum):
    ACK = 0  # done
    NACK = 1  # deliver again after delay_ms (-1: the group's backoff); text: the error
    IN_PROGRESS = 2  # start the lease again
    REJECT = 3  # dead-letter it now; text: the reason


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueBackoff:
    kind: BackoffKind = wire(Enumeration(BackoffKind, INT8), BackoffKind.DEFAULT)
    delays_ms: list[int] = wire(Array(INT64), [], doc="with kind delays")
    base_ms: int = wire(INT64, 1_000, doc="with kind exponential, as are the next three")
    multiplier_percent: int = wire(INT32, 200, doc="200: each retry waits twice as long")
    max_ms: int = wire(INT64, 60_000)
    jitter_percent: int = wire(INT16, 10, doc="adds up to this share of the delay, at random")


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueGroupSettings:
    """A queue group's settings, taken at its first receive and stored. -1 or null (and
    backoff kind default) means: as stored, or the default for a new group. A later
    receive that names another value fails with QUEUE_SETTINGS_MISMATCH."""

    ack_wait_ms: int = wire(INT64, CONFIG_DEFAULT, doc="lease of one delivery; default 30000")
    max_deliveries: int = wire(INT32, CONFIG_DEFAULT, doc="then dead-lettered; default 5")
    backoff: QueueBackoff = wire(Struct(QueueBackoff), QueueBackoff(), doc="for a nack without a delay")
    dead_letter_topic: str | None = wire(NULLABLE_STRING, None, doc='default "<topic>.dlq"')
    expired: ExpiredAction = wire(
        Enumeration(ExpiredAction, INT8),
        ExpiredAction.DEFAULT,
        doc="a message whose TTL passed before delivery: dropped or dead-lettered",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueDelivery:
    partition: int = wire(INT32)
    offset: int = wire(INT64)
    delivery_count: int = wire(INT32, doc="1 on the first delivery; name it when settling")
    lease_deadline_ms: int = wire(INT64, doc="wall clock; unsettled by then, it is delivered again")
    count: int = wire(
        INT32, 1, doc="a run: offsets offset .. offset + count - 1, each with this delivery count and deadline"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Settlement:
    partition: int = wire(INT32)
    offset: int = wire(INT64)
    delivery_count: int = wire(INT32, doc="as received: a later delivery makes this one stale")
    action: SettleAction = wire(Enumeration(SettleAction, INT8))
    delay_ms: int = wire(INT64, CONFIG_DEFAULT, doc="nack: -1 uses the group's backoff")
    text: str | None = wire(NULLABLE_STRING, None, doc="nack: error text; reject: reason")
    count: int = wire(
        INT32,
        1,
        doc="a run: the same settle of offset .. offset + count - 1, each at "
        "delivery_count (at most queue window_messages_max)",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class SettleResult:
    partition: int = wire(INT32)
    offset: int = wire(INT64)
    error_code: ErrorCode = wire(ERROR_CODE, ErrorCode.NONE)
    lease_deadline_ms: int = wire(INT64, NO_OFFSET, doc="in progress: the new deadline")
    count: int = wire(INT32, 1, doc="a run: offset .. offset + count - 1 had this outcome")


@dataclass(frozen=True, kw_only=True, slots=True)
class QueuePartitionState:
    partition: int = wire(INT32)
    ack_floor: int = wire(INT64, doc="every offset below is done")
    next_offset: int = wire(INT64, doc="the first offset never delivered")
    pending: int = wire(INT32, doc="in the window and not done")
    leased: int = wire(INT32)
    dead_letters_pending: int = wire(INT32, doc="waiting for their dead-letter append")


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueReceiveRequest(Request):
    API_KEY = ApiKey.QUEUE_RECEIVE
    group: str = wire(STRING)
    topic: str = wire(STRING)
    settings: QueueGroupSettings = wire(Struct(QueueGroupSettings), QueueGroupSettings())
    messages_max: int = wire(INT32, 1, doc="at most this many messages (queue receive_messages_max)")
    wait_ms: int = wire(INT32, 0, doc="long poll: wait up to this long for one message")


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueReceiveResponse(Response):
    API_KEY = ApiKey.QUEUE_RECEIVE
    deliveries: list[QueueDelivery] = wire(
        Array(Struct(QueueDelivery)), [], doc="runs of offsets; their counts add up to the records"
    )
    records: bytes | memoryview = wire(
        RECORDS, b"", doc="one RecordBatch v2: the i-th record is the i-th offset of the runs, in order"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueReceiveBatchesRequest(Request):
    API_KEY = ApiKey.QUEUE_RECEIVE_BATCHES
    group: str = wire(STRING)
    topic: str = wire(STRING)
    settings: QueueGroupSettings = wire(Struct(QueueGroupSettings), QueueGroupSettings())
    messages_max: int = wire(INT32, 1, doc="at most this many messages (queue receive_messages_max)")
    wait_ms: int = wire(INT32, 0, doc="long poll: wait up to this long for one message")


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueBatchSpan:
    partition: int = wire(INT32)
    records_bytes: int = wire(INT32, doc="the next this many bytes of records are whole batches of this partition")


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueReceiveBatchesResponse(Response):
    API_KEY = ApiKey.QUEUE_RECEIVE_BATCHES
    deliveries: list[QueueDelivery] = wire(
        Array(Struct(QueueDelivery)), [], doc="runs of offsets: the messages delivered, and only these"
    )
    spans: list[QueueBatchSpan] = wire(
        Array(Struct(QueueBatchSpan)), [], doc="cut records into each partition's batches, in order"
    )
    records: bytes | memoryview = wire(
        RECORDS,
        b"",
        doc="RecordBatch v2 batches holding every delivered offset, most as stored (they may hold "
        "records not delivered: the receiver keeps the records whose partition and offset a run names)",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueSettleRequest(Request):
    API_KEY = ApiKey.QUEUE_SETTLE
    group: str = wire(STRING)
    topic: str = wire(STRING)
    settlements: list[Settlement] = wire(Array(Struct(Settlement)), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueSettleResponse(Response):
    API_KEY = ApiKey.QUEUE_SETTLE
    results: list[SettleResult] = wire(
        Array(Struct(SettleResult)), [], doc="runs of outcomes covering each settlement's offsets, in order"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueDescribeRequest(Request):
    API_KEY = ApiKey.QUEUE_DESCRIBE
    group: str = wire(STRING)
    topic: str = wire(STRING)


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueDescribeResponse(Response):
    API_KEY = ApiKey.QUEUE_DESCRIBE
    settings: QueueGroupSettings = wire(Struct(QueueGroupSettings), QueueGroupSettings(), doc="in force")
    dead_letter_topic: str = wire(STRING, "")
    partitions: list[QueuePartitionState] = wire(Array(Struct(QueuePartitionState)), [])
    delivered: int = wire(INT64, 0, doc="since the server started, as are the counts below")
    redelivered: int = wire(INT64, 0)
    acked: int = wire(INT64, 0)
    nacked: int = wire(INT64, 0)
    expired_leases: int = wire(INT64, 0)
    dead_lettered: int = wire(INT64, 0)
    expired: int = wire(INT64, 0, doc="TTL passed before delivery (dropped or dead-lettered)")


class LeaseState(enum.IntEnum):
    """Where an in-flight message of a queue group is (broker/server/queues.py)."""

    LEASED = 0  # delivered; its lease runs until lease_deadline_ms
    WAITING = 1  # to be delivered again at not_before_ms (a nack's or an expired lease's retry)
    DEAD = 2  # to be dead-lettered: the broker appends it to the dead-letter topic


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueLease:
    partition: int = wire(INT32)
    offset: int = wire(INT64)
    state: LeaseState = wire(Enumeration(LeaseState, INT8))
    delivery_count: int = wire(INT32, doc="deliveries so far")
    lease_deadline_ms: int = wire(INT64, NO_OFFSET, doc="LEASED: when the lease runs out; else -1")
    not_before_ms: int = wire(INT64, NO_OFFSET, doc="WAITING: when it may be delivered again (0: now); else -1")
    last_delivery_ms: int = wire(INT64, NO_OFFSET, doc="-1: never delivered")
    last_error: str = wire(STRING, "", doc="the last nack's error text, or the dead-letter reason")


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueLeasesRequest(Request):
    API_KEY = ApiKey.QUEUE_LEASES
    group: str = wire(STRING)
    topic: str = wire(STRING)
    partition: int = wire(INT32, -1, doc="-1: every partition")
    after_partition: int = wire(INT32, -1, doc="paging: list what comes after (after_partition, after_offset)")
    after_offset: int = wire(INT64, NO_OFFSET)
    leases_max: int = wire(INT32, 100, doc="at most this many (the server caps it at queue_leases_listed_max)")


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueLeasesResponse(Response):
    API_KEY = ApiKey.QUEUE_LEASES
    leases: list[QueueLease] = wire(
        Array(Struct(QueueLease)), [], doc="by partition, then offset: in-flight messages (not done, delivered once)"
    )
    more: bool = wire(BOOL, False, doc="more follow the last one listed")


# ---------------------------------------------------------------------------
# Compaction (storage/compaction.py)


@dataclass(frozen=True, kw_only=True, slots=True)
class PartitionCompaction:
    """What one compaction run did to one partition."""

    partition: int = wire(INT32)
    passes: int = wire(INT32, doc="more than 1 when the key map filled up")
    segments_rewritten: int = wire(INT32)
    bytes_read: int = wire(INT64)
    bytes_written: int = wire(INT64)
    bytes_reclaimed: int = wire(INT64, doc="segment bytes before minus after")
    records_removed: int = wire(INT64, doc="superseded records and expired tombstones")
    tombstones_removed: int = wire(INT64)
    duration_ms: int = wire(INT64)


@dataclass(frozen=True, kw_only=True, slots=True)
class CompactTopicRequest(Request):
    API_KEY = ApiKey.COMPACT_TOPIC
    name: str = wire(STRING, doc="a topic with cleanup policy compact or compact,delete")
    timeout_ms: int = wire(INT32, 600_000, doc="longest wait, including for a run already in progress")


@dataclass(frozen=True, kw_only=True, slots=True)
class CompactTopicResponse(Response):
    API_KEY = ApiKey.COMPACT_TOPIC
    partitions: list[PartitionCompaction] = wire(Array(Struct(PartitionCompaction)), [])


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueGroupSummary:
    group: str = wire(STRING)
    topic: str = wire(STRING)
    dead_letter_topic: str = wire(STRING)
    pending: int = wire(INT64, 0, doc="messages in the windows not yet done, over every partition")
    leased: int = wire(INT64, 0)
    dead_letters_pending: int = wire(INT64, 0)


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueListRequest(Request):
    API_KEY = ApiKey.QUEUE_LIST
    topic: str | None = wire(NULLABLE_STRING, None, doc="null: every topic")


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueListResponse(Response):
    API_KEY = ApiKey.QUEUE_LIST
    groups: list[QueueGroupSummary] = wire(Array(Struct(QueueGroupSummary)), [], doc="by group, then topic")


# ---------------------------------------------------------------------------
# Request-reply inboxes (broker/server/inbox_service.py; the client: broker/client/request.py)


@dataclass(frozen=True, kw_only=True, slots=True)
class InboxOpenRequest(Request):
    API_KEY = ApiKey.INBOX_OPEN


@dataclass(frozen=True, kw_only=True, slots=True)
class InboxOpenResponse(Response):
    API_KEY = ApiKey.INBOX_OPEN
    inbox: str = wire(STRING, "", doc="the inbox's name: put it in a request's nodi-reply-to header")
    idle_timeout_ms: int = wire(INT32, 0, doc="an inbox not polled for this long is closed")


@dataclass(frozen=True, kw_only=True, slots=True)
class InboxReceiveRequest(Request):
    API_KEY = ApiKey.INBOX_RECEIVE
    inbox: str = wire(STRING)
    wait_ms: int = wire(INT32, 0, doc="long poll: wait up to this long for a reply")
    bytes_max: int = wire(INT32, 1 << 20, doc="budget for the replies; at least one batch is sent")


@dataclass(frozen=True, kw_only=True, slots=True)
class InboxReceiveResponse(Response):
    API_KEY = ApiKey.INBOX_RECEIVE
    records: bytes | memoryview = wire(RECORDS, b"", doc="reply batches as the responders sent them")


@dataclass(frozen=True, kw_only=True, slots=True)
class InboxCloseRequest(Request):
    API_KEY = ApiKey.INBOX_CLOSE
    inbox: str = wire(STRING)


@dataclass(frozen=True, kw_only=True, slots=True)
class InboxCloseResponse(Response):
    API_KEY = ApiKey.INBOX_CLOSE


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplyRequest(Request):
    API_KEY = ApiKey.REPLY
    inbox: str = wire(STRING, doc="a request's nodi-reply-to header")
    records: bytes | memoryview = wire(RECORDS, doc="whole RecordBatch v2; each record has a nodi-correlation-id")


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplyResponse(Response):
    API_KEY = ApiKey.REPLY
    delivered: bool = wire(BOOL, False, doc="false: the inbox is gone or full, the reply was dropped (and counted)")


# ---------------------------------------------------------------------------
# Registry


@dataclass(frozen=True, slots=True)
class ApiVersion:
    """A later version of an API: its request and response layouts and the protocol
    version that brought it. A connection of an older protocol version neither sends
    nor accepts it; the API's earlier versions stay served."""

    version: int
    request: type[Request]
    response: type[Response]
    protocol_version_min: int
    summary: str = ""


@dataclass(frozen=True, slots=True)
class Api:
    key: ApiKey
    request: type[Request]
    response: type[Response]
    version_min: int = 1
    version_max: int = 1
    summary: str = ""
    protocol_version_min: int = 1  # the protocol version that brought the API
    later_versions: tuple[ApiVersion, ...] = ()  # version_max is the last of them


APIS: tuple[Api, ...] = (
    Api(
        ApiKey.HANDSHAKE,
        HandshakeRequest,
        HandshakeResponse,
        summary="First request of every connection: checks the magic, picks the protocol version, states the server's limits.",
    ),
    Api(
        ApiKey.CREATE_TOPIC,
        CreateTopicRequestV1,
        CreateTopicResponseV1,
        version_max=2,
        summary="Create a topic.",
        later_versions=(
            ApiVersion(
                2,
                CreateTopicRequest,
                CreateTopicResponse,
                protocol_version_min=5,
                summary="Version 1 with every topic setting (timestamp_type too) in the request and the answer.",
            ),
        ),
    ),
    Api(ApiKey.DELETE_TOPIC, DeleteTopicRequest, DeleteTopicResponse, summary="Delete a topic and its data."),
    Api(ApiKey.LIST_TOPICS, ListTopicsRequest, ListTopicsResponse, summary="Every topic with its partition count."),
    Api(
        ApiKey.DESCRIBE_TOPIC,
        DescribeTopicRequestV1,
        DescribeTopicResponseV1,
        version_max=2,
        summary="A topic's settings and each partition's offsets.",
        later_versions=(
            ApiVersion(
                2,
                DescribeTopicRequest,
                DescribeTopicResponse,
                protocol_version_min=5,
                summary="Version 1 answered with every topic setting (timestamp_type too).",
            ),
        ),
    ),
    Api(
        ApiKey.PRODUCE,
        ProduceRequest,
        ProduceResponse,
        summary="Append batches to one partition. All are checked before any is written (header, CRC and every "
        "record's framing: see Produce checks); they get consecutive offsets.",
    ),
    Api(
        ApiKey.FETCH,
        FetchRequest,
        FetchResponse,
        version_max=2,
        summary="Whole stored batches from an offset, up to bytes_max, waiting up to wait_ms for min_bytes.",
        later_versions=(
            ApiVersion(
                2,
                FetchCommitRequest,
                FetchCommitResponse,
                protocol_version_min=4,
                summary="Version 1 plus a consumer group's offset commits riding on the fetch (CommitOffsets' "
                "rules: fencing by generation, one LMDB transaction per loop tick). Answered once the commits "
                "are durable; with commit_wait at once then, else when the fetch would answer.",
            ),
        ),
    ),
    Api(
        ApiKey.LIST_OFFSETS,
        ListOffsetsRequest,
        ListOffsetsResponse,
        summary="The earliest or latest offset of a partition, or the first at or after a time.",
    ),
    Api(
        ApiKey.JOIN_GROUP,
        JoinGroupRequest,
        JoinGroupResponse,
        summary="Join a consumer group (a rebalance); get a member id, the generation and this member's partitions.",
    ),
    Api(ApiKey.LEAVE_GROUP, LeaveGroupRequest, LeaveGroupResponse, summary="Leave a group (a rebalance)."),
    Api(
        ApiKey.HEARTBEAT, HeartbeatRequest, HeartbeatResponse, summary="Keep a membership alive; learn of a rebalance."
    ),
    Api(
        ApiKey.COMMIT_OFFSETS,
        CommitOffsetsRequest,
        CommitOffsetsResponse,
        summary="Store the group's next offset per partition.",
    ),
    Api(ApiKey.FETCH_OFFSETS, FetchOffsetsRequest, FetchOffsetsResponse, summary="The group's committed offsets."),
    Api(
        ApiKey.RESET_GROUP,
        ResetGroupRequest,
        ResetGroupResponse,
        summary="Move an empty group's offsets to earliest, latest, an offset or a time (replay).",
    ),
    Api(
        ApiKey.INIT_PRODUCER_ID,
        InitProducerIdRequest,
        InitProducerIdResponse,
        summary="A producer id and epoch for the idempotent producer.",
    ),
    Api(ApiKey.LIST_GROUPS, ListGroupsRequest, ListGroupsResponse, summary="Every consumer group."),
    Api(
        ApiKey.DESCRIBE_GROUP,
        DescribeGroupRequest,
        DescribeGroupResponse,
        summary="A group's members, their partitions, and its committed offsets against the high watermarks.",
    ),
    Api(
        ApiKey.DELETE_RECORDS,
        DeleteRecordsRequest,
        DeleteRecordsResponse,
        protocol_version_min=4,
        summary="Move partitions' log start offsets forward: records below are deleted for good (never served "
        "again; whole segments below are removed). Per partition: OFFSET_OUT_OF_RANGE above the high watermark, "
        "UNKNOWN_PARTITION; an offset at or below the start changes nothing. Needs admin on the topic.",
    ),
    Api(
        ApiKey.GROUP_WAIT,
        GroupWaitRequest,
        GroupWaitResponse,
        protocol_version_min=2,
        summary="A Heartbeat the server holds until the member's generation moves on (answered at once then) "
        "or wait_ms passes: how a member learns promptly that partitions are revoked or assigned.",
    ),
    Api(
        ApiKey.DESCRIBE_HANDOVERS,
        DescribeHandoversRequest,
        DescribeHandoversResponse,
        protocol_version_min=2,
        summary="A group's rebalances and partition handovers since the broker started.",
    ),
    Api(
        ApiKey.QUEUE_RECEIVE,
        QueueReceiveRequest,
        QueueReceiveResponse,
        summary="Lease up to messages_max messages of a queue group from any partition, waiting up to wait_ms for one.",
    ),
    Api(
        ApiKey.QUEUE_RECEIVE_BATCHES,
        QueueReceiveBatchesRequest,
        QueueReceiveBatchesResponse,
        protocol_version_min=3,
        summary="QueueReceive answered with the stored batches that hold the delivered offsets, sent as they "
        "are on disk (not decoded and encoded again), and the runs of delivered offsets.",
    ),
    Api(
        ApiKey.QUEUE_SETTLE,
        QueueSettleRequest,
        QueueSettleResponse,
        summary="Ack, nack, extend or reject many deliveries of a queue group; answered once recorded durably.",
    ),
    Api(
        ApiKey.QUEUE_DESCRIBE,
        QueueDescribeRequest,
        QueueDescribeResponse,
        summary="A queue group's settings and each partition's ack floor and window.",
    ),
    Api(
        ApiKey.QUEUE_LEASES,
        QueueLeasesRequest,
        QueueLeasesResponse,
        protocol_version_min=4,
        summary="A page of a queue group's in-flight messages: each lease with its delivery count and deadline, "
        "each retry waiting for its time, each dead letter being written; by partition and offset.",
    ),
    Api(
        ApiKey.QUEUE_LIST,
        QueueListRequest,
        QueueListResponse,
        summary="Every queue group (of one topic, or of all) with its dead-letter topic and window totals.",
    ),
    Api(
        ApiKey.INBOX_OPEN,
        InboxOpenRequest,
        InboxOpenResponse,
        summary="Open an in-memory inbox for replies (request-reply); the broker names it.",
    ),
    Api(
        ApiKey.INBOX_RECEIVE,
        InboxReceiveRequest,
        InboxReceiveResponse,
        summary="Take the replies waiting in an inbox, waiting up to wait_ms for one.",
    ),
    Api(
        ApiKey.INBOX_CLOSE,
        InboxCloseRequest,
        InboxCloseResponse,
        summary="Close an inbox; later replies to it are dropped.",
    ),
    Api(
        ApiKey.REPLY,
        ReplyRequest,
        ReplyResponse,
        summary="Put reply batches in a requester's inbox (memory only); dropped and counted when it is gone.",
    ),
    Api(
        ApiKey.SERVER_STATUS,
        ServerStatusRequest,
        ServerStatusResponse,
        summary="Server-level facts for `nodi status`: version, uptime, data directory, connections, disk space.",
    ),
    Api(
        ApiKey.AUTHENTICATE,
        AuthenticateRequest,
        AuthenticateResponse,
        summary="Second request of a connection to a server with a users file: user and password (over TLS). "
        "Refused: AUTHENTICATION_FAILED and the connection closes. Until it succeeds every other request "
        "closes the connection with AUTHENTICATION_REQUIRED.",
    ),
    Api(
        ApiKey.COMPACT_TOPIC,
        CompactTopicRequest,
        CompactTopicResponse,
        summary="Seal each partition's active segment, then compact every partition of a compacted topic now.",
    ),
)
API_BY_KEY: dict[int, Api] = {api.key: api for api in APIS}
# (api key, version) -> its request and response layouts, and the protocol version that
# brought that version.
MESSAGES_BY_VERSION: dict[tuple[int, int], tuple[type[Request], type[Response], int]] = {
    **{(api.key, 1): (api.request, api.response, api.protocol_version_min) for api in APIS},
    **{
        (api.key, later.version): (later.request, later.response, later.protocol_version_min)
        for api in APIS
        for later in api.later_versions
    },
}
# A request class -> the response class that answers it (an error too).
RESPONSE_OF: dict[type[Request], type[Response]] = {
    request: response for request, response, _ in MESSAGES_BY_VERSION.values()
}
EVENTS: dict[int, type[Event]] = {EventKey.CLOSING: ClosingEvent}
EVENT_VERSION = 1

assert set(API_BY_KEY) == set(ApiKey)
assert all(api.request.API_KEY == api.key == api.response.API_KEY for api in APIS)
assert API_BY_KEY[ApiKey.HANDSHAKE].version_min == HANDSHAKE_API_VERSION
assert all(
    request.API_VERSION == response.API_VERSION == version and request.API_KEY == key
    for (key, version), (request, response, _) in MESSAGES_BY_VERSION.items()
)
assert all(api.version_max == max([1, *(later.version for later in api.later_versions)]) for api in APIS)


def choose_protocol_version(client_min: int, client_max: int) -> int | None:
    """The highest protocol version both sides speak, or None."""
    version = min(client_max, PROTOCOL_VERSION_MAX)
    return version if version >= max(client_min, PROTOCOL_VERSION_MIN) else None


def api_version_served(api_key: int, version: int, protocol_version: int) -> bool:
    """Whether version `version` of `api_key` exists under `protocol_version` (APIs and
    API versions added later do not)."""
    found = MESSAGES_BY_VERSION.get((api_key, version))
    return found is not None and found[2] <= protocol_version


def api_served(api_key: int, protocol_version: int) -> bool:
    """Whether `api_key` exists under `protocol_version` (APIs added later do not)."""
    return API_BY_KEY[api_key].protocol_version_min <= protocol_version


__all__ = [
    "PROTOCOL_VERSION_MIN",
    "PROTOCOL_VERSION_MAX",
    "HANDSHAKE_MAGIC",
    "HANDSHAKE_API_VERSION",
    "CONFIG_DEFAULT",
    "RETENTION_UNLIMITED",
    "NO_OFFSET",
    "Kind",
    "ApiKey",
    "EventKey",
    "Acks",
    "OffsetSpec",
    "ResetSpec",
    "Message",
    "Request",
    "Response",
    "ErrorResponse",
    "Event",
    "ClosingEvent",
    "Limit",
    "TopicSettings",
    "TopicSettingsV1",
    "topic_settings_from_v1",
    "topic_settings_to_v1",
    "TopicSummary",
    "PartitionState",
    "TopicPartitions",
    "OffsetCommit",
    "PartitionError",
    "GroupOffset",
    "PartitionOffset",
    "GroupSummary",
    "GroupMember",
    "GroupLag",
    "HandshakeRequest",
    "HandshakeResponse",
    "CreateTopicRequest",
    "CreateTopicRequestV1",
    "CreateTopicResponseV1",
    "CreateTopicResponse",
    "DeleteTopicRequest",
    "DeleteTopicResponse",
    "ListTopicsRequest",
    "ListTopicsResponse",
    "DescribeTopicRequest",
    "DescribeTopicResponse",
    "DescribeTopicRequestV1",
    "DescribeTopicResponseV1",
    "ProduceRequest",
    "ProduceResponse",
    "FetchRequest",
    "FetchResponse",
    "FetchCommitRequest",
    "FetchCommitResponse",
    "ListOffsetsRequest",
    "ListOffsetsResponse",
    "JoinGroupRequest",
    "JoinGroupResponse",
    "LeaveGroupRequest",
    "LeaveGroupResponse",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "CommitOffsetsRequest",
    "CommitOffsetsResponse",
    "FetchOffsetsRequest",
    "FetchOffsetsResponse",
    "ResetGroupRequest",
    "ResetGroupResponse",
    "ListGroupsRequest",
    "ListGroupsResponse",
    "DescribeGroupRequest",
    "DescribeGroupResponse",
    "GroupWaitRequest",
    "GroupWaitResponse",
    "DescribeHandoversRequest",
    "DescribeHandoversResponse",
    "api_served",
    "InitProducerIdRequest",
    "InitProducerIdResponse",
    "ServerStatusRequest",
    "ServerStatusResponse",
    "DuplicateRecord",
    "BackoffKind",
    "ExpiredAction",
    "SettleAction",
    "QueueBackoff",
    "QueueGroupSettings",
    "QueueDelivery",
    "Settlement",
    "SettleResult",
    "QueuePartitionState",
    "QueueReceiveRequest",
    "QueueReceiveResponse",
    "QueueReceiveBatchesRequest",
    "QueueReceiveBatchesResponse",
    "QueueBatchSpan",
    "QueueSettleRequest",
    "QueueSettleResponse",
    "QueueDescribeRequest",
    "QueueDescribeResponse",
    "LeaseState",
    "QueueLease",
    "QueueLeasesRequest",
    "QueueLeasesResponse",
    "QueueGroupSummary",
    "QueueListRequest",
    "QueueListResponse",
    "InboxOpenRequest",
    "InboxOpenResponse",
    "InboxReceiveRequest",
    "InboxReceiveResponse",
    "InboxCloseRequest",
    "InboxCloseResponse",
    "ReplyRequest",
    "ReplyResponse",
    "Api",
    "APIS",
    "PartitionCompaction",
    "CompactTopicRequest",
    "RecordDeletion",
    "PartitionRecordDeletion",
    "DeleteRecordsRequest",
    "DeleteRecordsResponse",
    "CompactTopicResponse",
    "API_BY_KEY",
    "ApiVersion",
    "MESSAGES_BY_VERSION",
    "RESPONSE_OF",
    "EVENTS",
    "EVENT_VERSION",
    "choose_protocol_version",
    "api_version_served",
]
