"""tools/latency_bench.py --quick runs its stream and queue workloads against its own
`nodi serve`, with the machine's limits measured beside them, and writes the JSON it
promises; `--only queue` runs the queue workloads without the stream end to end; its
strace summary parser reads strace's table. No timing is asserted here: speed is
measured by the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tools.latency_bench import parse_arguments, parse_strace_summary

ROOT = Path(__file__).resolve().parent.parent
# Windows of 100 in the smoke runs: enough that the queue group's phase (about 9 us of
# broker CPU a message) spans several of /proc's clock ticks (10 ms), so its CPU figure
# is measured, not rounded to 0 as it could be with --quick's 10 windows.
WINDOWS = 40
WINDOWED_MESSAGES = WINDOWS * 100

STRACE_SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 41.20    0.012000          40       300           fdatasync
 20.00    0.006000           5      1200        12 epoll_pwait
  3.00    0.000900           1       900           getpid
------ ----------- ----------- --------- --------- ----------------
100.00    0.018900           7      2400        12 total
"""


def test_strace_summary_is_read_by_name_without_the_total() -> None:
    assert parse_strace_summary(STRACE_SUMMARY) == {"fdatasync": 300, "epoll_pwait": 1200, "getpid": 900}


def run_quick(json_path: Path, *options: str) -> str:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.latency_bench",
            "--quick",
            "--messages",
            "30",
            "--windows",
            str(WINDOWS),
            "--json-out",
            str(json_path),
        ]
        + list(options),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout


def check_queue_workloads(results: dict) -> None:
    group = results["queue_group"]
    assert group["messages"] == WINDOWED_MESSAGES  # every windowed message received and acked
    assert group["ack"]["count"] == group["receive"]["count"] > 0
    assert group["server_cpu_us_per_message"] > 0
    ratio = results["queue_group_over_stream_group"]
    assert ratio == group["msg_per_s"] / results["consume"]["msg_per_s"]
    queue_end_to_end = results["queue_end_to_end"]
    assert queue_end_to_end["messages"] == 30
    for stage in ("end_to_end", "produce_ack", "ack", "cycle"):
        assert queue_end_to_end[stage]["count"] == 30
    assert queue_end_to_end["server_cpu_us_per_message"] > 0


def test_latency_bench_quick_run_writes_its_json(tmp_path: Path) -> None:
    json_path = tmp_path / "latency.json"
    output = run_quick(json_path)
    assert "one at a time, end to end" in output
    assert "queue one at a time, end to end" in output
    assert "queue group, batches of" in output
    results = json.loads(json_path.read_text())
    for name in ("limits_before", "limits_after"):
        assert {"fdatasync_1kib_ms_p50", "fdatasync_100kib_ms_p50", "loopback_rtt_ms_p50"} <= results[name].keys()
        assert all(value > 0 for value in results[name].values())
    assert results["window"]["count"] == WINDOWS
    assert results["window"]["messages"] == WINDOWED_MESSAGES
    assert results["consume"]["messages"] == WINDOWED_MESSAGES  # every windowed message read back
    end_to_end = results["end_to_end"]
    assert end_to_end["messages"] == 30
    for stage in ("end_to_end", "produce_ack", "commit", "cycle"):
        assert end_to_end[stage]["count"] == 30
    assert end_to_end["server_cpu_us_per_message"] > 0
    for phase in ("end_to_end_own", "end_to_end_nowait"):  # the same run with the other commit modes
        assert results[phase]["messages"] == 30
        assert results[phase]["end_to_end"]["count"] == 30
        assert results[phase]["server_cpu_us_per_message"] > 0
    check_queue_workloads(results)


def test_latency_bench_only_queue_runs_the_queue_workloads(tmp_path: Path) -> None:
    json_path = tmp_path / "latency.json"
    output = run_quick(json_path, "--only", "queue")
    assert "queue one at a time, end to end" in output
    results = json.loads(json_path.read_text())
    check_queue_workloads(results)
    assert results["consume"]["messages"] == WINDOWED_MESSAGES  # the stream group: the ratio's base
    assert not {"end_to_end", "end_to_end_own", "end_to_end_nowait"} & results.keys()


def test_latency_bench_only_stream_leaves_the_queue_workloads_out() -> None:
    assert parse_arguments(["--quick", "--only", "stream"]).only == "stream"
    assert parse_arguments(["--quick"]).only == "all"
