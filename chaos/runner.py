"""Runs scenarios one after another under load, reconciles each against the sinks, and keeps the results.

Per scenario: the load starts, runs `warmup_s`, the fault is injected and healed (the scenario marks both),
the load runs `after_s` more and stops, then every answered-OK request id is looked up in Cassandra and
the lake (waiting up to `sink_timeout_s` for the pipeline to catch up, e.g. after a Kafka outage).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.stats import percentile
from chaos.cluster import ClusterHandle
from chaos.load import OK, LoadRun, LoadSettings, Outcome
from chaos.reconcile import CassandraSink, SinkCounts, reconcile
from chaos.scenarios import FAILED_BUDGET, Marks, Scenario
from stack.cassandra import admin_auth


@dataclass(frozen=True)
class RunSettings:
    """How long and how hard each scenario runs."""

    # What the cluster profile sustains on 2 cores with headroom (chaos/results/analysis.md: at 100/s the
    # load average reaches 20 and the failures are the saturated machine's, not the faults').
    rate: float = 50.0
    http_share: float = 0.5
    warmup_s: float = 5.0
    after_s: float = 10.0
    sink_timeout_s: float = 120.0
    keyspace: str = "infergrid"


@dataclass
class ScenarioResult:
    """What one scenario measured: the caller's view and the sinks' reconciliation."""

    name: str
    kind: str
    description: str
    sent: int
    ok: int
    failed_by_code: dict[str, int]
    skipped: int
    p50_ms: float | None
    p99_ms: float | None
    fault_p50_ms: float | None
    fault_p99_ms: float | None
    sinks: dict[str, Any]
    events: list[tuple[float, str]]
    fault_windows: list[tuple[float, float]]
    notes: list[str]
    timeline: list[dict[str, float]]
    duration_s: float
    error: str = ""

    @property
    def failed(self) -> int:
        return sum(self.failed_by_code.values())

    def verdicts(self) -> dict[str, bool | None]:
        """Each target of the issue this scenario is held to: met (True), missed (False) or n/a (None)."""
        budget = FAILED_BUDGET[self.kind]
        failed_share = self.failed / self.sent if self.sent else 0.0
        lost = self.sinks.get("lost")
        dup = self.sinks.get("duplicated")
        out: dict[str, bool | None] = {
            "no record lost": None if lost is None else lost == 0,
            "no record duplicated": None if dup is None else dup == 0,
            "failed within budget": None if budget is None else failed_share <= budget,
        }
        if self.kind == "scale":
            took = [v for k, v in self.sinks.get("scale_out_s", {}).items()]
            out["new replica served within 10 s"] = bool(took) and all(
                v is not None and v <= 10 for v in took
            )
        if self.error:
            out["scenario completed"] = False
        return out


def _percentiles(latencies: Sequence[float]) -> tuple[float | None, float | None]:
    values = sorted(latencies)
    if not values:
        return None, None
    return round(percentile(values, 50), 2), round(percentile(values, 99), 2)


def timeline(outcomes: Sequence[Outcome], bucket_s: float = 1.0) -> list[dict[str, float]]:
    """Requests per bucket of send time: OK and failed counts."""
    buckets: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    for o in outcomes:
        buckets[int(o.sent_s // bucket_s)][0 if o.code == OK else 1] += 1
    if not buckets:
        return []
    return [
        {"t": i * bucket_s, "ok": buckets[i][0] / bucket_s, "failed": buckets[i][1] / bucket_s}
        for i in range(0, max(buckets) + 1)
    ]


def summarize(
    scenario: Scenario,
    outcomes: Sequence[Outcome],
    marks: Marks,
    sinks: SinkCounts | None,
    *,
    skipped: int,
    duration_s: float,
    error: str = "",
    scale_out_s: dict[str, float | None] | None = None,
) -> ScenarioResult:
    """One scenario's result from the outcomes the load collected and the sinks' counts."""
    failed = collections.Counter(o.code for o in outcomes if o.code != OK)
    ok_latencies = [o.latency_ms for o in outcomes if o.code == OK]
    in_fault = [
        o.latency_ms
        for o in outcomes
        if o.code == OK and any(start <= o.sent_s <= end for start, end in marks.fault_windows)
    ]
    p50, p99 = _percentiles(ok_latencies)
    f50, f99 = _percentiles(in_fault)
    sink_doc: dict[str, Any] = {}
    if sinks is not None:
        sink_doc = {**asdict(sinks), "lost": sinks.lost, "duplicated": sinks.duplicated}
    if scale_out_s:
        sink_doc["scale_out_s"] = dict(scale_out_s)
    return ScenarioResult(
        name=scenario.name,
        kind=scenario.kind,
        description=scenario.description,
        sent=len(outcomes),
        ok=len(ok_latencies),
        failed_by_code=dict(sorted(failed.items())),
        skipped=skipped,
        p50_ms=p50,
        p99_ms=p99,
        fault_p50_ms=f50,
        fault_p99_ms=f99,
        sinks=sink_doc,
        events=marks.events,
        fault_windows=[(round(a, 2), round(b, 2)) for a, b in marks.fault_windows],
        notes=marks.notes,
        timeline=timeline(outcomes),
        duration_s=round(duration_s, 1),
        error=error,
    )


async def run_scenario(
    cluster: ClusterHandle,
    scenario: Scenario,
    api_key: str,
    settings: RunSettings,
    say: Callable[[str], None],
) -> ScenarioResult:
    """Runs one scenario under load and reconciles it."""
    run_id = f"chaos-{scenario.name}-{uuid.uuid4().hex[:8]}"
    load = LoadRun(
        LoadSettings(
            target=cluster.envoy_target,
            api_key=api_key,
            rate=settings.rate,
            http_share=settings.http_share,
            run_id=run_id,
        )
    )
    marks = Marks(load.now_s)
    # The machine's state as the scenario starts: on a small host the load average says whether the rate
    # leaves headroom (failures from a saturated machine are deadline expiries, not the fault's).
    marks.notes.append("load average at start: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    cluster.scale_out_s.clear()
    say(f"{scenario.name}: {scenario.description}")
    t0 = time.monotonic()
    hour0 = int(time.time() // 3600)
    loader = asyncio.create_task(load.run(duration_s=3600))
    error = ""
    try:
        await asyncio.sleep(settings.warmup_s)
        await scenario.fault(cluster, marks)
        await asyncio.sleep(settings.after_s)
    except Exception as exc:  # a scenario that could not finish is reported, and the suite goes on
        error = f"{type(exc).__name__}: {exc}"
        say(f"{scenario.name}: {error}")
    finally:
        load.stop()
        outcomes = await loader
    duration = time.monotonic() - t0
    ok_ids = [o.request_id for o in outcomes if o.code == OK]
    say(f"{scenario.name}: {len(outcomes)} sent, {len(ok_ids)} OK; reconciling with Cassandra and the lake")
    hosts, port = cluster.cassandra_contact()
    auth = admin_auth(cluster.config)
    sink = await asyncio.to_thread(CassandraSink, hosts, port, settings.keyspace, auth_provider=auth)
    try:
        counts = await asyncio.to_thread(
            reconcile,
            ok_ids,
            run_id,
            cassandra=sink,
            lake_dir=cluster.lake_dir,
            hours=range(hour0, int(time.time() // 3600) + 1),
            timeout_s=settings.sink_timeout_s,
            say=say,
        )
    finally:
        sink.close()
    result = summarize(
        scenario,
        outcomes,
        marks,
        counts,
        skipped=load.skipped,
        duration_s=duration,
        error=error,
        scale_out_s=cluster.scale_out_s,
    )
    say(
        f"{scenario.name}: failed {result.failed} {result.failed_by_code or ''}, lost {counts.lost}, "
        f"duplicated {counts.duplicated} (stored twice: lake files {counts.duplicated_lake_files}, "
        f"executed twice {counts.executed_twice})"
    )
    return result
