"""A real `python -m services.inference` with a p99 target: the queue delay stays 0 alone and grows under load."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from libs.testing import free_port, spawn_module, stop_process, wait_serving
from stack import demo_model as demo

SERVICE = "inference.GRPCInferenceService"
TARGET = '\nparameters { key: "latency_target_p99_ms" value: { string_value: "300" } }\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    repo: Path = tmp_path_factory.mktemp("slo-models")
    demo.write_repository(repo, samples=2000)
    config = repo / "fraud" / "config.pbtxt"
    text = re.sub(
        r"max_queue_delay_microseconds: \d+", "max_queue_delay_microseconds: 4000", config.read_text()
    )
    config.write_text(text + TARGET)
    port, metrics_port = free_port(), free_port()
    proc = spawn_module(
        "services.inference",
        {
            "INFERGRID_INFERENCE_MODEL_REPOSITORY": str(repo),
            "INFERGRID_INFERENCE_STARTUP_MODELS": "fraud",
            "INFERGRID_INFERENCE_PORT": str(port),
            "INFERGRID_INFERENCE_HTTP_PORT": "0",
            "INFERGRID_INFERENCE_METRICS_PORT": str(metrics_port),
            "INFERGRID_INFERENCE_DRAIN_SECONDS": "0",
            "INFERGRID_INFERENCE_GRACE_SECONDS": "1",
        },
    )
    try:
        asyncio.run(wait_serving(port, SERVICE, proc, timeout=60))
        yield port, metrics_port
    finally:
        stop_process(proc)


def _delay_us(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(
        r'^infergrid_inference_queue_delay_seconds\{model="fraud",version="1"\} ([0-9.e+-]+)$',
        text,
        re.MULTILINE,
    )
    assert match, "no queue delay gauge for fraud"
    return float(match.group(1)) * 1e6


async def _load(port: int, concurrency: int, seconds: float) -> int:
    request = pb.ModelInferRequest(model_name="fraud", model_version="1")
    request.inputs.add(name="features", datatype="FP32", shape=[1, 32])
    request.raw_input_contents.append(np.ones((1, 32), dtype=np.float32).tobytes())
    done = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stop = time.monotonic() + seconds

        async def client() -> None:
            nonlocal done
            while time.monotonic() < stop:
                await stub.ModelInfer(request, timeout=10)
                done += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return done


def test_the_delay_adapts_to_the_load(server: tuple[int, int]) -> None:
    port, metrics_port = server
    assert _delay_us(metrics_port) == 0.0  # starts at the low-latency end, not the configured 4 ms
    assert asyncio.run(_load(port, 1, 2.0)) > 0
    alone = _delay_us(metrics_port)
    assert alone <= 2000.0  # a lone caller: any step up gathered nobody and was undone
    deadline = time.monotonic() + 20
    grown = 0.0
    while time.monotonic() < deadline and grown <= alone:
        asyncio.run(_load(port, 16, 2.0))
        grown = _delay_us(metrics_port)
    assert alone < grown <= 4000.0  # under load the wait gathers rows: it grew, within the configured bound
