"""A fixed-bucket histogram for figures the storage layer times or counts (fsync
latency, appends per group commit), cheap enough for the fsync path: one bisect and an
uncontended lock per observation. Snapshots are frozen and go out through
statistics(); the broker turns them into Prometheus histograms.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

# Upper bounds (inclusive) of the fsync latency buckets, in seconds: 50 µs (page cache,
# battery-backed controllers) to 10 s (a disk in trouble).
FSYNC_SECONDS_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
# Appends one fsync made durable (group commit size), powers of two.
GROUP_COMMIT_APPENDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """`bounds[i]` is bucket i's upper bound; `counts[i]` the observations in it alone
    (not cumulative); `counts[-1]` (one more than bounds) those above the last bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float  # the sum of the observed values

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), the last bound +inf."""
        running = 0
        pairs = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            pairs.append((bound, running))
        return pairs


class Histogram:
    __slots__ = ("_bounds", "_counts", "_total", "_lock")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        assert list(bounds) == sorted(bounds) and len(set(bounds)) == len(bounds), bounds
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._total += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            return HistogramSnapshot(self._bounds, tuple(self._counts), self._total)
