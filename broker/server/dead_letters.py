"""What a dead-lettered copy of a message looks like: the source record's key, value and
headers, untouched, followed by the reserved `nodi-dlq-*` headers (declared in
broker/protocol/headers.py, listed for users in docs/guarantees.md) that say where it came from
and why. The copy's timestamp is the dead-letter time, so the dead-letter topic's own
retention counts from then; the source timestamp is kept in a header.

The reserved headers come after the source's own, so a reader that takes the last value
of a name (Message.header, headers.find) gets the newest even for a message
dead-lettered twice (taken from a dead-letter topic, then dead-lettered again).
"""

from __future__ import annotations

from nodi.storage.records import NewRecord, Record

from ..protocol import headers as h
from ..protocol.headers import encode_integer
from .queues import DeadLetter

# Header name -> what it holds (docs/guarantees.md lists the same).
DEAD_LETTER_HEADERS = {
    h.DLQ_SOURCE_TOPIC: "the topic the message was consumed from",
    h.DLQ_SOURCE_PARTITION: "its partition there",
    h.DLQ_SOURCE_OFFSET: "its offset there",
    h.DLQ_SOURCE_TIMESTAMP_MS: "its timestamp there, ms since the Unix epoch",
    h.DLQ_GROUP: "the queue group that dead-lettered it",
    h.DLQ_REASON: '"max-deliveries", "rejected" or "expired"',
    h.DLQ_DELIVERY_COUNT: "how many times the group delivered it",
    h.DLQ_FIRST_DELIVERY_MS: "wall clock of its first delivery, ms since the Unix epoch",
    h.DLQ_LAST_DELIVERY_MS: "wall clock of its last delivery",
    h.DLQ_LAST_ERROR: "the consumer's last nack error text, or a reject's reason (may be empty)",
    h.DLQ_DEAD_LETTERED_MS: "when it was dead-lettered (also the copy's timestamp)",
}
assert all(name.startswith(h.RESERVED_PREFIX) for name in DEAD_LETTER_HEADERS)


def dead_letter_record(record: Record, letter: DeadLetter, topic: str, group: str, now_ms: int) -> NewRecord:
    """The copy of `record` (consumed from `topic`) that goes to the dead-letter topic."""
    headers = list(record.headers)
    headers += [
        (h.DLQ_SOURCE_TOPIC, topic.encode()),
        (h.DLQ_SOURCE_PARTITION, encode_integer(letter.partition)),
        (h.DLQ_SOURCE_OFFSET, encode_integer(letter.offset)),
        (h.DLQ_SOURCE_TIMESTAMP_MS, encode_integer(record.timestamp_ms)),
        (h.DLQ_GROUP, group.encode()),
        (h.DLQ_REASON, letter.reason.label.encode()),
        (h.DLQ_DELIVERY_COUNT, encode_integer(letter.delivery_count)),
        (h.DLQ_FIRST_DELIVERY_MS, encode_integer(letter.first_delivery_ms)),
        (h.DLQ_LAST_DELIVERY_MS, encode_integer(letter.last_delivery_ms)),
        (h.DLQ_LAST_ERROR, letter.last_error.encode()),
        (h.DLQ_DEAD_LETTERED_MS, encode_integer(now_ms)),
    ]
    return NewRecord(record.key, record.value, headers, now_ms)
