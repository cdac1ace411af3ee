"""tools/log_append_time_bench.py --quick runs its interleaved pairs against its own
`nodi serve` and writes the JSON it promises. No timing is asserted here: speed is
measured by the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_log_append_time_bench_quick_run_writes_its_json(tmp_path: Path) -> None:
    json_path = tmp_path / "log-append-time.json"
    completed = subprocess.run(
        [sys.executable, "-m", "tools.log_append_time_bench", "--quick", "--json-out", str(json_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(json_path.read_text())
    assert results["rounds"] == 2
    for kind in ("create", "log-append"):
        assert len(results["batched_msg_per_s"][kind]) == 2 and all(v > 0 for v in results["batched_msg_per_s"][kind])
        assert len(results["single_latency_ms_p50"][kind]) == 2
    assert results["batched_throughput_ratio_median"] > 0 and results["single_latency_ratio_median"] > 0
    assert results["fdatasync"]["writes"] > 0
    assert "log-append" in completed.stdout and "fdatasync" in completed.stdout
