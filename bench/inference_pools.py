"""Two inference pools behind one gateway, for per-request GPU→CPU failover (issue 17, item 3).

Shared by `tests/integration/gateway/test_inference_failover.py` and the `failover` benchmark suite
(`bench/suites/failover.py`), so both run the same setup. Both pools are `python -m services.inference`
(ONNX Runtime) serving the demo `fraud` model, each from its own repository: `gpu` (labelled as the GPU
pool; the preferred one) and `cpu`. The platform file names both pools and has `fraud` prefer `gpu`.
`batching_variant` rewrites a repository's dynamic batching, which is how the `gpu` pool is made
saturable (`SATURABLE`: a queue of 2 requests and a 100 ms batching delay, so concurrent batches overflow
it) or slow (`SLOW`: a batching delay longer than the callers' `DEADLINE_S`). The gateway settings both use are
here too: single-row batches (so the failover counter counts requests), 8 batches in flight per model,
a short discovery interval and breaker reset.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infergrid.gateway.v1 import gateway_pb2
from libs.testing import spawn_module
from services.gateway.failover import BREAKER_OPEN, DOWN, DRAINING, OVERLOADED, QUEUE_DELAY
from stack.demo import demo_request

INFERENCE_SERVICE = "inference.GRPCInferenceService"
POOL_MODULE = "services.inference"
MODEL = "fraud"
PREFERRED, FALLBACK = "gpu", "cpu"
REASONS = (DOWN, DRAINING, BREAKER_OPEN, OVERLOADED, QUEUE_DELAY)
FAILOVERS_METRIC = "infergrid_gateway_inference_failovers"  # a Counter: its sample is <name>_total
DEMO_SAMPLES = 2000  # training rows of the demo model: enough for a working model, fast to write

# The gateway's settings for both pools' tests and benchmark.
DISCOVERY_INTERVAL_S = 0.2
BREAKER_RESET_S = 1.0
MAX_BATCH_ROWS = 1  # one request per batch: failovers (counted per batch) are requests
MAX_CONCURRENT_BATCHES = 8


@dataclass(frozen=True)
class Batching:
    """A model's dynamic batching: how long a batch waits for rows, and how many requests may queue."""

    queue_delay_us: int
    max_queue_size: int


DEMO = Batching(queue_delay_us=1000, max_queue_size=4096)  # what stack/demo_model.py writes
SATURABLE = Batching(queue_delay_us=100_000, max_queue_size=2)
# The callers' deadline, and a pool whose queue delay is past it: every batch it takes answers too late.
DEADLINE_S = 0.25
SLOW = Batching(queue_delay_us=400_000, max_queue_size=DEMO.max_queue_size)


def write_demo_repository(repo: Path, samples: int = DEMO_SAMPLES) -> Path:
    """The demo model repository (the `fraud` model, DEMO batching) in `repo`; returns `repo`."""
    from stack import demo_model as demo

    demo.write_repository(repo, samples)
    return repo


def batching_variant(source: Path, target: Path, batching: Batching) -> Path:
    """A copy of the model repository `source` at `target` whose model batches as `batching`.

    Raises:
        ValueError: the model's configuration does not set both values exactly once (not the demo's).
    """
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    config = target / MODEL / "config.pbtxt"
    text = config.read_text()
    for key, value in (
        ("max_queue_delay_microseconds", batching.queue_delay_us),
        ("max_queue_size", batching.max_queue_size),
    ):
        text, count = re.subn(rf"\b{key}: \d+", f"{key}: {value}", text)
        if count != 1:
            raise ValueError(f"{config}: {key} is set {count} times, expected once (the demo configuration)")
    config.write_text(text)
    return target


def pool_env(repo: Path, port: int, *, metrics_port: int = 0) -> dict[str, str]:
    """The variables of one pool's inference server: gRPC on `port`, no REST API, no drain, no tracing."""
    return {
        "INFERGRID_INFERENCE_HOST": "127.0.0.1",
        "INFERGRID_INFERENCE_PORT": str(port),
        "INFERGRID_INFERENCE_METRICS_PORT": str(metrics_port),
        "INFERGRID_INFERENCE_HTTP_PORT": "0",
        "INFERGRID_INFERENCE_DRAIN_SECONDS": "0",
        "INFERGRID_INFERENCE_LOG_JSON": "false",
        "INFERGRID_INFERENCE_MODEL_REPOSITORY": str(repo),
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
    }


def spawn_pool(repo: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Starts one pool's inference server (unpinned), its output appended to `log`."""
    return spawn_module(POOL_MODULE, pool_env(repo, port), log)


def pools_yaml(endpoints: Mapping[str, str]) -> str:
    """The platform file's `inference_pools` and `models` sections: one pool per entry of `endpoints`
    (name → host:port), and `fraud` preferring them in that order."""
    lines = ["inference_pools:"]
    lines += [f"  {name}: {{endpoints: ['{endpoint}']}}" for name, endpoint in endpoints.items()]
    lines += [
        "models:",
        f"  {MODEL}: {{versions: [{{version: '1', weight: 1}}], pools: [{', '.join(endpoints)}]}}",
    ]
    return "\n".join(lines) + "\n"


def gateway_env() -> dict[str, str]:
    """The gateway's variables for these settings (a gateway process; tests build GatewayConfig)."""
    return {
        "INFERGRID_GATEWAY_DISCOVERY_INTERVAL_S": str(DISCOVERY_INTERVAL_S),
        "INFERGRID_GATEWAY_BREAKER_RESET_S": str(BREAKER_RESET_S),
        "INFERGRID_GATEWAY_MAX_BATCH_ROWS": str(MAX_BATCH_ROWS),
        "INFERGRID_GATEWAY_MAX_CONCURRENT_BATCHES": str(MAX_CONCURRENT_BATCHES),
    }


def predict_request(i: int, prefix: str = "failover") -> gateway_pb2.PredictRequest:
    """A Predict for `fraud` (user, merchant and device varied by `i`) with a unique request id."""
    request_id = f"{prefix}-{time.monotonic_ns()}-{i}"
    return demo_request(i, (300, 50, 100), {"amount": 100.0 + i % 1000}, "float_value", request_id=request_id)


def failovers_by_reason(families: Iterable[Any], model: str = MODEL) -> dict[str, float]:
    """The gateway's failover counter for `model` away from its preferred pool, by reason (every reason in
    REASONS present, 0 when never counted).

    `families` are Prometheus metric families: `REGISTRY.collect()` in the gateway's process, or
    `prometheus_client.parser.text_string_to_metric_families(text)` of its /metrics page.
    """
    out = dict.fromkeys(REASONS, 0.0)
    for family in families:
        if family.name != FAILOVERS_METRIC:
            continue
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == FAILOVERS_METRIC + "_total"
                and labels.get("model") == model
                and labels.get("from_pool") == PREFERRED
            ):
                reason = labels.get("reason", "")
                out[reason] = out.get(reason, 0.0) + float(sample.value)
    return out


def served_pool(records: Iterable[Any], request_id: str) -> str:
    """The pool that served `request_id` according to its inference-log record.

    Raises:
        LookupError: not exactly one record for `request_id`, or its status is not OK.
    """
    found = [r for r in records if r.request_id == request_id]
    if len(found) != 1:
        raise LookupError(f"{len(found)} records for {request_id!r}")
    if found[0].status_code != 0:
        raise LookupError(f"the record of {request_id!r} has status {found[0].status_code}")
    return str(found[0].inference_pool)
