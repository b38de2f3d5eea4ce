"""ONNX Runtime on CPU: the default backend."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.inference.backends import LoadedModel, Signature
from services.inference.config import ModelServingConfig
from services.inference.datatypes import BY_ONNX
from services.inference.errors import InvalidInput, ModelConfigError, ModelLoadError
from services.inference.model_config import ONNXRUNTIME, ModelSpec, TensorSpec

_STRING = "tensor(string)"


def _dims(shape: Sequence[object]) -> list[int]:
    """ORT shapes hold ints, symbolic names or None; the last two are dynamic (-1)."""
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def _signature(args: Sequence[ort.NodeArg], path: Path) -> Signature:
    out: Signature = []
    for arg in args:
        datatype = BY_ONNX.get(arg.type)
        if datatype is None:
            raise ModelLoadError(f"{path}: tensor '{arg.name}' has type {arg.type}, which is not supported")
        out.append((arg.name, datatype, _dims(arg.shape)))
    return out


def _session(path: Path, intra_op_threads: int, inter_op_threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the cores the gRPC server needs; small models gain nothing from it.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable models
        message = re.sub(r"\s+", " ", str(exc)).strip()
        raise ModelLoadError(f"ONNX Runtime cannot load {path}: {message}") from None


def check_signature(spec: ModelSpec, declared: Signature, tensors: tuple[TensorSpec, ...], kind: str) -> None:
    """Fails when the config names a tensor the model lacks or gives it another datatype or rank.

    Raises:
        ModelConfigError: Says which tensor and what the model file declares.
    """
    by_name = {name: (datatype, shape) for name, datatype, shape in declared}
    for tensor in tensors:
        if tensor.name not in by_name:
            raise ModelConfigError(
                f"model '{spec.name}': config {kind} '{tensor.name}' is not in the model file, "
                f"which has {sorted(by_name)}"
            )
        datatype, shape = by_name[tensor.name]
        if datatype is not tensor.datatype:
            raise ModelConfigError(
                f"model '{spec.name}': {kind} '{tensor.name}' is {tensor.datatype.config_name} in the "
                f"config but {datatype.config_name} in the model file"
            )
        expected = tensor.shape(spec.batched)
        if len(shape) != len(expected):
            raise ModelConfigError(
                f"model '{spec.name}': {kind} '{tensor.name}' has shape {expected} in the config "
                f"(batch dimension included) but {shape} in the model file"
            )


class OnnxRuntimeModel:
    """A loaded ONNX Runtime session; thread-safe, so several batches may run at once."""

    def __init__(self, session: ort.InferenceSession, string_inputs: frozenset[str]) -> None:
        self._session = session
        self._string_inputs = string_inputs

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        feed = dict(inputs)
        for name in self._string_inputs:
            if name in feed:  # ORT wants str elements (it stores them as UTF-8); protocol BYTES carry bytes
                array = feed[name]
                try:
                    decoded = [v.decode("utf-8") if isinstance(v, bytes) else v for v in array.reshape(-1)]
                except UnicodeDecodeError as exc:
                    raise InvalidInput(
                        f"input '{name}': BYTES element is not UTF-8 ({exc.reason} at byte {exc.start}); "
                        "ONNX Runtime string tensors hold UTF-8 text"
                    ) from None
                feed[name] = np.array(decoded, dtype=object).reshape(array.shape)
        results = self._session.run(list(output_names), feed)
        return [np.asarray(r) for r in results]

    def close(self) -> None:
        del self._session


class OnnxRuntimeBackend:
    """Runs `.onnx` files with ONNX Runtime's CPU execution provider."""

    name = ONNXRUNTIME

    def __init__(self, options: ModelServingConfig) -> None:
        self._options = options

    def signature(self, model_path: Path) -> tuple[Signature, Signature]:
        session = _session(model_path, 1, 1)
        return _signature(session.get_inputs(), model_path), _signature(session.get_outputs(), model_path)

    def load(self, model_path: Path, spec: ModelSpec) -> LoadedModel:
        session = _session(model_path, self._options.ort_intra_op_threads, self._options.ort_inter_op_threads)
        inputs = _signature(session.get_inputs(), model_path)
        check_signature(spec, inputs, spec.inputs, "input")
        check_signature(spec, _signature(session.get_outputs(), model_path), spec.outputs, "output")
        strings = frozenset(name for name, datatype, _ in inputs if datatype.onnx == _STRING)
        return OnnxRuntimeModel(session, strings)
