"""Named server limits hold under load: idle connections cost bounded memory, the
connection limit refuses politely, and a slow consumer never stalls producers."""

from __future__ import annotations

import resource
import socket
import time

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.connection import Connection, Role
from nodi.broker.protocol.errors import ErrorCode
from nodi.storage import records

from test_server import RawClient

IDLE_CONNECTIONS = 1000
# What one idle, handshaken connection may cost the server, all buffers included.
IDLE_CONNECTION_BYTES_MAX = 64 * 1024


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def test_idle_connections_cost_bounded_memory(broker):
    _raise_fd_limit(IDLE_CONNECTIONS + 200)
    warm = [RawClient((broker.host, broker.port)).handshake() for _ in range(50)]
    before = _rss_bytes(broker.process.pid)
    clients = [RawClient((broker.host, broker.port)).handshake() for _ in range(IDLE_CONNECTIONS)]
    after = _rss_bytes(broker.process.pid)
    per_connection = (after - before) / IDLE_CONNECTIONS
    assert per_connection < IDLE_CONNECTION_BYTES_MAX, f"{per_connection:.0f} bytes per idle connection"
    # and the server still serves
    assert clients[-1].call(m.ListTopicsRequest).error_code == ErrorCode.NONE
    for client in clients + warm:
        client.close()


def test_connection_limit_refuses_with_a_typed_error(broker_factory, tmp_path):
    config = tmp_path / "small.toml"
    config.write_text("[server]\nconnections_max = 3\n")
    process = broker_factory(extra_args=["--config", str(config)]).start()
    kept = [RawClient((process.host, process.port)).handshake() for _ in range(3)]
    refused = RawClient((process.host, process.port))
    closing = refused.next_message()
    assert isinstance(closing, m.ClosingEvent) and closing.error_code == ErrorCode.LIMIT_EXCEEDED
    kept[0].close()
    deadline = time.monotonic() + 10
    while True:  # the freed slot is usable once the server has noticed the close
        again = RawClient((process.host, process.port))
        response = again.call(m.HandshakeRequest, client_id="again")
        if isinstance(response, m.HandshakeResponse) or time.monotonic() > deadline:
            break
        again.close()
        time.sleep(0.05)
    assert isinstance(response, m.HandshakeResponse)


def test_slow_consumer_does_not_stall_producers(broker_factory, tmp_path):
    """A peer that asks for data and never reads it fills its own socket buffers; the
    server drops it after write_timeout_ms and producers never wait on it."""
    config = tmp_path / "slow.toml"
    config.write_text("[server]\nwrite_timeout_ms = 1000\n")
    process = broker_factory(extra_args=["--config", str(config)]).start()
    producer = RawClient((process.host, process.port)).handshake()
    producer.call(m.CreateTopicRequest, name="firehose")
    payload = records.build_batch([records.NewRecord(None, b"x" * 1000) for _ in range(200)])
    for _ in range(20):
        producer.call(m.ProduceRequest, topic="firehose", partition=0, records=payload)

    slow = socket.create_connection((process.host, process.port), timeout=10)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    protocol = Connection(Role.CLIENT)
    slow.sendall(protocol.send(m.HandshakeRequest(request_id=protocol.next_request_id())))
    protocol.receive_data(slow.recv(1 << 16))
    assert protocol.next_event().error_code == ErrorCode.NONE
    for _ in range(100):  # ~100 MB asked for, never read
        slow.sendall(
            protocol.send(
                m.FetchRequest(
                    request_id=protocol.next_request_id(), topic="firehose", partition=0, offset=0, bytes_max=1 << 20
                )
            )
        )
    for _ in range(50):  # producers carry on meanwhile
        response = producer.call(m.ProduceRequest, topic="firehose", partition=0, records=payload)
        assert response.error_code == ErrorCode.NONE
    slow.close()
