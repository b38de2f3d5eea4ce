"""The unmodified tritonclient (gRPC and HTTP) against the real server process: metadata, inference, errors,
batching, reloads, shared memory, trace and log settings; perf_analyzer over HTTP and shared memory.

The server runs as `python -m services.inference` on a temporary repository; the
client side runs in another subprocess (triton_client.py), because tritonclient
and our generated `inference` modules cannot share a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from libs.testing import free_port, spawn_module, stop_process, wait_serving
from services.inference.tests.models import write_repository

CLIENT = Path(__file__).resolve().parent / "triton_client.py"
SERVICE = "inference.GRPCInferenceService"
HTTP_SCENARIOS = (
    "http_health_metadata_and_config",
    "http_infer_matches_onnxruntime_binary_and_json",
    "http_every_datatype_round_trips",
    "http_errors_are_statuses_with_a_json_error",
    "http_statistics_and_repository",
    "system_shared_memory_round_trips_over_grpc_and_http",
    "trace_and_log_settings_over_http_and_grpc",
    "load_model_with_files_in_the_request",
)
SCENARIOS = (
    "metadata_and_config_match_the_repository",
    "infer_matches_onnxruntime_on_the_same_file",
    "every_datatype_round_trips",
    "errors_have_the_right_status_and_message",
    "concurrent_clients_get_their_own_results_in_batches",
    "stream_infer_answers_each_request",
    "statistics_and_repository_index",
    "load_and_unload_versions_while_traffic_flows",
)


Served = tuple[subprocess.Popen[bytes], int, int, Path]


@pytest.fixture(scope="module")
def http_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, http_port: int) -> Iterator[Served]:
    repo = write_repository(tmp_path_factory.mktemp("triton-models"))
    port, metrics_port = free_port(), free_port()
    proc = spawn_module(
        "services.inference",
        {
            "INFERGRID_INFERENCE_MODEL_REPOSITORY": str(repo),
            "INFERGRID_INFERENCE_PORT": str(port),
            "INFERGRID_INFERENCE_HTTP_PORT": str(http_port),
            "INFERGRID_INFERENCE_METRICS_PORT": str(metrics_port),
            "INFERGRID_INFERENCE_DRAIN_SECONDS": "0",
            "INFERGRID_INFERENCE_GRACE_SECONDS": "1",
            "INFERGRID_INFERENCE_CONTROL_ENABLED": "true",  # the clients' load/unload calls
        },
    )
    try:
        asyncio.run(wait_serving(port, SERVICE, proc, timeout=60))
        yield proc, port, metrics_port, repo
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def results(server: tuple[subprocess.Popen[bytes], int, int, Path]) -> dict[str, str]:
    _proc, port, metrics_port, repo = server
    return _scenarios("check", f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", str(repo))


def _scenarios(*args: str) -> dict[str, str]:
    """Runs triton_client.py with `args` in its own process; its scenario -> "ok" or traceback."""
    run = subprocess.run(
        [sys.executable, str(CLIENT), *args], capture_output=True, text=True, timeout=180, check=False
    )
    assert run.returncode == 0, f"tritonclient side crashed:\n{run.stdout}\n{run.stderr}"
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def http_results(server: Served, http_port: int, results: dict[str, str]) -> dict[str, str]:
    """The HTTP and shared memory scenarios, after the gRPC ones (they reload models and change settings)."""
    _proc, port, _metrics_port, repo = server
    return _scenarios("check-http", f"127.0.0.1:{http_port}", f"127.0.0.1:{port}", str(repo))


@pytest.mark.parametrize("name", SCENARIOS)
def test_tritonclient_scenario(results: dict[str, str], name: str) -> None:
    assert name in results, f"scenario {name} did not run: {sorted(results)}"
    assert results[name] == "ok", results[name]


@pytest.mark.parametrize("name", HTTP_SCENARIOS)
def test_tritonclient_http_scenario(http_results: dict[str, str], name: str) -> None:
    assert name in http_results, f"scenario {name} did not run: {sorted(http_results)}"
    assert http_results[name] == "ok", http_results[name]


def test_every_scenario_is_listed(results: dict[str, str], http_results: dict[str, str]) -> None:
    assert sorted(results) == sorted(SCENARIOS)
    assert sorted(http_results) == sorted(HTTP_SCENARIOS)


def test_garbage_and_abandoned_calls_leave_the_server_running(
    server: tuple[subprocess.Popen[bytes], int, int, Path], results: dict[str, str]
) -> None:
    proc, port, _, _ = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")
        for garbage in (b"\xff" * 7, b"\x0a\x05fraud\x2a\xff\xff", bytes(range(256)) * 50):
            with pytest.raises(grpc.RpcError):
                infer(garbage, timeout=5)
        # Calls the client gives up on mid-flight (deadline far below one round trip).
        for _ in range(20):
            with contextlib.suppress(grpc.RpcError):
                infer(b"\x0a\x05fraud", timeout=0.0001)
        live = channel.unary_unary(f"/{SERVICE}/ServerLive")
        assert live(b"", timeout=5) == b"\x08\x01"  # ServerLiveResponse{live: true}
    assert proc.poll() is None


def _perf_analyzer() -> tuple[Path, dict[str, str]] | None:
    """Triton's perf_analyzer where `make bench` installs it (bench.tools.ensure_perf_analyzer); None if absent."""
    cache = Path(os.environ.get("INFERGRID_CACHE_DIR") or Path.home() / ".cache" / "infergrid")
    root = cache / "bench-venvs" / "perf"
    binary = root / "bin" / "perf_analyzer"
    cudart = next((root / "lib").glob("python3*/site-packages/nvidia/cuda_runtime/lib"), None)
    if not binary.exists() or cudart is None or not Path("/usr/lib/x86_64-linux-gnu/libb64.so.0d").exists():
        return None
    return binary, {**os.environ, "LD_LIBRARY_PATH": str(cudart)}


@pytest.mark.parametrize(
    ("protocol", "shared_memory"),
    [("http", False), ("grpc", True), ("http", True)],
    ids=["http", "grpc-shm", "http-shm"],
)
def test_perf_analyzer_drives_the_server_unmodified(
    server: Served, http_port: int, results: dict[str, str], protocol: str, shared_memory: bool
) -> None:
    found = _perf_analyzer()
    if found is None:
        pytest.skip(
            "perf_analyzer is not installed (make bench installs it: bench.tools.ensure_perf_analyzer)"
        )
    binary, env = found
    _proc, port, _metrics, _repo = server
    url = f"127.0.0.1:{http_port if protocol == 'http' else port}"
    # A compatibility check, not a measurement: any latency spread is "stable" (-s 1000: max/min of the
    # last 3 windows within 10x), so a loaded test machine cannot fail it.
    command = [str(binary), "-m", "fraud", "-x", "1", "-u", url, "-i", protocol, "--concurrency-range", "2:2",
               "-p", "500", "-r", "6", "-s", "1000"]  # fmt: skip
    if shared_memory:
        command += ["--shared-memory", "system", "--output-shared-memory-size", "64"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    assert "throughput:" in run.stdout and "error" not in run.stdout.lower(), run.stdout[-2000:]
    assert "Successful request count" in run.stdout  # server-side statistics were read too
