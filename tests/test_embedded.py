"""Embedded nodi (nodi.broker.open / open_async, issue 15): the client suite's main
scenarios run against a `nodi serve` process and an embedded data directory from one
parametrised fixture; then what only the embedded mode has: one owner per directory
(a second process attaches over the owner's socket and takes over when the owner closes
or is killed; a holder without a socket, `nodi serve`, is named by PID, nothing
changed), kill -9 of an embedded producer with every acknowledged message found after
reopen, the same directory served by `nodi serve` and opened embedded in turn, and no
thread or socket left after close(). Waits are generous; no timing is asserted."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import nodi.broker
from nodi.broker import AsyncClient, Client, DataDirectoryLockedError
from nodi.broker.client.errors import UnknownTopic
from nodi.broker.protocol.headers import CORRELATION_ID

from conftest import BrokerProcess, received

WAIT_MS = 20_000
CHILD_TIMEOUT_S = 60


@pytest.fixture(params=["server", "embedded"])
def client(request, tmp_path):
    """A blocking Client: of the module's `nodi serve` (topics of each test's own), or
    an embedded one over a fresh directory."""
    if request.param == "server":
        server = request.getfixturevalue("server")
        with Client(server.address) as connected:
            yield connected
    else:
        with nodi.broker.open(tmp_path / "data") as embedded:
            yield embedded


@pytest.fixture(params=["server", "embedded"])
def async_client_factory(request, tmp_path):
    """Makes an AsyncClient of the module's server, or an embedded one (on the loop
    that enters it)."""
    if request.param == "server":
        server = request.getfixturevalue("server")
        return lambda: AsyncClient(server.address)
    return lambda: nodi.broker.open_async(tmp_path / "data")


def topic_name(name: str) -> str:
    """`name`, made unique on the shared server (the embedded directory is fresh)."""
    return f"{name}-{os.getpid()}-{time.monotonic_ns()}"


def wait_for_messages(client: Client, topic: str, count: int) -> list:
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        found = []
        try:
            for partition in range(client.partition_count(topic, refresh=True)):
                found += client.fetch(topic, partition, 0)
        except UnknownTopic:
            pass
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# -- the main scenarios, on both ---------------------------------------------------------


def test_producer_and_two_groups_each_read_every_message(client) -> None:
    topic = topic_name("fanout")
    client.create_topic(topic, partitions=3)
    with client.producer(linger_ms=5) as producer:
        futures = [producer.send(topic, b"m%d" % index, key=b"k%d" % index) for index in range(300)]
        producer.flush()
    placed = {future.result(WAIT_MS / 1000) for future in futures}
    assert len(placed) == 300
    for group in ("billing", "audit"):
        with client.consumer(topic, group=group, idle_timeout_ms=1_000, session_timeout_ms=10_000) as consumer:
            seen = {(message.partition, message.offset): message.value for message in consumer}
        assert set(seen) == placed
        assert sorted(seen.values()) == sorted(b"m%d" % index for index in range(300))
        assert sum(lag.committed_offset for lag in client.describe_group(group).lags) == 300


def test_publish_dedup_answers_a_retry_with_the_original(client) -> None:
    topic = topic_name("payments")
    client.create_topic(topic, dedup_window_ms=60_000)
    first = client.produce(topic, b"pay 7", idempotency_key="payment-7")
    assert client.produce(topic, b"pay 7", idempotency_key="payment-7") == first
    assert [message.value for message in client.fetch(topic, first[0], 0)] == [b"pay 7"]


def test_queue_retries_then_dead_letters(client) -> None:
    topic = topic_name("orders")
    client.create_topic(topic, partitions=2)
    client.produce(topic, b"poison", key=b"customer-7", partition=1)
    client.produce(topic, b"fine", partition=0)
    with client.queue(topic, "billing", max_deliveries=2, backoff=[0], ack_wait_ms=60_000) as queue:
        values = []
        for _ in range(3):
            message = queue.receive(timeout_ms=WAIT_MS)
            assert message is not None
            values.append((message.value, message.delivery_count))
            if message.value == b"fine":
                message.ack()
            else:
                message.nack(error="database down")
        assert queue.receive(timeout_ms=300) is None  # dead-lettered, not delivered again
    assert sorted(values) == [(b"fine", 1), (b"poison", 1), (b"poison", 2)]
    (letter,) = wait_for_messages(client, f"{topic}.dlq", 1)
    headers = {name: value.decode() for name, value in letter.headers if name.startswith("nodi-dlq-")}
    assert (letter.partition, letter.value) == (1, b"poison")
    assert headers["nodi-dlq-reason"] == "max-deliveries"
    assert headers["nodi-dlq-last-error"] == "database down"
    assert headers["nodi-dlq-delivery-count"] == "2"
    assert client.describe_queue(topic, "billing").dead_lettered == 1


def test_expired_messages_are_skipped_by_fetch_and_queues(client) -> None:
    topic = topic_name("short")
    client.create_topic(topic, ttl_ms=200)
    client.produce(topic, b"stale", partition=0)
    client.produce(topic, b"fresh", partition=0, ttl_ms=600_000)
    time.sleep(0.4)  # twice the topic's TTL
    assert [message.value for message in client.fetch(topic, 0, 0)] == [b"fresh"]
    assert len(client.fetch(topic, 0, 0, include_expired=True)) == 2
    with client.queue(topic, "droppers") as queue:
        message = queue.receive(timeout_ms=WAIT_MS)
        assert message is not None and message.value == b"fresh"
        message.ack()
        assert queue.receive(timeout_ms=200) is None
    assert client.describe_queue(topic, "droppers").expired_messages == 1


def test_a_delayed_message_is_delivered_only_when_due(client) -> None:
    topic = topic_name("later")
    client.create_topic(topic)
    client.produce(topic, b"delayed", partition=0, delay_ms=700)
    client.produce(topic, b"now", partition=0)
    with client.queue(topic, "g") as queue:
        first = queue.receive(timeout_ms=WAIT_MS)
        assert first is not None and first.value == b"now"
        first.ack()
        delayed = queue.receive(timeout_ms=WAIT_MS)
        assert delayed is not None and delayed.value == b"delayed"
        assert int(time.time() * 1000) >= delayed.timestamp + 700  # never before it is due
        delayed.ack()


def test_request_reply_with_a_responder_thread(client) -> None:
    topic = topic_name("rpc")
    client.create_topic(topic)
    stop = threading.Event()
    errors: list[BaseException] = []

    def respond() -> None:
        try:
            with client.queue(topic, "responders", batch_max=10) as queue:
                while not stop.is_set():
                    message = queue.receive(timeout_ms=200)
                    if message is not None:
                        assert message.reply(b"re:" + message.value)
                        message.ack(wait=False)
                queue.flush()
        except BaseException as error:  # reported below
            errors.append(error)

    responder = threading.Thread(target=respond)
    responder.start()
    try:
        replies = [client.request(topic, b"q%d" % index, timeout_ms=WAIT_MS) for index in range(5)]
    finally:
        stop.set()
        responder.join(30)
    assert not errors
    assert [reply.value for reply in replies] == [b"re:q%d" % index for index in range(5)]
    assert len({reply.header(CORRELATION_ID) for reply in replies}) == 5


def test_async_produce_fetch_long_poll_and_queue(async_client_factory) -> None:
    async def main() -> None:
        async with async_client_factory() as client:
            topic = f"async-{os.getpid()}-{time.monotonic_ns()}"
            await client.create_topic(topic)
            waiting = asyncio.ensure_future(client.fetch(topic, 0, 0, wait_ms=10_000))
            await asyncio.sleep(0.1)
            assert await client.produce(topic, b"one", partition=0) == (0, 0)
            assert [message.value for message in await waiting] == [b"one"]
            async with client.queue(topic, "workers") as queue:
                message = await queue.receive(timeout_ms=WAIT_MS)
                assert message is not None and message.value == b"one"
                await message.ack()

    asyncio.run(asyncio.wait_for(main(), 60))


# -- one owner per directory -------------------------------------------------------------

OPEN_IN_CHILD = """
import sys
import nodi.broker
try:
    client = nodi.broker.open(sys.argv[1], attach=sys.argv[2] == "attach")
except nodi.broker.DataDirectoryLockedError as error:
    print("refused:", error.holder_pid, error)
    sys.exit(3)
with client:
    values = [message.value.decode() for message in client.fetch("jobs", 0, 0)]
    client.produce("jobs", b"from-child", partition=0)
    print("opened", "owner" if client.owner else "attached", *values)
"""


def open_in_child(data_dir: str, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", OPEN_IN_CHILD, data_dir, mode], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )


def test_a_second_process_attaches_and_a_holder_without_a_socket_is_named(tmp_path, monkeypatch) -> None:
    from nodi.broker.client import embedded

    data_dir = str(tmp_path / "data")
    with nodi.broker.open(data_dir) as client:
        assert client.owner
        client.create_topic("jobs")
        client.produce("jobs", b"kept", partition=0)
        child = open_in_child(data_dir, "attach")
        assert child.stdout.split() == ["opened", "attached", "kept"], child.stdout + child.stderr
        refused = open_in_child(data_dir, "no-attach")
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert refused.stdout.startswith(f"refused: {os.getpid()} ")
        with pytest.raises(RuntimeError, match=f"in use by process {os.getpid()}"):
            BrokerProcess(data_dir).start()
        with nodi.broker.open(data_dir) as second:  # a second open here attaches too
            assert not second.owner
            assert [message.value for message in second.fetch("jobs", 0, 0)] == [b"kept", b"from-child"]
        assert [message.value for message in client.fetch("jobs", 0, 0)] == [b"kept", b"from-child"]
    socket_path = os.path.join(data_dir, "nodi.sock")
    assert not os.path.exists(socket_path)  # removed by close()
    served = BrokerProcess(data_dir).start()  # a holder with no attach socket: refused, named
    assert served.process is not None  # started
    try:
        with pytest.raises(DataDirectoryLockedError) as raised:
            nodi.broker.open(data_dir)
        assert raised.value.holder_pid == served.process.pid
        # A stale socket file (as an owner killed with kill -9 leaves it) under that holder:
        # nobody answers on it, and after STALE_SOCKET_WAIT_MS the holder is named too.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(socket_path)
        stale.close()
        monkeypatch.setattr(embedded, "STALE_SOCKET_WAIT_MS", 300)
        with pytest.raises(DataDirectoryLockedError) as raised:
            nodi.broker.open(data_dir)
        assert raised.value.holder_pid == served.process.pid
        with Client(served.address) as client:
            assert [message.value for message in client.fetch("jobs", 0, 0)] == [b"kept", b"from-child"]
    finally:
        served.stop()
    with nodi.broker.open(data_dir) as client:  # the next owner replaces the stale file
        assert client.owner and os.path.exists(socket_path)


WORKER = """
import sys
import nodi.broker

client = nodi.broker.open(sys.argv[1])
print("opened", client.owner, flush=True)
for line in sys.stdin:
    command = line.split()
    if command[0] == "consume":
        values = []
        with client.queue("jobs", "workers", ack_wait_ms=60_000) as queue:
            while (message := queue.receive(timeout_ms=1_500)) is not None:
                values.append(message.value.decode())
                message.ack()
        print("consumed", *values, flush=True)
    elif command[0] == "produce":
        partition, offset = client.produce("jobs", command[1].encode(), partition=0)
        print("produced", offset, client.owner, flush=True)
"""


def test_two_processes_share_a_queue_and_the_survivor_takes_over(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    owner = nodi.broker.open(data_dir)
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, data_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert worker.stdin is not None  # PIPE
    assert worker.stdout is not None  # PIPE
    again = None
    try:
        owner.create_topic("jobs")
        with owner.producer() as producer:
            for index in range(300):
                producer.send("jobs", b"v%d" % index, partition=0)
        assert worker.stdout.readline().split() == ["opened", "False"]  # attached
        worker.stdin.write("consume\n")
        mine = []
        with owner.queue("jobs", "workers", ack_wait_ms=60_000) as queue:
            while (message := queue.receive(timeout_ms=1_500)) is not None:
                assert message.value is not None  # the jobs have values
                mine.append(message.value.decode())
                message.ack()
        theirs = worker.stdout.readline().split()
        assert theirs[0] == "consumed"
        assert sorted(mine + theirs[1:]) == sorted(f"v{index}" for index in range(300))  # each once
        owner.close()  # the worker's next call takes the directory over
        worker.stdin.write("produce after-takeover\n")
        assert worker.stdout.readline().split() == ["produced", "300", "True"]
        again = nodi.broker.open(data_dir)  # attaches to the worker, the owner now
        assert not again.owner
        assert again.fetch("jobs", 0, 300)[0].value == b"after-takeover"
        os.kill(worker.pid, 9)  # the owner dies: the attached one takes over
        worker.wait(30)
        assert again.list_topics()  # a read, retried on a new connection: this one owns it now
        assert again.owner
        assert again.produce("jobs", b"survivor", partition=0) == (0, 301)
        values = []
        while len(values) < 302:
            batch = again.fetch("jobs", 0, len(values))
            assert batch
            values += [message.value for message in batch]
        assert values[300:] == [b"after-takeover", b"survivor"]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)
        worker.stdin.close()
        worker.stdout.close()
        owner.close()
        if again is not None:
            again.close()


# -- crashes and the same files both ways --------------------------------------------------

EMBEDDED_PRODUCER = """
import sys
import nodi.broker

with nodi.broker.open(sys.argv[1]) as client:
    client.create_topic("events", partitions=2)
    print("ready", flush=True)
    with client.producer(linger_ms=2) as producer:
        index = 0
        while True:
            futures = [producer.send("events", b"event-%d" % (index + n), key=b"k%d" % (index + n)) for n in range(50)]
            producer.flush()
            for n, future in enumerate(futures):
                partition, offset = future.result(60)
                print(index + n, partition, offset, flush=True)  # acknowledged: durable
            index += 50
"""


def test_kill_9_of_an_embedded_producer_loses_no_acknowledged_message_and_serve_reopens_it(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    child = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED_PRODUCER, data_dir], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    acknowledged: dict[tuple[int, int], bytes] = {}
    assert child.stdout is not None  # PIPE
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while len(acknowledged) < 500 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            index, partition, offset = map(int, line.split())
            acknowledged[(partition, offset)] = b"event-%d" % index
    finally:
        os.kill(child.pid, 9)
        child.wait(30)
        child.stdout.close()
    assert len(acknowledged) >= 500

    def stored(client: Client) -> dict[tuple[int, int], bytes | None]:
        found = {}
        for partition in range(2):
            offset = 0
            while True:
                batch = client.fetch("events", partition, offset)
                if not batch:
                    break
                found.update({(message.partition, message.offset): message.value for message in batch})
                offset = batch[-1].offset + 1
        return found

    # Reopened embedded (recovery after the kill): every acknowledged message is there.
    client: Client  # the embedded client, then the server's
    with nodi.broker.open(data_dir) as client:
        after_crash = stored(client)
        assert all(after_crash.get(place) == value for place, value in acknowledged.items())
        client.produce("events", b"embedded-last", partition=0)
    # `nodi serve` opens what the embedded mode wrote, and writes on.
    served = BrokerProcess(data_dir).start()
    try:
        with Client(served.address) as client:
            by_server = stored(client)
            assert all(by_server.get(place) == value for place, value in acknowledged.items())
            assert by_server[max(place for place in by_server if place[0] == 0)] == b"embedded-last"
            client.produce("events", b"served-last", partition=1)
            with client.queue("events", "workers") as queue:
                message = queue.receive(timeout_ms=WAIT_MS)
                assert message is not None
                message.ack()
                delivered_by_server = (message.partition, message.offset)
    finally:
        assert served.stop() == 0
    # And the embedded mode opens what the server wrote: messages and queue state.
    with nodi.broker.open(data_dir) as client:
        final = stored(client)
        assert final == {**by_server, max(place for place in final if place[0] == 1): b"served-last"}
        with client.queue("events", "workers") as queue:
            message = queue.receive(timeout_ms=WAIT_MS)
            assert message is not None
            assert (message.partition, message.offset) != delivered_by_server
            message.ack()


# -- nothing left behind ---------------------------------------------------------------------


def open_sockets() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def test_close_leaves_no_thread_socket_or_lock(tmp_path) -> None:
    threads_before = set(threading.enumerate())
    sockets_before = open_sockets()
    data_dir = tmp_path / "data"
    with nodi.broker.open(data_dir) as client:
        client.create_topic("jobs", partitions=2)
        with client.producer() as producer:
            for index in range(100):
                producer.send("jobs", b"%d" % index)
        with client.queue("jobs", "g") as queue:
            received(queue.receive(timeout_ms=WAIT_MS)).ack()
        assert len(threading.enumerate()) > len(threads_before)  # the loop and the fsync flushers
    assert set(threading.enumerate()) == threads_before
    assert open_sockets() == sockets_before

    async def main() -> None:
        async with nodi.broker.open_async(data_dir) as client:
            assert len(await client.fetch("jobs", 0, 0)) + len(await client.fetch("jobs", 1, 0)) == 100
        assert client.closed

    asyncio.run(main())
    assert set(threading.enumerate()) == threads_before
    assert open_sockets() == sockets_before
    with nodi.broker.open(data_dir) as client:  # the lock went with the close
        assert client.describe_topic("jobs").partitions


def test_a_refused_open_and_calls_after_close_are_clear_errors_and_leave_nothing(tmp_path) -> None:
    from nodi.broker import ClientClosed

    threads_before = set(threading.enumerate())
    data_dir = tmp_path / "data"
    client = nodi.broker.open(data_dir)
    with pytest.raises(DataDirectoryLockedError, match=f"in use by process {os.getpid()}"):
        nodi.broker.open(data_dir, attach=False)
    client.close()
    client.close()  # idempotent
    with pytest.raises(ClientClosed):
        client.list_topics()
    assert set(threading.enumerate()) == threads_before
    with pytest.raises(NotADirectoryError):  # not a directory: refused, nothing written
        nodi.broker.open(tmp_path / "data" / "nodi.lock")
    assert set(threading.enumerate()) == threads_before


def test_request_limits_hold_in_process_and_the_broker_carries_on(tmp_path) -> None:
    from nodi.broker import LimitExceeded
    from nodi.broker.protocol.limits import ProtocolLimits
    from nodi.broker.server.config import ServerConfig
    from nodi.storage.records import NewRecord, build_batch

    limits = ProtocolLimits(frame_bytes_max=64 * 1024, receive_buffer_bytes_max=128 * 1024)
    with nodi.broker.open(tmp_path / "data", config=ServerConfig(protocol=limits)) as client:
        client.create_topic("jobs")
        with pytest.raises(LimitExceeded, match="frame_bytes_max"):
            client.produce_batch("jobs", 0, build_batch([NewRecord(None, bytes(100 * 1024))]))
        assert client.produce("jobs", b"small", partition=0) == (0, 0)
        assert [message.value for message in client.fetch("jobs", 0, 0)] == [b"small"]


def test_the_embedded_broker_closes_idle_partitions_and_reopens_them_on_use(tmp_path) -> None:
    """partition_idle_close_ms holds in process as under `nodi serve`: a partition
    nothing used for that long is closed cleanly, and reads back its data when next used."""
    from nodi.broker.client.embedded import EmbeddedAsyncClient
    from nodi.broker.server.config import ServerConfig

    partitions = 3

    async def main() -> None:
        config = ServerConfig(partition_idle_close_ms=1000)
        client = EmbeddedAsyncClient(tmp_path / "data", config=config, attach=False)
        async with client:
            await client.create_topic("idle", partitions=partitions)
            for partition in range(partitions):
                await client.produce("idle", b"m%d" % partition, partition=partition, acks="durable")
            local = client._local
            assert local is not None
            deadline = time.monotonic() + 60
            while local.store.open_statistics().open > 0:
                assert time.monotonic() < deadline, "the idle partitions were not closed"
                await asyncio.sleep(0.2)
            assert local.store.open_statistics().idle_closed >= partitions
            for partition in range(partitions):
                (message,) = await client.fetch("idle", partition, 0)
                assert message.value == b"m%d" % partition
            assert local.store.open_statistics().open == partitions

    asyncio.run(main())
