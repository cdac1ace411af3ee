"""The fsync worker pool: a few named threads that run every partition log's fsyncs.

A log never owns a thread. An append hands its log to the pool when the log has no
fsync queued or running (one job per log at a time); the job syncs whatever the log
holds when it starts, and the appends that arrive while it runs share the next one
(group commit, I8), which the same worker runs at once unless other logs' jobs wait.
An `interval` log hands its job over with submit_at(), due one interval after its last
fsync: workers wait for the earliest such time, so an interval log is synced at most once
per interval however often it is written. The pool only runs callables; the log decides what each one does, so the failure rules
(I9, F7) stay in storage/log.py.

Threads start lazily, one more each time a job waits and no started thread is idle,
up to `workers_max` (FSYNC_WORKERS_MAX bounds the setting). A Store owns its pool and
stops it (joining the threads) when it closes; logs opened without one (Log.open in
tests and tools) share default_fsync_pool(). A worker exits after IDLE_EXIT_SECONDS
without work.

run_all() runs a list of callables on the workers and waits for all of them: a Store's
close runs its logs' clean closes (several fsyncs each) in parallel with it.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import InvalidConfigError

# Default worker count. Durable produce to many partitions wants as many fsyncs in
# flight as the clients have produce requests waiting on different partitions: ext4
# joins concurrent fsyncs into one journal commit, so fsyncs of 1,000 files from 32
# threads run 6-10x as many per second as from one, and a pool of 4 or 8 made the
# broker slower than a thread per log (docs/benchmarks.md). One producer keeps up to 32
# requests in flight. Threads start only as fsyncs wait, and exit when idle.
FSYNC_WORKERS_DEFAULT = 64
# The most workers a pool may be configured with.
FSYNC_WORKERS_MAX = 1024
# An idle worker wakes at least this often (every wait has a timeout).
IDLE_WAIT_SECONDS = 1.0
# A worker exits after this long without a job (the pool starts one again as needed).
IDLE_EXIT_SECONDS = 30.0
# Stopping the pool, or run_all(), waits at most this long for the workers.
STOP_JOIN_SECONDS = 60.0
THREAD_NAME_PREFIX = "nodi-fsync"

_logger = logging.getLogger("nodi.storage.fsync_pool")


@dataclass(frozen=True, slots=True)
class FsyncPoolStatistics:
    workers_max: int
    workers: int  # threads running now
    idle: int  # of which waiting for a job
    queued: int  # jobs waiting for a worker
    running: int  # jobs a worker runs now
    timed: int  # jobs waiting for their due time (submit_at)
    jobs_run: int


class FsyncPool:
    def __init__(
        self,
        workers_max: int = FSYNC_WORKERS_DEFAULT,
        *,
        name: str = THREAD_NAME_PREFIX,
        idle_exit_seconds: float | None = IDLE_EXIT_SECONDS,
    ) -> None:
        """`idle_exit_seconds`: an idle worker exits after that long (None: it stays
        until stop())."""
        check_fsync_workers_max(workers_max)
        self.workers_max = workers_max
        self.name = name
        self._idle_exit_seconds = idle_exit_seconds
        self._lock = threading.Lock()
        self._condition = threading.Condition(self._lock)
        self._ready: collections.deque[Callable[[], None]] = collections.deque()
        # submit_at()'s jobs: (due, monotonic seconds; tie-break; job), earliest first.
        self._timed: list[tuple[float, int, Callable[[], None]]] = []
        self._timed_numbers = itertools.count()
        self._threads: set[threading.Thread] = set()
        self._thread_numbers = iter(range(1, 2**62))
        self._idle = 0
        self._running = 0  # jobs a worker has taken and not finished
        self._stopped = False
        self._jobs_run = 0
        _POOLS.add(self)

    # -- work -----------------------------------------------------------------------

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job()` on a worker as soon as one is free. After stop() it is dropped:
        only a closed log's job can come then, and that one has nothing to do."""
        with self._lock:
            if self._stopped:
                return
            self._ready.append(job)
            if len(self._ready) == 1 and getattr(_worker, "pool", None) is self:
                return  # a worker queueing its log's next fsync runs it next itself
            if len(self._ready) > self._idle:
                self._start_worker_locked()
            self._condition.notify()

    def submit_at(self, due: float, job: Callable[[], None]) -> None:
        """Run `job()` on a worker once time.monotonic() reaches `due` (at once when it
        has): an `interval` log's next fsync. Dropped after stop(), as submit()'s are."""
        with self._lock:
            if self._stopped:
                return
            heapq.heappush(self._timed, (due, next(self._timed_numbers), job))
            if not self._idle:
                self._start_worker_locked()
            self._condition.notify()  # a waiting worker shortens its wait to the new due time

    def cancel_timed(self, job: Callable[[], None]) -> None:
        """Forget submit_at()'s jobs equal to `job` that are not yet due (a closing log's
        next fsync, which would find nothing to do)."""
        with self._lock:
            kept = [entry for entry in self._timed if entry[2] != job]
            if len(kept) != len(self._timed):
                heapq.heapify(kept)
                self._timed = kept

    def has_queued_nowait(self) -> bool:
        """Whether jobs wait for a worker now (read without the lock: a hint)."""
        return bool(self._ready)

    def idle_nowait(self) -> bool:
        """Whether no job waits for a worker and none is running (timed jobs not yet
        due aside), read without the lock: a hint. A log whose append finds the pool
        idle has nothing its fsync could be batched or overlapped with."""
        return not self._ready and not self._running

    def run_all(
        self, jobs: Sequence[Callable[[], None]], *, timeout_s: float = STOP_JOIN_SECONDS
    ) -> list[BaseException]:
        """Run every job on the workers (at most workers_max at once) and wait for them
        all, at most `timeout_s`; return what they raised. On a stopped pool, or when
        called from one of its own workers, they run here one after another."""
        errors: list[BaseException] = []
        if self._stopped or getattr(_worker, "pool", None) is self:
            for job in jobs:
                try:
                    job()
                except BaseException as error:  # noqa: BLE001 - the caller reports each
                    errors.append(error)
            return errors
        done = threading.Condition(threading.Lock())
        remaining = [len(jobs)]

        def wrap(job: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    job()
                except BaseException as error:  # noqa: BLE001 - the caller reports each
                    with done:
                        errors.append(error)
                finally:
                    with done:
                        remaining[0] -= 1
                        if not remaining[0]:
                            done.notify_all()

            return run

        for job in jobs:
            self.submit(wrap(job))
        deadline = time.monotonic() + timeout_s
        with done:
            while remaining[0] and time.monotonic() < deadline:
                done.wait(timeout=min(IDLE_WAIT_SECONDS, max(0.0, deadline - time.monotonic())))
            if remaining[0]:
                errors.append(TimeoutError(f"{remaining[0]} of {len(jobs)} jobs not done within {timeout_s:.0f} s"))
        return errors

    def stop(self) -> None:
        """Drop what is queued, let the workers finish their jobs and exit, and wait for
        them (STOP_JOIN_SECONDS at most). Owners close their logs first."""
        with self._lock:
            self._stopped = True
            self._ready.clear()
            self._timed.clear()
            threads = list(self._threads)
            self._condition.notify_all()
        current = threading.current_thread()
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        for thread in threads:
            if thread is not current:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def statistics(self) -> FsyncPoolStatistics:
        with self._lock:
            return FsyncPoolStatistics(
                workers_max=self.workers_max,
                workers=len(self._threads),
                idle=self._idle,
                queued=len(self._ready),
                running=self._running,
                timed=len(self._timed),
                jobs_run=self._jobs_run,
            )

    def _start_worker_locked(self) -> None:
        if len(self._threads) >= self.workers_max:
            return
        thread = threading.Thread(target=self._work, name=f"{self.name}-{next(self._thread_numbers)}", daemon=True)
        try:
            thread.start()
        except RuntimeError as error:  # the process may start no more threads
            # The job stays queued: a running worker takes it, or the next submit tries
            # to start one again; its durable waiters time out meanwhile (typed errors).
            _logger.error(
                "fsync pool: cannot start worker %d (%d running): %s", len(self._threads) + 1, len(self._threads), error
            )
            return
        self._threads.add(thread)

    def _next_job_locked(self) -> Callable[[], None] | None:
        """The next job, waiting for one; None when this worker must exit. A timed job
        that has come due is moved to the ready ones; a worker waits no longer than the
        earliest due time, and does not exit while timed jobs wait."""
        idle_since = time.monotonic()
        while True:
            now = time.monotonic()
            while self._timed and self._timed[0][0] <= now:
                self._ready.append(heapq.heappop(self._timed)[2])
            if self._ready:
                break
            if self._stopped:
                return None
            wait = IDLE_WAIT_SECONDS
            if self._timed:
                wait = min(wait, self._timed[0][0] - now)
            elif self._idle_exit_seconds is not None and now - idle_since >= self._idle_exit_seconds:
                return None
            self._idle += 1
            try:
                self._condition.wait(timeout=wait)
            finally:
                self._idle -= 1
        self._jobs_run += 1
        self._running += 1
        return self._ready.popleft()

    def _work(self) -> None:
        _worker.pool = self
        ran = False
        try:
            while True:
                with self._lock:
                    if ran:  # the last job is finished (counted here: no lock taken for it alone)
                        self._running -= 1
                    job = self._next_job_locked()
                    if job is None:
                        self._threads.discard(threading.current_thread())
                        return
                ran = True
                try:
                    job()
                except BaseException:  # a job's failure is its log's business, never the worker's
                    _logger.exception("fsync pool job failed")
        finally:
            _worker.pool = None


def check_fsync_workers_max(workers_max: int) -> None:
    if isinstance(workers_max, bool) or not isinstance(workers_max, int) or not 1 <= workers_max <= FSYNC_WORKERS_MAX:
        raise InvalidConfigError(f"fsync_workers_max {workers_max!r} outside 1..{FSYNC_WORKERS_MAX}")


_POOLS: weakref.WeakSet[FsyncPool] = weakref.WeakSet()
_worker = threading.local()  # .pool: whose worker this thread is
_default_pool: FsyncPool | None = None
_default_pool_lock = threading.Lock()


def default_fsync_pool() -> FsyncPool:
    """The pool shared by logs opened without one; its idle workers exit."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = FsyncPool(FSYNC_WORKERS_DEFAULT)
        return _default_pool


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: forget them, and take fresh
    locks (one may have been held by a thread that does not exist here)."""
    global _default_pool_lock
    _default_pool_lock = threading.Lock()
    for pool in list(_POOLS):
        pool._lock = threading.Lock()
        pool._condition = threading.Condition(pool._lock)
        pool._threads = set()
        pool._idle = 0
        pool._running = 0
        if pool._ready:
            with pool._lock:
                pool._start_worker_locked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
