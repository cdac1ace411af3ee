"""Latency benchmark (issue 12): the peers' workloads on a real `nodi serve`, each beside
the machine's limits measured in the same run.

Workloads (1 KiB values, one partition, topic fsync_policy "always", acks "durable"):
- window: 100 messages sent through the batching producer, then `flush()` awaited (the
  window acknowledged) before the next window; the time of each window.
- consume: the windows' messages read back by a stream group member in polls of up to
  100 (`bytes_max` sized for 100), each poll's `commit()` awaited before the next poll.
- end to end, one message at a time: a stream group member waits at the tail (its fetch
  long-polls); the producer client sends one message with `produce()` (acks durable);
  the consumer receives it and awaits `commit()`; then the next message. Per message:
  received - sent (end to end), the produce acknowledgement, the commit, the whole cycle.
  Run three ways in the same run: `commit()` riding on the consumer's next fetch (Fetch
  version 2, answered once the commit is durable; the default), `commit()` as a
  CommitOffsets of its own (what protocol 3 and older did), and `commit_nowait()` (the
  offsets ride on the long-polling fetch, not awaited).
- queue group, peers' style: the windows' messages read back by a queue group consumer
  in batches of 100 (`receive_batch(100)`), each message acked and the batch's acks
  awaited (`flush()`) before the next batch; reported beside the stream group's consume
  of the same messages, with the ratio queue group / stream group (msg/s).
- queue end to end, one message at a time: a queue consumer waits at the tail (its
  receive long-polls); the producer client sends one message with `produce()`; the
  consumer receives it and awaits its `ack()`; then the next message. Per message: end
  to end, the produce acknowledgement, the ack, the whole cycle.

`--only stream` runs the window and the stream workloads; `--only queue` runs the window,
the stream group's consume (the ratio's base) and the queue workloads.

Limits measured in the same run, before and after the workloads (both are printed): a
1 KiB write+fdatasync loop and a 100 KiB one (tools/storage_bench.raw_fdatasync_loop, on
the data directory's file system), and the loopback round trip of 64 bytes between this
process and an echo server in a child process, on the same kind of event loop.

Server CPU per message is the broker process's utime+stime during the phase divided by
its messages, and split by thread (user and system: /proc/PID/task; the launcher gives
each thread its Python name, "loop" is the event loop's). `--strace` attaches `strace -c -f` to the broker for an extra, shorter end
to end phase (strace slows every system call, so that phase's times are not reported)
and gives the system calls per message by name (a stream end to end phase and a queue
one, as `--only` selects).

    python -m tools.latency_bench                 # about a minute
    python -m tools.latency_bench --quick         # seconds (tests/test_latency_bench_smoke.py)
    python -m tools.latency_bench --strace --json-out latency.json
    python -m tools.latency_bench --loop asyncio  # server and client without uvloop
    python -m tools.latency_bench --server-cpus 1 # the server pinned (taskset -c 1)
    python -m tools.latency_bench --only queue    # the queue workloads (and the stream group's consume)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

from nodi.broker.client import AsyncClient
from tools import storage_bench
from tools.broker_bench_common import NodiServer, cpu_seconds_of, machine_cpu_seconds, thread_cpu_ticks_of

VALUE_BYTES = 1024
WINDOW_MESSAGES = 100
RTT_PAYLOAD = b"x" * 64
# The fetch budget of a consume poll: 100 records of 1 KiB and their framing.
CONSUME_BYTES_MAX = WINDOW_MESSAGES * (VALUE_BYTES + 16)
STRACE_MESSAGES = 300
STRACE_ATTACH_S = 1.0
PHASE_TIMEOUT_S = 120.0
# A queue consumer's lease: long enough that no lease runs out during a phase (none is
# extended or redelivered), named so the consumer need not ask the broker for it.
QUEUE_ACK_WAIT_MS = 60_000
QUEUE_RECEIVE_TIMEOUT_MS = 5000
WORKLOAD_SETS = ("all", "stream", "queue")

# The loop the server uses is chosen by its launcher: "asyncio" hides uvloop from it.
# Both give each thread the kernel name of its Python name (Python 3.11 leaves every
# thread "python"), so the server's CPU splits by thread (fsync pool, executor, metrics).
NAME_THREADS = (
    "import ctypes, threading; _libc = ctypes.CDLL(None); _inner = threading.Thread._bootstrap_inner\n"
    "def _named(self):\n"
    "    _libc.prctl(15, self.name.encode()[:15], 0, 0, 0)\n"
    "    _inner(self)\n"
    "threading.Thread._bootstrap_inner = _named\n"
)
WITH_UVLOOP = NAME_THREADS + "from nodi.cli.main import app; app(prog_name='nodi')"
NO_UVLOOP = (
    NAME_THREADS + "import sys; sys.modules['uvloop'] = None; from nodi.cli.main import app; app(prog_name='nodi')"
)
ECHO_SERVER = """
import asyncio, sys
LOOP = sys.argv[1]
async def handle(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)
if LOOP == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def progress(message: str) -> None:
    print(f"[latency_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentiles(samples_s: list[float]) -> dict:
    ordered = sorted(samples_s)
    percentile = storage_bench.percentile

    def ms(fraction: float) -> float | None:
        value = percentile(ordered, fraction)
        return None if value is None else value * 1000

    return {
        "count": len(ordered),
        "ms_p50": ms(0.50),
        "ms_p90": ms(0.90),
        "ms_p99": ms(0.99),
        "ms_max": ordered[-1] * 1000 if ordered else None,
    }


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------
# Limits


async def loopback_round_trips(port: int, count: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    clock = time.perf_counter
    samples = []
    try:
        for _ in range(count):
            started = clock()
            writer.write(RTT_PAYLOAD)
            received = 0
            while received < len(RTT_PAYLOAD):
                received += len(await asyncio.wait_for(reader.read(65536), 5))
            samples.append(clock() - started)
    finally:
        writer.close()
    return samples


def start_echo_server(loop_name: str) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, loop_name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.strip().isdigit():
        process.kill()
        process.wait(timeout=10)
        raise RuntimeError("the loopback echo server did not start")
    return process, int(line)


def measure_limits(directory: str, loop_name: str, settings: argparse.Namespace, run: Callable) -> dict:
    small = storage_bench.raw_fdatasync_loop(directory, VALUE_BYTES, 1, settings.limit_seconds)
    window = storage_bench.raw_fdatasync_loop(directory, VALUE_BYTES * WINDOW_MESSAGES, 1, settings.limit_seconds)
    process, port = start_echo_server(loop_name)
    try:
        trips = run(loopback_round_trips(port, settings.rtt_count))
    finally:
        process.kill()
        process.wait(timeout=10)
    rtt = percentiles(trips[len(trips) // 10 :])
    return {
        "fdatasync_1kib_ms_p50": small["latency_ms_p50"],
        "fdatasync_1kib_ms_p99": small["latency_ms_p99"],
        "fdatasync_100kib_ms_p50": window["latency_ms_p50"],
        "fdatasync_100kib_ms_p99": window["latency_ms_p99"],
        "loopback_rtt_ms_p50": rtt["ms_p50"],
        "loopback_rtt_ms_p99": rtt["ms_p99"],
    }


# ---------------------------------------------------------------------------
# Workloads


class PhaseMeter:
    """The broker's CPU seconds (utime+stime) and the rest of the machine's during a phase."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.server_start = cpu_seconds_of(server_pid)
        self.threads_start = thread_cpu_ticks_of(server_pid)
        self.client_start = time.process_time()
        self.machine_start = machine_cpu_seconds()
        self.wall_start = time.perf_counter()

    def figures(self, messages: int) -> dict:
        server_now = cpu_seconds_of(self.server_pid)
        server = None if server_now is None or self.server_start is None else server_now - self.server_start
        threads_now = thread_cpu_ticks_of(self.server_pid)
        client = time.process_time() - self.client_start
        wall = time.perf_counter() - self.wall_start
        machine_now = machine_cpu_seconds()
        others_share = None
        if machine_now is not None and self.machine_start is not None and wall > 0:
            others = max(0.0, machine_now[0] - self.machine_start[0] - client - (server or 0.0))
            others_share = others / (wall * (os.cpu_count() or 1))
        return {
            "messages": messages,
            "wall_seconds": wall,
            "server_cpu_us_per_message": None if server is None or not messages else server * 1e6 / messages,
            "client_cpu_us_per_message": client * 1e6 / messages if messages else None,
            "others_cpu_share": others_share,
            "server_threads_us_per_message": self.thread_figures(threads_now, messages),
        }

    def thread_figures(self, threads_now: dict[str, tuple[int, int]], messages: int) -> dict:
        """The server's CPU per message by thread name, user and system (us)."""
        if not messages:
            return {}
        tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
        figures = {}
        for name, (user, system) in sorted(threads_now.items()):
            user_start, system_start = self.threads_start.get(name, (0, 0))
            user_us = (user - user_start) * tick_us / messages
            system_us = (system - system_start) * tick_us / messages
            if user_us or system_us:
                figures[name] = {"user": user_us, "system": system_us}
        return figures


async def window_phase(client: AsyncClient, topic: str, windows: int, server_pid: int | None) -> dict:
    value = bytes(VALUE_BYTES)
    producer = client.producer(linger_ms=0, acks="durable")
    samples = []
    meter = PhaseMeter(server_pid)
    clock = time.perf_counter
    try:
        for _ in range(windows):
            started = clock()
            for _ in range(WINDOW_MESSAGES):
                producer.send(topic, value)
            await producer.flush()
            samples.append(clock() - started)
    finally:
        await producer.close()
    figures = meter.figures(windows * WINDOW_MESSAGES)
    figures["msg_per_s"] = windows * WINDOW_MESSAGES / figures["wall_seconds"]
    return {**percentiles(samples), **figures}


async def consume_phase(client: AsyncClient, topic: str, expected: int, server_pid: int | None) -> dict:
    consumer = client.consumer(topic, "bench-consume", auto_commit=False, bytes_max=CONSUME_BYTES_MAX, wait_ms=100)
    await consumer.start()
    received = 0
    polls = []
    commits = []
    clock = time.perf_counter
    deadline = clock() + PHASE_TIMEOUT_S
    meter = PhaseMeter(server_pid)
    try:
        while received < expected and clock() < deadline:
            started = clock()
            batch = await consumer.poll()
            polled = clock()
            if not batch:
                continue
            received += len(batch)
            await consumer.commit()
            polls.append(polled - started)
            commits.append(clock() - polled)
    finally:
        await consumer.close()
    figures = meter.figures(received)
    figures["msg_per_s"] = received / figures["wall_seconds"]
    figures["messages_per_poll"] = received / len(polls) if polls else None
    figures["poll"] = percentiles(polls)
    figures["commit"] = percentiles(commits)
    return figures


def _stamp_into(stamps: list[float]) -> Callable[[asyncio.Task], None]:
    """A done callback that notes the time it ran (the produce acknowledgement)."""

    def stamp(_task: asyncio.Task) -> None:
        stamps.append(time.perf_counter())

    return stamp


COMMIT_MODES = ("ride", "own", "nowait")  # see the module's docstring


async def one_at_a_time(
    producer_client: AsyncClient,
    topic: str,
    count: int,
    meter: PhaseMeter,
    receive: Callable[[], Awaitable[object]],
    settle: Callable[[], Awaitable[object] | None],
    settle_name: str,
) -> dict:
    """One message at a time: produce it (durable), `receive()` until it is in hand,
    await the produce, then `settle()` (awaited when it returns an awaitable); the
    percentiles of each stage under its name."""
    value = bytes(VALUE_BYTES)
    clock = time.perf_counter
    end_to_end, acknowledged, settled, cycles = [], [], [], []
    loop = asyncio.get_running_loop()
    for _ in range(count):
        started = clock()
        acked_at: list[float] = []
        produce = loop.create_task(producer_client.produce(topic, value, partition=0))
        produce.add_done_callback(_stamp_into(acked_at))
        await receive()
        received_at = clock()
        await produce
        before_settle = clock()
        settling = settle()
        if settling is not None:
            await settling
        done = clock()
        end_to_end.append(received_at - started)
        acknowledged.append(acked_at[0] - started)
        settled.append(done - before_settle)
        cycles.append(done - started)
    return {
        **meter.figures(count),
        "end_to_end": percentiles(end_to_end),
        "produce_ack": percentiles(acknowledged),
        settle_name: percentiles(settled),
        "cycle": percentiles(cycles),
    }


async def end_to_end_phase(
    producer_client: AsyncClient,
    consumer_client: AsyncClient,
    topic: str,
    count: int,
    server_pid: int | None,
    commit_mode: str = "ride",
) -> dict:
    assert commit_mode in COMMIT_MODES
    consumer = consumer_client.consumer(
        topic, f"bench-e2e-{commit_mode}", start="latest", auto_commit=False, wait_ms=1000
    )
    if commit_mode == "own":
        consumer._ride_commits = False  # as against a server of protocol 3: CommitOffsets
    await consumer.start()
    await consumer.poll(timeout_ms=0)  # joined and assigned; its fetch now waits at the tail

    async def receive() -> None:
        while not await consumer.poll(timeout_ms=5000):
            pass

    settle = consumer.commit_nowait if commit_mode == "nowait" else consumer.commit
    meter = PhaseMeter(server_pid)
    try:
        return await one_at_a_time(producer_client, topic, count, meter, receive, settle, "commit")
    finally:
        await consumer.close()


async def queue_group_phase(client: AsyncClient, topic: str, expected: int, server_pid: int | None) -> dict:
    """The peers' queue group: receive a batch of up to 100, ack each, await the acks
    (flush) before the next batch."""
    queue = client.queue(
        topic,
        "bench-queue-group",
        ack_wait_ms=QUEUE_ACK_WAIT_MS,
        batch_max=WINDOW_MESSAGES,
        max_outstanding=WINDOW_MESSAGES,
    )
    received = 0
    receives = []
    acks = []
    batches = 0
    clock = time.perf_counter
    deadline = clock() + PHASE_TIMEOUT_S
    meter = PhaseMeter(server_pid)
    try:
        while received < expected and clock() < deadline:
            started = clock()
            batch = await queue.receive_batch(WINDOW_MESSAGES, timeout_ms=QUEUE_RECEIVE_TIMEOUT_MS)
            got = clock()
            if not batch:
                continue
            for message in batch:
                message.ack(wait=False)
            await queue.flush()  # the batch's acks answered: durable
            received += len(batch)
            batches += 1
            receives.append(got - started)
            acks.append(clock() - got)
    finally:
        await queue.close()
    figures = meter.figures(received)
    figures["msg_per_s"] = received / figures["wall_seconds"]
    figures["messages_per_batch"] = received / batches if batches else None
    figures["receive"] = percentiles(receives)
    figures["ack"] = percentiles(acks)
    return figures


async def queue_end_to_end_phase(
    producer_client: AsyncClient, consumer_client: AsyncClient, topic: str, count: int, server_pid: int | None
) -> dict:
    """One message at a time through a queue group: produce (durable), the waiting
    receive gets it, its ack awaited."""
    queue = consumer_client.queue(topic, "bench-queue-e2e", ack_wait_ms=QUEUE_ACK_WAIT_MS)
    in_hand: list = []

    async def receive() -> None:
        message = await queue.receive(timeout_ms=QUEUE_RECEIVE_TIMEOUT_MS)
        if message is None:
            raise RuntimeError(
                f"queue end to end: a produced message was not received in {QUEUE_RECEIVE_TIMEOUT_MS} ms"
            )
        in_hand.append(message)

    def settle() -> Awaitable[object]:
        return in_hand.pop().ack()

    meter = PhaseMeter(server_pid)
    try:
        await queue.receive(timeout_ms=0)  # the group exists; nothing is waiting in it
        return await one_at_a_time(producer_client, topic, count, meter, receive, settle, "ack")
    finally:
        await queue.close()


STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def parse_strace_summary(text: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in text.splitlines():
        found = STRACE_LINE.match(line)
        if found and found.group(2) != "total":
            calls[found.group(2)] = int(found.group(1))
    return calls


async def strace_phase(
    producer_client: AsyncClient,
    consumer_client: AsyncClient,
    topic: str,
    server_pid: int,
    directory: str,
    queue: bool = False,
) -> dict:
    """An end to end phase (the stream's, or the queue's) under `strace -c -f`."""
    output = os.path.join(directory, "strace-queue.txt" if queue else "strace.txt")
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-o", output, "-p", str(server_pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(STRACE_ATTACH_S)
        if queue:
            await queue_end_to_end_phase(producer_client, consumer_client, topic, STRACE_MESSAGES, None)
        else:
            await end_to_end_phase(producer_client, consumer_client, topic, STRACE_MESSAGES, None)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    with open(output) as summary:
        calls = parse_strace_summary(summary.read())
    per_message = {name: count / STRACE_MESSAGES for name, count in sorted(calls.items(), key=lambda item: -item[1])}
    return {"messages": STRACE_MESSAGES, "calls_per_message": sum(per_message.values()), "by_name": per_message}


async def workloads(address: str, server_pid: int | None, settings: argparse.Namespace, directory: str) -> dict:
    results: dict = {}
    stream = settings.only in ("all", "stream")
    queue = settings.only in ("all", "queue")
    consumed = settings.windows * WINDOW_MESSAGES
    async with AsyncClient(address) as producer_client, AsyncClient(address) as consumer_client:
        await producer_client.create_topic("windows", partitions=1, fsync_policy="always")
        await producer_client.create_topic("e2e", partitions=1, fsync_policy="always")
        if queue:
            await producer_client.create_topic("queue-e2e", partitions=1, fsync_policy="always")
        progress(f"windows of {WINDOW_MESSAGES}: {settings.windows}")
        results["window"] = await window_phase(producer_client, "windows", settings.windows, server_pid)
        progress(f"consume in polls of up to {WINDOW_MESSAGES}, commits awaited")
        results["consume"] = await consume_phase(consumer_client, "windows", consumed, server_pid)
        if queue:
            progress(f"queue group in batches of up to {WINDOW_MESSAGES}, acks awaited")
            results["queue_group"] = await queue_group_phase(consumer_client, "windows", consumed, server_pid)
            progress(f"queue end to end, one at a time: {settings.messages}")
            results["queue_end_to_end"] = await queue_end_to_end_phase(
                producer_client, consumer_client, "queue-e2e", settings.messages, server_pid
            )
        if stream:
            progress(f"end to end, one at a time: {settings.messages}")
            results["end_to_end"] = await end_to_end_phase(
                producer_client, consumer_client, "e2e", settings.messages, server_pid
            )
            progress(f"end to end, commits as CommitOffsets of their own: {settings.messages}")
            results["end_to_end_own"] = await end_to_end_phase(
                producer_client, consumer_client, "e2e", settings.messages, server_pid, "own"
            )
            progress(f"end to end, commit_nowait(): {settings.messages}")
            results["end_to_end_nowait"] = await end_to_end_phase(
                producer_client, consumer_client, "e2e", settings.messages, server_pid, "nowait"
            )
        if settings.strace and server_pid is not None:
            if stream:
                progress(f"end to end under strace -c -f: {STRACE_MESSAGES}")
                results["strace"] = await strace_phase(producer_client, consumer_client, "e2e", server_pid, directory)
            if queue:
                progress(f"queue end to end under strace -c -f: {STRACE_MESSAGES}")
                results["strace_queue"] = await strace_phase(
                    producer_client, consumer_client, "queue-e2e", server_pid, directory, queue=True
                )
    if queue:
        stream_rate, queue_rate = results["consume"]["msg_per_s"], results["queue_group"]["msg_per_s"]
        results["queue_group_over_stream_group"] = queue_rate / stream_rate if stream_rate else None
    return results


# ---------------------------------------------------------------------------
# Report


def render(results: dict) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def us(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = [f"loop: {results['loop']}; server CPUs: {results.get('server_cpus') or 'any'}; {results['machine']}"]
    for name in ("limits_before", "limits_after"):
        limits = results[name]
        lines.append(
            f"{name.replace('_', ' ')}: 1 KiB write+fdatasync p50 {ms(limits['fdatasync_1kib_ms_p50'])} "
            f"p99 {ms(limits['fdatasync_1kib_ms_p99'])} ms; 100 KiB p50 {ms(limits['fdatasync_100kib_ms_p50'])} "
            f"p99 {ms(limits['fdatasync_100kib_ms_p99'])} ms; loopback RTT p50 {ms(limits['loopback_rtt_ms_p50'])} "
            f"p99 {ms(limits['loopback_rtt_ms_p99'])} ms"
        )
    window, consume = results["window"], results["consume"]
    lines.append(
        f"window of {WINDOW_MESSAGES} x 1 KiB, acked: p50 {ms(window['ms_p50'])} p99 {ms(window['ms_p99'])} "
        f"max {ms(window['ms_max'])} ms; {window['msg_per_s']:,.0f} msg/s; server {us(window['server_cpu_us_per_message'])} "
        f"us/msg; others {window['others_cpu_share'] or 0:.0%}"
    )
    lines.append(
        f"consume, polls of {consume['messages_per_poll'] or 0:.0f}, commits awaited: {consume['msg_per_s']:,.0f} msg/s; "
        f"commit p50 {ms(consume['commit']['ms_p50'])} p99 {ms(consume['commit']['ms_p99'])} ms; "
        f"server {us(consume['server_cpu_us_per_message'])} us/msg; others {consume['others_cpu_share'] or 0:.0%}"
    )
    if "queue_group" in results:
        group, ratio = results["queue_group"], results["queue_group_over_stream_group"]
        lines.append(
            f"queue group, batches of {group['messages_per_batch'] or 0:.0f}, acks awaited: {group['msg_per_s']:,.0f} "
            f"msg/s ({'-' if ratio is None else f'{ratio:.2f}'} x the stream group); receive p50 "
            f"{ms(group['receive']['ms_p50'])} ms; acks p50 {ms(group['ack']['ms_p50'])} p99 "
            f"{ms(group['ack']['ms_p99'])} ms; server {us(group['server_cpu_us_per_message'])} us/msg; "
            f"others {group['others_cpu_share'] or 0:.0%}"
        )
    phases = (
        ("queue_end_to_end", "queue one at a time", ("end_to_end", "produce_ack", "ack", "cycle")),
        ("end_to_end", "one at a time", ("end_to_end", "produce_ack", "commit", "cycle")),  # commit() riding
        (
            "end_to_end_own",
            "one at a time (commit() as CommitOffsets)",
            ("end_to_end", "produce_ack", "commit", "cycle"),
        ),
        ("end_to_end_nowait", "one at a time (commit_nowait())", ("end_to_end", "produce_ack", "commit", "cycle")),
    )
    for phase, label, stages in phases:
        if phase not in results:
            continue
        e2e = results[phase]
        for name in stages:
            figures = e2e[name]
            lines.append(
                f"{label}, {name.replace('_', ' ')}: p50 {ms(figures['ms_p50'])} "
                f"p90 {ms(figures['ms_p90'])} p99 {ms(figures['ms_p99'])} max {ms(figures['ms_max'])} ms"
            )
        lines.append(
            f"{label}: server {us(e2e['server_cpu_us_per_message'])} us/msg, client "
            f"{us(e2e['client_cpu_us_per_message'])} us/msg (both clients), others {e2e['others_cpu_share'] or 0:.0%}"
        )
        threads = e2e.get("server_threads_us_per_message") or {}
        if threads:
            lines.append(
                f"{label}: server by thread (user + system us/msg): "
                + ", ".join(f"{name} {cpu['user']:.0f} + {cpu['system']:.0f}" for name, cpu in threads.items())
            )
    for name, label in (("strace", "end-to-end message"), ("strace_queue", "queue end-to-end message")):
        if name in results:
            trace = results[name]
            top = ", ".join(f"{call} {count:.1f}" for call, count in list(trace["by_name"].items())[:12])
            lines.append(f"system calls per {label} (strace -c -f): {trace['calls_per_message']:.1f}: {top}")
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.latency_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=None, help="end-to-end messages (default 3,000; quick 100)")
    parser.add_argument("--windows", type=int, default=None, help="windows of 100 (default 300; quick 10)")
    parser.add_argument("--limit-seconds", type=float, default=None, help="each fdatasync loop (default 2; quick 0.2)")
    parser.add_argument("--rtt-count", type=int, default=None, help="loopback round trips (default 3,000; quick 200)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default=None, help="default: uvloop when installed")
    parser.add_argument(
        "--server-cpus", default=None, help="run the server under `taskset -c SERVER_CPUS` (e.g. 1); default: unpinned"
    )
    parser.add_argument("--strace", action="store_true", help="count the broker's system calls (strace -c -f)")
    parser.add_argument(
        "--only", choices=WORKLOAD_SETS[1:], default="all", help="stream or queue workloads (default: both)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    parser.add_argument("--json-out", default=None, help="write the figures as JSON here")
    arguments = parser.parse_args(argv)
    quick = arguments.quick
    for name, full, small in (
        ("messages", 3000, 100),
        ("windows", 300, 10),
        ("limit_seconds", 2.0, 0.2),
        ("rtt_count", 3000, 200),
    ):
        if getattr(arguments, name) is None:
            setattr(arguments, name, small if quick else full)
    if arguments.messages < 1 or arguments.windows < 1 or arguments.rtt_count < 10:
        parser.error("--messages and --windows must be at least 1, --rtt-count at least 10")
    if arguments.loop is None:
        arguments.loop = "uvloop" if uvloop_available() else "asyncio"
    if arguments.loop == "uvloop" and not uvloop_available():
        parser.error("--loop uvloop: uvloop is not installed")
    if arguments.server_cpus is not None and shutil.which("taskset") is None:
        parser.error("--server-cpus: taskset is not installed (Debian: util-linux)")
    if arguments.strace and shutil.which("strace") is None:
        parser.error("--strace: strace is not installed (Debian: apt-get install -y strace)")
    return arguments


def main(argv: list[str] | None = None) -> int:
    settings = parse_arguments(argv)
    if settings.loop == "uvloop":
        import uvloop

        def run(coroutine):
            return uvloop.run(coroutine)

        launcher: tuple[str, ...] = ("-c", WITH_UVLOOP)
    else:
        run = asyncio.run
        launcher = ("-c", NO_UVLOOP)
    parent = storage_bench.default_data_parent()
    with tempfile.TemporaryDirectory(prefix="nodi-latency-bench-", dir=parent) as directory:
        results: dict = {
            "loop": settings.loop,
            "server_cpus": settings.server_cpus,
            "machine": storage_bench.machine_description(directory),
        }
        progress("limits: fdatasync loops and loopback round trips")
        results["limits_before"] = measure_limits(directory, settings.loop, settings, run)
        server = NodiServer(
            directory, launcher=launcher, cpu_list=settings.server_cpus
        )  # metrics on, as `nodi serve` runs by default
        address = server.start()
        try:
            results.update(run(workloads(address, server.pid, settings, directory)))
        finally:
            server.stop()
        results["limits_after"] = measure_limits(directory, settings.loop, settings, run)
    print(render(results))
    if settings.json_out:
        with open(settings.json_out, "w") as output:
            json.dump(results, output, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
