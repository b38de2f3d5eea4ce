"""Traffic splits: weights within tolerance, sticky entities, explicit versions, shadows, live updates."""

from __future__ import annotations

import random
from collections import Counter

from libs.platform import parse_platform
from services.gateway.routing import TrafficRouter, sticky_bucket

SPLIT = """
models:
  toy:
    versions: [{version: "1", weight: 90}, {version: "2", weight: 10}]
    shadow: "3"
"""
STICKY = """
models:
  toy:
    versions: [{version: "1", weight: 50}, {version: "2", weight: 50}]
    sticky_key: user_id
"""


def test_weights_are_served_within_tolerance() -> None:
    router = TrafficRouter(parse_platform(SPLIT), rng=random.Random(7))
    counts = Counter(router.choose("toy", {}, "9").version for _ in range(20_000))
    assert set(counts) == {"1", "2"}
    assert abs(counts["2"] / 20_000 - 0.10) < 0.01


def test_the_shadow_is_chosen_with_every_version() -> None:
    router = TrafficRouter(parse_platform(SPLIT))
    choice = router.choose("toy", {}, "")
    assert choice.shadow == "3"
    assert router.shadow_for("toy", "1") == "3"
    assert router.shadow_for("toy", "3") == ""


def test_sticky_key_pins_an_entity_to_one_version_and_still_splits() -> None:
    router = TrafficRouter(parse_platform(STICKY))
    for user in ("u1", "u2", "u3", "u42"):
        versions = {router.choose("toy", {"user_id": user}, "").version for _ in range(50)}
        assert len(versions) == 1
    spread = Counter(router.choose("toy", {"user_id": f"u{i}"}, "").version for i in range(4000))
    assert abs(spread["1"] / 4000 - 0.5) < 0.05


def test_sticky_bucket_is_stable() -> None:
    assert sticky_bucket("u42", 100) == sticky_bucket("u42", 100)
    assert 0 <= sticky_bucket("anything", 7) < 7


def test_a_model_without_a_route_uses_the_fallback_and_updates_apply() -> None:
    router = TrafficRouter()
    assert router.choose("toy", {}, "4").version == "4"
    router.update(parse_platform(SPLIT.replace("90", "0")))
    assert {router.choose("toy", {}, "4").version for _ in range(100)} == {"2"}


def _published(model: str) -> dict[tuple[str, str], float]:
    """(version, role) -> the route share gauge's value for `model`, as /metrics exports it."""
    from prometheus_client import REGISTRY

    return {
        (s.labels["version"], s.labels["role"]): s.value
        for family in REGISTRY.collect()
        if family.name == "infergrid_gateway_route_share_ratio"
        for s in family.samples
        if s.labels["model"] == model
    }


def test_the_applied_split_and_shadow_are_published_and_a_dropped_version_goes_to_zero() -> None:
    router = TrafficRouter(parse_platform(SPLIT.replace("toy", "published")))
    assert _published("published") == {("1", "primary"): 0.9, ("2", "primary"): 0.1, ("3", "shadow"): 1.0}
    router.update(parse_platform('models:\n  published:\n    versions: [{version: "2", weight: 5}]\n'))
    assert _published("published") == {("1", "primary"): 0.0, ("2", "primary"): 1.0, ("3", "shadow"): 0.0}
