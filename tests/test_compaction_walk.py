"""Compaction's segment swap crashed at every I/O point (docs/fault-model.md, "The
crash-point walk"): one compaction run over a log of several segments is counted (its
writes, fsyncs, creates, renames, unlinks, directory fsyncs, truncates: N calls), then
run again from the same starting disk N + 1 times, the power cut just before call n (and
once after the last), each crash dropping, reordering or garbling what was not synced
(F1-F4, seeded). After each crash Log.open recovers and the log must show:

- no `.cleaned`, `.swap`, `.deleted`, `.tmp` file or merge marker left (I10, I11, I14);
- every segment whole, valid batches, its indexes naming batch starts (I1, I2, I7);
- every record read is the one appended at that offset, with the same key, value,
  headers and timestamp; offsets strictly increase (I3, I13);
- every record compaction must keep is there: each key's latest record (a tombstone
  may go once its horizon passed), every record of the active segment (I13, G1);
- per key, the value read last is the latest one appended (a deleted key reads as
  deleted, never as an older value) (I13, I15);
- the log still ends where the appends ended, and a second compaction succeeds and
  leaves exactly the latest record of each key (I13).

The starting log was compacted once before (its tombstones carry a delete horizon that
has passed by the walked run) and has had appends since: small segments that merge, a
group whose records are all superseded (it leaves the log), full segments rewritten
alone, a clean head. Two walks: one pass with a key map that holds every key, and
three passes with a map too small for them (a checkpoint between passes). Here each
point is crashed once, the data modes (drop, garble, reorder) taken in turn, unsynced
directory changes surviving in any combination ("subset"); `make crash-walk` crashes
every point in every pair of data and names modes, over several seeds, with a second
power loss during recovery (NODI_CRASH_WALK_SEEDS).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest

from nodi.storage.compaction import KEY_MAP_ENTRY_BYTES, CompactionConfig, Compactor, _groups
from nodi.storage.compaction_files import read_first_dirty_offset
from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.log import Log
from nodi.storage.records import NewRecord, build_batch, decode_batches
from nodi.storage.segment import BatchScanner, parse_segment_name
from nodi.storage.simfs import NAME_MODES, CrashPoint, SimulatedFileSystem, count_operations, walk_crash_points

DIRECTORY = "/data/compacted-0"
CONFIG = LogConfig(
    segment_bytes=4096,
    index_interval_bytes=300,
    fsync_policy=FsyncPolicy.NEVER,  # no flusher thread: every run makes the same calls
    retention_ms=None,
    dense_offsets=False,
)
FIRST_RUN_MS = 1_700_000_000_000
DELETE_RETENTION_MS = 1_000
WALKED_RUN_MS = FIRST_RUN_MS + 10 * DELETE_RETENTION_MS  # the first run's horizons passed
KEYS = 14
READ_BYTES_MAX = 64 * 1024
LEFTOVER_SUFFIXES = (".cleaned", ".swap", ".deleted", ".tmp", ".merging")
SEEDS = int(os.environ.get("NODI_CRASH_WALK_SEEDS", "1"))


# ---------------------------------------------------------------------------
# The starting disk and what it holds


@dataclass
class Start:
    fs: SimulatedFileSystem
    # offset -> (timestamp, key, value, headers): everything ever appended
    appended: dict[int, tuple]
    end_offset: int
    active_base: int


def _append(log: Log, rng: random.Random, appended: dict, clock: list[int], keys: list[bytes]) -> None:
    records = []
    for key in keys:
        value = None if rng.random() < 0.12 else b"v%d-" % clock[0] + rng.randbytes(rng.randint(20, 90))
        headers = (("trace", rng.randbytes(4)),) if rng.random() < 0.3 else ()
        records.append(NewRecord(key, value, headers, clock[0]))
        clock[0] += 1
    result = log.append(build_batch(records))
    for number, record in enumerate(records):
        appended[result.first_offset + number] = (record.timestamp_ms, record.key, record.value, tuple(record.headers))


def build_start() -> Start:
    """A log compacted once, then appended to: full segments, small ones, a group of
    segments whose every record is superseded later, and an active segment."""
    rng = random.Random("compaction-walk-start")
    fs = SimulatedFileSystem()
    appended: dict[int, tuple] = {}
    clock = [FIRST_RUN_MS - 100_000]
    hot = [b"key-%02d" % number for number in range(KEYS)]
    log = Log.open(DIRECTORY, CONFIG, fs=fs, clock_ms=lambda: clock[0])
    try:
        for _ in range(40):  # two full segments and a bit, many versions of each key
            _append(log, rng, appended, clock, rng.sample(hot, rng.randint(1, 3)))
        Compactor(CompactionConfig(delete_retention_ms=DELETE_RETENTION_MS)).compact(
            log, roll=True, now_ms=FIRST_RUN_MS
        )
        for _ in range(30):  # more versions: full segments again
            _append(log, rng, appended, clock, rng.sample(hot, rng.randint(1, 3)))
        log.roll()
        for name in (b"gone-a", b"gone-b"):  # small segments, all superseded below
            _append(log, rng, appended, clock, [name])
            log.roll()
        for number in range(3):  # small segments with keys written once: a merge
            _append(log, rng, appended, clock, [b"once-%d" % number, rng.choice(hot)])
            log.roll()
        for _ in range(25):
            _append(log, rng, appended, clock, [*rng.sample(hot, rng.randint(1, 2)), b"gone-a", b"gone-b"])
        log.roll()
        for _ in range(4):  # the active segment: never rewritten
            _append(log, rng, appended, clock, rng.sample(hot, 2))
        end_offset, active_base = log.next_offset, log.segments[-1].base_offset
    finally:
        log.close()
    fs.crash(random.Random(0), "drop")  # a clean close synced everything: a no-op
    return Start(fs, appended, end_offset, active_base)


_START: Start | None = None


def start() -> Start:
    global _START
    if _START is None:
        _START = build_start()
    return _START


def latest_per_key(appended: dict[int, tuple], below: int | None = None) -> dict[bytes, int]:
    latest: dict[bytes, int] = {}
    for offset in sorted(appended):
        if below is None or offset < below:
            latest[appended[offset][1]] = offset
    return latest


# ---------------------------------------------------------------------------
# Reading and checking


def read_records(log: Log) -> list[tuple]:
    """(offset, timestamp, key, value, headers) of every record, read as a consumer
    reads (each batch CRC-checked by decode_batches), from the log start to its end."""
    found: list[tuple] = []
    offset = log.log_start_offset
    while offset < log.next_offset:
        result = log.read(offset, READ_BYTES_MAX)
        if not result.slices:
            break
        for record in decode_batches(result.to_bytes()):
            if record.offset >= offset:
                found.append((record.offset, record.timestamp_ms, record.key, record.value, record.headers))
        assert result.next_offset is not None  # the read returned slices
        offset = result.next_offset
    return found


def check_files(fs: SimulatedFileSystem, log: Log) -> None:
    """I1, I2, I7, I10, I11, I14 on the files themselves."""
    names = fs.list_directory(DIRECTORY)
    assert not [name for name in names if name.endswith(LEFTOVER_SUFFIXES)], names
    bases = sorted(base for base in map(parse_segment_name, names) if base is not None)
    assert bases == [segment.base_offset for segment in log.segments]
    previous_end = 0
    for segment in log.segments:
        file = fs.open(segment.log_path)
        starts = {}
        for batch in BatchScanner(file, 0, file.size(), verify=True, limits=CONFIG.limits):
            assert batch.header.base_offset >= max(previous_end, segment.base_offset), "offsets go back (I1, I3)"
            starts[batch.position] = batch.header.base_offset
            previous_end = batch.header.last_offset + 1
        file.close()
        for relative_offset, position in segment.index.entries():
            assert starts.get(position) == segment.base_offset + relative_offset, "index entry not a batch start (I7)"


def check_contents(start: Start, records: list[tuple], *, compacted: bool) -> None:
    appended = start.appended
    offsets = [record[0] for record in records]
    assert offsets == sorted(set(offsets)), "offsets not strictly increasing (I3, I13)"
    for offset, *fields in records:
        assert offset in appended, f"offset {offset} was never appended"
        assert tuple(fields) == appended[offset], f"offset {offset} differs from what was appended there"
    present = set(offsets)
    active = {offset for offset in appended if offset >= start.active_base}
    latest = latest_per_key(appended, below=start.active_base)
    missing = [offset for offset in active if offset not in present]
    assert not missing, f"records of the active segment gone: {missing}"
    for key, offset in latest.items():
        if appended[offset][2] is not None:
            assert offset in present, f"the latest record of {key!r} (offset {offset}) is gone (I13)"
    # Read in order, the last value seen per key is the latest appended one.
    last_seen: dict[bytes, bytes | None] = {}
    for _, _, key, value, _ in records:
        last_seen[key] = value
    for key, offset in latest_per_key(appended).items():
        assert last_seen.get(key) == appended[offset][2], f"{key!r} reads as an older value"
    if compacted:  # exactly the latest per key below the active segment (tombstones may go)
        sealed = [record for record in records if record[0] < start.active_base]
        kept = {record[0] for record in sealed}
        assert kept <= set(latest.values()), f"superseded records stayed: {sorted(kept - set(latest.values()))}"


def check_after_crash(start: Start, fs: SimulatedFileSystem, point: CrashPoint, *, recovery_crash: bool) -> None:
    if recovery_crash:  # a second power loss, during recovery itself
        rng = random.Random(point.seed + "-recovery")
        fs.halt_after(rng.randint(1, 12))
        try:
            Log.open(DIRECTORY, CONFIG, fs=fs).close()
        except OSError:
            pass
        fs.halt()
        fs.crash(rng, point.mode, point.names)
    log = Log.open(DIRECTORY, CONFIG, fs=fs)
    try:
        assert log.next_offset == start.end_offset, "the log end moved (G1)"
        assert log.log_start_offset == 0, "the log start moved (I14: the first segment never leaves)"
        check_files(fs, log)
        check_contents(start, read_records(log), compacted=False)
        # A second run after recovery succeeds and finishes the job.
        Compactor(CompactionConfig(delete_retention_ms=DELETE_RETENTION_MS)).compact(log, now_ms=WALKED_RUN_MS)
        check_files(fs, log)
        records = read_records(log)
        check_contents(start, records, compacted=True)
        clean_head = read_first_dirty_offset(log)
        keys = [record[2] for record in records if record[0] < clean_head]
        assert len(keys) == len(set(keys)), "a key twice below the first dirty offset (I13)"
    finally:
        log.close()


# ---------------------------------------------------------------------------
# The walks


def compaction_run(config: CompactionConfig):
    def run(fs: SimulatedFileSystem, arm) -> None:
        log = Log.open(DIRECTORY, CONFIG, fs=fs)
        try:
            arm()
            Compactor(config).compact(log, now_ms=WALKED_RUN_MS)
        finally:
            log.close()

    return run


WALKS = {
    "one-pass": CompactionConfig(delete_retention_ms=DELETE_RETENTION_MS),
    "three-passes": CompactionConfig(
        key_map_bytes_max=KEY_MAP_ENTRY_BYTES * 16, delete_retention_ms=DELETE_RETENTION_MS
    ),
}


def test_starting_log_has_every_kind_of_group():
    """The walks cover what they claim: merged groups, a group compacted to nothing,
    segments rewritten alone, tombstones whose horizon passed, several passes."""
    begin = start()
    fs = begin.fs.clone()
    log = Log.open(DIRECTORY, CONFIG, fs=fs)
    try:
        sealed = list(log.segments[:-1])
        groups = _groups(sealed, CONFIG.segment_bytes)
        assert len(sealed) >= 8 and any(len(group) > 1 for group in groups) and any(len(group) == 1 for group in groups)
        before = {segment.base_offset for segment in log.segments}
        result = Compactor(WALKS["one-pass"]).compact(log, now_ms=WALKED_RUN_MS)
        after = {segment.base_offset for segment in log.segments}
        assert result.tombstones_removed > 0 and result.records_removed > 0
        gone = before - after
        merged_away = {segment.base_offset for group in groups for segment in group[1:]}
        assert gone - merged_away, "no group left the log whole"
    finally:
        log.close()
    fs = begin.fs.clone()
    with Log.open(DIRECTORY, CONFIG, fs=fs) as log:
        assert Compactor(WALKS["three-passes"]).compact(log, now_ms=WALKED_RUN_MS).passes == 3


@pytest.mark.parametrize("walk", sorted(WALKS))
def test_compaction_crashed_at_every_io_point_I10_I13_I14_F1_F2_F3_F4(walk: str) -> None:
    begin = start()
    totals = []
    for number in range(SEEDS):
        summary = walk_crash_points(
            begin.fs,
            compaction_run(WALKS[walk]),
            lambda fs, point: check_after_crash(begin, fs, point, recovery_crash=SEEDS > 1),
            seed=f"{walk}-{number}",
            # Here: unsynced directory changes survive in any combination (the
            # strongest F4), the data modes in turn; every pair under make crash-walk.
            every_mode=SEEDS > 1,
            names=NAME_MODES if SEEDS > 1 else ("subset",),
        )
        totals.append(summary.trials)
    counts = summary.counts()
    print(f"{walk}: {len(summary.operations)} I/O points {counts}, {sum(totals)} crashes checked")
    # The walk went through every step of the swap, not just the copying.
    for kind in ("write", "truncate", "sync", "create", "rename", "unlink", "sync_directory"):
        assert counts.get(kind), f"the run made no {kind} call: the walk does not cover it"


def test_recovery_of_an_interrupted_swap_crashed_at_every_io_point_I14_F4() -> None:
    """Recovery finishing a swap is itself cut at each of its I/O points, unsynced
    directory changes surviving in any combination (F4): Log.open is walked like the
    run was, from the disks the run's crash points leave with a merge committed (a
    `.log.swap` beside the merge marker): the first and last such point of each merge
    here, every crash point that leaves recovery work (a `.swap` or a marker) under
    `make crash-walk`."""
    begin = start()
    run = compaction_run(WALKS["one-pass"])
    operations = count_operations(begin.fs, run)
    disks: dict[int, SimulatedFileSystem] = {}
    merges: list[int] = []
    for number in range(1, len(operations) + 1):
        fs = begin.fs.clone()
        try:
            run(fs, lambda fs=fs, number=number: fs.halt_after(number))
        except Exception:
            assert fs.halted
        fs.halt()
        fs.crash(random.Random(number), "drop", "revert")
        names = fs.list_directory(DIRECTORY)
        if any(name.endswith((".swap", ".merging")) for name in names):
            disks[number] = fs
        if any(name.endswith(".log.swap") for name in names) and any(name.endswith(".merging") for name in names):
            merges.append(number)
    assert merges, "no crash point leaves a committed merge"
    if SEEDS == 1:
        runs = [number for number in merges if number - 1 not in merges or number + 1 not in merges]
        disks = {number: disks[number] for number in runs}
    walked = 0
    for number, fs in disks.items():

        def reopen(fs: SimulatedFileSystem, arm) -> None:
            arm()
            Log.open(DIRECTORY, CONFIG, fs=fs).close()

        summary = walk_crash_points(
            fs,
            reopen,
            lambda fs, point: check_after_crash(begin, fs, point, recovery_crash=False),
            modes=("drop",),
            names=("subset",),
            seed=f"recovery-{number}",
        )
        walked += summary.trials
    print(f"recovery walked from {len(disks)} disks: {walked} crashes checked")
    assert walked > 4 * 20


def test_simulated_disk_clone_and_names_modes_F4() -> None:
    """The simulated disk itself: a clone is independent of its original; unsynced
    directory changes all revert, survive as a prefix, or in any combination."""
    fs = SimulatedFileSystem()
    fs.make_directory("/d")
    file = fs.open("/d/a", create=True)
    file.pwritev([b"synced"], 0)
    file.sync()
    fs.sync_directory("/d")
    file.pwritev([b"+pending"], 6)
    copy = fs.clone()
    fs.unlink("/d/a")
    assert copy.list_directory("/d") == ["a"] and copy.read_bytes("/d/a") == b"synced+pending"
    copy.crash(random.Random(0), "drop")
    assert copy.read_bytes("/d/a").startswith(b"synced")
    seen: dict[str, set[tuple[str, ...]]] = {"revert": set(), "prefix": set(), "subset": set()}
    for seed in range(64):
        for names in seen:
            disk = SimulatedFileSystem()
            disk.make_directory("/d")
            for name in ("x", "y", "z"):  # three creates, in order, never synced
                disk.open(f"/d/{name}", create=True)
            disk.crash(random.Random(seed), "drop", names)
            seen[names].add(tuple(disk.list_directory("/d")))
    assert seen["revert"] == {()}
    assert seen["prefix"] == {(), ("x",), ("x", "y"), ("x", "y", "z")}
    assert ("z",) in seen["subset"] and ("x", "z") in seen["subset"]
