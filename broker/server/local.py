"""The broker inside the caller's process: a data directory served to in-process clients
(the embedded mode, `nodi.broker.open`), with no listener, no frames and no codec.

LocalBroker.open(config) takes the data directory the way `nodi serve` does (Store.open
locks it first, so a second opener, in this process or another, is refused with
DataDirectoryLockedError naming the holder's PID, having touched nothing), then starts
the broker's background jobs on the running loop, in one TaskGroup: lease expiry and the
queue timer, group sessions, the metadata retry, idle inboxes, retention, compaction.

handle(request, records) hands the request object the client built to Broker.handle (the
same dispatch a server connection uses) and returns the response object: nothing is
encoded or decoded. A request's records ride in its `records` field; a reply's file
slices (a fetch, a queue receive) are read into the response's `records` field, checked
as the server checks them before sending. Requests run as tasks of their own, at most
in_flight_requests_max at once (the server's per-connection limit; more wait for a
slot), so a caller that gives up (its timeout) never cancels a handler half way, as a
client that goes away never cancels the server's.

close() does what a server's clean stop does: requests in flight get shutdown_grace_ms,
then the background jobs stop, a compaction run's thread ends, queue state is staged, and
the store closes (every log fsynced and marked clean, the lock released last). A process
that ends without close() leaves the directory as a killed server would: the next open
recovers it, and no acknowledged message is lost (fsync `always` acknowledges only fsynced
bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from nodi.storage.store import Store

from ..protocol import messages as m
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.schema import schema_of
from .config import ServerConfig
from .reply import Reply, error_reply
from .retention_job import run_retention_job
from .service import Broker

log = logging.getLogger("nodi.embedded")

MessageT = TypeVar("MessageT", m.Request, m.Response)
# The field of a request or response that holds its record batches (schema.RECORDS).
RECORDS_FIELD = "records"

# A reply's file slices shorter than this are read on the loop (page cache, like the
# server's small sends); longer ones in a thread.
READ_ON_LOOP_BYTES_MAX = 64 * 1024


@dataclass(frozen=True, slots=True)
class LocalBrokerStatistics:
    """What SERVER_STATUS reports of an embedded broker (the server's figures that have
    a meaning here: one in-process client, never refused)."""

    started_time_ms: int
    uptime_ms: int
    connections_open: int  # 1 while open: the in-process client
    connections_accepted: int
    connections_refused: int
    requests_in_flight: int


class LocalBroker:
    """See the module docstring. Made by `await LocalBroker.open(config)`, on the loop
    that will call handle() and close()."""

    def __init__(self, config: ServerConfig, store: Store, broker: Broker) -> None:
        self.config = config
        self.store = store
        self.broker = broker
        self._slots = asyncio.Semaphore(config.protocol.in_flight_requests_max)
        self._requests: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._failure: BaseException | None = None
        self._closing = False
        self._closed = False
        self._started_time_ms = int(time.time() * 1000)
        self._started_monotonic = time.monotonic()
        broker.server_statistics = self.statistics

    @classmethod
    async def open(cls, config: ServerConfig) -> LocalBroker:
        """Lock, recover and open config.data_dir, and start the background jobs.
        DataDirectoryLockedError when another process (or another open in this one)
        holds the directory. A cancel while the store opens (in a thread) closes it
        when the thread is done, so the lock is never left held."""
        opening = asyncio.get_running_loop().run_in_executor(None, Store.open, config.data_dir)
        try:
            store = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened_store)
            raise
        try:
            for line in store.open_report.lines():
                log.warning("%s", line)
            for line in store.open_report.error_lines():
                log.error("%s", line)
            local = cls(config, store, Broker(store, config))
        except BaseException:
            await asyncio.to_thread(store.close)
            raise
        started = asyncio.get_running_loop().create_future()
        local._runner = asyncio.get_running_loop().create_task(local._run(started), name="nodi-embedded-broker")
        await started
        return local

    @property
    def closed(self) -> bool:
        """True once close() began, or the background jobs failed (a bug)."""
        return self._closing or self._failure is not None

    def statistics(self) -> LocalBrokerStatistics:
        return LocalBrokerStatistics(
            started_time_ms=self._started_time_ms,
            uptime_ms=int((time.monotonic() - self._started_monotonic) * 1000),
            connections_open=0 if self.closed else 1,
            connections_accepted=1,
            connections_refused=0,
            requests_in_flight=len(self._requests),
        )

    async def _run(self, started: asyncio.Future) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as tasks:
                self.broker.attach(loop, tasks)
                tasks.create_task(
                    run_retention_job(self.store, self.config.retention_check_interval_ms, lambda: self._closing)
                )
                tasks.create_task(self.broker.compaction.run_job())
                started.set_result(None)
                await self._stop.wait()
                raise _Stopped
        except* _Stopped:
            pass
        except* Exception as group:  # a bug in a job: requests are refused from now on
            self._failure = group.exceptions[0]
            log.error("embedded broker on %s failed", self.config.data_dir, exc_info=self._failure)
            if not started.done():
                started.set_exception(self._failure)

    # -- requests -------------------------------------------------------------------------

    async def handle(
        self, request: m.Request, records: bytes | bytearray | memoryview | None = None, client_id: str = ""
    ) -> m.Response:
        """The response to `request` (whatever its error code). `records`: the batches the
        request carries (copied unless bytes: the caller may reuse its buffer as soon as
        this returns). A closed broker answers SERVER_SHUTTING_DOWN."""
        if self.closed:
            return _shutting_down(request)
        if records is not None:
            try:
                request = _with_records(request, records, self.config.protocol.frame_bytes_max)
            except ProtocolError as error:
                return error_reply(request, error).response
        async with self._slots:
            if self.closed:
                return _shutting_down(request)
            task = asyncio.get_running_loop().create_task(self._serve(request, client_id))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)
            # Shielded: a caller that gives up does not cancel the handler half way.
            return await asyncio.shield(task)

    async def _serve(self, request: m.Request, client_id: str) -> m.Response:
        reply = await self.broker.handle(request, client_id)
        if not reply.slices:
            return reply.response
        try:
            if reply.records_bytes <= READ_ON_LOOP_BYTES_MAX:
                data = _read_slices(reply)
            else:
                data = await asyncio.to_thread(_read_slices, reply)
        except Exception as error:  # SegmentReadError: nothing of it is served
            return error_reply(request, error).response
        return _with_records(reply.response, data)

    # -- closing ----------------------------------------------------------------------------

    async def close(self) -> None:
        """A clean stop (see the module docstring); idempotent. Requests still running
        after shutdown_grace_ms are cancelled."""
        if self._closed:
            return
        self._closing = True
        self._closed = True
        requests = list(self._requests)
        if requests:
            _done, running = await asyncio.wait(requests, timeout=self.config.shutdown_grace_ms / 1000)
            if running:
                log.error("%d request(s) still running after the shutdown grace: cancelled", len(running))
                for task in running:
                    task.cancel()
                await asyncio.wait(running)
        self._stop.set()
        if self._runner is not None:
            await self._runner
        try:
            await self.broker.compaction.stop()  # a run's thread must end before the logs close
            try:
                self.broker.queues.stage_for_shutdown()  # a clean stop leaves no delivery in doubt
            except Exception:  # the metadata store reports itself; the next open counts them once
                log.exception("queue groups: staging their state at close failed")
        finally:
            await asyncio.to_thread(self.store.close)


class _Stopped(Exception):
    pass


def _shutting_down(request: m.Request) -> m.Response:
    error = ProtocolError(ErrorCode.SERVER_SHUTTING_DOWN, "the embedded broker is closed", closes_connection=False)
    return error_reply(request, error).response


def _with_records(message: MessageT, data: bytes | bytearray | memoryview, bytes_max: int | None = None) -> MessageT:
    """`message` carrying `data` (copied unless bytes) as its records field: the one
    field a frame sends after its header, which only some messages have. A request's
    records are held to `bytes_max` (frame_bytes_max), as a frame's are."""
    if not schema_of(type(message)).has_records:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, f"a {type(message).__name__} has no records field", closes_connection=False
        )
    if bytes_max is not None and len(data) > bytes_max:
        raise ProtocolError(
            ErrorCode.LIMIT_EXCEEDED,
            f"records of {len(data)} bytes exceed frame_bytes_max {bytes_max}",
            closes_connection=False,
        )
    fields: dict[str, Any] = {RECORDS_FIELD: data if isinstance(data, bytes) else bytes(data)}
    return dataclasses.replace(message, **fields)


def _read_slices(reply: Reply) -> bytes:
    if len(reply.slices) == 1:
        return reply.slices[0].read()
    return b"".join(piece.read() for piece in reply.slices)


def _close_opened_store(opening: asyncio.Future) -> None:
    """After a cancelled open: close the store the thread opened (releasing the lock)."""
    if opening.cancelled() or opening.exception() is not None:
        return
    with contextlib.suppress(Exception):
        opening.result().close()


__all__ = ["LocalBroker", "LocalBrokerStatistics"]
