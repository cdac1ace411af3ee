"""The client core (broker/client/core.py): the typed call the client's parts use."""

from __future__ import annotations

import asyncio

import pytest

from nodi.broker import AsyncClient
from nodi.broker.client.core import AsyncClientCore
from nodi.broker.client.errors import ProtocolViolation, Timeout, UnknownTopic
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


class _NotReadyFirst:
    """A connection that answers PARTITION_NOT_READY `times` times, then `response`."""

    def __init__(self, times: int, response: m.Response) -> None:
        self.times = times
        self.response = response
        self.requests: list[m.Request] = []

    async def request(self, message: m.Request, records=None) -> m.Response:
        self.requests.append(message)
        if len(self.requests) <= self.times:
            return m.ErrorResponse(error_code=ErrorCode.PARTITION_NOT_READY, error_message="still opening")
        return self.response


def _call_not_ready_first(times: int, timeout_ms: int) -> tuple[m.Response, int]:
    async def run():
        connection = _NotReadyFirst(times, m.ListTopicsResponse(topics=[]))

        async def connect():
            return connection

        core = AsyncClientCore(AsyncClient("127.0.0.1:1"), connect)
        response = await core.call(m.ListTopicsRequest(), timeout_ms, expect=m.ListTopicsResponse)
        return response, len(connection.requests)

    return asyncio.run(run())


def test_a_partition_not_ready_answer_is_sent_again_until_the_partition_answers():
    response, sent = _call_not_ready_first(3, 10_000)
    assert response == m.ListTopicsResponse(topics=[])
    assert sent == 4


def test_a_partition_that_stays_not_ready_ends_in_the_calls_timeout():
    with pytest.raises(Timeout):
        _call_not_ready_first(10**9, 200)


def _core() -> AsyncClientCore:
    async def connect():
        raise AssertionError("no connection in these tests")

    return AsyncClientCore(AsyncClient("127.0.0.1:1", timeout_ms=50), connect)


def test_a_deadline_raises_the_clients_timeout_naming_the_call_and_its_time() -> None:
    async def run():
        core = _core()
        with pytest.raises(Timeout) as raised:
            async with core.deadline(None, "Fetch", extra_ms=20):
                await asyncio.sleep(10)
        assert str(raised.value) == "Fetch did not complete within 70 ms"
        assert raised.value.__suppress_context__
        # The task is not left cancelled: it goes on awaiting.
        assert asyncio.current_task().cancelling() == 0
        await asyncio.sleep(0)

    asyncio.run(run())


def test_a_deadline_turns_a_plain_timeout_error_of_its_block_into_the_clients_and_lets_others_through() -> None:
    async def run():
        core = _core()
        with pytest.raises(Timeout) as raised:
            async with core.deadline(1_000, "Commit"):
                raise TimeoutError("inner")
        assert str(raised.value) == "Commit did not complete within 1000 ms"
        with pytest.raises(Timeout, match="the server's own"):
            async with core.deadline(1_000, "Commit"):
                raise Timeout("the server's own")
        with pytest.raises(UnknownTopic):
            async with core.deadline(1_000, "Commit"):
                raise UnknownTopic("gone")
        async with core.deadline(1_000, "Commit"):
            await asyncio.sleep(0)
        with pytest.raises(ValueError):
            async with core.deadline(0, "Commit"):
                raise AssertionError("not reached")
        # A cancellation from outside is a cancellation, not a Timeout.
        task = asyncio.current_task()
        asyncio.get_running_loop().call_later(0.01, task.cancel)
        with pytest.raises(asyncio.CancelledError):
            async with core.deadline(1_000, "Commit"):
                await asyncio.sleep(10)
        task.uncancel()

    asyncio.run(run())
