#!/usr/bin/env bash
# What the compose test needs from Debian, installed where missing (`make compose-test`, as root): the
# Docker engine, Compose, debootstrap (the offline base image) and Prometheus (its binary, imaged).
# Without root or apt it says what is missing and leaves it to the test, which skips without an engine.
set -euo pipefail
need=()
command -v dockerd >/dev/null || need+=(docker.io)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v prometheus >/dev/null || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "compose test: missing ${need[*]}; installing them needs root and apt" >&2
  exit 0
fi
echo "compose test: installing ${need[*]}" >&2
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
install || { apt-get update -q >/dev/null && install; } || echo "compose test: could not install ${need[*]}" >&2
