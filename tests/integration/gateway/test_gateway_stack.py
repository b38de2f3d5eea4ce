"""The gateway on the real stack: features (Cassandra + Redis), inference (the demo ONNX model) and Kafka.

The feature and inference services run as real processes (so they can be stopped),
loaded with the demo feature views and the demo `fraud` model; the gateway runs in
this process with the real inference-log producer on a topic of its own. Heavy
servers start once for the module; the tests that stop things come last.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from infergrid.features.v1 import features_pb2_grpc
from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from infergrid.logging.v1 import logging_pb2
from libs.checkout import checkout_env
from libs.inference_log import InferenceLogConfig, InferenceLogProducer
from libs.server import Server
from libs.testing import (
    NO_REDIS_URL,
    REPO_ROOT,
    TEST_ADMISSION_YAML,
    WithApiKey,
    free_port,
    service_env,
    stop_process,
    wait_serving,
    write_test_admission,
)
from services.gateway.config import (
    AdmissionConfig,
    GatewayConfig,
    GatewayServerConfig,
    ModelsConfig,
    ResponseCacheConfig,
    UpstreamConfig,
)
from services.gateway.server import create_server
from stack import demo_features as features_demo
from stack import demo_model as inference_demo
from stack.cassandra import Cassandra
from stack.cassandra import admin_env as cassandra_admin_env
from stack.demo import demo_request
from stack.kafka import Kafka
from stack.redis import Redis
from stack.services import INPUT_LAYOUTS

pytestmark = pytest.mark.integration

FEATURES_SERVICE = "infergrid.features.v1.FeatureService"
INFERENCE_SERVICE = "inference.GRPCInferenceService"
COUNTS = {"user": 300, "merchant": 50, "device": 100}
REQUEST_FEATURES = {
    "amount": 250.0,
    "hour_of_day": 3.0,
    "is_weekend": 1.0,
    "channel_online": 1.0,
    "card_present": 0.0,
    "distance_from_home_km": 120.0,
    "is_foreign": 1.0,
    "device_new": 1.0,
}


def _split(weights: tuple[int, int], shadow: str = "") -> str:
    text = TEST_ADMISSION_YAML + (
        "models:\n  fraud:\n    versions:\n"
        f"      - {{version: '1', weight: {weights[0]}}}\n      - {{version: '2', weight: {weights[1]}}}\n"
    )
    return text + (f"    shadow: '{shadow}'\n" if shadow else "")


class Process:
    """`python -m <module>` with its output in a file (never a pipe that could fill up)."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path) -> None:
        self.module, self.env, self.log_path = module, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = checkout_env(self.env)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
            )

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


@dataclass
class Env:
    gateway: gateway_pb2_grpc.PredictionServiceStub
    features: features_pb2_grpc.FeatureServiceStub
    features_process: Process
    features_port: int
    inference_target: str
    inference_process: Process
    repo: Path
    platform: Path
    topic: str
    kafka: Kafka
    producer: InferenceLogProducer
    server: Server


@pytest.fixture(scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory,
    cassandra_server: Cassandra,
    redis_server: Redis,
    kafka_server: Kafka,
) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("gateway")
    tag = uuid.uuid4().hex[:8]
    repo = tmp / "models"
    await asyncio.to_thread(inference_demo.write_repository, repo, 6000)

    features_port, inference_port = free_port(), free_port()
    features = Process(
        "services.features",
        {
            **service_env(
                "features",
                features_port,
                CASSANDRA_CONTACT_POINTS=",".join(cassandra_server.contact_points),
                CASSANDRA_PORT=cassandra_server.port,
                CASSANDRA_KEYSPACE=f"gateway_it_{tag}",
                REDIS_URL=redis_server.url,
                CACHE_KEY_PREFIX=f"gw{tag}:",
            ),
            **cassandra_admin_env(cassandra_server.config, "INFERGRID_FEATURES_CASSANDRA"),
        },
        tmp / "features.log",
    )
    inference = Process(
        "services.inference",
        service_env("inference", inference_port, HTTP_PORT=0, MODEL_REPOSITORY=repo),
        tmp / "inference.log",
    )
    features.start()
    inference.start()

    topic = f"gateway-it-{tag}"
    admin = AdminClient(kafka_server.client_conf())
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    producer = InferenceLogProducer(
        InferenceLogConfig(
            inference_log_topic=topic,
            inference_log_spool_dir=tmp / "spool",
            inference_log_delivery_timeout_ms=2000,
            inference_log_resend_interval_s=0.5,
        ),
        kafka_server.kafka_config(),
    )
    producer.start()
    platform = write_test_admission(tmp, _split((90, 10), shadow="2")[len(TEST_ADMISSION_YAML) :])
    server = None
    try:
        assert features.proc is not None and inference.proc is not None
        await wait_serving(features_port, FEATURES_SERVICE, features.proc, timeout=90)
        await wait_serving(inference_port, INFERENCE_SERVICE, inference.proc, timeout=60)
        await features_demo.load(f"127.0.0.1:{features_port}", COUNTS)
        config = GatewayConfig(
            server=GatewayServerConfig(port=0),
            models=ModelsConfig(
                input_layouts=INPUT_LAYOUTS, platform_file=platform, platform_poll_interval_s=0.1
            ),
            admission=AdmissionConfig(admission_redis_url=NO_REDIS_URL),
            upstream=UpstreamConfig(
                features_target=f"127.0.0.1:{features_port}",
                inference_target=f"127.0.0.1:{inference_port}",
                features_timeout_s=0.5,
                breaker_reset_s=1.0,
            ),
        )
        server = await create_server(config, publisher=producer)
        await server.start()
        async with (
            grpc.aio.insecure_channel(
                f"127.0.0.1:{server.port}", interceptors=[WithApiKey()]
            ) as gateway_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{features_port}") as features_channel,
        ):
            yield Env(
                gateway=gateway_pb2_grpc.PredictionServiceStub(gateway_channel),
                features=features_pb2_grpc.FeatureServiceStub(features_channel),
                features_process=features,
                features_port=features_port,
                inference_target=f"127.0.0.1:{inference_port}",
                inference_process=inference,
                repo=repo,
                platform=platform,
                topic=topic,
                kafka=kafka_server,
                producer=producer,
                server=server,
            )
    finally:
        if server is not None:
            await server.stop(0, 1.0)
        await asyncio.to_thread(producer.close, 5.0)
        features.stop()
        inference.stop()


def _request(user: int, **fields: str) -> gateway_pb2.PredictRequest:
    return demo_request(user, tuple(COUNTS.values()), REQUEST_FEATURES, "float_value", **fields)


async def _onnx_score(env: Env, request: gateway_pb2.PredictRequest, version: str) -> float:
    """The model run directly by ONNX Runtime on the features stored for the request's entities."""
    stored = await env.features.GetOnlineFeatures(inference_demo.stored_features_request(request), timeout=10)
    return inference_demo.onnx_score(env.repo / "fraud", version, request, stored)


def _consume(
    kafka: Kafka, topic: str, request_ids: Iterable[str], timeout_s: float = 60.0
) -> dict[str, logging_pb2.InferenceLogRecord]:
    """The topic's records for `request_ids` (read from the beginning)."""
    wanted = set(request_ids)
    consumer = Consumer(
        {
            **kafka.client_conf(),
            "group.id": f"gateway-it-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    found: dict[str, logging_pb2.InferenceLogRecord] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not wanted <= set(found) and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=0.5):
                if message.error() is not None:
                    continue
                record = logging_pb2.InferenceLogRecord.FromString(message.value())
                if record.request_id in wanted:
                    found[record.request_id] = record
    finally:
        consumer.close()
    return found


async def test_a_prediction_equals_onnx_runtime_on_the_stored_features(env: Env) -> None:
    for version in ("1", "2"):
        request = _request(7, version=version)
        reply = await env.gateway.Predict(request, timeout=10)
        assert reply.model == "fraud" and reply.model_version == version
        assert not reply.degraded, reply.degraded_features
        expected = await _onnx_score(env, request, version)
        assert np.allclose(reply.outputs["fraud_probability"].float_value, expected, rtol=1e-5, atol=1e-6)


async def test_predict_batch_agrees_with_single_predictions(env: Env) -> None:
    batch = gateway_pb2.PredictBatchRequest(model="fraud", version="2")
    singles = [_request(u, version="2") for u in range(20, 30)]
    for single in singles:
        batch.rows.add(entities=single.entities, features=single.features)
    reply = await env.gateway.PredictBatch(batch, timeout=10)
    one_by_one = await asyncio.gather(*(env.gateway.Predict(s, timeout=10) for s in singles))
    got = [r.outputs["fraud_probability"].float_value for r in reply.results]
    want = [r.outputs["fraud_probability"].float_value for r in one_by_one]
    assert np.allclose(got, want, rtol=1e-6)


async def test_a_90_10_split_serves_those_shares_and_the_shadow_only_reaches_the_log(env: Env) -> None:
    requests = [_request(u % 300, request_id=f"split-{uuid.uuid4().hex}") for u in range(600)]
    replies = []
    for start in range(0, len(requests), 50):
        replies += await asyncio.gather(
            *(env.gateway.Predict(r, timeout=10) for r in requests[start : start + 50])
        )
    share = sum(r.model_version == "2" for r in replies) / len(replies)
    assert 0.06 < share < 0.14, share
    assert all(list(r.outputs) == ["fraud_probability"] for r in replies)
    records = await asyncio.to_thread(_consume, env.kafka, env.topic, [r.request_id for r in replies])
    assert len(records) == len(replies)
    for reply in replies:
        record = records[reply.request_id]
        assert record.model_version == reply.model_version
        assert (
            record.outputs["fraud_probability"].float_value == reply.outputs["fraud_probability"].float_value
        )
        if reply.model_version == "1":
            assert record.shadow.model_version == "2" and record.shadow.status_code == 0
            assert "fraud_probability" in record.shadow.outputs
        else:
            assert not record.HasField("shadow")


async def test_a_changed_split_applies_without_a_restart(env: Env) -> None:
    env.platform.write_text(_split((0, 100)))
    deadline = time.monotonic() + 10
    while True:
        replies = await asyncio.gather(*(env.gateway.Predict(_request(u), timeout=10) for u in range(20)))
        if {r.model_version for r in replies} == {"2"}:
            break
        assert time.monotonic() < deadline, "the new split was not applied"
        await asyncio.sleep(0.1)
    env.platform.write_text(
        TEST_ADMISSION_YAML + "models: {fraud: {versions: [{version: '1', weight: -1}]}}\n"
    )  # rejected
    await asyncio.sleep(0.5)
    try:
        replies = await asyncio.gather(*(env.gateway.Predict(_request(u), timeout=10) for u in range(20)))
        assert {r.model_version for r in replies} == {"2"}
    finally:  # later tests start gateways on this file: leave it valid, as the module began
        env.platform.write_text(_split((90, 10), shadow="2"))


# Bad requests and the status each must get, naming the problem; the node's test (test_node.py) shares them.
BAD_INPUT = [
    (lambda r: setattr(r, "model", "no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
    (lambda r: setattr(r, "model", ""), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    (lambda r: r.features["amount"].__setattr__("string_value", "lots"), grpc.StatusCode.INVALID_ARGUMENT, "features.amount"),
    (lambda r: r.entities.pop("device_id"), grpc.StatusCode.INVALID_ARGUMENT, "entities.device_id"),
    (lambda r: setattr(r, "version", "99"), grpc.StatusCode.NOT_FOUND, "99"),
]  # fmt: skip


async def check_bad_input(
    gateway: gateway_pb2_grpc.PredictionServiceStub, mutate: object, code: grpc.StatusCode, text: str
) -> None:
    """A `BAD_INPUT` request gets `code` with details naming `text`, and the next good one is answered."""
    request = _request(1)
    mutate(request)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gateway.Predict(request, timeout=10)
    assert info.value.code() == code and text in (info.value.details() or ""), info.value.details()
    assert (await gateway.Predict(_request(1), timeout=10)).outputs


@pytest.mark.parametrize(("mutate", "code", "text"), BAD_INPUT)
async def test_bad_input_gets_a_status_naming_the_problem_and_never_crashes(
    env: Env, mutate: object, code: grpc.StatusCode, text: str
) -> None:
    await check_bad_input(env.gateway, mutate, code, text)


async def test_the_response_cache_on_real_redis_answers_repeats(env: Env, redis_server: Redis) -> None:
    config = GatewayConfig(
        server=GatewayServerConfig(port=0),
        models=ModelsConfig(input_layouts=INPUT_LAYOUTS, platform_file=env.platform),
        admission=AdmissionConfig(admission_redis_url=NO_REDIS_URL),
        upstream=UpstreamConfig(
            features_target=f"127.0.0.1:{env.features_port}",
            inference_target=env.inference_target,
            features_timeout_s=0.5,
        ),
        cache=ResponseCacheConfig(
            response_cache_enabled=True,
            response_cache_redis_url=redis_server.url,
            response_cache_key_prefix=f"igw-it-{uuid.uuid4().hex[:8]}:",
            response_cache_timeout_s=0.5,
        ),
        inference_log_enabled=False,
    )
    server = await create_server(config)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", interceptors=[WithApiKey()]
        ) as channel:
            stub = gateway_pb2_grpc.PredictionServiceStub(channel)
            first = await stub.Predict(_request(11, version="1"), timeout=10)
            assert not first.cached
            for _ in range(50):  # the answer is stored in the background
                again = await stub.Predict(_request(11, version="1"), timeout=10)
                if again.cached:
                    break
                await asyncio.sleep(0.05)
            assert again.cached
            assert (
                again.outputs["fraud_probability"].float_value
                == first.outputs["fraud_probability"].float_value
            )
            other = await stub.Predict(_request(11, version="2"), timeout=10)  # another version: not cached
            assert not other.cached
    finally:
        await server.stop(0, 1.0)


async def test_with_kafka_stopped_predictions_flow_and_every_record_arrives_later(
    env: Env, kafka_server: Kafka
) -> None:
    await asyncio.to_thread(kafka_server.stop)
    try:
        ids = []
        for i in range(40):
            reply = await env.gateway.Predict(
                _request(i, request_id=f"kafka-down-{uuid.uuid4().hex}"), timeout=10
            )
            ids.append(reply.request_id)
        await asyncio.sleep(3.0)  # past the delivery timeout: the records go to the disk spool
    finally:
        await asyncio.to_thread(kafka_server.start)
    records = await asyncio.to_thread(_consume, env.kafka, env.topic, ids, 90.0)
    assert set(records) == set(ids)
    assert env.producer.stats().spooled > 0


async def test_with_features_stopped_predictions_are_served_degraded(env: Env) -> None:
    env.features_process.stop()
    try:
        for i in range(10):
            reply = await env.gateway.Predict(_request(i, version="1"), timeout=10)
            assert reply.degraded
            assert "user:txn_count_1h" in reply.degraded_features
            assert "amount" not in reply.degraded_features
    finally:
        env.features_process.start()
    assert env.features_process.proc is not None
    await wait_serving(env.features_port, FEATURES_SERVICE, env.features_process.proc, timeout=90)
    deadline = time.monotonic() + 20
    while (await env.gateway.Predict(_request(3, version="1"), timeout=10)).degraded:
        assert time.monotonic() < deadline, "predictions stayed degraded after the feature service returned"
        await asyncio.sleep(0.3)


async def test_with_inference_stopped_predictions_fail_fast_with_unavailable(env: Env) -> None:
    env.inference_process.stop()
    for i in range(10):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await env.gateway.Predict(_request(i), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
