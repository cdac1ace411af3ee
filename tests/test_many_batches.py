"""One append of more batches than one pwritev call takes (IOV_MAX buffers): it was an
EINVAL that made the partition read-only, and any client could send such a produce."""

from __future__ import annotations

from nodi.broker import Client
from nodi.storage.config import LogConfig
from nodi.storage.fileio import IOV_MAX
from nodi.storage.log import Log
from nodi.storage.records import NewRecord, build_batch, decode_batches

# Each batch is two buffers (its new base offset, then the rest of its bytes).
BATCHES = IOV_MAX + 100


def _batches(count: int) -> bytes:
    return b"".join(build_batch([NewRecord(key=b"k", value=f"v{number}".encode())]) for number in range(count))


def test_an_append_of_more_batches_than_iov_max_is_written_whole(tmp_path):
    for policy in ("always", "never"):
        with Log.open(str(tmp_path / policy), LogConfig(fsync_policy=policy)) as log:
            result = log.append(_batches(BATCHES))
            assert (result.first_offset, result.last_offset) == (0, BATCHES - 1)
            log.append(_batches(1))  # still writable
            records = decode_batches(log.read_bytes(0, 1 << 24))
            assert [record.value for record in records] == [f"v{n}".encode() for n in range(BATCHES)] + [b"v0"]


def test_a_produce_of_more_batches_than_iov_max_is_accepted(broker):
    with Client(broker.address) as client:
        client.create_topic("many")
        response = client.produce_batch("many", 0, _batches(BATCHES))
        assert (response.base_offset, response.last_offset) == (0, BATCHES - 1)
        assert client.produce("many", b"after", partition=0) == (0, BATCHES)
