"""What tools/broker_bench.py and tools/broker_bench_redis.py share: the settings, the
CPU meters, the figures each phase reports, child-process helpers.

CPU accounting (why the figures explain themselves on a busy machine): each phase records
the CPU seconds of this (client) process, of the server process measured, and of the
whole machine (/proc/stat, all cores), so "others" is what the rest of the machine used
meanwhile. CPU microseconds per message barely move with other load; msg/s and latency
do.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics as statistics_module
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tools import storage_bench  # the raw disk limits, machine description, tables

MB = storage_bench.MB
SERVER_START_TIMEOUT_S = 30
READY = re.compile(r"nodi listening on ([\d.]+):(\d+)")
METRICS = re.compile(r"nodi metrics on http://[\d.]+:(\d+)/metrics")
SERVER_STOP_TIMEOUT_S = 15
LONG_POLL_MS = 100


def progress(message: str) -> None:
    print(f"[broker_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Settings:
    messages: int
    value_bytes: int
    partitions: int
    batch_bytes_max: int
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


# ---------------------------------------------------------------------------
# CPU


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


def thread_cpu_ticks_of(pid: int | None) -> dict[str, tuple[int, int]]:
    """User and system clock ticks of each thread of a process, summed by thread name
    (/proc/PID/task/TID: its comm without trailing digits, "loop" for the main thread);
    empty when unknown. Threads that ended are missing (their time is in the process's)."""
    if pid is None:
        return {}
    ticks: dict[str, tuple[int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        name = "loop" if tid == str(pid) else text[text.index("(") + 1 : text.rindex(")")].rstrip("0123456789-_")
        fields = text.rpartition(")")[2].split()
        user, system = ticks.get(name, (0, 0))
        ticks[name] = (user + int(fields[11]), system + int(fields[12]))
    return ticks


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of all cores since boot (/proc/stat), None when unknown.
    Busy is everything but idle and iowait; steal is time the hypervisor gave away."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    # guest time is already counted in user and nice
    busy = sum(fields[:8]) - idle - steal
    return busy / ticks, steal / ticks


class CpuMeter:
    """CPU seconds used during one phase by this process, by the server measured, by
    the other server running (idle, counted so it is not taken for "others"), and by
    everything else on the machine."""

    def __init__(self, server_pid: int | None, idle_pids: tuple[int | None, ...] = ()) -> None:
        self.server_pid = server_pid
        self.idle_pids = idle_pids
        self.client_start = time.process_time()
        self.server_start = cpu_seconds_of(server_pid)
        self.idle_start = [cpu_seconds_of(pid) for pid in idle_pids]
        self.machine_start = machine_cpu_seconds()
        self.wall_start = time.perf_counter()

    def figures(self, messages: int) -> dict:
        client = time.process_time() - self.client_start
        server_now = cpu_seconds_of(self.server_pid)
        server = None if server_now is None or self.server_start is None else server_now - self.server_start
        idle = 0.0
        for pid, start in zip(self.idle_pids, self.idle_start):
            now = cpu_seconds_of(pid)
            if now is not None and start is not None:
                idle += now - start
        machine_now = machine_cpu_seconds()
        others = steal = None
        if machine_now is not None and self.machine_start is not None:
            busy = machine_now[0] - self.machine_start[0]
            others = max(0.0, busy - client - (server or 0.0) - idle)
            steal = machine_now[1] - self.machine_start[1]
        wall = time.perf_counter() - self.wall_start
        per_message = 1e6 / messages if messages else None
        return {
            "client_cpu_seconds": client,
            "server_cpu_seconds": server,
            "others_cpu_seconds": others,
            "steal_cpu_seconds": steal,
            "wall_seconds": wall,
            "others_cpu_share": others / (wall * (os.cpu_count() or 1)) if others is not None and wall > 0 else None,
            "client_cpu_us_per_message": client * per_message if per_message else None,
            "server_cpu_us_per_message": server * per_message if per_message and server is not None else None,
        }


# ---------------------------------------------------------------------------
# Figures


def latency_figures(sent_ns: list[int], received_ns: list[int], warmup: int, seconds: float) -> dict:
    """Percentiles of received - sent (ms) after the warm-up; a message never received
    counts as missing."""
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
        "latency_ms_p90": percentile(samples, 0.90),
        "latency_ms_p99": percentile(samples, 0.99),
        "latency_ms_max": samples[-1] if samples else None,
        "latency_ms_mean": statistics_module.fmean(samples) if samples else None,
        "share_over_1_ms": sum(1 for sample in samples if sample > 1.0) / len(samples) if samples else None,
    }


def latency_line(figures: dict) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return (
        f"  p50 {ms(figures['latency_ms_p50'])} ms, p99 {ms(figures['latency_ms_p99'])} ms, "
        f"max {ms(figures['latency_ms_max'])} ms ({figures['samples']} samples, {figures['missing']} missing, "
        f"{figures['achieved_rate_per_s']:,.0f}/s)"
    )


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


# ---------------------------------------------------------------------------
# Child processes


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


class NodiServer:
    """A `nodi serve` child on 127.0.0.1 with a free port (and a free metrics port when
    `metrics`), its data in DIRECTORY/data and its output in DIRECTORY/`log_name` (a file,
    never a pipe nobody reads, which would stall a server that logs). `launcher` replaces
    `-m nodi.cli.main` (a benchmark's modified server); `extra_args` go to `nodi serve`;
    `cpu_list` runs it under `taskset -c` (all its threads on those CPUs)."""

    def __init__(
        self,
        directory: str,
        *,
        extra_args: Sequence[str] = (),
        launcher: Sequence[str] = ("-m", "nodi.cli.main"),
        metrics: bool = True,
        log_name: str = "nodi-serve.log",
        cpu_list: str | None = None,
    ) -> None:
        self.directory = directory
        self.extra_args = tuple(extra_args)
        self.launcher = tuple(launcher)
        self.metrics = metrics
        self.log_path = os.path.join(directory, log_name)
        self.cpu_list = cpu_list  # `taskset -c` list the server runs on; None: anywhere
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.metrics_port: int | None = None
        self.start_timeout_s: float = SERVER_START_TIMEOUT_S

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host, int(port)

    def start(self) -> str:
        """Start it and wait for its listening line(s); its HOST:PORT."""
        command = [
            *(("taskset", "-c", self.cpu_list) if self.cpu_list else ()),
            sys.executable,
            *self.launcher,
            "serve",
            "--data-dir",
            os.path.join(self.directory, "data"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0" if self.metrics else "-1",
            "--console-port",
            "0",
            *self.extra_args,
        ]
        with open(self.log_path, "w") as output:
            self.process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            with open(self.log_path) as output:
                text = output.read()
            found, metrics = READY.search(text), METRICS.search(text)
            if found and (metrics or not self.metrics):
                self.address = f"{found.group(1)}:{found.group(2)}"
                self.metrics_port = int(metrics.group(1)) if metrics else None
                return self.address
            time.sleep(0.05)
        self.stop()
        with open(self.log_path) as output:
            raise RuntimeError("nodi serve did not start:\n" + output.read()[-4000:])

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None
