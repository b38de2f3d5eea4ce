"""Backends: ONNX Runtime against the model file directly; TensorRT's paths that run without a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.backends.tensorrt import TensorRTBackend, plan_cache_key, profile_shapes
from services.inference.config import ModelServingConfig
from services.inference.errors import BackendUnavailable, ModelConfigError, ModelLoadError
from services.inference.model_config import read_config, spec_from_config


def _spec(root: Path, name: str):  # type: ignore[no-untyped-def]
    return spec_from_config(read_config(root / name), name)


def test_onnxruntime_runs_like_a_plain_session(model_repo: Path) -> None:
    path = model_repo / "fraud" / "2" / "model.onnx"
    model = OnnxRuntimeBackend(ModelServingConfig()).load(path, _spec(model_repo, "fraud"))
    x = np.random.default_rng(1).normal(20, 10, (7, 32)).astype(np.float32)
    (y,) = model.run({"features": x}, ["fraud_probability"])
    expected = ort.InferenceSession(str(path)).run(None, {"features": x})[0]
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    model.close()


def test_onnxruntime_carries_every_datatype(model_repo: Path) -> None:
    model = OnnxRuntimeBackend(ModelServingConfig()).load(
        model_repo / "types" / "1" / "model.onnx", _spec(model_repo, "types")
    )
    inputs = {
        "in_fp32": np.ones((2, 3), np.float32),
        "in_fp16": np.full((2, 3), 1.5, np.float16),
        "in_int32": np.arange(6, dtype=np.int32).reshape(2, 3),
        "in_int64": np.arange(6, dtype=np.int64).reshape(2, 3) * 2**40,
        "in_bool": np.array([[True, False, True]] * 2),
        "in_bytes": np.array([[b"a", b"bc", b"\xc3\xa9"]] * 2, dtype=object),
    }
    outputs = model.run(inputs, ["out_" + k[3:] for k in inputs])
    for (name, given), got in zip(inputs.items(), outputs, strict=True):
        if name == "in_bytes":
            assert [v.encode() if isinstance(v, str) else v for v in got.reshape(-1)] == list(
                given.reshape(-1)
            )
        else:
            np.testing.assert_array_equal(got, given)


def test_onnxruntime_rejects_an_unreadable_file(model_repo: Path) -> None:
    with pytest.raises(ModelLoadError, match="ONNX Runtime cannot load"):
        OnnxRuntimeBackend(ModelServingConfig()).load(
            model_repo / "broken" / "1" / "model.onnx", _spec(model_repo, "broken")
        )


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_without_tensorrt_fails_with_a_clear_reason(model_repo: Path) -> None:
    backend = TensorRTBackend(ModelServingConfig())
    with pytest.raises(BackendUnavailable, match="TensorRT backend unavailable: cannot import tensorrt"):
        backend.load(model_repo / "trt_only" / "1" / "model.onnx", _spec(model_repo, "trt_only"))


def test_tensorrt_refuses_bytes_tensors_before_touching_the_gpu(model_repo: Path) -> None:
    spec = _spec(model_repo, "types").with_backend("tensorrt")
    with pytest.raises(ModelConfigError, match="TensorRT cannot take BYTES tensor 'in_bytes'"):
        TensorRTBackend(ModelServingConfig()).load(model_repo / "types" / "1" / "model.onnx", spec)


def test_tensorrt_signature_comes_from_the_onnx_file(model_repo: Path) -> None:
    inputs, outputs = TensorRTBackend(ModelServingConfig()).signature(
        model_repo / "fraud" / "1" / "model.onnx"
    )
    assert [(n, t.name, s) for n, t, s in inputs] == [("features", "FP32", [-1, 32])]
    assert [(n, t.name, s) for n, t, s in outputs] == [("fraud_probability", "FP32", [-1, 1])]


_PLAN: dict[str, Any] = {
    "gpu_name": "NVIDIA H200",
    "compute_capability": (9, 0),
    "trt_version": "10.3.0",
    "max_batch_size": 256,
    "fp16": True,
    "max_dim": 64,
}


def test_plan_cache_key_changes_with_model_gpu_version_and_profile() -> None:
    base = plan_cache_key(b"model", **_PLAN)
    assert base.endswith(".plan") and "nvidia-h200-sm90-trt10.3.0-b256" in base
    changes: list[dict[str, Any]] = [
        {"gpu_name": "NVIDIA A100", "compute_capability": (8, 0)},
        {"trt_version": "10.4.0"},
        {"max_batch_size": 128},
        {"fp16": False},
    ]
    others = {plan_cache_key(b"model2", **_PLAN)} | {
        plan_cache_key(b"model", **{**_PLAN, **change}) for change in changes
    }
    assert base not in others and len(others) == 5


def test_profile_shapes_cover_the_dynamic_batch() -> None:
    assert profile_shapes([-1, 32], True, 256, 64, 16) == ([1, 32], [64, 32], [256, 32])
    assert profile_shapes([-1, -1, 8], True, 8, 64, 16) == ([1, 1, 8], [8, 16, 8], [8, 16, 8])
    assert profile_shapes([-1, 4], False, 0, 1, 16) == ([1, 4], [16, 4], [16, 4])


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_gpu_check_says_why_it_cannot_run_here(capsys: pytest.CaptureFixture[str]) -> None:
    from tools import gpu_check

    assert gpu_check.main(["--seconds", "0.01"]) == 3
    assert "GPU check not run: TensorRT backend unavailable" in capsys.readouterr().err
