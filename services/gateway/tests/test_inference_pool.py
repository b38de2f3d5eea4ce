"""The gateway's inference and features clients over a pool of real gRPC servers.

Batches spread over every replica, a killed replica costs no failed call, a hung stream (a server that
takes messages and never answers) is abandoned after the deadline, and an endpoint added to the discovery
file gets traffic; streamed and unary inference alike.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as ipb
from inference import grpc_service_pb2_grpc
from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs.channels import dial
from libs.errors import DeadlineExceeded
from libs.pool import ChannelPool
from libs.resilience import BreakerPolicy, Dependency, DependencyPolicy, RetryPolicy
from libs.testing import NO_REDIS_URL, WithApiKey, write_test_admission
from services.gateway.config import (
    AdmissionConfig,
    GatewayConfig,
    GatewayServerConfig,
    ModelsConfig,
    UpstreamConfig,
)
from services.gateway.failover import pool_client
from services.gateway.inference_client import GrpcModelClient, StreamingModelClient
from services.gateway.server import FEATURES_SERVICE, INFERENCE_SERVICE, create_server
from services.gateway.tests.fake_servers import FakeFeatureService, FakeInference, serve
from services.gateway.tests.fakes import toy_spec, write_layout

POLICY = DependencyPolicy(
    timeout_s=0.5,
    retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01),
    breaker=BreakerPolicy(failure_threshold=3, reset_timeout_s=30.0),
)
SINGLE = DependencyPolicy(timeout_s=0.5, retry=RetryPolicy(max_attempts=1), breaker=POLICY.breaker)


class HungInference(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Takes every streamed request and never answers (a wedged server whose connection stays up)."""

    def __init__(self) -> None:
        self.received = 0

    async def ModelStreamInfer(  # noqa: N802
        self, requests: AsyncIterator[ipb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ipb.ModelStreamInferResponse]:
        async for _request in requests:
            self.received += 1
        if False:  # an async generator that yields nothing
            yield ipb.ModelStreamInferResponse()

    async def ModelInfer(  # noqa: N802
        self, request: ipb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> ipb.ModelInferResponse:
        self.received += 1
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


def _pool(*addresses: str) -> ChannelPool:
    pool = ChannelPool("inference-test", lambda address: dial(address, INFERENCE_SERVICE, SINGLE), POLICY)
    pool.update(addresses)
    return pool


def _client(pool: ChannelPool, streaming: bool) -> GrpcModelClient | StreamingModelClient:
    return pool_client(pool, Dependency("inference-test", SINGLE), streaming, hang_margin_s=0.2)


async def _infer(client: GrpcModelClient | StreamingModelClient, timeout: float = 0.5) -> float:
    outputs = await client.infer(toy_spec(), "1", np.ones((1, 5), dtype=np.float32), timeout)
    return float(outputs["score"][0, 0])


@pytest.fixture(params=[True, False], ids=["stream", "unary"])
def streaming(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_batches_land_on_every_replica_and_survive_one_being_killed(streaming: bool) -> None:
    a, b = FakeInference(), FakeInference()
    (server_a, address_a), (server_b, address_b) = await serve(a), await serve(b)
    pool = _pool(address_a, address_b)
    client = _client(pool, streaming)
    try:
        scores = [await _infer(client) for _ in range(10)]
        assert len(set(scores)) == 1
        assert (a.calls, b.calls) == (5, 5)  # round robin

        await server_a.stop(0)
        for _ in range(20):
            await _infer(client)  # no failure: the dead replica's calls go to the other one
        assert b.calls == 25
    finally:
        await client.close()
        await server_a.stop(0)
        await server_b.stop(0)


async def test_a_hung_stream_is_abandoned_after_the_deadline_and_the_other_replica_serves() -> None:
    good, hung = FakeInference(), HungInference()
    (server_good, address_good), (server_hung, address_hung) = await serve(good), await serve(hung)
    pool = _pool(address_hung, address_good)
    client = StreamingModelClient(pool, Dependency("inference-test", SINGLE), hang_margin_s=0.1)
    watcher = asyncio.create_task(client.watch(0.02))
    try:
        # The first batch goes to the hung replica and waits: its own deadline is its caller's to keep.
        first = asyncio.create_task(_infer(client, timeout=5.0))
        await asyncio.sleep(0.05)
        assert hung.received == 1
        assert await _infer(client) > 0  # round robin: the next batch goes to the good replica
        # ... and the one after to the hung replica again, with a short deadline that runs out.
        (hung_endpoint,) = [e for e in pool.endpoints if e.address == address_hung]
        with pytest.raises(DeadlineExceeded):
            await _infer(client, timeout=0.05)
        assert hung.received == 2
        # ... and once it is past its deadline plus the margin, the stream is given up: the first
        # batch fails over to the good replica long before its own 5 s, and the hung one is ejected.
        assert await asyncio.wait_for(first, 2.0) > 0
        assert good.calls == 2
        assert hung_endpoint.ejected_until > 0
        calls = good.calls
        for _ in range(5):
            await _infer(client)
        assert good.calls == calls + 5  # the ejected replica gets nothing meanwhile
    finally:
        watcher.cancel()
        await client.close()
        await server_good.stop(0)
        await server_hung.stop(0)


async def test_a_removed_endpoint_finishes_its_calls_before_its_channel_closes() -> None:
    slow = FakeInference()
    server, address = await serve(slow)
    pool = _pool(address)
    client = _client(pool, streaming=True)
    try:
        (endpoint,) = pool.endpoints
        call = asyncio.create_task(_infer(client))
        await asyncio.sleep(0)
        assert endpoint.in_flight == 1
        pool.update([])
        assert await call > 0  # answered although its endpoint left
        await asyncio.sleep(0.05)
        assert endpoint.removed and not endpoint.extras  # stream and channel closed
        with pytest.raises(Exception, match="no endpoints"):
            await _infer(client)
    finally:
        await client.close()
        await server.stop(0)


async def test_an_endpoint_added_to_the_discovery_file_gets_traffic(tmp_path: Path, streaming: bool) -> None:
    layouts = write_layout(tmp_path / "layouts")
    a, b = FakeInference(), FakeInference()
    a.served = b.served = {"toy": ("1",)}
    (server_a, address_a), (server_b, address_b) = await serve(a), await serve(b)
    features = FakeFeatureService()
    f_server, f_address = await serve(features)
    endpoints = tmp_path / "inference.json"
    endpoints.write_text(json.dumps({"endpoints": [address_a]}))
    config = GatewayConfig(
        server=GatewayServerConfig(port=0),
        models=ModelsConfig(input_layouts=layouts, platform_file=write_test_admission(tmp_path)),
        admission=AdmissionConfig(admission_redis_url=NO_REDIS_URL),
        upstream=UpstreamConfig(
            features_target=f_address.replace("127.0.0.1", "localhost"),
            inference_target=f"file:{endpoints}",
            discovery_interval_s=0.05,
            inference_streaming=streaming,
        ),
        inference_log_enabled=False,
    )
    server = await create_server(config)
    await server.start()
    request = gateway_pb2.PredictRequest(model="toy", entities={"user_id": "u1", "merchant_id": "m1"})
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", interceptors=[WithApiKey()]
        ) as channel:
            stub = gateway_pb2_grpc.PredictionServiceStub(channel)
            for _ in range(4):
                await stub.Predict(request, timeout=5)
            assert (a.calls, b.calls) == (4, 0)
            tmp = endpoints.with_suffix(".tmp")
            tmp.write_text(json.dumps({"endpoints": [address_a, address_b]}))
            tmp.replace(endpoints)
            for _ in range(100):
                await stub.Predict(request, timeout=5)
                if b.calls:
                    break
                await asyncio.sleep(0.02)
            assert b.calls > 0, "the added endpoint never got a batch"
            assert features.calls > 0  # features over a DNS name (localhost) as before
    finally:
        await server.stop(0, 0.5)
        await server_a.stop(0)
        await server_b.stop(0)
        await f_server.stop(0)


def test_targets_are_validated_at_start_up() -> None:
    with pytest.raises(ValueError, match="inference_target"):
        UpstreamConfig(inference_target="nope")
    assert (
        FEATURES_SERVICE
        and UpstreamConfig(inference_target="dns:///svc:8001,file:x.json").discovery_interval_s
    )


async def test_client_latency_per_replica_method_and_status(streaming: bool) -> None:
    from prometheus_client import REGISTRY

    a = FakeInference()
    server_a, address_a = await serve(a)
    pool = _pool(address_a)
    client = _client(pool, streaming)
    method = "ModelStreamInfer" if streaming else "ModelInfer"
    labels = {
        "rpc_system": "grpc",
        "rpc_service": "inference.GRPCInferenceService",
        "rpc_method": method,
        "server_address": address_a,
        "rpc_grpc_status_code": "0",
    }
    try:
        before = REGISTRY.get_sample_value("rpc_client_duration_seconds_count", labels) or 0.0
        for _ in range(3):
            await _infer(client)
        assert REGISTRY.get_sample_value("rpc_client_duration_seconds_count", labels) == before + 3
    finally:
        await client.close()
        await server_a.stop(0)
