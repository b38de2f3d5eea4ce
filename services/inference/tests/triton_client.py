"""The unmodified tritonclient against a running inference server; run as a subprocess.

tritonclient's generated modules register the same `inference.*` protobuf symbols
as ours, so they cannot share a process with our stubs: test_tritonclient.py starts
the server and runs this script, which prints one JSON object mapping each
scenario to "ok" or its traceback.

  python triton_client.py check URL METRICS_URL REPO   run every scenario
  python triton_client.py bench URL [SECONDS] [CONCURRENCY...]   informative throughput
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

SCENARIOS: list[tuple[str, Callable[..., Any]]] = []


def scenario(fn: Callable[..., Any]) -> Callable[..., Any]:
    SCENARIOS.append((fn.__name__, fn))
    return fn


def _expected(repo: Path, version: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repo / "fraud" / version / "model.onnx"))
    return session.run(None, {"features": x})[0]


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
    on_disk = model_config_pb2.ModelConfig()
    text_format.Parse((repo / "fraud" / "config.pbtxt").read_text(), on_disk)
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
            np.testing.assert_allclose(
                result.as_numpy("fraud_probability"), _expected(repo, version, x), rtol=1e-5, atol=1e-6
            )
    # the latest version answers when none is named
    x = rng.normal(40, 30, (2, 32)).astype(np.float32)
    result = client.infer(
        "fraud", _features(x), outputs=[grpcclient.InferRequestedOutput("fraud_probability")]
    )
    assert result.get_response().model_version == "2"
    np.testing.assert_allclose(
        result.as_numpy("fraud_probability"), _expected(repo, "2", x), rtol=1e-5, atol=1e-6
    )


@scenario
def every_datatype_round_trips(url: str, repo: Path, metrics: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    arrays = {
        "FP32": np.array([[1.5, -2, 3], [0, 1, 2]], np.float32),
        "FP16": np.array([[0.5, 1, -8], [2, 4, 8]], np.float16),
        "INT32": np.array([[1, -2, 3], [4, 5, 2**31 - 1]], np.int32),
        "INT64": np.array([[2**40, -1, 7], [0, 1, 2]], np.int64),
        "BOOL": np.array([[True, False, True], [False, False, True]]),
        "BYTES": np.array([[b"a", b"", "\u00e9t\u00e9".encode()], [b"x", b"yy", b"zzz"]], dtype=np.object_),
    }
    inputs = []
    for datatype, array in arrays.items():
        inp = grpcclient.InferInput(f"in_{datatype.lower()}", list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    result = client.infer("types", inputs)
    for datatype, array in arrays.items():
        got = result.as_numpy(f"out_{datatype.lower()}")
        assert got.shape == array.shape, (datatype, got.shape)
        if datatype == "BYTES":
            assert got.reshape(-1).tolist() == array.reshape(-1).tolist(), got
        else:
            assert got.dtype == array.dtype, (datatype, got.dtype)
            np.testing.assert_array_equal(got, array)


@scenario
def errors_have_the_right_status_and_message(url: str, repo: Path, metrics: str) -> None:
    client = grpcclient.InferenceServerClient(url)
    x = np.ones((1, 32), np.float32)
    cases: list[tuple[Callable[[], Any], str, str]] = []
    cases.append(
        (lambda: client.infer("nope", _features(x)), "StatusCode.NOT_FOUND", "model 'nope' is not found")
    )
    cases.append(
        (
            lambda: client.infer("fraud", _features(x), model_version="7"),
            "StatusCode.NOT_FOUND",
            "model 'fraud' version '7' is not found",
        )
    )
    cases.append(
        (lambda: client.get_model_metadata("nope"), "StatusCode.NOT_FOUND", "model 'nope' is not found")
    )
    cases.append((lambda: client.get_model_config("fraud", "9"), "StatusCode.NOT_FOUND", "version '9'"))
    wrong_type = grpcclient.InferInput("features", [1, 32], "FP64")
    wrong_type.set_data_from_numpy(x.astype(np.float64))
    cases.append(
        (
            lambda: client.infer("fraud", [wrong_type]),
            "StatusCode.INVALID_ARGUMENT",
            "input 'features' of model 'fraud': datatype FP64 given, expected FP32",
        )
    )
    wrong_shape = grpcclient.InferInput("features", [1, 16], "FP32")
    wrong_shape.set_data_from_numpy(np.ones((1, 16), np.float32))
    cases.append(
        (
            lambda: client.infer("fraud", [wrong_shape]),
            "StatusCode.INVALID_ARGUMENT",
            "input 'features' of model 'fraud': shape [1, 16] given, expected [-1, 32]",
        )
    )
    short = grpcclient.InferInput("features", [1, 32], "FP32")
    short.set_data_from_numpy(x)
    short._raw_content = x.tobytes()[:-4]  # a client that sends fewer bytes than its shape says
    cases.append(
        (
            lambda: client.infer("fraud", [short]),
            "StatusCode.INVALID_ARGUMENT",
            "input 'features' of model 'fraud': 124 bytes of raw data given, expected 128",
        )
    )
    other = grpcclient.InferInput("in_fp32", [1, 3], "FP32")
    other.set_data_from_numpy(np.ones((1, 3), np.float32))
    cases.append(
        (lambda: client.infer("types", [other]), "StatusCode.INVALID_ARGUMENT", "missing input(s) ['in_fp16'")
    )
    cases.append(
        (
            lambda: client.infer("fraud", [other]),
            "StatusCode.INVALID_ARGUMENT",
            "unexpected input 'in_fp32' for model 'fraud'; expected inputs: ['features']",
        )
    )
    cases.append(
        (
            lambda: client.infer("fraud", _features(x), outputs=[grpcclient.InferRequestedOutput("nope")]),
            "StatusCode.INVALID_ARGUMENT",
            "unexpected output 'nope'",
        )
    )
    for call, status, message in cases:
        got_status, got_message = _error(call)
        assert got_status == status and message in got_message, (status, message, got_status, got_message)
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
                np.testing.assert_allclose(
                    result.as_numpy("fraud_probability"), expected[i : i + 1], rtol=1e-5, atol=1e-6
                )

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
        np.testing.assert_allclose(results[f"s{i}"], _expected(repo, "2", x), rtol=1e-5, atol=1e-6)


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
    on_disk = model_config_pb2.ModelConfig()
    text_format.Parse((repo / "fraud" / "config.pbtxt").read_text(), on_disk)

    def _config(versions: list[int]) -> str:
        config = model_config_pb2.ModelConfig()
        config.CopyFrom(on_disk)
        config.version_policy.Clear()
        config.version_policy.specific.versions.extend(versions)
        return json_format.MessageToJson(config)

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
            await client.load_model("fraud", config=_config(versions))
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


def check(url: str, metrics: str, repo: str) -> dict[str, str]:
    results: dict[str, str] = {}
    for name, fn in SCENARIOS:
        try:
            fn(url, Path(repo), metrics)
            results[name] = "ok"
        except BaseException:
            results[name] = traceback.format_exc()
    return results


def bench(url: str, seconds: float, concurrencies: list[int]) -> list[dict[str, float]]:
    """Closed-loop single-row requests from asyncio tritonclient clients (informative only)."""
    x = np.random.default_rng(0).normal(40, 30, (1, 32)).astype(np.float32)
    out = []

    async def _level(concurrency: int) -> dict[str, float]:
        clients = [aioclient.InferenceServerClient(url) for _ in range(max(1, concurrency // 8))]
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def _loop(i: int) -> None:
            client = clients[i % len(clients)]
            inp = aioclient.InferInput("features", [1, 32], "FP32")
            inp.set_data_from_numpy(x)
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await client.infer("fraud", [inp])
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(_loop(i) for i in range(concurrency)))
        for c in clients:
            await c.close()
        lat = np.array(latencies) * 1000
        return {
            "concurrency": concurrency,
            "req_per_s": round(len(lat) / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
        }

    for concurrency in concurrencies:
        out.append(asyncio.run(_level(concurrency)))
    return out


def main(argv: list[str]) -> None:
    command = argv[1]
    if command == "check":
        print(json.dumps(check(argv[2], argv[3], argv[4])))
    elif command == "bench":
        seconds = float(argv[3]) if len(argv) > 3 else 5.0
        levels = [int(c) for c in argv[4:]] or [1, 8, 32]
        for row in bench(argv[2], seconds, levels):
            print(json.dumps(row))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv)
