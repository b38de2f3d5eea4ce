"""The Envoy Deployment's bootstrap and command line pass the real Envoy's own validation."""

from __future__ import annotations

import subprocess
from pathlib import Path

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
