"""The served models' input layouts (from `<repo>/<model>/features.json`), precomputed for the hot path."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from libs.errors import NotFound
from services.gateway.records import RecordTemplate, record_template

log = logging.getLogger(__name__)

REQUEST_SOURCE = "request"
_MAX_BATCH_SIZE = re.compile(r"^\s*max_batch_size\s*:\s*(\d+)", re.MULTILINE)
_RESCAN_INTERVAL_S = 5.0


class CatalogError(ValueError):
    """A features.json file is malformed; the message names the file and the field."""


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """One model's input layout: the FP32 row the model takes, column by column.

    Columns come from the request (`request_columns`) or from feature views in the
    feature store (`store_refs`, "view:feature", fetched by the entity key columns in
    `entity_keys`). Every column has a default used when its value is missing.
    """

    name: str
    input_name: str
    output_name: str
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
    # Versions found as folders next to features.json; empty when none are (any version is tried).
    versions: tuple[str, ...]
    # The highest known version ("" lets the inference service choose).
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
    """Builds a ModelSpec from a features.json document.

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
        output_name=str(description.get("output", "")),
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


def load_spec(model_dir: Path) -> ModelSpec:
    """Reads `<model_dir>/features.json` and the version folders beside it."""
    path = model_dir / "features.json"
    try:
        description = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogError(f"{path}: {exc}") from None
    if not isinstance(description, dict):
        raise CatalogError(f"{path}: expected a JSON object")
    versions = tuple(sorted(p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()))
    max_batch = 0
    with contextlib.suppress(OSError):
        found = _MAX_BATCH_SIZE.search((model_dir / "config.pbtxt").read_text())
        max_batch = int(found.group(1)) if found else 0
    return parse_spec(model_dir.name, description, versions, max_batch)


class ModelCatalog:
    """The models the gateway serves, by name; rescans its folder (rate-limited) when asked for an unknown one."""

    def __init__(self, specs: Mapping[str, ModelSpec] | None = None, root: Path | None = None) -> None:
        self._specs: dict[str, ModelSpec] = dict(specs or {})
        self._root = root
        self._scanned = 0.0
        if root is not None:
            self.scan()

    def scan(self) -> None:
        """Reloads every `<root>/<model>/features.json`; a malformed one is logged and skipped."""
        self._scanned = time.monotonic()
        if self._root is None or not self._root.is_dir():
            return
        specs: dict[str, ModelSpec] = {}
        for model_dir in sorted(self._root.iterdir()):
            if not (model_dir / "features.json").is_file():
                continue
            try:
                specs[model_dir.name] = load_spec(model_dir)
            except CatalogError as exc:
                log.error("model %s skipped: %s", model_dir.name, exc)
        self._specs = specs

    def get(self, name: str) -> ModelSpec:
        """The spec of model `name`.

        Raises:
            NotFound: No such model (named in the message).
        """
        spec = self._specs.get(name)
        if spec is None:
            if self._root is not None and time.monotonic() - self._scanned > _RESCAN_INTERVAL_S:
                self.scan()
                spec = self._specs.get(name)
            if spec is None:
                raise NotFound(f"model {name[:200]!r} is not served")
        return spec

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._specs))
