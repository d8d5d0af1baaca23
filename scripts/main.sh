#!/usr/bin/env bash
# The main job on the embedded default: set up the environment, then train the tiny config on the synthetic
# scenes (CPU; the data and the tiny diffusion teacher are made once) and print per-domain mIoU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/bootstrap.sh")"
cd "$root"
exec "$venv/bin/python" -m train "$@"
