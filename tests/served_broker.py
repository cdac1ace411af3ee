"""A Broker served in-process as the server serves it, for tests of its produce paths
(imported by test_durable_waits.py and test_dedup_produce_path.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from nodi.broker.server.config import ServerConfig
from nodi.broker.server.service import Broker
from nodi.storage.store import Store
from nodi.storage.topic_settings import TopicConfig


def run_served(tmp_path, body: Callable[[Broker, Store], Awaitable[None]], **settings) -> None:
    """Run `body(broker, store)` with a topic "t" (TopicConfig(**settings)) served as the
    server serves it: the broker attached to this loop and watching partition 0."""
    store = Store.open(str(tmp_path / "store"))
    store.create_topic("t", TopicConfig(**settings))

    async def main() -> None:
        broker = Broker(store, ServerConfig(data_dir=store.data_dir))
        broker._loop = asyncio.get_running_loop()
        broker._watch(store.log("t", 0))
        await body(broker, store)

    try:
        asyncio.run(main())
    finally:
        store.close()
