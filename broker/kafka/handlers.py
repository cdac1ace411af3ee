"""What the Kafka listener does for each request: Kafka's request in, the same broker
services nodi's own protocol uses (broker/server/service.py's Broker.handle with nodi's
messages), Kafka's response out.

One broker, node 0, leader of every partition, at the advertised address. Produce
appends the batches as they came (the log checks them and patches the base offset);
acks 0/1/-1 map onto nodi's none/written/durable, so acks=-1 is answered after the fsync
the topic's fsync policy requires. Fetch sends the stored batch bytes as they are.
Idempotent producers: the log keeps Kafka's sequence rules (storage/producer_state.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nodi.storage.errors import NodiError
from nodi.storage.log import FileSlice
from nodi.storage.records import decode_batches
from nodi.storage.topic_settings import TIMESTAMP_TYPE_LOG_APPEND, TOPIC_SETTINGS, TOPIC_SETTINGS_BY_NAME

from ..protocol import messages as m
from ..protocol.errors import ErrorCode
from ..server.reply import Reply, response_of
from .apis import APIS, SASL_AUTHENTICATE, SASL_HANDSHAKE
from .connection import KafkaRequest, api_versions_body
from .errors import KafkaError, kafka_error
from .groups import KafkaGroups

if TYPE_CHECKING:
    from ..server.service import Broker
    from .settings import KafkaSettings

log = logging.getLogger("nodi.kafka")

NODE_ID = 0
# Kafka's "no timestamp" / "no offset" in ListOffsets.
UNKNOWN = -1
LATEST_TIMESTAMP = -1
EARLIEST_TIMESTAMP = -2


class KafkaHandlers:
    """Serves decoded Kafka requests against one Broker; `handle` returns the response
    body (None for a produce with acks=0, which Kafka answers with nothing)."""

    def __init__(
        self,
        broker: Broker,
        settings: KafkaSettings,
        advertised: tuple[str, int],
        observe: Callable[[m.Request, Reply, float], None] | None = None,
    ) -> None:
        self.broker = broker
        # The server's metrics hook (Server.observe): Kafka produces and fetches count in
        # the same request, byte and latency metrics as nodi's own.
        self._observe = observe
        self.settings = settings
        self.advertised_host, self.advertised_port = advertised
        self.groups = KafkaGroups(broker, settings)
        self._handlers: dict[int, Callable[[KafkaRequest], Awaitable[dict[str, Any] | None]]] = {
            0: self._produce,
            1: self._fetch,
            2: self._list_offsets,
            3: self._metadata,
            8: self.groups.offset_commit,
            9: self.groups.offset_fetch,
            10: self._find_coordinator,
            11: self.groups.join_group,
            12: self.groups.heartbeat,
            13: self.groups.leave_group,
            14: self.groups.sync_group,
            15: self.groups.describe_groups,
            16: self.groups.list_groups,
            18: self._api_versions,
            19: self._create_topics,
            20: self._delete_topics,
            21: self._delete_records,
            22: self._init_producer_id,
            32: self._describe_configs,
        }
        # SaslHandshake and SaslAuthenticate belong to the connection (listener.py, sasl.py).
        assert set(self._handlers) | {SASL_HANDSHAKE.key, SASL_AUTHENTICATE.key} == set(APIS), "every API has a handler"

    async def handle(self, request: KafkaRequest) -> dict[str, Any] | None:
        return await self._handlers[request.api_key](request)

    async def _call(self, request: m.Request) -> Reply:
        return await self.broker.handle(request, "kafka")

    async def _observed_call(self, request: m.Request) -> Reply:
        started = time.perf_counter()
        reply = await self.broker.handle(request, "kafka")
        if self._observe is not None:
            self._observe(request, reply, time.perf_counter() - started)
        return reply

    # -- ApiVersions, Metadata, FindCoordinator --------------------------------------------

    async def _api_versions(self, request: KafkaRequest) -> dict[str, Any]:
        return api_versions_body()

    def _broker_entry(self) -> dict[str, Any]:
        return {"node_id": NODE_ID, "host": self.advertised_host, "port": self.advertised_port, "rack": None}

    async def _metadata(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        topics = self.broker.store.topics()
        wanted = body["topics"]
        if wanted is None or (request.api_version == 0 and not wanted):
            names = sorted(topics)
        else:
            names = [entry["name"] for entry in wanted]
        allow_create = body.get("allow_auto_topic_creation", True) and self.settings.auto_create_topics
        entries = []
        for name in names:
            config = topics.get(name)
            if config is None and allow_create:
                error = await self._auto_create(name)
                config = self.broker.store.topic_config(name)
                if config is None:
                    entries.append(_topic_error(name, error))
                    continue
            if config is None:
                entries.append(_topic_error(name, KafkaError.UNKNOWN_TOPIC_OR_PARTITION))
                continue
            entries.append(
                {
                    "error_code": 0,
                    "name": name,
                    "is_internal": False,
                    "partitions": [
                        {
                            "error_code": 0,
                            "partition_index": index,
                            "leader_id": NODE_ID,
                            "leader_epoch": 0,
                            "replica_nodes": [NODE_ID],
                            "isr_nodes": [NODE_ID],
                            "offline_replicas": [],
                        }
                        for index in range(config.partitions)
                    ],
                    "topic_authorized_operations": -2147483648,
                }
            )
        return {
            "throttle_time_ms": 0,
            "brokers": [self._broker_entry()],
            "cluster_id": self.broker.server_id,
            "controller_id": NODE_ID,
            "topics": entries,
            "cluster_authorized_operations": -2147483648,
        }

    async def _auto_create(self, name: str) -> KafkaError:
        settings = m.TopicSettings(partitions=self.settings.auto_create_partitions)
        reply = await self._call(m.CreateTopicRequest(name=name, settings=settings))
        code = reply.response.error_code
        if code not in (ErrorCode.NONE, ErrorCode.TOPIC_EXISTS):
            log.info("kafka: auto-creating topic %r failed: %s", name, reply.response.error_message)
            return KafkaError.INVALID_TOPIC_EXCEPTION if code == ErrorCode.INVALID_REQUEST else kafka_error(code)
        return KafkaError.NONE

    async def _find_coordinator(self, request: KafkaRequest) -> dict[str, Any]:
        return {"error_code": 0, "error_message": None, "throttle_time_ms": 0, **self._broker_entry()}

    # -- produce -------------------------------------------------------------------------

    async def _produce(self, request: KafkaRequest) -> dict[str, Any] | None:
        body = request.body
        assert body is not None
        acks = body["acks"]
        if body["transactional_id"] is not None:
            error = KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED  # no transactions here
            return _produce_errors(body, error, "nodi serves no transactions")
        nodi_acks = {0: m.Acks.NONE, 1: m.Acks.WRITTEN}.get(acks, m.Acks.DURABLE)
        timeout_ms = max(body["timeout_ms"], 1)
        # One task per partition, created in request order: each appends before its first
        # await, so the batches go into the logs in the order they came, and every
        # partition's fsync wait (acks=-1) runs at once.
        tasks: list[tuple[str, int, asyncio.Task[Reply] | None]] = []
        for topic in body["topic_data"]:
            for partition in topic["partition_data"]:
                records = partition["records"]
                if records is None:
                    tasks.append((topic["name"], partition["index"], None))
                    continue
                produce = m.ProduceRequest(
                    topic=topic["name"],
                    partition=partition["index"],
                    acks=nodi_acks if nodi_acks is not m.Acks.NONE else m.Acks.WRITTEN,
                    timeout_ms=timeout_ms,
                    records=records,
                )
                tasks.append((topic["name"], partition["index"], asyncio.ensure_future(self._observed_call(produce))))
        responses: dict[str, list[dict[str, Any]]] = {}
        for name, index, task in tasks:
            entry: dict[str, Any] = {
                "index": index,
                "base_offset": -1,
                "log_append_time_ms": -1,
                "log_start_offset": -1,
                "record_errors": [],
                "error_message": None,
            }
            if task is None:
                entry["error_code"] = KafkaError.CORRUPT_MESSAGE
                entry["error_message"] = "no records"
            else:
                response = response_of(await task, m.ProduceResponse)
                if response.error_code == ErrorCode.NONE:
                    config = self.broker.store.topic_config(name)
                    log_append_time = config is not None and config.timestamp_type == TIMESTAMP_TYPE_LOG_APPEND
                    entry.update(
                        error_code=0,
                        base_offset=response.base_offset,
                        # The time every record of the batch got on a log-append-time
                        # topic; -1 on a CreateTime topic ("the producer's timestamps stand").
                        log_append_time_ms=response.log_append_time_ms if log_append_time else -1,
                        log_start_offset=response.log_start_offset,
                    )
                else:
                    entry["error_code"] = kafka_error(response.error_code, response.error_message)
                    entry["error_message"] = response.error_message
                    if response.error_code not in (ErrorCode.UNKNOWN_TOPIC, ErrorCode.UNKNOWN_PARTITION):
                        log.info("kafka produce to %s-%d refused: %s", name, index, response.error_message)
            responses.setdefault(name, []).append(entry)
        if acks == 0:
            return None
        return {
            "responses": [{"name": name, "partition_responses": entries} for name, entries in responses.items()],
            "throttle_time_ms": 0,
        }

    # -- fetch ---------------------------------------------------------------------------

    async def _fetch(self, request: KafkaRequest) -> dict[str, Any]:
        """Every partition read once; when together they have less than min_bytes and
        max_wait_ms allows, wait for any of them to grow (the broker's long poll), then
        read them all again. At least one batch is sent when there is one (KIP-74)."""
        body = request.body
        assert body is not None
        loop = asyncio.get_running_loop()
        wait_ms = min(max(body["max_wait_ms"], 0), self.broker.config.fetch_wait_max_ms)
        deadline = loop.time() + wait_ms / 1000
        min_bytes = max(body["min_bytes"], 0)
        partitions = [(topic["topic"], partition) for topic in body["topics"] for partition in topic["partitions"]]
        while True:
            results = await self._read_partitions(partitions, max(body["max_bytes"], 1))
            total = sum(len(result["records"] or b"") for result in results)
            remaining = deadline - loop.time()
            if total >= max(min_bytes, 1) or remaining <= 0 or not partitions:
                break
            if any(result["error_code"] for result in results):
                break
            # Wait for growth past what was just read (its end), not for what is there.
            await self._wait_any(
                [
                    (topic, {**partition, "fetch_offset": max(result["high_watermark"], partition["fetch_offset"])})
                    for (topic, partition), result in zip(partitions, results)
                ],
                remaining,
            )
            if loop.time() >= deadline:
                results = await self._read_partitions(partitions, max(body["max_bytes"], 1))
                break
        by_topic: dict[str, list[dict[str, Any]]] = {}
        for (topic, _), result in zip(partitions, results):
            by_topic.setdefault(topic, []).append(result)
        return {
            "throttle_time_ms": 0,
            "error_code": 0,
            "session_id": 0,  # no fetch sessions: every fetch is a full one
            "responses": [{"topic": topic, "partitions": entries} for topic, entries in by_topic.items()],
        }

    async def _read_partitions(self, partitions: list[tuple[str, dict[str, Any]]], bytes_max: int) -> list[dict]:
        budget = bytes_max
        results = []
        for topic, partition in partitions:
            result: dict[str, Any] = {
                "partition_index": partition["partition"],
                "error_code": 0,
                "high_watermark": -1,
                "last_stable_offset": -1,
                "log_start_offset": -1,
                "aborted_transactions": None,
                "preferred_read_replica": -1,
                "records": b"",
            }
            results.append(result)
            part_budget = min(max(partition["partition_max_bytes"], 1), budget)
            if budget <= 0:
                part_budget = 0
            reply = await self._observed_call(
                m.FetchRequest(
                    topic=topic,
                    partition=partition["partition"],
                    offset=partition["fetch_offset"],
                    bytes_max=max(part_budget, 1),
                    wait_ms=0,
                )
            )
            response = response_of(reply, m.FetchResponse)
            if response.error_code != ErrorCode.NONE:
                result["error_code"] = kafka_error(response.error_code, response.error_message)
                continue
            result["high_watermark"] = result["last_stable_offset"] = response.high_watermark
            result["log_start_offset"] = response.log_start_offset
            if part_budget <= 0 and budget != bytes_max:
                continue  # the response is full; this partition's batches next time
            records: bytes | RecordSlices
            if reply.records_bytes >= SENDFILE_BYTES_MIN:
                records = RecordSlices(reply.slices)  # sent from the segment files by the writer
            else:
                try:
                    records = await _read_slices(reply)
                except NodiError as error:  # a damaged segment (G2): that partition's error, not the connection's
                    log.warning("kafka fetch of %s-%d: %s", topic, partition["partition"], error)
                    result["error_code"] = KafkaError.KAFKA_STORAGE_ERROR
                    continue
            budget -= len(records)
            result["records"] = records
        return results

    async def _wait_any(self, partitions: list[tuple[str, dict[str, Any]]], timeout_s: float) -> None:
        """Until any partition has a batch past its fetch offset, or the timeout: the
        broker's own long-polling fetch, one per partition, the first to answer wins."""
        waits = [
            asyncio.ensure_future(
                self._call(
                    m.FetchRequest(
                        topic=topic,
                        partition=partition["partition"],
                        offset=partition["fetch_offset"],
                        bytes_max=1,
                        wait_ms=max(int(timeout_s * 1000), 1),
                        min_bytes=1,
                    )
                )
            )
            for topic, partition in partitions
        ]
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    # -- ListOffsets, InitProducerId -----------------------------------------------------

    async def _list_offsets(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        topics = []
        for topic in body["topics"]:
            entries = []
            for partition in topic["partitions"]:
                timestamp = partition["timestamp"]
                if timestamp == LATEST_TIMESTAMP:
                    spec = m.OffsetSpec.LATEST
                elif timestamp == EARLIEST_TIMESTAMP:
                    spec = m.OffsetSpec.EARLIEST
                else:
                    spec = m.OffsetSpec.TIMESTAMP
                reply = await self._call(
                    m.ListOffsetsRequest(
                        topic=topic["name"], partition=partition["partition_index"], spec=spec, timestamp_ms=timestamp
                    )
                )
                response = response_of(reply, m.ListOffsetsResponse)
                entry = {
                    "partition_index": partition["partition_index"],
                    "error_code": kafka_error(response.error_code),
                    "timestamp": UNKNOWN,
                    "offset": UNKNOWN,
                    "leader_epoch": 0,
                }
                if response.error_code == ErrorCode.NONE:
                    if spec is not m.OffsetSpec.TIMESTAMP:
                        entry["offset"] = response.offset
                    elif response.timestamp_ms != m.NO_OFFSET:  # else none that recent: Kafka's -1
                        entry["offset"] = response.offset
                        entry["timestamp"] = await self._timestamp_at(
                            topic["name"], partition["partition_index"], response.offset
                        )
                entries.append(entry)
            topics.append({"name": topic["name"], "partitions": entries})
        return {"throttle_time_ms": 0, "topics": topics}

    async def _timestamp_at(self, topic: str, partition: int, offset: int) -> int:
        """The timestamp of the record at `offset` (Kafka answers a ListOffsets by time
        with the found record's own timestamp); -1 when it cannot be read."""
        reply = await self._call(m.FetchRequest(topic=topic, partition=partition, offset=offset, bytes_max=1))
        try:
            records = decode_batches(await _read_slices(reply))
        except NodiError:
            return UNKNOWN
        return next((record.timestamp_ms for record in records if record.offset == offset), UNKNOWN)

    async def _init_producer_id(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        if body["transactional_id"] is not None:
            return {
                "throttle_time_ms": 0,
                "error_code": KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                "producer_id": -1,
                "producer_epoch": -1,
            }
        response = response_of(await self._call(m.InitProducerIdRequest()), m.InitProducerIdResponse)
        return {
            "throttle_time_ms": 0,
            "error_code": kafka_error(response.error_code),
            "producer_id": response.producer_id,
            "producer_epoch": response.producer_epoch,
        }

    # -- CreateTopics, DeleteTopics, DeleteRecords, DescribeConfigs --------------------------

    async def _create_topics(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        results = []
        for topic in body["topics"]:
            error, message = await self._create_topic(topic, body["validate_only"])
            results.append({"name": topic["name"], "error_code": error, "error_message": message})
        return {"throttle_time_ms": 0, "topics": results}

    async def _create_topic(self, topic: dict[str, Any], validate_only: bool) -> tuple[KafkaError, str | None]:
        if topic["replication_factor"] not in (-1, 1):
            return KafkaError.INVALID_REPLICATION_FACTOR, "nodi is one broker: replication factor 1 (or -1)"
        if topic["assignments"]:
            return KafkaError.INVALID_REQUEST, "manual replica assignment is not supported: give num_partitions"
        values: dict[str, Any] = {}
        partitions = topic["num_partitions"]
        values["partitions"] = self.settings.auto_create_partitions if partitions == -1 else partitions
        for config in topic["configs"]:
            setting = _SETTINGS_BY_KAFKA_NAME.get(config["name"])
            if setting is None or setting.name == "partitions":
                return KafkaError.INVALID_CONFIG, f"{config['name']} is not a nodi topic setting"
            name = setting.name
            value = config["value"]
            if value is None:
                continue
            if setting.type is int:
                try:
                    number = int(value)
                except ValueError:
                    return KafkaError.INVALID_CONFIG, f"{config['name']}={value!r} is not an integer"
                values[name] = m.RETENTION_UNLIMITED if number == -1 and setting.unlimited else number
            elif setting.kafka_values:
                nodi_value = setting.from_kafka_value(value)
                if nodi_value not in setting.choices:
                    allowed = ", ".join(kafka for _, kafka in setting.kafka_values)
                    return KafkaError.INVALID_CONFIG, f"{config['name']}={value!r}: one of {allowed}"
                values[name] = nodi_value
            else:
                values[name] = value
        if validate_only:
            try:
                self.broker._topic_config(m.TopicSettings(**values))
            except Exception as error:
                return KafkaError.INVALID_CONFIG, str(error)
            return KafkaError.NONE, None
        reply = await self._call(m.CreateTopicRequest(name=topic["name"], settings=m.TopicSettings(**values)))
        code = reply.response.error_code
        if code == ErrorCode.NONE:
            return KafkaError.NONE, None
        if code == ErrorCode.INVALID_REQUEST:
            return KafkaError.INVALID_TOPIC_EXCEPTION, reply.response.error_message
        return kafka_error(code), reply.response.error_message

    async def _delete_topics(self, request: KafkaRequest) -> dict[str, Any]:
        body = request.body
        assert body is not None
        results = []
        for name in body["topic_names"]:
            reply = await self._call(m.DeleteTopicRequest(name=name))
            results.append({"name": name, "error_code": kafka_error(reply.response.error_code)})
        return {"throttle_time_ms": 0, "responses": results}

    async def _delete_records(self, request: KafkaRequest) -> dict[str, Any]:
        """Kafka's DeleteRecords on nodi's DELETE_RECORDS (admin on the topic): each
        partition's low watermark is the log start offset afterwards. A partition named
        twice counts once, its last offset (Kafka keeps a map too)."""
        body = request.body
        assert body is not None
        topics = []
        for topic in body["topics"]:
            wanted = {entry["partition_index"]: entry["offset"] for entry in topic["partitions"]}
            reply = await self._call(
                m.DeleteRecordsRequest(
                    topic=topic["name"],
                    partitions=[m.RecordDeletion(partition=index, offset=offset) for index, offset in wanted.items()],
                    timeout_ms=body["timeout_ms"],
                )
            )
            response = reply.response
            if response.error_code != ErrorCode.NONE or not isinstance(response, m.DeleteRecordsResponse):
                error = kafka_error(response.error_code)
                partitions = [
                    {"partition_index": index, "low_watermark": UNKNOWN, "error_code": error} for index in wanted
                ]
            else:
                partitions = [
                    {
                        "partition_index": result.partition,
                        "low_watermark": result.log_start_offset if result.error_code == ErrorCode.NONE else UNKNOWN,
                        "error_code": kafka_error(result.error_code, result.error_message),
                    }
                    for result in response.partitions
                ]
            topics.append({"name": topic["name"], "partitions": partitions})
        return {"throttle_time_ms": 0, "topics": topics}

    async def _describe_configs(self, request: KafkaRequest) -> dict[str, Any]:
        """Topic resources (type 2): nodi's settings in force under Kafka's dotted names
        (retention_ms as retention.ms; no limit as -1). Broker resources (type 4): none."""
        body = request.body
        assert body is not None
        results = []
        for resource in body["resources"]:
            result: dict[str, Any] = {
                "error_code": 0,
                "error_message": None,
                "resource_type": resource["resource_type"],
                "resource_name": resource["resource_name"],
                "configs": [],
            }
            results.append(result)
            if resource["resource_type"] == 4:
                continue
            if resource["resource_type"] != 2:
                result["error_code"] = KafkaError.INVALID_REQUEST
                result["error_message"] = "only topic and broker resources are described"
                continue
            reply = await self._call(m.DescribeTopicRequest(name=resource["resource_name"]))
            described = response_of(reply, m.DescribeTopicResponse)
            if described.error_code != ErrorCode.NONE:
                result["error_code"] = kafka_error(described.error_code)
                result["error_message"] = described.error_message
                continue
            keys = resource["configuration_keys"]
            for name, setting in TOPIC_SETTINGS_BY_NAME.items():
                kafka_name = setting.kafka_config_name
                if keys is not None and kafka_name not in keys:
                    continue
                value = getattr(described.settings, name)
                if setting.unlimited and value == m.RETENTION_UNLIMITED:
                    value = -1
                elif setting.kafka_values and value is not None:
                    value = setting.to_kafka_value(value)
                result["configs"].append(
                    {
                        "name": kafka_name,
                        "value": None if value is None else str(value),
                        "read_only": name == "partitions",
                        "config_source": 1,  # DYNAMIC_TOPIC_CONFIG
                        "is_sensitive": False,
                        "synonyms": [],
                        "config_type": 0,
                        "documentation": setting.help,
                    }
                )
        return {"throttle_time_ms": 0, "results": results}


# Kafka's config names of nodi's topic settings (retention.ms, message.timestamp.type).
_SETTINGS_BY_KAFKA_NAME = {setting.kafka_config_name: setting for setting in TOPIC_SETTINGS}


def _topic_error(name: str, error: KafkaError) -> dict[str, Any]:
    return {
        "error_code": error,
        "name": name,
        "is_internal": False,
        "partitions": [],
        "topic_authorized_operations": -2147483648,
    }


def _produce_errors(body: dict[str, Any], error: KafkaError, message: str) -> dict[str, Any] | None:
    if body["acks"] == 0:
        return None
    return {
        "responses": [
            {
                "name": topic["name"],
                "partition_responses": [
                    {
                        "index": partition["index"],
                        "error_code": error,
                        "base_offset": -1,
                        "log_append_time_ms": -1,
                        "log_start_offset": -1,
                        "record_errors": [],
                        "error_message": message,
                    }
                    for partition in topic["partition_data"]
                ],
            }
            for topic in body["topic_data"]
        ],
        "throttle_time_ms": 0,
    }


# Slices at least this long are read off the event loop.
_READ_IN_THREAD_BYTES = 256 * 1024
# A fetch's records of at least this many bytes go out with sendfile (listener.py), as
# nodi's own protocol sends them (broker/server/server.py): reading them into the
# response would cost a copy on the event loop for each.
SENDFILE_BYTES_MIN = 64 * 1024


class RecordSlices:
    """A fetch response's records field left as file slices: len() is its byte count
    (the field's length prefix); the listener's writer sends the slices after the bytes
    before them, with sendfile for the large ones."""

    __slots__ = ("slices", "length")

    def __init__(self, slices: tuple[FileSlice, ...]) -> None:
        self.slices = slices
        self.length = sum(piece.length for piece in slices)

    def __len__(self) -> int:
        return self.length


async def _read_slices(reply: Reply) -> bytes:
    """The fetched batches as stored (FileSlice.read checks them against the scan)."""
    if not reply.slices:
        return b""
    if reply.records_bytes >= _READ_IN_THREAD_BYTES:
        return await asyncio.to_thread(lambda: b"".join(piece.read() for piece in reply.slices))
    return b"".join(piece.read() for piece in reply.slices)
