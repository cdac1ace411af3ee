"""nodi.broker: the server, its wire protocol and the Python client.

    from nodi.broker import Client, AsyncClient

The client's names are loaded on first use (nodi.broker.client), so importing the server
or the protocol does not import the client, and the other way round.
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
        "Backoff",
        "Client",
        "Consumer",
        "Message",
        "NodiClientError",
        "Producer",
        "Queue",
        "QueueDescription",
        "QueueMessage",
        "QueueSummary",
        "TopicDescription",
        "TopicSettings",
        "GroupDescription",
        "UNLIMITED",
    }
)

# The idempotent-consumer helper (nodi.broker.idempotent), also loaded on first use.
_IDEMPOTENT_NAMES = frozenset({"AsyncIdempotentConsumer", "IdempotentConsumer", "KeyStore", "LmdbKeyStore"})

if TYPE_CHECKING:  # pragma: no cover
    from .client import (  # noqa: F401
        UNLIMITED,
        AsyncClient,
        AsyncConsumer,
        AsyncProducer,
        AsyncQueue,
        Backoff,
        Client,
        Consumer,
        GroupDescription,
        Message,
        NodiClientError,
        Producer,
        Queue,
        QueueDescription,
        QueueMessage,
        QueueSummary,
        TopicDescription,
        TopicSettings,
    )


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        return getattr(importlib.import_module(".client", __name__), name)
    if name in _IDEMPOTENT_NAMES:
        return getattr(importlib.import_module(".idempotent", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _CLIENT_NAMES | _IDEMPOTENT_NAMES)


__all__ = sorted(_CLIENT_NAMES | _IDEMPOTENT_NAMES)
