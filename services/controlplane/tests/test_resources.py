"""The platform config → Envoy resources translation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from google.protobuf import json_format

from libs.platform import PlatformConfig, parse_platform
from services.controlplane.config import EnvoySettings
from services.controlplane.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    EnvoyWiring,
    build_resources,
)

PLATFORM = """
listener: {host: 127.0.0.1, port: 8443, max_request_bytes: 4096}
gateway:
  endpoints: ["127.0.0.1:50051", "localhost:50052"]
  timeout_ms: 1500
  retry: {retry_on: "reset,unavailable", num_retries: 4, per_try_timeout_ms: 700, budget_percent: 25, min_retry_concurrency: 5}
  health_check: {interval_ms: 2000, timeout_ms: 400, unhealthy_threshold: 3, healthy_threshold: 2}
  outlier_detection: {consecutive_5xx: 7, consecutive_gateway_failure: 4, base_ejection_time_ms: 3000, max_ejection_percent: 40}
rate_limit_tiers: {free: {requests_per_second: 1, burst: 2}}
tenants: {demo: {tier: free, models: [fraud]}}
models: {fraud: {versions: [{version: "1", weight: 1}]}}
"""
WIRING = EnvoyWiring(EnvoySettings(descriptor_set=Path("/d.pb")))
ENDPOINTS = {
    "gateway": ("127.0.0.1:50051", "127.0.0.1:50052"),
    "edge": ("127.0.0.1:50060", "[::1]:50061"),
    "inference-http": ("127.0.0.1:8000",),  # served only when the platform routes the inference REST API
}


def _dicts(
    wiring: EnvoyWiring = WIRING, platform: PlatformConfig | None = None, endpoints: dict = ENDPOINTS
) -> dict[str, dict]:
    resources = build_resources(platform or parse_platform(PLATFORM), wiring, endpoints)
    return {
        type_url: {
            name: json_format.MessageToDict(m, preserving_proto_field_name=True) for name, m in items.items()
        }
        for type_url, items in resources.by_type.items()
    }


def _filters(listener: dict) -> dict[str, dict]:
    hcm = listener["filter_chains"][0]["filters"][-1]["typed_config"]
    return {f["name"]: f["typed_config"] for f in hcm["http_filters"]}


def test_every_type_has_its_resources() -> None:
    out = _dicts()

    assert set(out[CLUSTER_TYPE]) == {"gateway", "edge"}
    assert set(out[ENDPOINT_TYPE]) == {"gateway", "edge"}
    assert set(out[LISTENER_TYPE]) == {"public"}
    assert set(out[ROUTE_TYPE]) == {"public"}


def test_gateway_cluster_has_health_checks_outlier_detection_and_a_retry_budget() -> None:
    cluster = _dicts()[CLUSTER_TYPE]["gateway"]

    assert cluster["type"] == "EDS"
    check = cluster["health_checks"][0]
    assert check["grpc_health_check"]["service_name"] == "infergrid.gateway.v1.PredictionService"
    assert (check["interval"], check["timeout"], check["unhealthy_threshold"]) == ("2s", "0.400s", 3)
    outlier = cluster["outlier_detection"]
    assert (outlier["consecutive_5xx"], outlier["consecutive_gateway_failure"]) == (7, 4)
    assert (outlier["base_ejection_time"], outlier["max_ejection_percent"]) == ("3s", 40)
    # A replica that refuses connections (SIGKILLed) is ejected at its first refusal, before EDS drops it.
    assert outlier["split_external_local_origin_errors"] is True
    assert outlier["consecutive_local_origin_failure"] == 1
    assert outlier["enforcing_consecutive_local_origin_failure"] == 100
    budget = cluster["circuit_breakers"]["thresholds"][0]["retry_budget"]
    assert budget == {"budget_percent": {"value": 25.0}, "min_retry_concurrency": 5}
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])


def test_the_resolved_endpoints_are_the_load_assignments() -> None:
    out = _dicts()[ENDPOINT_TYPE]

    def _addresses(cluster: str) -> list[dict]:
        return [
            e["endpoint"]["address"]["socket_address"] for e in out[cluster]["endpoints"][0]["lb_endpoints"]
        ]

    assert _addresses("gateway") == [
        {"address": "127.0.0.1", "port_value": 50051},
        {"address": "127.0.0.1", "port_value": 50052},
    ]
    assert _addresses("edge") == [
        {"address": "127.0.0.1", "port_value": 50060},
        {"address": "::1", "port_value": 50061},
    ]


def test_the_edge_cluster_follows_eds_with_health_checks() -> None:
    cluster = _dicts()[CLUSTER_TYPE]["edge"]

    assert cluster["type"] == "EDS" and "load_assignment" not in cluster
    assert cluster["ignore_health_on_host_removal"] is True
    check = cluster["health_checks"][0]
    assert (check["interval"], check["timeout"], check["unhealthy_threshold"]) == ("2s", "0.400s", 3)
    assert check["grpc_health_check"] == {}  # service "": the edge server's own health
    # A replica that refuses connections (SIGKILLed) is ejected at its first failure, at most half at once.
    outlier = cluster["outlier_detection"]
    assert outlier["split_external_local_origin_errors"] is True
    assert outlier["consecutive_local_origin_failure"] == 1
    assert outlier["enforcing_consecutive_local_origin_failure"] == 100
    assert outlier["enforcing_consecutive_5xx"] == 0
    assert outlier["max_ejection_percent"] == 50


def test_a_cluster_without_endpoints_gets_an_empty_assignment() -> None:
    assignments = _dicts(endpoints={})[ENDPOINT_TYPE]
    for name in ("gateway", "edge"):
        assert assignments[name]["cluster_name"] == name
        assert not assignments[name]["endpoints"][0].get("lb_endpoints")


def test_listener_filter_chain_order_and_settings() -> None:
    listener = _dicts()[LISTENER_TYPE]["public"]
    filters = _filters(listener)

    assert list(filters) == [
        "envoy.filters.http.buffer",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.router",
    ]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8443}
    assert filters["envoy.filters.http.buffer"]["max_request_bytes"] == 4096
    assert filters["envoy.filters.http.grpc_json_transcoder"]["proto_descriptor"] == "/d.pb"
    assert filters["envoy.filters.http.grpc_json_transcoder"]["convert_grpc_status"] is True
    authz = filters["envoy.filters.http.ext_authz"]
    assert authz["with_request_body"]["pack_as_bytes"] is True
    assert authz.get("failure_mode_allow", False) is False
    ratelimit = filters["envoy.filters.http.ratelimit"]
    assert ratelimit["rate_limited_as_resource_exhausted"] is True
    assert ratelimit.get("failure_mode_deny", False) is False
    assert ratelimit["domain"] == "infergrid"


def test_routes_carry_timeouts_retries_and_rate_limit_descriptors() -> None:
    routes = _dicts()[ROUTE_TYPE]["public"]["virtual_hosts"][0]["routes"]

    assert [r["match"]["path"] for r in routes] == [
        "/infergrid.gateway.v1.PredictionService/Predict",
        "/infergrid.gateway.v1.PredictionService/PredictBatch",
    ]
    action = routes[0]["route"]
    assert action["timeout"] == "1.500s"
    assert action["retry_policy"]["retry_on"] == "reset,unavailable"
    assert action["retry_policy"]["num_retries"] == 4
    assert action["retry_policy"]["per_try_timeout"] == "0.700s"
    keys = [
        [a["request_headers"]["descriptor_key"] for a in limit["actions"]] for limit in action["rate_limits"]
    ]
    assert keys == [["tenant"], ["tenant", "model"]]


def test_tracing_tls_access_log_and_port_override() -> None:
    settings = dataclasses.replace(
        WIRING.settings,
        tracing_otlp_address="127.0.0.1:4317",
        tracing_sample_percent=1.5,
        listener_port=9999,
        access_log="/tmp/access.log",
    )
    wiring = EnvoyWiring(settings, tls_cert_file="/c.crt", tls_key_file="/c.key")
    platform = parse_platform(
        PLATFORM.replace("max_request_bytes: 4096}", "max_request_bytes: 4096, tls: {enabled: true}}")
    )
    out = _dicts(wiring, platform)

    assert "jaeger" in out[CLUSTER_TYPE]
    listener = out[LISTENER_TYPE]["public"]
    hcm = listener["filter_chains"][0]["filters"][-1]["typed_config"]
    assert hcm["tracing"]["provider"]["name"] == "envoy.tracers.opentelemetry"
    assert hcm["tracing"]["random_sampling"] == {"value": 1.5}
    assert hcm["access_log"][0]["typed_config"]["path"] == "/tmp/access.log"
    assert listener["address"]["socket_address"]["port_value"] == 9999
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_certificates"][0]["certificate_chain"]["filename"] == "/c.crt"


def test_tracing_is_off_by_default() -> None:
    out = _dicts()
    hcm = out[LISTENER_TYPE]["public"]["filter_chains"][0]["filters"][-1]["typed_config"]

    assert "tracing" not in hcm
    assert "jaeger" not in out[CLUSTER_TYPE]


def test_admission_in_the_gateway_drops_the_edge_filters_and_strips_identity_headers() -> None:
    platform = parse_platform(PLATFORM + "admission: {placement: gateway}\n")
    resources = _dicts(platform=platform)
    filters = list(_filters(resources[LISTENER_TYPE]["public"]))
    assert filters == [
        "envoy.filters.http.buffer",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    assert set(resources[CLUSTER_TYPE]) == {"gateway"}
    assert set(resources[ENDPOINT_TYPE]) == {"gateway"}
    for route in resources[ROUTE_TYPE]["public"]["virtual_hosts"][0]["routes"]:
        assert "rate_limits" not in route["route"]
        assert "x-infergrid-tenant" in route["request_headers_to_remove"]
    # The edge placement (the default) keeps ext_authz and the rate-limit filter before the router.
    edge = list(_filters(_dicts()[LISTENER_TYPE]["public"]))
    assert edge[2:] == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.router",
    ]


def test_the_inference_rest_api_is_not_routed_by_default() -> None:
    d = _dicts()
    assert "inference-http" not in d[CLUSTER_TYPE] and "inference-http" not in d[ENDPOINT_TYPE]
    paths = [r["match"] for r in d[ROUTE_TYPE]["public"]["virtual_hosts"][0]["routes"]]
    assert not any("/v2" in str(match) for match in paths)


def test_the_inference_rest_api_when_routed_is_data_plane_only_behind_admission() -> None:
    import re

    platform = parse_platform(
        PLATFORM + 'inference_http: {enabled: true, endpoints: ["127.0.0.1:8000"], timeout_ms: 900}\n'
    )
    d = _dicts(platform=platform)
    cluster = d[CLUSTER_TYPE]["inference-http"]
    assert cluster["type"] == "EDS"
    assert cluster["health_checks"][0]["http_health_check"]["path"] == "/v2/health/ready"
    assert "typed_extension_protocol_options" not in cluster  # HTTP/1.1 to aiohttp
    lb = d[ENDPOINT_TYPE]["inference-http"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in lb] == [8000]
    routes = d[ROUTE_TYPE]["public"]["virtual_hosts"][0]["routes"]
    v2 = [r for r in routes if r["name"].startswith("inference-")]
    routed = [r for r in v2 if "route" in r]
    for r in routed:
        assert r["route"]["cluster"] == "inference-http"
        assert r["route"]["timeout"] == "0.900s"
        assert r["route"]["rate_limits"]  # the same descriptors as the gateway routes
    # The edge's ext_authz and rate-limit filters are on the listener for every route.
    assert {"envoy.filters.http.ext_authz", "envoy.filters.http.ratelimit"} <= set(
        _filters(d[LISTENER_TYPE]["public"])
    )

    def target(path: str) -> str:
        """What Envoy does with `path`: the first matching route (safe_regex is a full match)."""
        for r in v2:
            match = r["match"]
            if match.get("path") == path or (
                "safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path)
            ):
                return "inference" if "route" in r else "refused"
        return "no route"

    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/fraud",
        "/v2/models/fraud/ready",
        "/v2/models/fraud/config",
        "/v2/models/fraud/infer",
        "/v2/models/fraud/versions/2/infer",
    ):
        assert target(path) == "inference", path
    for path in (
        "/v2/models/stats",
        "/v2/models/fraud/stats",
        "/v2/repository/index",
        "/v2/repository/models/fraud/load",
        "/v2/systemsharedmemory/region/r/register",
        "/v2/cudasharedmemory/status",
        "/v2/trace/setting",
        "/v2/models/fraud/trace/setting",
        "/v2/logging",
    ):
        assert target(path) in ("refused", "no route"), path


def test_the_public_listener_is_hardened() -> None:
    """Connection and stream limits, header and request timeouts, buffer limits, no trusted x-envoy-*."""
    listener = _dicts()[LISTENER_TYPE]["public"]
    assert listener["per_connection_buffer_limit_bytes"] == 32 * 1024
    first, hcm_filter = listener["filter_chains"][0]["filters"]
    assert first["name"] == "envoy.filters.network.connection_limit"
    assert int(first["typed_config"]["max_connections"]) == 10_000
    hcm = hcm_filter["typed_config"]
    assert hcm["use_remote_address"] is True and hcm.get("xff_num_trusted_hops", 0) == 0
    assert hcm["internal_address_config"]["cidr_ranges"] == [{"address_prefix": "0.0.0.0", "prefix_len": 32}]
    assert hcm["request_headers_timeout"] == "10s"
    assert hcm["request_timeout"] == "60s"  # above the route's 1.5 s
    assert hcm["stream_idle_timeout"] == "30s"
    assert hcm["max_request_headers_kb"] == 32
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 100
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "REJECT_REQUEST"
    assert _filters(listener)["envoy.filters.http.router"]["suppress_envoy_headers"] is True
