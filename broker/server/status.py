"""Server-level facts an operator asks for: the SERVER_STATUS request (`nodi status`)
and the figures the metrics endpoint reads at scrape time that are not one component's
statistics() (consumer lag, disk space).

Everything here reads thread-safe state only (partition logs' statistics, the metadata
store, os calls), so the Prometheus thread may call it as well as the event loop.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from nodi.storage.store import Store

from ..protocol import messages as m
from .reply import Reply


@cache
def nodi_version() -> str:
    try:
        return package_version("nodi")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


@dataclass(frozen=True, slots=True)
class DiskSpace:
    free_bytes: int  # available to the server's user (statvfs f_bavail)
    total_bytes: int


def disk_space(path: str) -> DiskSpace | None:
    """Free and total bytes of the file system holding `path`; None when it cannot be
    asked (the directory vanished)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return DiskSpace(usage.free, usage.total)


@dataclass(frozen=True, slots=True)
class ConsumerLag:
    group: str
    topic: str
    partition: int
    committed_offset: int
    end_offset: int  # the partition's high watermark: what consumers may read

    @property
    def lag(self) -> int:
        return max(self.end_offset - self.committed_offset, 0)


def consumer_lags(store: Store) -> list[ConsumerLag]:
    """Every committed group offset against its partition's high watermark, sorted.
    Partitions of deleted topics are left out; partitions a group has not yet
    committed have no lag to report."""
    metadata = store.metadata
    lags = []
    for group in metadata.list_groups():
        for (topic, partition), committed in sorted(metadata.group_offsets(group).items()):
            if store.topic_config(topic) is None:  # deleted
                continue
            # A partition not open since the start: its checkpoint's end (read once), never
            # opened for a scrape; one being recovered reports no lag until it is.
            end = store.high_watermark_nowait(topic, partition)
            if end is None:
                continue
            lags.append(ConsumerLag(group, topic, partition, committed.offset, end))
    return lags


def damaged_partitions(store: Store) -> list[m.DamagedPartition]:
    """Partitions opened damaged (G4): read up to the damage, refusing appends until an
    operator repairs them. Paths relative to the data directory."""
    found = []
    for topic, partition, partition_log in store.logs():
        damage = partition_log.damage
        if damage is not None:
            found.append(
                m.DamagedPartition(
                    topic=topic,
                    partition=partition,
                    path=os.path.relpath(damage.path, store.data_dir),
                    position=damage.position,
                    offset=damage.offset,
                    reason=damage.reason,
                )
            )
    return sorted(found, key=lambda entry: (entry.topic, entry.partition))


def read_only_partitions(store: Store) -> dict[str, list[int]]:
    """topic -> its partitions that refuse appends after a write or fsync error."""
    found: dict[str, list[int]] = {}
    for topic, partition, partition_log in store.logs():
        if partition_log.statistics().read_only:
            found.setdefault(topic, []).append(partition)
    return {topic: sorted(partitions) for topic, partitions in sorted(found.items())}


def is_loopback_peer(peer) -> bool:
    """Whether a connection's peer address (asyncio's peername) is on this machine's
    loopback interface (127.0.0.0/8, ::1, or IPv4-mapped 127.x)."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False  # not an IP connection we can place
    try:
        address = ipaddress.ip_address(peer[0].partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def status_for_peer(response: m.ServerStatusResponse, peer) -> m.ServerStatusResponse:
    """The status as a connection from `peer` may see it: the absolute data directory
    only for a loopback peer (an admin on this machine; there is no authentication),
    "" for any other (docs/protocol.md)."""
    if is_loopback_peer(peer):
        return response
    return dataclasses.replace(response, data_dir="")


async def serve_server_status(broker, request: m.ServerStatusRequest):
    """The SERVER_STATUS handler (registered in Broker._handlers)."""
    statistics = broker.server_statistics() if broker.server_statistics is not None else None
    data_dir = os.path.abspath(broker.config.data_dir)
    space = disk_space(data_dir)
    metadata = broker.store.metadata.statistics()
    return Reply(
        m.ServerStatusResponse(
            request_id=request.request_id,
            server_id=broker.server_id,
            version=nodi_version(),
            started_time_ms=-1 if statistics is None else statistics.started_time_ms,
            uptime_ms=0 if statistics is None else statistics.uptime_ms,
            data_dir=data_dir,
            connections_open=0 if statistics is None else statistics.connections_open,
            connections_accepted=0 if statistics is None else statistics.connections_accepted,
            connections_refused=0 if statistics is None else statistics.connections_refused,
            disk_free_bytes=-1 if space is None else space.free_bytes,
            disk_total_bytes=-1 if space is None else space.total_bytes,
            read_only_partitions=[
                m.TopicPartitions(topic=topic, partitions=partitions)
                for topic, partitions in read_only_partitions(broker.store).items()
            ],
            metadata_store_error=metadata.failure or None,
            metadata_failed_commits=metadata.failed_commits,
            damaged_partitions=damaged_partitions(broker.store),
        )
    )
