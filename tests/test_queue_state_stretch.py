"""encode_partition writes the first deliveries of a take (offsets whose pending entry
is their LeaseRun) as a stretch of entries encoded once and sliced. Its bytes must be
exactly those of the one-entry-at-a-time encoding it replaced, whatever happened to the
window: held here against that encoding (written out below) through random takes,
settles, extensions, releases, skips and lease expiries."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodi.broker.protocol.errors import ErrorCode, ProtocolError
from nodi.broker.protocol.queue_settings import QueueLimits, QueueSettings
from nodi.broker.server.queue_state import _settings_json, decode_partition, encode_partition
from nodi.broker.server.queues import DeliveryState, PartitionQueue

_HEADER = struct.Struct(">BqqqI")
_COUNT = struct.Struct(">I")
_ENTRY = struct.Struct(">qIqqqBH")


def encode_one_at_a_time(queue: PartitionQueue) -> bytes:
    """The queue_state value as encoded before stretches: every pending entry packed
    from its delivery's fields (a run standing for a first delivery reads as one)."""
    settings_json = _settings_json(queue.settings)
    reserved = max(queue.reserved_offset, queue.next_offset)
    parts = [
        _HEADER.pack(2, queue.floor, queue.next_offset, reserved, len(settings_json)),
        settings_json,
        _COUNT.pack(len(queue.pending)),
    ]
    for offset in sorted(queue.pending):
        delivery = queue.pending[offset]
        leased = delivery.state is DeliveryState.LEASED
        not_before = delivery.lease_deadline_ms if leased else delivery.not_before_ms
        error = delivery.last_error.encode("utf-8")
        parts.append(
            _ENTRY.pack(
                offset,
                delivery.delivery_count,
                delivery.first_delivery_ms,
                delivery.last_delivery_ms,
                not_before,
                delivery.reason,
                len(error),
            )
        )
        parts.append(error)
    return b"".join(parts)


def make_queue() -> PartitionQueue:
    queue = PartitionQueue(0, QueueSettings(ack_wait_ms=100, max_deliveries=4), QueueLimits(window_messages_max=80))
    queue.set_log_bounds(0, 200)
    return queue


def test_a_take_then_acks_from_the_front_is_its_stretch_sliced() -> None:
    queue = make_queue()
    queue.take(50, 1_000)
    queue.take(30, 1_005)
    first = encode_partition(queue)
    assert first == encode_one_at_a_time(queue)
    queue.ack_run(0, 20, 1)
    assert encode_partition(queue) == encode_one_at_a_time(queue)
    queue.ack(60, 1)  # a hole in the second take's offsets: that run entry by entry
    queue.nack(25, 1, 1_010, delay_ms=5, error="down")
    assert encode_partition(queue) == encode_one_at_a_time(queue)
    decoded = decode_partition(encode_partition(queue))
    assert [d.offset for d in decoded.deliveries] == sorted(queue.pending)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["take", "ack", "ack_run", "nack", "extend", "release", "reject", "skip", "defer", "expire", "tick"]
            ),
            st.integers(0, 79),
            st.integers(1, 25),
        ),
        max_size=50,
    )
)
def test_the_encoding_is_byte_for_byte_the_one_entry_at_a_time_encoding(operations) -> None:
    queue = make_queue()
    now = 1_000
    for action, offset, amount in operations:
        entry = queue.pending.get(offset)
        count = entry.delivery_count if entry is not None else 1
        try:
            if action == "take":
                queue.take(amount, now)
            elif action == "tick":
                now += amount * 10
                queue.tick(now)
            elif action == "ack":
                queue.ack(offset, count)
            elif action == "ack_run":
                queue.ack_run(offset, amount, count)
            elif action == "nack":
                queue.nack(offset, count, now, delay_ms=amount, error=f"error {amount}")
            elif action == "extend":
                queue.in_progress(offset, count, now)
            elif action == "release":
                queue.release(offset, count)
            elif action == "reject":
                queue.reject(offset, count, reason="bad")
            elif action == "skip":
                queue.skip(offset)
            elif action == "defer":
                queue.defer(offset, count, now + amount)
            elif action == "expire":
                queue.expire(offset, count)
        except ProtocolError:
            pass  # a settle the queue refuses (never delivered, settled, stale)
        encoded = encode_partition(queue)
        assert encoded == encode_one_at_a_time(queue)
        assert [d.offset for d in decode_partition(encoded).deliveries] == sorted(queue.pending)


def test_an_ack_run_over_a_hole_in_a_take_acks_only_its_first_deliveries() -> None:
    """A take's offsets with one below acked and one in the middle delivered again: an
    ack of delivery 1 over the hole acks the first deliveries around it and is stale for
    the redelivered one, which stays pending (the run's offsets are no longer a whole
    stretch, so they are acked one at a time)."""
    queue = make_queue()
    queue.take(10, 1_000)
    queue.ack(1, 1)
    queue.nack(5, 1, 1_000, delay_ms=0)
    assert [(t.offset, t.delivery_count) for t in queue.take(1, 1_001)] == [(5, 2)]
    outcomes = queue.ack_run(3, 5, 1)
    assert outcomes == [[3, ErrorCode.NONE, 2], [5, ErrorCode.STALE_DELIVERY, 1], [6, ErrorCode.NONE, 2]]
    assert [offset for offset in range(10) if offset in queue.pending] == [0, 2, 5, 8, 9]
    assert queue.leased == 5  # 0, 2, 8 and 9 as taken, and 5 delivered again
    assert encode_partition(queue) == encode_one_at_a_time(queue)
