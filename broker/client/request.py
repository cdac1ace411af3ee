"""Request-reply in the Python client.

    reply = client.request("prices", b"AAPL", timeout_ms=2_000)   # a Message, or RequestTimeout

    with client.queue("prices", "pricers") as queue:               # a responder
        for message in queue:
            message.reply(lookup(message.value))

A request is an ordinary message on `topic` with two reserved headers: `nodi-reply-to`
(this client's inbox on the broker, opened on the first request) and
`nodi-correlation-id` (unique per request). Responders receive it from a queue group
and answer with QueueMessage.reply(value), which puts a record carrying the same
correlation id in the inbox - in the broker's memory, never on disk. One poller task per
client long-polls its inbox while requests are waiting and hands each reply to the
request with its correlation id; a reply nobody waits for any more (its request timed
out) is dropped and counted (`replies_dropped`).

A request that gets no reply within timeout_ms raises RequestTimeout (a Timeout). If
the inbox is lost (the broker restarted, or it went unpolled too long) the requests
waiting on it fail with UnknownInbox and the next request opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os

from nodi.storage.errors import NodiError
from nodi.storage.records import NewRecord, decode_records, iter_batches

from ..protocol import headers as reserved
from ..protocol import messages as m
from .errors import ConnectionLost, InvalidRecords, RequestTimeout, UnknownInbox
from .features import check_user_headers
from .types import Message, build_one, to_bytes, to_headers

# The longest long-poll of the inbox per request (the poller asks again while needed).
INBOX_POLL_MS = 10_000
# After a failed poll (a broken connection), wait this long before the next.
POLL_RETRY_S = 0.1


class Requester:
    """A client's inbox and the requests waiting on it (see the module docstring)."""

    def __init__(self, client) -> None:
        self.client = client
        self.inbox: str | None = None
        self._opening: asyncio.Lock = asyncio.Lock()
        self._pending: dict[bytes, asyncio.Future] = {}
        self._poller: asyncio.Task | None = None
        self._prefix = os.urandom(8).hex()
        self._ids = itertools.count(1)
        self.replies_dropped = 0
        client.core.own(self)

    async def request(
        self, topic: str, value, *, key=None, headers=None, partition: int | None = None, timeout_ms: int | None = None
    ) -> Message:
        timeout_ms = self.client.timeout_ms if timeout_ms is None else timeout_ms
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be positive")
        key_bytes = to_bytes(key, "key")
        user_headers = to_headers(headers)
        check_user_headers(user_headers)
        correlation = f"{self._prefix}-{next(self._ids)}".encode()
        future = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                inbox = await self._inbox()
                record = NewRecord(
                    key_bytes,
                    to_bytes(value),
                    (*user_headers, (reserved.REPLY_TO, inbox.encode()), (reserved.CORRELATION_ID, correlation)),
                    None,
                )
                if partition is None:
                    partitions = await self.client.partition_count(topic)
                    partition = self.client.choose_partition(topic, key_bytes, partitions)
                # acks=written: the reply is the acknowledgement that matters. A responder
                # sees the request only once its topic's fsync policy lets readers see it
                # (fsync always: after the fsync), so nothing is answered from a request a
                # crash could take back; a durable ack would only add an fsync per request
                # under the other policies.
                await self.client.produce_batch(
                    topic, partition, build_one(record, f"request to {topic}"), acks="written", timeout_ms=timeout_ms
                )
                if self._poller is None or self._poller.done():
                    self._poller = asyncio.get_running_loop().create_task(self._poll(inbox))
                return await future
        except TimeoutError:
            raise RequestTimeout(f"no reply to a request on {topic!r} within {timeout_ms} ms") from None
        finally:
            self._pending.pop(correlation, None)

    async def _inbox(self) -> str:
        async with self._opening:
            if self.inbox is None:
                response = await self.client.core.call(m.InboxOpenRequest(), None, expect=m.InboxOpenResponse)
                self.inbox = response.inbox
            return self.inbox

    async def _poll(self, inbox: str) -> None:
        """Long-poll the inbox while requests wait on it."""
        while self._pending and self.inbox == inbox:
            request = m.InboxReceiveRequest(inbox=inbox, wait_ms=INBOX_POLL_MS)
            try:
                response = await self.client.core.call(
                    request, None, extra_ms=INBOX_POLL_MS, expect=m.InboxReceiveResponse
                )
            except UnknownInbox as error:
                self.inbox = None  # the next request opens another
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(error)
                return
            except (ConnectionLost, NodiError):
                if self.client.closed:
                    return
                await asyncio.sleep(POLL_RETRY_S)
                continue
            self._deliver(inbox, response.records)

    def _deliver(self, inbox: str, records) -> None:
        if not records:
            return
        try:
            decoded = [record for header, batch in iter_batches(records) for record in decode_records(batch, header)]
        except NodiError as error:
            raise InvalidRecords(f"replies in inbox {inbox}: {error}") from None
        for record in decoded:
            correlation = reserved.find(record.headers, reserved.CORRELATION_ID)
            future = self._pending.get(correlation) if correlation is not None else None
            if future is None or future.done():
                self.replies_dropped += 1
                continue
            future.set_result(
                Message(inbox, 0, record.offset, record.timestamp_ms, record.key, record.value, record.headers)
            )

    async def close(self) -> None:
        self.client.core.disown(self)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
        inbox, self.inbox = self.inbox, None
        if inbox is not None:
            with contextlib.suppress(Exception):
                await self.client.core.call(m.InboxCloseRequest(inbox=inbox), 1_000, expect=m.InboxCloseResponse)


def requester_of(client) -> Requester:
    """The client's Requester, made on its first request (kept in client.core)."""
    requester = client.core.requester
    if requester is None:
        requester = client.core.requester = Requester(client)
    return requester


async def send_reply(client, message, value, key=None, headers=None) -> bool:
    """Answer `message` (a request: it has a nodi-reply-to header) with `value`. True
    when the reply reached the requester's inbox; False when the inbox is gone (the
    requester gave up or left: the reply is dropped and counted by the broker)."""
    reply_to = message.header(reserved.REPLY_TO)
    correlation = message.header(reserved.CORRELATION_ID)
    if reply_to is None or correlation is None:
        raise ValueError(
            f"message {message.topic}-{message.partition}@{message.offset} is not a request "
            "(no nodi-reply-to and nodi-correlation-id headers)"
        )
    user_headers = to_headers(headers)
    check_user_headers(user_headers)
    record = NewRecord(
        to_bytes(key, "key"), to_bytes(value), (*user_headers, (reserved.CORRELATION_ID, correlation)), None
    )
    request = m.ReplyRequest(inbox=reply_to.decode("utf-8", errors="replace"), records=b"")
    response = await client.core.call(request, None, records=build_one(record, "reply"), expect=m.ReplyResponse)
    return response.delivered
