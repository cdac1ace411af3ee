"""Publish dedup against a real server (broker/server/dedup.py): an idempotency key seen on a
topic within its window is not written again and the produce is answered with the
original (partition, offset); across producer retries, mixed batches, acks levels, the
idempotent producer and a broker restart. Windows are small or large on purpose; no
timing is asserted."""

from __future__ import annotations

import contextlib
import time

import pytest

from nodi.broker import Client
from nodi.broker.client.errors import PartlyDuplicate
from nodi.broker.protocol.headers import IDEMPOTENCY_KEY
from nodi.storage.records import Compression, NewRecord, build_batch

from conftest import BrokerProcess, advance_clock_file

WAIT_S = 30


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """The module's one server for every test here, on the test-only clock: a window
    runs out by advance_clock(), not by sleeping."""
    directory = tmp_path_factory.mktemp("publish_dedup")
    process = BrokerProcess(str(directory / "data"), clock_file=str(directory / "clock")).start()
    yield process
    if process.process is not None:
        process.stop()


def values(client: Client, topic: str, partitions: int = 1) -> list[tuple[int, int, bytes | None]]:
    out = []
    for partition in range(partitions):
        for message in client.fetch(topic, partition, 0, include_expired=True):
            out.append((partition, message.offset, message.value))
    return out


def settled(client: Client, topic: str, count: int, partitions: int = 1) -> list[tuple[int, int, bytes | None]]:
    """values() once `count` messages are readable (acks written: reads end at the
    durable offset), or after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    found = values(client, topic, partitions)
    while len(found) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        found = values(client, topic, partitions)
    return found


def keyed(value: bytes, key: str | None) -> NewRecord:
    headers = [] if key is None else [(IDEMPOTENCY_KEY, key.encode())]
    return NewRecord(None, value, headers)


def test_a_retried_produce_gets_the_original_offset(broker):
    with Client(broker.address) as client:
        client.create_topic("orders", partitions=3)
        first = client.produce("orders", b"one", idempotency_key="order-1")
        # The retry lands on another partition and carries another value: still a duplicate.
        other = (first[0] + 1) % 3
        again = client.produce("orders", b"one, again", idempotency_key="order-1", partition=other)
        assert again == first
        assert client.produce("orders", b"two", idempotency_key="order-2", acks="written")[1] >= 0
        assert client.produce("orders", b"one", idempotency_key=b"order-1", acks="written") == first
        stored = [value for _, _, value in settled(client, "orders", 2, 3)]
        assert sorted(stored) == [b"one", b"two"]


@pytest.mark.parametrize("idempotent", [True, False])
@pytest.mark.parametrize("acks", ["written", "durable"])
def test_a_batch_mixing_seen_and_new_keys_writes_each_record_once(broker, idempotent, acks):
    topic = f"mixed-{acks}-{idempotent}"
    with Client(broker.address) as client:
        client.create_topic(topic)
        seen = client.produce(topic, b"a", idempotency_key="a")
        with client.producer(linger_ms=200, idempotent=idempotent, acks=acks) as producer:
            futures = [
                producer.send(topic, b"a again", idempotency_key="a"),
                producer.send(topic, b"c", idempotency_key="c"),
                producer.send(topic, b"no key"),
                producer.send(topic, b"c repeated", idempotency_key="c"),
                producer.send(topic, b"d", idempotency_key="d"),
            ]
            producer.flush()
            results = [future.result(timeout=WAIT_S) for future in futures]
            # The batch after it on the same partition is restamped and written once.
            after = producer.send(topic, b"after", idempotency_key="e").result(timeout=WAIT_S)
        assert results[0] == seen
        assert results[1] == results[3]
        assert len({results[1], results[2], results[4], after}) == 4
        stored = settled(client, topic, 5)
        assert [value for _, _, value in stored] == [b"a", b"c", b"no key", b"d", b"after"]
        by_value = {value: (partition, offset) for partition, offset, value in stored}
        assert by_value[b"c"] == results[1] and by_value[b"d"] == results[4] and by_value[b"no key"] == results[2]


def test_acks_none_writes_each_key_once(broker):
    with Client(broker.address) as client:
        client.create_topic("fire")
        client.produce("fire", b"x", idempotency_key="x", acks="none")
        with client.producer(linger_ms=100, idempotent=False, acks="none") as producer:
            for value, key in ((b"x again", "x"), (b"y", "y"), (b"y again", "y")):
                producer.send("fire", value, idempotency_key=key)
            producer.flush()
        assert [value for _, _, value in settled(client, "fire", 2)] == [b"x", b"y"]


def test_raw_batches_are_answered_per_record(broker):
    with Client(broker.address) as client:
        client.create_topic("raw")
        original = client.produce("raw", b"k1", idempotency_key="k1")
        all_seen = client.produce_batch("raw", 0, build_batch([keyed(b"dup", "k1")]))
        assert [(d.index, d.partition, d.offset) for d in all_seen.duplicates] == [(0, *original)]
        assert all_seen.base_offset == -1
        with pytest.raises(PartlyDuplicate) as raised:
            client.produce_batch("raw", 0, build_batch([keyed(b"new", "k2"), keyed(b"dup", "k1")]))
        assert [(d.index, d.partition, d.offset) for d in raised.value.duplicates] == [(1, *original)]
        assert [value for _, _, value in values(client, "raw")] == [b"k1"]  # nothing written
        # A compressed batch is never decoded for dedup: written as sent (documented).
        gzip = build_batch([keyed(b"gzip dup", "k1")], compression=Compression.GZIP)
        assert client.produce_batch("raw", 0, gzip).base_offset == 1
        # nodi's producer sends keyed batches uncompressed, so they are deduplicated.
        with client.producer(compression="gzip") as producer:
            assert producer.send("raw", b"dup", idempotency_key="k1").result(timeout=WAIT_S) == original


def test_a_key_behind_header_free_batches_is_still_found(broker):
    """The broker skips its search only when no record carries a header: header-free
    batches, then a batch whose last record alone holds the key, are deduplicated as one
    request; header-free requests are written every time."""
    plain = build_batch([NewRecord(None, b"p" * 1024) for _ in range(20)])
    late = build_batch([keyed(b"a", None), keyed(b"bb", None), keyed(b"late", "late-key")])
    with Client(broker.address) as client:
        client.create_topic("behind")
        first = client.produce_batch("behind", 0, plain + plain + late)
        assert (first.base_offset, first.last_offset) == (0, 42)
        with pytest.raises(PartlyDuplicate) as raised:
            client.produce_batch("behind", 0, plain + late)
        assert [(d.index, d.partition, d.offset) for d in raised.value.duplicates] == [(22, 0, 42)]
        assert client.produce_batch("behind", 0, plain).base_offset == 43
        assert client.produce_batch("behind", 0, plain, acks="written").base_offset == 63
        assert len(settled(client, "behind", 83)) == 83


def test_keys_outside_the_window_are_written_again(broker):
    with Client(broker.address) as client:
        client.create_topic("short", dedup_window_ms=200)
        client.create_topic("off", dedup_window_ms=0)
        assert client.describe_topic("short").settings.dedup_window_ms == 200
        first = client.produce("short", b"1", idempotency_key="k")
        assert client.produce("off", b"1", idempotency_key="k") != client.produce("off", b"2", idempotency_key="k")
        broker.advance_clock(600)  # three windows: the key has expired
        second = client.produce("short", b"2", idempotency_key="k")
        assert second[1] == first[1] + 1
        assert [value for _, _, value in values(client, "short")] == [b"1", b"2"]


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_dedup_survives_a_broker_restart_within_the_window(broker_factory, tmp_path, how):
    data_dir = str(tmp_path / "data")
    clock_file = str(tmp_path / "clock")
    broker = broker_factory(data_dir)
    broker.clock_file = clock_file
    broker.start()
    with Client(broker.address) as client:
        client.create_topic("durable", partitions=2, dedup_window_ms=600_000)
        client.create_topic("brief", dedup_window_ms=300)
        originals = [client.produce("durable", f"v{i}", idempotency_key=f"key-{i}") for i in range(20)]
        client.produce("brief", b"1", idempotency_key="k")
    broker.stop() if how == "stop" else broker.kill()
    advance_clock_file(clock_file, 600)  # the brief topic's window passes while the broker is down
    broker = broker_factory(data_dir)
    broker.clock_file = clock_file
    broker.start()
    with Client(broker.address) as client:
        for i, original in enumerate(originals):
            assert client.produce("durable", b"again", idempotency_key=f"key-{i}") == original
        assert client.produce("brief", b"2", idempotency_key="k")[1] == 1
        assert sorted(value for _, _, value in values(client, "durable", 2)) == sorted(
            f"v{i}".encode() for i in range(20)
        )
    broker.stop()


def test_reserved_headers_are_refused_from_users(broker):
    with Client(broker.address) as client:
        client.create_topic("plain")
        with pytest.raises(ValueError, match="reserved prefix"):
            client.produce("plain", b"x", headers={IDEMPOTENCY_KEY: b"sneaky"})
        with client.producer() as producer, pytest.raises(ValueError, match="reserved prefix"):
            producer.send("plain", b"x", headers=[("nodi-ttl-ms", b"5")])
        with pytest.raises(ValueError, match="not both"):
            client.produce("plain", b"x", delay_ms=5, deliver_at=__import__("datetime").datetime.now())
        with pytest.raises(ValueError):
            client.produce("plain", b"x", idempotency_key="")
        assert values(client, "plain") == []


def test_every_reserved_header_is_documented():
    from pathlib import Path

    from nodi.broker.protocol import headers

    guarantees = (Path(__file__).resolve().parent.parent / "docs" / "guarantees.md").read_text()
    names = [
        value
        for name, value in vars(headers).items()
        if name.isupper()
        and isinstance(value, str)
        and value.startswith(headers.RESERVED_PREFIX)
        and value != headers.RESERVED_PREFIX
    ]
    assert len(names) >= 16
    for name in names:
        assert f"| `{name}` |" in guarantees, name


def test_many_batches_in_flight_with_duplicates_keep_order_and_write_each_key_once(broker):
    with Client(broker.address) as client:
        client.create_topic("stream")
        seen = {f"k{i}": client.produce("stream", f"first {i}", idempotency_key=f"k{i}") for i in range(0, 300, 7)}
        with client.producer(linger_ms=1, batch_bytes_max=2_048, max_in_flight=16) as producer:
            futures = {
                f"k{i}": producer.send("stream", f"v{i}".encode() * 20, idempotency_key=f"k{i}") for i in range(300)
            }
            producer.flush()
            results = {key: future.result(timeout=WAIT_S) for key, future in futures.items()}
        for key, original in seen.items():
            assert results[key] == original
        stored = settled(client, "stream", 300)
        offsets = {offset: value for _, offset, value in stored}
        assert len(stored) == 300  # 43 first copies + 257 new ones, none twice
        new = [i for i in range(300) if f"k{i}" not in seen]
        assert [offsets[results[f"k{i}"][1]] for i in new] == [f"v{i}".encode() * 20 for i in new]
        order = [results[f"k{i}"][1] for i in new]
        assert order == sorted(order), [(i, results[f"k{i}"][1]) for i in new][:60]  # send order


def test_resending_everything_after_a_crash_mid_stream_writes_each_key_once(broker_factory, tmp_path):
    """The application's retry after kill -9 of the broker: every key sent again, the
    ones the log kept are deduplicated (read back at start), the others written."""
    data_dir = str(tmp_path / "crash")
    broker = broker_factory(data_dir).start()
    total = 600
    with Client(broker.address, timeout_ms=5_000) as client:
        client.create_topic("ledger", partitions=2, dedup_window_ms=600_000)
        with client.producer(linger_ms=2, acks="written", delivery_timeout_ms=1_000) as producer:
            first = None
            for i in range(total):
                future = producer.send("ledger", f"entry {i}", idempotency_key=f"entry-{i}")
                first = first or future
                if i == total // 2:  # batches in flight: some written, some not
                    first.result(timeout=WAIT_S)
                    broker.kill()
            with contextlib.suppress(Exception):
                producer.flush(timeout_ms=3_000)
    broker = broker_factory(data_dir).start()
    with Client(broker.address) as client:
        kept = sum(p.high_watermark for p in client.describe_topic("ledger").partitions)
        assert 0 < kept < total  # the crash came mid-stream
        with client.producer() as producer:
            futures = [producer.send("ledger", f"entry {i}", idempotency_key=f"entry-{i}") for i in range(total)]
            producer.flush()
            results = [future.result(timeout=WAIT_S) for future in futures]
        stored = settled(client, "ledger", total, 2)
        assert sorted(value for _, _, value in stored) == sorted(f"entry {i}".encode() for i in range(total))
        by_value = {value: (partition, offset) for partition, offset, value in stored}
        assert results == [by_value[f"entry {i}".encode()] for i in range(total)]
    broker.stop()


def test_metrics_count_duplicates_and_not_their_bytes(tmp_path):
    from test_ops_metrics import scrape, total

    process = BrokerProcess(str(tmp_path / "metrics"), metrics=True).start()
    try:
        with Client(process.address) as client:
            client.create_topic("counted")
            client.produce("counted", b"v", idempotency_key="k")
            for _ in range(3):
                client.produce("counted", b"v", idempotency_key="k")
            with client.producer(linger_ms=100) as producer:
                producer.send("counted", b"v", idempotency_key="k")
                producer.send("counted", b"w", idempotency_key="j")
        samples = scrape(process.metrics_port)
        assert total(samples, "nodi_dedup_duplicates_total") == 4
        assert total(samples, "nodi_dedup_partly_duplicate_requests_total") == 1
        assert total(samples, "nodi_dedup_keys") == 2
        assert total(samples, "nodi_messages_in_total", topic="counted") == 2
    finally:
        process.stop()
