"""What `make up` prints at the end: how to call the demo model through Envoy, and where logs and traces are."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from stack.component import Component
from stack.config import StackConfig
from stack.services import DEMO_KEY_VARIABLE, DEMO_MODEL

if TYPE_CHECKING:
    from infergrid.gateway.v1 import gateway_pb2

# A realistic demo transaction: entity keys of the demo feature views (stack/demo_features.py) and the
# model's request-time inputs (`source: "request"` in <repo>/fraud/features.json).
DEMO_ENTITIES = {"user_id": "u00042", "merchant_id": "m0007", "device_id": "d00042"}
DEMO_REQUEST_FEATURES = {
    "amount": 912.5,
    "hour_of_day": 3,
    "is_weekend": 1,
    "channel_online": 1,
    "card_present": 0,
    "distance_from_home_km": 840.0,
    "is_foreign": 1,
    "device_new": 1,
}

# How many users, merchants and devices the demo feature views hold (stack/demo_features.py's counts).
DEMO_COUNTS = (10_000, 1_000, 5_000)


def demo_request(
    n: int,
    counts: Sequence[int] = DEMO_COUNTS,
    features: Mapping[str, float] = DEMO_REQUEST_FEATURES,
    value: str = "double_value",
    **fields: Any,
) -> gateway_pb2.PredictRequest:
    """A PredictRequest of the demo model for entity number `n`: user, merchant and device `n` modulo
    `counts` (the sizes the views were loaded with), `features` as request-time `value`s (double_value or
    float_value); `fields` set the others (request_id, version, model)."""
    from infergrid.gateway.v1 import gateway_pb2

    users, merchants, devices = counts
    request = gateway_pb2.PredictRequest(
        model=fields.pop("model", DEMO_MODEL),
        entities={
            "user_id": f"u{n % users:05d}",
            "merchant_id": f"m{n % merchants:04d}",
            "device_id": f"d{n % devices:05d}",
        },
        **fields,
    )
    for name, v in features.items():
        setattr(request.features[name], value, v)
    return request


def demo_json_body() -> dict[str, object]:
    """The JSON body of a demo prediction (request-time features as `infergrid.types.v1.Value`s)."""
    return {
        "entities": DEMO_ENTITIES,
        "features": {name: {"double_value": float(value)} for name, value in DEMO_REQUEST_FEATURES.items()},
    }


def how_to_call(config: StackConfig, components: Sequence[Component], minted_key: str = "") -> str:
    """The ready-to-paste commands, given what was started (empty when Envoy or the gateway is not)."""
    names = {c.name for c in components}
    if "envoy" not in names or not any(n == "gateway" or n.startswith("gateway-") for n in names):
        return ""
    if minted_key:
        key_line = (
            f"export {DEMO_KEY_VARIABLE}={minted_key}   # the demo key, shown once; only its hash is kept"
        )
    else:
        key_line = (
            f"# uses ${DEMO_KEY_VARIABLE}: the key you set, or the one printed by the first `make up` "
            f"(mint another: python -m services.edge.keys --keys-file {config.state_dir}/edge/keys.yaml "
            "add --tenant demo --name demo)"
        )
    public = f"http://{config.host}:{config.port('envoy')}"
    body = json.dumps(demo_json_body())
    curl = (
        f"curl -sS -X POST {public}/v1/models/{DEMO_MODEL}:predict \\\n"
        f'    -H "x-api-key: ${DEMO_KEY_VARIABLE}" -H "content-type: application/json" \\\n'
        f"    -d {shlex.quote(body)}"
    )
    grpc_body = json.dumps({"model": DEMO_MODEL, **demo_json_body()})
    grpcurl = (
        f"grpcurl -plaintext -import-path protos -proto infergrid/gateway/v1/gateway.proto \\\n"
        f'    -H "x-api-key: ${DEMO_KEY_VARIABLE}" -d {shlex.quote(grpc_body)} \\\n'
        f"    {config.host}:{config.port('envoy')} infergrid.gateway.v1.PredictionService/Predict"
    )
    client = (
        f"PYTHONPATH=.:build/gen .venv/bin/python examples/predict_client.py "
        f"--target {config.host}:{config.port('envoy')}"
    )
    jaeger = f"http://{config.host}:{config.port('jaeger_query')}"
    return "\n".join(
        [
            "",
            "Try it (through Envoy, the only public door):",
            f"  {key_line}",
            "",
            "  # HTTP/JSON",
            "  " + curl.replace("\n", "\n  "),
            "",
            "  # gRPC with the generated stubs (prints the score)",
            f"  {client}",
            "  # or grpcurl (reflection is not routed through Envoy, so give it the proto)",
            "  " + grpcurl.replace("\n", "\n  "),
            "",
            f"Logs: {config.log_dir}/<component>.log (Envoy's access log: {config.log_dir}/envoy-access.log)",
            f"Traces: {jaeger}/api/traces?service=gateway&limit=5 (Jaeger query API; "
            f"{jaeger}/api/services lists the services)",
            f"Inference-log records: infergrid.logging.v1.InferenceLogService on {config.host}:{config.port('logging')}",
        ]
    )
