"""Prometheus metrics on --metrics-port (prometheus-client). Names start with nodi_ and
are listed in docs/operations.md.

Request-path metrics are counted as replies go out (Server.observe), in plain counters
that RequestMetrics turns into prometheus families at scrape time; everything the
storage layer already counts (segments, bytes, offsets, fsyncs and their latency, group
commit sizes) is read from its statistics() at scrape time by a collector, so the hot
path pays nothing for it. Consumer lag and disk space are read at scrape time too
(broker/server/status.py). The collector runs on the HTTP server's thread and reads only
thread-safe state.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
from bisect import bisect_left
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from nodi.storage.errors import NodiError
from nodi.storage.histogram import HistogramSnapshot
from nodi.storage.records import parse_header

from ..protocol import messages as m
from ..protocol.errors import ErrorCode
from .security_settings import DEFAULT_SECURITY_SETTINGS, SecuritySettings
from .status import consumer_lags, disk_space, nodi_version

log = logging.getLogger("nodi.metrics")

LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
_ACKS_NAMES = {acks: acks.name.lower() for acks in m.Acks}
_ERROR_LABELS = {int(code): code.name.lower() for code in ErrorCode}


def _error_label(code: int) -> str:
    """The `error` label of a reply's code (`none` on success)."""
    label = _ERROR_LABELS.get(code)
    return label if label is not None else ErrorCode(code).name.lower()


def _histogram_family(name: str, documentation: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, labels=labels)


def _add_snapshot(family: HistogramMetricFamily, key: list[str], snapshot: HistogramSnapshot | None) -> None:
    if snapshot is None:
        return
    buckets = [
        ("+Inf" if bound == float("inf") else repr(float(bound)), count) for bound, count in snapshot.cumulative()
    ]
    family.add_metric(key, buckets, snapshot.total)


def _offsets_sent(slices) -> int:
    """Offsets covered by the batches of a fetch reply (records sent, counting each
    batch whole: a consumer skips those before its offset)."""
    return sum(piece.last_offset - piece.first_offset + 1 for piece in slices)


def _offsets_in(records: bytes | memoryview) -> int:
    """Offsets the batches of a produce request take, from their headers alone (for
    acks none, whose response carries no offsets). The server already checked them."""
    view = memoryview(records)
    position = count = 0
    try:
        while position < len(view):
            header = parse_header(view, position)
            count += header.last_offset_delta + 1
            position += header.size
    except NodiError:
        pass
    return count


# -- per-partition families: per partition, or per topic past the limit -------------
# Past `metrics_partition_series_max` partitions the families labelled by partition
# (nodi_log_*, nodi_partition_damaged, fsyncs, consumer lag, compaction, queue groups)
# give one series per topic (and group) instead, labelled `partition="all"` (issue 18):
# docs/operations.md "Metrics with many partitions" says how each is merged.
ALL_PARTITIONS = "all"


def _merge_snapshots(first: HistogramSnapshot, second: HistogramSnapshot) -> HistogramSnapshot:
    """Two histograms of the same buckets as one, bucket by bucket."""
    assert first.bounds == second.bounds, (first.bounds, second.bounds)
    counts = tuple(a + b for a, b in zip(first.counts, second.counts, strict=True))
    return HistogramSnapshot(first.bounds, counts, first.total + second.total)


class _PartitionSamples:
    """One family's samples keyed by labels whose last is the partition: added as
    given per partition, or merged with `merge` into one sample per key with
    `partition="all"` (per topic). `emit` adds a sample to the family."""

    __slots__ = ("family", "per_topic", "merge", "emit", "merged")

    def __init__(self, family, per_topic: bool, merge=operator.add, emit=None) -> None:
        self.family = family
        self.per_topic = per_topic
        self.merge = merge
        self.emit = family.add_metric if emit is None else emit
        self.merged: dict[tuple[str, ...], object] = {}

    def add(self, key: list[str], value) -> None:
        if value is None:
            return
        if not self.per_topic:
            self.emit(key, value)
            return
        merged_key = (*key[:-1], ALL_PARTITIONS)
        old = self.merged.get(merged_key)
        self.merged[merged_key] = value if old is None else self.merge(old, value)

    def finish(self):
        """The family, its merged samples added (per topic)."""
        for key, value in self.merged.items():
            self.emit(list(key), value)
        self.merged.clear()
        return self.family


def _histogram_samples(family: HistogramMetricFamily, per_topic: bool) -> _PartitionSamples:
    return _PartitionSamples(
        family, per_topic, merge=_merge_snapshots, emit=lambda key, snapshot: _add_snapshot(family, key, snapshot)
    )


def _merge_figures(first: tuple, second: tuple) -> tuple:
    """Counters added, histogram snapshots merged, element by element (None: none yet)."""
    merged = []
    for a, b in zip(first, second, strict=True):
        if a is None or b is None:
            merged.append(b if a is None else a)
        elif isinstance(a, HistogramSnapshot):
            merged.append(_merge_snapshots(a, b))
        else:
            merged.append(a + b)
    return tuple(merged)


def _counts(figures: tuple) -> tuple[float, ...]:
    """The figures as numbers that only grow while their log stays open."""
    return tuple(figure.count if isinstance(figure, HistogramSnapshot) else figure or 0 for figure in figures)


class _RetiredCounters:
    """Per topic, the last counters (and histograms) scraped of its partition logs that
    are no longer open, so a topic's summed counters do not fall when one of its
    partitions is closed for being idle (a reopened log counts from 0 again). Only per
    topic: per partition a reopened log's series restart, as Prometheus expects of a
    counter reset. Counts a log made between its last scrape and its close are lost.

    A log is told from the one before it of its partition by its id and, should a new
    log get the id of a collected one, by a count that went down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, int], tuple[int, tuple]] = {}
        self._retired: dict[str, tuple] = {}

    def carried(self, seen: dict[tuple[str, int], tuple[int, tuple]], topics: set[str]) -> dict[str, tuple]:
        """Record this scrape's open logs (`seen`: (topic, partition) -> (id of the
        log, figures)) and return, per topic of `topics`, what its closed logs counted."""
        with self._lock:
            for key, (log_id, figures) in self._last.items():
                now = seen.get(key)
                replaced = now is None or now[0] != log_id
                if not replaced:
                    assert now is not None
                    replaced = any(new < old for new, old in zip(_counts(now[1]), _counts(figures), strict=True))
                if replaced:
                    old = self._retired.get(key[0])
                    self._retired[key[0]] = figures if old is None else _merge_figures(old, figures)
            self._last = dict(seen)
            for topic in [topic for topic in self._retired if topic not in topics]:  # deleted
                del self._retired[topic]
            return dict(self._retired)

    def clear(self) -> None:
        with self._lock:
            self._last.clear()
            self._retired.clear()


class _PartitionSeriesMode:
    """Whether the per-partition families go per topic now: the broker holds more
    partitions than `partitions_max` (0: always). Logs the mode the first time it is
    asked (the server's start) and whenever the count crosses the limit (seen at a
    scrape); thread-safe (scrapes may run at once)."""

    def __init__(self, partitions_max: int) -> None:
        assert partitions_max >= 0, partitions_max
        self.partitions_max = partitions_max
        self._per_topic: bool | None = None
        self._lock = threading.Lock()

    def per_topic(self, store) -> bool:
        partitions = 0 if store is None else sum(config.partitions for config in store.topics().values())
        per_topic = self.partitions_max == 0 or partitions > self.partitions_max
        with self._lock:
            changed, self._per_topic = self._per_topic != per_topic, per_topic
        if changed:
            log.info(
                "metrics: %d partitions, metrics_partition_series_max %d: per-partition families %s",
                partitions,
                self.partitions_max,
                'per topic (partition="all")' if per_topic else "per partition",
                extra={"partitions": partitions, "per_topic": per_topic},
            )
        return per_topic


class _StoreCollector:
    """Figures read at scrape time: per-partition log statistics, fsync latency and
    group commit sizes, consumer lag, disk space, connections, the server itself."""

    def __init__(self, server) -> None:
        self.server = server
        self.partition_series = _PartitionSeriesMode(server.config.metrics_partition_series_max)
        self.partition_series.per_topic(server.store)  # logs the mode at start
        self.retired_counters = _RetiredCounters()

    def collect(self):
        per_topic = self.partition_series.per_topic(self.server.store)
        yield from self._log_families(per_topic)
        yield from self._metadata_families()
        yield from self._storage_pool_families()
        yield from self._consumer_families(per_topic)
        yield from self._group_families()
        yield from self._server_families()
        yield from self._queue_families(per_topic)
        yield from self._compaction_families(per_topic)
        yield from self._dedup_families()
        yield from self._security_families()

    def _security_families(self):
        statistics = self.server.security.statistics()
        authenticated = CounterMetricFamily(
            "nodi_authentications", "Connections that authenticated (password or client certificate)"
        )
        authenticated.add_metric([], statistics.authentications)
        refused = CounterMetricFamily(
            "nodi_authentication_refusals",
            "Connections refused authentication, by reason: `bad_credentials` (unknown user or wrong password), "
            "`certificate`, `not_authenticated` (a request first), `replayed` (a second Authenticate), "
            "`principal_connections` (`connections_per_principal_max`), `no_users_file`; the Kafka listener's SASL: "
            "`mechanism` (PLAIN without TLS), `no_scram_credentials` (run `nodi user passwd`), `sasl_protocol`",
            labels=["reason"],
        )
        for reason, count in sorted(statistics.refusals.items()):
            refused.add_metric([reason], count)
        not_authorized = CounterMetricFamily(
            "nodi_not_authorized",
            "Requests refused NOT_AUTHORIZED, by action (each logged with the principal)",
            labels=["action"],
        )
        for action, count in sorted(statistics.not_authorized.items()):
            not_authorized.add_metric([action], count)
        principals = GaugeMetricFamily("nodi_principals_connected", "Distinct principals with a connection open")
        principals.add_metric([], statistics.principals_connected)
        reloads = CounterMetricFamily(
            "nodi_tls_reloads", "TLS certificate reloads on SIGHUP, by outcome", labels=["outcome"]
        )
        reloads.add_metric(["ok"], statistics.tls_reloads)
        reloads.add_metric(["failed"], statistics.tls_reload_failures)
        throttled = CounterMetricFamily(
            "nodi_reads_throttled",
            "Reads of a connection delayed by a per-connection limit, by listener (`nodi`, `kafka`) and reason: "
            "`bytes_in_flight` (`connection_in_flight_bytes_max`), `request_rate` "
            "(`connection_requests_per_second_max`)",
            labels=["listener", "reason"],
        )
        for (listener, reason), count in sorted(statistics.reads_throttled.items()):
            throttled.add_metric([listener, reason], count)
        total = GaugeMetricFamily("nodi_connections_total", "Open connections over both listeners (nodi and Kafka)")
        total.add_metric([], statistics.connections_total)
        total_refused = CounterMetricFamily(
            "nodi_connections_total_refused", "Connections of either listener refused over `connections_total_max`"
        )
        total_refused.add_metric([], statistics.connections_total_refused)
        yield from (authenticated, refused, not_authorized, principals, reloads, throttled, total, total_refused)

    def _log_families(self, per_topic: bool):
        labels = ["topic", "partition"]
        segments = GaugeMetricFamily("nodi_log_segments", "Segment files", labels=labels)
        size = GaugeMetricFamily("nodi_log_bytes", "Bytes of segment files", labels=labels)
        start = GaugeMetricFamily("nodi_log_start_offset", "First offset still stored", labels=labels)
        end = GaugeMetricFamily(
            "nodi_log_end_offset",
            "Offset the next record gets (of a `*.dlq` topic: messages ever dead-lettered)",
            labels=labels,
        )
        durable = GaugeMetricFamily("nodi_log_durable_offset", "Offsets below it are fsynced", labels=labels)
        read_only = GaugeMetricFamily(
            "nodi_log_read_only", "1 after a write or fsync error: the partition refuses produces", labels=labels
        )
        corrupt = GaugeMetricFamily(
            "nodi_log_corrupt_segments", "Segments holding a batch that failed its checks when read", labels=labels
        )
        damaged = GaugeMetricFamily(
            "nodi_partition_damaged",
            "1 when the partition was found damaged at start: read up to "
            "the damage, produces refused, until repaired "
            "(`nodi_log_read_only` is 1 too)",
            labels=labels,
        )
        undecodable = CounterMetricFamily(
            "nodi_log_undecodable_batches",
            "Stored batches whose CRC holds but whose"
            " records do not decode (written before "
            "produce checked records), skipped by a "
            "server-side reader (queue groups, "
            "timestamp lookups, compaction, dedup "
            "read-back) since the start; each is "
            "logged once; `nodi segments verify` "
            "lists them (docs/fault-model.md "
            '"Undecodable batches")',
            labels=labels,
        )
        fsyncs = CounterMetricFamily("nodi_fsyncs", "Group-commit fsyncs of the partition's log", labels=labels)
        covered = CounterMetricFamily(
            "nodi_fsync_covered_appends",
            "Appends those fsyncs made durable (÷ fsyncs = mean group commit size)",
            labels=labels,
        )
        fsync_latency = _histogram_family(
            "nodi_fsync_latency_seconds",
            "Time each segment fsync took: group commit, roll, flush "
            "and close (timed in the log, 50 µs to 10 s buckets)",
            labels,
        )
        group_commit = _histogram_family(
            "nodi_group_commit_appends",
            "Appends one group-commit fsync made durable (fsyncs that covered any; buckets 1, 2, 4 ... 4096)",
            labels,
        )
        samples = [
            _PartitionSamples(family, per_topic)
            for family in (
                segments,
                size,
                start,
                end,
                durable,
                read_only,
                corrupt,
                damaged,
                undecodable,
                fsyncs,
                covered,
            )
        ]
        latency_samples = _histogram_samples(fsync_latency, per_topic)
        group_commit_samples = _histogram_samples(group_commit, per_topic)
        seen: dict[tuple[str, int], tuple[int, tuple]] = {}
        store = self.server.store
        if store is not None:
            for topic, partition, partition_log in store.logs():
                key = [topic, str(partition)]
                statistics = partition_log.statistics()
                if per_topic:
                    seen[(topic, partition)] = (
                        id(partition_log),
                        (
                            statistics.undecodable_batches,
                            statistics.fsyncs,
                            statistics.fsync_covered_appends,
                            statistics.fsync_seconds,
                            statistics.group_commit_appends,
                        ),
                    )
                values = (
                    statistics.segment_count,
                    statistics.byte_count,
                    statistics.log_start_offset,
                    statistics.next_offset,
                    statistics.durable_offset,
                    1 if statistics.read_only else 0,
                    len(statistics.corrupt_segments),
                    0 if statistics.damage is None else 1,
                    statistics.undecodable_batches,
                    statistics.fsyncs,
                    statistics.fsync_covered_appends,
                )
                for sample, figure in zip(samples, values, strict=True):
                    sample.add(key, figure)
                latency_samples.add(key, statistics.fsync_seconds)
                group_commit_samples.add(key, statistics.group_commit_appends)
        if per_topic and store is not None:
            counter_samples = (undecodable, fsyncs, covered, fsync_latency, group_commit)
            by_family = {id(sample.family): sample for sample in (*samples, latency_samples, group_commit_samples)}
            for topic, figures in self.retired_counters.carried(seen, set(store.topics())).items():
                for family, figure in zip(counter_samples, figures, strict=True):
                    by_family[id(family)].add([topic, ALL_PARTITIONS], figure)
        elif not per_topic:
            self.retired_counters.clear()
        for sample in (*samples, latency_samples, group_commit_samples):
            yield sample.finish()

    def _storage_pool_families(self):
        """The store's shared fsync pool and open-file budget (issue 18): one unlabelled
        series each, whatever the number of partitions."""
        store = self.server.store
        if store is None:
            return
        pool = store.fsync_pool.statistics()
        workers_max = GaugeMetricFamily(
            "nodi_fsync_pool_workers_max", "Threads the fsync pool may run (`fsync_workers_max`)"
        )
        workers_max.add_metric([], pool.workers_max)
        workers = GaugeMetricFamily(
            "nodi_fsync_pool_workers", "Fsync pool threads running now (idle ones exit after a while)"
        )
        workers.add_metric([], pool.workers)
        busy = GaugeMetricFamily(
            "nodi_fsync_pool_workers_busy", "Fsync pool threads running a job now (an fsync, a log open or close)"
        )
        busy.add_metric([], pool.workers - pool.idle)
        queued = GaugeMetricFamily(
            "nodi_fsync_pool_queued_jobs",
            "Jobs waiting for a free fsync pool thread (at most one fsync per partition)",
        )
        queued.add_metric([], pool.queued)
        jobs = CounterMetricFamily("nodi_fsync_pool_jobs", "Jobs the fsync pool ran since the server started")
        jobs.add_metric([], pool.jobs_run)
        budget = store.file_budget.statistics()
        open_max = GaugeMetricFamily(
            "nodi_partition_files_open_max",
            "Partition files (segments, indexes) kept open at most, sized from RLIMIT_NOFILE at start",
        )
        open_max.add_metric([], budget.open_files_max)
        open_now = GaugeMetricFamily("nodi_partition_files_open", "Partition files open now")
        open_now.add_metric([], budget.open_files)
        evictions = CounterMetricFamily(
            "nodi_partition_file_evictions",
            "Partition files closed to stay under the limit (least recently used first) since start",
        )
        evictions.add_metric([], budget.closes)
        dirty = CounterMetricFamily(
            "nodi_partition_file_dirty_evictions",
            "Of those evictions, files fsynced first (written since their last sync)",
        )
        dirty.add_metric([], budget.dirty_closes)
        reopens = CounterMetricFamily(
            "nodi_partition_file_reopens", "Partition files opened again after an eviction since start"
        )
        reopens.add_metric([], budget.reopens)
        over = CounterMetricFamily(
            "nodi_partition_files_over_limit",
            "Times every open partition file was in use, so the limit was passed for a moment",
        )
        over.add_metric([], budget.over_limit)
        yield from (workers_max, workers, busy, queued, jobs, open_max, open_now, evictions, dirty, reopens, over)
        yield from self._partition_open_families(store)

    def _partition_open_families(self, store):
        """Which partitions are open (issue 18): after a start only the ones not
        closed cleanly are opened (recovered in the background), a clean one on first
        use. Per-partition series (nodi_log_*) appear for a partition once it is open."""
        opens = store.open_statistics()
        open_now = GaugeMetricFamily(
            "nodi_partitions_open",
            "Partitions whose log is open now (files, index buffers): the ones used since the start",
        )
        open_now.add_metric([], opens.open)
        not_open = GaugeMetricFamily(
            "nodi_partitions_not_open",
            "Partitions registered and not open: closed cleanly and not used since the start (a request opens "
            "one at once), or being recovered (answered PARTITION_NOT_READY until then)",
        )
        not_open.add_metric([], opens.not_open)
        unclean = GaugeMetricFamily(
            "nodi_partitions_not_open_unclean",
            "Of those, partitions not closed cleanly: scanned past their checkpoint before anything of them is served",
        )
        unclean.add_metric([], opens.not_open_unclean)
        failed = GaugeMetricFamily(
            "nodi_partitions_open_failed",
            "Partitions whose open failed at start (an I/O error; the log says which): they serve nothing",
        )
        failed.add_metric([], opens.failed)
        on_demand = CounterMetricFamily(
            "nodi_partitions_opened_on_demand",
            "Partitions opened on first use after the start: by a request, or by the retention sweep",
        )
        on_demand.add_metric([], opens.opened_on_demand)
        for_cleanup = CounterMetricFamily(
            "nodi_partitions_opened_for_cleanup",
            "Of those, partitions the retention sweep opened (unused since the start, more than one segment)",
        )
        for_cleanup.add_metric([], opens.opened_for_cleanup)
        idle_closed = CounterMetricFamily(
            "nodi_partitions_idle_closed",
            "Partition logs closed after partition_idle_close_ms unused (reopened on next use)",
        )
        idle_closed.add_metric([], opens.idle_closed)
        refusals = CounterMetricFamily(
            "nodi_partition_not_ready_refusals", "Requests answered PARTITION_NOT_READY (a partition still opening)"
        )
        refusals.add_metric([], opens.not_ready_refusals)
        seconds = GaugeMetricFamily(
            "nodi_partitions_open_seconds",
            "Seconds the background recovery of the partitions not closed cleanly took (so far, while "
            "nodi_partitions_not_open_unclean is above 0)",
        )
        seconds.add_metric([], opens.background_seconds)
        yield from (open_now, not_open, unclean, failed, on_demand, for_cleanup, idle_closed, refusals, seconds)

    def _metadata_families(self):
        """The metadata store (LMDB): whether commits are failing, and how often they did."""
        store = self.server.store
        if store is None:
            return
        statistics = store.metadata.statistics()
        failed = GaugeMetricFamily(
            "nodi_metadata_store_failed",
            "1 while metadata commits fail (no space, an I/O error; the store retries by itself), else 0",
        )
        failed.add_metric([], 1 if statistics.failed else 0)
        failed_commits = CounterMetricFamily(
            "nodi_metadata_failed_commits", "Metadata commits that failed since start, retries included"
        )
        failed_commits.add_metric([], statistics.failed_commits)
        recoveries = CounterMetricFamily("nodi_metadata_recoveries", "Failures ended by a commit that succeeded")
        recoveries.add_metric([], statistics.recoveries)
        staged = GaugeMetricFamily(
            "nodi_metadata_staged_entries",
            "Committed offsets and queue-group states staged, not yet committed (they wait here while commits fail)",
        )
        staged.add_metric([], statistics.staged_entries)
        yield from (failed, failed_commits, recoveries, staged)

    def _consumer_families(self, per_topic: bool):
        labels = ["group", "topic", "partition"]
        lag = GaugeMetricFamily(
            "nodi_consumer_lag",
            "High watermark minus the group's committed offset (partitions the group has committed)",
            labels=labels,
        )
        committed = GaugeMetricFamily(
            "nodi_consumer_committed_offset", "The group's committed offset (the next offset it reads)", labels=labels
        )
        store = self.server.store
        if store is not None:
            try:
                lags = consumer_lags(store)
            except NodiError as error:  # a closed or failed metadata store: no lag this scrape
                log.warning("consumer lag not collected: %s", error)
                lags = []
            lag_samples = _PartitionSamples(lag, per_topic)
            committed_samples = _PartitionSamples(committed, per_topic)
            for entry in lags:
                key = [entry.group, entry.topic, str(entry.partition)]
                lag_samples.add(key, entry.lag)
                committed_samples.add(key, entry.committed_offset)
            lag_samples.finish()
            committed_samples.finish()
        yield from (lag, committed)

    def _group_families(self):
        """Stream-group membership and handovers (issue 17), from the coordinator's
        statistics(): counts since the server started, and the state now."""
        members = GaugeMetricFamily("nodi_group_members", "Members of stream consumer groups now")
        revoking = GaugeMetricFamily(
            "nodi_group_partitions_revoking", "Partitions revoked from a member and not yet released"
        )
        rebalances = CounterMetricFamily("nodi_group_rebalances", "Generation bumps of stream consumer groups")
        moved = CounterMetricFamily("nodi_group_partitions_moved", "Partitions handed from one member to another")
        forced = CounterMetricFamily(
            "nodi_group_handovers_forced", "Handovers taken at the owner's session timeout, not released"
        )
        handover = CounterMetricFamily(
            "nodi_group_handover_seconds", "Time from revocation to release, summed over the handovers"
        )
        redelivered = CounterMetricFamily(
            "nodi_group_messages_redelivered",
            "Messages handled by a member and not committed when it let go (reported)",
        )
        expired = CounterMetricFamily("nodi_group_members_expired", "Members removed by their session timeout")
        families = (members, revoking, rebalances, moved, forced, handover, redelivered, expired)
        broker = self.server.broker
        if broker is not None:
            statistics = broker.coordinator.statistics()
            members.add_metric([], statistics.members)
            revoking.add_metric([], statistics.partitions_revoking)
            rebalances.add_metric([], statistics.rebalances)
            moved.add_metric([], statistics.handovers)
            forced.add_metric([], statistics.handovers_forced)
            handover.add_metric([], statistics.handover_ms_total / 1000)
            redelivered.add_metric([], statistics.messages_redelivered)
            expired.add_metric([], statistics.members_expired)
        yield from families

    def _server_families(self):
        statistics = self.server.statistics()
        connections = GaugeMetricFamily("nodi_connections", "Open client connections")
        connections.add_metric([], statistics.connections_open)
        accepted = CounterMetricFamily("nodi_connections_accepted", "Connections accepted since start")
        accepted.add_metric([], statistics.connections_accepted)
        refused = CounterMetricFamily(
            "nodi_connections_refused", "Connections refused: over `connections_max`, or during shutdown"
        )
        refused.add_metric([], statistics.connections_refused)
        uptime = GaugeMetricFamily("nodi_uptime_seconds", "Seconds since the server started serving")
        uptime.add_metric([], statistics.uptime_ms / 1000)
        info = GaugeMetricFamily("nodi_server_info", "Always 1; says which nodi runs", labels=["version", "server_id"])
        broker = self.server.broker
        info.add_metric([nodi_version(), "" if broker is None else broker.server_id], 1)
        yield from (connections, accepted, refused, uptime, info)
        timed_out = CounterMetricFamily(
            "nodi_connections_timed_out",
            "Connections closed with TIMEOUT: `handshake` "
            "(`handshake_timeout_ms`), `frame` (`frame_timeout_ms`), "
            "`idle` (`idle_timeout_ms`)",
            labels=["deadline"],
        )
        for deadline, count in sorted(statistics.connections_timed_out.items()):
            timed_out.add_metric([deadline], count)
        budget = statistics.frame_budget
        reserved = GaugeMetricFamily(
            "nodi_frame_buffer_bytes", "Bytes reserved now by frames being received (at most `frame_buffer_bytes_max`)"
        )
        reserved.add_metric([], budget.bytes_reserved)
        budget_max = GaugeMetricFamily("nodi_frame_buffer_bytes_max", "The `frame_buffer_bytes_max` budget")
        budget_max.add_metric([], budget.bytes_max)
        waiting = GaugeMetricFamily(
            "nodi_frame_buffer_waiting", "Connections not reading because the frame budget is spent"
        )
        waiting.add_metric([], budget.waiting)
        waits = CounterMetricFamily(
            "nodi_frame_buffer_waits",
            "Frames that had to wait for budget (a sustained rate: raise the budget or find the peer)",
        )
        waits.add_metric([], budget.waits)
        yield from (timed_out, reserved, budget_max, waiting, waits)
        data_dir = os.path.abspath(self.server.config.data_dir)
        space = disk_space(data_dir)
        if space is not None:
            free = GaugeMetricFamily(
                "nodi_disk_free_bytes", "Bytes available on the data directory's file system", labels=["path"]
            )
            free.add_metric([data_dir], space.free_bytes)
            total = GaugeMetricFamily("nodi_disk_total_bytes", "Size of that file system", labels=["path"])
            total.add_metric([data_dir], space.total_bytes)
            yield from (free, total)

    def _queue_families(self, per_topic: bool):
        """Queue groups (nodi_queue_*, labels group, topic, partition), from the queue
        service's statistics(): counts since the server started, and the window now."""
        labels = ["group", "topic", "partition"]
        in_flight = GaugeMetricFamily("nodi_queue_in_flight", "Messages leased to consumers", labels=labels)
        pending = GaugeMetricFamily(
            "nodi_queue_pending",
            "Messages in the window not yet done (leased, waiting to be delivered again, or to be dead-lettered)",
            labels=labels,
        )
        floor = GaugeMetricFamily("nodi_queue_ack_floor", "Every offset below is done", labels=labels)
        delivered = CounterMetricFamily("nodi_queue_delivered", "Deliveries handed out", labels=labels)
        redelivered = CounterMetricFamily("nodi_queue_redelivered", "Deliveries after a message's first", labels=labels)
        acked = CounterMetricFamily("nodi_queue_acked", "Messages acked", labels=labels)
        nacked = CounterMetricFamily("nodi_queue_nacked", "Nacks", labels=labels)
        expired = CounterMetricFamily("nodi_queue_lease_expired", "Leases that ran out unsettled", labels=labels)
        dead = CounterMetricFamily(
            "nodi_queue_dead_lettered", "Messages copied to the dead-letter topic (and acked)", labels=labels
        )
        ttl = CounterMetricFamily(
            "nodi_queue_expired",
            "Messages whose TTL passed before delivery (dropped, or dead-lettered with reason expired)",
            labels=labels,
        )
        stale = CounterMetricFamily(
            "nodi_queue_stale_settles",
            "Settles of a delivery that was delivered again (the consumer lost the race)",
            labels=labels,
        )
        extended = CounterMetricFamily(
            "nodi_queue_leases_extended", "In-progress settles: leases a consumer started again", labels=labels
        )
        rounds = CounterMetricFamily(
            "nodi_queue_timer_rounds",
            "Rounds of the lease timer (it runs out leases and not-before times, writes dead letters)",
        )
        visited = CounterMetricFamily(
            "nodi_queue_timer_groups_visited",
            "Queue groups those rounds visited: only the ones changed since"
            " the last round or with a deadline due, so per round it "
            "follows the traffic, not the number of groups",
        )
        families = (
            in_flight,
            pending,
            floor,
            delivered,
            redelivered,
            acked,
            nacked,
            expired,
            dead,
            ttl,
            stale,
            extended,
            rounds,
            visited,
        )
        broker = self.server.broker
        if broker is not None:
            statistics = broker.queues.statistics()
            rounds.add_metric([], statistics.timer_rounds)
            visited.add_metric([], statistics.timer_groups_visited)
            partition_families = [in_flight, pending, floor, delivered, redelivered, acked, nacked]
            partition_families += [expired, dead, ttl, stale, extended]
            samples = [_PartitionSamples(family, per_topic) for family in partition_families]
            for group in statistics.groups:
                for partition in group.partitions:
                    key = [group.group, group.topic, str(partition.partition)]
                    values = (
                        partition.leased,
                        partition.pending,
                        partition.floor,
                        partition.delivered,
                        partition.redelivered,
                        partition.acked,
                        partition.nacked,
                        partition.expired_leases,
                        partition.dead_lettered,
                        partition.expired,
                        partition.stale_settles,
                        partition.leases_extended,
                    )
                    for sample, figure in zip(samples, values, strict=True):
                        sample.add(key, figure)
            for sample in samples:
                sample.finish()
        yield from families
        yield from self._inbox_families()

    def _inbox_families(self):
        """Request-reply inboxes (nodi_inbox*, nodi_replies_*), from the inbox service's
        statistics()."""
        inboxes = GaugeMetricFamily("nodi_inboxes", "Inboxes open")
        delivered = CounterMetricFamily("nodi_replies_delivered", "Reply batches put in an inbox")
        dropped = CounterMetricFamily(
            "nodi_replies_dropped",
            "Reply batches for an inbox that was gone (closed, idle, from before a restart) or full",
        )
        expired = CounterMetricFamily(
            "nodi_inboxes_expired", "Inboxes closed because nobody polled them for `inbox_idle_timeout_ms`"
        )
        broker = self.server.broker
        if broker is not None:
            statistics = broker.inboxes.statistics()
            inboxes.add_metric([], statistics.inboxes)
            delivered.add_metric([], statistics.replies_delivered)
            dropped.add_metric([], statistics.replies_dropped)
            expired.add_metric([], statistics.inboxes_expired)
        yield from (inboxes, delivered, dropped, expired)

    def _compaction_families(self, per_topic: bool):
        """Compaction of compacted topics' partitions (nodi_compaction_*), from the
        compactor's statistics() and each log's dirty ratio."""
        labels = ["topic", "partition"]
        runs = CounterMetricFamily(
            "nodi_compaction_runs", "Compaction runs completed (background and `nodi compact`)", labels=labels
        )
        failures = CounterMetricFamily(
            "nodi_compaction_failures",
            "Runs that failed (a corrupt batch, an I/O error) or were cancelled at shutdown",
            labels=labels,
        )
        reclaimed = CounterMetricFamily(
            "nodi_compaction_bytes_reclaimed", "Segment bytes compaction removed", labels=labels
        )
        removed = CounterMetricFamily(
            "nodi_compaction_records_removed", "Superseded records and expired tombstones removed", labels=labels
        )
        seconds = CounterMetricFamily("nodi_compaction_seconds", "Time spent compacting", labels=labels)
        dirty = GaugeMetricFamily(
            "nodi_compaction_dirty_ratio",
            "Share of sealed bytes written since the last run (the background job's trigger)",
            labels=labels,
        )
        store, broker = self.server.store, self.server.broker
        if store is not None and broker is not None:
            from nodi.storage.compaction import dirty_ratio

            samples = [_PartitionSamples(family, per_topic) for family in (runs, failures, reclaimed, removed, seconds)]
            dirty_samples = _PartitionSamples(dirty, per_topic, merge=max)  # the topic's dirtiest partition
            topics = store.topics()
            for topic, partition, partition_log in store.logs():
                config = topics.get(topic)
                if config is None or "compact" not in config.cleanup_policy:
                    continue
                key = [topic, str(partition)]
                statistics = broker.compaction.statistics(partition_log)
                values = (
                    statistics.runs,
                    statistics.failures,
                    statistics.bytes_reclaimed,
                    statistics.records_removed,
                    statistics.duration_ms / 1000,
                )
                for sample, figure in zip(samples, values, strict=True):
                    sample.add(key, figure)
                try:
                    dirty_samples.add(key, dirty_ratio(partition_log))
                except (NodiError, OSError) as error:  # a closing log: no ratio this scrape
                    log.warning("dirty ratio of %s-%d not collected: %s", topic, partition, error)
            for sample in (*samples, dirty_samples):
                sample.finish()
        yield from (runs, failures, reclaimed, removed, seconds, dirty)

    def _dedup_families(self):
        """Publish dedup (nodi_dedup_*), from the broker's PublishDedup.statistics()."""
        broker = self.server.broker
        if broker is None:
            return
        statistics = broker.dedup.statistics()
        yield GaugeMetricFamily(
            "nodi_dedup_keys",
            "Idempotency keys remembered now, over every topic (at most 100,000 per topic)",
            value=statistics.keys,
        )
        yield CounterMetricFamily(
            "nodi_dedup_duplicates",
            "Produced records not written because their key was seen within the window",
            value=statistics.duplicates,
        )
        yield CounterMetricFamily(
            "nodi_dedup_partly_duplicate_requests",
            "Produce requests answered PARTLY_DUPLICATE (the producer resent the rest)",
            value=statistics.partly_duplicate_requests,
        )
        yield CounterMetricFamily(
            "nodi_dedup_batches_decoded",
            "Produced batches decoded because they hold an idempotency key",
            value=statistics.batches_decoded,
        )
        yield CounterMetricFamily(
            "nodi_dedup_evicted_early",
            "Keys forgotten before their window ended (the per-topic limit of 100,000): shorten the window",
            value=statistics.evicted_early,
        )


# -- the request path's series (Server.observe) ------------------------------------------
#
# Every request adds to these on the event loop, so they are plain dicts of numbers, not
# prometheus-client objects (a lock per counter, label validation, a Python loop over the
# buckets: about a seventh of a ListOffsets' loop CPU). The scrape thread copies them
# under one lock and turns them into the same families, names, labels, buckets and
# values prometheus-client's Counter and Histogram exported.

# The histograms' upper bounds, +Inf last (a value falls in the first bound >= it, as `le`).
_LATENCY_BOUNDS_S = (*map(float, LATENCY_BUCKETS_S), float("inf"))
_LATENCY_LE = tuple(floatToGoString(bound) for bound in _LATENCY_BOUNDS_S)


def _observe_latency(series: dict[tuple[str, ...], list], key: tuple[str, ...], bucket: int, seconds: float) -> None:
    """Count `seconds` in `bucket` of the series `key`: a list of per-bucket counts (not
    cumulative), the sum of the observations last."""
    counts = series.get(key)
    if counts is None:
        counts = series[key] = [0] * len(_LATENCY_BOUNDS_S) + [0.0]
    counts[bucket] += 1
    counts[-1] += seconds


def _add(counter: dict[tuple[str, ...], int], key: tuple[str, ...], amount: int) -> None:
    counter[key] = counter.get(key, 0) + amount


@dataclass(frozen=True)
class RequestStatistics:
    """The request path's counts at one moment, each keyed by its label values in the
    order the series first appeared. A latency series is its per-bucket counts (bounds
    LATENCY_BUCKETS_S, then +Inf) followed by the sum of the seconds observed."""

    requests: dict[tuple[str, ...], int]  # (api, error)
    errors: dict[tuple[str, ...], int]  # (code,)
    latency: dict[tuple[str, ...], tuple[float, ...]]  # (api,)
    produce_latency: dict[tuple[str, ...], tuple[float, ...]]  # (topic, acks)
    fetch_latency: dict[tuple[str, ...], tuple[float, ...]]  # (topic,)
    messages_in: dict[tuple[str, ...], int]  # (topic,), and the rest likewise
    bytes_in: dict[tuple[str, ...], int]
    messages_out: dict[tuple[str, ...], int]
    bytes_out: dict[tuple[str, ...], int]


class RequestMetrics:
    """Counts of the requests answered, fed by Metrics.observe and count_error on the
    event loop, exported at scrape time (collect(), on the HTTP server's thread).

    One lock guards them: a writer takes it once per request (uncontended, a fraction of
    a microsecond), and statistics() takes it to copy, so a scrape sees every series at
    the same moment (a histogram's count is its +Inf bucket, nodi_requests_total adds up
    to nodi_request_latency_seconds_count) whichever thread observes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, ...], int] = {}
        self._errors: dict[tuple[str, ...], int] = {}
        self._latency: dict[tuple[str, ...], list] = {}
        self._produce_latency: dict[tuple[str, ...], list] = {}
        self._fetch_latency: dict[tuple[str, ...], list] = {}
        self._messages_in: dict[tuple[str, ...], int] = {}
        self._bytes_in: dict[tuple[str, ...], int] = {}
        self._messages_out: dict[tuple[str, ...], int] = {}
        self._bytes_out: dict[tuple[str, ...], int] = {}
        self._api_names = {
            request: m.API_BY_KEY[key].key.name.lower() for (key, _), (request, _, _) in m.MESSAGES_BY_VERSION.items()
        }

    def count_error(self, code: ErrorCode) -> None:
        key = (code.name.lower(),)
        with self._lock:
            _add(self._errors, key, 1)

    def observe(self, request: m.Request, reply, seconds: float) -> None:
        """Count one answered request: its API and error code, its latency, and for a
        produce or a fetch what it moved. Everything but the additions is worked out
        before the lock."""
        api = self._api_names.get(type(request), "unknown")
        response = reply.response
        code = response.error_code
        error = _error_label(code)
        bucket = bisect_left(_LATENCY_BOUNDS_S, seconds)
        with self._lock:
            _add(self._requests, (api, error), 1)
            _observe_latency(self._latency, (api,), bucket, seconds)
            if isinstance(request, m.ProduceRequest):
                topic = (request.topic,)
                _observe_latency(
                    self._produce_latency, (request.topic, _ACKS_NAMES.get(request.acks, "unknown")), bucket, seconds
                )
                if code != ErrorCode.NONE:
                    _add(self._errors, (error,), 1)
                elif not response.duplicates:  # publish dedup: nothing was written
                    _add(self._bytes_in, topic, len(request.records))
                    if response.last_offset >= 0:
                        _add(self._messages_in, topic, response.last_offset - response.base_offset + 1)
                    elif request.acks is m.Acks.NONE:
                        _add(self._messages_in, topic, _offsets_in(request.records))
            elif isinstance(request, m.FetchRequest):
                topic = (request.topic,)
                _observe_latency(self._fetch_latency, topic, bucket, seconds)
                if code != ErrorCode.NONE:
                    _add(self._errors, (error,), 1)
                else:
                    _add(self._bytes_out, topic, reply.records_bytes)
                    if reply.slices:
                        _add(self._messages_out, topic, _offsets_sent(reply.slices))
            elif code != ErrorCode.NONE:
                _add(self._errors, (error,), 1)

    def statistics(self) -> RequestStatistics:
        with self._lock:
            return RequestStatistics(
                requests=self._requests.copy(),
                errors=self._errors.copy(),
                latency={key: tuple(counts) for key, counts in self._latency.items()},
                produce_latency={key: tuple(counts) for key, counts in self._produce_latency.items()},
                fetch_latency={key: tuple(counts) for key, counts in self._fetch_latency.items()},
                messages_in=self._messages_in.copy(),
                bytes_in=self._bytes_in.copy(),
                messages_out=self._messages_out.copy(),
                bytes_out=self._bytes_out.copy(),
            )

    def collect(self):
        statistics = self.statistics()
        yield _counter_family(
            "nodi_requests",
            "Requests answered, by API and error code (`none` on success)",
            ["api", "error"],
            statistics.requests,
        )
        yield _counter_family(
            "nodi_errors",
            "Errors answered or closing a connection, by error code (lower-case name)",
            ["code"],
            statistics.errors,
        )
        yield _latency_family(
            "nodi_request_latency_seconds", "Request decoded to reply ready, every API", ["api"], statistics.latency
        )
        yield _latency_family(
            "nodi_produce_latency_seconds",
            'Produce decoded to reply ready; `acks="durable"` includes the fsync (group commit)',
            ["topic", "acks"],
            statistics.produce_latency,
        )
        yield _latency_family(
            "nodi_fetch_latency_seconds",
            "Fetch decoded to reply ready, long-poll wait included (an idle consumer's fetches take `wait_ms`)",
            ["topic"],
            statistics.fetch_latency,
        )
        yield _counter_family("nodi_messages_in", "Records appended (offsets taken)", ["topic"], statistics.messages_in)
        yield _counter_family("nodi_bytes_in", "Record batch bytes appended", ["topic"], statistics.bytes_in)
        yield _counter_family(
            "nodi_messages_out",
            "Records in the batches sent to consumers (whole batches: a fetch from inside a batch counts all of it)",
            ["topic"],
            statistics.messages_out,
        )
        yield _counter_family("nodi_bytes_out", "Record batch bytes sent to consumers", ["topic"], statistics.bytes_out)


def _counter_family(
    name: str, documentation: str, labels: list[str], counts: dict[tuple[str, ...], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in counts.items():
        family.add_metric(key, float(count))
    return family


def _latency_family(
    name: str, documentation: str, labels: list[str], series: dict[tuple[str, ...], tuple[float, ...]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, counts in series.items():
        cumulative, buckets = 0.0, []
        for le, count in zip(_LATENCY_LE, counts):  # the sum, last, is left out
            cumulative += count
            buckets.append((le, cumulative))
        family.add_metric(key, buckets, counts[-1])
    return family


class Metrics:
    def __init__(self, host: str, port: int, security: SecuritySettings = DEFAULT_SECURITY_SETTINGS) -> None:
        disable_created_metrics()  # the *_created series only add noise to every counter
        self.host = host
        self.port = port
        # With a server certificate the endpoint is HTTPS (the same certificate; client
        # certificates as security.tls_client_auth says). Not reloaded on SIGHUP.
        self.security = security
        self.registry = CollectorRegistry()
        self._http: WSGIServer | None = None
        # The request path's series, registered first so they export first, as before.
        self.request_metrics = RequestMetrics()
        self.registry.register(self.request_metrics)

    def listen(self) -> None:
        """Bind and serve the HTTP endpoint (OSError when the port is taken). The
        server calls it before it opens the data directory, so a taken port fails a start
        that has touched nothing."""
        if self.port >= 0 and self._http is None:
            tls = self.security
            self._http, _thread = start_http_server(
                self.port,
                addr=self.host,
                registry=self.registry,
                certfile=tls.tls_cert_file or None,
                keyfile=(tls.tls_key_file or tls.tls_cert_file) if tls.tls else None,
                client_cafile=tls.tls_client_ca_file or None,
                client_auth_required=tls.tls_client_auth == "required",
            )
            self.port = self._http.server_port

    def start(self, server) -> None:
        """Export the server's own figures too (its store is open)."""
        self.listen()
        self.registry.register(_StoreCollector(server))
        if self._http is not None:
            scheme = "https" if self.security.tls else "http"
            log.info(
                "metrics on %s://%s:%d/metrics",
                scheme,
                self.host,
                self.port,
                extra={"host": self.host, "port": self.port},
            )

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def count_error(self, code: ErrorCode) -> None:
        self.request_metrics.count_error(code)

    def observe(self, request: m.Request, reply, seconds: float) -> None:
        """Count an answered request (Server.observe, on the event loop, every request)."""
        self.request_metrics.observe(request, reply, seconds)
