"""Overload is not an outage: a full inference queue reaches the caller as RESOURCE_EXHAUSTED with a retry hint.

Real processes: the inference service (the demo model, its queue bounded to 2 requests with a 100 ms
batching delay, so that concurrent requests overflow it) and the gateway (`python -m services.gateway`,
up to 8 inference batches of one row in flight, no feature service: rows are served degraded). While
concurrent callers saturate the queue, every refused call is RESOURCE_EXHAUSTED with `retry-after` and
`grpc-retry-pushback-ms`, none is UNAVAILABLE (the inference breaker never opens, although its threshold
is 5 consecutive failures and it would stay open 30 s), and a call right after the burst succeeds.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs.testing import (
    NO_REDIS_URL,
    WithApiKey,
    free_port,
    service_env,
    spawn_module,
    stop_process,
    wait_serving,
    write_test_admission,
)
from stack import demo_model as inference_demo
from stack.demo import demo_request
from stack.services import INPUT_LAYOUTS

pytestmark = pytest.mark.integration

GATEWAY_SERVICE = "infergrid.gateway.v1.PredictionService"
INFERENCE_SERVICE = "inference.GRPCInferenceService"


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("overload")
    repo = tmp / "models"
    await asyncio.to_thread(inference_demo.write_repository, repo, 2000)
    config = repo / "fraud" / "config.pbtxt"
    text = config.read_text()
    assert "max_queue_delay_microseconds: 1000" in text and "max_queue_size: 4096" in text
    config.write_text(
        text.replace("max_queue_delay_microseconds: 1000", "max_queue_delay_microseconds: 100000").replace(
            "max_queue_size: 4096", "max_queue_size: 2"
        )
    )
    inference_port, gateway_port = free_port(), free_port()
    inference = spawn_module(
        "services.inference",
        service_env("inference", inference_port, HTTP_PORT=0, MODEL_REPOSITORY=repo),
        tmp / "inference.log",
    )
    try:
        # The gateway learns its models from inference at start-up: inference first.
        await wait_serving(inference_port, INFERENCE_SERVICE, inference, timeout=90)
    except BaseException:
        stop_process(inference)
        raise
    log = tmp / "gateway.log"
    gateway = spawn_module(
        "services.gateway",
        {
            **service_env(
                "gateway",
                gateway_port,
                INPUT_LAYOUTS=INPUT_LAYOUTS,
                # Admission in the gateway: the test's key, a local bucket (no Redis).
                PLATFORM_FILE=write_test_admission(tmp / "platform"),
                ADMISSION_REDIS_URL=NO_REDIS_URL,
                INFERENCE_TARGET=f"127.0.0.1:{inference_port}",
                FEATURES_TARGET=f"127.0.0.1:{free_port()}",  # nobody: degraded rows
                INFERENCE_LOG_ENABLED="false",
                MAX_BATCH_ROWS=1,
                MAX_CONCURRENT_BATCHES=8,
                BREAKER_FAILURES=5,
                BREAKER_RESET_S=30,
            ),
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        },
        log,
    )
    try:
        await wait_serving(inference_port, INFERENCE_SERVICE, inference, timeout=90)
        await wait_serving(gateway_port, GATEWAY_SERVICE, gateway, timeout=90)
        yield f"127.0.0.1:{gateway_port}", log
    finally:
        stop_process(gateway)
        stop_process(inference)


def _request(i: int) -> gateway_pb2.PredictRequest:
    return demo_request(i, (300, 50, 100), {"amount": 100.0 + i}, "float_value")


async def test_a_saturated_inference_queue_is_resource_exhausted_with_a_hint_and_the_breaker_stays_closed(
    gateway: tuple[str, Path],
) -> None:
    target, log = gateway
    codes: collections.Counter[str] = collections.Counter()
    hints: list[dict[str, str]] = []
    messages: set[str] = set()
    async with grpc.aio.insecure_channel(target, interceptors=[WithApiKey()]) as channel:
        stub = gateway_pb2_grpc.PredictionServiceStub(channel)
        await stub.Predict(_request(0), timeout=10)  # warm: the stream to inference is open

        async def _caller(worker: int) -> None:
            for i in range(25):
                try:
                    await stub.Predict(_request(worker * 100 + i), timeout=10)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        hints.append({k: str(v) for k, v in exc.trailing_metadata() or ()})
                        messages.add(exc.details() or "")

        await asyncio.gather(*(_caller(w) for w in range(32)))
        # Right after the burst: served at once (an open breaker would refuse for 30 s).
        after = await stub.Predict(_request(7), timeout=10)

    print(f"\noverload burst: {dict(codes)}")
    assert codes["RESOURCE_EXHAUSTED"] >= 20, codes  # the queue did overflow, many times in a row
    assert codes["OK"] > 0, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes  # no UNAVAILABLE: not an outage
    assert all(h.get("retry-after") == "1" and h.get("grpc-retry-pushback-ms") == "100" for h in hints)
    assert all("overloaded" in m and "retry in 100 ms" in m for m in messages), messages
    assert after.outputs["fraud_probability"].float_value >= 0
    assert "circuit breaker inference" not in log.read_text()  # never opened
