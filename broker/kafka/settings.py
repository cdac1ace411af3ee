"""The `[kafka]` table of the server config: the Kafka-protocol listener, off unless a
port is given (`nodi serve --kafka-port 9092`, or `port` here, or NODI_KAFKA_PORT)."""

from __future__ import annotations

from dataclasses import dataclass

from nodi.storage.errors import InvalidConfigError

from .connection import IN_FLIGHT_REQUESTS_MAX, REQUEST_BYTES_MAX, KafkaLimits


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    # -1: no Kafka listener. 0: a free port (the serve line names it).
    port: int = -1
    # Empty: the server's own host.
    host: str = ""
    # What Metadata and FindCoordinator tell clients to connect to. Empty / -1: the
    # listener's own host and (bound) port.
    advertised_host: str = ""
    advertised_port: int = -1
    # A Metadata request naming a topic that does not exist creates it (Kafka's
    # auto.create.topics.enable), with this many partitions and the [topic_defaults].
    auto_create_topics: bool = True
    auto_create_partitions: int = 1
    # One request, size prefix excluded; more closes the connection.
    request_bytes_max: int = REQUEST_BYTES_MAX
    # Requests read and not yet answered per connection; the connection stops reading
    # until one is answered.
    in_flight_requests_max: int = IN_FLIGHT_REQUESTS_MAX
    # SASL PLAIN sends the password as it is: it is offered only on TLS connections,
    # and, when this is true, on plaintext connections from a loopback address too.
    sasl_plain_on_loopback: bool = False

    @property
    def enabled(self) -> bool:
        return self.port >= 0

    def limits(self, array_items_max: int) -> KafkaLimits:
        return KafkaLimits(
            request_bytes_max=self.request_bytes_max,
            array_items_max=array_items_max,
            in_flight_requests_max=self.in_flight_requests_max,
        )

    def validate(self) -> None:
        if not -1 <= self.port <= 65535:
            raise InvalidConfigError(f"kafka.port {self.port} outside -1..65535")
        if not -1 <= self.advertised_port <= 65535:
            raise InvalidConfigError(f"kafka.advertised_port {self.advertised_port} outside -1..65535")
        for name in ("auto_create_partitions", "request_bytes_max", "in_flight_requests_max"):
            if getattr(self, name) < 1:
                raise InvalidConfigError(f"kafka.{name} must be positive")


DEFAULT_KAFKA_SETTINGS = KafkaSettings()
