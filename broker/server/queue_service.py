"""The server side of queue groups: QueueReceive, QueueSettle and QueueDescribe, the
lease timer, the dead-letter writer, and persistence (broker/server/queues.py is the state
machine; broker/server/queue_state.py its stored form; broker/server/dead_letters.py the DLQ copies).

Runs on the broker's event loop; the state machine is not thread-safe and is only
touched here. Times given to it are wall-clock ms.

Persistence. Every change marks its partition dirty. Once per loop tick the dirty
partitions are encoded and staged in the metadata store, and the broker's metadata flush
(one LMDB commit, one fsync, shared with stream-group offset commits) writes them. A
settle answers after the flush that holds its acks: an answered ack survives a crash. A
receive that holds a redelivery, or a first delivery beyond the partition's committed
reservation, answers after the flush that holds its delivery counts; one made only of
first deliveries within the committed reservation answers at once, and its state goes
with the next commit (a settle's, the timer's within TIMER_INTERVAL_MAX_S, or at once
when the reservation moved ahead; broker/server/queues.py, "Reservation": after a crash each
offset of the reservation counts as delivered once). Either way a crash never lowers a
delivery count that a consumer saw.

The timer. Leases and not-before times run out in the timer's rounds (receives also tick
their own group). A round visits only the groups that need it: those changed since the
last round (every change marks a partition dirty, and that names its group) and those
whose earliest deadline, or dead-letter retry, is due (a heap of visits). Each visit
ticks the group, writes its dead letters and schedules its next deadline; a visit that
finds nothing to do is harmless. So a round costs what happened, not the number of
groups, and the changed groups are staged without a scan either.

Dead letters. A message marked for dead-lettering (max deliveries reached, rejected) is
appended to the dead-letter topic by the writer task, which waits until the append is
fsynced, and only then acks it in the source (the ack is persisted like any other). A
crash between the two makes the message be dead-lettered again after the restart: it may
be duplicated in the dead-letter topic, never lost. The dead-letter topic is created on
first use with the server's topic defaults and the source topic's partition count; a
source partition p goes to partition p modulo the dead-letter topic's partition count.
"""

from __future__ import annotations

import asyncio
import bisect
import builtins  # QueueService.list (the queue listing) shadows the builtin in the class body
import collections
import dataclasses
import functools
import heapq
import itertools
import logging
import math
import operator
import threading
from dataclasses import dataclass

from nodi.storage.errors import (
    InvalidConfigError,
    MetadataUnavailableError,
    NodiError,
    TopicExistsError,
    UnknownTopicError,
)
from nodi.storage.limits import RecordLimits
from nodi.storage.metadata import validate_topic_name
from nodi.storage.records import NewRecord, build_batch, decode_records, iter_batches, records_without_headers

from ..protocol import messages as m
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.headers import DLQ_VALUE_OMITTED, NOT_BEFORE_MS, TTL_MS, expires_at_ms, find_integer
from ..protocol.queue_settings import DEFAULT_QUEUE_LIMITS, Backoff, QueueLimits, QueueSettings
from .clock import SYSTEM_CLOCK, Clock
from .dead_letters import dead_letter_record
from .group_names import check_group_name
from .queue_batches import StoredBatch
from .queue_group import QueueGroup
from .queue_state import QueueStateError, decode_partition, encode_partition, state_bytes_max
from .queues import (
    DeadLetter,
    DeadLetterReason,
    Delivery,
    DeliveryState,
    PartitionQueue,
    QueueGroupStatistics,
    Taken,
)
from .reply import Reply

log = logging.getLogger("nodi.queues")

# Bytes of one read from a partition log when collecting the records to deliver.
READ_BYTES = 256 * 1024
# Kept out of the response budget for the frame header and the deliveries array.
RESPONSE_OVERHEAD_BYTES = 64 * 1024
# Dead letters written per pass, and the pause after a failed pass.
DEAD_LETTERS_PER_PASS = 500
DEAD_LETTER_RETRY_S = 1.0  # the first retry of a failed pass, doubling up to the max
DEAD_LETTER_RETRY_MAX_S = 60.0
# Decoded batches kept for the next receives (one per partition, the most recent ones).
DECODED_BATCHES_MAX = 64
# Reads of stored batches kept for the next receives (one per partition, the most recent).
STORED_READS_MAX = 64
# Receives of at most this many messages, all among the last this many offsets of their
# log, read on the event loop (just written: in the page cache); others in a thread.
TAIL_READ_MESSAGES_MAX = 16
# QueueLeases: at most this many in-flight messages listed per request.
QUEUE_LEASES_LISTED_MAX = 1000
# The timer's longest sleep (it also wakes when told to).
TIMER_INTERVAL_MAX_S = 0.5


def _record_bytes(record: NewRecord) -> int:
    """Key, value and header bytes: what record_bytes_max bounds."""
    return (
        len(record.key or b"")
        + len(record.value or b"")
        + sum(len(name.encode()) + len(value or b"") for name, value in record.headers)
    )


# Per-record framing in a batch (length, attributes, deltas, lengths: varints), at most.
_RECORD_OVERHEAD_BYTES = 64
_BATCH_OVERHEAD_BYTES = 4 * 1024


def _chunks(items: list, limits: RecordLimits) -> list[list]:
    """`items` ((letter, copy) pairs) cut into runs whose batch fits the log's limits.
    A copy too big for any batch (a source record near the limits plus the dead-letter
    headers) goes without its value, marked by the value-omitted header: the source log
    still holds it, at the offset the headers name."""
    budget = limits.batch_bytes_max - _BATCH_OVERHEAD_BYTES
    runs: list[list] = [[]]
    used = 0
    for letter, copy in items:
        size = _record_bytes(copy)
        if size > limits.record_bytes_max or size + _RECORD_OVERHEAD_BYTES > budget:
            log.error(
                "dead-letter copy of partition %d offset %d is %d bytes, over the log's limits: "
                "written without its value",
                letter.partition,
                letter.offset,
                size,
            )
            copy = copy._replace(value=None, headers=[*copy.headers, (DLQ_VALUE_OMITTED, b"1")])
            size = _record_bytes(copy)
        size += _RECORD_OVERHEAD_BYTES
        if runs[-1] and used + size > budget:
            runs.append([])
            used = 0
        runs[-1].append((letter, copy))
        used += size
    return [run for run in runs if run]


_partition_of = operator.attrgetter("partition")


def _by_offset(item: Taken) -> int:
    return item.offset


def _one_lease(items: list[Taken]) -> bool:
    """Whether every item of `items` has the first one's delivery count and deadline."""
    counts = {item.delivery_count for item in items}
    deadlines = {item.lease_deadline_ms for item in items}
    return len(counts) == 1 and len(deadlines) == 1


def _last_offset(stored: StoredBatch) -> int:
    return stored.header.last_offset


# Header names whose presence in a stored batch's bytes makes a receive decode it.
_DELIVERY_HEADERS = (TTL_MS.encode(), NOT_BEFORE_MS.encode())


def _must_decode(stored: StoredBatch, topic_ttl_ms: int) -> bool:
    """Whether a receive must look into a stored batch's records (see _collect_batches);
    a value that happens to contain a header's name only costs a decode."""
    if topic_ttl_ms > 0 or not stored.sliceable:
        return True
    if stored.names_delivery_header is None:  # searched once per batch read
        # A producer's batch is uniform: when its first record has no header, none has,
        # and its bytes need no search (a search of 256 KiB costs about 2 us a message).
        stored.names_delivery_header = not records_without_headers(stored.data, stored.header) and any(
            name in stored.data for name in _DELIVERY_HEADERS
        )
    return stored.names_delivery_header


def _cut(stored: StoredBatch, items: list[Taken]) -> bytes:
    """What of `stored` a receive sends for `items` (its delivered offsets, in order):
    a sliceable batch cut to the records from the first to the last of them (the ones
    between, if any, are not delivered and the receiver skips them), else all of it."""
    if not stored.sliceable:
        return stored.data
    return stored.slice(items[0].offset, items[-1].offset)


def now_ms() -> int:
    """The real wall clock in ms (QueueService reads its broker's clock instead)."""
    return SYSTEM_CLOCK.time_ms()


def _delivered(taken: list[Taken], deliveries: list[m.QueueDelivery]) -> list[Taken]:
    """The items of `taken` that `deliveries` (runs) hand out, in `taken`'s order."""
    sent = {(run.partition, offset) for run in deliveries for offset in range(run.offset, run.offset + run.count)}
    return [item for item in taken if (item.partition, item.offset) in sent]


def _wake_once(future: asyncio.Future) -> None:
    """A waiting receive's timer: it looks again (as when woken)."""
    if not future.done():
        future.set_result(None)


def _expire_wait(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _settle_waiters(waiters: list[asyncio.Future], error: BaseException | None) -> None:
    """A persist pass ended: each waiter still waiting gets its outcome."""
    for future in waiters:
        if future.done():  # gave up (timed out, cancelled)
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


def settings_from_wire(wire: m.QueueGroupSettings, base: QueueSettings) -> QueueSettings:
    """`base` with the values the request names (-1, null and backoff kind default keep
    base's)."""
    backoff = base.backoff
    given = wire.backoff
    if given.kind is m.BackoffKind.DELAYS:
        backoff = Backoff(delays_ms=tuple(given.delays_ms))
    elif given.kind is m.BackoffKind.EXPONENTIAL:
        backoff = Backoff((), given.base_ms, given.multiplier_percent, given.max_ms, given.jitter_percent)
    expired = base.expired
    if wire.expired is not m.ExpiredAction.DEFAULT:
        expired = "dead-letter" if wire.expired is m.ExpiredAction.DEAD_LETTER else "drop"
    return QueueSettings(
        ack_wait_ms=base.ack_wait_ms if wire.ack_wait_ms == m.CONFIG_DEFAULT else wire.ack_wait_ms,
        max_deliveries=base.max_deliveries if wire.max_deliveries == m.CONFIG_DEFAULT else wire.max_deliveries,
        backoff=backoff,
        dead_letter_topic=base.dead_letter_topic if wire.dead_letter_topic is None else wire.dead_letter_topic,
        expired=expired,
    )


def settings_to_wire(settings: QueueSettings) -> m.QueueGroupSettings:
    backoff = settings.backoff
    if backoff.delays_ms:
        wire_backoff = m.QueueBackoff(kind=m.BackoffKind.DELAYS, delays_ms=list(backoff.delays_ms))
    else:
        wire_backoff = m.QueueBackoff(
            kind=m.BackoffKind.EXPONENTIAL,
            base_ms=backoff.base_ms,
            multiplier_percent=backoff.multiplier_percent,
            max_ms=backoff.max_ms,
            jitter_percent=backoff.jitter_percent,
        )
    expired = m.ExpiredAction.DEAD_LETTER if settings.expired == "dead-letter" else m.ExpiredAction.DROP
    return m.QueueGroupSettings(
        ack_wait_ms=settings.ack_wait_ms,
        max_deliveries=settings.max_deliveries,
        backoff=wire_backoff,
        dead_letter_topic=settings.dead_letter_topic,
        expired=expired,
    )


@dataclass(frozen=True, slots=True)
class QueueServiceStatistics:
    groups: tuple[QueueGroupStatistics, ...]
    dead_letter_failures: int  # passes of the dead-letter writer that failed (and were retried)
    timer_rounds: int  # rounds of the lease timer
    timer_groups_visited: int  # groups those rounds ticked (the changed ones and the due ones)


class QueueService:
    def __init__(self, broker, limits: QueueLimits = DEFAULT_QUEUE_LIMITS) -> None:
        limits.validate()
        self.broker = broker
        self.store = broker.store
        self._clock: Clock = broker.clock
        worst_state_bytes = state_bytes_max(
            limits.window_messages_max, limits.error_text_bytes_max, limits.backoff_delays_max
        )
        if worst_state_bytes > self.store.metadata.limits.queue_state_bytes_max:
            raise InvalidConfigError(
                f"queues.window_messages_max {limits.window_messages_max} with error_text_bytes_max "
                f"{limits.error_text_bytes_max} can make a partition's state {worst_state_bytes} bytes, over the "
                f"metadata store's queue_state_bytes_max {self.store.metadata.limits.queue_state_bytes_max}"
            )
        self.limits = limits
        self.groups: dict[tuple[str, str], QueueGroup] = {}
        self._waiters: dict[tuple[str, str], set[asyncio.Future]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: asyncio.TaskGroup | None = None
        # The waiters of the next tick's stage + flush (None: no pass scheduled).
        self._persist_waiters: list[asyncio.Future] | None = None
        self._wake = asyncio.Event()
        self.dead_letter_failures = 0
        self.timer_rounds = self.timer_groups_visited = 0
        # The timer visits only the groups that need it: those changed since its last round
        # (_touched) and those with a deadline due (_due, a heap of (wall ms, group key);
        # _scheduled holds each group's earliest entry, so entries that are no longer
        # needed are few, and harmless: a visit that finds nothing to do).
        self._touched: set[tuple[str, str]] = set()
        self._due: list[tuple[int, tuple[str, str]]] = []
        self._scheduled: dict[tuple[str, str], int] = {}
        self._unstaged: set[tuple[str, str]] = set()  # groups with partitions to stage
        # (group, topic) -> (monotonic time of the next try, the delay that led to it).
        self._dead_letter_backoff: dict[tuple[str, str], tuple[float, float]] = {}
        # (topic, partition) -> (base offset, last offset, records) of its last decoded batch.
        # Reads run in threads (_read_records), hence the lock.
        self._batches: collections.OrderedDict[tuple[str, int], tuple[int, int, list]] = collections.OrderedDict()
        self._batches_lock = threading.Lock()
        # (topic, partition) -> (first base offset, last offset, [(header, batch bytes)]) of
        # its last read of stored batches (QueueReceiveBatches), under the same lock.
        self._stored: collections.OrderedDict[tuple[str, int], tuple[int, int, list]] = collections.OrderedDict()
        self._load()

    def attach(self, loop: asyncio.AbstractEventLoop, tasks: asyncio.TaskGroup) -> None:
        self._loop = loop
        self._tasks = tasks
        tasks.create_task(self._timer())

    # -- start-up ------------------------------------------------------------------------

    def _load(self) -> None:
        """Groups from the metadata store, held to the logs (the log is the truth)."""
        topics = self.store.topics()
        now = self._clock.time_ms()
        for entry in self.store.metadata.iter_queue_state():
            try:
                self._load_partition(entry, topics, now)
            except Exception:  # one bad entry never stops the server; its messages come again
                log.exception("queue group %s on %s-%d: state not loaded", entry.group, entry.topic, entry.partition)
        for group in self.groups.values():
            group.ensure_partitions(topics[group.topic].partitions)
        self._touched.update(self.groups)  # the first round schedules their deadlines

    def _load_partition(self, entry, topics: dict, now: int) -> None:
        config = topics.get(entry.topic)
        if config is None or entry.partition >= config.partitions:
            return
        try:
            decoded = decode_partition(entry.state)
        except QueueStateError as error:
            log.error(
                "queue group %s on %s-%d: dropping unreadable state (%s); its messages are delivered again",
                entry.group,
                entry.topic,
                entry.partition,
                error,
            )
            return
        key = (entry.group, entry.topic)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = QueueGroup(
                entry.group, entry.topic, decoded.settings, self.limits, on_change=self._changed
            )
        group.ensure_partitions(config.partitions)
        # Held to the log's real end (I6): a partition not closed cleanly is recovered
        # now, before the broker listens (the background open has not started yet); a
        # clean one not open yet ends where its checkpoint says (its clean close wrote it).
        if self.store.recovering(entry.topic, entry.partition):
            self.store.log(entry.topic, entry.partition, recover_now=True)
        summary = self.store.partition_summary(entry.topic, entry.partition)
        end = summary.high_watermark
        next_offset = min(decoded.next_offset, end)
        floor = min(decoded.floor, next_offset)
        if next_offset < decoded.next_offset:
            log.warning(
                "queue group %s on %s-%d: the log ends at %d, before the group's next offset %d",
                entry.group,
                entry.topic,
                entry.partition,
                end,
                decoded.next_offset,
            )
        queue = PartitionQueue(entry.partition, group.settings, self.limits, floor, next_offset)
        queue.set_log_bounds(summary.log_start_offset, end)
        for delivery in decoded.deliveries:
            if queue.floor <= delivery.offset < queue.next_offset:
                queue.restore(delivery, now)
        in_doubt = queue.restore_reserved(decoded.reservation_end, now)
        if in_doubt:
            log.info(
                "queue group %s on %s-%d: %d offset(s) of the delivery reservation counted as delivered "
                "once (an unclean stop)",
                entry.group,
                entry.topic,
                entry.partition,
                in_doubt,
            )
        group.partitions[entry.partition] = queue
        if in_doubt:
            group.mark_dirty(entry.partition)

    # -- requests ------------------------------------------------------------------------

    def _group_for(self, group_name: str, topic: str, wire: m.QueueGroupSettings | None) -> QueueGroup:
        config = self.store.topic_config(topic)
        if config is None:
            raise UnknownTopicError(f"topic {topic!r} does not exist")
        key = (group_name, topic)
        group = self.groups.get(key)
        if group is None:
            if wire is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_QUEUE_GROUP,
                    f"no queue group {group_name!r} on topic {topic!r}",
                    closes_connection=False,
                )
            check_group_name(group_name, self.store.metadata.limits.group_name_bytes_max)
            if len(self.groups) >= self.limits.queue_groups_max:
                raise ProtocolError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"queue_groups_max {self.limits.queue_groups_max} reached",
                    closes_connection=False,
                )
            settings = settings_from_wire(wire, QueueSettings())
            settings.validate(self.limits)
            validate_topic_name(settings.dead_letter_topic_for(topic))
            group = self.groups[key] = QueueGroup(group_name, topic, settings, self.limits, on_change=self._changed)
            for partition in range(config.partitions):
                group.mark_dirty(partition)  # the settings are stored now
        elif wire is not None:
            wanted = settings_from_wire(wire, group.settings)
            if wanted != group.settings:
                raise ProtocolError(
                    ErrorCode.QUEUE_SETTINGS_MISMATCH,
                    f"queue group {group_name!r} on {topic!r} has settings {group.settings}; the request asks "
                    f"for {wanted}",
                    closes_connection=False,
                )
        group.ensure_partitions(config.partitions)
        return group

    def _refresh(self, group: QueueGroup) -> None:
        for queue in group.partitions:
            # One not open yet (after a start) is skipped: nothing of it is delivered until
            # the background open gets to it (moved to the front now).
            partition_log = self.store.opened_log(group.topic, queue.partition)
            if partition_log is None:
                continue
            if queue.set_log_bounds(partition_log.log_start_offset, partition_log.readable_end_offset):
                group.mark_dirty(queue.partition)

    async def receive(self, request: m.QueueReceiveRequest) -> Reply:
        """QueueReceive (protocol versions 1 and 2): each delivered record decoded and
        encoded again into one response batch."""

        async def respond(group: QueueGroup, taken: list[Taken], budget: int, now: int):
            deliveries, records = await self._collect(group, taken, budget, now)
            if not deliveries:
                return deliveries, None, ()
            batch = build_batch(records, limits=RecordLimits(batch_bytes_max=budget, record_bytes_max=budget))
            return (
                deliveries,
                m.QueueReceiveResponse(request_id=request.request_id, deliveries=deliveries, records=batch),
                (),
            )

        return await self._receive(request, respond, m.QueueReceiveResponse(request_id=request.request_id))

    async def receive_batches(self, request: m.QueueReceiveBatchesRequest) -> Reply:
        """QueueReceiveBatches (protocol version 3): the stored batches holding the
        delivered offsets, sent as they are, with the runs of delivered offsets."""

        async def respond(group: QueueGroup, taken: list[Taken], budget: int, now: int):
            deliveries, spans, batches = await self._collect_batches(group, taken, budget, now)
            if not deliveries:
                return deliveries, None, ()
            # The batches go out after the frame's header as they are (Reply.buffers):
            # not joined into one copy, nor copied again into the frame.
            response = m.QueueReceiveBatchesResponse(request_id=request.request_id, deliveries=deliveries, spans=spans)
            return deliveries, response, tuple(batches)

        return await self._receive(request, respond, m.QueueReceiveBatchesResponse(request_id=request.request_id))

    async def _receive(self, request, respond, empty: m.Response) -> Reply:
        """A receive of either version: lease, collect (`respond` returns the runs
        delivered, the response and the buffers of its records), persist when the answer
        needs it, or wait."""
        group = self._group_for(request.group, request.topic, request.settings)
        count = min(max(request.messages_max, 1), self.limits.receive_messages_max)
        wait_s = min(max(request.wait_ms, 0), self.limits.receive_wait_max_ms) / 1000
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        budget = self.broker.config.protocol.frame_bytes_max - RESPONSE_OVERHEAD_BYTES
        while True:
            self._refresh(group)
            now = self._clock.time_ms()
            if group.tick(now):
                self._wake.set()  # dead letters may be waiting
            taken = group.receive(count, now)
            if taken:
                try:
                    deliveries, response, buffers = await respond(group, taken, budget, now)
                except BaseException:
                    # Nothing was answered, so nothing was seen: the deliveries are taken
                    # back (uncounted, available again), not left leased to no one until
                    # their ack_wait runs out (a partition not open yet, a failed read).
                    group.release(taken)
                    self._notify(group)
                    raise
                if deliveries:
                    if group.answerable_uncommitted(deliveries):
                        # Its state goes with the next settle's commit (or the timer's);
                        # only a reservation moved ahead is committed now, to be ready.
                        if group.reservation_moved():
                            self._persist_soon()
                    else:
                        try:
                            await self.persist()
                        except Exception:
                            # Not answered, so not seen: the deliveries are taken back
                            # (uncounted, available again), not left leased to no one.
                            group.release(_delivered(taken, deliveries))
                            self._notify(group)
                            raise
                    return Reply(response, buffers=buffers)
                continue  # every one was a gap or not due: look again
            remaining = deadline - loop.time()
            if remaining <= 0:
                return Reply(empty)
            await self._wait_for_change(group, remaining, now)
            if self.groups.get((group.group, group.topic)) is not group:
                raise UnknownTopicError(f"topic {request.topic!r} was deleted")

    async def _wait_for_change(self, group: QueueGroup, remaining_s: float, now: int) -> None:
        """Until the group's state changes, one of its partitions grows, a timer of it
        is due, or `remaining_s` passes."""
        assert self._loop is not None  # attach() ran: receives are served on the loop
        future = self._loop.create_future()
        key = (group.group, group.topic)
        self._waiters.setdefault(key, set()).add(future)
        partition_waiters = []
        for queue in group.partitions:
            partition_log = self.store.opened_log(group.topic, queue.partition)
            if partition_log is None:  # not open yet: the wait's timeout looks again
                continue
            waiters = self.broker._waiters.get(id(partition_log))
            if waiters is not None:
                waiters.futures.add(future)
                partition_waiters.append(waiters)
        timeout_s = remaining_s
        next_deadline = group.next_deadline_ms()
        if next_deadline is not None:
            timeout_s = min(timeout_s, max(next_deadline - now, 0) / 1000 + 0.001)
        # Its own future and a timer that settles it, cancelled when woken first: one loop
        # turn to resume (asyncio.wait_for adds a second future and a done callback that
        # passes the result on, a turn of its own, and a cancel of the future on timeout).
        expiry = self._loop.call_later(timeout_s, _wake_once, future)
        try:
            await future
        finally:
            expiry.cancel()
            self._waiters.get(key, set()).discard(future)
            for waiters in partition_waiters:
                waiters.futures.discard(future)

    def on_partition_opened(self, topic: str) -> None:
        """A partition of `topic` was opened after the start (on first use, or again
        after an idle close): receives waiting on the topic's groups look again, since
        they skipped it while it was not open. On the loop."""
        for key in [key for key in self._waiters if key[1] == topic]:
            self._wake_waiters(key)

    def _notify(self, group: QueueGroup) -> None:
        self._wake_waiters((group.group, group.topic))

    def _wake_waiters(self, key: tuple[str, str]) -> None:
        """Wake the receives waiting on the (group, topic) `key`: they look again."""
        for future in self._waiters.pop(key, ()):
            if not future.done():
                future.set_result(None)

    async def _collect(
        self, group: QueueGroup, taken: list[Taken], budget: int, now: int
    ) -> tuple[list[m.QueueDelivery], list[NewRecord]]:
        """Read the records of `taken`. Offsets with no record are skipped (done); a
        message whose TTL (its header, else the topic's ttl_ms) has passed is expired; one
        whose not-before header is ahead of `now` is deferred to it; what does not fit
        in `budget` bytes, or cannot be read, is released."""
        wanted = [(t.partition, t.offset) for t in taken]
        if len(taken) <= TAIL_READ_MESSAGES_MAX and all(self._at_tail(group.topic, t) for t in taken):
            # A few messages just appended (a request, a trickle): in the page cache, read
            # here rather than paying a thread hop on the latency path.
            found = self._read_records(group.topic, wanted)
        else:  # a read may go to the disk: off the loop (the leases are taken already)
            found = await asyncio.to_thread(self._read_records, group.topic, wanted)
        config = self.store.topic_config(group.topic)
        topic_ttl_ms = config.ttl_ms if config is not None else 0
        runs: list[list[int]] = []  # [partition, offset, delivery count, deadline, length]
        records: list[NewRecord] = []
        unsent: list[Taken] = []
        used = 0
        for item in taken:
            record = found.get((item.partition, item.offset))
            if record is None:
                group.skip(item.partition, item.offset)
                continue
            if isinstance(record, Exception):
                unsent.append(item)
                continue
            headers = record.headers
            size = 64 + len(record.key or b"") + len(record.value or b"")
            if headers or topic_ttl_ms:  # without either there is no TTL nor delay to honour
                expires_at = expires_at_ms(record.timestamp_ms, headers, topic_ttl_ms)
                if expires_at is not None and expires_at <= now:
                    group.expire(item)  # never handed out: dropped or dead-lettered
                    continue
                not_before = find_integer(headers, NOT_BEFORE_MS)
                if not_before is not None and not_before > now:
                    group.defer(item, not_before)  # delayed delivery: not due yet
                    continue
                size += sum(len(k) + len(v or b"") + 8 for k, v in headers)
            if records and used + size > budget:
                unsent.append(item)
                continue
            used += size
            run = runs[-1] if runs else None
            if (
                run is not None
                and run[0] == item.partition
                and run[1] + run[4] == item.offset
                and run[2] == item.delivery_count
                and run[3] == item.lease_deadline_ms
            ):
                run[4] += 1  # consecutive: one entry on the wire
            else:
                runs.append([item.partition, item.offset, item.delivery_count, item.lease_deadline_ms, 1])
            records.append(NewRecord(record.key, record.value, record.headers, record.timestamp_ms))
        deliveries = [
            m.QueueDelivery(
                partition=partition, offset=offset, delivery_count=count, lease_deadline_ms=deadline, count=length
            )
            for partition, offset, count, deadline, length in runs
        ]
        group.release(unsent)
        failures = [r for r in found.values() if isinstance(r, Exception)]
        if not deliveries and failures:
            raise failures[0]
        return deliveries, records

    async def _collect_batches(
        self, group: QueueGroup, taken: list[Taken], budget: int, now: int
    ) -> tuple[list[m.QueueDelivery], list[m.QueueBatchSpan], list]:
        """The stored batches holding `taken`, as they are on disk, with the runs of
        offsets delivered. A batch is decoded only when it must be looked into: its topic
        has a TTL, its bytes name the TTL or not-before header, it is compressed, or its
        offsets are not dense (a compacted batch: which offsets it holds). Offsets with no
        record are skipped (done), expired and deferred ones as in `_collect`; what does
        not fit in `budget` bytes, or cannot be read, is released."""
        topic = group.topic
        config = self.store.topic_config(topic)
        topic_ttl_ms = config.ttl_ms if config is not None else 0
        by_partition: dict[int, list[Taken]] = {}
        for partition, group_items in itertools.groupby(taken, _partition_of):  # a take's items are together
            by_partition.setdefault(partition, []).extend(group_items)
        at_tail = len(taken) <= TAIL_READ_MESSAGES_MAX and all(self._at_tail(topic, t) for t in taken)
        runs: list[list[int]] = []  # [partition, offset, delivery count, deadline, length]
        spans: list[m.QueueBatchSpan] = []
        batches: list = []
        unsent: list[Taken] = []
        failure: Exception | None = None
        used = 0
        for partition, items in by_partition.items():
            offsets = [item.offset for item in items]
            if offsets != sorted(offsets):  # take hands a partition's offsets out in order
                items.sort(key=_by_offset)
                offsets = [item.offset for item in items]
            if at_tail or self._read_covers(topic, partition, offsets):
                # In the page cache, or in the last read kept: read here, no thread hop.
                stored, failed = self._read_stored(topic, partition, offsets)
            else:
                stored, failed = await asyncio.to_thread(self._read_stored, topic, partition, offsets)
            span_bytes = 0
            index = 0
            for batch_read in stored:
                header = batch_read.header
                # The sorted offsets found by bisection: those below the batch lie between
                # batches (gaps), those up to its last offset are in it.
                first = bisect.bisect_left(offsets, header.base_offset, index)
                for item in items[index:first]:
                    group.skip(partition, item.offset)  # between batches: a gap
                index = bisect.bisect_right(offsets, header.last_offset, first)
                inside = items[first:index]
                if not inside:
                    continue
                if header.is_control:
                    for item in inside:
                        group.skip(partition, item.offset)
                    continue
                if _must_decode(batch_read, topic_ttl_ms):
                    inside = self._due_in_batch(
                        group, topic, partition, header, batch_read.data, inside, topic_ttl_ms, now
                    )
                    if not inside:
                        continue
                else:
                    error = batch_read.walk()  # never send a batch the consumer cannot decode
                    if error is not None:
                        self.store.log(topic, partition).note_undecodable(header, error, "queue groups")
                        for item in inside:  # its offsets are left out: skipped, like gaps
                            group.skip(partition, item.offset)
                        continue
                batch = _cut(batch_read, inside)
                if used + len(batch) > budget:
                    if batches or runs:
                        unsent.extend(inside)  # the next receive has room for it
                        continue
                    # One stored batch over the whole budget (a log whose batch_bytes_max
                    # is near the frame limit): its delivered records, encoded again.
                    encoded = await self._encode_again(group, inside, budget, now)
                    if encoded is None:
                        continue
                    batch, sent = encoded
                    inside = [item for item in inside if (item.partition, item.offset) in sent]
                used += len(batch)
                span_bytes += len(batch)
                batches.append(batch)
                head = inside[0]
                tail = inside[-1]
                if (
                    tail.offset - head.offset == len(inside) - 1
                    and tail.lease_deadline_ms == head.lease_deadline_ms
                    and tail.delivery_count == head.delivery_count
                    and _one_lease(inside)
                ):
                    # One take's consecutive offsets (the common case): one run, joined to
                    # the last when it goes on from it.
                    run = runs[-1] if runs else None
                    if (
                        run is not None
                        and run[0] == partition
                        and run[1] + run[4] == head.offset
                        and run[2] == head.delivery_count
                        and run[3] == head.lease_deadline_ms
                    ):
                        run[4] += len(inside)
                    else:
                        runs.append([partition, head.offset, head.delivery_count, head.lease_deadline_ms, len(inside)])
                    continue
                for item in inside:
                    run = runs[-1] if runs else None
                    if (
                        run is not None
                        and run[0] == partition
                        and run[1] + run[4] == item.offset
                        and run[2] == item.delivery_count
                        and run[3] == item.lease_deadline_ms
                    ):
                        run[4] += 1
                    else:
                        runs.append([partition, item.offset, item.delivery_count, item.lease_deadline_ms, 1])
            for item in items[index:]:
                if item.offset in failed:
                    unsent.append(item)
                else:
                    group.skip(partition, item.offset)  # past every stored batch: a gap
            if failed and failure is None:
                failure = next(iter(failed.values()))
            if span_bytes:
                spans.append(m.QueueBatchSpan(partition=partition, records_bytes=span_bytes))
        deliveries = [
            m.QueueDelivery(
                partition=partition, offset=offset, delivery_count=count, lease_deadline_ms=deadline, count=length
            )
            for partition, offset, count, deadline, length in runs
        ]
        group.release(unsent)
        if not deliveries and failure is not None:
            raise failure
        if not deliveries and unsent and not batches:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"a stored batch of {topic!r} is larger than the receive's budget of {budget} bytes",
                closes_connection=False,
            )
        return deliveries, spans, batches

    async def _encode_again(
        self, group: QueueGroup, items: list[Taken], budget: int, now: int
    ) -> tuple[bytes, set[tuple[int, int]]] | None:
        """One batch of the records of `items` (one partition) that fit in `budget`,
        keeping their offsets, and which (partition, offset) it delivers; the others are
        released, skipped, expired or deferred by `_collect`. None when none is left."""
        deliveries, records = await self._collect(group, items, budget, now)
        offsets = [offset for run in deliveries for offset in range(run.offset, run.offset + run.count)]
        if not offsets:
            return None
        first = offsets[0]
        batch = build_batch(
            records,
            base_offset=first,
            offset_deltas=[offset - first for offset in offsets],
            last_offset_delta=offsets[-1] - first,
            limits=RecordLimits(batch_bytes_max=budget, record_bytes_max=budget),
        )
        return batch, {
            (run.partition, offset) for run in deliveries for offset in range(run.offset, run.offset + run.count)
        }

    def _due_in_batch(
        self,
        group: QueueGroup,
        topic: str,
        partition: int,
        header,
        batch,
        inside: list[Taken],
        topic_ttl_ms: int,
        now: int,
    ) -> list[Taken]:
        """The items of `inside` (offsets of one stored batch) that are delivered now,
        the batch decoded (once, kept for the next receives): the others are skipped (no
        record), expired (TTL passed) or deferred (not-before ahead)."""
        with self._batches_lock:
            cached = self._batches.get((topic, partition))
        if cached is not None and cached[0] == header.base_offset and cached[1] == header.last_offset:
            records = cached[2]
        else:
            try:
                records = decode_records(batch, header)
            except NodiError as error:  # stored before produce walked records
                self.store.log(topic, partition).note_undecodable(header, error, "queue groups")
                records = []  # its offsets are left out: skipped, like gaps
            self._cache_batch(topic, partition, header.base_offset, header.last_offset, records)
        by_offset = {record.offset: record for record in records}
        due: list[Taken] = []
        for item in inside:
            record = by_offset.get(item.offset)
            if record is None:
                group.skip(partition, item.offset)
                continue
            headers = record.headers
            if headers or topic_ttl_ms:
                expires_at = expires_at_ms(record.timestamp_ms, headers, topic_ttl_ms)
                if expires_at is not None and expires_at <= now:
                    group.expire(item)
                    continue
                not_before = find_integer(headers, NOT_BEFORE_MS)
                if not_before is not None and not_before > now:
                    group.defer(item, not_before)
                    continue
            due.append(item)
        return due

    def _read_stored(self, topic: str, partition: int, offsets: list[int]) -> tuple[list[StoredBatch], dict]:
        """The stored batches holding the sorted `offsets` of one
        partition, in order, each once, and {offset: error} for reads that failed. The
        batches of the last read are kept (a read of READ_BYTES serves several receives)."""
        key = (topic, partition)
        with self._batches_lock:
            cached = self._stored.get(key)
        try:
            partition_log = self.store.log(topic, partition)
        except (NodiError, OSError) as error:  # not open yet (PartitionNotReadyError), or failed
            return [], dict.fromkeys(offsets, error)
        out: list = []
        failed: dict[int, Exception] = {}
        highest = offsets[-1]
        index = 0
        while index < len(offsets):
            offset = offsets[index]
            if cached is not None and cached[0] <= offset <= cached[1]:
                found = cached[2]
            else:
                try:
                    result = partition_log.read(offset, READ_BYTES)
                    data = result.to_bytes()
                    found = [StoredBatch(header, bytes(batch)) for header, batch in iter_batches(data)]
                except (NodiError, OSError) as error:
                    failed[offset] = error
                    index += 1
                    continue
                if not found:
                    break  # nothing readable from here: the rest are gaps
                cached = (found[0].header.base_offset, found[-1].header.last_offset, found)
                with self._batches_lock:
                    self._stored[key] = cached
                    self._stored.move_to_end(key)
                    while len(self._stored) > STORED_READS_MAX:
                        self._stored.popitem(last=False)
            position = bisect.bisect_left(found, offset, key=_last_offset)
            progressed = False
            while position < len(found) and index < len(offsets):
                stored = found[position]
                header = stored.header
                if header.base_offset > highest:
                    break
                if offsets[index] <= header.last_offset:
                    if not out or out[-1].header.base_offset != header.base_offset:
                        out.append(stored)
                    while index < len(offsets) and offsets[index] <= header.last_offset:
                        index += 1
                    progressed = True
                position += 1
            if not progressed:  # offset lies past the batches found: a gap up to the next read
                if cached[1] < offset:
                    break
                index += 1
        return out, failed

    def _read_covers(self, topic: str, partition: int, offsets: list[int]) -> bool:
        """Whether the last read kept for the partition holds all of the sorted
        `offsets`: `_read_stored` then does no I/O."""
        with self._batches_lock:
            cached = self._stored.get((topic, partition))
        return cached is not None and cached[0] <= offsets[0] and offsets[-1] <= cached[1]

    def _at_tail(self, topic: str, taken: Taken) -> bool:
        """Whether `taken` is among the last TAIL_READ_MESSAGES_MAX offsets of its log."""
        partition_log = self.store.opened_log(topic, taken.partition)
        return partition_log is not None and taken.offset >= partition_log.next_offset - TAIL_READ_MESSAGES_MAX

    def _read_records(self, topic: str, wanted: list[tuple[int, int]]) -> dict:
        """(partition, offset) -> Record for each wanted offset that has one; an
        exception where the read failed. Reads whole batches from the log (one codec)."""
        by_partition: dict[int, list[int]] = {}
        for partition, offset in wanted:
            by_partition.setdefault(partition, []).append(offset)
        found: dict = {}
        for partition, offsets in by_partition.items():
            partition_log = self.store.log(topic, partition)
            remaining = sorted(set(offsets))
            highest = remaining[-1]
            index = 0
            while index < len(remaining):
                offset = remaining[index]
                wanted_here = set(remaining[index:])
                with self._batches_lock:
                    cached = self._batches.get((topic, partition))
                if cached is not None and cached[0] <= offset <= cached[1]:
                    last = cached[1]
                    for record in cached[2]:
                        if record.offset in wanted_here:
                            found[partition, record.offset] = record
                else:
                    try:
                        result = partition_log.read(offset, READ_BYTES)
                        data = result.to_bytes()
                        last = offset
                        for header, batch in iter_batches(data):
                            if header.base_offset > highest:
                                break  # past every wanted offset: not decoded
                            last = max(last, header.last_offset)
                            if header.is_control:
                                continue
                            try:
                                records = decode_records(batch, header)
                            except NodiError as error:  # stored before produce walked records
                                partition_log.note_undecodable(header, error, "queue groups")
                                continue  # its offsets are left out: skipped, like gaps
                            for record in records:
                                if record.offset in wanted_here:
                                    found[partition, record.offset] = record
                            self._cache_batch(topic, partition, header.base_offset, header.last_offset, records)
                    except (NodiError, OSError) as error:
                        found[partition, offset] = error
                        index += 1
                        continue
                    if not result.slices:
                        break  # nothing readable from here: the rest are gaps
                while index < len(remaining) and remaining[index] <= last:
                    index += 1
        return found

    def _cache_batch(self, topic: str, partition: int, base_offset: int, last_offset: int, records: list) -> None:
        """Keep the last decoded batch of a partition: a batch of many records serves
        several receives, decoded once (at most DECODED_BATCHES_MAX batches kept)."""
        key = (topic, partition)
        with self._batches_lock:
            self._batches[key] = (base_offset, last_offset, records)
            self._batches.move_to_end(key)
            while len(self._batches) > DECODED_BATCHES_MAX:
                self._batches.popitem(last=False)

    async def settle(self, request: m.QueueSettleRequest) -> Reply:
        group = self._group_for(request.group, request.topic, None)
        now = self._clock.time_ms()
        runs: list[list] = []  # [partition, offset, error code, deadline, length]
        changed = False
        window = self.limits.window_messages_max
        for item in request.settlements:
            if not 1 <= item.count <= window:
                runs.append([item.partition, item.offset, ErrorCode.LIMIT_EXCEEDED, m.NO_OFFSET, 1])
                continue
            if item.action is m.SettleAction.ACK and 0 <= item.partition < len(group.partitions):
                # Acks of a run in one call (the common settle): no per-offset dispatch.
                outcomes = group.partitions[item.partition].ack_run(item.offset, item.count, item.delivery_count)
                group.mark_dirty(item.partition)
                changed = True
                for offset, code, length in outcomes:
                    runs.append([item.partition, offset, code, m.NO_OFFSET, length])
                continue
            delay = None if item.delay_ms < 0 else item.delay_ms
            first_run = len(runs)
            for offset in range(item.offset, item.offset + item.count):
                code = ErrorCode.NONE
                deadline = m.NO_OFFSET
                try:
                    deadline = (
                        group.settle(item.action, item.partition, offset, item.delivery_count, now, delay, item.text)
                        or m.NO_OFFSET
                    )
                    changed = True
                except ProtocolError as error:
                    code = error.code
                run = runs[-1] if len(runs) > first_run else None
                if run is not None and run[2] == code and run[3] == deadline:
                    run[4] += 1  # the same outcome as the offset before: one result on the wire
                else:
                    runs.append([item.partition, offset, code, deadline, 1])
        results = [
            m.SettleResult(
                partition=partition, offset=offset, error_code=code, lease_deadline_ms=deadline, count=length
            )
            for partition, offset, code, deadline, length in runs
        ]
        if changed:
            self._notify(group)
            if any(item.action is not m.SettleAction.ACK for item in request.settlements):
                # A nack, extend or reject sets a deadline or marks a dead letter: the
                # timer's next round schedules it. Acks only remove (their commit is below).
                self._wake.set()
            await self.persist()
        return Reply(m.QueueSettleResponse(request_id=request.request_id, results=results))

    async def describe(self, request: m.QueueDescribeRequest) -> Reply:
        group = self._group_for(request.group, request.topic, None)
        self._refresh(group)
        statistics = group.statistics()
        return Reply(
            m.QueueDescribeResponse(
                request_id=request.request_id,
                settings=settings_to_wire(group.settings),
                dead_letter_topic=group.settings.dead_letter_topic_for(group.topic),
                partitions=[
                    m.QueuePartitionState(
                        partition=p.partition,
                        ack_floor=p.floor,
                        next_offset=p.next_offset,
                        pending=p.pending,
                        leased=p.leased,
                        dead_letters_pending=p.dead,
                    )
                    for p in statistics.partitions
                ],
                delivered=statistics.delivered,
                redelivered=statistics.redelivered,
                acked=statistics.acked,
                nacked=statistics.nacked,
                expired_leases=statistics.expired_leases,
                dead_lettered=statistics.dead_lettered,
                expired=statistics.expired,
            )
        )

    # -- QueueLeases: a read-only page of in-flight messages (the console's lease view) ----

    async def leases(self, request: m.QueueLeasesRequest) -> Reply:
        group = self._group_for(request.group, request.topic, None)
        if request.partition != -1:
            group.partition(request.partition)  # UNKNOWN_PARTITION when out of range
        limit = max(1, min(request.leases_max, QUEUE_LEASES_LISTED_MAX))
        listed: list[m.QueueLease] = []
        more = False
        for queue in group.partitions:
            if (request.partition != -1 and queue.partition != request.partition) or (
                queue.partition < request.after_partition
            ):
                continue
            after = request.after_offset if queue.partition == request.after_partition else -1
            for delivery in queue.in_flight(after, limit + 1 - len(listed)):
                if len(listed) == limit:
                    more = True
                    break
                listed.append(lease_to_wire(queue.partition, delivery))
            if more:
                break
        return Reply(m.QueueLeasesResponse(request_id=request.request_id, leases=listed, more=more))

    async def list(self, request: m.QueueListRequest) -> Reply:
        summaries = []
        for (name, topic), group in sorted(self.groups.items()):
            if request.topic is not None and topic != request.topic:
                continue
            partitions = [queue.statistics() for queue in group.partitions]
            summaries.append(
                m.QueueGroupSummary(
                    group=name,
                    topic=topic,
                    dead_letter_topic=group.settings.dead_letter_topic_for(topic),
                    pending=sum(p.pending for p in partitions),
                    leased=sum(p.leased for p in partitions),
                    dead_letters_pending=sum(p.dead for p in partitions),
                )
            )
        return Reply(m.QueueListResponse(request_id=request.request_id, groups=summaries))

    def statistics(self) -> QueueServiceStatistics:
        return QueueServiceStatistics(
            tuple(group.statistics() for _, group in sorted(self.groups.items())),
            self.dead_letter_failures,
            self.timer_rounds,
            self.timer_groups_visited,
        )

    def on_topic_deleted(self, topic: str) -> None:
        with self._batches_lock:
            for key in [key for key in self._batches if key[0] == topic]:
                del self._batches[key]
            for key in [key for key in self._stored if key[0] == topic]:
                del self._stored[key]
        for group_key in [group_key for group_key in self.groups if group_key[1] == topic]:
            group = self.groups.pop(group_key)
            self._unstaged.discard(group_key)
            self._dead_letter_backoff.pop(group_key, None)
            self._notify(group)

    # -- persistence -----------------------------------------------------------------------

    async def persist(self) -> None:
        """Return once every change made before the call is committed to LMDB, at most
        write_timeout_ms (TimeoutError). Callers in one loop tick share one staging pass
        and one flush; each awaits its own future, settled by the flush's callback (no
        task, no shield), so a caller that gives up leaves the pass to the others."""
        waiters = self._persist_soon()
        assert self._loop is not None  # _persist_soon checked it
        own = self._loop.create_future()
        waiters.append(own)
        expiry = self._loop.call_later(self.broker.config.write_timeout_ms / 1000, _expire_wait, own)
        try:
            await own
        finally:
            expiry.cancel()

    def _persist_soon(self) -> builtins.list[asyncio.Future]:
        """Stage and flush what changed at the end of this loop tick, without waiting;
        the list of that pass's waiters (persist adds its own)."""
        if self._persist_waiters is None:
            assert self._loop is not None  # attach() ran: changes are made on the loop
            self._persist_waiters = []
            self._loop.call_soon(self._stage_and_flush)
        return self._persist_waiters

    def _stage_and_flush(self) -> None:
        waiters, self._persist_waiters = self._persist_waiters, None
        assert waiters is not None  # only _persist_soon schedules this pass, once per list
        try:
            staged = self._stage_dirty()
        except Exception as error:
            _settle_waiters(waiters, error)
            return
        self.broker.when_metadata_flushed(functools.partial(self._flushed, waiters, staged))

    def _flushed(
        self,
        waiters: builtins.list[asyncio.Future],
        staged: builtins.list[tuple[PartitionQueue, int]],
        error: BaseException | None,
    ) -> None:
        """The metadata flush carrying a pass ended (on the loop): its waiters answered."""
        if error is None:
            for queue, reserved in staged:  # committed: first deliveries below it answer at once
                queue.durable_reserved_offset = max(queue.durable_reserved_offset, reserved)
        _settle_waiters(waiters, error)

    def _changed(self, group: QueueGroup) -> None:
        """A partition of `group` changed: it is staged with the next persist, and the
        timer's next round ticks it, writes its dead letters and schedules its deadlines."""
        self._unstaged.add(group.key)
        self._touched.add(group.key)

    def _stage_dirty(self) -> builtins.list[tuple[PartitionQueue, int]]:
        """Stage the changed partitions; returns each with the reservation staged."""
        metadata = self.store.metadata
        staged = []
        for key in list(self._unstaged):
            group = self.groups.get(key)
            if group is not None:
                for partition in sorted(group.dirty):
                    queue = group.partitions[partition]
                    metadata.put_queue_state(group.group, group.topic, partition, encode_partition(queue))
                    queue.staged_reserved_offset = queue.reserved_offset
                    staged.append((queue, queue.reserved_offset))
                group.dirty.clear()
            self._unstaged.discard(key)
        return staged

    def stage_for_shutdown(self) -> None:
        """A clean stop: every partition staged with its reservation cut back to its
        next offset (nothing is in doubt), for the metadata store's closing flush."""
        for group in self.groups.values():
            for queue in group.partitions:
                queue.reserved_offset = queue.next_offset
                group.mark_dirty(queue.partition)
        self._stage_dirty()

    # -- the timer and the dead-letter writer -------------------------------------------------

    async def _timer(self) -> None:
        """Runs out leases and not-before times, wakes receivers, writes dead letters,
        persists what changed. A round visits the groups changed since the last one and
        those with a deadline due, not every group: its cost follows what happened."""
        while True:
            sleep_s = TIMER_INTERVAL_MAX_S
            if self._due:
                sleep_s = min(sleep_s, max(self._due[0][0] - self._clock.time_ms(), 0) / 1000)
            try:
                await asyncio.wait_for(self._wake.wait(), sleep_s)
            except TimeoutError:
                pass
            self._wake.clear()
            now = self._clock.time_ms()
            groups = [self.groups[key] for key in self._take_visits(now) if key in self.groups]
            self.timer_rounds += 1
            self.timer_groups_visited += len(groups)
            for group in groups:
                if group.tick(now):
                    self._notify(group)
            written = await self._write_dead_letters(groups)
            for group in groups:
                self._schedule(group, group.next_deadline_ms())
            try:
                if written or self._unstaged:
                    await self.persist()
            except MetadataUnavailableError:  # the store logs it and retries by itself
                await asyncio.sleep(DEAD_LETTER_RETRY_S)
            except Exception:  # the metadata store reports itself; retried next round
                log.exception("queue groups: persisting their state failed; retrying")
                await asyncio.sleep(DEAD_LETTER_RETRY_S)

    def _take_visits(self, now: int) -> set[tuple[str, str]]:
        """The keys of the groups this round visits: changed since the last round, or due."""
        keys, self._touched = self._touched, set()
        due = self._due
        while due and due[0][0] <= now:
            when, key = heapq.heappop(due)
            if self._scheduled.get(key) == when:
                del self._scheduled[key]
            keys.add(key)
        return keys

    def _schedule(self, group: QueueGroup, at_ms: int | None) -> None:
        """Have the timer visit `group` at `at_ms` (None: nothing to do then)."""
        if at_ms is not None and at_ms < self._scheduled.get(group.key, math.inf):
            self._scheduled[group.key] = at_ms
            heapq.heappush(self._due, (at_ms, group.key))

    def _schedule_retry(self, group: QueueGroup, retry_at: float) -> None:
        """Visit `group` again when its dead-letter backoff (monotonic `retry_at`) ends."""
        self._schedule(group, self._clock.time_ms() + math.ceil(max(retry_at - self._clock.monotonic(), 0) * 1000))

    async def _write_dead_letters(self, groups: builtins.list[QueueGroup]) -> int:
        """One pass over `groups` for the dead letters waiting. A group whose pass fails
        (the dead-letter topic refuses appends, say) is retried after a backoff, without
        holding up the others; one that had a full pass is visited again next round."""
        written = 0
        now = self._clock.monotonic()
        for group in groups:
            key = group.key
            retry_at, _ = self._dead_letter_backoff.get(key, (0.0, 0.0))
            if now < retry_at:
                self._schedule_retry(group, retry_at)
                continue
            letters = group.take_dead_letters(DEAD_LETTERS_PER_PASS)
            if not letters:
                continue
            try:
                written += await self._dead_letter(group, letters)
            except Exception as error:
                for letter in letters:
                    group.partitions[letter.partition].dead_letter_failed(letter.offset)
                self.dead_letter_failures += 1
                _, delay = self._dead_letter_backoff.get(key, (0.0, DEAD_LETTER_RETRY_S / 2))
                delay = min(delay * 2, DEAD_LETTER_RETRY_MAX_S)
                retry_at = self._clock.monotonic() + delay
                self._dead_letter_backoff[key] = (retry_at, delay)
                self._schedule_retry(group, retry_at)
                log.warning(
                    "queue group %s on %s: dead-lettering %d message(s) failed, retrying in %.0f s: %s",
                    group.group,
                    group.topic,
                    len(letters),
                    delay,
                    error,
                )
            else:
                self._dead_letter_backoff.pop(key, None)
                if len(letters) == DEAD_LETTERS_PER_PASS:
                    self._touched.add(key)  # more may be waiting
        return written

    async def _dead_letter(self, group: QueueGroup, letters: builtins.list[DeadLetter]) -> int:
        """Append the copies, wait until they are durable, then ack them in the source."""
        topic = group.settings.dead_letter_topic_for(group.topic)
        partitions = await self._dead_letter_partitions(topic, len(group.partitions))
        found = await asyncio.to_thread(
            self._read_records, group.topic, [(letter.partition, letter.offset) for letter in letters]
        )
        failures = [r for r in found.values() if isinstance(r, Exception)]
        if failures:
            raise failures[0]
        now = self._clock.time_ms()
        by_target: dict[int, list[tuple[DeadLetter, NewRecord]]] = {}
        for letter in letters:
            record = found.get((letter.partition, letter.offset))
            if record is None:  # gone from the source (retention): nothing to copy
                group.dead_lettered(letter.partition, letter.offset)
                continue
            copy = dead_letter_record(record, letter, group.topic, group.group, now)
            by_target.setdefault(letter.partition % partitions, []).append((letter, copy))
        for target, items in by_target.items():
            partition_log = self.store.log(topic, target)
            for chunk in _chunks(items, partition_log.config.limits):
                batch = build_batch([copy for _, copy in chunk], limits=partition_log.config.limits)
                await self.broker.append_durable(
                    partition_log, batch, self.broker.config.write_timeout_ms / 1000, sync_now=True
                )
                for letter, _ in chunk:
                    group.dead_lettered(letter.partition, letter.offset)
                self._notify(group)
        return len(letters)

    async def _dead_letter_partitions(self, topic: str, source_partitions: int) -> int:
        config = self.store.topic_config(topic)
        if config is not None:
            return config.partitions
        topic_config = dataclasses.replace(self.broker.config.topic_defaults, partitions=source_partitions)
        try:
            await self.broker.create_topic(topic, topic_config)
        except TopicExistsError:
            return self.store.topics()[topic].partitions
        log.info("created dead-letter topic %s", topic)
        return topic_config.partitions


def lease_to_wire(partition: int, delivery: Delivery) -> m.QueueLease:
    if delivery.state is DeliveryState.LEASED:
        state, deadline, not_before = m.LeaseState.LEASED, delivery.lease_deadline_ms, -1
    elif delivery.state is DeliveryState.DEAD:
        state, deadline, not_before = m.LeaseState.DEAD, -1, -1
    else:
        state, deadline, not_before = m.LeaseState.WAITING, -1, delivery.not_before_ms
    error = delivery.last_error
    if delivery.state is DeliveryState.DEAD and delivery.reason is not DeadLetterReason.NONE:
        error = delivery.reason.label + (f": {error}" if error else "")
    return m.QueueLease(
        partition=partition,
        offset=delivery.offset,
        state=state,
        delivery_count=delivery.delivery_count,
        lease_deadline_ms=deadline,
        not_before_ms=not_before,
        last_delivery_ms=delivery.last_delivery_ms if delivery.delivery_count else -1,
        last_error=error,
    )
