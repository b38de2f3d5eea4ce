"""Small model repositories for the inference tests, written into a temporary folder."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from services.inference.backends import LoadedModel
from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.config import ModelServingConfig
from services.inference.model_config import ModelSpec
from stack import demo_model as demo

# Identity model over every datatype the protocol must carry: (input, output, ONNX type, config type).
TYPES = (
    ("in_fp32", "out_fp32", TensorProto.FLOAT, "TYPE_FP32", "FP32"),
    ("in_fp16", "out_fp16", TensorProto.FLOAT16, "TYPE_FP16", "FP16"),
    ("in_int32", "out_int32", TensorProto.INT32, "TYPE_INT32", "INT32"),
    ("in_int64", "out_int64", TensorProto.INT64, "TYPE_INT64", "INT64"),
    ("in_bool", "out_bool", TensorProto.BOOL, "TYPE_BOOL", "BOOL"),
    ("in_bytes", "out_bytes", TensorProto.STRING, "TYPE_STRING", "BYTES"),
)
TYPES_DIMS = 3


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Checks `model` and writes it to `path` (IR version 9, which the pinned ONNX Runtime reads)."""
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def types_model() -> onnx.ModelProto:
    """Each input copied to its output (batch dimension dynamic)."""
    nodes = [helper.make_node("Identity", [i], [o]) for i, o, *_ in TYPES]
    graph = helper.make_graph(
        nodes,
        "types",
        [helper.make_tensor_value_info(i, t, ["batch", TYPES_DIMS]) for i, _, t, *_ in TYPES],
        [helper.make_tensor_value_info(o, t, ["batch", TYPES_DIMS]) for _, o, t, *_ in TYPES],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def double_model(dims: tuple[str | int, ...] = ("a", "b"), name: str = "double") -> onnx.ModelProto:
    """y = 2x over a float tensor of `dims` (names are free dims; the default: no batching, both free)."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), name="two")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        initializer=[two],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


TYPES_CONFIG = (
    'name: "types"\nmax_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 1000 }\n'
    + "".join(
        f'input {{ name: "{i}" data_type: {ct} dims: [ {TYPES_DIMS} ] }}\n'
        f'output {{ name: "{o}" data_type: {ct} dims: [ {TYPES_DIMS} ] }}\n'
        for i, o, _, ct, _ in TYPES
    )
)

DOUBLE_CONFIG = """name: "double"
max_batch_size: 0
input { name: "x" data_type: TYPE_FP32 dims: [ -1, -1 ] }
output { name: "y" data_type: TYPE_FP32 dims: [ -1, -1 ] }
"""

# Same ONNX file, configured for TensorRT; with and without an ONNX Runtime fallback.
TRT_FALLBACK_CONFIG = """name: "trt_fallback"
backend: "tensorrt"
max_batch_size: 0
input { name: "x" data_type: TYPE_FP32 dims: [ -1, -1 ] }
output { name: "y" data_type: TYPE_FP32 dims: [ -1, -1 ] }
parameters { key: "fallback_backend" value: { string_value: "onnxruntime" } }
"""
TRT_ONLY_CONFIG = TRT_FALLBACK_CONFIG.replace("trt_fallback", "trt_only").split("parameters")[0]


def write_repository(root: Path, *, fraud_samples: int = 4000, broken: bool = True) -> Path:
    """Writes fraud (demo, 2 versions), types, double, trt_fallback, trt_only and (optionally) broken."""
    demo.write_repository(root, samples=fraud_samples)
    save_model(types_model(), root / "types" / "1" / "model.onnx")
    (root / "types" / "config.pbtxt").write_text(TYPES_CONFIG)
    for name, config in (
        ("double", DOUBLE_CONFIG),
        ("trt_fallback", TRT_FALLBACK_CONFIG),
        ("trt_only", TRT_ONLY_CONFIG),
    ):
        save_model(double_model(), root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(config)
    if broken:
        (root / "broken" / "1").mkdir(parents=True)
        (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
        (root / "broken" / "config.pbtxt").write_text(DOUBLE_CONFIG.replace('"double"', '"broken"'))
    return root


class HookedBackend(OnnxRuntimeBackend):
    """The real ONNX Runtime backend; its models call `before(inputs)` ahead of every run (warm-ups
    included), so a test can slow runs down, hold them or record what ran."""

    def __init__(self, before: Callable[[Mapping[str, np.ndarray]], None]) -> None:
        super().__init__(ModelServingConfig())
        self.before = before

    def load(self, model_path: Path, spec: ModelSpec) -> LoadedModel:
        return _Hooked(super().load(model_path, spec), self.before)


@dataclass
class _Hooked:
    inner: LoadedModel
    before: Callable[[Mapping[str, np.ndarray]], None]

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        self.before(inputs)
        return self.inner.run(inputs, output_names)

    def close(self) -> None:
        self.inner.close()
