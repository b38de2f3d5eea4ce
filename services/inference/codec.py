"""Open Inference Protocol tensors <-> numpy, for both front doors (gRPC and HTTP/JSON).

A request arrives as an `InferRequest` of `InputTensor`s whichever transport carried it: raw bytes
(gRPC `raw_input_contents`, HTTP binary data; wrapped with `numpy.frombuffer` without copying), typed
values (gRPC `contents`, HTTP JSON `data`), or a slice of a registered shared memory region. Inputs are
checked against the model; every check names the input and says what was expected and what was given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.inference.datatypes import decode_bytes_tensor, encode_bytes_tensor
from services.inference.errors import InvalidInput
from services.inference.model_config import TensorSpec
from services.inference.repository import ServingVersion
from services.inference.shared_memory import SharedMemoryRef, SharedMemoryRegistry


@dataclass(slots=True)
class InputTensor:
    """One request input, transport-free: exactly one of `raw`, `values` or `shm` carries its data."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None
    # Typed values, flat in row-major order (BYTES as bytes or str).
    values: Sequence[Any] | None = None
    # Where `values` came from, for error messages ("contents.fp32_contents", "data").
    values_field: str = "data"
    shm: SharedMemoryRef | None = None


@dataclass(slots=True)
class RequestedOutput:
    """One requested output: into a shared memory region or back in the response (binary or JSON)."""

    name: str
    shm: SharedMemoryRef | None = None
    # HTTP only: the output's `binary_data` parameter; None: the request's `binary_data_output`.
    binary: bool | None = None
    classification: int = 0


@dataclass(slots=True)
class InferRequest:
    """One inference request as both front doors hand it to the data plane."""

    model: str
    version: str
    id: str
    inputs: list[InputTensor]
    # Empty: every output of the model, in its order.
    outputs: list[RequestedOutput]
    # Triton's `timeout` parameter in microseconds; 0: none given.
    timeout_us: int = 0
    # Seconds the caller still waits (the gRPC deadline); None: no deadline.
    deadline_s: float | None = None
    # Triton's `priority` parameter (1 is the highest level); 0: the model's default level.
    priority: int = 0


@dataclass(slots=True)
class OutputTensor:
    """One output of a finished request; already written when it went to shared memory."""

    name: str
    datatype: str
    array: np.ndarray
    requested: RequestedOutput | None = None

    @property
    def shm(self) -> SharedMemoryRef | None:
        return self.requested.shm if self.requested is not None else None


# Typed contents field holding each datatype in gRPC requests (FP16/BF16 must be sent raw there).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _check_shape(model: ServingVersion, spec: TensorSpec, shape: tuple[int, ...]) -> None:
    expected = spec.shape(model.spec.batched)
    ok = len(shape) == len(expected) and all(
        (e == -1 and s >= 0) or e == s for e, s in zip(expected, shape, strict=True)
    )
    if not ok:
        raise InvalidInput(
            f"input '{spec.name}' of model '{model.model}': shape {list(shape)} given, expected {expected}"
            + (" (first dimension is the batch)" if model.spec.batched else "")
        )
    if model.spec.batched:
        rows = shape[0]
        if rows < 1 or rows > model.spec.max_batch_size:
            raise InvalidInput(
                f"input '{spec.name}' of model '{model.model}': batch size {rows} given, "
                f"expected 1..{model.spec.max_batch_size}"
            )


def _from_raw(
    model: ServingVersion, spec: TensorSpec, shape: tuple[int, ...], raw: bytes | memoryview, what: str
) -> np.ndarray:
    count = math.prod(shape)
    datatype = spec.datatype
    if datatype.name == "BYTES":
        try:
            return decode_bytes_tensor(raw, count).reshape(shape)
        except ValueError as exc:
            raise InvalidInput(
                f"input '{spec.name}' of model '{model.model}': BYTES data for shape {list(shape)} {exc}"
            ) from None
    expected = count * datatype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input '{spec.name}' of model '{model.model}': {len(raw)} bytes of {what} given, expected "
            f"{expected} ({count} x {datatype.name} for shape {list(shape)})"
        )
    return np.frombuffer(raw, dtype=datatype.numpy).reshape(shape)


def _from_values(
    model: ServingVersion, spec: TensorSpec, shape: tuple[int, ...], tensor: InputTensor
) -> np.ndarray:
    name = spec.datatype.name
    values = tensor.values
    if values is None:
        raise InvalidInput(f"input '{spec.name}' of model '{model.model}': no data given")
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input '{spec.name}' of model '{model.model}': {len(values)} values given in "
            f"{tensor.values_field}, expected {count} for shape {list(shape)}"
        )
    if name == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = [v.encode() if isinstance(v, str) else v for v in values]
        return array.reshape(shape)
    try:
        return np.asarray(values, dtype=spec.datatype.numpy).reshape(shape)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidInput(
            f"input '{spec.name}' of model '{model.model}': {name} values in {tensor.values_field} "
            f"out of range or of the wrong type: {exc}"
        ) from None


def decode_inputs(
    model: ServingVersion, tensors: Sequence[InputTensor], regions: SharedMemoryRegistry
) -> tuple[dict[str, np.ndarray], int]:
    """Checks the request's inputs against the model and returns them as arrays, plus the batch rows.

    Raises:
        InvalidInput: A missing, unknown or duplicate input, a wrong datatype, shape or byte length.
        InvalidArgument: A shared memory region that is not registered or bounds outside it.
    """
    inputs: dict[str, np.ndarray] = {}
    rows = 1
    specs = model.inputs
    for i, tensor in enumerate(tensors):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(
                f"unexpected input '{name}' for model '{model.model}'; expected inputs: {sorted(specs)}"
            )
        if name in inputs:
            raise InvalidInput(f"input '{name}' of model '{model.model}' is given more than once")
        if tensor.datatype != spec.datatype.name:
            raise InvalidInput(
                f"input '{name}' of model '{model.model}': datatype {tensor.datatype or '(empty)'} given, "
                f"expected {spec.datatype.name}"
            )
        shape = tensor.shape
        _check_shape(model, spec, shape)
        if tensor.raw is not None:
            array = _from_raw(model, spec, shape, tensor.raw, "raw data")
        elif tensor.shm is not None:
            raw = regions.read(tensor.shm, f"input '{name}'")
            array = _from_raw(model, spec, shape, raw, "shared memory (shared_memory_byte_size)")
        else:
            array = _from_values(model, spec, shape, tensor)
        inputs[name] = array
        if model.spec.batched:
            if i == 0:
                rows = shape[0]
            elif shape[0] != rows:
                raise InvalidInput(
                    f"input '{name}' of model '{model.model}': batch size {shape[0]} given, "
                    f"expected {rows} like the other inputs"
                )
    if len(inputs) != len(specs):
        missing = [n for n, s in specs.items() if n not in inputs and not s.optional]
        if missing:
            raise InvalidInput(
                f"model '{model.model}': missing input(s) {missing}; expected inputs: {sorted(specs)}"
            )
    return inputs, rows


def requested_outputs(
    model: ServingVersion, outputs: Sequence[RequestedOutput]
) -> list[tuple[int, RequestedOutput | None]]:
    """(index in the model's outputs, the request for it) of each output to return, in response order.

    Raises:
        InvalidInput: An unknown output name, or a classification request (not supported).
    """
    if not outputs:
        return [(i, None) for i in range(len(model.spec.outputs))]
    chosen: list[tuple[int, RequestedOutput | None]] = []
    for out in outputs:
        index = model.output_index.get(out.name)
        if index is None:
            raise InvalidInput(
                f"unexpected output '{out.name}' requested from model '{model.model}'; "
                f"expected outputs: {sorted(model.output_index)}"
            )
        if out.classification:
            raise InvalidInput(f"output '{out.name}': the classification extension is not supported")
        chosen.append((index, out))
    return chosen


def tensor_bytes(datatype: str, array: np.ndarray) -> bytes:
    """The wire bytes of an output: length-prefixed elements for BYTES, else little-endian row-major."""
    if datatype == "BYTES":
        return encode_bytes_tensor(array)
    return np.ascontiguousarray(array).tobytes()


def output_array(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """The output in its declared datatype (a backend may hand back a wider or narrower type)."""
    if spec.datatype.name != "BYTES" and array.dtype != spec.datatype.numpy:
        return array.astype(spec.datatype.numpy)
    return array
