"""Tensor data types of the Open Inference Protocol, their numpy forms and the BYTES wire encoding."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from inference import model_config_pb2 as mc


@dataclass(frozen=True)
class DataType:
    """One protocol datatype: its request name ("FP32"), its config enum (TYPE_FP32) and numpy dtype."""

    name: str
    config_type: int
    numpy: np.dtype  # little-endian; object for BYTES
    # ORT's type string for the same type, e.g. "tensor(float)".
    onnx: str

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire; 0 for BYTES (length-prefixed, variable)."""
        return 0 if self.name == "BYTES" else int(self.numpy.itemsize)

    @property
    def config_name(self) -> str:
        """The model configuration spelling, e.g. "TYPE_FP32"."""
        return str(mc.DataType.Name(self.config_type))


_ALL = (
    DataType("BOOL", mc.TYPE_BOOL, np.dtype("?"), "tensor(bool)"),
    DataType("UINT8", mc.TYPE_UINT8, np.dtype("u1"), "tensor(uint8)"),
    DataType("UINT16", mc.TYPE_UINT16, np.dtype("<u2"), "tensor(uint16)"),
    DataType("UINT32", mc.TYPE_UINT32, np.dtype("<u4"), "tensor(uint32)"),
    DataType("UINT64", mc.TYPE_UINT64, np.dtype("<u8"), "tensor(uint64)"),
    DataType("INT8", mc.TYPE_INT8, np.dtype("i1"), "tensor(int8)"),
    DataType("INT16", mc.TYPE_INT16, np.dtype("<i2"), "tensor(int16)"),
    DataType("INT32", mc.TYPE_INT32, np.dtype("<i4"), "tensor(int32)"),
    DataType("INT64", mc.TYPE_INT64, np.dtype("<i8"), "tensor(int64)"),
    DataType("FP16", mc.TYPE_FP16, np.dtype("<f2"), "tensor(float16)"),
    DataType("FP32", mc.TYPE_FP32, np.dtype("<f4"), "tensor(float)"),
    DataType("FP64", mc.TYPE_FP64, np.dtype("<f8"), "tensor(double)"),
    DataType("BYTES", mc.TYPE_STRING, np.dtype(object), "tensor(string)"),
)

BY_CONFIG_TYPE: dict[int, DataType] = {t.config_type: t for t in _ALL}
BY_ONNX: dict[str, DataType] = {t.onnx: t for t in _ALL}

_LENGTH = struct.Struct("<I")


def decode_bytes_tensor(raw: bytes | memoryview, count: int) -> np.ndarray:
    """Decodes `count` length-prefixed elements (4-byte little-endian length, then the bytes).

    Raises:
        ValueError: The buffer does not hold exactly `count` well-formed elements.
    """
    size = len(raw)
    if count * 4 > size:  # checked before allocating: a shape must not make us allocate blindly
        raise ValueError(f"has {size} bytes, too few for {count} elements (4-byte length each)")
    out = np.empty(count, dtype=object)
    offset = 0
    view = memoryview(raw)
    for i in range(count):
        if offset + 4 > size:
            raise ValueError(f"holds {i} elements, expected {count}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise ValueError(f"element {i} claims {length} bytes but only {size - offset} remain")
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != size:
        raise ValueError(f"has {size - offset} bytes after the {count} expected elements")
    return out


def encode_bytes_tensor(array: np.ndarray) -> bytes:
    """Encodes a BYTES tensor (bytes or str elements) as length-prefixed elements, row-major."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts += (_LENGTH.pack(len(data)), data)
    return b"".join(parts)
