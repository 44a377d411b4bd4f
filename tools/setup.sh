#!/usr/bin/env bash
# Creates ./.venv (Python 3.11) and installs the pinned stack plus recsys_kd in editable mode:
#   bash tools/setup.sh          the CPU stack (tools/requirements-cpu.txt)
#   bash tools/setup.sh --gpu    the CUDA stack (tools/requirements-gpu.txt), on a machine with an NVIDIA driver
# Idempotent: a second run only re-installs when the requirements or setup.cfg changed. Switching
# between CPU and GPU builds a fresh .venv: pip cannot switch in place, because `torch 2.13.0+cpu`
# satisfies `torch==2.13.0` (PEP 440 ignores local labels) and the CPU FBGEMM would stay.
# RECSYS_KD_REQUIREMENTS=FILE picks another requirements file (its flavour: gpu if its name says so).
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=cpu
[ "${1:-}" = "--gpu" ] && flavour=gpu
[ "${1:-}" = "--cpu" ] && flavour=cpu
requirements=${RECSYS_KD_REQUIREMENTS:-tools/requirements-$flavour.txt}
case "$requirements" in *gpu*) flavour=gpu ;; esac
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))'; then
      python=$candidate; break
    fi
  done
fi
[ -n "$python" ] || { echo "setup.sh: need Python >= 3.10 (3.11 recommended) on PATH" >&2; exit 2; }
# the flavour of an existing venv, from its torch build (not its stamp: a venv may have been changed by hand)
if [ -x .venv/bin/python ]; then
  installed=$(.venv/bin/python -c 'import torch; print("gpu" if torch.version.cuda else "cpu")' 2>/dev/null || echo none)
  if [ "$installed" != none ] && [ "$installed" != "$flavour" ]; then
    echo "setup.sh: .venv has the $installed stack, $flavour was asked for: building a fresh .venv"
    rm -rf .venv
  fi
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.recsys_kd-installed
want=$(cat "$requirements" setup.cfg tools/fbgemm-gpu-cpu-shim/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --disable-pip-version-check -q -r "$requirements"
  .venv/bin/python -m pip check
  if [ "$flavour" = gpu ]; then
    .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.version.cuda else "setup.sh: the GPU install got a CPU torch")'
  fi
  echo "$want" > "$stamp"
fi
