"""Traffic splits: which model version serves a request (weights, sticky per entity, shadow)."""

from __future__ import annotations

import bisect
import itertools
import random
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from libs.platform import ModelRoute, PlatformConfig
from services.gateway.metrics import ROUTE_SHARE


@dataclass(frozen=True)
class Split:
    """A model's route, precomputed: cumulative weights for a bisect per request."""

    versions: tuple[str, ...]
    cumulative: tuple[int, ...]
    total: int
    shadow: str
    sticky_key: str
    # The micro-batcher's p99 target in seconds (0: none).
    latency_target_s: float = 0.0

    @classmethod
    def of(cls, route: ModelRoute) -> Split:
        weighted = [entry for entry in route.versions if entry.weight > 0]
        cumulative = tuple(itertools.accumulate(entry.weight for entry in weighted))
        return cls(
            tuple(entry.version for entry in weighted),
            cumulative,
            cumulative[-1] if cumulative else 0,
            route.shadow,
            route.sticky_key,
            route.latency_target_p99_ms / 1000,
        )


@dataclass(frozen=True)
class Choice:
    """The version that answers, and the shadow version that is also scored ("" for none)."""

    version: str
    shadow: str


def sticky_bucket(value: str, total: int) -> int:
    """A stable bucket in [0, total) for an entity value: the same value always lands in the same bucket."""
    return zlib.crc32(value.encode()) % total


def route_shares(splits: Mapping[str, Split]) -> dict[tuple[str, str, str], float]:
    """(model, version, "primary") -> the version's share of the model's requests, and
    (model, shadow, "shadow") -> 1 for each model's shadow version."""
    shares: dict[tuple[str, str, str], float] = {}
    for model, split in splits.items():
        previous = 0
        for version, cumulative in zip(split.versions, split.cumulative, strict=True):
            key = (model, version, "primary")
            shares[key] = shares.get(key, 0.0) + (cumulative - previous) / split.total
            previous = cumulative
        if split.shadow:
            shares[(model, split.shadow, "shadow")] = 1.0
    return shares


class TrafficRouter:
    """Chooses versions from the platform config's model routes; `update` swaps the routes atomically."""

    def __init__(self, config: PlatformConfig | None = None, rng: random.Random | None = None) -> None:
        self._splits: dict[str, Split] = {}
        self._published: set[tuple[str, str, str]] = set()
        self._random = (rng or random.Random()).random
        if config is not None:
            self.update(config)

    def update(self, config: PlatformConfig) -> None:
        """Applies the routes of a (validated) platform config; requests after this call see them.

        The applied split is published as `infergrid_gateway_route_share_ratio` (the operator console reads
        it from Prometheus); a version or shadow no longer routed drops to 0.
        """
        self._splits = {name: Split.of(route) for name, route in config.models.items()}
        shares = route_shares(self._splits)
        for labels in self._published - shares.keys():
            ROUTE_SHARE.labels(*labels).set(0)
        for labels, share in shares.items():
            ROUTE_SHARE.labels(*labels).set(share)
        self._published = set(shares)

    def latency_target_s(self, model: str) -> float:
        """The model's p99 target for the micro-batcher in seconds (0: none)."""
        split = self._splits.get(model)
        return split.latency_target_s if split is not None else 0.0

    def choose(self, model: str, entities: Mapping[str, str], fallback: str) -> Choice:
        """The version for one request without an explicit version.

        Args:
            model: The model name.
            entities: The request's entity keys (the sticky key's value pins the version).
            fallback: The version used when the model has no route.
        """
        split = self._splits.get(model)
        if split is None:
            return Choice(fallback, "")
        if len(split.versions) == 1:
            version = split.versions[0]
        else:
            sticky = entities.get(split.sticky_key) if split.sticky_key else None
            point = sticky_bucket(sticky, split.total) if sticky else int(self._random() * split.total)
            version = split.versions[bisect.bisect_right(split.cumulative, point)]
        shadow = split.shadow if split.shadow != version else ""
        return Choice(version, shadow)

    def shadow_for(self, model: str, version: str) -> str:
        """The shadow version of a request that named its version ("" when none or the same)."""
        split = self._splits.get(model)
        if split is None or split.shadow == version:
            return ""
        return split.shadow
