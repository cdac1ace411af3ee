"""The per-connection read limits and the total connection limit, on both listeners
(broker/server/read_throttle.py, docs/security.md "Limits"): past a limit reading waits
(counted on nodi_reads_throttled), nothing is refused or dropped; one connection over
connections_total_max, of either listener, is refused. Counts, never timings."""

from __future__ import annotations

import asyncio
import re
import struct
import time
import urllib.request
from collections.abc import Iterator

import pytest

from nodi.broker.kafka.apis import APIS
from nodi.broker.kafka.schema import Reader, decode, encode
from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode
from nodi.broker.server.read_throttle import ReadThrottle, ThrottleCounts
from nodi.storage import records

from conftest import BrokerProcess
from test_server import RawClient

KAFKA_LINE = re.compile(r"nodi kafka listener on ([\d.]+):(\d+)")
RATE = 100  # requests a second per connection, and so the burst
TOTAL = 4  # connections_total_max
PIPELINED = 150  # requests sent at once: past the burst, under nodi's in_flight_requests_max


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    directory = tmp_path_factory.mktemp("limits")
    config = directory / "nodi.toml"
    config.write_text(
        "[security]\n"
        "connection_in_flight_bytes_max = 1\n"  # every read after a request waits for its answer
        f"connection_requests_per_second_max = {RATE}\n"
        f"connections_total_max = {TOTAL}\n"
    )
    process = BrokerProcess(
        str(directory / "data"), ["--kafka-port", "0", "--config", str(config)], metrics=True
    ).start()
    found = next(KAFKA_LINE.search(line) for line in process.output if KAFKA_LINE.search(line))
    assert found is not None  # next() yields only matches
    process.kafka = (found.group(1), int(found.group(2)))  # type: ignore[attr-defined]
    yield process
    process.stop()


def _metrics(broker) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("nodi_") and " " in line
    }


def _throttled(broker, listener: str, reason: str) -> float:
    return _metrics(broker)[f'nodi_reads_throttled_total{{listener="{listener}",reason="{reason}"}}']


def _kafka_frame(correlation: int, key: int = 18, version: int = 2, body: dict | None = None) -> bytes:
    parts = [struct.pack(">hhih", key, version, correlation, 4), b"test"]
    encode(APIS[key].request, version, body or {}, parts)
    frame = b"".join(parts)
    return struct.pack(">i", len(frame)) + frame


class RawKafka:
    def __init__(self, address) -> None:
        import socket

        self.socket = socket.create_connection(address, timeout=20)
        self.buffer = b""

    def answers(self, count: int) -> list[int]:
        """The correlation ids of the next `count` responses."""
        ids: list[int] = []
        while len(ids) < count:
            while len(self.buffer) < 4 or len(self.buffer) < 4 + struct.unpack_from(">i", self.buffer)[0]:
                chunk = self.socket.recv(1 << 20)
                if not chunk:
                    raise ConnectionError(f"closed after {len(ids)} answers")
                self.buffer += chunk
            size = struct.unpack_from(">i", self.buffer)[0]
            frame, self.buffer = self.buffer[4 : 4 + size], self.buffer[4 + size :]
            ids.append(struct.unpack_from(">i", frame)[0])
            decode(APIS[18].response, 2, Reader(memoryview(frame), 1000, 4))
        return ids

    def close(self) -> None:
        self.socket.close()


def _pipeline_nodi(client: RawClient, requests: list[m.Request]) -> list:
    client.socket.sendall(b"".join(client.connection.send(request) for request in requests))
    return [client.next_message() for _ in requests]


def test_the_throttle_holds_reads_until_answers_drain():
    """In process: past the bytes limit wait() does not return until answered()."""

    async def run() -> tuple[bool, bool, dict]:
        counts = ThrottleCounts()
        throttle = ReadThrottle("nodi", 100, 1_000_000, counts)
        throttle.started(60)
        await asyncio.wait_for(throttle.wait(), 1)  # at the limit or under it: reads on
        throttle.started(60)
        waiting = asyncio.ensure_future(throttle.wait())
        for _ in range(10):
            await asyncio.sleep(0)
        held = not waiting.done()
        throttle.answered(60)
        await asyncio.wait_for(waiting, 1)
        return held, waiting.done(), counts.counts

    held, released, counts = asyncio.run(run())
    assert held and released
    assert counts[("nodi", "bytes_in_flight")] == 1 and counts[("nodi", "request_rate")] == 0


def test_nodi_bytes_in_flight_and_rate_delay_reading_and_lose_nothing(limited):
    before_bytes = _throttled(limited, "nodi", "bytes_in_flight")
    before_rate = _throttled(limited, "nodi", "request_rate")
    client = RawClient((limited.host, limited.port)).handshake()
    try:
        assert client.call(m.CreateTopicRequest, name="limits").error_code == ErrorCode.NONE
        batch = records.build_batch([records.NewRecord(None, b"x" * 100_000)])
        produced = _pipeline_nodi(
            client,
            [
                m.ProduceRequest(
                    request_id=client.connection.next_request_id(), topic="limits", partition=0, records=batch
                )
                for _ in range(20)
            ],
        )
        assert sorted(response.base_offset for response in produced) == list(range(20))
        listed = _pipeline_nodi(
            client, [m.ListTopicsRequest(request_id=client.connection.next_request_id()) for _ in range(PIPELINED)]
        )
        assert all(response.error_code == ErrorCode.NONE for response in listed)
    finally:
        client.close()
    assert _throttled(limited, "nodi", "bytes_in_flight") > before_bytes
    assert _throttled(limited, "nodi", "request_rate") > before_rate


def test_kafka_bytes_in_flight_and_rate_delay_reading_and_lose_nothing(limited):
    before_bytes = _throttled(limited, "kafka", "bytes_in_flight")
    before_rate = _throttled(limited, "kafka", "request_rate")
    raw = RawKafka(limited.kafka)
    try:
        raw.socket.sendall(b"".join(_kafka_frame(correlation) for correlation in range(PIPELINED)))
        assert raw.answers(PIPELINED) == list(range(PIPELINED))  # every one answered, in order
    finally:
        raw.close()
    assert _throttled(limited, "kafka", "bytes_in_flight") > before_bytes
    assert _throttled(limited, "kafka", "request_rate") > before_rate


def test_connections_total_max_counts_both_listeners(limited):
    deadline = time.monotonic() + 10
    while _metrics(limited)["nodi_connections_total"] > 0:  # earlier tests' connections, once noticed closed
        assert time.monotonic() < deadline, "connections of earlier tests still counted"
        time.sleep(0.05)
    before = _metrics(limited)["nodi_connections_total_refused_total"]
    nodi = [RawClient((limited.host, limited.port)).handshake() for _ in range(2)]
    kafka = [RawKafka(limited.kafka) for _ in range(2)]
    try:
        for index, connection in enumerate(kafka):
            connection.socket.sendall(_kafka_frame(index))
            assert connection.answers(1) == [index]
        refused = RawClient((limited.host, limited.port))
        closing = refused.next_message()
        assert isinstance(closing, m.ClosingEvent) and closing.error_code == ErrorCode.LIMIT_EXCEEDED
        refused.close()
        extra = RawKafka(limited.kafka)
        extra.socket.sendall(_kafka_frame(9))
        with pytest.raises(ConnectionError):
            extra.answers(1)
        extra.close()
        assert _metrics(limited)["nodi_connections_total_refused_total"] == before + 2
        assert nodi[0].call(m.ListTopicsRequest).error_code == ErrorCode.NONE  # the kept ones serve on
    finally:
        for client in nodi + kafka:
            client.close()
