"""A lone durable append's fsync run by its caller (the server: on the event loop)
instead of the pool (Log.append_checked_nowait's `fsync_here_max_s`,
Log.run_fsync_job_here, Broker._run_fsync_on_loop): only when nothing else would share or
overlap it, the same job as the pool's, and the same failure rules (I9, F7).

Fsyncs are held at the gate of test_fsync_pool's file layer where a test needs one to
be running, so what overlaps what is decided by the test, never by timing."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from nodi.broker import Client
from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode
from nodi.broker.server.config import ServerConfig
from nodi.broker.server.reply import Reply
from nodi.broker.server.service import Broker
from nodi.storage.errors import InvalidConfigError, LogReadOnlyError
from nodi.storage.fsync_pool import FsyncPool
from nodi.storage.log import Log
from nodi.storage.store import Store
from nodi.storage.topic_settings import TopicConfig

from conftest import BrokerProcess
from test_fsync_pool import WAIT_SECONDS, GatedFileSystem, _batch, _config, _segment_path
from test_ops_metrics import scrape, total

HERE_MAX_S = 10.0  # any fsync of the simulated disk is fast enough


@contextlib.contextmanager
def _logs_on_a_pool(workers: int) -> Iterator[tuple[FsyncPool, GatedFileSystem, Callable[..., Log]]]:
    """A pool of `workers` and the gated simulated disk, with open(directory, policy="always",
    **config) for logs on both: every log it opened is closed, and the pool stopped, after
    the block, however it ends."""
    pool = FsyncPool(workers)
    fs = GatedFileSystem()
    opened: list[Log] = []

    def open_log(directory: str, policy: str = "always", **config) -> Log:
        log = Log.open(directory, _config(policy, **config), fs=fs, fsync_pool=pool)
        opened.append(log)
        return log

    try:
        yield pool, fs, open_log
    finally:
        fs.gate.set()  # a held fsync would hold a close
        for log in opened:
            log.close()
        pool.stop()


def _append(log: Log, number: int, fsync_here_max_s: float | None = HERE_MAX_S):
    return log.append_checked_nowait(log.check_append(_batch(number)), fsync_here_max_s=fsync_here_max_s)


def test_a_lone_append_leaves_its_fsync_to_the_caller_who_resolves_its_waiters() -> None:
    with _logs_on_a_pool(2) as (pool, _fs, open_log):
        log = open_log("/data/p")
        first = _append(log, 0)
        assert first.fsync_left_to_caller
        waiting = log.durable_future(first.last_offset)
        second = _append(log, 1)  # the job is claimed: the same fsync covers it (I8)
        assert not second.fsync_left_to_caller
        later = log.durable_future(second.last_offset)
        assert not waiting.done() and log.durable_offset == 0
        log.run_fsync_job_here()
        # Resolved in this thread, before the call returned: no hand-off.
        assert waiting.done() and later.done() and waiting.result() is None
        assert log.durable_offset == log.next_offset == 2
        statistics = log.statistics()
        assert statistics.fsyncs == 1 and statistics.fsync_covered_appends == 2
        assert pool.statistics().jobs_run == 0


def test_an_append_without_the_offer_or_under_another_policy_goes_to_the_pool() -> None:
    with _logs_on_a_pool(2) as (_pool, _fs, open_log):
        plain = open_log("/data/plain")
        interval = open_log("/data/interval", "interval", fsync_interval_ms=1)
        assert not _append(plain, 0, None).fsync_left_to_caller
        plain.wait_durable(0, timeout_ms=WAIT_SECONDS * 1000)
        assert not _append(interval, 0).fsync_left_to_caller
        deadline = time.monotonic() + WAIT_SECONDS
        while interval.durable_offset < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert interval.durable_offset == 1


def test_an_append_while_the_pool_runs_a_job_goes_to_the_pool() -> None:
    """Another log's fsync running: the append's fsync overlaps it on a worker."""
    with _logs_on_a_pool(4) as (_pool, fs, open_log):
        busy = open_log("/data/busy")
        alone = open_log("/data/alone")
        fs.gate.clear()
        busy.append_nowait(_batch(0))
        fs.wait_started(_segment_path(busy), 1)
        result = _append(alone, 0)
        assert not result.fsync_left_to_caller
        fs.wait_started(_segment_path(alone), 1)  # started on a worker, beside busy's
        fs.gate.set()
        alone.wait_durable(result.last_offset, timeout_ms=WAIT_SECONDS * 1000)


def test_a_job_left_to_the_caller_goes_to_the_pool_when_work_came_meanwhile() -> None:
    with _logs_on_a_pool(4) as (_pool, fs, open_log):
        alone = open_log("/data/alone")
        other = open_log("/data/other")
        result = _append(alone, 0)
        assert result.fsync_left_to_caller
        fs.gate.clear()
        other.append_nowait(_batch(0))  # a plain append: its job runs on a worker
        fs.wait_started(_segment_path(other), 1)
        ran_on: list[str] = []
        alone.durable_future(result.last_offset).add_done_callback(
            lambda _future: ran_on.append(threading.current_thread().name)
        )
        alone.run_fsync_job_here()
        fs.wait_started(_segment_path(alone), 1)
        fs.gate.set()
        alone.wait_durable(result.last_offset, timeout_ms=WAIT_SECONDS * 1000)
        assert ran_on and ran_on[0] != threading.current_thread().name


def test_after_a_slow_fsync_the_appends_go_to_the_pool_until_one_is_fast_again() -> None:
    with _logs_on_a_pool(2) as (_pool, fs, open_log):
        log = open_log("/data/p")
        slow_s = 0.2
        fs.gate.clear()
        log.append_nowait(_batch(0))
        fs.wait_started(_segment_path(log), 1)
        time.sleep(slow_s)  # the fsync is held at the gate at least this long
        fs.gate.set()
        log.wait_durable(0, timeout_ms=WAIT_SECONDS * 1000)
        assert log._last_fsync_seconds >= slow_s
        result = _append(log, 1, fsync_here_max_s=slow_s / 2)
        assert not result.fsync_left_to_caller  # the pool's: the last fsync took longer
        log.wait_durable(result.last_offset, timeout_ms=WAIT_SECONDS * 1000)
        result = _append(log, 2, fsync_here_max_s=slow_s / 2)
        assert result.fsync_left_to_caller  # the pool's fsync of offset 1 was fast
        log.run_fsync_job_here()
        assert log.durable_offset == 3


def test_a_failed_fsync_run_by_the_caller_fails_its_waiters_sticky_and_is_never_retried_I9_F7() -> None:
    with _logs_on_a_pool(2) as (_pool, fs, open_log):
        log = open_log("/data/p")
        log.append(_batch(0))
        fs.inner.fail_sync(1, path_endswith=_segment_path(log))
        result = _append(log, 1)
        assert result.fsync_left_to_caller
        waiting = log.durable_future(result.last_offset)
        log.run_fsync_job_here()  # never raises: the waiters carry the failure
        with pytest.raises(LogReadOnlyError):
            waiting.result(timeout=0)
        attempts = fs.inner.sync_attempts(_segment_path(log))
        with pytest.raises(LogReadOnlyError):
            _append(log, 2)
        with pytest.raises(LogReadOnlyError):
            log.durable_future(result.last_offset).result(timeout=0)
        assert log.statistics().read_only
        log.close()
        assert fs.inner.sync_attempts(_segment_path(log)) == attempts, "a failed fsync was retried (F7)"


# -- the broker: the fsync on its loop at the end of the turn --------------------------


def _produce(request_id: int, topic: str = "t", partition: int = 0) -> m.ProduceRequest:
    return m.ProduceRequest(
        request_id=request_id,
        topic=topic,
        partition=partition,
        records=_batch(request_id),
        acks=m.Acks.DURABLE,
        timeout_ms=WAIT_SECONDS * 1000,
    )


def _serve(tmp_path, body, partitions: int = 1, fsync_on_loop_max_ms: int = 2) -> None:
    store = Store.open(str(tmp_path / "store"))
    store.create_topic("t", TopicConfig(partitions=partitions))

    async def main() -> None:
        broker = Broker(store, ServerConfig(data_dir=store.data_dir, fsync_on_loop_max_ms=fsync_on_loop_max_ms))
        broker._loop = asyncio.get_running_loop()
        broker._loop_thread = threading.get_ident()
        for partition in range(partitions):
            broker._watch(store.log("t", partition))
        await body(broker, store)

    try:
        asyncio.run(main())
    finally:
        store.close()


async def _until(condition) -> None:
    async with asyncio.timeout(WAIT_SECONDS):
        while not condition():
            await asyncio.sleep(0.001)


def test_lone_produces_of_one_turn_share_one_fsync_on_the_loop_and_are_answered_in_it(tmp_path) -> None:
    async def body(broker, store) -> None:
        delivered: list[Reply] = []
        jobs_before = store.fsync_pool.statistics().jobs_run
        answers = [
            broker.produce_durable_nowait(_produce(number), lambda _answer, reply: delivered.append(reply))
            for number in (1, 2, 3)
        ]
        assert not delivered and not any(answer.done() for answer in answers)
        await asyncio.sleep(0)  # one turn: the fsync ran at its end and answered all three
        assert [reply.response.error_code for reply in delivered] == [ErrorCode.NONE] * 3
        responses = [reply.response for reply in delivered]
        assert all(isinstance(response, m.ProduceResponse) for response in responses)
        assert [response.base_offset for response in responses if isinstance(response, m.ProduceResponse)] == [0, 1, 2]
        statistics = store.log("t", 0).statistics()
        assert statistics.fsyncs == 1 and statistics.fsync_covered_appends == 3
        assert store.fsync_pool.statistics().jobs_run == jobs_before

    _serve(tmp_path, body)


def test_produces_to_two_partitions_in_one_turn_are_fsynced_on_the_pool(tmp_path) -> None:
    async def body(broker, store) -> None:
        delivered: list[Reply] = []
        jobs_before = store.fsync_pool.statistics().jobs_run
        for partition in (0, 1):
            broker.produce_durable_nowait(
                _produce(partition + 1, partition=partition), lambda _answer, reply: delivered.append(reply)
            )
        await _until(lambda: len(delivered) == 2)
        assert [reply.response.error_code for reply in delivered] == [ErrorCode.NONE] * 2
        assert store.fsync_pool.statistics().jobs_run >= jobs_before + 2

    _serve(tmp_path, body, partitions=2)


def test_after_a_produce_found_company_the_next_ones_go_to_the_pool_for_a_while(tmp_path, monkeypatch) -> None:
    from nodi.broker.server import service

    monkeypatch.setattr(service, "FSYNC_ON_LOOP_QUIET_S", 3600.0)  # "a while": the whole test

    async def body(broker, store) -> None:
        delivered: list[Reply] = []
        for number in (1, 2):  # one turn: the second finds the first's fsync pending
            broker.produce_durable_nowait(_produce(number), lambda _answer, reply: delivered.append(reply))
        await asyncio.sleep(0)
        assert len(delivered) == 2  # both answered by the fsync on the loop
        jobs_before = store.fsync_pool.statistics().jobs_run
        broker.produce_durable_nowait(_produce(3), lambda _answer, reply: delivered.append(reply))
        await _until(lambda: len(delivered) == 3)
        assert store.fsync_pool.statistics().jobs_run == jobs_before + 1  # alone, but within the while
        assert [reply.response.error_code for reply in delivered] == [ErrorCode.NONE] * 3

    _serve(tmp_path, body)


def test_with_the_setting_at_zero_every_fsync_is_the_pools(tmp_path) -> None:
    async def body(broker, store) -> None:
        delivered: list[Reply] = []
        jobs_before = store.fsync_pool.statistics().jobs_run
        broker.produce_durable_nowait(_produce(1), lambda _answer, reply: delivered.append(reply))
        await _until(lambda: delivered)
        assert delivered[0].response.error_code is ErrorCode.NONE
        assert store.fsync_pool.statistics().jobs_run == jobs_before + 1

    _serve(tmp_path, body, fsync_on_loop_max_ms=0)


def test_the_setting_is_checked() -> None:
    with pytest.raises(InvalidConfigError):
        ServerConfig(fsync_on_loop_max_ms=-1).validate()


# -- a real server ------------------------------------------------------------------


@pytest.mark.parametrize("on_loop_max_ms", ["2", "0"])
def test_a_served_producer_one_at_a_time_is_fsynced_on_the_loop_unless_turned_off(tmp_path, on_loop_max_ms) -> None:
    """One durable produce at a time, each answered and readable; with the
    setting at 2 their fsyncs are not the pool's jobs (nodi_fsync_pool_jobs), with 0 (the default) each is."""
    messages = 20
    broker = BrokerProcess(
        str(tmp_path / "data"), metrics=True, environment={"NODI_FSYNC_ON_LOOP_MAX_MS": on_loop_max_ms}
    ).start()
    try:
        with Client(broker.address, timeout_ms=30_000) as client:
            client.create_topic("t", 1)
            client.produce("t", b"first", partition=0, acks="durable")
            before = scrape(broker.metrics_port)
            for number in range(messages):
                client.produce("t", b"value %d" % number, partition=0, acks="durable")
            after = scrape(broker.metrics_port)
            fsyncs = total(after, "nodi_fsyncs_total") - total(before, "nodi_fsyncs_total")
            jobs = total(after, "nodi_fsync_pool_jobs_total") - total(before, "nodi_fsync_pool_jobs_total")
            assert fsyncs >= messages
            if on_loop_max_ms == "0":
                assert jobs >= messages
            else:
                assert jobs < messages / 2  # a slow fsync on a busy machine sends one to the pool
            offset, values = 0, list[bytes | None]()
            while offset <= messages:
                batch = client.fetch("t", 0, offset)
                assert batch
                values.extend(record.value for record in batch)
                offset = batch[-1].offset + 1
            assert values == [b"first"] + [b"value %d" % number for number in range(messages)]
    finally:
        broker.stop()
