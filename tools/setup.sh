#!/usr/bin/env bash
# Idempotent developer/CI setup: system packages, the pinned virtualenv, generated code.
# Safe to run again; each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

log() { printf '[setup] %s\n' "$*"; }

apt_install() {
  # apt_install CMD PACKAGE...: installs PACKAGEs when CMD is missing.
  local cmd=$1; shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "[setup] '$cmd' is missing; run: sudo apt-get install -y $*" >&2; exit 1
  fi
  if [ ! -f /var/lib/apt/lists/.infergrid-updated ] || [ -z "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v lock)" ]; then
    log "apt-get update"; apt-get update -qq && touch /var/lib/apt/lists/.infergrid-updated
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# 1. System packages. Bazel: Debian's bazel-bootstrap (4.2.3, WORKSPACE mode, offline).
apt_install bazel bazel-bootstrap
# Prometheus for the local stack (the stack also installs it on `make up`), Chromium and its driver for
# the operator console's browser test (tests/integration/test_console.py).
apt_install prometheus prometheus
apt_install chromium chromium
apt_install chromedriver chromium-driver

# 2. Virtualenv with the locked dependencies (reinstalled only when the lock changes).
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.lock | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing requirements.lock into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r requirements.lock
  # xds-protos ships an old copy of opentelemetry/proto/* that overwrites opentelemetry-proto's
  # (breaking the OTLP exporter); put the locked opentelemetry-proto back on top.
  "$VENV/bin/pip" install -q --no-deps --force-reinstall "$(grep -i '^opentelemetry-proto==' requirements.lock)"
  "$VENV/bin/python" -c 'import opentelemetry.exporter.otlp.proto.grpc.trace_exporter, envoy.service.discovery.v3.ads_pb2_grpc' \
    || { echo "[setup] the virtualenv cannot import the OTLP exporter and the xDS stubs together" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# 3. Generated protobuf/gRPC code and the Envoy descriptor set.
"$VENV/bin/python" protos/generate.py --out build/gen
log "ready: $VENV"
