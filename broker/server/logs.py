"""How `nodi serve` logs: plain lines, or with --log-json one JSON object per line.

A JSON line always has `time` (UTC, ISO 8601 with milliseconds), `level`, `logger` and
`message`; every field a call passes with `extra={...}` follows under its own name, and
an exception adds `exception` (the formatted traceback). Values JSON cannot hold are
written as their str().

    log.info("retention deleted segments", extra={"topic": "orders", "segments": 2})
    {"time": "2026-12-01T14:00:00.123Z", "level": "info", "logger": "nodi.server",
     "message": "retention deleted segments", "topic": "orders", "segments": 2}
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import TextIO

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        document: dict[str, object] = {
            "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_ATTRIBUTES and name not in document:
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=str, ensure_ascii=False)


def check_log_level(level: str) -> str:
    """The level in lower case; ValueError for a name not in LOG_LEVELS."""
    name = str(level).strip().lower()
    if name not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    return name


def configure_logging(level: str = "info", *, json_lines: bool = False, stream: TextIO | None = None) -> None:
    """Send every log record at `level` or above to `stream` (stderr), replacing any
    handler the root logger had."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(check_log_level(level).upper())
