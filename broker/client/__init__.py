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

The pieces, in this package: async_client.py (AsyncClient), sync_client.py (Client),
core.py (the internal interface between a client and its parts below), connection.py
(one connection around the sans-IO protocol connection), producer.py with
accumulator.py (batching) and sender.py (sending), consumer.py, queue.py (queue groups),
request.py (request-reply), idempotent.py (the idempotent consumer), types.py (Message
and descriptions), errors.py (exceptions).
"""

from __future__ import annotations

from ..protocol.queue_settings import Backoff
from .async_client import AsyncClient
from .consumer import AsyncConsumer, Consumer
from .errors import *  # noqa: F403 - every exception class is public
from .errors import __all__ as _error_names
from .producer import AsyncProducer, Producer
from .queue import AsyncQueue, Queue, QueueDescription, QueueMessage, QueueSummary
from .sync_client import Client
from .tls import client_tls_context
from .types import (
    UNLIMITED,
    GroupDescription,
    GroupHandovers,
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

__all__ = [
    "AsyncClient",
    "AsyncConsumer",
    "AsyncProducer",
    "AsyncQueue",
    "Backoff",
    "Client",
    "Consumer",
    "GroupDescription",
    "GroupHandovers",
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
    "client_tls_context",
    "partition_for_key",
    *_error_names,
]
