"""Per-connection read limits, the same for nodi's protocol and the Kafka listener
(docs/security.md, "Limits"): bytes in flight and a request rate.

Past either limit a connection stops reading; the kernel's socket buffers fill and TCP
pushes back on the client. Nothing is refused or dropped: a well-behaved client that
pipelines hard only slows down, and a hostile one cannot make the server hold more
than the limit (plus one read) of its requests.

- Bytes in flight: the frame bytes of requests read and not yet answered. Checked
  before each read, so one read (READ_BYTES) may carry it past the limit; the next
  read waits until answers bring it back to the limit or below.
- Request rate: a token bucket, `requests_per_second_max` tokens a second, holding at
  most one second's worth (the burst). Each request read takes a token; the bucket may
  go below zero when one read held many requests, and the next read waits until it is
  back at zero. A wait, never an error.

The caller bounds each wait with its own deadline (the idle or frame timeout).
"""

from __future__ import annotations

import asyncio
import time

THROTTLE_REASONS = ("bytes_in_flight", "request_rate")


class ThrottleCounts:
    """Reads delayed, by listener and reason (the nodi_reads_throttled metric)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {
            (listener, reason): 0 for listener in ("nodi", "kafka") for reason in THROTTLE_REASONS
        }

    def count(self, listener: str, reason: str) -> None:
        self.counts[(listener, reason)] += 1


class ReadThrottle:
    """One connection's bytes in flight and token bucket."""

    def __init__(
        self, listener: str, in_flight_bytes_max: int, requests_per_second_max: int, counts: ThrottleCounts
    ) -> None:
        self.listener = listener
        self.in_flight_bytes_max = in_flight_bytes_max
        self.rate = float(requests_per_second_max)
        self.counts = counts
        self.in_flight_bytes = 0
        self._drained = asyncio.Event()
        self._tokens = self.rate
        self._refilled = time.monotonic()

    def started(self, size: int) -> None:
        """A request of `size` frame bytes was read and is being served."""
        self.in_flight_bytes += size
        self._tokens -= 1

    def answered(self, size: int) -> None:
        self.in_flight_bytes -= size
        if self.in_flight_bytes <= self.in_flight_bytes_max:
            self._drained.set()

    def ready(self) -> bool:
        """Before a read: True when neither limit holds it back (the bucket refilled), so
        the caller need not await wait(), which would find the same."""
        if self.in_flight_bytes > self.in_flight_bytes_max:
            return False
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        return self._tokens >= 0

    async def wait(self) -> None:
        """Before a read: wait while over either limit."""
        if self.in_flight_bytes > self.in_flight_bytes_max:
            self.counts.count(self.listener, "bytes_in_flight")
            while self.in_flight_bytes > self.in_flight_bytes_max:
                self._drained.clear()
                await self._drained.wait()
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 0:
            self.counts.count(self.listener, "request_rate")
            await asyncio.sleep(-self._tokens / self.rate)
