"""The Python client of a nodi server: `Client` (blocking) and `AsyncClient` (asyncio),
with the same surface; their producers, consumers, message and description types, and
the exceptions they raise.

    from nodi.broker import Client

    with Client() as client:                       # NODI_SERVER or 127.0.0.1:6634
        client.create_topic("orders", partitions=3)
        client.produce("orders", b"hello", key="customer-1")
        with client.consumer("orders", group="billing") as consumer:
            for message in consumer:
                print(message.partition, message.offset, message.value)

The pieces: client_async.py (AsyncClient), client_sync.py (Client), client_connection.py
(one connection around the sans-IO protocol), producer.py, consumer.py,
client_types.py (Message and descriptions), client_errors.py (exceptions).
"""

from __future__ import annotations

from .client_async import AsyncClient
from .client_errors import *  # noqa: F403 - every exception class is public
from .client_errors import __all__ as _error_names
from .client_sync import Client
from .client_types import (
    UNLIMITED,
    GroupDescription,
    GroupMemberDescription,
    GroupSummary,
    Message,
    PartitionDescription,
    PartitionLag,
    TopicDescription,
    TopicSettings,
    TopicSummary,
    partition_for_key,
)
from .consumer import AsyncConsumer, Consumer
from .producer import AsyncProducer, Producer
from .queue_client import AsyncQueue, Queue, QueueDescription, QueueMessage, QueueSummary
from .queue_settings import Backoff

__all__ = [
    "AsyncClient",
    "AsyncConsumer",
    "AsyncProducer",
    "AsyncQueue",
    "Backoff",
    "Client",
    "Consumer",
    "GroupDescription",
    "GroupMemberDescription",
    "GroupSummary",
    "Message",
    "PartitionDescription",
    "PartitionLag",
    "Producer",
    "Queue",
    "QueueDescription",
    "QueueMessage",
    "QueueSummary",
    "TopicDescription",
    "TopicSettings",
    "TopicSummary",
    "UNLIMITED",
    "partition_for_key",
    *_error_names,
]
