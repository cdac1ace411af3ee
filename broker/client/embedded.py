"""Embedded nodi: the Client API over a data directory, with no server process.

    import nodi.broker

    with nodi.broker.open("./data") as client:          # a Client
        client.create_topic("jobs")
        client.produce("jobs", b"hello")
        with client.queue("jobs", "workers") as queue:
            message = queue.receive(timeout_ms=1_000)
            message.ack()

    async with nodi.broker.open_async("./data") as client:   # an AsyncClient
        ...

The returned objects are a Client and an AsyncClient (subclasses), so every method,
producer, consumer, queue, request-reply and idempotent helper is the same. Underneath,
AsyncClient's core talks to a LocalConnection instead of a TCP connection: it hands the
request objects to a LocalBroker (broker/server/local.py), which calls the broker's own
dispatch on the client's event loop. Nothing is framed, encoded or decoded; the files
are the server's, so `nodi serve --data-dir` opens a directory written here, and the
reverse.

One process owns a directory at a time (storage/lock.py): another open, in this process
or another, while it is open raises DataDirectoryLockedError naming the owner's PID, and
touches nothing. `nodi serve` on the directory is refused the same way, and the other
way round. To share a directory between processes, run `nodi serve` on it and use Client.

Threads: `open()` runs the broker on the Client's own loop thread (one thread, plus
the fsync flusher of each partition and short-lived threads for blocking storage calls);
close() stops and joins all of them. `open_async()` runs it on the caller's loop; its
blocking storage calls use that loop's default executor (asyncio.run shuts it down).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from nodi.storage.errors import DataDirectoryLockedError

from ..protocol import messages as m
from ..server.config import ServerConfig
from ..server.local import LocalBroker
from .async_client import DEFAULT_TIMEOUT_MS, AsyncClient
from .errors import ClientClosed, ConnectFailed, ConnectionLost
from .sync_client import Client

# Opening recovers the directory (a rescan after a crash), which may take longer than a
# call: open()'s own bound.
OPEN_TIMEOUT_MS = 300_000


class LocalConnection:
    """What AsyncClient's core needs of a connection (client/connection.py), served by a
    LocalBroker in this process: request() returns the broker's response object."""

    def __init__(self, local: LocalBroker, client_id: str) -> None:
        self._local = local
        self._client_id = client_id
        self._closed = False
        limits = local.config.protocol
        self.in_flight_requests_max = limits.in_flight_requests_max
        self.server_limits = limits.announced()
        self.server_id = local.broker.server_id

    @property
    def is_open(self) -> bool:
        return not self._closed and not self._local.closed

    async def request(self, message: m.Request, records: bytes | bytearray | memoryview | None = None) -> m.Response:
        """The response to `message`, whatever its error code; ConnectionLost once the
        client or the broker closed."""
        if not self.is_open:
            raise ConnectionLost("the embedded broker is closed")
        return await self._local.handle(message, records, self._client_id)

    async def close(self) -> None:
        self._closed = True


class EmbeddedAsyncClient(AsyncClient):
    """An AsyncClient over a data directory in this process (see the module docstring).
    The directory is opened by connect() (or `async with`, or the first call) and
    closed, cleanly, by close()."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        config: ServerConfig | None = None,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        open_timeout_ms: int = OPEN_TIMEOUT_MS,
        client_id: str = "nodi-embedded",
    ) -> None:
        super().__init__("localhost", timeout_ms=timeout_ms, client_id=client_id)
        if open_timeout_ms <= 0:
            raise ValueError("open_timeout_ms must be positive")
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        base = config or ServerConfig()
        self.config = dataclasses.replace(base, data_dir=self.data_dir)
        self.open_timeout_ms = open_timeout_ms
        self._local: LocalBroker | None = None

    @property
    def address(self) -> str:
        return f"embedded:{self.data_dir}"

    async def connect(self, timeout_ms: int | None = None) -> None:
        """Open the data directory now (else the first call does), within
        open_timeout_ms (recovery may rescan). DataDirectoryLockedError when another
        process, or another open in this one, holds it."""
        async with self.core.deadline(timeout_ms or self.open_timeout_ms, "open"):
            await self._live_connection()

    async def _connect_loop(self) -> LocalConnection:  # type: ignore[override]
        """Open the directory the first time; after that the broker is either open or
        closed for good (nothing to reconnect to)."""
        if self._local is None:
            self._local = await LocalBroker.open(self.config)
        elif self._local.closed:
            raise ConnectFailed(f"the embedded broker on {self.data_dir} is closed")
        connection = LocalConnection(self._local, self.client_id)
        self._connection = connection  # type: ignore[assignment]
        return connection

    async def close(self) -> None:
        """Close producers, consumers and queues (flushing, committing), then the broker:
        a clean stop that leaves the directory ready for the next open."""
        try:
            await super().close()
        finally:
            local, self._local = self._local, None
            if local is not None:
                await local.close()


class EmbeddedClient(Client):
    """A Client over a data directory in this process (see the module docstring); opens
    it in the constructor. Keyword options: config (a ServerConfig: limits, topic
    defaults, queue settings), timeout_ms, open_timeout_ms, client_id."""

    def __init__(self, data_dir: str | os.PathLike[str], **options: Any) -> None:
        self._data_dir = data_dir
        open_timeout_ms = options.get("open_timeout_ms", OPEN_TIMEOUT_MS)
        super().__init__(None, **options)
        try:
            self._run(self._async.connect(open_timeout_ms), open_timeout_ms)
        except BaseException:
            self._stop_loop()
            raise

    async def _make_client(self, address: str | None, options: dict) -> AsyncClient:
        return EmbeddedAsyncClient(self._data_dir, **options)

    def __enter__(self) -> EmbeddedClient:
        return self


def open(data_dir: str | os.PathLike[str], **options: Any) -> EmbeddedClient:  # noqa: A001 - nodi.broker.open
    """A blocking Client over `data_dir` in this process, opened (created when missing,
    recovered after a crash). Use as a context manager, or call close(). Options:
    config (ServerConfig), timeout_ms, open_timeout_ms, client_id.
    DataDirectoryLockedError when another process (or another open here) holds it."""
    return EmbeddedClient(data_dir, **options)


def open_async(data_dir: str | os.PathLike[str], **options: Any) -> EmbeddedAsyncClient:
    """An AsyncClient over `data_dir`, run on the caller's event loop: `async with
    nodi.broker.open_async(dir) as client` (entering opens the directory). Options as
    open()'s."""
    return EmbeddedAsyncClient(data_dir, **options)


__all__ = [
    "ClientClosed",
    "DataDirectoryLockedError",
    "EmbeddedAsyncClient",
    "EmbeddedClient",
    "LocalConnection",
    "open",
    "open_async",
]
