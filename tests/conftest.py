"""Shared fixtures: a real `nodi serve` process on 127.0.0.1, an ephemeral port and a
temporary data directory, stopped by its pid."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from nodi.broker.server.clock import TEST_CLOCK_ALLOWED_ENV, TEST_CLOCK_FILE_ENV

NODI = [sys.executable, "-m", "nodi.cli.main"]
READY = re.compile(r"nodi listening on ([\d.]+):(\d+)")
METRICS = re.compile(r"nodi metrics on https?://[\d.]+:(\d+)/metrics")
START_TIMEOUT_S = 30
# Every `nodi serve` a test starts leaves the web console off (its default port, 6636,
# is one per machine); the console's tests turn it on with --console-port.
os.environ.setdefault("NODI_CONSOLE_PORT", "0")


_T = TypeVar("_T")


def received(message: _T | None) -> _T:
    """What a receive the test expects to deliver gave: fails plainly when it timed out."""
    assert message is not None, "the receive timed out"
    return message


def advance_clock_file(path: str, ms: int) -> None:
    """Add `ms` to the offset in the test clock file `path` (written whole, then renamed)."""
    assert ms >= 0
    try:
        with open(path) as file:
            offset = int(file.read().strip() or 0)
    except FileNotFoundError:
        offset = 0
    with open(path + ".new", "w") as file:
        file.write(str(offset + ms))
    os.replace(path + ".new", path)


@dataclass
class BrokerProcess:
    """A `nodi serve` child process. start() waits for its 'listening' line."""

    data_dir: str
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    host: str = "127.0.0.1"
    port: int = 0
    metrics: bool = False
    metrics_port: int | None = None
    output: list[str] = field(default_factory=list)
    # RLIMIT_NOFILE (soft and hard) of the child, when set: `ulimit -n` in its process.
    files_limit: int | None = None
    environment: dict[str, str] = field(default_factory=dict)
    # The test-only clock (broker/server/clock.py, FileClock): when set, the server reads
    # its time as the real clock plus the offset in this file, moved by advance_clock().
    clock_file: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def advance_clock(self, ms: int) -> None:
        """Move the server's clock forward by `ms` (instead of sleeping for a TTL, a
        dedup window or a lease); the file is replaced whole, so no read sees half of it.
        Timers that compare deadlines notice within their round (at most 0.5 s)."""
        assert self.clock_file is not None, "start the server with clock_file set"
        advance_clock_file(self.clock_file, ms)

    def start(self) -> BrokerProcess:
        metrics_port = "0" if self.metrics else "-1"
        command = NODI + [
            "serve",
            "--data-dir",
            self.data_dir,
            "--port",
            str(self.port or 0),
            "--metrics-port",
            metrics_port,
        ]
        self.process = subprocess.Popen(
            command + self.extra_args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self._clock_environment(), **self.environment},
            preexec_fn=None if self.files_limit is None else self._limit_files,
        )
        assert self.process.stdout is not None  # stdout=PIPE
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.output.append(line)
            metrics = METRICS.search(line)
            if metrics:
                self.metrics_port = int(metrics.group(1))
                return self
            found = READY.search(line)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                if not self.metrics:
                    return self
        self.kill()
        raise RuntimeError("nodi serve did not start:\n" + "".join(self.output))

    def _clock_environment(self) -> dict[str, str]:
        if self.clock_file is None:
            return {}
        return {TEST_CLOCK_FILE_ENV: self.clock_file, TEST_CLOCK_ALLOWED_ENV: "1"}

    def _limit_files(self) -> None:  # in the child, before exec
        assert self.files_limit is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.files_limit, self.files_limit))

    def stop(self, timeout_s: float = 15) -> int:
        """SIGTERM by pid, then wait: a clean shutdown."""
        if self.process is None:
            return 0
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # Ask for every thread's stack (SIGUSR1, faulthandler) before the kill, and
            # show it with the broker's last output: a stop that hangs should say where.
            os.kill(self.process.pid, signal.SIGUSR1)
            time.sleep(1)
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
            assert self.process.stdout is not None  # stdout=PIPE
            tail = self.process.stdout.read()[-20_000:]
            self.process.stdout.close()
            self.process = None
            raise AssertionError(
                f"nodi serve did not stop within {timeout_s} s of SIGTERM; its last output and stacks:\n{tail}"
            ) from None
        assert self.process.stdout is not None  # stdout=PIPE
        self.output.extend(self.process.stdout.read().splitlines(keepends=True))
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL by pid: a crash."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
            assert self.process.stdout is not None  # stdout=PIPE
            self.process.stdout.close()
            self.process = None


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """One `nodi serve` for a whole test module (its tests use topics of their own)."""
    name = request.module.__name__.rpartition(".")[2]
    process = BrokerProcess(str(tmp_path_factory.mktemp(name) / "data")).start()
    yield process
    if process.process is not None:
        process.stop()


@pytest.fixture
def broker(tmp_path):
    process = BrokerProcess(str(tmp_path / "data")).start()
    yield process
    if process.process is not None:
        process.stop()


@pytest.fixture
def clocked_broker(tmp_path):
    """A `nodi serve` on the test-only clock: advance_clock(ms) instead of sleeping."""
    process = BrokerProcess(str(tmp_path / "data"), clock_file=str(tmp_path / "clock")).start()
    yield process
    if process.process is not None:
        process.stop()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    started: list[BrokerProcess] = []

    def make(data_dir: str | None = None, extra_args: list[str] | None = None) -> BrokerProcess:
        process = BrokerProcess(data_dir or str(tmp_path / f"data{len(started)}"), extra_args or [])
        started.append(process)
        return process

    yield make
    for process in started:
        if process.process is not None:
            process.kill()
