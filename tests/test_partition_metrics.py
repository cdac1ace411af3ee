"""Per-partition metric families stay bounded (issue 18): with more partitions than
`metrics_partition_series_max` they are one series per topic (`partition="all"`) whose
values are the partitions' sums (histograms merged bucket by bucket); at or under it
they stay per partition. Real `nodi serve` processes, scraped over HTTP."""

from __future__ import annotations

import time

from conftest import BrokerProcess
from test_ops_metrics import scrape, total, value

TOPIC = "tenants"
SMALL = "small"
PARTITIONS = 8
GROUP = "billing"
QUEUE_GROUP = "workers"
VALUE = b"v" * 50
# The families labelled by partition that this workload exports (no compaction, no queue group).
PARTITION_FAMILIES = (
    "nodi_log_segments",
    "nodi_log_bytes",
    "nodi_log_start_offset",
    "nodi_log_end_offset",
    "nodi_log_durable_offset",
    "nodi_log_read_only",
    "nodi_partition_damaged",
    "nodi_fsyncs_total",
    "nodi_fsync_covered_appends_total",
    "nodi_fsync_latency_seconds_count",
    "nodi_group_commit_appends_sum",
    "nodi_consumer_lag",
    "nodi_consumer_committed_offset",
)


def produced(partition: int) -> int:
    """Messages the workload writes to `partition` of TOPIC."""
    return partition + 1


def committed(partition: int) -> int:
    """The offset GROUP commits for `partition` (one message behind its end)."""
    return partition


def write_workload(address: str) -> None:
    from nodi.broker import Client

    with Client(address, timeout_ms=30_000) as client:
        client.create_topic(TOPIC, PARTITIONS)
        for partition in range(PARTITIONS):
            for _ in range(produced(partition)):
                client.produce(TOPIC, VALUE, partition=partition, acks="durable")
        client.commit_offsets(GROUP, {(TOPIC, partition): committed(partition) for partition in range(PARTITIONS)})


def partition_labels(samples, topic: str) -> set[str]:
    """The `partition` label values of every per-partition family's series of `topic`."""
    return {
        labels["partition"]
        for name in PARTITION_FAMILIES
        for labels, _ in samples.get(name, [])
        if labels.get("topic") == topic
    }


def test_past_the_limit_the_families_are_per_topic_with_the_partitions_sums(tmp_path):
    broker = BrokerProcess(str(tmp_path / "data"), ["--metrics-partition-series-max", "5"], metrics=True).start()
    try:
        from nodi.broker import Client

        with Client(broker.address, timeout_ms=30_000) as client:
            client.create_topic(SMALL, 2)
            client.produce(SMALL, VALUE, partition=1, acks="durable")
        below = scrape(broker.metrics_port)  # 2 partitions: per partition
        assert partition_labels(below, SMALL) == {"0", "1"}
        assert value(below, "nodi_log_end_offset", topic=SMALL, partition="1") == 1

        write_workload(broker.address)  # 10 partitions now, over the limit of 5
        messages = sum(produced(partition) for partition in range(PARTITIONS))
        with Client(broker.address, timeout_ms=30_000) as client:
            with client.queue(TOPIC, QUEUE_GROUP, prefetch=False) as queue:
                acked = 0
                while acked < messages:
                    message = queue.receive(timeout_ms=30_000)
                    assert message is not None, f"{acked} of {messages} received"
                    message.ack()
                    acked += 1
        samples = scrape(broker.metrics_port)
        assert partition_labels(samples, TOPIC) == {"all"}
        assert partition_labels(samples, SMALL) == {"all"}
        per_topic = {"topic": TOPIC, "partition": "all"}
        assert value(samples, "nodi_log_end_offset", **per_topic) == messages
        assert value(samples, "nodi_log_durable_offset", **per_topic) == messages
        assert value(samples, "nodi_log_start_offset", **per_topic) == 0
        assert value(samples, "nodi_log_segments", **per_topic) == PARTITIONS
        assert value(samples, "nodi_log_read_only", **per_topic) == 0
        assert value(samples, "nodi_partition_damaged", **per_topic) == 0
        assert value(samples, "nodi_log_bytes", **per_topic) == value(samples, "nodi_bytes_in_total", topic=TOPIC)
        # Each durable produce made durable by a group commit: the merged histogram and
        # the summed counter both count every one.
        assert value(samples, "nodi_fsync_covered_appends_total", **per_topic) == messages
        assert value(samples, "nodi_group_commit_appends_sum", **per_topic) == messages
        fsyncs = value(samples, "nodi_fsyncs_total", **per_topic)
        assert fsyncs >= PARTITIONS
        count = value(samples, "nodi_fsync_latency_seconds_count", **per_topic)
        assert count >= fsyncs
        assert value(samples, "nodi_fsync_latency_seconds_bucket", le="+Inf", **per_topic) == count
        buckets = sorted(
            (float(labels["le"]), bucket)
            for labels, bucket in samples["nodi_fsync_latency_seconds_bucket"]
            if labels["topic"] == TOPIC
        )
        assert len(buckets) == 17 and [bucket for _, bucket in buckets] == sorted(bucket for _, bucket in buckets)
        group = {"group": GROUP, "topic": TOPIC, "partition": "all"}
        assert value(samples, "nodi_consumer_lag", **group) == sum(
            produced(partition) - committed(partition) for partition in range(PARTITIONS)
        )
        assert value(samples, "nodi_consumer_committed_offset", **group) == sum(map(committed, range(PARTITIONS)))
        assert value(samples, "nodi_log_end_offset", topic=SMALL, partition="all") == 1
        queue_labels = {"group": QUEUE_GROUP, **per_topic}
        assert value(samples, "nodi_queue_acked_total", **queue_labels) == messages
        assert value(samples, "nodi_queue_delivered_total", **queue_labels) == messages
        assert value(samples, "nodi_queue_in_flight", **queue_labels) == 0
        assert {labels["partition"] for labels, _ in samples["nodi_queue_acked_total"]} == {"all"}
        broker.stop()

        # After a clean restart no partition is open; a scrape opens none, and the lag
        # (from the checkpoints) is still per topic.
        broker.start()
        restarted = scrape(broker.metrics_port)
        assert value(restarted, "nodi_partitions_open") == 0
        assert value(restarted, "nodi_consumer_lag", **group) == PARTITIONS
        assert partition_labels(restarted, TOPIC) == {"all"}
        assert value(scrape(broker.metrics_port), "nodi_partitions_open") == 0
    finally:
        if broker.process is not None:
            broker.stop()
    modes = [line for line in broker.output if "metrics_partition_series_max 5" in line]
    assert "0 partitions" in modes[0] and "per partition" in modes[0], modes  # at start
    assert any("10 partitions" in line and "per topic" in line for line in modes), modes


def test_at_or_under_the_limit_the_families_stay_per_partition(tmp_path):
    broker = BrokerProcess(
        str(tmp_path / "data"), ["--metrics-partition-series-max", str(PARTITIONS)], metrics=True
    ).start()
    try:
        write_workload(broker.address)
        samples = scrape(broker.metrics_port)
    finally:
        broker.stop()
    assert partition_labels(samples, TOPIC) == {str(partition) for partition in range(PARTITIONS)}
    for partition in range(PARTITIONS):
        labels = {"topic": TOPIC, "partition": str(partition)}
        assert value(samples, "nodi_log_end_offset", **labels) == produced(partition)
        assert value(samples, "nodi_fsync_covered_appends_total", **labels) == produced(partition)
        assert value(samples, "nodi_group_commit_appends_sum", **labels) == produced(partition)
        group = {"group": GROUP, **labels}
        assert value(samples, "nodi_consumer_lag", **group) == produced(partition) - committed(partition)
        assert value(samples, "nodi_consumer_committed_offset", **group) == committed(partition)
    messages = sum(produced(partition) for partition in range(PARTITIONS))
    assert total(samples, "nodi_log_end_offset", topic=TOPIC) == messages
    assert any("per partition" in line and "metrics_partition_series_max 8" in line for line in broker.output)


def test_per_topic_counters_keep_what_partitions_closed_for_being_idle_counted(tmp_path):
    """A partition closed for being idle takes its log's counters with it (they start
    at 0 when it reopens): per topic, the sums keep what it counted, so they never fall."""
    environment = {"NODI_PARTITION_IDLE_CLOSE_MS": "3000"}
    broker = BrokerProcess(
        str(tmp_path / "data"), ["--metrics-partition-series-max", "0"], metrics=True, environment=environment
    ).start()
    per_topic = {"topic": TOPIC, "partition": "all"}
    messages = sum(produced(partition) for partition in range(PARTITIONS))
    try:
        write_workload(broker.address)
        before = scrape(broker.metrics_port)  # every partition open, just written
        assert value(before, "nodi_partitions_open") == PARTITIONS
        assert value(before, "nodi_fsync_covered_appends_total", **per_topic) == messages
        deadline = time.monotonic() + 60
        closed = before
        while value(closed, "nodi_partitions_open") > 0:
            assert time.monotonic() < deadline, "the idle partitions were not closed"
            time.sleep(0.5)
            closed = scrape(broker.metrics_port)
        assert value(closed, "nodi_fsync_covered_appends_total", **per_topic) == messages
        assert value(closed, "nodi_group_commit_appends_sum", **per_topic) == messages
        assert value(closed, "nodi_fsyncs_total", **per_topic) >= value(before, "nodi_fsyncs_total", **per_topic)
        from nodi.broker import Client

        with Client(broker.address, timeout_ms=30_000) as client:
            client.produce(TOPIC, VALUE, partition=0, acks="durable")  # reopens partition 0
        reopened = scrape(broker.metrics_port)
        assert value(reopened, "nodi_partitions_open") >= 1
        assert value(reopened, "nodi_fsync_covered_appends_total", **per_topic) == messages + 1
        assert value(reopened, "nodi_group_commit_appends_count", **per_topic) >= value(
            closed, "nodi_group_commit_appends_count", **per_topic
        )
    finally:
        if broker.process is not None:
            broker.stop()
