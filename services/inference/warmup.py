"""Warm-up samples for a model version: Triton's `model_warmup`, or synthetic zeros for numeric models.

With `model_warmup` in config.pbtxt, each sample runs `count` times (at least once) after the version
loads, exactly as configured: `zero_data`, `random_data` or `input_data_file` (a file in the model's
`warmup/` folder holding one batch item: raw little-endian values, or for BYTES the protocol's
length-prefixed elements), repeated `batch_size` times. Without it, a model whose inputs are all numeric
gets one batch-1 inference on zeros (catches a model that cannot run before it serves); a model with a
BYTES input gets none, since no synthetic string is valid for every model (digits for a `Cast`, JSON for a
parser, ...): configure `model_warmup` for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference import model_config_pb2 as mc
from services.inference.datatypes import BY_CONFIG_TYPE, decode_bytes_tensor
from services.inference.errors import InvalidConfig
from services.inference.model_config import ModelSpec

WARMUP_FOLDER = "warmup"
MAX_WARMUP_COUNT = 1000
# Per input and sample: a warm-up must not make the server allocate without bound.
MAX_WARMUP_ELEMENTS = 1 << 22
MAX_WARMUP_FILE_BYTES = 64 << 20


@dataclass(frozen=True)
class WarmupSample:
    """One warm-up request: its name (for errors), the inputs, how many times to run it."""

    name: str
    inputs: dict[str, np.ndarray]
    count: int


def warmup_samples(spec: ModelSpec, model_dir: Path) -> list[WarmupSample]:
    """The samples to run after loading a version of `spec` (see the module docstring).

    Raises:
        InvalidConfig: A `model_warmup` entry is inconsistent with the model's inputs, or its data file is
            missing, outside the model's `warmup/` folder or of the wrong size; the message names it.
    """
    if not spec.config.model_warmup:
        if any(t.datatype.name == "BYTES" for t in spec.inputs if not t.optional):
            return []
        return [WarmupSample("zeros", _zeros(spec), 1)]
    names = [w.name for w in spec.config.model_warmup]
    if len(set(names)) != len(names):
        raise InvalidConfig(f"model '{spec.name}': model_warmup names must be unique, got {names}")
    return [_sample(spec, model_dir, warmup) for warmup in spec.config.model_warmup]


def _zeros(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Zero inputs with batch size 1 and every dynamic dimension 1."""
    inputs: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        if not tensor.optional:
            shape = tuple(1 if d < 0 else d for d in tensor.shape(spec.batched))
            inputs[tensor.name] = np.zeros(shape, dtype=tensor.datatype.numpy)
    return inputs


def _sample(spec: ModelSpec, model_dir: Path, warmup: mc.ModelWarmup) -> WarmupSample:
    where = f"model '{spec.name}': model_warmup '{warmup.name}'"
    if not warmup.name:
        raise InvalidConfig(f"model '{spec.name}': a model_warmup entry has no name")
    batch = int(warmup.batch_size) or 1
    if spec.batched and batch > spec.max_batch_size:
        raise InvalidConfig(f"{where}: batch_size {batch} is above max_batch_size {spec.max_batch_size}")
    if not spec.batched and batch != 1:
        raise InvalidConfig(f"{where}: batch_size must be 1 for a model without batching, got {batch}")
    count = int(warmup.count) or 1
    if count > MAX_WARMUP_COUNT:
        raise InvalidConfig(f"{where}: count {count} is above {MAX_WARMUP_COUNT}")
    known = {t.name: t for t in spec.inputs}
    unknown = sorted(set(warmup.inputs) - set(known))
    if unknown:
        raise InvalidConfig(f"{where}: unknown input(s) {unknown}; the model's inputs are {sorted(known)}")
    missing = sorted(t.name for t in spec.inputs if not t.optional and t.name not in warmup.inputs)
    if missing:
        raise InvalidConfig(f"{where}: no data for input(s) {missing}")
    rng = np.random.default_rng(0)
    inputs: dict[str, np.ndarray] = {}
    for name, entry in warmup.inputs.items():
        tensor = known[name]
        at = f"{where}: input '{name}'"
        datatype = BY_CONFIG_TYPE.get(entry.data_type)
        if datatype is None or datatype != tensor.datatype:
            raise InvalidConfig(
                f"{at}: data_type {mc.DataType.Name(entry.data_type)} does not match the input's "
                f"{tensor.datatype.config_name}"
            )
        dims = tuple(int(d) for d in entry.dims)
        if len(dims) != len(tensor.dims) or any(
            d < 1 or (want >= 0 and d != want) for d, want in zip(dims, tensor.dims, strict=False)
        ):
            raise InvalidConfig(f"{at}: dims {list(dims)} do not fit the input's dims {list(tensor.dims)}")
        elements = math.prod(dims)
        if elements * batch > MAX_WARMUP_ELEMENTS:
            raise InvalidConfig(f"{at}: {elements * batch} elements, at most {MAX_WARMUP_ELEMENTS}")
        item = _item(
            entry,
            datatype=datatype.name,
            dtype=datatype.numpy,
            dims=dims,
            elements=elements,
            model_dir=model_dir,
            rng=rng,
            at=at,
        )
        inputs[name] = np.stack([item] * batch) if spec.batched else item
    return WarmupSample(warmup.name, inputs, count)


def _item(
    entry: mc.ModelWarmup.Input,
    *,
    datatype: str,
    dtype: np.dtype,
    dims: tuple[int, ...],
    elements: int,
    model_dir: Path,
    rng: np.random.Generator,
    at: str,
) -> np.ndarray:
    """One batch item of an input's warm-up data."""
    kind = entry.WhichOneof("input_data_type")
    if kind == "zero_data":
        return np.full(dims, b"", dtype=object) if datatype == "BYTES" else np.zeros(dims, dtype=dtype)
    if kind == "random_data":
        if datatype == "BYTES":  # decimal digits: the random strings most string models can parse
            digits = [str(v).encode() for v in rng.integers(0, 100, elements)]
            return np.array(digits, dtype=object).reshape(dims)
        if datatype == "BOOL":
            return rng.integers(0, 2, dims).astype(bool)
        if np.issubdtype(dtype, np.floating):
            return rng.random(dims).astype(dtype)
        return rng.integers(0, 100, dims).astype(dtype)
    if kind == "input_data_file":
        return _from_file(
            entry.input_data_file,
            datatype=datatype,
            dtype=dtype,
            dims=dims,
            elements=elements,
            model_dir=model_dir,
            at=at,
        )
    raise InvalidConfig(f"{at}: set one of zero_data, random_data or input_data_file")


def _from_file(
    filename: str,
    *,
    datatype: str,
    dtype: np.dtype,
    dims: tuple[int, ...],
    elements: int,
    model_dir: Path,
    at: str,
) -> np.ndarray:
    folder = (model_dir / WARMUP_FOLDER).resolve()
    path = (folder / filename).resolve()
    if not filename or path.parent != folder:
        raise InvalidConfig(
            f"{at}: input_data_file {filename!r} must name a file in the model's warmup/ folder"
        )
    try:
        size = path.stat().st_size
        if size > MAX_WARMUP_FILE_BYTES:
            raise InvalidConfig(
                f"{at}: input_data_file {filename!r} is {size} bytes, at most {MAX_WARMUP_FILE_BYTES}"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidConfig(f"{at}: cannot read input_data_file {filename!r}: {exc.strerror}") from None
    if datatype == "BYTES":
        try:
            return decode_bytes_tensor(raw, elements).reshape(dims)
        except ValueError as exc:
            raise InvalidConfig(f"{at}: input_data_file {filename!r} {exc}") from None
    expected = elements * dtype.itemsize
    if len(raw) != expected:
        raise InvalidConfig(
            f"{at}: input_data_file {filename!r} has {len(raw)} bytes, expected {expected} ({elements} values)"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(dims).copy()
