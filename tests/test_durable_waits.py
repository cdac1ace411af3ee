"""A durable produce waits on the server's loop (broker/server/service.py,
_PartitionWaiters): the log's readable notification after each fsync settles it. These
check every way such a wait ends: the covering fsync, a failed fsync (the sticky
LogReadOnlyError at once, not a timeout: I9), the log closed under it, and no fsync in
time (DurableWaitTimeoutError). The log sits on the simulated disk to fail its fsync."""

from __future__ import annotations

import asyncio

import pytest

from nodi.broker.server.config import ServerConfig
from nodi.broker.server.service import Broker
from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.errors import DurableWaitTimeoutError, LogClosedError, LogReadOnlyError
from nodi.storage.log import Log
from nodi.storage.records import NewRecord, build_batch
from nodi.storage.simfs import SimulatedFileSystem
from nodi.storage.store import Store

WAIT_S = 10.0
BATCH = build_batch([NewRecord(None, b"durable", (), None)])


def _run(tmp_path, policy: str, body, **overrides) -> None:
    """Run `body(broker, log)` on a loop, the log watched by a broker as a served
    partition is (its waiters on that loop)."""
    store = Store.open(str(tmp_path / "store"))
    fs = SimulatedFileSystem()
    log = Log.open("/data/partition-0", LogConfig(fsync_policy=FsyncPolicy(policy), **overrides), fs=fs)

    async def main() -> None:
        broker = Broker(store, ServerConfig(data_dir=store.data_dir))
        broker._loop = asyncio.get_running_loop()
        broker._watch(log)
        await body(broker, log, fs)

    try:
        asyncio.run(main())
    finally:
        log.close()
        store.close()


def test_a_durable_wait_ends_with_the_fsync_that_covers_it(tmp_path) -> None:
    async def body(broker, log, fs) -> None:
        for _ in range(3):
            result = log.append_nowait(BATCH)
            await broker.wait_durable(log, result, WAIT_S)
            assert log.durable_offset > result.last_offset
        waiters = broker._waiters[id(log)]
        assert not waiters.durable  # settled ones are not kept

    _run(tmp_path, "always", body)


def test_a_failed_fsync_fails_the_wait_at_once_with_the_sticky_error_I9(tmp_path) -> None:
    async def body(broker, log, fs) -> None:
        fs.fail_sync(1, path_endswith=".log")
        result = log.append_nowait(BATCH)
        # LogReadOnlyError, not DurableWaitTimeoutError: the failure ended the wait.
        with pytest.raises(LogReadOnlyError):
            await broker.wait_durable(log, result, WAIT_S)
        with pytest.raises(LogReadOnlyError):  # a later wait is refused the same way
            await broker.wait_durable(log, result, WAIT_S)

    _run(tmp_path, "always", body)


def test_a_wait_for_a_log_closed_under_it_ends_durable_or_closed(tmp_path) -> None:
    async def body(broker, log, fs) -> None:
        result = log.append_nowait(BATCH)
        waiting = asyncio.ensure_future(broker.wait_durable(log, result, WAIT_S))
        await asyncio.sleep(0)
        await asyncio.to_thread(log.close)  # a clean close fsyncs what was written
        await asyncio.wait_for(waiting, WAIT_S)
        later = broker._waiters[id(log)].add_durable(asyncio.get_running_loop(), result.last_offset + 1)
        with pytest.raises(LogClosedError):
            later.result()

    _run(tmp_path, "interval", body, fsync_interval_ms=3_600_000)


def test_no_fsync_in_time_is_a_durable_wait_timeout(tmp_path) -> None:
    async def body(broker, log, fs) -> None:
        with log._sync_lock:  # the flush thread's fsync cannot start: a disk that hangs
            result = log.append_nowait(BATCH)
            with pytest.raises(DurableWaitTimeoutError):
                await broker.wait_durable(log, result, 0.05)
            assert all(entry[2].done() for entry in broker._waiters[id(log)].durable)
        await broker.wait_durable(log, log.append_nowait(BATCH), WAIT_S)  # and once it answers

    _run(tmp_path, "always", body)


def test_timed_out_waits_are_swept_and_live_ones_kept(tmp_path) -> None:
    """More waits than DURABLE_WAITERS_PRUNE_AT: the ones that timed out are dropped, the
    live ones all end with their fsync."""
    from nodi.broker.server.service import DURABLE_WAITERS_PRUNE_AT

    async def body(broker, log, fs) -> None:
        waiters = broker._waiters[id(log)]
        loop = asyncio.get_running_loop()
        with log._sync_lock:  # no fsync meanwhile
            result = log.append_nowait(BATCH)
            for _ in range(DURABLE_WAITERS_PRUNE_AT):
                waiters.add_durable(loop, result.last_offset).cancel()  # as a timed-out wait leaves it
            live = [waiters.add_durable(loop, result.last_offset) for _ in range(2 * DURABLE_WAITERS_PRUNE_AT)]
            assert len(waiters.durable) <= 2 * DURABLE_WAITERS_PRUNE_AT + 1
        await asyncio.wait_for(asyncio.gather(*live), WAIT_S)
        assert not waiters.durable

    _run(tmp_path, "always", body)
