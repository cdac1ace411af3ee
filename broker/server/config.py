"""Server settings: defaults, a TOML file, NODI_* environment variables, command-line
flags, in that order of precedence (later wins).

Every setting has a variable: `[server]` keys as NODI_<KEY> (NODI_PORT), the other
tables as NODI_<TABLE>_<KEY> (NODI_TOPIC_DEFAULTS_RETENTION_MS, NODI_PROTOCOL_FRAME_BYTES_MAX,
NODI_GROUPS_MEMBERS_PER_GROUP_MAX). An optional integer takes "none" for unset
(retention_bytes = unlimited); a boolean takes 1/0, true/false, yes/no, on/off."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields

from nodi.storage.errors import InvalidConfigError
from nodi.storage.fsync_pool import FSYNC_WORKERS_DEFAULT, check_fsync_workers_max
from nodi.storage.metadata import TopicConfig

from .compaction_settings import DEFAULT_COMPACTION_SETTINGS, CompactionSettings
from .groups import DEFAULT_GROUP_LIMITS, GroupLimits
from ..protocol.queue_settings import DEFAULT_QUEUE_LIMITS, QueueLimits
from .inbox_limits import DEFAULT_INBOX_LIMITS, InboxLimits
from ..protocol.limits import DEFAULT_PROTOCOL_LIMITS, ProtocolLimits
from .logs import check_log_level

ENVIRONMENT_PREFIX = "NODI_"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: str = "./nodi-data"
    host: str = "127.0.0.1"
    port: int = 6634
    # Prometheus endpoint; 0 picks a free port, -1 disables it.
    metrics_port: int = 6635
    # Open client connections; one more is told LIMIT_EXCEEDED and closed.
    connections_max: int = 10_000
    # Longest long-poll a fetch may ask for; longer waits are cut to it.
    fetch_wait_max_ms: int = 30_000
    # A new connection must complete its handshake within this.
    handshake_timeout_ms: int = 10_000
    # A connection that sends nothing for this long is closed (consumers long-poll
    # well within it).
    idle_timeout_ms: int = 600_000
    # A peer that does not read its responses for this long is closed (slow consumer).
    write_timeout_ms: int = 30_000
    # Graceful shutdown: requests in flight get this long to finish.
    shutdown_grace_ms: int = 5_000
    retention_check_interval_ms: int = 60_000
    # Threads that run the partition logs' fsyncs, shared by every partition (group
    # commit per log); at most nodi.storage.fsync_pool.FSYNC_WORKERS_MAX.
    fsync_workers_max: int = FSYNC_WORKERS_DEFAULT
    # Log records at this level and above go to stderr: debug, info, warning, error.
    log_level: str = "info"
    # One JSON object per log line (time, level, logger, message, fields).
    log_json: bool = False
    # Settings a CreateTopic request leaves at "server default".
    topic_defaults: TopicConfig = field(default_factory=TopicConfig)
    protocol: ProtocolLimits = DEFAULT_PROTOCOL_LIMITS
    # Stream-mode consumer group limits (broker/server/groups.py).
    groups: GroupLimits = DEFAULT_GROUP_LIMITS
    # Queue group limits (broker/protocol/queue_settings.py): window_messages_max and more.
    queues: QueueLimits = DEFAULT_QUEUE_LIMITS
    # Request-reply inbox limits (broker/server/inbox_limits.py).
    inboxes: InboxLimits = DEFAULT_INBOX_LIMITS
    # Log compaction (broker/server/compaction_settings.py): dirty_ratio_min and more.
    compaction: CompactionSettings = DEFAULT_COMPACTION_SETTINGS

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidConfigError(f"port {self.port} outside 0..65535")
        if not -1 <= self.metrics_port <= 65535:
            raise InvalidConfigError(f"metrics_port {self.metrics_port} outside -1..65535")
        for name in ("connections_max", "fetch_wait_max_ms", "handshake_timeout_ms", "idle_timeout_ms",
                     "write_timeout_ms", "shutdown_grace_ms", "retention_check_interval_ms"):
            if getattr(self, name) < 1:
                raise InvalidConfigError(f"{name} must be positive")
        check_fsync_workers_max(self.fsync_workers_max)
        try:
            check_log_level(self.log_level)
        except ValueError as error:
            raise InvalidConfigError(str(error)) from None
        self.topic_defaults.validate()
        self.queues.validate()
        self.inboxes.validate()
        self.compaction.validate()

    def announced_limits(self) -> dict[str, int]:
        limits = self.protocol.announced()
        limits.update(connections_max=self.connections_max, fetch_wait_max_ms=self.fetch_wait_max_ms,
                      batch_bytes_max=1 << 20)
        return limits

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The tables besides [server]: TOML table name -> the settings class its keys build.
SECTIONS: dict[str, type] = {"topic_defaults": TopicConfig, "protocol": ProtocolLimits, "groups": GroupLimits,
                             "queues": QueueLimits, "inboxes": InboxLimits, "compaction": CompactionSettings}
_SIMPLE = {f.name: f for f in fields(ServerConfig) if f.name not in SECTIONS}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(name: str, value, default, optional: bool = False) -> object:
    """`value` (from TOML or an environment variable) as the type of `default`;
    `optional` integers (a None default, or `int | None`) also take "none"."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise InvalidConfigError(f"setting {name}: {value!r} is not a boolean (true/false)")
    if default is None or isinstance(default, int):
        if (default is None or optional) and (value is None or str(value).strip().lower() == "none"):
            return None
        if isinstance(value, bool):
            raise InvalidConfigError(f"setting {name}: {value!r} is not a valid int")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise InvalidConfigError(f"setting {name}: {value!r} is not a valid int") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InvalidConfigError(f"setting {name}: {value!r} is not a number") from None
    return str(value)


def environment_variable(name: str, section: str | None = None) -> str:
    """The variable of a setting: NODI_<NAME> for [server], NODI_<SECTION>_<NAME>."""
    return ENVIRONMENT_PREFIX + (f"{section}_{name}" if section else name).upper()


def _section_defaults(section: str) -> dict[str, tuple[object, bool]]:
    """name -> (default, optional) of each setting of a table."""
    defaults = SECTIONS[section]()
    return {f.name: (getattr(defaults, f.name), "None" in str(f.type)) for f in fields(SECTIONS[section])}


def load_config(path: str | None = None, *, environment: dict[str, str] | None = None, **overrides) -> ServerConfig:
    """Defaults < TOML file (`[server]` keys, `[topic_defaults]`, `[protocol]`) <
    NODI_<SETTING> environment variables < keyword overrides (command-line flags; None
    means not given)."""
    environment = os.environ if environment is None else environment
    values: dict[str, object] = {}
    tables: dict[str, dict[str, object]] = {section: {} for section in SECTIONS}
    if path is not None:
        try:
            with open(path, "rb") as file:
                document = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise InvalidConfigError(f"config file {path}: {error}") from None
        unknown = set(document) - {"server", *SECTIONS}
        if unknown:
            raise InvalidConfigError(f"config file {path}: unknown sections {sorted(unknown)}")
        values.update(document.get("server", {}))
        for section in SECTIONS:
            tables[section].update(document.get(section, {}))
    for name in _SIMPLE:
        variable = environment_variable(name)
        if variable in environment:
            values[name] = environment[variable]
    for section, table in tables.items():
        defaults = _section_defaults(section)
        for name, (default, optional) in defaults.items():
            variable = environment_variable(name, section)
            if variable in environment:
                table[name] = _coerce(f"{section}.{name}", environment[variable], default, optional)
    values.update({key: value for key, value in overrides.items() if value is not None})
    unknown = set(values) - set(_SIMPLE)
    if unknown:
        raise InvalidConfigError(f"unknown server settings {sorted(unknown)}")
    converted = {name: _coerce(name, value, _SIMPLE[name].default) for name, value in values.items()}
    for section, table in tables.items():
        unknown = set(table) - set(_section_defaults(section))
        if unknown:
            raise InvalidConfigError(f"unknown {section} settings {sorted(unknown)}")
    try:
        config = ServerConfig(
            **converted,
            topic_defaults=TopicConfig.from_dict(tables["topic_defaults"]),
            protocol=ProtocolLimits(**tables["protocol"]),
            groups=GroupLimits(**tables["groups"]),
            queues=QueueLimits(**tables["queues"]),
            inboxes=InboxLimits(**tables["inboxes"]),
            compaction=CompactionSettings(**tables["compaction"]),
        )
    except (TypeError, ValueError) as error:
        raise InvalidConfigError(str(error)) from None
    config.validate()
    return config
