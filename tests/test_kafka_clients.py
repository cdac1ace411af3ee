"""Kafka's own clients against nodi's Kafka listener (issue 13), one real `nodi serve
--kafka-port 0` for the module. Every client connects through a recording proxy (the
broker advertises the proxy's port), which notes the API key and version of each request
and whether it was answered: the last test checks that each one was advertised and
answered.

- confluent-kafka, kafka-python and aiokafka each create a topic, produce with acks=all
  and idempotence on, and nodi's own client reads what they wrote byte for byte (key,
  value, headers, timestamp, offset); they read what nodi's client wrote the same way.
- a group of 3 (confluent-kafka) splits a topic, and rebalances when one leaves;
  commit and resume (kafka-python, offsets visible to nodi's client); seek by timestamp
  (aiokafka); kcat -L, -P, -C, -G.
- bad input closes only its own connection, with a log line; a key nodi does not serve
  is answered UNSUPPORTED_VERSION on a connection that stays open.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from nodi.broker.client import Client
from nodi.broker.kafka.apis import APIS
from nodi.broker.kafka.schema import Reader, decode, encode
from nodi.storage.records import NewRecord, build_batch_buffer, decode_batches

from conftest import BrokerProcess

confluent_kafka = pytest.importorskip("confluent_kafka")
confluent_admin = pytest.importorskip("confluent_kafka.admin")
kafka = pytest.importorskip("kafka")
kafka_admin = pytest.importorskip("kafka.admin")
aiokafka = pytest.importorskip("aiokafka")
aiokafka_admin = pytest.importorskip("aiokafka.admin")

KAFKA_LINE = re.compile(r"nodi kafka listener on ([\d.]+):(\d+)")
TIMEOUT_S = 20


class RecordingProxy:
    """A TCP proxy in front of the Kafka listener that records each request's (api key,
    version) and whether a response with its correlation id came back. Two threads per
    connection; sockets closed at stop()."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target: tuple[str, int] | None = None
        self.sent: dict[tuple[str, int], tuple[int, int]] = {}  # (connection, correlation) -> (key, version)
        self.answered: set[tuple[str, int]] = set()
        # Requests still unanswered when their client closed the connection.
        self.cut: set[tuple[str, int]] = set()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = [self.listener]
        self._connections = 0

    def start(self, target: tuple[str, int]) -> None:
        self.target = target
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            assert self.target is not None  # start() sets it before this thread starts
            upstream = socket.create_connection(self.target, timeout=TIMEOUT_S)
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [client, upstream]
                self._connections += 1
                name = f"c{self._connections}"
            threading.Thread(target=self._pump, args=(client, upstream, name, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, name, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, name: str, requests: bool) -> None:
        buffer = b""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                buffer += data
                while len(buffer) >= 4:
                    (size,) = struct.unpack_from(">i", buffer)
                    if len(buffer) < 4 + size:
                        break
                    frame, buffer = buffer[: 4 + size], buffer[4 + size :]
                    with self.lock:
                        if requests:
                            key, version, correlation = struct.unpack_from(">hhi", frame, 4)
                            self.sent[name, correlation] = (key, version)
                        else:
                            self.answered.add((name, struct.unpack_from(">i", frame, 4)[0]))
                    sink.sendall(frame)
        except OSError:
            pass
        finally:
            if requests:
                with self.lock:
                    self.cut.update(p for p in self.sent if p[0] == name and p not in self.answered)
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture(scope="module")
def kafka_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    directory = tmp_path_factory.mktemp("kafka")
    proxy = RecordingProxy()
    config = directory / "nodi.toml"
    config.write_text(f"[kafka]\nadvertised_port = {proxy.port}\n")
    process = BrokerProcess(
        str(directory / "data"), ["--kafka-port", "0", "--config", str(config)], metrics=True
    ).start()
    found = next(KAFKA_LINE.search(line) for line in process.output if KAFKA_LINE.search(line))
    assert found is not None  # next() yields only matches
    proxy.start((found.group(1), int(found.group(2))))
    drain = threading.Thread(target=_drain, args=(process,), daemon=True)
    drain.start()
    process.kafka_address = f"{found.group(1)}:{found.group(2)}"  # type: ignore[attr-defined]
    process.bootstrap = f"127.0.0.1:{proxy.port}"  # type: ignore[attr-defined]
    process.proxy = proxy  # type: ignore[attr-defined]
    yield process
    os_process = process.process
    if os_process is not None:
        import os
        import signal

        os.kill(os_process.pid, signal.SIGTERM)
        os_process.wait(timeout=15)
        drain.join(5)
    proxy.stop()


def _drain(process: BrokerProcess) -> None:
    """The server's output, into process.output as it comes (the pipe never fills)."""
    assert process.process is not None and process.process.stdout is not None
    for line in process.process.stdout:
        process.output.append(line)


# -- three clients behind one small interface -------------------------------------------

# (key, value, headers, timestamp ms)
Record = tuple[bytes | None, bytes | None, tuple[tuple[str, bytes], ...], int]


def _records(count: int, tag: str) -> list[Record]:
    base = 1_700_000_000_000
    return [
        (
            None if index % 5 == 4 else f"{tag}-key-{index}".encode(),
            bytes(range(index % 256)) + f"{tag}-value-{index}".encode(),
            (("trace", f"t{index}".encode()), ("bin", b"\x00\xff")) if index % 2 else (),
            base + index * 1000,
        )
        for index in range(count)
    ]


def _confluent_produce(
    bootstrap: str, topic: str, records: list[Record], compression: str = "none"
) -> list[tuple[int, int]]:
    producer = confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "compression.type": compression,
        }
    )
    placed: dict[int, tuple[int, int]] = {}

    def delivered(index: int):
        def callback(error, message) -> None:
            assert error is None, error
            placed[index] = (message.partition(), message.offset())

        return callback

    for index, (key, value, headers, timestamp) in enumerate(records):
        producer.produce(topic, value, key, headers=list(headers), timestamp=timestamp, on_delivery=delivered(index))
    assert producer.flush(TIMEOUT_S) == 0
    return [placed[index] for index in range(len(records))]


def _confluent_consume(bootstrap: str, topic: str, start: dict[int, int], count: int) -> list[tuple]:
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "unused-assign-only", "enable.auto.commit": False}
    )
    consumer.assign([confluent_kafka.TopicPartition(topic, p, o) for p, o in start.items()])
    found: list[tuple] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(found) < count and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        assert message.error() is None, message.error()
        found.append(
            (
                message.partition(),
                message.offset(),
                message.key(),
                message.value(),
                tuple(message.headers() or ()),
                message.timestamp()[1],
            )
        )
    consumer.close()
    return found


def _kafka_python_produce(
    bootstrap: str, topic: str, records: list[Record], compression: str | None = None
) -> list[tuple[int, int]]:
    producer = kafka.KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, compression_type=compression, linger_ms=5
    )
    futures = [
        producer.send(topic, value=value, key=key, headers=list(headers), timestamp_ms=timestamp)
        for key, value, headers, timestamp in records
    ]
    placed = [(meta.partition, meta.offset) for meta in (future.get(TIMEOUT_S) for future in futures)]
    producer.close(TIMEOUT_S)
    return placed


def _kafka_python_consume(bootstrap: str, topic: str, start: dict[int, int], count: int) -> list[tuple]:
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    partitions = [kafka.TopicPartition(topic, p) for p in start]
    consumer.assign(partitions)
    for partition in partitions:
        consumer.seek(partition, start[partition.partition])
    found: list[tuple] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(found) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            found += [(r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp) for r in batch]
    consumer.close()
    return found


def _aiokafka_produce(
    bootstrap: str, topic: str, records: list[Record], compression: str | None = None
) -> list[tuple[int, int]]:
    async def main() -> list[tuple[int, int]]:
        producer = aiokafka.AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            compression_type=compression,
            linger_ms=5,
        )
        await producer.start()
        try:
            futures = [
                await producer.send(topic, value, key=key, headers=list(headers), timestamp_ms=timestamp)
                for key, value, headers, timestamp in records
            ]
            return [(meta.partition, meta.offset) for meta in await asyncio.gather(*futures)]
        finally:
            await producer.stop()

    return asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))


def _aiokafka_consume(bootstrap: str, topic: str, start: dict[int, int], count: int) -> list[tuple]:
    async def main() -> list[tuple]:
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = [aiokafka.TopicPartition(topic, p) for p in start]
            consumer.assign(partitions)
            for partition in partitions:
                consumer.seek(partition, start[partition.partition])
            found: list[tuple] = []
            while len(found) < count:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    found += [
                        (r.partition, r.offset, r.key, r.value, tuple(r.headers or ()), r.timestamp) for r in batch
                    ]
            return found
        finally:
            await consumer.stop()

    return asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))


CLIENTS = {
    "confluent-kafka": (_confluent_produce, _confluent_consume),
    "kafka-python": (_kafka_python_produce, _kafka_python_consume),
    "aiokafka": (_aiokafka_produce, _aiokafka_consume),
}


def _create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = confluent_admin.AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([confluent_admin.NewTopic(name, partitions, 1)]).values():
        future.result(TIMEOUT_S)


def _kafka_python_create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = kafka_admin.KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=TIMEOUT_S * 1000)
    try:
        admin.create_topics([kafka_admin.NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def _aiokafka_create_topic(bootstrap: str, name: str, partitions: int) -> None:
    async def main() -> None:
        admin = aiokafka_admin.AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([aiokafka_admin.NewTopic(name, partitions, 1)])
        finally:
            await admin.close()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))


CREATE_TOPIC = {
    "confluent-kafka": _create_topic,
    "kafka-python": _kafka_python_create_topic,
    "aiokafka": _aiokafka_create_topic,
}


@pytest.mark.parametrize("client_name", sorted(CLIENTS))
def test_kafka_clients_and_nodis_client_read_each_others_records_byte_for_byte(kafka_server, client_name) -> None:
    produce, consume = CLIENTS[client_name]
    topic = f"both-ways-{client_name}"
    CREATE_TOPIC[client_name](kafka_server.bootstrap, topic, 3)
    written = _records(40, client_name)
    placed = produce(kafka_server.bootstrap, topic, written)

    with Client(kafka_server.address, timeout_ms=10_000) as client:
        read = {}
        for partition in range(3):
            for message in client.fetch(topic, partition, 0, bytes_max=1 << 20):
                read[message.partition, message.offset] = message
        assert len(read) == len(written)
        for (key, value, headers, timestamp), where in zip(written, placed):
            message = read[where]
            assert (message.key, message.value, message.headers, message.timestamp) == (
                key,
                value,
                headers,
                timestamp,
            )

        # nodi's client writes; the Kafka client reads it from the offsets nodi acknowledged.
        ends = {partition: client.describe_topic(topic).partitions[partition].log_end_offset for partition in range(3)}
        from_nodi = _records(12, "nodi")
        nodi_placed = [
            client.produce(topic, value, key=key, headers=headers, timestamp=timestamp, partition=index % 3)
            for index, (key, value, headers, timestamp) in enumerate(from_nodi)
        ]
    got = consume(kafka_server.bootstrap, topic, ends, len(from_nodi))
    by_place = {(partition, offset): rest for partition, offset, *rest in got}
    assert len(by_place) == len(from_nodi)
    for (key, value, headers, timestamp), where in zip(from_nodi, nodi_placed):
        assert by_place[where] == [key, value, headers, timestamp]


def test_a_group_of_three_splits_the_partitions_and_rebalances_when_one_leaves(kafka_server) -> None:
    topic = "group-of-three"
    _create_topic(kafka_server.bootstrap, topic, 6)
    assignments: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}

    def on_assign(index: int):
        def callback(consumer, partitions) -> None:
            assignments[index] = {p.partition for p in partitions}

        return callback

    consumers = []
    for index in range(3):
        consumer = confluent_kafka.Consumer(
            {
                "bootstrap.servers": kafka_server.bootstrap,
                "group.id": "three",
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 300,
                "auto.offset.reset": "earliest",
            }
        )
        consumer.subscribe([topic], on_assign=on_assign(index))
        consumers.append(consumer)

    def poll_until(condition, active) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, assignments
            for index in active:
                consumers[index].poll(0.05)

    def split(active) -> bool:
        sets = [assignments[index] for index in active]
        return all(sets) and sum(len(s) for s in sets) == 6 and set().union(*sets) == set(range(6))

    poll_until(lambda: split([0, 1, 2]), [0, 1, 2])
    consumers[2].close()
    assignments[2] = set()
    poll_until(lambda: split([0, 1]), [0, 1])
    for consumer in consumers[:2]:
        consumer.close()


def test_committed_offsets_resume_a_group_and_nodi_sees_them(kafka_server) -> None:
    topic = "commit-resume"
    _create_topic(kafka_server.bootstrap, topic, 1)
    placed = _kafka_python_produce(kafka_server.bootstrap, topic, _records(20, "resume"))
    assert [offset for _, offset in placed] == list(range(20))

    def consumer():
        return kafka.KafkaConsumer(
            topic,
            bootstrap_servers=kafka_server.bootstrap,
            group_id="resume",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=10,
        )

    first = consumer()
    seen: list[int] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(seen) < 10 and time.monotonic() < deadline:
        for batch in first.poll(timeout_ms=500, max_records=10 - len(seen)).values():
            seen += [record.offset for record in batch]
    first.commit({kafka.TopicPartition(topic, 0): kafka.OffsetAndMetadata(10, "half", -1)})
    first.close()
    assert seen == list(range(10))

    with Client(kafka_server.address, timeout_ms=10_000) as client:
        assert client.fetch_offsets("resume", [topic]) == {(topic, 0): 10}
        lags = client.describe_group("resume").lags  # `nodi group describe`: the Kafka group's lag
        assert [(lag.topic, lag.partition, lag.lag) for lag in lags] == [(topic, 0, 10)]

    second = consumer()
    resumed: list[int] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(resumed) < 10 and time.monotonic() < deadline:
        for batch in second.poll(timeout_ms=500).values():
            resumed += [record.offset for record in batch]
    second.close()
    assert resumed == list(range(10, 20))


def test_seek_by_timestamp_finds_the_first_record_at_or_after_it(kafka_server) -> None:
    topic = "by-time"
    _create_topic(kafka_server.bootstrap, topic, 1)
    records = _records(10, "time")  # timestamps base + 0 s, 1 s, ... 9 s
    _aiokafka_produce(kafka_server.bootstrap, topic, records)
    base = records[0][3]

    async def main():
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=kafka_server.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partition = aiokafka.TopicPartition(topic, 0)
            found = await consumer.offsets_for_times({partition: base + 2500})
            past = await consumer.offsets_for_times({partition: base + 60_000})
            earliest = await consumer.beginning_offsets([partition])
            latest = await consumer.end_offsets([partition])
            return found[partition], past[partition], earliest[partition], latest[partition]
        finally:
            await consumer.stop()

    found, past, earliest, latest = asyncio.run(asyncio.wait_for(main(), TIMEOUT_S))
    assert (found.offset, found.timestamp) == (3, base + 3000)
    assert past is None
    assert (earliest, latest) == (0, 10)


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed (.ci/run installs Debian's kcat)")
def test_kcat_lists_produces_consumes_and_joins_a_group(kafka_server) -> None:
    bootstrap = kafka_server.bootstrap
    _create_topic(bootstrap, "kcat", 2)

    def kcat(*arguments: str, data: str | None = None) -> str:
        done = subprocess.run(
            ["kcat", "-b", bootstrap, *arguments], input=data, capture_output=True, text=True, timeout=TIMEOUT_S
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert 'topic "kcat" with 2 partitions' in kcat("-L")
    kcat("-P", "-t", "kcat", "-p", "0", "-K", ":", data="a:one\nb:two\nc:three\n")
    assert kcat("-C", "-t", "kcat", "-p", "0", "-e", "-f", "%k=%s@%o\n").splitlines() == [
        "a=one@0",
        "b=two@1",
        "c=three@2",
    ]
    out = kcat("-G", "kcat-group", "kcat", "-o", "beginning", "-e", "-f", "%s\n", "-X", "session.timeout.ms=6000")
    assert sorted(out.split()) == ["one", "three", "two"]


def _raw(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=TIMEOUT_S)


def _read_response(sock: socket.socket) -> bytes:
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            assert chunk, "the connection closed"
            data += chunk
        return data

    (size,) = struct.unpack(">i", exactly(4))
    return exactly(size)


def _api_versions_request(correlation: int, version: int = 2) -> bytes:
    payload = struct.pack(">hhih", 18, version, correlation, 4) + b"test"
    return struct.pack(">i", len(payload)) + payload


def test_a_key_nodi_does_not_serve_is_answered_and_the_connection_stays_open(kafka_server) -> None:
    with _raw(kafka_server.kafka_address) as sock:
        payload = struct.pack(">hhih", 68, 0, 7, -1) + b"\x00" * 12  # ConsumerGroupHeartbeat
        sock.sendall(struct.pack(">i", len(payload)) + payload + _api_versions_request(8))
        assert _read_response(sock) == struct.pack(">ih", 7, 35)  # UNSUPPORTED_VERSION
        answer = _read_response(sock)
        assert struct.unpack_from(">ih", answer) == (8, 0)


def test_bad_input_closes_only_that_connection_with_a_log_line(kafka_server) -> None:
    with _raw(kafka_server.kafka_address) as good, _raw(kafka_server.kafka_address) as bad:
        bad.sendall(struct.pack(">i", 1 << 30))  # over request_bytes_max
        assert bad.recv(10) == b""
        payload = struct.pack(">hhih", 3, 5, 9, -1) + b"\x00\x00"  # Metadata v5 cut short
        with _raw(kafka_server.kafka_address) as short:
            short.sendall(struct.pack(">i", len(payload)) + payload)
            assert short.recv(10) == b""
        good.sendall(_api_versions_request(11))
        assert struct.unpack_from(">ih", _read_response(good)) == (11, 0)
    # Both connections' log lines, which the server may write after the good connection's
    # answer: wait for the two, not only the first.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (
        any("request_bytes_max" in line for line in kafka_server.output)
        and any("early" in line for line in kafka_server.output)
    ):
        time.sleep(0.05)
    assert any("kafka connection" in line and "request_bytes_max" in line for line in kafka_server.output)
    assert any("kafka connection" in line and "early" in line for line in kafka_server.output)


def test_every_request_the_clients_sent_was_advertised_and_answered(kafka_server) -> None:
    # Each client once more through the proxy, so this test stands alone too.
    topic = "proxy-check"
    _create_topic(kafka_server.bootstrap, topic, 1)
    for produce, consume in CLIENTS.values():
        placed = produce(kafka_server.bootstrap, topic, _records(3, "proxy"))
        assert len(consume(kafka_server.bootstrap, topic, {0: placed[0][1]}, 3)) == 3
    proxy = kafka_server.proxy
    # A client's last long-poll Fetch may still be in flight, or its close not yet seen by
    # the proxy's threads, when consume() returns: give them a bounded moment to settle.
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        with proxy.lock:
            if all(place in proxy.answered or place in proxy.cut for place in proxy.sent):
                break
        time.sleep(0.05)
    with proxy.lock:
        sent = dict(proxy.sent)
        answered = set(proxy.answered)
        cut = set(proxy.cut)
    seen: dict[str, set[int]] = {}
    for place, (key, version) in sent.items():
        api = APIS.get(key)
        assert api is not None, f"key {key} not advertised"
        # librdkafka opens with ApiVersions v3 (flexible): answered in the v0 format with
        # UNSUPPORTED_VERSION and the ranges, it retries at v2 (KIP-511).
        if api.name != "ApiVersions":
            assert api.accepted_from <= version <= api.max_version, (api.name, version)
        seen.setdefault(api.name, set()).add(version)
        # Unanswered: only a request in flight when its client closed the connection.
        assert place in answered or place in cut, (api.name, version)
    for name in ("ApiVersions", "Metadata", "Produce", "Fetch", "InitProducerId", "CreateTopics"):
        assert name in seen, sorted(seen)


def test_every_record_confluent_kafka_saw_acknowledged_with_acks_all_survives_kill_9(tmp_path) -> None:
    """A broker of its own, killed with SIGKILL while librdkafka produces with acks=all:
    after a restart every acknowledged record is there (fsync policy always: acks=-1
    is answered after the fsync)."""
    process = BrokerProcess(str(tmp_path / "data"), ["--kafka-port", "0"]).start()
    found = next(KAFKA_LINE.search(line) for line in process.output if KAFKA_LINE.search(line))
    assert found is not None  # next() yields only matches
    bootstrap = f"{found.group(1)}:{found.group(2)}"
    try:
        _create_topic(bootstrap, "kill", 2)
        producer = confluent_kafka.Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 2,
                "message.timeout.ms": 1000,
                "reconnect.backoff.max.ms": 100,
            }
        )
        acknowledged: list[tuple[int, int, bytes]] = []

        def delivered(error, message) -> None:
            if error is None:
                acknowledged.append((message.partition(), message.offset(), message.value()))

        index = 0
        deadline = time.monotonic() + TIMEOUT_S
        while len(acknowledged) < 500 and time.monotonic() < deadline:
            producer.produce("kill", f"record-{index}".encode(), key=str(index).encode(), on_delivery=delivered)
            index += 1
            producer.poll(0)
            if index % 200 == 0:
                producer.poll(0.01)
        process.kill()  # SIGKILL while more is in flight
        producer.flush(3)  # the rest fail (message timeout): not acknowledged
        assert len(acknowledged) >= 500
        process.start()
        with Client(process.address, timeout_ms=10_000) as client:
            stored = {}
            for partition in range(2):
                offset = 0
                while batch := client.fetch("kill", partition, offset, bytes_max=1 << 20):
                    for message in batch:
                        stored[message.partition, message.offset] = message.value
                    offset = batch[-1].offset + 1
        for partition, offset, value in acknowledged:
            assert stored.get((partition, offset)) == value
    finally:
        if process.process is not None:
            process.stop()


CODECS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("client_name", sorted(CLIENTS))
def test_every_clients_compressed_batches_are_stored_as_sent_and_read_back_byte_for_byte(
    kafka_server, client_name, codec
) -> None:
    """Each Kafka client's batches in each codec (Kafka's LZ4 frame for lz4) are accepted,
    stored compressed as they were sent (the codec bits of every stored batch say so), and
    nodi's client reads every record back byte for byte: key, value, headers, timestamp."""
    topic = f"codec-{codec}-{client_name}"
    _create_topic(kafka_server.bootstrap, topic, 1)
    # Values that compress, with keys, null keys, headers and binary bytes among them.
    written: list[Record] = [
        (key, (value or b"") * 8, headers, timestamp)
        for key, value, headers, timestamp in _records(60, f"{client_name}-{codec}")
    ]
    produce = CLIENTS[client_name][0]
    placed = produce(kafka_server.bootstrap, topic, written, codec)
    assert [partition for partition, _ in placed] == [0] * len(written)
    assert sorted(offset for _, offset in placed) == list(range(len(written)))

    with _raw(kafka_server.kafka_address) as sock:
        fetched = _call(sock, 1, 11, _fetch_body(topic, 0, 1 << 20), 1)
    stored = fetched["responses"][0]["partitions"][0]["records"]
    codecs_stored = set()
    position = 0
    while position < len(stored):
        (batch_length,) = struct.unpack_from(">i", stored, position + 8)
        (attributes,) = struct.unpack_from(">h", stored, position + 21)
        codecs_stored.add(attributes & 0x7)
        position += 12 + batch_length
    assert codecs_stored == {CODECS[codec]}

    with Client(kafka_server.address, timeout_ms=10_000) as client:
        read = {message.offset: message for message in client.fetch(topic, 0, 0, bytes_max=1 << 20)}
    assert len(read) == len(written)
    for (key, value, headers, timestamp), (_, offset) in zip(written, placed):
        message = read[offset]
        assert (message.key, message.value, message.headers, message.timestamp) == (key, value, headers, timestamp)


def _fetch_body(topic: str, offset: int, max_bytes: int) -> dict:
    return {
        "replica_id": -1,
        "max_wait_ms": 0,
        "min_bytes": 1,
        "max_bytes": max_bytes,
        "isolation_level": 0,
        "session_id": 0,
        "session_epoch": -1,
        "topics": [
            {
                "topic": topic,
                "partitions": [
                    {
                        "partition": 0,
                        "current_leader_epoch": -1,
                        "fetch_offset": offset,
                        "log_start_offset": -1,
                        "partition_max_bytes": max_bytes,
                    }
                ],
            }
        ],
        "forgotten_topics_data": [],
        "rack_id": "",
    }


def _call(sock: socket.socket, key: int, version: int, body: dict, correlation: int) -> dict:
    """One request of the listener's own schemas on a raw socket; the decoded response."""
    api = APIS[key]
    parts: list[bytes] = [struct.pack(">hhih", key, version, correlation, 4), b"test"]
    encode(api.request, version, body, parts)
    payload = b"".join(parts)
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    answer = _read_response(sock)
    reader = Reader(memoryview(answer), 1000)
    assert reader.int32() == correlation
    decoded = decode(api.response, version, reader)
    assert reader.position == len(answer)
    return decoded


def _produce_body(topic: str, batch: bytes) -> dict:
    return {
        "transactional_id": None,
        "acks": -1,
        "timeout_ms": 10_000,
        "topic_data": [{"name": topic, "partition_data": [{"index": 0, "records": batch}]}],
    }


def test_idempotent_sequences_follow_kafkas_rules_and_fetch_out_of_range_is_answered(kafka_server) -> None:
    topic = "sequences"
    _create_topic(kafka_server.bootstrap, topic, 1)
    with _raw(kafka_server.kafka_address) as sock:
        producer = _call(sock, 22, 1, {"transactional_id": None, "transaction_timeout_ms": 60_000}, 1)
        assert producer["error_code"] == 0
        identity = {"producer_id": producer["producer_id"], "producer_epoch": producer["producer_epoch"]}

        def batch(sequence: int, count: int) -> bytes:
            records = [NewRecord(f"k{sequence + i}".encode(), f"v{sequence + i}".encode()) for i in range(count)]
            return bytes(build_batch_buffer(records, base_sequence=sequence, **identity))

        def produce(sequence: int, count: int, correlation: int) -> dict:
            answer = _call(sock, 0, 8, _produce_body(topic, batch(sequence, count)), correlation)
            return answer["responses"][0]["partition_responses"][0]

        first = produce(0, 3, 2)
        assert (first["error_code"], first["base_offset"]) == (0, 0)
        assert produce(3, 2, 3)["base_offset"] == 3
        retried = produce(0, 3, 4)  # a retry of a batch already written: its original offset
        assert (retried["error_code"], retried["base_offset"]) == (0, 0)
        gap = produce(7, 1, 5)  # 5 and 6 never came
        assert gap["error_code"] == 45  # OUT_OF_ORDER_SEQUENCE_NUMBER
        assert produce(5, 1, 6)["base_offset"] == 5

        def fetch_body(offsets, min_bytes: int) -> dict:
            return {
                "replica_id": -1,
                "max_wait_ms": 200,
                "min_bytes": min_bytes,
                "max_bytes": 1 << 20,
                "isolation_level": 0,
                "session_id": 0,
                "session_epoch": -1,
                "topics": [
                    {
                        "topic": topic,
                        "partitions": [
                            {
                                "partition": 0,
                                "current_leader_epoch": -1,
                                "fetch_offset": offset,
                                "log_start_offset": -1,
                                "partition_max_bytes": 1 << 20,
                            }
                        ],
                    }
                    for offset in offsets
                ],
                "forgotten_topics_data": [],
                "rack_id": "",
            }

        fetch = _call(sock, 1, 11, fetch_body((0, 6, 1000), 1), 7)
        # min_bytes more than there is: after max_wait_ms, what there is.
        waited = _call(sock, 1, 11, fetch_body((0,), 1 << 20), 8)
    assert waited["responses"][0]["partitions"][0]["error_code"] == 0
    assert len(decode_batches(waited["responses"][0]["partitions"][0]["records"])) == 6
    results = [entry for topic_entry in fetch["responses"] for entry in topic_entry["partitions"]]
    assert [r["error_code"] for r in results] == [0, 0, 1]  # 1: OFFSET_OUT_OF_RANGE
    assert results[0]["high_watermark"] == 6 and results[1]["records"] == b""
    stored = decode_batches(results[0]["records"])
    assert [(record.offset, record.value) for record in stored] == [(i, f"v{i}".encode()) for i in range(6)]
    # The same request and byte counters as nodi's own protocol.
    with urllib.request.urlopen(f"http://127.0.0.1:{kafka_server.metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    assert 'nodi_requests_total{api="produce",error="out_of_order_sequence"} 1.0' in text
    assert 'nodi_bytes_in_total{topic="sequences"}' in text


def test_large_fetches_sent_from_the_segment_files_arrive_byte_for_byte(kafka_server) -> None:
    """Fetched batches of 64 KiB or more go out with sendfile after the response's bytes:
    several partitions in one fetch response, each with its records field in place."""
    topic = "large-fetches"
    _create_topic(kafka_server.bootstrap, topic, 2)
    values = [bytes([index % 251]) * 1000 + index.to_bytes(4, "big") for index in range(600)]
    with Client(kafka_server.address, timeout_ms=10_000) as client:
        producer = client.producer(linger_ms=50)
        futures = [producer.send(topic, value, partition=index % 2) for index, value in enumerate(values)]
        producer.flush(10_000)
        placed = [future.result(10) for future in futures]
        producer.close()
    for consume in (_confluent_consume, _kafka_python_consume):
        got = consume(kafka_server.bootstrap, topic, {0: 0, 1: 0}, len(values))
        by_place = {(partition, offset): value for partition, offset, _, value, _, _ in got}
        assert [by_place[where] for where in placed] == values


def test_kafka_connections_over_connections_max_are_closed_and_the_others_served(tmp_path) -> None:
    config = tmp_path / "nodi.toml"
    config.write_text("[server]\nconnections_max = 2\n")
    process = BrokerProcess(str(tmp_path / "data"), ["--kafka-port", "0", "--config", str(config)]).start()
    found = next(KAFKA_LINE.search(line) for line in process.output if KAFKA_LINE.search(line))
    assert found is not None  # next() yields only matches
    address = f"{found.group(1)}:{found.group(2)}"
    try:
        with _raw(address) as first, _raw(address) as second:
            for sock, correlation in ((first, 1), (second, 2)):
                sock.sendall(_api_versions_request(correlation))
                assert struct.unpack_from(">ih", _read_response(sock)) == (correlation, 0)
            with _raw(address) as third:
                assert third.recv(10) == b""
            first.sendall(_api_versions_request(3))
            assert struct.unpack_from(">ih", _read_response(first)) == (3, 0)
    finally:
        process.stop()
    assert any("kafka connection refused: connections_max 2" in line for line in process.output)


def test_delete_records_moves_the_low_watermark_and_consumers_from_earliest_start_there(kafka_server) -> None:
    """confluent-kafka's and kafka-python's AdminClient.delete_records (DeleteRecords v0-1):
    the answer's low watermark is the new start, -1 means the high watermark, an offset
    above it is OFFSET_OUT_OF_RANGE, an unknown partition UNKNOWN_TOPIC_OR_PARTITION; a
    consumer from earliest then starts at the new start, and ListOffsets agrees."""
    topic = "delete-records"
    bootstrap = kafka_server.bootstrap
    _create_topic(bootstrap, topic, 2)
    records = _records(10, "dr")
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for partition in (0, 1):
        for key, value, _, timestamp in records:
            producer.produce(topic, value, key, partition=partition, timestamp=timestamp)
    assert producer.flush(TIMEOUT_S) == 0

    admin = confluent_admin.AdminClient({"bootstrap.servers": bootstrap})
    TopicPartition = confluent_kafka.TopicPartition
    futures = admin.delete_records([TopicPartition(topic, 0, 4)], request_timeout=TIMEOUT_S)
    assert [future.result(TIMEOUT_S).low_watermark for future in futures.values()] == [4]
    (future,) = admin.delete_records([TopicPartition(topic, 1, 11)], request_timeout=TIMEOUT_S).values()
    with pytest.raises(confluent_kafka.KafkaException) as raised:
        future.result(TIMEOUT_S)
    assert raised.value.args[0].code() == confluent_kafka.KafkaError.OFFSET_OUT_OF_RANGE
    # An unknown partition or topic (librdkafka refuses those before sending): raw v0 and v1.
    with _raw(kafka_server.kafka_address) as sock:
        for version in (0, 1):
            body = {
                "topics": [
                    {"name": topic, "partitions": [{"partition_index": 7, "offset": 1}]},
                    {"name": "no-such-topic", "partitions": [{"partition_index": 0, "offset": 1}]},
                ],
                "timeout_ms": 5000,
            }
            answer = _call(sock, 21, version, body, 40 + version)
            assert [
                (entry["name"], partition["partition_index"], partition["low_watermark"], partition["error_code"])
                for entry in answer["topics"]
                for partition in entry["partitions"]
            ] == [(topic, 7, -1, 3), ("no-such-topic", 0, -1, 3)]  # UNKNOWN_TOPIC_OR_PARTITION
    # Backwards changes nothing: the low watermark stays where it is.
    (future,) = admin.delete_records([TopicPartition(topic, 0, 2)], request_timeout=TIMEOUT_S).values()
    assert future.result(TIMEOUT_S).low_watermark == 4

    # kafka-python: -1 is the high watermark (everything in partition 1 goes).
    kp_admin = kafka_admin.KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=TIMEOUT_S * 1000)
    try:
        answer = kp_admin.delete_records({kafka.TopicPartition(topic, 1): -1})
    finally:
        kp_admin.close()
    ((_, deleted),) = answer.items()
    assert deleted["low_watermark"] == 10

    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "dr-earliest", "auto.offset.reset": "earliest"}
    )
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), TIMEOUT_S)
        assert (low, high) == (4, 10)
        assert consumer.get_watermark_offsets(TopicPartition(topic, 1), TIMEOUT_S) == (10, 10)
        consumer.subscribe([topic])
        found: list[tuple[int, int, bytes | None]] = []
        deadline = time.monotonic() + TIMEOUT_S
        while len(found) < 6 and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            found.append((message.partition(), message.offset(), message.value()))
    finally:
        consumer.close()
    assert found == [(0, offset, records[offset][1]) for offset in range(4, 10)]
