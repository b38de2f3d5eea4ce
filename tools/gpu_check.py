"""The prepared GPU check: TensorRT against ONNX Runtime on the demo model, and throughput per batch size.

Run on a GPU node after `pip install -r requirements-gpu.txt`:

    python -m tools.gpu_check --out gpu_check.json

It writes the demo repository into a temporary folder, builds the TensorRT
engine (FP16 where the GPU supports it), loads it a second time to show the plan
cache hit, compares outputs with ONNX Runtime within FP16 tolerances for batch
sizes 1..256, and records batches/s and rows/s per batch size. Exit status: 0 on
success, 1 when outputs differ, 3 when TensorRT cannot run here (the reason is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.inference.backends.onnxruntime import OnnxRuntimeBackend
from services.inference.backends.tensorrt import TensorRTBackend
from services.inference.config import ModelServingConfig
from services.inference.errors import BackendUnavailable
from services.inference.model_config import read_config, spec_from_config
from stack import demo_model as demo

BATCH_SIZES = (1, 8, 64, 256)
# FP16 engines: about three significant digits on probabilities in [0, 1].
RTOL, ATOL = 2e-2, 2e-3


def _rate(run: Any, inputs: dict[str, np.ndarray], seconds: float) -> float:
    for _ in range(20):
        run(inputs, [demo.OUTPUT_NAME])
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(inputs, [demo.OUTPUT_NAME])
        count += 1
    return count / (time.perf_counter() - start)


def check(root: Path, cache_dir: Path, seconds: float) -> dict[str, Any]:
    """Runs the comparison and the throughput sweep; raises BackendUnavailable without TensorRT."""
    model_dir = demo.write_repository(root, samples=8000)
    path = model_dir / "1" / "model.onnx"
    spec = spec_from_config(read_config(model_dir), demo.MODEL_NAME)
    options = ModelServingConfig(tensorrt_cache_dir=cache_dir)
    t0 = time.perf_counter()
    trt_model = TensorRTBackend(options).load(path, spec.with_backend("tensorrt"))
    first_load = time.perf_counter() - t0
    trt_model.close()
    t0 = time.perf_counter()
    trt_model = TensorRTBackend(options).load(path, spec.with_backend("tensorrt"))
    cached_load = time.perf_counter() - t0
    ort_model = OnnxRuntimeBackend(options).load(path, spec)
    report: dict[str, Any] = {
        "engine_build_and_load_s": round(first_load, 2),
        "cached_plan_load_s": round(cached_load, 2),
        "plans": sorted(p.name for p in cache_dir.glob("*.plan")),
        "batches": [],
    }
    ok = True
    for batch in BATCH_SIZES:
        x, _ = demo.synthetic_transactions(batch, seed=batch)
        inputs = {demo.INPUT_NAME: x}
        (expected,) = ort_model.run(inputs, [demo.OUTPUT_NAME])
        (got,) = trt_model.run(inputs, [demo.OUTPUT_NAME])
        max_diff = float(np.max(np.abs(got.astype(np.float32) - expected)))
        close = bool(np.allclose(got, expected, rtol=RTOL, atol=ATOL))
        ok = ok and close
        trt_rate = _rate(trt_model.run, inputs, seconds)
        ort_rate = _rate(ort_model.run, inputs, seconds)
        report["batches"].append(
            {
                "batch_size": batch,
                "allclose": close,
                "max_abs_diff": max_diff,
                "tensorrt_batches_per_s": round(trt_rate, 1),
                "tensorrt_rows_per_s": round(trt_rate * batch, 1),
                "onnxruntime_cpu_rows_per_s": round(ort_rate * batch, 1),
            }
        )
    report["ok"] = ok
    trt_model.close()
    ort_model.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per batch size and backend")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="infergrid-gpu-check-") as tmp:
        try:
            report = check(Path(tmp) / "models", Path(tmp) / "plans", args.seconds)
        except BackendUnavailable as exc:
            print(f"GPU check not run: {exc.message}", file=sys.stderr)
            return 3
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
