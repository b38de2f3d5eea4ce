"""Latency target: the inference batcher with the fixed queue delay vs with a p99 target (issue 17, item 4).

Two repositories of the demo model that differ in one line: `fixed` is the demo's config.pbtxt
(dynamic batching, `max_queue_delay_microseconds: 1000`), `target` adds
`parameters { key: "latency_target_p99_ms" value: { string_value: "10" } }`, so the batcher's
`BatchController` adapts the delay (0..1 ms) and the batch cap to hold p99 under 10 ms. Each is served
by `python -m services.inference` alone on the server CPU and driven by h2load (single-row ModelInfer)
at concurrency 1, 8, 32 and 128. Before each point the load runs `SETTLE_S` unmeasured (both variants),
so the controller has settled; the delay and batch cap it settled on are read from /metrics after the
point (`infergrid_inference_queue_delay_seconds`, `infergrid_inference_batch_cap`), and so is where the
time went during the point (both variants): the batcher's own mean latency (enqueue to result, what the
controller sees), the mean compute time of a batch and the mean rows per batch (the histograms'
increase over the point).
"""

from __future__ import annotations

import re
import shutil
import sys
import urllib.request
from pathlib import Path
from typing import Any

from bench.core import Run, Suite
from bench.loadgen import H2load, grpc_frame
from bench.procs import Server, free_port, server_cpus
from bench.suites.common import service_env, wait_grpc_serving
from bench.suites.inference import MODEL, VERSION, prepare_repositories, request, rows, wait_model_ready
from bench.tools import ensure_debian

CONCURRENCY = (1, 8, 32, 128)
TARGET_MS = 10
SETTLE_S = 3.0
_TARGET_PARAMETER = (
    f'\nparameters {{ key: "latency_target_p99_ms" value: {{ string_value: "{TARGET_MS}" }} }}\n'
)


def target_repository(run: Run, fixed: Path) -> Path:
    """A copy of the demo repository whose model has the p99 target."""
    repo = run.work_dir / "models-target"
    if repo.exists():
        shutil.rmtree(repo)
    shutil.copytree(fixed, repo)
    config = repo / MODEL / "config.pbtxt"
    config.write_text(config.read_text() + _TARGET_PARAMETER)
    return repo


def start(run: Run, name: str, repo: Path) -> tuple[Server, int, int]:
    """`python -m services.inference` on the server CPU; returns (server, gRPC port, metrics port)."""
    port, metrics_port = free_port(), free_port()
    env = service_env("INFERGRID_INFERENCE_", port, {
        "INFERGRID_INFERENCE_MODEL_REPOSITORY": str(repo),
        "INFERGRID_INFERENCE_METRICS_PORT": str(metrics_port),
        "INFERGRID_INFERENCE_HTTP_PORT": "0",
    })  # fmt: skip
    server = run.procs.start(name, [sys.executable, "-m", "services.inference"], env=env, cpus=server_cpus())
    wait_grpc_serving(server, port, timeout=90)
    wait_model_ready(server, port)
    return server, port, metrics_port


_SERIES = (
    ("infergrid_inference_queue_delay_seconds", "delay_us", 1e6),
    ("infergrid_inference_batch_cap", "batch_cap", 1.0),
    ("infergrid_inference_request_seconds_sum", "request_s", 1.0),
    ("infergrid_inference_request_seconds_count", "requests", 1.0),
    ("infergrid_inference_compute_seconds_sum", "compute_s", 1.0),
    ("infergrid_inference_batch_size_sum", "rows", 1.0),
    ("infergrid_inference_batch_size_count", "batches", 1.0),
)


def _gauges(port: int) -> dict[str, float]:
    """The batcher's current delay (µs) and batch cap, and its histograms' sums and counts, from /metrics."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for name, key, scale in _SERIES:
        match = re.search(rf'^{name}\{{[^}}]*version="{VERSION}"[^}}]*\}} ([0-9.e+-]+)$', text, re.MULTILINE)
        if match:
            out[key] = float(match.group(1)) * scale
    return out


def settled_point(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """After a point: the delay (µs) and batch cap, and over the point the batcher's mean latency (ms), a
    batch's mean compute time (µs) and the mean rows per batch."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    out = {k: round(after[k], 1) for k in ("delay_us", "batch_cap") if k in after}
    if d.get("requests", 0) > 0:
        out["batcher_mean_ms"] = round(d["request_s"] / d["requests"] * 1e3, 3)
    if d.get("batches", 0) > 0:
        out["compute_us_per_batch"] = round(d["compute_s"] / d["batches"] * 1e6, 1)
        out["rows_per_batch"] = round(d["rows"] / d["batches"], 2)
    return out


def body(run: Run, suite: Suite) -> None:
    h2 = H2load(ensure_debian("h2load", "nghttp2-client"))
    fixed_repo, _ = prepare_repositories(run)
    repo_of = {"fixed": fixed_repo, "target": target_repository(run, fixed_repo)}
    body_file = run.work_dir / "modelinfer.grpc"
    body_file.write_bytes(grpc_frame(request(rows()[0]).SerializeToString()))
    settled: dict[str, dict[str, float]] = {}
    for variant, system in (
        ("fixed", "inference batcher, fixed 1 ms queue delay"),
        ("target", f"inference batcher, p99 target {TARGET_MS} ms (delay 0..1 ms adapted)"),
    ):
        server, port, metrics_port = start(run, f"slo-{variant}", repo_of[variant])
        url = f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"
        frame = h2.response_bytes(url=url, body_file=body_file)
        for c in CONCURRENCY:

            def rep(duration: float, i: int, *, c: int = c, url: str = url, frame: int = frame,
                    server: Server = server) -> dict[str, Any]:  # fmt: skip
                return h2.run(url=url, body_file=body_file, concurrency=c, duration_s=duration,
                              response_frame_bytes=frame, log_file=run.work_dir / "h2load.log",
                              server_cpu=server.cpu_seconds)  # fmt: skip

            rep(SETTLE_S, -1)
            before = _gauges(metrics_port)
            run.measure(suite, system=system, key=f"slo-{variant}", protocol="gRPC", tool="h2load",
                        params={"concurrency": c, "variant": variant}, rep=rep)  # fmt: skip
            settled[f"{variant} c={c}"] = settled_point(before, _gauges(metrics_port))
        run.procs.stop(server)
    suite.extra["target_p99_ms"] = TARGET_MS
    suite.extra["settled (after each point)"] = settled
