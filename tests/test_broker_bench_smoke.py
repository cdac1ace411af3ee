"""tools/broker_bench.py --quick (and `nodi bench`) runs to the end against its own
`nodi serve` and writes the JSON it promises. Redis is left out (a redis-server path that
does not exist: the tool must say so and report nodi alone). No timing is asserted here:
speed is measured by the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as the repository root runs it: tools is a package (python -m tools.broker_bench).
BENCH = ["-m", "tools.broker_bench"]
NODI = [sys.executable, "-m", "nodi.cli.main"]


def test_broker_bench_quick_run_writes_its_json(tmp_path: Path) -> None:
    json_path = tmp_path / "bench.json"
    data_parent = tmp_path / "data"
    completed = subprocess.run(
        [
            sys.executable,
            *BENCH,
            "--quick",
            "--messages",
            "2000",
            "--latency-seconds",
            "0.3",
            "--redis-server",
            str(tmp_path / "no-such-redis-server"),
            "--data-dir",
            str(data_parent),
            "--json-out",
            str(json_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Ratios" in completed.stdout
    assert "Redis: not run: redis-server not found" in completed.stdout
    results = json.loads(json_path.read_text())

    assert {"machine", "settings", "rounds", "summary", "ratios", "nodi_server", "redis_status"} <= results.keys()
    assert {"nproc", "kernel", "python", "disk_fs_type", "load_average_start", "load_average_end"} <= results[
        "machine"
    ].keys()
    assert results["settings"]["value_bytes"] == 1024
    assert results["settings"]["messages"] == 2000
    assert len(results["rounds"]) == 1
    one = results["rounds"][0]
    assert one["redis"] is None
    limits = one["limits"]
    assert {"mb_per_s", "bytes", "seconds"} <= limits["sequential_write"].keys()
    for loop in ("fdatasync_small", "fdatasync_batch"):
        assert {"latency_ms_p50", "latency_ms_p99", "writes_per_s"} <= limits[loop].keys()
    nodi = one["nodi"]
    for phase in ("produce", "consume"):
        assert {"messages", "msg_per_s", "mb_per_s", "seconds", "client_cpu_seconds", "server_cpu_seconds"} <= nodi[
            phase
        ].keys()
    # Everything produced was acknowledged and read back (counts, not speed).
    assert nodi["produce"]["errors"] == 0
    assert nodi["produce"]["messages"] == 2000
    assert nodi["consume"]["messages"] == 2000
    latency = nodi["latency"]
    assert {"latency_ms_p50", "latency_ms_p99", "latency_ms_max", "samples", "missing"} <= latency.keys()
    # The server's own fsync histogram, scraped around the phases: the fsyncs happened.
    for phase in ("produce", "latency"):
        assert {"server_fsyncs", "messages_per_fsync", "server_fsync_ms_p50", "server_fsync_ms_p99"} <= nodi[
            phase
        ].keys()
        assert nodi[phase]["server_fsyncs"] > 0
    assert latency["missing"] == 0 and latency["samples"] > 0

    assert results["summary"]["redis"] is None
    assert {"produce", "consume", "latency"} <= results["summary"]["nodi"].keys()
    names = " ".join(ratio["name"] for ratio in results["ratios"])
    assert "vs Redis (msg/s)" not in names  # nothing to compare with
    assert "end-to-end p99" in names and "raw sequential write" in names
    for ratio in results["ratios"]:
        assert {"name", "value", "values", "target", "met"} <= ratio.keys()
    # The bench stopped its server and removed its directory.
    assert list(data_parent.iterdir()) == []


def test_nodi_bench_passes_its_options_to_the_tool() -> None:
    completed = subprocess.run(NODI + ["bench", "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    for option in ("--quick", "--server", "--json-out", "--no-redis", "--messages"):
        assert option in completed.stdout
    bad = subprocess.run(NODI + ["bench", "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
