"""tools/compaction_bench.py --quick runs to the end and writes the JSON it promises.
No timing is asserted here: speed is measured by the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as the repository root runs it: tools is a package (python -m tools.compaction_bench).
BENCH = ["-m", "tools.compaction_bench"]


def test_compaction_bench_quick_run_writes_its_json(tmp_path: Path) -> None:
    json_path = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, *BENCH, "--quick", "--data-dir", str(tmp_path), "--json-out", str(json_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads(json_path.read_text())
    assert {"machine", "settings", "fill", "runs"} <= results.keys()
    assert {"records", "key_space", "bytes", "seconds"} <= results["fill"].keys()
    budgets = results["settings"]["key_map_budgets_bytes"]
    assert [run["key_map_bytes_max"] for run in results["runs"]] == budgets
    for run in results["runs"]:
        assert {
            "passes",
            "seconds",
            "log_bytes_before",
            "log_bytes_after",
            "bytes_read",
            "bytes_written",
            "bytes_reclaimed",
            "records_removed",
            "log_mb_per_s",
            "read_mb_per_s",
            "baseline_rss_bytes",
            "peak_rss_bytes",
            "rss_growth_bytes",
            "rss_growth_over_budget",
        } <= run.keys()
        assert run["log_bytes_after"] < run["log_bytes_before"]  # 10% live: most of it goes
