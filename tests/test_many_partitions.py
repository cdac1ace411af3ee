"""Many partitions on one broker under a small open-file limit (issue 18): a real
`nodi serve` whose process may open 256 files (`ulimit -n 256`, soft and hard, set in
the child: 96 partition files open at most) holds thousands of partitions: each
written, the broker stopped and started again, each read back; its thread count stays within the fsync pool's limit plus the few
threads every broker has, throughout. A limit too low is refused at start with the
number needed, never EMFILE later.

`make test` runs it with 400 partitions (10-15 s); `make many-partitions` with the
issue's 3,000 (NODI_TEST_PARTITIONS, about a minute on a busy 2-core machine). The big
figures (10,000 partitions, restart times, RSS) are tools/partitions_bench.py's.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time

from nodi.broker import Client
from nodi.broker.client.async_client import AsyncClient
from nodi.storage.file_budget import FILES_LIMIT_MIN

from conftest import NODI, BrokerProcess, received
from test_ops_metrics import scrape, value

PARTITIONS = int(os.environ.get("NODI_TEST_PARTITIONS", "400"))
FILES_LIMIT = 256
FSYNC_WORKERS = 4
# Threads a broker has beside its fsync workers: the main thread and asyncio's
# to_thread executor (min(32, cores + 4) threads), with room for the metrics server.
THREADS_BESIDE_THE_POOL = 40
# Produces (and fetches) in flight at once from the test's client.
CONCURRENCY = 100


class _ThreadWatch:
    """The most threads /proc says the process had, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.most = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                with open(f"/proc/{self.pid}/status") as status:
                    for line in status:
                        if line.startswith("Threads:"):
                            self.most = max(self.most, int(line.split()[1]))
                            self.samples += 1
            except OSError:
                return  # the process ended

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.most


async def _in_chunks(calls) -> list:
    results = []
    for start in range(0, len(calls), CONCURRENCY):
        results.extend(await asyncio.gather(*(call() for call in calls[start : start + CONCURRENCY])))
    return results


async def _create_and_write(address: str) -> None:
    async with AsyncClient(address, timeout_ms=120_000) as client:
        await client.create_topic("many", partitions=PARTITIONS, fsync_policy="always")
        calls = [
            (lambda number=number: client.produce("many", b"value %d" % number, partition=number, acks="durable"))
            for number in range(PARTITIONS)
        ]
        placed = await _in_chunks(calls)
    assert placed == [(number, 0) for number in range(PARTITIONS)]


async def _read_back(address: str) -> list[bytes | None]:
    async with AsyncClient(address, timeout_ms=120_000) as client:
        calls = [(lambda number=number: client.fetch("many", number, 0)) for number in range(PARTITIONS)]
        fetched = await _in_chunks(calls)
    return [messages[0].value if len(messages) == 1 else None for messages in fetched]


def _broker(data_dir: str) -> BrokerProcess:
    return BrokerProcess(data_dir, files_limit=FILES_LIMIT, environment={"NODI_FSYNC_WORKERS_MAX": str(FSYNC_WORKERS)})


def test_thousands_of_partitions_under_ulimit_256_are_written_restarted_and_read_back(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    broker = _broker(data_dir).start()
    assert broker.process is not None
    watch = _ThreadWatch(broker.process.pid)
    try:
        asyncio.run(_create_and_write(broker.address))
        threads_first = watch.stop()
        assert broker.stop() == 0
    finally:
        watch.stop()
        broker.kill()
    assert any(f"open file limit: soft {FILES_LIMIT}" in line for line in broker.output), broker.output[-5:]
    assert not any("Too many open files" in line for line in broker.output), broker.output[-20:]

    again = _broker(data_dir).start()
    assert again.process is not None
    watch = _ThreadWatch(again.process.pid)
    try:
        values = asyncio.run(_read_back(again.address))
        threads_second = watch.stop()
        assert again.stop() == 0
    finally:
        watch.stop()
        again.kill()
    assert values == [b"value %d" % number for number in range(PARTITIONS)]
    assert not any("Too many open files" in line for line in again.output), again.output[-20:]
    assert watch.samples > 0
    bound = FSYNC_WORKERS + THREADS_BESIDE_THE_POOL
    assert 0 < threads_first <= bound, f"{threads_first} threads with {PARTITIONS} partitions"
    assert 0 < threads_second <= bound, f"{threads_second} threads after the restart"


def test_a_file_limit_too_low_is_refused_at_start_with_the_number_needed(tmp_path) -> None:
    limit = FILES_LIMIT_MIN - 1
    result = subprocess.run(
        [
            "sh",
            "-c",
            f'ulimit -n {limit} && exec "$@"',
            "sh",
            *NODI,
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--port",
            "0",
            "--metrics-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"the open file limit (ulimit -n) is {limit}" in result.stderr
    assert f"nodi needs at least {FILES_LIMIT_MIN}" in result.stderr
    assert "Traceback" not in result.stderr


# -- a start that opens the partitions in the background (issue 18, "Start") ----------

LAZY_PARTITIONS = 300
UNCLEAN = 137  # written when the broker is killed; every other partition closed cleanly
PRODUCERS = 8
KEYED = 211  # holds a message with an idempotency key (the topic's dedup window is on)


async def _write_until_killed(broker: BrokerProcess, acknowledged: dict[int, bytes]) -> None:
    """PRODUCERS durable producers on partition UNCLEAN; SIGKILL once 100 were
    acknowledged, with the others in flight. `acknowledged`: offset -> value."""
    killed = asyncio.Event()

    async def producer(client: AsyncClient, number: int) -> None:
        sequence = 0
        while not killed.is_set():
            value = b"unclean %d-%d" % (number, sequence)
            sequence += 1
            try:
                offset = await client.produce("lazy", value, partition=UNCLEAN, acks="durable")
            except Exception:  # the broker is gone: this one may or may not be written
                return
            acknowledged[offset[1]] = value
            if len(acknowledged) >= 100 and not killed.is_set():
                killed.set()
                broker.kill()

    async with AsyncClient(broker.address, timeout_ms=10_000, reconnect_attempts_max=1) as client:
        await asyncio.gather(*(producer(client, number) for number in range(PRODUCERS)))


async def _read_all(client: AsyncClient, partition: int) -> dict[int, bytes | None]:
    found: dict[int, bytes | None] = {}
    offset = 0
    while True:
        messages = await client.fetch("lazy", partition, offset)
        if not messages:
            return found
        for message in messages:
            found[message.offset] = message.value
        offset = messages[-1].offset + 1


async def _read_after_restart(
    address: str,
) -> tuple[bytes | None, dict[int, bytes | None], list[bytes | None], tuple[int, int]]:
    async with AsyncClient(address, timeout_ms=60_000) as client:
        # First of all: the last partition, which the background open reaches last; the
        # unclean one, which it recovers first (answered PARTITION_NOT_READY, and retried
        # by the client, until then); and a produce repeating an idempotency key whose
        # original is in a partition that may not be open yet (publish dedup spans the
        # topic: keyed produces wait until every partition's keys are read back).
        last, unclean, repeated = await asyncio.gather(
            client.fetch("lazy", LAZY_PARTITIONS - 1, 0),
            _read_all(client, UNCLEAN),
            client.produce("lazy", b"again", idempotency_key="key-1", partition=LAZY_PARTITIONS - 2),
        )
        calls = [(lambda number=number: client.fetch("lazy", number, 0)) for number in range(LAZY_PARTITIONS)]
        others = [messages[0].value if messages else None for messages in await _in_chunks(calls)]
    return (last[0].value if last else None), unclean, others, repeated


def _metrics_once_all_open(port: int) -> dict[str, float]:
    """The background open's gauges once nodi_partitions_not_open reads 0 (at most 60 s)."""
    names = ("nodi_partitions_not_open", "nodi_partitions_not_open_unclean", "nodi_partitions_open_failed")
    deadline = time.monotonic() + 60
    while True:
        samples = scrape(port)
        gauges = {name: value(samples, name) for name in names}
        if gauges["nodi_partitions_not_open"] == 0 or time.monotonic() > deadline:
            return gauges
        time.sleep(0.05)


def test_a_restart_serves_at_once_and_recovers_an_unclean_partition_before_serving_it(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    broker = BrokerProcess(data_dir).start()
    try:

        async def create() -> tuple[int, int]:
            async with AsyncClient(broker.address, timeout_ms=120_000) as client:
                await client.create_topic("lazy", partitions=LAZY_PARTITIONS, fsync_policy="always")
                calls = [
                    (lambda number=number: client.produce("lazy", b"lazy %d" % number, partition=number))
                    for number in range(LAZY_PARTITIONS)
                ]
                await _in_chunks(calls)
                return await client.produce("lazy", b"keyed", idempotency_key="key-1", partition=KEYED)

        original = asyncio.run(create())
        assert broker.stop() == 0
        broker = BrokerProcess(data_dir).start()  # clean: every partition keeps its marker
        acknowledged: dict[int, bytes] = {}
        asyncio.run(_write_until_killed(broker, acknowledged))
        assert broker.process is None  # killed mid-produce
        broker = BrokerProcess(data_dir, metrics=True).start()
        last, unclean, others, repeated = asyncio.run(_read_after_restart(broker.address))
        assert broker.metrics_port is not None
        opened = _metrics_once_all_open(broker.metrics_port)
        assert broker.stop() == 0
    finally:
        broker.kill()
    output = "".join(broker.output)
    assert f"partitions: {LAZY_PARTITIONS} to open in the background (1 not closed cleanly" in output, output[-3000:]
    assert f"lazy-{UNCLEAN}: unclean start" in output, output[-3000:]
    assert "partitions: 1 not closed cleanly recovered after" in output, output[-3000:]
    # What an operator watches: every partition open, none failed.
    assert opened == {
        "nodi_partitions_not_open": 0,
        "nodi_partitions_not_open_unclean": 0,
        "nodi_partitions_open_failed": 0,
    }
    assert last == b"lazy %d" % (LAZY_PARTITIONS - 1)
    assert original == (KEYED, 1)
    assert repeated == original  # deduplicated: the original's partition and offset
    assert others == [b"lazy %d" % number for number in range(LAZY_PARTITIONS)]
    # Nothing acknowledged lost; the recovered log is dense from 0 (what was written and
    # not acknowledged may be there too, after every acknowledged offset before it).
    assert len(acknowledged) >= 100
    assert sorted(unclean) == list(range(len(unclean)))
    assert unclean[0] == b"lazy %d" % UNCLEAN
    assert all(unclean.get(offset) == value for offset, value in acknowledged.items())


# -- a clean restart opens no partition until something uses it (issue 18) ------------

IDLE_PARTITIONS = 200
RETAINED_VALUE = b"r" * 5000  # above segment_bytes 4096: each message its own segment


def _gauge(port: int | None, name: str) -> float:
    return value(scrape(port), name)


def test_a_clean_restart_opens_no_partition_until_used_and_retention_still_reaches_untouched_ones(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    broker = BrokerProcess(data_dir, environment={"NODI_RETENTION_CHECK_INTERVAL_MS": "3600000"}).start()
    try:

        async def create() -> None:
            async with AsyncClient(broker.address, timeout_ms=120_000) as client:
                await client.create_topic("idle", partitions=IDLE_PARTITIONS)
                await client.create_topic("kept", partitions=2, segment_bytes=4096, retention_bytes=1)
                calls = [
                    (lambda number=number: client.produce("idle", b"idle %d" % number, partition=number))
                    for number in range(IDLE_PARTITIONS)
                ]
                await _in_chunks(calls)
                for _ in range(3):  # partition 0: three segments; partition 1: one
                    await client.produce("kept", RETAINED_VALUE, partition=0, acks="durable")
                await client.produce("kept", b"alone", partition=1, acks="durable")

        asyncio.run(create())
        assert broker.stop() == 0
        broker = BrokerProcess(data_dir, metrics=True, environment={"NODI_RETENTION_CHECK_INTERVAL_MS": "200"}).start()
        port = broker.metrics_port
        # The retention sweep opens the one partition it may act on (kept-0), and no other.
        deadline = time.monotonic() + 60
        while _gauge(port, "nodi_partitions_opened_for_cleanup_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        samples = scrape(port)
        opened_at_start = {
            name: value(samples, name)
            for name in ("nodi_partitions_open", "nodi_partitions_not_open", "nodi_partitions_opened_for_cleanup_total")
        }

        async def use() -> tuple[list, list, float, list[bytes | None]]:
            async with AsyncClient(broker.address, timeout_ms=60_000) as client:
                idle = (await client.describe_topic("idle")).partitions
                kept = (await client.describe_topic("kept")).partitions
                open_after_describe = _gauge(port, "nodi_partitions_open")
                calls = [(lambda number=number: client.fetch("idle", number, 0)) for number in range(IDLE_PARTITIONS)]
                values = [messages[0].value if messages else None for messages in await _in_chunks(calls)]
            return list(idle), list(kept), open_after_describe, values

        idle, kept, open_after_describe, values = asyncio.run(use())
        open_after_reads = _gauge(port, "nodi_partitions_open")
        assert broker.stop() == 0
    finally:
        broker.kill()
    assert opened_at_start == {
        "nodi_partitions_open": 1,
        "nodi_partitions_not_open": IDLE_PARTITIONS + 1,
        "nodi_partitions_opened_for_cleanup_total": 1,
    }
    # Described without opening: offsets from each checkpoint, sizes unknown (-1).
    assert [(p.log_start_offset, p.log_end_offset, p.high_watermark, p.size) for p in idle] == [
        (0, 1, 1, -1)
    ] * IDLE_PARTITIONS
    assert open_after_describe == 1
    # Retention kept the newest segment of the partition nothing used since the start.
    assert (kept[0].log_start_offset, kept[0].log_end_offset, kept[0].segments) == (2, 3, 1)
    assert (kept[1].log_start_offset, kept[1].log_end_offset, kept[1].size) == (0, 1, -1)
    assert values == [b"idle %d" % number for number in range(IDLE_PARTITIONS)]
    assert open_after_reads == IDLE_PARTITIONS + 1


# -- partitions in use only: an idle log is closed and reopens on next use (issue 18) --

IDLE_TOPIC_PARTITIONS = 4


def _wait_gauge(port: int | None, name: str, wanted: float) -> float:
    deadline = time.monotonic() + 60
    found = _gauge(port, name)
    while found != wanted and time.monotonic() < deadline:
        time.sleep(0.1)
        found = _gauge(port, name)
    return found


def _queue_state(client: Client) -> list[tuple[int, int, int, int]]:
    described = client.describe_queue("q", "workers")
    return [(p.partition, p.ack_floor, p.next_offset, p.leased) for p in described.partitions]


def test_an_idle_partition_closes_reopens_with_its_state_and_survives_kill_9(tmp_path) -> None:
    """I23 through a real broker (partition_idle_close_ms 1 s): every log closes once
    nothing uses it; described from its last figures; reopened on use with its data,
    its queue group's state and publish dedup's keys; a kill -9 after the close finds
    every partition closed cleanly (no scan) and loses nothing."""
    data_dir = str(tmp_path / "data")
    environment = {"NODI_PARTITION_IDLE_CLOSE_MS": "1000"}
    broker = BrokerProcess(data_dir, metrics=True, environment=environment).start()
    try:
        with Client(broker.address, timeout_ms=60_000) as client:
            client.create_topic("q", partitions=IDLE_TOPIC_PARTITIONS)
            for number in range(3):
                for partition in range(IDLE_TOPIC_PARTITIONS):
                    client.produce("q", b"q%d-%d" % (partition, number), partition=partition, acks="durable")
            original = client.produce("q", b"keyed", idempotency_key="order-7", partition=1, acks="durable")
            with client.queue("q", "workers", ack_wait_ms=600_000, batch_max=1) as queue:
                first = received(queue.receive(timeout_ms=10_000))
                first.ack()
                received(queue.receive(timeout_ms=10_000))  # leased, not settled
                queue.flush()
            before = _queue_state(client)
        # Nothing uses them now: every log closes (clean marker written, files released).
        assert _wait_gauge(broker.metrics_port, "nodi_partitions_open", 0) == 0
        assert _gauge(broker.metrics_port, "nodi_partitions_idle_closed_total") >= IDLE_TOPIC_PARTITIONS
        with Client(broker.address, timeout_ms=60_000) as client:
            described = client.describe_topic("q").partitions  # from the closed logs' figures
            after_close = _queue_state(client)
            repeated = client.produce("q", b"keyed again", idempotency_key="order-7", partition=2)
            reopened = [[m.value for m in client.fetch("q", p, 0)] for p in range(IDLE_TOPIC_PARTITIONS)]
            appended = client.produce("q", b"after", partition=0, acks="durable")
        # Closed again, then killed: the close left each partition whole and marked clean.
        assert _wait_gauge(broker.metrics_port, "nodi_partitions_open", 0) == 0
        broker.kill()
        broker = BrokerProcess(data_dir, environment=environment).start()
        with Client(broker.address, timeout_ms=60_000) as client:
            after_kill = [[m.value for m in client.fetch("q", p, 0)] for p in range(IDLE_TOPIC_PARTITIONS)]
            after_kill_state = _queue_state(client)
            repeated_after_kill = client.produce("q", b"keyed again", idempotency_key="order-7", partition=3)
        assert broker.stop() == 0
    finally:
        broker.kill()
    output = "".join(broker.output)
    assert "unclean start" not in output, output[-3000:]
    assert "partitions: 0 not closed cleanly recovered" in output, output[-3000:]
    expected = [[b"q%d-%d" % (p, n) for n in range(3)] + ([b"keyed"] if p == 1 else []) for p in range(4)]
    assert [(p.log_start_offset, p.log_end_offset, p.segments) for p in described] == [
        (0, len(values), 1) for values in expected
    ]
    assert all(p.size > 0 for p in described)
    assert after_close == before
    assert repeated == original  # publish dedup: the original's partition and offset
    assert reopened == expected
    assert appended == (0, 3)
    expected[0].append(b"after")
    assert after_kill == expected
    # What a restart keeps of a queue group (its ack floors; the window is read again).
    assert [state[:2] for state in after_kill_state] == [state[:2] for state in before]
    assert repeated_after_kill == original
