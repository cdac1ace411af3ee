"""The rule for consumer group names on the wire (stream groups and queue groups).

A group name is 1 to group_name_bytes_max (255) characters of A-Z a-z 0-9 . _ - and not
"." or "..": the characters of a topic name (storage/metadata.py validate_topic_name), so
a name is safe wherever it is printed or used: `nodi` tables, metrics labels, log lines,
a path. Checked where a request names a group, before anything is stored; the metadata
store's own check (storage/metadata.py validate_group_name: the UTF-8 length its keys can
hold) stays underneath, so groups stored before this rule are still listed.
"""

from __future__ import annotations

import re

from nodi.storage.errors import InvalidConfigError
from nodi.storage.metadata import validate_group_name

_GROUP_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_group_name(name: str, group_name_bytes_max: int = 255) -> None:
    """Raise InvalidConfigError unless `name` follows the rule above."""
    validate_group_name(name, group_name_bytes_max)  # a string, 1..max bytes
    if _GROUP_NAME.fullmatch(name) is None:
        raise InvalidConfigError(
            f"invalid group name {name!r}: use 1 to {group_name_bytes_max} characters from A-Z a-z 0-9 . _ -"
        )
    if name in (".", ".."):
        raise InvalidConfigError(f"invalid group name {name!r}: '.' and '..' are reserved")
