"""A service's deployable artifact (`bazel build //services/<name>:image_tar`) builds offline and runs."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from libs.testing import REPO_ROOT, free_port, stop_process, wait_serving
from services.gateway.server import SERVICE_NAME

pytestmark = pytest.mark.skipif(shutil.which("bazel") is None, reason="bazel is not installed (make setup)")


def _path_with_venv() -> str:
    # Bazel runs the python3 first on PATH (tools/bazel/README.md); keep make's PATH string as it is,
    # since another PATH string invalidates Bazel's action cache.
    venv_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    return path if path.split(os.pathsep)[0] == venv_bin else f"{venv_bin}{os.pathsep}{path}"


def test_gateway_artifact_builds_and_serves(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": _path_with_venv()}
    done = subprocess.run(
        ["bazel", "build", "//services/gateway:image_tar"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tarball = REPO_ROOT / "bazel-bin" / "services" / "gateway" / "gateway.tar.gz"
    with tarfile.open(tarball) as archive:
        members = archive.getmembers()
        assert all(m.isfile() or m.isdir() for m in members), "links in the artifact"
        names = {m.name.removeprefix("./") for m in members}
        runfiles = "app/services/gateway/server.runfiles/infergrid"
        for needed in (
            "app/services/gateway/server",
            f"{runfiles}/services/gateway/__main__.py",
            f"{runfiles}/libs/server.py",
            f"{runfiles}/protos/infergrid/gateway/v1/gateway_pb2.py",
        ):
            assert needed in names, f"{needed} missing from {tarball}"
        # Test helpers are a testonly target (//libs:testing): never in an image.
        assert f"{runfiles}/libs/testing.py" not in names
        archive.extractall(tmp_path, filter="data")

    # Run the launcher as the image does, from an unrelated directory, without PYTHONPATH.
    port = free_port()
    run_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [str(tmp_path / "app" / "services" / "gateway" / "server")],
        cwd=tmp_path,
        env={
            **run_env,
            "INFERGRID_GATEWAY_PORT": str(port),
            "INFERGRID_GATEWAY_METRICS_PORT": "0",
            "INFERGRID_GATEWAY_INFERENCE_LOG_ENABLED": "false",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        asyncio.run(wait_serving(port, SERVICE_NAME, proc, timeout=60))
    finally:
        stop_process(proc)
