"""A full disk under the metadata store, against a real `nodi serve` (issue 8, item 4).

One failed LMDB commit used to block every metadata write until a restart (INTERNAL
"refuses writes after a failed commit"), with nothing in `nodi status`. Now a failed
commit is aborted, its entries stay staged, commits are refused with DISK_FULL during a
backoff and retried by the broker itself; status and metrics show the state while it
lasts; reads and produce to existing topics go on; and once space is back, metadata
writes work again without a restart, with nothing staged lost or applied twice.

The metadata directory gets a small tmpfs of its own (the data directory's `meta` is a
symbolic link to it), so the logs keep their space and produce can be checked to go on.
Mounting needs root: the tests skip otherwise, saying why.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
import urllib.request

import pytest

from nodi.broker import Client
from nodi.broker.client.errors import DiskFull
from nodi.broker.protocol import messages as m
from nodi.storage.records import NewRecord, build_batch

from conftest import BrokerProcess

WAIT_S = 60  # the store's retry backoff is at most 5 s; generous for a shared machine
META_DISK_BYTES = 2 * 1024 * 1024
TOPIC = "orders"
PARTITIONS = 4
BIG_METADATA = "m" * 4000  # an offset commit's metadata: overflow pages, so new pages


def mount_tmpfs(path: str, size_bytes: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    os.makedirs(path, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", path], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")


def unmount(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


def fill(directory: str) -> str:
    """Write a file in `directory` until the file system is full; returns its path."""
    path = os.path.join(directory, "filler")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    chunk = b"\0" * 65536
    try:
        while True:
            try:
                os.write(descriptor, chunk)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 512:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(descriptor)
    return path


def call(client: Client, request: m.Request):
    return client._run(client._async._call(request, None), None)


def big_commit(client: Client, group: str) -> None:
    """An offset commit with new keys and big values: it needs new LMDB pages."""
    call(
        client,
        m.CommitOffsetsRequest(
            group=group,
            offsets=[
                m.OffsetCommit(topic=TOPIC, partition=partition, offset=1, metadata=BIG_METADATA)
                for partition in range(PARTITIONS)
            ],
        ),
    )


def scrape(port: int) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("nodi_metadata_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def meta_disk(tmp_path):
    """DATA_DIR whose meta/ lives on its own 2 MiB tmpfs; yields (data_dir, mount)."""
    mount = str(tmp_path / "meta-disk")
    mount_tmpfs(mount, META_DISK_BYTES)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.makedirs(os.path.join(mount, "meta"))
    os.symlink(os.path.join(mount, "meta"), data_dir / "meta")
    yield str(data_dir), mount
    unmount(mount)


def test_a_full_disk_fails_metadata_commits_then_the_broker_recovers_by_itself(meta_disk):
    data_dir, mount = meta_disk
    broker = BrokerProcess(data_dir, metrics=True).start()
    try:
        with Client(broker.address, timeout_ms=30_000) as client:
            client.create_topic(TOPIC, PARTITIONS)
            for partition in range(PARTITIONS):
                client.produce_batch(TOPIC, partition, build_batch([NewRecord(None, b"%d" % i) for i in range(20)]))
            # A queue group: 10 messages of partition 0 received and 5 of them acked.
            received = call(client, m.QueueReceiveRequest(group="workers", topic=TOPIC, messages_max=10, wait_ms=5000))
            runs = received.deliveries
            assert sum(run.count for run in runs) == 10
            delivered = [(run.partition, run.offset + i) for run in runs for i in range(run.count)]

            def settle(items):
                return call(
                    client,
                    m.QueueSettleRequest(
                        group="workers",
                        topic=TOPIC,
                        settlements=[
                            m.Settlement(partition=p, offset=o, delivery_count=1, action=m.SettleAction.ACK)
                            for p, o in items
                        ],
                    ),
                )

            settle(delivered[:5])
            assert client.server_status().metadata_store_error is None

            filler = fill(mount)
            failed_group = None
            for number in range(200):  # new keys, big values: LMDB must grow its file
                try:
                    big_commit(client, f"group-{number}")
                except DiskFull as error:
                    failed_group = f"group-{number}"
                    assert "metadata store" in str(error)
                    break
            assert failed_group is not None, "no metadata commit failed on a full disk"

            # The state is reported while it lasts.
            status = client.server_status()
            assert status.metadata_store_error is not None and "No space left" in status.metadata_store_error
            assert status.metadata_failed_commits >= 1
            metrics = scrape(broker.metrics_port)
            assert metrics["nodi_metadata_store_failed"] == 1
            assert metrics["nodi_metadata_failed_commits_total"] >= 1
            assert metrics["nodi_metadata_staged_entries"] >= PARTITIONS

            # Metadata writes answer DISK_FULL, not INTERNAL.
            with pytest.raises(DiskFull):
                client.create_topic("during")
            with pytest.raises(DiskFull):
                settle(delivered[5:])  # applied in memory, committed once there is room
            with pytest.raises(DiskFull):
                client.commit_offsets("plain", {(TOPIC, 1): 3})
            # A receive that must commit first (beyond the reservation) fails and gives
            # its messages back uncounted; one within it may be answered: it is acked.
            try:
                during = call(client, m.QueueReceiveRequest(group="workers", topic=TOPIC, messages_max=5))
            except DiskFull:
                pass
            else:
                taken = [(run.partition, run.offset + i) for run in during.deliveries for i in range(run.count)]
                assert all(run.delivery_count == 1 for run in during.deliveries)
                delivered.extend(taken)
                with pytest.raises(DiskFull):
                    settle(taken)

            # Reads and produce to an existing topic go on (the logs have room).
            produced = client.produce(TOPIC, b"while full", partition=1, acks="durable")
            assert produced == (1, 20)
            assert [message.value for message in client.fetch(TOPIC, 1, 20)] == [b"while full"]
            # Staged entries are read over committed ones: the refused commit is staged.
            assert client.fetch_offsets("plain") == {(TOPIC, 1): 3}
            assert client.describe_topic(TOPIC).name == TOPIC

            os.unlink(filler)  # space is back: no restart
            wait_until(lambda: client.server_status().metadata_store_error is None, "the store to recover")
            metrics = scrape(broker.metrics_port)
            assert metrics["nodi_metadata_store_failed"] == 0
            assert metrics["nodi_metadata_recoveries_total"] >= 1
            assert metrics["nodi_metadata_staged_entries"] == 0

            client.create_topic("after")
            client.commit_offsets("plain", {(TOPIC, 1): 3})
            again = settle(delivered[5:])  # the acks staged while full were kept (none given back)
            # An ack of an acked message is answered as done (or settled): never an error.
            assert {result.error_code for result in again.results} <= {m.ErrorCode.NONE, m.ErrorCode.DELIVERY_SETTLED}
            # Every message not acked is available at once, never delivered before: a
            # refused receive gave its messages back instead of leaving them leased.
            rest = call(client, m.QueueReceiveRequest(group="workers", topic=TOPIC, messages_max=1000, wait_ms=0))
            rest_offsets = [(run.partition, run.offset + i) for run in rest.deliveries for i in range(run.count)]
            assert len(rest_offsets) == PARTITIONS * 20 + 1 - len(delivered)
            assert not set(rest_offsets) & set(delivered)
            assert all(run.delivery_count == 1 for run in rest.deliveries)
            settle(rest_offsets)
        assert broker.stop() == 0
        broker = BrokerProcess(data_dir, metrics=True).start()
        with Client(broker.address, timeout_ms=30_000) as client:
            assert {"orders", "after"} <= {topic.name for topic in client.list_topics()}
            assert "during" not in {topic.name for topic in client.list_topics()}
            assert client.fetch_offsets("plain") == {(TOPIC, 1): 3}
            # The commit that failed was kept staged and written by the retry.
            assert client.fetch_offsets(failed_group) == {(TOPIC, p): 1 for p in range(PARTITIONS)}
            # Every message was acked (some while the disk was full): none comes again.
            again = call(client, m.QueueReceiveRequest(group="workers", topic=TOPIC, messages_max=100, wait_ms=0))
            assert again.deliveries == []
    finally:
        if broker.process is not None:
            broker.kill()


@pytest.fixture
def small_disk(tmp_path):
    mount = str(tmp_path / "disk")
    mount_tmpfs(mount, META_DISK_BYTES)
    yield mount
    unmount(mount)


def test_the_store_refuses_during_its_backoff_keeps_what_is_staged_and_recovers(small_disk):
    """The store alone: a failed commit puts its entries back, commits are refused until
    the backoff ends, staging goes on up to staged_entries_max (then new keys are
    refused, updates of staged ones still taken), and a flush after space is back writes
    everything, once."""
    from nodi.broker.server.clock import ManualClock
    from nodi.storage.errors import MetadataDiskFullError
    from nodi.storage.metadata import MetadataLimits, MetadataStore

    limits = MetadataLimits(staged_entries_max=500, commit_retry_ms_min=200, commit_retry_ms_max=400)
    clock = ManualClock()  # the backoff runs out by advancing it, not by sleeping
    store = MetadataStore(os.path.join(small_disk, "data"), limits, monotonic=clock.monotonic)
    try:
        store.create_topic(TOPIC)
        filler = fill(small_disk)
        number = 0
        with pytest.raises(MetadataDiskFullError, match="No space left"):
            while number < 100_000:  # new keys with big values until a commit needs a page
                store.stage_offset(f"group-{number}", TOPIC, 0, number, BIG_METADATA)
                number += 1
                if number % 10 == 0:
                    store.flush()
        statistics = store.statistics()
        assert statistics.failed and statistics.failed_commits == 1 and statistics.staged_entries == number
        with pytest.raises(MetadataDiskFullError, match="next try in"):
            store.flush()  # within the backoff: refused without touching the disk
        assert store.statistics().failed_commits == 1
        assert store.committed_offset("group-0", TOPIC, 0).offset == 0  # reads go on
        while number < limits.staged_entries_max:
            store.stage_offset(f"group-{number}", TOPIC, 0, number)
            number += 1
        with pytest.raises(MetadataDiskFullError):
            store.stage_offset("one-too-many", TOPIC, 0, 1)
        store.stage_offset("group-1", TOPIC, 0, 1000)  # a staged key: its newer value is taken
        clock.advance(500)  # past the backoff
        with pytest.raises(MetadataDiskFullError):
            store.flush()  # the retry fails again: still full
        assert store.statistics().failed_commits == 2
        os.unlink(filler)
        clock.advance(500)  # past the doubled backoff
        assert store.flush() == limits.staged_entries_max
        statistics = store.statistics()
        assert not statistics.failed and statistics.recoveries == 1 and statistics.staged_entries == 0
        assert statistics.failure == "" and statistics.retry_in_ms is None
    finally:
        store.close()
    with MetadataStore(os.path.join(small_disk, "data"), limits) as reopened:
        offsets = {group: reopened.committed_offset(group, TOPIC, 0) for group in reopened.list_groups()}
    assert len(offsets) == limits.staged_entries_max
    assert offsets["group-1"].offset == 1000
    assert offsets["group-0"].offset == 0 and offsets["group-0"].metadata == BIG_METADATA


def test_delete_topic_on_a_full_disk_fails_clearly_and_loses_nothing(tmp_path):
    """Issue 8, item 5, as reported: on a full disk delete_topic answered INTERNAL and,
    after a restart, the topic was there but empty. Now it answers DISK_FULL, the topic
    keeps serving every message, and after a restart every message is still there; once
    there is room the deletion works, and a restart finds no trace of the topic."""
    mount = str(tmp_path / "disk")
    mount_tmpfs(mount, 16 * 1024 * 1024)
    data_dir = os.path.join(mount, "data")
    broker = BrokerProcess(data_dir).start()
    messages = [b"message %d" % number for number in range(400)]
    try:
        with Client(broker.address, timeout_ms=30_000) as client:
            client.create_topic("keep")
            for start in range(0, len(messages), 50):
                client.produce_batch(
                    "keep", 0, build_batch([NewRecord(None, value) for value in messages[start : start + 50]])
                )
            client.commit_offsets("readers", {("keep", 0): 100})
            filler = fill(mount)
            for number in range(200):  # until a metadata commit needs space it cannot get
                try:
                    big_commit_on(client, "keep", f"group-{number}")
                except DiskFull:
                    break
            else:
                pytest.fail("no metadata commit failed on a full disk")
            with pytest.raises(DiskFull, match="metadata store"):
                client.delete_topic("keep")
            assert "keep" in {topic.name for topic in client.list_topics()}
            assert read_all(client, "keep") == messages  # serving, at once
            os.unlink(filler)
            wait_until(lambda: client.server_status().metadata_store_error is None, "the store to recover")
        assert broker.stop() == 0
        broker = BrokerProcess(data_dir).start()
        with Client(broker.address, timeout_ms=30_000) as client:
            assert read_all(client, "keep") == messages
            assert client.fetch_offsets("readers") == {("keep", 0): 100}
            client.delete_topic("keep")
        assert broker.stop() == 0
        assert [name for name in os.listdir(os.path.join(data_dir, "logs")) if name.startswith("keep")] == []
        broker = BrokerProcess(data_dir).start()
        with Client(broker.address, timeout_ms=30_000) as client:
            assert "keep" not in {topic.name for topic in client.list_topics()}
            assert client.fetch_offsets("readers") == {}
    finally:
        if broker.process is not None:
            broker.kill()
        unmount(mount)


def big_commit_on(client: Client, topic: str, group: str) -> None:
    call(
        client,
        m.CommitOffsetsRequest(
            group=group, offsets=[m.OffsetCommit(topic=topic, partition=0, offset=1, metadata=BIG_METADATA)]
        ),
    )


def read_all(client: Client, topic: str) -> list[bytes | None]:
    values: list[bytes | None] = []
    offset = 0
    while True:
        batch = client.fetch(topic, 0, offset)
        if not batch:
            return values
        values.extend(message.value for message in batch)
        offset = batch[-1].offset + 1


class _FailingCommit:
    """A write transaction whose commit fails with an LMDB error (the transaction is
    aborted, as LMDB does when mdb_txn_commit fails)."""

    def __init__(self, transaction, error) -> None:
        self.transaction = transaction
        self.error = error

    def __enter__(self):
        return self.transaction.__enter__()

    def __exit__(self, *exc_info):
        self.transaction.abort()
        raise self.error


class FailingEnvironment:
    """An LMDB environment whose next `failures` write transactions fail to commit."""

    def __init__(self, env, failures: int, error) -> None:
        self._env = env
        self.failures = failures
        self.error = error

    def __getattr__(self, name):
        return getattr(self._env, name)

    def begin(self, *args, write: bool = False, **kwargs):
        transaction = self._env.begin(*args, write=write, **kwargs)
        if write and self.failures:
            self.failures -= 1
            return _FailingCommit(transaction, self.error)
        return transaction


def test_an_io_error_on_commit_is_metadata_unavailable_and_the_reopened_store_recovers(tmp_path):
    """EIO (or a failed meta page write, after which LMDB refuses every transaction until
    the environment is reopened): METADATA_UNAVAILABLE, not INTERNAL; the store reopens
    its environment, serves reads, and the retry after the backoff commits everything."""
    import lmdb

    from nodi.broker.protocol.errors import ErrorCode
    from nodi.broker.server.reply import error_code_for
    from nodi.storage.errors import MetadataUnavailableError
    from nodi.storage.metadata import MetadataLimits, MetadataStore

    limits = MetadataLimits(commit_retry_ms_min=50, commit_retry_ms_max=100)
    path = str(tmp_path / "data")
    store = MetadataStore(path, limits)
    try:
        store.create_topic(TOPIC)
        store.stage_offset("group", TOPIC, 0, 5)
        store._env = FailingEnvironment(store._env, 1, lmdb.Error("mdb_txn_commit: Input/output error"))
        with pytest.raises(MetadataUnavailableError, match="Input/output error") as refused:
            store.flush()
        assert error_code_for(refused.value) is ErrorCode.METADATA_UNAVAILABLE
        assert not isinstance(store._env, FailingEnvironment)  # reopened
        statistics = store.statistics()
        assert statistics.failed and statistics.failed_commits == 1 and statistics.staged_entries == 1
        assert store.get_topic(TOPIC) is not None  # reads go on
        assert store.committed_offset("group", TOPIC, 0).offset == 5  # the staged value
        with pytest.raises(MetadataUnavailableError, match="next try in"):
            store.create_topic("refused")
        time.sleep(0.15)
        store.create_topic("later")  # the retry: carries the staged offset too
        assert not store.statistics().failed and store.statistics().recoveries == 1
    finally:
        store.close()
    with MetadataStore(path, limits) as reopened:
        assert sorted(reopened.list_topics()) == ["later", TOPIC]
        assert reopened.committed_offset("group", TOPIC, 0).offset == 5


def test_a_full_disk_on_a_metadata_commit_is_disk_full_on_the_wire():
    from nodi.broker.protocol.errors import ErrorCode
    from nodi.broker.server.reply import error_code_for
    from nodi.storage.errors import MetadataDiskFullError, MetadataError, MetadataUnavailableError

    assert error_code_for(MetadataDiskFullError("full")) is ErrorCode.DISK_FULL
    assert error_code_for(MetadataUnavailableError("eio")) is ErrorCode.METADATA_UNAVAILABLE
    assert error_code_for(MetadataError("a bug")) is ErrorCode.INTERNAL
