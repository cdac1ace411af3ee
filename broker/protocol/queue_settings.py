"""A queue group's settings (ack wait, max deliveries, backoff, dead-letter topic) and
the server's queue limits; see broker/server/queues.py for the state machine."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from nodi.storage.errors import InvalidConfigError

# ---------------------------------------------------------------------------
# Settings and limits

ACK_WAIT_MS_DEFAULT = 30_000
MAX_DELIVERIES_DEFAULT = 5
DEAD_LETTER_SUFFIX = ".dlq"
DAY_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True, slots=True)
class QueueLimits:
    # Offsets in one partition's in-flight window [floor, next_offset).
    window_messages_max: int = 10_000
    # Messages one receive may ask for.
    receive_messages_max: int = 1_000
    # The longest long-poll a receive may ask for; longer waits are cut to it.
    receive_wait_max_ms: int = 30_000
    # A nack's error text or a reject's reason, UTF-8; longer text is cut to it.
    error_text_bytes_max: int = 1_024
    # Entries in a backoff list.
    backoff_delays_max: int = 100
    # Queue groups (group, topic) the server keeps state for.
    queue_groups_max: int = 10_000
    # First deliveries a partition may answer before their state is committed (the
    # reservation, committed ahead of them; after a crash each offset of it counts as
    # delivered once, so a smaller one means more receives wait for a commit and fewer
    # messages counted once too often after a crash).
    reservation_messages: int = 2_000

    def validate(self) -> None:
        for name in (
            "window_messages_max",
            "receive_messages_max",
            "receive_wait_max_ms",
            "error_text_bytes_max",
            "backoff_delays_max",
            "queue_groups_max",
            "reservation_messages",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidConfigError(f"queue limit {name} must be a positive integer, got {value!r}")


DEFAULT_QUEUE_LIMITS = QueueLimits()


def _check_integer(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidConfigError(f"queue setting {name} must be an integer in [{low}, {high}], got {value!r}")


@dataclass(frozen=True, slots=True)
class Backoff:
    """The delay before a nacked message (nacked without a delay) is delivered again.

    With `delays_ms` (a list) the n-th retry waits delays_ms[n-1], the last entry for
    every later one. Otherwise exponential: base_ms * (multiplier_percent/100)**(n-1),
    at most max_ms, plus a random jitter of up to jitter_percent of that delay (so the
    delay is never shorter than the nominal one). n is the delivery count of the nacked
    delivery: the first retry waits base_ms."""

    delays_ms: tuple[int, ...] = ()
    base_ms: int = 1_000
    multiplier_percent: int = 200
    max_ms: int = 60_000
    jitter_percent: int = 10

    @classmethod
    def exponential(
        cls, base_ms: int = 1_000, factor: float = 2.0, max_ms: int = 60_000, jitter: float = 0.1
    ) -> Backoff:
        """`factor` and `jitter` as numbers (2.0 doubles; 0.1 adds up to 10%)."""
        return cls((), base_ms, round(factor * 100), max_ms, round(jitter * 100))

    @classmethod
    def fixed(cls, delays_ms: Iterable[int]) -> Backoff:
        return cls(tuple(delays_ms))

    def validate(self, limits: QueueLimits = DEFAULT_QUEUE_LIMITS) -> None:
        if not isinstance(self.delays_ms, tuple):
            raise InvalidConfigError("backoff delays_ms must be a tuple of integers")
        if len(self.delays_ms) > limits.backoff_delays_max:
            raise InvalidConfigError(
                f"backoff of {len(self.delays_ms)} delays exceeds backoff_delays_max {limits.backoff_delays_max}"
            )
        for delay in self.delays_ms:
            _check_integer("backoff delay", delay, 0, DAY_MS)
        _check_integer("backoff base_ms", self.base_ms, 0, DAY_MS)
        _check_integer("backoff multiplier_percent", self.multiplier_percent, 100, 10_000)
        _check_integer("backoff max_ms", self.max_ms, 0, DAY_MS)
        _check_integer("backoff jitter_percent", self.jitter_percent, 0, 100)

    def nominal_delay_ms(self, retry: int) -> int:
        """The delay before retry number `retry` (1 for the first), without jitter."""
        assert retry >= 1
        if self.delays_ms:
            return self.delays_ms[min(retry, len(self.delays_ms)) - 1]
        delay = self.base_ms
        for _ in range(retry - 1):
            delay = delay * self.multiplier_percent // 100
            if delay >= self.max_ms:
                break
        return min(delay, self.max_ms)

    def delay_ms(self, retry: int, uniform: Callable[[float, float], float] = random.uniform) -> int:
        nominal = self.nominal_delay_ms(retry)
        if self.delays_ms or not self.jitter_percent or not nominal:
            return nominal
        return nominal + int(uniform(0, nominal * self.jitter_percent / 100))


EXPIRED_ACTIONS = ("drop", "dead-letter")


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """A queue group's settings, given at its first use and stored with its state.
    `dead_letter_topic` "" means `<topic>.dlq`. `expired`: what happens to a message
    whose TTL passed before it was delivered: "drop" (done, counted) or "dead-letter"
    (reason expired)."""

    ack_wait_ms: int = ACK_WAIT_MS_DEFAULT
    max_deliveries: int = MAX_DELIVERIES_DEFAULT
    backoff: Backoff = field(default_factory=Backoff)
    dead_letter_topic: str = ""
    expired: str = "drop"

    def validate(self, limits: QueueLimits = DEFAULT_QUEUE_LIMITS) -> None:
        _check_integer("ack_wait_ms", self.ack_wait_ms, 1, DAY_MS)
        _check_integer("max_deliveries", self.max_deliveries, 1, 1_000_000)
        self.backoff.validate(limits)
        if not isinstance(self.dead_letter_topic, str):
            raise InvalidConfigError("dead_letter_topic must be a string")
        if self.expired not in EXPIRED_ACTIONS:
            raise InvalidConfigError(f"queue setting expired must be one of {EXPIRED_ACTIONS}, got {self.expired!r}")

    def dead_letter_topic_for(self, topic: str) -> str:
        return self.dead_letter_topic or topic + DEAD_LETTER_SUFFIX

    def to_json(self) -> bytes:
        value = asdict(self)
        value["backoff"]["delays_ms"] = list(self.backoff.delays_ms)
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> QueueSettings:
        value = json.loads(data)
        backoff = value.pop("backoff")
        backoff["delays_ms"] = tuple(backoff["delays_ms"])
        settings = cls(backoff=Backoff(**backoff), **value)
        settings.validate()
        return settings


def cut_text(text: str | None, bytes_max: int) -> str:
    """`text` cut to at most `bytes_max` bytes of UTF-8, on a character boundary."""
    if not text:
        return ""
    encoded = text.encode("utf-8", errors="replace")
    if len(encoded) <= bytes_max:
        return text
    return encoded[:bytes_max].decode("utf-8", errors="ignore")
