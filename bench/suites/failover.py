"""Failover: per-request GPU→CPU failover between two inference pools behind a real gateway (issue 17, item 3).

The setup of `tests/integration/gateway/test_inference_failover.py`, from the same module
(`bench/inference_pools.py`): two `python -m services.inference` processes (ONNX Runtime, the demo `fraud`
model), `gpu` (preferred) and `cpu`, and a `python -m services.gateway` process whose platform file names
both pools, `fraud` preferring `gpu`; single-row batches (so the gateway's failover counter counts
requests), 8 batches in flight, API key and rate limit checked in the gateway (local bucket, no Redis), no
feature service (rows are served with their defaults) and no inference log. All three servers share the
server CPU; the load generator is this harness's own asyncio gRPC client on the load-generator CPU (it
must read each answer's `inference_pool`), closed loop at `CONCURRENCY` calls in flight, each call with a
`DEADLINE_S` deadline. Side by side in one run, each phase a point:

- `healthy`: both pools serving (the demo batching, 1 ms delay);
- `sigterm`: `gpu` gets SIGTERM `KILL_AT_S` into one measured run (the transition: it refuses new
  batches on its stream at once, finishes those it has, and stops after its grace period);
- `sigkill`: `gpu` (restarted) gets SIGKILL `KILL_AT_S` into one measured run;
- `down`: `gpu` stays down (steady state, warm-up and repetitions as usual);
- `saturated`: `gpu` restarted with its queue bounded to 2 requests and a 100 ms batching delay (the
  integration test's `SATURABLE`): concurrent batches overflow its queue (RESOURCE_EXHAUSTED);
- `slow`: `gpu` restarted with the batching delay of `SLOW` (longer than the deadline): its queue
  delay is past every call's deadline.

Per phase: calls, OK, failed by status code, the share each pool served (from the answers'
`inference_pool`), and the gateway's `infergrid_gateway_inference_failovers_total` by reason (scraped from
its /metrics before and after each repetition), summed over the measured repetitions; throughput and
latency percentiles as in every suite (medians over repetitions). After the SIGTERM phase `gpu` is started
again, and the seconds until the gateway sends traffic back to it are recorded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import secrets
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench import inference_pools as ip
from bench import stats
from bench.core import Run, Suite
from bench.procs import Server, free_port, loadgen_cpus, repo_env, server_cpus, set_affinity
from bench.suites.common import service_env, wait_grpc_serving
from bench.suites.inference import wait_model_ready
from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs.apikeys import add_key
from libs.testing import NO_REDIS_URL
from stack.services import INPUT_LAYOUTS

CONCURRENCY = 16
DEADLINE_S = ip.DEADLINE_S
KILL_AT_S = 1.0
SLOW = ip.SLOW  # its queue delay is past DEADLINE_S: every batch the slow pool takes answers too late
PHASES = {
    "healthy": "both pools serving",
    "sigterm": f"gpu pool SIGTERMed {KILL_AT_S:.0f} s into the run",
    "sigkill": f"gpu pool SIGKILLed {KILL_AT_S:.0f} s into the run",
    "down": "gpu pool down (after the SIGKILL)",
    "saturated": "gpu pool saturated (queue of 2, 100 ms batching delay)",
    "slow": f"gpu pool's queue delay past the deadline ({SLOW.queue_delay_us // 1000} ms batching delay, "
    f"{DEADLINE_S * 1000:.0f} ms deadline)",
}
PLATFORM = """admission: {placement: gateway}
rate_limit_tiers: {bench: {requests_per_second: 1000000, burst: 1000000}}
tenants: {bench: {tier: bench, models: ['fraud']}}
"""


@dataclass
class Calls:
    """What one closed-loop run saw: latencies of the OK calls, failures by code, answers by pool."""

    latencies_ms: list[float] = field(default_factory=list)
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    served: collections.Counter[str] = field(default_factory=collections.Counter)


def rep_summary(
    calls: Calls,
    duration_s: float,
    failovers_before: Mapping[str, float],
    failovers_after: Mapping[str, float],
) -> dict[str, Any]:
    """One repetition: bench.stats.summarize's keys, plus the calls made, failures by code, answers by pool
    and the failover counter's increase by reason (reasons that did not increase left out)."""
    out: dict[str, Any] = dict(
        stats.summarize(calls.latencies_ms, errors=sum(calls.failed.values()), duration_s=duration_s)
    )
    deltas = {r: failovers_after.get(r, 0.0) - failovers_before.get(r, 0.0) for r in failovers_after}
    out.update(
        calls=len(calls.latencies_ms) + sum(calls.failed.values()),
        failed_by_code=dict(sorted(calls.failed.items())),
        served_by=dict(sorted(calls.served.items())),
        failovers={r: v for r, v in sorted(deltas.items()) if v > 0},
    )
    return out


def phase_totals(reps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The measured repetitions of a phase added up: calls, OK, failed by code, answers by pool (count and
    share of the OK answers), failovers by reason."""
    failed: collections.Counter[str] = collections.Counter()
    served: collections.Counter[str] = collections.Counter()
    failovers: collections.Counter[str] = collections.Counter()
    calls = ok = 0
    for rep in reps:
        calls += int(rep.get("calls", 0))
        ok += int(rep.get("requests", 0))
        failed.update(rep.get("failed_by_code") or {})
        served.update(rep.get("served_by") or {})
        failovers.update(rep.get("failovers") or {})
    return {
        "calls": calls,
        "ok": ok,
        "failed_by_code": dict(sorted(failed.items())),
        "served_by": dict(sorted(served.items())),
        "served_share": {pool: round(n / ok, 4) for pool, n in sorted(served.items())} if ok else {},
        "failovers": {r: int(v) for r, v in sorted(failovers.items())},
    }


async def drive(
    target: str,
    api_key: str,
    *,
    concurrency: int,
    duration_s: float,
    deadline_s: float = DEADLINE_S,
    events: Sequence[tuple[float, Callable[[], None]]] = (),
) -> Calls:
    """Closed loop: `concurrency` callers send Predict until `duration_s` is over; `events` run at their
    offsets (seconds from the start). Calls still in flight at the end are counted when they finish."""
    calls = Calls()
    metadata = (("x-api-key", api_key),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.PredictionServiceStub(channel)
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        end = start + duration_s
        handles = [loop.call_later(at, action) for at, action in events]

        async def caller(worker: int) -> None:
            i = worker
            while time.perf_counter() < end:
                request = ip.predict_request(i, "bench-failover")
                i += concurrency
                t0 = time.perf_counter()
                try:
                    answer: gateway_pb2.PredictResponse = await stub.Predict(
                        request, timeout=deadline_s, metadata=metadata
                    )
                except grpc.aio.AioRpcError as exc:
                    calls.failed[exc.code().name] += 1
                    continue
                calls.latencies_ms.append((time.perf_counter() - t0) * 1000)
                calls.served[answer.inference_pool or "?"] += 1

        try:
            await asyncio.gather(*(caller(w) for w in range(concurrency)))
        finally:
            for handle in handles:
                handle.cancel()
    return calls


def scrape_failovers(metrics_port: int) -> dict[str, float]:
    """The gateway's failover counter by reason, from its /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return ip.failovers_by_reason(text_string_to_metric_families(text))


@contextlib.contextmanager
def harness_on_loadgen_cpu() -> Iterator[None]:
    """Pins this process (the load generator here) to the load-generator CPU, and back afterwards."""
    cpus = loadgen_cpus()
    before = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    set_affinity(os.getpid(), cpus)
    try:
        yield
    finally:
        if cpus:
            set_affinity(os.getpid(), before)


@dataclass
class Setup:
    run: Run
    work: Path
    repos: dict[str, Path]
    gpu_port: int
    target: str = ""
    api_key: str = ""
    metrics_port: int = 0
    servers: list[Server] = field(default_factory=list)
    gpu: Server | None = None

    def start_pool(self, name: str, repo: Path, port: int) -> Server:
        env = repo_env(ip.pool_env(repo, port, metrics_port=free_port()))
        env["INFERGRID_INFERENCE_LOG_LEVEL"] = "WARNING"
        server = self.run.procs.start(
            f"failover-{name}-pool", [sys.executable, "-m", ip.POOL_MODULE], env=env, cpus=server_cpus()
        )
        wait_grpc_serving(server, port, timeout=120)
        wait_model_ready(server, port)
        return server

    def start_gpu(self, variant: str) -> None:
        self.stop_gpu()
        self.gpu = self.start_pool(f"gpu-{variant}", self.repos[variant], self.gpu_port)

    def stop_gpu(self) -> None:
        if self.gpu is not None:
            self.run.procs.stop(self.gpu)
            self.gpu = None

    def signal_gpu(self, signum: int) -> Callable[[], None]:
        def send() -> None:
            if self.gpu is not None and self.gpu.alive():
                os.kill(self.gpu.pid, signum)

        return send

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far of the gateway, the cpu pool and the gpu pool (0 once it has exited)."""
        out = {s.name.removeprefix("failover-"): s.cpu_seconds() for s in self.servers}
        out["gpu-pool"] = self.gpu.cpu_seconds() if self.gpu is not None else 0.0
        return out

    def back_on_gpu(self, timeout: float = 60.0) -> float:
        """Seconds until a Predict is served by the gpu pool again (a generous deadline: the slow pool's
        answers come after DEADLINE_S)."""
        start = time.monotonic()
        with grpc.insecure_channel(self.target) as channel:
            stub = gateway_pb2_grpc.PredictionServiceStub(channel)
            i = 0
            while time.monotonic() - start < timeout:
                with contextlib.suppress(grpc.RpcError):
                    answer = stub.Predict(
                        ip.predict_request(i, "bench-failover-probe"),
                        timeout=2.0,
                        metadata=(("x-api-key", self.api_key),),
                    )
                    if answer.inference_pool == ip.PREFERRED:
                        return round(time.monotonic() - start, 2)
                i += 1
                time.sleep(0.05)
        raise RuntimeError(f"no answer from the {ip.PREFERRED} pool within {timeout:.0f} s")


def measure_phase(setup: Setup, suite: Suite, phase: str, *, kill: int | None = None) -> None:
    """One point: warm-up and repetitions as usual, or (with `kill`) one run of all the repetitions'
    length in which the gpu pool gets signal `kill` KILL_AT_S in."""
    settings = setup.run.settings

    def rep(duration: float, i: int) -> dict[str, Any]:
        events: list[tuple[float, Callable[[], None]]] = []
        if kill is not None and i >= 0:
            duration = max(duration * settings.reps, KILL_AT_S + 2.0)
            events.append((KILL_AT_S, setup.signal_gpu(kill)))
        before = scrape_failovers(setup.metrics_port)
        cpu0, load0, t0 = setup.cpu_by_process(), time.process_time(), time.perf_counter()
        calls = asyncio.run(
            drive(setup.target, setup.api_key, concurrency=CONCURRENCY, duration_s=duration, events=events)
        )
        elapsed = time.perf_counter() - t0
        out = rep_summary(calls, duration, before, scrape_failovers(setup.metrics_port))
        # A killed gpu pool's CPU is gone with it: its share of a transition run is left out (clipped at 0).
        used = {k: max(0.0, v - cpu0.get(k, 0.0)) / elapsed for k, v in setup.cpu_by_process().items()}
        out["cpu_by_process"] = {k: round(v, 3) for k, v in used.items()}
        out["server_cpu"] = round(sum(used.values()), 3)
        out["loadgen_cpu"] = round((time.process_time() - load0) / elapsed, 3)
        return out

    point = setup.run.measure(
        suite,
        system=f"Predict via the gateway, {PHASES[phase]}",
        key=f"failover-{phase}",
        protocol="gRPC",
        tool="grpc.aio (in the harness)",
        params={"concurrency": CONCURRENCY, "phase": phase, "deadline_ms": int(DEADLINE_S * 1000)},
        rep=rep,
        reps=1 if kill is not None else None,
    )
    if point.get("reps"):
        point["totals"] = phase_totals(point["reps"])
        setup.run.save()


def body(run: Run, suite: Suite) -> None:
    work = run.work_dir / "failover"
    work.mkdir(parents=True, exist_ok=True)
    demo = ip.write_demo_repository(work / "models-cpu")
    repos = {
        "demo": ip.batching_variant(demo, work / "models-gpu", ip.DEMO),
        "saturated": ip.batching_variant(demo, work / "models-gpu-saturated", ip.SATURABLE),
        "slow": ip.batching_variant(demo, work / "models-gpu-slow", SLOW),
    }
    setup = Setup(run, work, repos, gpu_port=free_port())
    cpu_port = free_port()
    setup.servers.append(setup.start_pool("cpu", demo, cpu_port))
    setup.start_gpu("demo")

    platform = work / "platform.yaml"
    platform.write_text(
        PLATFORM
        + ip.pools_yaml({ip.PREFERRED: f"127.0.0.1:{setup.gpu_port}", ip.FALLBACK: f"127.0.0.1:{cpu_port}"})
    )
    setup.api_key = secrets.token_urlsafe(24)
    add_key(work / "keys.yaml", "bench", "bench", setup.api_key)
    gateway_port, setup.metrics_port = free_port(), free_port()
    env = service_env("INFERGRID_GATEWAY_", gateway_port, {
        **ip.gateway_env(),
        "INFERGRID_GATEWAY_METRICS_PORT": str(setup.metrics_port),
        "INFERGRID_GATEWAY_INPUT_LAYOUTS": str(INPUT_LAYOUTS),
        "INFERGRID_GATEWAY_PLATFORM_FILE": str(platform),
        "INFERGRID_GATEWAY_FEATURES_TARGET": f"127.0.0.1:{free_port()}",  # nobody: rows use their defaults
        "INFERGRID_GATEWAY_INFERENCE_TARGET": f"127.0.0.1:{cpu_port}",
        "INFERGRID_GATEWAY_ADMISSION_REDIS_URL": NO_REDIS_URL,
        "INFERGRID_GATEWAY_INFERENCE_LOG_ENABLED": "false",
    })  # fmt: skip
    gateway = run.procs.start("failover-gateway", [sys.executable, "-m", "services.gateway"], env=env,
                              cpus=server_cpus())  # fmt: skip
    wait_grpc_serving(gateway, gateway_port, timeout=90)
    setup.servers.append(gateway)
    setup.target = f"127.0.0.1:{gateway_port}"
    back: dict[str, float] = {}
    try:
        with harness_on_loadgen_cpu():
            back["first answer from gpu after start (s)"] = setup.back_on_gpu()
            measure_phase(setup, suite, "healthy")
            measure_phase(setup, suite, "sigterm", kill=signal.SIGTERM)
            setup.start_gpu("demo")
            back["traffic back on gpu after its restart (s)"] = setup.back_on_gpu()
            measure_phase(setup, suite, "sigkill", kill=signal.SIGKILL)
            measure_phase(setup, suite, "down")
            setup.start_gpu("saturated")
            back["first answer from the saturated gpu (s)"] = setup.back_on_gpu()
            measure_phase(setup, suite, "saturated")
            setup.start_gpu("slow")
            back["first answer from the slow gpu (s)"] = setup.back_on_gpu()
            measure_phase(setup, suite, "slow")
    finally:
        setup.stop_gpu()
        for server in reversed(setup.servers):
            run.procs.stop(server)
    suite.extra.update(back)
    suite.extra["deadline_ms"] = int(DEADLINE_S * 1000)
    suite.extra["failover counter"] = "per batch; batches are single rows here, so per request"
