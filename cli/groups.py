"""`nodi group list | describe | reset`: stream consumer groups on a running broker:
who is a member, which partitions each reads, how far behind the group is, and replay
(moving an empty group's committed offsets)."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer

from nodi.broker.client.errors import ProtocolViolation, UnknownGroup
from nodi.cli.common import command, connect, parse_position, print_table

app = typer.Typer(
    name="group",
    help="List, describe and reset (replay) stream consumer groups on a running broker.",
    no_args_is_help=True,
)

GroupName = Annotated[str, typer.Argument(help="The consumer group's name.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@command(app, "list")
def list_command(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """List the groups the broker knows (with members, or with committed offsets):
    state (empty, rebalancing or stable) and member count."""
    with connect(ctx) as client:
        groups = client.list_groups()
    if json_output:
        for group in groups:
            typer.echo(json.dumps({"group": group.group, "state": group.state, "members": group.members}))
        return
    print_table(("GROUP", "STATE", "MEMBERS"), ((g.group, g.state, g.members) for g in groups))


def _partitions_text(assignments: dict[str, list[int]]) -> str:
    return " ".join(
        f"{topic}:{','.join(map(str, sorted(partitions)))}" for topic, partitions in sorted(assignments.items())
    )


@command(app, "describe")
def describe_command(ctx: typer.Context, group: GroupName, json_output: JsonOption = False) -> None:
    """Show a group's state and generation, its members with the partitions each is
    assigned, and per partition the committed offset, the high watermark and the lag
    (messages not yet committed; "-" when nothing is committed). Then what the group's
    rebalances did since the broker started: rebalances, partitions moved from one member
    to another (and how many were taken at a session timeout instead of released), the
    handover time (revocation to release), and the messages redelivered by handovers (as
    the members report them).

    Exit status 1 when the broker knows no such group.
    """
    with connect(ctx) as client:
        description = client.describe_group(group)
        try:
            handovers = client.describe_handovers(group)
        except (ProtocolViolation, UnknownGroup):  # a broker before protocol 2, or gone meanwhile
            handovers = None
    lags = sorted(description.lags, key=lambda lag: (lag.topic, lag.partition))
    if json_output:
        typer.echo(
            json.dumps(
                {
                    "group": description.group,
                    "state": description.state,
                    "generation": description.generation,
                    "members": [
                        {
                            "member_id": member.member_id,
                            "client_id": member.client_id,
                            "session_timeout_ms": member.session_timeout_ms,
                            "assignments": member.assignments,
                        }
                        for member in description.members
                    ],
                    "partitions": [
                        {
                            "topic": lag.topic,
                            "partition": lag.partition,
                            "committed_offset": lag.committed_offset,
                            "high_watermark": lag.high_watermark,
                            "lag": lag.lag,
                        }
                        for lag in lags
                    ],
                    "handovers": None if handovers is None else dataclasses.asdict(handovers),
                }
            )
        )
        return
    typer.echo(
        f"group {description.group}: {description.state}, generation {description.generation}, "
        f"{len(description.members)} member(s)"
    )
    if handovers is not None:
        mean = "-" if handovers.handover_ms_mean is None else f"{handovers.handover_ms_mean:.0f} ms"
        typer.echo(
            f"handovers since the broker started: {handovers.rebalances} rebalance(s), "
            f"{handovers.partitions_moved} partition(s) moved, {handovers.handovers} by a handover "
            f"({handovers.handovers_forced} taken at a session timeout), handover time mean {mean} max "
            f"{handovers.handover_ms_max} ms, "
            f"{handovers.partitions_revoking} revoking now, {handovers.messages_redelivered} message(s) "
            "redelivered"
        )
    if description.members:
        typer.echo("")
        print_table(
            ("MEMBER", "CLIENT", "SESSION-MS", "PARTITIONS"),
            (
                (m.member_id, m.client_id, m.session_timeout_ms, _partitions_text(m.assignments) or "-")
                for m in description.members
            ),
        )
    owners = {
        (topic, partition): member.member_id
        for member in description.members
        for topic, partitions in member.assignments.items()
        for partition in partitions
    }
    if lags:
        typer.echo("")
        print_table(
            ("TOPIC", "PARTITION", "COMMITTED", "HIGH-WATERMARK", "LAG", "MEMBER"),
            (
                (
                    lag.topic,
                    lag.partition,
                    lag.committed_offset,
                    lag.high_watermark,
                    lag.lag,
                    owners.get((lag.topic, lag.partition), "-"),
                )
                for lag in lags
            ),
        )
        total = sum(lag.lag for lag in lags if lag.lag is not None)
        typer.echo(f"total lag {total}")


@command(app, "reset")
def reset_command(
    ctx: typer.Context,
    group: GroupName,
    topic: Annotated[str, typer.Option("--topic", help="The topic whose committed offsets move.")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="earliest, latest, an offset or an ISO-8601 time (the first message at or after it; without a "
            "zone, local time).",
        ),
    ],
    partition: Annotated[
        list[int] | None,
        typer.Option("--partition", min=0, help="Only this partition; repeat for more (default: every partition)."),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Move the group's committed offsets in a topic (replay, or skip ahead): the next
    run of the group starts there. The group must have no members (stop its consumers
    first).

    Exit status 1 while the group has members, or for an unknown topic or partition.
    """
    position = parse_position(to, "--to")
    with connect(ctx) as client:
        offsets = client.reset_group(group, topic, position, partitions=partition)
    if json_output:
        for number, offset in sorted(offsets.items()):
            typer.echo(json.dumps({"group": group, "topic": topic, "partition": number, "offset": offset}))
        return
    print_table(
        ("TOPIC", "PARTITION", "OFFSET"), ((topic, number, offset) for number, offset in sorted(offsets.items()))
    )
