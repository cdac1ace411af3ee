"""The stream-mode consumer-group coordinator: membership, partition assignment,
committed offsets and replay resets, with no I/O of its own.

The server calls it from its event loop (it is not thread-safe) and owns its timer:
after handling requests it asks `next_deadline_ms()` and, when that time comes, calls
`expire(now_ms)`. Times come from the `clock_ms` it is given, which should be monotonic
(the server's loop clock in ms); commit times stored with offsets are wall-clock, taken
by the metadata store.

Kafka's model, simplified
-------------------------
The coordinator assigns partitions itself (there is no leader client and no
SyncGroup), and there is no "rebalance in progress" barrier:

- Every join, leave or expiry that changes the membership or a member's topics bumps
  the group's generation and recomputes the assignment at once (`assign_partitions`:
  per topic, contiguous ranges over the subscribed members sorted by member id; a
  pure function of the members and their topics, so the same membership always gives
  the same assignment). A topic created or grown later rebalances the groups subscribed
  to it (`on_topic_created`, `on_topic_partitions_changed`); a deleted topic's
  partitions leave the assignment (`on_topic_deleted`) but the subscriptions stay, so a
  topic created again under that name is picked up. A member may subscribe to a topic
  that does not exist yet: it gets no partitions for it until the topic is created.
- The other members learn of the new generation on their next heartbeat: its result
  carries the current generation and the member's current assignment with the flag
  REBALANCE_IN_PROGRESS, meaning "your generation is stale: commit what you have and
  adopt this assignment" (joining again with the member id does the same and changes
  nothing). No member waits for the others.
- So during a handover two members can briefly both read a partition: the new owner
  from the committed offset, the old one until its next heartbeat. Commits fence the
  old one: an offset is accepted only from the partition's current owner, with a
  generation no older than the one in which the partition went to that owner (a member
  that kept a partition through a rebalance may still commit it with its old
  generation). A stale commit for a partition that moved is rejected with
  ILLEGAL_GENERATION; the new owner re-reads from the last accepted offset. Delivery is
  at-least-once: a handover can repeat messages, never skip them.
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
    assignments: Assignments


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


# ---------------------------------------------------------------------------
# Assignment


def assign_partitions(
    subscriptions: Mapping[str, Collection[str]], partition_counts: Mapping[str, int]
) -> dict[str, Assignments]:
    """member id -> its assignments, for every member in `subscriptions` (member id ->
    its topics). `partition_counts` has the topics that exist (topic -> partitions);
    others get no partitions.

    Per topic, in name order: the members subscribed to it, sorted by id, get
    contiguous ranges whose sizes differ by at most one; the larger ranges go to the
    members holding the fewest partitions so far (ties by id), which keeps totals even
    across topics. Deterministic: the result depends only on the arguments' contents."""
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
        base, extra = divmod(count, len(members))
        favoured = set(sorted(members, key=lambda member_id: (totals[member_id], member_id))[:extra])
        start = 0
        for member_id in members:
            size = base + (member_id in favoured)
            if size:
                assignments[member_id][topic] = list(range(start, start + size))
                totals[member_id] += size
                start += size
        assert start == count
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
class _Group:
    name: str
    generation: int = 0
    members: dict[str, _Member] = field(default_factory=dict)
    # member id -> its assignments (every member has an entry).
    assignments: dict[str, Assignments] = field(default_factory=dict)
    # (topic, partition) -> (owner's member id, the generation it became the owner).
    owners: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)

    def state(self) -> str:
        if not self.members:
            return STATE_EMPTY
        if any(member.generation != self.generation for member in self.members.values()):
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
                f"client id of {client_id_bytes} bytes exceeds client_id_bytes_max "
                f"{self._limits.client_id_bytes_max}",
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
            member.generation = state.generation
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
            del self._groups[group]

    def heartbeat(self, group: str, member_id: str, generation: int) -> HeartbeatResult:
        """Keep a member alive and tell it the current generation and its assignment
        (REBALANCE_IN_PROGRESS when `generation` is older). UNKNOWN_MEMBER when it
        expired or left; ILLEGAL_GENERATION for a generation the group never had."""
        state, member = self._member(group, member_id)
        if not 0 < generation <= state.generation:
            raise GroupError(
                ErrorCode.ILLEGAL_GENERATION,
                f"generation {generation} of group {group!r}, which is at {state.generation}",
            )
        self._heartbeats += 1
        member.last_heartbeat_ms = self._clock_ms()
        member.generation = generation
        stale = generation != state.generation
        return HeartbeatResult(
            error_code=ErrorCode.REBALANCE_IN_PROGRESS if stale else ErrorCode.NONE,
            generation=state.generation,
            assignments=_copy(state.assignments[member_id]),
        )

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
                del self._groups[group]
        return expired

    def next_deadline_ms(self) -> int | None:
        """When the next member expires unless it heartbeats first (clock_ms time), or
        None when no group has members: when the server should call expire()."""
        return self._next_live_deadline_ms()

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
        self._check_group_name(group)
        self._commits += 1
        state = self._groups.get(group)
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
            elif offset < 0 or (metadata_bytes := _utf8_bytes(metadata)) is None:
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
        return {
            key: offsets[key]
            for key in sorted(offsets)
            if wanted is None or key[0] in wanted
        }

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
                raise GroupError(
                    ErrorCode.UNKNOWN_PARTITION, f"topic {topic!r} has no partition {partition}"
                )
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
        listings = {
            name: GroupListing(name, state.state(), len(state.members))
            for name, state in self._groups.items()
        }
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
                )
                for member in sorted(state.members.values(), key=lambda member: member.member_id)
            ]
        return GroupDescription(
            group=group,
            state=STATE_EMPTY if state is None else state.state(),
            generation=0 if state is None else state.generation,
            members=members,
            offsets={key: offsets[key] for key in sorted(offsets)},
        )

    def statistics(self) -> GroupStatistics:
        return GroupStatistics(
            groups=len(self._groups),
            members=self._members,
            groups_rebalancing=sum(
                1 for state in self._groups.values() if state.state() == STATE_REBALANCING
            ),
            rebalances=self._rebalances,
            joins=self._joins,
            leaves=self._leaves,
            members_expired=self._members_expired,
            heartbeats=self._heartbeats,
            commits=self._commits,
            offsets_committed=self._offsets_committed,
            offsets_rejected=self._offsets_rejected,
            resets=self._resets,
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
        """Recompute the group's assignment; bump the generation when the membership
        changed or the assignment did. Returns whether it bumped."""
        subscriptions = {member_id: member.topics for member_id, member in state.members.items()}
        partition_counts = {}
        for topic in set().union(*subscriptions.values()):
            count = None if topic == deleted_topic else self._existing_partitions(topic)
            if count is not None:
                partition_counts[topic] = count
        assignments = assign_partitions(subscriptions, partition_counts)
        owners = {
            (topic, partition): member_id
            for member_id, member_assignments in assignments.items()
            for topic, partitions in member_assignments.items()
            for partition in partitions
        }
        unchanged = owners == {key: owner for key, (owner, _) in state.owners.items()}
        if unchanged and not membership_changed:
            return False
        state.generation += 1
        state.assignments = assignments
        kept = state.owners
        state.owners = {}
        for key, owner in owners.items():
            previous_owner, since = kept.get(key, ("", 0))
            state.owners[key] = (owner, since if previous_owner == owner else state.generation)
        self._rebalances += 1
        return True

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


def _utf8_bytes(text: str) -> int | None:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


__all__ = [
    "NO_GENERATION", "HEARTBEATS_PER_SESSION", "STATE_EMPTY", "STATE_REBALANCING", "STATE_STABLE",
    "GroupLimits", "DEFAULT_GROUP_LIMITS", "Assignments", "GroupError", "JoinResult",
    "HeartbeatResult", "OffsetToCommit", "PartitionResult", "CommitResult", "ResetResult",
    "ExpiredMember", "GroupListing", "MemberDescription", "GroupDescription", "GroupStatistics",
    "assign_partitions", "GroupCoordinator",
]
