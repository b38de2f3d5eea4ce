"""The gateway gRPC server: the public PredictionService (behind Envoy) and its wiring (`create_server`).

The servicer translates protos to the domain (`Predictor`) and back. Every call is admitted by
`admission.Admission` first (a verified identity in every placement, see its docstring), then its request
ids and row sizes are checked: an id the log consumer would refuse is INVALID_ARGUMENT here, naming
`request_id`, so no answered request's record is dead-lettered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Coroutine
from typing import Any

import grpc
import redis.asyncio as redis_async

from inference import grpc_service_pb2
from infergrid.features.v1 import features_pb2
from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs import apikeys, mtls
from libs.admission import RateLimits
from libs.channels import dial
from libs.discovery import EndpointWatcher
from libs.errors import InvalidArgument, ServiceError
from libs.inproc import is_local
from libs.platform import PlatformConfig, PlatformWatcher
from libs.pool import ChannelPool
from libs.ratelimit import LeasedLimiter
from libs.request_id import request_id_problem
from libs.resilience import BreakerPolicy, Dependency, DependencyPolicy, RetryPolicy
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.gateway import records
from services.gateway.admission import Admission
from services.gateway.cache import RedisResponseCache, ResponseCache
from services.gateway.catalog import ModelCatalog
from services.gateway.config import GatewayConfig
from services.gateway.failover import FailoverModelClient, InferencePools, pool_client
from services.gateway.features import GrpcFeatureSource
from services.gateway.inference_client import GrpcModelClient, StreamingModelClient
from services.gateway.metrics import ADMISSION_STAGE, GatewayMetrics
from services.gateway.model_facts import refresh_facts, watch_facts
from services.gateway.predictor import CallInfo, Prediction, Predictor
from services.gateway.publisher import DiscardingPublisher, RecordPublisher
from services.gateway.routing import TrafficRouter

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
FEATURES_SERVICE = features_pb2.DESCRIPTOR.services_by_name["FeatureService"].full_name
INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def check_row(request_id: str, size: int, max_bytes: int, where: str) -> None:
    """Raises InvalidArgument when a row's request id breaks the log's rule or the row is too large."""
    if request_id:
        problem = request_id_problem(request_id)
        if problem:
            raise InvalidArgument(f"{where}request_id: {problem}")
    if size > max_bytes:
        raise InvalidArgument(
            f"{where}: {size} bytes, at most {max_bytes} per row (its inference-log record must fit Kafka)"
        )


def _response(prediction: Prediction) -> gateway_pb2.PredictResponse:
    response = gateway_pb2.PredictResponse(
        request_id=prediction.request_id,
        model=prediction.model,
        model_version=prediction.version,
        degraded=bool(prediction.degraded_features),
        degraded_features=prediction.degraded_features,
        cached=prediction.cached,
        inference_pool=prediction.pool,
    )
    for name, array in prediction.outputs.items():
        records.set_value(response.outputs[name], array)
    return response


class PredictionServiceServicer(gateway_pb2_grpc.PredictionServiceServicer):
    """Translates PredictionService protos to the Predictor and back."""

    def __init__(self, predictor: Predictor, admission: Admission, max_row_bytes: int) -> None:
        self._predictor = predictor
        self._admission = admission
        self._max_row_bytes = max_row_bytes
        self._metrics = GatewayMetrics()

    async def _admitted(self, context: grpc.aio.ServicerContext, model: str, rows: int) -> CallInfo:
        """Admission, timed (the `admission` stage); a refused call's rows count as requests with its status.

        The model label of a refused call is the model only when the catalog serves it (else ""): an
        unauthenticated caller must not mint label values.
        """
        started = time.perf_counter()
        try:
            return await self._admission.call_info(context, model, rows)
        except ServiceError as exc:
            known = model if model in self._predictor.catalog.names() else ""
            self._metrics.request(known, "", exc.code.name).inc(rows)
            raise
        finally:
            ADMISSION_STAGE.observe(time.perf_counter() - started)

    async def Predict(  # noqa: N802 - gRPC method names
        self, request: gateway_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PredictResponse:
        info = await self._admitted(context, request.model, 1)
        check_row(request.request_id, request.ByteSize(), self._max_row_bytes, "")
        (prediction,) = await self._predictor.predict(request.model, request.version, (request,), info)
        return _response(prediction)

    async def PredictBatch(  # noqa: N802 - gRPC method names
        self, request: gateway_pb2.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PredictBatchResponse:
        info = await self._admitted(context, request.model, max(1, len(request.rows)))
        for i, row in enumerate(request.rows):
            check_row(row.request_id, row.ByteSize(), self._max_row_bytes, f"rows[{i}].")
        predictions = await self._predictor.predict(
            request.model, request.version, request.rows, info, batch=True
        )
        return gateway_pb2.PredictBatchResponse(results=[_response(p) for p in predictions])


def _admission(
    config: GatewayConfig, watcher: PlatformWatcher | None
) -> tuple[Admission, redis_async.Redis | None, list[Coroutine[Any, Any, None]]]:
    """Admission in-process: the placement, the hashed keys (watched) and the leased Redis token buckets."""
    settings = config.admission
    mesh = config.server.mesh
    limits = functools.partial(
        RateLimits,
        place="gateway",
        key_prefix=settings.admission_key_prefix,
        timeout_s=settings.admission_redis_timeout_s,
        retry_store_after_s=settings.admission_fail_open_s,
    )
    if watcher is None:
        log.error("no platform file: the gateway knows no tenants and refuses every call (UNAUTHENTICATED)")
        return Admission(lambda: None, "gateway", limits(None), mesh=mesh), None, []
    placement = watcher.current.admission.placement
    redis = limiter = None
    if placement == "gateway":
        redis = redis_async.Redis.from_url(
            settings.redis_client_url(),
            socket_timeout=settings.admission_redis_timeout_s,
            socket_connect_timeout=settings.admission_redis_timeout_s,
        )
        limiter = LeasedLimiter(
            redis, lease_s=settings.admission_lease_s, lease_ttl_s=settings.admission_lease_ttl_s
        )

    def _replicas() -> int:
        return settings.admission_replicas or len(watcher.current.gateway.endpoints)

    admission = Admission(lambda: watcher.current, placement, limits(limiter, replicas=_replicas), mesh=mesh)
    tasks: list[Coroutine[Any, Any, None]] = []
    if placement == "gateway":
        keys_file = apikeys.keys_path(watcher.path, watcher.current, settings.admission_keys_file)
        set_keys = admission.policy.set_keys
        set_keys(apikeys.load_keys(keys_file))
        tasks.append(apikeys.watch_keys(keys_file, set_keys, settings.admission_keys_poll_s))
        log.info("admission in the gateway: keys from %s, rate limits in Redis", keys_file)
    else:
        log.info(
            "admission at the edge: identities believed only from Envoy over mutual TLS (mesh: %s)", mesh
        )
    if not mesh:
        log.warning(
            "the gateway port is plaintext (no INFERGRID_GATEWAY_TLS_*_FILE): calls cannot be told to come "
            "through Envoy%s",
            "; with admission at the edge every call is refused" if placement == "edge" else "",
        )
    return admission, redis, tasks


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
    return dataclasses.replace(policy, retry=RetryPolicy(max_attempts=1))


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
    # One channel per replica, without gRPC's own retries: the pool retries on another replica. The
    # features channel has no client interceptors (grpc.aio runs each intercepted call as an extra task):
    # GrpcFeatureSource puts the trace context into each call's metadata itself.
    features_pool = ChannelPool(
        "features",
        lambda address: dial(address, FEATURES_SERVICE, _single_attempt(features_policy)),
        features_policy,
    )

    # A server in this process (libs.inproc, services.node) answers unary calls only; a stream buys
    # nothing without a network.
    streaming = up.inference_streaming and not is_local(up.inference_target)

    def _inference(name: str) -> tuple[ChannelPool, Dependency, GrpcModelClient | StreamingModelClient]:
        # The default target ("inference") or a named pool of the platform file (e.g. gpu, cpu): its own
        # channels, breaker and metrics.
        channels = ChannelPool(
            name,
            lambda address: dial(
                address, INFERENCE_SERVICE, _single_attempt(inference_policy), telemetry=telemetry
            ),
            inference_policy,
        )
        dependency = Dependency(name, _single_attempt(inference_policy))
        client = pool_client(channels, dependency, streaming, up.inference_hang_margin_s)
        return channels, dependency, client

    inference_pool, _, models = _inference("inference")
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
    platform_file = config.models.platform_file
    pools = InferencePools(
        lambda name: _inference(f"inference-{name}"),
        discovery_interval_s=up.discovery_interval_s,
        base_dir=str(platform_file.parent) if platform_file is not None else None,
    )

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
    if platform_file is not None:

        def _apply(platform: PlatformConfig) -> None:
            router.update(platform)
            pools.apply(platform)

        watcher = PlatformWatcher(platform_file, _apply, config.models.platform_poll_interval_s)
        router.update(watcher.current)
        pools.apply(watcher.current)
        await pools.refresh()
    admission, admission_redis, admission_tasks = _admission(config, watcher)

    cache: ResponseCache | None = None
    if config.cache.response_cache_enabled:
        cache = RedisResponseCache(
            config.cache.redis_client_url(),
            config.cache.response_cache_ttl_s,
            config.cache.response_cache_timeout_s,
        )

    catalog = ModelCatalog(layouts=config.models.input_layouts)
    if not catalog.names():
        log.warning("no input layouts found in %s", config.models.input_layouts)
    await refresh_facts(catalog, inference_pool, up.inference_timeout_s)
    predictor = Predictor(
        catalog,
        router,
        features,
        FailoverModelClient(models, pools.of),
        publisher,
        upstream=config.upstream,
        batching=config.batching,
        cache_config=config.cache,
        cache=cache,
        tracer=telemetry.tracer_provider.get_tracer(__name__)
        if telemetry and telemetry.tracer_provider
        else None,
    )
    servicer = PredictionServiceServicer(predictor, admission, config.batching.max_row_bytes)
    sc = config.server
    credentials = None
    if sc.tls_ca_file is not None and sc.tls_cert_file is not None and sc.tls_key_file is not None:
        credentials = mtls.server_credentials(sc.tls_ca_file, sc.tls_cert_file, sc.tls_key_file)
    server = build_server(
        config.server,
        [GrpcService.of(SERVICE_NAME, gateway_pb2_grpc.add_PredictionServiceServicer_to_server, servicer)],
        telemetry=telemetry,
        credentials=credentials,
    )
    if sc.health_port:
        host = f"[{sc.host}]" if ":" in sc.host else sc.host
        if server.grpc_server.add_insecure_port(f"{host}:{sc.health_port}") == 0:
            raise OSError(f"could not bind the health port {sc.host}:{sc.health_port}")
    server.run_in_background(predictor.report_gauges(), name="gauges")
    if watcher is not None:
        server.run_in_background(watcher.run(), name="platform-watcher")
    for coro in admission_tasks:
        server.run_in_background(coro)
    for w in endpoint_watchers:
        server.run_in_background(w.run(), name=f"endpoints-{w.name}")
    server.run_in_background(
        watch_facts(catalog, inference_pool, up.inference_timeout_s, config.models.model_facts_interval_s),
        name="model-facts",
    )
    if isinstance(models, StreamingModelClient):
        server.run_in_background(models.watch(), name="inference-streams")

    async def _close() -> None:
        await predictor.close()
        await models.close()
        await pools.close()
        await features.close()
        if cache is not None:
            await cache.close()
        if admission_redis is not None:
            await admission_redis.aclose()
        if owned_producer is not None:
            await asyncio.get_running_loop().run_in_executor(None, owned_producer.close)

    server.on_stop.append(_close)
    return server
