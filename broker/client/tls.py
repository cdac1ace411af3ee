"""What a client needs to reach a broker that has TLS and a users file: a TLS context
and the credentials it authenticates with, given as arguments or taken from NODI_*
environment variables (the same ones for the Python clients and the CLI).

    NODI_TLS=1             TLS, trusting the system's CAs (implied by any of the next three)
    NODI_TLS_CA=ca.pem     TLS, trusting this CA (a self-made one)
    NODI_TLS_CERT=c.pem    a client certificate (mutual TLS), with NODI_TLS_KEY
    NODI_TLS_KEY=c.key     its private key (else the key is in NODI_TLS_CERT)
    NODI_USER=alice        authenticate as this user
    NODI_PASSWORD=...      with this password

A password is never part of a repr, a log line or an error message.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

TLS_VARIABLE = "NODI_TLS"
TLS_CA_VARIABLE = "NODI_TLS_CA"
TLS_CERT_VARIABLE = "NODI_TLS_CERT"
TLS_KEY_VARIABLE = "NODI_TLS_KEY"
USER_VARIABLE = "NODI_USER"
PASSWORD_VARIABLE = "NODI_PASSWORD"
CLIENT_ENVIRONMENT_VARIABLES = frozenset(
    {TLS_VARIABLE, TLS_CA_VARIABLE, TLS_CERT_VARIABLE, TLS_KEY_VARIABLE, USER_VARIABLE, PASSWORD_VARIABLE}
)
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str = field(repr=False)


def client_tls_context(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client context: the server's certificate checked against `ca_file` (else the
    system's CAs) and its host name; TLS 1.2 at least; with `cert_file` (and `key_file`)
    a client certificate for mutual TLS. Raises ValueError naming the file it cannot read."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot load the CA file {ca_file}: {error}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"cannot load the client certificate {cert_file}: {error}") from None
    return context


def tls_from_environment(environment: Mapping[str, str] | None = None) -> ssl.SSLContext | None:
    """The TLS context the NODI_TLS* variables ask for, or None (plaintext)."""
    environment = os.environ if environment is None else environment
    ca_file = environment.get(TLS_CA_VARIABLE) or None
    cert_file = environment.get(TLS_CERT_VARIABLE) or None
    key_file = environment.get(TLS_KEY_VARIABLE) or None
    wanted = environment.get(TLS_VARIABLE, "").strip().lower() in _TRUE
    if not (wanted or ca_file or cert_file):
        return None
    return client_tls_context(ca_file, cert_file, key_file)


def credentials_from(
    user: str | None, password: str | None, environment: Mapping[str, str] | None = None
) -> Credentials | None:
    """Credentials from the arguments, else from NODI_USER / NODI_PASSWORD; None when
    there is no user. A user without a password is a ValueError."""
    environment = os.environ if environment is None else environment
    if user is None:
        user = environment.get(USER_VARIABLE) or None
    if password is None:
        password = environment.get(PASSWORD_VARIABLE)
    if user is None:
        return None
    if password is None:
        raise ValueError(f"a user ({user}) but no password: give password= or set {PASSWORD_VARIABLE}")
    return Credentials(user, password)
