"""tools/read_walk_bench.py runs to the end and writes the JSON it promises, the large
read having found its megabyte. No timing is asserted: speed is the benchmark's own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_read_walk_bench_writes_its_json(tmp_path: Path) -> None:
    json_path = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "-m", "tools.read_walk_bench", "--batches", "2000", "--json-out", str(json_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    results = json.loads(json_path.read_text())
    assert results["batches"] == 2000
    assert 1_000_000 < results["read_1mib_bytes"] <= 1 << 20  # about a thousand 1 KiB batches
    assert results["read_1mib_us"] > 0 and results["read_one_batch_us"] > 0
