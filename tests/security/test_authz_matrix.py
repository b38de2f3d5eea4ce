"""The authorization matrix through the real stack: Envoy, the control plane, the edge service, both gateways.

Every public route (gRPC `Predict` and `PredictBatch`, their HTTP/JSON transcodings) by {no key, unknown key,
revoked key, another tenant's key (a model that tenant may not use), forged `x-infergrid-*` identity
headers, valid} by {admission in the gateway, admission at the edge}, each with its expected status. The
placement is moved the way an operator does it: the platform file edited, then the gateways, the edge service
and the control plane restarted. Last, the Envoy → gateway hop over mutual TLS (as the cluster profile and
Kubernetes run it): with admission at the edge the matrix is served as expected, and the identity headers
Envoy sets are refused when they come over plaintext. The figures (requests tried, statuses by code) are
printed at the end.
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from infergrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from libs import mtls
from libs.apikeys import add_key, load_keys, write_keys
from stack.demo import DEMO_REQUEST_FEATURES
from stack.ports import find_free_ports
from stack.progress import Progress
from stack.services import controlplane, gateway, keys_file
from tests.e2e.whole_stack import Stack, whole_stack

__all__ = ["whole_stack"]

pytestmark = pytest.mark.integration

ROUTES = ("grpc Predict", "grpc PredictBatch", "http :predict", "http :predictBatch")
HTTP = {"OK": 200, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
# demo may use fraud only; acme every model. `forged` claims acme's identity in the headers Envoy sets.
FORGED = (
    ("x-infergrid-tenant", "acme"),
    ("x-infergrid-tier", "standard"),
    ("x-infergrid-model", "ranker"),
    ("x-infergrid-key-name", "e2e-acme"),
)
CASES = (
    "no key",
    "unknown key",
    "revoked key",
    "another tenant's model",
    "forged headers",
    "forged + key",
    "valid",
)

_TRIED: collections.Counter[str] = collections.Counter()
_CODES: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def figures() -> Iterator[None]:
    yield
    lines = [f"  {case:<56} {count:>3}" for case, count in sorted(_TRIED.items())]
    print("\n[authz matrix] requests by placement, route and case:\n" + "\n".join(lines))
    print(f"[authz matrix] total: {sum(_TRIED.values())} requests; statuses: {dict(_CODES)}")


ENTITIES = {"user_id": "u00001", "merchant_id": "m0001", "device_id": "d00001"}


def _row() -> dict[str, object]:
    return {
        "request_id": uuid.uuid4().hex,
        "entities": ENTITIES,
        "features": {name: {"double_value": value} for name, value in DEMO_REQUEST_FEATURES.items()},
    }


def _call(stack: Stack, route: str, model: str, headers: tuple[tuple[str, str], ...]) -> str:
    """One request on `route`; the status's name (gRPC's, or the HTTP status mapped back to it)."""
    row = _row()
    if route.startswith("http"):
        body = row if route == "http :predict" else {"rows": [row]}
        verb = "predict" if route == "http :predict" else "predictBatch"
        answer = stack.http(f"/v1/models/{model}:{verb}", json.dumps(body), dict(headers))
        names = {code: name for name, code in HTTP.items()}
        return names.get(answer.status, f"HTTP {answer.status}: {answer.body[:200]}")
    request = gateway_pb2.PredictRequest(model=model, request_id=str(row["request_id"]), entities=ENTITIES)
    for name, value in DEMO_REQUEST_FEATURES.items():
        request.features[name].double_value = value
    try:
        if route == "grpc Predict":
            stack.stub().Predict(request, metadata=headers, timeout=10)
        else:
            batch = gateway_pb2.PredictBatchRequest(model=model)
            batch.rows.add(
                request_id=request.request_id, entities=request.entities, features=request.features
            )
            stack.stub().PredictBatch(batch, metadata=headers, timeout=10)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def _revoke(stack: Stack, name: str) -> None:
    path = keys_file(stack.config)
    write_keys(path, [key for key in load_keys(path).values() if key.name != name])


def _everywhere(stack: Stack, headers: tuple[tuple[str, str], ...], status: str) -> bool:
    """`status` for eight calls in a row (every route, so every gateway replica answers some)."""
    return all(_call(stack, route, "fraud", headers) == status for route in ROUTES * 2)


def _move_admission(stack: Stack, placement: str) -> None:
    """As an operator moves it: the platform file edited, then every process that reads the placement restarted."""
    stack.write_platform(stack.platform_text().replace("placement: gateway", f"placement: {placement}"))
    for name in ("gateway", "gateway-2", "edge", "controlplane"):
        stack.components[name].stop()
        stack.components[name].start(Progress(name))


def _matrix(stack: Stack, placement: str, *, served: bool = True, label: str = "") -> None:
    """The matrix; with `served` False the gateway cannot verify the hop, so nothing may be answered OK."""
    label = label or placement
    demo = stack.keys["demo"]
    revoked = f"ig_revoked_{uuid.uuid4().hex}"
    add_key(keys_file(stack.config), "demo", f"revoked-{label}", revoked)
    key = (("x-api-key", revoked),)
    # Every replica (Envoy balances over two gateways, each watching the keys file) must have seen the change.
    if served:
        stack.wait_for(lambda: _everywhere(stack, key, "OK"), 30, "the new key admitted by every replica")
    _revoke(stack, f"revoked-{label}")
    stack.wait_for(lambda: _everywhere(stack, key, "UNAUTHENTICATED"), 30, "its revocation by every replica")

    cases: dict[str, tuple[str, tuple[tuple[str, str], ...], str]] = {
        "no key": ("fraud", (), "UNAUTHENTICATED"),
        "unknown key": ("fraud", (("x-api-key", f"ig_unknown_{uuid.uuid4().hex}"),), "UNAUTHENTICATED"),
        "revoked key": ("fraud", key, "UNAUTHENTICATED"),
        "another tenant's model": ("ranker", (("x-api-key", demo),), "PERMISSION_DENIED"),
        "forged headers": ("ranker", (*FORGED, ("x-infergrid-placement", placement)), "UNAUTHENTICATED"),
        "forged + key": (
            "ranker",
            (*FORGED, ("x-infergrid-placement", placement), ("x-api-key", demo)),
            "PERMISSION_DENIED",
        ),
        "valid": ("fraud", (("x-api-key", demo),), "OK"),
    }
    wrong = []
    for route in ROUTES:
        for case in CASES:
            model, headers, expected = cases[case]
            got = _call(stack, route, model, headers)
            # A check that timed out fails closed (503 / UNAVAILABLE: never an open model); on a loaded
            # machine that can happen once, so such a cell is asked again (counted) before it is judged.
            for _ in range(3):
                if got != "UNAVAILABLE" and not got.startswith("HTTP 503"):
                    break
                _CODES[f"{got.split(':')[0]} (asked again)"] += 1
                time.sleep(0.5)
                got = _call(stack, route, model, headers)
            if not served and got in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                expected = got if case != "valid" else "UNAUTHENTICATED"
            _TRIED[f"{label:<8} {route:<18} {case}"] += 1
            _CODES[got] += 1
            if got != expected:
                wrong.append(f"{label} {route} {case}: {got}, expected {expected}")
    assert not wrong, "\n".join(wrong)


def test_the_matrix_with_admission_in_the_gateway(whole_stack: Stack) -> None:
    _matrix(whole_stack, "gateway")


def test_admission_moved_to_the_edge_over_a_plaintext_hop_serves_nobody(whole_stack: Stack) -> None:
    """The local stack's Envoy-to-gateway hop is plaintext: with admission at the edge the gateways cannot tell
    Envoy's calls from anyone's, so every cell is refused (the valid key too), never an open model."""
    _move_admission(whole_stack, "edge")
    valid = (("x-api-key", whole_stack.keys["demo"]),)
    whole_stack.wait_for(
        lambda: _everywhere(whole_stack, valid, "UNAUTHENTICATED"), 60, "every process moved"
    )
    _matrix(whole_stack, "edge", served=False)


def _with_mesh(stack: Stack) -> dict[str, int]:
    """As the cluster profile runs it: the gateways serve the mesh certificates (libs.mtls; probes on a
    plaintext health port), the control plane sends Envoy its client certificate over SDS, admission at
    the edge. Returns each gateway's health port."""
    mesh = mtls.ensure_mesh_certificates(stack.config.state_dir / "mesh")
    stack.write_platform(stack.platform_text().replace("placement: gateway", "placement: edge"))
    tls = {
        "INFERGRID_GATEWAY_TLS_CA_FILE": str(mesh.ca_cert),
        "INFERGRID_GATEWAY_TLS_CERT_FILE": str(mesh.gateway_cert),
        "INFERGRID_GATEWAY_TLS_KEY_FILE": str(mesh.gateway_key),
    }
    taken = {p for c in stack.components.values() for p in c.ports.values()}
    health = dict(
        zip(("gateway", "gateway-2"), find_free_ports(stack.config.host, 2, exclude=taken), strict=True)
    )
    for name in ("gateway", "gateway-2", "controlplane"):
        old = stack.components[name]
        old.stop()  # the module's teardown stops the replacement (same name, same pid file)
        if name == "controlplane":
            new = controlplane(stack.config, env={"INFERGRID_CONTROLPLANE_MESH_DIR": str(mesh.directory)})
        else:
            new = gateway(
                stack.config, name=name, ports={**old.ports, "gateway_health": health[name]}, env=tls
            )
        stack.components[name] = new
        new.start(Progress(name))
    stack.components["edge"].stop()
    stack.components["edge"].start(Progress("edge"))
    return health


def test_admission_at_the_edge_over_envoys_mutual_tls_hop_is_served(whole_stack: Stack) -> None:
    """The positive cell: over the mesh hop a valid key is served through Envoy (the whole matrix, with the edge
    admitting), while the identity headers Envoy would set, sent to a gateway over plaintext, are refused."""
    health = _with_mesh(whole_stack)
    valid = (("x-api-key", whole_stack.keys["demo"]),)
    whole_stack.wait_for(lambda: _everywhere(whole_stack, valid, "OK"), 60, "the mesh hop serving")
    _matrix(whole_stack, "edge", label="edge+mTLS")
    # What Envoy adds after the edge admitted demo's key for fraud, sent straight to each gateway.
    identity = (
        ("x-infergrid-tenant", "demo"),
        ("x-infergrid-tier", "standard"),
        ("x-infergrid-model", "fraud"),
        ("x-infergrid-key-name", "e2e-demo"),
        ("x-infergrid-placement", "edge"),
        *valid,
    )
    request = gateway_pb2.PredictRequest(model="fraud", request_id=uuid.uuid4().hex, entities=ENTITIES)
    wrong = []
    for name in ("gateway", "gateway-2"):
        for which, port, refused in (
            ("mesh port", whole_stack.components[name].port, "UNAVAILABLE"),  # no plaintext handshake
            ("health port", health[name], "UNAUTHENTICATED"),  # it serves health only
        ):
            with grpc.insecure_channel(f"{whole_stack.config.host}:{port}") as channel:
                try:
                    gateway_pb2_grpc.PredictionServiceStub(channel).Predict(
                        request, metadata=identity, timeout=10
                    )
                    got = "OK"
                except grpc.RpcError as exc:
                    got = exc.code().name
            _TRIED[f"plaintext to the {name} {which} with Envoy's identity headers + key"] += 1
            _CODES[got] += 1
            if got != refused:
                wrong.append(f"plaintext to the {name} {which}: {got}, expected {refused}")
    assert not wrong, "\n".join(wrong)
