#!/usr/bin/env python3
"""The /metrics scrape of a broker with many partitions, per partition and per topic
(`metrics_partition_series_max`, issue 18).

    .venv/bin/python -m tools.metrics_scrape_bench                            # 100 topics x 100
    .venv/bin/python -m tools.metrics_scrape_bench --topics 1 --partitions 10000
    .venv/bin/python -m tools.metrics_scrape_bench --quick                    # seconds: smoke run

One data directory (127.0.0.1, a free port, a disk file system, never tmpfs): TOPICS
topics of PARTITIONS partitions, one durable message in each, one consumer group's
offsets committed on every partition. Then, for each limit (--limits; the first,
above the partition count, is per partition: what every broker exported before the
limit existed; the default 1,000 is per topic), a clean restart with that limit and
--scrapes scrapes of /metrics: once with no partition open (a fresh start: only
consumer lag, from the checkpoints, is per partition), once after a read of every
partition (all open: every per-partition family). Reported: the response's bytes and
lines, and the median and slowest scrape time as the client saw it. Nothing here
asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

from nodi.broker.client.async_client import AsyncClient
from tools import storage_bench
from tools.broker_bench_common import NodiServer, progress

GROUP = "scraped"
VALUE = b"v" * 100
IN_FLIGHT = 100


def _topics(count: int) -> list[str]:
    return [f"t{number:03d}" for number in range(count)]


def _every_partition(topics: int, partitions: int) -> list[tuple[str, int]]:
    return [(topic, partition) for topic in _topics(topics) for partition in range(partitions)]


async def _fill(address: str, topics: int, partitions: int) -> None:
    """Create the topics, one durable message in each partition, the group's offsets."""
    async with AsyncClient(address, timeout_ms=600_000) as client:
        for topic in _topics(topics):
            await client.create_topic(topic, partitions=partitions)
        every = _every_partition(topics, partitions)
        for first in range(0, len(every), IN_FLIGHT):
            await asyncio.gather(
                *(
                    client.produce(topic, VALUE, partition=partition, acks="durable")
                    for topic, partition in every[first : first + IN_FLIGHT]
                )
            )
        await client.commit_offsets(GROUP, {key: 0 for key in every})


async def _read_every(address: str, topics: int, partitions: int) -> None:
    every = _every_partition(topics, partitions)
    async with AsyncClient(address, timeout_ms=600_000) as client:
        for first in range(0, len(every), IN_FLIGHT):
            await asyncio.gather(
                *(client.fetch(topic, partition, 0) for topic, partition in every[first : first + IN_FLIGHT])
            )


def _scrapes(metrics_port: int, count: int) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    seconds, body = [], b""
    for _ in range(count):
        started = time.perf_counter()
        body = opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=300).read()
        seconds.append(time.perf_counter() - started)
    return {
        "bytes": len(body),
        "lines": body.count(b"\n"),
        "samples": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
    }


def measure(topics: int, partitions: int, limits: list[int], scrapes: int, parent: str) -> list[dict]:
    directory = tempfile.mkdtemp(prefix="nodi-metrics-scrape-bench-", dir=parent)
    server = NodiServer(directory, metrics=False)
    cells = []
    try:
        server.start()
        started = time.perf_counter()
        asyncio.run(_fill(server.address, topics, partitions))
        progress(f"{topics} topics x {partitions} partitions filled in {time.perf_counter() - started:.1f} s")
        server.stop()
        for limit in limits:
            server = NodiServer(directory, extra_args=["--metrics-partition-series-max", str(limit)])
            server.start_timeout_s = 300
            server.start()
            assert server.metrics_port is not None
            cold = _scrapes(server.metrics_port, scrapes)
            asyncio.run(_read_every(server.address, topics, partitions))
            warm = _scrapes(server.metrics_port, scrapes)
            server.stop()
            progress(
                f"  limit {limit}: none open {cold['bytes'] / 1024:.0f} KiB {cold['median_s'] * 1000:.0f} ms; "
                f"all open {warm['bytes'] / 1024:.0f} KiB {warm['median_s'] * 1000:.0f} ms"
            )
            cells.append({"limit": limit, "none_open": cold, "all_open": warm})
        return cells
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metrics_scrape_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--topics", type=int, default=100, help="Topics.")
    parser.add_argument("--partitions", type=int, default=100, help="Partitions of each topic.")
    parser.add_argument(
        "--limits",
        type=int,
        nargs="+",
        default=None,
        help="metrics_partition_series_max values (default: one above the partition count, then 1000).",
    )
    parser.add_argument("--scrapes", type=int, default=5, help="Scrapes timed per state.")
    parser.add_argument("--quick", action="store_true", help="Seconds-long smoke run (4 topics x 5 partitions).")
    parser.add_argument("--json-out", help="Write the figures here as JSON.")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.topics, arguments.partitions, arguments.scrapes = 4, 5, 2
        arguments.limits = arguments.limits or [20, 10]
    total = arguments.topics * arguments.partitions
    limits = arguments.limits or [total + 1, 1000]
    cells = measure(
        arguments.topics, arguments.partitions, limits, arguments.scrapes, storage_bench.default_data_parent()
    )
    print(
        f"{arguments.topics} topics x {arguments.partitions} partitions = {total:,}, {arguments.scrapes} scrapes each"
    )
    print(
        "| metrics_partition_series_max | series | partitions open | bytes | samples | scrape median ms | slowest ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for cell in cells:
        mode = "per partition" if total <= cell["limit"] else "per topic"
        for name, key in (("none", "none_open"), ("all", "all_open")):
            figures = cell[key]
            print(
                f"| {cell['limit']:,} | {mode} | {name} | {figures['bytes']:,} | {figures['samples']:,} "
                f"| {figures['median_s'] * 1000:.0f} | {figures['max_s'] * 1000:.0f} |"
            )
    if arguments.json_out:
        with open(arguments.json_out, "w") as output:
            json.dump({"topics": arguments.topics, "partitions": arguments.partitions, "cells": cells}, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
