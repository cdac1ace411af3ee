#!/usr/bin/env python3
"""Many partitions on one Store (issues 9 and 18): durable append throughput and
latency to one partition and to many, and the threads and start time of a Store with
thousands of partitions, beside this disk's fdatasync latency measured in the same run.

    .venv/bin/python tools/partitions_bench.py                # about a minute
    .venv/bin/python tools/partitions_bench.py --quick        # seconds: smoke run
    .venv/bin/python tools/partitions_bench.py --json-out partitions.json

What it measures (docs/benchmarks.md has the figures):
- fdatasync: a loop of one 1 KiB pwrite plus fdatasync on one file, just before the
  append cells (p50/p99 ms): the disk's own price of one durable write.
- append cells: Store.open, a topic of P partitions (fsync `always`), then A appender
  threads each doing Log.append (returns once fsynced) of a pre-built one-record batch
  (1 KiB value) for the cell's time, to one partition, to each partition in turn (one
  appender) or to a random partition (several). Reported: appends/s, latency p50/p99,
  appends per fsync (group commit) and the threads of the process at the end.
- start: a child process creates a Store with N partitions and one message each and
  closes it (timed); a fresh child times the clean Store.open, counts the threads after
  the open and after one durable append to every partition, and reports its VmHWM.

It uses only Store.open, create_topic, Store.log and Log.append, so the same file runs
against an older checkout (PYTHONPATH) for a before/after comparison. Nothing here
asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

from nodi.storage.metadata import TopicConfig
from nodi.storage.records import NewRecord, build_batch
from nodi.storage.store import Store

VALUE_BYTES = 1024
TOPIC = "bench"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def fdatasync_loop(directory: str, seconds: float) -> dict:
    path = os.path.join(directory, "fdatasync-probe")
    data = os.urandom(VALUE_BYTES)
    latencies = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        position = 0
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            started = time.perf_counter()
            os.pwrite(fd, data, position)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - started)
            position += len(data)
    finally:
        os.close(fd)
        os.unlink(path)
    return {"count": len(latencies), "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000}


def append_cell(directory: str, partitions: int, appenders: int, order: str, seconds: float) -> dict:
    """`order`: "one" (partition 0), "turn" (each partition in turn), "random"."""
    data_dir = tempfile.mkdtemp(prefix=f"cell-{partitions}-{appenders}-", dir=directory)
    batch = build_batch([NewRecord(b"key", os.urandom(VALUE_BYTES))])
    with Store.open(data_dir) as store:
        store.create_topic(TOPIC, TopicConfig(partitions=partitions))
        logs = [store.log(TOPIC, partition) for partition in range(partitions)]
        latencies: list[list[float]] = [[] for _ in range(appenders)]
        start = threading.Barrier(appenders + 1)
        ends = [0.0]

        def append(number: int) -> None:
            rng = random.Random(number)
            mine = latencies[number]
            turn = number
            start.wait()
            while time.monotonic() < ends[0]:
                if order == "one":
                    log = logs[0]
                elif order == "turn":
                    log = logs[turn % partitions]
                    turn += appenders
                else:
                    log = logs[rng.randrange(partitions)]
                began = time.perf_counter()
                log.append(batch)
                mine.append(time.perf_counter() - began)

        threads = [threading.Thread(target=append, args=(number,)) for number in range(appenders)]
        for thread in threads:
            thread.start()
        ends[0] = time.monotonic() + seconds
        began = time.monotonic()
        start.wait()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - began
        thread_count = threading.active_count()
        fsyncs = sum(log.statistics().fsyncs for log in logs)
    every = [value for mine in latencies for value in mine]
    return {
        "partitions": partitions, "appenders": appenders, "order": order, "appends": len(every),
        "appends_per_second": len(every) / elapsed, "p50_ms": percentile(every, 0.5) * 1000,
        "p99_ms": percentile(every, 0.99) * 1000, "appends_per_fsync": len(every) / max(fsyncs, 1),
        "threads": thread_count,
    }


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def child_create(data_dir: str, partitions: int) -> dict:
    batch = build_batch([NewRecord(b"key", b"v" * 100)])
    began = time.monotonic()
    with Store.open(data_dir) as store:
        store.create_topic(TOPIC, TopicConfig(partitions=partitions))
        created = time.monotonic() - began
        for partition in range(partitions):
            store.log(TOPIC, partition).append(batch)
        threads = threading.active_count()
    return {"create_seconds": created, "threads_after_appends": threads}


def child_open(data_dir: str, partitions: int) -> dict:
    batch = build_batch([NewRecord(b"key", b"v" * 100)])
    began = time.monotonic()
    store = Store.open(data_dir)
    opened = time.monotonic() - began
    threads_after_open = threading.active_count()
    began = time.monotonic()
    for partition in range(partitions):
        store.log(TOPIC, partition).append(batch)
    appended = time.monotonic() - began
    threads_after_appends = threading.active_count()
    began = time.monotonic()
    store.close()
    return {"open_seconds": opened, "threads_after_open": threads_after_open,
            "append_each_ms": appended / partitions * 1000, "threads_after_appends": threads_after_appends,
            "close_seconds": time.monotonic() - began, "threads_after_close": threading.active_count(),
            "peak_rss_kib": _peak_rss_kib()}


def start_cell(directory: str, partitions: int) -> dict:
    data_dir = tempfile.mkdtemp(prefix=f"start-{partitions}-", dir=directory)
    result = {"partitions": partitions}
    for mode in ("--child-create", "--child-open"):
        output = subprocess.run(
            [sys.executable, os.path.abspath(__file__), mode, data_dir, "--partitions", str(partitions)],
            check=True, capture_output=True, text=True,
        ).stdout
        result.update(json.loads(output.strip().splitlines()[-1]))
    return result


def render(results: dict) -> str:
    lines = [f"fdatasync of 1 KiB: p50 {results['fdatasync']['p50_ms']:.3f} ms, "
             f"p99 {results['fdatasync']['p99_ms']:.3f} ms ({results['fdatasync']['count']} syncs)", ""]
    lines.append("| partitions | appenders | order | appends/s | p50 ms | p99 ms | appends/fsync | threads |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for cell in results["append"]:
        lines.append(f"| {cell['partitions']:,} | {cell['appenders']} | {cell['order']} | "
                     f"{cell['appends_per_second']:,.0f} | {cell['p50_ms']:.3f} | {cell['p99_ms']:.3f} | "
                     f"{cell['appends_per_fsync']:.2f} | {cell['threads']} |")
    start = results["start"]
    lines += ["", f"{start['partitions']:,} partitions: create {start['create_seconds']:.2f} s; clean open "
              f"{start['open_seconds']:.2f} s, threads after open {start['threads_after_open']}, after a "
              f"durable append to each {start['threads_after_appends']} ({start['append_each_ms']:.3f} ms each), "
              f"after close {start['threads_after_close']}; close {start['close_seconds']:.2f} s; "
              f"peak RSS {start['peak_rss_kib'] / 1024:.0f} MiB"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny counts and times")
    parser.add_argument("--partitions", type=int, default=1000, help="partitions of the many-partition cells")
    parser.add_argument("--start-partitions", type=int, default=2000, help="partitions of the start cell")
    parser.add_argument("--appenders", type=int, default=8, help="appender threads of the concurrent cells")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each append cell")
    parser.add_argument("--data-dir", default=None, help="parent of the temporary data (default: system temp)")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    parser.add_argument("--child-create", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-open", default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.child_create:
        print(json.dumps(child_create(arguments.child_create, arguments.partitions)))
        return 0
    if arguments.child_open:
        print(json.dumps(child_open(arguments.child_open, arguments.partitions)))
        return 0
    if arguments.quick:
        arguments.partitions, arguments.start_partitions, arguments.seconds = 20, 50, 0.3
    with tempfile.TemporaryDirectory(prefix="nodi-partitions-bench-", dir=arguments.data_dir) as directory:
        many = arguments.partitions
        results = {"fdatasync": fdatasync_loop(directory, min(arguments.seconds, 3.0)), "append": []}
        for partitions, appenders, order in ((1, 1, "one"), (1, arguments.appenders, "one"),
                                             (many, 1, "turn"), (many, arguments.appenders, "random")):
            results["append"].append(append_cell(directory, partitions, appenders, order, arguments.seconds))
        results["start"] = start_cell(directory, arguments.start_partitions)
    print(render(results))
    if arguments.json_out:
        with open(arguments.json_out, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
