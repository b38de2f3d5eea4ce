"""Jaeger v2: built once from its Go module into the cache, run with in-memory storage on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from stack.component import Component
from stack.errors import InstallError
from stack.golang import ensure_go
from stack.probes import http_get
from stack.progress import Progress

JAEGER_PACKAGE = "github.com/jaegertracing/jaeger/cmd/jaeger"
MINIMUM_GO = (1, 24)


class Jaeger(Component):
    """Jaeger all-in-one (OTLP gRPC/HTTP in, query HTTP API out); ready when GET /api/services answers.

    Traces are kept in memory: they do not survive a restart.
    """

    kind = "jaeger"
    port_names = ("jaeger_query", "jaeger_otlp_grpc", "jaeger_otlp_http", "jaeger_query_grpc")
    start_timeout_s = 60.0
    stop_timeout_s = 15.0

    @property
    def _build_module(self) -> Path:
        return self.config.deploy_dir / "jaeger" / "build"

    @property
    def version(self) -> str:
        """The Jaeger module version pinned in deploy/local/jaeger/build/go.mod (e.g. 1.76.0)."""
        text = (self._build_module / "go.mod").read_text()
        match = re.search(r"^\s*github\.com/jaegertracing/jaeger v(\S+)", text, re.MULTILINE)
        if match is None:
            raise InstallError(
                f"{self._build_module / 'go.mod'} does not require github.com/jaegertracing/jaeger"
            )
        return match.group(1)

    @property
    def binary(self) -> Path:
        """The built binary in the cache."""
        return self.config.cache_dir / "bin" / f"jaeger-{self.version}"

    def install(self, progress: Progress) -> None:
        """Builds the pinned Jaeger with Go (GOPATH, module and build caches under the stack cache)."""
        if self.binary.exists():
            return
        progress.step(1, 3, f"finding Go >= {MINIMUM_GO[0]}.{MINIMUM_GO[1]}")
        go_root = self.config.cache_dir / "go"
        go = ensure_go(go_root, MINIMUM_GO, progress)
        work = self.config.cache_dir / f"jaeger-{self.version}-build"
        work.mkdir(parents=True, exist_ok=True)
        for name in ("go.mod", "go.sum"):
            shutil.copy2(self._build_module / name, work / name)
        env = {
            **os.environ,
            "GOPATH": str(go_root / "path"),
            "GOMODCACHE": str(go_root / "mod"),
            "GOCACHE": str(go_root / "build"),
            "GOTOOLCHAIN": "local",
            "GOFLAGS": "-mod=mod",
            "CGO_ENABLED": "0",
        }
        progress.step(2, 3, f"downloading the Go modules of Jaeger {self.version} (about 300)")
        progress.run([str(go), "mod", "download"], log_path=self.install_log_path, env=env, cwd=work)
        progress.step(3, 3, f"building Jaeger {self.version} (a few minutes on 2 cores)")
        partial = self.binary.with_name(self.binary.name + ".partial")
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        progress.run(
            [str(go), "build", "-trimpath", "-o", str(partial), JAEGER_PACKAGE],
            log_path=self.install_log_path,
            env=env,
            cwd=work,
        )
        partial.replace(self.binary)

    def command(self) -> list[str]:
        """The binary with deploy/local/jaeger/config.yaml."""
        return [str(self.binary), "--config", f"file:{self.config.deploy_dir / 'jaeger' / 'config.yaml'}"]

    def environment(self) -> dict[str, str]:
        """The listen addresses that config.yaml reads."""
        return {
            "INFERGRID_JAEGER_HOST": self.host,
            **{f"INFERGRID_{name.upper()}_PORT": str(port) for name, port in self.ports.items()},
        }

    def ready(self) -> bool:
        """GET /api/services answers 200 with JSON."""
        answer = http_get(f"{self.query_url}/api/services", timeout_s=2)
        if answer is None or answer.status != 200:
            return False
        try:
            json.loads(answer.body)
        except ValueError:
            return False
        return True

    @property
    def query_url(self) -> str:
        """Base URL of the query HTTP API (`/api/services`, `/api/traces?service=...`)."""
        return f"http://{self.host}:{self.ports['jaeger_query']}"

    @property
    def otlp_grpc_endpoint(self) -> str:
        """For `OTLPSpanExporter(endpoint=..., insecure=True)` (gRPC)."""
        return f"{self.host}:{self.ports['jaeger_otlp_grpc']}"

    @property
    def otlp_http_endpoint(self) -> str:
        """Base URL for OTLP over HTTP (append /v1/traces)."""
        return f"http://{self.host}:{self.ports['jaeger_otlp_http']}"

    def endpoints(self) -> dict[str, str]:
        """OTLP and query addresses."""
        return {
            "otlp grpc": self.otlp_grpc_endpoint,
            "otlp http": self.otlp_http_endpoint,
            "query api": self.query_url,
        }
