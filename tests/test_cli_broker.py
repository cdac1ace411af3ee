"""The broker-facing CLI (`nodi topic`, `nodi produce`, `nodi consume`, `nodi group`) run
as the real command (`python -m nodi.cli.main`) in a subprocess against a real
`nodi serve` process. The tests share one server (module scope) and use their own topic
and group names; the Python client checks what the CLI did."""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time

import pytest
import typer
from typer.testing import CliRunner

from nodi.broker import Client
from nodi.cli.main import app

from conftest import NODI

TIMEOUT_S = 60
# Wide enough that help text is never cut (rich wraps to the terminal's width).
ENVIRONMENT = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
ENVIRONMENT.pop("NODI_SERVER", None)


@pytest.fixture
def client(server):
    with Client(server.address, timeout_ms=10_000) as client:
        yield client


def nodi(
    server, *args: str, stdin: bytes | None = None, environment: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `nodi --server ADDRESS ARGS...`; stdout as bytes, stderr as text."""
    prefix = ["--server", server.address] if server is not None else []
    result: subprocess.CompletedProcess = subprocess.run(  # stderr becomes text below
        NODI + prefix + list(args),
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=TIMEOUT_S,
        env=environment or ENVIRONMENT,
    )
    result.stderr = result.stderr.decode(errors="replace")
    return result


def json_lines(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


class Running:
    """A command running in the background; a thread takes its stdout lines (a select()
    on the pipe would miss lines already in the reader's buffer)."""

    def __init__(self, command: list[str], stdin=subprocess.DEVNULL) -> None:
        self.process = subprocess.Popen(
            command,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENVIRONMENT,
        )
        self.lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None  # PIPE
        for line in self.process.stdout:
            self.lines.put(line)

    def line(self, timeout_s: float = TIMEOUT_S) -> bytes:
        """The next stdout line (fails after timeout_s)."""
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            self.process.kill()
            assert self.process.stderr is not None  # PIPE
            raise AssertionError(f"no output in time; stderr: {self.process.stderr.read().decode()}") from None

    def write(self, data: bytes) -> None:
        assert self.process.stdin is not None, "started with stdin=subprocess.PIPE"
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def wait(self) -> int:
        code = self.process.wait(timeout=TIMEOUT_S)
        self._reader.join(TIMEOUT_S)
        return code

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def running(server, *args: str, stdin=subprocess.DEVNULL) -> Running:
    """`nodi --server ADDRESS ARGS...` in the background."""
    return Running(NODI + ["--server", server.address] + list(args), stdin)


def wait_for(condition, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


# ---------------------------------------------------------------------------
# help


BROKER_COMMANDS = [
    ("topic", "create"),
    ("topic", "list"),
    ("topic", "describe"),
    ("topic", "delete"),
    ("produce",),
    ("consume",),
    ("group", "list"),
    ("group", "describe"),
    ("group", "reset"),
]


def _walk(command, path: tuple[str, ...] = ()):
    yield path, command
    for name, child in getattr(command, "commands", {}).items():
        yield from _walk(child, path + (name,))


def test_every_command_and_parameter_has_help():
    """Every command of `nodi` (the broker-facing ones and any other) has help text, and
    so has each of its options and arguments; --help shows every option (in-process:
    the real command's help is checked by the segments tests)."""
    commands = dict(_walk(typer.main.get_command(app)))
    for path in BROKER_COMMANDS:
        assert path in commands, path
    for path, command in commands.items():
        assert (command.help or "").strip(), f"nodi {' '.join(path)} has no help"
        for parameter in command.params:
            assert (getattr(parameter, "help", None) or "").strip(), f"nodi {' '.join(path)} {parameter.name}"
    runner = CliRunner()
    for path in BROKER_COMMANDS:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        text = result.output
        assert "Usage:" in text
        for parameter in commands[path].params:
            for option in getattr(parameter, "opts", ()):
                if option.startswith("--"):
                    assert option in text, (path, option)


# ---------------------------------------------------------------------------
# topic


def test_topic_create_list_describe_delete(server, client):
    created = nodi(
        server,
        "topic",
        "create",
        "cli-admin",
        "--partitions",
        "3",
        "--retention-ms",
        "-1",
        "--retention-bytes",
        "1000000",
        "--cleanup-policy",
        "compact",
        "--fsync-policy",
        "interval",
        "--fsync-interval-ms",
        "250",
        "--segment-bytes",
        "65536",
        "--segment-ms",
        "3600000",
        "--ttl-ms",
        "60000",
        "--dedup-window-ms",
        "5000",
        "--json",
    )
    settings = json_lines(created)[0]
    assert (
        settings.items()
        >= {
            "name": "cli-admin",
            "partitions": 3,
            "retention_ms": -1,
            "retention_bytes": 1_000_000,
            "cleanup_policy": "compact",
            "fsync_policy": "interval",
            "fsync_interval_ms": 250,
            "segment_bytes": 65536,
            "segment_ms": 3_600_000,
            "ttl_ms": 60_000,
            "dedup_window_ms": 5000,
        }.items()
    )
    described = client.describe_topic("cli-admin")
    assert described.partition_count == 3
    assert (described.settings.cleanup_policy, described.settings.segment_bytes) == ("compact", 65536)

    human = nodi(server, "topic", "create", "cli-admin-2")
    assert human.returncode == 0, human.stderr
    assert b"created topic cli-admin-2" in human.stdout

    listed = {row["name"]: row["partitions"] for row in json_lines(nodi(server, "topic", "list", "--json"))}
    assert listed["cli-admin"] == 3 and listed["cli-admin-2"] == 1
    table = nodi(server, "topic", "list").stdout.decode().splitlines()
    assert table[0].split() == ["TOPIC", "PARTITIONS"]
    assert ["cli-admin", "3"] in [line.split() for line in table]

    client.produce("cli-admin", b"x", key="k", partition=2)  # a compacted topic wants keys
    description = json_lines(nodi(server, "topic", "describe", "cli-admin", "--json"))[0]
    assert description["settings"]["retention_bytes"] == 1_000_000
    assert [p["log_end_offset"] for p in description["partitions"]] == [0, 0, 1]
    text = nodi(server, "topic", "describe", "cli-admin").stdout.decode()
    assert ["retention_ms", "unlimited"] in [line.split() for line in text.splitlines()] and "HIGH-WATERMARK" in text

    taken = nodi(server, "topic", "create", "cli-admin")
    assert taken.returncode == 1 and "TopicExists" in taken.stderr and len(taken.stderr.splitlines()) == 1
    refused = nodi(server, "topic", "create", "cli-bad", "--cleanup-policy", "shred")
    assert refused.returncode == 1 and refused.stderr.strip()

    deleted = nodi(server, "topic", "delete", "cli-admin-2")
    assert deleted.returncode == 0, deleted.stderr
    assert "cli-admin-2" not in [topic.name for topic in client.list_topics()]


def test_unknown_topic_is_exit_code_1_with_one_line(server):
    for args in (
        ("topic", "describe", "cli-absent"),
        ("topic", "delete", "cli-absent"),
        ("produce", "cli-absent", "value"),
        ("consume", "cli-absent", "--timeout-ms", "100"),
        ("consume", "cli-absent", "--group", "g", "--timeout-ms", "100"),
    ):
        result = nodi(server, *args, stdin=b"line\n")
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "UnknownTopic" in lines[0] and "cli-absent" in lines[0], (args, lines)
    stdin_mode = nodi(server, "produce", "cli-absent", stdin=b"a\nb\n")
    assert stdin_mode.returncode == 1 and "UnknownTopic" in stdin_mode.stderr


def test_an_unreachable_broker_is_exit_code_1_with_one_line():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    result = nodi(None, "--server", address, "topic", "list")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and address in lines[0], lines


def test_usage_errors_are_exit_code_2(server, client):
    client.create_topic("cli-usage")
    for args in (
        ("consume", "cli-usage", "--from", "yesterday"),
        ("consume", "cli-usage", "--from", "-3"),
        ("group", "reset", "g", "--topic", "cli-usage", "--to", "soon"),
        ("produce", "cli-usage", "v", "--header", "no-equals-sign"),
        ("produce", "cli-usage", "v", "--acks", "all"),
        ("topic", "create", "cli-usage-2", "--partitions", "0"),
        ("topic", "frobnicate"),
    ):
        result = nodi(server, *args)
        assert result.returncode == 2, (args, result.returncode, result.stderr)
    bad_address = nodi(None, "--server", "127.0.0.1:notaport", "topic", "list")
    assert bad_address.returncode == 2
    assert client.describe_topic("cli-usage").partitions[0].log_end_offset == 0  # nothing was produced


# ---------------------------------------------------------------------------
# produce


def test_produce_one_value_with_key_headers_partition_and_acks(server, client):
    client.create_topic("cli-produce", partitions=4)
    result = nodi(
        server,
        "produce",
        "cli-produce",
        "hello",
        "--key",
        "customer-7",
        "--header",
        "source=shell",
        "--header",
        "trace=a=b",
        "--json",
    )
    (acked,) = json_lines(result)
    assert acked["topic"] == "cli-produce" and acked["offset"] == 0
    (message,) = client.fetch("cli-produce", acked["partition"], 0)
    assert (message.key, message.value) == (b"customer-7", b"hello")
    assert message.headers == (("source", b"shell"), ("trace", b"a=b"))
    again = json_lines(nodi(server, "produce", "cli-produce", "second", "--key", "customer-7", "--json"))[0]
    assert again["partition"] == acked["partition"]  # the key picks the partition

    before = client.describe_topic("cli-produce").partitions[3].high_watermark  # the key may have picked 3
    for acks in ("durable", "written"):
        (placed,) = json_lines(
            nodi(server, "produce", "cli-produce", acks, "--partition", "3", "--acks", acks, "--json")
        )
        assert placed["partition"] == 3
    unacknowledged = json_lines(
        nodi(server, "produce", "cli-produce", "none", "--partition", "3", "--acks", "none", "--json")
    )
    assert unacknowledged == [{"topic": "cli-produce", "partition": 3, "offset": -1}]
    wait_for(lambda: client.describe_topic("cli-produce").partitions[3].high_watermark == before + 3)
    assert [m.value for m in client.fetch("cli-produce", 3, before)] == [b"durable", b"written", b"none"]

    human = nodi(server, "produce", "cli-produce", "plain", "--partition", "3")
    assert human.returncode == 0 and human.stdout.decode().strip() == f"partition 3 offset {before + 3}"


def test_produce_stdin_prints_each_ack_in_input_order(server, client):
    client.create_topic("cli-stdin", partitions=3)
    lines = [f"line-{number}" for number in range(3000)]
    stdin = ("\n".join(lines) + "\n").encode()
    acked = json_lines(nodi(server, "produce", "cli-stdin", "--json", "--header", "h=1", stdin=stdin))
    assert len(acked) == len(lines)
    by_position = {}
    for partition in range(3):
        for message in _read_all(client, "cli-stdin", partition):
            by_position[(partition, message.offset)] = message
    assert len(by_position) == len(lines)
    for line, ack in zip(lines, acked):
        message = by_position[(ack["partition"], ack["offset"])]
        assert message.value == line.encode() and message.headers == (("h", b"1"),)
    for partition in range(3):  # per partition, input order is offset order
        offsets = [ack["offset"] for ack in acked if ack["partition"] == partition]
        assert offsets == sorted(offsets)

    keyed = nodi(server, "produce", "cli-stdin", "--key", "k", "--acks", "written", stdin=b"a\r\nb\n\nc")
    assert keyed.returncode == 0, keyed.stderr
    assert "produced 4 message(s)" in keyed.stderr and keyed.stdout == b""


def test_produce_stdin_answers_each_line_once_it_is_durable(server, client):
    """A line written to a running `nodi produce --json` is answered before the next
    one comes, and the message it names is already durable (fetchable) then."""
    client.create_topic("cli-interactive")
    with running(server, "produce", "cli-interactive", "--json", stdin=subprocess.PIPE) as background:
        for number in range(5):
            background.write(f"typed-{number}\n".encode())
            ack = json.loads(background.line())
            assert (ack["partition"], ack["offset"]) == (0, number)
            (message,) = client.fetch("cli-interactive", 0, number)
            assert message.value == f"typed-{number}".encode()
        background.process.stdin.close()
        assert background.wait() == 0


def _read_all(client, topic: str, partition: int) -> list:
    messages, offset = [], 0
    end = client.describe_topic(topic).partitions[partition].high_watermark
    while offset < end:
        batch, offset = client.fetch_with_position(topic, partition, offset)
        messages.extend(batch)
    return messages


# ---------------------------------------------------------------------------
# consume


def test_consume_json_text_and_binary(server, client):
    client.create_topic("cli-binary")
    client.produce("cli-binary", "text é", key="k", headers={"h": "v"})
    client.produce("cli-binary", b"\xff\x00\xfe", key=b"\x80", headers=[("raw", b"\xc3"), ("none", None)])
    client.produce("cli-binary", None)
    rows = json_lines(nodi(server, "consume", "cli-binary", "--json", "--count", "3"))
    assert [row["offset"] for row in rows] == [0, 1, 2]
    assert rows[0]["value"] == "text é" and rows[0]["key"] == "k" and rows[0]["headers"] == [["h", "v"]]
    assert rows[1]["value"] == {"base64": base64.b64encode(b"\xff\x00\xfe").decode()}
    assert rows[1]["key"] == {"base64": base64.b64encode(b"\x80").decode()}
    assert rows[1]["headers"] == [["raw", {"base64": base64.b64encode(b"\xc3").decode()}], ["none", None]]
    assert rows[2]["value"] is None
    for row in rows:
        assert set(row) == {"topic", "partition", "offset", "timestamp", "key", "value", "headers"}
        assert row["topic"] == "cli-binary" and row["partition"] == 0
        assert abs(row["timestamp"] - time.time() * 1000) < 3_600_000
    raw = nodi(server, "consume", "cli-binary", "--count", "2")
    assert raw.returncode == 0 and raw.stdout == "text é\n".encode() + b"\xff\x00\xfe\n"


def test_consume_from_offset_time_latest_partition_and_timeout(server, client):
    client.create_topic("cli-replay", partitions=2)
    base = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    for number in range(6):
        client.produce("cli-replay", f"m{number}", partition=0, timestamp=base + datetime.timedelta(minutes=number))
    client.produce("cli-replay", "other", partition=1, timestamp=base)

    def values(*args: str) -> list[str]:
        return [row["value"] for row in json_lines(nodi(server, "consume", "cli-replay", "--json", *args))]

    assert values("--partition", "0", "--from", "4", "--timeout-ms", "1000") == ["m4", "m5"]
    assert values("--partition", "0", "--from", "2026-01-01T00:03:00Z", "--timeout-ms", "1000") == ["m3", "m4", "m5"]
    local = (base + datetime.timedelta(minutes=5)).astimezone().replace(tzinfo=None).isoformat()
    assert values("--partition", "0", "--from", local, "--timeout-ms", "1000") == ["m5"]  # no zone: local time
    assert sorted(values("--timeout-ms", "1000")) == sorted([f"m{n}" for n in range(6)] + ["other"])
    assert values("--from", "latest", "--timeout-ms", "500") == []
    assert values("--partition", "1", "--count", "1") == ["other"]
    beyond = nodi(server, "consume", "cli-replay", "--partition", "2", "--timeout-ms", "100")
    assert beyond.returncode == 1 and "UnknownPartition" in beyond.stderr


def test_consume_waits_for_new_messages(server, client) -> None:
    client.create_topic("cli-follow")
    with running(server, "consume", "cli-follow", "--from", "latest", "--count", "2", "--json") as background:
        deadline = time.monotonic() + TIMEOUT_S
        lines: list[bytes] = []
        number = 0
        while len(lines) < 2 and time.monotonic() < deadline:
            client.produce("cli-follow", f"new-{number}")  # repeated: the consumer may start after the first
            number += 1
            with contextlib.suppress(queue.Empty):
                lines.append(background.lines.get(timeout=0.5))
        assert background.wait() == 0
    numbers = [int(json.loads(line)["value"].removeprefix("new-")) for line in lines]
    assert len(numbers) == 2 and numbers[1] == numbers[0] + 1  # the next ones, in order


def test_consume_in_a_group_commits_and_ctrl_c_exits_cleanly(server, client):
    client.create_topic("cli-group", partitions=2)
    for number in range(10):
        client.produce("cli-group", f"v{number}", partition=number % 2)
    first = json_lines(nodi(server, "consume", "cli-group", "--group", "cli-g", "--count", "4", "--json"))
    assert len(first) == 4
    committed = client.fetch_offsets("cli-g", ["cli-group"])
    printed = {(row["partition"], row["offset"]) for row in first}
    assert sum(committed.values()) == 4  # exactly what was printed, no more
    for (_, partition), offset in committed.items():
        assert all(o < offset for p, o in printed if p == partition)

    with running(server, "consume", "cli-group", "--group", "cli-g", "--json") as background:
        rest = [json.loads(background.line()) for _ in range(6)]
        assert {(row["partition"], row["offset"]) for row in rest} | printed == {(n % 2, n // 2) for n in range(10)}
        wait_for(lambda: client.describe_group("cli-g").members)
        background.process.send_signal(signal.SIGINT)
        assert background.wait() == 0
        assert b"Traceback" not in background.process.stderr.read()
    description = client.describe_group("cli-g")
    assert description.members == ()  # it left the group
    assert {lag.partition: lag.committed_offset for lag in description.lags} == {0: 5, 1: 5}
    again = nodi(server, "consume", "cli-group", "--group", "cli-g", "--timeout-ms", "1000")
    assert again.returncode == 0 and again.stdout == b""  # nothing left for the group


# ---------------------------------------------------------------------------
# group


def test_group_list_describe_and_reset(server, client):
    client.create_topic("cli-groups", partitions=3)
    for partition in range(3):
        for number in range(4):
            client.produce("cli-groups", f"p{partition}-{number}", partition=partition)
    with client.consumer("cli-groups", group="cli-described", session_timeout_ms=10_000) as member:
        seen = []
        while len(seen) < 12:
            seen.extend(member.poll(1000))
        member.commit()
        client.produce("cli-groups", "late", partition=1)
        wait_for(lambda: client.describe_topic("cli-groups").partitions[1].high_watermark == 5)

        listed = {row["group"]: row for row in json_lines(nodi(server, "group", "list", "--json"))}
        assert listed["cli-described"] == {"group": "cli-described", "state": "stable", "members": 1}
        assert "cli-described" in nodi(server, "group", "list").stdout.decode()

        described = json_lines(nodi(server, "group", "describe", "cli-described", "--json"))[0]
        assert described["state"] == "stable" and len(described["members"]) == 1
        assert described["members"][0]["member_id"] == member.member_id
        assert described["members"][0]["assignments"] == {"cli-groups": [0, 1, 2]}
        assert {
            row["partition"]: (row["committed_offset"], row["high_watermark"], row["lag"])
            for row in described["partitions"]
        } == {0: (4, 4, 0), 1: (4, 5, 1), 2: (4, 4, 0)}
        table = nodi(server, "group", "describe", "cli-described").stdout.decode()
        assert member.member_id in table and "cli-groups:0,1,2" in table and "total lag 1" in table

        busy = nodi(server, "group", "reset", "cli-described", "--topic", "cli-groups", "--to", "earliest")
        assert busy.returncode == 1 and "GroupNotEmpty" in busy.stderr

    def reset(*args: str) -> dict[int, int]:
        rows = json_lines(nodi(server, "group", "reset", "cli-described", "--topic", "cli-groups", "--json", *args))
        return {row["partition"]: row["offset"] for row in rows}

    assert reset("--to", "earliest") == {0: 0, 1: 0, 2: 0}
    assert reset("--to", "latest", "--partition", "1") == {1: 5}
    assert reset("--to", "2", "--partition", "0", "--partition", "2") == {0: 2, 2: 2}
    assert client.fetch_offsets("cli-described", ["cli-groups"]) == {
        ("cli-groups", 0): 2,
        ("cli-groups", 1): 5,
        ("cli-groups", 2): 2,
    }
    late = client.fetch("cli-groups", 1, 4)[0]
    stamp = datetime.datetime.fromtimestamp(late.timestamp / 1000, datetime.UTC).isoformat()
    assert reset("--to", stamp, "--partition", "1") == {1: 4}
    human = nodi(server, "group", "reset", "cli-described", "--topic", "cli-groups", "--to", "latest")
    assert human.returncode == 0 and human.stdout.decode().split()[:3] == ["TOPIC", "PARTITION", "OFFSET"]
    replay = json_lines(
        nodi(server, "consume", "cli-groups", "--group", "cli-described", "--timeout-ms", "1000", "--json")
    )
    assert replay == []

    absent = nodi(server, "group", "describe", "cli-no-such-group")
    assert absent.returncode == 1 and "UnknownGroup" in absent.stderr


def test_server_address_from_the_environment(server, client):
    client.create_topic("cli-environment")
    environment = {**ENVIRONMENT, "NODI_SERVER": server.address}
    result = nodi(None, "produce", "cli-environment", "via-env", "--json", environment=environment)
    assert json_lines(result) == [{"topic": "cli-environment", "partition": 0, "offset": 0}]
