"""Typed errors of the storage layer.

Every operating condition (bad input, corrupt file, full disk, failed fsync) is one of
these; anything else escaping the storage layer is a bug.
"""

from __future__ import annotations


class NodiError(Exception):
    """Root of every error nodi raises on purpose."""


class InvalidRecordError(NodiError):
    """Input that can never be valid: a malformed, truncated or over-limit batch or
    record. Raised by the codec for anything a producer sends or a file holds."""


class CorruptBatchError(InvalidRecordError):
    """A batch whose bytes do not check out (length bounds, magic, CRC)."""

    def __init__(self, message: str, *, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


class RecordFramingError(CorruptBatchError):
    """A batch whose header and CRC check out but whose records do not: a length,
    varint, count or offset delta that lies, a compressed section that does not inflate
    within its limit, unknown attribute bits. The producer's fault, not the disk's: a
    produce is refused with it; a reader skips such a batch (stored before produce
    walked records) and reports it. `record_index` and `field` name the first bad part
    (None for the batch as a whole)."""

    def __init__(
        self,
        message: str,
        *,
        position: int | None = None,
        record_index: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, position=position)
        self.record_index = record_index
        self.field = field


class UnsupportedCompressionError(InvalidRecordError):
    """A batch compressed with a codec nodi does not decode (snappy, lz4, zstd)."""


class LimitExceededError(InvalidRecordError):
    """Input above a named limit (batch bytes, record bytes, headers per record...)."""


class RecordLimitError(RecordFramingError, LimitExceededError):
    """A batch whose records, once walked or inflated, go over a named limit
    (record_bytes_max, headers_per_record_max, decompressed_batch_bytes_max): it cannot
    be decoded within them, so it is refused and skipped like any RecordFramingError."""


class OffsetOutOfRangeError(NodiError):
    """A read below the log start offset or beyond the log end offset (or a
    delete_records beyond the high watermark: `message` says so)."""

    def __init__(self, offset: int, log_start_offset: int, log_end_offset: int, message: str | None = None) -> None:
        super().__init__(message or f"offset {offset} is outside the log [{log_start_offset}, {log_end_offset})")
        self.offset = offset
        self.log_start_offset = log_start_offset
        self.log_end_offset = log_end_offset


class CorruptSegmentError(NodiError):
    """A sealed segment holds a batch that fails its checks. Its bytes at and after
    `position` are never served; an operator has to repair or restore it."""

    def __init__(self, path: str, position: int, offset: int | None, reason: str) -> None:
        where = f"{path} at byte {position}" + (f" (offset {offset})" if offset is not None else "")
        super().__init__(f"corrupt segment {where}: {reason}")
        self.path = path
        self.position = position
        self.offset = offset
        self.reason = reason


class SegmentReadError(NodiError):
    """A read of a segment's files failed: the disk reported an error (EIO) or gave
    fewer bytes than the file holds. Nothing of the read is served. Not sticky: the disk
    may answer the next read (bytes that do arrive and fail their CRC check are a
    CorruptSegmentError instead)."""

    def __init__(self, path: str, position: int, reason: str) -> None:
        super().__init__(f"reading {path} at byte {position} failed: {reason}")
        self.path = path
        self.position = position
        self.reason = reason


class LogReadOnlyError(NodiError):
    """A write or fsync failed earlier: the log refuses further appends (sticky).
    An fsync is never retried: after a failed fsync the page cache cannot be trusted."""


class LogDamagedError(LogReadOnlyError):
    """The partition was found damaged at open below its recovery point (fsynced data
    that fails its checks, G4): it is served up to `offset` and refuses appends until an
    operator repairs it (`nodi segments recover --truncate-damaged`) or restores it."""

    def __init__(self, path: str, position: int, offset: int, reason: str) -> None:
        super().__init__(
            f"partition damaged: {path} at byte {position} (offset {offset}): {reason}; served up to offset "
            f"{offset}, appends refused until `nodi segments recover --truncate-damaged` or a restore"
        )
        self.path = path
        self.position = position
        self.offset = offset
        self.reason = reason


class PartitionNotReadyError(NodiError):
    """The partition is still being opened after a start (an unclean one is scanned
    past its checkpoint first): nothing of the request was done; retry in a moment."""


class PartitionOpenError(LogReadOnlyError):
    """Opening the partition's log at start failed (an I/O error, a permission): it
    serves nothing until the broker is restarted with the cause removed."""


class DiskFullError(NodiError):
    """ENOSPC on append. The partial write was removed; the log stays valid and
    writable once space is freed."""


class LogClosedError(NodiError):
    """The log was closed while an operation waited on it."""


class MetadataError(NodiError):
    """The metadata store (LMDB) refused an operation or holds an unreadable entry."""


class TopicExistsError(MetadataError):
    pass


class UnknownTopicError(MetadataError):
    pass


class InvalidConfigError(NodiError):
    """A topic or log setting outside its allowed range."""


class DurableWaitTimeoutError(NodiError):
    """An append was written but its fsync did not complete within the wait's timeout.
    The data may or may not become durable; the caller must not report it as durable."""


class DuplicateSequenceError(NodiError):
    """An idempotent producer re-sent a batch older than the ones the log remembers: it
    was written before, but its offsets are no longer known."""


class OutOfOrderSequenceError(NodiError):
    """An idempotent producer's batch does not continue its sequence (a gap): an earlier
    batch was lost in flight, so this one is refused rather than written out of order."""


class InvalidProducerEpochError(NodiError):
    """A batch from an older epoch of a producer id that has since moved on (a fenced
    zombie producer)."""


def holder_name(pid: int | None) -> str:
    """Who holds a data directory's lock, for messages: "process 4242", or "another
    process" when its PID is not known (None, or 0 from storage.lock.lock_holder)."""
    return f"process {pid}" if pid else "another process"


class DataDirectoryLockedError(NodiError):
    """Another process (a broker or an offline tool) holds the data directory's lock
    (storage/lock.py). Nothing was read or changed."""

    def __init__(self, data_dir: str, holder_pid: int | None) -> None:
        super().__init__(
            f"data directory {data_dir} is in use by {holder_name(holder_pid)} (a running broker or an offline tool); stop it first"
        )
        self.data_dir = data_dir
        self.holder_pid = holder_pid


class MetadataCorruptError(MetadataError):
    """The metadata store's data file is damaged (cut short, not LMDB, another format
    version): refused before LMDB maps it, since LMDB trusts its file and would crash
    the process (SIGBUS) or start an empty store."""


class MetadataUnavailableError(MetadataError):
    """A commit to the metadata store failed (an I/O error), or the store is waiting out
    the backoff after one. The transaction was aborted: nothing of it is on disk, and
    what was staged stays staged. The store retries by itself; reads go on."""


class MetadataDiskFullError(MetadataUnavailableError, DiskFullError):
    """A metadata commit failed for want of space (ENOSPC): DISK_FULL on the wire."""


class FileLimitTooLowError(NodiError):
    """The process may open too few files for a data directory (RLIMIT_NOFILE, `ulimit
    -n`): said at start, with the limit needed, instead of EMFILE later."""

    def __init__(self, soft_limit: int, needed: int) -> None:
        super().__init__(
            f"the open file limit (ulimit -n) is {soft_limit}, and the hard limit allows no more; "
            f"nodi needs at least {needed}: raise it (ulimit -n {needed}, or LimitNOFILE= in a systemd unit)"
        )
        self.soft_limit = soft_limit
        self.needed = needed
