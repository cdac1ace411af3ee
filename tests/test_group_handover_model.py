"""A hypothesis model of the two-step handover (issue 17): the real coordinator
(broker/server/groups.py) driven by simulated consumers that behave as
broker/client/consumer.py does, through random joins, leaves, crashes, polls, commits,
heartbeats and the passing of time.

Checked at every step:
- a partition has at most one consumer that may fetch it (a live consumer whose
  membership a heartbeat confirmed within its session timeout, holding the partition in
  the assignment it would read from on its next poll);
- no committed offset ever goes backwards.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from nodi.broker.protocol.errors import ErrorCode
from nodi.broker.server.groups import GroupError

from test_groups import World

GROUP = "g"
TOPIC = "t"
PARTITIONS = 5

Key = tuple[str, int]


def keys_of(assignments: dict[str, list[int]]) -> set[Key]:
    return {(topic, partition) for topic, partitions in assignments.items() for partition in partitions}


@dataclass
class SimulatedConsumer:
    """What consumer.py keeps: the adopted generation and assignment, a position per
    partition, the generation a heartbeat told of (pending), the last confirmed
    heartbeat."""

    member_id: str
    session_ms: int
    generation: int
    assignment: set[Key]
    last_ok_ms: int
    positions: dict[Key, int] = field(default_factory=dict)
    pending: tuple[int, set[Key]] | None = None
    alive: bool = True

    def fenced(self, now_ms: int) -> bool:
        return now_ms - self.last_ok_ms >= self.session_ms

    def next_reads(self) -> set[Key]:
        """What its next poll() may deliver from: poll() adopts a pending generation first."""
        return self.pending[1] if self.pending is not None else self.assignment


class HandoverModel(RuleBasedStateMachine):
    consumers = Bundle("consumers")

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory()
        self.world = World(Path(self.directory.name))
        self.world.topics.clear()
        self.world.topics[TOPIC] = PARTITIONS
        self.committed: dict[Key, int] = {}
        self.all: list[SimulatedConsumer] = []

    def teardown(self) -> None:
        self.world.metadata.close()
        self.directory.cleanup()

    @property
    def now_ms(self) -> int:
        return self.world.clock.now_ms

    # -- what a consumer does ------------------------------------------------------------

    def _join(self, consumer: SimulatedConsumer | None, session_ms: int) -> SimulatedConsumer:
        joined = self.world.groups.join(GROUP, "", "model", [TOPIC], session_ms)
        if consumer is None:
            consumer = SimulatedConsumer(joined.member_id, session_ms, 0, set(), self.now_ms)
            self.all.append(consumer)
        consumer.member_id = joined.member_id
        consumer.generation = joined.generation
        consumer.assignment = keys_of(joined.assignments)
        consumer.positions = {}
        consumer.pending = None
        consumer.last_ok_ms = self.now_ms
        return consumer

    def _commit(self, consumer: SimulatedConsumer, positions: dict[Key, int]) -> None:
        if not positions:
            return
        result = self.world.groups.commit(
            GROUP,
            consumer.generation,
            consumer.member_id,
            [(topic, partition, offset, None) for (topic, partition), offset in sorted(positions.items())],
        )
        for entry in result.results:
            key = (entry.topic, entry.partition)
            if entry.error_code == ErrorCode.NONE:
                assert positions[key] >= self.committed.get(key, 0), "a committed offset went backwards"
                self.committed[key] = positions[key]
            elif entry.error_code == ErrorCode.ILLEGAL_GENERATION:
                consumer.positions.pop(key, None)  # taken meanwhile: re-read from the commit if ours again

    def _heartbeat(self, consumer: SimulatedConsumer) -> None:
        try:
            result = self.world.groups.heartbeat(GROUP, consumer.member_id, consumer.generation)
        except GroupError as error:
            assert error.code == ErrorCode.UNKNOWN_MEMBER
            self._join(consumer, consumer.session_ms)  # expired: join again, read the commits
            return
        consumer.last_ok_ms = self.now_ms
        if result.error_code == ErrorCode.REBALANCE_IN_PROGRESS and result.generation > consumer.generation:
            consumer.pending = (result.generation, keys_of(result.assignments))

    def _adopt(self, consumer: SimulatedConsumer) -> None:
        assert consumer.pending is not None
        generation, assignment = consumer.pending
        consumer.pending = None
        self._commit(consumer, dict(consumer.positions))  # everything handled, with the old generation
        for key in consumer.assignment - assignment:
            consumer.positions.pop(key, None)
        consumer.assignment = assignment
        consumer.generation = generation
        self._heartbeat(consumer)  # the acknowledgement that releases what was revoked

    def _live(self, consumer: SimulatedConsumer) -> bool:
        return consumer.alive and consumer in self.all

    # -- rules ----------------------------------------------------------------------------

    @rule(target=consumers, session_ms=st.sampled_from([1_000, 3_000]))
    def join(self, session_ms: int):
        return self._join(None, session_ms)

    @rule(consumer=consumers)
    def heartbeat(self, consumer: SimulatedConsumer) -> None:
        if self._live(consumer):
            self._heartbeat(consumer)

    @rule(consumer=consumers, handled=st.integers(0, 20), pick=st.integers(0, PARTITIONS - 1))
    def poll_and_handle(self, consumer: SimulatedConsumer, handled: int, pick: int) -> None:
        """poll(): adopt what a heartbeat told of, then deliver from one partition, which
        the application handles."""
        if not self._live(consumer) or consumer.fenced(self.now_ms):
            return
        if consumer.pending is not None:
            self._adopt(consumer)
        if not consumer.assignment or consumer.fenced(self.now_ms):
            return
        for key in consumer.assignment:
            consumer.positions.setdefault(key, self.committed.get(key, 0))
        key = sorted(consumer.assignment)[pick % len(consumer.assignment)]
        for other in self.all:
            if other is not consumer and other.alive and not other.fenced(self.now_ms):
                assert key not in other.next_reads(), f"{key} read by two members"
        consumer.positions[key] += handled

    @rule(consumer=consumers)
    def commit(self, consumer: SimulatedConsumer) -> None:
        if self._live(consumer):
            self._commit(consumer, dict(consumer.positions))

    @rule(consumer=consumes(consumers))
    def close(self, consumer: SimulatedConsumer) -> None:
        """A clean close: commit what was handled, then leave."""
        if not self._live(consumer):
            return
        self._commit(consumer, dict(consumer.positions))
        try:
            self.world.groups.leave(GROUP, consumer.member_id)
        except GroupError as error:
            assert error.code == ErrorCode.UNKNOWN_MEMBER
        self.all.remove(consumer)

    @rule(consumer=consumers)
    def crash(self, consumer: SimulatedConsumer) -> None:
        """SIGKILL: nothing more from it; the coordinator finds out by the session timeout."""
        consumer.alive = False

    @rule(milliseconds=st.integers(0, 2_500))
    def time_passes(self, milliseconds: int) -> None:
        self.world.clock.advance(milliseconds)
        self.world.groups.expire(self.now_ms)

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def at_most_one_member_may_read_a_partition(self) -> None:
        readers: dict[Key, int] = {}
        for consumer in self.all:
            if consumer.alive and not consumer.fenced(self.now_ms):
                for key in consumer.next_reads():
                    readers[key] = readers.get(key, 0) + 1
        assert all(count == 1 for count in readers.values()), readers

    @invariant()
    def the_coordinator_gives_a_partition_one_owner(self) -> None:
        try:
            described = self.world.groups.describe(GROUP)
        except GroupError:
            return
        held: list[Key] = []
        for member in described.members:
            held.extend(keys_of(member.assignments) | keys_of(member.revoking))
        assert len(held) == len(set(held))
        if described.members:
            assert set(held) == {(TOPIC, partition) for partition in range(PARTITIONS)}

    @invariant()
    def committed_offsets_match_the_store(self) -> None:
        stored = {key: entry.offset for key, entry in self.world.groups.fetch_offsets(GROUP).items()}
        assert stored == self.committed


HandoverModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestHandoverModel = HandoverModel.TestCase


def test_the_model_finds_a_member_that_reads_without_letting_go() -> None:
    """The model is able to fail: a consumer that ignores revocations (reads its old
    assignment) is caught reading a partition its new owner reads."""
    machine = HandoverModel()
    try:
        a = machine.join(3_000)
        b = machine.join(3_000)
        assert isinstance(a, SimulatedConsumer)  # a rule's result, typed as a Bundle's
        assert isinstance(b, SimulatedConsumer)
        machine.heartbeat(a)  # a learns its partitions are revoked...
        a.pending = None  # ...and ignores it
        machine.world.groups.heartbeat(GROUP, a.member_id, machine.world.groups.describe(GROUP).generation)
        machine.heartbeat(b)  # b gets them
        with pytest.raises(AssertionError):
            machine.at_most_one_member_may_read_a_partition()
    finally:
        machine.teardown()
