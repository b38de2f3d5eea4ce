"""The dynamic batcher: one queue per model version, coalescing concurrent requests into batches.

A request joins the queue from the event loop (or from a server thread: `infer_blocking`); one
scheduler thread per model instance waits until the queue holds a full (or preferred) batch or the oldest
request has waited `max_queue_delay`, takes requests in arrival order up to
`max_batch_size` rows, runs the batch (so the event loop never blocks on the
model), splits the outputs back per request in order, and hands them to the
loop with one callback per batch (a batch whose requests all came from server threads
is resolved on the scheduler thread itself: no loop wake-up at all). The queue is bounded (a full queue sheds with
RESOURCE_EXHAUSTED and a retry hint: overload, which callers must not count as an
outage) and requests past their timeout fail with DEADLINE_EXCEEDED before they
use the model. With batching off, each request is executed alone but
still queued, bounded and timed out the same way.

Why threads and not an asyncio scheduler task: on a small CPU budget the cost
that matters is per batch on the event loop (task switches, executor futures,
timers). Here the loop pays one lock and, per batch, one wake-up.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace

from libs.batch_control import BatchController, LatencyTarget
from libs.errors import OVERLOAD_RETRY_S, ServiceError, retry_hint
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
    # Scheduler threads, i.e. batches that may execute at the same time.
    instances: int
    # 0: the delay is max_queue_delay_us; otherwise a BatchController adapts the delay (up to
    # max_queue_delay_us) and the batch cap (up to max_batch_size) to hold this p99 (µs).
    latency_target_us: int = 0
    # 0: one FIFO queue; otherwise a request at level L is queued behind every request at levels <= L and
    # ahead of those above it (1 is the highest), so batches take the highest levels first.
    priority_levels: int = 0


@dataclass(slots=True, eq=False)
class _Job:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[list[np.ndarray]] | concurrent.futures.Future[list[np.ndarray]]
    deadline_ns: int
    shape_key: object
    enqueued_ns: int = field(default_factory=_perf_ns)
    priority: int = 0
    trace_ctx: otel_context.Context | None = None
    wall_ns: int = 0


@dataclass(slots=True, eq=False)
class _Batch:
    """One executed batch and what happened to it (filled on the scheduler thread)."""

    jobs: list[_Job]
    expired: list[_Job]
    outputs: list[list[np.ndarray]] = field(default_factory=list)
    # Per job when the batch failed: its own error, or None if it succeeded when run alone.
    errors: list[BaseException | None] | None = None
    start_ns: int = field(default_factory=_perf_ns)
    start_wall: int = field(default_factory=time.time_ns)
    timings: tuple[int, int, int] = (0, 0, 0)


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
        self._cond = threading.Condition(threading.Lock())
        self._completing = threading.Lock()  # batch completions: metrics, statistics, the controller
        self._queue: collections.deque[_Job] = collections.deque()  # guarded by _cond
        self._queued_rows = 0  # guarded by _cond
        self._delay_ns = settings.max_queue_delay_us * 1000 if settings.dynamic else 0
        self._max_rows = settings.max_batch_size if settings.dynamic else 0
        # A batch of this many rows goes at once, without waiting for the delay.
        self._ready_rows = (
            settings.preferred_batch_sizes[0] if settings.preferred_batch_sizes else settings.max_batch_size
        )
        self.controller: BatchController | None = None
        if settings.dynamic and settings.latency_target_us > 0:
            self.controller = BatchController(
                LatencyTarget(
                    p99_s=settings.latency_target_us / 1e6,
                    max_delay_s=settings.max_queue_delay_us / 1e6,
                    max_batch=settings.max_batch_size,
                ),
                _perf_ns() / 1e9,
            )
            self._apply_control()
        else:
            metrics.queue_delay.set(self._delay_ns / 1e9)
            metrics.batch_cap.set(self._max_rows)
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._label = f"model '{settings.model}' version {settings.version}"

    def _apply_control(self) -> None:
        """Takes the controller's delay and batch cap (event loop; the schedulers read them unlocked)."""
        controller = self.controller
        assert controller is not None
        self._delay_ns = int(controller.delay_s * 1e9)
        self._max_rows = controller.max_batch
        preferred = self.settings.preferred_batch_sizes
        ready = preferred[0] if preferred else self.settings.max_batch_size
        self._ready_rows = min(ready, controller.max_batch)
        self._metrics.queue_delay.set(controller.delay_s)
        self._metrics.batch_cap.set(controller.max_batch)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Starts the scheduler threads; results are delivered on the running loop."""
        self._loop = asyncio.get_running_loop()
        for i in range(max(self.settings.instances, 1)):
            thread = threading.Thread(
                target=self._run,
                name=f"batcher-{self.settings.model}-{self.settings.version}-{i}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    async def infer(
        self, inputs: dict[str, np.ndarray], rows: int, timeout_ns: int = 0, priority: int = 0
    ) -> list[np.ndarray]:
        """Queues one request and waits for its outputs (in the batcher's output order).

        Args:
            inputs: Validated input arrays; with batching, the first dimension is `rows`.
            rows: Batch items in this request (1 for models without batching).
            timeout_ns: Fail with DEADLINE_EXCEEDED if not started within this time; 0: no limit.
            priority: The request's level (1 is the highest) when the settings have priority_levels.

        Raises:
            QueueFull: The queue is at its bound.
            RequestTimeout: The timeout passed while the request was queued.
            ModelUnavailable: The version is being unloaded.
            BackendError: The batch failed in the backend.
        """
        assert self._loop is not None, "start() the batcher first"
        return await self._submit(inputs, rows, timeout_ns, priority, self._loop.create_future())

    def infer_blocking(
        self, inputs: dict[str, np.ndarray], rows: int, timeout_ns: int = 0, priority: int = 0
    ) -> list[np.ndarray]:
        """`infer` from a thread other than the loop's (the threaded gRPC transport): it waits on that
        thread, and the loop still resolves the results with one wake-up per batch, none per request."""
        return self._submit(inputs, rows, timeout_ns, priority, concurrent.futures.Future()).result()

    def _submit(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        timeout_ns: int,
        priority: int,
        future: asyncio.Future[list[np.ndarray]] | concurrent.futures.Future[list[np.ndarray]],
    ) -> Any:
        """Queues one request with `future` for its outputs; returns the future."""
        metrics = self._metrics
        metrics.requests.inc()
        if self._closing:
            metrics.failed("unavailable", 0)
            raise ModelUnavailable(f"{self._label} is being unloaded")
        if len(self._queue) >= self.settings.max_queue_size:
            metrics.failed("queue_full", 0)
            raise QueueFull(
                f"{self._label}: queue is full ({self.settings.max_queue_size} requests waiting); "
                f"retry in {OVERLOAD_RETRY_S * 1000:.0f} ms",
                trailing_metadata=retry_hint(OVERLOAD_RETRY_S),
            )
        shape_key = tuple(a.shape[1:] for a in inputs.values()) if self.settings.variable_shapes else None
        job = _Job(inputs, rows, future, _perf_ns() + timeout_ns if timeout_ns > 0 else 0, shape_key)
        if trace.get_current_span().is_recording():
            job.trace_ctx = otel_context.get_current()
            job.wall_ns = time.time_ns()
        metrics.queue_depth.inc()
        with self._cond:
            if self.settings.priority_levels and priority:
                job.priority = priority
                self._enqueue_by_priority(job)
            else:
                self._queue.append(job)
            before = self._queued_rows
            self._queued_rows = before + rows
            # Wake a scheduler only when it has something new to decide: work after an empty
            # queue, or a batch that just became full. Other arrivals wait for the delay.
            if not before or (before < self._ready_rows <= self._queued_rows):
                self._cond.notify()
        return future

    def _enqueue_by_priority(self, job: _Job) -> None:
        """Inserts `job` after the last queued job of its level or a higher one (holding `_cond`)."""
        queue = self._queue
        index = len(queue)
        while index and queue[index - 1].priority > job.priority:
            index -= 1
        queue.insert(index, job)

    async def close(self) -> None:
        """Stops taking requests, finishes the queued and running ones, then stops the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        await asyncio.sleep(0)  # deliver the last batches' results

    # --- scheduler threads ---

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            if batch.jobs:
                try:
                    batch.outputs, batch.timings = self._compute(batch.jobs)
                except Exception as exc:  # the thread must outlive any one bad batch
                    self._isolate(batch, exc)
            if all(type(job.future) is concurrent.futures.Future for job in (*batch.jobs, *batch.expired)):
                # Every waiter is a thread (the threaded transport): resolved here, without waking the loop.
                self._complete(batch)
                continue
            loop = self._loop
            assert loop is not None
            try:
                loop.call_soon_threadsafe(self._complete, batch)
            except RuntimeError:  # the loop is closed (process exit)
                return

    def _isolate(self, batch: _Batch, exc: Exception) -> None:
        """After a failed batch, runs its requests one by one so one bad request fails alone."""
        if len(batch.jobs) == 1:
            batch.errors = [exc]
            return
        batch.outputs, batch.errors = [], []
        for job in batch.jobs:
            try:
                outputs, _ = self._compute([job])
                batch.outputs.append(outputs[0])
                batch.errors.append(None)
            except Exception as single:
                batch.outputs.append([])
                batch.errors.append(single)

    def _next_batch(self) -> _Batch | None:
        """Waits (holding `_cond`) for the next batch; None when closing and nothing is left."""
        cond, queue = self._cond, self._queue
        while not queue:
            if self._closing:
                return None
            cond.wait()
        if self._delay_ns and not self._closing:
            while queue and self._queued_rows < self._ready_rows and not self._closing:
                remaining = queue[0].enqueued_ns + self._delay_ns - _perf_ns()
                if remaining <= 0:
                    break
                cond.wait(remaining / 1e9)
        return self._take()

    def _take(self) -> _Batch:
        """Pops the next batch in arrival order, setting aside cancelled and expired requests."""
        queue = self._queue
        jobs: list[_Job] = []
        expired: list[_Job] = []
        rows = 0
        now = _perf_ns()
        cap = self._max_rows
        if cap and self.settings.preferred_batch_sizes:
            fitting = [p for p in self.settings.preferred_batch_sizes if p <= min(self._queued_rows, cap)]
            cap = fitting[-1] if fitting else cap
        while queue:
            job = queue[0]
            if job.future.done() or (job.deadline_ns and job.deadline_ns < now):
                queue.popleft()
                self._queued_rows -= job.rows
                expired.append(job)
                continue
            if jobs and (not cap or rows + job.rows > cap or job.shape_key != jobs[0].shape_key):
                break
            queue.popleft()
            self._queued_rows -= job.rows
            jobs.append(job)
            rows += job.rows
            if not cap:
                break
        if queue and self._queued_rows >= self._ready_rows:
            self._cond.notify()  # another instance can take the next full batch now
        return _Batch(jobs, expired)

    def _compute(self, jobs: list[_Job]) -> tuple[list[list[np.ndarray]], tuple[int, int, int]]:
        """Assembles the batch, runs the model, splits the outputs (scheduler thread)."""
        t0 = _perf_ns()
        if len(jobs) == 1:
            inputs = jobs[0].inputs
        else:
            inputs = {name: np.concatenate([job.inputs[name] for job in jobs]) for name in jobs[0].inputs}
        t1 = _perf_ns()
        results = self._model.run(inputs, self._output_names)
        t2 = _perf_ns()
        if len(jobs) == 1:
            split = [results]
        else:
            split = []
            offset = 0
            for job in jobs:
                end = offset + job.rows
                split.append([r[offset:end] for r in results])
                offset = end
        return split, (t1 - t0, t2 - t1, _perf_ns() - t2)

    # --- back on the event loop (or on the scheduler thread: `_run`) ---

    def _complete(self, batch: _Batch) -> None:
        """Resolves the batch's futures and records metrics: on the event loop, or on the scheduler thread
        when only threads wait (one at a time either way: `_completing`)."""
        with self._completing:
            self._complete_locked(batch)

    def _complete_locked(self, batch: _Batch) -> None:
        metrics = self._metrics
        stats = metrics.stats
        now = _perf_ns()
        popped = len(batch.jobs) + len(batch.expired)
        if popped:
            metrics.queue_depth.dec(popped)
        for job in batch.expired:
            if job.future.done():
                metrics.failed("cancelled", now - job.enqueued_ns)
                continue
            metrics.failed("timeout", now - job.enqueued_ns)
            waited_ms = (batch.start_ns - job.enqueued_ns) / 1e6
            job.future.set_exception(
                RequestTimeout(f"{self._label}: request timed out after {waited_ms:.1f} ms in the queue")
            )
        jobs = batch.jobs
        if not jobs:
            return
        for job in jobs:
            waited = batch.start_ns - job.enqueued_ns
            metrics.queue_seconds.observe(waited / 1e9)
            stats.queue.add(waited)
        ok_rows = 0
        for i, job in enumerate(jobs):
            elapsed = now - job.enqueued_ns
            error = batch.errors[i] if batch.errors is not None else None
            if error is None:
                ok_rows += job.rows
                metrics.request_seconds.observe(elapsed / 1e9)
                stats.success.add(elapsed)
                if not job.future.done():
                    job.future.set_result(batch.outputs[i])
                continue
            if isinstance(error, ServiceError):  # the request's own fault (e.g. bytes a backend refuses)
                metrics.failed("invalid", elapsed)
            else:
                log.error("%s: request failed in the backend", self._label, exc_info=error)
                metrics.failed("backend", elapsed)
                error = BackendError(f"{self._label} failed to execute: {type(error).__name__}: {error}")
            if not job.future.done():
                job.future.set_exception(error)
        controller = self.controller
        if controller is not None and ok_rows:
            latencies = [(now - job.enqueued_ns) / 1e9 for job in jobs]
            if controller.observe(latencies, ok_rows, now / 1e9, sum(batch.timings) / 1e9):
                self._apply_control()
        if ok_rows:
            input_ns, infer_ns, output_ns = batch.timings
            metrics.compute.observe((input_ns + infer_ns + output_ns) / 1e9)
            metrics.batch_size.observe(ok_rows)
            metrics.rows.inc(ok_rows)
            stats.record_batch(ok_rows, len(jobs), input_ns, infer_ns, output_ns)
        if any(job.trace_ctx is not None for job in jobs):
            self._record_spans(batch)

    def _record_spans(self, batch: _Batch) -> None:
        """Per traced request: a queue-wait and a compute span; one batch span linked to them all."""
        end_wall = time.time_ns()
        traced = [job for job in batch.jobs if job.trace_ctx is not None]
        links = [trace.Link(trace.get_current_span(job.trace_ctx).get_span_context()) for job in traced]
        batch_span = _tracer.start_span(
            "inference.batch",
            links=links,
            start_time=batch.start_wall,
            attributes={
                "inference.model": self.settings.model,
                "inference.version": self.settings.version,
                "inference.batch.requests": len(batch.jobs),
                "inference.batch.rows": sum(job.rows for job in batch.jobs),
            },
        )
        for error in batch.errors or ():
            if error is not None:
                batch_span.record_exception(error)
                batch_span.set_status(trace.Status(trace.StatusCode.ERROR))
        batch_link = [trace.Link(batch_span.get_span_context())]
        for job in traced:
            _tracer.start_span("inference.queue", context=job.trace_ctx, start_time=job.wall_ns).end(
                end_time=batch.start_wall
            )
            _tracer.start_span(
                "inference.compute", context=job.trace_ctx, start_time=batch.start_wall, links=batch_link
            ).end(end_time=end_wall)
        batch_span.end(end_time=end_wall)
