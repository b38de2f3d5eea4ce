"""The dynamic batcher with an in-memory model: coalescing, order, bounds, timeouts, failures, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from services.inference.batcher import BatcherSettings, DynamicBatcher
from services.inference.errors import BackendError, ModelUnavailable, QueueFull, RequestTimeout
from services.inference.metrics import VersionMetrics


class FakeModel:
    """y = x * 10 + batch index marker; records every executed batch's row count."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.delay = delay
        self.fail = fail
        self.batches: list[int] = []
        self.release = threading.Event()
        self.release.set()
        self._lock = threading.Lock()
        self.running = 0
        self.max_running = 0

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        self.release.wait(5)
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.running -= 1
        if self.fail:
            raise RuntimeError("kernel exploded")
        x = inputs["x"]
        if np.any(x == -1):
            raise ValueError("poison row")
        self.batches.append(len(x))
        return [x * 10, np.full((len(x), 1), len(self.batches), dtype=np.int64)]

    def close(self) -> None:
        pass


_counter = iter(range(1_000_000))


def _batcher(model: FakeModel, **overrides: object) -> DynamicBatcher:
    settings = {
        "model": "fake",
        "version": next(_counter),
        "dynamic": True,
        "max_batch_size": 8,
        "max_queue_delay_us": 20_000,
        "preferred_batch_sizes": (),
        "max_queue_size": 100,
        "variable_shapes": False,
        "instances": 1,
        **overrides,
    }
    batcher = DynamicBatcher(
        BatcherSettings(**settings), model, ["y", "batch"], VersionMetrics("fake", settings["version"])
    )  # type: ignore[arg-type]
    batcher.start()
    return batcher


def _rows(value: float, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, 2), value, dtype=np.float32)}


async def test_concurrent_requests_share_a_batch_and_get_their_own_rows_back() -> None:
    model = FakeModel()
    batcher = _batcher(model)
    results = await asyncio.gather(*(batcher.infer(_rows(i), 1) for i in range(8)))
    for i, (y, _batch) in enumerate(results):
        np.testing.assert_array_equal(y, np.full((1, 2), i * 10, dtype=np.float32))
    assert model.batches == [8]  # a full batch went at once, without waiting for the delay
    stats = batcher._metrics.stats
    assert stats.execution_count == 1 and stats.inference_count == 8
    assert list(stats.batches) == [8]
    await batcher.close()


async def test_batches_never_exceed_max_batch_size_and_keep_order() -> None:
    model = FakeModel()
    model.release.clear()  # hold the first batch so the rest queue up
    batcher = _batcher(model, max_batch_size=4, max_queue_delay_us=0)
    tasks = [asyncio.ensure_future(batcher.infer(_rows(i, rows=1 + i % 2), 1 + i % 2)) for i in range(10)]
    await asyncio.sleep(0.05)
    model.release.set()
    results = await asyncio.gather(*tasks)
    assert all(b <= 4 for b in model.batches)
    assert sum(model.batches) == sum(1 + i % 2 for i in range(10))
    for i, (y, _) in enumerate(results):
        assert y.shape == (1 + i % 2, 2)
        assert np.all(y == i * 10)
    await batcher.close()


async def test_a_lone_request_waits_at_most_the_queue_delay() -> None:
    model = FakeModel()
    batcher = _batcher(model, max_queue_delay_us=30_000)
    y, _ = await batcher.infer(_rows(3.0), 1)
    assert y[0, 0] == 30.0 and model.batches == [1]
    await batcher.close()


async def test_preferred_batch_size_goes_without_waiting() -> None:
    model = FakeModel()
    batcher = _batcher(model, max_queue_delay_us=5_000_000, preferred_batch_sizes=(2, 4))
    await asyncio.wait_for(asyncio.gather(*(batcher.infer(_rows(i), 1) for i in range(2))), timeout=2)
    assert model.batches == [2]
    await batcher.close()


async def test_full_queue_sheds_with_resource_exhausted() -> None:
    model = FakeModel()
    model.release.clear()
    batcher = _batcher(model, max_queue_size=3, max_batch_size=1, max_queue_delay_us=0)
    first = asyncio.ensure_future(batcher.infer(_rows(0), 1))
    await asyncio.sleep(0.02)  # the first is executing (held); the next three fill the queue
    queued = [asyncio.ensure_future(batcher.infer(_rows(i), 1)) for i in range(1, 4)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="queue is full"):
        await batcher.infer(_rows(9), 1)
    model.release.set()
    await asyncio.gather(first, *queued)
    await batcher.close()


async def test_request_past_its_timeout_fails_before_execution() -> None:
    model = FakeModel()
    model.release.clear()
    batcher = _batcher(model, max_batch_size=1, max_queue_delay_us=0)
    blocker = asyncio.ensure_future(batcher.infer(_rows(0), 1))
    await asyncio.sleep(0.02)
    late = asyncio.ensure_future(batcher.infer(_rows(1), 1, timeout_ns=10_000_000))
    await asyncio.sleep(0.05)
    model.release.set()
    await blocker
    with pytest.raises(RequestTimeout, match="timed out"):
        await late
    assert model.batches == [1]  # the timed-out request never reached the model
    await batcher.close()


async def test_cancelled_request_is_dropped_from_the_queue() -> None:
    model = FakeModel()
    model.release.clear()
    batcher = _batcher(model, max_batch_size=1, max_queue_delay_us=0)
    blocker = asyncio.ensure_future(batcher.infer(_rows(0), 1))
    await asyncio.sleep(0.02)
    gone = asyncio.ensure_future(batcher.infer(_rows(1), 1))
    await asyncio.sleep(0)
    gone.cancel()
    model.release.set()
    await blocker
    ok = await batcher.infer(_rows(2), 1)
    assert ok[0][0, 0] == 20 and model.batches == [1, 1]
    await batcher.close()


async def test_batching_off_executes_each_request_alone() -> None:
    model = FakeModel()
    batcher = _batcher(model, dynamic=False)
    results = await asyncio.gather(*(batcher.infer(_rows(i, rows=2), 2) for i in range(5)))
    assert model.batches == [2, 2, 2, 2, 2]
    assert [float(y[0, 0]) for y, _ in results] == [0, 10, 20, 30, 40]
    await batcher.close()


async def test_requests_with_different_shapes_are_not_mixed() -> None:
    model = FakeModel()
    batcher = _batcher(model, variable_shapes=True)
    a = {"x": np.ones((1, 2), dtype=np.float32)}
    b = {"x": np.ones((1, 3), dtype=np.float32)}
    ya, yb = await asyncio.gather(batcher.infer(a, 1), batcher.infer(b, 1))
    assert ya[0].shape == (1, 2) and yb[0].shape == (1, 3)
    assert sorted(model.batches) == [1, 1]
    await batcher.close()


async def test_backend_failure_fails_every_request_of_the_batch_and_the_next_batch_runs() -> None:
    model = FakeModel(fail=True)
    batcher = _batcher(model, max_queue_delay_us=1000)
    results = await asyncio.gather(*(batcher.infer(_rows(i), 1) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, BackendError) and "kernel exploded" in str(r) for r in results)
    model.fail = False
    y, _ = await batcher.infer(_rows(1), 1)
    assert y[0, 0] == 10
    await batcher.close()


async def test_one_bad_request_fails_alone_and_its_batch_mates_succeed() -> None:
    model = FakeModel()
    batcher = _batcher(model, max_queue_delay_us=50_000, max_batch_size=4)
    results = await asyncio.gather(
        *(batcher.infer(_rows(v), 1) for v in (1, -1, 3, 4)), return_exceptions=True
    )
    assert isinstance(results[1], BackendError) and "poison row" in str(results[1])
    assert [float(r[0][0, 0]) for i, r in enumerate(results) if i != 1] == [10, 30, 40]  # type: ignore[index]
    assert batcher._metrics.stats.inference_count == 3
    await batcher.close()


async def test_close_finishes_queued_requests_then_refuses_new_ones() -> None:
    model = FakeModel(delay=0.01)
    batcher = _batcher(model, max_batch_size=2, max_queue_delay_us=0)
    tasks = [asyncio.ensure_future(batcher.infer(_rows(i), 1)) for i in range(6)]
    await asyncio.sleep(0)
    await batcher.close()
    assert all(t.done() and not t.exception() for t in tasks)
    with pytest.raises(ModelUnavailable):
        await batcher.infer(_rows(1), 1)


async def test_two_instances_run_batches_in_parallel() -> None:
    model = FakeModel(delay=0.05)
    batcher = _batcher(model, max_batch_size=1, max_queue_delay_us=0, instances=2)
    await asyncio.gather(*(batcher.infer(_rows(i), 1) for i in range(4)))
    assert len(model.batches) == 4
    assert model.max_running == 2
    await batcher.close()


async def test_traced_requests_get_queue_compute_and_batch_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.inference import batcher as batcher_module

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(batcher_module, "_tracer", tracer)
    batcher = _batcher(FakeModel(), max_queue_delay_us=1000)

    async def _traced(i: int) -> None:
        with tracer.start_as_current_span(f"request-{i}"):
            await batcher.infer(_rows(i), 1)

    await asyncio.gather(*(_traced(i) for i in range(3)))
    await batcher.close()
    spans = exporter.get_finished_spans()
    by_name: dict[str, list] = {}  # type: ignore[type-arg]
    for span in spans:
        by_name.setdefault(span.name.split("-")[0], []).append(span)
    requests = {s.context.span_id for s in by_name["request"]}
    assert len(by_name["inference.queue"]) == 3 and len(by_name["inference.compute"]) == 3
    assert {s.parent.span_id for s in by_name["inference.queue"]} == requests
    assert {s.parent.span_id for s in by_name["inference.compute"]} == requests
    (batch,) = by_name["inference.batch"]
    assert batch.attributes["inference.batch.rows"] == 3
    assert {link.context.span_id for link in batch.links} == requests


async def test_latency_target_adapts_the_delay_from_zero_within_the_bounds() -> None:
    """With a p99 target the configured delay is a ceiling: a lone caller gets no wait, load grows it.

    The target is loose (1 s) so every window is under the headroom whatever the machine's load: the
    controller then always tries a delay step, and whether the gradient check keeps or undoes it (a
    question of how many rows the step gathered, which depends on scheduling) the delay stays within
    its bounds and the batcher applies exactly what the controller decided.
    """
    model = FakeModel(delay=0.0005)
    batcher = _batcher(model, max_queue_delay_us=2_000, latency_target_us=1_000_000, max_batch_size=64)
    controller = batcher.controller
    assert controller is not None
    assert batcher._delay_ns == 0  # a lone first caller is not held
    controller.target = type(controller.target)(  # a short window, so the test takes well under a second
        p99_s=1.0, max_delay_s=0.002, max_batch=64, interval_s=0.005, min_samples=5
    )
    delays: list[float] = []
    decide = controller._decide

    def recording_decide(now: float) -> bool:
        changed = decide(now)
        delays.append(controller.delay_s)
        return changed

    controller._decide = recording_decide  # type: ignore[method-assign]

    async def client() -> None:
        for _ in range(40):
            await batcher.infer(_rows(1.0), 1)

    await asyncio.gather(*(client() for _ in range(16)))
    assert delays, "640 requests in 5 ms windows gave the controller no decision"
    assert max(delays) > 0  # under load it tried a delay
    assert all(0 <= delay <= 0.002 for delay in delays)
    assert batcher._delay_ns == int(controller.delay_s * 1e9)
    await batcher.close()


async def test_without_a_target_the_delay_is_the_configured_one() -> None:
    batcher = _batcher(FakeModel())
    assert batcher.controller is None
    assert batcher._delay_ns == 20_000_000
    await batcher.close()
