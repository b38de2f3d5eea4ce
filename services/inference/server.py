"""The inference gRPC server: the Open Inference Protocol (KServe v2) API over the model repository.

The servicer only translates between `inference.*` messages and the domain
(repository, batcher, codec); typed errors raised below become gRPC statuses in
the shared interceptor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from opentelemetry import propagate, trace

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc
from libs.config import ConfigError
from libs.errors import InvalidArgument, ServiceError
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry, tracer
from services.inference.backends import BackendOptions, ModelBackend, create_backends
from services.inference.codec import decode_inputs, encode_response, requested_outputs
from services.inference.config import InferenceConfig
from services.inference.errors import InvalidInput, NotSupported
from services.inference.metrics import Duration, VersionStatistics
from services.inference.model_config import parse_config_json
from services.inference.repository import ModelRepository, RepositorySettings, ServingVersion

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
# The span of one streamed request that carried the caller's trace context.
STREAM_SPAN = "/inference.GRPCInferenceService/ModelStreamInfer request"

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "infergrid-inference"
SERVER_VERSION = "0.1.0"
# Protocol extensions served (perf_analyzer reads "statistics" to ask for server-side stats).
EXTENSIONS = ("model_repository", "model_configuration", "statistics")


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(serving: ServingVersion) -> pb.ModelStatistics:
    s: VersionStatistics = serving.metrics.stats
    return pb.ModelStatistics(
        name=serving.model,
        version=serving.version_str,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batches.items())
        ],
    )


class GRPCInferenceServiceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Translates GRPCInferenceService protos to repository and batcher calls."""

    def __init__(self, repository: ModelRepository, strict_readiness: bool = False) -> None:
        self._repo = repository
        self._strict = strict_readiness

    def ready(self) -> bool:
        """Server readiness: start-up loading finished (and, when strict, every start-up model serves)."""
        if not self._repo.started:
            return False
        return self._repo.startup_models_ready() if self._strict else True

    # --- health and metadata ---

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        return pb.ModelReadyResponse(ready=self._repo.is_ready(request.name, request.version))

    async def ServerMetadata(  # noqa: N802 - gRPC method name
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:  # noqa: N802
        serving = self._repo.get(request.name, request.version)
        spec = serving.spec
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=serving.model,
            versions=[str(v) for v in self._repo.ready_versions(serving.model)],
            platform=spec.platform,
            inputs=[
                tensor(name=t.name, datatype=t.datatype.name, shape=t.shape(spec.batched))
                for t in spec.inputs
            ],
            outputs=[
                tensor(name=t.name, datatype=t.datatype.name, shape=t.shape(spec.batched))
                for t in spec.outputs
            ],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:  # noqa: N802
        serving = self._repo.get(request.name, request.version)
        return pb.ModelConfigResponse(config=serving.spec.config)

    async def ModelStatistics(  # noqa: N802 - gRPC method name
        self, request: pb.ModelStatisticsRequest, context: Any
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            if request.version:
                chosen = [self._repo.get(request.name, request.version)]
            else:
                self._repo.get(request.name)  # NOT_FOUND for an unknown or unloaded model
                chosen = [s for s in self._repo.serving() if s.model == request.name]
        else:
            chosen = self._repo.serving()
        return pb.ModelStatisticsResponse(model_stats=[_statistics(s) for s in chosen])

    # --- inference ---

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        serving = self._repo.get(request.model_name, request.model_version)
        try:
            inputs, rows = decode_inputs(serving, request)
            selected = requested_outputs(serving, request)
        except InvalidInput:
            serving.metrics.requests.inc()
            serving.metrics.failed("invalid", 0)
            raise
        batching = serving.spec.batching
        timeout_ns = batching.default_timeout_us * 1000
        if request.parameters and "timeout" in request.parameters and batching.allow_timeout_override:
            requested = request.parameters["timeout"].int64_param
            if requested > 0:
                timeout_ns = requested * 1000
        if context is not None:
            remaining = context.time_remaining()
            if remaining is not None:
                deadline_ns = max(int(remaining * 1e9), 1)
                timeout_ns = min(timeout_ns, deadline_ns) if timeout_ns else deadline_ns
        outputs = await serving.batcher.infer(inputs, rows, timeout_ns)
        return encode_response(serving, request, outputs, selected)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        return await self._infer(request, context)

    async def ModelStreamInfer(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Runs each streamed request as it arrives (so they batch) and streams results as they finish.

        Errors travel in `error_message` (as Triton does), so one bad request never ends the stream; the
        status a unary call would have had is in the response's `status_code` parameter. A request whose
        `traceparent` parameter names a trace gets its own span in it (a stream has no per-message metadata).
        """
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def _one(request: pb.ModelInferRequest) -> None:
            try:
                if "traceparent" in request.parameters:  # the caller's trace, per message
                    parent = propagate.extract(
                        {"traceparent": request.parameters["traceparent"].string_param}
                    )
                    with _tracer.start_as_current_span(
                        STREAM_SPAN, context=parent, kind=trace.SpanKind.SERVER
                    ):
                        response = await self._infer(request, None)
                else:
                    response = await self._infer(request, None)
                reply = pb.ModelStreamInferResponse(infer_response=response)
            except ServiceError as exc:
                reply = pb.ModelStreamInferResponse(
                    error_message=exc.message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version, id=request.id
                    ),
                )
                # The status a unary call would have ended with, for callers that map errors.
                reply.infer_response.parameters["status_code"].int64_param = exc.code.value[0]
            except Exception:
                log.exception("stream inference failed")
                reply = pb.ModelStreamInferResponse(
                    error_message="internal error", infer_response=pb.ModelInferResponse(id=request.id)
                )
            responses.put_nowait(reply)

        async def _read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(_one(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                while pending:
                    await asyncio.gather(*list(pending), return_exceptions=True)
            finally:
                responses.put_nowait(None)

        reader = asyncio.create_task(_read())
        try:
            while (reply := await responses.get()) is not None:
                yield reply
            await reader
        finally:
            if not reader.done():
                reader.cancel()
            for task in list(pending):
                task.cancel()

    # --- repository ---

    async def RepositoryIndex(  # noqa: N802 - gRPC method name
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in self._repo.index(ready_only=request.ready)
            ]
        )

    async def RepositoryModelLoad(  # noqa: N802 - gRPC method name
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        config = None
        for key, value in request.parameters.items():
            if key == "config":
                config = parse_config_json(value.string_param, "RepositoryModelLoad parameter 'config'")
            elif key.startswith("file:"):
                raise NotSupported(
                    "loading model files sent in the request ('file:' parameters) is not supported"
                )
        if not request.model_name:
            raise InvalidArgument("model_name: must not be empty")
        await self._repo.load(request.model_name, config)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(  # noqa: N802 - gRPC method name
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        if not request.model_name:
            raise InvalidArgument("model_name: must not be empty")
        await self._repo.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- Triton extensions this server does not offer ---

    async def _unsupported(self, request: Any, context: Any) -> Any:
        raise NotSupported("this server does not support shared memory, trace or log settings")

    SystemSharedMemoryStatus = _unsupported
    SystemSharedMemoryRegister = _unsupported
    SystemSharedMemoryUnregister = _unsupported
    CudaSharedMemoryStatus = _unsupported
    CudaSharedMemoryRegister = _unsupported
    CudaSharedMemoryUnregister = _unsupported
    TraceSetting = _unsupported
    LogSettings = _unsupported


async def create_server(
    config: InferenceConfig,
    telemetry: Telemetry | None = None,
    backends: Mapping[str, ModelBackend] | None = None,
) -> Server:
    """Loads the start-up models, then builds the inference server (bound, not started).

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
    elif not models.model_repository.is_dir():
        raise ConfigError(
            "INFERGRID_INFERENCE_MODEL_REPOSITORY", f"{models.model_repository} is not a directory"
        )
    backends = backends or create_backends(
        BackendOptions(
            ort_intra_op_threads=models.ort_intra_op_threads,
            ort_inter_op_threads=models.ort_inter_op_threads,
            tensorrt_cache_dir=models.tensorrt_cache_dir,
            tensorrt_fp16=models.tensorrt_fp16,
        )
    )
    repository = ModelRepository(
        models.model_repository,
        backends,
        RepositorySettings(
            max_queue_size=models.max_queue_size,
            warmup=models.warmup,
            startup_models=models.startup_models,
        ),
    )
    await repository.load_startup()
    servicer = GRPCInferenceServiceServicer(repository, models.strict_readiness)

    async def _ready() -> bool:
        return servicer.ready()

    server = build_server(
        config.server,
        [
            GrpcService(
                SERVICE_NAME,
                lambda s: grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, s),
            )
        ],
        telemetry=telemetry,
        readiness=_ready,
    )
    server.on_stop.append(repository.close)
    return server
