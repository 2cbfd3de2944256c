#!/usr/bin/env bash
# Build the task image with the legacy builder. Usage: docker/build.sh [TAG] [BASE_IMAGE]
# Copies the host's CA bundle into the build context so pip trusts intercepted registry TLS.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-feddmmr:latest}
base=${2:-nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04}
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt docker/extra-ca.crt
else
  : > docker/extra-ca.crt
fi
DOCKER_BUILDKIT=0 docker build -f docker/Dockerfile --build-arg BASE_IMAGE="$base" -t "$tag" .
