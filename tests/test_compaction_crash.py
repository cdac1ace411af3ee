"""Real crash tests of compaction: a child process appends keyed batches (fsync
`always`) while a thread compacts the same log over and over with a tiny key map (many
passes, many swaps), and is killed with SIGKILL at a random moment (F5), round after
round in the same data directory. After each kill the parent opens the log (recovery
finishes or undoes the interrupted swap) and checks:

- I14  no `.cleaned`, `.swap` or `.deleted` file survives the open; every segment is
       whole, valid RecordBatch v2 (the offline verifier, as `nodi segments verify`, finds
       no error; the real command runs on the last round);
- I13  every stored record is the one appended at that offset (offsets kept), offsets
       increase, and every key's latest record is there unless it is a tombstone (which
       compaction may have removed: delete_retention_ms is 0 here);
- G1   nothing acknowledged is lost: the log ends where the appends ended.

At the end the parent compacts twice itself and the log must equal the model exactly:
the latest record per key, tombstones gone, offsets and order kept.

The child is this file run as a script (`python tests/test_compaction_crash.py child
DIR SEED`), so parent and child share one definition of what each batch holds.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

from nodi.storage.admin import ERROR, verify_data_dir
from nodi.storage.compaction import KEY_MAP_ENTRY_BYTES, CompactionConfig, Compactor
from nodi.storage.fileio import OS_FILE_SYSTEM, OsFileSystem
from nodi.storage.layout import partition_directory
from nodi.storage.log import Log
from nodi.storage.metadata import TopicConfig
from nodi.storage.records import NewRecord, build_batch, decode_batches
from nodi.storage.store import Store, log_config_for

TOPIC = "crash"
ROUNDS = 20
RECORDS_PER_BATCH = 4
KEYS = 40
PREFILL_BATCHES = 100
CHILD_START_TIMEOUT_S = 60
KEY_MAP_ENTRIES = 24
TOPIC_CONFIG = TopicConfig(cleanup_policy="compact", segment_bytes=4096, retention_ms=None)
COMPACTION = CompactionConfig(key_map_bytes_max=KEY_MAP_ENTRY_BYTES * KEY_MAP_ENTRIES, delete_retention_ms=0)


def log_config():
    return log_config_for(TOPIC_CONFIG)


def expected_records(batch_number: int) -> list[tuple[bytes, bytes | None]]:
    """What batch `batch_number` holds (child and parent)."""
    generator = random.Random(batch_number)
    records = []
    for index in range(RECORDS_PER_BATCH):
        # Hot keys, overwritten all the time, and now and then a key written once: its
        # record stays the latest for ever, so every segment holds some that must stay.
        if index == 0 and generator.random() < 0.25:
            key = b"once-%d" % batch_number
        else:
            key = b"key-%02d" % generator.randrange(KEYS)
        value = (
            None
            if generator.random() < 0.1
            else b"value-%d-%d-" % (batch_number, index) + bytes(generator.randrange(40))
        )
        records.append((key, value))
    return records


def encode(batch_number: int) -> bytes:
    return build_batch(
        [NewRecord(key, value, (), 1_700_000_000_000 + batch_number) for key, value in expected_records(batch_number)]
    )


def append_batches(log: Log, count: int) -> None:
    for _ in range(count):
        number, remainder = divmod(log.next_offset, RECORDS_PER_BATCH)
        assert remainder == 0
        log.append(encode(number))


# ---------------------------------------------------------------------------
# The child


class KillingFileSystem(OsFileSystem):
    """Kills this process (SIGKILL) at the `kill_at`-th rename, unlink or directory fsync
    that compaction's swap makes: kills land on every step of the swap, not only in the
    long stretches of copying."""

    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.steps = 0

    def _step(self, path: str) -> None:
        if any(part in path for part in (".cleaned", ".swap", ".deleted", ".merging")) or path.endswith(".checkpoint"):
            self.steps += 1
            if self.steps == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def rename(self, source: str, destination: str) -> None:
        self._step(source + " " + destination)
        super().rename(source, destination)
        self._step(source + " " + destination)

    def unlink(self, path: str) -> None:
        self._step(path)
        super().unlink(path)

    def sync_directory(self, path: str) -> None:
        if self.steps:
            self._step(".swap")  # a directory fsync inside a swap
        super().sync_directory(path)


def child(directory: str, seed: int) -> None:
    generator = random.Random(seed)
    # Half the rounds die at a step of a swap, the others when the parent's timer fires.
    fs = KillingFileSystem(generator.randrange(1, 60)) if generator.random() < 0.5 else OS_FILE_SYSTEM
    log = Log.open(directory, log_config(), fs=fs)
    compactor = Compactor(COMPACTION)

    def compact_forever() -> None:
        while True:
            compactor.compact(log, roll=generator.random() < 0.3)

    threading.Thread(target=compact_forever, daemon=True).start()
    print("ready", flush=True)
    while True:
        append_batches(log, 1)
        time.sleep(generator.random() / 1000)


# ---------------------------------------------------------------------------
# The parent


def model(end_offset: int) -> dict[int, tuple[bytes, bytes | None]]:
    appended = {}
    for number in range(end_offset // RECORDS_PER_BATCH):
        for index, record in enumerate(expected_records(number)):
            appended[number * RECORDS_PER_BATCH + index] = record
    return appended


def stored(log: Log) -> list[tuple[int, bytes | None, bytes | None]]:
    out: list[tuple[int, bytes | None, bytes | None]] = []
    offset = log.log_start_offset
    while offset < log.next_offset:
        result = log.read(offset, 1 << 20)
        if not result.slices:
            break
        assert result.next_offset is not None  # the read returned slices
        out.extend(
            (record.offset, record.key, record.value)
            for record in decode_batches(result.to_bytes())
            if record.offset >= offset
        )
        offset = result.next_offset
    return out


def check_recovered(directory: str) -> tuple[int, list[str]]:
    leftovers = [name for name in os.listdir(directory) if name.endswith((".cleaned", ".swap", ".deleted", ".merging"))]
    log = Log.open(directory, log_config())
    try:
        names = os.listdir(directory)
        assert not [name for name in names if name.endswith((".cleaned", ".swap", ".deleted", ".merging", ".tmp"))], (
            names
        )
        bases = [segment.base_offset for segment in log.segments]
        assert bases == sorted(set(bases))
        end = log.next_offset
        assert end % RECORDS_PER_BATCH == 0
        appended = model(end)
        records = stored(log)
        offsets = [offset for offset, _, _ in records]
        assert offsets == sorted(set(offsets))
        for offset, key, value in records:
            assert appended[offset] == (key, value), f"offset {offset} holds something never appended there"
        present = set(offsets)
        latest: dict[bytes, int] = {}
        for offset, (key, _) in appended.items():
            latest[key] = offset
        for key, offset in latest.items():
            if appended[offset][1] is not None:
                assert offset in present, f"the latest record of {key!r} (offset {offset}) is gone"
    finally:
        log.close()
    return end, leftovers


def run_child(directory: str, seed: int, delay_s: float) -> None:
    process = subprocess.Popen(
        [sys.executable, __file__, "child", directory, str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None  # PIPE
    assert process.stderr is not None  # PIPE
    try:
        deadline = time.monotonic() + CHILD_START_TIMEOUT_S
        line = process.stdout.readline()
        assert line.strip() == "ready", process.stderr.read() if process.poll() is not None else line
        assert time.monotonic() < deadline
        time.sleep(delay_s)
        if process.poll() is not None:  # it killed itself at a step of a swap
            assert process.returncode == -signal.SIGKILL, process.stderr.read()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()


def test_sigkill_during_compaction_leaves_a_valid_equivalent_log(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    with Store.open(data_dir) as store:
        store.create_topic(TOPIC, TOPIC_CONFIG)
    directory = partition_directory(data_dir, TOPIC, 0)
    with Log.open(directory, log_config()) as log:
        append_batches(log, PREFILL_BATCHES)
    generator = random.Random(int.from_bytes(os.urandom(4), "big"))
    previous_end = 0
    interrupted = 0
    started = time.monotonic()
    for _ in range(ROUNDS):
        run_child(directory, generator.randrange(1 << 30), generator.uniform(0.05, 0.4))
        end, leftovers = check_recovered(directory)
        interrupted += bool(leftovers)
        assert end >= previous_end  # G1: fsync always, nothing acknowledged lost
        previous_end = end
        problems = [problem for problem in verify_data_dir(data_dir) if problem.severity == ERROR]
        assert not problems, [problem.describe() for problem in problems]
    print(
        f"{ROUNDS} rounds in {time.monotonic() - started:.1f} s, {interrupted} killed inside a swap, "
        f"log end {previous_end}"
    )

    verify = subprocess.run(
        [sys.executable, "-m", "nodi.cli.main", "segments", "verify", data_dir],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # The parent finishes the job: two runs (the second drops the tombstones the first
    # stamped), then the log is exactly the model.
    with Log.open(directory, log_config()) as log:
        compactor = Compactor(CompactionConfig(delete_retention_ms=0))  # one pass each
        compactor.compact(log, roll=True)
        compactor.compact(log, roll=False, now_ms=int(time.time() * 1000) + 1)
        appended = model(log.next_offset)
        latest: dict[bytes, int] = {}
        for offset, (key, _) in appended.items():
            latest[key] = offset
        expected = [
            (offset, *appended[offset]) for offset in sorted(latest.values()) if appended[offset][1] is not None
        ]
        assert stored(log) == expected


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child(sys.argv[2], int(sys.argv[3]))
