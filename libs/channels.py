"""Outbound gRPC channels: one way to dial a dependency, with its retry policy and tracing."""

from __future__ import annotations

from typing import cast

import grpc

from libs.inproc import LocalChannel, is_local
from libs.resilience import DependencyPolicy, grpc_service_config
from libs.telemetry import Telemetry


def dial(
    target: str,
    service: str,
    policy: DependencyPolicy,
    *,
    telemetry: Telemetry | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
) -> grpc.aio.Channel:
    """Opens an insecure aio channel to `target` for `service` (a full gRPC service name); for an
    `inproc:<name>` target, a `libs.inproc.LocalChannel` to that server in this process.

    The channel carries the dependency's retry policy and retry budget as a gRPC
    service config (pass `timeout=` on each call: what is left of the inbound deadline), keepalives, and OpenTelemetry's client interceptors when
    tracing is on (they propagate `traceparent`).
    """
    if is_local(target):  # a server in this process (libs.inproc): no network, no gRPC channel
        return cast(grpc.aio.Channel, LocalChannel(target))
    options = [
        ("grpc.service_config", grpc_service_config(service, policy)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # A replica restarted on its address (a SIGKILL, a rolling update) is dialled again within a
        # second; gRPC's default backoff grows to two minutes, which kept traffic off a healthy replica.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    interceptors = telemetry.client_interceptors() if telemetry is not None else []
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors or None)
