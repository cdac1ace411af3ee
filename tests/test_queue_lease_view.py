"""The read-only view of a queue group's in-flight messages behind QueueLeases (the
console's "In flight" list, `nodi queue describe --leases`): what PartitionQueue.in_flight
lists and how each state goes on the wire. The request against a real broker is in
tests/test_console.py and tests/test_security.py."""

from __future__ import annotations

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.queue_settings import Backoff, QueueLimits, QueueSettings
from nodi.broker.server.queue_service import lease_to_wire
from nodi.broker.server.queues import PartitionQueue


def make_queue(end: int) -> PartitionQueue:
    settings = QueueSettings(ack_wait_ms=1_000, max_deliveries=2, backoff=Backoff.fixed([500]))
    queue = PartitionQueue(3, settings, QueueLimits())
    queue.set_log_bounds(0, end)
    return queue


def test_in_flight_lists_leases_retries_and_dead_letters_by_offset_and_pages() -> None:
    queue = make_queue(6)
    queue.take(4, now_ms=100)  # 0-3 leased until 1100; 4 and 5 never delivered
    queue.nack(1, 1, now_ms=200, error="db down")  # waits until 700
    queue.nack(2, 1, now_ms=200, delay_ms=0)  # due now
    queue.take(1, now_ms=200)  # 2 again: count 2
    queue.nack(2, 2, now_ms=300, error="still down")  # the last delivery: to be dead-lettered
    listed = [lease_to_wire(queue.partition, delivery) for delivery in queue.in_flight(-1, 10)]
    assert [(lease.offset, lease.state, lease.delivery_count) for lease in listed] == [
        (0, m.LeaseState.LEASED, 1),
        (1, m.LeaseState.WAITING, 1),
        (2, m.LeaseState.DEAD, 2),
        (3, m.LeaseState.LEASED, 1),
    ]
    leased, waiting, dead, _ = listed
    assert (leased.partition, leased.lease_deadline_ms, leased.not_before_ms, leased.last_delivery_ms) == (
        3,
        1_100,
        -1,
        100,
    )
    assert (waiting.lease_deadline_ms, waiting.not_before_ms, waiting.last_error) == (-1, 700, "db down")
    assert (dead.lease_deadline_ms, dead.not_before_ms, dead.last_error) == (-1, -1, "max-deliveries: still down")
    # Paging: after an offset, at most `limit`; the never-delivered 4 and 5 are not listed.
    assert [d.offset for d in queue.in_flight(0, 2)] == [1, 2]
    assert [d.offset for d in queue.in_flight(2, 10)] == [3]
    assert queue.in_flight(3, 10) == []
    # Listing changes nothing.
    assert [d.offset for d in queue.take(5, now_ms=300)] == [4, 5]
