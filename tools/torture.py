#!/usr/bin/env python3
"""Crash torture (issue 8, item 9): Jepsen's queue checks on one machine, for as many
rounds as you like.

    .venv/bin/python tools/torture.py --rounds 20              # about a minute
    .venv/bin/python tools/torture.py --rounds 1000 --json torture.json
    .venv/bin/python tools/torture.py --power-loss --rounds 200
    nodi torture --rounds 20                                  # the same tool
    make torture ROUNDS=1000

Server mode (the default). One data directory lives across every round. Each round:

1. start a real `nodi serve` on 127.0.0.1 (an ephemeral port) on that directory, and
   check everything the earlier rounds left (below);
2. run concurrent workloads against it: sync Client producers (Client.produce, acks
   durable or written, a failed produce retried once: plain retries), AsyncClient producers (each
   message with an idempotency key: publish dedup), the batching Producer (idempotent),
   stream-group consumers (a group with fixed partitions, reading and committing) and
   queue-group consumers (receiving, acking, now and then a nack);
3. SIGKILL the broker at a random moment, then stop the workers (every call has a
   timeout; a worker still running after WORKER_JOIN_TIMEOUT_S is a violation).

The next round's start is the restart. After the last round one more start checks the
last kill, drains the queue group and the stream group, checks them again and stops the
broker with SIGTERM.

What each worker sent, what the broker acknowledged (partition, offset), what the
consumers read, what the stream group committed and which queue acks were answered go to
the tool's own history file (JSON lines, outside the data directory; fsynced before the
kill and after the workers stopped), and the check reads it back from there. Message
contents are a function of their id (key, value, headers), so the check needs no copy of
them. The check reads every partition from its start and finds:

- lost: an acknowledged message that is not at the (partition, offset) it was
  acknowledged with;
- changed: a message whose key, value or headers differ from what was sent;
- duplicated: more copies than the guarantees allow (docs/guarantees.md): one for the
  idempotent producer and for messages with an idempotency key (whose in-doubt sends
  are sent again in the next round, within the dedup window), one per attempt for plain
  produce retries;
- phantom: a message in the log that no producer sent;
- gap: offsets not dense per partition (the topic is not compacted);
- unstable read: a message a consumer was handed that the log no longer holds there
  (consumers only see durable messages);
- commit: a stream-group commit that was answered and is not kept, one past the log's
  end, or one over offsets the group never read;
- queue: an answered queue ack delivered again, a queue window whose counts do not add
  up (ack floor <= next offset <= log end, pending <= window - answered acks in it),
  and, after the final drain, a message the group counts as done that was never
  delivered to it nor dead-lettered (the dead-letter topic is read too);
- hung: a worker that did not stop within its timeout.

Power-loss mode (--power-loss) runs at the storage level: storage/simfs.py simulates a
disk that drops, tears, reorders or garbles writes not yet fsynced, and it lives inside
one process, so a `nodi serve` process cannot run on it. Each round opens the partitions'
Logs (fsync policy always) on the one simulated disk that lives across rounds, appends
from three threads (an append is acknowledged when it returns: after its fsync; one
thread appends plain batches, the other two are idempotent producers that keep their
producer id across rounds and first send again, with the same sequence, a batch the last
power loss left in doubt), cuts the power after a random number of file operations (or at
a random time), brings it back with a random crash mode (and now and then cuts it again
during the reopen), reopens the Logs (recovery) and checks the same things on what they
hold; an append that fails while the power is on is a violation too (error).

--json PATH writes the summary: rounds, acknowledged messages checked, each kind of
violation in all and per round. The exit status is 1 when anything was found, 2 on bad
arguments, 130 on Ctrl-C (the broker is killed on the way out in every case).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import logging
import os
import platform
import queue as queue_module
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

TOPIC = "torture"
STREAM_GROUP = "torture-stream"
QUEUE_GROUP = "torture-queue"
DEAD_LETTER_TOPIC = TOPIC + ".dlq"
ID_HEADER = "torture-id"
RESERVED_PREFIX = "nodi-"  # broker feature headers (the idempotency key): not compared

# Kinds of producer, and how many copies of one message the guarantees allow.
SYNC, ASYNC, BATCH = "sync", "async", "batch"
LOG, LOG_IDEMPOTENT = "log", "log-idempotent"  # power-loss mode: plain and idempotent appends
# Idempotency key, idempotent producer; storage-level appends (plain ones are never sent
# twice, idempotent ones are sent again with the same sequence).
ONE_COPY_KINDS = frozenset({ASYNC, BATCH, LOG, LOG_IDEMPOTENT})

# Every wait has a bound.
BROKER_START_TIMEOUT_S = 60
BROKER_STOP_TIMEOUT_S = 30
WORKER_JOIN_TIMEOUT_S = 60
CLIENT_TIMEOUT_MS = 3_000
DRAIN_TIMEOUT_S = 120
QUEUE_ACK_WAIT_MS = 2_000  # a lease held at a kill comes back this long after it
RESEND_ATTEMPTS_MAX = 3  # a message still in doubt after this many attempts is left
# In-doubt messages with an idempotency key are sent again in the next round; that must
# fall inside the topic's dedup window (the server's default: two minutes).
ROUND_SECONDS_MAX = 60.0
EXAMPLES_MAX = 20  # violations printed per kind
OUTPUT_LINES_KEPT = 200  # of the broker's output, for a failed start

VIOLATION_KINDS = (
    "lost",
    "changed",
    "duplicated",
    "phantom",
    "gap",
    "unstable_read",
    "commit",
    "queue",
    "hung",
    "shutdown",
    "error",
)


# -- messages ---------------------------------------------------------------------------


def content_of(message_id: str) -> tuple[bytes | None, bytes, tuple[tuple[str, bytes], ...]]:
    """The key, value and headers of message `message_id`: a pure function of the id, so
    the check needs no copy. Sizes and the key's presence vary with the id."""
    digest = hashlib.blake2b(message_id.encode(), digest_size=16).digest()
    key = None if digest[0] % 7 == 0 else b"k-" + message_id.encode()
    filler = (digest * 40)[: digest[1] * 2]
    value = message_id.encode() + b"|" + filler
    headers = [(ID_HEADER, message_id.encode())]
    if digest[2] % 3 == 0:
        headers.append(("torture-extra", digest[3 : 3 + digest[2] % 9]))
    return key, value, tuple(headers)


def id_of(headers: Iterable[tuple[str, bytes | None]], value: bytes | None) -> str | None:
    for name, header_value in headers:
        if name == ID_HEADER and header_value is not None:
            return header_value.decode(errors="replace")
    if value and b"|" in value:
        return value.partition(b"|")[0].decode(errors="replace")
    return None


@dataclass(frozen=True, slots=True)
class Record:
    """One record read back from a partition (headers without the reserved ones)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple


def record_of(partition: int, offset: int, key, value, headers) -> Record:
    kept = tuple((name, header_value) for name, header_value in headers if not name.startswith(RESERVED_PREFIX))
    return Record(partition, offset, key, value, kept)


# -- the history file -------------------------------------------------------------------


class History:
    """The tool's own record of what happened: JSON lines, appended by every worker
    (thread-safe), fsynced by sync(). Events:

    send(id, kind)          about to send message id (once per attempt)
    ack(id, p, o)           the broker acknowledged it at (p, o)
    read(id, p, o)          the stream group was handed it
    commit(p, o)            the stream group's commit of next offset o was answered
    deliver(id, p, o, n)    the queue group was handed it, delivery count n
    qack(p, o)              the queue group's ack of (p, o) was answered
    round(...)              a round began (what it did comes in the summary)
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()

    def write(self, event: str, **fields) -> None:
        line = json.dumps({"e": event, **fields}, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)

    def sync(self) -> None:
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()

    @staticmethod
    def load(path: str, position: int = 0) -> tuple[list[dict], int]:
        """The events from byte `position` on, and the position after the last whole line
        (a torn last line, the tool itself killed, is left for later)."""
        events = []
        with open(path, "rb") as file:
            file.seek(position)
            for line in file:
                if not line.endswith(b"\n"):
                    break
                events.append(json.loads(line))
                position += len(line)
        return events, position


@dataclass
class Ledger:
    """What the history says, folded for the check. The lists keep their order, so a
    check can take up where the last one stopped."""

    kinds: dict[str, str] = field(default_factory=dict)  # id -> producer kind
    attempts: collections.Counter = field(default_factory=collections.Counter)  # id -> sends
    acked: collections.Counter = field(default_factory=collections.Counter)  # id -> acknowledgements
    acks: list = field(default_factory=list)  # (id, p, o), every acknowledgement in order
    reads: dict = field(default_factory=dict)  # (p, o) -> id the stream group was handed there
    read_log: list = field(default_factory=list)  # (id, p, o), each new (p, o, id) read
    commits: dict[int, int] = field(default_factory=dict)  # p -> the highest answered commit
    deliveries: dict = field(default_factory=dict)  # (p, o) -> id the queue group was handed there
    delivery_log: list = field(default_factory=list)  # (id, p, o), each new (p, o, id) delivered
    queue_acked: set = field(default_factory=set)  # (p, o) whose ack was answered
    redelivered_after_ack: list = field(default_factory=list)
    position: int = 0  # how far into the history file this ledger has read

    def catch_up(self, path: str) -> Ledger:
        """Fold in what the history file gained since the last call."""
        events, self.position = History.load(path, self.position)
        for event in events:
            self.add(event)
        return self

    @classmethod
    def from_events(cls, events: Iterable[dict]) -> Ledger:
        ledger = cls()
        for event in events:
            ledger.add(event)
        return ledger

    def add(self, event: dict) -> None:
        kind = event["e"]
        if kind == "send":
            self.kinds[event["id"]] = event["kind"]
            self.attempts[event["id"]] += 1
        elif kind == "ack":
            self.acked[event["id"]] += 1
            self.acks.append((event["id"], event["p"], event["o"]))
        elif kind == "read":
            where = (event["p"], event["o"])
            if self.reads.get(where) != event["id"]:
                self.reads.setdefault(where, event["id"])
                self.read_log.append((event["id"], *where))
        elif kind == "commit":
            self.commits[event["p"]] = max(self.commits.get(event["p"], 0), event["o"])
        elif kind == "deliver":
            where = (event["p"], event["o"])
            if where in self.queue_acked:
                self.redelivered_after_ack.append((event["id"], *where, event["n"]))
            if self.deliveries.get(where) != event["id"]:
                self.deliveries.setdefault(where, event["id"])
                self.delivery_log.append((event["id"], *where))
        elif kind == "qack":
            self.queue_acked.add((event["p"], event["o"]))

    def in_doubt(self, kind: str) -> list[str]:
        """Messages of `kind` sent and never acknowledged, that may be sent again."""
        return [
            message_id
            for message_id, sent_kind in self.kinds.items()
            if sent_kind == kind and message_id not in self.acked and self.attempts[message_id] < RESEND_ATTEMPTS_MAX
        ]


# -- the check ----------------------------------------------------------------------------


@dataclass
class Findings:
    """Violations by kind: each a short description."""

    checked: int = 0  # acknowledged messages checked
    records: int = 0  # records read back
    found: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in VIOLATION_KINDS})

    def add(self, kind: str, text: str) -> None:
        self.found[kind].append(text)

    def counts(self) -> dict[str, int]:
        return {kind: len(texts) for kind, texts in self.found.items()}

    @property
    def total(self) -> int:
        return sum(len(texts) for texts in self.found.values())

    def merge(self, other: Findings) -> None:
        for kind, texts in other.found.items():
            self.found[kind].extend(texts)

    def lines(self) -> list[str]:
        out = []
        for kind, texts in self.found.items():
            for text in texts[:EXAMPLES_MAX]:
                out.append(f"  {kind}: {text}")
            if len(texts) > EXAMPLES_MAX:
                out.append(f"  {kind}: ... and {len(texts) - EXAMPLES_MAX} more")
        return out


@dataclass
class LogView:
    """What the checks have read of the partitions so far: the id at each offset (None:
    not a message of ours), from each partition's start. A round reads only what lies
    past it (a full check starts a new view); the lost, duplicated and read checks run
    over all of it every time. `reported` keeps a violation from being counted again in
    a later round."""

    starts: dict[int, int] = field(default_factory=dict)
    ids: dict[int, list[str | None]] = field(default_factory=dict)
    copies: collections.Counter = field(default_factory=collections.Counter)
    reported: set = field(default_factory=set)
    # How far into the ledger's acks, read_log and delivery_log this view has checked
    # (what it holds below its end never changes, so those need no second look).
    acks_checked: int = 0
    reads_checked: int = 0
    deliveries_checked: int = 0

    def end(self, partition: int) -> int | None:
        if partition not in self.ids:
            return None
        return self.starts[partition] + len(self.ids[partition])

    def at(self, partition: int, offset: int) -> str | None:
        ids = self.ids.get(partition)
        if ids is None:
            return None
        index = offset - self.starts[partition]
        return ids[index] if 0 <= index < len(ids) else None

    def truncate(self, partition: int, end: int) -> None:
        """The partition now ends at `end`, below what was read before."""
        ids = self.ids[partition]
        keep = max(0, end - self.starts[partition])
        for message_id in ids[keep:]:
            if message_id is not None:
                self.copies[message_id] -= 1
        del ids[keep:]
        self.acks_checked = self.reads_checked = self.deliveries_checked = 0  # look at all again

    def fresh(self) -> LogView:
        """An empty view for a full check, that remembers what was reported."""
        return LogView(reported=self.reported)


def check_log(
    ledger: Ledger,
    partitions: dict[int, list[Record]],
    starts: dict[int, int] | None = None,
    view: LogView | None = None,
) -> Findings:
    """Check what the partitions hold against the ledger: lost, changed, duplicated,
    phantom, gap, unstable read. `partitions` holds, per partition, the records past what
    `view` read before (all of them with a new view: from `starts`, default 0), in offset
    order."""
    view = LogView() if view is None else view
    findings = Findings()

    def report(kind: str, key, text: str) -> None:
        if (kind, key) not in view.reported:
            view.reported.add((kind, key))
            findings.add(kind, text)

    added: set[str] = set()
    for partition, records in partitions.items():
        if partition not in view.ids:
            view.starts[partition] = (starts or {}).get(partition, 0)
            view.ids[partition] = []
        ids = view.ids[partition]
        for record in records:
            findings.records += 1
            expected = view.end(partition)
            assert expected is not None  # the partition's ids were set up above
            if record.offset != expected:
                report(
                    "gap",
                    (partition, record.offset),
                    f"partition {partition}: offset {record.offset} where {expected} was next",
                )
                ids.extend([None] * max(0, record.offset - expected))
            message_id = id_of(record.headers, record.value)
            if message_id is None or message_id not in ledger.kinds:
                ids.append(None)
                report(
                    "phantom",
                    (partition, record.offset),
                    f"{partition}/{record.offset}: id {message_id!r} was never sent",
                )
                continue
            ids.append(message_id)
            view.copies[message_id] += 1
            added.add(message_id)
            if (record.key, record.value, record.headers) != content_of(message_id):
                report(
                    "changed",
                    (partition, record.offset),
                    f"{partition}/{record.offset}: {message_id} differs from what was sent",
                )
    for message_id in added:  # a count only grows by what was added
        count = view.copies[message_id]
        allowed = 1 if ledger.kinds[message_id] in ONE_COPY_KINDS else ledger.attempts[message_id]
        if count > allowed:
            report(
                "duplicated",
                (message_id, count),
                f"{message_id} ({ledger.kinds[message_id]}): {count} copies, {allowed} allowed",
            )
    for message_id, partition, offset in ledger.acks[view.acks_checked :]:
        held = view.at(partition, offset)
        if held != message_id:
            report(
                "lost",
                (message_id, partition, offset),
                f"{message_id} acknowledged at {partition}/{offset}, which holds {held!r}",
            )
    view.acks_checked = findings.checked = len(ledger.acks)
    for kind, seen, checked in (
        ("stream", ledger.read_log, view.reads_checked),
        ("queue", ledger.delivery_log, view.deliveries_checked),
    ):
        for message_id, partition, offset in seen[checked:]:
            held = view.at(partition, offset)
            if held != message_id:
                report(
                    "unstable_read",
                    (kind, message_id, partition, offset),
                    f"the {kind} group was handed {message_id} at {partition}/{offset}, which now holds {held!r}",
                )
    view.reads_checked, view.deliveries_checked = len(ledger.read_log), len(ledger.delivery_log)
    return findings


def check_commits(ledger: Ledger, committed: dict[int, int], ends: dict[int, int]) -> Findings:
    """A stream-group commit that was answered is kept; none points past the log's end,
    nor over an offset the group never read."""
    findings = Findings()
    for partition, end in ends.items():
        stored = committed.get(partition)
        answered = ledger.commits.get(partition, 0)
        if answered and (stored is None or stored < answered):
            findings.add("commit", f"partition {partition}: commit {answered} was answered, {stored} is stored")
        if stored is not None and stored > end:
            findings.add("commit", f"partition {partition}: committed {stored} is past the log end {end}")
        if stored is not None:
            unread = [offset for offset in range(min(stored, end)) if (partition, offset) not in ledger.reads]
            if unread:
                findings.add(
                    "commit",
                    f"partition {partition}: committed {stored} over {len(unread)} offsets "
                    f"never read (first {unread[0]})",
                )
    return findings


@dataclass(frozen=True, slots=True)
class QueueWindow:
    """One partition of the queue group's description."""

    partition: int
    ack_floor: int
    next_offset: int
    pending: int


def check_queue(ledger: Ledger, windows: Iterable[QueueWindow], ends: dict[int, int]) -> Findings:
    """Answered acks are never undone (no delivery after one) and the window's counts add
    up: ack floor <= next offset <= log end, and what is pending leaves room for every
    answered ack in the window."""
    findings = Findings()
    for message_id, partition, offset, count in ledger.redelivered_after_ack:
        findings.add(
            "queue", f"{message_id} at {partition}/{offset} delivered again (count {count}) after its ack was answered"
        )
    for window in windows:
        end = ends.get(window.partition, 0)
        if not window.ack_floor <= window.next_offset <= end:
            findings.add(
                "queue",
                f"partition {window.partition}: ack floor {window.ack_floor}, next offset "
                f"{window.next_offset}, log end {end}",
            )
            continue
        acked_in_window = sum(
            1
            for offset in range(window.ack_floor, window.next_offset)
            if (window.partition, offset) in ledger.queue_acked
        )
        room = window.next_offset - window.ack_floor - acked_in_window
        if window.pending > room:
            findings.add(
                "queue",
                f"partition {window.partition}: {window.pending} pending in a window of "
                f"{window.next_offset - window.ack_floor} with {acked_in_window} answered acks",
            )
    return findings


def check_drained(
    ledger: Ledger, windows: Iterable[QueueWindow], ends: dict[int, int], dead_lettered: set[tuple[int, int]]
) -> Findings:
    """After the drain: every message is done for the queue group, and every one was
    delivered to it or dead-lettered (none counted done that nobody handled)."""
    findings = Findings()
    for window in windows:
        end = ends.get(window.partition, 0)
        if window.ack_floor != end:
            findings.add(
                "queue",
                f"partition {window.partition}: not drained (ack floor {window.ack_floor}, "
                f"log end {end}, {window.pending} pending)",
            )
        for offset in range(min(window.ack_floor, end)):
            where = (window.partition, offset)
            if where not in ledger.deliveries and where not in dead_lettered:
                findings.add(
                    "queue",
                    f"{window.partition}/{offset} is done for the group but was never delivered nor dead-lettered",
                )
    return findings


# -- the broker process -----------------------------------------------------------------

READY = re.compile(r"nodi listening on ([\d.]+):(\d+)")


class BrokerProcess:
    """A `nodi serve` child on 127.0.0.1 with an ephemeral port. Its output is read by a
    thread (the last lines kept), so the pipe never fills and a start has a deadline."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        self._lines: queue_module.Queue = queue_module.Queue()

    def _spawn(self) -> None:
        self._lines = queue_module.Queue()  # this process's lines only
        command = [
            sys.executable,
            "-m",
            "nodi.cli.main",
            "serve",
            "--data-dir",
            self.data_dir,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--console-port",
            "0",
        ]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True, name="torture-broker-output").start()

    def start(self) -> BrokerProcess:
        """Start it and wait for its 'listening' line."""
        self._spawn()
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue_module.Empty:
                break
            if line is None:
                break
            found = READY.search(line)
            if found:
                self.address = f"{found.group(1)}:{found.group(2)}"
                return self
        self.kill()
        raise RuntimeError("nodi serve did not start within its timeout:\n" + "".join(self.output))

    def start_and_kill(self, after_s: float) -> None:
        """Start `nodi serve` and SIGKILL it `after_s` later, listening or not yet (a
        crash during recovery)."""
        self._spawn()
        time.sleep(after_s)
        self.kill()

    def _read(self, process: subprocess.Popen) -> None:
        lines = self._lines
        assert process.stdout is not None  # started with stdout=PIPE
        for line in process.stdout:
            self.output.append(line)
            lines.put(line)
        lines.put(None)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def kill(self) -> None:
        """SIGKILL by pid (a crash), and reap it."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(BROKER_STOP_TIMEOUT_S)

    def stop(self) -> int:
        """SIGTERM by pid (a clean shutdown); SIGKILL when it does not end in time."""
        if self.process is None:
            return 0
        process = self.process
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            code = process.wait(BROKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("nodi serve did not stop within its timeout after SIGTERM") from None
        self.process = None
        return code


# -- workloads (server mode) ------------------------------------------------------------


@dataclass
class Workload:
    """What every worker of a round shares."""

    address: str
    round_number: int
    history: History
    rate_per_worker: float = 1_000.0  # messages per second, each producer worker
    killed: threading.Event = field(default_factory=threading.Event)  # the broker was killed
    stop: threading.Event = field(default_factory=threading.Event)  # workers should end
    errors_before_kill: collections.Counter = field(default_factory=collections.Counter)
    resend_sync: list[str] = field(default_factory=list)
    resend_async: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, worker: str, error: BaseException) -> None:
        """A client call failed: expected once the broker is gone, counted before."""
        if not self.killed.is_set():
            with self._lock:
                self.errors_before_kill[f"{worker}: {type(error).__name__}"] += 1

    def running(self) -> bool:
        return not self.stop.is_set()


class Pace:
    """Keeps a worker at `rate` messages per second at most (sleeping on the stop
    event, so a stop ends the wait)."""

    def __init__(self, rate: float, stop: threading.Event) -> None:
        self.rate = rate
        self.stop = stop
        self.sent = 0
        self.started = time.monotonic()

    def wait(self, count: int = 1) -> None:
        self.sent += count
        ahead = self.sent / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            self.stop.wait(ahead)


def _client(workload: Workload):
    from nodi.broker import Client

    return Client(workload.address, timeout_ms=CLIENT_TIMEOUT_MS, reconnect_attempts_max=2, client_id="nodi-torture")


def sync_producer(workload: Workload, number: int) -> None:
    """Client.produce one message at a time; a failed one is tried once more (a plain
    retry: it may be written twice). Even-numbered workers ask for acks "durable", odd
    ones for "written" (answered before the fsync: kept after kill -9 all the same, since
    the page cache survives the process). Worker 0 first sends again what the last round
    left in doubt."""
    name = f"sync{number}"
    acks = "durable" if number % 2 == 0 else "written"
    history = workload.history
    with _client(workload) as client:
        pending = list(workload.resend_sync) if number == 0 else []
        sequence = 0
        pace = Pace(workload.rate_per_worker, workload.stop)
        while workload.running():
            pace.wait()
            if pending:
                message_id = pending.pop()
            else:
                message_id = f"r{workload.round_number}.{name}.{sequence}"
                sequence += 1
            key, value, headers = content_of(message_id)
            for _attempt in range(2):
                if not workload.running():
                    break
                history.write("send", id=message_id, kind=SYNC)
                try:
                    partition, offset = client.produce(
                        TOPIC, value, key=key, headers=headers, acks=acks, timeout_ms=CLIENT_TIMEOUT_MS
                    )
                except Exception as error:  # the broker is killed under it
                    workload.failed(name, error)
                    continue
                history.write("ack", id=message_id, p=partition, o=offset)
                break


def async_producers(workload: Workload, tasks: int) -> None:
    """One AsyncClient, `tasks` concurrent producers on it, each message with its id as
    idempotency key; the first task sends again what the last round left in doubt."""
    from nodi.broker import AsyncClient

    history = workload.history

    async def produce_loop(client, number: int) -> None:
        name = f"async{number}"
        pending = list(workload.resend_async) if number == 0 else []
        sequence = 0
        started = time.monotonic()
        rate = workload.rate_per_worker / tasks
        while workload.running():
            ahead = sequence / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
            if pending:
                message_id = pending.pop()
            else:
                message_id = f"r{workload.round_number}.{name}.{sequence}"
                sequence += 1
            key, value, headers = content_of(message_id)
            history.write("send", id=message_id, kind=ASYNC)
            try:
                partition, offset = await client.produce(
                    TOPIC,
                    value,
                    key=key,
                    headers=headers,
                    idempotency_key=message_id,
                    acks="durable",
                    timeout_ms=CLIENT_TIMEOUT_MS,
                )
            except Exception as error:
                workload.failed(name, error)
                await asyncio.sleep(0.05)
                continue
            history.write("ack", id=message_id, p=partition, o=offset)

    async def main() -> None:
        client = AsyncClient(
            workload.address, timeout_ms=CLIENT_TIMEOUT_MS, reconnect_attempts_max=2, client_id="nodi-torture-async"
        )
        try:
            await asyncio.gather(*(produce_loop(client, number) for number in range(tasks)))
        finally:
            await asyncio.wait_for(client.close(), CLIENT_TIMEOUT_MS / 1000 + 5)

    asyncio.run(main())


def batching_producer(workload: Workload, chunk: int = 50) -> None:
    """The batching Producer (idempotent, acks durable, linger 2 ms): sends `chunk`
    messages, then waits for their futures."""
    history = workload.history
    pace = Pace(workload.rate_per_worker, workload.stop)
    with _client(workload) as client:
        producer = client.producer(
            idempotent=True, linger_ms=2, delivery_timeout_ms=1_000, timeout_ms=CLIENT_TIMEOUT_MS
        )
        sequence = 0
        try:
            while workload.running():
                pace.wait(chunk)
                futures = []
                for _ in range(chunk):
                    message_id = f"r{workload.round_number}.batch.{sequence}"
                    sequence += 1
                    key, value, headers = content_of(message_id)
                    history.write("send", id=message_id, kind=BATCH)
                    try:
                        futures.append((message_id, producer.send(TOPIC, value, key=key, headers=headers)))
                    except Exception as error:
                        workload.failed("batch", error)
                        break
                for message_id, future in futures:
                    try:
                        partition, offset = future.result(timeout=CLIENT_TIMEOUT_MS / 1000 * 3)
                    except Exception as error:
                        workload.failed("batch", error)
                        continue
                    history.write("ack", id=message_id, p=partition, o=offset)
        finally:
            try:
                producer.close(timeout_ms=CLIENT_TIMEOUT_MS)
            except Exception as error:
                workload.failed("batch", error)


def stream_consumer(workload: Workload, partitions: list[int]) -> None:
    """The stream group on fixed partitions (no membership): reads, records each message,
    then commits every few polls and records the answered commit."""
    history = workload.history
    with _client(workload) as client:
        consumer = client.consumer(
            TOPIC,
            group=STREAM_GROUP,
            partitions=partitions,
            auto_commit=False,
            wait_ms=200,
            timeout_ms=CLIENT_TIMEOUT_MS,
        )
        polls = 0
        try:
            while workload.running():
                try:
                    messages = consumer.poll(timeout_ms=300)
                except Exception as error:
                    workload.failed("stream", error)
                    time.sleep(0.05)
                    continue
                for message in messages:
                    history.write(
                        "read", id=id_of(message.headers, message.value), p=message.partition, o=message.offset
                    )
                polls += 1
                if polls % 5 == 0:
                    positions = {p: consumer.position(TOPIC, p) for p in partitions}
                    try:
                        consumer.commit()
                    except Exception as error:
                        workload.failed("stream", error)
                        continue
                    for partition, position in positions.items():
                        if position is not None:
                            history.write("commit", p=partition, o=position)
        finally:
            try:
                consumer.close()
            except Exception as error:
                workload.failed("stream", error)


def queue_consumer(workload: Workload, number: int, seed: int) -> None:
    """The queue group: receive, record, ack (one in twenty nacked, to go round again);
    acks go out batched and are recorded once flush() says they were answered."""
    rng = random.Random(seed)
    history = workload.history
    with _client(workload) as client:
        queue = client.queue(TOPIC, QUEUE_GROUP, ack_wait_ms=QUEUE_ACK_WAIT_MS, batch_max=50)
        acked: list[tuple[int, int]] = []
        try:
            while workload.running():
                try:
                    message = queue.receive(timeout_ms=300)
                    if message is not None:
                        history.write(
                            "deliver",
                            id=id_of(message.headers, message.value),
                            p=message.partition,
                            o=message.offset,
                            n=message.delivery_count,
                        )
                        if rng.random() < 0.05:
                            message.nack(delay_ms=0, wait=False)
                        else:
                            message.ack(wait=False)
                            acked.append((message.partition, message.offset))
                    if acked and (message is None or len(acked) >= 50):
                        queue.flush()
                        for partition, offset in acked:
                            history.write("qack", p=partition, o=offset)
                        acked.clear()
                except Exception as error:
                    workload.failed(f"queue{number}", error)
                    acked.clear()  # in doubt: they may come again
                    time.sleep(0.05)
        finally:
            try:
                queue.close()
            except Exception as error:
                workload.failed(f"queue{number}", error)


# -- server mode ------------------------------------------------------------------------


@dataclass
class Options:
    rounds: int = 10
    seed: int = 0
    duration_s: float | None = None
    round_s: float = 2.0
    partitions: int = 3
    rate: int = 1_500
    segment_bytes: int = 1 << 20
    full_check_every: int = 10
    recovery_kill_probability: float = 0.2
    sync_producers: int = 2
    async_tasks: int = 4
    stream_consumers: int = 2
    queue_consumers: int = 2
    power_loss: bool = False
    work_dir: str | None = None
    keep: bool = False
    json_path: str | None = None
    quiet: bool = False


@dataclass
class RoundResult:
    round: int
    kill_after_s: float = 0.0
    acknowledged: int = 0  # acknowledged in this round
    checked: int = 0  # acknowledged messages checked after this round's crash (cumulative)
    records: int = 0  # records read back in that check
    violations: dict[str, int] = field(default_factory=dict)
    errors_before_kill: dict[str, int] = field(default_factory=dict)
    stop_s: float = 0.0  # from the kill until every worker had stopped
    restart_s: float = 0.0  # the start (recovery) after this round's crash
    check_s: float = 0.0  # the check after that start
    full_check: bool = False  # that check read every partition from its start
    crash_mode: str | None = None  # power-loss mode


def fetch_all(client, topic: str, partition: int, start: int, end: int) -> list:
    """Every message of one partition in [start, end), as the client returns them."""
    messages, offset = [], start
    while offset < end:
        batch, offset_next = client.fetch_with_position(
            topic, partition, offset, bytes_max=4 << 20, include_expired=True, timeout_ms=CLIENT_TIMEOUT_MS * 5
        )
        if offset_next <= offset:
            break
        messages.extend(batch)
        offset = offset_next
    return messages


def read_partitions(
    client, topic: str, partitions: int, view: LogView | None = None
) -> tuple[dict[int, list[Record]], dict[int, int], dict[int, int]]:
    """The records of `topic` past what `view` read (all of them without one), each
    partition's start and its end. A partition now shorter than the view is cut back in
    it (the lost check then names what went)."""
    out, starts, ends = {}, {}, {}
    for partition in range(partitions):
        start = client.list_offsets(topic, partition, "earliest", timeout_ms=CLIENT_TIMEOUT_MS)
        end = client.list_offsets(topic, partition, "latest", timeout_ms=CLIENT_TIMEOUT_MS)
        known = None if view is None else view.end(partition)
        if view is not None and known is not None and end < known:
            view.truncate(partition, end)
            known = end
        first = start if known is None else max(start, known)
        out[partition] = [
            record_of(partition, m.offset, m.key, m.value, m.headers)
            for m in fetch_all(client, topic, partition, first, end)
        ]
        starts[partition], ends[partition] = start, end
    return out, starts, ends


def queue_windows(client) -> list[QueueWindow]:
    from nodi.broker import NodiClientError

    try:
        description = client.describe_queue(TOPIC, QUEUE_GROUP, timeout_ms=CLIENT_TIMEOUT_MS)
    except NodiClientError:
        return []  # no queue group yet
    return [QueueWindow(p.partition, p.ack_floor, p.next_offset, p.pending) for p in description.partitions]


def check_server(
    address: str, ledger: Ledger, history: History, view: LogView, partitions: int
) -> tuple[Findings, dict[int, int]]:
    """Everything the history says against what the restarted broker holds (the log past
    what `view` holds; all of it with a fresh view)."""
    from nodi.broker import Client

    ledger.catch_up(history.path)
    with Client(address, timeout_ms=CLIENT_TIMEOUT_MS) as client:
        records, starts, ends = read_partitions(client, TOPIC, partitions, view)
        findings = check_log(ledger, records, starts, view)
        committed = {p: o for (topic, p), o in client.fetch_offsets(STREAM_GROUP, [TOPIC]).items() if topic == TOPIC}
        findings.merge(check_commits(ledger, committed, ends))
        findings.merge(check_queue(ledger, queue_windows(client), ends))
    return findings, ends


def run_workload(
    broker: BrokerProcess,
    history: History,
    ledger: Ledger,
    options: Options,
    round_number: int,
    rng: random.Random,
    result: RoundResult,
) -> list[str]:
    """Start every worker, SIGKILL the broker at a random moment, stop the workers.
    Returns the names of workers that did not stop in time."""
    producers = options.sync_producers + (1 if options.async_tasks else 0) + 1
    workload = Workload(
        broker.address,
        round_number,
        history,
        rate_per_worker=options.rate / producers,
        resend_sync=ledger.in_doubt(SYNC),
        resend_async=ledger.in_doubt(ASYNC),
    )
    workers: list[tuple[str, Callable, tuple]] = []
    workers += [(f"sync{n}", sync_producer, (workload, n)) for n in range(options.sync_producers)]
    if options.async_tasks:
        workers.append(("async", async_producers, (workload, options.async_tasks)))
    workers.append(("batch", batching_producer, (workload,)))
    groups = [
        [p for p in range(options.partitions) if p % options.stream_consumers == n]
        for n in range(options.stream_consumers)
    ]
    workers += [(f"stream{n}", stream_consumer, (workload, group)) for n, group in enumerate(groups) if group]
    workers += [
        (f"queue{n}", queue_consumer, (workload, n, rng.randrange(1 << 30))) for n in range(options.queue_consumers)
    ]
    failures: list[str] = []

    def guarded(name: str, target: Callable, arguments: tuple) -> None:
        try:
            target(*arguments)
        except Exception as error:  # a worker's own setup or teardown failed
            workload.failed(name, error)

    threads = [
        threading.Thread(target=guarded, args=worker, name=f"torture-{worker[0]}", daemon=True) for worker in workers
    ]
    for thread in threads:
        thread.start()
    result.kill_after_s = round(rng.uniform(0.1, options.round_s), 3)
    time.sleep(result.kill_after_s)
    history.sync()  # what was acknowledged so far is on disk before the kill
    workload.killed.set()
    broker.kill()
    workload.stop.set()
    killed_at = time.monotonic()
    deadline = killed_at + WORKER_JOIN_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            failures.append(thread.name)
    history.sync()
    result.stop_s = round(time.monotonic() - killed_at, 3)
    result.errors_before_kill = dict(workload.errors_before_kill)
    return failures


def drain(address: str, history: History, partitions: int) -> None:
    """After the last kill: the queue group and the stream group read everything left
    (recorded like any delivery), until the queue's ack floors reach the log ends."""
    from nodi.broker import Client

    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    with Client(address, timeout_ms=CLIENT_TIMEOUT_MS) as client:
        ends = {p: client.list_offsets(TOPIC, p, "latest") for p in range(partitions)}
        queue = client.queue(TOPIC, QUEUE_GROUP, ack_wait_ms=QUEUE_ACK_WAIT_MS, batch_max=200)
        acked: list[tuple[int, int]] = []

        def flush() -> None:
            queue.flush()
            for partition, offset in acked:
                history.write("qack", p=partition, o=offset)
            acked.clear()

        with queue:
            while time.monotonic() < deadline:
                message = queue.receive(timeout_ms=500)
                if message is None:
                    flush()
                    windows = {w.partition: w.ack_floor for w in queue_windows(client)}
                    if all(windows.get(p, 0) >= ends[p] for p in range(partitions)):
                        break
                    continue
                history.write(
                    "deliver",
                    id=id_of(message.headers, message.value),
                    p=message.partition,
                    o=message.offset,
                    n=message.delivery_count,
                )
                message.ack(wait=False)
                acked.append((message.partition, message.offset))
                if len(acked) >= 100:
                    flush()
        consumer = client.consumer(
            TOPIC,
            group=STREAM_GROUP,
            partitions=list(range(partitions)),
            auto_commit=False,
            wait_ms=200,
            timeout_ms=CLIENT_TIMEOUT_MS,
        )
        with consumer:
            while time.monotonic() < deadline:
                for record in consumer.poll(timeout_ms=300):
                    history.write("read", id=id_of(record.headers, record.value), p=record.partition, o=record.offset)
                positions = {p: consumer.position(TOPIC, p) for p in range(partitions)}
                if all((position := positions[p]) is not None and position >= ends[p] for p in range(partitions)):
                    consumer.commit()
                    for partition, position in positions.items():
                        history.write("commit", p=partition, o=position)
                    break
    history.sync()


def dead_lettered(client) -> tuple[set[tuple[int, int]], Findings]:
    """The source (partition, offset) of every dead-lettered copy, and whether each copy
    kept its message (key, value and headers of the id it carries)."""
    findings = Findings()
    if DEAD_LETTER_TOPIC not in {summary.name for summary in client.list_topics()}:
        return set(), findings
    sources = set()
    for partition in range(client.partition_count(DEAD_LETTER_TOPIC)):
        start = client.list_offsets(DEAD_LETTER_TOPIC, partition, "earliest", timeout_ms=CLIENT_TIMEOUT_MS)
        end = client.list_offsets(DEAD_LETTER_TOPIC, partition, "latest", timeout_ms=CLIENT_TIMEOUT_MS)
        for message in fetch_all(client, DEAD_LETTER_TOPIC, partition, start, end):
            record = record_of(partition, message.offset, message.key, message.value, message.headers)
            message_id = id_of(record.headers, record.value)
            if message_id is None or (record.key, record.value, record.headers) != content_of(message_id):
                findings.add("changed", f"dead-letter copy {partition}/{message.offset} differs ({message_id!r})")
            source_partition = message.header("nodi-dlq-source-partition")
            source_offset = message.header("nodi-dlq-source-offset")
            if source_partition is None or source_offset is None:
                findings.add("queue", f"dead-letter copy {partition}/{message.offset} names no source")
                continue
            sources.add((int(source_partition), int(source_offset)))
    return sources, findings


def run_server(options: Options, work_dir: str, emit: Callable[[str], None]) -> dict:
    from nodi.broker import UNLIMITED, Client

    data_dir = os.path.join(work_dir, "data")
    history = History(os.path.join(work_dir, "history.jsonl"))
    rng = random.Random(options.seed)
    summary = new_summary(options, work_dir, "server")
    totals = Findings()
    started = time.monotonic()
    broker = BrokerProcess(data_dir)
    results: list[RoundResult] = []
    ledger = Ledger()
    view = LogView()
    try:
        for round_number in range(1, options.rounds + 2):
            final = round_number == options.rounds + 1 or (
                options.duration_s is not None and time.monotonic() - started >= options.duration_s
            )
            if round_number > 1 and rng.random() < options.recovery_kill_probability:
                # A crash during recovery: killed at a random moment of its start.
                summary["recovery_kills"] += 1
                broker.start_and_kill(rng.uniform(0.0, 0.5))
            begun = time.monotonic()
            broker.start()
            restart_s = time.monotonic() - begun
            if round_number == 1:
                with Client(broker.address, timeout_ms=CLIENT_TIMEOUT_MS) as client:
                    client.create_topic(
                        TOPIC,
                        partitions=options.partitions,
                        fsync_policy="always",
                        retention_ms=UNLIMITED,
                        retention_bytes=UNLIMITED,
                        segment_bytes=options.segment_bytes,
                    )
            else:
                previous = results[-1]
                previous.full_check = final or (round_number - 1) % options.full_check_every == 0
                if previous.full_check:
                    view = view.fresh()
                findings, _ = check_server(broker.address, ledger, history, view, options.partitions)
                totals.merge(findings)
                previous.restart_s = round(restart_s, 3)
                previous.check_s = round(time.monotonic() - begun - restart_s, 3)
                previous.checked, previous.records = findings.checked, findings.records
                previous.violations = {k: v for k, v in findings.counts().items() if v}
                summary["acknowledged_checked"] = findings.checked
                emit(round_line(previous, findings))
            if final:
                break
            result = RoundResult(round_number)
            history.write("round", round=round_number)
            acknowledged_before = len(ledger.acks)
            hung = run_workload(broker, history, ledger, options, round_number, rng, result)
            for name in hung:
                totals.add(
                    "hung",
                    f"round {round_number}: worker {name} did not stop within {WORKER_JOIN_TIMEOUT_S} s of the kill",
                )
                result.violations["hung"] = result.violations.get("hung", 0) + 1
            ledger.catch_up(history.path)
            result.acknowledged = len(ledger.acks) - acknowledged_before
            results.append(result)
        # The last start (above) checked the last kill in full; now drain both groups,
        # check again, and stop cleanly.
        begun = time.monotonic()
        drain(broker.address, history, options.partitions)
        summary["drain_s"] = round(time.monotonic() - begun, 1)
        findings, ends = check_server(broker.address, ledger, history, view, options.partitions)
        with Client(broker.address, timeout_ms=CLIENT_TIMEOUT_MS) as client:
            sources, copy_findings = dead_lettered(client)
            findings.merge(copy_findings)
            findings.merge(check_drained(ledger, queue_windows(client), ends, sources))
        summary["final_check"] = {k: v for k, v in findings.counts().items() if v}
        summary["acknowledged_checked"] = findings.checked
        summary["records_checked"] = sum(len(ids) for ids in view.ids.values())
        summary["queue_delivered_offsets"] = len(ledger.deliveries)
        summary["stream_read_offsets"] = len(ledger.reads)
        summary["dead_lettered"] = len(sources)
        summary["workload"] = ledger_statistics(ledger)
        totals.merge(findings)
        emit(
            f"final: drained in {summary['drain_s']} s, {findings.checked:,} acknowledged messages checked, "
            f"{findings.total} violations"
        )
        code = broker.stop()
        if code != 0:
            totals.add("shutdown", f"nodi serve exited {code} on SIGTERM (a clean stop exits 0)")
    finally:
        broker.kill()
        history.close()
    finish_summary(summary, results, totals, started, len(results))
    return summary


# -- power-loss mode --------------------------------------------------------------------

SIM_ROOT = "/torture"
APPEND_THREADS = 3
PRODUCER_ID_BASE = 1_000


def run_power_loss(options: Options, work_dir: str, emit: Callable[[str], None]) -> dict:
    """Storage-level rounds on the simulated disk (see the module docstring)."""
    from nodi.storage.config import FsyncPolicy, LogConfig
    from nodi.storage.errors import NodiError
    from nodi.storage.log import Log
    from nodi.storage.records import NewRecord, build_batch, decode_batches
    from nodi.storage.simfs import CRASH_MODES, SimulatedFileSystem

    rng = random.Random(options.seed)
    history = History(os.path.join(work_dir, "history.jsonl"))
    fs = SimulatedFileSystem()
    fs.make_directory(SIM_ROOT)
    directories = [f"{SIM_ROOT}/{TOPIC}-{p}" for p in range(options.partitions)]
    config = LogConfig(
        segment_bytes=64 * 1024,
        index_interval_bytes=4096,
        fsync_policy=FsyncPolicy.ALWAYS,
        retention_ms=None,
        retention_bytes=None,
    )
    summary = new_summary(options, work_dir, "power-loss")
    totals = Findings()
    results: list[RoundResult] = []
    started = time.monotonic()

    ledger = Ledger()
    view = LogView()
    # (append thread, partition) -> the idempotent producer's next sequence and the batch
    # (ids) a power loss left in doubt, across rounds.
    producers: dict[tuple[int, int], dict] = {}
    retries_found = [0]  # resent batches the log answered with their original offsets

    def read_back(logs: list) -> tuple[dict[int, list[Record]], dict[int, int]]:
        """What the logs hold past what `view` read (a log now shorter is cut back)."""
        out, starts = {}, {}
        for partition, log in enumerate(logs):
            known = view.end(partition)
            if known is not None and log.next_offset < known:
                view.truncate(partition, log.next_offset)
                known = log.next_offset
            records = []
            offset = log.log_start_offset if known is None else max(known, log.log_start_offset)
            while offset < log.next_offset:
                result = log.read(offset, 1 << 20)
                if not result.slices:
                    break
                for record in decode_batches(result.to_bytes()):
                    if record.offset >= offset:
                        records.append(record_of(partition, record.offset, record.key, record.value, record.headers))
                offset = result.next_offset
            out[partition], starts[partition] = records, log.log_start_offset
        return out, starts

    try:
        for round_number in range(1, options.rounds + 2):
            final = round_number == options.rounds + 1 or (
                options.duration_s is not None and time.monotonic() - started >= options.duration_s
            )
            if round_number > 1 and rng.random() < options.recovery_kill_probability:
                # A power loss during recovery: a few file operations into the reopen.
                summary["recovery_kills"] += 1
                fs.halt_after(rng.randint(1, 12))
                opened = []
                try:
                    for directory in directories:
                        opened.append(Log.open(directory, config, fs=fs))
                except (OSError, NodiError):
                    pass
                fs.halt()
                for log in opened:
                    log.close()
                fs.crash(rng, rng.choice(CRASH_MODES))
            begun = time.monotonic()
            logs = [Log.open(directory, config, fs=fs) for directory in directories]
            if round_number > 1:
                previous = results[-1]
                previous.full_check = final or (round_number - 1) % options.full_check_every == 0
                if previous.full_check:
                    view = view.fresh()
                ledger.catch_up(history.path)
                records, starts = read_back(logs)
                findings = check_log(ledger, records, starts, view)
                totals.merge(findings)
                previous.restart_s = round(time.monotonic() - begun, 3)
                previous.checked, previous.records = findings.checked, findings.records
                previous.violations = {k: v for k, v in findings.counts().items() if v}
                summary["acknowledged_checked"] = findings.checked
                emit(round_line(previous, findings))
            if final:
                for log in logs:
                    log.close()
                summary["records_checked"] = sum(len(ids) for ids in view.ids.values())
                summary["workload"] = ledger_statistics(ledger)
                summary["workload"]["idempotent_resends_found_in_log"] = retries_found[0]
                break
            result = RoundResult(round_number)
            history.write("round", round=round_number)
            stop = threading.Event()
            acknowledged: collections.Counter[int] = collections.Counter()

            unexpected: list[str] = []

            def append(number: int, partition: int, ids: list[str], kind: str, sequence: int | None) -> bool:
                """One append of `ids` (an idempotent producer's batch at `sequence`,
                or a plain one); False once the power is off."""
                records = []
                for message_id in ids:
                    key, value, headers = content_of(message_id)
                    records.append(NewRecord(key, value, list(headers), None))
                    history.write("send", id=message_id, kind=kind)
                options_ = (
                    {}
                    if sequence is None
                    else {"producer_id": PRODUCER_ID_BASE + number, "producer_epoch": 0, "base_sequence": sequence}
                )
                try:
                    appended = logs[partition].append(build_batch(records, **options_))
                except (OSError, NodiError) as error:
                    if not fs.halted:  # with the power on, an append must not fail
                        unexpected.append(
                            f"round {round_number}: append to partition {partition} failed with "
                            f"the power on: {type(error).__name__}: {error}"
                        )
                    return False
                for index, message_id in enumerate(ids):
                    history.write("ack", id=message_id, p=partition, o=appended.first_offset + index)
                acknowledged[number] += len(ids)
                if appended.duplicate:
                    retries_found[0] += 1
                return True

            def append_loop(number: int, seed: int) -> None:
                """Thread 0 appends plain batches; the others are idempotent producers
                (one producer id each, across rounds) that first send again, with the same
                sequence, the batch a power loss left in doubt (I6: a batch that survived
                is answered with its original offsets, one that did not is written)."""
                local = random.Random(seed)
                pace = Pace(options.rate / APPEND_THREADS, stop)
                idempotent = number > 0
                for partition in range(len(logs)):
                    state = producers.get((number, partition))
                    if idempotent and state and state["pending"]:
                        if not append(number, partition, state["pending"], LOG_IDEMPOTENT, state["sequence"]):
                            return
                        state["sequence"] += len(state["pending"])
                        state["pending"] = None
                sequence = 0
                while not stop.is_set():
                    partition = local.randrange(len(logs))
                    ids = [f"r{round_number}.log{number}.{sequence + i}" for i in range(local.randint(1, 8))]
                    sequence += len(ids)
                    pace.wait(len(ids))
                    if not idempotent:
                        if not append(number, partition, ids, LOG, None):
                            return
                        continue
                    state = producers.setdefault((number, partition), {"sequence": 0, "pending": None})
                    state["pending"] = ids
                    if not append(number, partition, ids, LOG_IDEMPOTENT, state["sequence"]):
                        return
                    state["sequence"] += len(ids)
                    state["pending"] = None

            threads = [
                threading.Thread(
                    target=append_loop, args=(n, rng.randrange(1 << 30)), daemon=True, name=f"torture-append{n}"
                )
                for n in range(APPEND_THREADS)
            ]
            fs.halt_after(rng.randint(1, 400))
            for thread in threads:
                thread.start()
            begun = time.monotonic()
            deadline = begun + rng.uniform(0.05, options.round_s)
            while time.monotonic() < deadline and not fs.halted:
                stop.wait(0.005)
            history.sync()
            fs.halt()
            result.kill_after_s = round(time.monotonic() - begun, 3)
            killed_at = time.monotonic()
            stop.set()
            hung = []
            join_deadline = time.monotonic() + WORKER_JOIN_TIMEOUT_S
            for thread in threads:
                thread.join(max(0.0, join_deadline - time.monotonic()))
                if thread.is_alive():
                    hung.append(thread.name)
            result.stop_s = round(time.monotonic() - killed_at, 3)
            for log in logs:
                log.close()
            history.sync()
            result.crash_mode = rng.choice(CRASH_MODES)
            fs.crash(rng, result.crash_mode)
            for name in hung:
                totals.add("hung", f"round {round_number}: {name} did not stop within {WORKER_JOIN_TIMEOUT_S} s")
                result.violations["hung"] = result.violations.get("hung", 0) + 1
            for text in unexpected:
                totals.add("error", text)
                result.violations["error"] = result.violations.get("error", 0) + 1
            result.acknowledged = sum(acknowledged.values())
            results.append(result)
    finally:
        history.close()
    finish_summary(summary, results, totals, started, len(results))
    return summary


# -- summary and main -------------------------------------------------------------------


def round_line(result: RoundResult, findings: Findings) -> str:
    full = " (full)" if result.full_check else ""
    text = (
        f"round {result.round}: killed after {result.kill_after_s:.2f} s"
        f"{f' ({result.crash_mode})' if result.crash_mode else ''}, acknowledged {result.acknowledged:,}, "
        f"checked {findings.checked:,} acknowledged ({findings.records:,} records), "
        f"workers stopped in {result.stop_s:.2f} s, restart {result.restart_s:.2f} s, "
        f"check{full} {result.check_s:.2f} s, violations {findings.total}"
    )
    if findings.total:
        text += "\n" + "\n".join(findings.lines())
    return text


def new_summary(options: Options, work_dir: str, mode: str) -> dict:
    return {
        "mode": mode,
        "seed": options.seed,
        "settings": {
            "rounds": options.rounds,
            "duration_s": options.duration_s,
            "round_s": options.round_s,
            "partitions": options.partitions,
            "rate": options.rate,
            "segment_bytes": options.segment_bytes,
            "full_check_every": options.full_check_every,
            "sync_producers": options.sync_producers,
            "async_tasks": options.async_tasks,
            "stream_consumers": options.stream_consumers,
            "queue_consumers": options.queue_consumers,
        },
        "work_dir": work_dir,
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "load_average_start": list(os.getloadavg()),
        },
        "acknowledged_checked": 0,
        "recovery_kills": 0,
    }


def finish_summary(summary: dict, results: list[RoundResult], totals: Findings, started: float, rounds: int) -> None:
    elapsed = time.monotonic() - started
    summary["rounds"] = rounds
    summary["duration_s"] = round(elapsed, 1)
    summary["rounds_per_minute"] = round(rounds / elapsed * 60, 1) if elapsed > 0 else None
    summary["acknowledged"] = sum(result.acknowledged for result in results)
    summary["violations"] = totals.counts()
    summary["violations_total"] = totals.total
    summary["examples"] = totals.lines()
    summary["machine"]["load_average_end"] = list(os.getloadavg())
    summary["per_round"] = [
        {
            "round": r.round,
            "kill_after_s": r.kill_after_s,
            "acknowledged": r.acknowledged,
            "checked": r.checked,
            "records": r.records,
            "stop_s": r.stop_s,
            "restart_s": r.restart_s,
            "check_s": r.check_s,
            "full_check": r.full_check,
            "violations": r.violations,
            "errors_before_kill": r.errors_before_kill,
            **({"crash_mode": r.crash_mode} if r.crash_mode else {}),
        }
        for r in results
    ]
    for kind in ("lost", "changed", "duplicated", "phantom"):
        summary[kind] = summary["violations"][kind]


def ledger_statistics(ledger: Ledger) -> dict:
    """What the workload did, from the history: proof that the check had something to
    check."""
    acknowledged = collections.Counter(ledger.kinds[message_id] for message_id in ledger.acked)
    in_doubt = collections.Counter(kind for message_id, kind in ledger.kinds.items() if message_id not in ledger.acked)
    return {
        "acknowledged_by_kind": dict(acknowledged),
        "sent_never_acknowledged_by_kind": dict(in_doubt),
        "sent_more_than_once": sum(1 for count in ledger.attempts.values() if count > 1),
        "stream_reads": len(ledger.reads),
        "stream_commits_answered": dict(sorted(ledger.commits.items())),
        "queue_deliveries": len(ledger.deliveries),
        "queue_acks_answered": len(ledger.queue_acked),
    }


def parse_arguments(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="torture",
        description="Crash torture: concurrent producers and consumers, SIGKILL of the broker at random moments, "
        "restart, and a check of every acknowledged message (lost, changed, duplicated, phantom) "
        "and of the queue counts. --power-loss: storage-level rounds on the simulated disk "
        "(storage/simfs.py), which cannot run under a server process.",
    )
    parser.add_argument("--rounds", type=int, default=10, help="kill-and-restart rounds (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument(
        "--duration-s",
        type=float,
        default=None,
        help="stop starting rounds after this many seconds (the last one is still checked)",
    )
    parser.add_argument(
        "--round-s",
        type=float,
        default=2.0,
        help=f"the kill comes at a random moment up to this long into a round (default 2, "
        f"at most {ROUND_SECONDS_MAX:.0f})",
    )
    parser.add_argument("--partitions", type=int, default=3, help="partitions of the topic (default 3)")
    parser.add_argument(
        "--rate", type=int, default=1_500, help="messages per second, all producers together, at most (default 1500)"
    )
    parser.add_argument(
        "--segment-bytes",
        type=int,
        default=1 << 20,
        help="the topic's segment size (default 1 MiB: segments roll every few rounds, so kills "
        "land in rolls too, and a restart rescans one small active segment)",
    )
    parser.add_argument(
        "--full-check-every",
        type=int,
        default=10,
        help="read every partition from its start after every this many rounds (default 10; the "
        "others read what is new, and the last check is always full)",
    )
    parser.add_argument("--sync-producers", type=int, default=2, help="Client.produce threads (default 2)")
    parser.add_argument("--async-tasks", type=int, default=4, help="AsyncClient produce tasks (default 4)")
    parser.add_argument("--stream-consumers", type=int, default=2, help="stream-group consumers (default 2)")
    parser.add_argument("--queue-consumers", type=int, default=2, help="queue-group consumers (default 2)")
    parser.add_argument(
        "--power-loss",
        action="store_true",
        help="storage-level rounds: Logs on the simulated disk, appends acknowledged after their "
        "fsync, a power loss (unsynced writes dropped, torn, reordered or garbled), reopen, "
        "check; no server process",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where the data directory and the history go (default: a new temporary directory, "
        "removed after a clean run)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory after a clean run")
    parser.add_argument("--json", dest="json_path", default=None, help="write the JSON summary here")
    parser.add_argument("--quiet", action="store_true", help="print the summary only")
    arguments = parser.parse_args(argv)
    if arguments.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not 0.1 <= arguments.round_s <= ROUND_SECONDS_MAX:
        parser.error(f"--round-s must be between 0.1 and {ROUND_SECONDS_MAX:.0f}")
    if arguments.partitions < 1 or arguments.partitions > 64:
        parser.error("--partitions must be between 1 and 64")
    if arguments.duration_s is not None and arguments.duration_s <= 0:
        parser.error("--duration-s must be positive")
    for name in ("sync_producers", "async_tasks", "stream_consumers", "queue_consumers"):
        if not 0 <= getattr(arguments, name) <= 32:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 32")
    if not 1 <= arguments.rate <= 1_000_000:
        parser.error("--rate must be between 1 and 1000000")
    if not 4096 <= arguments.segment_bytes <= 1 << 30:
        parser.error("--segment-bytes must be between 4096 and 1 GiB")
    if arguments.full_check_every < 1:
        parser.error("--full-check-every must be at least 1")
    if arguments.stream_consumers == 0:
        parser.error("--stream-consumers must be at least 1")
    seed = arguments.seed if arguments.seed is not None else random.SystemRandom().randrange(1 << 31)
    return Options(
        rounds=arguments.rounds,
        seed=seed,
        duration_s=arguments.duration_s,
        round_s=arguments.round_s,
        partitions=arguments.partitions,
        rate=arguments.rate,
        segment_bytes=arguments.segment_bytes,
        full_check_every=arguments.full_check_every,
        sync_producers=arguments.sync_producers,
        async_tasks=arguments.async_tasks,
        stream_consumers=arguments.stream_consumers,
        queue_consumers=arguments.queue_consumers,
        power_loss=arguments.power_loss,
        work_dir=arguments.work_dir,
        keep=arguments.keep,
        json_path=arguments.json_path,
        quiet=arguments.quiet,
    )


class Interrupted(Exception):
    """SIGTERM to the tool: unwind like Ctrl-C, so the broker is killed on the way out."""


def main(argv: list[str] | None = None) -> int:
    options = parse_arguments(argv)
    # The clients log each failed call once the broker is killed under them: expected here.
    logging.getLogger("nodi").setLevel(logging.CRITICAL)
    emit = (lambda line: None) if options.quiet else (lambda line: print(line, flush=True))
    created = options.work_dir is None
    work_dir: str = tempfile.mkdtemp(prefix="nodi-torture-") if options.work_dir is None else options.work_dir
    os.makedirs(work_dir, exist_ok=True)
    if os.path.exists(os.path.join(work_dir, "history.jsonl")):
        print(f"torture: {work_dir} holds a history from an earlier run; give an empty --work-dir", file=sys.stderr)
        return 2

    def on_sigterm(signum, frame):
        raise Interrupted()

    previous = (
        signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() else None
    )
    mode = "power-loss (storage level, simulated disk)" if options.power_loss else "server (nodi serve, SIGKILL)"
    emit(f"torture: {mode}, {options.rounds} rounds, seed {options.seed}, work dir {work_dir}")
    try:
        runner = run_power_loss if options.power_loss else run_server
        summary = runner(options, work_dir, emit)
    except (KeyboardInterrupt, Interrupted):
        print(f"torture: interrupted; the broker was stopped; work dir kept: {work_dir}", file=sys.stderr)
        return 130
    except RuntimeError as error:
        print(f"torture: {error}\nwork dir kept: {work_dir}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if options.json_path:
        with open(options.json_path, "w", encoding="utf-8") as file:
            json.dump(summary, file, indent=2)
            file.write("\n")
    print(
        f"torture: {summary['rounds']} rounds in {summary['duration_s']} s "
        f"({summary['rounds_per_minute']} rounds/min), {summary['acknowledged']:,} acknowledged, "
        f"{summary['acknowledged_checked']:,} acknowledged messages checked; lost {summary['lost']}, "
        f"changed {summary['changed']}, duplicated {summary['duplicated']}, phantom {summary['phantom']}, "
        f"violations in all {summary['violations_total']}"
    )
    for line in summary["examples"]:
        print(line)
    failed = summary["violations_total"] > 0
    if failed or options.keep or not created:
        emit(f"work dir: {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
