"""The broker inside the caller's process: a data directory served to in-process clients
(the embedded mode, `nodi.broker.open`), with no listener, no frames and no codec.

LocalBroker.open(config) takes the data directory the way `nodi serve` does (its lock
first, so a second opener, in this process or another, is refused with
DataDirectoryLockedError naming the holder's PID, having touched nothing), then starts
the broker's background jobs on the running loop, in one TaskGroup: lease expiry and the
queue timer, group sessions, the metadata retry, idle inboxes, retention, compaction,
closing idle partitions.

With `attach=True` the owner also serves the wire protocol on a Unix socket,
DATA_DIR/nodi.sock (mode 0600: this user's processes only), for other processes that
open the same directory (client/embedded.py attaches them): the same ClientSession as a
TCP connection of `nodi serve` (server.py), with its limits and deadlines. The socket
is bound and listening in the same step that takes the lock, before recovery, so a
process that finds the lock taken and no socket knows the holder is no embedded owner
(a `nodi serve`, an offline tool, or an owner that does not offer attaching); one that
connects while the owner recovers is answered once it is ready. The socket file is only
ever unlinked by the lock's holder: a stale one (its owner died) is replaced by the next
owner, and connecting to it is refused (ECONNREFUSED) meanwhile.

handle(request, records) hands the request object the client built to Broker.handle (the
same dispatch a server connection uses) and returns the response object: nothing is
encoded or decoded. A request's records ride in its `records` field; a reply's file
slices (a fetch, a queue receive) are read into the response's `records` field, checked
as the server checks them before sending. Requests run as tasks of their own, at most
in_flight_requests_max at once (the server's per-connection limit; more wait for a
slot), so a caller that gives up (its timeout) never cancels a handler half way, as a
client that goes away never cancels the server's.

close() does what a server's clean stop does: requests in flight (in process and from
attached processes) get shutdown_grace_ms, attached connections are told
SERVER_SHUTTING_DOWN and closed and the socket file is removed, then the background
jobs stop, a compaction run's thread ends, queue state is staged, and
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
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from nodi.storage.lock import DataDirectoryLock
from nodi.storage.store import Store

from ..protocol import messages as m
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.schema import schema_of
from .clock import SYSTEM_CLOCK, Clock
from .config import ServerConfig
from .idle_close_job import run_idle_close_job
from .reply import RECORDS_FIELD, Reply, error_reply, response_with_buffers
from .retention_job import run_retention_job
from .server import Server
from .service import Broker
from .session_reader import session_protocol_factory

log = logging.getLogger("nodi.embedded")

MessageT = TypeVar("MessageT", m.Request, m.Response)
# The attach socket, in the data directory (docs/storage-format.md lists the files).
ATTACH_SOCKET = "nodi.sock"
ATTACH_SOCKET_MODE = 0o600
# sun_path holds 108 bytes with its terminating NUL: a longer path cannot be bound, and
# the owner then offers no attaching (logged).
UNIX_PATH_BYTES_MAX = 107
ATTACH_BACKLOG = 128

# A reply's file slices shorter than this are read on the loop (page cache, like the
# server's small sends); longer ones in a thread.
READ_ON_LOOP_BYTES_MAX = 64 * 1024


@dataclass(frozen=True, slots=True)
class LocalBrokerStatistics:
    """What SERVER_STATUS reports of an embedded broker (the server's figures that have
    a meaning here: one in-process client, never refused)."""

    started_time_ms: int
    uptime_ms: int
    connections_open: int  # the in-process client (1 while open) and attached processes
    connections_accepted: int
    connections_refused: int  # attached processes over connections_max
    requests_in_flight: int  # in process


class LocalBroker:
    """See the module docstring. Made by `await LocalBroker.open(config)`, on the loop
    that will call handle() and close()."""

    def __init__(self, config: ServerConfig, store: Store, broker: Broker, attach_socket: socket.socket | None) -> None:
        self.config = config
        self.store = store
        self.broker = broker
        # Attached processes: served by a Server's sessions (server.py) that never listens
        # on TCP; its accept and shutdown steps are the server's own.
        self._attach_socket = attach_socket
        self._attach = Server(config, clock=broker.clock)
        self._attach.store = store
        self._attach.broker = broker
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
    async def open(cls, config: ServerConfig, *, attach: bool = False, clock: Clock = SYSTEM_CLOCK) -> LocalBroker:
        """Lock, recover and open config.data_dir, and start the background jobs (and,
        with `attach`, the attach socket); the broker reads its deadlines from `clock`
        (broker/server/clock.py: tests give a ManualClock). DataDirectoryLockedError when another process
        (or another open in this one) holds the directory. A cancel while the lock is
        taken or the store opens (in a thread) lets go of what the thread took once it
        is done, so the lock is never left held."""
        loop = asyncio.get_running_loop()
        taking = loop.run_in_executor(None, _lock_and_bind, config.data_dir, attach)
        try:
            lock, attach_socket = await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(_release_taken)
            raise
        opening = loop.run_in_executor(None, lambda: Store.open(config.data_dir, lock=lock, clock_ms=clock.time_ms))
        try:
            store = await asyncio.shield(opening)
        except BaseException as error:
            if attach_socket is not None:
                attach_socket.close()  # the file stays: only a lock holder unlinks it
            if isinstance(error, asyncio.CancelledError):
                opening.add_done_callback(_close_opened_store)
            raise  # a failed open released the lock itself
        try:
            for line in store.open_report.lines():
                log.warning("%s", line)
            for line in store.open_report.error_lines():
                log.error("%s", line)
            local = cls(config, store, Broker(store, config, clock), attach_socket)
        except BaseException:
            if attach_socket is not None:
                attach_socket.close()
            await asyncio.to_thread(store.close)
            raise
        started = loop.create_future()
        local._runner = loop.create_task(local._run(started), name="nodi-embedded-broker")
        try:
            await started
        except BaseException:  # the jobs did not start: close what is open, lock last
            await local.close()
            raise
        return local

    @property
    def attach_path(self) -> str | None:
        """The attach socket's path while it is served, else None."""
        if self._attach_socket is None:
            return None
        return attach_socket_path(self.config.data_dir)

    @property
    def closed(self) -> bool:
        """True once close() began, or the background jobs failed (a bug)."""
        return self._closing or self._failure is not None

    def statistics(self) -> LocalBrokerStatistics:
        attached = self._attach.statistics()
        return LocalBrokerStatistics(
            started_time_ms=self._started_time_ms,
            uptime_ms=int((time.monotonic() - self._started_monotonic) * 1000),
            connections_open=(0 if self.closed else 1) + attached.connections_open,
            connections_accepted=1 + attached.connections_accepted,
            connections_refused=attached.connections_refused,
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
                # As `nodi serve`: a partition unused for partition_idle_close_ms is closed.
                tasks.create_task(
                    run_idle_close_job(self.store, self.config.partition_idle_close_ms, lambda: self._closing)
                )
                if self._attach_socket is not None:
                    attach = self._attach
                    # As the server's TCP listener: sessions read through SessionReader.
                    attach._listener = await loop.create_unix_server(
                        session_protocol_factory(lambda reader, writer: attach._accept(tasks, reader, writer), loop),
                        sock=self._attach_socket,
                    )
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
            return response_with_buffers(reply)
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
        if self._attach._listener is not None:
            await self._attach._shutdown()  # attached processes: grace, SERVER_SHUTTING_DOWN, closed
        if self._attach_socket is not None:
            with contextlib.suppress(OSError):
                os.unlink(attach_socket_path(self.config.data_dir))  # the lock is still held
            self._attach_socket.close()
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


def attach_socket_path(data_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.path.abspath(os.fspath(data_dir)), ATTACH_SOCKET)


def _lock_and_bind(data_dir: str, attach: bool) -> tuple[DataDirectoryLock, socket.socket | None]:
    """Take the directory's lock and, with `attach`, bind and listen on its attach
    socket at once (replacing a stale socket file: only the lock's holder may). A path
    too long for a Unix socket offers no attaching (logged)."""
    lock = DataDirectoryLock.acquire(data_dir)
    if not attach:
        return lock, None
    path = attach_socket_path(data_dir)
    if len(os.fsencode(path)) > UNIX_PATH_BYTES_MAX:
        log.warning(
            "%s is longer than a Unix socket path may be (%d bytes): other processes that open this "
            "directory are refused instead of attached",
            path,
            UNIX_PATH_BYTES_MAX,
        )
        return lock, None
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, ATTACH_SOCKET_MODE)
            sock.listen(ATTACH_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
    except BaseException:
        lock.release()
        raise
    return lock, sock


def _release_taken(taking: asyncio.Future) -> None:
    """After a cancelled open: let go of the lock (and socket) the thread took."""
    if taking.cancelled() or taking.exception() is not None:
        return
    lock, sock = taking.result()
    if sock is not None:
        sock.close()
    lock.release()


def _close_opened_store(opening: asyncio.Future) -> None:
    """After a cancelled open: close the store the thread opened (releasing the lock)."""
    if opening.cancelled() or opening.exception() is not None:
        return
    with contextlib.suppress(Exception):
        opening.result().close()


__all__ = ["ATTACH_SOCKET", "LocalBroker", "LocalBrokerStatistics", "attach_socket_path"]
