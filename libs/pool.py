"""A pool of gRPC channels, one per endpoint of an upstream's replicas, with failover between them.

The pool follows discovery (`libs/discovery.EndpointWatcher` calls `update`): a new endpoint gets a
channel at once; a removed one takes no new calls and its channel (and whatever the client attached to
it, such as an open stream) closes once its in-flight calls have finished. `call` sends one logical
call: round robin over the healthy endpoints, and on a failure a retry may fix (UNAVAILABLE, a lost
connection) the endpoint is ejected for a while (doubling per consecutive failure) and the call goes to
another endpoint, within the dependency's attempts and retry budget. The `Dependency` around it (breaker,
deadline) sees one call. When every endpoint is ejected the pool still tries the one whose ejection ends
first (like Envoy's panic mode): an ejection is a guess, refusing every call would be certain failure.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from prometheus_client import Counter, Gauge, Histogram

from libs.errors import Unavailable, status_code_of
from libs.metrics import LabelCache
from libs.resilience import RETRIES, RETRIES_DENIED, DependencyPolicy, RetryBudget, answered_not_failed

log = logging.getLogger(__name__)
T = TypeVar("T")

POOL_ENDPOINTS = Gauge(
    "infergrid_pool_endpoints",
    "Endpoints in a dependency's channel pool.",
    ["dependency"],
    multiprocess_mode="max",
)
POOL_EJECTIONS = Counter(
    "infergrid_pool_ejections_total", "Endpoints taken out of rotation after a failure.", ["dependency"]
)

# OpenTelemetry's `rpc.client.duration` (semantic conventions for RPC), in Prometheus form: seconds, one
# sample per attempt, labelled by service, method, the replica that answered and the gRPC status number.
RPC_CLIENT_DURATION = Histogram(
    "rpc_client_duration_seconds",
    "Client-side duration of outbound gRPC calls, per attempt (OpenTelemetry rpc.client.duration).",
    ["rpc_system", "rpc_service", "rpc_method", "server_address", "rpc_grpc_status_code"],
    buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5),
)
_UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]


class Closeable(Protocol):
    async def close(self) -> None: ...


@dataclass(eq=False)
class Endpoint:
    """One replica: its channel, its calls in flight and its health as the pool sees it."""

    address: str
    channel: grpc.aio.Channel
    in_flight: int = 0
    failures: int = 0
    ejected_until: float = 0.0
    removed: bool = False
    # Things a client keeps per endpoint (an open stream); closed before the channel.
    extras: dict[str, Closeable] = field(default_factory=dict)
    _stubs: dict[object, Any] = field(default_factory=dict)
    # rpc_client_duration_seconds children by (service, method, status number), bound on first use.
    _durations: LabelCache[Histogram] = field(
        init=False, default_factory=lambda: LabelCache(RPC_CLIENT_DURATION, "grpc")
    )

    def observe(self, method: str, code: int, seconds: float) -> None:
        """Records one attempt of `method` ("package.Service/Method") that ended with status `code`."""
        service, _, name = method.rpartition("/")
        self._durations(service, name, self.address, str(code)).observe(seconds)

    def stub(self, factory: Callable[[grpc.aio.Channel], T]) -> T:
        """The stub of `factory` (a generated *Stub class) on this endpoint's channel, made once."""
        stub = self._stubs.get(factory)
        if stub is None:
            stub = self._stubs[factory] = factory(self.channel)
        return stub

    def healthy(self, now: float) -> bool:
        return now >= self.ejected_until


class ChannelPool:
    """Channels to every endpoint of one dependency and failover between them (see the module docstring)."""

    def __init__(
        self,
        name: str,
        connect: Callable[[str], grpc.aio.Channel],
        policy: DependencyPolicy,
        *,
        eject_base_s: float = 1.0,
        eject_max_s: float = 10.0,
    ) -> None:
        self.name = name
        self._connect = connect
        self._policy = policy
        self._codes = frozenset(grpc.StatusCode[c] for c in policy.retry.retryable_codes)
        self._budget = RetryBudget(policy.budget_max_tokens, policy.budget_token_ratio)
        self._eject_base = eject_base_s
        self._eject_max = eject_max_s
        self._endpoints: list[Endpoint] = []
        self._next = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._gauge = POOL_ENDPOINTS.labels(name)
        self._ejections = POOL_EJECTIONS.labels(name)
        self._retries = RETRIES.labels(name)
        self._denied = RETRIES_DENIED.labels(name)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints taking new calls, in round-robin order."""
        return tuple(self._endpoints)

    def update(self, addresses: Sequence[str]) -> None:
        """Adopts a new endpoint set: channels for new addresses, removed ones drain and close."""
        wanted = list(dict.fromkeys(addresses))
        current = {e.address: e for e in self._endpoints}
        kept = [current[a] if a in current else Endpoint(a, self._connect(a)) for a in wanted]
        gone = [e for a, e in current.items() if a not in set(wanted)]
        added = [a for a in wanted if a not in current]
        self._endpoints = kept
        self._next = self._next % len(kept) if kept else 0
        self._gauge.set(len(kept))
        for endpoint in gone:
            endpoint.removed = True
            if endpoint.in_flight == 0:
                self._close_later(endpoint)
        if added or gone:
            log.info(
                "%s pool: %s (added %s, removed %s)",
                self.name,
                list(wanted),
                added,
                [e.address for e in gone],
                extra={"dependency": self.name, "endpoints": wanted},
            )

    def pick(self, exclude: Collection[Endpoint] = ()) -> Endpoint:
        """The next healthy endpoint not in `exclude` (round robin), else the best one left.

        Raises:
            Unavailable: The pool has no endpoints.
        """
        endpoints = self._endpoints
        n = len(endpoints)
        if n == 0:
            raise Unavailable(f"{self.name} has no endpoints")
        now = time.monotonic()
        start = self._next
        for i in range(n):
            endpoint = endpoints[(start + i) % n]
            if endpoint.healthy(now) and endpoint not in exclude:
                self._next = (start + i + 1) % n
                return endpoint
        # Everything is ejected or already tried: the untried one back soonest, else any.
        untried = [e for e in endpoints if e not in exclude] or endpoints
        self._next = (start + 1) % n
        return min(untried, key=lambda e: e.ejected_until)

    def eject(self, endpoint: Endpoint, reason: object) -> None:
        """Takes an endpoint out of rotation for a while (longer after each consecutive failure)."""
        endpoint.failures += 1
        seconds = min(self._eject_max, self._eject_base * 2 ** (endpoint.failures - 1))
        endpoint.ejected_until = time.monotonic() + seconds
        self._ejections.inc()
        log.warning(
            "%s endpoint %s ejected for %.1fs: %s",
            self.name,
            endpoint.address,
            seconds,
            reason,
            extra={"dependency": self.name, "endpoint": endpoint.address},
        )

    def is_retryable(self, exc: BaseException) -> bool:
        """A failure another endpoint may not have: a retryable status or a lost connection."""
        code = status_code_of(exc)
        return isinstance(exc, ConnectionError) if code is None else code in self._codes

    async def call(self, fn: Callable[[Endpoint], Awaitable[T]], method: str) -> T:
        """Runs `fn` on an endpoint; on a retryable failure, again on another (see the module docstring).

        Each attempt is timed into `rpc_client_duration_seconds` (per endpoint, `method`
        ("package.Service/Method") and status).

        Raises:
            Unavailable: No endpoints.
            Exception: Whatever the last attempt raised.
        """
        retry = self._policy.retry
        tried: list[Endpoint] = []
        while True:
            endpoint = self.pick(tried)
            endpoint.in_flight += 1
            started = time.perf_counter()
            try:
                result = await fn(endpoint)
            except Exception as exc:
                code = status_code_of(exc)
                endpoint.observe(
                    method, _UNKNOWN if code is None else code.value[0], time.perf_counter() - started
                )
                if answered_not_failed(exc) or not self.is_retryable(exc):
                    raise
                self.eject(endpoint, exc)
                self._budget.on_failure()
                if len(tried) + 1 >= retry.max_attempts:
                    raise
                if not self._budget.allows_retry():
                    self._denied.inc()
                    raise
                self._retries.inc()
                tried.append(endpoint)
                if all(e in tried for e in self._endpoints):  # the same replica again: back off first
                    await asyncio.sleep(random.uniform(0, retry.initial_backoff_s))
                continue
            finally:
                self._release(endpoint)
            endpoint.observe(method, 0, time.perf_counter() - started)
            endpoint.failures = 0
            self._budget.on_success()
            return result

    def _release(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        if endpoint.removed and endpoint.in_flight == 0:
            self._close_later(endpoint)

    def _close_later(self, endpoint: Endpoint) -> None:
        task = asyncio.get_running_loop().create_task(_close(endpoint))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Closes every channel (in-flight calls fail CANCELLED)."""
        endpoints, self._endpoints = self._endpoints, []
        self._gauge.set(0)
        for endpoint in endpoints:
            endpoint.removed = True
            await _close(endpoint)
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)


async def _close(endpoint: Endpoint) -> None:
    for extra in list(endpoint.extras.values()):
        try:
            await extra.close()
        except Exception:  # closing is best effort; the channel still goes
            log.exception("closing %s of endpoint %s failed", type(extra).__name__, endpoint.address)
    endpoint.extras.clear()
    await endpoint.channel.close()
