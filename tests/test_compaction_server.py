"""Compaction in a real `nodi serve`: produce refuses keyless records on compacted
topics (KEY_REQUIRED); `nodi compact TOPIC` online and `nodi compact --data-dir DIR
TOPIC` offline leave each key's latest value at its original offset; a consumer reading
through a compaction sees every key's latest value; the background job compacts once the
dirty ratio passes the threshold, and the metrics say so."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import pytest

from nodi.broker import Client, Message
from nodi.broker.client.errors import InvalidConfig, KeyRequired
from nodi.storage.records import NewRecord, build_batch

from conftest import NODI, BrokerProcess

KEYS = 60
BATCHES = 40
RECORDS_PER_BATCH = 25
SEGMENT_BYTES = 4096
WAIT_TIMEOUT_S = 60


def _batch(number: int) -> tuple[bytes, list[tuple[bytes, bytes | None]]]:
    records = []
    for index in range(RECORDS_PER_BATCH):
        serial = number * RECORDS_PER_BATCH + index
        key = b"key-%d" % (serial * 7 % KEYS)
        value = None if serial % 97 == 13 else b"value-%d" % serial
        records.append((key, value))
    return build_batch([NewRecord(key, value) for key, value in records]), records


def _produce_all(client: Client, topic: str, first: int = 0, count: int = BATCHES) -> dict[bytes, bytes | None]:
    latest: dict[bytes, bytes | None] = {}
    for number in range(first, first + count):
        batch, records = _batch(number)
        client.produce_batch(topic, 0, batch)
        latest.update(records)
    return latest


def _read_all(client: Client, topic: str, bytes_max: int = 1 << 20) -> list[Message]:
    messages: list[Message] = []
    offset = 0
    while True:
        batch, offset_after = client.fetch_with_position(topic, 0, offset, bytes_max=bytes_max)
        if not batch and offset_after == offset:
            return messages
        messages.extend(batch)
        offset = offset_after


def _expected(latest: dict[bytes, bytes | None]) -> dict[bytes, bytes | None]:
    # Tombstones stay (delete_retention_ms is a day): the latest record of every key.
    return dict(latest)


def _check_compacted(messages: list, latest: dict[bytes, bytes | None]) -> None:
    offsets = [message.offset for message in messages]
    assert offsets == sorted(set(offsets))  # order kept, nothing twice
    keys = [message.key for message in messages]
    assert len(keys) == len(set(keys)), "a key appears twice after compaction"
    assert {message.key: message.value for message in messages} == _expected(latest)


def _nodi(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(NODI + list(arguments), capture_output=True, text=True, timeout=120)


def _create(client: Client, topic: str) -> None:
    client.create_topic(topic, 1, cleanup_policy="compact", segment_bytes=SEGMENT_BYTES)


def test_keyless_records_refused_and_compact_online_then_offline(tmp_path):
    broker = BrokerProcess(str(tmp_path / "data")).start()
    try:
        with Client(broker.address) as client:
            _create(client, "users")
            client.create_topic("plain", 1)
            with pytest.raises(KeyRequired):
                client.produce("users", b"no key")
            client.produce("plain", b"no key is fine here")
            latest = _produce_all(client, "users")
            with pytest.raises(InvalidConfig):
                client.compact_topic("plain")
            before = client.describe_topic("users").partitions[0].size

        refused = _nodi("--server", broker.address, "compact", "plain")
        assert refused.returncode == 1 and "InvalidConfig" in refused.stderr, refused.stderr
        done = _nodi("--server", broker.address, "compact", "users", "--json")
        assert done.returncode == 0, done.stderr
        (report,) = [json.loads(line) for line in done.stdout.splitlines()]
        assert report["partition"] == 0
        assert report["records_removed"] > 0 and report["bytes_reclaimed"] > 0

        with Client(broker.address) as client:
            _check_compacted(_read_all(client, "users"), latest)
            assert client.describe_topic("users").partitions[0].size < before
            latest.update(_produce_all(client, "users", BATCHES, 10))  # more overwrites for the offline run
        assert broker.stop() == 0

        offline = _nodi("compact", "users", "--data-dir", str(tmp_path / "data"))
        assert offline.returncode == 0, offline.stderr
        assert "records removed" in offline.stdout
        for topic, reason in (("nosuch", "no topic"), ("plain", "cleanup policy")):
            refused = _nodi("compact", topic, "--data-dir", str(tmp_path / "data"))
            assert refused.returncode == 1 and reason in refused.stderr, refused.stderr
        verify = _nodi("segments", "verify", str(tmp_path / "data"))
        assert verify.returncode == 0, verify.stdout + verify.stderr

        broker = BrokerProcess(str(tmp_path / "data")).start()
        with Client(broker.address) as client:
            _check_compacted(_read_all(client, "users"), latest)
    finally:
        if broker.process is not None:
            broker.stop()


def test_consumer_reading_through_a_compaction_sees_latest_values(tmp_path) -> None:
    broker = BrokerProcess(str(tmp_path / "data")).start()
    try:
        with Client(broker.address) as client:
            _create(client, "accounts")
            latest = _produce_all(client, "accounts", 0, BATCHES * 2)
        seen: dict[bytes | None, bytes | None] = {}  # keys are never None here: KeyRequired
        offsets: list[int] = []
        errors: list[BaseException] = []
        compacted = threading.Event()

        def consume() -> None:
            try:
                with Client(broker.address) as reader:
                    offset = 0
                    while True:
                        # Small fetches: the read spans the whole compaction.
                        batch, offset_after = reader.fetch_with_position("accounts", 0, offset, bytes_max=256)
                        for message in batch:
                            offsets.append(message.offset)
                            seen[message.key] = message.value
                        if not batch and offset_after == offset and compacted.is_set():
                            return
                        offset = offset_after
            except BaseException as error:  # reported by the test thread
                errors.append(error)

        reader = threading.Thread(target=consume)
        reader.start()
        with Client(broker.address) as client:
            (result,) = client.compact_topic("accounts", timeout_ms=WAIT_TIMEOUT_S * 1000)
            compacted.set()
        reader.join(WAIT_TIMEOUT_S)
        assert not reader.is_alive() and not errors, errors
        assert result.records_removed > 0
        assert offsets == sorted(set(offsets))
        assert seen == latest  # the latest value of every key, whatever was removed meanwhile
    finally:
        broker.stop()


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("nodi_compaction_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_background_job_compacts_past_the_dirty_ratio(tmp_path):
    config = tmp_path / "nodi.toml"
    config.write_text("[compaction]\ncheck_interval_ms = 100\ndirty_ratio_min = 0.5\n")
    broker = BrokerProcess(str(tmp_path / "data"), ["--config", str(config)], metrics=True).start()
    try:
        with Client(broker.address) as client:
            _create(client, "profiles")
            latest = _produce_all(client, "profiles")
            deadline = time.monotonic() + WAIT_TIMEOUT_S
            runs_key = 'nodi_compaction_runs_total{partition="0",topic="profiles"}'
            while time.monotonic() < deadline:
                metrics = _scrape(broker.metrics_port)
                if metrics.get(runs_key, 0) >= 1:
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"no background compaction within {WAIT_TIMEOUT_S} s: {metrics}")
            assert metrics['nodi_compaction_bytes_reclaimed_total{partition="0",topic="profiles"}'] > 0
            assert 0 <= metrics['nodi_compaction_dirty_ratio{partition="0",topic="profiles"}'] <= 1
            messages = _read_all(client, "profiles")
            offsets = [message.offset for message in messages]
            assert offsets == sorted(set(offsets))
            # The active segment was not compacted: the latest value of each key is there.
            assert {message.key: message.value for message in messages} == latest
    finally:
        broker.stop()
