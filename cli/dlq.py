"""`nodi dlq list | show | redrive | purge`: the dead letters of queue groups on a running
broker (docs/guarantees.md, "Queue groups").

A dead-letter topic is an ordinary topic: every queue group's dead-letter topic (by
default `<topic>.dlq`) and any topic whose name ends in `.dlq`. What has been handled is
tracked by a cursor, the committed offsets of the stream group `nodi.dlq` on the
dead-letter topic: `show` and `redrive` start at it, `redrive` and `purge` move it past
what they handled, and `list` counts what lies beyond it. Nothing is deleted: the entries
stay on disk until the topic's retention removes them, and `nodi group reset nodi.dlq
--topic TOPIC --to earliest` brings them all back.

Redrive republishes each entry's key, value and own headers (its reserved `nodi-`
headers - dead-letter metadata, TTL, delay, idempotency key - are left behind: it is a
new message) to the source topic named in its `nodi-dlq-source-topic` header, or to
--to, then moves the cursor past it. A crash between the two redrives it again: a
repeat, never a loss.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from nodi.broker.client import dead_letters
from nodi.broker.client.dead_letters import DEAD_LETTER_SUFFIX, header_text
from nodi.cli.common import command, connect, fail, json_bytes, print_table

app = typer.Typer(
    name="dlq",
    help="List, show, redrive and purge the dead letters of queue groups on a running broker.",
    no_args_is_help=True,
)

TopicArgument = Annotated[str, typer.Argument(help="The dead-letter topic.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object per line instead of a table.")]


def _require_dead_letter_topic(ctx: typer.Context, client, topic: str, *, force: bool = False) -> None:
    """Refuse (exit 1) a topic that is not a dead-letter topic: show, redrive and purge
    read an ordinary topic's messages as dead letters ("None-None@None" rows) and purge
    would move its cursor; --force lets purge do it anyway."""
    if force:
        return
    dead_letter_topics = dead_letters.dead_letter_topics(client)
    if topic in dead_letter_topics:
        return
    if topic not in {summary.name for summary in client.list_topics()}:
        raise fail(f"{ctx.command_path}: UnknownTopic: no topic {topic!r}")
    known = ", ".join(dead_letter_topics) or "none"
    hint = " (--force purges it anyway)" if ctx.info_name == "purge" else ""
    raise fail(
        f"{ctx.command_path}: {topic!r} is not a dead-letter topic: no queue group dead-letters into it and its "
        f"name does not end in {DEAD_LETTER_SUFFIX!r}{hint}. Dead-letter topics: {known}"
    )


@command(app, "list")
def list_command(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List the dead-letter topics (queue groups' dead-letter topics and topics named
    *.dlq): the entries not yet redriven or purged, all entries stored, and the queue
    groups that dead-letter into each."""
    rows = []
    with connect(ctx) as client:
        for topic, groups in dead_letters.dead_letter_topics(client).items():
            waiting = dead_letters.waiting(client, topic)
            description = client.describe_topic(topic)
            stored = sum(p.high_watermark - p.log_start_offset for p in description.partitions)
            rows.append((topic, waiting, stored, groups))
    if json_output:
        for topic, waiting, stored, groups in rows:
            typer.echo(json.dumps({"topic": topic, "waiting": waiting, "stored": stored, "queue_groups": groups}))
        return
    print_table(
        ("TOPIC", "WAITING", "STORED", "QUEUE GROUPS"),
        ((topic, waiting, stored, ",".join(groups) or "-") for topic, waiting, stored, groups in rows),
    )


@command(app, "show")
def show_command(
    ctx: typer.Context,
    topic: TopicArgument,
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Show at most this many entries.")] = 20,
    json_output: JsonOption = False,
) -> None:
    """Show the entries of a dead-letter topic from the cursor on: where each came from
    (source topic, partition, offset), the queue group, why (max-deliveries, rejected,
    expired), its delivery count and the consumer's last error. --json adds key, value
    and every header (bytes as text, or {"base64": ...})."""
    with connect(ctx) as client:
        _require_dead_letter_topic(ctx, client, topic)
        entries = list(dead_letters.entries(client, topic, count))
    if json_output:
        for partition, message in entries:
            typer.echo(
                json.dumps(
                    {
                        "partition": partition,
                        "offset": message.offset,
                        "timestamp_ms": message.timestamp,
                        "key": json_bytes(message.key),
                        "value": json_bytes(message.value),
                        "headers": [[name, json_bytes(value)] for name, value in message.headers],
                    }
                )
            )
        return
    print_table(
        ("PARTITION", "OFFSET", "SOURCE", "GROUP", "REASON", "DELIVERIES", "LAST ERROR"),
        (
            (
                partition,
                message.offset,
                f"{header_text(message, 'nodi-dlq-source-topic')}-{header_text(message, 'nodi-dlq-source-partition')}"
                f"@{header_text(message, 'nodi-dlq-source-offset')}",
                header_text(message, "nodi-dlq-group"),
                header_text(message, "nodi-dlq-reason"),
                header_text(message, "nodi-dlq-delivery-count"),
                (header_text(message, "nodi-dlq-last-error") or "")[:60],
            )
            for partition, message in entries
        ),
    )


PickOption = Annotated[
    list[str] | None,
    typer.Option(
        "--pick",
        help="Only the entry at PARTITION:OFFSET (repeat for more; see `nodi dlq show`). Each must be waiting.",
    ),
]


def _picked(ctx: typer.Context, picks: list[str] | None) -> list[tuple[int, int]] | None:
    """--pick PARTITION:OFFSET values as pairs (exit 1 for a malformed one)."""
    if not picks:
        return None
    pairs = []
    for pick in picks:
        partition, _, offset = pick.partition(":")
        if not (partition.isdigit() and offset.isdigit()):
            raise fail(f"{ctx.command_path}: --pick takes PARTITION:OFFSET, not {pick!r}")
        pairs.append((int(partition), int(offset)))
    return pairs


@command(app, "redrive")
def redrive_command(
    ctx: typer.Context,
    topic: TopicArgument,
    to: Annotated[
        str | None, typer.Option("--to", help="Republish to this topic instead of each entry's source topic.")
    ] = None,
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="Redrive at most this many entries (default: all).")
    ] = None,
    pick: PickOption = None,
) -> None:
    """Republish the entries of a dead-letter topic from the cursor on - key, value and
    their own headers, without the reserved nodi- headers - to their source topic (the
    same partition when it still has it) or to --to, then move the cursor past them. A
    repeat is possible after a crash, a loss is not. With --pick only the entries named
    (each must be waiting); they are marked handled and the cursor stays before any
    entry left waiting."""
    picked = _picked(ctx, pick)
    if picked is not None and count is not None:
        raise fail("nodi dlq redrive: give --pick or --count, not both")
    with connect(ctx) as client:
        _require_dead_letter_topic(ctx, client, topic)
        try:
            redriven = dead_letters.redrive(client, topic, to=to, count=count, picked=picked)
        except dead_letters.DeadLetterWithoutSource as error:
            raise fail(f"nodi dlq redrive: {error}; give --to") from None
        except dead_letters.DeadLetterNotWaiting as error:
            raise fail(f"nodi dlq redrive: {error}; nothing was redriven") from None
    typer.echo(f"redrove {redriven} message(s) from {topic}")


@command(app, "purge")
def purge_command(
    ctx: typer.Context,
    topic: TopicArgument,
    force: Annotated[
        bool, typer.Option("--force", help="Purge a topic that is not a dead-letter topic (moves its nodi.dlq cursor).")
    ] = False,
    pick: PickOption = None,
) -> None:
    """Move the cursor of a dead-letter topic to its end: its entries are no longer
    listed, shown or redriven (they stay on disk until the topic's retention removes
    them). A topic that is not a dead-letter topic is refused without --force. With
    --pick only the entries named (each must be waiting) are marked handled."""
    picked = _picked(ctx, pick)
    with connect(ctx) as client:
        _require_dead_letter_topic(ctx, client, topic, force=force)
        try:
            purged = dead_letters.purge(client, topic, picked=picked)
        except dead_letters.DeadLetterNotWaiting as error:
            raise fail(f"nodi dlq purge: {error}; nothing was purged") from None
    typer.echo(f"purged {purged} message(s) from {topic}")
