"""The client side of the broker features that ride in reserved record headers
(broker/protocol/headers.py, docs/guarantees.md): the keyword arguments of produce() and of the
producers' send() - ttl_ms, delay_ms / deliver_at, idempotency_key - and the check
that a caller's own headers stay out of the reserved `nodi-` namespace.

    headers = with_features(to_headers(user_headers), ttl_ms=60_000, idempotency_key="order-17")

TTL_MS is relative to the message's timestamp; NOT_BEFORE_MS is an absolute time (ms
since the epoch): delay_ms counts from the call. The idempotency key comes last, so the
producer can tell a keyed message by its last header without a scan.
"""

from __future__ import annotations

import dataclasses
import datetime as _datetime
import time

from ..protocol import headers as reserved
from .types import Headers, Message, timestamp_ms_of


def check_user_headers(headers: Headers) -> None:
    """ValueError for a header name with the reserved prefix: those are set by the
    keyword arguments (and by the broker), never by hand."""
    for name, _ in headers:
        if name.startswith(reserved.RESERVED_PREFIX):
            raise ValueError(
                f"header {name!r} uses the reserved prefix {reserved.RESERVED_PREFIX!r}: set TTL, delay and "
                "idempotency key with the ttl_ms=, delay_ms= / deliver_at= and idempotency_key= arguments"
            )


def idempotency_key_bytes(key: str | bytes | bytearray | memoryview) -> bytes:
    """An idempotency key as bytes: 1 to IDEMPOTENCY_KEY_BYTES_MAX of them."""
    if isinstance(key, str):
        data = key.encode()
    elif isinstance(key, (bytes, bytearray, memoryview)):
        data = bytes(key)
    else:
        raise TypeError(f"idempotency_key must be str or bytes, not {type(key).__name__}")
    if not 0 < len(data) <= reserved.IDEMPOTENCY_KEY_BYTES_MAX:
        raise ValueError(f"an idempotency key has 1 to {reserved.IDEMPOTENCY_KEY_BYTES_MAX} bytes, not {len(data)}")
    return data


def with_features(
    headers: Headers,
    *,
    ttl_ms: int | None = None,
    delay_ms: int | None = None,
    deliver_at: _datetime.datetime | None = None,
    idempotency_key: str | bytes | bytearray | memoryview | None = None,
    now_ms: int | None = None,
) -> Headers:
    """`headers` (checked: no reserved name) plus the reserved headers the keyword
    arguments ask for. ttl_ms > 0; delay_ms >= 0 or deliver_at (a datetime), not both."""
    if headers:
        check_user_headers(headers)
    if ttl_ms is None and delay_ms is None and deliver_at is None and idempotency_key is None:
        return headers
    added: list[tuple[str, bytes | None]] = []
    if ttl_ms is not None:
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be a positive int, not {ttl_ms!r}")
        added.append((reserved.TTL_MS, reserved.encode_integer(ttl_ms)))
    if delay_ms is not None and deliver_at is not None:
        raise ValueError("give delay_ms or deliver_at, not both")
    if delay_ms is not None:
        if isinstance(delay_ms, bool) or not isinstance(delay_ms, int) or delay_ms < 0:
            raise ValueError(f"delay_ms must be an int >= 0, not {delay_ms!r}")
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        added.append((reserved.NOT_BEFORE_MS, reserved.encode_integer(now_ms + delay_ms)))
    elif deliver_at is not None:
        if not isinstance(deliver_at, _datetime.datetime):
            raise TypeError(f"deliver_at must be a datetime, not {type(deliver_at).__name__}")
        added.append((reserved.NOT_BEFORE_MS, reserved.encode_integer(timestamp_ms_of(deliver_at))))
    if idempotency_key is not None:
        added.append((reserved.IDEMPOTENCY_KEY, idempotency_key_bytes(idempotency_key)))
    return (*headers, *added)


def has_idempotency_key(headers: Headers) -> bool:
    """True when with_features put an idempotency key on these headers (it goes last)."""
    return bool(headers) and headers[-1][0] == reserved.IDEMPOTENCY_KEY


def drop_expired(
    messages: list[Message],
    default_ttl_ms: int,
    include_expired: bool = False,
    now_ms: int | None = None,
) -> tuple[list[Message], int]:
    """`messages` of one fetch, carrying the topic's default TTL, without the
    expired ones unless include_expired; and how many were left out. Without a default
    TTL only messages with headers are looked at (the common case costs one pass)."""
    if default_ttl_ms <= 0 and not any(message.headers for message in messages):
        return messages, 0
    if default_ttl_ms > 0:
        messages = [dataclasses.replace(message, default_ttl_ms=default_ttl_ms) for message in messages]
    if include_expired:
        return messages, 0
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    kept = [message for message in messages if not message.expired(now_ms)]
    return kept, len(messages) - len(kept)


def split_duplicates(records, futures: list, count: int, leaders: list[int], duplicates) -> tuple:
    """A producer's batch answered PARTLY_DUPLICATE (nothing written): records (decoded)
    and futures (futures[count:] are repeats taking the result of record leaders[i]),
    split by `duplicates` (messages.DuplicateRecord; partition -1: a repeat of the record
    at index `offset`). Returns (futures done, their (partition, offset) results, the
    records to send again as (key, value, headers, timestamp) tuples, their futures with
    the repeats after them, the repeats' leaders in the new batch)."""
    originals = {d.index: (d.partition, d.offset) for d in duplicates if d.partition >= 0}
    repeats = {d.index: d.offset for d in duplicates if d.partition < 0}
    kept: list[tuple] = []
    kept_futures: list = []
    new_index: dict[int, int] = {}
    done_futures: list = []
    done_results: list = []
    for index in range(count):
        if index in originals:
            done_futures.append(futures[index])
            done_results.append(originals[index])
        elif index not in repeats:
            record = records[index]
            new_index[index] = len(kept)
            kept.append((record.key, record.value, record.headers, record.timestamp_ms))
            kept_futures.append(futures[index])
    followers = [(futures[index], first) for index, first in repeats.items()]
    followers += list(zip(futures[count:], leaders))
    new_leaders: list[int] = []
    for future, first in followers:
        if first in originals:
            done_futures.append(future)
            done_results.append(originals[first])
        else:
            kept_futures.append(future)
            new_leaders.append(new_index[first])
    return done_futures, done_results, kept, kept_futures, new_leaders


__all__ = [
    "drop_expired",
    "split_duplicates",
    "check_user_headers",
    "has_idempotency_key",
    "idempotency_key_bytes",
    "with_features",
]
