#!/usr/bin/env bash
# Creates ./.venv (Python 3.11) and installs the pinned CPU stack plus recsys_kd in editable mode.
# Idempotent: a second run only re-installs when tools/requirements-cpu.txt or setup.cfg changed.
# GPU machines: RECSYS_KD_REQUIREMENTS=tools/requirements-gpu.txt bash tools/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${RECSYS_KD_REQUIREMENTS:-tools/requirements-cpu.txt}
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "setup.sh: need Python >= 3.10 (3.11 recommended) on PATH" >&2; exit 2; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.recsys_kd-installed
want=$(cat "$requirements" setup.cfg tools/fbgemm-gpu-cpu-shim/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --disable-pip-version-check -q -r "$requirements"
  .venv/bin/python -m pip check
  echo "$want" > "$stamp"
fi
