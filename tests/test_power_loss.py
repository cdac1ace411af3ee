"""Power loss on the simulated disk (storage/simfs.py): many seeded rounds of random
appends, flushes, rolls, retention and clean restarts, cut by a power loss at a random
mutating file call (inside a roll, a deletion, a checkpoint write or recovery itself),
then a crash that drops, tears, reorders or garbles every unsynced write (F1-F4).

After each crash the reopened log must hold every offset acknowledged durable (G1, I8),
be a dense prefix of what was appended with whole valid batches only (G3, I1-I3), have
truncated what it dropped and reported it (first_lost_offset), keep deletions crash-safe
(I10), make its own recovery durable (I5), and accept the next append.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field

import pytest

from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.errors import NodiError
from nodi.storage.log import Log
from nodi.storage.records import Compression, NewRecord, build_batch, decode_batches
from nodi.storage.segment import BatchScanner, parse_segment_name
from nodi.storage.simfs import CRASH_MODES, SimulatedFileSystem

POLICIES = ("always", "interval", "never")
ROUNDS_PER_COMBINATION = 80
OPERATIONS_PER_ROUND = 60
DIRECTORY = "/data/topic-0"
READ_BYTES_MAX = 64 * 1024


def make_config(policy: str) -> LogConfig:
    return LogConfig(
        segment_bytes=4096,
        index_interval_bytes=512,
        fsync_policy=FsyncPolicy(policy),
        fsync_interval_ms=1,
        retention_ms=None,
        retention_bytes=6_000,
    )


def random_records(rng: random.Random, first_timestamp_ms: int) -> list[NewRecord]:
    records = []
    for number in range(rng.randint(1, 5)):
        key = None if rng.random() < 0.3 else rng.randbytes(rng.randint(0, 12))
        value = None if rng.random() < 0.05 else rng.randbytes(rng.randint(0, 300))
        headers = [("h", rng.randbytes(3))] if rng.random() < 0.2 else []
        records.append(NewRecord(key, value, headers, first_timestamp_ms + number))
    return records


def as_expected(offset: int, record: NewRecord) -> tuple:
    return (offset, record.timestamp_ms, record.key, record.value, tuple(record.headers))


def read_everything(log: Log, start: int, end: int) -> list[tuple]:
    """Decoded records of [start, end), read the way a consumer reads (CRC-checked)."""
    found: list[tuple] = []
    offset = start
    while offset < end:
        result = log.read(offset, READ_BYTES_MAX)
        assert result.slices, f"read at {offset} returned nothing below the end {end}"
        for record in decode_batches(result.to_bytes()):
            if record.offset >= offset:
                found.append((record.offset, record.timestamp_ms, record.key, record.value, record.headers))
        assert result.next_offset is not None  # the read returned slices
        offset = result.next_offset
    return found


def check_files(fs: SimulatedFileSystem, log: Log) -> None:
    """I1, I2, I3 on the files themselves: names are base offsets, every .log holds whole
    CRC-valid batches and nothing after them, offsets dense across segments."""
    expected = log.log_start_offset
    names = fs.list_directory(DIRECTORY)
    bases = sorted(base for base in map(parse_segment_name, names) if base is not None)
    assert bases == [segment.base_offset for segment in log.segments]
    assert not [name for name in names if name.endswith((".tmp", ".deleted"))]
    for segment in log.segments:
        assert segment.base_offset == expected, f"segment {segment.base_offset}, expected {expected} (I1, I3)"
        file = fs.open(segment.log_path)
        starts = {}
        max_timestamp = -1
        for batch in BatchScanner(file, 0, file.size(), verify=True):
            assert batch.header.base_offset == expected, "offsets not dense (I3)"
            starts[batch.position] = batch.header.base_offset
            max_timestamp = max(max_timestamp, batch.header.max_timestamp)
            expected = batch.header.last_offset + 1
        file.close()
        check_indexes(segment, starts, max_timestamp, sealed=segment is not log.segments[-1])
    assert expected == log.next_offset


def check_indexes(segment, starts: dict[int, int], max_timestamp: int, *, sealed: bool) -> None:
    """I7: index entries name batch starts and increase; a sealed segment's last time
    index entry carries its largest timestamp (what retention reads)."""
    entries = segment.index.entries()
    assert entries == sorted(set(entries))
    for relative_offset, position in entries:
        assert starts.get(position) == segment.base_offset + relative_offset, "not a batch start (I7)"
    times = segment.time_index.entries()
    assert [timestamp for timestamp, _ in times] == sorted({timestamp for timestamp, _ in times})
    assert [offset for _, offset in times] == sorted(offset for _, offset in times)
    if sealed and starts:
        assert times and times[-1][0] == max_timestamp, "sealed time index lacks the largest timestamp (I7)"


@dataclass
class Model:
    """What the test knows: every record ever handed to append at its offset (it may or
    may not have survived), and what the log acknowledged."""

    records: list[tuple] = field(default_factory=list)
    durable_end: int = 0  # offsets below were acknowledged durable
    start_bound: int = 0  # the log start may not pass this (retention only)

    def acknowledge(self, end: int) -> None:
        self.durable_end = max(self.durable_end, end)


class Round:
    def __init__(self, seed: str, policy: str, mode: str) -> None:
        self.rng = random.Random(seed)
        self.policy = policy
        self.mode = mode
        self.config = make_config(policy)
        self.fs = SimulatedFileSystem()
        self.model = Model()
        self.clock_ms = 1_700_000_000_000
        self.log: Log | None = None

    def append(self) -> None:
        assert self.log is not None  # open between steps: a failed reopen ends the round
        records = random_records(self.rng, self.clock_ms)
        self.clock_ms += 10
        first = self.log.next_offset
        del self.model.records[first:]
        self.model.records.extend(as_expected(first + number, record) for number, record in enumerate(records))
        compression = Compression.GZIP if self.rng.random() < 0.2 else Compression.NONE
        result = self.log.append(build_batch(records, compression=compression))
        assert result.first_offset == first
        if self.policy == "always":
            self.model.acknowledge(result.last_offset + 1)  # G1, I8

    def step(self) -> None:
        log, model, choice = self.log, self.model, self.rng.random()
        assert log is not None  # open between steps: a failed reopen ends the round
        if choice < 0.7:
            self.append()
        elif choice < 0.8:
            end = log.next_offset
            log.flush()
            model.acknowledge(end)
        elif choice < 0.87:
            log.roll()
            model.acknowledge(log.segments[-1].base_offset)
        elif choice < 0.95:
            model.start_bound = log.segments[-1].base_offset  # while the deletion runs
            log.apply_retention()
            model.start_bound = log.log_start_offset
        else:
            end = log.next_offset
            self.log = None
            log.close()  # a failed clean close does not raise: durable_offset tells
            model.acknowledge(log.durable_offset)
            self.log = Log.open(DIRECTORY, self.config, fs=self.fs)
            assert self.log.next_offset == end, "a clean restart lost offsets"
            assert self.log.recovery_report.clean_shutdown
        if self.log is not None:
            # The log's own promise: every offset below durable_offset is fsynced.
            model.acknowledge(self.log.durable_offset)
            model.start_bound = max(model.start_bound, self.log.log_start_offset)

    def run_until_power_loss(self) -> None:
        self.log = Log.open(DIRECTORY, self.config, fs=self.fs)
        self.fs.halt_after(self.rng.randint(1, 4 * OPERATIONS_PER_ROUND))
        try:
            for _ in range(OPERATIONS_PER_ROUND):
                self.step()
        except (OSError, NodiError):
            assert self.fs.halted, "a log operation failed without a fault"
        self.power_loss()

    def power_loss(self) -> None:
        self.fs.halt()
        if self.log is not None:
            self.log.close()  # stops its flusher; with the power off it writes nothing
            self.log = None
        self.fs.crash(self.rng, self.mode)

    def reopen(self) -> Log:
        """Log.open, itself cut by a power loss now and then (crash during recovery)."""
        while self.rng.random() < 0.3:
            self.fs.halt_after(self.rng.randint(1, 12))
            try:
                Log.open(DIRECTORY, self.config, fs=self.fs).close()
            except OSError:
                pass
            self.power_loss()
        return Log.open(DIRECTORY, self.config, fs=self.fs)

    def check_recovered(self, log: Log) -> None:
        model, report = self.model, log.recovery_report
        start, end = log.log_start_offset, log.next_offset
        assert end >= model.durable_end, f"acknowledged offsets {end}..{model.durable_end - 1} lost (G1)"
        assert end <= len(model.records), "offsets past anything appended"
        assert start <= model.start_bound, f"log start {start} passed {model.start_bound}: lost data (I10)"
        assert log.durable_offset == end, "recovery must sync what it kept"
        assert read_everything(log, start, end) == model.records[start:end], "a read differs (G2, I12)"
        check_files(self.fs, log)
        if report.first_lost_offset is not None:  # G3: exactly where the cut is
            assert not report.clean_shutdown
            assert report.first_lost_offset == end
            assert report.truncated_bytes > 0 or report.removed_segments
            assert report.last_lost_offset is None or report.last_lost_offset >= end
        del model.records[end:]
        model.durable_end = end  # recovery synced everything it kept (I5)
        model.start_bound = max(model.start_bound, start)


def run_round(seed: str, policy: str, mode: str) -> None:
    game = Round(seed, policy, mode)
    game.run_until_power_loss()
    log = game.reopen()
    game.check_recovered(log)
    # The log takes appends after recovery, and recovery's own truncation is durable: a
    # second power loss right away keeps all of it (I5, F4).
    game.log = log
    game.append()
    if policy != "always":
        log.flush()
        game.model.acknowledge(log.next_offset)
    game.power_loss()
    log = game.reopen()
    game.check_recovered(log)
    log.close()


@pytest.mark.parametrize("mode", CRASH_MODES)
@pytest.mark.parametrize("policy", POLICIES)
def test_power_loss_keeps_durable_prefix_G1_G3_I1_I2_I3_I5_I8_I10_F1_F2_F3_F4(policy: str, mode: str) -> None:
    for number in range(ROUNDS_PER_COMBINATION):
        seed = f"{policy}-{mode}-{number}"
        try:
            run_round(seed, policy, mode)
        except BaseException as error:
            error.add_note(f"power-loss round seed {seed!r}")
            raise


def test_unsynced_namespace_changes_are_undone_F4() -> None:
    """The simulated disk itself: a created, renamed or unlinked file reverts unless its
    directory was synced; synced content survives, unsynced content may not."""
    fs = SimulatedFileSystem()
    fs.make_directory("/d")
    kept = fs.open("/d/kept", create=True)
    kept.pwritev([b"durable"], 0)
    kept.sync()
    fs.sync_directory("/d")
    kept.pwritev([b"+lost"], 7)
    fs.open("/d/new", create=True).sync()
    fs.rename("/d/kept", "/d/renamed")
    fs.halt()
    with pytest.raises(OSError):
        kept.pread(1, 0)
    fs.crash(random.Random(0), "drop")
    assert fs.list_directory("/d") == ["kept"]
    assert fs.read_bytes("/d/kept").startswith(b"durable")
    assert len(fs.read_bytes("/d/kept")) <= len(b"durable+lost")
    with pytest.raises(OSError):
        kept.pread(1, 0)  # handles from before the crash are dead
    fs.unlink("/d/kept")
    fs.crash(random.Random(0), "drop")
    assert fs.list_directory("/d") == ["kept"]
    fs.unlink("/d/kept")
    fs.sync_directory("/d")
    fs.crash(random.Random(0), "drop")
    assert fs.list_directory("/d") == []


def test_failed_sync_drops_the_unsynced_writes_for_good_F7() -> None:
    """The simulated disk after a failed fsync: the bytes stay readable, a later fsync
    "succeeds", and a power loss still takes them (what a retry would have hidden)."""
    fs = SimulatedFileSystem()
    fs.make_directory("/d")
    file = fs.open("/d/f", create=True)
    fs.sync_directory("/d")
    file.pwritev([b"synced"], 0)
    file.sync()
    file.pwritev([b"-dropped"], 6)
    fs.fail_sync(1)
    with pytest.raises(OSError):
        file.sync()
    assert file.pread(100, 0) == b"synced-dropped"
    file.sync()  # the retry that must never be trusted
    fs.crash(random.Random(0), "reorder")
    assert fs.read_bytes("/d/f") == b"synced"


def test_quota_writes_what_fits_then_ENOSPC_F8() -> None:
    fs = SimulatedFileSystem(quota_bytes=10)
    fs.make_directory("/d")
    file = fs.open("/d/f", create=True)
    file.pwritev([b"1234"], 0)
    with pytest.raises(OSError) as raised:
        file.pwritev([b"abcdefgh"], 4)
    assert raised.value.errno == errno.ENOSPC
    assert fs.read_bytes("/d/f") == b"1234abcdef"
    file.pwritev([b"XY"], 0)  # overwriting takes no space
    file.truncate(4)
    file.pwritev([b"56"], 4)
    assert fs.read_bytes("/d/f") == b"XY3456"


@pytest.mark.parametrize("mode", CRASH_MODES)
def test_crash_touches_only_unsynced_bytes_F1_F2_F3(mode: str) -> None:
    """Whatever the mode, synced bytes survive intact; the rest is a torn, reordered or
    garbled version of the unsynced writes, never longer than what was written."""
    for seed in range(50):
        rng = random.Random(seed)
        fs = SimulatedFileSystem()
        fs.make_directory("/d")
        file = fs.open("/d/f", create=True)
        fs.sync_directory("/d")
        synced = rng.randbytes(rng.randint(0, 50))
        file.pwritev([synced], 0)
        file.sync()
        unsynced = [rng.randbytes(rng.randint(1, 40)) for _ in range(rng.randint(1, 4))]
        for chunk in unsynced:
            file.pwritev([chunk], file.size())
        fs.crash(rng, mode)
        after = fs.read_bytes("/d/f")
        assert after[: len(synced)] == synced
        assert len(after) <= len(synced) + sum(map(len, unsynced))
        if mode == "drop":
            assert after == (synced + b"".join(unsynced))[: len(after)]
