"""The request path's series (nodi_requests, nodi_errors, the latency histograms, the
message and byte counters) as a real server exports them after requests of several
kinds, and held against prometheus-client's own Counter and Histogram (what they were
before issue 12 made them plain counters read at scrape time): the same exposition,
byte for byte, for the same observations."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode
from nodi.broker.server.metrics import LATENCY_BUCKETS_S, Metrics, RequestMetrics
from nodi.broker.server.reply import Reply
from nodi.storage import records
from nodi.storage.log import FileSlice

from test_ops_metrics import scrape, value
from test_server import RawClient

# prometheus-client's `le` labels for LATENCY_BUCKETS_S, as a scraper sees them.
EXPECTED_LE = [
    "0.0001",
    "0.00025",
    "0.0005",
    "0.001",
    "0.0025",
    "0.005",
    "0.01",
    "0.025",
    "0.05",
    "0.1",
    "0.25",
    "0.5",
    "1.0",
    "2.5",
    "5.0",
    "10.0",
    "30.0",
    "+Inf",
]


def _batch(*values: bytes) -> bytes:
    return records.build_batch([records.NewRecord(None, value) for value in values])


def _buckets(samples, name: str, **labels) -> list[tuple[str, float]]:
    """The `le` and cumulative count of each bucket of one series, in exported order."""
    return [
        (sample_labels["le"], count)
        for sample_labels, count in samples[name + "_bucket"]
        if {key: value for key, value in sample_labels.items() if key != "le"} == labels
    ]


def _check_histogram(samples, name: str, count: int, **labels) -> None:
    buckets = _buckets(samples, name, **labels)
    assert [le for le, _ in buckets] == EXPECTED_LE
    counts = [cumulative for _, cumulative in buckets]
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == value(samples, name + "_count", **labels) == count
    assert value(samples, name + "_sum", **labels) > 0


def test_a_real_server_counts_each_request_and_buckets_its_latency(broker_factory):
    process = broker_factory()
    process.metrics = True
    process.start()
    client = RawClient((process.host, process.port)).handshake()
    try:
        assert client.call(m.CreateTopicRequest, name="counted").error_code == ErrorCode.NONE
        produced_bytes = 0
        # Durable last: fetches see up to the high watermark, the offsets fsynced.
        for acks, values in (
            (m.Acks.WRITTEN, (b"a",)),
            (m.Acks.NONE, (b"b", b"c")),
            (m.Acks.DURABLE, (b"d", b"e")),
            (m.Acks.DURABLE, (b"f",)),
            (m.Acks.DURABLE, (b"g", b"h", b"i")),
        ):
            batch = _batch(*values)
            produced_bytes += len(batch)
            reply = client.call(m.ProduceRequest, topic="counted", partition=0, acks=acks, records=batch)
            assert reply.error_code == ErrorCode.NONE
        for _ in range(4):
            assert client.call(m.ListOffsetsRequest, topic="counted", partition=0).error_code == ErrorCode.NONE
        for _ in range(2):  # offset 0 with room for every batch: all 9 records, each time
            fetched = client.call(m.FetchRequest, topic="counted", partition=0, offset=0)
            assert fetched.error_code == ErrorCode.NONE and fetched.high_watermark == 9
        absent = client.call(m.ProduceRequest, topic="absent", partition=0, records=_batch(b"x"))
        assert absent.error_code == ErrorCode.UNKNOWN_TOPIC
        absent = client.call(m.FetchRequest, topic="absent", partition=0, offset=0)
        assert absent.error_code == ErrorCode.UNKNOWN_TOPIC
        samples = scrape(process.metrics_port)
    finally:
        client.close()
        process.stop()

    requests = {
        ("create_topic", "none"): 1,
        ("produce", "none"): 5,
        ("produce", "unknown_topic"): 1,
        ("list_offsets", "none"): 4,
        ("fetch", "none"): 2,
        ("fetch", "unknown_topic"): 1,
    }
    for (api, error), count in requests.items():
        assert value(samples, "nodi_requests_total", api=api, error=error) == count
    assert value(samples, "nodi_errors_total", code="unknown_topic") == 2
    for api in ("create_topic", "produce", "list_offsets", "fetch"):
        count = sum(number for (name, _), number in requests.items() if name == api)
        _check_histogram(samples, "nodi_request_latency_seconds", count, api=api)
    _check_histogram(samples, "nodi_produce_latency_seconds", 3, topic="counted", acks="durable")
    _check_histogram(samples, "nodi_produce_latency_seconds", 1, topic="counted", acks="written")
    _check_histogram(samples, "nodi_produce_latency_seconds", 1, topic="counted", acks="none")
    _check_histogram(samples, "nodi_produce_latency_seconds", 1, topic="absent", acks="durable")
    _check_histogram(samples, "nodi_fetch_latency_seconds", 2, topic="counted")
    _check_histogram(samples, "nodi_fetch_latency_seconds", 1, topic="absent")
    assert value(samples, "nodi_messages_in_total", topic="counted") == 9  # acks none's counted from its batch
    assert value(samples, "nodi_bytes_in_total", topic="counted") == produced_bytes
    assert value(samples, "nodi_messages_out_total", topic="counted") == 2 * 9
    assert value(samples, "nodi_bytes_out_total", topic="counted") == 2 * produced_bytes
    for name in ("nodi_messages_in_total", "nodi_bytes_in_total", "nodi_messages_out_total", "nodi_bytes_out_total"):
        assert [labels for labels, _ in samples[name]] == [{"topic": "counted"}], name


class _Reference:
    """The request series as prometheus-client objects, fed as Metrics.observe fed them
    before issue 12."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "nodi_requests",
            "Requests answered, by API and error code (`none` on success)",
            ["api", "error"],
            registry=registry,
        )
        self.errors = Counter(
            "nodi_errors",
            "Errors answered or closing a connection, by error code (lower-case name)",
            ["code"],
            registry=registry,
        )
        self.latency = Histogram(
            "nodi_request_latency_seconds",
            "Request decoded to reply ready, every API",
            ["api"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.produce_latency = Histogram(
            "nodi_produce_latency_seconds",
            'Produce decoded to reply ready; `acks="durable"` includes the fsync (group commit)',
            ["topic", "acks"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.fetch_latency = Histogram(
            "nodi_fetch_latency_seconds",
            "Fetch decoded to reply ready, long-poll wait included (an idle consumer's fetches take `wait_ms`)",
            ["topic"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.messages_in = Counter("nodi_messages_in", "Records appended (offsets taken)", ["topic"], registry=registry)
        self.bytes_in = Counter("nodi_bytes_in", "Record batch bytes appended", ["topic"], registry=registry)
        self.messages_out = Counter(
            "nodi_messages_out",
            "Records in the batches sent to consumers (whole batches: a fetch from inside a batch counts all of it)",
            ["topic"],
            registry=registry,
        )
        self.bytes_out = Counter("nodi_bytes_out", "Record batch bytes sent to consumers", ["topic"], registry=registry)


def _slice(first_offset: int, last_offset: int, length: int) -> FileSlice:
    return FileSlice(file=None, position=0, length=length, first_offset=first_offset, last_offset=last_offset)  # type: ignore[arg-type]


def test_the_exposition_is_prometheus_clients_for_the_same_observations():
    """Latencies on every bucket bound (`le` is inclusive), between them, past the last;
    produces of each acks, fetches with and without batches, errors, a connection error
    counted alone: the text a scrape gets is the same as prometheus-client's."""
    metrics = Metrics("127.0.0.1", -1)
    reference = _Reference()
    latencies = [bound for bound in LATENCY_BUCKETS_S] + [0.0, 0.00003, 0.0007, 0.3, 29.9, 31.0, 3600.0]
    batch = _batch(b"one", b"two", b"three")
    for number, seconds in enumerate(latencies):
        topic = f"topic-{number % 3}"
        acks = list(m.Acks)[number % 3]
        produce = m.ProduceRequest(request_id=number, topic=topic, partition=0, acks=acks, records=batch)
        if acks is m.Acks.NONE:
            produced = m.ProduceResponse(request_id=number)
        else:
            produced = m.ProduceResponse(request_id=number, base_offset=10 * number, last_offset=10 * number + 2)
        failed = number % 5 == 4
        if failed:
            produced = m.ProduceResponse(request_id=number, error_code=ErrorCode.READ_ONLY_LOG)
        metrics.observe(produce, Reply(produced), seconds)
        api = "produce"
        error = "read_only_log" if failed else "none"
        reference.requests.labels(api, error).inc()
        reference.latency.labels(api).observe(seconds)
        reference.produce_latency.labels(topic, acks.name.lower()).observe(seconds)
        if failed:
            reference.errors.labels(error).inc()
        else:
            reference.bytes_in.labels(topic).inc(len(batch))
            reference.messages_in.labels(topic).inc(3)

        fetch = m.FetchRequest(request_id=number, topic=topic, partition=0, offset=0)
        slices = (_slice(0, 2, 100), _slice(3, 3, 40)) if number % 2 else ()
        metrics.observe(fetch, Reply(m.FetchResponse(request_id=number), slices), seconds / 2)
        reference.requests.labels("fetch", "none").inc()
        reference.latency.labels("fetch").observe(seconds / 2)
        reference.fetch_latency.labels(topic).observe(seconds / 2)
        reference.bytes_out.labels(topic).inc(140 if slices else 0)
        if slices:
            reference.messages_out.labels(topic).inc(4)

        listed = m.ListOffsetsResponse(request_id=number, error_code=ErrorCode.UNKNOWN_TOPIC if failed else 0)
        metrics.observe(m.ListOffsetsRequest(request_id=number, topic=topic, partition=0), Reply(listed), seconds)
        reference.requests.labels("list_offsets", "unknown_topic" if failed else "none").inc()
        reference.latency.labels("list_offsets").observe(seconds)
        if failed:
            reference.errors.labels("unknown_topic").inc()
    metrics.count_error(ErrorCode.FRAME_TOO_LARGE)
    reference.errors.labels("frame_too_large").inc()

    assert generate_latest(metrics.registry).decode() == generate_latest(reference.registry).decode()


def test_a_scrape_sees_every_series_at_one_moment_while_requests_are_observed():
    """Scrapes on another thread while the observing thread counts: every scrape's
    nodi_requests_total adds up to its latency histogram's count, and that is its +Inf
    bucket (one lock guards the additions and the scrape's copy)."""
    request_metrics = RequestMetrics()
    request = m.ListOffsetsRequest(request_id=1, topic="t", partition=0)
    reply = Reply(m.ListOffsetsResponse(request_id=1))
    stop = threading.Event()

    def observe() -> None:
        while not stop.is_set():
            for _ in range(100):
                request_metrics.observe(request, reply, 0.0003)

    observer = threading.Thread(target=observe)
    observer.start()
    registry = CollectorRegistry()
    registry.register(request_metrics)
    try:
        seen = []
        for _ in range(50):
            families = {
                family.name: family for family in text_string_to_metric_families(generate_latest(registry).decode())
            }
            samples = {
                (sample.name, sample.labels.get("le")): sample.value
                for sample in families["nodi_request_latency_seconds"].samples
            }
            requests = sum(sample.value for sample in families["nodi_requests"].samples)
            count = samples.get(("nodi_request_latency_seconds_count", None), 0.0)
            assert requests == count == samples.get(("nodi_request_latency_seconds_bucket", "+Inf"), 0.0)
            # Each observation 0.3 ms: bucket 0.0005 and up, and the sum to match the count.
            assert samples.get(("nodi_request_latency_seconds_bucket", "0.00025"), 0.0) == 0
            assert samples.get(("nodi_request_latency_seconds_bucket", "0.0005"), 0.0) == count
            assert samples.get(("nodi_request_latency_seconds_sum", None), 0.0) == pytest.approx(count * 0.0003)
            seen.append(count)
    finally:
        stop.set()
        observer.join()
    assert seen == sorted(seen) and seen[-1] > 0
