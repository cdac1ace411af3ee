"""The named limits of request-reply inboxes (broker/server/inbox_service.py), each with its
documented default; the `[inboxes]` table of the server settings."""

from __future__ import annotations

from dataclasses import dataclass

from nodi.storage.errors import InvalidConfigError


@dataclass(frozen=True, slots=True)
class InboxLimits:
    # Inboxes open at once; one more is refused with LIMIT_EXCEEDED.
    inboxes_max: int = 10_000
    # Reply bytes one inbox holds before its requester takes them; more are dropped.
    inbox_bytes_max: int = 8 * 1024 * 1024
    # An inbox nobody polls for this long is closed (its requester is gone).
    inbox_idle_timeout_ms: int = 60_000
    # The longest long-poll an InboxReceive may ask for.
    receive_wait_max_ms: int = 30_000

    def validate(self) -> None:
        for name in ("inboxes_max", "inbox_bytes_max", "inbox_idle_timeout_ms", "receive_wait_max_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidConfigError(f"inbox limit {name} must be a positive integer, got {value!r}")


DEFAULT_INBOX_LIMITS = InboxLimits()
