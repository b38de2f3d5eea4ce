"""The InferGrid services as stack components: inference, features, logging, gateway, edge, control plane.

Each runs `python -m services.<name>` from the checkout, configured only by its `INFERGRID_<NAME>_*`
variables (ports from the stack config, backends at the stack's own Redis/Cassandra/Kafka, traces to its
Jaeger), and is ready when `grpc.health.v1` answers SERVING. The demo steps ride on the components: the
inference service's model repository is generated before its first start, the demo feature values are
loaded once the feature service is ready, and the edge registers the demo API key before it starts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from libs.checkout import python_path
from stack.cassandra import credential_env as cassandra_credentials
from stack.component import CommandComponent, Component
from stack.config import REPO_ROOT, StackConfig, secret_file
from stack.errors import StackError
from stack.kafka import credential_env as kafka_credentials
from stack.probes import grpc_health_serving
from stack.process import ProcessRecord
from stack.progress import Progress
from stack.redis import credential_env as redis_credentials

DEMO_KEY_VARIABLE = "INFERGRID_DEMO_API_KEY"
DEMO_MODEL = "fraud"
# The logging query API's admin token (every tenant's records), a stack secret (stack.config.secret_file).
LOGGING_ADMIN_SECRET = "logging-query-admin"
# Marks a state folder whose Cassandra holds the demo feature values (the loader is idempotent anyway).
_DEMO_FEATURES_MARKER = "demo-features-loaded"
LOCAL_DRAIN_SECONDS = "1"
# The cluster profile's replicas drain like Kubernetes pods: long enough for the supervisor (a 0.5 s round
# and a probe of up to 1 s), the control plane (a 1 s discovery poll) and Envoy's EDS update to take a
# replica out of rotation before it stops taking calls; with 1 s a rolling restart failed requests.
CLUSTER_DRAIN_SECONDS = "5"
_MINTED_KEY = re.compile(r"\(shown once\): (\S+)")


def python_env(config: StackConfig) -> dict[str, str]:
    """What an InferGrid service needs from the checkout: its modules and the generated code."""
    return {"PYTHONPATH": python_path(config.repo_root)}


def _chosen_ports(
    config: StackConfig, port_names: Sequence[str], ports: Mapping[str, int] | None
) -> dict[str, int]:
    """The instance's ports: the config's, overridden by `ports` (another replica's)."""
    return {name: int((ports or {}).get(name, config.port(name))) for name in port_names}


def _service_env(config: StackConfig, service: str, ports: Mapping[str, int] | None = None) -> dict[str, str]:
    """Variables every service gets: import paths, its address and metrics port, traces, a short drain."""
    prefix = f"INFERGRID_{service.upper()}_"
    chosen = _chosen_ports(config, (service, f"{service}_metrics"), ports)
    env = {
        **python_env(config),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{config.host}:{config.port('jaeger_otlp_grpc')}",
        f"{prefix}HOST": config.host,
        f"{prefix}PORT": str(chosen[service]),
        f"{prefix}METRICS_PORT": str(chosen[f"{service}_metrics"]),
    }
    if service != "controlplane":  # its own default is shorter still
        # Locally Envoy stops first on `down`: a long drain would only make `down` slow.
        drain = CLUSTER_DRAIN_SECONDS if config.profile == "cluster" else LOCAL_DRAIN_SECONDS
        env[f"INFERGRID_{service.upper()}_DRAIN_SECONDS"] = drain
    return env


# The demo model's input layout, the gateway's configuration (not the model repository's).
INPUT_LAYOUTS = REPO_ROOT / "deploy" / "local" / "input-layouts"


def input_layouts(config: StackConfig) -> Path:
    """The gateway's input layouts (`<model>.json`), checked in next to the platform file."""
    return config.repo_root / INPUT_LAYOUTS.relative_to(REPO_ROOT)


def model_repository(config: StackConfig) -> Path:
    """The demo model repository, generated into the state folder on the first start of inference."""
    return config.state_dir / "inference" / "models"


def keys_file(config: StackConfig) -> Path:
    """The hashed API keys of the local stack: in its state folder, never in the checkout."""
    return config.state_dir / "edge" / "keys.yaml"


def _run_step(config: StackConfig, what: str, args: Sequence[str], timeout_s: float) -> str:
    """Runs `python <args>` from the checkout; returns stdout, raises StackError naming `what`."""
    try:
        result = subprocess.run(
            [sys.executable, *args],
            cwd=config.repo_root,
            env={**os.environ, **python_env(config)},
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise StackError(f"{what}: no result after {timeout_s:.0f} s") from None
    if result.returncode != 0:
        raise StackError(f"{what} failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    return result.stdout.strip()


class _Service(CommandComponent):
    """An InferGrid service: `python -m services.<module>`, ready when its gRPC health is SERVING."""

    def __init__(
        self,
        config: StackConfig,
        *,
        name: str,
        module: str,
        port_names: Sequence[str],
        env: Mapping[str, str],
        ports: Mapping[str, int] | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        super().__init__(
            config,
            name=name,
            port_names=port_names,
            command=[sys.executable, "-m", f"services.{module}"],
            env=env,
            ports=ports,
            probe=lambda c: grpc_health_serving(c.host, c.port),
            start_timeout_s=start_timeout_s,
        )


class _Inference(_Service):
    """The inference service; its first start writes the demo model repository (fraud v1, v2)."""

    def prepare(self) -> None:
        """Generates the demo model repository when the state folder has none."""
        super().prepare()
        repo = model_repository(self.config)
        if not (repo / DEMO_MODEL / "features.json").exists():
            Progress(self.name).say(f"writing the demo model repository into {repo}")
            _run_step(
                self.config,
                "the demo model repository (python -m stack.demo_model)",
                ["-m", "stack.demo_model", "--repo", str(repo)],
                timeout_s=300,
            )


def inference(
    config: StackConfig,
    *,
    name: str = "inference",
    ports: Mapping[str, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> Component:
    """KServe v2 gRPC (ONNX Runtime) over the demo model repository in the state folder.

    Every service factory takes the same keywords: `name` (another replica needs another), `ports` (this
    instance's, overriding the config's for the names given) and `env` (variables added last, e.g. the
    cluster profile's backends).
    """
    port_names = ("inference", "inference_metrics", "inference_http")
    chosen = _chosen_ports(config, port_names, ports)
    return _Inference(
        config,
        name=name,
        module="inference",
        port_names=port_names,
        ports=chosen,
        env={
            **_service_env(config, "inference", chosen),
            "INFERGRID_INFERENCE_HTTP_PORT": str(chosen["inference_http"]),
            "INFERGRID_INFERENCE_MODEL_REPOSITORY": str(model_repository(config)),
            **(env or {}),
        },
    )


class _Features(_Service):
    """The feature service; once ready, the demo feature views and values are loaded (once per state)."""

    #: Beside Cassandra's data, which holds the values: cleaning Cassandra's state reloads them.
    demo_marker_dir: Path | None = None

    def start(self, progress: Progress | None = None) -> ProcessRecord:
        """Starts (or finds) the service, then loads the demo data unless this state already has it."""
        progress = progress or Progress(self.name)
        record = super().start(progress)
        marker = (self.demo_marker_dir or self.config.state_dir / "cassandra") / _DEMO_FEATURES_MARKER
        if not marker.exists():
            progress.say("loading the demo feature views and values (python -m stack.demo_features)")
            out = _run_step(
                self.config,
                "loading the demo features (python -m stack.demo_features)",
                ["-m", "stack.demo_features", "--target", f"{self.host}:{self.port}"],
                timeout_s=600,
            )
            progress.say(out.replace("\n", "; "))
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(out + "\n")
        return record


def features(
    config: StackConfig,
    *,
    name: str = "features",
    ports: Mapping[str, int] | None = None,
    env: Mapping[str, str] | None = None,
    demo_marker_dir: Path | None = None,
) -> Component:
    """The online feature store on the stack's Cassandra, with its Redis read-through cache.

    `demo_marker_dir`: where the "demo values loaded" marker lives (default `<state>/cassandra`).
    """
    chosen = _chosen_ports(config, ("features", "features_metrics"), ports)
    component = _Features(
        config,
        name=name,
        module="features",
        port_names=("features", "features_metrics"),
        ports=chosen,
        env={
            **_service_env(config, "features", chosen),
            "INFERGRID_FEATURES_CASSANDRA_CONTACT_POINTS": config.host,
            "INFERGRID_FEATURES_CASSANDRA_PORT": str(config.port("cassandra")),
            **cassandra_credentials(config, "features", "INFERGRID_FEATURES_CASSANDRA"),
            "INFERGRID_FEATURES_REDIS_URL": f"redis://{config.host}:{config.port('redis')}/0",
            **redis_credentials(config, "features", "INFERGRID_FEATURES_REDIS"),
            "INFERGRID_FEATURES_KAFKA_BOOTSTRAP_SERVERS": f"{config.host}:{config.port('kafka')}",
            **(env or {}),
        },
        start_timeout_s=120.0,
    )
    component.demo_marker_dir = demo_marker_dir
    return component


def _metrics_answer(component: Component) -> bool:
    """GET /metrics on the component's first port answers 200 (a process with no gRPC port)."""
    from stack.probes import http_get

    answer = http_get(f"http://{component.host}:{component.port}/metrics", timeout_s=2)
    return answer is not None and answer.status == 200


def features_ingest(
    config: StackConfig,
    *,
    name: str = "features-ingest",
    ports: Mapping[str, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> Component:
    """The feature stream ingester (`python -m services.features.ingest_stream`): Kafka updates → the store.

    It serves no gRPC, only its metrics port (its consumer lag is its autoscaling signal); it is ready
    once that port answers.
    """
    chosen = _chosen_ports(config, ("features_ingest_metrics",), ports)
    return CommandComponent(
        config,
        name=name,
        port_names=("features_ingest_metrics",),
        command=[sys.executable, "-m", "services.features.ingest_stream"],
        env={
            **python_env(config),
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{config.host}:{config.port('jaeger_otlp_grpc')}",
            "INFERGRID_FEATURES_STREAM_METRICS_PORT": str(chosen["features_ingest_metrics"]),
            "INFERGRID_FEATURES_CASSANDRA_CONTACT_POINTS": config.host,
            "INFERGRID_FEATURES_CASSANDRA_PORT": str(config.port("cassandra")),
            **cassandra_credentials(config, "features", "INFERGRID_FEATURES_CASSANDRA"),
            "INFERGRID_FEATURES_REDIS_URL": f"redis://{config.host}:{config.port('redis')}/0",
            **redis_credentials(config, "features", "INFERGRID_FEATURES_REDIS"),
            "INFERGRID_FEATURES_KAFKA_BOOTSTRAP_SERVERS": f"{config.host}:{config.port('kafka')}",
            **kafka_credentials(config, "features", "INFERGRID_FEATURES_"),
            **(env or {}),
        },
        ports=chosen,
        probe=_metrics_answer,
        start_timeout_s=60.0,
    )


def console(config: StackConfig) -> Component:
    """The operator console (services/console): a page over Prometheus, Jaeger and the features API."""

    def _answers(component: Component) -> bool:
        from stack.probes import http_get

        answer = http_get(f"http://{component.host}:{component.port}/healthz", timeout_s=2)
        return answer is not None and answer.status == 200

    return CommandComponent(
        config,
        name="console",
        port_names=("console",),
        command=[sys.executable, "-m", "services.console"],
        env={
            **python_env(config),
            "INFERGRID_CONSOLE_HOST": config.host,
            "INFERGRID_CONSOLE_PORT": str(config.port("console")),
            "INFERGRID_CONSOLE_PROMETHEUS_URL": f"http://{config.host}:{config.port('prometheus')}",
            "INFERGRID_CONSOLE_JAEGER_URL": f"http://{config.host}:{config.port('jaeger_query')}",
            "INFERGRID_CONSOLE_FEATURES_TARGET": f"{config.host}:{config.port('features')}",
        },
        probe=_answers,
        start_timeout_s=30.0,
    )


def logging(
    config: StackConfig,
    *,
    name: str = "logging",
    ports: Mapping[str, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> Component:
    """The inference-log consumer (Kafka → Cassandra + Parquet lake) and its query API."""
    chosen = _chosen_ports(config, ("logging", "logging_metrics"), ports)
    return _Service(
        config,
        name=name,
        module="logging",
        port_names=("logging", "logging_metrics"),
        ports=chosen,
        env={
            **_service_env(config, "logging", chosen),
            "INFERGRID_LOGGING_KAFKA_BOOTSTRAP_SERVERS": f"{config.host}:{config.port('kafka')}",
            **kafka_credentials(config, "logging", "INFERGRID_LOGGING_"),
            "INFERGRID_LOGGING_CASSANDRA_CONTACT_POINTS": config.host,
            "INFERGRID_LOGGING_CASSANDRA_PORT": str(config.port("cassandra")),
            **cassandra_credentials(config, "logging", "INFERGRID_LOGGING_CASSANDRA"),
            "INFERGRID_LOGGING_LAKE_DIR": str(config.state_dir / "logging" / "lake"),
            # The query API: tenants read their own records with their API keys; the operator (tests,
            # tools) every tenant's with the admin token (services/logging/access.py).
            "INFERGRID_LOGGING_QUERY_PLATFORM_FILE": str(config.platform_file),
            "INFERGRID_LOGGING_QUERY_KEYS_FILE": str(keys_file(config)),
            "INFERGRID_LOGGING_QUERY_ADMIN_TOKEN_FILE": str(secret_file(config, LOGGING_ADMIN_SECRET)),
            **(env or {}),
        },
        start_timeout_s=120.0,
    )


def gateway(
    config: StackConfig,
    *,
    name: str = "gateway",
    ports: Mapping[str, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> Component:
    """A gateway replica: PredictionService over features, inference and the Kafka inference log.

    Args:
        config: The stack config.
        name: Instance name; a second replica needs another (its state folder holds its spool).
        ports: `gateway` and `gateway_metrics` for this replica, overriding the config's.
        env: Variables added last (the cluster profile's targets and backends).
    """
    # With a plaintext health port (`gateway_health` in `ports`: the cluster's mutual-TLS gateways), the
    # readiness probe goes there.
    health = "gateway_health" in (ports or {})
    port_names = (
        ("gateway", "gateway_metrics", "gateway_health") if health else ("gateway", "gateway_metrics")
    )
    chosen = _chosen_ports(config, port_names, ports)
    component = _Service(
        config,
        name=name,
        module="gateway",
        port_names=port_names,
        ports=chosen,
        env={
            **_service_env(config, "gateway"),
            **({"INFERGRID_GATEWAY_HEALTH_PORT": str(chosen["gateway_health"])} if health else {}),
            # A second replica listens on its own ports.
            "INFERGRID_GATEWAY_PORT": str(chosen["gateway"]),
            "INFERGRID_GATEWAY_METRICS_PORT": str(chosen["gateway_metrics"]),
            "INFERGRID_GATEWAY_INPUT_LAYOUTS": str(input_layouts(config)),
            "INFERGRID_GATEWAY_PLATFORM_FILE": str(config.platform_file),
            "INFERGRID_GATEWAY_FEATURES_TARGET": f"{config.host}:{config.port('features')}",
            "INFERGRID_GATEWAY_INFERENCE_TARGET": f"{config.host}:{config.port('inference')}",
            "INFERGRID_GATEWAY_KAFKA_BOOTSTRAP_SERVERS": f"{config.host}:{config.port('kafka')}",
            **kafka_credentials(config, "gateway", "INFERGRID_GATEWAY_"),
            "INFERGRID_GATEWAY_INFERENCE_LOG_SPOOL_DIR": str(config.state_dir / name / "spool"),
            # Used when the platform places admission in the gateway (deploy/local/platform.yaml does).
            "INFERGRID_GATEWAY_ADMISSION_KEYS_FILE": str(keys_file(config)),
            "INFERGRID_GATEWAY_ADMISSION_REDIS_URL": f"redis://{config.host}:{config.port('redis')}/0",
            **redis_credentials(config, "gateway", "INFERGRID_GATEWAY_ADMISSION_REDIS"),
            **redis_credentials(config, "gateway", "INFERGRID_GATEWAY_RESPONSE_CACHE_REDIS"),
            **(env or {}),
        },
    )
    if health:
        component.set_probe(lambda c: grpc_health_serving(c.host, c.ports["gateway_health"]))
    return component


class _Edge(_Service):
    """The edge service; before it starts, the demo tenant gets its API key (from the variable, or minted)."""

    #: The key minted by this start (shown once), or "" when it came from the variable or already existed.
    minted_key: str = ""

    def prepare(self) -> None:
        """Registers the demo key: INFERGRID_DEMO_API_KEY when set, else a new one printed once."""
        super().prepare()
        out = _run_step(
            self.config,
            "edge: registering the demo API key",
            [
                "-m",
                "services.edge.keys",
                "--platform",
                str(self.config.platform_file),
                "--keys-file",
                str(keys_file(self.config)),
                "ensure",
                "--tenant",
                "demo",
                "--name",
                "demo",
                "--key-from-env",
                DEMO_KEY_VARIABLE,
            ],
            timeout_s=60,
        )
        found = _MINTED_KEY.search(out)
        self.minted_key = found.group(1) if found else ""
        Progress(self.name).say(out)


def edge(
    config: StackConfig,
    *,
    name: str = "edge",
    ports: Mapping[str, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> Component:
    """The edge service: Envoy's ext_authz (API keys) and rate-limit service (Redis token buckets)."""
    chosen = _chosen_ports(config, ("edge", "edge_metrics"), ports)
    return _Edge(
        config,
        name=name,
        module="edge",
        port_names=("edge", "edge_metrics"),
        ports=chosen,
        env={
            **_service_env(config, "edge", chosen),
            "INFERGRID_EDGE_PLATFORM_FILE": str(config.platform_file),
            "INFERGRID_EDGE_KEYS_FILE": str(keys_file(config)),
            "INFERGRID_EDGE_REDIS_URL": f"redis://{config.host}:{config.port('redis')}/0",
            **redis_credentials(config, "edge", "INFERGRID_EDGE_REDIS"),
            **(env or {}),
        },
        start_timeout_s=30.0,
    )


def controlplane(config: StackConfig, *, env: Mapping[str, str] | None = None) -> Component:
    """The xDS control plane: Envoy's listener, routes, clusters and endpoints from the platform file."""
    return _Service(
        config,
        name="controlplane",
        module="controlplane",
        port_names=("controlplane", "controlplane_metrics"),
        env={
            **_service_env(config, "controlplane"),
            "INFERGRID_CONTROLPLANE_PLATFORM_FILE": str(config.platform_file),
            "INFERGRID_CONTROLPLANE_DESCRIPTOR_SET": str(
                config.repo_root / "build" / "gen" / "descriptors.pb"
            ),
            "INFERGRID_CONTROLPLANE_EDGE_ADDRESS": f"{config.host}:{config.port('edge')}",
            "INFERGRID_CONTROLPLANE_LISTENER_PORT": str(config.port("envoy")),
            "INFERGRID_CONTROLPLANE_TRACING_OTLP_ADDRESS": f"{config.host}:{config.port('jaeger_otlp_grpc')}",
            "INFERGRID_CONTROLPLANE_ACCESS_LOG": str(config.log_dir / "envoy-access.log"),
            "INFERGRID_CONTROLPLANE_TLS_DIR": str(config.state_dir / "controlplane" / "tls"),
            **(env or {}),
        },
        start_timeout_s=30.0,
    )
