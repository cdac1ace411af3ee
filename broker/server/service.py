"""What the broker does for each request, apart from connections and bytes.

`Broker.handle(request)` returns a Reply: a response message, plus the file slices to
send after it for a fetch (sendfile). Storage calls that may block on an fsync or a
big read run in threads; cheap ones (an append's write to the page cache, header scans)
run on the event loop. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import ClassVar

from nodi.storage.config import FsyncPolicy
from nodi.storage.errors import (
    DurableWaitTimeoutError,
    NodiError,
    OffsetOutOfRangeError,
    PartitionNotReadyError,
    UnknownTopicError,
)
from nodi.storage.log import AppendResult, CheckedAppend, Log
from nodi.storage.store import Store
from nodi.storage.topic_settings import TOPIC_SETTINGS, TopicConfig

from ..protocol import messages as m
from ..protocol.errors import ErrorCode, ProtocolError
from .clock import SYSTEM_CLOCK, Clock
from .compaction_service import CompactionService
from .config import ServerConfig
from .dedup import PublishDedup
from .durable_answer import DurableAnswer
from .groups import GroupCoordinator
from .inbox_service import InboxService
from .queue_service import QueueService
from .reply import Reply, error_code_for, error_reply, response_of
from .status import serve_server_status

log = logging.getLogger("nodi.broker")

# The fetch response header and frame overhead, kept out of the records budget so a
# fetch response always fits in frame_bytes_max.
FETCH_OVERHEAD_BYTES = 256
# How often the metadata retry timer looks while the store commits normally.
METADATA_RETRY_POLL_S = 1.0
# After a durable produce found company (its partition's fsync already pending, an fsync
# on the pool, another partition's produce in the same loop turn), the produces of the
# next this many seconds are fsynced on the pool, not on the loop: producers that take
# turns (each waiting for its answer) are concurrent without showing it at every append.
FSYNC_ON_LOOP_QUIET_S = 0.01
# A partition's durable waiters are swept of finished (timed-out) ones when this many
# are kept (or twice the live ones after the last sweep, whichever is more): waits that
# timed out on a disk that stopped answering do not pile up, and a sweep costs O(1) per
# wait however many producers wait at once.
DURABLE_WAITERS_PRUNE_AT = 1024


def _answer_unless_done(future: asyncio.Future) -> None:
    """A waiting fetch's timer: end its wait as a wake-up would."""
    if not future.done():
        future.set_result(None)


class _PartitionWaiters:
    """What waits on one partition's log, on the loop: fetches long-polling for data,
    and durable acknowledgements waiting for the fsync that covers their offset. The
    log's one readable notification after each fsync wakes both (one
    call_soon_threadsafe per fsync, however many produce requests and fetches it ends)."""

    def __init__(self, partition_log: Log) -> None:
        self.log = partition_log
        self.futures: set[asyncio.Future] = set()
        # (offset, sequence, future or DurableAnswer), smallest offset first.
        self.durable: list[tuple[int, int, asyncio.Future | DurableAnswer]] = []
        self._sequence = itertools.count()
        self._prune_at = DURABLE_WAITERS_PRUNE_AT

    def waiting(self) -> bool:
        return bool(self.futures or self.durable)

    def waiting_now(self) -> bool:
        """Whether a fetch or an acknowledgement still waits (not one that timed out)."""
        return any(not future.done() for future in self.futures) or any(not entry[2].done() for entry in self.durable)

    def wake(self) -> None:
        for future in self.futures:
            if not future.done():
                future.set_result(None)
        self.futures.clear()
        self.settle_durable()

    def add_durable(self, loop: asyncio.AbstractEventLoop, offset: int) -> asyncio.Future:
        """A future resolved once `offset` is fsynced, or failed with the log's
        durable_failure. Checked after it is added: an fsync that ended meanwhile has
        either been seen here or will call wake()."""
        future = loop.create_future()
        self.add_durable_waiter(future, offset)
        return future

    def add_durable_waiter(self, waiter: asyncio.Future | DurableAnswer, offset: int) -> None:
        """add_durable for a waiter made by the caller (a future, or a DurableAnswer:
        anything with done, set_result and set_exception)."""
        if len(self.durable) >= self._prune_at:  # waits that timed out, left behind
            self.durable = [entry for entry in self.durable if not entry[2].done()]
            heapq.heapify(self.durable)
            # Many live waits (many producers): sweep again only once they double.
            self._prune_at = max(DURABLE_WAITERS_PRUNE_AT, 2 * len(self.durable))
        heapq.heappush(self.durable, (offset, next(self._sequence), waiter))
        self.settle_durable()

    def settle_durable(self) -> None:
        durable = self.durable
        durable_offset = self.log.durable_offset
        while durable and durable[0][0] < durable_offset:
            future = heapq.heappop(durable)[2]
            if not future.done():
                future.set_result(None)
        if durable:
            failure = self.log.durable_failure
            if failure is not None:
                for _, _, future in durable:
                    if not future.done():
                        future.set_exception(failure)
                durable.clear()


class _MetadataFlush:
    """One LMDB commit of what was staged before it started, and the commits waiting on
    it: each waiter's own future, settled directly when the commit's thread reports
    back (one call_soon_threadsafe per flush), so a waiter that gives up (timeout,
    cancel) leaves the flush to the others; and the callbacks of
    Broker.when_metadata_flushed, called with the commit's error (None: committed)."""

    __slots__ = ("futures", "callbacks", "done", "error")

    def __init__(self) -> None:
        self.futures: list[asyncio.Future] = []
        self.callbacks: list[Callable[[BaseException | None], None]] = []
        self.done = False
        self.error: BaseException | None = None

    def settle(self, error: BaseException | None) -> None:
        self.done, self.error = True, error
        for future in self.futures:
            if not future.done():
                future.set_result(None)
        self.futures.clear()
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            try:
                callback(error)
            except Exception:  # one hook's fault must not keep the others waiting
                log.exception("metadata flush: a callback failed")


def _expire_durable_wait(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class Broker:
    def __init__(self, store: Store, config: ServerConfig, clock: Clock = SYSTEM_CLOCK) -> None:
        self.store = store
        self.config = config
        # Every time that decides behaviour below comes from here (broker/server/clock.py);
        # the store was opened with its time_ms too.
        self.clock = clock
        self.coordinator = GroupCoordinator(
            store.metadata, self._partition_count, lambda: int(clock.monotonic() * 1000), config.groups
        )

        # GroupWait requests held per group, answered when its generation moves.
        self._group_waiters: dict[str, set[asyncio.Future]] = {}
        self.coordinator.on_generation = self._wake_group_waiters
        self.queues = QueueService(self, config.queues)

        self.compaction = CompactionService(store, config.compaction, clock.time_ms)
        # Publish dedup of idempotency keys (broker/server/dedup.py), read back from the logs.
        self.dedup = PublishDedup(clock_ms=clock.time_ms)
        for name, topic_config in store.topics().items():
            self.dedup.configure(name, topic_config.dedup_window_ms)
        # Publish dedup spans a topic's partitions: until every partition of a topic has
        # been read back, a produce carrying idempotency keys to it is answered
        # PARTITION_NOT_READY (a start that opens partitions in the background).
        opened = {(name, partition) for name, partition, _ in store.logs()}
        self._dedup_unread: dict[str, set[int]] = {}
        for name, topic_config in store.topics().items():
            if topic_config.dedup_window_ms > 0:
                unread = {p for p in range(topic_config.partitions) if (name, p) not in opened}
                if unread:
                    self._dedup_unread[name] = unread
        self.dedup.rebuild_all(store.logs())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: asyncio.TaskGroup | None = None
        # The metadata flush that staged offsets wait for (one per loop tick at most).
        self._next_flush: _MetadataFlush | None = None
        self._flushing = False
        self._waiters: dict[int, _PartitionWaiters] = {}  # id(log) -> waiters
        self._listeners: dict[int, Callable[[], None]] = {}
        self._loop_thread: int | None = None  # the loop's thread (threading.get_ident)
        # A lone durable produce's fsync, run on the loop at the end of the turn
        # (produce_durable_nowait): the log whose job waits for it, or None.
        self._fsync_on_loop: Log | None = None
        # No fsync on the loop before this loop time (FSYNC_ON_LOOP_QUIET_S).
        self._fsync_on_loop_after = 0.0
        # None: never on the loop (fsync_on_loop_max_ms 0).
        self._fsync_on_loop_max_s = config.fsync_on_loop_max_ms / 1000 if config.fsync_on_loop_max_ms else None
        self._producer_ids = itertools.count()
        self._producer_id_base = int(time.time() * 1000) << 20
        self.server_id = f"nodi-{self._producer_id_base:x}"
        self.inboxes = InboxService(self.server_id, config.inboxes, clock)
        # The server's statistics() (connections, uptime), set by the Server that runs
        # this broker; SERVER_STATUS reports them.
        self.server_statistics: Callable[[], object] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, tasks: asyncio.TaskGroup) -> None:
        """Start serving on `loop`; background work goes into `tasks`."""
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._tasks = tasks
        # A partition the store opens from now on (after a start that opens them in the
        # background) is prepared by the hook before it is served; those open already
        # were read back by the publish dedup above and are watched here.
        self.store.on_partition_opened = self._partition_opened
        self.store.on_partition_closing = self._partition_closing
        for _, _, partition_log in self.store.logs():
            self._watch(partition_log)
        tasks.create_task(self._expire_members())
        tasks.create_task(self._retry_metadata())
        self.queues.attach(loop, tasks)
        self.inboxes.attach(tasks)

    def _partition_count(self, topic: str) -> int | None:
        config = self.store.topic_config(topic)
        return None if config is None else config.partitions

    async def _expire_members(self) -> None:
        """The group coordinator's timer: members whose session timed out leave."""
        while True:
            deadline = self.coordinator.next_deadline_ms()
            now = int(self.clock.monotonic() * 1000)
            await asyncio.sleep(0.2 if deadline is None else min(max(deadline - now, 0), 200) / 1000)
            for expired in self.coordinator.expire():
                log.info("group %s: member %s timed out", expired.group, expired.member_id)

    async def _retry_metadata(self) -> None:
        """After a failed metadata commit, flush when the store's backoff ends, traffic
        or not: the store recovers by itself once the disk has room again
        (storage/metadata.py, "A failed commit"). The store logs both ends of a failure."""
        while True:
            retry_in_s = self.store.metadata.retry_in_s()
            await asyncio.sleep(METADATA_RETRY_POLL_S if retry_in_s is None else max(retry_in_s, 0.01))
            if self.store.metadata.retry_in_s() == 0:
                try:
                    await self.flush_metadata()
                except Exception as error:  # still failing: the store counts it and backs off
                    log.debug("metadata retry: %s", error)

    async def flush_metadata(self) -> None:
        """Return once everything staged before the call is committed to LMDB. Callers
        in the same loop tick share one flush (one fsync), run off the loop."""
        await self._wait_flushed(self._flush_waiter())

    def when_metadata_flushed(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call `callback(error)` on the loop once everything staged before this call is
        committed to LMDB (error None) or its commit failed (the error). The hook of a
        caller that settles its own waiters (the queue service's persist): no task, no
        future of the broker's; it keeps its own timeout."""
        self._flush_waiter().callbacks.append(callback)

    def _flush_waiter(self) -> _MetadataFlush:
        """The metadata flush that will carry everything staged so far (started at the
        end of this loop tick, or after the flush running now)."""
        if self._next_flush is None:
            assert self._loop is not None  # attach() ran: commits are made on the loop
            self._next_flush = _MetadataFlush()
            if not self._flushing:
                self._loop.call_soon(self._start_flush)
        return self._next_flush

    async def _wait_flushed(self, flush: _MetadataFlush) -> None:
        """Wait for the shared `flush`, at most write_timeout_ms (TimeoutError), without
        cancelling it for the others when this caller gives up or is cancelled; raise
        its failure, if it failed. One future and one timer per waiter, settled by the
        flush itself (a commit's hot path: no relay callback, no loop turn of its own)."""
        if not flush.done:
            assert self._loop is not None  # attached: flushes are made on the loop
            own = self._loop.create_future()
            flush.futures.append(own)
            expiry = self._loop.call_later(self.config.write_timeout_ms / 1000, _expire_durable_wait, own)
            try:
                await own
            finally:
                expiry.cancel()
        if flush.error is not None:
            raise flush.error

    def _start_flush(self) -> None:
        """Hand what is staged to a thread for one LMDB commit; the thread reports back
        with one call_soon_threadsafe to `_flushed`, which answers the waiters. (A
        stopped pool drops the job: only after the store closed, when nobody is served;
        a waiter would time out.)"""
        if self._next_flush is None:
            return
        flush, self._next_flush = self._next_flush, None
        self._flushing = True
        loop = self._loop
        assert loop is not None  # set by attach()
        # On the store's fsync pool (storage/fsync_pool.py): a worker that has just synced
        # a log takes it, and no executor future is chained back to the loop.
        self.store.fsync_pool.submit(functools.partial(self._flush_in_thread, loop, flush))

    def _flush_in_thread(self, loop: asyncio.AbstractEventLoop, flush: _MetadataFlush) -> None:
        error: BaseException | None = None
        try:
            self.store.metadata.flush()
        except BaseException as raised:  # noqa: BLE001 - reported to every commit waiting on it
            error = raised
        try:
            loop.call_soon_threadsafe(self._flushed, flush, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _flushed(self, flush: _MetadataFlush, error: BaseException | None) -> None:
        self._flushing = False
        flush.settle(error)
        if self._next_flush is not None:
            self._start_flush()

    def _partition_opened(self, topic: str, partition: int, partition_log: Log) -> None:
        """The store's hook for a partition opened after the start, in the thread that
        opened it and before anyone is handed its log: its long-poll watchers, and its
        publish-dedup keys read back here and handed to the loop (which owns the dedup
        state; the topic's keyed produces wait for every partition's)."""
        self._watch(partition_log)
        self._on_loop(lambda: self.queues.on_partition_opened(topic))
        unread = self._dedup_unread.get(topic)
        if unread is None or partition not in unread:
            return
        try:
            found = self.dedup.read_back(topic, partition, partition_log)
        except NodiError as error:  # a corrupt segment is reported by reads; carry on
            log.warning("publish dedup: keys of %s-%d not read back: %s", topic, partition, error)
            found = []

        def add() -> None:
            self.dedup.add_read_back(topic, partition, found, in_order=True)
            left = self._dedup_unread.get(topic)
            if left is not None:
                left.discard(partition)
                if not left:
                    del self._dedup_unread[topic]

        self._on_loop(add)

    def _on_loop(self, call: Callable[[], None]) -> None:
        """Run `call` on the broker's loop: now when this is the loop's thread, else
        soon (from a store thread); not at all once the loop is gone (stopping)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # stopping: nothing is served any more
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            call()
        else:
            loop.call_soon_threadsafe(call)

    def _partition_closing(self, topic: str, partition: int, partition_log: Log) -> bool:
        """The store's hook before it closes an idle log (any thread; nobody can get
        the log from the store any more): keep it while a fetch or an acknowledgement
        waits on it, else stop watching it (no wake: nothing waits)."""
        waiters = self._waiters.get(id(partition_log))
        if waiters is not None and waiters.waiting_now():
            return False
        callback = self._listeners.pop(id(partition_log), None)
        if callback is not None:
            partition_log.remove_readable_listener(callback)
        self._waiters.pop(id(partition_log), None)
        return True

    def _check_dedup_read_back(self, topic: str) -> None:
        """PartitionNotReadyError while some partition of `topic` has not had its
        publish-dedup keys read back (after a start); those move to the front of the
        background open."""
        unread = self._dedup_unread.get(topic)
        if unread:
            for partition in sorted(unread):
                if self.store.open_failed(topic, partition):  # logged; it serves nothing, keys unknown
                    unread.discard(partition)
                else:
                    self.store.opened_log(topic, partition)
        if unread:
            raise PartitionNotReadyError(
                f"topic {topic!r}: publish dedup is reading keys back from {len(unread)} partition(s) still "
                "opening after the start: retry in a moment"
            )

    def _watch(self, partition_log: Log) -> None:
        key = id(partition_log)
        if key in self._listeners:
            return
        waiters = self._waiters[key] = _PartitionWaiters(partition_log)
        loop = self._loop  # None before attach() (a test driving handlers directly): no reader waits then
        loop_thread = self._loop_thread

        def readable() -> None:  # any thread
            if loop is not None and waiters.waiting() and not loop.is_closed():
                if threading.get_ident() == loop_thread:
                    loop.call_soon(waiters.wake)  # the loop's own fsync: no wake-up write
                else:
                    loop.call_soon_threadsafe(waiters.wake)

        self._listeners[key] = readable
        partition_log.add_readable_listener(readable)

    def _unwatch(self, partition_log: Log) -> None:
        callback = self._listeners.pop(id(partition_log), None)
        if callback is not None:
            partition_log.remove_readable_listener(callback)
        waiters = self._waiters.pop(id(partition_log), None)
        if waiters is not None:
            waiters.wake()

    # -- dispatch ---------------------------------------------------------------------

    async def handle(self, request: m.Request, client_id: str = "") -> Reply:
        handler = self._handlers.get(type(request))
        try:
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_API, f"{type(request).__name__} is not served here")
            if type(request) is m.JoinGroupRequest:
                return await self._join_group(request, client_id)
            return await handler(self, request)
        except ProtocolError as error:
            return error_reply(request, error)
        except Exception as error:  # every storage error becomes a typed code
            if error_code_for(error) is ErrorCode.INTERNAL:
                log.exception("internal error serving %s", type(request).__name__)
            return error_reply(request, error)

    async def answer(self, request: m.Request, answering: Awaitable[Reply]) -> Reply:
        """`answering`'s reply, its errors turned into replies as handle() turns them."""
        try:
            return await answering
        except Exception as error:
            if error_code_for(error) is ErrorCode.INTERNAL:
                log.exception("internal error serving %s", type(request).__name__)
            return error_reply(request, error)

    # -- topics -------------------------------------------------------------------------

    def _topic_config(self, settings: m.TopicSettings) -> TopicConfig:
        """The config a CreateTopic asks for: each setting left at -1 (null for a
        string) takes the server's [topic_defaults]; -2 is no limit. Validated."""
        base = self.config.topic_defaults
        # A default without delete_retention_ms takes the compaction service's.
        base = replace(base, delete_retention_ms=self.compaction.delete_retention_ms(base))
        values = {}
        for setting in TOPIC_SETTINGS:
            value = getattr(settings, setting.name)
            server_default = not value if setting.type is str else value == m.CONFIG_DEFAULT  # null or "": str
            if server_default:
                value = getattr(base, setting.name)
            elif setting.unlimited and value == m.RETENTION_UNLIMITED:
                value = None
            values[setting.name] = value
        config = TopicConfig(**values)
        config.validate()
        return config

    def _settings(self, config: TopicConfig) -> m.TopicSettings:
        """The settings in force, for the wire: no limit as -2."""
        config = replace(config, delete_retention_ms=self.compaction.delete_retention_ms(config))
        values = {}
        for setting in TOPIC_SETTINGS:
            value = getattr(config, setting.name)
            if value is None and setting.unlimited:
                value = m.RETENTION_UNLIMITED
            values[setting.name] = value
        return m.TopicSettings(**values)

    async def create_topic(self, name: str, config: TopicConfig) -> None:
        """The one way a topic comes to be, for CREATE_TOPIC and for a dead-letter topic
        made on first use: the store's topic and logs, then what the broker keeps beside
        them (long-poll watchers, the group coordinator). TopicExistsError when taken."""
        await asyncio.to_thread(self.store.create_topic, name, config)
        for partition in range(config.partitions):
            self._watch(self.store.log(name, partition))
        self.coordinator.on_topic_created(name)

    async def append_durable(
        self, partition_log: Log, records: bytes | memoryview, timeout_s: float, *, sync_now: bool = False
    ) -> AppendResult:
        """The one "append, then wait until durable" path (produce with acks durable,
        queue dead-lettering): append on the loop, then wait_durable."""
        result = partition_log.append_nowait(records)
        await self.wait_durable(partition_log, result, timeout_s, sync_now=sync_now)
        return result

    async def wait_durable(
        self, partition_log: Log, result: AppendResult, timeout_s: float, *, sync_now: bool = False
    ) -> None:
        """Wait for the fsync that covers `result` (the log's group commit). Under
        policy never the log is flushed for it; under interval the wait is for the next
        interval's fsync (docs/guarantees.md), unless `sync_now` (a dead-letter copy,
        whose source is acked only once it is durable, does not wait out the interval).
        DurableWaitTimeoutError (NOT_DURABLE) when the fsync does not come within
        `timeout_s`: written, but the caller must not call it durable."""
        policy = partition_log.config.fsync_policy
        try:
            if policy is FsyncPolicy.NEVER or (sync_now and policy is not FsyncPolicy.ALWAYS):
                await asyncio.wait_for(asyncio.to_thread(partition_log.flush), timeout_s)
            loop = self._loop
            assert loop is not None  # attached before serving
            waiters = self._waiters.get(id(partition_log))
            if waiters is None:  # not watched (its topic is being deleted): the log's own future
                future = asyncio.wrap_future(partition_log.durable_future(result.last_offset))
            else:
                future = waiters.add_durable(loop, result.last_offset)
            if not future.done():
                expiry = loop.call_later(timeout_s, _expire_durable_wait, future)
                try:
                    await future
                finally:
                    expiry.cancel()
            future.result()
        except TimeoutError:
            raise DurableWaitTimeoutError(
                f"written at offsets {result.first_offset}..{result.last_offset} but not fsynced within "
                f"{timeout_s * 1000:.0f} ms"
            ) from None

    async def _create_topic(self, request: m.CreateTopicRequest) -> Reply:
        config = self._topic_config(request.settings)
        await self.create_topic(request.name, config)
        return Reply(m.CreateTopicResponse(request_id=request.request_id, settings=self._settings(config)))

    async def _create_topic_v1(self, request: m.CreateTopicRequestV1) -> Reply:
        """CreateTopic version 1 (protocol versions 1-4): the settings it has no field
        for take the server's defaults, and the answer leaves them out."""
        settings = m.topic_settings_from_v1(request.settings)
        reply = await self._create_topic(
            m.CreateTopicRequest(request_id=request.request_id, name=request.name, settings=settings)
        )
        created = response_of(reply, m.CreateTopicResponse)
        return Reply(
            m.CreateTopicResponseV1(request_id=request.request_id, settings=m.topic_settings_to_v1(created.settings))
        )

    async def _delete_topic(self, request: m.DeleteTopicRequest) -> Reply:
        config = self.store.topic_config(request.name)
        if config is None:
            raise UnknownTopicError(f"topic {request.name!r} does not exist")
        logs = [partition_log for name, _, partition_log in self.store.logs() if name == request.name]
        # All or nothing: a failed deletion (DISK_FULL) leaves the topic serving, watched.
        await asyncio.to_thread(self.store.delete_topic, request.name)
        for partition_log in logs:
            self._unwatch(partition_log)
        self.coordinator.on_topic_deleted(request.name)
        self.dedup.drop(request.name)
        self._dedup_unread.pop(request.name, None)
        self.queues.on_topic_deleted(request.name)
        return Reply(m.DeleteTopicResponse(request_id=request.request_id))

    async def _list_topics(self, request: m.ListTopicsRequest) -> Reply:
        topics = [
            m.TopicSummary(name=name, partitions=config.partitions)
            for name, config in sorted(self.store.topics().items())
        ]
        return Reply(m.ListTopicsResponse(request_id=request.request_id, topics=topics))

    async def _describe_topic(self, request: m.DescribeTopicRequest) -> Reply:
        config = self.store.topic_config(request.name)
        if config is None:
            raise UnknownTopicError(f"topic {request.name!r} does not exist")
        # Partitions not open (after a start, until first used) report their checkpoints
        # (sizes -1): read once each, in a thread (a topic of thousands of partitions
        # reads as many files), then kept by the store.
        if not self.store.summaries_read(request.name):
            partitions = await asyncio.to_thread(self._partition_states, request.name, config.partitions)
        else:
            partitions = self._partition_states(request.name, config.partitions)
        return Reply(
            m.DescribeTopicResponse(
                request_id=request.request_id, name=request.name, settings=self._settings(config), partitions=partitions
            )
        )

    async def _describe_topic_v1(self, request: m.DescribeTopicRequestV1) -> Reply:
        """DescribeTopic version 1: without the settings version 1 has no field for."""
        reply = await self._describe_topic(m.DescribeTopicRequest(request_id=request.request_id, name=request.name))
        described = response_of(reply, m.DescribeTopicResponse)
        return Reply(
            m.DescribeTopicResponseV1(
                request_id=request.request_id,
                name=described.name,
                settings=m.topic_settings_to_v1(described.settings),
                partitions=described.partitions,
            )
        )

    def _partition_states(self, topic: str, count: int) -> list[m.PartitionState]:
        states = []
        for number in range(count):
            summary = self.store.partition_summary(topic, number)
            states.append(
                m.PartitionState(
                    partition=number,
                    log_start_offset=summary.log_start_offset,
                    log_end_offset=summary.log_end_offset,
                    high_watermark=summary.high_watermark,
                    size_bytes=-1 if summary.byte_count is None else summary.byte_count,
                    segments=-1 if summary.segment_count is None else summary.segment_count,
                )
            )
        return states

    def _log(self, topic: str, partition: int) -> Log:
        return self._config_and_log(topic, partition)[1]

    def _config_and_log(self, topic: str, partition: int) -> tuple[TopicConfig, Log]:
        config = self.store.topic_config(topic)
        if config is None:
            raise UnknownTopicError(f"topic {topic!r} does not exist")
        if not 0 <= partition < config.partitions:
            raise ProtocolError(ErrorCode.UNKNOWN_PARTITION, f"topic {topic!r} has no partition {partition}")
        return config, self.store.log(topic, partition)

    # -- delete records ----------------------------------------------------------------------

    async def delete_records(
        self, topic: str, offsets: list[tuple[int, int]], timeout_s: float
    ) -> list[m.PartitionRecordDeletion]:
        """Move each (partition, offset)'s log start forward (Log.delete_records, I21),
        in a thread (it may fsync and remove files), all within `timeout_s`. Errors are
        per partition, in request order; an unknown topic raises. Shared by nodi's
        DELETE_RECORDS and the Kafka listener's DeleteRecords."""
        config = self.store.topic_config(topic)
        if config is None:
            raise UnknownTopicError(f"topic {topic!r} does not exist")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        results = []
        for partition, offset in offsets:
            try:
                partition_log = self._log(topic, partition)
                if offset < m.NO_OFFSET:
                    raise OffsetOutOfRangeError(
                        offset,
                        partition_log.log_start_offset,
                        partition_log.next_offset,
                        f"cannot delete records below offset {offset}: it is out of range (-1: the high watermark)",
                    )
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    raise ProtocolError(ErrorCode.TIMEOUT, "the request's timeout passed before this partition")
                try:
                    result = await asyncio.wait_for(
                        asyncio.to_thread(partition_log.delete_records, offset), remaining_s
                    )
                except TimeoutError:
                    raise ProtocolError(
                        ErrorCode.TIMEOUT, f"{topic}-{partition}: not done in time (it may still finish)"
                    ) from None
            except Exception as error:  # each partition answers for itself
                message = error.message if isinstance(error, ProtocolError) else str(error)
                results.append(
                    m.PartitionRecordDeletion(
                        partition=partition, error_code=error_code_for(error), error_message=message
                    )
                )
                continue
            if result.deleted_segments:
                log.info(
                    "%s-%d: records below %d deleted (%d segments removed)",
                    topic,
                    partition,
                    result.log_start_offset,
                    len(result.deleted_segments),
                )
            results.append(m.PartitionRecordDeletion(partition=partition, log_start_offset=result.log_start_offset))
        return results

    async def _delete_records(self, request: m.DeleteRecordsRequest) -> Reply:
        partitions = [deletion.partition for deletion in request.partitions]
        if len(set(partitions)) != len(partitions):
            raise ProtocolError(ErrorCode.INVALID_REQUEST, "a partition appears more than once")
        results = await self.delete_records(
            request.topic,
            [(deletion.partition, deletion.offset) for deletion in request.partitions],
            max(request.timeout_ms, 1) / 1000,
        )
        return Reply(m.DeleteRecordsResponse(request_id=request.request_id, partitions=results))

    # -- produce and fetch ------------------------------------------------------------------

    async def _produce(self, request: m.ProduceRequest) -> Reply:
        config, partition_log = self._config_and_log(request.topic, request.partition)
        self.compaction.check_produce(request.topic, partition_log, request.records)
        # The log's check first: publish dedup (broker/server/dedup.py) does not search a
        # request whose records carry no header. Check, append and record run without an await.
        checked = partition_log.check_append(request.records)
        check = self.dedup.check(request.topic, config.dedup_window_ms, request.records, checked)
        if check is not None:
            self._check_dedup_read_back(request.topic)
        if check is not None and check.duplicates:
            return await self._produce_duplicates(request, check)
        result = partition_log.append_checked_nowait(checked)
        if check is not None:  # recorded before any await: the next produce sees the keys
            self.dedup.record(request.topic, request.partition, result.first_offset, check)
        if request.acks is m.Acks.DURABLE:
            await self.wait_durable(partition_log, result, max(request.timeout_ms, 1) / 1000)
        if request.acks is m.Acks.NONE:
            return Reply(m.ProduceResponse(request_id=request.request_id))
        return self._produce_reply(request, partition_log, result)

    def produce_durable_nowait(
        self, request: m.ProduceRequest, deliver: Callable[[DurableAnswer, Reply], None]
    ) -> Reply | DurableAnswer | Awaitable[Reply] | None:
        """A produce with acks durable served without a task (server.py): _produce up
        to its wait, then answered by the fsync that covers it (durable_answer.py),
        which calls `deliver` with the reply. Returns the DurableAnswer (done already if
        that fsync had ended); a Reply when answered at once (an error, some records
        duplicates); the answer to await when every record is a duplicate (it waits for
        the originals' fsyncs); or None, nothing done, when the produce needs _produce
        itself: fsync never (its flush runs in a thread), a partition not watched."""
        assert request.acks is m.Acks.DURABLE
        try:
            config, partition_log = self._config_and_log(request.topic, request.partition)
            waiters = self._waiters.get(id(partition_log))
            if waiters is None or partition_log.config.fsync_policy is FsyncPolicy.NEVER:
                return None
            self.compaction.check_produce(request.topic, partition_log, request.records)
            # The log's check, then publish dedup, as in _produce: check, append and record
            # without an await.
            checked = partition_log.check_append(request.records)
            check = self.dedup.check(request.topic, config.dedup_window_ms, request.records, checked)
            if check is not None:
                self._check_dedup_read_back(request.topic)
                if check.duplicates:
                    return self.answer(request, self._produce_duplicates(request, check))
            result = self._append_durable_nowait(partition_log, checked)
            if check is not None:
                self.dedup.record(request.topic, request.partition, result.first_offset, check)
        except Exception as error:  # as handle() answers them
            if error_code_for(error) is ErrorCode.INTERNAL:
                log.exception("internal error serving %s", type(request).__name__)
            return error_reply(request, error)
        answer = DurableAnswer(
            request,
            functools.partial(self._produce_reply, request, partition_log, result),
            deliver,
            result.first_offset,
            result.last_offset,
        )
        waiters.add_durable_waiter(answer, result.last_offset)
        assert self._loop is not None  # attached before serving
        answer.expire_after(self._loop, max(request.timeout_ms, 1) / 1000)
        return answer

    def _append_durable_nowait(self, partition_log: Log, checked: CheckedAppend) -> AppendResult:
        """A durable produce's append, its fsync offered to the loop (Log.append_checked_nowait's
        `fsync_here_max_s`) unless a produce found company within FSYNC_ON_LOOP_QUIET_S."""
        offer = self._fsync_on_loop_max_s
        if offer is None or partition_log.config.fsync_policy is not FsyncPolicy.ALWAYS:
            return partition_log.append_checked_nowait(checked)
        assert self._loop is not None  # attached before serving
        now = self._loop.time()
        result = partition_log.append_checked_nowait(
            checked, fsync_here_max_s=offer if now >= self._fsync_on_loop_after else None
        )
        if result.fsync_left_to_caller:
            self._fsync_on_loop_soon(partition_log, now)
        elif not result.duplicate:
            self._fsync_on_loop_after = now + FSYNC_ON_LOOP_QUIET_S
        return result

    def _fsync_on_loop_soon(self, partition_log: Log, now: float) -> None:
        """A lone durable produce's append left its fsync job to the loop: run it at
        the end of this turn (_run_fsync_on_loop), so the produces read in the same turn
        share it. A second partition's in the same turn means concurrency: both go to
        the pool, where their fsyncs overlap."""
        other = self._fsync_on_loop
        if other is None:
            self._fsync_on_loop = partition_log
            assert self._loop is not None  # attached before serving
            self._loop.call_soon(self._run_fsync_on_loop)
        else:
            partition_log.hand_fsync_job_to_pool()
            self._fsync_on_loop_after = now + FSYNC_ON_LOOP_QUIET_S

    def _run_fsync_on_loop(self) -> None:
        """The log's fsync job here, on the loop, while the pool is still idle (else the
        pool runs it: Log.run_fsync_job_here), then its waiters settled at once: the
        acknowledgements go out in this turn."""
        partition_log, self._fsync_on_loop = self._fsync_on_loop, None
        assert partition_log is not None
        partition_log.run_fsync_job_here()
        waiters = self._waiters.get(id(partition_log))
        if waiters is not None:
            waiters.wake()

    def _produce_reply(self, request: m.ProduceRequest, partition_log: Log, result: AppendResult) -> Reply:
        return Reply(
            m.ProduceResponse(
                request_id=request.request_id,
                base_offset=result.first_offset,
                last_offset=result.last_offset,
                log_append_time_ms=result.log_append_time_ms,
                log_start_offset=partition_log.log_start_offset,
            )
        )

    async def _produce_duplicates(self, request: m.ProduceRequest, check) -> Reply:
        """Nothing of the request is written. Every record a duplicate: a success naming
        the originals (with acks durable, once they are durable). Some new:
        PARTLY_DUPLICATE naming the duplicates; the sender sends the others again."""
        self.dedup.note_duplicates(check)
        duplicates = [
            m.DuplicateRecord(index=index, partition=original.partition, offset=original.offset)
            for index, original in check.duplicates
        ]
        if len(duplicates) < check.record_count:
            return Reply(
                m.ProduceResponse(
                    request_id=request.request_id,
                    error_code=ErrorCode.PARTLY_DUPLICATE,
                    error_message=f"{len(duplicates)} of {check.record_count} records were written before: nothing "
                    "was written; send the others again",
                    duplicates=duplicates,
                )
            )
        if request.acks is m.Acks.DURABLE:
            last: dict[int, int] = {}
            for _, original in check.duplicates:
                last[original.partition] = max(last.get(original.partition, -1), original.offset)
            timeout_s = max(request.timeout_ms, 1) / 1000
            for partition, offset in last.items():
                original_log = self._log(request.topic, partition)
                if original_log.config.fsync_policy is FsyncPolicy.NEVER:
                    await asyncio.wait_for(asyncio.to_thread(original_log.flush), timeout_s)
                try:
                    await asyncio.wait_for(asyncio.wrap_future(original_log.durable_future(offset)), timeout_s)
                except TimeoutError:
                    raise ProtocolError(
                        ErrorCode.NOT_DURABLE,
                        f"the original at {partition}/{offset} was not fsynced within {request.timeout_ms} ms",
                    ) from None
        return Reply(m.ProduceResponse(request_id=request.request_id, duplicates=duplicates))

    async def _fetch(self, request: m.FetchRequest) -> Reply:
        partition_log, result = await self._fetch_read(request, request.wait_ms)
        return self._fetch_reply(request, partition_log, result)

    async def _fetch_commit(self, request: m.FetchCommitRequest) -> Reply:
        """Fetch version 2: the commits first (CommitOffsets' rules), then the fetch;
        answered once the commits are durable. With commit_wait the fetch does not wait
        for records: the commits' durability is what the caller waits for."""
        commit_error: BaseException | None = None
        commit_results: list[m.PartitionError] = []
        flushed: _MetadataFlush | None = None
        try:
            if not request.commits:
                raise ProtocolError(ErrorCode.INVALID_REQUEST, "a fetch with commits needs at least one")
            committed = self.coordinator.commit(
                request.group,
                request.generation,
                request.member_id,
                [(o.topic, o.partition, o.offset, o.metadata) for o in request.commits],
            )
            commit_results = [
                m.PartitionError(topic=r.topic, partition=r.partition, error_code=r.error_code)
                for r in committed.results
            ]
            if committed.staged:
                flushed = self._flush_waiter()
                if request.commit_wait:
                    waiter, flushed = flushed, None
                    await self._wait_flushed(waiter)
        except Exception as error:  # the commits' own error; the fetch is still served
            commit_error = error
        fetch_error: BaseException | None = None
        partition_log = result = None
        try:
            partition_log, result = await self._fetch_read(request, 0 if request.commit_wait else request.wait_ms)
        except Exception as error:
            fetch_error = error
        if flushed is not None:
            try:
                await self._wait_flushed(flushed)
            except Exception as error:
                commit_error = error
        response = m.FetchCommitResponse(
            request_id=request.request_id,
            commit_results=commit_results,
            **self._error_fields(commit_error, "commit_"),
            **self._error_fields(fetch_error, ""),
        )
        if fetch_error is not None or result is None:
            return Reply(response)
        return Reply(
            replace(response, high_watermark=result.end_offset, log_start_offset=result.log_start_offset),
            result.slices,
        )

    @staticmethod
    def _error_fields(error: BaseException | None, prefix: str) -> dict:
        if error is None:
            return {}
        if error_code_for(error) is ErrorCode.INTERNAL:
            log.error("internal error serving a fetch with commits", exc_info=error)
        message = error.message if isinstance(error, ProtocolError) else str(error)
        return {f"{prefix}error_code": error_code_for(error), f"{prefix}error_message": message}

    async def _fetch_read(self, request: m.FetchRequest, wait_ms: int):
        """The log and what a fetch reads, waiting up to `wait_ms` for min_bytes."""
        # The loop asked for once: in Python 3.11 each asyncio.get_running_loop() is a
        # getpid system call, and a fetch waiting at the tail asked five or six times.
        loop = asyncio.get_running_loop()
        partition_log = self._log(request.topic, request.partition)
        budget = min(max(request.bytes_max, 1), self.config.protocol.frame_bytes_max - FETCH_OVERHEAD_BYTES)
        wait_s = min(max(wait_ms, 0), self.config.fetch_wait_max_ms) / 1000
        deadline = loop.time() + wait_s
        waiters = self._waiters.get(id(partition_log))
        futures = set() if waiters is None else waiters.futures  # an unwatched log never wakes one
        while True:
            future = None
            if waiters is not None and wait_s > 0:
                future = loop.create_future()
                futures.add(future)  # before the read: no wakeup can be missed
            result = partition_log.read(request.offset, budget)
            remaining = deadline - loop.time()
            if result.byte_count >= max(request.min_bytes, 1) or remaining <= 0 or future is None:
                if future is not None:
                    futures.discard(future)
                    future.cancel()
                return partition_log, result
            # The wait's end is a timer that answers the future as a wake-up would (not
            # asyncio.wait_for, which asks for the loop again and wraps the future in a
            # second one with its own callbacks); the read that follows tells them apart.
            timer = loop.call_later(remaining, _answer_unless_done, future)
            try:
                await future
            finally:
                timer.cancel()
                futures.discard(future)
            if id(partition_log) not in self._waiters:  # topic deleted while waiting
                raise UnknownTopicError(f"topic {request.topic!r} was deleted")

    def _fetch_reply(self, request: m.FetchRequest, partition_log: Log, result) -> Reply:
        response = m.FetchResponse(
            request_id=request.request_id,
            high_watermark=result.end_offset,
            log_start_offset=result.log_start_offset,
        )
        return Reply(response, result.slices)

    async def _list_offsets(self, request: m.ListOffsetsRequest) -> Reply:
        partition_log = self._log(request.topic, request.partition)
        end = partition_log.readable_end_offset
        timestamp = m.NO_OFFSET
        if request.spec is m.OffsetSpec.EARLIEST:
            offset = partition_log.log_start_offset
        elif request.spec is m.OffsetSpec.LATEST:
            offset = end
        else:
            found = await asyncio.to_thread(partition_log.offset_for_timestamp, request.timestamp_ms)
            offset = end if found is None else found
            timestamp = request.timestamp_ms if found is not None else m.NO_OFFSET
        return Reply(m.ListOffsetsResponse(request_id=request.request_id, offset=offset, timestamp_ms=timestamp))

    async def _init_producer_id(self, request: m.InitProducerIdRequest) -> Reply:
        """Ids are unique without persistence: the server's start time in ms, shifted,
        plus a counter. A known id asks for the next epoch, fencing older ones."""
        if request.producer_id >= 0:
            epoch = request.producer_epoch + 1
            if epoch > 32767:
                raise ProtocolError(ErrorCode.INVALID_PRODUCER_EPOCH, "epoch exhausted; ask for a new producer id")
            return Reply(
                m.InitProducerIdResponse(
                    request_id=request.request_id, producer_id=request.producer_id, producer_epoch=epoch
                )
            )
        counter = next(self._producer_ids)
        if counter >= 1 << 20:
            self._producer_id_base = max(self._producer_id_base + (1 << 20), int(time.time() * 1000) << 20)
            self._producer_ids = itertools.count(1)
            counter = 0
        return Reply(
            m.InitProducerIdResponse(
                request_id=request.request_id, producer_id=self._producer_id_base + counter, producer_epoch=0
            )
        )

    # -- offsets a group has committed or could commit ---------------------------------------

    def resolve_offset(self, topic: str, partition: int, spec: m.ResetSpec, offset: int, timestamp_ms: int) -> int:
        partition_log = self._log(topic, partition)
        if spec is m.ResetSpec.EARLIEST:
            return partition_log.log_start_offset
        if spec is m.ResetSpec.LATEST:
            return partition_log.readable_end_offset
        if spec is m.ResetSpec.OFFSET:
            if not partition_log.log_start_offset <= offset <= partition_log.next_offset:
                raise OffsetOutOfRangeError(offset, partition_log.log_start_offset, partition_log.next_offset)
            return offset
        found = partition_log.offset_for_timestamp(timestamp_ms)
        return partition_log.readable_end_offset if found is None else found

    # -- stream-mode consumer groups (broker/server/groups.py) ------------------------------------------

    @staticmethod
    def _assignments(assignments: dict[str, list[int]]) -> list[m.TopicPartitions]:
        return [
            m.TopicPartitions(topic=topic, partitions=list(partitions))
            for topic, partitions in sorted(assignments.items())
        ]

    async def _join_group(self, request: m.JoinGroupRequest, client_id: str) -> Reply:
        result = self.coordinator.join(
            request.group, request.member_id, client_id, request.topics, request.session_timeout_ms
        )
        return Reply(
            m.JoinGroupResponse(
                request_id=request.request_id,
                generation=result.generation,
                member_id=result.member_id,
                heartbeat_interval_ms=result.heartbeat_interval_ms,
                assignments=self._assignments(result.assignments),
            )
        )

    async def _leave_group(self, request: m.LeaveGroupRequest) -> Reply:
        self.coordinator.leave(request.group, request.member_id)
        return Reply(m.LeaveGroupResponse(request_id=request.request_id))

    async def _heartbeat(self, request: m.HeartbeatRequest) -> Reply:
        result = self.coordinator.heartbeat(request.group, request.member_id, request.generation)
        return Reply(
            m.HeartbeatResponse(
                request_id=request.request_id,
                error_code=result.error_code,
                error_message="the group rebalanced: adopt the new assignment" if result.error_code else None,
                generation=result.generation,
                assignments=self._assignments(result.assignments),
            )
        )

    def _wake_group_waiters(self, group: str) -> None:
        for future in self._group_waiters.pop(group, ()):
            if not future.done():
                future.set_result(None)

    async def _group_wait(self, request: m.GroupWaitRequest) -> Reply:
        """A heartbeat held until the member's generation moves on, or wait_ms passes
        (at most half the member's session timeout, so the hold never expires it); it
        counts as a heartbeat when it arrives and when it is answered."""
        loop = asyncio.get_running_loop()
        result = self.coordinator.heartbeat(
            request.group, request.member_id, request.generation, max(request.messages_redelivered, 0)
        )
        session_timeout_ms = self.coordinator.session_timeout_ms(request.group, request.member_id)
        wait_s = min(max(request.wait_ms, 0), session_timeout_ms // 2) / 1000
        deadline = loop.time() + wait_s
        while result.error_code == ErrorCode.NONE and (remaining := deadline - loop.time()) > 0:
            future = loop.create_future()
            self._group_waiters.setdefault(request.group, set()).add(future)
            try:
                await asyncio.wait_for(future, remaining)
            except TimeoutError:
                pass
            finally:
                waiters = self._group_waiters.get(request.group)
                if waiters is not None:
                    waiters.discard(future)
                    if not waiters:
                        del self._group_waiters[request.group]
            result = self.coordinator.heartbeat(request.group, request.member_id, request.generation)
        return Reply(
            m.GroupWaitResponse(
                request_id=request.request_id,
                error_code=result.error_code,
                error_message="the group rebalanced: adopt the new assignment" if result.error_code else None,
                generation=result.generation,
                assignments=self._assignments(result.assignments),
            )
        )

    async def _describe_handovers(self, request: m.DescribeHandoversRequest) -> Reply:
        handovers = self.coordinator.describe(request.group).handovers
        return Reply(
            m.DescribeHandoversResponse(
                request_id=request.request_id,
                rebalances=handovers.rebalances,
                partitions_moved=handovers.partitions_moved,
                handovers=handovers.handovers,
                handovers_forced=handovers.handovers_forced,
                handover_ms_total=handovers.handover_ms_total,
                handover_ms_max=handovers.handover_ms_max,
                partitions_revoking=handovers.partitions_revoking,
                messages_redelivered=handovers.messages_redelivered,
            )
        )

    async def _commit_offsets(self, request: m.CommitOffsetsRequest) -> Reply:
        result = self.coordinator.commit(
            request.group,
            request.generation,
            request.member_id,
            [(o.topic, o.partition, o.offset, o.metadata) for o in request.offsets],
        )
        if result.staged:
            await self.flush_metadata()
        return Reply(
            m.CommitOffsetsResponse(
                request_id=request.request_id,
                results=[
                    m.PartitionError(topic=r.topic, partition=r.partition, error_code=r.error_code)
                    for r in result.results
                ],
            )
        )

    async def _fetch_offsets(self, request: m.FetchOffsetsRequest) -> Reply:
        offsets = self.coordinator.fetch_offsets(request.group, request.topics or None)
        for topic, partition in offsets:
            if self.store.recovering(topic, partition):  # its offset may yet be clamped to the log (I6)
                raise PartitionNotReadyError(f"partition {topic}-{partition} is being recovered: retry in a moment")
        return Reply(
            m.FetchOffsetsResponse(
                request_id=request.request_id,
                offsets=[
                    m.GroupOffset(
                        topic=topic,
                        partition=partition,
                        offset=entry.offset,
                        metadata=entry.metadata,
                        commit_time_ms=entry.commit_time_ms,
                    )
                    for (topic, partition), entry in offsets.items()
                ],
            )
        )

    async def _reset_group(self, request: m.ResetGroupRequest) -> Reply:
        value = request.timestamp_ms if request.spec is m.ResetSpec.TIMESTAMP else request.offset

        def resolve(topic: str, partition: int, spec: m.ResetSpec, value: int) -> int:
            return self.resolve_offset(topic, partition, spec, value, value)

        result = self.coordinator.reset(request.group, request.topic, request.spec, request.partitions, resolve, value)
        if result.staged:
            await self.flush_metadata()
        return Reply(
            m.ResetGroupResponse(
                request_id=request.request_id,
                offsets=[m.PartitionOffset(partition=p, offset=o) for p, o in sorted(result.offsets.items())],
            )
        )

    async def _list_groups(self, request: m.ListGroupsRequest) -> Reply:
        return Reply(
            m.ListGroupsResponse(
                request_id=request.request_id,
                groups=[
                    m.GroupSummary(group=g.group, state=g.state, members=g.members)
                    for g in self.coordinator.list_groups()
                ],
            )
        )

    async def _describe_group(self, request: m.DescribeGroupRequest) -> Reply:
        description = self.coordinator.describe(request.group)
        lags = []
        for (topic, partition), committed in description.offsets.items():
            try:
                high_watermark = self.store.partition_summary(topic, partition).high_watermark
            except UnknownTopicError:
                continue
            lags.append(
                m.GroupLag(
                    topic=topic,
                    partition=partition,
                    committed_offset=m.NO_OFFSET if committed is None else committed.offset,
                    high_watermark=high_watermark,
                )
            )
        return Reply(
            m.DescribeGroupResponse(
                request_id=request.request_id,
                group=description.group,
                state=description.state,
                generation=description.generation,
                members=[
                    m.GroupMember(
                        member_id=member.member_id,
                        client_id=member.client_id,
                        session_timeout_ms=member.session_timeout_ms,
                        assignments=self._assignments(member.assignments),
                    )
                    for member in description.members
                ],
                lags=lags,
            )
        )

    # request type -> its handler, called with the Broker and a request of that type (and
    # the client id, for JoinGroup only: handle() calls that one itself)
    _handlers: ClassVar[dict[type, Callable[..., Awaitable[Reply]]]] = {
        m.CreateTopicRequest: _create_topic,
        m.CreateTopicRequestV1: _create_topic_v1,
        m.DeleteTopicRequest: _delete_topic,
        m.DeleteRecordsRequest: _delete_records,
        m.ListTopicsRequest: _list_topics,
        m.DescribeTopicRequest: _describe_topic,
        m.DescribeTopicRequestV1: _describe_topic_v1,
        m.ProduceRequest: _produce,
        m.FetchRequest: _fetch,
        m.FetchCommitRequest: _fetch_commit,
        m.ListOffsetsRequest: _list_offsets,
        m.InitProducerIdRequest: _init_producer_id,
        m.JoinGroupRequest: _join_group,
        m.LeaveGroupRequest: _leave_group,
        m.HeartbeatRequest: _heartbeat,
        m.GroupWaitRequest: _group_wait,
        m.DescribeHandoversRequest: _describe_handovers,
        m.CommitOffsetsRequest: _commit_offsets,
        m.FetchOffsetsRequest: _fetch_offsets,
        m.ResetGroupRequest: _reset_group,
        m.ListGroupsRequest: _list_groups,
        m.DescribeGroupRequest: _describe_group,
        m.ServerStatusRequest: serve_server_status,
        m.QueueReceiveRequest: lambda self, request: self.queues.receive(request),
        m.QueueReceiveBatchesRequest: lambda self, request: self.queues.receive_batches(request),
        m.QueueSettleRequest: lambda self, request: self.queues.settle(request),
        m.QueueDescribeRequest: lambda self, request: self.queues.describe(request),
        m.QueueListRequest: lambda self, request: self.queues.list(request),
        m.QueueLeasesRequest: lambda self, request: self.queues.leases(request),
        m.InboxOpenRequest: lambda self, request: self.inboxes.open(request),
        m.InboxReceiveRequest: lambda self, request: self.inboxes.receive(request),
        m.InboxCloseRequest: lambda self, request: self.inboxes.close(request),
        m.ReplyRequest: lambda self, request: self.inboxes.reply(request),
        m.CompactTopicRequest: lambda self, request: self.compaction.compact_topic(request),
    }
