"""The Kafka listener's classic group state machine (broker/kafka/groups.py) in-process:
the join barrier, the leader's assignment handed out by SyncGroup, heartbeats that tell
members of a rebalance, a member removed at its session timeout or when it does not
rejoin within the rebalance timeout, and the generation fencing of commits."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from nodi.broker.kafka import groups as kafka_groups
from nodi.broker.kafka.connection import KafkaRequest
from nodi.broker.kafka.errors import KafkaError
from nodi.broker.kafka.groups import COMPLETING, PREPARING, STABLE, KafkaGroups
from nodi.broker.kafka.settings import KafkaSettings
from nodi.broker.server.groups import GroupLimits


def _groups() -> KafkaGroups:
    broker = SimpleNamespace(config=SimpleNamespace(groups=GroupLimits()))
    return KafkaGroups(broker, KafkaSettings())  # type: ignore[arg-type]


def _request(key: int, version: int, body: dict, client_id: str = "test") -> KafkaRequest:
    return KafkaRequest(key, version, 1, client_id, body=body)


def _join(member_id: str = "", rebalance_timeout_ms: int = 60_000) -> KafkaRequest:
    return _request(
        11,
        5,
        {
            "group_id": "g",
            "session_timeout_ms": 10_000,
            "rebalance_timeout_ms": rebalance_timeout_ms,
            "member_id": member_id,
            "group_instance_id": None,
            "protocol_type": "consumer",
            "protocols": [{"name": "range", "metadata": member_id.encode() or b"new"}],
        },
    )


def _sync(member_id: str, generation: int, assignments: dict[str, bytes]) -> KafkaRequest:
    return _request(
        14,
        3,
        {
            "group_id": "g",
            "generation_id": generation,
            "member_id": member_id,
            "group_instance_id": None,
            "assignments": [{"member_id": m, "assignment": a} for m, a in assignments.items()],
        },
    )


def _heartbeat(member_id: str, generation: int) -> KafkaRequest:
    return _request(
        12, 3, {"group_id": "g", "generation_id": generation, "member_id": member_id, "group_instance_id": None}
    )


def test_two_members_join_sync_and_a_silent_one_is_removed_at_its_session_timeout() -> None:
    async def main() -> None:
        groups = _groups()
        # The first member alone: a generation of one, it leads.
        first = await groups.join_group(_join())
        assert (first["error_code"], first["generation_id"], first["leader"]) == (0, 1, first["member_id"])
        a = first["member_id"]
        synced = await groups.sync_group(_sync(a, 1, {a: b"all"}))
        assert synced["assignment"] == b"all"
        # A second member joins: the barrier holds it until the first rejoins.
        second_join = asyncio.ensure_future(groups.join_group(_join()))
        await asyncio.sleep(0)
        assert groups._groups["g"].state == PREPARING
        assert (await groups.heartbeat(_heartbeat(a, 1)))["error_code"] == KafkaError.REBALANCE_IN_PROGRESS
        rejoin = await groups.join_group(_join(a))
        second = await second_join
        b = second["member_id"]
        assert rejoin["generation_id"] == second["generation_id"] == 2
        assert rejoin["leader"] == a and len(rejoin["members"]) == 2 and second["members"] == []
        assert groups._groups["g"].state == COMPLETING
        # The follower's SyncGroup waits for the leader's assignment.
        follower = asyncio.ensure_future(groups.sync_group(_sync(b, 2, {})))
        await asyncio.sleep(0)
        leader = await groups.sync_group(_sync(a, 2, {a: b"p0", b: b"p1"}))
        assert (leader["assignment"], (await follower)["assignment"]) == (b"p0", b"p1")
        assert groups._groups["g"].state == STABLE
        # A stale generation is fenced.
        assert (await groups.heartbeat(_heartbeat(b, 1)))["error_code"] == KafkaError.ILLEGAL_GENERATION
        # b stops heartbeating: at its session timeout it is removed and a rebalances alone.
        groups._groups["g"].members[a].last_heartbeat_ms += 60_000
        groups.expire(kafka_groups._now_ms() + 20_000)
        assert set(groups._groups["g"].members) == {a}
        assert (await groups.heartbeat(_heartbeat(a, 2)))["error_code"] == KafkaError.REBALANCE_IN_PROGRESS
        alone = await groups.join_group(_join(a))
        assert (alone["generation_id"], [m["member_id"] for m in alone["members"]]) == (3, [a])
        assert (await groups.heartbeat(_heartbeat(b, 3)))["error_code"] == KafkaError.UNKNOWN_MEMBER_ID

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_member_that_does_not_rejoin_within_the_rebalance_timeout_is_removed() -> None:
    async def main() -> None:
        groups = _groups()
        a = (await groups.join_group(_join(rebalance_timeout_ms=1_000)))["member_id"]
        await groups.sync_group(_sync(a, 1, {a: b"x"}))
        newcomer = asyncio.ensure_future(groups.join_group(_join(rebalance_timeout_ms=1_000)))
        await asyncio.sleep(0)
        groups._groups["g"].members[a].last_heartbeat_ms = kafka_groups._now_ms() + 60_000  # alive, not rejoining
        groups.expire(groups._groups["g"].rebalance_deadline_ms)
        joined = await newcomer
        assert joined["error_code"] == 0 and joined["leader"] == joined["member_id"]
        assert list(groups._groups["g"].members) == [joined["member_id"]]

    asyncio.run(asyncio.wait_for(main(), 10))


def test_leaving_members_empty_the_group_and_an_unknown_member_is_told_so() -> None:
    async def main() -> None:
        groups = _groups()
        a = (await groups.join_group(_join()))["member_id"]
        left = await groups.leave_group(
            _request(
                13,
                3,
                {
                    "group_id": "g",
                    "members": [
                        {"member_id": a, "group_instance_id": None},
                        {"member_id": "x", "group_instance_id": None},
                    ],
                },
            )
        )
        assert [m["error_code"] for m in left["members"]] == [0, KafkaError.UNKNOWN_MEMBER_ID]
        assert "g" not in groups._groups
        described = await groups.describe_groups(
            _request(15, 4, {"groups": ["g"], "include_authorized_operations": False})
        )
        assert described["groups"][0]["group_state"] == "Dead"

    asyncio.run(asyncio.wait_for(main(), 10))
