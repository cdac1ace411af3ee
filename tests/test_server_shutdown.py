"""SIGTERM and SIGINT stop `nodi serve` cleanly: exit status 0, every partition closed
with its clean-shutdown marker and a checkpoint at its end, so the next start scans
nothing; and that start serves everything that was acknowledged."""

from __future__ import annotations

import os
import signal

import pytest

from nodi.broker import Client
from nodi.storage.admin import list_segments


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_cleanly(broker_factory, tmp_path, signal_number):
    data_dir = str(tmp_path / "data")
    server = broker_factory(data_dir).start()
    with Client(server.address) as client:
        client.create_topic("orders", 3)
        with client.producer() as producer:
            futures = [producer.send("orders", f"order {n}", key=f"customer-{n % 7}") for n in range(300)]
        offsets = {future.result() for future in futures}
    os.kill(server.process.pid, signal_number)
    assert server.process.wait(timeout=30) == 0, "".join(server.output)
    server.process.stdout.close()
    server.process = None

    listings = list_segments(data_dir)
    assert sorted((listing.topic, listing.partition) for listing in listings) == [("orders", p) for p in range(3)]
    for listing in listings:
        assert listing.clean_shutdown, listing
        assert listing.recovery_offset == listing.segments[-1].next_offset  # nothing to scan

    again = broker_factory(data_dir)
    again.port = server.port
    again.start()
    with Client(again.address) as client:
        for partition in range(3):
            end = client.list_offsets("orders", partition, "latest")
            assert {(partition, offset) for offset in range(end)} == {o for o in offsets if o[0] == partition}


def test_sigusr1_writes_every_threads_stack_and_the_broker_carries_on(broker_factory, tmp_path):
    """An operator's `kill -USR1 PID` on a broker that seems stuck: each thread's stack on
    stderr (faulthandler), and the broker goes on serving and stops cleanly after."""
    server = broker_factory(str(tmp_path / "data")).start()
    os.kill(server.process.pid, signal.SIGUSR1)
    with Client(server.address) as client:
        client.create_topic("after-the-dump")
        assert "after-the-dump" in [topic.name for topic in client.list_topics()]
    assert server.stop() == 0
    output = "".join(server.output)
    assert "Current thread" in output or "Thread 0x" in output, output[-2000:]
    assert "most recent call first" in output
    assert "nodi stopped: SIGTERM" in output
