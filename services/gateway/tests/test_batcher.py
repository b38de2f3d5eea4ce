"""The micro-batcher: coalesces concurrent items per key, splits results back in order, sheds load."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from libs.errors import ResourceExhausted
from services.gateway.batcher import BatchFunction, MicroBatcher


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.delay = delay

    async def run(self, key: str, items: list[int], timeout: float) -> list[object]:
        self.batches.append((key, list(items)))
        if self.delay:
            await asyncio.sleep(self.delay)
        return [ValueError(f"bad {i}") if i < 0 else (key, i * 10) for i in items]


def _batcher(run: BatchFunction[str, int, Any], **knobs: Any) -> MicroBatcher[str, int, Any]:
    """A batcher of `run` with `knobs` over the tests' defaults."""
    defaults = {"max_batch": 10, "max_delay_s": 0.0, "max_pending": 1000, "max_concurrent": 2}
    return MicroBatcher("t", run, **{**defaults, **knobs})


async def test_concurrent_items_share_one_call_and_get_their_own_results_in_order() -> None:
    recorder = Recorder()
    batcher = _batcher(recorder.run, max_batch=100, max_delay_s=0.001)
    futures = [batcher.submit("a" if i % 2 else "b", i, 1.0) for i in range(20)]
    results = await asyncio.gather(*futures)
    assert results == [("a" if i % 2 else "b", i * 10) for i in range(20)]
    assert sorted(key for key, _ in recorder.batches) == ["a", "b"]
    assert batcher.depth == 0


async def test_a_full_batch_is_sent_at_once_and_the_rest_waits_for_the_next() -> None:
    recorder = Recorder()
    batcher = _batcher(recorder.run, max_batch=4)
    results = await asyncio.gather(*(batcher.submit("k", i, 1.0) for i in range(10)))
    assert [r[1] for r in results] == [i * 10 for i in range(10)]
    assert [len(items) for _, items in recorder.batches] == [4, 4, 2]


async def test_one_failing_item_fails_alone_and_a_failing_call_fails_all() -> None:
    recorder = Recorder()
    batcher = _batcher(recorder.run)
    results = await asyncio.gather(*(batcher.submit("k", i, 1.0) for i in (1, -1, 2)), return_exceptions=True)
    assert results[0] == ("k", 10) and results[2] == ("k", 20)
    assert isinstance(results[1], ValueError)

    async def broken(key: str, items: list[int], timeout: float) -> list[object]:
        raise ConnectionError("down")

    failing = _batcher(broken)
    results = await asyncio.gather(*(failing.submit("k", i, 1.0) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_past_max_pending_submit_sheds_load() -> None:
    recorder = Recorder(delay=0.05)
    batcher = _batcher(recorder.run, max_batch=2, max_pending=3)
    accepted = [batcher.submit("k", i, 1.0) for i in range(3)]
    with pytest.raises(ResourceExhausted, match="overloaded"):
        batcher.submit("k", 99, 1.0)
    await asyncio.gather(*accepted)
    assert batcher.depth == 0
    await batcher.submit("k", 5, 1.0)  # accepted again once the queue drained


async def test_the_batch_call_gets_the_longest_timeout_of_its_items() -> None:
    seen: list[float] = []

    async def run(key: str, items: list[int], timeout: float) -> list[int]:
        seen.append(timeout)
        return items

    batcher = _batcher(run, max_pending=10)
    await asyncio.gather(batcher.submit("k", 1, 0.1), batcher.submit("k", 2, 2.0))
    assert 1.5 < seen[0] <= 2.0


async def test_a_key_with_a_p99_target_adapts_its_delay_and_others_keep_the_fixed_one() -> None:
    """Targeted key: the delay starts at 0 and grows under load while it gathers rows, within the bound."""
    recorder = Recorder(delay=0.001)
    targets = {"slo": 0.05}
    knobs = {"max_batch": 64, "max_delay_s": 0.004, "max_pending": 10_000, "max_concurrent": 4}
    batcher = _batcher(recorder.run, **knobs, target_of=lambda key: targets.get(key, 0.0))
    assert "slo" not in batcher._controls  # no controller yet: the fixed delay
    await batcher.submit("slo", 1, 1.0)
    control = batcher._controls["slo"]
    assert control.delay_s == 0.0
    control.target = type(control.target)(
        p99_s=0.05, max_delay_s=0.004, max_batch=64, interval_s=0.02, min_samples=5
    )

    async def client(key: str) -> None:
        for i in range(30):
            await batcher.submit(key, i, 1.0)

    await asyncio.gather(*(client("slo") for _ in range(32)), client("fixed"))
    assert control.decisions > 0
    assert 0 < control.delay_s <= 0.004
    assert "fixed" not in batcher._controls  # the fixed delay
    targets.pop("slo")  # the platform file dropped the target: back to the fixed delay
    await batcher.submit("slo", 1, 1.0)
    assert "slo" not in batcher._controls
    await batcher.close()
