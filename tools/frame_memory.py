"""Measure a broker's memory under many incomplete large frames (issue 8, item 2).

Starts `nodi serve` (port 0, a temporary data directory, the extra flags given), opens
--connections connections, handshakes each, then has each announce a --frame-bytes frame
and send all of it but --withhold-bytes bytes. The server's resident memory (VmRSS from
/proc/PID/status) is read before, while the frames hang (once sending has made no
progress for --settle-s seconds), and --after-s seconds after the clients closed. Runs
--rounds rounds against the same server and prints one JSON document.

    .venv/bin/python -m tools.frame_memory --connections 120 --frame-bytes 8388608
    .venv/bin/python -m tools.frame_memory --config small.toml   # passed to nodi serve

Without a bound the server buffers every byte it is sent; with frame_buffer_bytes_max
the connections past the budget wait (the server stops reading them) until their
frame_timeout_ms closes them.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import select
import socket
import struct
import tempfile
import time

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.connection import NEED_DATA, Connection, Role
from tools.broker_bench_common import NodiServer

READY = re.compile(r"nodi listening on ([\d.]+):(\d+).*pid (\d+)")
MIB = 1 << 20


def rss_bytes(pid: int) -> int:
    """The resident set size of process `pid` (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def handshaken(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    connection = Connection(Role.CLIENT)
    sock.sendall(connection.send(m.HandshakeRequest(request_id=connection.next_request_id(), client_id="memory")))
    while True:
        event = connection.next_event()
        if event is not NEED_DATA:
            break
        connection.receive_data(sock.recv(65536))
    assert isinstance(event, m.HandshakeResponse) and event.error_code == 0, event
    return sock


def frame_prefix(frame_bytes: int) -> bytes:
    """The first bytes of a ProduceRequest frame of `frame_bytes` bytes (prefix
    included): a valid header; the body never completes."""
    return struct.pack(">IBBHHI", frame_bytes - 4, 0, 0, m.ApiKey.PRODUCE, 0, 1)


def send_all_but(
    sockets: list[socket.socket], frame_bytes: int, withhold_bytes: int, settle_s: float, pid: int
) -> tuple[int, int]:
    """Send each socket all but `withhold_bytes` of a frame, without blocking on any of
    them; stop when nothing moved for `settle_s` (whether everything was sent or the
    server stopped reading). Returns the bytes sent in all and the server's highest RSS
    seen meanwhile."""
    payload = memoryview(frame_prefix(frame_bytes) + bytes(frame_bytes - 14 - withhold_bytes))
    sent = {sock: 0 for sock in sockets}
    for sock in sockets:
        sock.setblocking(False)
    last_progress = time.monotonic()
    peak = rss_bytes(pid)
    while time.monotonic() - last_progress < settle_s:
        peak = max(peak, rss_bytes(pid))
        pending = [sock for sock, count in sent.items() if count < len(payload)]
        if not pending:
            time.sleep(0.05)
            continue
        _, writable, _ = select.select([], pending, [], 0.1)
        for sock in writable:
            try:
                count = sock.send(payload[sent[sock] : sent[sock] + 1 * MIB])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:  # closed by the server (a deadline, a refusal)
                sent[sock] = len(payload)
                continue
            sent[sock] += count
            last_progress = time.monotonic()
    return sum(sent.values()), peak


def run_round(address, pid: int, args) -> dict:
    before = rss_bytes(pid)
    sockets = [handshaken(address) for _ in range(args.connections)]
    handshaken_rss = rss_bytes(pid)
    sent, peak = send_all_but(sockets, args.frame_bytes, args.withhold_bytes, args.settle_s, pid)
    during = rss_bytes(pid)
    for sock in sockets:
        sock.close()
    time.sleep(args.after_s)
    after = rss_bytes(pid)
    return {
        "rss_before_bytes": before,
        "rss_handshaken_bytes": handshaken_rss,
        "rss_during_bytes": during,
        "rss_peak_bytes": max(peak, during),
        "rss_after_close_bytes": after,
        "bytes_sent": sent,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=120)
    parser.add_argument("--frame-bytes", type=int, default=8 * MIB)
    parser.add_argument("--withhold-bytes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle-s", type=float, default=2.0, help="no send progress for this long ends sending")
    parser.add_argument("--after-s", type=float, default=3.0, help="wait this long after closing before measuring")
    args, serve_args = parser.parse_known_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, args.connections + 100), hard), hard))
    with tempfile.TemporaryDirectory(prefix="nodi-frame-memory-") as directory:
        server = NodiServer(directory, extra_args=serve_args, metrics=False)
        server.start()
        pid = server.pid
        assert pid is not None  # started
        try:
            time.sleep(0.5)
            rounds = [run_round(server.host_port, pid, args) for _ in range(args.rounds)]
        finally:
            server.stop()
    summary = {
        "connections": args.connections,
        "frame_bytes": args.frame_bytes,
        "serve_args": serve_args,
        "rounds": rounds,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
