"""The unmodified tritonclient against a running inference server; run as a subprocess.

tritonclient's generated modules register the same `inference.*` protobuf symbols
as ours, so they cannot share a process with our stubs: test_tritonclient.py starts
the server and runs this script, which prints one JSON object mapping each
scenario to "ok" or its traceback.

  python triton_client.py check URL METRICS_URL REPO   run every gRPC scenario
  python triton_client.py check-http HTTP_URL GRPC_URL REPO   the HTTP/JSON and shared memory scenarios
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
import tritonclient.utils.shared_memory as shm
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

SCENARIOS: list[tuple[str, Callable[..., Any]]] = []
HTTP_SCENARIOS: list[tuple[str, Callable[..., Any]]] = []
HEADER_LENGTH = "Inference-Header-Content-Length"


def scenario(fn: Callable[..., Any]) -> Callable[..., Any]:
    SCENARIOS.append((fn.__name__, fn))
    return fn


def http_scenario(fn: Callable[..., Any]) -> Callable[..., Any]:
    HTTP_SCENARIOS.append((fn.__name__, fn))
    return fn


def _expected(repo: Path, version: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repo / "fraud" / version / "model.onnx"))
    return session.run(None, {"features": x})[0]


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _on_disk(repo: Path) -> Any:
    """fraud's config.pbtxt as tritonclient's ModelConfig."""
    return text_format.Parse((repo / "fraud" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _serving(repo: Path, versions: list[int]) -> str:
    """fraud's config serving only `versions`, as the JSON load_model sends."""
    config = _on_disk(repo)
    config.version_policy.Clear()
    config.version_policy.specific.versions.extend(versions)
    return json_format.MessageToJson(config)


def _features(x: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def _error(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except InferenceServerException as exc:
        return str(exc.status()), str(exc.message())
    raise AssertionError("expected an error")


def _check_errors(cases: list[tuple[Callable[[], Any], str, str]]) -> None:
    """Each call fails with its status and a message containing its text."""
    for call, status, message in cases:
        got_status, got_message = _error(call)
        assert got_status == status and message in got_message, (status, message, got_status, got_message)


# The "types" model's inputs; each comes back unchanged as out_<datatype>.
ARRAYS = {
    "FP32": np.array([[1.5, -2, 3], [0, 1, 2]], np.float32),
    "FP16": np.array([[0.5, 1, -8], [2, 4, 8]], np.float16),
    "INT32": np.array([[1, -2, 3], [4, 5, 2**31 - 1]], np.int32),
    "INT64": np.array([[2**40, -1, 7], [0, 1, 2]], np.int64),
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "BYTES": np.array([[b"a", b"", "\u00e9t\u00e9".encode()], [b"x", b"yy", b"zzz"]], dtype=np.object_),
}


def _check_types(result: Any, binary: bool) -> None:
    """Every ARRAYS entry came back with its shape, dtype and values (BYTES as text over JSON)."""
    for datatype, array in ARRAYS.items():
        got = result.as_numpy(f"out_{datatype.lower()}")
        assert got.shape == array.shape, (binary, datatype, got.shape)
        if datatype == "BYTES":
            want = array.reshape(-1).tolist()
            if not binary:  # JSON carries text
                want = [w.decode() for w in want]
            assert got.reshape(-1).tolist() == want, (binary, got)
        else:
            assert got.dtype == array.dtype, (binary, datatype, got.dtype)
            np.testing.assert_array_equal(got, array)


@scenario
def metadata_and_config_match_the_repository(url: str, repo: Path, metrics: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert (
        client.is_model_ready("fraud")
        and client.is_model_ready("fraud", "1")
        and client.is_model_ready("fraud", "2")
    )
    assert not client.is_model_ready("broken")
    server = client.get_server_metadata(as_json=True)
    assert "statistics" in server["extensions"], server
    on_disk = _on_disk(repo)
    config = client.get_model_config("fraud").config
    for field in (
        "name",
        "max_batch_size",
        "input",
        "output",
        "dynamic_batching",
        "instance_group",
        "version_policy",
    ):
        assert getattr(config, field) == getattr(on_disk, field), (
            field,
            getattr(config, field),
            getattr(on_disk, field),
        )
    assert config.backend == "onnxruntime" and config.platform == "onnxruntime_onnx"
    meta = client.get_model_metadata("fraud", as_json=True)
    assert meta["versions"] == ["1", "2"], meta
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": ["-1", "32"]}], meta
    assert meta["outputs"] == [{"name": "fraud_probability", "datatype": "FP32", "shape": ["-1", "1"]}], meta


@scenario
def infer_matches_onnxruntime_on_the_same_file(url: str, repo: Path, metrics: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    rng = np.random.default_rng(11)
    for version in ("1", "2"):
        for rows in (1, 5, 256):
            x = rng.normal(40, 30, (rows, 32)).astype(np.float32)
            result = client.infer("fraud", _features(x), model_version=version, request_id=f"r{rows}")
            assert result.get_response().model_version == version
            assert result.get_response().id == f"r{rows}"
            _assert_close(result.as_numpy("fraud_probability"), _expected(repo, version, x))
    # the latest version answers when none is named
    x = rng.normal(40, 30, (2, 32)).astype(np.float32)
    result = client.infer(
        "fraud", _features(x), outputs=[grpcclient.InferRequestedOutput("fraud_probability")]
    )
    assert result.get_response().model_version == "2"
    _assert_close(result.as_numpy("fraud_probability"), _expected(repo, "2", x))


@scenario
def every_datatype_round_trips(url: str, repo: Path, metrics: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    inputs = []
    for datatype, array in ARRAYS.items():
        inp = grpcclient.InferInput(f"in_{datatype.lower()}", list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    _check_types(client.infer("types", inputs), binary=True)


def _error_cases(client: Any, module: Any, short: Any, not_found: str, invalid: str) -> list[Any]:
    """The failures both protocols report alike (`short`: an input with fewer bytes than its shape says)."""
    x = np.ones((1, 32), np.float32)
    wrong_type = module.InferInput("features", [1, 32], "FP64")
    wrong_type.set_data_from_numpy(x.astype(np.float64))
    wrong_shape = module.InferInput("features", [1, 16], "FP32")
    wrong_shape.set_data_from_numpy(np.ones((1, 16), np.float32))
    features = module.InferInput("features", [1, 32], "FP32")
    features.set_data_from_numpy(x)
    nope = [module.InferRequestedOutput("nope")]
    return [
        (lambda: client.infer("nope", [features]), not_found, "model 'nope' is not found"),
        (
            lambda: client.infer("fraud", [features], model_version="7"),
            not_found,
            "model 'fraud' version '7' is not found",
        ),
        (lambda: client.get_model_metadata("nope"), not_found, "model 'nope' is not found"),
        (lambda: client.get_model_config("fraud", "9"), not_found, "version '9'"),
        (
            lambda: client.infer("fraud", [wrong_type]),
            invalid,
            "input 'features' of model 'fraud': datatype FP64 given, expected FP32",
        ),
        (
            lambda: client.infer("fraud", [wrong_shape]),
            invalid,
            "input 'features' of model 'fraud': shape [1, 16] given, expected [-1, 32]",
        ),
        (
            lambda: client.infer("fraud", [short]),
            invalid,
            "input 'features' of model 'fraud': 124 bytes of raw data given, expected 128",
        ),
        (lambda: client.infer("fraud", [features], outputs=nope), invalid, "unexpected output 'nope'"),
    ]


@scenario
def errors_have_the_right_status_and_message(url: str, repo: Path, metrics: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    x = np.ones((1, 32), np.float32)
    short = grpcclient.InferInput("features", [1, 32], "FP32")
    short.set_data_from_numpy(x)
    short._raw_content = x.tobytes()[:-4]  # a client that sends fewer bytes than its shape says
    other = grpcclient.InferInput("in_fp32", [1, 3], "FP32")
    other.set_data_from_numpy(np.ones((1, 3), np.float32))
    invalid = "StatusCode.INVALID_ARGUMENT"
    cases = _error_cases(client, grpcclient, short, "StatusCode.NOT_FOUND", invalid)
    cases.append((lambda: client.infer("types", [other]), invalid, "missing input(s) ['in_fp16'"))
    cases.append(
        (
            lambda: client.infer("fraud", [other]),
            invalid,
            "unexpected input 'in_fp32' for model 'fraud'; expected inputs: ['features']",
        )
    )
    _check_errors(cases)
    assert client.is_server_live()


@scenario
def concurrent_clients_get_their_own_results_in_batches(url: str, repo: Path, metrics: str) -> None:
    def _batch_buckets() -> tuple[float, float]:
        text = urllib.request.urlopen(metrics, timeout=5).read().decode()
        le1 = total = 0.0
        for line in text.splitlines():
            if (
                line.startswith("infergrid_inference_batch_size_bucket{")
                and 'model="fraud"' in line
                and 'version="1"' in line
            ):
                if 'le="1.0"' in line:
                    le1 = float(line.split()[-1])
                if 'le="+Inf"' in line:
                    total = float(line.split()[-1])
        return le1, total

    client = grpcclient.InferenceServerClient(url)
    before = client.get_inference_statistics("fraud", "1").model_stats[0]
    le1_before, total_before = _batch_buckets()
    rng = np.random.default_rng(5)
    rows = rng.normal(40, 30, (512, 32)).astype(np.float32)
    expected = _expected(repo, "1", rows)

    async def _run() -> None:
        clients = [aioclient.InferenceServerClient(url) for _ in range(8)]
        limit = asyncio.Semaphore(64)

        async def _one(i: int) -> None:
            async with limit:
                x = rows[i : i + 1]
                inp = aioclient.InferInput("features", [1, 32], "FP32")
                inp.set_data_from_numpy(x)
                result = await clients[i % len(clients)].infer(
                    "fraud", [inp], model_version="1", request_id=str(i)
                )
                assert result.get_response().id == str(i)
                _assert_close(result.as_numpy("fraud_probability"), expected[i : i + 1])

        try:
            await asyncio.gather(*(_one(i) for i in range(len(rows))))
        finally:
            for c in clients:
                await c.close()

    asyncio.run(_run())
    after = client.get_inference_statistics("fraud", "1").model_stats[0]
    assert after.inference_stats.success.count - before.inference_stats.success.count == len(rows)
    executions = after.execution_count - before.execution_count
    assert executions < len(rows), f"{executions} executions for {len(rows)} requests: no batching"
    assert any(b.batch_size > 1 for b in after.batch_stats), after.batch_stats
    le1, total = _batch_buckets()
    assert total - total_before == executions, (total, total_before, executions)
    assert (total - total_before) > (le1 - le1_before), "every batch had one row"


@scenario
def stream_infer_answers_each_request(url: str, repo: Path, metrics: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    results: dict[str, Any] = {}
    errors: list[str] = []

    def _callback(result: Any, error: Any) -> None:
        if error is not None:
            errors.append(str(error.message()))
        else:
            results[result.get_response().id] = result.as_numpy("fraud_probability")

    client.start_stream(callback=_callback)
    rng = np.random.default_rng(9)
    xs = [rng.normal(40, 30, (2, 32)).astype(np.float32) for _ in range(20)]
    for i, x in enumerate(xs):
        client.async_stream_infer("fraud", _features(x), request_id=f"s{i}", model_version="2")
    client.async_stream_infer("nope", _features(xs[0]), request_id="bad")
    deadline = time.monotonic() + 10
    while len(results) + len(errors) < len(xs) + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    client.stop_stream()
    assert errors == ["model 'nope' is not found"], errors
    for i, x in enumerate(xs):
        _assert_close(results[f"s{i}"], _expected(repo, "2", x))


@scenario
def statistics_and_repository_index(url: str, repo: Path, metrics: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    stats = client.get_inference_statistics("fraud", as_json=True)["model_stats"]
    assert [s["version"] for s in stats] == ["1", "2"], stats
    assert int(stats[0]["inference_stats"]["success"]["count"]) > 0
    index = {
        (m["name"], m.get("version", "")): m
        for m in client.get_model_repository_index(as_json=True)["models"]
    }
    assert index[("fraud", "1")]["state"] == "READY" and index[("fraud", "2")]["state"] == "READY"
    broken = index[("broken", "1")]
    assert broken["state"] == "UNAVAILABLE" and "ONNX Runtime cannot load" in broken["reason"], broken
    assert index[("trt_only", "1")]["state"] == "UNAVAILABLE"
    assert "TensorRT backend unavailable" in index[("trt_only", "1")]["reason"]
    client.unload_model("double")
    assert not client.is_model_ready("double")
    client.load_model("double")
    assert client.is_model_ready("double")
    status, message = _error(lambda: client.load_model("broken"))
    assert status == "StatusCode.FAILED_PRECONDITION" and "failed to load model 'broken'" in message, message


@scenario
def load_and_unload_versions_while_traffic_flows(url: str, repo: Path, metrics: str) -> None:
    x = np.random.default_rng(3).normal(40, 30, (1, 32)).astype(np.float32)
    outcomes: dict[str, list[str]] = {"latest": [], "v1": []}

    async def _run() -> None:
        client = aioclient.InferenceServerClient(url)
        stop = asyncio.Event()

        async def _traffic(kind: str, version: str) -> None:
            while not stop.is_set():
                inp = aioclient.InferInput("features", [1, 32], "FP32")
                inp.set_data_from_numpy(x)
                try:
                    result = await client.infer("fraud", [inp], model_version=version)
                    assert result.as_numpy("fraud_probability").shape == (1, 1)
                    outcomes[kind].append("OK")
                except InferenceServerException as exc:
                    outcomes[kind].append(f"{exc.status()}: {exc.message()}")

        workers = [asyncio.create_task(_traffic("latest", "")) for _ in range(12)]
        workers += [asyncio.create_task(_traffic("v1", "1")) for _ in range(4)]
        await asyncio.sleep(0.2)
        for versions in ([1, 2], [2], [1, 2], [1], [1, 2]):
            await client.load_model("fraud", config=_serving(repo, versions))
            await asyncio.sleep(0.15)
        stop.set()
        await asyncio.gather(*workers)
        await client.close()

    asyncio.run(_run())
    assert outcomes["latest"] and set(outcomes["latest"]) == {"OK"}, set(outcomes["latest"]) - {"OK"}
    # While version 1 is unloaded, requests naming it are refused up front; none is lost in flight.
    refused = {o for o in outcomes["v1"] if o != "OK"}
    assert all(o.startswith("StatusCode.NOT_FOUND") for o in refused), refused
    assert "OK" in outcomes["v1"]
    client = grpcclient.InferenceServerClient(url)
    assert client.is_model_ready("fraud", "1") and client.is_model_ready("fraud", "2")


def _raw_http(
    url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://{url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _http_features(x: np.ndarray, binary: bool = True) -> list[httpclient.InferInput]:
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return [inp]


@http_scenario
def http_health_metadata_and_config(url: str, grpc_url: str, repo: Path) -> None:
    client = httpclient.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fraud") and client.is_model_ready("fraud", "1")
    assert client.is_model_ready("fraud", "2")
    assert not client.is_model_ready("broken") and not client.is_model_ready("nope")
    server = client.get_server_metadata()
    for extension in ("binary_tensor_data", "system_shared_memory", "statistics", "model_repository"):
        assert extension in server["extensions"], server
    meta = client.get_model_metadata("fraud")
    assert meta["versions"] == ["1", "2"] and meta["platform"] == "onnxruntime_onnx", meta
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 32]}], meta
    assert meta["outputs"] == [{"name": "fraud_probability", "datatype": "FP32", "shape": [-1, 1]}], meta
    assert client.get_model_metadata("fraud", "1")["name"] == "fraud"
    on_disk = _on_disk(repo)
    as_json = client.get_model_config("fraud")
    assert as_json["max_batch_size"] == 256 and as_json["input"][0]["dims"] == [32], as_json
    config = json_format.ParseDict(as_json, model_config_pb2.ModelConfig(), ignore_unknown_fields=True)
    # (version_policy is not compared: the gRPC scenarios reloaded fraud with a config of their own)
    for field in ("name", "max_batch_size", "input", "output", "dynamic_batching", "instance_group"):
        assert getattr(config, field) == getattr(on_disk, field), field


@http_scenario
def http_infer_matches_onnxruntime_binary_and_json(url: str, grpc_url: str, repo: Path) -> None:
    client = httpclient.InferenceServerClient(url)
    rng = np.random.default_rng(21)
    for version in ("1", "2"):
        for rows in (1, 5, 256):
            x = rng.normal(40, 30, (rows, 32)).astype(np.float32)
            expected = _expected(repo, version, x)
            # binary tensors both ways (tritonclient's default: Inference-Header-Content-Length)
            result = client.infer("fraud", _http_features(x), model_version=version, request_id=f"b{rows}")
            response = result.get_response()
            assert response["model_version"] == version and response["id"] == f"b{rows}", response
            assert "binary_data_size" in response["outputs"][0]["parameters"], response
            _assert_close(result.as_numpy("fraud_probability"), expected)
            # JSON both ways
            result = client.infer(
                "fraud",
                _http_features(x, binary=False),
                model_version=version,
                outputs=[httpclient.InferRequestedOutput("fraud_probability", binary_data=False)],
            )
            assert "data" in result.get_response()["outputs"][0]
            _assert_close(result.as_numpy("fraud_probability"), expected)
    # the latest version answers when none is named; compressed request and response bodies
    x = rng.normal(40, 30, (3, 32)).astype(np.float32)
    result = client.infer(
        "fraud",
        _http_features(x),
        request_compression_algorithm="gzip",
        response_compression_algorithm="gzip",
    )
    assert result.get_response()["model_version"] == "2"
    _assert_close(result.as_numpy("fraud_probability"), _expected(repo, "2", x))

    # the asyncio client, concurrently: every request gets its own rows back
    rows = rng.normal(40, 30, (128, 32)).astype(np.float32)
    expected = _expected(repo, "1", rows)

    async def _run() -> None:
        aclient = httpaio.InferenceServerClient(url)
        try:

            async def _one(i: int) -> None:
                inp = httpaio.InferInput("features", [1, 32], "FP32")
                inp.set_data_from_numpy(rows[i : i + 1])
                result = await aclient.infer("fraud", [inp], model_version="1", request_id=str(i))
                assert result.get_response()["id"] == str(i)
                _assert_close(result.as_numpy("fraud_probability"), expected[i : i + 1])

            await asyncio.gather(*(_one(i) for i in range(len(rows))))
        finally:
            await aclient.close()

    asyncio.run(_run())


@http_scenario
def http_every_datatype_round_trips(url: str, grpc_url: str, repo: Path) -> None:
    client = httpclient.InferenceServerClient(url)
    for binary in (True, False):
        inputs, outputs = [], []
        for datatype, array in ARRAYS.items():
            inp = httpclient.InferInput(f"in_{datatype.lower()}", list(array.shape), datatype)
            inp.set_data_from_numpy(array, binary_data=binary)
            inputs.append(inp)
            outputs.append(httpclient.InferRequestedOutput(f"out_{datatype.lower()}", binary_data=binary))
        _check_types(client.infer("types", inputs, outputs=outputs), binary)


@http_scenario
def http_errors_are_statuses_with_a_json_error(url: str, grpc_url: str, repo: Path) -> None:
    client = httpclient.InferenceServerClient(url)
    short = httpclient.InferInput("features", [1, 31], "FP32")
    short.set_data_from_numpy(np.ones((1, 31), np.float32))
    short.set_shape([1, 32])  # fewer bytes than the shape says
    _check_errors(_error_cases(client, httpclient, short, "404", "400"))

    # The wire itself: every error is {"error": "..."} with the status.
    infer = "/v2/models/fraud/infer"
    no_data = b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 32]}]}'
    text_data = b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2], "data": ["a", 1]}]}'
    raw_cases = [
        ("POST", infer, b"{not json", {}, 400, "inference request: the body is not valid JSON"),
        ("POST", infer, b'{"inputs": 3}', {}, 400, "inputs: expected a non-empty array"),
        ("POST", infer, no_data, {}, 400, "input 'features': no data"),
        ("POST", infer, text_data, {}, 400, "input 'features': 'data' holds str values"),
        ("POST", infer, b'{"inputs": []}', {HEADER_LENGTH: "999"}, 400, HEADER_LENGTH),
        ("POST", "/v2/models/nope/infer", b'{"inputs": []}', {}, 404, "model 'nope' is not found"),
        ("GET", "/v2/models/nope/ready", None, {}, 503, "model 'nope' is not ready"),
        ("GET", "/v2/no/such/route", None, {}, 404, "Not Found"),
        ("POST", "/v2/systemsharedmemory/region/x/register", b'{"key": "/x"}', {}, 400, "byte_size"),
    ]
    for method, path, body, headers, status, message in raw_cases:
        got_status, got_headers, got_body = _raw_http(url, method, path, body, headers)
        assert got_status == status, (path, body, got_status, got_body)
        assert got_headers.get("Content-Type", "").startswith("application/json"), got_headers
        error = json.loads(got_body)["error"]
        assert message in error, (path, body, error)
    assert client.is_server_live()


@http_scenario
def http_statistics_and_repository(url: str, grpc_url: str, repo: Path) -> None:
    client = httpclient.InferenceServerClient(url)
    stats = client.get_inference_statistics("fraud")["model_stats"]
    assert [s["version"] for s in stats] == ["1", "2"], stats
    assert isinstance(stats[0]["inference_stats"]["success"]["count"], int)
    assert stats[0]["inference_stats"]["success"]["count"] > 0
    assert any(s["name"] == "types" for s in client.get_inference_statistics()["model_stats"])
    index = {(m["name"], m.get("version", "")): m for m in client.get_model_repository_index()}
    assert index[("fraud", "1")]["state"] == "READY" and index[("fraud", "2")]["state"] == "READY"
    broken = index[("broken", "1")]
    assert broken["state"] == "UNAVAILABLE" and "ONNX Runtime cannot load" in broken["reason"], broken
    client.unload_model("double")
    assert not client.is_model_ready("double")
    status, message = _error(lambda: client.infer("double", []))
    assert status == "404", (status, message)
    client.load_model("double")
    assert client.is_model_ready("double")
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    inp = httpclient.InferInput("x", [2, 3], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("double", [inp]).as_numpy("y"), 2 * x)
    status, message = _error(lambda: client.load_model("broken"))
    assert status == "400" and "failed to load model 'broken'" in message, (status, message)
    status, message = _error(lambda: client.unload_model("nope"))
    assert status == "404", (status, message)
    # a config sent with the load: serve only version 1, then both again
    client.load_model("fraud", config=_serving(repo, [1]))
    assert client.get_model_metadata("fraud")["versions"] == ["1"]
    client.load_model("fraud", config=_serving(repo, [1, 2]))
    assert client.get_model_metadata("fraud")["versions"] == ["1", "2"]


@http_scenario
def load_model_with_files_in_the_request(url: str, grpc_url: str, repo: Path) -> None:
    """Triton's `file:` parameters from both clients: the model need not be on disk beforehand."""
    onnx_bytes = (repo / "double" / "1" / "model.onnx").read_bytes()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for name, client, module in (
        ("sent_http", httpclient.InferenceServerClient(url), httpclient),
        ("sent_grpc", grpcclient.InferenceServerClient(grpc_url), grpcclient),
    ):
        config = json.dumps({
            "name": name, "max_batch_size": 0,
            "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, -1]}],
            "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1, -1]}],
        })  # fmt: skip
        client.load_model(name, config=config, files={"file:1/model.onnx": onnx_bytes})
        assert client.is_model_ready(name, "1")
        assert (repo / name / "1" / "model.onnx").read_bytes() == onnx_bytes
        inp = module.InferInput("x", [2, 3], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer(name, [inp]).as_numpy("y"), 2 * x)
        # a path out of the model's folder, and files without a config, are refused naming the parameter
        for files, cfg, named in (
            (
                {"file:../escaped/1/model.onnx": onnx_bytes},
                config,
                "parameter 'file:../escaped/1/model.onnx'",
            ),
            ({"file:2/model.onnx": onnx_bytes}, None, "parameter 'config': required with 'file:'"),
        ):
            try:
                client.load_model(name, config=cfg, files=files)
            except InferenceServerException as exc:
                assert named in str(exc.message()), exc.message()
                assert str(exc.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), exc.status()
            else:
                raise AssertionError(f"{name}: load with {sorted(files)} succeeded")
        assert not (repo / "escaped").exists() and not (repo / name / "2").exists()
        assert client.is_model_ready(name, "1")


def _region(name: str, size: int) -> Any:
    key = f"/{name}-{os.getpid()}"
    return key, shm.create_shared_memory_region(name, key, size)


@http_scenario
def system_shared_memory_round_trips_over_grpc_and_http(url: str, grpc_url: str, repo: Path) -> None:
    http = httpclient.InferenceServerClient(url)
    grpc = grpcclient.InferenceServerClient(grpc_url)
    rng = np.random.default_rng(33)
    x = rng.normal(40, 30, (16, 32)).astype(np.float32)
    expected = _expected(repo, "2", x)
    in_key, in_handle = _region("ig-in", x.nbytes + 128)
    out_key, out_handle = _region("ig-out", 256)
    try:
        shm.set_shared_memory_region(in_handle, [x], offset=128)
        # One data plane: a region registered over HTTP is seen over gRPC and the other way round.
        http.register_system_shared_memory("ig-in", in_key, x.nbytes + 128)
        grpc.register_system_shared_memory("ig-out", out_key, 256)
        http_status = {r["name"]: r for r in http.get_system_shared_memory_status()}
        grpc_status = grpc.get_system_shared_memory_status(as_json=True)["regions"]
        assert set(http_status) == set(grpc_status) == {"ig-in", "ig-out"}, (http_status, grpc_status)
        assert (
            http_status["ig-out"]["key"] == out_key
            and int(grpc_status["ig-in"]["byte_size"]) == x.nbytes + 128
        )
        assert http.get_system_shared_memory_status("ig-in")[0]["name"] == "ig-in"

        for client, mod in ((http, httpclient), (grpc, grpcclient)):
            inp = mod.InferInput("features", [16, 32], "FP32")
            inp.set_shared_memory("ig-in", x.nbytes, offset=128)
            out = mod.InferRequestedOutput("fraud_probability")
            out.set_shared_memory("ig-out", 64)
            shm.set_shared_memory_region(out_handle, [np.zeros(64, np.uint8)])
            result = client.infer("fraud", [inp], outputs=[out])
            output = result.get_output("fraud_probability")
            shape = output["shape"] if isinstance(output, dict) else list(output.shape)
            assert [int(d) for d in shape] == [16, 1], output
            got = shm.get_contents_as_numpy(out_handle, np.float32, [16, 1])
            _assert_close(got, expected)
            # shared memory input, output back in the response
            result = client.infer("fraud", [inp])
            _assert_close(result.as_numpy("fraud_probability"), expected)

        # Bounds: offset + size past the region, a size that is not the tensor's, an output too small.
        def _bad_input(client: Any, mod: Any, size: int, offset: int) -> Callable[[], Any]:
            inp = mod.InferInput("features", [16, 32], "FP32")
            inp.set_shared_memory("ig-in", size, offset=offset)
            return lambda: client.infer("fraud", [inp])

        def _bad_output(client: Any, mod: Any, size: int) -> Callable[[], Any]:
            inp = mod.InferInput("features", [16, 32], "FP32")
            inp.set_shared_memory("ig-in", x.nbytes, offset=128)
            out = mod.InferRequestedOutput("fraud_probability")
            out.set_shared_memory("ig-out", size)
            return lambda: client.infer("fraud", [inp], outputs=[out])

        for client, mod, invalid in (
            (http, httpclient, "400"),
            (grpc, grpcclient, "StatusCode.INVALID_ARGUMENT"),
        ):
            for call, message in (
                (
                    _bad_input(client, mod, x.nbytes, 256),
                    f"input 'features': shared_memory_offset + shared_memory_byte_size (256 + {x.nbytes}) "
                    f"exceeds the {x.nbytes + 128} bytes of shared memory region 'ig-in'",
                ),
                (
                    _bad_input(client, mod, 100, 0),
                    "100 bytes of shared memory (shared_memory_byte_size) given",
                ),
                (
                    _bad_output(client, mod, 32),
                    "output 'fraud_probability': shared_memory_byte_size 32 is too small",
                ),
                (_bad_output(client, mod, 512), "exceeds the 256 bytes of shared memory region 'ig-out'"),
            ):
                status, got = _error(call)
                assert status == invalid and message in got, (status, message, got)
        status, got = _error(lambda: http.register_system_shared_memory("ig-big", in_key, 1 << 30))
        assert status == "400" and got.startswith("offset + byte_size"), (status, got)
        status, got = _error(lambda: grpc.register_system_shared_memory("ig-in", in_key, 8))
        assert status == "StatusCode.ALREADY_EXISTS", (status, got)

        # CUDA shared memory: a clear refusal on this (CPU) backend.
        status, got = _error(lambda: http.register_cuda_shared_memory("c", b"aGFuZGxl", 0, 8))
        assert status == "400" and "CUDA shared memory is not supported on this backend" in got, got
        status, got = _error(lambda: grpc.register_cuda_shared_memory("c", b"aGFuZGxl", 0, 8))
        assert status == "StatusCode.UNIMPLEMENTED" and "not supported on this backend" in got, got
        assert http.get_cuda_shared_memory_status() == []
        http.unregister_cuda_shared_memory()
        grpc.unregister_cuda_shared_memory()
    finally:
        http.unregister_system_shared_memory("ig-in")
        grpc.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(in_handle)
        shm.destroy_shared_memory_region(out_handle)
    assert http.get_system_shared_memory_status() == []


@http_scenario
def trace_and_log_settings_over_http_and_grpc(url: str, grpc_url: str, repo: Path) -> None:
    http = httpclient.InferenceServerClient(url)
    grpc = grpcclient.InferenceServerClient(grpc_url)
    settings = http.get_trace_settings()
    assert settings["trace_mode"] == "opentelemetry" and "trace_rate" in settings, settings
    assert http.update_trace_settings(settings={"trace_rate": "4"})["trace_rate"] == "4"
    assert grpc.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"] == ["4"]
    assert http.get_trace_settings(model_name="fraud")["trace_rate"] == "4"
    status, message = _error(lambda: http.update_trace_settings(settings={"trace_rate": "0"}))
    assert status == "400" and message.startswith("trace_rate"), (status, message)
    status, message = _error(lambda: http.update_trace_settings(settings={"bogus": "1"}))
    assert status == "400" and "bogus" in message, (status, message)
    http.update_trace_settings(settings={"trace_rate": None})
    logs = http.update_log_settings({"log_info": False})
    assert logs["log_info"] is False and logs["log_warning"] is True, logs
    assert grpc.get_log_settings(as_json=True)["settings"]["log_info"]["bool_param"] is False
    logs = grpc.update_log_settings({"log_info": True}, as_json=True)["settings"]
    assert logs["log_info"]["bool_param"] is True
    assert http.get_log_settings()["log_info"] is True
    status, message = _error(lambda: http.update_log_settings({"log_file": "/tmp/x"}))
    assert status == "400" and message.startswith("log_file"), (status, message)


def check(scenarios: list[tuple[str, Callable[..., Any]]], *args: Any) -> dict[str, str]:
    results: dict[str, str] = {}
    for name, fn in scenarios:
        try:
            fn(*args)
            results[name] = "ok"
        except BaseException:
            results[name] = traceback.format_exc()
    return results


def main(argv: list[str]) -> None:
    command = argv[1]
    if command == "check":
        print(json.dumps(check(SCENARIOS, argv[2], Path(argv[4]), argv[3])))
    elif command == "check-http":
        print(json.dumps(check(HTTP_SCENARIOS, argv[2], argv[3], Path(argv[4]))))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv)
