"""`nodi topic create | list | describe | delete`: topic admin on a running broker (the
global --server option, else NODI_SERVER, else 127.0.0.1:6634). Tables for people,
--json for scripts."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer

from nodi.cli.common import command, connect, print_table

app = typer.Typer(
    name="topic",
    help="Create, list, describe and delete topics on a running broker.",
    no_args_is_help=True,
)

TopicName = Annotated[str, typer.Argument(help="The topic's name.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _settings_lines(settings) -> list[tuple[str, object]]:
    """Every setting in force (all the fields the client reports), retention limits of
    -1 shown as "unlimited"."""
    lines = []
    for name, value in dataclasses.asdict(settings).items():
        if name.startswith("retention_") and isinstance(value, int) and value < 0:
            value = "unlimited"
        lines.append((name, value))
    return lines


def _print_settings(settings) -> None:
    for name, value in _settings_lines(settings):
        typer.echo(f"{name:<18} {value}")


@command(app, "create")
def create_command(
    ctx: typer.Context,
    name: TopicName,
    partitions: Annotated[int, typer.Option("--partitions", min=1, help="Number of partitions.")] = 1,
    retention_ms: Annotated[
        int | None,
        typer.Option("--retention-ms", min=-1, help="Delete segments older than this (ms); -1 keeps them for ever."),
    ] = None,
    retention_bytes: Annotated[
        int | None,
        typer.Option(
            "--retention-bytes", min=-1, help="Delete the oldest segments past this size per partition; -1: no limit."
        ),
    ] = None,
    cleanup_policy: Annotated[
        str | None,
        typer.Option("--cleanup-policy", help='"delete", "compact" or "compact,delete".'),
    ] = None,
    fsync_policy: Annotated[
        str | None,
        typer.Option(
            "--fsync-policy",
            help='"always" (acknowledge durable produces after fsync), "interval" or "never".',
        ),
    ] = None,
    fsync_interval_ms: Annotated[
        int | None, typer.Option("--fsync-interval-ms", min=0, help='The fsync period with --fsync-policy interval (ms).')
    ] = None,
    segment_bytes: Annotated[
        int | None, typer.Option("--segment-bytes", min=1, help="Roll to a new segment file past this size.")
    ] = None,
    segment_ms: Annotated[
        int | None, typer.Option("--segment-ms", min=1, help="Roll to a new segment file after this age (ms).")
    ] = None,
    ttl_ms: Annotated[
        int | None,
        typer.Option("--ttl-ms", min=0, help="Default message TTL (ms): readers skip older messages; 0: none."),
    ] = None,
    dedup_window_ms: Annotated[
        int | None,
        typer.Option(
            "--dedup-window-ms",
            min=0,
            help="Publish dedup: a message whose idempotency key was seen this recently (ms) is not written "
            "again; 0: off (server default: 2 minutes).",
        ),
    ] = None,
    delete_retention_ms: Annotated[
        int | None,
        typer.Option(
            "--delete-retention-ms",
            min=0,
            help="Compacted topics: how long (ms) a tombstone stays after a compaction pass first saw it "
            "(server default: its compaction.delete_retention_ms, one day).",
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Create a topic. Settings left out take the server's defaults (nodi serve
    --print-config shows them); prints the settings in force.

    Exit status 1 when the name is taken or the server refuses a setting.
    """
    with connect(ctx) as client:
        settings = client.create_topic(
            name,
            partitions,
            retention_ms=retention_ms,
            retention_bytes=retention_bytes,
            cleanup_policy=cleanup_policy,
            fsync_policy=fsync_policy,
            fsync_interval_ms=fsync_interval_ms,
            segment_bytes=segment_bytes,
            segment_ms=segment_ms,
            ttl_ms=ttl_ms,
            dedup_window_ms=dedup_window_ms,
            delete_retention_ms=delete_retention_ms,
        )
    if json_output:
        typer.echo(json.dumps({"name": name, **dataclasses.asdict(settings)}))
        return
    typer.echo(f"created topic {name}")
    _print_settings(settings)


@command(app, "list")
def list_command(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List every topic with its partition count, sorted by name."""
    with connect(ctx) as client:
        topics = client.list_topics()
    if json_output:
        for topic in topics:
            typer.echo(json.dumps({"name": topic.name, "partitions": topic.partitions}))
        return
    print_table(("TOPIC", "PARTITIONS"), ((topic.name, topic.partitions) for topic in topics))


@command(app, "describe")
def describe_command(ctx: typer.Context, name: TopicName, json_output: JsonOption = False) -> None:
    """Show a topic's settings and, per partition, the first stored offset, the log end
    offset, the high watermark (what consumers may read), the bytes and segment files.

    Exit status 1 when there is no such topic.
    """
    with connect(ctx) as client:
        description = client.describe_topic(name)
    if json_output:
        typer.echo(
            json.dumps(
                {
                    "name": description.name,
                    "settings": dataclasses.asdict(description.settings),
                    "partitions": [dataclasses.asdict(partition) for partition in description.partitions],
                }
            )
        )
        return
    typer.echo(f"topic {description.name}")
    _print_settings(description.settings)
    typer.echo("")
    print_table(
        ("PARTITION", "START", "END", "HIGH-WATERMARK", "BYTES", "SEGMENTS"),
        (
            (p.partition, p.log_start_offset, p.log_end_offset, p.high_watermark, p.size, p.segments)
            for p in description.partitions
        ),
    )


@command(app, "delete")
def delete_command(ctx: typer.Context, name: TopicName) -> None:
    """Delete a topic and all its messages (no confirmation; it cannot be undone).

    Exit status 1 when there is no such topic.
    """
    with connect(ctx) as client:
        client.delete_topic(name)
    typer.echo(f"deleted topic {name}")
