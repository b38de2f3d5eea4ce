"""Inference: our KServe v2 server vs the transport limit (echo servers) vs PyTriton, same ONNX model.

Systems (each alone on the server CPU, h2load on the other; single-row ModelInfer requests for model
`fraud` version 1; h2load sends one hand-framed request, ghz cross-checks send 64 distinct rows):
  echo-aio / echo-sync  fixed answer, nothing computed (bench/servers/echo.py): the transport limit
  ours-batch            python -m services.inference, the demo repository (dynamic batching, 1 ms queue delay)
  ours-nobatch          the same repository with `dynamic_batching` removed from config.pbtxt
  pytriton              PyTriton 0.7 (Triton 2.51 inside) serving the same model.onnx, DynamicBatcher(delay 0)
Cross-checks with ghz and with Triton's perf_analyzer (gRPC unary and streaming; for ours-batch also `-i http`, with
and without `--shared-memory system`) at concurrency 32, and a py-spy flame graph
of ours-batch at concurrency 32 (a separate, unmeasured run).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.core import Run, Suite
from bench.loadgen import Ghz, H2load, grpc_frame, perf_analyzer
from bench.procs import Server, free_port, repo_env, server_cpus, wait_port
from bench.suites.common import flame_graph, service_env, wait_grpc_serving, write_delimited
from bench.tools import base_python, ensure_debian, ensure_ghz, ensure_perf_analyzer, ensure_venv, say
from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc

CALL = "inference.GRPCInferenceService.ModelInfer"
MODEL = "fraud"
VERSION = "1"


def prepare_repositories(run: Run) -> tuple[Path, Path]:
    """The demo repository (batching on) and a copy with batching off."""
    batch = run.work_dir / "models-batch"
    if not (batch / MODEL / "config.pbtxt").exists():
        say("writing the demo model repository (python -m stack.demo_model)")
        subprocess.run([sys.executable, "-m", "stack.demo_model", "--repo", str(batch)],
                       check=True, env=repo_env(), capture_output=True)  # fmt: skip
    nobatch = run.work_dir / "models-nobatch"
    if nobatch.exists():
        shutil.rmtree(nobatch)
    shutil.copytree(batch, nobatch)
    config = (nobatch / MODEL / "config.pbtxt").read_text()
    start = config.index("dynamic_batching {")
    depth, end = 0, start
    for end in range(start, len(config)):
        depth += {"{": 1, "}": -1}.get(config[end], 0)
        if depth == 0 and config[end] == "}":
            break
    (nobatch / MODEL / "config.pbtxt").write_text(config[:start] + config[end + 1 :])
    return batch, nobatch


def rows(n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(2026)
    x = rng.normal(0.0, 1.0, (n, 32)).astype(np.float32)
    x[:, 0] = rng.lognormal(3.5, 0.8, n)  # amount
    x[:, 1] = rng.integers(0, 24, n)  # hour
    return x


def request(row: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL, model_version=VERSION)
    req.inputs.add(name="features", datatype="FP32", shape=[1, 32])
    req.raw_input_contents.append(row.astype(np.float32).tobytes())
    return req


def check_answer(port: int, row: np.ndarray, expected: float | None) -> float:
    """One ModelInfer through our stubs; the probability must match ONNX Runtime's (when expected given)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request(row), timeout=10)
    value = float(np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)[0])
    if expected is not None and abs(value - expected) > 1e-5:
        raise RuntimeError(f"wrong answer on port {port}: {value} vs ONNX Runtime {expected}")
    return value


def wait_model_ready(server: Server, port: int, timeout: float = 180.0, model: str = MODEL) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                if stub.ModelReady(pb.ModelReadyRequest(name=model, version=VERSION), timeout=2).ready:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{server.name}: model never ready\n{server.log_tail()}")


def start_ours(
    run: Run, name: str, repo: Path, *, workers: int = 1, cpus: str | None = "pin", http_port: int = 0
) -> tuple[Server, int]:
    """Our server on `repo`; returns (server, gRPC port). `http_port` 0: no REST API."""
    port = free_port()
    env = ours_env(port, repo, workers=workers, http_port=http_port)
    server = run.procs.start(name, [sys.executable, "-m", "services.inference"], env=env,
                             cpus=server_cpus() if cpus == "pin" else cpus)  # fmt: skip
    wait_grpc_serving(server, port, timeout=90)
    wait_model_ready(server, port)
    return server, port


def ours_env(port: int, repo: Path, *, workers: int = 1, http_port: int = 0) -> dict[str, str]:
    """The variables of our inference server on `port` serving `repo`."""
    return service_env("INFERGRID_INFERENCE_", port, {
        "INFERGRID_INFERENCE_MODEL_REPOSITORY": str(repo),
        "INFERGRID_INFERENCE_WORKERS": str(workers),
        "INFERGRID_INFERENCE_HTTP_PORT": str(http_port),
    })  # fmt: skip


def start_pytriton(
    run: Run, repo: Path, *, name: str = "pytriton", extra: list[str] | None = None
) -> tuple[Server, int]:
    """PyTriton from its own venv on the server CPU (peers.md's LD_LIBRARY_PATH fix); returns (server, gRPC port)."""
    venv = ensure_venv("pytriton")
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        **repo_env(),
        "LD_LIBRARY_PATH": f"{Path(base_python()).parents[1] / 'lib'}",
        "HOME": str(run.work_dir),
    }
    env.pop("PYTHONPATH", None)
    script = Path(__file__).parents[1] / "servers" / "pytriton_server.py"
    server = run.procs.start(name, [str(venv / "bin" / "python"), str(script), "--onnx", str(repo / MODEL / VERSION / "model.onnx"),
                                    "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port",
                                    str(metrics_port), "--workspace", str(run.work_dir / f"{name}-ws"), *(extra or [])],
                             env=env, cpus=server_cpus())  # fmt: skip
    wait_model_ready(server, grpc_port)
    if extra and "--redis-url" in extra:
        wait_model_ready(server, grpc_port, model="fraud_entity")
    return server, grpc_port


def reference_outputs(repo: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(repo / MODEL / VERSION / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return np.asarray(session.run(None, {"features": x})[0]).reshape(-1)


def body(run: Run, suite: Suite) -> None:
    settings = run.settings
    ghz = Ghz(ensure_ghz())
    batch_repo, nobatch_repo = prepare_repositories(run)
    x = rows()
    expected = reference_outputs(batch_repo, x)
    data = write_delimited(run.work_dir / "modelinfer.bin", (request(r) for r in x))
    suite.extra["request"] = {"model": f"{MODEL} v{VERSION} (32-64-32-1 MLP, ONNX Runtime, 1 thread)",
                              "rows_per_request": 1, "distinct_requests": len(x), "request_bytes": len(request(x[0]).SerializeToString())}  # fmt: skip

    h2 = H2load(ensure_debian("h2load", "nghttp2-client"))
    body_file = run.work_dir / "modelinfer.grpc"
    body_file.write_bytes(grpc_frame(request(x[0]).SerializeToString()))

    def sweep(server: Server, port: int, key: str, system: str, concurrencies: tuple[int, ...]) -> None:
        url = f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"
        frame = h2.response_bytes(url=url, body_file=body_file)
        for c in concurrencies:
            if not server.alive():
                raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")

            def rep(duration: float, i: int, c: int = c) -> dict[str, Any]:
                return h2.run(url=url, body_file=body_file, concurrency=c, duration_s=duration,
                              response_frame_bytes=frame, log_file=run.work_dir / "h2load.log",
                              server_cpu=server.cpu_seconds)  # fmt: skip

            run.measure(
                suite,
                system=system,
                key=key,
                protocol="gRPC",
                tool="h2load",
                params={"concurrency": c},
                rep=rep,
            )

    def ghz_check(server: Server, port: int, key: str, system: str) -> None:
        """The same point with ghz (64 distinct rows round-robin): shows what the generator itself costs."""

        def rep(duration: float, i: int) -> dict[str, Any]:
            out = run.raw_dir / f"inference-{key}-ghz-c32.json"
            return ghz.run(target=f"127.0.0.1:{port}", call=CALL, data_file=data, concurrency=32,
                           duration_s=duration, out_json=out, server_cpu=server.cpu_seconds)  # fmt: skip

        run.measure(suite, system=f"{system}, ghz", key=f"{key}-ghz", protocol="gRPC", tool="ghz",
                    params={"concurrency": 32, "tool": "ghz"}, rep=rep, reps=1)  # fmt: skip

    # 1. The transport limit: two echo servers.
    for mode in ("aio", "sync"):
        port = free_port()
        server = run.procs.start(f"echo-{mode}", [sys.executable, "-m", "bench.servers.echo", "--mode", mode,
                                                  "--port", str(port)], env=repo_env(), cpus=server_cpus())  # fmt: skip
        wait_port(port, 30, server.proc)
        check_answer(port, x[0], None)
        label = f"echo ({'grpc.aio' if mode == 'aio' else 'grpc threaded'})"
        sweep(server, port, f"echo-{mode}", label, settings.inference_concurrency)
        if mode == "aio":
            ghz_check(server, port, "echo-aio", label)
        run.procs.stop(server)

    # 2. Ours, batching on and off.
    pa = None
    try:
        pa = ensure_perf_analyzer()
    except Exception as exc:
        suite.extra["perf_analyzer_error"] = str(exc)
        say(f"perf_analyzer unavailable: {exc}")
    for key, system, repo in (("ours-batch", "InferGrid inference (batching on, 1 ms delay)", batch_repo),
                              ("ours-nobatch", "InferGrid inference (batching off)", nobatch_repo)):  # fmt: skip
        http_port = free_port() if key == "ours-batch" else 0
        server, port = start_ours(run, key, repo, http_port=http_port)
        for i in (0, 7, 33):
            check_answer(port, x[i], float(expected[i]))
        sweep(server, port, key, system, settings.inference_concurrency)
        if key == "ours-batch":
            ghz_check(server, port, key, system)
        if key == "ours-batch" and pa is not None:
            cross_check(run, suite, pa, server, port, key=key, system=system, http_port=http_port)
        if key == "ours-batch" and not settings.quick:
            load = [h2.binary, "-t1", "-c8", "-m4", "-D", "8", "-d", str(body_file), "-H", "content-type: application/grpc",
                    "-H", "te: trailers", f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"]  # fmt: skip
            svg = flame_graph(server, run.out_dir / "flame-inference.svg", load)
            if svg:
                suite.extra["flame_graph"] = svg.name
        run.procs.stop(server)

    # 3. PyTriton.
    server, grpc_port = start_pytriton(run, batch_repo)
    for i in (0, 7, 33):
        check_answer(grpc_port, x[i], float(expected[i]))
    sweep(
        server, grpc_port, "pytriton", "PyTriton (dynamic batching, delay 0)", settings.inference_concurrency
    )
    if pa is not None:
        cross_check(
            run, suite, pa, server, grpc_port, key="pytriton", system="PyTriton (dynamic batching, delay 0)"
        )
    run.procs.stop(server)


def cross_check(
    run: Run, suite: Suite, pa: Any, server: Server, port: int, *, key: str, system: str, http_port: int = 0
) -> None:
    """perf_analyzer (Triton's tool) at concurrency 32: unary, streaming (ModelStreamInfer), and with an
    `http_port` the REST API (`-i http`) with tensors in the body and in system shared memory."""
    interval = 2000 if run.settings.quick else 3000
    # (mode, protocol, port, streaming, shared memory). PyTriton's tritonserver hung or aborted
    # (std::length_error in TRITONBACKEND_OutputBuffer) under perf_analyzer's streaming mode in
    # rehearsals: unary only there.
    modes = [("unary", "grpc", port, False, False)]
    if key != "pytriton":
        modes.append(("stream", "grpc", port, True, False))
    if http_port:
        modes += [("http", "http", http_port, False, False), ("http-shm", "http", http_port, False, True)]
    for entry in modes:

        def rep(duration: float, i: int, entry: tuple[str, str, int, bool, bool] = entry) -> dict[str, Any]:
            mode, protocol, target, streaming, shm = entry
            return perf_analyzer(pa.binary, pa.env, url=f"127.0.0.1:{target}", model=MODEL, version=VERSION,
                                 concurrency=32, interval_ms=interval, streaming=streaming, protocol=protocol,
                                 shared_memory=shm, csv_path=run.raw_dir / f"perf-{key}-{mode}.csv",
                                 server_cpu=server.cpu_seconds)  # fmt: skip

        mode, protocol = entry[0], entry[1]
        run.measure(suite, system=f"{system}, perf_analyzer {mode}", key=f"{key}-pa-{mode}",
                    protocol="HTTP/JSON" if protocol == "http" else "gRPC", tool="perf_analyzer",
                    params={"concurrency": 32, "mode": mode}, rep=rep, warmup=False, reps=1)  # fmt: skip
