"""BatchController: deterministic runs against small plant models on a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from libs.batch_control import BatchController, LatencyTarget, p99

MS = 1e-3


def _drive(
    controller: BatchController,
    plant: Callable[[float, int], tuple[float, int] | tuple[float, int, float]],
    seconds: float,
    clock: list[float],
    batches_per_s: int = 200,
) -> list[tuple[float, int, float]]:
    """Feeds `controller` batches from `plant(delay, max_batch) -> (latency, rows[, compute])`.

    Returns (delay, batch cap, p99) after each decision.
    """
    history: list[tuple[float, int, float]] = []
    for _ in range(int(seconds * batches_per_s)):
        clock[0] += 1 / batches_per_s
        latency, rows, *compute = plant(controller.delay_s, controller.max_batch)
        decisions = controller.decisions
        controller.observe([latency] * rows, rows, clock[0], compute[0] if compute else 0.0)
        if controller.decisions != decisions:
            history.append((controller.delay_s, controller.max_batch, controller.last_p99))
    return history


def test_p99_nearest_rank() -> None:
    assert p99([float(i) for i in range(1, 101)]) == 99.0
    assert p99([5.0]) == 5.0
    assert p99([1.0, 2.0]) == 2.0


def test_target_validation() -> None:
    with pytest.raises(ValueError):
        LatencyTarget(p99_s=0, max_delay_s=0.001, max_batch=8)
    with pytest.raises(ValueError):
        LatencyTarget(p99_s=0.01, max_delay_s=0.001, max_batch=0)
    assert LatencyTarget(p99_s=0.01, max_delay_s=0.02, max_batch=8).delay_bound_s == 0.005


def test_no_decision_before_interval_and_samples() -> None:
    c = BatchController(LatencyTarget(p99_s=10 * MS, max_delay_s=2 * MS, max_batch=64, min_samples=50), 0.0)
    assert not c.observe([1 * MS] * 10, 10, 1.0)  # interval passed, too few samples
    assert c.delay_s == 0.0
    assert c.observe([1 * MS] * 40, 40, 1.1)  # enough now: under target, the delay grows
    assert c.delay_s > 0


def test_concurrency_one_keeps_the_delay_near_zero() -> None:
    """Alone, waiting gathers nobody: every delay step is undone by the gradient check."""
    clock = [0.0]
    c = BatchController(LatencyTarget(p99_s=10 * MS, max_delay_s=2 * MS, max_batch=64), clock[0])
    history = _drive(c, lambda delay, cap: (delay + 0.3 * MS, 1), 30.0, clock)
    delays = [d for d, _, _ in history]
    assert max(delays) <= 0.2 * MS + 1e-12  # never more than one step
    assert sum(d == 0.0 for d in delays) > 0.7 * len(delays)


def test_delay_grows_while_it_gathers_rows_and_holds_the_target() -> None:
    """Under load rows arrive during the wait: the delay climbs until p99 nears the target."""
    clock = [0.0]
    target = LatencyTarget(p99_s=4 * MS, max_delay_s=10 * MS, max_batch=256)

    def plant(delay: float, cap: int) -> tuple[float, int]:
        rows = min(cap, 1 + int(20_000 * delay))  # 20k rows/s arriving
        return delay + 0.2 * MS + rows * 5e-6, rows

    c = BatchController(target, clock[0])
    history = _drive(c, plant, 60.0, clock)
    late = history[len(history) // 2 :]
    assert all(p <= target.p99_s for _, _, p in late)
    assert max(d for d, _, _ in late) >= 1 * MS  # it did use the delay
    assert all(d <= target.delay_bound_s for d, _, _ in history)


def test_over_target_halves_the_delay() -> None:
    target = LatencyTarget(p99_s=5 * MS, max_delay_s=2 * MS, max_batch=64, min_samples=1)
    c = BatchController(target, 0.0)
    c.delay_s = 2 * MS
    assert c.observe([9 * MS], 1, 1.0)
    assert c.delay_s == pytest.approx(1 * MS)
    assert c.observe([9 * MS], 1, 2.0)
    assert c.delay_s == pytest.approx(0.5 * MS)


def test_batch_shrinks_when_big_batches_break_the_target() -> None:
    """Compute grows with the batch: with the delay at 0 the cap comes down until p99 fits."""
    clock = [0.0]
    target = LatencyTarget(p99_s=5 * MS, max_delay_s=1 * MS, max_batch=512)
    c = BatchController(target, clock[0])
    history = _drive(c, lambda delay, cap: (delay + cap * 20e-6, cap, cap * 20e-6), 30.0, clock)
    assert c.max_batch < 512
    late = history[len(history) // 2 :]
    assert min(b for _, b, _ in late) * 20e-6 <= target.p99_s
    assert sum(p <= target.p99_s for _, _, p in late) > 0.5 * len(late)


def test_overload_keeps_the_batch_cap() -> None:
    """Saturated: the queue, not the batch's execution, breaks the target; a smaller batch would cut throughput."""
    clock = [0.0]
    target = LatencyTarget(p99_s=5 * MS, max_delay_s=1 * MS, max_batch=64)
    c = BatchController(target, clock[0])
    c.delay_s = 1 * MS
    # Closed loop at 128 clients: latency = 128 / throughput; a 64-row batch computes in 1 ms.
    history = _drive(c, lambda delay, cap: (128 / (2000 + 300 * cap), cap, cap * 15e-6), 30.0, clock)
    assert history[-1][0] == 0.0  # the delay went (it only adds to the wait)
    assert all(b == 64 for _, b, _ in history)


def test_the_cap_drops_at_once_to_the_rows_whose_compute_fits_whatever_the_delay() -> None:
    """A batch computes in 0.2 ms + 40 µs a row: 256 rows take 10.4 ms, past half the 10 ms target."""
    clock = [0.0]
    target = LatencyTarget(p99_s=10 * MS, max_delay_s=2 * MS, max_batch=256, min_samples=1)
    c = BatchController(target, clock[0])
    c.delay_s = 1 * MS

    def compute(cap: int) -> float:
        return 0.2 * MS + cap * 40e-6

    history = _drive(c, lambda delay, cap: (delay + compute(cap), cap, compute(cap)), 2.0, clock)
    first_delay, first_cap, _ = history[0]
    assert first_delay == 1 * MS  # the delay was not the first thing cut
    assert compute(first_cap) <= 5.2 * MS  # one step: the rows that fit at 256 rows' cost per row
    assert all(compute(cap) <= 5 * MS for _, cap, _ in history[2:])
    assert min(cap for _, cap, _ in history) >= 100  # no needless halving below what fits


def test_a_batch_slowed_by_other_work_on_the_machine_does_not_cut_the_cap() -> None:
    """One single-row batch in fifty takes 20 ms (preempted); a row costs 50 µs: nothing about batch size."""
    clock = [0.0]
    target = LatencyTarget(p99_s=10 * MS, max_delay_s=1 * MS, max_batch=256)
    c = BatchController(target, clock[0])
    n = [0]

    def plant(delay: float, cap: int) -> tuple[float, int, float]:
        n[0] += 1
        compute = 20 * MS if n[0] % 50 == 0 else 50e-6
        return delay + compute, 1, compute

    _drive(c, plant, 10.0, clock)
    assert c.decisions > 0 and c.max_batch == 256
