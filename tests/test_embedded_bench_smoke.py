"""tools/embedded_bench.py --quick goes to the end and writes the JSON it promises: the
machine's limits, every nodi phase (each produced message received and acked), and the
competitors' phases when the bench extra is installed (else the reason they were left
out). No timing is asserted: speed is measured by the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_embedded_bench_quick_run_writes_its_json(tmp_path: Path) -> None:
    json_path = tmp_path / "embedded-bench.json"
    completed = subprocess.run(
        [sys.executable, "-m", "tools.embedded_bench", "--quick", "--json-out", str(json_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads(json_path.read_text())
    assert results["machine"]["fdatasync_1kib_per_s"] > 0
    phases = {row["phase"]: row for row in results["phases"]}
    produced = phases["nodi: producer (batched)"]["messages"]
    assert produced > 0 and phases["nodi: receive + ack (batched)"]["messages"] == produced
    one_at_a_time = phases["nodi: produce one at a time"]["messages"]
    assert 0 < phases["nodi: receive + ack one at a time"]["messages"] <= one_at_a_time
    for competitor in ("persist-queue", "litequeue"):
        ran = any(name.startswith(competitor + ":") for name in phases)
        skipped = any(reason.startswith(competitor) for reason in results["skipped"])
        assert ran != skipped
    assert all(row["ratio"] > 0 for row in results["ratios"])
