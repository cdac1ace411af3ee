"""The asyncio server: one process, one event loop, uvloop when installed (a dependency on Linux).

Every task belongs to a TaskGroup: the server's own (connections and background jobs)
or a connection's (its requests in flight). Each connection is a loop around the sans-IO
protocol.Connection: read with a timeout, feed it, dispatch each request as a task
(responses go out in completion order, matched by request id), write replies one at a
time (a lock is taken only when a reply must wait: a writer busy, a drain, a sendfile),
sendfile fetched batches straight from their segment files. Requests that arrive while
the loop waits to read, the connection between frames, are started from the transport's
callback without waking the loop (session_reader.py, ClientSession._take_nowait). A
durable produce is no task: its DurableAnswer (durable_answer.py) is written from the
fsync's callback. A connection that
breaks the protocol gets one Closing event and is closed; the server and every other
connection carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import functools
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nodi.storage.file_budget import open_files_max_for, raise_files_limit
from nodi.storage.log import FileSlice
from nodi.storage.store import Store

from ..kafka.listener import KafkaListener
from ..protocol import messages as m
from ..protocol.connection import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    ConnectionEvent,
    RejectedRequest,
    Role,
    State,
    handshake_response,
)
from ..protocol.errors import ErrorCode, ProtocolError
from .clock import SYSTEM_CLOCK, TEST_CLOCK_FILE_ENV, Clock, clock_from_environment
from .config import ServerConfig
from .durable_answer import DurableAnswer
from .eager import resume, start_eagerly
from .idle_close_job import run_idle_close_job
from .memory_budget import FrameBudget, FrameBudgetStatistics, return_large_allocations_to_the_os, trim_freed_memory
from .metrics import Metrics
from .read_deadline import ReadDeadline
from .reply import Reply, error_reply
from .retention_job import run_retention_job
from .security import Security, certificate_common_name
from .security_settings import check_exposure, exposure_warnings
from .service import Broker
from .session_reader import SessionReader, session_protocol_factory
from .status import status_for_peer
from .users import ANONYMOUS, Principal

log = logging.getLogger("nodi.server")

READ_BYTES = 256 * 1024
# A file slice shorter than this is read (pread) and written with the response header in
# one send: loop.sendfile costs a few loop turns (pause reading, wait for the buffer to
# empty, resume) and a send of its own, more than copying a small slice (a consumer at
# the tail reads a batch or two).
SENDFILE_BYTES_MIN = 64 * 1024
# After a connection ends, the free pages it leaves in the heap are given back to the OS
# this much later (one malloc_trim for every connection ended meanwhile).
TRIM_DELAY_S = 1.0
# Requests served up to their first wait in the reader's task (or in the transport's
# callback, started by _take_nowait: no task at all), a task made only if they wait
# (eager.py): those that mostly answer without waiting (a fetch that finds records,
# a produce not acked durable, ListOffsets, Heartbeat), whose handlers (and _serve,
# _write) neither ask for the current task nor set a contextvar before their first wait.
# Requests that always wait (a durable produce, a commit) gain nothing: resuming them
# through eager.resume costs a little more than a task of their own from the start.
EAGER_REQUESTS = frozenset({m.FetchRequest, m.ListOffsetsRequest, m.HeartbeatRequest})


def _start_eagerly(request: m.Request) -> bool:
    if type(request) is m.ProduceRequest:
        assert isinstance(request, m.ProduceRequest)  # for the type checker
        return request.acks is not m.Acks.DURABLE
    return type(request) in EAGER_REQUESTS


class _SendfileSource:
    """What loop.sendfile needs of a file: a descriptor, and a seek it may call."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def seek(self, offset: int, whence: int = 0) -> int:
        return offset


def _log_files_limit(before: int, soft: int, hard: int) -> None:
    """At start the soft RLIMIT_NOFILE is raised to the hard limit where allowed: both
    logged, with the partition files that leaves (storage/file_budget.py). A limit too
    low is refused by Store.open (FileLimitTooLowError, with the number needed)."""
    hard_text = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    raised = f" (raised from {before})" if soft != before else ""
    log.info(
        "open file limit: soft %d%s, hard %s; partition files kept open at most %d",
        soft,
        raised,
        hard_text,
        open_files_max_for(soft),
    )


class ClientSession:
    """One client connection."""

    def __init__(self, server: Server, reader: SessionReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.connection = Connection(Role.SERVER, server.config.protocol)
        self._write_lock = asyncio.Lock()
        # Writers holding or waiting for _write_lock: none, and a reply is written at once
        # without taking it (_write).
        self._writers = 0
        self.peer = writer.get_extra_info("peername")
        self.client_id = ""
        self._frame_bytes_reserved = 0  # from server.frame_budget, for the frame being received
        # Who the connection acts as: anonymous on a server without authentication, else
        # None until Authenticate (or a client certificate) says (broker/server/security.py).
        self.principal: Principal | None = None
        self._principal_counted = False
        # sendfile writes file bytes to the socket under TLS, unencrypted: copy instead.
        self.sendfile = writer.get_extra_info("sslcontext") is None
        # Bytes in flight and request rate of this connection (read_throttle.py), and the
        # stream bytes turned into events so far (a request's size is the difference).
        self.throttle = server.security.read_throttle("nodi")
        self._consumed_bytes = 0
        # Durable produces waiting for their fsync without a task (durable_answer.py), at
        # most in_flight_requests_max (each is a request in flight); cancelled at close.
        self._durable_answers: set[DurableAnswer] = set()
        # Their replies that found the writer busy, written in order by one task.
        self._durable_backlog: list[Reply] = []
        self._requests: asyncio.TaskGroup | None = None
        # What the reader's hook (_take_nowait) leaves the read loop: an event it does not
        # serve itself, with its size, or the error that feeding or dispatching raised.
        self._pending_event: ConnectionEvent | None = None
        self._pending_size = 0
        self._pending_failure: BaseException | None = None
        self._read_deadline: ReadDeadline | None = None  # the read loop's, for _take_nowait
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as requests:
                self._requests = requests
                await self._read_loop(requests)
        except* (ConnectionError, TimeoutError) as group:
            log.debug("connection %s ended: %s", self.peer, group.exceptions[0])
        except* Exception as group:  # a bug: this connection ends, the server carries on
            log.error("connection %s failed", self.peer, exc_info=group.exceptions[0])
        finally:
            for answer in self._durable_answers:
                answer.cancel()
            self._durable_answers.clear()
            self._durable_backlog.clear()
            if self.principal is not None and self._principal_counted:
                self.server.security.close_connection(self.principal)
            self._release_frame_bytes()
            self.connection.close()  # lets a large frame's buffer go now
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 1)

    async def _read_loop(self, requests: asyncio.TaskGroup) -> None:
        """Read, feed, dispatch, under three deadlines: the handshake must be done
        handshake_timeout_ms after the accept; a frame must be whole frame_timeout_ms
        after its first byte arrived (waiting for frame budget included); between
        frames, a read may wait idle_timeout_ms. Each is a deadline for the whole phase,
        not per read: a peer sending a byte at a time is closed just the same."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None  # run() reads in its own task
        read_deadline = ReadDeadline(loop, task)  # one timer for every read (read_deadline.py)
        self._read_deadline, self._loop = read_deadline, loop
        self.reader.take_nowait = self._take_nowait
        try:
            await self._read_frames(requests, loop, read_deadline)
        finally:
            self.reader.take_nowait = None
            read_deadline.close()

    async def _read_frames(
        self, requests: asyncio.TaskGroup, loop: asyncio.AbstractEventLoop, read_deadline: ReadDeadline
    ) -> None:
        config = self.server.config
        connection, throttle, reader = self.connection, self.throttle, self.reader
        handshake_deadline = loop.time() + config.handshake_timeout_ms / 1000
        idle_timeout_s = config.idle_timeout_ms / 1000
        frame_deadline: float | None = None  # of the frame partly received
        frames_received = 0
        while True:
            if connection.state is not State.READY or self.principal is None:
                deadline, reason = handshake_deadline, "handshake"
            elif frame_deadline is not None:
                deadline, reason = frame_deadline, "frame"
            else:
                deadline, reason = loop.time() + idle_timeout_s, "idle"
            try:
                with read_deadline.at(deadline):
                    if connection.incomplete_frame_bytes != self._frame_bytes_reserved:
                        await self._reserve_frame_bytes(connection.incomplete_frame_bytes)
                    if not throttle.ready():
                        await throttle.wait()
                    data = await reader.read_available(READ_BYTES)
            except TimeoutError:
                self.server.count_timeout(reason)
                # Nothing more is read: the frame budget is free before the peer hears why.
                self._release_frame_bytes()
                await self._close_with(ErrorCode.TIMEOUT, _TIMEOUT_MESSAGES[reason].format(config=config))
                return
            try:
                if data is not None:
                    connection.receive_data(data)
                    if not await self._dispatch(requests):
                        return
                else:  # _take_nowait fed the connection and left this loop the rest
                    failure, self._pending_failure = self._pending_failure, None
                    if failure is not None:
                        raise failure
                    event, self._pending_event = self._pending_event, None
                    if event is not None and not await self._dispatch(requests, event, self._pending_size):
                        return
            except ProtocolError as error:
                if not error.closes_connection:
                    raise
                self.server.count_error(error.code)
                await self._close_with(error.code, error.message)
                return
            if not connection.buffered_bytes:
                frame_deadline = None
            elif frame_deadline is None or connection.frames_received != frames_received:
                frame_deadline = loop.time() + config.frame_timeout_ms / 1000  # a new frame began
            frames_received = connection.frames_received

    async def _reserve_frame_bytes(self, count: int) -> None:
        """Hold `count` bytes of the server's frame budget for the frame being received
        (0: none), waiting for them if need be; the caller bounds the wait."""
        self._release_frame_bytes()
        if count:
            await self.server.frame_budget.wait_reserve(count)
            self._frame_bytes_reserved = count

    def _release_frame_bytes(self) -> None:
        if self._frame_bytes_reserved:
            self.server.frame_budget.release(self._frame_bytes_reserved)
            self._frame_bytes_reserved = 0

    def _take_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """The reader's hook (session_reader.py), called with a chunk that arrives while
        the read loop waits to read and nothing is buffered: when the connection is
        between frames and ready for requests, feed it and start its requests here, as
        the read loop would, without waking the loop's task (a future, a loop turn and
        the resumption of its coroutines, a request). Whatever the read loop does
        besides is left to it, woken by reader.interrupt(): an event other than a
        request (_dispatch serves it, and the events after it), an error, a frame left
        incomplete (its deadline and frame budget), the read throttle holding the next
        read. Else the idle deadline moves on, as the loop's next read would set it."""
        connection = self.connection
        if (
            connection.state is not State.READY
            or self.principal is None
            or connection.buffered_bytes
            or self.server.shutting_down
        ):
            return False
        try:
            connection.receive_data(data)
            self._dispatch_nowait()
        except Exception as error:  # the read loop raises it, as if it had fed the data itself
            self._pending_failure = error
            self.reader.interrupt()
            return True
        if self._pending_event is not None or connection.buffered_bytes or not self.throttle.ready():
            self.reader.interrupt()
        else:
            assert self._read_deadline is not None and self._loop is not None  # set before the hook
            self._read_deadline.at(self._loop.time() + self.server.config.idle_timeout_ms / 1000)
        return True

    def _dispatch_nowait(self) -> None:
        """_dispatch's requests, from _take_nowait: up to the first event that is not
        one, left in _pending_event for the read loop."""
        assert self._requests is not None  # set before the first read
        while True:
            event = self.connection.next_event()
            if event is NEED_DATA:
                return
            consumed = self.connection.consumed_bytes
            size, self._consumed_bytes = consumed - self._consumed_bytes, consumed
            if (
                not isinstance(event, m.Request)
                or isinstance(event, (m.HandshakeRequest, m.AuthenticateRequest))
                or self.server.shutting_down
            ):
                self._pending_event, self._pending_size = event, size
                return
            self._start(self._requests, event, size)

    async def _dispatch(
        self,
        requests: asyncio.TaskGroup,
        pending: ConnectionEvent | None = None,
        pending_size: int = 0,
    ) -> bool:
        """Turn buffered bytes into work, `pending` (an event already taken from the
        connection) first; False when the peer closed."""
        while True:
            if pending is not None:
                event, size, pending = pending, pending_size, None
            else:
                event = self.connection.next_event()
                if event is NEED_DATA:
                    return True
                consumed = self.connection.consumed_bytes
                size, self._consumed_bytes = consumed - self._consumed_bytes, consumed
            if isinstance(event, ConnectionClosed):
                return False
            if isinstance(event, RejectedRequest):
                self.server.count_error(event.error_code)
                await self._write(Reply(event.response()))
            elif isinstance(event, m.HandshakeRequest):
                self.client_id = event.client_id
                assert self.server.broker is not None  # sessions start once the broker runs
                response = handshake_response(
                    event, server_id=self.server.broker.server_id, limits=self.server.config.announced_limits()
                )
                await self._write(Reply(response))
                if response.error_code != ErrorCode.NONE:
                    return False
            elif isinstance(event, m.AuthenticateRequest):
                if not await self._authenticate(event):
                    return False
            elif self.principal is None:
                self.server.security.refuse("not_authenticated", None, self.peer)
                await self._close_with(
                    ErrorCode.AUTHENTICATION_REQUIRED,
                    f"{type(event).__name__.removesuffix('Request')} before Authenticate: this server has a users "
                    "file (or wants a client certificate); authenticate first",
                )
                return False
            else:
                assert isinstance(event, m.Request)  # the server's side of a connection yields requests
                if self.server.shutting_down:
                    error = ProtocolError(ErrorCode.SERVER_SHUTTING_DOWN, "shutting down")
                    await self._write(error_reply(event, error))
                else:
                    self._start(requests, event, size)

    def _start(self, requests: asyncio.TaskGroup, event: m.Request, size: int) -> None:
        """Serve a request of `size` frame bytes, counted in flight until answered."""
        self.throttle.started(size)
        if type(event) is m.ProduceRequest and event.acks is m.Acks.DURABLE:
            assert isinstance(event, m.ProduceRequest)  # for the type checker
            if self._produce_durable_nowait(event, size):
                return
        if not _start_eagerly(event):
            task = requests.create_task(self._serve(event))
            task.add_done_callback(functools.partial(self._answered, size))
            return
        # Served here up to its first wait; a task only if it waits (eager.py).
        coroutine = self._serve(event)
        waiting_on = start_eagerly(coroutine)
        if waiting_on is None:
            self.throttle.answered(size)
        else:
            task = requests.create_task(resume(coroutine, waiting_on))
            task.add_done_callback(functools.partial(self._answered, size))

    def _answered(self, size: int, _task: asyncio.Task[None]) -> None:
        self.throttle.answered(size)

    def _produce_durable_nowait(self, request: m.ProduceRequest, size: int) -> bool:
        """Serve a durable produce without a task (durable_answer.py), a refusal
        included; False when it takes the general path instead (a produce the broker
        cannot answer this way), nothing done yet."""
        started = time.perf_counter()
        refusal = self._refusal(request, started)  # counted once, here
        if refusal is not None:
            self.throttle.answered(size)
            self._write_nowait(refusal)
            return True
        assert self.server.broker is not None  # sessions start once the broker runs
        deliver = functools.partial(self._durable_answered, request, size, started)
        outcome = self.server.broker.produce_durable_nowait(request, deliver)
        if outcome is None:
            return False
        if isinstance(outcome, Reply):
            deliver(None, outcome)
        elif isinstance(outcome, DurableAnswer):
            if not outcome.done():
                assert len(self._durable_answers) < self.server.config.protocol.in_flight_requests_max
                self._durable_answers.add(outcome)
        else:  # duplicates, answered once their originals are durable: a task
            assert self._requests is not None  # set before the first read
            task = self._requests.create_task(self._serve_answer(request, outcome, started))
            task.add_done_callback(functools.partial(self._answered, size))
        return True

    async def _serve_answer(self, request: m.Request, answering: Awaitable[Reply], started: float) -> None:
        assert self.server.broker is not None  # sessions start once the broker runs
        reply = await self.server.broker.answer(request, answering)
        self.server.observe(request, reply, time.perf_counter() - started)
        await self._write(reply)

    def _durable_answered(
        self, request: m.ProduceRequest, size: int, started: float, answer: DurableAnswer | None, reply: Reply
    ) -> None:
        """A durable produce's reply, from the callback that settled it (the fsync's
        wake of the partition's waiters, or its timer): never raises into it."""
        if answer is not None:  # None: refused at once, never kept
            self._durable_answers.discard(answer)
        self.throttle.answered(size)
        try:
            self.server.observe(request, reply, time.perf_counter() - started)
            self._write_nowait(reply)
        except Exception:  # a bug: this connection ends, the server and the other waiters carry on
            log.error("connection %s failed answering a durable produce", self.peer, exc_info=True)
            self.writer.transport.abort()

    def _write_nowait(self, reply: Reply) -> None:
        """Write a small reply now if the writer is free (no write in progress, nothing
        left in the transport's buffer to drain); else after those, in order, in a task."""
        assert not (reply.slices or reply.buffers)  # a produce's reply
        if self._durable_backlog or self._writers or self.writer.transport.get_write_buffer_size():
            self._durable_backlog.append(reply)
            if len(self._durable_backlog) == 1 and self._requests is not None:
                with contextlib.suppress(RuntimeError):  # the connection's TaskGroup has ended: closing
                    self._requests.create_task(self._write_backlog())
            return
        if self.connection.state not in (State.READY, State.HANDSHAKING):
            return  # closed meanwhile: the reply has nowhere to go
        self.writer.write(self._encode(reply)[0])

    async def _write_backlog(self) -> None:
        backlog = self._durable_backlog
        while backlog:
            await self._write(backlog[0])
            if backlog:  # emptied if the connection closed meanwhile
                del backlog[0]

    def start_session(self) -> bool:
        """Before the first read: the principal of a server without authentication, or
        of a verified client certificate. False: refused (counted), close at once."""
        security = self.server.security
        if not security.required:
            self.principal = ANONYMOUS
        certificate = self.writer.get_extra_info("peercert")
        if certificate_common_name(certificate) is None:
            return True  # no client certificate: Authenticate decides
        principal = security.principal_of_certificate(certificate)
        if principal is None or not security.open_connection(principal):
            return False  # a certificate naming no user (or over its limit): refused, counted
        self.principal, self._principal_counted = principal, True
        return True

    async def _authenticate(self, request: m.AuthenticateRequest) -> bool:
        """Answer an Authenticate; False when refused (the connection then closes)."""
        security = self.server.security
        principal = None
        if self._principal_counted or (self.principal is not None and security.required):
            security.refuse("replayed", request.user, self.peer)
            message = "this connection has authenticated already"
        elif not security.required:
            security.refuse("no_users_file", request.user, self.peer)
            message = "this server has no users file: connect without a user and password"
        else:
            principal = await security.authenticate(request.user, request.password)
            message = "unknown user or wrong password"
            if principal is not None and not security.open_connection(principal):
                message = f"{principal.name} has connections_per_principal_max connections open"
                principal = None
        if principal is None:
            self.server.count_error(ErrorCode.AUTHENTICATION_FAILED)
            await self._write(
                Reply(
                    m.AuthenticateResponse(
                        request_id=request.request_id,
                        error_code=ErrorCode.AUTHENTICATION_FAILED,
                        error_message=message,
                    )
                )
            )
            return False
        self.principal, self._principal_counted = principal, True
        await self._write(Reply(m.AuthenticateResponse(request_id=request.request_id, principal=principal.name)))
        return True

    def _refusal(self, request: m.Request, started: float) -> Reply | None:
        """The NOT_AUTHORIZED reply when the session's principal lacks a permission
        `request` needs (Server.refusal); None when it may."""
        assert self.principal is not None  # _dispatch serves nothing before authentication
        return self.server.refusal(self.principal, request, started)

    async def _serve(self, request: m.Request) -> None:
        started = time.perf_counter()
        refusal = self._refusal(request, started)
        if refusal is not None:
            await self._write(refusal)
            return
        assert self.server.broker is not None  # sessions start once the broker runs
        reply = await self.server.broker.handle(request, self.client_id)
        if isinstance(reply.response, m.ServerStatusResponse):
            reply = Reply(status_for_peer(reply.response, self.peer))
        self.server.observe(request, reply, time.perf_counter() - started)
        await self._write(reply)

    async def _write(self, reply: Reply) -> None:
        if not self._writers and not (reply.slices and self._sendfile_needed(reply.slices)):
            # Nobody holds or waits for the writer, and nothing here awaits before the
            # bytes are handed to the transport (no sendfile): the lock would be taken and
            # given back with nothing able to come in between. Only a drain, if any, is
            # waited for under it, as below.
            if self.connection.state not in (State.READY, State.HANDSHAKING):
                return  # closed meanwhile: the reply has nowhere to go
            header, reply = self._encode(reply)
            if reply.buffers or reply.slices:
                assert not (reply.buffers and reply.slices)  # one kind of records a reply
                self.writer.writelines([header, *reply.buffers, *(piece.read() for piece in reply.slices)])
            else:
                self.writer.write(header)
            if self.writer.transport.get_write_buffer_size():
                self._writers += 1
                try:
                    async with self._write_lock:
                        await asyncio.wait_for(self.writer.drain(), self.server.config.write_timeout_ms / 1000)
                finally:
                    self._writers -= 1
            return
        self._writers += 1
        try:
            async with self._write_lock:
                await self._write_locked(reply)
        finally:
            self._writers -= 1

    def _sendfile_needed(self, slices: tuple[FileSlice, ...]) -> bool:
        """Whether _write_locked would sendfile one of these slices (else it reads them
        all and writes them with the header)."""
        if not (self.server.sendfile and self.sendfile):
            return False
        return any(piece.length >= SENDFILE_BYTES_MIN for piece in slices)

    async def _write_locked(self, reply: Reply) -> None:
        timeout_s = self.server.config.write_timeout_ms / 1000
        if self.connection.state not in (State.READY, State.HANDSHAKING):
            return  # closed meanwhile: the reply has nowhere to go
        header, reply = self._encode(reply)
        # In-memory buffers and small slices go out with the header in one write (one
        # send call), the buffers as they are; large slices with sendfile.
        assert not (reply.buffers and reply.slices)  # one kind of records a reply
        pending = [header, *reply.buffers]
        for piece in reply.slices:
            if piece.length < SENDFILE_BYTES_MIN or not (self.server.sendfile and self.sendfile):
                pending.append(piece.read())
                continue
            self.writer.writelines(pending)
            pending = []
            await self._send_slice(piece, timeout_s)
        if pending:
            self.writer.writelines(pending)
        if self.writer.transport.get_write_buffer_size():  # else drain has nothing to wait for
            # wait_for, not asyncio.timeout: this may run in the reader's task (eager.py)
            await asyncio.wait_for(self.writer.drain(), timeout_s)

    def _encode(self, reply: Reply) -> tuple[bytes, Reply]:
        """The reply's frame (its header only, with slices or buffers), and the reply to
        send."""
        try:
            if reply.slices or reply.buffers:
                return self.connection.send_header(reply.response, reply.records_bytes), reply
            return self.connection.send(reply.response), reply
        except ProtocolError as error:
            if error.closes_connection:
                raise
            # The reply cannot be encoded (over a limit): answer with the error instead.
            return self.connection.send(error_reply(_request_of(reply.response), error).response), Reply(reply.response)

    async def _send_slice(self, piece: FileSlice, timeout_s: float) -> None:
        fd = piece.file.fileno()
        if fd is not None and self.server.sendfile:
            try:
                loop = asyncio.get_running_loop()
                await asyncio.wait_for(  # not asyncio.timeout: see _write
                    loop.sendfile(
                        self.writer.transport,
                        # sendfile calls only fileno() and seek(), all _SendfileSource has;
                        # typeshed asks for a whole IO[bytes]
                        _SendfileSource(fd),  # type: ignore[arg-type]
                        piece.position,
                        piece.length,
                        fallback=False,
                    ),
                    timeout_s,
                )
                return
            except (asyncio.SendfileNotAvailableError, RuntimeError, NotImplementedError):
                self.server.sendfile = False  # this loop or transport cannot: copy from now on
        self.writer.write(piece.read())

    async def _close_with(self, code: ErrorCode, message: str) -> None:
        """One Closing event saying why, when the state allows it, then close."""
        self._writers += 1
        try:
            with contextlib.suppress(Exception):
                async with self._write_lock:
                    frame = self.connection.send(m.ClosingEvent(error_code=code, error_message=message))
                    self.writer.write(frame)
                    await asyncio.wait_for(self.writer.drain(), 1)
        finally:
            self._writers -= 1
        self.connection.close()


_TIMEOUT_MESSAGES = {
    "handshake": "no handshake within handshake_timeout_ms {config.handshake_timeout_ms}",
    "frame": "a frame not received whole within frame_timeout_ms {config.frame_timeout_ms} of its first byte",
    "idle": "idle for idle_timeout_ms {config.idle_timeout_ms}",
}


def _request_of(response: m.Response) -> m.Request:
    api = next(api for api in m.APIS if isinstance(response, api.response))
    return api.request(request_id=response.request_id)


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    started_time_ms: int  # wall clock when the server began serving
    uptime_ms: int
    connections_open: int
    connections_accepted: int
    connections_refused: int  # over connections_max or during shutdown
    # Connections closed with TIMEOUT since start, by deadline: handshake, frame, idle.
    connections_timed_out: dict[str, int]
    frame_budget: FrameBudgetStatistics


class Server:
    def __init__(self, config: ServerConfig, *, metrics=None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        # The time the broker's deadlines are read from (broker/server/clock.py).
        self.clock = clock
        self.store: Store | None = None
        self.broker: Broker | None = None
        self.metrics = metrics
        # The web console (nodi.broker.console), on its own port unless console_port is 0.
        self.console = None
        if config.console_port:
            from ..console.app import Console
            from ..console.sessions import SessionLimits

            self.console = Console(
                config.console_host,
                config.console_port,
                session_limits=SessionLimits(session_idle_ms=config.console_session_idle_ms),
            )
        self.shutting_down = False
        self.sendfile = True
        self.sessions: set[ClientSession] = set()
        self.kafka: KafkaListener | None = None
        self.address: tuple[str, int] | None = None
        self._stop = asyncio.Event()
        self._listener: asyncio.AbstractServer | None = None
        self._started_time_ms = int(time.time() * 1000)
        self._started_monotonic = time.monotonic()
        self._connections_accepted = 0
        self._connections_refused = 0
        self._connections_timed_out = dict.fromkeys(_TIMEOUT_MESSAGES, 0)
        self.frame_budget = FrameBudget(config.frame_buffer_bytes_max)
        # TLS context, users, per-principal counts; reads the certificate and the users
        # file now, so a bad one stops the start before anything is bound.
        self.security = Security(config.security)
        self._trim: asyncio.TimerHandle | None = None
        # Why and when the server was asked to stop, and what went wrong on the way out:
        # the one line run() logs at the end.
        self._stop_reason: str | None = None
        self._stop_requested_monotonic: float | None = None
        self._shutdown_problems: list[str] = []

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            started_time_ms=self._started_time_ms,
            uptime_ms=int((time.monotonic() - self._started_monotonic) * 1000),
            connections_open=len(self.sessions),
            connections_accepted=self._connections_accepted,
            connections_refused=self._connections_refused,
            connections_timed_out=dict(self._connections_timed_out),
            frame_budget=self.frame_budget.statistics(),
        )

    # -- accounting (metrics hook points) ----------------------------------------------

    def count_error(self, code: ErrorCode) -> None:
        if self.metrics is not None:
            self.metrics.count_error(code)

    def count_timeout(self, reason: str) -> None:
        self._connections_timed_out[reason] += 1
        log.debug("connection closed: %s deadline passed", reason)

    def refusal(self, principal: Principal, request: m.Request, started: float) -> Reply | None:
        """The NOT_AUTHORIZED reply (counted, logged and observed) when `principal`
        lacks a permission `request` needs; None when it may. A session's and the
        console's requests are refused alike."""
        refused = self.security.check(principal, request)
        if refused is None:
            return None
        action, resource, name = refused
        error = ProtocolError(
            ErrorCode.NOT_AUTHORIZED,
            f"{principal.name} may not {action.value} {resource.value} {name}",
            closes_connection=False,
        )
        reply = error_reply(request, error)
        self.observe(request, reply, time.perf_counter() - started)
        return reply

    def observe(self, request: m.Request, reply: Reply, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(request, reply, seconds)

    # -- life cycle -----------------------------------------------------------------

    def stop(self, reason: str = "stop requested") -> None:
        """Begin a clean shutdown; `reason` (a signal's name) goes into the stop line.
        The first call's reason is kept."""
        if self._stop_reason is None:
            self._stop_reason = reason
            self._stop_requested_monotonic = time.monotonic()
        self._stop.set()

    async def run(self, on_ready: Callable[[Server], None] | None = None) -> None:
        """Bind the ports, take and open the data directory, listen, serve until
        stop(), then shut down cleanly. An address beyond loopback without
        authentication is refused first (InvalidConfigError), unless insecure_no_auth.

        The ports are bound first and the data directory is locked before it is read
        (Store.open), so a start that fails (a port taken: OSError; another broker or a
        tool on the directory: DataDirectoryLockedError) has written nothing into it."""
        check_exposure(self.config.host, self.config.security)
        if self.console is not None:  # the web console's address follows the same rule (docs/security.md)
            check_exposure(self.config.console_host, self.config.security)
            for warning in exposure_warnings(self.config.console_host, self.config.security):
                log.warning("web console: %s", warning)
        for warning in exposure_warnings(self.config.host, self.config.security):
            log.warning("%s", warning)
        if self.config.kafka.enabled:  # the same rule for the Kafka listener's own host
            check_exposure(self.config.kafka.host or self.config.host, self.config.security)
            if self.config.kafka.host:
                for warning in exposure_warnings(self.config.kafka.host, self.config.security):
                    log.warning("kafka listener: %s", warning)
        sock = _bind(self.config.host, self.config.port)
        kafka_sock = None
        try:
            if self.config.kafka.enabled:  # the Kafka listener's port, bound as early (broker/kafka/)
                kafka_sock = _bind(self.config.kafka.host or self.config.host, self.config.kafka.port)
            if self.metrics is not None:
                try:
                    self.metrics.listen()
                except OSError as error:
                    raise OSError(
                        error.errno,
                        f"cannot serve metrics on {self.metrics.host}:{self.metrics.port}: {error.strerror}",
                    ) from None
            if self.console is not None:
                self.console.bind()
            files_limit = raise_files_limit()
            self.store = await asyncio.to_thread(
                Store.open,
                self.config.data_dir,
                fsync_workers_max=self.config.fsync_workers_max,
                clock_ms=self.clock.time_ms,
                open_in_background=True,  # partitions open after the listener starts (issue 18)
            )
        except BaseException:
            sock.close()
            if kafka_sock is not None:
                kafka_sock.close()
            if self.metrics is not None:
                self.metrics.stop()
            if self.console is not None:
                await self.console.stop()
            raise
        _log_files_limit(*files_limit)
        for line in self.store.open_report.lines():
            log.warning("%s", line)
        for line in self.store.open_report.error_lines():
            log.error("%s", line)
        self.broker = Broker(self.store, self.config, self.clock)
        self.broker.server_statistics = self.statistics
        failure: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as tasks:
                loop = asyncio.get_running_loop()
                self.broker.attach(loop, tasks)
                self._listener = await loop.create_server(
                    session_protocol_factory(lambda reader, writer: self._accept(tasks, reader, writer), loop),
                    sock=sock,
                    ssl=self.security.tls_context,
                    ssl_handshake_timeout=self.config.handshake_timeout_ms / 1000
                    if self.security.tls_context
                    else None,
                )
                sock = self._listener.sockets[0]
                self.address = sock.getsockname()[:2]
                _start_partition_opens(self.store)
                tasks.create_task(self._retention_job())
                tasks.create_task(self._idle_close_job())
                if kafka_sock is not None:
                    self.kafka = KafkaListener(
                        self.broker, self.config.kafka, observe=self.observe, security=self.security
                    )
                    await self.kafka.start(tasks, kafka_sock)
                tasks.create_task(self.broker.compaction.run_job())
                if self.metrics is not None:
                    self.metrics.start(self)
                if self.console is not None:
                    await self.console.start(tasks, self)
                if on_ready is not None:
                    on_ready(self)
                await self._stop.wait()
                if self.console is not None:
                    await self.console.stop()
                await self._shutdown()
                raise _Stopped
        except* _Stopped:
            pass
        except* BaseException as group:  # a fatal error (or a cancel): the stop line says which
            failure = group.exceptions[0]
            raise
        finally:
            if self._stop_requested_monotonic is None:
                self._stop_requested_monotonic = time.monotonic()
            if self._trim is not None:
                self._trim.cancel()
            if self.metrics is not None:
                self.metrics.stop()
            if self.console is not None:
                await self.console.stop()  # again after a fatal error: stop() is idempotent
            await self.broker.compaction.stop()  # a run's thread must end before the logs close
            try:
                self.broker.queues.stage_for_shutdown()  # a clean stop leaves no delivery in doubt
            except Exception:  # a failed metadata store reports itself; the restart counts them once
                log.exception("queue groups: staging their state at shutdown failed")
                self._shutdown_problems.append("queue group state not staged")
            try:
                await asyncio.to_thread(self.store.close)
            except BaseException as error:
                self._shutdown_problems.append(f"closing the data directory failed: {type(error).__name__}: {error}")
                raise
            finally:
                self._log_stopped(failure)

    def _log_stopped(self, failure: BaseException | None) -> None:
        """The one line a stop logs: why (the signal's name, stop requested, or the fatal
        error), how long the shutdown took (from the stop request, or from the error, to
        the data directory closed), and clean or not (with what was not)."""
        if failure is not None and not isinstance(failure, asyncio.CancelledError):
            reason = f"fatal error {type(failure).__name__}: {failure}"
        elif failure is not None:
            reason = "cancelled"
        else:
            reason = self._stop_reason or "stop requested"
        assert self._stop_requested_monotonic is not None
        shutdown_ms = int((time.monotonic() - self._stop_requested_monotonic) * 1000)
        clean = failure is None and not self._shutdown_problems
        outcome = "clean" if clean else "not clean"
        if self._shutdown_problems:
            outcome += " (" + "; ".join(self._shutdown_problems) + ")"
        level = logging.INFO if clean else logging.ERROR
        log.log(
            level,
            "nodi stopped: %s; shutdown took %d ms; %s",
            reason,
            shutdown_ms,
            outcome,
            extra={"stop_reason": reason, "shutdown_ms": shutdown_ms, "clean": clean},
        )

    def _accept(self, tasks: asyncio.TaskGroup, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert isinstance(reader, SessionReader)  # session_protocol_factory's
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = ClientSession(self, reader, writer)
        if len(self.sessions) >= self.config.connections_max or self.shutting_down:
            code = ErrorCode.SERVER_SHUTTING_DOWN if self.shutting_down else ErrorCode.LIMIT_EXCEEDED
            self._connections_refused += 1
            tasks.create_task(session._close_with(code, f"connections_max {self.config.connections_max} reached"))
            tasks.create_task(_close_later(writer))
            return
        if not self.security.accept_connection("nodi", session.peer):  # connections_total_max, both listeners
            self._connections_refused += 1
            tasks.create_task(session._close_with(ErrorCode.LIMIT_EXCEEDED, "connections_total_max reached"))
            tasks.create_task(_close_later(writer))
            return
        if not session.start_session():
            self.security.release_connection()
            self._connections_refused += 1
            tasks.create_task(
                session._close_with(ErrorCode.AUTHENTICATION_FAILED, "the client certificate was refused")
            )
            tasks.create_task(_close_later(writer))
            return
        self._connections_accepted += 1
        self.sessions.add(session)
        task = tasks.create_task(session.run())
        task.add_done_callback(lambda _: self._session_ended(session))

    def _session_ended(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        self.security.release_connection()
        if self._trim is None and not self.shutting_down:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._trim_freed_memory)

    def _trim_freed_memory(self) -> None:
        self._trim = None
        trim_freed_memory()

    async def _shutdown(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace), tell every
        client, close."""
        self.shutting_down = True
        assert self._listener is not None  # run() shuts down only what it started
        self._listener.close()
        if self.kafka is not None:
            await self.kafka.stop()
        deadline = time.monotonic() + self.config.shutdown_grace_ms / 1000
        while time.monotonic() < deadline and any(s.connection.in_flight_count for s in self.sessions):
            await asyncio.sleep(0.01)
        cut = sum(s.connection.in_flight_count for s in self.sessions)
        if cut:
            self._shutdown_problems.append(
                f"{cut} request(s) still in flight after the {self.config.shutdown_grace_ms} ms grace"
            )
        for session in list(self.sessions):
            await session._close_with(ErrorCode.SERVER_SHUTTING_DOWN, "the server is shutting down")
            session.writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listener.wait_closed(), 1)

    async def _retention_job(self) -> None:
        assert self.store is not None  # run() opened it before starting this job
        await run_retention_job(self.store, self.config.retention_check_interval_ms, lambda: self.shutting_down)

    async def _idle_close_job(self) -> None:
        assert self.store is not None  # run() opened it before starting this job
        await run_idle_close_job(self.store, self.config.partition_idle_close_ms, lambda: self.shutting_down)


class _Stopped(Exception):
    pass


def _bind(host: str, port: int) -> socket.socket:
    """A bound, not yet listening, TCP socket (OSError when the address is taken):
    until the server listens on it, a client's connect is refused rather than left
    waiting in the backlog while the data directory is recovered."""
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _close_later(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(0.05)
    writer.close()


def run(config: ServerConfig, *, announce: Callable[[str], None] = print) -> None:
    """Run a server in this process until SIGTERM or SIGINT."""
    try:
        import uvloop  # a dependency on Linux; elsewhere asyncio's own loop
    except ImportError:
        uvloop = None  # type: ignore[assignment]

    return_large_allocations_to_the_os()
    # `kill -USR1 PID`: every thread's stack to stderr, for a broker that seems stuck
    # (written by the interpreter itself, even while the event loop is blocked).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # SYSTEM_CLOCK, unless a test set NODI_TEST_CLOCK_FILE and NODI_TEST_CLOCK_ALLOWED=1.
    clock = clock_from_environment()
    if clock is not SYSTEM_CLOCK:
        log.warning("running on the test-only clock of %s=%s: not for production", TEST_CLOCK_FILE_ENV, clock)

    async def main() -> None:
        metrics = None if config.metrics_port < 0 else Metrics(config.host, config.metrics_port, config.security)
        server = Server(config, metrics=metrics, clock=clock)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, server.stop, signal.Signals(signum).name)
        # SIGHUP: the TLS certificate and the users file are read again; no connection drops.
        loop.add_signal_handler(signal.SIGHUP, server.security.reload)

        def ready(server: Server) -> None:
            assert server.address is not None  # on_ready is called once the listener is bound
            host, port = server.address
            if server.kafka is not None and server.kafka.address is not None:  # before the ready line
                kafka_host, kafka_port = server.kafka.address
                announce(f"nodi kafka listener on {kafka_host}:{kafka_port}")
            announce(
                f"nodi listening on {host}:{port} (data dir {os.path.abspath(config.data_dir)}, pid {os.getpid()})"
            )
            if metrics is not None:
                scheme = "https" if config.security.tls else "http"
                announce(f"nodi metrics on {scheme}://{host}:{metrics.port}/metrics")
            if server.console is not None:
                scheme = "https" if server.console.tls else "http"
                announce(f"nodi console on {scheme}://{config.console_host}:{server.console.port}/")

        await server.run(on_ready=ready)

    if uvloop is not None:
        uvloop.run(main())
    else:
        asyncio.run(main())


def _start_partition_opens(store: Store) -> None:
    """Open the partitions registered at start in the background, saying so: a request
    for one not yet open opens it (a clean one) or is answered PARTITION_NOT_READY (one
    being recovered) until then (docs/operations.md, "Start")."""
    statistics = store.open_statistics()
    if statistics.not_open:
        log.info(
            "partitions: %d to open in the background (%d not closed cleanly: recovered first; "
            "requests for them are answered PARTITION_NOT_READY until then)",
            statistics.not_open,
            statistics.not_open_unclean,
        )
    store.start_background_open()
