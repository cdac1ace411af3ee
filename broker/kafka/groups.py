"""Kafka's classic consumer-group protocol (JoinGroup, SyncGroup, Heartbeat, LeaveGroup)
for the listener, with committed offsets in nodi's own store.

Kafka's clients assign partitions themselves: the coordinator gathers every member's
JoinGroup (a barrier), picks a leader and a protocol (assignor) all members support,
sends the leader every member's subscription, and hands each member the assignment the
leader sends in its SyncGroup. Membership is a state machine per group:

    Empty --join--> PreparingRebalance --all members joined, or the rebalance
    timeout--> CompletingRebalance --leader's SyncGroup--> Stable --join, leave,
    member timeout--> PreparingRebalance ...

A member that does not heartbeat within its session timeout, or does not rejoin
within the rebalance timeout once a rebalance began, is removed. Membership lives in
memory: after a restart members get UNKNOWN_MEMBER_ID and join again.

Offsets: OffsetCommit and OffsetFetch go to the broker's stream-group coordinator
(broker/server/groups.py) as a consumer outside its membership (generation -1), so
Kafka groups' offsets are in the same LMDB store as nodi's stream groups and `nodi
group list/describe/reset` and the lag metrics show them. The Kafka generation fences
commits here first. A nodi group and a Kafka group of the same name share offsets;
while nodi members are in the nodi group, Kafka commits to it are refused
(UNKNOWN_MEMBER_ID) by the coordinator's own rule.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..protocol import messages as m
from ..protocol.errors import ErrorCode
from ..server.reply import response_of
from .errors import KafkaError, kafka_error

if TYPE_CHECKING:
    from ..server.service import Broker
    from .connection import KafkaRequest
    from .settings import KafkaSettings

log = logging.getLogger("nodi.kafka")

EMPTY = "Empty"
PREPARING = "PreparingRebalance"
COMPLETING = "CompletingRebalance"
STABLE = "Stable"
DEAD = "Dead"

# How often the timer looks for members past their session or rebalance timeout.
TIMER_INTERVAL_S = 0.1
# A JoinGroup or SyncGroup waits at most its rebalance timeout plus this for the barrier.
BARRIER_GRACE_MS = 5_000


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


@dataclass
class _Member:
    member_id: str
    client_id: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    protocol_type: str
    protocols: list[tuple[str, bytes]]
    last_heartbeat_ms: int
    join: asyncio.Future | None = None  # a JoinGroup waiting for the barrier
    sync: asyncio.Future | None = None  # a SyncGroup waiting for the leader's
    assignment: bytes = b""


@dataclass
class _Group:
    name: str
    state: str = EMPTY
    generation: int = 0
    protocol_type: str = ""
    protocol_name: str = ""
    leader: str = ""
    members: dict[str, _Member] = field(default_factory=dict)
    rebalance_deadline_ms: int = 0


class KafkaGroups:
    def __init__(self, broker: Broker, settings: KafkaSettings) -> None:
        self.broker = broker
        self.settings = settings
        self.limits = broker.config.groups
        self._groups: dict[str, _Group] = {}

    # -- the timer --------------------------------------------------------------------

    async def run_timer(self) -> None:
        while True:
            await asyncio.sleep(TIMER_INTERVAL_S)
            self.expire(_now_ms())

    def expire(self, now_ms: int) -> None:
        for group in list(self._groups.values()):
            for member in list(group.members.values()):
                waiting = member.join is not None and not member.join.done()
                if not waiting and now_ms - member.last_heartbeat_ms > member.session_timeout_ms:
                    log.info("kafka group %s: member %s timed out", group.name, member.member_id)
                    self._remove(group, member)
            if group.state == PREPARING and now_ms >= group.rebalance_deadline_ms:
                stragglers = [m for m in group.members.values() if m.join is None or m.join.done()]
                for member in stragglers:  # all of them first: the barrier then completes once
                    log.info("kafka group %s: member %s did not rejoin in time", group.name, member.member_id)
                    self._remove(group, member, complete=False)
                if group.members:
                    self._maybe_complete_join(group)

    # -- membership -------------------------------------------------------------------

    def _remove(self, group: _Group, member: _Member, *, complete: bool = True) -> None:
        del group.members[member.member_id]
        for future in (member.join, member.sync):
            if future is not None and not future.done():
                future.set_result({"error_code": KafkaError.UNKNOWN_MEMBER_ID})
        if not group.members:
            group.state = EMPTY
            group.leader = ""
            del self._groups[group.name]
            return
        if group.leader == member.member_id:
            group.leader = next(iter(group.members))
        self._prepare_rebalance(group)
        if complete:
            self._maybe_complete_join(group)

    def _prepare_rebalance(self, group: _Group) -> None:
        if group.state == PREPARING:
            return
        if group.state == COMPLETING:  # syncs of the generation that will not be
            for member in group.members.values():
                if member.sync is not None and not member.sync.done():
                    member.sync.set_result({"error_code": KafkaError.REBALANCE_IN_PROGRESS})
        group.state = PREPARING
        timeout_ms = max((member.rebalance_timeout_ms for member in group.members.values()), default=0)
        group.rebalance_deadline_ms = _now_ms() + timeout_ms

    def _maybe_complete_join(self, group: _Group) -> None:
        if group.state != PREPARING or not group.members:
            return
        if any(member.join is None or member.join.done() for member in group.members.values()):
            return
        leader = group.members.get(group.leader) or next(iter(group.members.values()))
        group.leader = leader.member_id
        common = set.intersection(*({name for name, _ in member.protocols} for member in group.members.values()))
        protocol = next((name for name, _ in leader.protocols if name in common), None)
        group.generation += 1
        if protocol is None:  # checked at join; a member set with nothing in common
            for member in group.members.values():
                assert member.join is not None
                member.join.set_result({"error_code": KafkaError.INCONSISTENT_GROUP_PROTOCOL})
            return
        group.protocol_name = protocol
        group.state = COMPLETING
        members = [
            {"member_id": member.member_id, "group_instance_id": None, "metadata": dict(member.protocols)[protocol]}
            for member in group.members.values()
        ]
        for member in group.members.values():
            assert member.join is not None
            member.join.set_result(
                {
                    "error_code": 0,
                    "generation_id": group.generation,
                    "protocol_name": protocol,
                    "leader": group.leader,
                    "member_id": member.member_id,
                    "members": members if member.member_id == group.leader else [],
                }
            )
            member.join = None
            member.last_heartbeat_ms = _now_ms()

    async def join_group(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        name = body["group_id"]
        failure = {
            "throttle_time_ms": 0,
            "generation_id": -1,
            "protocol_name": "",
            "leader": "",
            "member_id": body["member_id"],
            "members": [],
        }
        if not name:
            return {**failure, "error_code": KafkaError.INVALID_GROUP_ID}
        session_timeout_ms = body["session_timeout_ms"]
        if not self.limits.session_timeout_ms_min <= session_timeout_ms <= self.limits.session_timeout_ms_max:
            return {**failure, "error_code": KafkaError.INVALID_SESSION_TIMEOUT}
        protocols = [(protocol["name"], bytes(protocol["metadata"])) for protocol in body["protocols"]]
        if not protocols:
            return {**failure, "error_code": KafkaError.INCONSISTENT_GROUP_PROTOCOL}
        group = self._groups.get(name)
        if group is None:
            if len(self._groups) >= self.limits.groups_max:
                return {**failure, "error_code": KafkaError.COORDINATOR_NOT_AVAILABLE}
            group = self._groups[name] = _Group(name)
        if group.members and body["protocol_type"] != group.protocol_type:
            return {**failure, "error_code": KafkaError.INCONSISTENT_GROUP_PROTOCOL}
        if group.members:
            common = set.intersection(*({n for n, _ in member.protocols} for member in group.members.values()))
            if not common & {n for n, _ in protocols}:
                return {**failure, "error_code": KafkaError.INCONSISTENT_GROUP_PROTOCOL}
        member_id = body["member_id"]
        member = group.members.get(member_id)
        if member is None:
            if member_id:
                return {**failure, "error_code": KafkaError.UNKNOWN_MEMBER_ID}
            if len(group.members) >= self.limits.members_per_group_max:
                return {**failure, "error_code": KafkaError.COORDINATOR_NOT_AVAILABLE}
            member_id = f"{request.client_id or 'kafka'}-{uuid.uuid4()}"
            member = _Member(
                member_id=member_id,
                client_id=request.client_id or "",
                session_timeout_ms=session_timeout_ms,
                rebalance_timeout_ms=body.get("rebalance_timeout_ms", session_timeout_ms),
                protocol_type=body["protocol_type"],
                protocols=protocols,
                last_heartbeat_ms=_now_ms(),
            )
            group.members[member_id] = member
            group.protocol_type = body["protocol_type"]
        else:
            member.protocols = protocols
            member.session_timeout_ms = session_timeout_ms
            member.last_heartbeat_ms = _now_ms()
        if member.join is not None and not member.join.done():
            member.join.set_result({"error_code": KafkaError.UNKNOWN_MEMBER_ID})  # replaced by this join
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        member.join = future
        self._prepare_rebalance(group)
        self._maybe_complete_join(group)
        try:
            result = await asyncio.wait_for(
                asyncio.shield(future), (member.rebalance_timeout_ms + BARRIER_GRACE_MS) / 1000
            )
        except TimeoutError:
            return {**failure, "error_code": KafkaError.REBALANCE_IN_PROGRESS}
        return {**failure, **result}

    async def sync_group(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        group = self._groups.get(body["group_id"])
        member = None if group is None else group.members.get(body["member_id"])
        response = {"throttle_time_ms": 0, "error_code": 0, "assignment": b""}
        if group is None or member is None:
            return {**response, "error_code": KafkaError.UNKNOWN_MEMBER_ID}
        if body["generation_id"] != group.generation:
            return {**response, "error_code": KafkaError.ILLEGAL_GENERATION}
        if group.state == PREPARING:
            return {**response, "error_code": KafkaError.REBALANCE_IN_PROGRESS}
        member.last_heartbeat_ms = _now_ms()
        if group.state == STABLE:
            return {**response, "assignment": member.assignment}
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        member.sync = future
        if member.member_id == group.leader:
            assignments = {entry["member_id"]: bytes(entry["assignment"]) for entry in body["assignments"]}
            group.state = STABLE
            for other in group.members.values():
                other.assignment = assignments.get(other.member_id, b"")
                if other.sync is not None and not other.sync.done():
                    other.sync.set_result({"error_code": 0, "assignment": other.assignment})
                other.sync = None
        try:
            result = await asyncio.wait_for(
                asyncio.shield(future), (member.session_timeout_ms + BARRIER_GRACE_MS) / 1000
            )
        except TimeoutError:
            return {**response, "error_code": KafkaError.REBALANCE_IN_PROGRESS}
        return {**response, **result}

    async def heartbeat(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        group = self._groups.get(body["group_id"])
        member = None if group is None else group.members.get(body["member_id"])
        if group is None or member is None:
            return {"throttle_time_ms": 0, "error_code": KafkaError.UNKNOWN_MEMBER_ID}
        member.last_heartbeat_ms = _now_ms()
        if body["generation_id"] != group.generation:
            return {"throttle_time_ms": 0, "error_code": KafkaError.ILLEGAL_GENERATION}
        if group.state == PREPARING:
            return {"throttle_time_ms": 0, "error_code": KafkaError.REBALANCE_IN_PROGRESS}
        return {"throttle_time_ms": 0, "error_code": 0}

    async def leave_group(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        group = self._groups.get(body["group_id"])
        if request.api_version < 3:
            member_ids = [body["member_id"]]
        else:
            member_ids = [entry["member_id"] for entry in body["members"]]
        results = []
        for member_id in member_ids:
            member = None if group is None else group.members.get(member_id)
            if group is None or member is None:
                results.append(KafkaError.UNKNOWN_MEMBER_ID)
                continue
            log.info("kafka group %s: member %s left", group.name, member_id)
            self._remove(group, member)
            results.append(KafkaError.NONE)
        return {
            "throttle_time_ms": 0,
            "error_code": results[0] if request.api_version < 3 else 0,
            "members": [
                {"member_id": member_id, "group_instance_id": None, "error_code": error}
                for member_id, error in zip(member_ids, results)
            ],
        }

    # -- offsets ----------------------------------------------------------------------

    async def offset_commit(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        group = self._groups.get(body["group_id"])
        error = KafkaError.NONE
        if body["generation_id"] >= 0 or body["member_id"]:
            member = None if group is None else group.members.get(body["member_id"])
            if group is None or member is None:
                error = KafkaError.UNKNOWN_MEMBER_ID
            elif body["generation_id"] != group.generation:
                error = KafkaError.ILLEGAL_GENERATION
            elif group.state == COMPLETING:
                error = KafkaError.REBALANCE_IN_PROGRESS
            else:
                member.last_heartbeat_ms = _now_ms()
        elif group is not None and group.members:
            error = KafkaError.UNKNOWN_MEMBER_ID  # a simple consumer while the group has members
        results: dict[tuple[str, int], KafkaError] = {}
        if error == KafkaError.NONE:
            offsets = [
                m.OffsetCommit(
                    topic=topic["name"],
                    partition=partition["partition_index"],
                    offset=partition["committed_offset"],
                    metadata=partition["committed_metadata"],
                )
                for topic in body["topics"]
                for partition in topic["partitions"]
            ]
            reply = await self.broker.handle(m.CommitOffsetsRequest(group=body["group_id"], offsets=offsets))
            response = response_of(reply, m.CommitOffsetsResponse)
            if response.error_code != ErrorCode.NONE:
                error = kafka_error(response.error_code)
            else:
                for result in response.results:
                    results[result.topic, result.partition] = kafka_error(result.error_code)
        return {
            "throttle_time_ms": 0,
            "topics": [
                {
                    "name": topic["name"],
                    "partitions": [
                        {
                            "partition_index": partition["partition_index"],
                            "error_code": results.get((topic["name"], partition["partition_index"]), error),
                        }
                        for partition in topic["partitions"]
                    ],
                }
                for topic in body["topics"]
            ],
        }

    async def offset_fetch(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        wanted = body["topics"]
        reply = await self.broker.handle(
            m.FetchOffsetsRequest(group=body["group_id"], topics=[] if wanted is None else [t["name"] for t in wanted])
        )
        response = response_of(reply, m.FetchOffsetsResponse)
        if response.error_code == ErrorCode.PARTITION_NOT_READY:  # a client retries this one
            return {"throttle_time_ms": 0, "topics": [], "error_code": KafkaError.COORDINATOR_LOAD_IN_PROGRESS}
        if response.error_code != ErrorCode.NONE:
            return {"throttle_time_ms": 0, "topics": [], "error_code": kafka_error(response.error_code)}
        committed = {(entry.topic, entry.partition): entry for entry in response.offsets}
        if wanted is None:
            keys = sorted(committed)
        else:
            keys = [(topic["name"], index) for topic in wanted for index in topic["partition_indexes"]]
        by_topic: dict[str, list[dict[str, Any]]] = {}
        for topic, partition in keys:
            entry = committed.get((topic, partition))
            by_topic.setdefault(topic, []).append(
                {
                    "partition_index": partition,
                    "committed_offset": -1 if entry is None else entry.offset,
                    "committed_leader_epoch": -1,
                    "metadata": "" if entry is None else (entry.metadata or ""),
                    "error_code": 0,
                }
            )
        return {
            "throttle_time_ms": 0,
            "topics": [{"name": topic, "partitions": partitions} for topic, partitions in by_topic.items()],
            "error_code": 0,
        }

    # -- listing ----------------------------------------------------------------------

    async def list_groups(self, request: KafkaRequest) -> dict[str, Any]:
        groups = {name: group.protocol_type for name, group in self._groups.items()}
        for listing in self.broker.coordinator.list_groups():
            groups.setdefault(listing.group, "")
        return {
            "throttle_time_ms": 0,
            "error_code": 0,
            "groups": [{"group_id": name, "protocol_type": kind} for name, kind in sorted(groups.items())],
        }

    async def describe_groups(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        described = []
        for name in body["groups"]:
            group = self._groups.get(name)
            if group is None:
                described.append(
                    {
                        "error_code": 0,
                        "group_id": name,
                        "group_state": DEAD,
                        "protocol_type": "",
                        "protocol_data": "",
                        "members": [],
                        "authorized_operations": -2147483648,
                    }
                )
                continue
            stable = group.state == STABLE
            described.append(
                {
                    "error_code": 0,
                    "group_id": name,
                    "group_state": group.state,
                    "protocol_type": group.protocol_type,
                    "protocol_data": group.protocol_name if stable else "",
                    "members": [
                        {
                            "member_id": member.member_id,
                            "group_instance_id": None,
                            "client_id": member.client_id,
                            "client_host": "",
                            "member_metadata": dict(member.protocols).get(group.protocol_name, b"") if stable else b"",
                            "member_assignment": member.assignment if stable else b"",
                        }
                        for member in group.members.values()
                    ],
                    "authorized_operations": -2147483648,
                }
            )
        return {"throttle_time_ms": 0, "groups": described}
