"""The chaos suite's own logic: outcome summaries, verdicts, counting the lake, the report and the plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench.logpub import make_record
from chaos.__main__ import choose, document
from chaos.load import OK, Outcome, grpc_request, http_body
from chaos.reconcile import count_ids, lake_ids, lake_read_ids
from chaos.report import render_markdown, write
from chaos.runner import RunSettings, summarize, timeline
from chaos.scenarios import FAILED_BUDGET, Marks, Scenario, all_scenarios
from services.logging.lake import ParquetLake


async def _no_fault(*_args: object) -> None:
    return None


def _scenario(kind: str = "sigkill") -> Scenario:
    return Scenario("kill-x", kind, "kill x", _no_fault)


def _outcomes() -> list[Outcome]:
    out = [Outcome(f"r-{i}", "grpc" if i % 2 else "http", i * 0.1, 2.0 + i % 5, OK) for i in range(100)]
    out[40] = Outcome("r-40", "grpc", 4.0, 3000.0, "UNAVAILABLE")
    out[41] = Outcome("r-41", "http", 4.1, 12.0, "HTTP 503")
    return out


def test_timeline_counts_ok_and_failed_per_second() -> None:
    points = timeline(_outcomes())
    assert len(points) == 10
    assert points[4] == {"t": 4.0, "ok": 8.0, "failed": 2.0}
    assert sum(p["ok"] for p in points) == 98


def test_summary_counts_codes_and_latency_during_the_fault() -> None:
    clock = iter([3.5, 3.5, 4.5, 4.5])
    marks = Marks(lambda: next(clock))
    marks.fault_start("kill")
    marks.fault_end("back")
    result = summarize(_scenario(), _outcomes(), marks, None, skipped=0, duration_s=10.0)
    assert (result.sent, result.ok, result.failed) == (100, 98, 2)
    assert result.failed_by_code == {"HTTP 503": 1, "UNAVAILABLE": 1}
    assert result.fault_windows == [(3.5, 4.5)]
    assert result.fault_p99_ms is not None and result.fault_p99_ms <= 6.0  # only OK answers count
    assert result.events == [(3.5, "kill"), (4.5, "back")]


def test_verdicts_hold_each_kind_to_its_budget() -> None:
    marks = Marks(lambda: 0.0)
    sigkill = summarize(_scenario("sigkill"), _outcomes(), marks, None, skipped=0, duration_s=1)
    assert sigkill.verdicts()["failed within budget"] is False  # 2 % > 0.1 %
    assert sigkill.verdicts()["no record lost"] is None  # not reconciled
    outage = summarize(_scenario("outage"), _outcomes(), marks, None, skipped=0, duration_s=1)
    assert outage.verdicts()["failed within budget"] is None
    scale = summarize(
        _scenario("scale"), _outcomes()[:10], marks, None, skipped=0, duration_s=1,
        scale_out_s={"gateway-3": 1.5, "inference-3": None},
    )  # fmt: skip
    assert scale.verdicts()["new replica served within 10 s"] is False


def test_requests_carry_their_id_on_both_transports() -> None:
    assert grpc_request("chaos-1", 7).request_id == "chaos-1"
    body = json.loads(http_body("chaos-2", 7))
    assert body["request_id"] == "chaos-2" and body["entities"]["user_id"] == "u00007"


def test_lake_counts_files_raw_and_as_read(tmp_path: Path) -> None:
    lake = ParquetLake(tmp_path, "t", roll_bytes=1 << 20, roll_seconds=60)
    now_us = int(time.time() * 1e6)
    for offset, i in enumerate([1, 2, 3]):
        record = make_record("run", i, now_us)
        lake.add(0, offset, record, record.SerializeToString())
    lake.flush()
    resent = make_record("run", 2, now_us)  # the producer re-sent record 2: a later offset, a later flush
    lake.add(0, 10, resent, resent.SerializeToString())
    other = make_record("other", 9, now_us)
    lake.add(0, 11, other, other.SerializeToString())
    lake.flush()
    wanted = {"run-00000001", "run-00000002", "run-00000003", "run-00000004"}
    raw = count_ids(lake_ids(tmp_path, "run-").elements(), wanted)
    assert raw == {"run-00000001": 1, "run-00000002": 2, "run-00000003": 1}
    assert lake_read_ids(tmp_path, "run-", wanted) == {
        "run-00000001": 1,
        "run-00000002": 1,
        "run-00000003": 1,
    }


def test_quick_suite_is_a_subset_and_names_are_checked() -> None:
    scenarios = all_scenarios(20, 20)
    quick = choose(scenarios, quick=True, only="")
    assert 0 < len(quick) < len(scenarios)
    assert [s.name for s in choose(scenarios, quick=False, only="redis-restart")] == ["redis-restart"]
    with pytest.raises(SystemExit, match="unknown scenario"):
        choose(scenarios, quick=False, only="nope")
    kinds = {s.kind for s in scenarios}
    assert kinds == {"baseline", "sigkill", "rolling", "node", "outage", "scale"}
    assert kinds == set(FAILED_BUDGET)  # every kind is judged
    assert scenarios[0].name == "baseline"  # the faults are read against it


def test_report_has_a_row_and_a_plot_per_scenario(tmp_path: Path) -> None:
    marks = Marks(lambda: 4.0)
    result = summarize(_scenario(), _outcomes(), marks, None, skipped=3, duration_s=10.0)
    machine = {
        "time_utc": "2026-12-04T00:00:00Z",
        "git_commit": "abc",
        "cpus": 2,
        "load_average_at_start": [0.1],
    }
    doc = document([result], RunSettings(), "quick", machine)
    report = write(doc, tmp_path / "run", latest=tmp_path / "latest")
    text = report.read_text()
    assert "| kill-x | 100 | 98 | 2 (2.00%)" in text
    assert "![kill-x](kill-x.png)" in text
    assert (tmp_path / "run" / "kill-x.png").stat().st_size > 1000
    assert (tmp_path / "latest" / "results.json").exists()
    assert "3 request(s) not sent" in render_markdown(doc, {})
