"""TLS, authentication and permissions on the server side (docs/security.md).

- `server_tls_context` builds the listener's TLS context; `Security.reload` loads the
  certificate again into the same context (SIGHUP): new connections get the new one,
  open connections keep theirs and are not dropped.
- `Security.authenticate` checks a user and password against the users file (scrypt,
  off the event loop, at most password_checks_max at once) and a client certificate's
  common name; it keeps the count of connections per principal and counts refusals.
- `required_permissions` says what a request of nodi's protocol needs, as
  (action, resource, name) triples that users.Principal.may decides: the one check a
  Kafka listener or a web console calls with its own requests' needs.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from dataclasses import dataclass

from nodi.storage.errors import InvalidConfigError

from ..protocol import messages as m
from .read_throttle import ReadThrottle, ThrottleCounts
from .security_settings import SecuritySettings
from .users import Action, Principal, Resource, load_users

log = logging.getLogger("nodi.security")

# Why a connection was refused authentication: the label of the refusal metric.
AUTHENTICATION_REFUSALS = (
    "bad_credentials",  # an unknown user or a wrong password (never said which)
    "certificate",  # a client certificate whose common name is no user
    "not_authenticated",  # a request before Authenticate
    "replayed",  # a second Authenticate on one connection
    "principal_connections",  # connections_per_principal_max reached
    "no_users_file",  # an Authenticate to a server without a users file
    # The Kafka listener's SASL (broker/kafka/sasl.py):
    "mechanism",  # a SASL mechanism not offered on that connection (PLAIN without TLS)
    "no_scram_credentials",  # a user whose entry has no SCRAM keys yet (`nodi user passwd`)
    "sasl_protocol",  # a SASL exchange out of order or malformed
)


def server_tls_context(settings: SecuritySettings) -> ssl.SSLContext:
    """The listener's context: TLS 1.2 at least, the certificate and key, and client
    certificates checked against tls_client_ca_file as tls_client_auth says."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_certificates(context, settings)
    context.verify_mode = {
        "none": ssl.CERT_NONE,
        "optional": ssl.CERT_OPTIONAL,
        "required": ssl.CERT_REQUIRED,
    }[settings.tls_client_auth]
    return context


def _load_certificates(context: ssl.SSLContext, settings: SecuritySettings) -> None:
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file or None)
    except (OSError, ssl.SSLError) as error:
        raise InvalidConfigError(
            f"cannot load the TLS certificate {settings.tls_cert_file} and key "
            f"{settings.tls_key_file or '(in the certificate file)'}: {error}"
        ) from None
    if settings.tls_client_ca_file:
        try:
            context.load_verify_locations(settings.tls_client_ca_file)
        except (OSError, ssl.SSLError) as error:
            raise InvalidConfigError(f"cannot load the client CA file {settings.tls_client_ca_file}: {error}") from None


def certificate_common_name(peer_certificate: dict | None) -> str | None:
    """The subject's common name of a verified peer certificate (SSLObject.getpeercert())."""
    if not peer_certificate:
        return None
    for relative_name in peer_certificate.get("subject", ()):
        for key, value in relative_name:
            if key == "commonName":
                return value
    return None


@dataclass(frozen=True, slots=True)
class SecurityStatistics:
    authentications: int  # connections that authenticated (password or certificate)
    refusals: dict[str, int]  # connections refused authentication, by AUTHENTICATION_REFUSALS
    not_authorized: dict[str, int]  # requests refused NOT_AUTHORIZED, by action
    principals_connected: int  # distinct principals with a connection open
    tls_reloads: int  # certificate reloads (SIGHUP) that succeeded
    tls_reload_failures: int
    # Reads delayed by the per-connection limits, by (listener, reason) (read_throttle.py).
    reads_throttled: dict[tuple[str, str], int]
    connections_total: int  # open over both listeners
    connections_total_refused: int  # refused over connections_total_max


class Security:
    """The server's TLS context, users and per-principal accounting."""

    def __init__(self, settings: SecuritySettings) -> None:
        self.settings = settings
        self.tls_context = server_tls_context(settings) if settings.tls else None
        self.users = load_users(settings.users_file) if settings.users_file else None
        self._checks = asyncio.Semaphore(settings.password_checks_max)
        self._connections: Counter[str] = Counter()
        self._authentications = 0
        self._refusals = dict.fromkeys(AUTHENTICATION_REFUSALS, 0)
        self._not_authorized = {action.value: 0 for action in Action}
        self._reloads = 0
        self._reload_failures = 0
        self.throttle_counts = ThrottleCounts()
        self._connections_total = 0
        self._connections_total_refused = 0

    @property
    def required(self) -> bool:
        """Whether a connection must authenticate before any request."""
        return self.settings.authentication

    def statistics(self) -> SecurityStatistics:
        return SecurityStatistics(
            authentications=self._authentications,
            refusals=dict(self._refusals),
            not_authorized=dict(self._not_authorized),
            principals_connected=len(self._connections),
            tls_reloads=self._reloads,
            tls_reload_failures=self._reload_failures,
            reads_throttled=dict(self.throttle_counts.counts),
            connections_total=self._connections_total,
            connections_total_refused=self._connections_total_refused,
        )

    # -- limits over both listeners -------------------------------------------------------

    def accept_connection(self, listener: str, peer: object = None) -> bool:
        """Count an accepted connection of either listener; False (refused, counted,
        logged) at connections_total_max. A True is paired with release_connection."""
        if self._connections_total >= self.settings.connections_total_max:
            self._connections_total_refused += 1
            log.warning(
                "%s connection from %s refused: connections_total_max %d reached",
                listener,
                peer,
                self.settings.connections_total_max,
            )
            return False
        self._connections_total += 1
        return True

    def release_connection(self) -> None:
        self._connections_total -= 1

    def read_throttle(self, listener: str) -> ReadThrottle:
        """A new connection's bytes-in-flight and request-rate limits."""
        settings = self.settings
        return ReadThrottle(
            listener,
            settings.connection_in_flight_bytes_max,
            settings.connection_requests_per_second_max,
            self.throttle_counts,
        )

    # -- reload -------------------------------------------------------------------------

    def reload(self) -> list[str]:
        """SIGHUP: load the certificate and key again into the listener's context, and
        the users file again. Each part that fails keeps what it had and says why (one
        line each, returned and logged). Open connections are not touched."""
        problems = []
        if self.tls_context is not None:
            try:
                _load_certificates(self.tls_context, self.settings)
                self._reloads += 1
                log.info("TLS certificate reloaded from %s", self.settings.tls_cert_file)
            except InvalidConfigError as error:
                self._reload_failures += 1
                problems.append(f"TLS certificate not reloaded, the old one stays: {error}")
        if self.settings.users_file:
            try:
                self.users = load_users(self.settings.users_file)
                log.info("users reloaded from %s (%d users)", self.settings.users_file, len(self.users.users))
            except InvalidConfigError as error:
                problems.append(f"users not reloaded, the old ones stay: {error}")
        for problem in problems:
            log.error("%s", problem)
        return problems

    # -- authentication -----------------------------------------------------------------

    def principal_of_certificate(self, peer_certificate: dict | None) -> Principal | None:
        """The principal a verified client certificate names (its common name, a user of
        the users file), or None when there is no certificate or it names no user."""
        name = certificate_common_name(peer_certificate)
        if name is None:
            return None
        if self.users is None:  # certificates only: every holder of a verified one may do everything
            return Principal(name, superuser=True)
        user = self.users.get(name)
        if user is None:
            self.refuse("certificate", name)
            return None
        return user.principal

    async def authenticate(self, user: str, password: str) -> Principal | None:
        """The principal of `user` when `password` is right, else None (counted)."""
        users = self.users
        if users is None:
            self.refuse("no_users_file", user)
            return None
        async with self._checks:
            principal = await asyncio.to_thread(users.authenticate, user, password)
        if principal is None:
            self.refuse("bad_credentials", user)
        return principal

    def refuse(self, reason: str, user: str | None = None, peer: object = None) -> None:
        """Count one refused connection and log it (the user name, never a password)."""
        self._refusals[reason] += 1
        log.warning(
            "authentication refused (%s) for %s from %s",
            reason,
            user if user is not None else "?",
            peer,
            extra={"reason": reason, "principal": user, "peer": str(peer)},
        )

    def open_connection(self, principal: Principal) -> bool:
        """Count a connection of `principal`; False (refused, counted) when it is at
        connections_per_principal_max."""
        if self._connections[principal.name] >= self.settings.connections_per_principal_max:
            self.refuse("principal_connections", principal.name)
            return False
        self._connections[principal.name] += 1
        self._authentications += 1
        return True

    def close_connection(self, principal: Principal) -> None:
        self._connections[principal.name] -= 1
        if self._connections[principal.name] <= 0:
            del self._connections[principal.name]

    # -- authorization ------------------------------------------------------------------

    def check(self, principal: Principal, request: m.Request) -> tuple[Action, Resource, str] | None:
        """The first permission `request` needs that `principal` lacks (counted and
        logged with the principal), or None when every one is granted."""
        if principal.superuser:
            return None
        what = type(request).__name__.removesuffix("Request")
        for action, resource, name in required_permissions(request):
            if not self.allowed(principal, action, resource, name, what):
                return action, resource, name
        return None

    def allowed(self, principal: Principal, action: Action, resource: Resource, name: str, what: str) -> bool:
        """Whether `principal` may; a refusal is counted and logged with the principal
        and `what` was asked (the request's name). The one check every listener makes."""
        if principal.may(action, resource, name):
            return True
        self.count_not_authorized(principal, action, f"{resource.value} {name}", what)
        return False

    def count_not_authorized(self, principal: Principal, action: Action, target: str, what: str) -> None:
        """Count and log one refusal of `principal` (`what`: the request, or the
        console's page or action): nodi's protocol, the Kafka listener and the console."""
        self._not_authorized[action.value] += 1
        log.warning(
            "not authorized: %s may not %s %s (%s)",
            principal.name,
            action.value,
            target,
            what,
            extra={"principal": principal.name, "action": action.value, "target": target},
        )


def required_permissions(request: m.Request) -> list[tuple[Action, Resource, str]]:
    """What a request of nodi's protocol needs. Reads of metadata (list and describe
    topics, groups and queues, server status), producer ids and request-reply inboxes
    need only an authenticated principal (docs/security.md says so)."""
    produce, consume, admin = Action.PRODUCE, Action.CONSUME, Action.ADMIN
    topic, group = Resource.TOPIC, Resource.GROUP
    match request:
        case m.ProduceRequest():
            return [(produce, topic, request.topic)]
        case m.FetchCommitRequest():  # a fetch and a CommitOffsets in one
            topics = sorted({request.topic, *(commit.topic for commit in request.commits)})
            return [(consume, group, request.group)] + [(consume, topic, name) for name in topics]
        case m.FetchRequest() | m.ListOffsetsRequest():
            return [(consume, topic, request.topic)]
        case m.CreateTopicRequest() | m.CreateTopicRequestV1() | m.DeleteTopicRequest() | m.CompactTopicRequest():
            return [(admin, topic, request.name)]
        case m.DeleteRecordsRequest():
            return [(admin, topic, request.topic)]
        case m.ResetGroupRequest():
            return [(admin, group, request.group)]
        case m.JoinGroupRequest():
            return [(consume, group, request.group)] + [(consume, topic, name) for name in request.topics]
        case m.CommitOffsetsRequest():
            topics = sorted({offset.topic for offset in request.offsets})
            return [(consume, group, request.group)] + [(consume, topic, name) for name in topics]
        case m.FetchOffsetsRequest():
            return [(consume, group, request.group)] + [(consume, topic, name) for name in request.topics]
        case m.LeaveGroupRequest() | m.HeartbeatRequest() | m.GroupWaitRequest():
            return [(consume, group, request.group)]
        case m.QueueLeasesRequest():  # lists offsets with the consumers' error texts: a consumer's view
            return [(consume, group, request.group), (consume, topic, request.topic)]
        case m.QueueReceiveRequest() | m.QueueSettleRequest():
            return [(consume, group, request.group), (consume, topic, request.topic)]
    return []
