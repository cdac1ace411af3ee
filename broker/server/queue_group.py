"""A queue group on one topic: a PartitionQueue (broker/server/queues.py) per partition, with
receives spread over the partitions and the set of partitions changed since they were
last staged for the metadata store."""

from __future__ import annotations

from collections.abc import Callable

from ..protocol.errors import ErrorCode
from ..protocol.messages import SettleAction
from ..protocol.queue_settings import QueueLimits, QueueSettings
from .queues import DeadLetter, PartitionQueue, QueueGroupStatistics, Taken, settle_error


class QueueGroup:
    """One queue group on one topic: a PartitionQueue per partition. Not thread-safe:
    the server calls it from its event loop. `dirty` names the partitions changed since
    the server last staged them; `on_change` (the server's) is called with the group each
    time a partition is marked, so the server finds the changed groups without a scan."""

    def __init__(
        self,
        group: str,
        topic: str,
        settings: QueueSettings,
        limits: QueueLimits,
        partitions: int = 0,
        on_change: Callable[[QueueGroup], None] = lambda group: None,
    ) -> None:
        self.group = group
        self.topic = topic
        self.key = (group, topic)
        self.settings = settings
        self.limits = limits
        self.partitions: list[PartitionQueue] = []
        self.dirty: set[int] = set()
        self.on_change = on_change
        self._cursor = 0
        self.ensure_partitions(partitions)

    def ensure_partitions(self, count: int) -> None:
        while len(self.partitions) < count:
            self.partitions.append(PartitionQueue(len(self.partitions), self.settings, self.limits))

    def mark_dirty(self, partition: int) -> None:
        self.dirty.add(partition)
        self.on_change(self)

    def partition(self, number: int) -> PartitionQueue:
        if not 0 <= number < len(self.partitions):
            raise settle_error(ErrorCode.UNKNOWN_PARTITION, f"topic {self.topic!r} has no partition {number}")
        return self.partitions[number]

    def receive(self, count: int, now_ms: int) -> list[Taken]:
        """Lease up to `count` messages from any partitions, starting at a partition that
        moves on by one each call, so busy partitions share the receivers."""
        taken: list[Taken] = []
        partitions = self.partitions
        if not partitions:
            return taken
        start = self._cursor % len(partitions)
        self._cursor = start + 1
        for step in range(len(partitions)):
            if len(taken) >= count:
                break
            queue = partitions[(start + step) % len(partitions)]
            got = queue.take(count - len(taken), now_ms)
            if got:
                taken.extend(got)
                self.mark_dirty(queue.partition)
        return taken

    def answerable_uncommitted(self, deliveries) -> bool:
        """Whether a receive of `deliveries` (runs: partition, offset, count and
        delivery_count) may be answered before its state is committed: first deliveries
        within their partition's committed reservation only (broker/server/queues.py)."""
        partitions = self.partitions
        for run in deliveries:
            last = run.offset + run.count - 1
            if run.delivery_count != 1 or last >= partitions[run.partition].durable_reserved_offset:
                return False
        return True

    def reservation_moved(self) -> bool:
        """Whether a partition's reservation moved ahead since it was last staged."""
        return any(queue.reserved_offset > queue.staged_reserved_offset for queue in self.partitions)

    def has_available(self, now_ms: int) -> bool:
        return any(queue.has_available(now_ms) for queue in self.partitions)

    def settle(
        self,
        action: SettleAction,
        partition: int,
        offset: int,
        delivery_count: int,
        now_ms: int,
        delay_ms: int | None = None,
        text: str | None = None,
    ) -> int:
        """Apply one settle; raises a ProtocolError (never closing) for one that cannot
        be applied. Returns the new lease deadline for IN_PROGRESS, else 0."""
        queue = self.partition(partition)
        deadline = 0
        if action is SettleAction.ACK:
            queue.ack(offset, delivery_count)
        elif action is SettleAction.NACK:
            queue.nack(offset, delivery_count, now_ms, delay_ms, text)
        elif action is SettleAction.IN_PROGRESS:
            deadline = queue.in_progress(offset, delivery_count, now_ms)
        else:
            queue.reject(offset, delivery_count, text)
        self.mark_dirty(partition)
        return deadline

    def tick(self, now_ms: int) -> bool:
        changed = False
        for queue in self.partitions:
            if queue.tick(now_ms):
                self.mark_dirty(queue.partition)
                changed = True
        return changed

    def next_deadline_ms(self) -> int | None:
        deadlines = [d for d in (queue.next_deadline_ms() for queue in self.partitions) if d is not None]
        return min(deadlines) if deadlines else None

    def take_dead_letters(self, count: int) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        for queue in self.partitions:
            if len(out) >= count:
                break
            out.extend(queue.take_dead_letters(count - len(out)))
        return out

    def dead_lettered(self, partition: int, offset: int) -> None:
        self.partitions[partition].dead_lettered(offset)
        self.mark_dirty(partition)

    def defer(self, item: Taken, not_before_ms: int) -> None:
        self.partitions[item.partition].defer(item.offset, item.delivery_count, not_before_ms)
        self.mark_dirty(item.partition)

    def expire(self, item: Taken) -> None:
        self.partitions[item.partition].expire(item.offset, item.delivery_count)
        self.mark_dirty(item.partition)

    def release(self, taken: list[Taken]) -> None:
        for item in reversed(taken):
            self.partitions[item.partition].release(item.offset, item.delivery_count)
            self.mark_dirty(item.partition)

    def skip(self, partition: int, offset: int) -> None:
        self.partitions[partition].skip(offset)
        self.mark_dirty(partition)

    def statistics(self) -> QueueGroupStatistics:
        parts = self.partitions

        def total(name: str) -> int:
            return sum(getattr(queue, name) for queue in parts)

        return QueueGroupStatistics(
            group=self.group,
            topic=self.topic,
            settings=self.settings,
            partitions=tuple(queue.statistics() for queue in parts),
            delivered=total("delivered"),
            redelivered=total("redelivered"),
            acked=total("acked"),
            nacked=total("nacked"),
            expired_leases=total("expired_leases"),
            dead_lettered=total("dead_letters_written"),
            skipped=total("skipped"),
            expired=total("expired"),
            stale_settles=total("stale_settles"),
            leases_extended=total("leases_extended"),
        )
