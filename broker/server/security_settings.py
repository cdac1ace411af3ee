"""The `[security]` table of the server settings: TLS files, the users file, and the
limits that guard against a hostile or broken client (docs/security.md). Each setting
is also a NODI_SECURITY_<NAME> environment variable."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from nodi.storage.errors import InvalidConfigError

TLS_CLIENT_AUTH_MODES = ("none", "optional", "required")


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    # The server's certificate (PEM, its chain after it) and private key: with them,
    # nodi's protocol and the metrics endpoint speak TLS only. Empty: plaintext.
    tls_cert_file: str = ""
    tls_key_file: str = ""  # empty: the key is in tls_cert_file
    # CA certificates (PEM) that client certificates are checked against (mutual TLS);
    # a verified certificate's common name is the connection's principal.
    tls_client_ca_file: str = ""
    # Client certificates: none (not asked for), optional, or required.
    tls_client_auth: str = "none"
    # The users file (TOML; `nodi user add`): with it every connection authenticates
    # and each request is checked against its principal's permissions. Empty: open.
    users_file: str = ""
    # Serve an address beyond loopback with no users file (anyone who reaches the
    # port may read, write and delete everything).
    insecure_no_auth: bool = False
    # Authenticated connections of one principal at once; one more is refused.
    connections_per_principal_max: int = 1_000
    # Password checks (scrypt: about 16 MiB and tens of ms each) running at once; more
    # wait, within the handshake deadline.
    password_checks_max: int = 4
    # Open connections over both listeners together (nodi's protocol and Kafka's; each
    # listener is also held to server.connections_max); one more is refused at once.
    connections_total_max: int = 20_000
    # Frame bytes of requests one connection has sent and not yet had answered; past it
    # the connection stops reading until answers drain (a wait, not an error).
    connection_in_flight_bytes_max: int = 64 * 1024 * 1024
    # Requests a second one connection may send (token bucket, one second of burst);
    # past it reading that connection is delayed (not an error, nothing dropped).
    connection_requests_per_second_max: int = 100_000

    def validate(self) -> None:
        if self.tls_client_auth not in TLS_CLIENT_AUTH_MODES:
            raise InvalidConfigError(
                f"security.tls_client_auth {self.tls_client_auth!r} is not one of {', '.join(TLS_CLIENT_AUTH_MODES)}"
            )
        if self.tls_key_file and not self.tls_cert_file:
            raise InvalidConfigError("security.tls_key_file without security.tls_cert_file")
        if self.tls_client_auth != "none" and not (self.tls_cert_file and self.tls_client_ca_file):
            raise InvalidConfigError(
                f"security.tls_client_auth {self.tls_client_auth} needs tls_cert_file and tls_client_ca_file"
            )
        for name in (
            "connections_per_principal_max",
            "password_checks_max",
            "connections_total_max",
            "connection_in_flight_bytes_max",
            "connection_requests_per_second_max",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidConfigError(f"security.{name} must be a positive integer, got {value!r}")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def authentication(self) -> bool:
        """Whether connections must prove who they are (a users file or client certificates)."""
        return bool(self.users_file) or self.tls_client_auth == "required"


DEFAULT_SECURITY_SETTINGS = SecuritySettings()


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this machine's loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, security: SecuritySettings) -> None:
    """The safe default: a broker without authentication serves loopback only.
    InvalidConfigError, saying why and what to do, for any other address."""
    if is_loopback(host) or security.authentication or security.insecure_no_auth:
        return
    raise InvalidConfigError(
        f"refusing to listen on {host} without authentication: anyone who can reach it could read, write and "
        "delete every topic. Give a users file (security.users_file, NODI_SECURITY_USERS_FILE; `nodi user add` "
        "makes one) and TLS certificates, or listen on 127.0.0.1, or, on a network you trust, --insecure-no-auth"
    )


def exposure_warnings(host: str, security: SecuritySettings) -> list[str]:
    """What a start should warn about: passwords in clear beyond loopback."""
    if security.users_file and not security.tls and not is_loopback(host):
        return [
            f"listening on {host} with a users file but without TLS: passwords and messages cross the network "
            "in clear (set security.tls_cert_file and tls_key_file)"
        ]
    return []
