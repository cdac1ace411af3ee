"""The Kafka APIs nodi's listener serves: key, advertised version range, request and
response schema (schema.py explains the notation).

The ranges are the non-flexible versions that confluent-kafka/librdkafka, kafka-python,
aiokafka and kcat use (issue 13). Produce is advertised from v0 because librdkafka turns
compression off when v0 is not advertised, but only v3+ (RecordBatch v2, the format nodi
stores) is accepted: an older produce is answered UNSUPPORTED_VERSION.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import ALL, Schema, array, nullable_array


@dataclass(frozen=True, slots=True)
class Api:
    key: int
    name: str
    min_version: int  # advertised
    max_version: int
    request: Schema
    response: Schema
    min_accepted_version: int = -1  # -1: min_version

    @property
    def accepted_from(self) -> int:
        return self.min_version if self.min_accepted_version < 0 else self.min_accepted_version


PRODUCE = Api(
    0,
    "Produce",
    0,
    8,
    request=(
        ("transactional_id", "nullable_string", 3, ALL),
        ("acks", "int16", 0, ALL),
        ("timeout_ms", "int32", 0, ALL),
        (
            "topic_data",
            array(
                (
                    ("name", "string", 0, ALL),
                    ("partition_data", array((("index", "int32", 0, ALL), ("records", "records", 0, ALL))), 0, ALL),
                )
            ),
            0,
            ALL,
        ),
    ),
    response=(
        (
            "responses",
            array(
                (
                    ("name", "string", 0, ALL),
                    (
                        "partition_responses",
                        array(
                            (
                                ("index", "int32", 0, ALL),
                                ("error_code", "int16", 0, ALL),
                                ("base_offset", "int64", 0, ALL),
                                ("log_append_time_ms", "int64", 2, ALL),
                                ("log_start_offset", "int64", 5, ALL),
                                (
                                    "record_errors",
                                    array(
                                        (
                                            ("batch_index", "int32", 8, ALL),
                                            ("batch_index_error_message", "nullable_string", 8, ALL),
                                        )
                                    ),
                                    8,
                                    ALL,
                                ),
                                ("error_message", "nullable_string", 8, ALL),
                            )
                        ),
                        0,
                        ALL,
                    ),
                )
            ),
            0,
            ALL,
        ),
        ("throttle_time_ms", "int32", 1, ALL),
    ),
    min_accepted_version=3,
)

FETCH = Api(
    1,
    "Fetch",
    4,
    11,
    request=(
        ("replica_id", "int32", 0, ALL),
        ("max_wait_ms", "int32", 0, ALL),
        ("min_bytes", "int32", 0, ALL),
        ("max_bytes", "int32", 3, ALL),
        ("isolation_level", "int8", 4, ALL),
        ("session_id", "int32", 7, ALL),
        ("session_epoch", "int32", 7, ALL),
        (
            "topics",
            array(
                (
                    ("topic", "string", 0, ALL),
                    (
                        "partitions",
                        array(
                            (
                                ("partition", "int32", 0, ALL),
                                ("current_leader_epoch", "int32", 9, ALL),
                                ("fetch_offset", "int64", 0, ALL),
                                ("log_start_offset", "int64", 5, ALL),
                                ("partition_max_bytes", "int32", 0, ALL),
                            )
                        ),
                        0,
                        ALL,
                    ),
                )
            ),
            0,
            ALL,
        ),
        (
            "forgotten_topics_data",
            array((("topic", "string", 7, ALL), ("partitions", array("int32"), 7, ALL))),
            7,
            ALL,
        ),
        ("rack_id", "string", 11, ALL),
    ),
    response=(
        ("throttle_time_ms", "int32", 1, ALL),
        ("error_code", "int16", 7, ALL),
        ("session_id", "int32", 7, ALL),
        (
            "responses",
            array(
                (
                    ("topic", "string", 0, ALL),
                    (
                        "partitions",
                        array(
                            (
                                ("partition_index", "int32", 0, ALL),
                                ("error_code", "int16", 0, ALL),
                                ("high_watermark", "int64", 0, ALL),
                                ("last_stable_offset", "int64", 4, ALL),
                                ("log_start_offset", "int64", 5, ALL),
                                (
                                    "aborted_transactions",
                                    nullable_array(
                                        (("producer_id", "int64", 4, ALL), ("first_offset", "int64", 4, ALL))
                                    ),
                                    4,
                                    ALL,
                                ),
                                ("preferred_read_replica", "int32", 11, ALL),
                                ("records", "records", 0, ALL),
                            )
                        ),
                        0,
                        ALL,
                    ),
                )
            ),
            0,
            ALL,
        ),
    ),
)

LIST_OFFSETS = Api(
    2,
    "ListOffsets",
    1,
    5,
    request=(
        ("replica_id", "int32", 0, ALL),
        ("isolation_level", "int8", 2, ALL),
        (
            "topics",
            array(
                (
                    ("name", "string", 0, ALL),
                    (
                        "partitions",
                        array(
                            (
                                ("partition_index", "int32", 0, ALL),
                                ("current_leader_epoch", "int32", 4, ALL),
                                ("timestamp", "int64", 0, ALL),
                            )
                        ),
                        0,
                        ALL,
                    ),
                )
            ),
            0,
            ALL,
        ),
    ),
    response=(
        ("throttle_time_ms", "int32", 2, ALL),
        (
            "topics",
            array(
                (
                    ("name", "string", 0, ALL),
                    (
                        "partitions",
                        array(
                            (
                                ("partition_index", "int32", 0, ALL),
                                ("error_code", "int16", 0, ALL),
                                ("timestamp", "int64", 1, ALL),
                                ("offset", "int64", 1, ALL),
                                ("leader_epoch", "int32", 4, ALL),
                            )
                        ),
                        0,
                        ALL,
                    ),
                )
            ),
            0,
            ALL,
        ),
    ),
)

METADATA = Api(
    3,
    "Metadata",
    0,
    8,
    request=(
        ("topics", array((("name", "string", 0, ALL),)), 0, 0),
        ("topics", nullable_array((("name", "string", 1, ALL),)), 1, ALL),
        ("allow_auto_topic_creation", "bool", 4, ALL),
        ("include_cluster_authorized_operations", "bool", 8, ALL),
        ("include_topic_authorized_operations", "bool", 8, ALL),
    ),
    response=(
        ("throttle_time_ms", "int32", 3, ALL),
        (
            "brokers",
            array(
                (
                    ("node_id", "int32", 0, ALL),
                    ("host", "string", 0, ALL),
                    ("port", "int32", 0, ALL),
                    ("rack", "nullable_string", 1, ALL),
                )
            ),
            0,
            ALL,
        ),
        ("cluster_id", "nullable_string", 2, ALL),
        ("controller_id", "int32", 1, ALL),
        (
            "topics",
            array(
                (
                    ("error_code", "int16", 0, ALL),
                    ("name", "string", 0, ALL),
                    ("is_internal", "bool", 1, ALL),
                    (
                        "partitions",
                        array(
                            (
                                ("error_code", "int16", 0, ALL),
                                ("partition_index", "int32", 0, ALL),
                                ("leader_id", "int32", 0, ALL),
                                ("leader_epoch", "int32", 7, ALL),
                                ("replica_nodes", array("int32"), 0, ALL),
                                ("isr_nodes", array("int32"), 0, ALL),
                                ("offline_replicas", array("int32"), 5, ALL),
                            )
                        ),
                        0,
                        ALL,
                    ),
                    ("topic_authorized_operations", "int32", 8, ALL),
                )
            ),
            0,
            ALL,
        ),
        ("cluster_authorized_operations", "int32", 8, ALL),
    ),
)

OFFSET_COMMIT = Api(
    8,
    "OffsetCommit",
    2,
    7,
    request=(
        ("group_id", "string", 0, ALL),
        ("generation_id", "int32", 1, ALL),
        ("member_id", "string", 1, ALL),
        ("group_instance_id", "nullable_string", 7, ALL),
        ("retention_time_ms", "int64", 2, 4),
        (
            "topics",
            array(
                (
                    ("name", "string", 0, ALL),
                    (
                        "partitions",
                        array(
                            (
                                ("partition_index", "int32", 0, ALL),
                                ("committed_offset", "int64", 0, ALL),
                                ("committed_leader_epoch", "int32", 6, ALL),
                                ("committed_metadata", "nullable_string", 0, ALL),
                            )
                        ),
                        0,
                        ALL,
                    ),
                )
            ),
            0,
            ALL,
        ),
    ),
    response=(
        ("throttle_time_ms", "int32", 3, ALL),
        (
            "topics",
            array(
                (
                    ("name", "string", 0, ALL),
                    (
                        "partitions",
                        array((("partition_index", "int32", 0, ALL), ("error_code", "int16", 0, ALL))),
                        0,
                        ALL,
                    ),
                )
            ),
            0,
            ALL,
        ),
    ),
)

OFFSET_FETCH = Api(
    9,
    "OffsetFetch",
    1,
    5,
    request=(
        ("group_id", "string", 0, ALL),
        ("topics", array((("name", "string", 0, ALL), ("partition_indexes", array("int32"), 0, ALL))), 0, 1),
        ("topics", nullable_array((("name", "string", 0, ALL), ("partition_indexes", array("int32"), 0, ALL))), 2, ALL),
    ),
    response=(
        ("throttle_time_ms", "int32", 3, ALL),
        (
            "topics",
            array(
                (
                    ("name", "string", 0, ALL),
                    (
                        "partitions",
                        array(
                            (
                                ("partition_index", "int32", 0, ALL),
                                ("committed_offset", "int64", 0, ALL),
                                ("committed_leader_epoch", "int32", 5, ALL),
                                ("metadata", "nullable_string", 0, ALL),
                                ("error_code", "int16", 0, ALL),
                            )
                        ),
                        0,
                        ALL,
                    ),
                )
            ),
            0,
            ALL,
        ),
        ("error_code", "int16", 2, ALL),
    ),
)

FIND_COORDINATOR = Api(
    10,
    "FindCoordinator",
    0,
    2,
    request=(("key", "string", 0, ALL), ("key_type", "int8", 1, ALL)),
    response=(
        ("throttle_time_ms", "int32", 1, ALL),
        ("error_code", "int16", 0, ALL),
        ("error_message", "nullable_string", 1, ALL),
        ("node_id", "int32", 0, ALL),
        ("host", "string", 0, ALL),
        ("port", "int32", 0, ALL),
    ),
)

JOIN_GROUP = Api(
    11,
    "JoinGroup",
    0,
    5,
    request=(
        ("group_id", "string", 0, ALL),
        ("session_timeout_ms", "int32", 0, ALL),
        ("rebalance_timeout_ms", "int32", 1, ALL),
        ("member_id", "string", 0, ALL),
        ("group_instance_id", "nullable_string", 5, ALL),
        ("protocol_type", "string", 0, ALL),
        ("protocols", array((("name", "string", 0, ALL), ("metadata", "bytes", 0, ALL))), 0, ALL),
    ),
    response=(
        ("throttle_time_ms", "int32", 2, ALL),
        ("error_code", "int16", 0, ALL),
        ("generation_id", "int32", 0, ALL),
        ("protocol_name", "string", 0, ALL),
        ("leader", "string", 0, ALL),
        ("member_id", "string", 0, ALL),
        (
            "members",
            array(
                (
                    ("member_id", "string", 0, ALL),
                    ("group_instance_id", "nullable_string", 5, ALL),
                    ("metadata", "bytes", 0, ALL),
                )
            ),
            0,
            ALL,
        ),
    ),
)

HEARTBEAT = Api(
    12,
    "Heartbeat",
    0,
    3,
    request=(
        ("group_id", "string", 0, ALL),
        ("generation_id", "int32", 0, ALL),
        ("member_id", "string", 0, ALL),
        ("group_instance_id", "nullable_string", 3, ALL),
    ),
    response=(("throttle_time_ms", "int32", 1, ALL), ("error_code", "int16", 0, ALL)),
)

LEAVE_GROUP = Api(
    13,
    "LeaveGroup",
    0,
    3,
    request=(
        ("group_id", "string", 0, ALL),
        ("member_id", "string", 0, 2),
        (
            "members",
            array((("member_id", "string", 3, ALL), ("group_instance_id", "nullable_string", 3, ALL))),
            3,
            ALL,
        ),
    ),
    response=(
        ("throttle_time_ms", "int32", 1, ALL),
        ("error_code", "int16", 0, ALL),
        (
            "members",
            array(
                (
                    ("member_id", "string", 3, ALL),
                    ("group_instance_id", "nullable_string", 3, ALL),
                    ("error_code", "int16", 3, ALL),
                )
            ),
            3,
            ALL,
        ),
    ),
)

SYNC_GROUP = Api(
    14,
    "SyncGroup",
    0,
    3,
    request=(
        ("group_id", "string", 0, ALL),
        ("generation_id", "int32", 0, ALL),
        ("member_id", "string", 0, ALL),
        ("group_instance_id", "nullable_string", 3, ALL),
        ("assignments", array((("member_id", "string", 0, ALL), ("assignment", "bytes", 0, ALL))), 0, ALL),
    ),
    response=(
        ("throttle_time_ms", "int32", 1, ALL),
        ("error_code", "int16", 0, ALL),
        ("assignment", "bytes", 0, ALL),
    ),
)

DESCRIBE_GROUPS = Api(
    15,
    "DescribeGroups",
    0,
    4,
    request=(("groups", array("string"), 0, ALL), ("include_authorized_operations", "bool", 3, ALL)),
    response=(
        ("throttle_time_ms", "int32", 1, ALL),
        (
            "groups",
            array(
                (
                    ("error_code", "int16", 0, ALL),
                    ("group_id", "string", 0, ALL),
                    ("group_state", "string", 0, ALL),
                    ("protocol_type", "string", 0, ALL),
                    ("protocol_data", "string", 0, ALL),
                    (
                        "members",
                        array(
                            (
                                ("member_id", "string", 0, ALL),
                                ("group_instance_id", "nullable_string", 4, ALL),
                                ("client_id", "string", 0, ALL),
                                ("client_host", "string", 0, ALL),
                                ("member_metadata", "bytes", 0, ALL),
                                ("member_assignment", "bytes", 0, ALL),
                            )
                        ),
                        0,
                        ALL,
                    ),
                    ("authorized_operations", "int32", 3, ALL),
                )
            ),
            0,
            ALL,
        ),
    ),
)

LIST_GROUPS = Api(
    16,
    "ListGroups",
    0,
    2,
    request=(),
    response=(
        ("throttle_time_ms", "int32", 1, ALL),
        ("error_code", "int16", 0, ALL),
        ("groups", array((("group_id", "string", 0, ALL), ("protocol_type", "string", 0, ALL))), 0, ALL),
    ),
)

API_VERSIONS = Api(
    18,
    "ApiVersions",
    0,
    2,
    request=(),
    response=(
        ("error_code", "int16", 0, ALL),
        (
            "api_keys",
            array((("api_key", "int16", 0, ALL), ("min_version", "int16", 0, ALL), ("max_version", "int16", 0, ALL))),
            0,
            ALL,
        ),
        ("throttle_time_ms", "int32", 1, ALL),
    ),
)

# SASL (broker/kafka/sasl.py): served by the listener itself, before any other request
# when the broker has users. After a v0 handshake the tokens come as raw size-prefixed
# frames (no Kafka header); after v1, inside SaslAuthenticate requests (KIP-152).
SASL_HANDSHAKE = Api(
    17,
    "SaslHandshake",
    0,
    1,
    request=(("mechanism", "string", 0, ALL),),
    response=(("error_code", "int16", 0, ALL), ("mechanisms", array("string"), 0, ALL)),
)

SASL_AUTHENTICATE = Api(
    36,
    "SaslAuthenticate",
    0,
    1,
    request=(("auth_bytes", "bytes", 0, ALL),),
    response=(
        ("error_code", "int16", 0, ALL),
        ("error_message", "nullable_string", 0, ALL),
        ("auth_bytes", "bytes", 0, ALL),
        ("session_lifetime_ms", "int64", 1, ALL),
    ),
)

CREATE_TOPICS = Api(
    19,
    "CreateTopics",
    2,
    4,
    request=(
        (
            "topics",
            array(
                (
                    ("name", "string", 0, ALL),
                    ("num_partitions", "int32", 0, ALL),
                    ("replication_factor", "int16", 0, ALL),
                    (
                        "assignments",
                        array((("partition_index", "int32", 0, ALL), ("broker_ids", array("int32"), 0, ALL))),
                        0,
                        ALL,
                    ),
                    ("configs", array((("name", "string", 0, ALL), ("value", "nullable_string", 0, ALL))), 0, ALL),
                )
            ),
            0,
            ALL,
        ),
        ("timeout_ms", "int32", 0, ALL),
        ("validate_only", "bool", 1, ALL),
    ),
    response=(
        ("throttle_time_ms", "int32", 2, ALL),
        (
            "topics",
            array(
                (
                    ("name", "string", 0, ALL),
                    ("error_code", "int16", 0, ALL),
                    ("error_message", "nullable_string", 1, ALL),
                )
            ),
            0,
            ALL,
        ),
    ),
)

DELETE_TOPICS = Api(
    20,
    "DeleteTopics",
    1,
    3,
    request=(("topic_names", array("string"), 0, ALL), ("timeout_ms", "int32", 0, ALL)),
    response=(
        ("throttle_time_ms", "int32", 1, ALL),
        ("responses", array((("name", "string", 0, ALL), ("error_code", "int16", 0, ALL))), 0, ALL),
    ),
)

DELETE_RECORDS = Api(
    21,
    "DeleteRecords",
    0,
    1,
    request=(
        (
            "topics",
            array(
                (
                    ("name", "string", 0, ALL),
                    ("partitions", array((("partition_index", "int32", 0, ALL), ("offset", "int64", 0, ALL))), 0, ALL),
                )
            ),
            0,
            ALL,
        ),
        ("timeout_ms", "int32", 0, ALL),
    ),
    response=(
        ("throttle_time_ms", "int32", 0, ALL),
        (
            "topics",
            array(
                (
                    ("name", "string", 0, ALL),
                    (
                        "partitions",
                        array(
                            (
                                ("partition_index", "int32", 0, ALL),
                                ("low_watermark", "int64", 0, ALL),
                                ("error_code", "int16", 0, ALL),
                            )
                        ),
                        0,
                        ALL,
                    ),
                )
            ),
            0,
            ALL,
        ),
    ),
)

INIT_PRODUCER_ID = Api(
    22,
    "InitProducerId",
    0,
    1,
    request=(("transactional_id", "nullable_string", 0, ALL), ("transaction_timeout_ms", "int32", 0, ALL)),
    response=(
        ("throttle_time_ms", "int32", 0, ALL),
        ("error_code", "int16", 0, ALL),
        ("producer_id", "int64", 0, ALL),
        ("producer_epoch", "int16", 0, ALL),
    ),
)

DESCRIBE_CONFIGS = Api(
    32,
    "DescribeConfigs",
    1,
    3,
    request=(
        (
            "resources",
            array(
                (
                    ("resource_type", "int8", 0, ALL),
                    ("resource_name", "string", 0, ALL),
                    ("configuration_keys", nullable_array("string"), 0, ALL),
                )
            ),
            0,
            ALL,
        ),
        ("include_synonyms", "bool", 1, ALL),
        ("include_documentation", "bool", 3, ALL),
    ),
    response=(
        ("throttle_time_ms", "int32", 0, ALL),
        (
            "results",
            array(
                (
                    ("error_code", "int16", 0, ALL),
                    ("error_message", "nullable_string", 0, ALL),
                    ("resource_type", "int8", 0, ALL),
                    ("resource_name", "string", 0, ALL),
                    (
                        "configs",
                        array(
                            (
                                ("name", "string", 0, ALL),
                                ("value", "nullable_string", 0, ALL),
                                ("read_only", "bool", 0, ALL),
                                ("config_source", "int8", 1, ALL),
                                ("is_sensitive", "bool", 0, ALL),
                                (
                                    "synonyms",
                                    array(
                                        (
                                            ("name", "string", 1, ALL),
                                            ("value", "nullable_string", 1, ALL),
                                            ("source", "int8", 1, ALL),
                                        )
                                    ),
                                    1,
                                    ALL,
                                ),
                                ("config_type", "int8", 3, ALL),
                                ("documentation", "nullable_string", 3, ALL),
                            )
                        ),
                        0,
                        ALL,
                    ),
                )
            ),
            0,
            ALL,
        ),
    ),
)

APIS: dict[int, Api] = {
    api.key: api
    for api in (
        PRODUCE,
        FETCH,
        LIST_OFFSETS,
        METADATA,
        OFFSET_COMMIT,
        OFFSET_FETCH,
        FIND_COORDINATOR,
        JOIN_GROUP,
        HEARTBEAT,
        LEAVE_GROUP,
        SYNC_GROUP,
        DESCRIBE_GROUPS,
        LIST_GROUPS,
        SASL_HANDSHAKE,
        API_VERSIONS,
        CREATE_TOPICS,
        DELETE_TOPICS,
        DELETE_RECORDS,
        INIT_PRODUCER_ID,
        DESCRIBE_CONFIGS,
        SASL_AUTHENTICATE,
    )
}
