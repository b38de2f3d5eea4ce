"""The inference server: the Open Inference Protocol (KServe v2) gRPC API, and the HTTP/JSON API beside it.

The servicer only translates between `inference.*` messages and the transport-free data plane
(dataplane.py), which the HTTP front door (http_server.py) calls too; typed errors raised below
become gRPC statuses in the shared interceptor.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from google.protobuf import json_format
from opentelemetry import propagate, trace

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from libs.config import ConfigError
from libs.errors import ServiceError, Status
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry, tracer
from services.inference.backends import ModelBackend, create_backends
from services.inference.codec import CONTENTS_FIELD, InferRequest, InputTensor, RequestedOutput, tensor_bytes
from services.inference.config import InferenceConfig, check_repository
from services.inference.control import ControlGate
from services.inference.dataplane import (
    DRAINING,
    EXTENSIONS,
    SERVER_NAME,
    SERVER_VERSION,
    DataPlane,
    InferResult,
    statistics_json,
)
from services.inference.errors import InvalidInput, NotSupported
from services.inference.http_server import HttpFrontDoor
from services.inference.repository import ModelRepository, ServingVersion
from services.inference.runtime_settings import LogSettings, TraceSettings
from services.inference.shared_memory import SharedMemoryRef

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
# The parameter (bool, true) on a streamed refusal that says the server is draining: send it elsewhere.
DRAINING_PARAMETER = "draining"
# The span of one streamed request that carried the caller's trace context.
STREAM_SPAN = "/inference.GRPCInferenceService/ModelStreamInfer request"

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _metadata(context: Any) -> dict[str, str]:
    """A call's metadata as str → str (the model control API reads `authorization`)."""
    return {k: v if isinstance(v, str) else "" for k, v in (context.invocation_metadata() or ())}


def _statistics(serving: ServingVersion) -> pb.ModelStatistics:
    """The statistics the HTTP API reports, as the proto; without the response cache's (zeros over HTTP,
    unset here)."""
    stats = json_format.ParseDict(statistics_json(serving), pb.ModelStatistics())
    stats.inference_stats.ClearField("cache_hit")
    stats.inference_stats.ClearField("cache_miss")
    return stats


def _shm_ref(parameters: Mapping[str, pb.InferParameter], what: str) -> SharedMemoryRef | None:
    """The shared memory slice a tensor's parameters name, or None when they name none."""
    if "shared_memory_region" not in parameters:
        if "shared_memory_byte_size" in parameters or "shared_memory_offset" in parameters:
            raise InvalidInput(f"{what}: shared_memory_byte_size/offset given without shared_memory_region")
        return None
    region = parameters["shared_memory_region"].string_param
    if not region:
        raise InvalidInput(f"{what}: parameter shared_memory_region must be a non-empty string_param")
    if "shared_memory_byte_size" not in parameters:
        raise InvalidInput(f"{what}: parameter shared_memory_byte_size is required with shared_memory_region")
    size_param, offset_param = parameters["shared_memory_byte_size"], parameters.get("shared_memory_offset")
    size = size_param.int64_param or size_param.uint64_param
    offset = (offset_param.int64_param or offset_param.uint64_param) if offset_param is not None else 0
    return SharedMemoryRef(region, size, offset)


def _infer_request(request: pb.ModelInferRequest, deadline_s: float | None) -> InferRequest:
    """The transport-free request; raw_input_contents pair with the inputs not in shared memory, in order."""
    raw_contents = request.raw_input_contents
    n_raw = len(raw_contents)
    inputs = []
    raw_index = 0
    for tensor in request.inputs:
        name = tensor.name
        shm = _shm_ref(tensor.parameters, f"input '{name}'") if tensor.parameters else None
        item = InputTensor(name, tensor.datatype, tuple(tensor.shape), shm=shm)
        if shm is None:
            if n_raw:
                if raw_index < n_raw:
                    item.raw = raw_contents[raw_index]
                raw_index += 1
            else:
                field = CONTENTS_FIELD.get(tensor.datatype)
                if field is not None:
                    item.values = getattr(tensor.contents, field)
                    item.values_field = f"contents.{field}"
                elif tensor.datatype in ("FP16", "BF16"):
                    raise InvalidInput(
                        f"input '{name}' of model '{request.model_name}': {tensor.datatype} data must be "
                        "sent in raw_input_contents"
                    )
        inputs.append(item)
    if n_raw and n_raw != raw_index:
        raise InvalidInput(
            f"model '{request.model_name}': {n_raw} raw_input_contents given for {raw_index} inputs not in "
            "shared memory; expected one per input"
        )
    outputs = []
    for out in request.outputs:
        params = out.parameters
        requested = RequestedOutput(out.name)
        if params:
            requested.shm = _shm_ref(params, f"output '{out.name}'")
            if "classification" in params:
                requested.classification = params["classification"].int64_param
        outputs.append(requested)
    timeout_us = 0
    priority = 0
    if request.parameters:
        if "timeout" in request.parameters:
            timeout_us = request.parameters["timeout"].int64_param
        if "priority" in request.parameters:
            priority = _priority(request.parameters["priority"])
    return InferRequest(
        request.model_name,
        request.model_version,
        request.id,
        inputs,
        outputs,
        timeout_us,
        deadline_s,
        priority=priority,
    )


def _priority(param: pb.InferParameter) -> int:
    """Triton's clients send `priority` as uint64_param; int64_param is taken too."""
    which = param.WhichOneof("parameter_choice")
    value = (
        param.uint64_param if which == "uint64_param" else param.int64_param if which == "int64_param" else -1
    )
    if value < 0:
        raise InvalidInput(f"parameters.priority: expected a non-negative integer, got {which or 'nothing'}")
    return int(value)


def _infer_response(result: InferResult) -> pb.ModelInferResponse:
    """Outputs as raw_output_contents (what tritonclient's as_numpy reads first); an output written to
    shared memory gets an empty entry, so the entries stay aligned with `outputs`, and names its region."""
    tensor = pb.ModelInferResponse.InferOutputTensor
    tensors = []
    raws = []
    for out in result.outputs:
        item = tensor(name=out.name, datatype=out.datatype, shape=out.array.shape)
        shm = out.shm
        if shm is None:
            raws.append(tensor_bytes(out.datatype, out.array))
        else:
            item.parameters["shared_memory_region"].string_param = shm.region
            item.parameters["shared_memory_byte_size"].int64_param = shm.byte_size
            if shm.offset:
                item.parameters["shared_memory_offset"].int64_param = shm.offset
            raws.append(b"")
        tensors.append(item)
    return pb.ModelInferResponse(
        model_name=result.model,
        model_version=result.version,
        id=result.id,
        outputs=tensors,
        raw_output_contents=raws,
    )


def _stream_failure(request: pb.ModelInferRequest, status: Status) -> pb.ModelStreamInferResponse:
    """A failed streamed request, in band as Triton sends it: `error_message`, and in the response's
    `status_code` parameter the status a unary call would have ended with (for callers that map errors);
    a refusal because the server drains also has the parameter `draining` (true)."""
    reply = pb.ModelStreamInferResponse(
        error_message=status.message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
    reply.infer_response.parameters["status_code"].int64_param = status.code.value[0]
    if status is DRAINING:
        reply.infer_response.parameters[DRAINING_PARAMETER].bool_param = True
    return reply


def _trace_response(values: Mapping[str, list[str]]) -> pb.TraceSettingResponse:
    response = pb.TraceSettingResponse()
    for key, value in values.items():
        response.settings[key].value.extend(value)
    return response


def _log_response(values: Mapping[str, bool | int | str]) -> pb.LogSettingsResponse:
    response = pb.LogSettingsResponse()
    for key, value in values.items():
        setting = response.settings[key]
        if isinstance(value, bool):
            setting.bool_param = value
        elif isinstance(value, int):
            setting.uint32_param = value
        else:
            setting.string_param = value
    return response


class GRPCInferenceServiceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Translates GRPCInferenceService protos to data plane calls."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._plane = dataplane

    # --- health and metadata ---

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=self._plane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        return pb.ModelReadyResponse(ready=self._plane.repository.is_ready(request.name, request.version))

    async def ServerMetadata(  # noqa: N802 - gRPC method name
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:  # noqa: N802
        metadata = self._plane.metadata(request.name, request.version)
        return json_format.ParseDict(metadata, pb.ModelMetadataResponse())

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:  # noqa: N802
        serving = self._plane.model(request.name, request.version)
        return pb.ModelConfigResponse(config=serving.spec.config)

    async def ModelStatistics(  # noqa: N802 - gRPC method name
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        chosen = self._plane.statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[_statistics(s) for s in chosen])

    # --- inference ---

    async def _infer(self, request: pb.ModelInferRequest, deadline_s: float | None) -> pb.ModelInferResponse:
        return _infer_response(await self._plane.infer(self._request(request, deadline_s)))

    def _request(self, request: pb.ModelInferRequest, deadline_s: float | None) -> InferRequest:
        try:
            return _infer_request(request, deadline_s)
        except InvalidInput:
            self._count_invalid(request)
            raise

    def _count_invalid(self, request: pb.ModelInferRequest) -> None:
        """A request refused before decoding still counts against its model version (when it exists)."""
        try:
            serving = self._plane.model(request.model_name, request.model_version)
        except ServiceError:
            return
        serving.metrics.requests.inc()
        serving.metrics.failed("invalid", 0)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        return await self._infer(request, context.time_remaining())

    async def ModelStreamInfer(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Runs each streamed request as it arrives (so they batch) and streams results as they finish.

        Errors travel in `error_message` (as Triton does), so one bad request never ends the stream; the
        status a unary call would have had is in the response's `status_code` parameter. A request whose
        `traceparent` parameter names a trace gets its own span in it (a stream has no per-message metadata).
        """
        replies = self._plane.infer_stream(request_iterator, self._stream_one, _stream_failure)
        async with contextlib.aclosing(replies):
            async for reply in replies:
                yield reply

    async def _stream_one(
        self, request: pb.ModelInferRequest, deadline_s: float | None
    ) -> pb.ModelStreamInferResponse:
        if "traceparent" in request.parameters:  # the caller's trace, per message
            parent = propagate.extract({"traceparent": request.parameters["traceparent"].string_param})
            with _tracer.start_as_current_span(STREAM_SPAN, context=parent, kind=trace.SpanKind.SERVER):
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline_s))
        return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline_s))

    # --- repository ---

    async def RepositoryIndex(  # noqa: N802 - gRPC method name
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in self._plane.repository.index(ready_only=request.ready)
            ]
        )

    async def RepositoryModelLoad(  # noqa: N802 - gRPC method name
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        parameters: dict[str, str | bytes | None] = {
            key: (value.bytes_param if value.WhichOneof("parameter_choice") == "bytes_param" else None)
            if key.startswith("file:")
            else value.string_param
            for key, value in request.parameters.items()
        }
        await self._plane.load(request.model_name, parameters, _metadata(context))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(  # noqa: N802 - gRPC method name
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self._plane.unload(request.model_name, _metadata(context))
        return pb.RepositoryModelUnloadResponse()

    # --- shared memory ---

    async def SystemSharedMemoryStatus(  # noqa: N802 - gRPC method name
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._plane.shared_memory.status(request.name):
            status = response.regions[region.name]
            status.name, status.key = region.name, region.key
            status.offset, status.byte_size = region.offset, region.byte_size
        return response

    async def SystemSharedMemoryRegister(  # noqa: N802 - gRPC method name
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._plane.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(  # noqa: N802 - gRPC method name
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._plane.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(  # noqa: N802 - gRPC method name
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        self._plane.cuda_shared_memory_status(request.name)
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(  # noqa: N802 - gRPC method name
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Any
    ) -> pb.CudaSharedMemoryRegisterResponse:
        self._plane.register_cuda_shared_memory()
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(  # noqa: N802 - gRPC method name
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        self._plane.unregister_cuda_shared_memory(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    # --- trace and log settings ---

    async def TraceSetting(  # noqa: N802 - gRPC method name
        self, request: pb.TraceSettingRequest, context: Any
    ) -> pb.TraceSettingResponse:
        if request.model_name:
            self._plane.model(request.model_name)  # NOT_FOUND for an unknown model
            if request.settings:
                raise NotSupported("trace settings are server-wide here; update them without model_name")
        changes = {key: list(value.value) for key, value in request.settings.items()}
        values = self._plane.trace.update(changes) if changes else self._plane.trace.current()
        return _trace_response(values)

    async def LogSettings(  # noqa: N802 - gRPC method name
        self, request: pb.LogSettingsRequest, context: Any
    ) -> pb.LogSettingsResponse:
        changes: dict[str, Any] = {}
        for key, value in request.settings.items():
            which = value.WhichOneof("parameter_choice")
            changes[key] = getattr(value, which) if which else None
        values = self._plane.log.update(changes) if changes else self._plane.log.current()
        return _log_response(values)


class ThreadedInferenceServicer(GRPCInferenceServiceServicer):
    """The servicer on the threaded transport: ModelInfer is a plain `def`, run on the server's thread
    without a hop to the event loop (the loop only resolves each batch's results)."""

    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        return _infer_response(self._plane.infer_blocking(self._request(request, context.time_remaining())))


async def create_server(
    config: InferenceConfig,
    telemetry: Telemetry | None = None,
    backends: Mapping[str, ModelBackend] | None = None,
) -> Server:
    """Loads the start-up models, then builds the inference server (bound, not started).

    The HTTP/JSON front door (unless `config.http.http_port` is 0) starts and stops with the gRPC server.

    Args:
        config: The service configuration.
        telemetry: Tracing interceptors when tracing is on.
        backends: Backends by name; the real ones (ONNX Runtime, TensorRT) unless given.
    """
    models = config.models
    if models.model_repository is None:
        log.warning(
            "no model repository configured (INFERGRID_INFERENCE_MODEL_REPOSITORY): serving no models"
        )
    check_repository(config)
    repository = ModelRepository(models, config.control, backends or create_backends(models))
    token = ""
    if config.control.control_token_file is not None:
        token = config.control.control_token_file.read_text().strip()
        if not token:
            raise ConfigError("INFERGRID_INFERENCE_CONTROL_TOKEN_FILE", "the token file is empty")
    await repository.load_startup()
    dataplane = DataPlane(
        repository,
        strict_readiness=models.strict_readiness,
        trace=TraceSettings(
            telemetry.sampler if telemetry is not None else None, config.telemetry.trace_sample_ratio
        ),
        log=LogSettings(),
        control=ControlGate(enabled=config.control.control_enabled, token=token),
    )
    threaded = config.server.transport == "threaded"
    servicer = (ThreadedInferenceServicer if threaded else GRPCInferenceServiceServicer)(dataplane)

    async def _ready() -> bool:
        return dataplane.ready()

    server = build_server(
        config.server,
        [
            GrpcService.of(
                SERVICE_NAME, grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, servicer
            )
        ],
        telemetry=telemetry,
        readiness=_ready,
    )
    dataplane.draining = lambda: server.stopping
    if config.http.http_port:
        tracing = telemetry is not None and telemetry.tracing
        http = HttpFrontDoor(dataplane, config.http, config.server, tracing=tracing)
        server.on_start.append(http.start)
        server.on_stop.append(http.stop)
    server.on_stop.append(repository.close)
    server.on_stop.append(dataplane.close)
    return server
