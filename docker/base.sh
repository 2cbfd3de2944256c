#!/usr/bin/env bash
# A Debian bookworm base image made without a registry: debootstrap from the Debian mirror, then
# docker import. Usage (as root): docker/base.sh [IMAGE]   (default feddmmr-base:bookworm)
# Skips the work when IMAGE exists; the image is also tagged with the Debian point release it holds.
set -euo pipefail
image=${1:-feddmmr-base:bookworm}
if docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image exists ($(docker image inspect -f '{{index .Config.Labels "org.debian.version"}}' "$image"))"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "docker/base.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }
root=$(mktemp -d /var/tmp/feddmmr-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
start=$SECONDS
debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
version=$(cat "$root/etc/debian_version")
tar -C "$root" -c . | docker import --change "LABEL org.debian.version=$version" --change 'CMD ["bash"]' - "$image" >/dev/null
docker tag "$image" "${image%:*}:bookworm-$version"
echo "built $image (Debian $version) in $((SECONDS - start)) s"
