"""Redis Streams on tools/broker_bench.py's workload: a redis-server child with
appendonly yes and appendfsync always (every write fsynced before the reply), driven by
redis-py from this process.

- produce: XADD of 1 KiB values in pipelines of REDIS_PIPELINE (100), one stream.
- consume: XREAD of REDIS_READ_COUNT (1,000, about nodi's 1 MiB fetch) entries per call,
  from the first entry, until everything produced is read. XREAD only reads (no
  consumer-group state, like nodi's consumer without a group).
- latency: one XADD per message at the paced rate, read back by XREAD BLOCK on a second
  connection in a thread; both stamps from time.perf_counter_ns().

redis-py uses its pure-Python reply parser unless hiredis is installed; the report says
which.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

from tools.broker_bench_common import (
    LONG_POLL_MS,
    SERVER_START_TIMEOUT_S,
    CpuMeter,
    Settings,
    free_loopback_port,
    latency_figures,
    latency_line,
    progress,
    stop_process,
    throughput_figures,
)

REDIS_PIPELINE = 100
REDIS_READ_COUNT = 1_000


def redis_unavailable_reason(executable: str | None) -> str | None:
    """Why Redis cannot run here, or None."""
    if executable is None or not os.access(executable, os.X_OK):
        where = "" if executable is None else f" at {executable}"
        return f"redis-server not found{where} (Debian: apt-get install -y redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py not installed (pip install -e '.[bench]')"
    return None


def redis_parser() -> str:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return "redis-py's Python parser (no hiredis)"
    return "hiredis parser"


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
        command = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            os.path.join(self.directory, "redis.log"),
        ]
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


def redis_round(server: RedisServer, settings: Settings, round_number: int, idle_pids: tuple) -> dict:
    """The three phases on fresh streams; `idle_pids` (the nodi server) are not counted
    as other load."""
    value = os.urandom(settings.value_bytes)
    stream = f"bench-{round_number}"
    connection = server.client()
    results: dict = {}
    try:
        progress(
            f"round {round_number}: Redis XADD {settings.messages:,} x {settings.value_bytes} B, "
            f"pipelines of {REDIS_PIPELINE}, appendfsync always"
        )
        meter = CpuMeter(server.pid, idle_pids)
        produced = redis_produce(connection, stream, settings, value)
        results["produce"] = {**produced, **meter.figures(produced["messages"])}
        progress(f"  {produced['msg_per_s']:,.0f} msg/s, {produced['mb_per_s']:.1f} MB/s")
        progress(f"round {round_number}: Redis XREAD")
        meter = CpuMeter(server.pid, idle_pids)
        consumed = redis_consume(connection, stream, produced["messages"], settings, settings.value_bytes)
        results["consume"] = {**consumed, **meter.figures(consumed["messages"])}
        progress(f"  {consumed['msg_per_s']:,.0f} msg/s, {consumed['mb_per_s']:.1f} MB/s")
        progress(f"round {round_number}: Redis latency at {settings.latency_rate:,}/s")
        meter = CpuMeter(server.pid, idle_pids)
        latency = redis_latency(server, f"{stream}-latency", settings)
        results["latency"] = {**latency, **meter.figures(latency["messages"])}
        progress(latency_line(latency))
    finally:
        connection.delete(stream, f"{stream}-latency")
        connection.close()
    return results
