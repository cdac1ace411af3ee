"""The console's way into the broker: a Client whose connection hands each request to
the broker's own dispatch on the broker's event loop, acting as one principal.

The console's pages run on worker threads with a blocking Client (the same calls, and
the same code, as the `nodi` commands). Its connection is not a socket: request() sends
the request object to the broker's loop (run_coroutine_threadsafe), where it is checked
with `Security.check(principal, request)` (the one permission check of nodi's protocol:
the same table, the same NOT_AUTHORIZED answer, log line and refusal metric) and then
served by `Broker.handle`, as ClientSession._serve serves a request that came over TCP.
So the console needs no credentials of its own, no TLS to itself, and a page shows or
does nothing its user could not do with `nodi` and their own password.

One ConsoleClient per principal (ConsoleClients keeps at most `clients_max`, closing the
least recently used): a client's requests carry no principal of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ..client.async_client import AsyncClient
from ..client.errors import ConnectionLost
from ..client.sync_client import Client
from ..protocol import messages as m
from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.schema import schema_of
from ..server.reply import RECORDS_FIELD, error_reply, response_with_buffers
from ..server.users import Principal

if TYPE_CHECKING:
    from ..server.server import Server

log = logging.getLogger("nodi.console")

# A console client's timeout for each call.
CLIENT_TIMEOUT_MS = 30_000


class ConsoleGateway:
    """The broker side of every console connection: serves requests on the broker's
    loop for a principal, and keeps the tasks in flight so stop() can wait for them."""

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self._requests: set[asyncio.Task] = set()
        self.closed = False

    async def _serve(self, principal: Principal, request: m.Request) -> m.Response:
        server = self.server
        started = time.perf_counter()
        if self.closed or server.shutting_down:
            error = ProtocolError(ErrorCode.SERVER_SHUTTING_DOWN, "the broker is stopping", closes_connection=False)
            return error_reply(request, error).response
        refusal = server.refusal(principal, request, started)
        if refusal is not None:
            return refusal.response
        assert server.broker is not None  # the console starts after the broker
        reply = await server.broker.handle(request, "nodi-console")
        server.observe(request, reply, time.perf_counter() - started)
        response = response_with_buffers(reply)
        if reply.slices:
            try:
                data = await asyncio.to_thread(lambda: b"".join(piece.read() for piece in reply.slices))
            except Exception as error:  # a SegmentReadError: nothing of it is served
                return error_reply(request, error).response
            fields: dict[str, Any] = {RECORDS_FIELD: data}
            response = dataclasses.replace(response, **fields)
        if isinstance(response, m.ServerStatusResponse) and not principal.superuser:
            response = dataclasses.replace(response, data_dir="")  # where the files are: for superusers
        return response

    async def serve(self, principal: Principal, request: m.Request) -> m.Response:
        """On the broker's loop: the response to `request`, whatever its error code.
        Shielded: a console client that gives up does not cancel the handler half way."""
        task = self.loop.create_task(self._serve(principal, request))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        return await asyncio.shield(task)

    async def stop(self, grace_ms: int) -> None:
        """Refuse new requests; wait up to `grace_ms` for those in flight, then cancel them."""
        self.closed = True
        requests = list(self._requests)
        if requests:
            _done, running = await asyncio.wait(requests, timeout=grace_ms / 1000)
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)


class ConsoleConnection:
    """What AsyncClient's core needs of a connection (client/connection.py), served by
    the gateway on the broker's loop as `principal`."""

    def __init__(self, gateway: ConsoleGateway, principal: Principal) -> None:
        self._gateway = gateway
        self._principal = principal
        self._closed = False
        limits = gateway.server.config.protocol
        self.in_flight_requests_max = limits.in_flight_requests_max
        self.server_limits = limits.announced()
        self.server_id = gateway.server.broker.server_id if gateway.server.broker is not None else ""

    @property
    def is_open(self) -> bool:
        return not self._closed and not self._gateway.closed

    async def request(self, message: m.Request, records: bytes | bytearray | memoryview | None = None) -> m.Response:
        if not self.is_open:
            raise ConnectionLost("the console is stopping")
        if records is not None:
            if not schema_of(type(message)).has_records:
                raise ProtocolError(ErrorCode.INVALID_REQUEST, f"a {type(message).__name__} has no records field")
            fields: dict[str, Any] = {RECORDS_FIELD: bytes(records)}
            message = dataclasses.replace(message, **fields)
        future = asyncio.run_coroutine_threadsafe(self._gateway.serve(self._principal, message), self._gateway.loop)
        try:
            return await asyncio.wrap_future(future)
        except concurrent.futures.CancelledError:
            raise ConnectionLost("the console is stopping") from None

    async def close(self) -> None:
        self._closed = True


class ConsoleAsyncClient(AsyncClient):
    def __init__(self, gateway: ConsoleGateway, principal: Principal) -> None:
        super().__init__("localhost", timeout_ms=CLIENT_TIMEOUT_MS, client_id="nodi-console", tls=False)
        self._gateway = gateway
        self._principal = principal

    @property
    def address(self) -> str:
        return f"console:{self._principal.name}"

    async def _connect_loop(self) -> ConsoleConnection:  # type: ignore[override]
        if self._gateway.closed:
            raise ConnectionLost("the console is stopping")
        connection = ConsoleConnection(self._gateway, self._principal)
        self._connection = connection  # type: ignore[assignment]
        return connection


class ConsoleClient(Client):
    """A blocking Client acting as `principal` through the gateway."""

    def __init__(self, gateway: ConsoleGateway, principal: Principal) -> None:
        self._gateway = gateway
        self._principal = principal
        super().__init__(None)

    async def _make_client(self, address: str | None, options: dict[str, Any]) -> AsyncClient:
        return ConsoleAsyncClient(self._gateway, self._principal)


class ConsoleClients:
    """At most `clients_max` ConsoleClients, one per principal (by name and rules: a
    SIGHUP that changes a user's permissions gets a new client); the least recently used
    is closed to make room. Used from the console's worker threads."""

    def __init__(self, gateway: ConsoleGateway, clients_max: int) -> None:
        assert clients_max >= 1
        self._gateway = gateway
        self._clients_max = clients_max
        self._clients: OrderedDict[str, tuple[Principal, ConsoleClient]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, principal: Principal) -> ConsoleClient:
        closing: list[ConsoleClient] = []
        with self._lock:
            found = self._clients.get(principal.name)
            if found is not None and found[0] != principal:  # its permissions changed (SIGHUP)
                closing.append(found[1])
                found = None
            if found is None:
                found = (principal, ConsoleClient(self._gateway, principal))
                self._clients[principal.name] = found
            self._clients.move_to_end(principal.name)
            while len(self._clients) > self._clients_max:
                closing.append(self._clients.popitem(last=False)[1][1])
        for old in closing:
            old.close()  # a page still using it fails with ClientClosed and says so
        return found[1]

    def close(self) -> None:
        with self._lock:
            clients, self._clients = [client for _, client in self._clients.values()], OrderedDict()
        for client in clients:
            client.close()
