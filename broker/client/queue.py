"""Queue groups in the Python client: `client.queue(topic, group, ...)`.

    with Client() as client:
        with client.queue("orders", "billing", ack_wait_ms=30_000, max_deliveries=5,
                          backoff=[1_000, 5_000, 30_000]) as queue:
            for message in queue:              # or: message = queue.receive(timeout_ms=1_000)
                try:
                    handle(message.value)
                except Exception as error:
                    message.nack(error=str(error))   # again after the backoff
                else:
                    message.ack()

Any number of consumers (threads, processes, machines) may receive from one group; each
message goes to one of them at a time, leased for ack_wait_ms. Per message: ack() (done),
nack(delay_ms=None, error=None) (deliver again after delay_ms, or the group's backoff),
in_progress() (start the lease again; returns the new deadline), reject(reason) (to the
dead-letter topic now). A message not settled within its lease is delivered again; after
max_deliveries deliveries it goes to the dead-letter topic (default `<topic>.dlq`).

The delivery guarantee is one argument, `guarantee=`: "at-least-once" (the default)
acks after the handler - iterating, a message the loop body left unsettled is acked when
the loop comes back for the next one, and one whose body raised, or left with break, is
not (it is delivered again once its lease runs out: ack before breaking);
"at-most-once" acks each message on receipt, before it is handed out (a consumer that
dies while handling it loses it). For effectively-once,
wrap the queue in broker/client/idempotent.py's IdempotentConsumer. receive() never acks by
itself under at-least-once: settle what it returns.

Settling waits until the broker has recorded it durably (`wait=True`, the default)
and returns True when it counted, False when this consumer lost the race: its lease ran
out and the message was delivered again to another (STALE_DELIVERY) or finished there
(DELIVERY_SETTLED); in_progress() returns the new deadline or None. A lost race is
counted (statistics().stale_settles) and logged, not raised; `strict=True` raises it.
With `wait=False` the call returns at once and settlements go out batched in the
background; `flush()` waits for them and raises the first that failed.

Flow control: at most `max_outstanding` messages (default 1,000), and softly
`max_outstanding_bytes` of received records (each receive's record bytes, shared evenly
over the offsets it delivered and freed as each is settled), are leased to the queue
and not settled by the application (buffered or handed out; a message counts no more
once the application acked, nacked or rejected it, before the broker's answer); a
receive asks for no more than the room left and waits for room up to its timeout. A trip to the broker asks for up to `batch_max` messages within
it. Without `batch_max` the size follows the handler's pace: about PREFETCH_HORIZON_MS
(100 ms, at most half of ack_wait) of its work, measured as the time between hand-outs
that did not wait for the broker (a moving average), from PREFETCH_INITIAL (10) until
the pace is known, up to 1,000: a fast handler gets large receives, a slow one a few
messages at a time, so it never holds what others could handle meanwhile. The ones not
yet handed out are leased all the same, and close() gives them back (a nack without
delay). With `prefetch` (the default) and at-least-once the queue asks for the next
batch, without waiting on the broker, once half of the current one was handed out if the
last receive came back full (a backlog), within the room left and only while the
application settled every message it was handed before the current one; receive() then
lets the loop run once, so the request leaves while the application works through the
buffer. A settle that leaves the application holding none of what receive() handed it
asks the same way (a batch acked without waiting, then flushed: the next receive goes
out while the acks' answer is awaited).

Lease management: a task on the client's loop extends the lease of every message the
queue holds (buffered or in a handler, unsettled) with one batched in-progress settle
(runs of offsets) once the soonest has half of ack_wait left, until it was held
`max_lease_ms` (default 1 hour; 0: never extend); then it lets it go. A buffered message
whose lease ran out is never handed out: it is released instead. A message whose
iteration body raised or broke out is no longer extended (its lease runs out).

The group's settings (ack_wait_ms, max_deliveries, backoff, dead_letter_topic, and
expired: "drop" or "dead-letter" for a message whose TTL passed) are fixed by its first
receive and stored with it; None keeps what is stored (or the default for a
new group); naming a different value raises QueueSettingsMismatch. Delivery is
at-least-once: a message can be delivered again (a lease ran out, a consumer or the
broker crashed), so handlers should tolerate repeats.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from nodi.storage.errors import NodiError
from nodi.storage.records import decode_records, iter_batches

from ..protocol import messages as m
from ..protocol.errors import ErrorCode
from ..protocol.queue_settings import Backoff
from .errors import ClientClosed, InvalidRecords, ProtocolViolation, error_for
from .types import Message

log = logging.getLogger(__name__)
_monotonic = time.monotonic

# The most messages one receive asks for (the broker's queues.receive_messages_max default).
DEFAULT_BATCH_MAX = 1_000
# Flow control: messages (and their key + value bytes) leased to one queue and not yet
# settled, buffered or in a handler. A receive asks for no more than the room left.
DEFAULT_MAX_OUTSTANDING = 1_000
# Receives sized from the handler's pace (batch_max not named): a receive asks for about
# this much of the handler's work (never more than half of ack_wait's worth), so a fast
# handler gets large receives and a slow one a few messages at a time (the others'
# consumers get the rest). Until the pace is known a receive asks for PREFETCH_INITIAL.
PREFETCH_HORIZON_MS = 100
PREFETCH_INITIAL = 10
# The weight of the newest interval between two hand-outs in the handler's pace (a
# moving average: one slow message moves it a little).
HANDLER_PACE_WEIGHT = 0.1
DEFAULT_MAX_OUTSTANDING_BYTES = 64 * 1024 * 1024
# Lease management: the client extends the lease of each message it holds until it is
# settled or has been held this long, then lets it go (0: never extend).
DEFAULT_MAX_LEASE_MS = 3_600_000
# A held lease is extended once less than this share of ack_wait is left.
LEASE_EXTEND_AT_FRACTION = 0.5
# A buffered message whose lease has less than this left is not handed out.
LEASE_HAND_OUT_MARGIN_MS = 50
LEASE_HAND_OUT_MARGIN_S = LEASE_HAND_OUT_MARGIN_MS / 1000
# After a failed extension request, the next try comes this much later (at most).
LEASE_RETRY_MS_MAX = 1_000
# Handed-out messages the client stopped extending, kept to tell a lost race from a
# settle of a message it never held (the oldest are forgotten past this).
LET_GO_REMEMBERED_MAX = 10_000
# Outcomes of a settle that lost the race: the message was delivered again or
# finished elsewhere after this consumer's lease ran out.
_LOST_RACE = (m.ErrorCode.STALE_DELIVERY, m.ErrorCode.DELIVERY_SETTLED)
DEFAULT_RECEIVE_TIMEOUT_MS = 30_000
# The longest long-poll one request asks for (a server cuts longer waits to its own max).
RECEIVE_POLL_MS_MAX = 10_000
# Settlements in one request.
SETTLEMENTS_PER_REQUEST_MAX = 10_000

# The delivery guarantee (one argument; docs/guarantees.md, "Delivery guarantees").
AT_LEAST_ONCE = "at-least-once"  # ack after the handler: iteration acks what the body left unsettled
AT_MOST_ONCE = "at-most-once"  # ack on receipt: acked before it is handed out
GUARANTEES = (AT_LEAST_ONCE, AT_MOST_ONCE)

_EXPIRED_ACTIONS = {
    None: m.ExpiredAction.DEFAULT,
    "drop": m.ExpiredAction.DROP,
    "dead-letter": m.ExpiredAction.DEAD_LETTER,
}

BackoffInput = Backoff | Iterable[int] | Mapping[str, Any] | None


def backoff_to_wire(backoff: BackoffInput) -> m.QueueBackoff:
    """None (as stored / default), a list of delays in ms, a Backoff, or a mapping
    with base_ms, factor, max_ms, jitter (an exponential)."""
    if backoff is None:
        return m.QueueBackoff()
    if isinstance(backoff, Mapping):
        backoff = Backoff.exponential(**backoff)
    elif not isinstance(backoff, Backoff):
        backoff = Backoff.fixed(int(delay) for delay in backoff)
    backoff.validate()
    if backoff.delays_ms:
        return m.QueueBackoff(kind=m.BackoffKind.DELAYS, delays_ms=list(backoff.delays_ms))
    return m.QueueBackoff(
        kind=m.BackoffKind.EXPONENTIAL,
        base_ms=backoff.base_ms,
        multiplier_percent=backoff.multiplier_percent,
        max_ms=backoff.max_ms,
        jitter_percent=backoff.jitter_percent,
    )


@dataclass(frozen=True, slots=True)
class QueuePartitionDescription:
    partition: int
    ack_floor: int  # every offset below is done
    next_offset: int  # the first offset never delivered
    pending: int  # in the window, not done
    leased: int
    dead_letters_pending: int


@dataclass(frozen=True, slots=True)
class QueueDescription:
    """A queue group's settings in force and its window per partition; the counts are
    since the server started."""

    group: str
    topic: str
    ack_wait_ms: int
    max_deliveries: int
    backoff: Backoff
    dead_letter_topic: str
    expired: str  # "drop" or "dead-letter": what happens to a message whose TTL passed
    partitions: tuple[QueuePartitionDescription, ...]
    delivered: int
    redelivered: int
    acked: int
    nacked: int
    expired_leases: int
    dead_lettered: int
    expired_messages: int  # TTL passed before delivery


@dataclass(frozen=True, slots=True)
class QueueSummary:
    group: str
    topic: str
    dead_letter_topic: str
    pending: int
    leased: int
    dead_letters_pending: int


def backoff_from_wire(backoff: m.QueueBackoff) -> Backoff:
    if backoff.kind is m.BackoffKind.DELAYS:
        return Backoff.fixed(backoff.delays_ms)
    return Backoff((), backoff.base_ms, backoff.multiplier_percent, backoff.max_ms, backoff.jitter_percent)


async def describe_queue(client, topic: str, group: str, timeout_ms: int | None) -> QueueDescription:
    response = await client.core.call(
        m.QueueDescribeRequest(group=group, topic=topic), timeout_ms, retry=True, expect=m.QueueDescribeResponse
    )
    return QueueDescription(
        group=group,
        topic=topic,
        ack_wait_ms=response.settings.ack_wait_ms,
        max_deliveries=response.settings.max_deliveries,
        backoff=backoff_from_wire(response.settings.backoff),
        dead_letter_topic=response.dead_letter_topic,
        expired="dead-letter" if response.settings.expired is m.ExpiredAction.DEAD_LETTER else "drop",
        partitions=tuple(
            QueuePartitionDescription(
                p.partition, p.ack_floor, p.next_offset, p.pending, p.leased, p.dead_letters_pending
            )
            for p in response.partitions
        ),
        delivered=response.delivered,
        redelivered=response.redelivered,
        acked=response.acked,
        nacked=response.nacked,
        expired_leases=response.expired_leases,
        dead_lettered=response.dead_lettered,
        expired_messages=response.expired,
    )


async def list_queues(client, topic: str | None, timeout_ms: int | None) -> list[QueueSummary]:
    response = await client.core.call(
        m.QueueListRequest(topic=topic), timeout_ms, retry=True, expect=m.QueueListResponse
    )
    return [
        QueueSummary(g.group, g.topic, g.dead_letter_topic, g.pending, g.leased, g.dead_letters_pending)
        for g in response.groups
    ]


@dataclass(frozen=True, slots=True)
class QueueLeaseView:
    """One in-flight message of a queue group (QueueLeases, protocol version 4)."""

    partition: int
    offset: int
    state: str  # "leased", "waiting" (a retry, due at not_before_ms) or "dead" (being dead-lettered)
    delivery_count: int
    lease_deadline_ms: int | None  # leased: when the lease runs out (wall clock, ms)
    not_before_ms: int | None  # waiting: when it may be delivered again (0: now)
    last_delivery_ms: int | None
    last_error: str  # the last nack's error text, or the dead-letter reason


@dataclass(frozen=True, slots=True)
class QueueLeasePage:
    leases: tuple[QueueLeaseView, ...]
    more: bool  # more follow: ask again with after=(partition, offset) of the last one

    @property
    def next_after(self) -> tuple[int, int] | None:
        return (self.leases[-1].partition, self.leases[-1].offset) if self.more and self.leases else None


def _optional(value: int) -> int | None:
    return None if value < 0 else value


async def queue_leases(
    client,
    topic: str,
    group: str,
    *,
    partition: int | None,
    after: tuple[int, int] | None,
    limit: int,
    timeout_ms: int | None,
) -> QueueLeasePage:
    after_partition, after_offset = after if after is not None else (-1, -1)
    response = await client.core.call(
        m.QueueLeasesRequest(
            group=group,
            topic=topic,
            partition=-1 if partition is None else partition,
            after_partition=after_partition,
            after_offset=after_offset,
            leases_max=limit,
        ),
        timeout_ms,
        retry=True,
        expect=m.QueueLeasesResponse,
    )
    return QueueLeasePage(
        tuple(
            QueueLeaseView(
                partition=lease.partition,
                offset=lease.offset,
                state=lease.state.name.lower(),
                delivery_count=lease.delivery_count,
                lease_deadline_ms=_optional(lease.lease_deadline_ms),
                not_before_ms=_optional(lease.not_before_ms),
                last_delivery_ms=_optional(lease.last_delivery_ms),
                last_error=lease.last_error,
            )
            for lease in response.leases
        ),
        response.more,
    )


@dataclass(frozen=True, slots=True)
class QueueMessage(Message):
    """A message received from a queue group, with its delivery count (1 the first
    time) and lease deadline (wall clock, ms). Settle it with ack, nack, in_progress or
    reject: on an AsyncQueue these return awaitables, on a Queue they block."""

    delivery_count: int = 1
    lease_deadline_ms: int = 0
    group: str = ""
    _queue: Any = field(default=None, repr=False, compare=False)
    # The _LeaseRun of the receive run this delivery came in (set once, at decode).
    _lease: Any = field(default=None, repr=False, compare=False)

    def ack(self, *, wait: bool = True):
        return self._queue._ack(self, wait)

    def nack(self, delay_ms: int | None = None, error: str | None = None, *, wait: bool = True):
        delay = m.CONFIG_DEFAULT if delay_ms is None else max(int(delay_ms), 0)
        return self._queue._settle(self, m.SettleAction.NACK, delay, error, wait)

    def in_progress(self, *, wait: bool = True):
        return self._queue._settle(self, m.SettleAction.IN_PROGRESS, m.CONFIG_DEFAULT, None, wait)

    def reject(self, reason: str | None = None, *, wait: bool = True):
        return self._queue._settle(self, m.SettleAction.REJECT, m.CONFIG_DEFAULT, reason, wait)

    def reply(self, value, *, key=None, headers=None):
        """Answer this request (request-reply: broker/client/request.py): True when the
        reply reached the requester's inbox, False when it is gone (dropped, counted).
        Settle the message as well (iteration acks it under at-least-once)."""
        return self._queue._reply(self, value, key, headers)


# A receive makes one QueueMessage per record: set through the slots' descriptors, as
# types.new_message makes a Message (the frozen __init__ sets each field through
# object.__setattr__, about twice the time). Checked here, so a new field is not left unset.
_QUEUE_MESSAGE_FIELDS = (
    "topic",
    "partition",
    "offset",
    "timestamp",
    "key",
    "value",
    "headers",
    "default_ttl_ms",
    "delivery_count",
    "lease_deadline_ms",
    "group",
    "_queue",
    "_lease",
)
assert tuple(f.name for f in fields(QueueMessage)) == _QUEUE_MESSAGE_FIELDS, "update new_queue_message"
(
    _set_topic,
    _set_partition,
    _set_offset,
    _set_timestamp,
    _set_key,
    _set_value,
    _set_headers,
    _set_default_ttl_ms,
    _set_delivery_count,
    _set_lease_deadline_ms,
    _set_group,
    _set_queue,
    _set_lease,
) = ((Message if name in Message.__dict__ else QueueMessage).__dict__[name].__set__ for name in _QUEUE_MESSAGE_FIELDS)
_new_object = object.__new__


def new_queue_message(
    topic: str,
    partition: int,
    offset: int,
    timestamp: int,
    key: bytes | None,
    value: bytes | None,
    headers: Any,
    delivery_count: int,
    lease_deadline_ms: int,
    group: str,
    queue: Any,
    lease: Any = None,
) -> QueueMessage:
    """QueueMessage(topic, partition, offset, timestamp, key, value, headers,
    delivery_count, lease_deadline_ms, group, queue, lease), for a receive's per-record loop."""
    message = _new_object(QueueMessage)
    _set_topic(message, topic)
    _set_partition(message, partition)
    _set_offset(message, offset)
    _set_timestamp(message, timestamp)
    _set_key(message, key)
    _set_value(message, value)
    _set_headers(message, headers)
    _set_default_ttl_ms(message, 0)
    _set_delivery_count(message, delivery_count)
    _set_lease_deadline_ms(message, lease_deadline_ms)
    _set_group(message, group)
    _set_queue(message, queue)
    _set_lease(message, lease)
    return message


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    """One queue consumer's counts since it was made (feed metrics from it)."""

    received: int  # deliveries the broker leased to this consumer
    handed_out: int  # messages given to the application
    outstanding: int  # leased and not settled now: buffered or handed out
    outstanding_bytes: int  # their record bytes as received (an even share of a receive's: see max_outstanding_bytes)
    buffered: int  # received, not handed out yet
    lease_extension_requests: int  # batched in-progress requests the lease keeper sent
    leases_extended: int  # offsets those requests extended
    leases_lost: int  # held leases the broker no longer had for this consumer
    leases_let_go: int  # held past max_lease_ms: no longer extended
    expired_not_handed_out: int  # buffered messages whose lease ran out: never handed out
    stale_settles: int  # settles that lost the race (returned False, or raised with strict)
    receive_requests: int  # receives sent to the broker (prefetches included)


class _LeaseRun:
    """One run of a receive: consecutive offsets of one partition delivered together,
    with one delivery count and one lease deadline. The leases of a consumer are kept
    as these runs, not one object per message: `held[i]` is 1 while this consumer holds
    offset first + i (leased, not settled, not let go), `handed[i]` once it was handed
    to the application (written by the hand-out, which the blocking Queue makes on the
    application's thread: two arrays, so a hand-out never revives a dropped lease).
    `deadline` is the local monotonic time by which the broker's lease of every held
    offset has run out at the latest (a request's send time plus ack_wait), `size` the
    run's share of the received record bytes (flow control's byte count: an even share
    freed as each offset is dropped)."""

    __slots__ = (
        "partition",
        "first",
        "count",
        "delivery_count",
        "deadline_ms",
        "deadline",
        "held_until",
        "size",
        "size_each",
        "held",
        "handed",
        "remaining",
    )

    def __init__(self, partition: int, first: int, count: int, delivery_count: int, deadline_ms: int) -> None:
        self.partition = partition
        self.first = first
        self.count = count
        self.delivery_count = delivery_count
        self.deadline_ms = deadline_ms  # the broker's, wall clock
        self.deadline = 0.0
        self.held_until = 0.0
        self.size = 0
        self.size_each = 0  # size // count: freed as each offset is dropped, the rest with the last
        self.held = bytearray(count)  # all 0 until the queue holds the run (at-least-once)
        self.handed = bytearray(count)
        self.remaining = 0  # offsets held


def _held_run(message: QueueMessage) -> _LeaseRun | None:
    """The run of `message` if this consumer still holds its lease."""
    run = message._lease
    if run is not None and run.held[message.offset - run.first]:
        return run
    return None


def _local_deadline(deadline_ms: int, sent_at: float, received_at: float, ack_wait_s: float) -> float:
    """The local monotonic time of a lease deadline the broker gave as wall-clock ms:
    read through this machine's wall clock, then kept within what the request's send and
    answer times allow (the lease began between them), so a skewed clock cannot push it
    later than the answer time + ack_wait nor earlier than the send time + ack_wait."""
    wall = received_at + (deadline_ms - time.time() * 1000) / 1000
    return min(max(wall, sent_at + ack_wait_s), received_at + ack_wait_s)


class AsyncQueue:
    """See the module docstring. Made by AsyncClient.queue; `async with` it or call
    close()."""

    def __init__(
        self,
        client,
        topic: str,
        group: str,
        *,
        ack_wait_ms: int | None = None,
        max_deliveries: int | None = None,
        backoff: BackoffInput = None,
        dead_letter_topic: str | None = None,
        expired: str | None = None,
        guarantee: str = AT_LEAST_ONCE,
        batch_max: int | None = None,
        receive_timeout_ms: int = DEFAULT_RECEIVE_TIMEOUT_MS,
        prefetch: bool = True,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        max_outstanding_bytes: int = DEFAULT_MAX_OUTSTANDING_BYTES,
        max_lease_ms: int = DEFAULT_MAX_LEASE_MS,
        strict: bool = False,
    ) -> None:
        if batch_max is not None and batch_max < 1:
            raise ValueError("batch_max must be at least 1 (or None: sized from the handler's pace)")
        if max_outstanding < 1:
            raise ValueError("max_outstanding must be at least 1")
        if max_outstanding_bytes < 1:
            raise ValueError("max_outstanding_bytes must be at least 1")
        if max_lease_ms < 0:
            raise ValueError("max_lease_ms must be 0 (never extend) or more")
        if expired not in _EXPIRED_ACTIONS:
            raise ValueError('expired must be None, "drop" or "dead-letter"')
        if guarantee not in GUARANTEES:
            raise ValueError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
        self.guarantee = guarantee
        self.client = client
        self.topic = topic
        self.group = group
        # Named: every trip asks for up to batch_max; None: sized from the handler's pace.
        self._paced = batch_max is None
        self.batch_max = DEFAULT_BATCH_MAX if batch_max is None else batch_max
        # Seconds the application takes per message (between two hand-outs that did not
        # wait for the broker), a moving average; None until measured.
        self._handler_s: float | None = None
        self._handed_at: float | None = None  # the last hand-out that timed the handler
        self.receive_timeout_ms = receive_timeout_ms
        self.prefetch = prefetch
        self.max_outstanding = max_outstanding
        self.max_outstanding_bytes = max_outstanding_bytes
        self.max_lease_ms = max_lease_ms
        self.strict = strict
        self._owner: Any = self  # what received messages settle through (this queue or its blocking twin)
        self._prefetching: asyncio.Task | None = None  # the one receive asked ahead
        # _prefetch_soon asks only when at most this many are buffered (half a batch at most).
        self._prefetch_buffered_max = min(self.batch_max, max_outstanding) // 2
        self._prefetch_started = False  # by the hand-out just made: receive() lets it leave
        # A hand-out's prefetch was held back because the application held messages it
        # was handed: its settle of the last of them asks instead (_prefetch_after_settle).
        self._prefetch_held_back = False
        # The last receive came back full: the broker likely has more (a backlog). A
        # trickle (requests, a quiet topic) is not prefetched: it would be a wasted trip.
        self._backlog = False
        self._stored_batches = True  # False once the server refused QueueReceiveBatches (protocol 1, 2)
        # partition -> (base offset, CRC, records) of the batch decoded last: the next
        # receive often gets the same stored batch again (it held more than one receive).
        self._decoded: dict[int, tuple[int, int, list]] = {}
        self.settings = m.QueueGroupSettings(
            ack_wait_ms=m.CONFIG_DEFAULT if ack_wait_ms is None else ack_wait_ms,
            max_deliveries=m.CONFIG_DEFAULT if max_deliveries is None else max_deliveries,
            backoff=backoff_to_wire(backoff),
            dead_letter_topic=dead_letter_topic,
            expired=_EXPIRED_ACTIONS[expired],
        )
        # The group's ack_wait in seconds, once known (named here, or asked of the broker).
        self._ack_wait_s: float | None = None if ack_wait_ms is None else ack_wait_ms / 1000
        self._buffer: collections.deque[QueueMessage] = collections.deque()
        self._at_least_once = guarantee == AT_LEAST_ONCE
        # Flow control and lease management: the runs holding a message leased to this
        # consumer and not settled (at-least-once), in the order received (a dict as an
        # ordered set). Changed on the loop only (but for _LeaseRun.handed).
        self._lease_runs: dict[_LeaseRun, None] = {}
        self._outstanding = 0  # offsets held in _lease_runs
        self._leased_bytes = 0  # the sizes of the runs in _lease_runs
        # partition -> the end of the highest run held there since: a run received below
        # it may hold an offset an older run still holds (delivered again to us).
        self._held_end: dict[int, int] = {}
        # Held offsets whose message the application was handed: _given - _dropped.
        # Two counts, each written by one thread: _given where messages are handed out
        # (the blocking Queue's application thread too), _dropped on the loop.
        self._given = self._dropped = 0
        self._room = asyncio.Event()  # set when a lease is settled or let go, if _room_wanted
        self._room_wanted = False  # a receive waits on _room
        self._keeper: asyncio.Task | None = None  # extends the leases in _lease_runs
        # Handed-out messages no longer extended (lost, let go, left by an iteration
        # that raised), by (partition, offset, delivery count): their settle still
        # counts as this consumer's (a lost race is not an error).
        self._let_go: collections.OrderedDict[tuple[int, int, int], None] = collections.OrderedDict()
        # [partition, offset, delivery count, action, delay, text, future or None, ours,
        # count], in order: `count` consecutive offsets from `offset`.
        # ours: True when the message was this consumer's lease (a lost race returns
        # False), False when it was not (every error raised), None for the client's own
        # quiet settles (releases, whose outcome nobody needs).
        self._outbox: list[list] = []
        # The outbox's last entry while it is a run of background acks (no future) that
        # the next ack may extend: an ack of a batch is one entry, one settlement.
        self._ack_tail: list | None = None
        self._settled: asyncio.Future | None = None  # returned by every wait=False settle
        self._sender: asyncio.Task | None = None
        self._errors: list[BaseException] = []
        self._closed = False
        # The message an iteration handed out last, and whether its body settled it.
        self._current: QueueMessage | None = None
        self._current_settled = False
        self._received = self._handed_out_count = 0
        self._extension_requests = self._extended = self._lost = self._let_go_count = 0
        self._expired_in_buffer = self._stale_settles = self._receive_requests = 0
        client.core.own(self)

    def __repr__(self) -> str:
        return f"<AsyncQueue {self.group!r} on {self.topic!r}{' closed' if self._closed else ''}>"

    async def __aenter__(self) -> AsyncQueue:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            received=self._received,
            handed_out=self._handed_out_count,
            outstanding=self._outstanding,
            outstanding_bytes=self._leased_bytes,
            buffered=len(self._buffer),
            lease_extension_requests=self._extension_requests,
            leases_extended=self._extended,
            leases_lost=self._lost,
            leases_let_go=self._let_go_count,
            expired_not_handed_out=self._expired_in_buffer,
            stale_settles=self._stale_settles,
            receive_requests=self._receive_requests,
        )

    # -- receiving ---------------------------------------------------------------------

    async def receive(self, timeout_ms: int | None = None) -> QueueMessage | None:
        """The next message, waiting up to timeout_ms (default receive_timeout_ms) for
        one; None when none came (or when max_outstanding messages are held unsettled
        all that time)."""
        # The common case first: a message from the buffer, no clock read but the hand-out's.
        message = self._next_buffered() if self._buffer and not self._closed else None
        if message is None:
            return await self._receive(timeout_ms)
        if self._prefetch_started:  # let its request leave now, not after the buffer
            self._prefetch_started = False
            try:
                await asyncio.sleep(0)
            except BaseException:  # cancelled: the application never saw it
                self._give_back(message)
                raise
        return message

    async def receive_batch(self, max_messages: int, timeout_ms: int | None = None) -> list[QueueMessage]:
        """Up to `max_messages` messages, waiting up to timeout_ms (default
        receive_timeout_ms) for the first; [] when none came. It takes what is buffered,
        then asks the broker for no more than are still wanted, within flow control
        (max_outstanding: it returns fewer when the consumer holds that many unsettled)
        and batch_max per trip; it waits only for the first message. Each message is
        leased and its lease extended until it is settled, as receive()'s are: settle
        every one (under at-most-once they were acked on receipt)."""
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise ValueError(f"max_messages must be a positive int, not {max_messages!r}")
        # No prefetch while the batch is handed out: the application holds all of it
        # (prefetch asks ahead only for a consumer that settled what it was handed), nor
        # when it is settled (it asks for no more than it wants).
        self._prefetch_held_back = False
        first = await self._receive(timeout_ms, max_messages, prefetch=False)
        if first is None:
            return []
        batch = [first]
        try:
            while len(batch) < max_messages:
                message = self._next_buffered(prefetch=False)
                if message is None:
                    if not self._backlog or self._room_left(self.batch_max) <= 0:
                        break  # the last trip came back short, or flow control is full
                    message = await self._receive(0, max_messages - len(batch), prefetch=False)  # no long poll
                    if message is None:
                        break
                batch.append(message)
        except Exception as error:  # noqa: BLE001 - the next receive meets it again
            log.info("queue %s on %s: receive_batch stopped at %d: %s", self.group, self.topic, len(batch), error)
        except BaseException:  # cancelled: the application never saw these
            for message in batch:
                self._give_back(message)
            raise
        return batch

    def _give_back(self, message: QueueMessage) -> None:
        """On the loop: a message handed out that never reached the application is
        released at once (a nack without delay), if this consumer still holds it."""
        run = _held_run(message)
        if run is not None:
            self._drop(run, message.offset - run.first)
            self._settle_nowait(message, m.SettleAction.NACK, 0, None, ours=None)

    def _trip_max(self) -> int:
        """The most messages one trip to the broker asks for: batch_max when named,
        else about PREFETCH_HORIZON_MS of the handler's work (see the module docstring)."""
        if not self._paced:
            return self.batch_max
        handler_s = self._handler_s
        if handler_s is None:
            return min(PREFETCH_INITIAL, self.batch_max)
        horizon_s = PREFETCH_HORIZON_MS / 1000
        if self._ack_wait_s is not None:
            horizon_s = min(horizon_s, self._ack_wait_s * LEASE_EXTEND_AT_FRACTION)
        if handler_s * self.batch_max <= horizon_s:
            return self.batch_max
        return max(int(horizon_s / handler_s), 1)

    def _room_left(self, trip_max: int | None = None) -> int:
        """How many more messages flow control lets this consumer lease now, in one trip
        of at most `trip_max` (default: _trip_max())."""
        trip = self._trip_max() if trip_max is None else trip_max
        if self.guarantee == AT_MOST_ONCE:  # acked on receipt: only the buffer counts
            return min(trip, self.max_outstanding - len(self._buffer))
        if self._leased_bytes >= self.max_outstanding_bytes:
            return 0
        return min(trip, self.max_outstanding - self._outstanding)

    async def _receive(
        self, timeout_ms: int | None, wanted: int | None = None, *, prefetch: bool = True
    ) -> QueueMessage | None:
        """The next message (see receive); a trip to the broker asks for at most
        `wanted` messages (None: as many as flow control and batch_max allow);
        `prefetch`: whether handing it out may ask ahead (_prefetch_soon)."""
        if self._closed:
            raise ClientClosed("the queue is closed")
        timeout_ms = self.receive_timeout_ms if timeout_ms is None else max(int(timeout_ms), 0)
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            message = self._next_buffered(prefetch)
            if message is not None:
                if self._prefetch_started:  # let its request leave now, not after the buffer
                    self._prefetch_started = False
                    try:
                        await asyncio.sleep(0)
                    except BaseException:  # cancelled: the application never saw it
                        self._give_back(message)
                        raise
                return message
            self._handed_at = None  # what follows waits: not the handler's time
            if self._closed:
                raise ClientClosed("the queue is closed")
            if self._prefetching is not None:
                await asyncio.wait({self._prefetching})  # what it brings lands in the buffer
                continue
            remaining = deadline - time.monotonic()
            room = self._room_left() if wanted is None else min(self._room_left(self.batch_max), wanted)
            if room <= 0:  # flow control: wait for the application to settle one
                if remaining <= 0:
                    return None
                self._room.clear()
                self._room_wanted = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), remaining)
                continue
            wait_ms = min(int(max(remaining, 0) * 1000), RECEIVE_POLL_MS_MAX)
            received = await self._accept(*await self._call_receive(room, wait_ms))
            self._backlog = len(received) >= room
            if received and self.guarantee == AT_MOST_ONCE:
                # Acked (durably) before any is handed out: a crash from here loses them.
                futures = [
                    self._settle_nowait(
                        message, m.SettleAction.ACK, m.CONFIG_DEFAULT, None, record_error=False, ours=True
                    )
                    for message in received
                ]
                outcomes = await asyncio.gather(*(future for future in futures if future is not None))
                received = [message for message, counted in zip(received, outcomes) if counted]
            self._buffer.extend(received)
            if not self._buffer and time.monotonic() >= deadline:
                return None

    def _next_buffered(self, prefetch: bool = True) -> QueueMessage | None:
        """On the loop: the next buffered message whose lease is still good, handed
        out (and, with `prefetch`, the next batch asked for when due); the others are
        released. One clock read per hand-out serves the lease check and the pace."""
        buffer = self._buffer
        while buffer:
            message = buffer.popleft()
            now = _monotonic()
            if self._at_least_once:
                run = message._lease
                index = message.offset - run.first
                if not run.held[index] or run.deadline - LEASE_HAND_OUT_MARGIN_S <= now:
                    self._discard(message)
                    continue
                if not run.handed[index]:
                    run.handed[index] = 1
                    self._given += 1
            self._handed_out_count += 1
            if prefetch:
                handed_at = self._handed_at  # the handler's pace (_time_handler, inline)
                if handed_at is not None:
                    handler_s = self._handler_s
                    interval = now - handed_at
                    self._handler_s = (
                        interval if handler_s is None else handler_s + (interval - handler_s) * HANDLER_PACE_WEIGHT
                    )
                self._handed_at = now
                # _prefetch_soon's cheapest conditions first: it asks only once at most
                # half a batch is buffered.
                if self._prefetching is None and self._backlog and len(buffer) <= self._prefetch_buffered_max:
                    self._prefetch_soon(message)
            return message
        return None

    def _usable(self, message: QueueMessage) -> bool:
        """Whether a buffered message may be handed out: its lease has not run out
        (read-only: the blocking twin calls it from the application's thread)."""
        if not self._at_least_once:
            return True
        run = message._lease
        return (
            run is not None
            and bool(run.held[message.offset - run.first])
            and run.deadline - LEASE_HAND_OUT_MARGIN_S > _monotonic()
        )

    def _hand_out(self, message: QueueMessage) -> None:
        run = message._lease
        if self._at_least_once and run is not None:
            index = message.offset - run.first
            if run.held[index] and not run.handed[index]:
                run.handed[index] = 1
                self._given += 1
        self._handed_out_count += 1

    def _time_handler(self, now: float | None = None) -> None:
        """At a hand-out from the buffer: the time since the one before, when no wait
        for the broker came between, is the application's time for a message."""
        if now is None:
            now = time.monotonic()
        if self._handed_at is not None:
            interval = now - self._handed_at
            handler_s = self._handler_s
            self._handler_s = (
                interval if handler_s is None else handler_s + (interval - handler_s) * HANDLER_PACE_WEIGHT
            )
        self._handed_at = now

    def _discard(self, message: QueueMessage) -> None:
        """On the loop: a buffered message whose lease ran out (or was lost, or let go)
        is never handed out; if this consumer still holds it, it is released."""
        run = _held_run(message)
        if run is None:
            return  # the lease keeper let it go already
        self._drop(run, message.offset - run.first)
        self._expired_in_buffer += 1
        self._settle_nowait(message, m.SettleAction.NACK, 0, None, ours=None)

    async def _call_receive(self, room: int, wait_ms: int) -> tuple[list[QueueMessage], list[_LeaseRun], float]:
        """One receive of up to `room` messages, waiting up to `wait_ms`: the messages,
        their runs and when it was sent. A server of protocol 3 sends stored batches as they are
        (QueueReceiveBatches); an older one re-encodes them (QueueReceive)."""
        sent_at = time.monotonic()
        self._receive_requests += 1
        if self._stored_batches:
            request = m.QueueReceiveBatchesRequest(
                group=self.group, topic=self.topic, settings=self.settings, messages_max=room, wait_ms=wait_ms
            )
            try:
                response = await self.client.core.call(
                    request, None, extra_ms=wait_ms, expect=m.QueueReceiveBatchesResponse
                )
            except ProtocolViolation as error:  # refused before sending: a server of protocol 1 or 2
                if error.code != ErrorCode.UNSUPPORTED_VERSION:
                    raise
                self._stored_batches = False
            else:
                return (*self._decode_batches(response), sent_at)
        old_request = m.QueueReceiveRequest(
            group=self.group, topic=self.topic, settings=self.settings, messages_max=room, wait_ms=wait_ms
        )
        old_response = await self.client.core.call(old_request, None, extra_ms=wait_ms, expect=m.QueueReceiveResponse)
        return (*self._decode(old_response), sent_at)

    async def _accept(self, received: list[QueueMessage], runs: list[_LeaseRun], sent_at: float) -> list[QueueMessage]:
        """The messages of a receive, held under lease management (at-least-once)."""
        if not received:
            return received
        self._received += len(received)
        if self._at_least_once:
            if self._ack_wait_s is None:
                await self._learn_ack_wait(received[0])
            self._hold(runs, sent_at)
        return received

    async def _learn_ack_wait(self, message: QueueMessage) -> None:
        """The group's ack_wait (the queue named none: it is as stored): asked once of
        the broker; if that fails, estimated from the lease deadline and this clock."""
        try:
            description = await describe_queue(self.client, self.topic, self.group, None)
            self._ack_wait_s = description.ack_wait_ms / 1000
        except Exception as error:  # noqa: BLE001 - an estimate serves until the next receive
            estimate = max((message.lease_deadline_ms - time.time() * 1000) / 1000, 0.1)
            log.warning(
                "queue %s on %s: could not read ack_wait (%s); estimated %.1f s from the lease deadline",
                self.group,
                self.topic,
                error,
                estimate,
            )
            self._ack_wait_s = estimate

    def _hold(self, runs: list[_LeaseRun], sent_at: float) -> None:
        """Hold every offset of `runs` (just received): leased until the run's local
        deadline, extended by the keeper until `max_lease_ms` from `sent_at`."""
        assert self._ack_wait_s is not None
        received_at = _monotonic()
        held_until = sent_at + self.max_lease_ms / 1000
        held_end = self._held_end
        lease_runs = self._lease_runs
        for run in runs:
            run.deadline = _local_deadline(run.deadline_ms, sent_at, received_at, self._ack_wait_s)
            run.held_until = held_until
            end = run.first + run.count
            if run.first < held_end.get(run.partition, -1):  # may be delivered to us again
                self._drop_overlap(run)
            if end > held_end.get(run.partition, -1):
                held_end[run.partition] = end
            run.held = bytearray(b"\x01") * run.count
            run.remaining = run.count
            lease_runs[run] = None
            self._outstanding += run.count
            self._leased_bytes += run.size
        if self.max_lease_ms > 0 and (self._keeper is None or self._keeper.done()) and not self._closed:
            self._keeper = asyncio.get_running_loop().create_task(self._keep_leases())

    def _drop_overlap(self, new: _LeaseRun) -> None:
        """Offsets of `new` that an older run still holds were delivered to us again
        after our lease of them was lost: the older hold is dropped."""
        end = new.first + new.count
        for run in list(self._lease_runs):
            if run.partition != new.partition or run.first >= end or run.first + run.count <= new.first:
                continue
            for offset in range(max(run.first, new.first), min(run.first + run.count, end)):
                if run.held[offset - run.first]:
                    self._drop(run, offset - run.first)

    def _drop(self, run: _LeaseRun, index: int) -> None:
        """Stop holding offset run.first + index (held: the caller checked)."""
        run.held[index] = 0
        run.remaining -= 1
        self._outstanding -= 1
        if run.handed[index]:
            self._dropped += 1
        self._leased_bytes -= run.size_each
        if not run.remaining:
            del self._lease_runs[run]
            self._leased_bytes -= run.size - run.size_each * run.count
            if not self._outstanding:  # none held: none in hand (mends a count a thread race left off)
                self._dropped = self._given
        if self._room_wanted:
            self._room_wanted = False
            self._room.set()

    def _remember_let_go(self, partition: int, offset: int, delivery_count: int) -> None:
        self._let_go[(partition, offset, delivery_count)] = None
        while len(self._let_go) > LET_GO_REMEMBERED_MAX:
            self._let_go.popitem(last=False)

    def _forget(self, message: QueueMessage) -> None:
        """On the loop: stop extending a handed-out message's lease (an iteration body
        raised or broke out): it runs out and the message is delivered again."""
        run = _held_run(message)
        if run is not None:
            self._drop(run, message.offset - run.first)
            self._remember_let_go(message.partition, message.offset, message.delivery_count)

    def _ours(self, message: QueueMessage, action: m.SettleAction) -> bool:
        """On the loop, as the application settles `message`: whether it was this
        consumer's lease (then a lost race is counted, not raised). Any settle but
        in-progress ends the hold."""
        run = _held_run(message)
        if run is not None:
            if action is not m.SettleAction.IN_PROGRESS:
                self._drop(run, message.offset - run.first)
            return True
        let_go = (message.partition, message.offset, message.delivery_count)
        if let_go in self._let_go:
            if action is not m.SettleAction.IN_PROGRESS:
                del self._let_go[let_go]
            return True
        return False

    # -- lease management ----------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Extend every held lease, in one batched request (runs of offsets), once the
        soonest has less than half of ack_wait left; let go of those held max_lease_ms.
        Ends when nothing is held (the next receive starts it again) or at close."""
        while not self._closed and self._lease_runs:
            ack_wait_s = self._ack_wait_s or 0.1
            soonest = min(run.deadline for run in self._lease_runs)
            due = soonest - ack_wait_s * LEASE_EXTEND_AT_FRACTION
            now = _monotonic()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            try:
                extended = await self._extend_leases(ack_wait_s)
            except ClientClosed:
                return
            if not extended:
                await asyncio.sleep(min(LEASE_RETRY_MS_MAX / 1000, ack_wait_s / 4))

    def _let_go_of(self, run: _LeaseRun) -> None:
        """Held max_lease_ms: stop holding every offset of `run`. A handed-out one's lease
        runs out (its settle may still count); a buffered one is released."""
        for index in _held_indexes(run):
            self._drop(run, index)
            self._let_go_count += 1
            offset = run.first + index
            if run.handed[index]:
                self._remember_let_go(run.partition, offset, run.delivery_count)
            else:
                self._outbox_append(
                    [run.partition, offset, run.delivery_count, m.SettleAction.NACK, 0, None, None, None, 1]
                )

    async def _extend_leases(self, ack_wait_s: float) -> bool:
        """One pass; False when a request failed (tried again shortly)."""
        now = _monotonic()
        pieces: list[tuple[_LeaseRun, int, int]] = []  # (run, first index, count): held offsets
        for run in sorted(self._lease_runs, key=_run_position):
            if now >= run.held_until:
                self._let_go_of(run)
                continue
            for index, count in _held_pieces(run):
                pieces.append((run, index, count))
        deadlines: dict[_LeaseRun, float] = {}  # run -> the soonest new deadline of its pieces
        start = 0
        while start < len(pieces):  # at most SETTLEMENTS_PER_REQUEST_MAX offsets a request
            chunk: list[tuple[_LeaseRun, int, int]] = []
            offsets = 0
            while start < len(pieces) and offsets < SETTLEMENTS_PER_REQUEST_MAX:
                run, index, count = pieces[start]
                take = min(count, SETTLEMENTS_PER_REQUEST_MAX - offsets)
                chunk.append((run, index, take))
                offsets += take
                if take < count:
                    pieces[start] = (run, index + take, count - take)
                else:
                    start += 1
            settlements = [
                m.Settlement(
                    partition=run.partition,
                    offset=run.first + index,
                    delivery_count=run.delivery_count,
                    action=m.SettleAction.IN_PROGRESS,
                    delay_ms=m.CONFIG_DEFAULT,
                    text=None,
                    count=count,
                )
                for run, index, count in chunk
            ]
            request = m.QueueSettleRequest(group=self.group, topic=self.topic, settlements=settlements)
            sent_at = _monotonic()
            try:
                response = await self.client.core.call(request, None, retry=True, expect=m.QueueSettleResponse)
            except ClientClosed:
                raise  # the client closes (and this queue with it): nothing more to extend
            except Exception as error:  # noqa: BLE001 - tried again; a lease lost meanwhile is found then
                if self._closed:
                    return True
                log.warning("queue %s on %s: extending %d lease(s) failed: %s", self.group, self.topic, offsets, error)
                return False
            self._extension_requests += 1
            received_at = _monotonic()
            if sum(result.count for result in response.results) != offsets:
                log.warning(
                    "queue %s on %s: extension answered for the wrong number of offsets", self.group, self.topic
                )
                return False
            for (run, index, _), code, deadline_ms, length in _spread(chunk, response.results):
                if code == m.ErrorCode.NONE:
                    deadline = _local_deadline(deadline_ms, sent_at, received_at, ack_wait_s)
                    deadlines[run] = min(deadlines.get(run, deadline), deadline)
                    self._extended += run.held.count(1, index, index + length)
                    continue
                for at in range(index, index + length):  # lost: ran out and went to another consumer, or finished
                    if run.held[at]:
                        self._drop(run, at)
                        self._lost += 1
                        if run.handed[at]:
                            self._remember_let_go(run.partition, run.first + at, run.delivery_count)
            for run, deadline in deadlines.items():
                run.deadline = deadline
        return True

    # -- prefetch ------------------------------------------------------------------------

    def _prefetch_soon(self, current: QueueMessage | None = None) -> None:
        """Ask for the next batch (no long poll) when at most half a batch is buffered,
        flow control leaves room for at least half a batch, the application settled
        every message it was handed before `current` (a consumer that holds messages
        leases no more than it asked for, so it does not starve the others), and no such
        request is under way. On the client's loop."""
        batch = min(self._trip_max(), self.max_outstanding)
        if not (
            self.prefetch
            and self._backlog
            and self._prefetching is None
            and not self._closed
            and self.guarantee == AT_LEAST_ONCE
            and len(self._buffer) <= batch // 2
        ):
            return
        if self._given - self._dropped > self._held_in_hand(current):
            self._prefetch_held_back = True  # the settle of the last one held asks again
            return
        if self._room_left() >= max(batch // 2, 1):
            self._prefetching = asyncio.get_running_loop().create_task(self._prefetch_once())
            self._prefetch_started = True

    def _held_in_hand(self, current: QueueMessage | None) -> int:
        """1 when `current` is a handed-out message this consumer holds, else 0."""
        if current is None:
            return 0
        run = _held_run(current)
        return 1 if run is not None and run.handed[current.offset - run.first] else 0

    def _prefetch_after_settle(self) -> None:
        """The application settled the last message it held, and a hand-out's prefetch
        was held back while it held them (the settle's answer may not have come yet: a
        settled message no longer counts against max_outstanding): the next batch is
        asked for now, within the same conditions as at a hand-out, so its receive goes
        out while the settles' answer is awaited (a consumer that receives a batch, acks
        it without waiting, then flushes, gets its next batch meanwhile). A consumer that
        settles each message before the next hand-out never holds one back: the
        hand-out asks, and its settles check one flag only."""
        self._prefetch_held_back = False
        self._prefetch_soon()

    async def _prefetch_once(self) -> None:
        """One receive that does not wait for messages (at-least-once only: nothing is
        acked here); a failure is left to the next receive the application makes (which
        meets it again)."""
        self._prefetch_started = False  # its request leaves now: receive() need not yield for it
        try:
            room = self._room_left()
            if room <= 0:
                return
            received = await self._accept(*await self._call_receive(room, 0))
            self._backlog = len(received) >= room
            if self._closed:  # closed meanwhile: given back like the buffer
                for message in received:
                    self._give_back(message)
            else:
                self._buffer.extend(received)
        except Exception:  # noqa: BLE001 - the next receive reports it
            pass
        finally:
            self._prefetching = None

    def _decode(self, response: m.QueueReceiveResponse) -> tuple[list[QueueMessage], list[_LeaseRun]]:
        return decode_receive(response, self.topic, self.group, self._owner)

    def _decode_batches(self, response: m.QueueReceiveBatchesResponse) -> tuple[list[QueueMessage], list[_LeaseRun]]:
        return decode_receive_batches(response, self.topic, self.group, self._owner, self._decoded)

    def __aiter__(self) -> AsyncIterator[QueueMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[QueueMessage]:
        """At-least-once: a message the loop body left unsettled is acked when the loop
        comes back for the next one (the body returned); one whose body raised is not
        (its lease is no longer extended: it runs out and the message is delivered again)."""
        while not self._closed:
            message = await self.receive(RECEIVE_POLL_MS_MAX)
            if message is None:
                continue
            self._current, self._current_settled = message, False
            try:
                yield message
            except BaseException:  # the body raised or broke out (the generator is closed)
                if not self._current_settled:
                    self._forget(message)
                self._current = None
                raise
            if self.guarantee == AT_LEAST_ONCE and not self._current_settled and not self._closed:
                self._settle_application(message, m.SettleAction.ACK, m.CONFIG_DEFAULT, None, record_error=True)
            self._current = None

    # -- settling -------------------------------------------------------------------------

    def _ack(self, message: QueueMessage, wait: bool):
        """message.ack(): the common settle, an ack of a held message without waiting,
        made short (no per-message future or task): its offset extends the outbox's
        last run of acks when it continues it."""
        run = message._lease
        if wait or run is None or self._closed:
            return self._settle(message, m.SettleAction.ACK, m.CONFIG_DEFAULT, None, wait)
        index = message.offset - run.first
        if not run.held[index]:
            return self._settle(message, m.SettleAction.ACK, m.CONFIG_DEFAULT, None, wait)
        if message is self._current:
            self._current_settled = True
        # _drop(run, index), inline:
        run.held[index] = 0
        run.remaining -= 1
        self._outstanding -= 1
        if run.handed[index]:
            self._dropped += 1
        self._leased_bytes -= run.size_each
        if not run.remaining:
            del self._lease_runs[run]
            self._leased_bytes -= run.size - run.size_each * run.count
            if not self._outstanding:
                self._dropped = self._given
        if self._room_wanted:
            self._room_wanted = False
            self._room.set()
        if self._prefetch_held_back and self._given == self._dropped:
            self._prefetch_after_settle()  # the application holds none it was handed
        offset = message.offset
        tail = self._ack_tail
        if (
            tail is not None
            and tail[1] + tail[8] == offset
            and tail[0] == run.partition
            and tail[2] == run.delivery_count
            and tail[8] < SETTLEMENTS_PER_REQUEST_MAX
        ):
            tail[8] += 1
        else:
            tail = [
                run.partition,
                offset,
                run.delivery_count,
                m.SettleAction.ACK,
                m.CONFIG_DEFAULT,
                None,
                None,
                True,
                1,
            ]
            self._outbox_append(tail)
            self._ack_tail = tail
        settled = self._settled
        if settled is None:  # one finished future serves every wait=False call
            settled = self._settled = asyncio.get_running_loop().create_future()
            settled.set_result(None)
        return settled

    def _settle(
        self, message: QueueMessage, action: m.SettleAction, delay_ms: int, text: str | None, wait: bool
    ) -> asyncio.Future:
        if message is self._current:
            self._current_settled = True
        if wait:
            future = self._settle_application(message, action, delay_ms, text, record_error=False)
            assert future is not None  # without record_error a future holds the outcome
            return future
        self._settle_application(message, action, delay_ms, text, record_error=True)
        if self._settled is None:  # one finished future serves every wait=False call
            self._settled = asyncio.get_running_loop().create_future()
            self._settled.set_result(None)
        return self._settled

    def _settle_application(
        self, message: QueueMessage, action: m.SettleAction, delay_ms: int, text: str | None, *, record_error: bool
    ) -> asyncio.Future | None:
        """On the loop: a settle the application made (directly or by iterating)."""
        future = self._settle_nowait(
            message, action, delay_ms, text, record_error=record_error, ours=self._ours(message, action)
        )
        if self._prefetch_held_back and action is not m.SettleAction.IN_PROGRESS and self._given == self._dropped:
            self._prefetch_after_settle()
        return future

    def _reply(self, message: QueueMessage, value, key, headers):
        from .request import send_reply

        return send_reply(self.client, message, value, key, headers)

    def _settle_nowait(
        self,
        message: QueueMessage,
        action: m.SettleAction,
        delay_ms: int,
        text: str | None,
        *,
        record_error: bool = True,
        ours: bool | None = False,
    ) -> asyncio.Future | None:
        """Queue a settlement (on the client's loop). Without record_error a future holds
        its result (True when it counted, False when it lost the race; in-progress: the
        new deadline or None); with it (nobody awaits) there is none and a failure is
        kept for flush() to raise. `ours`: see _outbox."""
        future = None if record_error or ours is None else asyncio.get_running_loop().create_future()
        if self._closed and action is not m.SettleAction.NACK:
            if ours is not None:
                self._fail(future, ClientClosed("the queue is closed"))
            return future
        self._outbox_append(
            [message.partition, message.offset, message.delivery_count, action, delay_ms, text, future, ours, 1]
        )
        return future

    def _outbox_append(self, entry: list) -> None:
        """Queue one outbox entry (see _outbox) and start the sender if it is idle."""
        self._outbox.append(entry)
        self._ack_tail = None  # the caller names a new tail
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_settlements())

    def _fail(self, future: asyncio.Future | None, error: BaseException) -> None:
        if future is None:
            self._errors.append(error)
        elif not future.done():
            future.set_exception(error)

    async def _send_settlements(self) -> None:
        """One request at a time; what is queued meanwhile goes out together next (at
        most SETTLEMENTS_PER_REQUEST_MAX offsets), the same settle of consecutive
        offsets as one run (an ack of a whole batch is one entry on the wire)."""
        while self._outbox:
            await self._send_settlements_once()

    async def _send_settlements_once(self) -> None:
        outbox = self._outbox
        taken = offsets = 0
        while taken < len(outbox) and offsets + outbox[taken][8] <= SETTLEMENTS_PER_REQUEST_MAX:
            offsets += outbox[taken][8]
            taken += 1
        batch = outbox[:taken]
        del outbox[:taken]
        self._ack_tail = None  # the entries taken are not extended any more
        request = m.QueueSettleRequest(group=self.group, topic=self.topic, settlements=_runs(batch))
        try:
            response = await self.client.core.call(request, None, retry=True, expect=m.QueueSettleResponse)
        except Exception as error:
            for entry in batch:
                if entry[7] is not None:
                    self._fail(entry[6], error)
            return
        answered = sum(result.count for result in response.results)
        if answered != offsets:
            mismatch = InvalidRecords(f"queue settle: outcomes for {answered} offsets, {offsets} settled")
            for entry in batch:
                if entry[7] is not None:
                    self._fail(entry[6], mismatch)
            return
        for stretch, code, deadline, count in _spread(batch, response.results):
            partition, offset, _, action, _, _, future, ours, _ = stretch
            if ours is None:
                continue  # the client's own release: nobody needs its outcome
            if code == m.ErrorCode.NONE:
                if future is not None and not future.done():
                    in_progress = action is m.SettleAction.IN_PROGRESS
                    future.set_result((deadline if deadline >= 0 else None) if in_progress else True)
                continue
            where = f"{self.topic}-{partition} offset {offset}" + (f" (and {count - 1} after)" if count > 1 else "")
            if ours and code in _LOST_RACE:
                self._stale_settles += count
                if not self.strict:
                    log.info(
                        "queue %s: %s of %s lost the race (%s): the message was delivered again or finished elsewhere",
                        self.group,
                        action.name.lower(),
                        where,
                        code.name,
                    )
                    if future is not None and not future.done():
                        future.set_result(None if action is m.SettleAction.IN_PROGRESS else False)
                    continue
            self._fail(future, error_for(code, f"{action.name.lower()} {where}"))

    async def flush(self) -> None:
        """Wait until every settlement made so far is answered; raise the first that
        failed since the last flush."""
        while self._sender is not None and not self._sender.done():
            await asyncio.shield(self._sender)
        if self._errors:
            error, self._errors = self._errors[0], []
            raise error

    async def close(self) -> None:
        """Give back messages received but not handed out, stop extending leases, send
        what is queued, close."""
        if self._closed:
            return
        self._closed = True
        if self._prefetching is not None:  # short (no long poll); it gives back what it got
            await asyncio.wait({self._prefetching})
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._keeper
        while self._buffer:
            message = self._buffer.popleft()
            run = _held_run(message)
            if run is not None:
                self._drop(run, message.offset - run.first)
            if run is not None or not self._at_least_once:
                self._settle_nowait(message, m.SettleAction.NACK, 0, None, ours=None)
        for run in self._lease_runs:
            run.held[:] = bytes(run.count)
            run.remaining = 0
        self._lease_runs.clear()
        self._outstanding = 0
        self._leased_bytes = 0
        self._dropped = self._given
        with contextlib.suppress(Exception):
            await self.flush()
        self.client.core.disown(self)


def _lease_runs_of(deliveries: list[m.QueueDelivery], records_bytes: int, topic: str) -> dict[int, list[_LeaseRun]]:
    """A receive's delivered runs as _LeaseRuns, by partition in offset order; two
    runs naming one offset are a broken answer. Each run's size is its share of the
    received record bytes."""
    offsets = sum(delivery.count for delivery in deliveries)
    runs_of: dict[int, list[_LeaseRun]] = {}
    for delivery in deliveries:
        if delivery.count < 1:
            raise InvalidRecords(f"queue receive from {topic}: a delivered run of {delivery.count} offsets")
        run = _LeaseRun(
            delivery.partition, delivery.offset, delivery.count, delivery.delivery_count, delivery.lease_deadline_ms
        )
        run.size = records_bytes * delivery.count // offsets
        run.size_each = run.size // delivery.count
        runs_of.setdefault(delivery.partition, []).append(run)
    for runs in runs_of.values():
        runs.sort(key=_run_first)
        for before, after in zip(runs, runs[1:]):
            if before.first + before.count > after.first:
                raise InvalidRecords(f"queue receive from {topic}: offset {after.first} delivered twice")
    return runs_of


def decode_receive(
    response: m.QueueReceiveResponse, topic: str, group: str, owner: Any
) -> tuple[list[QueueMessage], list[_LeaseRun]]:
    """The delivered messages of a QueueReceive response (protocol 1 and 2): one
    record per delivered offset, in the runs' order."""
    if not response.deliveries:
        return [], []
    try:
        records = [
            record for header, batch in iter_batches(response.records) for record in decode_records(batch, header)
        ]
    except NodiError as error:
        raise InvalidRecords(f"queue receive from {topic}: {error}") from None
    offsets = sum(run.count for run in response.deliveries)
    if len(records) != offsets:
        raise InvalidRecords(f"queue receive: {len(records)} records for {offsets} delivered offsets")
    runs_of = _lease_runs_of(response.deliveries, len(response.records), topic)
    runs_in_order = {(run.partition, run.first): run for runs in runs_of.values() for run in runs}
    messages = []
    runs = []
    index = 0
    for delivery in response.deliveries:  # runs of consecutive offsets
        run = runs_in_order[delivery.partition, delivery.offset]
        runs.append(run)
        partition, count, deadline = run.partition, run.delivery_count, run.deadline_ms
        for offset in range(run.first, run.first + run.count):
            record = records[index]
            index += 1
            messages.append(
                new_queue_message(
                    topic,
                    partition,
                    offset,
                    record.timestamp_ms,
                    record.key,
                    record.value,
                    record.headers,
                    count,
                    deadline,
                    group,
                    owner,
                    run,
                )
            )
    return messages, runs


def decode_receive_batches(
    response: m.QueueReceiveBatchesResponse,
    topic: str,
    group: str,
    owner: Any,
    decoded: dict[int, tuple[int, int, list]],
) -> tuple[list[QueueMessage], list[_LeaseRun]]:
    """The delivered messages of a QueueReceiveBatches response and their runs (owner:
    what they settle through; decoded: partition -> the batch decoded last): each
    span's batches decoded (a batch decoded for the last receive is not decoded
    again), keeping the records whose offsets the runs name, in the batches' order.
    Every delivered offset must come exactly once (InvalidRecords otherwise): the
    runs do not overlap, a partition's records come in increasing offset order, and
    as many as the runs name."""
    if not response.deliveries:
        return [], []
    view = memoryview(response.records)
    if sum(span.records_bytes for span in response.spans) != len(view):
        raise InvalidRecords(f"queue receive from {topic}: spans do not cover the records")
    runs_of = _lease_runs_of(response.deliveries, len(view), topic)
    make = new_queue_message
    messages: list[QueueMessage] = []
    after: dict[int, int] = {}  # partition -> the last offset taken: the next must be above
    position = 0
    try:
        for span in response.spans:
            chunk = view[position : position + span.records_bytes]
            position += span.records_bytes
            partition = span.partition
            runs = runs_of.get(partition, [])
            last_taken = after.get(partition, -1)
            index = 0
            for header, batch in iter_batches(chunk):
                cached = decoded.get(partition)
                if cached is not None and cached[0] == header.base_offset and cached[1] == header.crc:
                    records = cached[2]
                else:
                    records = decode_records(batch, header)
                    decoded[partition] = (header.base_offset, header.crc, records)
                if not records:
                    continue
                first, last = records[0].offset, records[-1].offset
                while index < len(runs) and runs[index].first + runs[index].count <= first:
                    index += 1
                if index == len(runs):
                    break
                run = runs[index]
                if run.first <= first and last < run.first + run.count and last - first + 1 == len(records):
                    # The common case: the batch (a slice) is one run's records, all delivered.
                    if first <= last_taken:
                        raise InvalidRecords(f"queue receive from {topic}: offset {first} came twice")
                    last_taken = last
                    count, deadline = run.delivery_count, run.deadline_ms
                    messages.extend(
                        [
                            make(
                                topic,
                                partition,
                                offset,
                                timestamp,
                                key,
                                value,
                                headers,
                                count,
                                deadline,
                                group,
                                owner,
                                run,
                            )
                            for offset, timestamp, key, value, headers in records
                        ]
                    )
                    continue
                for offset, timestamp, key, value, headers in records:
                    while index < len(runs) and runs[index].first + runs[index].count <= offset:
                        index += 1
                    if index == len(runs):
                        break
                    run = runs[index]
                    if offset < run.first:
                        continue  # in the batch, not delivered to this receive
                    if offset <= last_taken:
                        raise InvalidRecords(f"queue receive from {topic}: offset {offset} came twice")
                    last_taken = offset
                    messages.append(
                        make(
                            topic,
                            partition,
                            offset,
                            timestamp,
                            key,
                            value,
                            headers,
                            run.delivery_count,
                            run.deadline_ms,
                            group,
                            owner,
                            run,
                        )
                    )
            after[partition] = last_taken
    except InvalidRecords:
        raise
    except NodiError as error:
        raise InvalidRecords(f"queue receive from {topic}: {error}") from None
    offsets = sum(run.count for run in response.deliveries)
    if len(messages) != offsets:
        raise InvalidRecords(f"queue receive: {len(messages)} records for {offsets} delivered offsets")
    return messages, [run for runs in runs_of.values() for run in runs]


def _run_first(run: _LeaseRun) -> int:
    return run.first


def _run_position(run: _LeaseRun) -> tuple[int, int]:
    return run.partition, run.first


def _held_pieces(run: _LeaseRun) -> Iterator[tuple[int, int]]:
    """(first index, count) of each stretch of consecutive offsets `run` holds."""
    held = run.held
    index = held.find(1)
    while index >= 0:
        end = held.find(0, index)
        if end < 0:
            end = len(held)
        yield index, end - index
        index = held.find(1, end)


def _held_indexes(run: _LeaseRun) -> list[int]:
    return [index for start, count in _held_pieces(run) for index in range(start, start + count)]


def _spread(entries: list, results: list[m.SettleResult]) -> Iterator[tuple[Any, ErrorCode, int, int]]:
    """The outcomes of a settle request over what it settled: `entries` are sequences
    whose [1] is their first offset (or index) and whose [-1] is their count, in the
    request's order, and the results cover the same offsets in order (the caller
    checked the totals). Yields (entry, error code, lease deadline ms, count) for each
    stretch of an entry with one outcome; entry[1] is not moved on: the yielded entry
    is a copy with its first offset (or index) and count for the stretch."""
    position = 0  # within results[result_index]
    result_index = 0
    for entry in entries:
        first, left = entry[1], entry[-1]
        while left:
            result = results[result_index]
            length = min(left, result.count - position)
            stretch = (entry[0], first, *entry[2:-1], length)
            yield stretch, result.error_code, result.lease_deadline_ms, length
            first += length
            left -= length
            position += length
            if position == result.count:
                result_index += 1
                position = 0


def _runs(batch: list[list]) -> list[m.Settlement]:
    """The outbox entries of `batch` ([partition, offset, delivery count, action,
    delay, text, future, ours, count], in order) as settlements in runs: consecutive
    offsets of one partition with the same delivery count, action, delay and text."""
    runs: list[list] = []  # [partition, first offset, delivery count, action, delay, text, count]
    last = None
    for partition, offset, delivery_count, action, delay_ms, text, _, _, count in batch:
        if (
            last is not None
            and last[0] == partition
            and last[1] + last[6] == offset
            and last[2] == delivery_count
            and last[3] is action
            and last[4] == delay_ms
            and last[5] == text
        ):
            last[6] += count
        else:
            last = [partition, offset, delivery_count, action, delay_ms, text, count]
            runs.append(last)
    return [
        m.Settlement(
            partition=partition,
            offset=offset,
            delivery_count=delivery_count,
            action=action,
            delay_ms=delay_ms,
            text=text,
            count=count,
        )
        for partition, offset, delivery_count, action, delay_ms, text, count in runs
    ]


class Queue:
    """The blocking twin of AsyncQueue, made by Client.queue; iterate it or receive().
    Its lease keeper runs on the client's loop thread, so leases are extended while the
    application's thread is busy in a handler."""

    def __init__(self, client, topic: str, group: str, **options: Any) -> None:
        self._client = client
        self._async: AsyncQueue = client.core.run(self._make(client.core.async_client, topic, group, options), None)
        self._async._owner = self
        # Settles made with wait=False, handed to the loop thread in runs.
        self._local: list[tuple] = []
        self._local_lock = threading.Lock()
        self._current: QueueMessage | None = None
        self._current_settled = False
        client.core.own(self)

    @staticmethod
    async def _make(client, topic, group, options) -> AsyncQueue:
        return AsyncQueue(client, topic, group, **options)

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._async).replace("AsyncQueue", "Queue")

    @property
    def topic(self) -> str:
        return self._async.topic

    @property
    def group(self) -> str:
        return self._async.group

    @property
    def closed(self) -> bool:
        return self._async.closed

    def statistics(self) -> QueueStatistics:
        return self._async.statistics()

    def receive_batch(self, max_messages: int, timeout_ms: int | None = None) -> list[QueueMessage]:
        """As AsyncQueue.receive_batch: up to `max_messages` messages, waiting up to
        timeout_ms (default receive_timeout_ms) for the first; [] when none came."""
        queue = self._async
        wait = queue.receive_timeout_ms if timeout_ms is None else timeout_ms
        return self._client.core.run(queue.receive_batch(max_messages, timeout_ms), None, wait)

    def receive(self, timeout_ms: int | None = None) -> QueueMessage | None:
        """As AsyncQueue.receive: the next message, waiting up to timeout_ms (default
        receive_timeout_ms) for one; None when none came."""
        queue = self._async
        loop = self._client.core.loop
        while not queue.closed:  # received already: no trip to the loop thread
            try:
                message = queue._buffer.popleft()
            except IndexError:
                break
            if not queue._usable(message):
                loop.call_soon_threadsafe(queue._discard, message)
                continue
            queue._hand_out(message)
            queue._time_handler()
            if (
                queue._backlog
                and queue._prefetching is None
                and len(queue._buffer) <= queue._prefetch_buffered_max
                and queue.prefetch
                and len(queue._buffer) <= queue._trip_max() // 2
            ):
                loop.call_soon_threadsafe(queue._prefetch_soon, message)  # after the settles queued before
            return message
        wait = queue.receive_timeout_ms if timeout_ms is None else timeout_ms
        return self._client.core.run(queue._receive(timeout_ms), None, wait)

    def __iter__(self) -> Iterator[QueueMessage]:
        """As AsyncQueue's: at-least-once acks what the loop body left unsettled when
        the loop comes back for the next message."""
        while not self.closed:
            message = self.receive(RECEIVE_POLL_MS_MAX)
            if message is None:
                continue
            self._current, self._current_settled = message, False
            try:
                yield message
            except BaseException:  # the body raised or broke out (the generator is closed)
                if not self._current_settled:
                    with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to extend
                        self._client.core.call_soon(self._async._forget, message)
                self._current = None
                raise
            if self._async.guarantee == AT_LEAST_ONCE and not self._current_settled and not self.closed:
                self._settle(message, m.SettleAction.ACK, m.CONFIG_DEFAULT, None, False)
            self._current = None

    def _ack(self, message: QueueMessage, wait: bool):
        return self._settle(message, m.SettleAction.ACK, m.CONFIG_DEFAULT, None, wait)

    def _settle(self, message: QueueMessage, action: m.SettleAction, delay_ms: int, text: str | None, wait: bool):
        if message is self._current:
            self._current_settled = True
        queue = self._async
        if wait:

            async def settle():
                return await queue._settle_application(message, action, delay_ms, text, record_error=False)

            return self._client.core.run(settle(), None)
        with self._local_lock:
            self._local.append((message, action, delay_ms, text))
            first = len(self._local) == 1
        if first:  # one wake-up of the loop thread for a run of settles
            self._client.core.call_soon(self._drain_local)
        return None

    def _drain_local(self) -> None:
        with self._local_lock:
            pending, self._local = self._local, []
        queue = self._async
        for message, action, delay_ms, text in pending:
            if action is m.SettleAction.ACK:  # extends the outbox's run of acks, as AsyncQueue's
                queue._ack(message, False)
            else:
                queue._settle_application(message, action, delay_ms, text, record_error=True)

    def _reply(self, message: QueueMessage, value, key, headers) -> bool:
        from .request import send_reply

        return self._client.core.run(send_reply(self._client.core.async_client, message, value, key, headers), None)

    def flush(self) -> None:
        self._client.core.run(self._async.flush(), None)

    def close(self) -> None:
        if self._client.closed:
            return
        self._client.core.run(self._async.close(), None)
        self._client.core.disown(self)
