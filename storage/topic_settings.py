"""Topic settings, declared once.

A topic setting is one field of TopicConfig below: its name and Python type are the
field's, and `setting(...)` declares the rest (default, allowed range or values, whether
None means "no limit", unit, wire type, which cleanup policies use it, help text).
TOPIC_SETTINGS reads that declaration once, in field order, as TopicSetting entries, and
everything else that spells a topic setting derives from it:

    storage   TopicConfig.validate, to_dict and from_dict (the LMDB topic value: JSON
              of to_dict, docs/storage-format.md)
    protocol  messages.TopicSettings, the wire struct: one field per setting, in this
              order, of its wire type; -1 or null: server default, -2: no limit
    server    [topic_defaults] in the TOML file and NODI_TOPIC_DEFAULTS_* (config.py
              reads TopicConfig's fields); CreateTopic and DescribeTopic (service.py)
    client    create_topic's wire struct and TopicSettings from the wire; the
              signatures of create_topic and the client's TopicSettings are written out
              for IDEs and type checkers, and tests/test_topic_settings.py keeps them
              equal to TOPIC_SETTINGS
    cli       `nodi topic create`'s options and `describe`'s "unlimited"

"No limit" is declared once per setting (`unlimited=True`, the field typed `int | None`)
and spelled once per layer: None here, -2 (RETENTION_UNLIMITED) on the wire, -1
(UNLIMITED) in the client and the CLI. docs/development.md says how to add a setting.

Imports nothing but storage's errors, limits and config, so the protocol may import it.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields

from .config import DAY_MS
from .errors import InvalidConfigError
from .limits import GIB, KIB, MIB

INT64_MAX = 2**63 - 1
PARTITIONS_MAX = 10_000
# The longest publish dedup window a topic may have (broker/server/dedup.py rescans it at start).
DEDUP_WINDOW_MS_MAX = DAY_MS
# The same ranges as storage/config.py's LogConfig, so every valid topic makes a valid
# log: positions are uint32 in .index.
SEGMENT_BYTES_MIN = 4 * KIB
SEGMENT_BYTES_MAX = 2 * GIB
CLEANUP_POLICIES = ("delete", "compact", "compact,delete")
FSYNC_POLICIES = ("always", "interval", "never")
# Whose time a record's timestamp is: the producer's ("create", Kafka's CreateTime) or the
# broker's at the append ("log-append", LogAppendTime: docs/storage-format.md).
TIMESTAMP_TYPES = ("create", "log-append")
TIMESTAMP_TYPE_CREATE, TIMESTAMP_TYPE_LOG_APPEND = TIMESTAMP_TYPES
# The kinds of cleanup a cleanup policy combines; a setting names the ones that use it.
CLEANUP_KINDS = ("delete", "compact")
# Wire types a setting may have (names as in broker/protocol/schema.py).
WIRE_TYPES = ("int32", "int64", "string?")


@dataclass(frozen=True, slots=True)
class TopicSetting:
    """One topic setting, as declared on its TopicConfig field."""

    name: str
    type: type  # int or str
    default: int | str | None
    # Help for people: the CLI option's help, the docs.
    help: str
    # The note of its row in docs/protocol.md's tables, before "-1: server default".
    wire_note: str = ""
    # Integers: the allowed range. Strings: `choices`.
    low: int = 0
    high: int = INT64_MAX
    choices: tuple[str, ...] = ()
    # None stored means "no limit" (the wire's -2, the client's UNLIMITED).
    unlimited: bool = False
    # None is a valid value (no limit, or a value the server resolves: see the field).
    optional: bool = False
    unit: str = ""  # "ms", "bytes" or ""
    wire_type: str = "int64"
    # The cleanup kinds ("delete", "compact") whose topics use it.
    cleanup_kinds: tuple[str, ...] = CLEANUP_KINDS
    # Its name in Kafka's topic configs (CreateTopics, DescribeConfigs); "": the name
    # with dots for underscores (retention_ms is retention.ms).
    kafka_name: str = ""
    # A string setting whose Kafka values are spelled otherwise: (nodi's, Kafka's) per
    # choice, in the order of `choices`.
    kafka_values: tuple[tuple[str, str], ...] = ()
    # The version of nodi's CreateTopic and DescribeTopic whose settings first carry it
    # (version 2, protocol version 5: timestamp_type); older versions leave it out, so
    # their bytes never change (broker/protocol/messages.py).
    wire_version: int = 1

    @property
    def kafka_config_name(self) -> str:
        return self.kafka_name or self.name.replace("_", ".")

    def to_kafka_value(self, value: str) -> str:
        """A string value as Kafka spells it."""
        return dict(self.kafka_values).get(value, value)

    def from_kafka_value(self, value: str) -> str:
        """A Kafka config value as nodi spells it (unknown values unchanged: check() names them)."""
        return {kafka: nodi for nodi, kafka in self.kafka_values}.get(value, value)

    def check(self, value: object) -> None:
        """InvalidConfigError unless `value` is allowed."""
        if self.type is str:
            if value not in self.choices:
                raise InvalidConfigError(
                    f"topic config: {self.name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}"
                )
            return
        if self.optional and value is None:
            return
        if not _is_integer(value) or not self.low <= value <= self.high:  # type: ignore[operator]
            allowed = f"an integer in [{self.low}, {self.high}]" + (" or None" if self.optional else "")
            raise InvalidConfigError(f"topic config: {self.name} must be {allowed}, got {value!r}")


def setting(
    default: int | str | None,
    *,
    help: str,
    wire_note: str = "",
    low: int = 0,
    high: int = INT64_MAX,
    choices: tuple[str, ...] = (),
    unlimited: bool = False,
    unit: str = "",
    wire_type: str = "int64",
    cleanup_kinds: tuple[str, ...] = CLEANUP_KINDS,
    kafka_name: str = "",
    kafka_values: tuple[tuple[str, str], ...] = (),
    wire_version: int = 1,
) -> typing.Any:
    """Declare a TopicConfig field as a topic setting (see TopicSetting)."""
    assert wire_type in WIRE_TYPES
    assert set(cleanup_kinds) <= set(CLEANUP_KINDS) and cleanup_kinds
    assert not kafka_values or tuple(nodi for nodi, _ in kafka_values) == choices
    declared = dict(
        help=help,
        wire_note=wire_note,
        low=low,
        high=high,
        choices=choices,
        unlimited=unlimited,
        unit=unit,
        wire_type=wire_type,
        cleanup_kinds=cleanup_kinds,
        kafka_name=kafka_name,
        kafka_values=kafka_values,
        wire_version=wire_version,
    )
    return field(default=default, metadata={"setting": declared})


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class TopicConfig:
    """A topic's settings, one field per setting (the declaration: see the module
    docstring). None for retention_ms / retention_bytes means unlimited."""

    partitions: int = setting(1, low=1, high=PARTITIONS_MAX, wire_type="int32", help="Number of partitions.")
    retention_ms: int | None = setting(
        7 * DAY_MS,
        unlimited=True,
        unit="ms",
        cleanup_kinds=("delete",),
        help="Delete segments older than this (ms); -1 keeps them for ever.",
    )
    retention_bytes: int | None = setting(
        None,
        unlimited=True,
        unit="bytes",
        cleanup_kinds=("delete",),
        wire_note="per partition",
        help="Delete the oldest segments past this size per partition; -1: no limit.",
    )
    cleanup_policy: str = setting(
        "delete", choices=CLEANUP_POLICIES, wire_type="string?", help='"delete", "compact" or "compact,delete".'
    )
    fsync_policy: str = setting(
        "always",
        choices=FSYNC_POLICIES,
        wire_type="string?",
        help='"always" (acknowledge durable produces after fsync), "interval" or "never".',
    )
    # Applies with fsync_policy "interval".
    fsync_interval_ms: int = setting(
        1000,
        low=1,
        unit="ms",
        wire_note='with "interval"',
        help="The fsync period with --fsync-policy interval (ms).",
    )
    segment_bytes: int = setting(
        128 * MIB,
        low=SEGMENT_BYTES_MIN,
        high=SEGMENT_BYTES_MAX,
        unit="bytes",
        help="Roll to a new segment file past this size.",
    )
    segment_ms: int = setting(7 * DAY_MS, low=1, unit="ms", help="Roll to a new segment file after this age (ms).")
    # Default message TTL (0: messages do not expire); a message's TTL header wins.
    ttl_ms: int = setting(
        0,
        unit="ms",
        wire_note="default message TTL; 0: none",
        help="Default message TTL (ms): readers skip older messages; 0: none.",
    )
    # Publish dedup window of idempotency keys (0: off; at most DEDUP_WINDOW_MS_MAX,
    # since a restart rescans that much of the log).
    dedup_window_ms: int = setting(
        2 * 60 * 1000,
        high=DEDUP_WINDOW_MS_MAX,
        unit="ms",
        wire_note="publish dedup window; 0: off",
        help="Publish dedup: a message whose idempotency key was seen this recently (ms) is not written "
        "again; 0: off (server default: 2 minutes).",
    )
    # Compacted topics: how long a tombstone stays after the first compaction pass has
    # seen it. None: the server's compaction.delete_retention_ms (topics stored before
    # this setting existed; the server resolves it when a topic is created).
    delete_retention_ms: int | None = setting(
        None,
        unit="ms",
        cleanup_kinds=("compact",),
        wire_note="compacted topics: how long a tombstone stays after a pass first saw it",
        help="Compacted topics: how long (ms) a tombstone stays after a compaction pass first saw it "
        "(server default: its compaction.delete_retention_ms, one day).",
    )
    # "log-append": the broker stamps each batch it appends with its clock, and every
    # record reads as that time (Kafka's message.timestamp.type=LogAppendTime).
    timestamp_type: str = setting(
        TIMESTAMP_TYPE_CREATE,
        choices=TIMESTAMP_TYPES,
        wire_type="string?",
        kafka_name="message.timestamp.type",
        kafka_values=((TIMESTAMP_TYPE_CREATE, "CreateTime"), (TIMESTAMP_TYPE_LOG_APPEND, "LogAppendTime")),
        wire_version=2,
        wire_note="whose time a record's timestamp is",
        help='"create": the producer\'s timestamps stand; "log-append": every record gets the broker\'s '
        "time of the append.",
    )

    def validate(self) -> None:
        for declared in TOPIC_SETTINGS:
            declared.check(getattr(self, declared.name))

    def to_dict(self) -> dict[str, object]:
        """Every field by name; JSON-serialisable."""
        return {declared.name: getattr(self, declared.name) for declared in TOPIC_SETTINGS}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> TopicConfig:
        """The inverse of to_dict. Missing keys take their defaults; unknown keys are
        rejected (a setting nodi does not know is never silently dropped). Validated."""
        if not isinstance(data, Mapping):
            raise InvalidConfigError(f"topic config must be a mapping, got {type(data).__name__}")
        unknown = sorted(str(key) for key in data if key not in TOPIC_SETTING_NAMES)
        if unknown:
            raise InvalidConfigError(
                f"unknown topic config keys: {', '.join(unknown)} (known: {', '.join(TOPIC_SETTING_NAMES)})"
            )
        config = cls(**data)  # type: ignore[arg-type]  # a value per declared setting; validate() checks them
        config.validate()
        return config


def _declared_settings(config_class: type) -> tuple[TopicSetting, ...]:
    """The TopicSetting of each field of `config_class`, in order."""
    hints = typing.get_type_hints(config_class)
    out = []
    for config_field in fields(config_class):
        assert "setting" in config_field.metadata, f"{config_field.name} is not declared with setting()"
        declared = config_field.metadata["setting"]
        annotation = hints[config_field.name]
        arguments = set(typing.get_args(annotation))
        optional = type(None) in arguments
        python_type = next(iter(arguments - {type(None)})) if arguments else annotation
        assert python_type in (int, str), config_field.name
        assert not declared["unlimited"] or optional, f"{config_field.name}: None is its no-limit"
        assert (python_type is str) == (declared["wire_type"] == "string?") == bool(declared["choices"])
        assert config_field.default is not MISSING, f"{config_field.name}: every setting has a default"
        out.append(
            TopicSetting(
                name=config_field.name, type=python_type, default=config_field.default, optional=optional, **declared
            )
        )
    return tuple(out)


TOPIC_SETTINGS: tuple[TopicSetting, ...] = _declared_settings(TopicConfig)
# A wire layout only grows at its end: a setting of a later CreateTopic version comes after
# every setting of the earlier ones.
assert all(a.wire_version <= b.wire_version for a, b in zip(TOPIC_SETTINGS, TOPIC_SETTINGS[1:]))
TOPIC_SETTING_NAMES = tuple(declared.name for declared in TOPIC_SETTINGS)
TOPIC_SETTINGS_BY_NAME: dict[str, TopicSetting] = {declared.name: declared for declared in TOPIC_SETTINGS}


def _number(value: int) -> str:
    return "2^63-1" if value == INT64_MAX else f"{value:,}"


def render_table() -> str:
    """The table of every topic setting in docs/operations.md ("Topic settings"),
    rendered from the declaration; tests/test_topic_settings.py keeps the docs equal."""
    lines = ["| setting | default | allowed | unit | topics | meaning |", "|---|---|---|---|---|---|"]
    for declared in TOPIC_SETTINGS:
        if declared.type is str:
            allowed = ", ".join(f"`{choice}`" for choice in declared.choices)
        else:
            allowed = f"{_number(declared.low)} .. {_number(declared.high)}"
            allowed += ", or unlimited" if declared.unlimited else ""
        if declared.default is None:
            default = "unlimited" if declared.unlimited else "the server's"
        elif declared.type is str:
            default = f"`{declared.default}`"
        else:
            default = _number(declared.default)  # type: ignore[arg-type]  # an int setting: its default is an int
        topics = "all" if declared.cleanup_kinds == CLEANUP_KINDS else " and ".join(declared.cleanup_kinds)
        lines.append(f"| `{declared.name}` | {default} | {allowed} | {declared.unit} | {topics} | {declared.help} |")
    return "\n".join(lines)


__all__ = [
    "CLEANUP_KINDS",
    "CLEANUP_POLICIES",
    "DEDUP_WINDOW_MS_MAX",
    "FSYNC_POLICIES",
    "PARTITIONS_MAX",
    "SEGMENT_BYTES_MAX",
    "SEGMENT_BYTES_MIN",
    "TIMESTAMP_TYPES",
    "TIMESTAMP_TYPE_CREATE",
    "TIMESTAMP_TYPE_LOG_APPEND",
    "TOPIC_SETTINGS",
    "TOPIC_SETTINGS_BY_NAME",
    "TOPIC_SETTING_NAMES",
    "TopicConfig",
    "TopicSetting",
    "render_table",
    "setting",
]
