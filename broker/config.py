"""Server settings: defaults, a TOML file, NODI_* environment variables, command-line
flags, in that order of precedence (later wins)."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields

from nodi.storage.errors import InvalidConfigError
from nodi.storage.metadata import TopicConfig

from .limits import DEFAULT_PROTOCOL_LIMITS, ProtocolLimits

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
    # Settings a CreateTopic request leaves at "server default".
    topic_defaults: TopicConfig = field(default_factory=TopicConfig)
    protocol: ProtocolLimits = DEFAULT_PROTOCOL_LIMITS

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidConfigError(f"port {self.port} outside 0..65535")
        if not -1 <= self.metrics_port <= 65535:
            raise InvalidConfigError(f"metrics_port {self.metrics_port} outside -1..65535")
        for name in ("connections_max", "fetch_wait_max_ms", "handshake_timeout_ms", "idle_timeout_ms",
                     "write_timeout_ms", "shutdown_grace_ms", "retention_check_interval_ms"):
            if getattr(self, name) < 1:
                raise InvalidConfigError(f"{name} must be positive")
        self.topic_defaults.validate()

    def announced_limits(self) -> dict[str, int]:
        limits = self.protocol.announced()
        limits.update(connections_max=self.connections_max, fetch_wait_max_ms=self.fetch_wait_max_ms,
                      batch_bytes_max=1 << 20)
        return limits

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SIMPLE = {f.name: f for f in fields(ServerConfig) if f.name not in ("topic_defaults", "protocol")}


def _coerce(name: str, value, kind) -> object:
    target = int if kind in (int, "int") else str
    try:
        return target(value)
    except (TypeError, ValueError):
        raise InvalidConfigError(f"setting {name}: {value!r} is not a valid {target.__name__}") from None


def load_config(path: str | None = None, *, environment: dict[str, str] | None = None, **overrides) -> ServerConfig:
    """Defaults < TOML file (`[server]` keys, `[topic_defaults]`, `[protocol]`) <
    NODI_<SETTING> environment variables < keyword overrides (command-line flags; None
    means not given)."""
    environment = os.environ if environment is None else environment
    values: dict[str, object] = {}
    topic: dict[str, object] = {}
    protocol: dict[str, object] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                document = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise InvalidConfigError(f"config file {path}: {error}") from None
        unknown = set(document) - {"server", "topic_defaults", "protocol"}
        if unknown:
            raise InvalidConfigError(f"config file {path}: unknown sections {sorted(unknown)}")
        values.update(document.get("server", {}))
        topic.update(document.get("topic_defaults", {}))
        protocol.update(document.get("protocol", {}))
    for name in _SIMPLE:
        variable = ENVIRONMENT_PREFIX + name.upper()
        if variable in environment:
            values[name] = environment[variable]
    values.update({key: value for key, value in overrides.items() if value is not None})
    unknown = set(values) - set(_SIMPLE)
    if unknown:
        raise InvalidConfigError(f"unknown server settings {sorted(unknown)}")
    converted = {name: _coerce(name, value, type(_SIMPLE[name].default)) for name, value in values.items()}
    try:
        config = ServerConfig(
            **converted,
            topic_defaults=TopicConfig.from_dict(topic),
            protocol=ProtocolLimits(**protocol),
        )
    except (TypeError, ValueError) as error:
        raise InvalidConfigError(str(error)) from None
    config.validate()
    return config
