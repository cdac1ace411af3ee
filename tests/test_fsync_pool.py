"""The shared fsync worker pool (storage/fsync_pool.py): a bounded number of named
threads for every partition log, group commit per log kept (I8), a failed fsync
confined to its own log (I9, F7), and no thread left behind after the last user closes.

Fsyncs are held at a gate (a file layer over the simulated disk whose .log syncs wait
for the test), so what overlaps what is decided by the test, never by timing."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from nodi.broker.server.config import ServerConfig
from nodi.storage.config import LogConfig
from nodi.storage.errors import InvalidConfigError, LogReadOnlyError
from nodi.storage.fsync_pool import FSYNC_WORKERS_MAX, FsyncPool, default_fsync_pool
from nodi.storage.log import Log
from nodi.storage.metadata import TopicConfig
from nodi.storage.records import NewRecord, build_batch
from nodi.storage.simfs import SimulatedFileSystem
from nodi.storage.store import Store

WAIT_SECONDS = 30


def _batch(number: int) -> bytes:
    return build_batch([NewRecord(b"k", b"value %d" % number)])


def _config(policy: str = "always", **overrides) -> LogConfig:
    return LogConfig(**{"segment_bytes": 1 << 20, "fsync_policy": policy, "retention_ms": None, **overrides})


class _GatedFile:
    def __init__(self, fs: GatedFileSystem, path: str, inner) -> None:
        self._fs, self.path, self._inner = fs, path, inner

    def pread(self, size, position):
        return self._inner.pread(size, position)

    def pwritev(self, buffers, position):
        return self._inner.pwritev(buffers, position)

    def size(self):
        return self._inner.size()

    def truncate(self, size):
        self._inner.truncate(size)

    def fileno(self):
        return self._inner.fileno()

    def close(self):
        self._inner.close()

    def sync(self) -> None:
        if not self.path.endswith(".log"):
            self._inner.sync()
            return
        fs = self._fs
        with fs.lock:
            fs.in_sync[self.path] += 1
            fs.overlap_max = max(fs.overlap_max, fs.in_sync[self.path])
            fs.started[self.path] += 1
            fs.changed.notify_all()
        try:
            assert fs.gate.wait(timeout=WAIT_SECONDS), "the test never opened the gate"
            self._inner.sync()
        finally:
            with fs.lock:
                fs.in_sync[self.path] -= 1


class GatedFileSystem:
    """The simulated disk, with every segment (.log) fsync held until `gate` is set,
    counting fsyncs started and the most ever in flight on one file at once."""

    def __init__(self) -> None:
        self.inner = SimulatedFileSystem()
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.in_sync: Counter[str] = Counter()
        self.started: Counter[str] = Counter()
        self.overlap_max = 0

    def open(self, path: str, *, create: bool = False) -> _GatedFile:
        return _GatedFile(self, path, self.inner.open(path, create=create))

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def wait_started(self, path: str, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.started[path] >= count, timeout=WAIT_SECONDS), self.started


def _segment_path(log: Log) -> str:
    return log.segments[-1].log_path


def test_concurrent_appends_share_the_next_fsync_I8() -> None:
    """Appends that arrive while a log's fsync runs are not durable until it and one
    more fsync return, and that one more fsync covers them all: never one each, and
    never two fsyncs of the log at once."""
    fs = GatedFileSystem()
    pool = FsyncPool(4)
    log = Log.open("/data/p0", _config(), fs=fs, fsync_pool=pool)
    path = _segment_path(log)
    fs.gate.clear()
    first = log.append_nowait(_batch(0))
    fs.wait_started(path, 1)  # the pool's fsync of the first append is at the gate
    futures: list = []

    def produce(number: int) -> None:
        result = log.append_nowait(_batch(number))
        futures.append(log.durable_future(result.last_offset))

    producers = [threading.Thread(target=produce, args=(number,)) for number in range(1, 11)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join(timeout=WAIT_SECONDS)
    assert len(futures) == 10
    assert log.durable_offset == 0 and not any(future.done() for future in futures), "acknowledged before fsync"
    fs.gate.set()
    for future in futures:
        future.result(timeout=WAIT_SECONDS)
    assert log.durable_offset == log.next_offset == first.last_offset + 11
    statistics = log.statistics()
    assert statistics.fsyncs == 2  # the first append's, then one for the ten
    assert statistics.fsync_covered_appends == 11
    assert fs.started[path] == 2
    assert fs.overlap_max == 1
    log.close()
    pool.stop()


def test_many_logs_on_few_workers_never_overlap_one_logs_fsyncs() -> None:
    fs = GatedFileSystem()
    pool = FsyncPool(3)
    logs = [Log.open(f"/data/p{number}", _config(), fs=fs, fsync_pool=pool) for number in range(20)]
    errors: list[BaseException] = []

    def produce(number: int) -> None:
        try:
            for round_number in range(15):
                log = logs[(number * 7 + round_number) % len(logs)]
                log.append(_batch(round_number))
                assert pool.statistics().workers <= 3
        except BaseException as error:
            errors.append(error)

    producers = [threading.Thread(target=produce, args=(number,)) for number in range(8)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join(timeout=WAIT_SECONDS)
    assert errors == []
    assert pool.statistics().workers <= 3
    assert fs.overlap_max == 1
    assert sum(log.next_offset for log in logs) == 8 * 15
    assert all(log.durable_offset == log.next_offset for log in logs)
    for log in logs:
        log.close()
    pool.stop()
    assert pool.statistics().workers == 0


def test_failed_fsync_makes_only_its_own_log_read_only_I9_F7() -> None:
    fs = GatedFileSystem()
    pool = FsyncPool(1)  # one worker: the failing log's fsync and the others' share it
    failing = Log.open("/data/bad", _config(), fs=fs, fsync_pool=pool)
    others = [Log.open(f"/data/good{number}", _config(), fs=fs, fsync_pool=pool) for number in range(3)]
    for log in [failing, *others]:
        log.append(_batch(0))
    fs.inner.fail_sync(1, path_endswith=_segment_path(failing))
    with pytest.raises(LogReadOnlyError):
        failing.append(_batch(1))
    attempts = fs.inner.sync_attempts(_segment_path(failing))
    for number in range(2, 6):
        for log in others:
            log.append(_batch(number))
        with pytest.raises(LogReadOnlyError):
            failing.append(_batch(number))
    assert all(log.durable_offset == log.next_offset == 5 for log in others)
    assert not any(log.statistics().read_only for log in others)
    assert failing.statistics().read_only
    for log in [failing, *others]:
        log.close()
    assert fs.inner.sync_attempts(_segment_path(failing)) == attempts, "a failed fsync was retried (F7)"
    pool.stop()


def test_close_cancels_a_queued_fsync_and_waits_for_a_running_one() -> None:
    fs = GatedFileSystem()
    pool = FsyncPool(1)
    running = Log.open("/data/running", _config(), fs=fs, fsync_pool=pool)
    queued = Log.open("/data/queued", _config(), fs=fs, fsync_pool=pool)
    fs.gate.clear()
    running.append_nowait(_batch(0))
    fs.wait_started(_segment_path(running), 1)  # the only worker is held at the gate
    queued.append_nowait(_batch(0))
    assert pool.statistics().queued == 1
    queued_path = _segment_path(queued)
    closer = threading.Thread(target=queued.close)
    closer.start()
    fs.wait_started(queued_path, 1)  # close()'s own fsync, in the closing thread
    fs.gate.set()
    closer.join(timeout=WAIT_SECONDS)
    assert not closer.is_alive()
    # The queued job was dropped before it started: close's fsync is the only one.
    running.append(_batch(1))  # the worker has run everything queued before this
    assert fs.started[queued_path] == 1
    fs.gate.clear()
    running.append_nowait(_batch(2))
    fs.wait_started(_segment_path(running), 3)
    closer = threading.Thread(target=running.close)
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive(), "close() returned while its log's fsync was running"
    fs.gate.set()
    closer.join(timeout=WAIT_SECONDS)
    assert not closer.is_alive()
    assert fs.overlap_max == 1
    pool.stop()
    assert pool.statistics().workers == 0


def test_interval_policy_syncs_at_most_once_per_interval() -> None:
    """Under `interval` the appends of one interval share one fsync, due an interval
    after the last one; nothing is synced before (docs/guarantees.md). A clean close
    syncs what is written and drops the waiting job rather than hold the log for it."""
    fs = GatedFileSystem()
    pool = FsyncPool(2)
    slow = Log.open("/data/slow", _config("interval", fsync_interval_ms=600_000), fs=fs, fsync_pool=pool)
    for number in range(20):
        slow.append_nowait(_batch(number))
    assert pool.statistics().timed == 1  # one job for the 20 appends, waiting for its time
    assert slow.statistics().fsyncs == 0 and slow.durable_offset == 0
    slow.close()
    assert slow.durable_offset == 20 and pool.statistics().timed == 0
    pool.stop()
    assert pool.statistics().workers == 0


def test_interval_policy_is_synced_by_the_pool_without_a_waiter() -> None:
    """No flush and no durable waiter: the pool's timed job syncs the appends once their
    interval is up, and the log's later appends get a job of their own again."""
    fs = GatedFileSystem()
    pool = FsyncPool(2)
    log = Log.open("/data/quick", _config("interval", fsync_interval_ms=20), fs=fs, fsync_pool=pool)
    log.append_nowait(_batch(0))
    log.durable_future(0).result(timeout=WAIT_SECONDS)
    assert log.statistics().fsyncs == 1
    log.append_nowait(_batch(1))
    log.durable_future(1).result(timeout=WAIT_SECONDS)
    assert log.statistics().fsyncs == 2 and log.durable_offset == 2
    log.close()
    pool.stop()
    assert pool.statistics().workers == 0


def test_timed_jobs_run_in_due_order_and_stop_drops_those_not_due() -> None:
    import time

    pool = FsyncPool(1)
    ran: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    pool.submit_at(now + 3600, lambda: ran.append("an hour"))

    def later() -> None:
        ran.append("later")
        done.set()

    pool.submit_at(now + 0.02, later)
    pool.submit_at(now, lambda: ran.append("now"))
    assert done.wait(WAIT_SECONDS)
    assert ran == ["now", "later"] and pool.statistics().timed == 1
    pool.stop()
    assert pool.statistics().timed == 0 and pool.statistics().workers == 0 and ran == ["now", "later"]


def test_store_runs_every_partition_on_the_bounded_pool(tmp_path) -> None:
    """300 partitions, a durable append to each from several threads: at most
    fsync_workers_max fsync threads, and none left after Store.close()."""
    before = set(threading.enumerate())
    with Store.open(tmp_path, fsync_workers_max=3) as store:
        store.create_topic("many", TopicConfig(partitions=300))
        store.create_topic("timed", TopicConfig(partitions=5, fsync_policy="interval", fsync_interval_ms=5))
        assert store.fsync_pool.statistics().workers <= 3  # the creation ran on the pool too
        seen: list[int] = []

        def produce(first: int) -> None:
            for partition in range(first, 300, 6):
                store.log("many", partition).append(_batch(partition))
                store.log("timed", partition % 5).append_nowait(_batch(partition))
                seen.append(store.fsync_pool.statistics().workers)

        producers = [threading.Thread(target=produce, args=(first,)) for first in range(6)]
        for thread in producers:
            thread.start()
        for thread in producers:
            thread.join(timeout=WAIT_SECONDS)
        assert len(seen) == 300 and max(seen) <= 3
        assert 1 <= store.fsync_pool.statistics().workers <= 3
        assert all(store.log("many", partition).durable_offset == 1 for partition in range(300))
    assert [thread.name for thread in threading.enumerate() if thread not in before] == []


def test_a_standalone_log_uses_the_shared_default_pool(tmp_path) -> None:
    """Logs opened without a pool start no thread of their own: their fsyncs run on the
    default pool's named workers."""
    before = set(threading.enumerate())
    logs = [Log.open(str(tmp_path / f"p{number}"), _config()) for number in range(20)]
    for log in logs:
        log.append(_batch(0))
    started = [thread.name for thread in threading.enumerate() if thread not in before]
    assert len(started) <= default_fsync_pool().workers_max
    assert all(name.startswith("nodi-fsync-") for name in started)
    for log in logs:
        log.close()
    with Log.open(str(tmp_path / "never"), _config("never")) as log:
        log.append(_batch(0))
        assert log.durable_offset == 0  # fsync `never`: nothing ran it


def test_run_all_runs_every_job_and_returns_their_errors() -> None:
    pool = FsyncPool(4)
    done: list[int] = []

    def job(number: int):
        def run() -> None:
            if number == 7:
                raise OSError("disk on fire")
            done.append(number)

        return run

    errors = pool.run_all([job(number) for number in range(50)])
    assert sorted(done) == [number for number in range(50) if number != 7]
    assert [str(error) for error in errors] == ["disk on fire"]
    assert pool.statistics().workers <= 4
    pool.stop()
    assert pool.statistics().workers == 0


@pytest.mark.parametrize("workers", [0, -1, FSYNC_WORKERS_MAX + 1, True, "4"])
def test_fsync_workers_max_is_checked(tmp_path, workers) -> None:
    with pytest.raises(InvalidConfigError):
        FsyncPool(workers)
    with pytest.raises(InvalidConfigError):
        ServerConfig(fsync_workers_max=workers).validate()
    with pytest.raises(InvalidConfigError):
        Store.open(tmp_path, fsync_workers_max=workers)
    Store.open(tmp_path).close()  # the refused open left nothing locked
