"""A stand-in for the gateway behind Envoy: PredictionService answering with what it was sent.

`python -m tests.integration.edge.upstream` with UPSTREAM_PORT and UPSTREAM_NAME. Predict answers
model = the request's model, model_version = this replica's name, and outputs naming the tenant
header and whether an API key reached it (it must not). An entity `sleep_ms` delays the answer;
an entity `fail` = "unavailable" answers UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from infergrid.types.v1 import value_pb2

SERVICE = "infergrid.gateway.v1.PredictionService"


class _Prediction(gateway_pb2_grpc.PredictionServiceServicer):
    def __init__(self, name: str) -> None:
        self._name = name

    def _answer(
        self, model: str, request_id: str, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PredictResponse:
        metadata = dict(context.invocation_metadata() or ())
        leaked = any(k in metadata for k in ("x-api-key", "authorization"))
        return gateway_pb2.PredictResponse(
            request_id=request_id,
            model=model,
            model_version=self._name,
            outputs={
                "tenant": value_pb2.Value(string_value=str(metadata.get("x-infergrid-tenant", ""))),
                "tier": value_pb2.Value(string_value=str(metadata.get("x-infergrid-tier", ""))),
                "key_leaked": value_pb2.Value(bool_value=leaked),
            },
        )

    async def Predict(  # noqa: N802
        self, request: gateway_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PredictResponse:
        if request.entities.get("fail") == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "asked to fail")
        if "sleep_ms" in request.entities:
            await asyncio.sleep(int(request.entities["sleep_ms"]) / 1000)
        return self._answer(request.model, request.request_id, context)

    async def PredictBatch(  # noqa: N802
        self, request: gateway_pb2.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PredictBatchResponse:
        return gateway_pb2.PredictBatchResponse(
            results=[self._answer(request.model, row.request_id, context) for row in request.rows]
        )


async def _main() -> None:
    server = grpc.aio.server()
    gateway_pb2_grpc.add_PredictionServiceServicer_to_server(_Prediction(os.environ["UPSTREAM_NAME"]), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{os.environ['UPSTREAM_PORT']}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(_main())
