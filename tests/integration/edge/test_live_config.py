"""Editing the platform file reconfigures the running Envoy over ADS; bad files and NACKed configs change nothing."""

from __future__ import annotations

import re
import ssl
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from stack.probes import http_get
from tests.integration.edge.conftest import EdgeStack, _spawn, _wait_serving

pytestmark = pytest.mark.integration


@pytest.fixture
def live(edge_stack: EdgeStack) -> Iterator[EdgeStack]:
    """The edge stack; its platform file is restored (and Envoy back on it) after the test."""
    yield edge_stack
    edge_stack.reset_platform()
    edge_stack.wait_for(lambda: _route_timeout(edge_stack) == "2s", what="the platform restored in Envoy")
    edge_stack.wait_for(lambda: not _listener_has_tls(edge_stack), what="the plain-text listener back")


def _dynamic(dump: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    for config in dump["configs"]:
        if config["@type"].endswith("." + kind):
            return list(config.get("dynamic_route_configs") or config.get("dynamic_listeners") or [])
    return []


def _route_timeout(stack: EdgeStack) -> str:
    routes = _dynamic(stack.config_dump(), "RoutesConfigDump")
    if not routes:
        return ""
    return str(routes[0]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["timeout"])


def _listener_has_tls(stack: EdgeStack) -> bool:
    for listener in _dynamic(stack.config_dump(), "ListenersConfigDump"):
        active = listener.get("active_state", {}).get("listener", {})
        if any("transport_socket" in chain for chain in active.get("filter_chains", [])):
            return True
    return False


def _stat(stack: EdgeStack, name: str) -> int:
    return int(stack.stats(name).get(name, "0") or 0)


def _cp_metric(stack: EdgeStack, pattern: str) -> float:
    port = stack.controlplane_metrics_port
    answer = http_get(f"http://127.0.0.1:{port}/metrics", timeout_s=5)
    assert answer is not None
    total = 0.0
    for line in answer.body.splitlines():
        if re.match(pattern, line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_route_timeout_edit_reaches_envoy_without_a_restart(live: EdgeStack) -> None:
    key = live.keys["acme"]
    envoy_pid = live.envoy.record().pid  # type: ignore[union-attr]
    assert live.predict("fraud", key, sleep_ms="600").model == "fraud"

    live.write_platform(live.platform_text(timeout_ms=300))
    live.wait_for(lambda: _route_timeout(live) == "0.300s", what="the new route timeout in Envoy")

    with pytest.raises(grpc.RpcError) as caught:
        live.predict("fraud", key, sleep_ms="600")
    assert caught.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert live.envoy.record().pid == envoy_pid  # type: ignore[union-attr]


def test_a_tier_limit_edit_reaches_the_rate_limiter(live: EdgeStack) -> None:
    key = live.keys["limited"]
    live.write_platform(live.platform_text(small_rps=1000, small_burst=1000))
    time.sleep(1.0)  # the edge service polls the file every 0.2 s

    codes = []
    for _ in range(30):
        try:
            live.predict("ranker", key)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
    assert codes == [grpc.StatusCode.OK] * 30


def test_an_invalid_platform_file_is_rejected_and_the_old_one_keeps_serving(live: EdgeStack) -> None:
    live.wait_applied()  # an earlier test's edit may still be on its way to Envoy
    before = live.stats("listener_manager.lds.version_text")
    live.write_platform(live.platform_text().replace("tier: big", "tier: gold"))
    live.wait_for(
        lambda: "unknown rate-limit tier 'gold'" in live.controlplane.log_text(),
        what="the rejection in the log",
    )

    assert live.predict("fraud", live.keys["acme"]).model == "fraud"
    assert live.stats("listener_manager.lds.version_text") == before


def test_a_config_envoy_nacks_is_logged_and_the_last_good_one_stays(live: EdgeStack) -> None:
    rejected = _stat(live, "listener_manager.lds.update_rejected")
    nacks = _cp_metric(live, r'infergrid_xds_answers_total\{.*result="nack".*\}')
    text = (
        live.platform_text()
        .replace("tls: {}", "")
        .replace(
            "max_request_bytes: 65536}",
            "max_request_bytes: 65536, tls: {enabled: true, cert_file: missing.crt, key_file: missing.key}}",
        )
    )
    live.write_platform(text)

    live.wait_for(
        lambda: _stat(live, "listener_manager.lds.update_rejected") > rejected,
        what="Envoy rejecting the listener",
    )
    live.wait_for(
        lambda: _cp_metric(live, r'infergrid_xds_answers_total\{.*result="nack".*\}') > nacks, what="NACK"
    )
    assert "rejected Listener version" in live.controlplane.log_text()
    assert not _listener_has_tls(live)
    assert live.predict("fraud", live.keys["acme"]).model == "fraud"


def test_tls_with_a_generated_self_signed_certificate(live: EdgeStack) -> None:
    text = live.platform_text().replace(
        "max_request_bytes: 65536}", "max_request_bytes: 65536, tls: {enabled: true}}"
    )
    live.write_platform(text)
    live.wait_for(lambda: _listener_has_tls(live), what="the TLS listener")
    context = ssl.create_default_context(cafile=str(live.folder / "tls" / "listener.crt"))
    request = urllib.request.Request(
        f"https://localhost:{live.public_port}/v1/models/fraud:predict",
        data=b"{}",
        headers={"content-type": "application/json", "x-api-key": live.keys["acme"]},
        method="POST",
    )

    def _https_ok() -> bool:
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    assert live.wait_for(_https_ok, what="an HTTPS answer")


def _gateway_hosts(stack: EdgeStack) -> set[str]:
    answer = http_get(f"{stack.envoy.admin_url}/clusters", timeout_s=5)
    assert answer is not None
    return {
        line.split("::")[1]
        for line in answer.body.splitlines()
        if line.startswith("gateway::") and "::cx_total::" in line
    }


def test_an_endpoint_edit_reaches_envoy_over_eds(live: EdgeStack) -> None:
    only_a = f'"127.0.0.1:{live.upstreams["replica-a"].port}"'
    live.write_platform(live.platform_text(endpoints=only_a))
    live.wait_for(lambda: len(_gateway_hosts(live)) == 1, what="one gateway endpoint in Envoy")

    served_by = {live.predict("fraud", live.keys["acme"]).model_version for _ in range(20)}

    assert served_by == {"replica-a"}
    live.reset_platform()
    live.wait_for(lambda: len(_gateway_hosts(live)) == 2, what="both endpoints back")


def test_envoy_keeps_serving_while_the_control_plane_restarts(live: EdgeStack) -> None:
    old = live.controlplane
    old.stop()
    assert live.predict("fraud", live.keys["acme"]).model == "fraud"  # last good config, no control plane

    live.controlplane = _spawn(
        "services.controlplane", live.controlplane_env, old.log.with_suffix(".2.log"), old.port
    )
    _wait_serving(live.controlplane)
    live.write_platform(live.platform_text(timeout_ms=1700))

    live.wait_for(
        lambda: _route_timeout(live) == "1.700s", timeout=30, what="Envoy back on the new control plane"
    )
