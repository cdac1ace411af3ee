"""The server's memory under many incomplete large frames is bounded by
frame_buffer_bytes_max, and given back when the connections close (issue 8, item 2).

Many connections each announce a large frame and send all of it but 100 bytes. Without a
global bound the server buffered every byte (120 such connections of 8 MiB: 1.04 GB
resident, about 100 MB of it kept after they closed, growing with every round,
tools/frame_memory.py); with it, the frames past the budget wait unread."""

from __future__ import annotations

import select
import socket
import time

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode

from conftest import BrokerProcess
from test_ops_metrics import scrape, value
from test_server import RawClient
from test_server_limits import _raise_fd_limit, _rss_bytes

MIB = 1 << 20
BUDGET_BYTES = 16 * MIB
FRAME_BYTES = 4 * MIB
CONNECTIONS = 40  # 160 MiB of frames announced: ten times the budget
WITHHELD_BYTES = 100
# What a connection waiting for budget may hold besides it: one socket read (256 KiB)
# and the stream reader's buffer (at most two reads), rounded up.
WAITING_CONNECTION_BYTES_MAX = 1 * MIB
# Allocator and interpreter noise on top of what the frames cost.
SLACK_BYTES = 16 * MIB
WAIT_S = 30


def _frame_prefix() -> bytes:
    """A ProduceRequest header announcing FRAME_BYTES; the body never completes."""
    return (
        (FRAME_BYTES - 4).to_bytes(4, "big")
        + bytes([0, 0])
        + int(m.ApiKey.PRODUCE).to_bytes(2, "big")
        + (0).to_bytes(2, "big")
        + (1).to_bytes(4, "big")
    )


def _send_without_blocking(sockets: list[socket.socket], payload: memoryview, until) -> None:
    """Push `payload` into every socket as far as the server reads it, until `until()`
    says enough (or WAIT_S passes)."""
    sent = {sock: 0 for sock in sockets}
    for sock in sockets:
        sock.setblocking(False)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and not until():
        pending = [sock for sock, count in sent.items() if count < len(payload)]
        _, writable, _ = select.select([], pending, [], 0.1)
        for sock in writable:
            try:
                sent[sock] += sock.send(payload[sent[sock] : sent[sock] + MIB])
            except BlockingIOError:
                pass


def test_incomplete_large_frames_are_bounded_by_the_frame_budget(tmp_path):
    _raise_fd_limit(CONNECTIONS + 200)
    config = tmp_path / "budget.toml"
    config.write_text(f"[server]\nframe_buffer_bytes_max = {BUDGET_BYTES}\n")
    process = BrokerProcess(str(tmp_path / "data"), ["--config", str(config)], metrics=True).start()
    try:
        address = (process.host, process.port)
        normal = RawClient(address).handshake()
        attackers = [RawClient(address).handshake() for _ in range(CONNECTIONS)]
        before = _rss_bytes(process.process.pid)
        payload = memoryview(_frame_prefix() + bytes(FRAME_BYTES - 14 - WITHHELD_BYTES))
        holders = BUDGET_BYTES // FRAME_BYTES

        def budget_spent() -> bool:
            samples = scrape(process.metrics_port)
            return (
                value(samples, "nodi_frame_buffer_bytes") == holders * FRAME_BYTES
                and value(samples, "nodi_frame_buffer_waiting") == CONNECTIONS - holders
            )

        _send_without_blocking([client.socket for client in attackers], payload, budget_spent)
        assert budget_spent()
        during = 0
        for _ in range(10):  # the holders finish reading what they were sent
            during = max(during, _rss_bytes(process.process.pid))
            time.sleep(0.1)
        bound = BUDGET_BYTES + CONNECTIONS * WAITING_CONNECTION_BYTES_MAX + SLACK_BYTES
        assert during - before <= bound, f"{(during - before) / MIB:.0f} MiB over {bound / MIB:.0f} MiB"
        # The server carries on: small requests need no budget.
        assert normal.call(m.CreateTopicRequest, name="still").error_code == ErrorCode.NONE

        for client in attackers:
            client.close()
        deadline = time.monotonic() + WAIT_S
        while True:  # every frame released, then the freed memory given back
            samples = scrape(process.metrics_port)
            settled = value(samples, "nodi_frame_buffer_bytes") == 0 and value(samples, "nodi_connections") == 1
            after = _rss_bytes(process.process.pid)
            if (settled and after - before <= SLACK_BYTES) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert settled
        assert after - before <= SLACK_BYTES, f"{(after - before) / MIB:.0f} MiB kept after close"
        assert normal.call(m.ListTopicsRequest).error_code == ErrorCode.NONE
    finally:
        process.stop()
