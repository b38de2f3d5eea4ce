"""Scores one demo transaction with the `fraud` model over gRPC through Envoy, using the generated stubs.

    export INFERGRID_DEMO_API_KEY=...        # printed by the first `make up`, or the one you set
    PYTHONPATH=.:build/gen .venv/bin/python examples/predict_client.py [--target 127.0.0.1:8080]

The API key travels as `x-api-key` metadata; it and the tenant's rate limit are checked where the platform's
`admission.placement` says (the gateway in the local stack, Envoy's ext_authz with placement `edge`). Prints the score, the version that produced it and the request id
(the key of the inference-log record and of the trace).
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from infergrid.types.v1 import value_pb2
from stack.demo import DEMO_REQUEST_FEATURES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", default="127.0.0.1:8080", help="Envoy's public listener (default: %(default)s)"
    )
    parser.add_argument("--key", default=os.environ.get("INFERGRID_DEMO_API_KEY", ""), help="API key")
    parser.add_argument("--model", default="fraud")
    parser.add_argument("--user", default="u00042")
    parser.add_argument("--merchant", default="m0007")
    parser.add_argument("--device", default="d00042")
    parser.add_argument("--amount", type=float, default=DEMO_REQUEST_FEATURES["amount"])
    args = parser.parse_args()
    if not args.key:
        print("error: no API key: set INFERGRID_DEMO_API_KEY or pass --key", file=sys.stderr)
        return 2
    features = {**DEMO_REQUEST_FEATURES, "amount": args.amount}
    request = gateway_pb2.PredictRequest(
        model=args.model,
        entities={"user_id": args.user, "merchant_id": args.merchant, "device_id": args.device},
        features={name: value_pb2.Value(double_value=float(value)) for name, value in features.items()},
    )
    with grpc.insecure_channel(args.target) as channel:
        stub = gateway_pb2_grpc.PredictionServiceStub(channel)
        try:
            reply = stub.Predict(request, metadata=[("x-api-key", args.key)], timeout=5.0)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for name, value in reply.outputs.items():
        score = getattr(value, value.WhichOneof("kind") or "float_value")
        print(f"{name}: {score:.6f}")
    print(f"model {reply.model} version {reply.model_version}, request id {reply.request_id}", end="")
    print(f", degraded ({', '.join(reply.degraded_features)})" if reply.degraded else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
