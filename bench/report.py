"""Renders report.md and PNG plots from a results document (results.json).

`render_markdown` is pure (the smoke test renders a fixture); `render` also draws the plots with
matplotlib (Agg) when it is installed. Targets come from issue 9 and are recorded, never asserted.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import stats

Doc = Mapping[str, Any]
DASH = "\u2013"
LE = "\u2264"


def _f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, (int, float)) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _x(value: float | None) -> str:
    return "\u2013" if value is None else f"{value:.2f}\u00d7"


def points(doc: Doc, suite: str, key: str | None = None, **params: Any) -> list[Mapping[str, Any]]:
    out = []
    for p in (doc.get("suites", {}).get(suite) or {}).get("points", []):
        if key is not None and p.get("key") != key:
            continue
        if all((p.get("params") or {}).get(k) == v for k, v in params.items()) and "median" in p:
            out.append(p)
    return out


def _med(point: Mapping[str, Any] | None, name: str) -> float | None:
    if point is None:
        return None
    value = (point.get("median") or {}).get(name)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _best(doc: Doc, suite: str, key: str, **params: Any) -> Mapping[str, Any] | None:
    return stats.best_under_slo(points(doc, suite, key, **params))


def _max_rps(doc: Doc, suite: str, key: str, **params: Any) -> Mapping[str, Any] | None:
    pts = points(doc, suite, key, **params)
    return max(pts, key=lambda p: _med(p, "rps") or 0.0) if pts else None


def _describe(point: Mapping[str, Any] | None, rows: int = 1) -> str:
    if point is None:
        return "not measured"
    c = (point.get("params") or {}).get("concurrency")
    rps = (_med(point, "rps") or 0.0) * rows
    unit = "rows/s" if rows > 1 else "req/s"
    return f"{rps:,.0f} {unit} (c={c}, p99 {_f(_med(point, 'p99_ms'))} ms)"


# The end-to-end peers (suite, key, label): LitServe runs in the e2e suite, Ray Serve and BentoML in peers.
PEERS = (
    ("e2e", "litserve-redis", "LitServe + Redis"),
    ("peers", "ray-redis", "Ray Serve (proxy) + Redis"),
    ("peers", "ray-direct-redis", "Ray Serve (direct ingress) + Redis"),
    ("peers", "bentoml-redis", "BentoML + Redis"),
)


def best_peer(
    doc: Doc,
) -> tuple[str | None, Mapping[str, Any] | None, list[tuple[str, Mapping[str, Any] | None]]]:
    """The peer with the highest throughput at p99 ≤ 25 ms (no errors): (label, point, every measured peer's best).

    Peers with no measured point are left out of the list; a measured peer that never met the objective is listed
    with None. (None, None, list) when no peer met it.
    """
    measured = [(label, _best(doc, suite, key)) for suite, key, label in PEERS if points(doc, suite, key)]
    met = [(label, p) for label, p in measured if p is not None]
    if not met:
        return None, None, measured
    label, point = max(met, key=lambda lp: _med(lp[1], "rps") or 0.0)
    return label, point, measured


def _verdict(ok: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[ok]


def targets(doc: Doc) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows for the issue's targets."""
    rows: list[tuple[str, str, str]] = []
    inf = "inference"
    ours32 = stats.at_param(points(doc, inf, "ours-batch"), concurrency=32)
    tri32 = stats.at_param(points(doc, inf, "pytriton"), concurrency=32)
    r = stats.ratio(_med(ours32, "rps"), _med(tri32, "rps"))
    p99_ok = (
        None
        if ours32 is None or tri32 is None
        else (_med(ours32, "p99_ms") or 1e9) <= (_med(tri32, "p99_ms") or 0)
    )
    rows.append((
        "Inference, c=32: \u2265 1.5\u00d7 PyTriton's throughput at equal or better p99",
        f"ours {_describe(ours32)} vs PyTriton {_describe(tri32)}: {_x(r)}"
        + ("" if p99_ok is None else f", p99 {LE if p99_ok else '>'} PyTriton's"),
        _verdict(None if r is None else (r >= 1.5 and bool(p99_ok))),
    ))  # fmt: skip
    echo32 = [stats.at_param(points(doc, inf, k), concurrency=32) for k in ("echo-aio", "echo-sync")]
    echo_best = max((p for p in echo32 if p is not None), key=lambda p: _med(p, "rps") or 0.0, default=None)
    r = stats.ratio(_med(ours32, "rps"), _med(echo_best, "rps"))
    rows.append((
        "Inference, c=32: \u2265 0.8\u00d7 the bare-transport limit (faster of grpc.aio / threaded echo)",
        f"ours {_describe(ours32)} vs {echo_best['key'] if echo_best else 'echo'} {_describe(echo_best)}: {_x(r)}",
        _verdict(None if r is None else r >= 0.8),
    ))  # fmt: skip
    ft = "features"
    for n, need, label in ((1, 3.0, "1 entity \u00d7 32 features: \u2265 3\u00d7 Feast's throughput (p99 \u2264 25 ms)"),
                           (100, 20.0, "100 entities \u00d7 32 features: \u2265 20\u00d7 Feast's entity rows/s")):  # fmt: skip
        ours = _best(doc, ft, "ours-hit", entities=n)
        feast_slo = _best(doc, ft, "feast", entities=n)
        feast_any = _max_rps(doc, ft, "feast", entities=n)
        feast = feast_slo or feast_any
        r = stats.ratio(_med(ours, "rps"), _med(feast, "rps"))
        note = (
            ""
            if feast_slo or feast is None
            else " (Feast never met p99 \u2264 25 ms: its best throughput at any latency)"
        )
        rows.append((
            f"Features, {label}",
            f"ours (cache hit) {_describe(ours, n)} vs Feast {_describe(feast, n)}{note}: {_x(r)}",
            _verdict(None if r is None else r >= need),
        ))  # fmt: skip
    e2e = doc.get("suites", {}).get("e2e") or {}
    if e2e.get("points"):
        rows += _e2e_rows(doc, "e2e-grpc", "ours (gRPC)", "")
        if points(doc, "e2e", "e2e-grpc-node"):
            rows += _e2e_rows(doc, "e2e-grpc-node", "the node (gRPC)", ", the node (one process)")
        if points(doc, "e2e", "direct-grpc-node"):
            rows += _e2e_rows(doc, "direct-grpc-node", "the node direct (gRPC)",
                              ", the node without Envoy (as the peers run)",
                              via="straight to the node, no Envoy (the gateway checks the key and rate limit)")  # fmt: skip
    else:
        rows.append(("End to end through Envoy: \u2265 PyTriton (Redis + model) at p99 \u2264 25 ms",
                     f"not measured: {e2e.get('note') or e2e.get('status') or 'not run'}", _verdict(None)))  # fmt: skip
    log = (points(doc, "logging", "pipeline") or [None])[0]
    rows.append(("Logging: \u2265 20,000 records/s publish → sink",
                 f"{_f(_med(log, 'rps'))} records/s" if log else "not measured",
                 _verdict(None if log is None else (_med(log, "rps") or 0) >= 20_000)))  # fmt: skip
    backlog = next(iter(points(doc, "logging", "pipeline-backlog")), None)
    if backlog is not None:
        cpu = backlog.get("pipeline_cpu_us_per_record") or {}
        pair = (cpu.get("logging") or 0) + (cpu.get("cassandra") or 0) if cpu else None
        rows.append(("Logging, consumer alone (a backlog drained, Cassandra on its own core): \u2265 10,000 records/s, "
                     "\u2264 120 \u00b5s of CPU per record in the consumer and Cassandra",
                     f"{_f(_med(backlog, 'rps'))} records/s; consumer + Cassandra {_f(pair, 1)} \u00b5s per record",
                     _verdict(None if pair is None else (_med(backlog, "rps") or 0) >= 10_000 and pair <= 120)))  # fmt: skip
    prod = (log or {}).get("producer") or {}
    cost = prod.get("producer_cpu_us_per_record")
    rows.append(("Logging: producer cost < 20 \u00b5s per record",
                 f"publish() p50 {_f(prod.get('publish_us_p50'))} \u00b5s, p99 {_f(prod.get('publish_us_p99'))} \u00b5s; "
                 f"process CPU {_f(cost)} \u00b5s/record incl. librdkafka's threads" if prod else "not measured",
                 _verdict(None if cost is None else cost < 20)))  # fmt: skip
    return rows


def _e2e_rows(
    doc: dict[str, Any], key: str, who: str, title: str, via: str = "through Envoy"
) -> list[tuple[str, str, str]]:
    """The end-to-end target rows of the e2e points `key` (ours, or the node), `who` naming them."""
    rows = []
    ours_e2e = _best(doc, "e2e", key)
    ours_any = _max_rps(doc, "e2e", key)
    ours_note = (
        "" if ours_e2e or ours_any is None else " (never met p99 \u2264 25 ms; its best at any latency)"
    )
    ours_e2e_or_any = ours_e2e or ours_any
    tri_redis = _best(doc, "e2e", "pytriton-redis")
    r = stats.ratio(_med(ours_e2e, "rps") or 0.0, _med(tri_redis, "rps")) if ours_any else None
    rows.append((
        f"End to end {via} (auth, rate limit, features, model, log record), p99 \u2264 25 ms: "
        f"\u2265 PyTriton doing only the Redis lookup and the model{title}",
        f"{who} {_describe(ours_e2e_or_any)}{ours_note} vs PyTriton + Redis {_describe(tri_redis)}: "
        f"{_x(stats.ratio(_med(ours_e2e_or_any, 'rps'), _med(tri_redis, 'rps')))}",
        _verdict(None if r is None else r >= 1.0),
    ))  # fmt: skip
    peer_label, peer, measured = best_peer(doc)
    each = "; ".join(f"{label} {_describe(p) if p else 'never met it'}" for label, p in measured)
    if peer is not None:
        r = stats.ratio(_med(ours_e2e, "rps") or 0.0, _med(peer, "rps")) if ours_any else None
        text = (f"{who} {_describe(ours_e2e_or_any)}{ours_note} vs the best peer, {peer_label} "
                f"{_describe(peer)}: {_x(stats.ratio(_med(ours_e2e_or_any, 'rps'), _med(peer, 'rps')))}")  # fmt: skip
        ok = None if r is None else r >= 5.0
    elif measured:  # no peer met p99 <= 25 ms: their throughput under the objective is 0
        text = (
            f"{who} {_describe(ours_e2e_or_any)}{ours_note}; no peer met p99 \u2264 25 ms at any concurrency"
        )
        ok = None if not ours_any else ours_e2e is not None
    else:
        text, ok = "no peer measured in this run", None
    rows.append((
        f"End to end: \u2265 5\u00d7 the best of Ray Serve, BentoML, LitServe at p99 \u2264 25 ms{title}",
        text + (f". Each peer's best at p99 \u2264 25 ms: {each}" if measured else ""),
        _verdict(ok),
    ))  # fmt: skip
    return rows


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def point_rows(pts: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for p in pts:
        params = ", ".join(f"{k}={v}" for k, v in (p.get("params") or {}).items())
        if "error" in p:
            rows.append(
                [p["system"], params, "failed: " + p["error"][:160].replace("|", "/").replace("\n", " ")]
                + [""] * 8
            )
            continue
        m = p.get("median") or {}
        errs = _f(m.get("errors"), 0) + (f" (+{m['degraded']:.0f} degraded)" if m.get("degraded") else "")
        rows.append([p["system"], params, _f(m.get("rps"), 0), _f(m.get("p50_ms")), _f(m.get("p99_ms")),
                     _f(m.get("p999_ms")), errs, _f(m.get("server_cpu")), _f(m.get("loadgen_cpu")),
                     f"{len(p.get('reps', []))} / {p.get('spread', 0):.0%}", _f(p.get("load_1m"), 1)])  # fmt: skip
    return rows


POINT_HEADER = ("system", "params", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors", "server CPU", "loadgen CPU",
                "reps / spread", "load")  # fmt: skip


def ratios(doc: Doc) -> list[str]:
    """ours / transport limit and ours / PyTriton per concurrency; ours / Feast per point."""
    out: list[str] = []
    inf = doc.get("suites", {}).get("inference")
    if inf and inf.get("points"):
        rows = []
        concs = sorted(
            {(p.get("params") or {}).get("concurrency") for p in points(doc, "inference", "ours-batch")}
            - {None}
        )
        for c in concs:
            ours = stats.at_param(points(doc, "inference", "ours-batch"), concurrency=c)
            nob = stats.at_param(points(doc, "inference", "ours-nobatch"), concurrency=c)
            echos = [
                stats.at_param(points(doc, "inference", k), concurrency=c) for k in ("echo-aio", "echo-sync")
            ]
            echo = max((e for e in echos if e), key=lambda e: _med(e, "rps") or 0.0, default=None)
            tri = stats.at_param(points(doc, "inference", "pytriton"), concurrency=c)
            rows.append([str(c), _f(_med(ours, "rps"), 0), _f(_med(ours, "p99_ms")), _f(_med(nob, "rps"), 0),
                         f"{_f(_med(echo, 'rps'), 0)} ({echo['key'] if echo else DASH})", _f(_med(tri, "rps"), 0),
                         _f(_med(tri, "p99_ms")), _x(stats.ratio(_med(ours, "rps"), _med(echo, "rps"))),
                         _x(stats.ratio(_med(ours, "rps"), _med(tri, "rps")))])  # fmt: skip
        out += ["### Inference: ours / transport limit, ours / PyTriton (same concurrency)", ""]
        out += _table(["c", "ours req/s", "ours p99 ms", "ours, batching off", "transport limit req/s",
                       "PyTriton req/s", "PyTriton p99 ms", "ours / limit", "ours / PyTriton"], rows)  # fmt: skip
        slo = [("ours-batch", "ours (batching on)"), ("ours-nobatch", "ours (batching off)"), ("pytriton", "PyTriton"),
               ("echo-aio", "echo grpc.aio"), ("echo-sync", "echo threaded")]  # fmt: skip
        out += [
            "",
            f"Throughput at p99 \u2264 {stats.SLO_P99_MS:.0f} ms (best concurrency meeting it, no errors):",
            "",
        ]
        out += [f"- {label}: {_describe(_best(doc, 'inference', key))}" for key, label in slo]
        out.append("")
    e2e = doc.get("suites", {}).get("e2e")
    peers = doc.get("suites", {}).get("peers")
    if (e2e and e2e.get("points")) or (peers and peers.get("points")):
        rows = []
        for c in sorted({(p.get("params") or {}).get("concurrency") for p in [*points(doc, "e2e"), *points(doc, "peers")]} - {None}):  # fmt: skip
            cells = {k: stats.at_param(points(doc, "e2e", k), concurrency=c)
                     for k in ("e2e-grpc", "e2e-json", "e2e-grpc-node", "direct-grpc-node", "envoy-echo-grpc", "envoy-echo-json", "pytriton-redis", "litserve-redis")}  # fmt: skip
            cells.update({k: stats.at_param(points(doc, "peers", k), concurrency=c)
                          for k in ("ray-redis", "ray-direct-redis", "bentoml-redis")})  # fmt: skip
            rows.append([str(c)] + [f"{_f(_med(p, 'rps'), 0)} / {_f(_med(p, 'p99_ms'))}" for p in cells.values()] + [
                _x(stats.ratio(_med(cells["e2e-grpc"], "rps"), _med(cells["envoy-echo-grpc"], "rps"))),
                _x(stats.ratio(_med(cells["e2e-grpc"], "rps"), _med(cells["pytriton-redis"], "rps")))])  # fmt: skip
        out += [
            "### End to end: ours / Envoy + echo, ours / PyTriton + Redis (req/s / p99 ms, same concurrency)",
            "",
        ]
        out += _table(["c", "ours gRPC", "ours JSON", "node gRPC", "node direct gRPC", "Envoy\u2192echo gRPC", "Envoy\u2192echo JSON", "PyTriton + Redis",
                       "LitServe + Redis", "Ray Serve (proxy) + Redis", "Ray Serve (direct ingress) + Redis",
                       "BentoML + Redis", "ours / limit (gRPC)", "ours / PyTriton+Redis"], rows)  # fmt: skip
        out.append("")
    feat = doc.get("suites", {}).get("features")
    if feat and feat.get("points"):
        rows = []
        for n in (1, 100):
            for c in sorted(
                {(p.get("params") or {}).get("concurrency") for p in points(doc, "features", entities=n)}
            ):
                hit = stats.at_param(points(doc, "features", "ours-hit"), entities=n, concurrency=c)
                miss = stats.at_param(points(doc, "features", "ours-miss"), entities=n, concurrency=c)
                feast = stats.at_param(points(doc, "features", "feast"), entities=n, concurrency=c)
                fcas = stats.at_param(points(doc, "features", "feast-cassandra"), entities=n, concurrency=c)
                rows.append([str(n), str(c), _f(_med(hit, "rps"), 0), _f(_med(hit, "p99_ms")), _f(_med(miss, "rps"), 0),
                             _f(_med(miss, "p99_ms")), _f(_med(feast, "rps"), 0), _f(_med(feast, "p99_ms")),
                             _f(_med(fcas, "rps"), 0), _f(_med(fcas, "p99_ms")),
                             _x(stats.ratio(_med(hit, "rps"), _med(feast, "rps"))),
                             _x(stats.ratio(_med(miss, "rps"), _med(fcas, "rps")))])  # fmt: skip
        out += ["### Features: ours / Feast (same concurrency)", ""]
        out += _table(["entities", "c", "hit req/s", "hit p99 ms", "miss req/s", "miss p99 ms", "Feast req/s",
                       "Feast p99 ms", "Feast (Cassandra) req/s", "Feast (Cassandra) p99 ms", "hit / Feast",
                       "miss / Feast (Cassandra)"], rows)  # fmt: skip
        out.append("")
    out += latency_target_section(doc) + failover_section(doc)
    return out


def _counts(counts: Mapping[str, Any] | None) -> str:
    """`{"UNAVAILABLE": 3, "DEADLINE_EXCEEDED": 1}` as "DEADLINE_EXCEEDED 1, UNAVAILABLE 3" ("0" when empty)."""
    cells = [f"{k} {_f(v, 0)}" for k, v in sorted((counts or {}).items()) if v]
    return ", ".join(cells) or "0"


def latency_target_rows(doc: Doc) -> list[list[str]]:
    """Per concurrency: the inference batcher with the fixed delay vs with the p99 target (suite `slo`)."""
    suite = doc.get("suites", {}).get("slo") or {}
    target_ms = (suite.get("extra") or {}).get("target_p99_ms")
    settled = (suite.get("extra") or {}).get("settled (after each point)") or {}
    rows = []
    concs = {(p.get("params") or {}).get("concurrency") for p in points(doc, "slo")} - {None}
    for c in sorted(concs):
        fixed = stats.at_param(points(doc, "slo", "slo-fixed"), concurrency=c)
        target = stats.at_param(points(doc, "slo", "slo-target"), concurrency=c)
        p99 = _med(target, "p99_ms")
        held = (
            "\u2013" if p99 is None or target_ms is None else ("yes" if p99 <= float(target_ms) else "**no**")
        )
        gauges = settled.get(f"target c={c}") or {}
        rows.append([str(c), _f(_med(fixed, "rps"), 0), _f(_med(fixed, "p99_ms")), _f(_med(target, "rps"), 0),
                     _f(p99), held, _x(stats.ratio(_med(target, "rps"), _med(fixed, "rps"))),
                     _f(gauges.get("delay_us"), 0), _f(gauges.get("batch_cap"), 0)])  # fmt: skip
    return rows


def latency_target_section(doc: Doc) -> list[str]:
    rows = latency_target_rows(doc)
    if not rows:
        return []
    target_ms = ((doc.get("suites", {}).get("slo") or {}).get("extra") or {}).get("target_p99_ms")
    out = [
        f"### Latency target: inference batcher, fixed 1 ms delay vs p99 target {_f(target_ms, 0)} ms (same run)",
        "",
    ]
    out += _table(["c", "fixed req/s", "fixed p99 ms", "target req/s", "target p99 ms", f"p99 {LE} target",
                   "target / fixed req/s", "settled delay \u00b5s", "settled batch cap"], rows)  # fmt: skip
    return [*out, ""]


def failover_rows(doc: Doc) -> list[list[str]]:
    """Per phase of the `failover` suite: throughput, latency, what failed, which pool served, failovers."""
    pts = points(doc, "failover")
    healthy = stats.at_param(pts, phase="healthy")
    rows = []
    for p in pts:
        totals = p.get("totals") or {}
        share = totals.get("served_share") or {}
        served = (
            ", ".join(f"{pool} {v:.1%}" for pool, v in sorted(share.items(), key=lambda kv: -kv[1]))
            or "\u2013"
        )
        rows.append([str((p.get("params") or {}).get("phase")), _f(_med(p, "rps"), 0), _f(_med(p, "p50_ms")),
                     _f(_med(p, "p99_ms")), _f(totals.get("calls"), 0), _f(totals.get("ok"), 0),
                     _counts(totals.get("failed_by_code")), served, _counts(totals.get("failovers")),
                     _x(stats.ratio(_med(p, "rps"), _med(healthy, "rps")))])  # fmt: skip
    return rows


def failover_section(doc: Doc) -> list[str]:
    rows = failover_rows(doc)
    if not rows:
        return []
    out = ["### Failover: Predict via the gateway, gpu pool preferred, cpu pool next (same run)", ""]
    out += _table(["phase", "req/s", "p50 ms", "p99 ms", "calls", "OK", "failed by code", "served by",
                   "failovers by reason", "req/s / healthy"], rows)  # fmt: skip
    return [*out, ""]


CAVEATS = (
    "Closed-loop load (a client sends its next request when the previous one returns): latencies are not "
    "corrected for coordinated omission; compare systems at the same concurrency or at the p99 objective.",
    "h2load sends one fixed request per point (one row; user 4242; one fixed set of 100 users): the model and "
    "a Redis MGET cost the same for any row or key, and ghz (64 rows round-robin) and wrk (random ids) points "
    "cross-check it. Our feature-miss rows re-read the same Cassandra partitions (hot in Cassandra's caches).",
    "Feast is measured over its HTTP/JSON server (`feast serve`, the documented deployment; it also has a gRPC "
    "type) while ours is gRPC: part of the gap is JSON. Feast on Redis is the peer of our cache hit, Feast on "
    "Cassandra (its own keyspace in the same Cassandra, measured after ours) the peer of our miss path.",
    "The peers (LitServe in the e2e suite, Ray Serve and BentoML in the peers suite, set up as peers.md records) "
    "run without Envoy, authentication, rate limiting or a log record; ours does all of that. Ray Serve's "
    "direct-ingress row (RAY_SERVE_THROUGHPUT_OPTIMIZED=1) bypasses its proxy; BentoML's batchable api takes a "
    "one-element batch per request.",
    "Servers on one core share it with their own helpers (Redis; for ours also Envoy and the control plane); "
    "in the e2e suite Kafka and Cassandra, which the peers do not have, run on the load generator's core; "
    "the logging and scaling rows are unpinned and share both cores with the load generator.",
    "Our services run without tracing (no OTLP endpoint), Envoy without access log or tracing.",
)


def render_markdown(doc: Doc, plots: Sequence[str] = ()) -> str:
    run, machine, method = doc.get("run", {}), doc.get("machine", {}), doc.get("method", {})
    lines = [
        f"# InferGrid benchmarks — {run.get('id', '?')}{' (quick)' if run.get('quick') else ''}",
        "",
        f"Machine: {machine.get('cpus')} CPUs ({machine.get('cpu_model')}), {machine.get('memory_gib')} GiB, "
        f"kernel {machine.get('kernel')}, Python {machine.get('python')}. Load average (1/5/15 min) at start "
        f"{machine.get('load_average_at_start')}, at end {machine.get('load_average_at_end')}. "
        f"Commit {machine.get('git_commit')} ({machine.get('git_dirty_paths')} paths modified in the work tree).",
        "",
        f"Method: closed loop; each point = {method.get('warmup_s')} s warm-up (discarded) + {method.get('reps')} \u00d7 "
        f"{method.get('rep_s')} s measured repetitions, the table shows their medians; latency percentiles are exact "
        f"(per-request latencies from h2load's log and ghz's details, wrk's histogram). Servers (and the Redis/Cassandra they use) pinned to "
        f"CPU {method.get('server_cpus')}, load generators to CPU {method.get('loadgen_cpus')}, except where a suite "
        f"says otherwise. Errors = non-OK responses (requests in flight when a run's time ends are not counted). "
        f"CPU columns are cores used (1.00 = one core busy). Spread = (max \u2212 min) / median of req/s over the repetitions; "
        f"load = the machine's 1-minute load average when the point started (2 cores: above ~2, other work competed).",
        "",
        "## Targets (issue 9; recorded, not asserted)",
        "",
    ]  # fmt: skip
    lines += _table(["target", "measured", "verdict"], targets(doc))
    lines += ["", "## Ratios that matter", ""]
    lines += ratios(doc)
    lines += ["## Caveats", ""] + [f"- {c}" for c in CAVEATS] + [""]
    analysis = doc.get("analysis")
    if analysis:
        lines += ["## Where we lose, and why", "", analysis.strip(), ""]
    for name, suite in (doc.get("suites") or {}).items():
        lines += [f"## Suite `{name}` — {suite.get('status')} ({suite.get('seconds', 0):.0f} s)", ""]
        if suite.get("note"):
            lines += [f"> {suite['note']}", ""]
        pts = suite.get("points") or []
        if pts:
            lines += _table(POINT_HEADER, point_rows(pts))
            lines.append("")
        breakdown = []
        for p in pts:
            reps = [r["cpu_by_process"] for r in p.get("reps", []) if r.get("cpu_by_process")]
            if reps and p.get("median", {}).get("rps"):
                per_req = {k: statistics.median(r.get(k, 0.0) for r in reps) for k in reps[0]}
                rps = p["median"]["rps"]
                cells = ", ".join(
                    f"{k} {v * 1e6 / rps:,.0f}"
                    for k, v in sorted(per_req.items(), key=lambda kv: -kv[1])
                    if v > 0.005
                )
                breakdown.append(
                    f"- {p['system']}, {', '.join(f'{k}={v}' for k, v in p['params'].items())}: {cells}"
                )
        if breakdown:
            lines += [
                "CPU per request by process (\u00b5s of CPU per answered request, median over repetitions):",
                "",
            ]
            lines += [*breakdown, ""]
        for p in pts:
            if p.get("producer"):
                prod = p["producer"]
                lines += [
                    "Producer (median over repetitions): "
                    + ", ".join(f"{k} {_f(v)}" for k, v in prod.items()),
                    "",
                ]
            if p.get("pipeline_cpu_us_per_record"):
                cpu = p["pipeline_cpu_us_per_record"]
                lines += [f"CPU per record by process, `{p.get('key')}` (\u00b5s, median over repetitions): "
                          + ", ".join(f"{k} {_f(v, 1)}" for k, v in cpu.items()), ""]  # fmt: skip
        extra = {k: v for k, v in (suite.get("extra") or {}).items()}
        if extra:
            lines += ["Details: " + "; ".join(f"{k}: {v}" for k, v in extra.items()), ""]
        for plot in plots:
            if plot.startswith(name):
                lines += [f"![{plot}]({plot})", ""]
    versions = doc.get("versions")
    if versions:
        lines += ["## Versions", ""] + [f"- {k}: {v}" for k, v in versions.items()] + [""]
    return "\n".join(lines) + "\n"


def render_plots(doc: Doc, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made: list[str] = []

    def series(suite: str, **params: Any) -> dict[str, list[tuple[float, Mapping[str, Any]]]]:
        by: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
        for p in points(doc, suite, **params):
            c = (p.get("params") or {}).get("concurrency")
            if c is None or "-pa-" in p.get("key", ""):
                continue
            by.setdefault(p["system"], []).append((float(c), p))
        return {k: sorted(v, key=lambda t: t[0]) for k, v in by.items()}

    def plot(name: str, title: str, data: dict[str, list[tuple[float, Mapping[str, Any]]]], scale: float = 1.0,
             ylabel: str = "requests/s") -> None:  # fmt: skip
        if not data:
            return
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for system, pts in data.items():
            xs = [c for c, _ in pts]
            ax1.plot(xs, [(_med(p, "rps") or 0) * scale for _, p in pts], marker="o", label=system)
            ax2.plot(xs, [_med(p, "p99_ms") or float("nan") for _, p in pts], marker="o", label=system)
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (requests in flight)")
            ax.grid(True, alpha=0.3)
        ax1.set_ylabel(ylabel)
        ax1.set_title("throughput")
        ax2.set_yscale("log")
        ax2.set_ylabel("p99 latency, ms (log)")
        ax2.axhline(stats.SLO_P99_MS, color="grey", linestyle="--", linewidth=1)
        ax2.set_title("p99 latency (dashed: 25 ms objective)")
        ax1.legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(out / name, dpi=64)
        plt.close(fig)
        made.append(name)

    plot("inference.png", "Inference: single-row ModelInfer, server on 1 core", series("inference"))
    plot(
        "e2e.png",
        "End to end: Predict through Envoy vs Envoy + echo vs PyTriton + Redis (server on 1 core)",
        series("e2e"),
    )
    plot("scaling.png", "Scaling: inference service, 1 vs 2 worker processes (unpinned)", series("scaling"))
    plot("features-1.png", "Features: 1 entity \u00d7 32 features", series("features", entities=1))
    plot("features-100.png", "Features: 100 entities \u00d7 32 features (entity rows/s)", series("features", entities=100),
         scale=100, ylabel="entity rows/s")  # fmt: skip
    return made


def render(doc: Doc, out: Path) -> None:
    analysis_file = out / "analysis.md"
    if analysis_file.exists():
        doc = {**doc, "analysis": analysis_file.read_text()}
    plots = render_plots(doc, out)
    (out / "report.md").write_text(render_markdown(doc, plots))
