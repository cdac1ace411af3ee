#!/usr/bin/env python3
"""The Kafka listener beside nodi's own client, on one broker, in one run (issue 13).

    .venv/bin/python -m tools.kafka_bench                  # 100,000 x 1 KiB, 4 partitions
    .venv/bin/python -m tools.kafka_bench --messages 20000 # quicker

Starts its own `nodi serve --kafka-port` (127.0.0.1, free ports, a temporary data
directory beside the repository, stopped by pid) and measures, each on a topic of its
own (fsync policy "always", the default):

- produce: confluent-kafka (librdkafka) with acks=all, idempotence on, linger 5 ms,
  1 KiB values, through the Kafka listener; nodi's own batching producer (acks
  durable, linger 5 ms) through nodi's protocol. From the first send to the flush that
  returns once every message is acknowledged.
- consume: each client reads its topic from the start to the end (confluent-kafka's
  Consumer assigned every partition; nodi's Consumer without a group), timed from the
  first message received (each client's start-up left out).
- the machine's limits in the same run: fdatasync latency and rate of 64 KiB writes,
  raw sequential write bandwidth, and the loopback round trip.

Prints a table with the ratios (Kafka listener / nodi client) and the client and server
CPU seconds of each phase. Nothing is asserted: timings on a shared machine vary; the
ratios, measured minutes apart on the same broker, are the figure to read.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import sys
import tempfile
import threading
import time

from tools import storage_bench
from tools.broker_bench_common import NodiServer, cpu_seconds_of, free_loopback_port

MB = 1_000_000


def loopback_round_trip_us(rounds: int = 2000) -> float:
    """Median microseconds of a 1-byte TCP ping-pong over 127.0.0.1."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def echo() -> None:
        connection, _ = listener.accept()
        with connection:
            while data := connection.recv(1):
                connection.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    samples = []
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            started = time.perf_counter()
            client.sendall(b"x")
            client.recv(1)
            samples.append(time.perf_counter() - started)
    thread.join(2)
    listener.close()
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def create_topic(address: str, topic: str, partitions: int) -> None:
    from nodi.broker import Client

    with Client(address) as client:
        client.create_topic(topic, partitions)


def confluent_produce(
    bootstrap: str, topic: str, messages: int, value: bytes, extra: dict | None = None, *, errors_only: bool = False
) -> float:
    """`extra`: more librdkafka settings (security, for tools/tls_bench.py). `errors_only`:
    librdkafka's `delivery.report.only.error`, so the Python callback runs for failed
    messages only (every message is still acknowledged at acks=all before flush returns)."""
    from confluent_kafka import Producer

    producer = Producer(
        {
            **(extra or {}),
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "queue.buffering.max.messages": 1_000_000,
            "delivery.report.only.error": errors_only,
        }
    )
    producer.produce(topic, b"warm-up")
    producer.flush(30)
    errors: list[object] = []

    def delivered(error, _message) -> None:
        if error is not None:
            errors.append(error)

    started = time.perf_counter()
    for index in range(messages):
        while True:
            try:
                producer.produce(topic, value, key=str(index).encode(), on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.001)
        if index % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    seconds = time.perf_counter() - started
    if remaining or errors:
        raise RuntimeError(f"confluent-kafka: {remaining} not delivered, {len(errors)} errors: {errors[:3]}")
    return seconds


def nodi_produce(address: str, topic: str, messages: int, value: bytes) -> float:
    from nodi.broker import Client

    with Client(address) as client:
        producer = client.producer(linger_ms=5)
        producer.send(topic, b"warm-up").result(30)
        started = time.perf_counter()
        for index in range(messages):
            producer.send(topic, value, key=str(index).encode())
        producer.flush(120_000)
        seconds = time.perf_counter() - started
        producer.close()
    return seconds


def confluent_consume(bootstrap: str, topic: str, partitions: int, messages: int, extra: dict | None = None) -> float:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            **(extra or {}),
            "bootstrap.servers": bootstrap,
            "group.id": "kafka-bench-unused",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, partition, 0) for partition in range(partitions)])
    count = 0
    started = None  # timed from the first message: librdkafka's start-up is not the listener's
    deadline = time.perf_counter() + 120
    while count < messages and time.perf_counter() < deadline:
        # Never ask for more than is left: consume(n, timeout) returns only when it has n
        # messages or the timeout has passed, so asking for 10,000 when fewer are left
        # timed the 0.5 s timeout, not the listener (0.6 s of a 0.1 s read at 100 MB).
        for message in consumer.consume(min(10_000, messages - count), 0.5):
            if message.error() is None:
                started = started or time.perf_counter()
                count += 1
    seconds = time.perf_counter() - (started or 0.0)
    consumer.close()
    if count < messages:
        raise RuntimeError(f"confluent-kafka consumed {count} of {messages}")
    return seconds


def nodi_consume(address: str, topic: str, messages: int) -> float:
    from nodi.broker import Client

    with Client(address) as client, client.consumer(topic, start="earliest") as consumer:
        count = 0
        started = None  # timed from the first message, as for confluent-kafka
        deadline = time.perf_counter() + 120
        while count < messages and time.perf_counter() < deadline:
            got = len(consumer.poll(500))
            if got and started is None:
                started = time.perf_counter()
            count += got
        seconds = time.perf_counter() - (started or 0.0)
    if count < messages:
        raise RuntimeError(f"nodi consumed {count} of {messages}")
    return seconds


def phase(server: NodiServer, run) -> tuple[float, float, float]:
    """(seconds, client CPU s, server CPU s) of `run()`."""
    client_cpu, server_cpu = time.process_time(), cpu_seconds_of(server.pid) or 0.0
    seconds = run()
    return seconds, time.process_time() - client_cpu, (cpu_seconds_of(server.pid) or 0.0) - server_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--value-bytes", type=int, default=1024)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="each phase this often; the median is shown")
    arguments = parser.parse_args()
    messages, partitions = arguments.messages, arguments.partitions
    value = os.urandom(arguments.value_bytes)
    parent = storage_bench.default_data_parent()
    with tempfile.TemporaryDirectory(prefix="kafka-bench-", dir=parent) as directory:
        limits_directory = os.path.join(directory, "limits")
        os.makedirs(limits_directory)
        fsync = storage_bench.raw_fdatasync_loop(limits_directory, 64 * 1024, 1, 2.0)
        sequential = storage_bench.raw_sequential_write(limits_directory, 256 * 1024 * 1024)
        round_trip_us = loopback_round_trip_us()
        kafka_port = free_loopback_port()
        server = NodiServer(directory, extra_args=["--kafka-port", str(kafka_port)], metrics=False)
        address = server.start()
        bootstrap = f"127.0.0.1:{kafka_port}"
        names = (
            "produce, Kafka listener (confluent-kafka acks=all)",
            "produce, nodi client (acks durable)",
            "consume, Kafka listener (confluent-kafka)",
            "consume, nodi client",
            "produce, Kafka listener (confluent-kafka acks=all, delivery reports of errors only)",
        )
        samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
        try:
            for round_number in range(arguments.rounds):
                kafka_topic, nodi_topic = f"bench-kafka-{round_number}", f"bench-nodi-{round_number}"
                quiet_topic = f"bench-kafka-errors-only-{round_number}"
                for topic in (kafka_topic, nodi_topic, quiet_topic):
                    create_topic(address, topic, partitions)
                runs = {
                    names[0]: functools.partial(confluent_produce, bootstrap, kafka_topic, messages, value),
                    names[1]: functools.partial(nodi_produce, address, nodi_topic, messages, value),
                    names[2]: functools.partial(confluent_consume, bootstrap, kafka_topic, partitions, messages + 1),
                    names[3]: functools.partial(nodi_consume, address, nodi_topic, messages + 1),
                    names[4]: functools.partial(
                        confluent_produce, bootstrap, quiet_topic, messages, value, errors_only=True
                    ),
                }
                # Alternate which client goes first: a busy neighbour then hurts both alike.
                order = names if round_number % 2 == 0 else (names[4], names[1], names[0], names[3], names[2])
                for name in order:
                    samples[name].append(phase(server, runs[name]))
                    print(f"round {round_number}: {name}: {samples[name][-1][0]:.2f} s", file=sys.stderr)
        finally:
            server.stop()
    rows = {name: sorted(figures)[len(figures) // 2] for name, figures in samples.items()}  # the median round
    megabytes = messages * len(value) / MB
    print(
        f"\n{messages:,} messages of {len(value)} B, {partitions} partitions, fsync policy always,"
        f" median of {arguments.rounds} rounds\n"
    )
    print("| phase | msg/s | MB/s | client CPU s | server CPU s |")
    print("|---|---|---|---|---|")
    for name, (seconds, client_cpu, server_cpu) in rows.items():
        print(
            f"| {name} | {messages / seconds:,.0f} | {megabytes / seconds:,.1f} | {client_cpu:.2f} | {server_cpu:.2f} |"
        )
    duration = {name: figures[0] for name, figures in rows.items()}
    print()

    def pairs(kafka: str, nodi: str) -> str:
        """The ratio of each round's pair (run minutes apart at most), their median and range:
        steadier on a shared machine than the ratio of the two medians."""
        ratios = sorted(nodi_run[0] / kafka_run[0] for kafka_run, nodi_run in zip(samples[kafka], samples[nodi]))
        return f"pairs: median {ratios[len(ratios) // 2]:.2f}x, {ratios[0]:.2f}-{ratios[-1]:.2f}x"

    print(
        f"produce ratio (Kafka listener / nodi client): {duration[names[1]] / duration[names[0]]:.2f}x"
        f" ({pairs(names[0], names[1])})"
    )
    print(
        "produce ratio, delivery reports of errors only (Kafka listener / nodi client):"
        f" {duration[names[1]] / duration[names[4]]:.2f}x ({pairs(names[4], names[1])})"
    )
    print(
        f"consume ratio (Kafka listener / nodi client): {duration[names[3]] / duration[names[2]]:.2f}x"
        f" ({pairs(names[2], names[3])})"
    )
    print()
    print("The machine's limits, same run:")
    print(
        f"- fdatasync of 64 KiB writes: p50 {fsync['latency_ms_p50']:.2f} ms, p99 {fsync['latency_ms_p99']:.2f} ms,"
        f" {fsync['writes_per_s']:,.0f} writes/s, {fsync['mb_per_s']:,.0f} MB/s"
    )
    print(f"- raw sequential write (256 MiB + fdatasync): {sequential['mb_per_s']:,.0f} MB/s")
    print(f"- loopback TCP round trip (1 byte, median): {round_trip_us:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
