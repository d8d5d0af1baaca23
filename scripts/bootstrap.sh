#!/usr/bin/env bash
# Make (or reuse) the project's virtual environment with the pinned dependencies. Idempotent: a stamp holding
# the hash of requirements-ci.txt and pyproject.toml skips the install when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${QD_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.querydiff-stamp"
want="$(cat "$root/requirements-ci.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating $venv" >&2
  "$py" -m venv "$venv"
fi
pip_q() {  # pip, quiet, without the noise of unreachable local index folders; fails when pip fails
  local log; log="$(mktemp)"
  if ! "$venv/bin/python" -m pip install -q "$@" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing pinned dependencies into $venv" >&2
  pip_q --upgrade pip
  # torch first, on its own: 2.13.0 is the CPU build; asking for it alone keeps pip from choosing a CUDA one.
  pip_q "$(grep '^torch==' "$root/requirements-ci.txt")"
  pip_q -r "$root/requirements-ci.txt"
  pip_q --no-deps -e "$root"
  "$venv/bin/python" -c "import torch, triton, qd_core, kernels" >&2
  echo "$want" > "$stamp"
fi
echo "$venv"
