"""Queue groups on the log: leases, acks, retries with backoff, dead-lettering, with no
I/O of its own (sans-IO, like broker/server/groups.py).

A queue group (a name, on one topic) lets any number of consumers pull messages from any
partition: each delivered message is leased to its receiver for `ack_wait_ms`; the
consumer acks it (done), nacks it (deliver again after a delay, by default the group's
backoff), marks it in progress (the lease starts again) or rejects it (dead-letter it).
A lease that runs out makes the message available again. A message delivered
`max_deliveries` times and not acked, or rejected, is dead-lettered: the server appends
it to the dead-letter topic and then acks it here (`dead_lettered`). This is Kafka's
share-group model (KIP-932: available, acquired, acknowledged, archived) with JetStream's
pull-consumer verbs (ack, nak with delay, in-progress, term).

State per (group, topic, partition), `PartitionQueue`:

    ... done ... | floor | in-flight window ...            | next_offset | never delivered ...
                    every offset below `floor` is done (acked, skipped or dead-lettered);
                    in [floor, next_offset) an offset is done unless it has an entry
                    in `pending` (a `Delivery`, or for a first delivery as taken its
                    take's `LeaseRun`); at or after next_offset nothing was delivered yet.

The window [floor, next_offset) never grows past `window_messages_max` offsets: a
partition whose oldest message is not done delivers nothing new beyond
floor + window_messages_max, so memory is bounded whatever the backlog. Offsets run up to
the partition's readable end, which the server sets (`set_log_bounds`); an offset the
server finds no record for (a compaction gap, a control batch) is `skip`ped: done.

Leases are kept as runs (`LeaseRun`): the deliveries leased together at one deadline
(one receive's consecutive offsets, one extension's) share a run, and the run, not each
message, has an entry in the timer heap. Settling, extending or releasing part of a run
takes those deliveries out of it (the run counts the ones still in it); the rest keep
its deadline, and when it comes the timer walks the run's offsets and runs out the
leases still in it. A run nobody is left in is dropped from the heap unwalked. A take's
first deliveries have no Delivery each: their `pending` entry is the take's run until
one of them changes (see LeaseRun), so a receive and its ack cost no object a message.

Each `Delivery` carries its delivery count, first and last delivery times, a lease
deadline while leased, a not-before time while it waits to be delivered again (nack
delay or backoff; the same check at delivery is where TTL and delayed delivery plug in),
the consumer's last error text, and once it is to be dead-lettered the reason.

Times are wall-clock ms passed in by the caller (`now_ms`), so tests drive them without
sleeping; they are persisted (a nack delay outlives a restart) and appear in dead-letter
headers. A settle names the delivery it settles by (partition, offset, delivery_count):
once a message was delivered again, a late settle of the older delivery is refused
(STALE_DELIVERY), so one consumer cannot settle another's lease. An ack of a delivery
whose lease ran out but that was not delivered again is still accepted.

Reservation: first deliveries are answered before their state is committed, under a
reservation that is: `reserved_offset` (persisted) bounds the offsets first deliveries
may reach, and the server answers a receive without waiting for a commit only when every
first delivery in it lies below the reservation already committed
(`durable_reserved_offset`, set by the server after each commit) and it holds no
redelivery. `take` moves the reservation ahead by `reservation_messages` once half of it
is used, so it is usually committed before it is needed. After a crash every offset in
[next_offset, reserved_offset) of the committed state may have been delivered once:
`restore_reserved` counts each as delivered once (so its next delivery count is above any
count a consumer saw; a message of the reservation that never went out is counted one
delivery too many). A clean shutdown stages the reservation cut back to next_offset.

Persistence: `encode_partition` / `decode_partition` (broker/server/queue_state.py) are the
one codec of the bytes the server stages in the metadata store (queue_state sub-database) once per loop tick. What
is kept: floor, next_offset, the group's settings and every pending delivery (count,
times, error, dead-letter reason); a lease is kept as a not-before time at its deadline,
so after a restart a leased message is delivered again once its old lease would have run
out. Nothing acked is stored, so an acked message is never delivered again; every
offset in the window without a stored delivery was acked.
"""

from __future__ import annotations

import collections
import enum
import functools
import heapq
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.messages import SettleAction
from ..protocol.queue_settings import QueueLimits, QueueSettings, cut_text

# ---------------------------------------------------------------------------
# Deliveries


class DeadLetterReason(enum.IntEnum):
    """Why a message goes to the dead-letter topic; the header carries `label`."""

    NONE = 0
    MAX_DELIVERIES = 1
    REJECTED = 2
    EXPIRED = 3

    @property
    def label(self) -> str:
        return _REASON_LABELS[self]


_REASON_LABELS = {  # the values of the nodi-dlq-reason header (headers.DLQ_REASONS)
    DeadLetterReason.NONE: "",
    DeadLetterReason.MAX_DELIVERIES: "max-deliveries",
    DeadLetterReason.REJECTED: "rejected",
    DeadLetterReason.EXPIRED: "expired",
}


class DeliveryState(enum.IntEnum):
    AVAILABLE = 0  # to be delivered again once not_before_ms has passed
    LEASED = 1  # delivered; the lease runs until lease_deadline_ms
    DEAD = 2  # to be dead-lettered (the server appends it, then calls dead_lettered)


class Delivery:
    """A message of the window that is not done."""

    __slots__ = (
        "offset",
        "delivery_count",
        "state",
        "lease_deadline_ms",
        "not_before_ms",
        "first_delivery_ms",
        "last_delivery_ms",
        "last_error",
        "reason",
        "writing",
        "run",
    )

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.delivery_count = 0
        self.state = DeliveryState.AVAILABLE
        self.lease_deadline_ms = 0
        self.not_before_ms = 0
        self.first_delivery_ms = 0
        self.last_delivery_ms = 0
        self.last_error = ""
        self.reason = DeadLetterReason.NONE
        self.writing = False  # a dead-letter append is under way
        self.run: LeaseRun | None = None  # while leased: the run whose deadline it shares

    def __repr__(self) -> str:
        return (
            f"Delivery({self.offset}, count={self.delivery_count}, {self.state.name}, "
            f"lease={self.lease_deadline_ms}, not_before={self.not_before_ms})"
        )


class LeaseRun:
    """Leased deliveries of offsets in [first, end) that share one deadline: one entry in
    the timer heap for all of them. `live` counts the deliveries still in the run (an
    offset in the range whose delivery's `run` is another, or None, left it).

    A run made by `take` for first deliveries is also their entry in `pending`: the
    offsets [first, fresh_end) map to the run itself, not to a Delivery each, until one
    of them changes (a nack, an extension, a lease that runs out...), when `_delivery`
    makes its Delivery. Read as a Delivery, the run is what each of those would be: a
    first delivery, leased at `taken_ms` until the run's deadline (the properties below).
    `fresh` counts the offsets still mapped to it, all at or above `fresh_low`: while
    they are all of [fresh_low, fresh_end) (`intact`, the common case: acked from the
    front), acks take them in one step and the persisted entries are a slice of
    `stretch`, encoded once for the run (queue_state.py). Runs hold disjoint offsets of
    the window, so their stretches together stay under ENTRY_BYTES a window offset (the
    size of the encoded state itself); a run's is dropped when its last offset leaves."""

    __slots__ = (
        "deadline_ms",
        "first",
        "end",
        "live",
        "closed",
        "taken_ms",
        "fresh",
        "fresh_low",
        "fresh_end",
        "stretch",
    )

    def __init__(self, deadline_ms: int, first: int, taken_ms: int = 0) -> None:
        self.deadline_ms = deadline_ms
        self.first = first
        self.end = first
        self.live = 0
        self.closed = False  # its deadline came (or the window went): nothing joins it
        self.taken_ms = taken_ms
        self.fresh = 0  # offsets of [fresh_low, fresh_end) whose pending entry is this run
        self.fresh_low = first
        self.fresh_end = first
        self.stretch: bytes | None = None

    @property
    def intact(self) -> bool:
        """Whether every offset of [fresh_low, fresh_end) still maps to the run."""
        return self.fresh == self.fresh_end - self.fresh_low

    def leave_fresh(self, offset: int, length: int) -> None:
        """Offsets [offset, offset + length), mapped to the run, no longer are."""
        self.fresh -= length
        if offset == self.fresh_low:
            self.fresh_low = offset + length
        if not self.fresh:
            self.stretch = None

    # Read as the Delivery of each offset it stands for in `pending` (never written).
    offset = -1  # not one offset: code that needs one makes the Delivery (_delivery)
    delivery_count = 1
    state = DeliveryState.LEASED
    reason = DeadLetterReason.NONE
    not_before_ms = 0
    last_error = ""
    writing = False

    @property
    def lease_deadline_ms(self) -> int:
        return self.deadline_ms

    @property
    def first_delivery_ms(self) -> int:
        return self.taken_ms

    @property
    def last_delivery_ms(self) -> int:
        return self.taken_ms

    @property
    def run(self) -> LeaseRun:
        return self

    def __repr__(self) -> str:
        return (
            f"LeaseRun([{self.first}, {self.end}), deadline={self.deadline_ms}, live={self.live}, fresh={self.fresh})"
        )


class Taken(NamedTuple):
    """A message handed out by `receive`: the server reads its record."""

    partition: int
    offset: int
    delivery_count: int
    lease_deadline_ms: int


# _advance_floor steps the floor this far one offset at a time, then looks for the lowest
# pending offset (the floor moves past a receive's worth of acks at once).
FLOOR_STEPS_MAX = 16

# Taken from a tuple of its four fields, in C (take makes one per first delivery).
_make_taken = functools.partial(tuple.__new__, Taken)


def _detached(offset: int, entry: Delivery | LeaseRun) -> Delivery:
    """`entry` as a Delivery of `offset` for reading (a new one when it is a run)."""
    if isinstance(entry, Delivery):
        return entry
    delivery = Delivery(offset)
    delivery.delivery_count = 1
    delivery.state = DeliveryState.LEASED
    delivery.lease_deadline_ms = entry.deadline_ms
    delivery.first_delivery_ms = delivery.last_delivery_ms = entry.taken_ms
    return delivery


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message to append to the dead-letter topic, with what its headers say."""

    partition: int
    offset: int
    reason: DeadLetterReason
    delivery_count: int
    first_delivery_ms: int
    last_delivery_ms: int
    last_error: str


@dataclass(frozen=True, slots=True)
class PartitionQueueStatistics:
    partition: int
    floor: int
    next_offset: int
    pending: int
    leased: int
    dead: int  # waiting for their dead-letter append
    delivered: int
    redelivered: int
    acked: int
    nacked: int
    expired_leases: int
    dead_lettered: int
    skipped: int
    expired: int  # TTL passed before delivery: dropped or dead-lettered
    stale_settles: int = 0  # settles of a delivery that was delivered again (STALE_DELIVERY)
    leases_extended: int = 0  # in-progress settles that started a lease again
    lease_runs: int = 0  # lease runs with a delivery in them (each one timer entry)


@dataclass(frozen=True, slots=True)
class QueueGroupStatistics:
    group: str
    topic: str
    settings: QueueSettings
    partitions: tuple[PartitionQueueStatistics, ...]
    delivered: int  # deliveries handed out, first and later ones
    redelivered: int  # of which were not the first
    acked: int
    nacked: int
    expired_leases: int
    dead_lettered: int
    skipped: int  # offsets with no record (gaps) or removed by retention before delivery
    expired: int  # TTL passed before delivery
    stale_settles: int = 0  # settles that lost the race (STALE_DELIVERY)
    leases_extended: int = 0  # in-progress settles (a consumer extending a lease)


def settle_error(code: ErrorCode, message: str) -> ProtocolError:
    return ProtocolError(code, message, closes_connection=False)


# ---------------------------------------------------------------------------
# One partition


class PartitionQueue:
    """The window of one (group, topic, partition). See the module docstring."""

    def __init__(
        self, partition: int, settings: QueueSettings, limits: QueueLimits, floor: int = 0, next_offset: int = 0
    ) -> None:
        assert 0 <= floor <= next_offset
        self.partition = partition
        self.settings = settings
        self.limits = limits
        self.floor = floor
        self.next_offset = next_offset
        self.log_end = next_offset  # the readable end, set by the server
        # First deliveries may run up to here with their state not yet committed (see the
        # module docstring); the server sets durable_reserved_offset after a commit.
        self.reserved_offset = next_offset
        self.staged_reserved_offset = next_offset  # the server's: last staged for a commit
        self.durable_reserved_offset = next_offset
        # A Delivery per message of the window that is not done; first deliveries as
        # taken map to their LeaseRun instead (see LeaseRun).
        self.pending: dict[int, Delivery | LeaseRun] = {}
        self._ready: list[int] = []  # heap of offsets that may be available now
        self._timers: list[tuple[int, int]] = []  # heap of (not-before time_ms, offset)
        # Heap of (deadline_ms, sequence, run): one entry per lease run, not per message.
        self._lease_timers: list[tuple[int, int, LeaseRun]] = []
        self._run_sequence = 0
        self._last_run: LeaseRun | None = None  # the run a lease at its end may join
        self._dead: dict[int, None] = {}  # offsets in state DEAD, in order of arrival
        self.leased = 0
        # Counters for statistics.
        self.delivered = self.redelivered = self.acked = self.nacked = 0
        self.expired_leases = self.dead_letters_written = self.skipped = self.expired = 0
        self.stale_settles = self.leases_extended = 0

    # -- the log's bounds ------------------------------------------------------------

    def set_log_bounds(self, log_start: int, log_end: int) -> bool:
        """The partition's first stored offset and readable end. Offsets below the start
        were removed by retention: they are done (counted as skipped). True when new
        messages may be available."""
        grew = log_end > self.log_end
        self.log_end = log_end
        if log_start > self.floor:
            for offset in [o for o in self.pending if o < log_start]:
                self._remove(offset)
                self.skipped += 1
            if self.next_offset < log_start:
                self.skipped += log_start - self.next_offset
                self.next_offset = log_start
            self.floor = log_start
            self._advance_floor()
            grew = True
        return grew

    def window_end(self) -> int:
        """The first offset this partition may not deliver yet (window limit or log end)."""
        return min(self.log_end, self.floor + self.limits.window_messages_max)

    # -- receive -----------------------------------------------------------------------

    def take(self, count: int, now_ms: int) -> list[Taken]:
        """Lease up to `count` available messages: redeliveries first (oldest offset
        first), then offsets never delivered."""
        taken: list[Taken] = []
        ready = self._ready
        while ready and len(taken) < count:
            offset = heapq.heappop(ready)
            delivery = self.pending.get(offset)
            if (
                not isinstance(delivery, Delivery)  # none, or a first delivery as taken: leased
                or delivery.state is not DeliveryState.AVAILABLE
                or delivery.not_before_ms > now_ms
            ):
                continue  # stale heap entry; a not-before time has its own timer
            taken.append(self._lease(delivery, now_ms))
        first = self.next_offset
        last = min(self.window_end(), first + count - len(taken))
        if first < last:  # first deliveries: one lease run that stands for each of them
            deadline = now_ms + self.settings.ack_wait_ms
            run = self._new_run(deadline, first, now_ms)
            run.fresh_low = first
            offsets = range(first, last)
            self.pending.update(dict.fromkeys(offsets, run))
            length = last - first
            taken.extend(map(_make_taken, zip(repeat(self.partition, length), offsets, repeat(1), repeat(deadline))))
            run.end = run.fresh_end = last
            run.live += length
            run.fresh += length
            self.next_offset = last
            self.leased += last - first
            self.delivered += last - first
        reservation = self.limits.reservation_messages
        if self.reserved_offset - self.next_offset < reservation // 2:
            self.reserved_offset = self.next_offset + reservation
        return taken

    def restore_reserved(self, reserved_offset: int, now_ms: int) -> int:
        """After a restart: each offset in [next_offset, reserved_offset) (below the
        readable end) may have been delivered once, unanswered by a commit, before the
        crash: it is counted as delivered once and available now (or dead-lettered, at
        max_deliveries 1). Returns how many."""
        end = min(reserved_offset, self.log_end, self.floor + self.limits.window_messages_max)
        restored = 0
        while self.next_offset < end:
            delivery = Delivery(self.next_offset)
            delivery.delivery_count = 1
            delivery.first_delivery_ms = delivery.last_delivery_ms = now_ms
            self.next_offset += 1
            self.restore(delivery, now_ms)
            restored += 1
        self.reserved_offset = self.staged_reserved_offset = self.durable_reserved_offset = self.next_offset
        return restored

    def has_available(self, now_ms: int) -> bool:
        if self.next_offset < self.window_end():
            return True
        for offset in self._ready:
            delivery = self.pending.get(offset)
            if delivery is not None and delivery.state is DeliveryState.AVAILABLE and delivery.not_before_ms <= now_ms:
                return True
        return False

    def _lease(self, delivery: Delivery, now_ms: int) -> Taken:
        delivery.delivery_count += 1
        delivery.state = DeliveryState.LEASED
        delivery.lease_deadline_ms = now_ms + self.settings.ack_wait_ms
        delivery.not_before_ms = 0
        if delivery.delivery_count == 1:
            delivery.first_delivery_ms = now_ms
        else:
            self.redelivered += 1
        delivery.last_delivery_ms = now_ms
        self.leased += 1
        self.delivered += 1
        self._join_run(delivery)
        return Taken(self.partition, delivery.offset, delivery.delivery_count, delivery.lease_deadline_ms)

    def _join_run(self, delivery: Delivery) -> None:
        """Put a delivery just leased (or extended) to `lease_deadline_ms` in a lease run:
        the last one made when it has that deadline and ends at this offset, else a new
        one with its own timer entry."""
        run = self._run_at(delivery.lease_deadline_ms, delivery.offset)
        run.end = delivery.offset + 1
        run.live += 1
        delivery.run = run

    def _run_at(self, deadline_ms: int, offset: int) -> LeaseRun:
        """The lease run that a lease of `offset` to `deadline_ms` joins: the last one
        made, if it has that deadline and ends at `offset`, else a new one (with its
        timer entry). The caller moves its end and counts the deliveries it adds."""
        run = self._last_run
        if run is None or run.closed or run.deadline_ms != deadline_ms or run.end != offset:
            run = self._new_run(deadline_ms, offset, 0)
        return run

    def _new_run(self, deadline_ms: int, offset: int, taken_ms: int) -> LeaseRun:
        """A new lease run from `offset` (its timer entry pushed), the last one made."""
        run = LeaseRun(deadline_ms, offset, taken_ms)
        self._run_sequence += 1
        heapq.heappush(self._lease_timers, (deadline_ms, self._run_sequence, run))
        self._last_run = run
        return run

    def _delivery(self, offset: int, entry: Delivery | LeaseRun) -> Delivery:
        """The Delivery of `offset`, whose pending entry is `entry`: made from its run
        when the entry is the run (a first delivery as taken), to be changed."""
        if isinstance(entry, Delivery):
            return entry
        delivery = _detached(offset, entry)
        delivery.run = entry  # still in the run: its count of live deliveries is unchanged
        entry.leave_fresh(offset, 1)
        self.pending[offset] = delivery
        return delivery

    @staticmethod
    def _leave_run(delivery: Delivery) -> None:
        run = delivery.run
        if run is not None:
            run.live -= 1
            delivery.run = None

    # -- settling ------------------------------------------------------------------------

    def _current(self, offset: int, delivery_count: int, action: SettleAction) -> Delivery | None:
        """The delivery a settle names, or None for an ack of a message that is done
        (acked, skipped or dead-lettered: acking it again succeeds). Raises for a stale
        delivery, a message being dead-lettered, or a nack, extend or reject of one that
        is done."""
        if not 0 <= offset < self.next_offset:
            raise settle_error(
                ErrorCode.UNKNOWN_DELIVERY,
                f"partition {self.partition} offset {offset} was never delivered to this group",
            )
        entry = self.pending.get(offset) if offset >= self.floor else None
        if entry is None:
            if action is SettleAction.ACK:
                return None
            raise settle_error(
                ErrorCode.DELIVERY_SETTLED,
                f"partition {self.partition} offset {offset} is settled already (acked or dead-lettered)",
            )
        delivery = self._delivery(offset, entry)
        if delivery.delivery_count != delivery_count:
            self.stale_settles += 1
            raise settle_error(
                ErrorCode.STALE_DELIVERY,
                f"partition {self.partition} offset {offset}: delivery {delivery_count} is stale, "
                f"the message was delivered again (delivery {delivery.delivery_count})",
            )
        if delivery.state is DeliveryState.DEAD:
            raise settle_error(
                ErrorCode.DELIVERY_SETTLED, f"partition {self.partition} offset {offset} is being dead-lettered"
            )
        return delivery

    def ack(self, offset: int, delivery_count: int) -> None:
        delivery = self._current(offset, delivery_count, SettleAction.ACK)
        if delivery is None:
            return
        self.acked += 1
        self._remove(offset)
        self._advance_floor()

    def ack_run(self, offset: int, count: int, delivery_count: int) -> list[list]:
        """Ack offsets offset .. offset + count - 1, each at `delivery_count` (a consumer
        acking what one receive delivered): the outcomes as runs [first offset, error
        code, length]. The common case (the delivery named is the one pending) is done
        here without a call per offset; any other goes through `ack` (and its checks)."""
        outcomes: list[list] = []
        pending = self.pending
        floor = self.floor
        leased = DeliveryState.LEASED
        dead = DeliveryState.DEAD
        end = offset + count
        current = offset
        while current < end:
            delivery = pending.get(current) if current >= floor else None
            length = 1
            if type(delivery) is LeaseRun and delivery_count == 1:  # first deliveries as taken
                if delivery.intact:  # every offset from here up to fresh_end is the run's
                    length = min(end, delivery.fresh_end) - current
                    collections.deque(map(pending.__delitem__, range(current, current + length)), maxlen=0)
                else:
                    del pending[current]
                self.leased -= length
                delivery.live -= length
                delivery.leave_fresh(current, length)
                self.acked += length
                code = ErrorCode.NONE
            elif delivery is not None and delivery.delivery_count == delivery_count and delivery.state is not dead:
                if delivery.state is leased:
                    self.leased -= 1
                    run = delivery.run
                    if run is not None:
                        run.live -= 1
                del pending[current]
                self.acked += 1
                code = ErrorCode.NONE
            else:
                try:
                    self.ack(current, delivery_count)
                    code = ErrorCode.NONE
                except ProtocolError as error:
                    code = error.code
                floor = self.floor
            last = outcomes[-1] if outcomes else None
            if last is not None and last[1] == code:
                last[2] += length
            else:
                outcomes.append([current, code, length])
            current += length
        self._advance_floor()
        return outcomes

    def nack(
        self, offset: int, delivery_count: int, now_ms: int, delay_ms: int | None = None, error: str | None = None
    ) -> None:
        delivery = self._current(offset, delivery_count, SettleAction.NACK)
        assert delivery is not None
        self.nacked += 1
        if error:
            delivery.last_error = cut_text(error, self.limits.error_text_bytes_max)
        self._release(delivery)
        if delivery.delivery_count >= self.settings.max_deliveries:
            self._kill(delivery, DeadLetterReason.MAX_DELIVERIES)
            return
        if delay_ms is None:
            delay_ms = self.settings.backoff.delay_ms(delivery.delivery_count)
        self._make_available(delivery, now_ms + max(delay_ms, 0), now_ms)

    def in_progress(self, offset: int, delivery_count: int, now_ms: int) -> int:
        """Start the lease again; returns the new deadline."""
        delivery = self._current(offset, delivery_count, SettleAction.IN_PROGRESS)
        assert delivery is not None
        if delivery.state is not DeliveryState.LEASED:
            self.leased += 1
            delivery.state = DeliveryState.LEASED
            delivery.not_before_ms = 0
        else:
            self._leave_run(delivery)  # the rest of its run keeps the old deadline
        delivery.lease_deadline_ms = now_ms + self.settings.ack_wait_ms
        self._join_run(delivery)
        self.leases_extended += 1
        return delivery.lease_deadline_ms

    def reject(self, offset: int, delivery_count: int, reason: str | None = None) -> None:
        delivery = self._current(offset, delivery_count, SettleAction.REJECT)
        assert delivery is not None
        if reason:
            delivery.last_error = cut_text(reason, self.limits.error_text_bytes_max)
        self._release(delivery)
        self._kill(delivery, DeadLetterReason.REJECTED)

    def _take_back(self, offset: int, delivery_count: int) -> Delivery | None:
        """The delivery of `offset` just handed out as `delivery_count`, its lease
        released and the delivery uncounted (release, defer, expire); None when that is
        not the delivery now."""
        entry = self.pending.get(offset)
        if entry is None or entry.state is not DeliveryState.LEASED or entry.delivery_count != delivery_count:
            return None
        delivery = self._delivery(offset, entry)
        self._release(delivery)
        delivery.delivery_count -= 1
        self.delivered -= 1
        return delivery

    def release(self, offset: int, delivery_count: int) -> None:
        """Undo a delivery just handed out that could not be sent (over the response's
        budget, a failed read): its count goes back, it is available again."""
        delivery = self._take_back(offset, delivery_count)
        if delivery is None:
            return
        if delivery.delivery_count == 0 and offset == self.next_offset - 1:
            del self.pending[offset]
            self.next_offset -= 1
        else:
            self._make_available(delivery, 0, 0)

    def defer(self, offset: int, delivery_count: int, not_before_ms: int) -> None:
        """A delivery just handed out whose message is not due (its not-before time, read
        from the record at delivery, is ahead): taken back uncounted, and available again
        from `not_before_ms` (it keeps its place in the window meanwhile)."""
        delivery = self._take_back(offset, delivery_count)
        if delivery is None:
            return
        if delivery.delivery_count == 0:
            delivery.first_delivery_ms = 0
        self._make_available(delivery, not_before_ms, not_before_ms - 1)

    def expire(self, offset: int, delivery_count: int) -> None:
        """A delivery just handed out whose message's TTL has passed: taken back
        uncounted (the consumer never sees it), then dropped (done, counted as expired)
        or, with the group's expired = "dead-letter", dead-lettered with reason expired."""
        delivery = self._take_back(offset, delivery_count)
        if delivery is None:
            return
        self.expired += 1
        if self.settings.expired == "dead-letter":
            self._kill(delivery, DeadLetterReason.EXPIRED)
        else:
            self._remove(offset)
            self._advance_floor()

    def skip(self, offset: int) -> None:
        """The server found no record at `offset` (a gap): it is done."""
        if offset in self.pending:  # (_remove uncounts a lease it held)
            self.delivered -= 1
            self.skipped += 1
            self._remove(offset)
            self._advance_floor()

    # -- dead letters ---------------------------------------------------------------------

    def take_dead_letters(self, count: int) -> list[DeadLetter]:
        """Up to `count` messages to dead-letter that no append is under way for."""
        out: list[DeadLetter] = []
        for offset in self._dead:
            if len(out) >= count:
                break
            delivery = self.pending[offset]
            if delivery.writing:
                continue
            delivery.writing = True
            out.append(
                DeadLetter(
                    self.partition,
                    offset,
                    delivery.reason,
                    delivery.delivery_count,
                    delivery.first_delivery_ms,
                    delivery.last_delivery_ms,
                    delivery.last_error,
                )
            )
        return out

    def dead_lettered(self, offset: int) -> None:
        """The dead-letter append of `offset` is durable: ack it."""
        delivery = self.pending.get(offset)
        if delivery is None or delivery.state is not DeliveryState.DEAD:
            return
        self.dead_letters_written += 1
        self._remove(offset)
        self._advance_floor()

    def dead_letter_failed(self, offset: int) -> None:
        """The append failed: the message is dead-lettered again later."""
        delivery = self.pending.get(offset)
        if delivery is not None and delivery.state is DeliveryState.DEAD:
            delivery.writing = False

    # -- time --------------------------------------------------------------------------------

    def tick(self, now_ms: int) -> bool:
        """Run out leases and not-before times up to `now_ms`. True when a message became
        available or was marked for dead-lettering."""
        changed = False
        lease_timers = self._lease_timers
        pending = self.pending
        while lease_timers and lease_timers[0][0] <= now_ms:
            run = heapq.heappop(lease_timers)[2]
            run.closed = True
            offset = run.first
            while run.live > 0 and offset < run.end:  # the deliveries still in the run
                delivery = pending.get(offset)
                if delivery is not None and delivery.run is run:
                    delivery = self._delivery(offset, delivery)
                    self.expired_leases += 1
                    self._release(delivery)
                    if delivery.delivery_count >= self.settings.max_deliveries:
                        self._kill(delivery, DeadLetterReason.MAX_DELIVERIES)
                    else:
                        heapq.heappush(self._ready, offset)
                    changed = True
                offset += 1
        timers = self._timers
        while timers and timers[0][0] <= now_ms:
            when, offset = heapq.heappop(timers)
            delivery = pending.get(offset)
            if not isinstance(delivery, Delivery):  # none, or a first delivery as taken: leased
                continue
            if delivery.state is DeliveryState.AVAILABLE and delivery.not_before_ms == when:
                if delivery.delivery_count >= self.settings.max_deliveries:
                    self._kill(delivery, DeadLetterReason.MAX_DELIVERIES)  # a lease kept over a restart
                else:
                    heapq.heappush(self._ready, offset)
                changed = True
        return changed

    def next_deadline_ms(self) -> int | None:
        """When `tick` next has something to do (stale timers are dropped here)."""
        lease_timers = self._lease_timers
        while lease_timers and lease_timers[0][2].live == 0:  # every delivery left the run
            heapq.heappop(lease_timers)[2].closed = True
        timers = self._timers
        while timers and not self._timer_is_live(*timers[0]):
            heapq.heappop(timers)
        if lease_timers and (not timers or lease_timers[0][0] < timers[0][0]):
            return lease_timers[0][0]
        return timers[0][0] if timers else None

    def _timer_is_live(self, when: int, offset: int) -> bool:
        delivery = self.pending.get(offset)
        return delivery is not None and delivery.state is DeliveryState.AVAILABLE and delivery.not_before_ms == when

    # -- internals ---------------------------------------------------------------------------

    def _release(self, delivery: Delivery) -> None:
        if delivery.state is DeliveryState.LEASED:
            self.leased -= 1
            self._leave_run(delivery)
        delivery.state = DeliveryState.AVAILABLE
        delivery.lease_deadline_ms = 0

    def _make_available(self, delivery: Delivery, not_before_ms: int, now_ms: int) -> None:
        delivery.state = DeliveryState.AVAILABLE
        delivery.not_before_ms = not_before_ms
        if not_before_ms <= now_ms:
            heapq.heappush(self._ready, delivery.offset)
        else:
            heapq.heappush(self._timers, (not_before_ms, delivery.offset))

    def _kill(self, delivery: Delivery, reason: DeadLetterReason) -> None:
        delivery.state = DeliveryState.DEAD
        delivery.reason = reason
        delivery.not_before_ms = 0
        self._dead[delivery.offset] = None

    def _remove(self, offset: int) -> None:
        delivery = self._delivery(offset, self.pending[offset])
        del self.pending[offset]
        if delivery.state is DeliveryState.LEASED:
            self.leased -= 1
            self._leave_run(delivery)
        self._dead.pop(offset, None)

    def _advance_floor(self) -> None:
        pending = self.pending
        if not pending:
            self.floor = self.next_offset
            self._ready.clear()
            return
        floor = self.floor
        for _ in range(FLOOR_STEPS_MAX):
            if floor in pending:
                self.floor = floor
                return
            floor += 1
        self.floor = min(pending)  # far ahead (an ack of a whole receive): found at once

    def restore(self, delivery: Delivery, now_ms: int) -> None:
        """Put back a delivery decoded from the store (the caller checked its offset)."""
        self.pending[delivery.offset] = delivery
        if delivery.state is DeliveryState.DEAD:
            self._dead[delivery.offset] = None
        elif delivery.delivery_count >= self.settings.max_deliveries and delivery.not_before_ms <= now_ms:
            self._kill(delivery, DeadLetterReason.MAX_DELIVERIES)  # its last lease ran out in the crash
        else:
            self._make_available(delivery, delivery.not_before_ms, now_ms)

    # -- read-only view for QueueLeases (the console, `nodi queue describe --leases`) -----------

    def in_flight(self, after_offset: int, limit: int) -> list[Delivery]:
        """Up to `limit` messages of the window past `after_offset`, by offset, that were
        delivered at least once or are to be dead-lettered (leased, waiting for a retry,
        dead). Read only: the caller must not change what it gets."""
        offsets = heapq.nsmallest(
            limit,
            (
                offset
                for offset, delivery in self.pending.items()
                if offset > after_offset and (delivery.delivery_count > 0 or delivery.state is DeliveryState.DEAD)
            ),
        )
        return [_detached(offset, self.pending[offset]) for offset in offsets]

    def statistics(self) -> PartitionQueueStatistics:
        return PartitionQueueStatistics(
            self.partition,
            self.floor,
            self.next_offset,
            len(self.pending),
            self.leased,
            len(self._dead),
            self.delivered,
            self.redelivered,
            self.acked,
            self.nacked,
            self.expired_leases,
            self.dead_letters_written,
            self.skipped,
            self.expired,
            self.stale_settles,
            self.leases_extended,
            sum(1 for _, _, run in self._lease_timers if run.live > 0),
        )
