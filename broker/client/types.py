"""What the Python client hands to and takes from its users: messages, topic and group
descriptions, and the small pure helpers behind them (address parsing, value and header
normalisation, the key partitioner, start positions).

Values, keys and header values may be given as bytes (any bytes-like) or str (encoded
as UTF-8); they always come back as bytes. Header keys are str. A value may be None (a
null value, e.g. a tombstone on a compacted topic).
"""

from __future__ import annotations

import datetime as _datetime
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import xxhash

from nodi.storage.errors import NodiError
from nodi.storage.records import NewRecord, build_batch
from nodi.storage.topic_settings import TOPIC_SETTINGS

from ..protocol import messages as m
from ..protocol.errors import ErrorCode
from ..protocol.headers import expires_at_ms as _expires_at_ms
from .errors import records_error

DEFAULT_ADDRESS = "127.0.0.1:6634"
ADDRESS_ENVIRONMENT_VARIABLE = "NODI_SERVER"
DEFAULT_PORT = 6634

# retention_ms / retention_bytes: keep for ever. create_topic takes it, describe_topic
# shows it (on the wire it is -2; -1 there means "server default", which the client
# spells None).
UNLIMITED = -1

Bytesish = bytes | bytearray | memoryview | str
HeadersInput = Mapping[str, Bytesish | None] | Iterable[tuple[str, Bytesish | None]] | None
Headers = tuple[tuple[str, bytes | None], ...]
# Where a consumer without a committed offset starts: "earliest", "latest", an offset,
# or a time (the first message at or after it).
StartSpec = str | int | _datetime.datetime

_EPOCH = _datetime.datetime(1970, 1, 1, tzinfo=_datetime.UTC)


def backoff_s(attempt: int, base_ms: int, max_ms: int) -> float:
    """Seconds to wait before retry `attempt` (0 first): base doubled per attempt, capped
    at max, with +-50% jitter."""
    delay_ms = min(max_ms, base_ms * (2 ** min(attempt, 30)))
    return delay_ms * random.uniform(0.5, 1.5) / 1000


def resolve_address(address: str | None) -> tuple[str, int]:
    """(host, port) from "host:port", "host" (default port), or, when None, the
    NODI_SERVER environment variable, else 127.0.0.1:6634. IPv6 hosts go in brackets:
    "[::1]:6634"."""
    if address is None:
        address = os.environ.get(ADDRESS_ENVIRONMENT_VARIABLE) or DEFAULT_ADDRESS
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, _, port_text = address.partition(":")
    else:
        host, port_text = address, ""
    if not host:
        raise ValueError(f"no host in server address {address!r}")
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in server address {address!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range in server address {address!r}")
    return host, port


def to_bytes(value: Bytesish | None, what: str = "value") -> bytes | None:
    """bytes for bytes-like or str (UTF-8); None stays None."""
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes, str or None, not {type(value).__name__}")


def to_headers(headers: HeadersInput) -> Headers:
    """A tuple of (str, bytes-or-None) pairs from a dict or an iterable of pairs."""
    if not headers:
        return ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    out = []
    for pair in items:
        key, value = pair
        if not isinstance(key, str):
            raise TypeError(f"header keys must be str, not {type(key).__name__}")
        out.append((key, to_bytes(value, f"header {key!r}")))
    return tuple(out)


def timestamp_ms_of(when: int | _datetime.datetime) -> int:
    """Milliseconds since the Unix epoch. A naive datetime is taken as local time."""
    if isinstance(when, _datetime.datetime):
        if when.tzinfo is None:
            when = when.astimezone()
        return (when - _EPOCH) // _datetime.timedelta(milliseconds=1)
    if isinstance(when, int) and not isinstance(when, bool):
        return when
    raise TypeError(f"a timestamp must be an int (ms) or a datetime, not {type(when).__name__}")


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition of a keyed message: xxh32(key, seed 0) modulo the partition count.
    Stable across processes, machines and releases (a documented part of the protocol
    contract): the same key always lands on the same partition while the count is the
    same."""
    return xxhash.xxh32_intdigest(key) % partitions


def check_start(start: StartSpec) -> StartSpec:
    if isinstance(start, str):
        if start not in ("earliest", "latest"):
            raise ValueError(f'start must be "earliest", "latest", an offset or a datetime, not {start!r}')
    elif isinstance(start, bool) or not isinstance(start, (int, _datetime.datetime)):
        raise TypeError(f"start must be a str, an int offset or a datetime, not {type(start).__name__}")
    elif isinstance(start, int) and start < 0:
        raise ValueError(f"start offset {start} is negative")
    return start


# ---------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Message:
    """One message read from a partition. `timestamp` is in ms since the Unix epoch (the
    producer's clock, or the log-append time); `datetime` is the same as an aware UTC
    datetime."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    # The topic's default TTL (0: none) when the message was read; keyword-only, so
    # subclasses keep their positional fields.
    default_ttl_ms: int = field(default=0, kw_only=True, repr=False, compare=False)

    @property
    def datetime(self) -> _datetime.datetime:
        return _EPOCH + _datetime.timedelta(milliseconds=self.timestamp)

    @property
    def expires_at_ms(self) -> int | None:
        """ms since the epoch when the message expires: its timestamp plus its TTL
        header, else plus the topic's default TTL; None when it never expires."""
        return _expires_at_ms(self.timestamp, self.headers, self.default_ttl_ms)

    @property
    def expires_at(self) -> _datetime.datetime | None:
        """expires_at_ms as an aware UTC datetime, or None."""
        expires = self.expires_at_ms
        return None if expires is None else _EPOCH + _datetime.timedelta(milliseconds=expires)

    def expired(self, now_ms: int | None = None) -> bool:
        """True once expires_at has passed (by this machine's clock, or `now_ms`)."""
        expires = self.expires_at_ms
        if expires is None:
            return False
        return (time.time() * 1000 if now_ms is None else now_ms) >= expires

    def header(self, name: str) -> bytes | None:
        """The last value of header `name`, or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found


# The fetch decoder makes one Message per record. The frozen dataclass __init__ sets each
# field through object.__setattr__; setting the slots through their descriptors does the
# same in about half the time. Message's fields are checked here so a new one is not
# left unset by new_message.
_MESSAGE_FIELDS = ("topic", "partition", "offset", "timestamp", "key", "value", "headers", "default_ttl_ms")
assert tuple(f.name for f in fields(Message)) == _MESSAGE_FIELDS, "update new_message for Message's fields"
(_set_topic, _set_partition, _set_offset, _set_timestamp, _set_key, _set_value, _set_headers, _set_default_ttl_ms) = (
    Message.__dict__[name].__set__ for name in _MESSAGE_FIELDS
)
_new_object = object.__new__


def new_message(
    topic: str,
    partition: int,
    offset: int,
    timestamp: int,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    default_ttl_ms: int = 0,
) -> Message:
    """Message(topic, partition, offset, timestamp, key, value, headers,
    default_ttl_ms=...), for the decoder's per-record loop."""
    message = _new_object(Message)
    _set_topic(message, topic)
    _set_partition(message, partition)
    _set_offset(message, offset)
    _set_timestamp(message, timestamp)
    _set_key(message, key)
    _set_value(message, value)
    _set_headers(message, headers)
    _set_default_ttl_ms(message, default_ttl_ms)
    return message


class TopicSummary(NamedTuple):
    name: str
    partitions: int


@dataclass(frozen=True, slots=True)
class TopicSettings:
    """A topic's settings in force. retention_ms / retention_bytes are UNLIMITED (-1)
    when there is no limit of that kind."""

    partitions: int
    retention_ms: int
    retention_bytes: int
    cleanup_policy: str
    fsync_policy: str
    fsync_interval_ms: int
    segment_bytes: int
    segment_ms: int
    ttl_ms: int = 0  # default message TTL; 0: messages do not expire
    dedup_window_ms: int = 120_000  # publish dedup window of idempotency keys; 0: off
    delete_retention_ms: int = 86_400_000  # compacted topics: how long a tombstone stays
    # "create": the producer's timestamps stand; "log-append": each record's timestamp is
    # the broker's time of the append
    timestamp_type: str = "create"


@dataclass(frozen=True, slots=True)
class PartitionDescription:
    partition: int
    log_start_offset: int  # the first offset still stored
    log_end_offset: int  # the offset the next message gets
    high_watermark: int  # end of the durable prefix: what consumers may read
    size: int  # bytes of segment files; -1 while the partition is not open (after a start, until used)
    segments: int  # -1 likewise


@dataclass(frozen=True, slots=True)
class TopicDescription:
    name: str
    settings: TopicSettings
    partitions: tuple[PartitionDescription, ...]

    @property
    def partition_count(self) -> int:
        return len(self.partitions)


class GroupSummary(NamedTuple):
    group: str
    state: str  # "empty", "rebalancing" or "stable"
    members: int


@dataclass(frozen=True, slots=True)
class GroupMemberDescription:
    member_id: str
    client_id: str
    session_timeout_ms: int
    assignments: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed_offset: int | None  # None: nothing committed
    high_watermark: int

    @property
    def lag(self) -> int | None:
        """Messages between the committed offset and the high watermark; None when
        nothing is committed."""
        if self.committed_offset is None:
            return None
        return max(0, self.high_watermark - self.committed_offset)


@dataclass(frozen=True, slots=True)
class GroupHandovers:
    """A group's rebalances and partition handovers since the broker started
    (DescribeHandovers; the broker forgets them when the group loses its last member)."""

    rebalances: int
    partitions_moved: int  # from one member to another
    handovers: int  # of those, revoked from a live owner (the others' owner was gone)
    handovers_forced: int  # of the handovers, taken at the owner's session timeout, not released
    handover_ms_total: int
    handover_ms_max: int
    partitions_revoking: int
    messages_redelivered: int  # handled by a member past its commit when it let go

    @property
    def handover_ms_mean(self) -> float | None:
        return self.handover_ms_total / self.handovers if self.handovers else None


@dataclass(frozen=True, slots=True)
class GroupDescription:
    group: str
    state: str
    generation: int
    members: tuple[GroupMemberDescription, ...]
    lags: tuple[PartitionLag, ...]


@dataclass(frozen=True, slots=True)
class DamagedPartition:
    """A partition the server found damaged at start (docs/operations.md): read up to
    `offset`, appends refused until repaired. `path` is relative to the data directory."""

    topic: str
    partition: int
    path: str
    position: int
    offset: int
    reason: str


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """What SERVER_STATUS answers (see docs/protocol.md)."""

    server_id: str
    version: str
    started_time_ms: int
    uptime_ms: int
    data_dir: str
    connections_open: int
    connections_accepted: int
    connections_refused: int
    disk_free_bytes: int | None  # None: the server could not tell
    disk_total_bytes: int | None
    read_only_partitions: dict[str, list[int]] = field(default_factory=dict)
    # None while the metadata store commits; else its last failed commit (it retries).
    metadata_store_error: str | None = None
    metadata_failed_commits: int = 0
    damaged_partitions: tuple[DamagedPartition, ...] = ()


def settings_to_wire(arguments: Mapping[str, object]) -> m.TopicSettings:
    """The wire struct of create_topic's settings (`arguments`: a value per topic setting,
    by name): None takes the server's default (-1, or null for a string), UNLIMITED is
    no limit for a setting that has one (-2); another negative is a ValueError."""
    values: dict[str, object] = {}
    for setting in TOPIC_SETTINGS:
        value = arguments[setting.name]
        if setting.type is int:
            if value is None:
                value = m.CONFIG_DEFAULT
            elif setting.unlimited and value == UNLIMITED:
                value = m.RETENTION_UNLIMITED
            elif value < 0:  # type: ignore[operator]
                raise ValueError(f"a topic setting of {value} is negative")
        values[setting.name] = value
    return m.TopicSettings(**values)  # type: ignore[arg-type]  # a value per declared setting, in its wire type


def settings_from_wire(settings: m.TopicSettings) -> TopicSettings:
    """TopicSettings from a messages.TopicSettings the server answered with."""
    values: dict[str, object] = {}
    for setting in TOPIC_SETTINGS:
        value = getattr(settings, setting.name)
        if setting.type is str:
            value = value or ""
        elif setting.unlimited and value < 0:
            value = UNLIMITED
        values[setting.name] = value
    return TopicSettings(**values)  # type: ignore[arg-type]  # a value per declared setting, of its type


_ACKS = {"none": 0, "written": 1, "durable": 2}


def acks_value(acks: str | int) -> int:
    """The wire value of acks "none", "written" or "durable"."""
    if isinstance(acks, str):
        try:
            return _ACKS[acks]
        except KeyError:
            raise ValueError(f'acks must be "none", "written" or "durable", not {acks!r}') from None
    if acks in (0, 1, 2) and not isinstance(acks, bool):
        return int(acks)
    raise ValueError(f'acks must be "none", "written" or "durable", not {acks!r}')


def build_one(record: NewRecord, what: str) -> bytes:
    """One record as RecordBatch v2 bytes, or the client error saying why it cannot be
    sent (LimitExceeded: above a named limit such as record_bytes_max), before anything
    goes on the wire."""
    try:
        return build_batch([record])
    except NodiError as error:
        raise records_error(error, what) from None


__all__ = [
    "DEFAULT_ADDRESS",
    "UNLIMITED",
    "ErrorCode",
    "GroupDescription",
    "GroupHandovers",
    "GroupMemberDescription",
    "GroupSummary",
    "Message",
    "PartitionDescription",
    "PartitionLag",
    "ServerStatus",
    "DamagedPartition",
    "TopicDescription",
    "TopicSettings",
    "TopicSummary",
    "partition_for_key",
    "resolve_address",
]
