"""Admission, written once: API key → tenant → model ACL, and the tenant's rate limits with their failure policy.

Both placements use this module: the edge service (Envoy's ext_authz and rate-limit service, placement
"edge") and the gateway (in-process, placement "gateway"). What differs between them is only where the
answer goes (an ext_authz reply or a gRPC status), never the rules:

- `AdmissionPolicy.admit(headers, model)`: the key's sha256 is looked up in the hashed key file; no key or
  an unknown one is `Unauthenticated`; a key whose tenant is not configured, or a model the tenant may not
  call, is `PermissionDenied`. Fails closed: without keys or tenants nobody is admitted.
- `RateLimits.hit(buckets)`: charges the tenant's (and the model's) token buckets in the shared store
  (Redis). Rate limits never fail open: when the store does not answer, each replica charges a local
  bucket at its share of the tier (rate and burst divided by the replica count), so N replicas together
  admit about the tier's rate, not unlimited traffic. `cost` is the number of rows a call predicts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from prometheus_client import Counter

from libs.apikeys import ApiKey, hash_key, presented_key
from libs.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from libs.platform import PlatformConfig
from libs.ratelimit import Bucket, BucketState, LimitResult, RateLimiter, plan_bucket, retry_after_header

log = logging.getLogger(__name__)

# The rate-limit domain: the same buckets whichever place admits.
RATE_LIMIT_DOMAIN = "infergrid"
MAX_MODEL_CHARS = 256
# Headers the edge sets on an authorized request; only believed by a gateway over Envoy's mTLS hop.
TENANT_HEADER = "x-infergrid-tenant"
TIER_HEADER = "x-infergrid-tier"
MODEL_HEADER = "x-infergrid-model"
KEY_NAME_HEADER = "x-infergrid-key-name"
# The placement the control plane configured Envoy for (set on every route, overwriting the client's).
PLACEMENT_HEADER = "x-infergrid-placement"
IDENTITY_HEADERS = (TENANT_HEADER, TIER_HEADER, MODEL_HEADER, KEY_NAME_HEADER, PLACEMENT_HEADER)

DECISIONS = Counter(
    "infergrid_admission_total", "Admission decisions (edge and gateway alike)", ["place", "result"]
)
FALLBACKS = Counter(
    "infergrid_admission_local_limit_total",
    "Rate-limit checks answered by the local fallback bucket because the shared store did not answer",
    ["place"],
)


@dataclass(frozen=True)
class Identity:
    """Who a call is: the verified tenant (and its tier), and the key's name."""

    tenant: str
    tier: str
    key_name: str


class AdmissionPolicy:
    """Keys, tenants and the model ACL against the current platform config."""

    def __init__(
        self, platform: Callable[[], PlatformConfig | None], keys: Mapping[str, ApiKey] | None = None
    ) -> None:
        self._platform = platform
        self._keys: Mapping[str, ApiKey] = dict(keys or {})

    def set_keys(self, keys: Mapping[str, ApiKey]) -> None:
        """Replaces the keys (sha256 → entry)."""
        self._keys = keys

    def authenticate(self, headers: Mapping[str, str]) -> Identity:
        """The caller's identity from its API key.

        Raises:
            Unauthenticated: no key, or one that is not registered.
            PermissionDenied: the key's tenant is not configured.
        """
        key = presented_key(headers)
        if not key:
            raise Unauthenticated("missing API key: send the x-api-key header or authorization: Bearer <key>")
        entry = self._keys.get(hash_key(key))
        if entry is None:
            raise Unauthenticated("invalid API key")
        return self.identity_of(entry.tenant, entry.name)

    def identity_of(self, tenant_name: str, key_name: str = "") -> Identity:
        """The identity of a configured tenant; PermissionDenied when the platform does not know it."""
        platform = self._platform()
        tenant = platform.tenants.get(tenant_name) if platform is not None else None
        if tenant is None:
            raise PermissionDenied(f"tenant {tenant_name[:64]!r} of this key is not configured")
        return Identity(tenant=tenant_name, tier=tenant.tier, key_name=key_name)

    def authorize(self, identity: Identity, model: str) -> None:
        """Raises PermissionDenied unless the tenant may call `model` ("" names no model: nothing to check)."""
        if len(model) > MAX_MODEL_CHARS:
            raise PermissionDenied(f"model: longer than {MAX_MODEL_CHARS} characters")
        if not model:
            return
        platform = self._platform()
        tenant = platform.tenants.get(identity.tenant) if platform is not None else None
        if tenant is None or not tenant.may_call(model):
            raise PermissionDenied(
                f"tenant {identity.tenant!r} may not call model {model[:MAX_MODEL_CHARS]!r}"
            )

    def admit(self, headers: Mapping[str, str], model: str) -> Identity:
        """Authenticates the key and authorizes the model (see `authenticate`, `authorize`)."""
        identity = self.authenticate(headers)
        self.authorize(identity, model)
        return identity


class LocalBuckets:
    """In-process token buckets: the fallback while the shared store is unreachable."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}

    def hit(self, buckets: Sequence[Bucket]) -> LimitResult:
        """Charges every bucket or none, like the Redis script."""
        now = self._clock()
        levels = []
        for b in buckets:
            tokens, ts = self._state.get(b.key, (float(b.burst), now))
            levels.append(min(float(b.burst), tokens + max(0.0, now - ts) * b.requests_per_second))
        allowed = all(level >= b.cost for level, b in zip(levels, buckets, strict=True))
        states = []
        for level, b in zip(levels, buckets, strict=True):
            left = level - b.cost if allowed else level
            self._state[b.key] = (left, now)
            wait = 0.0 if left >= b.cost else (b.cost - left) / b.requests_per_second
            states.append(BucketState(remaining=max(0, math.floor(left)), wait_seconds=wait))
        return LimitResult(allowed, tuple(states))


def share(bucket: Bucket, replicas: int) -> Bucket:
    """One replica's share of a bucket: rate and burst divided by the replica count (burst at least cost)."""
    n = max(1, replicas)
    burst = max(bucket.cost, math.ceil(bucket.burst / n))
    return replace(bucket, requests_per_second=bucket.requests_per_second / n, burst=burst)


class RateLimits:
    """The tenant's (and the model's) buckets in the shared store, with the local fallback (see the module doc).

    `key_prefix`, `timeout_s` (per store round trip) and `retry_store_after_s` (how long the local share
    answers after a store failure) come from the placing service's config section, which holds their defaults.
    """

    def __init__(
        self,
        limiter: RateLimiter | None,
        *,
        place: str,
        key_prefix: str,
        timeout_s: float,
        retry_store_after_s: float,
        replicas: Callable[[], int] = lambda: 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limiter = limiter
        self._place = place
        self._replicas = replicas
        self._prefix = key_prefix
        self._timeout = timeout_s
        self._retry_after = retry_store_after_s
        self._clock = clock
        self._local = LocalBuckets(clock)
        self._store_down_until = 0.0
        self._last_failure_log = 0.0

    def plan(self, platform: PlatformConfig, tenant: str, model: str | None, cost: int) -> list[Bucket]:
        """The buckets a call charges: the tenant's, and the (tenant, model) one when the model has a tier."""
        models = (None, model) if model else (None,)
        planned = [
            plan_bucket(platform, self._prefix, RATE_LIMIT_DOMAIN, tenant, m, cost=cost) for m in models
        ]
        return [b for b in planned if b is not None]

    async def hit(self, buckets: Sequence[Bucket]) -> LimitResult:
        """Charges the shared buckets; the local share of them while the store does not answer."""
        if not buckets:
            return LimitResult(True, ())
        if self._limiter is not None and self._clock() >= self._store_down_until:
            try:
                return await asyncio.wait_for(self._limiter.hit(buckets), self._timeout)
            except Exception as exc:  # the store is down or slow: the local share, below
                now = self._clock()
                self._store_down_until = now + self._retry_after
                if now - self._last_failure_log > 5:
                    self._last_failure_log = now
                    log.error(
                        "rate-limit store unavailable, limiting each tenant to this replica's share of its "
                        "tier (1/%d) until it answers: %s",
                        max(1, self._replicas()),
                        type(exc).__name__,
                    )
        FALLBACKS.labels(self._place).inc()
        replicas = self._replicas()
        return self._local.hit([share(b, replicas) for b in buckets])

    async def charge(self, platform: PlatformConfig, tenant: str, model: str, cost: int = 1) -> None:
        """Charges `cost` units; raises ResourceExhausted (with `retry-after`) when over the limit."""
        result = await self.hit(self.plan(platform, tenant, model, max(1, cost)))
        if not result.allowed:
            DECISIONS.labels(self._place, "rate_limited").inc()
            wait = retry_after_header(result.retry_after_seconds)
            raise ResourceExhausted(
                f"rate limit of tenant {tenant!r} exceeded; retry after {wait} s",
                trailing_metadata=(("retry-after", wait),),
            )
