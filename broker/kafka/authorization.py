"""Permissions on the Kafka listener: what each Kafka request needs, checked with the
same rules as nodi's own protocol (users.Principal.may through Security.allowed, which
counts and logs each refusal with the principal), answered with Kafka's error codes.

    produce          Produce                       TOPIC_AUTHORIZATION_FAILED (29) per topic
    consume topic    Fetch, ListOffsets            29 per topic
                     OffsetCommit, OffsetFetch     29 per topic (after the group check)
    consume group    JoinGroup, SyncGroup, Heartbeat, LeaveGroup, OffsetCommit,
                     OffsetFetch, FindCoordinator, DescribeGroups
                                                   GROUP_AUTHORIZATION_FAILED (30)
    admin topic      CreateTopics, DeleteTopics, DeleteRecords, and a Metadata request's
                     auto-creation                 29 per topic (as Kafka answers them)
    (describe)       Metadata, DescribeConfigs of a topic: any of produce, consume or
                     admin on the topic; Metadata of all topics lists only those, a
                     named one without any gets 29 (as Kafka does); ListGroups lists the
                     groups the principal may consume or admin
    cluster          InitProducerId: a principal with some produce permission; a
                     DescribeConfigs of the broker: a superuser
                                                   CLUSTER_AUTHORIZATION_FAILED (31)

`authorize` takes a decoded request and gives either a whole refusal (the response
body), or None after it took the refused topics or groups out of the request, with a
function that puts their errors into the handler's response. A superuser's requests
pass untouched. A key this table does not know is refused for everyone else (the
listener answers it CLUSTER_AUTHORIZATION_FAILED): a new API names its permission here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..server.users import Action, Principal, Resource
from .apis import APIS
from .errors import KafkaError

if TYPE_CHECKING:
    from ..server.security import Security
    from .connection import KafkaRequest

Body = dict[str, Any]
Merge = Callable[[Body | None], Body | None]

TOPIC_DENIED = int(KafkaError.TOPIC_AUTHORIZATION_FAILED)
GROUP_DENIED = int(KafkaError.GROUP_AUTHORIZATION_FAILED)
CLUSTER_DENIED = int(KafkaError.CLUSTER_AUTHORIZATION_FAILED)
# The keys a principal may always send: ApiVersions and SASL (listener.py serves SASL).
_OPEN_KEYS = frozenset({17, 18, 36})
_BROKER_RESOURCE = 4  # DescribeConfigs' resource_type of a broker (2: a topic)


@dataclass(slots=True)
class Decision:
    refusal: Body | None = None  # the whole response: the request is not served
    merge: Merge | None = None  # puts the refused parts' errors into the response
    unknown_key: bool = False  # a key with no rule here: answered CLUSTER_AUTHORIZATION_FAILED


class _Check:
    """One request's checks for one principal (each refusal counted once)."""

    def __init__(self, security: Security, principal: Principal, request: KafkaRequest) -> None:
        self.security = security
        self.principal = principal
        self.what = APIS[request.api_key].name if request.api_key in APIS else str(request.api_key)
        self._cache: dict[tuple[Action, Resource, str], bool] = {}

    def may(self, action: Action, resource: Resource, name: str) -> bool:
        key = (action, resource, name)
        if key not in self._cache:
            self._cache[key] = self.security.allowed(self.principal, action, resource, name, self.what)
        return self._cache[key]

    def describes_topic(self, name: str) -> bool:
        """Kafka's Describe on a topic: implied by any permission on it (not counted)."""
        principal = self.principal
        return any(principal.may(action, Resource.TOPIC, name) for action in Action)

    def describes_group(self, name: str) -> bool:
        principal = self.principal
        return principal.may(Action.CONSUME, Resource.GROUP, name) or principal.may(Action.ADMIN, Resource.GROUP, name)

    def refuse_describe(self, target: str) -> None:
        self.security.count_not_authorized(self.principal, Action.CONSUME, target, self.what)


def authorize(security: Security, principal: Principal, request: KafkaRequest) -> Decision:
    if principal.superuser or request.api_key in _OPEN_KEYS:
        return Decision()
    rule = _RULES.get(request.api_key)
    if rule is None:
        security.count_not_authorized(principal, Action.ADMIN, "the cluster", f"Kafka API {request.api_key}")
        return Decision(unknown_key=True)
    body = request.body
    assert body is not None
    return rule(_Check(security, principal, request), body, request.api_version)


# -- topics -----------------------------------------------------------------------------


def _split(items: list, name_of: Callable[[Any], Any], permitted: Callable[[Any], bool]) -> tuple[list, list]:
    kept: list = []
    refused: list = []
    for item in items:
        (kept if permitted(name_of(item)) else refused).append(item)
    return kept, refused


def _produce(check: _Check, body: Body, version: int) -> Decision:
    body["topic_data"], refused = _split(
        body["topic_data"], lambda topic: topic["name"], lambda name: check.may(Action.PRODUCE, Resource.TOPIC, name)
    )
    if not refused:
        return Decision()

    def merge(response: Body | None) -> Body | None:
        if response is None:  # acks=0: no response at all
            return None
        for topic in refused:
            entries = [
                {
                    "index": partition["index"],
                    "error_code": TOPIC_DENIED,
                    "base_offset": -1,
                    "log_append_time_ms": -1,
                    "log_start_offset": -1,
                    "record_errors": [],
                    "error_message": f"{check.principal.name} may not produce to {topic['name']}",
                }
                for partition in topic["partition_data"]
            ]
            response["responses"].append({"name": topic["name"], "partition_responses": entries})
        return response

    return Decision(merge=merge)


def _fetch(check: _Check, body: Body, version: int) -> Decision:
    body["topics"], refused = _split(
        body["topics"], lambda topic: topic["topic"], lambda name: check.may(Action.CONSUME, Resource.TOPIC, name)
    )
    if not refused:
        return Decision()

    def merge(response: Body | None) -> Body | None:
        assert response is not None
        for topic in refused:
            entries = [
                {
                    "partition_index": partition["partition"],
                    "error_code": TOPIC_DENIED,
                    "high_watermark": -1,
                    "last_stable_offset": -1,
                    "log_start_offset": -1,
                    "aborted_transactions": None,
                    "preferred_read_replica": -1,
                    "records": None,
                }
                for partition in topic["partitions"]
            ]
            response["responses"].append({"topic": topic["topic"], "partitions": entries})
        return response

    return Decision(merge=merge)


def _list_offsets(check: _Check, body: Body, version: int) -> Decision:
    body["topics"], refused = _split(
        body["topics"], lambda topic: topic["name"], lambda name: check.may(Action.CONSUME, Resource.TOPIC, name)
    )
    if not refused:
        return Decision()

    def merge(response: Body | None) -> Body | None:
        assert response is not None
        for topic in refused:
            entries = [
                {
                    "partition_index": partition["partition_index"],
                    "error_code": TOPIC_DENIED,
                    "timestamp": -1,
                    "offset": -1,
                    "leader_epoch": -1,
                }
                for partition in topic["partitions"]
            ]
            response["topics"].append({"name": topic["name"], "partitions": entries})
        return response

    return Decision(merge=merge)


def _metadata(check: _Check, body: Body, version: int) -> Decision:
    wanted = body["topics"]
    if wanted is None or (version == 0 and not wanted):  # every topic: only those it may see

        def listed(response: Body | None) -> Body | None:
            assert response is not None
            response["topics"] = [topic for topic in response["topics"] if check.describes_topic(topic["name"])]
            return response

        return Decision(merge=listed)
    body["topics"], refused = _split(wanted, lambda topic: topic["name"], check.describes_topic)
    # Auto-creation is an admin act: without admin on every named topic nothing is created.
    if any(not check.principal.may(Action.ADMIN, Resource.TOPIC, topic["name"]) for topic in body["topics"]):
        body["allow_auto_topic_creation"] = False
    for topic in refused:
        check.refuse_describe(f"topic {topic['name']}")
    if not refused:
        return Decision()

    def merge(response: Body | None) -> Body | None:
        assert response is not None
        for topic in refused:
            response["topics"].append(
                {
                    "error_code": TOPIC_DENIED,
                    "name": topic["name"],
                    "is_internal": False,
                    "partitions": [],
                    "topic_authorized_operations": -2147483648,
                }
            )
        return response

    return Decision(merge=merge)


def _create_topics(check: _Check, body: Body, version: int) -> Decision:
    body["topics"], refused = _split(
        body["topics"], lambda topic: topic["name"], lambda name: check.may(Action.ADMIN, Resource.TOPIC, name)
    )
    return _topic_errors(refused, lambda topic: topic["name"], "topics", check, "create")


def _delete_topics(check: _Check, body: Body, version: int) -> Decision:
    body["topic_names"], refused = _split(
        body["topic_names"], lambda name: name, lambda name: check.may(Action.ADMIN, Resource.TOPIC, name)
    )
    return _topic_errors(refused, lambda name: name, "responses", check, "delete")


def _topic_errors(refused: list, name_of: Callable[[Any], str], key: str, check: _Check, verb: str) -> Decision:
    if not refused:
        return Decision()

    def merge(response: Body | None) -> Body | None:
        assert response is not None
        for item in refused:
            name = name_of(item)
            response[key].append(
                {
                    "name": name,
                    "error_code": TOPIC_DENIED,
                    "error_message": f"{check.principal.name} may not {verb} topic {name}",
                }
            )
        return response

    return Decision(merge=merge)


def _delete_records(check: _Check, body: Body, version: int) -> Decision:
    body["topics"], refused = _split(
        body["topics"], lambda topic: topic["name"], lambda name: check.may(Action.ADMIN, Resource.TOPIC, name)
    )
    if not refused:
        return Decision()

    def merge(response: Body | None) -> Body | None:
        assert response is not None
        for topic in refused:
            entries = [
                {"partition_index": partition["partition_index"], "low_watermark": -1, "error_code": TOPIC_DENIED}
                for partition in topic["partitions"]
            ]
            response["topics"].append({"name": topic["name"], "partitions": entries})
        return response

    return Decision(merge=merge)


def _describe_configs(check: _Check, body: Body, version: int) -> Decision:
    def permitted(resource: Body) -> bool:
        if resource["resource_type"] == _BROKER_RESOURCE:
            check.security.count_not_authorized(check.principal, Action.ADMIN, "the broker's configs", check.what)
            return False  # a superuser's request never gets here
        if check.describes_topic(resource["resource_name"]):
            return True
        check.refuse_describe(f"topic {resource['resource_name']}")
        return False

    body["resources"], refused = _split(body["resources"], lambda resource: resource, permitted)
    if not refused:
        return Decision()

    def merge(response: Body | None) -> Body | None:
        assert response is not None
        for resource in refused:
            broker = resource["resource_type"] == _BROKER_RESOURCE
            response["results"].append(
                {
                    "error_code": CLUSTER_DENIED if broker else TOPIC_DENIED,
                    "error_message": f"{check.principal.name} may not describe {resource['resource_name']}",
                    "resource_type": resource["resource_type"],
                    "resource_name": resource["resource_name"],
                    "configs": [],
                }
            )
        return response

    return Decision(merge=merge)


def _init_producer_id(check: _Check, body: Body, version: int) -> Decision:
    # Kafka (KIP-679) lets a principal that may write some topic be an idempotent producer.
    rule = check.principal.rules.get((Action.PRODUCE, Resource.TOPIC))
    if body["transactional_id"] is not None or (rule is not None and rule.allow):
        return Decision()
    check.security.count_not_authorized(check.principal, Action.PRODUCE, "any topic (idempotent producer)", check.what)
    return Decision(
        refusal={"throttle_time_ms": 0, "error_code": CLUSTER_DENIED, "producer_id": -1, "producer_epoch": -1}
    )


# -- groups -----------------------------------------------------------------------------


def _group_refusal() -> Body:
    """Every group API's response fields, the error 30 in each place a version reads."""
    return {
        "throttle_time_ms": 0,
        "error_code": GROUP_DENIED,
        "generation_id": -1,
        "protocol_name": "",
        "leader": "",
        "member_id": "",
        "members": [],
        "assignment": b"",
    }


def _group(check: _Check, body: Body, version: int) -> Decision:
    if check.may(Action.CONSUME, Resource.GROUP, body["group_id"]):
        return Decision()
    return Decision(refusal=_group_refusal())


def _find_coordinator(check: _Check, body: Body, version: int) -> Decision:
    if body.get("key_type", 0) != 0 or check.may(Action.CONSUME, Resource.GROUP, body["key"]):
        return Decision()  # a transaction's coordinator: the handler answers it
    return Decision(
        refusal={
            "throttle_time_ms": 0,
            "error_code": GROUP_DENIED,
            "error_message": f"{check.principal.name} may not consume in group {body['key']}",
            "node_id": -1,
            "host": "",
            "port": -1,
        }
    )


def _offset_commit(check: _Check, body: Body, version: int) -> Decision:
    if not check.may(Action.CONSUME, Resource.GROUP, body["group_id"]):
        return Decision(refusal=_partition_errors(body["topics"], "partitions", GROUP_DENIED, commit=True))
    body["topics"], refused = _split(
        body["topics"], lambda topic: topic["name"], lambda name: check.may(Action.CONSUME, Resource.TOPIC, name)
    )
    if not refused:
        return Decision()

    def merge(response: Body | None) -> Body | None:
        assert response is not None
        response["topics"] += _partition_errors(refused, "partitions", TOPIC_DENIED, commit=True)["topics"]
        return response

    return Decision(merge=merge)


def _offset_fetch(check: _Check, body: Body, version: int) -> Decision:
    wanted = body["topics"]
    if not check.may(Action.CONSUME, Resource.GROUP, body["group_id"]):
        refusal = _partition_errors(wanted or [], "partition_indexes", GROUP_DENIED, commit=False)
        refusal["error_code"] = GROUP_DENIED
        return Decision(refusal=refusal)
    if wanted is None:  # every committed topic: only those it may consume

        def listed(response: Body | None) -> Body | None:
            assert response is not None
            principal = check.principal
            response["topics"] = [
                topic for topic in response["topics"] if principal.may(Action.CONSUME, Resource.TOPIC, topic["name"])
            ]
            return response

        return Decision(merge=listed)
    body["topics"], refused = _split(
        wanted, lambda topic: topic["name"], lambda name: check.may(Action.CONSUME, Resource.TOPIC, name)
    )
    if not refused:
        return Decision()

    def merge(response: Body | None) -> Body | None:
        assert response is not None
        response["topics"] += _partition_errors(refused, "partition_indexes", TOPIC_DENIED, commit=False)["topics"]
        return response

    return Decision(merge=merge)


def _partition_errors(topics: list, partitions_key: str, error: int, *, commit: bool) -> Body:
    """An OffsetCommit (commit) or OffsetFetch response with `error` for every partition."""

    def entry(partition: Any) -> Body:
        if commit:
            return {"partition_index": partition["partition_index"], "error_code": error}
        return {
            "partition_index": partition,
            "committed_offset": -1,
            "committed_leader_epoch": -1,
            "metadata": None,
            "error_code": error,
        }

    return {
        "throttle_time_ms": 0,
        "error_code": 0,
        "topics": [
            {"name": topic["name"], "partitions": [entry(partition) for partition in topic[partitions_key]]}
            for topic in topics
        ],
    }


def _describe_groups(check: _Check, body: Body, version: int) -> Decision:
    body["groups"], refused = _split(
        body["groups"], lambda name: name, lambda name: check.may(Action.CONSUME, Resource.GROUP, name)
    )
    if not refused:
        return Decision()

    def merge(response: Body | None) -> Body | None:
        assert response is not None
        for name in refused:
            response["groups"].append(
                {
                    "error_code": GROUP_DENIED,
                    "group_id": name,
                    "group_state": "",
                    "protocol_type": "",
                    "protocol_data": "",
                    "members": [],
                    "authorized_operations": -2147483648,
                }
            )
        return response

    return Decision(merge=merge)


def _list_groups(check: _Check, body: Body, version: int) -> Decision:
    def listed(response: Body | None) -> Body | None:
        assert response is not None
        response["groups"] = [group for group in response["groups"] if check.describes_group(group["group_id"])]
        return response

    return Decision(merge=listed)


_RULES: dict[int, Callable[[_Check, Body, int], Decision]] = {
    0: _produce,
    1: _fetch,
    2: _list_offsets,
    3: _metadata,
    8: _offset_commit,
    9: _offset_fetch,
    10: _find_coordinator,
    11: _group,  # JoinGroup
    12: _group,  # Heartbeat
    13: _group,  # LeaveGroup
    14: _group,  # SyncGroup
    15: _describe_groups,
    16: _list_groups,
    19: _create_topics,
    20: _delete_topics,
    21: _delete_records,  # DeleteRecords: Kafka's Delete on the topic, nodi's admin
    22: _init_producer_id,
    32: _describe_configs,
}
