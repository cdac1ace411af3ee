"""tools/produce_walk_bench.py runs to the end and writes the JSON it promises: both
servers (with the record walk and without it) took every batch. No timing is asserted
here: speed is measured by the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as the repository root runs it: tools is a package (python -m tools.produce_walk_bench).
BENCH = ["-m", "tools.produce_walk_bench"]


def test_produce_walk_bench_quick_run_writes_its_json(tmp_path: Path) -> None:
    json_path = tmp_path / "bench.json"
    completed = subprocess.run(
        [
            sys.executable,
            *BENCH,
            "--quick",
            "--batches",
            "400",
            "--record-bytes",
            "100",  # enough CPU for 10 ms ticks
            "--data-dir",
            str(tmp_path),
            "--json-out",
            str(json_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    results = json.loads(json_path.read_text())
    assert {"machine", "fsync", "sizes"} <= results.keys()
    (size,) = results["sizes"]
    assert size["record_bytes"] == 100 and size["records_per_batch"] == 100
    for mode in ("walk", "off"):
        (run,) = size["runs"][mode]
        assert run["records_per_s"] > 0 and run["server_cpu_us_per_batch"] > 0
    assert size["walk_us"] > 0 and size["record_by_record_us"] > 0
