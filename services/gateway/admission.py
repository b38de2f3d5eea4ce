"""Admission in the gateway: every call needs an identity the gateway can verify, in every placement.

The rules (keys, tenants, model ACL, rate limits and their failure policy) are `libs.admission`'s, shared
with the edge service. This module decides which identity a call may present, from the gateway's own
placement (fixed at start-up) and from how the call arrived:

- with mTLS on (`tls_*` files set, as the stack and the cluster run it), the port only accepts
  connections whose client certificate the mesh CA signed, and a call counts as "through Envoy" only when
  that certificate is Envoy's (`libs.mtls.peer_is_envoy`); any other caller — a pod, a process on
  the host, plaintext to the health port — is UNAUTHENTICATED;
- Envoy announces the placement its control plane configured (`x-infergrid-placement`, overwritten on every
  route); a gateway whose own placement differs refuses every call (UNAUTHENTICATED, logged, counted):
  two processes that disagree fail closed instead of each assuming the other checked;
- placement "edge": the identity is the tenant the edge's ext_authz verified (`x-infergrid-tenant`), believed
  only over Envoy's mTLS hop, and the model must be the one the edge authorized (`x-infergrid-model`);
  rate limits were charged by Envoy's rate-limit filter (per row);
- placement "gateway": the API key, checked here (`AdmissionPolicy`), and the tenant's buckets charged here,
  one unit per row; identity headers are never read;
- no platform file: no tenants, so nobody is admitted.

A refused request gets the status of the typed error; RESOURCE_EXHAUSTED carries `retry-after` (whole
seconds), which Envoy's transcoder turns into HTTP 429 with a Retry-After header.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import grpc

from libs import mtls
from libs.admission import (
    DECISIONS,
    KEY_NAME_HEADER,
    MODEL_HEADER,
    PLACEMENT_HEADER,
    TENANT_HEADER,
    AdmissionPolicy,
    Identity,
    RateLimits,
)
from libs.apikeys import CREDENTIAL_HEADERS
from libs.errors import PermissionDenied, Unauthenticated
from libs.platform import PlatformConfig
from services.gateway.metrics import PLACEMENT_DISAGREEMENTS
from services.gateway.predictor import CallInfo

log = logging.getLogger(__name__)

_ADMITTED = DECISIONS.labels("gateway", "ok")
_READ_HEADERS = frozenset(
    (*CREDENTIAL_HEADERS, TENANT_HEADER, MODEL_HEADER, KEY_NAME_HEADER, PLACEMENT_HEADER)
)


class Admission:
    """Decides one call: returns its CallInfo (with the verified tenant) or raises the status it deserves."""

    def __init__(
        self,
        platform: Callable[[], PlatformConfig | None],
        placement: str,
        limits: RateLimits,
        *,
        mesh: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._platform = platform
        self.placement = placement
        self._limits = limits
        self._mesh = mesh
        self.policy = AdmissionPolicy(platform)
        self._clock = clock
        self._last_disagreement_log = -1e9

    async def call_info(self, context: grpc.aio.ServicerContext, model: str, rows: int = 1) -> CallInfo:
        """Admits the call for `model` (`rows` units of rate limit); see the module docstring."""
        metadata: dict[str, str] = {}
        for name, value in context.invocation_metadata() or ():
            if name in _READ_HEADERS:
                metadata[name] = value if isinstance(value, str) else value.decode(errors="replace")
        # Without the mesh the port is plaintext: no certificate to look at (auth_context() builds a dict).
        via_envoy = self._mesh and mtls.peer_is_envoy(context.auth_context())
        identity = await self.admit(metadata, model, rows, via_envoy=via_envoy)
        _ADMITTED.inc()
        return CallInfo(tenant=identity.tenant, time_remaining=context.time_remaining())

    async def admit(
        self, metadata: Mapping[str, str], model: str, rows: int = 1, *, via_envoy: bool = False
    ) -> Identity:
        """The verified identity of a call (see the module docstring).

        Raises:
            Unauthenticated: no identity the gateway can verify (or a placement disagreement).
            PermissionDenied: the tenant is not configured or may not call `model`.
            ResourceExhausted: over the tenant's (or the model's) rate.
        """
        if self._mesh and not via_envoy:
            self._refuse("not_via_envoy")
            raise Unauthenticated("the gateway only admits calls that come through Envoy (mutual TLS)")
        platform = self._platform()
        if platform is None:
            self._refuse("no_platform")
            raise Unauthenticated("the gateway has no platform config (tenants): nobody is admitted")
        if via_envoy:
            announced = metadata.get(PLACEMENT_HEADER, "")
            if announced != self.placement:
                self._disagree(announced)
                raise Unauthenticated(
                    "admission placement disagreement between Envoy and this gateway: call refused"
                )
        if self.placement == "edge":
            return self._edge_identity(metadata, model, via_envoy)
        try:
            identity = self.policy.admit(metadata, model)
        except Unauthenticated:
            self._refuse("unauthenticated")
            raise
        except PermissionDenied:
            self._refuse("forbidden")
            raise
        await self._limits.charge(platform, identity.tenant, model, rows)
        return identity

    def _edge_identity(self, metadata: Mapping[str, str], model: str, via_envoy: bool) -> Identity:
        tenant = metadata.get(TENANT_HEADER, "") if via_envoy else ""
        if not tenant:
            self._refuse("unauthenticated")
            raise Unauthenticated(
                "no verified identity: with admission at the edge only calls through Envoy, "
                "authorized by the edge service, are admitted"
            )
        try:
            identity = self.policy.identity_of(tenant, metadata.get(KEY_NAME_HEADER, ""))
            authorized = metadata.get(MODEL_HEADER)
            if model and authorized != model:
                # The edge reads the model from the body; protobuf keeps the last of repeated fields.
                raise PermissionDenied(f"model {model[:256]!r} is not the model the edge authorized")
            self.policy.authorize(identity, model)
        except PermissionDenied:
            self._refuse("forbidden")
            raise
        return identity

    def _refuse(self, why: str) -> None:
        DECISIONS.labels("gateway", why).inc()

    def _disagree(self, announced: str) -> None:
        PLACEMENT_DISAGREEMENTS.inc()
        self._refuse("placement_disagreement")
        now = self._clock()
        if now - self._last_disagreement_log > 5:
            self._last_disagreement_log = now
            log.error(
                "admission placement disagreement: Envoy is configured for %r, this gateway for %r; "
                "refusing every call until the control plane and the gateway agree (restart the one "
                "whose platform file is stale)",
                announced[:32] or "(none)",
                self.placement,
            )
