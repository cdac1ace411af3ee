"""Compaction in the server: the background job, COMPACT_TOPIC, and the key check on
produce to compacted topics. The work is storage/compaction.py; runs happen in threads,
never on the event loop.

The background job wakes every compaction.check_interval_ms, picks the compacted
partition with the highest dirty ratio at or above compaction.dirty_ratio_min, and
compacts it (one run at a time). COMPACT_TOPIC seals each partition's active segment
and compacts every partition of the topic, one after the other, and answers with what
each run did. At shutdown, stop() cancels a run in progress and waits for its thread
before the store closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from nodi.storage.compaction import (
    CompactionCancelledError,
    CompactionResult,
    Compactor,
    dirty_ratio,
    require_keys,
)
from nodi.storage.errors import InvalidConfigError, LogClosedError, NodiError, UnknownTopicError
from nodi.storage.log import Log

from ..protocol import messages as m
from ..protocol.errors import ErrorCode, ProtocolError
from .reply import Reply

if TYPE_CHECKING:
    from nodi.storage.metadata import TopicConfig
    from nodi.storage.store import Store

    from .compaction_settings import CompactionSettings

log = logging.getLogger("nodi.compaction")

# stop(): how long to wait for a cancelled run's thread to notice.
STOP_TIMEOUT_S = 30.0


def is_compacted(cleanup_policy: str) -> bool:
    return "compact" in cleanup_policy


class CompactionService:
    def __init__(self, store: Store, settings: CompactionSettings, clock_ms: Callable[[], int] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.compactor = Compactor(settings.storage_config(), clock_ms=clock_ms)
        self._running: set[asyncio.Future] = set()

    # -- produce ------------------------------------------------------------------

    def check_produce(self, topic: str, partition_log: Log, records: bytes | memoryview) -> None:
        """KeyRequiredError (KEY_REQUIRED) when a compacted topic gets a keyless record.
        Decodes the records only for compacted topics: their logs, and only theirs,
        allow offset gaps (storage/store.py log_config_for), an O(1) test per produce."""
        if not partition_log.config.dense_offsets:
            require_keys(records, partition_log.config.limits)

    # -- COMPACT_TOPIC ------------------------------------------------------------

    async def compact_topic(self, request: m.CompactTopicRequest) -> Reply:
        config = self.store.topic_config(request.name)
        if config is None:
            raise UnknownTopicError(f"topic {request.name!r} does not exist")
        if not is_compacted(config.cleanup_policy):
            raise InvalidConfigError(
                f"topic {request.name!r} has cleanup policy {config.cleanup_policy!r}: only compact or "
                "compact,delete topics are compacted"
            )
        timeout_ms = max(request.timeout_ms, 1)
        deadline = asyncio.get_running_loop().time() + timeout_ms / 1000
        partitions = []
        for number in range(config.partitions):
            partition_log = self.store.log(request.name, number)
            remaining_ms = max(int((deadline - asyncio.get_running_loop().time()) * 1000), 1)
            try:
                result = await self._in_thread(
                    partition_log,
                    roll=True,
                    wait_timeout_ms=remaining_ms,
                    delete_retention_ms=self.delete_retention_ms(config),
                )
            except TimeoutError:
                raise ProtocolError(
                    ErrorCode.TIMEOUT, f"another compaction of {request.name}-{number} did not finish in time"
                ) from None
            partitions.append(_partition_compaction(number, result))
        return Reply(m.CompactTopicResponse(request_id=request.request_id, partitions=partitions))

    # -- the background job ---------------------------------------------------------

    async def run_job(self) -> None:
        """Every check_interval_ms: compact the dirtiest compacted partition over the
        threshold. Errors are logged; the job goes on."""
        interval_s = self.settings.check_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            chosen = self._pick()
            if chosen is None:
                continue
            topic, partition, partition_log, ratio = chosen
            config = self.store.topic_config(topic)
            if config is None:
                continue  # deleted since the pick
            try:
                result = await self._in_thread(
                    partition_log, roll=False, wait_timeout_ms=0, delete_retention_ms=self.delete_retention_ms(config)
                )
            except CompactionCancelledError:
                return
            except TimeoutError:
                continue  # an on-demand run holds it; it will be clean after that
            except LogClosedError:
                continue  # closed for being idle since the pick: compacted when next open
            except (NodiError, OSError) as error:
                log.error("compaction of %s-%d failed: %s", topic, partition, error)
                continue
            log.info(
                "compacted %s-%d (dirty ratio %.2f): %d pass(es), %d segment(s) rewritten, %d bytes reclaimed, "
                "%d record(s) removed in %.0f ms",
                topic,
                partition,
                ratio,
                result.passes,
                result.segments_rewritten,
                result.bytes_reclaimed,
                result.records_removed,
                result.duration_ms,
            )

    def _pick(self) -> tuple[str, int, Log, float] | None:
        topics = self.store.topics()
        best = None
        for topic, partition, partition_log in self.store.logs():
            config = topics.get(topic)
            if config is None or not is_compacted(config.cleanup_policy):
                continue
            ratio = dirty_ratio(partition_log)
            if ratio >= self.settings.dirty_ratio_min and (best is None or ratio > best[3]):
                best = (topic, partition, partition_log, ratio)
        return best

    def delete_retention_ms(self, config: TopicConfig) -> int:
        """The topic's delete_retention_ms, or the server's for a topic stored without one."""
        if config.delete_retention_ms is None:
            return self.settings.delete_retention_ms
        return config.delete_retention_ms

    async def _in_thread(
        self, partition_log: Log, *, roll: bool, wait_timeout_ms: int, delete_retention_ms: int
    ) -> CompactionResult:
        # Held open for the run (the store closes idle logs); one closed meanwhile is
        # left for the next pick.
        if not self.store.pin(partition_log):
            raise LogClosedError(f"{partition_log.directory} was closed for being idle; compacted when next open")
        try:
            return await self._run_in_thread(
                partition_log, roll=roll, wait_timeout_ms=wait_timeout_ms, delete_retention_ms=delete_retention_ms
            )
        finally:
            self.store.unpin(partition_log)

    async def _run_in_thread(
        self, partition_log: Log, *, roll: bool, wait_timeout_ms: int, delete_retention_ms: int
    ) -> CompactionResult:
        future = asyncio.ensure_future(
            asyncio.to_thread(
                self.compactor.compact,
                partition_log,
                roll=roll,
                wait_timeout_ms=wait_timeout_ms,
                delete_retention_ms=delete_retention_ms,
            )
        )
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        # shield: a cancelled request or job stops waiting; the thread runs on and
        # stop() still waits for it.
        return await asyncio.shield(future)

    async def stop(self) -> None:
        """Cancel runs in progress and wait for their threads (before the store closes)."""
        self.compactor.cancel()
        running = list(self._running)
        if running:
            await asyncio.wait(running, timeout=STOP_TIMEOUT_S)
        for future in running:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning

    # -- metrics ------------------------------------------------------------------

    def statistics(self, partition_log: Log):
        """The compactor's figures for one partition (runs, bytes reclaimed...)."""
        return self.compactor.statistics(partition_log.directory)


def _partition_compaction(partition: int, result: CompactionResult) -> m.PartitionCompaction:
    return m.PartitionCompaction(
        partition=partition,
        passes=result.passes,
        segments_rewritten=result.segments_rewritten,
        bytes_read=result.bytes_read,
        bytes_written=result.bytes_written,
        bytes_reclaimed=result.bytes_reclaimed,
        records_removed=result.records_removed,
        tombstones_removed=result.tombstones_removed,
        duration_ms=int(result.duration_ms),
    )
