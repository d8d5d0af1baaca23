#!/usr/bin/env bash
# Debian packages the C++ runner (native/, qd_infer) builds with: CMake >= 3.20, a C++20 compiler, libpng, libjpeg.
# Installs only what is missing (needs root or sudo); a no-op on a machine that has them.
set -euo pipefail
pkgs=(cmake g++ make libpng-dev libjpeg-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "[system_deps] installing ${missing[*]}" >&2
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi
