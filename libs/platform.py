"""The declarative platform config: public listener, gateway upstreams, tenants, rate-limit tiers, models.

One YAML file (locally `deploy/local/platform.yaml`; a ConfigMap in a cluster) read
by the xDS control plane (Envoy's listeners, routes, clusters, endpoints), the edge
policy service (tenants, tiers) and the gateway (model traffic splits). Each of
them watches the file and applies a new version without a restart; a file that
does not validate is rejected with a message naming the field, and the last good
version stays in force.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from libs.discovery import TargetError, parse_targets
from libs.schema import problem

log = logging.getLogger(__name__)


class PlatformConfigError(ValueError):
    """The platform config is invalid; the message names the field."""


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class ListenerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Bodies larger than this are refused by Envoy with 413.
    max_request_bytes: int = 1024 * 1024
    tls: TlsConfig = field(default_factory=TlsConfig)


@dataclass(frozen=True)
class RetryConfig:
    retry_on: str = "reset,connect-failure,unavailable"
    num_retries: int = 2
    per_try_timeout_ms: int = 1000
    # Envoy's retry budget: retries may add at most this percentage of active requests, and never fewer
    # than `min_retry_concurrency` at a time. Envoy's own floor (3) is too low for a replica's death: at
    # 100 req/s and 200 ms every in-flight request on the lost replica (about 10) fails at once, and the
    # chaos suite saw those beyond 3 answered UNAVAILABLE with Envoy's UO flag (budget overflow) instead
    # of being retried on the survivor. 32 covers a replica's share of in-flight requests at the rates a
    # replica serves; under overload the percentage still caps retries.
    budget_percent: float = 20.0
    min_retry_concurrency: int = 32


@dataclass(frozen=True)
class HealthCheckConfig:
    interval_ms: int = 1000
    timeout_ms: int = 500
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1


@dataclass(frozen=True)
class OutlierDetectionConfig:
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 3
    base_ejection_time_ms: int = 10_000
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class GatewayUpstream:
    """The gateway replicas Envoy balances over, and how it treats them."""

    # Discovery targets (libs/discovery.py): host:port, a DNS name (every A record), file:<json>.
    endpoints: tuple[str, ...] = ("127.0.0.1:50051",)
    timeout_ms: int = 2000
    retry: RetryConfig = field(default_factory=RetryConfig)
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    outlier_detection: OutlierDetectionConfig = field(default_factory=OutlierDetectionConfig)


@dataclass(frozen=True)
class RateLimitTier:
    """A token bucket: `requests_per_second` refill, up to `burst` tokens."""

    requests_per_second: float
    burst: int


@dataclass(frozen=True)
class Tenant:
    tier: str
    # Models this tenant may call; "*" allows all.
    models: tuple[str, ...] = ()

    def may_call(self, model: str) -> bool:
        return "*" in self.models or model in self.models


@dataclass(frozen=True)
class ModelVersionWeight:
    version: str
    weight: int


@dataclass(frozen=True)
class ModelRoute:
    """How requests for a model are spread over its versions."""

    versions: tuple[ModelVersionWeight, ...]
    # A version that also scores every request; its output is logged, never returned.
    shadow: str = ""
    # The entity key whose value pins a caller to one version (sticky A/B); "" is random.
    sticky_key: str = ""
    # Per-model limit on the tier's rate ("" uses the tenant's tier only).
    rate_limit_tier: str = ""
    # The gateway's micro-batcher adapts its delay and batch size to hold this p99 (ms; 0: fixed delay).
    latency_target_p99_ms: float = 0.0
    # Names of `inference_pools` in preference order (e.g. gpu, cpu): each batch goes to the first
    # that can take it in time, per request. Empty: the gateway's default inference target.
    pools: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferencePool:
    """A named set of inference replicas (e.g. the GPU pool): a discovery target, libs/discovery.py."""

    endpoints: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferenceHttpRoute:
    """Envoy's routes to the inference service's KServe v2 HTTP/JSON data plane (`/v2/...` inference paths).

    Off by default. When on, the routes sit behind the same admission (API keys, tenants' model lists,
    rate limits) as the gateway routes; repository, shared-memory, trace and log routes are never routed.
    """

    enabled: bool = False
    # Discovery targets of the inference replicas' HTTP port (8000).
    endpoints: tuple[str, ...] = ("127.0.0.1:8000",)
    timeout_ms: int = 2000


ADMISSION_PLACEMENTS = ("edge", "gateway")


@dataclass(frozen=True)
class AdmissionConfig:
    """Where API keys and rate limits are checked: one place, never two.

    "edge": Envoy asks the edge service (ext_authz, then the rate-limit service) before routing;
    "gateway": the gateway checks both in-process (no extra hops; rate limits from leased Redis tokens).
    Fixed for a process's life: a live edit of it is refused until a restart, so that no moment exists
    where neither place checks.
    """

    placement: str = "edge"


@dataclass(frozen=True)
class PlatformConfig:
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    gateway: GatewayUpstream = field(default_factory=GatewayUpstream)
    # Path of the hashed API-key file, relative to the platform file.
    api_keys_file: str = "keys.yaml"
    rate_limit_tiers: Mapping[str, RateLimitTier] = field(default_factory=dict)
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    models: Mapping[str, ModelRoute] = field(default_factory=dict)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    inference_pools: Mapping[str, InferencePool] = field(default_factory=dict)
    inference_http: InferenceHttpRoute = field(default_factory=InferenceHttpRoute)
    # A digest of the source text: the version Envoy and the services report.
    version: str = ""


def _section_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema of a section dataclass: its fields, typed as their defaults, and nothing else."""
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if hasattr(default, "__dataclass_fields__"):
            properties[f.name] = _section_schema(type(default))
        elif isinstance(default, tuple):
            properties[f.name] = {"type": "array", "items": {"type": "string"}}
        else:  # bool before int: a bool is an int
            kinds = ((bool, "boolean"), (float, "number"), (int, "integer"))
            properties[f.name] = {"type": next((t for k, t in kinds if isinstance(default, k)), "string")}
    # A section left empty in YAML (`listener:`) is null: its defaults.
    return {"type": ["object", "null"], "additionalProperties": False, "properties": properties}


def _mapping_of(values: dict[str, Any]) -> dict[str, Any]:
    """Named entries (tiers, tenants, models, pools), each fitting `values`."""
    return {"type": "object", "additionalProperties": values}


def _build(cls: type, data: dict[str, Any] | None) -> Any:
    """Builds a (nested) section dataclass from a mapping that fits `_section_schema(cls)`."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not data or f.name not in data:
            continue
        value = data[f.name]
        default = f.default_factory() if callable(f.default_factory) else f.default
        if hasattr(default, "__dataclass_fields__"):
            kwargs[f.name] = _build(type(default), value)
        elif isinstance(default, tuple):
            kwargs[f.name] = tuple(value)
        elif isinstance(default, float):
            kwargs[f.name] = float(value)
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


_ADMISSION_SCHEMA = _section_schema(AdmissionConfig)
_ADMISSION_SCHEMA["properties"]["placement"]["enum"] = list(ADMISSION_PLACEMENTS)
# Sections of named entries; empty ones (null, or any other falsy value) count as none.
_MAPPINGS = ("rate_limit_tiers", "tenants", "models", "inference_pools")
# The platform file's shape: every key, every type. What the schema cannot say (references between
# sections, weights that add up, endpoints that parse) `parse_platform` checks after it.
PLATFORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "listener": _section_schema(ListenerConfig),
        "gateway": _section_schema(GatewayUpstream),
        "api_keys_file": {"type": "string"},
        "rate_limit_tiers": _mapping_of(
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["requests_per_second"],
                "properties": {"requests_per_second": {"type": "number"}, "burst": {"type": "integer"}},
            }
        ),
        "tenants": _mapping_of(
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["tier"],
                "properties": {
                    "tier": {"type": "string"},
                    "models": {"type": "array", "items": {"type": "string"}},
                },
            }
        ),
        "models": _mapping_of(
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["versions"],
                "properties": {
                    "versions": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["version"],
                            "properties": {
                                "version": {"type": ["string", "integer"]},
                                "weight": {"type": "integer"},
                            },
                        },
                    },
                    # A version (a string or a number), as the versions' entries.
                    "shadow": {},
                    "sticky_key": {"type": "string"},
                    "rate_limit_tier": {},
                    "latency_target_p99_ms": {"type": "number"},
                    "pools": {"type": "array", "items": {"type": "string"}},
                },
            }
        ),
        "admission": _ADMISSION_SCHEMA,
        "inference_pools": _mapping_of(_section_schema(InferencePool)),
        "inference_http": _section_schema(InferenceHttpRoute),
    },
}


def _positive(value: float, where: str) -> None:
    if value <= 0:
        raise PlatformConfigError(f"{where}: must be positive, got {value}")


# Envoy retry conditions that would retry an overload answer (RESOURCE_EXHAUSTED, HTTP 429): a gateway
# that sheds load must see the load go away, not come back at once from its own proxy.
OVERLOAD_RETRY_CONDITIONS = frozenset({"resource-exhausted", "retriable-status-codes"})


def _check_retry_on(retry_on: str) -> None:
    for condition in (c.strip() for c in retry_on.split(",")):
        if condition in OVERLOAD_RETRY_CONDITIONS:
            raise PlatformConfigError(
                f"gateway.retry.retry_on: {condition!r} would make Envoy retry overload answers "
                "(RESOURCE_EXHAUSTED / 429 carry a retry hint for the client instead); remove it"
            )


def parse_platform(text: str) -> PlatformConfig:
    """Parses and validates the YAML text of a platform config.

    Raises:
        PlatformConfigError: Invalid YAML, an unknown key, a wrong type or an inconsistent
            reference (a tenant's unknown tier, a split that does not add up); names the field.
    """
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise PlatformConfigError(f"not valid YAML: {exc}") from None
    if isinstance(raw, dict):
        raw = {key: (value or {}) if key in _MAPPINGS else value for key, value in raw.items()}
    error = problem(raw, PLATFORM_SCHEMA, "platform")
    if error:
        raise PlatformConfigError(error)
    admission = _build(AdmissionConfig, raw.get("admission"))
    listener = _build(ListenerConfig, raw.get("listener"))
    gateway = _build(GatewayUpstream, raw.get("gateway"))
    _check_retry_on(gateway.retry.retry_on)
    _check_targets(gateway.endpoints, "gateway.endpoints")
    tiers: dict[str, RateLimitTier] = {}
    for name, spec in raw.get("rate_limit_tiers", {}).items():
        where = f"rate_limit_tiers.{name}"
        rps = float(spec["requests_per_second"])
        burst = spec.get("burst", max(1, int(rps)))
        _positive(rps, f"{where}.requests_per_second")
        _positive(burst, f"{where}.burst")
        tiers[str(name)] = RateLimitTier(rps, burst)
    tenants: dict[str, Tenant] = {}
    for name, spec in raw.get("tenants", {}).items():
        if spec["tier"] not in tiers:
            raise PlatformConfigError(f"tenants.{name}.tier: unknown rate-limit tier {spec['tier']!r}")
        tenants[str(name)] = Tenant(tier=spec["tier"], models=tuple(spec.get("models", ())))
    pools: dict[str, InferencePool] = {}
    for name, raw_pool in raw.get("inference_pools", {}).items():
        pool = _build(InferencePool, raw_pool)
        _check_targets(pool.endpoints, f"inference_pools.{name}.endpoints")
        pools[str(name)] = pool
    inference_http = _build(InferenceHttpRoute, raw.get("inference_http"))
    if inference_http.enabled:
        if admission.placement != "edge":
            # With placement "gateway" the keys and limits are checked inside the gateway, which a
            # request routed straight to the inference service never reaches: nothing would check it.
            raise PlatformConfigError(
                "inference_http.enabled: needs admission.placement: edge (Envoy checks API keys and rate "
                "limits only there; the gateway's in-process admission never sees these requests)"
            )
        _check_targets(inference_http.endpoints, "inference_http.endpoints")
        _positive(inference_http.timeout_ms, "inference_http.timeout_ms")
    return PlatformConfig(
        listener=listener,
        gateway=gateway,
        api_keys_file=raw.get("api_keys_file", "keys.yaml"),
        rate_limit_tiers=tiers,
        tenants=tenants,
        models={
            str(name): _parse_model(str(name), spec, tiers, pools)
            for name, spec in raw.get("models", {}).items()
        },
        admission=admission,
        inference_pools=pools,
        inference_http=inference_http,
        version=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


def _check_targets(targets: tuple[str, ...], where: str) -> None:
    if not targets:
        raise PlatformConfigError(f"{where}: at least one endpoint is required")
    for i, target in enumerate(targets):
        try:
            parse_targets(target)
        except TargetError as exc:
            raise PlatformConfigError(f"{where}[{i}]: {exc}") from None


def _parse_model(
    name: str, spec: dict[str, Any], tiers: Mapping[str, RateLimitTier], pools: Mapping[str, InferencePool]
) -> ModelRoute:
    where = f"models.{name}"
    versions: list[ModelVersionWeight] = []
    for i, entry in enumerate(spec["versions"]):
        weight = entry.get("weight", 100)
        if weight < 0:
            raise PlatformConfigError(f"{where}.versions[{i}].weight: must not be negative")
        versions.append(ModelVersionWeight(str(entry["version"]), weight))
    if not versions or sum(v.weight for v in versions) <= 0:
        raise PlatformConfigError(
            f"{where}.versions: at least one version with a positive weight is required"
        )
    if len({v.version for v in versions}) != len(versions):
        raise PlatformConfigError(f"{where}.versions: a version is listed twice")
    tier = str(spec.get("rate_limit_tier", ""))
    if tier and tier not in tiers:
        raise PlatformConfigError(f"{where}.rate_limit_tier: unknown rate-limit tier {tier!r}")
    target = float(spec.get("latency_target_p99_ms", 0.0))
    if not 0 <= target <= 3_600_000:  # also NaN
        raise PlatformConfigError(
            f"{where}.latency_target_p99_ms: must be 0 (none) or positive, got {target}"
        )
    chosen = tuple(spec.get("pools", ()))
    for i, pool in enumerate(chosen):
        if pool not in pools:
            raise PlatformConfigError(
                f"{where}.pools[{i}]: unknown inference pool {pool!r} (see inference_pools)"
            )
    if len(set(chosen)) != len(chosen):
        raise PlatformConfigError(f"{where}.pools: a pool is listed twice")
    return ModelRoute(
        versions=tuple(versions),
        shadow=str(spec.get("shadow", "") or ""),
        sticky_key=spec.get("sticky_key", ""),
        rate_limit_tier=tier,
        latency_target_p99_ms=target,
        pools=chosen,
    )


def file_stamp(path: Path) -> tuple[int, int]:
    """A file's (mtime_ns, size), (0, 0) when it cannot be read: a watcher reloads when it changes."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


def load_platform(path: Path) -> PlatformConfig:
    """Reads and validates the platform file (see `parse_platform`)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlatformConfigError(f"cannot read {path}: {exc.strerror}") from None
    return parse_platform(text)


class PlatformWatcher:
    """Polls the platform file; on a valid change calls `on_change`, on an invalid one keeps the last good."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[PlatformConfig], Awaitable[None] | None],
        interval_s: float = 1.0,
    ) -> None:
        self.path = path
        self.current = load_platform(path)
        self.last_error = ""
        self._on_change = on_change
        self._interval = interval_s
        self._stamp = file_stamp(path)

    async def check(self) -> bool:
        """Reloads when the file changed; True when a new version was applied."""
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            config = load_platform(self.path)
            if config.version == self.current.version:
                return False
            if config.admission.placement != self.current.admission.placement:
                raise PlatformConfigError(
                    f"admission.placement: cannot change from {self.current.admission.placement!r} to "
                    f"{config.admission.placement!r} while running; restart the services to move it"
                )
        except PlatformConfigError as exc:
            self.last_error = str(exc)
            log.error("platform config rejected, keeping version %s: %s", self.current.version, exc)
            return False
        self.current, self.last_error = config, ""
        result = self._on_change(config)
        if asyncio.iscoroutine(result):
            await result
        log.info("platform config version %s applied", config.version)
        return True

    async def run(self) -> None:
        """Polls until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:
                log.exception("applying the platform config failed")
