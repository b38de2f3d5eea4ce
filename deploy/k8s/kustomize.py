"""Renders InferGrid's Kubernetes manifests with kustomize, built once from its Go module and cached.

    python -m deploy.k8s.kustomize [--overlay prod|dev] [--service NAME]

prints the overlay's objects (all of them, or only those of one service) as YAML, ready for
`kubectl apply -f -`. `bazel run //services/<name>:manifests` runs this with `--service <name>`.

kustomize is `go install`ed from `sigs.k8s.io/kustomize/kustomize/v5` at a pinned version into
the shared cache (`$INFERGRID_CACHE_DIR/bin`, default `~/.cache/infergrid/bin`); Go's module and
build caches live under `<cache>/go`, as for the stack's Jaeger. The Go toolchain is the machine's
own when recent enough, otherwise the stack's pinned one (stack/golang.py).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

KUSTOMIZE_MODULE = "sigs.k8s.io/kustomize/kustomize/v5"
# v5.8.1 builds with Go 1.24 (v5.8.3 needs Go 1.27, newer than the stack's pinned toolchain).
KUSTOMIZE_VERSION = "v5.8.1"
MINIMUM_GO = (1, 24)
OVERLAYS = ("dev", "prod", "prod-cpu")
# The label every object of a service carries; `--service` keeps the objects that have it.
SERVICE_LABEL = "app.kubernetes.io/name"

K8S_DIR = Path(__file__).resolve().parent
_GO_CANDIDATES = ("go", "/usr/local/go/bin/go", "/usr/lib/go/bin/go")


class KustomizeError(RuntimeError):
    """kustomize could not be installed, or it failed to render."""


def cache_dir(environ: os._Environ[str] | dict[str, str] | None = None) -> Path:
    """The shared install cache (INFERGRID_CACHE_DIR, default ~/.cache/infergrid)."""
    env = os.environ if environ is None else environ
    return Path(env.get("INFERGRID_CACHE_DIR") or Path.home() / ".cache" / "infergrid").absolute()


def kustomize_path(cache: Path | None = None) -> Path:
    """Where the pinned kustomize binary lives in the cache."""
    return (cache or cache_dir()) / "bin" / f"kustomize-{KUSTOMIZE_VERSION}"


def _find_go(go_root: Path) -> Path:
    try:  # the stack's finder downloads its pinned toolchain when the machine has no recent Go
        from stack.golang import ensure_go
        from stack.progress import Progress
    except ImportError:  # under Bazel the stack package is not in the runfiles
        for candidate in _GO_CANDIDATES:
            found = shutil.which(candidate)
            if found:
                return Path(found)
        raise KustomizeError(f"no Go toolchain found to build kustomize {KUSTOMIZE_VERSION}") from None
    return ensure_go(go_root, MINIMUM_GO, Progress("kustomize"))


def ensure_kustomize(cache: Path | None = None) -> Path:
    """Returns the pinned kustomize binary, building it with `go install` the first time.

    Raises:
        KustomizeError: Go is missing or the build failed (the message has Go's output).
    """
    cache = cache or cache_dir()
    binary = kustomize_path(cache)
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    locks = cache / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with (locks / "kustomize.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test sessions build it once
        if binary.exists():
            return binary
        go_root = cache / "go"
        go = _find_go(go_root)
        gobin = cache / f"kustomize-{KUSTOMIZE_VERSION}-build"
        env = {
            **os.environ,
            "GOPATH": str(go_root / "path"),
            "GOMODCACHE": str(go_root / "mod"),
            "GOCACHE": str(go_root / "build"),
            "GOBIN": str(gobin),
            "GOTOOLCHAIN": "local",
            "GOFLAGS": "-mod=mod",
            "CGO_ENABLED": "0",
        }
        print(f"[kustomize] building {KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION} with {go}", file=sys.stderr)
        done = subprocess.run(
            [str(go), "install", "-trimpath", f"{KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if done.returncode != 0:
            raise KustomizeError(f"go install {KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION} failed:\n{done.stderr}")
        (gobin / "kustomize").replace(binary)
        shutil.rmtree(gobin, ignore_errors=True)
    return binary


def source_dir() -> Path:
    """The manifests folder: the workspace's under `bazel run`, else the one next to this file."""
    workspace = os.environ.get("BUILD_WORKSPACE_DIRECTORY")
    if workspace and (Path(workspace) / "deploy" / "k8s").is_dir():
        return Path(workspace) / "deploy" / "k8s"
    return K8S_DIR


def build(path: Path, kustomize: Path | None = None) -> str:
    """`kustomize build path`: the rendered multi-document YAML.

    Raises:
        KustomizeError: kustomize rejected the kustomization (the message has its error).
    """
    binary = kustomize or ensure_kustomize()
    # Runfiles trees are symlinks into the source tree: let kustomize follow them.
    done = subprocess.run(
        [str(binary), "build", "--load-restrictor", "LoadRestrictionsNone", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise KustomizeError(f"kustomize build {path} failed:\n{done.stderr}")
    return done.stdout


def overlay_dir(overlay: str, root: Path | None = None) -> Path:
    """The folder of an overlay (`dev`, `prod` or `prod-cpu`)."""
    if overlay not in OVERLAYS:
        raise KustomizeError(f"unknown overlay {overlay!r}; expected one of {', '.join(OVERLAYS)}")
    return (root or source_dir()) / "overlays" / overlay


def select_service(rendered: str, service: str) -> str:
    """Keeps the YAML documents whose metadata.labels[SERVICE_LABEL] is `service`."""
    import yaml  # PyYAML; imported here so `--help` works without the virtualenv

    kept = [
        doc
        for doc in yaml.safe_load_all(rendered)
        if doc and (doc.get("metadata", {}).get("labels") or {}).get(SERVICE_LABEL) == service
    ]
    if not kept:
        raise KustomizeError(f"no objects labelled {SERVICE_LABEL}={service} in the rendered overlay")
    return yaml.safe_dump_all(kept, sort_keys=False)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: prints an overlay's objects, optionally one service's only."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--overlay", default="prod", choices=OVERLAYS)
    parser.add_argument("--service", help="only the objects labelled app.kubernetes.io/name=SERVICE")
    parser.add_argument("--install-only", action="store_true", help="build kustomize, print its path")
    args = parser.parse_args(argv)
    try:
        if args.install_only:
            print(ensure_kustomize())
            return 0
        rendered = build(overlay_dir(args.overlay))
        sys.stdout.write(select_service(rendered, args.service) if args.service else rendered)
    except KustomizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
