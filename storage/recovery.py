"""Opening a partition log directory: clean-up, the clean-start check, and the
unclean-start scan (docs/fault-model.md, "Recovery procedure").

Everything here runs once, before the log accepts appends, and returns the segments
with their in-memory state plus a RecoveryReport that says exactly what was dropped.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field

from crc32c import crc32c

from .checkpoint import (
    CHECKPOINT_FILE,
    CLEAN_SHUTDOWN_FILE,
    clean_shutdown_marked,
    read_checkpoint,
)
from .config import LogConfig
from .errors import CorruptBatchError, InvalidRecordError
from .fileio import FileSystem, read_whole_file, write_file_atomically
from .log_start import read_log_start
from .records import BATCH_HEADER_BYTES, check_header
from .segment import (
    DELETED_SUFFIX,
    INDEX_SUFFIX,
    LOG_SUFFIX,
    TIME_INDEX_SUFFIX,
    BatchScanner,
    Segment,
    parse_segment_name,
)

CLEANED_SUFFIX = ".cleaned"
SWAP_SUFFIX = ".swap"

# Compaction merging several segments into one (storage/compaction.py) writes this
# before the swap commits and removes it after; layout (32 bytes, big-endian):
#   0 4 magic "NDCM" | 4 2 version (1) | 6 2 reserved | 8 8 base offset of the new
#   segment | 16 8 end offset: the group's segments have bases in [base, end) | 24 4
#   reserved | 28 4 CRC-32C of bytes 0..27
MERGE_MARKER_FILE = "compaction.merging"
_MERGE_MARKER = struct.Struct(">4sHHqqI")
_MERGE_MAGIC = b"NDCM"


def write_merge_marker(fs: FileSystem, directory: str, base_offset: int, end_offset: int) -> None:
    body = _MERGE_MARKER.pack(_MERGE_MAGIC, 1, 0, base_offset, end_offset, 0)
    write_file_atomically(fs, os.path.join(directory, MERGE_MARKER_FILE), body + struct.pack(">I", crc32c(body)))


def read_merge_marker(fs: FileSystem, directory: str) -> tuple[int, int] | None:
    """(base offset, end offset) of the merge in progress, or None."""
    data = read_whole_file(fs, os.path.join(directory, MERGE_MARKER_FILE))
    if data is None or len(data) != _MERGE_MARKER.size + 4:
        return None
    body = data[: _MERGE_MARKER.size]
    if crc32c(body) != struct.unpack_from(">I", data, _MERGE_MARKER.size)[0]:
        return None
    magic, version, _reserved, base_offset, end_offset, _more = _MERGE_MARKER.unpack(body)
    if magic != _MERGE_MAGIC or version != 1 or not 0 <= base_offset < end_offset:
        return None
    return base_offset, end_offset


def remove_merge_marker(fs: FileSystem, directory: str) -> None:
    """Durably: a stale marker must never meet a later swap of the same base."""
    path = os.path.join(directory, MERGE_MARKER_FILE)
    if fs.exists(path):
        fs.unlink(path)
        fs.sync_directory(directory)


@dataclass(frozen=True, slots=True)
class LogDamage:
    """Damage found at open below the recovery point (G4): a batch of fsynced data that
    fails its checks (a bit flip, a truncated or shortened sealed segment, a missing
    segment). Nothing is cut: the log is served up to `offset` and refuses appends
    until an operator repairs it (`nodi segments recover --truncate-damaged`) or
    restores the file."""

    path: str  # the `.log` file holding the first bad batch
    position: int  # its byte position there
    offset: int  # the first offset not served: the damaged log ends here
    reason: str
    recovery_offset: int  # the point the damage lies below (checkpoint or sealed segments)
    # The highest offset a readable batch header after the damage names, or the recovery
    # point's last offset, whichever is higher; None when neither says more than `offset`.
    last_offset: int | None = None

    def describe(self) -> str:
        hidden = (
            f"offsets from {self.offset} on"
            if self.last_offset is None
            else f"offsets {self.offset}..{self.last_offset}"
        )
        return (
            f"DAMAGED below the recovery point {self.recovery_offset}: {self.path} at byte {self.position} "
            f"(offset {self.offset}): {self.reason}; served up to offset {self.offset}, {hidden} not served "
            "(kept on disk), appends refused; repair with `nodi segments recover --truncate-damaged` "
            "(cuts them) or restore the file"
        )


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    directory: str
    clean_shutdown: bool
    # True when the directory held no segment: a new log, nothing to recover.
    created: bool = False
    scanned_segments: int = 0
    scanned_bytes: int = 0
    # First offset dropped by truncation, and the highest offset known to have existed
    # after it (None when no later batch header could be read). Both None: nothing lost.
    first_lost_offset: int | None = None
    last_lost_offset: int | None = None
    truncated_bytes: int = 0
    truncation_reason: str | None = None
    # The checkpoint vouched that some lost offsets were fsynced: the disk broke a
    # promise (F6 or a lying disk), not just a torn unsynced tail.
    lost_durable_data: bool = False
    removed_segments: tuple[int, ...] = ()
    rebuilt_indexes: tuple[str, ...] = ()
    removed_files: tuple[str, ...] = ()
    duration_ms: float = 0.0
    # Damage below the recovery point, left in place (G4): the log ends at its offset
    # and refuses appends. None when nothing is damaged or it was cut (truncate_damaged).
    damage: LogDamage | None = None

    @property
    def lost_anything(self) -> bool:
        return self.first_lost_offset is not None

    def describe(self) -> str:
        state = "new log" if self.created else ("clean" if self.clean_shutdown else "unclean")
        if self.damage is not None:  # the clean-shutdown marker may have been there
            state = "damaged"
        text = (
            f"{self.directory}: {state} start, scanned {self.scanned_segments} segment(s), {self.scanned_bytes} bytes"
        )
        if self.lost_anything:
            lost = (
                f"offsets from {self.first_lost_offset} on lost (how many is unknown)"
                if self.last_lost_offset is None
                else f"offsets {self.first_lost_offset}..{self.last_lost_offset} lost"
                + ("" if self.lost_durable_data else " (at least: unsynced batches after a tear leave no trace)")
            )
            text += f"; truncated {self.truncated_bytes} bytes ({self.truncation_reason}): {lost}"
            if self.lost_durable_data:
                text += "; SOME OF THEM WERE BELOW THE RECOVERY POINT (fsynced data damaged)"
        if self.removed_segments:
            text += f"; removed segments {list(self.removed_segments)}"
        if self.rebuilt_indexes:
            text += f"; rebuilt {len(self.rebuilt_indexes)} index file(s)"
        if self.damage is not None:
            text += f"; {self.damage.describe()}"
        return text


@dataclass
class _Findings:
    removed_files: list[str] = field(default_factory=list)
    rebuilt_indexes: list[str] = field(default_factory=list)


def clean_directory(fs: FileSystem, directory: str, findings: _Findings) -> list[int]:
    """Step 1: drop leftovers of interrupted atomic writes, deletions and compaction
    swaps (I10, I11); return the segment base offsets found (I1)."""
    names = fs.list_directory(directory)
    changed = False
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith((".tmp", DELETED_SUFFIX, CLEANED_SUFFIX)):
            fs.unlink(path)
            findings.removed_files.append(name)
            changed = True
    # Listed again only after a change: a clean directory is listed once (a start of
    # many partitions pays for each listing).
    if changed:
        names = fs.list_directory(directory)
    # Compaction's swap (storage/compaction.py, I14): a `.log.swap` was complete and
    # fsynced before it got that name, so it commits the swap: finish it. The segment's
    # indexes are dropped, whichever generation they are, and rebuilt from the new
    # `.log` by load_sealed (I6). Any other `.swap` belongs to a committed swap (and is
    # dropped with its indexes) or to one that never committed (the old files stand).
    committed = [name for name in names if name.endswith(LOG_SUFFIX + SWAP_SUFFIX)]
    # Nothing above removes or creates the merge marker: `names` says whether it is there.
    marker_present = MERGE_MARKER_FILE in names
    merge = read_merge_marker(fs, directory) if marker_present else None
    for name in names:
        if name.endswith(SWAP_SUFFIX) and name not in committed:
            fs.unlink(os.path.join(directory, name))
            findings.removed_files.append(name)
            changed = True
    # Unsynced directory changes may survive a crash in any combination (F4): the old
    # indexes and a merge's later segments must be gone for good (fsync) before the
    # `.log.swap` takes its final name, and that name durable before the marker goes;
    # else a crash in recovery could leave the merged segment beside the segments it
    # replaced, with nothing left to say so.
    for name in committed:
        stem = name[: -len(LOG_SUFFIX + SWAP_SUFFIX)]
        for suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX):
            if fs.exists(os.path.join(directory, stem + suffix)):
                fs.unlink(os.path.join(directory, stem + suffix))
        if merge is not None and int(stem) == merge[0]:
            # A merge: the new segment holds every offset of the group's later segments.
            for other in fs.list_directory(directory):
                base = parse_segment_name(other)
                if base is not None and merge[0] < base < merge[1]:
                    for suffix in (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX):
                        path = os.path.join(directory, f"{base:020d}{suffix}")
                        if fs.exists(path):
                            fs.unlink(path)
                    findings.removed_files.append(other)
        fs.sync_directory(directory)
        fs.rename(os.path.join(directory, name), os.path.join(directory, stem + LOG_SUFFIX))
        changed = True
    if marker_present:
        if changed:
            fs.sync_directory(directory)
        fs.unlink(os.path.join(directory, MERGE_MARKER_FILE))
        changed = True
    if changed:
        names = fs.list_directory(directory)
    bases = sorted(base for base in map(parse_segment_name, names) if base is not None)
    logs = {f"{base:020d}" for base in bases}
    for name in names:
        stem, _, suffix = name.partition(".")
        if "." + suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX) and stem not in logs:
            fs.unlink(os.path.join(directory, name))
            findings.removed_files.append(name)
            changed = True
    if changed:
        fs.sync_directory(directory)
    return bases


def load_sealed(segment: Segment, config: LogConfig, next_base_offset: int, findings: _Findings) -> bool:
    """A segment below the scan: trust its size, check its indexes (I7), rebuild them
    from the `.log` when they fail a check, and walk the batch headers after its last
    index entry (no CRC: cheap) to see that they end the file. Its batches are verified
    on first read. False when the segment does not check out (cut short or extended, a
    rebuild meets a bad batch, offsets beyond the next segment): the caller scans it."""
    segment.size = segment.open_file().size()
    segment.next_offset = next_base_offset
    problem = (
        segment.index.check_file()
        or segment.time_index.check_file()
        or segment.index.check_entries(segment.size)
        or segment.time_index.check_entries(next_base_offset - segment.base_offset)
    )
    if problem is None:
        last = segment.index.last()
        if last is not None:
            if last[1] >= segment.size:
                problem = "last index entry beyond the log"
            else:
                try:
                    header = segment.read_header(last[1])
                except CorruptBatchError:
                    header = None
                if header is None or header.base_offset != segment.base_offset + last[0]:
                    problem = "last index entry does not name a batch start"
    last_time = None if problem else segment.time_index.last()
    if problem is None and segment.size and last_time is None:
        problem = "time index empty for a non-empty segment"
    if problem is None:
        if not _sealed_tail_checks_out(segment, config, next_base_offset):
            return False
        segment.max_timestamp = last_time[0] if last_time else -1
        return True
    try:
        segment.rebuild_indexes(config.limits, config.index_interval_bytes, verify=True)
    except CorruptBatchError:
        return False
    if segment.next_offset > next_base_offset or (config.dense_offsets and segment.next_offset != next_base_offset):
        return False  # cut short at a batch boundary, or holding offsets of the next segment
    segment.write_indexes()
    segment.index.release_memory()
    segment.time_index.release_memory()
    segment.next_offset = next_base_offset
    findings.rebuilt_indexes.extend([segment.index.path, segment.time_index.path])
    return True


def _sealed_tail_checks_out(segment: Segment, config: LogConfig, next_base_offset: int) -> bool:
    """The batches after the last index entry are whole, end exactly at the end of the
    file and hold offsets below the next segment's base, up to the one before it when
    offsets are dense (F6: a sealed segment cut short, even at a batch boundary, or
    grown). Headers only: at most an index interval and one batch are read."""
    last = segment.index.last()
    start = 0 if last is None else last[1]
    last_offset = None
    try:
        for batch in BatchScanner(segment.open_file(), start, segment.size, verify=False, limits=config.limits):
            last_offset = batch.header.last_offset
    except CorruptBatchError:
        return False
    if config.dense_offsets:
        return last_offset == next_base_offset - 1
    return last_offset is None or last_offset < next_base_offset


def _load_sealed_segments(segments: list[Segment], end: int, config: LogConfig, findings: _Findings) -> int | None:
    """load_sealed on segments[:end]; the number of the first that does not check out,
    or None."""
    for number in range(end):
        if not load_sealed(segments[number], config, segments[number + 1].base_offset, findings):
            return number
    return None


def open_clean_tail(segment: Segment, config: LogConfig) -> bool:
    """The clean-start check of the active segment: its indexes load and pass their
    checks, and the batches after the last index entry are whole and valid."""
    segment.size = segment.open_file().size()
    if segment.index.check_file() or segment.time_index.check_file():
        return False
    segment.index.load_into_memory()
    segment.time_index.load_into_memory()
    if segment.index.check_entries(segment.size) is not None:
        return False
    last = segment.index.last()
    start = 0 if last is None else last[1]
    try:
        tail = list(BatchScanner(segment.open_file(), start, segment.size, verify=True, limits=config.limits))
    except CorruptBatchError:
        return False
    if last is not None and (not tail or tail[0].header.base_offset != segment.base_offset + last[0]):
        return False
    if segment.time_index.check_entries(2**32) is not None:
        return False
    last_time = segment.time_index.last()
    segment.max_timestamp = last_time[0] if last_time else -1
    if tail:
        segment.next_offset = tail[-1].header.last_offset + 1
        segment.max_timestamp = max(segment.max_timestamp, *(batch.header.max_timestamp for batch in tail))
        segment.first_timestamp = segment.read_header(0).base_timestamp
        segment.bytes_since_index_entry = segment.size - start
    segment.verified_bytes = segment.size if start == 0 else 0
    segment.verified_from = start if start else None
    return True


def recover(
    fs: FileSystem, directory: str, config: LogConfig, *, truncate_damaged: bool = False
) -> tuple[list[Segment], RecoveryReport]:
    """Open `directory` as a log. Returns the segments, the last one active with its
    indexes in memory, and what recovery did.

    A bad batch above the recovery point (a torn or garbled unsynced tail, F1-F3) is
    cut there. One below it (fsynced data, F6) is cut only with `truncate_damaged`;
    otherwise nothing is cut, the segments end at the damage (the last one keeps only
    its bytes before it) and the report's `damage` says where (G4)."""
    started = time.monotonic()
    fs.make_directory(directory)
    findings = _Findings()
    bases = clean_directory(fs, directory, findings)
    checkpoint = read_checkpoint(fs, directory)
    clean = clean_shutdown_marked(fs, directory)
    if not bases:
        start = 0 if checkpoint is None else max(checkpoint.recovery_offset, checkpoint.log_start_offset)
        # Offsets below a stored log start were handed out once: never again (I21).
        start = max(start, read_log_start(fs, directory)[0] or 0)
        segment = Segment(fs, directory, start)
        segment.open_file(create=True)
        segment.start_in_memory_indexes()
        fs.sync_directory(directory)
        report = RecoveryReport(
            directory, clean_shutdown=clean, created=True, removed_files=tuple(findings.removed_files)
        )
        return [segment], report

    segments = [Segment(fs, directory, base) for base in bases]
    recovery_offset = 0 if checkpoint is None else checkpoint.recovery_offset
    # Below this, damage is never cut without an operator's word (G4): the checkpoint
    # vouches for it, and so does every sealed segment (a roll fsyncs the segment it
    # seals before it creates the next one, I5).
    protected_offset = max(recovery_offset, bases[-1])
    if clean and open_clean_tail(segments[-1], config):
        damaged = _load_sealed_segments(segments, len(segments) - 1, config, findings)
        if damaged is None:
            report = RecoveryReport(
                directory,
                clean_shutdown=True,
                rebuilt_indexes=tuple(findings.rebuilt_indexes),
                removed_files=tuple(findings.removed_files),
                duration_ms=(time.monotonic() - started) * 1000,
            )
            return segments, report
        first_scanned = damaged
    else:
        first_scanned = 0
        for number, segment in enumerate(segments):
            if segment.base_offset <= recovery_offset:
                first_scanned = number
        damaged = _load_sealed_segments(segments, first_scanned, config, findings)
        if damaged is not None:
            first_scanned = damaged
    kept, report_fields = _scan_tail(
        segments, first_scanned, config, directory, None if truncate_damaged else protected_offset
    )
    first_lost = report_fields.get("first_lost_offset")
    if first_lost is not None and protected_offset > first_lost:
        # The checkpoint proves offsets up to recovery_offset - 1 existed.
        last_lost = report_fields.get("last_lost_offset")
        report_fields["last_lost_offset"] = max(recovery_offset - 1, -1 if last_lost is None else last_lost)
        report_fields["lost_durable_data"] = True
    report = RecoveryReport(
        directory,
        clean_shutdown=False,
        rebuilt_indexes=tuple(findings.rebuilt_indexes),
        removed_files=tuple(findings.removed_files),
        duration_ms=(time.monotonic() - started) * 1000,
        **report_fields,
    )
    return kept, report


def _scan_tail(
    segments: list[Segment], first: int, config: LogConfig, directory: str, protected_offset: int | None
) -> tuple[list[Segment], dict]:
    """Unclean start (I2, I3): verify every batch from segment `first` on. At the first
    bad batch truncate there, remove every later segment, and fsync what remains; but
    when the bad batch lies below `protected_offset` (None: nothing is protected) keep
    every file as it is and end the log there (LogDamage, G4)."""
    fs = segments[0].fs
    expected = segments[first].base_offset
    scanned_bytes = 0
    bad: tuple[int, int, str] | None = None  # (segment number, position, reason)
    for number in range(first, len(segments)):
        segment = segments[number]
        if config.dense_offsets and segment.base_offset != expected or segment.base_offset < expected:
            bad = (number, 0, f"segment starts at {segment.base_offset}, expected {expected}")
            break
        end = segment.open_file().size()
        segment.size = end
        segment.reset_for_scan()
        scanner = BatchScanner(segment.open_file(), 0, end, verify=True, limits=config.limits)
        try:
            for batch in scanner:
                header = batch.header
                if (config.dense_offsets and header.base_offset != expected) or header.base_offset < expected:
                    bad = (number, batch.position, f"batch at offset {header.base_offset}, expected {expected}")
                    break
                segment.note_batch(batch.position, header, config.index_interval_bytes)
                expected = header.last_offset + 1
        except CorruptBatchError as error:
            bad = (number, scanner.position, str(error))
        scanned_bytes += scanner.position
        segment.verified_bytes = segment.size
        if bad is not None:
            break

    fields: dict = {
        "scanned_segments": (bad[0] if bad else len(segments) - 1) - first + 1,
        "scanned_bytes": scanned_bytes,
    }
    kept = segments
    if bad is not None and protected_offset is not None and expected < protected_offset:
        number, position, reason = bad
        last_seen = _last_offset_hint(segments, number, position, config)
        known_end = max(protected_offset - 1, -1 if last_seen is None else last_seen)
        fields["damage"] = LogDamage(
            segments[number].log_path,
            position,
            expected,
            reason,
            protected_offset,
            known_end if known_end >= expected else None,
        )
        # A segment bad from its first byte (its name disagrees with the offsets
        # before it) is left out; otherwise it ends, in memory only, before the damage.
        last_kept = number - 1 if position == 0 and number > first else number
        kept = segments[: last_kept + 1]
        for later in segments[last_kept + 1 :]:
            later.close()
        kept[-1].size = position if last_kept == number else kept[-1].size
        kept[-1].next_offset = expected
        kept[-1].verified_bytes = kept[-1].size
        bad = None
    if bad is not None:
        number, position, reason = bad
        segment = segments[number]
        last_seen = _last_offset_hint(segments, number, position, config)
        removed = segments[number + 1 :] if position > 0 or number == 0 else segments[number:]
        # A segment removed whole is counted with the removed ones, not twice.
        truncated = 0 if segment in removed else segment.open_file().size() - position
        kept = segments[: len(segments) - len(removed)]
        for doomed in removed:
            truncated += doomed.open_file().size()
            remove_segment_files(fs, directory, doomed)
        if segment in kept:
            segment.open_file().truncate(position)
            segment.size = position
        fields.update(
            first_lost_offset=expected,
            last_lost_offset=last_seen if last_seen is not None and last_seen >= expected else None,
            truncated_bytes=truncated,
            truncation_reason=reason,
            removed_segments=tuple(doomed.base_offset for doomed in removed),
        )
        if not kept:  # the very first segment was bad from byte 0 and it was the only one
            fresh = Segment(fs, directory, segments[0].base_offset)
            fresh.open_file(create=True)
            kept = [fresh]
        fs.sync_directory(directory)
    for segment in kept[first:-1]:
        segment.sync()
        segment.write_indexes()
        segment.index.release_memory()
        segment.time_index.release_memory()
    active = kept[-1]
    if not active.index.in_memory:  # a sealed segment became the active one again
        active.index.load_into_memory()
        active.time_index.load_into_memory()
    active.sync()
    return kept, fields


def _last_offset_hint(segments: list[Segment], number: int, position: int, config: LogConfig) -> int | None:
    """Best effort: the highest last offset named by a readable batch header at or after
    the bad point (including later segments), for the loss report."""
    best = None
    for later in segments[number:]:
        start = position if later is segments[number] else 0
        end = later.open_file().size()
        scan_at = start
        for _ in range(100_000):
            if end - scan_at < BATCH_HEADER_BYTES:
                break
            try:
                header = later.read_header(scan_at)
                check_header(header, config.limits)
            except InvalidRecordError:
                break
            best = header.last_offset if best is None else max(best, header.last_offset)
            scan_at += header.size
    return best


def remove_segment_files(fs: FileSystem, directory: str, segment: Segment, *, keep_open: bool = False) -> None:
    """I10: rename every file of the segment to .deleted, fsync the directory, unlink.
    The segment then forgets its files (a reader's slice of the .log stays valid), or
    with `keep_open` (compaction, I15) keeps them open for readers that took it: a read
    of its offsets finds no batch there and goes on to the next segment, as for a gap."""
    if keep_open:
        segment.pin_files()
    renamed = []
    for path in segment.paths:
        if fs.exists(path):
            fs.rename(path, path + DELETED_SUFFIX)
            renamed.append(path + DELETED_SUFFIX)
    fs.sync_directory(directory)
    for path in renamed:
        fs.unlink(path)
    if not keep_open:
        segment.detach()


__all__ = [
    "CHECKPOINT_FILE",
    "CLEAN_SHUTDOWN_FILE",
    "LOG_SUFFIX",
    "RecoveryReport",
    "recover",
    "remove_segment_files",
]
