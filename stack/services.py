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

from stack.component import CommandComponent, Component
from stack.config import StackConfig
from stack.errors import StackError
from stack.probes import grpc_health_serving
from stack.process import ProcessRecord
from stack.progress import Progress

DEMO_KEY_VARIABLE = "INFERGRID_DEMO_API_KEY"
DEMO_MODEL = "fraud"
# Marks a state folder whose Cassandra holds the demo feature values (the loader is idempotent anyway).
_DEMO_FEATURES_MARKER = "demo-features-loaded"
LOCAL_DRAIN_SECONDS = "1"
_MINTED_KEY = re.compile(r"\(shown once\): (\S+)")


def python_env(config: StackConfig) -> dict[str, str]:
    """What an InferGrid service needs from the checkout: its modules and the generated code."""
    paths = [str(config.repo_root), str(config.repo_root / "build" / "gen")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def _service_env(config: StackConfig, service: str) -> dict[str, str]:
    """Variables every service gets: import paths, its address and metrics port, traces, a short drain."""
    prefix = f"INFERGRID_{service.upper()}_"
    env = {
        **python_env(config),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{config.host}:{config.port('jaeger_otlp_grpc')}",
        f"{prefix}HOST": config.host,
        f"{prefix}PORT": str(config.port(service)),
        f"{prefix}METRICS_PORT": str(config.port(f"{service}_metrics")),
    }
    if service != "controlplane":  # its own default is shorter still
        # Locally Envoy stops first on `down`: a long drain would only make `down` slow.
        env[f"INFERGRID_{service.upper()}_DRAIN_SECONDS"] = LOCAL_DRAIN_SECONDS
    return env


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
                "the demo model repository (python -m services.inference.demo)",
                ["-m", "services.inference.demo", "--repo", str(repo)],
                timeout_s=300,
            )


def inference(config: StackConfig) -> Component:
    """KServe v2 gRPC (ONNX Runtime) over the demo model repository in the state folder."""
    return _Inference(
        config,
        name="inference",
        module="inference",
        port_names=("inference", "inference_metrics", "inference_http"),
        env={
            **_service_env(config, "inference"),
            "INFERGRID_INFERENCE_HTTP_PORT": str(config.port("inference_http")),
            "INFERGRID_INFERENCE_MODEL_REPOSITORY": str(model_repository(config)),
        },
    )


class _Features(_Service):
    """The feature service; once ready, the demo feature views and values are loaded (once per state)."""

    def start(self, progress: Progress | None = None) -> ProcessRecord:
        """Starts (or finds) the service, then loads the demo data unless this state already has it."""
        progress = progress or Progress(self.name)
        record = super().start(progress)
        # Beside Cassandra's data, which holds the values: cleaning Cassandra's state reloads them.
        marker = self.config.state_dir / "cassandra" / _DEMO_FEATURES_MARKER
        if not marker.exists():
            progress.say("loading the demo feature views and values (python -m services.features.demo)")
            out = _run_step(
                self.config,
                "loading the demo features (python -m services.features.demo)",
                ["-m", "services.features.demo", "--target", f"{self.host}:{self.port}"],
                timeout_s=600,
            )
            progress.say(out.replace("\n", "; "))
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(out + "\n")
        return record


def features(config: StackConfig) -> Component:
    """The online feature store on the stack's Cassandra, with its Redis read-through cache."""
    return _Features(
        config,
        name="features",
        module="features",
        port_names=("features", "features_metrics"),
        env={
            **_service_env(config, "features"),
            "INFERGRID_FEATURES_CASSANDRA_CONTACT_POINTS": config.host,
            "INFERGRID_FEATURES_CASSANDRA_PORT": str(config.port("cassandra")),
            "INFERGRID_FEATURES_REDIS_URL": f"redis://{config.host}:{config.port('redis')}/0",
            "INFERGRID_FEATURES_KAFKA_BOOTSTRAP_SERVERS": f"{config.host}:{config.port('kafka')}",
        },
        start_timeout_s=120.0,
    )


def logging(config: StackConfig) -> Component:
    """The inference-log consumer (Kafka → Cassandra + Parquet lake) and its query API."""
    return _Service(
        config,
        name="logging",
        module="logging",
        port_names=("logging", "logging_metrics"),
        env={
            **_service_env(config, "logging"),
            "INFERGRID_LOGGING_KAFKA_BOOTSTRAP_SERVERS": f"{config.host}:{config.port('kafka')}",
            "INFERGRID_LOGGING_CASSANDRA_CONTACT_POINTS": config.host,
            "INFERGRID_LOGGING_CASSANDRA_PORT": str(config.port("cassandra")),
            "INFERGRID_LOGGING_LAKE_DIR": str(config.state_dir / "logging" / "lake"),
        },
        start_timeout_s=120.0,
    )


def gateway(
    config: StackConfig, *, name: str = "gateway", ports: Mapping[str, int] | None = None
) -> Component:
    """A gateway replica: PredictionService over features, inference and the Kafka inference log.

    Args:
        config: The stack config.
        name: Instance name; a second replica needs another (its state folder holds its spool).
        ports: `gateway` and `gateway_metrics` for this replica, overriding the config's.
    """
    chosen = {
        "gateway": config.port("gateway"),
        "gateway_metrics": config.port("gateway_metrics"),
        **(ports or {}),
    }
    return _Service(
        config,
        name=name,
        module="gateway",
        port_names=("gateway", "gateway_metrics"),
        ports=chosen,
        env={
            **_service_env(config, "gateway"),
            # A second replica listens on its own ports.
            "INFERGRID_GATEWAY_PORT": str(chosen["gateway"]),
            "INFERGRID_GATEWAY_METRICS_PORT": str(chosen["gateway_metrics"]),
            "INFERGRID_GATEWAY_MODEL_REPOSITORY": str(model_repository(config)),
            "INFERGRID_GATEWAY_PLATFORM_FILE": str(config.platform_file),
            "INFERGRID_GATEWAY_FEATURES_TARGET": f"{config.host}:{config.port('features')}",
            "INFERGRID_GATEWAY_INFERENCE_TARGET": f"{config.host}:{config.port('inference')}",
            "INFERGRID_GATEWAY_KAFKA_BOOTSTRAP_SERVERS": f"{config.host}:{config.port('kafka')}",
            "INFERGRID_GATEWAY_INFERENCE_LOG_SPOOL_DIR": str(config.state_dir / name / "spool"),
            # Used when the platform places admission in the gateway (deploy/local/platform.yaml does).
            "INFERGRID_GATEWAY_ADMISSION_KEYS_FILE": str(keys_file(config)),
            "INFERGRID_GATEWAY_ADMISSION_REDIS_URL": f"redis://{config.host}:{config.port('redis')}/0",
        },
    )


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


def edge(config: StackConfig) -> Component:
    """The edge service: Envoy's ext_authz (API keys) and rate-limit service (Redis token buckets)."""
    return _Edge(
        config,
        name="edge",
        module="edge",
        port_names=("edge", "edge_metrics"),
        env={
            **_service_env(config, "edge"),
            "INFERGRID_EDGE_PLATFORM_FILE": str(config.platform_file),
            "INFERGRID_EDGE_KEYS_FILE": str(keys_file(config)),
            "INFERGRID_EDGE_REDIS_URL": f"redis://{config.host}:{config.port('redis')}/0",
        },
        start_timeout_s=30.0,
    )


def controlplane(config: StackConfig) -> Component:
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
        },
        start_timeout_s=30.0,
    )
