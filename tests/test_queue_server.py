"""Queue groups against a real `nodi serve`: competing consumers, nack backoff,
dead-lettering on max deliveries and on reject, the window limit, settings, bad input."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nodi.broker import AsyncClient, Backoff, Client
from nodi.broker.client.errors import (
    DeliverySettled,
    QueueSettingsMismatch,
    StaleDelivery,
    UnknownDelivery,
    UnknownQueueGroup,
    UnknownTopic,
)
from nodi.broker.protocol import messages as m
from nodi.broker.server.dead_letters import DEAD_LETTER_HEADERS
from nodi.storage.records import NewRecord, build_batch

from conftest import BrokerProcess, received

WAIT_MS = 20_000  # generous: the machine is shared


def produce_values(client: Client, topic: str, partition: int, values: list[bytes], chunk: int = 500) -> None:
    for start in range(0, len(values), chunk):
        batch = build_batch(
            [
                NewRecord(b"k%d" % (start + i), value, [("source", b"test")])
                for i, value in enumerate(values[start : start + chunk])
            ]
        )
        client.produce_batch(topic, partition, batch)


def describe(client: Client, group: str, topic: str):
    return client.describe_queue(topic, group)


def test_four_competing_consumers_share_ten_thousand_messages_once_each(broker) -> None:
    total = 10_000
    with Client(broker.address) as client:
        client.create_topic("jobs", partitions=4)
        for partition in range(4):
            produce_values(client, "jobs", partition, [b"%d-%d" % (partition, i) for i in range(total // 4)])
    seen: list[list[tuple[int, int]]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    ready = threading.Barrier(4, timeout=60)  # all connected before any receives

    def consume(index: int) -> None:
        try:
            with (
                Client(broker.address) as client,
                client.queue("jobs", "workers", ack_wait_ms=60_000, batch_max=100) as queue,
            ):
                client.connect()
                ready.wait()
                idle = 0
                while idle < 3:
                    message = queue.receive(timeout_ms=1_000)
                    if message is None:
                        idle += 1
                        continue
                    idle = 0
                    assert message.delivery_count == 1
                    seen[index].append((message.partition, message.offset))
                    message.ack(wait=False)
                queue.flush()
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=consume, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    everything = [item for part in seen for item in part]
    assert len(everything) == total
    assert len(set(everything)) == total
    assert sum(1 for part in seen if part) >= 2  # the work was shared
    with Client(broker.address) as client:
        state = describe(client, "workers", "jobs")
        assert [p.ack_floor for p in state.partitions] == [total // 4] * 4
        assert state.acked == total and state.redelivered == 0


def test_nack_backoff_delivers_again_in_order_and_not_before_the_delay(broker) -> None:
    with Client(broker.address) as client:
        client.create_topic("retry")
        client.produce("retry", b"flaky", partition=0)
        delays = [300, 600, 1_200]
        with client.queue("retry", "g", max_deliveries=4, backoff=delays, batch_max=1) as queue:
            deliveries = []
            for expected_count in range(1, 5):
                message = queue.receive(timeout_ms=WAIT_MS)
                assert message is not None and message.value == b"flaky"
                assert message.delivery_count == expected_count
                deliveries.append(message)
                if expected_count < 4:
                    message.nack(error=f"attempt {expected_count}")
            deliveries[-1].ack()
        for earlier, later, delay in zip(deliveries, deliveries[1:], delays):
            # The lease deadline is the delivery time + ack_wait: their difference is
            # the gap between deliveries, which the backoff bounds from below.
            assert later.lease_deadline_ms - earlier.lease_deadline_ms >= delay
        # An explicit delay wins over the backoff; zero means at once.
        client.produce("retry", b"second", partition=0)
        with client.queue("retry", "g") as queue:
            message = queue.receive(timeout_ms=WAIT_MS)
            assert message is not None
            message.nack(delay_ms=0)
            again = queue.receive(timeout_ms=WAIT_MS)
            assert again is not None
            assert (again.offset, again.delivery_count) == (message.offset, 2)
            with pytest.raises(StaleDelivery):
                message.ack()
            again.ack()


def dead_letter_headers(message) -> dict[str, str]:
    return {name: value.decode() for name, value in message.headers if name.startswith("nodi-dlq-")}


def test_max_deliveries_dead_letters_with_every_header(broker) -> None:
    with Client(broker.address) as client:
        client.create_topic("orders", partitions=2)
        client.produce("orders", b"poison", key=b"customer-7", partition=1, headers={"trace": b"abc"})
        with client.queue("orders", "billing", max_deliveries=2, backoff=[0], ack_wait_ms=60_000) as queue:
            first = queue.receive(timeout_ms=WAIT_MS)
            assert first is not None
            first.nack(error="first failure")
            second = queue.receive(timeout_ms=WAIT_MS)
            assert second is not None
            assert second.delivery_count == 2
            second.nack(error="database down")
            assert queue.receive(timeout_ms=500) is None  # dead-lettered, not delivered again
        letters = wait_for_messages(client, "orders.dlq", 1)
        (letter,) = letters
        assert letter.partition == 1  # the source partition, as the DLQ has as many
        assert (letter.key, letter.value) == (b"customer-7", b"poison")
        assert ("trace", b"abc") in letter.headers
        headers = dead_letter_headers(letter)
        assert set(headers) == set(DEAD_LETTER_HEADERS)
        assert headers["nodi-dlq-source-topic"] == "orders"
        assert headers["nodi-dlq-source-partition"] == "1"
        assert headers["nodi-dlq-source-offset"] == str(first.offset)
        assert headers["nodi-dlq-group"] == "billing"
        assert headers["nodi-dlq-reason"] == "max-deliveries"
        assert headers["nodi-dlq-delivery-count"] == "2"
        assert headers["nodi-dlq-last-error"] == "database down"
        assert headers["nodi-dlq-first-delivery-ms"] == str(first.lease_deadline_ms - 60_000)
        assert headers["nodi-dlq-last-delivery-ms"] == str(second.lease_deadline_ms - 60_000)
        assert int(headers["nodi-dlq-source-timestamp-ms"]) == first.timestamp
        assert (
            int(headers["nodi-dlq-dead-lettered-ms"]) == letter.timestamp >= int(headers["nodi-dlq-last-delivery-ms"])
        )
        state = describe(client, "billing", "orders")
        assert state.partitions[1].ack_floor == 1 and state.dead_lettered == 1


def wait_for_messages(client: Client, topic: str, count: int, partitions: int | None = None) -> list:
    import time

    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        found = []
        try:
            for partition in range(partitions or client.partition_count(topic, refresh=True)):
                found += client.fetch(topic, partition, 0)
        except UnknownTopic:
            pass
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_reject_dead_letters_to_a_configured_topic_and_acks_the_source(broker) -> None:
    with Client(broker.address) as client:
        client.create_topic("payments")
        client.produce("payments", b"bad amount", partition=0)
        client.produce("payments", b"good", partition=0)
        with client.queue("payments", "ledger", dead_letter_topic="payments-dead") as queue:
            bad = queue.receive(timeout_ms=WAIT_MS)
            assert bad is not None
            bad.reject("amount is negative")
            good = queue.receive(timeout_ms=WAIT_MS)
            assert good is not None
            assert good.value == b"good"
            good.ack()
            with pytest.raises(DeliverySettled):  # settled already
                bad.nack()
        (letter,) = wait_for_messages(client, "payments-dead", 1)
        headers = dead_letter_headers(letter)
        assert headers["nodi-dlq-reason"] == "rejected"
        assert headers["nodi-dlq-last-error"] == "amount is negative"
        assert headers["nodi-dlq-delivery-count"] == "1"
        import time

        deadline = time.monotonic() + WAIT_MS / 1000
        while describe(client, "ledger", "payments").partitions[0].ack_floor != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_the_window_limit_holds(broker_factory, monkeypatch) -> None:
    monkeypatch.setenv("NODI_QUEUES_WINDOW_MESSAGES_MAX", "50")
    process: BrokerProcess = broker_factory().start()
    with Client(process.address) as client:
        client.create_topic("backlog")
        produce_values(client, "backlog", 0, [b"x"] * 500)
        with client.queue("backlog", "slow", batch_max=1_000, ack_wait_ms=60_000) as queue:
            held = []
            while (message := queue.receive(timeout_ms=300)) is not None:
                held.append(message)
            assert [message.offset for message in held] == list(range(50))
            state = describe(client, "slow", "backlog")
            assert state.partitions[0].next_offset - state.partitions[0].ack_floor == 50
            for message in held[1:]:
                message.ack(wait=False)
            queue.flush()
            assert queue.receive(timeout_ms=300) is None  # offset 0 still holds the floor
            held[0].ack()
            assert received(queue.receive(timeout_ms=WAIT_MS)).offset == 50
    process.stop()


def test_settings_are_stored_at_first_use_and_checked(broker) -> None:
    with Client(broker.address) as client:
        client.create_topic("s")
        with client.queue(
            "s", "g", ack_wait_ms=5_000, max_deliveries=3, backoff=Backoff.exponential(100, 3.0, 2_000, 0.0)
        ) as queue:
            assert queue.receive(timeout_ms=10) is None
        state = describe(client, "g", "s")
        assert (state.ack_wait_ms, state.max_deliveries) == (5_000, 3)
        assert state.backoff == Backoff.exponential(100, 3.0, 2_000, 0.0)
        assert state.dead_letter_topic == "s.dlq"
        with client.queue("s", "other", backoff=[5, 10], dead_letter_topic="s-dead") as queue:
            assert queue.receive(timeout_ms=10) is None
        assert describe(client, "other", "s").backoff == Backoff.fixed([5, 10])
        summaries = client.list_queues("s")
        assert [(q.group, q.topic, q.dead_letter_topic) for q in summaries] == [
            ("g", "s", "s.dlq"),
            ("other", "s", "s-dead"),
        ]
        assert client.list_queues("nothing-here") == []
        with client.queue("s", "g") as queue:  # None keeps what is stored
            assert queue.receive(timeout_ms=10) is None
        with client.queue("s", "g", max_deliveries=4) as queue, pytest.raises(QueueSettingsMismatch):
            queue.receive(timeout_ms=10)
        with pytest.raises(UnknownTopic), client.queue("missing", "g") as queue:
            queue.receive(timeout_ms=10)
        with pytest.raises(UnknownQueueGroup):
            describe(client, "nobody", "s")


def test_async_queue_and_bad_settles(broker) -> None:
    asyncio.run(asyncio.wait_for(async_queue_and_bad_settles(broker), 60))


async def async_queue_and_bad_settles(broker) -> None:
    async with AsyncClient(broker.address) as client:
        await client.create_topic("a")
        await client.produce("a", b"one", partition=0)
        async with client.queue("a", "g", ack_wait_ms=10_000) as queue:
            message = await queue.receive(timeout_ms=WAIT_MS)
            assert message is not None
            assert message.value == b"one" and message.group == "g"
            deadline = await message.in_progress()
            assert deadline >= message.lease_deadline_ms
            await message.ack()
            await message.ack()  # twice: still fine
            bogus = m.QueueSettleRequest(
                group="g",
                topic="a",
                settlements=[
                    m.Settlement(partition=0, offset=99, delivery_count=1, action=m.SettleAction.ACK),
                    m.Settlement(partition=5, offset=0, delivery_count=1, action=m.SettleAction.NACK),
                ],
            )
            response = await client._call(bogus, None)
            assert isinstance(response, m.QueueSettleResponse)
            assert [r.error_code for r in response.results] == [
                m.ErrorCode.UNKNOWN_DELIVERY,
                m.ErrorCode.UNKNOWN_PARTITION,
            ]
            with pytest.raises(UnknownDelivery):
                await message.__class__("a", 0, 50, 0, None, None, _queue=queue).ack()
            await queue.flush()  # an error the caller awaited is not raised again
            message.__class__("a", 0, 51, 0, None, None, _queue=queue).ack(wait=False)
            with pytest.raises(UnknownDelivery):  # one nobody awaited is raised by flush
                await queue.flush()
            # A receive whose long poll ends empty answers with no messages.
            assert await queue.receive(timeout_ms=200) is None
            await client.produce("a", b"two", partition=0)
            waiting = asyncio.create_task(queue.receive(timeout_ms=WAIT_MS))
            message = received(await waiting)
            assert message.value == b"two"
            await message.ack()


def test_a_message_with_a_not_before_time_is_delivered_only_when_due(broker) -> None:
    import time

    from nodi.broker.protocol.headers import NOT_BEFORE_MS

    with Client(broker.address) as client:
        client.create_topic("later")
        due_ms = int(time.time() * 1000) + 1_000
        client.produce_batch(
            "later",
            0,
            build_batch(
                [
                    NewRecord(None, b"delayed", [(NOT_BEFORE_MS, str(due_ms).encode())]),
                    NewRecord(None, b"now"),
                ]
            ),
        )
        with client.queue("later", "g") as queue:
            first = queue.receive(timeout_ms=WAIT_MS)
            assert first is not None
            assert first.value == b"now"
            first.ack()
            delayed = queue.receive(timeout_ms=WAIT_MS)
            assert delayed is not None and delayed.value == b"delayed"
            assert int(time.time() * 1000) >= due_ms  # never before it is due
            assert delayed.delivery_count == 1
            delayed.ack()


def test_bad_queue_requests_get_typed_errors_and_the_server_carries_on(broker) -> None:
    from nodi.broker.client.errors import InvalidConfig, NodiClientError

    def call(client, request):
        return client._run(client._async._call(request, None), None)

    with Client(broker.address) as client:
        client.create_topic("q")
        bad_settings = [
            m.QueueGroupSettings(ack_wait_ms=0),
            m.QueueGroupSettings(max_deliveries=0),
            m.QueueGroupSettings(backoff=m.QueueBackoff(kind=m.BackoffKind.DELAYS, delays_ms=[-5])),
            m.QueueGroupSettings(backoff=m.QueueBackoff(kind=m.BackoffKind.DELAYS, delays_ms=[1] * 500)),
            m.QueueGroupSettings(backoff=m.QueueBackoff(kind=m.BackoffKind.EXPONENTIAL, multiplier_percent=10)),
            m.QueueGroupSettings(dead_letter_topic="no spaces allowed"),
        ]
        for settings in bad_settings:
            with pytest.raises(InvalidConfig):
                call(client, m.QueueReceiveRequest(group="g", topic="q", settings=settings))
        with pytest.raises(InvalidConfig):
            call(client, m.QueueReceiveRequest(group="", topic="q"))
        with pytest.raises(InvalidConfig):
            call(client, m.QueueReceiveRequest(group="é" * 200, topic="q"))
        # Out-of-range counts and waits are cut to the limits, not refused.
        response = call(client, m.QueueReceiveRequest(group="g", topic="q", messages_max=-7, wait_ms=-1))
        assert response.deliveries == []
        response = call(
            client,
            m.QueueSettleRequest(
                group="g",
                topic="q",
                settlements=[
                    m.Settlement(
                        partition=0, offset=2**62, delivery_count=-3, action=m.SettleAction.REJECT, text="x" * 5000
                    ),
                ],
            ),
        )
        assert response.results[0].error_code is m.ErrorCode.UNKNOWN_DELIVERY
        with pytest.raises(NodiClientError):
            call(client, m.QueueSettleRequest(group="g", topic="missing", settlements=[]))
        client.produce("q", b"still serving", partition=0)
        with client.queue("q", "g") as queue:
            message = queue.receive(timeout_ms=WAIT_MS)
            assert message is not None
            assert message.value == b"still serving"
            message.ack()


def test_expired_messages_are_never_delivered_and_dropped_or_dead_lettered(clocked_broker) -> None:
    broker = clocked_broker
    with Client(broker.address) as client:
        client.create_topic("short", ttl_ms=200)  # the topic's default TTL
        client.produce("short", b"stale", partition=0)
        client.produce("short", b"fresh", partition=0, ttl_ms=600_000)  # its own TTL wins
        broker.advance_clock(300)  # past the short TTL, well within the long one
        with client.queue("short", "droppers") as queue:
            message = queue.receive(timeout_ms=WAIT_MS)
            assert message is not None
            assert message.value == b"fresh"
            message.ack()
            assert queue.receive(timeout_ms=200) is None
        state = client.describe_queue("short", "droppers")
        assert state.expired == "drop" and state.expired_messages == 1 and state.partitions[0].ack_floor == 2
        with client.queue("short", "keepers", expired="dead-letter") as queue:
            message = queue.receive(timeout_ms=WAIT_MS)
            assert message is not None
            assert message.value == b"fresh"
            message.ack()
        (letter,) = wait_for_messages(client, "short.dlq", 1)
        headers = dead_letter_headers(letter)
        assert (letter.value, headers["nodi-dlq-reason"]) == (b"stale", "expired")
        assert headers["nodi-dlq-delivery-count"] == "0"


def test_the_delivery_guarantee_is_one_argument(broker) -> None:
    from nodi.broker.client.errors import DeliverySettled

    with Client(broker.address) as client:
        client.create_topic("g1")
        for value in (b"handled", b"rejected", b"crashes"):
            client.produce("g1", value, partition=0)
        # at-least-once (the default): the loop acks what its body left unsettled.
        with client.queue("g1", "alo", ack_wait_ms=500) as queue:
            with pytest.raises(RuntimeError):
                for message in queue:
                    if message.value == b"rejected":
                        message.reject("no")
                    elif message.value == b"crashes":
                        raise RuntimeError("handler failed")
            queue.flush()
            again = queue.receive(timeout_ms=WAIT_MS)  # the one whose body raised
            assert again is not None
            assert (again.value, again.delivery_count) == (b"crashes", 2)
            again.ack()
        state = client.describe_queue("g1", "alo")
        assert state.acked == 2 and state.nacked == 0
        # at-most-once: acked on receipt, before it is handed out.
        with client.queue("g1", "amo", guarantee="at-most-once", batch_max=10) as queue:
            message = received(queue.receive(timeout_ms=WAIT_MS))
            assert client.describe_queue("g1", "amo").acked == 3  # the whole batch
            with pytest.raises(DeliverySettled):
                message.nack()
        with pytest.raises(ValueError):
            client.queue("g1", "x", guarantee="exactly-once")


def test_a_message_too_big_for_a_copy_with_headers_is_dead_lettered_without_its_value(broker) -> None:
    with Client(broker.address) as client:
        client.create_topic("big")
        huge = b"v" * (1024 * 1024 - 300)  # fits a batch alone, not with the dead-letter headers
        client.produce_batch("big", 0, build_batch([NewRecord(b"key", huge)]))
        client.produce("big", b"small", partition=0)
        with client.queue("big", "g", batch_max=2) as queue:
            for _ in range(2):
                received(queue.receive(timeout_ms=WAIT_MS)).reject("too big to handle")
        letters = wait_for_messages(client, "big.dlq", 2)
        by_offset = {int(letter.header("nodi-dlq-source-offset")): letter for letter in letters}
        assert by_offset[0].value is None and by_offset[0].header("nodi-dlq-value-omitted") == b"1"
        assert by_offset[0].key == b"key"
        assert by_offset[1].value == b"small" and by_offset[1].header("nodi-dlq-value-omitted") is None
