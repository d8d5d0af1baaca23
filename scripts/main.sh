#!/usr/bin/env bash
# The main job on the embedded default: set up the environment, then run the demo on the tiny config (CPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/bootstrap.sh")"
cd "$root"
exec "$venv/bin/python" -m qd_core.demo "$@"
