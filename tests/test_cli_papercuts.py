"""What a new user trips over on the command line (issue 11), each against a real
`nodi serve` process: `nodi consume | head` ends on a quiet topic, `--exit-at-end`
stops at the end the partitions had at start."""

from __future__ import annotations

import json
import os
import re
import subprocess

from nodi.broker import Client

from conftest import NODI

TIMEOUT_S = 60
ENVIRONMENT = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
ENVIRONMENT.pop("NODI_SERVER", None)


def _consume(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        NODI + ["--server", server.address, "consume", *args],
        capture_output=True,
        timeout=TIMEOUT_S,
        env=ENVIRONMENT,
        stdin=subprocess.DEVNULL,
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
        stdout=head.stdin,
        stderr=subprocess.PIPE,
        env=ENVIRONMENT,
        stdin=subprocess.DEVNULL,
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
            input=data,
            capture_output=True,
            timeout=TIMEOUT_S,
            env=ENVIRONMENT,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().strip() == "partition 0 offset 0"
        (message,) = client.fetch("papercut-whole", 0, 0)
        assert message.value == data and message.key == b"k"

        both = subprocess.run(
            NODI + ["--server", server.address, "produce", "papercut-whole", "value", "--whole"],
            input=b"x",
            capture_output=True,
            timeout=TIMEOUT_S,
            env=ENVIRONMENT,
        )
        assert both.returncode == 2
        too_big = subprocess.run(
            NODI + ["--server", server.address, "produce", "papercut-whole", "--whole"],
            input=b"x" * (1024 * 1024 + 1),
            capture_output=True,
            timeout=TIMEOUT_S,
            env=ENVIRONMENT,
        )
        assert too_big.returncode == 1 and b"more than 1048576 bytes" in too_big.stderr
        assert client.list_offsets("papercut-whole", 0, "latest") == 1


def test_topic_describe_lines_up_every_setting_value_the_longest_name_included(server):
    """delete_retention_ms, the longest name, used to push its value one column right."""
    with Client(server.address) as client:
        client.create_topic("papercut-describe", 2)
    described = subprocess.run(
        NODI + ["--server", server.address, "topic", "describe", "papercut-describe"],
        capture_output=True,
        timeout=TIMEOUT_S,
        env=ENVIRONMENT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert described.returncode == 0, described.stderr
    settings = described.stdout.split("\n\n")[0].splitlines()[1:]  # after "topic NAME", before the table
    names = [line.split()[0] for line in settings]
    assert "delete_retention_ms" in names and "retention_ms" in names
    columns = {len(line) - len(line.split(maxsplit=1)[1]) for line in settings}
    assert len(columns) == 1, settings


def test_topic_create_exist_ok_and_delete_missing_ok_make_scripts_rerunnable(server):
    first = _nodi("--server", server.address, "topic", "create", "papercut-rerun", "--partitions", "3")
    assert first.returncode == 0 and "created topic papercut-rerun" in first.stdout, first.stderr
    again = _nodi("--server", server.address, "topic", "create", "papercut-rerun")
    assert again.returncode == 1 and "TopicExists" in again.stderr, (again.stdout, again.stderr)
    tolerated = _nodi("--server", server.address, "topic", "create", "papercut-rerun", "--exist-ok", "--json")
    assert tolerated.returncode == 0, tolerated.stderr
    shown = json.loads(tolerated.stdout)
    assert shown["existed"] is True and shown["partitions"] == 3  # the topic's own, not the default 1
    assert _nodi("--server", server.address, "topic", "delete", "papercut-rerun").returncode == 0
    missing = _nodi("--server", server.address, "topic", "delete", "papercut-rerun")
    assert missing.returncode == 1 and "UnknownTopic" in missing.stderr, (missing.stdout, missing.stderr)
    ignored = _nodi("--server", server.address, "topic", "delete", "papercut-rerun", "--missing-ok")
    assert ignored.returncode == 0 and "no topic papercut-rerun" in ignored.stdout, ignored.stderr


# What typer writes for a value's type or a required argument unless told otherwise.
TYPER_METAVAR = re.compile(r"<(?:str|bool|int|float|list|tuple|path)[^>]*>|\{[a-z_]+\}")


def _every_command_path() -> list[list[str]]:
    import typer.main

    from nodi.cli.main import app

    paths = []

    def walk(group, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(group, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_help_shows_no_typer_type_names_or_braces_in_any_command():
    from typer.testing import CliRunner

    from nodi.cli.main import app

    paths = _every_command_path()
    assert ["topic", "create"] in paths and ["serve"] in paths and len(paths) > 20
    runner = CliRunner()
    for path in paths:
        shown = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
        assert shown.exit_code == 0, (path, shown.output)
        assert not TYPER_METAVAR.findall(shown.output), (path, shown.output)
    create = runner.invoke(app, ["topic", "create", "--help"], env={"COLUMNS": "200"}, terminal_width=200).output
    assert "Usage: nodi topic create [OPTIONS] NAME" in create
    assert re.search(r"--partitions\s+INTEGER", create)
    assert re.search(r"--json\s+Print JSON", create)  # a flag shows no value


def _nodi(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        NODI + list(args), capture_output=True, timeout=TIMEOUT_S, env=ENVIRONMENT, stdin=subprocess.DEVNULL, text=True
    )


def test_a_bad_option_value_is_exit_2_in_the_cli_s_own_words():
    below = _nodi("--server", "127.0.0.1:1", "topic", "create", "t", "--partitions", "0")
    assert below.returncode == 2 and "0 is below the minimum 1" in below.stderr, below.stderr
    not_a_number = _nodi("--server", "127.0.0.1:1", "consume", "t", "--count", "many")
    assert not_a_number.returncode == 2 and "'many' is not an integer" in not_a_number.stderr, not_a_number.stderr
    repeated = _nodi("--server", "127.0.0.1:1", "group", "reset", "g", "t", "--partition", "-1", "--to", "earliest")
    assert repeated.returncode == 2 and "-1 is below the minimum 0" in repeated.stderr, repeated.stderr
    for error in (below, not_a_number, repeated):
        assert "Input should" not in error.stderr


def test_serve_with_a_port_out_of_range_is_a_usage_error(tmp_path):
    refused = _nodi("serve", "--data-dir", str(tmp_path / "data"), "--port", "70000", "--metrics-port", "-1")
    assert refused.returncode == 2, refused.stderr
    assert "port 70000 outside 0..65535" in refused.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_status_shows_queue_groups_and_hides_internal_groups(server):
    """A queue group with leased messages shows pending, in flight and the oldest unacked
    age; the `nodi.dlq` cursor (a stream group) is hidden unless --internal."""
    import json

    with Client(server.address) as client:
        client.create_topic("papercut-jobs", 2)
        for number in range(4):
            client.produce("papercut-jobs", f"job {number}".encode(), partition=number % 2)
        client.create_topic("papercut-jobs.dlq", 1)
        client.produce("papercut-jobs.dlq", b"dead")
        client.commit_offsets("nodi.dlq", {("papercut-jobs.dlq", 0): 0})
        client.commit_offsets("papercut-readers", {("papercut-jobs", 0): 1})
        with client.queue("papercut-jobs", "papercut-workers", ack_wait_ms=60_000) as queue:
            received = queue.receive(timeout_ms=10_000)
            assert received is not None
            shown = subprocess.run(
                NODI + ["--server", server.address, "status", "--json"],
                capture_output=True,
                timeout=TIMEOUT_S,
                env=ENVIRONMENT,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            table = subprocess.run(
                NODI + ["--server", server.address, "status"],
                capture_output=True,
                timeout=TIMEOUT_S,
                env=ENVIRONMENT,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            internal = subprocess.run(
                NODI + ["--server", server.address, "status", "--json", "--internal"],
                capture_output=True,
                timeout=TIMEOUT_S,
                env=ENVIRONMENT,
                stdin=subprocess.DEVNULL,
                text=True,
            )
    assert shown.returncode == 0 and table.returncode == 0 and internal.returncode == 0, shown.stderr + table.stderr
    snapshot = json.loads(shown.stdout)
    groups = {group["group"] for group in snapshot["groups"]}
    assert "papercut-readers" in groups and "nodi.dlq" not in groups
    assert "nodi.dlq" in {group["group"] for group in json.loads(internal.stdout)["groups"]}
    [queue] = [queue for queue in snapshot["queue_groups"] if queue["group"] == "papercut-workers"]
    assert queue["topic"] == "papercut-jobs" and queue["pending"] == 4
    assert 1 <= queue["in_flight"] <= 4  # the client may lease ahead of receive
    assert queue["dead_lettered"] == 0 and queue["dead_letter_topic"] == "papercut-jobs.dlq"
    assert queue["oldest_unacked_age_ms"] is not None and queue["oldest_unacked_age_ms"] >= 0
    lines = table.stdout.splitlines()
    assert any(line.split()[:4] == ["QUEUE", "GROUP", "TOPIC", "PENDING"] for line in lines)
    assert any(line.split()[:3] == ["papercut-workers", "papercut-jobs", "4"] for line in lines)
    assert not any(line.startswith("nodi.dlq") for line in lines)


def test_bench_is_a_typer_command_whose_options_are_declared_once() -> None:
    """`nodi bench --help` is nodi's help with --suite; each tool's argparse parser is
    built from the same declarations (cli/bench.py BENCH_OPTIONS)."""
    import argparse

    from nodi.cli.bench import BENCH_OPTIONS, TOOLS, _load_tool

    shown = _nodi("bench", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "bench [OPTIONS]" in shown.stdout and "--suite" in shown.stdout
    assert "broker_bench" not in shown.stdout.split("Options")[0] and "issue" not in shown.stdout
    for suite, file in (("broker", "broker_bench.py"), ("queues", "queue_bench.py")):
        module = _load_tool(TOOLS / file)  # tools.<name>, as nodi bench loads it
        captured: dict[str, set[str]] = {}
        original = argparse.ArgumentParser.parse_args

        def capture(self, *args, captured=captured, original=original, **kwargs):
            captured["flags"] = {
                flag
                for action in self._actions
                for flag in action.option_strings
                if action.help is not argparse.SUPPRESS
            }
            return original(self, *args, **kwargs)

        # A spy on every parser the module builds (the ignores: assigning to a method).
        argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
        try:
            module.parse_arguments(["--quick"])
        finally:
            argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
        declared = {option.flag for option in BENCH_OPTIONS if suite in option.suites}
        assert captured["flags"] - {"-h", "--help"} == declared, suite
        assert f"--{'rounds' if suite == 'broker' else 'requests'}" in shown.stdout
    other = _nodi("bench", "--suite", "queues", "--rounds", "2")
    assert other.returncode == 2 and "--rounds is an option of --suite broker" in other.stderr
