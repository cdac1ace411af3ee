"""HTML for the console: escaped string building, no template engine. Every value that
comes from the broker or the request goes through `escape` (or `link`, `table`, which
escape their parts); a Markup string is HTML this module built and passes through."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Sequence
from html import escape as _escape
from urllib.parse import urlencode

# A value or key shows at most this many bytes (a message may hold up to a megabyte).
VALUE_SHOWN_BYTES_MAX = 4096
# A value is tried as JSON only up to this size.
JSON_PARSE_BYTES_MAX = 256 * 1024


class Markup(str):
    """HTML built here: not escaped again."""


def escape(value: object) -> Markup:
    if isinstance(value, Markup):
        return value
    return Markup(_escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[object]) -> Markup:
    return Markup("".join(escape(part) for part in parts))


def url(path: str, **params: object) -> str:
    query = urlencode({name: value for name, value in params.items() if value is not None and value != ""})
    return f"{path}?{query}" if query else path


def link(text: object, path: str, **params: object) -> Markup:
    return Markup(f'<a href="{escape(url(path, **params))}">{escape(text)}</a>')


def table(headings: Sequence[str], rows: Iterable[Sequence[object]], *, table_id: str = "") -> Markup:
    head = "".join(f"<th>{escape(heading)}</th>" for heading in headings)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headings)}" class="empty">none</td></tr>'
    identity = f' id="{escape(table_id)}"' if table_id else ""
    return Markup(f"<table{identity}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def hidden(**fields: object) -> Markup:
    return join(
        Markup(f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">')
        for name, value in fields.items()
        if value is not None
    )


def size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def time_ms(value: int | None) -> str:
    """A wall-clock time in ms since the epoch as ISO-8601 UTC (millisecond precision)."""
    if value is None or value < 0:
        return "-"
    moment = datetime.datetime.fromtimestamp(value / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def duration_ms(value: int) -> str:
    seconds = value // 1000
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m {seconds}s"


def show_bytes(data: bytes | None) -> tuple[str, str]:
    """(kind, text) of a key, value or header value: "null", "json" (indented), "text"
    (UTF-8 without control characters but newline and tab) or "hex"; at most
    VALUE_SHOWN_BYTES_MAX bytes of it, with a note of the full size when cut."""
    if data is None:
        return "null", ""
    cut = len(data) > VALUE_SHOWN_BYTES_MAX
    note = f"\n... ({len(data)} bytes, the first {VALUE_SHOWN_BYTES_MAX} shown)" if cut else ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "hex", data[:VALUE_SHOWN_BYTES_MAX].hex(" ") + note
    if len(data) <= JSON_PARSE_BYTES_MAX and text[:1] in '{["':
        try:
            shown = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            pass
        else:
            if len(shown) > VALUE_SHOWN_BYTES_MAX:
                return "json", shown[:VALUE_SHOWN_BYTES_MAX] + f"\n... ({len(data)} bytes)"
            return "json", shown
    if any(character < " " and character not in "\n\t\r" for character in text[:VALUE_SHOWN_BYTES_MAX]):
        return "hex", data[:VALUE_SHOWN_BYTES_MAX].hex(" ") + note
    return "text", text[:VALUE_SHOWN_BYTES_MAX] + note


def sparkline(values: Sequence[float], *, label: str, width: int = 320, height: int = 60) -> Markup:
    """An inline SVG line of `values` (oldest first), scaled to its own maximum."""
    if len(values) < 2:
        return Markup(f'<p class="chart-empty">{escape(label)}: gathering samples</p>')
    top = max(max(values), 1e-9)
    step = width / (len(values) - 1)
    points = " ".join(
        f"{index * step:.1f},{height - value / top * (height - 4) - 2:.1f}" for index, value in enumerate(values)
    )
    return Markup(
        f'<figure class="chart"><svg width="{width}" height="{height}" role="img" aria-label="{escape(label)}">'
        f'<polyline fill="none" stroke="#2a6" stroke-width="2" points="{points}"/></svg>'
        f"<figcaption>{escape(label)}: now {values[-1]:.1f}/s, max {max(values):.1f}/s</figcaption></figure>"
    )


NAVIGATION = (
    ("Overview", "/"),
    ("Stream groups", "/groups"),
    ("Queue groups", "/queues"),
    ("Dead letters", "/dead-letters"),
)

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#234;color:#fff;padding:.5em 1em}header a{color:#fff;margin-right:1.2em;text-decoration:none}
header strong{margin-right:2em}main{padding:1em 1.5em}
table{border-collapse:collapse;margin:.5em 0 1.2em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#eee}td.empty{color:#888}pre{margin:0;white-space:pre-wrap;word-break:break-all;
max-width:60em}.kind{color:#777;font-size:.8em}.error{background:#fdd;border:1px solid #c66;padding:.6em}
.notice{background:#dfd;border:1px solid #6a6;padding:.6em}form{margin:.5em 0}fieldset{margin:.6em 0;max-width:50em}
.chart{display:inline-block;margin:0 1.5em 0 0}.chart svg{background:#fff;border:1px solid #ccc}
.paging a{margin-right:1em}form.inline{display:inline;margin-left:1em}.user{margin-left:2em;color:#ddd}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dd{margin:0}
"""


def layout(title: str, body: Markup, *, user: str | None = None, form_token: str | None = None) -> bytes:
    """A whole page; with `user`, who is signed in, and with `form_token` a sign-out button."""
    navigation = "".join(f'<a href="{escape(path)}">{escape(name)}</a>' for name, path in NAVIGATION)
    if user is not None:
        navigation += f'<span class="user" id="user">{escape(user)}</span>'
        if form_token is not None:
            navigation += (
                f'<form method="post" action="/logout" id="logout" class="inline">{hidden(token=form_token)}'
                '<button type="submit">Sign out</button></form>'
            )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{escape(title)} - nodi console</title><style>{STYLE}</style></head>"
        f"<body><header><strong>nodi</strong>{navigation}</header><main><h1>{escape(title)}</h1>{body}</main>"
        "</body></html>"
    ).encode()


def facts(pairs: Iterable[tuple[str, object]]) -> Markup:
    return Markup(
        "<dl>" + "".join(f"<dt>{escape(name)}</dt><dd>{escape(value)}</dd>" for name, value in pairs) + "</dl>"
    )
