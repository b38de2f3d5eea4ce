"""The tritonclient side of the Open Inference Protocol wire tests, run as a subprocess.

tritonclient's generated modules register the same `inference.*` symbols as our
`inference` package (under another .proto file name), so the two cannot share a
process. test_oip_wire.py runs this script with one command and a work folder:

  build-request DIR   build a ModelInferRequest with tritonclient's own classes
                      into DIR/request.bin
  check-request DIR   parse DIR/request_ours.bin (re-serialized by our classes)
                      with tritonclient and check it equals DIR/request.bin
  check-messages DIR  parse every message listed in DIR/manifest.json (built by
                      our classes) with tritonclient and check its values
  descriptors DIR     write tritonclient's file descriptors and the RPC paths its
                      GRPCInferenceServiceStub calls into DIR
  live ADDRESS        drive a server at ADDRESS with tritonclient's
                      InferenceServerClient

A failed check raises, which exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import oip_cases as cases
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype


def _inputs() -> list[grpcclient.InferInput]:
    inputs = []
    for name, datatype, array in cases.REQUEST_INPUTS:
        infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def _requested_outputs() -> list[grpcclient.InferRequestedOutput]:
    return [
        grpcclient.InferRequestedOutput(name, class_count=count) for name, count in cases.REQUESTED_OUTPUTS
    ]


def build_request(work: Path) -> None:
    """Builds the request exactly as InferenceServerClient.infer() does."""
    request = _get_inference_request(
        model_name=cases.MODEL_NAME,
        inputs=_inputs(),
        model_version=cases.MODEL_VERSION,
        request_id=cases.REQUEST_ID,
        outputs=_requested_outputs(),
        sequence_id=cases.SEQUENCE_ID,
        sequence_start=cases.SEQUENCE_START,
        sequence_end=cases.SEQUENCE_END,
        priority=cases.PRIORITY,
        timeout=cases.TIMEOUT_US,
        parameters=cases.USER_PARAMETERS,
    )
    key, value = cases.DOUBLE_PARAMETER
    request.parameters[key].double_param = value
    (work / "request.bin").write_bytes(request.SerializeToString())


def check_request(work: Path) -> None:
    """Checks our re-serialized request equals tritonclient's original, field for field."""
    original = service_pb2.ModelInferRequest.FromString((work / "request.bin").read_bytes())
    ours = service_pb2.ModelInferRequest.FromString((work / "request_ours.bin").read_bytes())
    assert ours == original, f"differs:\n{ours}\n--- original ---\n{original}"
    assert ours.id == cases.REQUEST_ID
    assert [t.name for t in ours.inputs] == [name for name, _, _ in cases.REQUEST_INPUTS]
    text_index = [t.name for t in ours.inputs].index("text")
    decoded = deserialize_bytes_tensor(ours.raw_input_contents[text_index])
    assert list(decoded) == list(cases.REQUEST_INPUTS[text_index][2].reshape(-1))


def _check_infer_response(response: service_pb2.ModelInferResponse) -> None:
    result = grpcclient.InferResult(response)
    for name, datatype, expected in cases.RESPONSE_OUTPUTS:
        actual = result.as_numpy(name)
        assert actual is not None, f"as_numpy({name!r}) found no output"
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        if datatype not in ("BYTES", "BF16"):
            assert actual.dtype == triton_to_np_dtype(datatype), (name, actual.dtype)
        np.testing.assert_array_equal(actual, expected, err_msg=name)
        assert result.get_output(name).datatype == datatype
    got = result.get_response()
    assert (got.model_name, got.model_version, got.id) == (
        cases.MODEL_NAME,
        cases.MODEL_VERSION,
        cases.REQUEST_ID,
    )
    assert got.parameters["sequence_id"].int64_param == cases.SEQUENCE_ID
    assert got.parameters["triton_final_response"].bool_param is True


def _check_typed_stream_response(response: service_pb2.ModelStreamInferResponse) -> None:
    assert response.error_message == ""
    outputs = response.infer_response.outputs
    assert [(o.name, o.datatype) for o in outputs] == [(n, d) for n, d, _, _ in cases.TYPED_OUTPUTS]
    for output, (name, _, field, values) in zip(outputs, cases.TYPED_OUTPUTS, strict=True):
        assert tuple(getattr(output.contents, field)) == values, (name, field)
        assert list(output.shape) == [len(values)]
    assert not response.infer_response.raw_output_contents


def _check_error_stream_response(response: service_pb2.ModelStreamInferResponse) -> None:
    assert response.error_message == cases.STREAM_ERROR
    assert not response.HasField("infer_response")


def _check_model_metadata(metadata: service_pb2.ModelMetadataResponse) -> None:
    assert metadata.name == cases.MODEL_NAME
    assert tuple(metadata.versions) == cases.VERSIONS
    assert metadata.platform == cases.PLATFORM
    assert [(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs] == list(cases.METADATA_INPUTS)
    assert [(t.name, t.datatype, tuple(t.shape)) for t in metadata.outputs] == list(cases.METADATA_OUTPUTS)


def _check_model_config(response: service_pb2.ModelConfigResponse) -> None:
    mc = model_config_pb2
    config = response.config
    assert (config.name, config.platform, config.backend) == (cases.MODEL_NAME, cases.PLATFORM, cases.BACKEND)
    assert config.max_batch_size == cases.MAX_BATCH_SIZE
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 2
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("dense", mc.TYPE_FP32, [3]),
        ("ids", mc.TYPE_INT64, [-1]),
        ("text", mc.TYPE_STRING, [1]),
    ]
    assert config.input[1].allow_ragged_batch is True
    assert config.input[2].optional is True
    assert config.input[2].HasField("reshape") and list(config.input[2].reshape.shape) == []
    assert [(o.name, o.data_type, list(o.dims), o.label_filename) for o in config.output] == [
        ("score", mc.TYPE_FP32, [1], ""),
        ("label", mc.TYPE_STRING, [1], "labels.txt"),
    ]
    assert [(g.name, g.kind, g.count, list(g.gpus)) for g in config.instance_group] == [
        ("fraud_cpu", mc.ModelInstanceGroup.KIND_CPU, 2, []),
        ("fraud_gpu", mc.ModelInstanceGroup.KIND_GPU, 1, [0]),
    ]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    batching = config.dynamic_batching
    assert tuple(batching.preferred_batch_size) == cases.PREFERRED_BATCH_SIZES
    assert batching.max_queue_delay_microseconds == cases.MAX_QUEUE_DELAY_US
    assert batching.preserve_ordering is True
    assert (batching.priority_levels, batching.default_priority_level) == (2, 1)
    assert batching.default_queue_policy.timeout_action == mc.ModelQueuePolicy.DELAY
    assert batching.default_queue_policy.default_timeout_microseconds == 2000
    assert batching.default_queue_policy.max_queue_size == 128
    assert batching.priority_queue_policy[1].max_queue_size == 64
    assert batching.priority_queue_policy[1].allow_timeout_override is True
    accelerator = config.optimization.execution_accelerators.cpu_execution_accelerator[0]
    assert accelerator.name == "openvino" and dict(accelerator.parameters) == {"precision": "FP32"}
    assert config.optimization.input_pinned_memory.enable is True
    assert config.parameters["intra_op_thread_count"].string_value == "4"
    warmup = config.model_warmup[0]
    assert (warmup.name, warmup.batch_size, warmup.count) == ("zeros", 1, 2)
    warm_input = warmup.inputs["dense"]
    assert (warm_input.data_type, list(warm_input.dims)) == (mc.TYPE_FP32, [3])
    assert warm_input.WhichOneof("input_data_type") == "zero_data"
    assert config.HasField("model_transaction_policy") and config.model_transaction_policy.decoupled is False
    assert config.response_cache.enable is True
    assert config.default_model_filename == "model.onnx"
    assert dict(config.metric_tags) == {"team": "risk"}


def _check_model_statistics(response: service_pb2.ModelStatisticsResponse) -> None:
    (stats,) = response.model_stats
    assert (stats.name, stats.version) == (cases.MODEL_NAME, cases.MODEL_VERSION)
    assert (stats.last_inference, stats.inference_count, stats.execution_count) == (
        1_700_000_000_000,
        120,
        15,
    )
    inference = stats.inference_stats
    assert (inference.success.count, inference.success.ns) == (100, 5_000_000)
    assert (inference.fail.count, inference.queue.ns, inference.compute_infer.ns) == (2, 1_000_000, 3_000_000)
    assert (inference.cache_hit.count, inference.cache_miss.count) == (40, 60)
    (batch,) = stats.batch_stats
    assert (batch.batch_size, batch.compute_infer.count, batch.compute_infer.ns) == (8, 15, 3_000_000)
    (memory,) = stats.memory_usage
    assert (memory.type, memory.id, memory.byte_size) == ("CPU", 0, 1 << 20)


def _check_repository_index(response: service_pb2.RepositoryIndexResponse) -> None:
    assert [(m.name, m.version, m.state, m.reason) for m in response.models] == [
        ("fraud", "1", "UNAVAILABLE", "unloaded"),
        ("fraud", "2", "READY", ""),
    ]


def _check_server_metadata(response: service_pb2.ServerMetadataResponse) -> None:
    assert (response.name, response.version) == ("infergrid", "0.1.0")
    assert tuple(response.extensions) == cases.SERVER_EXTENSIONS


_MESSAGE_CHECKS = {
    "infer_response": _check_infer_response,
    "stream_typed": _check_typed_stream_response,
    "stream_error": _check_error_stream_response,
    "model_metadata": _check_model_metadata,
    "model_config": _check_model_config,
    "model_statistics": _check_model_statistics,
    "repository_index": _check_repository_index,
    "server_metadata": _check_server_metadata,
}


def check_messages(work: Path) -> None:
    """Parses each message our side wrote and checks it generically and by value."""
    manifest = json.loads((work / "manifest.json").read_text())
    assert sorted(manifest) == sorted(_MESSAGE_CHECKS), sorted(manifest)
    for key, entry in manifest.items():
        message_class = getattr(service_pb2, entry["type"])
        message = message_class.FromString((work / f"{key}.bin").read_bytes())
        as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
        # Same field names and values as ours means the same numbers and types.
        assert as_dict == entry["dict"], f"{key}:\n{as_dict}\n--- ours ---\n{entry['dict']}"
        _MESSAGE_CHECKS[key](message)
        print(f"ok {key}")


class _RecordingChannel:
    """Stands in for a grpc.Channel and records what the stub registers."""

    def __init__(self) -> None:
        self.methods: dict[str, dict[str, str]] = {}

    def _recorder(self, kind: str) -> Callable[..., object]:
        def register(path: str, response_deserializer: Any = None, **_: object) -> object:
            self.methods[path] = {
                "kind": kind,
                "response": response_deserializer.__self__.DESCRIPTOR.full_name,
            }
            return object()

        return register

    def __getattr__(self, kind: str) -> Callable[..., object]:
        if kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._recorder(kind)
        raise AttributeError(kind)


def descriptors(work: Path) -> None:
    """Writes tritonclient's FileDescriptorProtos and its stub's RPC paths."""
    channel = _RecordingChannel()
    service_pb2_grpc.GRPCInferenceServiceStub(channel)
    dump = {
        "stub_methods": channel.methods,
        "files": {
            module.DESCRIPTOR.name: base64.b64encode(module.DESCRIPTOR.serialized_pb).decode()
            for module in (service_pb2, model_config_pb2)
        },
    }
    (work / "tritonclient_descriptors.json").write_text(json.dumps(dump, indent=1))


def live(address: str) -> None:
    """Calls every RPC a Triton client uses against a running server."""
    client = grpcclient.InferenceServerClient(address)
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    assert client.is_model_ready(cases.MODEL_NAME, cases.MODEL_VERSION) is True
    assert client.is_model_ready("missing") is False
    _check_server_metadata(client.get_server_metadata())
    _check_model_metadata(client.get_model_metadata(cases.MODEL_NAME, cases.MODEL_VERSION))
    _check_model_config(client.get_model_config(cases.MODEL_NAME))
    _check_model_statistics(client.get_inference_statistics(cases.MODEL_NAME))
    _check_repository_index(client.get_model_repository_index())
    client.load_model(cases.MODEL_NAME, config='{"max_batch_size": 8}')
    client.unload_model(cases.MODEL_NAME)

    # The test server echoes each requested input back as an output of the same name.
    echoed = ("dense", "text", "half", "bf16")
    result = client.infer(
        cases.MODEL_NAME,
        _inputs(),
        model_version=cases.MODEL_VERSION,
        outputs=[grpcclient.InferRequestedOutput(name) for name in echoed],
        request_id=cases.REQUEST_ID,
        parameters=cases.USER_PARAMETERS,
    )
    assert result.get_response().id == cases.REQUEST_ID
    assert [o.name for o in result.get_response().outputs] == list(echoed)
    by_name = {name: array for name, _, array in cases.REQUEST_INPUTS}
    for name in echoed:
        np.testing.assert_array_equal(result.as_numpy(name), by_name[name], err_msg=name)

    received: list[tuple[object, object]] = []
    done = threading.Event()

    def on_response(result: object, error: object) -> None:
        received.append((result, error))
        if len(received) == 2:
            done.set()

    client.start_stream(callback=on_response)
    client.async_stream_infer(cases.MODEL_NAME, _inputs(), request_id="stream-1")
    client.async_stream_infer("missing", _inputs(), request_id="stream-2")
    assert done.wait(timeout=20), f"stream answered {len(received)} of 2"
    client.stop_stream()
    (ok_result, ok_error), (bad_result, bad_error) = received
    assert ok_error is None and bad_result is None
    assert ok_result.get_response().id == "stream-1"
    np.testing.assert_array_equal(ok_result.as_numpy("ids"), by_name["ids"])
    assert cases.STREAM_ERROR in str(bad_error)
    client.close()
    print("ok live")


def main(argv: list[str]) -> int:
    command, target = argv
    if command == "live":
        live(target)
        return 0
    commands = {
        "build-request": build_request,
        "check-request": check_request,
        "check-messages": check_messages,
        "descriptors": descriptors,
    }
    commands[command](Path(target))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
