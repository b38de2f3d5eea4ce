"""TensorRT on GPU: engines built from the model's ONNX file, plans cached on disk, pinned buffers, a CUDA stream.

Optional: needs `tensorrt` and `pycuda` (requirements-gpu.txt) and a CUDA GPU.
Without them, loading a model with `backend: "tensorrt"` fails with the reason,
and the repository tries the model's `fallback_backend` parameter if it has one.

UNVERIFIED: no GPU was available where this was written; only the paths that run
without one (availability checks, cache keys, profile shapes) are tested.
"""

from __future__ import annotations

import hashlib
import logging
import math
import queue
import re
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.inference.backends import LoadedModel, Signature
from services.inference.config import ModelServingConfig
from services.inference.errors import BackendUnavailable, ModelConfigError, ModelLoadError
from services.inference.model_config import TENSORRT, ModelSpec

log = logging.getLogger(__name__)

# Upper bound for non-batch dynamic (-1) dimensions in the optimization profile, unless the
# config sets the `tensorrt_max_dim` parameter.
DEFAULT_MAX_DYNAMIC_DIM = 64
# The TensorRT builder's workspace limit.
_WORKSPACE_BYTES = 1 << 30
_build_lock = threading.Lock()


def _import_runtime() -> tuple[Any, Any]:
    """Imports tensorrt and pycuda and finds a GPU.

    Raises:
        BackendUnavailable: Says which part is missing.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT backend unavailable: cannot import tensorrt ({exc}); "
            "install requirements-gpu.txt on a GPU node"
        ) from None
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT backend unavailable: cannot import pycuda ({exc})") from None
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda raises LogicError/RuntimeError without a driver
        raise BackendUnavailable(f"TensorRT backend unavailable: CUDA driver error: {exc}") from None
    if count == 0:
        raise BackendUnavailable("TensorRT backend unavailable: no CUDA GPU is visible")
    return trt, cuda


def plan_cache_key(
    model_bytes: bytes,
    *,
    gpu_name: str,
    compute_capability: tuple[int, int],
    trt_version: str,
    max_batch_size: int,
    fp16: bool,
    max_dim: int,
) -> str:
    """A file name that changes whenever the engine would: model contents, GPU, TensorRT version, profile."""
    digest = hashlib.sha256(model_bytes).hexdigest()[:20]
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    major, minor = compute_capability
    precision = "fp16" if fp16 else "fp32"
    return f"{digest}-{gpu}-sm{major}{minor}-trt{trt_version}-b{max_batch_size}-d{max_dim}-{precision}.plan"


def profile_shapes(
    shape: Sequence[int], batched: bool, max_batch_size: int, opt_batch: int, max_dim: int
) -> tuple[list[int], list[int], list[int]]:
    """Min, optimal and max shapes of one input for a dynamic-batch optimization profile.

    The leading -1 is the batch dimension (1..max_batch_size, tuned for `opt_batch`); other -1
    dimensions range over 1..max_dim.
    """
    bounds: list[tuple[int, int, int]] = []
    for i, d in enumerate(shape):
        if d >= 0:
            bounds.append((d, d, d))
        elif i == 0 and batched:
            bounds.append((1, max(1, min(opt_batch, max_batch_size)), max_batch_size))
        else:
            bounds.append((1, max_dim, max_dim))
    return [b[0] for b in bounds], [b[1] for b in bounds], [b[2] for b in bounds]


class TensorRTModel:
    """An engine with one execution context, stream and buffer set per instance."""

    def __init__(
        self,
        trt: Any,
        cuda: Any,
        cuda_context: Any,
        engine: Any,
        *,
        spec: ModelSpec,
        max_shapes: dict[str, list[int]],
    ) -> None:
        self._cuda = cuda
        self._ctx = cuda_context
        self._engine = engine
        self._instances: queue.Queue[dict[str, Any]] = queue.Queue()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        for _ in range(max(spec.instance_count, 1)):
            context = engine.create_execution_context()
            stream = cuda.Stream()
            buffers: dict[str, tuple[Any, Any]] = {}
            for name in names:
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
                if name in self._inputs:
                    shape = max_shapes[name]
                else:
                    shape = self._max_output_shape(context, name, max_shapes)
                count = max(math.prod(shape), 1)
                host = cuda.pagelocked_empty(count, dtype)  # pinned: async copies need it
                device = cuda.mem_alloc(host.nbytes)
                context.set_tensor_address(name, int(device))
                buffers[name] = (host, device)
            self._instances.put({"context": context, "stream": stream, "buffers": buffers})

    @staticmethod
    def _max_output_shape(context: Any, name: str, max_shapes: dict[str, list[int]]) -> list[int]:
        for input_name, shape in max_shapes.items():
            context.set_input_shape(input_name, shape)
        return [max(d, 1) for d in context.get_tensor_shape(name)]

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        instance = self._instances.get()
        self._ctx.push()
        try:
            context, stream, buffers = instance["context"], instance["stream"], instance["buffers"]
            for name in self._inputs:
                array = inputs[name]
                host, device = buffers[name]
                flat = host[: array.size]
                flat[...] = array.reshape(-1)
                context.set_input_shape(name, array.shape)
                self._cuda.memcpy_htod_async(device, flat, stream)
            if not context.execute_async_v3(stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            results: dict[str, np.ndarray] = {}
            for name in output_names:
                host, device = buffers[name]
                shape = tuple(context.get_tensor_shape(name))
                flat = host[: math.prod(shape)]
                self._cuda.memcpy_dtoh_async(flat, device, stream)
                results[name] = flat  # valid after the synchronize below
            stream.synchronize()
            return [results[n].reshape(tuple(context.get_tensor_shape(n))).copy() for n in output_names]
        finally:
            self._ctx.pop()
            self._instances.put(instance)

    def close(self) -> None:
        self._ctx.push()
        try:
            while not self._instances.empty():
                instance = self._instances.get_nowait()
                for _host, device in instance["buffers"].values():
                    device.free()
            self._engine = None
        finally:
            self._ctx.pop()


class TensorRTBackend:
    """Builds (or reuses a cached) TensorRT engine from the version's ONNX file."""

    name = TENSORRT

    def __init__(self, options: ModelServingConfig) -> None:
        self._options = options
        self._cache_dir = options.tensorrt_cache_dir or Path(tempfile.gettempdir()) / "infergrid-trt-plans"

    def signature(self, model_path: Path) -> tuple[Signature, Signature]:
        # The ONNX file is the source of truth for both backends.
        from services.inference.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(self._options).signature(model_path)

    def load(self, model_path: Path, spec: ModelSpec) -> LoadedModel:
        for tensor in (*spec.inputs, *spec.outputs):
            if tensor.datatype.name == "BYTES":
                raise ModelConfigError(
                    f"model '{spec.name}': TensorRT cannot take BYTES tensor '{tensor.name}'"
                )
        trt, cuda = _import_runtime()
        device = cuda.Device(
            spec.config.instance_group[0].gpus[0]
            if spec.config.instance_group and spec.config.instance_group[0].gpus
            else 0
        )
        cuda_context = device.retain_primary_context()
        cuda_context.push()
        try:
            max_dim = (
                int(spec.config.parameters["tensorrt_max_dim"].string_value or DEFAULT_MAX_DYNAMIC_DIM)
                if "tensorrt_max_dim" in spec.config.parameters
                else DEFAULT_MAX_DYNAMIC_DIM
            )
            model_bytes = model_path.read_bytes()
            key = plan_cache_key(
                model_bytes,
                gpu_name=device.name(),
                compute_capability=device.compute_capability(),
                trt_version=trt.__version__,
                max_batch_size=spec.max_batch_size,
                fp16=self._options.tensorrt_fp16,
                max_dim=max_dim,
            )
            logger = trt.Logger(trt.Logger.WARNING)
            plan_path = self._cache_dir / key
            max_shapes: dict[str, list[int]] = {}
            if plan_path.is_file():
                plan = plan_path.read_bytes()
                log.info("TensorRT plan cache hit", extra={"model": spec.name, "plan": str(plan_path)})
            else:
                with _build_lock:  # builds use the whole GPU; one at a time
                    plan = self._build(trt, logger, model_bytes, spec, max_dim)
                self._cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = plan_path.with_suffix(".tmp")
                tmp.write_bytes(plan)
                tmp.replace(plan_path)
            engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
            if engine is None:
                raise ModelLoadError(f"model '{spec.name}': TensorRT could not deserialize {plan_path}")
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                    max_shapes[name] = list(engine.get_tensor_profile_shape(name, 0)[2])
            return TensorRTModel(trt, cuda, cuda_context, engine, spec=spec, max_shapes=max_shapes)
        finally:
            cuda_context.pop()

    def _build(self, trt: Any, logger: Any, model_bytes: bytes, spec: ModelSpec, max_dim: int) -> bytes:
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(model_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelLoadError(f"model '{spec.name}': TensorRT cannot parse the ONNX file: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
        if self._options.tensorrt_fp16 and builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        preferred = spec.batching.preferred_batch_sizes
        opt_batch = preferred[-1] if preferred else max(spec.max_batch_size // 2, 1)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            low, opt, high = profile_shapes(
                list(tensor.shape), spec.batched, spec.max_batch_size, opt_batch, max_dim
            )
            profile.set_shape(tensor.name, low, opt, high)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ModelLoadError(f"model '{spec.name}': TensorRT engine build failed (see the server log)")
        return bytes(plan)
