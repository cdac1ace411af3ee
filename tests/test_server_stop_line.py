"""The broker logs one line when it stops: why (the signal's name, or the fatal error),
how long the shutdown took, and clean or not (issue 11)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal

import pytest

from nodi.broker import Client
from nodi.broker.server.config import ServerConfig
from nodi.broker.server.server import Server

STOP_LINE = re.compile(r"nodi stopped: (?P<reason>.+); shutdown took (?P<ms>\d+) ms; (?P<outcome>.+)")


def _stop_lines(output: list[str]) -> list[re.Match]:
    return [found for line in output if (found := STOP_LINE.search(line))]


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stop_logs_the_signal_the_time_and_clean(broker_factory, signal_number):
    server = broker_factory().start()
    with Client(server.address) as client:
        client.create_topic("stop-line", 1)
        client.produce("stop-line", b"x")
    os.kill(server.process.pid, signal_number)
    assert server.process.wait(timeout=30) == 0
    server.output.extend(server.process.stdout.read().splitlines(keepends=True))
    server.process.stdout.close()
    server.process = None
    lines = _stop_lines(server.output)
    assert len(lines) == 1, server.output
    assert lines[0]["reason"] == signal.Signals(signal_number).name
    assert lines[0]["outcome"] == "clean"
    assert int(lines[0]["ms"]) >= 0


def test_a_fatal_error_logs_the_error_and_not_clean(tmp_path, monkeypatch, caplog):
    """A task of the server failing ends it: the line names the error, says not clean,
    and the error still reaches the caller."""

    async def failing_retention_job(self) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("retention job broke")

    monkeypatch.setattr(Server, "_retention_job", failing_retention_job)
    config = ServerConfig(data_dir=str(tmp_path / "data"), port=0, metrics_port=-1)
    caplog.set_level(logging.INFO, logger="nodi.server")
    with pytest.raises(BaseExceptionGroup) as raised:
        asyncio.run(asyncio.wait_for(Server(config).run(), 30))
    assert raised.group_contains(RuntimeError, match="retention job broke")
    lines = [record for record in caplog.records if record.getMessage().startswith("nodi stopped:")]
    assert len(lines) == 1
    found = STOP_LINE.search(lines[0].getMessage())
    assert found["reason"] == "fatal error RuntimeError: retention job broke"
    assert found["outcome"] == "not clean"
    assert lines[0].levelno == logging.ERROR and lines[0].clean is False
