"""Pure statistics of the harness: percentiles, per-run summaries, medians over repetitions, SLO picks.

No I/O and no third-party imports, so the smoke test (bench/tests) exercises it anywhere.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The keys of one measured run (a "rep") that are medianed across repetitions.
REP_KEYS = ("rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms", "errors", "requests",
            "duration_s", "server_cpu", "loadgen_cpu", "degraded")  # fmt: skip

SLO_P99_MS = 25.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear between closest ranks (numpy's default).

    Raises:
        ValueError: no values, or q outside 0..100.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    frac = rank - low
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * frac)


def summarize(latencies_ms: Iterable[float], *, errors: int, duration_s: float) -> dict[str, float]:
    """One run: throughput of successful requests and latency percentiles of those requests."""
    values = sorted(latencies_ms)
    n = len(values)
    out: dict[str, float] = {
        "requests": float(n),
        "errors": float(errors),
        "duration_s": float(duration_s),
        "rps": n / duration_s if duration_s > 0 else 0.0,
    }
    if n:
        out.update(
            p50_ms=percentile(values, 50),
            p90_ms=percentile(values, 90),
            p99_ms=percentile(values, 99),
            p999_ms=percentile(values, 99.9),
            mean_ms=sum(values) / n,
        )
    else:
        out.update(p50_ms=math.nan, p90_ms=math.nan, p99_ms=math.nan, p999_ms=math.nan, mean_ms=math.nan)
    return out


def median_of_reps(reps: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Median of each key over the repetitions that have it (NaN-free values only)."""
    out: dict[str, float] = {}
    for key in REP_KEYS:
        values = [float(r[key]) for r in reps if key in r and r[key] is not None and not _isnan(r[key])]
        if values:
            out[key] = statistics.median(values)
    return out


def spread(reps: Sequence[Mapping[str, Any]], key: str = "rps") -> float:
    """(max - min) / median of `key` over repetitions: how much the repetitions disagree (0 = not at all)."""
    values = [float(r[key]) for r in reps if key in r and not _isnan(r[key])]
    if len(values) < 2:
        return 0.0
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def best_under_slo(
    points: Iterable[Mapping[str, Any]], p99_limit_ms: float = SLO_P99_MS
) -> Mapping[str, Any] | None:
    """The point with the highest median throughput whose median p99 is within the limit and had no errors."""
    best: Mapping[str, Any] | None = None
    for point in points:
        med = point.get("median") or {}
        p99 = med.get("p99_ms")
        if p99 is None or _isnan(p99) or p99 > p99_limit_ms or med.get("errors", 0) > 0 or not med.get("rps"):
            continue
        if best is None or med.get("rps", 0.0) > best["median"].get("rps", 0.0):
            best = point
    return best


def at_param(points: Iterable[Mapping[str, Any]], **params: Any) -> Mapping[str, Any] | None:
    """The first point whose params include all of `params`."""
    for point in points:
        have = point.get("params") or {}
        if all(have.get(k) == v for k, v in params.items()):
            return point
    return None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if (
        numerator is None
        or denominator is None
        or denominator == 0
        or _isnan(numerator)
        or _isnan(denominator)
    ):
        return None
    return numerator / denominator
