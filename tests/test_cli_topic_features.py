"""`nodi topic create --ttl-ms / --dedup-window-ms` and their describe output, and
`nodi produce` refusing a hand-made reserved header, run as the real command against a
real server."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from nodi.broker import Client

from conftest import NODI

ENVIRONMENT = {**os.environ, "COLUMNS": "200"}
ENVIRONMENT.pop("NODI_SERVER", None)


@pytest.fixture(scope="module")
def broker(server):
    """The module's one server (conftest.server) for every test here."""
    return server


def nodi(broker, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        NODI + ["--server", broker.address, *args], capture_output=True, text=True, timeout=60, env=ENVIRONMENT
    )


def test_topic_settings_for_ttl_and_dedup(broker):
    created = nodi(broker, "topic", "create", "short", "--ttl-ms", "500", "--dedup-window-ms", "0", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["ttl_ms"] == 500 and json.loads(created.stdout)["dedup_window_ms"] == 0
    described = nodi(broker, "topic", "describe", "short")
    assert described.returncode == 0, described.stderr
    lines = {line.split()[0]: line.split()[1] for line in described.stdout.splitlines()[1:] if len(line.split()) == 2}
    assert lines["ttl_ms"] == "500" and lines["dedup_window_ms"] == "0"
    defaults = nodi(broker, "topic", "create", "plain", "--json")
    assert json.loads(defaults.stdout)["ttl_ms"] == 0 and json.loads(defaults.stdout)["dedup_window_ms"] == 120_000


def test_produce_refuses_a_reserved_header(broker):
    with Client(broker.address) as client:
        client.create_topic("guarded")
        refused = nodi(broker, "produce", "guarded", "x", "--header", "nodi-ttl-ms=5")
        assert refused.returncode == 2 and "reserved" in refused.stderr
        assert client.fetch("guarded", 0, 0) == []


def test_consume_skips_expired_messages_unless_asked(broker):
    with Client(broker.address) as client:
        client.create_topic("fading")
        client.produce("fading", b"gone", ttl_ms=1, timestamp=1_000)  # expired long ago
        client.produce("fading", b"here")
    default = nodi(broker, "consume", "fading", "--timeout-ms", "1000")
    assert default.returncode == 0 and default.stdout.splitlines() == ["here"]
    everything = nodi(broker, "consume", "fading", "--timeout-ms", "1000", "--include-expired")
    assert everything.stdout.splitlines() == ["gone", "here"]


def test_produce_with_ttl_and_idempotency_key(broker):
    with Client(broker.address) as client:
        client.create_topic("once")
        first = nodi(broker, "produce", "once", "v", "--idempotency-key", "k-1", "--ttl-ms", "3600000")
        again = nodi(broker, "produce", "once", "v", "--idempotency-key", "k-1")
        assert first.returncode == 0 and first.stdout == again.stdout == "partition 0 offset 0\n"
        [message] = client.fetch("once", 0, 0)
        assert message.expires_at_ms == message.timestamp + 3_600_000
        lines = subprocess.run(
            NODI + ["--server", broker.address, "produce", "once", "--idempotency-key", "k"],
            input="a\n",
            capture_output=True,
            text=True,
            timeout=60,
            env=ENVIRONMENT,
        )
        assert lines.returncode == 2 and "needs a VALUE" in lines.stderr
