"""`nodi compact TOPIC`: compact every partition of a compacted topic now.

    nodi compact users                       # on the running broker (COMPACT_TOPIC)
    nodi compact users --data-dir ./data     # offline, the broker stopped
    nodi compact users --json

Either way each partition's active segment is sealed first, so everything produced
before the command is compacted; then each partition keeps the latest record per key
(tombstones until the topic's delete_retention_ms after a run first saw them). Prints
what each partition's run did.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Annotated

import typer

from nodi.cli.common import check_offline_data_directory, command, connect, fail, print_table
from nodi.cli.segments import _progress_bar

# Progress units per partition (the bar spans all partitions).
_UNITS_PER_PARTITION = 1000
COMPACT_TIMEOUT_MS = 600_000


def register(app: typer.Typer) -> None:
    """Add `compact` to the top-level `nodi` app."""
    command(app, "compact")(compact_command)


def compact_command(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="A topic with cleanup policy compact or compact,delete.")],
    data_dir: Annotated[
        str | None,
        typer.Option(
            "--data-dir",
            help="Compact offline in this data directory (stop the broker first: a directory in use is refused).",
        ),
    ] = None,
    timeout_ms: Annotated[
        int, typer.Option("--timeout-ms", min=1, help="Online: longest wait for the broker's answer.")
    ] = COMPACT_TIMEOUT_MS,
    key_map_bytes_max: Annotated[
        int | None,
        typer.Option("--key-map-bytes-max", min=1, help="Offline: memory for one pass's key map (default 64 MiB)."),
    ] = None,
    delete_retention_ms: Annotated[
        int | None,
        typer.Option(
            "--delete-retention-ms",
            min=0,
            help="Offline: how long (ms) tombstones stay after a run first saw them, instead of the topic's "
            "delete_retention_ms (one day for a topic stored without one).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per partition.")] = False,
) -> None:
    """Compact every partition of a compacted topic now, online or offline.

    Online (the default) the running broker seals each partition's active segment and
    compacts it. With --data-dir the data directory is compacted in this process, with
    a progress bar; the broker must be stopped. Each partition keeps the latest record
    per key, at its original offset.
    """
    if data_dir is None:
        with connect(ctx, timeout_ms=timeout_ms) as client:  # client errors: exit 1
            results = [_message_dict(entry) for entry in client.compact_topic(topic, timeout_ms=timeout_ms)]
    else:
        results = _compact_offline(ctx, data_dir, topic, key_map_bytes_max, delete_retention_ms)
    _print(results, as_json)


def _message_dict(entry) -> dict:
    return {name: getattr(entry, name) for name in entry.__dataclass_fields__ if name != "request_id"}


def _compact_offline(
    ctx: typer.Context, data_dir: str, topic: str, key_map_bytes_max: int | None, delete_retention_ms: int | None
) -> list[dict]:
    from nodi.storage.errors import DataDirectoryLockedError
    from nodi.storage.lock import DataDirectoryLock

    command_path = ctx.command_path
    if not os.path.isdir(data_dir):
        raise fail(f"{command_path}: {data_dir} is not a directory", 2)
    check_offline_data_directory(command_path, data_dir, writes=True)
    try:
        with DataDirectoryLock.acquire(data_dir):  # a live broker's directory is refused
            return _compact_locked(command_path, data_dir, topic, key_map_bytes_max, delete_retention_ms)
    except DataDirectoryLockedError as error:
        raise fail(f"{command_path}: {error}") from None


def _compact_locked(
    command_path: str, data_dir: str, topic: str, key_map_bytes_max: int | None, delete_retention_ms: int | None
) -> list[dict]:
    from nodi.storage.admin import topic_log_configs
    from nodi.storage.compaction import CompactionConfig, Compactor
    from nodi.storage.errors import NodiError
    from nodi.storage.layout import partition_directory
    from nodi.storage.log import Log
    from nodi.storage.metadata import MetadataStore

    try:
        settings = {}
        if key_map_bytes_max is not None:
            settings["key_map_bytes_max"] = key_map_bytes_max
        compactor = Compactor(CompactionConfig(**settings))
        with MetadataStore(data_dir) as metadata:
            topic_config = metadata.list_topics().get(topic)
        if topic_config is None:
            raise fail(f"{command_path}: no topic {topic!r} in {data_dir}")
        if delete_retention_ms is None:  # the topic's; None again: the compactor's default
            delete_retention_ms = topic_config.delete_retention_ms
        if "compact" not in topic_config.cleanup_policy:
            raise fail(
                f"{command_path}: topic {topic!r} has cleanup policy {topic_config.cleanup_policy!r}, not compact"
            )
        log_config = topic_log_configs(data_dir)[topic]
        results = []
        total = topic_config.partitions * _UNITS_PER_PARTITION
        with _progress_bar(f"compacting {topic}") as progress:
            for partition in range(topic_config.partitions):

                def report(done: int, size: int, partition: int = partition) -> None:
                    if progress is not None:
                        share = done * _UNITS_PER_PARTITION // max(size, 1)
                        progress(partition * _UNITS_PER_PARTITION + share, total)

                log = Log.open(partition_directory(data_dir, topic, partition), log_config)
                try:
                    result = compactor.compact(log, roll=True, progress=report, delete_retention_ms=delete_retention_ms)
                finally:
                    log.close()
                results.append(
                    {
                        "partition": partition,
                        **{key: value for key, value in asdict(result).items() if key != "directory"},
                    }
                )
        return results
    except NodiError as error:
        raise fail(f"{command_path}: {type(error).__name__}: {error}") from None


def _print(results: list[dict], as_json: bool) -> None:
    if as_json:
        for entry in results:
            typer.echo(json.dumps(entry, sort_keys=True))
        return
    print_table(
        [
            "partition",
            "passes",
            "segments rewritten",
            "bytes read",
            "bytes reclaimed",
            "records removed",
            "tombstones removed",
            "ms",
        ],
        [
            [
                entry["partition"],
                entry["passes"],
                entry["segments_rewritten"],
                entry["bytes_read"],
                entry["bytes_reclaimed"],
                entry["records_removed"],
                entry["tombstones_removed"],
                int(entry["duration_ms"]),
            ]
            for entry in results
        ],
    )
