"""The server against raw sockets: the protocol end to end, and bad input that never
takes the server or another client down."""

from __future__ import annotations

import socket
import struct

import pytest

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.connection import NEED_DATA, Connection, ConnectionClosed, Role
from nodi.broker.protocol.errors import ErrorCode
from nodi.storage import records

TIMEOUT_S = 10


class RawClient:
    def __init__(self, address: tuple[str, int]) -> None:
        self.socket = socket.create_connection(address, timeout=TIMEOUT_S)
        self.connection = Connection(Role.CLIENT)

    def call(self, request_type, **fields):
        request = request_type(request_id=self.connection.next_request_id(), **fields)
        self.socket.sendall(self.connection.send(request))
        return self.next_message()

    def next_message(self):
        while True:
            event = self.connection.next_event()
            if event is not NEED_DATA:
                return event
            self.connection.receive_data(self.socket.recv(1 << 20))

    def handshake(self) -> RawClient:
        response = self.call(m.HandshakeRequest, client_id="raw")
        assert response.error_code == ErrorCode.NONE
        return self

    def close(self) -> None:
        self.socket.close()


def _address(broker) -> tuple[str, int]:
    return broker.host, broker.port


def _batch(*values: bytes) -> bytes:
    return records.build_batch([records.NewRecord(None, value) for value in values])


def test_produce_fetch_round_trip(broker):
    client = RawClient(_address(broker)).handshake()
    created = client.call(m.CreateTopicRequest, name="orders", settings=m.TopicSettings(partitions=2))
    assert created.error_code == ErrorCode.NONE and created.settings.partitions == 2
    produced = client.call(m.ProduceRequest, topic="orders", partition=1, records=_batch(b"a", b"b"))
    assert (produced.base_offset, produced.last_offset) == (0, 1)
    fetched = client.call(m.FetchRequest, topic="orders", partition=1, offset=0)
    assert fetched.high_watermark == 2
    assert [record.value for record in records.decode_batches(fetched.records)] == [b"a", b"b"]
    described = client.call(m.DescribeTopicRequest, name="orders")
    assert [p.log_end_offset for p in described.partitions] == [0, 2]
    assert client.call(m.CreateTopicRequest, name="orders").error_code == ErrorCode.TOPIC_EXISTS
    assert client.call(m.FetchRequest, topic="orders", partition=5, offset=0).error_code == ErrorCode.UNKNOWN_PARTITION
    assert (
        client.call(m.FetchRequest, topic="orders", partition=1, offset=99).error_code == ErrorCode.OFFSET_OUT_OF_RANGE
    )
    client.close()


def test_long_poll_fetch_is_woken_by_a_produce(broker):
    consumer = RawClient(_address(broker)).handshake()
    producer = RawClient(_address(broker)).handshake()
    producer.call(m.CreateTopicRequest, name="t")
    request = m.FetchRequest(
        request_id=consumer.connection.next_request_id(), topic="t", partition=0, offset=0, wait_ms=20_000
    )
    consumer.socket.sendall(consumer.connection.send(request))
    producer.call(m.ProduceRequest, topic="t", partition=0, records=_batch(b"wake"))
    fetched = consumer.next_message()  # returns long before wait_ms: the produce woke it
    assert [record.value for record in records.decode_batches(fetched.records)] == [b"wake"]


def test_bad_records_are_refused_and_nothing_is_written(broker):
    client = RawClient(_address(broker)).handshake()
    client.call(m.CreateTopicRequest, name="t")
    good = _batch(b"x")
    corrupt = good[:-1] + bytes([good[-1] ^ 0xFF])
    assert (
        client.call(m.ProduceRequest, topic="t", partition=0, records=corrupt).error_code == ErrorCode.INVALID_RECORDS
    )
    assert (
        client.call(m.ProduceRequest, topic="t", partition=0, records=good + b"junk").error_code
        == ErrorCode.INVALID_RECORDS
    )
    assert client.call(m.ProduceRequest, topic="nope", partition=0, records=good).error_code == ErrorCode.UNKNOWN_TOPIC
    assert client.call(m.ListOffsetsRequest, topic="t", partition=0).offset == 0


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">I", 0xFFFFFFF0),  # oversize length prefix
        struct.pack(">I", 3) + b"abc",  # shorter than a frame header
        struct.pack(">I", 10) + bytes([9, 0]) + b"\x00" * 8,  # unknown frame kind
    ],
)
def test_garbage_closes_only_that_connection(broker, garbage):
    bystander = RawClient(_address(broker)).handshake()
    bystander.call(m.CreateTopicRequest, name="still-here")
    attacker = RawClient(_address(broker)).handshake()
    attacker.socket.sendall(garbage)
    closing = attacker.next_message()
    assert isinstance(closing, m.ClosingEvent)
    assert closing.error_code in (ErrorCode.FRAME_TOO_LARGE, ErrorCode.MALFORMED_FRAME)
    assert attacker.socket.recv(1) == b""  # closed by the server
    produced = bystander.call(m.ProduceRequest, topic="still-here", partition=0, records=_batch(b"ok"))
    assert produced.error_code == ErrorCode.NONE


def test_request_before_handshake_is_refused(broker):
    client = RawClient(_address(broker))
    client.connection = Connection(Role.CLIENT)
    frame = m.ListTopicsRequest(request_id=1)
    # Encode as if the handshake had happened, to get a well-formed frame.
    shadow = Connection(Role.CLIENT)
    shadow._state = shadow._state.__class__.READY
    shadow.protocol_version = 1
    client.socket.sendall(shadow.send(frame))
    data = client.socket.recv(1 << 16)
    server_view = Connection(Role.CLIENT)
    server_view.receive_data(data)
    event = server_view.next_event()
    assert isinstance(event, (m.ClosingEvent, ConnectionClosed))
    if isinstance(event, m.ClosingEvent):
        assert event.error_code == ErrorCode.HANDSHAKE_REQUIRED


def test_unknown_api_is_answered_and_the_connection_carries_on(broker):
    client = RawClient(_address(broker)).handshake()
    header = struct.pack(">BBHHI", 0, 0, 999, 1, 77)
    client.socket.sendall(struct.pack(">I", len(header)) + header)
    client.connection._in_flight[77] = (999, 1)  # so our decoder accepts the answer
    answer = client.next_message()
    assert answer.request_id == 77 and answer.error_code == ErrorCode.UNKNOWN_API
    assert client.call(m.ListTopicsRequest).error_code == ErrorCode.NONE  # same connection


def test_metrics_endpoint_reports_the_workload(broker_factory):
    import urllib.request

    process = broker_factory()
    process.metrics = True
    process.start()
    client = RawClient((process.host, process.port)).handshake()
    client.call(m.CreateTopicRequest, name="measured")
    client.call(m.ProduceRequest, topic="measured", partition=0, records=_batch(b"a", b"b", b"c"))
    client.call(m.ProduceRequest, topic="absent", partition=0, records=_batch(b"a"))
    with urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=TIMEOUT_S) as page:
        text = page.read().decode()
    assert 'nodi_messages_in_total{topic="measured"} 3.0' in text
    assert 'nodi_requests_total{api="produce",error="unknown_topic"} 1.0' in text
    assert 'nodi_log_end_offset{partition="0",topic="measured"} 3.0' in text
    assert "nodi_connections 1.0" in text
    assert "nodi_request_latency_seconds_bucket" in text
    process.stop()


def test_stream_groups_over_the_wire(broker):
    """JoinGroup splits partitions; commits are durable before they are answered and a
    stale member is fenced; reset needs an empty group."""
    admin = RawClient(_address(broker)).handshake()
    admin.call(m.CreateTopicRequest, name="events", settings=m.TopicSettings(partitions=4))
    first = admin.call(m.JoinGroupRequest, group="g", topics=["events"], session_timeout_ms=10_000)
    assert first.error_code == ErrorCode.NONE
    assert sorted(p for a in first.assignments for p in a.partitions) == [0, 1, 2, 3]
    second = admin.call(m.JoinGroupRequest, group="g", topics=["events"], session_timeout_ms=10_000)
    assert second.assignments == []  # the two-step handover: first must let go first
    beat = admin.call(m.HeartbeatRequest, group="g", member_id=first.member_id, generation=first.generation)
    assert beat.error_code == ErrorCode.REBALANCE_IN_PROGRESS and beat.generation == second.generation
    mine = [p for a in beat.assignments for p in a.partitions]
    # first adopts that generation (commits, stops reading the rest) and says so:
    released = admin.call(m.HeartbeatRequest, group="g", member_id=first.member_id, generation=beat.generation)
    assert released.error_code == ErrorCode.REBALANCE_IN_PROGRESS
    assert [p for a in released.assignments for p in a.partitions] == mine
    gained = admin.call(m.HeartbeatRequest, group="g", member_id=second.member_id, generation=second.generation)
    assert gained.error_code == ErrorCode.REBALANCE_IN_PROGRESS and gained.generation == released.generation
    theirs = [p for a in gained.assignments for p in a.partitions]
    assert sorted(mine + theirs) == [0, 1, 2, 3] and not set(mine) & set(theirs)
    commit = admin.call(
        m.CommitOffsetsRequest,
        group="g",
        generation=gained.generation,
        member_id=second.member_id,
        offsets=[
            m.OffsetCommit(topic="events", partition=theirs[0], offset=0),
            m.OffsetCommit(topic="events", partition=mine[0], offset=0),
        ],
    )
    assert [r.error_code for r in commit.results] == [ErrorCode.NONE, ErrorCode.ILLEGAL_GENERATION]
    offsets = admin.call(m.FetchOffsetsRequest, group="g")
    assert [(o.partition, o.offset) for o in offsets.offsets] == [(theirs[0], 0)]
    refused = admin.call(m.ResetGroupRequest, group="g", topic="events", spec=m.ResetSpec.LATEST)
    assert refused.error_code == ErrorCode.GROUP_NOT_EMPTY
    admin.call(m.LeaveGroupRequest, group="g", member_id=first.member_id)
    admin.call(m.LeaveGroupRequest, group="g", member_id=second.member_id)
    admin.call(m.ProduceRequest, topic="events", partition=1, records=_batch(b"a", b"b"))
    reset = admin.call(m.ResetGroupRequest, group="g", topic="events", spec=m.ResetSpec.LATEST)
    assert [(o.partition, o.offset) for o in reset.offsets] == [(0, 0), (1, 2), (2, 0), (3, 0)]
    described = admin.call(m.DescribeGroupRequest, group="g")
    assert described.state == "empty"
    assert {(lag.partition, lag.committed_offset, lag.high_watermark) for lag in described.lags} >= {(1, 2, 2)}
    listed = admin.call(m.ListGroupsRequest)
    assert [g.group for g in listed.groups] == ["g"]


def _send(client: RawClient, request_type, **fields) -> int:
    request = request_type(request_id=client.connection.next_request_id(), **fields)
    client.socket.sendall(client.connection.send(request))
    return request.request_id


def test_durable_and_other_replies_on_one_connection_each_come_once_in_order(broker):
    """Pipelined on one connection: durable produces waiting for an interval fsync,
    produces acked written, ListOffsets and fetches. Each request is answered exactly
    once, matched by id; the durable replies of one partition come in offset order."""
    client = RawClient(_address(broker)).handshake()
    for name, policy in (("slow", "interval"), ("fast", "always")):
        settings = m.TopicSettings(fsync_policy=policy, fsync_interval_ms=300)
        assert client.call(m.CreateTopicRequest, name=name, settings=settings).error_code == ErrorCode.NONE
    sent: dict[int, tuple[str, str]] = {}
    for round_number in range(5):
        value = b"r%d" % round_number
        sent[_send(client, m.ProduceRequest, topic="slow", partition=0, records=_batch(value))] = ("durable", "slow")
        sent[_send(client, m.ProduceRequest, topic="slow", partition=0, records=_batch(value), acks=m.Acks.WRITTEN)] = (
            "written",
            "slow",
        )
        sent[_send(client, m.ProduceRequest, topic="fast", partition=0, records=_batch(value))] = ("durable", "fast")
        sent[_send(client, m.ListOffsetsRequest, topic="slow", partition=0)] = ("list", "slow")
        sent[_send(client, m.FetchRequest, topic="fast", partition=0, offset=0)] = ("fetch", "fast")
    replies = {}
    durable_offsets: dict[str, list[int]] = {"slow": [], "fast": []}
    while len(replies) < len(sent):
        reply = client.next_message()
        assert reply.request_id in sent and reply.request_id not in replies  # one reply each
        replies[reply.request_id] = reply
        assert reply.error_code == ErrorCode.NONE
        kind, topic = sent[reply.request_id]
        if kind == "durable":
            durable_offsets[topic].append(reply.base_offset)
    assert durable_offsets["slow"] == sorted(durable_offsets["slow"]) and len(durable_offsets["slow"]) == 5
    assert durable_offsets["fast"] == [0, 1, 2, 3, 4]
    written = sorted(replies[i].base_offset for i, (kind, topic) in sent.items() if kind == "written")
    assert sorted(durable_offsets["slow"] + written) == list(range(10))
    # The connection carries on after them.
    assert client.call(m.ListOffsetsRequest, topic="slow", partition=0).offset == 10
    client.close()


def test_a_connection_closed_while_durable_produces_wait_leaves_the_server_serving(broker):
    """A client's durable produces wait for an fsync that does not come in time (an
    hour's interval) and it closes before their replies: they are dropped with the
    connection, their timers too; the server, its other connections and the partition
    carry on."""
    client = RawClient(_address(broker)).handshake()
    settings = m.TopicSettings(fsync_policy="interval", fsync_interval_ms=3_600_000)
    assert client.call(m.CreateTopicRequest, name="t", settings=settings).error_code == ErrorCode.NONE
    leaving = RawClient(_address(broker)).handshake()
    for value in (b"a", b"b", b"c"):
        _send(leaving, m.ProduceRequest, topic="t", partition=0, records=_batch(value), timeout_ms=300)
    # Served in order on its connection: this reply says the three were appended.
    written = leaving.call(m.ProduceRequest, topic="t", partition=0, records=_batch(b"w"), acks=m.Acks.WRITTEN)
    assert (written.error_code, written.base_offset) == (ErrorCode.NONE, 3)
    leaving.close()
    late = client.call(m.ProduceRequest, topic="t", partition=0, records=_batch(b"d"), timeout_ms=600)
    assert late.error_code == ErrorCode.NOT_DURABLE  # theirs expired before it, unanswered
    produced = client.call(m.ProduceRequest, topic="t", partition=0, records=_batch(b"e"), acks=m.Acks.WRITTEN)
    assert (produced.error_code, produced.base_offset) == (ErrorCode.NONE, 5)
    fetched = client.call(m.FetchRequest, topic="t", partition=0, offset=0)
    assert [record.value for record in records.decode_batches(fetched.records)] == [b"a", b"b", b"c", b"w", b"d", b"e"]
    client.close()


def test_a_durable_produce_not_fsynced_in_time_is_answered_not_durable(broker):
    client = RawClient(_address(broker)).handshake()
    settings = m.TopicSettings(fsync_policy="interval", fsync_interval_ms=3_600_000)
    assert client.call(m.CreateTopicRequest, name="t", settings=settings).error_code == ErrorCode.NONE
    produced = client.call(m.ProduceRequest, topic="t", partition=0, records=_batch(b"late"), timeout_ms=50)
    assert produced.error_code == ErrorCode.NOT_DURABLE
    assert client.call(m.ListOffsetsRequest, topic="t", partition=0).offset == 1  # written all the same
    client.close()
