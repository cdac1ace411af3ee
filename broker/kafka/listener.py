"""The Kafka listener's asyncio loop, on the broker's own event loop: accept, read, feed
the sans-IO KafkaConnection, serve each request as a task, write the responses in the
order the requests came (Kafka's clients match them by order as well as by correlation
id). At most `in_flight_requests_max` requests per connection are being served; past
that the connection is not read until the oldest is answered.

A request that cannot be decoded (or is over request_bytes_max) closes its connection
with a log line; the broker and every other connection carry on. The same deadlines as
nodi's own connections apply: a request must arrive whole within frame_timeout_ms of
its first byte; a connection idle for idle_timeout_ms is closed.

Security (docs/security.md): the listener speaks TLS when the broker has a certificate
(the same context as nodi's listener, so SIGHUP's reload reaches both). When the broker
has users, a connection's first requests are ApiVersions and SASL (sasl.py), served one
at a time; any other request before SASL succeeded closes the connection (as Kafka
does), and so does a failed exchange. A verified client certificate naming a user
authenticates the connection without SASL. Each later request is checked against the
principal's permissions (authorization.py) before the handlers see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..server.read_throttle import ReadThrottle
from ..server.security import certificate_common_name
from ..server.security_settings import is_loopback
from ..server.users import ANONYMOUS, Principal
from .apis import API_VERSIONS, SASL_AUTHENTICATE, SASL_HANDSHAKE
from .authorization import authorize
from .connection import (
    RAW_SASL_TOKEN,
    KafkaConnection,
    KafkaRequest,
    encode_error_only,
    encode_response,
    encode_unsupported,
)
from .errors import KafkaDecodeError, KafkaError
from .handlers import SENDFILE_BYTES_MIN, KafkaHandlers, RecordSlices
from .sasl import SaslExchange, SaslRefused, offered_mechanisms

if TYPE_CHECKING:
    from nodi.storage.log import FileSlice

    from ..protocol import messages as m
    from ..server.reply import Reply
    from ..server.security import Security
    from ..server.service import Broker
    from .settings import KafkaSettings

log = logging.getLogger("nodi.kafka")

READ_BYTES = 256 * 1024


class _Closing(Exception):
    """Answer what is queued, then close this connection (a refused authentication)."""


class _Session:
    """One connection's security state."""

    __slots__ = ("peer", "tls", "principal", "counted", "exchange", "raw_tokens")

    def __init__(self, peer: object, tls: bool) -> None:
        self.peer = peer
        self.tls = tls
        self.principal: Principal | None = None  # None until SASL or a certificate says
        self.counted = False  # in Security's per-principal connection count
        self.exchange: SaslExchange | None = None
        self.raw_tokens = False  # a v0 SaslHandshake: the tokens come as raw frames


class KafkaListener:
    def __init__(
        self,
        broker: Broker,
        settings: KafkaSettings,
        observe: Callable[[m.Request, Reply, float], None] | None = None,
        security: Security | None = None,
    ) -> None:
        self.broker = broker
        self.settings = settings
        if security is None:  # an open broker (tests that build a listener by hand)
            from ..server.security import Security
            from ..server.security_settings import DEFAULT_SECURITY_SETTINGS

            security = Security(DEFAULT_SECURITY_SETTINGS)
        self.security = security
        self._observe = observe
        self.limits = settings.limits(broker.config.protocol.array_items_max)
        self.address: tuple[str, int] | None = None
        self.handlers: KafkaHandlers | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()
        self.connections_accepted = 0
        self.connections_refused = 0
        self.connections_closed_for_bad_input = 0
        self._sendfile = True

    async def start(self, tasks: asyncio.TaskGroup, sock: socket.socket) -> None:
        """Listen on `sock` (bound by the server before it opened the data directory);
        connections and the group timer run in `tasks`."""
        tls = self.security.tls_context
        self._server = await asyncio.start_server(
            lambda reader, writer: self._accept(tasks, reader, writer),
            sock=sock,
            ssl=tls,
            ssl_handshake_timeout=self.broker.config.handshake_timeout_ms / 1000 if tls is not None else None,
        )
        self.address = self._server.sockets[0].getsockname()[:2]
        advertised = (
            self.settings.advertised_host or self.address[0],
            self.settings.advertised_port if self.settings.advertised_port >= 0 else self.address[1],
        )
        self.handlers = KafkaHandlers(self.broker, self.settings, advertised, self._observe)
        tasks.create_task(self.handlers.groups.run_timer())

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    def _accept(self, tasks: asyncio.TaskGroup, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self._connections) >= self.broker.config.connections_max:
            # The server's connections_max bounds Kafka connections too (counted apart).
            self.connections_refused += 1
            log.warning("kafka connection refused: connections_max %d reached", self.broker.config.connections_max)
            writer.close()
            return
        if not self.security.accept_connection("kafka", writer.get_extra_info("peername")):
            self.connections_refused += 1  # connections_total_max, over both listeners
            writer.close()
            return
        self.connections_accepted += 1
        task = tasks.create_task(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connection_ended)

    def _connection_ended(self, task: asyncio.Task) -> None:
        self._connections.discard(task)
        self.security.release_connection()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        session = _Session(peer, writer.get_extra_info("sslcontext") is not None)
        connection = KafkaConnection(self.limits)
        # Responses in request order: each entry is the task serving one request.
        pending: asyncio.Queue[asyncio.Future | None] = asyncio.Queue(self.limits.in_flight_requests_max)
        # sendfile would put file bytes on a TLS connection unencrypted: copy instead.
        writer_task = asyncio.ensure_future(self._write_loop(pending, writer, sendfile=not session.tls))
        try:
            if not self._start_session(session, writer.get_extra_info("peercert")):
                return
            await self._read_loop(reader, connection, pending, writer_task, session)
        except KafkaDecodeError as error:
            self.connections_closed_for_bad_input += 1
            log.warning("kafka connection %s closed: %s", peer, error.message)
        except (ConnectionError, TimeoutError) as error:
            log.debug("kafka connection %s ended: %s", peer, error)
        except Exception:  # a bug: this connection ends, the server carries on
            log.exception("kafka connection %s failed", peer)
        finally:
            if session.counted:
                assert session.principal is not None
                self.security.close_connection(session.principal)
            writer_task.cancel()
            with contextlib.suppress(BaseException):
                await writer_task
            while not pending.empty():
                future = pending.get_nowait()
                if future is not None:
                    future.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _read_loop(
        self,
        reader: asyncio.StreamReader,
        connection: KafkaConnection,
        pending: asyncio.Queue,
        writer_task: asyncio.Future,
        session: _Session,
    ) -> None:
        config = self.broker.config
        loop = asyncio.get_running_loop()
        frame_deadline: float | None = None
        throttle = self.security.read_throttle("kafka")  # bytes in flight, request rate
        while True:
            deadline = frame_deadline or loop.time() + config.idle_timeout_ms / 1000
            async with asyncio.timeout_at(deadline):  # answers drain as handlers finish
                await throttle.wait()
            read = asyncio.ensure_future(reader.read(READ_BYTES))
            done, _ = await asyncio.wait(
                {read, writer_task}, timeout=max(deadline - loop.time(), 0), return_when=asyncio.FIRST_COMPLETED
            )
            if writer_task in done:
                read.cancel()
                writer_task.result()  # the write side failed: raise its error
                return
            if read not in done:
                read.cancel()
                raise TimeoutError("a request not received whole within frame_timeout_ms" if frame_deadline else "idle")
            data = read.result()
            if not data:
                await pending.put(None)  # answer what was asked, then end
                await asyncio.wait_for(writer_task, config.write_timeout_ms / 1000)
                return
            connection.receive_data(data)
            while (request := connection.next_request()) is not None:
                if session.principal is None or request.api_key in _SASL_KEYS:
                    try:  # one at a time: the exchange decides what the next request may be
                        parts = await self._authenticate(session, connection, request)
                    except _Closing as closing:
                        await pending.put(_done(closing.args[0] if closing.args else None))
                        await pending.put(None)
                        await asyncio.wait_for(writer_task, config.write_timeout_ms / 1000)
                        return
                    await pending.put(_done(parts))
                    continue
                throttle.started(request.size)
                future = self._start(request, session.principal)
                future.add_done_callback(functools.partial(_answered, throttle, request.size))
                await pending.put(future)
            frame_deadline = (
                (frame_deadline or loop.time() + config.frame_timeout_ms / 1000) if connection.buffered_bytes else None
            )

    def _start(self, request: KafkaRequest, principal: Principal) -> asyncio.Future:
        if not request.supported:
            return _done(encode_unsupported(request))
        decision = authorize(self.security, principal, request)
        if decision.unknown_key:
            return _done(encode_error_only(request, KafkaError.CLUSTER_AUTHORIZATION_FAILED))
        if decision.refusal is not None:
            return _done(encode_response(request, decision.refusal))
        return asyncio.ensure_future(self._respond(request, decision.merge))

    async def _respond(self, request: KafkaRequest, merge: Callable | None = None) -> list[bytes] | None:
        assert self.handlers is not None
        body: dict[str, Any] | None = await self.handlers.handle(request)
        if merge is not None:
            body = merge(body)
        return None if body is None else encode_response(request, body)

    # -- authentication -------------------------------------------------------------------

    def _start_session(self, session: _Session, certificate: dict | None) -> bool:
        """Before the first read: the principal of an open broker or of a verified client
        certificate naming a user. False: refused (counted); the connection closes."""
        security = self.security
        if not security.required:
            session.principal = ANONYMOUS
        if certificate_common_name(certificate) is None:
            return True  # no client certificate: SASL decides
        principal = security.principal_of_certificate(certificate)
        if principal is None or not security.open_connection(principal):
            return False
        session.principal, session.counted = principal, True
        return True

    async def _authenticate(self, session: _Session, connection: KafkaConnection, request: KafkaRequest) -> list[bytes]:
        """Serve a request of a connection not yet authenticated (or a SASL request of
        one that is): ApiVersions, SaslHandshake, SaslAuthenticate or a raw token. The
        answer's bytes; _Closing (with the last answer, if any) when the connection ends."""
        security = self.security
        if request.api_key == API_VERSIONS.key:
            return await self._respond(request) if request.supported else encode_unsupported(request)  # type: ignore[return-value]
        if request.api_key not in _SASL_KEYS:
            security.refuse("not_authenticated", None, session.peer)
            log.warning(
                "kafka connection %s closed: %s before SASL authentication (this broker has users)",
                session.peer,
                _api_name(request),
            )
            raise _Closing()
        if not request.supported:
            security.refuse("sasl_protocol", None, session.peer)
            raise _Closing(encode_unsupported(request))
        assert request.body is not None
        if request.api_key == SASL_HANDSHAKE.key:
            return self._handshake(session, connection, request)
        return await self._sasl_token(session, connection, request)

    def _handshake(self, session: _Session, connection: KafkaConnection, request: KafkaRequest) -> list[bytes]:
        security = self.security
        assert request.body is not None
        mechanism = request.body["mechanism"]
        mechanisms = offered_mechanisms(security, tls=session.tls, plain_allowed=self._plain_allowed(session))
        answer = {"error_code": 0, "mechanisms": mechanisms}
        if session.principal is not None or session.exchange is not None:
            reason, error = (
                ("replayed", KafkaError.ILLEGAL_SASL_STATE)
                if security.required
                else ("no_users_file", KafkaError.ILLEGAL_SASL_STATE)
            )
            security.refuse(reason, None, session.peer)
            raise _Closing(encode_response(request, {**answer, "error_code": error}))
        if mechanism not in mechanisms:
            security.refuse("mechanism", None, session.peer)
            log.warning(
                "kafka connection %s asked for SASL mechanism %r; this connection is offered %s%s",
                session.peer,
                mechanism,
                ", ".join(mechanisms) or "none",
                " (PLAIN needs TLS, or kafka.sasl_plain_on_loopback for a loopback client)"
                if mechanism == "PLAIN"
                else "",
            )
            raise _Closing(encode_response(request, {**answer, "error_code": KafkaError.UNSUPPORTED_SASL_MECHANISM}))
        session.exchange = SaslExchange(security, mechanism)
        if request.api_version == 0:
            session.raw_tokens = True
            connection.expect_raw_token = True
        return encode_response(request, answer)

    async def _sasl_token(self, session: _Session, connection: KafkaConnection, request: KafkaRequest) -> list[bytes]:
        security = self.security
        assert request.body is not None
        raw = request.api_key == RAW_SASL_TOKEN
        exchange = session.exchange
        failure: SaslRefused | None = None
        if exchange is None or session.principal is not None or raw != session.raw_tokens:
            failure = SaslRefused(
                "sasl_protocol" if session.principal is None else "replayed", "SaslAuthenticate out of order"
            )
        else:
            try:
                token, principal = await exchange.step(request.body["auth_bytes"])
            except SaslRefused as refused:
                failure = refused
            else:
                if principal is not None and not security.open_connection(principal):
                    failure = SaslRefused(None, f"{principal.name} has connections_per_principal_max connections open")
                elif principal is not None:
                    session.principal, session.counted = principal, True
                    connection.expect_raw_token = False
                    log.debug(
                        "kafka connection %s authenticated as %s (%s)", session.peer, principal.name, exchange.mechanism
                    )
                elif raw:
                    connection.expect_raw_token = True  # the exchange's next token
                if failure is None:
                    if raw:
                        return [struct.pack(">i", len(token)), token]
                    return encode_response(
                        request, {"error_code": 0, "error_message": None, "auth_bytes": token, "session_lifetime_ms": 0}
                    )
        if failure.reason is not None:
            security.refuse(failure.reason, failure.user, session.peer)
        log.warning("kafka connection %s: SASL authentication failed: %s", session.peer, failure.message)
        if raw:
            raise _Closing()  # a raw exchange has no way to say why: Kafka closes as well
        error = (
            KafkaError.ILLEGAL_SASL_STATE
            if failure.reason in ("sasl_protocol", "replayed")
            else KafkaError.SASL_AUTHENTICATION_FAILED
        )
        raise _Closing(
            encode_response(
                request,
                {"error_code": error, "error_message": failure.message, "auth_bytes": b"", "session_lifetime_ms": 0},
            )
        )

    def _plain_allowed(self, session: _Session) -> bool:
        """PLAIN without TLS: only for a loopback peer, when the operator opted in."""
        if not self.settings.sasl_plain_on_loopback:
            return False
        host = session.peer[0] if isinstance(session.peer, tuple) and session.peer else ""
        return is_loopback(str(host))

    async def _write_loop(self, pending: asyncio.Queue, writer: asyncio.StreamWriter, *, sendfile: bool = True) -> None:
        timeout_s = self.broker.config.write_timeout_ms / 1000
        while True:
            future = await pending.get()
            if future is None:
                return
            parts = await future
            if parts is None:
                continue  # a produce with acks=0: Kafka sends no response
            await self._write_parts(writer, parts, timeout_s, sendfile)

    async def _write_parts(
        self, writer: asyncio.StreamWriter, parts: list, timeout_s: float, sendfile: bool = True
    ) -> None:
        """One response: its bytes, and a fetch's stored batches after the bytes before
        them, small slices copied into the same write, large ones with sendfile."""
        pending: list[bytes] = []
        for part in parts:
            if not isinstance(part, RecordSlices):
                pending.append(part)
                continue
            for piece in part.slices:
                if piece.length < SENDFILE_BYTES_MIN or not self._sendfile or not sendfile:
                    pending.append(piece.read())
                    continue
                writer.writelines(pending)
                pending = []
                await self._send_slice(writer, piece, timeout_s)
        writer.writelines(pending)
        if writer.transport.get_write_buffer_size():
            await asyncio.wait_for(writer.drain(), timeout_s)

    async def _send_slice(self, writer: asyncio.StreamWriter, piece: FileSlice, timeout_s: float) -> None:
        fd = piece.file.fileno()
        if fd is not None and self._sendfile:
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.get_running_loop().sendfile(
                        writer.transport,
                        _SendfileSource(fd),  # type: ignore[arg-type]  # a descriptor is all sendfile uses
                        piece.position,
                        piece.length,
                        fallback=False,
                    )
                return
            except (asyncio.SendfileNotAvailableError, RuntimeError, NotImplementedError):
                self._sendfile = False  # this loop or transport cannot: copy from now on
        writer.write(piece.read())


_SASL_KEYS = frozenset({SASL_HANDSHAKE.key, SASL_AUTHENTICATE.key, RAW_SASL_TOKEN})


def _done(result: object) -> asyncio.Future:
    future: asyncio.Future = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


def _api_name(request: KafkaRequest) -> str:
    from .apis import APIS

    api = APIS.get(request.api_key)
    return f"{api.name} v{request.api_version}" if api is not None else f"API key {request.api_key}"


class _SendfileSource:
    """What loop.sendfile needs of a segment file: a descriptor, and a seek it may call
    (the position is given to sendfile itself)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def seek(self, offset: int, whence: int = 0) -> int:
        return offset


def _answered(throttle: ReadThrottle, size: int, _: asyncio.Future) -> None:
    throttle.answered(size)
