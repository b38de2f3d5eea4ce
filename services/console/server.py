"""The operator console: one static page and a read-only proxy to public APIs.

The page (static/index.html, no build step) polls `/api/prometheus/query`, `/api/prometheus/query_range`
(Prometheus' HTTP API, passed through), `/api/jaeger/...` (Jaeger's query API: recent gateway traces
and one trace for the waterfall) and `/api/features/views` (the feature service's ListFeatureViews, as
JSON). Only GETs of those read-only endpoints are forwarded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
from aiohttp import web

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from services.console.config import ConsoleConfig

STATIC = Path(__file__).resolve().parent / "static"
_PROMETHEUS_PATHS = frozenset(("query", "query_range"))
# ListFeatureViews pages read per request (a registry beyond 20 pages of 100 is shown cut short).
_VIEW_PAGES = 20


def view_summary(view: features_pb2.FeatureView) -> dict[str, object]:
    """What the console shows of a feature view: its name, entity, features, TTL and last change."""
    return {
        "name": view.name,
        "entity": view.entity.name,
        "keys": [column.name for column in view.entity.key_columns],
        "features": [feature.name for feature in view.features],
        "ttl_s": view.ttl.ToTimedelta().total_seconds(),
        "revision": view.revision,
        "updated_time": view.updated_time.ToJsonString() if view.HasField("updated_time") else None,
        "owner": view.owner,
    }


def create_app(config: ConsoleConfig) -> web.Application:
    """The aiohttp application: `/` (the page), `/api/prometheus/{query,query_range}`, `/api/jaeger/...`,
    `/api/features/views`."""
    app = web.Application()
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)

    async def _session(app: web.Application) -> AsyncIterator[None]:
        app["http"] = aiohttp.ClientSession(timeout=timeout)
        app["features"] = grpc.aio.insecure_channel(config.features_target)
        yield
        await app["features"].close()
        await app["http"].close()

    async def _forward(request: web.Request, url: str) -> web.Response:
        try:
            async with request.app["http"].get(url, params=request.query) as reply:
                body = await reply.read()
                return web.Response(body=body, status=reply.status, content_type="application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return web.json_response({"status": "error", "error": f"{type(exc).__name__}"}, status=502)

    async def prometheus(request: web.Request) -> web.Response:
        path = request.match_info["path"]
        if path not in _PROMETHEUS_PATHS:
            raise web.HTTPNotFound()
        return await _forward(request, f"{config.prometheus_url}/api/v1/{path}")

    async def jaeger(request: web.Request) -> web.Response:
        path = request.match_info["path"]
        if not (path == "traces" or path.startswith("traces/") or path == "services"):
            raise web.HTTPNotFound()
        return await _forward(request, f"{config.jaeger_url}/api/{path}")

    async def feature_views(request: web.Request) -> web.Response:
        stub = features_pb2_grpc.FeatureServiceStub(request.app["features"])
        views: list[dict[str, object]] = []
        token = ""
        try:
            for _ in range(_VIEW_PAGES):
                reply = await stub.ListFeatureViews(
                    features_pb2.ListFeatureViewsRequest(page_size=100, page_token=token),
                    timeout=config.timeout_s,
                )
                views += [view_summary(view) for view in reply.feature_views]
                token = reply.next_page_token
                if not token:
                    break
        except grpc.aio.AioRpcError as exc:
            return web.json_response(
                {"status": "error", "error": f"feature service: {exc.code().name}"}, status=502
            )
        return web.json_response({"status": "success", "data": views, "truncated": bool(token)})

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.cleanup_ctx.append(_session)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/prometheus/{path}", prometheus)
    app.router.add_get("/api/jaeger/{path:.+}", jaeger)
    app.router.add_get("/api/features/views", feature_views)
    return app
