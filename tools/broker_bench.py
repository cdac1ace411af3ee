#!/usr/bin/env python3
"""Broker benchmark (issue 3): durable produce, consume and end-to-end latency of a real
`nodi serve` process, beside this machine's raw disk limits and Redis Streams on the same
workload, all measured in the same run.

    .venv/bin/python tools/broker_bench.py                  # full run, about a minute
    .venv/bin/python tools/broker_bench.py --quick          # smoke run, seconds
    .venv/bin/python tools/broker_bench.py --json-out results.json
    nodi bench --quick                                      # the same tool
    nodi --server HOST:PORT bench                           # a running broker instead

The workload: 1 KiB values, one client process (one asyncio loop, nodi's AsyncClient;
redis-py for Redis), one partition / one stream. docs/benchmarks.md explains the figures.

- produce: --messages values through the batching producer (acks=durable, the topic
  created with fsync=always, linger 5 ms, 256 KiB batches), timed from the first send to
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
  is --rounds rounds of all of it; figures and ratios are medians over the rounds, and
  the CPU seconds used by the client and by each server show who was busy.

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
import json
import os
import re
import shutil
import signal
import socket
import statistics as statistics_module
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import storage_bench  # noqa: E402 - the raw disk limits, machine description, tables

from nodi.broker import AsyncClient  # noqa: E402
from nodi.broker.client_errors import BufferFull  # noqa: E402
from nodi.storage.errors import NodiError  # noqa: E402
from nodi.storage.limits import KIB, MIB  # noqa: E402
from nodi.storage.records import NewRecord, build_batch  # noqa: E402

MB = storage_bench.MB
VALUE_BYTES = 1 * KIB
PRODUCE_LINGER_MS = 5
PRODUCE_BATCH_BYTES_MAX = 256 * KIB
FETCH_BYTES_MAX = 1 * MIB
# The produce loop hands the loop to the sender every this many sends (an application
# producing from a coroutine awaits something now and then).
PRODUCE_YIELD_EVERY = 100
REDIS_PIPELINE = 100
REDIS_READ_COUNT = 1_000  # about FETCH_BYTES_MAX of 1 KiB entries
LONG_POLL_MS = 100
SERVER_START_TIMEOUT_S = 30
SERVER_STOP_TIMEOUT_S = 15
TARGET_VS_REDIS = 10.0
TARGET_LATENCY_P99_MS = 1.0
READY = re.compile(r"nodi listening on ([\d.]+):(\d+)")


def progress(message: str) -> None:
    print(f"[broker_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Settings:
    messages: int
    value_bytes: int
    partitions: int
    phase_seconds_max: float
    latency_rate: int
    latency_seconds: float
    latency_warmup: int
    latency_linger_ms: float
    raw_loop_seconds: float
    rounds: int
    quick: bool

    @property
    def latency_messages(self) -> int:
        return max(1, int(self.latency_rate * self.latency_seconds))


def settings_from_arguments(arguments: argparse.Namespace) -> Settings:
    quick = arguments.quick
    return Settings(
        messages=arguments.messages or (5_000 if quick else 200_000),
        value_bytes=arguments.value_bytes,
        partitions=arguments.partitions,
        phase_seconds_max=arguments.phase_seconds_max or (10.0 if quick else 30.0),
        latency_rate=arguments.latency_rate,
        latency_seconds=arguments.latency_seconds or (0.5 if quick else 10.0),
        latency_warmup=arguments.latency_warmup if arguments.latency_warmup is not None else (50 if quick else 200),
        latency_linger_ms=arguments.latency_linger_ms,
        raw_loop_seconds=0.3 if quick else 2.0,
        rounds=arguments.rounds or (1 if quick else 3),
        quick=quick,
    )


def cpu_seconds_of(pid: int | None) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None when unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by this process and by a server process during one phase."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.client_start = time.process_time()
        self.server_start = cpu_seconds_of(server_pid)

    def figures(self) -> dict:
        server_now = cpu_seconds_of(self.server_pid)
        return {
            "client_cpu_seconds": time.process_time() - self.client_start,
            "server_cpu_seconds": None if server_now is None or self.server_start is None
            else server_now - self.server_start,
        }


def latency_figures(sent_ns: list[int], received_ns: list[int], warmup: int, seconds: float) -> dict:
    samples = sorted(
        (received - sent) / 1e6 for sent, received in zip(sent_ns[warmup:], received_ns[warmup:]) if received
    )
    percentile = storage_bench.percentile
    counted = len(sent_ns) - min(warmup, len(sent_ns))
    return {
        "messages": len(sent_ns),
        "warmup_messages": min(warmup, len(sent_ns)),
        "samples": len(samples),
        "missing": counted - len(samples),
        "achieved_rate_per_s": len(sent_ns) / seconds if seconds > 0 else None,
        "latency_ms_p50": percentile(samples, 0.50),
        "latency_ms_p99": percentile(samples, 0.99),
        "latency_ms_max": samples[-1] if samples else None,
        "latency_ms_mean": statistics_module.fmean(samples) if samples else None,
    }


def throughput_figures(messages: int, value_bytes: int, seconds: float, requested: int, errors: int) -> dict:
    return {
        "messages": messages,
        "requested_messages": requested,
        "errors": errors,
        "seconds": seconds,
        "time_capped": messages < requested,
        "msg_per_s": messages / seconds if seconds > 0 else None,
        "mb_per_s": messages * value_bytes / seconds / MB if seconds > 0 else None,
    }


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process(process: subprocess.Popen) -> int:
    """SIGTERM by pid, wait, then SIGKILL by pid if it would not stop."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            return process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            return process.wait(timeout=SERVER_STOP_TIMEOUT_S)
    return process.returncode


# ---------------------------------------------------------------------------
# nodi


class NodiServer:
    """A `nodi serve` child on 127.0.0.1 with a free port; its output goes to a file."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.log_path = os.path.join(directory, "nodi-serve.log")
        self.process: subprocess.Popen | None = None
        self.address = ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> str:
        command = [sys.executable, "-m", "nodi.cli.main", "serve", "--data-dir", os.path.join(self.directory, "data"),
                   "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"]
        with open(self.log_path, "w") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            with open(self.log_path) as output:
                found = READY.search(output.read())
            if found:
                self.address = f"{found.group(1)}:{found.group(2)}"
                return self.address
            time.sleep(0.05)
        self.stop()
        with open(self.log_path) as output:
            raise RuntimeError("nodi serve did not start:\n" + output.read()[-4000:])

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


async def nodi_produce(client: AsyncClient, topic: str, settings: Settings, value: bytes) -> dict:
    """Send, flush, then count what the partitions hold: the futures are not kept (an
    application rarely keeps 200,000 of them, and the garbage collector's passes over
    them would be measured too); a failed batch shows as messages missing from the log."""
    producer = client.producer(linger_ms=PRODUCE_LINGER_MS, batch_bytes_max=PRODUCE_BATCH_BYTES_MAX, acks="durable")
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


async def nodi_round(address: str, server_pid: int | None, settings: Settings, round_number: int) -> dict:
    value = os.urandom(settings.value_bytes)
    prefix = f"bench-{os.getpid()}-{round_number}"
    results: dict = {}
    async with AsyncClient(address, timeout_ms=60_000) as client:
        for name in ("throughput", "latency"):
            await client.create_topic(f"{prefix}-{name}", partitions=settings.partitions, fsync_policy="always")
        try:
            progress(f"round {round_number}: nodi produce {settings.messages:,} x {settings.value_bytes} B, acks=durable")
            meter = CpuMeter(server_pid)
            results["produce"] = {**await nodi_produce(client, f"{prefix}-throughput", settings, value), **meter.figures()}
            progress(f"  {results['produce']['msg_per_s']:,.0f} msg/s, {results['produce']['mb_per_s']:.1f} MB/s")
            progress(f"round {round_number}: nodi consume")
            meter = CpuMeter(server_pid)
            consumed = await nodi_consume(
                client, f"{prefix}-throughput", results["produce"]["messages"], settings, settings.value_bytes
            )
            results["consume"] = {**consumed, **meter.figures()}
            progress(f"  {results['consume']['msg_per_s']:,.0f} msg/s, {results['consume']['mb_per_s']:.1f} MB/s")
            progress(f"round {round_number}: nodi latency at {settings.latency_rate:,}/s for {settings.latency_seconds} s")
            meter = CpuMeter(server_pid)
            results["latency"] = {**await nodi_latency(client, f"{prefix}-latency", settings), **meter.figures()}
            progress(_latency_line(results["latency"]))
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


def _latency_line(figures: dict) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return (f"  p50 {ms(figures['latency_ms_p50'])} ms, p99 {ms(figures['latency_ms_p99'])} ms, "
            f"max {ms(figures['latency_ms_max'])} ms ({figures['samples']} samples, {figures['missing']} missing, "
            f"{figures['achieved_rate_per_s']:,.0f}/s)")


# ---------------------------------------------------------------------------
# Redis Streams


def redis_unavailable_reason(executable: str | None) -> str | None:
    """Why Redis cannot run here, or None."""
    if executable is None or not os.access(executable, os.X_OK):
        return f"redis-server not found{'' if executable is None else ' at ' + executable} " \
               "(Debian: apt-get install -y redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py not installed (pip install -e '.[bench]')"
    return None


class RedisServer:
    """A redis-server child: loopback, a free port, AOF with fsync always, no RDB."""

    def __init__(self, executable: str, directory: str) -> None:
        self.executable = executable
        self.directory = directory
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.version = ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> int:
        import redis

        os.makedirs(self.directory, exist_ok=True)
        self.port = free_loopback_port()
        command = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory,
                   "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                   "--logfile", os.path.join(self.directory, "redis.log")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                connection = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
                info = connection.info("server")
                connection.close()
                self.version = info.get("redis_version", "")
                return self.port
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start; see {self.directory}/redis.log")

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=60)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


def redis_produce(connection, stream: str, settings: Settings, value: bytes) -> dict:
    requested = settings.messages
    started = time.perf_counter()
    deadline = started + settings.phase_seconds_max
    sent = 0
    pipeline = connection.pipeline(transaction=False)
    while sent < requested and time.perf_counter() < deadline:
        size = min(REDIS_PIPELINE, requested - sent)
        for _ in range(size):
            pipeline.xadd(stream, {b"v": value})
        pipeline.execute()
        sent += size
    return throughput_figures(sent, len(value), time.perf_counter() - started, requested, 0)


def redis_consume(connection, stream: str, expected: int, settings: Settings, value_bytes: int) -> dict:
    received = 0
    last_id = b"0-0"
    started = time.perf_counter()
    deadline = started + settings.phase_seconds_max
    while received < expected and time.perf_counter() < deadline:
        reply = connection.xread({stream: last_id}, count=REDIS_READ_COUNT)
        if not reply:
            break
        entries = reply[0][1]
        received += len(entries)
        last_id = entries[-1][0]
    return throughput_figures(received, value_bytes, time.perf_counter() - started, expected, 0)


def redis_latency(server: RedisServer, stream: str, settings: Settings) -> dict:
    count = settings.latency_messages
    sent_ns = [0] * count
    received_ns = [0] * count
    padding = bytes(settings.value_bytes - 8)
    deadline = time.perf_counter() + settings.latency_seconds + settings.phase_seconds_max
    reader = server.client()
    writer = server.client()
    failures: list[BaseException] = []

    def consume() -> None:
        got = 0
        last_id = b"0-0"
        clock = time.perf_counter_ns
        try:
            while got < count and time.perf_counter() < deadline:
                reply = reader.xread({stream: last_id}, count=REDIS_READ_COUNT, block=LONG_POLL_MS)
                now = clock()
                if not reply:
                    continue
                entries = reply[0][1]
                for _, fields in entries:
                    received_ns[int.from_bytes(fields[b"v"][:8], "big")] = now
                got += len(entries)
                last_id = entries[-1][0]
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    receiver = threading.Thread(target=consume, name="redis-latency-reader")
    receiver.start()
    try:
        interval = 1 / settings.latency_rate
        started = time.perf_counter()
        for sequence in range(count):
            delay = started + sequence * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent_ns[sequence] = time.perf_counter_ns()
            writer.xadd(stream, {b"v": sequence.to_bytes(8, "big") + padding})
        seconds = time.perf_counter() - started
    finally:
        receiver.join(max(1.0, deadline - time.perf_counter()))
        reader.close()
        writer.close()
    if failures:
        raise RuntimeError("the Redis latency reader failed") from failures[0]
    return latency_figures(sent_ns, received_ns, settings.latency_warmup, seconds)


def redis_round(server: RedisServer, settings: Settings, round_number: int) -> dict:
    value = os.urandom(settings.value_bytes)
    stream = f"bench-{round_number}"
    connection = server.client()
    results: dict = {}
    try:
        progress(f"round {round_number}: Redis XADD {settings.messages:,} x {settings.value_bytes} B, "
                 f"pipelines of {REDIS_PIPELINE}, appendfsync always")
        meter = CpuMeter(server.pid)
        results["produce"] = {**redis_produce(connection, stream, settings, value), **meter.figures()}
        progress(f"  {results['produce']['msg_per_s']:,.0f} msg/s, {results['produce']['mb_per_s']:.1f} MB/s")
        progress(f"round {round_number}: Redis XREAD")
        meter = CpuMeter(server.pid)
        consumed = redis_consume(connection, stream, results["produce"]["messages"], settings, settings.value_bytes)
        results["consume"] = {**consumed, **meter.figures()}
        progress(f"  {results['consume']['msg_per_s']:,.0f} msg/s, {results['consume']['mb_per_s']:.1f} MB/s")
        progress(f"round {round_number}: Redis latency at {settings.latency_rate:,}/s")
        meter = CpuMeter(server.pid)
        results["latency"] = {**redis_latency(server, f"{stream}-latency", settings), **meter.figures()}
        progress(_latency_line(results["latency"]))
    finally:
        connection.delete(stream, f"{stream}-latency")
        connection.close()
    return results


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
    for bytes_per_write, records in ((one_message_batch_bytes(settings.value_bytes), 1),
                                     (PRODUCE_BATCH_BYTES_MAX, PRODUCE_BATCH_BYTES_MAX // settings.value_bytes)):
        loop = storage_bench.raw_fdatasync_loop(directory, bytes_per_write, records, settings.raw_loop_seconds)
        progress(f"  write+fdatasync of {bytes_per_write:,} B: {loop['writes_per_s']:,.0f}/s, "
                 f"p50 {loop['latency_ms_p50']:.3f} ms, p99 {loop['latency_ms_p99']:.3f} ms")
        loops.append(loop)
    return {"sequential_write": sequential, "fdatasync_small": loops[0], "fdatasync_batch": loops[1]}


# ---------------------------------------------------------------------------
# Summary, ratios, report


SUMMARY_FIGURES = {
    "produce": ("msg_per_s", "mb_per_s", "client_cpu_seconds", "server_cpu_seconds"),
    "consume": ("msg_per_s", "mb_per_s", "client_cpu_seconds", "server_cpu_seconds"),
    "latency": ("latency_ms_p50", "latency_ms_p99", "latency_ms_max", "achieved_rate_per_s", "client_cpu_seconds",
                "server_cpu_seconds"),
}


def _median(values: list) -> float | None:
    present = [value for value in values if value is not None]
    return statistics_module.median(present) if present else None


def summarise(rounds: list[dict]) -> dict:
    """Medians over the rounds of each system's figures, with their range."""
    summary: dict = {}
    for system in ("nodi", "redis"):
        per_round = [one[system] for one in rounds if one.get(system)]
        if not per_round:
            summary[system] = None
            continue
        summary[system] = {}
        for phase, names in SUMMARY_FIGURES.items():
            figures = {}
            for name in names:
                values = [one[phase][name] for one in per_round]
                figures[name] = _median(values)
                present = [value for value in values if value is not None]
                figures[f"{name}_range"] = [min(present), max(present)] if present else None
            summary[system][phase] = figures
    limits = [one["limits"] for one in rounds]
    summary["limits"] = {
        "sequential_write_mb_per_s": _median([one["sequential_write"]["mb_per_s"] for one in limits]),
        "fdatasync_small_ms_p50": _median([one["fdatasync_small"]["latency_ms_p50"] for one in limits]),
        "fdatasync_small_ms_p99": _median([one["fdatasync_small"]["latency_ms_p99"] for one in limits]),
        "fdatasync_small_writes_per_s": _median([one["fdatasync_small"]["writes_per_s"] for one in limits]),
        "fdatasync_batch_mb_per_s": _median([one["fdatasync_batch"]["mb_per_s"] for one in limits]),
        "fdatasync_batch_ms_p50": _median([one["fdatasync_batch"]["latency_ms_p50"] for one in limits]),
    }
    return summary


def ratios(rounds: list[dict], settings: Settings) -> list[dict]:
    """Each ratio computed within a round (the disk's speed drifts), then the median."""
    ratio = storage_bench._ratio
    out = []

    def values_of(function) -> list[float]:
        found = []
        for one in rounds:
            try:
                value = function(one)
            except (KeyError, TypeError, ZeroDivisionError):
                continue
            if value is not None:
                found.append(value)
        return found

    def add(name, function, target=None, **options) -> None:
        values = values_of(function)
        if values:
            out.append(ratio(name, values, target, **options))

    add("nodi durable produce vs Redis (msg/s)",
        lambda one: one["nodi"]["produce"]["msg_per_s"] / one["redis"]["produce"]["msg_per_s"], TARGET_VS_REDIS)
    add("nodi consume vs Redis (msg/s)",
        lambda one: one["nodi"]["consume"]["msg_per_s"] / one["redis"]["consume"]["msg_per_s"], TARGET_VS_REDIS)
    add(f"nodi end-to-end p99 at {settings.latency_rate:,} msg/s (ms)",
        lambda one: one["nodi"]["latency"]["latency_ms_p99"], TARGET_LATENCY_P99_MS, lower_is_better=True)
    add("nodi end-to-end p99 vs Redis p99",
        lambda one: one["nodi"]["latency"]["latency_ms_p99"] / one["redis"]["latency"]["latency_ms_p99"],
        lower_is_better=True)
    add("nodi durable produce vs raw sequential write + fdatasync (MB/s)",
        lambda one: one["nodi"]["produce"]["mb_per_s"] / one["limits"]["sequential_write"]["mb_per_s"])
    add("nodi durable produce vs 256 KiB write+fdatasync loop (MB/s)",
        lambda one: one["nodi"]["produce"]["mb_per_s"] / one["limits"]["fdatasync_batch"]["mb_per_s"])
    add("nodi end-to-end p50 vs small write+fdatasync p50",
        lambda one: one["nodi"]["latency"]["latency_ms_p50"] / one["limits"]["fdatasync_small"]["latency_ms_p50"],
        lower_is_better=True)
    add("nodi end-to-end p99 vs small write+fdatasync p99",
        lambda one: one["nodi"]["latency"]["latency_ms_p99"] / one["limits"]["fdatasync_small"]["latency_ms_p99"],
        lower_is_better=True)
    add("Redis produce vs raw sequential write + fdatasync (MB/s)",
        lambda one: one["redis"]["produce"]["mb_per_s"] / one["limits"]["sequential_write"]["mb_per_s"])
    return out


def _number(value: float | None, digits: int = 0) -> str:
    return storage_bench._number(value, digits)


def _range(figures: dict, name: str, digits: int) -> str:
    bounds = figures.get(f"{name}_range")
    if not bounds or bounds[0] == bounds[1]:
        return ""
    return f" [{_number(bounds[0], digits)}-{_number(bounds[1], digits)}]"


def render(results: dict) -> str:
    table = storage_bench._table
    machine = results["machine"]
    settings = results["settings"]
    summary = results["summary"]
    parts = [
        f"Machine: {machine['nproc']} cores, {machine['memory_gib']} GiB, kernel {machine['kernel']}, "
        f"Python {machine['python']}, disk {machine['disk_device']} ({machine['disk_fs_type']}) at "
        f"{machine['disk_mount_point']}; load average {machine['load_average_start']} at the start, "
        f"{machine['load_average_end']} at the end"
        + (" (the machine was busy: figures are noisy)" if machine.get("busy") else ""),
        f"Workload: {settings['value_bytes']} B values, {settings['messages']:,} messages per throughput phase, "
        f"{settings['partitions']} partition(s), latency at {settings['latency_rate']:,}/s for "
        f"{settings['latency_seconds']} s; median of {settings['rounds']} round(s) [range]",
        f"nodi server: {results['nodi_server']}; Redis: {results['redis_status']}",
    ]
    limits = summary["limits"]
    parts.append("\nMachine limits (same file system as the data)")
    parts.append(table(["what", "figure"], [
        ["sequential 1 MiB writes + 1 fdatasync", f"{_number(limits['sequential_write_mb_per_s'])} MB/s"],
        ["write+fdatasync loop, one 1-message batch",
         f"p50 {_number(limits['fdatasync_small_ms_p50'], 3)} ms, p99 {_number(limits['fdatasync_small_ms_p99'], 3)} ms, "
         f"{_number(limits['fdatasync_small_writes_per_s'])}/s"],
        ["write+fdatasync loop, 256 KiB writes",
         f"{_number(limits['fdatasync_batch_mb_per_s'])} MB/s, p50 {_number(limits['fdatasync_batch_ms_p50'], 3)} ms"],
    ]))
    rows = []
    for system in ("nodi", "redis"):
        figures = summary.get(system)
        if not figures:
            continue
        for phase, label in (("produce", "durable produce"), ("consume", "consume")):
            one = figures[phase]
            rows.append([system, label, _number(one["msg_per_s"]) + _range(one, "msg_per_s", 0),
                         _number(one["mb_per_s"], 1), _number(one["client_cpu_seconds"], 2),
                         _number(one["server_cpu_seconds"], 2)])
    parts.append("\nThroughput (1 client process; CPU seconds used during the phase)")
    parts.append(table(["system", "phase", "msg/s", "MB/s", "client CPU s", "server CPU s"], rows))
    rows = []
    for system in ("nodi", "redis"):
        figures = summary.get(system)
        if not figures:
            continue
        one = figures["latency"]
        rows.append([system, _number(one["latency_ms_p50"], 3) + _range(one, "latency_ms_p50", 3),
                     _number(one["latency_ms_p99"], 3) + _range(one, "latency_ms_p99", 3),
                     _number(one["latency_ms_max"], 3), _number(one["achieved_rate_per_s"])])
    parts.append(f"\nEnd-to-end latency, produce -> consumer receives, paced at {settings['latency_rate']:,} msg/s")
    parts.append(table(["system", "p50 ms", "p99 ms", "max ms", "achieved msg/s"], rows))
    parts.append("\nRatios (median over rounds; range in brackets)")
    rows = []
    for ratio in results["ratios"]:
        if ratio["target"] is None:
            target = "-"
        else:
            target = f"{'<=' if ratio['lower_is_better'] else '>='} {ratio['target']:g}"
        verdict = "-" if ratio["met"] is None else ("MET" if ratio["met"] else "MISSED")
        spread = ""
        if len(ratio["values"]) > 1:
            spread = f" [{min(ratio['values']):.2f}-{max(ratio['values']):.2f}]"
        rows.append([ratio["name"], f"{ratio['value']:.2f}{spread}", target, verdict])
    parts.append(table(["ratio", "value", "target", "verdict"], rows))
    return "\n".join(parts)


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
            "produce_batch_bytes_max": PRODUCE_BATCH_BYTES_MAX,
            "fetch_bytes_max": FETCH_BYTES_MAX,
            "redis_pipeline": REDIS_PIPELINE,
            "redis_read_count": REDIS_READ_COUNT,
            "client": "nodi.broker.AsyncClient, one asyncio loop",
        },
        "rounds": [],
    }
    nodi_server = None
    redis_server = None
    try:
        if arguments.server:
            address, server_pid = arguments.server, None
            asyncio.run(check_reachable(address))
            results["nodi_server"] = f"--server {address} (not started here; its CPU is not measured)"
        else:
            nodi_server = NodiServer(os.path.join(data_directory, "nodi"))
            os.makedirs(nodi_server.directory)
            address = nodi_server.start()
            server_pid = nodi_server.pid
            results["nodi_server"] = f"started here at {address}, pid {server_pid}, data in {nodi_server.directory}"
        progress(f"nodi server: {results['nodi_server']}")
        reason = "skipped (--no-redis)" if arguments.no_redis else redis_unavailable_reason(
            arguments.redis_server or shutil.which("redis-server"))
        if reason is None:
            redis_server = RedisServer(arguments.redis_server or shutil.which("redis-server"),
                                       os.path.join(data_directory, "redis"))
            redis_server.start()
            results["redis_status"] = (f"redis-server {redis_server.version} started here on port {redis_server.port}, "
                                       "appendonly yes, appendfsync always")
        else:
            results["redis_status"] = f"not run: {reason}"
        progress(f"Redis: {results['redis_status']}")
        for round_number in range(settings.rounds):
            one: dict = {"round": round_number}
            one["limits"] = machine_limits(data_directory, settings, round_number)
            one["nodi"] = asyncio.run(nodi_round(address, server_pid, settings, round_number))
            one["redis"] = redis_round(redis_server, settings, round_number) if redis_server else None
            results["rounds"].append(one)
    finally:
        if nodi_server is not None:
            nodi_server.stop()
        if redis_server is not None:
            redis_server.stop()
    machine["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    machine["busy"] = max(machine["load_average_start"][0], machine["load_average_end"][0]) > 0.5
    results["summary"] = summarise(results["rounds"])
    results["ratios"] = ratios(results["rounds"], settings)
    results["total_seconds"] = time.perf_counter() - started
    return results


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="broker_bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (5,000 messages, 1 round)")
    parser.add_argument("--server", default=None,
                        help="HOST:PORT of a running broker to measure instead of starting one")
    parser.add_argument("--messages", type=int, default=None,
                        help="messages per throughput phase (default 200,000; 5,000 with --quick)")
    parser.add_argument("--value-bytes", type=int, default=VALUE_BYTES, help="bytes per message value (default 1024)")
    parser.add_argument("--partitions", type=int, default=1, help="partitions of the bench topics (default 1)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every measurement (default 3; 1 with --quick)")
    parser.add_argument("--phase-seconds-max", type=float, default=None,
                        help="time cap of each throughput phase (default 30; 10 with --quick)")
    parser.add_argument("--latency-rate", type=int, default=1_000,
                        help="messages per second in the latency phase (default 1,000)")
    parser.add_argument("--latency-seconds", type=float, default=None,
                        help="length of the latency phase (default 10; 0.5 with --quick)")
    parser.add_argument("--latency-warmup", type=int, default=None,
                        help="first latency messages not counted (default 200; 50 with --quick)")
    parser.add_argument("--latency-linger-ms", type=float, default=0.0,
                        help="the latency producer's linger_ms (default 0: a batch per sender pass)")
    parser.add_argument("--no-redis", action="store_true", help="do not run Redis, report nodi alone")
    parser.add_argument("--redis-server", default=None, help="path of redis-server (default: found on PATH)")
    parser.add_argument("--data-dir", default=None,
                        help="parent of the bench's temporary directory (default: the system temp dir unless "
                             "it is tmpfs, else .bench-data beside tools/)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
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
    parent = arguments.data_dir or storage_bench.default_data_parent()
    os.makedirs(parent, exist_ok=True)
    mount = storage_bench._mount_of(parent)
    if mount[2] in ("tmpfs", "ramfs"):
        progress(f"warning: {parent} is on {mount[2]}: the figures will not be the disk's")
    data_directory = tempfile.mkdtemp(prefix="nodi-broker-bench-", dir=parent)
    progress(f"data directory {data_directory} ({mount[2]} on {mount[0]})")
    try:
        results = run(settings, arguments, data_directory)
    except (NodiError, RuntimeError) as error:
        progress(f"failed: {type(error).__name__}: {error}")
        return 1
    finally:
        if not arguments.keep:
            shutil.rmtree(data_directory, ignore_errors=True)
    print(render(results))
    if arguments.json_out:
        with open(arguments.json_out, "w") as out:
            json.dump(results, out, indent=2)
            out.write("\n")
        progress(f"wrote {arguments.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
