"""A durable produce waits on the server's loop (broker/server/service.py,
_PartitionWaiters): the log's readable notification after each fsync settles it. These
check every way such a wait ends: the covering fsync, a failed fsync (the sticky
LogReadOnlyError at once, not a timeout: I9), the log closed under it, and no fsync in
time (DurableWaitTimeoutError). The log sits on the simulated disk to fail its fsync."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from served_broker import run_served

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode
from nodi.broker.protocol.headers import IDEMPOTENCY_KEY
from nodi.broker.server.config import ServerConfig
from nodi.broker.server.durable_answer import DurableAnswer
from nodi.broker.server.reply import Reply
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


# -- DurableAnswer: a durable produce answered by its fsync, without a task ---------------


def _answer(request: m.ProduceRequest, delivered: list) -> DurableAnswer:
    return DurableAnswer(
        request,
        lambda: Reply(m.ProduceResponse(request_id=request.request_id, base_offset=7)),
        lambda answer, reply: delivered.append((answer, reply)),
        7,
        7,
    )


def _produce(request_id: int = 1, topic: str = "t", timeout_ms: int = 10_000) -> m.ProduceRequest:
    return m.ProduceRequest(
        request_id=request_id, topic=topic, partition=0, records=BATCH, acks=m.Acks.DURABLE, timeout_ms=timeout_ms
    )


async def _until(condition) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.005)


def test_an_answer_is_delivered_once_by_the_fsync_that_covers_it(tmp_path) -> None:
    async def body(broker, log, fs) -> None:
        delivered: list = []
        result = log.append_nowait(BATCH)
        answer = _answer(_produce(), delivered)
        broker._waiters[id(log)].add_durable_waiter(answer, result.last_offset)
        answer.expire_after(asyncio.get_running_loop(), WAIT_S)
        await _until(lambda: delivered)
        assert delivered == [(answer, delivered[0][1])] and delivered[0][1].response.base_offset == 7
        assert log.durable_offset > result.last_offset
        assert answer.done() and not broker._waiters[id(log)].durable
        broker._waiters[id(log)].wake()  # a later wake delivers nothing more
        await asyncio.sleep(0)
        assert len(delivered) == 1

    _run(tmp_path, "always", body)


def test_a_failed_fsync_answers_with_the_sticky_error_I9(tmp_path) -> None:
    async def body(broker, log, fs) -> None:
        fs.fail_sync(1, path_endswith=".log")
        delivered: list = []
        answer = _answer(_produce(), delivered)
        broker._waiters[id(log)].add_durable_waiter(answer, log.append_nowait(BATCH).last_offset)
        answer.expire_after(asyncio.get_running_loop(), WAIT_S)
        await _until(lambda: delivered)
        assert [reply.response.error_code for _, reply in delivered] == [ErrorCode.READ_ONLY_LOG]

    _run(tmp_path, "always", body)


def test_an_answer_not_fsynced_in_time_is_not_durable_and_a_cancelled_one_is_silent(tmp_path) -> None:
    async def body(broker, log, fs) -> None:
        waiters = broker._waiters[id(log)]
        loop = asyncio.get_running_loop()
        delivered: list = []
        with log._sync_lock:  # the flush thread's fsync cannot start: a disk that hangs
            result = log.append_nowait(BATCH)
            late = _answer(_produce(1), delivered)
            waiters.add_durable_waiter(late, result.last_offset)
            late.expire_after(loop, 0.05)
            closed = _answer(_produce(2), delivered)  # its connection closes while it waits
            waiters.add_durable_waiter(closed, result.last_offset)
            closed.expire_after(loop, 0.05)
            closed.cancel()
            await _until(lambda: delivered)
            assert not waiters.waiting_now()  # nothing live: the log may be closed as idle
        assert [(answer, reply.response.error_code) for answer, reply in delivered] == [(late, ErrorCode.NOT_DURABLE)]
        await broker.wait_durable(log, log.append_nowait(BATCH), WAIT_S)
        await asyncio.sleep(0.1)  # past the cancelled one's timeout: still silent
        assert len(delivered) == 1 and not waiters.durable

    _run(tmp_path, "always", body)


def test_produce_durable_nowait_appends_and_answers_when_durable(tmp_path) -> None:
    async def body(broker, store) -> None:
        delivered: list = []
        answers = [
            broker.produce_durable_nowait(_produce(i), lambda answer, reply: delivered.append(reply.response))
            for i in (1, 2, 3)
        ]
        assert all(isinstance(answer, DurableAnswer) for answer in answers)
        await _until(lambda: len(delivered) == 3)
        # One reply each, in offset order (the waiters settle smallest offset first).
        assert [(r.request_id, r.error_code, r.base_offset, r.last_offset) for r in delivered] == [
            (1, ErrorCode.NONE, 0, 0),
            (2, ErrorCode.NONE, 1, 1),
            (3, ErrorCode.NONE, 2, 2),
        ]
        assert store.log("t", 0).durable_offset == 3
        refused = broker.produce_durable_nowait(_produce(4, topic="nope"), lambda answer, reply: None)
        assert isinstance(refused, Reply) and refused.response.error_code == ErrorCode.UNKNOWN_TOPIC

    run_served(tmp_path, body)


def test_produce_durable_nowait_leaves_fsync_never_to_the_task_path(tmp_path) -> None:
    """fsync never flushes in a thread for each durable produce: _produce's path (None),
    and nothing appended."""

    async def body(broker, store) -> None:
        assert broker.produce_durable_nowait(_produce(), lambda answer, reply: None) is None
        assert store.log("t", 0).next_offset == 0

    run_served(tmp_path, body, fsync_policy="never")


def test_produce_durable_nowait_keeps_publish_dedup(tmp_path) -> None:
    """A keyed record is recorded; sent again, nothing is written and the answer (which
    waits for the original's fsync) names the original."""
    keyed = build_batch([NewRecord(None, b"once", ((IDEMPOTENCY_KEY, b"k-1"),), None)])

    async def body(broker, store) -> None:
        delivered: list = []
        request = replace(_produce(1), records=keyed)
        first = broker.produce_durable_nowait(request, lambda answer, reply: delivered.append(reply.response))
        assert isinstance(first, DurableAnswer)
        again = broker.produce_durable_nowait(replace(request, request_id=2), lambda answer, reply: None)
        assert not isinstance(again, (DurableAnswer, Reply)) and again is not None
        reply = await asyncio.wait_for(again, WAIT_S)
        assert reply.response.error_code == ErrorCode.NONE
        assert [(d.partition, d.offset) for d in reply.response.duplicates] == [(0, 0)]
        await _until(lambda: delivered)
        assert delivered[0].base_offset == 0 and store.log("t", 0).next_offset == 1

    run_served(tmp_path, body, dedup_window_ms=60_000)
