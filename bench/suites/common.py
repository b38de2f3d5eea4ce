"""Helpers the suites share: request files for ghz, our services' environment, readiness, flame graphs."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from google.protobuf.message import Message

from bench.procs import Server, free_port, loadgen_cpus, pinned, repo_env
from bench.tools import ensure_venv, say
from libs.testing import wait_serving
from libs.wire import varint


def write_delimited(path: Path, messages: Iterable[Message]) -> Path:
    """Writes count(length)-delimited messages: ghz `-B` sends them round-robin, one per request."""
    with path.open("wb") as f:
        for message in messages:
            data = message.SerializeToString()
            f.write(varint(len(data)) + data)
    return path


def service_env(prefix: str, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of one of our services on loopback: its port, a free metrics port, plain logs, no tracing."""
    env = repo_env({
        f"{prefix}PORT": str(port),
        f"{prefix}METRICS_PORT": str(free_port()),
        f"{prefix}HOST": "127.0.0.1",
        f"{prefix}LOG_JSON": "false",
        f"{prefix}LOG_LEVEL": "WARNING",
        f"{prefix}DRAIN_SECONDS": "0",
        f"{prefix}GRACE_SECONDS": "2",
    })  # fmt: skip
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.update(extra or {})
    return env


def wait_grpc_serving(server: Server, port: int, timeout: float = 60.0) -> None:
    try:
        asyncio.run(wait_serving(port, "", server.proc, timeout=timeout))
    except AssertionError as exc:
        raise RuntimeError(f"{server.name} did not become SERVING: {exc}\n{server.log_tail()}") from None


def flame_graph(server: Server, out_svg: Path, load: list[str], seconds: float = 4.0) -> Path | None:
    """Records a py-spy flame graph of `server` (all its processes) while `load` runs; not a measured run."""
    try:
        spy = ensure_venv("tools") / "bin" / "py-spy"
    except Exception as exc:
        say(f"py-spy unavailable: {exc}")
        return None
    gen = subprocess.Popen(pinned(load, loadgen_cpus()), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        result = subprocess.run(
            pinned(
                [
                    str(spy),
                    "record",
                    "--pid",
                    str(server.pid),
                    "--subprocesses",
                    "--duration",
                    str(int(seconds)),
                    "--rate",
                    "250",
                    "--nonblocking",
                    "--format",
                    "flamegraph",
                    "--output",
                    str(out_svg),
                ],
                loadgen_cpus(),
            ),
            check=False,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        if result.returncode != 0:
            say(f"py-spy failed: {result.stderr[-500:]}")
            return None
    finally:
        gen.terminate()
        try:
            gen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gen.kill()
            gen.wait()
    return out_svg if out_svg.exists() else None
