"""The metric tables of docs/operations.md, rendered from the metrics registry itself:
every family a running broker exports (the request-path Counters and Histograms of
Metrics, and the families _StoreCollector reads at scrape time), with its exported name
(a counter's `_total` included), type, labels and HELP text. tests/test_ops_metrics.py
checks the document is up to date; to refresh it:

    python -m nodi.broker.server.metrics_docs docs/operations.md

It starts a broker in this process on a temporary data directory (127.0.0.1, a free
port, no metrics endpoint), collects once and stops it, so a family that only exists
while a component runs is listed all the same. The tables sit between
`<!-- BEGIN GENERATED metrics -->` and `<!-- END GENERATED metrics -->`; the prose
around them is written by hand. A new family lands in the section whose prefix it
has, else in the last one.
"""

from __future__ import annotations

import asyncio
import re
import sys
import tempfile
from dataclasses import dataclass

from ..protocol.docs import rewrite_generated

# Sections of the generated block, in order: (title, what is written under the title,
# the name prefixes that put a family there). The last section takes every family no
# other prefix claims.
SECTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "Requests, throughput, errors",
        "",
        (
            "nodi_requests",
            "nodi_errors",
            "nodi_request_",
            "nodi_produce_",
            "nodi_fetch_",
            "nodi_messages_",
            "nodi_bytes_",
        ),
    ),
    ("Partition logs, fsync, group commit", "", ("nodi_log_", "nodi_partition_", "nodi_fsync", "nodi_group_commit")),
    ("Metadata store", "", ("nodi_metadata_",)),
    (
        "Consumers and stream groups",
        "Handover figures are since the server started, per group.",
        ("nodi_consumer_", "nodi_group_"),
    ),
    ("Queue groups", "Counts are since the server started; the window figures are now.", ("nodi_queue_",)),
    ("Request-reply inboxes", 'In memory, see docs/guarantees.md "Request-reply".', ("nodi_inboxes", "nodi_replies_")),
    (
        "Compaction",
        "Partitions of topics with cleanup policy `compact` or `compact,delete`; counts are since\n"
        "the server started (the compactor's statistics()).",
        ("nodi_compaction_",),
    ),
    ("Publish dedup", 'Counts are since the server started (docs/guarantees.md, "Publish dedup").', ("nodi_dedup_",)),
    ("Server, connections, disk", "", ()),
)

_BLOCK = re.compile(r"(<!-- BEGIN GENERATED metrics -->)\n(?:.*?\n)?(<!-- END GENERATED metrics -->)", re.DOTALL)


@dataclass(frozen=True)
class MetricRow:
    name: str  # as exported: a counter with _total
    type: str  # counter, gauge, histogram
    labels: tuple[str, ...]
    help: str


def _row(family, labels) -> MetricRow:
    name = family.name + "_total" if family.type == "counter" else family.name
    return MetricRow(name, family.type, tuple(labels), family.documentation)


def registry_rows() -> list[MetricRow]:
    """Every family of a real broker's registry, in the order it exports them."""
    from .config import ServerConfig
    from .metrics import Metrics
    from .server import Server

    rows: list[MetricRow] = []

    def collect(server: Server) -> None:
        for collector in list(server.metrics.registry._collector_to_names):
            # A Counter/Histogram knows its label names; a collector's families carry theirs.
            declared = getattr(collector, "_labelnames", None)
            for family in collector.collect():
                rows.append(_row(family, declared if declared is not None else family._labelnames))
        server.stop("metrics docs collected")

    async def main(data_dir: str) -> None:
        metrics = Metrics("127.0.0.1", -1)  # registry and collectors, no HTTP endpoint
        server = Server(ServerConfig(data_dir=data_dir, port=0, metrics_port=-1), metrics=metrics)
        await asyncio.wait_for(server.run(on_ready=collect), 60)

    with tempfile.TemporaryDirectory(prefix="nodi-metrics-docs-") as data_dir:
        asyncio.run(main(data_dir))
    return rows


def _section_of(name: str) -> int:
    for index, (_title, _intro, prefixes) in enumerate(SECTIONS):
        if any(name.startswith(prefix) for prefix in prefixes):
            return index
    return len(SECTIONS) - 1


def render(rows: list[MetricRow]) -> str:
    """The generated block: a table per section, rows in the registry's order."""
    parts = []
    for index, (title, intro, _prefixes) in enumerate(SECTIONS):
        mine = [row for row in rows if _section_of(row.name) == index]
        if not mine:
            continue
        lines = [f"### {title}", ""]
        if intro:
            lines += [intro, ""]
        lines += ["| name | type | labels | meaning |", "|---|---|---|---|"]
        for row in mine:
            meaning = row.help[:1].lower() + row.help[1:] if row.help[1:2].islower() else row.help
            meaning = meaning.replace("|", "\\|")
            labels = f" {', '.join(row.labels)} " if row.labels else " "
            lines.append(f"| `{row.name}` | {row.type} |{labels}| {meaning} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def update_document(text: str, rows: list[MetricRow] | None = None) -> str:
    """`text` with the generated metrics block re-rendered; ValueError without one."""
    if not _BLOCK.search(text):
        raise ValueError("docs/operations.md lacks the generated metrics block")
    block = render(registry_rows() if rows is None else rows)
    return _BLOCK.sub(lambda match: f"{match.group(1)}\n{block}\n{match.group(2)}", text, count=1)


def main(argv: list[str]) -> int:
    return rewrite_generated(argv[1] if len(argv) > 1 else "docs/operations.md", update_document)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
