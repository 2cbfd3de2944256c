#!/usr/bin/env bash
# Docker for the container tests: the engine, compose and debootstrap from Debian's packages, the daemon,
# a local Debian base image (docker/base.sh) and the stack's two images (docker/build.sh). Each part is
# skipped when it is already done, so a second run on the same machine reuses the daemon, the base image
# and the image layers (a code change rebuilds only the source layers).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "ci/docker: not root, cannot install ${need[*]}"; exit 1; }
  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  (setsid dockerd >/var/log/feddmmr-dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "ci/docker: dockerd did not start:"; tail -20 /var/log/feddmmr-dockerd.log; exit 1; }
fi
echo "ci/docker: engine $(docker version -f '{{.Server.Version}}') ready in $((SECONDS - start)) s"
docker/base.sh feddmmr-base:bookworm
docker/build.sh feddmmr:test feddmmr-base:bookworm
echo "ci/docker: done in $((SECONDS - start)) s"
