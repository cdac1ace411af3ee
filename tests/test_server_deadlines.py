"""Deadlines per handshake and per frame, not per read (issue 8, item 3): a peer that
trickles bytes is closed with a typed TIMEOUT when its handshake or its frame is not
whole in time, and everyone else on the server carries on. Also: a frame waiting for the
server's frame budget (frame_buffer_bytes_max) still has its deadline."""

from __future__ import annotations

import socket
import time

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.connection import NEED_DATA, Connection, Role
from nodi.broker.protocol.errors import ErrorCode
from nodi.storage import records

from conftest import BrokerProcess
from test_ops_metrics import scrape, value
from test_server import RawClient

DEADLINE_MS = 1000
# A trickling peer sends one byte per this long; its whole frame would take far longer
# than DEADLINE_MS (it is only ever cut short by the server).
TRICKLE_S = 0.05
TRICKLE_BYTES_MIN = 400  # bytes of the trickled frame: 20 s at TRICKLE_S
WAIT_S = 30  # the longest a test waits for the server to act


def _config(tmp_path, text: str) -> list[str]:
    path = tmp_path / "deadlines.toml"
    path.write_text(text)
    return ["--config", str(path)]


def _trickle(sock: socket.socket, frame: bytes) -> tuple[int, bytes]:
    """Send `frame` a byte per TRICKLE_S until the server closes the connection;
    returns the bytes sent and what the server sent back."""
    sock.setblocking(False)
    received = bytearray()
    sent = 0
    deadline = time.monotonic() + WAIT_S
    while sent < len(frame) and time.monotonic() < deadline:
        try:
            sock.send(frame[sent : sent + 1])
            sent += 1
        except (BrokenPipeError, ConnectionResetError):
            break
        except BlockingIOError:
            pass
        time.sleep(TRICKLE_S)
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break  # closed by the server
        received += chunk
    sock.setblocking(True)
    sock.settimeout(5)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except OSError:
        pass
    return sent, bytes(received)


def _messages(connection: Connection, data: bytes) -> list:
    """What the server sent on `connection`, up to its Closing event."""
    connection.receive_data(data)
    found = []
    while (event := connection.next_event()) is not NEED_DATA:
        found.append(event)
        if isinstance(event, m.ClosingEvent):
            break
    return found


def test_a_trickled_handshake_is_closed_by_its_deadline(broker_factory, tmp_path):
    process = broker_factory(extra_args=_config(tmp_path, f"[server]\nhandshake_timeout_ms = {DEADLINE_MS}\n")).start()
    client = Connection(Role.CLIENT)
    frame = client.send(m.HandshakeRequest(request_id=client.next_request_id(), client_id="slow" * 100))
    assert len(frame) >= TRICKLE_BYTES_MIN
    sock = socket.create_connection((process.host, process.port), timeout=5)
    sent, received = _trickle(sock, frame)
    sock.close()
    assert sent < len(frame), "the whole handshake went through"
    (closing,) = _messages(client, received)
    assert isinstance(closing, m.ClosingEvent) and closing.error_code == ErrorCode.TIMEOUT
    assert "handshake_timeout_ms" in closing.error_message
    assert RawClient((process.host, process.port)).handshake().call(m.ListTopicsRequest).error_code == ErrorCode.NONE


def test_a_trickled_frame_is_closed_by_its_deadline_while_others_carry_on(broker_factory, tmp_path):
    process = broker_factory(extra_args=_config(tmp_path, f"[server]\nframe_timeout_ms = {DEADLINE_MS}\n")).start()
    address = (process.host, process.port)
    normal = RawClient(address).handshake()
    assert normal.call(m.CreateTopicRequest, name="steady").error_code == ErrorCode.NONE
    slow = RawClient(address).handshake()
    batch = records.build_batch([records.NewRecord(None, b"s" * TRICKLE_BYTES_MIN)])
    frame = slow.connection.send(
        m.ProduceRequest(request_id=slow.connection.next_request_id(), topic="steady", partition=0, records=batch)
    )
    sent, received = _trickle(slow.socket, frame)
    slow.close()
    assert sent < len(frame), "the whole frame went through"
    (closing,) = _messages(slow.connection, received)
    assert isinstance(closing, m.ClosingEvent) and closing.error_code == ErrorCode.TIMEOUT
    assert "frame_timeout_ms" in closing.error_message
    # The normal client was served all along and still is; the slow frame wrote nothing.
    produced = normal.call(
        m.ProduceRequest, topic="steady", partition=0, records=records.build_batch([records.NewRecord(None, b"fine")])
    )
    assert produced.error_code == ErrorCode.NONE and produced.base_offset == 0
    normal.close()


def test_a_stalled_frame_is_closed_although_the_connection_is_not_idle_long(broker_factory, tmp_path):
    """Half a frame, then nothing: closed after frame_timeout_ms, long before the
    (default, 600 s) idle timeout."""
    process = broker_factory(extra_args=_config(tmp_path, f"[server]\nframe_timeout_ms = {DEADLINE_MS}\n")).start()
    stalled = RawClient((process.host, process.port)).handshake()
    frame = stalled.connection.send(m.ListTopicsRequest(request_id=stalled.connection.next_request_id()))
    stalled.socket.sendall(frame[:-3])
    stalled.socket.settimeout(WAIT_S)
    closing = stalled.next_message()
    assert isinstance(closing, m.ClosingEvent) and closing.error_code == ErrorCode.TIMEOUT


def test_a_frame_waiting_for_budget_keeps_its_deadline(tmp_path):
    """The budget holds one whole frame: of two large frames, one waits for it (the
    server stops reading that connection) and is closed by its own deadline, not left
    hanging; small requests on other connections are served meanwhile."""
    frame_bytes = 1 << 20
    process = BrokerProcess(
        str(tmp_path / "data"),
        _config(
            tmp_path,
            (
                f"[server]\nframe_timeout_ms = {DEADLINE_MS * 2}\nframe_buffer_bytes_max = {frame_bytes}\n"
                f"[protocol]\nframe_bytes_max = {frame_bytes}\n"
            ),
        ),
        metrics=True,
    ).start()
    try:
        _waiting_frame_times_out(process, frame_bytes)
    finally:
        process.stop()


def _waiting_frame_times_out(process: BrokerProcess, frame_bytes: int) -> None:
    address = (process.host, process.port)
    holder, waiter = RawClient(address).handshake(), RawClient(address).handshake()
    prefix = (frame_bytes - 4).to_bytes(4, "big") + bytes([0, 0]) + int(m.ApiKey.PRODUCE).to_bytes(2, "big")
    prefix += (0).to_bytes(2, "big") + (1).to_bytes(4, "big")
    holder.socket.sendall(prefix + bytes(frame_bytes // 2))
    waiter.socket.sendall(prefix + bytes(1000))
    normal = RawClient(address).handshake()
    assert normal.call(m.ListTopicsRequest).error_code == ErrorCode.NONE
    for client in (holder, waiter):
        client.socket.settimeout(WAIT_S)
        closing = client.next_message()
        assert isinstance(closing, m.ClosingEvent) and closing.error_code == ErrorCode.TIMEOUT
    assert normal.call(m.ListTopicsRequest).error_code == ErrorCode.NONE
    samples = scrape(process.metrics_port)
    assert value(samples, "nodi_frame_buffer_waits_total") == 1
    assert value(samples, "nodi_connections_timed_out_total", deadline="frame") == 2
    assert value(samples, "nodi_frame_buffer_bytes") == 0
