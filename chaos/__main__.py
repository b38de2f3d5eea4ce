"""CLI: `python -m chaos [--quick] [--only NAME,...]` (`make chaos`): faults under load against the cluster profile.

It uses the cluster-profile stack that `make up PROFILE=cluster` started when one is running (and leaves it
running), otherwise starts one and stops it at the end. Results go to chaos/results/<timestamp>/ and
chaos/results/latest/. Exit status 1 when any answered-OK record was lost or duplicated, or a scenario could
not complete; the failure budgets are reported, met or not.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.machine import machine_info
from chaos.cluster import ClusterHandle
from chaos.report import RESULTS, write
from chaos.runner import RunSettings, ScenarioResult, run_scenario
from chaos.scenarios import Scenario, all_scenarios


def say(message: str) -> None:
    print(f"[chaos] {message}", flush=True)


def choose(scenarios: Sequence[Scenario], *, quick: bool, only: str) -> list[Scenario]:
    """The scenarios to run: `only` names them (comma-separated), else the quick ones or all."""
    if only:
        wanted = [n.strip() for n in only.split(",") if n.strip()]
        known = {s.name: s for s in scenarios}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise SystemExit(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return [known[n] for n in wanted]
    return [s for s in scenarios if s.quick] if quick else list(scenarios)


async def run_suite(
    cluster: ClusterHandle, api_key: str, scenarios: Sequence[Scenario], settings: RunSettings
) -> list[ScenarioResult]:
    """Runs the scenarios in order; each leaves the cluster as it found it (the supervisor restarts replicas)."""
    results = []
    for scenario in scenarios:
        results.append(await run_scenario(cluster, scenario, api_key, settings, say))
    return results


def document(
    results: Sequence[ScenarioResult], settings: RunSettings, suite: str, machine: dict[str, Any]
) -> dict[str, Any]:
    """The results.json document."""
    return {
        "suite": suite,
        "machine": machine,
        "settings": dataclasses.asdict(settings),
        "scenarios": [{**dataclasses.asdict(r), "verdicts": r.verdicts()} for r in results],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the short suite (a few scenarios, shorter faults)"
    )
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument(
        "--rate",
        type=float,
        default=RunSettings.rate,
        help=f"requests per second (default {RunSettings.rate:g})",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default chaos/results/<time>)"
    )
    args = parser.parse_args(argv)

    from chaos.session import cluster_session

    node_down_s, outage_s = (20.0, 20.0) if args.quick else (60.0, 30.0)
    scenarios = choose(all_scenarios(node_down_s, outage_s), quick=args.quick, only=args.only)
    if args.list:
        for s in all_scenarios(node_down_s, outage_s):
            print(f"{s.name:32} {'quick ' if s.quick else '      '}{s.description}")
        return 0
    settings = RunSettings(rate=args.rate)
    machine = machine_info()
    with cluster_session(os.environ, say) as (cluster, api_key):
        results = asyncio.run(run_suite(cluster, api_key, scenarios, settings))
    doc = document(
        results, settings, "quick" if args.quick else ("only " + args.only if args.only else "full"), machine
    )
    out = args.out or RESULTS / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    say(f"report: {write(doc, out, latest=RESULTS / 'latest' if args.out is None else None)}")
    broken = [
        r.name for r in results if r.error or r.sinks.get("lost", 1) != 0 or r.sinks.get("duplicated", 1) != 0
    ]
    if broken:
        say(f"records lost or duplicated, or scenario incomplete, in: {', '.join(broken)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
