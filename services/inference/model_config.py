"""Model configuration: Triton's config.pbtxt parsed into inference.ModelConfig, checked into a ModelSpec.

The on-disk format is exactly Triton's (protobuf text format of
`inference.ModelConfig`), so a Triton model repository works here unchanged
for the fields this server understands. A field it does not act on is refused
with INVALID_ARGUMENT naming it (SUPPORTED_FIELDS), never silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format
from google.protobuf.message import Message

from inference import model_config_pb2 as mc
from libs.errors import InvalidArgument
from services.inference.datatypes import BY_CONFIG_TYPE, DataType
from services.inference.errors import InvalidConfig, ModelConfigError

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
# TensorRT's bound for dynamic non-batch dimensions (backends/tensorrt.py).
TENSORRT_MAX_DIM_PARAMETER = "tensorrt_max_dim"
KNOWN_PARAMETERS = (FALLBACK_PARAMETER, LATENCY_TARGET_PARAMETER, TENSORRT_MAX_DIM_PARAMETER)

# The config.pbtxt fields this server acts on: True for a field whose whole value is understood, a
# nested mapping for a message of which only those fields are. Any other field that is set (proto3:
# differs from its default) is refused. `parameters` keys are checked against KNOWN_PARAMETERS.
_QUEUE_POLICY: dict[str, object] = {
    "default_timeout_microseconds": True,
    "allow_timeout_override": True,
    "max_queue_size": True,
}
SUPPORTED_FIELDS: dict[str, object] = {
    "name": True,
    "platform": True,
    "backend": True,
    "version_policy": True,
    "max_batch_size": True,
    "input": {"name": True, "data_type": True, "dims": True, "optional": True},
    "output": {"name": True, "data_type": True, "dims": True},
    "instance_group": {"name": True, "kind": True, "count": True, "gpus": True},
    "dynamic_batching": {
        "preferred_batch_size": True,
        "max_queue_delay_microseconds": True,
        "preserve_ordering": True,  # responses always keep each request's own order
        "default_queue_policy": _QUEUE_POLICY,
        "priority_levels": True,
        "default_priority_level": True,
        "priority_queue_policy": True,  # checked in _priority_levels
    },
    "parameters": True,
    "default_model_filename": True,
    "model_warmup": True,  # checked in warmup.py when the model loads
}


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
    # 0: one level; otherwise requests are taken level 1 first, then 2, ... (Triton's priority_levels).
    priority_levels: int = 0
    default_priority_level: int = 0
    # Per level (Triton's priority_queue_policy): (default_timeout_us, allow_timeout_override).
    level_timeouts: tuple[tuple[int, int, bool], ...] = ()

    def timeout_us(self, priority: int, requested_us: int) -> int:
        """The queue timeout of a request at `priority` (a level, 0 before it is resolved) asking for `requested_us`."""
        default_us, allow = self.default_timeout_us, self.allow_timeout_override
        for level, level_us, level_allow in self.level_timeouts:
            if level == priority:
                default_us, allow = level_us, level_allow
        return requested_us if requested_us > 0 and allow else default_us

    def level(self, priority: int) -> int:
        """The queue level of a request's `priority` parameter; 0 when the model has no levels.

        Raises:
            InvalidArgument: `priority` is above the model's priority_levels.
        """
        if not self.priority_levels:
            return 0
        if priority > self.priority_levels:
            raise InvalidArgument(
                f"parameters.priority: {priority} is outside 0..{self.priority_levels} (the model's priority_levels; "
                "0 is the default level)"
            )
        return priority or self.default_priority_level


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
        raise InvalidConfig(f"model '{model_name}': {scheduling} is not supported")
    check_supported(config, model_name)
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
    levels, default_level, level_timeouts = _priority_levels(dyn, config.max_batch_size, model_name)
    batching = BatchingPolicy(
        priority_levels=levels,
        default_priority_level=default_level,
        level_timeouts=level_timeouts,
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


def _priority_levels(
    dyn: mc.ModelDynamicBatching, max_batch_size: int, model_name: str
) -> tuple[int, int, tuple[tuple[int, int, bool], ...]]:
    """priority_levels, default_priority_level and each level's queue timeout policy, checked."""
    where = f"model '{model_name}': dynamic_batching"
    levels, default = int(dyn.priority_levels), int(dyn.default_priority_level)
    if not levels:
        if default or dyn.priority_queue_policy:
            raise InvalidConfig(
                f"{where}: default_priority_level and priority_queue_policy need priority_levels"
            )
        return 0, 0, ()
    if max_batch_size <= 0:
        raise InvalidConfig(f"{where}: priority_levels needs max_batch_size > 0")
    if not 1 <= default <= levels:
        raise InvalidConfig(f"{where}: default_priority_level must be in 1..{levels}, got {default}")
    timeouts = []
    for level, policy in sorted(dyn.priority_queue_policy.items()):
        if not 1 <= level <= levels:
            raise InvalidConfig(f"{where}: priority_queue_policy level {level} is outside 1..{levels}")
        if policy.timeout_action or policy.max_queue_size:
            raise InvalidConfig(
                f"{where}: priority_queue_policy[{level}]: only default_timeout_microseconds and "
                "allow_timeout_override are supported per level (timeout_action DELAY and a per-level "
                "max_queue_size are not)"
            )
        timeout = int(policy.default_timeout_microseconds)
        timeouts.append((int(level), timeout, bool(policy.allow_timeout_override) or not timeout))
    return levels, default, tuple(timeouts)


def check_supported(config: mc.ModelConfig, model_name: str) -> None:
    """Refuses every set field this server would not act on (SUPPORTED_FIELDS, KNOWN_PARAMETERS).

    Raises:
        InvalidConfig: Names the first such field by its path, e.g. `input[0].reshape`.
    """
    _check_message(config, SUPPORTED_FIELDS, "", model_name)
    unknown = sorted(set(config.parameters) - set(KNOWN_PARAMETERS))
    if unknown:
        raise InvalidConfig(
            f"model '{model_name}': parameters {unknown} are not supported; known: {list(KNOWN_PARAMETERS)}"
        )


def _check_message(message: Message, allowed: Mapping[str, object], prefix: str, model_name: str) -> None:
    for descriptor, value in message.ListFields():
        path = f"{prefix}{descriptor.name}"
        rule = allowed.get(descriptor.name)
        if rule is None:
            raise InvalidConfig(f"model '{model_name}': config field {path} is not supported by this server")
        if rule is True:
            continue
        assert isinstance(rule, Mapping)
        if isinstance(value, Message):
            _check_message(value, rule, f"{path}.", model_name)
        else:  # a repeated message field
            for i, item in enumerate(value):
                _check_message(item, rule, f"{path}[{i}].", model_name)


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
