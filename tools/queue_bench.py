#!/usr/bin/env python3
"""Queue and request-reply benchmark: queue-group consumption (receive + ack)
with 1 and 4 consumers and request-reply round trips, beside stream-mode consumption of
the same messages and this machine's disk limits, all measured in the same run.

    .venv/bin/python -m tools.queue_bench                  # full run, about a minute
    .venv/bin/python -m tools.queue_bench --quick          # smoke run, seconds
    .venv/bin/python -m tools.queue_bench --json-out results.json
    nodi bench --suite queues [--quick] [--json-out FILE]  # the same tool

The workload: --messages values of 1 KiB, produced once (acks=durable, fsync=always, one
partition by default), then read by every consumption phase on its own:
- stream: a consumer without a group from the earliest offset (tools/broker_bench.py's
  consume phase, the same code);
- queue, 1 consumer: one AsyncQueue in this process (one asyncio loop) receives every
  message and acks it as the at-least-once loop does (ack after handling, batched in
  the background, wait=False), timed from the first receive to the answer of the last
  ack, so every message counted is durably acked;
- queue, 4 consumers, two ways: 4 client processes (each its own interpreter, client and
  AsyncQueue, started together), and 4 AsyncQueues in this one asyncio loop. On a
  2-core machine 4 processes plus the broker share 2 cores, so the 4-process figure
  shows how the broker holds up with competing consumers, not a 4x speed-up: the
  broker is one process (one event loop) and is the ceiling either way.
- request-reply: a responder process receives requests from a queue group and replies
  (message.reply, the at-least-once loop acks); this process sends --requests requests
  one after the other (round trips per second, latency p50/p99/max), then the same with
  --concurrency requesters at once (asyncio tasks sharing one client). The request topic
  is created with each fsync policy of --request-fsync (default "always,never"): with
  "always" a request is fsynced before the responder can see it.

Machine limits, measured in the same run in the data directory's file system: a small
write + fdatasync loop (tools/storage_bench.py's raw_fdatasync_loop) and an LMDB commit
loop of one staged queue-state entry through storage/metadata.py (the commit the broker
makes for queue state), p50 / p99 each. The load average (os.getloadavg) is recorded at
the start, the end and around each phase: on a shared machine the figures move with it.

The tool starts its own `nodi serve` (127.0.0.1, a free port, a temporary data directory
that is not on tmpfs; tools/broker_bench.py's NodiServer) and stops it by pid. Nothing
here asserts a timing; tests/test_queue_bench_smoke.py only runs --quick.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from nodi.broker import AsyncClient
from nodi.storage.errors import NodiError
from nodi.storage.limits import KIB
from nodi.storage.metadata import MetadataStore
from tools import (
    broker_bench,  # NodiServer, the produce and stream consume phases
    storage_bench,  # the raw disk limits, machine description, percentile
)
from tools.broker_bench_common import CpuMeter, Settings, stop_process

# The child processes run this module as the package's module, from the repository root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD = [sys.executable, "-m", "tools.queue_bench"]

VALUE_BYTES = 1 * KIB
TOPIC = "queue-bench"
ACK_WAIT_MS = 120_000  # longer than any phase: no lease runs out and redelivers
CHILD_IDLE_MS = 500  # a consumer process stops after a receive this long came back empty
PEER_BATCH = 100  # the peers' consumers' batch (issue 12): received, then its settles awaited
E2E_WARMUP = 20  # end-to-end round trips not counted
CHILD_START_TIMEOUT_S = 60
TARGET_QUEUE_VS_STREAM = 0.5
TARGET_REQUEST_P99_MS = 2.0
LMDB_STATE_BYTES = 64  # about one partition's queue state with an empty window


def progress(message: str) -> None:
    print(f"[queue_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


# ---------------------------------------------------------------------------
# Machine limits


def lmdb_commit_loop(directory: str, seconds_max: float) -> dict:
    """Stage one queue-state entry and flush (one LMDB write transaction with its
    fsync), as the broker does for queue state, until `seconds_max` passes."""
    path = os.path.join(directory, "lmdb-commit-loop")
    os.makedirs(path)
    latencies: list[float] = []
    store = MetadataStore(path)
    try:
        state = bytes(LMDB_STATE_BYTES)
        started = time.perf_counter()
        now = started
        while now < started + seconds_max:
            store.put_queue_state("bench", "topic", len(latencies) % 4, state)
            store.flush()
            later = time.perf_counter()
            latencies.append(later - now)
            now = later
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)
    latencies.sort()
    return {
        "commits": len(latencies),
        "commits_per_s": len(latencies) / (now - started),
        "latency_ms_p50": storage_bench.percentile_ms(latencies, 0.50),
        "latency_ms_p99": storage_bench.percentile_ms(latencies, 0.99),
    }


def machine_limits(directory: str, seconds: float, value_bytes: int) -> dict:
    small = storage_bench.raw_fdatasync_loop(directory, broker_bench.one_message_batch_bytes(value_bytes), 1, seconds)
    progress(
        f"write+fdatasync of {small['bytes_per_write']:,} B: p50 {small['latency_ms_p50']:.3f} ms, "
        f"p99 {small['latency_ms_p99']:.3f} ms"
    )
    lmdb = lmdb_commit_loop(directory, seconds)
    progress(
        f"LMDB commit of one queue-state entry: p50 {lmdb['latency_ms_p50']:.3f} ms, "
        f"p99 {lmdb['latency_ms_p99']:.3f} ms"
    )
    return {"fdatasync_small": small, "lmdb_commit": lmdb}


# ---------------------------------------------------------------------------
# Queue consumption


async def drain(client: AsyncClient, group: str, stop_at: int | None, idle_ms: int, shared: dict | None = None) -> dict:
    """Receive and ack (in the background, batched, as the at-least-once loop does)
    until `stop_at` messages were received here (or, with `shared`, by all the consumers
    sharing it), or a receive waited `idle_ms` for nothing. The end time is when the last
    ack was answered: the figures count durably acked messages only."""
    queue = client.queue(TOPIC, group, ack_wait_ms=ACK_WAIT_MS)
    offsets: list[int] = []
    first = None
    clock = time.perf_counter
    last_answered: float | None = None
    ack_errors = 0
    watcher: asyncio.Task | None = None

    async def stamp_answers() -> None:
        """Wait for every ack queued so far (and any queued while the sender runs): the
        time the last one was answered, without holding up the receiving loop."""
        nonlocal last_answered, ack_errors
        try:
            await queue.flush()
        except NodiError:
            ack_errors += 1
        last_answered = clock()

    try:
        while True:
            if stop_at is not None and (shared["received"] if shared is not None else len(offsets)) >= stop_at:
                break
            message = await queue.receive(timeout_ms=idle_ms)
            if message is None:
                break
            if first is None:
                first = clock()
            offsets.append(message.offset)
            if shared is not None:
                shared["received"] += 1
            message.ack(wait=False)  # as the at-least-once loop does: sent in the background, batched
            if watcher is None or watcher.done():
                watcher = asyncio.get_running_loop().create_task(stamp_answers())
        if watcher is not None:
            await watcher  # created or still running when the last ack was queued: covers it
    finally:
        await queue.close()
    return {
        "offsets": offsets,
        "first_receive": first,
        "last_ack_answered": last_answered,
        "errors": ack_errors,
    }


def queue_figures(received: list[int], expected: int, seconds: float, value_bytes: int, errors: int) -> dict:
    distinct = len(set(received))
    return {
        "messages": len(received),
        "expected_messages": expected,
        "distinct_messages": distinct,
        "duplicates": len(received) - distinct,
        "errors": errors,
        "seconds": seconds,
        "msg_per_s": len(received) / seconds if seconds > 0 else None,
        "mb_per_s": len(received) * value_bytes / seconds / storage_bench.MB if seconds > 0 else None,
    }


async def queue_in_loop(address: str, group: str, consumers: int, expected: int, value_bytes: int) -> dict:
    """`consumers` AsyncQueues in this loop on one client (one connection)."""
    async with AsyncClient(address, timeout_ms=60_000) as client:
        shared = {"received": 0}
        started = time.perf_counter()
        results = await asyncio.gather(
            *(drain(client, group, expected, CHILD_IDLE_MS, shared) for _ in range(consumers))
        )
    received = [offset for one in results for offset in one["offsets"]]
    ends = [one["last_ack_answered"] for one in results if one["last_ack_answered"] is not None]
    figures = queue_figures(
        received,
        expected,
        (max(ends) if ends else time.perf_counter()) - started,
        value_bytes,
        sum(one["errors"] for one in results),
    )
    figures["per_consumer_messages"] = [len(one["offsets"]) for one in results]
    return figures


def queue_in_processes(address: str, group: str, consumers: int, expected: int, value_bytes: int) -> dict:
    """`consumers` child processes, each with its own client; they connect and make
    their queue, say ready, and start receiving when told (all at once)."""
    command = [*_CHILD, "--child-consumer", address, group]
    children = [
        subprocess.Popen(command, cwd=_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(consumers)
    ]
    try:
        for child in children:
            assert child.stdout is not None  # stdout=PIPE
            line = child.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"queue consumer process {child.pid} did not start: {line!r}")
        started = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in every process
        for child in children:
            assert child.stdin is not None  # stdin=PIPE
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            out, _ = child.communicate(timeout=CHILD_START_TIMEOUT_S + 600)
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            stop_process(child)
    received = [offset for one in results for offset in one["offsets"]]
    ends = [one["last_ack_answered"] for one in results if one["last_ack_answered"] is not None]
    figures = queue_figures(
        received,
        expected,
        (max(ends) if ends else started) - started,
        value_bytes,
        sum(one["errors"] for one in results),
    )
    figures["per_consumer_messages"] = [len(one["offsets"]) for one in results]
    return figures


async def child_consumer(address: str, group: str) -> dict:
    async with AsyncClient(address, timeout_ms=60_000) as client:
        await client.list_topics()  # connected
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        return await drain(client, group, None, CHILD_IDLE_MS)


# ---------------------------------------------------------------------------
# As the peers' consumers are driven (issue 12): batches of PEER_BATCH, settles awaited


async def peers_stream_group(address: str, group: str, expected: int, value_bytes: int) -> dict:
    """A stream group's consumer: poll a batch (fetches of about PEER_BATCH records),
    then commit and await the commit, as a Redis XREADGROUP + XACK or a JetStream
    fetch + acks loop is driven."""
    received = 0
    async with AsyncClient(address, timeout_ms=60_000) as client:
        consumer = client.consumer(
            TOPIC, group=group, start="earliest", auto_commit=False, bytes_max=PEER_BATCH * (value_bytes + 80)
        )
        started = time.perf_counter()
        try:
            await consumer.start()
            while received < expected:
                batch = await consumer.poll(timeout_ms=CHILD_IDLE_MS)
                if not batch:
                    break
                received += len(batch)
                await consumer.commit()
            seconds = time.perf_counter() - started
        finally:
            await consumer.close()
    return queue_figures(list(range(received)), expected, seconds, value_bytes, 0)


async def peers_queue_group(address: str, group: str, expected: int, value_bytes: int) -> dict:
    """A queue group's consumer the same way: receive a batch of PEER_BATCH, ack each,
    and await the acks (flush) before the next batch."""
    offsets: list[int] = []
    async with AsyncClient(address, timeout_ms=60_000) as client:
        queue = client.queue(TOPIC, group, ack_wait_ms=ACK_WAIT_MS, max_outstanding=PEER_BATCH)
        started = time.perf_counter()
        try:
            while len(offsets) < expected:
                batch: list = []
                while len(batch) < PEER_BATCH:
                    message = await queue.receive(timeout_ms=CHILD_IDLE_MS if not batch else 0)
                    if message is None:
                        break
                    batch.append(message)
                if not batch:
                    break
                for message in batch:
                    message.ack(wait=False)
                    offsets.append(message.offset)
                await queue.flush()  # the batch's acks answered (durable)
            seconds = time.perf_counter() - started
        finally:
            await queue.close()
    return queue_figures(offsets, expected, seconds, value_bytes, 0)


# An echo server for loopback_round_trips, in its own process (as the broker is).
_ECHO_SERVER = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
connection, _ = listener.accept()
connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := connection.recv(1):
    connection.sendall(data)
"""


async def loopback_round_trips(seconds: float) -> dict:
    """The machine's own limit for a request-response: one byte each way over loopback
    TCP between this process's asyncio streams and an echo process."""
    echo = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    samples: list[float] = []
    clock = time.perf_counter_ns
    assert echo.stdout is not None  # stdout=PIPE
    try:
        port = int(echo.stdout.readline())
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        end = time.perf_counter() + seconds
        try:
            while time.perf_counter() < end:
                sent = clock()
                writer.write(b"x")
                await asyncio.wait_for(reader.readexactly(1), 10)
                samples.append((clock() - sent) / 1e6)
        finally:
            writer.close()
    finally:
        stop_process(echo)
    return latency_summary(samples, seconds)


async def queue_end_to_end(address: str, count: int, value_bytes: int) -> dict:
    """One message at a time: produce it (acks=durable on an fsync=always topic), a
    queue consumer receives it and acks it (the ack awaited); the time of the whole."""
    topic = f"{TOPIC}-e2e"
    samples: list[float] = []
    value = os.urandom(value_bytes)
    clock = time.perf_counter_ns
    async with AsyncClient(address, timeout_ms=60_000) as client:
        await client.create_topic(topic, fsync_policy="always")
        async with client.queue(topic, "e2e", ack_wait_ms=ACK_WAIT_MS) as queue:
            started = time.perf_counter()
            for index in range(count + E2E_WARMUP):
                sent = clock()
                await client.produce(topic, value)
                message = await queue.receive(timeout_ms=10_000)
                if message is None:
                    raise RuntimeError("end to end: a produced message was not received within 10 s")
                await message.ack()
                if index >= E2E_WARMUP:
                    samples.append((clock() - sent) / 1e6)
            seconds = time.perf_counter() - started
        await client.delete_topic(topic)
    return latency_summary(samples, seconds)


# ---------------------------------------------------------------------------
# Request-reply


async def child_responder(address: str, topic: str) -> None:
    """Reply to every request with its own value until stdin closes."""
    async with AsyncClient(address, timeout_ms=60_000) as client:
        async with client.queue(topic, "responders", ack_wait_ms=ACK_WAIT_MS) as queue:
            await client.list_topics()
            print("ready", flush=True)

            async def serve() -> None:
                async for message in queue:
                    await message.reply(message.value)

            serving = asyncio.get_running_loop().create_task(serve())
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "" once closed
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving


def latency_summary(samples_ms: list[float], seconds: float) -> dict:
    samples = sorted(samples_ms)
    return {
        "requests": len(samples),
        "seconds": seconds,
        "round_trips_per_s": len(samples) / seconds if seconds > 0 else None,
        "latency_ms_p50": storage_bench.percentile(samples, 0.50),
        "latency_ms_p99": storage_bench.percentile(samples, 0.99),
        "latency_ms_max": samples[-1] if samples else None,
    }


async def requests_phase(
    client: AsyncClient, topic: str, value: bytes, count: int, concurrency: int, warmup: int
) -> dict:
    samples: list[float] = []
    clock = time.perf_counter_ns

    async def requester(share: int, keep: bool) -> None:
        for _ in range(share):
            sent = clock()
            await client.request(topic, value, timeout_ms=30_000)
            if keep:
                samples.append((clock() - sent) / 1e6)

    await asyncio.gather(*(requester(warmup // concurrency + 1, False) for _ in range(concurrency)))
    started = time.perf_counter()
    await asyncio.gather(*(requester(count // concurrency, True) for _ in range(concurrency)))
    figures = latency_summary(samples, time.perf_counter() - started)
    figures["concurrency"] = concurrency
    return figures


async def request_reply(
    address: str, server_pid: int | None, fsync_policy: str, settings: argparse.Namespace, value_bytes: int
) -> dict:
    topic = f"{TOPIC}-requests-{fsync_policy}"
    async with AsyncClient(address, timeout_ms=60_000) as client:
        await client.create_topic(topic, fsync_policy=fsync_policy)
        responder = subprocess.Popen(
            [*_CHILD, "--child-responder", address, topic],
            cwd=_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert responder.stdout is not None  # stdout=PIPE
        assert responder.stdin is not None  # stdin=PIPE
        try:
            if responder.stdout.readline().strip() != "ready":
                raise RuntimeError("the responder process did not start")
            value = os.urandom(value_bytes)
            results: dict[str, Any] = {"fsync_policy": fsync_policy}
            for name, concurrency in (("sequential", 1), ("concurrent", settings.concurrency)):
                meter = CpuMeter(server_pid)
                load = load_average()
                figures = await requests_phase(client, topic, value, settings.requests, concurrency, settings.warmup)
                cpu = meter.figures(figures["requests"])
                figures.update(
                    {
                        "load_average": load,
                        "server_cpu_us_per_request": cpu["server_cpu_us_per_message"],
                        "others_cpu_share": cpu["others_cpu_share"],
                    }
                )
                results[name] = figures
                progress(
                    f"  request-reply ({fsync_policy}, {concurrency} at once): "
                    f"{figures['round_trips_per_s']:,.0f}/s, p50 {figures['latency_ms_p50']:.2f} ms, "
                    f"p99 {figures['latency_ms_p99']:.2f} ms, max {figures['latency_ms_max']:.2f} ms"
                )
        finally:
            if responder.poll() is None:
                responder.stdin.close()
                try:
                    responder.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            stop_process(responder)
            await client.delete_topic(topic)
    return results


# ---------------------------------------------------------------------------
# The run


def phase(name: str, server_pid: int | None, messages_of, function, *arguments):
    progress(name)
    load = load_average()
    meter = CpuMeter(server_pid)
    figures = function(*arguments)
    figures.update(meter.figures(messages_of(figures)))
    figures["load_average"] = load
    if "msg_per_s" in figures:
        progress(f"  {figures['msg_per_s']:,.0f} msg/s ({figures['messages']:,} messages, load {load[0]})")
    return figures


def run(arguments: argparse.Namespace, data_directory: str) -> dict:
    started = time.perf_counter()
    machine = storage_bench.machine_description(data_directory)
    machine["load_average_start"] = load_average()
    messages = arguments.messages
    settings = Settings(
        messages=messages,
        value_bytes=arguments.value_bytes,
        partitions=arguments.partitions,
        batch_bytes_max=256 * KIB,
        phase_seconds_max=arguments.phase_seconds_max,
        latency_rate=1,
        latency_seconds=0,
        latency_warmup=0,
        latency_linger_ms=0,
        raw_loop_seconds=arguments.limit_seconds,
        rounds=1,
        quick=arguments.quick,
    )
    from nodi.broker.client.queue import DEFAULT_BATCH_MAX, DEFAULT_MAX_LEASE_MS, DEFAULT_MAX_OUTSTANDING

    results: dict = {
        "schema": 1,
        "machine": machine,
        "settings": {
            "messages": messages,
            "value_bytes": arguments.value_bytes,
            "partitions": arguments.partitions,
            "requests": arguments.requests,
            "concurrency": arguments.concurrency,
            "request_fsync": arguments.request_fsync,
            "queue_batch_max": DEFAULT_BATCH_MAX,
            "queue_receive_sizing": "paced: about 100 ms of the handler's work, up to queue_batch_max",
            "queue_max_outstanding": DEFAULT_MAX_OUTSTANDING,
            "queue_max_lease_ms": DEFAULT_MAX_LEASE_MS,
            "quick": arguments.quick,
            "four_consumers": "4 client processes, and 4 AsyncQueues in one asyncio loop",
        },
    }
    results["limits"] = machine_limits(data_directory, arguments.limit_seconds, arguments.value_bytes)
    server = broker_bench.NodiServer(os.path.join(data_directory, "nodi"))
    os.makedirs(server.directory)
    try:
        address = server.start()
        pid = server.pid
        results["nodi_server"] = f"started here at {address}, pid {pid}, data in {server.directory}"
        progress(f"nodi server: {results['nodi_server']}")

        async def produce_and_stream() -> tuple[dict, dict]:
            async with AsyncClient(address, timeout_ms=60_000) as client:
                await client.create_topic(TOPIC, partitions=arguments.partitions, fsync_policy="always")
                produced = await broker_bench.nodi_produce(client, TOPIC, settings, os.urandom(settings.value_bytes))
                progress(f"  produced {produced['messages']:,} at {produced['msg_per_s']:,.0f} msg/s")
                meter = CpuMeter(pid)
                load = load_average()
                stream = await broker_bench.nodi_consume(
                    client, TOPIC, produced["messages"], settings, settings.value_bytes
                )
                stream.update(meter.figures(stream["messages"]))
                stream["load_average"] = load
                return produced, stream

        progress(f"produce {messages:,} x {arguments.value_bytes} B (acks=durable, fsync=always), then stream consume")
        produced, stream = asyncio.run(produce_and_stream())
        progress(f"  stream consume: {stream['msg_per_s']:,.0f} msg/s")
        results["produce"] = produced
        results["stream"] = stream
        total = produced["messages"]
        count = lambda figures: figures["messages"]  # noqa: E731
        value_bytes = arguments.value_bytes
        results["queue_1"] = phase(
            "queue group, 1 consumer (this process)",
            pid,
            count,
            lambda: asyncio.run(queue_in_loop(address, "bench-1", 1, total, value_bytes)),
        )
        results["queue_4_processes"] = phase(
            "queue group, 4 consumer processes",
            pid,
            count,
            queue_in_processes,
            address,
            "bench-4p",
            4,
            total,
            value_bytes,
        )
        results["queue_4_in_loop"] = phase(
            "queue group, 4 AsyncQueues in this loop",
            pid,
            count,
            lambda: asyncio.run(queue_in_loop(address, "bench-4l", 4, total, value_bytes)),
        )
        results["stream_group_peers"] = phase(
            "stream group, peers' style (poll a batch of about 100, commit awaited)",
            pid,
            count,
            lambda: asyncio.run(peers_stream_group(address, "bench-peers-stream", total, value_bytes)),
        )
        results["queue_group_peers"] = phase(
            "queue group, peers' style (receive 100, their acks awaited)",
            pid,
            count,
            lambda: asyncio.run(peers_queue_group(address, "bench-peers-queue", total, value_bytes)),
        )
        progress("queue end to end, one message at a time")
        results["loopback_rtt"] = asyncio.run(loopback_round_trips(arguments.limit_seconds))
        results["queue_end_to_end"] = asyncio.run(queue_end_to_end(address, arguments.requests, value_bytes))
        progress(
            f"  p50 {results['queue_end_to_end']['latency_ms_p50']:.2f} ms, "
            f"p99 {results['queue_end_to_end']['latency_ms_p99']:.2f} ms "
            f"(loopback RTT p50 {results['loopback_rtt']['latency_ms_p50']:.3f} ms)"
        )
        results["request_reply"] = []
        for policy in arguments.request_fsync.split(","):
            progress(f"request-reply, request topic fsync={policy}")
            results["request_reply"].append(asyncio.run(request_reply(address, pid, policy, arguments, value_bytes)))
    finally:
        server.stop()
    machine["load_average_end"] = load_average()
    results["targets"] = targets(results)
    results["total_seconds"] = time.perf_counter() - started
    return results


def targets(results: dict) -> dict:
    stream = results["stream"]["msg_per_s"] or 0
    out: dict[str, Any] = {
        "queue_vs_stream_target": TARGET_QUEUE_VS_STREAM,
        "request_p99_ms_target": TARGET_REQUEST_P99_MS,
    }
    for name in ("queue_1", "queue_4_processes", "queue_4_in_loop"):
        rate = results[name]["msg_per_s"]
        out[f"{name}_vs_stream"] = rate / stream if rate and stream else None
    best = max((out[f"{name}_vs_stream"] or 0) for name in ("queue_1", "queue_4_processes", "queue_4_in_loop"))
    out["queue_target_met"] = best >= TARGET_QUEUE_VS_STREAM
    peers_stream = results["stream_group_peers"]["msg_per_s"] or 0
    peers_queue = results["queue_group_peers"]["msg_per_s"] or 0
    out["queue_group_peers_vs_stream_group"] = peers_queue / peers_stream if peers_stream else None
    out["queue_group_peers_target_met"] = bool(peers_stream) and peers_queue / peers_stream >= TARGET_QUEUE_VS_STREAM
    p99s = {
        f"{one['fsync_policy']}_{kind}": one[kind]["latency_ms_p99"]
        for one in results["request_reply"]
        for kind in ("sequential", "concurrent")
    }
    out["request_p99_ms"] = p99s
    sequential = [value for key, value in p99s.items() if key.endswith("sequential") and value is not None]
    out["request_target_met"] = bool(sequential) and min(sequential) <= TARGET_REQUEST_P99_MS
    return out


def render(results: dict) -> str:
    def number(value, digits=0):
        return "-" if value is None else f"{value:,.{digits}f}"

    limits = results["limits"]
    lines = [
        "",
        "Queues and request-reply (issue 4)",
        f"load average start {results['machine']['load_average_start']}, "
        f"end {results['machine']['load_average_end']} on {results['machine']['nproc']} cores",
        f"machine: write+fdatasync {limits['fdatasync_small']['bytes_per_write']:,} B p50 "
        f"{number(limits['fdatasync_small']['latency_ms_p50'], 3)} ms p99 "
        f"{number(limits['fdatasync_small']['latency_ms_p99'], 3)} ms; LMDB commit p50 "
        f"{number(limits['lmdb_commit']['latency_ms_p50'], 3)} ms p99 "
        f"{number(limits['lmdb_commit']['latency_ms_p99'], 3)} ms",
        "",
        f"{'phase':<40}{'msg/s':>10}{'MB/s':>8}{'vs stream':>11}{'server us/msg':>15}",
    ]
    stream = results["stream"]["msg_per_s"]
    for name, label in (
        ("stream", "stream consume"),
        ("queue_1", "queue, 1 consumer"),
        ("queue_4_processes", "queue, 4 consumer processes"),
        ("queue_4_in_loop", "queue, 4 AsyncQueues in one loop"),
    ):
        figures = results[name]
        ratio = figures["msg_per_s"] / stream if figures["msg_per_s"] and stream else None
        lines.append(
            f"{label:<40}{number(figures['msg_per_s']):>10}{number(figures['mb_per_s'], 1):>8}"
            f"{number(ratio, 2):>11}{number(figures.get('server_cpu_us_per_message'), 1):>15}"
        )
    peers = results["stream_group_peers"]["msg_per_s"]
    for name, label in (
        ("stream_group_peers", "stream group, batch of 100, commit awaited"),
        ("queue_group_peers", "queue group, batch of 100, acks awaited"),
    ):
        figures = results[name]
        ratio = figures["msg_per_s"] / peers if figures["msg_per_s"] and peers else None
        lines.append(
            f"{label:<40}{number(figures['msg_per_s']):>10}{number(figures['mb_per_s'], 1):>8}"
            f"{number(ratio, 2):>11}{number(figures.get('server_cpu_us_per_message'), 1):>15}"
        )
    end_to_end, rtt = results["queue_end_to_end"], results["loopback_rtt"]
    lines += [
        "(the last two: vs the stream group of the line above)",
        "",
        f"queue end to end, one at a time: p50 {number(end_to_end['latency_ms_p50'], 2)} ms, "
        f"p99 {number(end_to_end['latency_ms_p99'], 2)} ms, max {number(end_to_end['latency_ms_max'], 2)} ms; "
        f"loopback RTT p50 {number(rtt['latency_ms_p50'], 3)} ms, p99 {number(rtt['latency_ms_p99'], 3)} ms",
    ]
    lines += ["", f"{'request-reply':<40}{'rt/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"]
    for one in results["request_reply"]:
        for kind in ("sequential", "concurrent"):
            figures = one[kind]
            label = f"fsync={one['fsync_policy']}, {figures['concurrency']} at once"
            lines.append(
                f"{label:<40}{number(figures['round_trips_per_s']):>10}"
                f"{number(figures['latency_ms_p50'], 2):>9}{number(figures['latency_ms_p99'], 2):>9}"
                f"{number(figures['latency_ms_max'], 2):>9}"
            )
    met = results["targets"]
    lines += [
        "",
        f"target queue >= {TARGET_QUEUE_VS_STREAM} x stream: "
        f"{'met' if met['queue_target_met'] else 'missed'}; request-reply p99 <= {TARGET_REQUEST_P99_MS} ms "
        f"(sequential): {'met' if met['request_target_met'] else 'missed'}; queue group >= "
        f"{TARGET_QUEUE_VS_STREAM} x stream group, peers' style: "
        f"{'met' if met['queue_group_peers_target_met'] else 'missed'}",
    ]
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    from nodi.cli.bench import add_bench_options

    parser = argparse.ArgumentParser(
        prog="queue_bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_bench_options(parser, "queues")  # declared once, in nodi/cli/bench.py (BENCH_OPTIONS)
    parser.add_argument("--child-consumer", nargs=2, metavar=("ADDRESS", "GROUP"), help=argparse.SUPPRESS)
    parser.add_argument("--child-responder", nargs=2, metavar=("ADDRESS", "TOPIC"), help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    quick = arguments.quick
    arguments.messages = arguments.messages or (3_000 if quick else 100_000)
    arguments.requests = arguments.requests or (200 if quick else 3_000)
    arguments.warmup = arguments.warmup if arguments.warmup is not None else (20 if quick else 200)
    arguments.limit_seconds = arguments.limit_seconds or (0.3 if quick else 2.0)
    arguments.phase_seconds_max = arguments.phase_seconds_max or 60.0
    if arguments.messages < 1 or arguments.requests < 1 or arguments.concurrency < 1 or arguments.partitions < 1:
        parser.error("--messages, --requests, --concurrency and --partitions must be at least 1")
    if arguments.value_bytes < 1:
        parser.error("--value-bytes must be at least 1")
    for policy in arguments.request_fsync.split(","):
        if policy not in ("always", "interval", "never"):
            parser.error(f"--request-fsync: {policy!r} is not always, interval or never")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.child_consumer:
        result = asyncio.run(child_consumer(*arguments.child_consumer))
        print(json.dumps(result), flush=True)
        return 0
    if arguments.child_responder:
        asyncio.run(child_responder(*arguments.child_responder))
        return 0
    return storage_bench.run_in_scratch_directory(
        "queue",
        arguments,
        lambda directory: run(arguments, directory),
        render,
        progress,
        errors=(NodiError, RuntimeError),
    )


if __name__ == "__main__":
    sys.exit(main())
