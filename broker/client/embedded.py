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

Several processes on one directory: the first to open it owns it (its lock,
storage/lock.py) and serves the other processes that open it over a Unix socket in the
directory (DATA_DIR/nodi.sock, broker/server/local.py). A later open() finds the lock
taken and the socket there, and attaches: its client talks the wire protocol to the
owner, exactly as a Client talks to `nodi serve`. When the owner closes (or dies), an
attached client's next call opens the directory again: it becomes the owner if the lock
is free, else it attaches to whoever took it (requests in flight at that moment fail
with ConnectionLost, as when a server restarts). A holder that offers no socket (`nodi
serve`, an offline tool, an owner opened with attach=False, a path too long for a
socket) makes open() raise DataDirectoryLockedError naming its PID, having touched
nothing; so does open(attach=False) whenever another process holds the directory. A
second open() in the same process attaches like another process's (sharing the one
client between threads is cheaper).

Threads: `open()` runs the broker on the Client's own loop thread (one thread, plus
the fsync flusher of each partition and short-lived threads for blocking storage calls);
close() stops and joins all of them. `open_async()` runs it on the caller's loop; its
blocking storage calls use that loop's default executor (asyncio.run shuts it down).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

from nodi.storage.errors import DataDirectoryLockedError

from ..protocol import messages as m
from ..server.clock import SYSTEM_CLOCK, Clock
from ..server.config import ServerConfig
from ..server.local import LocalBroker, attach_socket_path
from .async_client import DEFAULT_TIMEOUT_MS, AsyncClient
from .connection import ClientConnection
from .errors import ClientClosed, ConnectFailed, ConnectionLost
from .sync_client import Client
from .types import backoff_s

# Opening recovers the directory (a rescan after a crash), which may take longer than a
# call: open()'s own bound.
OPEN_TIMEOUT_MS = 300_000
# Between attempts to own or attach (the owner is closing, or its socket is stale):
# backoff from this, doubling up to the max, with jitter.
ATTACH_BACKOFF_MS = 20
ATTACH_BACKOFF_MAX_MS = 500
# A socket file nobody answers on while the lock stays taken: an owner closing (it stops
# listening, then removes the file, then lets the lock go), or a stale file a killed
# owner left under a holder that offers no socket (`nodi serve` took the directory
# over). After this long it is taken for the latter, and open() is refused.
STALE_SOCKET_WAIT_MS = 15_000


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
        attach: bool = True,
        client_id: str = "nodi-embedded",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        base = config or ServerConfig()
        super().__init__("localhost", timeout_ms=timeout_ms, client_id=client_id, limits=base.protocol)
        if open_timeout_ms <= 0:
            raise ValueError("open_timeout_ms must be positive")
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.config = dataclasses.replace(base, data_dir=self.data_dir)
        self.open_timeout_ms = open_timeout_ms
        self.attach = attach
        # The owned broker's deadlines read this clock (broker/server/clock.py); a client
        # that attaches to another owner uses that owner's.
        self.clock = clock
        self._local: LocalBroker | None = None

    @property
    def address(self) -> str:
        return f"embedded:{self.data_dir}"

    async def connect(self, timeout_ms: int | None = None) -> None:
        """Open the data directory now (else the first call does), within
        open_timeout_ms (recovery may rescan): own it, or attach to its owner.
        DataDirectoryLockedError when its holder offers no attach socket, or with
        attach=False when anyone holds it."""
        async with self.core.deadline(timeout_ms or self.open_timeout_ms, "open"):
            await self._live_connection()

    @property
    def owner(self) -> bool:
        """True while this client owns the directory (runs the broker), False while it
        is attached to another process that does."""
        return self._local is not None and not self._local.closed

    async def _connect_loop(self) -> LocalConnection | ClientConnection:  # type: ignore[override]
        """Own the directory, or attach to the process that owns it (see the module
        docstring); again after the owner went away. Callers bound the time."""
        local = self._local
        if local is not None:
            if local.closed:  # failed (a bug in a job, logged): nothing to reconnect to
                raise ConnectFailed(f"the embedded broker on {self.data_dir} is closed")
            return self._adopt(LocalConnection(local, self.client_id))
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        attempt = 0
        unanswered_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._local = await LocalBroker.open(self.config, attach=self.attach, clock=self.clock)
                return self._adopt(LocalConnection(self._local, self.client_id))
            except DataDirectoryLockedError as refused:
                holder = refused
                if not self.attach:
                    raise
            path = attach_socket_path(self.data_dir)
            if not os.path.exists(path) or not os.access(path, os.R_OK | os.W_OK):
                # No embedded owner (or another user's, mode 0600): name the holder.
                raise DataDirectoryLockedError(holder.data_dir, holder.holder_pid) from None
            try:
                connection = await ClientConnection.open_unix(path, client_id=self.client_id, limits=self.limits)
                return self._adopt(connection)
            except ConnectFailed:  # an owner closing, or a stale file: see STALE_SOCKET_WAIT_MS
                if unanswered_since is None:
                    unanswered_since = loop.time()
                elif loop.time() - unanswered_since > STALE_SOCKET_WAIT_MS / 1000:
                    raise DataDirectoryLockedError(holder.data_dir, holder.holder_pid) from None
            attempt += 1
            await asyncio.sleep(backoff_s(attempt - 1, ATTACH_BACKOFF_MS, ATTACH_BACKOFF_MAX_MS))

    def _adopt(self, connection: LocalConnection | ClientConnection) -> LocalConnection | ClientConnection:
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
    defaults, queue settings), timeout_ms, open_timeout_ms, attach, client_id."""

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

    @property
    def owner(self) -> bool:
        """True while this process owns the directory, False while attached to the owner."""
        return self._async.owner  # type: ignore[attr-defined]


def open(data_dir: str | os.PathLike[str], **options: Any) -> EmbeddedClient:  # noqa: A001 - nodi.broker.open
    """A blocking Client over `data_dir`, opened: owned by this process (created when
    missing, recovered after a crash), or attached to the process that owns it. Use as
    a context manager, or call close(). Options: config (ServerConfig), timeout_ms,
    open_timeout_ms, attach (False: refuse rather than attach), client_id, clock (the
    owned broker's time, broker/server/clock.py: tests pass a ManualClock).
    DataDirectoryLockedError, naming the holder's PID, when the holder offers no attach
    socket (`nodi serve`, a tool), with attach=False, or on a second open here."""
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
