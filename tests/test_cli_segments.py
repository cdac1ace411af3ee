"""`nodi segments list | dump | verify | recover` and `nodi --version`, run as the real
console script in a subprocess against data directories built with real Logs.

Invariants checked: I2 (whole batches: a torn tail and a flipped bit are detected by
position and offset), I3 (dense offsets), G3/G4 (recover reports exactly the offsets it
drops; sealed-segment damage is reported, not truncated).
"""

from __future__ import annotations

import base64
import json
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.errors import InvalidConfigError
from nodi.storage.layout import (
    iter_partition_directories,
    parse_partition_directory,
    partition_directory,
)
from nodi.storage.log import Log
from nodi.storage.metadata import MetadataStore, TopicConfig
from nodi.storage.records import NewRecord, build_batch, parse_header

SEGMENT_BYTES = 4096
BATCHES = 40
RECORDS_PER_BATCH = 5
OFFSETS = BATCHES * RECORDS_PER_BATCH
PARTITIONS = (("t", 0), ("t", 1), ("click-stream", 12))
BINARY_VALUE = b"\xff\x00\xfe"


def _nodi_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "nodi")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "nodi.cli.main"]


def nodi(*arguments: str, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_nodi_command(), *map(str, arguments)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=120,
    )


def _records(batch_number: int) -> list[NewRecord]:
    """Record 0 of each batch has a non-UTF-8 value (dumped as base64)."""
    return [
        NewRecord(
            f"key-{batch_number}-{number}".encode(),
            BINARY_VALUE if number == 0 else f"value {batch_number}-{number}".encode() * 4,
            [("source", b"test")],
            1_700_000_000_000 + batch_number,
        )
        for number in range(RECORDS_PER_BATCH)
    ]


def _fill(directory: str, *, close: bool = True) -> None:
    config = LogConfig(segment_bytes=SEGMENT_BYTES, fsync_policy=FsyncPolicy.NEVER, index_interval_bytes=512)
    log = Log.open(directory, config)
    for batch_number in range(BATCHES):
        log.append(build_batch(_records(batch_number)))
    assert log.next_offset == OFFSETS
    assert len(log.segments) >= 3
    if close:
        log.close()


@pytest.fixture(scope="module")
def pristine_data_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("pristine"))
    for topic, partition in PARTITIONS:
        _fill(partition_directory(data_dir, topic, partition))
    return data_dir


@pytest.fixture
def data_dir(pristine_data_dir, tmp_path) -> str:
    copy = str(tmp_path / "data")
    shutil.copytree(pristine_data_dir, copy)
    return copy


def _segment_logs(directory: str) -> list[str]:
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".log"))


def _batches(path: str) -> list[tuple[int, int, int, int]]:
    """(position, size, base offset, last offset) of each batch, from the codec's header."""
    data = open(path, "rb").read()
    found, position = [], 0
    while position < len(data):
        header = parse_header(data, position)
        found.append((position, header.size, header.base_offset, header.last_offset))
        position += header.size
    return found


# ---------------------------------------------------------------------------
# layout


def test_partition_directory_names_round_trip(tmp_path):
    path = partition_directory(str(tmp_path), "click-stream", 12)
    assert path == os.path.join(str(tmp_path), "logs", "click-stream-12")
    assert parse_partition_directory("click-stream-12") == ("click-stream", 12)
    assert parse_partition_directory("a.b_c-0") == ("a.b_c", 0)
    for name in ("t", "t-", "-1", "t-01", "t-x", "t-+1", "..-1", "t/x-1", "t-99999999999", "t-١"):
        assert parse_partition_directory(name) is None, name
    with pytest.raises(InvalidConfigError):
        partition_directory(str(tmp_path), "bad/topic", 0)
    with pytest.raises(InvalidConfigError):
        partition_directory(str(tmp_path), "t", -1)


def test_iter_partition_directories_orders_and_skips_other_names(pristine_data_dir):
    found = [(entry.topic, entry.partition) for entry in iter_partition_directories(pristine_data_dir)]
    assert found == sorted(PARTITIONS)
    assert list(iter_partition_directories(os.path.join(pristine_data_dir, "missing"))) == []


# ---------------------------------------------------------------------------
# the command line


def test_version():
    result = nodi("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("nodi ")
    assert result.stdout.split()[1][0].isdigit()


def test_every_command_and_option_has_help():
    result = nodi("segments", "--help")
    assert result.returncode == 0
    for command in ("list", "dump", "verify", "recover"):
        assert command in result.stdout
        help_text = nodi("segments", command, "--help")
        assert help_text.returncode == 0, help_text.stderr
        assert "Usage:" in help_text.stdout
    dump_help = nodi("segments", "dump", "--help").stdout
    for option in ("--records", "--json"):
        assert option in dump_help
    assert "--batches" in nodi("segments", "list", "--help").stdout


def test_list_shows_every_segment_with_sizes_and_next_offsets(pristine_data_dir):
    result = nodi("segments", "list", pristine_data_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["PARTITION", "SEGMENT", "BYTES", "BATCHES", "INDEX", "TIMEINDEX", "NEXT", "OFFSET"]
    rows = {
        (line.split()[0], line.split()[1]): line.split()
        for line in lines[1:]
        if line.endswith(tuple("0123456789")) and ".log" in line
    }
    for topic, partition in PARTITIONS:
        name = f"{topic}-{partition}"
        logs = _segment_logs(partition_directory(pristine_data_dir, topic, partition))
        for number, path in enumerate(logs):
            row = rows[(name, os.path.basename(path))]
            assert int(row[2]) == os.path.getsize(path)
            assert row[3] == "-"  # batches not counted by default
            expected_next = OFFSETS if number == len(logs) - 1 else int(os.path.basename(logs[number + 1])[:20])
            assert int(row[6]) == expected_next
        assert f"{name}: {len(logs)} segment(s)" in result.stdout
        assert f"offsets 0..{OFFSETS - 1}, recovery point {OFFSETS}, clean shutdown yes" in result.stdout


def test_list_json_counts_batches(pristine_data_dir):
    result = nodi("segments", "list", pristine_data_dir, "--batches", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    for topic, partition in PARTITIONS:
        mine = [row for row in rows if (row["topic"], row["partition"]) == (topic, partition)]
        assert sum(row["batches"] for row in mine) == BATCHES
        assert [row["path"] for row in mine] == _segment_logs(partition_directory(pristine_data_dir, topic, partition))
        assert mine[-1]["next_offset"] == OFFSETS
        for row, following in zip(mine, mine[1:]):
            assert row["next_offset"] == following["base_offset"]


def test_dump_prints_every_batch_header(pristine_data_dir):
    path = _segment_logs(partition_directory(pristine_data_dir, "t", 0))[1]
    result = nodi("segments", "dump", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    batches = _batches(path)
    assert len(lines) == len(batches)
    for line, (position, size, base_offset, last_offset) in zip(lines, batches):
        fields = dict(item.split("=", 1) for item in line.split()[1:])
        assert int(fields["position"]) == position
        assert int(fields["base_offset"]) == base_offset
        assert int(fields["last_offset"]) == last_offset
        assert int(fields["bytes"]) == size
        assert fields["records_count"] == str(RECORDS_PER_BATCH)
        assert fields["codec"] == "none"
        assert fields["producer_id"] == "-1"
        assert fields["crc_ok"] == "yes"


def test_dump_json_lines_with_records(pristine_data_dir):
    path = _segment_logs(partition_directory(pristine_data_dir, "t", 0))[0]
    result = nodi("segments", "dump", path, "--records", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["position"] for line in lines] == [batch[0] for batch in _batches(path)]
    offsets = []
    for batch_number, line in enumerate(lines):
        assert line["type"] == "batch"
        assert line["crc_ok"] is True
        assert line["records_count"] == RECORDS_PER_BATCH
        assert line["base_timestamp"] == 1_700_000_000_000 + batch_number
        expected = _records(batch_number)
        for record, new in zip(line["records"], expected):
            offsets.append(record["offset"])
            assert record["key"] == new.key.decode()
            assert record["timestamp"] == new.timestamp_ms
            assert record["headers"] == [["source", "test"]]
            if new.value == BINARY_VALUE:
                assert record["value"] == {"base64": base64.b64encode(BINARY_VALUE).decode()}
            else:
                assert record["value"] == new.value.decode()
    assert offsets == list(range(len(offsets)))  # I3: dense from the segment's base offset


def test_dump_text_records(pristine_data_dir):
    path = _segment_logs(partition_directory(pristine_data_dir, "t", 1))[0]
    result = nodi("segments", "dump", path, "--records")
    assert result.returncode == 0, result.stderr
    records = [line.strip() for line in result.stdout.splitlines() if line.startswith("  record ")]
    assert len(records) == len(_batches(path)) * RECORDS_PER_BATCH
    assert records[0] == (
        'record offset=0 timestamp=1700000000000 key="key-0-0" value={"base64":"/wD+"} headers=[["source","test"]]'
    )
    assert 'key="key-0-1" value="value 0-1value 0-1value 0-1value 0-1"' in records[1]


def test_verify_good_data_dir(pristine_data_dir):
    result = nodi("segments", "verify", pristine_data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verify ok" in result.stdout
    assert "ERROR" not in result.stdout


def test_verify_reports_a_bit_flip_in_a_sealed_segment(data_dir):
    """I2 / G4: a flipped bit inside a sealed segment's batch is named by file,
    position and offset."""
    path = _segment_logs(partition_directory(data_dir, "t", 0))[1]
    position, size, base_offset, _ = _batches(path)[3]
    with open(path, "r+b") as file:
        file.seek(position + size - 7)  # inside the records, covered by the CRC
        byte = file.read(1)
        file.seek(position + size - 7)
        file.write(bytes([byte[0] ^ 0x04]))
    result = nodi("segments", "verify", data_dir)
    assert result.returncode == 1, result.stdout
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert errors == [f"ERROR: {path} at position {position} (offset {base_offset}): " + errors[0].split(": ", 2)[2]]
    assert "crc mismatch" in errors[0]
    assert "verify failed" in result.stdout

    dumped = [json.loads(line) for line in nodi("segments", "dump", path, "--json").stdout.splitlines()]
    assert [line["crc_ok"] for line in dumped].count(False) == 1
    assert dumped[3]["crc_ok"] is False and dumped[3]["position"] == position
    assert nodi("segments", "dump", path).returncode == 1


def test_verify_reports_a_torn_tail_then_recover_truncates_it(data_dir):
    """I2 and G3: a tail cut mid-batch fails verify by position and offset; after a
    clean close that is damage below the recovery point (G4): recover names it and
    exits 1 changing nothing; recover --truncate-damaged truncates it, reports exactly
    the offsets lost, and verify then passes."""
    directory = partition_directory(data_dir, "t", 1)
    path = _segment_logs(directory)[-1]
    position, size, base_offset, _ = _batches(path)[-2]
    os.truncate(path, position + size // 2)  # cuts the second-to-last batch; the last is gone
    result = nodi("segments", "verify", data_dir)
    assert result.returncode == 1, result.stdout
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")]
    assert errors[0].startswith(f"ERROR: {path} at position {position} (offset {base_offset}): ")
    assert "runs past the end" in errors[0]
    # The index written at the clean close now points past the cut: reported after it.
    assert all(line.startswith(f"ERROR: {path[:-4]}.") for line in errors[1:])

    dumped = nodi("segments", "dump", path, "--json")
    assert dumped.returncode == 1
    problem = json.loads(dumped.stdout.splitlines()[-1])
    assert problem == {
        "type": "problem",
        "severity": "error",
        "path": path,
        "position": position,
        "offset": base_offset,
        "reason": problem["reason"],
    }

    # Cut after a clean close: fsynced data, damage (G4). Named, nothing changed, exit 1.
    before = {name: Path(directory, name).read_bytes() for name in os.listdir(directory)}
    refused = nodi("segments", "recover", data_dir)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    lines = {line.split(":", 1)[0]: line for line in refused.stdout.splitlines()}
    assert (
        f"DAMAGED below the recovery point {OFFSETS}: {path} at byte {position} (offset {base_offset})" in lines["t-1"]
    )
    assert f"offsets {base_offset}..{OFFSETS - 1} unreadable; nothing cut" in lines["t-1"]
    assert "--truncate-damaged" in refused.stdout
    assert {name: Path(directory, name).read_bytes() for name in os.listdir(directory)} == before

    recovered = nodi("segments", "recover", data_dir, "--truncate-damaged")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    lines = {line.split(":", 1)[0]: line for line in recovered.stdout.splitlines()}
    assert f"lost offsets {base_offset}..{OFFSETS - 1}" in lines["t-1"]
    assert "fsynced data below the recovery point" in lines["t-1"]
    assert "nothing lost" in lines["t-0"] and "nothing lost" in lines["click-stream-12"]
    assert os.path.getsize(path) == position

    after = nodi("segments", "verify", data_dir)
    assert after.returncode == 0, after.stdout
    log = Log.open(directory, LogConfig(fsync_policy=FsyncPolicy.NEVER))
    try:
        assert log.next_offset == base_offset
        assert not log.recovery_report.lost_anything
    finally:
        log.close()


def test_recover_after_a_crash_without_clean_close(tmp_path):
    """An unclean stop (no clean-shutdown marker, active indexes never written) whose
    tail was cut: verify warns about the missing indexes and fails on the tail;
    recover reports the lost offsets."""
    data_dir = str(tmp_path)
    directory = partition_directory(data_dir, "crashed", 0)
    _fill(directory, close=False)
    path = _segment_logs(directory)[-1]
    batches = _batches(path)
    position, _, base_offset, _ = batches[-1]
    os.truncate(path, position + 20)  # less than a batch header is left
    result = nodi("segments", "verify", data_dir)
    assert result.returncode == 1
    assert f"ERROR: {path} at position {position} (offset {base_offset})" in result.stdout
    assert "WARNING" in result.stdout and ".index: missing" in result.stdout
    recovered = nodi("segments", "recover", data_dir)
    assert recovered.returncode == 0
    assert "crashed-0: scanned 1 segment(s)" in recovered.stdout
    # No header of the cut batch survives: the end of the loss is unknown, and said so.
    assert f"lost offsets {base_offset}..? (truncated 20 bytes" in recovered.stdout
    assert nodi("segments", "verify", data_dir).returncode == 0


def test_verify_shows_a_progress_bar_on_a_tty(pristine_data_dir):
    """stderr a TTY: a progress bar is drawn there; stdout keeps only the report."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(
            [*_nodi_command(), "segments", "verify", pristine_data_dir],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
        )
        os.close(slave)
        slave = -1
        stdout, _ = process.communicate(timeout=120)
        drawn = b""
        while select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other end closed
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert process.returncode == 0
    assert b"verifying" in drawn and b"100%" in drawn
    assert "verifying" not in stdout
    # Not a TTY: no bar at all.
    assert "verifying" not in nodi("segments", "verify", pristine_data_dir).stderr


def _write_segment(directory: str, base_offset: int, first_offsets: list[int]) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{base_offset:020d}.log"), "wb") as file:
        for first in first_offsets:
            file.write(build_batch(_records(first), base_offset=first))


@pytest.mark.parametrize("cleanup_policy", ["delete", "compact"])
def test_offset_gaps_are_warnings_and_recover_follows_the_topic_settings(tmp_path, cleanup_policy):
    """I3: a gap (what compaction leaves) is only a warning for verify. recover opens
    each partition with its topic's settings from DATA_DIR/meta: a compacted topic keeps
    its gap; in a dense one the gap is damage below the recovery point (a sealed segment
    is fsynced before the next one exists, G4): recover names it and exits 1 changing
    nothing, and with --truncate-damaged truncates at it and reports the offsets dropped."""
    data_dir = str(tmp_path)
    with MetadataStore(data_dir) as metadata:
        metadata.create_topic("gappy", TopicConfig(cleanup_policy=cleanup_policy))
    directory = partition_directory(data_dir, "gappy", 0)
    # Offsets 0..9 in the first segment, then 20..29 in the second (10..19 compacted away);
    # no checkpoint and no clean-shutdown marker: the next open scans everything.
    _write_segment(directory, 0, [0, 5])
    _write_segment(directory, 20, [20, 25])
    result = nodi("segments", "verify", data_dir)
    assert result.returncode == 0, result.stdout
    second = os.path.join(directory, f"{20:020d}.log")
    assert f"WARNING: {second} at position 0 (offset 10): offsets 10..19 missing" in result.stdout

    first_bytes, second_bytes = (os.path.getsize(path) for path in _segment_logs(directory))
    if cleanup_policy == "delete":
        refused = nodi("segments", "recover", data_dir)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"gappy-0: DAMAGED below the recovery point 20: {second} at byte 0 (offset 10)" in refused.stdout
        assert [os.path.getsize(path) for path in _segment_logs(directory)] == [first_bytes, second_bytes]
    recovered = nodi("segments", "recover", data_dir, "--truncate-damaged")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    if cleanup_policy == "compact":
        assert "gappy-0: scanned 2 segment(s)" in recovered.stdout and "nothing lost" in recovered.stdout
        assert os.path.exists(second)
    else:
        # The second segment goes whole, its bytes counted once.
        expected = (
            f"gappy-0: scanned 2 segment(s), {first_bytes} bytes; lost offsets 10..29 (truncated {second_bytes} bytes"
        )
        assert expected in recovered.stdout
        assert not os.path.exists(second)
    assert nodi("segments", "verify", data_dir).returncode == 0


def test_verify_knows_the_producer_state_snapshot(tmp_path):
    """An idempotent producer's state is snapshotted beside the segments at roll and
    close (storage/producers.py): verify treats that file as the partition's own."""
    directory = partition_directory(str(tmp_path), "idempotent", 0)
    log = Log.open(directory, LogConfig(segment_bytes=SEGMENT_BYTES, fsync_policy=FsyncPolicy.NEVER))
    for sequence in range(0, 30, 5):
        log.append(build_batch(_records(sequence), producer_id=7, producer_epoch=0, base_sequence=sequence))
    log.close()
    assert "producer-state.snapshot" in os.listdir(directory)
    result = nodi("segments", "verify", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unknown file" not in result.stdout + result.stderr
