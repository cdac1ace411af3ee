"""Dead letters of queue groups, read and handled through a blocking Client: the code
behind `nodi dlq list | show | redrive | purge` and the web console's dead-letter pages
(docs/guarantees.md, "Queue groups").

A dead-letter topic is an ordinary topic: every queue group's dead-letter topic (by
default `<topic>.dlq`) and any topic whose name ends in `.dlq`. What has been handled is
tracked by a cursor, the committed offsets of the stream group `nodi.dlq` on the
dead-letter topic: `entries` and `redrive` start at it, `redrive` and `purge` move it
past what they handled, and `dead_letter_topics` callers count what lies beyond it.
Nothing is deleted: the entries stay on disk until the topic's retention removes them.

Redrive republishes each entry's key, value and own headers (its reserved `nodi-`
headers are left behind: it is a new message) to the source topic named in its
`nodi-dlq-source-topic` header, or to `to`, then moves the cursor past it. A crash
between the two redrives it again: a repeat, never a loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..protocol import headers as h
from .errors import DeadLetterWithoutSource

if TYPE_CHECKING:
    from .sync_client import Client
    from .types import Message

CURSOR_GROUP = "nodi.dlq"
DEAD_LETTER_SUFFIX = ".dlq"
# Messages republished per producer flush (and cursor commit) during a redrive.
REDRIVE_CHUNK = 500


def header_text(message: Message, name: str) -> str | None:
    """The last value of header `name` as text (undecodable bytes replaced), or None."""
    value = message.header(name)
    return None if value is None else value.decode("utf-8", errors="replace")


def positions(client: Client, topic: str) -> list[tuple[int, int, int]]:
    """(partition, cursor, high watermark) per partition: the cursor is the first entry
    not yet handled (never below the log start)."""
    description = client.describe_topic(topic)
    committed = client.fetch_offsets(CURSOR_GROUP, [topic])
    return [
        (p.partition, max(committed.get((topic, p.partition), 0), p.log_start_offset), p.high_watermark)
        for p in description.partitions
    ]


def entries(client: Client, topic: str, count: int | None) -> Iterator[tuple[int, Message]]:
    """(partition, message) from the cursor on, partition by partition, at most `count`."""
    produced = 0
    for partition, offset, end in positions(client, topic):
        while offset < end and (count is None or produced < count):
            messages, offset = client.fetch_with_position(topic, partition, offset, include_expired=True)
            if not messages:
                break
            for message in messages:
                if count is not None and produced >= count:
                    return
                produced += 1
                yield partition, message


def commit_cursor(client: Client, topic: str, offsets: dict[int, int]) -> None:
    """Move the cursor of `topic` to partition -> offset (raises the first refusal)."""
    results = client.commit_offsets(CURSOR_GROUP, {(topic, partition): offset for partition, offset in offsets.items()})
    for error in results.values():
        if error is not None:
            raise error


def dead_letter_topics(client: Client) -> dict[str, list[str]]:
    """Dead-letter topic -> the queue groups (group@topic) that write to it, by name."""
    existing = {summary.name for summary in client.list_topics()}
    found: dict[str, list[str]] = {name: [] for name in existing if name.endswith(DEAD_LETTER_SUFFIX)}
    for queue in client.list_queues():
        found.setdefault(queue.dead_letter_topic, []).append(f"{queue.group}@{queue.topic}")
    return {name: groups for name, groups in sorted(found.items()) if name in existing}


def redrive(client: Client, topic: str, *, to: str | None = None, count: int | None = None) -> int:
    """Republish the entries of dead-letter topic `topic` from the cursor on (at most
    `count`) - key, value and their own headers, without the reserved nodi- headers - to
    their source topic (the same partition when it still has it) or to `to`, moving the
    cursor past each chunk once it is acknowledged. Returns how many were redriven.
    DeadLetterWithoutSource for an entry without a source topic when `to` is None."""
    redriven = 0
    partitions: dict[str, int] = {}
    pending: list[tuple[int, Message]] = []

    def flush_chunk() -> None:
        nonlocal redriven
        if not pending:
            return
        with client.producer() as producer:
            futures = []
            for _, message in pending:
                target = to or header_text(message, h.DLQ_SOURCE_TOPIC)
                assert target is not None  # a message without it is refused before it is queued
                if target not in partitions:
                    partitions[target] = client.partition_count(target)
                source_partition = header_text(message, h.DLQ_SOURCE_PARTITION)
                partition = None
                if to is None and source_partition is not None and source_partition.isdigit():
                    partition = int(source_partition) if int(source_partition) < partitions[target] else None
                headers = [(name, value) for name, value in message.headers if not h.is_reserved(name)]
                futures.append(
                    producer.send(target, message.value, key=message.key, headers=headers, partition=partition)
                )
            producer.flush()
            for future in futures:
                future.result()  # raises the first failure: the cursor stays before it
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


def purge(client: Client, topic: str, *, count: int | None = None) -> int:
    """Move the cursor of `topic` past its next `count` entries (None: to its end):
    they are no longer listed, shown or redriven. Returns how many were passed."""
    if count is None:
        where = positions(client, topic)
        commit_cursor(client, topic, {partition: end for partition, _, end in where})
        return sum(end - cursor for _, cursor, end in where)
    after: dict[int, int] = {}
    purged = 0
    for partition, message in entries(client, topic, count):
        after[partition] = max(after.get(partition, 0), message.offset + 1)
        purged += 1
    if after:
        commit_cursor(client, topic, after)
    return purged
