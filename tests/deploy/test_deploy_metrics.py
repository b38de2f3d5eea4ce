"""The HPAs' custom metrics exist: each adapter rule's series is exported by the real, running service.

For every service whose HPA scales on a custom metric, the test starts `python -m services.<name>`
(with the real backends it needs from the stack fixtures: Kafka and Cassandra for logging, Redis and
Cassandra for features, a demo model repository for inference, a real inference process for the
gateway), makes one call of the service's API so that the per-request series exist, scrapes its /metrics port, and looks for the series named in the rule's
`seriesQuery` with the label values the rule filters on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from libs.testing import REPO_ROOT, stop_process
from tests.deploy.k8s_objects import PYTHON_SERVICES, WORKERS, Rendered, adapter_rules
from tests.deploy.service_processes import (
    EXERCISES,
    STARTERS,
    Running,
    _call_any_unary_method,
    _series,
)

pytestmark = pytest.mark.integration


def _custom_metrics(overlays: dict[str, Rendered], service: str) -> set[str]:
    names = set()
    for rendered in overlays.values():
        for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
            if hpa["spec"]["scaleTargetRef"]["name"] == service:
                names |= {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    return names


@pytest.fixture
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[str], Running]]:
    started: list[Running] = []

    def start(name: str) -> Running:
        service = Running(name, STARTERS[name](request, tmp_path))
        started.append(service)
        return service

    yield start
    for service in started:
        stop_process(service.proc)


@pytest.mark.parametrize("name", PYTHON_SERVICES + tuple(WORKERS))
def test_hpa_metrics_are_exported_by_the_running_service(
    name: str, overlays: dict[str, Rendered], running: Callable[[str], Running]
) -> None:
    metrics = _custom_metrics(overlays, name)
    if not metrics:
        pytest.skip(f"{name}: its HPA scales on CPU only")
    code = WORKERS[name].service if name in WORKERS else name
    assert (REPO_ROOT / "services" / code / "__main__.py").exists(), f"services/{code} cannot be started"
    assert name in STARTERS, f"tests/deploy does not know how to start {name}: add it to STARTERS"
    rules = adapter_rules()
    wanted = {metric: _series(rules[metric]["seriesQuery"]) for metric in metrics}
    __import__(f"services.{code}.server", fromlist=["SERVICE_NAME"])  # registers its protos
    service = running(name)
    try:
        service.wait_ready()
        if name in EXERCISES:
            asyncio.run(EXERCISES[name](service.port))
        for _series_name, labels in wanted.values():
            if "grpc_service" in labels:
                asyncio.run(_call_any_unary_method(service.port, labels["grpc_service"]))
        deadline = time.monotonic() + 30
        missing: dict[str, tuple[str, dict[str, str]]] = dict(wanted)
        while missing and time.monotonic() < deadline:
            samples = service.scrape()
            for metric, (series, labels) in list(missing.items()):
                if any(labels.items() <= found.items() for found in samples.get(series, [])):
                    del missing[metric]
            time.sleep(0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{service.output()}") from None
    assert not missing, (
        f"{name} does not export {missing} (HPA metric -> adapter series and labels); it exports "
        f"{sorted(s for s in samples if s.startswith(('infergrid_', 'grpc_')))}"
    )
