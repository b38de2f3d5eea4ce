"""End to end through the real Envoy: xDS from the control plane, API keys and rate limits checked in the
gateway (admission placement "gateway", as `make up` runs it), two gateway replicas, features on Cassandra + Redis, inference on ONNX Runtime, the Kafka inference log and
the logging service, traces in Jaeger — the components `make up` starts, once for the module.

The tests that stop or break things come last; each restores what it stopped.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import pytest
import redis

from infergrid.features.v1 import features_pb2_grpc
from infergrid.gateway.v1 import gateway_pb2
from infergrid.logging.v1 import logging_pb2, logging_pb2_grpc
from stack import demo_model
from stack.demo import demo_request
from stack.probes import grpc_health_serving, http_get
from stack.progress import Progress
from tests.e2e.whole_stack import Stack

pytestmark = pytest.mark.integration

T = TypeVar("T")

OUR_SERVICES = ("inference", "features", "logging", "gateway", "gateway-2", "edge", "controlplane")


def _json_body(request: gateway_pb2.PredictRequest) -> str:
    return json.dumps(
        {
            "request_id": request.request_id,
            "entities": dict(request.entities),
            "features": {name: {"double_value": v.double_value} for name, v in request.features.items()},
        }
    )


def _rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _score(reply: gateway_pb2.PredictResponse) -> float:
    return float(reply.outputs["fraud_probability"].float_value)


def _onnx_score(stack: Stack, request: gateway_pb2.PredictRequest, version: str) -> float:
    """The model run directly by ONNX Runtime on the features the feature store holds for the entities."""
    with grpc.insecure_channel(stack.address("features")) as channel:
        read = demo_model.stored_features_request(request)
        stored = features_pb2_grpc.FeatureServiceStub(channel).GetOnlineFeatures(read, timeout=10)
    return demo_model.onnx_score(stack.repo / "fraud", version, request, stored)


def _get_record(
    stack: Stack, request_id: str, timeout: float = 60.0, tenant: str = "demo"
) -> logging_pb2.InferenceLogRecord:
    """The inference-log record of `tenant`'s `request_id`, read back from the logging service's sink."""
    with grpc.insecure_channel(stack.address("logging")) as channel:
        api = logging_pb2_grpc.InferenceLogServiceStub(channel)
        record: logging_pb2.InferenceLogRecord = stack.wait_for(
            lambda: api.GetRecord(
                logging_pb2.GetRecordRequest(request_id=request_id, tenant=tenant),
                metadata=(("x-api-key", stack.keys[tenant]),),  # the tenant's own key reads its records
                timeout=5,
            ),
            timeout=timeout,
            what=f"the log record {request_id}",
        )
    return record


def _all_serving(stack: Stack) -> dict[str, bool]:
    return {name: grpc_health_serving("127.0.0.1", stack.components[name].port) for name in OUR_SERVICES}


# The happy path.


def test_grpc_and_json_give_the_same_score_as_the_model_on_the_stored_features(whole_stack: Stack) -> None:
    key = whole_stack.keys["demo"]
    for user in (42, 4242):
        request = demo_request(user, request_id=f"same-{uuid.uuid4().hex}")
        via_grpc = whole_stack.predict(request, key)
        via_json = whole_stack.http("/v1/models/fraud:predict", _json_body(request), {"x-api-key": key})

        assert via_json.status == 200, via_json.body
        body = via_json.json()
        assert body["model_version"] == via_grpc.model_version  # sticky per user
        assert not via_grpc.degraded and not body["degraded"]
        assert body["outputs"]["fraud_probability"]["float_value"] == pytest.approx(
            _score(via_grpc), rel=1e-6
        )
        expected = _onnx_score(whole_stack, request, via_grpc.model_version)
        assert _score(via_grpc) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_the_90_10_split_holds_and_the_shadow_only_reaches_the_log(whole_stack: Stack) -> None:
    whole_stack.write_platform(whole_stack.platform_text(shadow="2"))
    time.sleep(2.5)  # the gateway polls the platform file every second
    try:
        batch = gateway_pb2.PredictBatchRequest(model="fraud")
        for user in range(400):
            row = demo_request(user, request_id=f"split-{uuid.uuid4().hex}")
            batch.rows.add(request_id=row.request_id, entities=row.entities, features=row.features)
        first = whole_stack.stub().PredictBatch(
            batch, metadata=[("x-api-key", whole_stack.keys["demo"])], timeout=30
        )
        share = sum(r.model_version == "2" for r in first.results) / len(first.results)
        assert 0.05 < share < 0.16, share
        assert all(list(r.outputs) == ["fraud_probability"] for r in first.results)
        some_v1 = next(r for r in first.results if r.model_version == "1")
        some_v2 = next(r for r in first.results if r.model_version == "2")
        record_v1 = _get_record(whole_stack, some_v1.request_id)
        record_v2 = _get_record(whole_stack, some_v2.request_id)
        assert record_v1.shadow.model_version == "2" and "fraud_probability" in record_v1.shadow.outputs
        assert not record_v2.HasField("shadow")
    finally:
        whole_stack.reset_platform()
        time.sleep(2.5)  # back to no shadow before the next test


def test_a_trace_spans_envoy_gateway_features_inference_kafka_and_logging(whole_stack: Stack) -> None:
    # With the feature cache emptied, the lookup misses Redis and reads Cassandra: both show.
    cache = redis.Redis.from_url(whole_stack.components["redis"].url)  # type: ignore[attr-defined]
    with cache:
        emptied = [cache.delete(name) for name in list(cache.scan_iter(match="ifs:*", count=1000))]
    assert emptied, "no feature cache entries: the cache prefix changed?"
    request = demo_request(5000 + uuid.uuid4().int % 5000, request_id=f"trace-{uuid.uuid4().hex}")
    whole_stack.predict(request, whole_stack.keys["demo"])
    record = _get_record(whole_stack, request.request_id)
    assert record.trace_id
    jaeger = whole_stack.components["jaeger"]
    query = f"http://{jaeger.host}:{whole_stack.config.port('jaeger_query')}/api/traces/{record.trace_id}"

    seen: list[set[tuple[str, str]]] = [set()]

    def spans() -> set[tuple[str, str]]:
        answer = http_get(query, timeout_s=5)
        if answer is None or answer.status != 200:
            return set()
        (trace,) = json.loads(answer.body)["data"]
        names = {pid: p["serviceName"] for pid, p in trace["processes"].items()}
        found = {(names[s["processID"]], s["operationName"]) for s in trace["spans"]}
        seen[0] = found
        services = {service for service, _ in found}
        wanted = {"envoy", "gateway", "features", "inference", "logging"}
        complete = ("logging", "inference_log sink write") in found and (
            "features",
            "cassandra read",
        ) in found
        return found if wanted <= services and complete else set()

    try:
        found = whole_stack.wait_for(spans, timeout=30, what="the whole trace in Jaeger")
    except AssertionError:
        raise AssertionError(f"incomplete trace {record.trace_id}: {sorted(seen[0])}") from None
    operations = {op for _, op in found}
    assert ("envoy", "ingress") in found
    assert ("gateway", "/infergrid.gateway.v1.PredictionService/Predict") in found
    assert ("features", "/infergrid.features.v1.FeatureService/GetOnlineFeatures") in found
    assert {"redis MGET", "cassandra read"} <= operations
    # The gateway streams batches to inference (ModelStreamInfer); each carries the trace in `traceparent`.
    assert ("inference", "/inference.GRPCInferenceService/ModelStreamInfer request") in found
    assert ("gateway", "publish") in found  # the Kafka publish; the consumer continues its context
    assert ("logging", "inference_log sink write") in found


# Admission (in the gateway, behind Envoy): keys, authorization, rate limits, bad input.


def test_missing_or_bad_keys_are_401_and_a_forbidden_model_is_403(whole_stack: Stack) -> None:
    body = _json_body(demo_request(1))
    assert whole_stack.http("/v1/models/fraud:predict", body).status == 401
    assert whole_stack.http("/v1/models/fraud:predict", body, {"x-api-key": "ig_nope"}).status == 401
    forbidden = whole_stack.http("/v1/models/ranker:predict", body, {"x-api-key": whole_stack.keys["demo"]})
    assert forbidden.status == 403, forbidden.body

    assert (
        _rpc_error(lambda: whole_stack.predict(demo_request(1), None)).code()
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        _rpc_error(lambda: whole_stack.predict(demo_request(1), "ig_nope")).code()
        == grpc.StatusCode.UNAUTHENTICATED
    )
    denied = _rpc_error(
        lambda: whole_stack.predict(demo_request(1, model="ranker"), whole_stack.keys["demo"])
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_burst_over_the_limit_is_429_while_another_tenant_is_unaffected(whole_stack: Stack) -> None:
    limited, demo = whole_stack.keys["limited"], whole_stack.keys["demo"]
    codes: list[grpc.StatusCode] = []
    other: list[grpc.StatusCode] = []
    for user in range(12):
        for key, out in ((limited, codes), (demo, other)):
            try:
                whole_stack.predict(demo_request(user), key)
                out.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                out.append(exc.code())
    answer = whole_stack.http("/v1/models/fraud:predict", _json_body(demo_request(1)), {"x-api-key": limited})

    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    assert answer.status == 429 and int(answer.headers["retry-after"]) >= 1
    assert other == [grpc.StatusCode.OK] * 12


@pytest.mark.parametrize(
    ("body", "status", "names"),
    [
        ("{not json", 400, "Expected"),
        ('{"entities": {"user_id": 5}}', 400, "entities"),
        (
            '{"entities": {ENTITIES}, "features": {"amount": {"string_value": "lots"}}}',
            400,
            "features.amount",
        ),
        ('{"entities": {ENTITIES, "shop": "s1"}}', 400, "entities.shop"),
    ],
)
def test_bad_json_and_wrong_types_are_400_naming_the_problem(
    whole_stack: Stack, body: str, status: int, names: str
) -> None:
    entities = '"user_id": "u00001", "merchant_id": "m0001", "device_id": "d00001"'
    answer = whole_stack.http(
        "/v1/models/fraud:predict",
        body.replace("ENTITIES", entities),
        {"x-api-key": whole_stack.keys["demo"]},
    )
    assert answer.status == status, answer.body
    assert names in answer.body


def test_unknown_models_are_404_oversized_bodies_413_and_nothing_crashed(whole_stack: Stack) -> None:
    acme = {"x-api-key": whole_stack.keys["acme"]}  # may call any model
    unknown = whole_stack.http("/v1/models/nosuch:predict", _json_body(demo_request(1)), acme)
    assert unknown.status == 404 and "nosuch" in unknown.body
    big = json.dumps({"entities": {"user_id": "u" * 200_000}})
    assert whole_stack.http("/v1/models/fraud:predict", big, acme).status == 413
    err = _rpc_error(lambda: whole_stack.predict(demo_request(1, model="nosuch"), whole_stack.keys["acme"]))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    assert all(_all_serving(whole_stack).values()), _all_serving(whole_stack)
    # The name Envoy's active health checks ask the gateway replicas for.
    for replica in ("gateway", "gateway-2"):
        port = whole_stack.components[replica].port
        assert grpc_health_serving("127.0.0.1", port, "infergrid.gateway.v1.PredictionService")
    assert whole_stack.predict(demo_request(3), whole_stack.keys["demo"]).model == "fraud"


# Live configuration.


def test_a_platform_change_applies_in_envoy_and_the_gateway_without_restarts_and_a_bad_one_is_rejected(
    whole_stack: Stack,
) -> None:
    pids = {name: whole_stack.components[name].record() for name in ("gateway", "controlplane", "envoy")}
    key = whole_stack.keys["demo"]
    sizeable = _json_body(demo_request(5)) + " " * 40_000  # JSON whitespace: valid, only big
    assert whole_stack.http("/v1/models/fraud:predict", sizeable, {"x-api-key": key}).status == 200
    try:
        # All traffic to version 2 (gateway) and a smaller body limit (Envoy's listener, over xDS).
        whole_stack.write_platform(whole_stack.platform_text(w1=0, w2=100, max_bytes=32768))
        whole_stack.wait_for(
            lambda: all(whole_stack.predict(demo_request(u), key).model_version == "2" for u in range(10)),
            what="the new split in the gateway",
        )
        whole_stack.wait_for(
            lambda: whole_stack.http("/v1/models/fraud:predict", sizeable, {"x-api-key": key}).status == 413,
            what="the new body limit in Envoy",
        )
        # A bad config (a negative weight) is refused everywhere; the last good one keeps serving.
        whole_stack.write_platform(whole_stack.platform_text(w1=-5, w2=100, max_bytes=131072))
        time.sleep(3)
        assert all(whole_stack.predict(demo_request(u), key).model_version == "2" for u in range(10))
        assert whole_stack.http("/v1/models/fraud:predict", sizeable, {"x-api-key": key}).status == 413
    finally:
        whole_stack.reset_platform()
    whole_stack.wait_for(
        lambda: whole_stack.http("/v1/models/fraud:predict", sizeable, {"x-api-key": key}).status == 200,
        what="the restored config",
    )
    assert {name: whole_stack.components[name].record() for name in pids} == pids  # no restarts


# Outages: each restores what it stopped.


def test_with_features_stopped_predictions_are_degraded_not_failed(whole_stack: Stack) -> None:
    features = whole_stack.components["features"]
    features.stop()
    try:
        reply = whole_stack.predict(demo_request(11), whole_stack.keys["demo"])
        assert reply.degraded and "user:txn_count_1h" in reply.degraded_features
        answer = whole_stack.http(
            "/v1/models/fraud:predict", _json_body(demo_request(12)), {"x-api-key": whole_stack.keys["demo"]}
        )
        assert answer.status == 200 and answer.json()["degraded"] is True
    finally:
        features.start(Progress(features.name))
    whole_stack.wait_for(
        lambda: not whole_stack.predict(demo_request(13), whole_stack.keys["demo"]).degraded,
        what="undegraded answers after features returned",
    )


def test_killing_one_of_two_gateway_replicas_under_load_loses_almost_nothing(whole_stack: Stack) -> None:
    replica = whole_stack.components["gateway-2"]
    key = whole_stack.keys["demo"]
    record = replica.record()
    assert record is not None

    def one(i: int) -> grpc.StatusCode:
        try:
            whole_stack.predict(demo_request(i % 500), key, timeout=5)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(400)]
        time.sleep(0.5)
        os.kill(record.pid, signal.SIGKILL)
        codes = [f.result() for f in futures]
    errors = [c for c in codes if c != grpc.StatusCode.OK]
    try:
        assert len(errors) <= 4, errors  # (almost) none: Envoy retries on reset/refused, health checks eject
    finally:
        replica.stop()  # clears the pid file of the killed process
        replica.start(Progress(replica.name))


def test_with_kafka_stopped_predictions_flow_and_every_record_arrives_after_it_returns(
    whole_stack: Stack,
) -> None:
    kafka = whole_stack.components["kafka"]
    key = whole_stack.keys["demo"]
    ids = [f"kafka-down-{i}-{uuid.uuid4().hex}" for i in range(20)]
    kafka.stop()
    try:
        for i, request_id in enumerate(ids):
            reply = whole_stack.predict(demo_request(100 + i, request_id=request_id), key)
            assert reply.request_id == request_id
    finally:
        kafka.start(Progress(kafka.name))
    for request_id in ids:
        assert _get_record(whole_stack, request_id, timeout=120).request_id == request_id
    assert all(_all_serving(whole_stack).values()), _all_serving(whole_stack)
