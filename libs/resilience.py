"""Deadlines, retries with jittered backoff and a retry budget, and circuit breakers, per dependency.

gRPC dependencies get their retries from gRPC itself (a service config with a
`retryPolicy` and `retryThrottling`, which is gRPC's retry budget): see
`grpc_service_config`. Any other async call goes through `Dependency.call`, whose
first attempt is direct (no per-call overhead on the happy path) and whose
retries, only for failures that may succeed on retry and only while the retry
budget allows, use tenacity's exponential backoff with full jitter. Circuit breaking
uses purgatory; client errors (INVALID_ARGUMENT, NOT_FOUND, ...) never trip it, and
neither do overload answers (RESOURCE_EXHAUSTED: the dependency is alive and shedding
load): they count as answers, are never retried here (a retry adds load where there
is too much) and cost no retry budget; the caller passes them on with a retry hint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter, Gauge
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from libs.config import Bounded, setting
from libs.errors import DeadlineExceeded, Unavailable, is_client_error, is_overload, status_code_of

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIES = Counter("infergrid_dependency_retries_total", "Retries made, by dependency.", ["dependency"])
RETRIES_DENIED = Counter(
    "infergrid_dependency_retries_denied_total", "Retries refused by the retry budget.", ["dependency"]
)
BREAKER_OPEN = Gauge(
    "infergrid_circuit_breaker_open",
    "1 while the dependency's circuit breaker is open or half-open.",
    ["dependency"],
    multiprocess_mode="max",
)
BREAKER_REJECTED = Counter(
    "infergrid_circuit_breaker_rejected_total", "Calls failed fast by an open breaker.", ["dependency"]
)

_MIN_GRPC_BACKOFF_S = 0.01


@dataclass(frozen=True)
class RetryPolicy(Bounded):
    """How often and how fast to retry a call that failed with a retryable status."""

    max_attempts: int = setting(3, minimum=1)
    initial_backoff_s: float = 0.02
    max_backoff_s: float = 0.5
    multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE",)

    def __post_init__(self) -> None:
        super().__post_init__()
        for code in self.retryable_codes:
            if code not in grpc.StatusCode.__members__:
                raise ValueError(f"unknown gRPC status code {code!r} in retryable_codes")
            if code == "RESOURCE_EXHAUSTED":
                raise ValueError(
                    "RESOURCE_EXHAUSTED must not be retried: the dependency is shedding load, "
                    "and a retry adds to it (pass the refusal on with a retry hint instead)"
                )


@dataclass(frozen=True)
class BreakerPolicy:
    """Open after `failure_threshold` consecutive failures; probe again after `reset_timeout_s`."""

    failure_threshold: int = 5
    reset_timeout_s: float = 5.0


@dataclass(frozen=True)
class DependencyPolicy:
    """Everything resilience needs to know about one dependency."""

    timeout_s: float = 1.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    # The retry budget: gRPC's retryThrottling token bucket. Each failure costs a token,
    # each success returns `budget_token_ratio`; retries stop while tokens <= max/2.
    budget_max_tokens: int = 10
    budget_token_ratio: float = 0.1


class RetryBudget:
    """gRPC's retry throttling algorithm, for calls that gRPC itself does not retry."""

    def __init__(self, max_tokens: float, token_ratio: float) -> None:
        self._max = float(max_tokens)
        self._ratio = token_ratio
        self._tokens = max_tokens
        self._lock = threading.Lock()

    def on_success(self) -> None:
        if self._tokens < self._max:
            with self._lock:
                self._tokens = min(self._max, self._tokens + self._ratio)

    def on_failure(self) -> None:
        with self._lock:
            self._tokens = max(0.0, self._tokens - 1)

    def allows_retry(self) -> bool:
        return self._tokens > self._max / 2

    @property
    def tokens(self) -> float:
        return self._tokens


def grpc_service_config(service: str, policy: DependencyPolicy) -> str:
    """Returns a gRPC service config (JSON) with the dependency's retries and retry budget.

    Pass it as the `grpc.service_config` channel option; gRPC then retries in its
    C core, with exponential backoff and jitter, and throttles retries by the budget.
    """
    retry = policy.retry
    # No "timeout" here: in gRPC Python a service-config timeout fires far too early
    # (grpc/grpc#34547, #40633). Callers pass `timeout=` per call instead, which also
    # lets them pass on what is left of the inbound deadline.
    method: dict[str, Any] = {"name": [{"service": service}]}
    # round_robin spreads calls over every address a name resolves to (e.g. a headless
    # Service's pods); the default pick_first would pin all calls to one replica.
    config: dict[str, Any] = {"methodConfig": [method], "loadBalancingConfig": [{"round_robin": {}}]}
    if retry.max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": min(retry.max_attempts, 5),  # gRPC caps attempts at 5
            # gRPC 1.85 can lose a retry scheduled only a few ms out (seen: a hang until the
            # deadline in ~40% of calls with 1 ms); 10 ms and above never did.
            "initialBackoff": f"{max(retry.initial_backoff_s, _MIN_GRPC_BACKOFF_S):.3f}s",
            "maxBackoff": f"{retry.max_backoff_s:.3f}s",
            "backoffMultiplier": retry.multiplier,
            "retryableStatusCodes": list(retry.retryable_codes),
        }
        config["retryThrottling"] = {
            "maxTokens": int(policy.budget_max_tokens),  # gRPC wants an integer here
            "tokenRatio": policy.budget_token_ratio,
        }
    return json.dumps(config)


def answered_not_failed(exc: BaseException) -> bool:
    """True for answers that say nothing bad about the dependency's health: client errors and overload."""
    return is_client_error(exc) or is_overload(exc)


def _breaker_listener(name: str, event_type: str, _event: object) -> None:
    if event_type == "state_changed":
        state = getattr(_event, "state", "")
        BREAKER_OPEN.labels(name).set(0 if state == "closed" else 1)
        log.warning("circuit breaker %s is now %s", name, state)


class Dependency:
    """One downstream dependency: a deadline, a circuit breaker and budgeted, jittered retries."""

    def __init__(self, name: str, policy: DependencyPolicy) -> None:
        self.name = name
        self.policy = policy
        self.budget = RetryBudget(policy.budget_max_tokens, policy.budget_token_ratio)
        self._codes = frozenset(grpc.StatusCode[c] for c in policy.retry.retryable_codes)
        self._factory = AsyncCircuitBreakerFactory(
            default_threshold=policy.breaker.failure_threshold,
            default_ttl=policy.breaker.reset_timeout_s,
            exclude=[(Exception, answered_not_failed)],
        )
        self._factory.add_listener(_breaker_listener)
        self._factory.add_listener(self._on_breaker)
        # Monotonic time until which the open breaker refuses calls (0: closed or half-open).
        self._open_until = 0.0
        self._retries = RETRIES.labels(name)
        self._denied = RETRIES_DENIED.labels(name)
        self._rejected = BREAKER_REJECTED.labels(name)

    def _on_breaker(self, name: str, event_type: str, event: object) -> None:
        if event_type == "state_changed" and name == self.name:
            opened = getattr(event, "state", "") == "opened"
            self._open_until = time.monotonic() + self.policy.breaker.reset_timeout_s if opened else 0.0

    @property
    def breaker_open(self) -> bool:
        """True while the breaker fails calls fast: opened, and its reset timeout (the next probe) not over."""
        return self._open_until > 0.0 and time.monotonic() < self._open_until

    def is_retryable(self, exc: BaseException) -> bool:
        """True for failures a retry may fix: a retryable status, a timeout or a lost connection."""
        code = status_code_of(exc)
        return isinstance(exc, ConnectionError | OSError) if code is None else code in self._codes

    async def _attempt(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], timeout: float) -> T:
        try:
            async with await self._factory.get_breaker(self.name):
                async with asyncio.timeout(timeout):
                    return await fn(*args)
        except OpenedState:
            self._rejected.inc()
            raise Unavailable(f"{self.name} is unavailable (circuit open)") from None
        except TimeoutError:
            raise DeadlineExceeded(f"{self.name} did not answer within {timeout:.3f}s") from None

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None) -> T:
        """Calls `fn(*args)` with the deadline, the breaker and the retry policy.

        Args:
            fn: The async call to make.
            *args: Its arguments.
            timeout: Seconds for each attempt; the policy's timeout when None. Pass the
                caller's remaining deadline here to propagate it.

        Raises:
            Unavailable: The breaker is open.
            DeadlineExceeded: An attempt took longer than the timeout.
            Exception: Whatever `fn` raised on the last attempt.
        """
        per_try = self.policy.timeout_s if timeout is None else timeout
        try:
            result = await self._attempt(fn, args, per_try)
        except Exception as exc:
            if answered_not_failed(exc):  # the request's fault, or load shed: not retried, no budget spent
                raise
            self.budget.on_failure()
            if self.policy.retry.max_attempts <= 1 or not self.is_retryable(exc):
                raise
            if not self.budget.allows_retry():
                self._denied.inc()
                raise
            return await self._retry(fn, args, per_try)
        self.budget.on_success()
        return result

    async def _retry(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], timeout: float) -> T:
        retry = self.policy.retry

        def _should_retry(exc: BaseException) -> bool:
            if answered_not_failed(exc):
                return False
            self.budget.on_failure()
            if not self.is_retryable(exc):
                return False
            if not self.budget.allows_retry():
                self._denied.inc()
                return False
            return True

        retrying = AsyncRetrying(
            stop=stop_after_attempt(retry.max_attempts - 1),
            # "Full jitter": a uniform wait between 0 and the exponential backoff.
            wait=wait_random_exponential(
                multiplier=retry.initial_backoff_s * retry.multiplier,
                max=retry.max_backoff_s,
                exp_base=retry.multiplier,
            ),
            retry=retry_if_exception(_should_retry),
            reraise=True,
            sleep=asyncio.sleep,
        )
        await asyncio.sleep(random.uniform(0, retry.initial_backoff_s))
        async for attempt in retrying:
            with attempt:
                self._retries.inc()
                result = await self._attempt(fn, args, timeout)
        self.budget.on_success()
        return result
