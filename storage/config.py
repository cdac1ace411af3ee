"""Settings of one partition log, with their documented defaults."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import InvalidConfigError
from .limits import DEFAULT_RECORD_LIMITS, GIB, MIB, RecordLimits

DAY_MS = 24 * 60 * 60 * 1000


class FsyncPolicy(enum.StrEnum):
    ALWAYS = "always"  # an append is durable when it returns (group commit)
    INTERVAL = "interval"  # fsync every fsync_interval_ms when there is new data
    NEVER = "never"  # fsync only at segment roll and clean close


@dataclass(frozen=True, slots=True)
class LogConfig:
    segment_bytes: int = 128 * MIB
    segment_ms: int = 7 * DAY_MS
    # An .index / .timeindex entry after about this many bytes of batches.
    index_interval_bytes: int = 4096
    fsync_policy: FsyncPolicy = FsyncPolicy.ALWAYS
    fsync_interval_ms: int = 1000
    retention_ms: int | None = 7 * DAY_MS
    retention_bytes: int | None = None
    # False for compacted logs, whose offsets may have gaps (never reorder).
    dense_offsets: bool = True
    # A log-append-time topic's log: each appended batch is stamped with the log's
    # clock (records.stamp_log_append_time), the producer's timestamps do not stand.
    log_append_time: bool = False
    # Longest an append waits for its fsync before DurableWaitTimeoutError.
    durable_wait_timeout_ms: int = 30_000
    limits: RecordLimits = field(default=DEFAULT_RECORD_LIMITS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fsync_policy", FsyncPolicy(self.fsync_policy))
        self.validate()

    def validate(self) -> None:
        # Positions and relative offsets are uint32 in the index.
        if not 4096 <= self.segment_bytes <= 2 * GIB:
            raise InvalidConfigError(f"segment_bytes {self.segment_bytes} outside [4096, 2 GiB]")
        if self.segment_ms < 1:
            raise InvalidConfigError(f"segment_ms {self.segment_ms} must be positive")
        if not 1 <= self.index_interval_bytes <= self.segment_bytes:
            raise InvalidConfigError(f"index_interval_bytes {self.index_interval_bytes} out of range")
        if self.fsync_interval_ms < 1:
            raise InvalidConfigError(f"fsync_interval_ms {self.fsync_interval_ms} must be positive")
        if self.retention_ms is not None and self.retention_ms < 0:
            raise InvalidConfigError(f"retention_ms {self.retention_ms} must be >= 0 or None")
        if self.retention_bytes is not None and self.retention_bytes < 0:
            raise InvalidConfigError(f"retention_bytes {self.retention_bytes} must be >= 0 or None")
        if self.durable_wait_timeout_ms < 1:
            raise InvalidConfigError("durable_wait_timeout_ms must be positive")
