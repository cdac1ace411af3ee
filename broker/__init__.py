"""nodi.broker: the server, its wire protocol and the Python client, as three packages:

    nodi.broker.protocol   the wire protocol both sides share (sans-IO)
    nodi.broker.server     the asyncio server and its services
    nodi.broker.client     the Python client

Users import from here:

    from nodi.broker import Client, AsyncClient, TopicExists

Every name a client user needs is exported: the clients, producers, consumers, queues,
message and description types, and every exception the client raises. They are loaded on
first use (from nodi.broker.client), so importing the server or the protocol does not
import the client, and the other way round.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_CLIENT_NAMES = frozenset(
    {
        "AsyncClient",
        "AsyncConsumer",
        "AsyncProducer",
        "AsyncQueue",
        "AuthenticationFailed",
        "AuthenticationRequired",
        "Backoff",
        "BufferFull",
        "Client",
        "ClientClosed",
        "client_tls_context",
        "ConnectFailed",
        "ConnectionLost",
        "Consumer",
        "CorruptData",
        "DeadLetterNotWaiting",
        "DeadLetterWithoutSource",
        "DeliverySettled",
        "DiskFull",
        "DuplicateSequence",
        "GroupDescription",
        "GroupHandovers",
        "GroupError",
        "GroupMemberDescription",
        "GroupNotEmpty",
        "GroupSummary",
        "IllegalGeneration",
        "InternalServerError",
        "InvalidConfig",
        "InvalidRecords",
        "InvalidRequest",
        "KeyRequired",
        "LimitExceeded",
        "Message",
        "MetadataUnavailable",
        "NodiClientError",
        "NotAuthorized",
        "NotDurable",
        "OffsetOutOfRange",
        "OutOfOrderSequence",
        "PartitionDescription",
        "PartitionLag",
        "PartitionNotReady",
        "PartlyDuplicate",
        "Producer",
        "ProducerError",
        "ProducerFenced",
        "ProtocolViolation",
        "Queue",
        "QueueDescription",
        "QueueError",
        "QueueMessage",
        "QueueSettingsMismatch",
        "QueueSummary",
        "ReadOnlyLog",
        "RebalanceInProgress",
        "RequestTimeout",
        "SendFailed",
        "ServerShuttingDown",
        "StaleDelivery",
        "Timeout",
        "TlsFailed",
        "TooManyRequests",
        "TopicDescription",
        "TopicExists",
        "TopicSettings",
        "TopicSummary",
        "UNLIMITED",
        "UnknownDelivery",
        "UnknownGroup",
        "UnknownInbox",
        "UnknownMember",
        "UnknownPartition",
        "UnknownProducerId",
        "UnknownQueueGroup",
        "UnknownTopic",
        "partition_for_key",
    }
)

# Embedded mode (nodi.broker.client.embedded): open(data_dir) / open_async(data_dir), and
# the error a directory another process holds raises; also loaded on first use.
_EMBEDDED_NAMES = frozenset({"open", "open_async", "DataDirectoryLockedError"})

# The idempotent-consumer helper (nodi.broker.client.idempotent), also loaded on first use.
_IDEMPOTENT_NAMES = frozenset({"AsyncIdempotentConsumer", "IdempotentConsumer", "KeyStore", "LmdbKeyStore"})

if TYPE_CHECKING:  # pragma: no cover
    from .client import (  # noqa: F401
        UNLIMITED,
        AsyncClient,
        AsyncConsumer,
        AsyncProducer,
        AsyncQueue,
        AuthenticationFailed,
        AuthenticationRequired,
        Backoff,
        BufferFull,
        Client,
        ClientClosed,
        ConnectFailed,
        ConnectionLost,
        Consumer,
        CorruptData,
        DeadLetterNotWaiting,
        DeadLetterWithoutSource,
        DeliverySettled,
        DiskFull,
        DuplicateSequence,
        GroupDescription,
        GroupError,
        GroupHandovers,
        GroupMemberDescription,
        GroupNotEmpty,
        GroupSummary,
        IllegalGeneration,
        InternalServerError,
        InvalidConfig,
        InvalidRecords,
        InvalidRequest,
        KeyRequired,
        LimitExceeded,
        Message,
        MetadataUnavailable,
        NodiClientError,
        NotAuthorized,
        NotDurable,
        OffsetOutOfRange,
        OutOfOrderSequence,
        PartitionDescription,
        PartitionLag,
        PartitionNotReady,
        PartlyDuplicate,
        Producer,
        ProducerError,
        ProducerFenced,
        ProtocolViolation,
        Queue,
        QueueDescription,
        QueueError,
        QueueMessage,
        QueueSettingsMismatch,
        QueueSummary,
        ReadOnlyLog,
        RebalanceInProgress,
        RequestTimeout,
        SendFailed,
        ServerShuttingDown,
        StaleDelivery,
        Timeout,
        TlsFailed,
        TooManyRequests,
        TopicDescription,
        TopicExists,
        TopicSettings,
        TopicSummary,
        UnknownDelivery,
        UnknownGroup,
        UnknownInbox,
        UnknownMember,
        UnknownPartition,
        UnknownProducerId,
        UnknownQueueGroup,
        UnknownTopic,
        client_tls_context,
        partition_for_key,
    )
    from .client.embedded import DataDirectoryLockedError, open, open_async  # noqa: F401, A004
    from .client.idempotent import (  # noqa: F401
        AsyncIdempotentConsumer,
        IdempotentConsumer,
        KeyStore,
        LmdbKeyStore,
    )


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        return getattr(importlib.import_module(".client", __name__), name)
    if name in _IDEMPOTENT_NAMES:
        return getattr(importlib.import_module(".client.idempotent", __name__), name)
    if name in _EMBEDDED_NAMES:
        return getattr(importlib.import_module(".client.embedded", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _CLIENT_NAMES | _IDEMPOTENT_NAMES | _EMBEDDED_NAMES)


# `open` stays out of `from nodi.broker import *`: it would hide the builtin open.
__all__ = sorted(_CLIENT_NAMES | _IDEMPOTENT_NAMES | (_EMBEDDED_NAMES - {"open"}))
