"""The inference server over a real gRPC channel with our generated stubs: every RPC, datatypes, errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import struct
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from libs.server import ServerConfig
from libs.testing import assert_bad_config_exits, assert_serves
from services.inference.config import (
    ControlConfig,
    HttpConfig,
    InferenceConfig,
    ModelServingConfig,
)
from services.inference.server import SERVICE_NAME, STREAM_SPAN, create_server
from services.inference.tests.models import HookedBackend


def _config(repo: Path | None, transport: str = "aio", **models: object) -> InferenceConfig:
    return InferenceConfig(
        server=ServerConfig(port=0, drain_seconds=0, grace_seconds=0.5, transport=transport),
        models=ModelServingConfig(model_repository=repo, **models),  # type: ignore[arg-type]
        http=HttpConfig(http_port=0),
        control=ControlConfig(control_enabled=True),  # these tests exercise the model control API
    )


@contextlib.asynccontextmanager
async def _serving(config: InferenceConfig, **backends: Any) -> AsyncIterator[grpc.aio.Channel]:
    """A started server (`backends` by name instead of the real ones) and a channel to it."""
    server = await create_server(config, backends=backends or None)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield channel
    finally:
        await server.stop(0, 1.0)


@pytest.fixture(scope="module", params=["aio", "threaded"])
async def served_channel(model_repo: Path, request: pytest.FixtureRequest) -> AsyncIterator[grpc.aio.Channel]:
    """The server on each transport (on the threaded one ModelInfer runs on the server thread)."""
    async with _serving(_config(model_repo, request.param)) as channel:
        yield channel


@pytest.fixture
def served(served_channel: grpc.aio.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(served_channel)


def _fraud_request(x: np.ndarray, version: str = "", **kw: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="fraud",
        model_version=version,
        id="req-1",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="features", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.astype(np.float32).tobytes()],
        **kw,  # type: ignore[arg-type]
    )


async def _error(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code(), err.value.details() or ""


async def test_serves_health_and_reflection() -> None:
    config = InferenceConfig(server=ServerConfig(port=0), http=HttpConfig(http_port=0))
    await assert_serves(await create_server(config), SERVICE_NAME)


def test_malformed_port_exits_naming_the_variable() -> None:
    assert_bad_config_exits("services.inference", "INFERGRID_INFERENCE_PORT", "not-a-port")


def test_missing_repository_folder_exits_naming_the_variable() -> None:
    assert_bad_config_exits(
        "services.inference", "INFERGRID_INFERENCE_MODEL_REPOSITORY", "/nonexistent/models"
    )


async def test_health_metadata_and_config(served: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert (await served.ServerLive(pb.ServerLiveRequest())).live
    assert (await served.ServerReady(pb.ServerReadyRequest())).ready
    assert (await served.ModelReady(pb.ModelReadyRequest(name="fraud", version="1"))).ready
    assert not (await served.ModelReady(pb.ModelReadyRequest(name="broken"))).ready
    assert not (await served.ModelReady(pb.ModelReadyRequest(name="fraud", version="3"))).ready
    meta = await served.ServerMetadata(pb.ServerMetadataRequest())
    assert "statistics" in meta.extensions and "model_repository" in meta.extensions
    model = await served.ModelMetadata(pb.ModelMetadataRequest(name="fraud"))
    assert list(model.versions) == ["1", "2"] and model.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("features", "FP32", [-1, 32])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("fraud_probability", "FP32", [-1, 1])
    ]
    config = (await served.ModelConfig(pb.ModelConfigRequest(name="fraud"))).config
    assert config.name == "fraud" and config.max_batch_size == 256 and config.backend == "onnxruntime"
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert list(config.input[0].dims) == [32]


async def test_infer_raw_and_typed_contents_match_onnxruntime(
    served: pb_grpc.GRPCInferenceServiceStub, model_repo: Path
) -> None:
    x = np.random.default_rng(3).normal(40, 25, (6, 32)).astype(np.float32)
    for version in ("1", "2"):
        expected = ort.InferenceSession(str(model_repo / "fraud" / version / "model.onnx")).run(
            None, {"features": x}
        )[0]
        reply = await served.ModelInfer(_fraud_request(x, version))
        assert reply.model_name == "fraud" and reply.model_version == version and reply.id == "req-1"
        assert reply.outputs[0].name == "fraud_probability" and list(reply.outputs[0].shape) == [6, 1]
        got = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32).reshape(6, 1)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    typed = pb.ModelInferRequest(
        model_name="fraud",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="features", datatype="FP32", shape=[6, 32],
                contents=pb.InferTensorContents(fp32_contents=x.reshape(-1).tolist()),
            )
        ],
    )  # fmt: skip
    reply = await served.ModelInfer(typed)
    expected = ort.InferenceSession(str(model_repo / "fraud" / "2" / "model.onnx")).run(
        None, {"features": x}
    )[0]
    np.testing.assert_allclose(
        np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(6, 1), expected, rtol=1e-5
    )


def _bytes_raw(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


TYPED_CASES: Mapping[str, tuple[str, np.ndarray]] = {
    "in_fp32": ("FP32", np.array([[1.5, -2, 3]], np.float32)),
    "in_fp16": ("FP16", np.array([[0.5, 1, -8]], np.float16)),
    "in_int32": ("INT32", np.array([[1, -2, 2**31 - 1]], np.int32)),
    "in_int64": ("INT64", np.array([[2**40, -1, 7]], np.int64)),
    "in_bool": ("BOOL", np.array([[True, False, True]])),
    "in_bytes": ("BYTES", np.array([[b"a", b"", b"\xc3\xa9t\xc3\xa9"]], dtype=object)),
}


def _types_request(bytes_raw: bytes | None = None) -> pb.ModelInferRequest:
    """Every TYPED_CASES input of the "types" model as raw contents (`bytes_raw`: in_bytes' instead)."""
    request = pb.ModelInferRequest(model_name="types")
    for name, (datatype, array) in TYPED_CASES.items():
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype != "BYTES":
            request.raw_input_contents.append(array.tobytes())
        else:
            request.raw_input_contents.append(
                _bytes_raw(array.reshape(-1)) if bytes_raw is None else bytes_raw
            )
    return request


async def test_every_datatype_round_trips_raw(served: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = _types_request()
    request.outputs.add(name="out_bytes")
    request.outputs.add(name="out_int64")
    request.outputs.add(name="out_fp16")
    request.outputs.add(name="out_bool")
    reply = await served.ModelInfer(request)
    assert [o.name for o in reply.outputs] == ["out_bytes", "out_int64", "out_fp16", "out_bool"]
    assert [o.datatype for o in reply.outputs] == ["BYTES", "INT64", "FP16", "BOOL"]
    assert reply.raw_output_contents[0] == _bytes_raw(TYPED_CASES["in_bytes"][1].reshape(-1))
    np.testing.assert_array_equal(
        np.frombuffer(reply.raw_output_contents[1], "<i8").reshape(1, 3), TYPED_CASES["in_int64"][1]
    )
    np.testing.assert_array_equal(
        np.frombuffer(reply.raw_output_contents[2], "<f2").reshape(1, 3), TYPED_CASES["in_fp16"][1]
    )
    np.testing.assert_array_equal(
        np.frombuffer(reply.raw_output_contents[3], "?").reshape(1, 3), TYPED_CASES["in_bool"][1]
    )


async def test_every_datatype_round_trips_typed_contents(served: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="types")
    fields = {
        "FP32": "fp32_contents",
        "INT32": "int_contents",
        "INT64": "int64_contents",
        "BOOL": "bool_contents",
        "BYTES": "bytes_contents",
    }
    for name, (datatype, array) in TYPED_CASES.items():
        if datatype == "FP16":
            request.inputs.add(name=name, datatype=datatype, shape=[1, 3])
            continue
        tensor = request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        getattr(tensor.contents, fields[datatype]).extend(array.reshape(-1).tolist())
    code, details = await _error(served.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'in_fp16' of model 'types': FP16 data must be sent in raw_input_contents" in details
    del request.inputs[1]
    request.inputs.add(name="in_fp16", datatype="FP16", shape=[1, 3])
    request.raw_input_contents.extend([])  # typed only: FP16 cannot be sent this way, so drop the input
    del request.inputs[-1]
    code, details = await _error(served.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "missing input(s) ['in_fp16']" in details


async def test_model_without_batching_takes_any_shape(served: pb_grpc.GRPCInferenceServiceStub) -> None:
    for shape in ((2, 5), (1, 1), (4, 3)):
        x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        request = pb.ModelInferRequest(model_name="double", raw_input_contents=[x.tobytes()])
        request.inputs.add(name="x", datatype="FP32", shape=list(shape))
        reply = await served.ModelInfer(request)
        np.testing.assert_array_equal(
            np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(shape), x * 2
        )


def _with(request: pb.ModelInferRequest, change: object) -> pb.ModelInferRequest:
    copy = pb.ModelInferRequest()
    copy.CopyFrom(request)
    change(copy)  # type: ignore[operator]
    return copy


_GOOD = _fraud_request(np.ones((1, 32), np.float32))


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (_with(_GOOD, lambda r: setattr(r, "model_name", "nope")), "NOT_FOUND", "model 'nope' is not found"),
        (
            _with(_GOOD, lambda r: setattr(r, "model_version", "9")),
            "NOT_FOUND",
            "model 'fraud' version '9' is not found; ready versions: [1, 2]",
        ),
        (
            _with(_GOOD, lambda r: setattr(r, "model_name", "broken")),
            "NOT_FOUND",
            "model 'broken' is not ready",
        ),
        (
            _with(_GOOD, lambda r: setattr(r.inputs[0], "datatype", "FP64")),
            "INVALID_ARGUMENT",
            "input 'features' of model 'fraud': datatype FP64 given, expected FP32",
        ),
        (
            _with(_GOOD, lambda r: r.inputs[0].shape.__setitem__(1, 31)),
            "INVALID_ARGUMENT",
            "input 'features' of model 'fraud': shape [1, 31] given, expected [-1, 32]",
        ),
        (
            _with(_GOOD, lambda r: r.inputs[0].shape.pop()),
            "INVALID_ARGUMENT",
            "shape [1] given, expected [-1, 32]",
        ),
        (
            _with(_GOOD, lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 124)),
            "INVALID_ARGUMENT",
            "input 'features' of model 'fraud': 124 bytes of raw data given, expected 128 (32 x FP32 for shape [1, 32])",
        ),
        (
            _with(_GOOD, lambda r: (r.inputs.pop(), r.raw_input_contents.pop())),
            "INVALID_ARGUMENT",
            "model 'fraud': missing input(s) ['features']",
        ),
        (
            _with(_GOOD, lambda r: setattr(r.inputs[0], "name", "feats")),
            "INVALID_ARGUMENT",
            "unexpected input 'feats' for model 'fraud'; expected inputs: ['features']",
        ),
        (
            _with(
                _GOOD,
                lambda r: (
                    r.inputs.add().CopyFrom(r.inputs[0]),
                    r.raw_input_contents.append(r.raw_input_contents[0]),
                ),
            ),
            "INVALID_ARGUMENT",
            "input 'features' of model 'fraud' is given more than once",
        ),
        (
            _with(_GOOD, lambda r: r.raw_input_contents.append(b"x")),
            "INVALID_ARGUMENT",
            "2 raw_input_contents given for 1 inputs",
        ),
        (
            _with(
                _GOOD,
                lambda r: (
                    r.inputs[0].shape.__setitem__(0, 300),
                    r.raw_input_contents.__setitem__(0, b"\0" * 300 * 128),
                ),
            ),
            "INVALID_ARGUMENT",
            "batch size 300 given, expected 1..256",
        ),
        (
            _with(
                _GOOD,
                lambda r: (r.inputs[0].shape.__setitem__(0, 0), r.raw_input_contents.__setitem__(0, b"")),
            ),
            "INVALID_ARGUMENT",
            "batch size 0 given, expected 1..256",
        ),
        (
            _with(_GOOD, lambda r: r.outputs.add(name="score")),
            "INVALID_ARGUMENT",
            "unexpected output 'score' requested from model 'fraud'",
        ),
        (
            _with(
                _GOOD,
                lambda r: (r.raw_input_contents.pop(), r.inputs[0].contents.fp32_contents.extend([1.0] * 31)),
            ),
            "INVALID_ARGUMENT",
            "31 values given in contents.fp32_contents, expected 32 for shape [1, 32]",
        ),
    ],
)
async def test_bad_requests_get_the_right_status_and_message(
    served: pb_grpc.GRPCInferenceServiceStub, request_: pb.ModelInferRequest, code: str, message: str
) -> None:
    got, details = await _error(served.ModelInfer(request_))
    assert got == getattr(grpc.StatusCode, code), details
    assert message in details


async def test_absurd_shapes_and_values_are_invalid_argument_not_allocations(
    served: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    huge = pb.ModelInferRequest(model_name="double", raw_input_contents=[b"\0" * 16])
    huge.inputs.add(name="x", datatype="FP32", shape=[2**31, 2**31])
    code, details = await _error(served.ModelInfer(huge))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "16 bytes of raw data given" in details
    request = _types_request()
    request.inputs[5].shape[:] = [1, 2**40]
    code, details = await _error(served.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input 'in_bytes'" in details
    typed = pb.ModelInferRequest(model_name="types")
    tensor = typed.inputs.add(name="in_int32", datatype="INT32", shape=[1, 3])
    tensor.contents.int_contents.extend([1, 2, 3])
    int64 = typed.inputs.add(name="in_int64", datatype="INT64", shape=[1, 3])
    int64.contents.int64_contents.extend([1, 2, 3])
    code, details = await _error(served.ModelInfer(typed))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "missing input(s)" in details


async def test_malformed_bytes_tensor_is_invalid_argument(served: pb_grpc.GRPCInferenceServiceStub) -> None:
    code, details = await _error(served.ModelInfer(_types_request(b"\xff\x00\x00\x00ab")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'in_bytes' of model 'types': BYTES data for shape [1, 3]" in details


async def test_bytes_that_are_not_utf8_are_refused_for_onnxruntime_string_inputs(
    served: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    code, details = await _error(served.ModelInfer(_types_request(_bytes_raw([b"ok", b"\xff\xfe", b"x"]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'in_bytes': BYTES element is not UTF-8" in details


async def test_garbage_on_the_wire_never_takes_the_server_down(
    served: pb_grpc.GRPCInferenceServiceStub, served_channel: grpc.aio.Channel
) -> None:
    raw = served_channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)) * 10):
        with pytest.raises(grpc.aio.AioRpcError):
            await raw(garbage)
    assert (await served.ServerLive(pb.ServerLiveRequest())).live
    await served.ModelInfer(_GOOD)


@pytest.fixture
def shm_key() -> Iterator[str]:
    """A 4 KiB POSIX shared memory object (what shm_open creates: a file in /dev/shm)."""
    key = f"/infergrid-test-{os.getpid()}-{time.monotonic_ns()}"
    path = Path("/dev/shm") / key[1:]
    path.write_bytes(bytes(4096))
    yield key
    path.unlink(missing_ok=True)


def _shm_params(params: Any, region: str, size: int, offset: int = 0) -> None:
    params["shared_memory_region"].string_param = region
    params["shared_memory_byte_size"].int64_param = size
    if offset:
        params["shared_memory_offset"].int64_param = offset


async def test_system_shared_memory_inputs_and_outputs(
    served: pb_grpc.GRPCInferenceServiceStub, model_repo: Path, shm_key: str
) -> None:
    path = Path("/dev/shm") / shm_key[1:]
    x = np.random.default_rng(8).normal(40, 25, (4, 32)).astype(np.float32)
    with path.open("r+b") as f:
        f.seek(256 + 64)  # the region starts at 256; the input at offset 64 in it
        f.write(x.tobytes())
    await served.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name="r1", key=shm_key, offset=256, byte_size=2048)
    )
    try:
        status = await served.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="r1"))
        region = status.regions["r1"]
        assert (region.key, region.offset, region.byte_size) == (shm_key, 256, 2048)
        request = pb.ModelInferRequest(model_name="fraud", model_version="1", id="shm")
        _shm_params(
            request.inputs.add(name="features", datatype="FP32", shape=[4, 32]).parameters, "r1", 512, 64
        )
        _shm_params(request.outputs.add(name="fraud_probability").parameters, "r1", 16, 1024)
        reply = await served.ModelInfer(request)
        assert list(reply.outputs[0].shape) == [4, 1] and reply.raw_output_contents == [b""]
        assert reply.outputs[0].parameters["shared_memory_region"].string_param == "r1"
        with path.open("rb") as f:
            f.seek(256 + 1024)
            got = np.frombuffer(f.read(16), np.float32).reshape(4, 1)
        expected = ort.InferenceSession(str(model_repo / "fraud" / "1" / "model.onnx")).run(
            None, {"features": x}
        )[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

        # Bounds: past the region's end, a size that does not match the shape, an output too small, an
        # unregistered region.
        for side, params, wants in (
            (
                "inputs",
                ("r1", 512, 1600),
                [
                    "input 'features': shared_memory_offset + shared_memory_byte_size (1600 + 512)",
                    "2048 bytes of shared memory region 'r1'",
                ],
            ),
            ("inputs", ("r1", 500, 64), ["500 bytes of shared memory"]),
            (
                "outputs",
                ("r1", 8, 1024),
                ["output 'fraud_probability': shared_memory_byte_size 8 is too small"],
            ),
            ("inputs", ("nope", 512), ["region 'nope' is not registered"]),
        ):
            bad = pb.ModelInferRequest()
            bad.CopyFrom(request)
            _shm_params(getattr(bad, side)[0].parameters, *params)
            code, details = await _error(served.ModelInfer(bad))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and all(w in details for w in wants), details

        # Registration errors name the field.
        for bad, field in (
            (
                pb.SystemSharedMemoryRegisterRequest(name="r2", key=shm_key, offset=4000, byte_size=200),
                "offset",
            ),
            (pb.SystemSharedMemoryRegisterRequest(name="r2", key="/no-such-key", byte_size=8), "key"),
            (pb.SystemSharedMemoryRegisterRequest(name="", key=shm_key, byte_size=8), "name"),
        ):
            code, details = await _error(served.SystemSharedMemoryRegister(bad))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details
        code, _ = await _error(
            served.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="r1", key=shm_key, byte_size=8)
            )
        )
        assert code == grpc.StatusCode.ALREADY_EXISTS
    finally:
        await served.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="r1"))
    assert not (await served.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())).regions
    code, _ = await _error(served.ModelInfer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_cuda_shared_memory_is_unimplemented_without_a_gpu_backend(
    served: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    code, details = await _error(
        served.CudaSharedMemoryRegister(
            pb.CudaSharedMemoryRegisterRequest(name="c", raw_handle=b"h", device_id=0, byte_size=8)
        )
    )
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert "CUDA shared memory is not supported on this backend" in details
    # Nothing is ever registered: status lists nothing and unregistering all is a no-op (perf_analyzer does it).
    assert not (await served.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest())).regions
    await served.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest())


async def test_trace_and_log_settings(served: pb_grpc.GRPCInferenceServiceStub) -> None:
    current = await served.TraceSetting(pb.TraceSettingRequest())
    assert list(current.settings["trace_mode"].value) == ["opentelemetry"]
    # No OTLP endpoint in tests: tracing is off, so sampling stays off whatever is asked.
    changed = await served.TraceSetting(
        pb.TraceSettingRequest(settings={"trace_rate": pb.TraceSettingRequest.SettingValue(value=["10"])})
    )
    assert list(changed.settings["trace_rate"].value) == ["10"]
    assert list(changed.settings["trace_level"].value) == ["OFF"]
    code, details = await _error(
        served.TraceSetting(
            pb.TraceSettingRequest(settings={"trace_rate": pb.TraceSettingRequest.SettingValue(value=["x"])})
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("trace_rate")
    code, _ = await _error(served.TraceSetting(pb.TraceSettingRequest(model_name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND

    root = logging.getLogger()
    before = root.level
    try:
        value = pb.LogSettingsRequest.SettingValue
        reply = await served.LogSettings(
            pb.LogSettingsRequest(settings={"log_info": value(bool_param=False)})
        )
        assert not reply.settings["log_info"].bool_param and reply.settings["log_warning"].bool_param
        assert root.level == logging.WARNING
        reply = await served.LogSettings(
            pb.LogSettingsRequest(settings={"log_verbose_level": value(uint32_param=1)})
        )
        assert root.level == logging.DEBUG and reply.settings["log_verbose_level"].uint32_param == 1
        code, details = await _error(
            served.LogSettings(pb.LogSettingsRequest(settings={"log_file": value(string_param="/tmp/x")}))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("log_file")
    finally:
        root.setLevel(before)


async def test_stream_infer_answers_each_request_and_reports_errors_in_band(
    served: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    requests = [_fraud_request(np.full((1, 32), i, np.float32), "1") for i in range(5)]
    for i, r in enumerate(requests):
        r.id = f"s{i}"
    requests[2].model_name = "nope"
    replies = [r async for r in served.ModelStreamInfer(requests)]
    assert sorted(r.infer_response.id for r in replies) == [f"s{i}" for i in range(5)]
    errors = {r.infer_response.id: r.error_message for r in replies if r.error_message}
    assert errors == {"s2": "model 'nope' is not found"}
    # The status a unary call would have ended with travels in the `status_code` parameter.
    (failed,) = (r for r in replies if r.error_message)
    assert failed.infer_response.parameters["status_code"].int64_param == grpc.StatusCode.NOT_FOUND.value[0]
    ok = [r for r in replies if not r.error_message]
    assert all(len(r.infer_response.raw_output_contents[0]) == 4 for r in ok)


async def test_stream_infer_pairs_each_answer_with_its_request_when_many_share_batches(
    served: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    rng = np.random.default_rng(5)
    requests = [_fraud_request(rng.random((1, 32), np.float32), "1") for _ in range(48)]
    for i, r in enumerate(requests):
        r.id = f"m{i}"
    requests[20].inputs[0].shape[:] = [1, 31]  # one bad request among them fails alone, in band
    expected = {r.id: (await served.ModelInfer(r)).raw_output_contents[0] for r in requests if r.id != "m20"}
    replies = {r.infer_response.id: r async for r in served.ModelStreamInfer(requests)}
    assert sorted(replies) == sorted(r.id for r in requests)
    assert replies["m20"].error_message
    code = replies["m20"].infer_response.parameters["status_code"].int64_param
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert {i: r.infer_response.raw_output_contents[0] for i, r in replies.items() if i != "m20"} == expected


async def test_a_streamed_request_naming_a_trace_gets_its_span_there_with_its_queue_span(
    served: pb_grpc.GRPCInferenceServiceStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    from services.inference import batcher as batcher_module
    from services.inference import server as server_module

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(server_module, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(batcher_module, "_tracer", provider.get_tracer("test"))
    good, bad = (
        _fraud_request(np.ones((1, 32), np.float32), "1"),
        _fraud_request(np.ones((1, 32), np.float32)),
    )
    good.id, bad.id, bad.model_name = "good", "bad", "nope"
    for r, trace_id in ((good, "1" * 32), (bad, "2" * 32)):
        r.parameters["traceparent"].string_param = f"00-{trace_id}-{'3' * 16}-01"
    assert len([r async for r in served.ModelStreamInfer([good, bad])]) == 2
    spans = {(s.name, s.context.trace_id) for s in exporter.get_finished_spans()}
    assert {(STREAM_SPAN, int("1" * 32, 16)), (STREAM_SPAN, int("2" * 32, 16))} <= spans
    assert ("inference.queue", int("1" * 32, 16)) in spans
    (failed,) = (s for s in exporter.get_finished_spans() if s.context.trace_id == int("2" * 32, 16))
    assert failed.status.status_code == StatusCode.ERROR


@pytest.mark.parametrize("transport", ["aio", "threaded"])
async def test_a_draining_server_refuses_new_stream_messages_in_band_and_says_it_drains(
    model_repo: Path, transport: str
) -> None:
    server = await create_server(_config(model_repo, transport))
    await server.start()
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
            request = _fraud_request(np.ones((1, 32), np.float32), "1")
            await call.write(request)
            first = await call.read()
            assert not first.error_message
            # SIGTERM's drain: NOT_SERVING while still answering (2 s here), then the grace period.
            stopping = asyncio.create_task(server.stop(2.0, 0.5))
            await asyncio.sleep(0.1)
            request.id = "after-sigterm"
            await call.write(request)
            refused = await call.read()
            assert refused.infer_response.id == "after-sigterm"
            assert refused.error_message.startswith("the inference server is draining")
            parameters = refused.infer_response.parameters
            assert parameters["status_code"].int64_param == grpc.StatusCode.UNAVAILABLE.value[0]
            assert parameters["draining"].bool_param
            # A unary call is still answered while the server drains (balancers move away meanwhile).
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ModelInfer(request)).outputs
            call.cancel()
    finally:
        await (stopping or server.stop(0, 0.5))


async def test_statistics_count_requests_and_batches(served: pb_grpc.GRPCInferenceServiceStub) -> None:
    before = (
        await served.ModelStatistics(pb.ModelStatisticsRequest(name="double", version="1"))
    ).model_stats[0]
    x = np.ones((2, 2), np.float32)
    request = pb.ModelInferRequest(model_name="double", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    for _ in range(3):
        await served.ModelInfer(request)
    stats = (await served.ModelStatistics(pb.ModelStatisticsRequest(name="double"))).model_stats
    assert [(s.name, s.version) for s in stats] == [("double", "1")]
    s = stats[0]
    assert s.inference_stats.success.count == before.inference_stats.success.count + 3
    assert s.execution_count == before.execution_count + 3
    assert s.inference_stats.queue.count >= 3 and s.inference_stats.compute_infer.ns > 0
    assert s.last_inference > 0
    every = (await served.ModelStatistics(pb.ModelStatisticsRequest())).model_stats
    assert {(m.name, m.version) for m in every} >= {("fraud", "1"), ("fraud", "2"), ("types", "1")}
    code, _ = await _error(served.ModelStatistics(pb.ModelStatisticsRequest(name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_repository_index_load_and_unload(fresh_repo: Path) -> None:
    async with _serving(_config(fresh_repo, startup_models=("double", "broken"))) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        index = {m.name: m for m in (await stub.RepositoryIndex(pb.RepositoryIndexRequest())).models}
        assert index["double"].state == "READY" and index["double"].version == "1"
        assert index["broken"].state == "UNAVAILABLE" and "ONNX Runtime cannot load" in index["broken"].reason
        assert index["fraud"].state == ""  # on disk, not loaded
        ready = [m.name for m in (await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models]
        assert ready == ["double"]
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="fraud"))
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="fraud", version="2"))).ready
        config = {"name": "fraud", "max_batch_size": 256, "version_policy": {"specific": {"versions": [1]}},
                  "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [32]}],
                  "output": [{"name": "fraud_probability", "data_type": "TYPE_FP32", "dims": [1]}]}  # fmt: skip
        await stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(
                model_name="fraud",
                parameters={"config": pb.ModelRepositoryParameter(string_param=json.dumps(config))},
            )
        )
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="fraud"))
        assert list(meta.versions) == ["1"]
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="fraud"))
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="fraud"))).ready
        code, details = await _error(stub.ModelInfer(_GOOD))
        assert code == grpc.StatusCode.NOT_FOUND and "model 'fraud' is not ready" in details
        code, details = await _error(
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ghost"))
        )
        assert code == grpc.StatusCode.NOT_FOUND and "'ghost'" in details
        code, details = await _error(
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "failed to load model 'broken'" in details
        code, details = await _error(
            stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(
                    model_name="double",
                    parameters={"config": pb.ModelRepositoryParameter(string_param="{nope")},
                )
            )
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "parameter 'config'" in details
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="double"))).ready


def _slow_backend(delay: float) -> HookedBackend:
    """ONNX Runtime, each run after the first (the warm-up) `delay` seconds longer."""
    runs = itertools.count()

    def _sleep(_inputs: Mapping[str, np.ndarray]) -> None:
        if next(runs):
            time.sleep(delay)

    return HookedBackend(_sleep)


@pytest.mark.parametrize("transport", ["aio", "threaded"])
async def test_full_queue_is_resource_exhausted_and_timeouts_are_deadline_exceeded(
    model_repo: Path, transport: str
) -> None:
    config = _config(model_repo, transport, startup_models=("double",), max_queue_size=2)
    async with _serving(config, onnxruntime=_slow_backend(0.2)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        x = np.ones((1, 1), np.float32)
        request = pb.ModelInferRequest(model_name="double", raw_input_contents=[x.tobytes()])
        request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
        calls = [stub.ModelInfer(request) for _ in range(6)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in results]
        assert codes.count("OK") >= 2  # at least the two the queue holds
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        shed = next(r for r in results if isinstance(r, grpc.aio.AioRpcError))
        assert "model 'double' version 1: queue is full (2 requests waiting)" in (shed.details() or "")
        # A request whose timeout (µs, Triton's `timeout` parameter) passes while queued.
        blocker = asyncio.ensure_future(stub.ModelInfer(request))
        await asyncio.sleep(0.05)
        late = _with(request, lambda r: setattr(r.parameters["timeout"], "int64_param", 20_000))
        code, details = await _error(stub.ModelInfer(late))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "timed out" in details
        await blocker
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live


async def test_invalid_requests_count_as_failures_of_their_model_version(
    served: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    from prometheus_client import REGISTRY

    def _failed() -> float:
        value = REGISTRY.get_sample_value(
            "infergrid_inference_failures_total", {"model": "fraud", "version": "2", "reason": "invalid"}
        )
        return value or 0.0

    before = _failed()
    bad = _with(_GOOD, lambda r: setattr(r.inputs[0], "datatype", "INT8"))
    await _error(served.ModelInfer(bad))
    assert _failed() == before + 1
