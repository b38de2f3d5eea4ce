"""Scaling: one vs two worker processes of a service (INFERGRID_<NAME>_WORKERS, SO_REUSEPORT), same load.

The end-to-end path (gateway behind Envoy) has not landed, so this scales the inference service (batching
on). Nothing is pinned here: two workers need both cores, which they share with h2load (8 connections,
so the kernel spreads connections over both workers). Compare the two rows with each other, not with the
pinned rows of the other suites.
"""

from __future__ import annotations

from typing import Any

from bench.core import Run, Suite
from bench.loadgen import H2load, grpc_frame
from bench.procs import Server
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
