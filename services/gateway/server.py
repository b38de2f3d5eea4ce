"""The gateway gRPC server: the public PredictionService (behind Envoy) and its wiring (`create_server`).

The servicer translates protos to the domain (`Predictor`) and back. Who admits a request (API key,
the tenant's models, rate limits) is the platform's `admission.placement`:

- "edge": the edge (Envoy's ext_authz, services/edge) has already checked the API key and the model;
  it passes the tenant in `x-infergrid-tenant` (logged in the inference-log record) and the model it
  authorized in `x-infergrid-model`. The gateway refuses (PERMISSION_DENIED) a request whose model
  differs from the authorized one: the edge reads the first `model` field of the body, protobuf
  parsing keeps the last, so a body with the field twice must not slip through.
- "gateway": `admission.Admission` checks the key and the limits here, on the parsed request, and
  identity headers from the caller are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import grpc
import redis.asyncio as redis_async

from inference import grpc_service_pb2
from infergrid.features.v1 import features_pb2
from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs import apikeys
from libs.channels import dial
from libs.discovery import EndpointWatcher
from libs.platform import PlatformConfig, PlatformWatcher
from libs.pool import ChannelPool
from libs.ratelimit import LeasedLimiter
from libs.resilience import BreakerPolicy, Dependency, DependencyPolicy, RetryPolicy
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.gateway.admission import Admission
from services.gateway.cache import RedisResponseCache, ResponseCache
from services.gateway.catalog import ModelCatalog
from services.gateway.config import GatewayConfig
from services.gateway.features import GrpcFeatureSource
from services.gateway.models import GrpcModelClient, StreamingModelClient
from services.gateway.predictor import CallInfo, Prediction, Predictor, PredictorSettings
from services.gateway.publisher import DiscardingPublisher, RecordPublisher
from services.gateway.routing import TrafficRouter

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
FEATURES_SERVICE = features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name
INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
TENANT_HEADER = "x-infergrid-tenant"
MODEL_HEADER = "x-infergrid-model"


def call_info(context: grpc.aio.ServicerContext) -> CallInfo:
    """The tenant, deadline and model permissions of a call (from the edge's headers)."""
    tenant = ""
    allowed: frozenset[str] | None = None
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_HEADER:
            tenant = str(value)
        elif key == MODEL_HEADER:
            allowed = frozenset((str(value),))
    return CallInfo(tenant=tenant, time_remaining=context.time_remaining(), allowed_models=allowed)


def _response(prediction: Prediction) -> gateway_pb2.PredictResponse:
    response = gateway_pb2.PredictResponse(
        request_id=prediction.request_id,
        model=prediction.model,
        model_version=prediction.version,
        degraded=bool(prediction.degraded_features),
        degraded_features=prediction.degraded_features,
        cached=prediction.cached,
    )
    outputs = response.outputs
    for name, array in prediction.outputs.items():
        if array.size == 1:
            outputs[name].float_value = float(array.reshape(-1)[0])
        else:
            outputs[name].float_list_value.values.extend(array.reshape(-1).tolist())
    return response


class PredictionServiceServicer(gateway_pb2_grpc.PredictionServiceServicer):
    """Translates PredictionService protos to the Predictor and back."""

    def __init__(self, predictor: Predictor, admission: Admission | None = None) -> None:
        self._predictor = predictor
        self._admission = admission

    async def _call_info(self, context: grpc.aio.ServicerContext, model: str) -> CallInfo:
        if self._admission is None:
            return call_info(context)
        return await self._admission.call_info(context, model)

    async def Predict(  # noqa: N802 - gRPC method names
        self, request: gateway_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PredictResponse:
        info = await self._call_info(context, request.model)
        (prediction,) = await self._predictor.predict(request.model, request.version, (request,), info)
        return _response(prediction)

    async def PredictBatch(  # noqa: N802 - gRPC method names
        self, request: gateway_pb2.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PredictBatchResponse:
        info = await self._call_info(context, request.model)
        predictions = await self._predictor.predict(
            request.model, request.version, request.rows, info, batch=True
        )
        return gateway_pb2.PredictBatchResponse(results=[_response(p) for p in predictions])


def _gateway_admission(
    config: GatewayConfig, watcher: PlatformWatcher
) -> tuple[Admission, redis_async.Redis, list[Coroutine[Any, Any, None]]]:
    """Admission in-process: the hashed keys (watched) and the leased Redis token buckets."""
    settings = config.admission
    redis = redis_async.Redis.from_url(
        settings.admission_redis_url,
        socket_timeout=settings.admission_redis_timeout_s,
        socket_connect_timeout=settings.admission_redis_timeout_s,
    )
    limiter = LeasedLimiter(
        redis, lease_s=settings.admission_lease_s, lease_ttl_s=settings.admission_lease_ttl_s
    )
    admission = Admission(
        lambda: watcher.current,
        limiter,
        key_prefix=settings.admission_key_prefix,
        fail_open_s=settings.admission_fail_open_s,
    )
    keys_file = apikeys.keys_path(watcher.path, watcher.current, settings.admission_keys_file)
    admission.set_keys(apikeys.load_keys(keys_file))
    log.info("admission in the gateway: keys from %s, rate limits in Redis", keys_file)
    return (
        admission,
        redis,
        [apikeys.watch_keys(keys_file, admission.set_keys, settings.admission_keys_poll_s)],
    )


def predictor_settings(config: GatewayConfig) -> PredictorSettings:
    """The pipeline knobs from the service config."""
    up, batching = config.upstream, config.batching
    return PredictorSettings(
        features_timeout_s=up.features_timeout_s,
        inference_timeout_s=up.inference_timeout_s,
        request_timeout_s=up.request_timeout_s,
        max_batch_rows=batching.max_batch_rows,
        max_batch_delay_s=batching.max_batch_delay_s,
        max_concurrent_batches=batching.max_concurrent_batches,
        max_pending_rows=batching.max_pending_rows,
        max_in_flight_rows=batching.max_in_flight_rows,
        max_batch_request_rows=batching.max_batch_request_rows,
        cache_key_prefix=config.cache.response_cache_key_prefix,
    )


def dependency_policy(timeout_s: float, attempts: int, config: GatewayConfig) -> DependencyPolicy:
    """A dependency's policy: gRPC retries UNAVAILABLE (reads only) within the budget; the breaker fails fast."""
    return DependencyPolicy(
        timeout_s=timeout_s,
        retry=RetryPolicy(max_attempts=attempts, initial_backoff_s=0.01, max_backoff_s=0.1),
        breaker=BreakerPolicy(
            failure_threshold=config.upstream.breaker_failures,
            reset_timeout_s=config.upstream.breaker_reset_s,
        ),
    )


def _single_attempt(policy: DependencyPolicy) -> DependencyPolicy:
    # gRPC itself retries on the channel (cheaper, in C); the Dependency adds the breaker and the deadline.
    return DependencyPolicy(
        timeout_s=policy.timeout_s, retry=RetryPolicy(max_attempts=1), breaker=policy.breaker
    )


async def create_server(
    config: GatewayConfig,
    telemetry: Telemetry | None = None,
    *,
    publisher: RecordPublisher | None = None,
) -> Server:
    """Builds the gateway server (bound, not started) with its channels, producer and platform watcher.

    Args:
        config: The service config.
        telemetry: Tracing interceptors when tracing is on.
        publisher: Overrides the inference-log producer built from the config (tests).
    """
    up = config.upstream
    features_policy = dependency_policy(up.features_timeout_s, up.features_max_attempts, config)
    inference_policy = dependency_policy(up.inference_timeout_s, up.inference_max_attempts, config)
    # One channel per replica, without gRPC's own retries: the pool retries on another replica.
    features_pool = ChannelPool(
        "features",
        lambda address: dial(
            address, FEATURES_SERVICE, _single_attempt(features_policy), telemetry=telemetry
        ),
        features_policy,
    )
    inference_pool = ChannelPool(
        "inference",
        lambda address: dial(
            address, INFERENCE_SERVICE, _single_attempt(inference_policy), telemetry=telemetry
        ),
        inference_policy,
    )
    endpoint_watchers = [
        EndpointWatcher(up.features_target, features_pool.update, up.discovery_interval_s, name="features"),
        EndpointWatcher(
            up.inference_target, inference_pool.update, up.discovery_interval_s, name="inference"
        ),
    ]
    for endpoint_watcher in endpoint_watchers:
        await endpoint_watcher.refresh()
    # The Dependency sees one logical call (breaker, deadline); the pool's failover is inside it.
    features = GrpcFeatureSource(features_pool, Dependency("features", _single_attempt(features_policy)))
    models: GrpcModelClient | StreamingModelClient
    if up.inference_streaming:
        models = StreamingModelClient(
            inference_pool,
            Dependency("inference", _single_attempt(inference_policy)),
            up.inference_hang_margin_s,
        )
    else:
        models = GrpcModelClient(inference_pool, Dependency("inference", _single_attempt(inference_policy)))

    owned_producer = None
    if publisher is None:
        if config.inference_log_enabled:
            from libs.inference_log import InferenceLogProducer

            owned_producer = InferenceLogProducer(config.inference_log, config.kafka)
            owned_producer.start()
            publisher = owned_producer
        else:
            publisher = DiscardingPublisher()

    router = TrafficRouter()
    watcher: PlatformWatcher | None = None
    admission: Admission | None = None
    admission_tasks: list[Coroutine[Any, Any, None]] = []
    admission_redis: redis_async.Redis | None = None
    if config.models.platform_file is not None:

        def _apply(platform: PlatformConfig) -> None:
            router.update(platform)

        platform_file = config.models.platform_file
        watcher = PlatformWatcher(platform_file, _apply, config.models.platform_poll_interval_s)
        router.update(watcher.current)
        if watcher.current.admission.placement == "gateway":
            admission, admission_redis, admission_tasks = _gateway_admission(config, watcher)

    cache: ResponseCache | None = None
    if config.cache.response_cache_enabled:
        cache = RedisResponseCache(
            config.cache.response_cache_redis_url,
            config.cache.response_cache_ttl_s,
            config.cache.response_cache_timeout_s,
        )

    catalog = ModelCatalog(root=config.models.model_repository)
    if not catalog.names():
        log.warning("no models found in %s", config.models.model_repository)
    predictor = Predictor(
        catalog,
        router,
        features,
        models,
        publisher,
        settings=predictor_settings(config),
        cache=cache,
        tracer=telemetry.tracer_provider.get_tracer(__name__)
        if telemetry and telemetry.tracer_provider
        else None,
    )
    servicer = PredictionServiceServicer(predictor, admission)
    server = build_server(
        config.server,
        [
            GrpcService(
                SERVICE_NAME,
                lambda s: gateway_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, s),
            )
        ],
        telemetry=telemetry,
    )
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(predictor.report_gauges())]
    if watcher is not None:
        tasks.append(loop.create_task(watcher.run()))
    tasks += [loop.create_task(coro) for coro in admission_tasks]
    tasks += [loop.create_task(w.run(), name=f"endpoints-{w.name}") for w in endpoint_watchers]
    if isinstance(models, StreamingModelClient):
        tasks.append(loop.create_task(models.watch(), name="inference-streams"))

    async def _close() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await predictor.close()
        await models.close()
        await features.close()
        if cache is not None:
            await cache.close()
        if admission_redis is not None:
            await admission_redis.aclose()
        if owned_producer is not None:
            await asyncio.get_running_loop().run_in_executor(None, owned_producer.close)

    server.on_stop.append(_close)
    return server
