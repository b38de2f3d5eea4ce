"""The control plane's gRPC server: Envoy's Aggregated Discovery Service over the platform config.

`ControlPlane` holds the current snapshot (built from the platform file) and the open ADS streams;
the `PlatformWatcher` rebuilds the snapshot when the file changes and every stream pushes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc, discovery_pb2
from prometheus_client import Counter, Gauge

from libs.platform import PlatformConfig, PlatformWatcher
from libs.server import GrpcService, Server, build_server
from libs.telemetry import Telemetry
from services.controlplane.config import ControlPlaneConfig, EnvoySettings
from services.controlplane.resources import EnvoyWiring, build_resources
from services.controlplane.tls import ensure_self_signed
from services.controlplane.xds import AckEvent, Snapshot, XdsStream

log = logging.getLogger(__name__)

SERVICE_NAME = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name

_STREAMS = Gauge("infergrid_xds_streams", "Open ADS streams (connected Envoys)")
_ANSWERS = Counter("infergrid_xds_answers_total", "ACKs and NACKs from Envoys", ["type", "result"])
_SNAPSHOTS = Counter("infergrid_xds_snapshots_total", "Snapshots built from the platform config", ["result"])
_NACKED = Gauge("infergrid_xds_last_answer_nack", "1 while the last answer for a type was a NACK", ["type"])


@dataclass
class TypeStatus:
    """The last ACKed and NACKed version of one type, over all Envoys."""

    acked_version: str = ""
    nacked_version: str = ""
    nack_error: str = ""


@dataclass
class ControlPlane:
    """The current snapshot and the streams it is pushed to."""

    settings: EnvoySettings
    snapshot: Snapshot
    status: dict[str, TypeStatus] = field(default_factory=dict)
    last_error: str = ""
    _queues: set[asyncio.Queue[object]] = field(default_factory=set)
    _counter: itertools.count[int] = field(default_factory=lambda: itertools.count(2))

    @classmethod
    def from_platform(cls, settings: EnvoySettings, platform: PlatformConfig) -> ControlPlane:
        """Builds the first snapshot (failing loudly: there is no last good one yet)."""
        resources = build_resources(platform, wiring(settings, platform))
        _SNAPSHOTS.labels("built").inc()
        return cls(settings=settings, snapshot=Snapshot(f"1-{platform.version}", resources))

    def apply(self, platform: PlatformConfig) -> bool:
        """Builds a snapshot for a new platform version and pushes it; keeps the old one on failure."""
        try:
            resources = build_resources(platform, wiring(self.settings, platform))
        except Exception as exc:  # a failed build must never take the served config away
            self.last_error = str(exc)
            _SNAPSHOTS.labels("failed").inc()
            log.error(
                "platform version %s not translated, keeping %s: %s",
                platform.version,
                self.snapshot.version,
                exc,
            )
            return False
        self.snapshot = Snapshot(f"{next(self._counter)}-{platform.version}", resources)
        self.last_error = ""
        _SNAPSHOTS.labels("built").inc()
        log.info("snapshot %s built; pushing to %d Envoy stream(s)", self.snapshot.version, len(self._queues))
        for queue in self._queues:
            queue.put_nowait(self.snapshot)
        return True

    def record(self, event: AckEvent) -> None:
        """Keeps the last ACK/NACK per type for the status and metrics."""
        status = self.status.setdefault(event.type_url, TypeStatus())
        short = event.type_url.rsplit(".", 1)[-1]
        if event.accepted:
            status.acked_version = event.version
            _ANSWERS.labels(short, "ack").inc()
            _NACKED.labels(short).set(0)
        else:
            status.nacked_version, status.nack_error = event.version, event.error
            _ANSWERS.labels(short, "nack").inc()
            _NACKED.labels(short).set(1)

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
        _STREAMS.inc()
        reader = asyncio.create_task(_read(), name="ads-reader")
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, Snapshot):
                    responses = state.handle_snapshot(item)
                else:
                    assert isinstance(item, discovery_pb2.DiscoveryRequest)
                    responses = state.handle_request(item)
                for response in responses:
                    yield response
        finally:
            self._queues.discard(queue)
            _STREAMS.dec()
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
    return EnvoyWiring(
        descriptor_set=str(settings.descriptor_set.resolve()),
        edge_address=settings.edge_address,
        edge_timeout_ms=settings.edge_timeout_ms,
        listener_port=settings.listener_port,
        access_log=settings.access_log,
        tracing_otlp_address=settings.tracing_otlp_address,
        tls_cert_file=cert,
        tls_key_file=key,
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


async def create_server(
    config: ControlPlaneConfig, telemetry: Telemetry | None = None
) -> tuple[Server, ControlPlane]:
    """Builds the control plane server (bound, not started) and starts watching the platform file."""
    settings = config.envoy
    if not settings.descriptor_set.exists():
        raise FileNotFoundError(f"descriptor set {settings.descriptor_set} is missing: run `make gen`")
    control_plane_box: list[ControlPlane] = []

    def _on_change(platform: PlatformConfig) -> None:
        control_plane_box[0].apply(platform)

    watcher = PlatformWatcher(Path(settings.platform_file), _on_change, settings.platform_poll_seconds)
    control_plane = ControlPlane.from_platform(settings, watcher.current)
    control_plane_box.append(control_plane)
    log.info(
        "serving platform version %s as snapshot %s", watcher.current.version, control_plane.snapshot.version
    )
    servicer = AggregatedDiscoveryServicer(control_plane)
    server = build_server(
        config.server,
        [
            GrpcService(
                SERVICE_NAME,
                lambda s: ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, s),
            )
        ],
        telemetry=telemetry,
    )
    task = asyncio.create_task(watcher.run(), name="platform-watcher")

    async def _stop_watcher() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    server.on_stop.append(_stop_watcher)
    return server, control_plane
