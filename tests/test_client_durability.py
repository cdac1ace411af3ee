"""The client through server crashes: kill -9 of the server during durable produce loses
no acknowledged message (and the idempotent producer writes nothing twice), and a
replayed batch with the same producer id, epoch and sequence is answered with its
original offsets, also after the server restarted."""

from __future__ import annotations

import threading
import time

from nodi.broker import Client
from nodi.storage.records import NewRecord, build_batch


def restart(broker_factory, old, data_dir: str):
    """A new server on the same data directory and port."""
    process = broker_factory(data_dir)
    process.port = old.port
    return process.start()


def read_all(client, topic: str, partition: int) -> list:
    out = []
    end = client.list_offsets(topic, partition, "latest")
    offset = 0
    while offset < end:
        messages, offset = client.fetch_with_position(topic, partition, offset, bytes_max=4 << 20)
        out.extend(messages)
    return out


def test_kill_9_during_durable_produce_loses_no_acknowledged_message(broker_factory, tmp_path) -> None:
    data_dir = str(tmp_path / "crash")
    process = broker_factory(data_dir).start()
    with Client(process.address, timeout_ms=5_000, reconnect_backoff_max_ms=200) as client:
        client.create_topic("crash", 3)
        producer = client.producer(linger_ms=2, delivery_timeout_ms=60_000)
        futures: list = []
        stop = threading.Event()

        def produce() -> None:
            number = 0
            while not stop.is_set():
                futures.append(producer.send("crash", f"message-{number}".encode() + b"." * 200))
                number += 1
                if number % 500 == 0:
                    time.sleep(0.001)  # let the loop breathe; the server is what we kill

        thread = threading.Thread(target=produce)
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while sum(1 for future in list(futures) if future.done()) < 2_000 and time.monotonic() < deadline:
                time.sleep(0.01)
            process.kill()  # SIGKILL, with batches in flight
            acknowledged_before = [future.result() for future in list(futures) if future.done()]
            process = restart(broker_factory, process, data_dir)
            time.sleep(0.3)  # the producer reconnects and carries on
        finally:
            stop.set()
            thread.join(30)
        producer.flush(timeout_ms=60_000)
        producer.close()
        assert len(acknowledged_before) >= 2_000
        values = {}
        for future_index, future in enumerate(futures):
            partition, offset = future.result()  # every message was acknowledged in the end
            values[(partition, offset)] = f"message-{future_index}".encode() + b"." * 200
        logged = {}
        for partition in range(3):
            for message in read_all(client, "crash", partition):
                logged[(partition, message.offset)] = message.value
        for key in acknowledged_before:
            assert logged[key] == values[key]  # acknowledged before the crash, still there
        assert logged == values  # and nothing was written twice


def test_a_replayed_batch_gets_its_original_offsets_also_after_a_restart(broker_factory, tmp_path):
    data_dir = str(tmp_path / "replay")
    process = broker_factory(data_dir).start()
    with Client(process.address, timeout_ms=10_000, reconnect_backoff_max_ms=200) as client:
        client.create_topic("replay")
        assert client.produce("replay", b"before") == (0, 0)
        producer_id, epoch = client.init_producer_id()

        def batch(values: list[bytes], sequence: int) -> bytes:
            records = [NewRecord(None, value) for value in values]
            return build_batch(records, producer_id=producer_id, producer_epoch=epoch, base_sequence=sequence)

        def offsets(data: bytes) -> tuple[int, int]:
            response = client.produce_batch("replay", 0, data)
            return response.base_offset, response.last_offset

        first, second = batch([b"a0", b"a1", b"a2"], 0), batch([b"b0", b"b1"], 3)
        assert offsets(first) == (1, 3)
        assert offsets(first) == (1, 3)  # a duplicate: the original offsets, nothing written
        assert offsets(second) == (4, 5)
        assert offsets(first) == (1, 3)
        process.kill()  # a crash: the producer state comes back from the log
        process = restart(broker_factory, process, data_dir)
        client.list_topics()  # a read: reconnects
        assert offsets(first) == (1, 3)
        assert offsets(second) == (4, 5)
        assert offsets(batch([b"c0"], 5)) == (6, 6)
        process.stop()  # a clean restart too
        process = restart(broker_factory, process, data_dir)
        client.list_topics()
        assert offsets(second) == (4, 5)
        assert [message.value for message in read_all(client, "replay", 0)] == [
            b"before",
            b"a0",
            b"a1",
            b"a2",
            b"b0",
            b"b1",
            b"c0",
        ]
