"""Request-reply against a real `nodi serve`: requests on a topic, responders in a queue
group, replies through the requester's in-memory inbox matched by correlation id."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nodi.broker import AsyncClient, Client
from nodi.broker.client.errors import InvalidRecords, RequestTimeout, UnknownInbox
from nodi.broker.client.request import requester_of
from nodi.broker.protocol import messages as m
from nodi.broker.protocol.headers import CORRELATION_ID, REPLY_TO

WAIT_MS = 20_000


def start_responders(address: str, topic: str, count: int, stop: threading.Event) -> list[threading.Thread]:
    def respond() -> None:
        with Client(address) as client, client.queue(topic, "responders", batch_max=10) as queue:
            while not stop.is_set():
                message = queue.receive(timeout_ms=200)
                if message is None:
                    continue
                assert message.value is not None  # every request of these tests has a value
                assert message.reply(b"re:" + message.value, headers={"served-by": b"responder"})
                message.ack(wait=False)
            queue.flush()

    threads = [threading.Thread(target=respond, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_fifty_concurrent_requests_each_get_their_own_reply(broker) -> None:
    with Client(broker.address) as client:
        client.create_topic("rpc", partitions=2)
    stop = threading.Event()
    threads = start_responders(broker.address, "rpc", 2, stop)
    try:

        async def main() -> list:
            async with AsyncClient(broker.address) as client:
                requests = [client.request("rpc", b"question-%d" % index, timeout_ms=WAIT_MS) for index in range(50)]
                return await asyncio.gather(*requests)

        replies = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert [reply.value for reply in replies] == [b"re:question-%d" % index for index in range(50)]
    assert all(reply.header("served-by") == b"responder" for reply in replies)
    assert len({reply.header(CORRELATION_ID) for reply in replies}) == 50


def test_a_request_without_a_reply_times_out_and_a_late_reply_is_dropped(broker) -> None:
    with Client(broker.address) as client:
        client.create_topic("slow")
        with pytest.raises(RequestTimeout) as raised:
            client.request("slow", b"anyone?", timeout_ms=300)
        assert "within 300 ms" in str(raised.value)
        stop = threading.Event()
        threads = start_responders(broker.address, "slow", 1, stop)
        try:
            reply = client.request("slow", b"second", timeout_ms=WAIT_MS)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert reply.value == b"re:second"  # not the first request's late answer
        assert requester_of(client._async).replies_dropped == 1
        # The request itself carried the reserved headers.
        (first, second) = client.fetch("slow", 0, 0)
        assert first.header(REPLY_TO) == second.header(REPLY_TO) is not None


def test_a_reply_to_a_closed_inbox_is_dropped_and_a_lost_inbox_is_reported(broker) -> None:
    def call(client, request, records=None):
        return client._run(client._async._call(request, None, records=records), None)

    from nodi.storage.records import NewRecord, build_batch

    with Client(broker.address) as client:
        inbox = call(client, m.InboxOpenRequest()).inbox
        assert inbox.startswith("inbox.")
        batch = build_batch([NewRecord(None, b"answer", [(CORRELATION_ID, b"x")])])
        assert call(client, m.ReplyRequest(inbox=inbox, records=b""), batch).delivered
        received = call(client, m.InboxReceiveRequest(inbox=inbox, wait_ms=0))
        assert bytes(received.records) == batch
        call(client, m.InboxCloseRequest(inbox=inbox))
        assert not call(client, m.ReplyRequest(inbox=inbox, records=b""), batch).delivered
        with pytest.raises(UnknownInbox):
            call(client, m.InboxReceiveRequest(inbox=inbox, wait_ms=0))
        with pytest.raises(InvalidRecords):  # not a record batch
            call(client, m.ReplyRequest(inbox=inbox, records=b""), b"garbage")
        client.create_topic("plain")
        client.produce("plain", b"not a request", partition=0)
        with client.queue("plain", "g") as queue:
            message = queue.receive(timeout_ms=WAIT_MS)
            assert message is not None
            with pytest.raises(ValueError):
                message.reply(b"to whom?")
            message.ack()
