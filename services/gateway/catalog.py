"""The served models' input layouts (from `<repo>/<model>/features.json`), precomputed for the hot path."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from libs.errors import NotFound

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
    # The `features` map of an InferenceLogRecord holding every input as a float, in wire format,
    # with the value bytes zeroed; `feature_slots` are the byte positions of the values, in column
    # order. Filling the slots and parsing the bytes in C costs a third of setting 32 map entries.
    features_wire: np.ndarray
    feature_slots: np.ndarray
    # Rows per ModelInfer call (the model config's max_batch_size; 0: no limit known).
    max_batch_size: int = 0
    # Per store ref (in `store_refs` order): the key field of its `feature_event_times` map entry (the
    # record's name of that feature), pre-framed for `event_times_wire`.
    event_time_keys: tuple[bytes, ...] = ()

    @property
    def width(self) -> int:
        return len(self.feature_names)


_RECORD_FEATURES_FIELD = 9
_RECORD_EVENT_TIMES_HEAD = bytes((21 << 3 | 2 | 0x80, 1))  # field 21 (feature_event_times), length-delimited
# The head and one-byte length of an entry shorter than 128 bytes (nearly all), by length.
_EVENT_TIMES_HEADS = tuple(_RECORD_EVENT_TIMES_HEAD + bytes((size,)) for size in range(128))


def _features_wire(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The wire template of `map<string, Value> features` (see ModelSpec.features_wire)."""
    parts: list[bytes] = []
    slots: list[int] = []
    position = 0
    for name in names:
        key = name.encode()
        # MapEntry { 1: key (string), 2: value (Value { 1: float_value (fixed32) }) }
        entry = _varint(0x0A) + _varint(len(key)) + key + b"\x12\x05\x0d"
        head = _varint(_RECORD_FEATURES_FIELD << 3 | 2) + _varint(len(entry) + 4) + entry
        slots.extend(range(position + len(head), position + len(head) + 4))
        parts.append(head + bytes(4))
        position += len(head) + 4
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy(), np.asarray(slots, dtype=np.intp)


def event_times_wire(spec: ModelSpec, event_us: Sequence[int]) -> bytes:
    """The `feature_event_times` entries of a record, in wire format, for one row's store features.

    Args:
        spec: The model.
        event_us: Per store ref (in `spec.store_refs` order), the event time of the value used in
            microseconds since the epoch; 0 where a default was used (no entry is written for it).

    Returns:
        Bytes to merge into an InferenceLogRecord (empty when no value came from the store).
    """
    parts: list[bytes] = []
    stamps: dict[int, bytes] = {}  # a view's features usually share one event time
    for key, us in zip(spec.event_time_keys, event_us, strict=True):
        if not us:
            continue
        stamp = stamps.get(us)
        if stamp is None:
            seconds, micros = divmod(us, 1_000_000)
            # Timestamp { 1: seconds (varint), 2: nanos (varint) }; negative seconds are ten-byte varints.
            body = (b"\x08" + _varint(seconds & 0xFFFFFFFFFFFFFFFF)) if seconds else b""
            if micros:
                body += b"\x10" + _varint(micros * 1000)
            stamp = stamps[us] = b"\x12" + _varint(len(body)) + body
        entry = key + stamp
        size = len(entry)
        parts.append(
            _EVENT_TIMES_HEADS[size] + entry
            if size < 128
            else _RECORD_EVENT_TIMES_HEAD + _varint(size) + entry
        )
    return b"".join(parts)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


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
    wire, slots = _features_wire(tuple(names))
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
        features_wire=wire,
        feature_slots=slots,
        max_batch_size=max_batch_size,
        event_time_keys=tuple(
            b"\x0a" + _varint(len(key)) + key for key in (names[i].encode() for i in store_columns)
        ),
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
