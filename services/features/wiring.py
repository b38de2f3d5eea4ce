"""The feature store one process assembles: registry, cache, Cassandra and OnlineFeatures, built in one place.

The server, the stream ingester and materialization all run on `open_feature_store`; tests hand it
in-memory fakes instead of Cassandra and Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.features.cache import FeatureCache, NoCache, RedisCache
from services.features.config import FeaturesConfig
from services.features.online import OnlineFeatures
from services.features.registry import Registry, ViewStore
from services.features.store import LazyCassandraStore, OnlineStore


@dataclass
class FeatureStore:
    """The domain objects of one process and the connections under them."""

    registry: Registry
    online: OnlineFeatures
    # None when the tests gave both stores.
    cassandra: LazyCassandraStore | None

    @property
    def connected(self) -> bool:
        """True once Cassandra answered (starting another attempt when it has not)."""
        if self.cassandra is None or self.cassandra.session.value is not None:
            return True
        self.cassandra.session.kick()
        return False

    async def open(self) -> None:
        """Connects now (tools, which have nothing to do without Cassandra).

        Raises:
            NoHostAvailable: Cassandra cannot be reached.
        """
        if self.cassandra is not None:
            await self.cassandra.session.open()

    async def close(self) -> None:
        """Waits for background cache fills, then closes the cache and the Cassandra session."""
        await self.online.drain()
        if isinstance(self.online.cache, RedisCache):
            await self.online.cache.close()
        if self.cassandra is not None:
            await self.cassandra.session.close()


def open_feature_store(
    config: FeaturesConfig,
    *,
    store: OnlineStore | None = None,
    view_store: ViewStore | None = None,
    cache: FeatureCache | None = None,
) -> FeatureStore:
    """The feature store of `config`: Cassandra (connected lazily) and the configured cache.

    Args:
        config: The features configuration (every section is read from here, nowhere else).
        store, view_store: Use these instead of Cassandra (tests).
        cache: Use this instead of the configured Redis cache (tests).
    """
    if cache is None:
        cache = RedisCache(config.cache) if config.cache.cache_enabled else NoCache()
    cassandra = None
    if store is None or view_store is None:
        cassandra = LazyCassandraStore(config.cassandra, config.store)
        store, view_store = store or cassandra, view_store or cassandra
    registry = Registry(view_store)
    return FeatureStore(registry, OnlineFeatures(registry, cache, store, config), cassandra)
