"""The console's HTTP/1.1 server: an asyncio loop around h11's sans-IO connection, on
the broker's own event loop.

Each connection reads with a deadline, feeds h11, and answers one request at a time
(keep-alive, no pipelining beyond what h11 buffers). A request head over
request_head_bytes_max, a body over request_body_bytes_max, a request not whole within
request_timeout_ms, or bytes h11 cannot parse get an error status and a closed
connection; the broker and the other connections carry on. Handlers are given a parsed
Request and return a Response; they never see h11.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

log = logging.getLogger("nodi.console")


@dataclass(frozen=True, slots=True)
class ConsoleLimits:
    """Every growing thing of the console server has its limit here."""

    # Open console connections; one more is answered 503 and closed.
    connections_max: int = 64
    # A request line plus headers; more is refused with 431.
    request_head_bytes_max: int = 16 * 1024
    # A form body; more is refused with 413 (the console's forms are a few hundred bytes).
    request_body_bytes_max: int = 64 * 1024
    # A request must arrive whole within this from the start of the wait for it (an
    # idle keep-alive connection is closed after it too).
    request_timeout_ms: int = 30_000
    # A response must be taken by the peer within this.
    write_timeout_ms: int = 30_000
    # Pages built at once (each on a console worker thread); others wait their turn.
    pages_in_progress_max: int = 4
    # A page must be built within this (waiting for a worker included), else 503.
    page_timeout_ms: int = 60_000


DEFAULT_CONSOLE_LIMITS = ConsoleLimits()


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    headers: dict[str, str]
    peer: str
    # A verified client certificate (TLS with client certificates), as getpeercert() gives it.
    peer_certificate: dict | None = None
    # Who asks (nodi.broker.server.users.Principal), set by the console once it knows.
    principal: Any = None

    def param(self, name: str, default: str = "") -> str:
        """A form field (POST) or query parameter, stripped; `default` when absent or empty."""
        value = self.form.get(name) or self.query.get(name) or ""
        return value.strip() or default


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Response]]


def plain_response(status: int, text: str) -> Response:
    return Response(status, (text + "\n").encode(), "text/plain; charset=utf-8")


def _single_values(pairs: dict[str, list[str]]) -> dict[str, str]:
    return {name: values[-1] for name, values in pairs.items()}


class HttpServer:
    """Serves `handler` on a socket bound beforehand (bind() before the data directory
    is opened, so a taken port refuses the start having touched nothing)."""

    def __init__(self, host: str, port: int, handler: Handler, limits: ConsoleLimits = DEFAULT_CONSOLE_LIMITS):
        self.host = host
        self.port = port
        self.handler = handler
        self.limits = limits
        self._socket: socket.socket | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.connections_refused = 0
        self.tls = False

    def bind(self) -> None:
        family, kind, proto, _name, address = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.setblocking(False)
        except OSError as error:
            sock.close()
            raise OSError(
                error.errno, f"cannot serve the console on {self.host}:{self.port}: {error.strerror}"
            ) from None
        self._socket = sock
        self.port = sock.getsockname()[1]

    async def start(
        self, tasks: asyncio.TaskGroup, tls: ssl.SSLContext | None = None, handshake_timeout_ms: int = 10_000
    ) -> None:
        """Listen; with `tls`, HTTPS only (the broker's context: a SIGHUP's certificate
        reload applies to the connections accepted after it)."""
        assert self._socket is not None
        self.tls = tls is not None
        self._listener = await asyncio.start_server(
            lambda reader, writer: self._accept(tasks, reader, writer),
            sock=self._socket,
            ssl=tls,
            ssl_handshake_timeout=handshake_timeout_ms / 1000 if tls is not None else None,
        )

    def close(self) -> None:
        """Stop listening and close every console connection (a page being built on a
        worker thread finishes there; its answer goes nowhere)."""
        if self._listener is not None:
            self._listener.close()
        elif self._socket is not None:
            self._socket.close()
        for writer in list(self._connections):
            writer.close()

    def _accept(self, tasks: asyncio.TaskGroup, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.limits.connections_max:
            self.connections_refused += 1
            tasks.create_task(self._refuse(writer))
            return
        self._connections.add(writer)
        tasks.create_task(self._serve(reader, writer))

    async def _refuse(self, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            if self._listener is not None
            else b""
        )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), self.limits.write_timeout_ms / 1000)
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        certificate = writer.get_extra_info("peercert") or None
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.request_head_bytes_max)
        try:
            while True:
                try:
                    request = await self._read_request(connection, reader, peer, certificate)
                except h11.RemoteProtocolError as error:
                    if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        status = error.error_status_hint
                        await self._send(connection, writer, plain_response(status, f"bad request: {error}"))
                    return
                except _Refused as refusal:
                    await self._send(connection, writer, refusal.response)
                    return
                except TimeoutError:
                    return
                if request is None:
                    return
                try:
                    response = await self.handler(request)
                except Exception:  # a bug: this request fails, the console carries on
                    log.exception("console: %s %s failed", request.method, request.path)
                    response = plain_response(500, "internal error: the broker's log has the details")
                await self._send(connection, writer, response)
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (ConnectionError, TimeoutError, h11.LocalProtocolError) as error:
            log.debug("console connection %s ended: %s", peer, error)
        finally:
            self._connections.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _read_request(
        self, connection: h11.Connection, reader: asyncio.StreamReader, peer: str, certificate: dict | None
    ):
        """The next whole request (None: the peer closed between requests), within
        request_timeout_ms."""
        limits = self.limits
        head: h11.Request | None = None
        body = bytearray()
        async with asyncio.timeout(limits.request_timeout_ms / 1000):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(64 * 1024)
                    connection.receive_data(data)
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return None
                if isinstance(event, h11.Request):
                    head = event
                    # h11 bounds a head that arrives in pieces; one that arrives whole is measured here.
                    head_bytes = len(event.target) + sum(len(name) + len(value) + 4 for name, value in event.headers)
                    if head_bytes > limits.request_head_bytes_max:
                        raise _Refused(plain_response(431, f"request head over {limits.request_head_bytes_max} bytes"))
                    length = dict(event.headers).get(b"content-length")
                    if length is not None and length.isdigit() and int(length) > limits.request_body_bytes_max:
                        raise _Refused(plain_response(413, f"request body over {limits.request_body_bytes_max} bytes"))
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limits.request_body_bytes_max:
                        raise _Refused(plain_response(413, f"request body over {limits.request_body_bytes_max} bytes"))
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    return _parse(head, bytes(body), peer, certificate)

    async def _send(self, connection: h11.Connection, writer: asyncio.StreamWriter, response: Response) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("cache-control", "no-store"),
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("referrer-policy", "same-origin"),
            ("content-security-policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"),
            *response.headers,
        ]
        data = connection.send(h11.Response(status_code=response.status, headers=headers))
        assert data is not None
        writer.write(data)
        writer.write(connection.send(h11.Data(data=response.body)) or b"")
        writer.write(connection.send(h11.EndOfMessage()) or b"")
        await asyncio.wait_for(writer.drain(), self.limits.write_timeout_ms / 1000)


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def _parse(head: h11.Request, body: bytes, peer: str, certificate: dict | None = None) -> Request:
    target = head.target.decode("ascii", errors="replace")
    parts = urlsplit(target)
    headers = {name.decode("ascii", "replace").lower(): value.decode("latin-1") for name, value in head.headers}
    form: dict[str, str] = {}
    if body and headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        form = _single_values(parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True))
    return Request(
        method=head.method.decode("ascii", errors="replace"),
        path=parts.path or "/",
        query=_single_values(parse_qs(parts.query, keep_blank_values=True)),
        form=form,
        headers=headers,
        peer=peer,
        peer_certificate=certificate,
    )
