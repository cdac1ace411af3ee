"""Produce refuses every kind of lying batch (issue 8 item 1), against a real server
process: each refused with INVALID_RECORDS naming the record and the field, nothing of
the request stored, the connection open, and the good batches around it served."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodi.broker import Client
from nodi.broker.client.errors import InvalidRecords
from nodi.broker.protocol.errors import ErrorCode

from lying_batches import good_batch, lying_batches

LIES = lying_batches()
_topics = itertools.count()

# A step: ("good", values) produced alone, or ("lie", name, values) a lying batch sent
# alone or after good ones in the same request (nothing of which may be written).
steps = st.lists(
    st.one_of(
        st.tuples(st.just("good"), st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=5)),
        st.tuples(
            st.just("lie"), st.sampled_from(sorted(LIES)), st.lists(st.binary(min_size=1, max_size=30), max_size=3)
        ),
    ),
    min_size=1,
    max_size=6,
)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address) as connected:
        yield connected


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=steps)
def test_lying_batches_are_refused_and_good_ones_served(client, plan) -> None:
    topic = f"walk-{next(_topics)}"
    client.create_topic(topic, partitions=1)
    accepted: list[bytes] = []
    for step in plan:
        if step[0] == "good":
            client.produce_batch(topic, 0, good_batch(step[1]))
            accepted.extend(step[1])
            continue
        _, name, before = step
        lie, index, field = LIES[name]
        request = (good_batch(before) if before else b"") + lie
        with pytest.raises(InvalidRecords) as refused:
            client.produce_batch(topic, 0, request)
        assert refused.value.code is ErrorCode.INVALID_RECORDS, refused.value
        message = str(refused.value)
        assert f"batch at byte {len(request) - len(lie)}:" in message, message
        assert field in message and (index is None or f"record {index}:" in message), message
    # Nothing of a refused request was stored; the good batches were, in order; the
    # connection that sent the lies still serves.
    messages, position = client.fetch_with_position(topic, 0, 0, bytes_max=1 << 20)
    assert [message.value for message in messages] == accepted
    assert position == len(accepted)
    assert client.describe_topic(topic).partitions[0].log_end_offset == len(accepted)
    client.delete_topic(topic)


def test_every_lie_refused_on_one_connection(client):
    """Each kind once, in turn, between good batches on one connection."""
    topic = "walk-every-lie"
    client.create_topic(topic, partitions=1)
    for number, name in enumerate(sorted(LIES)):
        client.produce_batch(topic, 0, good_batch([b"before-%d" % number]))
        with pytest.raises(InvalidRecords) as refused:
            client.produce_batch(topic, 0, LIES[name][0])
        assert refused.value.code is ErrorCode.INVALID_RECORDS, (name, refused.value)
    client.produce_batch(topic, 0, good_batch([b"last"]))
    messages = client.fetch(topic, 0, 0, bytes_max=1 << 20)
    assert [message.value for message in messages] == [b"before-%d" % n for n in range(len(LIES))] + [b"last"]
