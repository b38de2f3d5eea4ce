"""Retries, retry budget, circuit breaker and gRPC-native retry config, against real calls."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from infergrid.features.v1 import features_pb2, features_pb2_grpc
from libs.channels import dial
from libs.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    overloaded,
    retry_hint,
)
from libs.resilience import (
    BreakerPolicy,
    Dependency,
    DependencyPolicy,
    RetryBudget,
    RetryPolicy,
    grpc_service_config,
)
from libs.server import GrpcService, ServerConfig, build_server


class _Flaky:
    """Fails with `exc` for the first `failures` calls, then answers 'ok'."""

    def __init__(self, failures: int, exc: Exception) -> None:
        self.failures, self.exc, self.calls = failures, exc, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return "ok"


def _policy(**kw: object) -> DependencyPolicy:
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002)
    return DependencyPolicy(timeout_s=0.5, retry=retry, **kw)  # type: ignore[arg-type]


async def test_retries_unavailable_then_succeeds() -> None:
    dep = Dependency("store", _policy())
    flaky = _Flaky(2, Unavailable("down"))
    assert await dep.call(flaky) == "ok"
    assert flaky.calls == 3


async def test_gives_up_after_max_attempts() -> None:
    dep = Dependency("store", _policy())
    flaky = _Flaky(5, Unavailable("down"))
    with pytest.raises(Unavailable):
        await dep.call(flaky)
    assert flaky.calls == 3


async def test_client_errors_are_not_retried_and_do_not_open_the_breaker() -> None:
    dep = Dependency("store", _policy(breaker=BreakerPolicy(failure_threshold=2, reset_timeout_s=60)))
    for _ in range(5):
        flaky = _Flaky(1, InvalidArgument("bad"))
        with pytest.raises(InvalidArgument):
            await dep.call(flaky)
        assert flaky.calls == 1
    assert await dep.call(_Flaky(0, Unavailable("x"))) == "ok"


async def test_breaker_opens_and_fails_fast() -> None:
    policy = DependencyPolicy(
        timeout_s=0.5, retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(3, reset_timeout_s=60)
    )
    dep = Dependency("cassandra", policy)
    backend = _Flaky(100, ConnectionError("refused"))
    for _ in range(3):
        with pytest.raises(ConnectionError):
            await dep.call(backend)
    assert dep.breaker_open
    calls = backend.calls
    with pytest.raises(Unavailable, match="cassandra is unavailable \\(circuit open\\)"):
        await dep.call(backend)
    assert backend.calls == calls  # failed fast: the backend was not called


async def test_breaker_half_opens_after_reset_timeout() -> None:
    policy = DependencyPolicy(
        retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(1, reset_timeout_s=0.05)
    )
    dep = Dependency("redis", policy)
    with pytest.raises(ConnectionError):
        await dep.call(_Flaky(1, ConnectionError("x")))
    with pytest.raises(Unavailable):
        await dep.call(_Flaky(0, ConnectionError("x")))
    assert dep.breaker_open
    await asyncio.sleep(0.1)
    assert not dep.breaker_open  # a probe is due: callers may try it (failover prefers it again)
    assert await dep.call(_Flaky(0, ConnectionError("x"))) == "ok"
    assert not dep.breaker_open


async def test_timeout_becomes_deadline_exceeded() -> None:
    async def slow() -> None:
        await asyncio.sleep(1)

    dep = Dependency("slow", DependencyPolicy(timeout_s=0.05, retry=RetryPolicy(max_attempts=1)))
    with pytest.raises(DeadlineExceeded, match=r"slow did not answer within 0\.050s"):
        await dep.call(slow)


def test_retry_budget_stops_retries_under_sustained_failure() -> None:
    budget = RetryBudget(max_tokens=10, token_ratio=0.1)
    allowed = 0
    for _ in range(20):
        budget.on_failure()
        allowed += budget.allows_retry()
    assert allowed == 4  # tokens 9..6 allow, 5 and below do not
    for _ in range(60):
        budget.on_success()
    assert budget.allows_retry()


async def test_budget_denies_retries_when_exhausted() -> None:
    dep = Dependency("store", _policy(budget_max_tokens=2, budget_token_ratio=0.1))
    flaky = _Flaky(100, Unavailable("down"))
    with pytest.raises(Unavailable):
        await dep.call(flaky)
    assert flaky.calls == 1  # 2 tokens -> 1 after the failure: not above half, no retry


def test_grpc_service_config_shape() -> None:
    cfg = json.loads(grpc_service_config("a.B", _policy()))
    method = cfg["methodConfig"][0]
    assert method["name"] == [{"service": "a.B"}]
    assert "timeout" not in method  # set per call: gRPC Python fires service-config timeouts early
    assert method["retryPolicy"]["maxAttempts"] == 3
    assert method["retryPolicy"]["initialBackoff"] == "0.010s"  # clamped: gRPC loses ms-scale retries
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    assert cfg["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}


async def test_grpc_channel_retries_natively() -> None:
    calls = 0

    class Servicer(features_pb2_grpc.FeatureServiceServicer):
        async def GetFeatureView(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
            nonlocal calls
            calls += 1
            if calls <= 2:
                raise Unavailable("warming up")
            return features_pb2.FeatureView(name=request.name)

    service = "infergrid.features.v1.FeatureService"
    add = features_pb2_grpc.add_FeatureServiceServicer_to_server
    server = build_server(ServerConfig(port=0), [GrpcService.of(service, add, Servicer())])
    await server.start()
    try:
        channel = dial(f"127.0.0.1:{server.port}", service, _policy())
        async with channel:
            view = await features_pb2_grpc.FeatureServiceStub(channel).GetFeatureView(
                features_pb2.GetFeatureViewRequest(name="v"), timeout=2
            )
        assert view.name == "v"
        assert calls == 3
    finally:
        await server.stop(0, 0.1)


def test_retry_policy_rejects_unknown_codes() -> None:
    with pytest.raises(ValueError, match="unknown gRPC status code 'UNAVAILABLEE'"):
        RetryPolicy(retryable_codes=("UNAVAILABLEE",))
    assert grpc.StatusCode.UNAVAILABLE.name == "UNAVAILABLE"


async def test_overload_answers_are_not_retried_cost_no_budget_and_never_open_the_breaker() -> None:
    dep = Dependency("store", _policy(breaker=BreakerPolicy(failure_threshold=2, reset_timeout_s=60)))
    for _ in range(20):  # a long run of "queue full" answers
        flaky = _Flaky(1, overloaded("queue full"))
        with pytest.raises(ResourceExhausted) as caught:
            await dep.call(flaky)
        assert flaky.calls == 1  # not retried
        assert ("retry-after", "1") in caught.value.trailing_metadata
    assert dep.budget.tokens == dep.policy.budget_max_tokens
    assert await dep.call(_Flaky(0, Unavailable("unused"))) == "ok"  # the breaker is still closed
    # The same from a real gRPC status (what the inference stream reports).
    rpc_overload = _Flaky(1, _RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED))
    for _ in range(5):
        rpc_overload.calls = 0
        with pytest.raises(grpc.RpcError):
            await dep.call(rpc_overload)
    assert await dep.call(_Flaky(0, Unavailable("unused"))) == "ok"


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_retry_policy_refuses_to_retry_overload() -> None:
    with pytest.raises(ValueError, match="RESOURCE_EXHAUSTED must not be retried"):
        RetryPolicy(retryable_codes=("UNAVAILABLE", "RESOURCE_EXHAUSTED"))


def test_retry_hint_metadata() -> None:
    assert retry_hint(0.1) == (("retry-after", "1"), ("grpc-retry-pushback-ms", "100"))
    assert retry_hint(2.5) == (("retry-after", "3"), ("grpc-retry-pushback-ms", "2500"))
    assert "retry in 100 ms" in overloaded("busy").message
