"""The dynamic batcher: one queue per model version, coalescing concurrent requests into batches.

A request joins the queue; a scheduler task waits until the queue holds a full
(or preferred) batch or the oldest request has waited `max_queue_delay`, takes
requests in arrival order up to `max_batch_size` rows, and runs the batch on the
version's executor (one thread per instance, so the event loop never blocks).
The outputs are split back per request, in order. The queue is bounded (a full
queue sheds with RESOURCE_EXHAUSTED) and requests past their timeout fail with
DEADLINE_EXCEEDED before they use the model. With batching off, each request is
executed alone but still queued, bounded and timed out the same way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace

from libs.telemetry import tracer
from services.inference.backends import LoadedModel
from services.inference.errors import BackendError, ModelUnavailable, QueueFull, RequestTimeout
from services.inference.metrics import VersionMetrics

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
_perf_ns = time.perf_counter_ns


@dataclass(frozen=True)
class BatcherSettings:
    """How one version's queue behaves (from its ModelSpec and the server defaults)."""

    model: str
    version: int
    # False: every request is executed on its own.
    dynamic: bool
    max_batch_size: int
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_size: int
    # Some non-batch dimension is -1: only requests with equal shapes share a batch.
    variable_shapes: bool
    instances: int


class _Job:
    __slots__ = (
        "deadline_ns",
        "enqueued_ns",
        "future",
        "inputs",
        "rows",
        "shape_key",
        "trace_ctx",
        "wall_ns",
    )

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        future: asyncio.Future[list[np.ndarray]],
        deadline_ns: int,
        shape_key: object,
    ) -> None:
        self.inputs = inputs
        self.rows = rows
        self.future = future
        self.enqueued_ns = _perf_ns()
        self.deadline_ns = deadline_ns
        self.shape_key = shape_key
        self.trace_ctx: otel_context.Context | None = None
        self.wall_ns = 0


class DynamicBatcher:
    """Queues requests for one loaded model version and executes them in batches."""

    def __init__(
        self,
        settings: BatcherSettings,
        model: LoadedModel,
        output_names: Sequence[str],
        metrics: VersionMetrics,
    ) -> None:
        self.settings = settings
        self._model = model
        self._output_names = list(output_names)
        self._metrics = metrics
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_rows = 0
        self._delay_ns = settings.max_queue_delay_us * 1000
        self._max_rows = settings.max_batch_size if settings.dynamic else 0
        # A batch of this many rows goes at once, without waiting for the delay.
        self._ready_rows = (
            settings.preferred_batch_sizes[0] if settings.preferred_batch_sizes else settings.max_batch_size
        )
        self._executor = ThreadPoolExecutor(
            max_workers=settings.instances, thread_name_prefix=f"infer-{settings.model}-{settings.version}"
        )
        self._slots = asyncio.Semaphore(settings.instances)
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._closing = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._label = f"model '{settings.model}' version {settings.version}"

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Starts the scheduler task on the running loop."""
        self._scheduler = asyncio.get_running_loop().create_task(
            self._schedule(), name=f"batcher-{self.settings.model}-{self.settings.version}"
        )

    async def infer(self, inputs: dict[str, np.ndarray], rows: int, timeout_ns: int = 0) -> list[np.ndarray]:
        """Queues one request and waits for its outputs (in the batcher's output order).

        Args:
            inputs: Validated input arrays; with batching, the first dimension is `rows`.
            rows: Batch items in this request (1 for models without batching).
            timeout_ns: Fail with DEADLINE_EXCEEDED if not started within this time; 0: no limit.

        Raises:
            QueueFull: The queue is at its bound.
            RequestTimeout: The timeout passed while the request was queued.
            ModelUnavailable: The version is being unloaded.
            BackendError: The batch failed in the backend.
        """
        metrics = self._metrics
        metrics.requests.inc()
        if self._closing:
            metrics.failed("unavailable", 0)
            raise ModelUnavailable(f"{self._label} is being unloaded")
        if len(self._queue) >= self.settings.max_queue_size:
            metrics.failed("queue_full", 0)
            raise QueueFull(f"{self._label}: queue is full ({self.settings.max_queue_size} requests waiting)")
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        shape_key = tuple(a.shape[1:] for a in inputs.values()) if self.settings.variable_shapes else None
        job = _Job(inputs, rows, future, _perf_ns() + timeout_ns if timeout_ns > 0 else 0, shape_key)
        span = trace.get_current_span()
        if span.is_recording():
            job.trace_ctx = otel_context.get_current()
            job.wall_ns = time.time_ns()
        self._queue.append(job)
        self._queued_rows += rows
        metrics.queue_depth.inc()
        self._wakeup.set()
        if self._queued_rows >= self._ready_rows:
            self._full.set()
        return await future

    async def close(self) -> None:
        """Stops taking requests, finishes the queued and running ones, then frees the executor."""
        self._closing = True
        self._wakeup.set()
        self._full.set()
        if self._scheduler is not None:
            await self._scheduler
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    async def _schedule(self) -> None:
        while True:
            try:
                if not self._queue:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._wait_for_batch()
                await self._slots.acquire()
                batch = self._take()
                if not batch:
                    self._slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            except asyncio.CancelledError:
                raise
            except Exception:  # the scheduler must outlive any one bad batch
                log.exception("%s: scheduler error", self._label)

    async def _wait_for_batch(self) -> None:
        """Waits until a full/preferred batch is queued or the oldest request's delay is up."""
        if not self.settings.dynamic or self._delay_ns <= 0 or self._closing:
            return
        if self._queued_rows >= self._ready_rows:
            return
        remaining = self._queue[0].enqueued_ns + self._delay_ns - _perf_ns()
        if remaining <= 0:
            return
        self._full.clear()
        try:
            async with asyncio.timeout(remaining / 1e9):
                await self._full.wait()
        except TimeoutError:
            pass

    def _take(self) -> list[_Job]:
        """Pops the next batch in arrival order, dropping cancelled and expired requests."""
        queue = self._queue
        batch: list[_Job] = []
        rows = 0
        popped = 0
        now = _perf_ns()
        cap = self._max_rows
        if cap and self.settings.preferred_batch_sizes:
            fitting = [p for p in self.settings.preferred_batch_sizes if p <= self._queued_rows]
            cap = fitting[-1] if fitting else cap
        while queue:
            job = queue[0]
            if job.future.done():  # the caller went away (cancelled)
                queue.popleft()
                popped += 1
                self._queued_rows -= job.rows
                self._metrics.failed("cancelled", now - job.enqueued_ns)
                continue
            if job.deadline_ns and job.deadline_ns < now:
                queue.popleft()
                popped += 1
                self._queued_rows -= job.rows
                self._metrics.failed("timeout", now - job.enqueued_ns)
                waited_ms = (now - job.enqueued_ns) / 1e6
                job.future.set_exception(
                    RequestTimeout(f"{self._label}: request timed out after {waited_ms:.1f} ms in the queue")
                )
                continue
            if batch:
                if not cap or rows + job.rows > cap:
                    break
                if job.shape_key != batch[0].shape_key:
                    break
            queue.popleft()
            popped += 1
            self._queued_rows -= job.rows
            batch.append(job)
            rows += job.rows
            if not cap:
                break
        if popped:
            self._metrics.queue_depth.dec(popped)
        return batch

    async def _execute(self, batch: list[_Job]) -> None:
        metrics = self._metrics
        stats = metrics.stats
        start = _perf_ns()
        batch_span = self._start_spans(batch)
        try:
            for job in batch:
                waited = start - job.enqueued_ns
                metrics.queue_seconds.observe(waited / 1e9)
                stats.queue.add(waited)
            try:
                outputs, timings = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._compute, batch
                )
            except Exception as exc:
                log.exception("%s: batch of %d requests failed", self._label, len(batch))
                error = BackendError(f"{self._label} failed to execute: {type(exc).__name__}: {exc}")
                now = _perf_ns()
                for job in batch:
                    metrics.failed("backend", now - job.enqueued_ns)
                    if not job.future.done():
                        job.future.set_exception(error)
                if batch_span is not None:
                    batch_span.record_exception(exc)
                return
            rows = sum(job.rows for job in batch)
            input_ns, infer_ns, output_ns = timings
            metrics.compute.observe((input_ns + infer_ns + output_ns) / 1e9)
            metrics.batch_size.observe(rows)
            metrics.rows.inc(rows)
            stats.record_batch(rows, len(batch), input_ns, infer_ns, output_ns)
            now = _perf_ns()
            for job, result in zip(batch, outputs, strict=True):
                elapsed = now - job.enqueued_ns
                metrics.request_seconds.observe(elapsed / 1e9)
                stats.success.add(elapsed)
                if not job.future.done():
                    job.future.set_result(result)
        finally:
            self._slots.release()
            if batch_span is not None:
                self._end_spans(batch, batch_span)

    def _compute(self, batch: list[_Job]) -> tuple[list[list[np.ndarray]], tuple[int, int, int]]:
        """Runs on an executor thread: assemble the batch, run the model, split the outputs."""
        t0 = _perf_ns()
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            first = batch[0].inputs
            inputs = {name: np.concatenate([job.inputs[name] for job in batch]) for name in first}
        t1 = _perf_ns()
        results = self._model.run(inputs, self._output_names)
        t2 = _perf_ns()
        if len(batch) == 1:
            split = [results]
        else:
            split = []
            offset = 0
            for job in batch:
                end = offset + job.rows
                split.append([r[offset:end] for r in results])
                offset = end
        t3 = _perf_ns()
        return split, (t1 - t0, t2 - t1, t3 - t2)

    def _start_spans(self, batch: list[_Job]) -> trace.Span | None:
        """Queue-wait spans under each traced request, and one batch span linked to them."""
        traced = [job for job in batch if job.trace_ctx is not None]
        if not traced:
            return None
        now_wall = time.time_ns()
        links = []
        for job in traced:
            queue_span = _tracer.start_span("inference.queue", context=job.trace_ctx, start_time=job.wall_ns)
            queue_span.end(end_time=now_wall)
            links.append(trace.Link(trace.get_current_span(job.trace_ctx).get_span_context()))
        span = _tracer.start_span(
            "inference.batch",
            links=links,
            start_time=now_wall,
            attributes={
                "inference.model": self.settings.model,
                "inference.version": self.settings.version,
                "inference.batch.requests": len(batch),
                "inference.batch.rows": sum(job.rows for job in batch),
            },
        )
        return span

    def _end_spans(self, batch: list[_Job], batch_span: trace.Span) -> None:
        now_wall = time.time_ns()
        start_wall = getattr(batch_span, "start_time", None) or now_wall
        for job in batch:
            if job.trace_ctx is not None:
                compute = _tracer.start_span(
                    "inference.compute",
                    context=job.trace_ctx,
                    start_time=start_wall,
                    links=[trace.Link(batch_span.get_span_context())],
                )
                compute.end(end_time=now_wall)
        batch_span.end(end_time=now_wall)
