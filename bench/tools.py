"""Installs the load generators and the peers' virtualenvs, cached under ~/.cache/infergrid.

- Debian: h2load (nghttp2-client), wrk, libb64-0d (perf_analyzer's dependency) — apt-get via stack.apt;
- ghz from its Go module (`go install`, GOPATH/GOCACHE under ~/.cache/infergrid/go);
- one virtualenv per peer / tool under ~/.cache/infergrid/bench-venvs/<name>, rebuilt only when its
  package list changes (a stamp file holds the list).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from stack.apt import install_packages
from stack.progress import Progress

CACHE = Path(os.environ.get("INFERGRID_CACHE_DIR") or Path.home() / ".cache" / "infergrid")
VENVS = CACHE / "bench-venvs"
LOGS = CACHE / "logs"
GHZ_VERSION = "v0.120.0"
GO_CANDIDATES = ("go", "/usr/local/go/bin/go", "/usr/lib/go/bin/go")

# Each peer in its own environment: their pins conflict with ours (protobuf, numpy, tritonclient).
VENV_SPECS: dict[str, tuple[str, ...]] = {
    # Triton's perf_analyzer: the newest wheels need a newer glibc than Debian 12; 2.40.0 still ships bin/.
    "perf": ("tritonclient==2.40.0", "nvidia-cuda-runtime-cu12==12.9.79"),
    "pytriton": ("nvidia-pytriton==0.7.0", "onnxruntime==1.32.0", "redis==8.1.0"),
    "feast": ("feast[redis,cassandra]==0.67.0", "cassandra-driver==3.30.1"),
    "litserve": ("litserve==0.2.19", "onnxruntime==1.32.0", "redis==8.1.0"),
    "ray": ("ray[serve]==2.60.0", "onnxruntime==1.32.0", "numpy==2.4.6", "redis==8.1.0"),
    "bentoml": ("bentoml==1.4.40", "onnxruntime==1.32.0", "numpy==2.4.6", "redis==8.1.0"),
    "tools": ("py-spy==0.4.1",),
}

_progress = Progress("bench")


def say(message: str) -> None:
    _progress.say(message)


def ensure_debian(command: str, package: str) -> str:
    found = shutil.which(command)
    if found is None:
        install_packages([package], _progress, LOGS / "bench-apt.log")
        found = shutil.which(command)
    if found is None:
        raise RuntimeError(f"installed {package} but `{command}` is still missing")
    return found


def ensure_debian_lib(package: str, probe: str) -> None:
    if not Path(probe).exists():
        install_packages([package], _progress, LOGS / "bench-apt.log")


def _go() -> str:
    for candidate in GO_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise RuntimeError("no Go toolchain found (needed to build ghz); install Go or run `make up` once")


def ensure_ghz() -> str:
    """The ghz binary (`go install github.com/bojand/ghz/cmd/ghz@GHZ_VERSION` on first use)."""
    target = CACHE / "bin" / f"ghz-{GHZ_VERSION}"
    if target.exists():
        return str(target)
    gobin = CACHE / "go" / f"ghz-{GHZ_VERSION}-bin"
    env = {
        **os.environ,
        "GOPATH": str(CACHE / "go" / "path"),
        "GOCACHE": str(CACHE / "go" / "build"),
        "GOMODCACHE": str(CACHE / "go" / "mod"),
        "GOBIN": str(gobin),
        "GOFLAGS": "-modcacherw",
        "CGO_ENABLED": "0",
    }
    say(f"go install github.com/bojand/ghz/cmd/ghz@{GHZ_VERSION}")
    _progress.run([_go(), "install", f"github.com/bojand/ghz/cmd/ghz@{GHZ_VERSION}"],
                  log_path=LOGS / "bench-ghz.log", env=env)  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(gobin / "ghz", target)
    return str(target)


def base_python() -> str:
    """The interpreter the project's virtualenv was made from (peers get the same CPython)."""
    for name in ("python3", "python"):
        candidate = Path(sys.base_prefix) / "bin" / name
        if candidate.exists():
            return str(candidate)
    return sys.executable


def ensure_venv(name: str) -> Path:
    """The virtualenv `name` with VENV_SPECS[name] installed; returns its folder."""
    specs = VENV_SPECS[name]
    root = VENVS / name
    stamp = root / ".bench-stamp"
    want = hashlib.sha256("\n".join(specs).encode()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == want:
        return root
    say(f"virtualenv {root}: pip install {' '.join(specs)}")
    if not (root / "bin" / "python").exists():
        subprocess.run([base_python(), "-m", "venv", str(root)], check=True)
    _progress.run(
        [str(root / "bin" / "pip"), "install", "-q", *specs], log_path=LOGS / f"bench-venv-{name}.log"
    )
    stamp.write_text(want + "\n")
    return root


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: str
    env: dict[str, str]


def ensure_perf_analyzer() -> PerfAnalyzer:
    ensure_debian_lib("libb64-0d", "/usr/lib/x86_64-linux-gnu/libb64.so.0d")
    root = ensure_venv("perf")
    cudart = next((root / "lib").glob("python3*/site-packages/nvidia/cuda_runtime/lib"), None)
    if cudart is None:
        raise RuntimeError(f"libcudart.so.12 not found in {root}")
    ld = os.pathsep.join(p for p in (str(cudart), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    return PerfAnalyzer(str(root / "bin" / "perf_analyzer"), {**os.environ, "LD_LIBRARY_PATH": ld})


def version_of(command: list[str]) -> str:
    try:
        out = subprocess.run(command, check=False, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def pip_versions(venv: Path, names: tuple[str, ...]) -> dict[str, str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                         check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
    wanted = {n.lower() for n in names}
    result = {}
    for line in out.stdout.splitlines():
        name, _, version = line.partition("==")
        if name.lower() in wanted:
            result[name] = version
    return result
