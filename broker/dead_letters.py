"""What a dead-lettered copy of a message looks like: the source record's key, value and
headers, untouched, followed by reserved headers that say where it came from and why.

Every broker feature that rides in record headers uses the reserved prefix `nodi-`
(docs/guarantees.md, "Reserved headers"); a dead-letter copy's headers begin with
`nodi-dlq-`. Values are UTF-8 text (numbers in decimal), so `nodi segments dump` and any
Kafka tool can read them. They come after the source's own headers, so a reader that
takes the last value of a name (Message.header) gets the newest even for a message
dead-lettered twice (redriven, then dead-lettered again).
"""

from __future__ import annotations

from nodi.storage.records import NewRecord, Record

from .queues import DeadLetter

RESERVED_HEADER_PREFIX = "nodi-"
DEAD_LETTER_HEADER_PREFIX = "nodi-dlq-"

# Header name -> what it holds (docs/guarantees.md lists the same).
SOURCE_TOPIC = "nodi-dlq-topic"
SOURCE_PARTITION = "nodi-dlq-partition"
SOURCE_OFFSET = "nodi-dlq-offset"
SOURCE_TIMESTAMP_MS = "nodi-dlq-timestamp-ms"
GROUP = "nodi-dlq-group"
REASON = "nodi-dlq-reason"
DELIVERY_COUNT = "nodi-dlq-delivery-count"
FIRST_DELIVERY_MS = "nodi-dlq-first-delivery-ms"
LAST_DELIVERY_MS = "nodi-dlq-last-delivery-ms"
LAST_ERROR = "nodi-dlq-last-error"

DEAD_LETTER_HEADERS = {
    SOURCE_TOPIC: "the topic the message was consumed from",
    SOURCE_PARTITION: "its partition there (decimal)",
    SOURCE_OFFSET: "its offset there (decimal)",
    SOURCE_TIMESTAMP_MS: "its timestamp there, ms since the Unix epoch (the copy's own timestamp is the dead-letter time)",
    GROUP: "the queue group that dead-lettered it",
    REASON: '"max-deliveries", "rejected" or "expired"',
    DELIVERY_COUNT: "how many times the group delivered it (decimal)",
    FIRST_DELIVERY_MS: "wall clock of its first delivery, ms since the Unix epoch",
    LAST_DELIVERY_MS: "wall clock of its last delivery",
    LAST_ERROR: "the consumer's last nack error text, or a reject's reason (may be empty)",
}


def dead_letter_record(record: Record, letter: DeadLetter, topic: str, group: str, now_ms: int) -> NewRecord:
    """The copy of `record` (consumed from `topic`) that goes to the dead-letter topic."""
    headers = list(record.headers)
    headers += [
        (SOURCE_TOPIC, topic.encode()),
        (SOURCE_PARTITION, str(letter.partition).encode()),
        (SOURCE_OFFSET, str(letter.offset).encode()),
        (SOURCE_TIMESTAMP_MS, str(record.timestamp_ms).encode()),
        (GROUP, group.encode()),
        (REASON, letter.reason.label.encode()),
        (DELIVERY_COUNT, str(letter.delivery_count).encode()),
        (FIRST_DELIVERY_MS, str(letter.first_delivery_ms).encode()),
        (LAST_DELIVERY_MS, str(letter.last_delivery_ms).encode()),
        (LAST_ERROR, letter.last_error.encode()),
    ]
    return NewRecord(record.key, record.value, headers, now_ms)
