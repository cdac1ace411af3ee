"""Compaction held against an in-memory model (hypothesis, model-based).

Random appends (keyed records, tombstones, a few keyless records), rolls, clock steps,
reopens and compaction runs with a tiny key map budget (so runs take several passes).
After every step the log read from offset 0 must equal the model:

- I13  below the end E of the last run (the active segment's base when it ran), each key
       keeps only its latest record below E; at and above E nothing was touched;
- offsets are the original ones and increase (gaps allowed, never reordered);
- a tombstone below E stays until delete_retention_ms after the first run that covered
  it, and is gone after;
- every segment file is valid RecordBatch v2 (CRC) and the log reopens to the same
  content (indexes rebuilt for rewritten segments check out).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nodi.storage.compaction import (
    KEY_MAP_ENTRY_BYTES,
    CompactionConfig,
    Compactor,
    decode_compaction_checkpoint,
    dirty_ratio,
)
from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.log import Log
from nodi.storage.records import ATTRIBUTE_DELETE_HORIZON, Compression, NewRecord, build_batch, decode_batches
from nodi.storage.segment import BatchScanner

DELETE_RETENTION_MS = 1_000
START_MS = 1_700_000_000_000
KEYS = [b"k%d" % number for number in range(12)]

CONFIG = LogConfig(
    segment_bytes=4096,
    index_interval_bytes=256,
    fsync_policy=FsyncPolicy.NEVER,
    retention_ms=None,
    dense_offsets=False,
)

record_strategy = st.tuples(
    st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.none()),  # key (rarely None)
    st.one_of(st.binary(min_size=0, max_size=40), st.none()),  # value (None: tombstone)
)


class CompactionModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="nodi-compaction-model-")
        self.now_ms = START_MS
        self.log = Log.open(self.directory, CONFIG, clock_ms=lambda: self.now_ms)
        # Every record appended: offset -> (key, value).
        self.appended: dict[int, tuple[bytes | None, bytes | None]] = {}
        self.next_offset = 0
        self.compacted_end = 0  # E of the last run
        # Offset of a tombstone -> time of the first run that covered it.
        self.first_seen_ms: dict[int, int] = {}
        self.last_run_ms: int | None = None

    def teardown(self) -> None:
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- rules --------------------------------------------------------------------

    @rule(records=st.lists(record_strategy, min_size=1, max_size=6), gzip=st.booleans())
    def append(self, records, gzip) -> None:
        batch = build_batch(
            [NewRecord(key, value, (("h", b"x"),) if value else (), self.now_ms) for key, value in records],
            compression=Compression.GZIP if gzip else Compression.NONE,
        )
        result = self.log.append(batch)
        assert result.first_offset == self.next_offset
        for number, (key, value) in enumerate(records):
            self.appended[self.next_offset + number] = (key, value)
        self.next_offset += len(records)

    @rule()
    def roll(self) -> None:
        self.log.roll()

    @rule(step_ms=st.sampled_from([1, 400, 999, 1_000, 1_500, 5_000]))
    def advance_clock(self, step_ms) -> None:
        self.now_ms += step_ms

    @rule()
    def reopen(self) -> None:
        self.log.close()
        self.log = Log.open(self.directory, CONFIG, clock_ms=lambda: self.now_ms)
        assert self.log.next_offset == self.next_offset

    @precondition(lambda self: self.next_offset > 0)
    @rule(entries=st.sampled_from([1, 2, 3, 1_000]), roll=st.booleans())
    def compact(self, entries, roll) -> None:
        compactor = Compactor(CompactionConfig(KEY_MAP_ENTRY_BYTES * entries, DELETE_RETENTION_MS))
        ratio = dirty_ratio(self.log)
        assert 0.0 <= ratio <= 1.0
        result = compactor.compact(self.log, roll=roll, now_ms=self.now_ms)
        end = self.log.segments[-1].base_offset
        assert result.first_dirty_offset == end
        distinct = len(
            {
                key
                for offset, (key, _) in self.appended.items()
                if key and result.first_dirty_offset_before <= offset < end
            }
        )
        if entries < distinct:
            assert result.passes > 1  # the map filled up: several passes
        for offset, (key, value) in self.appended.items():
            if value is None and key is not None and offset < end:
                self.first_seen_ms.setdefault(offset, self.now_ms)
        self.compacted_end = end
        self.last_run_ms = self.now_ms
        assert compactor.statistics().runs == 1
        assert compactor.statistics().bytes_reclaimed == result.bytes_reclaimed

    # -- the model ----------------------------------------------------------------

    def expected(self) -> list[tuple[int, bytes | None, bytes | None]]:
        end = self.compacted_end
        latest: dict[bytes, int] = {}
        for offset, (key, _value) in self.appended.items():
            if key is not None and offset < end:
                latest[key] = max(latest.get(key, -1), offset)
        out = []
        for offset in sorted(self.appended):
            key, value = self.appended[offset]
            if offset < end and key is not None:
                assert self.last_run_ms is not None  # offset < compacted_end: a run covered it
                if latest[key] != offset:
                    continue
                if value is None and self.first_seen_ms[offset] + DELETE_RETENTION_MS <= self.last_run_ms:
                    continue
            out.append((offset, key, value))
        return out

    def stored(self) -> list[tuple[int, bytes | None, bytes | None]]:
        out = []
        offset = self.log.log_start_offset
        while offset < self.log.next_offset:
            result = self.log.read(offset, 1 << 20)
            if not result.slices:
                break
            for record in decode_batches(result.to_bytes()):
                if record.offset >= offset:
                    out.append((record.offset, record.key, record.value))
            assert result.next_offset is not None  # the read returned slices
            offset = result.next_offset
        return out

    @invariant()
    def log_matches_model(self) -> None:
        stored = self.stored()
        offsets = [entry[0] for entry in stored]
        assert offsets == sorted(set(offsets))  # increasing, no duplicates
        assert stored == self.expected()

    @invariant()
    def segments_are_valid(self) -> None:
        for segment in self.log.segments:
            end = segment.size
            scanner = BatchScanner(segment.open_file(), 0, end, verify=True, limits=CONFIG.limits)
            for batch in scanner:
                assert segment.base_offset <= batch.header.base_offset
                if batch.header.attributes & ATTRIBUTE_DELETE_HORIZON:
                    assert batch.header.base_timestamp > START_MS
            assert scanner.position == end
        for name in os.listdir(self.directory):
            assert not name.endswith((".cleaned", ".swap", ".deleted", ".merging")), name
        checkpoint = os.path.join(self.directory, "compaction.checkpoint")
        if os.path.exists(checkpoint):
            with open(checkpoint, "rb") as file:
                assert decode_compaction_checkpoint(file.read()) == self.compacted_end


CompactionModel.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCompactionModel = CompactionModel.TestCase
