"""Clients through a real Envoy configured over ADS: transcoding, API keys, model permissions, rate limits, bad input."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from infergrid.gateway.v1 import gateway_pb2
from stack.probes import http_get
from tests.integration.edge.conftest import EdgeStack

pytestmark = pytest.mark.integration


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _rpc_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_grpc_and_json_reach_the_upstream_and_agree(edge_stack: EdgeStack) -> None:
    key = edge_stack.keys["acme"]

    via_grpc = edge_stack.predict("fraud", key, user_id="u1")
    via_json = edge_stack.http(
        "/v1/models/fraud:predict", json.dumps({"entities": {"user_id": "u1"}}), {"x-api-key": key}
    )

    assert via_json.status == 200, via_json.body
    body = via_json.json()
    assert via_grpc.model == body["model"] == "fraud"
    assert via_grpc.outputs["tenant"].string_value == body["outputs"]["tenant"]["string_value"] == "acme"
    assert via_grpc.outputs["tier"].string_value == "big"
    # The API key is stripped before the request leaves Envoy.
    assert via_grpc.outputs["key_leaked"].bool_value is False
    assert body["outputs"]["key_leaked"]["bool_value"] is False


def test_batch_route_and_bearer_key(edge_stack: EdgeStack) -> None:
    answer = edge_stack.http(
        "/v1/models/fraud:predictBatch",
        json.dumps({"rows": [{"request_id": "a"}, {"request_id": "b"}]}),
        {"authorization": f"Bearer {edge_stack.keys['acme']}"},
    )

    assert answer.status == 200, answer.body
    assert [r["request_id"] for r in answer.json()["results"]] == ["a", "b"]


@pytest.mark.parametrize("key", [None, "ig_not_a_key"])
def test_missing_or_bad_key_is_unauthenticated(edge_stack: EdgeStack, key: str | None) -> None:
    err = _rpc_error(lambda: edge_stack.predict("fraud", key))
    headers = {"x-api-key": key} if key else {}
    answer = edge_stack.http("/v1/models/fraud:predict", "{}", headers)

    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert answer.status == 401
    assert ("missing API key" if key is None else "invalid API key") in answer.body + err.details()


def test_model_the_tenant_may_not_call_is_permission_denied(edge_stack: EdgeStack) -> None:
    err = _rpc_error(lambda: edge_stack.predict("ranker", edge_stack.keys["acme"]))
    answer = edge_stack.http("/v1/models/ranker:predict", "{}", {"x-api-key": edge_stack.keys["acme"]})
    batch = edge_stack.http("/v1/models/ranker:predictBatch", "{}", {"x-api-key": edge_stack.keys["acme"]})

    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not call model 'ranker'" in err.details()
    assert (answer.status, batch.status) == (403, 403)
    assert "ranker" in answer.body


def test_burst_over_the_limit_is_rate_limited_while_other_tenants_are_not(edge_stack: EdgeStack) -> None:
    limited, acme = edge_stack.keys["limited"], edge_stack.keys["acme"]

    def _limited_call(_: int) -> grpc.StatusCode:
        return _code(lambda: edge_stack.predict("ranker", limited))

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(_limited_call, range(12)))
    other = [_code(lambda: edge_stack.predict("fraud", acme)) for _ in range(10)]
    err = _rpc_error(lambda: edge_stack.predict("ranker", limited))
    answer = edge_stack.http("/v1/models/fraud:predict", "{}", {"x-api-key": limited})

    # Burst 5 at 1 token/s: at most ~6 of 12 get through, the rest are refused.
    assert codes.count(grpc.StatusCode.OK) <= 7
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 5
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(err.trailing_metadata() or ())
    assert int(trailers["retry-after"]) >= 1
    assert answer.status == 429
    assert int(answer.headers["retry-after"]) >= 1
    assert int(answer.headers["x-ratelimit-reset"]) >= 1
    assert "rate limit exceeded" in answer.body
    assert other == [grpc.StatusCode.OK] * 10


@pytest.mark.parametrize(
    ("path", "body", "status", "names"),
    [
        ("/v1/models/fraud:predict", "{not json", 400, "Expected"),
        ("/v1/models/fraud:predict", '{"entities": 5}', 400, "entities"),
        ("/v1/models/fraud:predict", '{"model": "ranker"}', 400, "model"),
        ("/v1/models/fraud:explode", "{}", 404, "no route for POST /v1/models/fraud:explode"),
        ("/v2/nothing/here", "{}", 404, "no route for POST /v2/nothing/here"),
    ],
)
def test_bad_requests_get_4xx_answers_naming_the_problem(
    edge_stack: EdgeStack, path: str, body: str, status: int, names: str
) -> None:
    answer = edge_stack.http(path, body, {"x-api-key": edge_stack.keys["acme"]})

    assert answer.status == status, answer.body
    assert names in answer.body


def test_oversized_bodies_are_refused_with_413(edge_stack: EdgeStack) -> None:
    big = json.dumps({"entities": {"user_id": "x" * 70_000}})
    answer = edge_stack.http("/v1/models/fraud:predict", big, {"x-api-key": edge_stack.keys["acme"]})
    err = _rpc_error(lambda: edge_stack.predict("fraud", edge_stack.keys["acme"], user_id="x" * 70_000))

    assert answer.status == 413
    assert "Payload Too Large" in answer.body
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_request_bytes" in err.details()
    # Envoy and the stand-in upstream are still fine.
    assert edge_stack.predict("fraud", edge_stack.keys["acme"]).model == "fraud"


def test_client_cannot_forge_identity_headers(edge_stack: EdgeStack) -> None:
    reply = edge_stack.stub().Predict(
        gateway_pb2.PredictRequest(model="fraud"),
        metadata=[("x-api-key", edge_stack.keys["acme"]), ("x-infergrid-tenant", "someone-else")],
        timeout=5,
    )

    assert reply.outputs["tenant"].string_value == "acme"


def test_envoy_traces_requests_into_jaeger(edge_stack: EdgeStack) -> None:
    trace_id = uuid.uuid4().hex
    edge_stack.stub().Predict(
        gateway_pb2.PredictRequest(model="fraud"),
        metadata=[("x-api-key", edge_stack.keys["acme"]), ("traceparent", f"00-{trace_id}-{'1' * 16}-01")],
        timeout=5,
    )

    def _operations() -> set[str]:
        answer = http_get(f"{edge_stack.jaeger_query_url}/api/traces/{trace_id}", timeout_s=5)
        if answer is None or answer.status != 200:
            return set()
        return {span["operationName"] for trace in json.loads(answer.body)["data"] for span in trace["spans"]}

    # Envoy batches spans (flushed every 5 s by default): the client's trace continues through Envoy,
    # with the authorization and rate-limit calls as child spans.
    operations = edge_stack.wait_for(
        lambda: (ops := _operations()) and len(ops) >= 3 and ops, timeout=20, what="Envoy's spans in Jaeger"
    )
    assert "ingress" in operations
    assert any("Authorization.Check" in op for op in operations)
    assert any("ShouldRateLimit" in op for op in operations)


def test_access_log_has_one_json_object_per_request(edge_stack: EdgeStack) -> None:
    trace_id = uuid.uuid4().hex  # the line is found by the trace id of the caller's traceparent
    edge_stack.stub().Predict(
        gateway_pb2.PredictRequest(model="fraud"),
        metadata=[("x-api-key", edge_stack.keys["acme"]), ("traceparent", f"00-{trace_id}-{'2' * 16}-01")],
        timeout=5,
    )
    log = edge_stack.folder / "access.log"

    def _our_line() -> dict[str, object] | None:
        if not log.exists():
            return None
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("trace_id") == trace_id:
                return dict(entry)
        return None

    entry = edge_stack.wait_for(_our_line, timeout=15, what="the access-log line")
    assert entry["path"] == "/infergrid.gateway.v1.PredictionService/Predict"
    assert entry["request_id"]
    assert (entry["status"], entry["grpc_status"], entry["tenant"], entry["model"]) == (
        200,
        0,
        "acme",
        "fraud",
    )
    assert edge_stack.keys["acme"] not in log.read_text()


def test_a_body_naming_two_models_is_judged_by_the_one_the_gateway_reads(edge_stack: EdgeStack) -> None:
    call = edge_stack.channel.unary_unary(
        "/infergrid.gateway.v1.PredictionService/Predict",
        request_serializer=None,
        response_deserializer=gateway_pb2.PredictResponse.FromString,
    )
    twice = (
        gateway_pb2.PredictRequest(model="fraud").SerializeToString()
        + gateway_pb2.PredictRequest(model="ranker").SerializeToString()
    )

    err = _rpc_error(lambda: call(twice, metadata=[("x-api-key", edge_stack.keys["acme"])], timeout=5))

    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "ranker" in err.details()
