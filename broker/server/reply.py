"""What a request handler returns (Reply), and how an exception raised while serving a
request becomes the error response the client sees (the storage error -> code table).

The services (service.py, queue_service.py, inbox_service.py, compaction_service.py,
status.py) import this module and nothing imports them back but service.py's dispatch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from nodi.storage import compaction
from nodi.storage import errors as storage_errors
from nodi.storage.log import FileSlice

from ..protocol import messages as m
from ..protocol.errors import ErrorCode, ProtocolError

# The field of a response that holds its record batches (the frame's last field).
RECORDS_FIELD = "records"


@dataclass(frozen=True, slots=True)
class Reply:
    """A response, and the records it carries when they are not in its `records` field:
    `slices` of segment files (a fetch) or in-memory `buffers` (a queue receive's stored
    batches), sent after the frame's header as they are, never joined into one copy. A
    reply has one kind or neither."""

    response: m.Response
    slices: tuple[FileSlice, ...] = ()
    buffers: tuple[bytes, ...] = ()

    @property
    def records_bytes(self) -> int:
        if self.buffers:
            return sum(len(buffer) for buffer in self.buffers)
        return sum(piece.length for piece in self.slices)


def response_with_buffers(reply: Reply) -> m.Response:
    """The reply's response with its `buffers` joined into its records field, for the
    callers that hand a response object over rather than a frame (embedded mode, the
    console)."""
    if not reply.buffers:
        return reply.response
    fields: dict[str, Any] = {RECORDS_FIELD: b"".join(reply.buffers)}
    return dataclasses.replace(reply.response, **fields)


ResponseType = TypeVar("ResponseType", bound=m.Response)


def response_of(reply: Reply, kind: type[ResponseType]) -> ResponseType:
    """The reply's response as the type its request is answered with (an error reply
    is that type too), for callers of Broker.handle such as the Kafka listener."""
    response = reply.response
    assert isinstance(response, kind), type(response)
    return response


def error_reply(request: m.Request, error: BaseException) -> Reply:
    """The request's own response type, carrying the error code and message."""
    code = error_code_for(error)
    message = error.message if isinstance(error, ProtocolError) else str(error)
    response_type = m.RESPONSE_OF[type(request)]
    return Reply(response_type(request_id=request.request_id, error_code=code, error_message=message))


# Storage errors a server turns into response codes; the most specific class wins.
_STORAGE_ERROR_CODES: dict[type[BaseException], ErrorCode] = {
    storage_errors.LimitExceededError: ErrorCode.LIMIT_EXCEEDED,
    storage_errors.RecordFramingError: ErrorCode.INVALID_RECORDS,  # also RecordLimitError: undecodable
    storage_errors.InvalidRecordError: ErrorCode.INVALID_RECORDS,
    storage_errors.OffsetOutOfRangeError: ErrorCode.OFFSET_OUT_OF_RANGE,
    storage_errors.CorruptSegmentError: ErrorCode.CORRUPT_DATA,
    # An EIO or short read of a segment: nothing of it is served; the message says which.
    storage_errors.SegmentReadError: ErrorCode.CORRUPT_DATA,
    storage_errors.LogReadOnlyError: ErrorCode.READ_ONLY_LOG,
    storage_errors.DiskFullError: ErrorCode.DISK_FULL,
    storage_errors.PartitionNotReadyError: ErrorCode.PARTITION_NOT_READY,
    storage_errors.MetadataDiskFullError: ErrorCode.DISK_FULL,
    storage_errors.MetadataUnavailableError: ErrorCode.METADATA_UNAVAILABLE,
    storage_errors.LogClosedError: ErrorCode.SERVER_SHUTTING_DOWN,
    storage_errors.TopicExistsError: ErrorCode.TOPIC_EXISTS,
    storage_errors.UnknownTopicError: ErrorCode.UNKNOWN_TOPIC,
    storage_errors.InvalidConfigError: ErrorCode.INVALID_CONFIG,
    storage_errors.DurableWaitTimeoutError: ErrorCode.NOT_DURABLE,
    storage_errors.OutOfOrderSequenceError: ErrorCode.OUT_OF_ORDER_SEQUENCE,
    storage_errors.InvalidProducerEpochError: ErrorCode.INVALID_PRODUCER_EPOCH,
    storage_errors.DuplicateSequenceError: ErrorCode.DUPLICATE_SEQUENCE,
    compaction.KeyRequiredError: ErrorCode.KEY_REQUIRED,
    compaction.CompactionCancelledError: ErrorCode.SERVER_SHUTTING_DOWN,
}


def error_code_for(error: BaseException) -> ErrorCode:
    """The response code for an exception raised while serving a request: a
    ProtocolError's own code, the code of a known storage error, INTERNAL otherwise."""
    if isinstance(error, ProtocolError):
        return error.code
    for cls in type(error).__mro__:
        code = _STORAGE_ERROR_CODES.get(cls)
        if code is not None:
            return code
    return ErrorCode.INTERNAL
