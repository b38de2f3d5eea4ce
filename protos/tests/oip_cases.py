"""Tensors and values shared by both sides of the Open Inference Protocol wire tests.

Imported by test_oip_wire.py (our generated `inference` package) and by
triton_side.py (the unmodified tritonclient package, in a subprocess). It must
import neither: both define the same `inference.*` protobuf symbols and cannot
live in one process.
"""

from __future__ import annotations

import numpy as np

MODEL_NAME = "fraud"
MODEL_VERSION = "2"
REQUEST_ID = "req-42"

# Inputs tritonclient serializes with InferInput.set_data_from_numpy:
# (name, protocol datatype, array). BF16 goes in as float32 values that bfloat16
# holds exactly, because tritonclient truncates float32 to its upper 16 bits.
REQUEST_INPUTS: tuple[tuple[str, str, np.ndarray], ...] = (
    ("dense", "FP32", np.array([[0.5, -1.25, 3.0e7], [1.0e-3, 0.0, -7.75]], dtype=np.float32)),
    ("ids", "INT64", np.array([[1, -2, 2**40, -(2**62)], [0, 7, 8, 2**63 - 1]], dtype=np.int64)),
    ("mask", "BOOL", np.array([[True, False], [False, True]], dtype=np.bool_)),
    (
        "text",
        "BYTES",
        np.array([[b"alpha", b""], [b"\x00\xff\x10", "naïve".encode()]], dtype=np.object_),
    ),
    ("half", "FP16", np.array([0.5, -2.0, 65504.0], dtype=np.float16)),
    ("bf16", "BF16", np.array([1.0, -0.5, 3.140625, 256.0], dtype=np.float32)),
)

# Outputs the client asks for: (name, class_count); class_count > 0 becomes the
# "classification" output parameter.
REQUESTED_OUTPUTS: tuple[tuple[str, int], ...] = (("score", 0), ("label", 3))

# Arguments of the tritonclient call that become request parameters.
SEQUENCE_ID = 7
SEQUENCE_START = True
SEQUENCE_END = False
PRIORITY = 3
TIMEOUT_US = 1000
USER_PARAMETERS: dict[str, str | bool | int] = {"tenant": "acme", "explain": True, "top_k": 5}
# tritonclient 2.41 has no API for double parameters; the test sets it on the message.
DOUBLE_PARAMETER = ("temperature", 0.25)

# What a server must see in ModelInferRequest.parameters: name -> (oneof field, value).
EXPECTED_REQUEST_PARAMETERS: dict[str, tuple[str, object]] = {
    "sequence_id": ("int64_param", SEQUENCE_ID),
    "sequence_start": ("bool_param", SEQUENCE_START),
    "sequence_end": ("bool_param", SEQUENCE_END),
    "priority": ("uint64_param", PRIORITY),
    "timeout": ("int64_param", TIMEOUT_US),
    "tenant": ("string_param", "acme"),
    "explain": ("bool_param", True),
    "top_k": ("int64_param", 5),
    "temperature": ("double_param", 0.25),
}

# Outputs our side puts in a ModelInferResponse as raw_output_contents.
RESPONSE_OUTPUTS: tuple[tuple[str, str, np.ndarray], ...] = (
    ("score", "FP32", np.array([[0.125], [0.875]], dtype=np.float32)),
    ("label", "BYTES", np.array([b"legit", b"fraud\x00\xfe"], dtype=np.object_)),
    ("ids", "INT64", np.array([[-(2**62), 2**40, 0]], dtype=np.int64)),
    ("mask", "BOOL", np.array([True, False, True], dtype=np.bool_)),
    ("half", "FP16", np.array([[1.5, -0.25]], dtype=np.float16)),
    ("bf16", "BF16", np.array([[2.0, -3.140625]], dtype=np.float32)),
    ("counts", "UINT8", np.array([0, 1, 255], dtype=np.uint8)),
    ("i32", "INT32", np.array([-(2**31), 2**31 - 1], dtype=np.int32)),
    ("u64", "UINT64", np.array([2**64 - 1, 1], dtype=np.uint64)),
    ("f64", "FP64", np.array([1.0e-300, -2.5], dtype=np.float64)),
)

# Values of the metadata/config/statistics messages both sides check.
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
VERSIONS = ("1", "2")
MAX_BATCH_SIZE = 64
PREFERRED_BATCH_SIZES = (8, 16)
MAX_QUEUE_DELAY_US = 500
SERVER_EXTENSIONS = ("model_repository", "statistics", "model_configuration")
STREAM_ERROR = "model 'missing' is not ready"

# Tensor signatures in ModelMetadataResponse: (name, datatype, shape).
METADATA_INPUTS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("dense", "FP32", (-1, 3)),
    ("ids", "INT64", (-1, -1)),
    ("text", "BYTES", (-1, 1)),
)
METADATA_OUTPUTS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("score", "FP32", (-1, 1)),
    ("label", "BYTES", (-1, 1)),
)

# Outputs sent as typed InferTensorContents instead of raw bytes:
# (name, datatype, InferTensorContents field, values).
TYPED_OUTPUTS: tuple[tuple[str, str, str, tuple[object, ...]], ...] = (
    ("score", "FP32", "fp32_contents", (0.25, -1.5)),
    ("ids", "INT64", "int64_contents", (2**40, -1)),
    ("mask", "BOOL", "bool_contents", (True, False)),
    ("label", "BYTES", "bytes_contents", (b"a", b"\xff\x00")),
    ("i32", "INT32", "int_contents", (-5, 6)),
    ("counts", "UINT8", "uint_contents", (255, 0)),
    ("u64", "UINT64", "uint64_contents", (2**64 - 1, 0)),
    ("f64", "FP64", "fp64_contents", (1.0e-300, -2.5)),
)
