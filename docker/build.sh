#!/usr/bin/env bash
# Build the stack's two images with the classic builder (no BuildKit, no registry needed beyond the base):
#   docker/build.sh [TAG] [BASE_IMAGE]
#   TAG         the task image, default feddmmr:latest; the server image is tagged feddmmr-server:<same tag>
#   BASE_IMAGE  default: the Dockerfile's pinned Debian; offline, docker/base.sh makes a local one
# Copies the host's CA bundle into the build context so pip trusts intercepted registry TLS.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-feddmmr:latest}
base=${2:-}
case "${tag##*/}" in *:*) name=${tag%:*} version=${tag##*:} ;; *) name=$tag version=latest ;; esac
server="${name}-server:${version}"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt docker/extra-ca.crt
else
  : > docker/extra-ca.crt
fi
source=$(git describe --always --dirty 2>/dev/null || echo unknown)
args=(-f docker/Dockerfile ${base:+--build-arg "BASE_IMAGE=$base"})
build() {   # target image [extra args]
  local start=$SECONDS
  DOCKER_BUILDKIT=0 docker build -q "${args[@]}" --target "$1" -t "$2" "${@:3}" . 2>&1 >/dev/null \
    | { grep -v -e 'legacy builder is deprecated' -e 'BuildKit is currently disabled' -e 'environment-variable.' \
        -e '^$' >&2 || true; }
  echo "built $2 (target $1) in $((SECONDS - start)) s, $(docker image inspect -f '{{.Size}}' "$2" \
    | awk '{printf "%.2f GB", $1 / 1e9}')"
}
build server "$server"
build task "$tag" --build-arg "FEDDMMR_SOURCE=$source"
