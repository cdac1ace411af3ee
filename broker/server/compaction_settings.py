"""The server's compaction settings: the `[compaction]` table of the config file
(NODI_COMPACTION_<KEY> variables); the work itself is storage/compaction.py."""

from __future__ import annotations

from dataclasses import dataclass

from nodi.storage.compaction import KEY_MAP_ENTRY_BYTES, CompactionConfig
from nodi.storage.config import DAY_MS
from nodi.storage.errors import InvalidConfigError
from nodi.storage.limits import MIB


@dataclass(frozen=True, slots=True)
class CompactionSettings:
    # The background job compacts a partition of a compacted topic once this share of
    # its sealed bytes is dirty (written since the last run); 0 < ratio <= 1.
    dirty_ratio_min: float = 0.5
    # How often the background job looks for such a partition (one run at a time).
    check_interval_ms: int = 15_000
    # Memory for one pass's key map; a smaller budget means more passes.
    key_map_bytes_max: int = 64 * MIB
    # How long a tombstone stays after the first pass has seen it: the default of the
    # topic setting (TopicConfig.delete_retention_ms; topics stored without one use it).
    delete_retention_ms: int = DAY_MS

    def validate(self) -> None:
        if (
            isinstance(self.dirty_ratio_min, bool)
            or not isinstance(self.dirty_ratio_min, (int, float))
            or not (0 < self.dirty_ratio_min <= 1)
        ):
            raise InvalidConfigError(f"compaction.dirty_ratio_min must be in (0, 1], got {self.dirty_ratio_min!r}")
        for name, low in (
            ("check_interval_ms", 1),
            ("key_map_bytes_max", KEY_MAP_ENTRY_BYTES),
            ("delete_retention_ms", 0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidConfigError(f"compaction.{name} must be an integer >= {low}, got {value!r}")

    def storage_config(self) -> CompactionConfig:
        return CompactionConfig(key_map_bytes_max=self.key_map_bytes_max, delete_retention_ms=self.delete_retention_ms)


DEFAULT_COMPACTION_SETTINGS = CompactionSettings()
