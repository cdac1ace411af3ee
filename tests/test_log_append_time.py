"""Log-append-time topics in storage (issue 13): the log stamps each batch it appends
with its clock as Kafka's LogValidator does (timestamp-type bit, max_timestamp = the
append time, CRC computed again), leaves every other byte as the producer wrote it, and
every reader takes max_timestamp as each record's time. The server and the Kafka clients
on top are tests/test_log_append_time_server.py."""

from __future__ import annotations

import pytest

from nodi.storage.compaction import Compactor
from nodi.storage.config import FsyncPolicy, LogConfig
from nodi.storage.log import Log
from nodi.storage.producers import _BATCH_V1, _CRC, _ENTRY, _HEAD, ProducerStateTable
from nodi.storage.records import (
    ATTRIBUTE_TIMESTAMP_TYPE,
    BATCH_HEADER_BYTES,
    Compression,
    NewRecord,
    build_batch,
    check_batch,
    check_batches,
    decode_batches,
    iter_batches,
    parse_header,
    stamp_log_append_time,
)
from nodi.storage.store import log_config_for
from nodi.storage.topic_settings import TopicConfig

OLD_MS = 1_000_000_000_000  # 2001: the producer's timestamps
APPEND_MS = 1_800_000_000_000  # the broker's clock
LOG_APPEND = LogConfig(fsync_policy=FsyncPolicy.NEVER, log_append_time=True)
CREATE_TIME = LogConfig(fsync_policy=FsyncPolicy.NEVER)


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def old_batch(count: int = 3, *, compression: Compression = Compression.NONE, **options) -> bytes:
    return build_batch(
        [NewRecord(b"k%d" % i, b"v%d" % i, [("h", b"x")], OLD_MS + i) for i in range(count)],
        compression=compression,
        **options,
    )


def stored_bytes(log: Log) -> bytes:
    return log.read(log.log_start_offset, 1 << 20).to_bytes()


def test_the_topic_setting_makes_a_log_append_time_log():
    assert log_config_for(TopicConfig(timestamp_type="log-append")).log_append_time
    assert not log_config_for(TopicConfig()).log_append_time
    assert TopicConfig.from_dict({}).timestamp_type == "create"  # a topic stored before the setting


def test_stamping_patches_the_bit_max_timestamp_and_crc_and_nothing_else():
    batch = old_batch()
    header = check_batch(batch)
    patch, stamped = stamp_log_append_time(batch, header, APPEND_MS)
    out = batch[:8] + patch + batch[BATCH_HEADER_BYTES:]
    assert len(patch) == BATCH_HEADER_BYTES - 8
    checked = check_batch(out)  # the new CRC holds
    assert checked == stamped
    assert checked.attributes == header.attributes | ATTRIBUTE_TIMESTAMP_TYPE
    assert checked.max_timestamp == APPEND_MS
    assert checked._replace(attributes=0, max_timestamp=0, crc=0) == header._replace(
        attributes=0, max_timestamp=0, crc=0
    )
    changed = [index for index, (a, b) in enumerate(zip(batch, out, strict=True)) if a != b]
    # only bytes of the CRC (17..20), attributes (21, 22) and max_timestamp (35..42)
    assert changed and set(changed) <= {*range(17, 21), 21, 22, *range(35, 43)}
    assert [record.timestamp_ms for record in decode_batches(out)] == [APPEND_MS] * 3
    assert [record.timestamp_ms for record in decode_batches(batch)] == [OLD_MS, OLD_MS + 1, OLD_MS + 2]


@pytest.mark.parametrize("compression", list(Compression), ids=[codec.name.lower() for codec in Compression])
def test_a_log_append_time_log_stamps_every_batch_with_its_clock(tmp_path, compression):
    clock = Clock(APPEND_MS)
    with Log.open(str(tmp_path / "log"), LOG_APPEND, clock_ms=clock) as log:
        first = log.append(old_batch(compression=compression))
        clock.now_ms += 5
        second = log.append(old_batch(2, compression=compression) + old_batch(1, compression=compression))
        assert (first.log_append_time_ms, second.log_append_time_ms) == (APPEND_MS, APPEND_MS + 5)
        data = stored_bytes(log)
        headers = [header for header, _ in iter_batches(data)]  # every CRC checked
        assert [header.max_timestamp for header in headers] == [APPEND_MS, APPEND_MS + 5, APPEND_MS + 5]
        assert all(header.attributes & ATTRIBUTE_TIMESTAMP_TYPE for header in headers)
        assert all(header.base_timestamp == OLD_MS for header in headers)
        times = [record.timestamp_ms for record in decode_batches(data)]
        assert times == [APPEND_MS] * 3 + [APPEND_MS + 5] * 3
        # the records section is the producer's, byte for byte
        sent = old_batch(compression=compression)
        assert data[BATCH_HEADER_BYTES : headers[0].size] == sent[BATCH_HEADER_BYTES:]
        # the time index and lookups by time use the append times
        assert log.offset_for_timestamp(OLD_MS) == 0
        assert log.offset_for_timestamp(APPEND_MS + 1) == 3
        assert log.offset_for_timestamp(APPEND_MS + 6) is None
        assert log.segments[-1].max_timestamp == APPEND_MS + 5
        check_batches(data)  # what produce and `nodi segments verify` check
    # recovery rebuilds the indexes from the stamped batches
    for name in ("00000000000000000000.index", "00000000000000000000.timeindex"):
        (tmp_path / "log" / name).unlink()
    with Log.open(str(tmp_path / "log"), LOG_APPEND, clock_ms=clock) as reopened:
        assert reopened.offset_for_timestamp(APPEND_MS + 1) == 3
        assert stored_bytes(reopened) == data


def test_a_create_time_log_stores_the_batch_as_sent(tmp_path):
    batch = old_batch()
    with Log.open(str(tmp_path / "log"), CREATE_TIME, clock_ms=Clock(APPEND_MS)) as log:
        log.append(batch)
        assert stored_bytes(log) == batch
        assert [record.timestamp_ms for record in decode_batches(stored_bytes(log))] == [OLD_MS, OLD_MS + 1, OLD_MS + 2]
        assert log.offset_for_timestamp(OLD_MS + 1) == 1  # the producer's times stand


def test_an_idempotent_retry_is_answered_with_the_original_offsets_and_time_and_not_stamped_again(tmp_path):
    clock = Clock(APPEND_MS)
    directory = str(tmp_path / "log")
    batch = old_batch(producer_id=7, producer_epoch=0, base_sequence=0)
    with Log.open(directory, LOG_APPEND, clock_ms=clock) as log:
        original = log.append(batch)
        clock.now_ms += 1000
        retry = log.append(batch)
        assert retry.duplicate
        assert (retry.first_offset, retry.last_offset) == (original.first_offset, original.last_offset)
        assert retry.log_append_time_ms == APPEND_MS
        assert log.next_offset == 3
        data = stored_bytes(log)
        assert parse_header(data).max_timestamp == APPEND_MS
    with Log.open(directory, LOG_APPEND, clock_ms=clock) as reopened:  # from the producer snapshot
        again = reopened.append(batch)
        assert again.duplicate and again.log_append_time_ms == APPEND_MS
        assert stored_bytes(reopened) == data


def test_a_version_1_producer_snapshot_is_still_read_with_unknown_times():
    table = ProducerStateTable()
    header = parse_header(old_batch(producer_id=9, producer_epoch=2, base_sequence=0))._replace(base_offset=40)
    table.record(header, APPEND_MS)
    body = _HEAD.pack(b"NDPS", 1, 43, 1) + _ENTRY.pack(9, 2, APPEND_MS, 1) + _BATCH_V1.pack(0, 2, 40, 42)
    offset, decoded = ProducerStateTable.decode_snapshot(body + _CRC.pack(__import__("crc32c").crc32c(body)))
    assert offset == 43
    remembered = decoded.check(header)
    assert remembered is not None and (remembered.first_offset, remembered.max_timestamp) == (40, -1)
    # the current version keeps the time
    offset, current = ProducerStateTable.decode_snapshot(table.encode_snapshot(43))
    assert current.check(header).max_timestamp == header.max_timestamp


def test_compaction_keeps_the_append_time_of_the_records_it_keeps(tmp_path):
    config = LogConfig(
        segment_bytes=4096,
        index_interval_bytes=256,
        fsync_policy=FsyncPolicy.NEVER,
        retention_ms=None,
        dense_offsets=False,
        log_append_time=True,
    )
    clock = Clock(APPEND_MS)
    with Log.open(str(tmp_path / "log"), config, clock_ms=clock) as log:
        for number in range(40):
            clock.now_ms = APPEND_MS + number
            log.append(build_batch([NewRecord(b"key-%d" % (number % 4), b"v" * 100, (), OLD_MS)]))
        log.roll()
        Compactor(clock_ms=clock).compact(log, now_ms=clock.now_ms)
        data = stored_bytes(log)
        kept = {record.key: (record.offset, record.timestamp_ms) for record in decode_batches(data)}
        # the latest of each key, at its offset, with the time its batch was appended
        assert kept == {b"key-%d" % key: (36 + key, APPEND_MS + 36 + key) for key in range(4)}
        assert all(header.attributes & ATTRIBUTE_TIMESTAMP_TYPE for header, _ in iter_batches(data))
