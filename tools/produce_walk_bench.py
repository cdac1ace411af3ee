#!/usr/bin/env python3
"""Produce cost of the record walk (issue 8 item 1): durable produce throughput of a real
`nodi serve` with the walk over every record (as shipped) and without it (the same
server with storage.records.check_records replaced by a no-op: what produce did before,
header and CRC only), measured pair by pair in the same run, beside the disk's fsync
latency measured in the same run.

    .venv/bin/python -m tools.produce_walk_bench               # 1 KiB and 100 B records, 5 pairs
    .venv/bin/python -m tools.produce_walk_bench --quick       # seconds
    .venv/bin/python -m tools.produce_walk_bench --mode walk --record-bytes 1024
                                                               # one server, one figure

Workload: batches of --records (100) records of --record-bytes bytes, built once by the
codec as nodi's producer builds them (keyless, no headers), sent --batches times with
acks=durable to one partition of a topic with fsync_policy=always, --in-flight produce
requests kept in flight on one connection (AsyncClient.produce_batch; concurrent
appends share an fsync: group commit). Throughput: records over the wall seconds from
the first send to the last acknowledgement. Server CPU: the server process's user +
system seconds over the same interval (/proc), per batch. Also, in this process, the
walk alone (check_records) per batch. docs/benchmarks.md has the figures.

Modes alternate within each pair (walk, off, then off, walk in the next pair) so a
drifting machine weighs on both; the ratio is taken per pair and its median reported.
Each server gets its own temporary data directory (never tmpfs) and is stopped by pid.
Nothing asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from typing import Any

from nodi.broker import AsyncClient
from nodi.storage import records
from tools import storage_bench  # the fsync loop, the data directory, the machine
from tools.broker_bench_common import NodiServer, cpu_seconds_of

MODES = ("walk", "off")
# `nodi serve` with the record walk replaced by a no-op: produce checks header and CRC
# only, as before issue 8. For this benchmark's baseline, nothing else.
WITHOUT_WALK = (
    "import sys; import nodi.storage.records as records; "
    "records.check_records = lambda batch, header, limits=None: None; "
    "from nodi.cli.main import app; sys.argv[0] = 'nodi'; app()"
)


def make_batch(record_count: int, record_bytes: int) -> bytes:
    return records.build_batch(records.make_records([os.urandom(record_bytes) for _ in range(record_count)]))


async def produce(address: str, batch: bytes, batch_count: int, in_flight: int, pid: int) -> dict:
    async with AsyncClient(address, timeout_ms=60_000) as client:
        await client.create_topic("walk-bench", partitions=1, fsync_policy="always")
        await client.produce_batch("walk-bench", 0, batch)  # connection and topic warm
        remaining = batch_count

        async def sender() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await client.produce_batch("walk-bench", 0, batch, acks="durable")

        cpu_start = cpu_seconds_of(pid)
        started = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(in_flight)))
        seconds = time.perf_counter() - started
        cpu_end = cpu_seconds_of(pid)
        if cpu_start is None or cpu_end is None:
            raise RuntimeError(f"cannot read the broker's CPU time (/proc/{pid}/stat): this benchmark needs Linux")
        cpu = cpu_end - cpu_start
    record_count = batch_count * records.check_batch(batch).records_count
    return {
        "seconds": seconds,
        "records_per_s": record_count / seconds,
        "mb_per_s": batch_count * len(batch) / seconds / 1e6,
        "server_cpu_us_per_batch": cpu / batch_count * 1e6,
    }


def one_run(parent: str, mode: str, batch: bytes, arguments: argparse.Namespace) -> dict:
    directory = tempfile.mkdtemp(prefix=f"walk-bench-{mode}-", dir=parent)
    launcher = ("-m", "nodi.cli.main") if mode == "walk" else ("-c", WITHOUT_WALK)
    server = NodiServer(directory, launcher=launcher, metrics=False, log_name="serve.log")
    try:
        address = server.start()
        pid = server.pid
        assert pid is not None  # start() returned, so the process runs
        return asyncio.run(produce(address, batch, arguments.batches, arguments.in_flight, pid))
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def walk_alone_us(batch: bytes) -> dict:
    """check_records per batch in this process: the fast path, and the record-by-record
    walk it falls back to (the same batch, the fast path skipped)."""
    header = records.check_batch(batch)
    view = memoryview(batch)
    number = 2000
    fast = min(timeit.repeat(lambda: records.check_records(batch, header), number=number, repeat=3)) / number
    slow = (
        min(
            timeit.repeat(
                lambda: records._scan_records(
                    view, records.BATCH_HEADER_BYTES, header, records.DEFAULT_RECORD_LIMITS, None
                ),
                number=number,
                repeat=3,
            )
        )
        / number
    )
    crc = min(timeit.repeat(lambda: records.check_batch(batch), number=number, repeat=3)) / number
    return {"walk_us": fast * 1e6, "record_by_record_us": slow * 1e6, "header_and_crc_us": crc * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="produce_walk_bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--record-bytes",
        type=int,
        nargs="+",
        default=[1024, 100],
        help="value bytes per record, one measurement each (default 1024 100)",
    )
    parser.add_argument("--records", type=int, default=100, help="records per batch (default 100)")
    parser.add_argument("--batches", type=int, default=None, help="batches per run (default 3000; 300 with --quick)")
    parser.add_argument("--in-flight", type=int, default=8, help="produce requests in flight (default 8)")
    parser.add_argument(
        "--pairs", type=int, default=None, help="walk/off pairs per record size (default 5; 1 with --quick)"
    )
    parser.add_argument("--mode", choices=MODES, default=None, help="one run of one mode (for an outside timer)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--data-dir", default=None, help="parent of the temporary data directories")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    arguments = parser.parse_args(argv)
    arguments.batches = arguments.batches or (300 if arguments.quick else 3000)
    pairs = arguments.pairs or (1 if arguments.quick else 5)
    parent = arguments.data_dir or storage_bench.default_data_parent()
    os.makedirs(parent, exist_ok=True)
    if arguments.mode is not None:  # one run: the figure on stdout
        for size in arguments.record_bytes:
            run = one_run(parent, arguments.mode, make_batch(arguments.records, size), arguments)
            print(json.dumps({"mode": arguments.mode, "record_bytes": size, **run}))
        return 0
    fsync = storage_bench.raw_fdatasync_loop(parent, 1024, 1, 1.0 if arguments.quick else 3.0)
    results: dict[str, Any] = {"machine": storage_bench.machine_description(parent), "fsync": fsync, "sizes": []}
    print(
        f"fsync of 1 KiB writes on {parent}: p50 {fsync['latency_ms_p50']:.3f} ms, "
        f"p99 {fsync['latency_ms_p99']:.3f} ms ({fsync['writes']} writes)",
        flush=True,
    )
    for size in arguments.record_bytes:
        batch = make_batch(arguments.records, size)
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        ratios = []
        for pair in range(pairs):
            order = MODES if pair % 2 == 0 else tuple(reversed(MODES))
            figures = {mode: one_run(parent, mode, batch, arguments) for mode in order}
            for mode in MODES:
                runs[mode].append(figures[mode])
            ratios.append(figures["walk"]["records_per_s"] / figures["off"]["records_per_s"])
            print(
                f"{arguments.records} x {size} B, pair {pair + 1}: walk {figures['walk']['records_per_s']:,.0f} "
                f"rec/s, off {figures['off']['records_per_s']:,.0f} rec/s, ratio {ratios[-1]:.3f}",
                flush=True,
            )
        alone = walk_alone_us(batch)
        summary = {
            "record_bytes": size,
            "records_per_batch": arguments.records,
            "batch_bytes": len(batch),
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
            **{
                f"{mode}_records_per_s_median": statistics.median(r["records_per_s"] for r in runs[mode])
                for mode in MODES
            },
            **{
                f"{mode}_server_cpu_us_per_batch_median": statistics.median(
                    r["server_cpu_us_per_batch"] for r in runs[mode]
                )
                for mode in MODES
            },
            **alone,
            "runs": runs,
        }
        results["sizes"].append(summary)
        print(
            f"{arguments.records} x {size} B: throughput with the walk / without, median of {pairs} pairs: "
            f"{summary['ratio_median']:.3f} [{min(ratios):.3f}-{max(ratios):.3f}]; server CPU per batch "
            f"{summary['walk_server_cpu_us_per_batch_median']:.0f} vs "
            f"{summary['off_server_cpu_us_per_batch_median']:.0f} us; the walk alone {alone['walk_us']:.1f} us "
            f"(record by record {alone['record_by_record_us']:.1f} us; header + CRC {alone['header_and_crc_us']:.1f} us)",
            flush=True,
        )
    if arguments.json_out:
        with open(arguments.json_out, "w") as output:
            json.dump(results, output, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
