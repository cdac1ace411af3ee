"""TLS, authentication and permissions against real servers (docs/security.md).

One broker for most tests: TLS with a CA made here, a users file (a superuser, a user
with a table of permissions), listening on 0.0.0.0 (allowed: it has users). Others for
an expired certificate, mutual TLS with a certificate reload on SIGHUP, and the refusal
to listen beyond loopback without users."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="the cryptography package makes the test CA (the dev extra has it)")

from security_certs import CertificateAuthority  # noqa: E402

from nodi.broker import (  # noqa: E402
    AuthenticationFailed,
    Client,
    ConnectFailed,
    ConnectionLost,
    NotAuthorized,
    TlsFailed,
    client_tls_context,
)
from nodi.broker.protocol import messages as m  # noqa: E402
from nodi.broker.protocol.connection import NEED_DATA, Connection, Role  # noqa: E402
from nodi.broker.protocol.errors import ErrorCode  # noqa: E402

from conftest import NODI, BrokerProcess  # noqa: E402

PASSWORDS = {"root": "root-Secret-1", "alice": "alice-Secret-2"}
TIMEOUT_S = 10

USERS_TOML = """
[users.root]
password = "{root}"
superuser = true

[users.alice]
password = "{alice}"
[users.alice.produce]
allow = ["orders.>"]
deny = ["orders.secret"]
[users.alice.consume]
allow = ["orders.*"]
groups_allow = ["billing"]
[users.alice.admin]
allow = ["scratch.*"]

[users.carol]
[users.carol.consume]
allow = ["orders.*"]
"""


def _write_users(path: Path) -> None:
    from nodi.broker.server.users import hash_password

    path.write_text(USERS_TOML.format(**{name: hash_password(password) for name, password in PASSWORDS.items()}))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory)
    other = CertificateAuthority(directory, "some other CA")
    return {
        "directory": directory,
        "ca": ca,
        "other": other,
        "server": ca.issue("server", "nodi test server", server=True),
        "expired": ca.issue("expired", "nodi expired server", server=True, expired=True),
        "carol": ca.issue("carol", "carol", server=False),
        "mallory": other.issue("mallory", "carol", server=False),
        "stranger": ca.issue("stranger", "stranger", server=False),
    }


@pytest.fixture(scope="module")
def secure(pki, tmp_path_factory):
    directory = tmp_path_factory.mktemp("secure")
    users = directory / "users.toml"
    _write_users(users)
    config = directory / "nodi.toml"
    config.write_text(
        "[server]\nhandshake_timeout_ms = 1500\n"
        f'[security]\ntls_cert_file = "{pki["server"].cert}"\ntls_key_file = "{pki["server"].key}"\n'
        f'users_file = "{users}"\nconnections_per_principal_max = 3\n'
    )
    process = BrokerProcess(str(directory / "data"), ["--config", str(config), "--host", "0.0.0.0"], metrics=True)
    process.start()
    process.host = "127.0.0.1"
    yield process
    if process.process is not None:
        process.stop()


def _client(broker, pki, user=None, *, ca=None, **options) -> Client:
    tls = client_tls_context(ca or pki["ca"].file)
    password = PASSWORDS.get(user) if user else None
    return Client(
        broker.address, tls=tls, user=user, password=password, timeout_ms=5_000, reconnect_attempts_max=2, **options
    )


def _metrics(broker, pki) -> str:
    context = client_tls_context(pki["ca"].file)
    with urllib.request.urlopen(f"https://127.0.0.1:{broker.metrics_port}/metrics", context=context, timeout=5) as page:
        return page.read().decode()


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class TlsRawClient:
    """nodi's protocol over a TLS socket, one message at a time."""

    def __init__(self, broker, pki) -> None:
        context = client_tls_context(pki["ca"].file)
        raw = socket.create_connection((broker.host, broker.port), timeout=TIMEOUT_S)
        self.socket = context.wrap_socket(raw, server_hostname=broker.host)
        self.connection = Connection(Role.CLIENT)

    def call(self, request_type, **fields):
        request = request_type(request_id=self.connection.next_request_id(), **fields)
        self.socket.sendall(self.connection.send(request))
        return self.next_message()

    def next_message(self):
        while True:
            event = self.connection.next_event()
            if event is not NEED_DATA:
                return event
            self.connection.receive_data(self.socket.recv(1 << 16))

    def closed_by_server(self) -> bool:
        try:
            return self.socket.recv(1 << 16) == b""
        except (ConnectionError, ssl.SSLError):
            return True


# -- TLS ------------------------------------------------------------------------------


def test_tls_round_trip_and_the_principal(secure, pki):
    with _client(secure, pki, "root") as client:
        client.create_topic("orders.tls", partitions=1)
        client.produce("orders.tls", b"over tls", partition=0)
        assert [message.value for message in client.fetch("orders.tls", 0, 0)] == [b"over tls"]


def test_a_wrong_ca_is_refused_with_a_clear_error(secure, pki):
    with pytest.raises(TlsFailed, match="certificate verify failed|unable to get local issuer"):
        _client(secure, pki, "root", ca=pki["other"].file).connect()


def test_a_plaintext_client_is_told_to_use_tls(secure, pki):
    with pytest.raises(ConnectFailed, match="plaintext client"):
        with Client(secure.address, tls=False, timeout_ms=3_000, reconnect_attempts_max=1) as client:
            client.connect()


def test_an_expired_server_certificate_is_refused(pki, tmp_path):
    expired = pki["expired"]
    process = BrokerProcess(
        str(tmp_path / "data"),
        ["--config", str(_config(tmp_path, f'tls_cert_file = "{expired.cert}"\ntls_key_file = "{expired.key}"'))],
    ).start()
    try:
        with pytest.raises(TlsFailed, match="expired"):
            _client(process, pki).connect()
    finally:
        process.stop()


def _config(directory: Path, security: str, server: str = "") -> Path:
    path = directory / "nodi.toml"
    path.write_text(f"[server]\n{server}\n[security]\n{security}\n")
    return path


# -- authentication -------------------------------------------------------------------


def test_wrong_password_unknown_user_and_no_credentials_are_refused_and_counted(secure, pki):
    before = _metrics(secure, pki)
    with _client(secure, pki, "root") as bystander:  # an open connection carries on throughout
        bystander.list_topics()
        with pytest.raises(AuthenticationFailed, match="unknown user or wrong password"):
            Client(
                secure.address,
                tls=client_tls_context(pki["ca"].file),
                user="alice",
                password="wrong",
                timeout_ms=5_000,
            ).connect()
        with pytest.raises(AuthenticationFailed, match="unknown user or wrong password"):
            Client(
                secure.address, tls=client_tls_context(pki["ca"].file), user="nobody", password="x", timeout_ms=5_000
            ).connect()
        with pytest.raises(ConnectionLost) as refused:
            with _client(secure, pki) as anonymous:
                anonymous.list_topics()
        assert refused.value.code == ErrorCode.AUTHENTICATION_REQUIRED
        bystander.list_topics()
    after = _metrics(secure, pki)
    reasons = 'nodi_authentication_refusals_total{reason="%s"}'
    assert _metric(after, reasons % "bad_credentials") - _metric(before, reasons % "bad_credentials") == 2
    assert _metric(after, reasons % "not_authenticated") - _metric(before, reasons % "not_authenticated") == 1
    for password in PASSWORDS.values():
        assert password not in after


def test_a_replayed_or_truncated_handshake_is_refused_and_closed(secure, pki):
    before = _metrics(secure, pki)
    replay = TlsRawClient(secure, pki)
    assert replay.call(m.HandshakeRequest, client_id="raw").error_code == ErrorCode.NONE
    first = replay.call(m.AuthenticateRequest, user="root", password=PASSWORDS["root"])
    assert first.error_code == ErrorCode.NONE and first.principal == "root"
    second = replay.call(m.AuthenticateRequest, user="root", password=PASSWORDS["root"])
    assert second.error_code == ErrorCode.AUTHENTICATION_FAILED
    assert replay.closed_by_server()

    truncated = TlsRawClient(secure, pki)
    frame = truncated.connection.send(m.HandshakeRequest(request_id=1, client_id="cut"))
    truncated.socket.sendall(frame[: len(frame) // 2])
    closing = truncated.next_message()  # within handshake_timeout_ms (1.5 s here)
    assert isinstance(closing, m.ClosingEvent) and closing.error_code == ErrorCode.TIMEOUT

    silent = TlsRawClient(secure, pki)  # a handshake, then no Authenticate: the same deadline
    assert silent.call(m.HandshakeRequest, client_id="silent").error_code == ErrorCode.NONE
    closing = silent.next_message()
    assert isinstance(closing, m.ClosingEvent) and closing.error_code == ErrorCode.TIMEOUT
    after = _metrics(secure, pki)
    timed_out = 'nodi_connections_timed_out_total{deadline="handshake"}'
    assert _metric(after, timed_out) - _metric(before, timed_out) == 2
    replayed = 'nodi_authentication_refusals_total{reason="replayed"}'
    assert _metric(after, replayed) - _metric(before, replayed) == 1


def test_connections_per_principal_are_limited(secure, pki):
    clients = [_client(secure, pki, "alice") for _ in range(3)]
    try:
        for client in clients:
            client.connect()
        with pytest.raises(AuthenticationFailed, match="connections_per_principal_max"):
            _client(secure, pki, "alice").connect()
    finally:
        for client in clients:
            client.close()


# -- permissions ----------------------------------------------------------------------

# (operation, target, alice may?) for alice's table in USERS_TOML.
PERMISSION_TABLE = [
    ("produce", "orders.eu", True),
    ("produce", "orders.eu.retail", True),  # orders.> takes any depth
    ("produce", "orders.secret", False),  # deny wins over orders.>
    ("produce", "payments", False),  # nothing allows it
    ("consume", "orders.eu", True),
    ("consume", "orders.eu.retail", False),  # orders.* is one token
    ("consume", "orders.eu.dlq", True),  # a dead-letter topic is granted with its topic
    ("consume", "orders.eu.retail.dlq", False),  # ... and only with it
    ("consume", "payments", False),
    ("group", "billing", True),
    ("group", "fraud", False),
    ("reset", "billing", False),  # a group reset is admin
    ("create", "scratch.a", True),
    ("create", "orders.new", False),
    ("delete", "payments", False),
    ("leases", "orders.eu", True),  # QueueLeases: consume on the topic and on the group (billing)
    ("leases", "payments", False),
]


@pytest.fixture(scope="module")
def topics(secure, pki):
    with _client(secure, pki, "root") as root:
        for name in (
            "orders.eu",
            "orders.eu.retail",
            "orders.secret",
            "orders.eu.dlq",
            "orders.eu.retail.dlq",
            "payments",
        ):
            root.create_topic(name, partitions=1)
            root.produce(name, b"seed", partition=0)
    return True


def _attempt(client: Client, operation: str, target: str) -> None:
    if operation == "produce":
        client.produce(target, b"x", partition=0)
    elif operation == "consume":
        client.fetch(target, 0, 0)
    elif operation == "group":
        client.commit_offsets(target, {("orders.eu", 0): 1})
    elif operation == "reset":
        client.reset_group(target, "orders.eu", "earliest")
    elif operation == "create":
        client.create_topic(target, partitions=1)
    elif operation == "delete":
        client.delete_topic(target)
    elif operation == "leases":
        if target == "orders.eu":  # allowed: the group exists once alice received in it
            with client.queue(target, "billing", ack_wait_ms=60_000) as queue:
                assert queue.receive(timeout_ms=10_000) is not None
                leases = client.queue_leases(target, "billing").leases
                assert (leases[0].offset, leases[0].state) == (0, "leased")  # with what the batch prefetched
        else:
            client.queue_leases(target, "billing")


@pytest.mark.parametrize(("operation", "target", "allowed"), PERMISSION_TABLE)
def test_each_permission(secure, pki, topics, operation, target, allowed):
    with _client(secure, pki, "alice") as alice:
        if allowed:
            _attempt(alice, operation, target)
        else:
            with pytest.raises(NotAuthorized, match=f"alice may not .* {target}"):
                _attempt(alice, operation, target)
            alice.list_topics()  # the connection carries on after a refusal


def test_a_superuser_may_do_everything_and_refusals_are_counted(secure, pki, topics):
    before = _metrics(secure, pki)
    with _client(secure, pki, "root") as root:
        root.produce("orders.secret", b"root may", partition=0)
        root.reset_group("fraud", "orders.eu", "earliest")
    with _client(secure, pki, "alice") as alice:  # the same requests from a user refused them
        with pytest.raises(NotAuthorized):
            alice.produce("orders.secret", b"alice may not", partition=0)
        with pytest.raises(NotAuthorized):
            alice.reset_group("fraud", "orders.eu", "earliest")
    after = _metrics(secure, pki)
    for action in ("produce", "admin"):
        series = f'nodi_not_authorized_total{{action="{action}"}}'
        assert _metric(after, series) - _metric(before, series) == 1, action


def test_the_cli_takes_tls_and_a_user(secure, pki, topics):
    environment = {
        **os.environ,
        "NODI_TLS_CA": pki["ca"].file,
        "NODI_USER": "alice",
        "NODI_PASSWORD": PASSWORDS["alice"],
    }
    base = NODI + ["--server", secure.address]
    listed = subprocess.run(base + ["topic", "list"], env=environment, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "orders.eu" in listed.stdout, listed.stderr
    refused = subprocess.run(
        base + ["topic", "create", "payments.new"], env=environment, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "NotAuthorized" in refused.stderr
    assert PASSWORDS["alice"] not in refused.stderr


# -- mutual TLS, reload, safe defaults ------------------------------------------------


def test_client_certificates_and_a_certificate_reload_on_sighup(pki, tmp_path):
    users = tmp_path / "users.toml"
    _write_users(users)
    server_cert, server_key = tmp_path / "server.pem", tmp_path / "server.key"
    server_cert.write_bytes(Path(pki["server"].cert).read_bytes())
    server_key.write_bytes(Path(pki["server"].key).read_bytes())
    security = (
        f'tls_cert_file = "{server_cert}"\ntls_key_file = "{server_key}"\n'
        f'tls_client_ca_file = "{pki["ca"].file}"\ntls_client_auth = "optional"\nusers_file = "{users}"'
    )
    process = BrokerProcess(str(tmp_path / "data"), ["--config", str(_config(tmp_path, security))]).start()
    try:
        carol_tls = client_tls_context(pki["ca"].file, pki["carol"].cert, pki["carol"].key)
        with Client(process.address, tls=carol_tls, timeout_ms=5_000) as carol:  # no password: the certificate
            with pytest.raises(NotAuthorized, match="carol may not admin"):
                carol.create_topic("orders.x")
            # The certificate changes (a new CA); SIGHUP; carol's connection carries on.
            new_ca = CertificateAuthority(tmp_path, "renewed CA")
            renewed = new_ca.issue("renewed", "renewed server", server=True)
            server_cert.write_bytes(Path(renewed.cert).read_bytes())
            server_key.write_bytes(Path(renewed.key).read_bytes())
            os.kill(process.process.pid, signal.SIGHUP)
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline:
                try:
                    with Client(
                        process.address,
                        tls=client_tls_context(new_ca.file, pki["carol"].cert, pki["carol"].key),
                        timeout_ms=3_000,
                        reconnect_attempts_max=1,
                    ) as fresh:
                        fresh.list_topics()
                    break
                except TlsFailed:
                    time.sleep(0.1)
            else:
                pytest.fail("the renewed certificate was not served after SIGHUP")
            carol.list_topics()  # the old connection was not dropped
        with pytest.raises(AuthenticationFailed):
            Client(
                process.address,
                tls=client_tls_context(new_ca.file),
                user="alice",
                password="Guessed-Pw-9",
                timeout_ms=5_000,
            ).connect()
        stranger = client_tls_context(new_ca.file, pki["stranger"].cert, pki["stranger"].key)
        with pytest.raises(ConnectFailed, match="client certificate was refused"):  # a trusted CA, no such user
            with Client(process.address, tls=stranger, timeout_ms=3_000, reconnect_attempts_max=1) as client:
                client.list_topics()
        mallory = client_tls_context(new_ca.file, pki["mallory"].cert, pki["mallory"].key)
        with pytest.raises((TlsFailed, ConnectFailed)):  # a certificate from a CA the server does not trust
            with Client(process.address, tls=mallory, timeout_ms=3_000, reconnect_attempts_max=1) as client:
                client.list_topics()
    finally:
        process.stop()
    output = "".join(process.output)
    assert "TLS certificate reloaded" in output
    assert "not authorized: carol may not admin topic orders.x" in output  # the log line names the principal
    assert "authentication refused (bad_credentials) for alice" in output
    assert "Guessed-Pw-9" not in output  # a password never reaches the log
    assert "authentication refused (certificate) for stranger" in output


def test_listening_beyond_loopback_needs_users_or_insecure_no_auth(tmp_path):
    command = NODI + ["serve", "--data-dir", str(tmp_path / "data"), "--host", "0.0.0.0", "--port", "0"]
    refused = subprocess.run(command + ["--metrics-port", "-1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in refused.stderr
    assert "--insecure-no-auth" in refused.stderr
    assert not (tmp_path / "data").exists()  # nothing was written


def test_user_commands_keep_permissions_and_never_show_hashes(tmp_path):
    users = tmp_path / "users.toml"
    _write_users(users)

    def nodi_user(*arguments: str, password: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            NODI + ["user", *arguments, "--users-file", str(users)],
            input=None if password is None else password + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert nodi_user("add", "dave", "--password-stdin", password="dave-pw").returncode == 0
    assert nodi_user("add", "dave", "--password-stdin", password="again").returncode == 1
    assert nodi_user("passwd", "alice", "--password-stdin", password="new-alice-pw").returncode == 0
    assert nodi_user("remove", "carol").returncode == 0
    listed = nodi_user("list")
    assert listed.returncode == 0 and "scrypt" not in listed.stdout
    assert "alice" in listed.stdout and "dave" in listed.stdout and "carol" not in listed.stdout
    from nodi.broker.server.users import Action, Resource, load_users

    loaded = load_users(str(users))
    assert loaded.authenticate("alice", "new-alice-pw") is not None
    assert loaded.authenticate("alice", PASSWORDS["alice"]) is None
    assert loaded.get("alice").principal.may(Action.PRODUCE, Resource.TOPIC, "orders.eu")  # kept
    assert oct(users.stat().st_mode & 0o777) == "0o600"
    assert "dave-pw" not in users.read_text()


# -- the pieces, without a server ------------------------------------------------------


def test_patterns_are_nats_style():
    from nodi.broker.server.users import check_pattern, pattern_matches
    from nodi.storage.errors import InvalidConfigError

    assert pattern_matches("orders.>", "orders.eu") and pattern_matches("orders.>", "orders.eu.retail")
    assert not pattern_matches("orders.>", "orders")
    assert pattern_matches("orders.*", "orders.eu") and not pattern_matches("orders.*", "orders.eu.retail")
    assert pattern_matches("*.audit", "billing.audit") and not pattern_matches("*.audit", "audit")
    assert pattern_matches("orders", "orders") and not pattern_matches("orders", "orders2")
    for bad in ("", "orders.", "a.>.b", "ord*", "a..b"):
        with pytest.raises(InvalidConfigError):
            check_pattern(bad)


def test_the_client_variables_are_known_to_the_server_settings():
    from nodi.broker.client.tls import CLIENT_ENVIRONMENT_VARIABLES
    from nodi.broker.server.config import OTHER_ENVIRONMENT_VARIABLES

    assert CLIENT_ENVIRONMENT_VARIABLES <= OTHER_ENVIRONMENT_VARIABLES


def test_a_password_is_not_in_a_repr():
    from nodi.broker.client.tls import Credentials

    request = m.AuthenticateRequest(request_id=1, user="alice", password="Hidden-Pw-1")
    assert "Hidden-Pw-1" not in repr(request) and "Hidden-Pw-1" not in repr(Credentials("alice", "Hidden-Pw-1"))
