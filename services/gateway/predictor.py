"""The prediction pipeline: validate, admit, look up the cache, run the row's batch, write its record, answer.

`Predictor.predict` serves Predict (one row) and PredictBatch (many rows of one model). Its jobs live in
their own modules: request validation (validation.py), batch execution (execution.py: validated rows of
concurrent calls meet in one micro-batcher per model, batcher.py, and each gets a `RowResult`) and the
inference-log record (records.py). What stays here is the order of things and the per-call limits: rows
in flight per process and per tenant, the call's deadline, the response cache, metrics and stage spans.

Nothing answered is lost: every row's inference-log record (OK, degraded, failed, shadowed) is written
ahead to the producer's disk log before the row is answered (`RecordPublisher.write`, one write() per
group of concurrent records), so a SIGKILL of the process cannot lose the record of an answered
prediction. If that write fails (disk full), the row fails UNAVAILABLE instead of answering OK without a
record. Kafka is not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from opentelemetry import trace

from infergrid.logging.v1 import logging_pb2
from libs.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    overloaded,
)
from services.gateway import metrics as m
from services.gateway import records
from services.gateway.batcher import MicroBatcher
from services.gateway.cache import CachedAnswer, ResponseCache, cache_key
from services.gateway.catalog import ModelCatalog, ModelSpec
from services.gateway.config import BatchingConfig, ResponseCacheConfig, UpstreamConfig
from services.gateway.execution import DEADLINE_MARGIN_S, BatchExecutor, Outputs, RowResult
from services.gateway.features import FeatureSource
from services.gateway.inference_client import ModelClient
from services.gateway.publisher import RecordPublisher
from services.gateway.routing import TrafficRouter
from services.gateway.validation import RowInput, RowValidator, ValidRow, check_model

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

# Stands in for a span when the request is not sampled (`with` yields None).
_NO_SPAN = contextlib.nullcontext()


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
    # The named inference pool that scored it ("": the default target, or a cached answer).
    pool: str = ""


@dataclass(frozen=True, slots=True)
class _Call:
    """What every row of a call shares: its model, caller and times, the trace of its records and spans."""

    spec: ModelSpec
    call: CallInfo
    start_ns: int
    deadline: float
    span_context: trace.SpanContext
    traced: bool


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
        upstream: UpstreamConfig | None = None,
        batching: BatchingConfig | None = None,
        cache_config: ResponseCacheConfig | None = None,
        cache: ResponseCache | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.catalog = catalog
        self._tracer = tracer or _tracer
        self.router = router
        self._publisher = publisher
        self._cache = cache
        # The knobs are GatewayConfig's sections (their defaults are the only ones).
        self.upstream = up = upstream or UpstreamConfig()
        self.batching = s = batching or BatchingConfig()
        self._cache_key_prefix = (cache_config or ResponseCacheConfig()).response_cache_key_prefix
        self._metrics = m.GatewayMetrics()
        self._validator = RowValidator(router, s.max_batch_request_rows)
        self._executor = BatchExecutor(
            features,
            models,
            features_timeout_s=up.features_timeout_s,
            inference_timeout_s=up.inference_timeout_s,
            metrics=self._metrics,
        )
        self.batcher: MicroBatcher[ModelSpec, ValidRow, RowResult] = MicroBatcher(
            "the feature and inference services",
            self._executor.run,
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
        check_model(model, call.allowed_models)
        spec = self.catalog.get(model)
        validated = self._validator.validate(spec, version, rows, batch=batch)
        n = len(validated)
        tenant_rows = self._admit(n, call.tenant)
        left = call.time_remaining
        deadline = asyncio.get_running_loop().time() + (
            self.upstream.request_timeout_s if left is None else left
        )
        current = trace.get_current_span()
        # Stage spans only for sampled requests: a non-recording span still costs microseconds.
        rc = _Call(spec, call, start_ns, deadline, current.get_span_context(), current.is_recording())
        self.in_flight += n
        self.tenant_in_flight[call.tenant] = tenant_rows + n
        try:
            if n == 1:
                return [await self._predict_row(validated[0], rc)]
            return list(await asyncio.gather(*(self._predict_row(row, rc) for row in validated)))
        finally:
            self.in_flight -= n
            left_rows = self.tenant_in_flight.get(call.tenant, n) - n
            if left_rows > 0:
                self.tenant_in_flight[call.tenant] = left_rows
            else:
                self.tenant_in_flight.pop(call.tenant, None)

    def _admit(self, n: int, tenant: str) -> int:
        """Sheds `n` more rows past the process's or the tenant's in-flight limit; the tenant's rows now."""
        limit = self.batching.max_in_flight_rows
        if self.in_flight + n > limit:
            m.SHED.inc(n)
            raise overloaded(f"gateway overloaded: {self.in_flight} rows in flight (limit {limit})")
        tenant_rows = self.tenant_in_flight.get(tenant, 0)
        # Default: half the process, but never less than one full batch.
        tenant_cap = self.batching.max_tenant_in_flight_rows or max(
            limit // 2, self.batching.max_batch_request_rows
        )
        if tenant_rows + n > tenant_cap:
            m.SHED.inc(n)
            raise overloaded(f"tenant {tenant[:64]!r} has {tenant_rows} rows in flight (limit {tenant_cap})")
        return tenant_rows

    async def report_gauges(self, interval_s: float = 0.5) -> None:
        """Publishes the queue depths as gauges until cancelled (cheaper than per-request updates)."""
        queued = m.QUEUED.labels("pipeline")
        while True:
            m.IN_FLIGHT.set(self.in_flight)
            queued.set(self.batcher.depth)
            await asyncio.sleep(interval_s)

    async def _predict_row(self, row: ValidRow, rc: _Call) -> Prediction:
        spec = rc.spec
        key = b""
        result: RowResult | None = None
        try:
            if self._cache is not None:
                key = cache_key(
                    self._cache_key_prefix,
                    spec.name,
                    row.version,
                    row.source.entities,
                    row.source.features,
                )
                hit = await self._cache.get(key)
                m.CACHE.labels("hit" if hit is not None else "miss").inc()
                if hit is not None:
                    prediction = Prediction(
                        row.request_id, spec.name, row.version, hit.outputs, list(hit.degraded_features), True
                    )
                    await self._answer(row, rc, prediction, np.asarray(row.inputs, dtype=np.float32), None)
                    return prediction
            timeout = _time_left(
                rc.deadline, self.upstream.features_timeout_s + self.upstream.inference_timeout_s
            )
            result = await self.batcher.submit(spec, row, timeout)
            if result.error is not None:
                raise result.error
        except ServiceError as exc:
            self._metrics.request(spec.name, row.version, exc.code.name).inc()
            if isinstance(exc, ResourceExhausted):
                m.SHED.inc()
            elif not isinstance(exc, InvalidArgument):
                await self._write_failure(row, rc, result, exc)
            raise
        finally:
            if rc.traced and result is not None:
                _stage_spans(self._tracer, row, result)
        prediction = Prediction(
            row.request_id, spec.name, row.version, result.outputs, result.degraded, pool=result.pool
        )
        await self._answer(row, rc, prediction, result.values, result)
        if self._cache is not None and key:
            self._spawn(self._cache.put(key, CachedAnswer(result.outputs, tuple(result.degraded))))
        return prediction

    def _record(
        self, row: ValidRow, rc: _Call, values: np.ndarray, event_us: np.ndarray | None
    ) -> logging_pb2.InferenceLogRecord:
        return records.new_record(
            rc.spec,
            request_id=row.request_id,
            version=row.version,
            tenant=rc.call.tenant,
            entities=row.source.entities,
            request_inputs=row.source.features,
            values=values,
            event_us=event_us,
            start_ns=rc.start_ns,
            end_ns=time.time_ns(),
            span_context=rc.span_context,
        )

    async def _answer(
        self, row: ValidRow, rc: _Call, prediction: Prediction, values: np.ndarray, result: RowResult | None
    ) -> None:
        """Writes the answered row's record and returns once it is written ahead (Unavailable if it cannot be)."""
        spec = rc.spec
        record = self._record(row, rc, values, result.event_us if result is not None else None)
        records.set_answer(record, prediction.outputs, prediction.degraded_features, cached=prediction.cached)
        record.inference_pool = prediction.pool
        if result is not None and result.shadow is not None:
            outcome = await result.shadow.outcome(rc.deadline)
            latency_us = (time.time_ns() - rc.start_ns) // 1000
            label = records.set_shadow(record, row.shadow, outcome, latency_us)
            m.SHADOW.labels(spec.name, row.shadow, label).inc()
        try:
            await self._write(record, rc.traced)
        except Unavailable:
            self._metrics.request(spec.name, row.version, "UNAVAILABLE").inc()
            raise
        self._metrics.request(spec.name, row.version, "OK").inc()
        self._metrics.latency(spec.name).observe((time.time_ns() - rc.start_ns) / 1e9)
        if prediction.degraded_features:
            self._metrics.degraded(spec.name).inc()

    async def _write_failure(
        self, row: ValidRow, rc: _Call, result: RowResult | None, exc: ServiceError
    ) -> None:
        """Writes the record of a failed row before its error is answered (a write failure is only logged)."""
        if result is None:  # it failed before its batch ran
            result = RowResult(np.asarray(row.inputs, dtype=np.float32), list(row.degraded))
        record = self._record(row, rc, result.values, result.event_us)
        records.set_failure(record, exc, result.degraded)
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
        await self._executor.close()
        await self.batcher.close()


def _stage_spans(tracer: trace.Tracer, row: ValidRow, result: RowResult) -> None:
    """The row's features and inference spans, timed by its batch, as children of the current span."""
    f0, f1, i0, i1 = result.stages
    if not i1:
        return
    offset = time.time_ns() - time.monotonic_ns()
    for name, start, end in (("features", f0, f1), ("inference", i0, i1)):
        span = tracer.start_span(name, start_time=start + offset)
        span.set_attribute("infergrid.model_version", row.version)
        if name == "features" and result.degraded:
            span.set_attribute("infergrid.degraded", True)
        span.end(end_time=end + offset)


def _time_left(deadline: float, cap: float) -> float:
    left = deadline - asyncio.get_running_loop().time() - DEADLINE_MARGIN_S
    if left <= 0:
        raise DeadlineExceeded("the request deadline has passed")
    return min(cap, left)
