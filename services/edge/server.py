"""The edge gRPC server: Envoy's external authorization API and its rate-limit service API.

`Authorization/Check` authenticates the API key and checks the model (see `policy`) and tells Envoy the
request's row count (dynamic metadata `rows`, the rate-limit cost); `RateLimitService/ShouldRateLimit`
charges the tenant's (and the model's) token buckets through `libs.admission.RateLimits` — the gateway's
rules, including the local fallback at this replica's share of a tier while Redis does not answer. Both
read the platform file and the key file, reloaded on change without a restart.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import grpc
import redis.asyncio as redis_async
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from libs import apikeys
from libs.admission import IDENTITY_HEADERS, RateLimits
from libs.apikeys import CREDENTIAL_HEADERS, load_keys
from libs.platform import PlatformWatcher
from libs.ratelimit import (
    Bucket,
    LimitResult,
    RateLimiter,
    RedisTokenBucketLimiter,
    plan_bucket,
    retry_after_header,
)
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.edge.config import EdgeConfig, PolicyConfig
from services.edge.metrics import DECISIONS, LIMITS
from services.edge.policy import Authorizer

log = logging.getLogger(__name__)

AUTH_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
RLS_SERVICE = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
_GRPC_CODE = {400: code_pb2.INVALID_ARGUMENT, 401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED}


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """Envoy's ext_authz over gRPC."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def Check(  # noqa: N802 - gRPC method names
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        decision = self._authorizer.decide(http.headers, http.path, http.raw_body)
        if not decision.allowed:
            DECISIONS.labels(str(decision.http_status)).inc()
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(
                    code=_GRPC_CODE.get(decision.http_status, code_pb2.PERMISSION_DENIED)
                ),
                denied_response=external_auth_pb2.DeniedHttpResponse(
                    status=http_status_pb2.HttpStatus(code=decision.http_status),
                    body=decision.message,
                    headers=[_header("content-type", "text/plain")],
                ),
            )
        DECISIONS.labels("ok").inc()
        # Identity headers are ours alone: whatever a client sent under those names is dropped.
        remove = [*CREDENTIAL_HEADERS, *(h for h in IDENTITY_HEADERS if h not in decision.upstream_headers)]
        metadata = struct_pb2.Struct()
        metadata.update({"rows": str(decision.rows)})  # the rate limit's hits_addend (per row)
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header(k, v) for k, v in decision.upstream_headers.items()],
                headers_to_remove=remove,
            ),
            dynamic_metadata=metadata,
        )


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    """Envoy's rate-limit service: descriptors (tenant) and (tenant, model) → token buckets.

    When Redis does not answer in time, this replica's share of each tier is charged locally
    (`libs.admission.RateLimits`): never unlimited.
    """

    def __init__(self, authorizer: Authorizer, limiter: RateLimiter, policy: PolicyConfig) -> None:
        self._authorizer = authorizer
        self._prefix = policy.key_prefix
        self._limits = RateLimits(
            limiter,
            place="edge",
            key_prefix=policy.key_prefix,
            timeout_s=policy.redis_timeout_ms / 1000,
            retry_store_after_s=policy.fail_open_s,
            replicas=lambda: policy.replicas,
        )

    def _plan(self, domain: str, entries: Mapping[str, str], cost: int) -> Bucket | None:
        """A descriptor's bucket (None: no limit applies to it)."""
        platform = self._authorizer.platform
        return plan_bucket(
            platform, self._prefix, domain, entries.get("tenant", ""), entries.get("model"), cost=cost
        )

    async def ShouldRateLimit(  # noqa: N802 - gRPC method names
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> rls_pb2.RateLimitResponse:
        default_cost = request.hits_addend or 1
        plans = [
            self._plan(
                request.domain, {e.key: e.value for e in d.entries}, d.hits_addend.value or default_cost
            )
            for d in request.descriptors
        ]
        buckets = [p for p in plans if p is not None]
        result = await self._limits.hit(buckets)
        LIMITS.labels("ok" if result.allowed else "over_limit").inc()
        return _response(plans, result)


def _response(plans: Sequence[Bucket | None], result: LimitResult) -> rls_pb2.RateLimitResponse:
    over = rls_pb2.RateLimitResponse.OVER_LIMIT
    ok = rls_pb2.RateLimitResponse.OK
    states = iter(result.buckets)
    statuses = []
    for plan in plans:
        if plan is None:
            statuses.append(rls_pb2.RateLimitResponse.DescriptorStatus(code=ok))
            continue
        state = next(states)
        short = state.wait_seconds > 0
        status = rls_pb2.RateLimitResponse.DescriptorStatus(
            code=over if short and not result.allowed else ok,
            current_limit=rls_pb2.RateLimitResponse.RateLimit(
                requests_per_unit=max(1, round(plan.requests_per_second)),
                unit=rls_pb2.RateLimitResponse.RateLimit.SECOND,
            ),
            limit_remaining=max(0, state.remaining),
        )
        if short:
            # Whole seconds, rounded up: what Envoy puts in x-ratelimit-reset, matching retry-after.
            status.duration_until_reset.FromSeconds(math.ceil(state.wait_seconds))
        statuses.append(status)
    response = rls_pb2.RateLimitResponse(overall_code=ok if result.allowed else over, statuses=statuses)
    if not result.allowed:
        retry_after = retry_after_header(result.retry_after_seconds)
        response.response_headers_to_add.add(key="retry-after", value=retry_after)
        response.raw_body = f"rate limit exceeded; retry after {retry_after} s\n".encode()
    return response


async def create_server(
    config: EdgeConfig,
    telemetry: Telemetry | None = None,
    *,
    limiter: RateLimiter | None = None,
) -> Server:
    """Builds the edge server (bound, not started) and starts watching the platform and key files."""
    policy = config.policy
    client: redis_async.Redis | None = None
    if limiter is None:
        timeout = policy.redis_timeout_ms / 1000
        client = redis_async.Redis.from_url(
            policy.redis_client_url(), socket_timeout=timeout, socket_connect_timeout=timeout
        )
        limiter = RedisTokenBucketLimiter(client)
    # A changed platform or key file replaces the authorizer's (read whole by each decision).
    watcher = PlatformWatcher(
        policy.platform_file, lambda p: setattr(authorizer, "platform", p), policy.poll_seconds
    )
    keys_file = apikeys.keys_path(policy.platform_file, watcher.current, policy.keys_file)
    authorizer = Authorizer(watcher.current, load_keys(keys_file))
    authz = AuthorizationServicer(authorizer)
    rls = RateLimitServicer(authorizer, limiter, policy)
    server = build_server(
        config.server,
        [
            GrpcService.of(AUTH_SERVICE, external_auth_pb2_grpc.add_AuthorizationServicer_to_server, authz),
            GrpcService.of(RLS_SERVICE, rls_pb2_grpc.add_RateLimitServiceServicer_to_server, rls),
        ],
        telemetry=telemetry,
    )
    server.run_in_background(watcher.run(), name="platform-watcher")
    server.run_in_background(
        apikeys.watch_keys(keys_file, lambda keys: setattr(authorizer, "keys", keys), policy.poll_seconds),
        name="keys-watcher",
    )
    if client is not None:
        server.on_stop.append(client.aclose)
    return server
