"""Prometheus: Debian's `prometheus` package, run as our own process on loopback with our own config.

What it scrapes comes from Prometheus file service discovery (`file_sd_configs`): `<state>/prometheus/
targets/*.json`, written by the stack (the single profile's fixed components, when Prometheus starts) and
by the cluster profile's supervisor (every replica's metrics port, as replicas come and go). Each target
carries `namespace` and `pod` labels like a PodMonitor's, so the recording rules rendered from the
Kubernetes prometheus-adapter configuration (deploy/k8s/monitoring/prometheus-adapter-values.yaml, the
one source of the HPAs' metrics) work here unchanged. Alert rules: deploy/k8s/monitoring/alerts.rules.yaml.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from stack.apt import ensure_command
from stack.component import Component
from stack.config import StackConfig, replace_if_changed
from stack.probes import http_get
from stack.progress import Progress

MONITORING_DIR = Path(__file__).resolve().parent.parent / "deploy" / "k8s" / "monitoring"
ADAPTER_VALUES = MONITORING_DIR / "prometheus-adapter-values.yaml"
ALERT_RULES = MONITORING_DIR / "alerts.rules.yaml"
#: The `namespace` label of every local target (Kubernetes: the pod's namespace).
LOCAL_NAMESPACE = "infergrid-local"
SCRAPE_INTERVAL_S = 2
POD_MATCHERS = 'namespace!="",pod!=""'


def recorded_name(hpa_metric: str) -> str:
    """The recorded series of an HPA metric: `namespace_pod:<metric>`."""
    return f"namespace_pod:{hpa_metric}"


def recording_rules(values_path: Path = ADAPTER_VALUES) -> dict[str, Any]:
    """The adapter's custom-metric rules as one Prometheus recording-rule group (same names, same queries).

    Each rule's `metricsQuery` template is rendered the way the adapter renders it for "every pod": the
    series from `seriesQuery`, `namespace!="",pod!=""` for `<<.LabelMatchers>>` (the adapter's resource
    matchers) and `namespace, pod` for `<<.GroupBy>>`. The recorded name is the HPA's metric name
    (`name.as`) with the aggregation level in front, `namespace_pod:<name>` (Prometheus' naming rule for
    recorded series; a recorded name equal to its input series would feed on itself).
    """
    values = yaml.safe_load(values_path.read_text())
    rules = []
    for rule in values["rules"]["custom"]:
        series = rule["seriesQuery"].split("{", 1)[0].strip()
        expr = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", POD_MATCHERS)
            .replace("<<.GroupBy>>", "namespace, pod")
        )
        rules.append({"record": recorded_name(rule["name"]["as"]), "expr": expr})
    return {"groups": [{"name": "infergrid-hpa-metrics", "rules": rules}]}


def targets_dir(config: StackConfig) -> Path:
    """Where the file_sd target files live."""
    return config.state_dir / "prometheus" / "targets"


def write_targets(config: StackConfig, group: str, targets: Iterable[tuple[str, str, str]]) -> bool:
    """Writes `<targets>/<group>.json` (file_sd format) atomically when its content changes.

    Args:
        config: The stack config.
        group: The file's name (a service, or `static`).
        targets: (pod name, service, "host:port") for each metrics endpoint.

    Returns:
        True when the file was (re)written.
    """
    body = json.dumps(
        [
            {"targets": [address], "labels": {"namespace": LOCAL_NAMESPACE, "pod": pod, "service": service}}
            for pod, service, address in sorted(targets)
        ],
        indent=1,
    )
    return replace_if_changed(targets_dir(config) / f"{group}.json", body)


def metrics_targets(components: Iterable[Component]) -> list[tuple[str, str, str]]:
    """(pod, service, address) for every component with a `<kind>_metrics` port."""
    found = []
    for component in components:
        for port_name, port in component.ports.items():
            if port_name.endswith("_metrics"):
                found.append((component.name, port_name.removesuffix("_metrics"), f"{component.host}:{port}"))
    return found


class Prometheus(Component):
    """A Prometheus server scraping every target file; ready when GET /-/ready answers 200."""

    kind = "prometheus"
    port_names = ("prometheus",)
    start_timeout_s = 60.0
    stop_timeout_s = 15.0

    def install(self, progress: Progress) -> None:
        """Installs Debian's prometheus package (its service is never started: policy-rc.d)."""
        if shutil.which("prometheus") is None or shutil.which("promtool") is None:
            progress.step(1, 1, "installing Debian package prometheus")
            ensure_command("prometheus", ["prometheus"], progress, self.install_log_path)

    @property
    def config_path(self) -> Path:
        """The rendered prometheus.yml."""
        return self.data_dir / "prometheus.yml"

    @property
    def recording_rules_path(self) -> Path:
        """The recording rules rendered from the adapter values."""
        return self.data_dir / "recording.rules.yml"

    def prepare(self) -> None:
        """Writes prometheus.yml, the recording rules and, in the single profile, the static targets."""
        super().prepare()
        self.recording_rules_path.write_text(yaml.safe_dump(recording_rules(), sort_keys=False))
        interval = f"{SCRAPE_INTERVAL_S}s"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(self.recording_rules_path), str(ALERT_RULES)],
            "scrape_configs": [
                {
                    "job_name": "infergrid",
                    "file_sd_configs": [
                        {"files": [str(targets_dir(self.config) / "*.json")], "refresh_interval": "2s"}
                    ],
                },
                {
                    "job_name": "envoy",
                    "metrics_path": "/stats/prometheus",
                    "static_configs": [
                        {
                            "targets": [f"{self.config.host}:{self.config.port('envoy_admin')}"],
                            "labels": {"namespace": LOCAL_NAMESPACE, "pod": "envoy", "service": "envoy"},
                        }
                    ],
                },
                {
                    "job_name": "prometheus",
                    "static_configs": [{"targets": [f"{self.host}:{self.port}"]}],
                },
            ],
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # The single-copy components; the cluster's replicas come from the supervisor (`render_targets_of`).
        from stack import cluster, registry

        singles = [c for c in registry.select(self.config, ()) if cluster.parse_replica(c.name) is None]
        write_targets(self.config, "static", metrics_targets(singles))

    def command(self) -> list[str]:
        """prometheus in the foreground on loopback, its TSDB in the state folder (kept one day)."""
        return [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            "--storage.tsdb.retention.time=1d",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    def ready(self) -> bool:
        """GET /-/ready answers 200."""
        answer = http_get(f"{self.url}/-/ready", timeout_s=2)
        return answer is not None and answer.status == 200

    @property
    def url(self) -> str:
        """Base URL of the HTTP API (`/api/v1/query?query=...`)."""
        return f"http://{self.host}:{self.port}"

    def endpoints(self) -> dict[str, str]:
        """The web UI and HTTP API."""
        return {"http api": self.url}


def render_targets_of(config: StackConfig, replicas: Mapping[str, Mapping[str, int]], host: str) -> bool:
    """The cluster's replica targets from their pid records' ports: one file per service.

    Args:
        config: The stack config.
        replicas: replica name (`gateway-2`) -> its ports.
        host: The address the replicas bind.

    Returns:
        True when a file changed.
    """
    by_service: dict[str, list[tuple[str, str, str]]] = {}
    for name, ports in replicas.items():
        service = name.rsplit("-", 1)[0]
        port = ports.get(f"{service}_metrics")
        if port:
            by_service.setdefault(service, []).append((name, service, f"{host}:{port}"))
    changed = False
    for service, targets in by_service.items():
        changed |= write_targets(config, service, targets)
    return changed
