"""The web console (docs/console.md): server-rendered pages served by the broker on its
own port, on the broker's event loop.

The pages read and write through one blocking Client connected to the broker's own
client port, on a small pool of console worker threads: the same requests, checks and
code as the `nodi` commands (a group reset is Client.reset_group, a redrive is
dead_letters.redrive), never a second path into the broker's state.

Every write is a POST that shows a confirmation first, carries the console's form token
(a page of another site cannot post one), asks `permissions` (the one hook for the
security layer: today every loopback peer may), and is logged with who and what.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ..client.errors import (
    ConnectFailed,
    ConnectionLost,
    GroupNotEmpty,
    InvalidRequest,
    NodiClientError,
    OffsetOutOfRange,
    Timeout,
    UnknownGroup,
    UnknownPartition,
    UnknownQueueGroup,
    UnknownTopic,
)
from ..client.sync_client import Client
from . import pages
from .http import DEFAULT_CONSOLE_LIMITS, ConsoleLimits, HttpServer, Request, Response, plain_response
from .render import Markup, escape, layout

log = logging.getLogger("nodi.console")

# The overview's rate charts: a sample every RATE_SAMPLE_INTERVAL_S, the last RATE_SAMPLES_MAX kept.
RATE_SAMPLE_INTERVAL_S = 5.0
RATE_SAMPLES_MAX = 60
# The console's own client's timeout for each call.
CLIENT_TIMEOUT_MS = 30_000
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class ConsolePermissions(Protocol):
    """The permission hook: None lets `peer` do `action` on `target`, a text refuses it
    (shown to the user and logged). The security layer replaces AllowLoopback."""

    def refusal(self, action: str, target: str, peer: str) -> str | None: ...


class AllowLoopback:
    """Until the broker has users and permissions: whoever reaches the console may
    write (the console listens on loopback unless an operator says otherwise)."""

    def refusal(self, action: str, target: str, peer: str) -> str | None:
        return None


_ERROR_STATUS: tuple[tuple[type[NodiClientError], int], ...] = (
    (UnknownTopic, 404),
    (UnknownPartition, 404),
    (UnknownGroup, 404),
    (UnknownQueueGroup, 404),
    (GroupNotEmpty, 409),
    (OffsetOutOfRange, 400),
    (InvalidRequest, 400),
    (ConnectFailed, 503),
    (ConnectionLost, 503),
    (Timeout, 503),
)


def _status_of(error: NodiClientError) -> int:
    for kind, status in _ERROR_STATUS:
        if isinstance(error, kind):
            return status
    return 500 if error.code is None else 400


class Console:
    """The console of one broker: its HTTP server, client, workers and rate samples."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limits: ConsoleLimits = DEFAULT_CONSOLE_LIMITS,
        permissions: ConsolePermissions | None = None,
    ) -> None:
        self.http = HttpServer(host, port, self.handle, limits)
        self.limits = limits
        self.permissions: ConsolePermissions = permissions or AllowLoopback()
        self.token = secrets.token_urlsafe(24)
        self._client: Client | None = None
        self._broker_address = ""
        self._workers = concurrent.futures.ThreadPoolExecutor(limits.pages_in_progress_max, "nodi-console")
        self._pages = asyncio.Semaphore(limits.pages_in_progress_max)
        self._samples: deque[tuple[float, dict[str, int]]] = deque(maxlen=RATE_SAMPLES_MAX + 1)
        self._routes: dict[tuple[str, str], Callable[[Client, Request], pages.Page]] = {
            ("GET", "/"): lambda client, request: pages.overview(client, request, self.rates()),
            ("GET", "/topic"): pages.topic,
            ("GET", "/messages"): pages.messages,
            ("GET", "/groups"): pages.groups,
            ("GET", "/group"): lambda client, request: pages.group(client, request, self.token),
            ("GET", "/queues"): pages.queues,
            ("GET", "/queue"): pages.queue,
            ("GET", "/dead-letters"): pages.dead_letter_list,
            ("GET", "/dead-letter"): lambda client, request: pages.dead_letter(client, request, self.token),
            ("POST", "/group/reset"): lambda client, request: self._write(client, request, pages.group_reset),
            ("POST", "/dead-letter/redrive"): lambda client, request: self._write(
                client, request, lambda c, r: pages.dead_letter_write(c, r, "redrive")
            ),
            ("POST", "/dead-letter/purge"): lambda client, request: self._write(
                client, request, lambda c, r: pages.dead_letter_write(c, r, "purge")
            ),
        }

    @property
    def port(self) -> int:
        return self.http.port

    def bind(self) -> None:
        self.http.bind()

    async def start(self, tasks: asyncio.TaskGroup, broker_address: tuple[str, int]) -> None:
        host, port = broker_address[:2]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        self._broker_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        await self.http.start(tasks)
        tasks.create_task(self._sample_rates())

    async def stop(self) -> None:
        self.http.close()
        client, self._client = self._client, None
        loop = asyncio.get_running_loop()
        if client is not None:
            await loop.run_in_executor(self._workers, client.close)
        self._workers.shutdown(wait=False, cancel_futures=True)

    # -- requests ---------------------------------------------------------------------------

    def client(self) -> Client:
        """The console's client (on a worker thread): connected on first use."""
        if self._client is None:
            self._client = Client(self._broker_address, client_id="nodi-console", timeout_ms=CLIENT_TIMEOUT_MS)
        return self._client

    async def handle(self, request: Request) -> Response:
        refusal = self._check_origin(request)
        if refusal is not None:
            return refusal
        route = self._routes.get((request.method, request.path))
        if route is None:
            if any(path == request.path for _, path in self._routes):
                return plain_response(405, f"{request.method} not allowed on {request.path}")
            return self._error_page(404, f"no page {request.path}")
        if request.method == "POST" and not secrets.compare_digest(request.param("token"), self.token):
            return self._error_page(403, "this form is stale or from elsewhere: reload the page and try again")
        try:
            async with asyncio.timeout(self.limits.page_timeout_ms / 1000):
                async with self._pages:
                    loop = asyncio.get_running_loop()
                    page = await loop.run_in_executor(self._workers, self._build, route, request)
        except TimeoutError:
            return self._error_page(503, "the page took too long; try again")
        except pages.PageError as error:
            return self._error_page(error.status, error.message)
        except NodiClientError as error:
            return self._error_page(_status_of(error), str(error))
        return Response(200, layout(page.title, page.body))

    def _build(self, route: Callable[[Client, Request], pages.Page], request: Request) -> pages.Page:
        return route(self.client(), request)

    def _check_origin(self, request: Request) -> Response | None:
        """On loopback, a Host that is not a loopback name is refused (a page of another
        site that rebinds its name to 127.0.0.1 gets nothing); a POST whose Origin is
        another site's is refused."""
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.http.host in LOOPBACK_NAMES and name not in LOOPBACK_NAMES:
            return plain_response(421, f"the console answers loopback names only, not host {host!r}")
        origin = request.headers.get("origin")
        if request.method == "POST" and origin not in (None, "null") and origin.split("://", 1)[-1] != host:
            return plain_response(403, f"a form from {origin!r} may not write here")
        return None

    def _write(self, client: Client, request: Request, prepare) -> pages.Page:
        """A write: the confirmation page first; with confirm=yes, the permission hook,
        the action, and a log line either way."""
        text, fields, action = prepare(client, request)
        back = pages.back_of(request.path, request)
        if request.param("confirm") != "yes":
            return pages.confirmation(text, fields, request.path, self.token, back)
        refusal = self.permissions.refusal(action.action, action.target, request.peer)
        if refusal is not None:
            log.warning(
                "console: %s on %s by %s refused: %s",
                action.action,
                action.target,
                request.peer,
                refusal,
                extra={"action": action.action, "target": action.target, "peer": request.peer},
            )
            raise pages.PageError(403, refusal)
        try:
            line = action.run()
        except Exception as error:
            log.warning(
                "console: %s on %s by %s failed: %s",
                action.action,
                action.target,
                request.peer,
                error,
                extra={"action": action.action, "target": action.target, "peer": request.peer},
            )
            raise
        log.info(
            "console: %s on %s by %s: %s",
            action.action,
            action.target,
            request.peer,
            line,
            extra={"action": action.action, "target": action.target, "peer": request.peer},
        )
        return pages.done(line, back)

    def _error_page(self, status: int, message: str) -> Response:
        return Response(status, layout(f"Error {status}", Markup(f'<p class="error" id="error">{escape(message)}</p>')))

    # -- the overview's rates ----------------------------------------------------------------------

    def rates(self) -> dict[str, list[float]]:
        """Per counter, its rate per second between consecutive samples, oldest first."""
        samples = list(self._samples)
        rates: dict[str, list[float]] = {}
        for (before_s, before), (after_s, after) in zip(samples, samples[1:]):
            elapsed = max(after_s - before_s, 1e-3)
            for name, value in after.items():
                rates.setdefault(name, []).append(max(0, value - before.get(name, value)) / elapsed)
        return rates

    async def _sample_rates(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout(self.limits.page_timeout_ms / 1000):
                    async with self._pages:
                        sample = await loop.run_in_executor(self._workers, lambda: pages.rate_sample(self.client()))
                self._samples.append((time.monotonic(), sample))
            except (NodiClientError, TimeoutError) as error:
                log.debug("console: rate sample skipped: %s", error)
            except RuntimeError:  # the workers are shut down: the console is stopping
                return
            await asyncio.sleep(RATE_SAMPLE_INTERVAL_S)
