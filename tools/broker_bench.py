#!/usr/bin/env python3
"""Broker benchmark: durable produce, consume and end-to-end latency of a real
`nodi serve` process, beside this machine's raw disk limits and Redis Streams on the same
workload, all measured in the same run.

    .venv/bin/python -m tools.broker_bench                  # full run, about a minute
    .venv/bin/python -m tools.broker_bench --quick          # smoke run, seconds
    .venv/bin/python -m tools.broker_bench --json-out results.json
    nodi bench --quick                                      # the same tool
    nodi --server HOST:PORT bench                           # a running broker instead

The workload: 1 KiB values, one client process (one asyncio loop, nodi's AsyncClient;
redis-py for Redis), one partition / one stream. docs/benchmarks.md explains the figures.

- produce: --messages values through the batching producer (acks=durable, the topic
  created with fsync=always, linger 5 ms, batches up to --batch-bytes-max, by default
  the producer's 256 KiB), timed from the first send to
  the flush that returns once every message is acknowledged, that is fsynced. Redis:
  XADD in pipelines of 100 to a server with appendonly yes, appendfsync always.
- consume: everything produced, read back from the earliest offset by a consumer without
  a group (1 MiB fetches); Redis: XREAD of 1,000 entries (about 1 MiB) per call.
- latency: --latency-rate messages per second (default 1,000) for --latency-seconds,
  each stamped with time.perf_counter_ns() right before send() and again when the
  consumer (same process, same clock) gets it back; the first --latency-warmup messages
  are not counted. nodi's producer has a small linger (--latency-linger-ms); a consumer
  only sees fsynced messages, so the latency includes an fsync. Redis: one XADD per
  message, read by XREAD BLOCK on a second connection (a thread).
- machine limits, each round, on the file system of the data directory: a sequential
  write of the produce volume in 1 MiB writes plus one fdatasync, and write+fdatasync
  loops of one 1-message batch and of one 256 KiB batch (tools/storage_bench.py code).
- Every phase stops at its message count or its time cap (--phase-seconds-max). The run
  is --rounds rounds of all of it; figures and ratios are medians over the rounds. Each
  phase also records the CPU used by the client, by the server measured, and by every
  other process on the machine (broker_bench_common.CpuMeter): CPU microseconds per
  message hardly move when the machine is busy, rates and latencies do.

Files: this one (nodi's phases, the run, the options), broker_bench_common.py (settings,
CPU meters, figures), broker_bench_redis.py (Redis), broker_bench_report.py (summary,
ratios, the report); the raw disk limits come from storage_bench.py.

The tool starts its own `nodi serve` (127.0.0.1, a free port, a temporary data directory
beside the repository or in the system temp dir, never on tmpfs) unless --server is
given, and its own redis-server (a free loopback port, a temporary directory) when
redis-server and redis-py (`pip install -e '.[bench]'`) are there; both are stopped by
pid. Without Redis it says so and reports nodi alone. Nothing here asserts a timing;
tests/test_broker_bench_smoke.py only runs --quick.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import shutil
import sys
import time
import urllib.request
from dataclasses import asdict

from nodi.broker import AsyncClient
from nodi.broker.client.errors import BufferFull
from nodi.broker.client.producer import producer_options
from nodi.storage.errors import NodiError
from nodi.storage.limits import KIB, MIB
from nodi.storage.records import NewRecord, build_batch
from tools import broker_bench_redis as redis_bench
from tools import storage_bench  # the raw disk limits, machine description
from tools.broker_bench_common import (
    LONG_POLL_MS,
    CpuMeter,
    NodiServer,
    Settings,
    latency_figures,
    latency_line,
    progress,
    throughput_figures,
)
from tools.broker_bench_report import ratios, render, summarise

VALUE_BYTES = 1 * KIB
PRODUCE_LINGER_MS = 5
FETCH_BYTES_MAX = 1 * MIB
# The produce loop hands the loop to the sender every this many sends (an application
# producing from a coroutine awaits something now and then).
PRODUCE_YIELD_EVERY = 100
BUSY_OTHERS_SHARE = 0.10
FSYNC_BUCKET = re.compile(r"^nodi_fsync_latency_seconds_bucket\{(.*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


def settings_from_arguments(arguments: argparse.Namespace) -> Settings:
    quick = arguments.quick
    return Settings(
        messages=arguments.messages or (5_000 if quick else 200_000),
        value_bytes=arguments.value_bytes,
        partitions=arguments.partitions,
        batch_bytes_max=arguments.batch_bytes_max or producer_options()["batch_bytes_max"],
        phase_seconds_max=arguments.phase_seconds_max or (10.0 if quick else 30.0),
        latency_rate=arguments.latency_rate,
        latency_seconds=arguments.latency_seconds or (0.5 if quick else 10.0),
        latency_warmup=arguments.latency_warmup if arguments.latency_warmup is not None else (50 if quick else 200),
        latency_linger_ms=arguments.latency_linger_ms,
        raw_loop_seconds=0.3 if quick else 2.0,
        rounds=arguments.rounds or (1 if quick else 3),
        quick=quick,
    )


# ---------------------------------------------------------------------------
# nodi


def fsync_buckets(metrics_port: int | None, topic: str) -> dict[float, float] | None:
    """The server's fsync latency histogram of `topic` (cumulative count per upper bound
    in seconds, summed over partitions) from its Prometheus endpoint; None without one."""
    if metrics_port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        found = FSYNC_BUCKET.match(line)
        if found is None:
            continue
        labels = dict(LABEL.findall(found.group(1)))
        if labels.get("topic") == topic:
            bound = float(labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + float(found.group(2))
    return buckets


def fsync_figures(before: dict | None, after: dict | None, messages: int) -> dict:
    """fsyncs the server made for the topic during a phase, messages per fsync (group
    commit), and the p50 / p99 fsync latency as the upper bound of the histogram bucket
    holding it."""
    if before is None or after is None or math.inf not in after:
        return {
            "server_fsyncs": None,
            "messages_per_fsync": None,
            "server_fsync_ms_p50": None,
            "server_fsync_ms_p99": None,
        }
    counts = {bound: after[bound] - before.get(bound, 0.0) for bound in sorted(after)}
    total = counts[math.inf]

    def quantile(fraction: float) -> float | None:
        for bound, cumulative in counts.items():
            if total and cumulative >= fraction * total:
                return bound * 1000
        return None

    return {
        "server_fsyncs": int(total),
        "messages_per_fsync": messages / total if total else None,
        "server_fsync_ms_p50": quantile(0.50),
        "server_fsync_ms_p99": quantile(0.99),
    }


async def nodi_produce(client: AsyncClient, topic: str, settings: Settings, value: bytes) -> dict:
    """Send, flush, then count what the partitions hold: the futures are not kept (an
    application rarely keeps 200,000 of them, and the garbage collector's passes over
    them would be measured too); a failed batch shows as messages missing from the log."""
    producer = client.producer(linger_ms=PRODUCE_LINGER_MS, batch_bytes_max=settings.batch_bytes_max, acks="durable")
    send = producer.send
    requested = settings.messages
    started = time.perf_counter()
    deadline = started + settings.phase_seconds_max
    sent = 0
    try:
        while sent < requested:
            try:
                send(topic, value)
            except BufferFull:
                await producer.wait_for_space()
                continue
            sent += 1
            if sent % PRODUCE_YIELD_EVERY == 0:
                await asyncio.sleep(0)
                if time.perf_counter() >= deadline:
                    break
        await producer.flush()
        seconds = time.perf_counter() - started
    finally:
        await producer.close()
    stored = 0
    for partition in range(settings.partitions):
        stored += await client.list_offsets(topic, partition, "latest")
    return throughput_figures(stored, len(value), seconds, requested, sent - stored)


async def nodi_consume(client: AsyncClient, topic: str, expected: int, settings: Settings, value_bytes: int) -> dict:
    consumer = client.consumer(topic, start="earliest", wait_ms=LONG_POLL_MS, bytes_max=FETCH_BYTES_MAX)
    received = 0
    started = time.perf_counter()
    deadline = started + settings.phase_seconds_max
    try:
        await consumer.start()
        while received < expected and time.perf_counter() < deadline:
            received += len(await consumer.poll())
        seconds = time.perf_counter() - started
    finally:
        await consumer.close()
    return throughput_figures(received, value_bytes, seconds, expected, 0)


async def nodi_latency(client: AsyncClient, topic: str, settings: Settings) -> dict:
    count = settings.latency_messages
    sent_ns = [0] * count
    received_ns = [0] * count
    padding = bytes(settings.value_bytes - 8)
    producer = client.producer(linger_ms=settings.latency_linger_ms, acks="durable")
    consumer = client.consumer(topic, start="earliest", wait_ms=LONG_POLL_MS)
    await consumer.start()
    deadline = time.perf_counter() + settings.latency_seconds + settings.phase_seconds_max

    async def consume() -> None:
        got = 0
        clock = time.perf_counter_ns
        while got < count and time.perf_counter() < deadline:
            batch = await consumer.poll(timeout_ms=LONG_POLL_MS)
            now = clock()
            for message in batch:
                assert message.value is not None  # the bench's values begin with their number
                received_ns[int.from_bytes(message.value[:8], "big")] = now
            got += len(batch)

    try:
        receiver = asyncio.get_running_loop().create_task(consume())
        interval = 1 / settings.latency_rate
        started = time.perf_counter()
        for sequence in range(count):
            delay = started + sequence * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_ns[sequence] = time.perf_counter_ns()
            producer.send(topic, sequence.to_bytes(8, "big") + padding)
        seconds = time.perf_counter() - started
        await producer.flush()
        await asyncio.wait_for(receiver, max(1.0, deadline - time.perf_counter()))
    finally:
        await producer.close()
        await consumer.close()
    figures = latency_figures(sent_ns, received_ns, settings.latency_warmup, seconds)
    figures["linger_ms"] = settings.latency_linger_ms
    return figures


async def nodi_round(
    address: str,
    server_pid: int | None,
    metrics_port: int | None,
    idle_pids: tuple,
    settings: Settings,
    round_number: int,
) -> dict:
    """The three phases on fresh topics (deleted after); `idle_pids` (the Redis server)
    are not counted as other load."""
    value = os.urandom(settings.value_bytes)
    prefix = f"bench-{os.getpid()}-{round_number}"
    results: dict = {}
    async with AsyncClient(address, timeout_ms=60_000) as client:
        for name in ("throughput", "latency"):
            await client.create_topic(f"{prefix}-{name}", partitions=settings.partitions, fsync_policy="always")
        try:
            progress(
                f"round {round_number}: nodi produce {settings.messages:,} x {settings.value_bytes} B, acks=durable"
            )
            fsyncs = fsync_buckets(metrics_port, f"{prefix}-throughput")
            meter = CpuMeter(server_pid, idle_pids)
            produced = await nodi_produce(client, f"{prefix}-throughput", settings, value)
            results["produce"] = {**produced, **meter.figures(produced["messages"])}
            results["produce"].update(
                fsync_figures(fsyncs, fsync_buckets(metrics_port, f"{prefix}-throughput"), produced["messages"])
            )
            progress(f"  {produced['msg_per_s']:,.0f} msg/s, {produced['mb_per_s']:.1f} MB/s")
            progress(f"round {round_number}: nodi consume")
            meter = CpuMeter(server_pid, idle_pids)
            consumed = await nodi_consume(
                client, f"{prefix}-throughput", produced["messages"], settings, settings.value_bytes
            )
            results["consume"] = {**consumed, **meter.figures(consumed["messages"])}
            progress(f"  {consumed['msg_per_s']:,.0f} msg/s, {consumed['mb_per_s']:.1f} MB/s")
            progress(
                f"round {round_number}: nodi latency at {settings.latency_rate:,}/s for {settings.latency_seconds} s"
            )
            fsyncs = fsync_buckets(metrics_port, f"{prefix}-latency")
            meter = CpuMeter(server_pid, idle_pids)
            latency = await nodi_latency(client, f"{prefix}-latency", settings)
            results["latency"] = {**latency, **meter.figures(latency["messages"])}
            results["latency"].update(
                fsync_figures(fsyncs, fsync_buckets(metrics_port, f"{prefix}-latency"), latency["messages"])
            )
            progress(latency_line(latency))
        finally:
            for name in ("throughput", "latency"):
                try:
                    await client.delete_topic(f"{prefix}-{name}")
                except Exception as error:  # the figures matter more than the cleanup
                    progress(f"  could not delete topic {prefix}-{name}: {error}")
    return results


async def check_reachable(address: str) -> None:
    """Fail fast (ConnectFailed) when --server does not answer."""
    async with AsyncClient(address, timeout_ms=10_000, reconnect_attempts_max=3) as client:
        await client.list_topics()


# ---------------------------------------------------------------------------
# Machine limits


def one_message_batch_bytes(value_bytes: int) -> int:
    return len(build_batch([NewRecord(None, bytes(value_bytes))]))


def machine_limits(directory: str, settings: Settings, round_number: int) -> dict:
    volume_bytes = max(1 * MIB, settings.messages * one_message_batch_bytes(settings.value_bytes))
    progress(f"round {round_number}: raw sequential write of {volume_bytes / MIB:.0f} MiB + fdatasync")
    storage_bench.warm_page_allocator(directory, volume_bytes)
    sequential = storage_bench.raw_sequential_write(directory, volume_bytes)
    progress(f"  {sequential['mb_per_s']:,.0f} MB/s")
    loops = []
    for bytes_per_write, records in (
        (one_message_batch_bytes(settings.value_bytes), 1),
        (256 * KIB, 256 * KIB // settings.value_bytes),
    ):
        loop = storage_bench.raw_fdatasync_loop(directory, bytes_per_write, records, settings.raw_loop_seconds)
        progress(
            f"  write+fdatasync of {bytes_per_write:,} B: {loop['writes_per_s']:,.0f}/s, "
            f"p50 {loop['latency_ms_p50']:.3f} ms, p99 {loop['latency_ms_p99']:.3f} ms"
        )
        loops.append(loop)
    return {"sequential_write": sequential, "fdatasync_small": loops[0], "fdatasync_batch": loops[1]}


# ---------------------------------------------------------------------------
# Main


def run(settings: Settings, arguments: argparse.Namespace, data_directory: str) -> dict:
    started = time.perf_counter()
    machine = storage_bench.machine_description(data_directory)
    machine["load_average_start"] = [round(value, 2) for value in os.getloadavg()]
    results: dict = {
        "schema": 1,
        "machine": machine,
        "settings": {
            **asdict(settings),
            "latency_messages": settings.latency_messages,
            "produce_linger_ms": PRODUCE_LINGER_MS,
            "fetch_bytes_max": FETCH_BYTES_MAX,
            "redis_pipeline": redis_bench.REDIS_PIPELINE,
            "redis_read_count": redis_bench.REDIS_READ_COUNT,
            "client": "nodi.broker.AsyncClient, one asyncio loop",
        },
        "rounds": [],
    }
    nodi_server = None
    redis_server = None
    try:
        if arguments.server:
            address, server_pid, metrics_port = arguments.server, None, None
            asyncio.run(check_reachable(address))
            results["nodi_server"] = f"--server {address} (not started here; its CPU is not measured)"
        else:
            nodi_server = NodiServer(os.path.join(data_directory, "nodi"))
            os.makedirs(nodi_server.directory)
            address = nodi_server.start()
            server_pid = nodi_server.pid
            metrics_port = nodi_server.metrics_port
            results["nodi_server"] = f"started here at {address}, pid {server_pid}, data in {nodi_server.directory}"
        progress(f"nodi server: {results['nodi_server']}")
        redis_executable = arguments.redis_server or shutil.which("redis-server")
        reason = (
            "skipped (--no-redis)" if arguments.no_redis else redis_bench.redis_unavailable_reason(redis_executable)
        )
        if reason is None and redis_executable is not None:  # the reason is None only for an executable
            redis_server = redis_bench.RedisServer(redis_executable, os.path.join(data_directory, "redis"))
            redis_server.start()
            results["redis_status"] = (
                f"redis-server {redis_server.version} started here on port {redis_server.port}, "
                f"appendonly yes, appendfsync always; {redis_bench.redis_parser()}"
            )
        else:
            results["redis_status"] = f"not run: {reason}"
        progress(f"Redis: {results['redis_status']}")
        for round_number in range(settings.rounds):
            one: dict = {"round": round_number}
            one["limits"] = machine_limits(data_directory, settings, round_number)
            redis_pid = redis_server.pid if redis_server else None
            one["nodi"] = asyncio.run(
                nodi_round(address, server_pid, metrics_port, (redis_pid,), settings, round_number)
            )
            one["redis"] = (
                redis_bench.redis_round(redis_server, settings, round_number, (server_pid,)) if redis_server else None
            )
            results["rounds"].append(one)
    finally:
        if nodi_server is not None:
            nodi_server.stop()
        if redis_server is not None:
            redis_server.stop()
    machine["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    shares = [
        one[system][phase]["others_cpu_share"]
        for one in results["rounds"]
        for system in ("nodi", "redis")
        if one.get(system)
        for phase in ("produce", "consume", "latency")
        if one[system][phase]["others_cpu_share"] is not None
    ]
    machine["others_cpu_share_max"] = max(shares) if shares else None
    # Another process kept a tenth of the machine busy in some phase: say the figures are noisy.
    machine["busy"] = bool(shares) and max(shares) > BUSY_OTHERS_SHARE and not arguments.server
    # With --server the broker is one of the "other" processes: its CPU is not told apart.
    machine["others_include_the_broker"] = bool(arguments.server)
    results["summary"] = summarise(results["rounds"])
    results["ratios"] = ratios(results["rounds"], settings.latency_rate)
    results["total_seconds"] = time.perf_counter() - started
    return results


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    from nodi.cli.bench import add_bench_options

    parser = argparse.ArgumentParser(
        prog="broker_bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_bench_options(parser, "broker")  # declared once, in nodi/cli/bench.py (BENCH_OPTIONS)
    arguments = parser.parse_args(argv)
    for name in ("messages", "rounds"):
        value = getattr(arguments, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    if arguments.value_bytes < 8:
        parser.error("--value-bytes must be at least 8 (the latency phase stamps a sequence number)")
    if arguments.latency_rate < 1 or arguments.partitions < 1:
        parser.error("--latency-rate and --partitions must be at least 1")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    settings = settings_from_arguments(arguments)
    return storage_bench.run_in_scratch_directory(
        "broker",
        arguments,
        lambda directory: run(settings, arguments, directory),
        render,
        progress,
        errors=(NodiError, RuntimeError),
    )


if __name__ == "__main__":
    sys.exit(main())
