"""Helpers of the deploy tests: render overlays, validate objects, read what the manifests configure."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from deploy.k8s import kustomize
from libs.config import load_config

K8S_DIR = kustomize.K8S_DIR
# Every overlay under deploy/k8s/overlays is rendered and validated.
OVERLAYS = tuple(
    sorted(p.name for p in (K8S_DIR / "overlays").iterdir() if (p / "kustomization.yaml").exists())
)
# The Kubernetes release whose schemas the objects must satisfy: the newest kubernetes-validate ships.
KUBERNETES_VERSION = kubernetes_validate.latest_version()
# Kinds of the operators' CRDs (no schema in kubernetes-validate): their key fields are checked by rules.
CRD_KINDS = {
    ("k8ssandra.io/v1alpha1", "K8ssandraCluster"),
    ("kafka.strimzi.io/v1beta2", "Kafka"),
    ("kafka.strimzi.io/v1beta2", "KafkaNodePool"),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
    ("kafka.strimzi.io/v1beta2", "KafkaUser"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
}
# The Python services deployed from services/<name> (Envoy is the other Deployment).
PYTHON_SERVICES = ("gateway", "features", "inference", "logging", "controlplane", "edge")


@dataclass(frozen=True)
class Worker:
    """A workload that runs another module of a Python service's code: that service's image and config.

    It serves no gRPC, only its metrics port (its probes ask it), and has no Service.
    """

    service: str
    module: str
    # The variable (after the service's prefix) that sets its metrics port, and that port in its config.
    metrics_port_variable: str
    metrics_port: Callable[[Any], int]
    # How long it takes to stop after SIGTERM, from its config (the rollout rules check it against the
    # pod's terminationGracePeriodSeconds).
    drain_seconds: Callable[[Any], float]


# The Kafka consumers deployed beside the services (their HPAs scale on consumer lag).
WORKERS = {
    # services/features/ingest_stream.py on SIGTERM: the poll in hand returns, the batch is written (each
    # Cassandra call its attempts' timeouts), the offsets committed, dead letters flushed (at most 10 s).
    "features-ingest": Worker(
        service="features",
        module="services.features.ingest_stream",
        metrics_port_variable="STREAM_METRICS_PORT",
        metrics_port=lambda c: int(c.stream.stream_metrics_port),
        drain_seconds=lambda c: (
            c.stream.stream_poll_timeout_s
            + c.store.store_max_attempts * c.cassandra.cassandra_request_timeout_s
            + 10.0
        ),
    ),
}
ADAPTER_VALUES = K8S_DIR / "monitoring" / "prometheus-adapter-values.yaml"
NAME_LABEL = "app.kubernetes.io/name"
PART_OF_LABEL = "app.kubernetes.io/part-of"

Obj = dict[str, Any]


def render(overlay: str) -> list[Obj]:
    """The overlay's objects, as kustomize renders them."""
    text = kustomize.build(kustomize.overlay_dir(overlay, K8S_DIR))
    return [doc for doc in yaml.safe_load_all(text) if doc]


def validate(obj: Obj) -> list[str]:
    """Schema errors of one object (strict: unknown fields are errors); [] when it is valid."""
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if (obj.get("apiVersion"), obj.get("kind")) in CRD_KINDS:
        return []
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{where}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {exc}"]
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        return [f"{where}: {path}: {exc.message}"]
    return []


def validate_all(objs: Iterable[Obj]) -> list[str]:
    """Schema errors of every object."""
    return [error for obj in objs for error in validate(obj)]


@dataclass
class Rendered:
    """One overlay's objects with look-ups by kind and name."""

    overlay: str
    objects: list[Obj]

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert found, f"{self.overlay}: no {kind} named {name}"
        return found[0]

    def find(self, kind: str, name: str) -> Obj | None:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        return found[0] if found else None

    def workloads(self) -> list[Obj]:
        """Every Deployment and StatefulSet."""
        return self.of_kind("Deployment") + self.of_kind("StatefulSet")

    def app_workloads(self) -> list[Obj]:
        """InferGrid's own workloads (not the backends'): the services and Envoy."""
        return [w for w in self.workloads() if w["metadata"]["labels"].get(PART_OF_LABEL) == "infergrid"]

    def workload(self, name: str) -> Obj:
        """The Deployment or StatefulSet named `name` (the gateway is a StatefulSet for its spool)."""
        found = [w for w in self.workloads() if w["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.overlay}: {len(found)} workloads named {name}"
        return found[0]


def container(deployment: Obj) -> Obj:
    """The first (InferGrid's only) container of a Deployment or StatefulSet."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return typing.cast(Obj, containers[0])


def container_env(rendered: Rendered, deployment: Obj) -> dict[str, str]:
    """The environment the container gets: envFrom ConfigMaps (with their prefixes), then env.

    Values from Secrets become "<secret name/key>" and field references "<fieldPath>"; $(VAR)
    references are expanded as the kubelet does.
    """
    c = container(deployment)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref, f"{deployment['metadata']['name']}: only ConfigMaps may feed envFrom (Secrets are files)"
        data = rendered.get("ConfigMap", ref["name"]).get("data", {})
        for key, value in data.items():
            env[source.get("prefix", "") + key] = value
    for item in c.get("env", []):
        if "value" in item:
            value = item["value"]
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
            env[item["name"]] = value
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = f"<{ref['name']}/{ref['key']}>"
        else:
            env[item["name"]] = f"<{next(iter(item['valueFrom'].values()))}>"
    return env


def mounts(deployment: Obj) -> dict[str, Obj]:
    """mountPath -> the volume mounted there.

    A StatefulSet's claim template appears as `{"name": ..., "volumeClaimTemplate": <the template>}`.
    """
    spec = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for template in deployment["spec"].get("volumeClaimTemplates", []):
        name = template["metadata"]["name"]
        volumes.setdefault(name, {"name": name, "volumeClaimTemplate": template})
    return {m["mountPath"]: volumes[m["name"]] for m in container(deployment).get("volumeMounts", [])}


def container_port(deployment: Obj, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container(deployment).get("ports", [])}
    assert name in ports, f"{deployment['metadata']['name']}: no container port named {name}"
    return int(ports[name])


@dataclass(frozen=True)
class ServiceCode:
    """What the code of services/<name> says: its config class, prefix and defaults."""

    name: str
    prefix: str
    config_class: type

    @property
    def defaults(self) -> Any:
        return self.config_class()


def service_code(name: str) -> ServiceCode:
    """Imports services/<name>/config.py and finds its top-level config class (the one with `server`)."""
    module = importlib.import_module(f"services.{name}.config")
    classes = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and obj.__module__ == module.__name__
        and {"server", "telemetry"} <= {f.name for f in dataclasses.fields(obj)}
    ]
    assert len(classes) == 1, f"services.{name}.config: expected one top-level config class, got {classes}"
    return ServiceCode(name, module.ENV_PREFIX, classes[0])


def known_variables(cls: type, prefix: str) -> set[str]:
    """Every variable `libs.config.load_config(cls, env, prefix)` reads (and `<VAR>_FILE` of secrets)."""
    names: set[str] = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            names |= known_variables(typing.cast(type, kind), prefix)
            continue
        variable = field.metadata.get("env", f"{prefix}{field.name.upper()}")
        names.add(variable)
        if field.metadata.get("secret"):
            names.add(f"{variable}_FILE")
    return names


def secret_file_variables(cls: type, prefix: str) -> set[str]:
    """The `<VAR>_FILE` variables of the secret fields (the files Kubernetes mounts from Secrets)."""
    names: set[str] = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            names |= secret_file_variables(typing.cast(type, kind), prefix)
        elif field.metadata.get("secret"):
            names.add(f"{field.metadata.get('env', f'{prefix}{field.name.upper()}')}_FILE")
    return names


def loaded_config(rendered: Rendered, name: str) -> tuple[Any, dict[str, str], dict[str, str]]:
    """The service's config class filled from its workload's environment (Secret files left out).

    A worker (WORKERS) loads the config class of the service whose code it runs.

    Returns the config, the whole environment, and the `<VAR>_FILE` variables of secrets with their paths.
    """
    code = service_code(WORKERS[name].service if name in WORKERS else name)
    env = container_env(rendered, rendered.workload(name))
    secret_files = secret_file_variables(code.config_class, code.prefix)
    files = {k: v for k, v in env.items() if k in secret_files}
    plain = {k: v for k, v in env.items() if k not in secret_files}
    return load_config(code.config_class, plain, code.prefix), env, files


def host_port(target: str) -> tuple[str, int]:
    """("features-headless", 50052) from "dns:///features-headless:50052" or "host:port"."""
    address = target.removeprefix("dns:///").removeprefix("dns:")
    host, _, port = address.rpartition(":")
    return host, int(port)


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def adapter_rules() -> dict[str, dict]:
    """The adapter's custom rules by the metric name the HPAs use (`name.as`)."""
    rules = read_yaml(ADAPTER_VALUES)["rules"]["custom"]
    return {rule["name"]["as"]: rule for rule in rules}
