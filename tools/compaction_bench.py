#!/usr/bin/env python3
"""Compaction benchmark (issue 5): throughput of one compaction run over a log where 10%
of the records are live (each key written about ten times), and the run's peak RSS
against its key map budget.

    .venv/bin/python -m tools.compaction_bench                  # 1 GiB log, minutes
    .venv/bin/python -m tools.compaction_bench --quick          # smoke run, seconds
    .venv/bin/python -m tools.compaction_bench --volume-mb 256 --key-map-mb 64 16 --json-out r.json

What it does:
- fill: one partition log (compacted: dense_offsets off, fsync never, 128 MiB segments)
  of --volume-mb of batches of 100 records: keys drawn at random from a key space of
  records/10 keys (--live-percent), values of --value-bytes, 1% tombstones, then sealed
  (the active segment rolled) so the whole log is compactable.
- compact: for each --key-map-mb budget, a fresh copy of the filled log is compacted in
  a child process (Compactor.compact, as `nodi compact` does). The child reports the
  run's figures and its memory: VmRSS after opening the log (the baseline: Python, the
  modules, the log's open files) and VmHWM (peak RSS) after the run, from
  /proc/self/status; the growth is what the run itself used, to set against the budget.
  The page cache is warm (the log was just written or copied): the figure is the CPU
  cost of compaction, which is what bounds it in Python.
- throughput: sealed log bytes before the run / the run's wall time ("log MB/s"), and
  bytes read / wall time (the key map pass plus the copy pass, several with a small
  budget: "read MB/s").

Nothing here asserts a timing; tests/test_compaction_bench_smoke.py only runs --quick.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time

MIB = 1024 * 1024
RECORDS_PER_BATCH = 100
KEY_BYTES = 16
SEGMENT_BYTES = 128 * MIB
TOMBSTONE_SHARE = 0.01


def _log_config(segment_bytes: int):
    from nodi.storage.config import FsyncPolicy, LogConfig

    return LogConfig(
        segment_bytes=segment_bytes, fsync_policy=FsyncPolicy.NEVER, retention_ms=None, dense_offsets=False
    )


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fill(
    directory: str, volume_bytes: int, value_bytes: int, live_percent: float, segment_bytes: int, seed: int
) -> dict:
    from nodi.storage.log import Log
    from nodi.storage.records import NewRecord, build_batch

    record_bytes_estimate = value_bytes + KEY_BYTES + 12  # the record's framing, roughly
    records_total = max(volume_bytes // record_bytes_estimate, RECORDS_PER_BATCH)
    key_count = max(int(records_total * live_percent / 100), 1)
    generator = random.Random(seed)
    value = bytes(generator.randrange(256) for _ in range(value_bytes))
    started = time.monotonic()
    records = 0
    log = Log.open(directory, _log_config(segment_bytes))
    try:
        while log.statistics().byte_count < volume_bytes:
            batch = []
            for _ in range(RECORDS_PER_BATCH):
                key = b"key-%012d" % generator.randrange(key_count)
                batch.append(NewRecord(key, None if generator.random() < TOMBSTONE_SHARE else value, (), 0))
            log.append(build_batch(batch))
            records += RECORDS_PER_BATCH
        log.roll()
        byte_count = log.statistics().byte_count
    finally:
        log.close()
    return {
        "records": records,
        "key_space": key_count,
        "bytes": byte_count,
        "seconds": round(time.monotonic() - started, 2),
    }


def compact_child(directory: str, key_map_bytes_max: int, segment_bytes: int) -> None:
    """Run in a fresh process: compact the log in `directory`, print the figures as JSON."""
    from nodi.storage.compaction import CompactionConfig, Compactor
    from nodi.storage.log import Log

    log = Log.open(directory, _log_config(segment_bytes))
    baseline = _status_bytes("VmRSS")
    sealed_before = sum(segment.size for segment in log.segments[:-1])
    compactor = Compactor(CompactionConfig(key_map_bytes_max=key_map_bytes_max))
    started = time.monotonic()
    result = compactor.compact(log)
    seconds = time.monotonic() - started
    peak = _status_bytes("VmHWM")
    after = log.statistics().byte_count
    log.close()
    print(
        json.dumps(
            {
                "key_map_bytes_max": key_map_bytes_max,
                "passes": result.passes,
                "segments_rewritten": result.segments_rewritten,
                "seconds": round(seconds, 2),
                "log_bytes_before": sealed_before,
                "log_bytes_after": after,
                "bytes_read": result.bytes_read,
                "bytes_written": result.bytes_written,
                "bytes_reclaimed": result.bytes_reclaimed,
                "records_removed": result.records_removed,
                "log_mb_per_s": round(sealed_before / MIB / seconds, 2) if seconds else None,
                "read_mb_per_s": round(result.bytes_read / MIB / seconds, 2) if seconds else None,
                "baseline_rss_bytes": baseline,
                "peak_rss_bytes": peak,
                "rss_growth_bytes": None if peak is None or baseline is None else peak - baseline,
                "rss_growth_over_budget": None
                if peak is None or baseline is None
                else round((peak - baseline) / key_map_bytes_max, 2),
            }
        )
    )


def machine() -> dict:
    memory = None
    try:
        with open("/proc/meminfo") as file:
            memory = round(int(file.readline().split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "memory_gib": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (8 MiB log, 1 and 0.25 MiB maps)")
    parser.add_argument(
        "--volume-mb", type=float, default=None, help="MiB of log to fill (default 1024; 8 with --quick)"
    )
    parser.add_argument("--value-bytes", type=int, default=200, help="bytes of each record's value (default 200)")
    parser.add_argument(
        "--live-percent", type=float, default=10.0, help="key space as a share of the records (default 10)"
    )
    parser.add_argument(
        "--key-map-mb",
        type=float,
        nargs="+",
        default=None,
        help="key map budgets to compact with, one run each (default 64 16; 1 0.25 with --quick)",
    )
    parser.add_argument("--data-dir", default=None, help="parent of the bench's temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    parser.add_argument("--child-compact", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-key-map-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-segment-bytes", type=int, default=SEGMENT_BYTES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.child_compact:
        compact_child(arguments.child_compact, arguments.child_key_map_bytes, arguments.child_segment_bytes)
        return 0
    volume_mb = arguments.volume_mb or (8 if arguments.quick else 1024)
    budgets_mb = arguments.key_map_mb or ([1, 0.25] if arguments.quick else [64, 16])
    segment_bytes = 1 * MIB if arguments.quick else SEGMENT_BYTES
    root = tempfile.mkdtemp(prefix="nodi-compaction-bench-", dir=arguments.data_dir)
    try:
        filled = os.path.join(root, "filled")
        print(f"filling {volume_mb:g} MiB ...", file=sys.stderr, flush=True)
        filling = fill(
            filled, int(volume_mb * MIB), arguments.value_bytes, arguments.live_percent, segment_bytes, seed=5
        )
        runs = []
        for budget_mb in budgets_mb:
            copy = os.path.join(root, f"run-{budget_mb:g}")
            shutil.copytree(filled, copy)
            print(f"compacting with a {budget_mb:g} MiB key map ...", file=sys.stderr, flush=True)
            completed = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--child-compact",
                    copy,
                    "--child-key-map-bytes",
                    str(int(budget_mb * MIB)),
                    "--child-segment-bytes",
                    str(segment_bytes),
                ],
                capture_output=True,
                text=True,
                timeout=6 * 3600,
            )
            if completed.returncode != 0:
                print(completed.stderr, file=sys.stderr)
                return 1
            runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
            shutil.rmtree(copy, ignore_errors=True)
        results = {
            "machine": machine(),
            "settings": {
                "volume_bytes": int(volume_mb * MIB),
                "value_bytes": arguments.value_bytes,
                "live_percent": arguments.live_percent,
                "records_per_batch": RECORDS_PER_BATCH,
                "segment_bytes": segment_bytes,
                "key_map_budgets_bytes": [int(budget * MIB) for budget in budgets_mb],
            },
            "fill": filling,
            "runs": runs,
        }
    finally:
        if not arguments.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=2))
    for run in runs:
        growth = run["rss_growth_bytes"]
        print(
            f"key map {run['key_map_bytes_max'] / MIB:g} MiB: {run['passes']} pass(es), {run['seconds']} s, "
            f"{run['log_mb_per_s']} log MB/s ({run['read_mb_per_s']} MB/s read), "
            f"{run['log_bytes_before'] / MIB:.0f} -> {run['log_bytes_after'] / MIB:.0f} MiB, "
            f"RSS +{'?' if growth is None else f'{growth / MIB:.0f}'} MiB over a {run['key_map_bytes_max'] / MIB:g} MiB budget",
            file=sys.stderr,
        )
    if arguments.json_out:
        with open(arguments.json_out, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
