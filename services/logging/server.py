"""The logging gRPC server: InferenceLogService over the record store, plus the consumer pipeline.

The query API is internal: Envoy has no route to it, and in Kubernetes only pods labelled
`infergrid.io/logging-query: allowed` may connect (the logging NetworkPolicy). Every call presents a
credential (services/logging/access.py): a tenant's API key reads only that tenant's records, the
operator's admin token any tenant's and GetStats; no credential, an unknown or a revoked key is
UNAUTHENTICATED. Records are keyed by (tenant, request id), so a caller cannot read another tenant's by
guessing or reusing a request id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import grpc

from infergrid.logging.v1 import logging_pb2, logging_pb2_grpc
from libs import apikeys
from libs.admission import AdmissionPolicy
from libs.cassandra import AsyncCassandra, LazySession
from libs.errors import InvalidArgument, NotFound
from libs.platform import PlatformWatcher
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.logging.access import QueryAccess
from services.logging.config import LoggingConfig
from services.logging.lake import ParquetLake
from services.logging.paging import decode_token, encode_token, query_fingerprint
from services.logging.pipeline import LogPipeline, PipelineStats, ensure_topics
from services.logging.store import CassandraLogStore, LogStore, RecordQuery, create_schema
from services.logging.validation import MAX_REQUEST_ID_CHARS

log = logging.getLogger(__name__)

SERVICE_NAME = logging_pb2.DESCRIPTOR.services_by_name["InferenceLogService"].full_name
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TENANT_CHARS = 128


def _tenant(tenant: str) -> str:
    """The request's tenant, which every read of the operator must name."""
    if not tenant:
        raise InvalidArgument("tenant: required (records are read per tenant)")
    if len(tenant) > MAX_TENANT_CHARS:
        raise InvalidArgument(f"tenant: longer than {MAX_TENANT_CHARS} characters")
    return tenant


class InferenceLogServiceServicer(logging_pb2_grpc.InferenceLogServiceServicer):
    """Translates InferenceLogService protos to the store and the pipeline's counters."""

    def __init__(self, store: LogStore, stats: PipelineStats, access: QueryAccess) -> None:
        self._store = store
        self._stats = stats
        self._access = access

    async def GetRecord(  # noqa: N802 - gRPC method names
        self, request: logging_pb2.GetRecordRequest, context: grpc.aio.ServicerContext
    ) -> logging_pb2.InferenceLogRecord:
        tenant = _tenant(self._access.tenant(context, request.tenant))
        if not request.request_id:
            raise InvalidArgument("request_id: required")
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument(f"request_id: longer than {MAX_REQUEST_ID_CHARS} characters")
        payload = await self._store.get(tenant, request.request_id)
        if payload is None:
            # The same answer whether the id is unknown or another tenant's: nothing leaks across tenants.
            raise NotFound(f"no inference-log record for request_id {request.request_id!r} of this tenant")
        return logging_pb2.InferenceLogRecord.FromString(payload)

    async def QueryRecords(  # noqa: N802 - gRPC method names
        self, request: logging_pb2.QueryRecordsRequest, context: grpc.aio.ServicerContext
    ) -> logging_pb2.QueryRecordsResponse:
        tenant = _tenant(self._access.tenant(context, request.tenant))
        if not request.model:
            raise InvalidArgument("model: required")
        if not request.HasField("start_time") or not request.HasField("end_time"):
            raise InvalidArgument("start_time and end_time: both required")
        start_us, end_us = request.start_time.ToMicroseconds(), request.end_time.ToMicroseconds()
        if end_us <= start_us:
            raise InvalidArgument("end_time: must be after start_time")
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size: must be 0..{MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})")
        fingerprint = query_fingerprint(request.model, request.model_version, start_us, end_us, tenant)
        cursor = decode_token(request.page_token, fingerprint) if request.page_token else None
        page = await self._store.query(
            RecordQuery(
                tenant=tenant,
                model=request.model,
                model_version=request.model_version,
                start_us=start_us,
                end_us=end_us,
                page_size=request.page_size or DEFAULT_PAGE_SIZE,
                cursor=cursor,
            )
        )
        return logging_pb2.QueryRecordsResponse(
            records=[logging_pb2.InferenceLogRecord.FromString(p) for p in page.payloads],
            next_page_token=encode_token(page.next_cursor, fingerprint) if page.next_cursor else "",
        )

    async def GetStats(  # noqa: N802 - gRPC method names
        self, request: logging_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> logging_pb2.GetStatsResponse:
        self._access.operator(context, "GetStats (counts over every tenant)")
        by_model = dict(self._stats.records_by_model)
        if request.model:
            by_model = {request.model: by_model.get(request.model, 0)}
        return logging_pb2.GetStatsResponse(
            records_by_model=by_model,
            records_total=self._stats.records_total,
            dead_lettered_total=self._stats.dead_lettered_total,
            consumer_lag=self._stats.consumer_lag,
        )


def _log_store(config: LoggingConfig) -> LazySession[CassandraLogStore]:
    """The record store on the process's Cassandra session: tables created, statements prepared."""

    def _build(cassandra: AsyncCassandra) -> CassandraLogStore:
        create_schema(cassandra)
        return CassandraLogStore(cassandra, ttl_s=config.pipeline.record_ttl_seconds)

    return LazySession(config.cassandra, _build)


def _key_policy(
    config: LoggingConfig,
) -> tuple[AdmissionPolicy | None, list[Callable[[], Coroutine[Any, Any, None]]]]:
    """Tenants' API keys as the gateway reads them (platform file and key file, both watched); None: no keys."""
    query = config.query
    if query.query_platform_file is None:
        return None, []
    platform = PlatformWatcher(query.query_platform_file, lambda _: None, query.query_keys_poll_s)
    keys_file = apikeys.keys_path(platform.path, platform.current, query.query_keys_file)
    policy = AdmissionPolicy(lambda: platform.current, apikeys.load_keys(keys_file))
    log.info("query API: tenants' API keys from %s", keys_file)
    return policy, [
        platform.run,
        partial(apikeys.watch_keys, keys_file, policy.set_keys, query.query_keys_poll_s),
    ]


async def create_server(
    config: LoggingConfig, telemetry: Telemetry | None = None, *, store: LogStore | None = None
) -> Server:
    """Builds the logging server (bound, not started) and, unless `pipeline.consume` is off, its consumer.

    Args:
        config: The service configuration.
        telemetry: Tracing and metrics set up by `__main__` (the consumer traces records when tracing is on).
        store: The record store; by default Cassandra, connected and its tables created here.
    """
    policy, watchers = _key_policy(config)  # first: a missing platform file fails before any connection
    session = None
    if store is None:
        # The consumer writes from its first record: connect before serving (the session then
        # reconnects by itself through outages).
        session = _log_store(config)
        store = await session.open()
    pipeline: LogPipeline | None = None
    stats = PipelineStats()
    pc = config.pipeline
    if pc.consume:
        await asyncio.get_running_loop().run_in_executor(None, ensure_topics, config.kafka, pc)
        lake = ParquetLake(
            pc.lake_dir, pc.topic, roll_bytes=pc.lake_roll_bytes, roll_seconds=pc.lake_roll_seconds
        )
        pipeline = LogPipeline(
            pc, config.kafka, store, lake, trace_records=telemetry is not None and telemetry.tracing
        )
        stats = pipeline.stats
    servicer = InferenceLogServiceServicer(store, stats, QueryAccess(config.query.query_admin_token, policy))
    checked_store = store

    async def _ready() -> bool:
        if pipeline is not None and not pipeline.running:
            return False
        return await checked_store.ready()

    server = build_server(
        config.server,
        [GrpcService.of(SERVICE_NAME, logging_pb2_grpc.add_InferenceLogServiceServicer_to_server, servicer)],
        telemetry=telemetry,
        readiness=_ready,
    )
    for watcher in watchers:
        server.run_in_background(watcher())
    if pipeline is not None:
        pipeline.start()
        server.on_stop.append(pipeline.stop)
    if session is not None:
        server.on_stop.append(session.close)
    return server
