"""Configuration of the edge policy service, read once from INFERGRID_EDGE_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from libs.config import RedisClientConfig, section, setting
from libs.server import ServerConfig
from libs.telemetry import TelemetryConfig

ENV_PREFIX = "INFERGRID_EDGE_"


@dataclass(frozen=True)
class PolicyConfig(RedisClientConfig):
    """Where tenants, tiers and keys come from, and the rate limiter's store: its Redis (`redis_url`), its own
    instance or db with maxmemory-policy noeviction (a cache's eviction must never erase a bucket)."""

    # The declarative platform config; the hashed key file is named by its `api_keys_file`.
    platform_file: Path = Path("deploy/local/platform.yaml")
    # The hashed key file; "" uses the platform's `api_keys_file` (relative to the platform file). The
    # local stack keeps it in its state folder, out of the checkout.
    keys_file: str = ""
    # How often the platform and key files are checked for changes.
    poll_seconds: float = 1.0
    # Deadline of one rate-limit round trip to Redis; past it this replica's local share of the tier answers.
    redis_timeout_ms: int = 200
    # Prefix of the rate limiter's Redis keys.
    key_prefix: str = "infergrid:rl"
    # After a Redis failure, this replica's local share answers for this long before Redis is tried again.
    fail_open_s: float = 1.0
    # Edge replicas sharing the tiers: while Redis is down each allows 1/replicas of a tier's rate.
    replicas: int = setting(1, minimum=1)


@dataclass(frozen=True)
class EdgeConfig:
    """Everything the edge service reads at start-up."""

    server: ServerConfig = section(ServerConfig, port=50060)
    telemetry: TelemetryConfig = section(TelemetryConfig, metrics_port=9107)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
