"""The features gRPC server: the FeatureService servicer (proto <-> domain) and create_server().

GetOnlineFeatures answers with bytes already in wire format (see response.py);
the service is registered with a serializer that passes bytes through, so the
generated stubs and any client see an ordinary GetOnlineFeaturesResponse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from cassandra.policies import ExponentialReconnectionPolicy

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.features import response
from services.features.cache import FeatureCache, NoCache, RedisCache
from services.features.config import FeaturesConfig
from services.features.errors import InvalidArgument, StoreUnavailable
from services.features.online import OnlineFeatures, RowInput
from services.features.registry import Registry, ViewStore
from services.features.store import CassandraBackend, OnlineStore, open_backend

log = logging.getLogger(__name__)

SERVICE_NAME = features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name
MAX_PAGE_SIZE = 1000


class DeferredViewStore:
    """A ViewStore that answers UNAVAILABLE until the real one is connected."""

    def __init__(self) -> None:
        self.target: ViewStore | None = None

    def _get(self) -> ViewStore:
        if self.target is None:
            raise StoreUnavailable("Cassandra is not connected yet")
        return self.target

    async def load_all(self) -> list[features_pb2.FeatureView]:
        return await self._get().load_all()

    async def create(self, view: features_pb2.FeatureView) -> bool:
        return await self._get().create(view)

    async def update(self, view: features_pb2.FeatureView, expected_revision: int) -> bool:
        return await self._get().update(view, expected_revision)


def _timestamp_us(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000 + int(ts.nanos) // 1000


class FeatureServiceServicer(features_pb2_grpc.FeatureServiceServicer):
    """Translates FeatureService protos to the domain (Registry, OnlineFeatures)."""

    def __init__(self, registry: Registry, online: OnlineFeatures) -> None:
        self._registry = registry
        self._online = online

    async def ApplyFeatureView(  # noqa: N802 - gRPC method names
        self, request: features_pb2.ApplyFeatureViewRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.ApplyFeatureViewResponse:
        if not request.HasField("feature_view"):
            raise InvalidArgument("feature_view is required")
        view, created = await self._registry.apply(request.feature_view)
        return features_pb2.ApplyFeatureViewResponse(feature_view=view.spec, created=created)

    async def GetFeatureView(  # noqa: N802 - gRPC method names
        self, request: features_pb2.GetFeatureViewRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.FeatureView:
        if not request.name:
            raise InvalidArgument("name is required")
        if self._registry.lookup(request.name) is None:
            await self._registry.refresh_if_older(1.0)
        return self._registry.get(request.name).spec

    async def ListFeatureViews(  # noqa: N802 - gRPC method names
        self, request: features_pb2.ListFeatureViewsRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.ListFeatureViewsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        size = min(request.page_size or 100, MAX_PAGE_SIZE)
        views = [v for v in self._registry.views() if v.name > request.page_token]
        page = views[:size]
        reply = features_pb2.ListFeatureViewsResponse(feature_views=[v.spec for v in page])
        if len(views) > size:
            reply.next_page_token = page[-1].name
        return reply

    async def GetOnlineFeatures(  # noqa: N802 - gRPC method names
        self, request: features_pb2.GetOnlineFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        entities = {name: column.values for name, column in request.entities.items()}
        result = await self._online.read(request.features, entities)
        return response.encode(result)

    async def WriteFeatures(  # noqa: N802 - gRPC method names
        self, request: features_pb2.WriteFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> features_pb2.WriteFeaturesResponse:
        if not request.feature_view:
            raise InvalidArgument("feature_view is required")
        if self._registry.lookup(request.feature_view) is None:
            await self._registry.refresh_if_older(1.0)
        rows = [
            RowInput(
                row.entity_key,
                row.values,
                _timestamp_us(row.event_timestamp) if row.HasField("event_timestamp") else None,
            )
            for row in request.rows
        ]
        written = await self._online.write_inputs(request.feature_view, rows)
        return features_pb2.WriteFeaturesResponse(rows_written=written)


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def register_servicer(servicer: FeatureServiceServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_FeatureServiceServicer_to_server, with a bytes pass-through serializer."""
    methods: dict[str, tuple[Callable[..., Any], Any]] = {
        "ApplyFeatureView": (servicer.ApplyFeatureView, features_pb2.ApplyFeatureViewRequest),
        "GetFeatureView": (servicer.GetFeatureView, features_pb2.GetFeatureViewRequest),
        "ListFeatureViews": (servicer.ListFeatureViews, features_pb2.ListFeatureViewsRequest),
        "GetOnlineFeatures": (servicer.GetOnlineFeatures, features_pb2.GetOnlineFeaturesRequest),
        "WriteFeatures": (servicer.WriteFeatures, features_pb2.WriteFeaturesRequest),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request_type.FromString, response_serializer=_serialize
        )
        for name, (fn, request_type) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class _Connector:
    """Connects to Cassandra in the background (start-up must not block on it), retrying until it answers."""

    def __init__(self, config: FeaturesConfig, online: OnlineFeatures, views: DeferredViewStore) -> None:
        self._config = config
        self._online = online
        self._views = views
        self._task: asyncio.Task[None] | None = None
        self.backend: CassandraBackend | None = None

    @property
    def connected(self) -> bool:
        return self.backend is not None

    def kick(self) -> None:
        if self.backend is None and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._connect(), name="cassandra-connect")

    async def _connect(self) -> None:
        try:
            backend = await asyncio.to_thread(open_backend, self._config.cassandra, self._config.store)
        except Exception as exc:
            log.warning("Cassandra is not reachable yet: %s", exc)
            return
        # Reconnect within seconds once Cassandra is back (the driver's default waits up to 10 minutes).
        backend.session.cluster.reconnection_policy = ExponentialReconnectionPolicy(0.5, 4.0)
        self._online.store = backend.store
        self._views.target = backend.views
        self.backend = backend
        log.info("connected to Cassandra %s", ",".join(self._config.cassandra.cassandra_contact_points))

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.backend is not None:
            await asyncio.to_thread(self.backend.shutdown)


async def create_server(
    config: FeaturesConfig,
    telemetry: Telemetry | None = None,
    *,
    store: OnlineStore | None = None,
    view_store: ViewStore | None = None,
    cache: FeatureCache | None = None,
) -> Server:
    """Builds the features server (bound, not started).

    Args:
        config: The service configuration.
        telemetry: Tracing and metrics, when set up.
        store, view_store: Use these instead of connecting to Cassandra (tests).
        cache: Use this instead of the configured Redis cache (tests).
    """
    if cache is None:
        cache = RedisCache(config.cache) if config.cache.cache_enabled else NoCache()
    deferred = DeferredViewStore()
    registry = Registry(view_store or deferred)
    online = OnlineFeatures(
        registry,
        cache,
        config.limits,
        config.store,
        config.cache,
        store_timeout_s=config.cassandra.cassandra_request_timeout_s,
        store_parallelism=config.cassandra.cassandra_max_in_flight,
    )
    connector: _Connector | None = None
    if store is not None and view_store is not None:
        online.store = store
    else:
        connector = _Connector(config, online, deferred)

    loaded = False
    probe: asyncio.Task[bool] | None = None
    refresh: asyncio.Task[None] | None = None

    async def _refresh_views() -> None:
        try:
            await registry.refresh_if_older(config.limits.registry_refresh_s)
        except Exception as exc:
            log.warning("feature views could not be re-read: %s", exc)

    async def readiness() -> bool:
        nonlocal loaded, probe, refresh
        if connector is not None and not connector.connected:
            connector.kick()
            return False
        if not loaded:
            try:
                await registry.refresh()
            except Exception as exc:
                log.warning("feature views could not be read: %s", exc)
                return False
            loaded = True
        # Once loaded, views are re-read and the store is probed in the background: a slow
        # Cassandra must not make this check time out, because the service stays SERVING while
        # Cassandra is away (cached values are still served). The probe keeps `possibly_stale`
        # honest even when no request misses the cache.
        if refresh is None or refresh.done():
            refresh = asyncio.create_task(_refresh_views(), name="views-refresh")
        if probe is None or probe.done():
            probe = asyncio.create_task(online.check_store(), name="cassandra-probe")
        return True

    servicer = FeatureServiceServicer(registry, online)
    server = build_server(
        config.server,
        [GrpcService(SERVICE_NAME, lambda s: register_servicer(servicer, s))],
        telemetry=telemetry,
        readiness=readiness,
    )

    async def _close() -> None:
        for task in (probe, refresh):
            if task is not None:
                task.cancel()
        await online.drain()
        if isinstance(cache, RedisCache):
            await cache.close()
        if connector is not None:
            await connector.close()

    server.on_stop.append(_close)
    return server
