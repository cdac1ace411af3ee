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
read_available waits as _wait_for_data does, in its own frame.

A chunk that arrives while read_available waits and nothing is buffered is first
offered to the session's take_nowait hook (ClientSession._take_nowait): a connection
between frames feeds its protocol Connection and starts the chunk's requests right
there, and the reading task is not woken at all (no future resolved, no loop turn for
the task, no resumption of its coroutines). What the hook leaves to the task (an event
that is not a request, an error, a frame left incomplete, the read throttle) it hands
over with interrupt(): the waiting read_available returns None.

It leans on StreamReader's private fields (_buffer, _eof, _exception, _waiter, _paused,
_transport, _limit, _loop) and _maybe_resume_transport, as in CPython 3.11 (the
project's Python): tests/test_server_reader.py holds read_available and its pauses to
StreamReader.read's on the same input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, SupportsIndex

_INTERRUPTED = object()  # the result of a waiter woken by interrupt()


class SessionReader(asyncio.StreamReader):
    """A StreamReader whose read_available does not copy; see the module docstring."""

    # StreamReader's private fields, set by its __init__ (typeshed leaves them out).
    _buffer: bytearray
    _eof: bool
    _waiter: asyncio.Future[object] | None
    _exception: BaseException | None
    _transport: asyncio.ReadTransport | None
    _paused: bool
    _limit: int
    _loop: asyncio.AbstractEventLoop
    _maybe_resume_transport: Callable[[], None]

    # The session's hook (ClientSession._take_nowait): offered a chunk that arrives while
    # read_available waits and nothing is buffered, it takes it (True) or leaves it to
    # be buffered and read (False).
    take_nowait: Callable[[bytes | bytearray | memoryview], bool] | None = None

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        """StreamReader.feed_data, its waiter woken here rather than in a call of its own."""
        assert not self._eof, "feed_data after feed_eof"
        if not data:
            return
        buffer = self._buffer
        waiter = self._waiter
        if (
            waiter is not None
            and not waiter.cancelled()  # a deadline fired: the read ends, nothing more is served
            and self.take_nowait is not None
            and not buffer
            and isinstance(data, (bytes, bytearray, memoryview))  # what transports deliver
            and self.take_nowait(data)
        ):
            return
        buffer.extend(data)
        waiter = self._waiter  # as it is after a hook that declined
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

    def interrupt(self) -> None:
        """Wake a waiting read_available, which returns None (take_nowait left work
        for the reading task)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.cancelled():
                waiter.set_result(_INTERRUPTED)

    async def read_available(self, bytes_max: int) -> bytes | bytearray | None:
        """What read(bytes_max) returns: at most bytes_max bytes once any are buffered,
        b"" at EOF, the connection's error raised; the buffer itself when it fits. None
        when interrupt() woke it (what is buffered stays for the next read)."""
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
                if await waiter is _INTERRUPTED:
                    return None
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
