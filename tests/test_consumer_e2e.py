"""Consumers end to end against a real `nodi serve` process: publish/subscribe across
groups, one group scaled over child processes (and one of them killed with SIGKILL),
replay by offset and by time, auto-commit that never passes what the application has
not handled, and bad frames from a raw socket while a real client keeps working."""

from __future__ import annotations

import datetime
import json
import struct
import sys
import threading
import time

import pytest

from nodi.broker import Client
from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode

from test_cli_broker import Running
from test_server import RawClient

TIMEOUT_S = 60
# A killed member's partitions move on after about this long (the server accepts 1 s and
# more; 2 s leaves room for heartbeats late on a busy machine).
SESSION_TIMEOUT_MS = 2_000


@pytest.fixture
def client(server):
    with Client(server.address, timeout_ms=10_000) as client:
        yield client


def wait_for(condition, what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def produce_numbered(client, topic: str, numbers: range) -> dict[str, tuple[int, int]]:
    """Values str(n), spread over the partitions; value -> (partition, offset)."""
    producer = client.producer(linger_ms=2)
    futures = {str(number): producer.send(topic, str(number)) for number in numbers}
    producer.flush()
    placed = {value: future.result() for value, future in futures.items()}
    producer.close()
    return placed


def read_until(consumer, wanted: int, timeout_s: float = TIMEOUT_S) -> list:
    messages: list = []
    deadline = time.monotonic() + timeout_s
    while len(messages) < wanted:
        assert time.monotonic() < deadline, f"read {len(messages)} of {wanted} messages"
        messages.extend(consumer.poll(500))
    return messages


# ---------------------------------------------------------------------------
# (a) publish/subscribe


def test_three_groups_each_receive_every_message(server, client):
    client.create_topic("fanout", partitions=3)
    placed = produce_numbered(client, "fanout", range(600))
    for group in ("billing", "audit", "search"):
        with client.consumer("fanout", group=group, session_timeout_ms=10_000) as consumer:
            messages = read_until(consumer, len(placed))
            assert len(messages) == len(placed)  # every message once, no more
            assert {message.value.decode(): (message.partition, message.offset) for message in messages} == placed
            for partition in range(3):  # in order per partition
                offsets = [message.offset for message in messages if message.partition == partition]
                assert offsets == sorted(offsets)
    for group in ("billing", "audit", "search"):
        lags = client.describe_group(group).lags
        assert sum(lag.committed_offset for lag in lags) == len(placed)


def test_auto_commit_never_passes_the_batch_being_handled(server, client):
    """An auto-commit (due at every poll here) commits what earlier polls returned, not
    the batch this poll returns: a member that dies while handling it loses nothing."""
    client.create_topic("handled")
    produce_numbered(client, "handled", range(10))
    consumer = client.consumer("handled", group="careful", auto_commit_interval_ms=0, session_timeout_ms=10_000)
    try:
        first = consumer.poll(5_000)
        assert first
        assert client.fetch_offsets("careful", ["handled"]).get(("handled", 0), 0) == 0
        produce_numbered(client, "handled", range(10, 20))
        second = read_until(consumer, 1)
        assert client.fetch_offsets("careful", ["handled"])[("handled", 0)] == first[-1].offset + 1
        assert second[0].offset == first[-1].offset + 1
    finally:
        consumer.close()
    assert client.fetch_offsets("careful", ["handled"])[("handled", 0)] == second[-1].offset + 1


# ---------------------------------------------------------------------------
# (b) one group over three processes, one killed

MEMBER = """
import json, sys
from nodi.broker import Client

address, topic, group, session_timeout_ms = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with Client(address, timeout_ms=10_000) as client:
    consumer = client.consumer(topic, group=group, session_timeout_ms=session_timeout_ms,
                               auto_commit_interval_ms=100, wait_ms=200)
    reported = None
    while True:
        batch = consumer.poll(200)
        for message in batch:
            print(json.dumps({"message": [message.partition, message.offset, message.value.decode()]}))
        assignment = sorted(partition for _, partition in consumer.assignment())
        if assignment != reported:
            print(json.dumps({"assignment": assignment}))
            reported = assignment
        sys.stdout.flush()
"""


class Member:
    """A consumer-group member in a child process; a thread gathers what it reports."""

    def __init__(self, server, topic: str, group: str) -> None:
        command = [sys.executable, "-c", MEMBER, server.address, topic, group, str(SESSION_TIMEOUT_MS)]
        self.running = Running(command)
        self.assignment: list[int] = []
        self.history: list[list[int]] = []  # every assignment it reported, in order
        self.received: list[tuple[int, int, str]] = []
        self._lock = threading.Lock()
        self._gather = threading.Thread(target=self._take, daemon=True)
        self._gather.start()

    def _take(self) -> None:
        while True:
            line = self.running.lines.get()
            report = json.loads(line)
            with self._lock:
                if "assignment" in report:
                    self.assignment = report["assignment"]
                    self.history.append(self.assignment)
                else:
                    self.received.append(tuple(report["message"]))

    def snapshot(self) -> tuple[list[int], list[tuple[int, int, str]]]:
        with self._lock:
            return list(self.assignment), list(self.received)

    def changed_since(self, mark: int) -> set[int]:
        """Partitions this member gained or lost after its mark-th assignment."""
        with self._lock:
            history = self.history[mark:]
        return {partition for old, new in zip(history, history[1:]) for partition in set(old) ^ set(new)}


def test_three_members_split_six_partitions_and_take_over_from_a_killed_one(server, client) -> None:
    client.create_topic("scaled", partitions=6)
    members = [Member(server, "scaled", "workers") for _ in range(3)]
    try:

        def split_evenly(alive: list[Member], each: int) -> bool:
            assignments = [member.snapshot()[0] for member in alive]
            every = sorted(partition for assignment in assignments for partition in assignment)
            return all(len(assignment) == each for assignment in assignments) and every == list(range(6))

        wait_for(lambda: split_evenly(members, 2), "three members with two partitions each")
        assert len(client.describe_group("workers").members) == 3
        marks = [len(member.history) - 1 for member in members]  # nothing was produced before

        def received() -> list[tuple[int, int, str]]:
            return [message for member in members for message in member.snapshot()[1]]

        first = produce_numbered(client, "scaled", range(600))
        wait_for(lambda: {value for _, _, value in received()} >= set(first), "the first 600 messages")

        victim, survivors = members[0], members[1:]
        orphaned = set(victim.snapshot()[0])
        victim.running.process.kill()  # SIGKILL: no leave, no last commit
        victim.running.process.wait(TIMEOUT_S)
        second = produce_numbered(client, "scaled", range(600, 1200))
        wait_for(lambda: split_evenly(survivors, 3), "the two survivors with three partitions each")
        placed = {**first, **second}
        wait_for(lambda: {value for _, _, value in received()} >= set(placed), "all 1200 messages")

        everything = received()
        seen: dict[tuple[int, int], int] = {}
        for partition, offset, value in everything:
            assert placed[value] == (partition, offset)
            seen[(partition, offset)] = seen.get((partition, offset), 0) + 1
        assert set(seen) == set(placed.values())  # at least once: nothing lost
        duplicated = {partition for (partition, _), times in seen.items() if times > 1}
        # Partitions that changed hands after the first even split: the victim's, those
        # the range assignment moved between the survivors, and any a slow heartbeat
        # moved on a busy machine.
        moved = set().union(*(member.changed_since(mark) for member, mark in zip(members, marks)))
        assert orphaned <= moved
        assert duplicated <= moved  # repeats only where a partition changed hands
        group = client.describe_group("workers")
        assert len(group.members) == 2
    finally:
        for member in members:
            if member.running.process.poll() is None:
                member.running.process.kill()
                member.running.process.wait()


# ---------------------------------------------------------------------------
# (c) replay


def test_replay_by_offset_and_by_time(server, client):
    client.create_topic("history", partitions=2)
    base = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)
    for number in range(20):
        client.produce(
            "history", f"h{number}", partition=number % 2, timestamp=base + datetime.timedelta(seconds=number)
        )

    def values(messages) -> list[str]:
        return sorted((message.value.decode() for message in messages), key=lambda value: int(value[1:]))

    def check_reads(expected: list[str], group: str | None, **options) -> None:
        """The consumer reads `expected` (in any order across partitions), then nothing
        more; closing commits in a group."""
        with client.consumer("history", group=group, session_timeout_ms=10_000, **options) as consumer:
            messages = read_until(consumer, len(expected))
            messages.extend(consumer.poll(300))
            assert values(messages) == expected

    every = [f"h{n}" for n in range(20)]
    check_reads(every, "replayer")
    check_reads([], "replayer")  # committed at close

    assert client.reset_group("replayer", "history", "earliest") == {0: 0, 1: 0}
    check_reads(every, "replayer")
    assert client.reset_group("replayer", "history", 7) == {0: 7, 1: 7}
    check_reads([f"h{n}" for n in range(14, 20)], "replayer")
    at = base + datetime.timedelta(seconds=15)
    assert client.reset_group("replayer", "history", at) == {0: 8, 1: 7}  # h16 and h15
    check_reads([f"h{n}" for n in range(15, 20)], "replayer")
    assert client.reset_group("replayer", "history", at, partitions=[1]) == {1: 7}
    check_reads(["h15", "h17", "h19"], "replayer")
    assert client.reset_group("replayer", "history", "latest") == {0: 10, 1: 10}
    check_reads([], "replayer")

    check_reads([f"h{n}" for n in range(16, 20)], None, start=8)
    check_reads(["h18", "h19"], None, start=base + datetime.timedelta(seconds=17, milliseconds=500))
    check_reads([f"h{n}" for n in range(10, 20)], "late-comer", start=base + datetime.timedelta(seconds=10))
    check_reads([], None, start="latest")


# ---------------------------------------------------------------------------
# (d) bad frames from a raw socket while another client works


def test_bad_frames_get_typed_errors_while_another_client_keeps_working(server, client) -> None:
    client.create_topic("steady")
    stop = threading.Event()
    acknowledged: list[tuple[int, str]] = []
    failures: list[BaseException] = []

    def keep_working() -> None:
        try:
            with Client(server.address, timeout_ms=10_000) as worker:
                number = 0
                while not stop.is_set() or number < 50:
                    _, offset = worker.produce("steady", f"s{number}")
                    acknowledged.append((offset, f"s{number}"))
                    (fetched,) = worker.fetch("steady", 0, offset)
                    assert fetched.value == f"s{number}".encode()
                    number += 1
        except BaseException as error:  # noqa: BLE001 - reported by the test
            failures.append(error)

    worker = threading.Thread(target=keep_working)
    worker.start()
    try:
        address = (server.host, server.port)
        for garbage, code in (
            (struct.pack(">I", 0xFFFFFFF0), ErrorCode.FRAME_TOO_LARGE),  # oversize length prefix
            (struct.pack(">I", 10) + bytes([7, 0]) + b"\x00" * 8, ErrorCode.MALFORMED_FRAME),  # unknown kind
        ):
            attacker = RawClient(address).handshake()
            attacker.socket.sendall(garbage)
            closing = attacker.next_message()
            assert isinstance(closing, m.ClosingEvent) and closing.error_code == code
            assert attacker.socket.recv(1) == b""  # the server closed it
            attacker.close()

        # A well-framed request with an undecodable body: answered, and the connection
        # carries on.
        attacker = RawClient(address).handshake()
        request = m.ListOffsetsRequest(request_id=attacker.connection.next_request_id(), topic="steady", partition=0)
        frame = attacker.connection.send(request)
        body_cut = frame[:-3]
        attacker.socket.sendall(struct.pack(">I", len(body_cut) - 4) + body_cut[4:])
        answer = attacker.next_message()
        assert answer.request_id == request.request_id and answer.error_code == ErrorCode.INVALID_REQUEST
        assert attacker.call(m.ListTopicsRequest).error_code == ErrorCode.NONE
        attacker.close()
    finally:
        stop.set()
        worker.join(TIMEOUT_S)
    assert not failures, failures
    assert len(acknowledged) >= 50
    stored = client.fetch("steady", 0, 0, bytes_max=1 << 22)
    assert [(message.offset, message.value.decode()) for message in stored] == acknowledged
