"""The broker's injectable clock (broker/server/clock.py): the manual clock moves only
forward; the test-only file clock is refused unless explicitly allowed, and a malformed
offset file is refused at start; an embedded broker on a ManualClock runs out a delay, a
dedup window and a lease when the clock is advanced, with no sleeping for them. No
timing is asserted."""

from __future__ import annotations

import os
import subprocess

import pytest

import nodi.broker
from nodi.broker.server.clock import (
    SYSTEM_CLOCK,
    TEST_CLOCK_ALLOWED_ENV,
    TEST_CLOCK_FILE_ENV,
    FileClock,
    ManualClock,
    TestClockRefusedError,
    clock_from_environment,
)

from conftest import NODI, advance_clock_file

WAIT_MS = 20_000
HOUR_MS = 3_600_000


def test_the_manual_clock_moves_forward_only_when_told() -> None:
    clock = ManualClock()
    before = clock.time_ms()
    clock.advance(HOUR_MS)
    assert clock.offset_ms == HOUR_MS and clock.time_ms() >= before + HOUR_MS
    assert clock.monotonic() >= SYSTEM_CLOCK.monotonic() + HOUR_MS / 1000 - 1
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)
    assert clock.offset_ms == HOUR_MS


def test_the_file_clock_reads_the_offset_and_never_goes_back(tmp_path) -> None:
    path = str(tmp_path / "clock")
    clock = FileClock(path)
    clock.check()  # missing: offset 0
    before = SYSTEM_CLOCK.time_ms()
    advance_clock_file(path, HOUR_MS)
    assert clock.time_ms() >= before + HOUR_MS
    with open(path, "w") as file:
        file.write("5")  # smaller than the offset already seen
    assert clock.time_ms() >= before + HOUR_MS
    with open(path, "w") as file:
        file.write("soon")
    assert clock.time_ms() >= before + HOUR_MS  # running: the last offset stays
    with pytest.raises(TestClockRefusedError, match="not an offset"):
        clock.check()
    with pytest.raises(TestClockRefusedError, match="not an offset"):
        clock_from_environment({TEST_CLOCK_FILE_ENV: path, TEST_CLOCK_ALLOWED_ENV: "1"})


def test_the_file_clock_is_refused_unless_explicitly_allowed(tmp_path) -> None:
    path = str(tmp_path / "clock")
    assert clock_from_environment({}) is SYSTEM_CLOCK
    for allowed in ({}, {TEST_CLOCK_ALLOWED_ENV: "yes"}):
        with pytest.raises(TestClockRefusedError, match="for tests only"):
            clock_from_environment({TEST_CLOCK_FILE_ENV: path, **allowed})
    assert isinstance(clock_from_environment({TEST_CLOCK_FILE_ENV: path, TEST_CLOCK_ALLOWED_ENV: "1"}), FileClock)


def test_nodi_serve_refuses_the_file_clock_without_the_allow_variable(tmp_path) -> None:
    environment = {k: v for k, v in os.environ.items() if k != TEST_CLOCK_ALLOWED_ENV}
    environment[TEST_CLOCK_FILE_ENV] = str(tmp_path / "clock")
    data_dir = tmp_path / "data"
    finished = subprocess.run(
        [*NODI, "serve", "--data-dir", str(data_dir), "--port", "0", "--metrics-port", "-1"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 1
    assert "for tests only" in finished.stderr
    assert not data_dir.exists()  # refused before the data directory was touched


@pytest.fixture
def embedded(tmp_path):
    clock = ManualClock()
    with nodi.broker.open(tmp_path / "data", clock=clock, attach=False) as client:
        yield client, clock


def test_an_embedded_broker_delivers_a_delayed_message_once_the_clock_reaches_it(embedded) -> None:
    client, clock = embedded
    client.create_topic("later")
    client.produce("later", b"delayed", partition=0, delay_ms=HOUR_MS)
    with client.queue("later", "g") as queue:
        assert queue.receive(timeout_ms=300) is None  # not due
        clock.advance(HOUR_MS)
        delayed = queue.receive(timeout_ms=WAIT_MS)
        assert delayed is not None and delayed.value == b"delayed"
        assert clock.time_ms() >= delayed.timestamp + HOUR_MS
        delayed.ack()


def test_an_embedded_broker_forgets_a_key_once_the_clock_passes_its_window(embedded) -> None:
    client, clock = embedded
    client.create_topic("keyed", dedup_window_ms=HOUR_MS)
    first = client.produce("keyed", b"1", idempotency_key="k")
    assert client.produce("keyed", b"again", idempotency_key="k") == first  # within the window
    clock.advance(2 * HOUR_MS)
    second = client.produce("keyed", b"2", idempotency_key="k")
    assert second == (first[0], first[1] + 1)


def test_an_embedded_broker_runs_a_lease_out_once_the_clock_passes_it(embedded) -> None:
    client, clock = embedded
    client.create_topic("jobs")
    client.produce("jobs", b"held", partition=0)
    with client.queue("jobs", "g", ack_wait_ms=HOUR_MS, max_lease_ms=0, batch_max=1, prefetch=False) as queue:
        held = queue.receive(timeout_ms=WAIT_MS)
        assert held is not None and held.delivery_count == 1
        assert queue.receive(timeout_ms=300) is None  # leased to us
        clock.advance(HOUR_MS + 1_000)
        again = queue.receive(timeout_ms=WAIT_MS)
        assert again is not None and (again.offset, again.delivery_count) == (held.offset, 2)
        again.ack()
    assert client.describe_queue("jobs", "g").expired_leases == 1
