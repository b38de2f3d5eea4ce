"""Project rules on the rendered manifests, checked against the services' code so that drift fails here.

Every InferGrid Deployment has probes, resources, a PodDisruptionBudget, an HPA, a NetworkPolicy and a
ServiceAccount; its variables are ones its config class reads and load into it; ports, drain times and
names match the code's defaults; the backends' operator resources match the services' settings.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from deploy.k8s import kustomize
from libs.platform import parse_platform
from libs.server import LIVENESS_SERVICE
from tests.deploy.k8s_objects import (
    K8S_DIR,
    NAME_LABEL,
    PYTHON_SERVICES,
    WORKERS,
    Rendered,
    adapter_rules,
    container,
    container_env,
    container_port,
    host_port,
    known_variables,
    loaded_config,
    mounts,
    read_yaml,
    service_code,
)

REPO_ROOT = K8S_DIR.parents[1]
IMAGES_COMPONENT = K8S_DIR / "components" / "images" / "kustomization.yaml"
NAMESPACE = "infergrid"


def containerfile_for(image: str) -> Path:
    """The image's own recipe, or the shared one of the Python services (see deploy/images/build.sh)."""
    own = REPO_ROOT / "deploy" / "images" / image / "Containerfile"
    if own.exists() or not (REPO_ROOT / "services" / image / "__main__.py").exists():
        return own
    return REPO_ROOT / "deploy" / "images" / "service" / "Containerfile"


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


# --- every Deployment -------------------------------------------------------------------------------


def test_the_python_services_and_envoy_are_deployed(rendered: Rendered) -> None:
    names = {d["metadata"]["name"] for d in rendered.app_workloads()}
    assert names == {*PYTHON_SERVICES, *WORKERS, "envoy"}
    for name in PYTHON_SERVICES:
        assert (REPO_ROOT / "services" / name / "config.py").exists(), (
            f"services/{name} is gone: drop its manifests"
        )


# Runnable services the Kubernetes manifests leave out on purpose, each with the reason.
NOT_DEPLOYED = {
    # A page of the local stack over Prometheus' and Jaeger's APIs (HTTP, not gRPC: none of the gRPC
    # probe, HPA and PodMonitor rules fit it); in a cluster the same queries back the operators' dashboards.
    "console": "local-stack operator page",
    # Features, inference and the gateway in one process: the single-machine profile. In a cluster the three
    # are deployed apart so that each scales on its own nodes (services/node/README.md, "When to run it").
    "node": "single-machine profile of features + inference + gateway",
}


def test_every_runnable_service_is_deployed() -> None:
    runnable = {p.parent.name for p in (REPO_ROOT / "services").glob("*/__main__.py")}
    assert runnable - set(NOT_DEPLOYED) <= set(PYTHON_SERVICES), (
        f"services without manifests: {sorted(runnable - set(NOT_DEPLOYED) - set(PYTHON_SERVICES))}"
    )
    assert not set(NOT_DEPLOYED) & set(PYTHON_SERVICES), "a service listed as not deployed has manifests"


def test_one_service_renders_alone(kustomize_binary: str) -> None:
    """What `bazel run //services/<name>:manifests` prints: that service's objects, nothing else."""
    rendered = kustomize.build(kustomize.overlay_dir("prod", K8S_DIR))
    for name in ("gateway", "inference"):
        objs = list(yaml.safe_load_all(kustomize.select_service(rendered, name)))
        assert {o["metadata"]["labels"][NAME_LABEL] for o in objs} == {name}
        kinds = {o["kind"] for o in objs}
        assert {"Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds, kinds
        assert kinds & {"Deployment", "StatefulSet"}, kinds
        assert all(o["metadata"]["namespace"] == NAMESPACE for o in objs)
    with pytest.raises(kustomize.KustomizeError, match="no objects"):
        kustomize.select_service(rendered, "nosuchservice")


def test_every_workload_has_probes_resources_and_a_locked_down_container(rendered: Rendered) -> None:
    for workload in rendered.of_kind("Deployment") + rendered.of_kind("StatefulSet"):
        name = workload["metadata"]["name"]
        spec = workload["spec"]["template"]["spec"]
        for c in spec["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{name}: probes"
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{name}: requests"
            assert "memory" in res.get("limits", {}), f"{name}: memory limit"
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}: read-only root"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}: privilege escalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities"
            assert c["image"].split("/")[-1].count(":") == 1, f"{name}: image {c['image']} has no tag"
        assert spec["securityContext"].get("runAsNonRoot") is True, f"{name}: non-root"
        assert spec["securityContext"].get("runAsUser", 0) != 0, f"{name}: non-root user"
        assert spec.get("automountServiceAccountToken") is False, f"{name}: no API token"


def test_every_app_deployment_has_grpc_probes_pdb_hpa_policy_and_account(rendered: Rendered) -> None:
    pdbs = rendered.of_kind("PodDisruptionBudget")
    policies = rendered.of_kind("NetworkPolicy")
    for deployment in rendered.app_workloads():
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        spec = deployment["spec"]["template"]["spec"]
        assert "replicas" not in deployment["spec"], f"{name}: the HPA owns replicas"
        assert [p for p in pdbs if _selects(p["spec"]["selector"], labels)], f"{name}: no PodDisruptionBudget"
        hpas = [
            h
            for h in rendered.of_kind("HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["name"] == name
        ]
        assert len(hpas) == 1 and hpas[0]["spec"]["scaleTargetRef"]["kind"] == deployment["kind"], (
            f"{name}: HPA"
        )
        hpa = hpas[0]["spec"]
        assert hpa["minReplicas"] <= hpa["maxReplicas"]
        assert {"scaleUp", "scaleDown"} <= set(hpa.get("behavior", {})), f"{name}: HPA behavior"
        assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["metrics"]), name
        policy = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert policy and set(policy[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, (
            f"{name}: NetworkPolicy"
        )
        assert rendered.find("ServiceAccount", spec["serviceAccountName"]), f"{name}: ServiceAccount"
        assert spec.get("topologySpreadConstraints") is not None, f"{name}: topology spread"
        if name in PYTHON_SERVICES:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                grpc = container(deployment)[probe].get("grpc")
                assert grpc is not None, f"{name}: {probe} is not a native gRPC probe"


def test_prod_spreads_over_zones_and_keeps_replicas(overlays: dict[str, Rendered]) -> None:
    prod = overlays["prod"]
    for deployment in prod.app_workloads():
        keys = {t["topologyKey"] for t in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]}
        assert "topology.kubernetes.io/zone" in keys, deployment["metadata"]["name"]
    for hpa in prod.of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] >= 2, hpa["metadata"]["name"]


def test_dev_runs_one_replica_each(overlays: dict[str, Rendered]) -> None:
    for hpa in overlays["dev"].of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] == 1, hpa["metadata"]["name"]


# --- the Python services against their code ---------------------------------------------------------


@pytest.mark.parametrize("name", PYTHON_SERVICES)
def test_variables_are_ones_the_service_reads(rendered: Rendered, name: str) -> None:
    code = service_code(name)
    env = container_env(rendered, rendered.workload(name))
    known = known_variables(code.config_class, code.prefix)
    unknown = sorted(k for k in env if k.startswith(code.prefix) and k not in known)
    assert unknown == [], (
        f"{name} does not read {unknown} (misspelled or removed from {code.config_class.__name__})"
    )
    others = sorted(k for k in env if k.startswith("INFERGRID_") and not k.startswith(code.prefix))
    assert others == [], f"{name}: variables of another service {others}"


@pytest.mark.parametrize("name", WORKERS)
def test_workers_run_their_module_with_the_service_image_and_settings(rendered: Rendered, name: str) -> None:
    worker = WORKERS[name]
    code = service_code(worker.service)
    deployment = rendered.workload(name)
    c = container(deployment)
    env = container_env(rendered, deployment)
    known = known_variables(code.config_class, code.prefix)
    unknown = sorted(k for k in env if k.startswith("INFERGRID_") and k not in known)
    assert unknown == [], f"{name} does not read {unknown} ({code.config_class.__name__})"
    # The service's image, with the module run from its runfiles (what the Bazel :server target packs).
    assert c["image"] == container(rendered.workload(worker.service))["image"], name
    assert c["command"] == ["python", "-m", worker.module], name
    module_file = REPO_ROOT / Path(*worker.module.split(".")).with_suffix(".py")
    assert module_file.parent == REPO_ROOT / "services" / worker.service and module_file.exists()
    runfiles = f"/app/services/{worker.service}/server.runfiles/infergrid"
    assert env["PYTHONPATH"].split(":") == [runfiles, f"{runfiles}/protos"], name
    # Its metrics port: the code's default, the container's "metrics" port, what the probes ask.
    config, _, _ = loaded_config(rendered, name)
    defaults = code.defaults
    assert config.telemetry.metrics_host == "0.0.0.0", name
    assert env[code.prefix + worker.metrics_port_variable] == str(worker.metrics_port(config))
    assert (
        worker.metrics_port(config) == worker.metrics_port(defaults) == container_port(deployment, "metrics")
    )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe].get("httpGet") == {"path": "/metrics", "port": "metrics"}, f"{name}: {probe}"
    assert rendered.get("PodMonitor", name)["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # A consumer: no Service sends it requests.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service in rendered.of_kind("Service"):
        selector = service["spec"].get("selector") or {}
        assert not (selector and selector.items() <= labels.items()), f"Service {service['metadata']['name']}"
    # It shares the service's settings but the process's own (server, telemetry): the same backends.
    service_config, _, _ = loaded_config(rendered, worker.service)
    for part in dataclasses.fields(config):
        if part.name not in ("server", "telemetry"):
            ours, theirs = getattr(config, part.name), getattr(service_config, part.name)
            if part.name == "kafka":  # only the worker connects to Kafka: it alone has a Kafka user
                ours = dataclasses.replace(ours, kafka_sasl_username="")
            assert ours == theirs, f"{name}: {part.name} {ours} is not {worker.service}'s {theirs}"


@pytest.mark.parametrize("name", PYTHON_SERVICES)
def test_ports_probes_and_drain_match_the_code(rendered: Rendered, name: str) -> None:
    config, _, files = loaded_config(rendered, name)
    defaults = service_code(name).defaults
    deployment = rendered.workload(name)
    assert config.server.host == "0.0.0.0" and config.telemetry.metrics_host == "0.0.0.0", name
    assert config.server.port == defaults.server.port == container_port(deployment, "grpc"), name
    assert (
        config.telemetry.metrics_port
        == defaults.telemetry.metrics_port
        == container_port(deployment, "metrics")
    )
    c = container(deployment)
    # With mutual TLS on its port the gateway's probes use its plaintext health port (the kubelet cannot
    # present a client certificate); tests/deploy/test_deploy_rollout.py's mesh rule requires it.
    probed = getattr(config.server, "health_port", 0) or config.server.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == probed, f"{name}: {probe} port"
    # Liveness asks for the process, not its backends: a Cassandra outage must not restart pods.
    assert c["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE, f"{name}: liveness service"
    drain = config.server.drain_seconds + config.server.grace_seconds
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain, f"{name}: terminationGracePeriodSeconds {grace} <= drain + grace {drain}"
    # The Service named after the service exposes the same ports under the same names.
    service = rendered.get("Service", name)
    assert service["spec"]["selector"][NAME_LABEL] == name
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == config.server.port and ports["grpc"]["targetPort"] == "grpc"
    assert ports["metrics"]["port"] == config.telemetry.metrics_port
    podmonitor = rendered.get("PodMonitor", name)
    assert podmonitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # Secrets come from files mounted from Secrets.
    volumes = mounts(deployment)
    for variable, path in files.items():
        holder = [v for mount, v in volumes.items() if path.startswith(mount.rstrip("/") + "/")]
        assert holder and "secret" in holder[0], f"{name}: {variable}={path} is not in a mounted Secret"


@pytest.mark.parametrize("name", PYTHON_SERVICES)
def test_file_settings_point_into_mounted_volumes(rendered: Rendered, name: str) -> None:
    config, _, _ = loaded_config(rendered, name)
    volumes = mounts(rendered.workload(name))

    def paths(obj: object) -> list[Path]:
        out: list[Path] = []
        for value in vars(obj).values():
            if isinstance(value, Path):
                out.append(value)
            elif hasattr(value, "__dataclass_fields__"):
                out += paths(value)
        return out

    containerfile = containerfile_for(name).read_text()
    for path in paths(config):
        assert path.is_absolute(), f"{name}: {path} is relative to the image's working directory"
        mounted = any(str(path).startswith(m.rstrip("/") + "/") or str(path) == m for m in volumes)
        # Otherwise the image must put it there (read-only files such as the descriptor set).
        assert mounted or f" {path}\n" in containerfile, (
            f"{name}: {path} is neither on a mounted volume nor in {containerfile_for(name)}"
        )


def test_gateway_calls_features_and_inference_through_their_headless_services(rendered: Rendered) -> None:
    config, _, _ = loaded_config(rendered, "gateway")
    for target, callee in (
        (config.upstream.features_target, "features"),
        (config.upstream.inference_target, "inference"),
    ):
        host, port = host_port(target)
        service = rendered.get("Service", host)
        assert service["spec"]["selector"][NAME_LABEL] == callee, target
        assert service["spec"].get("clusterIP") == "None", f"{target}: clients balance over pods (headless)"
        assert port == service_code(callee).defaults.server.port, target
        assert target.startswith("dns:///"), f"{target}: the dns resolver sees every pod"
    assert config.models.input_layouts == Path("/etc/infergrid/input-layouts")


def test_the_gateway_mounts_its_input_layouts_and_not_the_model_volume(rendered: Rendered) -> None:
    config, _, _ = loaded_config(rendered, "gateway")
    gateway = mounts(rendered.workload("gateway"))
    assert "/models" not in gateway, "model facts come over the inference API"
    volume = gateway[str(config.models.input_layouts)]
    layouts = rendered.get("ConfigMap", volume["configMap"]["name"])["data"]
    local = REPO_ROOT / "deploy" / "local" / "input-layouts"
    assert layouts == {p.name: p.read_text() for p in sorted(local.glob("*.json"))}, "same as deploy/local"


def test_the_control_plane_points_envoy_at_the_edge_service(rendered: Rendered) -> None:
    config, _, _ = loaded_config(rendered, "controlplane")
    # Envoy resolves these names itself: fully qualified, in the overlay's namespace.
    host, port = host_port(config.envoy.edge_address)
    name, namespace, *_ = host.split(".")
    assert namespace == NAMESPACE and host.endswith(".svc.cluster.local"), host
    service = rendered.get("Service", name)
    assert service["spec"]["selector"][NAME_LABEL] == "edge"
    assert port == service_code("edge").defaults.server.port
    # Envoy opens the descriptor set at the path the control plane names: both images have it there.
    for image in ("controlplane", "envoy"):
        text = containerfile_for(image).read_text()
        assert f" {config.envoy.descriptor_set}\n" in text, str(containerfile_for(image))
    host, port = host_port(config.envoy.tracing_otlp_address)
    assert host.endswith(f".{NAMESPACE}.svc.cluster.local"), host
    host = host.split(".")[0]
    assert rendered.get("Service", host) and port in [
        p["port"] for p in rendered.get("Service", host)["spec"]["ports"]
    ]


def test_inference_reads_the_shared_model_repository(rendered: Rendered) -> None:
    config, _, _ = loaded_config(rendered, "inference")
    assert config.models.model_repository == Path("/models")
    assert config.models.strict_readiness, "pods must not take traffic before their models are loaded"
    for name in ("inference",):
        volume = mounts(rendered.workload(name))["/models"]
        claim = rendered.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert "ReadOnlyMany" in claim["spec"]["accessModes"]


# --- Envoy ------------------------------------------------------------------------------------------


def _platform(rendered: Rendered):  # type: ignore[no-untyped-def]
    return parse_platform(rendered.get("ConfigMap", "infergrid-platform")["data"]["platform.yaml"])


def test_the_platform_config_parses_and_matches_envoy_and_the_gateway(rendered: Rendered) -> None:
    platform = _platform(rendered)
    envoy = rendered.get("Deployment", "envoy")
    assert platform.listener.port == container_port(envoy, "https")
    assert platform.listener.host == "0.0.0.0"
    assert platform.listener.tls.enabled
    tls_mounts = {m: v for m, v in mounts(envoy).items() if "secret" in v}
    for path in (platform.listener.tls.cert_file, platform.listener.tls.key_file):
        assert any(path.startswith(m + "/") for m in tls_mounts), f"{path} is not in a mounted Secret"
    public = rendered.get("Service", "envoy")
    assert public["spec"]["type"] == "LoadBalancer"
    assert public["spec"]["ports"][0]["targetPort"] == "https"
    for endpoint in platform.gateway.endpoints:
        host, port = host_port(endpoint)
        name, namespace, *_ = host.split(".")
        assert namespace == rendered.get("Service", name)["metadata"]["namespace"] == NAMESPACE
        assert rendered.get("Service", name)["spec"]["selector"][NAME_LABEL] == "gateway"
        assert port == service_code("gateway").defaults.server.port


def test_every_platform_consumer_mounts_it_where_it_reads_it(rendered: Rendered) -> None:
    for name in ("controlplane", "edge", "gateway"):
        config, _, _ = loaded_config(rendered, name)
        path = {
            "controlplane": lambda c: c.envoy.platform_file,
            "edge": lambda c: c.policy.platform_file,
            "gateway": lambda c: c.models.platform_file,
        }[name](config)
        volume = mounts(rendered.workload(name))[str(path.parent)]
        sources = [s.get("configMap", {}).get("name") for s in volume.get("projected", {}).get("sources", [])]
        assert (
            volume.get("configMap", {}).get("name") == "infergrid-platform" or "infergrid-platform" in sources
        )
    # The edge service also reads the hashed API keys, next to the platform file.
    edge = mounts(rendered.get("Deployment", "edge"))["/etc/infergrid/platform"]
    secrets = [s["secret"] for s in edge["projected"]["sources"] if "secret" in s]
    assert [i["path"] for s in secrets for i in s["items"]] == [_platform(rendered).api_keys_file]


def test_envoy_bootstrap_points_at_the_control_plane(rendered: Rendered) -> None:
    envoy = rendered.get("Deployment", "envoy")
    bootstrap_cm = mounts(envoy)["/etc/envoy"]["configMap"]["name"]
    bootstrap = read_yaml_text(rendered.get("ConfigMap", bootstrap_cm)["data"]["envoy.yaml"])
    assert "--config-path" in container(envoy)["args"]
    assert (
        container(envoy)["args"][container(envoy)["args"].index("--config-path") + 1]
        == "/etc/envoy/envoy.yaml"
    )
    assert (
        bootstrap["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"]["cluster_name"]
        == "xds"
    )
    (xds,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "xds"]
    address = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    name, namespace, *_ = address["address"].split(".")
    assert namespace == NAMESPACE
    assert rendered.get("Service", name)["spec"]["selector"][NAME_LABEL] == "controlplane"
    assert address["port_value"] == service_code("controlplane").defaults.server.port
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"  # served through `ops`


def read_yaml_text(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


# --- network policies follow the calls of docs/architecture.md --------------------------------------------------------

# caller -> callees (InferGrid pods only; DNS and Jaeger are allowed to all).
CALLS = {
    "envoy": {"gateway", "edge", "controlplane"},
    "gateway": {"features", "inference"},
    "features": set(),
    "inference": set(),
    "logging": set(),
    "controlplane": set(),
    "edge": set(),
    "features-ingest": set(),
}


def test_network_policies_allow_only_the_designed_calls(rendered: Rendered) -> None:
    for caller, callees in CALLS.items():
        policy = rendered.get("NetworkPolicy", caller)
        allowed = set()
        for rule in policy["spec"]["egress"]:
            for peer in rule.get("to", []):
                app = (peer.get("podSelector", {}).get("matchLabels") or {}).get(NAME_LABEL)
                if app in CALLS:
                    allowed.add(app)
        assert allowed == callees, (
            f"{caller} may call {sorted(allowed)}, docs/architecture.md says {sorted(callees)}"
        )
        # ... and each callee admits exactly its callers on its gRPC port.
        for callee in callees:
            ingress = rendered.get("NetworkPolicy", callee)["spec"]["ingress"]
            sources = {
                (peer.get("podSelector", {}).get("matchLabels") or {}).get(NAME_LABEL)
                for rule in ingress
                for peer in rule.get("from", [])
            }
            assert caller in sources, f"{callee} does not admit {caller}"


# --- backends: operators' resources match the services' settings --------------------------------------


def _cassandra_users(rendered: Rendered) -> dict:
    return {name: loaded_config(rendered, name)[0].cassandra for name in ("features", "logging")}


def test_cassandra_cluster_matches_the_services(rendered: Rendered) -> None:
    (cluster,) = rendered.of_kind("K8ssandraCluster")
    assert cluster["apiVersion"] == "k8ssandra.io/v1alpha1"
    dcs = {dc["metadata"]["name"]: dc for dc in cluster["spec"]["cassandra"]["datacenters"]}
    for name, cassandra in _cassandra_users(rendered).items():
        assert cassandra.cassandra_local_dc in dcs, f"{name}: local DC {cassandra.cassandra_local_dc}"
        # cass-operator's Service: <cluster>-<dc>-service.
        expected = f"{cluster['metadata']['name']}-{cassandra.cassandra_local_dc}-service"
        assert cassandra.cassandra_contact_points == (expected,), name
        assert cassandra.cassandra_port == 9042
        replication = ast.literal_eval(cassandra.cassandra_replication)
        assert replication.pop("class") == "NetworkTopologyStrategy", name
        assert set(replication) <= set(dcs), f"{name}: replication names unknown DCs {replication}"
        for dc, factor in replication.items():
            assert 1 <= int(factor) <= dcs[dc]["size"], (
                f"{name}: RF {factor} in {dc} of size {dcs[dc]['size']}"
            )
        assert cassandra.cassandra_write_consistency == "LOCAL_QUORUM", name
        assert cassandra.cassandra_read_consistency.startswith("LOCAL_"), name
        assert cassandra.cassandra_keyspace == "infergrid"
        # Credentials: the service's own role (deploy/README.md, "Backend credentials"), never the superuser.
        assert cassandra.cassandra_username == f"<infergrid-cassandra-{name}/username>", name
        assert cluster["spec"]["cassandra"]["superuserSecretRef"]["name"] not in cassandra.cassandra_username
    if rendered.overlay.startswith("prod"):
        assert all(dc["size"] >= 3 for dc in dcs.values())
        assert all(
            int(f) >= 3
            for k, f in ast.literal_eval(_cassandra_users(rendered)["features"].cassandra_replication).items()
            if k != "class"
        )


def _kafka(rendered: Rendered) -> tuple[dict, dict]:
    (kafka,) = rendered.of_kind("Kafka")
    pools = [
        p
        for p in rendered.of_kind("KafkaNodePool")
        if p["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    ]
    return kafka, {"brokers": sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])}


def test_kafka_cluster_and_topics_match_the_services(rendered: Rendered) -> None:
    kafka, size = _kafka(rendered)
    assert kafka["apiVersion"] == "kafka.strimzi.io/v1beta2"
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    listener = {entry["name"]: entry for entry in kafka["spec"]["kafka"]["listeners"]}["plain"]
    topics = {t["spec"]["topicName"]: t for t in rendered.of_kind("KafkaTopic")}
    for topic in topics.values():
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        assert 1 <= topic["spec"]["replicas"] <= size["brokers"]
        assert int(topic["spec"]["config"]["min.insync.replicas"]) <= topic["spec"]["replicas"]
    gateway, _, _ = loaded_config(rendered, "gateway")
    logging, _, _ = loaded_config(rendered, "logging")
    features, _, _ = loaded_config(rendered, "features")
    for name, config in (("gateway", gateway), ("logging", logging), ("features", features)):
        assert (
            config.kafka.kafka_bootstrap_servers
            == f"{kafka['metadata']['name']}-kafka-bootstrap:{listener['port']}"
        ), name
    assert gateway.inference_log.inference_log_topic == logging.pipeline.topic
    for needed in (
        logging.pipeline.topic,
        logging.pipeline.dead_letter_topic,
        features.stream.stream_topic,
        features.stream.stream_dead_letter_topic,
    ):
        assert needed in topics, f"no KafkaTopic for {needed}"
    assert logging.pipeline.create_topics is False, "topics belong to Strimzi's topic operator"
    # Consumers beyond the partitions idle: the logging HPA stops at the topic's partitions.
    hpa = rendered.get("HorizontalPodAutoscaler", "logging")
    assert hpa["spec"]["maxReplicas"] <= topics[logging.pipeline.topic]["spec"]["partitions"]
    # ... and the feature stream ingester's at the updates topic's.
    ingest, _, _ = loaded_config(rendered, "features-ingest")
    assert ingest.kafka.kafka_bootstrap_servers == features.kafka.kafka_bootstrap_servers
    assert ingest.stream.stream_topic == features.stream.stream_topic
    hpa = rendered.get("HorizontalPodAutoscaler", "features-ingest")
    assert hpa["spec"]["maxReplicas"] <= topics[ingest.stream.stream_topic]["spec"]["partitions"]
    if rendered.overlay.startswith("prod"):
        assert size["brokers"] >= 3
        assert topics[logging.pipeline.topic]["spec"]["replicas"] >= 3
        assert int(topics[logging.pipeline.topic]["spec"]["config"]["min.insync.replicas"]) >= 2


def test_redis_and_jaeger_urls_resolve_to_their_services(rendered: Rendered) -> None:
    gateway, _, _ = loaded_config(rendered, "gateway")
    features, _, _ = loaded_config(rendered, "features")
    edge, _, _ = loaded_config(rendered, "edge")
    for url in (
        gateway.cache.response_cache_redis_url,
        gateway.admission.admission_redis_url,
        features.cache.redis_url,
        edge.policy.redis_url,
    ):
        match = re.match(r"redis://([^:/]+):(\d+)/", url)
        assert match, url
        service = rendered.get("Service", match.group(1))
        assert int(match.group(2)) in [p["port"] for p in service["spec"]["ports"]]
    for name in PYTHON_SERVICES:
        _, env, _ = loaded_config(rendered, name)
        endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        host, port = host_port(endpoint.removeprefix("http://"))
        assert port in [p["port"] for p in rendered.get("Service", host)["spec"]["ports"]], name


# --- GPU and CPU inference ----------------------------------------------------------------------------


def test_prod_inference_runs_on_gpu_nodes_and_prod_cpu_without(overlays: dict[str, Rendered]) -> None:
    gpu = overlays["prod"].get("Deployment", "inference")["spec"]["template"]["spec"]
    c = gpu["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    assert "inference-gpu" in c["image"]
    for overlay in ("prod-cpu", "dev"):
        spec = overlays[overlay].get("Deployment", "inference")["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in str(spec["containers"][0]["resources"]), overlay
        assert "nodeSelector" not in spec and "inference-gpu" not in spec["containers"][0]["image"]


# --- images in one place ------------------------------------------------------------------------------


def test_every_image_is_named_in_the_images_component_and_built_here(rendered: Rendered) -> None:
    images = read_yaml(IMAGES_COMPONENT)["images"]
    by_new = {f"{i['newName']}:{i['newTag']}": i["name"] for i in images}
    for workload in rendered.of_kind("Deployment") + rendered.of_kind("StatefulSet"):
        for c in workload["spec"]["template"]["spec"]["containers"]:
            assert c["image"] in by_new, (
                f"{workload['metadata']['name']}: {c['image']} is not from {IMAGES_COMPONENT}"
            )
    for image in images:
        if image["name"].startswith("infergrid/"):
            build_file = containerfile_for(image["name"].split("/")[1])
            assert build_file.exists(), f"{image['name']}: no {build_file}"


# --- autoscaling: HPA metrics <-> adapter rules -------------------------------------------------------


def test_every_hpa_custom_metric_has_an_adapter_rule(rendered: Rendered) -> None:
    rules = adapter_rules()
    used = set()
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Resource":
                continue
            assert metric["type"] == "Pods", f"{hpa['metadata']['name']}: per-pod metrics only"
            name = metric["pods"]["metric"]["name"]
            assert name in rules, f"{hpa['metadata']['name']}: no adapter rule exposes {name}"
            used.add(name)
    assert used == set(rules), f"adapter rules no HPA uses: {set(rules) - used}"
    for rule in rules.values():
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_the_custom_metrics_are_the_designed_signals(overlays: dict[str, Rendered]) -> None:
    prod = overlays["prod"]

    def custom(name: str) -> set[str]:
        hpa = prod.get("HorizontalPodAutoscaler", name)
        return {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}

    assert custom("gateway") == {"infergrid_gateway_requests_per_second"}
    assert custom("inference") == {"infergrid_inference_queue_depth"}
    assert custom("logging") == {"infergrid_logging_consumer_lag"}
    assert custom("features-ingest") == {"infergrid_features_stream_consumer_lag"}
