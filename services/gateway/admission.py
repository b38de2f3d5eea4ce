"""Admission in the gateway: the API key, the tenant's models and its rate limits, checked in-process.

Used when the platform says `admission: {placement: gateway}`. Envoy then routes straight here (no
ext_authz or rate-limit sub-requests, two fewer gRPC hops per request), and this module does what the
edge service would: a key's sha256 is looked up in the hashed key file (reloaded on change), its
tenant must be configured and allowed the model, and the tenant's (and the model's) token buckets are
charged. The buckets are the edge's Redis buckets (same keys, same script semantics), charged through
leases (`libs.ratelimit.LeasedLimiter`): most requests spend a locally held token, and a lease of about
`lease_s` worth of the tier's rate is fetched from Redis ahead of need.

Authentication fails closed (no key, an unknown key: UNAUTHENTICATED; a model the tenant may not call:
PERMISSION_DENIED), rate limiting fails open (Redis down or slow: the request passes and is counted,
and Redis is not asked again for `fail_open_s`): the limits protect capacity, the key is the security
boundary. A refused request gets RESOURCE_EXHAUSTED with `retry-after` (whole seconds), which Envoy's
transcoder turns into HTTP 429 with a Retry-After header.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import grpc
from prometheus_client import Counter

from libs.apikeys import CREDENTIAL_HEADERS, ApiKey, hash_key, presented_key
from libs.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from libs.platform import PlatformConfig
from libs.ratelimit import RateLimiter, plan_bucket, retry_after_header
from services.gateway.predictor import CallInfo

log = logging.getLogger(__name__)

# The rate-limit domain Envoy sends the edge service: the same buckets whichever place admits.
RATE_LIMIT_DOMAIN = "infergrid"

_ADMISSIONS = Counter("infergrid_gateway_admission_total", "Admission decisions in the gateway", ["result"])
_RESULTS = {
    name: _ADMISSIONS.labels(name)
    for name in ("ok", "unauthenticated", "forbidden", "rate_limited", "store_error")
}


class Admission:
    """Decides one call: returns its CallInfo (with the tenant) or raises the status it deserves."""

    def __init__(
        self,
        platform: Callable[[], PlatformConfig],
        limiter: RateLimiter | None,
        *,
        key_prefix: str = "infergrid:rl",
        fail_open_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._platform = platform
        self._limiter = limiter
        self._prefix = key_prefix
        self._fail_open_s = fail_open_s
        self._clock = clock
        self._keys: Mapping[str, ApiKey] = {}
        self._skip_limits_until = 0.0
        self._last_failure_log = 0.0

    def set_keys(self, keys: Mapping[str, ApiKey]) -> None:
        """Replaces the keys (sha256 → entry)."""
        self._keys = keys

    async def call_info(self, context: grpc.aio.ServicerContext, model: str) -> CallInfo:
        """Authenticates and rate-limits the call for `model`."""
        credentials: dict[str, str] = {}
        for name, value in context.invocation_metadata() or ():
            if name in CREDENTIAL_HEADERS:
                credentials[name] = value if isinstance(value, str) else value.decode(errors="replace")
        tenant = await self.admit(credentials, model)
        return CallInfo(tenant=tenant, time_remaining=context.time_remaining())

    async def admit(self, headers: Mapping[str, str], model: str) -> str:
        """Returns the caller's tenant.

        Raises:
            Unauthenticated: no key, or a key that is not registered.
            PermissionDenied: the key's tenant is not configured or may not call `model`.
            ResourceExhausted: over the tenant's (or the model's) rate; `retry-after` says how long.
        """
        key = presented_key(headers)
        if not key:
            _RESULTS["unauthenticated"].inc()
            raise Unauthenticated("missing API key: send the x-api-key header or authorization: Bearer <key>")
        entry = self._keys.get(hash_key(key))
        if entry is None:
            _RESULTS["unauthenticated"].inc()
            raise Unauthenticated("invalid API key")
        platform = self._platform()
        tenant = platform.tenants.get(entry.tenant)
        if tenant is None:
            _RESULTS["forbidden"].inc()
            raise PermissionDenied(f"tenant {entry.tenant!r} of this key is not configured")
        if model and not tenant.may_call(model):
            _RESULTS["forbidden"].inc()
            raise PermissionDenied(f"tenant {entry.tenant!r} may not call model {model[:256]!r}")
        await self._limit(platform, entry.tenant, model)
        _RESULTS["ok"].inc()
        return entry.tenant

    async def _limit(self, platform: PlatformConfig, tenant: str, model: str) -> None:
        if self._limiter is None or self._clock() < self._skip_limits_until:
            return
        prefix = self._prefix
        buckets = [plan_bucket(platform, prefix, RATE_LIMIT_DOMAIN, tenant, None)]
        if model:
            buckets.append(plan_bucket(platform, prefix, RATE_LIMIT_DOMAIN, tenant, model))
        charged = [b for b in buckets if b is not None]
        try:
            result = await self._limiter.hit(charged)
        except Exception as exc:  # fail open; see the module docstring
            _RESULTS["store_error"].inc()
            now = self._clock()
            self._skip_limits_until = now + self._fail_open_s
            if now - self._last_failure_log > 5:
                self._last_failure_log = now
                log.error("rate-limit store unavailable, allowing requests (fail open): %r", exc)
            return
        if not result.allowed:
            _RESULTS["rate_limited"].inc()
            wait = retry_after_header(result.retry_after_seconds)
            raise ResourceExhausted(
                f"rate limit of tenant {tenant!r} exceeded; retry after {wait} s",
                trailing_metadata=(("retry-after", wait),),
            )
