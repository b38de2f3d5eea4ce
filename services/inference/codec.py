"""Open Inference Protocol tensors <-> numpy: request inputs checked against the model, outputs encoded.

Raw tensors (`raw_input_contents`, what tritonclient always sends) are wrapped
with `numpy.frombuffer` without copying; typed `contents` are accepted too.
Every check names the input and says what was expected and what was given.
"""

from __future__ import annotations

import math

import numpy as np

from inference import grpc_service_pb2 as pb
from services.inference.datatypes import decode_bytes_tensor, encode_bytes_tensor
from services.inference.errors import InvalidInput
from services.inference.model_config import TensorSpec
from services.inference.repository import ServingVersion

# Typed contents field holding each datatype (FP16/BF16 must be sent raw).
_CONTENTS_FIELD = {
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


def _from_raw(model: ServingVersion, spec: TensorSpec, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
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
            f"input '{spec.name}' of model '{model.model}': {len(raw)} bytes of raw data given, expected "
            f"{expected} ({count} x {datatype.name} for shape {list(shape)})"
        )
    return np.frombuffer(raw, dtype=datatype.numpy).reshape(shape)


def _from_contents(
    model: ServingVersion,
    spec: TensorSpec,
    shape: tuple[int, ...],
    tensor: pb.ModelInferRequest.InferInputTensor,
) -> np.ndarray:
    name = spec.datatype.name
    field = _CONTENTS_FIELD.get(name)
    if field is None:
        raise InvalidInput(
            f"input '{spec.name}' of model '{model.model}': {name} data must be sent in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input '{spec.name}' of model '{model.model}': {len(values)} values given in contents.{field}, "
            f"expected {count} for shape {list(shape)}"
        )
    if name == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.asarray(values, dtype=spec.datatype.numpy).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(
            f"input '{spec.name}' of model '{model.model}': {name} values out of range: {exc}"
        ) from None


def decode_inputs(model: ServingVersion, request: pb.ModelInferRequest) -> tuple[dict[str, np.ndarray], int]:
    """Checks the request's inputs against the model and returns them as arrays, plus the batch rows.

    Raises:
        InvalidInput: A missing, unknown or duplicate input, a wrong datatype, shape or byte length.
    """
    raw_contents = request.raw_input_contents
    n_raw = len(raw_contents)
    tensors = request.inputs
    if n_raw and n_raw != len(tensors):
        raise InvalidInput(
            f"model '{model.model}': {n_raw} raw_input_contents given for {len(tensors)} inputs; "
            "expected one per input"
        )
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
        shape = tuple(tensor.shape)
        _check_shape(model, spec, shape)
        if n_raw:
            array = _from_raw(model, spec, shape, raw_contents[i])
        else:
            array = _from_contents(model, spec, shape, tensor)
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


def requested_outputs(model: ServingVersion, request: pb.ModelInferRequest) -> list[int] | None:
    """Indexes of the requested outputs in the model's order; None means all.

    Raises:
        InvalidInput: An unknown output name, or a classification request (not supported).
    """
    if not request.outputs:
        return None
    indexes = []
    for out in request.outputs:
        index = model.output_index.get(out.name)
        if index is None:
            raise InvalidInput(
                f"unexpected output '{out.name}' requested from model '{model.model}'; "
                f"expected outputs: {sorted(model.output_index)}"
            )
        if "classification" in out.parameters and out.parameters["classification"].int64_param:
            raise InvalidInput(f"output '{out.name}': the classification extension is not supported")
        indexes.append(index)
    return indexes


def encode_response(
    model: ServingVersion,
    request: pb.ModelInferRequest,
    outputs: list[np.ndarray],
    selected: list[int] | None,
) -> pb.ModelInferResponse:
    """Builds the response with raw_output_contents (what tritonclient's as_numpy reads first)."""
    specs = model.spec.outputs
    tensors = []
    raws = []
    for index in range(len(specs)) if selected is None else selected:
        spec = specs[index]
        array = outputs[index]
        tensors.append(
            pb.ModelInferResponse.InferOutputTensor(
                name=spec.name, datatype=spec.datatype.name, shape=array.shape
            )
        )
        if spec.datatype.name == "BYTES":
            raws.append(encode_bytes_tensor(array))
        else:
            if array.dtype != spec.datatype.numpy:
                array = array.astype(spec.datatype.numpy)
            raws.append(array.tobytes())
    return pb.ModelInferResponse(
        model_name=model.model,
        model_version=model.version_str,
        id=request.id,
        outputs=tensors,
        raw_output_contents=raws,
    )
