"""The web console's security (issue 14's share of issue 16, docs/console.md "Security")
against a real `nodi serve` with TLS from a CA made here and a users file: the sign-in
form, session cookies, form tokens, and each permission row allowed and denied on the
console's pages and writes, with the refusal's 403 page, log line and metric. A second
broker with a short session idle limit: an idle session ends, and failed sign-ins from
one address are limited. The start rule: --console-host beyond loopback without users
refuses to start."""

from __future__ import annotations

import contextlib
import html
import http.client
import os
import re
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="the cryptography package makes the test CA (the dev extra has it)")

from security_certs import CertificateAuthority  # noqa: E402

from nodi.broker import Client, client_tls_context  # noqa: E402

from conftest import NODI, BrokerProcess  # noqa: E402
from test_console import free_port, wait_until  # noqa: E402

TIMEOUT_S = 30
PASSWORDS = {"root": "root-Secret-1", "alice": "alice-Secret-2", "bob": "bob-Secret-3", "carol": "carol-Secret-4"}
# alice: reads orders.*, runs and resets the billing group, works the queue group
# workers, redrives dead letters (the nodi.dlq cursor group) back to orders.*.
# bob: reads orders.eu only, in the group audit, may reset nothing.
# carol: writes orders.eu and administers the queue group workers, consumes nothing.
USERS_TOML = """
[users.root]
password = "{root}"
superuser = true

[users.alice]
password = "{alice}"
[users.alice.produce]
allow = ["orders.*"]
[users.alice.consume]
allow = ["orders.*"]
groups_allow = ["billing", "workers", "nodi.dlq"]
[users.alice.admin]
groups_allow = ["billing"]

[users.bob]
password = "{bob}"
[users.bob.consume]
allow = ["orders.eu"]
groups_allow = ["audit"]

[users.carol]
password = "{carol}"
[users.carol.produce]
allow = ["orders.eu"]
[users.carol.admin]
groups_allow = ["workers"]
"""


def _write_users(path: Path) -> None:
    from nodi.broker.server.users import hash_password

    path.write_text(USERS_TOML.format(**{name: hash_password(password) for name, password in PASSWORDS.items()}))


@dataclass
class Answer:
    status: int
    text: str
    headers: http.client.HTTPMessage

    def form_token(self) -> str:
        found = re.search(r'name="token" value="([^"]+)"', self.text)
        assert found, self.text
        return found.group(1)

    def error(self) -> str:
        found = re.search(r'id="error">(.*?)</p>', self.text, re.S)
        return html.unescape(found.group(1)) if found else ""

    def rows(self, table_id: str) -> list[str]:
        """The first cell's text of each body row of a table."""
        found = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody></table>', self.text, re.S)
        assert found, f"no table {table_id} in {self.text[:400]}"
        cells = re.findall(r"<tr><td([^>]*)>(.*?)</td>", found.group(1), re.S)
        return [html.unescape(re.sub(r"<[^>]+>", "", cell)).strip() for kind, cell in cells if "empty" not in kind]


class Browser:
    """An HTTPS client that keeps the session cookie and follows no redirects."""

    def __init__(self, port: int, ca_file: str | None, tls: bool = True) -> None:
        self.port = port
        self.context = client_tls_context(ca_file) if tls else None
        self.cookie: str | None = None
        self.set_cookie_headers: list[str] = []

    def request(self, path: str, form: dict | None = None) -> Answer:
        if self.context is not None:
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                "127.0.0.1", self.port, context=self.context, timeout=TIMEOUT_S
            )
        else:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
        headers = {"host": f"127.0.0.1:{self.port}"}
        if self.cookie:
            headers["cookie"] = self.cookie
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["content-type"] = "application/x-www-form-urlencoded"
        try:
            connection.request("POST" if form is not None else "GET", path, body=body, headers=headers)
            response = connection.getresponse()
            answer = Answer(response.status, response.read().decode(), response.headers)
        finally:
            connection.close()
        for value in answer.headers.get_all("set-cookie") or []:
            self.set_cookie_headers.append(value)
            pair = value.split(";", 1)[0]
            self.cookie = None if pair.endswith("=") else pair
        return answer

    def login(self, user: str, password: str | None = None) -> Answer:
        page = self.request("/login")
        assert page.status == 200, page.text
        return self.request(
            "/login", {"user": user, "password": password or PASSWORDS[user], "token": page.form_token(), "next": "/"}
        )


_readers: dict[int, threading.Thread] = {}


def _read_output(process: BrokerProcess, stream) -> None:
    with contextlib.suppress(ValueError, OSError):  # the stream closed by stop() or kill()
        for line in stream:
            process.output.append(line)


def read_log(process: BrokerProcess, pattern: str) -> str:
    """Wait for a line of the broker's output (stdout and stderr) matching `pattern`; a
    thread reads the output into process.output (the pipe never fills)."""
    assert process.process is not None and process.process.stdout is not None
    if process.process.pid not in _readers:
        reader = threading.Thread(target=_read_output, args=(process, process.process.stdout), daemon=True)
        _readers[process.process.pid] = reader
        reader.start()
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for line in list(process.output):
            if re.search(pattern, line):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r} in:\n" + "".join(process.output[-40:]))


def metric(process: BrokerProcess, ca_file: str, name: str, label: str) -> float:
    context = client_tls_context(ca_file)
    connection = http.client.HTTPSConnection("127.0.0.1", process.metrics_port, context=context, timeout=TIMEOUT_S)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    found = re.search(rf"^{name}\{{{label}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _config(directory: Path, pki: dict, users: Path, extra: str = "") -> Path:
    path = directory / "nodi.toml"
    path.write_text(
        f"[server]\n{extra}"
        f'[security]\ntls_cert_file = "{pki["server"].cert}"\ntls_key_file = "{pki["server"].key}"\n'
        f'users_file = "{users}"\n'
    )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory)
    return {"ca": ca, "server": ca.issue("server", "nodi test server", server=True)}


def _start(directory: Path, pki: dict, extra: str = "") -> tuple[BrokerProcess, int]:
    users = directory / "users.toml"
    _write_users(users)
    config = _config(directory, pki, users, extra)
    for attempt in range(2):
        port = free_port()
        process = BrokerProcess(
            str(directory / "data"), ["--config", str(config), "--console-port", str(port)], metrics=True
        )
        try:
            return process.start(), port
        except RuntimeError:
            if attempt:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def console(pki, tmp_path_factory):
    """A broker with data: orders.eu (a queue group workers with dead letters in
    orders.eu.dlq, stream groups billing and audit), orders.us, and secret.x (group hr)."""
    directory = tmp_path_factory.mktemp("console-security")
    process, port = _start(directory, pki)
    tls = client_tls_context(pki["ca"].file)
    with Client(process.address, tls=tls, user="root", password=PASSWORDS["root"], timeout_ms=10_000) as client:
        for name in ("orders.eu", "orders.us", "secret.x"):
            client.create_topic(name, partitions=1)
            for number in range(5):
                client.produce(name, f"{name} message {number}".encode(), partition=0)
        client.commit_offsets("billing", {("orders.eu", 0): 2})
        client.commit_offsets("audit", {("orders.eu", 0): 1})
        client.commit_offsets("hr", {("secret.x", 0): 1})
        with client.queue("orders.eu", "workers", batch_max=10) as queue:
            for _ in range(2):
                message = queue.receive(timeout_ms=20_000)
                message.reject("bad input")
        wait_until(lambda: client.describe_queue("orders.eu", "workers").dead_lettered == 2, "2 dead letters")
    yield process, port, pki["ca"].file
    if process.process is not None:
        process.stop()


def test_signing_in_over_tls_sets_a_secure_http_only_strict_cookie_and_signing_out_ends_the_session(console) -> None:
    process, port, ca = console
    browser = Browser(port, ca)
    first = browser.request("/")
    assert first.status == 303 and first.headers["location"].startswith("/login?next=")
    signed_in = browser.login("alice")
    assert signed_in.status == 303 and signed_in.headers["location"] == "/"
    cookie = browser.set_cookie_headers[-1]
    for attribute in ("HttpOnly", "SameSite=Strict", "Secure", "Path=/"):
        assert attribute in cookie
    assert PASSWORDS["alice"] not in cookie
    overview = browser.request("/")
    assert overview.status == 200 and 'id="user">alice<' in overview.text
    assert PASSWORDS["alice"] not in overview.text
    old_cookie = browser.cookie
    assert browser.request("/logout", {"token": overview.form_token()}).status == 303
    assert browser.cookie is None
    browser.cookie = old_cookie  # the ended session's cookie is worth nothing
    assert browser.request("/").status == 303
    read_log(process, r"console: alice signed in from 127\.0\.0\.1")


def test_plain_http_to_the_tls_console_gets_no_page(console) -> None:
    _process, port, _ca = console
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        Browser(port, None, tls=False).request("/login")


def test_a_wrong_password_or_an_unknown_user_is_refused_and_counted(console) -> None:
    process, port, ca = console
    before = metric(process, ca, "nodi_authentication_refusals_total", 'reason="bad_credentials"')
    for user, password in (("alice", "not-her-password"), ("nobody", "whatever")):
        browser = Browser(port, ca)
        answer = browser.login(user, password)
        assert answer.status == 401 and answer.error() == "unknown user or wrong password"
        assert browser.cookie is None and browser.request("/").status == 303
    assert metric(process, ca, "nodi_authentication_refusals_total", 'reason="bad_credentials"') == before + 2
    line = read_log(process, r"authentication refused \(bad_credentials\) for nobody")
    assert "whatever" not in "".join(process.output) and "not-her-password" not in line


def test_a_post_without_the_sessions_form_token_or_with_a_wrong_one_is_refused(console) -> None:
    _process, port, ca = console
    browser = Browser(port, ca)
    browser.login("alice")
    form = {"name": "billing", "topic": "orders.eu", "to": "earliest", "confirm": "yes"}
    for token in (None, "forged-token", Browser(port, ca).request("/login").form_token()):
        answer = browser.request("/group/reset", form if token is None else {**form, "token": token})
        assert answer.status == 403 and "stale or from elsewhere" in answer.error()
    other = Browser(port, ca)
    other.login("alice")
    theirs = other.request("/group?name=billing").form_token()
    answer = browser.request("/group/reset", {**form, "token": theirs})  # another session's token
    assert answer.status == 403
    group = browser.request("/group?name=billing")
    assert "<td>2</td>" in group.text  # billing's committed offset unchanged
    assert Browser(port, ca).request("/login", {"user": "alice", "password": PASSWORDS["alice"]}).status == 403


# (user, path, allowed): each permission row of the console, allowed and denied.
PAGE_ROWS = [
    ("alice", "/topic?name=orders.eu", True),
    ("alice", "/topic?name=secret.x", False),  # no permission on the topic
    ("root", "/topic?name=secret.x", True),
    ("alice", "/messages?topic=orders.us&partition=0&offset=0", True),
    ("bob", "/messages?topic=orders.eu&partition=0&offset=0", True),
    ("bob", "/messages?topic=orders.us&partition=0&offset=0", False),  # consume needed
    ("alice", "/messages?topic=secret.x&partition=0&offset=0", False),
    ("alice", "/group?name=billing", True),
    ("alice", "/group?name=hr", False),
    ("bob", "/group?name=audit", True),
    ("bob", "/group?name=billing", False),
    ("alice", "/queue?topic=orders.eu&group=workers", True),
    ("bob", "/queue?topic=orders.eu&group=workers", False),
    ("alice", "/dead-letter?topic=orders.eu.dlq", True),
    ("alice", "/dead-letters", True),
    ("bob", "/dead-letter?topic=orders.eu.dlq", False),  # the nodi.dlq cursor group
    ("bob", "/dead-letters", False),
]


@pytest.mark.parametrize(("user", "path", "allowed"), PAGE_ROWS)
def test_each_page_needs_its_permission(console, user: str, path: str, allowed: bool) -> None:
    process, port, ca = console
    browser = Browser(port, ca)
    browser.login(user)
    before = metric(process, ca, "nodi_not_authorized_total", 'action="consume"')
    answer = browser.request(path)
    if allowed:
        assert answer.status == 200, answer.text
        assert metric(process, ca, "nodi_not_authorized_total", 'action="consume"') == before
    else:
        assert answer.status == 403, answer.text
        assert answer.error().startswith(f"{user} may not consume ")
        assert metric(process, ca, "nodi_not_authorized_total", 'action="consume"') == before + 1
        read_log(process, rf"not authorized: {user} may not consume .*\(console ")


def test_lists_show_only_what_the_principal_may_see(console) -> None:
    _process, port, ca = console
    seen = {}
    for user in ("root", "alice", "bob"):
        browser = Browser(port, ca)
        browser.login(user)
        seen[user] = (
            set(browser.request("/").rows("topics")),
            set(browser.request("/groups").rows("groups")),
            set(browser.request("/queues").rows("queues")),
        )
    assert seen["root"][0] >= {"orders.eu", "orders.us", "orders.eu.dlq", "secret.x"}
    assert seen["alice"][0] == {"orders.eu", "orders.us", "orders.eu.dlq"}
    assert seen["bob"][0] == {"orders.eu", "orders.eu.dlq"}
    assert seen["root"][1] >= {"billing", "audit", "hr"}
    assert seen["alice"][1] == {"billing"} and seen["bob"][1] == {"audit"}
    assert seen["alice"][2] == {"workers"} and seen["bob"][2] == set()


def test_a_queue_groups_in_flight_list_needs_consume_on_the_group_and_topic(console) -> None:
    process, port, ca = console
    alice = Browser(port, ca)
    alice.login("alice")
    page = alice.request("/queue?topic=orders.eu&group=workers")
    assert page.status == 200 and 'id="queue-leases"' in page.text
    carol = Browser(port, ca)
    carol.login("carol")  # may see the page (produce on the topic, admin on the group), not consume
    page = carol.request("/queue?topic=orders.eu&group=workers")
    assert page.status == 200 and 'id="queue-partitions"' in page.text
    assert 'id="queue-leases"' not in page.text and "needs consume on the group and on the topic" in page.text


def test_a_group_reset_needs_admin_on_the_group(console) -> None:
    process, port, ca = console
    bob = Browser(port, ca)
    bob.login("bob")
    token = bob.request("/group?name=audit").form_token()
    before = metric(process, ca, "nodi_not_authorized_total", 'action="admin"')
    form = {"name": "audit", "topic": "orders.eu", "to": "latest", "token": token}
    for confirm in ("", "yes"):  # refused before the confirmation page, and on confirming
        answer = bob.request("/group/reset", {**form, "confirm": confirm})
        assert answer.status == 403 and answer.error() == "bob may not admin group audit"
    assert metric(process, ca, "nodi_not_authorized_total", 'action="admin"') == before + 2
    read_log(process, r"not authorized: bob may not admin group audit \(console group\.reset\)")
    assert "<td>1</td>" in bob.request("/group?name=audit").text  # unchanged

    alice = Browser(port, ca)
    alice.login("alice")
    token = alice.request("/group?name=billing").form_token()
    form = {"name": "billing", "topic": "orders.eu", "to": "offset", "value": "3", "token": token}
    assert "Reset group" in alice.request("/group/reset", form).text
    done = alice.request("/group/reset", {**form, "confirm": "yes"})
    assert done.status == 200 and "reset to offset 3" in done.text
    read_log(process, r"console: group\.reset on billing@orders\.eu by alice from 127\.0\.0\.1")


def test_dead_letters_redrive_and_purge_need_what_the_dlq_commands_need(console) -> None:
    process, port, ca = console
    bob = Browser(port, ca)
    bob.login("bob")
    answer = bob.request("/dead-letter/purge", {"topic": "orders.eu.dlq", "token": bob.request("/").form_token()})
    assert answer.status == 403
    alice = Browser(port, ca)
    alice.login("alice")
    token = alice.request("/dead-letter?topic=orders.eu.dlq").form_token()
    refused = alice.request(
        "/dead-letter/redrive", {"topic": "orders.eu.dlq", "to": "secret.x", "count": "1", "token": token}
    )
    assert refused.status == 403 and refused.error() == "alice may not produce topic secret.x"
    done = alice.request(
        "/dead-letter/redrive", {"topic": "orders.eu.dlq", "count": "1", "token": token, "confirm": "yes"}
    )
    assert done.status == 200 and "redrove 1 message(s)" in done.text, done.text
    read_log(process, r"console: dead-letters\.redrive on orders\.eu\.dlq by alice")


def test_an_idle_session_ends_and_failed_sign_ins_are_limited_per_address(pki, tmp_path) -> None:
    process, port = _start(tmp_path, pki, "console_session_idle_ms = 1000\n")
    try:
        browser = Browser(port, pki["ca"].file)
        browser.login("alice")
        assert browser.request("/").status == 200
        time.sleep(1.5)  # past the idle limit
        assert browser.request("/").status == 303
        from nodi.broker.console.sessions import DEFAULT_SESSION_LIMITS

        for _ in range(DEFAULT_SESSION_LIMITS.login_attempts_max):
            assert Browser(port, pki["ca"].file).login("alice", "wrong").status == 401
        limited = Browser(port, pki["ca"].file).login("alice")  # the right password, too late
        assert limited.status == 429 and "too many failed sign-ins" in limited.error()
        read_log(process, r"console: sign-in refused: 127\.0\.0\.1 failed too often")
    finally:
        process.stop()


def test_console_host_beyond_loopback_without_users_refuses_to_start(tmp_path) -> None:
    result = subprocess.run(
        NODI
        + ["serve", "--data-dir", str(tmp_path / "data"), "--port", "0", "--metrics-port", "-1"]
        + ["--console-port", str(free_port()), "--console-host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODI_CONSOLE_PORT": ""},
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in result.stderr
    assert not (tmp_path / "data").exists()


def test_sessions_end_when_idle_or_old_and_the_table_is_bounded() -> None:
    from nodi.broker.console.sessions import SessionLimits, Sessions

    now = [0.0]
    sessions = Sessions(SessionLimits(sessions_max=2, session_idle_ms=1_000, session_lifetime_ms=5_000), lambda: now[0])
    first, _ = sessions.create("alice")
    now[0] = 0.9
    assert sessions.get(first) is not None  # used: idle time starts again
    now[0] = 1.8
    assert sessions.get(first) is not None
    now[0] = 2.9
    assert sessions.get(first) is None and sessions.sessions_expired == 1
    kept, _ = sessions.create("alice")
    for step in range(1, 8):
        now[0] = 2.9 + step * 0.9
        found = sessions.get(kept)
        assert (found is not None) == (step * 0.9 <= 5.0)
    a, _ = sessions.create("a")
    b, _ = sessions.create("b")
    c, _ = sessions.create("c")
    assert len(sessions) == 2 and sessions.get(a) is None and sessions.sessions_evicted >= 1
    assert sessions.get(b) is not None and sessions.get(c) is not None
    assert sessions.get("") is None and sessions.get("forged") is None
