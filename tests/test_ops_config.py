"""Server settings (broker/server/config.py): every setting from TOML and from a NODI_*
variable, the precedence defaults < file < environment < flags, `nodi serve
--print-config`, and the structured logs of `nodi serve --log-json`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess

import pytest

from nodi.broker.server.config import (
    _SIMPLE,
    SECTIONS,
    ServerConfig,
    environment_variable,
    load_config,
    unknown_environment_variables,
)
from nodi.broker.server.logs import JsonFormatter, configure_logging
from nodi.storage.errors import InvalidConfigError

from conftest import NODI, BrokerProcess


def _changed(value):
    """A valid setting value different from the default `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if value is None:
        return 12345
    return value


SERVER_VALUES = {"data_dir": "/srv/nodi", "host": "0.0.0.0", "log_level": "debug", "cleanup_policy": "compact"}


def _server_setting(name, default):
    return SERVER_VALUES.get(name, _changed(default))


def _table_value(section, name, default):
    if section == "topic_defaults" and name == "cleanup_policy":
        return "compact"
    if section == "topic_defaults" and name == "fsync_policy":
        return "interval"
    if section == "protocol" and name == "receive_buffer_bytes_max":
        return default + 1
    if section == "protocol" and name == "frame_bytes_max":
        return default - 1
    if section == "groups" and name == "session_timeout_ms_min":
        return default + 1
    return _changed(default)


def _every_setting():
    """(section or None, name, a non-default value) for every setting."""
    defaults = ServerConfig()
    for name in _SIMPLE:
        yield None, name, _server_setting(name, getattr(defaults, name))
    for section in SECTIONS:
        table = getattr(defaults, section)
        for field in dataclasses.fields(table):
            yield section, field.name, _table_value(section, field.name, getattr(table, field.name))


def _value_of(config, section, name):
    return getattr(config if section is None else getattr(config, section), name)


def _toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def test_every_setting_from_toml(tmp_path) -> None:
    settings = list(_every_setting())
    lines: dict[str, list[str]] = {}
    for section, name, value in settings:
        lines.setdefault(section or "server", []).append(f"{name} = {_toml_literal(value)}")
    path = tmp_path / "nodi.toml"
    path.write_text("".join(f"[{table}]\n" + "\n".join(body) + "\n" for table, body in lines.items()))
    config = load_config(str(path), environment={})
    for section, name, value in settings:
        assert _value_of(config, section, name) == value, (section, name)


def test_every_setting_from_environment():
    settings = list(_every_setting())
    environment = {environment_variable(name, section): str(value) for section, name, value in settings}
    assert "NODI_TOPIC_DEFAULTS_RETENTION_MS" in environment and "NODI_PROTOCOL_FRAME_BYTES_MAX" in environment
    config = load_config(environment=environment)
    for section, name, value in settings:
        assert _value_of(config, section, name) == value, (section, name)


def test_environment_spellings():
    config = load_config(
        environment={
            "NODI_LOG_JSON": "yes",
            "NODI_TOPIC_DEFAULTS_RETENTION_MS": "none",
            "NODI_TOPIC_DEFAULTS_RETENTION_BYTES": "1000",
        }
    )
    assert config.log_json is True
    assert config.topic_defaults.retention_ms is None and config.topic_defaults.retention_bytes == 1000
    assert load_config(environment={"NODI_LOG_JSON": "off"}).log_json is False
    for bad in (
        {"NODI_LOG_JSON": "maybe"},
        {"NODI_PORT": "many"},
        {"NODI_PROTOCOL_FRAME_BYTES_MAX": "none"},
        {"NODI_LOG_LEVEL": "loud"},
        {"NODI_GROUPS_GROUPS_MAX": "0"},
        {"NODI_METRICS_PARTITION_SERIES_MAX": "-1"},
    ):
        with pytest.raises(InvalidConfigError):
            load_config(environment=bad)


def test_precedence_defaults_file_environment_flags(tmp_path):
    path = tmp_path / "nodi.toml"
    path.write_text(
        "[server]\nport = 7001\nconnections_max = 50\nidle_timeout_ms = 9000\n"
        "[topic_defaults]\npartitions = 3\nsegment_ms = 1000\n"
    )
    environment = {"NODI_PORT": "7002", "NODI_CONNECTIONS_MAX": "60", "NODI_TOPIC_DEFAULTS_PARTITIONS": "4"}
    config = load_config(str(path), environment=environment, port=7003, host=None)
    assert config.port == 7003  # flag over environment over file
    assert config.connections_max == 60  # environment over file
    assert config.idle_timeout_ms == 9000  # file over default
    assert config.topic_defaults.partitions == 4 and config.topic_defaults.segment_ms == 1000
    assert config.host == ServerConfig().host  # a flag left out (None) overrides nothing
    assert config.fetch_wait_max_ms == ServerConfig().fetch_wait_max_ms


def test_unknown_keys_are_refused(tmp_path):
    for text in ("[server]\nprot = 1\n", "[groups]\nmembers_max = 1\n", "[queues_typo]\nx = 1\n"):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(InvalidConfigError):
            load_config(str(path), environment={})


def test_a_server_setting_outside_its_table_names_the_table(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("port = 7000\n")
    with pytest.raises(InvalidConfigError, match=r"port is a \[server\] setting: put it under a \[server\] table"):
        load_config(str(path), environment={})
    path.write_text("[srever]\nport = 7000\n")
    with pytest.raises(InvalidConfigError, match=r"unknown sections \['srever'\] \(the tables are \[server\]"):
        load_config(str(path), environment={})


def test_unknown_nodi_variables_are_warned_about_with_the_closest_name():
    warnings = unknown_environment_variables(
        {"NODI_PROT": "7000", "NODI_FSYNC_POLICY": "always", "NODI_PORT": "7000", "NODI_SERVER": "x:1", "HOME": "/"}
    )
    assert warnings == [
        "NODI_FSYNC_POLICY is not a nodi setting and is ignored (did you mean NODI_TOPIC_DEFAULTS_FSYNC_POLICY?)",
        "NODI_PROT is not a nodi setting and is ignored (did you mean NODI_PORT?)",
    ]
    for section in SECTIONS:  # every setting's own variable is known
        assert not unknown_environment_variables(
            {environment_variable(name.name, section): "1" for name in dataclasses.fields(SECTIONS[section])}
        )
    result = subprocess.run(
        NODI + ["serve", "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**{key: value for key, value in os.environ.items() if not key.startswith("NODI_")}, "NODI_PROT": "1"},
    )
    assert result.returncode == 0 and "warning: NODI_PROT is not a nodi setting" in result.stderr, result.stderr


def test_print_config_shows_the_effective_settings(tmp_path):
    path = tmp_path / "nodi.toml"
    path.write_text("[server]\nport = 7100\n[protocol]\narray_items_max = 77\n")
    result = subprocess.run(
        NODI
        + ["serve", "--config", str(path), "--metrics-port", "-1", "--metrics-partition-series-max", "0"]
        + ["--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **{key: value for key, value in os.environ.items() if not key.startswith("NODI_")},
            "NODI_LOG_LEVEL": "warning",
            "NODI_GROUPS_GROUPS_MAX": "9",
        },
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["port"] == 7100 and shown["metrics_port"] == -1 and shown["log_level"] == "warning"
    assert shown["metrics_partition_series_max"] == 0
    assert shown["protocol"]["array_items_max"] == 77 and shown["groups"]["groups_max"] == 9
    assert shown["topic_defaults"] == ServerConfig().topic_defaults.to_dict()
    refused = subprocess.run(
        NODI + ["serve", "--log-level", "loud", "--print-config"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2 and "log level" in refused.stderr


def test_json_formatter_fields_and_exceptions():
    record = logging.LogRecord("nodi.test", logging.WARNING, __file__, 1, "lost %d offsets", (3,), None)
    record.topic = "orders"
    record.partition = 2
    document = json.loads(JsonFormatter().format(record))
    assert document["level"] == "warning" and document["logger"] == "nodi.test"
    assert document["message"] == "lost 3 offsets" and document["topic"] == "orders" and document["partition"] == 2
    assert document["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("nodi.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exception"]


def test_configure_logging_level_filters(capsys):
    import io

    stream = io.StringIO()
    configure_logging("warning", json_lines=True, stream=stream)
    try:
        logging.getLogger("nodi.test").info("quiet")
        logging.getLogger("nodi.test").warning("heard", extra={"segments": 2})
    finally:
        configure_logging("warning", stream=io.StringIO())
        logging.getLogger().handlers.clear()
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["heard"]
    assert json.loads(lines[0])["segments"] == 2


def test_serve_log_json_lines_parse(tmp_path):
    broker = BrokerProcess(str(tmp_path / "data"), ["--log-json", "--log-level", "debug"], metrics=True).start()
    try:
        from nodi.broker import Client

        with Client(broker.address, timeout_ms=30_000) as client:
            client.create_topic("logged")
            client.produce("logged", b"x")
    finally:
        assert broker.stop() == 0
    json_lines = [line for line in broker.output if line.startswith("{")]
    assert json_lines, broker.output
    for line in json_lines:
        document = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(document), document
    messages = [json.loads(line)["message"] for line in json_lines]
    assert any("metrics on http://" in message for message in messages)
    levels = {json.loads(line)["level"] for line in json_lines}
    assert levels <= {"debug", "info", "warning", "error", "critical"}
    # Everything else on the output is the documented ready lines.
    others = [line for line in broker.output if not line.startswith("{") and line.strip()]
    assert all(line.startswith("nodi ") for line in others), others


def _read_terminal(master: int, timeout_s: float = 60) -> bytes:
    import select
    import time

    output = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if not ready:
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        output += chunk
    return output


def test_long_operations_show_progress_on_a_terminal_only(tmp_path):
    """`nodi segments verify` and `recover` draw a progress bar on stderr when it is a
    terminal, and print none into a pipe."""
    import pty

    from nodi.storage.metadata import TopicConfig
    from nodi.storage.records import build_batch, make_records
    from nodi.storage.store import Store

    data_dir = tmp_path / "data"
    store = Store.open(str(data_dir))
    try:
        store.create_topic("big", TopicConfig(fsync_policy="never"))
        partition_log = store.log("big", 0)
        for _ in range(60):  # about 6 MiB: more than one progress step (4 MiB)
            partition_log.append(build_batch(make_records([os.urandom(1000)] * 100)))
    finally:
        store.close()
    for command in ("verify", "recover"):
        master, child = pty.openpty()
        process = subprocess.Popen(
            NODI + ["segments", command, str(data_dir)], stdout=subprocess.PIPE, stderr=child, stdin=subprocess.DEVNULL
        )
        os.close(child)
        try:
            terminal = _read_terminal(master)
            assert process.wait(timeout=60) == 0
        finally:
            os.close(master)
        label = "verifying" if command == "verify" else "recovering"
        assert label.encode() in terminal and b"100%" in terminal, terminal
        piped = subprocess.run(NODI + ["segments", command, str(data_dir)], capture_output=True, timeout=60)
        assert piped.returncode == 0 and label.encode() not in piped.stderr
