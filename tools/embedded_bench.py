#!/usr/bin/env python3
"""Embedded nodi (nodi.broker.open) beside the SQLite-backed local queues its users pick
today, persist-queue's SQLiteAckQueue and litequeue, with the same durability, in one
run, beside this machine's own disk limits.

    .venv/bin/python -m tools.embedded_bench               # full run, a minute or two
    .venv/bin/python -m tools.embedded_bench --quick       # smoke run, seconds
    .venv/bin/python -m tools.embedded_bench --json-out results.json

The competitors come with the `bench` extra (pip install -e '.[bench]'); one that is not
installed is reported as such and left out.

Workload: values of 1 KiB, one queue (one partition for nodi), each phase in a fresh
directory under a temp dir that is not on tmpfs (storage_bench.default_data_parent).

Durability is the same for all: a put / produce counts only once it is fsynced. nodi:
topic fsync `always` (the default) and acks `durable`; queue acks are committed to LMDB
(with its fsync) before they are answered. SQLite: WAL with `PRAGMA synchronous=FULL`
(the WAL is fsynced at every commit; persist-queue leaves SQLite's default, FULL;
litequeue sets NORMAL, which does not fsync a commit, so it is set back to FULL here).

Phases (each bounded by --messages and --seconds, whichever comes first):
- durable produce, one at a time: client.produce() / SQLiteAckQueue.put() /
  LiteQueue.put(), each returning once its message is durable;
- durable produce, batched: nodi's producer (batches, several requests in flight, every
  message acknowledged durable), beside SQLite's own batching: --batch puts per
  transaction with litequeue's transaction() (SQLiteAckQueue commits every put: it
  refuses auto_commit=False, "not supported in ack queue");
- receive + ack, one at a time: queue.receive() then message.ack() waited (durable) /
  get() + ack() / pop() + done(), each ack committed before the next receive;
- receive + ack, batched: nodi's queue receiving batches (batch_max) with acks sent in
  the background (ack(wait=False)) and one flush at the end, timed to the flush's answer:
  every counted message is durably acked (the at-least-once loop of tools/queue_bench.py).

Machine limits, measured in the same run in the same file system: a small write +
fdatasync loop (the floor of one durable commit) and a raw sequential write + fdatasync
(storage_bench's). The load average is recorded: the machine is shared. Nothing here
asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import nodi.broker
from nodi.storage.limits import KIB, MIB
from tools import storage_bench

VALUE_BYTES = 1 * KIB
TOPIC = "bench"
GROUP = "workers"
ACK_WAIT_MS = 300_000  # longer than any phase: no lease runs out and redelivers


@dataclass(frozen=True)
class Settings:
    messages: int  # per phase, at most
    seconds: float  # per phase, at most
    batch: int  # SQLite puts per transaction; nodi queue batch_max
    raw_seconds: float
    raw_bytes: int


FULL = Settings(messages=50_000, seconds=10.0, batch=500, raw_seconds=2.0, raw_bytes=64 * MIB)
QUICK = Settings(messages=100, seconds=0.5, batch=50, raw_seconds=0.2, raw_bytes=4 * MIB)


def progress(message: str) -> None:
    print(f"[embedded_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def figure(name: str, count: int, seconds: float) -> dict:
    return {"phase": name, "messages": count, "seconds": round(seconds, 4), "per_s": round(count / seconds, 1)}


def timed(limit: Settings, step: Callable[[int], object], count_max: int | None = None) -> tuple[int, float]:
    """Call step(i) until --messages (or count_max) or --seconds; (count, seconds)."""
    count_max = limit.messages if count_max is None else count_max
    started = time.perf_counter()
    deadline = started + limit.seconds
    count = 0
    while count < count_max and time.perf_counter() < deadline:
        step(count)
        count += 1
    return count, time.perf_counter() - started


# -- nodi, embedded --------------------------------------------------------------------------


def nodi_phases(directory: str, settings: Settings) -> list[dict]:
    value = os.urandom(VALUE_BYTES)
    results = []
    with nodi.broker.open(os.path.join(directory, "one")) as client:
        client.create_topic(TOPIC)
        count, seconds = timed(settings, lambda _: client.produce(TOPIC, value, partition=0))
        results.append(figure("nodi: produce one at a time", count, seconds))
        with client.queue(TOPIC, GROUP, ack_wait_ms=ACK_WAIT_MS, batch_max=1) as queue:

            def receive_ack(_: int) -> None:
                message = queue.receive(timeout_ms=10_000)
                assert message is not None, "a produced message was not delivered"
                message.ack()

            count, seconds = timed(settings, receive_ack, count)
        results.append(figure("nodi: receive + ack one at a time", count, seconds))
    with nodi.broker.open(os.path.join(directory, "batched")) as client:
        client.create_topic(TOPIC)
        started = time.perf_counter()
        with client.producer() as producer:
            futures: list = []
            deadline = started + settings.seconds
            while len(futures) < settings.messages and time.perf_counter() < deadline:
                futures.append(producer.send(TOPIC, value, partition=0))
            producer.flush()
        for future in futures:
            future.result(60)
        seconds = time.perf_counter() - started
        results.append(figure("nodi: producer (batched)", len(futures), seconds))
        with client.queue(TOPIC, GROUP, ack_wait_ms=ACK_WAIT_MS, batch_max=settings.batch) as queue:
            started = time.perf_counter()
            received = 0
            while received < len(futures):
                message = queue.receive(timeout_ms=10_000)
                assert message is not None, "a produced message was not delivered"
                message.ack(wait=False)
                received += 1
            queue.flush()
            seconds = time.perf_counter() - started
        results.append(figure("nodi: receive + ack (batched)", received, seconds))
    return results


# -- persist-queue --------------------------------------------------------------------------


def persist_queue_phases(directory: str, settings: Settings) -> list[dict] | str:
    try:
        import persistqueue
    except ImportError:
        return "persist-queue is not installed (pip install -e '.[bench]')"
    value = os.urandom(VALUE_BYTES)
    results = []
    queue = persistqueue.SQLiteAckQueue(os.path.join(directory, "one"), auto_commit=True)
    try:
        synchronous = queue._conn.execute("PRAGMA synchronous").fetchone()[0]  # 2: FULL
        queue._conn.execute("PRAGMA synchronous=FULL")
        count, seconds = timed(settings, lambda _: queue.put(value))
        results.append(figure("persist-queue: put one at a time", count, seconds))

        def get_ack(_: int) -> None:
            item = queue.get(block=False)
            queue.ack(item)

        count, seconds = timed(settings, get_ack, count)
        results.append(figure("persist-queue: get + ack one at a time", count, seconds))
    finally:
        queue.close()
    results[0]["sqlite_synchronous_default"] = synchronous
    return results


# -- litequeue ------------------------------------------------------------------------------


def litequeue_phases(directory: str, settings: Settings) -> list[dict] | str:
    try:
        import litequeue
    except ImportError:
        return "litequeue is not installed (pip install -e '.[bench]')"
    value = os.urandom(VALUE_BYTES // 2).hex()  # a 1 KiB str: litequeue stores TEXT
    results = []
    queue = litequeue.LiteQueue(os.path.join(directory, "one.sqlite3"))
    try:
        queue.conn.execute("PRAGMA synchronous=FULL")  # litequeue sets NORMAL: no fsync per commit
        count, seconds = timed(settings, lambda _: queue.put(value))
        results.append(figure("litequeue: put one at a time", count, seconds))

        def pop_done(_: int) -> None:
            message = queue.pop()
            assert message is not None, "a put message was not popped"
            queue.done(message.message_id)

        count, seconds = timed(settings, pop_done, count)
        results.append(figure("litequeue: pop + done one at a time", count, seconds))
    finally:
        queue.close()
    batched = litequeue.LiteQueue(os.path.join(directory, "batched.sqlite3"))
    try:
        batched.conn.execute("PRAGMA synchronous=FULL")
        started = time.perf_counter()
        deadline = started + settings.seconds
        count = 0
        while count < settings.messages and time.perf_counter() < deadline:
            with batched.transaction():
                for _ in range(min(settings.batch, settings.messages - count)):
                    batched.put(value)
                    count += 1
        results.append(
            figure(f"litequeue: put, {settings.batch} per transaction", count, time.perf_counter() - started)
        )
    finally:
        batched.close()
    return results


# -- the run --------------------------------------------------------------------------------


def machine_limits(directory: str, settings: Settings) -> dict:
    small = storage_bench.raw_fdatasync_loop(directory, VALUE_BYTES + 128, 1, settings.raw_seconds)
    sequential = storage_bench.raw_sequential_write(directory, settings.raw_bytes)
    return {
        "fdatasync_1kib_per_s": round(small["writes_per_s"], 1),
        "fdatasync_latency_ms_p50": round(small["latency_ms_p50"], 3),
        "fdatasync_latency_ms_p99": round(small["latency_ms_p99"], 3),
        "raw_sequential_mb_per_s": round(sequential["mb_per_s"], 1),
        "sqlite_version": sqlite3.sqlite_version,
    }


def best(results: list[dict], prefix_of_phase: tuple[str, ...]) -> dict | None:
    chosen = [row for row in results if row["phase"].split(": ", 1)[1].startswith(prefix_of_phase)]
    return max(chosen, key=lambda row: row["per_s"], default=None)


def ratios(results: dict) -> list[dict]:
    """nodi's figure over the best competitor's, for produce and for receive + ack, one
    at a time and batched (each nodi row against every competitor row of its kind)."""
    rows = results["phases"]
    nodi_rows = [row for row in rows if row["phase"].startswith("nodi:")]
    others = [row for row in rows if not row["phase"].startswith("nodi:")]
    pairs = [
        ("durable produce, one at a time", ("produce one",), ("put one",)),
        ("durable produce, batched vs the best put", ("producer",), ("put",)),
        ("receive + ack, one at a time", ("receive + ack one",), ("get + ack", "pop + done")),
        ("receive + ack, batched vs the best", ("receive + ack (batched)",), ("get + ack", "pop + done")),
    ]
    found = []
    for name, ours, theirs in pairs:
        mine, rival = best(nodi_rows, ours), best(others, theirs)
        if mine is None or rival is None:
            continue
        found.append(
            {
                "comparison": name,
                "nodi": mine["phase"],
                "nodi_per_s": mine["per_s"],
                "best_other": rival["phase"],
                "best_other_per_s": rival["per_s"],
                "ratio": round(mine["per_s"] / rival["per_s"], 2),
            }
        )
    return found


def run(directory: str, settings: Settings) -> dict:
    results: dict = {"settings": settings.__dict__, "load_average_start": os.getloadavg(), "skipped": []}
    progress("machine limits")
    results["machine"] = machine_limits(directory, settings)
    phases: list[dict] = []
    for name, phase in (
        ("nodi", nodi_phases),
        ("persist-queue", persist_queue_phases),
        ("litequeue", litequeue_phases),
    ):
        progress(name)
        place = os.path.join(directory, name)
        os.makedirs(place)
        found = phase(place, settings)
        if isinstance(found, str):
            results["skipped"].append(found)
        else:
            phases += found
        shutil.rmtree(place, ignore_errors=True)
    results["phases"] = phases
    results["ratios"] = ratios(results)
    results["load_average_end"] = os.getloadavg()
    return results


def render(results: dict) -> str:
    machine = results["machine"]
    lines = [
        "machine: fdatasync of a 1 KiB write {fdatasync_1kib_per_s}/s (p50 {fdatasync_latency_ms_p50} ms, "
        "p99 {fdatasync_latency_ms_p99} ms); raw sequential write {raw_sequential_mb_per_s} MB/s; "
        "SQLite {sqlite_version}".format(**machine),
        "load average: start {} end {}".format(
            " ".join(f"{value:.2f}" for value in results["load_average_start"]),
            " ".join(f"{value:.2f}" for value in results["load_average_end"]),
        ),
        "",
        f"{'phase':48} {'messages':>9} {'seconds':>8} {'msg/s':>10}",
    ]
    for row in results["phases"]:
        lines.append(f"{row['phase']:48} {row['messages']:>9} {row['seconds']:>8.2f} {row['per_s']:>10.1f}")
    lines.append("")
    for row in results["ratios"]:
        lines.append(
            f"{row['comparison']}: {row['nodi']} {row['nodi_per_s']:.0f}/s vs {row['best_other']} "
            f"{row['best_other_per_s']:.0f}/s = {row['ratio']}x"
        )
    lines += [f"skipped: {reason}" for reason in results["skipped"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--messages", type=int, help="messages per phase, at most")
    parser.add_argument("--seconds", type=float, help="seconds per phase, at most")
    parser.add_argument("--json-out", help="write the results as JSON to this file")
    arguments = parser.parse_args(argv)
    settings = QUICK if arguments.quick else FULL
    if arguments.messages is not None or arguments.seconds is not None:
        settings = Settings(
            messages=arguments.messages or settings.messages,
            seconds=arguments.seconds or settings.seconds,
            batch=settings.batch,
            raw_seconds=settings.raw_seconds,
            raw_bytes=settings.raw_bytes,
        )
    parent = storage_bench.default_data_parent()
    os.makedirs(parent, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="nodi-embedded-bench-", dir=parent)
    try:
        results = run(directory, settings)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(directory)
    print(render(results))
    if arguments.json_out:
        with open(arguments.json_out, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
