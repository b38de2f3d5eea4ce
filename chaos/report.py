"""The chaos report: `results.json`, a Markdown table per run and a timeline plot per scenario."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def render_markdown(doc: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """The report: the run's settings and machine, one summary table, then each scenario's details."""
    machine, settings = doc["machine"], doc["settings"]
    lines = [
        "# Chaos report",
        "",
        f"Run {machine['time_utc']} on commit {machine['git_commit']}, {machine['cpus']} cores, "
        f"load average at start {machine['load_average_at_start']}. Suite: {doc['suite']}.",
        f"Load through Envoy: {settings['rate']:.0f} requests/s, {settings['http_share']:.0%} HTTP/JSON and the "
        "rest gRPC, every request with a unique id, open loop (a fault shows up as errors, not as less load). "
        "Every answered-OK request is then looked up in Cassandra and in the Parquet lake.",
        "",
        "| scenario | sent | OK | failed (by code) | p50 / p99 ms (during fault) | in Cassandra | in lake "
        "| lost | duplicated (stored twice: lake files, executed twice) | targets |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["scenarios"]:
        sinks = r["sinks"]
        failed = sum(r["failed_by_code"].values())
        codes = ", ".join(f"{k} {v}" for k, v in r["failed_by_code"].items())
        share = f"{failed / r['sent']:.2%}" if r["sent"] else "—"
        verdicts = "; ".join(f"{k}: {_verdict(v)}" for k, v in r["verdicts"].items())
        lines.append(
            f"| {r['name']} | {r['sent']} | {r['ok']} | {failed} ({share}){': ' + codes if codes else ''} "
            f"| {_fmt(r['p50_ms'])} / {_fmt(r['p99_ms'])} ({_fmt(r['fault_p50_ms'])} / {_fmt(r['fault_p99_ms'])}) "
            f"| {_fmt(sinks.get('in_cassandra'))} | {_fmt(sinks.get('in_lake'))} | {_fmt(sinks.get('lost'))} "
            f"| {_fmt(sinks.get('duplicated'))} ({_fmt(sinks.get('duplicated_lake_files'))}, "
            f"{_fmt(sinks.get('executed_twice'))}) | {verdicts} |"
        )
    lines += [
        "",
        "Lost: answered-OK ids missing from Cassandra or the lake after the pipeline caught up. Duplicated: ids "
        "a reader sees more than once: GetRecord's table, QueryRecords' by-model table as the store reads it, "
        "and the lake as `read_table` reads it (one row per tenant and request id). In brackets, ids stored "
        "twice that those reads fold into one: rows in two lake files (a record the producer re-sent after a "
        "crash) and ids executed twice (a request Envoy retried after its per-try timeout while the first "
        "attempt still ran: two records at two request times, of which the later is the record).",
        "",
    ]
    for r in doc["scenarios"]:
        lines += [f"## {r['name']}", "", r["description"] + ".", ""]
        if r.get("error"):
            lines += [f"The scenario did not complete: `{r['error']}`", ""]
        if r["name"] in plots:
            lines += [f"![{r['name']}]({plots[r['name']]})", ""]
        lines += ["Timeline (seconds since the load started):", ""]
        lines += [f"- {t:.1f} s: {label}" for t, label in r["events"]]
        lines += [f"- {note}" for note in r["notes"]]
        sinks = r["sinks"]
        if sinks:
            lines += [
                f"- sinks caught up after {_fmt(sinks.get('waited_s'))} s of waiting; Cassandra lost "
                f"{sinks.get('lost_cassandra')}, lake lost {sinks.get('lost_lake')}",
            ]
        if r["skipped"]:
            lines.append(f"- {r['skipped']} request(s) not sent: too many in flight")
        lines.append("")
    return "\n".join(lines)


def render_plots(doc: Mapping[str, Any], out: Path) -> dict[str, str]:
    """One PNG per scenario: OK and failed requests per second over time, the fault shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}
    for r in doc["scenarios"]:
        points: Sequence[Mapping[str, float]] = r["timeline"]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(8, 2.6))
        ts = [p["t"] for p in points]
        ax.plot(ts, [p["ok"] for p in points], label="OK/s", color="tab:blue")
        ax.bar(ts, [p["failed"] for p in points], width=1.0, label="failed/s", color="tab:red", alpha=0.8)
        for start, end in r["fault_windows"]:
            ax.axvspan(start, end, color="orange", alpha=0.2, label="fault")
        ax.set_xlabel("seconds since the load started")
        ax.set_ylabel("requests/s")
        ax.set_title(r["name"], fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        name = f"{r['name']}.png"
        fig.savefig(out / name, dpi=60)
        plt.close(fig)
        made[r["name"]] = name
    return made


def write(doc: Mapping[str, Any], out: Path, *, latest: Path | None = None) -> Path:
    """Writes results.json, the plots and report.md into `out`, and copies them to `latest` when given."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    plots = render_plots(doc, out)
    (out / "report.md").write_text(render_markdown(doc, plots))
    if latest is not None:
        shutil.rmtree(latest, ignore_errors=True)
        shutil.copytree(out, latest)
    return out / "report.md"
