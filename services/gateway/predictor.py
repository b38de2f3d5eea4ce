"""The prediction pipeline: validate, choose a version, fetch features, assemble the row, infer, log, answer.

`Predictor.predict` serves Predict (one row) and PredictBatch (many rows of one
model). Validated rows of concurrent calls meet in one micro-batcher per model
(see batcher.py): a batch makes one GetOnlineFeatures call for all its rows,
assembles their FP32 inputs as one matrix in the model's feature order, and
makes one ModelInfer call per version among them, so the per-RPC cost of both
hops is paid once per batch and each caller waits for one wake-up. Features are
optional: when they cannot be read (down, slow, open breaker) each missing
value is replaced by its default and the row is marked degraded. Inference is
not optional: its failure fails the rows, fast. A shadow version scores the
same rows beside the primary; its outputs go only into the log record.

Nothing answered is lost: every row's inference-log record (OK, degraded,
failed, shadowed) is written ahead to the producer's disk log before the row is
answered (`RecordPublisher.write`, one write() per group of concurrent records),
so a SIGKILL of the process cannot lose the record of an answered prediction. If
that write fails (disk full), the row fails UNAVAILABLE instead of answering OK
without a record. Kafka is not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from opentelemetry import trace

from infergrid.logging.v1 import logging_pb2
from infergrid.types.v1 import value_pb2
from libs.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    overloaded,
    status_code_of,
)
from libs.inference_log import CURRENT_SCHEMA_VERSION
from services.gateway import metrics as m
from services.gateway.batcher import MicroBatcher
from services.gateway.cache import CachedAnswer, ResponseCache, cache_key
from services.gateway.catalog import ModelCatalog, ModelSpec, event_times_wire
from services.gateway.features import FeatureSource
from services.gateway.models import ModelClient
from services.gateway.publisher import RecordPublisher
from services.gateway.routing import TrafficRouter

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

_NUMBER_KINDS = ("float_value", "double_value", "int64_value", "bool_value")
_DEADLINE_MARGIN_S = 0.002
_MAX_NAME = 200
# Stands in for a span when the request is not sampled (`with` yields None).
_NO_SPAN = contextlib.nullcontext()

Outputs = dict[str, np.ndarray]


class RowInput(Protocol):
    """One row as the caller sent it (PredictRequest and PredictRow both fit)."""

    @property
    def request_id(self) -> str: ...

    @property
    def entities(self) -> Mapping[str, str]: ...

    @property
    def features(self) -> Mapping[str, value_pb2.Value]: ...


@dataclass(frozen=True)
class PredictorSettings:
    """The pipeline's knobs (from GatewayConfig's upstream, batching and cache sections)."""

    features_timeout_s: float = 0.1
    inference_timeout_s: float = 0.5
    request_timeout_s: float = 1.0
    max_batch_rows: int = 256
    max_batch_delay_s: float = 0.0
    max_concurrent_batches: int = 1
    max_pending_rows: int = 4096
    max_in_flight_rows: int = 4096
    # Rows one tenant may have in flight (0: half of max_in_flight_rows, at least one full batch), so one tenant's batches
    # cannot take the whole process and starve the others.
    max_tenant_in_flight_rows: int = 0
    max_batch_request_rows: int = 1000
    cache_key_prefix: str = "igw:"


@dataclass(frozen=True)
class CallInfo:
    """What the transport knows about a call: who, until when, and what the edge allowed."""

    tenant: str = ""
    # Seconds left of the caller's deadline; None when it sent none.
    time_remaining: float | None = None
    # The models the edge authorized this call for; None: not restricted here.
    allowed_models: frozenset[str] | None = None


@dataclass(slots=True)
class Prediction:
    """One answered row."""

    request_id: str
    model: str
    version: str
    outputs: Outputs
    degraded_features: list[str] = field(default_factory=list)
    cached: bool = False


@dataclass(slots=True)
class _Row:
    """A validated row: its inputs, its model input (request part first), where it goes, what happened."""

    source: RowInput
    request_id: str
    version: str
    shadow: str
    # Request-time inputs over the defaults, full width; the batch turns them into `values`.
    inputs: list[float]
    degraded: list[str]
    values: np.ndarray | None = None
    traced: bool = False
    # Filled by the batch: monotonic ns of the features and inference stages, for stage spans.
    stages: tuple[int, int, int, int] = (0, 0, 0, 0)
    # The shadow call of the row's batch and the row's index in it.
    shadow_call: asyncio.Task[Outputs] | None = None
    shadow_index: int = 0
    # Filled by the batch: per store ref, the event time (µs) of the value used, 0 where a default was.
    event_us: np.ndarray | None = None


class Predictor:
    """The gateway's domain: see the module docstring."""

    def __init__(
        self,
        catalog: ModelCatalog,
        router: TrafficRouter,
        features: FeatureSource,
        models: ModelClient,
        publisher: RecordPublisher,
        *,
        settings: PredictorSettings | None = None,
        cache: ResponseCache | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.catalog = catalog
        self._tracer = tracer or _tracer
        self.router = router
        self._features = features
        self._models = models
        self._publisher = publisher
        self._cache = cache
        self.settings = s = settings or PredictorSettings()
        self._metrics = m.GatewayMetrics()
        self.batcher: MicroBatcher[ModelSpec, _Row, Outputs] = MicroBatcher(
            "the feature and inference services",
            self._run_batch,
            max_batch=s.max_batch_rows,
            max_delay_s=s.max_batch_delay_s,
            max_pending=s.max_pending_rows,
            max_concurrent=s.max_concurrent_batches,
            observe_size=self._metrics.features_batch.observe,
            target_of=lambda spec: router.latency_target_s(spec.name),
        )
        self.in_flight = 0
        # Rows in flight by tenant (per-tenant load shedding).
        self.tenant_in_flight: dict[str, int] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._id_prefix = uuid.uuid4().hex[:20]
        self._id_counter = itertools.count(1)

    # Entry point.

    async def predict(
        self, model: str, version: str, rows: Sequence[RowInput], call: CallInfo, *, batch: bool = False
    ) -> list[Prediction]:
        """Scores `rows` of `model` (at `version`, or as the traffic split chooses).

        Args:
            model: The model name.
            version: An explicit version, or "" for the traffic split.
            rows: The rows; field names in errors are prefixed `rows[i].` when `batch` is set.
            call: Tenant, deadline and edge permissions of the call.
            batch: Whether this is a PredictBatch call (affects error field names only).

        Raises:
            InvalidArgument, NotFound, PermissionDenied: the request is wrong (the field is named).
            ResourceExhausted: load is being shed, here or by the inference service (with a retry hint).
            Unavailable, DeadlineExceeded: inference failed or time ran out.
        """
        start_ns = time.time_ns()
        if not model:
            raise InvalidArgument("model: is required (a model name, for example 'fraud')")
        if call.allowed_models is not None and model not in call.allowed_models:
            raise PermissionDenied(f"model {model[:_MAX_NAME]!r}: not the model this call was authorized for")
        spec = self.catalog.get(model)
        if version and spec.versions and version not in spec.versions:
            raise NotFound(f"model {model!r} version {version[:_MAX_NAME]!r} is not served")
        if batch:
            if not rows:
                raise InvalidArgument("rows: at least one row is required")
            if len(rows) > self.settings.max_batch_request_rows:
                raise InvalidArgument(
                    f"rows: {len(rows)} rows, at most {self.settings.max_batch_request_rows} per call"
                )
        validated = [
            self._validate(spec, version, row, f"rows[{i}]." if batch else "") for i, row in enumerate(rows)
        ]
        n = len(validated)
        if self.in_flight + n > self.settings.max_in_flight_rows:
            m.SHED.inc(n)
            raise overloaded(
                f"gateway overloaded: {self.in_flight} rows in flight (limit {self.settings.max_in_flight_rows})"
            )
        tenant_rows = self.tenant_in_flight.get(call.tenant, 0)
        # Default: half the process, but never less than one full batch.
        tenant_cap = self.settings.max_tenant_in_flight_rows or max(
            self.settings.max_in_flight_rows // 2, self.settings.max_batch_request_rows
        )
        if tenant_rows + n > tenant_cap:
            m.SHED.inc(n)
            raise overloaded(
                f"tenant {call.tenant[:64]!r} has {tenant_rows} rows in flight (limit {tenant_cap})"
            )
        left = call.time_remaining
        deadline = asyncio.get_running_loop().time() + (
            self.settings.request_timeout_s if left is None else left
        )
        self.in_flight += n
        self.tenant_in_flight[call.tenant] = tenant_rows + n
        try:
            if n == 1:
                return [await self._predict_row(spec, validated[0], call, deadline, start_ns)]
            return list(
                await asyncio.gather(
                    *(self._predict_row(spec, row, call, deadline, start_ns) for row in validated)
                )
            )
        finally:
            self.in_flight -= n
            left_rows = self.tenant_in_flight.get(call.tenant, n) - n
            if left_rows > 0:
                self.tenant_in_flight[call.tenant] = left_rows
            else:
                self.tenant_in_flight.pop(call.tenant, None)

    async def report_gauges(self, interval_s: float = 0.5) -> None:
        """Publishes the queue depths as gauges until cancelled (cheaper than per-request updates)."""
        queued = m.QUEUED.labels("pipeline")
        while True:
            m.IN_FLIGHT.set(self.in_flight)
            queued.set(self.batcher.depth)
            await asyncio.sleep(interval_s)

    # Validation and version choice.

    def _validate(self, spec: ModelSpec, version: str, row: RowInput, where: str) -> _Row:
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
        degraded = [] if len(features) == len(columns) else [n for n in columns if n not in features]
        if version:
            choice_version, shadow = version, self.router.shadow_for(spec.name, version)
        else:
            choice = self.router.choose(spec.name, entities, spec.latest_version)
            choice_version, shadow = choice.version, choice.shadow
        if shadow and spec.versions and shadow not in spec.versions:
            shadow = ""
        # Unique without a syscall per request: a random per-process prefix and a counter.
        request_id = row.request_id or f"{self._id_prefix}{next(self._id_counter):012x}"
        return _Row(row, request_id, choice_version, shadow, inputs, degraded)

    # One row.

    async def _predict_row(
        self, spec: ModelSpec, row: _Row, call: CallInfo, deadline: float, start_ns: int
    ) -> Prediction:
        current = trace.get_current_span()
        span_context = current.get_span_context()
        # Stage spans only for sampled requests: a non-recording span still costs microseconds.
        row.traced = current.is_recording()
        key = b""
        try:
            if self._cache is not None:
                key = cache_key(
                    self.settings.cache_key_prefix,
                    spec.name,
                    row.version,
                    row.source.entities,
                    row.source.features,
                )
                hit = await self._cache.get(key)
                m.CACHE.labels("hit" if hit is not None else "miss").inc()
                if hit is not None:
                    row.values = np.asarray(row.inputs, dtype=np.float32)
                    prediction = Prediction(
                        row.request_id, spec.name, row.version, hit.outputs, list(hit.degraded_features), True
                    )
                    await self._finish(
                        spec,
                        row,
                        prediction,
                        call=call,
                        start_ns=start_ns,
                        span_context=span_context,
                        deadline=deadline,
                    )
                    return prediction
            timeout = _time_left(
                deadline, self.settings.features_timeout_s + self.settings.inference_timeout_s
            )
            outputs = await self.batcher.submit(spec, row, timeout)
        except ServiceError as exc:
            self._metrics.request(spec.name, row.version, exc.code.name).inc()
            if isinstance(exc, ResourceExhausted):
                m.SHED.inc()
            elif not isinstance(exc, InvalidArgument):
                await self._write_failure(
                    spec, row, call=call, start_ns=start_ns, span_context=span_context, exc=exc
                )
            raise
        finally:
            if row.traced:
                _stage_spans(self._tracer, row)
        prediction = Prediction(row.request_id, spec.name, row.version, outputs, row.degraded)
        await self._finish(
            spec, row, prediction, call=call, start_ns=start_ns, span_context=span_context, deadline=deadline
        )
        if self._cache is not None and key:
            self._spawn(self._cache.put(key, CachedAnswer(outputs, tuple(row.degraded))))
        return prediction

    # One batch: features for all rows, one matrix, one inference call per version.

    async def _run_batch(
        self, spec: ModelSpec, rows: list[_Row], timeout: float
    ) -> Sequence[Outputs | BaseException]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        n = len(rows)
        results: list[Outputs | BaseException | None] = [None] * n
        matrix = np.array([row.inputs for row in rows], dtype=np.float32)
        f0 = f1 = time.monotonic_ns()
        if spec.store_refs:
            await self._add_features(
                spec, rows, matrix, results, min(timeout, self.settings.features_timeout_s)
            )
            f1 = time.monotonic_ns()
            m.FEATURES_STAGE.observe((f1 - f0) / 1e9)
        groups: dict[str, list[int]] = {}
        shadows: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if results[i] is None:
                row.values = matrix[i]
                groups.setdefault(row.version, []).append(i)
                if row.shadow:
                    shadows.setdefault(row.shadow, []).append(i)
        left = deadline - loop.time() - _DEADLINE_MARGIN_S
        if left <= 0:
            raise DeadlineExceeded("the request deadline passed while features were read")
        infer_timeout = min(left, self.settings.inference_timeout_s)
        for version, indices in shadows.items():
            task = loop.create_task(self._infer(spec, version, matrix, indices, infer_timeout))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            task.add_done_callback(_retrieve)  # rows that were cancelled never look at it
            for position, i in enumerate(indices):
                rows[i].shadow_call, rows[i].shadow_index = task, position
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
        for version, answer in zip(versions, answers, strict=True):
            indices = groups[version]
            if isinstance(answer, BaseException):
                for i in indices:
                    results[i] = answer
                continue
            names = tuple(answer)
            if len(names) == 1:
                (name,) = names
                column = answer[name]
                for position, i in enumerate(indices):
                    results[i] = {name: column[position]}
            else:
                for position, i in enumerate(indices):
                    results[i] = {k: answer[k][position] for k in names}
        stages = (f0, f1, i0, i1)
        for row in rows:
            row.stages = stages
        return results  # type: ignore[return-value]

    async def _add_features(
        self,
        spec: ModelSpec,
        rows: list[_Row],
        matrix: np.ndarray,
        results: list[Outputs | BaseException | None],
        timeout: float,
    ) -> None:
        """Fills the store columns; a failed or missing value keeps its default and marks the row degraded."""
        entities = [row.source.entities for row in rows]
        try:
            block = await self._features.fetch(spec, entities, timeout)
        except Exception as exc:
            if not _is_invalid_argument(exc):  # features are optional: any failure serves the defaults
                m.FEATURE_ERRORS.labels(_reason(exc)).inc()
                for row in rows:
                    row.degraded.extend(spec.store_refs)
                return
            if len(rows) == 1:
                results[0] = _entities_error(exc)
                return
            # One bad row must not fail its batch-mates: ask again row by row.
            singles = await asyncio.gather(
                *(self._features.fetch(spec, [e], timeout) for e in entities), return_exceptions=True
            )
            values = np.zeros((len(rows), len(spec.store_refs)), dtype=np.float32)
            present = np.zeros_like(values, dtype=bool)
            event_us: np.ndarray | None = np.zeros(values.shape, dtype=np.int64)
            for i, single in enumerate(singles):
                if isinstance(single, BaseException):
                    if _is_invalid_argument(single):
                        results[i] = _entities_error(single)
                    else:
                        m.FEATURE_ERRORS.labels(_reason(single)).inc()
                else:
                    values[i], present[i] = single.values[0], single.present[0]
                    if single.event_us is not None and event_us is not None:
                        event_us[i] = single.event_us[0]
        else:
            values, present, event_us = block.values, block.present, block.event_us
        if event_us is not None:
            for row, times in zip(rows, event_us, strict=True):
                row.event_us = times
        matrix[:, spec.store_columns] = np.where(present, values, spec.store_defaults)
        if not present.all():
            refs = spec.store_refs
            for k in np.flatnonzero(~present.all(axis=1)).tolist():
                rows[k].degraded.extend(refs[j] for j in np.flatnonzero(~present[k]).tolist())

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
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    # Answer and log.

    async def _finish(
        self,
        spec: ModelSpec,
        row: _Row,
        prediction: Prediction,
        *,
        call: CallInfo,
        start_ns: int,
        span_context: trace.SpanContext,
        deadline: float,
    ) -> None:
        """Builds the row's record and returns once it is written ahead (raises Unavailable if it cannot be)."""
        end_ns = time.time_ns()
        record = self._record(
            spec, row, call=call, start_ns=start_ns, end_ns=end_ns, span_context=span_context
        )
        for name, array in prediction.outputs.items():
            _set_value(record.outputs[name], array)
        record.degraded = bool(prediction.degraded_features)
        record.degraded_features.extend(prediction.degraded_features)
        record.cached = prediction.cached
        if row.shadow_call is not None:
            await self._add_shadow(spec, row, record, start_ns=start_ns, deadline=deadline)
        try:
            await self._write(record, row.traced)
        except Unavailable:
            self._metrics.request(spec.name, row.version, "UNAVAILABLE").inc()
            raise
        self._metrics.request(spec.name, row.version, "OK").inc()
        self._metrics.latency(spec.name).observe((time.time_ns() - start_ns) / 1e9)
        if prediction.degraded_features:
            self._metrics.degraded(spec.name).inc()

    def _record(
        self,
        spec: ModelSpec,
        row: _Row,
        *,
        call: CallInfo,
        start_ns: int,
        end_ns: int,
        span_context: trace.SpanContext,
    ) -> logging_pb2.InferenceLogRecord:
        record = logging_pb2.InferenceLogRecord(
            schema_version=CURRENT_SCHEMA_VERSION,
            request_id=row.request_id,
            tenant=call.tenant,
            model=spec.name,
            model_version=row.version,
            entities=row.source.entities,
            request_inputs=row.source.features,
            latency_us=(end_ns - start_ns) // 1000,
        )
        record.request_time.FromNanoseconds(start_ns)
        record.response_time.FromNanoseconds(end_ns)
        values = row.values if row.values is not None else np.asarray(row.inputs, dtype=np.float32)
        wire = spec.features_wire.copy()
        wire[spec.feature_slots] = np.ascontiguousarray(values).view(np.uint8)
        times = b"" if row.event_us is None else event_times_wire(spec, row.event_us.tolist())
        record.MergeFromString(wire.tobytes() + times)
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        return record

    async def _add_shadow(
        self,
        spec: ModelSpec,
        row: _Row,
        record: logging_pb2.InferenceLogRecord,
        *,
        start_ns: int,
        deadline: float,
    ) -> None:
        """Puts the shadow's outputs (or its failure) into the record, waiting for it until the deadline."""
        task = row.shadow_call
        assert task is not None
        shadow = record.shadow
        shadow.model_version = row.shadow
        if not task.done():  # it started before the primary call: usually it has answered already
            left = deadline - asyncio.get_running_loop().time() - _DEADLINE_MARGIN_S
            if left > 0:
                await asyncio.wait((task,), timeout=left)
        if task.done() and not task.cancelled() and task.exception() is None:
            for name, array in task.result().items():
                _set_value(shadow.outputs[name], array[row.shadow_index])
            label = "OK"
        else:
            if not task.done():
                code = status_code_of(DeadlineExceeded("the shadow did not answer before the deadline"))
            else:
                error = None if task.cancelled() else task.exception()
                code = status_code_of(error) if error is not None else None
            shadow.status_code = code.value[0] if code is not None else 2
            label = code.name if code is not None else "UNKNOWN"
        m.SHADOW.labels(spec.name, row.shadow, label).inc()
        shadow.latency_us = max(0, (time.time_ns() - start_ns) // 1000)

    async def _write_failure(
        self,
        spec: ModelSpec,
        row: _Row,
        *,
        call: CallInfo,
        start_ns: int,
        span_context: trace.SpanContext,
        exc: ServiceError,
    ) -> None:
        """Writes the record of a failed row before its error is answered (a write failure is only logged)."""
        record = self._record(
            spec, row, call=call, start_ns=start_ns, end_ns=time.time_ns(), span_context=span_context
        )
        record.status_code = exc.code.value[0]
        record.error_message = exc.message[:1000]
        record.degraded = bool(row.degraded)
        record.degraded_features.extend(row.degraded)
        with contextlib.suppress(Unavailable):  # the row fails with its own error either way
            await self._write(record)

    async def _write(self, record: logging_pb2.InferenceLogRecord, traced: bool = False) -> None:
        """Writes the record ahead (the `publish` span); a failure becomes UNAVAILABLE for the caller."""
        with self._tracer.start_as_current_span("publish") if traced else _NO_SPAN:
            started = time.perf_counter()
            try:
                await self._publisher.write(record)
            except Exception as exc:
                m.LOG_WRITE_FAILED.inc()
                log.error("the inference-log record %s could not be written: %s", record.request_id, exc)
                raise Unavailable(
                    "the prediction's log record could not be written (the gateway's disk log failed); "
                    "retry, another replica may serve it"
                ) from None
            finally:
                m.PUBLISH_STAGE.observe(time.perf_counter() - started)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stops the batcher and waits (briefly) for background work (cache writes, shadow calls)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=2.0)
        await self.batcher.close()


def _stage_spans(tracer: trace.Tracer, row: _Row) -> None:
    """The row's features and inference spans, timed by its batch, as children of the current span."""
    f0, f1, i0, i1 = row.stages
    if not i1:
        return
    offset = time.time_ns() - time.monotonic_ns()
    for name, start, end in (("features", f0, f1), ("inference", i0, i1)):
        span = tracer.start_span(name, start_time=start + offset)
        span.set_attribute("infergrid.model_version", row.version)
        if name == "features" and row.degraded:
            span.set_attribute("infergrid.degraded", True)
        span.end(end_time=end + offset)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _time_left(deadline: float, cap: float) -> float:
    left = deadline - asyncio.get_running_loop().time() - _DEADLINE_MARGIN_S
    if left <= 0:
        raise DeadlineExceeded("the request deadline has passed")
    return min(cap, left)


def _set_value(target: value_pb2.Value, array: np.ndarray) -> None:
    if array.size == 1:
        target.float_value = float(array.reshape(-1)[0])
    else:
        target.float_list_value.values.extend(array.reshape(-1).tolist())


def _is_invalid_argument(exc: BaseException) -> bool:
    code = status_code_of(exc)
    return code is not None and code.name == "INVALID_ARGUMENT"


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
    code = status_code_of(exc)
    if code is not None:
        return code.name
    return type(exc).__name__
