"""A micro-batcher: coalesces concurrent calls for the same key into one batch call and splits the results back.

Items for one key are collected until the batch holds `max_batch` of them or its
first item has waited `max_delay_s` (0: until the event loop's next turn, which
already gathers every request that arrived in the same wake-up), then the batch
function runs once for all of them. At most `max_concurrent` batch calls per key
run at once: while they do, new items wait and join one batch, which is sent as
soon as a call returns. Under light load a row goes out at once; under heavy load
batches grow by themselves to what arrived during one round trip (the dynamic
batching of Triton's scheduler, without a fixed wait). Its results (or exceptions) go back to each
caller in order. The number of items queued or in a running batch is bounded:
past `max_pending`, `submit` sheds load with ResourceExhausted (with a retry hint).

With a p99 target for a key (`target_of`, the platform file's `latency_target_p99_ms`), the delay and
the batch size of that key are not fixed: a `libs.batch_control.BatchController` adapts them, within
`max_delay_s` (or a fifth of the target when that is 0) and `max_batch`, to the p99 of the items' own
latencies (submit to result).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

from libs.batch_control import BatchController, LatencyTarget
from libs.errors import DeadlineExceeded, overloaded

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741 - the item type
R = TypeVar("R")

# A batch function: (key, items, timeout seconds) -> one result or exception per item, in order.
BatchFunction = Callable[[K, list[I], float], Awaitable[Sequence["R | BaseException"]]]
SizeObserver = Callable[[int], None]
# A key's p99 target in seconds (0: none, the fixed delay and batch size).
TargetLookup = Callable[[K], float]


class _Batch(Generic[I, R]):
    __slots__ = ("deadline", "futures", "items", "started", "submitted")

    def __init__(self) -> None:
        self.items: list[I] = []
        self.futures: list[asyncio.Future[R]] = []
        # perf_counter of each submit (latencies for a key's controller).
        self.submitted: list[float] = []
        self.deadline = 0.0
        # True once the task that runs this batch exists; it takes the batch at its first step.
        self.started = False


class _Key(Generic[I, R]):
    """One key's open batch (None when no item waits), its running calls and its controller."""

    __slots__ = ("control", "open", "running")

    def __init__(self, control: BatchController | None) -> None:
        self.open: _Batch[I, R] | None = None
        self.running = 0
        self.control = control


class MicroBatcher(Generic[K, I, R]):
    """Coalesces `submit(key, item)` calls into `run(key, items, timeout)` calls (see module docstring)."""

    def __init__(
        self,
        name: str,
        run: BatchFunction[K, I, R],
        *,
        max_batch: int,
        max_delay_s: float,
        max_pending: int,
        max_concurrent: int,
        observe_size: SizeObserver | None = None,
        target_of: TargetLookup[K] | None = None,
    ) -> None:
        self.name = name
        self._run_batch = run
        self._max_batch = max_batch
        self._delay = max_delay_s
        self._max_pending = max_pending
        self._observe = observe_size
        self._max_concurrent = max(1, max_concurrent)
        self._keys: dict[K, _Key[I, R]] = {}
        self._target_of = target_of
        # Controllers outlive a key's idle moments (its _Key goes when nothing is pending).
        self._controls: dict[K, BatchController] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Items queued or in a running batch call.
        self.depth = 0

    def submit(self, key: K, item: I, timeout: float) -> asyncio.Future[R]:
        """Adds `item` to the open batch of `key`; the future resolves to its result.

        Args:
            key: Items with equal keys share batch calls.
            item: The item.
            timeout: Seconds this item may wait for its result; the batch call gets the longest.

        Raises:
            ResourceExhausted: Too many items are pending (load shedding; carries a retry hint).
        """
        if self.depth >= self._max_pending:
            raise overloaded(
                f"gateway overloaded: {self.depth} rows waiting for {self.name} (limit {self._max_pending})"
            )
        loop = asyncio.get_running_loop()
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key(self._control(key))
        batch = state.open
        if batch is None:
            batch = state.open = _Batch()
        if not batch.started and state.running < self._max_concurrent:
            # The task's first step runs on the loop's next turn: every item submitted before
            # then joins this batch. (Creating it now saves a turn over call_soon + create_task.)
            self._start(key, state, batch)
        future: asyncio.Future[R] = loop.create_future()
        batch.items.append(item)
        batch.futures.append(future)
        if state.control is not None:
            batch.submitted.append(time.perf_counter())
        deadline = loop.time() + timeout
        batch.deadline = max(batch.deadline, deadline)
        self.depth += 1
        if len(batch.items) >= (state.control.max_batch if state.control is not None else self._max_batch):
            state.open = None  # full: later items start a new batch
            if not batch.started:
                self._start(key, state, batch)
        return future

    def _control(self, key: K) -> BatchController | None:
        """The key's controller, made (or remade) when its target is set (or changed); None without one."""
        target_s = self._target_of(key) if self._target_of is not None else 0.0
        control = self._controls.get(key)
        if not target_s:
            if control is not None:
                del self._controls[key]
            return None
        if control is None or control.target.p99_s != target_s:
            if len(self._controls) > 1000:  # keys of replaced catalogs
                self._controls.clear()
            max_delay = self._delay if self._delay > 0 else target_s / 5
            control = self._controls[key] = BatchController(
                LatencyTarget(p99_s=target_s, max_delay_s=max_delay, max_batch=self._max_batch),
                time.perf_counter(),
            )
        return control

    def _start(self, key: K, state: _Key[I, R], batch: _Batch[I, R]) -> None:
        batch.started = True
        state.running += 1
        task = asyncio.get_running_loop().create_task(self._run(key, state, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _done(self, key: K, state: _Key[I, R]) -> None:
        state.running -= 1
        batch = state.open
        if batch is not None and not batch.started:
            # Items waited for this call to return: send them now, as one batch.
            self._start(key, state, batch)
        elif batch is None and state.running == 0 and self._keys.get(key) is state:
            del self._keys[key]

    async def _run(self, key: K, state: _Key[I, R], batch: _Batch[I, R]) -> None:
        items, futures = batch.items, batch.futures
        control = state.control
        try:
            delay = control.delay_s if control is not None else self._delay
            if delay > 0:
                await asyncio.sleep(delay)
            if state.open is batch:
                state.open = None  # from here on, arriving items start the next batch
            n = len(items)
            if self._observe is not None:
                self._observe(n)
            timeout = batch.deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                raise DeadlineExceeded(f"the request deadline passed before the {self.name} call")
            called = time.perf_counter()
            results = await self._run_batch(key, items, timeout)
            if len(results) != n:
                raise RuntimeError(f"{self.name} batch returned {len(results)} results for {n} items")
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
        else:
            for future, result in zip(futures, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            if control is not None and batch.submitted:
                now = time.perf_counter()
                control.observe([now - t for t in batch.submitted], n, now, now - called)
        finally:
            if state.open is batch:
                state.open = None
            self.depth -= len(items)
            self._done(key, state)

    async def close(self) -> None:
        """Cancels open batches and running calls (shutdown)."""
        for state in self._keys.values():
            batch = state.open
            state.open = None
            if batch is None or batch.started:  # a started batch is cancelled with its task
                continue
            for future in batch.futures:
                future.cancel()
            self.depth -= len(batch.items)
        self._keys.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
