"""The catalog learns versions, readiness and max_batch_size over the inference API (a real channel)."""

from __future__ import annotations

from pathlib import Path

from inference import grpc_service_pb2_grpc
from libs.channels import dial
from libs.pool import ChannelPool
from libs.resilience import DependencyPolicy, RetryPolicy
from services.gateway.catalog import ModelCatalog
from services.gateway.model_facts import refresh_facts
from services.gateway.server import INFERENCE_SERVICE
from services.gateway.tests.fake_servers import serve
from services.gateway.tests.fakes import ServedFacts, write_layout

POLICY = DependencyPolicy(timeout_s=0.5, retry=RetryPolicy(max_attempts=1))


class Inference(ServedFacts, grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    pass


async def test_versions_readiness_and_batch_size_come_from_the_inference_service(tmp_path: Path) -> None:
    inference = Inference()
    inference.served = {"toy": ("1", "2", "3")}
    inference.max_batch_size = 64
    server, address = await serve(inference)
    pool = ChannelPool("inference-test", lambda address: dial(address, INFERENCE_SERVICE, POLICY), POLICY)
    try:
        write_layout(tmp_path, "other")  # a layout the inference service does not serve
        catalog = ModelCatalog(layouts=write_layout(tmp_path))
        assert catalog.get("toy").versions == () and catalog.get("toy").latest_version == ""
        await refresh_facts(catalog, pool, 0.5)  # no endpoint yet: logged, nothing known
        assert catalog.get("toy").versions == ()
        pool.update([address])
        await refresh_facts(catalog, pool, 0.5)
        toy = catalog.get("toy")
        assert (toy.versions, toy.latest_version, toy.max_batch_size) == (("1", "2", "3"), "3", 64)
        assert catalog.get("other").versions == ()
        await refresh_facts(catalog, pool, 0.5)
        assert catalog.get("toy") is toy  # unchanged facts keep the spec (the micro-batcher's key)
    finally:
        await pool.close()
        await server.stop(0)
