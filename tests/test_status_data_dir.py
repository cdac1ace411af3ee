"""ServerStatus tells the absolute data directory only to loopback connections (there is
no authentication yet; an admin on the broker's machine connects over loopback). Any
other peer gets an empty data_dir (docs/protocol.md)."""

from __future__ import annotations

import os
import socket

import pytest

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode
from nodi.broker.server.status import is_loopback_peer

from conftest import BrokerProcess
from test_server import RawClient


@pytest.mark.parametrize(
    "peer, loopback",
    [
        (("127.0.0.1", 5000), True),
        (("127.8.9.10", 5000), True),
        (("::1", 5000, 0, 0), True),
        (("::ffff:127.0.0.1", 5000, 0, 0), True),
        (("192.0.2.2", 5000), False),
        (("10.0.0.1", 5000), False),
        (("::ffff:10.0.0.1", 5000, 0, 0), False),
        (("fe80::1%eth0", 5000, 0, 2), False),
        (("not an address", 1), False),
        (None, False),
        ("/run/nodi.sock", False),
    ],
)
def test_loopback_peers(peer, loopback):
    assert is_loopback_peer(peer) is loopback


def _non_loopback_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_the_data_dir_is_shown_to_loopback_connections_only(tmp_path):
    other = _non_loopback_address()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    data_dir = str(tmp_path / "data")
    process = BrokerProcess(data_dir, ["--host", "0.0.0.0", "--insecure-no-auth"]).start()
    try:
        local = RawClient(("127.0.0.1", process.port)).handshake().call(m.ServerStatusRequest)
        assert local.error_code == ErrorCode.NONE and local.data_dir == os.path.abspath(data_dir)
        remote = RawClient((other, process.port)).handshake().call(m.ServerStatusRequest)
        assert remote.error_code == ErrorCode.NONE and remote.data_dir == ""
        assert remote.server_id == local.server_id and remote.disk_total_bytes == local.disk_total_bytes
    finally:
        process.stop()
