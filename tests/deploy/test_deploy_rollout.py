"""Rolling updates, persistence, endpoints and replication: the rules that keep requests and records safe.

Each rule is a function from a rendered overlay to a list of problems, run on every overlay, and each
has mutation tests: a copy of the prod overlay broken in one way must make the rule report it, so a
rule that stopped looking would fail here too.

- Rollouts: every InferGrid Deployment rolls with `maxUnavailable: 0` and a surge; the StatefulSet
  (the gateway, for its spool) replaces one pod at a time with no partition held back and is covered by a
  PodDisruptionBudget of one; every pod is `minReadySeconds` ready before it counts, has a readiness
  probe, and a `preStop` sleep that with the service's drain (DRAIN_SECONDS + GRACE_SECONDS, Envoy's
  --drain-time-s) ends before `terminationGracePeriodSeconds`.
- Persistence: the gateway's spool is on a claim per pod that outlives the pod; the logging lake on one
  ReadWriteMany claim shared by the consumers; Redis's append-only file on a claim.
- Endpoints: the platform's gateway.endpoints, the control plane's edge address and the gateway's
  features/inference targets name headless Services that exist and publish only ready pods.
- Replication (prod): Cassandra 3 nodes, RF 3, LOCAL_QUORUM reads and writes; Kafka 3 brokers,
  default RF 3, min ISR 2, every topic RF 3 / min ISR 2.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from libs.config import load_config
from libs.inference_log import InferenceLogProducer
from libs.platform import parse_platform
from tests.deploy.k8s_objects import (
    K8S_DIR,
    NAME_LABEL,
    PYTHON_SERVICES,
    WORKERS,
    Obj,
    Rendered,
    container,
    host_port,
    loaded_config,
    mounts,
    service_code,
    validate,
)

# A new pod is ready this long before it counts as available: callers' resolvers (the control plane
# re-resolves every second; Envoy health-checks every second) have found it by then.
MIN_READY_SECONDS = 5
# The preStop sleep outlasts endpoint removal: EndpointSlice → DNS answers → the control plane's 1 s
# re-resolve and EDS push, or the gateway's re-resolution of features/inference.
MIN_PRESTOP_SECONDS = 5
# Workloads of the backends (label part-of=infergrid-data), and why the rollout rules do not apply.
DATA_WORKLOADS = {
    ("StatefulSet", "redis"): "one primary (no replica: see base/data/redis.yaml); a restart is seconds "
    "of cache misses and limiter errors, its buckets come back from the AOF",
    ("StatefulSet", "redis-buckets"): "one primary, the rate-limit buckets only (see "
    "base/data/redis-buckets.yaml); while it restarts the limiters charge their local shares",
    ("Deployment", "jaeger"): "traces in memory, off the request path; Recreate avoids two stores",
}
SPOOL_DRAIN_JOB = K8S_DIR / "ops" / "gateway-spool-drain-job.yaml"

Problems = list[str]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _drain_seconds(rendered: Rendered, workload: Obj) -> float:
    """How long the process takes to go after SIGTERM: its drain and grace, Envoy's drain time."""
    name = workload["metadata"]["name"]
    if name in PYTHON_SERVICES:
        config, _, _ = loaded_config(rendered, name)
        return float(config.server.drain_seconds + config.server.grace_seconds)
    if name in WORKERS:
        config, _, _ = loaded_config(rendered, name)
        return float(WORKERS[name].drain_seconds(config))
    args = container(workload).get("args", [])
    assert "--drain-time-s" in args, f"{name}: no drain time known"
    return float(args[args.index("--drain-time-s") + 1])


# --- the rules ------------------------------------------------------------------------------------------


def rollout_problems(rendered: Rendered) -> Problems:
    """Every InferGrid workload updates without dropping a request."""
    problems: Problems = []
    pdbs = rendered.of_kind("PodDisruptionBudget")
    for w in rendered.app_workloads():
        name, spec = f"{w['kind']}/{w['metadata']['name']}", w["spec"]
        if w["kind"] == "Deployment":
            strategy = spec.get("strategy", {})
            rolling = strategy.get("rollingUpdate", {})
            if strategy.get("type") != "RollingUpdate" or str(rolling.get("maxUnavailable")) not in (
                "0",
                "0%",
            ):
                problems.append(f"{name}: maxUnavailable must be 0 (a RollingUpdate that surges first)")
            if str(rolling.get("maxSurge", "25%")) in ("0", "0%"):
                problems.append(f"{name}: maxSurge 0 with maxUnavailable 0 cannot roll")
        else:
            # A StatefulSet cannot surge: it replaces one pod at a time, which drains first. OnDelete
            # leaves the update to a human, a partition holds pods back: neither is a rollout.
            strategy = spec.get("updateStrategy", {})
            rolling = strategy.get("rollingUpdate", {})
            if strategy.get("type", "RollingUpdate") != "RollingUpdate":
                problems.append(f"{name}: updateStrategy {strategy.get('type')}, not RollingUpdate")
            if rolling.get("partition", 0) != 0:
                problems.append(f"{name}: partition {rolling['partition']} holds pods back from updates")
            if str(rolling.get("maxUnavailable", 1)) != "1":
                problems.append(f"{name}: a StatefulSet may replace only one pod at a time")
        if spec.get("minReadySeconds", 0) < MIN_READY_SECONDS:
            problems.append(f"{name}: minReadySeconds {spec.get('minReadySeconds', 0)} < {MIN_READY_SECONDS}")
        labels = spec["template"]["metadata"]["labels"]
        budgets = [p for p in pdbs if _selects(p["spec"]["selector"], labels)]
        if len(budgets) != 1 or budgets[0]["spec"].get("maxUnavailable") != 1:
            problems.append(f"{name}: needs one PodDisruptionBudget with maxUnavailable 1")
        pod = spec["template"]["spec"]
        for c in pod["containers"]:
            where = f"{name}/{c['name']}"
            if "readinessProbe" not in c:
                problems.append(f"{where}: no readinessProbe")
            sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
            if sleep is None:
                problems.append(f"{where}: no preStop sleep (the pod must outlast its endpoint removal)")
                continue
            if sleep < MIN_PRESTOP_SECONDS:
                problems.append(f"{where}: preStop sleep {sleep} s < {MIN_PRESTOP_SECONDS} s")
            drain = _drain_seconds(rendered, w)
            grace = pod.get("terminationGracePeriodSeconds", 30)
            if sleep + drain >= grace:
                problems.append(
                    f"{where}: preStop {sleep} s + drain {drain:g} s >= terminationGracePeriodSeconds {grace}"
                )
    return problems


def data_workloads_problems(rendered: Rendered) -> Problems:
    """The workloads the rollout rules skip are exactly the known backends, each with its reason."""
    ours = {(w["kind"], w["metadata"]["name"]) for w in rendered.app_workloads()}
    others = {(w["kind"], w["metadata"]["name"]) for w in rendered.workloads()} - ours
    if others != set(DATA_WORKLOADS):
        return [f"workloads outside the rollout rules {sorted(others)}, expected {sorted(DATA_WORKLOADS)}"]
    return []


def _claim_template(w: Obj, path: Path) -> Obj | None:
    volume = mounts(w).get(str(path))
    return volume.get("volumeClaimTemplate") if volume else None


def persistence_problems(rendered: Rendered) -> Problems:
    """The spool, the lake and Redis's AOF are on claims that outlive their pods."""
    problems: Problems = []
    gateway = rendered.workload("gateway")
    config, _, _ = loaded_config(rendered, "gateway")
    spool = config.inference_log.inference_log_spool_dir
    holders = [m for m in mounts(gateway) if spool == Path(m) or Path(m) in spool.parents]
    template = _claim_template(gateway, Path(holders[0])) if holders else None
    if gateway["kind"] != "StatefulSet" or template is None:
        problems.append(
            f"gateway: spool {spool} is not on a claim per pod (a StatefulSet volumeClaimTemplate)"
        )
    else:
        if template["spec"].get("accessModes") != ["ReadWriteOnce"]:
            problems.append("gateway: the spool claim is one pod's: ReadWriteOnce")
        retention = gateway["spec"].get("persistentVolumeClaimRetentionPolicy", {})
        for event in ("whenDeleted", "whenScaled"):
            if retention.get(event, "Retain") != "Retain":
                problems.append(f"gateway: {event} deletes spool claims that may hold unsent records")
    logging = rendered.workload("logging")
    lake = loaded_config(rendered, "logging")[0].pipeline.lake_dir
    volume = mounts(logging).get(str(lake), {})
    claim_name = volume.get("persistentVolumeClaim", {}).get("claimName")
    claim = rendered.find("PersistentVolumeClaim", claim_name) if claim_name else None
    if claim is None:
        problems.append(f"logging: lake {lake} is not on a PersistentVolumeClaim of the overlay")
    elif "ReadWriteMany" not in claim["spec"]["accessModes"]:
        # Consumers take over each other's partitions and must see their journals (services/logging/lake.py).
        problems.append(f"logging: lake claim {claim_name} is not ReadWriteMany (shared by the consumers)")
    redis = rendered.get("StatefulSet", "redis")
    args = container(redis)["args"]
    appendonly = args[args.index("--appendonly") + 1] if "--appendonly" in args else "no"
    if appendonly != "yes":
        problems.append("redis: no append-only file (the rate-limit buckets would restart full)")
    if _claim_template(redis, Path("/data")) is None:
        problems.append("redis: /data is not on a claim")
    return problems


def _headless_problems(rendered: Rendered, what: str, host: str, port: int, app: str) -> Problems:
    name = host.split(".", maxsplit=1)[0]
    service = rendered.find("Service", name)
    if service is None:
        return [f"{what}: no Service {name}"]
    spec = service["spec"]
    problems = []
    if spec.get("clusterIP") != "None":
        problems.append(f"{what}: Service {name} is not headless (one ClusterIP hides the pods)")
    if spec.get("publishNotReadyAddresses", False):
        problems.append(f"{what}: Service {name} publishes pods that are not ready")
    if spec.get("selector", {}).get(NAME_LABEL) != app:
        problems.append(f"{what}: Service {name} does not select {app}")
    if port not in [p["port"] for p in spec["ports"]] or port != service_code(app).defaults.server.port:
        problems.append(f"{what}: port {port} is not {app}'s gRPC port on {name}")
    return problems


def endpoint_problems(rendered: Rendered) -> Problems:
    """Whoever balances over pods resolves a headless Service of ready pods."""
    problems: Problems = []
    platform = parse_platform(rendered.get("ConfigMap", "infergrid-platform")["data"]["platform.yaml"])
    gateway = rendered.workload("gateway")
    for endpoint in platform.gateway.endpoints:
        host, port = host_port(endpoint)
        if not host.endswith(
            f".{rendered.get('Service', 'gateway')['metadata']['namespace']}.svc.cluster.local"
        ):
            problems.append(f"gateway.endpoints {endpoint}: not a fully qualified Service name")
        problems += _headless_problems(rendered, f"gateway.endpoints {endpoint}", host, port, "gateway")
        if gateway["kind"] == "StatefulSet" and gateway["spec"]["serviceName"] != host.split(".")[0]:
            problems.append(f"gateway: StatefulSet serviceName is not {host.split('.')[0]}")
    controlplane, _, _ = loaded_config(rendered, "controlplane")
    host, port = host_port(controlplane.envoy.edge_address)
    problems += _headless_problems(rendered, f"edge address {host}", host, port, "edge")
    config, _, _ = loaded_config(rendered, "gateway")
    for target, callee in (
        (config.upstream.features_target, "features"),
        (config.upstream.inference_target, "inference"),
    ):
        host, port = host_port(target)
        problems += _headless_problems(rendered, f"gateway target {target}", host, port, callee)
    return problems


def replication_problems(rendered: Rendered) -> Problems:
    """Production backends: three copies of everything, quorum reads and writes, acks from two."""
    if not rendered.overlay.startswith("prod"):
        return []
    problems: Problems = []
    (cluster,) = rendered.of_kind("K8ssandraCluster")
    for dc in cluster["spec"]["cassandra"]["datacenters"]:
        if dc["size"] != 3:
            problems.append(f"cassandra: datacenter {dc['metadata']['name']} has {dc['size']} nodes, not 3")
    for name in ("features", "logging"):
        cassandra = loaded_config(rendered, name)[0].cassandra
        replication = ast.literal_eval(cassandra.cassandra_replication)
        factors = {k: int(v) for k, v in replication.items() if k != "class"}
        if (
            replication.get("class") != "NetworkTopologyStrategy"
            or not factors
            or set(factors.values()) != {3}
        ):
            problems.append(
                f"{name}: keyspace replication {cassandra.cassandra_replication} is not RF 3 per DC"
            )
        for kind in ("read", "write"):
            level = getattr(cassandra, f"cassandra_{kind}_consistency")
            if level != "LOCAL_QUORUM":
                problems.append(f"{name}: Cassandra {kind} consistency {level}, not LOCAL_QUORUM")
    (kafka,) = rendered.of_kind("Kafka")
    brokers = sum(
        p["spec"]["replicas"] for p in rendered.of_kind("KafkaNodePool") if "broker" in p["spec"]["roles"]
    )
    if brokers != 3:
        problems.append(f"kafka: {brokers} brokers, not 3")
    expected = {
        "default.replication.factor": 3,
        "min.insync.replicas": 2,
        "offsets.topic.replication.factor": 3,
        "transaction.state.log.replication.factor": 3,
        "transaction.state.log.min.isr": 2,
    }
    config = kafka["spec"]["kafka"]["config"]
    for key, value in expected.items():
        if int(config.get(key, 1)) != value:
            problems.append(f"kafka: {key} {config.get(key)}, not {value}")
    for topic in rendered.of_kind("KafkaTopic"):
        name = topic["spec"]["topicName"]
        if (
            topic["spec"]["replicas"] != 3
            or int(topic["spec"].get("config", {}).get("min.insync.replicas", 1)) != 2
        ):
            problems.append(f"kafka: topic {name} is not RF 3 with min ISR 2")
    return problems


def _redis_url_service(rendered: Rendered, url: str) -> tuple[Obj | None, str]:
    """The Service a redis:// URL names, or None and why not."""
    match = re.match(r"redis://([^:/]+):(\d+)/", url)
    if not match:
        return None, f"{url!r} is not redis://host:port/db"
    service = rendered.find("Service", match.group(1))
    if service is None or int(match.group(2)) not in [p["port"] for p in service["spec"]["ports"]]:
        return None, f"{url!r} names no Service port"
    return service, ""


def _redis_flag(workload: Obj, flag: str) -> str | None:
    args = [str(a) for a in container(workload).get("args", [])]
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def bucket_problems(rendered: Rendered) -> Problems:
    """The rate-limit buckets live in a Redis that never evicts, holds no cache, and keeps an AOF on a claim.

    A bucket that eviction erases comes back full (a whole new burst for its tenant); a cache in the same
    Redis would fill it until bucket writes fail.
    """
    problems: Problems = []
    gateway, _, _ = loaded_config(rendered, "gateway")
    edge, _, _ = loaded_config(rendered, "edge")
    features, _, _ = loaded_config(rendered, "features")
    bucket_services = set()
    for who, url in (
        ("gateway admission", gateway.admission.admission_redis_url),
        ("edge", edge.policy.redis_url),
    ):
        service, why = _redis_url_service(rendered, url)
        if service is None:
            problems.append(f"{who}: bucket Redis {why}")
            continue
        bucket_services.add(service["metadata"]["name"])
        pods = [
            w
            for w in rendered.workloads()
            if _selects(
                {"matchLabels": service["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"]
            )
        ]
        if not pods:
            problems.append(f"{who}: Service {service['metadata']['name']} selects no workload")
        for workload in pods:
            name = workload["metadata"]["name"]
            policy = _redis_flag(workload, "--maxmemory-policy")
            if policy != "noeviction":
                problems.append(
                    f"{who}: bucket Redis {name} may evict (maxmemory-policy {policy}), not noeviction"
                )
            if _redis_flag(workload, "--appendonly") != "yes":
                problems.append(f"{who}: bucket Redis {name} has no append-only file")
            if _claim_template(workload, Path("/data")) is None:
                problems.append(f"{who}: bucket Redis {name}: /data is not on a claim")
    for who, url in (
        ("gateway response cache", gateway.cache.response_cache_redis_url),
        ("features cache", features.cache.redis_url),
    ):
        service, _ = _redis_url_service(rendered, url)
        if service is not None and service["metadata"]["name"] in bucket_services:
            problems.append(f"{who}: a cache in the bucket Redis {service['metadata']['name']}")
    return problems


def _secret_files(workload: Obj, directory: Path) -> tuple[str, dict[str, str]] | None:
    """The Secret mounted at `directory` and its file name -> key map (all keys by their names without items)."""
    volume = mounts(workload).get(str(directory))
    if not volume or "secret" not in volume:
        return None
    secret = volume["secret"]
    items = secret.get("items")
    files = (
        {i["path"]: i["key"] for i in items} if items else {k: k for k in ("ca.crt", "tls.crt", "tls.key")}
    )
    return secret["secretName"], files


def _certificate(rendered: Rendered, secret_name: str) -> Obj | None:
    found = [c for c in rendered.of_kind("Certificate") if c["spec"]["secretName"] == secret_name]
    return found[0] if len(found) == 1 else None


def mesh_problems(rendered: Rendered) -> Problems:
    """Envoy → gateway mutual TLS: the gateway serves its port with the mesh files, probes on plaintext health.

    In placement `edge` a gateway without the mesh refuses every call (it cannot tell Envoy from any pod);
    the mesh is required in both placements (with it, the gateway port admits Envoy only).
    """
    problems: Problems = []
    placement = parse_platform(rendered.get("ConfigMap", "infergrid-platform")["data"]["platform.yaml"])
    where = f"gateway (placement {placement.admission.placement})"
    gateway = rendered.workload("gateway")
    config, _, _ = loaded_config(rendered, "gateway")
    server = config.server
    issuers: dict[str, str] = {}
    if not server.mesh:
        problems.append(f"{where}: no mesh files (INFERGRID_GATEWAY_TLS_{{CA,CERT,KEY}}_FILE)")
    else:
        wanted = {"ca.crt": "ca", "tls.crt": "cert", "tls.key": "key"}
        directories = {
            Path(p).parent for p in (server.tls_ca_file, server.tls_cert_file, server.tls_key_file)
        }
        mounted = _secret_files(gateway, directories.pop()) if len(directories) == 1 else None
        if mounted is None:
            problems.append(f"{where}: the mesh files are not in one folder mounted from a Secret")
        else:
            secret, files = mounted
            for path, what in ((server.tls_ca_file, "ca.crt"), (server.tls_cert_file, "tls.crt"),
                               (server.tls_key_file, "tls.key")):  # fmt: skip
                if files.get(Path(path).name) != what:
                    problems.append(
                        f"{where}: {path} is not the {wanted[what]} key {what} of Secret {secret}"
                    )
            cert = _certificate(rendered, secret)
            if cert is None:
                problems.append(f"{where}: no Certificate issues Secret {secret}")
            elif "server auth" not in cert["spec"].get("usages", []):
                problems.append(f"{where}: Certificate {cert['metadata']['name']} is not for server auth")
            else:
                issuers["gateway"] = cert["spec"]["issuerRef"]["name"]
    health = getattr(server, "health_port", 0)
    if not health:
        problems.append(f"{where}: no plaintext health port (the kubelet cannot present a mesh certificate)")
    else:
        ports = {p["name"]: p["containerPort"] for p in container(gateway)["ports"]}
        if ports.get("health") != health:
            problems.append(f"{where}: no container port 'health' = {health}")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if container(gateway)[probe]["grpc"]["port"] != health:
                problems.append(f"{where}: {probe} is not on the plaintext health port {health}")
    controlplane = rendered.workload("controlplane")
    cp_config, _, _ = loaded_config(rendered, "controlplane")
    mesh_dir = cp_config.envoy.mesh_dir
    if mesh_dir is None:
        problems.append(
            "controlplane: no INFERGRID_CONTROLPLANE_MESH_DIR (Envoy would dial the gateway in plaintext)"
        )
    else:
        mounted = _secret_files(controlplane, Path(mesh_dir))
        if mounted is None:
            problems.append(f"controlplane: mesh dir {mesh_dir} is not mounted from a Secret")
        else:
            secret, files = mounted
            for name, key in (("ca.crt", "ca.crt"), ("envoy.crt", "tls.crt"), ("envoy.key", "tls.key")):
                if files.get(name) != key:
                    problems.append(f"controlplane: {mesh_dir}/{name} is not key {key} of Secret {secret}")
            cert = _certificate(rendered, secret)
            if cert is None:
                problems.append(f"controlplane: no Certificate issues Secret {secret}")
            elif cert["spec"].get("commonName") != "envoy" or "client auth" not in cert["spec"].get(
                "usages", []
            ):
                problems.append(
                    f"controlplane: Certificate {cert['metadata']['name']} is not Envoy's client certificate"
                )
            else:
                issuers["envoy"] = cert["spec"]["issuerRef"]["name"]
    if len(issuers) == 2 and len(set(issuers.values())) != 1:
        problems.append(f"mesh: the gateway's and Envoy's certificates come from different issuers {issuers}")
    envoys = [
        c["metadata"]["name"]
        for c in rendered.of_kind("Certificate")
        if c["spec"].get("commonName") == "envoy"
    ]
    if len(envoys) > 1:
        problems.append(f"mesh: more than one Certificate is CN=envoy {envoys} (each could forge identities)")
    return problems


RULES: dict[str, Callable[[Rendered], Problems]] = {
    "rollout": rollout_problems,
    "data-workloads": data_workloads_problems,
    "persistence": persistence_problems,
    "endpoints": endpoint_problems,
    "replication": replication_problems,
    "buckets": bucket_problems,
    "mesh": mesh_problems,
}


@pytest.mark.parametrize("rule", RULES)
def test_every_overlay_keeps_the_rule(rendered: Rendered, rule: str) -> None:
    problems = RULES[rule](rendered)
    assert problems == [], f"{rendered.overlay}:\n" + "\n".join(problems)


# --- each rule can fail ---------------------------------------------------------------------------------


def _w(r: Rendered, name: str) -> Obj:
    return r.workload(name)


def _c(r: Rendered, name: str) -> Obj:
    return container(r.workload(name))


def _set_env(r: Rendered, name: str, variable: str, value: str) -> None:
    env = _c(r, name)["env"]
    for item in env:
        if item["name"] == variable:
            item["value"] = value
            return
    env.append({"name": variable, "value": value})


def _edit_platform(r: Rendered, old: str, new: str) -> None:
    data = r.get("ConfigMap", "infergrid-platform")["data"]
    assert old in data["platform.yaml"]
    data["platform.yaml"] = data["platform.yaml"].replace(old, new)


def _edit_config_map(r: Rendered, prefix: str, key: str, value: str) -> None:
    for cm in r.of_kind("ConfigMap"):
        if cm["metadata"]["name"].startswith(prefix) and key in cm.get("data", {}):
            cm["data"][key] = value
            return
    raise AssertionError(f"no ConfigMap {prefix}* with {key}")


def _config_map_name(r: Rendered, prefix: str) -> str:
    (name,) = [
        cm["metadata"]["name"] for cm in r.of_kind("ConfigMap") if cm["metadata"]["name"].startswith(prefix)
    ]
    return str(name)


def _volume(r: Rendered, workload: str, name: str) -> Obj:
    (volume,) = [v for v in _w(r, workload)["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    return volume


def _spool_on_empty_dir(r: Rendered) -> None:
    gateway = _w(r, "gateway")
    gateway["spec"].pop("volumeClaimTemplates")
    gateway["spec"]["template"]["spec"]["volumes"].append({"name": "spool", "emptyDir": {}})


def _lake_on_empty_dir(r: Rendered) -> None:
    volumes = _w(r, "logging")["spec"]["template"]["spec"]["volumes"]
    (lake,) = [v for v in volumes if v["name"] == "lake"]
    lake.pop("persistentVolumeClaim")
    lake["emptyDir"] = {}


def _topic(r: Rendered, name: str) -> Obj:
    (topic,) = [t for t in r.of_kind("KafkaTopic") if t["spec"]["topicName"] == name]
    return topic


MUTATIONS: dict[str, tuple[str, Callable[[Rendered], Any], str]] = {
    "deployment-max-unavailable": (
        "rollout",
        lambda r: _w(r, "features")["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1),
        "Deployment/features: maxUnavailable must be 0",
    ),
    "deployment-recreate": (
        "rollout",
        lambda r: _w(r, "inference")["spec"].update(strategy={"type": "Recreate"}),
        "Deployment/inference: maxUnavailable must be 0",
    ),
    "no-surge": (
        "rollout",
        lambda r: _w(r, "edge")["spec"]["strategy"]["rollingUpdate"].update(maxSurge=0),
        "Deployment/edge: maxSurge 0",
    ),
    "statefulset-on-delete": (
        "rollout",
        lambda r: _w(r, "gateway")["spec"].update(updateStrategy={"type": "OnDelete"}),
        "StatefulSet/gateway: updateStrategy OnDelete",
    ),
    "statefulset-partition": (
        "rollout",
        lambda r: _w(r, "gateway")["spec"]["updateStrategy"]["rollingUpdate"].update(partition=2),
        "partition 2",
    ),
    "statefulset-two-at-a-time": (
        "rollout",
        lambda r: _w(r, "gateway")["spec"]["updateStrategy"]["rollingUpdate"].update(maxUnavailable=2),
        "one pod at a time",
    ),
    "no-min-ready": (
        "rollout",
        lambda r: _w(r, "logging")["spec"].pop("minReadySeconds"),
        "Deployment/logging: minReadySeconds 0",
    ),
    "pdb-two": (
        "rollout",
        lambda r: r.get("PodDisruptionBudget", "gateway")["spec"].update(maxUnavailable=2),
        "StatefulSet/gateway: needs one PodDisruptionBudget",
    ),
    "no-readiness": (
        "rollout",
        lambda r: _c(r, "envoy").pop("readinessProbe"),
        "Deployment/envoy/envoy: no readinessProbe",
    ),
    "no-prestop": (
        "rollout",
        lambda r: _c(r, "gateway").pop("lifecycle"),
        "StatefulSet/gateway/gateway: no preStop",
    ),
    "short-prestop": (
        "rollout",
        lambda r: _c(r, "controlplane")["lifecycle"]["preStop"]["sleep"].update(seconds=1),
        "preStop sleep 1 s",
    ),
    "prestop-outlasts-grace": (
        "rollout",
        lambda r: _c(r, "features")["lifecycle"]["preStop"]["sleep"].update(seconds=30),
        "Deployment/features/features: preStop 30 s + drain 15 s >= terminationGracePeriodSeconds",
    ),
    "drain-outlasts-grace": (
        "rollout",
        lambda r: _set_env(r, "logging", "INFERGRID_LOGGING_GRACE_SECONDS", "60"),
        "Deployment/logging/logging: preStop 5 s + drain 65 s",
    ),
    "worker-drain-outlasts-grace": (
        "rollout",
        lambda r: _w(r, "features-ingest")["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=15
        ),
        "Deployment/features-ingest/features-ingest: preStop 5 s + drain 14.5 s >= terminationGracePeriodSeconds 15",
    ),
    "envoy-drain-outlasts-grace": (
        "rollout",
        lambda r: _w(r, "envoy")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30),
        "Deployment/envoy/envoy: preStop 15 s + drain 20 s >= terminationGracePeriodSeconds 30",
    ),
    "unknown-data-workload": (
        "data-workloads",
        lambda r: r.objects.append(
            {"kind": "Deployment", "metadata": {"name": "memcached", "labels": {}}, "spec": {}}
        ),
        "memcached",
    ),
    "spool-on-empty-dir": ("persistence", _spool_on_empty_dir, "gateway: spool"),
    "spool-claim-deleted-on-scale-down": (
        "persistence",
        lambda r: _w(r, "gateway")["spec"]["persistentVolumeClaimRetentionPolicy"].update(
            whenScaled="Delete"
        ),
        "whenScaled deletes spool claims",
    ),
    "spool-claim-shared": (
        "persistence",
        lambda r: _w(r, "gateway")["spec"]["volumeClaimTemplates"][0]["spec"].update(
            accessModes=["ReadWriteMany"]
        ),
        "ReadWriteOnce",
    ),
    "lake-on-empty-dir": ("persistence", _lake_on_empty_dir, "logging: lake /var/lib/infergrid/lake is not"),
    "lake-claim-per-node": (
        "persistence",
        lambda r: r.get("PersistentVolumeClaim", "logging-lake")["spec"].update(
            accessModes=["ReadWriteOnce"]
        ),
        "not ReadWriteMany",
    ),
    "redis-without-aof": (
        "persistence",
        lambda r: _c(r, "redis")["args"].__setitem__(_c(r, "redis")["args"].index("--appendonly") + 1, "no"),
        "redis: no append-only file",
    ),
    "buckets-evictable": (
        "buckets",
        lambda r: _c(r, "redis-buckets")["args"].__setitem__(
            _c(r, "redis-buckets")["args"].index("--maxmemory-policy") + 1, "allkeys-lru"
        ),
        "may evict (maxmemory-policy allkeys-lru)",
    ),
    "buckets-in-the-cache-redis": (
        "buckets",
        lambda r: _edit_config_map(r, "edge-config", "INFERGRID_EDGE_REDIS_URL", "redis://redis:6379/0"),
        "edge: bucket Redis redis may evict",
    ),
    "gateway-buckets-in-the-cache-redis": (
        "buckets",
        lambda r: _edit_config_map(
            r, "gateway-config", "INFERGRID_GATEWAY_ADMISSION_REDIS_URL", "redis://redis:6379/0"
        ),
        "gateway admission: bucket Redis redis may evict",
    ),
    "cache-in-the-bucket-redis": (
        "buckets",
        lambda r: _edit_config_map(
            r, "features-config", "INFERGRID_FEATURES_REDIS_URL", "redis://redis-buckets:6379/0"
        ),
        "features cache: a cache in the bucket Redis",
    ),
    "buckets-without-aof": (
        "buckets",
        lambda r: _c(r, "redis-buckets")["args"].__setitem__(
            _c(r, "redis-buckets")["args"].index("--appendonly") + 1, "no"
        ),
        "has no append-only file",
    ),
    "gateway-without-mesh-files": (
        "mesh",
        lambda r: _c(r, "gateway").update(
            env=[e for e in _c(r, "gateway")["env"] if not e["name"].startswith("INFERGRID_GATEWAY_TLS_")]
        ),
        "no mesh files",
    ),
    "gateway-mesh-not-mounted": (
        "mesh",
        lambda r: _c(r, "gateway").update(
            volumeMounts=[m for m in _c(r, "gateway")["volumeMounts"] if m["name"] != "mesh"]
        ),
        "not in one folder mounted from a Secret",
    ),
    "gateway-mesh-wrong-key": (
        "mesh",
        lambda r: _set_env(r, "gateway", "INFERGRID_GATEWAY_TLS_CERT_FILE", "/etc/infergrid/mesh/ca.crt"),
        "is not the cert key tls.crt",
    ),
    "gateway-probe-on-the-mesh-port": (
        "mesh",
        lambda r: _c(r, "gateway")["readinessProbe"]["grpc"].update(port=50051),
        "readinessProbe is not on the plaintext health port",
    ),
    "gateway-without-health-port": (
        "mesh",
        lambda r: _c(r, "gateway").update(
            env=[e for e in _c(r, "gateway")["env"] if e["name"] != "INFERGRID_GATEWAY_HEALTH_PORT"]
        ),
        "no plaintext health port",
    ),
    "controlplane-without-mesh": (
        "mesh",
        lambda r: r.get("ConfigMap", _config_map_name(r, "controlplane-config"))["data"].pop(
            "INFERGRID_CONTROLPLANE_MESH_DIR"
        ),
        "no INFERGRID_CONTROLPLANE_MESH_DIR",
    ),
    "controlplane-mesh-from-the-gateway-secret": (
        "mesh",
        lambda r: _volume(r, "controlplane", "mesh")["secret"].update(secretName="gateway-mesh"),
        "is not Envoy's client certificate",
    ),
    "second-envoy-certificate": (
        "mesh",
        lambda r: r.objects.append(
            {
                **copy.deepcopy(r.get("Certificate", "envoy-mesh")),
                "metadata": {"name": "sidecar", "labels": {}},
            }
        ),
        "more than one Certificate is CN=envoy",
    ),
    "platform-gateway-cluster-ip": (
        "endpoints",
        lambda r: _edit_platform(r, "gateway-headless.infergrid", "gateway.infergrid"),
        "Service gateway is not headless",
    ),
    "platform-gateway-missing-service": (
        "endpoints",
        lambda r: _edit_platform(r, "gateway-headless.infergrid", "gateway-pods.infergrid"),
        "no Service gateway-pods",
    ),
    "platform-gateway-short-name": (
        "endpoints",
        lambda r: _edit_platform(r, "gateway-headless.infergrid.svc.cluster.local", "gateway-headless"),
        "not a fully qualified Service name",
    ),
    "headless-publishes-unready": (
        "endpoints",
        lambda r: r.get("Service", "gateway-headless")["spec"].update(publishNotReadyAddresses=True),
        "publishes pods that are not ready",
    ),
    "edge-cluster-ip": (
        "endpoints",
        lambda r: _edit_config_map(
            r,
            "controlplane-config",
            "INFERGRID_CONTROLPLANE_EDGE_ADDRESS",
            "edge.infergrid.svc.cluster.local:50060",
        ),
        "Service edge is not headless",
    ),
    "inference-cluster-ip": (
        "endpoints",
        lambda r: _edit_config_map(
            r, "gateway-config", "INFERGRID_GATEWAY_INFERENCE_TARGET", "dns:///inference:8001"
        ),
        "Service inference is not headless",
    ),
    "cassandra-one-node": (
        "replication",
        lambda r: r.of_kind("K8ssandraCluster")[0]["spec"]["cassandra"]["datacenters"][0].update(size=1),
        "datacenter dc1 has 1 nodes",
    ),
    "cassandra-rf-2": (
        "replication",
        lambda r: _edit_config_map(
            r,
            "infergrid-cassandra",
            "CASSANDRA_REPLICATION",
            "{'class': 'NetworkTopologyStrategy', 'dc1': 2}",
        ),
        "not RF 3 per DC",
    ),
    "cassandra-read-one": (
        "replication",
        lambda r: _edit_config_map(r, "infergrid-cassandra", "CASSANDRA_READ_CONSISTENCY", "LOCAL_ONE"),
        "read consistency LOCAL_ONE",
    ),
    "kafka-two-brokers": (
        "replication",
        lambda r: r.get("KafkaNodePool", "brokers")["spec"].update(replicas=2),
        "2 brokers",
    ),
    "kafka-min-isr-1": (
        "replication",
        lambda r: r.of_kind("Kafka")[0]["spec"]["kafka"]["config"].update({"min.insync.replicas": 1}),
        "min.insync.replicas 1",
    ),
    "kafka-default-rf-2": (
        "replication",
        lambda r: r.of_kind("Kafka")[0]["spec"]["kafka"]["config"].update({"default.replication.factor": 2}),
        "default.replication.factor 2",
    ),
    "topic-rf-2": (
        "replication",
        lambda r: _topic(r, "infergrid.inference-log.v1.dlq")["spec"].update(replicas=2),
        "topic infergrid.inference-log.v1.dlq is not RF 3",
    ),
    "topic-min-isr-1": (
        "replication",
        lambda r: _topic(r, "infergrid.features.updates")["spec"]["config"].update(
            {"min.insync.replicas": 1}
        ),
        "topic infergrid.features.updates is not RF 3",
    ),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_rule_catches_its_breakage(overlays: dict[str, Rendered], mutation: str) -> None:
    rule, break_it, expected = MUTATIONS[mutation]
    broken = Rendered("prod", copy.deepcopy(overlays["prod"].objects))
    assert RULES[rule](broken) == [], "the prod overlay must pass before it is broken"
    break_it(broken)
    problems = RULES[rule](broken)
    assert any(expected in p for p in problems), f"{mutation}: expected {expected!r} in {problems}"


# --- the spool drain Job --------------------------------------------------------------------------------


def test_the_spool_drain_job_matches_the_gateway(overlays: dict[str, Rendered]) -> None:
    """ops/gateway-spool-drain-job.yaml: valid, same spool path, Kafka and image as the gateway, real API."""
    job, policy = [d for d in yaml.safe_load_all(SPOOL_DRAIN_JOB.read_text()) if d]
    assert validate(job) == [] and validate(policy) == []
    pod = job["spec"]["template"]
    drain = pod["spec"]["containers"][0]
    # Its pod must not look like a gateway pod: the gateway's Services would send it traffic.
    assert pod["metadata"]["labels"][NAME_LABEL] != "gateway"
    assert _selects(policy["spec"]["podSelector"], pod["metadata"]["labels"])
    prod = overlays["prod"]
    gateway = prod.workload("gateway")
    assert drain["image"] == container(gateway)["image"]
    # Secret files (the Kafka password) are left out, as loaded_config leaves out the gateway's.
    env = {e["name"]: e["value"] for e in drain["env"] if not e["name"].endswith("_FILE")}
    code = service_code("gateway")
    config, _, _ = loaded_config(prod, "gateway")
    job_config = load_config(code.config_class, env, code.prefix)
    assert job_config.inference_log.inference_log_spool_dir == config.inference_log.inference_log_spool_dir
    assert job_config.inference_log.inference_log_topic == config.inference_log.inference_log_topic
    assert dataclasses.asdict(job_config.kafka) == dataclasses.asdict(config.kafka)
    # The claim is mounted where the gateway mounts its spool claim.
    (claim_mount,) = [m for m, v in mounts(gateway).items() if v.get("volumeClaimTemplate")]
    job_mounts = {m["mountPath"]: m["name"] for m in drain["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    template = gateway["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    claim = volumes[job_mounts[claim_mount]]["persistentVolumeClaim"]["claimName"]
    assert claim.startswith(f"{template}-{gateway['metadata']['name']}-"), claim
    # The script parses and uses only names the producer's modules have.
    script = drain["args"][0]
    tree = ast.parse(script)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("libs."):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    for method in {"start", "drain_spool", "close", "stats"} & used:
        assert callable(getattr(InferenceLogProducer, method, None)), method
    assert {"start", "drain_spool", "close"} <= used
    # It runs the gateway image's code (the Bazel binary's runfiles: the repository root and the
    # generated protos, as tests/deploy/test_deploy_artifact.py finds them), not its entrypoint.
    runfiles = "/app/services/gateway/server.runfiles/infergrid"
    assert env["PYTHONPATH"].split(":") == [runfiles, f"{runfiles}/protos"]
    assert drain["command"][0] == "python"
