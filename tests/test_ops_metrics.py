"""The Prometheus endpoint scraped during a real workload (produce, fetch, a consumer
group left behind, an error) has the series docs/operations.md documents, with values
that match the workload; `nodi status` shows the same broker as a table and as JSON."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import NODI, BrokerProcess

TOPIC = "orders"
DLQ = "orders.dlq"
GROUP = "billing"
PARTITIONS = 2
PER_PARTITION = 30  # messages produced into each partition of TOPIC
CONSUMED = {0: 30, 1: 12}  # offsets the group commits: partition 1 is left 18 behind
DEAD_LETTERS = 3
VALUE = b"v" * 100
OPERATIONS_DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def scrape(port: int | None) -> dict[str, list]:
    """sample name -> [(labels, value)], from GET /metrics (no proxy: loopback)."""
    assert port is not None, "start the server with metrics=True"  # BrokerProcess.metrics_port
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples, name: str, **labels) -> float:
    """The one sample of `name` whose labels include `labels`."""
    found = [v for sample_labels, v in samples.get(name, []) if labels.items() <= sample_labels.items()]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def total(samples, name: str, **labels) -> float:
    return sum(v for sample_labels, v in samples.get(name, []) if labels.items() <= sample_labels.items())


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """A broker, a workload on it, then one scrape; yields (broker, samples, facts)."""
    from nodi.broker import Client
    from nodi.broker.client.errors import UnknownTopic

    broker = BrokerProcess(str(tmp_path_factory.mktemp("ops") / "data"), metrics=True).start()
    try:
        with Client(broker.address, timeout_ms=30_000) as client:
            client.create_topic(TOPIC, PARTITIONS)
            client.create_topic(DLQ)
            produce_requests = 0
            for partition in range(PARTITIONS):
                for _ in range(PER_PARTITION):
                    client.produce(TOPIC, VALUE, partition=partition, acks="durable")
                    produce_requests += 1
            for number in range(DEAD_LETTERS):
                client.produce(DLQ, f"dead {number}".encode(), partition=0)
            fetched = {}
            for partition, upto in CONSUMED.items():
                messages, offset = [], 0
                while offset < upto:
                    batch = client.fetch(TOPIC, partition, offset)
                    assert batch
                    messages.extend(batch)
                    offset = batch[-1].offset + 1
                fetched[partition] = len(messages)
            client.commit_offsets(GROUP, {(TOPIC, partition): upto for partition, upto in CONSUMED.items()})
            with pytest.raises(UnknownTopic):
                client.produce("no-such-topic", b"x", partition=0)
        samples = scrape(broker.metrics_port)
        facts = {"produce_requests": produce_requests, "fetched": fetched}
        yield broker, samples, facts
    finally:
        if broker.process is not None:
            broker.stop()


def test_documented_series_are_exported(workload):
    _, samples, _ = workload
    documented = set(re.findall(r"^\| `(nodi_[a-z0-9_]+)`", OPERATIONS_DOC.read_text(), re.MULTILINE))
    assert len(documented) >= 25
    exported = set(samples)
    for name in documented:
        if name.startswith(("nodi_queue_", "nodi_compaction_")):
            continue  # other components' series, exported while those components run
        variants = {name, name + "_total", name + "_count", name + "_bucket", name + "_sum"}
        assert variants & exported, f"{name} documented but not exported"
    for name in exported:
        base = re.sub(r"_(total|count|bucket|sum)$", "", name)
        assert name in documented or base in documented, f"{name} exported but not documented"


def test_messages_and_bytes_match_the_workload(workload):
    _, samples, facts = workload
    produced = PARTITIONS * PER_PARTITION
    assert value(samples, "nodi_messages_in_total", topic=TOPIC) == produced
    assert value(samples, "nodi_messages_in_total", topic=DLQ) == DEAD_LETTERS
    log_bytes = total(samples, "nodi_log_bytes", topic=TOPIC)
    assert value(samples, "nodi_bytes_in_total", topic=TOPIC) == log_bytes > produced * len(VALUE)
    # Each fetch sends whole batches (one message each here).
    assert value(samples, "nodi_messages_out_total", topic=TOPIC) == sum(facts["fetched"].values())
    assert value(samples, "nodi_bytes_out_total", topic=TOPIC) == pytest.approx(
        log_bytes * sum(facts["fetched"].values()) / produced
    )
    for partition in range(PARTITIONS):
        assert value(samples, "nodi_log_end_offset", topic=TOPIC, partition=str(partition)) == PER_PARTITION
        assert value(samples, "nodi_log_durable_offset", topic=TOPIC, partition=str(partition)) == PER_PARTITION
        assert value(samples, "nodi_log_start_offset", topic=TOPIC, partition=str(partition)) == 0
        assert value(samples, "nodi_log_segments", topic=TOPIC, partition=str(partition)) == 1
        assert value(samples, "nodi_log_read_only", topic=TOPIC, partition=str(partition)) == 0
        assert value(samples, "nodi_log_corrupt_segments", topic=TOPIC, partition=str(partition)) == 0
    assert value(samples, "nodi_log_end_offset", topic=DLQ, partition="0") == DEAD_LETTERS


def test_consumer_lag_is_what_was_left_unconsumed(workload):
    _, samples, _ = workload
    for partition, upto in CONSUMED.items():
        labels = {"group": GROUP, "topic": TOPIC, "partition": str(partition)}
        assert value(samples, "nodi_consumer_lag", **labels) == PER_PARTITION - upto
        assert value(samples, "nodi_consumer_committed_offset", **labels) == upto


def test_latency_fsync_and_group_commit_histograms_have_observations(workload):
    _, samples, facts = workload
    acks = value(samples, "nodi_produce_latency_seconds_count", topic=TOPIC, acks="durable")
    assert acks == facts["produce_requests"]
    assert value(samples, "nodi_produce_latency_seconds_sum", topic=TOPIC, acks="durable") > 0
    assert value(samples, "nodi_fetch_latency_seconds_count", topic=TOPIC) >= len(CONSUMED)
    for partition in range(PARTITIONS):
        labels = {"topic": TOPIC, "partition": str(partition)}
        fsyncs = value(samples, "nodi_fsyncs_total", **labels)
        assert fsyncs >= 1
        # Every group-commit fsync is timed (roll and close fsyncs too).
        assert value(samples, "nodi_fsync_latency_seconds_count", **labels) >= fsyncs
        assert value(samples, "nodi_fsync_latency_seconds_sum", **labels) > 0
        infinite = value(samples, "nodi_fsync_latency_seconds_bucket", le="+Inf", **labels)
        assert infinite == value(samples, "nodi_fsync_latency_seconds_count", **labels)
        # Durable produces one at a time: each append made durable by some fsync.
        assert value(samples, "nodi_group_commit_appends_sum", **labels) == PER_PARTITION
        assert value(samples, "nodi_fsync_covered_appends_total", **labels) == PER_PARTITION
        assert 1 <= value(samples, "nodi_group_commit_appends_count", **labels) <= PER_PARTITION
        cumulative = sorted(
            (float(bucket["le"]), count)
            for bucket, count in samples["nodi_fsync_latency_seconds_bucket"]
            if bucket["topic"] == TOPIC and bucket["partition"] == str(partition)
        )
        counts = [count for _, count in cumulative]
        assert len(counts) > 2 and counts == sorted(counts)  # cumulative, ending at +Inf


def test_connections_errors_disk_and_server(workload):
    _, samples, _ = workload
    assert value(samples, "nodi_connections_accepted_total") >= 1
    assert value(samples, "nodi_connections_refused_total") == 0
    assert value(samples, "nodi_connections") >= 0
    assert value(samples, "nodi_errors_total", code="unknown_topic") == 1
    assert value(samples, "nodi_requests_total", api="produce", error="unknown_topic") == 1
    free = samples["nodi_disk_free_bytes"][0][1]
    disk_total = samples["nodi_disk_total_bytes"][0][1]
    assert 0 < free <= disk_total
    assert value(samples, "nodi_uptime_seconds") > 0
    ((labels, one),) = samples["nodi_server_info"]
    assert one == 1 and labels["server_id"].startswith("nodi-") and labels["version"]


def test_fsync_pool_and_open_file_budget(workload):
    _, samples, facts = workload
    # One unlabelled series each, whatever the number of partitions.
    for name in ("nodi_fsync_pool_workers", "nodi_partition_files_open", "nodi_partition_file_evictions_total"):
        assert [labels for labels, _ in samples[name]] == [{}], name
    workers_max = value(samples, "nodi_fsync_pool_workers_max")
    workers = value(samples, "nodi_fsync_pool_workers")
    assert workers_max >= 1 and 0 <= value(samples, "nodi_fsync_pool_workers_busy") <= workers <= workers_max
    assert value(samples, "nodi_fsync_pool_queued_jobs") >= 0
    # Every durable produce waited for a group-commit fsync; sent one at a time, alone on
    # the broker, most ran on the event loop (fsync_on_loop_max_ms), not as pool jobs.
    assert total(samples, "nodi_fsyncs_total") >= PARTITIONS * PER_PARTITION
    assert value(samples, "nodi_fsync_pool_jobs_total") >= 1  # the metadata commits at least
    assert 0 < value(samples, "nodi_partition_files_open") <= value(samples, "nodi_partition_files_open_max")
    # A handful of partitions under the default limit: nothing evicted or reopened.
    for name in (
        "nodi_partition_file_evictions_total",
        "nodi_partition_file_dirty_evictions_total",
        "nodi_partition_file_reopens_total",
        "nodi_partition_files_over_limit_total",
    ):
        assert value(samples, name) == 0, name


def _status(broker: BrokerProcess, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        NODI + ["--server", broker.address, "status", *extra], capture_output=True, text=True, timeout=60
    )


def test_status_json(workload):
    broker, _, _ = workload
    result = _status(broker, "--json")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    server = snapshot["server"]
    assert server["address"] == broker.address and server["server_id"].startswith("nodi-")
    assert server["version"] and server["uptime_ms"] > 0 and Path(server["data_dir"]).is_absolute()
    assert server["connections_open"] >= 1 and server["connections_accepted"] >= 2
    assert 0 < server["disk_free_bytes"] <= server["disk_total_bytes"]
    assert server["read_only_partitions"] == {}
    topics = {topic["topic"]: topic for topic in snapshot["topics"]}
    assert topics[TOPIC]["partitions"] == PARTITIONS and topics[TOPIC]["messages"] == PARTITIONS * PER_PARTITION
    assert topics[TOPIC]["bytes"] > 0 and topics[TOPIC]["segments"] == PARTITIONS
    groups = {group["group"]: group for group in snapshot["groups"]}
    assert groups[GROUP]["lag"] == sum(PER_PARTITION - upto for upto in CONSUMED.values())
    assert {(entry["partition"], entry["lag"]) for entry in groups[GROUP]["partitions"]} == {
        (partition, PER_PARTITION - upto) for partition, upto in CONSUMED.items()
    }
    assert snapshot["dead_letter_topics"] == [{"topic": DLQ, "messages": DEAD_LETTERS}]


def test_status_table(workload):
    broker, _, _ = workload
    result = _status(broker)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["address", broker.address] for line in lines if line.strip())
    assert any(
        line.split() == [TOPIC, str(PARTITIONS), str(PARTITIONS * PER_PARTITION)] + line.split()[3:]
        for line in lines
        if line.startswith(TOPIC + " ")
    )
    group_line = next(line for line in lines if line.startswith(GROUP + " "))
    assert group_line.split()[1:4] == ["empty", "0", str(PER_PARTITION - CONSUMED[1])]
    assert f"{TOPIC}-1:{PER_PARTITION - CONSUMED[1]}" in group_line
    header = lines.index(next(line for line in lines if line.startswith("DEAD-LETTER TOPIC")))
    assert lines[header + 1].split() == [DLQ, str(DEAD_LETTERS)]


def test_refused_connections_are_counted(tmp_path):
    """connections_max from a --config file: the connection over it is refused and
    counted; the open one is in nodi_connections."""
    import socket
    import time

    from nodi.broker import Client

    config = tmp_path / "nodi.toml"
    config.write_text("[server]\nconnections_max = 1\n")
    broker = BrokerProcess(str(tmp_path / "data"), ["--config", str(config)], metrics=True).start()
    try:
        with Client(broker.address, timeout_ms=30_000) as client:
            client.list_topics()
            with socket.create_connection((broker.host, broker.port), timeout=30) as extra:
                extra.settimeout(30)
                assert extra.recv(65536) is not None  # the Closing event (or EOF): refused
                deadline = time.monotonic() + 30
                while True:
                    samples = scrape(broker.metrics_port)
                    if value(samples, "nodi_connections_refused_total") >= 1 or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
            assert value(samples, "nodi_connections_refused_total") == 1
            assert value(samples, "nodi_connections_accepted_total") == 1
            assert value(samples, "nodi_connections") == 1
            status = client.server_status()
            assert (status.connections_open, status.connections_accepted, status.connections_refused) == (1, 1, 1)
    finally:
        broker.stop()


def test_storage_histograms_in_log_statistics(tmp_path):
    """The log times each fsync and counts the appends each group commit covered; its
    statistics() carries both (what the endpoint's histograms are built from)."""
    from nodi.storage.config import LogConfig
    from nodi.storage.histogram import Histogram
    from nodi.storage.log import Log
    from nodi.storage.records import build_batch, make_records

    histogram = Histogram((1, 2))
    for observed in (1, 1.5, 5):
        histogram.observe(observed)
    snapshot = histogram.snapshot()
    assert snapshot.counts == (1, 1, 1) and snapshot.total == 7.5 and snapshot.count == 3
    assert snapshot.cumulative() == [(1, 1), (2, 2), (float("inf"), 3)]  # upper bounds inclusive, as `le`

    partition_log = Log.open(str(tmp_path / "log"), LogConfig())
    try:
        for number in range(20):
            partition_log.append(build_batch(make_records([f"m{number}".encode()])))
        statistics = partition_log.statistics()
    finally:
        partition_log.close()
    assert statistics.fsyncs >= 1
    assert statistics.fsync_seconds.count >= statistics.fsyncs and statistics.fsync_seconds.total > 0
    assert statistics.group_commit_appends.total == statistics.fsync_covered_appends == 20
    assert 1 <= statistics.group_commit_appends.count <= statistics.fsyncs


def test_docs_operations_md_metric_tables_are_up_to_date():
    """The tables are rendered from a real broker's registry (in this process, a
    temporary data directory): every family, its exported name (`_total` on counters),
    type, labels and HELP text."""
    from nodi.broker.server import metrics_docs

    rows = metrics_docs.registry_rows()
    names = [row.name for row in rows]
    assert len(names) == len(set(names)) > 60
    assert all(row.name.endswith("_total") for row in rows if row.type == "counter")
    assert {
        "nodi_queue_acked_total",
        "nodi_replies_dropped_total",
        "nodi_dedup_duplicates_total",
        "nodi_metadata_failed_commits_total",
        "nodi_disk_free_bytes",
    } <= set(names)
    assert all(row.help for row in rows)
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    assert metrics_docs.update_document(text, rows) == text, (
        "docs/operations.md's metric tables are stale: run python -m nodi.broker.server.metrics_docs docs/operations.md"
    )


def test_docs_and_alerts_name_counters_with_their_total_suffix():
    """A counter is exported as NAME_total only: a doc or an alert rule that names it
    without the suffix points at a series that does not exist."""
    from nodi.broker.server import metrics_docs

    counters = [row.name.removesuffix("_total") for row in metrics_docs.registry_rows() if row.type == "counter"]
    root = OPERATIONS_DOC.parent.parent
    files = [
        *sorted((root / "docs").glob("*.md")),
        root / "README.md",
        *sorted((root / "tools" / "alerts").glob("*")),
        *sorted((root / "tools" / "grafana").glob("*")),
    ]
    bare = re.compile(r"\b(" + "|".join(map(re.escape, counters)) + r")(?![a-z0-9_])")
    found = [
        f"{path.name}: {match.group(1)}"
        for path in files
        if path.is_file()
        for match in bare.finditer(path.read_text(encoding="utf-8"))
    ]
    assert found == []
