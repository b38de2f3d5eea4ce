"""A node (`python -m services.node`) on the real stack: features (Cassandra + Redis), inference (the demo ONNX
model) and the gateway in one process, the gateway calling the other two in process.

The node runs as a real process with each service's own variables. Its answers must be what the three
separate services give: the model run by ONNX Runtime on the features stored for the request, bad input
refused with INVALID_ARGUMENT, every answered prediction's record on Kafka, and the features and inference
ports still served for clients of their own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from infergrid.features.v1 import features_pb2_grpc
from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs.testing import NO_REDIS_URL, WithApiKey, free_port, service_env, wait_serving, write_test_admission
from stack import demo_features as features_demo
from stack import demo_model as inference_demo
from stack.cassandra import Cassandra
from stack.cassandra import admin_env as cassandra_admin_env
from stack.kafka import Kafka, credential_env
from stack.redis import Redis
from stack.services import INPUT_LAYOUTS
from tests.integration.gateway.test_gateway_stack import (
    BAD_INPUT,
    COUNTS,
    Process,
    _consume,
    _request,
    check_bad_input,
)

pytestmark = pytest.mark.integration

GATEWAY_SERVICE = "infergrid.gateway.v1.PredictionService"
FEATURES_SERVICE = "infergrid.features.v1.FeatureService"
INFERENCE_SERVICE = "inference.GRPCInferenceService"


@dataclass
class Node:
    gateway: gateway_pb2_grpc.PredictionServiceStub
    features: features_pb2_grpc.FeatureServiceStub
    inference: grpc_service_pb2_grpc.GRPCInferenceServiceStub
    repo: Path
    topic: str
    kafka: Kafka
    metrics_port: int
    log_path: Path


@pytest.fixture(scope="module")
async def node(
    tmp_path_factory: pytest.TempPathFactory,
    cassandra_server: Cassandra,
    redis_server: Redis,
    kafka_server: Kafka,
) -> AsyncIterator[Node]:
    tmp = tmp_path_factory.mktemp("node")
    tag = uuid.uuid4().hex[:8]
    repo = tmp / "models"
    await asyncio.to_thread(inference_demo.write_repository, repo, 6000)
    topic = f"node-it-{tag}"
    admin = AdminClient(kafka_server.client_conf())
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    platform = write_test_admission(tmp)
    gateway_port, features_port, inference_port, metrics_port = (free_port() for _ in range(4))
    env = {
        **service_env(
            "features",
            features_port,
            CASSANDRA_CONTACT_POINTS=",".join(cassandra_server.contact_points),
            CASSANDRA_PORT=cassandra_server.port,
            CASSANDRA_KEYSPACE=f"node_it_{tag}",
            REDIS_URL=redis_server.url,
            CACHE_KEY_PREFIX=f"node{tag}:",
            # The node's own settings win over these: it serves features on the aio transport.
            TRANSPORT="threaded",
        ),
        **cassandra_admin_env(cassandra_server.config, "INFERGRID_FEATURES_CASSANDRA"),
        **service_env("inference", inference_port, HTTP_PORT=0, MODEL_REPOSITORY=repo, TRANSPORT="threaded"),
        **service_env(
            "gateway",
            gateway_port,
            METRICS_PORT=metrics_port,
            INPUT_LAYOUTS=INPUT_LAYOUTS,
            PLATFORM_FILE=platform,
            ADMISSION_REDIS_URL=NO_REDIS_URL,
            FEATURES_TIMEOUT_S=0.5,
            # Ignored by the node: it calls both in process.
            FEATURES_TARGET="127.0.0.1:9",
            INFERENCE_TARGET="127.0.0.1:9",
            KAFKA_BOOTSTRAP_SERVERS=kafka_server.bootstrap_servers,
            INFERENCE_LOG_TOPIC=topic,
            INFERENCE_LOG_SPOOL_DIR=tmp / "spool",
        ),
        **credential_env(kafka_server.config, "admin", "INFERGRID_GATEWAY_"),
    }
    process = Process("services.node", env, tmp / "node.log")
    process.start()
    try:
        assert process.proc is not None
        await wait_serving(features_port, FEATURES_SERVICE, process.proc, timeout=90)
        await wait_serving(inference_port, INFERENCE_SERVICE, process.proc, timeout=60)
        await wait_serving(gateway_port, GATEWAY_SERVICE, process.proc, timeout=60)
        await features_demo.load(f"127.0.0.1:{features_port}", COUNTS)
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}", interceptors=[WithApiKey()]) as gateway,
            grpc.aio.insecure_channel(f"127.0.0.1:{features_port}") as features,
            grpc.aio.insecure_channel(f"127.0.0.1:{inference_port}") as inference,
        ):
            yield Node(
                gateway=gateway_pb2_grpc.PredictionServiceStub(gateway),
                features=features_pb2_grpc.FeatureServiceStub(features),
                inference=grpc_service_pb2_grpc.GRPCInferenceServiceStub(inference),
                repo=repo,
                topic=topic,
                kafka=kafka_server,
                metrics_port=metrics_port,
                log_path=tmp / "node.log",
            )
    finally:
        process.stop()


async def test_a_prediction_equals_onnx_runtime_on_the_stored_features(node: Node) -> None:
    for version in ("1", "2"):
        request = _request(7, version=version)
        reply = await node.gateway.Predict(request, timeout=10)
        assert reply.model == "fraud" and reply.model_version == version
        assert not reply.degraded, reply.degraded_features
        stored = await node.features.GetOnlineFeatures(
            inference_demo.stored_features_request(request), timeout=10
        )
        expected = inference_demo.onnx_score(node.repo / "fraud", version, request, stored)
        assert np.allclose(reply.outputs["fraud_probability"].float_value, expected, rtol=1e-5, atol=1e-6)


async def test_the_gateway_calls_features_and_inference_in_process_not_over_a_port(node: Node) -> None:
    """Its channel pools hold one `inproc:` endpoint each, and its outbound calls are timed under them."""
    await node.gateway.Predict(_request(8), timeout=10)
    text = await asyncio.to_thread(_metrics, node.metrics_port)
    addresses = {
        sample.labels["server_address"]
        for family in text_string_to_metric_families(text)
        if family.name == "rpc_client_duration_seconds"
        for sample in family.samples
    }
    assert {"inproc:features", "inproc:inference"} <= addresses, addresses
    assert not any(a.startswith("127.0.0.1") for a in addresses), addresses


def _metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


@pytest.mark.parametrize(("mutate", "code", "text"), BAD_INPUT)
async def test_bad_input_gets_a_status_naming_the_problem_and_never_crashes_the_node(
    node: Node, mutate: object, code: grpc.StatusCode, text: str
) -> None:
    await check_bad_input(node.gateway, mutate, code, text)


async def test_every_answered_prediction_has_its_record_on_kafka(node: Node) -> None:
    requests = [_request(u % 300, request_id=f"node-{uuid.uuid4().hex}") for u in range(200)]
    replies = await asyncio.gather(*(node.gateway.Predict(r, timeout=10) for r in requests))
    records = await asyncio.to_thread(_consume, node.kafka, node.topic, [r.request_id for r in replies])
    assert len(records) == len(replies)
    for reply in replies:
        record = records[reply.request_id]
        assert record.model_version == reply.model_version
        assert (
            record.outputs["fraud_probability"].float_value == reply.outputs["fraud_probability"].float_value
        )


async def test_the_inference_port_still_serves_its_own_clients(node: Node) -> None:
    ready = await node.inference.ModelReady(pb.ModelReadyRequest(name="fraud"), timeout=10)
    assert ready.ready
    batch = gateway_pb2.PredictBatchRequest(model="fraud")
    for u in range(5):
        single = _request(u)
        batch.rows.add(entities=single.entities, features=single.features)
    reply = await node.gateway.PredictBatch(batch, timeout=10)
    assert len(reply.results) == 5 and all(r.outputs for r in reply.results)
