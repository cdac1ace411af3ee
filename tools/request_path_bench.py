"""The broker's CPU per request, in isolation (issue 12): a real Server in this process,
driven over loopback TCP with real frames by a client thread, each request's CPU counted
from the server's own threads only.

The server (broker/server/server.py's Server, metrics on as `nodi serve` runs them, the
console off) runs on this process's main thread, on uvloop when installed. A client
thread speaks the wire protocol with blocking sockets (broker/protocol's sans-IO
Connection, the client side) and sends one request at a time, each answered before the
next. CPU is read from /proc/self/task/TID/schedstat (nanoseconds on the CPU, every
thread of the process but the client's) and /proc/self/task/TID/stat (the user/system
split, in clock ticks), before and after each workload; the client thread's own CPU is
left out, so the figures are the broker's alone: its event loop thread ("loop") and its
other threads ("threads": the fsync workers, the executor that commits LMDB, the metrics
endpoint).

Workloads, 1 KiB values, one partition per topic:
- floor: a bare asyncio echo server on the same loop answering a 64-byte frame (the
  least a request/reply over an asyncio stream can cost here: one read, one write);
- list_offsets: the cheapest nodi request (answered from memory);
- produce_never: a produce of one record, acks written, topic fsync "never";
- produce_always: the same with acks durable, topic fsync "always" (waits for the fsync);
- window: issue 12's durable window, one produce of a batch of 100 records of 1 KiB
  (acks durable, fsync "always"), as the batching producer sends a flushed window; per
  window;
- fetch: a fetch that finds one 1 KiB batch at once (the read copied into the reply);
- commit: a CommitOffsets of one partition for a group member (one LMDB commit each);
- end_to_end: issue 12's one-at-a-time message as three requests: a fetch waiting at
  the tail (long poll), the durable produce that wakes it, then the commit; per message.

    python -m tools.request_path_bench                           # every workload, 3,000 each
    python -m tools.request_path_bench --profile produce_always  # plus cProfile of the loop thread
    python -m tools.request_path_bench --quick                   # seconds (the smoke test)

With --profile, the named workload runs a second time under cProfile (the loop thread
only; profiling makes each call dearer, so that run's CPU is not reported) and the top
functions by own time are printed (and the pstats file kept with --profile-out).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.connection import NEED_DATA, Connection, Role
from nodi.broker.protocol.errors import ErrorCode
from nodi.broker.server.config import ServerConfig
from nodi.broker.server.metrics import Metrics
from nodi.broker.server.server import Server
from nodi.storage.records import build_batch, make_records
from nodi.storage.topic_settings import TopicConfig
from tools import storage_bench

VALUE_BYTES = 1024
ECHO_BYTES = 64
WORKLOADS = ("floor", "list_offsets", "produce_never", "produce_always", "window", "fetch", "commit", "end_to_end")
# The window workload's batch: issue 12's durable window of 100 x 1 KiB, one produce.
WINDOW_MESSAGES = 100
# Requests each workload's one message makes of the broker (end_to_end: fetch, produce, commit).
REQUESTS_PER_MESSAGE = {"end_to_end": 3}
SOCKET_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0
LONG_POLL_MS = 5_000
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def progress(message: str) -> None:
    print(f"[request_path_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# CPU of this process's threads


@dataclass(frozen=True, slots=True)
class ThreadCpu:
    running_ns: int  # schedstat: time on a CPU
    user_ticks: int
    system_ticks: int


def thread_cpu(excluded: set[int]) -> dict[int, ThreadCpu]:
    """Every thread of this process but `excluded` (native ids) -> its CPU so far."""
    found = {}
    for name in os.listdir("/proc/self/task"):
        tid = int(name)
        if tid in excluded:
            continue
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as schedstat:
                running_ns = int(schedstat.read().split()[0])
            with open(f"/proc/self/task/{tid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
        found[tid] = ThreadCpu(running_ns, int(fields[11]), int(fields[12]))
    return found


def cpu_delta(before: dict[int, ThreadCpu], after: dict[int, ThreadCpu], loop_tid: int) -> dict:
    """Seconds of CPU between two readings: the loop thread's, the other threads'
    (those that ended between the readings are lost: none do in these workloads)."""
    loop = others = 0.0
    loop_user = loop_system = 0.0
    for tid, now in after.items():
        then = before.get(tid, ThreadCpu(0, 0, 0))
        running = (now.running_ns - then.running_ns) / 1e9
        if tid == loop_tid:
            loop = running
            loop_user = (now.user_ticks - then.user_ticks) / CLOCK_TICKS_PER_S
            loop_system = (now.system_ticks - then.system_ticks) / CLOCK_TICKS_PER_S
        else:
            others += running
    return {"loop_s": loop, "threads_s": others, "loop_user_s": loop_user, "loop_system_s": loop_system}


# ---------------------------------------------------------------------------
# The client side: blocking sockets around the sans-IO connection


class WireClient:
    """One connection, one request at a time (or a few pipelined by the caller)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=SOCKET_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connection = Connection(Role.CLIENT)
        self.send(m.HandshakeRequest(request_id=self.connection.next_request_id(), client_id="request-path-bench"))
        response = self.receive()
        assert isinstance(response, m.HandshakeResponse)
        _check(response)

    def request_id(self) -> int:
        return self.connection.next_request_id()

    def send(self, request: m.Request) -> None:
        self.sock.sendall(self.connection.send(request))

    def receive(self) -> m.Message:
        while True:
            event = self.connection.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, m.Message), event
                return event
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.connection.receive_data(data)

    def call(self, request: m.Request) -> m.Message:
        self.send(request)
        response = self.receive()
        _check(response)
        return response

    def close(self) -> None:
        self.sock.close()


def _check(response: m.Message) -> None:
    if isinstance(response, m.Response) and response.error_code != ErrorCode.NONE:
        raise RuntimeError(f"{type(response).__name__}: {response.error_code.name} {response.error_message}")


# ---------------------------------------------------------------------------
# Workloads: each a generator of setup, then one step per message


@dataclass
class Bench:
    address: tuple[str, int]
    echo_address: tuple[str, int]
    batch: bytes
    window_batch: bytes
    fetch_topic_messages: int = 0


def floor_steps(bench: Bench, count: int) -> Generator[None, None, None]:
    sock = socket.create_connection(bench.echo_address, timeout=SOCKET_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    frame = struct.pack(">I", ECHO_BYTES - 4) + bytes(ECHO_BYTES - 4)
    try:
        yield
        for _ in range(count):
            sock.sendall(frame)
            received = 0
            while received < ECHO_BYTES:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the echo server closed the connection")
                received += len(chunk)
            yield
    finally:
        sock.close()


def list_offsets_steps(bench: Bench, count: int) -> Generator[None, None, None]:
    client = WireClient(bench.address)
    try:
        yield
        for _ in range(count):
            client.call(m.ListOffsetsRequest(request_id=client.request_id(), topic="never", partition=0))
            yield
    finally:
        client.close()


def produce_steps(
    topic: str, acks: m.Acks, *, window: bool = False
) -> Callable[[Bench, int], Generator[None, None, None]]:
    def steps(bench: Bench, count: int) -> Generator[None, None, None]:
        client = WireClient(bench.address)
        records = bench.window_batch if window else bench.batch
        try:
            yield
            for _ in range(count):
                client.call(
                    m.ProduceRequest(
                        request_id=client.request_id(), topic=topic, partition=0, acks=acks, records=records
                    )
                )
                yield
        finally:
            client.close()

    return steps


def fetch_steps(bench: Bench, count: int) -> Generator[None, None, None]:
    """Fetches of the batches produce_never wrote, one batch each (bytes_max 1 still
    sends one whole batch), offset after offset."""
    client = WireClient(bench.address)
    stored = max(bench.fetch_topic_messages, 1)
    try:
        yield
        for index in range(count):
            response = client.call(
                m.FetchRequest(
                    request_id=client.request_id(), topic="never", partition=0, offset=index % stored, bytes_max=1
                )
            )
            assert isinstance(response, m.FetchResponse) and len(response.records) > VALUE_BYTES, response
            yield
    finally:
        client.close()


def _join(client: WireClient, group: str, topic: str) -> m.JoinGroupResponse:
    response = client.call(m.JoinGroupRequest(request_id=client.request_id(), group=group, topics=[topic]))
    assert isinstance(response, m.JoinGroupResponse)
    return response


def commit_steps(bench: Bench, count: int) -> Generator[None, None, None]:
    client = WireClient(bench.address)
    try:
        joined = _join(client, "bench-commit", "never")
        yield
        for index in range(count):
            client.call(
                m.CommitOffsetsRequest(
                    request_id=client.request_id(),
                    group="bench-commit",
                    generation=joined.generation,
                    member_id=joined.member_id,
                    offsets=[m.OffsetCommit(topic="never", partition=0, offset=index + 1)],
                )
            )
            yield
    finally:
        client.close()


def end_to_end_steps(bench: Bench, count: int) -> Generator[None, None, None]:
    """One message: the consumer's fetch waits at the tail, the producer's durable
    produce wakes it, then the consumer commits; as tools/latency_bench.py's one at a
    time, with commits as CommitOffsets of their own."""
    producer = WireClient(bench.address)
    consumer = WireClient(bench.address)
    try:
        joined = _join(consumer, "bench-e2e", "e2e")
        latest = consumer.call(m.ListOffsetsRequest(request_id=consumer.request_id(), topic="e2e", partition=0))
        assert isinstance(latest, m.ListOffsetsResponse)
        offset = latest.offset  # at the tail (a second run, under --profile, finds the first's records)
        yield
        for _ in range(count):
            consumer.send(
                m.FetchRequest(
                    request_id=consumer.request_id(), topic="e2e", partition=0, offset=offset, wait_ms=LONG_POLL_MS
                )
            )
            producer.call(
                m.ProduceRequest(
                    request_id=producer.request_id(), topic="e2e", partition=0, acks=m.Acks.DURABLE, records=bench.batch
                )
            )
            fetched = consumer.receive()
            _check(fetched)
            assert isinstance(fetched, m.FetchResponse) and len(fetched.records) > VALUE_BYTES, fetched
            offset += 1
            consumer.call(
                m.CommitOffsetsRequest(
                    request_id=consumer.request_id(),
                    group="bench-e2e",
                    generation=joined.generation,
                    member_id=joined.member_id,
                    offsets=[m.OffsetCommit(topic="e2e", partition=0, offset=offset)],
                )
            )
            yield
    finally:
        producer.close()
        consumer.close()


STEPS: dict[str, Callable[[Bench, int], Generator[None, None, None]]] = {
    "floor": floor_steps,
    "list_offsets": list_offsets_steps,
    "produce_never": produce_steps("never", m.Acks.WRITTEN),
    "produce_always": produce_steps("always", m.Acks.DURABLE),
    "window": produce_steps("window", m.Acks.DURABLE, window=True),
    "fetch": fetch_steps,
    "commit": commit_steps,
    "end_to_end": end_to_end_steps,
}


def run_workload(bench: Bench, name: str, count: int, loop_tid: int, profiler: ProfileSwitch | None = None) -> dict:
    """Run `name` for `count` messages in this (the client) thread; the server's CPU."""
    excluded = {threading.get_native_id()}
    steps = STEPS[name](bench, count)
    next(steps)  # connected, set up
    for _ in range(min(count, 100)):  # warm up (first-use caches, metric children)
        next(steps)
    measured = count - min(count, 100)
    if profiler is not None:
        profiler.switch(True)
    before = thread_cpu(excluded)
    wall_start = time.perf_counter()
    for _ in range(measured):
        next(steps)
    wall = time.perf_counter() - wall_start
    after = thread_cpu(excluded)
    if profiler is not None:
        profiler.switch(False)
    steps.close()
    if name == "produce_never":
        bench.fetch_topic_messages += count
    cpu = cpu_delta(before, after, loop_tid)
    per = 1e6 / measured if measured else 0.0
    requests = REQUESTS_PER_MESSAGE.get(name, 1)
    return {
        "messages": measured,
        "requests_per_message": requests,
        "wall_us_per_message": wall * per,
        "server_cpu_us_per_message": (cpu["loop_s"] + cpu["threads_s"]) * per,
        "loop_cpu_us_per_message": cpu["loop_s"] * per,
        "loop_user_us_per_message": cpu["loop_user_s"] * per,
        "loop_system_us_per_message": cpu["loop_system_s"] * per,
        "threads_cpu_us_per_message": cpu["threads_s"] * per,
        "loop_cpu_us_per_request": cpu["loop_s"] * per / requests,
    }


class ProfileSwitch:
    """cProfile of the loop thread, switched on and off from the client thread (a
    profiler profiles the thread that enables it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.profile = cProfile.Profile()

    def switch(self, on: bool) -> None:
        done = threading.Event()

        def flip() -> None:
            if on:
                self.profile.enable()
            else:
                self.profile.disable()
            done.set()

        self.loop.call_soon_threadsafe(flip)
        if not done.wait(SOCKET_TIMEOUT_S):
            raise TimeoutError("the server loop did not switch the profiler")


# ---------------------------------------------------------------------------
# The server side


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Length-prefixed frames back as they came (the floor workload)."""
    try:
        while True:
            header = await reader.readexactly(4)
            (length,) = struct.unpack(">I", header)
            body = await reader.readexactly(length)
            writer.write(header + body)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve_and_drive(directory: str, settings: argparse.Namespace) -> dict:
    config = ServerConfig(data_dir=directory, port=0, metrics_port=0 if settings.metrics else -1, console_port=0)
    metrics = Metrics(config.host, 0, config.security) if settings.metrics else None
    server = Server(config, metrics=metrics)
    ready = asyncio.Event()
    serving = asyncio.create_task(server.run(on_ready=lambda _: ready.set()))
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(ready.wait(), START_TIMEOUT_S)
        assert server.broker is not None and server.address is not None
        await server.broker.create_topic("never", TopicConfig(partitions=1, fsync_policy="never"))
        await server.broker.create_topic("always", TopicConfig(partitions=1, fsync_policy="always"))
        await server.broker.create_topic("window", TopicConfig(partitions=1, fsync_policy="always"))
        await server.broker.create_topic("e2e", TopicConfig(partitions=1, fsync_policy="always"))
        bench = Bench(
            address=(server.address[0], server.address[1]),
            echo_address=echo.sockets[0].getsockname()[:2],
            batch=build_batch(make_records([bytes(VALUE_BYTES)])),
            window_batch=build_batch(make_records([bytes(VALUE_BYTES)] * WINDOW_MESSAGES)),
        )
        loop_tid = threading.get_native_id()
        profiler = ProfileSwitch(loop) if settings.profile else None
        results: dict = {}

        def drive() -> None:
            for name in settings.workloads:
                progress(f"{name}: {settings.requests}")
                results[name] = run_workload(bench, name, settings.requests, loop_tid)
            if profiler is not None:
                progress(f"{settings.profile} under cProfile: {settings.requests}")
                run_workload(bench, settings.profile, settings.requests, loop_tid, profiler)

        await asyncio.wait_for(asyncio.to_thread(drive), settings.timeout_s)
        if profiler is not None:
            results["profile"] = {"workload": settings.profile, "stats": profiler.profile}
        return results
    finally:
        echo.close()
        server.stop()
        await asyncio.wait_for(serving, 60)


def render(results: dict) -> str:
    lines = [
        f"loop: {results['loop']}; metrics {'on' if results['metrics'] else 'off'}; {results['machine']}",
        "CPU of the broker's threads in microseconds per message (the client thread left out); "
        "loop = the event loop thread, threads = fsync workers, LMDB executor, metrics",
        f"{'workload':<16}{'requests':>9}{'server':>9}{'loop':>8}{'user':>8}{'system':>8}{'threads':>9}"
        f"{'loop/req':>10}{'wall':>9}",
    ]
    for name in WORKLOADS:
        figures = results.get(name)
        if figures is None:
            continue
        lines.append(
            f"{name:<16}{figures['requests_per_message']:>9}{figures['server_cpu_us_per_message']:>9.1f}"
            f"{figures['loop_cpu_us_per_message']:>8.1f}{figures['loop_user_us_per_message']:>8.0f}"
            f"{figures['loop_system_us_per_message']:>8.0f}{figures['threads_cpu_us_per_message']:>9.1f}"
            f"{figures['loop_cpu_us_per_request']:>10.1f}{figures['wall_us_per_message']:>9.1f}"
        )
    return "\n".join(lines)


def profile_text(profile: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.request_path_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=None, help="messages per workload (default 3,000; quick 150)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--profile", choices=WORKLOADS, default=None, help="run this workload again under cProfile")
    parser.add_argument("--profile-out", default=None, help="keep the pstats file here")
    parser.add_argument("--top", type=int, default=30, help="functions of the profile to print")
    parser.add_argument("--no-metrics", dest="metrics", action="store_false", help="the server without metrics")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default=None, help="default: uvloop when installed")
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="give up after this long")
    parser.add_argument("--json-out", default=None, help="write the figures as JSON here")
    arguments = parser.parse_args(argv)
    if arguments.requests is None:
        arguments.requests = 150 if arguments.quick else 3000
    if arguments.requests < 1:
        parser.error("--requests must be at least 1")
    names = [name.strip() for name in arguments.workloads.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        parser.error(f"--workloads: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(WORKLOADS)}")
    if "fetch" in names and "produce_never" not in names:
        names.insert(names.index("fetch"), "produce_never")  # fetch reads what it wrote
    arguments.workloads = names
    if arguments.loop is None:
        try:
            import uvloop  # noqa: F401
        except ImportError:
            arguments.loop = "asyncio"
        else:
            arguments.loop = "uvloop"
    return arguments


def main(argv: list[str] | None = None) -> int:
    settings = parse_arguments(argv)
    with tempfile.TemporaryDirectory(prefix="nodi-request-path-", dir=storage_bench.default_data_parent()) as directory:
        coroutine = serve_and_drive(directory, settings)
        if settings.loop == "uvloop":
            import uvloop

            results = uvloop.run(coroutine)
        else:
            results = asyncio.run(coroutine)
        machine = storage_bench.machine_description(directory)
    profile = results.pop("profile", None)
    results.update(loop=settings.loop, metrics=settings.metrics, machine=machine)
    print(render(results))
    if profile is not None:
        print(f"\ncProfile of the loop thread, {profile['workload']}, {settings.requests} messages, by own time:")
        print(profile_text(profile["stats"], settings.top))
        if settings.profile_out:
            profile["stats"].dump_stats(settings.profile_out)
    if settings.json_out:
        with open(settings.json_out, "w") as output:
            json.dump(results, output, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
