"""SASL on the Kafka listener: which mechanisms a connection is offered, and the one
exchange a connection runs before any other request when the broker has users
(docs/security.md, "The Kafka listener").

Mechanisms:
- SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, RFC 7677; Kafka's KIP-84): the server side
  is scramp's, checked against the SCRAM keys `nodi user add|passwd` store (a salt, the
  iteration count, StoredKey and ServerKey; never the password). Two client tokens:
  client-first, answered with server-first; client-final, answered with server-final.
- PLAIN (RFC 4616): one token, `authzid NUL user NUL password`, checked against the
  scrypt hash like nodi's own Authenticate. The password crosses the wire as it is, so
  PLAIN is offered only on a TLS connection, or, when the operator sets
  kafka.sasl_plain_on_loopback, on a plaintext connection whose peer is a loopback
  address.

An unknown user and a wrong password are refused alike ("bad_credentials"; a SCRAM
exchange for an unknown user runs to its end against made-up keys, so the answer does
not tell which). A user whose entry has no SCRAM keys (a users file written before nodi
stored them) is refused with reason "no_scram_credentials" and a log line telling the
operator to run `nodi user passwd`.

Sans-IO but for the scrypt check of PLAIN, which Security.authenticate runs off the
event loop: the listener feeds tokens in and writes the tokens out.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import TYPE_CHECKING

import scramp

from nodi.storage.errors import InvalidConfigError

from ..server.users import SCRAM_ITERATIONS, SCRAM_MECHANISMS, Principal, parse_scram

if TYPE_CHECKING:
    from ..server.security import Security

log = logging.getLogger("nodi.kafka")

PLAIN = "PLAIN"
# A SASL token of these mechanisms is a few hundred bytes (names, nonces, proofs); a
# longer one is refused before it is parsed.
SASL_TOKEN_BYTES_MAX = 8192
# Made-up keys for a user the exchange cannot succeed for, stable per name within a
# process (a second try shows the same salt, as a real user's would).
_DUMMY_SECRET = secrets.token_bytes(32)


class SaslRefused(Exception):
    """The exchange failed: the connection is answered SASL_AUTHENTICATION_FAILED (or,
    for a mechanism not offered, UNSUPPORTED_SASL_MECHANISM) and closed. `reason` is the
    refusal metric's label, None when Security counted it already."""

    def __init__(self, reason: str | None, message: str, user: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.user = user


def offered_mechanisms(security: Security, *, tls: bool, plain_allowed: bool) -> list[str]:
    """The mechanisms a connection may use: none without a users file; SCRAM always
    with one; PLAIN over TLS, or when `plain_allowed` (the loopback opt-in)."""
    if security.users is None:
        return []
    mechanisms = list(SCRAM_MECHANISMS)
    if tls or plain_allowed:
        mechanisms.append(PLAIN)
    return mechanisms


class SaslExchange:
    """One connection's exchange with the mechanism its SaslHandshake chose. `step`
    takes a client token and returns the server's token and, when the exchange is
    done, the principal; it raises SaslRefused."""

    def __init__(self, security: Security, mechanism: str) -> None:
        assert mechanism == PLAIN or mechanism in SCRAM_MECHANISMS
        self.security = security
        self.mechanism = mechanism
        self.done = False
        self._user: str | None = None
        self._missing: str | None = None  # why no real keys were found: "unknown" or "no_scram"
        self._server: scramp.core.ScramServer | None = None

    async def step(self, token: bytes) -> tuple[bytes, Principal | None]:
        if self.done:
            raise SaslRefused("sasl_protocol", "the SASL exchange is over")
        if len(token) > SASL_TOKEN_BYTES_MAX:
            raise SaslRefused("sasl_protocol", f"a SASL token over {SASL_TOKEN_BYTES_MAX} bytes")
        try:
            text = bytes(token).decode("utf-8")
        except UnicodeDecodeError:
            raise SaslRefused("sasl_protocol", "a SASL token that is not UTF-8") from None
        if self.mechanism == PLAIN:
            self.done = True
            return b"", await self._plain(text)
        if self._server is None:
            return self._scram_first(text), None
        self.done = True
        return self._scram_final(text)

    async def _plain(self, text: str) -> Principal:
        parts = text.split("\0")
        if len(parts) != 3 or not parts[1]:
            raise SaslRefused("sasl_protocol", "a PLAIN token is `authzid NUL user NUL password`")
        authorization_id, user, password = parts
        if authorization_id and authorization_id != user:
            raise SaslRefused("sasl_protocol", "PLAIN: acting as another user (an authzid) is not supported", user)
        principal = await self.security.authenticate(user, password)  # counts a refusal itself
        if principal is None:
            raise SaslRefused(None, "PLAIN: unknown user or wrong password", user)
        return principal

    def _scram_first(self, text: str) -> bytes:
        self._server = scramp.ScramMechanism(self.mechanism).make_server(self._keys_of)
        try:
            self._server.set_client_first(text)
            return self._server.get_server_first().encode()
        except scramp.ScramException as error:
            raise SaslRefused("sasl_protocol", f"{self.mechanism}: {error}", self._user) from None

    def _scram_final(self, text: str) -> tuple[bytes, Principal]:
        assert self._server is not None
        try:
            self._server.set_client_final(text)
            final = self._server.get_server_final().encode()
        except scramp.ScramException:
            final = None
        users = self.security.users
        user = None if users is None or self._user is None else users.get(self._user)
        if final is None or self._missing is not None or user is None:
            if self._missing == "no_scram":
                log.warning(
                    "kafka: %s tried %s but has no SCRAM keys in the users file (written before nodi stored "
                    "them): run `nodi user passwd %s`, then send the broker SIGHUP",
                    self._user,
                    self.mechanism,
                    self._user,
                    extra={"principal": self._user},
                )
            raise SaslRefused(
                "no_scram_credentials" if self._missing == "no_scram" else "bad_credentials",
                f"{self.mechanism}: unknown user, wrong password, or a user without SCRAM keys "
                "(an operator gives them with `nodi user passwd`)",
                self._user,
            )
        return final, user.principal

    def _keys_of(self, name: str) -> tuple[bytes, bytes, bytes, int]:
        """scramp's auth_fn: the user's keys, or made-up ones the proof cannot match."""
        self._user = name
        users = self.security.users
        user = None if users is None else users.get(name)
        stored = None if user is None else user.scram.get(self.mechanism)
        if stored is not None:
            try:
                return parse_scram(stored)
            except InvalidConfigError:  # load_users checked it; never expected here
                stored = None
        self._missing = "unknown" if user is None else "no_scram"
        salt = hmac.new(_DUMMY_SECRET, name.encode(), hashlib.sha256).digest()[:16]
        return salt, secrets.token_bytes(64), secrets.token_bytes(64), SCRAM_ITERATIONS
