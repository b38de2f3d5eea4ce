"""The ADS state machine: versions, nonces, ACK, NACK, stale nonces, pushes in order; and over a real stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from libs.platform import parse_platform
from libs.server import ServerConfig
from services.controlplane.config import ControlPlaneConfig, EnvoySettings
from services.controlplane.resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    EnvoyWiring,
    build_resources,
)
from services.controlplane.server import ControlPlane, create_control_plane
from services.controlplane.xds import AckEvent, Snapshot, XdsStream

PLATFORM = 'gateway: {endpoints: ["127.0.0.1:50051"], timeout_ms: %d}\n'
WIRING = EnvoyWiring(EnvoySettings(descriptor_set=Path("/d.pb")))
ENDPOINTS = {"gateway": ("127.0.0.1:50051",), "edge": ("127.0.0.1:50060",)}


def _snapshot(version: str, timeout_ms: int = 1000) -> Snapshot:
    return Snapshot(version, build_resources(parse_platform(PLATFORM % timeout_ms), WIRING, ENDPOINTS))


def _request(
    type_url: str, version: str = "", nonce: str = "", names: tuple[str, ...] = (), error: str = ""
) -> discovery_pb2.DiscoveryRequest:
    request = discovery_pb2.DiscoveryRequest(
        type_url=type_url,
        version_info=version,
        response_nonce=nonce,
        resource_names=list(names),
        node=base_pb2.Node(id="envoy-1"),
    )
    if error:
        request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return request


def _stream() -> tuple[XdsStream, list[AckEvent]]:
    events: list[AckEvent] = []
    return XdsStream(_snapshot("v1"), on_ack=events.append), events


# Every type, each with the names Envoy subscribes to (clusters and listeners: all of them).
SUBSCRIPTIONS = (
    (CLUSTER_TYPE, ()),
    (ENDPOINT_TYPE, ("gateway", "edge")),
    (LISTENER_TYPE, ()),
    (ROUTE_TYPE, ("public",)),
)


def _ports(response: discovery_pb2.DiscoveryResponse) -> dict[str, list[int]]:
    """The ports of each ClusterLoadAssignment in an EDS response, by cluster."""
    out = {}
    for packed in response.resources:
        assignment = endpoint_pb2.ClusterLoadAssignment()
        packed.Unpack(assignment)
        out[assignment.cluster_name] = [
            e.endpoint.address.socket_address.port_value for e in assignment.endpoints[0].lb_endpoints
        ]
    return out


def test_first_request_gets_all_resources_with_a_version_and_a_nonce() -> None:
    stream, _ = _stream()

    (response,) = stream.handle_request(_request(CLUSTER_TYPE))

    assert response.version_info == "v1"
    assert response.nonce
    assert response.type_url == CLUSTER_TYPE
    assert len(response.resources) == 2  # gateway + edge: state of the world


def test_ack_is_recorded_and_not_answered() -> None:
    stream, events = _stream()
    (response,) = stream.handle_request(_request(CLUSTER_TYPE))

    assert stream.handle_request(_request(CLUSTER_TYPE, "v1", response.nonce)) == []
    assert events == [AckEvent("envoy-1", CLUSTER_TYPE, "v1", True)]
    assert stream.types[CLUSTER_TYPE].acked_version == "v1"


def test_nack_is_recorded_and_the_same_config_is_not_resent() -> None:
    stream, events = _stream()
    stream.handle_request(_request(CLUSTER_TYPE))
    stream.handle_snapshot(_snapshot("v2"))
    nonce = stream.types[CLUSTER_TYPE].nonce

    out = stream.handle_request(_request(CLUSTER_TYPE, "v1", nonce, error="bad cluster"))

    assert out == []
    assert events[-1] == AckEvent("envoy-1", CLUSTER_TYPE, "v2", False, "bad cluster")
    assert stream.types[CLUSTER_TYPE].nacked_version == "v2"
    # A later good snapshot is pushed.
    (push,) = stream.handle_snapshot(_snapshot("v3", timeout_ms=2000))
    assert push.version_info == "v3"


def test_stale_nonce_is_ignored() -> None:
    stream, events = _stream()
    (first,) = stream.handle_request(_request(CLUSTER_TYPE))
    stream.handle_snapshot(_snapshot("v2"))

    assert stream.handle_request(_request(CLUSTER_TYPE, "v1", first.nonce, error="late")) == []
    assert events == []


def test_nonces_are_fresh_per_response() -> None:
    stream, _ = _stream()
    (a,) = stream.handle_request(_request(CLUSTER_TYPE))
    (b,) = stream.handle_snapshot(_snapshot("v2"))

    assert a.nonce != b.nonce


def test_snapshot_pushes_subscribed_types_clusters_endpoints_listeners_routes() -> None:
    stream, _ = _stream()
    for type_url, names in (
        (ROUTE_TYPE, ("public",)),
        (LISTENER_TYPE, ()),
        (ENDPOINT_TYPE, ("gateway",)),
        (CLUSTER_TYPE, ()),
    ):
        stream.handle_request(_request(type_url, names=names))

    pushes = stream.handle_snapshot(_snapshot("v2", timeout_ms=3000))

    assert [p.type_url for p in pushes] == [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE]
    assert {p.version_info for p in pushes} == {"v2"}


def test_named_subscriptions_get_only_the_named_resources_and_changes_are_answered() -> None:
    stream, _ = _stream()

    (none,) = stream.handle_request(_request(ENDPOINT_TYPE, names=("nope",)))
    (some,) = stream.handle_request(_request(ENDPOINT_TYPE, "v1", none.nonce, names=("gateway",)))

    assert len(none.resources) == 0
    assert len(some.resources) == 1


@contextlib.asynccontextmanager
async def _ads(platform: Path, **envoy: Any) -> AsyncIterator[tuple[Any, Any, asyncio.Queue[Any]]]:
    """A control plane on a free port and one ADS stream to it: the control plane, the call, its requests."""
    descriptors = platform.with_name("d.pb")
    descriptors.write_bytes(b"")
    config = ControlPlaneConfig(
        server=ServerConfig(port=0, drain_seconds=0, grace_seconds=0),
        envoy=EnvoySettings(platform_file=platform, descriptor_set=descriptors, **envoy),
    )
    server, control_plane = await create_control_plane(config)
    await server.start()
    requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

    async def _requests():  # type: ignore[no-untyped-def]
        while (item := await requests.get()) is not None:
            yield item

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(_requests())
            yield control_plane, call, requests
            await requests.put(None)
    finally:
        await server.stop(0, 0)


async def test_ads_over_a_real_stream_pushes_an_edited_platform_file(tmp_path: Path) -> None:
    platform = tmp_path / "platform.yaml"
    platform.write_text(PLATFORM % 1000)
    async with _ads(platform, platform_poll_seconds=0.05) as (control_plane, call, requests):
        await requests.put(_request(ROUTE_TYPE, names=("public",)))
        first = await asyncio.wait_for(call.read(), 5)
        await requests.put(_request(ROUTE_TYPE, first.version_info, first.nonce, names=("public",)))
        platform.write_text(PLATFORM % 2500)
        pushed = await asyncio.wait_for(call.read(), 5)
        await requests.put(_request(ROUTE_TYPE, pushed.version_info, pushed.nonce, names=("public",)))
        await asyncio.sleep(0.2)

    assert first.version_info.startswith("1-")
    assert pushed.version_info.startswith("2-")
    assert control_plane.status[ROUTE_TYPE].acked_version == pushed.version_info


def test_an_untranslatable_platform_keeps_the_last_snapshot(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    settings = EnvoySettings(
        platform_file=tmp_path / "p.yaml",
        descriptor_set=tmp_path / "d.pb",
        tls_dir=tmp_path / "a-file" / "tls",
    )
    control_plane = ControlPlane.from_platform(settings, parse_platform(PLATFORM % 1000))
    before = control_plane.snapshot

    # TLS without certificate files needs a generated one, which cannot be written under a file.
    bad = parse_platform(PLATFORM % 1000 + "listener: {tls: {enabled: true}}\n")
    assert control_plane.apply(bad) is False
    assert control_plane.snapshot is before
    assert control_plane.last_error


def test_an_endpoint_change_gives_only_eds_a_new_version(tmp_path: Path) -> None:
    settings = EnvoySettings(platform_file=tmp_path / "p.yaml", descriptor_set=tmp_path / "d.pb")
    control_plane = ControlPlane.from_platform(settings, parse_platform(PLATFORM % 1000), dict(ENDPOINTS))
    stream, _ = _stream()
    stream.snapshot = control_plane.snapshot
    for type_url, names in SUBSCRIPTIONS:
        (response,) = stream.handle_request(_request(type_url, names=names))
        stream.handle_request(_request(type_url, response.version_info, response.nonce, names=names))

    assert control_plane.set_endpoints("gateway", ENDPOINTS["gateway"]) is False  # unchanged
    assert control_plane.set_endpoints("gateway", ("127.0.0.1:50051", "127.0.0.1:50052")) is True
    (push,) = stream.handle_snapshot(control_plane.snapshot)

    assert push.type_url == ENDPOINT_TYPE and push.version_info == control_plane.snapshot.version
    assert _ports(push) == {"gateway": [50051, 50052], "edge": [50060]}
    # A platform edit still moves every type.
    control_plane.apply(parse_platform(PLATFORM % 1500))
    pushes = stream.handle_snapshot(control_plane.snapshot)
    assert [p.type_url for p in pushes] == [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE]


async def test_an_edited_endpoint_file_pushes_one_cluster_load_assignment_and_nothing_else(
    tmp_path: Path,
) -> None:
    endpoints = tmp_path / "gateway-endpoints.json"
    endpoints.write_text(json.dumps({"endpoints": ["127.0.0.1:50051"]}))
    platform = tmp_path / "platform.yaml"
    platform.write_text('gateway: {endpoints: ["file:gateway-endpoints.json"]}\n')
    ads = _ads(platform, edge_address="localhost:50060", endpoints_poll_seconds=0.1)
    async with ads as (control_plane, call, requests):
        first = {}
        for type_url, names in SUBSCRIPTIONS:
            await requests.put(_request(type_url, names=names))
            response = await asyncio.wait_for(call.read(), 5)
            first[response.type_url] = response
            await requests.put(_request(type_url, response.version_info, response.nonce, names=names))
        tmp = endpoints.with_suffix(".tmp")
        tmp.write_text(json.dumps({"endpoints": ["127.0.0.1:50052", "127.0.0.1:50051"]}))
        tmp.replace(endpoints)
        pushed = await asyncio.wait_for(call.read(), 2)
        names = ("gateway", "edge")
        await requests.put(_request(ENDPOINT_TYPE, pushed.version_info, pushed.nonce, names=names))
        with pytest.raises(TimeoutError):  # nothing else comes
            await asyncio.wait_for(call.read(), 0.5)

    assert _ports(first[ENDPOINT_TYPE]) == {"gateway": [50051], "edge": [50060]}
    assert pushed.type_url == ENDPOINT_TYPE
    assert _ports(pushed) == {"gateway": [50051, 50052], "edge": [50060]}
    assert control_plane.status[ENDPOINT_TYPE].acked_version == pushed.version_info
    assert control_plane.endpoints == {
        "gateway": ("127.0.0.1:50051", "127.0.0.1:50052"),
        "edge": ("127.0.0.1:50060",),
    }


def test_config_defaults() -> None:
    config = ControlPlaneConfig()
    assert config.server.port == 18000
    assert config.envoy.edge_address == "127.0.0.1:50060"
    assert config.envoy.tracing_otlp_address == ""
    assert config.envoy.tracing_sample_percent == 100.0


@pytest.mark.parametrize("percent", [-1.0, 100.5])
def test_a_sample_share_outside_0_to_100_is_refused(percent: float) -> None:
    with pytest.raises(ValueError, match="tracing_sample_percent"):
        EnvoySettings(tracing_sample_percent=percent)
