"""The demo model repository: a fraud model trained on synthetic transactions, in two versions.

`python -m stack.demo_model --repo DIR` writes

    DIR/fraud/config.pbtxt        Triton model configuration (dynamic batching on)
    DIR/fraud/features.json       the 32 input features in order: name, source, default (for features/gateway)
    DIR/fraud/1/model.onnx        version 1: a 32-64-32-1 MLP
    DIR/fraud/1/training.json     how it was trained and its hold-out AUC
    DIR/fraud/2/...               version 2: same architecture, longer training, weighted positives

Training is seeded and uses numpy only, so the same command writes the same
models. Inputs are raw feature values: the standardization is part of the graph.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from infergrid.features.v1 import features_pb2
from infergrid.gateway.v1 import gateway_pb2
from infergrid.types.v1 import value_pb2

MODEL_NAME = "fraud"
INPUT_NAME = "features"
OUTPUT_NAME = "fraud_probability"
MAX_BATCH_SIZE = 256
HIDDEN = (64, 32)


@dataclass(frozen=True)
class Feature:
    """One model input feature. `source` is where the serving path gets it."""

    name: str
    # "request": sent by the caller; otherwise the entity whose feature view holds it.
    source: str
    default: float
    description: str


FEATURES: tuple[Feature, ...] = (
    Feature("amount", "request", 0.0, "transaction amount in the account currency"),
    Feature("hour_of_day", "request", 12.0, "local hour of the transaction, 0-23"),
    Feature("is_weekend", "request", 0.0, "1 on Saturday/Sunday"),
    Feature("channel_online", "request", 0.0, "1 for card-not-present e-commerce"),
    Feature("card_present", "request", 1.0, "1 when the card was read by a terminal"),
    Feature("distance_from_home_km", "request", 0.0, "distance between the merchant and the user's home"),
    Feature("is_foreign", "request", 0.0, "1 when the merchant country differs from the card's"),
    Feature("device_new", "request", 0.0, "1 when the device was first seen for this user today"),
    Feature("user:txn_count_1h", "user", 0.0, "user's transactions in the last hour"),
    Feature("user:txn_count_24h", "user", 0.0, "user's transactions in the last 24 hours"),
    Feature("user:amount_sum_24h", "user", 0.0, "sum of the user's amounts in the last 24 hours"),
    Feature("user:avg_amount_30d", "user", 40.0, "user's mean amount over 30 days"),
    Feature("user:std_amount_30d", "user", 20.0, "standard deviation of the user's amounts over 30 days"),
    Feature("user:account_age_days", "user", 365.0, "days since the account was opened"),
    Feature("user:chargebacks_90d", "user", 0.0, "chargebacks on the user's cards in 90 days"),
    Feature("user:distinct_merchants_7d", "user", 3.0, "distinct merchants the user paid in 7 days"),
    Feature("user:distinct_countries_30d", "user", 1.0, "distinct merchant countries in 30 days"),
    Feature("user:failed_logins_24h", "user", 0.0, "failed logins in the last 24 hours"),
    Feature("user:days_since_last_txn", "user", 1.0, "days since the user's previous transaction"),
    Feature(
        "user:home_country_match_rate_30d", "user", 1.0, "share of 30-day transactions in the home country"
    ),
    Feature(
        "merchant:fraud_rate_30d", "merchant", 0.005, "share of the merchant's transactions that were fraud"
    ),
    Feature("merchant:txn_count_24h", "merchant", 150.0, "merchant's transactions in the last 24 hours"),
    Feature("merchant:avg_amount_30d", "merchant", 40.0, "merchant's mean amount over 30 days"),
    Feature("merchant:chargeback_rate_90d", "merchant", 0.003, "merchant's chargeback share over 90 days"),
    Feature("merchant:age_days", "merchant", 1000.0, "days since the merchant was onboarded"),
    Feature("merchant:category_risk", "merchant", 0.5, "risk score of the merchant category, 0-1"),
    Feature("merchant:refund_rate_30d", "merchant", 0.04, "merchant's refund share over 30 days"),
    Feature("merchant:distinct_users_24h", "merchant", 50.0, "distinct paying users in the last 24 hours"),
    Feature("device:risk_score", "device", 0.1, "device reputation risk, 0-1"),
    Feature("device:users_7d", "device", 1.0, "distinct users seen on the device in 7 days"),
    Feature("device:fraud_rate_30d", "device", 0.0, "share of the device's transactions that were fraud"),
    Feature("device:age_days", "device", 100.0, "days since the device was first seen"),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)
N_FEATURES = len(FEATURES)


@dataclass(frozen=True)
class VersionRecipe:
    """How one version is trained."""

    version: int
    seed: int
    epochs: int
    learning_rate: float
    positive_weight: float


RECIPES = (
    VersionRecipe(version=1, seed=1, epochs=3, learning_rate=1e-3, positive_weight=1.0),
    VersionRecipe(version=2, seed=2, epochs=8, learning_rate=1e-3, positive_weight=3.0),
)


def synthetic_transactions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` transactions (float32, FEATURES order) and fraud labels from a known, nonlinear rule."""
    rng = np.random.default_rng(seed)
    c: dict[str, np.ndarray] = {}
    c["user:avg_amount_30d"] = rng.lognormal(3.5, 0.6, n)
    c["amount"] = c["user:avg_amount_30d"] * rng.lognormal(0.0, 0.8, n)
    c["hour_of_day"] = rng.integers(0, 24, n).astype(float)
    c["is_weekend"] = rng.binomial(1, 0.28, n).astype(float)
    c["channel_online"] = rng.binomial(1, 0.6, n).astype(float)
    c["card_present"] = np.where(c["channel_online"] > 0, rng.binomial(1, 0.05, n), rng.binomial(1, 0.9, n))
    c["distance_from_home_km"] = rng.exponential(15.0, n)
    c["is_foreign"] = rng.binomial(1, 0.05, n).astype(float)
    c["device_new"] = rng.binomial(1, 0.1, n).astype(float)
    c["user:txn_count_1h"] = rng.poisson(0.3, n).astype(float)
    c["user:txn_count_24h"] = c["user:txn_count_1h"] + rng.poisson(3.0, n)
    c["user:amount_sum_24h"] = c["user:txn_count_24h"] * c["user:avg_amount_30d"] * rng.lognormal(0, 0.3, n)
    c["user:std_amount_30d"] = c["user:avg_amount_30d"] * rng.uniform(0.2, 1.0, n)
    c["user:account_age_days"] = rng.exponential(700.0, n)
    c["user:chargebacks_90d"] = rng.poisson(0.05, n).astype(float)
    c["user:distinct_merchants_7d"] = rng.poisson(5.0, n).astype(float)
    c["user:distinct_countries_30d"] = 1.0 + rng.poisson(0.2, n)
    c["user:failed_logins_24h"] = rng.poisson(0.1, n).astype(float)
    c["user:days_since_last_txn"] = rng.exponential(2.0, n)
    c["user:home_country_match_rate_30d"] = rng.beta(20.0, 1.0, n)
    c["merchant:fraud_rate_30d"] = rng.beta(1.0, 200.0, n)
    c["merchant:txn_count_24h"] = rng.lognormal(5.0, 1.0, n)
    c["merchant:avg_amount_30d"] = rng.lognormal(3.7, 0.7, n)
    c["merchant:chargeback_rate_90d"] = rng.beta(1.0, 300.0, n)
    c["merchant:age_days"] = rng.exponential(1500.0, n)
    c["merchant:category_risk"] = rng.uniform(0.0, 1.0, n)
    c["merchant:refund_rate_30d"] = rng.beta(2.0, 50.0, n)
    c["merchant:distinct_users_24h"] = rng.lognormal(4.0, 1.0, n)
    c["device:risk_score"] = rng.beta(1.0, 10.0, n)
    c["device:users_7d"] = 1.0 + rng.poisson(0.2, n)
    c["device:fraud_rate_30d"] = rng.beta(1.0, 300.0, n)
    c["device:age_days"] = rng.exponential(300.0, n)
    night = (c["hour_of_day"] < 6).astype(float)
    logit = (
        -5.2
        + 1.1 * np.log(c["amount"] / c["user:avg_amount_30d"])
        + 0.9 * c["is_foreign"]
        + 0.8 * c["device_new"] * c["channel_online"]
        + 0.5 * np.minimum(c["user:txn_count_1h"], 4)
        + 60.0 * c["merchant:fraud_rate_30d"]
        + 2.5 * c["device:risk_score"]
        + 0.6 * np.minimum(c["user:failed_logins_24h"], 3)
        + 0.7 * c["user:chargebacks_90d"]
        + 0.9 * (1 - c["card_present"]) * c["channel_online"]
        + 0.6 * night
        - 0.35 * np.log1p(c["user:account_age_days"] / 30.0)
        + 0.01 * np.minimum(c["distance_from_home_km"], 200)
        + 0.5 * (c["user:distinct_countries_30d"] - 1)
        + 0.8 * c["merchant:category_risk"] * c["channel_online"]
        + 40.0 * c["device:fraud_rate_30d"]
        - 1.5 * (c["user:home_country_match_rate_30d"] - 0.95)
    )
    labels = rng.binomial(1, 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    features = np.stack([c[name] for name in FEATURE_NAMES], axis=1).astype(np.float32)
    return features, labels


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train(recipe: VersionRecipe, features: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Trains the MLP with Adam on weighted log loss; returns its parameters (float32)."""
    rng = np.random.default_rng(recipe.seed)
    mean = features.mean(axis=0)
    std = features.std(axis=0) + 1e-6
    x = ((features - mean) / std).astype(np.float32)
    y = labels.reshape(-1, 1)
    sizes = (N_FEATURES, *HIDDEN, 1)
    params: dict[str, np.ndarray] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        params[f"b{i}"] = np.zeros(n_out, dtype=np.float32)
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    beta1, beta2, step = 0.9, 0.999, 0
    batch = 256
    for _epoch in range(recipe.epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            xb, yb = x[idx], y[idx]
            h1 = np.maximum(xb @ params["w0"] + params["b0"], 0)
            h2 = np.maximum(h1 @ params["w1"] + params["b1"], 0)
            p = 1.0 / (1.0 + np.exp(-(h2 @ params["w2"] + params["b2"])))
            weight = np.where(yb > 0.5, recipe.positive_weight, 1.0)
            d3 = (p - yb) * weight / len(idx)
            grads = {"w2": h2.T @ d3, "b2": d3.sum(0)}
            d2 = (d3 @ params["w2"].T) * (h2 > 0)
            grads.update({"w1": h1.T @ d2, "b1": d2.sum(0)})
            d1 = (d2 @ params["w1"].T) * (h1 > 0)
            grads.update({"w0": xb.T @ d1, "b0": d1.sum(0)})
            step += 1
            for k, g in grads.items():
                m, v = moments[k]
                m[...] = beta1 * m + (1 - beta1) * g
                v[...] = beta2 * v + (1 - beta2) * g * g
                m_hat = m / (1 - beta1**step)
                v_hat = v / (1 - beta2**step)
                params[k] = (params[k] - recipe.learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(
                    np.float32
                )
    params["mean"] = mean.astype(np.float32)
    params["inv_std"] = (1.0 / std).astype(np.float32)
    return params


def predict(params: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """The exported graph's function in numpy (for checks)."""
    x = (features - params["mean"]) * params["inv_std"]
    h1 = np.maximum(x @ params["w0"] + params["b0"], 0)
    h2 = np.maximum(h1 @ params["w1"] + params["b1"], 0)
    return 1.0 / (1.0 + np.exp(-(h2 @ params["w2"] + params["b2"])))


def to_onnx(params: dict[str, np.ndarray], version: int) -> onnx.ModelProto:
    """The MLP as an ONNX graph with dynamic batch: standardize, 3 Gemm layers, sigmoid."""
    inits = [numpy_helper.from_array(v, name=k) for k, v in params.items()]
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "inv_std"], ["x"]),
        helper.make_node("Gemm", ["x", "w0", "b0"], ["z0"]),
        helper.make_node("Relu", ["z0"], ["h0"]),
        helper.make_node("Gemm", ["h0", "w1", "b1"], ["z1"]),
        helper.make_node("Relu", ["z1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        f"{MODEL_NAME}_v{version}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", N_FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="infergrid-demo",
        doc_string=f"fraud detection MLP {N_FEATURES}-{HIDDEN[0]}-{HIDDEN[1]}-1, version {version}",
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


CONFIG_PBTXT = f"""name: "{MODEL_NAME}"
backend: "onnxruntime"
max_batch_size: {MAX_BATCH_SIZE}
version_policy {{ all {{ }} }}
input [
  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {N_FEATURES} ] }}
]
output [
  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ 1 ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 1000
  default_queue_policy {{ max_queue_size: 4096 }}
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def features_description() -> dict[str, object]:
    """What features.json holds: the model's input layout for the feature service and gateway."""
    return {
        "model": MODEL_NAME,
        "input": INPUT_NAME,
        "datatype": "FP32",
        "output": OUTPUT_NAME,
        "entities": {"user": "user_id", "merchant": "merchant_id", "device": "device_id"},
        "features": [
            {"index": i, "name": f.name, "source": f.source, "dtype": "FP32", "default": f.default,
             "description": f.description}
            for i, f in enumerate(FEATURES)
        ],
    }  # fmt: skip


def stored_features_request(request: gateway_pb2.PredictRequest) -> features_pb2.GetOnlineFeaturesRequest:
    """The feature-store read of the model's stored inputs for `request`'s entities (for `onnx_score`)."""
    return features_pb2.GetOnlineFeaturesRequest(
        features=[f.name for f in FEATURES if f.source != "request"],
        entities={
            key: value_pb2.ValueList(values=[value_pb2.Value(string_value=value)])
            for key, value in request.entities.items()
        },
    )


def onnx_score(
    model_dir: Path,
    version: str,
    request: gateway_pb2.PredictRequest,
    stored: features_pb2.GetOnlineFeaturesResponse,
) -> float:
    """The model file of `version` run by ONNX Runtime on `request`'s inputs (their defaults where not sent)
    and the `stored` features (every one present): what the gateway must answer (the tests' oracle)."""
    import onnxruntime as ort

    assert all(v.statuses[0] == features_pb2.FEATURE_STATUS_PRESENT for v in stored.results)
    by_name = {
        name: v.values[0].float_value for name, v in zip(stored.feature_names, stored.results, strict=True)
    }
    sent = {name: getattr(v, v.WhichOneof("kind") or "double_value") for name, v in request.features.items()}
    row = [sent.get(f.name, f.default) if f.source == "request" else by_name[f.name] for f in FEATURES]
    session = ort.InferenceSession(str(model_dir / version / "model.onnx"))
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray([row], dtype=np.float32)})
    return float(out.reshape(-1)[0])


def write_repository(root: Path, samples: int = 40_000) -> Path:
    """Trains both versions and writes the `fraud` model into `root`; returns the model folder."""
    features, labels = synthetic_transactions(samples, seed=42)
    holdout = len(features) // 5
    train_x, train_y = features[holdout:], labels[holdout:]
    test_x, test_y = features[:holdout], labels[:holdout]
    model_dir = root / MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(CONFIG_PBTXT)
    (model_dir / "features.json").write_text(json.dumps(features_description(), indent=2) + "\n")
    for recipe in RECIPES:
        params = train(recipe, train_x, train_y)
        version_dir = model_dir / str(recipe.version)
        version_dir.mkdir(exist_ok=True)
        onnx.save(to_onnx(params, recipe.version), str(version_dir / "model.onnx"))
        report = {
            "version": recipe.version,
            "architecture": f"{N_FEATURES}-{HIDDEN[0]}-{HIDDEN[1]}-1 MLP, ReLU, sigmoid output",
            "recipe": recipe.__dict__,
            "train_rows": len(train_x),
            "holdout_rows": len(test_x),
            "fraud_rate": round(float(labels.mean()), 4),
            "holdout_auc": round(_auc(predict(params, test_x).reshape(-1), test_y), 4),
        }
        (version_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return model_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="model repository folder to write into")
    parser.add_argument("--samples", type=int, default=40_000, help="synthetic transactions to train on")
    args = parser.parse_args(argv)
    model_dir = write_repository(args.repo, args.samples)
    for recipe in RECIPES:
        report = json.loads((model_dir / str(recipe.version) / "training.json").read_text())
        print(
            f"{MODEL_NAME} v{recipe.version}: holdout AUC {report['holdout_auc']}, {model_dir / str(recipe.version)}"
        )


if __name__ == "__main__":
    main()
