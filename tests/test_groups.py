"""The stream-mode group coordinator (broker/server/groups.py): membership, assignment,
rebalances on join, leave and expiry, commit fencing, standalone commits, resets,
listing, limits; and a hypothesis state machine holding the assignment invariant
(every partition of every subscribed topic is owned by exactly one live member that
subscribes to it) through random joins, leaves, heartbeats, expiries and topic changes.

Pure unit tests: a fake clock and a real MetadataStore in a temporary directory."""

from __future__ import annotations

import itertools
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from nodi.broker.protocol.errors import ErrorCode
from nodi.broker.protocol.messages import ResetSpec
from nodi.broker.server.groups import (
    NO_GENERATION,
    STATE_EMPTY,
    STATE_REBALANCING,
    STATE_STABLE,
    GroupCoordinator,
    GroupError,
    GroupLimits,
    OffsetToCommit,
    PartitionResult,
    assign_partitions,
)
from nodi.broker.server.reply import error_code_for
from nodi.storage.metadata import MetadataStore

SESSION_MS = 10_000


class FakeClock:
    def __init__(self) -> None:
        self.now_ms = 1_000_000

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, milliseconds: int) -> None:
        self.now_ms += milliseconds


class World:
    """A coordinator over a dict of topics, a fake clock and a real metadata store."""

    def __init__(self, directory: Path, limits: GroupLimits = GroupLimits()) -> None:
        self.topics: dict[str, int] = {"orders": 6}
        self.clock = FakeClock()
        self.metadata = MetadataStore(directory)
        self.groups = GroupCoordinator(self.metadata, self.topics.get, self.clock, limits)

    def join(self, group: str = "g", topics=("orders",), member_id: str = "", client_id: str = "c"):
        return self.groups.join(group, member_id, client_id, list(topics), SESSION_MS)

    def settle(self, group: str = "g") -> int:
        """Every member adopts the current generation (as cooperative consumers do: each
        heartbeat with it releases what it revoked) until the group is stable; returns
        the generation."""
        for _ in range(20):
            described = self.groups.describe(group)
            if described.state == STATE_STABLE:
                return described.generation
            for member in described.members:
                self.groups.heartbeat(group, member.member_id, self.groups.describe(group).generation)
        raise AssertionError(f"group {group} did not settle")


@pytest.fixture
def world(tmp_path: Path):
    opened = World(tmp_path)
    yield opened
    opened.metadata.close()


def partitions(assignments: dict[str, list[int]], topic: str = "orders") -> list[int]:
    return assignments.get(topic, [])


def current(world: World, group: str, member_id: str) -> dict[str, list[int]]:
    """A member's assignment in the current generation, from describe()."""
    (member,) = [m for m in world.groups.describe(group).members if m.member_id == member_id]
    return member.assignments


def codes(result) -> list[ErrorCode]:
    return [entry.error_code for entry in result.results]


# ---------------------------------------------------------------------------
# Membership and assignment


def test_three_members_split_six_partitions_two_each(world: World) -> None:
    a = world.join(client_id="a")
    assert a.generation == 1
    assert a.member_id.startswith("a-")
    assert a.assignments == {"orders": [0, 1, 2, 3, 4, 5]}
    assert a.heartbeat_interval_ms == SESSION_MS // 3
    b = world.join(client_id="b")
    c = world.join(client_id="c")
    assert c.generation == 3
    assert world.groups.describe("g").state == STATE_REBALANCING
    generation = world.settle()
    owned = {member: partitions(current(world, "g", member)) for member in (a.member_id, b.member_id, c.member_id)}
    assert sorted(len(p) for p in owned.values()) == [2, 2, 2]
    assert sorted(itertools.chain(*owned.values())) == [0, 1, 2, 3, 4, 5]
    assert world.groups.heartbeat("g", c.member_id, generation).error_code == ErrorCode.NONE
    assert world.groups.describe("g").state == STATE_STABLE


def test_a_partition_moves_only_after_its_owner_releases_it(world: World) -> None:
    """The two-step handover: revoke from the owner, which commits and acknowledges;
    only then does the new owner get it. What does not move is never out of an
    assignment."""
    a = world.join(client_id="a")
    b = world.join(client_id="b")  # generation 2: three of a's partitions are revoked
    assert b.generation == 2 and b.assignments == {}
    assert current(world, "g", a.member_id) == {"orders": [0, 1, 2]}  # sticky: a keeps the low half
    assert world.groups.describe("g").handovers.partitions_revoking == 3
    # a learns of it (a GroupWait would be answered at once)...
    beat = world.groups.heartbeat("g", a.member_id, 1)
    assert (beat.error_code, beat.generation, beat.assignments) == (
        ErrorCode.REBALANCE_IN_PROGRESS,
        2,
        {"orders": [0, 1, 2]},
    )
    # ...still owns what it lets go, so its handover commit is accepted...
    assert codes(world.groups.commit("g", 1, a.member_id, [("orders", 4, 40, None)])) == [ErrorCode.NONE]
    # ...and the new owner cannot commit it yet.
    assert codes(world.groups.commit("g", 2, b.member_id, [("orders", 4, 1, None)])) == [ErrorCode.ILLEGAL_GENERATION]
    world.clock.advance(250)
    beat = world.groups.heartbeat("g", a.member_id, 2)  # the release
    assert beat.generation == 3 and beat.assignments == {"orders": [0, 1, 2]}
    assert current(world, "g", b.member_id) == {"orders": [3, 4, 5]}
    assert codes(world.groups.commit("g", 1, a.member_id, [("orders", 4, 41, None)])) == [ErrorCode.ILLEGAL_GENERATION]
    assert world.groups.fetch_offsets("g")["orders", 4].offset == 40  # where b starts
    handovers = world.groups.describe("g").handovers
    assert (handovers.partitions_moved, handovers.handovers_forced, handovers.handover_ms_max) == (3, 0, 250)
    assert handovers.partitions_revoking == 0


def test_a_topic_deleted_while_its_partitions_are_revoked_leaves_no_revocation(world: World) -> None:
    world.topics["payments"] = 2
    world.join(topics=("payments",), client_id="a")
    b = world.join(topics=("payments",), client_id="b")  # payments-1 is revoked from a
    assert world.groups.describe("g").handovers.partitions_revoking == 1
    del world.topics["payments"]
    assert world.groups.on_topic_deleted("payments") == ["g"]
    described = world.groups.describe("g")
    assert described.handovers.partitions_revoking == 0
    assert all(m.assignments == {} and m.revoking == {} for m in described.members)
    assert world.settle() == described.generation  # both adopt it; nothing left to hand over
    assert b.member_id in {m.member_id for m in described.members}


def test_an_owner_that_does_not_release_loses_the_partitions_at_its_session_timeout(world: World) -> None:
    a = world.join(client_id="a")
    b = world.join(client_id="b")
    for _ in range(3):  # a heartbeats with its old generation: alive, but never adopts
        world.clock.advance(SESSION_MS // 3)
        assert world.groups.expire() == []
        world.groups.heartbeat("g", a.member_id, 1)
        world.groups.heartbeat("g", b.member_id, b.generation)
    deadline = world.groups.next_deadline_ms()
    assert deadline == world.clock.now_ms + SESSION_MS - 3 * (SESSION_MS // 3)  # the revocation's
    assert world.groups.expire(deadline) == []  # nobody expires: a loses the partitions only
    world.clock.advance(deadline - world.clock.now_ms)
    assert current(world, "g", b.member_id) == {"orders": [3, 4, 5]}
    assert {m.member_id for m in world.groups.describe("g").members} == {a.member_id, b.member_id}
    assert codes(world.groups.commit("g", 1, a.member_id, [("orders", 4, 9, None)])) == [ErrorCode.ILLEGAL_GENERATION]
    assert world.groups.describe("g").handovers.handovers_forced == 3


def test_joining_again_unchanged_is_not_a_rebalance(world: World) -> None:
    a = world.join()
    world.join()
    generation = world.settle()
    again = world.join(member_id=a.member_id)
    assert again.member_id == a.member_id
    assert again.generation == generation
    assert again.assignments == current(world, "g", a.member_id)
    # New topics are a change of subscription: a rebalance.
    world.topics["payments"] = 2
    changed = world.join(member_id=a.member_id, topics=("orders", "payments"))
    assert changed.generation == generation + 1
    assert changed.assignments["payments"] == [0, 1]


def test_unknown_member_id_joins_as_a_new_member(world: World) -> None:
    joined = world.join(member_id="from-before-a-restart", client_id="x")
    assert joined.member_id != "from-before-a-restart"
    assert joined.member_id.startswith("x-")


def test_leave_moves_the_partitions_to_the_others(world: World) -> None:
    a, b, c = world.join(), world.join(), world.join()
    generation = world.settle()
    world.groups.leave("g", b.member_id)  # what b held goes on at once: b let go by leaving
    remaining = [partitions(current(world, "g", m)) for m in (a.member_id, c.member_id)]
    assert sorted(len(p) for p in remaining) == [3, 3]
    assert sorted(itertools.chain(*remaining)) == list(range(6))
    assert world.groups.describe("g").generation == generation + 1
    with pytest.raises(GroupError) as caught:
        world.groups.leave("g", b.member_id)
    assert caught.value.code == ErrorCode.UNKNOWN_MEMBER
    assert not caught.value.closes_connection
    assert error_code_for(caught.value) == ErrorCode.UNKNOWN_MEMBER


def test_a_killed_member_loses_its_partitions_after_the_session_timeout(world: World) -> None:
    a, b, c = world.join(), world.join(), world.join()
    generation = world.settle()
    killed = partitions(current(world, "g", c.member_id))
    assert world.groups.next_deadline_ms() == world.clock.now_ms + SESSION_MS
    # a and b heartbeat; c has been killed and is silent.
    for _ in range(4):
        world.clock.advance(SESSION_MS // 3)
        world.groups.heartbeat("g", a.member_id, generation)
        world.groups.heartbeat("g", b.member_id, generation)
        if world.clock.now_ms < c_deadline(world, c):
            assert world.groups.expire(world.clock.now_ms) == []
    deadline = world.groups.next_deadline_ms()
    assert deadline == c_deadline(world, c)
    assert world.groups.expire(deadline - 1) == []
    expired = world.groups.expire(deadline)
    assert [(m.group, m.member_id, m.client_id) for m in expired] == [("g", c.member_id, "c")]
    assert world.groups.statistics().members_expired == 1

    beat = world.groups.heartbeat("g", a.member_id, generation)
    assert beat.error_code == ErrorCode.REBALANCE_IN_PROGRESS and beat.generation == generation + 1
    # Nobody holds what c held: it goes to the survivors at once, nothing else moves.
    survivors = [partitions(current(world, "g", m)) for m in (a.member_id, b.member_id)]
    assert sorted(itertools.chain(*survivors)) == list(range(6))
    assert set(killed) <= set(itertools.chain(*survivors))
    with pytest.raises(GroupError) as caught:
        world.groups.heartbeat("g", c.member_id, generation)
    assert caught.value.code == ErrorCode.UNKNOWN_MEMBER
    late = world.groups.commit("g", generation, c.member_id, [("orders", killed[0], 10, None)])
    assert codes(late) == [ErrorCode.UNKNOWN_MEMBER] and late.staged == 0


def c_deadline(world: World, c) -> int:
    (member,) = [m for m in world.groups.describe("g").members if m.member_id == c.member_id]
    return member.last_heartbeat_ms + member.session_timeout_ms


def test_several_members_expiring_together_rebalance_once(world: World) -> None:
    members = [world.join() for _ in range(3)]
    assert world.groups.describe("g").generation == 3
    world.clock.advance(SESSION_MS)
    expired = world.groups.expire()
    assert {m.member_id for m in expired} == {m.member_id for m in members}
    assert world.groups.next_deadline_ms() is None
    assert world.groups.list_groups() == []  # no members, no offsets: forgotten
    # A new first member starts the group again at generation 1.
    assert world.join().generation == 1


def test_heartbeats_keep_a_member_alive_past_its_session_timeout(world: World) -> None:
    a = world.join()
    for _ in range(10):
        world.clock.advance(SESSION_MS - 1)
        assert world.groups.expire() == []
        world.groups.heartbeat("g", a.member_id, 1)
    assert world.groups.next_deadline_ms() == world.clock.now_ms + SESSION_MS


def test_a_rejoin_with_a_shorter_session_timeout_moves_the_deadline_earlier(world: World) -> None:
    a = world.join()
    world.groups.join("g", a.member_id, "c", ["orders"], 2_000)
    assert world.groups.next_deadline_ms() == world.clock.now_ms + 2_000
    world.clock.advance(2_000)
    assert [m.member_id for m in world.groups.expire()] == [a.member_id]


def test_heartbeat_with_a_generation_the_group_never_had_is_illegal(world: World) -> None:
    a = world.join()
    for generation in (0, 2, -1):
        with pytest.raises(GroupError) as caught:
            world.groups.heartbeat("g", a.member_id, generation)
        assert caught.value.code == ErrorCode.ILLEGAL_GENERATION
    with pytest.raises(GroupError) as caught:
        world.groups.heartbeat("nobody", a.member_id, 1)
    assert caught.value.code == ErrorCode.UNKNOWN_MEMBER


def test_every_group_gets_every_partition(world: World) -> None:
    """Publish/subscribe: groups do not share partitions with each other."""
    solo = [world.join(group=f"solo-{i}") for i in range(3)]
    for joined in solo:
        assert joined.assignments == {"orders": list(range(6))}
    pair = [world.join(group="pair"), world.join(group="pair")]
    world.settle("pair")
    owned = [partitions(current(world, "pair", m.member_id)) for m in pair]
    assert sorted(itertools.chain(*owned)) == list(range(6))
    assert world.groups.describe("solo-0").generation == 1  # untouched by other groups


def test_members_only_get_partitions_of_topics_they_subscribe_to(world: World) -> None:
    world.topics["payments"] = 3
    both = world.join(topics=("orders", "payments"), client_id="both")
    only = world.join(topics=("payments",), client_id="only")
    world.settle()
    assert current(world, "g", both.member_id)["orders"] == list(range(6))
    payments = [partitions(current(world, "g", m), "payments") for m in (both.member_id, only.member_id)]
    assert sorted(itertools.chain(*payments)) == [0, 1, 2]
    assert "orders" not in current(world, "g", only.member_id)


# ---------------------------------------------------------------------------
# Deterministic assignment


def test_assignment_is_a_function_of_the_membership_alone() -> None:
    subscriptions = {"m-c": {"a", "b"}, "m-a": {"a"}, "m-b": {"a", "b", "missing"}}
    counts = {"a": 7, "b": 4}
    expected = assign_partitions(subscriptions, counts)
    for order in itertools.permutations(subscriptions):
        shuffled = {member: sorted(subscriptions[member], reverse=True) for member in order}
        assert assign_partitions(shuffled, counts) == expected
    assert expected == {
        "m-a": {"a": [0, 1, 2]},
        "m-b": {"a": [3, 4], "b": [0, 1]},
        "m-c": {"a": [5, 6], "b": [2, 3]},
    }


def test_assignment_keeps_totals_even_across_topics() -> None:
    subscriptions = {f"m{i}": {f"t{j}" for j in range(5)} for i in range(3)}
    assignment = assign_partitions(subscriptions, {f"t{j}": 4 for j in range(5)})
    totals = sorted(sum(len(p) for p in member.values()) for member in assignment.values())
    assert totals == [6, 7, 7]


def test_the_same_membership_gets_the_same_assignment_back(world: World) -> None:
    a, b = world.join(), world.join()
    before = {m: current(world, "g", m) for m in (a.member_id, b.member_id)}
    c = world.join()
    world.groups.leave("g", c.member_id)
    assert {m: current(world, "g", m) for m in (a.member_id, b.member_id)} == before


# ---------------------------------------------------------------------------
# Commits


def test_commits_are_staged_not_flushed_and_fetched_back(world: World, tmp_path: Path) -> None:
    a = world.join()
    flushes = world.metadata.statistics().flushes
    result = world.groups.commit("g", 1, a.member_id, [OffsetToCommit("orders", 0, 42, "m"), ("orders", 5, 7, None)])
    assert result.results == [
        PartitionResult("orders", 0, ErrorCode.NONE),
        PartitionResult("orders", 5, ErrorCode.NONE),
    ]
    assert result.staged == 2
    assert world.metadata.statistics().flushes == flushes
    assert world.metadata.statistics().staged_entries == 2
    fetched = world.groups.fetch_offsets("g")
    assert [(key, entry.offset, entry.metadata) for key, entry in fetched.items()] == [
        (("orders", 0), 42, "m"),
        (("orders", 5), 7, ""),
    ]
    assert list(world.groups.fetch_offsets("g", partitions=[("orders", 5), ("orders", 3)])) == [("orders", 5)]
    assert world.groups.fetch_offsets("g", topics=["other"]) == {}
    # What the server does once per tick: flush, then answer. Durable across a reopen.
    assert world.metadata.flush() == 2
    world.metadata.close()
    with MetadataStore(tmp_path) as reopened:
        committed = reopened.committed_offset("g", "orders", 0)
        assert committed is not None, "the flushed offset is durable"
        assert committed.offset == 42


def test_stale_generation_commits_are_rejected_for_partitions_that_moved(world: World) -> None:
    a = world.join(client_id="a")  # generation 1: a owns 0..5
    b = world.join(client_id="b")  # generation 2: three are revoked from a
    world.groups.heartbeat("g", a.member_id, 2)  # generation 3: a released them, b owns them
    kept = partitions(current(world, "g", a.member_id))
    moved = partitions(current(world, "g", b.member_id))
    assert len(kept) == len(moved) == 3
    # a commits late with generation 1 what it read: refused where it let go.
    stale = world.groups.commit("g", 1, a.member_id, [("orders", kept[0], 5, None), ("orders", moved[0], 5, None)])
    assert codes(stale) == [ErrorCode.NONE, ErrorCode.ILLEGAL_GENERATION]
    assert stale.staged == 1
    # The new owner commits the moved partition.
    assert codes(world.groups.commit("g", 3, b.member_id, [("orders", moved[0], 9, None)])) == [ErrorCode.NONE]
    # A current member committing a partition it does not own, or a future generation.
    assert codes(world.groups.commit("g", 3, a.member_id, [("orders", moved[1], 1, None)])) == [
        ErrorCode.ILLEGAL_GENERATION
    ]
    assert codes(world.groups.commit("g", 4, a.member_id, [("orders", kept[0], 1, None)])) == [
        ErrorCode.ILLEGAL_GENERATION
    ]
    assert world.groups.fetch_offsets("g")["orders", moved[0]].offset == 9
    statistics = world.groups.statistics()
    assert (statistics.offsets_committed, statistics.offsets_rejected, statistics.commits) == (2, 3, 4)


def test_a_partition_that_left_and_came_back_fences_the_older_generation(world: World) -> None:
    a = world.join(client_id="a")  # 1: a owns all
    b = world.join(client_id="b")  # 2: some of a's partitions are revoked
    world.groups.heartbeat("g", a.member_id, 2)  # 3: a released them to b
    moved = partitions(current(world, "g", b.member_id))[0]
    world.groups.leave("g", b.member_id)  # 4: a owns all again
    # a owned `moved` in generation 1 and owns it now, but not continuously.
    assert codes(world.groups.commit("g", 1, a.member_id, [("orders", moved, 3, None)])) == [
        ErrorCode.ILLEGAL_GENERATION
    ]
    assert codes(world.groups.commit("g", 4, a.member_id, [("orders", moved, 3, None)])) == [ErrorCode.NONE]


def test_commit_errors_per_partition(world: World) -> None:
    a = world.join()
    too_long = "x" * (world.metadata.limits.offset_metadata_bytes_max + 1)
    result = world.groups.commit(
        "g",
        1,
        a.member_id,
        [
            ("nope", 0, 1, None),
            ("orders", 6, 1, None),
            ("orders", -1, 1, None),
            ("orders", 0, -1, None),
            ("orders", 1, 1, too_long),
            ("orders", 2, 1, "\udc80"),
            ("orders", 3, 1, None),
        ],
    )
    assert codes(result) == [
        ErrorCode.UNKNOWN_TOPIC,
        ErrorCode.UNKNOWN_PARTITION,
        ErrorCode.UNKNOWN_PARTITION,
        ErrorCode.INVALID_REQUEST,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.INVALID_REQUEST,
        ErrorCode.NONE,
    ]
    assert result.staged == 1
    with pytest.raises(GroupError) as caught:
        world.groups.commit("", 1, a.member_id, [])
    assert caught.value.code == ErrorCode.INVALID_REQUEST


def test_a_commit_checks_the_group_name_unless_the_group_is_held(world: World) -> None:
    """A group held in memory had its name checked by its join, so its commits skip the
    check; a name no group holds is still checked, whatever the member fields say."""
    a = world.join()
    held = world.groups.commit("g", 1, a.member_id, [("orders", a.assignments["orders"][0], 3, None)])
    assert codes(held) == [ErrorCode.NONE] and held.staged == 1
    for name in ("bad name", "", "x" * 256, ".."):
        with pytest.raises(GroupError) as caught:
            world.groups.commit(name, 1, a.member_id, [("orders", 0, 1, None)])
        assert caught.value.code == ErrorCode.INVALID_REQUEST, name
    assert world.groups.statistics().commits == 1  # a refused name is no commit


def test_standalone_commits_are_accepted_while_the_group_has_no_members(world: World) -> None:
    result = world.groups.commit("tool", NO_GENERATION, "", [("orders", 2, 11, "by hand")])
    assert codes(result) == [ErrorCode.NONE] and result.staged == 1
    assert world.groups.fetch_offsets("tool")["orders", 2].offset == 11
    # An old member of a group that has none any more, or a made-up generation.
    assert codes(world.groups.commit("tool", 4, "ghost", [("orders", 2, 1, None)])) == [ErrorCode.UNKNOWN_MEMBER]
    assert codes(world.groups.commit("tool", 4, "", [("orders", 2, 1, None)])) == [ErrorCode.ILLEGAL_GENERATION]
    # Once the group has members, outsiders cannot commit into it.
    member = world.join(group="tool")
    assert codes(world.groups.commit("tool", NO_GENERATION, "", [("orders", 2, 1, None)])) == [ErrorCode.UNKNOWN_MEMBER]
    world.groups.leave("tool", member.member_id)
    assert codes(world.groups.commit("tool", NO_GENERATION, "", [("orders", 2, 12, None)])) == [ErrorCode.NONE]


def test_a_commit_counts_as_a_heartbeat(world: World) -> None:
    a = world.join()
    world.clock.advance(SESSION_MS - 1)
    world.groups.commit("g", 1, a.member_id, [("orders", 0, 1, None)])
    world.clock.advance(SESSION_MS - 1)
    assert world.groups.expire() == []


# ---------------------------------------------------------------------------
# Reset


def test_reset_only_when_the_group_is_empty(world: World) -> None:
    calls = []

    def resolve(topic: str, partition: int, spec: ResetSpec, value: int) -> int:
        calls.append((topic, partition, spec, value))
        return {ResetSpec.EARLIEST: 0, ResetSpec.LATEST: 100 + partition}.get(spec, value)

    a = world.join()
    with pytest.raises(GroupError) as caught:
        world.groups.reset("g", "orders", ResetSpec.EARLIEST, [], resolve)
    assert caught.value.code == ErrorCode.GROUP_NOT_EMPTY
    world.groups.leave("g", a.member_id)

    latest = world.groups.reset("g", "orders", ResetSpec.LATEST, [], resolve)
    assert latest.offsets == {p: 100 + p for p in range(6)} and latest.staged == 6
    chosen = world.groups.reset("g", "orders", ResetSpec.OFFSET, [4, 1, 4], resolve, value=7)
    assert chosen.offsets == {1: 7, 4: 7}
    assert calls[-2:] == [("orders", 1, ResetSpec.OFFSET, 7), ("orders", 4, ResetSpec.OFFSET, 7)]
    offsets = {key[1]: entry.offset for key, entry in world.groups.fetch_offsets("g").items()}
    assert offsets == {0: 100, 1: 7, 2: 102, 3: 103, 4: 7, 5: 105}
    assert world.groups.statistics().resets == 2

    for args, code in [
        (("g", "nope", ResetSpec.EARLIEST, []), ErrorCode.UNKNOWN_TOPIC),
        (("g", "orders", ResetSpec.EARLIEST, [6]), ErrorCode.UNKNOWN_PARTITION),
        (("g", "orders", ResetSpec.TIMESTAMP, []), ErrorCode.INVALID_REQUEST),
    ]:
        with pytest.raises(GroupError) as caught:
            world.groups.reset(*args, resolve)
        assert caught.value.code == code


def test_a_failing_resolve_stages_nothing(world: World) -> None:
    def resolve(topic: str, partition: int, spec: ResetSpec, value: int) -> int:
        if partition == 3:
            raise RuntimeError("lookup failed")
        return 1

    with pytest.raises(RuntimeError):
        world.groups.reset("g", "orders", ResetSpec.EARLIEST, [], resolve)
    assert world.groups.fetch_offsets("g") == {}


# ---------------------------------------------------------------------------
# List and describe


def test_list_and_describe(world: World) -> None:
    world.topics["payments"] = 2
    a = world.join(group="live", topics=("orders", "payments"), client_id="a")
    b = world.join(group="live", client_id="b")
    world.groups.heartbeat("live", a.member_id, 2)  # a releases what b gets: generation 3
    b_assignments = current(world, "live", b.member_id)
    world.groups.commit("live", 3, b.member_id, [("orders", partitions(b_assignments)[0], 4, "x")])
    world.groups.commit("offline", NO_GENERATION, "", [("orders", 0, 3, None)])
    world.metadata.put_queue_state("a-queue-group", "orders", 0, b"state")

    listed = world.groups.list_groups()
    assert [(g.group, g.state, g.members) for g in listed] == [
        ("live", STATE_REBALANCING, 2),  # neither has seen generation 3 yet
        ("offline", STATE_EMPTY, 0),
    ]
    world.groups.heartbeat("live", a.member_id, 3)
    world.groups.heartbeat("live", b.member_id, 3)
    assert world.groups.list_groups()[0].state == STATE_STABLE

    described = world.groups.describe("live")
    assert (described.group, described.state, described.generation) == ("live", STATE_STABLE, 3)
    assert [m.member_id for m in described.members] == sorted([a.member_id, b.member_id])
    by_id = {m.member_id: m for m in described.members}
    assert by_id[a.member_id].topics == ("orders", "payments")
    assert by_id[a.member_id].client_id == "a"
    assert by_id[a.member_id].session_timeout_ms == SESSION_MS
    assert by_id[a.member_id].assignments["payments"] == [0, 1]
    # Every subscribed partition is there for lag, committed or not.
    assert list(described.offsets) == [("orders", p) for p in range(6)] + [("payments", 0), ("payments", 1)]
    committed = {key: entry.offset for key, entry in described.offsets.items() if entry is not None}
    assert committed == {("orders", partitions(b_assignments)[0]): 4}

    offline = world.groups.describe("offline")
    assert (offline.state, offline.generation, offline.members) == (STATE_EMPTY, 0, [])
    assert {key: None if entry is None else entry.offset for key, entry in offline.offsets.items()} == {
        ("orders", 0): 3
    }
    with pytest.raises(GroupError) as caught:
        world.groups.describe("never")
    assert caught.value.code == ErrorCode.UNKNOWN_GROUP


def test_statistics(world: World) -> None:
    a = world.join()
    b = world.join()
    world.groups.heartbeat("g", a.member_id, 1)
    world.groups.leave("g", b.member_id)
    statistics = world.groups.statistics()
    assert (statistics.groups, statistics.members, statistics.joins, statistics.leaves) == (1, 1, 2, 1)
    assert (statistics.rebalances, statistics.heartbeats, statistics.groups_rebalancing) == (3, 1, 1)


# ---------------------------------------------------------------------------
# Topics created and deleted


def test_a_topic_created_later_is_assigned_to_its_subscribers(world: World) -> None:
    a = world.join(topics=("orders", "later"))
    assert a.assignments == {"orders": list(range(6))}
    assert world.groups.on_topic_created("unrelated") == []
    world.topics["later"] = 2
    assert world.groups.on_topic_created("later") == ["g"]
    beat = world.groups.heartbeat("g", a.member_id, 1)
    assert beat.error_code == ErrorCode.REBALANCE_IN_PROGRESS
    assert beat.assignments == {"orders": list(range(6)), "later": [0, 1]}
    world.topics["later"] = 4
    assert world.groups.on_topic_partitions_changed("later") == ["g"]
    assert current(world, "g", a.member_id)["later"] == [0, 1, 2, 3]


def test_a_deleted_topic_leaves_the_assignments_and_comes_back_when_recreated(world: World) -> None:
    world.topics["payments"] = 2
    a = world.join(topics=("orders", "payments"))
    del world.topics["payments"]  # the server deleted it; the metadata store dropped its offsets
    assert world.groups.on_topic_deleted("payments") == ["g"]
    assert current(world, "g", a.member_id) == {"orders": list(range(6))}
    assert codes(world.groups.commit("g", 2, a.member_id, [("payments", 0, 1, None)])) == [ErrorCode.UNKNOWN_TOPIC]
    world.topics["payments"] = 3
    world.groups.on_topic_created("payments")
    assert current(world, "g", a.member_id)["payments"] == [0, 1, 2]


# ---------------------------------------------------------------------------
# Limits


def test_limits(tmp_path: Path) -> None:
    limits = GroupLimits(
        groups_max=2,
        members_per_group_max=2,
        topics_per_member_max=2,
        session_timeout_ms_min=1_000,
        session_timeout_ms_max=60_000,
        client_id_bytes_max=8,
    )
    world = World(tmp_path, limits)
    try:
        world.join(group="one")
        world.join(group="one")
        world.join(group="two")
        refusals = [
            lambda: world.join(group="one"),  # members_per_group_max
            lambda: world.join(group="three"),  # groups_max
            lambda: world.join(group="two", topics=("a", "b", "c")),  # topics_per_member_max
            lambda: world.join(group="two", client_id="x" * 9),  # client_id_bytes_max
            lambda: world.groups.join("two", "", "c", ["orders"], 999),
            lambda: world.groups.join("two", "", "c", ["orders"], 60_001),
        ]
        for refuse in refusals:
            with pytest.raises(GroupError) as caught:
                refuse()
            assert caught.value.code == ErrorCode.LIMIT_EXCEEDED, caught.value
        assert world.groups.statistics().members == 3
        # Standalone commits keep no members: not bound by groups_max.
        assert codes(world.groups.commit("four", NO_GENERATION, "", [("orders", 0, 1, None)])) == [ErrorCode.NONE]
        for topics, code in [((), ErrorCode.INVALID_REQUEST), (("bad name",), ErrorCode.INVALID_CONFIG)]:
            with pytest.raises(GroupError) as caught:
                world.join(group="two", topics=topics)
            assert caught.value.code == code
        with pytest.raises(GroupError) as caught:
            world.join(group="x" * 256)
        assert caught.value.code == ErrorCode.INVALID_REQUEST
    finally:
        world.metadata.close()


@pytest.mark.parametrize(
    "fields",
    [{"groups_max": 0}, {"members_per_group_max": -1}, {"session_timeout_ms_min": 5, "session_timeout_ms_max": 4}],
)
def test_limits_are_validated(fields) -> None:
    with pytest.raises(ValueError):
        GroupLimits(**fields)


# ---------------------------------------------------------------------------
# Property: random joins, leaves, heartbeats, expiries and topic changes


GROUP_NAMES = ("g1", "g2")
TOPIC_NAMES = ("t1", "t2", "t3")


class GroupMachine(RuleBasedStateMachine):
    """The coordinator against a model of who is alive: members join (subscribing to
    topics that may not exist), leave, heartbeat or fall silent; time passes and
    expiry runs; topics are created, grown and deleted."""

    members = Bundle("members")

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory()
        self.world = World(Path(self.directory.name))
        self.world.topics.clear()
        self.world.topics["t1"] = 3
        # (group, member id) -> (topics, deadline)
        self.live: dict[tuple[str, str], tuple[frozenset[str], int]] = {}
        self.live_sessions: dict[tuple[str, str], int] = {}

    def teardown(self) -> None:
        self.world.metadata.close()
        self.directory.cleanup()

    def _touch(self, key: tuple[str, str], session_ms: int | None = None) -> None:
        topics, deadline = self.live[key]
        self.live[key] = (topics, self.world.clock.now_ms + (session_ms or SESSION_MS))

    @rule(
        target=members,
        group=st.sampled_from(GROUP_NAMES),
        topics=st.sets(st.sampled_from(TOPIC_NAMES), min_size=1),
        session_ms=st.sampled_from([1_000, 5_000, SESSION_MS]),
    )
    def join(self, group: str, topics: set[str], session_ms: int):
        joined = self.world.groups.join(group, "", "p", sorted(topics), session_ms)
        self.live[group, joined.member_id] = (frozenset(topics), self.world.clock.now_ms + session_ms)
        self.live_sessions[group, joined.member_id] = session_ms
        return (group, joined.member_id, session_ms)

    @rule(member=members, topics=st.sets(st.sampled_from(TOPIC_NAMES), min_size=1))
    def rejoin(self, member, topics: set[str]) -> None:
        group, member_id, session_ms = member
        if (group, member_id) not in self.live:
            return
        joined = self.world.groups.join(group, member_id, "p", sorted(topics), session_ms)
        assert joined.member_id == member_id
        self.live[group, member_id] = (frozenset(topics), self.world.clock.now_ms + session_ms)

    @rule(member=consumes(members))
    def leave(self, member) -> None:
        group, member_id, _ = member
        if (group, member_id) in self.live:
            self.world.groups.leave(group, member_id)
            del self.live[group, member_id]
        else:
            with pytest.raises(GroupError):
                self.world.groups.leave(group, member_id)

    @rule(member=members)
    def heartbeat(self, member) -> None:
        group, member_id, session_ms = member
        if (group, member_id) in self.live:
            described = self.world.groups.describe(group)
            (me,) = [m for m in described.members if m.member_id == member_id]
            result = self.world.groups.heartbeat(group, member_id, described.generation)
            if me.revoking:  # adopting the generation released them: it moves on at once
                assert result.error_code == ErrorCode.REBALANCE_IN_PROGRESS
                assert result.generation == described.generation + 1
            else:
                assert result.error_code == ErrorCode.NONE
            self._touch((group, member_id), session_ms)
        else:
            with pytest.raises(GroupError) as caught:
                self.world.groups.heartbeat(group, member_id, 1)
            assert caught.value.code == ErrorCode.UNKNOWN_MEMBER

    @rule(group=st.sampled_from(GROUP_NAMES))
    def settle(self, group: str) -> None:
        """Every live member adopts the current generation until the group is stable."""
        keys = [key for key in self.live if key[0] == group]
        for _ in range(10):
            if not keys or self.world.groups.describe(group).state == STATE_STABLE:
                return
            for key in keys:
                self.world.groups.heartbeat(group, key[1], self.world.groups.describe(group).generation)
                self._touch(key, self.live_sessions[key])
        raise AssertionError(f"group {group} did not settle")

    @rule(milliseconds=st.integers(0, 12_000))
    def advance_and_expire(self, milliseconds: int) -> None:
        self.world.clock.advance(milliseconds)
        now = self.world.clock.now_ms
        due = {key for key, (_, deadline) in self.live.items() if deadline <= now}
        expired = self.world.groups.expire(now)
        assert {(m.group, m.member_id) for m in expired} == due
        for key in due:
            del self.live[key]
        deadlines = [deadline for _, deadline in self.live.values()]
        assert self.world.groups.next_deadline_ms() == (min(deadlines) if deadlines else None)

    @rule(topic=st.sampled_from(TOPIC_NAMES), count=st.integers(1, 7))
    def create_or_grow_topic(self, topic: str, count: int) -> None:
        if topic in self.world.topics:
            self.world.topics[topic] = max(count, self.world.topics[topic])
            self.world.groups.on_topic_partitions_changed(topic)
        else:
            self.world.topics[topic] = count
            self.world.groups.on_topic_created(topic)

    @precondition(lambda self: len(self.world.topics) > 0)
    @rule(data=st.data())
    def delete_topic(self, data) -> None:
        topic = data.draw(st.sampled_from(sorted(self.world.topics)))
        del self.world.topics[topic]
        self.world.groups.on_topic_deleted(topic)

    @invariant()
    def every_partition_has_exactly_one_live_subscribed_owner(self) -> None:
        for group in GROUP_NAMES:
            expected = {member_id: topics for (g, member_id), (topics, _) in self.live.items() if g == group}
            if not expected:
                assert group not in {g.group for g in self.world.groups.list_groups()}
                continue
            described = self.world.groups.describe(group)
            assert {m.member_id: frozenset(m.topics) for m in described.members} == expected
            owners: dict[tuple[str, int], list[str]] = {}
            for member in described.members:
                for held in (member.assignments, member.revoking):  # readable, or being let go
                    for topic, owned in held.items():
                        assert topic in expected[member.member_id]
                        for partition in owned:
                            owners.setdefault((topic, partition), []).append(member.member_id)
            subscribed = set().union(*expected.values())
            wanted = {
                (topic, partition)
                for topic in subscribed
                if topic in self.world.topics
                for partition in range(self.world.topics[topic])
            }
            assert set(owners) == wanted
            assert all(len(owner) == 1 for owner in owners.values())
            # Balanced per topic once settled: shares differ by at most one.
            if described.state != STATE_STABLE:
                continue
            for topic in subscribed & set(self.world.topics):
                shares = [len(m.assignments.get(topic, [])) for m in described.members if topic in m.topics]
                assert max(shares) - min(shares) <= 1


GroupMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestGroupMachine = GroupMachine.TestCase


def test_random_churn_keeps_the_assignment_whole(tmp_path: Path) -> None:
    """A longer seeded run of the same invariant with many members, cheaper than the
    state machine per step."""
    world = World(tmp_path)
    world.topics.update({"a": 5, "b": 11})
    rng = random.Random(7)
    alive: set[str] = set()
    try:
        for _ in range(400):
            action = rng.random()
            if action < 0.4 or not alive:
                joined = world.groups.join("g", "", "r", rng.sample(["a", "b", "orders"], rng.randint(1, 3)), 5_000)
                alive.add(joined.member_id)
            elif action < 0.6:
                leaving = rng.choice(sorted(alive))
                world.groups.leave("g", leaving)
                alive.discard(leaving)
            else:
                world.clock.advance(rng.randint(0, 3_000))
                for member_id in rng.sample(sorted(alive), len(alive) // 2):
                    world.groups.heartbeat("g", member_id, world.groups.describe("g").generation)
                for gone in world.groups.expire():
                    alive.remove(gone.member_id)
            if alive:
                described = world.groups.describe("g")
                owned = sorted(
                    (topic, partition)
                    for member in described.members
                    for held in (member.assignments, member.revoking)
                    for topic, partitions_owned in held.items()
                    for partition in partitions_owned
                )
                subscribed = set().union(*(member.topics for member in described.members))
                assert owned == sorted(
                    (topic, partition) for topic in subscribed for partition in range(world.topics[topic])
                )
    finally:
        world.metadata.close()
