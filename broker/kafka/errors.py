"""Kafka's error codes that the listener answers with, and the decoder's own error.

The numbers are Kafka's (org.apache.kafka.common.protocol.Errors); a client maps each to
its own exception and retry rule, so the code says who must act: UNSUPPORTED_VERSION
makes a client fall back, NOT_COORDINATOR makes it look the coordinator up again.
"""

from __future__ import annotations

from enum import IntEnum

from ..protocol.errors import ErrorCode


class KafkaError(IntEnum):
    UNKNOWN_SERVER_ERROR = -1
    NONE = 0
    OFFSET_OUT_OF_RANGE = 1
    CORRUPT_MESSAGE = 2
    UNKNOWN_TOPIC_OR_PARTITION = 3
    LEADER_NOT_AVAILABLE = 5
    MESSAGE_TOO_LARGE = 10
    REQUEST_TIMED_OUT = 7
    COORDINATOR_LOAD_IN_PROGRESS = 14
    COORDINATOR_NOT_AVAILABLE = 15
    NOT_COORDINATOR = 16
    INVALID_TOPIC_EXCEPTION = 17
    RECORD_LIST_TOO_LARGE = 18
    NOT_ENOUGH_REPLICAS_AFTER_APPEND = 20
    ILLEGAL_GENERATION = 22
    INCONSISTENT_GROUP_PROTOCOL = 23
    INVALID_GROUP_ID = 24
    UNKNOWN_MEMBER_ID = 25
    INVALID_SESSION_TIMEOUT = 26
    REBALANCE_IN_PROGRESS = 27
    UNSUPPORTED_VERSION = 35
    TOPIC_ALREADY_EXISTS = 36
    INVALID_PARTITIONS = 37
    INVALID_REPLICATION_FACTOR = 38
    INVALID_CONFIG = 40
    INVALID_REQUEST = 42
    POLICY_VIOLATION = 44
    OUT_OF_ORDER_SEQUENCE_NUMBER = 45
    DUPLICATE_SEQUENCE_NUMBER = 46
    INVALID_PRODUCER_EPOCH = 47
    KAFKA_STORAGE_ERROR = 56
    GROUP_ID_NOT_FOUND = 69
    UNSUPPORTED_COMPRESSION_TYPE = 76
    INVALID_RECORD = 87
    TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53
    TOPIC_AUTHORIZATION_FAILED = 29
    GROUP_AUTHORIZATION_FAILED = 30
    CLUSTER_AUTHORIZATION_FAILED = 31
    UNSUPPORTED_SASL_MECHANISM = 33
    ILLEGAL_SASL_STATE = 34
    SASL_AUTHENTICATION_FAILED = 58


class KafkaDecodeError(Exception):
    """A request that cannot be read: the connection that sent it is closed (its byte
    stream can no longer be trusted), with a log line; the broker carries on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# nodi's response codes as Kafka's, for what the broker services answer.
_ERRORS: dict[ErrorCode, KafkaError] = {
    ErrorCode.NONE: KafkaError.NONE,
    ErrorCode.UNKNOWN_TOPIC: KafkaError.UNKNOWN_TOPIC_OR_PARTITION,
    ErrorCode.UNKNOWN_PARTITION: KafkaError.UNKNOWN_TOPIC_OR_PARTITION,
    ErrorCode.TOPIC_EXISTS: KafkaError.TOPIC_ALREADY_EXISTS,
    ErrorCode.INVALID_CONFIG: KafkaError.INVALID_CONFIG,
    ErrorCode.OFFSET_OUT_OF_RANGE: KafkaError.OFFSET_OUT_OF_RANGE,
    ErrorCode.INVALID_RECORDS: KafkaError.CORRUPT_MESSAGE,
    ErrorCode.CORRUPT_DATA: KafkaError.KAFKA_STORAGE_ERROR,
    ErrorCode.NOT_DURABLE: KafkaError.REQUEST_TIMED_OUT,
    ErrorCode.TIMEOUT: KafkaError.REQUEST_TIMED_OUT,
    ErrorCode.READ_ONLY_LOG: KafkaError.KAFKA_STORAGE_ERROR,
    ErrorCode.DISK_FULL: KafkaError.KAFKA_STORAGE_ERROR,
    # Retriable in Kafka's clients: they wait and send again.
    ErrorCode.PARTITION_NOT_READY: KafkaError.LEADER_NOT_AVAILABLE,
    ErrorCode.LIMIT_EXCEEDED: KafkaError.RECORD_LIST_TOO_LARGE,
    ErrorCode.INVALID_PRODUCER_EPOCH: KafkaError.INVALID_PRODUCER_EPOCH,
    ErrorCode.OUT_OF_ORDER_SEQUENCE: KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    ErrorCode.DUPLICATE_SEQUENCE: KafkaError.DUPLICATE_SEQUENCE_NUMBER,
    ErrorCode.UNKNOWN_MEMBER: KafkaError.UNKNOWN_MEMBER_ID,
    ErrorCode.ILLEGAL_GENERATION: KafkaError.ILLEGAL_GENERATION,
    ErrorCode.REBALANCE_IN_PROGRESS: KafkaError.REBALANCE_IN_PROGRESS,
    ErrorCode.INVALID_REQUEST: KafkaError.INVALID_REQUEST,
    ErrorCode.KEY_REQUIRED: KafkaError.INVALID_RECORD,
    ErrorCode.SERVER_SHUTTING_DOWN: KafkaError.KAFKA_STORAGE_ERROR,
    ErrorCode.METADATA_UNAVAILABLE: KafkaError.COORDINATOR_NOT_AVAILABLE,
}


def kafka_error(code: ErrorCode, message: str | None = None) -> KafkaError:
    if code == ErrorCode.INVALID_RECORDS and message and "compression" in message:
        return KafkaError.UNSUPPORTED_COMPRESSION_TYPE  # a codec nodi cannot read (yet)
    return _ERRORS.get(code, KafkaError.UNKNOWN_SERVER_ERROR)
