"""tools/broker_bench.py's summary (medians over the rounds), ratios against the issue's
targets, and the readable report."""

from __future__ import annotations

import statistics as statistics_module

from tools import storage_bench  # _ratio, _table, _number

TARGET_VS_REDIS = 10.0
TARGET_LATENCY_P99_MS = 1.0

CPU_FIGURES = (
    "client_cpu_seconds",
    "server_cpu_seconds",
    "others_cpu_seconds",
    "others_cpu_share",
    "client_cpu_us_per_message",
    "server_cpu_us_per_message",
)
# The server's own fsync histogram (nodi only, when the bench started the server).
FSYNC_FIGURES = ("messages_per_fsync", "server_fsync_ms_p50", "server_fsync_ms_p99")
SUMMARY_FIGURES = {
    "produce": ("msg_per_s", "mb_per_s", *CPU_FIGURES, *FSYNC_FIGURES),
    "consume": ("msg_per_s", "mb_per_s", *CPU_FIGURES),
    "latency": (
        "latency_ms_p50",
        "latency_ms_p90",
        "latency_ms_p99",
        "latency_ms_max",
        "share_over_1_ms",
        "achieved_rate_per_s",
        *CPU_FIGURES,
        *FSYNC_FIGURES,
    ),
}


def _median(values: list) -> float | None:
    present = [value for value in values if value is not None]
    return statistics_module.median(present) if present else None


def summarise(rounds: list[dict]) -> dict:
    """Medians over the rounds of each system's figures, with their range."""
    summary: dict = {}
    for system in ("nodi", "redis"):
        per_round = [one[system] for one in rounds if one.get(system)]
        if not per_round:
            summary[system] = None
            continue
        summary[system] = {}
        for phase, names in SUMMARY_FIGURES.items():
            figures: dict[str, float | list[float] | None] = {}
            for name in names:
                values = [one[phase].get(name) for one in per_round]
                figures[name] = _median(values)
                present = [value for value in values if value is not None]
                figures[f"{name}_range"] = [min(present), max(present)] if present else None
            summary[system][phase] = figures
    limits = [one["limits"] for one in rounds]
    summary["limits"] = {
        "sequential_write_mb_per_s": _median([one["sequential_write"]["mb_per_s"] for one in limits]),
        "fdatasync_small_ms_p50": _median([one["fdatasync_small"]["latency_ms_p50"] for one in limits]),
        "fdatasync_small_ms_p99": _median([one["fdatasync_small"]["latency_ms_p99"] for one in limits]),
        "fdatasync_small_writes_per_s": _median([one["fdatasync_small"]["writes_per_s"] for one in limits]),
        "fdatasync_batch_mb_per_s": _median([one["fdatasync_batch"]["mb_per_s"] for one in limits]),
        "fdatasync_batch_ms_p50": _median([one["fdatasync_batch"]["latency_ms_p50"] for one in limits]),
    }
    return summary


def ratios(rounds: list[dict], latency_rate: int) -> list[dict]:
    """Each ratio computed within a round (the disk's speed drifts), then the median."""
    ratio = storage_bench._ratio
    out = []

    def add(name, function, target=None, **options) -> None:
        values = []
        for one in rounds:
            try:
                value = function(one)
            except (KeyError, TypeError, ZeroDivisionError):
                continue  # a system or figure missing from this round
            if value is not None:
                values.append(value)
        if values:
            out.append(ratio(name, values, target, **options))

    add(
        "nodi durable produce vs Redis (msg/s)",
        lambda one: one["nodi"]["produce"]["msg_per_s"] / one["redis"]["produce"]["msg_per_s"],
        TARGET_VS_REDIS,
    )
    add(
        "nodi consume vs Redis (msg/s)",
        lambda one: one["nodi"]["consume"]["msg_per_s"] / one["redis"]["consume"]["msg_per_s"],
        TARGET_VS_REDIS,
    )
    add(
        f"nodi end-to-end p99 at {latency_rate:,} msg/s (ms)",
        lambda one: one["nodi"]["latency"]["latency_ms_p99"],
        TARGET_LATENCY_P99_MS,
        lower_is_better=True,
    )
    add(
        "nodi end-to-end p99 vs Redis p99",
        lambda one: one["nodi"]["latency"]["latency_ms_p99"] / one["redis"]["latency"]["latency_ms_p99"],
        lower_is_better=True,
    )
    for phase, label in (("produce", "durable produce"), ("consume", "consume")):
        add(
            f"nodi {label} vs Redis, messages per CPU second of client + server",
            lambda one, phase=phase: _cpu_per_message(one["redis"][phase]) / _cpu_per_message(one["nodi"][phase]),
        )
    add(
        "nodi durable produce vs raw sequential write + fdatasync (MB/s)",
        lambda one: one["nodi"]["produce"]["mb_per_s"] / one["limits"]["sequential_write"]["mb_per_s"],
    )
    add(
        "nodi durable produce vs 256 KiB write+fdatasync loop (MB/s)",
        lambda one: one["nodi"]["produce"]["mb_per_s"] / one["limits"]["fdatasync_batch"]["mb_per_s"],
    )
    add(
        "nodi end-to-end p50 vs small write+fdatasync p50",
        lambda one: one["nodi"]["latency"]["latency_ms_p50"] / one["limits"]["fdatasync_small"]["latency_ms_p50"],
        lower_is_better=True,
    )
    add(
        "nodi end-to-end p99 vs small write+fdatasync p99",
        lambda one: one["nodi"]["latency"]["latency_ms_p99"] / one["limits"]["fdatasync_small"]["latency_ms_p99"],
        lower_is_better=True,
    )
    add(
        "Redis produce vs raw sequential write + fdatasync (MB/s)",
        lambda one: one["redis"]["produce"]["mb_per_s"] / one["limits"]["sequential_write"]["mb_per_s"],
    )
    return out


def _cpu_per_message(figures: dict) -> float:
    """Client + server CPU us per message: steadier than msg/s on a busy machine."""
    return figures["client_cpu_us_per_message"] + figures["server_cpu_us_per_message"]


def _number(value: float | None, digits: int = 0) -> str:
    return storage_bench._number(value, digits)


def _range(figures: dict, name: str, digits: int) -> str:
    bounds = figures.get(f"{name}_range")
    if not bounds or bounds[0] == bounds[1]:
        return ""
    return f" [{_number(bounds[0], digits)}-{_number(bounds[1], digits)}]"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def render(results: dict) -> str:
    table = storage_bench._table
    machine = results["machine"]
    settings = results["settings"]
    summary = results["summary"]
    parts = [
        f"Machine: {machine['nproc']} cores, {machine['memory_gib']} GiB, kernel {machine['kernel']}, "
        f"Python {machine['python']}, disk {machine['disk_device']} ({machine['disk_fs_type']}) at "
        f"{machine['disk_mount_point']}; load average {machine['load_average_start']} before the run",
        f"Workload: {settings['value_bytes']} B values, {settings['messages']:,} messages per throughput phase, "
        f"{settings['partitions']} partition(s), producer batches up to {settings['batch_bytes_max']:,} B, "
        f"latency at {settings['latency_rate']:,}/s for {settings['latency_seconds']} s; "
        f"median of {settings['rounds']} round(s) [range]",
        f"nodi server: {results['nodi_server']}",
        f"Redis: {results['redis_status']}",
    ]
    if machine.get("others_include_the_broker"):
        parts.append('NOTE: with --server the broker\'s CPU is counted in "others" (its pid is not known here).')
    if machine.get("busy"):
        parts.append(
            f"NOTE: other processes used {_share(machine['others_cpu_share_max'])} of the machine's CPU "
            "in the busiest phase: the rates and latencies are lower than on a quiet machine; the CPU "
            "us per message are the steadier figures."
        )
    limits = summary["limits"]
    parts.append("\nMachine limits (same file system as the data)")
    parts.append(
        table(
            ["what", "figure"],
            [
                ["sequential 1 MiB writes + 1 fdatasync", f"{_number(limits['sequential_write_mb_per_s'])} MB/s"],
                [
                    "write+fdatasync loop, one 1-message batch",
                    f"p50 {_number(limits['fdatasync_small_ms_p50'], 3)} ms, p99 {_number(limits['fdatasync_small_ms_p99'], 3)} ms, "
                    f"{_number(limits['fdatasync_small_writes_per_s'])}/s",
                ],
                [
                    "write+fdatasync loop, 256 KiB writes",
                    f"{_number(limits['fdatasync_batch_mb_per_s'])} MB/s, p50 {_number(limits['fdatasync_batch_ms_p50'], 3)} ms",
                ],
            ],
        )
    )
    rows = []
    for system in ("nodi", "redis"):
        figures = summary.get(system)
        if not figures:
            continue
        for phase, label in (("produce", "durable produce"), ("consume", "consume")):
            one = figures[phase]
            rows.append(
                [
                    system,
                    label,
                    _number(one["msg_per_s"]) + _range(one, "msg_per_s", 0),
                    _number(one["mb_per_s"], 1),
                    _number(one["client_cpu_us_per_message"], 2),
                    _number(one["server_cpu_us_per_message"], 2),
                    _share(one["others_cpu_share"]),
                    _number(one.get("messages_per_fsync"), 1),
                ]
            )
    parts.append(
        "\nThroughput (one client process; CPU us per message of the client and the server; the share "
        "of the machine's CPU other processes used meanwhile; messages per fsync of the server)"
    )
    parts.append(
        table(["system", "phase", "msg/s", "MB/s", "client us/msg", "server us/msg", "others", "msg/fsync"], rows)
    )
    rows = []
    for system in ("nodi", "redis"):
        figures = summary.get(system)
        if not figures:
            continue
        one = figures["latency"]
        rows.append(
            [
                system,
                _number(one["latency_ms_p50"], 3) + _range(one, "latency_ms_p50", 3),
                _number(one["latency_ms_p90"], 3),
                _number(one["latency_ms_p99"], 3) + _range(one, "latency_ms_p99", 3),
                _number(one["latency_ms_max"], 3),
                _share(one["share_over_1_ms"]),
                _number(one["achieved_rate_per_s"]),
                _number(one["client_cpu_us_per_message"]),
                _number(one["server_cpu_us_per_message"]),
                _share(one["others_cpu_share"]),
                f"{_number(one.get('server_fsync_ms_p50'), 2)} / {_number(one.get('server_fsync_ms_p99'), 2)}",
            ]
        )
    parts.append(
        f"\nEnd-to-end latency, produce -> consumer receives, paced at {settings['latency_rate']:,} msg/s "
        "(fsync: the server's own fsync latency meanwhile, as histogram bucket bounds)"
    )
    parts.append(
        table(
            [
                "system",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "> 1 ms",
                "msg/s",
                "client us/msg",
                "server us/msg",
                "others",
                "fsync p50/p99 ms",
            ],
            rows,
        )
    )
    parts.append("\nRatios (median over rounds; range in brackets)")
    rows = []
    for ratio in results["ratios"]:
        if ratio["target"] is None:
            target = "-"
        else:
            target = f"{'<=' if ratio['lower_is_better'] else '>='} {ratio['target']:g}"
        verdict = "-" if ratio["met"] is None else ("MET" if ratio["met"] else "MISSED")
        spread = ""
        if len(ratio["values"]) > 1:
            spread = f" [{min(ratio['values']):.2f}-{max(ratio['values']):.2f}]"
        rows.append([ratio["name"], f"{ratio['value']:.2f}{spread}", target, verdict])
    parts.append(table(["ratio", "value", "target", "verdict"], rows))
    return "\n".join(parts)
