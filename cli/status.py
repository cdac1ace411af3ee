"""`nodi status`: one look at a running broker - the server (address, version, uptime,
data directory, disk, connections), its topics (partitions, messages, bytes), its
consumer groups with their lag, and the dead-letter topics (*.dlq) with what they hold.
A table for people, --json for scripts."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from nodi.cli.common import command, connect, print_table

DEAD_LETTER_SUFFIX = ".dlq"
# Groups whose names start with this are nodi's own (the `nodi.dlq` cursor of `nodi dlq`,
# and any later): `nodi status` leaves them out unless --internal. Users' groups should
# not take the prefix.
INTERNAL_GROUP_PREFIX = "nodi."
# The oldest unacked message's age is read from at most this many partitions per queue
# group (one small fetch each): status stays one quick look on a wide topic.
OLDEST_UNACKED_PARTITIONS_MAX = 64


def is_internal_group(name: str) -> bool:
    return name.startswith(INTERNAL_GROUP_PREFIX)


def register(app: typer.Typer) -> None:
    """Add `status` to the top-level `nodi` app."""
    command(app, "status")(status_command)


def _oldest_unacked_ms(client, description, now_ms: int) -> int | None:
    """The age (ms) of the oldest message a queue group has not finished: the message at
    its ack floor in each partition with messages pending (the first read at or after the
    floor: one small fetch a partition), None when nothing is pending or none is readable
    (retention removed it)."""
    from nodi.storage.errors import NodiError

    oldest: int | None = None
    busy = [p for p in description.partitions if p.pending][:OLDEST_UNACKED_PARTITIONS_MAX]
    for partition in busy:
        try:
            messages = client.fetch(
                description.topic, partition.partition, partition.ack_floor, bytes_max=1, include_expired=True
            )
        except NodiError:  # the floor below the log start now, or the topic gone
            continue
        if messages:
            oldest = messages[0].timestamp if oldest is None else min(oldest, messages[0].timestamp)
    return None if oldest is None else max(now_ms - oldest, 0)


def _queue_groups(client, *, internal: bool) -> list[dict]:
    import time

    from nodi.storage.errors import NodiError

    queues = []
    now_ms = int(time.time() * 1000)
    for summary in client.list_queues():
        if is_internal_group(summary.group) and not internal:
            continue
        try:
            description = client.describe_queue(summary.topic, summary.group)
        except NodiError:  # deleted since the listing
            continue
        queues.append(
            {
                "group": summary.group,
                "topic": summary.topic,
                "pending": summary.pending,
                "in_flight": summary.leased,
                "dead_lettered": description.dead_lettered,
                "dead_letters_pending": summary.dead_letters_pending,
                "oldest_unacked_age_ms": _oldest_unacked_ms(client, description, now_ms),
                "dead_letter_topic": summary.dead_letter_topic,
            }
        )
    return sorted(queues, key=lambda queue: (queue["topic"], queue["group"]))


def _snapshot(client, *, internal: bool = False) -> dict:
    """Everything `nodi status` shows, as plain data (the --json document); groups named
    nodi.* only with `internal`."""
    from nodi.broker.client.errors import UnknownGroup, UnknownTopic

    status = client.server_status()
    topics = []
    for summary in client.list_topics():
        try:
            description = client.describe_topic(summary.name)
        except UnknownTopic:  # deleted since the listing
            continue
        partitions = description.partitions
        topics.append(
            {
                "topic": description.name,
                "partitions": len(partitions),
                # Offsets still stored: records, less any a compaction removed.
                "messages": sum(p.log_end_offset - p.log_start_offset for p in partitions),
                # A partition not open yet after a start reports size and segments -1.
                "bytes": sum(p.size for p in partitions if p.size >= 0),
                "segments": sum(p.segments for p in partitions if p.segments >= 0),
                "partitions_not_open": sum(1 for p in partitions if p.size < 0),
                "end_offsets": [p.log_end_offset for p in partitions],
            }
        )
    groups = []
    for summary in client.list_groups():
        if is_internal_group(summary.group) and not internal:
            continue
        try:
            description = client.describe_group(summary.group)
        except UnknownGroup:
            continue
        lags = [
            {
                "topic": lag.topic,
                "partition": lag.partition,
                "committed_offset": lag.committed_offset,
                "high_watermark": lag.high_watermark,
                "lag": lag.lag,
            }
            for lag in sorted(description.lags, key=lambda lag: (lag.topic, lag.partition))
        ]
        known = [entry["lag"] for entry in lags if entry["lag"] is not None]
        groups.append(
            {
                "group": description.group,
                "state": description.state,
                "members": len(description.members),
                "lag": sum(known) if known else None,
                "partitions": lags,
            }
        )
    return {
        "server": {
            "address": client.address,
            "server_id": status.server_id,
            "version": status.version,
            "started_time_ms": status.started_time_ms,
            "uptime_ms": status.uptime_ms,
            "data_dir": status.data_dir,
            "disk_free_bytes": status.disk_free_bytes,
            "disk_total_bytes": status.disk_total_bytes,
            "connections_open": status.connections_open,
            "connections_accepted": status.connections_accepted,
            "connections_refused": status.connections_refused,
            "read_only_partitions": status.read_only_partitions,
            "metadata_store_error": status.metadata_store_error,
            "metadata_failed_commits": status.metadata_failed_commits,
            "damaged_partitions": [
                {
                    "topic": entry.topic,
                    "partition": entry.partition,
                    "path": os.path.join(status.data_dir, entry.path) if status.data_dir else entry.path,
                    "position": entry.position,
                    "offset": entry.offset,
                    "reason": entry.reason,
                }
                for entry in status.damaged_partitions
            ],
        },
        "topics": topics,
        "groups": groups,
        "queue_groups": _queue_groups(client, internal=internal),
        "dead_letter_topics": [
            {"topic": topic["topic"], "messages": topic["messages"]}
            for topic in topics
            if topic["topic"].endswith(DEAD_LETTER_SUFFIX)
        ],
    }


def _duration(milliseconds: int) -> str:
    seconds = max(milliseconds, 0) // 1000
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3_600)
    minutes, seconds = divmod(seconds, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    shown = [f"{value}{unit}" for value, unit in parts if value] or ["0s"]
    return " ".join(shown[:2])


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # not reached


def _metadata_state(server: dict) -> str:
    failed = server["metadata_failed_commits"]
    if server["metadata_store_error"] is None:
        return "ok" + (f" ({failed} failed commit(s) since start, recovered)" if failed else "")
    return f"FAILED, retrying ({failed} failed commit(s)): {server['metadata_store_error']}"


def _print(snapshot: dict) -> None:
    server = snapshot["server"]
    disk = "-"
    if server["disk_free_bytes"] is not None and server["disk_total_bytes"]:
        percent = 100 * server["disk_free_bytes"] / server["disk_total_bytes"]
        disk = f"{_size(server['disk_free_bytes'])} free of {_size(server['disk_total_bytes'])} ({percent:.0f}%)"
    read_only = ", ".join(
        f"{topic}-{partition}"
        for topic, partitions in server["read_only_partitions"].items()
        for partition in partitions
    )
    print_table(
        ("SERVER", ""),
        [
            ("address", server["address"]),
            ("version", f"nodi {server['version']} ({server['server_id']})"),
            ("uptime", _duration(server["uptime_ms"])),
            ("data dir", server["data_dir"] or "(shown to loopback connections only)"),
            ("disk", disk),
            (
                "connections",
                f"{server['connections_open']} open, {server['connections_accepted']} accepted, "
                f"{server['connections_refused']} refused",
            ),
            ("read-only", read_only or "none"),
            ("metadata", _metadata_state(server)),
            (
                "damaged",
                "none" if not server["damaged_partitions"] else f"{len(server['damaged_partitions'])} partition(s)",
            ),
        ],
    )
    if server["damaged_partitions"]:
        typer.echo("")
        print_table(
            ("DAMAGED PARTITION", "READ UP TO OFFSET", "FILE", "AT BYTE", "REASON"),
            [
                (
                    f"{entry['topic']}-{entry['partition']}",
                    entry["offset"],
                    entry["path"],
                    entry["position"],
                    entry["reason"],
                )
                for entry in server["damaged_partitions"]
            ],
        )
        typer.echo(
            "Damaged below the recovery point: appends refused, nothing served past the offset shown. Stop "
            "the broker, then restore the file or run `nodi segments recover --truncate-damaged`."
        )
    typer.echo("")
    print_table(
        ("TOPIC", "PARTITIONS", "MESSAGES", "BYTES", "SEGMENTS"),
        [
            (topic["topic"], topic["partitions"], topic["messages"], topic["bytes"], topic["segments"])
            for topic in snapshot["topics"]
        ],
    )
    typer.echo("")
    print_table(
        ("GROUP", "STATE", "MEMBERS", "LAG", "BEHIND"),
        [
            (
                group["group"],
                group["state"],
                group["members"],
                group["lag"],
                " ".join(
                    f"{entry['topic']}-{entry['partition']}:{entry['lag']}"
                    for entry in group["partitions"]
                    if entry["lag"]
                )
                or "-",
            )
            for group in snapshot["groups"]
        ],
    )
    typer.echo("")
    print_table(
        ("QUEUE GROUP", "TOPIC", "PENDING", "IN FLIGHT", "DEAD-LETTERED", "OLDEST UNACKED", "DEAD-LETTER TOPIC"),
        [
            (
                queue["group"],
                queue["topic"],
                queue["pending"],
                queue["in_flight"],
                queue["dead_lettered"],
                "-" if queue["oldest_unacked_age_ms"] is None else _duration(queue["oldest_unacked_age_ms"]),
                queue["dead_letter_topic"],
            )
            for queue in snapshot["queue_groups"]
        ],
    )
    typer.echo("")
    print_table(
        ("DEAD-LETTER TOPIC", "MESSAGES"),
        [(entry["topic"], entry["messages"]) for entry in snapshot["dead_letter_topics"]],
    )


def status_command(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
    internal: Annotated[
        bool, typer.Option("--internal", help="Also show nodi's own groups (names starting with nodi., as nodi.dlq).")
    ] = False,
) -> None:
    """Show a running broker at a glance: the server (address, version, uptime, data
    directory, free disk, connections, read-only and damaged partitions, the metadata store's state), every topic (partitions,
    messages stored, bytes, segments), every consumer group (state, members, total lag
    and the partitions behind), every queue group (messages pending, in flight, dead-lettered
    since the broker started, the age of the oldest unacked message) and the dead-letter
    topics (names ending in .dlq) with the messages they hold. Groups named nodi.* are
    nodi's own (the nodi.dlq cursor of nodi dlq) and left out unless --internal.

    Exit status 1 when the broker cannot be reached.
    """
    with connect(ctx) as client:
        snapshot = _snapshot(client, internal=internal)
    if json_output:
        typer.echo(json.dumps(snapshot, indent=2, sort_keys=True))
        return
    _print(snapshot)
