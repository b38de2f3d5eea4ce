"""Wire compatibility of our `inference` protos with the unmodified tritonclient package.

tritonclient's generated modules define the same `inference.*` symbols as ours,
so its side of every exchange runs in a subprocess (triton_side.py); the two
sides meet only as serialized bytes, exactly as on the wire.
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import oip_cases as cases  # a sibling module: pytest puts this folder on sys.path
import pytest
from google.protobuf import descriptor_pb2, json_format

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from inference import model_config_pb2 as mc

TRITON_SIDE = Path(__file__).resolve().parent / "triton_side.py"

# Little-endian numpy dtypes of the fixed-size protocol datatypes.
_NUMPY_DTYPES = {
    "BOOL": "?",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


def _run_triton_side(command: str, target: str, timeout: float = 60) -> str:
    """Runs one triton_side.py command and fails the test with its stderr if it fails."""
    proc = subprocess.run(
        [sys.executable, str(TRITON_SIDE), command, target],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"tritonclient side `{command}` failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _encode_raw(datatype: str, array: np.ndarray) -> bytes:
    """Encodes a tensor as raw_*_contents: row-major, little-endian, BYTES length-prefixed."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    if datatype == "BF16":
        upper = np.ascontiguousarray(array, dtype="<f4").view("<u4") >> 16
        return upper.astype("<u2").tobytes()
    return np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[datatype]).tobytes()


def _decode_raw(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """Decodes raw_*_contents written by a client; the inverse of _encode_raw."""
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4 : offset + 4 + length])
            offset += 4 + length
        decoded = np.empty(len(items), dtype=np.object_)
        decoded[:] = items
        return decoded.reshape(shape)
    if datatype == "BF16":
        return (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4").reshape(shape)
    return np.frombuffer(raw, _NUMPY_DTYPES[datatype]).reshape(shape)


def _parameters(params: Any) -> dict[str, tuple[str, object]]:
    """Flattens a map<string, InferParameter> into name -> (oneof field, value)."""
    result = {}
    for name, param in params.items():
        which = param.WhichOneof("parameter_choice")
        result[name] = (which, getattr(param, which))
    return result


# --- messages our side builds (also served by the live test server) -----------


def _infer_response() -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=cases.MODEL_NAME, model_version=cases.MODEL_VERSION, id=cases.REQUEST_ID
    )
    response.parameters["sequence_id"].int64_param = cases.SEQUENCE_ID
    response.parameters["triton_final_response"].bool_param = True
    for name, datatype, array in cases.RESPONSE_OUTPUTS:
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(_encode_raw(datatype, array))
    return response


def _typed_stream_response() -> pb.ModelStreamInferResponse:
    response = pb.ModelInferResponse(model_name=cases.MODEL_NAME, id="typed")
    for name, datatype, field, values in cases.TYPED_OUTPUTS:
        output = response.outputs.add(name=name, datatype=datatype, shape=[len(values)])
        getattr(output.contents, field).extend(values)
    return pb.ModelStreamInferResponse(infer_response=response)


def _model_metadata() -> pb.ModelMetadataResponse:
    metadata = pb.ModelMetadataResponse(
        name=cases.MODEL_NAME, versions=cases.VERSIONS, platform=cases.PLATFORM
    )
    for name, datatype, shape in cases.METADATA_INPUTS:
        metadata.inputs.add(name=name, datatype=datatype, shape=shape)
    for name, datatype, shape in cases.METADATA_OUTPUTS:
        metadata.outputs.add(name=name, datatype=datatype, shape=shape)
    return metadata


def _model_config() -> pb.ModelConfigResponse:
    config = mc.ModelConfig(
        name=cases.MODEL_NAME,
        platform=cases.PLATFORM,
        backend=cases.BACKEND,
        max_batch_size=cases.MAX_BATCH_SIZE,
        default_model_filename="model.onnx",
    )
    config.version_policy.latest.num_versions = 2
    config.input.add(name="dense", data_type=mc.TYPE_FP32, dims=[3])
    config.input.add(name="ids", data_type=mc.TYPE_INT64, dims=[-1], allow_ragged_batch=True)
    text = config.input.add(name="text", data_type=mc.TYPE_STRING, dims=[1], optional=True)
    text.reshape.SetInParent()  # `reshape: { shape: [] }`, i.e. a scalar per batch element
    config.output.add(name="score", data_type=mc.TYPE_FP32, dims=[1])
    config.output.add(name="label", data_type=mc.TYPE_STRING, dims=[1], label_filename="labels.txt")
    config.instance_group.add(name="fraud_cpu", kind=mc.ModelInstanceGroup.KIND_CPU, count=2)
    config.instance_group.add(name="fraud_gpu", kind=mc.ModelInstanceGroup.KIND_GPU, count=1, gpus=[0])
    batching = config.dynamic_batching
    batching.preferred_batch_size.extend(cases.PREFERRED_BATCH_SIZES)
    batching.max_queue_delay_microseconds = cases.MAX_QUEUE_DELAY_US
    batching.preserve_ordering = True
    batching.priority_levels = 2
    batching.default_priority_level = 1
    batching.default_queue_policy.timeout_action = mc.ModelQueuePolicy.DELAY
    batching.default_queue_policy.default_timeout_microseconds = 2000
    batching.default_queue_policy.max_queue_size = 128
    batching.priority_queue_policy[1].max_queue_size = 64
    batching.priority_queue_policy[1].allow_timeout_override = True
    config.optimization.execution_accelerators.cpu_execution_accelerator.add(
        name="openvino", parameters={"precision": "FP32"}
    )
    config.optimization.input_pinned_memory.enable = True
    config.parameters["intra_op_thread_count"].string_value = "4"
    warmup = config.model_warmup.add(name="zeros", batch_size=1, count=2)
    warmup.inputs["dense"].data_type = mc.TYPE_FP32
    warmup.inputs["dense"].dims.append(3)
    warmup.inputs["dense"].zero_data = True
    config.model_transaction_policy.SetInParent()  # decoupled: false, present as perf_analyzer expects
    config.response_cache.enable = True
    config.metric_tags["team"] = "risk"
    return pb.ModelConfigResponse(config=config)


def _model_statistics() -> pb.ModelStatisticsResponse:
    stats = pb.ModelStatistics(
        name=cases.MODEL_NAME,
        version=cases.MODEL_VERSION,
        last_inference=1_700_000_000_000,
        inference_count=120,
        execution_count=15,
    )
    inference = stats.inference_stats
    inference.success.CopyFrom(pb.StatisticDuration(count=100, ns=5_000_000))
    inference.fail.CopyFrom(pb.StatisticDuration(count=2, ns=10_000))
    inference.queue.CopyFrom(pb.StatisticDuration(count=100, ns=1_000_000))
    inference.compute_infer.CopyFrom(pb.StatisticDuration(count=100, ns=3_000_000))
    inference.cache_hit.count = 40
    inference.cache_miss.count = 60
    stats.batch_stats.add(batch_size=8, compute_infer=pb.StatisticDuration(count=15, ns=3_000_000))
    stats.memory_usage.add(type="CPU", id=0, byte_size=1 << 20)
    return pb.ModelStatisticsResponse(model_stats=[stats])


def _repository_index() -> pb.RepositoryIndexResponse:
    index = pb.RepositoryIndexResponse()
    index.models.add(name="fraud", version="1", state="UNAVAILABLE", reason="unloaded")
    index.models.add(name="fraud", version="2", state="READY")
    return index


def _server_metadata() -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name="infergrid", version="0.1.0", extensions=cases.SERVER_EXTENSIONS)


# --- (1) request: tritonclient -> ours -> tritonclient --------------------------


def test_infer_request_from_tritonclient_round_trips_through_ours(tmp_path: Path) -> None:
    _run_triton_side("build-request", str(tmp_path))
    request = pb.ModelInferRequest.FromString((tmp_path / "request.bin").read_bytes())

    assert (request.model_name, request.model_version, request.id) == (
        cases.MODEL_NAME,
        cases.MODEL_VERSION,
        cases.REQUEST_ID,
    )
    assert _parameters(request.parameters) == cases.EXPECTED_REQUEST_PARAMETERS
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        (name, datatype, list(array.shape)) for name, datatype, array in cases.REQUEST_INPUTS
    ]
    # tritonclient always sends raw contents, one entry per input in input order.
    assert not any(t.HasField("contents") or t.parameters for t in request.inputs)
    assert len(request.raw_input_contents) == len(cases.REQUEST_INPUTS)
    for tensor, raw, (name, datatype, expected) in zip(
        request.inputs, request.raw_input_contents, cases.REQUEST_INPUTS, strict=True
    ):
        assert raw == _encode_raw(datatype, expected), name
        np.testing.assert_array_equal(_decode_raw(tensor.datatype, list(tensor.shape), raw), expected, name)
    assert [(o.name, _parameters(o.parameters)) for o in request.outputs] == [
        ("score", {}),
        ("label", {"classification": ("int64_param", 3)}),
    ]

    # Drop anything our schema did not understand, so a field we lack or misnumber
    # cannot survive the trip as an unknown field.
    request.DiscardUnknownFields()
    (tmp_path / "request_ours.bin").write_bytes(request.SerializeToString())
    _run_triton_side("check-request", str(tmp_path))


def test_decode_raw_rejects_a_wrong_layout() -> None:
    """The request test's own decoder must notice byte-order or type mistakes."""
    expected = cases.REQUEST_INPUTS[1][2]
    big_endian = np.ascontiguousarray(expected, dtype=">i8").tobytes()
    assert not np.array_equal(_decode_raw("INT64", list(expected.shape), big_endian), expected)
    assert _decode_raw("BYTES", [2], b"\x01\x00\x00\x00a\x00\x00\x00\x00").tolist() == [b"a", b""]


# --- (2) responses: ours -> tritonclient ----------------------------------------


def test_messages_built_by_ours_parse_in_tritonclient(tmp_path: Path) -> None:
    messages = {
        "infer_response": _infer_response(),
        "stream_typed": _typed_stream_response(),
        "stream_error": pb.ModelStreamInferResponse(error_message=cases.STREAM_ERROR),
        "model_metadata": _model_metadata(),
        "model_config": _model_config(),
        "model_statistics": _model_statistics(),
        "repository_index": _repository_index(),
        "server_metadata": _server_metadata(),
    }
    manifest = {}
    for key, message in messages.items():
        (tmp_path / f"{key}.bin").write_bytes(message.SerializeToString())
        manifest[key] = {
            "type": message.DESCRIPTOR.name,
            "dict": json_format.MessageToDict(message, preserving_proto_field_name=True),
        }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    output = _run_triton_side("check-messages", str(tmp_path))
    assert output.splitlines() == [f"ok {key}" for key in messages], output


# --- (3) descriptors: every RPC and message tritonclient knows ------------------


class _RecordingChannel:
    """Stands in for a grpc.Channel and records the methods a stub registers."""

    def __init__(self) -> None:
        self.methods: dict[str, dict[str, str]] = {}

    def __getattr__(self, kind: str) -> Any:
        if kind not in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            raise AttributeError(kind)

        def register(path: str, response_deserializer: Any = None, **_: object) -> object:
            self.methods[path] = {
                "kind": kind,
                "response": response_deserializer.__self__.DESCRIPTOR.full_name,
            }
            return object()

        return register


def _field_signature(field: descriptor_pb2.FieldDescriptorProto, message: Any) -> tuple[object, ...]:
    oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
    return (field.name, field.type, field.label, field.type_name, oneof, field.proto3_optional)


def _index(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, Any]:
    """Maps every message, enum and service full name to its descriptor proto."""
    found: dict[str, Any] = {}

    def walk(prefix: str, messages: Any, enums: Any) -> None:
        for enum in enums:
            found[f"{prefix}.{enum.name}"] = enum
        for message in messages:
            name = f"{prefix}.{message.name}"
            found[name] = message
            walk(name, message.nested_type, message.enum_type)

    for file in files:
        walk(f".{file.package}", file.message_type, file.enum_type)
        for service in file.service:
            found[f".{file.package}.{service.name}"] = service
    return found


@pytest.fixture(scope="module")
def tritonclient_descriptors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("descriptors")
    _run_triton_side("descriptors", str(work))
    dump = json.loads((work / "tritonclient_descriptors.json").read_text())
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(b)) for b in dump["files"].values()
    ]
    return {"stub_methods": dump["stub_methods"], "index": _index(files)}


def _our_index() -> dict[str, Any]:
    files = []
    for module in (pb, mc):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    return _index(files)


def test_our_stub_registers_every_method_tritonclients_stub_uses(tritonclient_descriptors: dict) -> None:
    channel = _RecordingChannel()
    pb_grpc.GRPCInferenceServiceStub(channel)
    theirs = tritonclient_descriptors["stub_methods"]
    assert "/inference.GRPCInferenceService/ModelInfer" in theirs
    assert theirs["/inference.GRPCInferenceService/ModelStreamInfer"]["kind"] == "stream_stream"
    missing = {path: kind for path, kind in theirs.items() if channel.methods.get(path) != kind}
    assert not missing, f"ours registers differently: {missing}"


def test_service_methods_match_tritonclient(tritonclient_descriptors: dict) -> None:
    theirs = tritonclient_descriptors["index"][".inference.GRPCInferenceService"]
    ours = _our_index()[".inference.GRPCInferenceService"]
    our_methods = {m.name: m for m in ours.method}
    for method in theirs.method:
        assert method.name in our_methods, method.name
        mine = our_methods[method.name]
        assert (mine.input_type, mine.output_type, mine.client_streaming, mine.server_streaming) == (
            method.input_type,
            method.output_type,
            method.client_streaming,
            method.server_streaming,
        ), method.name
    assert (
        our_methods["ModelStreamInfer"].client_streaming and our_methods["ModelStreamInfer"].server_streaming
    )


def test_every_tritonclient_message_and_enum_matches_ours(tritonclient_descriptors: dict) -> None:
    theirs = tritonclient_descriptors["index"]
    ours = _our_index()
    assert ".inference.ModelConfig" in theirs and ".inference.DataType" in theirs
    mismatches = []
    for name, their in theirs.items():
        mine = ours.get(name)
        if mine is None:
            mismatches.append(f"{name}: missing")
        elif isinstance(their, descriptor_pb2.EnumDescriptorProto):
            their_values = {v.number: v.name for v in their.value}
            my_values = {v.number: v.name for v in mine.value}
            if {n: my_values.get(n) for n in their_values} != their_values:
                mismatches.append(f"{name}: {my_values} != {their_values}")
        elif isinstance(their, descriptor_pb2.DescriptorProto):
            if mine.options.map_entry != their.options.map_entry:
                mismatches.append(f"{name}: map_entry differs")
            my_fields = {f.number: _field_signature(f, mine) for f in mine.field}
            for field in their.field:
                if my_fields.get(field.number) != _field_signature(field, their):
                    mismatches.append(f"{name} #{field.number}: {my_fields.get(field.number)} != ours")
    assert not mismatches, "\n".join(mismatches)


def test_data_type_enum_numbers_are_exact() -> None:
    assert dict(mc.DataType.items()) == {
        "TYPE_INVALID": 0,
        "TYPE_BOOL": 1,
        "TYPE_UINT8": 2,
        "TYPE_UINT16": 3,
        "TYPE_UINT32": 4,
        "TYPE_UINT64": 5,
        "TYPE_INT8": 6,
        "TYPE_INT16": 7,
        "TYPE_INT32": 8,
        "TYPE_INT64": 9,
        "TYPE_FP16": 10,
        "TYPE_FP32": 11,
        "TYPE_FP64": 12,
        "TYPE_STRING": 13,
        "TYPE_BF16": 14,
    }


# --- (4) live: tritonclient's InferenceServerClient against a server built on ours


class _EchoServicer(pb_grpc.GRPCInferenceServiceServicer):
    """A stand-in inference server: fixed metadata, ModelInfer echoes inputs as outputs.

    Method names are the gRPC method names, hence the N802 exemptions.
    """

    def __init__(self) -> None:
        self.repository_calls: list[tuple[str, str, dict[str, tuple[str, object]]]] = []

    def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        return pb.ModelReadyResponse(ready=request.name == cases.MODEL_NAME)

    def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:  # noqa: N802
        return _server_metadata()

    def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:  # noqa: N802
        return _model_metadata()

    def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:  # noqa: N802
        return _model_config()

    def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:  # noqa: N802
        return _model_statistics()

    def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:  # noqa: N802
        return _repository_index()

    def RepositoryModelLoad(  # noqa: N802
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        params = {k: (v.WhichOneof("parameter_choice"), getattr(v, v.WhichOneof("parameter_choice")))
                  for k, v in request.parameters.items()}  # fmt: skip
        self.repository_calls.append(("load", request.model_name, params))
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(  # noqa: N802
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        self.repository_calls.append(("unload", request.model_name, {}))
        return pb.RepositoryModelUnloadResponse()

    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        return self._echo(request)

    def ModelStreamInfer(  # noqa: N802
        self, request_iterator: Iterator[pb.ModelInferRequest], context: Any
    ) -> Iterator[pb.ModelStreamInferResponse]:
        for request in request_iterator:
            if request.model_name != cases.MODEL_NAME:
                yield pb.ModelStreamInferResponse(error_message=cases.STREAM_ERROR)
            else:
                yield pb.ModelStreamInferResponse(infer_response=self._echo(request))

    @staticmethod
    def _echo(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        by_name = {
            t.name: (t, raw) for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        wanted = [o.name for o in request.outputs] or list(by_name)
        for name in wanted:
            tensor, raw = by_name[name]
            response.outputs.add(name=name, datatype=tensor.datatype, shape=tensor.shape)
            response.raw_output_contents.append(raw)
        return response


def test_tritonclient_drives_a_server_built_on_our_protos() -> None:
    servicer = _EchoServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        output = _run_triton_side("live", f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)
    assert "ok live" in output
    assert servicer.repository_calls == [
        ("load", cases.MODEL_NAME, {"config": ("string_param", '{"max_batch_size": 8}')}),
        ("unload", cases.MODEL_NAME, {}),
    ]
