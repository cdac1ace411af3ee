"""Prometheus metrics on --metrics-port (prometheus-client). Names start with nodi_ and
are listed in docs/operations.md.

Request-path metrics are counted as replies go out (Server.observe); everything the
storage layer already counts (segments, bytes, offsets, fsyncs) is read from its
statistics() at scrape time by a collector, so the hot path pays nothing for it.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import messages as m
from .errors import ErrorCode

log = logging.getLogger("nodi.metrics")

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _StoreCollector:
    """Per-partition figures from Log.statistics(), read at scrape time."""

    def __init__(self, server) -> None:
        self.server = server

    def collect(self):
        labels = ["topic", "partition"]
        segments = GaugeMetricFamily("nodi_log_segments", "Segment files per partition", labels=labels)
        size = GaugeMetricFamily("nodi_log_bytes", "Bytes of segment files per partition", labels=labels)
        start = GaugeMetricFamily("nodi_log_start_offset", "First offset still stored", labels=labels)
        end = GaugeMetricFamily("nodi_log_end_offset", "Offset the next record gets", labels=labels)
        durable = GaugeMetricFamily("nodi_log_durable_offset", "Offsets below this are fsynced", labels=labels)
        read_only = GaugeMetricFamily("nodi_log_read_only", "1 when the partition is read-only after an I/O error", labels=labels)
        fsyncs = CounterMetricFamily("nodi_fsyncs", "fsync calls of partition logs", labels=labels)
        covered = CounterMetricFamily("nodi_fsync_covered_appends", "Appends made durable by those fsyncs (group commit)", labels=labels)
        store = self.server.store
        if store is not None:
            for topic, partition, partition_log in store.logs():
                key = [topic, str(partition)]
                statistics = partition_log.statistics()
                segments.add_metric(key, statistics.segment_count)
                size.add_metric(key, statistics.byte_count)
                start.add_metric(key, statistics.log_start_offset)
                end.add_metric(key, statistics.next_offset)
                durable.add_metric(key, statistics.durable_offset)
                read_only.add_metric(key, 1 if statistics.read_only else 0)
                fsyncs.add_metric(key, statistics.fsyncs)
                covered.add_metric(key, statistics.fsync_covered_appends)
        yield from (segments, size, start, end, durable, read_only, fsyncs, covered)
        connections = GaugeMetricFamily("nodi_connections", "Open client connections")
        connections.add_metric([], len(self.server.sessions))
        yield connections


class Metrics:
    def __init__(self, host: str, port: int) -> None:
        disable_created_metrics()  # the *_created series only add noise to every counter
        self.host = host
        self.port = port
        self.registry = CollectorRegistry()
        self._http = None
        self.requests = Counter("nodi_requests", "Requests answered", ["api", "error"], registry=self.registry)
        self.errors = Counter("nodi_errors", "Errors answered or closing a connection, by code", ["code"], registry=self.registry)
        self.latency = Histogram(
            "nodi_request_latency_seconds", "Time from request decoded to reply ready", ["api"],
            buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self.messages_in = Counter("nodi_messages_in", "Records appended", ["topic"], registry=self.registry)
        self.bytes_in = Counter("nodi_bytes_in", "Record batch bytes appended", ["topic"], registry=self.registry)
        self.bytes_out = Counter("nodi_bytes_out", "Record batch bytes sent to consumers", ["topic"], registry=self.registry)
        self._api_names = {api.request: api.key.name.lower() for api in m.APIS}

    def start(self, server) -> None:
        self.registry.register(_StoreCollector(server))
        if self.port >= 0:
            self._http, _thread = start_http_server(self.port, addr=self.host, registry=self.registry)
            self.port = self._http.server_port
            log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def count_error(self, code: ErrorCode) -> None:
        self.errors.labels(code.name.lower()).inc()

    def observe(self, request: m.Request, reply, seconds: float) -> None:
        api = self._api_names.get(type(request), "unknown")
        code = reply.response.error_code
        self.requests.labels(api, ErrorCode(code).name.lower()).inc()
        self.latency.labels(api).observe(seconds)
        if code != ErrorCode.NONE:
            self.count_error(ErrorCode(code))
            return
        if isinstance(request, m.ProduceRequest):
            self.bytes_in.labels(request.topic).inc(len(request.records))
            response = reply.response
            if response.last_offset >= 0:
                self.messages_in.labels(request.topic).inc(response.last_offset - response.base_offset + 1)
        elif isinstance(request, m.FetchRequest):
            self.bytes_out.labels(request.topic).inc(reply.records_bytes)
