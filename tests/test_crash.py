"""Real crash tests of the partition log: a child process appends with fsync `always`
and is killed with SIGKILL at a random moment (F5), round after round in the same data
directory; after each kill the parent recovers the log and checks it.

What is checked after every kill:

- G1  every append the child saw return is still there, byte for byte (records decoded
      and compared with what the child built), in the place the child was told.
- G3  the log is a prefix of what was appended: every record in it is one a child built
      (keys describe their batch), no batch twice, and recovery lost nothing acknowledged.
- I1  `.log` names are base offsets, strictly increasing, each the first batch's offset.
- I2  a full offline scan of every `.log` (BatchScanner, CRC verified) ends exactly at
      the file size: no torn batch and no byte after the last batch.
- I3  offsets are dense from the log start offset to the log end offset.
- I5  the recovery point in the checkpoint never names an offset past the recovered
      log, and never moves backwards from one crash to the next.
- I8  checked inside the child: when append() returns, the log's durable offset covers
      it and a completed fdatasync covered the batch's bytes in its file.
- I10/I11  no `.deleted` or `.tmp` file survives an open.

The child is this file run as a script (`python tests/test_crash.py child ...`), so
the parent and the child share one definition of what each batch holds.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nodi.storage.checkpoint import read_checkpoint
from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.fileio import OS_FILE_SYSTEM, OsFileSystem
from nodi.storage.limits import KIB
from nodi.storage.log import Log
from nodi.storage.records import Compression, NewRecord, build_batch, decode_records, iter_batches
from nodi.storage.segment import BatchScanner, parse_segment_name

SEGMENT_BYTES = 64 * KIB
# The retention variant rolls and deletes every few appends, so that kills land inside
# a roll or a deletion often.
RETENTION_SEGMENT_BYTES = 8 * KIB
RETENTION_BYTES = 24 * KIB
RETENTION_PAUSE_S = 0.003
TIMESTAMP_BASE_MS = 1_600_000_000_000
CHILD_START_TIMEOUT_S = 60
READ_BYTES_MAX = 1024 * KIB


def crash_config(variant: str) -> LogConfig:
    return LogConfig(
        segment_bytes=RETENTION_SEGMENT_BYTES if variant == "retention" else SEGMENT_BYTES,
        index_interval_bytes=1024,
        fsync_policy=FsyncPolicy.ALWAYS,
        retention_ms=None,
        retention_bytes=RETENTION_BYTES if variant == "retention" else None,
    )


# ---------------------------------------------------------------------------
# What a batch holds, as a function of its id "round.thread.sequence" (child and parent)


def record_value(key: bytes, length: int) -> bytes:
    digest = hashlib.blake2b(key, digest_size=32).digest()
    return (digest * (length // len(digest) + 1))[:length]


def expected_batch(batch_id: str) -> tuple[list[NewRecord], Compression]:
    """The records (and codec) of batch `batch_id`: varied counts, sizes, headers."""
    generator = random.Random(batch_id)
    shape = generator.random()
    sizes: tuple[int, ...]
    if shape < 0.02:
        count, sizes = 60, (1200,)  # larger than a segment on its own
    elif shape < 0.15:
        count, sizes = generator.randint(5, 30), (0, 100, 1200)
    else:
        count, sizes = generator.choice((1, 1, 1, 2, 3, 5)), (0, 8, 40, 100, 300)
    compression = Compression.GZIP if generator.random() < 0.3 else Compression.NONE
    round_number, thread, sequence = (int(part) for part in batch_id.split("."))
    timestamp_ms = TIMESTAMP_BASE_MS + round_number * 10_000_000 + thread * 1_000_000 + sequence
    records = []
    for index in range(count):
        key = f"{batch_id}/{index}".encode()
        headers = (("batch", batch_id.encode()),) if generator.random() < 0.2 else ()
        value = record_value(key, generator.choice(sizes))
        records.append(NewRecord(key, value, headers, timestamp_ms + index))
    return records, compression


def batch_id_of(key: bytes) -> str:
    return key.decode().partition("/")[0]


# ---------------------------------------------------------------------------
# The child


class SyncRecordingFile:
    """An OsFile that remembers how many bytes a completed fdatasync covered (I8)."""

    def __init__(self, inner, fs: SyncRecordingFileSystem) -> None:
        self._inner = inner
        self._fs = fs
        self.path = inner.path

    def pread(self, size: int, position: int) -> bytes:
        return self._inner.pread(size, position)

    def pwritev(self, buffers, position: int) -> int:
        return self._inner.pwritev(buffers, position)

    def size(self) -> int:
        return self._inner.size()

    def truncate(self, size: int) -> None:
        self._inner.truncate(size)
        self._fs.note_truncated(self.path, size)

    def sync(self) -> None:
        covered = self._inner.size()  # bytes written before the fdatasync started
        self._inner.sync()
        self._fs.note_synced(self.path, covered)

    def fileno(self) -> int | None:
        return self._inner.fileno()

    def close(self) -> None:
        self._inner.close()


class SyncRecordingFileSystem(OsFileSystem):
    """The real file system, remembering what fdatasync covered. With `pause_s` each
    rename and unlink is followed by a pause: that widens the windows in which a segment
    is half deleted or a checkpoint half replaced, so more kills land inside them."""

    def __init__(self, pause_s: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._synced_bytes: dict[str, int] = {}
        self.pause_s = pause_s

    # The log sees only the FileSystem protocol; OsFileSystem.open promises an OsFile.
    def open(self, path: str, *, create: bool = False) -> SyncRecordingFile:  # type: ignore[override]
        return SyncRecordingFile(super().open(path, create=create), self)

    def rename(self, source: str, destination: str) -> None:
        super().rename(source, destination)
        time.sleep(self.pause_s)

    def unlink(self, path: str) -> None:
        super().unlink(path)
        time.sleep(self.pause_s)

    def note_synced(self, path: str, size: int) -> None:
        with self._lock:
            self._synced_bytes[path] = max(self._synced_bytes.get(path, 0), size)

    def note_truncated(self, path: str, size: int) -> None:
        with self._lock:
            self._synced_bytes[path] = min(self._synced_bytes.get(path, 0), size)

    def synced_bytes(self, path: str) -> int:
        with self._lock:
            return self._synced_bytes.get(path, 0)


_emit_lock = threading.Lock()


def emit(line: str) -> None:
    """One whole line per write, flushed: the parent may kill us right after."""
    with _emit_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def append_forever(log: Log, fs: SyncRecordingFileSystem, variant: str, round_number: int, thread: int) -> None:
    generator = random.Random(f"{round_number}:{thread}")
    try:
        for sequence in range(10**9):
            batch_id = f"{round_number}.{thread}.{sequence}"
            records, compression = expected_batch(batch_id)
            result = log.append(build_batch(records, compression=compression))
            # I8: acknowledged means an fdatasync covering the batch has returned.
            if log.durable_offset <= result.last_offset:
                emit(f"violation I8 durable_offset {log.durable_offset} after acking {result.last_offset}")
            if variant == "appends":
                (piece,) = log.read(result.last_offset, 1).slices
                synced = fs.synced_bytes(piece.file.path)
                if piece.last_offset != result.last_offset or piece.position + piece.length > synced:
                    emit(f"violation I8 batch {piece} acked with {synced} bytes synced")
            emit(f"ack {result.first_offset} {result.last_offset} {batch_id}")
            if variant == "retention":
                if generator.random() < 0.05:
                    log.roll()
                log.apply_retention()
    except BaseException as error:  # report, then die: the parent fails the round
        emit(f"error {type(error).__name__}: {error}")
        os._exit(3)


def child_main(directory: str, variant: str, round_number: int, threads: int) -> None:
    fs = SyncRecordingFileSystem(pause_s=RETENTION_PAUSE_S if variant == "retention" else 0.0)
    log = Log.open(directory, crash_config(variant), fs=fs)
    report = log.recovery_report
    emit(f"open {log.log_start_offset} {log.next_offset} {int(report.clean_shutdown)}")
    workers = [
        threading.Thread(target=append_forever, args=(log, fs, variant, round_number, thread), daemon=True)
        for thread in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


# ---------------------------------------------------------------------------
# The parent


@dataclass
class CrashHistory:
    """What the children acknowledged, and what earlier recoveries saw."""

    acknowledged: list[tuple[int, int, str]] = field(default_factory=list)
    acknowledged_end: int = 0
    log_start_offset: int = 0
    recovery_offset: int = 0
    rounds_with_acks: int = 0


@dataclass
class ChildOutput:
    opened: bool
    acknowledged: list[tuple[int, int, str]]


def run_child_until_killed(
    directory: Path, variant: str, round_number: int, threads: int, rng: random.Random
) -> ChildOutput:
    child = subprocess.Popen(
        [sys.executable, __file__, "child", str(directory), variant, str(round_number), str(threads)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    opened = threading.Event()

    def collect() -> None:
        assert child.stdout is not None  # PIPE
        for line in child.stdout:
            lines.append(line)
            if line.startswith("open "):
                opened.set()

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        if rng.random() < 0.15:
            # Kill anywhere from interpreter start-up through recovery to the first appends.
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            opened.wait(timeout=CHILD_START_TIMEOUT_S)
            time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    reader.join(timeout=30)
    assert child.stdout is not None  # PIPE
    assert child.stderr is not None  # PIPE
    stderr = child.stderr.read()
    child.stdout.close()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL, f"child exited {child.returncode} on its own: {lines[-3:]} {stderr}"
    acknowledged = []
    for line in lines:
        assert line.endswith("\n"), f"half a line {line!r}: a line is one write"
        words = line.split()
        if words[0] == "ack":
            acknowledged.append((int(words[1]), int(words[2]), words[3]))
        else:
            assert words[0] == "open", f"child reported {line!r}\n{stderr}"
    return ChildOutput(opened=opened.is_set(), acknowledged=acknowledged)


def check_segment_files(directory: Path, log: Log) -> None:
    """I1, I2, I3, I10, I11 from the files alone, with their own fresh scanner."""
    names = sorted(os.listdir(directory))
    leftovers = [name for name in names if name.endswith((".deleted", ".tmp", ".cleaned", ".swap"))]
    assert not leftovers, f"I10/I11: left after open: {leftovers}"
    bases = [base for base in map(parse_segment_name, names) if base is not None]
    assert bases == sorted(set(bases))
    assert bases == [segment.base_offset for segment in log.segments], "I1: segment files vs the log"
    expected_offset = bases[0]
    for base in bases:
        assert base == expected_offset, f"I1/I3: segment {base} should start at {expected_offset}"
        file = OS_FILE_SYSTEM.open(str(directory / f"{base:020d}.log"))
        try:
            size = file.size()
            scanner = BatchScanner(file, 0, size, verify=True)
            for batch in scanner:
                assert batch.header.base_offset == expected_offset, "I3: offsets dense across batches"
                expected_offset = batch.header.last_offset + 1
            assert scanner.position == size, f"I2: segment {base} has bytes after its last batch"
        finally:
            file.close()
    assert expected_offset == log.next_offset


def read_whole_log(log: Log) -> dict[int, tuple[str, int]]:
    """G3 and I3 over the log's own read path: every batch from the log start to the end,
    dense, each exactly the batch its records' keys name. Returns first offset ->
    (batch id, last offset)."""
    found: dict[int, tuple[str, int]] = {}
    seen_ids: set[str] = set()
    offset = log.log_start_offset
    while offset < log.next_offset:
        result = log.read(offset, READ_BYTES_MAX)
        assert result.slices, f"nothing readable at {offset} below the end {log.next_offset}"
        assert result.end_offset == log.next_offset, "fsync always: recovery made everything durable"
        for header, batch in iter_batches(result.to_bytes()):
            assert header.base_offset == offset, f"I3: batch at {header.base_offset}, expected {offset}"
            records = decode_records(batch, header)
            assert records[0].key is not None, "the child keys every record with its batch id"
            batch_id = batch_id_of(records[0].key)
            assert batch_id not in seen_ids, f"G3: batch {batch_id} appears twice"
            seen_ids.add(batch_id)
            expected, compression = expected_batch(batch_id)
            assert header.compression == compression
            assert [record.offset for record in records] == list(range(offset, offset + len(expected)))
            assert [(r.key, r.value, r.headers, r.timestamp_ms) for r in records] == [
                (e.key, e.value, tuple(e.headers), e.timestamp_ms) for e in expected
            ], f"G3: batch {batch_id} at {offset} does not hold what was appended"
            found[offset] = (batch_id, header.last_offset)
            offset = header.last_offset + 1
    assert offset == log.next_offset
    return found


def check_recovery(directory: Path, variant: str, output: ChildOutput, history: CrashHistory) -> None:
    checkpoint = read_checkpoint(OS_FILE_SYSTEM, str(directory))
    with Log.open(str(directory), crash_config(variant)) as log:
        report = log.recovery_report
        # RecoveryReport is sane: nothing acknowledged was dropped (G1, G3).
        if report.created:
            assert not history.acknowledged, "G1: a log with acknowledged appends came back empty"
        if output.acknowledged:
            # A clean start keeps the marker until the first change (storage/log.py),
            # so a child killed before it wrote anything leaves a clean log.
            assert not report.clean_shutdown, "the child's first append removed the clean-shutdown marker"
        if report.clean_shutdown:
            assert report.scanned_segments == 0 and not report.lost_anything, report.describe()
        elif not report.created:
            assert report.scanned_segments >= 1, "an unclean start scans at least the active segment"
        if report.lost_anything:
            assert report.first_lost_offset is not None  # lost_anything says so
            assert report.first_lost_offset >= history.acknowledged_end, f"G1: {report.describe()}"
            assert report.truncation_reason
        assert all(base >= history.acknowledged_end for base in report.removed_segments), report.describe()
        assert log.next_offset >= history.acknowledged_end, f"G1: acknowledged up to {history.acknowledged_end}"
        assert log.durable_offset == log.next_offset
        # I5: the recovery point vouches only for bytes that are there, and only grows.
        if checkpoint is not None:
            assert checkpoint.recovery_offset <= log.next_offset, f"I5: {checkpoint} beyond {log.next_offset}"
            assert checkpoint.recovery_offset >= history.recovery_offset, "I5: recovery point moved back"
            assert checkpoint.log_start_offset <= log.log_start_offset
            history.recovery_offset = checkpoint.recovery_offset
        if variant == "appends":
            assert log.log_start_offset == 0
        assert log.log_start_offset >= history.log_start_offset, "the log start offset moved back"
        history.log_start_offset = log.log_start_offset

        check_segment_files(directory, log)
        found = read_whole_log(log)
        for first, last, batch_id in history.acknowledged:
            if last < log.log_start_offset:
                continue  # deleted by retention, as a whole segment
            assert first >= log.log_start_offset, f"retention split batch {batch_id}"
            assert found.get(first) == (batch_id, last), f"G1: acknowledged batch {batch_id} at {first}..{last} lost"


def run_crash_rounds(tmp_path: Path, variant: str, rounds: int, threads: int, seed: int) -> CrashHistory:
    rng = random.Random(seed)
    directory = tmp_path / "log"
    history = CrashHistory()
    for round_number in range(rounds):
        output = run_child_until_killed(directory, variant, round_number, threads, rng)
        history.acknowledged.extend(output.acknowledged)
        for _, last, _ in output.acknowledged:
            history.acknowledged_end = max(history.acknowledged_end, last + 1)
        history.rounds_with_acks += bool(output.acknowledged)
        if not directory.exists():
            continue  # killed before Log.open made the directory
        if rng.random() < 0.5:
            # Recover a copy: the next child then recovers this crash itself.
            copy = tmp_path / f"check-{round_number}"
            shutil.copytree(directory, copy)
            check_recovery(copy, variant, output, history)
            shutil.rmtree(copy)
        else:
            # Recover in place and close cleanly: the next child takes the clean path.
            check_recovery(directory, variant, output, history)
            checkpoint = read_checkpoint(OS_FILE_SYSTEM, str(directory))
            assert checkpoint is not None, "the clean close in check_recovery writes one"
            history.recovery_offset = checkpoint.recovery_offset
    assert history.rounds_with_acks > 0
    return history


pytestmark = pytest.mark.slow  # a label only: these run in the default suite


@pytest.mark.parametrize("threads", [1, 4])
def test_acknowledged_appends_survive_sigkill(tmp_path: Path, threads: int) -> None:
    """G1, G3, I1, I2, I3, I5, I8 (in the child), I10, I11 across 12 SIGKILLs each."""
    run_crash_rounds(tmp_path, "appends", rounds=12, threads=threads, seed=0x6E6F6469 + threads)


def test_sigkill_during_rolls_and_retention(tmp_path: Path) -> None:
    """Killed while rolling and deleting segments (tiny retention_bytes): acknowledged
    offsets at or above the log start survive (G1); the log start never moves back;
    no half-deleted segment survives an open (I10); I1, I2, I3, I5 as above."""
    run_crash_rounds(tmp_path, "retention", rounds=12, threads=2, seed=0x72657465)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
