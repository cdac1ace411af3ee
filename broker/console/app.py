"""The web console (docs/console.md): server-rendered pages served by the broker on its
own port, on the broker's event loop, over HTTPS when the broker has a certificate.

The pages read and write through a blocking Client on a small pool of console worker
threads: the same requests, checks and code as the `nodi` commands (a group reset is
Client.reset_group, a redrive is dead_letters.redrive), never a second path into the
broker's state. The client's connection hands each request to the broker's own dispatch
as the signed-in principal (connection.py), so nodi's permission check decides every
request a page makes.

Who asks: on a broker without authentication, everyone (the console listens on loopback
unless the operator says otherwise, under the same start rule as --host); with a users
file, whoever signed in (sessions.py: a login form, a session cookie, a per-address
login limit); with a verified client certificate, the user its common name names.
Pages check the principal's permissions up front (a 403 page, a log line with the
principal, the refusal metric) and lists show only what the principal may see.

Every write is a POST that shows a confirmation first, carries the session's form token
(a page of another site cannot post one), and is logged with who and what.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..client.errors import (
    ConnectFailed,
    ConnectionLost,
    GroupNotEmpty,
    InvalidRequest,
    NodiClientError,
    NotAuthorized,
    OffsetOutOfRange,
    Timeout,
    UnknownGroup,
    UnknownPartition,
    UnknownQueueGroup,
    UnknownTopic,
)
from ..client.sync_client import Client
from ..server.users import ANONYMOUS, Principal
from . import pages
from .connection import ConsoleClients, ConsoleGateway
from .http import DEFAULT_CONSOLE_LIMITS, ConsoleLimits, HttpServer, Request, Response, plain_response
from .render import Markup, escape, hidden, layout, url
from .sessions import DEFAULT_SESSION_LIMITS, Session, SessionLimits, Sessions, clear_cookie, cookie_value, set_cookie

if TYPE_CHECKING:
    from ..server.security import Security
    from ..server.server import Server

log = logging.getLogger("nodi.console")

# The overview's rate charts: a sample every RATE_SAMPLE_INTERVAL_S, the last RATE_SAMPLES_MAX kept.
RATE_SAMPLE_INTERVAL_S = 5.0
RATE_SAMPLES_MAX = 60
# Principals with a console client open at once (each a client thread); the least
# recently used one is closed to make room.
CONSOLE_CLIENTS_MAX = 16
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# The console's own principal: only for the overview's rate samples (totals).
CONSOLE_PRINCIPAL = Principal("nodi-console", superuser=True)
# A user name or password field longer than this is refused before any check.
LOGIN_FIELD_BYTES_MAX = 1024

_ERROR_STATUS: tuple[tuple[type[NodiClientError], int], ...] = (
    (NotAuthorized, 403),
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


def _redirect(location: str, *headers: tuple[str, str]) -> Response:
    return Response(303, b"", "text/plain; charset=utf-8", [("location", location), *headers])


def _local_path(target: str) -> str:
    """`target` when it is a path of this console, else "/" (no redirect elsewhere)."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


class Console:
    """The console of one broker: its HTTP server, sessions, clients, workers and rate samples."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        limits: ConsoleLimits = DEFAULT_CONSOLE_LIMITS,
        session_limits: SessionLimits = DEFAULT_SESSION_LIMITS,
    ) -> None:
        self.http = HttpServer(host, port, self.handle, limits)
        self.limits = limits
        self.sessions = Sessions(session_limits)
        # The form token of a broker without users (and of the login form): per process.
        self.token = secrets.token_urlsafe(24)
        self.security: Security | None = None
        self._gateway: ConsoleGateway | None = None
        self._clients: ConsoleClients | None = None
        self._grace_ms = 0
        self._workers = concurrent.futures.ThreadPoolExecutor(limits.pages_in_progress_max, "nodi-console")
        self._pages = asyncio.Semaphore(limits.pages_in_progress_max)
        self._samples: deque[tuple[float, dict[str, int]]] = deque(maxlen=RATE_SAMPLES_MAX + 1)
        self._routes: dict[tuple[str, str], Callable[[Client, Request, str], pages.Page]] = {
            ("GET", "/"): lambda client, request, token: pages.overview(client, request, self.rates()),
            ("GET", "/topic"): lambda client, request, token: pages.topic(client, request),
            ("GET", "/messages"): lambda client, request, token: pages.messages(client, request),
            ("GET", "/groups"): lambda client, request, token: pages.groups(client, request),
            ("GET", "/group"): pages.group,
            ("GET", "/queues"): lambda client, request, token: pages.queues(client, request),
            ("GET", "/queue"): lambda client, request, token: pages.queue(client, request),
            ("GET", "/dead-letters"): lambda client, request, token: pages.dead_letter_list(client, request),
            ("GET", "/dead-letter"): pages.dead_letter,
            ("POST", "/group/reset"): lambda client, request, token: self._write(
                client, request, token, pages.group_reset
            ),
            ("POST", "/dead-letter/redrive"): lambda client, request, token: self._write(
                client, request, token, lambda c, r: pages.dead_letter_write(c, r, "redrive")
            ),
            ("POST", "/dead-letter/purge"): lambda client, request, token: self._write(
                client, request, token, lambda c, r: pages.dead_letter_write(c, r, "purge")
            ),
        }
        self._session_routes = {("GET", "/login"), ("POST", "/login"), ("POST", "/logout")}

    @property
    def port(self) -> int:
        return self.http.port

    @property
    def tls(self) -> bool:
        return self.http.tls

    def bind(self) -> None:
        self.http.bind()

    async def start(self, tasks: asyncio.TaskGroup, server: Server) -> None:
        """Serve `server`'s broker: its TLS context (reloaded in place on SIGHUP), its
        users and permissions (server.security), its dispatch."""
        self.security = server.security
        self._grace_ms = server.config.shutdown_grace_ms
        self._gateway = ConsoleGateway(server, asyncio.get_running_loop())
        self._clients = ConsoleClients(self._gateway, CONSOLE_CLIENTS_MAX)
        await self.http.start(tasks, server.security.tls_context, server.config.handshake_timeout_ms)
        tasks.create_task(self._sample_rates())

    async def stop(self) -> None:
        """Stop listening, let the requests pages have in flight finish (within the
        shutdown grace), close the clients. Idempotent."""
        self.http.close()
        if self._gateway is not None:
            await self._gateway.stop(self._grace_ms)
        clients, self._clients = self._clients, None
        if clients is not None:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._workers, clients.close)
            except RuntimeError:  # the workers were shut down by an earlier stop
                clients.close()
        self._workers.shutdown(wait=False, cancel_futures=True)

    # -- who asks ---------------------------------------------------------------------------

    @property
    def _login_required(self) -> bool:
        return self.security is not None and self.security.required

    def _identify(self, request: Request) -> tuple[Principal | None, Session | None]:
        """The principal of `request` and its session: anonymous (a superuser) on a
        broker without authentication; the user a verified client certificate names;
        else the signed-in user of the session cookie (None: not signed in)."""
        security = self.security
        assert security is not None
        if request.peer_certificate is not None:
            principal = security.principal_of_certificate(request.peer_certificate)
            if principal is not None:
                return principal, None
        if not security.required:
            return ANONYMOUS, None
        session = self.sessions.get(cookie_value(request.headers.get("cookie", "")))
        if session is None:
            return None, None
        user = security.users.get(session.user) if security.users is not None else None
        if user is None:  # removed from the users file since
            return None, None
        return user.principal, session

    # -- requests ---------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        refusal = self._check_origin(request)
        if refusal is not None:
            return refusal
        key = (request.method, request.path)
        route = self._routes.get(key)
        if route is None and key not in self._session_routes:
            if any(path == request.path for _, path in (*self._routes, *self._session_routes)):
                return plain_response(405, f"{request.method} not allowed on {request.path}")
            return self._error_page(404, f"no page {request.path}")
        principal, session = self._identify(request)
        if request.path == "/login":
            return await self._login(request, principal)
        form_token = session.form_token if session is not None else self.token
        if request.method == "POST" and not secrets.compare_digest(request.param("token"), form_token):
            return self._error_page(403, "this form is stale or from elsewhere: reload the page and try again")
        if request.path == "/logout":
            return self._logout(request, session)
        if principal is None:
            if request.method == "GET":
                return _redirect(url("/login", next=url(request.path, **request.query)))
            return self._error_page(403, "sign in first")
        assert route is not None
        request.principal = principal
        try:
            async with asyncio.timeout(self.limits.page_timeout_ms / 1000):
                async with self._pages:
                    loop = asyncio.get_running_loop()
                    page = await loop.run_in_executor(self._workers, self._build, route, request, form_token)
        except TimeoutError:
            return self._error_page(503, "the page took too long; try again")
        except pages.Refused as refused:
            assert self.security is not None
            self.security.count_not_authorized(
                principal, refused.action, f"{refused.resource.value} {refused.name}", refused.what
            )
            return self._error_page(403, str(refused), session)
        except pages.PageError as error:
            return self._error_page(error.status, error.message, session)
        except NodiClientError as error:
            return self._error_page(_status_of(error), str(error), session)
        return Response(200, self._layout(page.title, page.body, session))

    def _build(self, route: Callable[[Client, Request, str], pages.Page], request: Request, token: str) -> pages.Page:
        assert self._clients is not None and request.principal is not None
        return route(self._clients.get(request.principal), request, token)

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

    # -- signing in and out ---------------------------------------------------------------------

    async def _login(self, request: Request, principal: Principal | None) -> Response:
        """GET: the form (or, with nothing to sign in to, the overview). POST: check the
        form token, the per-address limit and the password (scrypt, off the loop), then
        a new session and its cookie."""
        target = _local_path(request.param("next", "/"))
        if not self._login_required:
            return _redirect(target)
        if request.method == "GET":
            return self._login_page(200, "", target)
        if not secrets.compare_digest(request.param("token"), self.token):
            return self._login_page(403, "this form is stale or from elsewhere: try again", target)
        address = request.peer.rsplit(":", 1)[0]
        if not self.sessions.login_allowed(address):
            log.warning(
                "console: sign-in refused: %s failed too often", address, extra={"peer": address, "reason": "rate"}
            )
            limits = self.sessions.limits
            return self._login_page(
                429,
                f"too many failed sign-ins from your address: at most {limits.login_attempts_max} "
                f"per {limits.login_window_ms // 1000} s; wait and try again",
                target,
            )
        user, password = request.form.get("user", ""), request.form.get("password", "")
        assert self.security is not None
        principal = None
        if user and password and len(user.encode()) <= LOGIN_FIELD_BYTES_MAX:
            principal = await self.security.authenticate(user, password)  # counts and logs a refusal
        else:
            self.security.refuse("bad_credentials", user[:128] or None, request.peer)
        if principal is None:
            self.sessions.login_failed(address)
            return self._login_page(401, "unknown user or wrong password", target)
        session_id, _session = self.sessions.create(principal.name)
        log.info("console: %s signed in from %s", principal.name, request.peer, extra={"principal": principal.name})
        return _redirect(target, ("set-cookie", set_cookie(session_id, secure=self.tls)))

    def _logout(self, request: Request, session: Session | None) -> Response:
        if session is not None:
            self.sessions.end(cookie_value(request.headers.get("cookie", "")))
            log.info("console: %s signed out", session.user, extra={"principal": session.user})
        return _redirect("/login", ("set-cookie", clear_cookie(secure=self.tls)))

    def _login_page(self, status: int, problem: str, target: str) -> Response:
        message = Markup(f'<p class="error" id="error">{escape(problem)}</p>') if problem else Markup("")
        body = Markup(
            f"{message}"
            '<form method="post" action="/login" id="login"><fieldset>'
            f"{hidden(token=self.token, next=target)}"
            '<label>user <input name="user" id="login-user" autocomplete="username" required></label><br>'
            '<label>password <input name="password" id="login-password" type="password" '
            'autocomplete="current-password" required></label><br>'
            '<button type="submit" id="login-submit">Sign in</button></fieldset></form>'
        )
        return Response(status, layout("Sign in", body))

    # -- writes -------------------------------------------------------------------------------

    def _write(self, client: Client, request: Request, token: str, prepare) -> pages.Page:
        """A write: the permission check and the confirmation page first; with
        confirm=yes, the action, and a log line either way."""
        text, fields, action = prepare(client, request)
        principal = request.principal
        for needed_action, resource, name in action.needs:
            if not principal.may(needed_action, resource, name):
                raise pages.Refused(needed_action, resource, name, f"console {action.action}", principal.name)
        back = pages.back_of(request.path, request)
        if request.param("confirm") != "yes":
            return pages.confirmation(text, fields, request.path, token, back)
        fields_of_log = {"action": action.action, "target": action.target, "peer": request.peer}
        try:
            line = action.run()
        except Exception as error:
            log.warning(
                "console: %s on %s by %s from %s failed: %s",
                action.action,
                action.target,
                principal.name,
                request.peer,
                error,
                extra={**fields_of_log, "principal": principal.name},
            )
            raise
        log.info(
            "console: %s on %s by %s from %s: %s",
            action.action,
            action.target,
            principal.name,
            request.peer,
            line,
            extra={**fields_of_log, "principal": principal.name},
        )
        return pages.done(line, back)

    def _layout(self, title: str, body: Markup, session: Session | None) -> bytes:
        if session is None:
            return layout(title, body)
        return layout(title, body, user=session.user, form_token=session.form_token)

    def _error_page(self, status: int, message: str, session: Session | None = None) -> Response:
        body = Markup(f'<p class="error" id="error">{escape(message)}</p>')
        return Response(status, self._layout(f"Error {status}", body, session))

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
        """Every RATE_SAMPLE_INTERVAL_S: a rate sample (totals over every topic and
        group, as the console's own principal), and a sweep of expired sessions."""
        loop = asyncio.get_running_loop()
        while True:
            self.sessions.end_expired()
            try:
                async with asyncio.timeout(self.limits.page_timeout_ms / 1000):
                    async with self._pages:
                        sample = await loop.run_in_executor(self._workers, self._rate_sample)
                self._samples.append((time.monotonic(), sample))
            except (NodiClientError, TimeoutError) as error:
                log.debug("console: rate sample skipped: %s", error)
            except RuntimeError:  # the workers are shut down: the console is stopping
                return
            await asyncio.sleep(RATE_SAMPLE_INTERVAL_S)

    def _rate_sample(self) -> dict[str, int]:
        clients = self._clients
        if clients is None:
            raise RuntimeError("the console is stopping")
        return pages.rate_sample(clients.get(CONSOLE_PRINCIPAL))
