"""The delivery reservation and the run encoding of queue groups against a real
`nodi serve`: first deliveries answered before their commit are counted once after a
kill -9 (and only then: a clean stop counts nothing twice), and settlements, deliveries
and results travel as runs of consecutive offsets."""

from __future__ import annotations

import time

from nodi.broker import Client
from nodi.broker.protocol import messages as m
from nodi.storage.records import NewRecord, build_batch

from conftest import received

WAIT_MS = 20_000  # generous: the machine is shared
ACK_WAIT_MS = 1_500  # leases held at a stop run out soon after the restart


def produce(client: Client, topic: str, count: int) -> None:
    client.produce_batch(topic, 0, build_batch([NewRecord(None, b"%d" % i) for i in range(count)]))


def receive_all(client: Client, topic: str, group: str, count: int) -> dict[int, int]:
    """offset -> delivery count of every message until `count` distinct ones came, each acked."""
    got: dict[int, int] = {}
    with client.queue(topic, group, ack_wait_ms=ACK_WAIT_MS, batch_max=count) as queue:
        deadline = time.monotonic() + WAIT_MS / 1000
        while len(got) < count and time.monotonic() < deadline:
            message = queue.receive(timeout_ms=1_000)
            assert message is not None
            if message is not None:
                got[message.offset] = message.delivery_count
                message.ack()
    return got


def hold_five_after_five(address: str, topic: str) -> None:
    """Produce 20; receive 0..4 and ack them (committed, the reservation with them), then
    receive 5..9 (answered before any commit) and hold them."""
    with Client(address) as client:
        client.create_topic(topic)
        produce(client, topic, 20)
        with client.queue(topic, "g", ack_wait_ms=ACK_WAIT_MS, batch_max=5, prefetch=False) as queue:
            for message in [received(queue.receive(timeout_ms=WAIT_MS)) for _ in range(5)]:
                message.ack()
            held = [received(queue.receive(timeout_ms=WAIT_MS)) for _ in range(5)]
            assert [(message.offset, message.delivery_count) for message in held] == [(o, 1) for o in range(5, 10)]


def test_a_kill_counts_reserved_offsets_as_delivered_once_and_a_clean_stop_counts_nothing_twice(
    broker_factory, tmp_path
) -> None:
    data_dir = str(tmp_path / "data")
    process = broker_factory(data_dir).start()
    hold_five_after_five(process.address, "clean")
    process.stop()  # SIGTERM: a clean stop commits the reservation cut back
    process = broker_factory(data_dir).start()
    with Client(process.address) as client:
        clean = receive_all(client, "clean", "g", 15)
    assert sorted(clean) == list(range(5, 20))
    assert all(clean[offset] == 2 for offset in range(5, 10)), clean  # held at the stop: their leases ran out
    assert all(clean[offset] == 1 for offset in range(10, 20)), clean  # never delivered

    hold_five_after_five(process.address, "killed")
    process.kill()  # SIGKILL: the reservation of "killed" is in doubt
    process = broker_factory(data_dir).start()
    with Client(process.address) as client:
        killed = receive_all(client, "killed", "g", 15)
    assert sorted(killed) == list(range(5, 20))  # none lost, no acked one again
    # 5..9 were seen once, 10..19 never: each counted as delivered once by the restart.
    assert all(count == 2 for count in killed.values()), killed
    process.stop()


def test_settlements_results_and_deliveries_travel_as_runs(broker) -> None:
    def call(client, request):
        return client._run(client._async._call(request, None), None)

    with Client(broker.address) as client:
        client.create_topic("runs")
        produce(client, "runs", 6)
        response = call(client, m.QueueReceiveRequest(group="g", topic="runs", messages_max=6, wait_ms=WAIT_MS))
        assert [(d.offset, d.count, d.delivery_count) for d in response.deliveries] == [(0, 6, 1)]
        # Offset 2 goes round again: the run's ack of 0..5 at delivery 1 is stale there.
        nack = call(
            client,
            m.QueueSettleRequest(
                group="g",
                topic="runs",
                settlements=[
                    m.Settlement(partition=0, offset=2, delivery_count=1, action=m.SettleAction.NACK, delay_ms=0)
                ],
            ),
        )
        assert nack.results[0].error_code is m.ErrorCode.NONE
        again = call(client, m.QueueReceiveRequest(group="g", topic="runs", messages_max=6, wait_ms=WAIT_MS))
        assert [(d.offset, d.count, d.delivery_count) for d in again.deliveries] == [(2, 1, 2)]
        acked = call(
            client,
            m.QueueSettleRequest(
                group="g",
                topic="runs",
                settlements=[
                    m.Settlement(partition=0, offset=0, delivery_count=1, action=m.SettleAction.ACK, count=6),
                    m.Settlement(partition=0, offset=0, delivery_count=1, action=m.SettleAction.ACK, count=0),
                ],
            ),
        )
        assert [(r.offset, r.count, r.error_code) for r in acked.results] == [
            (0, 2, m.ErrorCode.NONE),
            (2, 1, m.ErrorCode.STALE_DELIVERY),
            (3, 3, m.ErrorCode.NONE),
            (0, 1, m.ErrorCode.LIMIT_EXCEEDED),
        ]
        last = call(
            client,
            m.QueueSettleRequest(
                group="g",
                topic="runs",
                settlements=[m.Settlement(partition=0, offset=2, delivery_count=2, action=m.SettleAction.ACK)],
            ),
        )
        assert [(r.offset, r.count, r.error_code) for r in last.results] == [(2, 1, m.ErrorCode.NONE)]
        assert client.describe_queue("runs", "g").partitions[0].ack_floor == 6
