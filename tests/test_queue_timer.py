"""The queue lease timer against a real `nodi serve` with many queue groups: a round
visits only the groups that changed or have a deadline due (counted by the timer's
statistics, exported as nodi_queue_timer_*), not every group, and a lease running out
in an idle group among many is still redelivered (its deadline is never missed), and a
group whose dead-letter pass failed is visited again when its backoff ends."""

from __future__ import annotations

import asyncio
import time

import pytest

from nodi.broker import Client
from nodi.storage.records import NewRecord, build_batch

from conftest import BrokerProcess
from test_ops_metrics import scrape, value

IDLE_GROUPS = 300
SETTLED = 100  # messages of the busy group, acked one request each
WAIT_S = 30  # generous: the machine is shared


@pytest.fixture(scope="module")
def idle_broker(tmp_path_factory):
    """A broker whose topic "jobs" has IDLE_GROUPS queue groups that received nothing."""
    directory = tmp_path_factory.mktemp("queue_timer")
    process = BrokerProcess(str(directory / "data"), metrics=True, clock_file=str(directory / "clock")).start()
    try:
        with Client(process.address, timeout_ms=30_000) as client:
            client.create_topic("jobs")
            for index in range(IDLE_GROUPS):
                with client.queue("jobs", f"idle-{index}", prefetch=False) as queue:
                    assert queue.receive(timeout_ms=0) is None
        settled_rounds(process)
        yield process
    finally:
        if process.process is not None:
            process.stop()


def timer_counts(process: BrokerProcess) -> tuple[float, float]:
    samples = scrape(process.metrics_port)
    return value(samples, "nodi_queue_timer_rounds_total"), value(samples, "nodi_queue_timer_groups_visited_total")


def settled_rounds(process: BrokerProcess) -> tuple[float, float]:
    """The counts once two more rounds ran: every change made before is visited by then."""
    rounds, _ = timer_counts(process)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        counts = timer_counts(process)
        if counts[0] >= rounds + 2:
            return counts
        time.sleep(0.2)
    raise AssertionError("the queue timer ran no rounds")


def test_settling_one_group_visits_that_group_only_not_every_group(idle_broker) -> None:
    with Client(idle_broker.address, timeout_ms=30_000) as client:
        client.produce_batch("jobs", 0, build_batch([NewRecord(None, b"%d" % i) for i in range(SETTLED)]))
        rounds_before, visited_before = settled_rounds(idle_broker)
        with client.queue("jobs", "busy", batch_max=1, prefetch=False) as queue:
            for _ in range(SETTLED):
                message = queue.receive(timeout_ms=WAIT_S * 1000)
                assert message is not None
                message.ack()  # one settle request, answered after its commit; wakes the timer
        rounds_after, visited_after = settled_rounds(idle_broker)
    rounds, visited = rounds_after - rounds_before, visited_after - visited_before
    print(f"{SETTLED} acks among {IDLE_GROUPS} idle groups: {rounds:.0f} timer rounds visited {visited:.0f} groups")
    assert rounds >= 2
    assert 1 <= visited <= rounds  # the busy group at most, once a round (a scan of all: 301 a round)


def test_a_lease_running_out_in_an_idle_group_among_many_is_redelivered(idle_broker) -> None:
    with Client(idle_broker.address, timeout_ms=30_000) as client:
        client.produce_batch("jobs", 0, build_batch([NewRecord(None, b"held")]))
        with client.queue(
            "jobs", "sleeper", ack_wait_ms=1_500, batch_max=1, prefetch=False, max_lease_ms=0
        ) as queue:  # the client does not extend: the server runs it out
            held = queue.receive(timeout_ms=WAIT_S * 1000)
            assert held is not None and held.delivery_count == 1
            # Nobody receives from the group now: only the timer can run the lease out,
            # once the server's clock has passed the lease's end.
            idle_broker.advance_clock(1_500)
            deadline = time.monotonic() + WAIT_S
            while client.describe_queue("jobs", "sleeper").expired_leases == 0:
                assert time.monotonic() < deadline, "the lease never ran out"
                time.sleep(0.2)
            again = queue.receive(timeout_ms=WAIT_S * 1000)
            assert again is not None and (again.offset, again.delivery_count) == (held.offset, 2)
            again.ack()


def _service_with_a_rejected_message(store):
    """A queue service on `store` whose group g on topic jobs holds one rejected
    message waiting for its dead-letter append; (service, group, taken)."""
    from nodi.broker.protocol import messages as m
    from nodi.broker.server.config import ServerConfig
    from nodi.broker.server.queue_service import now_ms
    from nodi.broker.server.service import Broker

    store.create_topic("jobs")
    store.log("jobs", 0).append(build_batch([NewRecord(None, b"bad")]))
    service = Broker(store, ServerConfig(data_dir=store.data_dir)).queues
    group = service._group_for("g", "jobs", m.QueueGroupSettings())
    service._refresh(group)
    [taken] = group.receive(1, now_ms())
    group.settle(m.SettleAction.REJECT, 0, taken.offset, taken.delivery_count, now_ms(), text="poison")
    return service, group, taken


async def _refuse(group, letters):
    raise OSError("the dead-letter topic refuses appends")


def test_a_group_whose_dead_letters_failed_is_visited_again_at_its_retry_time(tmp_path) -> None:
    """At the service level (a failing dead-letter topic is hard to make on a real
    server): after a failed pass the group is left out of the rounds until its backoff
    ends, then visited and written."""
    from nodi.broker.server.queue_service import DEAD_LETTER_RETRY_S, now_ms
    from nodi.storage.store import Store

    store = Store.open(tmp_path)
    try:
        service, group, taken = _service_with_a_rejected_message(store)
        assert group.key in service._take_visits(now_ms())
        written: list[int] = []

        async def write(group, letters):
            for letter in letters:
                group.dead_lettered(letter.partition, letter.offset)
            written.extend(letter.offset for letter in letters)
            return len(letters)

        service._dead_letter = _refuse
        failed_at = now_ms()
        assert asyncio.run(service._write_dead_letters([group])) == 0
        retry_ms = service._scheduled[group.key]
        assert failed_at + DEAD_LETTER_RETRY_S * 1000 <= retry_ms <= now_ms() + DEAD_LETTER_RETRY_S * 1000 + 1
        assert group.key not in service._take_visits(retry_ms - 1)  # backing off: left alone
        assert group.key in service._take_visits(retry_ms)
        assert asyncio.run(service._write_dead_letters([group])) == 0  # visited early: skipped...
        assert abs(service._scheduled[group.key] - retry_ms) <= 5  # ...and still scheduled
        time.sleep(max(retry_ms - now_ms(), 0) / 1000 + 0.05)  # the backoff ends
        service._dead_letter = write
        assert asyncio.run(service._write_dead_letters([group])) == 1
        assert written == [taken.offset] and group.statistics().partitions[0].dead == 0
    finally:
        store.close()


def test_deleting_the_topic_forgets_its_groups_dead_letter_backoff(tmp_path) -> None:
    from nodi.storage.store import Store

    store = Store.open(tmp_path)
    try:
        service, group, _ = _service_with_a_rejected_message(store)
        service._dead_letter = _refuse
        assert asyncio.run(service._write_dead_letters([group])) == 0
        assert group.key in service._dead_letter_backoff
        service.on_topic_deleted("jobs")
        assert group.key not in service.groups
        assert group.key not in service._dead_letter_backoff
    finally:
        store.close()
