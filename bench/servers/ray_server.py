"""Ray Serve serving the demo model with a Redis feature lookup (runs in the ray venv).

    <ray venv>/bin/python ray_server.py --onnx FILE --port P --redis-url URL --temp-dir DIR --ready-file F
                                        [--direct-ports LO-HI]

peers.md's setup: ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 MiB, _temp_dir=DIR); one
deployment, num_replicas=1, max_ongoing_requests=256; `__call__` parses the JSON and awaits a
`@serve.batch(max_batch_size=128, batch_wait_timeout_s=0.001)` method that does one redis.asyncio MGET per batch
(keys `bench:feat:<id>`, 32 packed float32, written by the harness) and runs ONNX Runtime (1 intra/inter thread,
sequential). The Serve proxy listens on 127.0.0.1:P. With RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the environment the
replica also serves HTTP itself (direct ingress) on a port of RAY_SERVE_DIRECT_INGRESS_{MIN,MAX}_HTTP_PORT, bound to
the same host (127.0.0.1); the port it got is written to the ready file.
POST /predict {"entity_id": 4242} -> {"fraud_probability": p}.

The ready file (JSON {"proxy_port", "direct_port"}) is written once the deployment answers; SIGTERM/SIGINT shut
Serve and Ray down (the harness still kills the process group and anything left that used DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import ray
from ray import serve
from starlette.requests import Request


@serve.deployment(num_replicas=1, max_ongoing_requests=256)
class Fraud:
    def __init__(self, onnx_path: str, redis_url: str) -> None:
        import redis.asyncio as aredis

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.redis = aredis.Redis.from_url(redis_url)

    @serve.batch(max_batch_size=128, batch_wait_timeout_s=0.001)
    async def predict(self, ids: list[int]) -> list[float]:
        raw = await self.redis.mget([f"bench:feat:{i}" for i in ids])
        x = np.frombuffer(b"".join(raw), dtype=np.float32).reshape(-1, 32)
        y = self.session.run(["fraud_probability"], {"features": x})[0].reshape(-1)
        return [float(v) for v in y]

    async def __call__(self, request: Request) -> dict[str, float]:
        body = await request.json()
        return {"fraud_probability": await self.predict(int(body["entity_id"]))}


def answers(port: int) -> bool:
    """Whether 127.0.0.1:port answers POST /predict like the deployment."""
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex(("127.0.0.1", port)) != 0:
            return False
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", b'{"entity_id": 1}', {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return "fraud_probability" in json.loads(resp.read())
    except (OSError, ValueError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--direct-ports", default="", help="LO-HI: where to look for the direct-ingress port")
    args = parser.parse_args()

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        _temp_dir=args.temp_dir,
        log_to_driver=False,
    )
    stop = threading.Event()
    # After ray.init, which installs its own (fatal) SIGTERM handler: shut Serve and Ray down cleanly instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(Fraud.bind(args.onnx, args.redis_url), name="fraud", route_prefix="/predict")
        ready: dict[str, Any] = {"proxy_port": args.port, "direct_port": None}
        if args.direct_ports:
            lo, hi = (int(v) for v in args.direct_ports.split("-"))
            ready["direct_port"] = next((p for p in range(lo, hi + 1) if answers(p)), None)
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.rename(args.ready_file)
        print(f"ready: {ready}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
