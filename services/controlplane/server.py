"""The control plane's gRPC server: Envoy's Aggregated Discovery Service over the platform config.

`ControlPlane` holds the current snapshot (built from the platform file and the upstreams' current
endpoints) and the open ADS streams. The `PlatformWatcher` rebuilds the snapshot when the file changes
(every type gets a new version); an `EndpointWatcher` per EDS cluster (the gateway: the platform's
`gateway.endpoints`; the edge: `EDGE_ADDRESS`) re-resolves its discovery targets every
`ENDPOINTS_POLL_SECONDS` and, when the set changes, builds a snapshot in which only the EDS resources
have a new version: Envoy gets one ClusterLoadAssignment and keeps its clusters and listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc, discovery_pb2

from libs.discovery import EndpointWatcher, Target, parse_targets
from libs.mtls import MeshFiles
from libs.platform import PlatformConfig, PlatformWatcher
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.controlplane.config import ControlPlaneConfig, EnvoySettings
from services.controlplane.metrics import ANSWERS, ENDPOINT_CHANGES, ENDPOINTS, NACKED, SNAPSHOTS, STREAMS
from services.controlplane.resources import (
    EDGE_CLUSTER,
    ENDPOINT_TYPE,
    GATEWAY_CLUSTER,
    INFERENCE_HTTP_CLUSTER,
    PUSH_ORDER,
    EnvoyWiring,
    build_resources,
    with_endpoints,
)
from services.controlplane.tls import ensure_self_signed
from services.controlplane.xds import AckEvent, Snapshot, XdsStream

log = logging.getLogger(__name__)

SERVICE_NAME = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name


@dataclass
class TypeStatus:
    """The last ACKed and NACKed version of one type, over all Envoys."""

    acked_version: str = ""
    nacked_version: str = ""


@dataclass
class ControlPlane:
    """The current snapshot and the streams it is pushed to."""

    settings: EnvoySettings
    snapshot: Snapshot
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    # Resolved endpoints by EDS cluster name.
    endpoints: dict[str, tuple[str, ...]] = field(default_factory=dict)
    status: dict[str, TypeStatus] = field(default_factory=dict)
    last_error: str = ""
    _queues: set[asyncio.Queue[object]] = field(default_factory=set)
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(2))

    @classmethod
    def from_platform(
        cls,
        settings: EnvoySettings,
        platform: PlatformConfig,
        endpoints: dict[str, tuple[str, ...]] | None = None,
    ) -> ControlPlane:
        """Builds the first snapshot (failing loudly: there is no last good one yet)."""
        endpoints = dict(endpoints or {})
        resources = build_resources(platform, wiring(settings, platform), endpoints)
        SNAPSHOTS.labels("built").inc()
        for cluster, addresses in endpoints.items():
            ENDPOINTS.labels(cluster).set(len(addresses))
        return cls(
            settings=settings,
            snapshot=Snapshot(f"1-{platform.version}", resources),
            platform=platform,
            endpoints=endpoints,
        )

    def apply(self, platform: PlatformConfig) -> bool:
        """Builds a snapshot for a new platform version and pushes it; keeps the old one on failure."""
        try:
            resources = build_resources(platform, wiring(self.settings, platform), self.endpoints)
        except Exception as exc:  # a failed build must never take the served config away
            self.last_error = str(exc)
            SNAPSHOTS.labels("failed").inc()
            log.error(
                "platform version %s not translated, keeping %s: %s",
                platform.version,
                self.snapshot.version,
                exc,
            )
            return False
        self.platform = platform
        self.last_error = ""
        self._push(Snapshot(f"{next(self._counter)}-{platform.version}", resources))
        return True

    def set_endpoints(self, cluster: str, endpoints: tuple[str, ...], *, push: bool = True) -> bool:
        """Records a cluster's new endpoints and pushes a snapshot in which only EDS has a new version.

        Args:
            cluster: The EDS cluster (`gateway`, `edge`).
            endpoints: Its resolved endpoints, sorted.
            push: False while a platform change is being applied (its snapshot carries them).

        Returns:
            True when the set changed.
        """
        before = self.endpoints.get(cluster, ())
        if endpoints == before and cluster in self.endpoints:
            return False
        self.endpoints[cluster] = endpoints
        ENDPOINTS.labels(cluster).set(len(endpoints))
        ENDPOINT_CHANGES.labels(cluster).inc()
        added, removed = sorted(set(endpoints) - set(before)), sorted(set(before) - set(endpoints))
        if not push:
            log.info(
                "cluster %s endpoints: %s (added %s, removed %s)", cluster, list(endpoints), added, removed
            )
            return True
        version = f"{next(self._counter)}-{self.platform.version}"
        resources = with_endpoints(self.snapshot.resources, self.platform, self.endpoints)
        type_versions = {t: self.snapshot.version_of(t) for t in PUSH_ORDER if t != ENDPOINT_TYPE}
        log.info(
            "cluster %s endpoints: %s (added %s, removed %s); pushing EDS version %s",
            cluster,
            list(endpoints),
            added,
            removed,
            version,
            extra={"cluster": cluster, "endpoints": list(endpoints), "version": version},
        )
        self._push(Snapshot(version, resources, type_versions))
        return True

    def _push(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        SNAPSHOTS.labels("built").inc()
        log.info("snapshot %s built; pushing to %d Envoy stream(s)", snapshot.version, len(self._queues))
        for queue in self._queues:
            queue.put_nowait(snapshot)

    def record(self, event: AckEvent) -> None:
        """Keeps the last ACK/NACK per type for the status and metrics."""
        status = self.status.setdefault(event.type_url, TypeStatus())
        short = event.type_url.rsplit(".", 1)[-1]
        if event.accepted:
            status.acked_version = event.version
        else:
            status.nacked_version = event.version
        ANSWERS.labels(short, "ack" if event.accepted else "nack").inc()
        NACKED.labels(short).set(0 if event.accepted else 1)

    async def stream(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        """Runs one ADS stream: answers requests and pushes new snapshots until the client leaves."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        state = XdsStream(self.snapshot, on_ack=self.record)
        done = object()

        async def _read() -> None:
            try:
                async for request in requests:
                    queue.put_nowait(request)
            finally:
                queue.put_nowait(done)

        self._queues.add(queue)
        STREAMS.inc()
        reader = asyncio.create_task(_read(), name="ads-reader")
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, Snapshot):
                    responses = state.handle_snapshot(item)
                else:
                    assert isinstance(item, discovery_pb2.DiscoveryRequest)
                    responses = state.handle_request(item)
                for response in responses:
                    yield response
        finally:
            self._queues.discard(queue)
            STREAMS.dec()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            log.info("ADS stream of %s closed", state.node or "an unknown node")


def wiring(settings: EnvoySettings, platform: PlatformConfig) -> EnvoyWiring:
    """The translation's inputs beyond the platform config (TLS files generated when needed)."""
    cert, key = platform.listener.tls.cert_file, platform.listener.tls.key_file
    if platform.listener.tls.enabled and not (cert and key):
        cert_path, key_path = ensure_self_signed(settings.tls_dir)
        cert, key = str(cert_path.resolve()), str(key_path.resolve())
    elif cert and key:
        base = settings.platform_file.resolve().parent
        cert, key = str(base / cert), str(base / key)
    mesh: dict[str, bytes] = {}
    if settings.mesh_dir is not None:
        files = MeshFiles(settings.mesh_dir)
        mesh = {
            "mesh_ca_pem": files.ca_cert.read_bytes(),
            "mesh_cert_pem": files.envoy_cert.read_bytes(),
            "mesh_key_pem": files.envoy_key.read_bytes(),
        }
    return EnvoyWiring(
        replace(settings, descriptor_set=settings.descriptor_set.resolve()),
        tls_cert_file=cert,
        tls_key_file=key,
        **mesh,
    )


class AggregatedDiscoveryServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """ADS, state of the world (the incremental variant answers UNIMPLEMENTED)."""

    def __init__(self, control_plane: ControlPlane) -> None:
        self._control_plane = control_plane

    def StreamAggregatedResources(  # noqa: N802 - gRPC method names
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        return self._control_plane.stream(request_iterator)


def _targets(settings: EnvoySettings, platform: PlatformConfig) -> dict[str, tuple[Target, ...]]:
    """The discovery targets of the gateway's and the inference HTTP port's clusters (the latter: none unless
    the platform routes the REST API); a relative file: is next to the platform file."""
    base = settings.platform_file.resolve().parent
    http = platform.inference_http
    entries = {
        GATEWAY_CLUSTER: platform.gateway.endpoints,
        INFERENCE_HTTP_CLUSTER: http.endpoints if http.enabled else (),
    }
    return {name: tuple(t for e in es for t in parse_targets(e, base)) for name, es in entries.items()}


async def create_server(config: ControlPlaneConfig, telemetry: Telemetry | None = None) -> Server:
    """Builds the control plane server (bound, not started); see `create_control_plane`."""
    server, _ = await create_control_plane(config, telemetry)
    return server


async def create_control_plane(
    config: ControlPlaneConfig, telemetry: Telemetry | None = None
) -> tuple[Server, ControlPlane]:
    """Builds the control plane server (bound, not started); watches the platform file and the endpoints."""
    settings = config.envoy
    if not settings.descriptor_set.exists():
        raise FileNotFoundError(f"descriptor set {settings.descriptor_set} is missing: run `make gen`")
    control_plane_box: list[ControlPlane] = []
    # While a platform change re-resolves the gateway endpoints, its own snapshot carries them.
    applying = [False]

    def _endpoints_changed(cluster: str, endpoints: tuple[str, ...]) -> None:
        if control_plane_box:
            control_plane_box[0].set_endpoints(cluster, endpoints, push=not applying[0])

    async def _on_platform(platform: PlatformConfig) -> None:
        applying[0] = True
        try:
            for name, targets in _targets(settings, platform).items():
                watchers[name].set_targets(targets)
                await watchers[name].refresh()
        finally:
            applying[0] = False
        control_plane_box[0].apply(platform)

    watcher = PlatformWatcher(Path(settings.platform_file), _on_platform, settings.platform_poll_seconds)
    interval = settings.endpoints_poll_seconds
    watchers = {
        name: EndpointWatcher(targets, partial(_endpoints_changed, name), interval, name=name)
        for name, targets in _targets(settings, watcher.current).items()
    }
    if watcher.current.admission.placement == "edge":  # fixed for the process's life
        watchers[EDGE_CLUSTER] = EndpointWatcher(
            settings.edge_address, partial(_endpoints_changed, EDGE_CLUSTER), interval, name=EDGE_CLUSTER
        )
    endpoints: dict[str, tuple[str, ...]] = {}
    for endpoint_watcher in watchers.values():
        await endpoint_watcher.refresh()
        if endpoint_watcher.targets or endpoint_watcher.name != INFERENCE_HTTP_CLUSTER:
            endpoints[endpoint_watcher.name] = endpoint_watcher.current or ()
    control_plane = ControlPlane.from_platform(settings, watcher.current, endpoints)
    control_plane_box.append(control_plane)
    log.info(
        "serving platform version %s as snapshot %s", watcher.current.version, control_plane.snapshot.version
    )
    servicer = AggregatedDiscoveryServicer(control_plane)
    server = build_server(
        config.server,
        [
            GrpcService.of(
                SERVICE_NAME, ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server, servicer
            )
        ],
        telemetry=telemetry,
    )
    server.run_in_background(watcher.run(), name="platform-watcher")
    for w in watchers.values():
        server.run_in_background(w.run(), name=f"endpoints-{w.name}")
    return server, control_plane
