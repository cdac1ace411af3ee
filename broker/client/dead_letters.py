"""Dead letters of queue groups, read and handled through a blocking Client: the code
behind `nodi dlq list | show | redrive | purge` and the web console's dead-letter pages
(docs/guarantees.md, "Queue groups").

A dead-letter topic is an ordinary topic: every queue group's dead-letter topic (by
default `<topic>.dlq`) and any topic whose name ends in `.dlq`. What has been handled is
tracked by a cursor, the committed offsets of the stream group `nodi.dlq` on the
dead-letter topic: `entries` and `redrive` start at it, `redrive` and `purge` move it
past what they handled, and `dead_letter_topics` callers count what lies beyond it.
Nothing is deleted: the entries stay on disk until the topic's retention removes them.

Picked entries (`redrive(picked=...)`, `purge(picked=...)`: the console's checkboxes,
`nodi dlq redrive|purge --pick P:O`) may lie past other waiting entries. Those handled
past the cursor are kept in the cursor's commit metadata (`handled:` and their distances
from the cursor, at most HANDLED_PAST_CURSOR_MAX per partition), skipped by `entries`
and not counted as waiting; once the cursor reaches one it moves past it.

Redrive republishes each entry's key, value and own headers (its reserved `nodi-`
headers are left behind: it is a new message) to the source topic named in its
`nodi-dlq-source-topic` header, or to `to`, then moves the cursor past it. A crash
between the two redrives it again: a repeat, never a loss.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..protocol import headers as h
from .errors import DeadLetterNotWaiting, DeadLetterWithoutSource

if TYPE_CHECKING:
    from .sync_client import Client
    from .types import Message

CURSOR_GROUP = "nodi.dlq"
DEAD_LETTER_SUFFIX = ".dlq"
# Messages republished per producer flush (and cursor commit) during a redrive.
REDRIVE_CHUNK = 500
# Entries handled out of order (picked), past the cursor, remembered per partition at most;
# more are refused (DeadLetterNotWaiting) until the cursor catches up (handle or purge the
# entries before them). Their text fits the broker's offset_metadata_bytes_max (4 KiB).
HANDLED_PAST_CURSOR_MAX = 200
# Entries picked for one redrive or purge at most.
PICKED_MAX = 500
HANDLED_PREFIX = "handled:"


def header_text(message: Message, name: str) -> str | None:
    """The last value of header `name` as text (undecodable bytes replaced), or None."""
    value = message.header(name)
    return None if value is None else value.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where one partition of a dead-letter topic stands: `offset` is the first entry not
    yet handled (never below the log start), `handled` the entries past it handled out
    of order, `end` the high watermark."""

    partition: int
    offset: int
    handled: frozenset[int]
    end: int

    @property
    def waiting(self) -> int:
        return self.end - self.offset - sum(1 for offset in self.handled if offset < self.end)


def _handled_from_text(offset: int, text: str | None) -> frozenset[int]:
    if not text or not text.startswith(HANDLED_PREFIX):
        return frozenset()
    return frozenset(offset + int(part) for part in text[len(HANDLED_PREFIX) :].split(",") if part.isdigit())


def _handled_to_text(offset: int, handled: Collection[int]) -> str | None:
    return HANDLED_PREFIX + ",".join(str(o - offset) for o in sorted(handled)) if handled else None


def cursors(client: Client, topic: str) -> list[Cursor]:
    """The cursor of each partition of dead-letter topic `topic`."""
    description = client.describe_topic(topic)
    committed = client.fetch_committed(CURSOR_GROUP, [topic])
    found = []
    for p in description.partitions:
        stored, text = committed.get((topic, p.partition), (0, None))
        offset = max(stored, p.log_start_offset)
        handled = frozenset(o for o in _handled_from_text(stored, text) if o >= offset)
        found.append(Cursor(p.partition, offset, handled, p.high_watermark))
    return found


def positions(client: Client, topic: str) -> list[tuple[int, int, int]]:
    """(partition, cursor, high watermark) per partition: the cursor is the first entry
    not yet handled (never below the log start). Cursor.waiting counts what waits."""
    return [(c.partition, c.offset, c.end) for c in cursors(client, topic)]


def waiting(client: Client, topic: str) -> int:
    """The entries of `topic` not yet redriven or purged."""
    return sum(cursor.waiting for cursor in cursors(client, topic))


def entries(client: Client, topic: str, count: int | None) -> Iterator[tuple[int, Message]]:
    """(partition, message) from the cursor on, partition by partition, at most `count`,
    leaving out the entries handled out of order."""
    produced = 0
    for cursor in cursors(client, topic):
        offset, end = cursor.offset, cursor.end
        while offset < end and (count is None or produced < count):
            messages, offset = client.fetch_with_position(topic, cursor.partition, offset, include_expired=True)
            if not messages:
                break
            for message in messages:
                if message.offset in cursor.handled:
                    continue
                if count is not None and produced >= count:
                    return
                produced += 1
                yield cursor.partition, message


def commit_cursor(
    client: Client, topic: str, offsets: dict[int, int], handled: Mapping[int, Collection[int]] | None = None
) -> None:
    """Move the cursor of `topic` to partition -> offset (never back), and mark
    partition -> `handled` offsets handled; the cursor moves on past handled entries it
    reaches. Raises the first refusal, or DeadLetterNotWaiting past
    HANDLED_PAST_CURSOR_MAX."""
    handled = handled or {}
    now = {cursor.partition: cursor for cursor in cursors(client, topic)}
    commits: dict[tuple[str, int], tuple[int, str | None]] = {}
    for partition in sorted(set(offsets) | set(handled)):
        current = now.get(partition)
        if current is None:
            raise DeadLetterNotWaiting(topic, partition, offsets.get(partition, -1), "the topic has no such partition")
        offset = max(current.offset, offsets.get(partition, current.offset))
        marked = set(current.handled) | set(handled.get(partition, ()))
        while offset in marked:
            offset += 1
        marked = {o for o in marked if o > offset}
        if len(marked) > HANDLED_PAST_CURSOR_MAX:
            raise DeadLetterNotWaiting(
                topic,
                partition,
                min(marked),
                f"more than {HANDLED_PAST_CURSOR_MAX} entries would be handled past the cursor at {offset}: "
                "handle or purge the entries before them first",
            )
        commits[(topic, partition)] = (offset, _handled_to_text(offset, marked))
    results = client.commit_offsets(
        CURSOR_GROUP,
        {key: offset for key, (offset, _) in commits.items()},
        metadata={key: text for key, (_, text) in commits.items()},
    )
    for error in results.values():
        if error is not None:
            raise error


def picked_entries(client: Client, topic: str, picked: Collection[tuple[int, int]]) -> list[tuple[int, Message]]:
    """The entries at (partition, offset) `picked`, in order; DeadLetterNotWaiting for
    one that is not waiting (handled already, before the cursor, past the end)."""
    if len(picked) > PICKED_MAX:
        raise DeadLetterNotWaiting(topic, -1, -1, f"at most {PICKED_MAX} entries may be picked at once")
    now = {cursor.partition: cursor for cursor in cursors(client, topic)}
    found = []
    for partition, offset in sorted(set(picked)):
        cursor = now.get(partition)
        if cursor is None or not cursor.offset <= offset < cursor.end or offset in cursor.handled:
            raise DeadLetterNotWaiting(
                topic, partition, offset, "it is not waiting (handled already, or no such entry)"
            )
        message = next(
            (m for m in client.fetch(topic, partition, offset, include_expired=True) if m.offset == offset), None
        )
        if message is None:
            raise DeadLetterNotWaiting(topic, partition, offset, "no such entry")
        found.append((partition, message))
    return found


def dead_letter_topics(client: Client) -> dict[str, list[str]]:
    """Dead-letter topic -> the queue groups (group@topic) that write to it, by name."""
    existing = {summary.name for summary in client.list_topics()}
    found: dict[str, list[str]] = {name: [] for name in existing if name.endswith(DEAD_LETTER_SUFFIX)}
    for queue in client.list_queues():
        found.setdefault(queue.dead_letter_topic, []).append(f"{queue.group}@{queue.topic}")
    return {name: groups for name, groups in sorted(found.items()) if name in existing}


def redrive(
    client: Client,
    topic: str,
    *,
    to: str | None = None,
    count: int | None = None,
    picked: Collection[tuple[int, int]] | None = None,
) -> int:
    """Republish the entries of dead-letter topic `topic` from the cursor on (at most
    `count`) - key, value and their own headers, without the reserved nodi- headers - to
    their source topic (the same partition when it still has it) or to `to`, moving the
    cursor past each chunk once it is acknowledged. Returns how many were redriven.
    DeadLetterWithoutSource for an entry without a source topic when `to` is None.
    With `picked` ((partition, offset) pairs) exactly those entries, each of which must
    be waiting (DeadLetterNotWaiting otherwise, before anything is sent), and they are
    marked handled once all are acknowledged."""
    if picked is not None:
        chosen = picked_entries(client, topic, picked)
        for partition, message in chosen:
            if to is None and header_text(message, h.DLQ_SOURCE_TOPIC) is None:
                raise DeadLetterWithoutSource(topic, partition, message.offset, 0)
        _republish(client, chosen, to)
        _mark_handled(client, topic, chosen)
        return len(chosen)
    redriven = 0
    partitions: dict[str, int] = {}
    pending: list[tuple[int, Message]] = []

    def flush_chunk() -> None:
        nonlocal redriven
        if not pending:
            return
        _republish(client, pending, to, partitions)
        after: dict[int, int] = {}
        for partition, message in pending:
            after[partition] = max(after.get(partition, 0), message.offset + 1)
        commit_cursor(client, topic, after)
        redriven += len(pending)
        pending.clear()

    for partition, message in entries(client, topic, count):
        if to is None and header_text(message, h.DLQ_SOURCE_TOPIC) is None:
            flush_chunk()
            raise DeadLetterWithoutSource(topic, partition, message.offset, redriven)
        pending.append((partition, message))
        if len(pending) >= REDRIVE_CHUNK:
            flush_chunk()
    flush_chunk()
    return redriven


def purge(
    client: Client, topic: str, *, count: int | None = None, picked: Collection[tuple[int, int]] | None = None
) -> int:
    """Move the cursor of `topic` past its next `count` entries (None: to its end), or
    mark the `picked` (partition, offset) entries handled (each must be waiting): they
    are no longer listed, shown or redriven. Returns how many were passed."""
    if picked is not None:
        chosen = picked_entries(client, topic, picked)
        _mark_handled(client, topic, chosen)
        return len(chosen)
    if count is None:
        where = cursors(client, topic)
        commit_cursor(client, topic, {cursor.partition: cursor.end for cursor in where})
        return sum(cursor.waiting for cursor in where)
    after: dict[int, int] = {}
    purged = 0
    for partition, message in entries(client, topic, count):
        after[partition] = max(after.get(partition, 0), message.offset + 1)
        purged += 1
    if after:
        commit_cursor(client, topic, after)
    return purged


def _republish(
    client: Client, chosen: list[tuple[int, Message]], to: str | None, partitions: dict[str, int] | None = None
) -> None:
    """Send each entry's key, value and own headers to its source (the same partition
    when it still has it) or to `to`; raises the first failure once all were tried."""
    partitions = {} if partitions is None else partitions
    with client.producer() as producer:
        futures = []
        for _, message in chosen:
            target = to or header_text(message, h.DLQ_SOURCE_TOPIC)
            assert target is not None  # a message without it is refused before it is queued
            if target not in partitions:
                partitions[target] = client.partition_count(target)
            source_partition = header_text(message, h.DLQ_SOURCE_PARTITION)
            partition = None
            if to is None and source_partition is not None and source_partition.isdigit():
                partition = int(source_partition) if int(source_partition) < partitions[target] else None
            headers = [(name, value) for name, value in message.headers if not h.is_reserved(name)]
            futures.append(producer.send(target, message.value, key=message.key, headers=headers, partition=partition))
        producer.flush()
        for future in futures:
            future.result()  # raises the first failure: the cursor stays before it


def _mark_handled(client: Client, topic: str, chosen: list[tuple[int, Message]]) -> None:
    handled: dict[int, set[int]] = {}
    for partition, message in chosen:
        handled.setdefault(partition, set()).add(message.offset)
    commit_cursor(client, topic, {}, handled)
