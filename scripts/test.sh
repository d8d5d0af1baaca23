#!/usr/bin/env bash
# The test command: set up the environment, then run the whole CPU suite (benchmarks run once, untimed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/system_deps.sh"   # the C++ runner's build tools (tests/test_native.py builds it)
venv="$("$root/scripts/bootstrap.sh")"
cd "$root"
exec "$venv/bin/python" -m pytest tests bench --benchmark-disable -q "$@"
