"""Model configuration: Triton's config.pbtxt parsed into inference.ModelConfig, checked into a ModelSpec.

The on-disk format is exactly Triton's (protobuf text format of
`inference.ModelConfig`), so a Triton model repository works here unchanged
for the fields this server understands; the rest are kept and echoed by the
ModelConfig RPC but have no effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format

from inference import model_config_pb2 as mc
from services.inference.datatypes import BY_CONFIG_TYPE, DataType
from services.inference.errors import ModelConfigError

CONFIG_FILE = "config.pbtxt"
ONNXRUNTIME = "onnxruntime"
TENSORRT = "tensorrt"
BACKENDS = (ONNXRUNTIME, TENSORRT)
# Platform names Triton reports for the same backends (ModelMetadata.platform).
_PLATFORM = {ONNXRUNTIME: "onnxruntime_onnx", TENSORRT: "tensorrt_plan"}
_BACKEND_OF_PLATFORM = {v: k for k, v in _PLATFORM.items()}
_DEFAULT_FILENAME = {ONNXRUNTIME: "model.onnx", TENSORRT: "model.onnx"}
# config.pbtxt `parameters` keys this server reads.
FALLBACK_PARAMETER = "fallback_backend"
# The p99 latency objective (milliseconds, a number as string_value) the batcher adapts to.
LATENCY_TARGET_PARAMETER = "latency_target_p99_ms"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, datatype and dims (without the batch dimension when batching)."""

    name: str
    datatype: DataType
    dims: tuple[int, ...]
    optional: bool = False

    def shape(self, batched: bool) -> list[int]:
        """The full shape as clients see it: -1 leads when the model batches."""
        return [-1, *self.dims] if batched else list(self.dims)

    def element_count(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape)


@dataclass(frozen=True)
class BatchingPolicy:
    """The dynamic batcher's knobs for one model."""

    # False: one request per execution (still queued, bounded and timed out).
    dynamic: bool
    max_batch_size: int
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]
    # 0: use the server default; requests beyond it get RESOURCE_EXHAUSTED.
    max_queue_size: int
    # 0: none; otherwise requests still queued after this long fail with DEADLINE_EXCEEDED.
    default_timeout_us: int
    allow_timeout_override: bool
    # 0: fixed max_queue_delay; otherwise the p99 (µs) the batcher adapts delay and batch size to.
    latency_target_us: int = 0


@dataclass(frozen=True)
class VersionPolicy:
    """Which numeric version folders to serve: all, the latest N, or specific ones."""

    kind: str  # "all" | "latest" | "specific"
    latest: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """Returns the versions to serve out of `available`, ascending."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "latest":
            return ordered[-self.latest :] if self.latest > 0 else []
        return [v for v in ordered if v in self.versions]


@dataclass(frozen=True)
class ModelSpec:
    """A checked model configuration: what the repository, batcher and server work from."""

    name: str
    config: mc.ModelConfig
    backend: str
    fallback_backend: str | None
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingPolicy
    instance_count: int
    version_policy: VersionPolicy
    model_filename: str

    @property
    def batched(self) -> bool:
        """True when the first dimension of every tensor is the batch dimension."""
        return self.max_batch_size > 0

    @property
    def platform(self) -> str:
        return _PLATFORM[self.backend]

    def with_backend(self, backend: str) -> ModelSpec:
        """The same spec served by another backend (the configured fallback)."""
        config = mc.ModelConfig()
        config.CopyFrom(self.config)
        config.backend = backend
        config.platform = _PLATFORM[backend]
        return spec_from_config(config, self.name)


def parse_config_text(text: str, source: str) -> mc.ModelConfig:
    """Parses config.pbtxt text.

    Raises:
        ModelConfigError: The text is not a valid ModelConfig; names `source` and the parser's complaint.
    """
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelConfigError(f"{source}: {exc}") from None
    return config


def parse_config_json(text: str, source: str) -> mc.ModelConfig:
    """Parses a JSON ModelConfig (the `config` parameter of RepositoryModelLoad, as in Triton)."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise ModelConfigError(f"{source}: {exc}") from None
    return config


def read_config(model_dir: Path) -> mc.ModelConfig:
    """Reads `<model_dir>/config.pbtxt`; a missing file gives an empty config (completed from the model)."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return mc.ModelConfig()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"cannot read {path}: {exc}") from None
    return parse_config_text(text, str(path))


def _tensor(entry: mc.ModelInput | mc.ModelOutput, kind: str, model: str) -> TensorSpec:
    if not entry.name:
        raise ModelConfigError(f"model '{model}': an {kind} has no name")
    datatype = BY_CONFIG_TYPE.get(entry.data_type)
    if datatype is None:
        raise ModelConfigError(
            f"model '{model}': {kind} '{entry.name}' has unsupported data_type "
            f"{mc.DataType.Name(entry.data_type)}"
        )
    dims = tuple(int(d) for d in entry.dims)
    if any(d < -1 or d == 0 for d in dims):
        raise ModelConfigError(f"model '{model}': {kind} '{entry.name}' has invalid dims {list(dims)}")
    optional = bool(getattr(entry, "optional", False))
    return TensorSpec(entry.name, datatype, dims, optional)


def backend_of(config: mc.ModelConfig) -> str:
    """The backend a config names through `backend` or `platform`; ONNX Runtime when it names neither."""
    if config.backend:
        return config.backend
    if config.platform:
        return _BACKEND_OF_PLATFORM.get(config.platform, config.platform)
    return ONNXRUNTIME


def spec_from_config(config: mc.ModelConfig, model_name: str) -> ModelSpec:
    """Checks a (completed) config and fills in defaults.

    Args:
        config: The parsed config; its inputs and outputs must already be present.
        model_name: The repository folder name; the config's `name` must match it when set.

    Raises:
        ModelConfigError: The config is inconsistent or asks for something unsupported; says what.
    """
    if config.name and config.name != model_name:
        raise ModelConfigError(f"config name '{config.name}' does not match the model folder '{model_name}'")
    config.name = model_name
    backend = backend_of(config)
    if backend not in BACKENDS:
        raise ModelConfigError(f"model '{model_name}': unknown backend '{backend}'; known: {list(BACKENDS)}")
    config.backend = backend
    config.platform = _PLATFORM[backend]
    fallback = (
        config.parameters[FALLBACK_PARAMETER].string_value if FALLBACK_PARAMETER in config.parameters else ""
    )
    if fallback and fallback not in BACKENDS:
        raise ModelConfigError(f"model '{model_name}': unknown fallback backend '{fallback}'")
    if config.max_batch_size < 0:
        raise ModelConfigError(
            f"model '{model_name}': max_batch_size must be >= 0, got {config.max_batch_size}"
        )
    scheduling = config.WhichOneof("scheduling_choice")
    if scheduling not in (None, "dynamic_batching"):
        raise ModelConfigError(f"model '{model_name}': {scheduling} is not supported")
    if not config.input or not config.output:
        raise ModelConfigError(f"model '{model_name}': the config lists no inputs or no outputs")
    inputs = tuple(_tensor(i, "input", model_name) for i in config.input)
    outputs = tuple(_tensor(o, "output", model_name) for o in config.output)
    for kind, tensors in (("input", inputs), ("output", outputs)):
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ModelConfigError(f"model '{model_name}': duplicate {kind} names in {names}")
    dyn = config.dynamic_batching
    dynamic = scheduling == "dynamic_batching" and config.max_batch_size > 0
    queue = dyn.default_queue_policy
    for size in dyn.preferred_batch_size:
        if size < 1 or size > config.max_batch_size:
            raise ModelConfigError(
                f"model '{model_name}': preferred_batch_size {size} is outside 1..{config.max_batch_size}"
            )
    target_us = _latency_target_us(config, model_name)
    if target_us and not dynamic:
        raise ModelConfigError(
            f"model '{model_name}': parameter {LATENCY_TARGET_PARAMETER} needs dynamic_batching and max_batch_size > 0"
        )
    batching = BatchingPolicy(
        latency_target_us=target_us,
        dynamic=dynamic,
        max_batch_size=config.max_batch_size,
        max_queue_delay_us=int(dyn.max_queue_delay_microseconds) if dynamic else 0,
        preferred_batch_sizes=tuple(sorted(int(s) for s in dyn.preferred_batch_size)),
        max_queue_size=int(queue.max_queue_size),
        default_timeout_us=int(queue.default_timeout_microseconds),
        allow_timeout_override=bool(queue.allow_timeout_override) or not queue.default_timeout_microseconds,
    )
    count = sum(max(g.count, 1) for g in config.instance_group) if config.instance_group else 1
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        version_policy = VersionPolicy("all")
    elif which == "specific":
        version_policy = VersionPolicy("specific", versions=tuple(int(v) for v in policy.specific.versions))
    else:  # Triton's default: the latest one
        n = policy.latest.num_versions if which == "latest" else 1
        version_policy = VersionPolicy("latest", latest=max(int(n), 1))
    filename = config.default_model_filename or _DEFAULT_FILENAME[backend]
    return ModelSpec(
        name=model_name,
        config=config,
        backend=backend,
        fallback_backend=fallback or None,
        max_batch_size=int(config.max_batch_size),
        inputs=inputs,
        outputs=outputs,
        batching=batching,
        instance_count=count,
        version_policy=version_policy,
        model_filename=filename,
    )


def _latency_target_us(config: mc.ModelConfig, model_name: str) -> int:
    if LATENCY_TARGET_PARAMETER not in config.parameters:
        return 0
    text = config.parameters[LATENCY_TARGET_PARAMETER].string_value
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3_600_000:  # also NaN
        raise ModelConfigError(
            f"model '{model_name}': parameter {LATENCY_TARGET_PARAMETER} must be a positive number of "
            f"milliseconds, got {text!r}"
        )
    return max(1, int(value * 1000))


def complete_config(
    config: mc.ModelConfig,
    inputs: list[tuple[str, DataType, list[int]]],
    outputs: list[tuple[str, DataType, list[int]]],
) -> None:
    """Fills missing inputs/outputs from the model file's own signature (Triton's auto-complete).

    When the config sets max_batch_size > 0 the model's leading dimension is the batch dimension
    and is dropped from dims. Symbolic dimensions become -1.
    """
    batched = config.max_batch_size > 0
    if not config.input:
        for name, datatype, shape in inputs:
            config.input.add(name=name, data_type=datatype.config_type, dims=shape[1:] if batched else shape)
    if not config.output:
        for name, datatype, shape in outputs:
            config.output.add(name=name, data_type=datatype.config_type, dims=shape[1:] if batched else shape)
