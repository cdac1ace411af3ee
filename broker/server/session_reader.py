"""The stream a client connection is read from (ClientSession._read_frames, server.py).

asyncio.StreamReader.read(n) copies what it returns out of its buffer twice (a slice
of the bytearray, then bytes of that) and deletes it from the buffer, and the caller
copies it once more into the protocol Connection's own buffer. SessionReader is a
StreamReader with one more read, read_available: when all the buffered bytes fit, it
hands over the buffer itself and starts a new one, so the Connection's copy is the only
one. Everything else is StreamReader's own: its waiter, EOF, the exception a lost
connection sets, and its flow control (reading pauses past twice its limit buffered,
and resumes once a read takes the buffer down to the limit).

Per chunk the transport delivers, its feed_data is StreamReader's with the waiter woken
inline, and SessionProtocol hands the chunk to it directly; per read that waits,
read_available waits as _wait_for_data does, in its own frame. A few Python calls fewer
a request, the loop's turn and the task's wake-up unchanged.

It leans on StreamReader's private fields (_buffer, _eof, _exception, _waiter, _paused,
_transport, _limit, _loop) and _maybe_resume_transport, as in CPython 3.11 (the
project's Python): tests/test_server_reader.py holds read_available and its pauses to
StreamReader.read's on the same input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, SupportsIndex


class SessionReader(asyncio.StreamReader):
    """A StreamReader whose read_available does not copy; see the module docstring."""

    # StreamReader's private fields, set by its __init__ (typeshed leaves them out).
    _buffer: bytearray
    _eof: bool
    _waiter: asyncio.Future[None] | None
    _exception: BaseException | None
    _transport: asyncio.ReadTransport | None
    _paused: bool
    _limit: int
    _loop: asyncio.AbstractEventLoop
    _maybe_resume_transport: Callable[[], None]

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        """StreamReader.feed_data, its waiter woken here rather than in a call of its own."""
        assert not self._eof, "feed_data after feed_eof"
        if not data:
            return
        buffer = self._buffer
        buffer.extend(data)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.cancelled():
                waiter.set_result(None)
        if self._transport is not None and not self._paused and len(buffer) > 2 * self._limit:
            try:
                self._transport.pause_reading()
            except NotImplementedError:  # a transport that cannot pause: all is buffered
                self._transport = None
            else:
                self._paused = True

    async def read_available(self, bytes_max: int) -> bytes | bytearray:
        """What read(bytes_max) returns: at most bytes_max bytes once any are buffered,
        b"" at EOF, the connection's error raised; the buffer itself when it fits."""
        if self._exception is not None:
            raise self._exception
        if not self._buffer and not self._eof:
            # StreamReader._wait_for_data, here rather than in a coroutine of its own.
            if self._waiter is not None:
                raise RuntimeError("read_available() called while another read waits")
            if self._paused:  # waiting while paused would wait forever
                assert self._transport is not None  # only a transport pauses
                self._paused = False
                self._transport.resume_reading()
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        buffer = self._buffer
        if not buffer:
            return b""  # EOF
        data: bytes | bytearray
        if len(buffer) > bytes_max:
            data = bytes(memoryview(buffer)[:bytes_max])
            del buffer[:bytes_max]
        else:
            data = buffer
            self._buffer = bytearray()
        self._maybe_resume_transport()
        return data


class SessionProtocol(asyncio.StreamReaderProtocol):
    """A StreamReaderProtocol whose transport hands each chunk straight to the reader's
    feed_data: StreamReaderProtocol.data_received looks the reader up through a weak
    reference first, a property and two calls more for each chunk. The reader is held
    until the connection is lost (the protocol's writer holds it as long anyway)."""

    def __init__(
        self,
        reader: SessionReader,
        connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(reader, connected, loop=loop)
        self.data_received = reader.feed_data  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        del self.data_received  # back to StreamReaderProtocol's, the reader let go
        super().connection_lost(exc)


def session_protocol_factory(
    connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any], loop: asyncio.AbstractEventLoop
) -> Callable[[], asyncio.StreamReaderProtocol]:
    """For loop.create_server: asyncio.start_server's factory, with a SessionReader
    (and StreamReader's default limit)."""

    def factory() -> asyncio.StreamReaderProtocol:
        return SessionProtocol(SessionReader(loop=loop), connected, loop)

    return factory
