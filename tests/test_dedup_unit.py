"""PublishDedup (broker/server/dedup.py) without a server: the fast path, per-record answers,
repeats inside a request, expiry by the window, the key limit, compressed batches, and
the rebuild from a real partition log through its time index. Time is driven by hand."""

from __future__ import annotations

import pytest

from nodi.broker.protocol.headers import IDEMPOTENCY_KEY, TTL_MS
from nodi.broker.server.dedup import DedupCheck, PublishDedup
from nodi.storage.errors import InvalidRecordError
from nodi.storage.log import Log
from nodi.storage.records import Compression, NewRecord, build_batch


class Clock:
    def __init__(self, now_ms: int = 1_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def record(value: bytes, key: str | None = None, timestamp_ms: int | None = None) -> NewRecord:
    headers = [] if key is None else [(IDEMPOTENCY_KEY, key.encode())]
    return NewRecord(None, value, headers, timestamp_ms)


class Dedup(PublishDedup):
    """check() with the topic's window as the broker passes it (0 for other topics)."""

    windows: dict[str, int]

    # Not a substitute for PublishDedup (no window argument): the tests call it directly.
    def check(self, topic: str, records: bytes | memoryview) -> DedupCheck | None:  # type: ignore[override]
        return super().check(topic, self.windows.get(topic, 0), records)


def make(window_ms: int = 1_000, keys_max: int = 100) -> tuple[Dedup, Clock]:
    clock = Clock()
    dedup = Dedup(keys_max, clock)
    dedup.windows = {"t": window_ms}
    return dedup, clock


def test_requests_without_the_header_take_the_fast_path():
    dedup, _ = make()
    plain = build_batch([record(b"x"), NewRecord(None, b"y", [(TTL_MS, b"5")])])
    assert dedup.check("t", plain) is None
    assert dedup.check("other", build_batch([record(b"x", "k")])) is None  # no window
    statistics = dedup.statistics()
    assert statistics.requests_searched == 1 and statistics.batches_decoded == 0
    assert statistics.requests_skipped == 0  # no check_append handed over: searched as before


def test_seen_keys_are_duplicates_until_the_window_passes():
    dedup, clock = make(window_ms=1_000)
    first = dedup.check("t", build_batch([record(b"a", "a"), record(b"n"), record(b"b", "b")]))
    assert first.duplicates == () and [index for index, _ in first.keyed] == [0, 2]
    dedup.record("t", 3, 40, first)
    clock.now_ms += 1_000
    again = dedup.check("t", build_batch([record(b"b", "b"), record(b"a", "a")]))
    assert [(i, o.partition, o.offset) for i, o in again.duplicates] == [(0, 3, 42), (1, 3, 40)]
    assert again.record_count == 2
    clock.now_ms += 1
    later = dedup.check("t", build_batch([record(b"a", "a")]))
    assert later.duplicates == () and dedup.statistics().keys == 0  # expired and dropped


def test_repeats_inside_a_request_name_their_first_record():
    dedup, _ = make()
    check = dedup.check("t", build_batch([record(b"1", "k"), record(b"2", "j")]) + build_batch([record(b"3", "k")]))
    assert [(i, o.partition, o.offset) for i, o in check.duplicates] == [(2, -1, 0)]
    assert check.record_count == 3


def test_the_key_limit_evicts_the_oldest_and_counts_it():
    dedup, clock = make(window_ms=10_000, keys_max=3)
    for number in range(5):
        check = dedup.check("t", build_batch([record(b"v", f"k{number}")]))
        dedup.record("t", 0, number, check)
        clock.now_ms += 1
    assert dedup.statistics().keys == 3 and dedup.statistics().evicted_early == 2
    assert dedup.check("t", build_batch([record(b"v", "k0")])).duplicates == ()
    assert dedup.check("t", build_batch([record(b"v", "k4")])).duplicates[0][1].offset == 4


def test_compressed_batches_are_not_decoded():
    dedup, _ = make()
    assert dedup.check("t", build_batch([record(b"v", "k")], compression=Compression.GZIP)) is None


def test_bad_batches_are_refused_like_the_log_refuses_them():
    dedup, _ = make()
    batch = bytearray(build_batch([record(b"v", "k")]))
    batch[-1] ^= 0xFF
    with pytest.raises(InvalidRecordError):
        dedup.check("t", bytes(batch))


def test_rebuild_reads_back_only_keys_within_the_window(tmp_path):
    clock = Clock(10_000_000)
    with Log.open(str(tmp_path / "t-0"), clock_ms=clock) as partition_log:
        old = clock.now_ms - 60_000
        partition_log.append(build_batch([record(b"old", "old", old)]))
        partition_log.append(build_batch([record(b"gzip", "gz", clock.now_ms)], compression=Compression.GZIP))
        partition_log.append(build_batch([record(b"n", None, clock.now_ms), record(b"new", "new", clock.now_ms)]))
        dedup = Dedup(100, clock)
        dedup.windows = {"t": 30_000}
        dedup.configure("t", 30_000)
        assert dedup.rebuild_all([("t", 0, partition_log)]) == 1
        found = dedup.check("t", build_batch([record(b"x", "new"), record(b"y", "old"), record(b"z", "gz")]))
        assert [(i, o.partition, o.offset) for i, o in found.duplicates] == [(0, 0, 3)]
        assert dedup.statistics().rebuilt_keys == 1


def test_a_window_change_applies_at_once():
    dedup, _ = make()
    dedup.record("t", 0, 7, dedup.check("t", build_batch([record(b"v", "k")])))
    dedup.windows["t"] = 0
    assert dedup.check("t", build_batch([record(b"v", "k")])) is None and dedup.statistics().topics == 0
    dedup.windows["t"] = 5_000  # on again: a fresh map
    assert dedup.check("t", build_batch([record(b"v", "k")])).duplicates == ()


def test_rebuild_reads_at_most_the_newest_segments_within_its_byte_limit(tmp_path):
    from nodi.storage.config import LogConfig

    clock = Clock(10_000_000)
    with Log.open(str(tmp_path / "t-0"), LogConfig(segment_bytes=4096), clock_ms=clock) as partition_log:
        for number in range(40):  # about 1 KiB each: several segments
            partition_log.append(build_batch([record(b"x" * 1000, f"k{number}", clock.now_ms)]))
        assert len(partition_log.segments) > 4
        dedup = Dedup(100, clock, rebuild_bytes_max=5_000)
        dedup.windows = {"t": 30_000}
        dedup.configure("t", 30_000)
        read_back = dedup.rebuild_all([("t", 0, partition_log)])
        assert 0 < read_back < 40
        assert dedup.check("t", build_batch([record(b"v", "k39")])).duplicates
        assert not dedup.check("t", build_batch([record(b"v", "k0")])).duplicates
