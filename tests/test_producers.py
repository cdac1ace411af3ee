"""Idempotent producer state in the log: retries are never written twice, also across
a crash and a clean restart (state is derived from the log, I6)."""

from __future__ import annotations

import pytest

from nodi.storage import records
from nodi.storage.config import LogConfig
from nodi.storage.errors import InvalidProducerEpochError, OutOfOrderSequenceError
from nodi.storage.log import Log
from nodi.storage.producers import ProducerStateTable


def _batch(sequence: int, *, count: int = 2, epoch: int = 0, producer_id: int = 7) -> bytes:
    return records.build_batch(
        [records.NewRecord(None, b"s%d" % (sequence + number)) for number in range(count)],
        producer_id=producer_id,
        producer_epoch=epoch,
        base_sequence=sequence,
    )


def _values(log: Log) -> list[bytes | None]:
    return [record.value for record in records.decode_batches(log.read_bytes(log.log_start_offset, 1 << 24))]


def test_retry_is_answered_with_original_offsets(tmp_path):
    with Log.open(str(tmp_path)) as log:
        first = log.append(_batch(0))
        second = log.append(_batch(2))
        retry = log.append(_batch(0))
        assert (retry.first_offset, retry.last_offset, retry.duplicate) == (first.first_offset, first.last_offset, True)
        assert log.append(_batch(2)).first_offset == second.first_offset
        assert _values(log) == [b"s0", b"s1", b"s2", b"s3"]


def test_gap_and_fenced_epoch_are_refused(tmp_path):
    with Log.open(str(tmp_path)) as log:
        log.append(_batch(0))
        with pytest.raises(OutOfOrderSequenceError):
            log.append(_batch(5))
        with pytest.raises(OutOfOrderSequenceError):
            log.append(_batch(3, epoch=1))  # a new epoch starts at 0
        log.append(_batch(0, epoch=1))
        with pytest.raises(InvalidProducerEpochError):
            log.append(_batch(2, epoch=0))
        assert log.next_offset == 4


@pytest.mark.parametrize("clean", [True, False])
def test_dedup_survives_restart(tmp_path, clean):
    config = LogConfig(segment_bytes=4096)
    log = Log.open(str(tmp_path), config)
    sequence = 0
    for _ in range(60):  # several rolls: snapshots at each roll
        log.append(_batch(sequence, producer_id=3))
        log.append(_batch(sequence, producer_id=4))
        sequence += 2
    assert len(log.segments) > 2
    last = log.append(_batch(sequence, producer_id=3))
    if clean:
        log.close()
    # else: abandoned as if killed; fsync=always made every append durable
    with Log.open(str(tmp_path), config) as reopened:
        retry = reopened.append(_batch(sequence, producer_id=3))
        assert retry.duplicate and retry.first_offset == last.first_offset
        assert reopened.append(_batch(sequence, producer_id=4)).duplicate is False
        with pytest.raises(OutOfOrderSequenceError):
            reopened.append(_batch(sequence + 10, producer_id=3))


def test_several_batches_in_one_append(tmp_path):
    with Log.open(str(tmp_path)) as log:
        both = _batch(0) + _batch(2)
        result = log.append(both)
        assert (result.first_offset, result.last_offset) == (0, 3)
        assert log.append(both).duplicate
        with pytest.raises(OutOfOrderSequenceError):
            log.append(_batch(4) + _batch(9))
        with pytest.raises(OutOfOrderSequenceError):
            log.append(_batch(2) + _batch(4))  # a retry mixed with a new batch
        assert log.next_offset == 4


def test_snapshot_round_trip_and_garbage():
    table = ProducerStateTable()
    for producer_id in range(3):
        for sequence in range(0, 14, 2):
            header = records.parse_header(_batch(sequence, producer_id=producer_id))
            table.record(header._replace(base_offset=100 * producer_id + sequence), now_ms=5)
    data = table.encode_snapshot(offset=321)
    offset, decoded = ProducerStateTable.decode_snapshot(data)
    assert offset == 321 and decoded.encode_snapshot(321) == data
    for cut in range(len(data)):
        assert ProducerStateTable.decode_snapshot(data[:cut]) is None
    flipped = bytearray(data)
    flipped[20] ^= 1
    assert ProducerStateTable.decode_snapshot(bytes(flipped)) is None


def test_table_is_bounded():
    table = ProducerStateTable(producers_max=10)
    for producer_id in range(25):
        table.record(records.parse_header(_batch(0, producer_id=producer_id)), now_ms=1)
    assert len(table) == 10
