"""One process at a time on a data directory (issue 8, item 0; storage/lock.py).

A second broker, a second start whose port is taken, and every offline tool that writes
(offline compact, segments recover) are refused on a directory a broker holds, having
touched nothing; the read-only tools say they read a live directory. Every message the
live broker acknowledged survives all of it, including a kill -9 of that broker
afterwards (no false clean-shutdown marker was planted, so its restart rescans)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nodi.broker import Client
from nodi.storage.admin import list_segments, recover_data_dir
from nodi.storage.errors import DataDirectoryLockedError
from nodi.storage.lock import LOCK_FILE, DataDirectoryLock, lock_holder
from nodi.storage.store import Store

from conftest import NODI, BrokerProcess

TOOL_TIMEOUT_S = 60


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(NODI + list(args), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)


def _snapshot(data_dir: str) -> dict[str, tuple[int, int]]:
    """Every file under data_dir (but the lock file) with its size and mtime."""
    found = {}
    for root, _dirs, files in os.walk(data_dir):
        for name in files:
            path = os.path.join(root, name)
            if name != LOCK_FILE:
                status = os.stat(path)
                found[os.path.relpath(path, data_dir)] = (status.st_size, status.st_mtime_ns)
    return found


def _values(client: Client, topic: str) -> list[bytes | None]:
    return [message.value for message in client.fetch(topic, 0, 0)]


def _one_line_refusal(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- in-process: the lock itself -----------------------------------------------------


def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    data_dir = str(tmp_path / "data")
    assert lock_holder(data_dir) is None  # no lock file yet: nothing is created by asking
    assert not os.path.exists(data_dir)
    with DataDirectoryLock.acquire(data_dir) as lock:
        assert lock.held
        assert lock_holder(data_dir) == os.getpid()
        with pytest.raises(DataDirectoryLockedError) as refused:
            DataDirectoryLock.acquire(data_dir, wait_ms=0)  # another open file: refused like another process
        assert refused.value.holder_pid == os.getpid()
        assert str(os.getpid()) in str(refused.value)
    assert lock_holder(data_dir) is None
    DataDirectoryLock.acquire(data_dir, wait_ms=0).release()  # free again once released


def test_a_store_holds_the_lock_until_it_closes(tmp_path):
    data_dir = str(tmp_path / "data")
    store = Store.open(data_dir)
    try:
        with pytest.raises(DataDirectoryLockedError):
            Store.open(data_dir)
        with pytest.raises(DataDirectoryLockedError):
            recover_data_dir(data_dir)
    finally:
        store.close()
    Store.open(data_dir).close()


def test_a_dead_holder_leaves_no_stale_lock(tmp_path):
    """flock locks die with their process: a kill -9'd owner never blocks a restart."""
    data_dir = str(tmp_path / "data")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from nodi.storage.lock import DataDirectoryLock;"
            f"lock = DataDirectoryLock.acquire({data_dir!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        assert lock_holder(data_dir) == child.pid
        with pytest.raises(DataDirectoryLockedError) as refused:
            DataDirectoryLock.acquire(data_dir, wait_ms=0)
        assert refused.value.holder_pid == child.pid
    finally:
        child.kill()
        child.wait(timeout=15)
        child.stdout.close()
    assert lock_holder(data_dir) is None
    DataDirectoryLock.acquire(data_dir, wait_ms=0).release()


# -- against real broker processes ---------------------------------------------------


def test_a_second_broker_on_a_live_directory_is_refused_and_nothing_is_lost(broker_factory, tmp_path):
    data_dir = str(tmp_path / "data")
    first = broker_factory(data_dir).start()
    with Client(first.address) as client:
        client.create_topic("orders", 1)
        client.produce("orders", b"A1")
        before = _snapshot(data_dir)

        second = _run("serve", "--data-dir", data_dir, "--port", "0", "--metrics-port", "-1")
        _one_line_refusal(second, f"in use by process {first.process.pid}", os.path.abspath(data_dir))
        assert _snapshot(data_dir) == before  # the refused start read and wrote nothing

        client.produce("orders", b"A2")
        assert _values(client, "orders") == [b"A1", b"A2"]
    first.kill()
    again = broker_factory(data_dir).start()
    with Client(again.address) as client:
        assert _values(client, "orders") == [b"A1", b"A2"]


def test_a_start_whose_port_is_taken_touches_no_data_directory(broker_factory, tmp_path):
    """The live broker's own directory, and a fresh one: neither is created, scanned or
    marked. Then a kill -9 of the live broker is followed by a real recovery scan."""
    data_dir = str(tmp_path / "data")
    live = broker_factory(data_dir).start()
    with Client(live.address) as client:
        client.create_topic("orders", 2)
        acknowledged = [client.produce("orders", f"m{n}".encode(), partition=n % 2) for n in range(20)]
    before = _snapshot(data_dir)

    same_port = _run("serve", "--data-dir", data_dir, "--port", str(live.port), "--metrics-port", "-1")
    _one_line_refusal(same_port, f"{live.port}", "in use")
    fresh = str(tmp_path / "fresh")
    fresh_port_taken = _run("serve", "--data-dir", fresh, "--port", str(live.port), "--metrics-port", "-1")
    _one_line_refusal(fresh_port_taken, f"{live.port}")
    assert not os.path.exists(fresh)
    assert _snapshot(data_dir) == before

    live.kill()
    for listing in list_segments(data_dir):
        assert not listing.clean_shutdown, listing  # no marker planted by the failed start
    again = broker_factory(data_dir).start()
    with Client(again.address) as client:
        for partition in range(2):
            assert [m.offset for m in client.fetch("orders", partition, 0)] == sorted(
                offset for p, offset in acknowledged if p == partition
            )


def test_a_taken_metrics_port_is_one_line_and_touches_nothing(broker_factory, tmp_path):
    live = broker_factory(str(tmp_path / "data"), ["--metrics-port", "0"])
    live.metrics = True
    live.start()
    fresh = str(tmp_path / "fresh")
    refused = _run("serve", "--data-dir", fresh, "--port", "0", "--metrics-port", str(live.metrics_port))
    _one_line_refusal(refused, "metrics", str(live.metrics_port))
    assert not os.path.exists(fresh)


def test_offline_writers_are_refused_on_a_live_directory(broker_factory, tmp_path):
    data_dir = str(tmp_path / "data")
    live = broker_factory(data_dir).start()
    pid = live.process.pid
    with Client(live.address) as client:
        client.create_topic("users", 1, cleanup_policy="compact")
        client.produce("users", b"v1", key=b"alice")
        client.produce("users", b"v2", key=b"alice")

        compact = _run("compact", "users", "--data-dir", data_dir)
        _one_line_refusal(compact, f"in use by process {pid}")
        recover = _run("segments", "recover", data_dir)
        _one_line_refusal(recover, f"in use by process {pid}")

        for reader in (["segments", "verify", data_dir], ["segments", "list", data_dir]):
            result = _run(*reader)
            assert result.returncode == 0, result
            assert f"in use by process {pid}: reading a live directory" in result.stderr, result.stderr
        segment = os.path.join(data_dir, "logs", "users-0", "00000000000000000000.log")
        dump = _run("segments", "dump", segment)
        assert f"in use by process {pid}" in dump.stderr, dump.stderr

        client.produce("users", b"v3", key=b"bob")  # acknowledged after the tools ran
    live.kill()
    for listing in list_segments(data_dir):
        assert not listing.clean_shutdown, listing
    again = broker_factory(data_dir).start()
    with Client(again.address) as client:
        assert _values(client, "users") == [b"v1", b"v2", b"v3"]
    again.stop()
    # Stopped, the same tools do their work.
    assert _run("segments", "recover", data_dir).returncode == 0
    result = _run("compact", "users", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    assert "in use" not in result.stderr


def test_offline_tools_refuse_a_directory_that_is_not_a_data_directory(tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not a broker's")
    for args in (["segments", "verify"], ["segments", "list"], ["segments", "recover"]):
        result = _run(*args, str(stranger))
        _one_line_refusal(result, "is not a nodi data directory")
    assert sorted(os.listdir(stranger)) == ["notes.txt"]


def test_broker_process_fixture_still_starts_on_a_released_directory(tmp_path):
    """A clean stop releases the lock: a second broker starts on the same directory."""
    data_dir = str(tmp_path / "data")
    first = BrokerProcess(data_dir).start()
    assert first.stop() == 0
    second = BrokerProcess(data_dir).start()
    assert second.stop() == 0
