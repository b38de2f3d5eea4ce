"""Per-request failover between a model's inference pools (e.g. `gpu` then `cpu`), in preference order.

The platform file names inference pools (`inference_pools`: discovery targets) and, per model, the pools
it may run on in preference order (`models.<m>.pools`). `InferencePools` keeps one `ChannelPool`, one
`Dependency` (breaker, deadline) and one inference client per named pool, following the platform file and
each pool's discovery targets. `FailoverModelClient` sends each batch of a model with pools to the most
preferred pool that is usable and fails over, for that batch only, to the next one:

- `down`: the pool has no endpoint, or every endpoint is ejected, or the call failed UNAVAILABLE after
  the pool's own retries on its other endpoints;
- `draining`: every endpoint of the pool drains (SIGTERM: its open stream refused a batch for draining),
  or the call was refused so; in-flight batches there still finish;
- `breaker_open`: the pool's breaker is open (no probe due yet);
- `overloaded`: the pool answered RESOURCE_EXHAUSTED (its queue is full): load shed by a saturated pool
  is served by the next one instead of being an error, as long as there is a next one (when every pool
  fails, a refusal with its retry hint is the answer rather than a later pool's UNAVAILABLE);
- `queue_delay`: the pool's expected answer time is more than `1 / QUEUE_DELAY_MARGIN` of the time the
  batch has left while a later pool's fits (see `AnswerTimeEstimate`; an average answer time leaves no
  room for the slower answers). A pool skipped so is re-measured by probes: at most one at a
  time and one per `PROBE_INTERVAL_S`, a copy of a skipped batch is sent to it with twice its expected
  answer time to answer in, and its answer time becomes the estimate (or, out of time, doubles it); the
  batch itself is served by the next pool, so no caller waits on a probe.

When no pool passes these checks, the pools are still tried in order (those whose answer time does not
fit first, then the down and draining ones; an open breaker never): a check is a guess, refusing the
batch would be certain failure. Other errors (NOT_FOUND, DEADLINE_EXCEEDED, INTERNAL) are the batch's answer, as with a
single pool. A model without `pools` goes to the gateway's default inference target, exactly as before.
The answer (`Scores.pool`) names the pool that served the batch; a served batch whose most preferred pool
did not serve it counts once in `infergrid_gateway_inference_failovers_total{model, from_pool, to_pool,
reason}` (from: the most preferred pool, reason: why it did not serve).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from libs.discovery import EndpointWatcher, parse_targets
from libs.errors import Unavailable, is_overload, status_code_of
from libs.platform import PlatformConfig
from libs.pool import ChannelPool
from libs.resilience import Dependency
from services.gateway.catalog import ModelSpec
from services.gateway.inference_client import (
    Draining,
    GrpcModelClient,
    ModelClient,
    StreamingModelClient,
    draining,
)
from services.gateway.metrics import FAILOVERS

log = logging.getLogger(__name__)


DOWN = "down"
DRAINING = "draining"
BREAKER_OPEN = "breaker_open"
OVERLOADED = "overloaded"
QUEUE_DELAY = "queue_delay"

Clock = Callable[[], float]
PROBE_INTERVAL_S = 0.5
QUEUE_DELAY_MARGIN = 2.0


class Scores(dict[str, np.ndarray]):
    """A model's outputs as `ModelClient.infer` returns them, and the inference pool that computed them."""

    __slots__ = ("pool",)

    def __init__(self, outputs: Mapping[str, np.ndarray], pool: str) -> None:
        super().__init__(outputs)
        self.pool = pool


class AnswerTimeEstimate:
    """How long a batch sent to a pool now can expect to wait for its answer (seconds).

    An exponentially weighted moving average of the answer times the gateway observed for this pool's
    recent batches (send to answer, so the pool's queue delay at its current load, compute and the hop).
    Our inference server does not report its queue time per answer, and the round trip is what the
    caller's deadline is spent on anyway. A batch that ran out of time after waiting `w` says only that
    the answer takes longer than `w`: the estimate becomes at least `2 w` at once (`timed_out`), so the
    next batch with the same time left skips the pool instead of waiting out its deadline there too. The
    estimate does not age: a pool skipped for being slow is re-measured by probes (see the module).
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self._mean = 0.0
        self._seen = False

    def observe(self, seconds: float) -> None:
        """Adds one batch's answer time."""
        self._mean = self._mean + self._alpha * (seconds - self._mean) if self._seen else seconds
        self._seen = True

    def measured(self, seconds: float) -> None:
        """A probe's answer time: the pool's answer time now, replacing the average (probes are sparse, and
        after a timeout the average holds a guess, not a measurement)."""
        self._mean = seconds
        self._seen = True

    def timed_out(self, waited: float) -> None:
        """A batch got no answer in `waited` seconds: the answer time is at least that, and likely more."""
        self._mean = max(self._mean, 2 * waited)
        self._seen = True

    def value(self) -> float:
        """The expected answer time (0 before the first answer)."""
        return self._mean


@dataclass(eq=False)
class PoolClient:
    """One named inference pool: its channels, its breaker, its client and its answer-time estimate."""

    name: str
    channels: ChannelPool
    dependency: Dependency
    client: ModelClient
    estimate: AnswerTimeEstimate
    targets: tuple[str, ...] = ()
    watcher: EndpointWatcher | None = None
    # The discovery task, and the hung-stream check of a streaming client.
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # The probe in flight (queue_delay), and when the last one started (FailoverModelClient's clock).
    probe: asyncio.Task[None] | None = None
    probed_at: float = -math.inf

    def skip_reason(self, left: float) -> str:
        """Why a batch with `left` seconds should not go here ("" when it may)."""
        if self.dependency.breaker_open:
            return BREAKER_OPEN
        endpoints = self.channels.endpoints
        live = [e for e in endpoints if not draining(e)]
        if endpoints and not live:
            return DRAINING
        now = time.monotonic()  # the endpoints' ejections are on the real clock
        if not any(e.healthy(now) for e in live):
            return DOWN
        if self.estimate.value() * QUEUE_DELAY_MARGIN > left:
            return QUEUE_DELAY
        return ""

    async def close(self) -> None:
        for task in [*self.tasks, *([self.probe] if self.probe else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        close = getattr(self.client, "close", None)
        if close is not None:
            await close()
        else:
            await self.channels.close()


def failover_reason(exc: BaseException) -> str:
    """The reason a failed call may go to the next pool ("" when the error is the batch's answer)."""
    if is_overload(exc):
        return OVERLOADED
    if isinstance(exc, Draining):
        return DRAINING
    code = status_code_of(exc)
    if isinstance(exc, Unavailable) or (code is not None and code.name in ("UNAVAILABLE", "CANCELLED")):
        return DOWN
    return ""


class FailoverModelClient:
    """A ModelClient over a model's inference pools in preference order (see the module docstring)."""

    def __init__(
        self,
        default: ModelClient,
        pools: Callable[[str], Sequence[PoolClient]],
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        """Args:
        default: The client of the default inference target (models without pools).
        pools: The pools of a model, most preferred first (those the platform file names and exist).
        clock: Monotonic seconds (answer times and probes; a fake one in tests).
        """
        self._default = default
        self._pools = pools
        self._clock = clock

    async def infer(
        self, spec: ModelSpec, version: str, inputs: np.ndarray, timeout: float
    ) -> dict[str, np.ndarray]:
        pools = self._pools(spec.name)
        if not pools:
            return await self._default.infer(spec, version, inputs, timeout)
        clock = self._clock
        deadline = clock() + timeout
        reasons = [pool.skip_reason(timeout) for pool in pools]
        # Usable pools first in preference order, then (a guess is not a certainty) the slow ones, then
        # the down and draining ones; an open breaker would fail the call at once.
        order = [p for p, r in zip(pools, reasons, strict=True) if not r]
        order += [p for p, r in zip(pools, reasons, strict=True) if r == QUEUE_DELAY]
        order += [p for p, r in zip(pools, reasons, strict=True) if r in (DOWN, DRAINING)]
        # The slow pools preferred to the one this batch goes to are skipped: they get a probe.
        for pool, reason in zip(pools[: pools.index(order[0])] if order else (), reasons, strict=False):
            if reason == QUEUE_DELAY:
                self._probe(pool, spec, version, inputs, timeout)
        preferred = pools[0]
        why = reasons[0]
        error: BaseException | None = None
        overload: BaseException | None = None
        for i, pool in enumerate(order):
            left = deadline - clock()
            if left <= 0:
                break
            start = clock()
            try:
                outputs = await pool.client.infer(spec, version, inputs, left)
            except Exception as exc:
                reason = failover_reason(exc)
                code = status_code_of(exc)
                if code is not None and code.name == "DEADLINE_EXCEEDED":
                    pool.estimate.timed_out(clock() - start)
                if not reason:
                    raise
                if reason == OVERLOADED and overload is None:
                    overload = exc
                if i == len(order) - 1:
                    # A saturated pool's refusal (with its retry hint) says more than a down pool's.
                    raise (overload or exc) from None
                if pool is preferred:
                    why = reason
                error = exc
                log.debug("inference pool %s failed for %s (%s): %s", pool.name, spec.name, reason, exc)
                continue
            pool.estimate.observe(clock() - start)
            if pool is not preferred:
                FAILOVERS.labels(spec.name, preferred.name, pool.name, why or DOWN).inc()
            return Scores(outputs, pool.name)
        if error is not None:
            raise overload or error
        raise Unavailable(
            f"no inference pool can serve model {spec.name!r}: "
            + ", ".join(f"{p.name} {r or 'out of time'}" for p, r in zip(pools, reasons, strict=True))
        )

    def _probe(
        self, pool: PoolClient, spec: ModelSpec, version: str, inputs: np.ndarray, timeout: float
    ) -> None:
        """Sends a copy of a batch skipped for `queue_delay` to `pool`, to re-measure its answer time (see
        the module docstring); its answer is dropped."""
        now = self._clock()
        if pool.probe is not None or now - pool.probed_at < PROBE_INTERVAL_S:
            return
        pool.probed_at = now
        budget = max(timeout, 2 * pool.estimate.value())
        clock = self._clock

        async def _run() -> None:
            start = clock()
            try:
                await pool.client.infer(spec, version, inputs, budget)
            except Exception as exc:
                code = status_code_of(exc)
                if code is not None and code.name == "DEADLINE_EXCEEDED":
                    pool.estimate.timed_out(clock() - start)
                log.debug("probe of inference pool %s for %s failed: %s", pool.name, spec.name, exc)
            else:
                pool.estimate.measured(clock() - start)
            finally:
                pool.probe = None

        # In a context of its own: the probe is no part of the trace of the batch it copies.
        pool.probe = asyncio.get_running_loop().create_task(
            _run(), name=f"probe-{pool.name}", context=contextvars.Context()
        )


class InferencePools:
    """The platform file's named inference pools, each a PoolClient following its discovery targets.

    `apply` (the platform watcher's callback) adds the pools a new platform file names, re-targets
    changed ones and closes removed ones; each pool's `EndpointWatcher` runs as its own task.
    """

    def __init__(
        self,
        make: Callable[[str], tuple[ChannelPool, Dependency, ModelClient]],
        *,
        discovery_interval_s: float,
        base_dir: str | None = None,
    ) -> None:
        """Args:
        make: The channels, dependency and client of the pool with this name.
        discovery_interval_s: How often each pool's targets are re-resolved.
        base_dir: The folder relative `file:` targets resolve against (the platform file's).
        """
        self._make = make
        self._interval = discovery_interval_s
        self._base_dir = base_dir
        self._pools: dict[str, PoolClient] = {}
        self._preferences: dict[str, tuple[PoolClient, ...]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def pools(self) -> Mapping[str, PoolClient]:
        return self._pools

    def of(self, model: str) -> Sequence[PoolClient]:
        """The model's pools, most preferred first (empty: the default target)."""
        return self._preferences.get(model, ())

    def apply(self, platform: PlatformConfig) -> None:
        """Follows a (validated) platform file: its pools and the models' preference orders."""
        base = Path(self._base_dir) if self._base_dir else None
        for name, spec in platform.inference_pools.items():
            targets = tuple(spec.endpoints)
            parsed = [t for target in targets for t in parse_targets(target, base)]
            pool = self._pools.get(name)
            if pool is None:
                channels, dependency, client = self._make(name)
                pool = PoolClient(name, channels, dependency, client, AnswerTimeEstimate())
                self._pools[name] = pool
                if isinstance(client, StreamingModelClient):
                    pool.tasks.append(
                        asyncio.get_running_loop().create_task(client.watch(), name=f"streams-{name}")
                    )
            if pool.targets != targets or pool.watcher is None:
                pool.targets = targets
                if pool.watcher is None:
                    pool.watcher = EndpointWatcher(
                        parsed, pool.channels.update, self._interval, name=f"inference pool {name}"
                    )
                    pool.tasks.append(_start(pool.watcher))
                else:  # the running watcher resolves the new targets at its next poll
                    pool.watcher.set_targets(parsed)
        for name in [n for n in self._pools if n not in platform.inference_pools]:
            gone = self._pools.pop(name)
            task = asyncio.get_running_loop().create_task(gone.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._preferences = {
            model: tuple(self._pools[p] for p in route.pools if p in self._pools)
            for model, route in platform.models.items()
            if route.pools
        }

    async def refresh(self) -> None:
        """Resolves every pool's targets now (before serving)."""
        for pool in list(self._pools.values()):
            if pool.watcher is not None:
                await pool.watcher.refresh()

    async def close(self) -> None:
        """Stops the watchers and closes every pool's channels."""
        pools, self._pools = list(self._pools.values()), {}
        self._preferences = {}
        for pool in pools:
            await pool.close()
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


def _start(watcher: EndpointWatcher) -> asyncio.Task[None]:
    async def _run() -> None:
        try:
            await watcher.refresh()
        except Exception:
            log.exception("resolving the endpoints of %s failed", watcher.name)
        await watcher.run()

    return asyncio.get_running_loop().create_task(_run(), name=f"endpoints-{watcher.name}")


def pool_client(
    channels: ChannelPool, dependency: Dependency, streaming: bool, hang_margin_s: float
) -> GrpcModelClient | StreamingModelClient:
    """The inference client of one pool (streamed or unary, like the default target's)."""
    if streaming:
        return StreamingModelClient(channels, dependency, hang_margin_s)
    return GrpcModelClient(channels, dependency)
