"""Configuration of the inference service, read once from INFERGRID_INFERENCE_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from libs.config import ConfigError
from libs.server import ServerConfig
from libs.telemetry import TelemetryConfig

ENV_PREFIX = "INFERGRID_INFERENCE_"


@dataclass(frozen=True)
class InferenceServerConfig(ServerConfig):
    port: int = 8001


@dataclass(frozen=True)
class InferenceTelemetryConfig(TelemetryConfig):
    metrics_port: int = 8002


@dataclass(frozen=True)
class HttpConfig:
    """The Open Inference Protocol's HTTP/JSON API beside gRPC (INFERGRID_INFERENCE_HTTP_*)."""

    # Triton's convention; 0 turns the HTTP API off.
    http_port: int = 8000
    # Bind address; empty: the gRPC server's (INFERGRID_INFERENCE_HOST).
    http_host: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be 0..65535, got {self.http_port}")


@dataclass(frozen=True)
class ModelServingConfig:
    """The model repository and the defaults of its models (INFERGRID_INFERENCE_<FIELD>)."""

    # Folder of `<model>/config.pbtxt` + `<model>/<version>/model.onnx`; unset: no models.
    model_repository: Path | None = None
    # Models loaded at start-up (comma-separated); empty: every model folder.
    startup_models: tuple[str, ...] = ()
    # Queue bound per model version when its config leaves max_queue_size at 0.
    max_queue_size: int = 1024
    # One inference per version while loading, before it serves.
    warmup: bool = True
    # ServerReady (and gRPC health) only while every start-up model is ready; else once loading ended.
    strict_readiness: bool = False
    # ONNX Runtime threads per session; 1 suits small models (thread hand-off costs more than it saves).
    ort_intra_op_threads: int = 1
    ort_inter_op_threads: int = 1
    # TensorRT engine plan cache; unset: <system temp>/infergrid-trt-plans.
    tensorrt_cache_dir: Path | None = None
    tensorrt_fp16: bool = True

    def __post_init__(self) -> None:
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be at least 1, got {self.max_queue_size}")
        if self.ort_intra_op_threads < 0 or self.ort_inter_op_threads < 0:
            raise ValueError("ONNX Runtime thread counts must be >= 0 (0: ONNX Runtime's default)")


@dataclass(frozen=True)
class ControlConfig:
    """The model control API (RepositoryModelLoad/Unload): off unless enabled or token-protected."""

    # On without a token: anyone who reaches the port may load and unload models (a private network only).
    control_enabled: bool = False
    # A file holding the admin token; set: calls must send `authorization: Bearer <token>`.
    control_token_file: Path | None = None
    # Instances one model config may ask for (instance_group counts summed).
    control_max_instances: int = 8
    # Bytes of model files one RepositoryModelLoad may carry (`file:` parameters, all together).
    control_max_file_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        if self.control_max_instances < 1:
            raise ValueError(f"control_max_instances must be at least 1, got {self.control_max_instances}")
        if self.control_max_file_bytes < 1:
            raise ValueError(f"control_max_file_bytes must be at least 1, got {self.control_max_file_bytes}")


@dataclass(frozen=True)
class InferenceConfig:
    """Everything the inference service reads at start-up."""

    server: InferenceServerConfig = field(default_factory=InferenceServerConfig)
    telemetry: InferenceTelemetryConfig = field(default_factory=InferenceTelemetryConfig)
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
