"""Log-append-time topics on a real `nodi serve` with its Kafka listener (issue 13): nodi's
client, confluent-kafka and kafka-python produce records with old timestamps to a topic
created with `--timestamp-type log-append` / `message.timestamp.type=LogAppendTime` and
read back the broker's append time, which the produce answers carry too; lookups by time
and TTLs use it; a CreateTime topic keeps the producer's timestamps; an idempotent retry
gets the original time; the setting survives a restart and shows in `nodi topic
describe` and DescribeConfigs; the stored batches pass `nodi segments verify`.

The server runs on the test-only clock moved ten years ahead, so an append time can be
told from any time this machine's clock could give, and is checked to lie within the
window of the call that made it."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import threading
import time

import pytest

from nodi.broker import Client
from nodi.broker.client import connection as client_connection
from nodi.broker.client.errors import InvalidConfig
from nodi.broker.protocol import messages as m
from nodi.storage.layout import partition_directory
from nodi.storage.records import ATTRIBUTE_TIMESTAMP_TYPE, NewRecord, build_batch, iter_batches

from conftest import NODI, BrokerProcess

confluent_kafka = pytest.importorskip("confluent_kafka")
confluent_admin = pytest.importorskip("confluent_kafka.admin")
kafka = pytest.importorskip("kafka")

KAFKA_LINE = re.compile(r"nodi kafka listener on ([\d.]+):(\d+)")
TIMEOUT_S = 20
AHEAD_MS = 10 * 365 * 86_400_000  # the server's clock: ten years ahead of the machine's
OLD_MS = 1_000_000_000_000  # the producers' timestamps: 2001
ENVIRONMENT = {**os.environ, "COLUMNS": "200"}
ENVIRONMENT.pop("NODI_SERVER", None)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def nodi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(NODI + list(args), capture_output=True, text=True, timeout=60, env=ENVIRONMENT)


def start(data_dir: str, clock_file: str) -> BrokerProcess:
    process = BrokerProcess(data_dir, ["--kafka-port", "0"], clock_file=clock_file).start()
    found = next(KAFKA_LINE.search(line) for line in process.output if KAFKA_LINE.search(line))
    assert found is not None  # next() yields only matches
    process.bootstrap = f"{found.group(1)}:{found.group(2)}"  # type: ignore[attr-defined]
    # The server's output is read so that it never blocks on a full pipe.
    assert process.process is not None  # started
    output = process.process.stdout
    assert output is not None  # PIPE
    threading.Thread(target=lambda: [None for _ in output], daemon=True).start()
    return process


@pytest.fixture(scope="module")
def ahead(tmp_path_factory):
    """One server for the module, on the test clock ten years ahead."""
    directory = tmp_path_factory.mktemp("log-append-time")
    clock_file = str(directory / "clock")
    with open(clock_file, "w") as file:
        file.write(str(AHEAD_MS))
    process = start(str(directory / "data"), clock_file)
    yield process
    if process.process is not None:
        process.stop()


def in_window(stamp: int, before: int, after: int) -> bool:
    """`stamp` is the server's clock (AHEAD_MS ahead) at a moment in [before, after]."""
    return before + AHEAD_MS <= stamp <= after + AHEAD_MS


def old_records(count: int, tag: str) -> list[NewRecord]:
    return [NewRecord(f"{tag}-k{i}".encode(), f"{tag}-v{i}".encode(), [("h", b"x")], OLD_MS + i) for i in range(count)]


def test_nodis_client_reads_the_append_time_and_looks_up_by_it(ahead):
    created = nodi("--server", ahead.address, "topic", "create", "stamped", "--timestamp-type", "log-append", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["timestamp_type"] == "log-append"
    with Client(ahead.address) as client:
        assert client.create_topic("plain").timestamp_type == "create"
        answers = []
        for number in range(2):
            before = now_ms()
            answer = client.produce_batch("stamped", 0, build_batch(old_records(3, f"n{number}")))
            answers.append(answer)
            assert in_window(answer.log_append_time_ms, before, now_ms())
            time.sleep(0.01)  # two distinct append times
        client.produce("stamped", b"single", timestamp=OLD_MS)
        messages = client.fetch("stamped", 0, 0)
        assert [message.timestamp for message in messages[:6]] == [answers[0].log_append_time_ms] * 3 + [
            answers[1].log_append_time_ms
        ] * 3
        assert messages[6].timestamp > answers[1].log_append_time_ms - 1
        assert [message.value for message in messages[:3]] == [b"n0-v0", b"n0-v1", b"n0-v2"]
        assert tuple(messages[0].headers) == (("h", b"x"),)
        # lookups by time go by the append times
        assert client.list_offsets("stamped", 0, OLD_MS) == 0
        assert client.list_offsets("stamped", 0, answers[0].log_append_time_ms + 1) == 3
        # a CreateTime topic keeps the producer's times
        client.produce_batch("plain", 0, build_batch(old_records(2, "p")))
        assert [message.timestamp for message in client.fetch("plain", 0, 0)] == [OLD_MS, OLD_MS + 1]
        assert client.list_offsets("plain", 0, OLD_MS + 1) == 1


def test_a_ttl_counts_from_the_append_time(ahead):
    """A message produced with a 2001 timestamp and a minute's TTL: on a CreateTime topic
    it expired long ago; on a log-append-time topic it lives a minute from its append,
    for the consumer's fetch and for a queue group alike."""
    with Client(ahead.address) as client:
        client.create_topic("fresh", timestamp_type="log-append")
        client.create_topic("stale")
        for topic in ("fresh", "stale"):
            client.produce(topic, b"m", timestamp=OLD_MS, ttl_ms=60_000)
        assert [message.value for message in client.fetch("fresh", 0, 0)] == [b"m"]
        assert client.fetch("stale", 0, 0) == []
        with client.queue("fresh", "workers") as queue:
            message = queue.receive(timeout_ms=5_000)
            assert message is not None and message.value == b"m" and message.timestamp > OLD_MS + AHEAD_MS
            message.ack()


def test_an_idempotent_retry_gets_the_original_offsets_and_time(ahead):
    with Client(ahead.address) as client:
        client.create_topic("retried", timestamp_type="log-append")
        producer_id, producer_epoch = client.init_producer_id()
        batch = build_batch(
            old_records(2, "r"), producer_id=producer_id, producer_epoch=producer_epoch, base_sequence=0
        )
        first = client.produce_batch("retried", 0, batch)
        time.sleep(0.01)
        again = client.produce_batch("retried", 0, batch)
        assert (again.base_offset, again.last_offset) == (first.base_offset, first.last_offset) == (0, 1)
        assert again.log_append_time_ms == first.log_append_time_ms
        assert [message.timestamp for message in client.fetch("retried", 0, 0)] == [first.log_append_time_ms] * 2


def test_a_client_of_protocol_4_uses_version_1_of_create_and_describe(ahead, monkeypatch):
    """An older client's CreateTopic and DescribeTopic keep working (version 1, the
    bytes they always had); asking such a server for timestamp_type is refused before
    anything is sent."""
    monkeypatch.setattr(
        client_connection.m, "HandshakeRequest", functools.partial(m.HandshakeRequest, protocol_version_max=4)
    )
    with Client(ahead.address) as client:
        assert client.create_topic("old-client", partitions=2, ttl_ms=5000).ttl_ms == 5000
        assert client.describe_topic("old-client").settings.partitions == 2
        with pytest.raises(InvalidConfig, match="timestamp_type"):
            client.create_topic("old-client-stamped", timestamp_type="log-append")
        assert "old-client-stamped" not in [topic.name for topic in client.list_topics()]
        # a log-append-time topic made by a newer client: still stamped, described
        # without the setting version 1 has no field for
        monkeypatch.undo()
        with Client(ahead.address) as newer:
            newer.create_topic("made-newer", timestamp_type="log-append")
        assert client.describe_topic("made-newer").settings.partitions == 1
        client.produce("made-newer", b"x", timestamp=OLD_MS)
        assert client.fetch("made-newer", 0, 0)[0].timestamp > OLD_MS + AHEAD_MS


def _confluent_produce(bootstrap: str, topic: str, records: list[NewRecord]) -> list[tuple[int, int, int]]:
    """(offset, timestamp type, timestamp) of each delivery report."""
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5}
    )
    reports: dict[int, tuple[int, int, int]] = {}

    def delivered(index: int):
        def callback(error, message) -> None:
            assert error is None, error
            reports[index] = (message.offset(), *message.timestamp())

        return callback

    for index, record in enumerate(records):
        producer.produce(topic, record.value, record.key, timestamp=record.timestamp_ms, on_delivery=delivered(index))
    assert producer.flush(TIMEOUT_S) == 0
    return [reports[index] for index in range(len(records))]


def _confluent_consume(bootstrap: str, topic: str, count: int) -> list[tuple[int, int, int]]:
    """(offset, timestamp type, timestamp) of each record."""
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "assign-only", "enable.auto.commit": False}
    )
    consumer.assign([confluent_kafka.TopicPartition(topic, 0, 0)])
    found: list[tuple[int, int, int]] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(found) < count and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        assert message.error() is None, message.error()
        found.append((message.offset(), *message.timestamp()))
    consumer.close()
    return found


def test_kafka_clients_see_the_append_time_and_the_bit(ahead):
    admin = confluent_admin.AdminClient({"bootstrap.servers": ahead.bootstrap})
    topics = [
        confluent_admin.NewTopic("kafka-stamped", 1, 1, config={"message.timestamp.type": "LogAppendTime"}),
        confluent_admin.NewTopic("kafka-plain", 1, 1, config={"message.timestamp.type": "CreateTime"}),
    ]
    for future in admin.create_topics(topics).values():
        future.result(TIMEOUT_S)
    refused = admin.create_topics(
        [confluent_admin.NewTopic("kafka-bad", 1, 1, config={"message.timestamp.type": "WallTime"})]
    )
    with pytest.raises(confluent_kafka.KafkaException, match="LogAppendTime"):
        refused["kafka-bad"].result(TIMEOUT_S)
    resources = [confluent_admin.ConfigResource(confluent_admin.ResourceType.TOPIC, topic.topic) for topic in topics]
    shown = {
        resource.name: future.result(TIMEOUT_S)["message.timestamp.type"].value
        for resource, future in admin.describe_configs(resources).items()
    }
    assert shown == {"kafka-stamped": "LogAppendTime", "kafka-plain": "CreateTime"}

    before = now_ms()
    reports = _confluent_produce(ahead.bootstrap, "kafka-stamped", old_records(5, "c"))
    after = now_ms()
    append_time = reports[0][2]
    assert in_window(append_time, before, after)
    # librdkafka takes the append time from the produce answer (log_append_time)
    assert {(kind, stamp) for _, kind, stamp in reports} == {(confluent_kafka.TIMESTAMP_LOG_APPEND_TIME, append_time)}
    consumed = _confluent_consume(ahead.bootstrap, "kafka-stamped", 5)
    assert [(offset, kind) for offset, kind, _ in consumed] == [
        (offset, confluent_kafka.TIMESTAMP_LOG_APPEND_TIME) for offset in range(5)
    ]
    assert {stamp for _, _, stamp in consumed} == {append_time}
    # kafka-python: the send's metadata carries the append time too
    producer = kafka.KafkaProducer(bootstrap_servers=ahead.bootstrap, acks="all")
    before = now_ms()
    metadata = producer.send("kafka-stamped", b"kp", timestamp_ms=OLD_MS).get(TIMEOUT_S)
    producer.close(TIMEOUT_S)
    assert metadata.offset == 5 and in_window(metadata.timestamp, before, now_ms())
    with Client(ahead.address) as client:
        messages = client.fetch("kafka-stamped", 0, 0)
        assert [message.timestamp for message in messages] == [append_time] * 5 + [metadata.timestamp]
    # ListOffsets by time (Kafka's offsets_for_times) uses the append times
    consumer = confluent_kafka.Consumer({"bootstrap.servers": ahead.bootstrap, "group.id": "by-time"})
    found = [
        consumer.offsets_for_times([confluent_kafka.TopicPartition("kafka-stamped", 0, stamp)], TIMEOUT_S)[0].offset
        for stamp in (OLD_MS + 1, append_time + 1)
    ]
    consumer.close()
    assert found == [0, 5]

    # a CreateTime topic: the producer's times stand, and the answer says so (-1)
    reports = _confluent_produce(ahead.bootstrap, "kafka-plain", old_records(2, "q"))
    assert [(kind, stamp) for _, kind, stamp in reports] == [
        (confluent_kafka.TIMESTAMP_CREATE_TIME, OLD_MS),
        (confluent_kafka.TIMESTAMP_CREATE_TIME, OLD_MS + 1),
    ]
    assert [(kind, stamp) for _, kind, stamp in _confluent_consume(ahead.bootstrap, "kafka-plain", 2)] == [
        (confluent_kafka.TIMESTAMP_CREATE_TIME, OLD_MS),
        (confluent_kafka.TIMESTAMP_CREATE_TIME, OLD_MS + 1),
    ]


def test_the_setting_survives_a_restart_and_the_batches_verify(tmp_path):
    data_dir = str(tmp_path / "data")
    clock_file = str(tmp_path / "clock")
    with open(clock_file, "w") as file:
        file.write(str(AHEAD_MS))
    process = start(data_dir, clock_file)
    try:
        with Client(process.address) as client:
            client.create_topic("kept", timestamp_type="log-append", partitions=2)
            first = client.produce_batch("kept", 1, build_batch(old_records(3, "a")))
        process.stop()
        process = start(data_dir, clock_file)
        described = nodi("--server", process.address, "topic", "describe", "kept")
        assert described.returncode == 0, described.stderr
        assert re.search(r"^timestamp_type\s+log-append$", described.stdout, re.MULTILINE), described.stdout
        with Client(process.address) as client:
            assert client.describe_topic("kept").settings.timestamp_type == "log-append"
            before = now_ms()
            second = client.produce_batch("kept", 1, build_batch(old_records(2, "b")))
            assert in_window(second.log_append_time_ms, before, now_ms())
            times = [message.timestamp for message in client.fetch("kept", 1, 0)]
            assert times == [first.log_append_time_ms] * 3 + [second.log_append_time_ms] * 2
    finally:
        if process.process is not None:
            process.stop()
    verified = nodi("segments", "verify", data_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    segment = os.path.join(partition_directory(data_dir, "kept", 1), "00000000000000000000.log")
    dumped = nodi("segments", "dump", segment, "--records", "--json")
    assert dumped.returncode == 0, dumped.stderr
    batches = [json.loads(line) for line in dumped.stdout.splitlines()]
    assert [batch["timestamp_type"] for batch in batches] == ["log_append", "log_append"]
    assert [batch["max_timestamp"] for batch in batches] == [first.log_append_time_ms, second.log_append_time_ms]
    assert all(batch["crc_ok"] for batch in batches)
    assert [record["timestamp"] for batch in batches for record in batch["records"]] == [
        first.log_append_time_ms
    ] * 3 + [second.log_append_time_ms] * 2
    # the segment file itself: the bit and the append time, CRCs checked by iter_batches
    with open(segment, "rb") as file:
        headers = [header for header, _ in iter_batches(file.read())]
    assert all(header.attributes & ATTRIBUTE_TIMESTAMP_TYPE for header in headers)
    assert [header.base_timestamp for header in headers] == [OLD_MS, OLD_MS]
