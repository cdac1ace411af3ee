"""tools/queue_bench.py --quick, run through `nodi bench --suite queues`, goes to the
end against its own `nodi serve` and writes the JSON it promises. Only the shape and the
counts are checked (every message consumed by every phase, none twice); no timing is
asserted: speed is measured by the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

NODI = [sys.executable, "-m", "nodi.cli.main"]


def test_queue_bench_quick_run_writes_its_json(tmp_path: Path) -> None:
    json_path = tmp_path / "queue-bench.json"
    completed = subprocess.run(
        [
            *NODI,
            "bench",
            "--suite",
            "queues",
            "--quick",
            "--messages",
            "1000",
            "--requests",
            "50",
            "--concurrency",
            "4",
            "--data-dir",
            str(tmp_path / "data"),
            "--json-out",
            str(json_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Queues and request-reply (issue 4)" in completed.stdout
    results = json.loads(json_path.read_text())

    assert {
        "machine",
        "settings",
        "limits",
        "produce",
        "stream",
        "queue_1",
        "queue_4_processes",
        "queue_4_in_loop",
        "request_reply",
        "targets",
        "nodi_server",
    } <= results.keys()
    assert {"load_average_start", "load_average_end", "nproc", "disk_fs_type"} <= results["machine"].keys()
    assert results["settings"]["value_bytes"] == 1024
    for limit in ("fdatasync_small", "lmdb_commit"):
        assert {"latency_ms_p50", "latency_ms_p99"} <= results["limits"][limit].keys()
    assert results["produce"]["messages"] == 1000
    assert results["stream"]["messages"] == 1000
    for phase in ("queue_1", "queue_4_processes", "queue_4_in_loop"):
        figures = results[phase]
        assert {"msg_per_s", "mb_per_s", "seconds", "load_average", "server_cpu_us_per_message"} <= figures.keys()
        assert figures["messages"] == figures["distinct_messages"] == 1000, phase  # all, none twice
        assert figures["errors"] == 0
    assert len(results["queue_4_processes"]["per_consumer_messages"]) == 4
    assert [one["fsync_policy"] for one in results["request_reply"]] == ["always", "never"]
    for one in results["request_reply"]:
        for kind, concurrency in (("sequential", 1), ("concurrent", 4)):
            figures = one[kind]
            assert figures["concurrency"] == concurrency
            assert figures["requests"] == 50 // concurrency * concurrency
            assert {"round_trips_per_s", "latency_ms_p50", "latency_ms_p99", "latency_ms_max"} <= figures.keys()
    assert {"queue_1_vs_stream", "queue_target_met", "request_p99_ms", "request_target_met"} <= results[
        "targets"
    ].keys()
