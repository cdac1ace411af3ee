"""The Kafka listener under the broker's security (docs/security.md, "The Kafka
listener"), against real `nodi serve --kafka-port 0` processes.

Two brokers for the module: one with TLS and a users file (SASL_SSL: SCRAM-SHA-256/512
and PLAIN), one with a users file and no TLS (SASL_PLAINTEXT: SCRAM only, PLAIN offered
to loopback peers only when the operator opts in, which it does not here). Checked:
the confluent-kafka rows of the permission table over SCRAM (allowed and denied
produce, consume, group, admin; Metadata lists only permitted topics); kafka-python
and aiokafka with SCRAM; PLAIN over TLS; a wrong password, an unknown user, a user
without SCRAM keys, PLAIN without TLS and a request before SASL refused, the
connection closed and each refusal counted by reason; SASL with a v0 handshake (raw
tokens) by hand.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="the cryptography package makes the test CA (the dev extra has it)")
confluent_kafka = pytest.importorskip("confluent_kafka")
confluent_admin = pytest.importorskip("confluent_kafka.admin")
kafka = pytest.importorskip("kafka")
aiokafka = pytest.importorskip("aiokafka")
scramp = pytest.importorskip("scramp")

from security_certs import CertificateAuthority  # noqa: E402

from nodi.broker import client_tls_context  # noqa: E402
from nodi.broker.kafka.apis import APIS  # noqa: E402
from nodi.broker.kafka.schema import Reader, decode, encode  # noqa: E402
from nodi.broker.server.users import Users, save_users  # noqa: E402

from conftest import BrokerProcess  # noqa: E402

KAFKA_LINE = re.compile(r"nodi kafka listener on ([\d.]+):(\d+)")
TIMEOUT_S = 20
PASSWORDS = {"root": "root-Secret-1", "alice": "alice-Secret-2", "bob": "bob-Secret-3"}

# alice: produce and consume orders.*, consume in group billing, admin scratch.*.
PERMISSIONS = """
[users.alice.produce]
allow = ["orders.>"]
deny = ["orders.secret"]
[users.alice.consume]
allow = ["orders.*"]
groups_allow = ["billing"]
[users.alice.admin]
allow = ["scratch.*"]
"""


def _write_users(path: Path) -> None:
    users = Users()
    for name, password in PASSWORDS.items():
        users = users.with_password(name, password, superuser=name == "root")
    # bob as a users file written before SCRAM keys were stored: a password hash only.
    bob = users.users["bob"]
    users = Users({**users.users, "bob": type(bob)(bob.name, bob.password_hash, bob.principal, bob.tables)})
    save_users(str(path), users)
    path.write_text(path.read_text() + PERMISSIONS)


def _drain(process: BrokerProcess) -> None:
    assert process.process is not None and process.process.stdout is not None
    for line in process.process.stdout:
        process.output.append(line)


def _start(directory: Path, security: str) -> BrokerProcess:
    users = directory / "users.toml"
    _write_users(users)
    config = directory / "nodi.toml"
    config.write_text(f'[security]\nusers_file = "{users}"\nconnections_per_principal_max = 50\n{security}')
    process = BrokerProcess(
        str(directory / "data"), ["--kafka-port", "0", "--config", str(config)], metrics=True
    ).start()
    found = next(KAFKA_LINE.search(line) for line in process.output if KAFKA_LINE.search(line))
    assert found is not None  # next() yields only matches
    process.kafka = (found.group(1), int(found.group(2)))  # type: ignore[attr-defined]
    process.bootstrap = f"{found.group(1)}:{found.group(2)}"  # type: ignore[attr-defined]
    threading.Thread(target=_drain, args=(process,), daemon=True).start()
    return process


def _stop(process: BrokerProcess) -> None:
    if process.process is not None:
        process.process.terminate()
        process.process.wait(timeout=15)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory)
    return {"ca": ca, "server": ca.issue("server", "nodi test server", server=True)}


@pytest.fixture(scope="module")
def tls_broker(pki: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    server = pki["server"]
    process = _start(
        tmp_path_factory.mktemp("kafka-tls"), f'tls_cert_file = "{server.cert}"\ntls_key_file = "{server.key}"\n'
    )
    process.ca = pki["ca"].file  # type: ignore[attr-defined]
    yield process
    _stop(process)


@pytest.fixture(scope="module")
def plain_broker(tmp_path_factory):
    process = _start(tmp_path_factory.mktemp("kafka-plaintext"), "")
    yield process
    _stop(process)


def _conf(broker, user: str, mechanism: str = "SCRAM-SHA-256", password: str | None = None) -> dict:
    tls = hasattr(broker, "ca")
    conf = {
        "bootstrap.servers": broker.bootstrap,
        "security.protocol": "SASL_SSL" if tls else "SASL_PLAINTEXT",
        "sasl.mechanism": mechanism,
        "sasl.username": user,
        "sasl.password": PASSWORDS.get(user, "x") if password is None else password,
        "socket.timeout.ms": 10_000,
    }
    if tls:
        conf["ssl.ca.location"] = broker.ca
    return conf


def _metrics(broker) -> str:
    scheme, context = ("https", client_tls_context(broker.ca)) if hasattr(broker, "ca") else ("http", None)
    url = f"{scheme}://127.0.0.1:{broker.metrics_port}/metrics"
    with urllib.request.urlopen(url, context=context, timeout=5) as page:
        return page.read().decode()


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _refusals(broker, reason: str) -> float:
    return _metric(_metrics(broker), f'nodi_authentication_refusals_total{{reason="{reason}"}}')


def _create(broker, *names: str) -> None:
    admin = confluent_admin.AdminClient(_conf(broker, "root"))
    for future in admin.create_topics([confluent_admin.NewTopic(name, 1) for name in names]).values():
        future.result(TIMEOUT_S)


def _produce(broker, user: str, topic: str, mechanism: str = "SCRAM-SHA-256") -> object:
    """The delivery error of one record (None: delivered)."""
    producer = confluent_kafka.Producer({**_conf(broker, user, mechanism), "acks": "all", "message.timeout.ms": 10_000})
    results: list = []
    producer.produce(topic, b"value", on_delivery=lambda error, message: results.append(error))
    producer.flush(TIMEOUT_S)
    assert results, "no delivery report"
    return results[0]


def _consume(broker, user: str, topic: str, group: str) -> object:
    """The first message's value, or the error the consumer reports first."""
    consumer = confluent_kafka.Consumer(
        {**_conf(broker, user), "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                return message.error().code()
            return message.value()
        return None
    finally:
        consumer.close()


# -- the permission table, confluent-kafka over SASL_SSL SCRAM ---------------------------


@pytest.fixture(scope="module")
def topics(tls_broker):
    _create(tls_broker, "orders.a", "orders.secret", "payroll")
    for topic in ("orders.a", "payroll"):
        assert _produce(tls_broker, "root", topic, "SCRAM-SHA-512") is None
    return tls_broker


DENIED_TOPIC = confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED
DENIED_GROUP = confluent_kafka.KafkaError.GROUP_AUTHORIZATION_FAILED


@pytest.mark.parametrize(
    ("topic", "expected"),
    [("orders.a", None), ("orders.secret", DENIED_TOPIC), ("payroll", DENIED_TOPIC)],
    ids=["allowed", "denied-by-deny", "denied-by-no-allow"],
)
def test_produce(topics, topic, expected):
    error = _produce(topics, "alice", topic)
    assert (error if error is None else error.code()) == expected


@pytest.mark.parametrize(
    ("topic", "group", "expected"),
    [("orders.a", "billing", b"value"), ("payroll", "billing", DENIED_TOPIC), ("orders.a", "audit", DENIED_GROUP)],
    ids=["allowed", "topic-denied", "group-denied"],
)
def test_consume_in_a_group(topics, topic, group, expected):
    assert _consume(topics, "alice", topic, group) == expected


def test_admin_create_and_delete(topics):
    admin = confluent_admin.AdminClient(_conf(topics, "alice"))
    created = admin.create_topics([confluent_admin.NewTopic(name, 1) for name in ("scratch.one", "payroll2")])
    created["scratch.one"].result(TIMEOUT_S)
    with pytest.raises(confluent_kafka.KafkaException) as refused:
        created["payroll2"].result(TIMEOUT_S)
    assert refused.value.args[0].code() == DENIED_TOPIC
    deleted = admin.delete_topics(["scratch.one", "payroll"])
    deleted["scratch.one"].result(TIMEOUT_S)
    with pytest.raises(confluent_kafka.KafkaException) as refused:
        deleted["payroll"].result(TIMEOUT_S)
    assert refused.value.args[0].code() == DENIED_TOPIC
    listed = confluent_admin.AdminClient(_conf(topics, "root")).list_topics(timeout=TIMEOUT_S).topics
    assert "payroll" in listed and "scratch.one" not in listed and "payroll2" not in listed


def test_metadata_lists_only_permitted_topics(topics):
    alice = confluent_admin.AdminClient(_conf(topics, "alice")).list_topics(timeout=TIMEOUT_S).topics
    root = confluent_admin.AdminClient(_conf(topics, "root")).list_topics(timeout=TIMEOUT_S).topics
    assert {"orders.a", "orders.secret", "payroll"} <= set(root)
    assert "orders.a" in alice and "orders.secret" in alice  # may consume orders.* (not produce the secret one)
    assert "payroll" not in alice
    before = _metric(_metrics(topics), 'nodi_not_authorized_total{action="consume"}')
    named = confluent_admin.AdminClient(_conf(topics, "alice")).list_topics("payroll", timeout=TIMEOUT_S)
    assert named.topics["payroll"].error.code() == DENIED_TOPIC
    assert _metric(_metrics(topics), 'nodi_not_authorized_total{action="consume"}') > before  # librdkafka may ask again
    log = "".join(topics.output)
    assert "not authorized: alice may not produce topic orders.secret (Produce)" in log  # the principal is named


# -- the other clients, SCRAM and PLAIN ---------------------------------------------------


def test_kafka_python_with_scram_sha_512(topics):
    options = {
        "bootstrap_servers": topics.bootstrap,
        "security_protocol": "SASL_SSL",
        "ssl_cafile": topics.ca,
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "alice",
        "sasl_plain_password": PASSWORDS["alice"],
        "request_timeout_ms": 10_000,
    }
    producer = kafka.KafkaProducer(acks="all", **options)
    try:
        producer.send("orders.a", b"from kafka-python").get(timeout=TIMEOUT_S)
        with pytest.raises(kafka.errors.TopicAuthorizationFailedError):
            producer.send("payroll", b"no").get(timeout=TIMEOUT_S)
    finally:
        producer.close(timeout=5)


def test_aiokafka_with_scram_sha_256(topics):
    async def run() -> bytes:
        context = client_tls_context(topics.ca)
        options = {
            "bootstrap_servers": topics.bootstrap,
            "security_protocol": "SASL_SSL",
            "ssl_context": context,
            "sasl_mechanism": "SCRAM-SHA-256",
            "sasl_plain_username": "alice",
            "sasl_plain_password": PASSWORDS["alice"],
        }
        consumer = aiokafka.AIOKafkaConsumer("orders.a", auto_offset_reset="earliest", **options)
        await consumer.start()
        try:
            message = await asyncio.wait_for(consumer.getone(), TIMEOUT_S)
            return message.value
        finally:
            await consumer.stop()

    assert asyncio.run(run()) == b"value"


def test_plain_over_tls_and_a_user_without_scram_keys(topics):
    before = _refusals(topics, "no_scram_credentials")
    assert _produce(topics, "alice", "orders.a", "PLAIN") is None
    # bob (no SCRAM keys in the file) authenticates with PLAIN; he may produce nothing.
    assert _produce(topics, "bob", "orders.a", "PLAIN").code() == DENIED_TOPIC
    with pytest.raises(confluent_kafka.KafkaException):
        confluent_admin.AdminClient(_conf(topics, "bob")).list_topics(timeout=3)  # SCRAM: refused
    assert _refusals(topics, "no_scram_credentials") > before
    assert "run `nodi user passwd bob`" in "".join(topics.output)


# -- refusals, by hand and by client ----------------------------------------------------


class RawKafka:
    """Kafka requests over a plain socket, one at a time."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.socket = socket.create_connection(address, timeout=TIMEOUT_S)
        self.correlation = 0

    def call(self, key: int, version: int, body: dict) -> dict | None:
        api = APIS[key]
        self.correlation += 1
        parts = [struct.pack(">hhih", key, version, self.correlation, 4), b"test"]
        encode(api.request, version, body, parts)
        frame = b"".join(parts)
        self.socket.sendall(struct.pack(">i", len(frame)) + frame)
        response = self.frame()
        if response is None:
            return None
        assert struct.unpack_from(">i", response)[0] == self.correlation
        return decode(api.response, version, Reader(memoryview(response), 1000, 4))

    def token(self, data: bytes) -> bytes | None:
        """A raw SASL token (after a v0 handshake) and the server's raw answer."""
        self.socket.sendall(struct.pack(">i", len(data)) + data)
        return self.frame()

    def frame(self) -> bytes | None:
        size = self._exactly(4)
        return None if size is None else self._exactly(struct.unpack(">i", size)[0])

    def _exactly(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            chunk = self.socket.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def close(self) -> None:
        self.socket.close()


def test_a_request_before_sasl_closes_the_connection(plain_broker):
    before = _refusals(plain_broker, "not_authenticated")
    raw = RawKafka(plain_broker.kafka)
    try:
        assert raw.call(18, 2, {})["error_code"] == 0  # ApiVersions is always answered
        assert raw.call(3, 5, {"topics": None, "allow_auto_topic_creation": False}) is None  # closed, no answer
    finally:
        raw.close()
    assert _refusals(plain_broker, "not_authenticated") == before + 1
    # confluent-kafka with no SASL at all against a broker with users: never gets metadata.
    admin = confluent_admin.AdminClient({"bootstrap.servers": plain_broker.bootstrap})
    with pytest.raises(confluent_kafka.KafkaException):
        admin.list_topics(timeout=3)


def test_plain_without_tls_is_not_offered(plain_broker):
    before = _refusals(plain_broker, "mechanism")
    raw = RawKafka(plain_broker.kafka)
    try:
        answer = raw.call(17, 1, {"mechanism": "PLAIN"})
        assert answer["error_code"] == 33  # UNSUPPORTED_SASL_MECHANISM
        assert answer["mechanisms"] == ["SCRAM-SHA-256", "SCRAM-SHA-512"]
        assert raw.frame() is None  # and closed
    finally:
        raw.close()
    assert _refusals(plain_broker, "mechanism") == before + 1


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("nobody", "whatever")])
def test_wrong_password_and_unknown_user_are_refused_alike(plain_broker, user, password):
    before = _refusals(plain_broker, "bad_credentials")
    raw = RawKafka(plain_broker.kafka)
    try:
        assert raw.call(17, 1, {"mechanism": "SCRAM-SHA-256"})["error_code"] == 0
        client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
        first = raw.call(36, 1, {"auth_bytes": client.get_client_first().encode()})
        assert first["error_code"] == 0
        client.set_server_first(bytes(first["auth_bytes"]).decode())
        final = raw.call(36, 1, {"auth_bytes": client.get_client_final().encode()})
        assert final["error_code"] == 58  # SASL_AUTHENTICATION_FAILED
        assert "unknown user, wrong password" in final["error_message"]
        assert raw.frame() is None  # closed
    finally:
        raw.close()
    assert _refusals(plain_broker, "bad_credentials") == before + 1


def test_scram_with_a_v0_handshake_and_raw_tokens(plain_broker):
    raw = RawKafka(plain_broker.kafka)
    try:
        assert raw.call(17, 0, {"mechanism": "SCRAM-SHA-512"})["error_code"] == 0
        client = scramp.ScramClient(["SCRAM-SHA-512"], "alice", PASSWORDS["alice"])
        server_first = raw.token(client.get_client_first().encode())
        assert server_first is not None
        client.set_server_first(server_first.decode())
        server_final = raw.token(client.get_client_final().encode())
        assert server_final is not None
        client.set_server_final(server_final.decode())  # the server proved it knows the keys
        metadata = raw.call(3, 5, {"topics": None, "allow_auto_topic_creation": False})
        assert metadata is not None and metadata["brokers"]
    finally:
        raw.close()


def test_kafka_python_scram_over_plaintext_and_the_safe_host_rule(plain_broker, tmp_path):
    producer = kafka.KafkaProducer(
        bootstrap_servers=plain_broker.bootstrap,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_plain_username="root",
        sasl_plain_password=PASSWORDS["root"],
        acks="all",
    )
    try:
        producer.send("plain.topic", b"v").get(timeout=TIMEOUT_S)  # root may auto-create
    finally:
        producer.close(timeout=5)
    # Without users, the Kafka listener's own host beyond loopback is refused too.
    config = tmp_path / "nodi.toml"
    config.write_text('[kafka]\nhost = "0.0.0.0"\n')
    process = BrokerProcess(str(tmp_path / "data"), ["--kafka-port", "0", "--config", str(config)])
    with pytest.raises(RuntimeError, match="refusing to listen on 0.0.0.0 without authentication"):
        process.start()


# -- the users file's SCRAM keys ---------------------------------------------------------


def test_scram_keys_are_stored_old_files_load_and_passwd_adds_them(tmp_path):
    from nodi.broker.server.users import hash_password, load_users, parse_scram
    from nodi.storage.errors import InvalidConfigError

    path = tmp_path / "users.toml"
    path.write_text(
        f'[users.old]\npassword = "{hash_password("old-Secret-1")}"\n[users.old.produce]\nallow = ["a.>"]\n'
    )
    old = load_users(str(path)).users["old"]
    assert old.scram == {} and old.principal.may(*_produce_a())  # a file from before SCRAM keys: read as it is
    updated = load_users(str(path)).with_password("old", "new-Secret-2")  # what `nodi user passwd` does
    save_users(str(path), updated)
    text = path.read_text()
    assert "new-Secret-2" not in text and "scram_sha_256 = " in text and "scram_sha_512 = " in text
    again = load_users(str(path)).users["old"]
    assert set(again.scram) == {"SCRAM-SHA-256", "SCRAM-SHA-512"} and again.principal.may(*_produce_a())
    salt, stored_key, server_key, iterations = parse_scram(again.scram["SCRAM-SHA-256"])
    assert iterations == 4096 and len(stored_key) == len(server_key) == 32 and salt
    for bad in ("4096$not base64!$a$b", "12$YQ==$YQ==$YQ==", "nonsense"):
        with pytest.raises(InvalidConfigError):
            parse_scram(bad)
    path.write_text('[users.x]\nscram_sha_256 = "1$2"\n')
    with pytest.raises(InvalidConfigError, match="user x"):
        load_users(str(path))


def _produce_a():
    from nodi.broker.server.users import Action, Resource

    return Action.PRODUCE, Resource.TOPIC, "a.b"


# -- the certificate reload ---------------------------------------------------------------


def test_the_kafka_listener_takes_a_new_certificate_on_sighup_and_open_connections_carry_on(pki, tmp_path):
    import os
    import signal
    import ssl

    server_cert, server_key = tmp_path / "server.pem", tmp_path / "server.key"
    server_cert.write_bytes(Path(pki["server"].cert).read_bytes())
    server_key.write_bytes(Path(pki["server"].key).read_bytes())
    process = _start(tmp_path, f'tls_cert_file = "{server_cert}"\ntls_key_file = "{server_key}"\n')
    process.ca = pki["ca"].file
    try:
        before = confluent_kafka.Producer({**_conf(process, "root"), "acks": "all"})
        before.produce("reload.a", b"before")
        assert before.flush(TIMEOUT_S) == 0
        new_ca = CertificateAuthority(tmp_path, "renewed CA")
        renewed = new_ca.issue("renewed", "renewed server", server=True)
        server_cert.write_bytes(Path(renewed.cert).read_bytes())
        server_key.write_bytes(Path(renewed.key).read_bytes())
        os.kill(process.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # a new connection is handed the renewed certificate once the reload ran
            try:
                with socket.create_connection(process.kafka, timeout=5) as plain:
                    with client_tls_context(new_ca.file).wrap_socket(plain, server_hostname="127.0.0.1"):
                        break
            except ssl.SSLError:
                assert time.monotonic() < deadline, "the Kafka listener kept the old certificate"
                time.sleep(0.1)
        with pytest.raises(ssl.SSLError):  # and the old CA no longer verifies it
            with socket.create_connection(process.kafka, timeout=5) as plain:
                client_tls_context(pki["ca"].file).wrap_socket(plain, server_hostname="127.0.0.1")
        before.produce("reload.a", b"after")  # the connection opened before the reload carries on
        assert before.flush(TIMEOUT_S) == 0
        renewed_conf = {**_conf(process, "root", "SCRAM-SHA-512"), "ssl.ca.location": new_ca.file}
        listed = confluent_admin.AdminClient(renewed_conf).list_topics(timeout=TIMEOUT_S).topics
        assert "reload.a" in listed
    finally:
        _stop(process)
