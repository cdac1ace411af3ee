"""The console's pages: plain functions of a blocking Client and a Request that return
HTML. They read through the same client calls as the `nodi` commands, and every write
(a group reset, a dead-letter redrive or purge) calls the same code as its command
(Client.reset_group, broker/client/dead_letters.py). They run on a console worker
thread, never on the broker's event loop.

Reading never loads a whole partition: the message browser fetches at most
PAGE_BYTES_MAX of batches for a page (a key search SEARCH_BYTES_MAX), and offers a link
to go on from where it stopped.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

from ..client import dead_letters
from ..client.sync_client import Client
from ..client.types import Message
from ..protocol import headers as h
from ..server.dead_letters import DEAD_LETTER_HEADERS
from ..server.users import Action, Principal, Resource
from .http import Request
from .render import (
    Markup,
    duration_ms,
    escape,
    facts,
    hidden,
    join,
    link,
    show_bytes,
    size,
    sparkline,
    table,
    time_ms,
    url,
)

# Messages on one browser page, by default and at most.
PAGE_MESSAGES_DEFAULT = 20
PAGE_MESSAGES_MAX = 100
# Batch bytes one browser page fetches at most (plus at most one batch: a fetch returns
# at least one whole batch).
PAGE_BYTES_MAX = 4 * 1024 * 1024
# Bytes one fetch asks for.
FETCH_BYTES = 256 * 1024
# Batch bytes one page of a key search reads at most before it offers to go on.
SEARCH_BYTES_MAX = 16 * 1024 * 1024
# Groups, topics and dead letters listed on one page at most.
LISTED_MAX = 500
DEAD_LETTERS_SHOWN_MAX = 100
# In-flight messages (leases, retries) on one queue group page.
LEASES_SHOWN_MAX = 50

RESERVED_HEADERS = {
    h.TTL_MS: "time to live: the message expires this long after its timestamp",
    h.NOT_BEFORE_MS: "delay: queue groups deliver it at or after this time",
    h.IDEMPOTENCY_KEY: "publish dedup key within the topic's dedup window",
    h.REPLY_TO: "request-reply: the requester's inbox",
    h.CORRELATION_ID: "request-reply: matches a reply to its request",
    h.DLQ_VALUE_OMITTED: "the dead-lettered copy left the value out (too big); the source has it",
    **DEAD_LETTER_HEADERS,
}
TIME_HEADERS = {h.NOT_BEFORE_MS, h.DLQ_SOURCE_TIMESTAMP_MS, h.DLQ_FIRST_DELIVERY_MS, h.DLQ_LAST_DELIVERY_MS}
TIME_HEADERS.add(h.DLQ_DEAD_LETTERED_MS)


class PageError(Exception):
    """A request the console answers with an error page: `status` and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Refused(Exception):
    """The principal may not do `action` on `resource` `name`: a 403 page, a log line
    with the principal, and the refusal metric (the console counts it)."""

    def __init__(self, action: Action, resource: Resource, name: str, what: str, principal: str) -> None:
        super().__init__(f"{principal} may not {action.value} {resource.value} {name}")
        self.action = action
        self.resource = resource
        self.name = name
        self.what = what


def require(request: Request, action: Action, resource: Resource, name: str, what: str) -> None:
    """Refused unless the request's principal may do `action` on `name` (Principal.may:
    the check of nodi's protocol)."""
    principal: Principal = request.principal
    if not principal.may(action, resource, name):
        raise Refused(action, resource, name, what, principal.name)


def may_see_topic(request: Request, name: str) -> bool:
    """A topic is listed to whoever may produce, consume or administer it."""
    principal: Principal = request.principal
    return any(principal.may(action, Resource.TOPIC, name) for action in Action)


def may_see_group(request: Request, name: str) -> bool:
    """A group is listed to whoever may consume in it or administer it."""
    principal: Principal = request.principal
    return principal.may(Action.CONSUME, Resource.GROUP, name) or principal.may(Action.ADMIN, Resource.GROUP, name)


def require_topic_visible(request: Request, name: str, what: str) -> None:
    if not may_see_topic(request, name):
        principal: Principal = request.principal
        raise Refused(Action.CONSUME, Resource.TOPIC, name, what, principal.name)


def require_group_visible(request: Request, name: str, what: str) -> None:
    if not may_see_group(request, name):
        principal: Principal = request.principal
        raise Refused(Action.CONSUME, Resource.GROUP, name, what, principal.name)


@dataclass(frozen=True, slots=True)
class Page:
    title: str
    body: Markup


@dataclass(frozen=True, slots=True)
class WriteAction:
    """A confirmed write: its name and target (for the permission check and the log)
    and the function that does it, returning what it did as one line."""

    action: str
    target: str
    run: Callable[[], str]
    # What the principal must be allowed (the requests the action makes need these).
    needs: tuple[tuple[Action, Resource, str], ...] = ()


def _integer(request: Request, name: str, default: int | None = None, minimum: int = 0) -> int | None:
    text = request.param(name)
    if not text:
        return default
    if not text.lstrip("-").isdigit() or len(text) > 20:
        raise PageError(400, f"{name} must be an integer, not {text!r}")
    value = int(text)
    if value < minimum:
        raise PageError(400, f"{name} must be at least {minimum}")
    return value


def _required(request: Request, name: str) -> str:
    value = request.param(name)
    if not value:
        raise PageError(400, f"missing parameter {name}")
    return value


def parse_time_ms(text: str) -> int:
    """ms since the epoch from digits, or from an ISO-8601 time (UTC without a zone)."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise PageError(400, f"time {text!r} is neither ms since the epoch nor ISO-8601") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


# -- overview ---------------------------------------------------------------------------


def overview(client: Client, request: Request, rates: dict[str, list[float]]) -> Page:
    status = client.server_status()
    topics = [summary for summary in client.list_topics() if may_see_topic(request, summary.name)][:LISTED_MAX]
    rows = []
    total_bytes = 0
    for summary in topics:
        description = client.describe_topic(summary.name)
        stored = sum(p.size for p in description.partitions)
        total_bytes += stored
        rows.append(
            (
                link(summary.name, "/topic", name=summary.name),
                summary.partitions,
                sum(p.high_watermark - p.log_start_offset for p in description.partitions),
                size(stored),
                sum(p.segments for p in description.partitions),
                description.settings.cleanup_policy,
            )
        )
    disk = "-"
    if status.disk_free_bytes is not None and status.disk_total_bytes is not None:
        disk = f"{size(status.disk_free_bytes)} free of {size(status.disk_total_bytes)}"
    charts = join(
        sparkline(values, label=label)
        for label, values in (
            ("messages in", rates.get("messages_in", [])),
            ("messages committed by stream groups", rates.get("messages_committed", [])),
        )
    )
    problems = Markup("")
    if status.read_only_partitions or status.damaged_partitions or status.metadata_store_error:
        problems = Markup(
            f'<p class="error">read-only partitions: {escape(status.read_only_partitions or "none")}; '
            f"damaged partitions: {escape(len(status.damaged_partitions))}; "
            f"metadata store: {escape(status.metadata_store_error or 'ok')}</p>"
        )
    body = join(
        [
            problems,
            facts(
                [
                    ("version", status.version),
                    ("uptime", duration_ms(status.uptime_ms)),
                    ("data directory", status.data_dir or "(shown to superusers)"),
                    ("connections open", status.connections_open),
                    ("connections accepted", status.connections_accepted),
                    ("disk", disk),
                    ("retained", size(total_bytes)),
                ]
            ),
            Markup("<h2>Rates over the last minutes</h2>"),
            charts,
            Markup("<h2>Topics</h2>"),
            table(("TOPIC", "PARTITIONS", "MESSAGES", "BYTES", "SEGMENTS", "CLEANUP"), rows, table_id="topics"),
        ]
    )
    return Page("Overview", body)


def rate_sample(client: Client) -> dict[str, int]:
    """Counters the overview's charts are made of: the sum of every partition's log end
    offset, and of every stream group's committed offsets (at most LISTED_MAX groups)."""
    produced = 0
    for summary in client.list_topics()[:LISTED_MAX]:
        produced += sum(p.log_end_offset for p in client.describe_topic(summary.name).partitions)
    committed = 0
    for group in client.list_groups()[:LISTED_MAX]:
        committed += sum(client.fetch_offsets(group.group).values())
    return {"messages_in": produced, "messages_committed": committed}


# -- a topic ----------------------------------------------------------------------------


def topic(client: Client, request: Request) -> Page:
    name = _required(request, "name")
    require_topic_visible(request, name, "console topic page")
    description = client.describe_topic(name)
    settings = description.settings
    partitions = table(
        ("PARTITION", "START", "END", "HIGH WATERMARK", "BYTES", "SEGMENTS", ""),
        (
            (
                p.partition,
                p.log_start_offset,
                p.log_end_offset,
                p.high_watermark,
                size(p.size),
                p.segments,
                link("browse", "/messages", topic=name, partition=p.partition),
            )
            for p in description.partitions
        ),
        table_id="partitions",
    )
    stream_rows = []
    for group in [g for g in client.list_groups() if may_see_group(request, g.group)][:LISTED_MAX]:
        lags = [lag for lag in client.describe_group(group.group).lags if lag.topic == name]
        if lags:
            total = sum(lag.lag for lag in lags if lag.lag is not None)
            stream_rows.append((link(group.group, "/group", name=group.group), group.state, group.members, total))
    queue_rows = [
        (
            link(queue.group, "/queue", topic=name, group=queue.group),
            queue.pending,
            queue.leased,
            link(queue.dead_letter_topic, "/dead-letter", topic=queue.dead_letter_topic),
        )
        for queue in client.list_queues(name)
        if may_see_group(request, queue.group)
    ]
    body = join(
        [
            Markup("<h2>Settings</h2>"),
            facts(
                [
                    ("partitions", settings.partitions),
                    ("retention_ms", settings.retention_ms),
                    ("retention_bytes", settings.retention_bytes),
                    ("cleanup_policy", settings.cleanup_policy),
                    ("fsync_policy", settings.fsync_policy),
                    ("fsync_interval_ms", settings.fsync_interval_ms),
                    ("segment_bytes", settings.segment_bytes),
                    ("segment_ms", settings.segment_ms),
                    ("ttl_ms", settings.ttl_ms),
                    ("dedup_window_ms", settings.dedup_window_ms),
                ]
            ),
            Markup("<h2>Partitions</h2>"),
            partitions,
            Markup("<h2>Stream groups</h2>"),
            table(("GROUP", "STATE", "MEMBERS", "LAG"), stream_rows, table_id="stream-groups"),
            Markup("<h2>Queue groups</h2>"),
            table(("GROUP", "PENDING", "LEASED", "DEAD-LETTER TOPIC"), queue_rows, table_id="queue-groups"),
        ]
    )
    return Page(f"Topic {name}", body)


# -- the message browser ------------------------------------------------------------------


def _header_rows(message: Message) -> Markup:
    rows = []
    for name, value in message.headers:
        kind, text = show_bytes(value)
        meaning = RESERVED_HEADERS.get(name, "reserved by nodi" if h.is_reserved(name) else "")
        if name in TIME_HEADERS and value is not None and value.isdigit():
            text = f"{text} ({time_ms(int(value))})"
        rows.append(f"<li><code>{escape(name)}</code> = {escape(text)} <span class=kind>{escape(meaning)}</span></li>")
    return Markup("<ul>" + "".join(rows) + "</ul>") if rows else Markup("")


def _message_rows(messages: list[Message]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for message in messages:
        key_kind, key_text = show_bytes(message.key)
        value_kind, value_text = show_bytes(message.value)
        rows.append(
            (
                message.offset,
                time_ms(message.timestamp),
                Markup(f"<pre>{escape(key_text)}</pre><span class=kind>{escape(key_kind)}</span>"),
                Markup(f"<pre>{escape(value_text)}</pre><span class=kind>{escape(value_kind)}</span>"),
                _header_rows(message),
            )
        )
    return rows


def read_page(
    client: Client, topic: str, partition: int, start: int, end: int, count: int, bytes_max: int, key: bytes | None
) -> tuple[list[Message], int]:
    """Messages from `start` (up to `end`, the high watermark): at most `count` (only
    those with key `key` when given), reading at most about `bytes_max` bytes of batches.
    Returns them and the offset to go on from."""
    found: list[Message] = []
    position = start
    read = 0
    while position < end and len(found) < count and read < bytes_max:
        messages, following = client.fetch_with_position(
            topic, partition, position, bytes_max=min(FETCH_BYTES, bytes_max - read), include_expired=True
        )
        if not messages:
            break
        read += sum(len(m.value or b"") + len(m.key or b"") for m in messages)
        for message in messages:
            if message.offset < position or (key is not None and message.key != key):
                continue
            found.append(message)
            if len(found) == count:
                return found, message.offset + 1
        position = following
    return found, position


def messages(client: Client, request: Request) -> Page:
    name = _required(request, "topic")
    require(request, Action.CONSUME, Resource.TOPIC, name, "console message browser")
    partition = _integer(request, "partition", 0)
    count = min(_integer(request, "count", PAGE_MESSAGES_DEFAULT, minimum=1) or 1, PAGE_MESSAGES_MAX)
    description = client.describe_topic(name)
    numbers = [p.partition for p in description.partitions]
    if partition not in numbers:
        raise PageError(404, f"topic {name!r} has no partition {partition}")
    state = description.partitions[numbers.index(partition)]
    low, high = state.log_start_offset, state.high_watermark
    key_text = request.param("key")
    time_text = request.param("time")
    offset = _integer(request, "offset")
    if key_text:
        start = max(low, min(offset if offset is not None else low, high))
        found, following = read_page(client, name, partition, start, high, count, SEARCH_BYTES_MAX, key_text.encode())
        mode = f"key {key_text!r}: searched offsets {start} to {following - 1}"
    else:
        if time_text:
            start = client.list_offsets(name, partition, parse_time_ms(time_text))
            mode = f"from time {time_text}: first offset at or after it is {start}"
        elif offset is not None:
            start = max(low, min(offset, high))
            mode = f"from offset {start}"
        else:
            start = max(low, high - count)
            mode = "the latest messages"
        found, following = read_page(client, name, partition, start, high, count, PAGE_BYTES_MAX, None)
    base = {"topic": name, "partition": partition, "count": count, "key": key_text or None}
    paging = []
    if not key_text and start > low:
        paging.append(link("older", "/messages", offset=max(low, start - count), **base))
    if following < high:
        paging.append(link("search on" if key_text else "newer", "/messages", offset=following, **base))
    paging.append(link("latest", "/messages", **base))
    partition_options = "".join(
        f'<option value="{number}"{" selected" if number == partition else ""}>{number}</option>' for number in numbers
    )
    form = Markup(
        '<form method="get" action="/messages" id="browse">'
        f"{hidden(topic=name)}"
        f'<label>partition <select name="partition">{partition_options}</select></label> '
        f'<label>offset <input name="offset" size="10" value="{escape(offset if offset is not None else "")}"></label> '
        f'<label>or time <input name="time" size="24" placeholder="2026-01-31T12:00:00Z" value="{escape(time_text)}"></label> '
        f'<label>key <input name="key" size="16" value="{escape(key_text)}"></label> '
        f'<label>count <input name="count" size="4" value="{count}"></label> '
        '<button type="submit">Show</button></form>'
    )
    body = join(
        [
            Markup(f"<p>{link(name, '/topic', name=name)} partition {partition}: offsets {low} to {high - 1}</p>"),
            form,
            Markup(f'<p id="mode">{escape(mode)}; {len(found)} message(s)</p>'),
            table(("OFFSET", "TIME", "KEY", "VALUE", "HEADERS"), _message_rows(found), table_id="messages"),
            Markup('<p class="paging">' + "".join(paging) + "</p>"),
        ]
    )
    return Page(f"Messages of {name}-{partition}", body)


# -- stream groups ------------------------------------------------------------------------


def groups(client: Client, request: Request) -> Page:
    rows = []
    for summary in [g for g in client.list_groups() if may_see_group(request, g.group)][:LISTED_MAX]:
        lags = client.describe_group(summary.group).lags
        total = sum(lag.lag for lag in lags if lag.lag is not None)
        topics = sorted({lag.topic for lag in lags})
        rows.append(
            (
                link(summary.group, "/group", name=summary.group),
                summary.state,
                summary.members,
                ", ".join(topics),
                total,
            )
        )
    return Page("Stream groups", table(("GROUP", "STATE", "MEMBERS", "TOPICS", "LAG"), rows, table_id="groups"))


def group(client: Client, request: Request, token: str) -> Page:
    name = _required(request, "name")
    require_group_visible(request, name, "console group page")
    description = client.describe_group(name)
    owners = {
        (topic_name, number): member.member_id
        for member in description.members
        for topic_name, numbers in member.assignments.items()
        for number in numbers
    }
    members = table(
        ("MEMBER", "CLIENT", "SESSION MS", "PARTITIONS"),
        (
            (
                member.member_id,
                member.client_id,
                member.session_timeout_ms,
                " ".join(f"{t}:{','.join(map(str, sorted(p)))}" for t, p in sorted(member.assignments.items())),
            )
            for member in description.members
        ),
        table_id="members",
    )
    lags = sorted(description.lags, key=lambda lag: (lag.topic, lag.partition))
    lag_rows = table(
        ("TOPIC", "PARTITION", "COMMITTED", "HIGH WATERMARK", "LAG", "MEMBER"),
        (
            (
                link(lag.topic, "/topic", name=lag.topic),
                lag.partition,
                "-" if lag.committed_offset is None else lag.committed_offset,
                lag.high_watermark,
                "-" if lag.lag is None else lag.lag,
                owners.get((lag.topic, lag.partition), "-"),
            )
            for lag in lags
        ),
        table_id="lags",
    )
    topics = sorted({lag.topic for lag in lags})
    topic_options = "".join(f'<option value="{escape(t)}">{escape(t)}</option>' for t in topics)
    reset = Markup(
        "<h2>Reset (replay or skip)</h2><p>The group must have no members: stop its consumers first.</p>"
        '<form method="post" action="/group/reset" id="reset"><fieldset>'
        f"{hidden(name=name, token=token)}"
        f'<label>topic <select name="topic">{topic_options}</select></label> '
        '<label>partition <input name="partition" size="4" placeholder="all"></label><br>'
        '<label><input type="radio" name="to" value="earliest" checked> earliest</label> '
        '<label><input type="radio" name="to" value="latest"> latest</label> '
        '<label><input type="radio" name="to" value="offset"> offset</label> '
        '<label><input type="radio" name="to" value="time"> time</label> '
        '<label>offset or time <input name="value" size="24"></label> '
        '<button type="submit">Review the reset</button></fieldset></form>'
    )
    body = join(
        [
            Markup(
                f"<p>{escape(description.state)}, generation {escape(description.generation)}, "
                f"{len(description.members)} member(s), total lag "
                f"{sum(lag.lag for lag in lags if lag.lag is not None)}</p>"
            ),
            Markup("<h2>Members</h2>"),
            members,
            Markup("<h2>Committed offsets and lag</h2>"),
            lag_rows,
            reset if topics else Markup(""),
        ]
    )
    return Page(f"Stream group {name}", body)


def group_reset(client: Client, request: Request) -> tuple[str, Markup, WriteAction]:
    """What a reset will do (the confirmation's text and fields) and the action itself."""
    name = _required(request, "name")
    topic_name = _required(request, "topic")
    to = request.param("to", "earliest")
    value = request.param("value")
    partition = _integer(request, "partition")
    target: str | int | datetime.datetime
    if to in ("earliest", "latest"):
        target = to
        where = to
    elif to == "offset":
        if not value.isdigit():
            raise PageError(400, f"offset {value!r} is not a non-negative integer")
        target, where = int(value), f"offset {value}"
    elif to == "time":
        moment_ms = parse_time_ms(value)
        target = datetime.datetime.fromtimestamp(moment_ms / 1000, tz=datetime.UTC)
        where = f"the first message at or after {time_ms(moment_ms)}"
    else:
        raise PageError(400, f"to must be earliest, latest, offset or time, not {to!r}")
    partitions = None if partition is None else [partition]
    scope = "every partition" if partition is None else f"partition {partition}"
    text = f"Reset group {name!r} on topic {topic_name!r}, {scope}, to {where}."
    fields = hidden(name=name, topic=topic_name, to=to, value=value, partition=partition)

    def run() -> str:
        offsets = client.reset_group(name, topic_name, target, partitions=partitions)
        done = ", ".join(f"{number}: {offset}" for number, offset in sorted(offsets.items()))
        return f"group {name} on {topic_name} reset to {where}: partition -> offset {done}"

    needs = ((Action.ADMIN, Resource.GROUP, name),)  # what ResetGroup needs
    return text, fields, WriteAction("group.reset", f"{name}@{topic_name}", run, needs)


# -- queue groups ---------------------------------------------------------------------------


def queues(client: Client, request: Request) -> Page:
    rows = [
        (
            link(queue.group, "/queue", topic=queue.topic, group=queue.group),
            link(queue.topic, "/topic", name=queue.topic),
            queue.pending,
            queue.leased,
            queue.dead_letters_pending,
            link(queue.dead_letter_topic, "/dead-letter", topic=queue.dead_letter_topic),
        )
        for queue in [
            q for q in client.list_queues() if may_see_group(request, q.group) and may_see_topic(request, q.topic)
        ][:LISTED_MAX]
    ]
    return Page(
        "Queue groups",
        table(("GROUP", "TOPIC", "PENDING", "LEASED", "DEAD-LETTERING", "DEAD-LETTER TOPIC"), rows, table_id="queues"),
    )


def queue(client: Client, request: Request) -> Page:
    topic_name = _required(request, "topic")
    name = _required(request, "group")
    require_topic_visible(request, topic_name, "console queue group page")
    require_group_visible(request, name, "console queue group page")
    description = client.describe_queue(topic_name, name)
    backoff = description.backoff
    retries = (
        f"after {', '.join(map(str, backoff.delays_ms))} ms"
        if backoff.delays_ms
        else f"exponential from {backoff.base_ms} ms x{backoff.multiplier_percent / 100:g} up to "
        f"{backoff.max_ms} ms, jitter {backoff.jitter_percent}%"
    )
    body = join(
        [
            facts(
                [
                    ("topic", link(topic_name, "/topic", name=topic_name)),
                    ("ack wait", f"{description.ack_wait_ms} ms"),
                    ("max deliveries", description.max_deliveries),
                    ("retries", retries),
                    ("expired messages", description.expired),
                    (
                        "dead-letter topic",
                        link(description.dead_letter_topic, "/dead-letter", topic=description.dead_letter_topic),
                    ),
                    ("delivered since start", description.delivered),
                ]
            ),
            Markup("<h2>Partitions</h2>"),
            table(
                ("PARTITION", "ACK FLOOR", "NEXT NEVER DELIVERED", "PENDING", "LEASED (IN FLIGHT)", "DEAD-LETTERING"),
                (
                    (p.partition, p.ack_floor, p.next_offset, p.pending, p.leased, p.dead_letters_pending)
                    for p in description.partitions
                ),
                table_id="queue-partitions",
            ),
            Markup("<h2>In flight</h2>"),
            _in_flight(client, request, topic_name, name),
        ]
    )
    return Page(f"Queue group {name} on {topic_name}", body)


def _in_flight(client: Client, request: Request, topic_name: str, name: str) -> Markup:
    """One page of the group's in-flight messages (QueueLeases), by partition and offset:
    shown to whoever may consume in the group and the topic, as QueueLeases asks."""
    principal: Principal = request.principal
    if not (
        principal.may(Action.CONSUME, Resource.GROUP, name)
        and principal.may(Action.CONSUME, Resource.TOPIC, topic_name)
    ):
        return Markup("<p>Listing the messages in flight needs consume on the group and on the topic.</p>")
    after_partition = _integer(request, "after_partition", -1, minimum=-1)
    after_offset = _integer(request, "after_offset", -1, minimum=-1)
    assert after_partition is not None and after_offset is not None  # they have defaults
    after = None if after_partition == -1 else (after_partition, after_offset)
    page = client.queue_leases(topic_name, name, after=after, limit=LEASES_SHOWN_MAX)
    rows = [
        (
            lease.partition,
            link(lease.offset, "/messages", topic=topic_name, partition=lease.partition, offset=lease.offset),
            lease.state,
            lease.delivery_count,
            time_ms(lease.lease_deadline_ms),
            "now" if lease.not_before_ms == 0 else time_ms(lease.not_before_ms),
            time_ms(lease.last_delivery_ms),
            lease.last_error or "-",
        )
        for lease in page.leases
    ]
    parts: list[object] = [
        table(
            (
                "PARTITION",
                "OFFSET",
                "STATE",
                "DELIVERIES",
                "LEASE DEADLINE",
                "NEXT RETRY DUE",
                "LAST DELIVERY",
                "LAST ERROR",
            ),
            rows,
            table_id="queue-leases",
        )
    ]
    if page.next_after is not None:
        next_partition, next_offset = page.next_after
        parts.append(
            link(
                "next page",
                "/queue",
                topic=topic_name,
                group=name,
                after_partition=next_partition,
                after_offset=next_offset,
            )
        )
    return join(parts)


# -- dead letters ---------------------------------------------------------------------------


def dead_letter_list(client: Client, request: Request) -> Page:
    rows = []
    require(request, Action.CONSUME, Resource.GROUP, dead_letters.CURSOR_GROUP, "console dead letters")
    visible = [
        (name, writers)
        for name, writers in dead_letters.dead_letter_topics(client).items()
        if request.principal.may(Action.CONSUME, Resource.TOPIC, name)
    ]
    for name, writers in visible[:LISTED_MAX]:
        waiting = dead_letters.waiting(client, name)
        description = client.describe_topic(name)
        stored = sum(p.high_watermark - p.log_start_offset for p in description.partitions)
        rows.append((link(name, "/dead-letter", topic=name), waiting, stored, ", ".join(writers) or "-"))
    return Page(
        "Dead letters", table(("TOPIC", "WAITING", "STORED", "QUEUE GROUPS"), rows, table_id="dead-letter-topics")
    )


def _require_dead_letter_topic(client: Client, name: str) -> None:
    if name not in dead_letters.dead_letter_topics(client):
        known = {summary.name for summary in client.list_topics()}
        if name not in known:
            raise PageError(404, f"no topic {name!r}")
        raise PageError(400, f"{name!r} is not a dead-letter topic: no queue group dead-letters into it")


def dead_letter(client: Client, request: Request, token: str) -> Page:
    name = _required(request, "topic")
    for action, resource, needed in _cursor_needs(name):
        require(request, action, resource, needed, "console dead letters")
    _require_dead_letter_topic(client, name)
    count = min(_integer(request, "count", 20, minimum=1) or 1, DEAD_LETTERS_SHOWN_MAX)
    waiting = dead_letters.waiting(client, name)
    rows = []
    for partition, message in dead_letters.entries(client, name, count):

        def text(header: str, message: Message = message) -> str:
            return dead_letters.header_text(message, header) or "-"

        value_kind, value_text = show_bytes(message.value)
        rows.append(
            (
                Markup(
                    f'<label><input type="checkbox" name="pick-{partition}-{message.offset}" value="yes"> '
                    f"{partition}</label>"
                ),
                message.offset,
                f"{text(h.DLQ_SOURCE_TOPIC)}-{text(h.DLQ_SOURCE_PARTITION)}@{text(h.DLQ_SOURCE_OFFSET)}",
                text(h.DLQ_GROUP),
                text(h.DLQ_REASON),
                text(h.DLQ_DELIVERY_COUNT),
                text(h.DLQ_LAST_ERROR),
                time_ms(message.timestamp),
                Markup(f"<pre>{escape(value_text)}</pre><span class=kind>{escape(value_kind)}</span>"),
            )
        )
    actions = Markup(
        "<h2>Redrive or purge</h2><p>Both start at the cursor (the first entry not yet handled). Redrive "
        "republishes each entry to its source topic (or the topic given) and moves the cursor past it; purge "
        "only moves the cursor. Nothing is deleted from disk.</p>"
        '<form method="post" action="/dead-letter/redrive" id="redrive"><fieldset>'
        f"{hidden(topic=name, token=token)}"
        '<label>how many <input name="count" size="6" placeholder="all"></label> '
        '<label>to topic <input name="to" size="20" placeholder="each one\'s source"></label> '
        '<button type="submit">Review the redrive</button></fieldset></form>'
        '<form method="post" action="/dead-letter/purge" id="purge"><fieldset>'
        f"{hidden(topic=name, token=token)}"
        '<label>how many <input name="count" size="6" placeholder="all"></label> '
        '<button type="submit">Review the purge</button></fieldset></form>'
    )
    body = join(
        [
            Markup(
                f'<p id="waiting">{waiting} entr{"y" if waiting == 1 else "ies"} waiting; the first {len(rows)} shown</p>'
            ),
            Markup(f'<form method="post" action="/dead-letter/redrive" id="picked">{hidden(topic=name, token=token)}'),
            table(
                (
                    "PARTITION",
                    "OFFSET",
                    "SOURCE",
                    "GROUP",
                    "REASON",
                    "DELIVERIES",
                    "LAST ERROR",
                    "DEAD-LETTERED",
                    "VALUE",
                ),
                rows,
                table_id="dead-letters",
            ),
            Markup(
                '<fieldset><label>to topic <input name="to" size="20" placeholder="each one\'s source"></label> '
                '<button type="submit" id="redrive-picked">Review the redrive of the ticked entries</button> '
                '<button type="submit" id="purge-picked" formaction="/dead-letter/purge">'
                "Review the purge of the ticked entries</button></fieldset></form>"
            ),
            Markup(f"<p>{link('browse every entry with its headers', '/messages', topic=name)}</p>"),
            actions,
        ]
    )
    return Page(f"Dead letters in {name}", body)


def dead_letter_write(client: Client, request: Request, kind: str) -> tuple[str, Markup, WriteAction]:
    name = _required(request, "topic")
    require(request, Action.CONSUME, Resource.TOPIC, name, f"console dead letters {kind}")
    _require_dead_letter_topic(client, name)
    count = _integer(request, "count", minimum=1)
    to = request.param("to") or None
    picked = _picked(request)
    how_many = "every waiting entry" if count is None else f"the next {count} entr{'y' if count == 1 else 'ies'}"
    fields = hidden(topic=name, count=count, to=to)
    if picked is not None:
        if count is not None:
            raise PageError(400, "give ticked entries or a count, not both")
        listed = ", ".join(f"{partition}:{offset}" for partition, offset in picked)
        how_many = f"the {len(picked)} ticked entr{'y' if len(picked) == 1 else 'ies'} (partition:offset {listed})"
        fields = hidden(topic=name, picked=listed, to=to)
    if kind == "redrive":
        where = f"topic {to!r}" if to else "each entry's source topic"
        text = f"Redrive {how_many} of {name!r} to {where}."

        def run() -> str:
            try:
                done = dead_letters.redrive(client, name, to=to, count=count, picked=picked)
            except dead_letters.DeadLetterNotWaiting as error:
                raise PageError(409, f"{error}: nothing was redriven") from None
            except dead_letters.DeadLetterWithoutSource as error:
                raise PageError(
                    409, f"{error}: give a topic to redrive to ({error.redriven} redriven before it)"
                ) from None
            return f"redrove {done} message(s) from {name}"

        needs = _cursor_needs(name) + (((Action.PRODUCE, Resource.TOPIC, to),) if to else ())
        return text, fields, WriteAction("dead-letters.redrive", name, run, needs)
    text = f"Purge {how_many} of {name!r}: move the cursor past them (they stay on disk until retention)."

    def purge() -> str:
        try:
            done = dead_letters.purge(client, name, count=count, picked=picked)
        except dead_letters.DeadLetterNotWaiting as error:
            raise PageError(409, f"{error}: nothing was purged") from None
        return f"purged {done} message(s) from {name}"

    return text, fields, WriteAction("dead-letters.purge", name, purge, _cursor_needs(name))


def _picked(request: Request) -> list[tuple[int, int]] | None:
    """The entries ticked on a dead-letter page (pick-P-O fields), or carried on from its
    confirmation (picked=P:O,P:O); None when none is."""
    texts = [key.removeprefix("pick-").replace("-", ":", 1) for key in request.form if key.startswith("pick-")]
    carried = request.param("picked")
    if carried:
        texts += carried.split(",")
    if not texts:
        return None
    if len(texts) > dead_letters.PICKED_MAX:
        raise PageError(400, f"at most {dead_letters.PICKED_MAX} entries may be ticked at once")
    pairs = set()
    for text in texts:
        partition, _, offset = text.strip().partition(":")
        if not (partition.isdigit() and offset.isdigit() and len(text) <= 40):
            raise PageError(400, f"a ticked entry is PARTITION:OFFSET, not {text[:40]!r}")
        pairs.add((int(partition), int(offset)))
    return sorted(pairs)


def _cursor_needs(name: str) -> tuple[tuple[Action, Resource, str], ...]:
    """What reading dead letters and moving their cursor need (Fetch, FetchOffsets,
    CommitOffsets of the group nodi.dlq); a redrive's produce to each entry's source
    topic is checked as it is sent, and refused before the cursor moves past it."""
    return (
        (Action.CONSUME, Resource.TOPIC, name),
        (Action.CONSUME, Resource.GROUP, dead_letters.CURSOR_GROUP),
    )


def confirmation(text: str, fields: Markup, action: str, token: str, back: str) -> Page:
    body = Markup(
        f'<p id="confirm-text">{escape(text)}</p>'
        f'<form method="post" action="{escape(action)}" id="confirm">{fields}{hidden(token=token, confirm="yes")}'
        f'<button type="submit">Confirm</button> <a href="{escape(back)}">Cancel</a></form>'
    )
    return Page("Confirm", body)


def done(line: str, back: str) -> Page:
    return Page(
        "Done", Markup(f'<p class="notice" id="done">{escape(line)}</p><p><a href="{escape(back)}">Back</a></p>')
    )


def back_of(path: str, request: Request) -> str:
    if path.startswith("/group"):
        return url("/group", name=request.param("name"))
    return url("/dead-letter", topic=request.param("topic"))
