"""The operator console: one static page and a read-only proxy to Prometheus' and Jaeger's public APIs.

The page (static/index.html, no build step) polls `/api/prometheus/query`, `/api/prometheus/query_range`
(Prometheus' HTTP API, passed through) and `/api/jaeger/...` (Jaeger's query API: recent gateway traces
and one trace for the waterfall). Only GETs of those read-only endpoints are forwarded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from services.console.config import ConsoleConfig

STATIC = Path(__file__).resolve().parent / "static"
_PROMETHEUS_PATHS = frozenset(("query", "query_range"))


def create_app(config: ConsoleConfig) -> web.Application:
    """The aiohttp application: `/` (the page), `/api/prometheus/{query,query_range}`, `/api/jaeger/...`."""
    app = web.Application()
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)

    async def _session(app: web.Application) -> AsyncIterator[None]:
        app["http"] = aiohttp.ClientSession(timeout=timeout)
        yield
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

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.cleanup_ctx.append(_session)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/prometheus/{path}", prometheus)
    app.router.add_get("/api/jaeger/{path:.+}", jaeger)
    return app
