"""The platform config: parsing, validation naming the field, and live reload keeping the last good."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.platform import PlatformConfigError, PlatformWatcher, load_platform, parse_platform

REPO = Path(__file__).resolve().parents[2]


def test_the_local_platform_file_is_valid() -> None:
    config = load_platform(REPO / "deploy" / "local" / "platform.yaml")
    assert config.listener.port == 8080
    assert config.gateway.endpoints == ("127.0.0.1:50051",)
    assert config.tenants["demo"].may_call("fraud") and not config.tenants["demo"].may_call("other")
    fraud = config.models["fraud"]
    assert [(v.version, v.weight) for v in fraud.versions] == [("1", 90), ("2", 10)]
    assert fraud.sticky_key == "user_id"
    assert config.rate_limit_tiers["free"].requests_per_second == 10.0
    assert len(config.version) == 16
    assert config.admission.placement == "gateway"
    assert parse_platform("").admission.placement == "edge"  # the default when the file says nothing


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listener: {port: 'x'}", "listener.port: expected int, got str 'x'"),
        ("listener: {port: 8080.0}", "listener.port: expected int, got float 8080.0"),
        (
            "gateway: {retry: {budget_percent: true}}",
            "gateway.retry.budget_percent: expected int or float, got bool",
        ),
        ("tenants: {t: {models: [fraud]}}", "tenants.t.tier: required"),
        ("listener: {prot: 1}", "listener: unknown key(s) prot"),
        ("gateway: {endpoints: ['nohost']}", "gateway.endpoints[0]: expected host:port"),
        ("tenants: {t: {tier: gold}}", "tenants.t.tier: unknown rate-limit tier 'gold'"),
        (
            "rate_limit_tiers: {a: {requests_per_second: 0}}",
            "rate_limit_tiers.a.requests_per_second: must be positive",
        ),
        ("models: {m: {versions: [{version: '1', weight: 0}]}}", "models.m.versions: at least one version"),
        (
            "models: {m: {versions: [{version: 1}, {version: '1'}]}}",
            "models.m.versions: a version is listed twice",
        ),
        (
            "models: {m: {versions: [{version: '1', wieght: 5}]}}",
            "models.m.versions[0]: unknown key(s) wieght",
        ),
        ("listener: [1", "not valid YAML"),
        ("colour: blue", "platform: unknown key(s) colour"),
        ("admission: {placement: envoy}", "admission.placement: expected one of edge, gateway, got 'envoy'"),
        (
            "gateway: {retry: {retry_on: 'reset,resource-exhausted,unavailable'}}",
            "gateway.retry.retry_on: 'resource-exhausted' would make Envoy retry overload answers",
        ),
        ("gateway: {retry: {retry_on: 'retriable-status-codes'}}", "'retriable-status-codes' would make"),
        (
            "models: {m: {versions: [{version: '1'}], latency_target_p99_ms: -5}}",
            "models.m.latency_target_p99_ms: must be 0 (none) or positive",
        ),
        (
            "models: {m: {versions: [{version: '1'}], pools: [gpu]}}",
            "models.m.pools[0]: unknown inference pool 'gpu'",
        ),
        (
            "inference_pools: {gpu: {endpoints: ['a:1']}}\n"
            "models: {m: {versions: [{version: '1'}], pools: [gpu, gpu]}}",
            "models.m.pools: a pool is listed twice",
        ),
        ("inference_pools: {gpu: {endpoints: []}}", "inference_pools.gpu.endpoints: at least one endpoint"),
        ("inference_pools: {gpu: {endpoints: ['nohost']}}", "inference_pools.gpu.endpoints[0]: expected"),
        ("inference_http: {enabled: 'yes'}", "inference_http.enabled: expected bool"),
        (
            "admission: {placement: edge}\ninference_http: {enabled: true, endpoints: []}",
            "inference_http.endpoints: at least one",
        ),
        (
            "admission: {placement: gateway}\ninference_http: {enabled: true}",
            "inference_http.enabled: needs admission.placement: edge",
        ),
        ("inference_http: {enabeld: true}", "inference_http: unknown key(s) enabeld"),
    ],
)
def test_invalid_configs_name_the_field(text: str, message: str) -> None:
    with pytest.raises(PlatformConfigError) as err:
        parse_platform(text)
    assert message in str(err.value)


async def test_watcher_applies_valid_changes_and_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "platform.yaml"
    path.write_text("models: {fraud: {versions: [{version: '1'}]}}\n")
    applied: list[str] = []
    watcher = PlatformWatcher(path, lambda c: applied.append(c.models["fraud"].versions[0].version))
    assert await watcher.check() is False  # unchanged

    path.write_text("models: {fraud: {versions: [{version: '2'}]}}\n")
    assert await watcher.check() is True
    assert applied == ["2"]

    path.write_text("models: {fraud: {versions: []}}\n")
    assert await watcher.check() is False
    assert "models.fraud.versions" in watcher.last_error
    assert watcher.current.models["fraud"].versions[0].version == "2"


async def test_watcher_refuses_to_move_admission_while_running(tmp_path: Path) -> None:
    path = tmp_path / "platform.yaml"
    path.write_text("admission: {placement: gateway}\n")
    applied: list[str] = []
    watcher = PlatformWatcher(path, lambda c: applied.append(c.admission.placement))
    # Moving the checks live could leave a moment where neither place checks: refused until a restart.
    path.write_text("admission: {placement: edge}\n")
    assert await watcher.check() is False
    assert "admission.placement: cannot change from 'gateway' to 'edge' while running" in watcher.last_error
    assert applied == [] and watcher.current.admission.placement == "gateway"


def test_inference_pools_latency_target_and_http_route() -> None:
    config = parse_platform(
        """
inference_pools:
  gpu: {endpoints: ["127.0.0.1:8101"]}
  cpu: {endpoints: ["127.0.0.1:8001", "file:cpu.json"]}
inference_http: {enabled: true, endpoints: ["inference:8000"]}
admission: {placement: edge}
models:
  fraud: {versions: [{version: '1'}], pools: [gpu, cpu], latency_target_p99_ms: 10}
"""
    )
    assert config.models["fraud"].pools == ("gpu", "cpu")
    assert config.models["fraud"].latency_target_p99_ms == 10.0
    assert config.inference_pools["cpu"].endpoints == ("127.0.0.1:8001", "file:cpu.json")
    assert config.inference_http.enabled and config.inference_http.endpoints == ("inference:8000",)
    default = parse_platform("")
    assert not default.inference_http.enabled and default.inference_pools == {}
