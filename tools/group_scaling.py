"""Scale a consumer group under load and count the work done twice.

    python tools/group_scaling.py --address 127.0.0.1:9092            # issue 17's scenario
    python tools/group_scaling.py --messages 6000 --starts 0,1,2      # smaller

Produces `--messages` numbered messages on a new topic of `--partitions` partitions,
then starts one group member per entry of `--starts` (seconds after the first), each a
sync Client in a thread of this process that handles `--rate` messages a second (a sleep
per batch). Members named in `--stops` (index:seconds) leave by a clean close then (a
member killed with SIGKILL is in tests/test_group_handover.py). When every message has
been handled, it waits `--settle-s`, reads the broker's handover figures, closes the
members and prints (and with --json-out writes) what was handled and how often.
Bounded: it gives up after `--timeout-s`. Runs with a client from before issue 17 too
(no callbacks, no broker figures), to measure the old behaviour.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from nodi.broker import Client
from nodi.broker.client.consumer import AsyncConsumer


@dataclass
class MemberReport:
    index: int
    handled: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset)
    revoked: list[tuple[str, int]] = field(default_factory=list)
    assigned: list[tuple[str, int]] = field(default_factory=list)
    polls_with_messages: int = 0
    largest_poll: int = 0
    statistics: dict = field(default_factory=dict)


class GroupMember(threading.Thread):
    """One member: polls, 'handles' each batch at `rate` messages a second, records it."""

    def __init__(self, index: int, address: str, topic: str, group: str, rate: float, options: dict) -> None:
        super().__init__(name=f"member-{index}", daemon=True)
        self.report = MemberReport(index)
        self._address = address
        self._topic = topic
        self._group = group
        self._rate = rate
        self._options = options
        self._stop_requested = threading.Event()
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def stop(self) -> None:
        self._stop_requested.set()

    def handled(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(self.report.handled)

    def run(self) -> None:
        try:
            with Client(self._address, timeout_ms=10_000) as client:
                callbacks = {}
                if "on_revoked" in inspect.signature(AsyncConsumer).parameters:  # not before issue 17
                    callbacks = {"on_revoked": self.report.revoked.extend, "on_assigned": self.report.assigned.extend}
                consumer = client.consumer(self._topic, group=self._group, **callbacks, **self._options)
                with consumer:
                    while not self._stop_requested.is_set():
                        batch = consumer.poll(200)
                        if not batch:
                            continue
                        self.report.polls_with_messages += 1
                        self.report.largest_poll = max(self.report.largest_poll, len(batch))
                        time.sleep(len(batch) / self._rate)  # the application's work
                        with self._lock:
                            self.report.handled.extend((message.partition, message.offset) for message in batch)
                    self.report.statistics = dataclasses.asdict(consumer.statistics())
        except BaseException as error:  # reported by the driver
            self.error = error


def run(args: argparse.Namespace) -> dict:
    starts = [float(value) for value in args.starts.split(",")]
    stops = {}
    for entry in filter(None, (args.stops or "").split(",")):
        index, _, at = entry.partition(":")
        stops[int(index)] = float(at)
    topic = args.topic or f"scaling-{int(time.time() * 1000)}"
    group = f"{topic}-group"
    with Client(args.address, timeout_ms=30_000) as client:
        client.create_topic(topic, partitions=args.partitions)
        producer = client.producer(linger_ms=5)
        for number in range(args.messages):
            producer.send(topic, str(number).encode(), partition=number % args.partitions)
        producer.flush()
        producer.close()
        options = {"session_timeout_ms": args.session_timeout_ms}
        members: list[GroupMember] = []
        began = time.monotonic()
        deadline = began + args.timeout_s
        pending = sorted(range(len(starts)), key=lambda index: starts[index])
        stopped: set[int] = set()
        while True:
            now = time.monotonic() - began
            while pending and starts[pending[0]] <= now:
                member = GroupMember(pending.pop(0), args.address, topic, group, args.rate, options)
                members.append(member)
                member.start()
            for member in members:
                at = stops.get(member.report.index)
                if at is not None and at <= now and member.report.index not in stopped:
                    member.stop()
                    member.join(60)
                    stopped.add(member.report.index)
            errors = [member.error for member in members if member.error is not None]
            if errors:
                raise errors[0]
            handled = Counter(key for member in members for key in member.handled())
            if not pending and len(handled) >= args.messages and stopped >= set(stops):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"gave up after {args.timeout_s} s: {len(handled)} of {args.messages} handled")
            time.sleep(0.05)
        elapsed_s = time.monotonic() - began
        time.sleep(args.settle_s)  # let the last handovers finish before reading the figures
        # While the group has members (a broker from before issue 17 has no figures).
        handovers = client.describe_handovers(group) if hasattr(client, "describe_handovers") else None
        for member in members:
            member.stop()
        for member in members:
            member.join(60)
    handled = Counter(key for member in members for key in member.report.handled)
    twice = sum(count - 1 for count in handled.values())
    return {
        "messages": args.messages,
        "partitions": args.partitions,
        "starts_s": starts,
        "rate_per_member": args.rate,
        "handled_distinct": len(handled),
        "handled_total": sum(handled.values()),
        "handled_twice": twice,
        "elapsed_s": round(elapsed_s, 2),
        "largest_poll": max(member.report.largest_poll for member in members),
        "members": [
            {
                "index": member.report.index,
                "handled": len(member.report.handled),
                "revoked": len(member.report.revoked),
                "assigned": len(member.report.assigned),
                "statistics": member.report.statistics,
            }
            for member in members
        ],
        "broker": None if handovers is None else dataclasses.asdict(handovers),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:9092")
    parser.add_argument("--topic", default=None)
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--rate", type=float, default=3_000.0, help="messages a member handles a second")
    parser.add_argument("--starts", default="0,2,4", help="seconds at which each member starts")
    parser.add_argument("--stops", default="", help="index:seconds of members that close cleanly then")
    parser.add_argument("--session-timeout-ms", type=int, default=10_000)
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
