"""Configuration of the inference service, read once from INFERGRID_INFERENCE_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from libs.config import Bounded, ConfigError, section, setting
from libs.server import ServerConfig
from libs.telemetry import TelemetryConfig

ENV_PREFIX = "INFERGRID_INFERENCE_"


@dataclass(frozen=True)
class HttpConfig(Bounded):
    """The Open Inference Protocol's HTTP/JSON API beside gRPC (INFERGRID_INFERENCE_HTTP_*)."""

    # Triton's convention; 0 turns the HTTP API off.
    http_port: int = setting(8000, minimum=0, maximum=65535)
    # Bind address; empty: the gRPC server's (INFERGRID_INFERENCE_HOST).
    http_host: str = ""


@dataclass(frozen=True)
class ModelServingConfig(Bounded):
    """The model repository and the defaults of its models (INFERGRID_INFERENCE_<FIELD>)."""

    # Folder of `<model>/config.pbtxt` + `<model>/<version>/model.onnx`; unset: no models.
    model_repository: Path | None = None
    # Models loaded at start-up (comma-separated); empty: every model folder.
    startup_models: tuple[str, ...] = ()
    # Queue bound per model version when its config leaves max_queue_size at 0.
    max_queue_size: int = setting(1024, minimum=1)
    # One inference per version while loading, before it serves.
    warmup: bool = True
    # ServerReady (and gRPC health) only while every start-up model is ready; else once loading ended.
    strict_readiness: bool = False
    # ONNX Runtime threads per session (0: ONNX Runtime's default); 1 suits small models (thread hand-off
    # costs more than it saves).
    ort_intra_op_threads: int = setting(1, minimum=0)
    ort_inter_op_threads: int = setting(1, minimum=0)
    # TensorRT engine plan cache; unset: <system temp>/infergrid-trt-plans.
    tensorrt_cache_dir: Path | None = None
    tensorrt_fp16: bool = True


@dataclass(frozen=True)
class ControlConfig(Bounded):
    """The model control API (RepositoryModelLoad/Unload): off unless enabled or token-protected."""

    # On without a token: anyone who reaches the port may load and unload models (a private network only).
    control_enabled: bool = False
    # A file holding the admin token; set: calls must send `authorization: Bearer <token>`.
    control_token_file: Path | None = None
    # Instances one model config may ask for (instance_group counts summed).
    control_max_instances: int = setting(8, minimum=1)
    # Bytes of model files one RepositoryModelLoad may carry (`file:` parameters, all together).
    control_max_file_bytes: int = setting(32 << 20, minimum=1)


@dataclass(frozen=True)
class InferenceConfig:
    """Everything the inference service reads at start-up."""

    # Threaded: ModelInfer runs on the server thread (20-30 % less CPU per unary call at concurrency 32 than on
    # grpc.aio), ModelStreamInfer hops to the loop (10-20 % more per message); see docs/architecture.md.
    server: ServerConfig = section(ServerConfig, port=8001, transport="threaded")
    telemetry: TelemetryConfig = section(TelemetryConfig, metrics_port=8002)
    models: ModelServingConfig = field(default_factory=ModelServingConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    control: ControlConfig = field(default_factory=ControlConfig)


def check_repository(config: InferenceConfig, worker: str | None = None) -> InferenceConfig:
    """The config as it is, once its model repository (when set) is a directory.

    Raises:
        ConfigError: The repository is not a directory (naming the variable).
    """
    repository = config.models.model_repository
    if repository is not None and not repository.is_dir():
        raise ConfigError(f"{ENV_PREFIX}MODEL_REPOSITORY", f"{str(repository)!r} is not a directory")
    return config
