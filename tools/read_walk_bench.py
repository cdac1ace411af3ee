"""A read's CPU in this process (issue 12): Log.read over 1 KiB batches of one record,
every batch already CRC-checked (I12), as a fetch finds them: a read of 1 MiB from the
middle of the log (about a thousand batches walked) and a read of one batch.

    python -m tools.read_walk_bench                  # 4,000 batches, median of 7 timings
    taskset -c 1 python -m tools.read_walk_bench     # pinned: steadier

CPU is the process's (time.process_time), the median of 7 timings of many reads; the
figure is per read. Nothing is fsynced: the log is written with fsync never and read
from the page cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.log import Log
from nodi.storage.records import NewRecord, build_batch

VALUE_BYTES = 1024
TIMINGS = 7


def cpu_us_per_call(call: Callable[[], object], calls: int) -> float:
    timings = []
    for _ in range(TIMINGS):
        started = time.process_time()
        for _ in range(calls):
            call()
        timings.append((time.process_time() - started) / calls)
    return statistics.median(timings) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4_000, help="1 KiB batches written first")
    parser.add_argument("--json-out", default=None, help="write the figures as JSON here")
    arguments = parser.parse_args()
    batch = build_batch([NewRecord(None, b"x" * VALUE_BYTES)])
    with tempfile.TemporaryDirectory(prefix="nodi-read-walk-") as directory:
        log = Log.open(directory, LogConfig(fsync_policy=FsyncPolicy.NEVER))
        try:
            for _ in range(arguments.batches):
                log.append_nowait(batch)
            log.flush()
            middle = arguments.batches // 4
            large = log.read(middle, 1 << 20)
            results = {
                "batches": arguments.batches,
                "read_1mib_us": cpu_us_per_call(lambda: log.read(middle, 1 << 20), 50),
                "read_1mib_bytes": large.byte_count,
                "read_one_batch_us": cpu_us_per_call(lambda: log.read(2 * middle, 1), 2_000),
            }
        finally:
            log.close()
    print(
        f"Log.read of {results['read_1mib_bytes']:,} bytes: {results['read_1mib_us']:.1f} us of CPU; "
        f"of one batch: {results['read_one_batch_us']:.2f} us"
    )
    if arguments.json_out:
        with open(arguments.json_out, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
