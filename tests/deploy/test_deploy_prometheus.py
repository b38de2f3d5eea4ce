"""The HPAs' metrics through a real Prometheus: the same rules as the adapter's, answered after requests.

The recording rules that the local stack's Prometheus loads are rendered from the prometheus-adapter values
(deploy/k8s/monitoring/prometheus-adapter-values.yaml), the one source of the HPAs' custom metrics;
`promtool check rules` accepts them and the alert rules. Then the services whose HPAs scale on a custom
metric run for real (tests/deploy/service_processes.py), a real Prometheus scrapes them through file_sd target
files labelled like PodMonitor targets, and it answers a query for every HPA metric.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from libs.testing import stop_process
from stack.prometheus import ALERT_RULES, Prometheus, recorded_name, recording_rules
from tests.deploy.k8s_objects import Rendered, adapter_rules
from tests.deploy.service_processes import (
    EXERCISES,
    STARTERS,
    Running,
    _call_any_unary_method,
    _series,
    scrape_when_ready,
)


def _hpa_metrics(overlays: dict[str, Rendered]) -> dict[str, str]:
    """HPA custom metric -> the Deployment it scales, over every overlay."""
    found = {}
    for rendered in overlays.values():
        for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
            for metric in hpa["spec"]["metrics"]:
                if metric["type"] == "Pods":
                    found[metric["pods"]["metric"]["name"]] = hpa["spec"]["scaleTargetRef"]["name"]
    return found


def test_recording_rules_are_the_adapter_rules(overlays: dict[str, Rendered]) -> None:
    recorded = {rule["record"]: rule["expr"] for rule in recording_rules()["groups"][0]["rules"]}
    rules = adapter_rules()
    for metric in _hpa_metrics(overlays):
        assert recorded_name(metric) in recorded, f"no recording rule for the HPA metric {metric}"
        series, labels = _series(rules[metric]["seriesQuery"])
        expr = recorded[recorded_name(metric)]
        assert series in expr and all(f'{k}="{v}"' in expr for k, v in labels.items()), expr


def test_promtool_accepts_the_recording_and_alert_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing: the stack installs Debian's prometheus package on `make up`")
    recording = tmp_path / "recording.rules.yml"
    recording.write_text(yaml.safe_dump(recording_rules()))
    result = subprocess.run(
        [promtool, "check", "rules", str(recording), str(ALERT_RULES)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _query(prometheus: Prometheus, expr: str) -> list[dict]:
    url = f"{prometheus.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@pytest.mark.integration
def test_prometheus_answers_every_hpa_metric(
    overlays: dict[str, Rendered], prometheus: Prometheus, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    metrics = _hpa_metrics(overlays)
    services = sorted(set(metrics.values()))
    running: list[Running] = []
    try:
        for name in services:
            folder = tmp_path / name
            folder.mkdir()
            running.append(Running(name, STARTERS[name](request, folder)))
        scrape_when_ready(prometheus, running)
        rules = adapter_rules()
        missing = dict.fromkeys(metrics)
        deadline = time.monotonic() + 90
        while missing and time.monotonic() < deadline:
            for service in running:  # a few requests, so the per-request series exist and move
                if service.name in EXERCISES:
                    asyncio.run(EXERCISES[service.name](service.port))
                for metric, owner in metrics.items():
                    labels = _series(rules[metric]["seriesQuery"])[1]
                    if owner == service.name and "grpc_service" in labels:
                        asyncio.run(_call_any_unary_method(service.port, labels["grpc_service"]))
            for metric in list(missing):
                if _query(prometheus, recorded_name(metric)):
                    del missing[metric]
            time.sleep(1)
        assert not missing, (
            f"Prometheus has no {sorted(missing)}; targets: {json.dumps(_query(prometheus, 'up'))[:2000]}"
        )
    finally:
        for service in running:
            stop_process(service.proc)
