"""The server-wide budget of bytes for frames being received, and the allocator setting
that gives a large frame's memory back to the OS when it is freed.

A connection whose frame is not complete after a read reserves the frame's announced
size (from its length prefix, before the body is buffered) from one FrameBudget shared
by every connection (`frame_buffer_bytes_max`). When the budget cannot hold it, the
connection stops reading, so the peer's bytes wait in the kernel's socket buffers, not in
the server, until enough is released (first come, first served) or the frame's deadline
(`frame_timeout_ms`) closes the connection. The reservation is released when the frame is
complete (a request is decoded from it) or the connection ends.

Not counted: what a connection has read and not yet parsed while it waits, at most one
socket read (256 KiB) plus the stream reader's buffer (asyncio pauses the transport past
twice its 64 KiB limit, but one receive may add 256 KiB): about 450 KiB measured per
waiting connection, bounded per connection and so by connections_max.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import platform
from collections import deque
from dataclasses import dataclass

from nodi.storage.limits import MIB

log = logging.getLogger("nodi.server")

# The default frame_buffer_bytes_max: a sixteenth of the machine's memory, at least
# FRAME_BUFFER_BYTES_MIN and at most FRAME_BUFFER_BYTES_DEFAULT_MAX.
FRAME_BUFFER_BYTES_MIN = 32 * MIB
FRAME_BUFFER_BYTES_DEFAULT_MAX = 256 * MIB
FRAME_BUFFER_MEMORY_SHARE = 16

# Allocations of at least this many bytes get their own mapping from glibc's malloc,
# returned to the OS when freed. Fixing it also stops glibc from raising the threshold
# after the first large free (its default, which leaves later large frames in the heap,
# where freed holes keep the process's memory high after the connections close).
MMAP_THRESHOLD_BYTES = 1 * MIB
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def default_frame_buffer_bytes_max() -> int:
    """The default budget, sized for this machine's physical memory."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX enough to say
        return FRAME_BUFFER_BYTES_MIN
    return max(FRAME_BUFFER_BYTES_MIN, min(FRAME_BUFFER_BYTES_DEFAULT_MAX, physical // FRAME_BUFFER_MEMORY_SHARE))


@dataclass(frozen=True, slots=True)
class FrameBudgetStatistics:
    bytes_max: int
    bytes_reserved: int  # by frames being received now
    waiting: int  # connections waiting for budget now
    waits: int  # reservations that had to wait, since start
    wait_timeouts: int  # waits ended by a deadline or a closed connection, since start


class FrameBudget:
    """Bytes reserved by frames being received, at most `bytes_max` at any time.
    Changed on the event loop only (no locks); statistics() reads plain counters, so the
    metrics thread may call it. Waiters are served in arrival order, so a large frame is
    not starved by smaller ones arriving after it."""

    def __init__(self, bytes_max: int) -> None:
        assert bytes_max >= 1
        self.bytes_max = bytes_max
        self._reserved = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._waiting = 0
        self._waits = 0
        self._wait_timeouts = 0

    def statistics(self) -> FrameBudgetStatistics:
        return FrameBudgetStatistics(
            bytes_max=self.bytes_max,
            bytes_reserved=self._reserved,
            waiting=self._waiting,
            waits=self._waits,
            wait_timeouts=self._wait_timeouts,
        )

    def reserve_nowait(self, count: int) -> bool:
        """Reserve `count` bytes if they fit now and nobody waits before us."""
        assert 0 < count <= self.bytes_max, count
        if self._waiters or self._reserved + count > self.bytes_max:
            return False
        self._reserved += count
        return True

    async def wait_reserve(self, count: int) -> None:
        """Reserve `count` bytes, waiting for them as long as it takes: the caller bounds
        the wait (asyncio.timeout). Cancelled, it holds nothing."""
        if self.reserve_nowait(count):
            return
        self._waits += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, future))
        self._waiting += 1
        try:
            await future
        except BaseException:
            self._wait_timeouts += 1
            if future.done() and not future.cancelled():
                self.release(count)  # granted as the wait was cancelled: give it back
            else:
                future.cancel()
                self._wake()  # a smaller waiter behind this one may fit now
            raise
        finally:
            self._waiting -= 1

    def release(self, count: int) -> None:
        assert 0 < count <= self._reserved, (count, self._reserved)
        self._reserved -= count
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            count, future = self._waiters[0]
            if future.done():  # cancelled
                self._waiters.popleft()
                continue
            if self._reserved + count > self.bytes_max:
                return
            self._waiters.popleft()
            self._reserved += count
            future.set_result(None)


def _libc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_freed_memory() -> bool:
    """Give the free pages inside glibc's heaps back to the OS (malloc_trim): the
    holes left by connections' read buffers after they close. A few milliseconds for
    hundreds of MB of heap; False where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    try:
        libc.malloc_trim(ctypes.c_size_t(0))
    except AttributeError:
        return False
    return True


def return_large_allocations_to_the_os(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc's malloc map every allocation of at least `threshold_bytes` on its
    own, so a large frame's buffer goes back to the OS when it is freed. Process-wide;
    False (and nothing changed) where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    try:
        done = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes))
    except AttributeError:
        return False
    if not done:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) refused: freed frames may stay in the heap", threshold_bytes)
    return bool(done)
