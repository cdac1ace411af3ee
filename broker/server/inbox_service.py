"""Inboxes for request-reply: in-memory mailboxes on the broker, never written to disk.

A requester opens an inbox (InboxOpen: the broker names it), produces its request to a
topic with the reserved headers `nodi-reply-to` (the inbox) and `nodi-correlation-id`,
and long-polls its inbox (InboxReceive). A responder that received the request (from a
queue group) sends its answer with Reply: whole record batches, each record carrying the
correlation id, which the broker checks (CRC, bounds) and keeps as they are in the inbox
until the requester takes them. The client matches replies to requests by correlation
id (broker/client/request.py).

An inbox lives until it is closed (InboxClose) or goes unpolled for
inbox_idle_timeout_ms; a reply for an inbox that is gone, or over its inbox's
inbox_bytes_max, is dropped and counted (statistics, nodi_replies_dropped). Nothing here
survives a broker restart: requests waiting then time out on the requester's side.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import secrets
from dataclasses import dataclass

from nodi.storage.records import check_batches

from ..protocol import messages as m
from ..protocol.errors import ErrorCode, ProtocolError
from .clock import SYSTEM_CLOCK, Clock
from .inbox_limits import DEFAULT_INBOX_LIMITS, InboxLimits
from .reply import Reply

INBOX_PREFIX = "inbox."


@dataclass(frozen=True, slots=True)
class InboxStatistics:
    inboxes: int  # open now
    replies_delivered: int  # reply batches taken into an inbox
    replies_dropped: int  # reply batches for an inbox that was gone or full
    inboxes_expired: int  # closed for going unpolled


class _Inbox:
    __slots__ = ("batches", "bytes", "polled", "waiters")

    def __init__(self, now: float) -> None:
        self.batches: collections.deque[bytes] = collections.deque()
        self.bytes = 0
        self.polled = now
        self.waiters: set[asyncio.Future] = set()

    def wake(self) -> None:
        for future in self.waiters:
            if not future.done():
                future.set_result(None)
        self.waiters.clear()


class InboxService:
    def __init__(self, server_id: str, limits: InboxLimits = DEFAULT_INBOX_LIMITS, clock: Clock = SYSTEM_CLOCK) -> None:
        limits.validate()
        self.limits = limits
        self._clock = clock
        self._inboxes: dict[str, _Inbox] = {}
        # The random part makes a name a capability: another principal cannot guess an
        # inbox's name to read its replies (docs/security.md).
        self._names = (f"{INBOX_PREFIX}{server_id}.{n}.{secrets.token_hex(8)}" for n in itertools.count(1))
        self._delivered = self._dropped = self._expired = 0

    def attach(self, tasks: asyncio.TaskGroup) -> None:
        tasks.create_task(self._expire_idle())

    def statistics(self) -> InboxStatistics:
        return InboxStatistics(len(self._inboxes), self._delivered, self._dropped, self._expired)

    async def open(self, request: m.InboxOpenRequest) -> Reply:
        if len(self._inboxes) >= self.limits.inboxes_max:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"inboxes_max {self.limits.inboxes_max} inboxes are open",
                closes_connection=False,
            )
        name = next(self._names)
        self._inboxes[name] = _Inbox(self._clock.monotonic())
        return Reply(
            m.InboxOpenResponse(
                request_id=request.request_id, inbox=name, idle_timeout_ms=self.limits.inbox_idle_timeout_ms
            )
        )

    async def close(self, request: m.InboxCloseRequest) -> Reply:
        inbox = self._inboxes.pop(request.inbox, None)
        if inbox is not None:
            inbox.wake()
        return Reply(m.InboxCloseResponse(request_id=request.request_id))

    async def receive(self, request: m.InboxReceiveRequest) -> Reply:
        inbox = self._inbox(request.inbox)
        wait_s = min(max(request.wait_ms, 0), self.limits.receive_wait_max_ms) / 1000
        deadline = self._clock.monotonic() + wait_s
        while not inbox.batches:
            inbox.polled = self._clock.monotonic()
            remaining = deadline - inbox.polled
            if remaining <= 0:
                break
            future = asyncio.get_running_loop().create_future()
            inbox.waiters.add(future)
            try:
                await asyncio.wait_for(future, remaining)
            except TimeoutError:
                pass
            finally:
                inbox.waiters.discard(future)
            if self._inboxes.get(request.inbox) is not inbox:
                break  # closed meanwhile
        inbox.polled = self._clock.monotonic()
        taken: list[bytes] = []
        size = 0
        budget = max(request.bytes_max, 1)
        while inbox.batches and (not taken or size + len(inbox.batches[0]) <= budget):
            batch = inbox.batches.popleft()
            taken.append(batch)
            size += len(batch)
        inbox.bytes -= size
        return Reply(m.InboxReceiveResponse(request_id=request.request_id, records=b"".join(taken)))

    async def reply(self, request: m.ReplyRequest) -> Reply:
        """Keep the batches for the inbox; dropped (and counted) when it is gone or full."""
        check_batches(request.records)  # whole batches that decode (InvalidRecords otherwise)
        data = bytes(request.records)
        inbox = self._inboxes.get(request.inbox)
        delivered = inbox is not None and inbox.bytes + len(data) <= self.limits.inbox_bytes_max
        if inbox is not None and delivered:
            inbox.batches.append(data)
            inbox.bytes += len(data)
            inbox.wake()
            self._delivered += 1
        else:
            self._dropped += 1
        return Reply(m.ReplyResponse(request_id=request.request_id, delivered=delivered))

    def _inbox(self, name: str) -> _Inbox:
        inbox = self._inboxes.get(name)
        if inbox is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_INBOX, f"no inbox {name!r} (closed, or idle too long)", closes_connection=False
            )
        return inbox

    async def _expire_idle(self) -> None:
        idle_s = self.limits.inbox_idle_timeout_ms / 1000
        while True:
            await asyncio.sleep(min(idle_s / 4, 5.0))
            now = self._clock.monotonic()
            for name, inbox in list(self._inboxes.items()):
                if not inbox.waiters and now - inbox.polled > idle_s:
                    del self._inboxes[name]
                    self._expired += 1
