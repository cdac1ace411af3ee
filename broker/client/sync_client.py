"""Client: the blocking Python client, the same surface as AsyncClient.

    with Client("127.0.0.1:6634") as client:
        client.create_topic("orders", partitions=3)
        partition, offset = client.produce("orders", b"hello", key="customer-1")

It owns a private event loop in a background thread, runs an AsyncClient there, and each
method submits the coroutine with asyncio.run_coroutine_threadsafe and waits for its
result (the coroutine's own timeout applies; the wait gives it a little more, then
cancels it). close() closes the AsyncClient and its producers and consumers, stops the
loop and joins the thread. Methods may be called from any thread, except from the
client's own loop thread (a producer future's callback runs there): that would deadlock,
and raises RuntimeError instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .async_client import DEFAULT_FETCH_BYTES_MAX, DEFAULT_TIMEOUT_MS, AsyncClient
from .core import SyncClientCore

if TYPE_CHECKING:
    import datetime as _datetime
    from collections.abc import Iterable, Sequence

    from ..protocol import messages as m
    from .consumer import Consumer
    from .errors import NodiClientError
    from .producer import Producer
    from .queue import Queue
    from .types import (
        Bytesish,
        GroupDescription,
        GroupHandovers,
        GroupSummary,
        HeadersInput,
        Message,
        ServerStatus,
        StartSpec,
        TopicDescription,
        TopicSettings,
        TopicSummary,
    )

ResultT = TypeVar("ResultT")

# close(): how long to wait for the loop thread to finish.
CLOSE_JOIN_TIMEOUT_S = 30.0


class Client:
    """See the module docstring. Keyword options are AsyncClient's: timeout_ms,
    client_id, reconnect_backoff_ms, reconnect_backoff_max_ms, reconnect_attempts_max,
    limits."""

    def __init__(self, address: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop_main, name="nodi-client-loop", daemon=True)
        self._closed = False
        # The interface of the client's parts (producers, consumers, queues): run a
        # coroutine on the loop, the parts to close (client/core.py).
        self.core = SyncClientCore(self._loop, self._thread, lambda: self._closed, DEFAULT_TIMEOUT_MS)
        self._thread.start()
        try:
            self._async: AsyncClient = self._run(self._make_client(address, options), None)
        except BaseException:
            self._stop_loop()
            raise
        self.core.async_client = self._async

    async def _make_client(self, address: str | None, options: dict) -> AsyncClient:
        return AsyncClient(address, **options)

    def _loop_main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            with contextlib.suppress(Exception):  # asyncio.to_thread's threads (an embedded broker's storage calls)
                self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, ResultT], timeout_ms: int | None, extra_ms: int = 0) -> ResultT:
        """core.run(): run `coroutine` on the client's loop and wait for it (its own
        timeout, `timeout_ms` or the client's, plus `extra_ms` and a grace)."""
        return self.core.run(coroutine, timeout_ms, extra_ms)

    # -- life cycle ---------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.address} {'closed' if self._closed else 'open'}>"

    @property
    def address(self) -> str:
        return self._async.address

    @property
    def timeout_ms(self) -> int:
        return self._async.timeout_ms

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def undecodable_batches_skipped(self) -> int:
        """Fetched batches left out because their records do not decode (each logged)."""
        return self._async.undecodable_batches_skipped

    def connect(self, timeout_ms: int | None = None) -> None:
        """Open the connection now (else the first call does)."""
        self._run(self._async.connect(timeout_ms), timeout_ms)

    def close(self) -> None:
        """Close producers and consumers (flushing, committing), the connection, the
        loop and its thread."""
        if self._closed:
            return
        for owned in list(self.core.parts):
            with contextlib.suppress(Exception):
                owned.close()
        try:
            self._run(self._async.close(), None)
        finally:
            self._closed = True
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_JOIN_TIMEOUT_S)

    def server_limits(self) -> dict[str, int]:
        return self._async.server_limits()

    # -- requests: AsyncClient's methods, blocking (tests/test_client.py checks that the
    #    signatures stay the same) --------------------------------------------------------

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        retention_ms: int | None = None,
        retention_bytes: int | None = None,
        cleanup_policy: str | None = None,
        fsync_policy: str | None = None,
        fsync_interval_ms: int | None = None,
        segment_bytes: int | None = None,
        segment_ms: int | None = None,
        ttl_ms: int | None = None,
        dedup_window_ms: int | None = None,
        delete_retention_ms: int | None = None,
        timestamp_type: str | None = None,
        exist_ok: bool = False,
        timeout_ms: int | None = None,
    ) -> TopicSettings:
        """AsyncClient.create_topic, blocking: Create a topic; returns the settings in
        force. None takes the server's default; retention_ms / retention_bytes UNLIMITED
        (-1) keeps messages for ever. ttl_ms: the default message TTL (0: none);
        dedup_window_ms: how long an idempotency key is remembered for publish dedup (0:
        off; the server's default is 2 minutes); delete_retention_ms: on a compacted
        topic, how long a tombstone stays after a compaction pass first saw it (the
        server's default is its [compaction] setting). cleanup_policy: "delete",
        "compact" or "compact,delete"; fsync_policy: "always", "interval" or "never";
        timestamp_type: "create" (the producer's timestamps stand) or "log-append"
        (every record gets the broker's time of the append). TopicExists when the name
        is taken, unless exist_ok: then it returns the existing topic's settings, which
        may differ from those asked for (compare them if that matters; nothing is
        changed)."""
        return self._run(
            self._async.create_topic(
                name,
                partitions,
                retention_ms=retention_ms,
                retention_bytes=retention_bytes,
                cleanup_policy=cleanup_policy,
                fsync_policy=fsync_policy,
                fsync_interval_ms=fsync_interval_ms,
                segment_bytes=segment_bytes,
                segment_ms=segment_ms,
                ttl_ms=ttl_ms,
                dedup_window_ms=dedup_window_ms,
                delete_retention_ms=delete_retention_ms,
                timestamp_type=timestamp_type,
                exist_ok=exist_ok,
                timeout_ms=timeout_ms,
            ),
            timeout_ms,
        )

    def delete_topic(self, name: str, *, missing_ok: bool = False, timeout_ms: int | None = None) -> None:
        """AsyncClient.delete_topic, blocking: Delete a topic and its data. UnknownTopic
        when there is none, unless missing_ok."""
        return self._run(self._async.delete_topic(name, missing_ok=missing_ok, timeout_ms=timeout_ms), timeout_ms)

    def list_topics(self, *, timeout_ms: int | None = None) -> list[TopicSummary]:
        """AsyncClient.list_topics, blocking: Every topic as (name, partitions), sorted by
        name."""
        return self._run(self._async.list_topics(timeout_ms=timeout_ms), timeout_ms)

    def describe_topic(self, name: str, *, timeout_ms: int | None = None) -> TopicDescription:
        """AsyncClient.describe_topic, blocking: A topic's settings and each partition's
        offsets and size."""
        return self._run(self._async.describe_topic(name, timeout_ms=timeout_ms), timeout_ms)

    def partition_count(self, topic: str, *, refresh: bool = False, timeout_ms: int | None = None) -> int:
        """AsyncClient.partition_count, blocking: The topic's partition count, cached after
        the first DescribeTopic."""
        return self._run(self._async.partition_count(topic, refresh=refresh, timeout_ms=timeout_ms), timeout_ms)

    def produce(
        self,
        topic: str,
        value: Bytesish | None,
        *,
        key: Bytesish | None = None,
        headers: HeadersInput = None,
        partition: int | None = None,
        timestamp: int | _datetime.datetime | None = None,
        acks: str = "durable",
        ttl_ms: int | None = None,
        delay_ms: int | None = None,
        deliver_at: _datetime.datetime | None = None,
        idempotency_key: Bytesish | None = None,
        timeout_ms: int | None = None,
    ) -> tuple[int, int]:
        """AsyncClient.produce, blocking: Append one message; (partition, offset) once
        acknowledged (offset -1 with acks "none"). The partition: `partition` when
        given, else xxh32(key) % partitions, else round-robin. acks "none" (answered
        before the write), "written" (in the page cache) or "durable" (fsynced; the
        default). Not retried: a ConnectionLost means it may or may not have been
        written. For throughput use producer()."""
        return self._run(
            self._async.produce(
                topic,
                value,
                key=key,
                headers=headers,
                partition=partition,
                timestamp=timestamp,
                acks=acks,
                ttl_ms=ttl_ms,
                delay_ms=delay_ms,
                deliver_at=deliver_at,
                idempotency_key=idempotency_key,
                timeout_ms=timeout_ms,
            ),
            timeout_ms,
        )

    def produce_batch(
        self,
        topic: str,
        partition: int,
        batch: bytes | bytearray | memoryview,
        *,
        acks: str | int = "durable",
        timeout_ms: int | None = None,
        retry: bool = False,
    ) -> m.ProduceResponse:
        """AsyncClient.produce_batch, blocking: Send whole RecordBatch v2 bytes
        (storage.records.build_batch) as they are; the server's ProduceResponse. `retry`
        re-sends after a ConnectionLost (only safe for an idempotent producer's
        batches). With publish dedup, `duplicates` names the records written before
        (nothing else was written); PartlyDuplicate, carrying them, when only some were."""
        return self._run(
            self._async.produce_batch(topic, partition, batch, acks=acks, timeout_ms=timeout_ms, retry=retry),
            timeout_ms,
        )

    def fetch(
        self,
        topic: str,
        partition: int,
        offset: int,
        *,
        bytes_max: int = DEFAULT_FETCH_BYTES_MAX,
        wait_ms: int = 0,
        min_bytes: int = 1,
        include_expired: bool = False,
        timeout_ms: int | None = None,
    ) -> list[Message]:
        """AsyncClient.fetch, blocking: Messages of one partition from `offset` on: whole
        batches up to about `bytes_max` (at least one batch), waiting up to `wait_ms`
        for `min_bytes` when there is nothing yet. Empty at the end of the log.
        OffsetOutOfRange below the log start or past its end. Expired messages
        (Message.expires_at passed) are left out unless include_expired."""
        return self._run(
            self._async.fetch(
                topic,
                partition,
                offset,
                bytes_max=bytes_max,
                wait_ms=wait_ms,
                min_bytes=min_bytes,
                include_expired=include_expired,
                timeout_ms=timeout_ms,
            ),
            timeout_ms,
            wait_ms or 0,
        )

    def fetch_with_position(
        self,
        topic: str,
        partition: int,
        offset: int,
        *,
        bytes_max: int = DEFAULT_FETCH_BYTES_MAX,
        wait_ms: int = 0,
        min_bytes: int = 1,
        include_expired: bool = False,
        timeout_ms: int | None = None,
    ) -> tuple[list[Message], int]:
        """AsyncClient.fetch_with_position, blocking: fetch(), plus the offset to fetch
        next: past every batch returned (records removed by compaction leave gaps),
        `offset` when nothing came."""
        return self._run(
            self._async.fetch_with_position(
                topic,
                partition,
                offset,
                bytes_max=bytes_max,
                wait_ms=wait_ms,
                min_bytes=min_bytes,
                include_expired=include_expired,
                timeout_ms=timeout_ms,
            ),
            timeout_ms,
            wait_ms or 0,
        )

    def fetch_counted(
        self,
        topic: str,
        partition: int,
        offset: int,
        *,
        bytes_max: int = DEFAULT_FETCH_BYTES_MAX,
        wait_ms: int = 0,
        min_bytes: int = 1,
        include_expired: bool = False,
        timeout_ms: int | None = None,
    ) -> tuple[list[Message], int, int, int]:
        """AsyncClient.fetch_counted, blocking: fetch_with_position(), plus how many
        expired messages and how many undecodable batches were left out."""
        return self._run(
            self._async.fetch_counted(
                topic,
                partition,
                offset,
                bytes_max=bytes_max,
                wait_ms=wait_ms,
                min_bytes=min_bytes,
                include_expired=include_expired,
                timeout_ms=timeout_ms,
            ),
            timeout_ms,
            wait_ms or 0,
        )

    def fetch_committing(
        self,
        topic: str,
        partition: int,
        offset: int,
        *,
        group: str,
        offsets: dict[tuple[str, int], int],
        generation: int = -1,
        member_id: str = "",
        commit_wait: bool = False,
        bytes_max: int = DEFAULT_FETCH_BYTES_MAX,
        wait_ms: int = 0,
        include_expired: bool = False,
        timeout_ms: int | None = None,
    ) -> tuple[
        tuple[list[Message], int, int, int] | NodiClientError,
        dict[tuple[str, int], NodiClientError | None] | NodiClientError,
    ]:
        """AsyncClient.fetch_committing, blocking: fetch_counted() with the group's
        `offsets` committed by the same request (Fetch version 2, protocol version 4)."""
        return self._run(
            self._async.fetch_committing(
                topic,
                partition,
                offset,
                group=group,
                offsets=offsets,
                generation=generation,
                member_id=member_id,
                commit_wait=commit_wait,
                bytes_max=bytes_max,
                wait_ms=wait_ms,
                include_expired=include_expired,
                timeout_ms=timeout_ms,
            ),
            timeout_ms,
            0 if commit_wait else wait_ms or 0,
        )

    def list_offsets(
        self,
        topic: str,
        partition: int,
        spec: str | int | _datetime.datetime = "latest",
        *,
        timeout_ms: int | None = None,
    ) -> int:
        """AsyncClient.list_offsets, blocking: "earliest": the first offset still stored;
        "latest": the high watermark (the next offset to be read); a time (datetime, or
        ms since the epoch as an int): the first offset whose timestamp is at or after
        it, or the high watermark."""
        return self._run(self._async.list_offsets(topic, partition, spec, timeout_ms=timeout_ms), timeout_ms)

    def resolve_start(self, topic: str, partition: int, start: StartSpec, *, timeout_ms: int | None = None) -> int:
        """AsyncClient.resolve_start, blocking: The offset a reader starting at `start`
        begins at."""
        return self._run(self._async.resolve_start(topic, partition, start, timeout_ms=timeout_ms), timeout_ms)

    def init_producer_id(
        self, producer_id: int = -1, producer_epoch: int = -1, *, timeout_ms: int | None = None
    ) -> tuple[int, int]:
        """AsyncClient.init_producer_id, blocking: A new (producer id, epoch) for an
        idempotent producer; with a known id, its next epoch (fencing older ones)."""
        return self._run(self._async.init_producer_id(producer_id, producer_epoch, timeout_ms=timeout_ms), timeout_ms)

    def list_groups(self, *, timeout_ms: int | None = None) -> list[GroupSummary]:
        """AsyncClient.list_groups, blocking:"""
        return self._run(self._async.list_groups(timeout_ms=timeout_ms), timeout_ms)

    def describe_handovers(self, group: str, *, timeout_ms: int | None = None) -> GroupHandovers:
        """AsyncClient.describe_handovers, blocking: the group's rebalances and
        partition handovers since the broker started (types.GroupHandovers)."""
        return self._run(self._async.describe_handovers(group, timeout_ms=timeout_ms), timeout_ms)

    def describe_group(self, group: str, *, timeout_ms: int | None = None) -> GroupDescription:
        """AsyncClient.describe_group, blocking: Members with their partitions, and per
        partition the committed offset, the high watermark and the lag. UnknownGroup
        when the group has neither."""
        return self._run(self._async.describe_group(group, timeout_ms=timeout_ms), timeout_ms)

    def describe_queue(self, topic: str, group: str, *, timeout_ms: int | None = None):
        """AsyncClient.describe_queue, blocking: A queue group's settings and per partition
        its ack floor and window (queue_client.QueueDescription). UnknownQueueGroup when
        it never received."""
        return self._run(self._async.describe_queue(topic, group, timeout_ms=timeout_ms), timeout_ms)

    def queue_leases(
        self,
        topic: str,
        group: str,
        *,
        partition: int | None = None,
        after: tuple[int, int] | None = None,
        limit: int = 100,
        timeout_ms: int | None = None,
    ):
        """AsyncClient.queue_leases, blocking: a page of a queue group's in-flight messages."""
        return self._run(
            self._async.queue_leases(
                topic, group, partition=partition, after=after, limit=limit, timeout_ms=timeout_ms
            ),
            timeout_ms,
        )

    def request(
        self, topic: str, value, *, key=None, headers=None, partition: int | None = None, timeout_ms: int | None = None
    ) -> Message:
        """AsyncClient.request, blocking: Send `value` to `topic` as a request and return
        the reply (a Message): a responder receives it from a queue group and calls
        message.reply(...). Raises RequestTimeout when no reply comes within timeout_ms
        (see client/request.py)."""
        return self._run(
            self._async.request(topic, value, key=key, headers=headers, partition=partition, timeout_ms=timeout_ms),
            timeout_ms,
        )

    def list_queues(self, topic: str | None = None, *, timeout_ms: int | None = None):
        """AsyncClient.list_queues, blocking: Every queue group (of `topic`, or of all)
        with its dead-letter topic and window totals (queue_client.QueueSummary)."""
        return self._run(self._async.list_queues(topic, timeout_ms=timeout_ms), timeout_ms)

    def reset_group(
        self,
        group: str,
        topic: str,
        to: StartSpec = "earliest",
        *,
        partitions: Iterable[int] | None = None,
        timeout_ms: int | None = None,
    ) -> dict[int, int]:
        """AsyncClient.reset_group, blocking: Move an empty group's committed offsets in
        `topic` (every partition, or `partitions`) to "earliest", "latest", an offset or
        a time (replay). Returns partition -> the offset now committed. GroupNotEmpty
        while it has members."""
        return self._run(
            self._async.reset_group(group, topic, to, partitions=partitions, timeout_ms=timeout_ms), timeout_ms
        )

    def commit_offsets(
        self,
        group: str,
        offsets: dict[tuple[str, int], int],
        *,
        generation: int = -1,
        member_id: str = "",
        metadata: dict[tuple[str, int], str | None] | None = None,
        timeout_ms: int | None = None,
    ) -> dict[tuple[str, int], NodiClientError | None]:
        """AsyncClient.commit_offsets, blocking: Commit (topic, partition) -> the next
        offset to read (and `metadata` text beside it). Without a generation and member
        id (a consumer outside group membership) the group must have no members. Returns
        each partition's error (None: committed)."""
        return self._run(
            self._async.commit_offsets(
                group, offsets, generation=generation, member_id=member_id, metadata=metadata, timeout_ms=timeout_ms
            ),
            timeout_ms,
        )

    def fetch_offsets(
        self, group: str, topics: Sequence[str] = (), *, timeout_ms: int | None = None
    ) -> dict[tuple[str, int], int]:
        """AsyncClient.fetch_offsets, blocking: The group's committed offsets (the next
        offset to read), of `topics` or all."""
        return self._run(self._async.fetch_offsets(group, topics, timeout_ms=timeout_ms), timeout_ms)

    def fetch_committed(
        self, group: str, topics: Sequence[str] = (), *, timeout_ms: int | None = None
    ) -> dict[tuple[str, int], tuple[int, str | None]]:
        """AsyncClient.fetch_committed, blocking: as fetch_offsets, with each offset's
        committed metadata text."""
        return self._run(self._async.fetch_committed(group, topics, timeout_ms=timeout_ms), timeout_ms)

    def server_status(self, *, timeout_ms: int | None = None) -> ServerStatus:
        """AsyncClient.server_status, blocking: Server-level facts: version, uptime, data
        directory, connections, disk space, read-only partitions."""
        return self._run(self._async.server_status(timeout_ms=timeout_ms), timeout_ms)

    def compact_topic(self, name: str, *, timeout_ms: int | None = None) -> list[m.PartitionCompaction]:
        """AsyncClient.compact_topic, blocking: Seal each partition's active segment and
        compact every partition of a compacted topic now; what each run did, by
        partition. A big topic takes a while: pass a timeout_ms to match (the client's
        default otherwise)."""
        return self._run(self._async.compact_topic(name, timeout_ms=timeout_ms), timeout_ms)

    def delete_records(
        self, offsets: Mapping[tuple[str, int], int], *, timeout_ms: int | None = None
    ) -> dict[tuple[str, int], int]:
        """AsyncClient.delete_records, blocking: delete every record below each
        partition's offset for good (-1: the high watermark); each partition's log start
        offset afterwards. The first partition's failure is raised once all are done."""
        return self._run(self._async.delete_records(offsets, timeout_ms=timeout_ms), timeout_ms)

    # -- producers and consumers --------------------------------------------------------

    def producer(self, **options: Any) -> Producer:
        """A batching Producer (see producer.py): send() returns a
        concurrent.futures.Future of (partition, offset)."""
        from .producer import Producer

        return Producer(self, **options)

    def consumer(self, topics, group: str | None = None, **options: Any) -> Consumer:
        """A Consumer (see consumer.py): iterate it, or poll()."""
        from .consumer import Consumer

        return Consumer(self, topics, group, **options)

    def queue(self, topic: str, group: str, **options: Any) -> Queue:
        """A Queue of queue group `group` on `topic` (see client/queue.py): iterate it,
        or receive(timeout_ms=...); ack, nack, in_progress or reject each message."""
        from .queue import Queue

        return Queue(self, topic, group, **options)


__all__ = ["Client"]
