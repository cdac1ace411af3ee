"""Queue groups across real crashes: a consumer process killed with SIGKILL mid-lease,
and the broker killed with SIGKILL mid-stream and started again on its data directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from nodi.broker import Client, Message
from nodi.broker.client.errors import NodiClientError
from nodi.storage.records import NewRecord, build_batch

from conftest import BrokerProcess, received

WAIT_MS = 20_000

CHILD_CONSUMER = """
import sys, time
from nodi.broker import Client
client = Client(sys.argv[1])
queue = client.queue("tasks", "workers", ack_wait_ms=1_000, batch_max=5)
held = [queue.receive(timeout_ms=20_000) for _ in range(5)]
print(" ".join(str(m.offset) for m in held if m is not None), flush=True)
time.sleep(600)  # holds the leases until killed
"""


def produce(client: Client, topic: str, count: int, partitions: int = 1) -> None:
    for partition in range(partitions):
        for start in range(0, count, 500):
            records = [NewRecord(None, b"%d-%d" % (partition, i)) for i in range(start, min(start + 500, count))]
            client.produce_batch(topic, partition, build_batch(records))


def source_offset(letter: Message) -> bytes:
    value = letter.header("nodi-dlq-source-offset")
    assert value is not None, "a dead letter names its source offset"
    return value


def test_a_consumer_killed_mid_lease_has_its_messages_delivered_to_another(broker) -> None:
    with Client(broker.address) as client:
        client.create_topic("tasks")
        produce(client, "tasks", 8)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD_CONSUMER, broker.address], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None  # PIPE
        try:
            line = child.stdout.readline()
            held = sorted(int(offset) for offset in line.split())
            assert held == [0, 1, 2, 3, 4]
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(15)
            child.stdout.close()
        with client.queue("tasks", "workers") as queue:
            got: dict[int, int] = {}  # offset: delivery count
            deadline = time.monotonic() + WAIT_MS / 1000
            while len(got) < 8 and time.monotonic() < deadline:
                message = queue.receive(timeout_ms=1_000)
                if message is not None:
                    got[message.offset] = message.delivery_count
                    message.ack()
        assert sorted(got) == list(range(8))
        # The killed consumer's messages come again, once their leases ran out.
        assert {offset: got[offset] for offset in held} == {offset: 2 for offset in held}
        assert all(got[offset] == 1 for offset in range(5, 8))


def test_broker_kill_keeps_acks_redelivers_the_rest_and_keeps_delivery_counts(broker_factory, tmp_path) -> None:
    total = 3_000
    data_dir = str(tmp_path / "crash-data")
    process: BrokerProcess = broker_factory(data_dir).start()
    with Client(process.address) as client:
        client.create_topic("stream", partitions=2)
        produce(client, "stream", total // 2, partitions=2)

    confirmed: set[tuple[int, int]] = set()  # acks the broker answered
    in_doubt: set[tuple[int, int]] = set()  # acks sent, answer lost in the crash
    counts_before: dict[tuple[int, int], int] = {}  # the highest delivery count seen
    stop = threading.Event()

    def consume() -> None:
        try:
            with Client(process.address, timeout_ms=3_000, reconnect_attempts_max=1) as client:
                queue = client.queue("stream", "g", ack_wait_ms=1_500, batch_max=50)
                while not stop.is_set():
                    batch = []
                    for _ in range(50):
                        message = queue.receive(timeout_ms=200)
                        if message is None:
                            break
                        key = (message.partition, message.offset)
                        counts_before[key] = max(counts_before.get(key, 0), message.delivery_count)
                        batch.append(message)
                    for index, message in enumerate(batch):
                        if index % 5 == 4:
                            message.nack(delay_ms=0, wait=False)  # some go round again
                        else:
                            message.ack(wait=False)
                            in_doubt.add((message.partition, message.offset))
                    queue.flush()
                    confirmed.update((m.partition, m.offset) for i, m in enumerate(batch) if i % 5 != 4)
        except (NodiClientError, OSError):
            pass  # the broker was killed under it

    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 60
    while len(confirmed) < total // 3 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    assert len(confirmed) >= total // 3
    process.kill()  # SIGKILL, mid-stream
    stop.set()
    thread.join(60)
    assert not thread.is_alive()

    restarted = broker_factory(data_dir).start()
    after: dict[tuple[int, int], int] = {}
    with Client(restarted.address) as client, client.queue("stream", "g", batch_max=200) as queue:
        deadline = time.monotonic() + 90
        idle = 0
        while idle < 3 and time.monotonic() < deadline:
            message = queue.receive(timeout_ms=1_000)
            if message is None:
                if len(confirmed | in_doubt | set(after)) >= total:
                    idle += 1
                continue
            key = (message.partition, message.offset)
            assert key not in confirmed, f"{key} was acked before the crash, and delivered again"
            assert key not in after, f"{key} delivered twice after the restart without a nack"
            after[key] = message.delivery_count
            message.ack(wait=False)
        queue.flush()
        state = client.describe_queue("stream", "g")
    assert [p.ack_floor for p in state.partitions] == [total // 2] * 2  # everything done
    everything = {(p, o) for p in range(2) for o in range(total // 2)}
    # None lost: each was acked before the crash, or delivered after it, or its ack was
    # on the wire at the crash (and then recorded, or it would have come again).
    assert everything - confirmed - set(after) <= in_doubt - confirmed
    kept = [key for key in after if key in counts_before]
    assert kept  # some were delivered and not acked before the crash
    for key in kept:
        assert after[key] > counts_before[key], (key, counts_before[key], after[key])
    restarted.stop()


def test_rejects_answered_before_a_broker_kill_all_reach_the_dead_letter_topic(broker_factory, tmp_path) -> None:
    count = 200
    data_dir = str(tmp_path / "dlq-crash")
    process: BrokerProcess = broker_factory(data_dir).start()
    with Client(process.address) as client:
        client.create_topic("work")
        produce(client, "work", count)
        with client.queue("work", "g", batch_max=count, ack_wait_ms=60_000, max_outstanding=count) as queue:
            held = [received(queue.receive(timeout_ms=WAIT_MS)) for _ in range(count)]
            for message in held:
                message.reject("bad", wait=False)
            queue.flush()  # every reject answered: recorded durably
            process.kill()  # the dead-letter writer may be anywhere in its work
    restarted = broker_factory(data_dir).start()
    with Client(restarted.address) as client:
        deadline = time.monotonic() + WAIT_MS / 1000
        while True:
            state = client.describe_queue("work", "g")
            if state.partitions[0].ack_floor == count or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert state.partitions[0].ack_floor == count
        letters = []
        offset = 0
        while True:
            batch = client.fetch("work.dlq", 0, offset)
            if not batch:
                break
            letters += batch
            offset = batch[-1].offset + 1
        sources = [int(source_offset(letter)) for letter in letters]
        assert set(sources) == set(range(count))  # none lost; a repeat is allowed
    restarted.stop()


def test_a_broker_kill_with_split_lease_runs_in_flight_loses_nothing_and_acks_nothing_twice(
    broker_factory, tmp_path
) -> None:
    """Leases are kept as runs: one receive's run is split by acks of part of it, a nack
    in its middle and an extension of a part, then the broker is killed with the rest
    still leased. After the restart every message not acked comes again, none acked
    comes again, and each comes with a delivery count above the one seen before."""
    total = 400
    data_dir = str(tmp_path / "runs-crash")
    process: BrokerProcess = broker_factory(data_dir).start()
    acked: set[int] = set()
    seen: dict[int, int] = {}
    with Client(process.address) as client:
        client.create_topic("runs")
        produce(client, "runs", total)
        with client.queue("runs", "g", batch_max=100, max_outstanding=total, ack_wait_ms=2_000) as queue:
            for _ in range(total // 100):
                batch = queue.receive_batch(100, timeout_ms=WAIT_MS)
                assert len(batch) == 100
                for message in batch:
                    seen[message.offset] = message.delivery_count
                for index, message in enumerate(batch):
                    if index < 30 or 60 <= index < 70:  # acks of two parts of the run
                        assert message.ack() is True
                        acked.add(message.offset)
                    elif index == 45:  # a nack in the middle, after a long delay
                        assert message.nack(delay_ms=600_000) is True
                    elif 50 <= index < 60:  # a part extended: a run of its own
                        assert message.in_progress() is not None
                # the rest stay leased (in the receive's run, or extended by the lease
                # keeper) and unsettled at the kill: after the restart they come again once
                # their lease (2 s) would have run out
            process.kill()
    restarted = broker_factory(data_dir).start()
    after: dict[int, int] = {}
    with Client(restarted.address) as client:
        with client.queue("runs", "g", batch_max=100, max_outstanding=400) as queue:
            deadline = time.monotonic() + 60
            while len(after) < total - len(acked) - total // 100 and time.monotonic() < deadline:
                for message in queue.receive_batch(100, timeout_ms=1_000):
                    assert message.offset not in acked, f"offset {message.offset} acked, then delivered again"
                    assert message.offset not in after, f"offset {message.offset} delivered twice after the restart"
                    after[message.offset] = message.delivery_count
                    message.ack(wait=False)
            queue.flush()
        state = client.describe_queue("runs", "g")
    nacked = {start + 45 for start in range(0, total, 100)}  # not due for ten minutes
    assert set(after) == set(range(total)) - acked - nacked
    assert all(after[offset] > seen[offset] for offset in after)
    assert state.partitions[0].pending == len(nacked)
    restarted.stop()
