"""Request validation: a call's rows checked against the model's input layout before anything is scored.

Each row comes out as a `ValidRow`: its request-time inputs over the defaults (full width, column order),
the request-time inputs it left out (their defaults are used: the row is degraded), the version and shadow
the traffic split chose, and its request id. A wrong row fails the whole call, naming the field
(`rows[i].` first in a PredictBatch call).
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from infergrid.types.v1 import value_pb2
from libs.errors import InvalidArgument, NotFound, PermissionDenied
from services.gateway.catalog import ModelSpec
from services.gateway.routing import TrafficRouter

_NUMBER_KINDS = ("float_value", "double_value", "int64_value", "bool_value")
_MAX_NAME = 200


class RowInput(Protocol):
    """One row as the caller sent it (PredictRequest and PredictRow both fit)."""

    @property
    def request_id(self) -> str: ...

    @property
    def entities(self) -> Mapping[str, str]: ...

    @property
    def features(self) -> Mapping[str, value_pb2.Value]: ...


@dataclass(frozen=True, slots=True)
class ValidRow:
    """A validated row (see the module docstring)."""

    source: RowInput
    request_id: str
    version: str
    # The shadow version scoring the row beside `version` ("": none).
    shadow: str
    inputs: list[float]
    # Request-time inputs the row left out (their defaults are used).
    degraded: tuple[str, ...]


def check_model(model: str, allowed_models: frozenset[str] | None) -> None:
    """Raises when the call names no model or one it was not authorized for.

    Raises:
        InvalidArgument: No model.
        PermissionDenied: `allowed_models` (the edge's authorization) does not hold it.
    """
    if not model:
        raise InvalidArgument("model: is required (a model name, for example 'fraud')")
    if allowed_models is not None and model not in allowed_models:
        raise PermissionDenied(f"model {model[:_MAX_NAME]!r}: not the model this call was authorized for")


class RowValidator:
    """Validates a call's rows and gives each a version (the traffic split's) and a request id."""

    def __init__(self, router: TrafficRouter, max_batch_request_rows: int) -> None:
        self._router = router
        self._max_rows = max_batch_request_rows
        # Unique ids without a syscall per request: a random per-process prefix and a counter.
        self._id_prefix = uuid.uuid4().hex[:20]
        self._id_counter = itertools.count(1)

    def validate(
        self, spec: ModelSpec, version: str, rows: Sequence[RowInput], *, batch: bool
    ) -> list[ValidRow]:
        """The rows of a call to `spec` at `version` ("": the traffic split chooses per row), validated.

        Args:
            spec: The model.
            version: An explicit version, or "".
            rows: The rows as sent.
            batch: Whether this is a PredictBatch call (at least one row, a bounded number; fields
                named `rows[i].`).

        Raises:
            NotFound: The version is not served.
            InvalidArgument: A row is wrong (the field is named).
        """
        if version and spec.versions and version not in spec.versions:
            raise NotFound(f"model {spec.name!r} version {version[:_MAX_NAME]!r} is not served")
        if batch:
            if not rows:
                raise InvalidArgument("rows: at least one row is required")
            if len(rows) > self._max_rows:
                raise InvalidArgument(f"rows: {len(rows)} rows, at most {self._max_rows} per call")
        return [self._row(spec, version, row, f"rows[{i}]." if batch else "") for i, row in enumerate(rows)]

    def _row(self, spec: ModelSpec, version: str, row: RowInput, where: str) -> ValidRow:
        entities = row.entities
        for key in spec.entity_keys:
            if not entities.get(key):
                raise InvalidArgument(f"{where}entities.{key}: is required by model {spec.name!r}")
        if len(entities) != len(spec.entity_keys):
            for key in entities:
                if key not in spec.entity_keys:
                    raise InvalidArgument(
                        f"{where}entities.{key[:_MAX_NAME]}: not an entity key of model {spec.name!r} "
                        f"(expected {', '.join(spec.entity_keys) or 'none'})"
                    )
        inputs = list(spec.default_list)
        features = row.features
        columns = spec.request_columns
        for name in features:  # iterating keys is C; .items() on a proto map is a Python generator
            value = features[name]
            column = columns.get(name)
            if column is None:
                raise InvalidArgument(
                    f"{where}features.{name[:_MAX_NAME]}: not a request-time input of model {spec.name!r} "
                    f"(expected {', '.join(columns) or 'none'})"
                )
            kind = value.WhichOneof("kind")
            if kind not in _NUMBER_KINDS:
                raise InvalidArgument(
                    f"{where}features.{name}: expected a number (float, double, int64 or bool), "
                    f"got {kind or 'no value'}"
                )
            number = float(getattr(value, kind))
            if not math.isfinite(number):
                raise InvalidArgument(f"{where}features.{name}: must be finite, got {number}")
            inputs[column] = number
        degraded = () if len(features) == len(columns) else tuple(n for n in columns if n not in features)
        if version:
            chosen, shadow = version, self._router.shadow_for(spec.name, version)
        else:
            choice = self._router.choose(spec.name, entities, spec.latest_version)
            chosen, shadow = choice.version, choice.shadow
        if shadow and spec.versions and shadow not in spec.versions:
            shadow = ""
        request_id = row.request_id or f"{self._id_prefix}{next(self._id_counter):012x}"
        return ValidRow(row, request_id, chosen, shadow, inputs, degraded)
