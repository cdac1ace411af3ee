"""The partition log held against a simple in-memory model (hypothesis stateful test).

The model is a list of segments, each a list of the batches appended to it (their exact
bytes, with the base offset the log assigned, and their records). Random appends (one to
three batches, none or gzip), reads at random offsets with random byte budgets, rolls,
retention by time (a fake clock passed to Log.open) and by bytes, offset_for_timestamp,
clean close + reopen, and crashes (the Log object is abandoned without close and a fresh
one opened on the same directory) must all agree with the model, under every fsync
policy.

Invariants named: I1 (segment base offsets and sizes), I3 (dense offsets; a read returns
whole, consecutive batches from the one holding the offset), I5 (the checkpoint's
recovery point never passes the log end and never moves back), I10 (retention drops
whole segments from the front; the log start offset is the first segment's base), F5/G1
(after process death everything written is still there, under every policy; under
`always` that is everything acknowledged), G3 (recovery reports no loss).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from nodi.storage.checkpoint import read_checkpoint
from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.errors import OffsetOutOfRangeError
from nodi.storage.fileio import OS_FILE_SYSTEM
from nodi.storage.log import Log
from nodi.storage.records import (
    Compression,
    NewRecord,
    Record,
    build_batch,
    decode_records,
    iter_batches,
    set_base_offset,
)

CLOCK_START_MS = 10_000
TIMESTAMP_MAX_MS = 20_000

# fsync `never` costs no fsync per append, so it gets the most examples; the read,
# retention and timestamp rules do not depend on the policy.
EXAMPLES_PER_POLICY = {FsyncPolicy.ALWAYS: 80, FsyncPolicy.INTERVAL: 50, FsyncPolicy.NEVER: 150}


def model_settings(policy: FsyncPolicy) -> settings:
    return settings(
        max_examples=EXAMPLES_PER_POLICY[policy],
        stateful_step_count=50,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------------------
# The model


@dataclass
class ModelBatch:
    base_offset: int
    data: bytes  # exactly what the log stores: the producer's bytes, base offset set
    records: list[Record]

    @property
    def last_offset(self) -> int:
        return self.records[-1].offset

    @property
    def max_timestamp(self) -> int:
        return max(record.timestamp_ms for record in self.records)


@dataclass
class ModelSegment:
    base_offset: int
    batches: list[ModelBatch] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(len(batch.data) for batch in self.batches)

    @property
    def next_offset(self) -> int:
        return self.batches[-1].last_offset + 1 if self.batches else self.base_offset

    @property
    def max_timestamp(self) -> int:
        return max((batch.max_timestamp for batch in self.batches), default=-1)


# ---------------------------------------------------------------------------
# Strategies

# Kept cheap to draw (hypothesis bounds the choices in one run): the codec has its own
# tests; what the log cares about is batch sizes, counts, codecs and timestamps.
values = st.one_of(
    st.none(),
    st.binary(max_size=16),
    # Long, compressible values: rolls under no compression, tiny batches under gzip.
    st.builds(lambda length, byte: bytes([byte]) * length, st.integers(0, 1500), st.integers(0, 255)),
)
# Whole seconds half of the time, as the clock steps: retention's `<` and the time
# index's `>=` are tested at equality, not only around it.
timestamps = st.integers(0, TIMESTAMP_MAX_MS) | st.integers(0, TIMESTAMP_MAX_MS // 1000).map(lambda s: s * 1000)
clock_steps = st.integers(0, 8000) | st.integers(0, 8).map(lambda s: s * 1000)
new_records = st.builds(
    NewRecord,
    key=st.none() | st.binary(max_size=4),
    value=values,
    headers=st.sampled_from([(), (("h", None),), (("trace", b"\x01\x02"), ("", b""))]),
    timestamp_ms=timestamps,
)
batches = st.tuples(
    st.lists(new_records, min_size=1, max_size=4), st.sampled_from([Compression.NONE, Compression.GZIP])
)


class LogModelMachine(RuleBasedStateMachine):
    """One log directory per run; `policy` is fixed per test."""

    policy: FsyncPolicy = FsyncPolicy.ALWAYS
    base_directory: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="log-model-", dir=self.base_directory)
        self.now_ms = CLOCK_START_MS
        self.segments = [ModelSegment(0)]
        self.recovery_offset = 0
        self.log: Log | None = None
        self.abandoned: list[Log] = []
        # The log was opened clean and nothing changed its files since: it keeps its
        # clean-shutdown marker, so even a crash now leaves a clean log.
        self.unchanged_since_clean_open = False

    # -- helpers ------------------------------------------------------------------

    def clock_ms(self) -> int:
        return self.now_ms

    def open_log(self) -> Log:
        return Log.open(self.directory, self.config, clock_ms=self.clock_ms)

    @property
    def log_start_offset(self) -> int:
        return self.segments[0].base_offset

    @property
    def next_offset(self) -> int:
        return self.segments[-1].next_offset

    def all_batches(self) -> list[ModelBatch]:
        return [batch for segment in self.segments for batch in segment.batches]

    def model_roll(self) -> None:
        if self.segments[-1].batches:
            self.segments.append(ModelSegment(self.next_offset))
            self.unchanged_since_clean_open = False

    # -- rules --------------------------------------------------------------------

    @initialize(
        segment_bytes=st.sampled_from([4096, 6000, 8192]),
        index_interval_bytes=st.sampled_from([64, 700, 4096]),
        retention_ms=st.sampled_from([None, 0, 3000, 12_000]),
        retention_bytes=st.sampled_from([None, 0, 5000, 20_000]),
    )
    def open_first(self, segment_bytes, index_interval_bytes, retention_ms, retention_bytes) -> None:
        self.config = LogConfig(
            segment_bytes=segment_bytes,
            index_interval_bytes=index_interval_bytes,
            fsync_policy=self.policy,
            fsync_interval_ms=5,
            retention_ms=retention_ms,
            retention_bytes=retention_bytes,
        )
        self.log = self.open_log()
        assert self.log.recovery_report.created

    @rule(appended=batches)
    def append_batch(self, appended) -> None:
        self.append_to_both([appended])

    @rule(appended=st.lists(batches, min_size=2, max_size=3))
    def append_batches(self, appended) -> None:
        """Several batches in one append: placed together, after one roll check."""
        self.append_to_both(appended)

    def append_to_both(self, appended) -> None:
        assert self.log is not None  # opened by open_first, the initialize rule
        built = [build_batch(records, compression=compression) for records, compression in appended]
        data = b"".join(built)
        active = self.segments[-1]
        if active.size and active.size + len(data) > self.config.segment_bytes:
            self.model_roll()
        first_offset = offset = self.next_offset
        for batch_bytes in built:
            stored = bytearray(batch_bytes)
            set_base_offset(stored, offset)
            ((header, view),) = iter_batches(stored)
            records = decode_records(view, header)
            self.segments[-1].batches.append(ModelBatch(offset, bytes(stored), records))
            offset += len(records)
        self.unchanged_since_clean_open = False
        result = self.log.append(data)
        assert (result.first_offset, result.last_offset) == (first_offset, offset - 1)
        assert (result.batch_count, result.byte_count) == (len(built), len(data))
        assert result.log_append_time_ms == self.now_ms

    @rule(
        position=st.integers(0, 10**6),
        budget_batches=st.integers(0, 8),
        percent_of_next=st.integers(-1, 100),
        raw_budget=st.none() | st.integers(0, 20_000),
    )
    def read(self, position, budget_batches, percent_of_next, raw_budget) -> None:
        assert self.log is not None  # opened by open_first, the initialize rule
        start, end = self.log_start_offset, self.next_offset
        offset = start - 2 + position % (end - start + 5)  # two either side of the log
        following = [batch for batch in self.all_batches() if batch.last_offset >= offset]
        # Mostly a budget of whole batches plus part of the next one (100: exactly enough;
        # -1: one byte short of the whole batches), where the rules bite.
        bytes_max = raw_budget
        if bytes_max is None:
            bytes_max = sum(len(batch.data) for batch in following[:budget_batches])
            if percent_of_next < 0:
                bytes_max = max(0, bytes_max - 1)
            elif budget_batches < len(following):
                bytes_max += len(following[budget_batches].data) * percent_of_next // 100
        if offset < start or offset > end:
            try:
                self.log.read(offset, bytes_max)
            except OffsetOutOfRangeError as error:
                assert (error.log_start_offset, error.log_end_offset) == (start, end)
            else:
                raise AssertionError(f"read at {offset} outside [{start}, {end}] did not raise")
            return
        # Whole batches from the one holding `offset`: the first always, then more while
        # the total stays within bytes_max; never one skipped for a later one (I3).
        expected: list[ModelBatch] = []
        total = 0
        for batch in following:
            if expected and total + len(batch.data) > bytes_max:
                break
            expected.append(batch)
            total += len(batch.data)
        result = self.log.read(offset, bytes_max)
        assert (result.log_start_offset, result.end_offset) == (start, end)
        data = result.to_bytes()
        assert data == b"".join(batch.data for batch in expected), (
            f"read({offset}, {bytes_max}) returned batches "
            f"{[header.base_offset for header, _ in iter_batches(data)] if data else []}, "
            f"expected {[batch.base_offset for batch in expected]}"
        )
        assert result.byte_count == total
        if expected:
            assert result.slices[0].first_offset == offset
            assert result.next_offset == expected[-1].last_offset + 1
            decoded = [record for header, view in iter_batches(data) for record in decode_records(view, header)]
            assert decoded == [record for batch in expected for record in batch.records]
        else:
            assert offset == end and not result.slices
        assert self.log.read_bytes(offset, bytes_max) == data

    @rule()
    def roll(self) -> None:
        assert self.log is not None  # opened by open_first, the initialize rule
        self.model_roll()
        self.log.roll()

    @rule(elapsed_ms=clock_steps)
    def advance_clock(self, elapsed_ms) -> None:
        self.now_ms += elapsed_ms

    @rule(extra_ms=st.sampled_from([-1, 0, 1]))
    def advance_clock_to_retention_edge(self, extra_ms) -> None:
        """Step the clock (never back) to where the oldest segment is just about to
        expire, expires exactly, or just has."""
        if self.config.retention_ms is not None and len(self.segments) > 1:
            edge_ms = self.segments[0].max_timestamp + self.config.retention_ms + extra_ms
            self.now_ms = max(self.now_ms, edge_ms)

    @rule()
    def apply_retention(self) -> None:
        assert self.log is not None  # opened by open_first, the initialize rule
        expected = []
        retention_ms, retention_bytes = self.config.retention_ms, self.config.retention_bytes
        total = sum(segment.size for segment in self.segments)
        while len(self.segments) > 1:
            oldest = self.segments[0]
            if retention_ms is not None and oldest.max_timestamp < self.now_ms - retention_ms:
                reason = "retention-ms"
            elif retention_bytes is not None and total - oldest.size >= retention_bytes:
                reason = "retention-bytes"
            else:
                break
            self.segments.pop(0)
            self.unchanged_since_clean_open = False
            total -= oldest.size
            expected.append((oldest.base_offset, oldest.next_offset, oldest.size, reason))
        deleted = self.log.apply_retention()  # now from the fake clock
        assert [(d.base_offset, d.next_offset, d.byte_count, d.reason) for d in deleted] == expected
        assert self.log.log_start_offset == self.log_start_offset  # I10

    @rule(
        pick=st.integers(0, 10**6),
        delta_ms=st.sampled_from([-1, 0, 1]),
        raw_timestamp_ms=st.none() | st.integers(-5, TIMESTAMP_MAX_MS + 5),
    )
    def offset_for_timestamp(self, pick, delta_ms, raw_timestamp_ms) -> None:
        assert self.log is not None  # opened by open_first, the initialize rule
        # Mostly a timestamp next to one a record carries.
        stamps = [record.timestamp_ms for batch in self.all_batches() for record in batch.records]
        timestamp_ms = raw_timestamp_ms
        if timestamp_ms is None:
            timestamp_ms = stamps[pick % len(stamps)] + delta_ms if stamps else delta_ms
        expected = next(
            (
                record.offset
                for batch in self.all_batches()
                for record in batch.records
                if record.timestamp_ms >= timestamp_ms
            ),
            None,
        )
        assert self.log.offset_for_timestamp(timestamp_ms) == expected

    @rule(crash=st.booleans())
    def reopen(self, crash) -> None:
        """A clean close and open, or process death (F5): the old Log is never touched
        again, not even closed, and a fresh one opens the same directory."""
        assert self.log is not None  # opened by open_first, the initialize rule
        if crash:
            self.abandoned.append(self.log)
        else:
            self.log.close()
        self.log = self.open_log()
        report = self.log.recovery_report
        assert report.clean_shutdown == (not crash or self.unchanged_since_clean_open), report.describe()
        self.unchanged_since_clean_open = report.clean_shutdown
        assert not report.lost_anything and not report.removed_segments, report.describe()

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def log_matches_model(self) -> None:
        if self.log is None:
            return
        assert self.log.log_start_offset == self.log_start_offset
        assert self.log.next_offset == self.next_offset
        assert self.log.readable_end_offset == self.next_offset
        # I1: the same segments, in the same places.
        assert [(s.base_offset, s.size) for s in self.log.segments] == [(s.base_offset, s.size) for s in self.segments]
        assert self.log.statistics().byte_count == sum(segment.size for segment in self.segments)

    @invariant()
    def recovery_point_only_moves_forward(self) -> None:
        """I5: the checkpoint never vouches past the log end, and never moves back."""
        if self.log is None:
            return
        checkpoint = read_checkpoint(OS_FILE_SYSTEM, self.directory)
        if checkpoint is None:
            return
        assert checkpoint.recovery_offset <= self.next_offset, checkpoint
        assert checkpoint.recovery_offset >= self.recovery_offset, (checkpoint, self.recovery_offset)
        self.recovery_offset = checkpoint.recovery_offset

    def teardown(self) -> None:
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        # Only now, with the directory gone, can an abandoned log's close not write into
        # files another Log owned: it stops its flusher thread and closes descriptors.
        for abandoned in self.abandoned:
            abandoned.close()


@pytest.mark.parametrize("policy", list(FsyncPolicy), ids=lambda policy: policy.value)
def test_log_against_model(tmp_path: Path, policy: FsyncPolicy) -> None:
    machine = type(f"LogModel_{policy.value}", (LogModelMachine,), {"policy": policy, "base_directory": str(tmp_path)})
    run_state_machine_as_test(machine, settings=model_settings(policy))


# ---------------------------------------------------------------------------
# Regressions the model found, pinned as plain examples


def test_read_never_skips_a_batch_that_does_not_fit(tmp_path: Path) -> None:
    """I3: when the next segment's first batch is over the budget the read stops there;
    it used to go on and serve a smaller batch from the segment after, leaving a gap."""
    small = build_batch([NewRecord(None, b"s" * 100, (), 1)])
    large = build_batch([NewRecord(None, b"l" * 3000, (), 1)])
    with Log.open(str(tmp_path), LogConfig(segment_bytes=4096, retention_ms=None)) as log:
        for data in (small, large, small):  # one batch per segment: offsets 0, 1, 2
            log.append(data)
            log.roll()
        result = log.read(0, 2 * len(small))
        assert [header.base_offset for header, _ in iter_batches(result.to_bytes())] == [0]
        assert result.next_offset == 1


def test_retention_never_moves_the_recovery_point_back(tmp_path: Path) -> None:
    """I5: a clean close puts the recovery point at the log end; retention after the
    reopen used to write the active segment's base offset, below it."""
    config = LogConfig(segment_bytes=4096, retention_ms=None, retention_bytes=0)
    batch = build_batch([NewRecord(None, b"v" * 100, (), 1)])
    with Log.open(str(tmp_path), config) as log:
        log.append(batch)
        log.roll()
        log.append(batch)
        log.append(batch)
    checkpoint = read_checkpoint(OS_FILE_SYSTEM, str(tmp_path))
    assert checkpoint is not None, "a clean close writes the checkpoint"
    assert checkpoint.recovery_offset == 3
    with Log.open(str(tmp_path), config) as log:
        assert [deleted.base_offset for deleted in log.apply_retention()] == [0]
        checkpoint = read_checkpoint(OS_FILE_SYSTEM, str(tmp_path))
        assert checkpoint is not None  # the clean close above wrote one
        assert checkpoint.recovery_offset == 3 and checkpoint.log_start_offset == 1
