"""Kafka's four record codecs (storage/codecs.py): what nodi writes, Kafka's clients
read, and the reverse; every codec's inflation bounded; damaged sections refused."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import cramjam
import crc32c
import pytest
from kafka import codec as kafka_codec

from nodi.storage import codecs, records
from nodi.storage.errors import CorruptBatchError, LimitExceededError, RecordFramingError, RecordLimitError
from nodi.storage.limits import MIB, RecordLimits
from nodi.storage.records import Compression, NewRecord

CODECS = [Compression.GZIP, Compression.SNAPPY, Compression.LZ4, Compression.ZSTD]
LIMIT = 16 * MIB


def sample(size: int = 300_000) -> bytes:
    """Some incompressible bytes, a long run and a repeating pattern: every codec's block
    kinds get used."""
    return os.urandom(2_000) + b"a" * (size // 2) + bytes(range(256)) * (size // 512)


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip(codec):
    data = sample()
    assert codecs.decompress(codec, codecs.compress(codec, data), LIMIT) == data
    assert codecs.decompress(codec, codecs.compress(codec, b""), LIMIT) == b""


# kafka-python's encoders are what its producer sends, its decoders what its consumer
# runs on what nodi's producer wrote (its snappy through python-snappy, a dev extra).
KAFKA_PYTHON = {
    Compression.GZIP: (kafka_codec.gzip_encode, kafka_codec.gzip_decode),
    Compression.SNAPPY: (kafka_codec.snappy_encode, kafka_codec.snappy_decode),
    Compression.LZ4: (kafka_codec.lz4_encode, kafka_codec.lz4_decode),
    Compression.ZSTD: (kafka_codec.zstd_encode, kafka_codec.zstd_decode),
}


@pytest.mark.parametrize("codec", sorted(KAFKA_PYTHON))
def test_kafka_python_reads_nodi_and_nodi_reads_kafka_python(codec):
    encode, decode = KAFKA_PYTHON[codec]
    data = sample()
    assert codecs.decompress(codec, encode(data), LIMIT) == data
    assert decode(codecs.compress(codec, data)) == data


def test_snappy_reads_both_framings():
    data = sample()
    framed = codecs.compress(Compression.SNAPPY, data)
    assert framed.startswith(codecs.XERIAL_MAGIC)  # as Kafka's Java client writes it
    raw = bytes(cramjam.snappy.compress_raw(data))  # as librdkafka writes it
    assert codecs.decompress(Compression.SNAPPY, raw, LIMIT) == data
    assert codecs.decompress(Compression.SNAPPY, framed, LIMIT) == data


@pytest.mark.parametrize("codec", CODECS)
def test_a_bomb_stops_at_the_limit(codec):
    """32 MiB of zeros compress to a few KiB (snappy to 1.5 MiB); each decoder must stop
    near the limit rather than inflate it all."""
    bomb = codecs.compress(codec, bytes(32 * MIB))
    with pytest.raises(LimitExceededError):
        codecs.decompress(codec, bomb, 4 * MIB)
    assert len(codecs.decompress(codec, bomb, 32 * MIB)) == 32 * MIB


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("damage", ["truncated", "trailing", "garbage", "empty"])
def test_damaged_sections_are_corrupt(codec, damage):
    good = codecs.compress(codec, sample(20_000))
    section = {
        "truncated": good[: len(good) - 7],
        "trailing": good + b"\x00\x01",
        "garbage": os.urandom(len(good)),
        "empty": b"",
    }[damage]
    with pytest.raises(CorruptBatchError):
        codecs.decompress(codec, section, LIMIT)


@pytest.mark.parametrize("codec", CODECS)
def test_garbage_is_corrupt_whatever_length_it_seems_to_declare(codec):
    # Random bytes read as a raw snappy block declare a length from their leading varint,
    # often far past the limit: that is damage, not a batch too big to inflate.
    for _ in range(200):
        with pytest.raises(CorruptBatchError):
            codecs.decompress(codec, os.urandom(random.randint(1, 2_000)), LIMIT)


def test_a_snappy_block_declaring_more_than_it_can_hold_is_corrupt():
    block = bytes(cramjam.snappy.compress_raw(bytes(1_000_000)))  # raw, as librdkafka writes
    assert len(codecs.decompress(Compression.SNAPPY, block, LIMIT)) == 1_000_000
    lying = b"\xff\xff\xff\xff\x0f" + block[3:]  # 4 GiB declared in about 47 KB (1e6 took 3 bytes)
    with pytest.raises(CorruptBatchError, match="more than it can hold"):
        codecs.decompress(Compression.SNAPPY, lying, LIMIT)


@pytest.mark.parametrize("codec", CODECS)
def test_batches_of_every_codec_decode_and_pass_the_walk(codec):
    new = [NewRecord(f"k{i}".encode(), b"v" * i, (("h", b"x"),)) for i in range(50)]
    batch = records.build_batch(new, compression=codec)
    header = records.check_batch(batch)
    assert header.compression == codec
    records.check_records(batch, header)
    decoded = records.decode_batches(batch)
    assert [(r.key, r.value, r.headers) for r in decoded] == [(r.key, r.value, r.headers) for r in new]


@pytest.mark.parametrize("codec", CODECS)
def test_a_batch_that_inflates_past_the_limit_is_a_record_limit_error(codec):
    generous = RecordLimits(record_bytes_max=64 * MIB, batch_bytes_max=8 * MIB)
    bomb = records.build_batch([NewRecord(None, bytes(20 * MIB))], compression=codec, limits=generous)
    header = records.check_batch(bomb, generous)
    with pytest.raises(RecordLimitError):
        records.check_records(bomb, header)  # the default limit: 16 MiB


@pytest.mark.parametrize("codec", CODECS)
def test_a_section_that_does_not_inflate_is_a_framing_error(codec):
    batch = records.build_batch([NewRecord(None, b"value")], compression=codec)
    header = records.check_batch(batch)
    body = bytearray(batch)
    body[records.BATCH_HEADER_BYTES :] = os.urandom(len(batch) - records.BATCH_HEADER_BYTES)
    struct.pack_into(">I", body, 17, crc32c.crc32c(bytes(body[records.CRC_START :])))
    with pytest.raises(RecordFramingError):
        records.check_records(bytes(body), header)


def test_codec_bench_quick_run_writes_its_json(tmp_path):
    out = tmp_path / "codecs.json"
    completed = subprocess.run(
        [sys.executable, "-m", "tools.codec_bench", "--records", "20", "--rounds", "1", "--round-seconds", "0.01"]
        + ["--json", str(out)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert [one["codec"] for one in figures["codecs"]] == ["none", "gzip", "snappy", "lz4", "zstd"]
    for one in figures["codecs"]:
        assert one["build_mb_per_s"] > 0 and one["decode_mb_per_s"] > 0 and one["batch_share_of_values"] > 0
