"""Failover between a model's inference pools: which pool each batch goes to, on a fake clock.

The pools' clients are in-memory fakes of the ModelClient role that take their service time on the fake
clock; their channel pools and breakers are the real ones (channels to nowhere are never dialled).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
from prometheus_client import REGISTRY

from libs.channels import dial
from libs.errors import DeadlineExceeded, NotFound, ResourceExhausted, Unavailable, overloaded
from libs.platform import parse_platform
from libs.pool import ChannelPool
from libs.resilience import BreakerPolicy, Dependency, DependencyPolicy, RetryPolicy
from services.gateway.catalog import ModelSpec, parse_spec
from services.gateway.failover import (
    AnswerTimeEstimate,
    FailoverModelClient,
    InferencePools,
    PoolClient,
    Scores,
)
from services.gateway.inference_client import Draining
from services.gateway.server import INFERENCE_SERVICE
from services.gateway.tests.fakes import DESCRIPTION, FakeModels, toy_spec

POLICY = DependencyPolicy(
    timeout_s=1.0, retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(1, reset_timeout_s=60)
)
ROW = np.ones((1, 5), dtype=np.float32)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TimedModels(FakeModels):
    """FakeModels whose every answer takes `service_s` on the fake clock."""

    def __init__(self, clock: FakeClock, service_s: float = 0.01) -> None:
        super().__init__()
        self.clock = clock
        self.service_s = service_s

    async def infer(
        self, spec: ModelSpec, version: str, inputs: np.ndarray, timeout: float
    ) -> dict[str, np.ndarray]:
        self.clock.now += self.service_s
        return await super().infer(spec, version, inputs, timeout)


def _pool(name: str, client: TimedModels, clock: FakeClock) -> PoolClient:
    channels = ChannelPool(f"test-{name}", lambda a: dial(a, INFERENCE_SERVICE, POLICY), POLICY)
    channels.update([f"127.0.0.1:{1 + len(name)}"])
    return PoolClient(
        name, channels, Dependency(f"test-{name}", POLICY), client, AnswerTimeEstimate(alpha=0.5)
    )


def _failovers(to_pool: str, reason: str) -> float:
    labels = {"model": "toy", "from_pool": "gpu", "to_pool": to_pool, "reason": reason}
    return REGISTRY.get_sample_value("infergrid_gateway_inference_failovers_total", labels) or 0.0


class Setup:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.gpu_models = TimedModels(self.clock)
        self.cpu_models = TimedModels(self.clock)
        self.default = TimedModels(self.clock)
        self.gpu = _pool("gpu", self.gpu_models, self.clock)
        self.cpu = _pool("cpu", self.cpu_models, self.clock)
        pools = {"toy": (self.gpu, self.cpu)}
        self.client = FailoverModelClient(self.default, lambda m: pools.get(m, ()), clock=self.clock)

    async def infer(self, timeout: float = 0.5, spec: ModelSpec | None = None) -> str:
        scores = await self.client.infer(spec or toy_spec(), "1", ROW, timeout)
        assert isinstance(scores, Scores) or spec is not None
        return scores.pool if isinstance(scores, Scores) else ""


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    s = Setup()
    yield s
    await s.gpu.channels.close()
    await s.cpu.channels.close()


async def _probed(pool: PoolClient) -> None:
    assert pool.probe is not None
    await pool.probe


async def test_a_pool_whose_answer_time_would_break_the_deadline_is_skipped_and_probed_until_it_fits(
    setup: Setup,
) -> None:
    setup.gpu_models.service_s = 0.3
    assert await setup.infer(timeout=0.5) == "gpu"  # no estimate yet: the preferred pool
    assert setup.gpu.estimate.value() == pytest.approx(0.3)
    before = _failovers("cpu", "queue_delay")
    # 0.3 s expected, more than half the 0.2 s left: the batch goes to the CPU pool (no estimate: expected
    # to fit), and a copy probes the GPU pool (with twice its expected answer time); its answer is dropped.
    assert await setup.infer(timeout=0.2) == "cpu"
    assert _failovers("cpu", "queue_delay") == before + 1
    await _probed(setup.gpu)
    assert len(setup.gpu_models.calls) == 2
    assert setup.gpu.estimate.value() == pytest.approx(0.3)  # still slow
    # Within PROBE_INTERVAL_S of the last probe: skipped without one.
    assert await setup.infer(timeout=0.2) == "cpu"
    assert setup.gpu.probe is None and len(setup.gpu_models.calls) == 2
    assert await setup.infer(timeout=0.7) == "gpu"  # with time to spare the preferred pool serves
    # The GPU pool is fast again: probes bring its estimate down until it fits, then it serves.
    setup.gpu_models.service_s = 0.02
    served = []
    for _ in range(3):
        setup.clock.now += 1.0
        served.append(await setup.infer(timeout=0.2))
        if setup.gpu.probe is not None:
            await setup.gpu.probe
    assert served == ["cpu", "gpu", "gpu"]
    assert setup.gpu.estimate.value() < 0.2


async def test_a_timed_out_batch_makes_the_estimate_at_least_twice_its_wait(setup: Setup) -> None:
    setup.gpu.estimate.observe(0.01)
    setup.gpu_models.service_s = 0.25
    setup.gpu_models.failure = DeadlineExceeded("no answer in time")
    with pytest.raises(DeadlineExceeded):
        await setup.infer(timeout=0.25)
    assert setup.gpu.estimate.value() == pytest.approx(0.5)
    before = _failovers("cpu", "queue_delay")
    assert await setup.infer(timeout=0.25) == "cpu"  # no second caller waits out its deadline there
    assert _failovers("cpu", "queue_delay") == before + 1
    # The probe (0.5 s expected: 1 s to answer) runs out of time too: the estimate doubles again.
    await _probed(setup.gpu)
    assert setup.gpu.estimate.value() == pytest.approx(0.5)  # it waited 0.25 on the fake clock
    setup.gpu_models.service_s = 0.6
    setup.clock.now += 1.0
    assert await setup.infer(timeout=0.25) == "cpu"
    await _probed(setup.gpu)
    assert setup.gpu.estimate.value() == pytest.approx(1.2)


async def test_when_no_pool_fits_the_deadline_the_preferred_one_is_tried(setup: Setup) -> None:
    setup.gpu.estimate.observe(0.4)
    setup.cpu.estimate.observe(0.3)
    assert await setup.infer(timeout=0.2) == "gpu"
    assert setup.gpu.probe is None and setup.cpu.probe is None  # the batch itself measures


def test_the_estimate_is_an_ewma_a_timeout_a_lower_bound_and_a_probe_the_current_value() -> None:
    estimate = AnswerTimeEstimate(alpha=0.5)
    assert estimate.value() == 0.0
    estimate.observe(0.1)
    estimate.observe(0.3)
    assert estimate.value() == pytest.approx(0.2)
    estimate.timed_out(0.05)  # less than expected: says nothing new
    assert estimate.value() == pytest.approx(0.2)
    estimate.timed_out(0.25)
    assert estimate.value() == pytest.approx(0.5)
    estimate.observe(0.1)
    assert estimate.value() == pytest.approx(0.3)
    estimate.measured(0.02)  # a probe's answer: the pool's answer time now
    assert estimate.value() == pytest.approx(0.02)


async def test_a_draining_preferred_pool_fails_over_and_is_skipped_while_it_drains(setup: Setup) -> None:
    before = _failovers("cpu", "draining")
    setup.gpu_models.failure = Draining("the inference server 127.0.0.1:4 is draining")
    assert await setup.infer() == "cpu"
    assert _failovers("cpu", "draining") == before + 1


async def test_an_overloaded_preferred_pool_fails_over_and_the_last_pool_overloaded_is_the_answer(
    setup: Setup,
) -> None:
    before = _failovers("cpu", "overloaded")
    setup.gpu_models.failure = overloaded("queue full")
    assert await setup.infer() == "cpu"
    assert _failovers("cpu", "overloaded") == before + 1
    setup.cpu_models.failure = overloaded("queue full")
    with pytest.raises(ResourceExhausted):
        await setup.infer()
    # A saturated pool then a down one: the refusal with its retry hint is the answer.
    setup.gpu_models.failure, setup.cpu_models.failure = overloaded("queue full"), Unavailable("gone")
    with pytest.raises(ResourceExhausted):
        await setup.infer()


async def test_an_unavailable_pool_fails_over_a_not_found_does_not(setup: Setup) -> None:
    before = _failovers("cpu", "down")
    setup.gpu_models.failure = Unavailable("the stream broke")
    assert await setup.infer() == "cpu"
    assert _failovers("cpu", "down") == before + 1
    setup.gpu_models.failure = NotFound("model 'toy' is not loaded")
    calls = len(setup.cpu_models.calls)
    with pytest.raises(NotFound):
        await setup.infer()
    assert len(setup.cpu_models.calls) == calls


async def test_an_open_breaker_or_ejected_endpoints_skip_the_pool_without_a_call(setup: Setup) -> None:
    async def _fail() -> None:
        raise Unavailable("down")

    with pytest.raises(Unavailable):
        await setup.gpu.dependency.call(_fail)
    assert setup.gpu.dependency.breaker_open
    before = _failovers("cpu", "breaker_open")
    assert await setup.infer() == "cpu"
    assert _failovers("cpu", "breaker_open") == before + 1
    assert setup.gpu_models.calls == []

    # The only pool left is down (its endpoint ejected): a guess, so it is still tried.
    setup.cpu.channels.eject(setup.cpu.channels.endpoints[0], "test")
    assert await setup.infer() == "cpu"
    # Both breakers open: nothing is tried.
    with pytest.raises(Unavailable):
        await setup.cpu.dependency.call(_fail)
    with pytest.raises(Unavailable, match="no inference pool can serve model 'toy': gpu breaker_open"):
        await setup.infer()
    assert setup.gpu_models.calls == []


async def test_a_model_without_pools_uses_the_default_target(setup: Setup) -> None:
    other = parse_spec("other", DESCRIPTION, ("1",))
    scores = await setup.client.infer(other, "1", ROW, 0.5)
    assert not isinstance(scores, Scores)
    assert len(setup.default.calls) == 1 and not setup.gpu_models.calls


async def test_pools_follow_the_platform_file() -> None:
    made: list[str] = []

    def _make(name: str) -> tuple[ChannelPool, Dependency, FakeModels]:
        made.append(name)
        channels = ChannelPool(name, lambda a: dial(a, INFERENCE_SERVICE, POLICY), POLICY)
        return channels, Dependency(name, POLICY), FakeModels()

    text = """
inference_pools:
  gpu: {endpoints: ["127.0.0.1:7001"]}
  cpu: {endpoints: ["127.0.0.1:7002", "127.0.0.1:7003"]}
models:
  toy: {versions: [{version: "1", weight: 1}], pools: [gpu, cpu]}
  plain: {versions: [{version: "1", weight: 1}]}
"""
    pools = InferencePools(_make, discovery_interval_s=0.05)
    try:
        pools.apply(parse_platform(text))
        await pools.refresh()
        assert [p.name for p in pools.of("toy")] == ["gpu", "cpu"]
        assert pools.of("plain") == ()
        cpu = pools.pools["cpu"].channels
        assert [e.address for e in cpu.endpoints] == ["127.0.0.1:7002", "127.0.0.1:7003"]
        pools.apply(parse_platform(text.replace("gpu, cpu", "cpu").replace("7003", "7004")))
        await pools.refresh()
        assert [p.name for p in pools.of("toy")] == ["cpu"]
        cpu = pools.pools["cpu"].channels
        assert [e.address for e in cpu.endpoints] == ["127.0.0.1:7002", "127.0.0.1:7004"]
        assert made == ["gpu", "cpu"]  # re-targeted, not rebuilt
        without_gpu = text.replace('  gpu: {endpoints: ["127.0.0.1:7001"]}\n', "").replace("gpu, cpu", "cpu")
        pools.apply(parse_platform(without_gpu))
        assert set(pools.pools) == {"cpu"}
    finally:
        await pools.close()
