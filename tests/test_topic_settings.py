"""A topic setting is declared once (nodi.storage.topic_settings: a TopicConfig field
with setting(...)) and every other place that spells it derives from the declaration or
is checked against it here: TopicConfig's validation, defaults and stored JSON, the
wire struct (and its bytes, pinned), [topic_defaults] and NODI_TOPIC_DEFAULTS_*, the
server's CreateTopic / DescribeTopic conversions, the client's create_topic and
TopicSettings (written out for IDEs: checked), the CLI's options and the docs table.
A test-only extra setting, declared in a child process, shows up in storage, on the
wire and in the server's conversions and config without another edit."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import typer

from nodi.broker import AsyncClient, Client
from nodi.broker import TopicSettings as ClientTopicSettings
from nodi.broker.client.types import UNLIMITED, settings_from_wire, settings_to_wire
from nodi.broker.protocol import messages as m
from nodi.broker.protocol.limits import DEFAULT_PROTOCOL_LIMITS
from nodi.broker.protocol.schema import decode_body, encode_body, schema_of
from nodi.broker.server.compaction_settings import DEFAULT_COMPACTION_SETTINGS
from nodi.broker.server.config import ServerConfig, environment_variable, load_config
from nodi.cli.main import app
from nodi.storage.errors import InvalidConfigError
from nodi.storage.metadata import decode_topic_value, encode_topic_value
from nodi.storage.topic_settings import TOPIC_SETTINGS, TopicConfig, TopicSetting, render_table

DOCS = Path(__file__).resolve().parent.parent / "docs"
SETTING_IDS = [setting.name for setting in TOPIC_SETTINGS]


def _valid_value(setting: TopicSetting) -> int | str:
    """A valid value other than the default."""
    if setting.type is str:
        return next(choice for choice in setting.choices if choice != setting.default)
    return setting.low + 1 if setting.default != setting.low + 1 else setting.low


def _create_command():
    return typer.main.get_command(app).commands["topic"].commands["create"]


# ---------------------------------------------------------------------------
# Every declared setting in every place


@pytest.mark.parametrize("setting", TOPIC_SETTINGS, ids=SETTING_IDS)
def test_every_setting_is_in_topic_config_with_its_default_and_range(setting):
    assert getattr(TopicConfig(), setting.name) == setting.default
    TopicConfig().validate()
    value = _valid_value(setting)
    config = TopicConfig.from_dict({setting.name: value})
    assert getattr(config, setting.name) == value
    assert decode_topic_value("t", encode_topic_value(config)) == config  # the LMDB value
    bad = "x" if setting.type is int else "no-such-policy"
    with pytest.raises(InvalidConfigError, match=setting.name):
        TopicConfig.from_dict({setting.name: bad})
    if setting.type is int:
        for outside in (setting.low - 1, setting.high + 1):
            with pytest.raises(InvalidConfigError, match=setting.name):
                TopicConfig.from_dict({setting.name: outside})


@pytest.mark.parametrize("setting", TOPIC_SETTINGS, ids=SETTING_IDS)
def test_every_setting_is_a_wire_field_with_server_default(setting):
    fields = {field.name: field for field in schema_of(m.TopicSettings).fields}
    assert list(fields) == SETTING_IDS  # in declaration order: the wire layout
    assert fields[setting.name].type.name == setting.wire_type
    assert getattr(m.TopicSettings(), setting.name) == (None if setting.type is str else m.CONFIG_DEFAULT)
    value = _valid_value(setting)
    wire = m.TopicSettings(**{setting.name: value})
    assert decode_body(m.TopicSettings, memoryview(encode_body(wire)), DEFAULT_PROTOCOL_LIMITS) == wire


@pytest.mark.parametrize("setting", TOPIC_SETTINGS, ids=SETTING_IDS)
def test_every_setting_is_a_topic_default_in_the_server_config(setting, tmp_path):
    assert getattr(ServerConfig().topic_defaults, setting.name) == setting.default
    value = _valid_value(setting)
    path = tmp_path / "nodi.toml"
    path.write_text(f"[topic_defaults]\n{setting.name} = {json.dumps(value)}\n")
    assert getattr(load_config(str(path), environment={}).topic_defaults, setting.name) == value
    variable = environment_variable(setting.name, "topic_defaults")
    assert variable == "NODI_TOPIC_DEFAULTS_" + setting.name.upper()
    assert getattr(load_config(None, environment={variable: str(value)}).topic_defaults, setting.name) == value


@pytest.mark.parametrize("setting", TOPIC_SETTINGS, ids=SETTING_IDS)
def test_every_setting_is_a_create_topic_keyword_and_a_client_setting(setting):
    parameters = inspect.signature(AsyncClient.create_topic).parameters
    assert parameters[setting.name].annotation in (f"{setting.type.__name__} | None", setting.type.__name__)
    # None is the server's default; partitions is the one the client picks (1).
    assert parameters[setting.name].default == (1 if setting.name == "partitions" else None)
    assert inspect.signature(Client.create_topic) == inspect.signature(AsyncClient.create_topic)
    client_fields = {field.name: field for field in dataclasses.fields(ClientTopicSettings)}
    assert client_fields[setting.name].type == ("int" if setting.type is int else "str")
    default = client_fields[setting.name].default
    if default is not dataclasses.MISSING:  # the fields added after the first release have one
        expected = setting.default
        if setting.name == "delete_retention_ms":  # None stored: the server's [compaction] value
            expected = DEFAULT_COMPACTION_SETTINGS.delete_retention_ms
        assert default == expected


def test_create_topic_and_the_client_settings_list_exactly_the_declared_settings_in_order():
    """What a developer adds by hand besides the declaration (docs/development.md)."""
    keywords = [
        name
        for name in inspect.signature(AsyncClient.create_topic).parameters
        if name not in ("self", "name", "exist_ok", "timeout_ms")
    ]
    assert keywords == SETTING_IDS
    # The two keywords that are not settings come after them: every parameter, in order.
    assert list(inspect.signature(AsyncClient.create_topic).parameters) == [
        "self",
        "name",
        *SETTING_IDS,
        "exist_ok",
        "timeout_ms",
    ]
    assert inspect.signature(AsyncClient.create_topic).parameters["exist_ok"].default is False
    assert [field.name for field in dataclasses.fields(ClientTopicSettings)] == SETTING_IDS


@pytest.mark.parametrize("setting", TOPIC_SETTINGS, ids=SETTING_IDS)
def test_every_setting_is_a_topic_create_option(setting):
    options = {parameter.name: parameter for parameter in _create_command().params}
    option = options[setting.name]
    assert option.opts == ["--" + setting.name.replace("_", "-")]
    assert option.help == setting.help
    assert option.default == inspect.signature(Client.create_topic).parameters[setting.name].default
    if setting.type is int:
        assert option.min == (UNLIMITED if setting.unlimited else setting.low)
    names = [parameter.name for parameter in _create_command().params]
    assert names == ["name", *SETTING_IDS, "exist_ok", "json_output"]


def test_the_docs_table_is_rendered_from_the_declaration():
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    table = render_table()
    assert table in text, f"docs/operations.md's topic settings table is stale; it reads:\n{table}"
    assert "## Adding a topic setting" in (DOCS / "development.md").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------
# Conversions, both sides


def _broker():
    from nodi.broker.server.service import Broker

    class Compaction:
        @staticmethod
        def delete_retention_ms(config: TopicConfig) -> int:
            return 86_400_000 if config.delete_retention_ms is None else config.delete_retention_ms

    broker = Broker.__new__(Broker)  # the conversions read only these two
    broker.config = ServerConfig()
    broker.compaction = Compaction()
    return broker


def test_client_arguments_to_wire_to_config_and_back():
    broker = _broker()
    arguments = {setting.name: None for setting in TOPIC_SETTINGS}
    defaults = broker._topic_config(settings_to_wire(arguments))
    assert defaults == dataclasses.replace(TopicConfig(), delete_retention_ms=86_400_000)
    for setting in TOPIC_SETTINGS:
        value = _valid_value(setting)
        config = broker._topic_config(settings_to_wire({**arguments, setting.name: value}))
        assert getattr(config, setting.name) == value
        shown = settings_from_wire(broker._settings(config))
        assert getattr(shown, setting.name) == value
        if setting.unlimited:
            config = broker._topic_config(settings_to_wire({**arguments, setting.name: UNLIMITED}))
            assert getattr(config, setting.name) is None
            assert getattr(broker._settings(config), setting.name) == m.RETENTION_UNLIMITED
            assert getattr(settings_from_wire(broker._settings(config)), setting.name) == UNLIMITED
        elif setting.type is int:
            with pytest.raises(ValueError):
                settings_to_wire({**arguments, setting.name: -1})


# The bytes of CreateTopic and its response before the settings were derived (main at
# c762031): the wire format did not change.
PINNED = {
    "default": (
        "000174" + "ff" * 72,
        "0000ffff" + "ff" * 72,
    ),
    "every setting": (
        "00017400000003fffffffffffffffe00000000000003e80007636f6d706163740008696e74657276616c00000000000000fa"
        "0000000000010000000000000036ee80000000000000ea6000000000000013880000000000000000",
        "0000ffff00000003fffffffffffffffe00000000000003e80007636f6d706163740008696e74657276616c00000000000000fa"
        "0000000000010000000000000036ee80000000000000ea6000000000000013880000000000000000",
    ),
}


def test_the_wire_bytes_are_unchanged():
    """CreateTopic version 1 (protocol versions 1-4) keeps its bytes: TopicSettingsV1."""
    samples = {
        "default": m.TopicSettingsV1(),
        "every setting": m.TopicSettingsV1(
            partitions=3,
            retention_ms=m.RETENTION_UNLIMITED,
            retention_bytes=1000,
            cleanup_policy="compact",
            fsync_policy="interval",
            fsync_interval_ms=250,
            segment_bytes=65536,
            segment_ms=3_600_000,
            ttl_ms=60_000,
            dedup_window_ms=5000,
            delete_retention_ms=0,
        ),
    }
    for label, settings in samples.items():
        request, response = PINNED[label]
        assert bytes(encode_body(m.CreateTopicRequestV1(name="t", settings=settings))).hex() == request, label
        assert bytes(encode_body(m.CreateTopicResponseV1(settings=settings))).hex() == response, label
        # version 2 (protocol version 5) is version 1 with the later settings after them:
        # timestamp_type, a nullable string (null; "log-append")
        full = m.topic_settings_from_v1(settings)
        if label == "every setting":
            full = dataclasses.replace(full, timestamp_type="log-append")
        added = {"default": "ffff", "every setting": "000a" + b"log-append".hex()}[label]
        assert bytes(encode_body(m.CreateTopicRequest(name="t", settings=full))).hex() == request + added, label
        assert bytes(encode_body(m.CreateTopicResponse(settings=full))).hex() == response + added, label
        assert m.topic_settings_to_v1(full) == settings


# ---------------------------------------------------------------------------
# A test-only extra setting: declared once, it reaches storage, the wire and the server

EXTRA_SETTING = textwrap.dedent("""
    import dataclasses, json, sys
    from nodi.storage import topic_settings

    @dataclasses.dataclass(frozen=True, slots=True)
    class ExtendedTopicConfig(topic_settings.TopicConfig):
        test_window_ms: int = topic_settings.setting(
            5000, low=10, high=60_000, unit="ms", wire_note="test-only window", help="A test-only window.")

    # What the module does for TopicConfig, for the extended declaration, before anything
    # that derives from it is imported.
    topic_settings.TopicConfig = ExtendedTopicConfig
    topic_settings.TOPIC_SETTINGS = topic_settings._declared_settings(ExtendedTopicConfig)
    topic_settings.TOPIC_SETTING_NAMES = tuple(s.name for s in topic_settings.TOPIC_SETTINGS)

    from nodi.broker.protocol import messages as m
    from nodi.broker.protocol.limits import DEFAULT_PROTOCOL_LIMITS
    from nodi.broker.protocol.schema import decode_body, encode_body, schema_rows
    from nodi.broker.server.config import load_config
    from nodi.broker.server.service import Broker
    from nodi.storage.errors import InvalidConfigError
    from nodi.storage.metadata import decode_topic_value, encode_topic_value

    out = {}
    config = ExtendedTopicConfig.from_dict({"test_window_ms": 20})
    out["stored"] = json.loads(encode_topic_value(config))["test_window_ms"]
    out["decoded"] = decode_topic_value("t", encode_topic_value(config)).test_window_ms
    try:
        ExtendedTopicConfig.from_dict({"test_window_ms": 5})
    except InvalidConfigError as error:
        out["refused"] = str(error)
    out["wire_row"] = [row for row in schema_rows(m.TopicSettings) if row[0] == "test_window_ms"]
    wire = m.TopicSettings(test_window_ms=30)
    out["wire_round_trip"] = decode_body(m.TopicSettings, memoryview(encode_body(wire)),
                                         DEFAULT_PROTOCOL_LIMITS).test_window_ms
    out["wire_default"] = m.TopicSettings().test_window_ms
    server_config = load_config(None, environment={"NODI_TOPIC_DEFAULTS_TEST_WINDOW_MS": "40"})
    out["topic_default"] = server_config.topic_defaults.test_window_ms

    class Compaction:
        @staticmethod
        def delete_retention_ms(config):
            return 1 if config.delete_retention_ms is None else config.delete_retention_ms

    broker = Broker.__new__(Broker)
    broker.config, broker.compaction = server_config, Compaction()
    out["created_with_default"] = broker._topic_config(m.TopicSettings()).test_window_ms
    out["created"] = broker._topic_config(m.TopicSettings(test_window_ms=50)).test_window_ms
    out["described"] = broker._settings(ExtendedTopicConfig(test_window_ms=60)).test_window_ms
    print(json.dumps(out))
""")


def test_a_test_only_setting_declared_once_reaches_storage_the_wire_and_the_server():
    result = subprocess.run([sys.executable, "-c", EXTRA_SETTING], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["stored"] == out["decoded"] == 20
    assert "test_window_ms must be an integer in [10, 60000]" in out["refused"]
    assert out["wire_row"] == [["test_window_ms", "int64", "test-only window; -1: server default"]]
    assert out["wire_round_trip"] == 30 and out["wire_default"] == m.CONFIG_DEFAULT
    assert out["topic_default"] == 40
    assert (out["created_with_default"], out["created"], out["described"]) == (40, 50, 60)
