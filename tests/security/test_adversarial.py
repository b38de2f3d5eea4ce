"""The adversarial suite: every hole of issue 14 tried against real servers, refusals counted.

Real gRPC servers (the gateway's, the inference service's and the logging service's `create_server`, bound
on free ports, mutual TLS with certificates from `libs.mtls`), a real Redis (the session fixture) for the rate
limits and a real Cassandra for the log records keyed by tenant. Each
attempt is recorded with what came back; the summary (attempts vs refusals by hole) is printed at the end
and every attempt must have been refused. The logs of the whole run are then searched for the API key
and the admin token: neither may appear.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference import grpc_service_pb2 as ipb
from inference import grpc_service_pb2_grpc
from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from infergrid.logging.v1 import logging_pb2, logging_pb2_grpc
from libs import mtls
from libs.admission import RateLimits
from libs.apikeys import add_key
from libs.cassandra import AsyncCassandra
from libs.cassandra import connect as connect_cassandra
from libs.config import load_config
from libs.inference_log import InferenceLogConfig, InferenceLogProducer
from libs.platform import parse_platform
from libs.ratelimit import RedisTokenBucketLimiter
from libs.server import ServerConfig
from libs.spool import Spool
from libs.testing import NO_REDIS_URL, TEST_API_KEY, free_port, write_test_admission
from services.gateway.config import AdmissionConfig, GatewayConfig, GatewayServerConfig, ModelsConfig
from services.gateway.server import create_server as create_gateway
from services.inference.config import ControlConfig, HttpConfig, InferenceConfig
from services.inference.server import create_server as create_inference
from services.logging.config import ENV_PREFIX as LOGGING_ENV
from services.logging.config import LoggingConfig, PipelineConfig, QueryConfig
from services.logging.lake import ParquetLake
from services.logging.lake import read_table as read_lake
from services.logging.server import create_server as create_logging
from services.logging.store import CassandraLogStore, StoredRecord

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-token-that-must-never-be-logged-0123456789"
# The logging query API's callers: acme's and globex's API keys (their own tenant's records only).
ACME_KEY, GLOBEX_KEY = "ig_acme-log-key-never-logged", "ig_globex-log-key-never-logged"
LOG_TENANTS = """
admission: {placement: gateway}
rate_limit_tiers: {t: {requests_per_second: 1, burst: 1}}
tenants: {acme: {tier: t, models: ['*']}, globex: {tier: t, models: ['*']}}
"""
# Held by the poison records: their quarantine must not log what they contain.
CARD_NUMBER = "4111-1111-1111-1111-must-never-be-logged"
_TRIED: collections.Counter[str] = collections.Counter()
_REFUSED: collections.Counter[str] = collections.Counter()
_CODES: collections.Counter[str] = collections.Counter()


def _record(hole: str, code: grpc.StatusCode | None, refused: bool) -> None:
    _TRIED[hole] += 1
    _REFUSED[hole] += int(refused)
    _CODES[code.name if code is not None else "OK"] += 1


async def _attempt(hole: str, call: object, expected: tuple[grpc.StatusCode, ...], text: str = "") -> None:
    """Awaits `call`; it must fail with one of `expected` (naming `text`)."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        refused = exc.code() in expected and text in (exc.details() or "")
        _record(hole, exc.code(), refused)
        assert refused, f"{hole}: {exc.code()} {exc.details()}"
        return
    _record(hole, None, False)
    pytest.fail(f"{hole}: answered OK")


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    lines = [f"  {hole:<42} tried {_TRIED[hole]:>3}  refused {_REFUSED[hole]:>3}" for hole in sorted(_TRIED)]
    total, refused = sum(_TRIED.values()), sum(_REFUSED.values())
    print("\n[adversarial] attempts vs refusals by hole:\n" + "\n".join(lines))
    print(f"[adversarial] total: {total} attempts, {refused} refused; statuses: {dict(_CODES)}")
    assert total == refused


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(self.format(record) + " " + repr(record.__dict__))


@pytest.fixture(scope="module", autouse=True)
def module_logs() -> Iterator[list[str]]:
    """Every log record of the module's run (message, arguments, exception text, extra fields)."""
    sink: list[str] = []
    handler = _Collect(sink)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield sink
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> mtls.MeshFiles:
    return mtls.ensure_mesh_certificates(tmp_path_factory.mktemp("mesh"))


async def _gateway(
    tmp: Path, *, placement: str, mesh: mtls.MeshFiles | None, platform: bool = True
) -> object:
    platform_file = None
    if platform:
        platform_file = write_test_admission(tmp, "")
        if placement == "edge":
            platform_file.write_text(
                platform_file.read_text().replace("placement: gateway", "placement: edge")
            )
    server_config = GatewayServerConfig(port=0, drain_seconds=0)
    if mesh is not None:
        server_config = GatewayServerConfig(
            port=0, tls_ca_file=mesh.ca_cert, tls_cert_file=mesh.gateway_cert, tls_key_file=mesh.gateway_key
        )
    config = GatewayConfig(
        server=server_config,
        models=ModelsConfig(platform_file=platform_file),
        admission=AdmissionConfig(admission_redis_url=NO_REDIS_URL),
        inference_log_enabled=False,
    )
    server = await create_gateway(config)
    await server.start()
    return server


def _predict(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], **fields: str) -> object:
    stub = gateway_pb2_grpc.PredictionServiceStub(channel)
    return stub.Predict(gateway_pb2.PredictRequest(model="fraud", **fields), metadata=metadata, timeout=5)


FORGED = (("x-infergrid-tenant", "test"), ("x-infergrid-model", "fraud"))


@pytest.mark.parametrize("placement", ["gateway", "edge"])
async def test_forged_identity_headers_on_plaintext(tmp_path: Path, placement: str) -> None:
    server = await _gateway(tmp_path, placement=placement, mesh=None)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # type: ignore[attr-defined]
            for extra in ((), (("x-infergrid-placement", placement),), (("x-infergrid-key-name", "test"),)):
                await _attempt(
                    f"forged headers ({placement})",
                    _predict(channel, (*FORGED, *extra)),
                    (grpc.StatusCode.UNAUTHENTICATED,),
                )
            await _attempt(
                f"no credentials ({placement})", _predict(channel, ()), (grpc.StatusCode.UNAUTHENTICATED,)
            )
            await _attempt(
                f"unknown key ({placement})",
                _predict(channel, (("x-api-key", "ig_guessed"),)),
                (grpc.StatusCode.UNAUTHENTICATED,),
            )
    finally:
        await server.stop(0, 0.5)  # type: ignore[attr-defined]


@pytest.mark.parametrize("placement", ["gateway", "edge"])
async def test_plaintext_and_foreign_certificates_to_the_mesh_port(
    tmp_path: Path, placement: str, mesh: mtls.MeshFiles
) -> None:
    server = await _gateway(tmp_path, placement=placement, mesh=mesh)
    address = f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await _attempt(
                "plaintext to the gateway port",
                _predict(channel, (*FORGED, ("x-api-key", TEST_API_KEY))),
                (grpc.StatusCode.UNAVAILABLE,),
            )
        # A pod holding some other certificate of the mesh (the gateway's own, a server-only certificate) is
        # not Envoy: the handshake fails (UNAVAILABLE) or the call is UNAUTHENTICATED.
        not_envoy = mtls.channel_credentials(mesh.ca_cert, mesh.gateway_cert, mesh.gateway_key)
        async with grpc.aio.secure_channel(address, not_envoy) as channel:
            await _attempt(
                "mesh certificate that is not Envoy's",
                _predict(
                    channel, (*FORGED, ("x-infergrid-placement", placement), ("x-api-key", TEST_API_KEY))
                ),
                (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE),
            )
        # Envoy's certificate, but Envoy configured for the other placement: refused, never served open.
        envoy = mtls.channel_credentials(mesh.ca_cert, mesh.envoy_cert, mesh.envoy_key)
        other = "edge" if placement == "gateway" else "gateway"
        async with grpc.aio.secure_channel(address, envoy) as channel:
            await _attempt(
                "placement disagreement",
                _predict(channel, (*FORGED, ("x-infergrid-placement", other), ("x-api-key", TEST_API_KEY))),
                (grpc.StatusCode.UNAUTHENTICATED,),
                "placement disagreement",
            )
    finally:
        await server.stop(0, 0.5)  # type: ignore[attr-defined]


@pytest.mark.parametrize("placement", ["gateway", "edge"])
async def test_the_plaintext_health_port_serves_health_only(
    tmp_path: Path, placement: str, mesh: mtls.MeshFiles
) -> None:
    """As deployed in Kubernetes: mesh files as the Secret gateway-mesh lays them out, probes on a health port."""
    secret = tmp_path / "etc-infergrid-mesh"  # ca.crt, tls.crt, tls.key: cert-manager's keys
    secret.mkdir()
    for source, name in (
        (mesh.ca_cert, "ca.crt"),
        (mesh.gateway_cert, "tls.crt"),
        (mesh.gateway_key, "tls.key"),
    ):
        (secret / name).write_bytes(source.read_bytes())
    platform_file = write_test_admission(tmp_path, "")
    if placement == "edge":
        platform_file.write_text(platform_file.read_text().replace("placement: gateway", "placement: edge"))
    health = free_port()
    config = GatewayConfig(
        server=GatewayServerConfig(
            port=0,
            tls_ca_file=secret / "ca.crt",
            tls_cert_file=secret / "tls.crt",
            tls_key_file=secret / "tls.key",
            health_port=health,
        ),
        models=ModelsConfig(platform_file=platform_file),
        admission=AdmissionConfig(admission_redis_url=NO_REDIS_URL),
        inference_log_enabled=False,
    )
    server = await create_gateway(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING  # what the kubelet asks
            for metadata in (
                (("x-api-key", TEST_API_KEY),),
                (*FORGED, ("x-infergrid-placement", placement), ("x-api-key", TEST_API_KEY)),
            ):
                await _attempt(
                    "predicting on the plaintext health port",
                    _predict(channel, metadata),
                    (grpc.StatusCode.UNAUTHENTICATED,),
                )
    finally:
        await server.stop(0, 0.5)  # type: ignore[attr-defined]


async def test_a_gateway_without_a_platform_file_admits_nobody(tmp_path: Path) -> None:
    server = await _gateway(tmp_path, placement="gateway", mesh=None, platform=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # type: ignore[attr-defined]
            for metadata in ((), FORGED, (("x-api-key", TEST_API_KEY),)):
                await _attempt(
                    "no platform file", _predict(channel, metadata), (grpc.StatusCode.UNAUTHENTICATED,)
                )
    finally:
        await server.stop(0, 0.5)  # type: ignore[attr-defined]


async def test_bad_request_ids_and_huge_rows(tmp_path: Path) -> None:
    server = await _gateway(tmp_path, placement="gateway", mesh=None)
    key = (("x-api-key", TEST_API_KEY),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # type: ignore[attr-defined]
            for bad in ("x" * 129, "has space", "tab\tid", "ünïcode", "nul\x01id"):
                await _attempt(
                    "bad request id",
                    _predict(channel, key, request_id=bad),
                    (grpc.StatusCode.INVALID_ARGUMENT,),
                    "request_id",
                )
            stub = gateway_pb2_grpc.PredictionServiceStub(channel)
            huge = gateway_pb2.PredictRequest(model="fraud", entities={"user_id": "u" * 200_000})
            await _attempt(
                "huge record",
                stub.Predict(huge, metadata=key, timeout=5),
                (grpc.StatusCode.INVALID_ARGUMENT,),
                "bytes",
            )
            batch = gateway_pb2.PredictBatchRequest(model="fraud")
            batch.rows.add(request_id="ok-1")
            batch.rows.add(request_id="bad id")
            await _attempt(
                "bad request id",
                stub.PredictBatch(batch, metadata=key, timeout=5),
                (grpc.StatusCode.INVALID_ARGUMENT,),
                "rows[1].request_id",
            )
    finally:
        await server.stop(0, 0.5)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stack import demo_model as demo

    repo = tmp_path_factory.mktemp("models")
    demo.write_repository(repo, samples=2000)
    return repo


@pytest.fixture
async def inference(model_repo: Path, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[int]:
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    control = ControlConfig(control_token_file=token_file) if request.param == "token" else ControlConfig()
    config = InferenceConfig(
        server=ServerConfig(port=0, drain_seconds=0),
        http=HttpConfig(http_port=0),
        control=control,
    )
    config = InferenceConfig(
        server=config.server,
        models=type(config.models)(model_repository=model_repo, warmup=False),
        http=config.http,
        control=config.control,
    )
    server = await create_inference(config)
    await server.start()
    yield server.port
    await server.stop(0, 0.5)


@pytest.mark.parametrize("inference", ["off", "token"], indirect=True)
async def test_the_model_control_api(inference: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{inference}") as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        load = ipb.RepositoryModelLoadRequest(model_name="fraud")
        unload = ipb.RepositoryModelUnloadRequest(model_name="fraud")
        refusals = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", ADMIN_TOKEN),)):
            await _attempt(
                "unauthenticated control API", stub.RepositoryModelLoad(load, metadata=metadata), refusals
            )
            await _attempt(
                "unauthenticated control API", stub.RepositoryModelUnload(unload, metadata=metadata), refusals
            )
        admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        for filename in ("/etc/passwd", "../../../etc/passwd", "a/b.onnx"):
            request = ipb.RepositoryModelLoadRequest(model_name="fraud")
            request.parameters[
                "config"
            ].string_param = f'{{"backend": "onnxruntime", "default_model_filename": "{filename}"}}'
            await _attempt(
                "path traversal in model load",
                stub.RepositoryModelLoad(request, metadata=admin),
                (*refusals, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT),
            )
        for name in ("../fraud", "/tmp", ".."):
            await _attempt(
                "path traversal in model load",
                stub.RepositoryModelLoad(ipb.RepositoryModelLoadRequest(model_name=name), metadata=admin),
                (*refusals, grpc.StatusCode.NOT_FOUND),
            )


PLATFORM = """
rate_limit_tiers: {t: {requests_per_second: 10, burst: 100}}
tenants: {flood: {tier: t, models: ["*"]}, quiet: {tier: t, models: ["*"]}}
"""


# RateLimits' settings as the services' config sections default them.
_LIMITS: dict[str, Any] = {"place": "test", "timeout_s": 0.2, "retry_store_after_s": 1.0}


async def _limits_attempt(hole: str, limits: RateLimits, tenant: str, rows: int) -> None:
    from libs.errors import ResourceExhausted

    try:
        await limits.charge(parse_platform(PLATFORM), tenant, "fraud", rows)
    except ResourceExhausted:
        _record(hole, grpc.StatusCode.RESOURCE_EXHAUSTED, True)
        return
    _record(hole, None, False)
    pytest.fail(f"{hole}: allowed")


async def test_one_tenant_flooding_with_batches_and_redis_down(redis_server: object, tmp_path: Path) -> None:
    import redis.asyncio as redis_async

    client = redis_async.Redis.from_url(redis_server.url)  # type: ignore[attr-defined]
    limits = RateLimits(RedisTokenBucketLimiter(client), key_prefix=f"adv:{tmp_path.name}", **_LIMITS)
    try:
        await limits.charge(parse_platform(PLATFORM), "flood", "fraud", 100)  # the whole burst, in rows
        for _ in range(5):
            await _limits_attempt("one tenant flooding (per row)", limits, "flood", 1000)
            await _limits_attempt("one tenant flooding (per row)", limits, "flood", 1)
        await limits.charge(parse_platform(PLATFORM), "quiet", "fraud", 10)  # the other tenant still passes
    finally:
        await client.aclose()
    dead = redis_async.Redis.from_url(NO_REDIS_URL, socket_timeout=0.2, socket_connect_timeout=0.2)
    down = RateLimits(RedisTokenBucketLimiter(dead), key_prefix="infergrid:rl", replicas=lambda: 4, **_LIMITS)
    try:
        await down.charge(
            parse_platform(PLATFORM), "flood", "fraud", 25
        )  # 1/4 of the burst: this replica's share
        for _ in range(5):
            await _limits_attempt("Redis down (local share)", down, "flood", 1)
    finally:
        await dead.aclose()


async def test_filling_the_bucket_redis_cannot_erase_a_drained_bucket(
    redis_server: object, tmp_path: Path
) -> None:
    """The bucket Redis as deployed (noeviction): a flood of other keys up to maxmemory erases no bucket."""
    import redis.asyncio as redis_async
    from redis.exceptions import ResponseError

    client = redis_async.Redis.from_url(redis_server.url)  # type: ignore[attr-defined]
    saved = {k: (await client.config_get(k))[k] for k in ("maxmemory", "maxmemory-policy")}
    prefix = f"adv-evict:{tmp_path.name}"
    limits = RateLimits(RedisTokenBucketLimiter(client), key_prefix=prefix, **_LIMITS)
    flood = f"{prefix}:flood"
    try:
        await limits.charge(parse_platform(PLATFORM), "flood", "fraud", 100)  # the whole burst, drained
        buckets = [k async for k in client.scan_iter(match=f"{prefix}*")]
        assert buckets
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory", str(used + 4 * 1024 * 1024))
        await client.config_set("maxmemory-policy", "noeviction")
        refused_writes = 0
        for i in range(2000):  # ~20 MB of cache-like keys: far over maxmemory
            try:
                await client.set(f"{flood}:{i}", b"x" * 10_000, ex=60)
            except ResponseError:  # OOM command not allowed: the flood stops here, nothing is evicted
                refused_writes += 1
        assert refused_writes
        for key in buckets:
            kept = bool(await client.exists(key))
            _record("evicting a drained rate-limit bucket", grpc.StatusCode.OK if kept else None, kept)
            assert kept, key
    finally:
        await client.config_set("maxmemory", saved["maxmemory"])
        await client.config_set("maxmemory-policy", saved["maxmemory-policy"])
        async for key in client.scan_iter(match=f"{flood}:*"):
            await client.delete(key)
        await client.aclose()
    # Another replica's limiter on the same buckets: the drained tenant is still refused.
    other = redis_async.Redis.from_url(redis_server.url)  # type: ignore[attr-defined]
    try:
        after = RateLimits(RedisTokenBucketLimiter(other), key_prefix=prefix, **_LIMITS)
        await _limits_attempt("evicting a drained rate-limit bucket", after, "flood", 50)
    finally:
        await other.aclose()


def _log_record(tenant: str, request_id: str, version: str, time_us: int) -> StoredRecord:
    record = logging_pb2.InferenceLogRecord(
        schema_version=logging_pb2.SCHEMA_VERSION_1,
        request_id=request_id,
        tenant=tenant,
        model="fraud",
        model_version=version,
    )
    record.request_time.FromMicroseconds(time_us)
    return StoredRecord(tenant, request_id, "fraud", version, time_us, record.SerializeToString())


async def test_one_tenant_cannot_read_or_overwrite_anothers_log_records(
    cassandra_server: object, tmp_path: Path
) -> None:
    """The logging sinks and query API keyed by (tenant, request_id), on a real Cassandra and a real lake; the
    query API's callers: no key, another tenant's key, the tenant's own key, the operator's admin token."""
    keyspace = f"adv_{uuid.uuid4().hex[:12]}"
    platform = tmp_path / "platform.yaml"
    platform.write_text(LOG_TENANTS)
    for tenant, key in (("acme", ACME_KEY), ("globex", GLOBEX_KEY)):
        add_key(tmp_path / "keys.yaml", tenant, tenant, key)
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    token_file.chmod(0o600)
    variables = {"QUERY_ADMIN_TOKEN_FILE": token_file, "QUERY_PLATFORM_FILE": platform}  # as deployed
    config = LoggingConfig(
        query=load_config(
            QueryConfig, {f"{LOGGING_ENV}{k}": str(v) for k, v in variables.items()}, LOGGING_ENV
        ),
        server=ServerConfig(port=0, drain_seconds=0),
        pipeline=PipelineConfig(consume=False),
        cassandra=cassandra_server.admin_config(keyspace, cassandra_request_timeout_s=10.0),  # type: ignore[attr-defined]
    )
    server = await create_logging(config)  # connects, creates the keyspace and tables
    await server.start()
    loop = asyncio.get_running_loop()
    session = await loop.run_in_executor(None, connect_cassandra, config.cassandra)
    store = await loop.run_in_executor(None, CassandraLogStore, AsyncCassandra(session, config.cassandra))
    t0 = 1_780_000_000_000_000
    acme = [_log_record("acme", f"acme-{i}", "1", t0 + i) for i in range(5)]
    try:
        await store.write([*acme, _log_record("acme", "shared-id", "1", t0)])
        # globex logs the same request id, later (last write wins is what an attacker would hope for).
        await store.write([_log_record("globex", "shared-id", "2", t0 + 1_000_000)])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = logging_pb2_grpc.InferenceLogServiceStub(channel)
            admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)  # the operator: any tenant it names
            mine = await stub.GetRecord(
                logging_pb2.GetRecordRequest(request_id="shared-id", tenant="acme"), metadata=admin
            )
            intact = (mine.tenant, mine.model_version) == ("acme", "1")
            _record(
                "overwriting another tenant's log record", None if not intact else grpc.StatusCode.OK, intact
            )
            assert intact, mine
            for request_id in ("acme-0", "acme-4"):
                await _attempt(
                    "reading another tenant's log record",
                    stub.GetRecord(
                        logging_pb2.GetRecordRequest(request_id=request_id, tenant="globex"), metadata=admin
                    ),
                    (grpc.StatusCode.NOT_FOUND,),
                )
            await _attempt(
                "reading log records without a tenant",
                stub.GetRecord(logging_pb2.GetRecordRequest(request_id="acme-0"), metadata=admin),
                (grpc.StatusCode.INVALID_ARGUMENT,),
                "tenant",
            )
            query = logging_pb2.QueryRecordsRequest(model="fraud", page_size=2)
            query.start_time.FromMicroseconds(t0 - 1)
            query.end_time.FromMicroseconds(t0 + 3_600_000_000)
            await _attempt(
                "reading log records without a tenant",
                stub.QueryRecords(query, metadata=admin),
                (grpc.StatusCode.INVALID_ARGUMENT,),
                "tenant",
            )
            query.tenant = "globex"
            theirs = await stub.QueryRecords(query, metadata=admin)
            leaked = [r.request_id for r in theirs.records if r.tenant != "globex"]
            _record(
                "listing another tenant's log records", grpc.StatusCode.OK if not leaked else None, not leaked
            )
            assert not leaked and [r.request_id for r in theirs.records] == ["shared-id"]
            query.tenant = "acme"
            first = await stub.QueryRecords(query, metadata=admin)
            assert first.next_page_token
            query.tenant, query.page_token = "globex", first.next_page_token
            await _attempt(
                "continuing another tenant's query",
                stub.QueryRecords(query, metadata=admin),
                (grpc.StatusCode.INVALID_ARGUMENT,),
            )
            # Who asks: nothing or an unknown key is UNAUTHENTICATED; globex's key is refused acme's records
            # and the stats (every tenant's counts); acme's own key is served its own records only.
            everything = logging_pb2.QueryRecordsRequest(model="fraud", tenant="acme", page_size=100)
            everything.start_time.CopyFrom(query.start_time)
            everything.end_time.CopyFrom(query.end_time)
            unauthenticated, denied = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
            get = logging_pb2.GetRecordRequest(request_id="acme-0", tenant="acme")
            for hole, metadata, code in (
                ("log query without a credential", (), unauthenticated),
                ("log query with an unknown key", (("x-api-key", "ig_guessed"),), unauthenticated),
                ("log query with another tenant's key", (("x-api-key", GLOBEX_KEY),), denied),
            ):
                for call in (
                    stub.GetRecord(get, metadata=metadata),
                    stub.QueryRecords(everything, metadata=metadata),
                    stub.GetStats(logging_pb2.GetStatsRequest(), metadata=metadata),
                ):
                    await _attempt(hole, call, (code,))
            own = (("authorization", f"Bearer {ACME_KEY}"),)
            await _attempt(
                "log stats with a tenant's key",
                stub.GetStats(logging_pb2.GetStatsRequest(), metadata=own),
                (denied,),
                "admin token",
            )
            everything.tenant = ""  # a tenant's key reads its own tenant's
            served = [
                (r.tenant, r.request_id) for r in (await stub.QueryRecords(everything, metadata=own)).records
            ]
            ok = sorted(served) == sorted(
                ("acme", r.request_id) for r in [*acme, _log_record("acme", "shared-id", "1", t0)]
            )
            _record(
                "log query with the tenant's own key (served, its own only)",
                grpc.StatusCode.OK if ok else None,
                ok,
            )
            assert ok, served
            await stub.GetStats(logging_pb2.GetStatsRequest(), metadata=admin)  # the operator's: served
    finally:
        await server.stop(0, 0.5)  # type: ignore[attr-defined]
        await loop.run_in_executor(
            None, lambda: session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
        )
        session.cluster.shutdown()
    # The lake: globex's record with acme's id neither replaces acme's in a flush nor on read.
    lake = ParquetLake(tmp_path / "lake", "log", roll_bytes=1 << 20, roll_seconds=60)
    for offset, stored in enumerate((acme[0], _log_record("globex", "acme-0", "2", t0 + 5))):
        lake.add(0, offset, logging_pb2.InferenceLogRecord.FromString(stored.payload), stored.payload)
    lake.flush()
    kept = read_lake(tmp_path / "lake", tenant="acme").column("model_version").to_pylist()
    _record(
        "overwriting another tenant's lake record",
        grpc.StatusCode.OK if kept == ["1"] else None,
        kept == ["1"],
    )
    assert kept == ["1"] and read_lake(tmp_path / "lake").num_rows == 2


def _inference_log_record(tag: str, i: int, blob: int = 0) -> logging_pb2.InferenceLogRecord:
    record = logging_pb2.InferenceLogRecord(
        schema_version=logging_pb2.SCHEMA_VERSION_1, request_id=f"{tag}-{i:04d}", tenant="acme", model="fraud"
    )
    record.request_time.FromMicroseconds(1_780_000_000_000_000 + i)
    if blob:
        record.outputs["blob"].bytes_value = os.urandom(blob)  # incompressible: too large for the topic
        record.entities["card"] = CARD_NUMBER
    return record


def _delivered(kafka: dict[str, Any], topic: str, expected: int, timeout: float = 60.0) -> set[str]:
    consumer = Consumer({**kafka, "group.id": topic, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.5):
                if message.error() is None:
                    seen.add(logging_pb2.InferenceLogRecord.FromString(message.value()).request_id)
    finally:
        consumer.close()
    return seen


def test_poison_records_are_quarantined_and_never_block_the_inference_log(
    kafka_server: object, tmp_path: Path
) -> None:
    """A real broker refuses records over the topic's max.message.bytes; the ones around them still land."""
    kafka = kafka_server.client_conf()  # type: ignore[attr-defined]  # as the administrator
    topic = f"adv-poison-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(kafka)
    new = NewTopic(topic, num_partitions=1, replication_factor=1, config={"max.message.bytes": "8192"})
    admin.create_topics([new])[topic].result(30)
    config = InferenceLogConfig(
        inference_log_topic=topic,
        inference_log_spool_dir=tmp_path / "spool",
        inference_log_resend_interval_s=0.2,
        inference_log_spool_segment_seconds=0.2,
        inference_log_linger_ms=20.0,  # good records share batches with the poison ones
    )
    # An earlier process left a poison record between good ones in its write-ahead log.
    earlier = Spool(tmp_path / "spool")
    for record in (_inference_log_record("old", 0), _inference_log_record("old", 1, 20_000)):
        earlier.append(record.request_id.encode(), record.SerializeToString(), [])
    earlier.append(b"old-0002", _inference_log_record("old", 2).SerializeToString(), [])
    earlier.close()
    producer = InferenceLogProducer(config, kafka_server.kafka_config())  # type: ignore[attr-defined]
    producer.start()
    poison = {"old-0001"}
    try:
        for i in range(30):
            big = i % 10 == 5
            record = _inference_log_record("new", i, 20_000 if big else 0)
            if big:
                poison.add(record.request_id)
            producer.publish(record)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            producer.stats().quarantined < len(poison) or producer._spool.has_messages()
        ):
            time.sleep(0.2)
    finally:
        producer.close()
    good = {f"old-{i:04d}" for i in (0, 2)} | {f"new-{i:04d}" for i in range(30)} - poison
    delivered = _delivered(kafka, topic, len(good))
    kept = {m.key.decode() for m in Spool(tmp_path / "spool").quarantined()}
    for request_id in sorted(poison):
        quarantined = request_id in kept and request_id not in delivered
        _record("poison record blocking the log", grpc.StatusCode.OK if quarantined else None, quarantined)
    lost = good - delivered
    _record("poison record blocking the log", grpc.StatusCode.OK if not lost else None, not lost)
    assert kept == poison and delivered == good, (kept, lost)
    assert producer.stats().quarantined == len(poison)
    assert not list((tmp_path / "spool").glob("segment-*.spool"))  # the poison's segments were deleted


def test_no_secret_in_the_logs(module_logs: list[str]) -> None:
    """Runs last in the module: everything logged by the attempts above, searched for the secrets."""
    text = "\n".join(module_logs)
    assert text  # the servers above did log
    for secret in (TEST_API_KEY, ADMIN_TOKEN, CARD_NUMBER, ACME_KEY, GLOBEX_KEY):
        _record("secret in logs", None if secret in text else grpc.StatusCode.OK, secret not in text)
        assert secret not in text
