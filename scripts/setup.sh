#!/usr/bin/env bash
# Idempotent environment set-up for rarefly: .venv with CPU torch, the package, and a PLUMED kernel.
# Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
STAMP=.venv/.rarefly-setup-stamp
want_dev=${1:-}
hash_inputs() { cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16; }
key="$(hash_inputs)${want_dev}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned to the CPU build: a bare 'torch' requirement would pull several GB of CUDA wheels.
"$VPY" -m pip install -q "torch==2.13.0" || "$VPY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
if [ "$want_dev" = "--dev" ]; then
  "$VPY" -m pip install -q -e ".[dev]"
else
  "$VPY" -m pip install -q -e .
fi
# The PLUMED kernel (bundled by the hillclimber wheel, no dependencies: they pull ~130 unrelated
# packages). Installed last: with --no-deps pip skips its conflict check, and no later install
# reports hillclimber's unused dependencies as missing.
"$VPY" -m pip install -q --no-deps "hillclimber==0.1.8"
echo "$key" > "$STAMP"
echo "rarefly: environment ready in .venv"
