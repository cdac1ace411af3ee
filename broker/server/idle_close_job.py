"""Partitions in use only (issue 18): every so often, close the partition logs nothing
has asked for in `partition_idle_close_ms` (storage's Store.close_idle, off the event
loop). A closed one goes back to registered, as a clean partition after a start, and
opens again on its next use (docs/operations.md, "Idle partitions are closed")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nodi.storage.store import Store

from .memory_budget import trim_freed_memory

log = logging.getLogger("nodi.server")

# How often the job looks, as a share of the idle time (at least 1 s, at most 60 s):
# a log is closed between idle and idle * (1 + 1/IDLE_CLOSE_CHECKS_PER_IDLE) after its
# last use.
IDLE_CLOSE_CHECKS_PER_IDLE = 10
IDLE_CLOSE_CHECK_MIN_S = 1.0
IDLE_CLOSE_CHECK_MAX_S = 60.0


def idle_close_check_s(idle_ms: int) -> float:
    return min(max(idle_ms / 1000 / IDLE_CLOSE_CHECKS_PER_IDLE, IDLE_CLOSE_CHECK_MIN_S), IDLE_CLOSE_CHECK_MAX_S)


async def run_idle_close_job(store: Store, idle_ms: int, stopping: Callable[[], bool]) -> None:
    """Until `stopping()` (or a cancel): close idle logs, a bounded number per round
    (storage/store.py IDLE_CLOSES_PER_SWEEP_MAX). idle_ms 0: never. A failure is
    logged and the job carries on."""
    if idle_ms <= 0:
        return
    interval_s = idle_close_check_s(idle_ms)
    while not stopping():
        await asyncio.sleep(interval_s)
        if stopping():
            return
        try:
            closed = await asyncio.to_thread(_close_idle, store, idle_ms / 1000)
        except Exception:
            log.exception("closing idle partitions")
            continue
        if closed:
            log.debug("closed %d partition(s) idle for %d ms", closed, idle_ms)


def _close_idle(store: Store, idle_s: float) -> int:
    """One round; then the heap pages the closed logs' buffers held go back to the OS
    (malloc_trim: freed memory otherwise stays in the process)."""
    closed = store.close_idle(idle_s)
    if closed:
        trim_freed_memory()
    return closed
