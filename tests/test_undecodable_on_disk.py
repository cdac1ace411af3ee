"""A batch stored before produce walked records (issue 8 item 1): written into a segment
of a stopped broker with its CRC fixed, so only its records' framing is wrong. `segments
verify` reports it; a fetch, a consumer, a timestamp lookup and a queue group skip it and
report it while every message before and after it is read."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import time

import crc32c
import pytest

from nodi.broker import Client
from nodi.storage import records
from nodi.storage.layout import LOGS_DIRECTORY

from conftest import NODI
from lying_batches import varint

TOPIC = "poisoned"
BEFORE = [b"a-%d" % n for n in range(3)]
AFTER = [b"c-%d" % n for n in range(3)]
WAIT_MS = 20_000
# The batches' timestamps: BEFORE at this, the poisoned batch 1 s later, AFTER 2 s later.
STAMP_MS = int(time.time() * 1000) - 60_000


def poison_second_batch(data_dir: str) -> tuple[str, int, int]:
    """Make the second batch of TOPIC-0's first segment lie about its first value's
    length (resealing its CRC). Returns (segment path, batch position, base offset)."""
    path = os.path.join(data_dir, LOGS_DIRECTORY, f"{TOPIC}-0", "0" * 20 + ".log")
    with open(path, "rb") as file:
        data = bytearray(file.read())
    position, header = records.split_batches(data)[1]
    value = b"b-poisoned"
    at = data.index(varint(len(value)) + value, position)
    data[at : at + 1] = varint(len(value) + 40)  # runs past its record
    struct.pack_into(
        ">I",
        data,
        records.CRC_OFFSET + position,
        crc32c.crc32c(bytes(data[position + records.CRC_START : position + header.size])),
    )
    with open(path, "r+b") as file:
        file.write(data)
    return path, position, header.base_offset


@pytest.fixture
def poisoned(broker_factory, tmp_path):
    """A data directory whose TOPIC-0 holds BEFORE, a poisoned batch of two, AFTER."""
    data_dir = str(tmp_path / "data")
    first = broker_factory(data_dir).start()
    with Client(first.address) as client:
        client.create_topic(TOPIC, partitions=1)
        for number, values in enumerate([BEFORE, [b"b-poisoned", b"b-too"], AFTER]):
            stamped = [records.NewRecord(None, value, (), STAMP_MS + 1000 * number) for value in values]
            client.produce_batch(TOPIC, 0, records.build_batch(stamped))
    assert first.stop() == 0
    return data_dir, poison_second_batch(data_dir)


def test_segments_verify_reports_the_batch(poisoned):
    data_dir, (path, position, offset) = poisoned
    done = subprocess.run(NODI + ["segments", "verify", data_dir], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("ERROR"))
    assert f"{path} at position {position} (offset {offset})" in line, line
    assert "record 0: value length" in line and "readers skip this batch" in line, line


def test_readers_skip_it_and_report_it(poisoned, broker_factory, caplog):
    data_dir, (_, _, offset) = poisoned
    broker = broker_factory(data_dir).start()
    expected = BEFORE + AFTER
    with Client(broker.address) as client:
        # One fetch holding all three batches: the ones around the bad one still come.
        with caplog.at_level(logging.WARNING, logger="nodi.client"):
            messages, position = client.fetch_with_position(TOPIC, 0, 0)
        assert [message.value for message in messages] == expected
        assert position == len(BEFORE) + 2 + len(AFTER)
        assert client.undecodable_batches_skipped == 1
        assert any(f"skipping offsets {offset}..{offset + 1}" in r.getMessage() for r in caplog.records)
        # A consumer reads past it, and counts it.
        with client.consumer(TOPIC, start="earliest") as consumer:
            seen = []
            while len(seen) < len(expected):
                polled = consumer.poll(timeout_ms=WAIT_MS)
                assert polled, f"the consumer stopped at {seen}"
                seen.extend(message.value for message in polled)
            assert seen == expected
            assert consumer.statistics().undecodable_batches_skipped == 1
        # A time the bad batch may hold starts at it (its records' times are unknown);
        # the segment is not marked corrupt: the batches after it are still served.
        assert client.list_offsets(TOPIC, 0, STAMP_MS + 500) == offset
        assert [m.value for m in client.fetch(TOPIC, 0, offset)] == AFTER
        assert client.list_offsets(TOPIC, 0, STAMP_MS + 1500) == offset + 2
        # A queue group gets past it: everything else delivered and acked, then the
        # floor is past the end and a further receive waits rather than fails.
        with client.queue(TOPIC, "workers", ack_wait_ms=60_000) as queue:
            delivered = []
            while len(delivered) < len(expected):
                message = queue.receive(timeout_ms=WAIT_MS)
                assert message is not None, f"the queue stopped at {delivered}"
                delivered.append(message.value)
                message.ack()
            assert sorted(delivered) == sorted(expected)
            assert queue.receive(timeout_ms=300) is None
        state = client.describe_queue(TOPIC, "workers")
        assert state.partitions[0].ack_floor == len(BEFORE) + 2 + len(AFTER)
    assert broker.stop() == 0
    log = "".join(broker.output)
    assert f"readers skip offsets {offset}..{offset + 1}: the stored batch does not decode" in log, log
    assert log.count("the stored batch does not decode") == 1, log  # once per batch, whoever meets it


def test_compaction_keeps_it_and_the_log_counts_it(tmp_path, monkeypatch):
    """A compacted log holding such a batch: the run decodes around it, keeps it byte for
    byte (there is no key to judge it by), compacts the rest, and counts it once."""
    from nodi.storage.compaction import Compactor
    from nodi.storage.config import FsyncPolicy, LogConfig
    from nodi.storage.log import Log

    config = LogConfig(segment_bytes=4096, fsync_policy=FsyncPolicy.NEVER, retention_ms=None, dense_offsets=False)
    keyed = [records.NewRecord(b"k%d" % (n % 4), b"old-%d" % n) for n in range(8)]
    poisoned = records.build_batch([records.NewRecord(b"k9", b"b-poisoned")])
    at = poisoned.index(varint(len(b"b-poisoned")) + b"b-poisoned")
    poisoned = bytearray(poisoned)
    poisoned[at : at + 1] = varint(60)
    struct.pack_into(">I", poisoned, records.CRC_OFFSET, crc32c.crc32c(bytes(poisoned[records.CRC_START :])))
    with Log.open(str(tmp_path / "log"), config) as log:
        log.append(records.build_batch(keyed[:4]))
        with monkeypatch.context() as before_the_walk:  # how a broker before issue 8 took it
            before_the_walk.setattr(records, "check_records", lambda batch, header, limits=None: None)
            bad = log.append(bytes(poisoned))
        log.append(records.build_batch(keyed[4:]))
        log.roll()
        log.append(records.build_batch([records.NewRecord(b"k0", b"new")]))
        log.roll()
        Compactor().compact(log)
        assert log.read(bad.first_offset, 1 << 20).slices[0].read()[8 : len(poisoned)] == bytes(poisoned[8:])
        kept = []
        for header, batch in records.iter_batches(log.read(0, 1 << 20).to_bytes()):
            if header.base_offset != bad.first_offset:
                kept.extend((r.key, r.value) for r in records.decode_records(batch, header))
        assert kept == [(b"k1", b"old-5"), (b"k2", b"old-6"), (b"k3", b"old-7"), (b"k0", b"new")]
        assert log.statistics().undecodable_batches == 1
