"""BentoML serving the demo model with a Redis feature lookup (runs in the bentoml venv).

    BENCH_ONNX=FILE BENCH_REDIS_URL=URL BENTOML_HOME=DIR BENTOML_DO_NOT_TRACK=true \\
        <bentoml venv>/bin/bentoml serve bento_service:Fraud --working-dir bench/servers --host 127.0.0.1 --port P

peers.md's setup: `@bentoml.service(workers=1)`, `@bentoml.api(batchable=True, max_batch_size=128)` with the default
max_latency_ms (adaptive batching), an async api with redis.asyncio and one MGET per batch (keys `bench:feat:<id>`,
32 packed float32, written by the harness); same ONNX Runtime settings as ours (1 intra/inter thread, sequential);
production mode with its default access log.
A batchable api takes a batch in every request, so the body is BentoML's batch form:
POST /predict {"entity_id": [4242]} -> [{"fraud_probability": p}].
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import onnxruntime as ort


@bentoml.service(workers=1)
class Fraud:
    def __init__(self) -> None:
        import redis.asyncio as aredis

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            os.environ["BENCH_ONNX"], options, providers=["CPUExecutionProvider"]
        )
        self.redis = aredis.Redis.from_url(os.environ["BENCH_REDIS_URL"])

    @bentoml.api(batchable=True, max_batch_size=128)
    async def predict(self, entity_id: list[int]) -> list[dict[str, float]]:
        raw = await self.redis.mget([f"bench:feat:{i}" for i in entity_id])
        x = np.frombuffer(b"".join(raw), dtype=np.float32).reshape(-1, 32)
        y = self.session.run(["fraud_probability"], {"features": x})[0].reshape(-1)
        return [{"fraud_probability": float(v)} for v in y]
