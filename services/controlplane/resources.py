"""Translates the platform config into Envoy's xDS resources: clusters, endpoints, the listener, routes.

Resources are written as dicts in the shape of Envoy's own YAML (easy to read next to Envoy's docs)
and parsed into the typed `xds-protos` messages, which rejects a misspelt field here, in the control
plane, rather than in Envoy.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The modules below register the typed configs the dicts name in "@type"; the imports are needed.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.config.trace.v3 import opentelemetry_pb2  # noqa: F401
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
from envoy.extensions.filters.http.grpc_json_transcoder.v3 import transcoder_pb2  # noqa: F401
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.connection_limit.v3 import connection_limit_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,  # noqa: F401
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format
from google.protobuf.message import Message

from libs.admission import IDENTITY_HEADERS, MODEL_HEADER, PLACEMENT_HEADER, RATE_LIMIT_DOMAIN, TENANT_HEADER
from libs.discovery import is_ip_literal
from libs.platform import PlatformConfig
from services.controlplane.config import EnvoySettings

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# The order in which a change is pushed, so that nothing refers to a resource Envoy does not have yet
# (a rotated certificate arrives before the clusters that use it).
PUSH_ORDER = (SECRET_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)
# SDS secrets of the Envoy → gateway mutual TLS: Envoy's client certificate and the mesh CA.
MESH_CLIENT_SECRET = "gateway-mesh-client"
MESH_CA_SECRET = "gateway-mesh-ca"

GATEWAY_CLUSTER = "gateway"
EDGE_CLUSTER = "edge"
# The inference replicas' KServe v2 HTTP/JSON port, routed only when the platform's inference_http is on.
INFERENCE_HTTP_CLUSTER = "inference-http"
TRACING_CLUSTER = "jaeger"
LISTENER_NAME = "public"
ROUTE_NAME = "public"
PREDICTION_SERVICE = "infergrid.gateway.v1.PredictionService"

_ADS = {"ads": {}, "resource_api_version": "V3"}
_HTTP2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
_ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS(NUMBER)%",
    "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "upstream": "%UPSTREAM_HOST%",
    "tenant": "%REQ(X-INFERGRID-TENANT)%",
    "model": "%REQ(X-INFERGRID-MODEL)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "trace_id": "%TRACE_ID%",
}


# A request no route matches (Envoy's NR flag) gets a 404 saying what exists (UNIMPLEMENTED for gRPC).
_NO_ROUTE = {
    "filter": {"response_flag_filter": {"flags": ["NR"]}},
    "body_format_override": {
        "text_format_source": {
            "inline_string": (
                "no route for %REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%: the API is "
                "POST /v1/models/{model}:predict, POST /v1/models/{model}:predictBatch "
                f"and gRPC {PREDICTION_SERVICE}/Predict, /PredictBatch\n"
            )
        }
    },
}


def _grpc_too_large(max_bytes: int) -> dict[str, Any]:
    """Local-reply mapper: RESOURCE_EXHAUSTED with the limit for gRPC; HTTP callers keep their 413."""
    return {
        "filter": {
            "and_filter": {
                "filters": [
                    {
                        "status_code_filter": {
                            "comparison": {"op": "EQ", "value": {"default_value": 413, "runtime_key": "_"}}
                        }
                    },
                    {
                        "header_filter": {
                            "header": {"name": "content-type", "string_match": {"prefix": "application/grpc"}}
                        }
                    },
                ]
            }
        },
        "headers_to_add": [_set_header("grpc-status", "8")],
        "body": {"inline_string": f"request body larger than max_request_bytes ({max_bytes})"},
    }


# Edge hardening of the public listener (the overload manager's heap limit is in the bootstrap,
# deploy/local/envoy/envoy.yaml: it is not an xDS resource). Sized for a prediction API: small headers,
# bodies capped by the buffer filter, calls that take seconds, not minutes.
MAX_DOWNSTREAM_CONNECTIONS = 10_000
MAX_CONCURRENT_STREAMS = 100  # per HTTP/2 connection
CONNECTION_BUFFER_BYTES = 32 * 1024  # per connection, read and write
MAX_REQUEST_HEADERS_KB = 32
MAX_HEADERS_COUNT = 100
REQUEST_HEADERS_TIMEOUT_MS = 10_000  # a client that sends headers slowly (slowloris) is cut off
STREAM_IDLE_TIMEOUT_MS = 30_000
IDLE_CONNECTION_TIMEOUT_MS = 300_000
# The whole request, body included; above the longest route timeout so that a route's own answers first.
MIN_REQUEST_TIMEOUT_MS = 60_000


@dataclass(frozen=True)
class EnvoyWiring:
    """What the translation needs beyond the platform config: the control plane's settings and the files
    they lead to (the listener's certificate and key; the Envoy → gateway mesh PEMs, empty: plaintext)."""

    settings: EnvoySettings
    tls_cert_file: str = ""
    tls_key_file: str = ""
    mesh_ca_pem: bytes = b""
    mesh_cert_pem: bytes = b""
    mesh_key_pem: bytes = b""

    @property
    def mesh(self) -> bool:
        """True when Envoy talks to the gateway over mutual TLS."""
        return bool(self.mesh_ca_pem and self.mesh_cert_pem and self.mesh_key_pem)


@dataclass(frozen=True)
class Resources:
    """One complete set of resources, by type URL and name; the unit of a version."""

    by_type: dict[str, dict[str, Message]]

    def of(self, type_url: str) -> dict[str, Message]:
        """The resources of one type, by name."""
        return self.by_type.get(type_url, {})


def _ms(value: int) -> str:
    return f"{value / 1000:.3f}s"


def _socket_address(address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def _typed(name: str, type_name: str, **config: Any) -> dict[str, Any]:
    """A named extension and its typed config; `type_name` is the config message's full name."""
    return {"name": name, "typed_config": {"@type": f"type.googleapis.com/{type_name}", **config}}


def _set_header(key: str, value: str) -> dict[str, Any]:
    """A header to add, replacing whatever the request or answer had under that name."""
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _breakers(**threshold: Any) -> dict[str, Any]:
    """Circuit breakers at 10,000 connections, pending and active requests (plus `threshold`'s fields)."""
    limits = {"max_connections": 10_000, "max_pending_requests": 10_000, "max_requests": 10_000}
    return {"thresholds": [{**limits, **threshold}]}


def _static_cluster(name: str, address: str, timeout_ms: int = 1000) -> dict[str, Any]:
    """A cluster of one fixed address (DNS-resolved when it is a name) that speaks HTTP/2 (gRPC)."""
    host = address.rpartition(":")[0].strip("[]")
    return {
        "name": name,
        "type": "STATIC" if is_ip_literal(host) else "STRICT_DNS",
        "connect_timeout": _ms(timeout_ms),
        "typed_extension_protocol_options": _HTTP2,
        "circuit_breakers": _breakers(),
        "load_assignment": cluster_load_assignment(name, [address]),
    }


def _parse(message: type[Message], data: dict[str, Any]) -> Message:
    return json_format.ParseDict(data, message())


def _health_check(platform: PlatformConfig, **check: Any) -> dict[str, Any]:
    """An active health check (`check`: gRPC's grpc.health.v1 or an HTTP path) with the platform's timings."""
    hc = platform.gateway.health_check
    return {
        "timeout": _ms(hc.timeout_ms),
        "interval": _ms(hc.interval_ms),
        "unhealthy_threshold": hc.unhealthy_threshold,
        "healthy_threshold": hc.healthy_threshold,
        # A host whose health check has not passed yet gets no traffic.
        "no_traffic_interval": _ms(hc.interval_ms),
        **check,
    }


def _eds_cluster(
    name: str, platform: PlatformConfig, check: dict[str, Any], *, http2: bool = True, **fields: Any
) -> dict[str, Any]:
    """A cluster of our replicas whose endpoints come over EDS (the control plane follows the replicas):
    least-request balancing, one active health check (`check`), outlier detection, breakers; `fields`
    adds or replaces the rest. `http2`: the replicas speak HTTP/2 (gRPC), else HTTP/1.1."""
    return {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": _ADS},
        # An endpoint that left discovery leaves at once, even while its health checks pass.
        "ignore_health_on_host_removal": True,
        **({"typed_extension_protocol_options": _HTTP2} if http2 else {}),
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "health_checks": [_health_check(platform, **check)],
        "outlier_detection": _outlier_detection(platform),
        "circuit_breakers": _breakers(),
        **fields,
    }


def _outlier_detection(platform: PlatformConfig, *, eject_on_answers: bool = True) -> dict[str, Any]:
    """Ejection for a cluster of our replicas.

    A replica that refuses or resets a connection (SIGKILLed, gone) is ejected at its first such failure,
    before the health checks or EDS catch up, so retries and new requests meanwhile go to the others
    (local-origin errors counted apart from the answers). With `eject_on_answers`, a replica is also
    ejected after consecutive 5xx / gateway-error answers (the platform file's outlier_detection).
    """
    od = platform.gateway.outlier_detection
    return {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 1,
        "enforcing_consecutive_local_origin_failure": 100,
        **(
            {
                "consecutive_5xx": od.consecutive_5xx,
                "consecutive_gateway_failure": od.consecutive_gateway_failure,
                "enforcing_consecutive_gateway_failure": 100,
            }
            if eject_on_answers
            else {"enforcing_consecutive_5xx": 0}
        ),
        "base_ejection_time": _ms(od.base_ejection_time_ms),
        "max_ejection_percent": od.max_ejection_percent if eject_on_answers else 50,
        "interval": "1s",
    }


def edge_cluster(platform: PlatformConfig, wiring: EnvoyWiring) -> dict[str, Any]:
    """The edge replicas (ext_authz + rate-limit service): EDS with the gateway's health-check timings."""
    return _eds_cluster(
        EDGE_CLUSTER,
        platform,
        # "": the whole server's health (SERVING once its backends answer, NOT_SERVING while draining).
        {"grpc_health_check": {"service_name": ""}},
        connect_timeout=_ms(wiring.settings.edge_timeout_ms),
        # A check's answer is never a reason to eject; at most half the replicas at a time, so admission
        # never loses every replica to ejection.
        outlier_detection=_outlier_detection(platform, eject_on_answers=False),
    )


def _sds(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": _ADS}


def mesh_transport_socket() -> dict[str, Any]:
    """Envoy's side of the mutual TLS to the gateway: its client certificate and the CA, both over SDS."""
    return _typed(
        "envoy.transport_sockets.tls",
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        common_tls_context={
            "alpn_protocols": ["h2"],
            "tls_certificate_sds_secret_configs": [_sds(MESH_CLIENT_SECRET)],
            "validation_context_sds_secret_config": _sds(MESH_CA_SECRET),
        },
    )


def _inline(pem: bytes) -> dict[str, str]:
    return {"inline_bytes": base64.b64encode(pem).decode()}


def secret_resources(wiring: EnvoyWiring) -> dict[str, Message]:
    """The SDS secrets (only with the mesh on): Envoy's client certificate and the CA it checks the gateway with."""
    if not wiring.mesh:
        return {}
    secrets: list[dict[str, Any]] = [
        {
            "name": MESH_CLIENT_SECRET,
            "tls_certificate": {
                "certificate_chain": _inline(wiring.mesh_cert_pem),
                "private_key": _inline(wiring.mesh_key_pem),
            },
        },
        {"name": MESH_CA_SECRET, "validation_context": {"trusted_ca": _inline(wiring.mesh_ca_pem)}},
    ]
    return {str(s["name"]): _parse(secret_pb2.Secret, s) for s in secrets}


def gateway_cluster(platform: PlatformConfig, wiring: EnvoyWiring) -> dict[str, Any]:
    """The gateway replicas: HTTP/2, EDS, active gRPC health checks, outlier detection, breakers, mTLS."""
    retry = platform.gateway.retry
    budget = {
        "budget_percent": {"value": retry.budget_percent},
        "min_retry_concurrency": retry.min_retry_concurrency,
    }
    check = {"grpc_health_check": {"service_name": PREDICTION_SERVICE}}
    cluster = _eds_cluster(GATEWAY_CLUSTER, platform, check, circuit_breakers=_breakers(retry_budget=budget))
    if wiring.mesh:
        cluster["transport_socket"] = mesh_transport_socket()
    return cluster


def inference_http_cluster(platform: PlatformConfig) -> dict[str, Any]:
    """The inference replicas' HTTP/JSON port (HTTP/1.1, aiohttp): EDS, active HTTP health checks on /v2/health/ready."""
    return _eds_cluster(
        INFERENCE_HTTP_CLUSTER, platform, {"http_health_check": {"path": "/v2/health/ready"}}, http2=False
    )


def cluster_load_assignment(cluster: str, endpoints: Sequence[str]) -> dict[str, Any]:
    """The ClusterLoadAssignment of a cluster: one locality, one host per resolved `host:port`."""
    lb_endpoints = [{"endpoint": {"address": _socket_address(endpoint)}} for endpoint in endpoints]
    return {"cluster_name": cluster, "endpoints": [{"lb_endpoints": lb_endpoints}]}


def endpoint_resources(
    platform: PlatformConfig, endpoints: Mapping[str, Sequence[str]]
) -> dict[str, Message]:
    """The EDS resources: the gateway's, the edge's when admission is at the edge, the inference HTTP port's when routed."""
    clusters = [GATEWAY_CLUSTER] + ([EDGE_CLUSTER] if platform.admission.placement == "edge" else [])
    if platform.inference_http.enabled:
        clusters.append(INFERENCE_HTTP_CLUSTER)
    return {
        name: _parse(
            endpoint_pb2.ClusterLoadAssignment, cluster_load_assignment(name, endpoints.get(name, ()))
        )
        for name in clusters
    }


def _grpc_service(cluster: str, timeout_ms: int) -> dict[str, Any]:
    return {"envoy_grpc": {"cluster_name": cluster}, "timeout": _ms(timeout_ms)}


def _http_filters(platform: PlatformConfig, wiring: EnvoyWiring) -> list[dict[str, Any]]:
    """buffer (413) → transcoder (JSON → gRPC) → [ext_authz (key, tenant, model) → ratelimit] → router.

    The bracketed filters exist when the platform places admission at the edge; with placement
    "gateway" the gateway checks keys and limits itself and Envoy only strips forged identity headers.

    The transcoder runs before authorization, so the edge service sees every request as gRPC (path and
    framed body) whether the client spoke gRPC or JSON: one code path reads the model from the body.
    """
    max_bytes = platform.listener.max_request_bytes
    return [
        _typed(
            "envoy.filters.http.buffer",
            "envoy.extensions.filters.http.buffer.v3.Buffer",
            max_request_bytes=max_bytes,
        ),
        _typed(
            "envoy.filters.http.grpc_json_transcoder",
            "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            proto_descriptor=str(wiring.settings.descriptor_set),
            services=[PREDICTION_SERVICE],
            convert_grpc_status=True,
            print_options={"always_print_primitive_fields": True, "preserve_proto_field_names": True},
            request_validation_options={
                "reject_unknown_query_parameters": True,
                # `{"model": "b"}` posted to /v1/models/a:predict is an error, not a guess.
                "reject_binding_body_field_collisions": True,
            },
        ),
        *(_edge_filters(max_bytes, wiring) if platform.admission.placement == "edge" else []),
        # No x-envoy-* headers in answers (upstream service time, overloaded, ...).
        _typed(
            "envoy.filters.http.router",
            "envoy.extensions.filters.http.router.v3.Router",
            suppress_envoy_headers=True,
        ),
    ]


def _edge_filters(max_bytes: int, wiring: EnvoyWiring) -> list[dict[str, Any]]:
    """ext_authz and the rate-limit filter, both asking the edge service (admission placement "edge")."""
    edge = _grpc_service(EDGE_CLUSTER, wiring.settings.edge_timeout_ms)
    return [
        _typed(
            "envoy.filters.http.ext_authz",
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            # No retry_policy on this side call: with one (Envoy 1.40), about one check in ten failed
            # as ext_authz_error under load in the chaos suite, with no edge replica down. A check a
            # SIGKILLed edge replica never answers fails closed (503); a drained one is never asked.
            grpc_service=edge,
            transport_api_version="V3",
            # Authorization fails closed: no answer from the edge service, no request.
            failure_mode_allow=False,
            status_on_error={"code": "ServiceUnavailable"},
            # The gRPC body carries the model name; the edge service reads it (field 1).
            with_request_body={
                "max_request_bytes": max_bytes,
                "allow_partial_message": False,
                "pack_as_bytes": True,
            },
        ),
        _typed(
            "envoy.filters.http.ratelimit",
            "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            domain=RATE_LIMIT_DOMAIN,
            timeout=_ms(wiring.settings.edge_timeout_ms),
            # Rate limiting fails open: a Redis or edge outage must not take the API down.
            failure_mode_deny=False,
            rate_limited_as_resource_exhausted=True,
            enable_x_ratelimit_headers="DRAFT_VERSION_03",
            rate_limit_service={"grpc_service": edge, "transport_api_version": "V3"},
        ),
    ]


def _access_logs(wiring: EnvoyWiring) -> list[dict[str, Any]]:
    path = wiring.settings.access_log
    log_format = {"json_format": _ACCESS_LOG_FORMAT}
    if not path:
        return []
    if path == "stdout":
        stdout = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
        return [_typed("envoy.access_loggers.stdout", stdout, log_format=log_format)]
    file = "envoy.extensions.access_loggers.file.v3.FileAccessLog"
    return [_typed("envoy.access_loggers.file", file, path=path, log_format=log_format)]


def public_listener(platform: PlatformConfig, wiring: EnvoyWiring) -> dict[str, Any]:
    """The one public listener: gRPC and HTTP/JSON on one port, routes from RDS."""
    hcm: dict[str, Any] = {
        "stat_prefix": LISTENER_NAME,
        "codec_type": "AUTO",
        "generate_request_id": True,
        # Every caller is external: the connection's address is the client's, client-sent
        # x-forwarded-for is not trusted, and x-envoy-* request headers from the client (x-envoy-retry-on,
        # x-envoy-upstream-rq-timeout-ms, ...) are removed before routing rather than honoured.
        "use_remote_address": True,
        "xff_num_trusted_hops": 0,
        # No client address is internal (0.0.0.0/32 matches no peer): an empty list would mean Envoy's
        # default, the private ranges, where the other pods of the cluster live.
        "internal_address_config": {
            "unix_sockets": False,
            "cidr_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 32}],
        },
        "request_headers_timeout": _ms(REQUEST_HEADERS_TIMEOUT_MS),
        "request_timeout": _ms(max(MIN_REQUEST_TIMEOUT_MS, platform.gateway.timeout_ms + 5_000)),
        "stream_idle_timeout": _ms(STREAM_IDLE_TIMEOUT_MS),
        "max_request_headers_kb": MAX_REQUEST_HEADERS_KB,
        "common_http_protocol_options": {
            "idle_timeout": _ms(IDLE_CONNECTION_TIMEOUT_MS),
            "max_headers_count": MAX_HEADERS_COUNT,
            "headers_with_underscores_action": "REJECT_REQUEST",
        },
        "http2_protocol_options": {
            "max_concurrent_streams": MAX_CONCURRENT_STREAMS,
            "initial_stream_window_size": 65_536,
            "initial_connection_window_size": 1_048_576,
        },
        "rds": {"route_config_name": ROUTE_NAME, "config_source": _ADS},
        "http_filters": _http_filters(platform, wiring),
        "access_log": _access_logs(wiring),
        # Envoy would derive UNKNOWN from a 413; a gRPC server says RESOURCE_EXHAUSTED for a message too large.
        "local_reply_config": {"mappers": [_grpc_too_large(platform.listener.max_request_bytes), _NO_ROUTE]},
    }
    if wiring.settings.tracing_otlp_address:
        hcm["tracing"] = {
            "random_sampling": {"value": wiring.settings.tracing_sample_percent},
            "provider": _typed(
                "envoy.tracers.opentelemetry",
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service=_grpc_service(TRACING_CLUSTER, 1000),
                service_name="envoy",
            ),
        }
    chain: dict[str, Any] = {
        "filters": [
            _typed(
                "envoy.filters.network.connection_limit",
                "envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
                stat_prefix=LISTENER_NAME,
                max_connections=MAX_DOWNSTREAM_CONNECTIONS,
            ),
            _typed(
                "envoy.filters.network.http_connection_manager",
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                **hcm,
            ),
        ]
    }
    if platform.listener.tls.enabled:
        chain["transport_socket"] = _typed(
            "envoy.transport_sockets.tls",
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            common_tls_context={
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": wiring.tls_cert_file},
                        "private_key": {"filename": wiring.tls_key_file},
                    }
                ],
            },
        )
    port = wiring.settings.listener_port or platform.listener.port
    return {
        "name": LISTENER_NAME,
        "address": {"socket_address": {"address": platform.listener.host, "port_value": port}},
        "per_connection_buffer_limit_bytes": CONNECTION_BUFFER_BYTES,
        "filter_chains": [chain],
    }


def _rate_limits() -> list[dict[str, Any]]:
    """Descriptors: (tenant) and (tenant, model), each charged the request's rows (the edge's `rows` metadata)."""
    tenant = {"request_headers": {"header_name": TENANT_HEADER, "descriptor_key": "tenant"}}
    model = {"request_headers": {"header_name": MODEL_HEADER, "descriptor_key": "model"}}
    rows = {"format": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:rows)%"}
    return [{"actions": [tenant], "hits_addend": rows}, {"actions": [tenant, model], "hits_addend": rows}]


def public_routes(platform: PlatformConfig) -> dict[str, Any]:
    """One route per PredictionService method (after transcoding every request has the gRPC path)."""
    gw = platform.gateway
    retry = gw.retry
    edge = platform.admission.placement == "edge"
    previous_hosts = _typed(
        "envoy.retry_host_predicates.previous_hosts",
        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
    )
    routes = [
        {
            "name": method,
            "match": {"path": f"/{PREDICTION_SERVICE}/{method}"},
            "route": {
                "cluster": GATEWAY_CLUSTER,
                "timeout": _ms(gw.timeout_ms),
                # A client's grpc-timeout is honoured up to the route's timeout.
                "max_stream_duration": {"grpc_timeout_header_max": _ms(gw.timeout_ms)},
                "retry_policy": {
                    "retry_on": retry.retry_on,
                    "num_retries": retry.num_retries,
                    "per_try_timeout": _ms(retry.per_try_timeout_ms),
                    "retry_host_predicate": [previous_hosts],
                    "host_selection_retry_max_attempts": 3,
                },
                **({"rate_limits": _rate_limits()} if edge else {}),
            },
            # Identity headers come from whoever admitted the request, never from the client.
            **({} if edge else {"request_headers_to_remove": list(IDENTITY_HEADERS)}),
            # Tells the gateway which placement this Envoy enforces (it refuses a disagreeing one).
            "request_headers_to_add": [_set_header(PLACEMENT_HEADER, platform.admission.placement)],
        }
        for method in ("Predict", "PredictBatch")
    ]
    if platform.inference_http.enabled:
        routes += inference_http_routes(platform)
    return {
        "name": ROUTE_NAME,
        "virtual_hosts": [{"name": LISTENER_NAME, "domains": ["*"], "routes": routes}],
    }


# The inference data plane's HTTP paths Envoy may route (KServe v2): server and model metadata, health,
# readiness, config and infer. Never the repository, statistics, shared-memory, trace or log routes.
INFERENCE_DATA_PLANE_PATHS = (
    r"/v2",
    r"/v2/health/(live|ready)",
    r"/v2/models/[^/]+(/versions/[0-9]+)?(/ready|/config|/infer)?",
)


def inference_http_routes(platform: PlatformConfig) -> list[dict[str, Any]]:
    """Routes to the inference HTTP port for the data-plane paths only, behind the edge's admission.

    The platform allows this only with admission at the edge: the listener's ext_authz (key, tenant, the
    model read from `/v2/models/{model}`) and the same rate-limit descriptors as the gateway routes apply.
    """
    # `/v2/models/stats` would match the model pattern (a model named "stats"): it is a statistics route.
    stats = {
        "name": "inference-v2-stats",
        "match": {"path": "/v2/models/stats"},
        "direct_response": {"status": 404, "body": {"inline_string": "not routed\n"}},
    }
    return [stats] + [
        {
            "name": f"inference-v2-{i}",
            "match": {"safe_regex": {"regex": pattern}},
            "route": {
                "cluster": INFERENCE_HTTP_CLUSTER,
                "timeout": _ms(platform.inference_http.timeout_ms),
                "retry_policy": {"retry_on": "reset,connect-failure", "num_retries": 1},
                "rate_limits": _rate_limits(),
            },
            "request_headers_to_add": [_set_header(PLACEMENT_HEADER, platform.admission.placement)],
        }
        for i, pattern in enumerate(INFERENCE_DATA_PLANE_PATHS)
    ]


def build_resources(
    platform: PlatformConfig, wiring: EnvoyWiring, endpoints: Mapping[str, Sequence[str]]
) -> Resources:
    """All resources for one platform version and the current endpoints.

    Args:
        platform: The platform config.
        wiring: The control plane's settings the translation needs.
        endpoints: Resolved `ip:port` endpoints by EDS cluster name (`gateway`, `edge`); see
            libs/discovery.py. A cluster missing here has no endpoints.

    Raises:
        google.protobuf.json_format.ParseError: a resource does not fit Envoy's schema (a bug here).
    """
    clusters = [gateway_cluster(platform, wiring)]
    if platform.admission.placement == "edge":
        clusters.append(edge_cluster(platform, wiring))
    if platform.inference_http.enabled:
        clusters.append(inference_http_cluster(platform))
    if wiring.settings.tracing_otlp_address:
        clusters.append(_static_cluster(TRACING_CLUSTER, wiring.settings.tracing_otlp_address))
    return Resources(
        by_type={
            CLUSTER_TYPE: {c["name"]: _parse(cluster_pb2.Cluster, c) for c in clusters},
            ENDPOINT_TYPE: endpoint_resources(platform, endpoints),
            LISTENER_TYPE: {LISTENER_NAME: _parse(listener_pb2.Listener, public_listener(platform, wiring))},
            ROUTE_TYPE: {ROUTE_NAME: _parse(route_pb2.RouteConfiguration, public_routes(platform))},
            SECRET_TYPE: secret_resources(wiring),
        }
    )


def with_endpoints(
    resources: Resources, platform: PlatformConfig, endpoints: Mapping[str, Sequence[str]]
) -> Resources:
    """`resources` with new EDS resources and every other type's messages as they were."""
    return Resources(by_type={**resources.by_type, ENDPOINT_TYPE: endpoint_resources(platform, endpoints)})
