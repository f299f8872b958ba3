#!/usr/bin/env bash
# Installs the Debian packages kvcache needs to build, test and benchmark, and only those that
# are missing (so it is quick and offline when everything is there). Debian bookworm; run as
# root (or with sudo available).
set -euo pipefail

#   bash scripts/deps.sh              the project's packages (below)
#   bash scripts/deps.sh PACKAGE...   those packages instead (scripts/fuzz.sh, scripts/test_arm.sh)
if (($# > 0)); then
  packages=("$@")
else
  packages=(cmake g++ make libeigen3-dev catch2 libbenchmark-dev)
fi

missing=()
for package in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
  if [[ "$status" != installed ]]; then
    missing+=("$package")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "deps: all present (${packages[*]})"
  exit 0
fi

echo "deps: installing ${missing[*]}"
sudo=()
if ((EUID != 0)); then
  command -v sudo >/dev/null || { echo "deps: not root and no sudo; install: ${missing[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
"${sudo[@]}" apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y --no-install-recommends "${packages[@]}"
