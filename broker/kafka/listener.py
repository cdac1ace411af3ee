"""The Kafka listener's asyncio loop, on the broker's own event loop: accept, read, feed
the sans-IO KafkaConnection, serve each request as a task, write the responses in the
order the requests came (Kafka's clients match them by order as well as by correlation
id). At most `in_flight_requests_max` requests per connection are being served; past
that the connection is not read until the oldest is answered.

A request that cannot be decoded (or is over request_bytes_max) closes its connection
with a log line; the broker and every other connection carry on. The same deadlines as
nodi's own connections apply: a request must arrive whole within frame_timeout_ms of
its first byte; a connection idle for idle_timeout_ms is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .connection import KafkaConnection, KafkaRequest, encode_response, encode_unsupported
from .errors import KafkaDecodeError
from .handlers import SENDFILE_BYTES_MIN, KafkaHandlers, RecordSlices

if TYPE_CHECKING:
    from nodi.storage.log import FileSlice

    from ..protocol import messages as m
    from ..server.reply import Reply
    from ..server.service import Broker
    from .settings import KafkaSettings

log = logging.getLogger("nodi.kafka")

READ_BYTES = 256 * 1024


class KafkaListener:
    def __init__(
        self,
        broker: Broker,
        settings: KafkaSettings,
        observe: Callable[[m.Request, Reply, float], None] | None = None,
    ) -> None:
        self.broker = broker
        self.settings = settings
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
        self._server = await asyncio.start_server(lambda reader, writer: self._accept(tasks, reader, writer), sock=sock)
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
        self.connections_accepted += 1
        task = tasks.create_task(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        connection = KafkaConnection(self.limits)
        # Responses in request order: each entry is the task serving one request.
        pending: asyncio.Queue[asyncio.Future | None] = asyncio.Queue(self.limits.in_flight_requests_max)
        writer_task = asyncio.ensure_future(self._write_loop(pending, writer))
        try:
            await self._read_loop(reader, connection, pending, writer_task)
        except KafkaDecodeError as error:
            self.connections_closed_for_bad_input += 1
            log.warning("kafka connection %s closed: %s", peer, error.message)
        except (ConnectionError, TimeoutError) as error:
            log.debug("kafka connection %s ended: %s", peer, error)
        except Exception:  # a bug: this connection ends, the server carries on
            log.exception("kafka connection %s failed", peer)
        finally:
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
    ) -> None:
        config = self.broker.config
        loop = asyncio.get_running_loop()
        frame_deadline: float | None = None
        while True:
            deadline = frame_deadline or loop.time() + config.idle_timeout_ms / 1000
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
                await pending.put(self._start(request))
            frame_deadline = (
                (frame_deadline or loop.time() + config.frame_timeout_ms / 1000) if connection.buffered_bytes else None
            )

    def _start(self, request: KafkaRequest) -> asyncio.Future:
        if not request.supported:
            future: asyncio.Future = asyncio.get_running_loop().create_future()
            future.set_result(encode_unsupported(request))
            return future
        return asyncio.ensure_future(self._respond(request))

    async def _respond(self, request: KafkaRequest) -> list[bytes] | None:
        assert self.handlers is not None
        body: dict[str, Any] | None = await self.handlers.handle(request)
        return None if body is None else encode_response(request, body)

    async def _write_loop(self, pending: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        timeout_s = self.broker.config.write_timeout_ms / 1000
        while True:
            future = await pending.get()
            if future is None:
                return
            parts = await future
            if parts is None:
                continue  # a produce with acks=0: Kafka sends no response
            await self._write_parts(writer, parts, timeout_s)

    async def _write_parts(self, writer: asyncio.StreamWriter, parts: list, timeout_s: float) -> None:
        """One response: its bytes, and a fetch's stored batches after the bytes before
        them, small slices copied into the same write, large ones with sendfile."""
        pending: list[bytes] = []
        for part in parts:
            if not isinstance(part, RecordSlices):
                pending.append(part)
                continue
            for piece in part.slices:
                if piece.length < SENDFILE_BYTES_MIN or not self._sendfile:
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
