"""One client connection to a nodi server: a thin asyncio loop around the sans-IO
protocol.Connection (client role).

`ClientConnection.open` connects and handshakes. Then `request` may be called by any
number of coroutines at once (pipelining): each waits for a slot (at most the
in_flight_requests_max both ends agree on), gets a request id, writes its frame (one
write() call per frame, so frames never interleave; a produce writes its header and its
batch bytes back to back with no await between them), and waits for its response. A
single reader task feeds every byte read into the protocol connection and resolves the
waiting future by request id; a response frees its slot.

When the connection ends (the server closed it, a Closing event, a protocol violation,
close()), every request still in flight fails with ConnectionLost: it may or may not have
been carried out. Nothing here retries; AsyncClient decides what is safe to send again.
Time limits are the caller's: wrap calls in asyncio.timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from ..protocol import messages as m
from ..protocol.connection import NEED_DATA, Connection, ConnectionClosed, Role
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.limits import ProtocolLimits
from .errors import AuthenticationRequired, ConnectFailed, ConnectionLost, NodiClientError, TlsFailed, error_for
from .tls import Credentials

READ_BYTES = 256 * 1024
# Records up to this size are copied behind the request header and written with it (one
# send call on the socket instead of two); larger batches are written after it as they are.
COALESCE_BYTES_MAX = 64 * 1024


class ClientConnection:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        protocol: Connection,
        address: tuple[str, int | str],  # (host, port), or ("unix", path)
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._protocol = protocol
        self.address = address
        self._pending: dict[int, asyncio.Future] = {}
        self._slots: asyncio.Semaphore | None = None
        self._error: ConnectionLost | None = None
        self._reader_task: asyncio.Task | None = None
        self.in_flight_requests_max = 0
        self.server_limits: dict[str, int] = {}
        self.server_id = ""
        self.principal = ""  # who the server says this connection acts as (after authenticating)

    # -- opening ------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        client_id: str,
        limits: ProtocolLimits,
        tls: ssl.SSLContext | None = None,
        credentials: Credentials | None = None,
    ) -> ClientConnection:
        """Connect (over TLS with `tls`), handshake, and authenticate with `credentials`
        (the caller bounds the time). Raises ConnectFailed; TlsFailed when the TLS
        handshake fails (an unknown CA, an expired certificate, another host's name);
        AuthenticationFailed when the server refuses the credentials."""
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        except ssl.SSLError as error:
            raise TlsFailed(f"TLS handshake with {host}:{port} failed: {_tls_reason(error)}") from None
        except OSError as error:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {error}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return await cls._start(reader, writer, (host, port), client_id, limits, credentials)

    @classmethod
    async def open_unix(cls, path: str, *, client_id: str, limits: ProtocolLimits) -> ClientConnection:
        """Connect to a Unix socket (an embedded owner's attach socket) and handshake
        (the caller bounds the time). Raises ConnectFailed."""
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError as error:
            raise ConnectFailed(f"cannot connect to unix:{path}: {error}") from None
        return await cls._start(reader, writer, ("unix", path), client_id, limits)

    @classmethod
    async def _start(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: tuple[str, int | str],
        client_id: str,
        limits: ProtocolLimits,
        credentials: Credentials | None = None,
    ) -> ClientConnection:
        host, port = address
        connection = cls(reader, writer, Connection(Role.CLIENT, limits), address)
        try:
            await connection._handshake(client_id)
            if credentials is not None:
                await connection._authenticate(credentials)
        except BaseException:
            writer.close()
            raise
        connection._reader_task = asyncio.get_running_loop().create_task(
            connection._read_loop(), name=f"nodi-client-reader-{host}:{port}"
        )
        return connection

    async def _exchange(self, request: m.Request, what: str) -> m.Message | None:
        """Send one request before the reader task runs and return the first event that
        comes back (None: the server closed the connection)."""
        protocol = self._protocol
        try:
            self._writer.write(protocol.send(request))
            await self._writer.drain()
            while True:
                event = protocol.next_event()
                if event is NEED_DATA:
                    protocol.receive_data(await self._reader.read(READ_BYTES))
                    continue
                # A client connection never yields RejectedRequest (the server's event).
                return event if isinstance(event, m.Message) else None
        except ssl.SSLError as error:
            raise TlsFailed(f"TLS with {self._address_text} failed during the {what}: {_tls_reason(error)}") from None
        except (OSError, ProtocolError) as error:
            raise ConnectFailed(f"{what} with {self._address_text}: {error}") from None

    async def _handshake(self, client_id: str) -> None:
        protocol = self._protocol
        request = m.HandshakeRequest(request_id=protocol.next_request_id(), client_id=client_id)
        event = await self._exchange(request, "handshake")
        if isinstance(event, m.HandshakeResponse) and event.error_code == ErrorCode.NONE:
            self.server_id = event.server_id
            self.server_limits = {limit.name: limit.value for limit in event.limits}
            ours = protocol.limits.in_flight_requests_max
            theirs = self.server_limits.get("in_flight_requests_max", ours)
            self.in_flight_requests_max = max(1, min(ours, theirs))
            self._slots = asyncio.Semaphore(self.in_flight_requests_max)
            return
        if isinstance(event, (m.HandshakeResponse, m.ClosingEvent, m.ErrorResponse)):
            raise ConnectFailed(
                f"{self._address_text} refused the handshake: {event.error_message}", code=event.error_code
            )
        hint = (
            "" if self._writer.get_extra_info("sslcontext") else " (a TLS server closes a plaintext client: give tls=)"
        )
        raise ConnectFailed(f"{self._address_text} closed the connection during the handshake{hint}")

    async def _authenticate(self, credentials: Credentials) -> None:
        """The Authenticate exchange: the principal, or AuthenticationFailed (the server
        closes the connection after a refusal)."""
        protocol = self._protocol
        request = m.AuthenticateRequest(
            request_id=protocol.next_request_id(), user=credentials.user, password=credentials.password
        )
        event = await self._exchange(request, "authentication")
        if isinstance(event, m.AuthenticateResponse) and event.error_code == ErrorCode.NONE:
            self.principal = event.principal
            return
        if isinstance(event, (m.Response, m.ClosingEvent)):
            error = error_for(event.error_code, event.error_message)
            if isinstance(error, ConnectFailed):
                raise error
            raise ConnectFailed(f"{self._address_text} refused authentication: {error}", code=event.error_code)
        raise ConnectFailed(f"{self._address_text} closed the connection during authentication")

    @property
    def _address_text(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    # -- requests -----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._error is None

    @property
    def in_flight_count(self) -> int:
        return len(self._pending)

    async def request(self, message: m.Request, records: bytes | bytearray | memoryview | None = None) -> m.Response:
        """Send `message` (its request id is assigned here) and wait for its response,
        which is returned whatever its error code. With `records`, they are sent as the
        message's records field, written after the header without a copy. Raises
        ConnectionLost when the connection ends first, and the client error for a request
        the codec refuses (over frame_bytes_max...)."""
        if self._error is not None:
            raise self._lost()
        assert self._slots is not None
        await self._slots.acquire()
        try:
            if self._error is not None:
                raise self._lost()
            try:
                request_id, frame = self._protocol.send_request(message, None if records is None else len(records))
            except ProtocolError as error:
                if error.closes_connection:
                    self._fail(ConnectionLost(f"protocol error: {error}"))
                    raise self._lost() from None
                raise error_for(error.code, error.message) from None
            future = asyncio.get_running_loop().create_future()
            self._pending[request_id] = future
        except BaseException:
            self._slots.release()
            raise
        # From here on the slot is the reader's to free, when the response comes (or the
        # connection ends): the server counts the request in flight until it answers.
        writer = self._writer
        if records is None:
            writer.write(frame)
        elif len(records) <= COALESCE_BYTES_MAX:
            writer.write(b"".join((frame, records)))  # one send call, not two
        else:
            writer.write(frame)
            writer.write(records)
        if writer.transport.get_write_buffer_size() > 0:
            try:
                await writer.drain()
            except (OSError, RuntimeError) as error:
                self._fail(ConnectionLost(f"write to {self._address_text} failed: {error}"))
        return await future

    def _lost(self) -> ConnectionLost:
        error = self._error
        assert error is not None
        return type(error)(error.message, code=error.code)

    # -- reading ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        protocol = self._protocol
        pending = self._pending
        slots = self._slots
        assert slots is not None  # made by the handshake, before this loop starts
        reason: ConnectionLost | None = None
        try:
            while True:
                data = await self._reader.read(READ_BYTES)
                protocol.receive_data(data)
                while True:
                    event = protocol.next_event()
                    if event is NEED_DATA:
                        break
                    if isinstance(event, ConnectionClosed):
                        if reason is None:
                            reason = ConnectionLost(f"{self._address_text} closed the connection")
                        return
                    if isinstance(event, m.ClosingEvent):
                        refused = event.error_code == ErrorCode.AUTHENTICATION_REQUIRED
                        reason = (AuthenticationRequired if refused else ConnectionLost)(
                            f"{self._address_text} closed the connection: {event.error_message}",
                            code=event.error_code,
                        )
                        continue
                    future = pending.pop(event.request_id, None)
                    slots.release()
                    if future is not None and not future.done():
                        future.set_result(event)
        except ProtocolError as error:
            reason = ConnectionLost(f"protocol error from {self._address_text}: {error}", code=error.code)
        except OSError as error:
            reason = ConnectionLost(f"connection to {self._address_text} broke: {error}")
        except asyncio.CancelledError:
            reason = ConnectionLost(f"connection to {self._address_text} closed by the client")
            raise
        finally:
            self._fail(reason or ConnectionLost(f"connection to {self._address_text} ended"))

    def _fail(self, error: ConnectionLost) -> None:
        """End the connection: every request in flight fails with `error`."""
        if self._error is None:
            self._error = error
        self._protocol.close()
        self._writer.close()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self._lost())
        if self._slots is not None:
            # Wake anyone waiting for a slot: they see the error and give up.
            for _ in range(len(pending) + 1):
                self._slots.release()

    # -- closing ------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the socket and fail the requests in flight; waits for the reader task."""
        if self._error is None:
            self._fail(ConnectionLost(f"connection to {self._address_text} closed by the client"))
        task = self._reader_task
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1)


def _tls_reason(error: ssl.SSLError) -> str:
    """What an SSLError means, in one line: the verification message when there is one
    (certificate has expired, unable to get local issuer certificate, ...)."""
    return getattr(error, "verify_message", None) or error.reason or str(error)


def check_response(response: m.Response) -> m.Response:
    """`response`, or the client error its error code stands for."""
    if response.error_code != ErrorCode.NONE:
        raise error_for(response.error_code, response.error_message)
    return response


__all__ = ["ClientConnection", "check_response", "NodiClientError"]
