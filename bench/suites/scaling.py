"""Scaling: one vs two worker processes of a service (INFERGRID_<NAME>_WORKERS, SO_REUSEPORT), same load.

The inference service (batching on) with one and two workers. Nothing is pinned there: two workers need
both cores, which they share with h2load (8 connections, so the kernel spreads connections over both
workers). Compare those rows with each other, not with the pinned rows of the other suites. (The whole
path's scaling rows are measured by the e2e suite, which has it running.)

Placement: the threaded echo (`bench/servers/echo.py --mode sync`) on one CPU and floating over both, h2load
on the load generator's CPU in both: the CPU per call a threaded server pays when its GIL moves between
cores, which is why `INFERGRID_<NAME>_PIN_WORKERS` exists.
"""

from __future__ import annotations

import sys
from typing import Any

from bench.core import Run, Suite
from bench.loadgen import H2load, grpc_frame
from bench.procs import Server, free_port, repo_env, server_cpus, wait_port
from bench.suites.inference import prepare_repositories, request, rows, start_ours
from bench.tools import ensure_debian


def body(run: Run, suite: Suite) -> None:
    h2 = H2load(ensure_debian("h2load", "nghttp2-client"))
    batch_repo, _ = prepare_repositories(run)
    body_file = run.work_dir / "modelinfer.grpc"
    body_file.write_bytes(grpc_frame(request(rows()[0]).SerializeToString()))
    for workers in (1, 2):
        server, port = start_ours(run, f"inference-w{workers}", batch_repo, workers=workers, cpus=None)
        url = f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"
        frame = h2.response_bytes(url=url, body_file=body_file)
        for c in run.settings.scaling_concurrency:

            def rep(
                duration: float,
                i: int,
                *,
                c: int = c,
                url: str = url,
                server: Server = server,
                frame: int = frame,
            ) -> dict[str, Any]:
                return h2.run(url=url, body_file=body_file, concurrency=c, duration_s=duration, connections=8,
                              response_frame_bytes=frame, log_file=run.work_dir / "h2load.log",
                              server_cpu=server.cpu_seconds, pin=False)  # fmt: skip

            run.measure(suite, system=f"InferGrid inference, {workers} worker{'s' if workers > 1 else ''} (unpinned)",
                        key=f"inference-w{workers}", protocol="gRPC", tool="h2load",
                        params={"concurrency": c, "workers": workers}, rep=rep)  # fmt: skip
        run.procs.stop(server)

    # Placement of a threaded server: one CPU against both (needs two CPUs).
    one = server_cpus()
    for cpus, label in ((one, "one CPU"), ("0-1", "floating over both CPUs")) if one else ():
        port = free_port()
        server = run.procs.start(f"echo-sync-{cpus}", [sys.executable, "-m", "bench.servers.echo", "--mode", "sync",
                                                       "--port", str(port)], env=repo_env(), cpus=cpus)  # fmt: skip
        wait_port(port, 30, server.proc)
        url = f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"
        frame = h2.response_bytes(url=url, body_file=body_file)
        for c in run.settings.scaling_concurrency:

            def echo_rep(duration: float, i: int, *, c: int = c, url: str = url, server: Server = server,
                         frame: int = frame) -> dict[str, Any]:  # fmt: skip
                return h2.run(url=url, body_file=body_file, concurrency=c, duration_s=duration, connections=8,
                              response_frame_bytes=frame, log_file=run.work_dir / "h2load.log",
                              server_cpu=server.cpu_seconds)  # fmt: skip

            run.measure(suite, system=f"echo (grpc threaded), {label}", key=f"echo-sync-{'pinned' if cpus != '0-1' else 'floating'}",
                        protocol="gRPC", tool="h2load", params={"concurrency": c}, rep=echo_rep)  # fmt: skip
        run.procs.stop(server)
