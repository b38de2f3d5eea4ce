"""Envoy's own cost per request, setting by setting (issue 15 item 2).

The same Envoy and control plane as the e2e suite, in front of its fixed-answer echo (`bench.servers.echo
--mode predict`, the transport limit of the path), so that every CPU microsecond measured is Envoy's, the
echo's or the load generator's. The variants run side by side in one run, one setting changed at a time from
what `make up` runs:

1. `make up`: access log to a file, tracing to Jaeger for every request, worker threads = cores;
2. access log off;
3. tracing sampled at 1 % (the Kubernetes manifests' setting);
4. tracing off;
5. tracing off and `--concurrency 1` (one worker thread on the one core Envoy is pinned to).

Envoy, the control plane and the echo are pinned to the serving CPU, Jaeger and the load generators to the
other. Each variant is measured for gRPC (h2load) and HTTP/JSON through the transcoder (wrk) at the e2e
suite's highest concurrency. The table's "CPU per request by process" row is the figure to read: Envoy's
µs per request; req/s is bounded by the echo and the load generator as much as by Envoy.
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from typing import Any

from bench.core import Run, Suite
from bench.loadgen import WRK_DONE, H2load, Wrk, grpc_frame
from bench.procs import free_port, loadgen_cpus, repo_env, server_cpus, set_affinity, wait_port
from bench.suites.common import service_env, wait_grpc_serving
from bench.suites.e2e import PLATFORM, PREDICT, WRK_PREDICT, Chain, predict_request, wait_echo, with_breakdown
from bench.tools import ensure_debian, say
from libs.testing import REPO_ROOT
from stack.envoy import Envoy
from stack.jaeger import Jaeger
from stack.progress import Progress


@dataclass(frozen=True)
class Variant:
    """One Envoy configuration: the control plane's access-log and tracing settings, Envoy's worker threads."""

    key: str
    label: str
    access_log: bool
    sample_percent: float | None  # None: tracing off
    concurrency: int | None = None  # None: Envoy's default (the machine's cores)


VARIANTS = (
    Variant("make-up", "as `make up` runs it (access log, tracing 100 %)", True, 100.0),
    Variant("no-access-log", "access log off, tracing 100 %", False, 100.0),
    Variant("trace-1pct", "access log off, tracing 1 %", False, 1.0),
    Variant("no-tracing", "access log off, tracing off", False, None),
    Variant("one-worker", "access log off, tracing off, --concurrency 1", False, None, 1),
)


def body(run: Run, suite: Suite) -> None:
    cpus, other = server_cpus(), loadgen_cpus()
    work = run.work_dir / "envoy"
    work.mkdir(exist_ok=True)
    h2 = H2load(ensure_debian("h2load", "nghttp2-client"))
    wrk = Wrk(ensure_debian("wrk", "wrk"))
    concurrency = max(run.settings.e2e_concurrency)

    jaeger = Jaeger(run.backends.config)
    jaeger_record = jaeger.start(Progress("jaeger"))
    run.procs.on_stop(jaeger.stop)
    set_affinity(jaeger_record.pid, other)
    otlp = f"127.0.0.1:{run.backends.config.port('jaeger_otlp_grpc')}"

    echo_port = free_port()
    echo = run.procs.start("envoy-echo", [sys.executable, "-m", "bench.servers.echo", "--mode", "predict",
                                          "--port", str(echo_port)], env=repo_env(), cpus=cpus)  # fmt: skip
    wait_grpc_serving(echo, echo_port, timeout=30)
    envoy_port = run.backends.config.port("envoy")
    platform = work / "platform.yaml"
    platform.write_text(PLATFORM.format(envoy_port=envoy_port, upstream_port=echo_port))
    target = f"127.0.0.1:{envoy_port}"
    body_file = work / "predict.grpc"
    body_file.write_bytes(grpc_frame(predict_request(4242).SerializeToString()))
    script = work / "predict.lua"
    script.write_text(WRK_PREDICT + WRK_DONE)
    key = secrets.token_urlsafe(8)  # the echo admits anything; Envoy (gateway placement) checks no key
    suite.extra["variants"] = {v.key: v.label for v in VARIANTS}
    suite.extra["concurrency"] = concurrency

    for variant in VARIANTS:
        say(f"envoy: {variant.label}")
        chain = Chain()
        chain.servers.append(echo)
        cp_port = run.backends.config.port("controlplane")
        controlplane = run.procs.start(
            f"envoy-controlplane-{variant.key}",
            [sys.executable, "-m", "services.controlplane"],
            cpus=cpus,
            env=service_env("INFERGRID_CONTROLPLANE_", cp_port, {
                "INFERGRID_CONTROLPLANE_PLATFORM_FILE": str(platform),
                "INFERGRID_CONTROLPLANE_DESCRIPTOR_SET": str(REPO_ROOT / "build" / "gen" / "descriptors.pb"),
                "INFERGRID_CONTROLPLANE_LISTENER_PORT": str(envoy_port),
                "INFERGRID_CONTROLPLANE_ACCESS_LOG": str(work / f"access-{variant.key}.log") if variant.access_log else "",
                "INFERGRID_CONTROLPLANE_TRACING_OTLP_ADDRESS": otlp if variant.sample_percent is not None else "",
                "INFERGRID_CONTROLPLANE_TRACING_SAMPLE_PERCENT": str(variant.sample_percent or 0.0),
                "INFERGRID_CONTROLPLANE_TLS_DIR": str(work / "tls"),
            }),
        )  # fmt: skip
        wait_grpc_serving(controlplane, cp_port, timeout=60)
        envoy = Envoy(run.backends.config, concurrency=variant.concurrency)
        record = envoy.start(Progress("envoy"))
        try:
            set_affinity(record.pid, cpus)
            chain.pids["envoy"] = record.pid
            chain.servers.append(controlplane)
            wait_port(envoy_port, 60)
            wait_echo(target, key)
            frame = h2.response_bytes(url=f"http://{target}/{PREDICT}", body_file=body_file)

            def grpc_rep(duration: float, i: int, chain: Chain = chain, frame: int = frame) -> dict[str, Any]:
                return with_breakdown(chain, lambda: h2.run(
                    url=f"http://{target}/{PREDICT}", body_file=body_file, concurrency=concurrency,
                    duration_s=duration, response_frame_bytes=frame, log_file=work / "h2load.log",
                    server_cpu=chain.cpu))  # fmt: skip

            def json_rep(duration: float, i: int, chain: Chain = chain) -> dict[str, Any]:
                return with_breakdown(chain, lambda: wrk.run(
                    url=f"http://{target}", script=script, concurrency=concurrency, duration_s=duration,
                    server_cpu=chain.cpu, script_args=[key]))  # fmt: skip

            params = {"concurrency": concurrency}
            run.measure(suite, system=f"Envoy → echo (gRPC), {variant.label}", key=f"{variant.key}-grpc",
                        protocol="gRPC", tool="h2load", params=params, rep=grpc_rep)  # fmt: skip
            run.measure(suite, system=f"Envoy → echo (HTTP/JSON), {variant.label}", key=f"{variant.key}-json",
                        protocol="HTTP/JSON", tool="wrk", params=params, rep=json_rep)  # fmt: skip
        finally:
            envoy.stop()
            run.procs.stop(controlplane)
    say("envoy done")
