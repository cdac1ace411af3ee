"""`nodi produce` and `nodi consume`: messages from and to the shell.

    echo hello | nodi produce orders                  # one message per line of stdin
    nodi produce orders '{"id": 7}' --key customer-7 --header source=shell --json
    nodi consume orders --group billing --from 2026-12-01T14:00:00Z --json

produce sends VALUE, or without it every line of stdin (the batching, idempotent
producer: fast, and in order per partition); with --json it prints one line per
acknowledged message, in input order, each only once its ack is in. consume prints each
message's value as a line (raw bytes), or with --json one JSON object per message:
keys, values and header values are text when valid UTF-8, else {"base64": "..."}.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from nodi.broker.protocol.headers import is_reserved
from nodi.cli.common import CLI_TIMEOUT_MS, command, connect, fail, json_bytes, parse_position

# Messages sent from stdin whose ack is not printed yet (the reader waits beyond it).
PENDING_ACKS_MAX = 100_000
# How long one consumer poll waits at most: the longest a Ctrl-C waits to be noticed.
POLL_WAIT_MS = 500
# nodi produce --whole: the most of stdin taken as one message (the broker's default
# record_bytes_max; a larger one is refused by the broker anyway).
WHOLE_INPUT_BYTES_MAX = 1024 * 1024


ACKS_CHOICES = ("none", "written", "durable")


def register(app: typer.Typer) -> None:
    """Add `produce` and `consume` to the top-level `nodi` app."""
    command(app, "produce")(produce_command)
    command(app, "consume")(consume_command)


# ---------------------------------------------------------------------------
# produce


def _parse_headers(pairs: list[str]) -> list[tuple[str, str]]:
    headers = []
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise typer.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--header")
        if is_reserved(name):
            raise typer.BadParameter(
                f"{name!r}: the nodi- prefix is reserved for broker features", param_hint="--header"
            )
        headers.append((name, value))
    return headers


def _check_acks(acks: str) -> str:
    if acks not in ACKS_CHOICES:
        raise typer.BadParameter(f"{acks!r} is not one of {', '.join(ACKS_CHOICES)}", param_hint="--acks")
    return acks


def _acked_line(topic: str, partition: int, offset: int) -> str:
    return json.dumps({"topic": topic, "partition": partition, "offset": offset})


def _input_lines(stream) -> Iterator[bytes]:
    """stdin's lines without their line ending (\\n or \\r\\n), as bytes."""
    for line in stream:
        if line.endswith(b"\n"):
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
        yield line


def _read_whole_input(ctx: typer.Context, stream) -> bytes:
    """All of `stream` as one value, refused (exit 1) past WHOLE_INPUT_BYTES_MAX."""
    data = stream.read(WHOLE_INPUT_BYTES_MAX + 1)
    if len(data) > WHOLE_INPUT_BYTES_MAX:
        raise fail(
            f"{ctx.command_path}: --whole: stdin holds more than {WHOLE_INPUT_BYTES_MAX} bytes "
            "(one message is at most the broker's record limit)"
        )
    return data


def produce_command(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="The topic to write to.")],
    value: Annotated[
        str | None, typer.Argument(help="The message value; without it, one message per line of stdin.")
    ] = None,
    key: Annotated[
        str | None,
        typer.Option("--key", help="The message key (every message's, in stdin mode): picks the partition by hash."),
    ] = None,
    header: Annotated[
        list[str] | None,
        typer.Option("--header", help="A header NAME=VALUE; repeat for more (each message gets them all)."),
    ] = None,
    partition: Annotated[
        int | None, typer.Option("--partition", min=0, help="Write to this partition (default: by key, else spread).")
    ] = None,
    acks: Annotated[
        str,
        typer.Option(
            "--acks",
            callback=_check_acks,
            help='When a message counts as sent: "none" (not waited for; offset -1), "written" (in the '
            'server\'s page cache) or "durable" (fsynced).',
        ),
    ] = "durable",
    ttl_ms: Annotated[
        int | None, typer.Option("--ttl-ms", min=1, help="Each message expires this long after its timestamp (ms).")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="With VALUE: the broker writes it only if no message with this key reached the topic within its "
            "dedup window, and prints the original's offset otherwise.",
        ),
    ] = None,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help='Print {"topic", "partition", "offset"} as a JSON line per acknowledged message, in input '
            "order, once its ack is in.",
        ),
    ] = False,
    whole: Annotated[
        bool,
        typer.Option(
            "--whole",
            help="Send all of stdin, bytes as they are (binary included), as one message (kcat -D, redis-cli -x); "
            f"at most {WHOLE_INPUT_BYTES_MAX // (1024 * 1024)} MiB.",
        ),
    ] = False,
    timeout_ms: Annotated[
        int, typer.Option("--timeout-ms", min=1, help="How long one request may take before it fails (ms).")
    ] = CLI_TIMEOUT_MS,
) -> None:
    """Write messages to a topic: VALUE, or one message per line of stdin, or all of
    stdin as one message with --whole.

    Stdin lines lose their line ending (\\n or \\r\\n) and are sent as they are (bytes).
    Without --json a single VALUE (or --whole) prints "partition P offset O"; stdin mode
    prints a count on stderr.

    Exit status 1 when a message is refused (an unknown topic, for one): the error on
    stderr, after the lines of the messages acknowledged before it.
    """
    headers = _parse_headers(header or [])
    if idempotency_key is not None and value is None:
        raise typer.BadParameter(
            "needs a VALUE (one key for every stdin line would keep only the first)", param_hint="--idempotency-key"
        )
    if whole:
        if value is not None:
            raise typer.BadParameter("takes its value from stdin: give no VALUE", param_hint="--whole")
    payload: str | bytes | None = _read_whole_input(ctx, sys.stdin.buffer) if whole else value
    with connect(ctx, timeout_ms=timeout_ms) as client:
        if payload is not None:
            chosen, offset = client.produce(
                topic,
                payload,
                key=key,
                headers=headers,
                partition=partition,
                acks=acks,
                ttl_ms=ttl_ms,
                idempotency_key=idempotency_key,
            )
            typer.echo(_acked_line(topic, chosen, offset) if json_output else f"partition {chosen} offset {offset}")
            return
        client.describe_topic(topic)  # an unknown topic fails here, before stdin is read
        count = _produce_lines(client, topic, key, headers, partition, acks, json_output, timeout_ms, ttl_ms)
    if not json_output:
        typer.echo(f"produced {count} message(s) to {topic}", err=True)


def _produce_lines(client, topic, key, headers, partition, acks, json_output, timeout_ms, ttl_ms=None) -> int:
    """Send every stdin line through one batching producer. A printer thread takes the
    futures in input order and prints each ack as soon as it is in (so a line typed at
    a terminal is answered at once, not when the next one comes). Returns how many were
    acknowledged; a refusal stops the reading and raises its error once the acks
    before it were printed."""
    from nodi.broker.client.errors import SendFailed

    producer = client.producer(acks=acks, idempotent=acks != "none", timeout_ms=timeout_ms)
    # Bounded, so a broker slower than stdin holds the reader back, not memory.
    pending: queue.Queue = queue.Queue(PENDING_ACKS_MAX)
    state: dict[str, Any] = {"acknowledged": 0, "failure": None}

    def print_acks() -> None:
        while (future := pending.get()) is not None:
            error = future.exception()
            if error is not None:
                state["failure"] = state["failure"] or error
                continue
            chosen, offset = future.result()
            state["acknowledged"] += 1
            if json_output:
                sys.stdout.write(_acked_line(topic, chosen, offset) + "\n")
                if pending.empty():
                    sys.stdout.flush()
        sys.stdout.flush()

    printer = threading.Thread(target=print_acks, name="nodi-produce-acks", daemon=True)
    printer.start()
    try:
        for line in _input_lines(sys.stdin.buffer):
            if state["failure"] is not None:
                break
            pending.put(producer.send(topic, line, key=key, headers=headers, partition=partition, ttl_ms=ttl_ms))
        try:
            producer.flush()
        except SendFailed:
            pass  # the printer meets each failed future: the first of them is raised below
    finally:
        producer.close()
        pending.put(None)
        printer.join()
    if state["failure"] is not None:
        raise state["failure"]
    return state["acknowledged"]


# ---------------------------------------------------------------------------
# consume


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[list[bool]]:
    """SIGINT and SIGTERM set a flag (stopping[0]) instead of raising: the loop ends at
    its next check, commits and leaves the group."""
    stopping = [False]

    def handle(signum, frame) -> None:  # noqa: ARG001
        stopping[0] = True

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopping
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _output_closed(fd: int) -> bool:
    """Whether the reader of `fd` has gone (a pipe whose reader exited, as `| head`
    does): poll(2) reports POLLERR on a pipe's write end then, without a write. A
    terminal or a file never reports it."""
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR, POLLHUP and POLLNVAL are always reported
    return any(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, events in poller.poll(0))


def _ends_at_start(client, consumer, topic: str) -> dict[tuple[str, int], int] | None:
    """--exit-at-end: the end offset of each partition the consumer reads, as it is now,
    leaving out the empty ones; None while a group member has no assignment yet."""
    assignment = consumer.assignment()
    if not assignment:
        return None
    ends = {}
    for _, partition in assignment:
        end = client.list_offsets(topic, partition, "latest")
        if end > client.list_offsets(topic, partition, "earliest"):
            ends[(topic, partition)] = end
    return ends


def _reached(consumer, ends: dict[tuple[str, int], int]) -> bool:
    """Every partition read up to its end offset as it was at start."""
    for (topic, partition), end in ends.items():
        position = consumer.position(topic, partition)
        if position is None or position < end:
            return False
    return True


def _message_line(message) -> bytes:
    return (
        json.dumps(
            {
                "topic": message.topic,
                "partition": message.partition,
                "offset": message.offset,
                "timestamp": message.timestamp,
                "key": json_bytes(message.key),
                "value": json_bytes(message.value),
                "headers": [[name, json_bytes(value)] for name, value in message.headers],
            },
            ensure_ascii=False,
        ).encode()
        + b"\n"
    )


def _give_back(consumer, undelivered) -> None:
    """Messages polled but not printed: their partitions go back to the first of them,
    so the commit at close does not pass them."""
    first: dict[tuple[str, int], int] = {}
    for message in undelivered:
        first.setdefault((message.topic, message.partition), message.offset)
    for (topic, partition), offset in first.items():
        with contextlib.suppress(ValueError):  # no longer assigned: not ours to commit
            consumer.seek(topic, partition, offset)


def consume_command(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="The topic to read.")],
    group: Annotated[
        str | None,
        typer.Option(
            "--group",
            help="Read as a member of this consumer group (sharing the partitions with its other members) and "
            "commit what was printed.",
        ),
    ] = None,
    start: Annotated[
        str,
        typer.Option(
            "--from",
            help="Where to start: earliest, latest, an offset or an ISO-8601 time (the first message at or after "
            "it). With --group only where the group has nothing committed (to replay, nodi group reset).",
        ),
    ] = "earliest",
    partition: Annotated[
        int | None, typer.Option("--partition", min=0, help="Read only this partition (no group membership).")
    ] = None,
    count: Annotated[int | None, typer.Option("--count", min=1, help="Stop after this many messages.")] = None,
    timeout_ms: Annotated[
        int | None,
        typer.Option("--timeout-ms", min=1, help="Stop after this long without a message (ms); default: never."),
    ] = None,
    include_expired: Annotated[
        bool,
        typer.Option("--include-expired", help="Also print messages whose TTL has passed (skipped by default)."),
    ] = False,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON object per message: topic, partition, offset, timestamp (ms), key, value, headers "
            '(a list of name-value pairs); text when valid UTF-8, else {"base64": "..."}.',
        ),
    ] = False,
    exit_at_end: Annotated[
        bool,
        typer.Option(
            "--exit-at-end",
            "-e",
            help="Stop once every partition read has been printed up to its end as it was when reading "
            "began (kcat's -e); with --group, the partitions assigned at start.",
        ),
    ] = False,
) -> None:
    """Print messages of a topic until Ctrl-C, --count, --timeout-ms or --exit-at-end:
    each value as a line (raw bytes), or JSON lines with --json. A closed pipe (`| head`)
    ends it too, within half a second even on a quiet topic.

    With --group, what was printed is committed every 5 s and when it stops (Ctrl-C
    included), so the next run of the group goes on after it. Without --group every
    partition (or --partition) is read from --from.

    Exit status 1 on an unknown topic or partition or a broker error; 0 when it stops.
    """
    position = parse_position(start, "--from")
    output = sys.stdout.buffer
    with connect(ctx) as client, _stop_on_signals() as stopping:
        partitions = client.describe_topic(topic).partition_count
        if partition is not None and partition >= partitions:
            raise fail(f"{ctx.command_path}: UnknownPartition: topic {topic!r} has {partitions} partition(s)")
        consumer = client.consumer(
            topic,
            group,
            start=position,
            partitions=None if partition is None else [partition],
            wait_ms=POLL_WAIT_MS,
            include_expired=include_expired,
        )
        printed = 0
        try:
            consumer.start()
            ends = None  # --exit-at-end: taken once the consumer knows its partitions
            last_message = time.monotonic()  # --timeout-ms counts from when reading begins
            while not stopping[0] and (count is None or printed < count):
                if exit_at_end and ends is None:
                    ends = _ends_at_start(client, consumer, topic)
                if ends is not None and _reached(consumer, ends):
                    break
                if _output_closed(output.fileno()):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
                    break
                wait_ms = POLL_WAIT_MS
                if timeout_ms is not None:
                    remaining_ms = timeout_ms - (time.monotonic() - last_message) * 1000
                    if remaining_ms <= 0:
                        break
                    wait_ms = max(1, min(wait_ms, int(remaining_ms)))
                batch = consumer.poll(wait_ms)
                if not batch:
                    continue
                last_message = time.monotonic()
                taken = batch if count is None else batch[: count - printed]
                if stopping[0]:
                    taken = []
                try:
                    for message in taken:
                        output.write(_message_line(message) if json_output else (message.value or b"") + b"\n")
                    output.flush()
                except BrokenPipeError:
                    _give_back(consumer, batch)
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
                    break
                printed += len(taken)
                _give_back(consumer, batch[len(taken) :])
        finally:
            try:
                if group is not None and not consumer.closed:
                    consumer.commit()  # what was printed; a failure is exit status 1
            finally:
                consumer.close()  # leaves the group
