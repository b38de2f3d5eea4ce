"""Smoke test of the harness's pure logic (never runs a benchmark): percentiles, medians, report rendering."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import stats
from bench.report import best_peer, ratios, render_markdown, targets

FIXTURE = Path(__file__).parent / "fixtures" / "results.json"


def test_percentile_matches_linear_interpolation() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 100) == 100.0
    assert stats.percentile(values, 50) == pytest.approx(50.5)
    assert stats.percentile(values, 99) == pytest.approx(99.01)
    assert stats.percentile(values, 99.9) == pytest.approx(99.901)
    assert stats.percentile([3.0], 99.9) == 3.0
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_summarize_and_median_of_reps() -> None:
    rep = stats.summarize([1.0, 2.0, 3.0, 4.0], errors=1, duration_s=2.0)
    assert rep["rps"] == 2.0 and rep["requests"] == 4 and rep["errors"] == 1
    assert rep["p50_ms"] == pytest.approx(2.5)
    empty = stats.summarize([], errors=3, duration_s=1.0)
    assert empty["rps"] == 0 and math.isnan(empty["p99_ms"])
    med = stats.median_of_reps(
        [{"rps": 1.0, "p99_ms": 5.0}, {"rps": 3.0, "p99_ms": float("nan")}, {"rps": 2.0}]
    )
    assert med["rps"] == 2.0 and med["p99_ms"] == 5.0
    assert stats.spread([{"rps": 90.0}, {"rps": 100.0}, {"rps": 110.0}]) == pytest.approx(0.2)


def test_best_under_slo_ignores_slow_and_failing_points() -> None:
    pts = [
        {"params": {"concurrency": 1}, "median": {"rps": 100.0, "p99_ms": 1.0, "errors": 0}},
        {"params": {"concurrency": 8}, "median": {"rps": 500.0, "p99_ms": 20.0, "errors": 0}},
        {"params": {"concurrency": 64}, "median": {"rps": 900.0, "p99_ms": 40.0, "errors": 0}},
        {"params": {"concurrency": 32}, "median": {"rps": 800.0, "p99_ms": 10.0, "errors": 2}},
        {"params": {"concurrency": 16}, "median": {"rps": 0.0, "p99_ms": 0.0, "errors": 0}},
    ]
    best = stats.best_under_slo(pts)
    assert best is not None and best["params"]["concurrency"] == 8
    assert stats.at_param(pts, concurrency=64) is pts[2]
    assert stats.ratio(1.0, 0.0) is None and stats.ratio(3.0, 2.0) == 1.5


def test_report_renders_targets_ratios_and_failures_from_a_fixture() -> None:
    doc = json.loads(FIXTURE.read_text())
    text = render_markdown(doc, ["inference.png"])
    assert text.startswith("# InferGrid benchmarks")
    assert "Load average" in text and "[0.5, 0.4, 0.3]" in text
    assert "![inference.png](inference.png)" in text
    assert "failed: RuntimeError: boom" in text
    assert "not landed yet" in text
    rows = {row[0]: row for row in targets(doc)}
    pytriton = next(r for k, r in rows.items() if "PyTriton's throughput" in k)
    assert "2.00\u00d7" in pytriton[1] and pytriton[2] == "met"
    limit = next(r for k, r in rows.items() if "bare-transport" in k)
    assert "echo-sync" in limit[1] and "0.50\u00d7" in limit[1] and limit[2] == "**not met**"
    feast = next(r for k, r in rows.items() if "1 entity" in k)
    assert "3.75\u00d7" in feast[1] and feast[2] == "met"  # Feast's best under 25 ms is c=1 (800 req/s)
    assert next(r for k, r in rows.items() if "End to end" in k)[2] == "not measured"


def test_best_peer_takes_the_fastest_peer_under_the_objective_across_suites() -> None:
    def pt(key: str, c: int, rps: float, p99: float) -> dict[str, Any]:
        return {"key": key, "params": {"concurrency": c}, "median": {"rps": rps, "p99_ms": p99, "errors": 0}}

    doc: dict[str, Any] = {"suites": {
        "e2e": {"points": [pt("litserve-redis", 1, 500.0, 2.0), pt("litserve-redis", 32, 1000.0, 35.0)]},
        "peers": {"points": [pt("ray-redis", 1, 100.0, 30.0), pt("ray-direct-redis", 8, 2000.0, 80.0),
                             pt("ray-direct-redis", 1, 450.0, 24.0), pt("bentoml-redis", 1, 600.0, 20.0)]},
    }}  # fmt: skip
    label, point, measured = best_peer(doc)
    assert label == "BentoML + Redis" and point is not None and point["median"]["rps"] == 600.0
    assert [name for name, _ in measured] == [
        "LitServe + Redis", "Ray Serve (proxy) + Redis", "Ray Serve (direct ingress) + Redis", "BentoML + Redis"
    ]  # fmt: skip
    assert dict(measured)["Ray Serve (proxy) + Redis"] is None  # never met p99 <= 25 ms
    doc["suites"]["e2e"]["points"].append(pt("e2e-grpc", 32, 4000.0, 10.0))
    row = next(r for r in targets(doc) if "5\u00d7 the best" in r[0])
    assert "BentoML + Redis" in row[1] and "6.67\u00d7" in row[1] and row[2] == "met"
    del doc["suites"]["peers"]
    assert best_peer(doc)[0] == "LitServe + Redis"
    assert best_peer({"suites": {}}) == (None, None, [])


def test_features_table_pairs_the_miss_path_with_feast_on_cassandra() -> None:
    def pt(key: str, rps: float, p99: float) -> dict[str, Any]:
        return {"key": key, "params": {"entities": 1, "concurrency": 32},
                "median": {"rps": rps, "p99_ms": p99, "errors": 0}}  # fmt: skip

    doc: dict[str, Any] = {"suites": {"features": {"points": [
        pt("ours-hit", 8000.0, 5.0), pt("ours-miss", 3000.0, 12.0), pt("feast", 800.0, 60.0),
        pt("feast-cassandra", 600.0, 90.0)]}}}  # fmt: skip
    lines = ratios(doc)
    header = next(line for line in lines if line.startswith("| entities"))
    assert "Feast (Cassandra) req/s" in header and "miss / Feast (Cassandra)" in header
    row = next(line for line in lines if line.startswith("| 1 | 32"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[8:12] == ["600", "90.00", "10.00\u00d7", "5.00\u00d7"]
    del doc["suites"]["features"]["points"][3]  # not measured: dashes, the rest unchanged
    row = next(line for line in ratios(doc) if line.startswith("| 1 | 32"))
    assert "10.00\u00d7" in row
