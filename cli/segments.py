"""`nodi segments`: inspect, verify and repair the partition logs of a data directory,
offline (stop the broker first). A thin printer around nodi.storage.admin."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Protocol

import typer

from nodi.cli.common import check_offline_data_directory, command, json_bytes
from nodi.storage.admin import (
    ERROR,
    DumpedBatch,
    Problem,
    ProgressCallback,
    dump_segment,
    list_segments,
    recover_data_dir,
    verify_data_dir,
)
from nodi.storage.errors import DataDirectoryLockedError, MetadataError
from nodi.storage.records import ATTRIBUTE_TIMESTAMP_TYPE, Compression, Record

app = typer.Typer(
    name="segments",
    help=(
        "Inspect, verify and repair the segment files under DATA_DIR/logs/<topic>-<partition>/. "
        "Offline tools: stop the broker first."
    ),
    no_args_is_help=True,
)


def _command(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return command(app, name)


DataDirectory = Annotated[
    Path,
    typer.Argument(
        exists=True,
        file_okay=False,
        dir_okay=True,
        readable=True,
        help="The broker's data directory (holding meta/ and logs/).",
    ),
]


def _note_live_segment(path: Path) -> None:
    """A segment inside a data directory (DATA_DIR/logs/<partition>/<segment>.log)
    that a broker holds: say so on stderr. A copy elsewhere is dumped without a word."""
    from nodi.storage.errors import holder_name
    from nodi.storage.layout import is_data_directory
    from nodi.storage.lock import lock_holder

    data_dir = path.resolve().parent.parent.parent
    if is_data_directory(data_dir) and (holder := lock_holder(data_dir)) is not None:
        typer.echo(
            f"note: {data_dir} is in use by {holder_name(holder)}: {path.name} may change while it is read", err=True
        )


# ---------------------------------------------------------------------------
# list


@_command("list")
def list_command(
    ctx: typer.Context,
    data_dir: DataDirectory,
    batches: Annotated[
        bool,
        typer.Option(
            "--batches", help="Also count each segment's batches (walks every batch header: reads every segment)."
        ),
    ] = False,
    json_lines: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per segment instead of a table.")
    ] = False,
) -> None:
    """List every partition's segments: base offset, bytes, index entries, next offset.

    Cheap by default: sizes come from the file system and a segment's next offset from
    the next segment's name (the last segment's from its index and a walk of its tail).
    """
    check_offline_data_directory(ctx.command_path, data_dir, writes=False)
    partitions = list_segments(data_dir, count_batches=batches)
    if json_lines:
        for partition in partitions:
            for segment in partition.segments:
                typer.echo(
                    json.dumps(
                        {
                            "topic": partition.topic,
                            "partition": partition.partition,
                            "path": segment.path,
                            "base_offset": segment.base_offset,
                            "bytes": segment.byte_count,
                            "batches": segment.batch_count,
                            "index_entries": segment.index_entries,
                            "time_index_entries": segment.time_index_entries,
                            "next_offset": segment.next_offset,
                            "note": segment.note,
                        }
                    )
                )
        return
    if not partitions:
        typer.echo(f"no partition logs under {os.path.join(data_dir, 'logs')}")
        return
    header = ("PARTITION", "SEGMENT", "BYTES", "BATCHES", "INDEX", "TIMEINDEX", "NEXT OFFSET")
    rows = [header]
    notes = []
    for partition in partitions:
        name = f"{partition.topic}-{partition.partition}"
        for segment in partition.segments:
            rows.append(
                (
                    name,
                    os.path.basename(segment.path),
                    str(segment.byte_count),
                    "-" if segment.batch_count is None else str(segment.batch_count),
                    str(segment.index_entries),
                    str(segment.time_index_entries),
                    "?" if segment.next_offset is None else str(segment.next_offset),
                )
            )
            if segment.note:
                notes.append(f"{segment.path}: {segment.note}")
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        cells = [
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        ]
        typer.echo("  ".join(cells).rstrip())
    typer.echo("")
    for partition in partitions:
        recovery = (
            "none (full scan at next open)" if partition.recovery_offset is None else str(partition.recovery_offset)
        )
        typer.echo(
            f"{partition.topic}-{partition.partition}: {len(partition.segments)} segment(s), "
            f"{partition.byte_count} bytes, offsets {partition.log_start_offset}..{_before(partition.next_offset)}, "
            f"recovery point {recovery}, clean shutdown {'yes' if partition.clean_shutdown else 'no'}"
        )
    for note in notes:
        typer.echo(f"note: {note}")


def _before(offset: int | None) -> str:
    return "?" if offset is None else str(offset - 1)


# ---------------------------------------------------------------------------
# dump


def _codec_name(codec: int) -> str:
    return Compression(codec).name.lower() if codec in Compression._value2member_map_ else f"unknown-{codec}"


def _batch_fields(batch: DumpedBatch) -> dict[str, object]:
    header = batch.header
    return {
        "position": batch.position,
        "base_offset": header.base_offset,
        "last_offset": header.last_offset,
        "records_count": header.records_count,
        "bytes": header.size,
        "base_timestamp": header.base_timestamp,
        "max_timestamp": header.max_timestamp,
        "timestamp_type": "log_append" if header.attributes & ATTRIBUTE_TIMESTAMP_TYPE else "create",
        "codec": _codec_name(header.compression),
        "transactional": header.is_transactional,
        "control": header.is_control,
        "partition_leader_epoch": header.partition_leader_epoch,
        "producer_id": header.producer_id,
        "producer_epoch": header.producer_epoch,
        "base_sequence": header.base_sequence,
        "crc": f"{header.crc:#010x}",
        "crc_ok": batch.crc_ok,
    }


def _record_fields(record: Record) -> dict[str, object]:
    return {
        "offset": record.offset,
        "timestamp": record.timestamp_ms,
        "key": json_bytes(record.key),
        "value": json_bytes(record.value),
        "headers": [[name, json_bytes(value)] for name, value in record.headers],
    }


def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@_command("dump")
def dump_command(
    path: Annotated[
        Path,
        typer.Argument(exists=True, file_okay=True, dir_okay=False, readable=True, help="A segment's .log file."),
    ],
    records: Annotated[
        bool,
        typer.Option("--records", help="Also decode and print each batch's records (batches whose CRC checks out)."),
    ] = False,
    json_lines: Annotated[
        bool,
        typer.Option(
            "--json",
            help=(
                'Print JSON lines: {"type": "batch", ...} per batch (with "records" when --records) and '
                '{"type": "problem", ...} when the walk stops early. Keys, values and header values are '
                'text when valid UTF-8, else {"base64": "..."}.'
            ),
        ),
    ] = False,
) -> None:
    """Print every batch header of one segment .log file, optionally with its records.

    For each batch: position, base and last offset, record count, timestamps, codec,
    producer id/epoch/sequence and whether its CRC checks out. Reads only.

    Exit status 1 when a batch fails its CRC or the file cannot be walked to its end.
    """
    _note_live_segment(path)
    bad = False
    for item in dump_segment(path, records=records):
        if isinstance(item, Problem):
            bad = True
            if json_lines:
                typer.echo(json.dumps({"type": "problem", **item.to_dict()}))
            else:
                typer.echo(item.describe())
            continue
        bad = bad or not item.crc_ok
        fields = _batch_fields(item)
        if json_lines:
            line: dict[str, object] = {"type": "batch", **fields}
            if records:
                line["records"] = None if item.records is None else [_record_fields(record) for record in item.records]
                line["records_error"] = item.records_error
            typer.echo(json.dumps(line))
            continue
        fields = {name: (str(value).lower() if isinstance(value, bool) else value) for name, value in fields.items()}
        fields["crc_ok"] = "yes" if item.crc_ok else "NO"
        typer.echo("batch " + " ".join(f"{name}={value}" for name, value in fields.items()))
        if item.records_error:
            typer.echo(f"  records {item.records_error}")
        for record in item.records or ():
            decoded = _record_fields(record)
            typer.echo(
                f"  record offset={decoded['offset']} timestamp={decoded['timestamp']} "
                f"key={_compact(decoded['key'])} value={_compact(decoded['value'])} "
                f"headers={_compact(decoded['headers'])}"
            )
    if bad:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------
# verify and recover


class _Bar(Protocol):
    """What _progress_bar uses of typer's progress bar (its class is typer's private)."""

    def update(self, n_steps: int) -> None: ...


@contextlib.contextmanager
def _progress_bar(label: str) -> Iterator[ProgressCallback | None]:
    """A progress callback drawing a bar on stderr, or None when stderr is not a TTY."""
    if not sys.stderr.isatty():
        yield None
        return
    bars = contextlib.ExitStack()  # closes the bar once it is drawn
    bar: _Bar | None = None
    shown = 0

    def update(done: int, total: int) -> None:
        nonlocal bar, shown
        if bar is None:
            bar = bars.enter_context(
                typer.progressbar(length=max(total, 1), label=label, file=sys.stderr, show_pos=False)
            )
        bar.update(done - shown)
        shown = done

    with bars:
        yield update


@_command("verify")
def verify_command(ctx: typer.Context, data_dir: DataDirectory) -> None:
    """Check the metadata store and every batch, offset and index file of a data directory (read-only).

    The metadata store (meta/data.mdb): its header and size, every LMDB page's structure,
    every entry of its tables. Every batch of every segment: length bounds, magic, CRC;
    every record's framing (lengths, varints, counts, offset deltas: what produce checks,
    so a batch stored before produce checked it is reported); offset continuity within
    and across segments; each file ending exactly at its last batch; the index files.

    Exit status 0 when every batch checks out (warnings such as offset gaps or indexes
    the next open rebuilds are printed but allowed); 1 listing each bad file with its
    byte position and offset.
    """
    check_offline_data_directory(ctx.command_path, data_dir, writes=False)
    with _progress_bar("verifying") as progress:
        problems = verify_data_dir(data_dir, progress=progress)
    for problem in problems:
        typer.echo(problem.describe())
    errors = sum(problem.severity == ERROR for problem in problems)
    warnings = len(problems) - errors
    if errors:
        typer.echo(f"verify failed: {errors} error(s), {warnings} warning(s) in {data_dir}")
        raise typer.Exit(1)
    typer.echo(f"verify ok: every batch checks out in {data_dir} ({warnings} warning(s))")


@_command("recover")
def recover_command(
    ctx: typer.Context,
    data_dir: DataDirectory,
    truncate_damaged: Annotated[
        bool,
        typer.Option(
            "--truncate-damaged",
            help=(
                "Also cut damage below the recovery point (fsynced data that fails its checks: a bit flip, "
                "a truncated sealed segment): each damaged partition is truncated at its first bad batch and "
                "its later segments removed. Those offsets are lost; they are printed."
            ),
        ),
    ] = False,
) -> None:
    """Truncate torn tails offline and print the offsets lost per partition.

    Runs the log's crash recovery on every partition (truncate a torn tail above the
    recovery point at its first bad batch, drop the segments after it, rebuild indexes,
    remove leftovers), then closes it cleanly.

    Damage below the recovery point (data that was fsynced: before the checkpoint or
    after a clean shutdown) is never cut without --truncate-damaged: without it the
    partition is left as it was and printed as DAMAGED with its file, byte position
    and offset (stop here to restore the file from a backup instead).

    Each partition is opened with its topic's settings from DATA_DIR/meta (so a
    compacted topic's offset gaps are not taken for damage). Sealed segments below the
    recovery point are not rescanned (as at any open; their ends are checked): run
    `nodi segments verify` to check every batch. Exit status 0; 1 when a partition is
    damaged and --truncate-damaged was not given, a partition (or the metadata store)
    could not be opened, or a broker or another tool holds the data directory (nothing
    changed).
    """
    check_offline_data_directory(ctx.command_path, data_dir, writes=True)
    try:
        with _progress_bar("recovering") as progress:
            results = recover_data_dir(data_dir, progress=progress, truncate_damaged=truncate_damaged)
    except DataDirectoryLockedError as error:
        typer.echo(f"{ctx.command_path}: {error}", err=True)
        raise typer.Exit(1) from None
    except MetadataError as error:
        typer.echo(f"cannot read the topic settings recovery needs: {error}", err=True)
        raise typer.Exit(1) from None
    failed = damaged = 0
    for result in results:
        name = f"{result.topic}-{result.partition}"
        report = result.report
        if report is None:
            failed += 1
            typer.echo(f"{name}: FAILED to open: {result.error}")
            continue
        if result.error:
            failed += 1
            typer.echo(f"{name}: FAILED: {result.error}")
        if report.damage is not None:
            damaged += 1
            damage = report.damage
            hidden = "?" if damage.last_offset is None else str(damage.last_offset)
            typer.echo(
                f"{name}: DAMAGED below the recovery point {damage.recovery_offset}: {damage.path} at byte "
                f"{damage.position} (offset {damage.offset}): {damage.reason}; offsets {damage.offset}..{hidden} "
                "unreadable; nothing cut (--truncate-damaged cuts them, or restore the file)"
            )
            continue
        if report.created:
            state = "new log"
        elif report.clean_shutdown:
            state = "clean shutdown, no scan"
        else:
            state = f"scanned {report.scanned_segments} segment(s), {report.scanned_bytes} bytes"
        if report.lost_anything:
            last = "?" if report.last_lost_offset is None else str(report.last_lost_offset)
            line = (
                f"{name}: {state}; lost offsets {report.first_lost_offset}..{last} "
                f"(truncated {report.truncated_bytes} bytes: {report.truncation_reason})"
            )
            if report.lost_durable_data:
                line += "; fsynced data below the recovery point (damage cut by --truncate-damaged)"
        else:
            line = f"{name}: {state}; nothing lost"
        if report.removed_segments:
            line += f"; removed segments {', '.join(map(str, report.removed_segments))}"
        if report.rebuilt_indexes:
            line += f"; rebuilt {len(report.rebuilt_indexes)} index file(s)"
        if report.removed_files:
            line += f"; removed {', '.join(report.removed_files)}"
        typer.echo(line)
    lost = sum(result.report is not None and result.report.lost_anything for result in results)
    typer.echo(
        f"recovered {len(results) - failed - damaged} partition(s) in {data_dir}; offsets lost in {lost}. "
        "Sealed segments below each recovery point were not rescanned: `nodi segments verify` checks them."
    )
    if damaged:
        typer.echo(
            f"{damaged} partition(s) DAMAGED below the recovery point, left as they were: restore the files named "
            "above from a backup, or run again with --truncate-damaged to cut the damaged offsets."
        )
    if failed or damaged:
        raise typer.Exit(1)
