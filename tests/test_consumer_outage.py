"""A stream consumer across a broker outage: polls during the outage return nothing
(no exception, one warning per partition, retries backing off), and once a broker is
back on the same address the consumer carries on from where it was, losing nothing."""

from __future__ import annotations

import logging
import time

from nodi.broker import Client


def test_a_consumer_carries_on_after_the_broker_comes_back(broker_factory, tmp_path, caplog):
    data_dir = str(tmp_path / "data")
    first = broker_factory(data_dir).start()
    with Client(first.address, timeout_ms=2_000) as client:
        client.create_topic("outage", 2)
        for number in range(10):
            client.produce("outage", f"before-{number}", partition=number % 2)
        consumer = client.consumer("outage", start="earliest", wait_ms=200)
        seen = []
        deadline = time.monotonic() + 30
        while len(seen) < 10 and time.monotonic() < deadline:
            seen.extend(consumer.poll(timeout_ms=1_000))
        assert len(seen) == 10

        caplog.set_level(logging.DEBUG, logger="nodi.client")
        first.kill()
        # The outage lasts until some partition's fetch has failed twice in a row (the
        # second failure is the one that must not warn again), at most 30 s.
        outage_ends = time.monotonic() + 30
        while time.monotonic() < outage_ends and not any(r.levelno == logging.DEBUG for r in _retries(caplog)):
            assert consumer.poll(timeout_ms=500) == []

        second = broker_factory(data_dir)
        second.port = first.port
        second.start()
        with Client(second.address) as producer_client:
            for number in range(10):
                producer_client.produce("outage", f"after-{number}", partition=number % 2)
        deadline = time.monotonic() + 60
        while len(seen) < 20 and time.monotonic() < deadline:
            seen.extend(consumer.poll(timeout_ms=1_000))
        consumer.close()

    for partition in (0, 1):
        values = [message.value.decode() for message in seen if message.partition == partition]
        assert values == [f"before-{n}" for n in range(partition, 10, 2)] + [
            f"after-{n}" for n in range(partition, 10, 2)
        ]
    retries = _retries(caplog)
    warnings = [record for record in retries if record.levelno == logging.WARNING]
    assert len(retries) > len(warnings)  # the later failures of the outage went to debug
    assert sorted(record.getMessage().split()[2] for record in warnings) == ["outage-0", "outage-1"]


def _retries(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if "retrying with backoff" in record.getMessage()]
