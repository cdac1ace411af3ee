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

Settling waits until the broker has recorded it durably (`wait=True`, the default).
With `wait=False` the call returns at once and settlements go out batched in the
background; `flush()` waits for them and raises the first that failed. A receive asks for
up to `batch_max` messages at a time: the ones not yet handed out are leased all the
same, and close() gives them back (a nack without delay). With `prefetch` (the default)
and at-least-once the queue asks for the next batch, without waiting on the broker, once
half of the current one was handed out if the last receive came back full (a backlog),
so the application rarely waits for a round trip. It does so only while the application
settles what it is handed (every message handed out before the current one is settled:
a consumer that holds messages leases no more than it asked for), so at most batch_max +
batch_max // 2 messages are leased to it and not yet handed out.

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
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from nodi.storage.errors import NodiError
from nodi.storage.records import decode_records, iter_batches

from ..protocol import messages as m
from .errors import ClientClosed, InvalidRecords, error_for
from .types import Message
from ..protocol.queue_settings import Backoff

DEFAULT_BATCH_MAX = 256
DEFAULT_RECEIVE_TIMEOUT_MS = 30_000
# The longest long-poll one request asks for (a server cuts longer waits to its own max).
RECEIVE_POLL_MS_MAX = 10_000
# Settlements in one request.
SETTLEMENTS_PER_REQUEST_MAX = 10_000

# The delivery guarantee (one argument; docs/guarantees.md, "Delivery guarantees").
AT_LEAST_ONCE = "at-least-once"  # ack after the handler: iteration acks what the body left unsettled
AT_MOST_ONCE = "at-most-once"  # ack on receipt: acked before it is handed out
GUARANTEES = (AT_LEAST_ONCE, AT_MOST_ONCE)

_EXPIRED_ACTIONS = {None: m.ExpiredAction.DEFAULT, "drop": m.ExpiredAction.DROP,
                    "dead-letter": m.ExpiredAction.DEAD_LETTER}

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
    return m.QueueBackoff(kind=m.BackoffKind.EXPONENTIAL, base_ms=backoff.base_ms,
                          multiplier_percent=backoff.multiplier_percent, max_ms=backoff.max_ms,
                          jitter_percent=backoff.jitter_percent)


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
        group=group, topic=topic, ack_wait_ms=response.settings.ack_wait_ms,
        max_deliveries=response.settings.max_deliveries, backoff=backoff_from_wire(response.settings.backoff),
        dead_letter_topic=response.dead_letter_topic,
        expired="dead-letter" if response.settings.expired is m.ExpiredAction.DEAD_LETTER else "drop",
        partitions=tuple(QueuePartitionDescription(p.partition, p.ack_floor, p.next_offset, p.pending, p.leased,
                                                   p.dead_letters_pending) for p in response.partitions),
        delivered=response.delivered, redelivered=response.redelivered, acked=response.acked,
        nacked=response.nacked, expired_leases=response.expired_leases, dead_lettered=response.dead_lettered,
        expired_messages=response.expired,
    )


async def list_queues(client, topic: str | None, timeout_ms: int | None) -> list[QueueSummary]:
    response = await client.core.call(
        m.QueueListRequest(topic=topic), timeout_ms, retry=True, expect=m.QueueListResponse
    )
    return [QueueSummary(g.group, g.topic, g.dead_letter_topic, g.pending, g.leased, g.dead_letters_pending)
            for g in response.groups]


@dataclass(frozen=True, slots=True)
class QueueMessage(Message):
    """A message received from a queue group, with its delivery count (1 the first
    time) and lease deadline (wall clock, ms). Settle it with ack, nack, in_progress or
    reject: on an AsyncQueue these return awaitables, on a Queue they block."""

    delivery_count: int = 1
    lease_deadline_ms: int = 0
    group: str = ""
    _queue: Any = field(default=None, repr=False, compare=False)

    def ack(self, *, wait: bool = True):
        return self._queue._settle(self, m.SettleAction.ACK, m.CONFIG_DEFAULT, None, wait)

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


class AsyncQueue:
    """See the module docstring. Made by AsyncClient.queue; `async with` it or call
    close()."""

    def __init__(self, client, topic: str, group: str, *, ack_wait_ms: int | None = None,
                 max_deliveries: int | None = None, backoff: BackoffInput = None,
                 dead_letter_topic: str | None = None, expired: str | None = None,
                 guarantee: str = AT_LEAST_ONCE, batch_max: int = DEFAULT_BATCH_MAX,
                 receive_timeout_ms: int = DEFAULT_RECEIVE_TIMEOUT_MS, prefetch: bool = True) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        if expired not in _EXPIRED_ACTIONS:
            raise ValueError('expired must be None, "drop" or "dead-letter"')
        if guarantee not in GUARANTEES:
            raise ValueError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
        self.guarantee = guarantee
        self.client = client
        self.topic = topic
        self.group = group
        self.batch_max = batch_max
        self.receive_timeout_ms = receive_timeout_ms
        self.prefetch = prefetch
        self._prefetching: asyncio.Task | None = None  # the one receive asked ahead
        # Messages handed out (at-least-once) and not settled yet: prefetch only at 0.
        self._unsettled = 0
        # The last receive came back full: the broker likely has more (a backlog). A
        # trickle (requests, a quiet topic) is not prefetched: it would be a wasted trip.
        self._backlog = False
        self.settings = m.QueueGroupSettings(
            ack_wait_ms=m.CONFIG_DEFAULT if ack_wait_ms is None else ack_wait_ms,
            max_deliveries=m.CONFIG_DEFAULT if max_deliveries is None else max_deliveries,
            backoff=backoff_to_wire(backoff),
            dead_letter_topic=dead_letter_topic,
            expired=_EXPIRED_ACTIONS[expired],
        )
        self._buffer: collections.deque[QueueMessage] = collections.deque()
        # (partition, offset, delivery count, action, delay, text, future or None), in order.
        self._outbox: list[tuple] = []
        self._settled: asyncio.Future | None = None  # returned by every wait=False settle
        self._sender: asyncio.Task | None = None
        self._errors: list[BaseException] = []
        self._closed = False
        # The message an iteration handed out last, and whether its body settled it.
        self._current: QueueMessage | None = None
        self._current_settled = False
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

    # -- receiving ---------------------------------------------------------------------

    async def receive(self, timeout_ms: int | None = None) -> QueueMessage | None:
        """The next message, waiting up to timeout_ms (default receive_timeout_ms) for
        one; None when none came."""
        return await self._receive(timeout_ms, self)

    async def _receive(self, timeout_ms: int | None, owner) -> QueueMessage | None:
        if self._closed:
            raise ClientClosed("the queue is closed")
        if not self._buffer and self._prefetching is not None:
            await asyncio.wait({self._prefetching})  # what it brings lands in the buffer
        if self._buffer:
            message = self._buffer.popleft()
            self.prefetch_soon(owner)
            self._handed_out(owner)
            return message
        timeout_ms = self.receive_timeout_ms if timeout_ms is None else max(int(timeout_ms), 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while True:
            wait_ms = int(max(deadline - loop.time(), 0) * 1000)
            wait_ms = min(wait_ms, RECEIVE_POLL_MS_MAX)
            request = m.QueueReceiveRequest(group=self.group, topic=self.topic, settings=self.settings,
                                            messages_max=self.batch_max, wait_ms=wait_ms)
            response = await self.client.core.call(request, None, extra_ms=wait_ms, expect=m.QueueReceiveResponse)
            received = self._decode(response, owner)
            self._backlog = len(received) >= self.batch_max
            if received and self.guarantee == AT_MOST_ONCE:
                # Acked (durably) before any is handed out: a crash from here loses them.
                await asyncio.gather(*(self._settle_nowait(message, m.SettleAction.ACK, m.CONFIG_DEFAULT, None,
                                                           record_error=False)
                                       for message in received))
            self._buffer.extend(received)
            if self._buffer:
                message = self._buffer.popleft()
                self.prefetch_soon(owner)
                self._handed_out(owner)
                return message
            if self._closed:
                raise ClientClosed("the queue is closed")
            if loop.time() >= deadline:
                return None

    def _handed_out(self, owner) -> None:
        if owner is self and self.guarantee == AT_LEAST_ONCE:
            self._unsettled += 1

    def prefetch_soon(self, owner, settled: bool | None = None) -> None:
        """Ask for the next batch (no long poll) when half of this one was handed out,
        the application settled what it was handed before, and no such request is under
        way. On the client's loop; `owner` (this queue or its blocking twin) counts the
        unsettled messages, unless `settled` says what its count was when it asked."""
        if settled is None:
            settled = owner._unsettled == 0
        if (self.prefetch and self._backlog and self._prefetching is None and not self._closed and settled
                and self.guarantee == AT_LEAST_ONCE and len(self._buffer) <= self.batch_max // 2):
            self._prefetching = asyncio.get_running_loop().create_task(self._prefetch_once(owner))

    async def _prefetch_once(self, owner) -> None:
        """One receive that does not wait for messages (at-least-once only: nothing is
        acked here); a failure is left to the next receive the application makes (which
        meets it again)."""
        try:
            request = m.QueueReceiveRequest(group=self.group, topic=self.topic, settings=self.settings,
                                            messages_max=self.batch_max, wait_ms=0)
            received = self._decode(await self.client.core.call(request, None, expect=m.QueueReceiveResponse), owner)
            self._backlog = len(received) >= self.batch_max
            if self._closed:  # closed meanwhile: given back like the buffer
                for message in received:
                    self._settle_nowait(message, m.SettleAction.NACK, 0, None)
            else:
                self._buffer.extend(received)
        except Exception:  # noqa: BLE001 - the next receive reports it
            pass
        finally:
            self._prefetching = None

    def _decode(self, response: m.QueueReceiveResponse, owner) -> list[QueueMessage]:
        if not response.deliveries:
            return []
        try:
            records = [record for header, batch in iter_batches(response.records)
                       for record in decode_records(batch, header)]
        except NodiError as error:
            raise InvalidRecords(f"queue receive from {self.topic}: {error}") from None
        offsets = sum(run.count for run in response.deliveries)
        if len(records) != offsets:
            raise InvalidRecords(f"queue receive: {len(records)} records for {offsets} delivered offsets")
        topic, group = self.topic, self.group
        messages = []
        index = 0
        for run in response.deliveries:  # runs of consecutive offsets
            partition, count, deadline = run.partition, run.delivery_count, run.lease_deadline_ms
            for offset in range(run.offset, run.offset + run.count):
                record = records[index]
                index += 1
                messages.append(QueueMessage(topic, partition, offset, record.timestamp_ms, record.key, record.value,
                                             record.headers, count, deadline, group, owner))
        return messages

    def __aiter__(self) -> AsyncIterator[QueueMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[QueueMessage]:
        """At-least-once: a message the loop body left unsettled is acked when the loop
        comes back for the next one (the body returned); one whose body raised is not
        (its lease runs out and it is delivered again)."""
        while not self._closed:
            message = await self.receive(RECEIVE_POLL_MS_MAX)
            if message is None:
                continue
            self._current, self._current_settled = message, False
            yield message
            if self.guarantee == AT_LEAST_ONCE and not self._current_settled and not self._closed:
                self._settled_one()
                self._settle_nowait(message, m.SettleAction.ACK, m.CONFIG_DEFAULT, None)
            self._current = None

    # -- settling -------------------------------------------------------------------------

    def _settle(self, message: QueueMessage, action: m.SettleAction, delay_ms: int, text: str | None,
                wait: bool) -> asyncio.Future:
        if message is self._current:
            self._current_settled = True
        self._settled_one()
        if wait:
            return self._settle_nowait(message, action, delay_ms, text, record_error=False)
        self._settle_nowait(message, action, delay_ms, text)
        if self._settled is None:  # one finished future serves every wait=False call
            self._settled = asyncio.get_running_loop().create_future()
            self._settled.set_result(None)
        return self._settled

    def _reply(self, message: QueueMessage, value, key, headers):
        from .request import send_reply

        return send_reply(self.client, message, value, key, headers)

    def _settled_one(self) -> None:
        """The application settled a message it was handed (a repeat settle of one is not
        told apart: the count only gates prefetching)."""
        if self._unsettled:
            self._unsettled -= 1

    def _settle_nowait(self, message: QueueMessage, action: m.SettleAction, delay_ms: int,
                       text: str | None, *, record_error: bool = True) -> asyncio.Future | None:
        """Queue a settlement (on the client's loop). Without record_error a future holds
        its result; with it (nobody awaits) there is none and a failure is kept for
        flush() to raise."""
        future = None if record_error else asyncio.get_running_loop().create_future()
        if self._closed and action is not m.SettleAction.NACK:
            self._fail(future, ClientClosed("the queue is closed"))
            return future
        self._outbox.append((message.partition, message.offset, message.delivery_count, action, delay_ms, text,
                             future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_settlements())
        return future

    def _fail(self, future: asyncio.Future | None, error: BaseException) -> None:
        if future is None:
            self._errors.append(error)
        elif not future.done():
            future.set_exception(error)

    async def _send_settlements(self) -> None:
        """One request at a time; what is queued meanwhile goes out together next, the
        same settle of consecutive offsets as one run (an ack of a whole batch is one
        entry on the wire)."""
        while self._outbox:
            batch = self._outbox[:SETTLEMENTS_PER_REQUEST_MAX]
            del self._outbox[:SETTLEMENTS_PER_REQUEST_MAX]
            request = m.QueueSettleRequest(group=self.group, topic=self.topic, settlements=_runs(batch))
            try:
                response = await self.client.core.call(request, None, retry=True, expect=m.QueueSettleResponse)
            except Exception as error:
                for entry in batch:
                    self._fail(entry[6], error)
                continue
            outcomes = [(result.error_code, result.lease_deadline_ms, result.count) for result in response.results]
            if sum(count for _, _, count in outcomes) != len(batch):
                mismatch = InvalidRecords(f"queue settle: outcomes for {sum(c for _, _, c in outcomes)} offsets, "
                                          f"{len(batch)} settled")
                for entry in batch:
                    self._fail(entry[6], mismatch)
                continue
            index = 0
            for code, deadline, count in outcomes:
                for partition, offset, _, action, _, _, future in batch[index:index + count]:
                    if code != 0:
                        where = f"{self.topic}-{partition} offset {offset}"
                        self._fail(future, error_for(code, f"{action.name.lower()} {where}"))
                    elif future is not None and not future.done():
                        future.set_result(deadline if deadline >= 0 else None)
                index += count

    async def flush(self) -> None:
        """Wait until every settlement made so far is answered; raise the first that
        failed since the last flush."""
        while self._sender is not None and not self._sender.done():
            await asyncio.shield(self._sender)
        if self._errors:
            error, self._errors = self._errors[0], []
            raise error

    async def close(self) -> None:
        """Give back messages received but not handed out, send what is queued, close."""
        if self._closed:
            return
        self._closed = True
        if self._prefetching is not None:  # short (no long poll); it gives back what it got
            await asyncio.wait({self._prefetching})
        while self._buffer:
            message = self._buffer.popleft()
            self._settle_nowait(message, m.SettleAction.NACK, 0, None)
        with contextlib.suppress(Exception):
            await self.flush()
        self.client.core.disown(self)


def _runs(batch: list[tuple]) -> list[m.Settlement]:
    """The outbox entries of `batch` (partition, offset, delivery count, action, delay,
    text, future: one offset each, in order) as settlements in runs: consecutive offsets
    of one partition with the same delivery count, action, delay and text."""
    runs: list[list] = []  # [partition, first offset, delivery count, action, delay, text, count]
    last = None
    for partition, offset, delivery_count, action, delay_ms, text, _ in batch:
        if (last is not None and last[0] == partition and last[1] + last[6] == offset and last[2] == delivery_count
                and last[3] is action and last[4] == delay_ms and last[5] == text):
            last[6] += 1
        else:
            last = [partition, offset, delivery_count, action, delay_ms, text, 1]
            runs.append(last)
    return [m.Settlement(partition=partition, offset=offset, delivery_count=delivery_count, action=action,
                         delay_ms=delay_ms, text=text, count=count)
            for partition, offset, delivery_count, action, delay_ms, text, count in runs]


class Queue:
    """The blocking twin of AsyncQueue, made by Client.queue; iterate it or receive()."""

    def __init__(self, client, topic: str, group: str, **options: Any) -> None:
        self._client = client
        self._async: AsyncQueue = client.core.run(self._make(client.core.async_client, topic, group, options), None)
        # Settles made with wait=False, handed to the loop thread in runs.
        self._local: list[tuple] = []
        self._local_lock = threading.Lock()
        self._current: QueueMessage | None = None
        self._current_settled = False
        self._unsettled = 0  # as AsyncQueue's, counted in the application's thread
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

    def receive(self, timeout_ms: int | None = None) -> QueueMessage | None:
        queue = self._async
        with contextlib.suppress(IndexError):  # received already: no trip to the loop thread
            if not queue.closed:
                message = queue._buffer.popleft()
                if (queue.prefetch and queue._backlog and queue._prefetching is None and self._unsettled == 0
                        and queue.guarantee == AT_LEAST_ONCE and len(queue._buffer) <= queue.batch_max // 2):
                    self._client.core.call_soon(queue.prefetch_soon, self, True)
                self._handed_out()
                return message
        wait = self._async.receive_timeout_ms if timeout_ms is None else timeout_ms
        message = self._client.core.run(self._async._receive(timeout_ms, self), None, wait)
        if message is not None:
            self._handed_out()
        return message

    def _handed_out(self) -> None:
        if self._async.guarantee == AT_LEAST_ONCE:
            self._unsettled += 1

    def __iter__(self) -> Iterator[QueueMessage]:
        """As AsyncQueue's: at-least-once acks what the loop body left unsettled when
        the loop comes back for the next message."""
        while not self.closed:
            message = self.receive(RECEIVE_POLL_MS_MAX)
            if message is None:
                continue
            self._current, self._current_settled = message, False
            yield message
            if self._async.guarantee == AT_LEAST_ONCE and not self._current_settled and not self.closed:
                self._settle(message, m.SettleAction.ACK, m.CONFIG_DEFAULT, None, False)
            self._current = None

    def _settle(self, message: QueueMessage, action: m.SettleAction, delay_ms: int, text: str | None,
                wait: bool):
        if message is self._current:
            self._current_settled = True
        if self._unsettled:
            self._unsettled -= 1
        queue = self._async
        if wait:
            async def settle():
                return await queue._settle_nowait(message, action, delay_ms, text, record_error=False)

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
        for item in pending:
            self._async._settle_nowait(*item)

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
