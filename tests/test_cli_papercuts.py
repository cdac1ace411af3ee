"""What a new user trips over on the command line (issue 11), each against a real
`nodi serve` process: `nodi consume | head` ends on a quiet topic, `--exit-at-end`
stops at the end the partitions had at start."""

from __future__ import annotations

import os
import subprocess

from conftest import NODI

from nodi.broker import Client

TIMEOUT_S = 60
ENVIRONMENT = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
ENVIRONMENT.pop("NODI_SERVER", None)


def _consume(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        NODI + ["--server", server.address, "consume", *args],
        capture_output=True, timeout=TIMEOUT_S, env=ENVIRONMENT, stdin=subprocess.DEVNULL,
    )


def test_consume_ends_when_its_reader_closes_the_pipe_on_a_quiet_topic(server):
    """`nodi consume quiet | head -2`: after the two lines nothing more is written, so the
    old loop only noticed the closed pipe at a next write that never came."""
    with Client(server.address) as client:
        client.create_topic("papercut-quiet", 1)
        for number in range(3):
            client.produce("papercut-quiet", f"line {number}".encode())
    head = subprocess.Popen(["head", "-2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    consume = subprocess.Popen(
        NODI + ["--server", server.address, "consume", "papercut-quiet"],
        stdout=head.stdin, stderr=subprocess.PIPE, env=ENVIRONMENT, stdin=subprocess.DEVNULL,
    )
    head.stdin.close()  # head holds the pipe's read end, consume its write end
    try:
        lines = head.stdout.read()
        assert head.wait(timeout=TIMEOUT_S) == 0
        assert lines.splitlines() == [b"line 0", b"line 1"]
        assert consume.wait(timeout=TIMEOUT_S) == 0, consume.stderr.read()
    finally:
        for process in (consume, head):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=15)
        consume.stderr.close()
        head.stdout.close()


def test_consume_exit_at_end_stops_at_the_end_as_it_was_at_start(server):
    with Client(server.address) as client:
        client.create_topic("papercut-end", 3)
        values = {f"m{number}".encode() for number in range(30)}
        for number, value in enumerate(sorted(values)):
            client.produce("papercut-end", value, partition=number % 3)
        client.create_topic("papercut-empty", 2)

    alone = _consume(server, "papercut-end", "--exit-at-end")
    assert alone.returncode == 0, alone.stderr
    assert set(alone.stdout.splitlines()) == values and len(alone.stdout.splitlines()) == 30

    one = _consume(server, "papercut-end", "-e", "--partition", "1")
    assert one.returncode == 0, one.stderr
    assert len(one.stdout.splitlines()) == 10

    grouped = _consume(server, "papercut-end", "-e", "--group", "papercut-readers")
    assert grouped.returncode == 0, grouped.stderr
    assert set(grouped.stdout.splitlines()) == values
    again = _consume(server, "papercut-end", "-e", "--group", "papercut-readers")  # committed: nothing left
    assert again.returncode == 0 and again.stdout == b"", again

    empty = _consume(server, "papercut-empty", "-e")
    assert empty.returncode == 0 and empty.stdout == b"", empty


def test_produce_whole_sends_all_of_stdin_as_one_binary_message(server):
    with Client(server.address) as client:
        client.create_topic("papercut-whole", 1)
        data = bytes(range(256)) * 12 + b"\r\n\n\x00tail"
        result = subprocess.run(
            NODI + ["--server", server.address, "produce", "papercut-whole", "--whole", "--key", "k"],
            input=data, capture_output=True, timeout=TIMEOUT_S, env=ENVIRONMENT,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().strip() == "partition 0 offset 0"
        (message,) = client.fetch("papercut-whole", 0, 0)
        assert message.value == data and message.key == b"k"

        both = subprocess.run(
            NODI + ["--server", server.address, "produce", "papercut-whole", "value", "--whole"],
            input=b"x", capture_output=True, timeout=TIMEOUT_S, env=ENVIRONMENT,
        )
        assert both.returncode == 2
        too_big = subprocess.run(
            NODI + ["--server", server.address, "produce", "papercut-whole", "--whole"],
            input=b"x" * (1024 * 1024 + 1), capture_output=True, timeout=TIMEOUT_S, env=ENVIRONMENT,
        )
        assert too_big.returncode == 1 and b"more than 1048576 bytes" in too_big.stderr
        assert client.list_offsets("papercut-whole", 0, "latest") == 1


def test_topic_describe_lines_up_every_setting_value_the_longest_name_included(server):
    """delete_retention_ms, the longest name, used to push its value one column right."""
    with Client(server.address) as client:
        client.create_topic("papercut-describe", 2)
    described = subprocess.run(
        NODI + ["--server", server.address, "topic", "describe", "papercut-describe"],
        capture_output=True, timeout=TIMEOUT_S, env=ENVIRONMENT, stdin=subprocess.DEVNULL, text=True,
    )
    assert described.returncode == 0, described.stderr
    settings = described.stdout.split("\n\n")[0].splitlines()[1:]  # after "topic NAME", before the table
    names = [line.split()[0] for line in settings]
    assert "delete_retention_ms" in names and "retention_ms" in names
    columns = {len(line) - len(line.split(maxsplit=1)[1]) for line in settings}
    assert len(columns) == 1, settings
