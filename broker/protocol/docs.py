"""The generated parts of docs/protocol.md, rendered from the code that defines them:
the state table (protocol.TRANSITIONS), each API's byte tables (the message
declarations), the error codes and the limits. tests/test_protocol.py checks the document
is up to date; to refresh it:

    python -m nodi.broker.protocol.docs docs/protocol.md

Each generated block sits between `<!-- BEGIN GENERATED name -->` and
`<!-- END GENERATED name -->`; the prose around the blocks is written by hand.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

from .connection import TRANSITIONS
from .errors import ERROR_DESCRIPTIONS, ErrorCode
from .frames import encode_message
from .limits import DEFAULT_PROTOCOL_LIMITS, LIMIT_DESCRIPTIONS
from .messages import APIS, EVENT_VERSION, EVENTS, ApiKey, ErrorResponse, EventKey, HandshakeRequest
from .schema import schema_rows


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def _body_table(cls: type) -> str:
    rows = [(f"`{name}`", f"`{type_}`", notes) for name, type_, notes in schema_rows(cls)]
    if not rows:
        return "(no fields: an empty body)"
    return _table(("field", "type", "notes"), rows)


def render_states() -> str:
    rows = [
        (role.value, state.name, direction.value, trigger.value, next_state.name)
        for (role, state, direction, trigger), next_state in TRANSITIONS.items()
    ]
    return _table(("role", "state", "direction", "message", "next state"), rows)


def _api_name(key: ApiKey) -> str:
    """The API's name from its key (CREATE_TOPIC: CreateTopic), not from a message class,
    whose name may carry a version (CreateTopicRequestV1)."""
    return "".join(word.title() for word in key.name.split("_"))


def render_apis() -> str:
    sections = []
    for api in APIS:
        sections.append(
            f"### {_api_name(api.key)} "
            f"(api key {int(api.key)}, version {api.version_min}"
            f"{f', protocol version {api.protocol_version_min}' if api.protocol_version_min > 1 else ''})\n\n"
            f"{api.summary}\n\n"
            f"Request:\n\n{_body_table(api.request)}\n\n"
            f"Response:\n\n{_body_table(api.response)}"
        )
        for later in api.later_versions:
            sections.append(
                f"### {_api_name(api.key)} version {later.version} "
                f"(api key {int(api.key)}, version {later.version}, protocol version {later.protocol_version_min}: "
                f"{later.request.__name__})\n\n"
                f"{later.summary}\n\n"
                f"Request:\n\n{_body_table(later.request)}\n\n"
                f"Response:\n\n{_body_table(later.response)}"
            )
    return "\n\n".join(sections)


def render_error_response() -> str:
    return _body_table(ErrorResponse)


def render_events() -> str:
    sections = []
    for key, cls in EVENTS.items():
        sections.append(
            f"### {cls.__name__.removesuffix('Event')} (event type {int(key)}, version {EVENT_VERSION})\n\n"
            f"{' '.join((cls.__doc__ or '').split())}\n\n{_body_table(cls)}"
        )
    assert set(EVENTS) == set(EventKey)
    return "\n\n".join(sections)


def render_errors() -> str:
    rows = [
        (str(int(code)), code.name, closes, meaning) for code, (closes, meaning) in sorted(ERROR_DESCRIPTIONS.items())
    ]
    assert len(rows) == len(ErrorCode)
    return _table(("code", "name", "closes the connection", "meaning"), rows)


def _bytes_text(value: int) -> str:
    if value >= 1 << 20:
        return f"{value / (1 << 20):g} MiB"
    if value >= 1 << 10:
        return f"{value / (1 << 10):g} KiB"
    return f"{value:,}"


def render_limits() -> str:
    rows = []
    for field in fields(DEFAULT_PROTOCOL_LIMITS):
        value = getattr(DEFAULT_PROTOCOL_LIMITS, field.name)
        shown = _bytes_text(value) if field.name.endswith("_bytes_max") else f"{value:,}"
        rows.append((f"`{field.name}`", shown, LIMIT_DESCRIPTIONS[field.name]))
    return _table(("limit", "default", "bounds"), rows)


def render_example() -> str:
    frame = encode_message(HandshakeRequest(request_id=1, client_id="demo"), 1)
    lines = [f"{offset:04x}  {frame[offset : offset + 16].hex(' ')}" for offset in range(0, len(frame), 16)]
    return "```\n" + "\n".join(lines) + "\n```"


BLOCKS = {
    "example": render_example,
    "states": render_states,
    "apis": render_apis,
    "error-response": render_error_response,
    "events": render_events,
    "errors": render_errors,
    "limits": render_limits,
}

_BLOCK = re.compile(
    r"(<!-- BEGIN GENERATED (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED (?P=name) -->)",
    re.DOTALL,
)


def update_document(text: str) -> str:
    """`text` with every generated block re-rendered. Every block must be present."""
    seen = set()

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        seen.add(name)
        return f"{match.group(1)}\n{BLOCKS[name]()}\n\n{match.group(4)}"

    updated = _BLOCK.sub(replace, text)
    missing = set(BLOCKS) - seen
    if missing:
        raise ValueError(f"docs/protocol.md lacks generated blocks: {', '.join(sorted(missing))}")
    return updated


def rewrite_generated(path: str | Path, update: Callable[[str], str]) -> int:
    """The command line of a docs generator: rewrite the file at `path` with `update`
    (its generated blocks re-rendered), saying so when anything changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    updated = update(text)
    if updated != text:
        path.write_text(updated, encoding="utf-8")
        print(f"updated {path}")
    return 0


def main(argv: list[str]) -> int:
    return rewrite_generated(argv[1] if len(argv) > 1 else "docs/protocol.md", update_document)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
