"""The retention job both the server and the embedded broker run: every
retention_check_interval_ms, delete the segments retention lets go (storage's
Store.apply_retention, off the event loop), and log what went."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nodi.storage.store import Store

log = logging.getLogger("nodi.server")


async def run_retention_job(store: Store, interval_ms: int, stopping: Callable[[], bool]) -> None:
    """Until `stopping()` (or a cancel): sleep interval_ms, apply retention. A failure
    (a read-only log reports itself) is logged and the job carries on."""
    interval_s = interval_ms / 1000
    while not stopping():
        await asyncio.sleep(interval_s)
        try:
            deleted = await asyncio.to_thread(store.apply_retention)
        except Exception:
            log.exception("retention")
            continue
        for (topic, partition), segments in deleted.items():
            log.info(
                "retention deleted %d segment(s) of %s-%d",
                len(segments),
                topic,
                partition,
                extra={"topic": topic, "partition": partition, "segments": len(segments)},
            )
