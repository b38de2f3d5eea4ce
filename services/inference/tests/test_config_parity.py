"""Triton model-configuration parity against the real server over gRPC: priority levels and per-level queue
timeouts, preferred_batch_size, INVALID_ARGUMENT for unsupported fields, model_warmup, and a string model
(`Cast` of BYTES digits to INT32, then `Add`) that loads and serves.

Execution order is observed with a backend that wraps the real ONNX Runtime one: a request whose input is
-1 holds the model's only instance until the test releases it, so the others queue up first.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import REGISTRY

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from libs.server import Server, ServerConfig
from libs.testing import free_port
from services.inference.config import (
    ControlConfig,
    HttpConfig,
    InferenceConfig,
    ModelServingConfig,
)
from services.inference.server import create_server
from services.inference.tests.models import HookedBackend, double_model, save_model

HOLD = -1.0
Served = tuple[pb_grpc.GRPCInferenceServiceStub, "_Gate", Path, int]
MAX_FILE_BYTES = 1 << 16


def _string_model() -> onnx.ModelProto:
    """sum = int32(digits) + 1: a BYTES input that only parses as numbers."""
    one = numpy_helper.from_array(np.array(1, dtype=np.int32), name="one")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["digits"], ["number"], to=TensorProto.INT32),
            helper.make_node("Add", ["number", "one"], ["sum"]),
        ],
        "digits",
        [helper.make_tensor_value_info("digits", TensorProto.STRING, ["batch", 1])],
        [helper.make_tensor_value_info("sum", TensorProto.INT32, ["batch", 1])],
        initializer=[one],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


SCALE_IO = """input { name: "x" data_type: TYPE_FP32 dims: [ 1 ] }
output { name: "y" data_type: TYPE_FP32 dims: [ 1 ] }
"""
PRIORITY_CONFIG = (
    "max_batch_size: 1\ndynamic_batching {\n  priority_levels: 2\n  default_priority_level: 2\n"
    "  priority_queue_policy { key: 2 value: { default_timeout_microseconds: 50000 allow_timeout_override: true } }\n"
    "}\n" + SCALE_IO
)
PREFERRED_CONFIG = "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 2, 4 ] }\n" + SCALE_IO
WARMED_CONFIG = (
    "max_batch_size: 8\n"
    + SCALE_IO
    + 'model_warmup { name: "random" batch_size: 3 count: 2 inputs { key: "x" value: '
    "{ data_type: TYPE_FP32 dims: [ 1 ] random_data: true } } }\n"
)
DIGITS_CONFIG = """max_batch_size: 8
input { name: "digits" data_type: TYPE_STRING dims: [ 1 ] }
output { name: "sum" data_type: TYPE_INT32 dims: [ 1 ] }
"""
DIGITS_WARMUP = (
    'model_warmup {{ name: "{name}" batch_size: 2 inputs {{ key: "digits" value: '
    "{{ data_type: TYPE_STRING dims: [ 1 ] {data} }} }} }}\n"
)


def _repository(root: Path) -> Path:
    for name, config in (
        ("prio", PRIORITY_CONFIG),
        ("preferred", PREFERRED_CONFIG),
        ("warmed", WARMED_CONFIG),
        ("plain", "max_batch_size: 8\n" + SCALE_IO),
    ):
        save_model(double_model(("batch", 1), "scale"), root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(config)
    save_model(_string_model(), root / "digits" / "1" / "model.onnx")
    (root / "digits" / "config.pbtxt").write_text(DIGITS_CONFIG)
    (root / "digits" / "warmup").mkdir()
    (root / "digits" / "warmup" / "seven").write_bytes(struct.pack("<I", 1) + b"7")
    return root


class _Gate(HookedBackend):
    """ONNX Runtime recording each run's `x` and holding a run whose first value is HOLD until `release`."""

    def __init__(self) -> None:
        super().__init__(self._record)
        self.runs: list[list[float]] = []
        self.held = threading.Event()
        self.release = threading.Event()

    def _record(self, inputs: Mapping[str, np.ndarray]) -> None:
        x = inputs.get("x")
        if x is not None:
            values = [float(v) for v in np.asarray(x).reshape(-1)]
            self.runs.append(values)
            if values[0] == HOLD:
                self.held.set()
                self.release.wait(30)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    repo = _repository(tmp_path / "models")
    gate = _Gate()
    config = InferenceConfig(
        server=ServerConfig(port=0, drain_seconds=0, grace_seconds=0.5),
        models=ModelServingConfig(model_repository=repo, startup_models=("prio", "preferred", "digits")),
        http=HttpConfig(http_port=free_port(), http_host="127.0.0.1"),
        control=ControlConfig(control_enabled=True, control_max_file_bytes=MAX_FILE_BYTES),
    )
    server: Server = await create_server(config, backends={"onnxruntime": gate})
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel), gate, repo, config.http.http_port
    finally:
        gate.release.set()
        await server.stop(0, 1.0)


def _request(model: str, value: float, **parameters: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=model, raw_input_contents=[np.array([[value]], np.float32).tobytes()]
    )
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    for key, number in parameters.items():
        if key == "priority":
            request.parameters[key].uint64_param = number
        else:
            request.parameters[key].int64_param = number
    return request


async def _error(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    raise AssertionError("the call succeeded")


async def _queued(model: str, depth: int) -> None:
    """Waits until `depth` requests of `model` are in its queue or running (bounded: fails after 10 s)."""
    for _ in range(1000):
        value = REGISTRY.get_sample_value("infergrid_inference_queue_depth", {"model": model, "version": "1"})
        if value is not None and value >= depth:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{model}: never {depth} requests queued")


async def _hold(stub: pb_grpc.GRPCInferenceServiceStub, gate: _Gate, model: str) -> asyncio.Future[object]:
    """Starts a request that holds the model's instance until gate.release is set."""
    held = asyncio.ensure_future(stub.ModelInfer(_request(model, HOLD)))
    await asyncio.to_thread(gate.held.wait, 10)
    assert gate.held.is_set()
    return held


async def test_priority_levels_take_level_1_first_and_level_timeouts_apply(
    served: Served,
) -> None:
    stub, gate, _, _ = served
    held = await _hold(stub, gate, "prio")
    # Level 2 (the default): its queue policy times out after 50 ms unless the request overrides it.
    expires = asyncio.ensure_future(stub.ModelInfer(_request("prio", 1.0)))
    await _queued("prio", 2)
    overrides = asyncio.ensure_future(stub.ModelInfer(_request("prio", 2.0, priority=2, timeout=30_000_000)))
    await _queued("prio", 3)
    first = asyncio.ensure_future(stub.ModelInfer(_request("prio", 3.0, priority=1)))
    await _queued("prio", 4)
    second = asyncio.ensure_future(stub.ModelInfer(_request("prio", 4.0, priority=1)))
    await _queued("prio", 5)
    await asyncio.sleep(0.2)  # past the level-2 timeout of the first request (deadline, not a speed check)
    gate.release.set()
    await held

    code, details = await _error(expires)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "timed out" in details
    answers = [await call for call in (overrides, first, second)]
    assert [np.frombuffer(a.raw_output_contents[0], np.float32)[0] for a in answers] == [4.0, 6.0, 8.0]
    ran = [run[0] for run in gate.runs if run[0] != 0.0]  # without the zeros warm-up
    assert ran == [HOLD, 3.0, 4.0, 2.0]

    code, details = await _error(stub.ModelInfer(_request("prio", 1.0, priority=3)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "parameters.priority: 3 is outside 0..2" in details


async def test_preferred_batch_size_shapes_the_batches(
    served: Served,
) -> None:
    stub, gate, _, _ = served
    held = await _hold(stub, gate, "preferred")
    calls = []
    for i in range(5):
        calls.append(asyncio.ensure_future(stub.ModelInfer(_request("preferred", float(i + 1)))))
        await _queued("preferred", i + 2)
    gate.release.set()
    await held
    answers = await asyncio.gather(*calls)
    assert [np.frombuffer(a.raw_output_contents[0], np.float32)[0] for a in answers] == [2, 4, 6, 8, 10]
    batches = [run for run in gate.runs if run[0] > 0]
    # The largest preferred size that the 5 queued rows fill (4), then the remaining one.
    assert batches == [[1.0, 2.0, 3.0, 4.0], [5.0]]


PLAIN: dict[str, object] = {
    "max_batch_size": 8,
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
    "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}],
}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"optimization": {"priority": "PRIORITY_MAX"}}, "config field optimization is not supported"),
        ({"response_cache": {"enable": True}}, "config field response_cache is not supported"),
        ({"sequence_batching": {}}, "sequence_batching is not supported"),
        ({"ensemble_scheduling": {"step": []}}, "ensemble_scheduling is not supported"),
        (
            {"input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1], "reshape": {"shape": [1]}}]},
            "config field input[0].reshape is not supported",
        ),
        ({"instance_group": [{"count": 1, "profile": ["a"]}]}, "config field instance_group[0].profile"),
        (
            {"dynamic_batching": {"default_queue_policy": {"timeout_action": "DELAY"}}},
            "config field dynamic_batching.default_queue_policy.timeout_action is not supported",
        ),
        ({"dynamic_batching": {"priority_levels": 2}}, "default_priority_level must be in 1..2, got 0"),
        (
            {
                "dynamic_batching": {
                    "priority_levels": 2,
                    "default_priority_level": 1,
                    "priority_queue_policy": {"1": {"max_queue_size": 3}},
                }
            },
            "priority_queue_policy[1]: only default_timeout_microseconds",
        ),
        ({"parameters": {"execution_mode": {"string_value": "parallel"}}}, "parameters ['execution_mode']"),
        (
            {
                "model_warmup": [
                    {
                        "name": "w",
                        "inputs": {"x": {"data_type": "TYPE_INT32", "dims": [1], "zero_data": True}},
                    }
                ]
            },
            "model_warmup 'w': input 'x': data_type TYPE_INT32 does not match the input's TYPE_FP32",
        ),
        (
            {
                "model_warmup": [
                    {
                        "name": "w",
                        "inputs": {
                            "x": {"data_type": "TYPE_FP32", "dims": [1], "input_data_file": "../1/model.onnx"}
                        },
                    }
                ]
            },
            "must name a file in the model's warmup/ folder",
        ),
    ],
)
async def test_unsupported_config_fields_are_invalid_argument_naming_them(
    served: Served, change: dict[str, object], named: str
) -> None:
    stub, _gate, _, _ = served
    code, details = await _error(_load_files(stub, "plain", {}, {**PLAIN, **change}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert named in details
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="plain"))).ready


async def test_warmup_follows_model_warmup_instead_of_synthetic_inputs(
    served: Served,
) -> None:
    stub, gate, _, _ = served
    before = len(gate.runs)
    await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="warmed"))
    warmups = gate.runs[before:]
    # Sample "random": batch_size 3, count 2; random values, not the zeros of the default warm-up.
    assert len(warmups) == 2 and all(len(run) == 3 for run in warmups), warmups
    assert warmups[0] == warmups[1] and any(v != 0.0 for v in warmups[0])
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="warmed"))).ready


def _digits_request(*texts: bytes) -> pb.ModelInferRequest:
    raw = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    request = pb.ModelInferRequest(model_name="digits", raw_input_contents=[raw])
    request.inputs.add(name="digits", datatype="BYTES", shape=[len(texts), 1])
    return request


async def _digits_sum(stub: pb_grpc.GRPCInferenceServiceStub, *texts: bytes) -> list[int]:
    answer = await stub.ModelInfer(_digits_request(*texts))
    return [int(v) for v in np.frombuffer(answer.raw_output_contents[0], "<i4")]


async def test_a_string_model_loads_serves_and_warms_up_as_configured(
    served: Served,
) -> None:
    stub, _gate, repo, _ = served
    # Loaded at start-up without model_warmup: no synthetic strings are fed to it.
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="digits"))).ready
    assert await _digits_sum(stub, b"41", b"-3") == [42, -2]

    config_file = repo / "digits" / "config.pbtxt"
    config_file.write_text(
        DIGITS_CONFIG + DIGITS_WARMUP.format(name="seven", data='input_data_file: "seven"')
    )
    await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"))
    assert await _digits_sum(stub, b"99") == [100]

    # The configuration asks for empty strings, which Cast cannot parse: the load fails, naming the
    # sample, and the version already serving keeps serving.
    config_file.write_text(DIGITS_CONFIG + DIGITS_WARMUP.format(name="empty", data="zero_data: true"))
    code, details = await _error(stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "warm-up 'empty' failed" in details
    assert await _digits_sum(stub, b"1") == [2]


def _load_files(
    stub: pb_grpc.GRPCInferenceServiceStub, model: str, files: dict[str, bytes], config: dict[str, object]
) -> Any:
    parameters = {
        f"file:{path}": pb.ModelRepositoryParameter(bytes_param=data) for path, data in files.items()
    }
    parameters["config"] = pb.ModelRepositoryParameter(string_param=json.dumps(config))
    return stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model, parameters=parameters))


async def test_model_files_in_the_load_request_are_bounded_confined_and_undone_on_failure(
    served: Served, tmp_path: Path
) -> None:
    stub, _gate, repo, _ = served
    good = (repo / "plain" / "1" / "model.onnx").read_bytes()
    await _load_files(stub, "plain", {"1/model.onnx": good}, PLAIN)
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="plain", version="1"))).ready

    # A file the backend cannot load: the load fails and the folder is as it was; version 1 keeps serving.
    code, details = await _error(_load_files(stub, "plain", {"1/model.onnx": b"not onnx"}, PLAIN))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "failed to load model 'plain'" in details
    assert (repo / "plain" / "1" / "model.onnx").read_bytes() == good
    answer = await stub.ModelInfer(_request("plain", 5.0))
    assert np.frombuffer(answer.raw_output_contents[0], np.float32)[0] == 10.0
    # A new model whose load fails leaves no folder behind; a new version folder neither.
    code, _ = await _error(_load_files(stub, "newcomer", {"1/model.onnx": b"not onnx"}, PLAIN))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and not (repo / "newcomer").exists()
    code, _ = await _error(_load_files(stub, "plain", {"3/model.onnx": b"not onnx"}, PLAIN))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and not (repo / "plain" / "3").exists()

    outside = tmp_path / "outside"
    outside.mkdir()
    (repo / "plain" / "link").symlink_to(outside)
    for files, named in (
        ({"../prio/1/model.onnx": good}, "parameter 'file:../prio/1/model.onnx': the path must be relative"),
        ({"/etc/model.onnx": good}, "parameter 'file:/etc/model.onnx'"),
        ({"1/.model.onnx": good}, "parameter 'file:1/.model.onnx'"),
        ({"link/model.onnx": good}, "parameter 'file:link/model.onnx': does not name a file inside"),
        ({"1/model.onnx": bytes(MAX_FILE_BYTES + 1)}, f"at most {MAX_FILE_BYTES}"),
    ):
        code, details = await _error(_load_files(stub, "plain", files, PLAIN))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and named in details, details
    assert list(outside.iterdir()) == []
    assert (repo / "plain" / "1" / "model.onnx").read_bytes() == good
    assert (repo / "prio" / "1" / "model.onnx").read_bytes() == good


def _http_infer(port: int, priority: int) -> tuple[int, dict[str, object]]:
    body = {
        "inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.5]}],
        "parameters": {"priority": priority},
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/prio/infer", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status), json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return int(err.code), json.loads(err.read())


async def test_priority_over_http(served: Served) -> None:
    _stub, _gate, _repo, http_port = served
    status, answer = await asyncio.to_thread(_http_infer, http_port, 1)
    assert status == 200 and answer["outputs"][0]["data"] == [3.0], answer  # type: ignore[index]
    status, answer = await asyncio.to_thread(_http_infer, http_port, 7)
    assert status == 400 and "parameters.priority: 7 is outside 0..2" in str(answer["error"]), answer
