#!/usr/bin/env python3
"""Many partitions on one broker: what idle partitions cost a real `nodi serve`.

    .venv/bin/python -m tools.partitions_bench                      # 1, 1,000, 10,000
    .venv/bin/python -m tools.partitions_bench --partitions 1 1000  # a shorter run
    .venv/bin/python -m tools.partitions_bench --quick              # seconds: smoke run

For each partition count N, in one run, with a fresh broker (127.0.0.1, a free port, a
temporary data directory on a disk file system, never tmpfs):
- the empty broker's RSS and threads;
- create: one topic of N partitions (fsync `always`), timed by the client;
- fill: one durable produce to each partition (100 in flight), timed: a partition's
  first fsync also makes its new file's metadata durable, which costs several times a
  later one, so the latency phase that follows measures partitions that hold data;
- idle: RSS and threads with N idle partitions that hold a message each; RSS per
  partition beyond the empty broker;
- produce: --requests durable produces of one 1 KiB message, each to a random partition,
  one at a time (latency p50/p99, the broker's threads sampled throughout);
- clean restart: SIGTERM, then `nodi serve` again, timed from its start to its
  listening line, to the answer of a new client's first DescribeTopic (and how long
  that request took), to the first read of the last partition (opened on demand), and
  to the line saying the background open is done (every partition open, on a broker
  that opens them all; the unclean ones recovered, on one that opens the clean ones
  on first use; docs/operations.md, "Start"); then the RSS per partition beyond the
  empty broker's;
- restart after kill -9: the produce phase again (partitions written and not closed
  cleanly), SIGKILL, then the same timed start;
- with --idle-close-ms MS (a broker that closes idle partitions): a restart with
  partition_idle_close_ms MS, every partition read (all open: RSS), then the time
  until the broker reports none open (nodi_partitions_open) and the RSS after.
Beside them, the disk's own write+fdatasync latency (1 KiB, one file), measured in the
same run. Nothing here asserts a timing; tests/test_bench_smoke.py runs --quick.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request

from nodi.broker.client.async_client import AsyncClient
from tools import storage_bench
from tools.broker_bench_common import NodiServer, progress

TOPIC = "many"
VALUE = b"v" * 1024
RESTART_TIMEOUT_S = 120


def _status(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and Threads of a process, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "Threads"):
                out[name] = int(value.split()[0])
    return out


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _create(address: str, partitions: int) -> float:
    async with AsyncClient(address, timeout_ms=600_000) as client:
        started = time.perf_counter()
        await client.create_topic(TOPIC, partitions=partitions, fsync_policy="always")
        return time.perf_counter() - started


async def _fill(address: str, partitions: int) -> float:
    async with AsyncClient(address, timeout_ms=600_000) as client:
        started = time.perf_counter()
        for first in range(0, partitions, 100):
            await asyncio.gather(
                *(
                    client.produce(TOPIC, VALUE, partition=partition, acks="durable")
                    for partition in range(first, min(partitions, first + 100))
                )
            )
        return time.perf_counter() - started


async def _produce(address: str, partitions: int, requests: int, pid: int) -> dict:
    """Durable produces of one message to random partitions, one at a time."""
    chooser = random.Random(partitions)
    latencies_ms: list[float] = []
    threads_max = 0
    async with AsyncClient(address, timeout_ms=60_000) as client:
        for number in range(requests + requests // 10):
            started = time.perf_counter()
            await client.produce(TOPIC, VALUE, partition=chooser.randrange(partitions), acks="durable")
            if number >= requests // 10:  # the first tenth warms up
                latencies_ms.append((time.perf_counter() - started) * 1000)
            if number % 20 == 0:
                threads_max = max(threads_max, _status(pid)["Threads"])
    return {
        "p50_ms": statistics.median(latencies_ms),
        "p99_ms": _percentile(latencies_ms, 0.99),
        "threads_max": threads_max,
    }


# The background open's last line: "N open after" (every partition opened), or "N not
# closed cleanly recovered after" (a broker that opens clean ones on first use).
BACKGROUND_DONE = re.compile(r"partitions: (\d+ open after|\d+ not closed cleanly recovered after)")


async def _read_every(address: str, partitions: int) -> None:
    async with AsyncClient(address, timeout_ms=600_000) as client:
        for first in range(0, partitions, 100):
            await asyncio.gather(
                *(client.fetch(TOPIC, partition, 0) for partition in range(first, min(partitions, first + 100)))
            )


OPEN_GAUGE = re.compile(r"^nodi_partitions_open (\S+)$", re.MULTILINE)


def _partitions_open(metrics_port: int) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    found = OPEN_GAUGE.search(text)
    assert found, "no nodi_partitions_open gauge: a broker that does not close idle partitions"
    return float(found.group(1))


def _idle_close(server: NodiServer, partitions: int, idle_close_ms: int) -> dict[str, float]:
    """Restart with partition_idle_close_ms, open every partition by reading it, then
    wait until none is open: RSS at both ends, seconds until all were closed."""
    server.stop()
    server.metrics = True
    os.environ["NODI_PARTITION_IDLE_CLOSE_MS"] = str(idle_close_ms)
    try:
        server.start()
    finally:
        del os.environ["NODI_PARTITION_IDLE_CLOSE_MS"]
    assert server.pid is not None and server.metrics_port is not None
    asyncio.run(_read_every(server.address, partitions))
    read = time.perf_counter()
    _partitions_open(server.metrics_port)  # a scrape's own allocations (every open log's series) counted here too
    all_open = _status(server.pid)
    deadline = time.monotonic() + RESTART_TIMEOUT_S + idle_close_ms / 1000
    while _partitions_open(server.metrics_port) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    closed_s = time.perf_counter() - read
    time.sleep(1.0)
    after = _status(server.pid)
    return {"all_open_rss_kib": all_open["VmRSS"], "closed_s": closed_s, "after_close_rss_kib": after["VmRSS"]}


async def _describe(address: str) -> float:
    """Seconds a new client's DescribeTopic of the topic took."""
    async with AsyncClient(address, timeout_ms=60_000) as client:
        started = time.perf_counter()
        description = await client.describe_topic(TOPIC)
        assert description.partition_count >= 1
        return time.perf_counter() - started


async def _first_read(address: str, partition: int) -> None:
    async with AsyncClient(address, timeout_ms=60_000) as client:
        messages = await client.fetch(TOPIC, partition, 0)
        assert messages, f"partition {partition} read back empty"


def _timed_start(server: NodiServer, partitions: int) -> dict[str, float]:
    """Seconds from the start of `nodi serve` to its listening line, to a DescribeTopic
    answered (and the request's own time), to the first read of the last partition
    served, and to its line saying the background open is done."""
    started = time.perf_counter()
    server.start()
    listening = time.perf_counter() - started
    describe_request = asyncio.run(_describe(server.address))
    described = time.perf_counter() - started
    asyncio.run(_first_read(server.address, partitions - 1))
    first_read = time.perf_counter() - started
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        with open(server.log_path) as output:
            if BACKGROUND_DONE.search(output.read()):
                break
        time.sleep(0.02)
    return {
        "listening_s": listening,
        "described_s": described,
        "describe_request_s": describe_request,
        "first_read_s": first_read,
        "background_done_s": time.perf_counter() - started,
    }


def measure(partitions: int, requests: int, parent: str, idle_close_ms: int = 0) -> dict:
    directory = tempfile.mkdtemp(prefix="nodi-partitions-bench-", dir=parent)
    server = NodiServer(directory, metrics=False)
    try:
        server.start()
        assert server.pid is not None
        time.sleep(0.5)
        empty = _status(server.pid)
        create_s = asyncio.run(_create(server.address, partitions))
        fill_s = asyncio.run(_fill(server.address, partitions))
        time.sleep(0.5)
        idle = _status(server.pid)
        progress(
            f"{partitions:,} partitions: created in {create_s:.2f} s, one message each in {fill_s:.2f} s, "
            f"{idle['Threads']} threads"
        )
        produce = asyncio.run(_produce(server.address, partitions, requests, server.pid))
        progress(f"  produce p50 {produce['p50_ms']:.3f} ms, p99 {produce['p99_ms']:.3f} ms")
        server.stop()  # SIGTERM: a clean stop
        server.start_timeout_s = RESTART_TIMEOUT_S
        clean = _timed_start(server, partitions)
        assert server.pid is not None
        time.sleep(0.5)
        after_clean = _status(server.pid)
        asyncio.run(_produce(server.address, partitions, max(requests // 4, 10), server.pid))
        assert server.process is not None
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(timeout=30)
        server.process = None
        unclean = _timed_start(server, partitions)
        progress(
            f"  restart clean: listening {clean['listening_s']:.2f} s, described {clean['described_s']:.2f} s "
            f"(request {clean['describe_request_s']:.3f} s), last partition read {clean['first_read_s']:.2f} s, "
            f"background done {clean['background_done_s']:.2f} s; after kill -9: {unclean['listening_s']:.2f} s, "
            f"{unclean['described_s']:.2f} s, {unclean['first_read_s']:.2f} s, {unclean['background_done_s']:.2f} s"
        )
        idle_close: dict[str, float] = {}
        if idle_close_ms:
            idle_close = _idle_close(server, partitions, idle_close_ms)
            progress(
                f"  idle close: RSS {idle_close['all_open_rss_kib'] / 1024:.1f} MiB with all open, every one closed "
                f"{idle_close['closed_s']:.2f} s after the reads, RSS then "
                f"{idle_close['after_close_rss_kib'] / 1024:.1f} MiB"
            )
        return {
            "partitions": partitions,
            "idle_close": idle_close,
            "create_s": create_s,
            "fill_s": fill_s,
            "restart_clean": clean,
            "restart_after_kill": unclean,
            "empty_rss_kib": empty["VmRSS"],
            "empty_threads": empty["Threads"],
            "idle_rss_kib": idle["VmRSS"],
            "idle_threads": idle["Threads"],
            "rss_per_partition_kib": (idle["VmRSS"] - empty["VmRSS"]) / partitions,
            "rss_after_clean_restart_kib": after_clean["VmRSS"],
            "rss_per_partition_after_clean_restart_kib": (after_clean["VmRSS"] - empty["VmRSS"]) / partitions,
            "threads_after_clean_restart": after_clean["Threads"],
            "produce": produce,
        }
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="partitions_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, nargs="+", default=[1, 1000, 10000], help="Partition counts.")
    parser.add_argument("--requests", type=int, default=1000, help="Durable produces timed per count.")
    parser.add_argument("--quick", action="store_true", help="Seconds-long smoke run (20 partitions).")
    parser.add_argument("--json-out", help="Write the figures here as JSON.")
    parser.add_argument(
        "--idle-close-ms",
        type=int,
        default=0,
        help="Also restart with partition_idle_close_ms this, open every partition and time their idle close.",
    )
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.partitions, arguments.requests = [20], 20
    if arguments.requests < 10 or min(arguments.partitions) < 1:
        parser.error("--requests must be at least 10 and every partition count at least 1")
    parent = storage_bench.default_data_parent()
    disk = storage_bench.raw_fdatasync_loop(parent, 1024, 1, 0.5 if arguments.quick else 2.0)
    progress(f"disk: 1 KiB write+fdatasync p50 {disk['latency_ms_p50']:.3f} ms, p99 {disk['latency_ms_p99']:.3f} ms")
    cells = [measure(count, arguments.requests, parent, arguments.idle_close_ms) for count in arguments.partitions]
    base = cells[0]["produce"]["p50_ms"]
    print(f"disk 1 KiB write+fdatasync: p50 {disk['latency_ms_p50']:.3f} ms, p99 {disk['latency_ms_p99']:.3f} ms")
    print(
        "| partitions | create s | one message each s | restart clean s | restart after kill -9 s | idle RSS MiB "
        "| RSS per partition KiB (written / after a clean restart) "
        "| threads idle / produce / after restart | produce p50 ms | p99 ms | p50 vs first |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cell in cells:
        produce = cell["produce"]
        print(
            f"| {cell['partitions']:,} | {cell['create_s']:.2f} | {cell['fill_s']:.2f} "
            f"| {cell['restart_clean']['listening_s']:.2f} | {cell['restart_after_kill']['listening_s']:.2f} "
            f"| {cell['idle_rss_kib'] / 1024:.1f} "
            f"| {cell['rss_per_partition_kib']:.1f} / {cell['rss_per_partition_after_clean_restart_kib']:.1f} "
            f"| {cell['idle_threads']} / {produce['threads_max']} / {cell['threads_after_clean_restart']} "
            f"| {produce['p50_ms']:.3f} | {produce['p99_ms']:.3f} | {produce['p50_ms'] / base:.2f} |"
        )
    print()
    print(
        "| partitions | restart | listening s | first DescribeTopic answered s (request s) | last partition read s "
        "| background open done s |"
    )
    print("|---|---|---|---|---|---|")
    for cell in cells:
        for name, key in (("clean", "restart_clean"), ("after kill -9", "restart_after_kill")):
            times = cell[key]
            print(
                f"| {cell['partitions']:,} | {name} | {times['listening_s']:.2f} "
                f"| {times['described_s']:.2f} ({times['describe_request_s']:.3f}) | {times['first_read_s']:.2f} "
                f"| {times['background_done_s']:.2f} |"
            )
    if arguments.idle_close_ms:
        print()
        print(
            f"| partitions | RSS MiB, every partition open | every one closed after (idle {arguments.idle_close_ms} ms) s "
            "| RSS MiB after | RSS per partition freed KiB |"
        )
        print("|---|---|---|---|---|")
        for cell in cells:
            idle = cell["idle_close"]
            freed = (idle["all_open_rss_kib"] - idle["after_close_rss_kib"]) / cell["partitions"]
            print(
                f"| {cell['partitions']:,} | {idle['all_open_rss_kib'] / 1024:.1f} | {idle['closed_s']:.2f} "
                f"| {idle['after_close_rss_kib'] / 1024:.1f} | {freed:.1f} |"
            )
    if arguments.json_out:
        with open(arguments.json_out, "w") as output:
            json.dump({"disk": disk, "cells": cells}, output, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
