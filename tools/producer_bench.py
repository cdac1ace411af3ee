#!/usr/bin/env python3
"""Focused produce throughput of the batching producer (the client's hot path).

    .venv/bin/python -m tools.producer_bench               # 1 KiB and 100 B, durable and written
    .venv/bin/python -m tools.producer_bench --messages 50000 --cases 1024:durable

Starts its own `nodi serve` (127.0.0.1, a free port, a temporary data directory beside
the repository, stopped by pid), then for each case creates a topic of one partition
(fsync "always" for acks "durable", "never" for "written"), sends --messages values
through AsyncProducer (default options: linger 5 ms, 256 KiB batches, idempotent) and
times from the first send to the flush that returns once all are acknowledged. Prints
one line per case: messages per second and the client process's CPU microseconds per
message (the steadier figure on a busy machine). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

from tools.broker_bench_common import NodiServer


async def produce_case(address: str, topic: str, messages: int, value_bytes: int, acks: str) -> tuple[float, float]:
    from nodi.broker import AsyncClient

    value = b"x" * value_bytes
    async with AsyncClient(address) as client:
        await client.create_topic(topic, 1, fsync_policy="always" if acks == "durable" else "never")
        producer = client.producer(acks=acks)
        await producer.send_and_wait(topic, b"warm-up")
        cpu_start, start = time.process_time(), time.perf_counter()
        for _ in range(messages):
            try:
                producer.send(topic, value)
            except Exception:  # BufferFull: wait for room, then send it
                await producer.wait_for_space()
                producer.send(topic, value)
        await producer.flush(timeout_ms=300_000)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        await producer.close()
    return messages / elapsed, cpu / messages * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per case (default 20,000)")
    parser.add_argument(
        "--cases", default="1024:durable,100:durable,1024:written,100:written", help="value_bytes:acks, comma-separated"
    )
    arguments = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="producer-bench-", dir=root) as data_dir:
        server = NodiServer(data_dir, metrics=False)
        address = server.start()
        try:
            for number, case in enumerate(arguments.cases.split(",")):
                value_bytes, acks = case.split(":")
                rate, cpu_us = asyncio.run(
                    produce_case(address, f"bench-{number}", arguments.messages, int(value_bytes), acks)
                )
                print(
                    f"produce {int(value_bytes):>5} B acks={acks:<8} {rate:>10,.0f} msg/s  "
                    f"{cpu_us:6.2f} client CPU us/msg",
                    flush=True,
                )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
