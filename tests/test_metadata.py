"""The LMDB metadata store: topics, batched committed offsets, queue state, clamping
against the log (I6), map growth, and a real SIGKILL crash test."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import lmdb
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nodi.storage.errors import (
    InvalidConfigError,
    MetadataError,
    TopicExistsError,
    UnknownTopicError,
)
from nodi.storage.limits import KIB
from nodi.storage.metadata import (
    ClampedOffset,
    CommittedOffset,
    MetadataLimits,
    MetadataStore,
    QueueState,
    TopicConfig,
    _Gate,
    decode_group_key,
    decode_offset_value,
    encode_group_key,
    encode_offset_value,
    validate_topic_name,
)


@pytest.fixture
def store(tmp_path: Path):
    with MetadataStore(tmp_path) as opened:
        yield opened


def committed(store: MetadataStore, group: str, topic: str, partition: int) -> CommittedOffset:
    found = store.committed_offset(group, topic, partition)
    assert found is not None, f"{group} has no offset committed for {topic}[{partition}]"
    return found


# ---------------------------------------------------------------------------
# TopicConfig and names


def test_topic_config_round_trips_through_json() -> None:
    config = TopicConfig(
        partitions=12,
        retention_ms=None,
        retention_bytes=10 * KIB * KIB,
        cleanup_policy="compact,delete",
        fsync_policy="interval",
        fsync_interval_ms=250,
        segment_bytes=4 * KIB,
        segment_ms=60_000,
    )
    config.validate()
    assert TopicConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TopicConfig.from_dict({}) == TopicConfig()
    assert TopicConfig.from_dict({"partitions": 3}) == TopicConfig(partitions=3)
    # Bounds that are allowed: retention 0 (keep nothing sealed), the segment extremes.
    TopicConfig(retention_ms=0, retention_bytes=0, segment_bytes=4 * KIB).validate()
    TopicConfig(segment_bytes=2**31, partitions=10_000).validate()


def test_topic_config_defaults() -> None:
    config = TopicConfig()
    config.validate()
    assert config.partitions == 1
    assert config.retention_ms == 7 * 24 * 3600 * 1000
    assert config.retention_bytes is None
    assert config.cleanup_policy == "delete"
    assert config.fsync_policy == "always"
    assert config.fsync_interval_ms == 1000
    assert config.segment_bytes == 128 * 1024 * 1024
    assert config.segment_ms == 7 * 24 * 3600 * 1000


def test_topic_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(InvalidConfigError, match="retention_hours"):
        TopicConfig.from_dict({"partitions": 1, "retention_hours": 5})
    with pytest.raises(InvalidConfigError):
        TopicConfig.from_dict([("partitions", 1)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"partitions": 0},
        {"partitions": 10_001},
        {"partitions": True},
        {"partitions": "3"},
        {"partitions": 2.0},
        {"retention_ms": -1},
        {"retention_ms": 1.5},
        {"retention_bytes": -1},
        {"cleanup_policy": "delete,compact"},
        {"cleanup_policy": "compact, delete"},
        {"cleanup_policy": "purge"},
        {"fsync_policy": "sometimes"},
        {"fsync_interval_ms": 0},
        {"segment_bytes": 4095},
        {"segment_bytes": 2**31 + 1},
        {"segment_ms": 0},
        {"segment_ms": 2**63},
    ],
)
def test_topic_config_out_of_range_is_rejected(changes: dict) -> None:
    field = next(iter(changes))
    with pytest.raises(InvalidConfigError, match=field):
        replace(TopicConfig(), **changes).validate()
    with pytest.raises(InvalidConfigError, match=field):
        TopicConfig.from_dict(changes)


@pytest.mark.parametrize("name", ["a", "orders", "Orders.v2", "a-b_c.d", "x" * 249, "...", ".a", "0"])
def test_valid_topic_names(name: str) -> None:
    validate_topic_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "x" * 250, "a b", "a/b", "ünï", "tab\t", "a\n", None, 5])
def test_invalid_topic_names(name: object) -> None:
    with pytest.raises(InvalidConfigError):
        validate_topic_name(name)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Codecs


def test_group_key_round_trip_and_prefix_order() -> None:
    key = encode_group_key("grüppe", "orders", 7)
    assert decode_group_key(key) == ("grüppe", "orders", 7)
    longest = encode_group_key("g" * 255, "t" * 249, 2**31 - 1)
    assert len(longest) == 510
    assert decode_group_key(longest) == ("g" * 255, "t" * 249, 2**31 - 1)
    # A group's keys never share a prefix with another group's ("ab" vs "abc").
    assert not encode_group_key("abc", "t", 0).startswith(b"\x02ab")


@pytest.mark.parametrize("garbage", [b"", b"\x05ab", b"\x01a\x01t\x00\x00\x00", b"\x01a\x01t\x00\x00\x00\x00\x00"])
def test_garbage_group_key_raises_metadata_error(garbage: bytes) -> None:
    with pytest.raises(MetadataError):
        decode_group_key(garbage)


def test_offset_value_round_trip_and_garbage() -> None:
    entry = CommittedOffset(2**63 - 1, "héllo", 1_700_000_000_000)
    value = encode_offset_value(entry)
    assert decode_offset_value(value) == entry
    for cut in range(len(value)):
        with pytest.raises(MetadataError):
            decode_offset_value(value[:cut])
    with pytest.raises(MetadataError):
        decode_offset_value(value + b"x")
    with pytest.raises(MetadataError):
        decode_offset_value(b"\x02" + value[1:])


# ---------------------------------------------------------------------------
# Topics


def test_topic_create_get_update_list_delete(store: MetadataStore) -> None:
    assert store.get_topic("orders") is None
    assert store.list_topics() == {}
    store.create_topic("orders", TopicConfig(partitions=3))
    store.create_topic("events")
    assert store.get_topic("orders") == TopicConfig(partitions=3)
    assert store.get_topic("events") == TopicConfig()
    with pytest.raises(TopicExistsError):
        store.create_topic("orders")
    store.update_topic("orders", TopicConfig(partitions=5, fsync_policy="never"))
    assert store.get_topic("orders") == TopicConfig(partitions=5, fsync_policy="never")
    assert store.list_topics() == {
        "events": TopicConfig(),
        "orders": TopicConfig(partitions=5, fsync_policy="never"),
    }
    assert store.statistics().topics == 2
    store.delete_topic("orders")
    assert store.get_topic("orders") is None
    assert list(store.list_topics()) == ["events"]
    with pytest.raises(UnknownTopicError):
        store.delete_topic("orders")
    with pytest.raises(UnknownTopicError):
        store.update_topic("orders", TopicConfig())


def test_topic_writes_are_validated(store: MetadataStore) -> None:
    with pytest.raises(InvalidConfigError):
        store.create_topic("bad name")
    with pytest.raises(InvalidConfigError):
        store.create_topic("orders", TopicConfig(partitions=0))
    assert store.list_topics() == {}
    store.create_topic("orders", TopicConfig(partitions=4))
    with pytest.raises(InvalidConfigError, match="only grow"):
        store.update_topic("orders", TopicConfig(partitions=2))
    assert store.get_topic("orders") == TopicConfig(partitions=4)


def test_topic_writes_commit_at_once(store: MetadataStore) -> None:
    before = store.statistics().write_transactions
    store.create_topic("orders")
    assert store.statistics().write_transactions == before + 1


def test_delete_topic_removes_its_offsets_and_queue_state(store: MetadataStore) -> None:
    store.create_topic("orders", TopicConfig(partitions=2))
    store.create_topic("events")
    store.stage_offset("g1", "orders", 0, 10)
    store.stage_offset("g2", "orders", 1, 20)
    store.stage_offset("g1", "events", 0, 30)
    store.put_queue_state("q", "orders", 0, b"window")
    store.put_queue_state("q", "events", 0, b"other")
    store.flush()
    store.stage_offset("g3", "orders", 0, 40)  # staged only
    store.delete_topic("orders")
    assert store.committed_offset("g1", "orders", 0) is None
    assert store.committed_offset("g2", "orders", 1) is None
    assert store.committed_offset("g3", "orders", 0) is None
    assert store.get_queue_state("q", "orders", 0) is None
    assert committed(store, "g1", "events", 0).offset == 30
    assert store.get_queue_state("q", "events", 0) == b"other"
    assert store.list_groups() == ["g1", "q"]


# ---------------------------------------------------------------------------
# Offsets: staging, batching, reads


def test_staged_offsets_are_visible_before_flush(store: MetadataStore) -> None:
    store.stage_offset("g", "orders", 0, 5, "first", commit_time_ms=1000)
    assert store.committed_offset("g", "orders", 0) == CommittedOffset(5, "first", 1000)
    store.flush()
    store.stage_offset("g", "orders", 0, 9, "second", commit_time_ms=2000)
    store.stage_offset("g", "orders", 1, 3, commit_time_ms=3000)
    store.stage_offset("h", "events", 2, 1, commit_time_ms=4000)
    assert store.committed_offset("g", "orders", 0) == CommittedOffset(9, "second", 2000)
    assert store.group_offsets("g") == {
        ("orders", 0): CommittedOffset(9, "second", 2000),
        ("orders", 1): CommittedOffset(3, "", 3000),
    }
    assert store.list_groups() == ["g", "h"]
    assert store.committed_offset("g", "orders", 7) is None
    assert store.committed_offset("nobody", "orders", 0) is None
    assert store.group_offsets("nobody") == {}


def test_commit_time_defaults_to_now(store: MetadataStore) -> None:
    store.stage_offset("g", "orders", 0, 5)
    assert committed(store, "g", "orders", 0).commit_time_ms > 1_600_000_000_000


def test_group_prefixes_do_not_overlap(store: MetadataStore) -> None:
    store.stage_offset("ab", "t", 0, 1)
    store.stage_offset("abc", "t", 0, 2)
    store.stage_offset("a", "t", 0, 3)
    store.flush()
    assert store.group_offsets("ab") == {("t", 0): store.committed_offset("ab", "t", 0)}
    assert committed(store, "ab", "t", 0).offset == 1
    assert store.list_groups() == ["a", "ab", "abc"]


def test_many_stages_are_one_write_transaction(store: MetadataStore) -> None:
    before = store.statistics()
    for offset in range(2000):
        store.stage_offset(f"group-{offset % 7}", "orders", offset % 50, offset)
    staged = store.statistics()
    assert staged.write_transactions == before.write_transactions
    assert staged.staged_entries == 7 * 50  # latest value per key wins
    assert store.flush() == 350
    after = store.statistics()
    assert after.write_transactions == before.write_transactions + 1
    assert after.flushes == before.flushes + 1
    assert after.entries_written == before.entries_written + 350
    assert after.staged_entries == 0
    assert store.flush() == 0  # nothing staged: no transaction
    assert store.statistics().write_transactions == after.write_transactions
    assert committed(store, f"group-{1999 % 7}", "orders", 1999 % 50).offset == 1999


def test_auto_flush_at_staged_entries_max(tmp_path: Path) -> None:
    with MetadataStore(tmp_path, MetadataLimits(staged_entries_max=10)) as store:
        for partition in range(9):
            store.stage_offset("g", "t", partition, 1)
        store.stage_offset("g", "t", 0, 2)  # same key: still 9 staged
        statistics = store.statistics()
        assert (statistics.flushes, statistics.staged_entries) == (0, 9)
        store.stage_offset("g", "t", 9, 1)
        statistics = store.statistics()
        assert (statistics.flushes, statistics.staged_entries, statistics.entries_written) == (1, 0, 10)
        for partition in range(25):
            store.stage_offset("h", "t", partition, 1)
        statistics = store.statistics()
        assert (statistics.flushes, statistics.staged_entries) == (3, 5)


def test_reopen_keeps_everything_and_close_flushes(tmp_path: Path) -> None:
    with MetadataStore(tmp_path) as store:
        store.create_topic("orders", TopicConfig(partitions=2, cleanup_policy="compact"))
        store.stage_offset("g", "orders", 1, 42, "meta", commit_time_ms=7)
        store.put_queue_state("q", "orders", 0, b"\x00\x01state")
    assert (tmp_path / "meta" / "data.mdb").exists()
    with MetadataStore(tmp_path) as store:
        assert store.list_topics() == {"orders": TopicConfig(partitions=2, cleanup_policy="compact")}
        assert store.committed_offset("g", "orders", 1) == CommittedOffset(42, "meta", 7)
        assert store.get_queue_state("q", "orders", 0) == b"\x00\x01state"
        assert store.list_groups() == ["g", "q"]


def test_delete_group(store: MetadataStore) -> None:
    store.stage_offset("g", "orders", 0, 1)
    store.stage_offset("g", "events", 3, 2)
    store.put_queue_state("g", "orders", 1, b"s")
    store.stage_offset("keep", "orders", 0, 5)
    store.flush()
    store.stage_offset("g", "orders", 2, 3)  # staged only
    assert store.delete_group("g") == 4
    assert store.group_offsets("g") == {}
    assert list(store.iter_queue_state("g")) == []
    assert store.list_groups() == ["keep"]
    assert store.delete_group("g") == 0
    assert committed(store, "keep", "orders", 0).offset == 5


# ---------------------------------------------------------------------------
# Queue state


def test_queue_state_staged_flushed_and_deleted(store: MetadataStore) -> None:
    store.put_queue_state("q", "orders", 0, b"one")
    store.put_queue_state("q", "orders", 1, bytearray(b"two"))
    store.put_queue_state("r", "orders", 0, b"three")
    assert store.get_queue_state("q", "orders", 0) == b"one"
    assert store.statistics().write_transactions == 0
    store.flush()
    store.put_queue_state("q", "orders", 0, b"one again")
    assert list(store.iter_queue_state()) == [
        QueueState("q", "orders", 0, b"one again"),
        QueueState("q", "orders", 1, b"two"),
        QueueState("r", "orders", 0, b"three"),
    ]
    assert [state.partition for state in store.iter_queue_state("q")] == [0, 1]
    store.delete_queue_state("r", "orders", 0)
    assert store.get_queue_state("r", "orders", 0) is None
    assert store.list_groups() == ["q"]  # r's only entry is staged for deletion
    store.flush()
    assert store.get_queue_state("r", "orders", 0) is None
    assert store.list_groups() == ["q"]


def test_queue_state_size_limit(tmp_path: Path) -> None:
    with MetadataStore(tmp_path, MetadataLimits(queue_state_bytes_max=8)) as store:
        store.put_queue_state("q", "t", 0, b"12345678")
        with pytest.raises(InvalidConfigError, match="queue_state_bytes_max"):
            store.put_queue_state("q", "t", 0, b"123456789")
        with pytest.raises(InvalidConfigError):
            store.put_queue_state("q", "t", 0, "text")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Clamping to the log (I6)


def test_clamp_offsets_lowers_and_drops(tmp_path: Path) -> None:
    with MetadataStore(tmp_path) as store:
        store.stage_offset("g", "orders", 0, 5, "kept", commit_time_ms=11)
        store.stage_offset("g", "orders", 1, 50, "lowered", commit_time_ms=12)
        store.stage_offset("h", "orders", 1, 40, commit_time_ms=13)  # == log end: fine
        store.stage_offset("g", "gone", 0, 7, commit_time_ms=14)
        store.flush()
        store.stage_offset("h", "orders", 0, 99, commit_time_ms=15)  # staged, also clamped
        ends = {("orders", 0): 10, ("orders", 1): 40}
        calls = []

        def log_end_offset(topic: str, partition: int) -> int | None:
            calls.append((topic, partition))
            return ends.get((topic, partition))

        before = store.statistics().write_transactions
        clamped = store.clamp_offsets(log_end_offset)
        assert store.statistics().write_transactions == before + 1
        assert sorted(clamped, key=lambda c: (c.group, c.topic, c.partition)) == [
            ClampedOffset("g", "gone", 0, 7, None),
            ClampedOffset("g", "orders", 1, 50, 40),
            ClampedOffset("h", "orders", 0, 99, 10),
        ]
        assert len(calls) == len(set(calls))  # asked once per partition
        assert store.clamp_offsets(log_end_offset) == []
    with MetadataStore(tmp_path) as store:
        assert store.group_offsets("g") == {
            ("orders", 0): CommittedOffset(5, "kept", 11),
            ("orders", 1): CommittedOffset(40, "lowered", 12),
        }
        assert store.group_offsets("h") == {
            ("orders", 0): CommittedOffset(10, "", 15),
            ("orders", 1): CommittedOffset(40, "", 13),
        }


# ---------------------------------------------------------------------------
# Validation and errors


@pytest.mark.parametrize(
    "arguments",
    [
        ("", "t", 0, 0),
        ("é" * 128, "t", 0, 0),  # 256 bytes in UTF-8
        ("\ud800", "t", 0, 0),
        (None, "t", 0, 0),
        ("g", "bad topic", 0, 0),
        ("g", "t", -1, 0),
        ("g", "t", 2**31, 0),
        ("g", "t", True, 0),
        ("g", "t", 0, -1),
        ("g", "t", 0, 2**63),
        ("g", "t", 0, 1.5),
    ],
)
def test_stage_offset_validates(store: MetadataStore, arguments: tuple) -> None:
    with pytest.raises(InvalidConfigError):
        store.stage_offset(*arguments)
    assert store.statistics().staged_entries == 0


def test_group_name_of_255_bytes_is_allowed(store: MetadataStore) -> None:
    group = "é" * 127 + "x"  # 255 bytes
    store.stage_offset(group, "t", 0, 1)
    store.flush()
    assert store.list_groups() == [group]


def test_offset_metadata_limit(tmp_path: Path) -> None:
    with MetadataStore(tmp_path, MetadataLimits(offset_metadata_bytes_max=4)) as store:
        store.stage_offset("g", "t", 0, 1, "abcd")
        with pytest.raises(InvalidConfigError, match="offset_metadata_bytes_max"):
            store.stage_offset("g", "t", 0, 1, "abcde")


@pytest.mark.parametrize(
    "limits",
    [
        MetadataLimits(group_name_bytes_max=256),
        MetadataLimits(staged_entries_max=0),
        MetadataLimits(map_size_bytes=2, map_size_bytes_max=1),
    ],
)
def test_bad_limits_are_rejected(tmp_path: Path, limits: MetadataLimits) -> None:
    with pytest.raises(InvalidConfigError):
        MetadataStore(tmp_path, limits)


def test_unreadable_entries_raise_metadata_error(tmp_path: Path) -> None:
    MetadataStore(tmp_path).close()
    environment = lmdb.open(str(tmp_path / "meta"), max_dbs=8)
    with environment.begin(write=True) as transaction:
        transaction.put(b"orders", b"{not json", db=environment.open_db(b"topics", txn=transaction))
        offsets = environment.open_db(b"offsets", txn=transaction)
        transaction.put(encode_group_key("g", "orders", 0), b"\x01short", db=offsets)
    environment.close()
    with MetadataStore(tmp_path) as store:
        with pytest.raises(MetadataError, match="orders"):
            store.get_topic("orders")
        with pytest.raises(MetadataError):
            store.committed_offset("g", "orders", 0)


def test_second_open_and_closed_store_raise_metadata_error(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path)
    with pytest.raises(MetadataError):
        MetadataStore(tmp_path)
    store.close()
    store.close()
    with pytest.raises(MetadataError, match="closed"):
        store.committed_offset("g", "t", 0)
    with pytest.raises(MetadataError, match="closed"):
        store.stage_offset("g", "t", 0, 1)
    with pytest.raises(MetadataError, match="closed"):
        store.create_topic("t")


# ---------------------------------------------------------------------------
# Map growth


def test_full_map_grows_instead_of_failing(tmp_path: Path) -> None:
    limits = MetadataLimits(map_size_bytes=64 * KIB, staged_entries_max=100_000)
    with MetadataStore(tmp_path, limits) as store:
        metadata = "m" * 1000
        for partition in range(2000):  # ~2 MB of values
            store.stage_offset("g" * 200, "t", partition, partition, metadata)
        store.put_queue_state("q", "t", 0, b"\xab" * (3 * 1024 * 1024))
        store.flush()
        for index in range(20):
            store.create_topic(f"topic-{index}")
        statistics = store.statistics()
        assert statistics.map_growths >= 1
        assert statistics.map_size_bytes > 64 * KIB
    with MetadataStore(tmp_path, limits) as store:
        assert len(store.group_offsets("g" * 200)) == 2000
        assert committed(store, "g" * 200, "t", 1999).offset == 1999
        assert store.get_queue_state("q", "t", 0) == b"\xab" * (3 * 1024 * 1024)
        assert len(store.list_topics()) == 20


def test_map_size_bytes_max_reached_keeps_staged_values(tmp_path: Path) -> None:
    limits = MetadataLimits(map_size_bytes=64 * KIB, map_size_bytes_max=128 * KIB)
    with MetadataStore(tmp_path, limits) as store:
        store.put_queue_state("q", "t", 0, b"x" * (1024 * 1024))
        with pytest.raises(MetadataError, match="map_size_bytes_max"):
            store.flush()
        assert store.get_queue_state("q", "t", 0) == b"x" * (1024 * 1024)
        assert store.statistics().staged_entries == 1
        store.delete_queue_state("q", "t", 0)  # the store stays writable
        store.flush()
        assert store.get_queue_state("q", "t", 0) is None


# ---------------------------------------------------------------------------
# Threads


def test_readers_in_other_threads_survive_map_growth(tmp_path: Path) -> None:
    limits = MetadataLimits(map_size_bytes=64 * KIB, staged_entries_max=100_000)
    with MetadataStore(tmp_path, limits) as store:
        store.stage_offset("reader", "t", 0, 1)
        store.flush()
        done = threading.Event()
        errors: list[BaseException] = []

        def read() -> None:
            try:
                while not done.is_set():
                    assert committed(store, "reader", "t", 0).offset == 1
                    assert len(store.list_groups()) >= 1
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        readers = [threading.Thread(target=read) for _ in range(2)]
        for thread in readers:
            thread.start()
        for round_number in range(6):
            store.put_queue_state("writer", "t", round_number, b"z" * (256 * KIB * 2**round_number // 4))
            store.flush()
        done.set()
        for thread in readers:
            thread.join()
        assert errors == []
        assert store.statistics().map_growths >= 3


def test_concurrent_staging_and_flushing(tmp_path: Path) -> None:
    with MetadataStore(tmp_path, MetadataLimits(staged_entries_max=50)) as store:
        done = threading.Event()
        errors: list[BaseException] = []

        def stage(group: str) -> None:
            try:
                for offset in range(1, 1001):
                    store.stage_offset(group, "t", offset % 10, offset)
                    assert committed(store, group, "t", offset % 10).offset == offset
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        def flush() -> None:
            while not done.is_set():
                store.flush()

        flusher = threading.Thread(target=flush)
        stagers = [threading.Thread(target=stage, args=(f"g{index}",)) for index in range(3)]
        flusher.start()
        for thread in stagers:
            thread.start()
        for thread in stagers:
            thread.join()
        done.set()
        flusher.join()
        assert errors == []
    with MetadataStore(tmp_path) as store:
        for index in range(3):
            offsets = store.group_offsets(f"g{index}")
            assert {key: entry.offset for key, entry in offsets.items()} == {
                ("t", partition): 990 + partition if partition else 1000 for partition in range(10)
            }


# ---------------------------------------------------------------------------
# Model-based: random operations and reopens against a dict


class MetadataModel(RuleBasedStateMachine):
    groups = st.sampled_from(["a", "ab", "b", "é"])
    topics = st.sampled_from(["t", "u"])
    partitions = st.integers(0, 2)

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.directory = tempfile.TemporaryDirectory()
        self.limits = MetadataLimits(staged_entries_max=5)
        self.store = MetadataStore(self.directory.name, self.limits)
        self.offsets: dict[tuple[str, str, int], int] = {}
        self.queue_state: dict[tuple[str, str, int], bytes] = {}

    @rule(group=groups, topic=topics, partition=partitions, offset=st.integers(0, 100))
    def stage_offset(self, group: str, topic: str, partition: int, offset: int) -> None:
        self.store.stage_offset(group, topic, partition, offset)
        self.offsets[group, topic, partition] = offset

    @rule(group=groups, topic=topics, partition=partitions, state=st.binary(max_size=8))
    def put_queue_state(self, group: str, topic: str, partition: int, state: bytes) -> None:
        self.store.put_queue_state(group, topic, partition, state)
        self.queue_state[group, topic, partition] = state

    @rule(group=groups, topic=topics, partition=partitions)
    def delete_queue_state(self, group: str, topic: str, partition: int) -> None:
        self.store.delete_queue_state(group, topic, partition)
        self.queue_state.pop((group, topic, partition), None)

    @rule(group=groups)
    def delete_group(self, group: str) -> None:
        expected = sum(key[0] == group for key in (*self.offsets, *self.queue_state))
        assert self.store.delete_group(group) == expected
        self.offsets = {key: value for key, value in self.offsets.items() if key[0] != group}
        self.queue_state = {key: value for key, value in self.queue_state.items() if key[0] != group}

    @rule()
    def flush(self) -> None:
        self.store.flush()

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = MetadataStore(self.directory.name, self.limits)

    @invariant()
    def matches_model(self) -> None:
        for group in ["a", "ab", "b", "é"]:
            offsets = {
                (topic, partition): entry.offset
                for (topic, partition), entry in self.store.group_offsets(group).items()
            }
            assert offsets == {(t, p): o for (g, t, p), o in self.offsets.items() if g == group}
        assert {(s.group, s.topic, s.partition): s.state for s in self.store.iter_queue_state()} == self.queue_state
        assert self.store.list_groups() == sorted({key[0] for key in (*self.offsets, *self.queue_state)})

    def teardown(self) -> None:
        self.store.close()
        self.directory.cleanup()


TestMetadataModel = MetadataModel.TestCase
TestMetadataModel.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ---------------------------------------------------------------------------
# Crash: SIGKILL a child that flushes, then check every value it reported flushed

CHILD = r"""
import sys
from nodi.storage.metadata import MetadataStore

store = MetadataStore(sys.argv[1])
offset = int(sys.argv[2])
print("ready", flush=True)
while True:
    offset += 1
    for partition in range(4):
        store.stage_offset("crash-group", "crash-topic", partition, offset, f"m{offset}")
    store.put_queue_state("crash-group", "crash-topic", 0, str(offset).encode())
    store.flush()
    print(offset, flush=True)
"""


def test_flushed_offsets_survive_sigkill(tmp_path: Path) -> None:
    """F5 (process death at any instruction): every flush that returned is durable, and
    a flush is atomic (all four partitions move together)."""
    random_generator = random.Random(0x6E6F6469)
    last_flushed = 0
    for _ in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(last_flushed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None  # PIPE
        assert child.stderr is not None  # PIPE
        try:
            assert child.stdout.readline() == "ready\n", child.stderr.read()
            for _ in range(random_generator.randint(1, 300)):
                line = child.stdout.readline()
                assert line, f"child died early: {child.stderr.read()}"
                last_flushed = int(line)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
            # Through the same text wrapper as readline: lines it buffered already are read
            # too (communicate() reads the raw pipe and would skip them).
            remaining = child.stdout.read()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL
        for line in remaining.split():
            last_flushed = int(line)  # printed before the kill: flushed too
        with MetadataStore(tmp_path) as store:
            offsets = store.group_offsets("crash-group")
            assert sorted(offsets) == [("crash-topic", partition) for partition in range(4)]
            survived = {entry.offset for entry in offsets.values()}
            assert len(survived) == 1, f"a flush was torn: {offsets}"
            (offset,) = survived
            # The last printed flush, or the one after it that committed but was not printed.
            assert offset in (last_flushed, last_flushed + 1)
            assert offsets["crash-topic", 0].metadata == f"m{offset}"
            assert store.get_queue_state("crash-group", "crash-topic", 0) == str(offset).encode()
            last_flushed = offset


def test_the_gate_holds_readers_behind_a_commit_and_the_commit_behind_readers() -> None:
    """The store's gate (storage/metadata.py _Gate): a reader waits while a commit holds
    it and goes on when it is released; a commit waits for the readers inside and holds
    back new ones meanwhile (writer first). A release wakes only when someone waits."""
    gate = _Gate()
    events: list[str] = []

    def read(name: str) -> None:
        with gate.shared():
            events.append(name)

    def wait_for_waiters(count: int) -> None:
        for _ in range(1000):
            with gate._condition:
                if gate._waiting == count:
                    return
            threading.Event().wait(0.005)
        raise AssertionError(f"{count} waiters expected, {gate._waiting} found")

    gate.acquire_exclusive()
    reader = threading.Thread(target=read, args=("after commit",))
    reader.start()
    wait_for_waiters(1)
    events.append("commit")
    gate.release_exclusive()
    reader.join(10)
    assert not reader.is_alive()
    assert events == ["commit", "after commit"]

    inside = threading.Event()
    leave = threading.Event()

    def hold_shared() -> None:
        with gate.shared():
            inside.set()
            assert leave.wait(10)
            events.append("reader left")

    holder = threading.Thread(target=hold_shared)
    holder.start()
    assert inside.wait(10)

    def write() -> None:
        gate.acquire_exclusive()
        events.append("writer in")

    writer = threading.Thread(target=write)
    writer.start()
    wait_for_waiters(1)  # the writer, waiting for the reader inside
    late = threading.Thread(target=read, args=("late reader",))
    late.start()
    wait_for_waiters(2)  # a new reader waits behind the writer
    leave.set()
    holder.join(10)
    writer.join(10)
    assert not writer.is_alive()
    assert events[-2:] == ["reader left", "writer in"]
    assert late.is_alive()  # held back until the commit releases
    gate.release_exclusive()
    late.join(10)
    assert events[-1] == "late reader"
    assert gate._waiting == 0 and gate._readers == 0 and not gate._exclusive
