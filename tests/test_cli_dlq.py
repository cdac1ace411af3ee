"""`nodi dlq list | show | redrive | purge` and `nodi queue list | describe` run as the
real command against a real `nodi serve`; the Python client makes the dead letters and
checks what the CLI did."""

from __future__ import annotations

import json
import os
import subprocess
import time

from typer.testing import CliRunner

from nodi.broker import Client
from nodi.cli.main import app

from conftest import NODI, received

TIMEOUT_S = 60
ENVIRONMENT = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
ENVIRONMENT.pop("NODI_SERVER", None)


def nodi(address: str | None, *args: str) -> subprocess.CompletedProcess:
    prefix = ["--server", address] if address else []
    return subprocess.run(
        NODI + prefix + list(args), capture_output=True, text=True, timeout=TIMEOUT_S, env=ENVIRONMENT
    )


def json_lines(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def listed(address: str, topic: str) -> dict:
    (entry,) = [entry for entry in json_lines(nodi(address, "dlq", "list", "--json")) if entry["topic"] == topic]
    return entry


def test_every_dlq_and_queue_command_has_help() -> None:
    runner = CliRunner()
    for path in (
        ("dlq", "list"),
        ("dlq", "show"),
        ("dlq", "redrive"),
        ("dlq", "purge"),
        ("queue", "list"),
        ("queue", "describe"),
    ):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "Usage:" in result.output, result.output
    assert "--to" in runner.invoke(app, ["dlq", "redrive", "--help"], env={"COLUMNS": "200"}).output
    assert "--count" in runner.invoke(app, ["dlq", "show", "--help"], env={"COLUMNS": "200"}).output
    assert "--pick" in runner.invoke(app, ["dlq", "purge", "--help"], env={"COLUMNS": "200"}).output


def test_list_show_redrive_purge(broker) -> None:
    address = broker.address
    with Client(address) as client:
        client.create_topic("orders", partitions=2)
        for index in range(5):
            client.produce(
                "orders",
                b"order-%d" % index,
                key=b"k%d" % index,
                partition=index % 2,
                headers={"trace": b"t%d" % index},
            )
        with client.queue("orders", "billing", batch_max=10) as queue:
            for _ in range(5):
                message = queue.receive(timeout_ms=20_000)
                assert message is not None and message.value is not None
                message.reject(f"bad {message.value.decode()}")
        deadline = time.monotonic() + 20
        while client.describe_queue("orders", "billing").dead_lettered < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        (queue_entry,) = json_lines(nodi(address, "queue", "list", "--topic", "orders", "--json"))
        assert (queue_entry["group"], queue_entry["dead_letter_topic"], queue_entry["pending"]) == (
            "billing",
            "orders.dlq",
            0,
        )
        described = json_lines(nodi(address, "queue", "describe", "orders", "billing", "--json"))[0]
        assert described["dead_lettered"] == 5 and [p["ack_floor"] for p in described["partitions"]] == [3, 2]
        table = nodi(address, "queue", "describe", "orders", "billing")
        assert table.returncode == 0 and "max deliveries 5" in table.stdout
        assert nodi(address, "queue", "describe", "orders", "nobody").returncode == 1

        entry = listed(address, "orders.dlq")
        assert (entry["waiting"], entry["stored"], entry["queue_groups"]) == (5, 5, ["billing@orders"])
        table = nodi(address, "dlq", "list")
        assert table.returncode == 0 and "orders.dlq" in table.stdout and "billing@orders" in table.stdout

        shown = json_lines(nodi(address, "dlq", "show", "orders.dlq", "--count", "3", "--json"))
        assert len(shown) == 3
        headers = dict(shown[0]["headers"])
        assert headers["nodi-dlq-reason"] == "rejected" and headers["nodi-dlq-group"] == "billing"
        assert headers["nodi-dlq-last-error"] == f"bad {shown[0]['value']}"
        table = nodi(address, "dlq", "show", "orders.dlq")
        assert table.returncode == 0 and "rejected" in table.stdout and "orders-" in table.stdout

        before = {p: client.describe_topic("orders").partitions[p].high_watermark for p in range(2)}
        result = nodi(address, "dlq", "redrive", "orders.dlq", "--count", "3")
        assert result.returncode == 0, result.stderr
        assert "redrove 3" in result.stdout
        assert listed(address, "orders.dlq")["waiting"] == 2
        again = []
        for partition in range(2):
            again += client.fetch("orders", partition, before[partition])
        assert len(again) == 3
        for record in again:
            assert not any(name.startswith("nodi-") for name, _ in record.headers)
            assert record.value is not None  # the rejected messages had values
            index = int(record.value.split(b"-")[1])
            assert record.key == b"k%d" % index and record.header("trace") == b"t%d" % index
            assert record.partition == index % 2  # back to its source partition

        result = nodi(address, "dlq", "redrive", "orders.dlq", "--to", "retry")
        assert result.returncode != 0  # no such topic: nothing moved
        assert listed(address, "orders.dlq")["waiting"] == 2
        client.create_topic("retry")
        result = nodi(address, "dlq", "redrive", "orders.dlq", "--to", "retry")
        assert result.returncode == 0 and "redrove 2" in result.stdout, result.stderr
        assert len(client.fetch("retry", 0, 0)) == 2

        with client.queue("orders", "billing") as queue:
            message = queue.receive(timeout_ms=20_000)  # a redriven one
            assert message is not None
            message.reject("still bad")
        deadline = time.monotonic() + 20
        while listed(address, "orders.dlq")["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = nodi(address, "dlq", "purge", "orders.dlq")
        assert result.returncode == 0 and "purged 1" in result.stdout
        assert listed(address, "orders.dlq")["waiting"] == 0
        assert nodi(address, "dlq", "show", "orders.dlq", "--json").stdout.strip() == ""
        assert nodi(address, "dlq", "show", "missing.dlq").returncode == 1


def test_picked_entries_are_redriven_and_purged_and_the_cursor_skips_them(broker) -> None:
    address = broker.address
    with Client(address) as client:
        client.create_topic("picks")
        for index in range(5):
            client.produce("picks", b"pick-%d" % index, partition=0)
        with client.queue("picks", "g", batch_max=10) as queue:
            for _ in range(5):
                received(queue.receive(timeout_ms=20_000)).reject("no")
        deadline = time.monotonic() + 20
        while client.describe_queue("picks", "g").dead_lettered < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        def shown() -> list[int]:
            return [entry["offset"] for entry in json_lines(nodi(address, "dlq", "show", "picks.dlq", "--json"))]

        result = nodi(address, "dlq", "redrive", "picks.dlq", "--pick", "0:3", "--pick", "0:1")
        assert result.returncode == 0 and "redrove 2" in result.stdout, result.stderr
        assert [m.value for m in client.fetch("picks", 0, 5)] == [b"pick-1", b"pick-3"]
        assert shown() == [0, 2, 4] and listed(address, "picks.dlq")["waiting"] == 3
        # A handled one, one past the end or a malformed pick: refused, nothing done.
        for pick, message in (
            ("0:1", "not waiting"),
            ("0:9", "not waiting"),
            ("1:0", "not waiting"),
            ("x", "PARTITION"),
        ):
            refused = nodi(address, "dlq", "redrive", "picks.dlq", "--pick", "0:2", "--pick", pick)
            assert refused.returncode == 1 and message in refused.stderr, refused.stderr
        assert nodi(address, "dlq", "redrive", "picks.dlq", "--pick", "0:2", "--count", "1").returncode == 1
        assert len(client.fetch("picks", 0, 5)) == 2 and shown() == [0, 2, 4]
        # Purging the entry at the cursor moves it past the redriven 1 as well.
        result = nodi(address, "dlq", "purge", "picks.dlq", "--pick", "0:0")
        assert result.returncode == 0 and "purged 1" in result.stdout, result.stderr
        assert client.fetch_offsets("nodi.dlq", ["picks.dlq"]) == {("picks.dlq", 0): 2}
        # The next plain redrive takes 2 and 4, skipping the redriven 3.
        result = nodi(address, "dlq", "redrive", "picks.dlq")
        assert result.returncode == 0 and "redrove 2" in result.stdout, result.stderr
        assert [m.value for m in client.fetch("picks", 0, 7)] == [b"pick-2", b"pick-4"]
        assert listed(address, "picks.dlq")["waiting"] == 0 and shown() == []
        assert client.fetch_offsets("nodi.dlq", ["picks.dlq"]) == {("picks.dlq", 0): 5}


def test_dlq_commands_refuse_an_ordinary_topic(broker) -> None:
    """show/redrive/purge on a topic no queue group dead-letters into (and not named
    *.dlq) printed 'None-None@None' rows or moved its cursor; now exit 1, nothing moved."""
    address = broker.address
    with Client(address) as client:
        client.create_topic("scratch", 2)
        for number in range(4):
            client.produce("scratch", f"m{number}".encode(), partition=number % 2)
        for command in (["show", "scratch"], ["redrive", "scratch", "--to", "elsewhere"], ["purge", "scratch"]):
            result = nodi(address, "dlq", *command)
            assert result.returncode == 1, (command, result)
            assert "'scratch' is not a dead-letter topic" in result.stderr and "None-None" not in result.stdout
        assert "--force purges it anyway" in nodi(address, "dlq", "purge", "scratch").stderr
        assert client.fetch_offsets("nodi.dlq", ["scratch"]) == {}
        assert nodi(address, "dlq", "show", "nothing-here").returncode == 1

        forced = nodi(address, "dlq", "purge", "scratch", "--force")
        assert forced.returncode == 0 and "purged 4" in forced.stdout, forced
        assert client.fetch_offsets("nodi.dlq", ["scratch"]) == {("scratch", 0): 2, ("scratch", 1): 2}
