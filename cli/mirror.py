"""`nodi mirror`: copy topics to a Kafka-protocol cluster, continuously or until caught up.

    nodi mirror --to kafka1:9092                         # every topic, until stopped
    nodi mirror --to kafka1:9092 --topic 'orders*' --until-caught-up

The way beyond one machine: the records (key, value, headers, timestamp) go to the same
partition number of a topic of the same name on the target, in order, through
confluent-kafka's idempotent producer with acks=all (install with `pip install
'nodi[mirror]'`). Missing target topics are created with the source's partition count.

Progress, per partition, is a pair (source offset, target offset): the next source
offset to copy and the target offset it will get. After every round the mirror waits for
the target's acknowledgements and then writes the pairs to a compacted topic on nodi,
`nodi.mirror.NAME` (the offset map, which also tells a consumer moving to the target
where to start), and commits the source offsets to the stream group `mirror.NAME`, so
`nodi status`, `nodi group describe` and the lag metrics show how far behind it is.

A restart reads the map and asks the target for each partition's end: records the
target holds past the map's target offset were copied after the last checkpoint (the
mirror was stopped between the acknowledgement and the checkpoint), so that many source
records are skipped. So a mirror killed at any point and started again copies every
record exactly once, provided it is the only writer of its target topics. A target
partition that holds fewer records than the map says (deleted or truncated), or records
when the mirror has no map for it, is refused with an error rather than guessed at.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from nodi.cli.common import command, connect, fail
from nodi.storage.errors import NodiError

log = logging.getLogger("nodi.mirror")

CHECKPOINT_TOPIC_PREFIX = "nodi.mirror."
GROUP_PREFIX = "mirror."
# Bytes fetched from one source partition per request.
FETCH_BYTES_MAX = 1 << 20
# A round stops reading more once this much is waiting for the target's acks.
ROUND_BYTES_MAX = 16 << 20
# How long to wait for the target's acknowledgements of one round, and for its metadata.
TARGET_TIMEOUT_S = 60.0
# Continuous mode: the pause when a round found nothing new, and how often the list of
# source topics is read again for new ones matching the patterns.
IDLE_PAUSE_S = 0.2
TOPIC_REFRESH_S = 10.0


class MirrorError(Exception):
    """The mirror cannot go on without losing or duplicating records; the message says why."""


@dataclasses.dataclass
class Progress:
    topic: str
    partition: int
    source_next: int  # the next source offset to copy
    target_next: int  # the target offset the next copied record gets
    copied: int = 0  # records copied by this run

    @property
    def key(self) -> str:
        return f"{self.topic}/{self.partition}"


@dataclasses.dataclass
class Summary:
    records: int
    bytes: int
    seconds: float
    partitions: int
    skipped_after_restart: int

    def line(self) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        return (
            f"mirrored {self.records} record(s), {self.bytes} byte(s) of {self.partitions} partition(s) "
            f"in {self.seconds:.1f} s ({rate:,.0f}/s); {self.skipped_after_restart} already on the target"
        )


def _selected(name: str, patterns: Sequence[str], checkpoint_topic: str) -> bool:
    if name.startswith(CHECKPOINT_TOPIC_PREFIX) or name == checkpoint_topic:
        return False  # nodi's own bookkeeping (mirror maps), never mirrored
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


class Mirror:
    """One mirror from a nodi broker (`client`, a sync Client) to a Kafka-protocol cluster."""

    def __init__(
        self,
        client: Any,
        target: str,
        *,
        name: str = "default",
        patterns: Sequence[str] = ("*",),
        create_topics: bool = True,
        replication_factor: int = -1,
        target_config: dict[str, str] | None = None,
        producer_config: dict[str, str] | None = None,
    ) -> None:
        try:
            import confluent_kafka
            from confluent_kafka.admin import AdminClient
        except ImportError:
            raise MirrorError("nodi mirror needs confluent-kafka: pip install 'nodi[mirror]'") from None
        self._kafka = confluent_kafka
        self.client = client
        self.target = target
        self.name = name
        self.patterns = tuple(patterns) or ("*",)
        self.create_topics = create_topics
        self.replication_factor = replication_factor
        self.checkpoint_topic = CHECKPOINT_TOPIC_PREFIX + name
        self.group = GROUP_PREFIX + name
        common: dict[str, Any] = {
            "bootstrap.servers": target,
            "client.id": f"nodi-mirror-{name}",
            **(target_config or {}),
        }
        self.admin = AdminClient(common)
        self.producer = confluent_kafka.Producer(
            {
                **common,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": "lz4",
                **(producer_config or {}),
            }
        )
        self.watermarks = confluent_kafka.Consumer(
            {**common, "group.id": f"nodi-mirror-{name}-watermarks", "enable.auto.commit": False}
        )
        self.progress: dict[tuple[str, int], Progress] = {}
        self.skipped_after_restart = 0
        self._map: dict[str, tuple[int, int]] = {}
        self._failures: list[str] = []
        self._next_first = 0

    # -- setup ------------------------------------------------------------------------

    def _load_map(self) -> None:
        from nodi.broker.client.errors import TopicExists

        try:
            self.client.create_topic(self.checkpoint_topic, 1, cleanup_policy="compact")
        except TopicExists:
            pass
        description = self.client.describe_topic(self.checkpoint_topic)
        end = description.partitions[0].high_watermark
        offset = description.partitions[0].log_start_offset
        while offset < end:
            messages, offset = self.client.fetch_with_position(self.checkpoint_topic, 0, offset)
            if not messages:
                break
            for message in messages:
                if message.key is None:
                    continue
                key = message.key.decode()
                if message.value is None:
                    self._map.pop(key, None)
                    continue
                entry = json.loads(message.value)
                self._map[key] = (int(entry["source_next"]), int(entry["target_next"]))

    def _target_partitions(self, topic: str) -> int | None:
        # Every topic's metadata, not the one topic's: librdkafka asks about a named topic
        # with allow_auto_topic_creation on, and a broker that auto-creates (Kafka's
        # default, and nodi's listener) would create it with its default partition count.
        metadata = self.admin.list_topics(timeout=TARGET_TIMEOUT_S)
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            return None
        return len(found.partitions)

    def _ensure_target_topic(self, topic: str, partitions: int) -> None:
        existing = self._target_partitions(topic)
        if existing is None:
            if not self.create_topics:
                raise MirrorError(f"target has no topic {topic!r} (and --no-create-topics was given)")
            from confluent_kafka.admin import NewTopic

            futures = self.admin.create_topics(
                [NewTopic(topic, num_partitions=partitions, replication_factor=self.replication_factor)],
                request_timeout=TARGET_TIMEOUT_S,
            )
            try:
                futures[topic].result(TARGET_TIMEOUT_S)
            except self._kafka.KafkaException as error:
                if error.args[0].code() != self._kafka.KafkaError.TOPIC_ALREADY_EXISTS:
                    raise MirrorError(f"cannot create topic {topic!r} on the target: {error}") from None
            log.info("created topic %s with %d partition(s) on the target", topic, partitions)
            existing = self._wait_for_target_topic(topic)
        if existing < partitions:
            raise MirrorError(
                f"target topic {topic!r} has {existing} partition(s), the source {partitions}: "
                "a mirror keeps partitions one to one"
            )

    def _wait_for_target_topic(self, topic: str) -> int:
        deadline = time.monotonic() + TARGET_TIMEOUT_S
        while time.monotonic() < deadline:
            count = self._target_partitions(topic)
            if count:
                return count
            time.sleep(0.1)
        raise MirrorError(f"topic {topic!r} did not appear on the target within {TARGET_TIMEOUT_S:.0f} s")

    def _target_end(self, topic: str, partition: int) -> int:
        partition_ = self._kafka.TopicPartition(topic, partition)
        _, high = self.watermarks.get_watermark_offsets(partition_, timeout=TARGET_TIMEOUT_S)
        return high

    def _add_partition(self, topic: str, partition: int, log_start: int) -> None:
        key = f"{topic}/{partition}"
        target_end = self._target_end(topic, partition)
        if key not in self._map:
            if target_end > 0:
                raise MirrorError(
                    f"target partition {key} already holds {target_end} record(s) and this mirror "
                    f"({self.name!r}) has no checkpoint for it: refusing to mirror onto it "
                    "(delete the target topic, or mirror it under another --name)"
                )
            progress = Progress(topic, partition, log_start, 0)
        else:
            source_next, target_next = self._map[key]
            ahead = target_end - target_next
            if ahead < 0:
                raise MirrorError(
                    f"target partition {key} ends at {target_end}, before this mirror's checkpoint "
                    f"{target_next}: records were deleted from the target; refusing to guess"
                )
            progress = Progress(topic, partition, max(source_next, log_start), target_next)
            if ahead:
                self._skip(progress, ahead)
        self.progress[(topic, partition)] = progress

    def _skip(self, progress: Progress, count: int) -> None:
        """The target already holds `count` records copied after the last checkpoint:
        step past as many source records (offsets may have gaps after compaction)."""
        left = count
        while left > 0:
            messages, position = self.client.fetch_with_position(
                progress.topic, progress.partition, progress.source_next, include_expired=True
            )
            if not messages:
                raise MirrorError(
                    f"target partition {progress.key} holds {count} record(s) past the checkpoint, but the "
                    f"source has only {count - left} after offset {progress.source_next}"
                )
            for message in messages:
                if left == 0:
                    break
                progress.source_next = message.offset + 1
                progress.target_next += 1
                left -= 1
            if left and position > progress.source_next:
                progress.source_next = position
        self.skipped_after_restart += count
        log.info(
            "%s: %d record(s) were already on the target; resuming at %d", progress.key, count, progress.source_next
        )

    def discover(self) -> None:
        """Add every source topic matching the patterns (and its target topic)."""
        for summary in self.client.list_topics():
            if not _selected(summary.name, self.patterns, self.checkpoint_topic):
                continue
            if all((summary.name, partition) in self.progress for partition in range(summary.partitions)):
                continue
            description = self.client.describe_topic(summary.name)
            self._ensure_target_topic(summary.name, description.partition_count)
            for partition in description.partitions:
                if (summary.name, partition.partition) not in self.progress:
                    self._add_partition(summary.name, partition.partition, partition.log_start_offset)
        # A partition seen for the first time gets its starting pair in the map before
        # anything is copied: a mirror killed during its very first round then finds
        # the map on restart and skips what the target already holds, where without
        # it the target's records would have no checkpoint to be counted from.
        fresh = [progress for progress in self.progress.values() if progress.key not in self._map]
        if fresh:
            self._checkpoint(fresh)

    # -- copying ----------------------------------------------------------------------

    def _on_delivery(self, error: Any, message: Any) -> None:
        if error is not None:
            self._failures.append(f"{message.topic()}/{message.partition()}: {error}")

    def round(self) -> tuple[int, int]:
        """Copy what each partition has, up to ROUND_BYTES_MAX in all; wait for the
        target's acks, then checkpoint. Returns (records, bytes) copied."""
        records = size = 0
        moved: list[Progress] = []
        # Each round starts one partition further on, so a partition with a backlog
        # larger than a round cannot keep the ones after it waiting.
        ordered = list(self.progress.values())
        self._next_first = (self._next_first + 1) % max(len(ordered), 1)
        for progress in ordered[self._next_first :] + ordered[: self._next_first]:
            if size >= ROUND_BYTES_MAX:
                break
            try:
                messages, position = self.client.fetch_with_position(
                    progress.topic,
                    progress.partition,
                    progress.source_next,
                    bytes_max=FETCH_BYTES_MAX,
                    include_expired=True,
                )
            except NodiError as error:
                from nodi.broker.client.errors import OffsetOutOfRange

                if not isinstance(error, OffsetOutOfRange):
                    raise
                # Retention removed what was not copied yet: it is gone on the source too.
                start = self.client.describe_topic(progress.topic).partitions[progress.partition].log_start_offset
                log.warning(
                    "%s: offsets %d..%d were removed by retention before they were mirrored",
                    progress.key,
                    progress.source_next,
                    start - 1,
                )
                progress.source_next = start
                continue
            for message in messages:
                self._produce(progress, message)
                size += len(message.value or b"") + len(message.key or b"")
            records += len(messages)
            if messages or position != progress.source_next:
                progress.source_next = max(position, progress.source_next)
                moved.append(progress)
        if moved:
            self._acknowledged()
            self._checkpoint(moved)
        return records, size

    def _produce(self, progress: Progress, message: Any) -> None:
        while True:
            try:
                self.producer.produce(
                    progress.topic,
                    value=message.value,
                    key=message.key,
                    partition=progress.partition,
                    timestamp=message.timestamp,
                    headers=list(message.headers) or None,
                    on_delivery=self._on_delivery,
                )
                break
            except BufferError:  # librdkafka's queue is full: let it drain
                self.producer.poll(0.1)
        progress.target_next += 1
        progress.copied += 1

    def _acknowledged(self) -> None:
        left = self.producer.flush(TARGET_TIMEOUT_S)
        if left:
            raise MirrorError(f"the target did not acknowledge {left} record(s) within {TARGET_TIMEOUT_S:.0f} s")
        if self._failures:
            raise MirrorError(f"the target refused records: {'; '.join(self._failures[:5])}")

    def _checkpoint(self, moved: Sequence[Progress]) -> None:
        for progress in moved:
            value = json.dumps({"source_next": progress.source_next, "target_next": progress.target_next})
            self.client.produce(self.checkpoint_topic, value.encode(), key=progress.key.encode(), partition=0)
            self._map[progress.key] = (progress.source_next, progress.target_next)
        self.client.commit_offsets(self.group, {(p.topic, p.partition): p.source_next for p in moved})

    def caught_up(self, ends: dict[tuple[str, int], int]) -> bool:
        return all(self.progress[key].source_next >= end for key, end in ends.items() if key in self.progress)

    def run(self, *, until_caught_up: bool, stop: threading.Event) -> Summary:
        started = time.monotonic()
        self._load_map()
        self.discover()
        ends = {
            (summary.name, partition.partition): partition.high_watermark
            for summary in self.client.list_topics()
            if _selected(summary.name, self.patterns, self.checkpoint_topic)
            for partition in self.client.describe_topic(summary.name).partitions
        }
        records = size = 0
        refreshed = time.monotonic()
        while not stop.is_set():
            if until_caught_up and self.caught_up(ends):
                break
            copied, copied_bytes = self.round()
            records += copied
            size += copied_bytes
            if not copied and not until_caught_up:
                stop.wait(IDLE_PAUSE_S)
            if not until_caught_up and time.monotonic() - refreshed >= TOPIC_REFRESH_S:
                self.discover()
                refreshed = time.monotonic()
        self.close()
        return Summary(records, size, time.monotonic() - started, len(self.progress), self.skipped_after_restart)

    def close(self) -> None:
        self.producer.flush(TARGET_TIMEOUT_S)
        self.watermarks.close()


def _settings(pairs: Sequence[str] | None, option: str) -> dict[str, str]:
    out = {}
    for pair in pairs or ():
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=option)
        out[key.strip()] = value
    return out


def register(app: typer.Typer) -> None:
    command(app, "mirror")(mirror)


def mirror(
    ctx: typer.Context,
    to: Annotated[str, typer.Option("--to", help="The target cluster's bootstrap address, HOST:PORT[,HOST:PORT].")],
    topic: Annotated[
        list[str] | None,
        typer.Option("--topic", help="Topic name or glob pattern to mirror (repeatable; default: every topic)."),
    ] = None,
    name: Annotated[
        str,
        typer.Option("--name", help="Names this mirror's offset map (nodi.mirror.NAME) and group (mirror.NAME)."),
    ] = "default",
    until_caught_up: Annotated[
        bool, typer.Option("--until-caught-up", help="Stop once the source's ends at start are copied.")
    ] = False,
    create_topics: Annotated[
        bool,
        typer.Option("--create-topics/--no-create-topics", help="Create missing target topics (default: yes)."),
    ] = True,
    replication_factor: Annotated[
        int, typer.Option("--replication-factor", help="For created target topics (-1: the cluster's default).")
    ] = -1,
    target_config: Annotated[
        list[str] | None,
        typer.Option(
            "--target-config",
            help="A librdkafka setting KEY=VALUE for every connection to the target, e.g. "
            "security.protocol=SASL_SSL (repeatable).",
        ),
    ] = None,
    producer_config: Annotated[
        list[str] | None,
        typer.Option(
            "--producer-config", help="A librdkafka producer setting KEY=VALUE, e.g. linger.ms=20 (repeatable)."
        ),
    ] = None,
) -> None:
    """Copy topics to a Kafka-protocol cluster (Kafka, Redpanda, ...): keys, values,
    headers, timestamps and partitions, in order, exactly once across restarts.

    The mirror checkpoints its progress on nodi (the offset map topic nodi.mirror.NAME
    and the group mirror.NAME, whose lag `nodi status` shows). It must be the only writer
    of its target topics. Needs confluent-kafka (pip install confluent-kafka, or nodi's mirror extra). Stops on
    SIGINT or SIGTERM after the round in hand is acknowledged and checkpointed."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    with connect(ctx) as client:
        try:
            summary = Mirror(
                client,
                to,
                name=name,
                patterns=topic or ("*",),
                create_topics=create_topics,
                replication_factor=replication_factor,
                target_config=_settings(target_config, "--target-config"),
                producer_config=_settings(producer_config, "--producer-config"),
            ).run(until_caught_up=until_caught_up, stop=stop)
        except MirrorError as error:
            raise fail(f"nodi mirror: {error}") from None
    typer.echo(summary.line())
