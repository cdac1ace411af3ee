"""The queue-group state machine (broker/server/queues.py), its settings and its persisted codec,
driven with explicit times: no sleeping, no server."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodi.broker.protocol.errors import ErrorCode, ProtocolError
from nodi.broker.protocol.queue_settings import Backoff, QueueLimits, QueueSettings, cut_text
from nodi.broker.server.queue_group import QueueGroup
from nodi.broker.server.queue_state import QueueStateError, decode_partition, encode_partition, state_bytes_max
from nodi.broker.server.queues import DeadLetterReason, PartitionQueue, SettleAction
from nodi.storage.errors import InvalidConfigError

NO_BACKOFF = Backoff.fixed([0])


def make_queue(end: int = 100, *, window: int = 10_000, **overrides) -> PartitionQueue:
    options = {"ack_wait_ms": 1_000, "max_deliveries": 3, "backoff": NO_BACKOFF, **overrides}
    queue = PartitionQueue(0, QueueSettings(**options), QueueLimits(window_messages_max=window))
    queue.set_log_bounds(0, end)
    return queue


def offsets(taken) -> list[int]:
    return [t.offset for t in taken]


def test_receive_leases_in_offset_order_and_ack_moves_the_floor() -> None:
    queue = make_queue(10)
    taken = queue.take(4, now_ms=0)
    assert offsets(taken) == [0, 1, 2, 3]
    assert all(t.delivery_count == 1 and t.lease_deadline_ms == 1_000 for t in taken)
    queue.ack(1, 1)
    assert queue.floor == 0  # 0 is still leased
    queue.ack(0, 1)
    assert queue.floor == 2
    assert offsets(queue.take(100, now_ms=1)) == [4, 5, 6, 7, 8, 9]
    assert queue.take(1, now_ms=2) == []


def test_an_expired_lease_makes_the_message_available_again_with_a_higher_count() -> None:
    queue = make_queue(2)
    queue.take(2, now_ms=0)
    queue.ack(1, 1)
    assert not queue.tick(999)
    assert queue.take(5, now_ms=999) == []
    assert queue.tick(1_000)
    (again,) = queue.take(5, now_ms=1_000)
    assert (again.offset, again.delivery_count) == (0, 2)
    assert queue.redelivered == 1 and queue.expired_leases == 1


def test_a_stale_delivery_cannot_be_settled_but_an_expired_one_can_be_acked() -> None:
    queue = make_queue(1)
    queue.take(1, now_ms=0)
    queue.tick(1_000)  # expired, not yet delivered again
    queue.ack(0, 1)  # still the current delivery: accepted
    assert queue.floor == 1
    queue.ack(0, 1)  # acked twice: fine
    with pytest.raises(ProtocolError) as raised:
        queue.nack(0, 1, now_ms=0)
    assert raised.value.code is ErrorCode.DELIVERY_SETTLED

    queue = make_queue(1)
    queue.take(1, now_ms=0)
    queue.tick(1_000)
    queue.take(1, now_ms=1_000)  # delivery 2
    with pytest.raises(ProtocolError) as raised:
        queue.ack(0, 1)
    assert raised.value.code is ErrorCode.STALE_DELIVERY
    assert queue.statistics().stale_settles == 1  # nodi_queue_stale_settles
    with pytest.raises(ProtocolError) as raised:
        queue.ack(5, 1)
    assert raised.value.code is ErrorCode.UNKNOWN_DELIVERY
    assert queue.statistics().stale_settles == 1


def test_in_progress_extends_the_lease() -> None:
    queue = make_queue(1)
    queue.take(1, now_ms=0)
    assert queue.in_progress(0, 1, now_ms=900) == 1_900
    assert queue.statistics().leases_extended == 1  # nodi_queue_leases_extended
    assert not queue.tick(1_500)
    assert queue.tick(1_900)
    assert offsets(queue.take(1, now_ms=1_900)) == [0]


def test_nack_with_a_delay_waits_for_it_and_keeps_the_error() -> None:
    queue = make_queue(2)
    queue.take(2, now_ms=0)
    queue.nack(0, 1, now_ms=10, delay_ms=500, error="database down")
    assert offsets(queue.take(5, now_ms=20)) == []
    assert not queue.tick(509)
    assert queue.tick(510)
    (again,) = queue.take(5, now_ms=510)
    assert (again.offset, again.delivery_count) == (0, 2)
    assert queue.pending[0].last_error == "database down"


def test_nack_without_a_delay_uses_the_backoff_in_order() -> None:
    queue = make_queue(1, max_deliveries=10, backoff=Backoff.fixed([100, 300, 700]))
    now = 0
    waits = []
    for _ in range(5):
        (taken,) = queue.take(1, now_ms=now)
        queue.nack(0, taken.delivery_count, now_ms=now)
        due = queue.next_deadline_ms()
        assert due is not None, "the nacked message waits for its backoff"
        waits.append(due - now)
        now = due
        queue.tick(now)
    assert waits == [100, 300, 700, 700, 700]


def test_exponential_backoff_grows_caps_and_jitter_only_adds() -> None:
    backoff = Backoff.exponential(base_ms=100, factor=2.0, max_ms=1_000, jitter=0.5)
    assert [backoff.nominal_delay_ms(n) for n in range(1, 7)] == [100, 200, 400, 800, 1_000, 1_000]
    for retry in range(1, 7):
        nominal = backoff.nominal_delay_ms(retry)
        assert backoff.delay_ms(retry, lambda low, high: high) == nominal + nominal // 2
        assert backoff.delay_ms(retry, lambda low, high: low) == nominal


def test_max_deliveries_dead_letters_and_the_dead_letter_acks() -> None:
    queue = make_queue(2, max_deliveries=2)
    queue.take(2, now_ms=0)
    queue.ack(1, 1)
    queue.nack(0, 1, now_ms=0, error="first")
    queue.take(1, now_ms=0)
    queue.nack(0, 2, now_ms=5, error="second")  # the last delivery: dead
    assert queue.take(1, now_ms=10) == []
    (letter,) = queue.take_dead_letters(10)
    assert letter.reason is DeadLetterReason.MAX_DELIVERIES
    assert (letter.offset, letter.delivery_count, letter.last_error) == (0, 2, "second")
    assert letter.first_delivery_ms == 0 and letter.last_delivery_ms == 0
    assert queue.take_dead_letters(10) == []  # an append is under way
    queue.dead_letter_failed(0)
    assert [d.offset for d in queue.take_dead_letters(10)] == [0]
    queue.dead_lettered(0)
    assert queue.floor == 2 and not queue.pending


def test_an_expired_last_lease_dead_letters() -> None:
    queue = make_queue(1, max_deliveries=1)
    queue.take(1, now_ms=0)
    assert queue.tick(1_000)
    (letter,) = queue.take_dead_letters(1)
    assert letter.reason is DeadLetterReason.MAX_DELIVERIES


def test_reject_dead_letters_with_the_reason() -> None:
    queue = make_queue(1)
    queue.take(1, now_ms=0)
    queue.reject(0, 1, "malformed order")
    (letter,) = queue.take_dead_letters(1)
    assert letter.reason is DeadLetterReason.REJECTED and letter.last_error == "malformed order"
    with pytest.raises(ProtocolError) as raised:  # being dead-lettered: too late to ack
        queue.ack(0, 1)
    assert raised.value.code is ErrorCode.DELIVERY_SETTLED
    assert queue.pending


def test_the_window_limit_holds_until_the_oldest_message_is_done() -> None:
    queue = make_queue(1_000, window=10)
    assert offsets(queue.take(100, now_ms=0)) == list(range(10))
    assert queue.take(100, now_ms=0) == []
    for offset in range(1, 10):
        queue.ack(offset, 1)
    assert queue.take(100, now_ms=0) == []  # offset 0 holds the floor
    queue.ack(0, 1)
    assert offsets(queue.take(100, now_ms=0)) == list(range(10, 20))


def test_retention_past_the_floor_skips_what_it_removed() -> None:
    queue = make_queue(10)
    queue.take(3, now_ms=0)
    queue.set_log_bounds(5, 10)
    assert queue.floor == 5 and queue.next_offset == 5 and not queue.pending
    assert offsets(queue.take(10, now_ms=0)) == [5, 6, 7, 8, 9]


def test_a_message_not_due_is_deferred_uncounted_and_survives_a_restart() -> None:
    queue = make_queue(3)
    first, second, third = queue.take(3, now_ms=0)
    queue.defer(second.offset, second.delivery_count, not_before_ms=5_000)
    queue.ack(0, 1)
    queue.ack(2, 1)
    assert queue.floor == 1  # a deferred message keeps its place in the window
    assert queue.take(10, now_ms=4_999) == [] and not queue.tick(4_999)
    decoded = decode_partition(encode_partition(queue))
    restored = PartitionQueue(0, decoded.settings, QueueLimits(), decoded.floor, decoded.next_offset)
    restored.set_log_bounds(0, 3)
    for delivery in decoded.deliveries:
        restored.restore(delivery, now_ms=100)
    assert restored.take(10, now_ms=100) == []
    assert restored.tick(5_000)
    (due,) = restored.take(10, now_ms=5_000)
    assert (due.offset, due.delivery_count) == (1, 1)  # the deferral was not a delivery


def test_an_expired_message_is_dropped_or_dead_lettered_never_delivered() -> None:
    queue = make_queue(3)
    first, second, _ = queue.take(3, now_ms=0)
    queue.expire(first.offset, first.delivery_count)
    assert queue.floor == 1 and queue.expired == 1 and queue.delivered == 2
    queue = make_queue(3, expired="dead-letter")
    first, _, _ = queue.take(3, now_ms=0)
    queue.expire(first.offset, first.delivery_count)
    (letter,) = queue.take_dead_letters(5)
    assert (letter.reason, letter.delivery_count) == (DeadLetterReason.EXPIRED, 0)
    with pytest.raises(InvalidConfigError):
        QueueSettings(expired="keep").validate()


def test_skip_marks_a_gap_done() -> None:
    queue = make_queue(3)
    queue.take(3, now_ms=0)
    queue.skip(0)
    queue.ack(1, 1)
    assert queue.floor == 2


def test_group_receives_from_every_partition() -> None:
    group = QueueGroup("g", "t", QueueSettings(), QueueLimits(), partitions=3)
    for queue in group.partitions:
        queue.set_log_bounds(0, 2)
    taken = group.receive(100, now_ms=0)
    assert sorted((t.partition, t.offset) for t in taken) == [(p, o) for p in range(3) for o in range(2)]
    assert group.dirty == {0, 1, 2}
    group.settle(SettleAction.ACK, 1, 0, 1, now_ms=0)
    with pytest.raises(ProtocolError) as raised:
        group.settle(SettleAction.ACK, 7, 0, 1, now_ms=0)
    assert raised.value.code is ErrorCode.UNKNOWN_PARTITION
    statistics = group.statistics()
    assert statistics.delivered == 6 and statistics.acked == 1


def test_settings_are_checked() -> None:
    with pytest.raises(InvalidConfigError):
        QueueSettings(ack_wait_ms=0).validate()
    with pytest.raises(InvalidConfigError):
        QueueSettings(max_deliveries=0).validate()
    with pytest.raises(InvalidConfigError):
        Backoff(multiplier_percent=50).validate()
    with pytest.raises(InvalidConfigError):
        Backoff.fixed([-1]).validate()
    with pytest.raises(InvalidConfigError):
        Backoff.fixed(range(200)).validate()
    assert QueueSettings().dead_letter_topic_for("orders") == "orders.dlq"
    assert QueueSettings(dead_letter_topic="dead").dead_letter_topic_for("orders") == "dead"
    assert cut_text("é" * 10, 5) == "éé"


def test_state_round_trips_and_a_lease_survives_as_a_not_before_time() -> None:
    queue = make_queue(10, max_deliveries=2)
    queue.take(6, now_ms=0)
    queue.ack(0, 1)
    queue.ack(2, 1)
    queue.nack(1, 1, now_ms=0, delay_ms=5_000, error="later")
    queue.reject(3, 1, "bad")
    decoded = decode_partition(encode_partition(queue))
    assert (decoded.floor, decoded.next_offset) == (1, 6)
    assert decoded.settings == queue.settings
    by_offset = {d.offset: d for d in decoded.deliveries}
    assert sorted(by_offset) == [1, 3, 4, 5]
    assert by_offset[1].not_before_ms == 5_000 and by_offset[1].last_error == "later"
    assert by_offset[3].reason is DeadLetterReason.REJECTED
    assert by_offset[4].not_before_ms == 1_000  # the lease deadline

    restored = PartitionQueue(0, decoded.settings, QueueLimits(), decoded.floor, decoded.next_offset)
    restored.set_log_bounds(0, 10)
    for delivery in decoded.deliveries:
        restored.restore(delivery, now_ms=100)
    assert [d.offset for d in restored.take_dead_letters(10)] == [3]
    assert offsets(restored.take(10, now_ms=100)) == [6, 7, 8, 9]  # 4, 5: their old leases run
    restored.tick(1_000)
    again = restored.take(10, now_ms=1_000)
    assert [(t.offset, t.delivery_count) for t in again] == [(4, 2), (5, 2)]


def test_a_restored_message_at_its_last_delivery_is_dead_lettered() -> None:
    queue = make_queue(1, max_deliveries=1)
    queue.take(1, now_ms=0)
    decoded = decode_partition(encode_partition(queue))
    restored = PartitionQueue(0, decoded.settings, QueueLimits(), decoded.floor, decoded.next_offset)
    for delivery in decoded.deliveries:
        restored.restore(delivery, now_ms=5_000)
    assert [d.reason for d in restored.take_dead_letters(1)] == [DeadLetterReason.MAX_DELIVERIES]


def test_the_committed_reservation_counts_its_offsets_as_delivered_once_after_a_crash() -> None:
    queue = PartitionQueue(
        0, QueueSettings(ack_wait_ms=1_000, max_deliveries=3, backoff=NO_BACKOFF), QueueLimits(reservation_messages=10)
    )
    queue.set_log_bounds(0, 100)
    committed = decode_partition(encode_partition(queue))  # before any delivery
    assert committed.reservation_end == 0
    queue.take(3, now_ms=0)
    assert queue.reserved_offset == 13  # moved ahead once half of it (here all) was used
    committed = decode_partition(encode_partition(queue))  # the commit of the reservation
    assert (committed.next_offset, committed.reservation_end) == (3, 13)
    queue.take(2, now_ms=0)  # 3, 4: first deliveries answered before their commit
    assert queue.reserved_offset == 13  # half of it is left: not moved
    queue.take(4, now_ms=0)  # 5..8: fewer than half left now, moved again
    assert queue.reserved_offset == 19

    # The crash: only `committed` is on disk; 3 and 4 went out with count 1.
    restored = PartitionQueue(
        0, committed.settings, QueueLimits(reservation_messages=10), committed.floor, committed.next_offset
    )
    restored.set_log_bounds(0, 100)
    for delivery in committed.deliveries:
        restored.restore(delivery, now_ms=5_000)
    assert restored.restore_reserved(committed.reservation_end, now_ms=5_000) == 10  # offsets 3..12
    assert restored.next_offset == restored.reserved_offset == restored.durable_reserved_offset == 13
    again = restored.take(20, now_ms=5_000)
    by_offset = {t.offset: t.delivery_count for t in again}
    # 0..2 (committed, their old leases ran out) and 3..12 (in doubt) come again, each
    # with a count above the one a consumer saw.
    assert all(by_offset[offset] == 2 for offset in range(13))
    assert by_offset[13] == 1  # beyond the reservation: never delivered


def test_a_version_1_state_reads_with_no_reservation() -> None:
    queue = make_queue(10)
    queue.take(2, now_ms=0)
    encoded = encode_partition(queue)
    assert encoded[0] == 2
    version_1 = bytes([1]) + encoded[1:17] + encoded[25:]  # without reserved_offset
    decoded = decode_partition(version_1)
    assert (decoded.floor, decoded.next_offset, decoded.reservation_end) == (0, 2, 2)
    assert [d.offset for d in decoded.deliveries] == [0, 1]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80))
def test_garbage_state_raises_only_queue_state_error(data) -> None:
    with pytest.raises(QueueStateError):
        decode_partition(data)
    encoded = encode_partition(make_queue(3))
    with pytest.raises(QueueStateError):
        decode_partition(encoded + b"x")


# ---------------------------------------------------------------------------
# A model: random receives, settles, ticks and restarts never lose or duplicate an ack.

OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["take", "ack", "nack", "progress", "reject", "tick", "dead", "restart"]),
        st.integers(0, 20),
        st.integers(0, 3_000),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS, st.sampled_from(["drop", "dead-letter"]))
def test_model_every_message_ends_acked_or_dead_lettered_exactly_once(operations, expired) -> None:
    end = 15
    queue = make_queue(end, window=6, max_deliveries=3, backoff=Backoff.fixed([50, 200]), expired=expired)
    now = 0
    acked: set[int] = set()  # acked, or expired and dropped
    dead: set[int] = set()
    leased: dict[int, int] = {}  # offset -> delivery count the consumer holds
    counts: dict[int, int] = {}
    for name, number, step in operations:
        now += step // 10
        if name == "take":
            for index, taken in enumerate(queue.take(number % 4 + 1, now)):
                assert taken.offset not in acked and taken.offset not in dead
                assert taken.delivery_count == counts.get(taken.offset, 0) + 1
                assert taken.offset - queue.floor < 6
                # The server's checks at delivery, on what it just took: not due, expired.
                if index == 0 and number % 7 == 5:
                    queue.defer(taken.offset, taken.delivery_count, now + step)
                    continue
                if index == 0 and number % 7 == 6:
                    queue.expire(taken.offset, taken.delivery_count)
                    if expired == "drop":
                        acked.add(taken.offset)
                    continue
                counts[taken.offset] = taken.delivery_count
                leased[taken.offset] = taken.delivery_count
        elif name in ("ack", "nack", "progress", "reject") and leased:
            offset = sorted(leased)[number % len(leased)]
            count = leased.pop(offset)
            try:
                if name == "ack":
                    queue.ack(offset, count)
                    if offset not in dead and offset in queue.pending:
                        pass
                    elif offset not in dead:
                        acked.add(offset)
                elif name == "nack":
                    queue.nack(offset, count, now)
                elif name == "progress":
                    queue.in_progress(offset, count, now)
                    leased[offset] = count
                else:
                    queue.reject(offset, count, "no")
            except ProtocolError as error:
                assert error.code in (ErrorCode.STALE_DELIVERY, ErrorCode.DELIVERY_SETTLED)
        elif name == "tick":
            queue.tick(now)
        elif name == "dead":
            for letter in queue.take_dead_letters(number % 3 + 1):
                assert letter.offset not in acked and letter.offset not in dead
                if step % 2:
                    queue.dead_letter_failed(letter.offset)
                else:
                    queue.dead_lettered(letter.offset)
                    dead.add(letter.offset)
        else:  # restart: the state goes through its codec, leases are lost
            decoded = decode_partition(encode_partition(queue))
            queue = PartitionQueue(0, decoded.settings, queue.limits, decoded.floor, decoded.next_offset)
            queue.set_log_bounds(0, end)
            for delivery in decoded.deliveries:
                queue.restore(delivery, now)
        for offset in range(queue.floor):
            assert offset not in queue.pending
        assert all(queue.floor <= offset < queue.next_offset for offset in queue.pending)
        done = set(range(queue.next_offset)) - set(queue.pending)
        assert acked | dead <= done
        assert not acked & dead
    # Drain: everything ends done, nothing twice.
    for _ in range(200):
        now += 10_000
        queue.tick(now)
        for letter in queue.take_dead_letters(100):
            assert letter.offset not in acked and letter.offset not in dead
            queue.dead_lettered(letter.offset)
            dead.add(letter.offset)
        for taken in queue.take(100, now):
            assert taken.offset not in acked and taken.offset not in dead
            queue.ack(taken.offset, taken.delivery_count)
            acked.add(taken.offset)
        if queue.floor == end:
            break
    assert queue.floor == end and not queue.pending
    assert acked | dead == set(range(end)) and not acked & dead


def test_dead_letter_reasons_are_the_reserved_header_values() -> None:
    from nodi.broker.protocol import headers

    labels = tuple(reason.label for reason in DeadLetterReason if reason is not DeadLetterReason.NONE)
    assert labels == headers.DLQ_REASONS


def test_state_bytes_max_bounds_the_largest_state() -> None:
    limits = QueueLimits(window_messages_max=50, error_text_bytes_max=100, backoff_delays_max=100)
    settings = QueueSettings(backoff=Backoff.fixed([86_400_000] * 100), dead_letter_topic="d" * 249)
    queue = PartitionQueue(0, settings, limits)
    queue.set_log_bounds(0, 1_000)
    for taken in queue.take(1_000, now_ms=0):
        queue.nack(taken.offset, 1, now_ms=0, error="é" * 100)
    assert len(queue.pending) == 50
    assert len(encode_partition(queue)) <= state_bytes_max(50, 100, 100)


def test_settles_of_offsets_never_delivered_are_refused() -> None:
    queue = make_queue(5)
    queue.take(1, now_ms=0)
    for offset in (-1, 1, 10):
        with pytest.raises(ProtocolError) as raised:
            queue.ack(offset, 1)
        assert raised.value.code is ErrorCode.UNKNOWN_DELIVERY


def test_ack_run_gives_the_outcomes_and_state_acks_one_by_one_give() -> None:
    """A run acked in one call (the server's common settle) ends in the same state, with
    the same outcome per offset, as the same acks made one at a time: pending, stale,
    already acked, being dead-lettered, never delivered."""

    def scene() -> PartitionQueue:
        queue = make_queue(40, max_deliveries=2)
        queue.take(30, 0)
        queue.ack(5, 1)  # done already: acking it again succeeds
        queue.nack(6, 1, 0, delay_ms=0)
        queue.take(1, 0)  # 6 is delivery 2 now: the run's delivery 1 of it is stale
        queue.reject(7, 1)  # being dead-lettered
        return queue

    one_by_one = scene()
    codes = []
    for offset in range(0, 35):
        try:
            one_by_one.ack(offset, 1)
            codes.append(ErrorCode.NONE)
        except ProtocolError as error:
            codes.append(error.code)
    in_runs = scene()
    outcomes = in_runs.ack_run(0, 35, 1)
    assert [code for _, code, length in outcomes for _ in range(length)] == codes
    assert [offset for offset, _, _ in outcomes] == sorted(offset for offset, _, _ in outcomes)
    assert codes[6] == ErrorCode.STALE_DELIVERY and codes[7] == ErrorCode.DELIVERY_SETTLED
    assert codes[30] == ErrorCode.UNKNOWN_DELIVERY
    assert in_runs.statistics() == one_by_one.statistics()
    assert in_runs.floor == one_by_one.floor == 6


# ---------------------------------------------------------------------------
# Leases kept as runs: one timer entry per run, split by settles of part of it


def expired_by(queue: PartitionQueue, now_ms: int) -> list[int]:
    """Tick to `now_ms`, then take what became available: the offsets whose lease (or
    not-before time) ran out, each leased again."""
    queue.tick(now_ms)
    return offsets(queue.take(1_000, now_ms))


def test_one_receive_is_one_lease_run_and_a_partial_ack_leaves_the_rest_in_it() -> None:
    queue = make_queue(10)
    queue.take(10, now_ms=0)
    assert queue.statistics().lease_runs == 1
    assert queue.ack_run(0, 5, 1) == [[0, ErrorCode.NONE, 5]]
    assert queue.statistics().lease_runs == 1 and queue.leased == 5
    assert expired_by(queue, 999) == []
    again = queue.take(10, now_ms=999)
    assert again == []
    queue.tick(1_000)
    redelivered = queue.take(10, now_ms=1_000)
    assert [(t.offset, t.delivery_count) for t in redelivered] == [(offset, 2) for offset in range(5, 10)]
    queue.ack_run(5, 5, 2)
    assert queue.statistics().lease_runs == 0 and queue.leased == 0 and queue.floor == 10


def test_a_nack_in_the_middle_of_a_run_leaves_the_others_to_their_deadline() -> None:
    queue = make_queue(10)
    queue.take(10, now_ms=0)
    queue.nack(5, 1, now_ms=10, delay_ms=0)
    (again,) = queue.take(10, now_ms=10)
    assert (again.offset, again.delivery_count, again.lease_deadline_ms) == (5, 2, 1_010)
    assert expired_by(queue, 1_000) == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert queue.expired_leases == 9
    assert expired_by(queue, 1_010) == [5]  # its own run, leased again at 10
    assert queue.statistics().stale_settles == 0


def test_extending_part_of_a_run_moves_that_part_to_a_run_of_its_own() -> None:
    queue = make_queue(10)
    queue.take(10, now_ms=0)
    deadlines = [queue.in_progress(offset, 1, now_ms=500) for offset in range(3, 7)]
    assert deadlines == [1_500] * 4
    assert queue.statistics().lease_runs == 2  # the four extended share one run
    assert expired_by(queue, 1_000) == [0, 1, 2, 7, 8, 9]
    assert queue.leased == 4 + 6  # the extended ones, and the six just leased again
    queue.ack_run(0, 3, 2)
    queue.ack_run(7, 3, 2)
    assert expired_by(queue, 1_499) == []
    assert expired_by(queue, 1_500) == [3, 4, 5, 6]
    assert queue.take(1, now_ms=1_500) == []


def test_a_split_run_redelivers_only_what_is_left_in_it_after_its_deadline() -> None:
    queue = make_queue(10)
    queue.take(10, now_ms=0)
    queue.ack(2, 1)
    queue.in_progress(4, 1, now_ms=100)
    queue.in_progress(5, 1, now_ms=100)
    queue.nack(7, 1, now_ms=100, delay_ms=5_000)
    queue.reject(9, 1, "bad")
    assert expired_by(queue, 1_000) == [0, 1, 3, 6, 8]
    for offset in [0, 1, 3, 6, 8]:
        queue.ack(offset, 2)
    assert expired_by(queue, 1_100) == [4, 5]
    queue.ack_run(4, 2, 2)
    assert [d.offset for d in queue.take_dead_letters(10)] == [9]
    assert expired_by(queue, 5_099) == [] and expired_by(queue, 5_100) == [7]
    queue.ack(7, 2)
    queue.dead_lettered(9)
    assert queue.floor == 10 and queue.leased == 0 and queue.statistics().lease_runs == 0


def test_a_run_emptied_by_settles_leaves_no_timer_behind() -> None:
    queue = make_queue(300)
    for start in range(0, 300, 100):
        queue.take(100, now_ms=start)  # three runs: three deadlines
    assert queue.statistics().lease_runs == 3
    assert queue.next_deadline_ms() == 1_000
    queue.ack_run(0, 100, 1)
    assert queue.next_deadline_ms() == 1_100  # the acked run is gone, unwalked
    queue.ack_run(100, 100, 1)
    queue.ack_run(200, 100, 1)
    assert queue.next_deadline_ms() is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["take", "ack", "ack_run", "nack", "extend", "release", "tick"]),
            st.integers(0, 39),
            st.integers(1, 12),
        ),
        max_size=60,
    )
)
def test_lease_runs_run_out_exactly_the_leases_whose_deadline_passed(operations) -> None:
    """Against a model that keeps one deadline per message: after each tick, no lease
    whose deadline passed is left, none whose deadline is ahead was run out, and the
    leased count is what the model holds."""
    queue = make_queue(40, ack_wait_ms=100, max_deliveries=1_000)
    now = 0
    model: dict[int, tuple[int, int]] = {}  # offset -> (delivery count, deadline) while leased
    for action, offset, amount in operations:
        if action == "take":
            for taken in queue.take(amount, now):
                model[taken.offset] = (taken.delivery_count, taken.lease_deadline_ms)
        elif action == "tick":
            now += amount * 20
            queue.tick(now)
            model = {o: (c, d) for o, (c, d) in model.items() if d > now}
        elif offset in model:
            count, _ = model[offset]
            if action == "ack":
                queue.ack(offset, count)
                del model[offset]
            elif action == "ack_run":
                run = [o for o in range(offset, offset + amount) if model.get(o, (0,))[0] == count]
                stop = next((o for o in range(offset, offset + amount) if o not in run), offset + amount)
                queue.ack_run(offset, stop - offset, count)
                for o in range(offset, stop):
                    del model[o]
            elif action == "nack":
                queue.nack(offset, count, now, delay_ms=10_000)
                del model[offset]
            elif action == "extend":
                model[offset] = (count, queue.in_progress(offset, count, now))
            elif action == "release":
                queue.release(offset, count)
                del model[offset]
        leased = {o: (d.delivery_count, d.lease_deadline_ms) for o, d in queue.pending.items() if d.state == 1}
        assert leased == model
        assert queue.leased == len(model)
        assert queue.statistics().lease_runs <= len(model)
