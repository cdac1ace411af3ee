"""The web console (issue 16, docs/console.md) over plain HTTP against a real `nodi serve`
with data: each page's content, the message browser by offset, time and key with paging,
a group reset and a dead-letter redrive and purge through their confirmation forms, bad
input refused with a clear status, and a page over a 1 GiB partition that reads a few
megabytes of it (the server process's read bytes, from /proc)."""

from __future__ import annotations

import html
import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import pytest

from nodi.broker import Client, QueueMessage
from nodi.broker.client.errors import UnknownQueueGroup

from conftest import NODI, BrokerProcess

TIMEOUT_S = 30
# Base time of the browsed messages: 2026-01-01T00:00:00Z, one second apart.
BASE_TIME_MS = 1_767_225_600_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_with_console(data_dir: str) -> tuple[BrokerProcess, int]:
    """A broker with its console on a free port (a second try if the port was taken meanwhile)."""
    for attempt in range(2):
        port = free_port()
        try:
            return BrokerProcess(data_dir, ["--console-port", str(port)]).start(), port
        except RuntimeError:
            if attempt:
                raise
    raise AssertionError("unreachable")


@dataclass
class Answer:
    status: int
    text: str

    def token(self) -> str:
        found = re.search(r'name="token" value="([^"]+)"', self.text)
        assert found, self.text
        return found.group(1)

    def table(self, table_id: str) -> list[list[str]]:
        """The cells' text of each body row of the table with this id."""
        found = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody></table>', self.text, re.S)
        assert found, f"no table {table_id}"
        rows = re.findall(r"<tr>(.*?)</tr>", found.group(1), re.S)
        return [
            [
                html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
                for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
            ]
            for row in rows
        ]


def request(port: int, path: str, form: dict | None = None, headers: dict | None = None) -> Answer:
    data = None if form is None else urllib.parse.urlencode(form).encode()
    message = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(message, timeout=TIMEOUT_S) as response:
            return Answer(response.status, response.read().decode())
    except urllib.error.HTTPError as error:
        return Answer(error.code, error.read().decode())


def raw(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the console answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def fill(client: Client) -> None:
    """orders (2 partitions, 40 messages: JSON, text and binary values, keys k0-k9,
    timestamps BASE_TIME_MS + i s), stream group `billing` committed at 10 and 5,
    queue group `workers` on jobs with 3 rejected messages in jobs.dlq."""
    client.create_topic("orders", partitions=2)
    for index in range(40):
        if index % 3 == 0:
            value = b'{"order": %d, "note": "<b>bold</b>"}' % index
        elif index % 3 == 1:
            value = b"plain order %d" % index
        else:
            value = bytes([0, 1, 2, 255, index])
        client.produce(
            "orders",
            value,
            key=b"k%d" % (index % 10),
            partition=0 if index < 30 else 1,
            headers={"trace": b"t%d" % index},
            timestamp=BASE_TIME_MS + index * 1000,
        )
    for (topic, partition), error in client.commit_offsets("billing", {("orders", 0): 10, ("orders", 1): 5}).items():
        assert error is None, (topic, partition, error)
    dead_letters(client, "jobs", "workers", 3)


def dead_letters(client: Client, topic: str, group: str, count: int) -> None:
    """`count` messages on a new `topic`, rejected by queue group `group` into `topic`.dlq."""
    client.create_topic(topic)
    for index in range(count):
        client.produce(topic, b"job %d" % index, key=b"j%d" % index)
    with client.queue(topic, group, batch_max=10) as queue:
        for _ in range(count):
            message = queue.receive(timeout_ms=20_000)
            assert message is not None and message.value is not None
            message.reject(f"cannot do {message.value.decode()}")
    wait_until(lambda: client.describe_queue(topic, group).dead_lettered == count, f"{count} dead letters")


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    process, port = start_with_console(str(tmp_path_factory.mktemp("console") / "data"))
    with Client(process.address) as client:
        fill(client)
    yield process, port
    if process.process is not None:
        process.stop()


def test_each_page_shows_the_brokers_data(console) -> None:
    process, port = console
    overview = request(port, "/")
    assert overview.status == 200
    topics = {row[0]: row for row in overview.table("topics")}
    assert topics["orders"][1:3] == ["2", "40"] and "jobs.dlq" in topics
    assert "uptime" in overview.text and "connections open" in overview.text

    topic = request(port, "/topic?name=orders")
    assert [row[:4] for row in topic.table("partitions")] == [["0", "0", "30", "30"], ["1", "0", "10", "10"]]
    assert ["billing", "empty", "0", "25"] in topic.table("stream-groups")
    assert "fsync_policy" in topic.text

    groups = request(port, "/groups")
    assert ["billing", "empty", "0", "orders", "25"] in groups.table("groups")
    group = request(port, "/group?name=billing")
    assert [row[:5] for row in group.table("lags")] == [
        ["orders", "0", "10", "30", "20"],
        ["orders", "1", "5", "10", "5"],
    ]

    queues = request(port, "/queues")
    assert ["workers", "jobs", "0", "0", "0", "jobs.dlq"] in queues.table("queues")
    queue = request(port, "/queue?topic=jobs&group=workers")
    assert queue.table("queue-partitions")[0][:2] == ["0", "3"] and "max deliveries" in queue.text

    letters = request(port, "/dead-letters")
    assert ["jobs.dlq", "3", "3", "workers@jobs"] in letters.table("dead-letter-topics")
    entries = request(port, "/dead-letter?topic=jobs.dlq").table("dead-letters")
    assert [row[2:6] for row in entries] == [[f"jobs-0@{index}", "workers", "rejected", "1"] for index in range(3)]
    assert entries[0][6] == "cannot do job 0"


def test_a_queue_groups_leases_and_retries_are_listed_paged_in_the_client_cli_and_console(console) -> None:
    process, port = console
    with Client(process.address) as client:
        client.create_topic("chores", partitions=2)
        for index in range(5):
            client.produce("chores", b"chore %d" % index, partition=0 if index < 3 else 1)
        with client.queue("chores", "crew", ack_wait_ms=600_000, backoff=[600_000], batch_max=5) as queue:
            received: list[QueueMessage] = []
            while len(received) < 5:
                message = queue.receive(timeout_ms=20_000)
                assert message is not None
                received.append(message)
            failed = next(message for message in received if (message.partition, message.offset) == (0, 1))
            failed.nack(error="db <down>")
            now_ms = time.time() * 1000

            first = client.queue_leases("chores", "crew", limit=3)
            assert first.more and first.next_after == (0, 2)
            second = client.queue_leases("chores", "crew", limit=3, after=first.next_after)
            assert not second.more and second.next_after is None
            leases = first.leases + second.leases
            assert [(lease.partition, lease.offset) for lease in leases] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
            waiting = leases[1]
            assert (waiting.state, waiting.delivery_count, waiting.last_error) == ("waiting", 1, "db <down>")
            assert waiting.not_before_ms > now_ms and waiting.lease_deadline_ms is None
            for lease in leases[:1] + leases[2:]:
                assert (lease.state, lease.delivery_count, lease.not_before_ms) == ("leased", 1, None)
                assert lease.lease_deadline_ms > now_ms and lease.last_delivery_ms <= now_ms
            only = client.queue_leases("chores", "crew", partition=1)
            assert [(lease.partition, lease.offset) for lease in only.leases] == [(1, 0), (1, 1)]
            with pytest.raises(UnknownQueueGroup):
                client.queue_leases("chores", "nobody")

            page = request(port, "/queue?topic=chores&group=crew")
            rows = page.table("queue-leases")
            assert [row[:4] for row in rows] == [
                ["0", "0", "leased", "1"],
                ["0", "1", "waiting", "1"],
                ["0", "2", "leased", "1"],
                ["1", "0", "leased", "1"],
                ["1", "1", "leased", "1"],
            ]
            assert rows[1][4] == "-" and rows[1][5].endswith("Z") and rows[1][7] == "db <down>"
            assert "db &lt;down&gt;" in page.text  # escaped
            later = request(port, "/queue?topic=chores&group=crew&after_partition=0&after_offset=2")
            assert [row[:2] for row in later.table("queue-leases")] == [["1", "0"], ["1", "1"]]
            assert request(port, "/queue?topic=chores&group=crew&after_partition=x").status == 400

            shown = subprocess.run(
                NODI + ["--server", process.address, "queue", "describe", "chores", "crew", "--leases", "2", "--json"],
                capture_output=True,
                timeout=TIMEOUT_S * 2,
                stdin=subprocess.DEVNULL,
            )
            assert shown.returncode == 0, shown.stderr
            described = json.loads(shown.stdout)
            assert [(lease["partition"], lease["offset"], lease["state"]) for lease in described["leases"]] == [
                (0, 0, "leased"),
                (0, 1, "waiting"),
            ]
            assert described["more_leases"] is True


def test_the_browser_pages_by_offset_time_and_key(console) -> None:
    _, port = console
    latest = request(port, "/messages?topic=orders&partition=0&count=5")
    assert [row[0] for row in latest.table("messages")] == ["25", "26", "27", "28", "29"]
    assert "offset=20" in latest.text  # older

    page = request(port, "/messages?topic=orders&partition=0&offset=3&count=5")
    rows = page.table("messages")
    assert [row[0] for row in rows] == ["3", "4", "5", "6", "7"]
    assert rows[0][1] == "2026-01-01T00:00:03.000Z"
    assert "offset=8" in page.text and "offset=0" in page.text  # newer, older

    by_time = request(
        port, "/messages?" + urllib.parse.urlencode({"topic": "orders", "time": "2026-01-01T00:00:12Z", "count": "2"})
    )
    assert [row[0] for row in by_time.table("messages")] == ["12", "13"]
    by_ms = request(port, f"/messages?topic=orders&time={BASE_TIME_MS + 12_500}&count=1")
    assert [row[0] for row in by_ms.table("messages")] == ["13"]

    by_key = request(port, "/messages?topic=orders&partition=0&key=k7")
    assert [row[0] for row in by_key.table("messages")] == ["7", "17", "27"]
    assert "searched offsets 0 to 29" in html.unescape(by_key.text)
    first_two = request(port, "/messages?topic=orders&partition=0&key=k7&count=2")
    assert [row[0] for row in first_two.table("messages")] == ["7", "17"]
    assert "key=k7" in first_two.text and "offset=18" in first_two.text  # search on from 18


def test_values_show_as_json_text_or_hex_and_reserved_headers_are_explained(console) -> None:
    _, port = console
    page = request(port, "/messages?topic=orders&partition=0&offset=0&count=3")
    rows = page.table("messages")
    assert '"order": 0' in rows[0][3] and rows[0][3].endswith("json")
    assert "<b>bold</b>" not in page.text and "&lt;b&gt;bold&lt;/b&gt;" in page.text  # escaped
    assert rows[1][3] == "plain order 1text" and rows[2][3] == "00 01 02 ff 02hex"
    assert "trace = t0" in rows[0][4]

    letters = request(port, "/messages?topic=jobs.dlq&partition=0&offset=0&count=1")
    headers = letters.table("messages")[0][4]
    assert "nodi-dlq-reason = rejected" in headers and "the queue group that dead-lettered it" in headers
    assert re.search(r"nodi-dlq-dead-lettered-ms = \d+ \(20\d\d-", headers)


def test_a_group_reset_asks_for_confirmation_and_moves_the_offsets(console) -> None:
    process, port = console
    with Client(process.address) as client:
        assert not any(client.commit_offsets("replay", {("orders", 0): 10, ("orders", 1): 5}).values())
        token = request(port, "/group?name=replay").token()
        form = {"name": "replay", "topic": "orders", "to": "offset", "value": "2", "partition": "0"}
        assert request(port, "/group/reset", form).status == 403  # no token
        review = request(port, "/group/reset", {**form, "token": token})
        assert review.status == 200
        assert "Reset group &#x27;replay&#x27; on topic &#x27;orders&#x27;, partition 0, to offset 2" in review.text
        assert client.fetch_offsets("replay", ["orders"])[("orders", 0)] == 10  # not yet
        done = request(port, "/group/reset", {**form, "token": token, "confirm": "yes"})
        assert done.status == 200 and "partition -&gt; offset 0: 2" in done.text
        assert client.fetch_offsets("replay", ["orders"]) == {("orders", 0): 2, ("orders", 1): 5}
        by_time = {"name": "replay", "topic": "orders", "to": "time", "value": "2026-01-01T00:00:31Z"}
        assert request(port, "/group/reset", {**by_time, "token": token, "confirm": "yes"}).status == 200
        assert client.fetch_offsets("replay", ["orders"]) == {("orders", 0): 30, ("orders", 1): 1}
        with client.consumer(["orders"], group="replay") as consumer:  # a member: the reset is refused
            consumer.poll(timeout_ms=5_000)
            refused = request(port, "/group/reset", {**form, "token": token, "confirm": "yes"})
            assert refused.status == 409 and "member" in refused.text.lower()
    assert request(port, "/group/reset", {**form, "token": token, "to": "sideways", "confirm": "yes"}).status == 400


def test_a_dead_letter_is_redriven_and_the_rest_purged(console) -> None:
    process, port = console

    def waiting() -> str:
        rows = request(port, "/dead-letters").table("dead-letter-topics")
        (row,) = [row for row in rows if row[0] == "tasks.dlq"]
        return row[1]

    with Client(process.address) as client:
        dead_letters(client, "tasks", "handlers", 3)
        token = request(port, "/dead-letter?topic=tasks.dlq").token()
        review = request(port, "/dead-letter/redrive", {"topic": "tasks.dlq", "count": "1", "token": token})
        assert "Redrive the next 1 entry of &#x27;tasks.dlq&#x27;" in review.text
        before = client.describe_topic("tasks").partitions[0].high_watermark
        done = request(
            port, "/dead-letter/redrive", {"topic": "tasks.dlq", "count": "1", "token": token, "confirm": "yes"}
        )
        assert done.status == 200 and "redrove 1 message(s) from tasks.dlq" in done.text
        (again,) = client.fetch("tasks", 0, before)
        assert again.value == b"job 0" and not any(name.startswith("nodi-") for name, _ in again.headers)
        with client.queue("tasks", "handlers") as queue:
            delivered = queue.receive(timeout_ms=20_000)
            assert delivered is not None
            assert delivered.value == b"job 0"
            delivered.ack()
    assert waiting() == "2"
    purged = request(port, "/dead-letter/purge", {"topic": "tasks.dlq", "token": token, "confirm": "yes"})
    assert purged.status == 200 and "purged 2 message(s)" in purged.text
    assert waiting() == "0"
    assert request(port, "/dead-letter/purge", {"topic": "orders", "token": token, "confirm": "yes"}).status == 400


def test_ticked_dead_letters_are_redriven_and_purged_after_confirmation(console) -> None:
    process, port = console
    with Client(process.address) as client:
        dead_letters(client, "ticks", "tickers", 4)
        page = request(port, "/dead-letter?topic=ticks.dlq")
        token = page.token()
        assert 'name="pick-0-2"' in page.text and 'id="picked"' in page.text
        review = request(
            port, "/dead-letter/redrive", {"topic": "ticks.dlq", "pick-0-1": "yes", "pick-0-3": "yes", "token": token}
        )
        assert review.status == 200 and "Redrive the 2 ticked entries (partition:offset 0:1, 0:3)" in html.unescape(
            review.text
        )
        assert client.fetch("ticks", 0, 4) == []  # nothing before the confirmation
        done = request(
            port, "/dead-letter/redrive", {"topic": "ticks.dlq", "picked": "0:1,0:3", "token": token, "confirm": "yes"}
        )
        assert done.status == 200 and "redrove 2 message(s)" in done.text, done.text
        assert [m.value for m in client.fetch("ticks", 0, 4)] == [b"job 1", b"job 3"]
        page = request(port, "/dead-letter?topic=ticks.dlq")
        assert [row[:2] for row in page.table("dead-letters")] == [["0", "0"], ["0", "2"]]
        assert "2 entries waiting" in page.text
        again = request(
            port, "/dead-letter/redrive", {"topic": "ticks.dlq", "picked": "0:3", "token": token, "confirm": "yes"}
        )
        assert again.status == 409 and "not waiting" in again.text
        assert (
            request(port, "/dead-letter/purge", {"topic": "ticks.dlq", "picked": "0:x", "token": token}).status == 400
        )
        assert request(port, "/dead-letter/purge", {"topic": "ticks.dlq", "pick-0-2": "yes"}).status == 403  # no token
        purged = request(
            port, "/dead-letter/purge", {"topic": "ticks.dlq", "picked": "0:2", "token": token, "confirm": "yes"}
        )
        assert purged.status == 200 and "purged 1 message(s)" in purged.text
        rows = request(port, "/dead-letter?topic=ticks.dlq").table("dead-letters")
        assert [row[:2] for row in rows] == [["0", "0"]]
        assert client.fetch_offsets("nodi.dlq", ["ticks.dlq"]) == {("ticks.dlq", 0): 0}
        request(port, "/dead-letter/purge", {"topic": "ticks.dlq", "token": token, "confirm": "yes"})
        assert client.fetch_offsets("nodi.dlq", ["ticks.dlq"]) == {("ticks.dlq", 0): 4}


def test_bad_input_gets_a_clear_status_and_the_console_carries_on(console) -> None:
    _, port = console
    assert request(port, "/topic?name=nothing").status == 404
    assert "UNKNOWN_TOPIC: topic &#x27;nothing&#x27; does not exist" in request(port, "/topic?name=nothing").text
    assert request(port, "/messages?topic=orders&partition=9").status == 404
    assert request(port, "/messages?topic=orders&offset=abc").status == 400
    assert request(port, "/messages?topic=orders&time=yesterday").status == 400
    assert request(port, "/group?name=nobody").status == 404
    assert request(port, "/queue?topic=jobs&group=nobody").status == 404
    assert request(port, "/nowhere").status == 404
    assert request(port, "/group/reset").status == 405
    assert request(port, "/", headers={"Host": "evil.example:80"}).status == 421
    evil = {"name": "billing", "topic": "orders", "token": "x"}
    assert request(port, "/group/reset", evil, headers={"Origin": "http://evil.example"}).status == 403
    assert raw(
        port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX: " + b"a" * 20_000 + b"\r\n\r\n"
    ).startswith(b"HTTP/1.1 431")
    assert raw(port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    body = b"POST /group/reset HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
    assert raw(port, body).startswith(b"HTTP/1.1 413")
    assert request(port, "/").status == 200


def test_the_console_is_off_with_port_0_and_a_taken_port_refuses_the_start(tmp_path, console) -> None:
    _, port = console
    off = BrokerProcess(str(tmp_path / "off"), ["--console-port", "0"]).start()
    off.stop()
    assert not any("nodi console on" in line for line in off.output), off.output
    refused = BrokerProcess(str(tmp_path / "taken"), ["--console-port", str(port)])
    with pytest.raises(RuntimeError, match=f"cannot serve the console on 127.0.0.1:{port}"):
        refused.start()
    assert not (tmp_path / "taken").exists() or not any((tmp_path / "taken").iterdir())


def _read_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as io:
        return int(next(line for line in io if line.startswith("rchar:")).split()[1])


def test_a_page_of_a_1_gib_partition_reads_a_few_megabytes_of_it(tmp_path) -> None:
    """The partition is 1 GiB of 1,100 messages of 960 KiB each (one batch each); a page
    by offset, by time and a key search each read a bounded number of bytes."""
    process, port = start_with_console(str(tmp_path / "data"))
    assert process.process is not None  # started
    value_bytes = 960 * 1024
    count = 1100
    # Recent timestamps: retention (by age) must not take the old segments while the test runs.
    start_ms = int(time.time() * 1000) - count * 1000
    try:
        with Client(process.address) as client:
            client.create_topic("big", fsync_policy="never", segment_bytes=256 * 1024 * 1024)
            value = b"v" * value_bytes
            with client.producer(acks="written", linger_ms=0, batch_bytes_max=1024 * 1024) as producer:
                for index in range(count):
                    producer.send("big", value, key=b"key-%d" % index, partition=0, timestamp=start_ms + index * 1000)
                producer.flush()
            assert client.describe_topic("big").partitions[0].size > 1 << 30
        request(port, "/messages?topic=big&offset=0&count=1")  # the console's client is connected
        pages_bytes_max = 8 * 1024 * 1024  # PAGE_BYTES_MAX plus one batch, sent once and read once, and slack
        for path in (
            "/messages?topic=big&offset=600&count=20",
            f"/messages?topic=big&time={start_ms + 900_000}",
            "/messages?topic=big",
        ):
            before = _read_bytes(process.process.pid)
            answer = request(port, path)
            read = _read_bytes(process.process.pid) - before
            assert answer.status == 200 and len(answer.table("messages")) >= 1, path
            assert read < pages_bytes_max, (path, read)
        before = _read_bytes(process.process.pid)
        search = request(port, "/messages?topic=big&key=key-1099")
        read = _read_bytes(process.process.pid) - before
        assert search.status == 200 and "search on" in search.text and search.table("messages") == [["none"]]
        assert read < 3 * 16 * 1024 * 1024, read  # SEARCH_BYTES_MAX: sent once, read once, and slack
    finally:
        process.stop()


def test_the_overview_charts_rates_between_samples() -> None:
    from nodi.broker.console.app import Console
    from nodi.broker.console.render import sparkline

    console = Console("127.0.0.1", 0)
    try:
        assert console.rates() == {}
        for at_s, produced in ((0.0, 100), (5.0, 150), (10.0, 150), (15.0, 400)):
            console._samples.append((at_s, {"messages_in": produced}))
        assert console.rates() == {"messages_in": [10.0, 0.0, 50.0]}
        chart = sparkline(console.rates()["messages_in"], label="messages in")
        assert "<polyline" in chart and "now 50.0/s, max 50.0/s" in chart
        assert "gathering samples" in sparkline([1.0], label="messages in")
    finally:
        console._workers.shutdown()


def test_a_write_the_principal_may_not_do_is_refused_before_its_confirmation_and_does_not_run() -> None:
    """The permission check of a write (the one nodi's protocol makes: ResetGroup needs
    admin on the group) comes before the confirmation page and the action; the real
    server's 403 page, log line and metric are in tests/test_console_security.py."""
    from nodi.broker.console.app import Console
    from nodi.broker.console.http import Request
    from nodi.broker.console.pages import Refused, WriteAction
    from nodi.broker.console.render import Markup
    from nodi.broker.server.users import Action, Principal, Resource, Rule

    ran: list[int] = []
    needs = ((Action.ADMIN, Resource.GROUP, "billing"),)

    def reset() -> str:
        ran.append(1)
        return "done"

    action = WriteAction("group.reset", "billing@orders", reset, needs)
    consumer = Principal("bob", rules={(Action.CONSUME, Resource.GROUP): Rule(allow=("billing",))})
    console = Console("127.0.0.1", 0)
    try:
        for confirm in ("", "yes"):
            form = {"name": "billing", "confirm": confirm}
            request = Request("POST", "/group/reset", {}, form, {}, "127.0.0.1:5000", principal=consumer)
            with pytest.raises(Refused) as refused:
                console._write(None, request, "token", lambda client, request: ("reset?", Markup(""), action))  # type: ignore[arg-type]
            assert str(refused.value) == "bob may not admin group billing"
            assert (refused.value.action, refused.value.resource, refused.value.name) == needs[0]
        assert ran == []
    finally:
        console._workers.shutdown()
