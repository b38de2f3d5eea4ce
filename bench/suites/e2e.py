"""End to end: Predict through Envoy (gRPC and HTTP/JSON) with authentication (API key) and rate limiting
(Redis token buckets; the bench tenant's tier is high enough never to throttle) checked in the gateway
(admission placement "gateway", as `make up` runs it), features from Redis (the demo views, cache warm),
the model (inference service, batching on) and one Kafka inference-log record per request; vs the same
Envoy and control plane in front of a bare echo service answering Predict with a fixed response (the
transport limit of this path), and in front of the same answer from a threaded grpc.server (what another
transport would buy the gateway).

The serving path — Envoy, control plane, gateway, features, inference and Redis — is pinned to CPU 0 (the
one-core budget of the peers' numbers in peers.md, whose Redis shares their core too). Kafka and Cassandra,
which the peers do not have and which run on their own machines in production (deploy/k8s), share CPU 1
with the load generator. Envoy's access log is off; tracing is on at production-like sampling: Envoy samples
1 % of requests (its random_sampling, as the Kubernetes manifests run it), the gateway follows Envoy's
decision (1 % for roots of its own), and both export over OTLP to a sink in the harness that counts the
spans (suite detail `spans_exported`). Errors come from the gateway's own counters
(infergrid_gateway_requests_total by status) and degraded answers (a feature default served because the
feature call missed its 50 ms budget) from infergrid_gateway_degraded_total.

With INFERGRID_BENCH_E2E_BASELINE=<checkout>[,<checkout>...] (`git worktree`s of earlier commits, each
with its own `build/gen`), each checkout's gateway runs beside this one (own ports, same platform file,
backends, features and inference), and each Predict point is measured for every gateway in turn: Envoy is
pointed at one gateway, then at the next (an idle one costs next to nothing), the first one rotating from
point to point. Keys `e2e-grpc`/`e2e-json` are this checkout; one other checkout is `...-baseline`, several
are `...-<commit>`. The node (`services.node`: features, inference and the gateway in one process, the
gateway calling the other two in process) is measured the same way, keys `e2e-grpc-node`/`e2e-json-node`.
With INFERGRID_BENCH_E2E_FLAME=1 (or in a full run) py-spy records each gateway's
flame graph (`flame-gateway.svg`, `flame-gateway-baseline.svg` or `flame-gateway-<commit>.svg`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.core import Run, Skipped, Suite
from bench.loadgen import WRK_DONE, H2load, Wrk, grpc_frame
from bench.procs import (
    Server,
    free_port,
    group_pids,
    loadgen_cpus,
    pids_cpu_seconds,
    repo_env,
    server_cpus,
    set_affinity,
    wait_port,
)
from bench.suites import features as features_suite
from bench.suites import inference as inference_suite
from bench.suites.common import flame_graph, service_env, wait_grpc_serving
from bench.tools import ensure_debian, say
from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs.checkout import python_path
from libs.testing import REPO_ROOT
from stack.demo import demo_request
from stack.envoy import Envoy
from stack.kafka import credential_env
from stack.progress import Progress
from stack.services import INPUT_LAYOUTS

PREDICT = "infergrid.gateway.v1.PredictionService/Predict"
BASELINE_ENV = "INFERGRID_BENCH_E2E_BASELINE"
NODE_TRANSPORTS_ENV = "INFERGRID_BENCH_E2E_NODE_TRANSPORTS"
FLAME_ENV = "INFERGRID_BENCH_E2E_FLAME"
TRACE_PERCENT = 1.0  # production-like: Envoy's random_sampling in deploy/k8s
REQUEST_FEATURES = {"amount": 250.0, "hour_of_day": 3.0, "is_weekend": 1.0, "channel_online": 1.0,
                    "card_present": 0.0, "distance_from_home_km": 120.0, "is_foreign": 1.0, "device_new": 1.0}  # fmt: skip

PLATFORM = """listener:
  host: 127.0.0.1
  port: {envoy_port}
  max_request_bytes: 1048576
  tls: {{enabled: false}}
gateway:
  endpoints: ["127.0.0.1:{upstream_port}"]
  timeout_ms: 2000
  retry: {{retry_on: "reset,connect-failure,unavailable", num_retries: 2, per_try_timeout_ms: 1000, budget_percent: 20}}
  health_check: {{interval_ms: 1000, timeout_ms: 500, unhealthy_threshold: 2, healthy_threshold: 1}}
  outlier_detection: {{consecutive_5xx: 5, consecutive_gateway_failure: 3, base_ejection_time_ms: 10000}}
admission: {{placement: gateway}}
api_keys_file: keys.yaml
rate_limit_tiers:
  free: {{requests_per_second: 10, burst: 20}}
  standard: {{requests_per_second: 2000, burst: 4000}}
  bench: {{requests_per_second: 1000000, burst: 1000000}}
tenants:
  bench: {{tier: bench, models: ["fraud"]}}
models:
  fraud:
    versions:
      - {{version: "1", weight: 100}}
    sticky_key: user_id
"""

WRK_PREDICT = """
math.randomseed(11)
local key = ""
local feats = '"features":{"amount":{"floatValue":250},"hour_of_day":{"floatValue":3},"is_weekend":{"floatValue":1},' ..
  '"channel_online":{"floatValue":1},"card_present":{"floatValue":0},"distance_from_home_km":{"floatValue":120},' ..
  '"is_foreign":{"floatValue":1},"device_new":{"floatValue":1}}'
function init(args) key = args[1] end
function request()
  local u = math.random(0, 9999)
  local body = string.format('{"entities":{"user_id":"u%05d","merchant_id":"m%04d","device_id":"d%05d"},%s}',
                             u, u % 1000, u % 5000, feats)
  return wrk.format("POST", "/v1/models/fraud:predict", {["Content-Type"] = "application/json", ["x-api-key"] = key}, body)
end
"""


def missing_parts() -> list[str]:
    missing = []
    gateway = REPO_ROOT / "services" / "gateway" / "server.py"
    if not gateway.exists() or "PredictionService" not in gateway.read_text():
        missing.append("services/gateway (PredictionService)")
    for name, what in (("controlplane", "xDS control plane"),):
        if not (REPO_ROOT / "services" / name / "server.py").exists():
            missing.append(f"services/{name} ({what})")
    return missing


def warm_feature_cache(port: int) -> None:
    """Reads every demo entity once, so the measured requests find their features in Redis (cache hits)."""
    from infergrid.features.v1 import features_pb2, features_pb2_grpc
    from stack import demo_features as demo

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = features_pb2_grpc.FeatureServiceStub(ch)
        for view in demo.VIEWS:
            refs = [f"{view.name}:{name}" for name, _, _ in view.features]
            for start in range(0, view.count, 1000):
                req = features_pb2.GetOnlineFeaturesRequest(features=refs)
                column = req.entities[view.key]
                for i in range(start, min(start + 1000, view.count)):
                    column.values.add(string_value=view.id_format.format(i))
                stub.GetOnlineFeatures(req, timeout=60)


def predict_request(user: int) -> gateway_pb2.PredictRequest:
    return demo_request(user, features=REQUEST_FEATURES, value="float_value")


def scrape(port: int) -> dict[str, float]:
    """The gateway's Prometheus counters: errors and degraded answers apart, and the rows per inference batch."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {"ok": 0.0, "errors": 0.0, "degraded": 0.0, "batch_rows": 0.0, "batches": 0.0}
    for line in text.splitlines():
        if line.startswith("infergrid_gateway_requests_total{"):
            status = re.search(r'status="([^"]*)"', line)
            value = float(line.rsplit(" ", 1)[1])
            out["ok" if status and status.group(1) in ("OK", "0") else "errors"] += value
        elif line.startswith("infergrid_gateway_degraded_total{"):
            out["degraded"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith('infergrid_gateway_batch_rows_sum{target="inference"'):
            out["batch_rows"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith('infergrid_gateway_batch_rows_count{target="inference"'):
            out["batches"] += float(line.rsplit(" ", 1)[1])
    return out


def wait_predict(target: str, key: str, timeout: float = 60.0) -> gateway_pb2.PredictResponse:
    """Calls Predict through Envoy until it answers (Envoy's health checks admit a new upstream within ~1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with grpc.insecure_channel(target) as ch:
                return gateway_pb2_grpc.PredictionServiceStub(ch).Predict(
                    predict_request(4242), metadata=[("x-api-key", key)], timeout=5
                )
        except grpc.RpcError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Predict through Envoy fails: {exc}") from None
            time.sleep(0.5)


def wait_echo(target: str, key: str, timeout: float = 60.0) -> None:
    """Calls Predict through Envoy until the echo's fixed answer comes back (xDS pushed, upstream healthy)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with grpc.insecure_channel(target) as ch:
                reply = gateway_pb2_grpc.PredictionServiceStub(ch).Predict(
                    predict_request(4242), metadata=[("x-api-key", key)], timeout=5
                )
            if reply.request_id == "0" * 32:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("Envoy never answered with the echo's reply")
        time.sleep(0.5)


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that counts the spans it is sent (tracing stays on without a Jaeger)."""

    def __init__(self) -> None:
        self.spans = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC method name
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def route_to(platform: Path, envoy_port: int, upstream: tuple[int, int], target: str, key: str) -> None:
    """Points Envoy at the gateway (gRPC port, metrics port) and waits until five calls in a row reach it."""
    upstream_port, metrics_port = upstream
    platform.write_text(PLATFORM.format(envoy_port=envoy_port, upstream_port=upstream_port))
    deadline = time.monotonic() + 60
    while True:
        before = scrape(metrics_port)["ok"]
        for _ in range(5):
            wait_predict(target, key)
        if scrape(metrics_port)["ok"] - before >= 5:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Envoy never moved to the gateway on port {upstream_port}")
        time.sleep(0.5)


class Chain:
    """The running request path and its backends; `cpu()` sums every process, `breakdown()` per process."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.pids: dict[str, int] = {}

    def cpu(self) -> float:
        return sum(self.breakdown().values())

    def breakdown(self) -> dict[str, float]:
        out = {s.name.removeprefix("e2e-"): s.cpu_seconds() for s in self.servers}
        out.update({name: pids_cpu_seconds([pid]) for name, pid in self.pids.items()})
        return out


def with_breakdown(chain: Chain, measure: Any) -> dict[str, Any]:
    """Runs `measure()` and adds the CPU each process of the chain used, in cores, to its result."""
    before = chain.breakdown()
    t0 = time.monotonic()
    result = measure()
    elapsed = time.monotonic() - t0
    after = chain.breakdown()
    result["cpu_by_process"] = {k: round((after[k] - before.get(k, 0.0)) / elapsed, 3) for k in after}
    return result


def body(run: Run, suite: Suite) -> None:
    missing = missing_parts()
    if missing:
        raise Skipped("not landed yet: " + "; ".join(missing))
    s = run.settings
    cpus = server_cpus()
    work = run.work_dir / "e2e"
    work.mkdir(exist_ok=True)
    h2 = H2load(ensure_debian("h2load", "nghttp2-client"))
    wrk = Wrk(ensure_debian("wrk", "wrk"))
    redis = run.backends.redis(cpus)
    set_affinity(run.backends.pids("redis")[0], cpus)
    backend_cpus = loadgen_cpus()
    cassandra = run.backends.cassandra(backend_cpus)
    kafka = run.backends.kafka(backend_cpus)
    for pid in run.backends.pids("cassandra", "kafka"):
        set_affinity(pid, backend_cpus)
    chain = Chain()
    chain.pids = dict(
        zip(("redis", "cassandra", "kafka"), run.backends.pids("redis", "cassandra", "kafka"), strict=True)
    )

    # Model and features.
    batch_repo, _ = inference_suite.prepare_repositories(run)
    inference, inference_port = inference_suite.start_ours(run, "e2e-inference", batch_repo)
    feats, features_port = features_suite.start_ours(run, "e2e-features", cache=True, redis_url=redis.url,
                                                     cassandra_port=cassandra.port)  # fmt: skip
    chain.servers += [inference, feats]
    out = subprocess.run([sys.executable, "-m", "stack.demo_features", "--target", f"127.0.0.1:{features_port}"],
                         check=False, capture_output=True, text=True, timeout=600, env=repo_env())  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"features demo load failed: {out.stderr[-1500:]}")

    warm_feature_cache(features_port)

    # Gateway (admission, and its inference-log producer to Kafka).
    gateway_port, gateway_metrics = free_port(), free_port()
    envoy_port = run.backends.config.port("envoy")
    platform = work / "platform.yaml"
    sink = OtlpSink()
    run.procs.on_stop(lambda: sink.server.stop(None))
    platform.write_text(PLATFORM.format(envoy_port=envoy_port, upstream_port=gateway_port))
    # The bench tenant's API key (hashed in the key file the gateway watches).
    key = secrets.token_urlsafe(24)
    keys_file = work / "keys.yaml"
    out = subprocess.run([sys.executable, "-m", "services.edge.keys", "--platform", str(platform), "--keys-file",
                          str(keys_file), "ensure", "--tenant", "bench", "--name", "bench", "--key-from-env",
                          "BENCH_API_KEY"], check=False, capture_output=True, text=True, timeout=60,
                         env=repo_env({"BENCH_API_KEY": key}))  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"edge keys: {out.stderr[-1000:]}")
    env = service_env("INFERGRID_GATEWAY_", gateway_port, {
        "INFERGRID_GATEWAY_METRICS_PORT": str(gateway_metrics),
        "INFERGRID_GATEWAY_INPUT_LAYOUTS": str(INPUT_LAYOUTS),
        "INFERGRID_GATEWAY_PLATFORM_FILE": str(platform),
        "INFERGRID_GATEWAY_FEATURES_TARGET": f"127.0.0.1:{features_port}",
        "INFERGRID_GATEWAY_INFERENCE_TARGET": f"127.0.0.1:{inference_port}",
        "INFERGRID_GATEWAY_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        **credential_env(kafka.config, "admin", "INFERGRID_GATEWAY_"),  # a topic of its own
        "INFERGRID_GATEWAY_INFERENCE_LOG_TOPIC": "bench.e2e.inference-log",
        "INFERGRID_GATEWAY_INFERENCE_LOG_SPOOL_DIR": str(work / "spool"),
        "INFERGRID_GATEWAY_ADMISSION_KEYS_FILE": str(keys_file),
        "INFERGRID_GATEWAY_ADMISSION_REDIS_URL": redis.url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
        "OTEL_TRACES_SAMPLER_ARG": str(TRACE_PERCENT / 100),
    })  # fmt: skip
    gateway = run.procs.start("e2e-gateway", [sys.executable, "-m", "services.gateway"], env=env, cpus=cpus)
    wait_grpc_serving(gateway, gateway_port, timeout=90)
    chain.servers.append(gateway)
    # (key suffix, gRPC port, metrics port, server) of each gateway measured side by side.
    gateways: list[tuple[str, int, int, Server]] = [("", gateway_port, gateway_metrics, gateway)]
    roots = [Path(r).resolve() for r in os.environ.get(BASELINE_ENV, "").split(",") if r.strip()]
    for root in roots:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], check=False,
                                capture_output=True, text=True).stdout.strip() or root.name  # fmt: skip
        suffix = "-baseline" if len(roots) == 1 else f"-{commit}"
        base_port, base_metrics = free_port(), free_port()
        base_env = {**env, "PYTHONPATH": python_path(root, inherit=False), "INFERGRID_GATEWAY_PORT": str(base_port),
                    "INFERGRID_GATEWAY_METRICS_PORT": str(base_metrics),
                    "INFERGRID_GATEWAY_INFERENCE_LOG_SPOOL_DIR": str(work / f"spool{suffix}")}  # fmt: skip
        base = run.procs.start(f"e2e-gateway{suffix}", [sys.executable, "-m", "services.gateway"], env=base_env,
                               cwd=root, cpus=cpus)  # fmt: skip
        wait_grpc_serving(base, base_port, timeout=90)
        chain.servers.append(base)
        gateways.append((suffix, base_port, base_metrics, base))
        suite.extra[f"gateway{suffix}"] = f"{root} at {commit}"

    # The node (services/node): features, inference and the gateway in one process, on the same backends,
    # the same demo views (the same keyspace and cache) and the same model; measured in turn like a baseline.
    # INFERGRID_BENCH_E2E_NODE_TRANSPORTS (e.g. "aio,threaded"): one node per gateway transport, keys
    # `...-node-<transport>`; unset, one node on its default transport, keys `...-node`.
    transports = [t.strip() for t in os.environ.get(NODE_TRANSPORTS_ENV, "").split(",") if t.strip()] or [""]
    node_envs: dict[str, dict[str, str]] = {}
    for transport in transports:
        suffix = f"-node-{transport}" if transport else "-node"
        node_port, node_metrics = free_port(), free_port()
        node_env = {**features_suite.ours_env(run, free_port(), cache=True, redis_url=redis.url,
                                              cassandra_port=cassandra.port),
                    **inference_suite.ours_env(free_port(), batch_repo),
                    **env, "INFERGRID_GATEWAY_PORT": str(node_port), "INFERGRID_GATEWAY_METRICS_PORT": str(node_metrics),
                    "INFERGRID_GATEWAY_INFERENCE_LOG_SPOOL_DIR": str(work / f"spool{suffix}"),
                    **({"INFERGRID_GATEWAY_TRANSPORT": transport} if transport else {})}  # fmt: skip
        node = run.procs.start(
            f"e2e{suffix}", [sys.executable, "-m", "services.node"], env=node_env, cpus=cpus
        )
        wait_grpc_serving(node, node_port, timeout=120)
        chain.servers.append(node)
        gateways.append((suffix, node_port, node_metrics, node))
        node_envs[suffix] = node_env
        suite.extra[f"gateway{suffix}"] = "services.node: features, inference and the gateway in one process"

    cp_port = run.backends.config.port("controlplane")
    controlplane = run.procs.start("e2e-controlplane", [sys.executable, "-m", "services.controlplane"], cpus=cpus,
                                   env=service_env("INFERGRID_CONTROLPLANE_", cp_port, {
                                       "INFERGRID_CONTROLPLANE_PLATFORM_FILE": str(platform),
                                       "INFERGRID_CONTROLPLANE_DESCRIPTOR_SET": str(REPO_ROOT / "build" / "gen" / "descriptors.pb"),
                                       "INFERGRID_CONTROLPLANE_LISTENER_PORT": str(envoy_port),
                                       "INFERGRID_CONTROLPLANE_ACCESS_LOG": "",
                                       "INFERGRID_CONTROLPLANE_TRACING_OTLP_ADDRESS": f"127.0.0.1:{sink.port}",
                                       "INFERGRID_CONTROLPLANE_TRACING_SAMPLE_PERCENT": str(TRACE_PERCENT),
                                       "INFERGRID_CONTROLPLANE_TLS_DIR": str(work / "tls")}))  # fmt: skip
    wait_grpc_serving(controlplane, cp_port, timeout=60)
    chain.servers.append(controlplane)
    envoy = Envoy(run.backends.config)
    record = envoy.start(Progress("envoy"))
    run.procs.on_stop(envoy.stop)
    set_affinity(record.pid, cpus)
    chain.pids["envoy"] = record.pid
    wait_port(envoy_port, 60)

    # Correctness through Envoy: the gateway's answer equals the model on the stored features (checked by the
    # gateway's own tests); here: authenticated calls succeed, not degraded; a missing key is refused.
    target = f"127.0.0.1:{envoy_port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with grpc.insecure_channel(target) as ch:
                stub = gateway_pb2_grpc.PredictionServiceStub(ch)
                reply = stub.Predict(predict_request(4242), metadata=[("x-api-key", key)], timeout=5)
                try:
                    stub.Predict(predict_request(1), timeout=5)
                    raise RuntimeError("Envoy let a call without an API key through")
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                        raise RuntimeError(
                            f"a call without a key got {exc.code()}, not UNAUTHENTICATED"
                        ) from None
            break
        except grpc.RpcError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Predict through Envoy fails: {exc}") from None
            time.sleep(1)
    deadline = time.monotonic() + 30
    while reply.degraded and time.monotonic() < deadline:  # a feature read over its 50 ms budget: try again
        time.sleep(0.5)
        reply = wait_predict(target, key)
    if reply.degraded or "fraud_probability" not in reply.outputs:
        raise RuntimeError(f"unexpected answer through Envoy: {reply}")
    suite.extra["checked_answer"] = (
        f"user u04242 → {reply.outputs['fraud_probability'].float_value:.4f} (v{reply.model_version})"
    )

    body_file = work / "predict.grpc"
    body_file.write_bytes(grpc_frame(predict_request(4242).SerializeToString()))
    url = f"http://{target}/{PREDICT}"
    script = work / "predict.lua"
    script.write_text(WRK_PREDICT + WRK_DONE)

    def grpc_rep(server_cpu: Any, frame: int, c: int, metrics_port: int | None):
        def rep(duration: float, i: int) -> dict[str, Any]:
            before = scrape(metrics_port) if metrics_port else None
            result = with_breakdown(chain, lambda: h2.run(
                url=url, body_file=body_file, concurrency=c, duration_s=duration, response_frame_bytes=frame,
                log_file=work / "h2load.log", server_cpu=server_cpu, extra_headers=[f"x-api-key: {key}"]))  # fmt: skip
            if before is not None:
                after = scrape(metrics_port)  # type: ignore[arg-type]
                result["errors"] = max(result.get("errors", 0.0), after["errors"] - before["errors"])
                result["degraded"] = after["degraded"] - before["degraded"]
                batches = after["batches"] - before["batches"]
                result["rows_per_batch"] = (
                    round((after["batch_rows"] - before["batch_rows"]) / batches, 2) if batches else 0.0
                )
            return result

        return rep

    def json_rep(server_cpu: Any, c: int, metrics_port: int | None):
        def rep(duration: float, i: int) -> dict[str, Any]:
            before = scrape(metrics_port) if metrics_port else None
            result = with_breakdown(chain, lambda: wrk.run(
                url=f"http://{target}", script=script, concurrency=c, duration_s=duration,
                server_cpu=server_cpu, script_args=[key]))  # fmt: skip
            if before is not None:
                after = scrape(metrics_port)  # type: ignore[arg-type]
                result["errors"] = max(result.get("errors", 0.0), after["errors"] - before["errors"])
                result["degraded"] = after["degraded"] - before["degraded"]
                batches = after["batches"] - before["batches"]
                result["rows_per_batch"] = (
                    round((after["batch_rows"] - before["batch_rows"]) / batches, 2) if batches else 0.0
                )
            return result

        return rep

    frame = h2.response_bytes(url=url, body_file=body_file, extra_headers=[f"x-api-key: {key}"])
    label = {suffix: f", {suffix[1:]}" if suffix else "" for suffix, *_ in gateways}
    # Side by side: the gateways take turns, the first one rotating from point to point.
    turns = [(protocol, c, i) for protocol in ("grpc", "json") for i, c in enumerate(s.e2e_concurrency)]
    routed = gateway_port
    for protocol, c, i in turns:
        shift = i % len(gateways)
        for suffix, port, metrics_port, _ in gateways[shift:] + gateways[:shift]:
            if port != routed:
                route_to(platform, envoy_port, (port, metrics_port), target, key)
                routed = port
            if protocol == "grpc":
                run.measure(suite, system=f"InferGrid Predict via Envoy (gRPC){label[suffix]}", key=f"e2e-grpc{suffix}",
                            protocol="gRPC", tool="h2load", params={"concurrency": c},
                            rep=grpc_rep(chain.cpu, frame, c, metrics_port))  # fmt: skip
            else:
                run.measure(suite, system=f"InferGrid Predict via Envoy (HTTP/JSON){label[suffix]}",
                            key=f"e2e-json{suffix}", protocol="HTTP/JSON", tool="wrk", params={"concurrency": c},
                            rep=json_rep(chain.cpu, c, metrics_port))  # fmt: skip

    if not s.quick or os.environ.get(FLAME_ENV):  # where the gateway's CPU goes (separate, unmeasured runs)
        load = [h2.binary, "-t1", "-c8", "-m4", "-D", "8", "-d", str(body_file), "-H", "content-type: application/grpc",
                "-H", "te: trailers", "-H", f"x-api-key: {key}", url]  # fmt: skip
        for suffix, port, metrics_port, server in gateways:
            if port != routed:
                route_to(platform, envoy_port, (port, metrics_port), target, key)
                routed = port
            svg = flame_graph(server, run.out_dir / f"flame-gateway{suffix}.svg", load)
            if svg:
                suite.extra[f"flame_graph{suffix}"] = svg.name
    # The node without Envoy, as the peers are measured: h2load straight at its gateway port, which checks
    # the API key and rate limits itself (admission in the gateway), on the same core.
    for suffix, port, *_ in gateways:
        if suffix.startswith("-node"):
            direct = f"http://127.0.0.1:{port}/{PREDICT}"
            direct_frame = h2.response_bytes(
                url=direct, body_file=body_file, extra_headers=[f"x-api-key: {key}"]
            )
            for c in s.e2e_concurrency:

                def direct_rep(duration: float, i: int, c: int = c, direct: str = direct,
                               direct_frame: int = direct_frame) -> dict[str, Any]:  # fmt: skip
                    return with_breakdown(chain, lambda: h2.run(
                        url=direct, body_file=body_file, concurrency=c, duration_s=duration,
                        response_frame_bytes=direct_frame, log_file=work / "h2load.log", server_cpu=chain.cpu,
                        extra_headers=[f"x-api-key: {key}"]))  # fmt: skip

                run.measure(suite, system=f"InferGrid Predict, {suffix[1:]} direct (gRPC, no Envoy)",
                            key=f"direct-grpc{suffix}", protocol="gRPC", tool="h2load", params={"concurrency": c},
                            rep=direct_rep)  # fmt: skip
    if routed != gateway_port:
        route_to(platform, envoy_port, (gateway_port, gateway_metrics), target, key)
    for *_, server in gateways[1:]:  # the baseline is done: free the core
        run.procs.stop(server)
        chain.servers.remove(server)
    suite.extra["spans_exported"] = sink.spans

    # Scaling: the same Predict benchmark with one and with two gateway worker processes (SO_REUSEPORT). Two
    # workers need two cores: the whole chain and h2load are unpinned for these rows (suite `scaling`).
    def repin(to: str | None) -> None:
        for server in chain.servers:
            for pid in group_pids(server.pid):
                set_affinity(pid, to)
        for pid in chain.pids.values():
            set_affinity(pid, to)

    scaling = run.suite("scaling")
    run.procs.stop(gateway)
    chain.servers.remove(gateway)
    repin("0-1")

    # Layouts: everything floating over both cores; and each Python process on one core (a threaded
    # worker that floats hands its GIL across cores, which costs CPU: the scaling suite's echo rows).
    def scaling_rep(c: int) -> Any:
        """One repetition of a scaling point: h2load over 8 connections, unpinned, with the CPU breakdown."""

        def rep(duration: float, i: int) -> dict[str, Any]:
            return with_breakdown(chain, lambda: h2.run(
                url=url, body_file=body_file, concurrency=c, duration_s=duration, response_frame_bytes=frame,
                log_file=work / "h2load.log", server_cpu=chain.cpu, extra_headers=[f"x-api-key: {key}"], pin=False,
                connections=8))  # fmt: skip

        return rep

    layouts = (
        (1, False, "1 gateway worker (unpinned)", ""),
        (2, False, "2 gateway workers (unpinned)", ""),
        (1, True, "1 gateway worker on CPU 0, features and inference on CPU 1", "-split"),
        (2, True, "2 gateway workers, one per CPU, features on CPU 1, inference on CPU 0", "-pinned"),
    )
    for workers, pinned, label, suffix in layouts:
        env["INFERGRID_GATEWAY_WORKERS"] = str(workers)
        env["INFERGRID_GATEWAY_PIN_WORKERS"] = str(pinned and workers > 1).lower()
        gw = run.procs.start(
            f"e2e-gateway-w{workers}{suffix}", [sys.executable, "-m", "services.gateway"], env=env,
            cpus="0" if pinned and workers == 1 else None,
        )  # fmt: skip
        wait_grpc_serving(gw, gateway_port, timeout=90)
        chain.servers.append(gw)
        for server, cpu in ((feats, "1"), (inference, "0" if workers > 1 else "1")):
            for pid in group_pids(server.pid):
                set_affinity(pid, cpu if pinned else "0-1")
        wait_predict(target, key)
        for c in s.scaling_concurrency:
            run.measure(scaling, system=f"Predict via Envoy, {label}", key=f"e2e-gw{workers}{suffix}",
                        protocol="gRPC", tool="h2load", params={"concurrency": c, "workers": workers},
                        rep=scaling_rep(c))  # fmt: skip
        run.procs.stop(gw)
        chain.servers.remove(gw)
    # The node on both cores: two node workers, one pinned per CPU (each a whole node), behind the same Envoy.
    for suffix, single_env in node_envs.items():
        both_env = {**single_env, "INFERGRID_GATEWAY_PORT": str(gateway_port),
                    "INFERGRID_GATEWAY_METRICS_PORT": str(gateway_metrics), "INFERGRID_GATEWAY_WORKERS": "2",
                    "INFERGRID_GATEWAY_PIN_WORKERS": "true"}  # fmt: skip
        node = run.procs.start(f"e2e{suffix}-w2", [sys.executable, "-m", "services.node"], env=both_env)
        wait_grpc_serving(node, gateway_port, timeout=120)
        chain.servers.append(node)
        wait_predict(target, key)
        for c in s.scaling_concurrency:
            run.measure(scaling, system=f"Predict via Envoy, {suffix[1:]}: 2 workers, one per CPU",
                        key=f"e2e{suffix}2-pinned", protocol="gRPC", tool="h2load",
                        params={"concurrency": c, "workers": 2}, rep=scaling_rep(c))  # fmt: skip
        run.procs.stop(node)
        chain.servers.remove(node)
    repin(cpus)
    for pid in run.backends.pids("cassandra", "kafka"):
        set_affinity(pid, backend_cpus)

    # The transport limit of this path: the same Envoy, the gateway replaced by a fixed-answer server.
    echo_port = free_port()
    echo = run.procs.start("e2e-echo", [sys.executable, "-m", "bench.servers.echo", "--mode", "predict", "--port",
                                        str(echo_port)], env=repo_env(), cpus=cpus)  # fmt: skip
    wait_grpc_serving(echo, echo_port, timeout=30)
    platform.write_text(PLATFORM.format(envoy_port=envoy_port, upstream_port=echo_port))
    wait_echo(target, key, timeout=30)
    for server in (inference, feats):  # not on the path any more: free the core
        run.procs.stop(server)
        chain.servers.remove(server)
    chain.servers.append(echo)
    frame = h2.response_bytes(url=url, body_file=body_file, extra_headers=[f"x-api-key: {key}"])
    for c in s.e2e_concurrency:
        run.measure(suite, system="Envoy → echo (gRPC)", key="envoy-echo-grpc", protocol="gRPC",
                    tool="h2load", params={"concurrency": c}, rep=grpc_rep(chain.cpu, frame, c, None))  # fmt: skip
    for c in s.e2e_concurrency:
        run.measure(suite, system="Envoy → echo (HTTP/JSON)", key="envoy-echo-json",
                    protocol="HTTP/JSON", tool="wrk", params={"concurrency": c}, rep=json_rep(chain.cpu, c, None))  # fmt: skip
    # The same fixed answer from a threaded grpc.server: what another transport would buy the gateway (item 1);
    # `hop`: each answer from a coroutine on a loop thread, as the gateway's asyncio pipeline would need.
    for mode, label in (("sync", "threaded echo"), ("hop", "threaded echo via a loop thread")):
        run.procs.stop(echo)
        chain.servers.remove(echo)
        echo_port = free_port()
        echo = run.procs.start(f"e2e-echo-{mode}", [sys.executable, "-m", "bench.servers.echo", "--mode",
                                                    f"predict-{mode}", "--port", str(echo_port)], env=repo_env(),
                               cpus=cpus)  # fmt: skip
        wait_grpc_serving(echo, echo_port, timeout=30)
        platform.write_text(PLATFORM.format(envoy_port=envoy_port, upstream_port=echo_port))
        wait_echo(target, key, timeout=30)
        chain.servers.append(echo)
        for c in s.e2e_concurrency:
            run.measure(suite, system=f"Envoy → {label} (gRPC)", key=f"envoy-echo-{mode}-grpc", protocol="gRPC",
                        tool="h2load", params={"concurrency": c}, rep=grpc_rep(chain.cpu, frame, c, None))  # fmt: skip
        for c in s.e2e_concurrency:
            run.measure(suite, system=f"Envoy → {label} (HTTP/JSON)", key=f"envoy-echo-{mode}-json",
                        protocol="HTTP/JSON", tool="wrk", params={"concurrency": c}, rep=json_rep(chain.cpu, c, None))  # fmt: skip
    for server in list(chain.servers):
        run.procs.stop(server)
    envoy.stop()

    # The reference point: PyTriton doing only the Redis lookup (one MGET per batch) and the model.
    table = write_entity_table(redis.url)
    pytriton_with_redis(run, suite, h2=h2, redis_url=redis.url, repo=batch_repo, table=table)
    try:
        litserve_with_redis(run, suite, wrk=wrk, redis_url=redis.url, repo=batch_repo, table=table)
    except Exception as exc:  # a stretch peer: its failure is recorded, the run goes on
        suite.extra["litserve_error"] = f"{type(exc).__name__}: {exc}"[:1500]
        say(f"LitServe failed: {suite.extra['litserve_error'][:300]}")
    say("e2e done")


def write_entity_table(redis_url: str) -> Any:
    """10,000 entities x 32 float32 features at `bench:feat:<id>` (peers.md's layout for the peers' lookups)."""
    import numpy as np
    import redis as redis_py

    rng = np.random.default_rng(4242)
    table = rng.normal(0, 1, (10_000, 32)).astype(np.float32)
    table[:, 0] = np.abs(table[:, 0]) * 50
    client = redis_py.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for i in range(10_000):
        pipe.set(f"bench:feat:{i}", table[i].tobytes())
    pipe.execute()
    client.close()
    return table


WRK_LITSERVE = """
math.randomseed(5)
function request()
  return wrk.format("POST", "/predict", {["Content-Type"] = "application/json"},
                    string.format('{"entity_id": %d}', math.random(0, 9999)))
end
"""


def litserve_with_redis(run: Run, suite: Suite, *, wrk: Wrk, redis_url: str, repo: Path, table: Any) -> None:
    """LitServe (peers.md's best of Ray Serve / BentoML / LitServe at p99 <= 25 ms): Redis MGET per batch + model."""
    from bench.tools import ensure_venv

    venv = ensure_venv("litserve")
    port = free_port()
    script = Path(__file__).parents[1] / "servers" / "litserve_server.py"
    env = {**repo_env(), "HOME": str(run.work_dir)}
    env.pop("PYTHONPATH", None)
    server = run.procs.start("litserve", [str(venv / "bin" / "python"), str(script), "--onnx",
                                          str(repo / "fraud" / "1" / "model.onnx"), "--port", str(port),
                                          "--redis-url", redis_url], env=env, cpus=server_cpus())  # fmt: skip
    server.extra_pids = run.backends.pids("redis")
    expected = float(inference_suite.reference_outputs(repo, table[[4242]])[0])
    deadline = time.monotonic() + 120
    while True:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", json.dumps({"entity_id": 4242}).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(req, timeout=10) as resp:
                got = float(json.loads(resp.read())["fraud_probability"])
            break
        except OSError:
            if not server.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"LitServe did not answer:\n{server.log_tail()}") from None
            time.sleep(1)
    if abs(got - expected) > 1e-5:
        raise RuntimeError(f"LitServe answered {got}, ONNX Runtime {expected}")
    lua = run.work_dir / "e2e" / "litserve.lua"
    lua.write_text(WRK_LITSERVE + WRK_DONE)
    for c in run.settings.e2e_concurrency:

        def rep(duration: float, i: int, c: int = c) -> dict[str, Any]:
            return wrk.run(url=f"http://127.0.0.1:{port}", script=lua, concurrency=c, duration_s=duration,
                           server_cpu=server.cpu_seconds)  # fmt: skip

        run.measure(suite, system="LitServe 0.2.19: Redis MGET + model, batching (HTTP/JSON, no Envoy)",
                    key="litserve-redis", protocol="HTTP/JSON", tool="wrk", params={"concurrency": c}, rep=rep)  # fmt: skip
    run.procs.stop(server)


def pytriton_with_redis(
    run: Run, suite: Suite, *, h2: H2load, redis_url: str, repo: Path, table: Any
) -> None:
    import numpy as np

    from inference import grpc_service_pb2 as ipb

    expected = inference_suite.reference_outputs(repo, table[[4242]])[0]
    server, port = inference_suite.start_pytriton(
        run, repo, name="pytriton-redis", extra=["--redis-url", redis_url]
    )
    server.extra_pids = run.backends.pids("redis")
    req = ipb.ModelInferRequest(model_name="fraud_entity", model_version="1")
    req.inputs.add(name="entity_id", datatype="INT64", shape=[1, 1])
    req.raw_input_contents.append(np.array([4242], dtype=np.int64).tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = inference_suite.pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    got = float(np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)[0])
    if abs(got - float(expected)) > 1e-5:
        raise RuntimeError(f"PyTriton fraud_entity answered {got}, ONNX Runtime {expected}")
    body_file = run.work_dir / "e2e" / "pytriton-entity.grpc"
    body_file.write_bytes(grpc_frame(req.SerializeToString()))
    url = f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"
    frame = h2.response_bytes(url=url, body_file=body_file)
    for c in run.settings.e2e_concurrency:

        def rep(duration: float, i: int, c: int = c) -> dict[str, Any]:
            return h2.run(url=url, body_file=body_file, concurrency=c, duration_s=duration, response_frame_bytes=frame,
                          log_file=run.work_dir / "h2load.log", server_cpu=server.cpu_seconds)  # fmt: skip

        run.measure(suite, system="PyTriton: Redis MGET + model in one process (KServe v2 gRPC, no Envoy)",
                    key="pytriton-redis", protocol="gRPC", tool="h2load", params={"concurrency": c}, rep=rep)  # fmt: skip
    run.procs.stop(server)
