"""The client core (broker/client/core.py): the typed call the client's parts use."""

from __future__ import annotations

import asyncio

import pytest

from nodi.broker import AsyncClient
from nodi.broker.client.core import AsyncClientCore
from nodi.broker.client.errors import ProtocolViolation, UnknownTopic
from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode


class _AnswersWith:
    """A connection that answers every request with `response`."""

    def __init__(self, response: m.Response) -> None:
        self.response = response
        self.requests: list[m.Request] = []

    async def request(self, message: m.Request, records=None) -> m.Response:
        self.requests.append(message)
        return self.response


def _call(response: m.Response, expect: type[m.Response]):
    async def run():
        connection = _AnswersWith(response)

        async def connect():
            return connection

        core = AsyncClientCore(AsyncClient("127.0.0.1:1"), connect)
        return await core.call(m.ListTopicsRequest(), 1_000, expect=expect)

    return asyncio.run(run())


def test_a_call_returns_the_response_of_the_type_it_expects():
    response = m.ListTopicsResponse(topics=[])
    assert _call(response, m.ListTopicsResponse) is response


def test_a_response_of_another_type_is_a_protocol_violation_not_an_attribute_error():
    with pytest.raises(ProtocolViolation) as raised:
        _call(m.DeleteTopicResponse(), m.ListTopicsResponse)
    assert raised.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert "ListTopicsResponse" in str(raised.value) and "DeleteTopicResponse" in str(raised.value)


def test_an_error_code_raises_its_error_before_the_type_is_looked_at():
    with pytest.raises(UnknownTopic):
        _call(m.ErrorResponse(error_code=ErrorCode.UNKNOWN_TOPIC, error_message="no such topic"), m.ListTopicsResponse)
    with pytest.raises(UnknownTopic):
        _call(m.ListTopicsResponse(error_code=ErrorCode.UNKNOWN_TOPIC, topics=[]), m.ListTopicsResponse)
