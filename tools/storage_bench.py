#!/usr/bin/env python3
"""Storage engine benchmark (issue 2): append, read and restart figures of one
partition Log, beside this machine's raw disk limits measured in the same run.

    .venv/bin/python -m tools.storage_bench                 # full run, a few minutes
    .venv/bin/python -m tools.storage_bench --quick         # smoke run, seconds
    .venv/bin/python -m tools.storage_bench --json-out results.json

What it measures (docs/benchmarks.md explains how to read the figures):
- The run is made of rounds (--rounds). In each round every raw limit is measured just
  before the append cells it is compared with (the write+fdatasync loop of a batch size
  right before the fsync=always cells of that size; the sequential write right before
  the fsync=never cells with 100-record batches), and each ratio is computed within one
  round: the virtual disk of a cloud machine changes speed by several times from one
  minute to the next. The report gives the median over the rounds, with the range.
- raw limits: a sequential write of the append volume in 1 MiB os.write calls plus one
  final fdatasync, and a write+fdatasync loop with one batch's bytes per write.
- memory warm-up: on a VM with free page reporting (virtio-balloon), memory freed for
  about two seconds goes back to the host, and the next write into the page cache pays a
  host page fault per page: a 256 MiB write then runs at a few hundred MB/s instead of
  several GB/s. Every measured write volume is therefore preceded by writing the same
  volume to a scratch file and unlinking it unsynced (no disk I/O), for the raw write and
  every append cell alike. The raw sequential write is also measured "cold" (after
  sync and a pause) to show the effect.
- append: 1 KiB records in batches of 1, 10 and 100, under fsync always / interval /
  never, from 1 and 8 appender threads, each appending its own pre-built batches to the
  same Log. A cell ends at its volume or at its time cap, whichever comes first; its
  time includes a final Log.flush() so every cell ends with its bytes on disk, like the
  raw sequential write.
- read: Log.read over the whole log with a 1 MiB budget, as file-slice bytes (to_bytes)
  and decoded (records.decode_batches): the first pass after a reopen (which verifies
  the CRC of each batch once) and a second pass. Page cache warm, unless "cold".
- restart: a child appends the retained volume with fsync never (the last segment filled
  to the brim, the worst case for the scan) and is SIGKILLed; a fresh child times
  Log.open and reads the tail, reporting its peak RSS; then a clean reopen is timed the
  same way. Peak RSS is VmHWM from /proc/self/status: ru_maxrss of a child started by
  subprocess starts at its parent's RSS (Linux keeps the high-water mark across exec),
  so it is reported but not judged.

Nothing here asserts a timing; tests/test_bench_smoke.py only runs --quick.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics as statistics_module
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.limits import KIB, MIB
from nodi.storage.log import Log
from nodi.storage.records import NewRecord, build_batch, decode_batches

RECORD_VALUE_BYTES = 1 * KIB
BATCH_RECORD_COUNTS = (1, 10, 100)
APPENDER_COUNTS = (1, 8)
POLICIES = (FsyncPolicy.ALWAYS, FsyncPolicy.INTERVAL, FsyncPolicy.NEVER)
READ_BYTES_MAX = 1 * MIB
RAW_WRITE_BUFFER_BYTES = 1 * MIB
# Each appender cycles through this many bytes of distinct pre-built batches.
POOL_BYTES = 4 * MIB
TAIL_READ_BYTES = 8 * MIB
MB = 1_000_000  # throughput unit: MB/s = 10^6 bytes per second

TARGET_NEVER_VS_RAW = 0.5
TARGET_ALWAYS_8_VS_1 = 5.0
TARGET_RESTART_SECONDS = 2.0
# "RSS must not grow with retained bytes": the larger log may cost at most this much more.
TARGET_RSS_GROWTH_FRACTION = 0.10


def progress(message: str) -> None:
    print(f"[storage_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Settings and machine


@dataclass(frozen=True, slots=True)
class Settings:
    volume_bytes: int
    cell_seconds_max: float
    raw_loop_seconds: float
    restart_volumes_bytes: tuple[int, ...]
    restart_segment_bytes: int
    restart_batch_records: tuple[int, ...]
    rounds: int
    cold_pause_seconds: float
    batch_record_counts: tuple[int, ...]
    appender_counts: tuple[int, ...]
    policies: tuple[FsyncPolicy, ...]
    quick: bool


def settings_from_arguments(arguments: argparse.Namespace) -> Settings:
    if arguments.quick:
        volume_mb = arguments.volume_mb or 4
        return Settings(
            volume_bytes=int(volume_mb * MIB),
            cell_seconds_max=arguments.cell_seconds_max or 0.5,
            raw_loop_seconds=0.3,
            restart_volumes_bytes=(8 * MIB, 32 * MIB),
            restart_segment_bytes=4 * MIB,
            restart_batch_records=(100,),
            rounds=arguments.rounds or 1,
            cold_pause_seconds=0.0,
            batch_record_counts=BATCH_RECORD_COUNTS,
            appender_counts=APPENDER_COUNTS,
            policies=POLICIES,
            quick=True,
        )
    return Settings(
        volume_bytes=int((arguments.volume_mb or 256) * MIB),
        cell_seconds_max=arguments.cell_seconds_max or 6.0,
        raw_loop_seconds=2.0,
        restart_volumes_bytes=(256 * MIB, 1024 * MIB),
        restart_segment_bytes=LogConfig().segment_bytes,
        restart_batch_records=tuple(arguments.restart_batch_records),
        rounds=arguments.rounds or 3,
        cold_pause_seconds=3.0,
        batch_record_counts=BATCH_RECORD_COUNTS,
        appender_counts=APPENDER_COUNTS,
        policies=POLICIES,
        quick=False,
    )


def _mount_of(path: str) -> tuple[str, str, str]:
    """(device, mount point, file system type) of the mount holding `path`."""
    path = os.path.realpath(path)
    best = ("?", "/", "?")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, mount_point, fs_type = line.split()[:3]
                inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best[1]):
                    best = (device, mount_point, fs_type)
    except OSError:
        pass
    return best


def default_data_parent() -> str:
    """The system temp dir, unless it is memory-backed: then beside the repository."""
    temporary = tempfile.gettempdir()
    if _mount_of(temporary)[2] not in ("tmpfs", "ramfs"):
        return temporary
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".bench-data")


def machine_description(data_directory: str) -> dict:
    device, mount_point, fs_type = _mount_of(data_directory)
    memory_kib = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory_kib = int(line.split()[1])
    except OSError:
        pass
    rotational = None
    block = os.path.basename(device)
    try:
        with open(f"/sys/block/{block}/queue/rotational") as flag:
            rotational = flag.read().strip() == "1"
    except OSError:
        pass
    statvfs = os.statvfs(data_directory)
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(memory_kib / (1024 * 1024), 1) if memory_kib else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "disk_device": device,
        "disk_mount_point": mount_point,
        "disk_fs_type": fs_type,
        "disk_rotational_flag": rotational,
        "disk_size_gib": round(statvfs.f_blocks * statvfs.f_frsize / 2**30, 1),
        "data_directory": data_directory,
    }


# ---------------------------------------------------------------------------
# Raw limits


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def percentile_ms(sorted_seconds: list[float], fraction: float) -> float | None:
    """percentile() of samples in seconds, in milliseconds (None for no samples)."""
    value = percentile(sorted_seconds, fraction)
    return None if value is None else value * 1000


def warm_page_allocator(directory: str, volume_bytes: int) -> float:
    """Write `volume_bytes` to a scratch file and unlink it unsynced: its dirty pages are
    dropped without disk I/O, and the next writer gets them back hot (see the module
    docstring). Returns the seconds it took."""
    path = os.path.join(directory, "warm-up-scratch")
    buffer = bytes(RAW_WRITE_BUFFER_BYTES)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        written = 0
        while written < volume_bytes:
            written += os.write(fd, buffer)
    finally:
        os.close(fd)
        os.unlink(path)
    return time.perf_counter() - started


def raw_sequential_write(directory: str, volume_bytes: int) -> dict:
    path = os.path.join(directory, "raw-sequential")
    buffer = os.urandom(RAW_WRITE_BUFFER_BYTES)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        started = time.perf_counter()
        while written < volume_bytes:
            written += os.write(fd, buffer)
        written_at = time.perf_counter()
        os.fdatasync(fd)
        finished = time.perf_counter()
    finally:
        os.close(fd)
        os.unlink(path)
    seconds = finished - started
    return {
        "bytes": written,
        "seconds": seconds,
        "write_seconds": written_at - started,
        "fdatasync_seconds": finished - written_at,
        "mb_per_s": written / seconds / MB,
    }


def raw_fdatasync_loop(directory: str, bytes_per_write: int, records_per_write: int, seconds_max: float) -> dict:
    path = os.path.join(directory, f"raw-fdatasync-{records_per_write}")
    buffer = os.urandom(bytes_per_write)
    latencies: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        started = time.perf_counter()
        deadline = started + seconds_max
        now = started
        while now < deadline:
            os.write(fd, buffer)
            os.fdatasync(fd)
            later = time.perf_counter()
            latencies.append(later - now)
            now = later
        seconds = now - started
    finally:
        os.close(fd)
        os.unlink(path)
    latencies.sort()
    writes = len(latencies)
    return {
        "batch_records": records_per_write,
        "bytes_per_write": bytes_per_write,
        "writes": writes,
        "seconds": seconds,
        "writes_per_s": writes / seconds,
        "records_per_s": writes * records_per_write / seconds,
        "mb_per_s": writes * bytes_per_write / seconds / MB,
        "latency_ms_p50": percentile_ms(latencies, 0.50),
        "latency_ms_p99": percentile_ms(latencies, 0.99),
    }


def measure_raw_sequential(directory: str, settings: Settings, round_number: int) -> tuple[dict, dict]:
    """(cold, warm) sequential writes of the append volume; cold after sync and a pause."""
    progress(f"round {round_number}: raw sequential write of {settings.volume_bytes // MIB} MiB + fdatasync")
    os.sync()
    time.sleep(settings.cold_pause_seconds)
    cold = raw_sequential_write(directory, settings.volume_bytes)
    warm_page_allocator(directory, settings.volume_bytes)
    warm = raw_sequential_write(directory, settings.volume_bytes)
    progress(f"  {warm['mb_per_s']:.0f} MB/s (cold memory: {cold['mb_per_s']:.0f} MB/s)")
    return cold, warm


def measure_raw_loop(
    directory: str, settings: Settings, bytes_per_write: int, records_per_write: int, round_number: int
) -> dict:
    loop = raw_fdatasync_loop(directory, bytes_per_write, records_per_write, settings.raw_loop_seconds)
    progress(
        f"round {round_number}: raw write+fdatasync of {loop['bytes_per_write']} B: "
        f"{loop['writes_per_s']:.0f}/s, p50 {loop['latency_ms_p50']:.2f} ms"
    )
    return loop


# ---------------------------------------------------------------------------
# Append


def build_pool(batch_records: int, appender: int, pool_bytes: int, count_max: int) -> list[bytes]:
    """Distinct batches for one appender; the log rewrites base offsets, so cycling
    through them appends valid batches."""
    pool: list[bytes] = []
    size = 0
    sequence = 0
    while size < pool_bytes and len(pool) < count_max:
        records = []
        for _ in range(batch_records):
            prefix = f"{appender}:{sequence}:".encode()
            records.append(NewRecord(None, prefix + b"v" * (RECORD_VALUE_BYTES - len(prefix))))
            sequence += 1
        batch = build_batch(records)
        pool.append(batch)
        size += len(batch)
    return pool


def batch_size_of(batch_records: int) -> int:
    return len(build_pool(batch_records, 0, 1, 1)[0])


def append_cell(directory: str, policy: FsyncPolicy, batch_records: int, appenders: int, settings: Settings) -> dict:
    config = LogConfig(fsync_policy=policy)
    batch_bytes = batch_size_of(batch_records)
    per_appender_batches = max(1, math.ceil(settings.volume_bytes / appenders / batch_bytes))
    pools = [build_pool(batch_records, appender, POOL_BYTES, per_appender_batches) for appender in range(appenders)]
    warm_page_allocator(os.path.dirname(directory), settings.volume_bytes)
    log = Log.open(directory, config)
    barrier = threading.Barrier(appenders + 1)
    latencies: list[list[float]] = [[] for _ in range(appenders)]
    appended = [0] * appenders
    errors: list[BaseException] = []
    deadline_box = [0.0]

    def run(number: int) -> None:
        pool = pools[number]
        pool_size = len(pool)
        own_latencies = latencies[number]
        record = own_latencies.append
        clock = time.perf_counter
        append = log.append
        barrier.wait()
        deadline = deadline_box[0]
        count = 0
        try:
            now = clock()
            while count < per_appender_batches and now < deadline:
                append(pool[count % pool_size])
                later = clock()
                record(later - now)
                now = later
                count += 1
        except BaseException as error:  # reported by the main thread
            errors.append(error)
        appended[number] = count

    threads = [threading.Thread(target=run, args=(number,), name=f"appender-{number}") for number in range(appenders)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    deadline_box[0] = started + settings.cell_seconds_max
    barrier.wait()
    for thread in threads:
        thread.join()
    appended_at = time.perf_counter()
    log.flush()
    finished = time.perf_counter()
    statistics = log.statistics()
    log.close()
    if errors:
        raise RuntimeError(f"appender failed in {policy.value}/{batch_records}/{appenders}") from errors[0]
    batches = sum(appended)
    records = batches * batch_records
    seconds = finished - started
    all_latencies = sorted(value for own in latencies for value in own)
    return {
        "policy": policy.value,
        "batch_records": batch_records,
        "appenders": appenders,
        "batch_bytes": batch_bytes,
        "batches": batches,
        "records": records,
        "bytes": batches * batch_bytes,
        "seconds": seconds,
        "flush_seconds": finished - appended_at,
        "time_capped": batches < per_appender_batches * appenders,
        "records_per_s": records / seconds,
        "mb_per_s": batches * batch_bytes / seconds / MB,
        "append_latency_ms_p50": percentile_ms(all_latencies, 0.50),
        "append_latency_ms_p99": percentile_ms(all_latencies, 0.99),
        "fsyncs": statistics.fsyncs,
        "appends_per_fsync": statistics.fsync_covered_appends / statistics.fsyncs if statistics.fsyncs else None,
        "segments": statistics.segment_count,
    }


# ---------------------------------------------------------------------------
# Read


def read_pass(log: Log, decode: bool) -> tuple[int, int, float]:
    """(records, bytes, seconds) of one sequential pass over the whole log."""
    offset = log.log_start_offset
    end = log.next_offset
    records = 0
    byte_count = 0
    started = time.perf_counter()
    while offset < end:
        result = log.read(offset, READ_BYTES_MAX)
        if result.next_offset is None:  # nothing readable below `end`: the pass is over
            break
        data = result.to_bytes()
        byte_count += len(data)
        if decode:
            records += len(decode_batches(data))
        else:
            records += result.next_offset - result.slices[0].first_offset
        offset = result.next_offset
    seconds = time.perf_counter() - started
    return records, byte_count, seconds


def drop_page_cache(directory: str) -> None:
    """Evict the log's files from the page cache (they are fsynced: clean pages)."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_cell(directory: str, batch_records: int) -> list[dict]:
    rows = []

    def row(mode: str, pass_name: str, measured: tuple[int, int, float]) -> None:
        records, byte_count, seconds = measured
        rows.append(
            {
                "batch_records": batch_records,
                "mode": mode,
                "pass": pass_name,
                "records": records,
                "bytes": byte_count,
                "seconds": seconds,
                "records_per_s": records / seconds,
                "mb_per_s": byte_count / seconds / MB,
            }
        )

    for mode, decode in (("to_bytes", False), ("decode", True)):
        with Log.open(directory, LogConfig(fsync_policy=FsyncPolicy.NEVER)) as log:
            row(mode, "first", read_pass(log, decode))
            row(mode, "second", read_pass(log, decode))
    drop_page_cache(directory)
    with Log.open(directory, LogConfig(fsync_policy=FsyncPolicy.NEVER)) as log:
        row("to_bytes", "first-cold", read_pass(log, False))
    return rows


# ---------------------------------------------------------------------------
# Restart (child processes)


def child_fill(directory: str, volume_bytes: int, batch_records: int, segment_bytes: int) -> None:
    """Append up to `volume_bytes` with fsync never, leaving the last segment as full as
    it gets (the longest unclean-start scan), say so, then wait to be SIGKILLed."""
    config = LogConfig(fsync_policy=FsyncPolicy.NEVER, segment_bytes=segment_bytes)
    pool = build_pool(batch_records, 0, POOL_BYTES, 1 << 30)
    log = Log.open(directory, config)
    segments_max = max(1, math.ceil(volume_bytes / segment_bytes))
    written = 0
    count = 0
    started = time.perf_counter()
    while written < volume_bytes:
        batch = pool[count % len(pool)]
        segments = log.segments
        if len(segments) == segments_max and segments[-1].size + len(batch) > segment_bytes:
            break  # the next append would open one segment more than the volume needs
        written += log.append(batch).byte_count
        count += 1
    statistics = log.statistics()
    print(
        json.dumps(
            {
                "bytes": statistics.byte_count,
                "segments": statistics.segment_count,
                "active_segment_bytes": log.segments[-1].size,
                "next_offset": statistics.next_offset,
                "seconds": time.perf_counter() - started,
            }
        ),
        flush=True,
    )
    sys.stdin.read()  # the parent kills us here, log not closed
    os._exit(3)


def _memory_status_kib() -> dict[str, int]:
    """VmHWM (peak RSS of this process image) and VmRSS, in KiB; empty off Linux."""
    found = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    name, value = line.split(":")
                    found[name] = int(value.split()[0])
    except OSError:
        pass
    return found


def child_open(directory: str, segment_bytes: int, close: bool) -> None:
    """Time Log.open, read the last TAIL_READ_BYTES (decoded), report peak RSS."""
    baseline = _memory_status_kib()
    config = LogConfig(fsync_policy=FsyncPolicy.NEVER, segment_bytes=segment_bytes)
    started = time.perf_counter()
    log = Log.open(directory, config)
    open_seconds = time.perf_counter() - started
    opened = _memory_status_kib()
    statistics = log.statistics()
    # Start about TAIL_READ_BYTES before the end, by offset (records are all the same size).
    span = statistics.next_offset - statistics.log_start_offset
    offset = max(
        statistics.log_start_offset, statistics.next_offset - span * TAIL_READ_BYTES // max(1, statistics.byte_count)
    )
    tail_bytes = 0
    tail_records = 0
    read_started = time.perf_counter()
    while offset < log.next_offset:
        result = log.read(offset, READ_BYTES_MAX)
        if result.next_offset is None:
            break
        data = result.to_bytes()
        tail_bytes += len(data)
        tail_records += len(decode_batches(data))
        offset = result.next_offset
    tail_seconds = time.perf_counter() - read_started
    report = log.recovery_report
    if close:
        log.close()
    peak = _memory_status_kib()
    print(
        json.dumps(
            {
                "open_seconds": open_seconds,
                "recovery_ms": report.duration_ms,
                "clean_shutdown": report.clean_shutdown,
                "scanned_segments": report.scanned_segments,
                "scanned_bytes": report.scanned_bytes,
                "lost_anything": report.lost_anything,
                "retained_bytes": statistics.byte_count,
                "segments": statistics.segment_count,
                "tail_bytes": tail_bytes,
                "tail_records": tail_records,
                "tail_seconds": tail_seconds,
                "rss_baseline_kib": baseline.get("VmHWM"),
                "rss_after_open_kib": opened.get("VmHWM"),
                "rss_peak_kib": peak.get("VmHWM"),
                "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        ),
        flush=True,
    )


def _child_command(*arguments: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), *arguments]


def run_child_open(directory: str, segment_bytes: int, close: bool) -> dict:
    command = _child_command("--child-open", directory, "--child-segment-bytes", str(segment_bytes))
    if close:
        command.append("--child-close")
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"open child failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def restart_cell(directory: str, volume_bytes: int, batch_records: int, segment_bytes: int) -> dict:
    command = _child_command(
        "--child-fill",
        directory,
        "--child-volume-bytes",
        str(volume_bytes),
        "--child-batch-records",
        str(batch_records),
        "--child-segment-bytes",
        str(segment_bytes),
    )
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None  # both PIPE
    try:
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"fill child exited with {child.wait()} before filling")
        fill = json.loads(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdin.close()
        child.stdout.close()
    progress(
        f"  filled {fill['bytes'] / MIB:.0f} MiB in {fill['segments']} segments "
        f"({fill['seconds']:.1f} s), SIGKILLed; opening in a fresh process"
    )
    unclean = run_child_open(directory, segment_bytes, close=True)
    clean = run_child_open(directory, segment_bytes, close=True)
    return {
        "volume_bytes": volume_bytes,
        "retained_bytes": fill["bytes"],
        "active_segment_bytes": fill["active_segment_bytes"],
        "batch_records": batch_records,
        "segment_bytes": segment_bytes,
        "segments": fill["segments"],
        "fill_seconds": fill["seconds"],
        "killed_with": "SIGKILL",
        "unclean": unclean,
        "clean": clean,
    }


# ---------------------------------------------------------------------------
# Summaries, ratios and report


def summarise_cells(rounds: list[dict]) -> list[dict]:
    """One row per cell: medians over the rounds, with the records/s range."""
    grouped: dict[tuple, list[dict]] = {}
    for cell in (cell for one in rounds for cell in one["append"]):
        grouped.setdefault((cell["policy"], cell["batch_records"], cell["appenders"]), []).append(cell)
    summary = []
    median = statistics_module.median
    for (policy, batch_records, appenders), cells in grouped.items():
        per_fsync = [cell["appends_per_fsync"] for cell in cells if cell["appends_per_fsync"] is not None]
        summary.append(
            {
                "policy": policy,
                "batch_records": batch_records,
                "appenders": appenders,
                "batch_bytes": cells[0]["batch_bytes"],
                "rounds": len(cells),
                "records": int(median(cell["records"] for cell in cells)),
                "bytes": int(median(cell["bytes"] for cell in cells)),
                "seconds": median(cell["seconds"] for cell in cells),
                "time_capped": any(cell["time_capped"] for cell in cells),
                "records_per_s": median(cell["records_per_s"] for cell in cells),
                "records_per_s_min": min(cell["records_per_s"] for cell in cells),
                "records_per_s_max": max(cell["records_per_s"] for cell in cells),
                "mb_per_s": median(cell["mb_per_s"] for cell in cells),
                "append_latency_ms_p50": median(cell["append_latency_ms_p50"] for cell in cells),
                "append_latency_ms_p99": median(cell["append_latency_ms_p99"] for cell in cells),
                "appends_per_fsync": median(per_fsync) if per_fsync else None,
            }
        )
    return summary


def _ratio(
    name: str,
    values: list[float],
    target: float | None,
    *,
    judged: bool = True,
    lower_is_better: bool = False,
    strict: bool = False,
) -> dict:
    value = statistics_module.median(values)
    met = None
    if target is not None and judged:
        if lower_is_better:
            met = value < target if strict else value <= target
        else:
            met = value > target if strict else value >= target
    return {
        "name": name,
        "value": value,
        "values": values,
        "target": target,
        "met": met,
        "lower_is_better": lower_is_better,
        "strict": strict,
    }


def ratios(results: dict) -> list[dict]:
    """Each throughput ratio is taken within a round, then the median over rounds."""
    settings = results["settings"]
    out = []
    per_round = []
    for one in results["rounds"]:
        cells = {(cell["policy"], cell["batch_records"], cell["appenders"]): cell for cell in one["append"]}
        loops = {loop["batch_records"]: loop for loop in one["raw"]["fdatasync_loop"]}
        per_round.append((one["raw"]["sequential_write"], loops, cells))
    for appenders in settings["appender_counts"]:
        values = [
            cells[("never", 100, appenders)]["mb_per_s"] / sequential["mb_per_s"]
            for sequential, _, cells in per_round
            if ("never", 100, appenders) in cells
        ]
        if values:
            out.append(
                _ratio(
                    f"fsync=never, 100-record batches, {appenders} appender(s) vs raw sequential write (MB/s)",
                    values,
                    TARGET_NEVER_VS_RAW,
                    judged=appenders == 1,
                )
            )
    cold_values = [
        cells[("never", 100, 1)]["mb_per_s"] / cold["mb_per_s"]
        for one in results["rounds"]
        for cold, cells in [
            (
                one["raw"]["sequential_write_cold"],
                {(cell["policy"], cell["batch_records"], cell["appenders"]): cell for cell in one["append"]},
            )
        ]
        if ("never", 100, 1) in cells
    ]
    if cold_values:
        out.append(
            _ratio(
                "fsync=never, 100-record batches, 1 appender vs raw sequential write with cold memory (MB/s)",
                cold_values,
                None,
            )
        )
    for batch_records in settings["batch_record_counts"]:
        values = [
            cells[("always", batch_records, 8)]["records_per_s"] / cells[("always", batch_records, 1)]["records_per_s"]
            for _, _, cells in per_round
            if ("always", batch_records, 8) in cells and ("always", batch_records, 1) in cells
        ]
        if values:
            out.append(
                _ratio(
                    f"fsync=always, {batch_records}-record batches: 8 appenders vs 1 (records/s)",
                    values,
                    TARGET_ALWAYS_8_VS_1,
                )
            )
    for batch_records in settings["batch_record_counts"]:
        for appenders in settings["appender_counts"]:
            values = [
                cells[("always", batch_records, appenders)]["records_per_s"] / loops[batch_records]["records_per_s"]
                for _, loops, cells in per_round
                if ("always", batch_records, appenders) in cells and batch_records in loops
            ]
            if values:
                out.append(
                    _ratio(
                        f"fsync=always, {batch_records}-record batches, {appenders} appender(s) "
                        "vs raw write+fdatasync loop (records/s)",
                        values,
                        None,
                    )
                )
    restarts = results["restart"]
    largest = max((row["volume_bytes"] for row in restarts), default=None)
    for restart in restarts:
        if restart["volume_bytes"] == largest:
            out.append(
                _ratio(
                    f"Log.open after SIGKILL, {restart['retained_bytes'] / MIB:.0f} MiB retained, "
                    f"{restart['batch_records']}-record batches (s)",
                    [restart["unclean"]["open_seconds"]],
                    TARGET_RESTART_SECONDS,
                    lower_is_better=True,
                    strict=True,
                )
            )
    by_records: dict[int, list[dict]] = {}
    for restart in restarts:
        by_records.setdefault(restart["batch_records"], []).append(restart)
    for batch_records, rows in by_records.items():
        if len(rows) < 2:
            continue
        rows = sorted(rows, key=lambda row: row["volume_bytes"])
        small, large = rows[0], rows[-1]
        for kind in ("unclean", "clean"):
            if not small[kind]["rss_peak_kib"] or not large[kind]["rss_peak_kib"]:
                continue
            out.append(
                _ratio(
                    f"peak RSS (VmHWM), {kind} open + tail read: {large['retained_bytes'] / MIB:.0f} MiB vs "
                    f"{small['retained_bytes'] / MIB:.0f} MiB retained, {batch_records}-record batches",
                    [large[kind]["rss_peak_kib"] / small[kind]["rss_peak_kib"]],
                    1 + TARGET_RSS_GROWTH_FRACTION,
                    lower_is_better=True,
                )
            )
    return out


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(header), *(len(row[column]) for row in rows)) if rows else len(header)
        for column, header in enumerate(headers)
    ]
    lines = [
        "| " + " | ".join(header.ljust(width) for header, width in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (width + 2) for width in widths) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell.rjust(width) for cell, width in zip(row, widths)) + " |")
    return "\n".join(lines)


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def render(results: dict) -> str:
    parts = []
    machine = results["machine"]
    parts.append(
        f"Machine: {machine['nproc']} cores, {machine['memory_gib']} GiB, kernel {machine['kernel']}, "
        f"Python {machine['python']}, disk {machine['disk_device']} ({machine['disk_fs_type']}) "
        f"at {machine['disk_mount_point']}, data in {machine['data_directory']}"
    )
    parts.append(
        f"\nRaw limits, per round (MB = 10^6 bytes; {results['settings']['volume_bytes'] // MIB} MiB sequential)"
    )
    rows = []
    for one in results["rounds"]:
        raw = one["raw"]
        for key, label in (("sequential_write_cold", "cold memory"), ("sequential_write", "warm")):
            sequential = raw[key]
            rows.append(
                [
                    str(raw["round"]),
                    f"sequential 1 MiB writes + 1 fdatasync, {label}",
                    "-",
                    "-",
                    _number(sequential["mb_per_s"]),
                    "-",
                    "-",
                ]
            )
        for loop in raw["fdatasync_loop"]:
            rows.append(
                [
                    str(raw["round"]),
                    f"write+fdatasync loop, {loop['bytes_per_write']} B/write ({loop['batch_records']} rec)",
                    _number(loop["writes_per_s"]),
                    _number(loop["records_per_s"]),
                    _number(loop["mb_per_s"], 1),
                    _number(loop["latency_ms_p50"], 2),
                    _number(loop["latency_ms_p99"], 2),
                ]
            )
    parts.append(_table(["round", "what", "writes/s", "records/s", "MB/s", "p50 ms", "p99 ms"], rows))

    rounds = len(results["rounds"])
    parts.append(f"\nAppend: 1 KiB records; median of {rounds} round(s); time includes a final flush (fdatasync)")
    rows = []
    for cell in results["append"]:
        rows.append(
            [
                cell["policy"],
                str(cell["batch_records"]),
                str(cell["appenders"]),
                _number(cell["bytes"] / MIB) + ("*" if cell["time_capped"] else ""),
                _number(cell["records_per_s"]),
                f"{_number(cell['records_per_s_min'])}-{_number(cell['records_per_s_max'])}",
                _number(cell["mb_per_s"], 1),
                _number(cell["append_latency_ms_p50"], 3),
                _number(cell["append_latency_ms_p99"], 3),
                _number(cell["appends_per_fsync"], 1),
            ]
        )
    parts.append(
        _table(
            [
                "fsync",
                "batch",
                "appenders",
                "MiB",
                "records/s",
                "range",
                "MB/s",
                "append p50 ms",
                "append p99 ms",
                "appends/fsync",
            ],
            rows,
        )
    )
    parts.append("(* = stopped at the per-cell time cap before the volume in at least one round)")

    parts.append(
        f"\nRead: sequential Log.read, {READ_BYTES_MAX // MIB} MiB budget, whole log (fsync=never, 1 appender)"
    )
    rows = []
    for row in results["read"]:
        rows.append(
            [
                str(row["batch_records"]),
                row["mode"],
                row["pass"],
                _number(row["bytes"] / MIB),
                _number(row["records_per_s"]),
                _number(row["mb_per_s"]),
            ]
        )
    parts.append(_table(["batch", "mode", "pass", "MiB", "records/s", "MB/s"], rows))

    parts.append("\nRestart: fill with fsync=never, SIGKILL, Log.open in a fresh process, then an 8 MiB tail read")
    rows = []
    for restart in results["restart"]:
        for kind in ("unclean", "clean"):
            child = restart[kind]
            rows.append(
                [
                    _number(restart["retained_bytes"] / MIB),
                    str(restart["segments"]),
                    str(restart["batch_records"]),
                    kind,
                    _number(child["open_seconds"], 3),
                    _number(child["scanned_bytes"] / MIB),
                    _number(child["tail_bytes"] / MIB, 1),
                    _number((child["rss_baseline_kib"] or 0) / 1024, 1),
                    _number((child["rss_peak_kib"] or 0) / 1024, 1),
                    _number(child["ru_maxrss_kib"] / 1024, 1),
                ]
            )
    parts.append(
        _table(
            [
                "retained MiB",
                "segments",
                "batch",
                "open",
                "Log.open s",
                "scanned MiB",
                "tail MiB",
                "VmHWM before MiB",
                "VmHWM peak MiB",
                "ru_maxrss MiB",
            ],
            rows,
        )
    )

    parts.append("\nRatios vs targets (median over rounds; range in brackets)")
    rows = []
    for ratio in results["ratios"]:
        if ratio["target"] is None:
            target = "-"
        elif ratio["lower_is_better"]:
            target = f"{'<' if ratio['strict'] else '<='} {ratio['target']:g}"
        else:
            target = f"{'>' if ratio['strict'] else '>='} {ratio['target']:g}"
        verdict = "-" if ratio["met"] is None else ("MET" if ratio["met"] else "MISSED")
        spread = ""
        if len(ratio["values"]) > 1:
            spread = f" [{min(ratio['values']):.2f}-{max(ratio['values']):.2f}]"
        rows.append([ratio["name"], _number(ratio["value"], 2) + spread, target, verdict])
    parts.append(_table(["ratio", "value", "target", "verdict"], rows))
    return "\n".join(parts)


# ---------------------------------------------------------------------------
# Main


def run(settings: Settings, data_directory: str) -> dict:
    started = time.perf_counter()
    batch_bytes = {records: batch_size_of(records) for records in settings.batch_record_counts}
    results: dict = {
        "schema": 2,
        "machine": machine_description(data_directory),
        "settings": {
            "quick": settings.quick,
            "rounds": settings.rounds,
            "volume_bytes": settings.volume_bytes,
            "cell_seconds_max": settings.cell_seconds_max,
            "raw_loop_seconds": settings.raw_loop_seconds,
            "record_value_bytes": RECORD_VALUE_BYTES,
            "batch_bytes": {str(records): size for records, size in batch_bytes.items()},
            "batch_record_counts": list(settings.batch_record_counts),
            "appender_counts": list(settings.appender_counts),
            "policies": [policy.value for policy in settings.policies],
            "fsync_interval_ms": LogConfig().fsync_interval_ms,
            "segment_bytes": LogConfig().segment_bytes,
            "read_bytes_max": READ_BYTES_MAX,
            "restart_segment_bytes": settings.restart_segment_bytes,
        },
        "rounds": [],
        "append": [],
        "read": [],
        "restart": [],
    }

    kept_for_read: dict[int, str] = {}
    for round_number in range(settings.rounds):
        last_round = round_number == settings.rounds - 1
        raw: dict = {"round": round_number, "fdatasync_loop": []}
        one: dict[str, Any] = {"round": round_number, "raw": raw, "append": []}
        for policy in settings.policies:
            for batch_records in settings.batch_record_counts:
                if policy is FsyncPolicy.ALWAYS:
                    raw["fdatasync_loop"].append(
                        measure_raw_loop(
                            data_directory, settings, batch_bytes[batch_records], batch_records, round_number
                        )
                    )
                if policy is FsyncPolicy.NEVER and batch_records == max(settings.batch_record_counts):
                    raw["sequential_write_cold"], raw["sequential_write"] = measure_raw_sequential(
                        data_directory, settings, round_number
                    )
                for appenders in settings.appender_counts:
                    directory = os.path.join(data_directory, f"append-{policy.value}-{batch_records}-{appenders}")
                    progress(
                        f"round {round_number}: append fsync={policy.value} batch={batch_records} appenders={appenders}"
                    )
                    cell = append_cell(directory, policy, batch_records, appenders, settings)
                    cell["round"] = round_number
                    progress(
                        f"  {cell['records_per_s']:,.0f} records/s, {cell['mb_per_s']:.1f} MB/s, "
                        f"{cell['bytes'] / MIB:.0f} MiB in {cell['seconds']:.2f} s"
                        + (" (time cap)" if cell["time_capped"] else "")
                    )
                    one["append"].append(cell)
                    if last_round and policy is FsyncPolicy.NEVER and appenders == 1:
                        kept_for_read[batch_records] = directory
                    else:
                        shutil.rmtree(directory)
        results["rounds"].append(one)
    results["append"] = summarise_cells(results["rounds"])

    for batch_records, directory in kept_for_read.items():
        progress(f"read: batch={batch_records} ({directory})")
        rows = read_cell(directory, batch_records)
        for row in rows:
            progress(
                f"  {row['mode']} {row['pass']}: {row['mb_per_s']:.0f} MB/s, {row['records_per_s']:,.0f} records/s"
            )
        results["read"].extend(rows)
        shutil.rmtree(directory)

    for batch_records in settings.restart_batch_records:
        for volume_bytes in settings.restart_volumes_bytes:
            directory = os.path.join(data_directory, f"restart-{volume_bytes // MIB}-{batch_records}")
            progress(f"restart: {volume_bytes // MIB} MiB retained, batch={batch_records}")
            restart = restart_cell(directory, volume_bytes, batch_records, settings.restart_segment_bytes)
            progress(
                f"  unclean open {restart['unclean']['open_seconds']:.3f} s "
                f"(scanned {restart['unclean']['scanned_bytes'] / MIB:.0f} MiB), "
                f"clean open {restart['clean']['open_seconds']:.3f} s, "
                f"peak RSS {(restart['unclean']['rss_peak_kib'] or 0) / 1024:.1f} MiB"
            )
            results["restart"].append(restart)
            shutil.rmtree(directory)

    results["ratios"] = ratios(results)
    results["total_seconds"] = time.perf_counter() - started
    return results


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run with tiny volumes")
    parser.add_argument(
        "--volume-mb", type=float, default=None, help="MiB appended per append cell (default 256; 4 with --quick)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of raw limits + append cells (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--cell-seconds-max", type=float, default=None, help="time cap of one append cell (default 6; 0.5 with --quick)"
    )
    parser.add_argument(
        "--restart-batch-records",
        type=int,
        nargs="+",
        default=[100, 1],
        help="batch sizes for the restart fill (default 100 1; --quick uses 100)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="parent of the bench's temporary directory (default: the system temp dir unless it is tmpfs)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument("--json-out", default=None, help="write the results as JSON here")
    # Internal: the restart children.
    parser.add_argument("--child-fill", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-open", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-close", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-volume-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-batch-records", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--child-segment-bytes", type=int, default=LogConfig().segment_bytes, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.child_fill:
        child_fill(
            arguments.child_fill,
            arguments.child_volume_bytes,
            arguments.child_batch_records,
            arguments.child_segment_bytes,
        )
        return 0
    if arguments.child_open:
        child_open(arguments.child_open, arguments.child_segment_bytes, arguments.child_close)
        return 0
    settings = settings_from_arguments(arguments)
    return run_in_scratch_directory("storage", arguments, lambda directory: run(settings, directory), render, progress)


def run_in_scratch_directory(
    name: str,
    arguments: argparse.Namespace,
    measure: Callable[[str], dict],
    render: Callable[[dict], str],
    progress: Callable[[str], None],
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """The frame every benchmark tool shares: a scratch directory under --data-dir (or
    default_data_parent(); a warning when it is tmpfs), `measure(directory)`, its report
    printed and written as JSON to --json-out, the directory removed unless --keep. An
    error of `errors` is reported and gives exit status 1."""
    parent = arguments.data_dir or default_data_parent()
    os.makedirs(parent, exist_ok=True)
    mount = _mount_of(parent)
    if mount[2] in ("tmpfs", "ramfs"):
        progress(f"warning: {parent} is on {mount[2]}: the figures will not be the disk's")
    data_directory = tempfile.mkdtemp(prefix=f"nodi-{name}-bench-", dir=parent)
    progress(f"data directory {data_directory} ({mount[2]} on {mount[0]})")
    try:
        results = measure(data_directory)
    except errors as error:
        progress(f"failed: {type(error).__name__}: {error}")
        return 1
    finally:
        if not arguments.keep:
            shutil.rmtree(data_directory, ignore_errors=True)
    print(render(results))
    if arguments.json_out:
        with open(arguments.json_out, "w") as out:
            json.dump(results, out, indent=2)
            out.write("\n")
        progress(f"wrote {arguments.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
