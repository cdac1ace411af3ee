"""Group names on the wire follow the topic-name rule (broker/group_names.py): names that
would break a path, a table, a metrics label or a log line ("../../x", NUL, newlines,
spaces, non-ASCII) are refused with a typed error before anything is stored, by every
request that names a stream or queue group; valid names keep working."""

from __future__ import annotations

import pytest

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode
from nodi.storage import records

from test_server import RawClient

BAD_NAMES = ["../../x", "a/b", "a\x00b", "a\nb", "line\r", "a b", "tab\t", ".", "..", "é", "g;rm", ""]
GOOD_NAMES = ["g", "billing-v2", "a.b_c", "..x", "G" * 255]


@pytest.fixture(scope="module")
def client(server):
    raw = RawClient((server.host, server.port)).handshake()
    assert raw.call(m.CreateTopicRequest, name="names").error_code == ErrorCode.NONE
    batch = records.build_batch([records.NewRecord(None, b"v")])
    assert raw.call(m.ProduceRequest, topic="names", partition=0, records=batch).error_code == ErrorCode.NONE
    yield raw
    raw.close()


def _stream_requests(group: str) -> list[tuple[type, dict]]:
    return [
        (m.JoinGroupRequest, {"group": group, "topics": ["names"]}),
        (m.CommitOffsetsRequest, {"group": group, "offsets": [m.OffsetCommit(topic="names", partition=0, offset=1)]}),
        (m.FetchOffsetsRequest, {"group": group}),
        (m.ResetGroupRequest, {"group": group, "topic": "names", "spec": m.ResetSpec.EARLIEST}),
        (m.DescribeGroupRequest, {"group": group}),
    ]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_group_names_are_refused(client, name):
    for request_type, fields in _stream_requests(name):
        response = client.call(request_type, **fields)
        assert response.error_code == ErrorCode.INVALID_REQUEST, (request_type.__name__, name, response)
        assert "group name" in response.error_message
    response = client.call(m.QueueReceiveRequest, group=name, topic="names")
    assert response.error_code == ErrorCode.INVALID_CONFIG, (name, response)
    assert "group name" in response.error_message
    listed = client.call(m.ListGroupsRequest)
    assert name not in [summary.group for summary in listed.groups]
    queues = client.call(m.QueueListRequest)
    assert name not in [summary.group for summary in queues.groups]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_valid_group_names_keep_working(client, name):
    committed = client.call(
        m.CommitOffsetsRequest, group=name, offsets=[m.OffsetCommit(topic="names", partition=0, offset=1)]
    )
    assert committed.error_code == ErrorCode.NONE and committed.results[0].error_code == ErrorCode.NONE
    fetched = client.call(m.FetchOffsetsRequest, group=name)
    assert [(o.topic, o.partition, o.offset) for o in fetched.offsets] == [("names", 0, 1)]
    received = client.call(m.QueueReceiveRequest, group=name, topic="names", messages_max=1)
    assert received.error_code == ErrorCode.NONE and len(received.deliveries) == 1
    assert name in [summary.group for summary in client.call(m.ListGroupsRequest).groups]
