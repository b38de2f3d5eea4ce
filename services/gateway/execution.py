"""Batch execution: one micro-batch of a model's validated rows scored, one `RowResult` per row, in order.

A batch makes one GetOnlineFeatures call for all its rows, assembles their FP32 inputs as one matrix in
the model's column order, and makes one ModelInfer call per version among them (split at the model's
`max_batch_size`), so the per-RPC cost of both hops is paid once per batch. Features are optional: when
they cannot be read (down, slow, open breaker) each missing value is replaced by its default and the row
is degraded; a row whose entity keys the feature service refuses fails alone (its batch-mates are asked
again one by one). Inference is not optional: its failure fails the rows of that version. A shadow
version scores the same rows beside the primary, in the background; each row's result holds its call.
Rows are never changed: everything a row's batch learned is in its result.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from libs.errors import DeadlineExceeded, InvalidArgument, ServiceError, status_code_of
from services.gateway import metrics as m
from services.gateway.catalog import ModelSpec
from services.gateway.failover import Scores
from services.gateway.features import FeatureSource, FeatureValues, zeros
from services.gateway.inference_client import ModelClient
from services.gateway.validation import ValidRow

Outputs = dict[str, np.ndarray]

DEADLINE_MARGIN_S = 0.002


@dataclass(frozen=True, slots=True)
class ShadowCall:
    """A row's place in its batch's shadow call."""

    task: asyncio.Task[Outputs]
    index: int

    async def outcome(self, deadline: float) -> Outputs | BaseException:
        """The row's shadow outputs, waited for until `deadline` (loop time), or why there are none."""
        task = self.task
        if not task.done():  # it started before the primary call: usually it has answered already
            left = deadline - asyncio.get_running_loop().time() - DEADLINE_MARGIN_S
            if left > 0:
                await asyncio.wait((task,), timeout=left)
        if not task.done():
            return DeadlineExceeded("the shadow did not answer before the deadline")
        if task.cancelled():
            return asyncio.CancelledError()
        error = task.exception()
        if error is not None:
            return error
        return {name: array[self.index] for name, array in task.result().items()}


@dataclass(frozen=True, slots=True)
class RowResult:
    """What a row's batch did for it: its outputs or its error, and the inputs it was scored on."""

    # The FP32 model input row (column order): request values, store values, defaults.
    values: np.ndarray
    # Inputs that fell back to their defaults (request-time first, then store refs).
    degraded: list[str]
    outputs: Outputs = field(default_factory=dict)
    # Why the row failed (it has no outputs then).
    error: BaseException | None = None
    # Per store ref, the event time (µs) of the value used, 0 where a default was; None: not known.
    event_us: np.ndarray | None = None
    # Monotonic ns of the batch's features and inference stages (start, end, start, end), for stage spans.
    stages: tuple[int, int, int, int] = (0, 0, 0, 0)
    shadow: ShadowCall | None = None
    # The inference pool that scored the row ("": the gateway's only one).
    pool: str = ""


class BatchExecutor:
    """Runs the micro-batcher's batches (see the module docstring)."""

    def __init__(
        self,
        features: FeatureSource,
        models: ModelClient,
        *,
        features_timeout_s: float,
        inference_timeout_s: float,
        metrics: m.GatewayMetrics,
    ) -> None:
        self._features = features
        self._models = models
        self._features_timeout_s = features_timeout_s
        self._inference_timeout_s = inference_timeout_s
        self._metrics = metrics
        self._shadows: set[asyncio.Task[Any]] = set()

    async def run(self, spec: ModelSpec, rows: list[ValidRow], timeout: float) -> list[RowResult]:
        """Scores `rows` of `spec` within `timeout` seconds; one result per row, in order."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        n = len(rows)
        matrix = np.array([row.inputs for row in rows], dtype=np.float32)
        degraded = [list(row.degraded) for row in rows]
        errors: list[BaseException | None] = [None] * n
        event_us: np.ndarray | None = None
        f0 = f1 = time.monotonic_ns()
        if spec.store_refs:
            block, errors = await self._fetch(spec, rows, min(timeout, self._features_timeout_s))
            f1 = time.monotonic_ns()
            m.FEATURES_STAGE.observe((f1 - f0) / 1e9)
            if block is None:
                for names in degraded:
                    names.extend(spec.store_refs)
            else:
                event_us = block.event_us
                self._fill(spec, matrix, block, degraded)
        left = deadline - loop.time() - DEADLINE_MARGIN_S
        if left <= 0:
            late = DeadlineExceeded("the request deadline passed while features were read")
            return [
                RowResult(matrix[i], degraded[i], error=late, event_us=_row(event_us, i)) for i in range(n)
            ]
        groups: dict[str, list[int]] = {}
        shadows: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if errors[i] is None:
                groups.setdefault(row.version, []).append(i)
                if row.shadow:
                    shadows.setdefault(row.shadow, []).append(i)
        infer_timeout = min(left, self._inference_timeout_s)
        shadow_calls: list[ShadowCall | None] = [None] * n
        for version, indices in shadows.items():
            task = loop.create_task(self._infer(spec, version, matrix, indices, infer_timeout))
            self._shadows.add(task)
            task.add_done_callback(self._shadows.discard)
            task.add_done_callback(_retrieve)  # rows that were cancelled never look at it
            for position, i in enumerate(indices):
                shadow_calls[i] = ShadowCall(task, position)
        i0 = time.monotonic_ns()
        versions = list(groups)
        answers: list[Outputs | BaseException]
        if len(versions) == 1:  # the common case: no task per call
            try:
                answers = [await self._infer(spec, versions[0], matrix, groups[versions[0]], infer_timeout)]
            except Exception as exc:
                answers = [exc]
        else:
            answers = await asyncio.gather(
                *(self._infer(spec, v, matrix, groups[v], infer_timeout) for v in versions),
                return_exceptions=True,
            )
        i1 = time.monotonic_ns()
        m.INFERENCE_STAGE.observe((i1 - i0) / 1e9)
        stages = (f0, f1, i0, i1)
        outputs: list[Outputs] = [{} for _ in range(n)]
        pools = [""] * n
        for version, answer in zip(versions, answers, strict=True):
            indices = groups[version]
            if isinstance(answer, BaseException):
                for i in indices:
                    errors[i] = answer
                continue
            keys = tuple(answer)
            pool = answer.pool if isinstance(answer, Scores) else ""
            for position, i in enumerate(indices):
                outputs[i] = {name: answer[name][position] for name in keys}
                pools[i] = pool
        return [
            RowResult(
                matrix[i],
                degraded[i],
                outputs[i],
                errors[i],
                _row(event_us, i),
                stages,
                shadow_calls[i],
                pools[i],
            )
            for i in range(n)
        ]

    async def _fetch(
        self, spec: ModelSpec, rows: list[ValidRow], timeout: float
    ) -> tuple[FeatureValues | None, list[BaseException | None]]:
        """The rows' store values (None: unreadable, every one defaults) and the rows whose keys were refused."""
        n = len(rows)
        entities = [row.source.entities for row in rows]
        errors: list[BaseException | None] = [None] * n
        try:
            return await self._features.fetch(spec, entities, timeout), errors
        except Exception as exc:
            if _reason(exc) != "INVALID_ARGUMENT":  # features are optional: any failure serves the defaults
                m.FEATURE_ERRORS.labels(_reason(exc)).inc()
                return None, errors
            if n == 1:
                return None, [_entities_error(exc)]
        # One bad row must not fail its batch-mates: ask again row by row.
        singles = await asyncio.gather(
            *(self._features.fetch(spec, [e], timeout) for e in entities), return_exceptions=True
        )
        values, present, event_us = zeros(n, len(spec.store_refs))
        for i, single in enumerate(singles):
            if isinstance(single, BaseException):
                if _reason(single) == "INVALID_ARGUMENT":
                    errors[i] = _entities_error(single)
                else:
                    m.FEATURE_ERRORS.labels(_reason(single)).inc()
            else:
                values[i], present[i] = single.values[0], single.present[0]
                if single.event_us is not None:
                    event_us[i] = single.event_us[0]
        return FeatureValues(values, present, event_us), errors

    @staticmethod
    def _fill(spec: ModelSpec, matrix: np.ndarray, block: FeatureValues, degraded: list[list[str]]) -> None:
        """Puts the store values into the matrix; a missing one keeps its default and degrades its row."""
        present = block.present
        matrix[:, spec.store_columns] = np.where(present, block.values, spec.store_defaults)
        if not present.all():
            refs = spec.store_refs
            for k in np.flatnonzero(~present.all(axis=1)).tolist():
                degraded[k].extend(refs[j] for j in np.flatnonzero(~present[k]).tolist())

    async def _infer(
        self, spec: ModelSpec, version: str, matrix: np.ndarray, indices: list[int], timeout: float
    ) -> Outputs:
        inputs = matrix if len(indices) == len(matrix) else matrix[indices]
        limit = spec.max_batch_size
        if not limit or len(inputs) <= limit:
            self._metrics.inference_batch.observe(len(inputs))
            return await self._models.infer(spec, version, inputs, timeout)
        # More rows than the model takes per call: several calls, joined in order.
        chunks = [inputs[start : start + limit] for start in range(0, len(inputs), limit)]
        for chunk in chunks:
            self._metrics.inference_batch.observe(len(chunk))
        parts = await asyncio.gather(*(self._models.infer(spec, version, c, timeout) for c in chunks))
        joined = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        # Chunks may have failed over separately: every pool that served one, in order ("gpu,cpu").
        pool = ",".join(dict.fromkeys(p.pool for p in parts if isinstance(p, Scores) and p.pool))
        return Scores(joined, pool) if pool else joined

    async def close(self) -> None:
        """Waits (briefly) for the shadow calls still running."""
        if self._shadows:
            await asyncio.wait(list(self._shadows), timeout=2.0)


def _row(event_us: np.ndarray | None, i: int) -> np.ndarray | None:
    return None if event_us is None else event_us[i]


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _entities_error(exc: BaseException) -> InvalidArgument:
    """The caller's error for entity keys the feature service refused (the field named once)."""
    details = _details(exc)
    return InvalidArgument(details if details.startswith("entities") else f"entities: {details}")


def _details(exc: BaseException) -> str:
    if isinstance(exc, ServiceError):
        return exc.message
    details = getattr(exc, "details", None)
    return str(details() if callable(details) else exc)


def _reason(exc: BaseException) -> str:
    """The status name of a failure (`FEATURE_ERRORS`' label), or its type's name when it has none."""
    code = status_code_of(exc)
    if code is not None:
        return code.name
    return type(exc).__name__
