"""The model repository: `<root>/<model>/<version>/model.onnx` + `<root>/<model>/config.pbtxt`.

Loads models at start-up and on request, unloads them, and answers which
versions serve. Each version gets its own backend instance and batcher. A
(re)load builds the new versions first, swaps them in atomically, then drains
and frees the old ones, so requests keep flowing through a reload. A model or
version that fails to load records why (RepositoryIndex shows it) and the
others keep serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inference import model_config_pb2 as mc
from services.inference.backends import LoadedModel, ModelBackend
from services.inference.batcher import BatcherSettings, DynamicBatcher
from services.inference.config import ControlConfig, ModelServingConfig
from services.inference.errors import BackendUnavailable, ModelLoadError, ModelNotFound
from services.inference.metrics import VersionMetrics
from services.inference.model_config import (
    ModelSpec,
    TensorSpec,
    complete_config,
    read_config,
    spec_from_config,
)
from services.inference.model_files import check_model_files, write_model_files
from services.inference.warmup import warmup_samples

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"
UNLOADING = "UNLOADING"


@dataclass
class ServingVersion:
    """A loaded version: what a request needs, precomputed for the hot path."""

    model: str
    version: int
    spec: ModelSpec
    loaded: LoadedModel
    batcher: DynamicBatcher
    metrics: VersionMetrics
    version_str: str = ""
    inputs: dict[str, TensorSpec] = field(default_factory=dict)
    outputs: dict[str, TensorSpec] = field(default_factory=dict)
    output_index: dict[str, int] = field(default_factory=dict)
    # Set when the configured backend was unavailable and the fallback serves instead.
    note: str = ""

    def __post_init__(self) -> None:
        self.version_str = str(self.version)
        self.inputs = {t.name: t for t in self.spec.inputs}
        self.outputs = {t.name: t for t in self.spec.outputs}
        self.output_index = {t.name: i for i, t in enumerate(self.spec.outputs)}


@dataclass(frozen=True)
class IndexEntry:
    """One RepositoryIndex row."""

    name: str
    version: str
    state: str
    reason: str


def _safe_name(name: str) -> bool:
    """A name that stays one entry inside its folder: not empty, no separator, no `..`, not absolute, no NUL."""
    return (
        bool(name) and not any(c in name for c in "/\\\0") and ".." not in name and not name.startswith(".")
    )


def _numeric_versions(model_dir: Path) -> list[int]:
    """Version folders: numeric names not starting with 0 (as Triton)."""
    versions = []
    for child in model_dir.iterdir():
        if child.is_dir() and child.name.isdigit() and not child.name.startswith("0"):
            versions.append(int(child.name))
    return sorted(versions)


class ModelRepository:
    """Loaded models and their states; the single owner of backends' loaded instances."""

    def __init__(
        self, models: ModelServingConfig, control: ControlConfig, backends: Mapping[str, ModelBackend]
    ) -> None:
        """The repository at `models.model_repository` (None: no models), with the models section's
        start-up list, queue bound and warm-up, and the control section's limits on loaded configs."""
        self._root = models.model_repository
        self._backends = backends
        self._models = models
        self._control = control
        # name -> {"1": version, "2": ..., "": the latest}; replaced whole on change (readers never lock).
        self._serving: dict[str, dict[str, ServingVersion]] = {}
        self._states: dict[str, dict[int, tuple[str, str]]] = {}
        self._model_errors: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._startup_names: tuple[str, ...] = ()
        self.started = False

    def startup_models_ready(self) -> bool:
        """True when every start-up model has a serving version."""
        return all(name in self._serving for name in self._startup_names)

    # --- look-ups (hot path) ---

    def get(self, name: str, version: str = "") -> ServingVersion:
        """The serving version `version` of `name` ("" = the latest ready one).

        Raises:
            ModelNotFound: Unknown model, or the version is not ready; names both.
        """
        versions = self._serving.get(name)
        if versions is None:
            if name in self._states or name in self._model_errors:
                raise ModelNotFound(f"model '{name}' is not ready (see RepositoryIndex for why)")
            raise ModelNotFound(f"model '{name}' is not found")
        serving = versions.get(version)
        if serving is None:
            ready = sorted(v.version for k, v in versions.items() if k)
            raise ModelNotFound(f"model '{name}' version '{version}' is not found; ready versions: {ready}")
        return serving

    def is_ready(self, name: str, version: str = "") -> bool:
        versions = self._serving.get(name)
        return versions is not None and version in versions

    def ready_versions(self, name: str) -> list[int]:
        return sorted(v.version for k, v in self._serving.get(name, {}).items() if k)

    def serving(self) -> list[ServingVersion]:
        """Every serving version, by model name then version."""
        out: list[ServingVersion] = []
        for name in sorted(self._serving):
            out.extend(v for k, v in sorted(self._serving[name].items(), key=lambda kv: kv[1].version) if k)
        return out

    def models_on_disk(self) -> list[str]:
        if self._root is None or not self._root.is_dir():
            return []
        return sorted(p.name for p in self._root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model on disk or known, with each version's state and, when not ready, why."""
        entries: list[IndexEntry] = []
        for name in sorted(set(self.models_on_disk()) | set(self._states) | set(self._model_errors)):
            states = self._states.get(name, {})
            if name in self._model_errors and not any(s == READY for s, _ in states.values()):
                if not ready_only:
                    entries.append(IndexEntry(name, "", UNAVAILABLE, self._model_errors[name]))
            elif not states:
                if not ready_only:
                    entries.append(IndexEntry(name, "", "", ""))
            else:
                rows = (IndexEntry(name, str(v), *states[v]) for v in sorted(states))
                entries.extend(e for e in rows if not ready_only or e.state == READY)
        return entries

    # --- loading ---

    async def load_startup(self) -> None:
        """Loads the start-up models concurrently; a failure is recorded and logged, never raised."""
        names = list(self._models.startup_models) or self.models_on_disk()
        self._startup_names = tuple(names)
        results = await asyncio.gather(*(self.load(name) for name in names), return_exceptions=True)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                log.error("model %s failed to load: %s", name, result)
        self.started = True

    async def load(
        self, name: str, config: mc.ModelConfig | None = None, files: Mapping[str, bytes] | None = None
    ) -> None:
        """Loads (or reloads) every version of `name` its version policy selects.

        Args:
            name: The model folder name.
            config: A config to use instead of the folder's config.pbtxt (RepositoryModelLoad's
                `config` parameter).
            files: Model files to write into the folder first (`file:` parameters: path relative to
                the folder → bytes; model_files.py); the folder is created when absent. If the load
                fails, the folder is put back as it was.

        Raises:
            ModelNotFound: No such model folder (and no files to create it).
            InvalidArgument: A file path leaves the folder, or the files are above max_file_bytes.
            ModelLoadError: The config is bad or a version failed to load; says why.
        """
        if files:
            check_model_files(files, self._control.control_max_file_bytes)
        if self._root is None or not _safe_name(name) or not (files or (self._root / name).is_dir()):
            raise ModelNotFound(f"model '{name}' is not in the model repository")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            undo = await asyncio.to_thread(write_model_files, self._root / name, files) if files else None
            try:
                await self._load_locked(name, self._root / name, config)
            except BaseException:
                if undo is not None:
                    await asyncio.to_thread(undo)
                raise

    async def _load_locked(self, name: str, model_dir: Path, override: mc.ModelConfig | None) -> None:
        try:
            spec = await asyncio.to_thread(self._read_spec, name, model_dir, override)
            versions = spec.version_policy.select(_numeric_versions(model_dir))
            if not versions:
                raise ModelLoadError(
                    f"model '{name}': no version folder matches the version policy "
                    f"({spec.version_policy.kind}); found {_numeric_versions(model_dir)}"
                )
        except ModelLoadError as exc:
            self._model_errors[name] = exc.message
            raise
        self._model_errors.pop(name, None)
        states = self._states.setdefault(name, {})
        for version in versions:
            if states.get(version, ("", ""))[0] != READY:
                states[version] = (LOADING, "")
        results = await asyncio.gather(
            *(asyncio.to_thread(self._load_version, spec, model_dir, v) for v in versions),
            return_exceptions=True,
        )
        fresh: dict[str, ServingVersion] = {}
        failures: list[str] = []
        for version, result in zip(versions, results, strict=True):
            if isinstance(result, ModelLoadError):
                reason = result.message
            elif isinstance(result, BaseException):
                reason = f"{type(result).__name__}: {result}"
                log.error("model %s version %d failed to load", name, version, exc_info=result)
            else:
                fresh[str(version)] = serving = self._serve(version, *result)
                states[version] = (READY, serving.note)
                serving.metrics.ready.set(1)
                continue
            failures.append(f"version {version}: {reason}")
            states[version] = (UNAVAILABLE, reason)
        # Versions served before drain out: replaced by a fresh instance or no longer selected.
        # When nothing loaded, the old versions keep serving (a failed reload changes nothing).
        if fresh:
            old = self._serving.get(name, {})
            fresh[""] = max(fresh.values(), key=lambda s: s.version)
            self._serving = {**self._serving, name: fresh}
            await self._retire(name, [v for k, v in old.items() if k], keep={int(k) for k in fresh if k})
        if failures:
            raise ModelLoadError(f"failed to load model '{name}': " + "; ".join(failures))
        log.info(
            "model %s loaded", name, extra={"model": name, "versions": sorted(int(k) for k in fresh if k)}
        )

    def _read_spec(self, name: str, model_dir: Path, override: mc.ModelConfig | None) -> ModelSpec:
        config = mc.ModelConfig()
        config.CopyFrom(override if override is not None else read_config(model_dir))
        if config.default_model_filename and not _safe_name(config.default_model_filename):
            raise ModelLoadError(
                f"model '{name}': default_model_filename must be a plain file name (no '/', '\\', '..', "
                "absolute path)"
            )
        if not config.input or not config.output:
            backend = self._backends.get(config.backend or "onnxruntime") or self._backends["onnxruntime"]
            filename = config.default_model_filename or "model.onnx"
            candidates = [model_dir / str(v) / filename for v in reversed(_numeric_versions(model_dir))]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise ModelLoadError(
                    f"model '{name}': the config lists no inputs/outputs and no {filename} was found"
                )
            inputs, outputs = backend.signature(path)
            complete_config(config, inputs, outputs)
        spec = spec_from_config(config, name)
        if spec.instance_count > self._control.control_max_instances:
            raise ModelLoadError(
                f"model '{name}': {spec.instance_count} instances, at most {self._control.control_max_instances}"
            )
        if self._models.warmup:  # a bad model_warmup is the config's error, before any version loads
            warmup_samples(spec, model_dir)
        return spec

    def _load_version(
        self, spec: ModelSpec, model_dir: Path, version: int
    ) -> tuple[ModelSpec, LoadedModel, str]:
        """Runs on a worker thread: loads one version with its backend (or the fallback) and warms it up."""
        path = model_dir / str(version) / spec.model_filename
        if not path.is_file():
            raise ModelLoadError(f"{spec.model_filename} not found in {path.parent}")
        note = ""
        try:
            loaded = self._backends[spec.backend].load(path, spec)
        except BackendUnavailable as exc:
            if not spec.fallback_backend or spec.fallback_backend == spec.backend:
                raise
            note = f"{exc.message}; serving with fallback backend {spec.fallback_backend}"
            log.warning("model %s version %d: %s", spec.name, version, note)
            spec = spec.with_backend(spec.fallback_backend)
            loaded = self._backends[spec.backend].load(path, spec)
        if self._models.warmup:
            outputs = [t.name for t in spec.outputs]
            try:
                for sample in warmup_samples(spec, model_dir):
                    for _ in range(sample.count):
                        try:
                            loaded.run(sample.inputs, outputs)
                        except Exception as exc:
                            raise ModelLoadError(
                                f"warm-up '{sample.name}' failed: {type(exc).__name__}: {exc}"
                            ) from None
            except ModelLoadError:
                loaded.close()
                raise
        return spec, loaded, note

    def _serve(self, version: int, spec: ModelSpec, loaded: LoadedModel, note: str) -> ServingVersion:
        metrics = VersionMetrics(spec.name, version)
        batching = spec.batching
        settings = BatcherSettings(
            model=spec.name,
            version=version,
            dynamic=batching.dynamic,
            max_batch_size=max(batching.max_batch_size, 1),
            max_queue_delay_us=batching.max_queue_delay_us,
            latency_target_us=batching.latency_target_us,
            preferred_batch_sizes=batching.preferred_batch_sizes,
            max_queue_size=batching.max_queue_size or self._models.max_queue_size,
            variable_shapes=any(d < 0 for t in spec.inputs for d in t.dims),
            instances=spec.instance_count,
            priority_levels=batching.priority_levels,
        )
        batcher = DynamicBatcher(settings, loaded, [t.name for t in spec.outputs], metrics)
        batcher.start()
        return ServingVersion(spec.name, version, spec, loaded, batcher, metrics, note=note)

    async def _retire(self, name: str, retired: Sequence[ServingVersion], keep: set[int]) -> None:
        states = self._states.setdefault(name, {})
        for serving in retired:
            if serving.version not in keep:
                states[serving.version] = (UNLOADING, "")
        await asyncio.gather(*(self._close(s) for s in retired))
        for serving in retired:
            if serving.version not in keep:
                states[serving.version] = (UNAVAILABLE, "unloaded")
                serving.metrics.ready.set(0)

    @staticmethod
    async def _close(serving: ServingVersion) -> None:
        await serving.batcher.close()
        await asyncio.to_thread(serving.loaded.close)

    async def unload(self, name: str) -> None:
        """Stops serving every version of `name`; queued and running requests finish first.

        Raises:
            ModelNotFound: The model is neither loaded nor known.
        """
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._serving and name not in self._states and name not in self._model_errors:
                raise ModelNotFound(f"model '{name}' is not found")
            old = self._serving.get(name, {})
            self._serving = {k: v for k, v in self._serving.items() if k != name}
            self._model_errors.pop(name, None)
            await self._retire(name, [v for k, v in old.items() if k], keep=set())
            log.info("model %s unloaded", name)

    async def close(self) -> None:
        """Unloads everything (server shutdown)."""
        for name in list(self._serving):
            await self.unload(name)
