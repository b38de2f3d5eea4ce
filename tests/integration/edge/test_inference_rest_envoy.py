"""The inference service's KServe v2 REST API through a real Envoy configured by the control plane.

Off by default (no route: 404). With the platform's `inference_http` on, only the data-plane paths are
routed, behind the same API keys as the gateway's routes: no key → 401, a valid key → 200 with the same
outputs as ONNX Runtime on the same file; the repository (load/unload), statistics, shared-memory, trace
and log routes stay unreachable through Envoy although the server itself answers them.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from stack.ports import find_free_ports
from tests.integration.edge.conftest import EdgeStack, HttpAnswer, Process, _spawn, _wait_serving

pytestmark = pytest.mark.integration

SERVICE = "inference.GRPCInferenceService"
INFER = "/v2/models/fraud/versions/1/infer"
# Server routes that exist on the inference service but must never be reachable through Envoy.
UNROUTED = (
    ("POST", "/v2/repository/index", "{}"),
    ("POST", "/v2/repository/models/fraud/load", "{}"),
    ("POST", "/v2/repository/models/fraud/unload", "{}"),
    ("GET", "/v2/models/stats", ""),
    ("GET", "/v2/models/fraud/stats", ""),
    ("GET", "/v2/systemsharedmemory/status", ""),
    ("GET", "/v2/trace/setting", ""),
    ("GET", "/v2/logging", ""),
)


@pytest.fixture(scope="module")
def inference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, int, Path]]:
    """A real inference server (control routes on, so only Envoy stands between a client and them)."""
    from services.inference.tests.models import write_repository

    folder = tmp_path_factory.mktemp("inference-rest")
    repo = write_repository(folder / "models", broken=False)
    grpc_port, http_port, metrics_port = find_free_ports("127.0.0.1", 3)
    process = _spawn(
        "services.inference",
        {
            "INFERGRID_INFERENCE_MODEL_REPOSITORY": str(repo),
            "INFERGRID_INFERENCE_HOST": "127.0.0.1",
            "INFERGRID_INFERENCE_PORT": str(grpc_port),
            "INFERGRID_INFERENCE_HTTP_PORT": str(http_port),
            "INFERGRID_INFERENCE_METRICS_PORT": str(metrics_port),
            "INFERGRID_INFERENCE_DRAIN_SECONDS": "0",
            "INFERGRID_INFERENCE_GRACE_SECONDS": "1",
            "INFERGRID_INFERENCE_CONTROL_ENABLED": "true",
        },
        folder / "inference.log",
        grpc_port,
    )
    try:
        _wait_serving(process, SERVICE, timeout=60)
        yield process, http_port, repo
    finally:
        process.stop()


@pytest.fixture
def routed(edge_stack: EdgeStack, inference: tuple[Process, int, Path]) -> Iterator[EdgeStack]:
    """The edge with `inference_http` on, pointing at the inference server; restored after the test."""
    _process, http_port, _repo = inference
    edge_stack.write_platform(
        edge_stack.platform_text()
        + f'inference_http: {{enabled: true, endpoints: ["127.0.0.1:{http_port}"], timeout_ms: 5000}}\n'
    )
    try:
        edge_stack.wait_applied()
        key = edge_stack.keys["acme"]
        # Envoy's active health check marks the host healthy before it gets traffic.
        edge_stack.wait_for(
            lambda: edge_stack.http("/v2/health/ready", "", {"x-api-key": key}, method="GET").status == 200,
            timeout=15,
            what="the inference-http cluster to answer through Envoy",
        )
        yield edge_stack
    finally:
        edge_stack.reset_platform()


def _direct(http_port: int, method: str, path: str, body: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}{path}", data=body.encode() if body else None, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _infer_body(x: np.ndarray) -> str:
    return json.dumps(
        {
            "id": "through-envoy",
            "inputs": [
                {"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}
            ],
            "outputs": [{"name": "fraud_probability"}],
        }
    )


def _expected(repo: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        str(repo / "fraud" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return np.asarray(session.run(None, {"features": x})[0])


def _send(stack: EdgeStack, method: str, path: str, body: str, key: str | None) -> HttpAnswer:
    return stack.http(path, body, {"x-api-key": key} if key else {}, method=method)


def test_without_the_switch_v2_paths_are_not_routed(
    edge_stack: EdgeStack, inference: tuple[Process, int, Path]
) -> None:
    _process, http_port, _repo = inference
    edge_stack.reset_platform()  # the fixture's platform: no inference_http
    key = edge_stack.keys["acme"]
    x = np.zeros((1, 32), dtype=np.float32)

    for method, path, body in (
        ("GET", "/v2", ""),
        ("GET", "/v2/health/ready", ""),
        ("POST", INFER, _infer_body(x)),
    ):
        answer = _send(edge_stack, method, path, body, key)
        assert answer.status == 404, (path, answer.status, answer.body)
    # The server itself answers: only Envoy's routing keeps these out.
    assert _direct(http_port, "POST", INFER, _infer_body(x)) == 200


def test_infer_through_envoy_needs_a_key_and_matches_onnxruntime(
    routed: EdgeStack, inference: tuple[Process, int, Path]
) -> None:
    _process, _http_port, repo = inference
    x = np.random.default_rng(7).normal(40, 30, (5, 32)).astype(np.float32)
    body = _infer_body(x)

    missing = _send(routed, "POST", INFER, body, None)
    invalid = _send(routed, "POST", INFER, body, "ig_not_a_key")
    assert missing.status == 401 and "missing API key" in missing.body, missing
    assert invalid.status == 401 and "invalid API key" in invalid.body, invalid

    answer = _send(routed, "POST", INFER, body, routed.keys["acme"])
    assert answer.status == 200, answer.body
    response = answer.json()
    assert (
        response["model_name"] == "fraud"
        and response["model_version"] == "1"
        and response["id"] == "through-envoy"
    )
    (output,) = response["outputs"]
    assert output["name"] == "fraud_probability" and output["shape"] == [5, 1]
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_allclose(got, _expected(repo, x), rtol=1e-5, atol=1e-6)


def test_metadata_routes_and_the_tenants_model_list_apply(routed: EdgeStack) -> None:
    acme = routed.keys["acme"]
    meta = _send(routed, "GET", "/v2/models/fraud", "", acme)
    assert meta.status == 200 and meta.json()["name"] == "fraud", meta
    assert _send(routed, "GET", "/v2/models/fraud/versions/1/ready", "", acme).status == 200
    assert _send(routed, "GET", "/v2/models/fraud/config", "", acme).status == 200
    # acme may call only fraud: the edge reads the model from the path.
    denied = _send(routed, "GET", "/v2/models/double", "", acme)
    assert denied.status == 403, denied


@pytest.mark.parametrize(("method", "path", "body"), UNROUTED, ids=[p for _m, p, _b in UNROUTED])
def test_control_and_repository_routes_are_not_reachable_through_envoy(
    routed: EdgeStack, inference: tuple[Process, int, Path], method: str, path: str, body: str
) -> None:
    _process, http_port, _repo = inference
    # acme may call fraud and these paths name no other model; `/v2/models/stats` reads as a model named
    # "stats", so it goes with `limited` (every model allowed): a 404 is then Envoy's routing, not a 403.
    key = routed.keys["limited" if path == "/v2/models/stats" else "acme"]
    answer = _send(routed, method, path, body, key)
    assert answer.status == 404, (path, answer.status, answer.body)
    if "/load" not in path and "/unload" not in path:
        assert _direct(http_port, method, path, body) == 200, path  # the server has the route
    # fraud is still loaded and served through Envoy.
    x = np.zeros((1, 32), dtype=np.float32)
    assert _send(routed, "POST", INFER, _infer_body(x), routed.keys["acme"]).status == 200
