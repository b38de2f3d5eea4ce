"""LitServe serving the demo model with a Redis feature lookup (runs in the litserve venv).

    <litserve venv>/bin/python litserve_server.py --onnx FILE --port P --redis-url URL

peers.md's setup: LitAPI(max_batch_size=128, batch_timeout=0.001) with batch/unbatch, LitServer(accelerator="cpu",
workers_per_device=1, fast_queue=True), one API server; the sync redis client with one MGET per batch (keys
`bench:feat:<id>`, 32 packed float32, written by the harness); same ONNX Runtime settings as ours.
POST /predict {"entity_id": 4242} -> {"fraud_probability": p}.
"""

from __future__ import annotations

import argparse

import litserve as ls
import numpy as np
import onnxruntime as ort
import redis


class FraudAPI(ls.LitAPI):
    # Set before the server starts; the object is pickled into LitServe's worker process with them.
    onnx_path = ""
    redis_url = ""

    def setup(self, device: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(self.onnx_path, options, providers=["CPUExecutionProvider"])
        self.redis = redis.Redis.from_url(self.redis_url)

    def decode_request(self, request: dict) -> int:
        return int(request["entity_id"])

    def batch(self, inputs: list[int]) -> list[int]:
        return list(inputs)

    def predict(self, ids: list[int]) -> np.ndarray:
        raw = self.redis.mget([f"bench:feat:{i}" for i in ids])
        x = np.frombuffer(b"".join(raw), dtype=np.float32).reshape(-1, 32)
        return self.session.run(["fraud_probability"], {"features": x})[0].reshape(-1)

    def unbatch(self, output: np.ndarray) -> list[float]:
        return [float(v) for v in output]

    def encode_response(self, output: float) -> dict:
        return {"fraud_probability": output}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    api = FraudAPI(max_batch_size=128, batch_timeout=0.001)
    api.onnx_path = args.onnx
    api.redis_url = args.redis_url
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True)
    server.run(
        host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning"
    )


if __name__ == "__main__":
    main()
