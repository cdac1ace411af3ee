"""delete_retention_ms is a topic setting (default: the server's compaction value): a
topic with a short one drops its tombstones once that time has passed since a run first
kept them, while a topic with the default keeps them; at the service level with a
driven compaction clock (COMPACT_TOPIC and the background job's choice), then over a
real `nodi serve` through create/describe, `nodi topic`, and `nodi compact` online and
offline. Also: the TopicConfig field (validation, JSON round trip, a stored topic
without it) and the server defaults in the config file."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from nodi.broker import Client, Message
from nodi.storage.config import DAY_MS
from nodi.storage.errors import InvalidConfigError
from nodi.storage.metadata import TopicConfig
from nodi.storage.records import NewRecord, build_batch, decode_batches

from conftest import NODI, BrokerProcess

SEGMENT_BYTES = 4096
SHORT_MS = 60_000
SERVER_DEFAULT_MS = 3_600_000  # the [compaction] value the servers below run with
KEYS = 20
START_MS = 1_700_000_000_000
WAIT_TIMEOUT_S = 60


def _batches(first: int, count: int, prefix: bytes = b"key") -> list[bytes]:
    """Keyed values, every fifth key deleted by a later tombstone in the same range."""
    out = []
    for number in range(first, first + count):
        records = [
            NewRecord(prefix + b"-%d" % ((number * 4 + index) % KEYS), b"value-%d-%d" % (number, index) * 8)
            for index in range(4)
        ]
        if number % 5 == 4:
            records.append(NewRecord(prefix + b"-%d" % (number % KEYS), None))
        out.append(build_batch(records))
    return out


def _records(log) -> list[tuple[int, bytes | None, bytes | None]]:
    out: list[tuple[int, bytes | None, bytes | None]] = []
    offset = log.log_start_offset
    while offset < log.next_offset:
        result = log.read(offset, 1 << 20)
        if not result.slices:
            break
        out.extend((r.offset, r.key, r.value) for r in decode_batches(result.to_bytes()) if r.offset >= offset)
        offset = result.next_offset
    return out


def _tombstones(records) -> int:
    return sum(1 for _, _, value in records if value is None)


# ---------------------------------------------------------------------------
# TopicConfig


def test_topic_config_field_validates_and_round_trips():
    config = TopicConfig(cleanup_policy="compact", delete_retention_ms=SHORT_MS)
    assert TopicConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # A topic stored before the setting existed: None, the server's value.
    old = {key: value for key, value in TopicConfig().to_dict().items() if key != "delete_retention_ms"}
    assert TopicConfig.from_dict(old).delete_retention_ms is None
    for bad in (-1, True, "1000", 1.5):
        with pytest.raises(InvalidConfigError, match="delete_retention_ms"):
            TopicConfig.from_dict({"delete_retention_ms": bad})


def test_the_server_default_from_the_compaction_table_or_topic_defaults(tmp_path):
    """compaction.delete_retention_ms is the server's value; [topic_defaults] may give new
    topics another (None there: the compaction value)."""
    from nodi.broker.server.config import load_config

    path = tmp_path / "nodi.toml"
    path.write_text("[compaction]\ndelete_retention_ms = 5000\n")
    config = load_config(str(path), environment={})
    assert config.compaction.delete_retention_ms == 5000 and config.topic_defaults.delete_retention_ms is None
    path.write_text("[topic_defaults]\ndelete_retention_ms = 7000\n")
    assert load_config(str(path), environment={}).topic_defaults.delete_retention_ms == 7000
    path.write_text("[topic_defaults]\ndelete_retention_ms = -1\n")
    with pytest.raises(InvalidConfigError, match="delete_retention_ms"):
        load_config(str(path), environment={})


# ---------------------------------------------------------------------------
# Service level, the compaction clock driven


def _broker(store, now: list[int], **compaction):
    """A Broker on `store` whose compactor reads its clock from now[0]."""
    from nodi.broker.server.compaction_settings import CompactionSettings
    from nodi.broker.server.config import ServerConfig
    from nodi.broker.server.service import Broker
    from nodi.storage.compaction import Compactor

    settings = CompactionSettings(delete_retention_ms=SERVER_DEFAULT_MS, **compaction)
    broker = Broker(store, ServerConfig(data_dir=store.data_dir, compaction=settings))
    broker.compaction.compactor = Compactor(settings.storage_config(), clock_ms=lambda: now[0])
    return broker


async def _create(broker, name: str, delete_retention_ms: int):
    from nodi.broker.protocol import messages as m

    request = m.CreateTopicRequest(
        name=name,
        settings=m.TopicSettings(
            cleanup_policy="compact", segment_bytes=SEGMENT_BYTES, delete_retention_ms=delete_retention_ms
        ),
    )
    return (await broker._create_topic(request)).response.settings


def test_a_short_topic_setting_drops_tombstones_after_it_and_the_default_keeps_them(tmp_path):
    from nodi.broker.protocol import messages as m
    from nodi.storage.store import Store

    store = Store.open(tmp_path)
    try:
        now = [START_MS]
        broker = _broker(store, now)

        async def scenario() -> dict[str, list[int]]:
            assert (await _create(broker, "short", SHORT_MS)).delete_retention_ms == SHORT_MS
            assert (await _create(broker, "long", m.CONFIG_DEFAULT)).delete_retention_ms == SERVER_DEFAULT_MS
            for name in ("short", "long"):
                for batch in _batches(0, 30):
                    store.log(name, 0).append(batch)
            seen: dict[str, list[int]] = {"short": [], "long": []}  # tombstones after each run
            # The first run at START_MS stamps the horizon; then just before and at
            # START_MS + SHORT_MS; then past the server default.
            for step_ms in (0, SHORT_MS - 1, 1, SERVER_DEFAULT_MS):
                now[0] += step_ms
                for name in ("short", "long"):
                    await broker.compaction.compact_topic(m.CompactTopicRequest(name=name))
                    seen[name].append(_tombstones(_records(store.log(name, 0))))
            return seen

        seen = asyncio.run(scenario())
        assert seen["short"][0] > 0 and seen["short"][0] == seen["short"][1]  # kept until its time
        assert seen["short"][2] == 0  # gone once SHORT_MS has passed
        assert seen["long"][0] == seen["long"][1] == seen["long"][2] == seen["short"][0]  # the server's hour
        assert seen["long"][3] == 0  # gone after the server default

        # A topic stored without the setting (before it existed) uses the server's
        # value, and describe shows it.
        store.create_topic("old", TopicConfig(cleanup_policy="compact"))
        assert store.topic_config("old").delete_retention_ms is None
        assert broker.compaction.delete_retention_ms(store.topic_config("old")) == SERVER_DEFAULT_MS
        described = asyncio.run(broker._describe_topic(m.DescribeTopicRequest(name="old"))).response
        assert described.settings.delete_retention_ms == SERVER_DEFAULT_MS
    finally:
        store.close()


def test_the_background_job_uses_each_topics_setting(tmp_path):
    from nodi.broker.protocol import messages as m
    from nodi.storage.store import Store

    store = Store.open(tmp_path)
    try:
        now = [START_MS]
        broker = _broker(store, now, check_interval_ms=5, dirty_ratio_min=0.01)
        compactor = broker.compaction.compactor
        names = ("short", "long")

        async def runs_after(before: dict[str, int]) -> None:
            """Wait (bounded) until the job has run once more on each topic."""
            deadline = asyncio.get_running_loop().time() + WAIT_TIMEOUT_S
            while any(compactor.statistics(store.log(name, 0).directory).runs <= before[name] for name in names):
                assert asyncio.get_running_loop().time() < deadline, "the background job did not run"
                await asyncio.sleep(0.01)

        def runs() -> dict[str, int]:
            return {name: compactor.statistics(store.log(name, 0).directory).runs for name in names}

        async def scenario() -> tuple[dict, dict]:
            await _create(broker, "short", SHORT_MS)
            await _create(broker, "long", m.CONFIG_DEFAULT)
            # The job never touches the active segment: roll, so its first run sees
            # every tombstone (appends and rolls do not yield to the job's loop).
            for name in names:
                for batch in _batches(0, 30):
                    store.log(name, 0).append(batch)
                store.log(name, 0).roll()
            job = asyncio.create_task(broker.compaction.run_job())
            try:
                await runs_after({name: 0 for name in names})
                first = {name: _tombstones(_records(store.log(name, 0))) for name in names}
                now[0] += SHORT_MS  # past the short horizon; new keys make the logs dirty again
                before = runs()
                for name in names:
                    for batch in _batches(0, 30, prefix=b"other"):
                        store.log(name, 0).append(batch)
                    store.log(name, 0).roll()
                await runs_after(before)
                return first, {name: _count_prefix(_records(store.log(name, 0)), b"key") for name in names}
            finally:
                job.cancel()
                await broker.compaction.stop()

        first, later = asyncio.run(scenario())
        assert first["short"] > 0 and first["long"] > 0
        assert later == {"short": 0, "long": first["long"]}  # the first batch's tombstones
    finally:
        store.close()


def _count_prefix(records, prefix: bytes) -> int:
    """Tombstones of keys with this prefix."""
    return sum(1 for _, key, value in records if value is None and key.startswith(prefix))


# ---------------------------------------------------------------------------
# A real server and the CLI


def _nodi(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(NODI + list(arguments), capture_output=True, text=True, timeout=120)


def _produce(client: Client, topic: str, first: int, count: int) -> None:
    for batch in _batches(first, count):
        client.produce_batch(topic, 0, batch)


def _read(client: Client, topic: str) -> list[Message]:
    messages: list[Message] = []
    offset = 0
    while True:
        batch, offset_after = client.fetch_with_position(topic, 0, offset, bytes_max=1 << 20)
        if not batch and offset_after == offset:
            return messages
        messages.extend(batch)
        offset = offset_after


def _read_tombstones(client: Client, topic: str) -> int:
    return sum(1 for message in _read(client, topic) if message.value is None)


def _deleted_keys(client: Client, topic: str) -> int:
    """Keys whose latest record is a tombstone: what a run keeps while they stay."""
    latest = {message.key: message.value for message in _read(client, topic)}
    return sum(1 for value in latest.values() if value is None)


def test_the_setting_over_a_real_server_the_cli_and_nodi_compact_online_and_offline(tmp_path):
    """delete_retention_ms 0 on one topic: the second run drops the tombstones the first
    one kept (no clock needed: the horizon is the first run's time); the other topic
    has the server's hour and keeps them."""
    config = tmp_path / "nodi.toml"
    config.write_text(f"[compaction]\ndelete_retention_ms = {SERVER_DEFAULT_MS}\n")
    data_dir = str(tmp_path / "data")
    broker = BrokerProcess(data_dir, extra_args=["--config", str(config)]).start()
    try:
        server = ["--server", broker.address]
        created = _nodi(
            *server,
            "topic",
            "create",
            "short",
            "--cleanup-policy",
            "compact",
            "--segment-bytes",
            str(SEGMENT_BYTES),
            "--delete-retention-ms",
            "0",
            "--json",
        )
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["delete_retention_ms"] == 0
        human = _nodi(
            *server, "topic", "create", "long", "--cleanup-policy", "compact", "--segment-bytes", str(SEGMENT_BYTES)
        )
        assert human.returncode == 0, human.stderr
        assert ["delete_retention_ms", str(SERVER_DEFAULT_MS)] in [line.split() for line in human.stdout.splitlines()]
        described = _nodi(*server, "topic", "describe", "short", "--json")
        assert described.returncode == 0 and json.loads(described.stdout)["settings"]["delete_retention_ms"] == 0
        described = _nodi(*server, "topic", "describe", "long")
        assert ["delete_retention_ms", str(SERVER_DEFAULT_MS)] in [
            line.split() for line in described.stdout.splitlines()
        ]
        refused = _nodi(*server, "topic", "create", "bad", "--delete-retention-ms", "-5")
        assert refused.returncode == 2, refused.stdout + refused.stderr

        with Client(broker.address) as client:
            assert (
                client.create_topic("api", cleanup_policy="compact", delete_retention_ms=1234).delete_retention_ms
                == 1234
            )
            assert client.describe_topic("api").settings.delete_retention_ms == 1234
            with pytest.raises(ValueError):
                client.create_topic("negative", delete_retention_ms=-3)
            for name in ("short", "long"):
                _produce(client, name, 0, 30)

        kept = {}
        for run in range(2):
            for name in ("short", "long"):
                done = _nodi(*server, "compact", name, "--json")
                assert done.returncode == 0, done.stderr
            with Client(broker.address) as client:
                kept[run] = {name: _read_tombstones(client, name) for name in ("short", "long")}
        assert kept[0]["short"] > 0 and kept[0]["short"] == kept[0]["long"]  # the first run keeps them all
        assert kept[1] == {"short": 0, "long": kept[0]["long"]}

        with Client(broker.address) as client:
            for name in ("short", "long"):
                _produce(client, name, 30, 30)
            deleted = {name: _deleted_keys(client, name) for name in ("short", "long")}
        assert deleted["short"] > 0 and deleted["long"] > 0
        assert broker.stop() == 0

        # Offline: the topic's own value from the metadata store.
        for _ in range(2):
            for name in ("short", "long"):
                offline = _nodi("compact", name, "--data-dir", data_dir, "--json")
                assert offline.returncode == 0, offline.stderr
        broker = BrokerProcess(data_dir, extra_args=["--config", str(config)]).start()
        with Client(broker.address) as client:
            assert _read_tombstones(client, "short") == 0
            assert _read_tombstones(client, "long") == deleted["long"]
            _produce(client, "long", 60, 30)  # a tombstone no run has stamped yet
            assert _deleted_keys(client, "long") > 0
        assert broker.stop() == 0

        # Offline --delete-retention-ms stands in for the topic's value for these runs
        # (a horizon already stamped stays: only new tombstones get the shorter one).
        for _ in range(2):
            offline = _nodi("compact", "long", "--data-dir", data_dir, "--delete-retention-ms", "0")
            assert offline.returncode == 0, offline.stderr
        broker = BrokerProcess(data_dir, extra_args=["--config", str(config)]).start()
        with Client(broker.address) as client:
            assert _read_tombstones(client, "long") == 0
            assert client.describe_topic("long").settings.delete_retention_ms == SERVER_DEFAULT_MS
    finally:
        if broker.process is not None:
            broker.stop()


def test_a_topic_may_keep_tombstones_for_ever_without_overflowing_the_horizon(tmp_path):
    """delete_retention_ms up to INT64_MAX is valid; the horizon (an int64 timestamp)
    is capped, every tombstone stays, and every record keeps its timestamp."""
    from nodi.storage.compaction import Compactor
    from nodi.storage.log import Log
    from nodi.storage.metadata import INT64_MAX

    from test_compaction import CONFIG

    TopicConfig(cleanup_policy="compact", delete_retention_ms=INT64_MAX).validate()
    log = Log.open(str(tmp_path / "p"), CONFIG)
    try:
        for batch in _batches(0, 30):
            log.append(batch)

        def read() -> dict[int, tuple[int, bytes | None]]:
            records = decode_batches(log.read(log.log_start_offset, 1 << 20).to_bytes())
            return {record.offset: (record.timestamp_ms, record.value) for record in records}

        appended = read()
        compactor = Compactor()
        for run in range(2):
            compactor.compact(log, roll=True, now_ms=START_MS + run * DAY_MS, delete_retention_ms=INT64_MAX)
            kept = read()
            assert sum(1 for _, value in kept.values() if value is None) > 0
            assert all(appended[offset] == entry for offset, entry in kept.items())  # timestamps kept
        with pytest.raises(InvalidConfigError):
            compactor.compact(log, delete_retention_ms=-1)
    finally:
        log.close()
