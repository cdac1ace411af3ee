"""The exceptions the Python client raises: one class per error code of the wire
protocol (broker/protocol/errors.py ErrorCode), plus the client's own conditions (a call that ran
out of time, a connection that broke, a client already closed).

Every class is a NodiClientError, which is a nodi.storage.errors.NodiError; each keeps the
ErrorCode it stands for in `code` (None for a purely client-side condition). Related codes
share a base so callers can catch a family (`GroupError`, `ProducerError`,
`ProtocolViolation`). `Timeout` is also a builtin TimeoutError and `ConnectionLost` a
builtin ConnectionError.

`error_for(code, message)` is the one mapping from a code to an exception.
"""

from __future__ import annotations

from nodi.storage.errors import LimitExceededError, NodiError

from ..protocol.errors import ErrorCode


class NodiClientError(NodiError):
    """Root of every error the client raises. `code` is the server's ErrorCode, or None
    for a condition the client detected itself."""

    default_code: ErrorCode | None = None

    def __init__(self, message: str = "", *, code: ErrorCode | None = None) -> None:
        self.code = self.default_code if code is None else code
        self.message = message
        prefix = f"{self.code.name}: " if self.code is not None else ""
        super().__init__(prefix + message if message else prefix.rstrip(": "))

    def __reduce__(self):  # pickled (multiprocessing) as it is: its text, code and fields
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[NodiClientError], args: tuple, fields: dict) -> NodiClientError:
    """Unpickle without calling __init__ again (which would prefix the code a second time,
    and which some subclasses define with arguments of their own)."""
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(fields)
    return error


# -- the protocol itself (codes 1-19) ------------------------------------------------


class ProtocolViolation(NodiClientError):
    """The client and server disagree about the protocol (a bug on one side, or a server
    of another version): UNKNOWN_API, UNSUPPORTED_VERSION, MALFORMED_FRAME,
    FRAME_TOO_LARGE, HANDSHAKE_REQUIRED, UNEXPECTED_MESSAGE."""


class InvalidRequest(NodiClientError):
    default_code = ErrorCode.INVALID_REQUEST


class LimitExceeded(NodiClientError):
    default_code = ErrorCode.LIMIT_EXCEEDED


class BufferFull(LimitExceeded):
    """A producer holds buffer_bytes_max of messages not yet acknowledged: wait for
    space (AsyncProducer.wait_for_space) or flush before sending more."""


class TooManyRequests(NodiClientError):
    default_code = ErrorCode.TOO_MANY_REQUESTS


# -- topics and logs (20-39) ---------------------------------------------------------


class UnknownTopic(NodiClientError):
    default_code = ErrorCode.UNKNOWN_TOPIC


class TopicExists(NodiClientError):
    default_code = ErrorCode.TOPIC_EXISTS


class UnknownPartition(NodiClientError):
    default_code = ErrorCode.UNKNOWN_PARTITION


class InvalidConfig(NodiClientError):
    default_code = ErrorCode.INVALID_CONFIG


class OffsetOutOfRange(NodiClientError):
    default_code = ErrorCode.OFFSET_OUT_OF_RANGE


class InvalidRecords(NodiClientError):
    default_code = ErrorCode.INVALID_RECORDS


class KeyRequired(InvalidRecords):
    """A record without a key sent to a compacted topic."""

    default_code = ErrorCode.KEY_REQUIRED


class CorruptData(NodiClientError):
    default_code = ErrorCode.CORRUPT_DATA


class NotDurable(NodiClientError):
    """Written, but the fsync did not complete in time: the batch may or may not survive
    a crash. An idempotent producer retries it (a duplicate is answered with the original
    offsets)."""

    default_code = ErrorCode.NOT_DURABLE


class Timeout(NodiClientError, TimeoutError):
    """A call did not complete within its timeout (client side, code None), or the server
    answered TIMEOUT."""


class ReadOnlyLog(NodiClientError):
    default_code = ErrorCode.READ_ONLY_LOG


class DiskFull(NodiClientError):
    default_code = ErrorCode.DISK_FULL


class PartitionNotReady(NodiClientError):
    """The partition is still being opened after the broker started: nothing was done.
    The clients send the request again (backing off) until the call's timeout."""

    default_code = ErrorCode.PARTITION_NOT_READY


# -- consumer groups (40-59) ---------------------------------------------------------


class GroupError(NodiClientError):
    """A consumer-group request the server refused."""


class UnknownGroup(GroupError):
    default_code = ErrorCode.UNKNOWN_GROUP


class GroupNotEmpty(GroupError):
    default_code = ErrorCode.GROUP_NOT_EMPTY


class RebalanceInProgress(GroupError):
    default_code = ErrorCode.REBALANCE_IN_PROGRESS


class UnknownMember(GroupError):
    default_code = ErrorCode.UNKNOWN_MEMBER


class IllegalGeneration(GroupError):
    default_code = ErrorCode.ILLEGAL_GENERATION


# -- the idempotent producer (60-79) -------------------------------------------------


class ProducerError(NodiClientError):
    """An idempotent-producer request the server refused."""


class UnknownProducerId(ProducerError):
    default_code = ErrorCode.UNKNOWN_PRODUCER_ID


class ProducerFenced(ProducerError):
    """INVALID_PRODUCER_EPOCH: a newer epoch of this producer id exists."""

    default_code = ErrorCode.INVALID_PRODUCER_EPOCH


class DuplicateSequence(ProducerError):
    default_code = ErrorCode.DUPLICATE_SEQUENCE


class OutOfOrderSequence(ProducerError):
    default_code = ErrorCode.OUT_OF_ORDER_SEQUENCE


class PartlyDuplicate(ProducerError):
    """Publish dedup: some records of a produce had an idempotency key seen within the
    topic's window; nothing was written. `duplicates` lists them (messages.DuplicateRecord:
    index, original partition and offset); the producer sends the others again."""

    default_code = ErrorCode.PARTLY_DUPLICATE
    duplicates: tuple = ()


# -- queue groups (100-119) -----------------------------------------------------------


class QueueError(NodiClientError):
    """A queue-group request the server refused."""


class QueueSettingsMismatch(QueueError):
    default_code = ErrorCode.QUEUE_SETTINGS_MISMATCH


class UnknownDelivery(QueueError):
    default_code = ErrorCode.UNKNOWN_DELIVERY


class StaleDelivery(QueueError):
    """The message was delivered again (its lease ran out): this delivery cannot be
    settled any more."""

    default_code = ErrorCode.STALE_DELIVERY


class DeliverySettled(QueueError):
    default_code = ErrorCode.DELIVERY_SETTLED


class UnknownQueueGroup(QueueError):
    default_code = ErrorCode.UNKNOWN_QUEUE_GROUP


class UnknownInbox(QueueError):
    """The requester's inbox is gone (closed, idle too long, or the broker restarted)."""

    default_code = ErrorCode.UNKNOWN_INBOX


class RequestTimeout(Timeout):
    """No reply to a request() within its timeout (client side)."""


# -- the server (80-99) and the connection ---------------------------------------------


class ServerShuttingDown(NodiClientError):
    default_code = ErrorCode.SERVER_SHUTTING_DOWN


class InternalServerError(NodiClientError):
    default_code = ErrorCode.INTERNAL


class MetadataUnavailable(NodiClientError):
    """A metadata commit failed on the server; it retries by itself: try again later."""

    default_code = ErrorCode.METADATA_UNAVAILABLE


class ConnectionLost(NodiClientError, ConnectionError):
    """The connection closed with the request in flight (or could not be opened): the
    request may or may not have been carried out. `code` is the reason the server gave in
    its Closing event, if it sent one."""


class ConnectFailed(ConnectionLost):
    """No connection could be opened (refused, unreachable, handshake refused) within the
    reconnect attempts and the call's timeout."""


class AuthenticationFailed(ConnectFailed):
    """The server refused the user and password (or the connection's principal is over
    its connection limit). Not retried: the same credentials would be refused again."""

    default_code = ErrorCode.AUTHENTICATION_FAILED


class AuthenticationRequired(ConnectionLost):
    """The server has a users file and the client sent a request before authenticating
    (give the client user= and password=)."""

    default_code = ErrorCode.AUTHENTICATION_REQUIRED


class TlsFailed(ConnectFailed):
    """The TLS handshake failed: the server's certificate is not signed by the CA the
    client trusts, has expired, or names another host; or the server wants TLS (or
    plaintext) and the client spoke the other. Not retried."""


class NotAuthorized(NodiClientError):
    """The connection's principal may not do this (produce, consume or admin) on this
    topic or group."""

    default_code = ErrorCode.NOT_AUTHORIZED


class ClientClosed(NodiClientError):
    """The client (or producer, or consumer) was closed."""


class SendFailed(NodiClientError):
    """A producer's flush(): `failed` of the messages sent before it failed (their
    futures hold each one's error); `first` is the first of those errors (also the
    exception's __cause__). Each failure is reported by one flush only."""

    def __init__(self, failed: int, first: BaseException) -> None:
        self.failed = failed
        self.first = first
        noun = "message" if failed == 1 else "messages"
        super().__init__(f"{failed} {noun} sent before flush() failed; the first: {first}")

    def __reduce__(self):  # pickled (multiprocessing) with its own arguments, not the text
        return type(self), (self.failed, self.first)


_CLASSES: dict[ErrorCode, type[NodiClientError]] = {
    ErrorCode.UNKNOWN_API: ProtocolViolation,
    ErrorCode.UNSUPPORTED_VERSION: ProtocolViolation,
    ErrorCode.MALFORMED_FRAME: ProtocolViolation,
    ErrorCode.FRAME_TOO_LARGE: ProtocolViolation,
    ErrorCode.HANDSHAKE_REQUIRED: ProtocolViolation,
    ErrorCode.UNEXPECTED_MESSAGE: ProtocolViolation,
    ErrorCode.INVALID_REQUEST: InvalidRequest,
    ErrorCode.LIMIT_EXCEEDED: LimitExceeded,
    ErrorCode.TOO_MANY_REQUESTS: TooManyRequests,
    ErrorCode.UNKNOWN_TOPIC: UnknownTopic,
    ErrorCode.TOPIC_EXISTS: TopicExists,
    ErrorCode.UNKNOWN_PARTITION: UnknownPartition,
    ErrorCode.INVALID_CONFIG: InvalidConfig,
    ErrorCode.OFFSET_OUT_OF_RANGE: OffsetOutOfRange,
    ErrorCode.INVALID_RECORDS: InvalidRecords,
    ErrorCode.CORRUPT_DATA: CorruptData,
    ErrorCode.NOT_DURABLE: NotDurable,
    ErrorCode.TIMEOUT: Timeout,
    ErrorCode.READ_ONLY_LOG: ReadOnlyLog,
    ErrorCode.DISK_FULL: DiskFull,
    ErrorCode.PARTITION_NOT_READY: PartitionNotReady,
    ErrorCode.UNKNOWN_GROUP: UnknownGroup,
    ErrorCode.GROUP_NOT_EMPTY: GroupNotEmpty,
    ErrorCode.REBALANCE_IN_PROGRESS: RebalanceInProgress,
    ErrorCode.UNKNOWN_MEMBER: UnknownMember,
    ErrorCode.ILLEGAL_GENERATION: IllegalGeneration,
    ErrorCode.UNKNOWN_PRODUCER_ID: UnknownProducerId,
    ErrorCode.INVALID_PRODUCER_EPOCH: ProducerFenced,
    ErrorCode.DUPLICATE_SEQUENCE: DuplicateSequence,
    ErrorCode.OUT_OF_ORDER_SEQUENCE: OutOfOrderSequence,
    ErrorCode.SERVER_SHUTTING_DOWN: ServerShuttingDown,
    ErrorCode.INTERNAL: InternalServerError,
    ErrorCode.METADATA_UNAVAILABLE: MetadataUnavailable,
    ErrorCode.QUEUE_SETTINGS_MISMATCH: QueueSettingsMismatch,
    ErrorCode.UNKNOWN_DELIVERY: UnknownDelivery,
    ErrorCode.STALE_DELIVERY: StaleDelivery,
    ErrorCode.DELIVERY_SETTLED: DeliverySettled,
    ErrorCode.UNKNOWN_QUEUE_GROUP: UnknownQueueGroup,
    ErrorCode.UNKNOWN_INBOX: UnknownInbox,
    ErrorCode.PARTLY_DUPLICATE: PartlyDuplicate,
    ErrorCode.KEY_REQUIRED: KeyRequired,
    ErrorCode.AUTHENTICATION_REQUIRED: AuthenticationRequired,
    ErrorCode.AUTHENTICATION_FAILED: AuthenticationFailed,
    ErrorCode.NOT_AUTHORIZED: NotAuthorized,
}
assert set(_CLASSES) == set(ErrorCode) - {ErrorCode.NONE}


def records_error(error: NodiError, what: str) -> NodiClientError:
    """The client error for records the client itself could not build into a batch
    (storage's record checks, before anything is sent): LimitExceeded for one above a
    named limit (record bytes, headers per record...), else InvalidRecords."""
    kind = LimitExceeded if isinstance(error, LimitExceededError) else InvalidRecords
    return kind(f"{what}: {error}")


def error_class(code: ErrorCode) -> type[NodiClientError]:
    return _CLASSES.get(code, NodiClientError)


def error_for(code: int, message: str | None) -> NodiClientError:
    """The exception for an error code a server answered with."""
    try:
        code = ErrorCode(code)
    except ValueError:
        return NodiClientError(f"unknown error code {code}: {message or ''}")
    return error_class(code)(message or code.name.lower().replace("_", " "), code=code)


# Codes after which the same request may be sent again safely by an idempotent sender
# (an idempotent producer's batch, a read): nothing happened, or a retry is deduplicated.
RETRIABLE_CODES = frozenset(
    {
        ErrorCode.NOT_DURABLE,
        ErrorCode.TIMEOUT,
        ErrorCode.TOO_MANY_REQUESTS,
        ErrorCode.SERVER_SHUTTING_DOWN,
        ErrorCode.PARTITION_NOT_READY,
    }
)


def is_retriable(error: BaseException) -> bool:
    """True for a failure an idempotent request may be retried after: a broken
    connection, a client-side timeout, or one of RETRIABLE_CODES. Never a refusal of
    the client's credentials or of the TLS handshake: those would be refused again."""
    if isinstance(error, (AuthenticationFailed, AuthenticationRequired, TlsFailed)):
        return False
    if isinstance(error, ConnectionLost):
        return True
    if isinstance(error, Timeout):
        return True
    return isinstance(error, NodiClientError) and error.code in RETRIABLE_CODES


class DeadLetterWithoutSource(NodiClientError):
    """A dead letter names no source topic (no nodi-dlq-source-topic header), and no
    target was given: it cannot be redriven. Everything before it was."""

    def __init__(self, topic: str, partition: int, offset: int, redriven: int) -> None:
        super().__init__(f"{topic}-{partition} offset {offset} names no source topic")
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.redriven = redriven


class DeadLetterNotWaiting(NodiClientError):
    """A dead letter picked for a redrive or purge is not waiting (handled already, before
    the cursor, or no such entry), or too many would be handled past the cursor. Nothing
    was done."""

    def __init__(self, topic: str, partition: int, offset: int, why: str) -> None:
        where = f"{topic}-{partition} offset {offset}" if partition >= 0 else topic
        super().__init__(f"{where}: {why}")
        self.topic = topic
        self.partition = partition
        self.offset = offset


# Written out so type checkers and IDEs see what `from .errors import *` brings;
# tests/test_client.py checks it names every exception class of this module.
__all__ = [
    "NodiClientError",
    "DeadLetterWithoutSource",
    "DeadLetterNotWaiting",
    "ProtocolViolation",
    "InvalidRequest",
    "LimitExceeded",
    "BufferFull",
    "TooManyRequests",
    "UnknownTopic",
    "TopicExists",
    "UnknownPartition",
    "InvalidConfig",
    "OffsetOutOfRange",
    "InvalidRecords",
    "KeyRequired",
    "CorruptData",
    "NotDurable",
    "Timeout",
    "ReadOnlyLog",
    "DiskFull",
    "PartitionNotReady",
    "GroupError",
    "UnknownGroup",
    "GroupNotEmpty",
    "RebalanceInProgress",
    "UnknownMember",
    "IllegalGeneration",
    "ProducerError",
    "UnknownProducerId",
    "ProducerFenced",
    "DuplicateSequence",
    "OutOfOrderSequence",
    "PartlyDuplicate",
    "QueueError",
    "QueueSettingsMismatch",
    "UnknownDelivery",
    "StaleDelivery",
    "DeliverySettled",
    "UnknownQueueGroup",
    "UnknownInbox",
    "RequestTimeout",
    "ServerShuttingDown",
    "InternalServerError",
    "MetadataUnavailable",
    "ConnectionLost",
    "ConnectFailed",
    "AuthenticationFailed",
    "AuthenticationRequired",
    "TlsFailed",
    "NotAuthorized",
    "ClientClosed",
    "SendFailed",
    "records_error",
    "error_for",
    "error_class",
    "is_retriable",
    "RETRIABLE_CODES",
]
