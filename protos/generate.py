"""Generates Python code and an Envoy descriptor set from every .proto in protos/.

The one generation step for the whole tree: `make gen` writes into build/gen for
plain pytest and the services, and the Bazel genrule in protos/BUILD.bazel runs
this same script into its output directory. Import paths are the proto package
paths (`infergrid.gateway.v1.gateway_pb2`, `inference.grpc_service_pb2`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
ENVOY_EXTRA_PROTOS = ("google/rpc/status.proto",)


def _googleapis_include() -> str:
    """Returns the site-packages dir holding google/api/*.proto (googleapis-common-protos)."""
    import google.api

    for entry in google.api.__path__:
        candidate = Path(entry).parent.parent
        if (candidate / "google" / "api" / "annotations.proto").exists():
            return str(candidate)
    raise SystemExit("googleapis-common-protos with google/api/*.proto is not installed")


def _protobuf_include() -> str:
    """Returns the dir holding google/protobuf/*.proto shipped with grpcio-tools."""
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def all_protos(root: Path = PROTO_ROOT) -> list[str]:
    """Lists every .proto under root as a path relative to it, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))


def generate(out_dir: Path, protos: list[str] | None = None, root: Path = PROTO_ROOT) -> None:
    """Runs protoc over all protos, writing _pb2/_pb2_grpc/.pyi files and descriptors.pb."""
    from grpc_tools import protoc

    protos = protos or all_protos(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{root}", f"-I{_googleapis_include()}", f"-I{_protobuf_include()}"]
    code = [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main(["grpc_tools.protoc", *includes, *code, *protos]) != 0:
        raise SystemExit("protoc failed")
    # The descriptor set for Envoy also carries google/rpc/status.proto, which the
    # transcoder's convert_grpc_status needs; no Python is generated for it (the
    # googleapis-common-protos package already provides google.rpc).
    descriptor_args = [
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={out_dir / 'descriptors.pb'}",
        *protos,
        *ENVOY_EXTRA_PROTOS,
    ]
    if protoc.main(["grpc_tools.protoc", *includes, *descriptor_args]) != 0:
        raise SystemExit("protoc failed writing the descriptor set")
    # Packages need __init__.py for mypy and for tools that do not use namespace packages.
    for proto in protos:
        pkg = (out_dir / proto).parent
        while pkg != out_dir and pkg.is_relative_to(out_dir):
            (pkg / "__init__.py").touch()
            pkg = pkg.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--root", type=Path, default=PROTO_ROOT, help="proto root (-I)")
    parser.add_argument("protos", nargs="*", help="protos relative to --root (default: all)")
    ns = parser.parse_args(argv)
    root = ns.root.resolve()
    protos = [os.path.relpath(Path(p).resolve(), root) if Path(p).exists() else p for p in ns.protos]
    generate(ns.out.resolve(), protos or None, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
