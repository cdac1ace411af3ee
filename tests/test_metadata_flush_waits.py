"""Offset commits wait on the broker's shared metadata flush (broker/server/service.py,
_MetadataFlush): the commits staged in one loop tick share one LMDB commit, run on the
store's fsync pool, whose one report back answers every waiter. These check that
sharing, a failed commit reported to each of its waiters (and the next one working),
and a waiter that gives up leaving the commit to the others; the callbacks of
Broker.when_metadata_flushed riding the same commit, and the queue service's persists
settled by one."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nodi.broker.server.config import ServerConfig
from nodi.broker.server.service import Broker
from nodi.storage.store import Store

WAIT_S = 10.0


def _run(tmp_path, body) -> list[int]:
    """Run `body(broker, release)` on a loop with the store's metadata flush counted
    (returned: the entries each flush made while `body` ran wrote; the store's close
    flushes too); each flush waits for `release`."""
    store = Store.open(str(tmp_path / "store"))
    flushes: list[int] = []
    during_body: list[int] = []
    release = threading.Event()
    real_flush = store.metadata.flush

    def flush() -> int:
        assert release.wait(WAIT_S)
        count = real_flush()
        flushes.append(count)
        return count

    store.metadata.flush = flush  # type: ignore[method-assign]

    async def main() -> None:
        broker = Broker(store, ServerConfig(data_dir=store.data_dir))
        broker._loop = asyncio.get_running_loop()
        await body(broker, release)
        during_body.extend(flushes)

    try:
        asyncio.run(main())
    finally:
        store.close()
    return during_body


def test_waiters_of_one_loop_tick_share_one_commit(tmp_path) -> None:
    async def body(broker, release) -> None:
        release.set()
        waits = [asyncio.ensure_future(broker.flush_metadata()) for _ in range(5)]
        await asyncio.wait_for(asyncio.gather(*waits), WAIT_S)
        assert broker._next_flush is None
        assert not broker._flushing

    flushes = _run(tmp_path, body)
    assert len(flushes) == 1


def _fail_the_next_flush(broker, monkeypatch, release: threading.Event | None = None) -> None:
    """The broker's next metadata flush raises OSError, the ones after it flush; each
    first waits for `release` when one is given."""
    real_flush = broker.store.metadata.flush
    failures = iter([OSError("the disk said no")])

    def failing_flush() -> int:
        if release is not None:
            assert release.wait(WAIT_S)
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real_flush()

    monkeypatch.setattr(broker.store.metadata, "flush", failing_flush)


def test_a_failed_commit_fails_each_of_its_waiters_and_the_next_one_works(tmp_path, monkeypatch) -> None:
    async def body(broker, release) -> None:
        release.set()
        _fail_the_next_flush(broker, monkeypatch)
        waits = [asyncio.ensure_future(broker.flush_metadata()) for _ in range(3)]
        results = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), WAIT_S)
        assert len(results) == 3
        for result in results:
            assert isinstance(result, OSError)
        await asyncio.wait_for(broker.flush_metadata(), WAIT_S)  # the next commit is answered

    _run(tmp_path, body)


def test_a_waiter_that_gives_up_leaves_the_commit_to_the_others(tmp_path) -> None:
    async def body(broker, release) -> None:
        leaving = asyncio.ensure_future(broker.flush_metadata())
        staying = asyncio.ensure_future(broker.flush_metadata())
        for _ in range(3):  # the flush starts and its thread waits for `release`
            await asyncio.sleep(0)
        assert broker._flushing
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        release.set()
        await asyncio.wait_for(staying, WAIT_S)
        assert not broker._flushing

    flushes = _run(tmp_path, body)
    assert len(flushes) == 1


def test_flush_callbacks_are_called_once_committed_with_the_waiters(tmp_path) -> None:
    """Broker.when_metadata_flushed: callbacks of one loop tick ride the same commit as
    the futures waiting on it, and each is called after it, with no error, by the time
    the waiters are answered."""
    seen: list[tuple[str, BaseException | None, int]] = []
    flushes_seen: list[int] = []

    async def body(broker, release) -> None:
        release.set()
        broker.when_metadata_flushed(lambda error: seen.append(("first", error, broker._flushing)))
        broker.when_metadata_flushed(lambda error: seen.append(("second", error, broker._flushing)))
        await broker.flush_metadata()  # the same tick: the same flush (bounded by write_timeout_ms)
        flushes_seen.append(len(seen))

    flushes = _run(tmp_path, body)
    assert len(flushes) == 1  # the callbacks and the waiters shared one commit
    assert flushes_seen == [2]  # both called by the time the waiters were answered
    assert seen == [("first", None, False), ("second", None, False)]


def test_a_failed_commit_reaches_each_callback_even_after_one_raises(tmp_path, monkeypatch) -> None:
    errors: list[BaseException | None] = []

    async def body(broker, release) -> None:
        release.set()
        _fail_the_next_flush(broker, monkeypatch)

        def faulty(error: BaseException | None) -> None:
            raise RuntimeError("a faulty hook")

        broker.when_metadata_flushed(faulty)
        broker.when_metadata_flushed(errors.append)
        with pytest.raises(OSError):
            await broker.flush_metadata()  # the same tick: the same flush
        broker.when_metadata_flushed(errors.append)  # the next commit works
        await broker.flush_metadata()

    _run(tmp_path, body)
    assert len(errors) == 2
    assert isinstance(errors[0], OSError)
    assert errors[1] is None


def test_queue_persists_wait_on_the_flush_hook_and_share_its_failure(tmp_path, monkeypatch) -> None:
    """QueueService.persist: the persists of one tick share one staging pass settled by
    the flush's callback; a failed commit fails each, a persist that gives up leaves the
    pass to the others, and the next persist is committed."""

    async def body(broker, release) -> None:
        broker.queues._loop = asyncio.get_running_loop()  # attach() without its timer task
        _fail_the_next_flush(broker, monkeypatch, release)
        failing = [asyncio.ensure_future(broker.queues.persist()) for _ in range(2)]
        leaving = asyncio.ensure_future(broker.queues.persist())
        for _ in range(3):  # the pass is staged and its flush waits for `release`
            await asyncio.sleep(0)
        assert broker._flushing
        assert broker.queues._persist_waiters is None  # the pass left with its waiters
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*failing, return_exceptions=True), WAIT_S)
        assert len(results) == 2
        for result in results:
            assert isinstance(result, OSError)
        await asyncio.wait_for(broker.queues.persist(), WAIT_S)

    _run(tmp_path, body)
