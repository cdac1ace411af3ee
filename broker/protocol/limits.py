"""Named limits of the wire protocol, each with its documented default.

Checked where input is parsed, before anything is allocated for it: the frame length from
its 4-byte prefix, an array's count before its items. docs/protocol.md lists them; the
server adds its own (connections, fetch wait) on top.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from nodi.storage.limits import KIB, MIB

# A frame's length prefix is a uint32 counting the bytes after it.
FRAME_LENGTH_PREFIX_BYTES = 4
UINT32_MAX = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class ProtocolLimits:
    # One frame, its 4-byte length prefix included. Checked from the prefix, before the
    # body is buffered. A fetch response (header + batches) must fit in it.
    frame_bytes_max: int = 8 * MIB
    # Items in one array field (topics, partitions, offsets). Checked from the count.
    array_items_max: int = 100_000
    # Requests sent (client) or received (server) and not yet answered, per connection.
    in_flight_requests_max: int = 256
    # Bytes received and not yet turned into events: one whole frame plus one socket read.
    receive_buffer_bytes_max: int = 8 * MIB + 256 * KIB

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
        if self.frame_bytes_max > UINT32_MAX + FRAME_LENGTH_PREFIX_BYTES:
            raise ValueError(f"frame_bytes_max {self.frame_bytes_max} exceeds the uint32 prefix")
        if self.receive_buffer_bytes_max < self.frame_bytes_max:
            raise ValueError("receive_buffer_bytes_max must hold at least one whole frame")

    def announced(self) -> dict[str, int]:
        """The limits a server states in its handshake response, by name (the receive
        buffer is its own business)."""
        return {
            "frame_bytes_max": self.frame_bytes_max,
            "array_items_max": self.array_items_max,
            "in_flight_requests_max": self.in_flight_requests_max,
        }


DEFAULT_PROTOCOL_LIMITS = ProtocolLimits()

# What each limit bounds, for docs/protocol.md (rendered next to the defaults).
LIMIT_DESCRIPTIONS = {
    "frame_bytes_max": "one frame, its 4-byte length prefix included; checked from the "
    "prefix before any of the body is buffered (FRAME_TOO_LARGE, closes)",
    "array_items_max": "items in one array field; checked from the count before any item "
    "is decoded (LIMIT_EXCEEDED, answered)",
    "in_flight_requests_max": "requests sent and not yet answered on one connection; a "
    "server answers the excess with TOO_MANY_REQUESTS",
    "receive_buffer_bytes_max": "bytes received and not yet turned into events (one frame "
    "plus one socket read); more is a caller bug (LIMIT_EXCEEDED, closes)",
}
