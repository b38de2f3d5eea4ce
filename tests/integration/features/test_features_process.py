"""`python -m services.features` configured only by environment variables, loaded by the demo command."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest

from infergrid.features.v1 import features_pb2 as pb
from infergrid.features.v1 import features_pb2_grpc
from infergrid.types.v1.value_pb2 import Value, ValueList
from libs.testing import free_port, spawn_module, stop_process, wait_serving
from services.features.config import FeaturesConfig
from services.features.server import SERVICE_NAME
from stack import demo_features as demo

pytestmark = pytest.mark.integration


async def test_service_process_serves_the_demo_features(
    features_config: FeaturesConfig, tmp_path: Path
) -> None:
    port = free_port()
    c = features_config.cassandra
    proc = spawn_module(
        "services.features",
        {
            "INFERGRID_FEATURES_PORT": str(port),
            "INFERGRID_FEATURES_METRICS_PORT": "0",
            "INFERGRID_FEATURES_CASSANDRA_CONTACT_POINTS": ",".join(c.cassandra_contact_points),
            "INFERGRID_FEATURES_CASSANDRA_PORT": str(c.cassandra_port),
            "INFERGRID_FEATURES_CASSANDRA_USERNAME": c.cassandra_username,
            "INFERGRID_FEATURES_CASSANDRA_PASSWORD": c.cassandra_password,
            "INFERGRID_FEATURES_CASSANDRA_KEYSPACE": f"features_demo_{os.getpid()}",
            "INFERGRID_FEATURES_REDIS_URL": features_config.cache.redis_url,
            "INFERGRID_FEATURES_CACHE_KEY_PREFIX": f"demo{os.getpid()}:",
        },
    )
    try:
        await wait_serving(port, SERVICE_NAME, proc, timeout=60)
        target = f"127.0.0.1:{port}"
        written = await demo.load(target, {"user": 2000, "merchant": 100, "device": 100}, timeout_s=60)
        assert written == {"user": 2000, "merchant": 100, "device": 100}
        refs = [f"{v.name}:{name}" for v in demo.VIEWS for name, _, _ in v.features]
        async with grpc.aio.insecure_channel(target) as channel:
            stub = features_pb2_grpc.FeatureServiceStub(channel)
            got = await stub.GetOnlineFeatures(
                pb.GetOnlineFeaturesRequest(
                    features=refs,
                    entities={
                        "user_id": ValueList(
                            values=[Value(string_value=f"u{i:05d}") for i in (0, 1999, 2000)]
                        ),
                        "merchant_id": ValueList(values=[Value(string_value="m0042")] * 3),
                        "device_id": ValueList(values=[Value(string_value="d00007")] * 3),
                    },
                ),
                timeout=10,
            )
        assert len(got.results) == 24
        _, users = demo.generate(demo.USER, 2000)
        assert got.results[3].values[1].float_value == users["avg_amount_30d"][1999]
        assert list(got.results[0].statuses) == [
            pb.FEATURE_STATUS_PRESENT,
            pb.FEATURE_STATUS_PRESENT,
            pb.FEATURE_STATUS_NOT_FOUND,
        ]
        assert all(list(v.statuses)[:2] == [pb.FEATURE_STATUS_PRESENT] * 2 for v in got.results)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        stop_process(proc)
