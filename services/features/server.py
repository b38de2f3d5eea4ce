"""The features gRPC server: the FeatureService servicer (proto <-> domain) and create_server().

GetOnlineFeatures answers with bytes already in wire format (see response.py);
the service is registered with a serializer that passes bytes through, so the
generated stubs and any client see an ordinary GetOnlineFeaturesResponse.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.features import response
from services.features.cache import FeatureCache
from services.features.config import FeaturesConfig
from services.features.errors import InvalidArgument
from services.features.online import OnlineFeatures
from services.features.registry import Registry, ViewStore
from services.features.store import OnlineStore
from services.features.wiring import open_feature_store

log = logging.getLogger(__name__)

SERVICE_NAME = features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name
MAX_PAGE_SIZE = 1000


class FeatureServiceServicer(features_pb2_grpc.FeatureServiceServicer):
    """Translates FeatureService protos to the domain (Registry, OnlineFeatures)."""

    def __init__(self, registry: Registry, online: OnlineFeatures) -> None:
        self._registry = registry
        self._online = online

    async def _look_up(self, field: str, view: str) -> None:
        """Requires `field`; a view unknown here may have been applied through another replica: re-read."""
        if not view:
            raise InvalidArgument(f"{field} is required")
        if self._registry.lookup(view) is None:
            await self._registry.refresh_if_older(1.0)

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
        await self._look_up("name", request.name)
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
        await self._look_up("feature_view", request.feature_view)
        view, rows = self._online.prepare(request.feature_view, request.rows)
        await self._online.write(view, rows)
        return features_pb2.WriteFeaturesResponse(rows_written=len(rows))


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def register_servicer(servicer: FeatureServiceServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_FeatureServiceServicer_to_server, with a bytes pass-through serializer."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=getattr(features_pb2, method.input_type.name).FromString,
            response_serializer=_serialize,
        )
        for method in features_pb2.DESCRIPTOR.services_by_name["FeatureService"].methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


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
    features = open_feature_store(config, store=store, view_store=view_store, cache=cache)
    registry, online = features.registry, features.online
    loaded = False
    probe: asyncio.Task[Any] | None = None
    refresh: asyncio.Task[Any] | None = None

    async def _refresh_views() -> None:
        try:
            await registry.refresh_if_older(config.limits.registry_refresh_s)
        except Exception as exc:
            log.warning("feature views could not be re-read: %s", exc)

    async def readiness() -> bool:
        nonlocal loaded, probe, refresh
        if not features.connected:
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
            refresh = server.run_in_background(_refresh_views(), name="views-refresh")
        if probe is None or probe.done():
            probe = server.run_in_background(online.check_store(), name="cassandra-probe")
        return True

    servicer = FeatureServiceServicer(registry, online)
    server = build_server(
        config.server,
        [GrpcService.of(SERVICE_NAME, register_servicer, servicer)],
        telemetry=telemetry,
        readiness=readiness,
    )

    server.on_stop.append(features.close)
    return server
