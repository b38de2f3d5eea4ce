"""The demo fraud model: deterministic training, both versions, the features description."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from stack import demo_model as demo


def test_demo_repository_is_deterministic_and_described(tmp_path: Path) -> None:
    a = demo.write_repository(tmp_path / "a", samples=3000)
    b = demo.write_repository(tmp_path / "b", samples=3000)
    for version in ("1", "2"):
        assert (a / version / "model.onnx").read_bytes() == (b / version / "model.onnx").read_bytes()
    assert (a / "1" / "model.onnx").read_bytes() != (a / "2" / "model.onnx").read_bytes()
    described = json.loads((a / "features.json").read_text())
    names = [f["name"] for f in described["features"]]
    assert names == list(demo.FEATURE_NAMES) and len(names) == 32 == len(set(names))
    assert {"amount", "user:txn_count_1h", "merchant:fraud_rate_30d"} <= set(names)
    assert all(f["source"] in ("request", "user", "merchant", "device") for f in described["features"])
    report = json.loads((a / "2" / "training.json").read_text())
    assert report["holdout_auc"] > 0.6


def test_demo_model_scores_transactions_like_its_training_code(tmp_path: Path) -> None:
    model_dir = demo.write_repository(tmp_path, samples=2000)
    x, _ = demo.synthetic_transactions(64, seed=7)
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"))
    (y,) = session.run(None, {"features": x})
    assert y.shape == (64, 1) and np.all((y >= 0) & (y <= 1))
    assert session.get_inputs()[0].shape == ["batch", 32]


def test_the_gateways_input_layout_of_the_demo_model_is_its_description() -> None:
    layout = Path(__file__).resolve().parents[2] / "deploy" / "local" / "input-layouts" / "fraud.json"
    assert json.loads(layout.read_text()) == demo.features_description()
