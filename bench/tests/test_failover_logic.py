"""The failover benchmark's pure logic and the shared pool helpers (no server started): the failover counter read
from a registry and from a /metrics page, the gpu pool's batching variants, the platform's pools section, a
repetition's summary, a phase's totals and the report's failover and latency-target tables."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench import inference_pools as ip
from bench.report import failover_rows, latency_target_rows, render_markdown
from bench.suites.failover import Calls, phase_totals, rep_summary
from libs.platform import parse_platform
from stack.demo_model import CONFIG_PBTXT


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter(
        "infergrid_gateway_inference_failovers_total", "test", ["model", "from_pool", "to_pool", "reason"],
        registry=registry,
    )  # fmt: skip
    counter.labels("fraud", "gpu", "cpu", "down").inc(3)
    counter.labels("fraud", "gpu", "cpu", "overloaded").inc(5)
    counter.labels("fraud", "cpu", "gpu", "down").inc(7)  # another preference order: not counted
    counter.labels("toy", "gpu", "cpu", "down").inc(11)  # another model: not counted
    return registry


def test_failovers_are_read_the_same_from_the_registry_and_from_the_metrics_page() -> None:
    registry = _registry()
    expected = {"down": 3.0, "breaker_open": 0.0, "overloaded": 5.0, "queue_delay": 0.0, "draining": 0.0}
    assert ip.failovers_by_reason(registry.collect()) == expected
    page = generate_latest(registry).decode()
    assert ip.failovers_by_reason(text_string_to_metric_families(page)) == expected
    assert ip.failovers_by_reason(registry.collect(), model="toy")["down"] == 11.0
    assert ip.failovers_by_reason(text_string_to_metric_families("")) == dict.fromkeys(ip.REASONS, 0.0)


def test_batching_variant_rewrites_only_the_copy(tmp_path: Path) -> None:
    source = tmp_path / "demo"
    (source / ip.MODEL / "1").mkdir(parents=True)
    (source / ip.MODEL / "config.pbtxt").write_text(CONFIG_PBTXT)
    (source / ip.MODEL / "1" / "model.onnx").write_bytes(b"weights")
    target = ip.batching_variant(source, tmp_path / "gpu", ip.SATURABLE)
    text = (target / ip.MODEL / "config.pbtxt").read_text()
    assert "max_queue_delay_microseconds: 100000\n" in text and "max_queue_size: 2 " in text
    assert (target / ip.MODEL / "1" / "model.onnx").read_bytes() == b"weights"
    assert (source / ip.MODEL / "config.pbtxt").read_text() == CONFIG_PBTXT
    slow = ip.Batching(queue_delay_us=400_000, max_queue_size=4096)
    again = ip.batching_variant(target, tmp_path / "demo-again", ip.DEMO)  # a variant of a variant
    assert (again / ip.MODEL / "config.pbtxt").read_text() == CONFIG_PBTXT
    ip.batching_variant(source, target, slow)  # replaces the existing folder
    assert "max_queue_delay_microseconds: 400000\n" in (target / ip.MODEL / "config.pbtxt").read_text()
    (source / ip.MODEL / "config.pbtxt").write_text('name: "fraud"\nmax_batch_size: 8\n')
    with pytest.raises(ValueError, match="max_queue_delay_microseconds is set 0 times"):
        ip.batching_variant(source, tmp_path / "bad", ip.SATURABLE)


def test_the_pools_section_is_a_valid_platform_with_the_preference_order() -> None:
    text = ip.pools_yaml({"gpu": "127.0.0.1:7001", "cpu": "127.0.0.1:7002"})
    platform = parse_platform(text)
    assert platform.models["fraud"].pools == ("gpu", "cpu")
    assert tuple(platform.inference_pools["cpu"].endpoints) == ("127.0.0.1:7002",)


def test_predict_requests_have_unique_ids_and_varied_entities() -> None:
    a, b = ip.predict_request(1), ip.predict_request(1)
    assert a.request_id != b.request_id and a.model == "fraud"
    assert ip.predict_request(2).entities["user_id"] != a.entities["user_id"]


def test_served_pool_reads_one_ok_record() -> None:
    Record = collections.namedtuple("Record", "request_id status_code inference_pool")
    records = [Record("a", 0, "cpu"), Record("b", 14, "gpu"), Record("c", 0, "gpu"), Record("c", 0, "gpu")]
    assert ip.served_pool(records, "a") == "cpu"
    for request_id in ("b", "c", "missing"):
        with pytest.raises(LookupError):
            ip.served_pool(records, request_id)


def test_rep_summary_counts_calls_failures_pools_and_failover_increase() -> None:
    calls = Calls(
        latencies_ms=[1.0, 2.0, 3.0, 4.0],
        failed=collections.Counter({"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1}),
        served=collections.Counter({"gpu": 1, "cpu": 3}),
    )
    before = {"down": 10.0, "overloaded": 1.0, "queue_delay": 0.0}
    after = {"down": 13.0, "overloaded": 1.0, "queue_delay": 0.0}
    rep = rep_summary(calls, 2.0, before, after)
    assert rep["calls"] == 7 and rep["requests"] == 4 and rep["errors"] == 3 and rep["rps"] == 2.0
    assert rep["failed_by_code"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 2}
    assert rep["served_by"] == {"cpu": 3, "gpu": 1}
    assert rep["failovers"] == {"down": 3.0}
    assert rep["p50_ms"] == pytest.approx(2.5)


def test_phase_totals_add_up_the_repetitions() -> None:
    reps: list[dict[str, Any]] = [
        {"calls": 10, "requests": 8, "failed_by_code": {"UNAVAILABLE": 2}, "served_by": {"gpu": 6, "cpu": 2},
         "failovers": {"down": 2.0}},
        {"calls": 12, "requests": 12, "failed_by_code": {}, "served_by": {"cpu": 12}, "failovers": {"down": 11.0,
         "breaker_open": 1.0}},
    ]  # fmt: skip
    totals = phase_totals(reps)
    assert totals["calls"] == 22 and totals["ok"] == 20
    assert totals["failed_by_code"] == {"UNAVAILABLE": 2}
    assert totals["served_by"] == {"cpu": 14, "gpu": 6}
    assert totals["served_share"] == {"cpu": 0.7, "gpu": 0.3}
    assert totals["failovers"] == {"breaker_open": 1, "down": 13}
    assert phase_totals([])["served_share"] == {}


def _point(key: str, params: dict[str, Any], rps: float, p99: float, **extra: Any) -> dict[str, Any]:
    return {"system": key, "key": key, "params": params, "reps": [{}],
            "median": {"rps": rps, "p50_ms": p99 / 2, "p99_ms": p99, "errors": 0}, **extra}  # fmt: skip


def test_report_tables_for_failover_and_latency_target() -> None:
    healthy = {"calls": 100, "ok": 100, "failed_by_code": {}, "served_share": {"gpu": 1.0}, "failovers": {}}
    down = {"calls": 60, "ok": 57, "failed_by_code": {"UNAVAILABLE": 3}, "served_share": {"cpu": 1.0},
            "failovers": {"down": 50, "breaker_open": 7}}  # fmt: skip
    doc = {
        "suites": {
            "failover": {"status": "ok", "points": [
                _point("failover-healthy", {"phase": "healthy"}, 400.0, 10.0, totals=healthy),
                _point("failover-down", {"phase": "down"}, 300.0, 20.0, totals=down),
            ]},
            "slo": {"status": "ok", "extra": {"target_p99_ms": 10, "settled (after each point)": {
                "target c=8": {"delay_us": 250.0, "batch_cap": 16.0}}}, "points": [
                _point("slo-fixed", {"concurrency": 8, "variant": "fixed"}, 1000.0, 12.0),
                _point("slo-target", {"concurrency": 8, "variant": "target"}, 1200.0, 9.0),
                _point("slo-fixed", {"concurrency": 128, "variant": "fixed"}, 2000.0, 30.0),
                _point("slo-target", {"concurrency": 128, "variant": "target"}, 1000.0, 12.5),
            ]},
        }
    }  # fmt: skip
    rows = failover_rows(doc)
    assert rows[0][0] == "healthy" and rows[0][-1] == "1.00\u00d7" and rows[0][6] == "0"
    assert rows[1][6] == "UNAVAILABLE 3" and rows[1][7] == "cpu 100.0%"
    assert rows[1][8] == "breaker_open 7, down 50" and rows[1][-1] == "0.75\u00d7"
    slo = latency_target_rows(doc)
    assert [r[0] for r in slo] == ["8", "128"]
    assert slo[0][5] == "yes" and slo[0][6] == "1.20\u00d7" and slo[0][7:] == ["250", "16"]
    assert slo[1][5] == "**no**" and slo[1][6] == "0.50\u00d7" and slo[1][7:] == ["\u2013", "\u2013"]
    text = render_markdown(doc)
    assert "### Failover: Predict via the gateway" in text and "### Latency target" in text
    assert "### Failover" not in render_markdown({"suites": {}})
