"""config.pbtxt parsing and checking: Triton's format, defaults, version policies, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from inference import model_config_pb2 as mc
from services.inference.datatypes import BY_CONFIG_TYPE, decode_bytes_tensor, encode_bytes_tensor
from services.inference.errors import ModelConfigError
from services.inference.model_config import (
    VersionPolicy,
    complete_config,
    parse_config_text,
    spec_from_config,
)

# One FP32 input x and one FP32 output y of one element.
IO1 = 'input { name: "x" data_type: TYPE_FP32 dims: 1 } output { name: "y" data_type: TYPE_FP32 dims: 1 }'
FULL = """
name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 16
version_policy: { latest: { num_versions: 2 } }
input [ { name: "a" data_type: TYPE_FP32 dims: [ 4, -1 ] }, { name: "b" data_type: TYPE_STRING dims: [ 1 ] optional: true } ]
output [ { name: "y" data_type: TYPE_INT64 dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 250 preferred_batch_size: [ 8, 4 ]
  default_queue_policy { max_queue_size: 7 default_timeout_microseconds: 9000 } }
instance_group [ { count: 2 kind: KIND_CPU }, { count: 1 kind: KIND_CPU } ]
parameters { key: "fallback_backend" value: { string_value: "onnxruntime" } }
"""


def test_full_triton_config_becomes_a_spec() -> None:
    spec = spec_from_config(parse_config_text(FULL, "t"), "m")
    assert spec.backend == "onnxruntime" and spec.platform == "onnxruntime_onnx"
    assert spec.max_batch_size == 16 and spec.batched
    a, b = spec.inputs
    assert a.datatype is BY_CONFIG_TYPE[mc.TYPE_FP32] and a.dims == (4, -1) and a.shape(True) == [-1, 4, -1]
    assert b.datatype is BY_CONFIG_TYPE[mc.TYPE_STRING] and b.optional
    assert spec.outputs[0].datatype is BY_CONFIG_TYPE[mc.TYPE_INT64]
    assert spec.batching.dynamic and spec.batching.max_queue_delay_us == 250
    assert spec.batching.preferred_batch_sizes == (4, 8)
    assert spec.batching.max_queue_size == 7 and spec.batching.default_timeout_us == 9000
    assert spec.instance_count == 3
    assert spec.version_policy == VersionPolicy("latest", latest=2)
    assert spec.fallback_backend == "onnxruntime"
    assert spec.config.backend == "onnxruntime"


def test_defaults_onnxruntime_latest_one_and_no_batching() -> None:
    spec = spec_from_config(
        parse_config_text(
            'input { name: "x" data_type: TYPE_FP32 dims: 2 } output { name: "y" data_type: TYPE_FP32 dims: 2 }',
            "t",
        ),
        "m",
    )
    assert spec.backend == "onnxruntime" and spec.config.name == "m"
    assert not spec.batched and not spec.batching.dynamic
    assert spec.version_policy.select([1, 2, 3]) == [3]
    assert spec.instance_count == 1


def test_version_policies_select_versions() -> None:
    assert VersionPolicy("all").select([3, 1, 2]) == [1, 2, 3]
    assert VersionPolicy("latest", latest=2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy("specific", versions=(1, 3, 9)).select([1, 2, 3]) == [1, 3]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch_size: oops", "t: "),
        ('name: "other" ' + IO1, "does not match the model folder 'm'"),
        ('backend: "pytorch" ' + IO1, "unknown backend 'pytorch'"),
        ("sequence_batching { } " + IO1, "sequence_batching is not supported"),
        (
            'input { name: "x" data_type: TYPE_FP32 dims: 0 } output { name: "y" data_type: TYPE_FP32 dims: 1 }',
            "input 'x' has invalid dims [0]",
        ),
        (
            'input { name: "x" data_type: TYPE_BF16 dims: 1 } output { name: "y" data_type: TYPE_FP32 dims: 1 }',
            "unsupported data_type TYPE_BF16",
        ),
        (
            "max_batch_size: 4 dynamic_batching { preferred_batch_size: 8 } " + IO1,
            "preferred_batch_size 8 is outside 1..4",
        ),
        ('input { name: "x" data_type: TYPE_FP32 dims: 1 } ' + IO1, "duplicate input names"),
        ("max_batch_size: 1", "lists no inputs or no outputs"),
    ],
)
def test_bad_configs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ModelConfigError) as err:
        spec_from_config(parse_config_text(text, "t"), "m")
    assert message in err.value.message


def test_auto_complete_fills_tensors_from_the_model_signature() -> None:
    config = parse_config_text("max_batch_size: 8", "t")
    fp32 = BY_CONFIG_TYPE[mc.TYPE_FP32]
    complete_config(config, [("x", fp32, [-1, 32])], [("y", fp32, [-1, 1])])
    spec = spec_from_config(config, "m")
    assert spec.inputs[0].dims == (32,) and spec.outputs[0].dims == (1,)


def test_bytes_tensor_round_trip_and_malformed_buffers() -> None:
    array = np.array([b"a", b"", "h\xe9llo".encode(), b"\x00\xff"], dtype=object)
    raw = encode_bytes_tensor(array)
    assert list(decode_bytes_tensor(raw, 4)) == list(array)
    with pytest.raises(ValueError, match="holds 4 elements, expected 5"):
        decode_bytes_tensor(raw + b"\x00", 5)
    with pytest.raises(ValueError, match="too few for 1099511627776 elements"):
        decode_bytes_tensor(raw, 2**40)
    with pytest.raises(ValueError, match="after the 3 expected"):
        decode_bytes_tensor(raw, 3)
    with pytest.raises(ValueError, match="claims"):
        decode_bytes_tensor(b"\x09\x00\x00\x00abc", 1)


def test_latency_target_parameter() -> None:
    text = """
        max_batch_size: 8
        input { name: "x" data_type: TYPE_FP32 dims: [2] }
        output { name: "y" data_type: TYPE_FP32 dims: [2] }
        dynamic_batching { max_queue_delay_microseconds: 1000 }
        parameters { key: "latency_target_p99_ms" value: { string_value: "%s" } }
    """
    spec = spec_from_config(parse_config_text(text % "10", "t"), "m")
    assert spec.batching.latency_target_us == 10_000
    for bad in ("0", "-1", "ten", "nan"):
        with pytest.raises(ModelConfigError, match="latency_target_p99_ms"):
            spec_from_config(parse_config_text(text % bad, "t"), "m")
    no_batching = text.replace("dynamic_batching { max_queue_delay_microseconds: 1000 }", "")
    with pytest.raises(ModelConfigError, match="needs dynamic_batching"):
        spec_from_config(parse_config_text(no_batching % "10", "t"), "m")
