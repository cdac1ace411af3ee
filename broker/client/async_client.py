"""AsyncClient: the asyncio Python client of a nodi server.

    async with AsyncClient("127.0.0.1:6634") as client:
        await client.create_topic("orders", partitions=3)
        partition, offset = await client.produce("orders", b"hello", key="customer-1")
        for message in await client.fetch("orders", partition, offset):
            print(message.offset, message.value)

One TCP connection (client_connection.ClientConnection), opened on first use and opened
again, with exponential backoff and jitter, after it breaks. Many calls may be in flight on
it at once (pipelining), up to the in_flight_requests_max both ends agree on.

Every call has a timeout: `timeout_ms` per call, else the client's (default 30 s). It
covers connecting, waiting for a slot, writing and the answer; when it passes the call
raises `Timeout`. A call whose connection breaks raises `ConnectionLost`: the request may
or may not have been carried out, and it is not sent again, except reads (list, describe,
fetch, offsets), which are retried on a new connection within the call's timeout, and an
idempotent producer's batches (see producer.py), which the server deduplicates.

Failures the server reports raise the client error of their code (client/errors.py).

Security (docs/security.md): `tls=` an ssl.SSLContext (client_tls_context(ca_file=...)),
True (the system's CAs) or False (plaintext); `user=` and `password=` authenticate each
connection. Left out (None), they come from NODI_TLS, NODI_TLS_CA, NODI_TLS_CERT,
NODI_TLS_KEY, NODI_USER and NODI_PASSWORD (client/tls.py). A refused password
(AuthenticationFailed) or TLS handshake (TlsFailed) is not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as _datetime
import itertools
import logging
import random
import ssl
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nodi.storage.errors import NodiError
from nodi.storage.records import NewRecord, decode_records, iter_batches
from nodi.storage.topic_settings import TOPIC_SETTINGS

from ..protocol import messages as m
from ..protocol.errors import ErrorCode
from ..protocol.limits import DEFAULT_PROTOCOL_LIMITS, ProtocolLimits
from .connection import ClientConnection
from .core import AsyncClientCore, check_error_code
from .errors import (
    AuthenticationFailed,
    ClientClosed,
    ConnectFailed,
    InvalidConfig,
    InvalidRecords,
    NodiClientError,
    PartlyDuplicate,
    ProtocolViolation,
    TlsFailed,
    TopicExists,
    UnknownPartition,
    UnknownTopic,
    error_for,
)
from .features import drop_expired, with_features
from .tls import client_tls_context, credentials_from, tls_from_environment

if TYPE_CHECKING:  # imported where used: they import this module
    from .consumer import AsyncConsumer
    from .producer import AsyncProducer
    from .queue import AsyncQueue
from .types import (
    Bytesish,
    DamagedPartition,
    GroupDescription,
    GroupHandovers,
    GroupMemberDescription,
    GroupSummary,
    HeadersInput,
    Message,
    PartitionDescription,
    PartitionLag,
    ServerStatus,
    StartSpec,
    TopicDescription,
    TopicSettings,
    TopicSummary,
    acks_value,
    backoff_s,
    build_one,
    check_start,
    new_message,
    partition_for_key,
    resolve_address,
    settings_from_wire,
    settings_to_wire,
    timestamp_ms_of,
    to_bytes,
    to_headers,
)

DEFAULT_TIMEOUT_MS = 30_000
DEFAULT_FETCH_BYTES_MAX = 1 << 20

log = logging.getLogger("nodi.client")

# Reconnect backoff: the first retry after this, doubling up to the max, each with
# +-50% jitter; at most reconnect_attempts_max attempts per outage (and never past the
# call's timeout).
RECONNECT_BACKOFF_MS = 50
RECONNECT_BACKOFF_MAX_MS = 2_000
RECONNECT_ATTEMPTS_MAX = 30


class AsyncClient:
    """See the module docstring. Use as `async with AsyncClient(...)`, or call
    `connect()` (optional: the first call connects) and `close()`."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        client_id: str = "nodi-python",
        reconnect_backoff_ms: int = RECONNECT_BACKOFF_MS,
        reconnect_backoff_max_ms: int = RECONNECT_BACKOFF_MAX_MS,
        reconnect_attempts_max: int = RECONNECT_ATTEMPTS_MAX,
        limits: ProtocolLimits = DEFAULT_PROTOCOL_LIMITS,
        tls: ssl.SSLContext | bool | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be positive")
        self.host, self.port = resolve_address(address)
        if tls is None:
            self.tls = tls_from_environment()
        elif tls is True:
            self.tls = client_tls_context()
        else:
            self.tls = tls or None
        self._credentials = credentials_from(user, password)
        self.timeout_ms = timeout_ms
        self.client_id = client_id
        self.reconnect_backoff_ms = reconnect_backoff_ms
        self.reconnect_backoff_max_ms = reconnect_backoff_max_ms
        self.reconnect_attempts_max = reconnect_attempts_max
        self.limits = limits
        self._connection: ClientConnection | None = None
        self._connecting: asyncio.Task | None = None
        self._closed = False
        # The interface of the client's parts (producers, consumers, queues, requests):
        # calls, the parts to close, the partition counts (client/core.py).
        self.core = AsyncClientCore(self, self._live_connection)
        # topic -> its default message TTL (0: none), for skipping expired messages.
        self._topic_ttls: dict[str, int] = {}
        self._round_robin: dict[str, itertools.count] = {}
        # Fetched batches left out because their records do not decode (stored before
        # the broker walked records on produce): each logged, and counted here.
        self.undecodable_batches_skipped = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<AsyncClient {self.address} {state}>"

    # -- life cycle ---------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def connect(self, timeout_ms: int | None = None) -> None:
        """Open the connection now (else the first call does)."""
        async with self.core.deadline(timeout_ms, "connect"):
            await self._live_connection()

    async def close(self) -> None:
        """Close producers and consumers made by this client (flushing and committing),
        then the connection; requests still in flight fail with ConnectionLost."""
        if self._closed:
            return
        for owned in list(self.core.parts):
            with contextlib.suppress(Exception):
                await owned.close()
        self._closed = True
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def server_limits(self) -> dict[str, int]:
        """The limits the server announced in its handshake (empty before connecting)."""
        return dict(self._connection.server_limits) if self._connection is not None else {}

    # -- connection ---------------------------------------------------------------------

    async def _live_connection(self) -> ClientConnection:
        if self._closed:
            raise ClientClosed("the client is closed")
        connection = self._connection
        if connection is not None and connection.is_open:
            return connection
        if self._connecting is None or self._connecting.done():
            # A finished attempt nobody was left waiting on (its callers timed out) is
            # not this call's answer: its failure may predate the server's return.
            self._connecting = asyncio.get_running_loop().create_task(self._connect_loop())
            # Retrieved here so an attempt every waiter gave up on logs no warning.
            self._connecting.add_done_callback(lambda task: task.cancelled() or task.exception())
        task = self._connecting
        try:
            # Shielded: one caller's timeout must not cancel the attempt others wait on.
            return await asyncio.shield(task)
        finally:
            if task.done() and self._connecting is task:
                self._connecting = None

    async def _connect_loop(self) -> ClientConnection:
        """Connect: the first attempt at once, then with exponential backoff and jitter,
        at most reconnect_attempts_max attempts (callers bound the time)."""
        old = self._connection
        self._connection = None
        if old is not None:
            await old.close()
        last_error = ConnectFailed(f"cannot connect to {self.address}")
        for attempt in range(self.reconnect_attempts_max):
            if attempt:
                await asyncio.sleep(backoff_s(attempt - 1, self.reconnect_backoff_ms, self.reconnect_backoff_max_ms))
            try:
                connection = await asyncio.wait_for(
                    ClientConnection.open(
                        self.host,
                        self.port,
                        client_id=self.client_id,
                        limits=self.limits,
                        tls=self.tls,
                        credentials=self._credentials,
                    ),
                    self.timeout_ms / 1000,
                )
            except (AuthenticationFailed, TlsFailed):
                raise  # the same credentials or certificates would be refused again
            except ConnectFailed as error:
                last_error = error
                continue
            except TimeoutError:
                last_error = ConnectFailed(f"connecting to {self.address} timed out")
                continue
            self._connection = connection
            return connection
        raise ConnectFailed(
            f"{last_error.message} (after {self.reconnect_attempts_max} attempts)", code=last_error.code
        )

    async def _call(
        self,
        message: m.Request,
        timeout_ms: int | None,
        *,
        retry: bool = False,
        records: bytes | memoryview | None = None,
        extra_ms: int = 0,
    ) -> m.Response:
        """core.call() taking any response type (tests send raw requests with it)."""
        return await self.core.call(
            message, timeout_ms, expect=m.Response, retry=retry, records=records, extra_ms=extra_ms
        )

    # -- topics -------------------------------------------------------------------------

    async def create_topic(
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
        """Create a topic; returns the settings in force. None takes the server's default;
        retention_ms / retention_bytes UNLIMITED (-1) keeps messages for ever. ttl_ms:
        the default message TTL (0: none); dedup_window_ms: how long an idempotency key
        is remembered for publish dedup (0: off; the server's default is 2 minutes);
        delete_retention_ms: on a compacted topic, how long a tombstone stays after a
        compaction pass first saw it (the server's default is its [compaction] setting).
        cleanup_policy: "delete", "compact" or "compact,delete"; fsync_policy: "always",
        "interval" or "never"; timestamp_type: "create" (the producer's timestamps
        stand) or "log-append" (every record gets the broker's time of the append).
        TopicExists when the name is taken, unless exist_ok: then
        it returns the existing topic's settings, which may differ from those asked for
        (compare them if that matters; nothing is changed)."""

        settings = settings_to_wire(locals())  # its parameters: one per topic setting
        try:
            created = await self._create_topic_call(name, settings, timeout_ms)
        except TopicExists:
            if not exist_ok:
                raise
            return (await self.describe_topic(name, timeout_ms=timeout_ms)).settings
        self.core.remember_partition_count(name, created.partitions)
        self._topic_ttls[name] = created.ttl_ms
        return settings_from_wire(created)

    async def _create_topic_call(self, name: str, settings: m.TopicSettings, timeout_ms: int | None) -> m.TopicSettings:
        """CreateTopic version 2; to a server of protocol version 4 or older, version 1,
        refusing (InvalidConfig, nothing sent) a setting that version cannot carry."""
        try:
            response = await self.core.call(
                m.CreateTopicRequest(name=name, settings=settings), timeout_ms, expect=m.CreateTopicResponse
            )
            return response.settings
        except ProtocolViolation as error:  # refused before sending: an older server
            if error.code != ErrorCode.UNSUPPORTED_VERSION:
                raise
        asked = [
            setting.name
            for setting in TOPIC_SETTINGS
            if setting.wire_version > 1 and getattr(settings, setting.name) not in (None, m.CONFIG_DEFAULT)
        ]
        if asked:
            raise InvalidConfig(
                f"the server speaks protocol version 4 or older: it has no topic setting {', '.join(asked)}"
            )
        old = await self.core.call(
            m.CreateTopicRequestV1(name=name, settings=m.topic_settings_to_v1(settings)),
            timeout_ms,
            expect=m.CreateTopicResponseV1,
        )
        return _settings_of_an_older_server(old.settings)

    async def delete_topic(self, name: str, *, missing_ok: bool = False, timeout_ms: int | None = None) -> None:
        """Delete a topic and its data. UnknownTopic when there is none, unless
        missing_ok."""
        self.core.forget_partition_count(name)
        self._topic_ttls.pop(name, None)
        try:
            await self.core.call(m.DeleteTopicRequest(name=name), timeout_ms, expect=m.DeleteTopicResponse)
        except UnknownTopic:
            if not missing_ok:
                raise
        self.core.forget_partition_count(name)
        self._topic_ttls.pop(name, None)

    async def list_topics(self, *, timeout_ms: int | None = None) -> list[TopicSummary]:
        """Every topic as (name, partitions), sorted by name."""
        response = await self.core.call(m.ListTopicsRequest(), timeout_ms, retry=True, expect=m.ListTopicsResponse)
        return [TopicSummary(topic.name, topic.partitions) for topic in response.topics]

    async def describe_topic(self, name: str, *, timeout_ms: int | None = None) -> TopicDescription:
        """A topic's settings and each partition's offsets and size."""
        response: m.DescribeTopicResponse | m.DescribeTopicResponseV1
        try:
            response = await self.core.call(
                m.DescribeTopicRequest(name=name), timeout_ms, retry=True, expect=m.DescribeTopicResponse
            )
            settings = response.settings
        except ProtocolViolation as error:  # refused before sending: a server of protocol 4 or older
            if error.code != ErrorCode.UNSUPPORTED_VERSION:
                raise
            response = await self.core.call(
                m.DescribeTopicRequestV1(name=name), timeout_ms, retry=True, expect=m.DescribeTopicResponseV1
            )
            settings = _settings_of_an_older_server(response.settings)
        self.core.remember_partition_count(name, len(response.partitions))
        self._topic_ttls[name] = settings.ttl_ms
        return TopicDescription(
            name=response.name,
            settings=settings_from_wire(settings),
            partitions=tuple(
                PartitionDescription(
                    partition=state.partition,
                    log_start_offset=state.log_start_offset,
                    log_end_offset=state.log_end_offset,
                    high_watermark=state.high_watermark,
                    size=state.size_bytes,
                    segments=state.segments,
                )
                for state in response.partitions
            ),
        )

    async def partition_count(self, topic: str, *, refresh: bool = False, timeout_ms: int | None = None) -> int:
        """The topic's partition count, cached after the first DescribeTopic."""
        count = None if refresh else self.core.partition_count_cached(topic)
        if count is None:
            count = (await self.describe_topic(topic, timeout_ms=timeout_ms)).partition_count
        return count

    def cached_partition_count(self, topic: str) -> int | None:
        return self.core.partition_count_cached(topic)

    def choose_partition(self, topic: str, key: bytes | None, partitions: int) -> int:
        """xxh32(key) % partitions for a key; round-robin without one."""
        if key is not None:
            return partition_for_key(key, partitions)
        counter = self._round_robin.get(topic)
        if counter is None:
            counter = self._round_robin[topic] = itertools.count(random.randrange(partitions))
        return next(counter) % partitions

    # -- produce and fetch --------------------------------------------------------------

    async def produce(
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
        """Append one message; (partition, offset) once acknowledged (offset -1 with acks
        "none"). The partition: `partition` when given, else xxh32(key) % partitions,
        else round-robin. acks "none" (answered before the write), "written" (in the
        page cache) or "durable" (fsynced; the default). Not retried: a ConnectionLost
        means it may or may not have been written. For throughput use producer().

        Broker features (reserved headers, docs/guarantees.md): ttl_ms (expires that
        long after its timestamp), delay_ms or deliver_at (a datetime: queue groups
        deliver it then), idempotency_key (str or bytes: within the topic's dedup window
        a second message with the same key is not written, and the call returns the
        original's (partition, offset)). Headers of your own must not start with "nodi-"."""
        key_bytes = to_bytes(key, "key")
        record = NewRecord(
            key_bytes,
            to_bytes(value),
            with_features(
                to_headers(headers),
                ttl_ms=ttl_ms,
                delay_ms=delay_ms,
                deliver_at=deliver_at,
                idempotency_key=idempotency_key,
            ),
            None if timestamp is None else timestamp_ms_of(timestamp),
        )
        batch = build_one(record, f"produce to {topic}")
        acks_wire = acks_value(acks)
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        async with self.core.deadline(timeout, "Produce"):
            for refreshed in (False, True):
                chosen = partition
                if chosen is None:
                    count = await self.partition_count(topic, refresh=refreshed)
                    chosen = self.choose_partition(topic, key_bytes, count)
                try:
                    # Inside this call's deadline: produce_batch's own would end at the same time.
                    response = await self._produce_batch(topic, chosen, batch, acks_wire, timeout, False)
                except UnknownPartition:
                    if partition is not None or refreshed:
                        raise
                    continue  # the topic changed: describe it again
                if response.duplicates:  # publish dedup: the original
                    return response.duplicates[0].partition, response.duplicates[0].offset
                return chosen, response.base_offset
        raise AssertionError("unreachable")

    async def produce_batch(
        self,
        topic: str,
        partition: int,
        batch: bytes | bytearray | memoryview,
        *,
        acks: str | int = "durable",
        timeout_ms: int | None = None,
        retry: bool = False,
    ) -> m.ProduceResponse:
        """Send whole RecordBatch v2 bytes (storage.records.build_batch) as they are; the
        server's ProduceResponse. `retry` re-sends after a ConnectionLost (only safe for
        an idempotent producer's batches). With publish dedup, `duplicates` names the
        records written before (nothing else was written); PartlyDuplicate, carrying
        them, when only some were."""
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        acks_wire = acks_value(acks)
        async with self.core.deadline(timeout, "Produce"):
            return await self._produce_batch(topic, partition, batch, acks_wire, timeout, retry)

    async def _produce_batch(
        self,
        topic: str,
        partition: int,
        batch: bytes | bytearray | memoryview,
        acks: int,
        timeout_ms: int,
        retry: bool,
    ) -> m.ProduceResponse:
        """produce_batch() inside the caller's deadline (of `timeout_ms`)."""
        request = m.ProduceRequest(
            topic=topic, partition=partition, acks=m.Acks(acks), timeout_ms=timeout_ms, records=b""
        )
        response = await self.core.send(request, records=batch, retry=retry, expect=m.ProduceResponse)
        if response.error_code == ErrorCode.PARTLY_DUPLICATE:
            error = error_for(response.error_code, response.error_message)
            assert isinstance(error, PartlyDuplicate)
            error.duplicates = tuple(response.duplicates)
            raise error
        return check_error_code(response)

    async def fetch(
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
        """Messages of one partition from `offset` on: whole batches up to about
        `bytes_max` (at least one batch), waiting up to `wait_ms` for `min_bytes` when
        there is nothing yet. Empty at the end of the log. OffsetOutOfRange below the
        log start or past its end. Expired messages (Message.expires_at passed) are
        left out unless include_expired."""
        messages, _, _, _ = await self.fetch_counted(
            topic,
            partition,
            offset,
            bytes_max=bytes_max,
            wait_ms=wait_ms,
            min_bytes=min_bytes,
            include_expired=include_expired,
            timeout_ms=timeout_ms,
        )
        return messages

    async def fetch_with_position(
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
        """fetch(), plus the offset to fetch next: past every batch returned (records
        removed by compaction leave gaps), `offset` when nothing came."""
        messages, position, _, _ = await self.fetch_counted(
            topic,
            partition,
            offset,
            bytes_max=bytes_max,
            wait_ms=wait_ms,
            min_bytes=min_bytes,
            include_expired=include_expired,
            timeout_ms=timeout_ms,
        )
        return messages, position

    async def fetch_counted(
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
        """fetch_with_position(), plus how many expired messages and how many
        undecodable batches (logged, see decode_fetched) were left out."""
        request = m.FetchRequest(
            topic=topic, partition=partition, offset=offset, bytes_max=bytes_max, wait_ms=wait_ms, min_bytes=min_bytes
        )
        response = await self.core.call(
            request, timeout_ms, retry=True, extra_ms=max(wait_ms, 0), expect=m.FetchResponse
        )
        return await self._fetched(topic, partition, offset, response.records, include_expired, timeout_ms)

    async def fetch_committing(
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
        """fetch_counted() with the group's `offsets` committed by the same request
        (Fetch version 2, protocol version 4): the commits ride on the fetch. With
        `commit_wait` the server answers as soon as the commits are durable (no long
        poll). Returns the fetch's outcome and the commits' (per partition: None when
        committed, else its error), each an error of its own when it failed as a whole.
        Raises ProtocolViolation (UNSUPPORTED_VERSION), before sending anything, to a
        server of protocol version 3 or older; ConnectionLost and Timeout when no answer came (the commits
        may or may not have been made)."""
        request = m.FetchCommitRequest(
            topic=topic,
            partition=partition,
            offset=offset,
            bytes_max=bytes_max,
            wait_ms=wait_ms,
            group=group,
            generation=generation,
            member_id=member_id,
            commits=[
                m.OffsetCommit(topic=key[0], partition=key[1], offset=value) for key, value in sorted(offsets.items())
            ],
            commit_wait=commit_wait,
        )
        async with self.core.deadline(timeout_ms, "Fetch", extra_ms=0 if commit_wait else max(wait_ms, 0)):
            response = await self.core.send(request, expect=m.FetchCommitResponse)
        commits: dict[tuple[str, int], NodiClientError | None] | NodiClientError
        if response.commit_error_code != ErrorCode.NONE:
            commits = error_for(response.commit_error_code, response.commit_error_message)
        else:
            commits = {
                (result.topic, result.partition): None if result.error_code == 0 else error_for(result.error_code, None)
                for result in response.commit_results
            }
        fetched: tuple[list[Message], int, int, int] | NodiClientError
        if response.error_code != ErrorCode.NONE:
            fetched = error_for(response.error_code, response.error_message)
        else:
            try:
                fetched = await self._fetched(topic, partition, offset, response.records, include_expired, timeout_ms)
            except NodiClientError as error:  # the topic's TTL could not be read
                fetched = error
        return fetched, commits

    async def _fetched(
        self,
        topic: str,
        partition: int,
        offset: int,
        records: bytes | memoryview,
        include_expired: bool,
        timeout_ms: int | None,
    ) -> tuple[list[Message], int, int, int]:
        """A fetch response's records decoded, expired messages left out."""
        messages, position, undecodable = decode_fetched(topic, partition, offset, records)
        self.undecodable_batches_skipped += undecodable
        if not messages:
            return messages, position, 0, undecodable
        ttl_ms = self._topic_ttls.get(topic)
        if ttl_ms is None:
            ttl_ms = (await self.describe_topic(topic, timeout_ms=timeout_ms)).settings.ttl_ms
        messages, expired = drop_expired(messages, ttl_ms, include_expired)
        return messages, position, expired, undecodable

    async def list_offsets(
        self,
        topic: str,
        partition: int,
        spec: str | int | _datetime.datetime = "latest",
        *,
        timeout_ms: int | None = None,
    ) -> int:
        """ "earliest": the first offset still stored; "latest": the high watermark (the
        next offset to be read); a time (datetime, or ms since the epoch as an int): the
        first offset whose timestamp is at or after it, or the high watermark."""
        if spec == "earliest":
            request = m.ListOffsetsRequest(topic=topic, partition=partition, spec=m.OffsetSpec.EARLIEST)
        elif spec == "latest":
            request = m.ListOffsetsRequest(topic=topic, partition=partition, spec=m.OffsetSpec.LATEST)
        else:
            if isinstance(spec, str):
                raise ValueError(f'spec must be "earliest", "latest" or a time, not {spec!r}')
            request = m.ListOffsetsRequest(
                topic=topic, partition=partition, spec=m.OffsetSpec.TIMESTAMP, timestamp_ms=timestamp_ms_of(spec)
            )
        response = await self.core.call(request, timeout_ms, retry=True, expect=m.ListOffsetsResponse)
        return response.offset

    async def resolve_start(
        self, topic: str, partition: int, start: StartSpec, *, timeout_ms: int | None = None
    ) -> int:
        """The offset a reader starting at `start` begins at."""
        check_start(start)
        if isinstance(start, int):
            return start
        return await self.list_offsets(topic, partition, start, timeout_ms=timeout_ms)

    async def init_producer_id(
        self, producer_id: int = -1, producer_epoch: int = -1, *, timeout_ms: int | None = None
    ) -> tuple[int, int]:
        """A new (producer id, epoch) for an idempotent producer; with a known id, its
        next epoch (fencing older ones)."""
        response = await self.core.call(
            m.InitProducerIdRequest(producer_id=producer_id, producer_epoch=producer_epoch),
            timeout_ms,
            expect=m.InitProducerIdResponse,
        )
        return response.producer_id, response.producer_epoch

    # -- consumer groups ----------------------------------------------------------------

    async def list_groups(self, *, timeout_ms: int | None = None) -> list[GroupSummary]:
        response = await self.core.call(m.ListGroupsRequest(), timeout_ms, retry=True, expect=m.ListGroupsResponse)
        return [GroupSummary(group.group, group.state, group.members) for group in response.groups]

    async def describe_handovers(self, group: str, *, timeout_ms: int | None = None) -> GroupHandovers:
        """The group's rebalances and partition handovers since the broker started.
        UnknownGroup when the broker knows no such group; the server must speak
        protocol version 2."""
        response = await self.core.call(
            m.DescribeHandoversRequest(group=group), timeout_ms, retry=True, expect=m.DescribeHandoversResponse
        )
        return GroupHandovers(
            rebalances=response.rebalances,
            partitions_moved=response.partitions_moved,
            handovers=response.handovers,
            handovers_forced=response.handovers_forced,
            handover_ms_total=response.handover_ms_total,
            handover_ms_max=response.handover_ms_max,
            partitions_revoking=response.partitions_revoking,
            messages_redelivered=response.messages_redelivered,
        )

    async def describe_group(self, group: str, *, timeout_ms: int | None = None) -> GroupDescription:
        """Members with their partitions, and per partition the committed offset, the
        high watermark and the lag. UnknownGroup when the group has neither."""
        response = await self.core.call(
            m.DescribeGroupRequest(group=group), timeout_ms, retry=True, expect=m.DescribeGroupResponse
        )
        return GroupDescription(
            group=response.group,
            state=response.state,
            generation=response.generation,
            members=tuple(
                GroupMemberDescription(
                    member_id=member.member_id,
                    client_id=member.client_id,
                    session_timeout_ms=member.session_timeout_ms,
                    assignments={entry.topic: list(entry.partitions) for entry in member.assignments},
                )
                for member in response.members
            ),
            lags=tuple(
                PartitionLag(
                    topic=lag.topic,
                    partition=lag.partition,
                    committed_offset=None if lag.committed_offset < 0 else lag.committed_offset,
                    high_watermark=lag.high_watermark,
                )
                for lag in response.lags
            ),
        )

    async def reset_group(
        self,
        group: str,
        topic: str,
        to: StartSpec = "earliest",
        *,
        partitions: Iterable[int] | None = None,
        timeout_ms: int | None = None,
    ) -> dict[int, int]:
        """Move an empty group's committed offsets in `topic` (every partition, or
        `partitions`) to "earliest", "latest", an offset or a time (replay). Returns
        partition -> the offset now committed. GroupNotEmpty while it has members."""
        check_start(to)
        if to == "earliest":
            spec, offset, timestamp = m.ResetSpec.EARLIEST, m.NO_OFFSET, m.NO_OFFSET
        elif to == "latest":
            spec, offset, timestamp = m.ResetSpec.LATEST, m.NO_OFFSET, m.NO_OFFSET
        elif isinstance(to, int):
            spec, offset, timestamp = m.ResetSpec.OFFSET, to, m.NO_OFFSET
        else:
            assert not isinstance(to, str)  # check_start refused any other string
            spec, offset, timestamp = m.ResetSpec.TIMESTAMP, m.NO_OFFSET, timestamp_ms_of(to)
        request = m.ResetGroupRequest(
            group=group,
            topic=topic,
            partitions=sorted(set(partitions or ())),
            spec=spec,
            offset=offset,
            timestamp_ms=timestamp,
        )
        response = await self.core.call(request, timeout_ms, expect=m.ResetGroupResponse)
        return {entry.partition: entry.offset for entry in response.offsets}

    async def commit_offsets(
        self,
        group: str,
        offsets: dict[tuple[str, int], int],
        *,
        generation: int = -1,
        member_id: str = "",
        metadata: dict[tuple[str, int], str | None] | None = None,
        timeout_ms: int | None = None,
    ) -> dict[tuple[str, int], NodiClientError | None]:
        """Commit (topic, partition) -> the next offset to read, with (topic, partition) ->
        `metadata` text stored beside it (at most the broker's offset_metadata_bytes_max).
        Without a generation and member id (a consumer outside group membership) the
        group must have no members. Returns each partition's error (None: committed)."""
        texts = metadata or {}
        request = m.CommitOffsetsRequest(
            group=group,
            generation=generation,
            member_id=member_id,
            offsets=[
                m.OffsetCommit(topic=topic, partition=partition, offset=offset, metadata=texts.get((topic, partition)))
                for (topic, partition), offset in sorted(offsets.items())
            ],
        )
        response = await self.core.call(request, timeout_ms, expect=m.CommitOffsetsResponse)
        return {
            (result.topic, result.partition): None if result.error_code == 0 else error_for(result.error_code, None)
            for result in response.results
        }

    async def fetch_offsets(
        self, group: str, topics: Sequence[str] = (), *, timeout_ms: int | None = None
    ) -> dict[tuple[str, int], int]:
        """The group's committed offsets (the next offset to read), of `topics` or all."""
        response = await self.core.call(
            m.FetchOffsetsRequest(group=group, topics=list(topics)),
            timeout_ms,
            retry=True,
            expect=m.FetchOffsetsResponse,
        )
        return {(entry.topic, entry.partition): entry.offset for entry in response.offsets}

    async def fetch_committed(
        self, group: str, topics: Sequence[str] = (), *, timeout_ms: int | None = None
    ) -> dict[tuple[str, int], tuple[int, str | None]]:
        """As fetch_offsets, with the metadata text committed beside each offset."""
        response = await self.core.call(
            m.FetchOffsetsRequest(group=group, topics=list(topics)),
            timeout_ms,
            retry=True,
            expect=m.FetchOffsetsResponse,
        )
        return {(entry.topic, entry.partition): (entry.offset, entry.metadata) for entry in response.offsets}

    # -- operations -------------------------------------------------------------------

    async def server_status(self, *, timeout_ms: int | None = None) -> ServerStatus:
        """Server-level facts: version, uptime, data directory, connections, disk space,
        read-only and damaged partitions."""
        response = await self.core.call(m.ServerStatusRequest(), timeout_ms, retry=True, expect=m.ServerStatusResponse)
        return ServerStatus(
            server_id=response.server_id,
            version=response.version,
            started_time_ms=response.started_time_ms,
            uptime_ms=response.uptime_ms,
            data_dir=response.data_dir,
            connections_open=response.connections_open,
            connections_accepted=response.connections_accepted,
            connections_refused=response.connections_refused,
            disk_free_bytes=None if response.disk_free_bytes < 0 else response.disk_free_bytes,
            disk_total_bytes=None if response.disk_total_bytes < 0 else response.disk_total_bytes,
            read_only_partitions={entry.topic: list(entry.partitions) for entry in response.read_only_partitions},
            metadata_store_error=response.metadata_store_error,
            metadata_failed_commits=response.metadata_failed_commits,
            damaged_partitions=tuple(
                DamagedPartition(entry.topic, entry.partition, entry.path, entry.position, entry.offset, entry.reason)
                for entry in response.damaged_partitions
            ),
        )

    async def compact_topic(self, name: str, *, timeout_ms: int | None = None) -> list[m.PartitionCompaction]:
        """Seal each partition's active segment and compact every partition of a
        compacted topic now; what each run did, by partition. A big topic takes a
        while: pass a timeout_ms to match (the client's default otherwise)."""
        timeout_ms = self.timeout_ms if timeout_ms is None else timeout_ms
        response = await self.core.call(
            m.CompactTopicRequest(name=name, timeout_ms=timeout_ms), timeout_ms, expect=m.CompactTopicResponse
        )
        return list(response.partitions)

    async def delete_records(
        self, offsets: Mapping[tuple[str, int], int], *, timeout_ms: int | None = None
    ) -> dict[tuple[str, int], int]:
        """Delete every record below `offsets[(topic, partition)]` for good (Kafka's
        DeleteRecords): the partition's log start offset moves forward to it, reads
        below it answer OffsetOutOfRange, whole segments below it are removed. The
        offset may be at most the high watermark; -1 means the high watermark (every
        record now readable). An offset at or below the log
        start changes nothing. Needs admin permission on each topic.

        Returns each partition's log start offset afterwards. When a partition fails
        (OffsetOutOfRange above the high watermark, UnknownPartition, ...) the others
        are still done, and the first failure is raised once all are."""
        timeout_ms = self.timeout_ms if timeout_ms is None else timeout_ms
        by_topic: dict[str, list[m.RecordDeletion]] = {}
        for (topic, partition), offset in offsets.items():
            by_topic.setdefault(topic, []).append(m.RecordDeletion(partition=partition, offset=offset))
        starts: dict[tuple[str, int], int] = {}
        failure: NodiClientError | None = None
        for topic, deletions in by_topic.items():
            response = await self.core.call(
                m.DeleteRecordsRequest(topic=topic, partitions=deletions, timeout_ms=timeout_ms),
                timeout_ms,
                expect=m.DeleteRecordsResponse,
            )
            for result in response.partitions:
                if result.error_code == ErrorCode.NONE:
                    starts[(topic, result.partition)] = result.log_start_offset
                elif failure is None:
                    failure = error_for(result.error_code, f"{topic}-{result.partition}: {result.error_message}")
        if failure is not None:
            raise failure
        return starts

    # -- producers and consumers --------------------------------------------------------

    def producer(self, **options: Any) -> AsyncProducer:
        """An AsyncProducer that batches (see producer.py for the options)."""
        from .producer import AsyncProducer

        return AsyncProducer(self, **options)

    def consumer(self, topics, group: str | None = None, **options: Any) -> AsyncConsumer:
        """An AsyncConsumer (see consumer.py for the options); `async with` it or call
        `start()` before `poll()`."""
        from .consumer import AsyncConsumer

        return AsyncConsumer(self, topics, group, **options)

    def queue(self, topic: str, group: str, **options: Any) -> AsyncQueue:
        """An AsyncQueue of queue group `group` on `topic` (see client/queue.py for the
        options: ack_wait_ms, max_deliveries, backoff, dead_letter_topic, batch_max (None:
        sized from the handler's pace), prefetch, max_outstanding, max_lease_ms)."""
        from .queue import AsyncQueue

        return AsyncQueue(self, topic, group, **options)

    async def request(
        self, topic: str, value, *, key=None, headers=None, partition: int | None = None, timeout_ms: int | None = None
    ) -> Message:
        """Send `value` to `topic` as a request and return the reply (a Message): a
        responder receives it from a queue group and calls message.reply(...). Raises
        RequestTimeout when no reply comes within timeout_ms (see client/request.py)."""
        from .request import requester_of

        return await requester_of(self).request(
            topic, value, key=key, headers=headers, partition=partition, timeout_ms=timeout_ms
        )

    async def describe_queue(self, topic: str, group: str, *, timeout_ms: int | None = None):
        """A queue group's settings and per partition its ack floor and window
        (queue_client.QueueDescription). UnknownQueueGroup when it never received."""
        from .queue import describe_queue

        return await describe_queue(self, topic, group, timeout_ms)

    async def queue_leases(
        self,
        topic: str,
        group: str,
        *,
        partition: int | None = None,
        after: tuple[int, int] | None = None,
        limit: int = 100,
        timeout_ms: int | None = None,
    ):
        """A page of a queue group's in-flight messages by partition and offset
        (queue.QueueLeasePage): leases with their deadlines, retries with their due time,
        dead letters being written. Page on with after=page.next_after. Needs a server of
        protocol version 4."""
        from .queue import queue_leases

        return await queue_leases(
            self, topic, group, partition=partition, after=after, limit=limit, timeout_ms=timeout_ms
        )

    async def list_queues(self, topic: str | None = None, *, timeout_ms: int | None = None):
        """Every queue group (of `topic`, or of all) with its dead-letter topic and
        window totals (queue_client.QueueSummary)."""
        from .queue import list_queues

        return await list_queues(self, topic, timeout_ms)


def _settings_of_an_older_server(settings: m.TopicSettingsV1) -> m.TopicSettings:
    """A version-1 answer as TopicSettings: a setting it has no field for is one that
    server does not have, so its topics behave as the setting's default says
    (timestamp_type "create": the producer's timestamps stand)."""
    newer = {setting.name: setting.default for setting in TOPIC_SETTINGS if setting.wire_version > 1}
    return dataclasses.replace(m.topic_settings_from_v1(settings), **newer)


def decode_fetched(
    topic: str, partition: int, offset: int, records: bytes | memoryview
) -> tuple[list[Message], int, int]:
    """Messages at or after `offset` in fetched batches (the one codec:
    storage.records), the offset after the last batch, and how many batches were left
    out: a batch whose CRC holds but whose records do not decode (stored before the
    broker walked records on produce) is skipped and logged, and the messages before
    and after it are still returned (docs/fault-model.md "Undecodable batches")."""
    messages: list[Message] = []
    position = offset
    undecodable = 0
    if not records:
        return messages, position, undecodable
    append = messages.append
    make = new_message
    try:
        for header, batch in iter_batches(records):
            position = max(position, header.last_offset + 1)
            try:
                decoded = decode_records(batch, header)
            except NodiError as error:
                undecodable += 1
                log.warning(
                    "fetch from %s-%d: skipping offsets %d..%d: the stored batch does not decode (%s)",
                    topic,
                    partition,
                    header.base_offset,
                    header.last_offset,
                    error,
                )
                continue
            for record_offset, timestamp_ms, key, value, headers in decoded:
                if record_offset >= offset:
                    append(make(topic, partition, record_offset, timestamp_ms, key, value, headers))
    except NodiError as error:  # a batch that fails its CRC: the response cannot be trusted
        raise InvalidRecords(f"fetched from {topic}-{partition} at {offset}: {error}") from None
    return messages, position, undecodable
