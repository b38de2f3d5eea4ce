"""PyTriton serving the demo model's ONNX file with Triton's dynamic batcher (runs in the pytriton venv).

    <pytriton venv>/bin/python pytriton_server.py --onnx FILE --grpc-port P --http-port P --metrics-port P
        --workspace DIR [--max-queue-delay-us 0] [--no-batching]

Same model file, same ONNX Runtime settings as the inference service (CPU provider, 1 intra-op and
1 inter-op thread, sequential execution). peers.md's setup: `@batch` + `DynamicBatcher`, delay 0,
LD_LIBRARY_PATH=<python prefix>/lib (set by the harness; without it the python backend stub fails).
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-queue-delay-us", type=int, default=0)
    parser.add_argument("--no-batching", action="store_true")
    parser.add_argument(
        "--redis-url", help="also serve `fraud_entity`: entity_id -> Redis MGET of 32 floats -> model"
    )
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])

    @batch
    def infer(features: np.ndarray) -> dict[str, np.ndarray]:
        (probability,) = session.run(
            ["fraud_probability"], {"features": features.astype(np.float32, copy=False)}
        )
        return {"fraud_probability": probability}

    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    batcher = (
        None if args.no_batching else DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)
    )
    # Loopback only: no access token on Triton's management endpoints (perf_analyzer reads the model config).
    security = TritonSecurityConfig(restricted_endpoints=[])
    with Triton(config=config, workspace=pathlib.Path(args.workspace), security_config=security) as triton:
        triton.bind(
            model_name="fraud",
            infer_func=infer,
            inputs=[Tensor(name="features", dtype=np.float32, shape=(32,))],
            outputs=[Tensor(name="fraud_probability", dtype=np.float32, shape=(1,))],
            config=ModelConfig(max_batch_size=args.max_batch_size, batcher=batcher),
            strict=False,
        )
        if args.redis_url:
            import redis

            client = redis.Redis.from_url(args.redis_url)

            @batch
            def infer_entity(entity_id: np.ndarray) -> dict[str, np.ndarray]:
                # One MGET per batch (peers.md's scenario B): packed float32 x 32 per key.
                raw = client.mget([f"bench:feat:{int(i)}" for i in entity_id.reshape(-1)])
                x = np.frombuffer(b"".join(raw), dtype=np.float32).reshape(-1, 32)
                (probability,) = session.run(["fraud_probability"], {"features": x})
                return {"fraud_probability": probability}

            triton.bind(
                model_name="fraud_entity",
                infer_func=infer_entity,
                inputs=[Tensor(name="entity_id", dtype=np.int64, shape=(1,))],
                outputs=[Tensor(name="fraud_probability", dtype=np.float32, shape=(1,))],
                config=ModelConfig(max_batch_size=args.max_batch_size, batcher=batcher),
                strict=False,
            )
        triton.serve()


if __name__ == "__main__":
    main()
