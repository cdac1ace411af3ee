"""Server settings: defaults, a TOML file, NODI_* environment variables, command-line
flags, in that order of precedence (later wins).

Every setting has a variable: `[server]` keys as NODI_<KEY> (NODI_PORT), the other
tables as NODI_<TABLE>_<KEY> (NODI_TOPIC_DEFAULTS_RETENTION_MS, NODI_PROTOCOL_FRAME_BYTES_MAX,
NODI_GROUPS_MEMBERS_PER_GROUP_MAX). An optional integer takes "none" for unset
(retention_bytes = unlimited); a boolean takes 1/0, true/false, yes/no, on/off."""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from nodi.storage.errors import InvalidConfigError
from nodi.storage.fsync_pool import FSYNC_WORKERS_DEFAULT, check_fsync_workers_max
from nodi.storage.metadata import TopicConfig

from ..kafka.settings import DEFAULT_KAFKA_SETTINGS, KafkaSettings
from ..protocol.limits import DEFAULT_PROTOCOL_LIMITS, ProtocolLimits
from ..protocol.queue_settings import DEFAULT_QUEUE_LIMITS, QueueLimits
from .compaction_settings import DEFAULT_COMPACTION_SETTINGS, CompactionSettings
from .groups import DEFAULT_GROUP_LIMITS, GroupLimits
from .inbox_limits import DEFAULT_INBOX_LIMITS, InboxLimits
from .logs import check_log_level
from .memory_budget import default_frame_buffer_bytes_max
from .security_settings import DEFAULT_SECURITY_SETTINGS, SecuritySettings

ENVIRONMENT_PREFIX = "NODI_"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: str = "./nodi-data"
    host: str = "127.0.0.1"
    port: int = 6634
    # Prometheus endpoint; 0 picks a free port, -1 disables it.
    metrics_port: int = 6635
    # Metrics per partition (nodi_log_*, fsyncs, consumer lag, compaction, queue
    # groups) while the broker holds at most this many partitions; past it, per topic
    # (partition="all"), so a scrape grows with topics. 0: always per topic.
    metrics_partition_series_max: int = 1_000
    # The web console (docs/console.md): its address, and its port; 0 turns it off.
    console_host: str = "127.0.0.1"
    console_port: int = 6636
    # A console session (with a users file: sign-in) unused this long is ended.
    console_session_idle_ms: int = 1_800_000
    # Open client connections; one more is told LIMIT_EXCEEDED and closed.
    connections_max: int = 10_000
    # Longest long-poll a fetch may ask for; longer waits are cut to it.
    fetch_wait_max_ms: int = 30_000
    # A new connection must complete its handshake within this, from its accept.
    handshake_timeout_ms: int = 10_000
    # A frame must arrive whole within this from its first byte (a slow or stalled
    # sender is closed with TIMEOUT); the wait for frame_buffer_bytes_max counts.
    frame_timeout_ms: int = 30_000
    # A connection that sends nothing for this long between frames is closed
    # (consumers long-poll well within it).
    idle_timeout_ms: int = 600_000
    # Bytes reserved by frames being received, over all connections (each incomplete
    # frame reserves its announced size); past it a connection stops reading until
    # enough is released. Default: a sixteenth of physical memory, 32..256 MiB.
    frame_buffer_bytes_max: int = default_frame_buffer_bytes_max()
    # A peer that does not read its responses for this long is closed (slow consumer).
    write_timeout_ms: int = 30_000
    # Graceful shutdown: requests in flight get this long to finish.
    shutdown_grace_ms: int = 5_000
    retention_check_interval_ms: int = 60_000
    # A partition log nothing used for this long is closed (its files and index buffers
    # released) and opens again on next use (issue 18); 0: never.
    partition_idle_close_ms: int = 600_000
    # Threads that run every partition log's fsyncs (group commit per log kept);
    # 1..nodi.storage.fsync_pool.FSYNC_WORKERS_MAX.
    fsync_workers_max: int = FSYNC_WORKERS_DEFAULT
    # A durable produce alone on the broker (fsync `always`, no fsync queued or running
    # on the pool, no other partition's produce in the same loop turn, none that met
    # another in the last 10 ms: service.FSYNC_ON_LOOP_QUIET_S) is fsynced on
    # the event loop at the end of the turn, without a hand-off to the pool, while the
    # partition's last fsync took at most this; 0 (the default): always on the pool, as
    # the design has it (fsync runs off the event loop). Opt-in: the loop serves nothing
    # else for that fsync's duration, so a disk that stalls stalls the whole broker
    # (docs/operations.md).
    fsync_on_loop_max_ms: int = 0
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
    # TLS, the users file and the per-principal limits (broker/server/security_settings.py).
    security: SecuritySettings = DEFAULT_SECURITY_SETTINGS
    # The Kafka-protocol listener (broker/kafka/settings.py): off unless a port is set.
    kafka: KafkaSettings = DEFAULT_KAFKA_SETTINGS

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidConfigError(f"port {self.port} outside 0..65535")
        if not -1 <= self.metrics_port <= 65535:
            raise InvalidConfigError(f"metrics_port {self.metrics_port} outside -1..65535")
        if not 0 <= self.console_port <= 65535:
            raise InvalidConfigError(f"console_port {self.console_port} outside 0..65535 (0 turns the console off)")
        if self.console_session_idle_ms < 1:
            raise InvalidConfigError("console_session_idle_ms must be positive")
        for name in (
            "connections_max",
            "fetch_wait_max_ms",
            "handshake_timeout_ms",
            "frame_timeout_ms",
            "idle_timeout_ms",
            "write_timeout_ms",
            "shutdown_grace_ms",
            "retention_check_interval_ms",
        ):
            if getattr(self, name) < 1:
                raise InvalidConfigError(f"{name} must be positive")
        if self.metrics_partition_series_max < 0:
            raise InvalidConfigError("metrics_partition_series_max must be 0 (always per topic) or positive")
        if self.fsync_on_loop_max_ms < 0:
            raise InvalidConfigError("fsync_on_loop_max_ms must be 0 (never on the loop) or positive")
        if self.partition_idle_close_ms < 0:
            raise InvalidConfigError("partition_idle_close_ms must be 0 (never) or positive")
        check_fsync_workers_max(self.fsync_workers_max)
        if self.frame_buffer_bytes_max < self.protocol.frame_bytes_max:
            raise InvalidConfigError(
                f"frame_buffer_bytes_max {self.frame_buffer_bytes_max} must hold one whole frame "
                f"(protocol.frame_bytes_max {self.protocol.frame_bytes_max})"
            )
        try:
            check_log_level(self.log_level)
        except ValueError as error:
            raise InvalidConfigError(str(error)) from None
        self.topic_defaults.validate()
        self.queues.validate()
        self.inboxes.validate()
        self.compaction.validate()
        self.security.validate()
        self.kafka.validate()

    def announced_limits(self) -> dict[str, int]:
        limits = self.protocol.announced()
        limits.update(
            connections_max=self.connections_max, fetch_wait_max_ms=self.fetch_wait_max_ms, batch_bytes_max=1 << 20
        )
        return limits

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The tables besides [server]: TOML table name -> the settings class its keys build.
SECTIONS: dict[str, type] = {
    "topic_defaults": TopicConfig,
    "protocol": ProtocolLimits,
    "groups": GroupLimits,
    "queues": QueueLimits,
    "inboxes": InboxLimits,
    "compaction": CompactionSettings,
    "security": SecuritySettings,
    "kafka": KafkaSettings,
}
_SIMPLE = {f.name: f for f in fields(ServerConfig) if f.name not in SECTIONS}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(name: str, value, default, optional: bool = False) -> Any:
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


# NODI_* variables that are not server settings: the clients' and the tools' own.
# The clients' TLS and credential variables are client/tls.py's CLIENT_ENVIRONMENT_VARIABLES
# (tests/test_security.py checks that both lists agree).
OTHER_ENVIRONMENT_VARIABLES = frozenset(
    {
        "NODI_SERVER",
        "NODI_CRASH_WALK_SEEDS",
        "NODI_TEST_CLOCK_FILE",  # test-only (broker/server/clock.py)
        "NODI_TEST_CLOCK_ALLOWED",
        "NODI_CONSOLE_SCREENSHOTS",
        "NODI_TLS",
        "NODI_TLS_CA",
        "NODI_TLS_CERT",
        "NODI_TLS_KEY",
        "NODI_USER",
        "NODI_PASSWORD",
    }
)


def known_environment_variables() -> frozenset[str]:
    """Every NODI_* variable a setting reads, and the other NODI_* variables nodi uses."""
    names = {environment_variable(name) for name in _SIMPLE}
    for section in SECTIONS:
        names.update(environment_variable(name, section) for name in _section_defaults(section))
    return frozenset(names | OTHER_ENVIRONMENT_VARIABLES)


def unknown_environment_variables(environment: Mapping[str, str] | None = None) -> list[str]:
    """One warning per NODI_* variable that nothing reads (a typo such as NODI_PROT, or
    a topic default without its table, NODI_FSYNC_POLICY), with the closest known name."""
    environment = os.environ if environment is None else environment
    known = known_environment_variables()
    warnings = []
    for variable in sorted(name for name in environment if name.startswith(ENVIRONMENT_PREFIX) and name not in known):
        guesses = difflib.get_close_matches(variable, known, n=1, cutoff=0.6)
        guesses += [name for name in sorted(known) if name.endswith("_" + variable.removeprefix(ENVIRONMENT_PREFIX))]
        hint = f" (did you mean {guesses[0]}?)" if guesses else ""
        warnings.append(f"{variable} is not a nodi setting and is ignored{hint}")
    return warnings


def load_config(path: str | None = None, *, environment: Mapping[str, str] | None = None, **overrides) -> ServerConfig:
    """Defaults < TOML file (`[server]` keys, `[topic_defaults]`, `[protocol]`) <
    NODI_<SETTING> environment variables < keyword overrides (command-line flags; None
    means not given)."""
    environment = os.environ if environment is None else environment
    # TOML, environment and keyword values, untyped until the dataclasses below check
    # them (their TypeError or ValueError becomes InvalidConfigError).
    values: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    if path is not None:
        try:
            with open(path, "rb") as file:
                document = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise InvalidConfigError(f"config file {path}: {error}") from None
        unknown = set(document) - {"server", *SECTIONS}
        misplaced = sorted(name for name in unknown if name in _SIMPLE)
        if misplaced:
            raise InvalidConfigError(
                f"config file {path}: {', '.join(misplaced)} {'is a' if len(misplaced) == 1 else 'are'} [server] "
                f"setting{'' if len(misplaced) == 1 else 's'}: put {'it' if len(misplaced) == 1 else 'them'} "
                "under a [server] table"
            )
        if unknown:
            raise InvalidConfigError(
                f"config file {path}: unknown sections {sorted(unknown)} (the tables are "
                f"{', '.join(f'[{name}]' for name in ('server', *SECTIONS))})"
            )
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
            security=SecuritySettings(**tables["security"]),
            kafka=KafkaSettings(**tables["kafka"]),
        )
    except (TypeError, ValueError) as error:
        raise InvalidConfigError(str(error)) from None
    config.validate()
    return config
