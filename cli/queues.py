"""`nodi queue list | describe`: queue groups on a running broker - their settings, and
per partition the ack floor and the in-flight window (docs/guarantees.md, "Queue
groups")."""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Annotated

import typer

from nodi.cli.common import command, connect, print_table

app = typer.Typer(
    name="queue",
    help="List and describe queue groups (competing consumers with leases) on a running broker.",
    no_args_is_help=True,
)

LEASES_SHOWN_MAX = 1000  # --leases: the server lists at most this many per request too

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@command(app, "list")
def list_command(
    ctx: typer.Context,
    topic: Annotated[str | None, typer.Option("--topic", help="Only the queue groups of this topic.")] = None,
    json_output: JsonOption = False,
) -> None:
    """List the queue groups: topic, dead-letter topic, and over all partitions the
    messages in the window not yet done (pending), leased now, and waiting to be
    dead-lettered."""
    with connect(ctx) as client:
        queues = client.list_queues(topic)
    if json_output:
        for queue in queues:
            typer.echo(
                json.dumps(
                    {
                        "group": queue.group,
                        "topic": queue.topic,
                        "dead_letter_topic": queue.dead_letter_topic,
                        "pending": queue.pending,
                        "leased": queue.leased,
                        "dead_letters_pending": queue.dead_letters_pending,
                    }
                )
            )
        return
    print_table(
        ("GROUP", "TOPIC", "DEAD-LETTER TOPIC", "PENDING", "LEASED", "TO DEAD-LETTER"),
        ((q.group, q.topic, q.dead_letter_topic, q.pending, q.leased, q.dead_letters_pending) for q in queues),
    )


@command(app, "describe")
def describe_command(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="The topic the queue group consumes.")],
    group: Annotated[str, typer.Argument(help="The queue group's name.")],
    json_output: JsonOption = False,
    leases: Annotated[
        int,
        typer.Option(
            "--leases",
            min=0,
            max=LEASES_SHOWN_MAX,
            help="Also list up to this many in-flight messages (needs consume on the group and topic): each "
            "lease with its delivery count and deadline, each retry with its due time, each dead letter being "
            "written.",
        ),
    ] = 0,
) -> None:
    """Show a queue group's settings (ack wait, max deliveries, backoff, dead-letter
    topic, what happens to expired messages), its counts since the broker started, and
    per partition the ack floor (every offset below is done), the next offset never
    delivered, and the window's pending, leased and to-be-dead-lettered messages.

    Exit status 1 when the group never received from the topic.
    """
    with connect(ctx) as client:
        queue = client.describe_queue(topic, group)
        in_flight = client.queue_leases(topic, group, limit=leases) if leases else None
    backoff = queue.backoff
    backoff_text = (
        ",".join(map(str, backoff.delays_ms)) + " ms"
        if backoff.delays_ms
        else f"{backoff.base_ms} ms x{backoff.multiplier_percent / 100:g} up to {backoff.max_ms} ms "
        f"+{backoff.jitter_percent}%"
    )
    if json_output:
        typer.echo(
            json.dumps(
                {
                    "group": queue.group,
                    "topic": queue.topic,
                    "ack_wait_ms": queue.ack_wait_ms,
                    "max_deliveries": queue.max_deliveries,
                    "backoff": backoff_text,
                    "dead_letter_topic": queue.dead_letter_topic,
                    "expired": queue.expired,
                    "delivered": queue.delivered,
                    "redelivered": queue.redelivered,
                    "acked": queue.acked,
                    "nacked": queue.nacked,
                    "expired_leases": queue.expired_leases,
                    "dead_lettered": queue.dead_lettered,
                    "expired_messages": queue.expired_messages,
                    "partitions": [
                        {
                            "partition": p.partition,
                            "ack_floor": p.ack_floor,
                            "next_offset": p.next_offset,
                            "pending": p.pending,
                            "leased": p.leased,
                            "dead_letters_pending": p.dead_letters_pending,
                        }
                        for p in queue.partitions
                    ],
                    **(
                        {}
                        if in_flight is None
                        else {
                            "leases": [dataclasses.asdict(lease) for lease in in_flight.leases],
                            "more_leases": in_flight.more,
                        }
                    ),
                }
            )
        )
        return
    typer.echo(
        f"group {queue.group} on {queue.topic}: ack wait {queue.ack_wait_ms} ms, max deliveries "
        f"{queue.max_deliveries}, backoff {backoff_text}, dead letters to {queue.dead_letter_topic}, "
        f"expired messages: {queue.expired}"
    )
    typer.echo(
        f"since start: delivered {queue.delivered} (again {queue.redelivered}), acked {queue.acked}, "
        f"nacked {queue.nacked}, leases run out {queue.expired_leases}, dead-lettered {queue.dead_lettered}, "
        f"expired {queue.expired_messages}"
    )
    print_table(
        ("PARTITION", "ACK FLOOR", "NEXT OFFSET", "PENDING", "LEASED", "TO DEAD-LETTER"),
        (
            (p.partition, p.ack_floor, p.next_offset, p.pending, p.leased, p.dead_letters_pending)
            for p in queue.partitions
        ),
    )
    if in_flight is not None:
        typer.echo("in flight:")
        print_table(
            ("PARTITION", "OFFSET", "STATE", "DELIVERIES", "DUE (UTC)", "LAST ERROR"),
            (
                (
                    lease.partition,
                    lease.offset,
                    lease.state,
                    lease.delivery_count,
                    _utc(lease.lease_deadline_ms if lease.state == "leased" else lease.not_before_ms),
                    lease.last_error or "-",
                )
                for lease in in_flight.leases
            ),
        )
        if in_flight.more:
            typer.echo(f"(more in flight than the {leases} listed)")


def _utc(moment_ms: int | None) -> str:
    if moment_ms is None:
        return "-"
    if moment_ms == 0:
        return "now"
    return datetime.datetime.fromtimestamp(moment_ms / 1000, tz=datetime.UTC).isoformat(timespec="milliseconds")
