"""A batch controller that holds a p99 latency target: queue delay and batch size adapted to observed latency.

A batcher with a fixed `max_queue_delay` makes one trade for every load: at concurrency 1 the delay
is pure added latency (nobody else arrives while a request waits), under heavy load a longer delay
(or a bigger batch) buys throughput until the batch's own wait and compute break the latency budget.
`BatchController` replaces the fixed values with two that follow the load, bounded by the configured
maximums, from the latencies the batcher reports:

- every `interval_s` (with at least `min_samples` requests seen) it takes the p99 of the window's
  request latencies (enqueue to result; a windowed estimate, not a running one, so it follows load
  changes within an interval);
- **batches too slow**: the window's cost per row (compute time over rows, which includes each batch's
  fixed cost: an upper bound for bigger batches; an average, so a batch preempted by other work on the
  machine does not count as a slow one) times the p99 of its rows per batch is the compute time of a
  big batch. When that exceeds `compute_share` of the target (a request may wait for the batch running
  before its own), the batch-size cap drops at once to the rows whose compute fits that share, whatever
  the delay;
- **over the target** otherwise: multiplicative decrease of the delay (times `decrease`). The cap stays:
  when the server is simply overloaded (the queue, not a batch's execution, breaks the budget), smaller
  batches would only cost throughput and make the queue longer;
- **under `headroom` times the target**: additive increase, first of the batch cap back to its maximum
  (never past the rows that fit the compute share), then of the delay by `delay_step_s` — kept only if
  the batches grew (rows per batch up by `min_gain`): a delay that gathers no extra rows is undone and
  not tried again for `cooldown` intervals (the gradient check; it keeps the delay near 0 at low
  concurrency);
- in between: hold.

What it cannot see: the latencies are the batcher's (enqueue to result). Time a request spends before it
reaches the batcher (a saturated server's transport and event loop) is outside them; when that is what
breaks the target (bench/results: the closed-loop latency c / throughput of a CPU-bound server), no
delay or batch size holds it.

The delay never exceeds `max_delay_s` nor half the target. The controller is pure: time comes in as
arguments (monotonic seconds), so unit tests drive it with a fake clock; its attributes are read by
other threads without a lock (a float and an int, written whole).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from libs.config import Bounded, setting


@dataclass(frozen=True)
class LatencyTarget(Bounded):
    """A p99 objective for one model's batcher and the bounds the controller works within."""

    # The p99 latency (seconds) to stay under, measured by the batcher: enqueue to result.
    p99_s: float = setting(positive=True)
    # Upper bounds: the configured queue delay and batch size.
    max_delay_s: float = setting(minimum=0)
    max_batch: int = setting(minimum=1)
    interval_s: float = 0.2
    min_samples: int = 20
    # Grow only while p99 is below this fraction of the target.
    headroom: float = 0.8
    decrease: float = 0.5
    # Additive steps (0: a tenth of the bound; the batch step at least 1 row).
    delay_step_s: float = 0.0
    batch_step: int = 0
    # A delay step is kept when rows per batch grew by at least this fraction.
    min_gain: float = 0.05
    # Intervals to wait after a delay step that gathered nothing.
    cooldown: int = 5
    # The batch cap is cut only while a big batch's compute exceeds this fraction of the target.
    compute_share: float = 0.5

    @property
    def delay_bound_s(self) -> float:
        """The delay's ceiling: the configured maximum, never more than half the target."""
        return min(self.max_delay_s, self.p99_s / 2)


def p99(samples: list[float]) -> float:
    """The nearest-rank 99th percentile of `samples` (not empty)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class BatchController:
    """Adapts `delay_s` and `max_batch` to hold `target` (see the module docstring)."""

    def __init__(self, target: LatencyTarget, now: float) -> None:
        self.target = target
        # Start with no delay and the full batch: the low-latency end; the controller climbs from there.
        self.delay_s = 0.0
        self.max_batch = target.max_batch
        self.last_p99 = 0.0
        self.decisions = 0
        self._window_start = now
        self._samples: list[float] = []
        self._compute = 0.0
        self._sizes: list[int] = []
        self._rows = 0
        self._batches = 0
        self._step_d = target.delay_step_s or target.delay_bound_s / 10
        self._step_b = target.batch_step or max(1, target.max_batch // 8)
        # The last delay step and the rows per batch before it, for the gradient check.
        self._pending: tuple[float, float] | None = None
        self._cool = 0

    def observe(self, latencies_s: list[float], rows: int, now: float, compute_s: float = 0.0) -> bool:
        """Records one executed batch; True if the knobs changed.

        Args:
            latencies_s: Its requests' latencies (enqueue to result).
            rows: Its rows.
            now: Monotonic seconds.
            compute_s: How long the batch itself executed.
        """
        self._samples.extend(latencies_s)
        self._compute += compute_s
        self._sizes.append(rows)
        self._rows += rows
        self._batches += 1
        if now - self._window_start < self.target.interval_s or len(self._samples) < self.target.min_samples:
            return False
        return self._decide(now)

    def _decide(self, now: float) -> bool:
        t = self.target
        self.decisions += 1
        observed = p99(self._samples)
        rows_per_batch = self._rows / max(self._batches, 1)
        compute_budget = t.p99_s * t.compute_share
        per_row = self._compute / self._rows if self._rows else 0.0
        compute = per_row * p99([float(n) for n in self._sizes]) if self._sizes else 0.0
        # The rows whose compute fits the budget at this window's cost per row (no cost seen: any).
        fit = int(compute_budget / per_row) if per_row > 0 else t.max_batch
        self._samples, self._sizes, self._compute, self._rows, self._batches = [], [], 0.0, 0, 0
        self._window_start = now
        self.last_p99 = observed
        before = (self.delay_s, self.max_batch)
        pending, self._pending = self._pending, None
        if self._cool:
            self._cool -= 1
        if compute > compute_budget and self.max_batch > 1:
            # The batches' own execution breaks the budget: cap them at what fits (always smaller).
            self.max_batch = max(1, min(self.max_batch - 1, fit))
        elif observed > t.p99_s:
            if self.delay_s > 0:
                self.delay_s *= t.decrease
                if self.delay_s < self._step_d / 4:
                    self.delay_s = 0.0
        elif observed < t.p99_s * t.headroom:
            if self.max_batch < t.max_batch:
                if compute < compute_budget * t.headroom:
                    self.max_batch = max(self.max_batch, min(t.max_batch, self.max_batch + self._step_b, fit))
            elif pending is not None and rows_per_batch < pending[1] * (1 + t.min_gain):
                self.delay_s = pending[0]  # waiting longer gathered no more rows: undo it
                self._cool = t.cooldown
            elif not self._cool and self.delay_s < t.delay_bound_s:
                self._pending = (self.delay_s, rows_per_batch)
                self.delay_s = min(t.delay_bound_s, self.delay_s + self._step_d)
        return (self.delay_s, self.max_batch) != before
