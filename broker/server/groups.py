"""The stream-mode consumer-group coordinator: membership, partition assignment,
committed offsets and replay resets, with no I/O of its own.

The server calls it from its event loop (it is not thread-safe) and owns its timer:
after handling requests it asks `next_deadline_ms()` and, when that time comes, calls
`expire(now_ms)`. Times come from the `clock_ms` it is given, which should be monotonic
(the server's loop clock in ms); commit times stored with offsets are wall-clock, taken
by the metadata store.

Kafka's model, with a two-step handover
---------------------------------------
The coordinator assigns partitions itself (there is no leader client and no
SyncGroup), and hands them over as Kafka's cooperative rebalancing (KIP-429) does:

- Every join, leave or expiry that changes the membership or a member's topics
  recomputes the group's *target* (`assign_partitions`: per topic, shares that differ by
  at most one, sticky to who holds each partition now, so as few partitions as possible
  move; totals kept even across topics). A topic created or grown later rebalances the
  groups subscribed to it (`on_topic_created`, `on_topic_partitions_changed`); a deleted
  topic's partitions leave the assignment (`on_topic_deleted`) but the subscriptions
  stay, so a topic created again under that name is picked up. A member may subscribe to
  a topic that does not exist yet: it gets no partitions for it until the topic is
  created.
- Then `_settle` moves ownership one step toward the target. Each partition has at most
  one owner, the member that may read and commit it. A partition with no live owner
  goes to its target at once. A partition whose owner is not its target is *revoked*:
  it leaves the owner's assignment in a new generation but stays its owner's until the
  owner acknowledges that generation, by a heartbeat (or join) carrying it; it means "I
  adopted this generation's assignment: I stopped reading the rest and committed it".
  Only then does the partition go to its target, in another generation. An owner that
  does not acknowledge within its session timeout of the revocation loses it anyway
  (`expire`, counted as forced). Partitions that stay are never out of an assignment.
  Any change to what a member may read, or to the membership, bumps the generation.
- A member learns of a new generation from its next heartbeat: the result carries the
  current generation and the member's assignment with REBALANCE_IN_PROGRESS. The server
  can hold a heartbeat (GroupWait) and answer it as soon as `on_generation` reports the
  group's generation moved. No member waits for the others: there is no barrier.
- Commits fence stale members: an offset is accepted only from the partition's current
  owner (a revoked partition's owner until it releases), with a generation no older
  than the one in which the partition went to that owner (a member that kept a
  partition through rebalances may still commit it with an older generation). Others
  get ILLEGAL_GENERATION. Delivery is at-least-once: a handover the owner releases
  repeats nothing it committed; one taken at the deadline repeats what the owner
  handled after its last commit; none skips messages.
- The state machine knows nothing of nodi's wire messages: joins, heartbeats (the
  acknowledgements), leaves, commits and the timer drive it, and `on_generation` tells
  whoever serves the members. Kafka's classic protocol (the Kafka listener's issue) can
  sit on it: its JoinGroup/SyncGroup barrier waits, outside this class, until every
  member has joined the new generation, answers SyncGroup with `describe`'s
  assignments, and counts a SyncGroup or Heartbeat with the generation as the
  acknowledgement; its cooperative clients (KIP-429) revoke exactly as nodi's do.
- A consumer outside group membership (Kafka's "simple" consumer) may commit with
  generation -1 while the group has no members. A group with members accepts commits
  from its members only (UNKNOWN_MEMBER otherwise).
- A join with an unknown member id (expired, or from before a restart) is a first join:
  the member gets a new id in the result. Membership lives in memory only; after a
  broker restart members get UNKNOWN_MEMBER on their next heartbeat and join again. A
  group that loses its last member is forgotten (its committed offsets stay), and its
  generation starts again at 1: member ids are unique, so no old member can pass for a
  new one.
- A commit from a known member counts as a heartbeat (as in Kafka).

Committed offsets
-----------------
Accepted commits and resets are *staged* in the MetadataStore; the coordinator never
flushes. The server flushes once per loop tick and answers commits after the flush
returns: `CommitResult.staged` and `ResetResult.staged` tell it whether a result waits
for one. (The store flushes by itself when `staged_entries_max` entries are staged.)
`fetch_offsets` and `describe` see staged offsets.

Errors
------
A request that cannot be served at all raises `GroupError` (a ProtocolError that never
closes the connection) with its ErrorCode: UNKNOWN_MEMBER, UNKNOWN_GROUP,
ILLEGAL_GENERATION, GROUP_NOT_EMPTY, UNKNOWN_TOPIC, UNKNOWN_PARTITION, LIMIT_EXCEEDED
(a named limit of GroupLimits, the session timeout range included), INVALID_REQUEST,
INVALID_CONFIG (a topic name outside the allowed characters). A commit answers per
partition instead, as Kafka does. A stale heartbeat is not an error: it is answered.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from nodi.storage.errors import InvalidConfigError
from nodi.storage.metadata import (
    CommittedOffset,
    MetadataStore,
    validate_topic_name,
)

from ..protocol.errors import ErrorCode, ProtocolError
from ..protocol.messages import NO_OFFSET, ResetSpec
from .group_names import check_group_name

# The generation a consumer outside group membership commits with.
NO_GENERATION = -1
# A member is told to heartbeat this many times per session timeout.
HEARTBEATS_PER_SESSION = 3
# Group states, as in ListGroups and DescribeGroup.
STATE_EMPTY = "empty"
STATE_REBALANCING = "rebalancing"
STATE_STABLE = "stable"

# ---------------------------------------------------------------------------
# Limits


@dataclass(frozen=True, slots=True)
class GroupLimits:
    # Groups with at least one member (each costs memory). Groups known only from their
    # committed offsets cost none; the metadata store's map size bounds those.
    groups_max: int = 10_000
    # Members of one group (Kafka's group.max.size).
    members_per_group_max: int = 1_000
    # Distinct topics one member subscribes to.
    topics_per_member_max: int = 1_000
    # The session timeout a member may ask for (Kafka's group.min/max.session.timeout.ms).
    session_timeout_ms_min: int = 1_000
    session_timeout_ms_max: int = 300_000
    # A member's client id, UTF-8 (it is kept and shown in DescribeGroup).
    client_id_bytes_max: int = 255

    def __post_init__(self) -> None:
        for limit in fields(self):
            value = getattr(self, limit.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{limit.name} must be a positive integer, got {value!r}")
        if self.session_timeout_ms_min > self.session_timeout_ms_max:
            raise ValueError(
                f"session_timeout_ms_min {self.session_timeout_ms_min} exceeds "
                f"session_timeout_ms_max {self.session_timeout_ms_max}"
            )


DEFAULT_GROUP_LIMITS = GroupLimits()

# ---------------------------------------------------------------------------
# Results

# topic -> its partitions, both sorted.
Assignments = dict[str, list[int]]


class GroupError(ProtocolError):
    """A group request the coordinator refuses, with its ErrorCode. Never closes the
    connection: the server answers it with an error response."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message, closes_connection=False)


@dataclass(frozen=True, slots=True)
class JoinResult:
    generation: int
    member_id: str
    heartbeat_interval_ms: int
    assignments: Assignments


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    # NONE, or REBALANCE_IN_PROGRESS when the member's generation is stale: it should
    # commit what it has and adopt `generation` and `assignments`.
    error_code: ErrorCode
    generation: int
    assignments: Assignments


class OffsetToCommit(NamedTuple):
    topic: str
    partition: int
    offset: int  # the next offset the group will read
    metadata: str | None = None


class PartitionResult(NamedTuple):
    topic: str
    partition: int
    error_code: ErrorCode


@dataclass(frozen=True, slots=True)
class CommitResult:
    # One per offset in the request, in its order.
    results: list[PartitionResult]
    # Offsets staged in the metadata store: when > 0, answer after the next flush.
    staged: int


@dataclass(frozen=True, slots=True)
class ResetResult:
    # partition -> the offset now committed (staged), sorted by partition.
    offsets: dict[int, int]
    staged: int


@dataclass(frozen=True, slots=True)
class ExpiredMember:
    group: str
    member_id: str
    client_id: str


@dataclass(frozen=True, slots=True)
class GroupListing:
    group: str
    state: str  # STATE_EMPTY, STATE_REBALANCING or STATE_STABLE
    members: int


@dataclass(frozen=True, slots=True)
class MemberDescription:
    member_id: str
    client_id: str
    topics: tuple[str, ...]
    session_timeout_ms: int
    last_heartbeat_ms: int
    # The newest generation the member has shown it knows (joined at or heartbeated with).
    generation: int
    assignments: Assignments  # what it may read now
    # What it still owns but must let go (revoked, not yet released): it may commit these.
    revoking: Assignments = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HandoverStatistics:
    """A group's rebalances and handovers since the broker started."""

    rebalances: int = 0  # generation bumps
    partitions_moved: int = 0  # partitions that went from one member to another
    handovers: int = 0  # of those, revoked from a live owner (the others' owner was gone)
    handovers_forced: int = 0  # of the handovers, taken at the owner's session timeout
    handover_ms_total: int = 0  # from revocation to release, summed over the handovers
    handover_ms_max: int = 0
    partitions_revoking: int = 0  # now: revoked and not yet released
    messages_redelivered: int = 0  # handled by a member and not committed when it let go


@dataclass(frozen=True, slots=True)
class GroupDescription:
    group: str
    state: str
    generation: int  # 0 for a group with no members
    members: list[MemberDescription]  # sorted by member id
    # Every partition of the subscribed topics and every partition with a committed
    # offset -> that offset (None: nothing committed), sorted. Lag is the server's:
    # its high watermark minus the offset.
    offsets: dict[tuple[str, int], CommittedOffset | None]
    handovers: HandoverStatistics = HandoverStatistics()


@dataclass(frozen=True, slots=True)
class GroupStatistics:
    groups: int  # groups with members
    members: int
    groups_rebalancing: int  # with a member that has not yet seen the current generation
    rebalances: int  # generation bumps
    joins: int
    leaves: int
    members_expired: int
    heartbeats: int
    commits: int  # commit requests
    offsets_committed: int  # offsets accepted and staged
    offsets_rejected: int
    resets: int
    partitions_revoking: int = 0  # revoked, waiting for their owner to release them
    handovers: int = 0  # partitions moved from one member to another
    handovers_forced: int = 0  # taken at the owner's session timeout instead
    handover_ms_total: int = 0
    messages_redelivered: int = 0  # reported by releasing members


# ---------------------------------------------------------------------------
# Assignment


def assign_partitions(
    subscriptions: Mapping[str, Collection[str]],
    partition_counts: Mapping[str, int],
    current: Mapping[str, Mapping[str, Collection[int]]] | None = None,
) -> dict[str, Assignments]:
    """member id -> its assignments, for every member in `subscriptions` (member id ->
    its topics). `partition_counts` has the topics that exist (topic -> partitions);
    others get no partitions. `current` (member id -> what it holds now) makes it sticky.

    Per topic, in name order, the members subscribed to it get shares whose sizes
    differ by at most one; the larger shares go to the members holding the fewest
    partitions so far (which keeps totals even across topics), then to those holding
    more of this topic now (fewer moves), then by id. Each member keeps what it holds
    now up to its share; the partitions left over fill the members below their share,
    in id order, lowest partitions first (with no `current`: contiguous ranges).
    Deterministic: the result depends only on the arguments' contents."""
    current = current or {}
    subscribers: dict[str, list[str]] = {}
    for member_id in sorted(subscriptions):
        for topic in subscriptions[member_id]:
            subscribers.setdefault(topic, []).append(member_id)
    assignments: dict[str, Assignments] = {member_id: {} for member_id in sorted(subscriptions)}
    totals = dict.fromkeys(assignments, 0)
    for topic in sorted(subscribers):
        count = partition_counts.get(topic, 0)
        if count <= 0:
            continue
        members = subscribers[topic]  # sorted, each once (the topics were a set)
        held = {
            member_id: sorted({p for p in current.get(member_id, {}).get(topic, ()) if 0 <= p < count})
            for member_id in members
        }
        base, extra = divmod(count, len(members))
        ranked = sorted(members, key=lambda member_id: (totals[member_id], -len(held[member_id]), member_id))
        favoured = set(ranked[:extra])
        shares = {member_id: base + (member_id in favoured) for member_id in members}
        taken: set[int] = set()
        chosen: dict[str, list[int]] = {}
        for member_id in members:
            kept = [p for p in held[member_id] if p not in taken][: shares[member_id]]
            chosen[member_id] = kept
            taken.update(kept)
        free = iter(p for p in range(count) if p not in taken)
        for member_id in members:
            while len(chosen[member_id]) < shares[member_id]:
                chosen[member_id].append(next(free))
            if chosen[member_id]:
                assignments[member_id][topic] = sorted(chosen[member_id])
                totals[member_id] += len(chosen[member_id])
        assert sum(len(partitions) for partitions in chosen.values()) == count
    return assignments


# ---------------------------------------------------------------------------
# State


@dataclass(slots=True)
class _Member:
    member_id: str
    client_id: str
    topics: frozenset[str]
    session_timeout_ms: int
    last_heartbeat_ms: int
    generation: int
    # The deadline of this member's entry in the expiry heap (other entries are stale).
    scheduled_deadline_ms: int = 0

    @property
    def deadline_ms(self) -> int:
        return self.last_heartbeat_ms + self.session_timeout_ms


@dataclass(slots=True)
class _GroupCounters:
    """What a group's handovers did, since the broker started (kept while the group has
    members or committed offsets known to this process)."""

    rebalances: int = 0  # generation bumps
    partitions_moved: int = 0  # released, taken at the deadline, or left by a member that is gone
    handovers: int = 0  # of those, revoked from a live owner (released or taken at the deadline)
    handovers_forced: int = 0  # of those, taken because the owner did not release in time
    handover_ms_total: int = 0  # revocation to release, summed over partitions_moved
    handover_ms_max: int = 0
    messages_redelivered: int = 0  # reported by releasing members (see heartbeat)

    def handed_over(self, duration_ms: int, forced: bool) -> None:
        self.partitions_moved += 1
        self.handovers += 1
        self.handovers_forced += forced
        self.handover_ms_total += duration_ms
        self.handover_ms_max = max(self.handover_ms_max, duration_ms)


@dataclass(slots=True)
class _Revocation:
    """A partition whose owner must let go: it is out of the owner's assignment from
    `generation` on, and released once the owner shows it knows that generation (or at
    `deadline_ms`, its session timeout later)."""

    generation: int
    started_ms: int
    deadline_ms: int


@dataclass(slots=True)
class _Group:
    name: str
    generation: int = 0
    members: dict[str, _Member] = field(default_factory=dict)
    # member id -> the partitions it may fetch now (every member has an entry): what it
    # owns, less what is being revoked from it.
    assignments: dict[str, Assignments] = field(default_factory=dict)
    # (topic, partition) -> (owner's member id, the generation it became the owner). The
    # owner may fetch and commit it; a partition being revoked keeps its old owner.
    owners: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    # (topic, partition) -> the member it should go to (the sticky target assignment).
    targets: dict[tuple[str, int], str] = field(default_factory=dict)
    # Partitions whose owner is not their target, until the owner releases them.
    revoking: dict[tuple[str, int], _Revocation] = field(default_factory=dict)

    def state(self) -> str:
        if not self.members:
            return STATE_EMPTY
        if self.revoking or any(member.generation != self.generation for member in self.members.values()):
            return STATE_REBALANCING
        return STATE_STABLE


def _copy(assignments: Assignments) -> Assignments:
    return {topic: list(partitions) for topic, partitions in assignments.items()}


# ---------------------------------------------------------------------------
# The coordinator


class GroupCoordinator:
    """Stream-mode consumer groups. `partitions_of(topic)` is the topic's partition
    count, None when it does not exist. See the module docstring for the semantics."""

    def __init__(
        self,
        metadata: MetadataStore,
        partitions_of: Callable[[str], int | None],
        clock_ms: Callable[[], int],
        limits: GroupLimits = DEFAULT_GROUP_LIMITS,
    ) -> None:
        self._metadata = metadata
        self._partitions_of = partitions_of
        self._clock_ms = clock_ms
        self._limits = limits
        self._groups: dict[str, _Group] = {}
        # (deadline_ms, group, member_id); an entry is live while its member's
        # scheduled_deadline_ms equals it. See next_deadline_ms.
        self._deadlines: list[tuple[int, str, str]] = []
        self._members = 0
        self._rebalances = 0
        self._joins = 0
        self._leaves = 0
        self._members_expired = 0
        self._heartbeats = 0
        self._commits = 0
        self._offsets_committed = 0
        self._offsets_rejected = 0
        self._resets = 0
        self._handovers = 0
        self._handovers_forced = 0
        self._handover_ms_total = 0
        self._messages_redelivered = 0
        self._group_statistics: dict[str, _GroupCounters] = {}
        self._revoking_groups: set[str] = set()
        # Called with a group's name when its generation moves or it is forgotten: the
        # server answers the members' waiting heartbeats then (wire-independent).
        self.on_generation: Callable[[str], None] | None = None

    @property
    def limits(self) -> GroupLimits:
        return self._limits

    # -- membership ---------------------------------------------------------

    def join(
        self,
        group: str,
        member_id: str,
        client_id: str,
        topics: Iterable[str],
        session_timeout_ms: int,
    ) -> JoinResult:
        """Join `group` (member_id "" or unknown: as a new member, with a new id) or
        update a member's topics and session timeout. A new member or changed topics
        rebalance the group; a member joining again unchanged gets the current
        generation and assignment."""
        self._check_group_name(group)
        client_id_bytes = _utf8_bytes(client_id)
        if client_id_bytes is None:
            raise GroupError(ErrorCode.INVALID_REQUEST, "the client id is not valid UTF-8")
        if client_id_bytes > self._limits.client_id_bytes_max:
            raise GroupError(
                ErrorCode.LIMIT_EXCEEDED,
                f"client id of {client_id_bytes} bytes exceeds client_id_bytes_max {self._limits.client_id_bytes_max}",
            )
        if not self._limits.session_timeout_ms_min <= session_timeout_ms <= self._limits.session_timeout_ms_max:
            raise GroupError(
                ErrorCode.LIMIT_EXCEEDED,
                f"session timeout {session_timeout_ms} ms is outside [session_timeout_ms_min "
                f"{self._limits.session_timeout_ms_min}, session_timeout_ms_max "
                f"{self._limits.session_timeout_ms_max}]",
            )
        subscribed = self._check_topics(topics)
        now_ms = self._clock_ms()
        state = self._groups.get(group)
        member = None if state is None else state.members.get(member_id)
        if state is not None and member is not None:
            member.client_id = client_id
            member.session_timeout_ms = session_timeout_ms
            member.last_heartbeat_ms = now_ms
            if member.topics != subscribed:
                member.topics = subscribed
                self._rebalance(state, membership_changed=True)
            member.generation = state.generation  # the answer is that generation's assignment
            self._release_acknowledged(state, member)
            if member.deadline_ms < member.scheduled_deadline_ms:  # a shorter timeout
                self._schedule(state.name, member)
        else:
            if state is None:
                if len(self._groups) >= self._limits.groups_max:
                    raise GroupError(
                        ErrorCode.LIMIT_EXCEEDED,
                        f"{len(self._groups)} groups have members: groups_max reached",
                    )
                state = _Group(group)
            if len(state.members) >= self._limits.members_per_group_max:
                raise GroupError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"group {group!r} has {len(state.members)} members: members_per_group_max reached",
                )
            member = _Member(
                member_id=self._new_member_id(state, client_id),
                client_id=client_id,
                topics=subscribed,
                session_timeout_ms=session_timeout_ms,
                last_heartbeat_ms=now_ms,
                generation=0,
            )
            self._groups[group] = state
            state.members[member.member_id] = member
            self._members += 1
            self._joins += 1
            self._schedule(group, member)
            self._rebalance(state, membership_changed=True)
            member.generation = state.generation
        return JoinResult(
            generation=state.generation,
            member_id=member.member_id,
            heartbeat_interval_ms=max(1, session_timeout_ms // HEARTBEATS_PER_SESSION),
            assignments=_copy(state.assignments[member.member_id]),
        )

    def leave(self, group: str, member_id: str) -> None:
        """Remove a member; the others rebalance. UNKNOWN_MEMBER when it is not there."""
        state, member = self._member(group, member_id)
        self._remove(state, member)
        self._leaves += 1
        if state.members:
            self._rebalance(state, membership_changed=True)
        else:
            self._forget(group)

    def heartbeat(self, group: str, member_id: str, generation: int, messages_redelivered: int = 0) -> HeartbeatResult:
        """Keep a member alive and tell it the current generation and its assignment
        (REBALANCE_IN_PROGRESS when `generation` is older). A member that heartbeats
        with a generation has adopted that generation's assignment: it has stopped
        reading, and committed, the partitions revoked up to it, which go on to their
        new owners now. `messages_redelivered`: what the member handled of the
        partitions it let go past the offsets it committed (counted, reported).
        UNKNOWN_MEMBER when it expired or left; ILLEGAL_GENERATION for a generation the
        group never had."""
        state, member = self._member(group, member_id)
        if not 0 < generation <= state.generation:
            raise GroupError(
                ErrorCode.ILLEGAL_GENERATION,
                f"generation {generation} of group {group!r}, which is at {state.generation}",
            )
        self._heartbeats += 1
        member.last_heartbeat_ms = self._clock_ms()
        member.generation = max(member.generation, generation)
        if messages_redelivered > 0:
            self._messages_redelivered += messages_redelivered
            self._group_statistics.setdefault(group, _GroupCounters()).messages_redelivered += messages_redelivered
        self._release_acknowledged(state, member)
        stale = generation != state.generation
        return HeartbeatResult(
            error_code=ErrorCode.REBALANCE_IN_PROGRESS if stale else ErrorCode.NONE,
            generation=state.generation,
            assignments=_copy(state.assignments[member_id]),
        )

    def session_timeout_ms(self, group: str, member_id: str) -> int:
        """A member's session timeout. UNKNOWN_MEMBER when it is not there."""
        return self._member(group, member_id)[1].session_timeout_ms

    def expire(self, now_ms: int | None = None) -> list[ExpiredMember]:
        """Remove every member whose last heartbeat (or join, or commit) is at least its
        session timeout before `now_ms` (default: the clock); each group that lost
        members rebalances once. Returns the removed members, in deadline order."""
        if now_ms is None:
            now_ms = self._clock_ms()
        expired: list[ExpiredMember] = []
        touched: dict[str, _Group] = {}
        while True:
            deadline_ms = self._next_live_deadline_ms()
            if deadline_ms is None or deadline_ms > now_ms:
                break
            _, group, member_id = heapq.heappop(self._deadlines)
            state = self._groups[group]
            member = state.members[member_id]
            self._remove(state, member)
            self._members_expired += 1
            touched[group] = state
            expired.append(ExpiredMember(group, member_id, member.client_id))
        for group, state in touched.items():
            if state.members:
                self._rebalance(state, membership_changed=True)
            else:
                self._forget(group)
        for group in list(self._revoking_groups):  # owners that did not release in time
            state = self._groups[group]
            if any(revocation.deadline_ms <= now_ms for revocation in state.revoking.values()):
                self._settle(state, now_ms=now_ms)
        return expired

    def next_deadline_ms(self) -> int | None:
        """When the next member expires unless it heartbeats first, or the next
        revocation is taken from an owner that has not released it (clock_ms time);
        None when neither is pending: when the server should call expire()."""
        deadlines = [
            revocation.deadline_ms
            for group in self._revoking_groups
            for revocation in self._groups[group].revoking.values()
        ]
        member_deadline_ms = self._next_live_deadline_ms()
        if member_deadline_ms is not None:
            deadlines.append(member_deadline_ms)
        return min(deadlines, default=None)

    # -- offsets ------------------------------------------------------------

    def commit(
        self,
        group: str,
        generation: int,
        member_id: str,
        offsets: Iterable[OffsetToCommit | tuple[str, int, int, str | None]],
    ) -> CommitResult:
        """Stage the offsets the group may commit and answer each: NONE (staged; durable
        after the server's next metadata flush), UNKNOWN_MEMBER, ILLEGAL_GENERATION
        (stale, or a partition the member does not own), UNKNOWN_TOPIC,
        UNKNOWN_PARTITION, INVALID_REQUEST (a negative offset, metadata that is not
        UTF-8), LIMIT_EXCEEDED
        (metadata over offset_metadata_bytes_max). Never flushes."""
        state = self._groups.get(group)
        if state is None:  # a group held here had its name checked when it was made (join)
            self._check_group_name(group)
        self._commits += 1
        member = None if state is None else state.members.get(member_id)
        if state is None:
            if generation == NO_GENERATION:
                group_error = ErrorCode.NONE  # a consumer outside group membership
            else:
                group_error = ErrorCode.UNKNOWN_MEMBER if member_id else ErrorCode.ILLEGAL_GENERATION
        elif member is None:
            group_error = ErrorCode.UNKNOWN_MEMBER
        else:
            member.last_heartbeat_ms = self._clock_ms()
            in_range = 0 < generation <= state.generation
            group_error = ErrorCode.NONE if in_range else ErrorCode.ILLEGAL_GENERATION
        metadata_bytes_max = self._metadata.limits.offset_metadata_bytes_max
        partition_counts: dict[str, int | None] = {}
        results: list[PartitionResult] = []
        accepted: list[tuple[str, int, int, str]] = []
        for topic, partition, offset, metadata in offsets:
            metadata = metadata or ""
            if topic not in partition_counts:
                partition_counts[topic] = self._existing_partitions(topic)
            count = partition_counts[topic]
            code: ErrorCode
            if group_error != ErrorCode.NONE:
                code = group_error
            elif count is None:
                code = ErrorCode.UNKNOWN_TOPIC
            elif not 0 <= partition < count:
                code = ErrorCode.UNKNOWN_PARTITION
            elif offset < 0 or (metadata_bytes := _utf8_bytes(metadata) if metadata else 0) is None:
                code = ErrorCode.INVALID_REQUEST
            elif metadata_bytes > metadata_bytes_max:
                code = ErrorCode.LIMIT_EXCEEDED
            elif state is not None and not _owns(state, member_id, generation, topic, partition):
                code = ErrorCode.ILLEGAL_GENERATION
            else:
                code = ErrorCode.NONE
                accepted.append((topic, partition, offset, metadata))
            results.append(PartitionResult(topic, partition, code))
        for topic, partition, offset, metadata in accepted:
            self._metadata.stage_offset(group, topic, partition, offset, metadata)
        self._offsets_committed += len(accepted)
        self._offsets_rejected += len(results) - len(accepted)
        return CommitResult(results=results, staged=len(accepted))

    def fetch_offsets(
        self,
        group: str,
        topics: Iterable[str] | None = None,
        partitions: Iterable[tuple[str, int]] | None = None,
    ) -> dict[tuple[str, int], CommittedOffset]:
        """The group's committed offsets, staged ones included, sorted by (topic,
        partition): of `partitions` when given (those with none are left out), else of
        `topics` when given, else all. Any group, members or not; none: empty."""
        self._check_group_name(group)
        if partitions is not None:
            found = {}
            for topic, partition in sorted(set(partitions)):
                entry = self._stored_offset(group, topic, partition)
                if entry is not None:
                    found[topic, partition] = entry
            return found
        offsets = self._metadata.group_offsets(group)
        wanted = None if topics is None else set(topics)
        return {key: offsets[key] for key in sorted(offsets) if wanted is None or key[0] in wanted}

    def reset(
        self,
        group: str,
        topic: str,
        spec: ResetSpec,
        partitions: Iterable[int],
        resolve: Callable[[str, int, ResetSpec, int], int],
        value: int = NO_OFFSET,
    ) -> ResetResult:
        """Move the group's committed offsets in `topic` (of `partitions`; empty: every
        partition) to `resolve(topic, partition, spec, value)`: the server's earliest,
        latest, offset or time lookup, which may raise a NodiError (nothing is staged
        then). Staged, not flushed. GROUP_NOT_EMPTY while the group has members."""
        self._check_group_name(group)
        state = self._groups.get(group)
        if state is not None:
            raise GroupError(
                ErrorCode.GROUP_NOT_EMPTY,
                f"group {group!r} has {len(state.members)} members: stop them before a reset",
            )
        if spec in (ResetSpec.OFFSET, ResetSpec.TIMESTAMP) and value < 0:
            raise GroupError(ErrorCode.INVALID_REQUEST, f"reset to {spec.name.lower()} needs a value >= 0")
        count = self._existing_partitions(topic)
        if count is None:
            raise GroupError(ErrorCode.UNKNOWN_TOPIC, f"no topic {topic!r}")
        chosen = sorted(set(partitions)) or list(range(count))
        for partition in chosen:
            if not 0 <= partition < count:
                raise GroupError(ErrorCode.UNKNOWN_PARTITION, f"topic {topic!r} has no partition {partition}")
        offsets = {partition: resolve(topic, partition, spec, value) for partition in chosen}
        for partition, offset in offsets.items():
            assert isinstance(offset, int) and offset >= 0, (partition, offset)
            self._metadata.stage_offset(group, topic, partition, offset, "")
        self._resets += 1
        return ResetResult(offsets=offsets, staged=len(offsets))

    # -- inspection ---------------------------------------------------------

    def list_groups(self) -> list[GroupListing]:
        """Groups with members, and groups known only from committed offsets (state
        empty), sorted by name. Queue groups (state but no offsets) are not listed."""
        listings = {name: GroupListing(name, state.state(), len(state.members)) for name, state in self._groups.items()}
        for name in self._metadata.list_groups():
            if name not in listings and self._metadata.group_offsets(name):
                listings[name] = GroupListing(name, STATE_EMPTY, 0)
        return [listings[name] for name in sorted(listings)]

    def describe(self, group: str) -> GroupDescription:
        """A group's members with their assignments, and its committed offsets over
        every partition it subscribes to or has committed. UNKNOWN_GROUP when it has
        neither members nor offsets."""
        self._check_group_name(group)
        state = self._groups.get(group)
        stored = self._metadata.group_offsets(group)
        if state is None and not stored:
            raise GroupError(ErrorCode.UNKNOWN_GROUP, f"no group {group!r}")
        offsets: dict[tuple[str, int], CommittedOffset | None] = dict(stored)
        members: list[MemberDescription] = []
        if state is not None:
            subscribed = set().union(*(member.topics for member in state.members.values()))
            for topic in subscribed:
                for partition in range(self._existing_partitions(topic) or 0):
                    offsets.setdefault((topic, partition), None)
            members = [
                MemberDescription(
                    member_id=member.member_id,
                    client_id=member.client_id,
                    topics=tuple(sorted(member.topics)),
                    session_timeout_ms=member.session_timeout_ms,
                    last_heartbeat_ms=member.last_heartbeat_ms,
                    generation=member.generation,
                    assignments=_copy(state.assignments[member.member_id]),
                    revoking=_revoking_of(state, member.member_id),
                )
                for member in sorted(state.members.values(), key=lambda member: member.member_id)
            ]
        return GroupDescription(
            group=group,
            state=STATE_EMPTY if state is None else state.state(),
            generation=0 if state is None else state.generation,
            members=members,
            offsets={key: offsets[key] for key in sorted(offsets)},
            handovers=self._handover_statistics(group),
        )

    def _handover_statistics(self, group: str) -> HandoverStatistics:
        counters = self._group_statistics.get(group, _GroupCounters())
        state = self._groups.get(group)
        return HandoverStatistics(
            rebalances=counters.rebalances,
            partitions_moved=counters.partitions_moved,
            handovers=counters.handovers,
            handovers_forced=counters.handovers_forced,
            handover_ms_total=counters.handover_ms_total,
            handover_ms_max=counters.handover_ms_max,
            partitions_revoking=0 if state is None else len(state.revoking),
            messages_redelivered=counters.messages_redelivered,
        )

    def statistics(self) -> GroupStatistics:
        return GroupStatistics(
            groups=len(self._groups),
            members=self._members,
            groups_rebalancing=sum(1 for state in self._groups.values() if state.state() == STATE_REBALANCING),
            rebalances=self._rebalances,
            joins=self._joins,
            leaves=self._leaves,
            members_expired=self._members_expired,
            heartbeats=self._heartbeats,
            commits=self._commits,
            offsets_committed=self._offsets_committed,
            offsets_rejected=self._offsets_rejected,
            resets=self._resets,
            partitions_revoking=sum(len(self._groups[group].revoking) for group in self._revoking_groups),
            handovers=self._handovers,
            handovers_forced=self._handovers_forced,
            handover_ms_total=self._handover_ms_total,
            messages_redelivered=self._messages_redelivered,
        )

    # -- topic changes (called by the server) -----------------------------------

    def on_topic_created(self, topic: str) -> list[str]:
        """Rebalance the groups with a member subscribed to `topic`, once it exists.
        Returns the groups whose generation moved."""
        return self._rebalance_subscribers(topic)

    def on_topic_partitions_changed(self, topic: str) -> list[str]:
        """The same, after partitions were added to `topic`."""
        return self._rebalance_subscribers(topic)

    def on_topic_deleted(self, topic: str) -> list[str]:
        """Take `topic`'s partitions out of every assignment (the groups holding some
        rebalance). Subscriptions stay: a topic created again under the name is
        assigned on on_topic_created. The metadata store drops the offsets itself."""
        return self._rebalance_subscribers(topic, deleted=True)

    # -- internals ------------------------------------------------------------

    def _check_group_name(self, group: str) -> None:
        try:
            check_group_name(group, self._metadata.limits.group_name_bytes_max)
        except InvalidConfigError as error:
            raise GroupError(ErrorCode.INVALID_REQUEST, str(error)) from None

    def _check_topics(self, topics: Iterable[str]) -> frozenset[str]:
        subscribed = frozenset(topics)
        if not subscribed:
            raise GroupError(ErrorCode.INVALID_REQUEST, "a member must subscribe to at least one topic")
        if len(subscribed) > self._limits.topics_per_member_max:
            raise GroupError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{len(subscribed)} topics exceed topics_per_member_max {self._limits.topics_per_member_max}",
            )
        for topic in subscribed:
            try:
                validate_topic_name(topic)
            except InvalidConfigError as error:
                raise GroupError(ErrorCode.INVALID_CONFIG, str(error)) from None
        return subscribed

    def _existing_partitions(self, topic: str) -> int | None:
        """The partition count of an existing topic, None otherwise."""
        count = self._partitions_of(topic)
        return count if count is not None and count > 0 else None

    def _stored_offset(self, group: str, topic: str, partition: int) -> CommittedOffset | None:
        try:
            return self._metadata.committed_offset(group, topic, partition)
        except InvalidConfigError:  # a name or partition no key can hold: nothing stored
            return None

    def _member(self, group: str, member_id: str) -> tuple[_Group, _Member]:
        state = self._groups.get(group)
        member = None if state is None else state.members.get(member_id)
        if state is None or member is None:
            raise GroupError(
                ErrorCode.UNKNOWN_MEMBER,
                f"no member {member_id!r} in group {group!r} (expired or left): join again",
            )
        return state, member

    def _new_member_id(self, state: _Group, client_id: str) -> str:
        while True:
            member_id = f"{client_id or 'member'}-{uuid.uuid4().hex[:12]}"
            if member_id not in state.members:
                return member_id

    def _remove(self, state: _Group, member: _Member) -> None:
        """Drop a member; its heap entry goes stale. The caller rebalances."""
        del state.members[member.member_id]
        del state.assignments[member.member_id]
        self._members -= 1

    def _rebalance(self, state: _Group, *, membership_changed: bool, deleted_topic: str | None = None) -> bool:
        """Recompute the group's target assignment (sticky), then settle. Returns
        whether the generation moved."""
        subscriptions = {member_id: member.topics for member_id, member in state.members.items()}
        partition_counts = {}
        for topic in set().union(*subscriptions.values()):
            count = None if topic == deleted_topic else self._existing_partitions(topic)
            if count is not None:
                partition_counts[topic] = count
        # Sticky to who holds each partition now (a target not reached yet costs nothing
        # to change; moving a held partition costs a handover).
        current: dict[str, dict[str, list[int]]] = {}
        for (topic, partition), (member_id, _) in state.owners.items():
            current.setdefault(member_id, {}).setdefault(topic, []).append(partition)
        targets = assign_partitions(subscriptions, partition_counts, current)
        state.targets = {
            (topic, partition): member_id
            for member_id, member_assignments in targets.items()
            for topic, partitions in member_assignments.items()
            for partition in partitions
        }
        return self._settle(state, membership_changed=membership_changed)

    def _settle(self, state: _Group, *, membership_changed: bool = False, now_ms: int | None = None) -> bool:
        """Move ownership one step toward the targets: a partition with no live owner
        goes to its target at once; one whose owner is not its target is revoked (out
        of the owner's assignment, still the owner's to commit) until the owner
        acknowledges the generation that revoked it, or its session timeout passes;
        then it goes to its target. Bump the generation when a member's assignment or
        the membership changed. Returns whether it bumped."""
        now_ms = self._clock_ms() if now_ms is None else now_ms
        next_generation = state.generation + 1
        owners: dict[tuple[str, int], tuple[str, int]] = {}
        revoking: dict[tuple[str, int], _Revocation] = {}
        stats = self._group_statistics.setdefault(state.name, _GroupCounters())
        for key, target in state.targets.items():
            owner, since = state.owners.get(key, ("", 0))
            member = state.members.get(owner)
            if member is None:  # never owned, or its owner left or expired
                owners[key] = (target, next_generation)
                if owner:
                    stats.partitions_moved += 1  # from a member that is gone: no handover to wait for
                continue
            if owner == target:
                owners[key] = (owner, since)
                continue
            revocation = state.revoking.get(key)
            if revocation is None:
                revoking[key] = _Revocation(next_generation, now_ms, now_ms + member.session_timeout_ms)
                owners[key] = (owner, since)
            elif member.generation >= revocation.generation or now_ms >= revocation.deadline_ms:
                forced = member.generation < revocation.generation
                owners[key] = (target, next_generation)
                stats.handed_over(now_ms - revocation.started_ms, forced)
                self._handovers += 1
                self._handovers_forced += forced
                self._handover_ms_total += now_ms - revocation.started_ms
            else:
                revoking[key] = revocation
                owners[key] = (owner, since)
        assignments: dict[str, Assignments] = {member_id: {} for member_id in state.members}
        for (topic, partition), (owner, _) in sorted(owners.items()):
            if (topic, partition) not in revoking:
                assignments[owner].setdefault(topic, []).append(partition)
        unchanged = (
            assignments == state.assignments
            and owners == state.owners
            and revoking.keys() == state.revoking.keys()  # a deleted topic's revoked partitions
        )
        if unchanged and not membership_changed:
            return False
        state.generation = next_generation
        state.assignments = assignments
        state.owners = owners
        state.revoking = revoking
        if revoking:
            self._revoking_groups.add(state.name)
        else:
            self._revoking_groups.discard(state.name)
        self._rebalances += 1
        stats.rebalances += 1
        if self.on_generation is not None:
            self.on_generation(state.name)
        return True

    def _release_acknowledged(self, state: _Group, member: _Member) -> None:
        """Settle when the member holds revoked partitions it may now have released."""
        if any(
            state.owners[key][0] == member.member_id and member.generation >= revocation.generation
            for key, revocation in state.revoking.items()
        ):
            self._settle(state)

    def _forget(self, group: str) -> None:
        """A group without members: its state goes (its offsets stay)."""
        del self._groups[group]
        self._revoking_groups.discard(group)
        self._group_statistics.pop(group, None)
        if self.on_generation is not None:
            self.on_generation(group)

    def _rebalance_subscribers(self, topic: str, *, deleted: bool = False) -> list[str]:
        moved = []
        for name, state in self._groups.items():
            if any(topic in member.topics for member in state.members.values()):
                if self._rebalance(state, membership_changed=False, deleted_topic=topic if deleted else None):
                    moved.append(name)
        return moved

    def _schedule(self, group: str, member: _Member) -> None:
        member.scheduled_deadline_ms = member.deadline_ms
        heapq.heappush(self._deadlines, (member.deadline_ms, group, member.member_id))
        # Entries of departed members and superseded deadlines wait in the heap until
        # they reach its top; rebuild it when they outnumber the live ones.
        if len(self._deadlines) > 2 * self._members + 64:
            self._deadlines = [
                (member.scheduled_deadline_ms, name, member.member_id)
                for name, state in self._groups.items()
                for member in state.members.values()
            ]
            heapq.heapify(self._deadlines)

    def _next_live_deadline_ms(self) -> int | None:
        """Bring the heap's top up to date and return its deadline. Heartbeats do not
        touch the heap: a member's entry keeps the deadline it was scheduled with, and
        reaching the top it is pushed back to the member's current deadline."""
        while self._deadlines:
            deadline_ms, group, member_id = self._deadlines[0]
            state = self._groups.get(group)
            member = None if state is None else state.members.get(member_id)
            if member is None or member.scheduled_deadline_ms != deadline_ms:
                heapq.heappop(self._deadlines)  # departed, or superseded by a newer entry
                continue
            assert member.deadline_ms >= deadline_ms
            if member.deadline_ms > deadline_ms:
                member.scheduled_deadline_ms = member.deadline_ms
                heapq.heapreplace(self._deadlines, (member.deadline_ms, group, member_id))
                continue
            return deadline_ms
        return None


def _owns(state: _Group, member_id: str, generation: int, topic: str, partition: int) -> bool:
    """Whether the member owns the partition and has since `generation` (or before)."""
    owner, since = state.owners.get((topic, partition), ("", 0))
    return owner == member_id and since <= generation


def _revoking_of(state: _Group, member_id: str) -> Assignments:
    revoking: Assignments = {}
    for topic, partition in sorted(state.revoking):
        if state.owners[topic, partition][0] == member_id:
            revoking.setdefault(topic, []).append(partition)
    return revoking


def _utf8_bytes(text: str) -> int | None:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


__all__ = [
    "NO_GENERATION",
    "HEARTBEATS_PER_SESSION",
    "STATE_EMPTY",
    "STATE_REBALANCING",
    "STATE_STABLE",
    "GroupLimits",
    "DEFAULT_GROUP_LIMITS",
    "Assignments",
    "GroupError",
    "JoinResult",
    "HeartbeatResult",
    "OffsetToCommit",
    "PartitionResult",
    "CommitResult",
    "ResetResult",
    "ExpiredMember",
    "GroupListing",
    "MemberDescription",
    "HandoverStatistics",
    "GroupDescription",
    "GroupStatistics",
    "assign_partitions",
    "GroupCoordinator",
]
