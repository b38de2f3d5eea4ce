"""The served models: their input layouts (the gateway's `<input_layouts>/<model>.json`), precomputed for the
hot path, with what the inference service says about each (versions, readiness, max_batch_size)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from libs.errors import NotFound
from services.gateway.records import RecordTemplate, record_template

log = logging.getLogger(__name__)

REQUEST_SOURCE = "request"
_RESCAN_INTERVAL_S = 5.0


class CatalogError(ValueError):
    """An input layout file is malformed; the message names the file and the field."""


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """One model's input layout: the FP32 row the model takes, column by column.

    Columns come from the request (`request_columns`) or from feature views in the
    feature store (`store_refs`, "view:feature", fetched by the entity key columns in
    `entity_keys`). Every column has a default used when its value is missing.
    """

    name: str
    input_name: str
    feature_names: tuple[str, ...]
    defaults: np.ndarray
    default_list: tuple[float, ...]
    # Request-time feature name -> column index.
    request_columns: Mapping[str, int]
    # Feature-store references in fetch order, and the column each one fills.
    store_refs: tuple[str, ...]
    store_columns: np.ndarray
    store_defaults: np.ndarray
    # The entity key columns the model's views need (sorted), and view -> key column.
    entity_keys: tuple[str, ...]
    view_keys: Mapping[str, str]
    # The versions the inference service serves; empty while not known (any version is tried).
    versions: tuple[str, ...]
    # The highest ready version ("" lets the inference service choose).
    latest_version: str
    # The pre-framed parts of the model's inference-log records.
    record: RecordTemplate
    # Rows per ModelInfer call (the model config's max_batch_size; 0: no limit known).
    max_batch_size: int = 0

    @property
    def width(self) -> int:
        return len(self.feature_names)


def parse_spec(
    name: str, description: Mapping[str, object], versions: tuple[str, ...] = (), max_batch_size: int = 0
) -> ModelSpec:
    """Builds a ModelSpec from an input layout document.

    Raises:
        CatalogError: A required field is missing or has the wrong type (named in the message).
    """
    features = description.get("features")
    if not isinstance(features, list) or not features:
        raise CatalogError(f"{name}: 'features' must be a non-empty list")
    raw_entities = description.get("entities", {})
    if not isinstance(raw_entities, dict):
        raise CatalogError(f"{name}: 'entities' must map view names to entity key columns")
    view_keys = {str(k): str(v) for k, v in raw_entities.items()}
    names: list[str] = []
    defaults: list[float] = []
    request_columns: dict[str, int] = {}
    store_refs: list[str] = []
    store_columns: list[int] = []
    for i, raw in enumerate(features):
        where = f"{name}: features[{i}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise CatalogError(f"{where}: expected an object with a 'name'")
        feature = str(raw["name"])
        source = str(raw.get("source", REQUEST_SOURCE))
        try:
            default = float(raw.get("default", 0.0))
        except (TypeError, ValueError):
            raise CatalogError(f"{where}.default: expected a number, got {raw.get('default')!r}") from None
        names.append(feature)
        defaults.append(default)
        if source == REQUEST_SOURCE:
            request_columns[feature] = i
            continue
        if source not in view_keys:
            raise CatalogError(f"{where}.source: view {source!r} has no entity key in 'entities'")
        store_refs.append(feature if ":" in feature else f"{source}:{feature}")
        store_columns.append(i)
    if len(set(names)) != len(names):
        raise CatalogError(f"{name}: a feature name is listed twice")
    used_views = {ref.split(":", 1)[0] for ref in store_refs}
    latest = max(versions, key=lambda v: (int(v) if v.isdigit() else -1, v)) if versions else ""
    default_array = np.asarray(defaults, dtype=np.float32)
    columns = np.asarray(store_columns, dtype=np.intp)
    return ModelSpec(
        name=name,
        input_name=str(description.get("input", "input")),
        feature_names=tuple(names),
        defaults=default_array,
        default_list=tuple(float(v) for v in default_array),
        request_columns=request_columns,
        store_refs=tuple(store_refs),
        store_columns=columns,
        store_defaults=default_array[columns],
        entity_keys=tuple(sorted({view_keys[v] for v in used_views})),
        view_keys=view_keys,
        versions=versions,
        latest_version=latest,
        record=record_template(names, store_columns),
        max_batch_size=max_batch_size,
    )


def load_layout(path: Path) -> ModelSpec:
    """Reads the input layout `<folder>/<model>.json` (the model is named by the file); no versions known yet."""
    try:
        description = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogError(f"{path}: {exc}") from None
    if not isinstance(description, dict):
        raise CatalogError(f"{path}: expected a JSON object")
    return parse_spec(path.stem, description)


@dataclass(frozen=True)
class ModelFacts:
    """What the inference service says about a model (see model_facts.py)."""

    # The versions it serves, and those of them that are ready.
    versions: tuple[str, ...]
    ready: tuple[str, ...]
    # Rows per ModelInfer call (0: no limit).
    max_batch_size: int


class ModelCatalog:
    """The models the gateway serves, by name: input layouts (rescanned, rate-limited, when asked for an
    unknown model) with the inference service's facts about each applied (`apply`)."""

    def __init__(self, specs: Mapping[str, ModelSpec] | None = None, layouts: Path | None = None) -> None:
        self._specs: dict[str, ModelSpec] = dict(specs or {})
        self._facts: dict[str, ModelFacts] = {}
        self._layouts = layouts
        self._scanned = 0.0
        if layouts is not None:
            self.scan()

    def scan(self) -> None:
        """Reloads every `<layouts>/<model>.json`; a malformed one is logged and skipped."""
        self._scanned = time.monotonic()
        if self._layouts is None or not self._layouts.is_dir():
            return
        specs: dict[str, ModelSpec] = {}
        for path in sorted(self._layouts.glob("*.json")):
            try:
                specs[path.stem] = self._with_facts(load_layout(path))
            except CatalogError as exc:
                log.error("model %s skipped: %s", path.stem, exc)
        self._specs = specs

    def apply(self, facts: Mapping[str, ModelFacts]) -> None:
        """Applies the inference service's facts to the models they name (the others keep theirs)."""
        self._facts.update(facts)
        self._specs = {name: self._with_facts(spec) for name, spec in self._specs.items()}

    def _with_facts(self, spec: ModelSpec) -> ModelSpec:
        facts = self._facts.get(spec.name)
        if facts is None:
            return spec
        served = facts.ready or facts.versions
        latest = max(served, key=lambda v: (int(v) if v.isdigit() else -1, v)) if served else ""
        if (spec.versions, spec.latest_version, spec.max_batch_size) == (
            facts.versions,
            latest,
            facts.max_batch_size,
        ):
            return spec  # unchanged: the same object (the micro-batcher keys on it)
        return dataclasses.replace(
            spec, versions=facts.versions, latest_version=latest, max_batch_size=facts.max_batch_size
        )

    def get(self, name: str) -> ModelSpec:
        """The spec of model `name`.

        Raises:
            NotFound: No such model (named in the message).
        """
        spec = self._specs.get(name)
        if spec is None:
            if self._layouts is not None and time.monotonic() - self._scanned > _RESCAN_INTERVAL_S:
                self.scan()
                spec = self._specs.get(name)
            if spec is None:
                raise NotFound(f"model {name[:200]!r} is not served")
        return spec

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._specs))
