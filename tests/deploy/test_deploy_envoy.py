"""The Envoy Deployment's bootstrap and command line pass the real Envoy's own validation."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.deploy.k8s_objects import Rendered, container, mounts


def test_envoy_accepts_the_rendered_bootstrap_and_arguments(
    rendered: Rendered, envoy_binary: Path, tmp_path: Path
) -> None:
    envoy = rendered.get("Deployment", "envoy")
    bootstrap = rendered.get("ConfigMap", mounts(envoy)["/etc/envoy"]["configMap"]["name"])["data"][
        "envoy.yaml"
    ]
    config = tmp_path / "envoy.yaml"
    config.write_text(bootstrap)
    args = [
        a.replace("$(POD_NAME)", "envoy-0").replace("/etc/envoy/envoy.yaml", str(config))
        for a in container(envoy)["args"]
    ]
    done = subprocess.run(
        [str(envoy_binary), "--mode", "validate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "OK" in done.stdout + done.stderr


def test_envoy_drains_within_its_termination_grace(rendered: Rendered) -> None:
    envoy = rendered.get("Deployment", "envoy")
    args = container(envoy)["args"]
    drain = int(args[args.index("--drain-time-s") + 1])
    pre_stop = container(envoy)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert envoy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pre_stop + drain


def test_envoy_admin_is_loopback_and_only_ready_and_metrics_are_exposed(rendered: Rendered) -> None:
    envoy = rendered.get("Deployment", "envoy")
    bootstrap = yaml.safe_load(
        rendered.get("ConfigMap", mounts(envoy)["/etc/envoy"]["configMap"]["name"])["data"]["envoy.yaml"]
    )
    admin = bootstrap["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"
    (ops,) = [
        listener for listener in bootstrap["static_resources"]["listeners"] if listener["name"] == "ops"
    ]
    manager = ops["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = manager["route_config"]["virtual_hosts"]
    forwarded = {route["match"].get("path") for route in host["routes"] if "route" in route}
    assert forwarded == {"/ready", "/stats/prometheus"}
    assert host["routes"][-1] == {"match": {"prefix": "/"}, "direct_response": {"status": 404}}
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "admin"]
    target = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    assert target == {"address": "127.0.0.1", "port_value": admin["port_value"]}
    port = ops["address"]["socket_address"]["port_value"]
    ports = {p["name"]: p["containerPort"] for p in container(envoy)["ports"]}
    assert ports == {"https": 8443, "ops": port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container(envoy)[probe]["httpGet"] == {"path": "/ready", "port": "ops"}
    monitor = rendered.get("PodMonitor", "envoy")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "ops"
