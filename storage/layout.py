"""Where things live in a data directory (docs/storage-format.md, "Data directory
layout"):

    DATA_DIR/
      meta/                        the LMDB metadata environment (storage/metadata.py)
      logs/
        <topic>-<partition>/       one partition log (storage/log.py), e.g. orders-0

A topic name is 1..249 characters of [A-Za-z0-9._-] (storage/metadata.py holds the
rule); it may itself contain '-', so the partition number is what follows the *last*
'-'. The partition is written in decimal without leading zeros, so each partition has
exactly one directory name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple

from .errors import InvalidConfigError
from .metadata import PARTITION_MAX, validate_topic_name

META_DIRECTORY = "meta"
LOGS_DIRECTORY = "logs"


class PartitionDirectory(NamedTuple):
    topic: str
    partition: int
    path: str


def meta_directory(data_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(data_dir), META_DIRECTORY)


def logs_directory(data_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(data_dir), LOGS_DIRECTORY)


def is_data_directory(path: str | os.PathLike[str]) -> bool:
    """Whether `path` looks like a nodi data directory (holds meta/ or logs/): what the
    offline tools check before reading or changing anything, so a tool pointed at the
    wrong directory refuses instead of reporting an empty success."""
    return os.path.isdir(meta_directory(path)) or os.path.isdir(logs_directory(path))


def partition_directory_name(topic: str, partition: int) -> str:
    """`<topic>-<partition>`; InvalidConfigError for a bad topic name or partition."""
    validate_topic_name(topic)
    if isinstance(partition, bool) or not isinstance(partition, int) or not 0 <= partition <= PARTITION_MAX:
        raise InvalidConfigError(f"partition must be an integer in [0, {PARTITION_MAX}], got {partition!r}")
    return f"{topic}-{partition}"


def partition_directory(data_dir: str | os.PathLike[str], topic: str, partition: int) -> str:
    """DATA_DIR/logs/<topic>-<partition>."""
    return os.path.join(logs_directory(data_dir), partition_directory_name(topic, partition))


def parse_partition_directory(name: str) -> tuple[str, int] | None:
    """(topic, partition) for a partition directory name, None for any other name."""
    topic, dash, number = name.rpartition("-")
    if not dash or not number.isascii() or not number.isdigit() or number != str(int(number)):
        return None
    partition = int(number)
    if partition > PARTITION_MAX:
        return None
    try:
        validate_topic_name(topic)
    except InvalidConfigError:
        return None
    return topic, partition


def iter_partition_directories(data_dir: str | os.PathLike[str]) -> Iterator[PartitionDirectory]:
    """Every partition directory under DATA_DIR/logs, ordered by (topic, partition).
    Entries whose names are not partition directory names are skipped (nothing when
    DATA_DIR/logs does not exist)."""
    logs = logs_directory(data_dir)
    try:
        names = os.listdir(logs)
    except FileNotFoundError:
        return
    found = []
    for name in names:
        parsed = parse_partition_directory(name)
        path = os.path.join(logs, name)
        if parsed is not None and os.path.isdir(path):
            found.append(PartitionDirectory(parsed[0], parsed[1], path))
    found.sort()
    yield from found
