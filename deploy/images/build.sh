#!/usr/bin/env bash
# Builds the container image of one InferGrid service from what Bazel builds for it.
#
#   deploy/images/build.sh gateway            # docker (or CONTAINER_TOOL=podman / buildah bud)
#   deploy/images/build.sh inference-gpu --push
#
# 1. `bazel build //services/<service>:image_tar` (offline): the :server launcher + runfiles tarball;
# 2. a build context with that tarball, requirements.lock (and requirements-gpu.txt, the descriptor set
#    where the image needs them);
# 3. `<tool> build -f` the image's Containerfile, tagged with the name and tag that
#    deploy/k8s/components/images/kustomization.yaml gives the image (the one place for them).
set -euo pipefail
cd "$(dirname "$0")/../.."
image=${1:?usage: deploy/images/build.sh IMAGE [--push]  (IMAGE: a folder of deploy/images)}
push=${2:-}
tool=${CONTAINER_TOOL:-docker}
# An image with a recipe of its own (envoy, controlplane, inference-gpu) uses it; the other Python
# services share deploy/images/service/Containerfile, parameterised by SERVICE.
containerfile="deploy/images/$image/Containerfile"
build_args=()
if [ ! -f "$containerfile" ]; then
  [ -f "services/$image/__main__.py" ] || { echo "no deploy/images/$image/Containerfile and no service $image" >&2; exit 2; }
  containerfile=deploy/images/service/Containerfile
  build_args=(--build-arg "SERVICE=$image")
fi
export PATH="$PWD/.venv/bin:$PATH"

# The name and tag kustomize uses: the `images:` entry whose name is infergrid/<image>.
ref=$(python3 - "$image" <<'PY'
import sys, yaml
images = yaml.safe_load(open("deploy/k8s/components/images/kustomization.yaml"))["images"]
entry = next(i for i in images if i["name"] == f"infergrid/{sys.argv[1]}")
print(f"{entry['newName']}:{entry['newTag']}")
PY
)

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
service=${image%-gpu}
if [ "$image" != envoy ]; then
  bazel build "//services/$service:image_tar"
  cp "bazel-bin/services/$service/$service.tar.gz" "$context/service.tar.gz"
  cp requirements.lock "$context/"
fi
[ "$image" = inference-gpu ] && cp requirements-gpu.txt "$context/"
if [ "$image" = envoy ] || [ "$image" = controlplane ]; then
  bazel build //protos:descriptor_set
  cp bazel-bin/protos/descriptors.pb "$context/"
fi

"$tool" build -f "$containerfile" "${build_args[@]}" -t "$ref" "$context"
echo "built $ref"
if [ "$push" = --push ]; then "$tool" push "$ref"; fi
