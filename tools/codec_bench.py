#!/usr/bin/env python3
"""What each record codec costs (storage/codecs.py): a batch of --records JSON-like
values of about --record-bytes each, built as nodi's producer builds it
(records.build_batch) and decoded as a consumer decodes it (records.decode_batches), per
codec, in one process, with no server and no disk. Figures: the batch's size as a share
of the values' bytes, and build and decode throughput in MB of values per second (the
median of --rounds rounds of about half a second each). docs/benchmarks.md has them.

    .venv/bin/python -m tools.codec_bench
    .venv/bin/python -m tools.codec_bench --json codecs.json

The values are repetitive the way application JSON is (field names, small numbers)
with 64 random bytes in hex in each, so no codec gets a free ride on zeros.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

from nodi.storage import records
from nodi.storage.records import Compression, NewRecord

ROUND_SECONDS = 0.5


def values(count: int, size: int) -> list[bytes]:
    out = []
    for i in range(count):
        document = {
            "id": i,
            "name": f"customer-{i}",
            "items": [{"sku": f"A{i * 7 % 99991:05d}", "qty": i % 5 + 1}] * 8,
            "note": os.urandom(64).hex(),
        }
        out.append(json.dumps(document).encode()[:size].ljust(size, b" "))
    return out


def per_second(action, seconds: float = ROUND_SECONDS) -> float:
    """Calls of `action` per second over about `seconds`."""
    calls = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        action()
        calls += 1
    return calls / elapsed


def measure(count: int, size: int, rounds: int, seconds: float = ROUND_SECONDS) -> list[dict]:
    """Rounds interleave the codecs (each round measures every codec in turn), so a
    machine whose load drifts weighs on all of them alike."""
    new = [NewRecord(None, value) for value in values(count, size)]
    value_bytes = count * size
    batches = {codec: records.build_batch(new, compression=codec) for codec in Compression}
    build: dict[Compression, list[float]] = {codec: [] for codec in Compression}
    decode: dict[Compression, list[float]] = {codec: [] for codec in Compression}
    for _ in range(rounds):
        for codec in Compression:
            build[codec].append(per_second(functools.partial(records.build_batch, new, compression=codec), seconds))
            decode[codec].append(per_second(functools.partial(records.decode_batches, batches[codec]), seconds))
    return [
        {
            "codec": codec.name.lower(),
            "batch_share_of_values": len(batches[codec]) / value_bytes,
            "build_mb_per_s": statistics.median(build[codec]) * value_bytes / 1e6,
            "decode_mb_per_s": statistics.median(decode[codec]) * value_bytes / 1e6,
        }
        for codec in Compression
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.codec_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=800, help="records per batch (800)")
    parser.add_argument("--record-bytes", type=int, default=1024, help="bytes per value (1024)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per figure; the median is kept (5)")
    parser.add_argument("--round-seconds", type=float, default=ROUND_SECONDS, help="length of a round (0.5)")
    parser.add_argument("--json", help="also write the figures to this file")
    arguments = parser.parse_args(argv)
    results = measure(arguments.records, arguments.record_bytes, arguments.rounds, arguments.round_seconds)
    print(f"{arguments.records} values of {arguments.record_bytes} B per batch, median of {arguments.rounds} rounds")
    print(f"{'codec':8} {'size':>7} {'build MB/s':>11} {'decode MB/s':>12}")
    for one in results:
        print(
            f"{one['codec']:8} {one['batch_share_of_values']:>7.2f} {one['build_mb_per_s']:>11.0f} "
            f"{one['decode_mb_per_s']:>12.0f}"
        )
    if arguments.json:
        with open(arguments.json, "w") as out:
            json.dump({"records": arguments.records, "record_bytes": arguments.record_bytes, "codecs": results}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
