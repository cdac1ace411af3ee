"""StoredBatch.record_positions finds a uniform batch's records by stride
(queue_batches._stride_positions): the positions must be exactly those of the walk of
every record's length, and a batch not laid out at strides falls back to that walk."""

from __future__ import annotations

import pytest

from nodi.broker.server.queue_batches import StoredBatch, _stride_positions, _walk_lengths
from nodi.storage.records import NewRecord, build_batch, iter_batches


def stored(records: list[NewRecord]) -> StoredBatch:
    [(header, data)] = list(iter_batches(build_batch(records, base_timestamp=1_000)))
    return StoredBatch(header, bytes(data))


UNIFORM_CASES = [
    (count, value_bytes)
    for count in (1, 2, 63, 64, 65, 200, 8_192, 8_300)
    for value_bytes in (0, 10, 100, 1_024)
    if count < 1_000 or value_bytes <= 10  # within the default batch limit
]


@pytest.mark.parametrize(("count", "value_bytes"), UNIFORM_CASES)
def test_a_uniform_batch_is_cut_at_strides_where_the_walk_cuts_it(count: int, value_bytes: int) -> None:
    batch = stored([NewRecord(None, bytes([7]) * value_bytes, (), 1_000) for _ in range(count)])
    walked = _walk_lengths(batch.data, count)
    assert walked
    assert _stride_positions(batch.data, count) == walked
    assert batch.record_positions() == walked


@pytest.mark.parametrize(
    "values",
    [
        [b"a", b"bb", b"a"],  # a record of another length in the middle
        [b"a"] * 10 + [b"bbbbbb"],  # the last one longer
        [b"x" * 130] + [b"y"] * 70,  # a first length varint of two bytes, then one
        [b"a", b"", b"aa", b"a"],  # lengths that add up to four of the first's
    ],
)
def test_a_batch_not_at_strides_is_walked(values: list[bytes]) -> None:
    batch = stored([NewRecord(None, value, (), 1_000) for value in values])
    walked = _walk_lengths(batch.data, len(values))
    assert walked
    assert _stride_positions(batch.data, len(values)) == []
    assert batch.record_positions() == walked


def test_timestamps_of_growing_width_are_walked() -> None:
    records = [NewRecord(None, b"v", (), 1_000 + 40 * index) for index in range(10)]  # deltas past 63 from the 2nd
    batch = stored(records)
    walked = _walk_lengths(batch.data, 10)
    assert batch.record_positions() == walked
