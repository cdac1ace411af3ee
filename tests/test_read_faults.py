"""Read faults on the simulated disk (storage/simfs.py fail_read): a pread that fails
with EIO, returns fewer bytes than asked, or returns them with a few bytes changed
(a latent sector error, a bad cable or controller), at every read a consumer's pass over
the log makes, walked one read at a time (docs/fault-model.md, F9).

What the log must do (G2, G4, I12): serve only bytes that check out, or raise one of its
own typed errors (a NodiError): never another exception, never a record that differs
from what was appended, never a record skipped. The disk itself is not changed by a read
fault, so after a restart every record reads back right.
"""

from __future__ import annotations

import random

import pytest

from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.errors import NodiError
from nodi.storage.log import Log
from nodi.storage.records import NewRecord, build_batch, decode_records, iter_batches
from nodi.storage.simfs import READ_FAULT_KINDS, SimulatedFileSystem

DIRECTORY = "/data/topic-0"
CONFIG = LogConfig(segment_bytes=4096, index_interval_bytes=400, fsync_policy=FsyncPolicy.NEVER, retention_ms=None)
FETCH_BYTES_MAX = 1500  # several fetches per segment, as a consumer's
BATCHES = 60


def build_disk() -> tuple[SimulatedFileSystem, list[tuple]]:
    """A log of several sealed segments and an active one, closed cleanly."""
    rng = random.Random("read-faults")
    fs = SimulatedFileSystem()
    expected: list[tuple] = []
    with Log.open(DIRECTORY, CONFIG, fs=fs) as log:
        for number in range(BATCHES):
            records = [
                NewRecord(
                    rng.randbytes(4),
                    rng.randbytes(rng.randint(10, 120)),
                    [("h", rng.randbytes(2))] if rng.random() < 0.3 else [],
                    1_700_000_000_000 + number,
                )
                for _ in range(rng.randint(1, 3))
            ]
            first = log.append(build_batch(records)).first_offset
            expected.extend(
                (first + index, record.timestamp_ms, record.key, record.value, tuple(record.headers))
                for index, record in enumerate(records)
            )
        assert len(log.segments) >= 4
    return fs, expected


_DISK: tuple[SimulatedFileSystem, list[tuple]] | None = None


def disk() -> tuple[SimulatedFileSystem, list[tuple]]:
    global _DISK
    if _DISK is None:
        _DISK = build_disk()
    return _DISK


def consume(log: Log, delivered: list[tuple]) -> None:
    """Read the whole log the way the client does (broker/client_async.decode_fetched):
    fetch from a position, decode the batches (CRC-checked), move past the last batch."""
    position = log.log_start_offset
    while position < log.next_offset:
        data = log.read(position, FETCH_BYTES_MAX).to_bytes()
        assert data, f"an empty read at {position} below the end {log.next_offset}"
        moved = position
        for header, batch in iter_batches(data, CONFIG.limits):
            for record in decode_records(batch, header, CONFIG.limits):
                if record.offset >= position:
                    delivered.append(tuple(record))
            moved = max(moved, header.last_offset + 1)
        position = moved


def test_reads_without_a_fault_return_everything() -> None:
    fs, expected = disk()
    delivered: list[tuple] = []
    with Log.open(DIRECTORY, CONFIG, fs=fs.clone()) as log:
        consume(log, delivered)
    assert delivered == expected


@pytest.mark.parametrize("verified", [False, True], ids=["first-read", "verified"])
@pytest.mark.parametrize("kind", READ_FAULT_KINDS)
def test_a_read_fault_at_every_read_is_a_typed_error_or_harmless_G2_G4_I12(kind: str, verified: bool) -> None:
    """`first-read`: the sealed segments are read for the first time in this process
    (each batch CRC-checked before it is served); `verified`: a second pass, over bytes
    this process already checked (only the consumer's own CRC check stands between a
    garbled read and the application)."""
    fs, expected = disk()
    start = fs.clone()
    if verified:
        with Log.open(DIRECTORY, CONFIG, fs=start) as log:
            consume(log, [])  # leaves nothing on disk that a cold open would not see
    probe = start.clone()
    with Log.open(DIRECTORY, CONFIG, fs=probe) as log:
        if verified:
            consume(log, [])
        before = probe.read_calls
        consume(log, [])
        reads = probe.read_calls - before
    assert reads > 20
    outcomes = {"harmless": 0, "typed error": 0}
    for number in range(1, reads + 1):
        trial = start.clone()
        delivered: list[tuple] = []
        with Log.open(DIRECTORY, CONFIG, fs=trial) as log:
            if verified:
                consume(log, [])
            trial.fail_read(number, kind=kind, seed=number)
            try:
                consume(log, delivered)
                outcomes["harmless"] += 1
                assert delivered == expected, f"read {number}: a {kind} fault changed what was served"
            except NodiError:
                outcomes["typed error"] += 1
                assert delivered == expected[: len(delivered)], f"read {number}: wrong data before the error"
            assert not trial.read_fault_pending, f"read {number} never happened: the walk is off"
        # The fault was in the read, not on the disk: a restart reads everything right.
        again: list[tuple] = []
        with Log.open(DIRECTORY, CONFIG, fs=trial) as log:
            consume(log, again)
        assert again == expected, f"read {number}: the {kind} fault left damage behind"
    print(f"{kind} {'verified' if verified else 'first-read'}: {reads} reads walked, {outcomes}")
    # Harmless: a fault in an index read (the log is scanned instead, I6) or in bytes the
    # read did not need. Every kind hits the served bytes somewhere.
    assert outcomes["typed error"] > 0


def test_fail_read_hits_one_read_and_leaves_the_file_alone():
    """The simulated disk itself: each kind touches the nth matching read only."""
    fs = SimulatedFileSystem()
    fs.make_directory("/d")
    file = fs.open("/d/f", create=True)
    file.pwritev([bytes(range(100))], 0)
    fs.fail_read(2, kind="eio", path_endswith="/f")
    assert file.pread(10, 0) == bytes(range(10))
    with pytest.raises(OSError):
        file.pread(10, 0)
    fs.fail_read(1, kind="short", seed=3)
    assert bytes(range(100)).startswith(file.pread(100, 0))
    assert len(fs.read_bytes("/d/f")) == 100
    fs.fail_read(1, kind="garble", seed=3)
    garbled = file.pread(100, 0)
    assert len(garbled) == 100 and garbled != bytes(range(100))
    assert file.pread(100, 0) == bytes(range(100)) == fs.read_bytes("/d/f")
    assert not fs.read_fault_pending
