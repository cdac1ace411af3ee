"""The fsync worker pool: a few named threads that run every partition log's fsyncs.

A log never owns a thread. Under fsync policy `always` an append hands its log to the
pool (one job per log at a time: the job syncs whatever the log holds when it starts,
and the appends that arrive while it runs share the next one: group commit, I8). Under
`interval` the log arms a timer on the pool instead, and a durable waiter asks for the
fsync at once. The pool only runs callables; the log decides what each one does, so the
failure rules (I9, F7) stay in storage/log.py.

Threads start lazily, one more each time work waits and every started thread is busy,
up to `workers_max` (FSYNC_WORKERS_MAX bounds the setting). Every user (a Store, each
log) calls acquire() once and release() once; the last release stops and joins the
threads, so nothing is left running after Store.close(). A later acquire starts over.
Logs opened without a pool (Log.open in tests and tools) share default_fsync_pool().
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
from collections.abc import Callable
from dataclasses import dataclass

from .errors import InvalidConfigError

# Default worker count: fsync waits on the disk with the GIL released, and the file
# system joins concurrent fsyncs into one journal commit, so a few threads keep a disk
# busy; they start only as fsyncs wait (one partition under load uses one or two).
FSYNC_WORKERS_DEFAULT = 8
# The most workers a pool may be configured with.
FSYNC_WORKERS_MAX = 64
# An idle worker wakes at least this often (every wait has a timeout).
IDLE_WAIT_SECONDS = 1.0
# Stopping the pool waits at most this long for its workers to finish their jobs.
STOP_JOIN_SECONDS = 30.0
THREAD_NAME_PREFIX = "nodi-fsync"

_logger = logging.getLogger("nodi.storage.fsync_pool")


class FsyncJob:
    """One callable queued on the pool; cancel() before it starts and it never runs."""

    __slots__ = ("function", "cancelled", "in_timers", "_pool")

    def __init__(self, pool: FsyncPool, function: Callable[[], None], *, in_timers: bool = False) -> None:
        self.function = function
        self.cancelled = False
        self.in_timers = in_timers  # still in the pool's timer heap
        self._pool = pool

    def cancel(self) -> None:
        self._pool._cancel(self)


@dataclass(frozen=True, slots=True)
class FsyncPoolStatistics:
    workers_max: int
    workers: int  # threads running now
    users: int
    queued: int  # jobs waiting for a worker
    timers: int  # armed timers (interval policy)
    jobs_run: int


class FsyncPool:
    def __init__(self, workers_max: int = FSYNC_WORKERS_DEFAULT, *, name: str = THREAD_NAME_PREFIX) -> None:
        check_fsync_workers_max(workers_max)
        self.workers_max = workers_max
        self.name = name
        self._lock = threading.Lock()
        self._condition = threading.Condition(self._lock)
        self._ready: collections.deque[FsyncJob] = collections.deque()
        # (deadline on time.monotonic(), sequence, job)
        self._timers: list[tuple[float, int, FsyncJob]] = []
        self._sequence = itertools.count()
        self._cancelled_timers = 0  # cancelled jobs still in _timers
        self._threads: list[threading.Thread] = []
        self._thread_numbers = itertools.count(1)
        self._idle = 0
        self._users = 0
        self._generation = 0  # bumped at each stop: workers of an older one exit
        self._jobs_run = 0
        _POOLS.add(self)

    # -- users ----------------------------------------------------------------------

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        """The last user's release stops the workers and drops what is queued (every
        user has cancelled its jobs by then) and waits for the workers to exit."""
        with self._lock:
            assert self._users > 0, "release without acquire"
            self._users -= 1
            if self._users:
                return
            threads, self._threads = self._threads, []
            self._generation += 1
            self._ready.clear()
            self._timers.clear()
            self._cancelled_timers = 0
            self._condition.notify_all()
        current = threading.current_thread()
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        for thread in threads:
            if thread is not current:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- work -----------------------------------------------------------------------

    def submit(self, function: Callable[[], None]) -> FsyncJob:
        """Run `function()` on a worker as soon as one is free."""
        job = FsyncJob(self, function)
        self.submit_job(job)
        return job

    def submit_job(self, job: FsyncJob) -> None:
        """Queue a job made by FsyncJob(pool, function), which its owner may record
        under its own lock and hand over after releasing it; one cancelled meanwhile
        is dropped here."""
        with self._lock:
            if job.cancelled:
                return
            assert self._users > 0, "submit on a pool nobody acquired"
            self._ready.append(job)
            if len(self._ready) == 1 and getattr(_worker, "pool", None) is self and _worker.generation == self._generation:
                return  # a worker queueing its log's next fsync runs it next itself
            if len(self._ready) > self._idle:
                self._start_worker_locked()
            self._condition.notify()

    def call_later(self, delay_seconds: float, function: Callable[[], None]) -> FsyncJob:
        """Run `function()` on a worker `delay_seconds` from now (cancel() to drop it)."""
        job = FsyncJob(self, function, in_timers=True)
        with self._lock:
            assert self._users > 0, "call_later on a pool nobody acquired"
            heapq.heappush(self._timers, (time.monotonic() + delay_seconds, next(self._sequence), job))
            if not self._threads:
                self._start_worker_locked()
            # An idle worker may be sleeping towards a later deadline: let one recompute.
            self._condition.notify()
        return job

    def _cancel(self, job: FsyncJob) -> None:
        """Cancelled jobs leave the ready queue as workers reach them (it drains fast);
        the timer heap is rebuilt once cancelled timers are most of it, so a closed log
        is not kept alive by a timer for its whole interval."""
        with self._lock:
            if job.cancelled:
                return
            job.cancelled = True
            if job.in_timers:
                self._cancelled_timers += 1
                if self._cancelled_timers * 2 > len(self._timers):
                    self._timers = [entry for entry in self._timers if not entry[2].cancelled]
                    heapq.heapify(self._timers)
                    self._cancelled_timers = 0

    def has_queued_nowait(self) -> bool:
        """Whether jobs wait for a worker now (read without the lock: a hint)."""
        return bool(self._ready)

    def statistics(self) -> FsyncPoolStatistics:
        with self._lock:
            return FsyncPoolStatistics(
                workers_max=self.workers_max,
                workers=len(self._threads),
                users=self._users,
                queued=len(self._ready),
                timers=len(self._timers) - self._cancelled_timers,
                jobs_run=self._jobs_run,
            )

    def _start_worker_locked(self) -> None:
        if len(self._threads) >= self.workers_max:
            return
        thread = threading.Thread(
            target=self._work,
            args=(self._generation,),
            name=f"{self.name}-{next(self._thread_numbers)}",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError as error:  # the process may start no more threads
            # The job stays queued: a running worker takes it, or the next submit tries
            # to start one again; its durable waiters time out meanwhile (typed errors).
            _logger.error("fsync pool: cannot start worker %d (%d running): %s", len(self._threads) + 1,
                          len(self._threads), error)
            return
        self._threads.append(thread)

    def _next_job_locked(self, generation: int) -> FsyncJob | None:
        """The next job to run, waiting for one; None when this worker must exit."""
        while generation == self._generation:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                job = heapq.heappop(self._timers)[2]
                job.in_timers = False
                if job.cancelled:
                    self._cancelled_timers -= 1
                else:
                    self._ready.append(job)
            while self._ready:
                job = self._ready.popleft()
                if not job.cancelled:
                    return job
            timeout = IDLE_WAIT_SECONDS
            if self._timers:
                timeout = min(timeout, self._timers[0][0] - now)
            self._idle += 1
            try:
                self._condition.wait(timeout=timeout)
            finally:
                self._idle -= 1
        return None

    def _work(self, generation: int) -> None:
        _worker.pool, _worker.generation = self, generation
        while True:
            with self._lock:
                job = self._next_job_locked(generation)
                if job is None:
                    return
                self._jobs_run += 1
            try:
                job.function()
            except BaseException:  # a job's failure is its log's business, never the worker's
                _logger.exception("fsync pool job failed")


def check_fsync_workers_max(workers_max: int) -> None:
    if isinstance(workers_max, bool) or not isinstance(workers_max, int) or not 1 <= workers_max <= FSYNC_WORKERS_MAX:
        raise InvalidConfigError(f"fsync_workers_max {workers_max!r} outside 1..{FSYNC_WORKERS_MAX}")


_POOLS: weakref.WeakSet[FsyncPool] = weakref.WeakSet()
_worker = threading.local()  # .pool, .generation: whose worker this thread is
_default_pool: FsyncPool | None = None
_default_pool_lock = threading.Lock()


def default_fsync_pool() -> FsyncPool:
    """The pool shared by logs opened without one (FSYNC_WORKERS_DEFAULT workers)."""
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
        pool._threads = []
        pool._idle = 0
        pool._generation += 1
        if pool._ready or pool._timers:
            with pool._lock:
                pool._start_worker_locked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
