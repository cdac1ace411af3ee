"""The record headers nodi reserves for broker features, declared once for the server,
the client and the tools (docs/guarantees.md lists them for users).

Every reserved header name starts with `nodi-`; a producer's own headers must not. Values
are ASCII: times are milliseconds since the Unix epoch as decimal digits, counts are
decimal digits, names and ids are UTF-8 text. Text values make `nodi consume --json`
and `nodi segments dump --records` readable without a decoder.
"""

from __future__ import annotations

from collections.abc import Iterable

from nodi.storage.errors import NodiError

RESERVED_PREFIX = "nodi-"

# Set by producers (client keyword arguments), read by the broker at delivery.
TTL_MS = "nodi-ttl-ms"  # the message expires this long after its timestamp
NOT_BEFORE_MS = "nodi-not-before-ms"  # queue groups deliver it at or after this time
IDEMPOTENCY_KEY = "nodi-idempotency-key"  # publish dedup within the topic's window (read on produce)
REPLY_TO = "nodi-reply-to"  # request-reply: the requester's inbox
CORRELATION_ID = "nodi-correlation-id"  # request-reply: matches a reply to its request

# Written by the broker on a dead-lettered copy.
DLQ_SOURCE_TOPIC = "nodi-dlq-source-topic"
DLQ_SOURCE_PARTITION = "nodi-dlq-source-partition"
DLQ_SOURCE_OFFSET = "nodi-dlq-source-offset"
DLQ_GROUP = "nodi-dlq-group"
DLQ_REASON = "nodi-dlq-reason"  # one of DLQ_REASONS
DLQ_DELIVERY_COUNT = "nodi-dlq-delivery-count"
DLQ_FIRST_DELIVERY_MS = "nodi-dlq-first-delivery-ms"
DLQ_LAST_DELIVERY_MS = "nodi-dlq-last-delivery-ms"
DLQ_LAST_ERROR = "nodi-dlq-last-error"  # the consumer's last nack error text, may be empty
DLQ_DEAD_LETTERED_MS = "nodi-dlq-dead-lettered-ms"
DLQ_SOURCE_TIMESTAMP_MS = "nodi-dlq-source-timestamp-ms"  # the copy's own timestamp is the dead-letter time
DLQ_VALUE_OMITTED = "nodi-dlq-value-omitted"  # "1": the copy was too big with its value; the source has it

DLQ_REASONS = ("max-deliveries", "rejected", "expired")

# A header value the broker reads is at most this long (a longer one is ignored as bad).
RESERVED_VALUE_BYTES_MAX = 1024
# An idempotency key is 1 to this many bytes (the client refuses others; the broker
# ignores a key outside the range, as any unreadable reserved header).
IDEMPOTENCY_KEY_BYTES_MAX = RESERVED_VALUE_BYTES_MAX
# The bytes the broker looks for in an uncompressed batch before it decodes any record
# for publish dedup (broker/server/dedup.py): a batch without them has no idempotency key.
IDEMPOTENCY_KEY_NEEDLE = IDEMPOTENCY_KEY.encode("ascii")


class ReservedHeaderError(NodiError):
    """A reserved header with a value the broker cannot read."""


def is_reserved(name: str) -> bool:
    return name.startswith(RESERVED_PREFIX)


def idempotency_key_of(headers: Iterable[tuple[str, bytes | None]]) -> bytes | None:
    """A record's idempotency key: the last idempotency-key header when its value has
    1 to IDEMPOTENCY_KEY_BYTES_MAX bytes, else None."""
    value = find(headers, IDEMPOTENCY_KEY)
    if value is None or not 0 < len(value) <= IDEMPOTENCY_KEY_BYTES_MAX:
        return None
    return value


def expires_at_ms(
    timestamp_ms: int, headers: Iterable[tuple[str, bytes | None]], default_ttl_ms: int = 0
) -> int | None:
    """When a message expires: its timestamp plus its TTL header, else plus the topic's
    default TTL (0: none); None when it never expires. A TTL header that is not a
    positive integer is ignored (the default applies)."""
    ttl_ms = find_integer(headers, TTL_MS)
    if ttl_ms is None or ttl_ms <= 0:
        ttl_ms = default_ttl_ms
    return timestamp_ms + ttl_ms if ttl_ms > 0 else None


def encode_integer(value: int) -> bytes:
    return str(int(value)).encode("ascii")


def decode_integer(name: str, value: bytes | None) -> int:
    """A decimal header value; ReservedHeaderError when it is not one."""
    if value is None or not 0 < len(value) <= 20 or not value.lstrip(b"-").isdigit():
        raise ReservedHeaderError(f"header {name!r} is not a decimal integer: {value!r:.60}")
    return int(value)


def find(headers: Iterable[tuple[str, bytes | None]], name: str) -> bytes | None:
    """The value of the last header called `name`, or None."""
    found = None
    for key, value in headers:
        if key == name:
            found = value
    return found


def find_integer(headers: Iterable[tuple[str, bytes | None]], name: str) -> int | None:
    """The integer value of header `name`; None when absent or unreadable (a broker
    feature never fails a delivery over a bad header: it ignores the header)."""
    value = find(headers, name)
    if value is None:
        return None
    try:
        return decode_integer(name, value)
    except ReservedHeaderError:
        return None
