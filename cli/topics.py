"""`nodi topic create | list | describe | delete | truncate`: topic admin on a running broker (the
global --server option, else NODI_SERVER, else 127.0.0.1:6634). Tables for people,
--json for scripts."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Annotated

import typer

from nodi.cli.common import command, connect, print_table
from nodi.storage.topic_settings import TOPIC_SETTINGS, TOPIC_SETTINGS_BY_NAME, TopicSetting

app = typer.Typer(
    name="topic",
    help="Create, list, describe, delete and truncate topics on a running broker.",
    no_args_is_help=True,
)

TopicName = Annotated[str, typer.Argument(help="The topic's name.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _settings_lines(settings) -> list[tuple[str, object]]:
    """Every setting in force (all the fields the client reports), a setting with no
    limit (UNLIMITED) shown as "unlimited"."""
    from nodi.broker import UNLIMITED

    lines = []
    for name, value in dataclasses.asdict(settings).items():
        declared = TOPIC_SETTINGS_BY_NAME.get(name)
        if declared is not None and declared.unlimited and value == UNLIMITED:
            value = "unlimited"
        lines.append((name, value))
    return lines


def _print_settings(settings) -> None:
    """One setting a line, the values in one column past the longest name."""
    lines = _settings_lines(settings)
    width = max((len(name) for name, _value in lines), default=0)
    for name, value in lines:
        typer.echo(f"{name:<{width}}  {value}")


def _setting_option(setting: TopicSetting, default: object) -> inspect.Parameter:
    """The `nodi topic create` option of a topic setting: --NAME-WITH-DASHES, its help,
    and its lower bound (-1, the client's UNLIMITED, for a setting with no limit); a value
    above the range or a string nodi does not know is the server's to refuse (exit 1)."""
    flag = "--" + setting.name.replace("_", "-")
    if setting.type is str:
        option = typer.Option(flag, help=setting.help)
    else:
        option = typer.Option(flag, min=-1 if setting.unlimited else setting.low, help=setting.help)
    python_type = setting.type if default is not None else setting.type | None
    return inspect.Parameter(
        setting.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[python_type, option]
    )


# What Client.create_topic sends for a setting left out, when not the server's default
# (None); tests/test_topic_settings.py keeps the two equal. Written here so that `nodi`
# does not import the client to build its options.
_CLIENT_DEFAULTS = {"partitions": 1}


def _with_setting_options(function):
    """Give `function` (whose **settings takes them) an option per topic setting, in
    their declared order, after its arguments and before its own options; each defaults
    to what Client.create_topic does when the setting is left out."""
    *parameters, _settings = inspect.signature(function, eval_str=True).parameters.values()
    arguments = [parameter for parameter in parameters if parameter.default is inspect.Parameter.empty]
    own_options = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in parameters[len(arguments) :]]
    settings = [_setting_option(setting, _CLIENT_DEFAULTS.get(setting.name)) for setting in TOPIC_SETTINGS]
    function.__signature__ = inspect.Signature([*arguments, *settings, *own_options])
    return function


@command(app, "create")
@_with_setting_options
def create_command(
    ctx: typer.Context,
    name: TopicName,
    exist_ok: Annotated[
        bool,
        typer.Option(
            "--exist-ok",
            help="A topic of that name already there is not an error: print its settings"
            " (the options given are not compared with them).",
        ),
    ] = False,
    json_output: JsonOption = False,
    **settings,
) -> None:
    """Create a topic. Settings left out take the server's defaults (nodi serve
    --print-config shows them); prints the settings in force.

    Exit status 1 when the name is taken (unless --exist-ok) or the server refuses a setting.
    """
    from nodi.broker import TopicExists

    existed = False
    with connect(ctx) as client:
        try:
            created = client.create_topic(name, **settings)
        except TopicExists:
            if not exist_ok:
                raise
            existed = True
            created = client.create_topic(name, exist_ok=True, **settings)
    if json_output:
        typer.echo(json.dumps({"name": name, "existed": existed, **dataclasses.asdict(created)}))
        return
    typer.echo(f"topic {name} exists" if existed else f"created topic {name}")
    _print_settings(created)


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
            # Size and segments -1: the partition is not open yet after a start (its
            # offsets are its checkpoint's).
            (
                p.partition,
                p.log_start_offset,
                p.log_end_offset,
                p.high_watermark,
                p.size if p.size >= 0 else "not open yet",
                p.segments if p.segments >= 0 else "-",
            )
            for p in description.partitions
        ),
    )


@command(app, "delete")
def delete_command(
    ctx: typer.Context,
    name: TopicName,
    missing_ok: Annotated[bool, typer.Option("--missing-ok", help="No topic of that name is not an error.")] = False,
) -> None:
    """Delete a topic and all its messages (no confirmation; it cannot be undone).

    Exit status 1 when there is no such topic (unless --missing-ok).
    """
    from nodi.broker import UnknownTopic

    with connect(ctx) as client:
        try:
            client.delete_topic(name)
        except UnknownTopic:
            if not missing_ok:
                raise
            typer.echo(f"no topic {name}")
            return
    typer.echo(f"deleted topic {name}")


@command(app, "truncate")
def truncate_command(
    ctx: typer.Context,
    name: TopicName,
    before: Annotated[
        int,
        typer.Option(
            "--before",
            min=-1,
            help="Delete every message below this offset (at most the high watermark); -1: the high watermark, "
            "every message now readable.",
        ),
    ],
    partitions: Annotated[
        list[int] | None,
        typer.Option("--partition", "-p", min=0, help="A partition to truncate (repeat it); default: every one."),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Delete a topic's oldest messages for good: each partition's log start offset
    moves forward to --before (Kafka's DeleteRecords). Readers below it get
    OffsetOutOfRange, as after retention; whole segments below it are removed. Asks
    first unless --yes; it cannot be undone.

    Exit status 1 when a partition fails (an offset above its high watermark, no such
    partition or topic); the others are truncated all the same.
    """
    with connect(ctx) as client:
        if partitions:
            chosen = sorted(set(partitions))
        else:
            chosen = [partition.partition for partition in client.describe_topic(name).partitions]
        target = "the high watermark" if before == -1 else f"offset {before}"
        if not yes:
            listed = ", ".join(str(partition) for partition in chosen)
            typer.confirm(
                f"Delete every message of {name} below {target} in partition(s) {listed}? This cannot be undone",
                abort=True,
            )
        starts = client.delete_records({(name, partition): before for partition in chosen})
    if json_output:
        typer.echo(json.dumps([{"partition": p, "log_start_offset": starts[(name, p)]} for p in chosen]))
        return
    for partition in chosen:
        typer.echo(f"{name}-{partition}: log start offset now {starts[(name, partition)]}")
