#!/usr/bin/env python3
"""What TLS costs: durable produce and consume of the same workload against two
`nodi serve` processes started side by side, one plaintext, one with TLS (a
self-signed certificate made with the openssl binary) and a users file (the client
authenticates), in alternating rounds, beside this machine's raw write+fdatasync rate.

    .venv/bin/python -m tools.tls_bench             # 3 rounds of 100,000 x 1 KiB
    .venv/bin/python -m tools.tls_bench --quick     # smoke run, seconds
    .venv/bin/python -m tools.tls_bench --no-kafka  # nodi's protocol only

The workload is broker_bench's (tools/broker_bench.py: one AsyncClient, the batching
producer, acks=durable, fsync=always, linger 5 ms; a consumer from earliest with 1 MiB
fetches). With confluent-kafka installed, each round also runs kafka_bench's confluent-kafka
produce (acks=all, idempotent, linger 5 ms) and consume (assigned, from offset 0) against
each broker's Kafka listener: PLAINTEXT beside SASL_SSL with SCRAM-SHA-256. Figures are medians over the rounds; the ratio TLS / plaintext is taken per
round (both servers measured within seconds of each other) and its median reported.
docs/benchmarks.md keeps the figures. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from nodi.broker import AsyncClient, client_tls_context
from nodi.broker.client.producer import producer_options
from nodi.broker.server.users import Users, save_users
from nodi.storage.limits import KIB
from tools import storage_bench
from tools.broker_bench import nodi_consume, nodi_produce, one_message_batch_bytes
from tools.broker_bench_common import NodiServer, Settings, free_loopback_port, progress

PASSWORD = "tls-bench-password"


def make_certificate(directory: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA), with the openssl binary."""
    cert, key = os.path.join(directory, "server.pem"), os.path.join(directory, "server.key")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=nodi-tls-bench",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


async def one_side(address: str, tls, settings: Settings, topic: str) -> dict:
    value = os.urandom(settings.value_bytes)
    user, password = ("bench", PASSWORD) if tls is not None else (None, None)
    async with AsyncClient(address, timeout_ms=60_000, tls=tls or False, user=user, password=password) as client:
        await client.create_topic(topic, partitions=settings.partitions, fsync_policy="always")
        produced = await nodi_produce(client, topic, settings, value)
        consumed = await nodi_consume(client, topic, produced["messages"], settings, settings.value_bytes)
        await client.delete_topic(topic)
    return {"produce": produced["msg_per_s"], "consume": consumed["msg_per_s"]}


def kafka_side(address: str, bootstrap: str, tls, ca: str, settings: Settings, topic: str) -> dict:
    """confluent-kafka through the Kafka listener: SASL_SSL (SCRAM-SHA-256) when `tls`."""
    from nodi.broker import Client
    from tools.kafka_bench import confluent_consume, confluent_produce

    value = os.urandom(settings.value_bytes)
    user, password = ("bench", PASSWORD) if tls is not None else (None, None)
    extra = {}
    if tls is not None:
        extra = {
            "security.protocol": "SASL_SSL",
            "ssl.ca.location": ca,
            "sasl.mechanism": "SCRAM-SHA-256",
            "sasl.username": "bench",
            "sasl.password": PASSWORD,
        }
    with Client(address, timeout_ms=60_000, tls=tls or False, user=user, password=password) as client:
        client.create_topic(topic, partitions=settings.partitions, fsync_policy="always")
    produce_s = confluent_produce(bootstrap, topic, settings.messages, value, extra)
    consume_s = confluent_consume(bootstrap, topic, settings.partitions, settings.messages + 1, extra)  # + warm-up
    with Client(address, timeout_ms=60_000, tls=tls or False, user=user, password=password) as client:
        client.delete_topic(topic)
    return {"kafka_produce": settings.messages / produce_s, "kafka_consume": settings.messages / consume_s}


def run(settings: Settings, directory: str, kafka: bool = False) -> dict:
    cert, key = make_certificate(directory)
    users_file = os.path.join(directory, "users.toml")
    save_users(users_file, Users().with_password("bench", PASSWORD, superuser=True))
    kafka_ports = (free_loopback_port(), free_loopback_port()) if kafka else None
    plain = NodiServer(
        os.path.join(directory, "plain"),
        metrics=False,
        extra_args=["--kafka-port", str(kafka_ports[0])] if kafka_ports else [],
    )
    secure = NodiServer(
        os.path.join(directory, "tls"),
        metrics=False,
        extra_args=["--config", _config(directory, cert, key, users_file)]
        + (["--kafka-port", str(kafka_ports[1])] if kafka_ports else []),
    )
    phases = ("produce", "consume") + (("kafka_produce", "kafka_consume") if kafka else ())
    for server in (plain, secure):
        os.makedirs(server.directory, exist_ok=True)
    rounds: list[dict] = []
    try:
        plain_address, secure_address = plain.start(), secure.start()
        tls = client_tls_context(cert)
        for number in range(settings.rounds):
            one: dict = {}
            order = [("plaintext", plain_address, None), ("tls", secure_address, tls)]
            if number % 2:
                order.reverse()  # neither side always runs first
            for name, address, context in order:
                progress(f"round {number}: {name} produce + consume {settings.messages:,} x {settings.value_bytes} B")
                one[name] = asyncio.run(one_side(address, context, settings, f"tls-bench-{number}"))
                progress(f"  produce {one[name]['produce']:,.0f} msg/s, consume {one[name]['consume']:,.0f} msg/s")
            if kafka_ports is not None:
                sides = [
                    ("plaintext", plain_address, kafka_ports[0], None),
                    ("tls", secure_address, kafka_ports[1], tls),
                ]
                if number % 2:
                    sides.reverse()
                for name, address, port, context in sides:
                    progress(f"round {number}: {name} confluent-kafka produce + consume through the Kafka listener")
                    figures = kafka_side(address, f"127.0.0.1:{port}", context, cert, settings, f"tls-kafka-{number}")
                    one[name].update(figures)
                    progress(
                        f"  produce {figures['kafka_produce']:,.0f} msg/s, consume {figures['kafka_consume']:,.0f} msg/s"
                    )
            loop = storage_bench.raw_fdatasync_loop(
                directory, one_message_batch_bytes(settings.value_bytes) * 64, 64, settings.raw_loop_seconds
            )
            one["raw_fdatasync_per_s"] = loop["writes_per_s"]
            rounds.append(one)
    finally:
        plain.stop()
        secure.stop()
    summary: dict[str, object] = {}
    for phase in phases:
        summary[phase] = {
            "plaintext_msg_per_s": statistics.median(r["plaintext"][phase] for r in rounds),
            "tls_msg_per_s": statistics.median(r["tls"][phase] for r in rounds),
            "tls_over_plaintext": statistics.median(r["tls"][phase] / r["plaintext"][phase] for r in rounds),
        }
    summary["raw_fdatasync_64_messages_per_s"] = statistics.median(r["raw_fdatasync_per_s"] for r in rounds)
    from tools.kafka_bench import loopback_round_trip_us

    summary["loopback_round_trip_us"] = loopback_round_trip_us()
    return {"rounds": rounds, "summary": summary, "cpus": os.cpu_count()}


def _have_confluent_kafka() -> bool:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        print("tls_bench: confluent-kafka is not installed: the Kafka listener phases are skipped", file=sys.stderr)
        return False
    return True


def _config(directory: str, cert: str, key: str, users_file: str) -> str:
    path = os.path.join(directory, "tls.toml")
    with open(path, "w") as file:
        file.write(f'[security]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\nusers_file = "{users_file}"\n')
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tls_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5,000 messages, 1 round")
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--no-kafka", action="store_true", help="skip the Kafka listener (confluent-kafka) phases")
    arguments = parser.parse_args(argv)
    if shutil.which("openssl") is None:
        print("tls_bench: the openssl binary is needed to make the certificate", file=sys.stderr)
        return 2
    quick = arguments.quick
    settings = Settings(
        messages=arguments.messages or (5_000 if quick else 100_000),
        value_bytes=1 * KIB,
        partitions=1,
        batch_bytes_max=producer_options()["batch_bytes_max"],
        phase_seconds_max=10.0 if quick else 60.0,
        latency_rate=0,
        latency_seconds=0,
        latency_warmup=0,
        latency_linger_ms=0,
        raw_loop_seconds=0.3 if quick else 2.0,
        rounds=arguments.rounds or (1 if quick else 3),
        quick=quick,
    )
    directory = tempfile.mkdtemp(prefix="nodi-tls-bench-", dir=os.getcwd())  # a real disk, not tmpfs
    try:
        results = run(settings, directory, kafka=not arguments.no_kafka and _have_confluent_kafka())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(results["summary"], indent=2))
    if arguments.json_out:
        with open(arguments.json_out, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
