"""Damaged partitions at start, against a real server (issue 8 items 6 and 7; G4 in
docs/fault-model.md): damage below the recovery point is never cut silently. The broker
starts, serves the partition up to the damage, refuses produce to it (READ_ONLY_LOG),
names the file, byte position and offset in an ERROR log line, `nodi status`, the
ServerStatus message and the nodi_partition_damaged metric, and keeps every file as it
was; the other partitions work. `nodi segments recover` exits 1 naming the file and
changes nothing; with --truncate-damaged it cuts the damage and reports the offsets lost,
and the next start is clean."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from nodi.storage.fileio import OS_FILE_SYSTEM
from nodi.storage.layout import partition_directory
from nodi.storage.segment import BatchScanner, parse_segment_name

from conftest import NODI, BrokerProcess
from test_ops_metrics import scrape, value

MESSAGES = 30
COMMAND_TIMEOUT_S = 120


def nodi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(NODI + list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


def segment_logs(directory: str) -> list[str]:
    return sorted(
        os.path.join(directory, name) for name in os.listdir(directory) if parse_segment_name(name) is not None
    )


def batches(path: str) -> list:
    file = OS_FILE_SYSTEM.open(path)
    try:
        return list(BatchScanner(file, 0, file.size(), verify=True))
    finally:
        file.close()


def contents(data_dir: str, topic: str) -> dict[str, bytes]:
    directory = partition_directory(data_dir, topic, 0)
    return {path: Path(path).read_bytes() for path in segment_logs(directory)}


def read_everything(client, topic: str) -> list:
    messages: list = []
    offset = 0
    while True:
        batch = client.fetch(topic, 0, offset)
        if not batch:
            return messages
        messages.extend(batch)
        offset = batch[-1].offset + 1


def produce_each(client, topic: str, count: int, prefix: str, width: int = 0) -> None:
    """One batch per message; values padded with dots to `width` (to fill segments)."""
    for number in range(count):
        client.produce(topic, f"{prefix}-{number}".ljust(width, ".").encode(), partition=0, acks="durable")


def error_lines(broker: BrokerProcess) -> list[str]:
    return [line for line in broker.output if " ERROR " in line or line.startswith("ERROR")]


def check_damage_line(broker, path: str, position: int, offset: int) -> None:
    """The one ERROR line naming the damage. Read once the broker stopped: the
    partitions open after the listening line (in the background, or on first use), and
    so does the line."""
    [line] = [line for line in error_lines(broker) if path in line]
    assert f"at byte {position} (offset {offset})" in line and "DAMAGED" in line


def check_damaged_broker(broker, data_dir: str, topic: str, path: str, position: int, offset: int) -> None:
    """The damaged partition as a client, `nodi status` and the metrics see it."""
    from nodi.broker import Client
    from nodi.broker.client.errors import ReadOnlyLog

    with Client(broker.address, timeout_ms=30_000) as client:
        served = read_everything(client, topic)
        assert [message.value.rstrip(b".") for message in served] == [f"{topic}-{n}".encode() for n in range(offset)]
        assert client.list_offsets(topic, 0, "latest") == offset
        # A queue group delivers up to the damage, then has nothing more.
        with client.queue(topic, "workers", ack_wait_ms=60_000) as queue:
            delivered = []
            while (message := queue.receive(timeout_ms=500)) is not None:
                delivered.append(message.offset)
                message.ack()
            assert delivered == list(range(offset))
        with pytest.raises(ReadOnlyLog) as refused:
            client.produce(topic, b"refused", partition=0)
        assert "damaged" in str(refused.value) and f"offset {offset}" in str(refused.value)
        # The other topic is untouched: produce and read back.
        produce_each(client, "healthy", 3, "after")
        assert [m.value for m in read_everything(client, "healthy")][-3:] == [b"after-0", b"after-1", b"after-2"]
        status = client.server_status()
        [damaged] = status.damaged_partitions
        assert (damaged.topic, damaged.partition, damaged.position, damaged.offset) == (topic, 0, position, offset)
        assert os.path.join(data_dir, damaged.path) == path
        assert status.read_only_partitions == {topic: [0]}
    shown = nodi("--server", broker.address, "status", "--json")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    [entry] = json.loads(shown.stdout)["server"]["damaged_partitions"]
    assert (entry["path"], entry["position"], entry["offset"]) == (os.path.abspath(path), position, offset)
    table = nodi("--server", broker.address, "status")
    assert os.path.abspath(path) in table.stdout and "--truncate-damaged" in table.stdout
    samples = scrape(broker.metrics_port)
    assert value(samples, "nodi_partition_damaged", topic=topic, partition="0") == 1
    assert value(samples, "nodi_partition_damaged", topic="healthy", partition="0") == 0


def start(data_dir: str) -> BrokerProcess:
    return BrokerProcess(data_dir, metrics=True).start()


def test_bit_flip_in_last_fsynced_batch_marks_the_partition_damaged_G4(tmp_path) -> None:
    """Item 6: a bit flip in the active segment's last batch after a clean shutdown."""
    from nodi.broker import Client

    data_dir = str(tmp_path / "data")
    broker = start(data_dir)
    try:
        with Client(broker.address, timeout_ms=30_000) as client:
            client.create_topic("flipped")
            client.create_topic("healthy")
            produce_each(client, "flipped", MESSAGES, "flipped")
            produce_each(client, "healthy", 5, "before")
            # A committed offset past the damage is kept (not clamped) while it lasts.
            client.commit_offsets("readers", {("flipped", 0): MESSAGES})
    finally:
        assert broker.stop() == 0
    active = segment_logs(partition_directory(data_dir, "flipped", 0))[-1]
    victim = batches(active)[-1]
    with open(active, "r+b") as file:  # a value byte: the CRC no longer matches
        file.seek(victim.position + victim.header.size - 2)
        byte = file.read(1)[0]
        file.seek(victim.position + victim.header.size - 2)
        file.write(bytes([byte ^ 0x10]))
    damaged_bytes = contents(data_dir, "flipped")
    offset = victim.header.base_offset
    assert offset == MESSAGES - 1

    broker = start(data_dir)
    try:
        check_damaged_broker(broker, data_dir, "flipped", active, victim.position, offset)
        with Client(broker.address, timeout_ms=30_000) as client:
            lags = client.describe_group("readers").lags
            assert [(lag.topic, lag.committed_offset) for lag in lags] == [("flipped", MESSAGES)]
    finally:
        assert broker.stop() == 0
    check_damage_line(broker, active, victim.position, offset)
    assert contents(data_dir, "flipped") == damaged_bytes, "a damaged partition was written to"

    refused = nodi("segments", "recover", data_dir)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert (
        f"flipped-0: DAMAGED below the recovery point {MESSAGES}: {active} at byte {victim.position}" in refused.stdout
    )
    assert contents(data_dir, "flipped") == damaged_bytes

    repaired = nodi("segments", "recover", data_dir, "--truncate-damaged")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"flipped-0: scanned 1 segment(s), {victim.position} bytes; lost offsets {offset}..{MESSAGES - 1}" in (
        repaired.stdout
    )
    assert os.path.getsize(active) == victim.position

    broker = start(data_dir)
    try:
        assert not error_lines(broker), broker.output
        with Client(broker.address, timeout_ms=30_000) as client:
            assert client.server_status().damaged_partitions == ()
            assert client.produce("flipped", b"again", partition=0) == (0, offset)
            assert len(read_everything(client, "flipped")) == MESSAGES
    finally:
        assert broker.stop() == 0


def test_truncated_sealed_segment_keeps_the_broker_up_G4(tmp_path) -> None:
    """Item 7: a sealed segment cut short must not keep the other partitions offline."""
    from nodi.broker import Client

    data_dir = str(tmp_path / "data")
    broker = start(data_dir)
    try:
        with Client(broker.address, timeout_ms=30_000) as client:
            client.create_topic("cut", segment_bytes=4096)
            client.create_topic("healthy")
            produce_each(client, "cut", MESSAGES, "cut", width=500)
            produce_each(client, "healthy", 5, "before")
    finally:
        assert broker.stop() == 0
    logs = segment_logs(partition_directory(data_dir, "cut", 0))
    assert len(logs) >= 3
    sealed = logs[1]
    victim = batches(sealed)[-2]
    os.truncate(sealed, victim.position + victim.header.size // 2)
    damaged_bytes = contents(data_dir, "cut")

    broker = start(data_dir)
    try:
        check_damaged_broker(broker, data_dir, "cut", sealed, victim.position, victim.header.base_offset)
    finally:
        assert broker.stop() == 0
    check_damage_line(broker, sealed, victim.position, victim.header.base_offset)
    assert contents(data_dir, "cut") == damaged_bytes

    refused = nodi("segments", "recover", data_dir)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "cut-0: DAMAGED below the recovery point" in refused.stdout and sealed in refused.stdout
    assert contents(data_dir, "cut") == damaged_bytes
    repaired = nodi("segments", "recover", data_dir, "--truncate-damaged")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"lost offsets {victim.header.base_offset}..{MESSAGES - 1}" in repaired.stdout
    assert segment_logs(partition_directory(data_dir, "cut", 0)) == logs[:2]
