"""Consumers: `client.consumer(topics, group=None, ...)` on an AsyncClient (AsyncConsumer,
async-iterable) or a Client (Consumer, iterable).

    with client.consumer("orders", group="billing") as consumer:
        for message in consumer:          # or: consumer.poll(timeout_ms)
            handle(message)               # auto-commit every 5 s and at close

Three ways to read:

- No group: the given partitions (default: all) of the topics, from `start`.
- A group with `partitions` given: those partitions, no membership; each starts at the
  group's committed offset, else at `start`; commits go in as a consumer outside group
  membership (generation -1), which the server accepts while the group has no members.
- A group without `partitions`: a member of the group. JoinGroup gives a member id, the
  generation and this member's partitions; a heartbeat every heartbeat_interval_ms keeps
  the membership (session_timeout_ms without one and the server moves the partitions to
  the other members). With a server of protocol version 2 the heartbeat is a GroupWait
  the server holds and answers at once when the generation moves on.

  A rebalance is a two-step handover (docs/guarantees.md): partitions that move are first
  revoked from their owner, which, at its next poll() (so the batch the application was
  handling is done), stops reading them, calls on_revoked(partitions), commits everything
  the application has handled (with auto-commit) and acknowledges the new generation;
  only then does the server give them to their new owner, which starts at that commit
  and calls on_assigned(partitions). Partitions that stay are read on without a pause.
  An owner that does not let go within its session timeout loses them anyway, and what
  it handled after its last commit is read again by the new owner. Delivery stays
  at-least-once: a handover may repeat messages, never skip them.

`start`: "earliest", "latest", an offset, or a datetime (the first message at or after
it). Reading: one long-poll fetch (wait_ms, bytes_max) per assigned partition is kept in
flight; poll() returns what the first of them to answer (and any others done by then)
brought, and starts the next fetches. commit() stores, per partition, the offset after
the last message poll() returned: the next to read. Auto-commit (every
auto_commit_interval_ms inside poll(), and before adopting a rebalance) stores less:
what the polls before the current one returned, i.e. what the application has handled,
so a member that dies while handling a batch leaves it to be read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

from ..protocol import messages as m
from ..protocol.errors import ErrorCode
from .connection import check_response
from .errors import (
    ClientClosed,
    ConnectionLost,
    IllegalGeneration,
    NodiClientError,
    OffsetOutOfRange,
    ProtocolViolation,
    Timeout,
    UnknownMember,
    error_for,
)
from .types import Message, StartSpec, backoff_s, check_start

log = logging.getLogger("nodi.client")

DEFAULT_WAIT_MS = 500
DEFAULT_BYTES_MAX = 1 << 20
DEFAULT_SESSION_TIMEOUT_MS = 10_000
# A partition's fetch that failed (connection lost, timeout) is retried after a delay
# that doubles per failure in a row, from this to the max, with jitter.
FETCH_RETRY_BACKOFF_MS = 100
FETCH_RETRY_BACKOFF_MAX_MS = 5_000

TopicPartition = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ConsumerStatistics:
    messages_delivered: int  # returned by poll() (and iteration)
    expired_skipped: int  # fetched but past their TTL, left out (include_expired=False)
    # Fetched batches left out because their records do not decode (each logged).
    undecodable_batches_skipped: int = 0
    partitions_revoked: int = 0  # let go to other members in handovers
    messages_redelivered: int = 0  # delivered from those past what was committed for them


class AsyncConsumer:
    """See the module docstring. Options: start ("earliest"), auto_commit (True),
    auto_commit_interval_ms (5000), partitions (None: all, or assigned by the group;
    ints apply to every topic, or (topic, partition) pairs), wait_ms (500: each fetch's
    long poll), bytes_max (1 MiB per fetch), session_timeout_ms (10 s), idle_timeout_ms
    (None: iteration stops after this long without a message), include_expired (False:
    messages whose TTL has passed are skipped and counted in statistics()), timeout_ms
    (per request; the client's by default), on_revoked / on_assigned (None: a function
    or coroutine function called with the list of (topic, partition) pairs a handover
    takes away, before the commit, or gives, once they are read from; errors are logged)."""

    def __init__(
        self,
        client,
        topics: str | Iterable[str],
        group: str | None = None,
        *,
        start: StartSpec = "earliest",
        auto_commit: bool = True,
        auto_commit_interval_ms: int = 5_000,
        partitions: Iterable[int] | Iterable[TopicPartition] | None = None,
        wait_ms: int = DEFAULT_WAIT_MS,
        bytes_max: int = DEFAULT_BYTES_MAX,
        session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
        idle_timeout_ms: int | None = None,
        include_expired: bool = False,
        timeout_ms: int | None = None,
        on_revoked=None,
        on_assigned=None,
    ) -> None:
        self.topics = [topics] if isinstance(topics, str) else list(dict.fromkeys(topics))
        if not self.topics:
            raise ValueError("a consumer needs at least one topic")
        self.group = group
        self.start_spec = check_start(start)
        self.auto_commit = auto_commit and group is not None
        self.auto_commit_interval_s = auto_commit_interval_ms / 1000
        self.wait_ms = wait_ms
        self.bytes_max = bytes_max
        self.session_timeout_ms = session_timeout_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.include_expired = include_expired
        self._delivered = 0
        self._expired_skipped = 0
        self._undecodable_skipped = 0
        self.on_revoked = on_revoked
        self.on_assigned = on_assigned
        self._partitions_revoked = 0
        self._messages_redelivered = 0
        # A new generation and assignment the heartbeat learned of, adopted by poll().
        self._pending: tuple[int, list[TopicPartition]] | None = None
        self._adopted = asyncio.Event()  # poll() adopted: the heartbeat acknowledges at once
        self._redelivered_unreported = 0
        self._group_wait = True  # False once the server refused GroupWait (protocol 1)
        self._heartbeat_ok_at = time.monotonic()  # the last answered join or heartbeat
        self.timeout_ms = client.timeout_ms if timeout_ms is None else timeout_ms
        self._client = client
        self._manual: list[TopicPartition] | None = None
        if partitions is not None:
            self._manual = []
            for entry in partitions:
                if isinstance(entry, tuple):
                    self._manual.append((entry[0], int(entry[1])))
                else:
                    self._manual.extend((topic, int(entry)) for topic in self.topics)
        self._member = group is not None and self._manual is None
        self.member_id = ""
        self.generation = -1
        self._heartbeat_interval_s = session_timeout_ms / 3000
        self._assignment: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}  # next offset to deliver
        # The positions when poll() was last called: what the application has handled
        # (every earlier batch). Auto-commits (in poll() and before a rebalance) commit
        # these, never a batch poll() just returned: at-least-once.
        self._handled: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._fetches: dict[TopicPartition, asyncio.Task] = {}
        # Fetched messages poll() has not returned yet (a max_records limit left them),
        # per partition, with the position after the fetch that brought them. At most one
        # fetch response per partition: a partition with some is not fetched again.
        self._ready: dict[TopicPartition, tuple[list[Message], int]] = {}
        self._fetch_failures: dict[TopicPartition, int] = {}  # failed fetches in a row
        # Commits riding on fetches (Fetch version 2, protocol version 4): partitions
        # whose fetch task is made but has not sent yet (a commit can still ride on it);
        # a waiting commit()'s ride, per partition whose next fetch carries it; and the
        # offsets of commit_nowait() and auto-commit for whichever fetch goes out next.
        self._ride_commits = True  # False once the server refused Fetch version 2
        self._unsent: set[TopicPartition] = set()
        self._ride_for: dict[TopicPartition, _Ride] = {}
        self._ride_next: dict[TopicPartition, int] = {}
        self._changed: asyncio.Future | None = None  # resolved when the assignment changes
        self._heartbeat_task: asyncio.Task | None = None
        self._background_error: BaseException | None = None
        self._next_commit = 0.0
        self._started = False
        self._closed = False
        client.core.own(self)

    def __repr__(self) -> str:
        return f"<AsyncConsumer topics={self.topics} group={self.group!r} assignment={self._assignment}>"

    # -- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> AsyncConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def start(self) -> None:
        """Join the group or resolve the partitions and their start offsets (poll() does
        it when not done yet)."""
        if self._closed:
            raise ClientClosed("the consumer is closed")
        if self._started:
            return
        self._started = True
        self._changed = asyncio.get_running_loop().create_future()
        self._next_commit = time.monotonic() + self.auto_commit_interval_s
        if self._member:
            await self._join()
            self._heartbeat_task = asyncio.get_running_loop().create_task(
                self._heartbeat_loop(), name=f"nodi-consumer-heartbeat-{self.group}"
            )
        else:
            wanted = self._manual
            if wanted is None:
                wanted = []
                for topic in self.topics:
                    count = await self._client.partition_count(topic, timeout_ms=self.timeout_ms)
                    wanted.extend((topic, partition) for partition in range(count))
            await self._assign(wanted)

    async def close(self) -> None:
        """Commit (with auto-commit), leave the group, stop fetching."""
        if self._closed:
            return
        self._closed = True
        try:
            self._cancel_fetches(list(self._fetches))
            if self._heartbeat_task is not None:
                self._heartbeat_task.cancel()
                with contextlib.suppress(BaseException):
                    await self._heartbeat_task
            if self._started and self.auto_commit and not self._client.closed:
                try:
                    await self.commit()
                except NodiClientError as error:
                    log.warning("consumer %s: commit at close failed: %s", self.group, error)
            elif self._ride_next and not self._client.closed:  # commit_nowait() offsets no fetch took
                try:
                    await self._commit(self._ride_next)
                except NodiClientError as error:
                    log.warning("consumer %s: commit at close failed: %s", self.group, error)
            self._ride_next.clear()
            if self._member and self.member_id and not self._client.closed:
                assert self.group is not None  # a member is in a group
                with contextlib.suppress(NodiClientError):
                    await self._client.core.call(
                        m.LeaveGroupRequest(group=self.group, member_id=self.member_id),
                        self.timeout_ms,
                        expect=m.LeaveGroupResponse,
                    )
        finally:
            tasks = list(self._fetches.values())
            self._fetches.clear()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            self._client.core.disown(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> ConsumerStatistics:
        return ConsumerStatistics(
            messages_delivered=self._delivered,
            expired_skipped=self._expired_skipped,
            undecodable_batches_skipped=self._undecodable_skipped,
            partitions_revoked=self._partitions_revoked,
            messages_redelivered=self._messages_redelivered,
        )

    def assignment(self) -> list[TopicPartition]:
        """The (topic, partition) pairs this consumer reads now."""
        return list(self._assignment)

    def position(self, topic: str, partition: int) -> int | None:
        """The next offset poll() will return from the partition."""
        return self._positions.get((topic, partition))

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Read the partition from `offset` on, starting with the next poll()."""
        key = (topic, partition)
        if key not in self._assignment:
            raise ValueError(f"{topic}-{partition} is not assigned to this consumer")
        self._cancel_fetches([key])
        self._positions[key] = offset

    # -- reading ------------------------------------------------------------------------

    async def poll(self, timeout_ms: int | None = None, max_records: int | None = None) -> list[Message]:
        """Messages from the assigned partitions, waiting up to `timeout_ms` (default
        wait_ms) for some; [] when none came. At most `max_records` (None: what the
        fetches brought); the rest are returned by the next polls, partitions taking
        turns, and commit() covers only what was returned. Auto-commits when it is due."""
        if self._closed:
            raise ClientClosed("the consumer is closed")
        if max_records is not None and (isinstance(max_records, bool) or max_records < 1):
            raise ValueError(f"max_records must be a positive int or None, not {max_records!r}")
        await self.start()
        self._handled = dict(self._positions)
        self._raise_background_error()
        if self._pending is not None:
            await self._adopt_pending()
        timeout_s = (self.wait_ms if timeout_ms is None else timeout_ms) / 1000
        if self._fenced():
            # No heartbeat got through for a session timeout: the server may have given
            # the partitions to others. Deliver nothing until one does.
            self._cancel_fetches([*self._fetches, *self._ready])  # and what was fetched
            assert self._changed is not None  # made when the member joined
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._changed), timeout_s)
            self._raise_background_error()
            return []
        if self._member and any(key not in self._positions for key in self._assignment):
            await self._assign(self._assignment)  # re-read partitions whose commit was refused
        deadline = time.monotonic() + timeout_s
        messages: list[Message] = []
        while True:
            self._start_fetches()
            waiting: list[asyncio.Future] = list(self._fetches.values())
            if self._changed is not None:
                waiting.append(self._changed)
            remaining = deadline - time.monotonic()
            done: set[asyncio.Future] = set()
            if remaining > 0 and not self._ready:
                done, _ = await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            self._collect()
            self._take(messages, max_records)
            self._raise_background_error()
            if messages or deadline <= time.monotonic():
                break
            if self._pending is not None:  # nothing delivered in this poll yet: adopt now
                await self._adopt_pending()
                continue
            if not done:
                break
        # Prefetch: the next fetch of each partition runs while the caller handles these
        # messages (at most one response of bytes_max per partition waits).
        if not self._closed:
            self._start_fetches()
        if self.auto_commit and time.monotonic() >= self._next_commit:
            self._next_commit = time.monotonic() + self.auto_commit_interval_s
            if self._ride_commits and self._unsent:  # rides on the fetch just started
                self._ride_next.update(self._uncommitted(self._handled_positions()))
            else:
                try:
                    await self._commit(self._handled_positions())
                except (ConnectionLost, Timeout, IllegalGeneration, UnknownMember) as error:
                    log.warning("consumer %s: auto-commit failed: %s", self.group, error)
        return messages

    def _start_fetches(self) -> None:
        loop = asyncio.get_running_loop()
        for key in self._assignment:
            if key not in self._fetches and key in self._positions and key not in self._ready:
                failures = self._fetch_failures.get(key, 0)
                delay_s = (
                    backoff_s(failures - 1, FETCH_RETRY_BACKOFF_MS, FETCH_RETRY_BACKOFF_MAX_MS) if failures else 0.0
                )
                self._fetches[key] = loop.create_task(self._fetch(key, self._positions[key], delay_s))
                if not delay_s:
                    self._unsent.add(key)
        if self._changed is None or self._changed.done():
            self._changed = loop.create_future()

    async def _fetch(self, key: TopicPartition, offset: int, delay_s: float = 0.0) -> tuple[list[Message], int, int]:
        """One fetch of a partition, after `delay_s` (the retry backoff), carrying the
        commits waiting to ride (a waiting commit()'s for this partition, and those of
        commit_nowait() and auto-commit)."""
        if delay_s:
            await asyncio.sleep(delay_s)
        self._unsent.discard(key)
        ride = self._ride_for.pop(key, None)
        fetched = None
        if self._ride_commits and (ride is not None or self._ride_next):
            fetched = await self._fetch_riding(key, offset, ride)
        elif ride is not None:
            ride.settle(None)  # the server cannot take it: commit() sends its own
        topic, partition = key
        try:
            if isinstance(fetched, BaseException):
                raise fetched
            if fetched is None:
                fetched = await self._client.fetch_counted(
                    topic,
                    partition,
                    offset,
                    bytes_max=self.bytes_max,
                    wait_ms=self.wait_ms,
                    include_expired=self.include_expired,
                    timeout_ms=self.timeout_ms,
                )
            messages, position, expired, undecodable = fetched
            self._expired_skipped += expired
            self._undecodable_skipped += undecodable
        except OffsetOutOfRange:
            earliest = await self._client.list_offsets(topic, partition, "earliest", timeout_ms=self.timeout_ms)
            if offset < earliest:
                position = earliest
            else:
                position = await self._client.list_offsets(topic, partition, "latest", timeout_ms=self.timeout_ms)
            log.warning(
                "consumer: offset %d of %s-%d is out of range; reading from %d", offset, topic, partition, position
            )
            return [], position, offset
        return messages, position, offset

    async def _fetch_riding(self, key: TopicPartition, offset: int, ride: _Ride | None):
        """The fetch of `key` as Fetch version 2 with the commits waiting to ride. Returns
        the fetch's outcome (an error included), or None when the server speaks no
        Fetch version 2 (the fetch goes out as version 1; the commits as CommitOffsets)."""
        assert self.group is not None  # only a group's consumer commits
        offsets = dict(self._ride_next)
        self._ride_next.clear()
        if ride is not None:
            offsets.update(ride.offsets)
        generation, member_id = (self.generation, self.member_id) if self._member else (-1, "")
        try:
            fetched, commits = await self._client.fetch_committing(
                key[0],
                key[1],
                offset,
                group=self.group,
                offsets=offsets,
                generation=generation,
                member_id=member_id,
                commit_wait=ride is not None,
                bytes_max=self.bytes_max,
                wait_ms=self.wait_ms,
                include_expired=self.include_expired,
                timeout_ms=self.timeout_ms,
            )
        except ProtocolViolation as error:
            if error.code != ErrorCode.UNSUPPORTED_VERSION:
                raise
            log.info(
                "consumer %s: the server has no Fetch version 2 (protocol 3 or older): commits of their own", self.group
            )
            self._ride_commits = False
            for offset_key, value in offsets.items():  # for the next commit or auto-commit
                self._ride_next.setdefault(offset_key, value)
            if ride is not None:
                ride.settle(None)
            return None
        except asyncio.CancelledError:
            if ride is not None:
                ride.settle(None)  # sent or not, no answer: commit() sends its own
            raise
        except BaseException as error:
            if ride is not None:
                ride.settle(error)
            elif isinstance(error, NodiClientError):
                log.warning("consumer %s: a commit riding on a fetch failed: %s", self.group, error)
            raise
        if ride is not None:
            ride.settle(commits)
        else:
            try:
                self._apply_commits(offsets, commits)
            except NodiClientError as error:
                log.warning("consumer %s: a commit riding on a fetch failed: %s", self.group, error)
        return fetched

    def _collect(self) -> None:
        """Take every finished fetch into _ready: its messages, if the partition is still
        ours and still at the offset the fetch started from."""
        for key in list(self._assignment):
            task = self._fetches.get(key)
            if task is None or not task.done():
                continue
            del self._fetches[key]
            if task.cancelled():
                continue
            error = task.exception()
            if error is not None:
                if isinstance(error, (ConnectionLost, Timeout)):
                    failures = self._fetch_failures.get(key, 0) + 1
                    self._fetch_failures[key] = failures
                    report = log.warning if failures == 1 else log.debug  # once per outage
                    report("consumer: fetching %s-%d failed: %s; retrying with backoff", key[0], key[1], error)
                    continue
                raise error
            self._fetch_failures.pop(key, None)
            messages, position, offset = task.result()
            if self._positions.get(key) != offset:
                continue  # seeked or reassigned meanwhile
            if messages:
                self._ready[key] = (messages, position)
            else:
                self._positions[key] = position

    def _take(self, out: list[Message], limit: int | None) -> None:
        """Move up to `limit` (None: all) ready messages to `out`, partition by
        partition; a partition left with some goes to the back of the line. Its position
        becomes the offset of the first message not returned (after the fetch's, when
        all were)."""
        for key in list(self._ready):
            if limit is not None and len(out) >= limit:
                break
            messages, position = self._ready.pop(key)
            room = len(messages) if limit is None else limit - len(out)
            if len(messages) <= room:
                out.extend(messages)
                self._positions[key] = position
                self._delivered += len(messages)
            else:
                out.extend(messages[:room])
                self._delivered += room
                self._ready[key] = (messages[room:], position)  # to the back of the line
                self._positions[key] = messages[room].offset

    def _cancel_fetches(self, keys: Iterable[TopicPartition]) -> None:
        """Stop fetching these partitions and drop what was fetched for them and not
        returned: their positions are where the next fetch starts."""
        for key in keys:
            task = self._fetches.pop(key, None)
            if task is not None:
                task.cancel()
            self._ready.pop(key, None)
            self._unsent.discard(key)
            ride = self._ride_for.pop(key, None)
            if ride is not None:  # its fetch never went out: commit() sends its own
                ride.settle(None)

    def _raise_background_error(self) -> None:
        error, self._background_error = self._background_error, None
        if error is not None:
            raise error

    # -- iteration ----------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        idle_since = time.monotonic()
        while not self._closed:
            batch = await self.poll()
            if not batch:
                if self._idle_for(idle_since):
                    return
                continue
            idle_since = time.monotonic()
            index = 0
            try:
                for index, message in enumerate(batch):  # noqa: B007
                    yield message
                index = len(batch)
            finally:
                if index < len(batch):
                    self.rewind(batch[index + 1 :])

    def _idle_for(self, since: float) -> bool:
        return self.idle_timeout_ms is not None and (time.monotonic() - since) * 1000 >= self.idle_timeout_ms

    def rewind(self, undelivered: list[Message]) -> None:
        """Messages poll() returned that were not handled after all (an iteration left
        early): their partitions go back to the first of them, so commit() does not
        pass them and the next poll() returns them again."""
        first: dict[TopicPartition, int] = {}
        for message in undelivered:
            first.setdefault((message.topic, message.partition), message.offset)
        for key, offset in first.items():
            position = self._positions.get(key)
            if key in self._assignment and position is not None and position > offset:
                self._cancel_fetches([key])
                self._positions[key] = offset

    # -- offsets ------------------------------------------------------------------------

    async def commit(self) -> None:
        """Commit, per partition, the offset after the last message poll() returned, and
        return once the commit is durable. A partition that moved to another member
        meanwhile is skipped. When a fetch is about to go out (poll() has just started
        the next ones) the commit rides on it (a server of protocol version 4), which
        then answers as soon as the commit is durable; else a CommitOffsets of its own."""
        if self.group is None:
            raise ValueError("commit() needs a consumer group")
        offsets = self._uncommitted(self._positions)
        if not offsets:
            return
        key = next(iter(self._unsent), None) if self._ride_commits else None
        if key is None or key in self._ride_for:
            await self._commit(offsets)
            return
        ride = self._ride_for[key] = _Ride(offsets, asyncio.get_running_loop().create_future())
        async with self._client.core.deadline(self.timeout_ms, "Commit"):
            outcome = await ride.future
        if outcome is None:  # not carried after all (its fetch was cancelled first)
            await self._commit(offsets)
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            self._apply_commits(offsets, outcome)

    def commit_nowait(self) -> None:
        """commit() without waiting: the offsets after the last message poll() returned
        ride on the next fetch that goes out (the one poll() has just started, if any),
        so they cost no request of their own; failures are logged, not raised, and a
        later commit() or auto-commit covers the partitions again. What no fetch took
        is committed by close(). To a server of protocol 3 or older: the next commit()
        or close() commits them."""
        if self.group is None:
            raise ValueError("commit_nowait() needs a consumer group")
        self._ride_next.update(self._uncommitted(self._positions))

    def _handled_positions(self) -> dict[TopicPartition, int]:
        """Per partition still ours, the position before the batch being handled (a
        seek or rewind below it since wins)."""
        return {
            key: min(offset, self._positions[key]) for key, offset in self._handled.items() if key in self._positions
        }

    def _uncommitted(self, positions: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        return {key: offset for key, offset in positions.items() if self._committed.get(key) != offset}

    async def _commit(self, positions: dict[TopicPartition, int]) -> None:
        """A CommitOffsets of the positions not committed yet."""
        offsets = self._uncommitted(positions)
        if not offsets:
            return
        assert self.group is not None  # only a group's consumer commits
        generation, member_id = (self.generation, self.member_id) if self._member else (-1, "")
        results = await self._client.commit_offsets(
            self.group, offsets, generation=generation, member_id=member_id, timeout_ms=self.timeout_ms
        )
        self._apply_commits(offsets, results)

    def _apply_commits(
        self,
        offsets: dict[TopicPartition, int],
        results: dict[TopicPartition, NodiClientError | None] | NodiClientError,
    ) -> None:
        """Note what a commit stored; stop reading partitions it was fenced from; raise
        the first other error."""
        if isinstance(results, NodiClientError):
            raise results
        failure = None
        for key, error in results.items():
            if error is None:
                self._committed[key] = offsets[key]
            elif isinstance(error, (IllegalGeneration, UnknownMember)):
                log.info("consumer %s: commit of %s-%d refused: %s", self.group, key[0], key[1], error)
                if isinstance(error, IllegalGeneration) and self._member:
                    # Taken from this member meanwhile (it did not let go in time): stop
                    # delivering it; if it is ours again, read it from what is committed.
                    self._cancel_fetches([key])
                    self._positions.pop(key, None)
                    self._committed.pop(key, None)
            elif failure is None:
                failure = error
        if failure is not None:
            raise failure

    async def _assign(self, assignment: Iterable[TopicPartition]) -> None:
        """Adopt `assignment`: drop what went, find where each new partition starts."""
        new = sorted(set(assignment))
        gone = [key for key in self._assignment if key not in new]
        self._cancel_fetches(gone)
        for key in gone:
            self._positions.pop(key, None)
            self._committed.pop(key, None)
        added = [key for key in new if key not in self._positions]
        self._assignment = new
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        if not added:
            return
        committed: dict[TopicPartition, int] = {}
        if self.group is not None:
            committed = await self._client.fetch_offsets(
                self.group, sorted({topic for topic, _ in added}), timeout_ms=self.timeout_ms
            )
        for key in added:
            if key not in self._assignment:
                continue  # gone again meanwhile
            if key in committed:
                offset = committed[key]
                self._committed[key] = offset
            else:
                offset = await self._client.resolve_start(key[0], key[1], self.start_spec, timeout_ms=self.timeout_ms)
            if key in self._assignment:
                self._positions[key] = offset

    # -- group membership ---------------------------------------------------------------

    async def _join(self) -> None:
        assert self.group is not None  # only a group's consumer joins
        response = await self._client.core.call(
            m.JoinGroupRequest(
                group=self.group,
                member_id=self.member_id,
                topics=self.topics,
                session_timeout_ms=self.session_timeout_ms,
            ),
            self.timeout_ms,
            expect=m.JoinGroupResponse,
        )
        self.member_id = response.member_id
        self.generation = response.generation
        self._heartbeat_ok_at = time.monotonic()
        if response.heartbeat_interval_ms > 0:
            self._heartbeat_interval_s = response.heartbeat_interval_ms / 1000
        await self._assign(_pairs(response.assignments))
        await self._notify(self.on_assigned, self._assignment)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                if self._pending is not None or not self._group_wait:
                    # Waiting for poll() to adopt (or a protocol-1 server): heartbeat
                    # each interval; an adoption is acknowledged at once.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._adopted.wait(), self._heartbeat_interval_s)
                self._adopted.clear()
                await self._heartbeat()
            except (ConnectionLost, Timeout) as error:
                log.warning("consumer %s: heartbeat failed: %s", self.group, error)
                await asyncio.sleep(self._heartbeat_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # surfaced by the next poll()
                self._background_error = error
                if self._changed is not None and not self._changed.done():
                    self._changed.set_result(None)
                await asyncio.sleep(self._heartbeat_interval_s)

    async def _heartbeat(self) -> None:
        """One heartbeat with the adopted generation: a GroupWait the server holds up
        to one heartbeat interval (a plain Heartbeat to a server of protocol 1)."""
        assert self.group is not None  # only a group's consumer heartbeats
        timeout_ms = min(self.timeout_ms, self.session_timeout_ms)
        response: m.GroupWaitResponse | m.HeartbeatResponse | None = None
        if self._group_wait:
            wait_ms = 0 if self._pending is not None else int(self._heartbeat_interval_s * 1000)
            redelivered, self._redelivered_unreported = self._redelivered_unreported, 0
            request = m.GroupWaitRequest(
                group=self.group,
                member_id=self.member_id,
                generation=self.generation,
                wait_ms=wait_ms,
                messages_redelivered=redelivered,
            )
            try:
                async with self._client.core.deadline(timeout_ms, "GroupWait", extra_ms=wait_ms):
                    response = await self._client.core.send(request, expect=m.GroupWaitResponse)
            except ProtocolViolation as error:  # refused before sending: a protocol-1 server
                if error.code != ErrorCode.UNSUPPORTED_VERSION:
                    raise
            if response is not None and response.error_code == ErrorCode.UNSUPPORTED_VERSION:
                response = None
            if response is None:
                log.info("consumer %s: the server has no GroupWait (protocol 1): plain heartbeats", self.group)
                self._group_wait = False
        if response is None:
            heartbeat = m.HeartbeatRequest(group=self.group, member_id=self.member_id, generation=self.generation)
            async with self._client.core.deadline(timeout_ms, "Heartbeat"):
                response = await self._client.core.send(heartbeat, expect=m.HeartbeatResponse)
        if response.error_code in (ErrorCode.NONE, ErrorCode.REBALANCE_IN_PROGRESS):
            fenced = self._fenced()
            self._heartbeat_ok_at = time.monotonic()
            if fenced and self._changed is not None and not self._changed.done():
                self._changed.set_result(None)  # a poll() waiting for membership goes on
        if response.error_code == ErrorCode.NONE:
            return
        if response.error_code == ErrorCode.REBALANCE_IN_PROGRESS:
            if response.generation > self.generation:
                self._pending = (response.generation, _pairs(response.assignments))
                if self._changed is not None and not self._changed.done():
                    self._changed.set_result(None)  # wakes a waiting poll()
        elif response.error_code in (ErrorCode.UNKNOWN_MEMBER, ErrorCode.ILLEGAL_GENERATION):
            # Expired (or the server restarted): join again and re-read what is
            # committed; what this member delivered after its last commit may repeat.
            log.warning("consumer %s: %s; joining again", self.group, response.error_message)
            self.member_id = ""
            self._pending = None
            await self._assign([])
            await self._join()
        else:
            check_response(response)

    async def _adopt_pending(self) -> None:
        """Adopt the generation the heartbeat learned of, in poll() (every batch poll()
        returned before is handled): stop reading the revoked partitions, call
        on_revoked, commit what was handled, take the new assignment, call
        on_assigned, and have the heartbeat acknowledge the generation at once (which
        lets the server hand the revoked partitions on)."""
        assert self._pending is not None
        generation, assignment = self._pending
        self._pending = None
        kept = set(assignment)
        revoked = [key for key in self._assignment if key not in kept]
        added = [key for key in assignment if key not in set(self._assignment)]
        self._cancel_fetches(revoked)  # nothing more is delivered from them
        await self._notify(self.on_revoked, revoked)
        if self.auto_commit:
            try:
                await self._commit(self._handled_positions())
            except NodiClientError as error:
                log.warning("consumer %s: commit before a handover failed: %s", self.group, error)
        for key in revoked:
            position, committed = self._positions.get(key), self._committed.get(key)
            if position is not None and committed is not None and position > committed:
                self._messages_redelivered += position - committed
                self._redelivered_unreported += position - committed
        self._partitions_revoked += len(revoked)
        self.generation = generation
        await self._assign(assignment)
        self._adopted.set()
        log.info("consumer %s: generation %d, partitions %s", self.group, generation, self._assignment)
        await self._notify(self.on_assigned, [key for key in added if key in self._assignment])

    def _fenced(self) -> bool:
        """A member no heartbeat has confirmed for a session timeout delivers nothing."""
        return self._member and time.monotonic() - self._heartbeat_ok_at >= self.session_timeout_ms / 1000

    async def _notify(self, callback, partitions: list[TopicPartition]) -> None:
        if callback is None or not partitions:
            return
        try:
            result = callback(list(partitions))
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("consumer %s: callback %r failed", self.group, callback)


class _Ride:
    """A waiting commit()'s offsets riding on one partition's next fetch. `future` gets
    the commits' outcome: the per-partition results, an error, or None when they were
    not carried (the fetch was cancelled first, the server is too old): then commit()
    sends a CommitOffsets of its own (a second commit of the same offsets is harmless)."""

    __slots__ = ("offsets", "future")

    def __init__(self, offsets: dict[TopicPartition, int], future: asyncio.Future) -> None:
        self.offsets = offsets
        self.future = future

    def settle(self, outcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)


def _pairs(assignments: list[m.TopicPartitions]) -> list[TopicPartition]:
    return [(entry.topic, partition) for entry in assignments for partition in entry.partitions]


# ---------------------------------------------------------------------------
# The blocking consumer


class Consumer:
    """The Consumer of a sync Client: the AsyncConsumer on the client's loop, driven
    from the calling thread. Same options."""

    def __init__(self, client, topics, group: str | None = None, **options) -> None:
        self._client = client
        for name in ("on_revoked", "on_assigned"):
            callback = options.get(name)
            if callback is not None:  # run off the loop: it may call this consumer
                options[name] = functools.partial(asyncio.to_thread, callback)
        self._consumer: AsyncConsumer = client.core.run(
            self._make(client.core.async_client, topics, group, options), None
        )
        client.core.own(self)

    @staticmethod
    async def _make(async_client, topics, group, options) -> AsyncConsumer:
        consumer = AsyncConsumer(async_client, topics, group, **options)
        async_client.core.disown(consumer)  # closed by this wrapper
        return consumer

    def __enter__(self) -> Consumer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._consumer).replace("AsyncConsumer", "Consumer", 1)

    @property
    def group(self) -> str | None:
        return self._consumer.group

    @property
    def member_id(self) -> str:
        return self._consumer.member_id

    @property
    def generation(self) -> int:
        return self._consumer.generation

    @property
    def closed(self) -> bool:
        return self._consumer.closed

    def statistics(self) -> ConsumerStatistics:
        return self._consumer.statistics()

    def start(self) -> None:
        self._client.core.run(self._consumer.start(), self._consumer.timeout_ms)

    def poll(self, timeout_ms: int | None = None, max_records: int | None = None) -> list[Message]:
        """As AsyncConsumer.poll: up to `max_records` messages, waiting up to
        `timeout_ms` (default wait_ms) for some."""
        wait_ms = self._consumer.wait_ms if timeout_ms is None else timeout_ms
        return self._client.core.run(self._consumer.poll(timeout_ms, max_records), self._consumer.timeout_ms, wait_ms)

    def commit(self) -> None:
        self._client.core.run(self._consumer.commit(), self._consumer.timeout_ms)

    def commit_nowait(self) -> None:
        """As AsyncConsumer.commit_nowait: the offsets ride on the next fetch."""
        self._client.core.run(self._commit_nowait(), None)

    async def _commit_nowait(self) -> None:
        self._consumer.commit_nowait()

    def close(self) -> None:
        try:
            if not self._client.closed:
                self._client.core.run(self._consumer.close(), self._consumer.timeout_ms)
        finally:
            self._client.core.disown(self)

    def assignment(self) -> list[TopicPartition]:
        return self._consumer.assignment()

    def position(self, topic: str, partition: int) -> int | None:
        return self._consumer.position(topic, partition)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._client.core.run(self._seek(topic, partition, offset), None)

    async def _seek(self, topic: str, partition: int, offset: int) -> None:
        self._consumer.seek(topic, partition, offset)

    def __iter__(self) -> Iterator[Message]:
        consumer = self._consumer
        idle_since = time.monotonic()
        while not consumer.closed:
            batch = self.poll()
            if not batch:
                if consumer._idle_for(idle_since):
                    return
                continue
            idle_since = time.monotonic()
            index = 0
            try:
                for index, message in enumerate(batch):  # noqa: B007
                    yield message
                index = len(batch)
            finally:
                if index < len(batch) and not self._client.closed:
                    self._client.core.run(self._rewind(batch[index + 1 :]), None)

    def rewind(self, undelivered: list[Message]) -> None:
        """As AsyncConsumer.rewind: poll() returns these again."""
        self._client.core.run(self._rewind(undelivered), None)

    async def _rewind(self, undelivered: list[Message]) -> None:
        self._consumer.rewind(undelivered)


__all__ = ["AsyncConsumer", "Consumer", "ConsumerStatistics", "error_for"]
