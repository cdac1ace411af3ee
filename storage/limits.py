"""Named limits of the storage layer, each with its documented default.

Checked where input is parsed, before anything is allocated for it. docs/storage-format.md
lists them; the broker's own limits (frame bytes, connections...) build on these.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


@dataclass(frozen=True, slots=True)
class RecordLimits:
    # One RecordBatch as stored, header included (Kafka's message.max.bytes is ~1 MiB).
    batch_bytes_max: int = 1 * MIB
    # One record's key + value + headers, as encoded.
    record_bytes_max: int = 1 * MIB
    # Headers on one record.
    headers_per_record_max: int = 1024
    # Records in one batch.
    records_per_batch_max: int = 100_000
    # A compressed batch may inflate to at most this many bytes (zip-bomb guard).
    decompressed_batch_bytes_max: int = 16 * MIB


DEFAULT_RECORD_LIMITS = RecordLimits()
