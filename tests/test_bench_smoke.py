"""tools/storage_bench.py --quick runs to the end and writes the JSON it promises.
No timing is asserted here: speed is measured by the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as the repository root runs it: tools is a package (python -m tools.storage_bench).
BENCH = ["-m", "tools.storage_bench"]


def test_storage_bench_quick_run_writes_its_json(tmp_path: Path) -> None:
    json_path = tmp_path / "bench.json"
    data_parent = tmp_path / "data"
    completed = subprocess.run(
        [sys.executable, *BENCH, "--quick", "--data-dir", str(data_parent), "--json-out", str(json_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Ratios vs targets" in completed.stdout
    results = json.loads(json_path.read_text())

    assert {"machine", "settings", "rounds", "append", "read", "restart", "ratios"} <= results.keys()
    assert {"nproc", "memory_gib", "kernel", "python", "disk_fs_type"} <= results["machine"].keys()
    assert len(results["rounds"]) == 1
    for one in results["rounds"]:
        raw = one["raw"]
        assert {"mb_per_s", "bytes", "seconds"} <= raw["sequential_write"].keys()
        assert [loop["batch_records"] for loop in raw["fdatasync_loop"]] == [1, 10, 100]
        assert len(one["append"]) == 18

    cells = {(cell["policy"], cell["batch_records"], cell["appenders"]) for cell in results["append"]}
    assert cells == {
        (policy, batch_records, appenders)
        for policy in ("always", "interval", "never")
        for batch_records in (1, 10, 100)
        for appenders in (1, 8)
    }
    for cell in results["append"]:
        assert {"records_per_s", "mb_per_s", "records", "bytes", "seconds"} <= cell.keys()
        assert cell["records"] > 0

    reads = {(row["batch_records"], row["mode"], row["pass"]) for row in results["read"]}
    for batch_records in (1, 10, 100):
        for mode in ("to_bytes", "decode"):
            assert {(batch_records, mode, "first"), (batch_records, mode, "second")} <= reads
    for row in results["read"]:
        assert {"records_per_s", "mb_per_s"} <= row.keys()
        assert row["records"] > 0

    assert len(results["restart"]) >= 2
    for restart in results["restart"]:
        for kind in ("unclean", "clean"):
            assert {"open_seconds", "rss_peak_kib", "ru_maxrss_kib", "tail_records"} <= restart[kind].keys()
        assert restart["clean"]["clean_shutdown"] is True
        assert restart["unclean"]["clean_shutdown"] is False
        assert restart["unclean"]["lost_anything"] is False

    for ratio in results["ratios"]:
        assert {"name", "value", "values", "target", "met"} <= ratio.keys()
    names = " ".join(ratio["name"] for ratio in results["ratios"])
    for expected in (
        "vs raw sequential write",
        "8 appenders vs 1",
        "vs raw write+fdatasync loop",
        "Log.open after SIGKILL",
        "peak RSS",
    ):
        assert expected in names
    # The bench cleaned up after itself: only the parent directory it was given remains.
    assert list(data_parent.iterdir()) == []


def test_partitions_bench_quick_run_measures_every_phase(tmp_path: Path) -> None:
    """tools/partitions_bench.py --quick: a broker of 20 partitions created, filled,
    produced to, restarted cleanly and after kill -9; each figure in its JSON."""
    json_path = tmp_path / "partitions.json"
    completed = subprocess.run(
        [sys.executable, "-m", "tools.partitions_bench", "--quick", "--json-out", str(json_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    (cell,) = json.loads(json_path.read_text())["cells"]
    assert cell["partitions"] == 20
    for figure in ("create_s", "fill_s", "idle_rss_kib"):
        assert cell[figure] > 0, figure
    for restart in ("restart_clean", "restart_after_kill"):
        for moment in ("listening_s", "described_s", "describe_request_s", "first_read_s", "background_done_s"):
            assert cell[restart][moment] > 0, (restart, moment)
    assert cell["produce"]["p50_ms"] > 0 and cell["produce"]["threads_max"] > 0


def test_metrics_scrape_bench_quick_run_scrapes_both_modes(tmp_path: Path) -> None:
    """tools/metrics_scrape_bench.py --quick: 4 topics of 5 partitions scraped per
    partition and per topic, with none and every partition open; per topic is smaller."""
    json_path = tmp_path / "scrape.json"
    completed = subprocess.run(
        [sys.executable, "-m", "tools.metrics_scrape_bench", "--quick", "--json-out", str(json_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    per_partition, per_topic = json.loads(json_path.read_text())["cells"]
    assert (per_partition["limit"], per_topic["limit"]) == (20, 10)
    for state in ("none_open", "all_open"):
        assert per_partition[state]["median_s"] > 0 and per_topic[state]["median_s"] > 0
        assert 0 < per_topic[state]["samples"] < per_partition[state]["samples"], state
