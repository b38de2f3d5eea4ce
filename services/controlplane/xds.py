"""The xDS state-of-the-world protocol for one ADS stream, without gRPC: requests in, responses out.

Per type URL the stream remembers what it sent (version, nonce, resource names) and what Envoy
answered. A request that echoes the latest nonce is an ACK (version accepted) or, with
`error_detail`, a NACK (Envoy keeps its last good config; so do we: nothing is resent until the
next snapshot). A request carrying an older nonce is stale and ignored. Each type has its own version
in a snapshot: a new snapshot is pushed, clusters → endpoints → listeners → routes, for the subscribed
types whose version changed, so an endpoint change (EDS only) never resends clusters or listeners
(whose update would make Envoy warm or drain them).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any as protobuf_any

from services.controlplane.resources import CLUSTER_TYPE, LISTENER_TYPE, PUSH_ORDER, Resources

log = logging.getLogger(__name__)

# State-of-the-world types whose responses carry every resource, whatever names were asked for.
_WILDCARD_TYPES = frozenset({CLUSTER_TYPE, LISTENER_TYPE})
_nonces = itertools.count(1)


@dataclass(frozen=True)
class Snapshot:
    """A complete, versioned set of resources; a type missing from `type_versions` is at `version`."""

    version: str
    resources: Resources
    type_versions: Mapping[str, str] = field(default_factory=dict)

    def version_of(self, type_url: str) -> str:
        """The version of one type's resources (what Envoy ACKs for that type)."""
        return self.type_versions.get(type_url, self.version)


@dataclass
class TypeState:
    """What one stream sent and heard back for one type URL."""

    subscribed: bool = False
    names: frozenset[str] = frozenset()
    sent_version: str = ""
    sent_names: frozenset[str] = frozenset()
    nonce: str = ""
    acked_version: str = ""
    nacked_version: str = ""


@dataclass(frozen=True)
class AckEvent:
    """An ACK or NACK heard on a stream (reported to the server's status)."""

    node: str
    type_url: str
    version: str
    accepted: bool
    error: str = ""


@dataclass
class XdsStream:
    """The protocol state of one ADS stream."""

    snapshot: Snapshot
    on_ack: Callable[[AckEvent], None] = lambda event: None
    node: str = ""
    types: dict[str, TypeState] = field(default_factory=dict)

    def handle_request(
        self, request: discovery_pb2.DiscoveryRequest
    ) -> list[discovery_pb2.DiscoveryResponse]:
        """Processes one DiscoveryRequest; returns the responses to send (zero or one)."""
        if request.node.id:
            self.node = request.node.id
        type_url = request.type_url
        state = self.types.setdefault(type_url, TypeState())
        if request.response_nonce and request.response_nonce != state.nonce:
            return []  # stale: an answer to a response that has since been superseded
        if request.response_nonce:
            if request.HasField("error_detail"):
                state.nacked_version = state.sent_version
                log.error(
                    "Envoy %s rejected %s version %s (keeps %s): %s",
                    self.node,
                    _short(type_url),
                    state.sent_version,
                    request.version_info or "nothing",
                    request.error_detail.message,
                    extra={"type_url": type_url, "nacked_version": state.sent_version},
                )
                self.on_ack(
                    AckEvent(self.node, type_url, state.sent_version, False, request.error_detail.message)
                )
            elif request.version_info == state.sent_version and state.acked_version != state.sent_version:
                state.acked_version = state.sent_version
                log.info("Envoy %s accepted %s version %s", self.node, _short(type_url), state.sent_version)
                self.on_ack(AckEvent(self.node, type_url, state.sent_version, True))
        state.subscribed = True
        state.names = frozenset(request.resource_names)
        # Resend after a NACK only when the subscription changed; the same config would fail again.
        if state.sent_version == self.snapshot.version_of(type_url) and state.sent_names == state.names:
            return []
        if request.HasField("error_detail") and state.sent_names == state.names:
            return []
        return [self._response(type_url, state)]

    def handle_snapshot(self, snapshot: Snapshot) -> list[discovery_pb2.DiscoveryResponse]:
        """Adopts a new snapshot; returns the pushes for the subscribed types in dependency order."""
        self.snapshot = snapshot
        out = []
        for type_url in PUSH_ORDER:
            state = self.types.get(type_url)
            if state is not None and state.subscribed and state.sent_version != snapshot.version_of(type_url):
                out.append(self._response(type_url, state))
        return out

    def _response(self, type_url: str, state: TypeState) -> discovery_pb2.DiscoveryResponse:
        available = self.snapshot.resources.of(type_url)
        if type_url in _WILDCARD_TYPES or not state.names:
            chosen = list(available.values())
        else:
            chosen = [available[name] for name in sorted(state.names) if name in available]
        version = self.snapshot.version_of(type_url)
        state.sent_version = version
        state.sent_names = state.names
        state.nonce = str(next(_nonces))
        resources = [protobuf_any.pack(message) for message in chosen]
        return discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=state.nonce, resources=resources
        )


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]
