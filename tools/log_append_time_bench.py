#!/usr/bin/env python3
"""Durable produce to a log-append-time topic beside a CreateTime topic, in one run
(issue 13).

    .venv/bin/python -m tools.log_append_time_bench            # 50,000 x 1 KiB, 5 pairs
    .venv/bin/python -m tools.log_append_time_bench --quick    # a smoke run

Starts its own `nodi serve` (127.0.0.1, free port, a temporary data directory beside the
repository, stopped by pid). Each round makes two fresh topics, one `--timestamp-type
log-append` and one `create` (fsync policy "always", the default), and runs each
workload on both back to back, the order alternating between rounds (interleaved pairs:
a busy neighbour then hurts both alike):

- batched: nodi's batching producer, acks durable, linger 5 ms, 1 KiB values with a
  producer timestamp from 2001; from the first send to the flush that returns once
  every message is fsynced and acknowledged;
- single: one durable produce at a time (each its own append and fsync), the latency
  of each.

The ratio of each pair (log-append / create) is computed within the pair, and the
median over the pairs is reported, beside the machine's fdatasync latency measured in
the same run and the in-process cost of the stamp itself (records.stamp_log_append_time:
a header patch and one CRC-32C over the batch) next to the CRC check every produce
already does. Nothing is asserted: timings on a shared machine vary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import timeit

from tools import storage_bench
from tools.broker_bench_common import NodiServer, cpu_seconds_of

OLD_MS = 1_000_000_000_000


def produce_batched(address: str, topic: str, messages: int, value: bytes) -> float:
    from nodi.broker import Client

    with Client(address) as client:
        producer = client.producer(linger_ms=5)
        producer.send(topic, b"warm-up").result(30)
        started = time.perf_counter()
        for index in range(messages):
            producer.send(topic, value, key=str(index).encode(), timestamp=OLD_MS + index)
        producer.flush(120_000)
        seconds = time.perf_counter() - started
        producer.close()
    return seconds


def produce_single(address: str, topic: str, messages: int, value: bytes) -> list[float]:
    """Seconds of each durable produce, one at a time."""
    from nodi.broker import Client

    latencies = []
    with Client(address) as client:
        client.produce(topic, b"warm-up")
        for index in range(messages):
            started = time.perf_counter()
            client.produce(topic, value, timestamp=OLD_MS + index)
            latencies.append(time.perf_counter() - started)
    return latencies


def stamp_cost_us(value_bytes: int, records: int) -> tuple[float, float]:
    """(stamp, CRC check) microseconds per batch of `records` records of value_bytes."""
    from nodi.storage.records import NewRecord, build_batch, check_batch, stamp_log_append_time

    batch = build_batch([NewRecord(None, os.urandom(value_bytes), (), OLD_MS) for _ in range(records)])
    header = check_batch(batch)
    loops = max(10, 2_000_000 // len(batch))
    stamp = min(timeit.repeat(lambda: stamp_log_append_time(batch, header, OLD_MS), number=loops, repeat=5))
    check = min(timeit.repeat(lambda: check_batch(batch), number=loops, repeat=5))
    return stamp / loops * 1e6, check / loops * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=50_000, help="batched: messages per topic per round")
    parser.add_argument("--single", type=int, default=500, help="single: produces per topic per round")
    parser.add_argument("--value-bytes", type=int, default=1024)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved pairs")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few messages, 2 rounds")
    parser.add_argument("--json-out", help="also write the figures as JSON here")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.messages, arguments.single, arguments.rounds = 2_000, 30, 2
    value = os.urandom(arguments.value_bytes)
    parent = storage_bench.default_data_parent()
    kinds = ("create", "log-append")
    batched: dict[str, list[float]] = {kind: [] for kind in kinds}
    single: dict[str, list[float]] = {kind: [] for kind in kinds}  # median latency per round
    server_cpu: dict[str, float] = {kind: 0.0 for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="log-append-time-bench-", dir=parent) as directory:
        limits_directory = os.path.join(directory, "limits")
        os.makedirs(limits_directory)
        fsync = storage_bench.raw_fdatasync_loop(limits_directory, arguments.value_bytes + 128, 1, 2.0)
        server = NodiServer(directory, metrics=False)
        address = server.start()
        try:
            from nodi.broker import Client

            for round_number in range(arguments.rounds):
                order = kinds if round_number % 2 == 0 else kinds[::-1]
                for kind in order:
                    topic = f"bench-{kind}-{round_number}"
                    with Client(address) as client:
                        client.create_topic(topic, arguments.partitions, timestamp_type=kind)
                    cpu_before = cpu_seconds_of(server.pid) or 0.0
                    batched[kind].append(produce_batched(address, topic, arguments.messages, value))
                    latencies = produce_single(address, topic, arguments.single, value)
                    server_cpu[kind] += (cpu_seconds_of(server.pid) or 0.0) - cpu_before
                    single[kind].append(statistics.median(latencies))
                    print(
                        f"round {round_number} {kind}: batched {arguments.messages / batched[kind][-1]:,.0f} msg/s,"
                        f" single p50 {single[kind][-1] * 1000:.2f} ms",
                        file=sys.stderr,
                    )
        finally:
            server.stop()
    stamp_small, check_small = stamp_cost_us(arguments.value_bytes, 16)
    stamp_large, check_large = stamp_cost_us(arguments.value_bytes, 256)
    batched_ratios = [ct / lat for ct, lat in zip(batched["create"], batched["log-append"], strict=True)]
    single_ratios = [lat / ct for ct, lat in zip(single["create"], single["log-append"], strict=True)]
    results = {
        "messages": arguments.messages,
        "single": arguments.single,
        "value_bytes": arguments.value_bytes,
        "partitions": arguments.partitions,
        "rounds": arguments.rounds,
        "batched_msg_per_s": {kind: [arguments.messages / seconds for seconds in batched[kind]] for kind in kinds},
        "batched_throughput_ratio_median": statistics.median(batched_ratios),
        "single_latency_ms_p50": {kind: [seconds * 1000 for seconds in single[kind]] for kind in kinds},
        "single_latency_ratio_median": statistics.median(single_ratios),
        "server_cpu_s": server_cpu,
        "fdatasync": fsync,
        "stamp_us": {"16_records": stamp_small, "256_records": stamp_large},
        "crc_check_us": {"16_records": check_small, "256_records": check_large},
    }
    print(
        f"\n{arguments.rounds} interleaved pairs, fsync policy always, {arguments.partitions} partitions,"
        f" {arguments.value_bytes} B values\n"
    )
    print("| workload | create | log-append | ratio (log-append / create, median of pairs) |")
    print("|---|---|---|---|")
    print(
        f"| batched producer, acks durable ({arguments.messages:,} msg), msg/s |"
        f" {statistics.median(results['batched_msg_per_s']['create']):,.0f} |"
        f" {statistics.median(results['batched_msg_per_s']['log-append']):,.0f} |"
        f" {results['batched_throughput_ratio_median']:.3f} (throughput) |"
    )
    print(
        f"| one durable produce at a time ({arguments.single} each), p50 ms |"
        f" {statistics.median(results['single_latency_ms_p50']['create']):.2f} |"
        f" {statistics.median(results['single_latency_ms_p50']['log-append']):.2f} |"
        f" {results['single_latency_ratio_median']:.3f} (latency) |"
    )
    print(
        f"| server CPU s, both workloads, all rounds | {server_cpu['create']:.2f} | {server_cpu['log-append']:.2f} |"
        f" {server_cpu['log-append'] / server_cpu['create'] if server_cpu['create'] else float('nan'):.3f} |"
    )
    print("\nThe machine's limits and the stamp itself, same run:")
    print(
        f"- fdatasync of {arguments.value_bytes + 128} B writes: p50 {fsync['latency_ms_p50']:.2f} ms,"
        f" p99 {fsync['latency_ms_p99']:.2f} ms, {fsync['writes_per_s']:,.0f} writes/s"
    )
    print(
        f"- stamp_log_append_time per batch: {stamp_small:.1f} us (16 records), {stamp_large:.1f} us (256 records);"
        f" the CRC check every produce already does: {check_small:.1f} us, {check_large:.1f} us"
    )
    if arguments.json_out:
        with open(arguments.json_out, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
