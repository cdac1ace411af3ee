"""Publish dedup: a produced record whose idempotency-key header (broker/protocol/headers.py) was
seen on the same topic within the topic's dedup_window_ms is not written again; the
produce is answered with the original (partition, offset).

The produce path stays cheap. The broker never decodes records on produce, except here
and only when needed:

- a topic with dedup_window_ms 0 costs nothing;
- a request whose records carry no header at all, as the log's walk of them found
  (Log.check_append, run before this check), is not searched: the common case, a
  producer's uniform batches of header-free records, costs nothing more;
- otherwise each produce's bytes are searched once for the header name (bytes.find over
  the received frame, no copy: about 55 us per 256 KiB here, beside about 130 us for the
  append itself); a request without it goes straight to the log;
- a request that holds it has its batches checked (bounds, CRC: what the log checks
  anyway; the produce path hands over the log's check instead) and only the
  uncompressed batches that contain the name are decoded.
  Compressed batches are never decompressed for dedup: their records are written without
  a check and their keys are not remembered. nodi's own producer therefore sends every
  batch that holds an idempotency key uncompressed (docs/guarantees.md).

A request with duplicates writes nothing. When every record is a duplicate the answer is
a success naming each original; when only some are, the answer is PARTLY_DUPLICATE with
the duplicates, and the sender sends the others again (nodi's producer does that
itself): each record is written at most once and every record gets exactly one offset.
The broker never rewrites a batch, so the log keeps the producer's bytes and sequences.

State: per topic, a map of key digest (xxh3-128) -> (partition, offset, seen time),
in insertion order, expired by the window and bounded by keys_per_topic_max (the oldest
go first; a key evicted before its window ended is counted). The log is the truth: at
start the map is rebuilt from each partition's batches whose max timestamp is within
the window (found through the time index), so no second store can disagree with it.
Seen times are the broker's clock for keys recorded live and the batch's max timestamp
(the producer's clock) for keys rebuilt at start.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import xxhash

from nodi.storage.errors import InvalidRecordError, NodiError
from nodi.storage.limits import DEFAULT_RECORD_LIMITS, RecordLimits
from nodi.storage.log import CheckedAppend
from nodi.storage.records import Compression, decode_records, iter_batches, split_batches

from ..protocol.headers import IDEMPOTENCY_KEY_NEEDLE, idempotency_key_of

log = logging.getLogger("nodi.broker")

# Keys remembered per topic; beyond it the oldest are forgotten before their window ends.
# At about 250 bytes per key, 100,000 keys hold about 25 MB: a 2-minute window at
# about 830 keyed messages per second.
DEDUP_KEYS_PER_TOPIC_MAX = 100_000
# Bytes read per step while rebuilding a partition's keys at start.
REBUILD_READ_BYTES = 1 << 20
# At most the newest segments holding this many bytes of a partition are read back at
# start, however long the window: a busy topic's window must not make a start read
# gigabytes. Keys older than that are forgotten (logged).
REBUILD_BYTES_MAX_PER_PARTITION = 256 << 20

_NEEDLE = re.compile(re.escape(IDEMPOTENCY_KEY_NEEDLE))


@dataclass(frozen=True, slots=True)
class Original:
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class DedupCheck:
    """What check() found in one produce request: the new keyed records (index in the
    request, which is also the offset delta from its first offset; digest) and the
    duplicates (index, original; partition -1 names a repeat of the record at index
    `offset` of the same request)."""

    keyed: tuple[tuple[int, int], ...]
    duplicates: tuple[tuple[int, Original], ...]
    record_count: int


@dataclass(frozen=True, slots=True)
class DedupStatistics:
    topics: int  # topics with a window
    keys: int  # remembered now, over every topic
    requests_searched: int  # produce requests searched for the header name
    requests_skipped: int  # produce requests not searched: no record carries a header
    batches_decoded: int  # batches that held it and were decoded
    duplicates: int  # records not written because their key was seen
    partly_duplicate_requests: int  # requests answered PARTLY_DUPLICATE
    evicted_early: int  # keys forgotten before their window ended (keys_per_topic_max)
    rebuilt_keys: int  # keys read back from the log at start


def digest(key: bytes) -> int:
    return xxhash.xxh3_128_intdigest(key)


def _may_hold_a_key(records: bytes | memoryview) -> bool:
    """False when `records` surely holds no idempotency-key header. A memoryview is a
    slice of the frame it was decoded from: bytes.find over that whole frame (faster than
    a regex over the view) can only add false positives, which the decode then rules out."""
    owner = records.obj if isinstance(records, memoryview) else records
    if isinstance(owner, (bytes, bytearray)):
        return owner.find(IDEMPOTENCY_KEY_NEEDLE) >= 0
    return _NEEDLE.search(records) is not None


class _TopicKeys:
    __slots__ = ("window_ms", "entries")

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        # digest -> (partition, offset, seen_ms), oldest first.
        self.entries: OrderedDict[int, tuple[int, int, int]] = OrderedDict()


class PublishDedup:
    """The dedup state of every topic. Called on the event loop only (check, record and
    the append between them run without an await, so no two produces interleave)."""

    def __init__(
        self,
        keys_per_topic_max: int = DEDUP_KEYS_PER_TOPIC_MAX,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        limits: RecordLimits = DEFAULT_RECORD_LIMITS,
        rebuild_bytes_max: int = REBUILD_BYTES_MAX_PER_PARTITION,
    ) -> None:
        assert keys_per_topic_max > 0
        self.keys_per_topic_max = keys_per_topic_max
        self.rebuild_bytes_max = rebuild_bytes_max
        self._clock_ms = clock_ms
        self._limits = limits
        self._topics: dict[str, _TopicKeys] = {}
        self._requests_searched = 0
        self._requests_skipped = 0
        self._batches_decoded = 0
        self._duplicates = 0
        self._partly = 0
        self._evicted_early = 0
        self._rebuilt = 0

    # -- topics -------------------------------------------------------------------------

    def configure(self, topic: str, window_ms: int) -> None:
        """Start (or stop, with 0) deduplicating `topic`."""
        if window_ms <= 0:
            self._topics.pop(topic, None)
        elif topic in self._topics:
            self._topics[topic].window_ms = window_ms
        else:
            self._topics[topic] = _TopicKeys(window_ms)

    def drop(self, topic: str) -> None:
        self._topics.pop(topic, None)

    # -- produce ------------------------------------------------------------------------

    def check(
        self, topic: str, window_ms: int, records: bytes | memoryview, checked: CheckedAppend | None = None
    ) -> DedupCheck | None:
        """None when `records` carries no idempotency key the topic deduplicates (the
        fast path); else the keyed records and which of them are duplicates. window_ms
        is the topic's setting as stored (0: off), so a topic created by any path is
        covered. `checked`: the log's check_append of `records`, when it ran first: its
        batches are not checked again, and a request none of whose records carries a
        header is not searched. Raises InvalidRecordError for bad batches (the log
        refuses them too)."""
        keys = self._topics.get(topic)
        if keys is None or keys.window_ms != window_ms:
            if window_ms <= 0:
                self._topics.pop(topic, None)
                return None
            self.configure(topic, window_ms)
            keys = self._topics[topic]
        if checked is not None and not checked.headers:
            self._requests_skipped += 1
            return None
        self._requests_searched += 1
        if not _may_hold_a_key(records):
            return None
        now_ms = self._clock_ms()
        self._expire(keys, now_ms)
        view = memoryview(records)
        keyed: list[tuple[int, int]] = []
        duplicates: list[tuple[int, Original]] = []
        seen_here: dict[int, int] = {}  # digest -> index, for repeats inside the request
        index = 0
        batches = split_batches(view, self._limits) if checked is None else checked.batches
        for position, header in batches:
            batch = view[position : position + header.size]
            if header.records_count != header.last_offset_delta + 1:
                raise InvalidRecordError(f"batch at byte {position}: offsets are not dense")
            if header.compression == Compression.NONE and _NEEDLE.search(batch) is not None:
                self._batches_decoded += 1
                for record in decode_records(batch, header, self._limits):
                    key = idempotency_key_of(record.headers)
                    if key is None:
                        continue
                    record_index = index + record.offset - header.base_offset
                    value = digest(key)
                    entry = keys.entries.get(value)
                    if entry is not None and now_ms - entry[2] <= keys.window_ms:
                        duplicates.append((record_index, Original(entry[0], entry[1])))
                    elif value in seen_here:
                        # The same key twice in one request: only the first is new. The
                        # repeat is named with partition -1 and, as its offset, the index
                        # of that first record; the sender resends without it.
                        duplicates.append((record_index, Original(-1, seen_here[value])))
                    else:
                        seen_here[value] = record_index
                        keyed.append((record_index, value))
            index += header.records_count
        if not keyed and not duplicates:
            return None
        return DedupCheck(tuple(keyed), tuple(duplicates), index)

    def note_duplicates(self, check: DedupCheck) -> None:
        self._duplicates += sum(1 for _, original in check.duplicates if original.partition >= 0)
        if len(check.duplicates) < check.record_count:
            self._partly += 1

    def record(self, topic: str, partition: int, first_offset: int, check: DedupCheck) -> None:
        """Remember the keys of a request just written at `first_offset`."""
        keys = self._topics.get(topic)
        if keys is None:
            return
        now_ms = self._clock_ms()
        for record_index, value in check.keyed:
            self._add(keys, value, partition, first_offset + record_index, now_ms)

    def _add(self, keys: _TopicKeys, value: int, partition: int, offset: int, seen_ms: int) -> None:
        entries = keys.entries
        entries[value] = (partition, offset, seen_ms)
        entries.move_to_end(value)
        while len(entries) > self.keys_per_topic_max:
            _, (_, _, oldest_ms) = entries.popitem(last=False)
            if self._clock_ms() - oldest_ms <= keys.window_ms:
                self._evicted_early += 1

    @staticmethod
    def _expire(keys: _TopicKeys, now_ms: int) -> None:
        entries = keys.entries
        horizon = now_ms - keys.window_ms
        while entries:
            value, entry = next(iter(entries.items()))
            if entry[2] >= horizon:
                break
            del entries[value]

    # -- start --------------------------------------------------------------------------

    def rebuild(self, topic: str, partition: int, partition_log) -> int:
        """Read back the keys of `partition_log` written within the topic's window
        (read_back) and add them. Returns the keys added. Runs before the server
        serves (no produce races it)."""
        found = self.read_back(topic, partition, partition_log)
        self.add_read_back(topic, partition, found, in_order=False)
        return len(found)

    def add_read_back(self, topic: str, partition: int, found: list[tuple[int, int, int]], *, in_order: bool) -> None:
        """Remember keys read_back() found; `in_order`: put the topic's keys in seen
        order again now (a partition read back after the start; rebuild_all orders
        them once at the end)."""
        keys = self._topics.get(topic)
        if keys is None or not found:
            return
        entries = keys.entries
        for seen_ms, record_offset, value in found:
            if in_order and value in entries and entries[value][2] >= seen_ms:
                continue  # recorded since the start (or read back from another partition): newer
            self._add(keys, value, partition, record_offset, seen_ms)
        self._rebuilt += len(found)
        if in_order:
            keys.entries = OrderedDict(sorted(keys.entries.items(), key=lambda item: item[1][2]))

    def read_back(self, topic: str, partition: int, partition_log) -> list[tuple[int, int, int]]:
        """(seen ms, offset, digest) of the keys of `partition_log` written within
        the topic's window (from the first offset at or after now - window, by the time
        index; at most the newest segments holding rebuild_bytes_max). Reads the log
        and changes nothing here: any thread may call it."""
        keys = self._topics.get(topic)
        if keys is None:
            return []
        horizon = self._clock_ms() - keys.window_ms
        offset = partition_log.offset_for_timestamp(horizon)
        if offset is None:
            return []
        floor = self._newest_segments_start(partition_log)
        if floor > offset:
            log.warning(
                "publish dedup: %s-%d: the window holds more than %d bytes; keys below offset %d are not read back",
                topic,
                partition,
                self.rebuild_bytes_max,
                floor,
            )
            offset = floor
        found: list[tuple[int, int, int]] = []  # (seen_ms, offset, digest)
        end = partition_log.readable_end_offset
        while offset < end:
            result = partition_log.read(offset, REBUILD_READ_BYTES)
            if not result.slices:
                break
            data = result.to_bytes()
            for header, batch in iter_batches(data, self._limits):
                if (
                    header.max_timestamp < horizon
                    or header.compression != Compression.NONE
                    or _NEEDLE.search(batch) is None
                ):
                    continue
                try:
                    decoded = decode_records(batch, header, self._limits)
                except InvalidRecordError as error:  # stored before produce walked records
                    partition_log.note_undecodable(header, error, "publish dedup reading keys back")
                    continue
                for record in decoded:
                    key = idempotency_key_of(record.headers)
                    if key is not None and record.offset >= offset:
                        found.append((header.max_timestamp, record.offset, digest(key)))
            offset = result.next_offset
        return found

    def _newest_segments_start(self, partition_log) -> int:
        """The base offset of the oldest of the newest segments that together hold at
        most rebuild_bytes_max bytes (the active segment at least)."""
        segments = partition_log.segments
        start, total = segments[-1].base_offset, 0
        for segment in reversed(segments):
            total += segment.size
            if total > self.rebuild_bytes_max and segment is not segments[-1]:
                break
            start = segment.base_offset
        return start

    def rebuild_all(self, topics: Iterable[tuple[str, int, object]]) -> int:
        """rebuild() every (topic, partition, log); then order each topic's keys by
        seen time so expiry can stop at the first live one."""
        started = time.monotonic()
        total = 0
        for topic, partition, partition_log in topics:
            try:
                total += self.rebuild(topic, partition, partition_log)
            except NodiError as error:  # a corrupt segment is reported by reads; carry on
                log.warning("publish dedup: keys of %s-%d not read back: %s", topic, partition, error)
        for keys in self._topics.values():
            if keys.entries:
                keys.entries = OrderedDict(sorted(keys.entries.items(), key=lambda item: item[1][2]))
        if total:
            log.info(
                "publish dedup: %d idempotency keys read back from the log in %.0f ms",
                total,
                (time.monotonic() - started) * 1000,
            )
        return total

    def statistics(self) -> DedupStatistics:
        return DedupStatistics(
            topics=len(self._topics),
            keys=sum(len(keys.entries) for keys in self._topics.values()),
            requests_searched=self._requests_searched,
            requests_skipped=self._requests_skipped,
            batches_decoded=self._batches_decoded,
            duplicates=self._duplicates,
            partly_duplicate_requests=self._partly,
            evicted_early=self._evicted_early,
            rebuilt_keys=self._rebuilt,
        )


__all__ = ["DEDUP_KEYS_PER_TOPIC_MAX", "DedupCheck", "DedupStatistics", "Original", "PublishDedup", "digest"]
