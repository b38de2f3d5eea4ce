"""The inference data plane: one model repository, batcher and shared memory behind both front doors.

The gRPC servicer (server.py) and the HTTP/JSON API (http_server.py) only translate their wire format
to the transport-free requests here (codec.InferRequest) and the answers back; validation, decoding,
batching, shared memory and the typed errors (which each front door maps to its own statuses) live
here once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from libs.errors import InvalidArgument, Status, to_status
from services.inference.codec import (
    InferRequest,
    OutputTensor,
    RequestedOutput,
    decode_inputs,
    output_array,
    requested_outputs,
    tensor_bytes,
)
from services.inference.control import ControlGate
from services.inference.errors import NotSupported
from services.inference.metrics import Duration, VersionStatistics
from services.inference.model_config import TENSORRT, parse_config_json
from services.inference.repository import ModelRepository, ServingVersion
from services.inference.runtime_settings import LogSettings, TraceSettings
from services.inference.shared_memory import SharedMemoryRegistry

log = logging.getLogger(__name__)
_Request = TypeVar("_Request")
_Selected = list[tuple[int, RequestedOutput | None]]  # codec.requested_outputs
_Answer = TypeVar("_Answer")

# A streamed request's own deadline: none (see `DataPlane.infer_stream`).
STREAM_MESSAGE_DEADLINE_S: float | None = None
# A streamed request that arrived after the server started draining (SIGTERM): refused, so the caller
# (the gateway, whose stream outlives any balancer's decision) sends it to another replica or pool at once.
DRAINING = Status(
    grpc.StatusCode.UNAVAILABLE,
    "the inference server is draining (shutting down): send new requests to another replica",
)

SERVER_NAME = "infergrid-inference"
SERVER_VERSION = "0.1.0"
# Protocol extensions served (perf_analyzer reads "statistics" to ask for server-side stats).
EXTENSIONS = (
    "model_repository",
    "model_configuration",
    "statistics",
    "binary_tensor_data",
    "system_shared_memory",
    "trace",
    "logging",
)


@dataclass(frozen=True, slots=True)
class InferResult:
    """A finished request: the version that served it and its outputs in response order."""

    model: str
    version: str
    id: str
    outputs: list[OutputTensor]


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics_json(serving: ServingVersion) -> dict[str, Any]:
    """Triton's ModelStatistics of one version as a JSON object (numbers, not int64 strings)."""
    s: VersionStatistics = serving.metrics.stats
    return {
        "name": serving.model,
        "version": serving.version_str,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success),
            "fail": _duration(s.fail),
            "queue": _duration(s.queue),
            "compute_input": _duration(s.compute_input),
            "compute_infer": _duration(s.compute_infer),
            "compute_output": _duration(s.compute_output),
            "cache_hit": {"count": 0, "ns": 0},
            "cache_miss": {"count": 0, "ns": 0},
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration(b.compute_input),
                "compute_infer": _duration(b.compute_infer),
                "compute_output": _duration(b.compute_output),
            }
            for size, b in sorted(s.batches.items())
        ],
    }


class DataPlane:
    """What both front doors call: health, metadata, inference, repository, shared memory, settings."""

    def __init__(
        self,
        repository: ModelRepository,
        *,
        strict_readiness: bool,
        trace: TraceSettings | None = None,
        log: LogSettings | None = None,
        control: ControlGate | None = None,
    ) -> None:
        self.repository = repository
        # The model control API's gate: off unless the server enables it (services/inference/control.py).
        self.control = control or ControlGate()
        self.shared_memory = SharedMemoryRegistry()
        self.trace = trace or TraceSettings(None, 0.0)
        self.log = log or LogSettings()
        self._strict = strict_readiness
        # Set by the server once built: True while it drains (both front doors then report not ready).
        self.draining: Callable[[], bool] = lambda: False

    # --- health and metadata ---

    def ready(self) -> bool:
        """Server readiness: start-up loading finished (and, when strict, every start-up model serves)."""
        repo = self.repository
        if not repo.started or self.draining():
            return False
        return repo.startup_models_ready() if self._strict else True

    def model(self, name: str, version: str = "") -> ServingVersion:
        """The serving version (the latest when `version` is empty).

        Raises:
            ModelNotFound: Unknown model or version; names both.
        """
        return self.repository.get(name, version)

    def metadata(self, name: str, version: str = "") -> dict[str, Any]:
        """Triton's model metadata as a JSON object (the gRPC answer is parsed from it).

        Raises:
            ModelNotFound: Unknown model or version; names both.
        """
        serving = self.repository.get(name, version)
        spec = serving.spec
        inputs, outputs = (
            [{"name": t.name, "datatype": t.datatype.name, "shape": t.shape(spec.batched)} for t in tensors]
            for tensors in (spec.inputs, spec.outputs)
        )
        return {
            "name": serving.model,
            "versions": [str(v) for v in self.repository.ready_versions(serving.model)],
            "platform": spec.platform,
            "inputs": inputs,
            "outputs": outputs,
        }

    def statistics(self, name: str = "", version: str = "") -> list[ServingVersion]:
        """The versions ModelStatistics reports: one, every version of a model, or everything served.

        Raises:
            ModelNotFound: `name` (and `version`) is not served.
        """
        repo = self.repository
        if not name:
            return repo.serving()
        if version:
            return [repo.get(name, version)]
        repo.get(name)  # NOT_FOUND for an unknown or unloaded model
        return [s for s in repo.serving() if s.model == name]

    # --- inference ---

    async def infer(self, request: InferRequest) -> InferResult:
        """Checks, queues and runs one request; outputs bound for shared memory are written there.

        Raises:
            ModelNotFound, InvalidInput/InvalidArgument, QueueFull, RequestTimeout, ModelUnavailable,
            BackendError: as the front doors map them (see errors.py).
        """
        serving, inputs, rows, timeout_ns, level, selected = self._admit(request)
        return self._result(
            serving, selected, request, await serving.batcher.infer(inputs, rows, timeout_ns, level)
        )

    def infer_blocking(self, request: InferRequest) -> InferResult:
        """`infer` from a thread other than the event loop's (a `def` handler on the threaded transport)."""
        serving, inputs, rows, timeout_ns, level, selected = self._admit(request)
        return self._result(
            serving, selected, request, serving.batcher.infer_blocking(inputs, rows, timeout_ns, level)
        )

    def _admit(
        self, request: InferRequest
    ) -> tuple[ServingVersion, dict[str, Any], int, int, int, _Selected]:
        """The request's version, decoded inputs, rows, queue timeout (ns), priority level and outputs."""
        serving = self.repository.get(request.model, request.version)
        batching = serving.spec.batching
        try:
            inputs, rows = decode_inputs(serving, request.inputs, self.shared_memory)
            selected = requested_outputs(serving, request.outputs)
            level = batching.level(request.priority)
        except InvalidArgument:
            serving.metrics.requests.inc()
            serving.metrics.failed("invalid", 0)
            raise
        timeout_ns = batching.timeout_us(level, request.timeout_us) * 1000
        if request.deadline_s is not None:
            deadline_ns = max(int(request.deadline_s * 1e9), 1)
            timeout_ns = min(timeout_ns, deadline_ns) if timeout_ns else deadline_ns
        return serving, inputs, rows, timeout_ns, level, selected

    def _result(
        self, serving: ServingVersion, selected: _Selected, request: InferRequest, arrays: list[Any]
    ) -> InferResult:
        """The outputs asked for; those bound for shared memory are written there."""
        specs = serving.spec.outputs
        outputs = []
        for index, requested in selected:
            spec = specs[index]
            array = output_array(spec, arrays[index])
            if requested is not None and requested.shm is not None:
                data = tensor_bytes("BYTES", array) if spec.datatype.name == "BYTES" else array
                self.shared_memory.write(requested.shm, data, f"output '{spec.name}'")
            outputs.append(OutputTensor(spec.name, spec.datatype.name, array, requested))
        return InferResult(serving.model, serving.version_str, request.id, outputs)

    async def infer_stream(
        self,
        requests: AsyncIterator[_Request],
        run: Callable[[_Request, float | None], Awaitable[_Answer]],
        failed: Callable[[_Request, Status], _Answer],
    ) -> AsyncGenerator[_Answer, None]:
        """Runs each streamed request as it arrives (so concurrent ones batch); yields answers as they finish.

        Timeouts: a stream message has no deadline of its own (the call's deadline bounds the whole
        stream), so `run` gets None; its `timeout` parameter applies as in a unary call. Errors: one
        failing request never ends the stream; `failed` turns its status (`to_status`) into an answer.
        Leaving the iterator early cancels the requests still running. Once the server drains, every new
        request is answered `failed(request, DRAINING)` without running; those already running finish.

        Args:
            requests: The front door's requests, in arrival order.
            run: Answers one request given its deadline in seconds (decode, `infer`, encode).
            failed: The answer for a request that failed with a status.
        """
        answers: asyncio.Queue[_Answer | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def _one(request: _Request) -> None:
            try:
                answer = await run(request, STREAM_MESSAGE_DEADLINE_S)
            except Exception as exc:
                status = to_status(exc)
                if status.unexpected:
                    log.exception("stream inference failed")
                answer = failed(request, status)
            answers.put_nowait(answer)

        async def _read() -> None:
            try:
                async for request in requests:
                    if self.draining():
                        answers.put_nowait(failed(request, DRAINING))
                        continue
                    task = asyncio.create_task(_one(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                while pending:
                    await asyncio.gather(*list(pending), return_exceptions=True)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(_read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader
        finally:
            if not reader.done():
                reader.cancel()
            for task in list(pending):
                task.cancel()

    # --- repository ---

    async def load(self, name: str, parameters: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        """(Re)loads a model, with a JSON `config` parameter instead of its config.pbtxt when given.

        Raises:
            InvalidArgument: An empty name, a malformed config, `file:` parameters without `config`, outside
                the model's folder or above the size limit;
            ModelNotFound / ModelLoadError: from the repository.
            PermissionDenied / Unauthenticated: the control API is off or the admin token is wrong.
        """
        self.control.check(headers)
        config = None
        files: dict[str, bytes] = {}
        for key, value in parameters.items():
            if key == "config":
                if not isinstance(value, str):
                    raise InvalidArgument("parameter 'config': expected the model configuration as JSON text")
                config = parse_config_json(value, "RepositoryModelLoad parameter 'config'")
            elif key.startswith("file:"):
                if not isinstance(value, bytes):
                    raise InvalidArgument(f"parameter '{key}': expected the file's content as bytes")
                files[key.removeprefix("file:")] = value
        if not name:
            raise InvalidArgument("model_name: must not be empty")
        if files and config is None:
            raise InvalidArgument("parameter 'config': required with 'file:' parameters (as in Triton)")
        await self.repository.load(name, config, files)

    async def unload(self, name: str, headers: Mapping[str, str]) -> None:
        self.control.check(headers)
        if not name:
            raise InvalidArgument("model_name: must not be empty")
        await self.repository.unload(name)

    # --- shared memory ---

    def register_cuda_shared_memory(self) -> None:
        """Refuses: CUDA shared memory is not offered, saying whether a GPU backend is loaded at all.

        Raises:
            NotSupported: Always (UNIMPLEMENTED over gRPC, 400 over HTTP).
        """
        if any(s.spec.backend == TENSORRT for s in self.repository.serving()):
            raise NotSupported(
                "CUDA shared memory is not supported by this server yet, although a GPU backend (TensorRT) "
                "is loaded; use system shared memory"
            )
        raise NotSupported(
            "CUDA shared memory is not supported on this backend: no GPU backend is loaded "
            "(ONNX Runtime on CPU); use system shared memory"
        )

    def cuda_shared_memory_status(self, name: str = "") -> None:
        """No CUDA region is ever registered: the status of all is empty, a named one is refused.

        Raises:
            NotSupported: `name` is given.
        """
        if name:
            self.register_cuda_shared_memory()

    def unregister_cuda_shared_memory(self, name: str = "") -> None:
        """Nothing to unregister (clients such as perf_analyzer unregister everything at start and end)."""

    async def close(self) -> None:
        """Releases the shared memory mappings (server shutdown, after the repository drained)."""
        self.shared_memory.close()
