#!/usr/bin/env bash
# Set up mptk in .venv (a CPU torch where there is no NVIDIA GPU) and train the default recipe.
# Usage: bash scripts/quickstart.sh [hydra overrides...]     e.g. train.steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/pip install -q -e ".[dev]"            # CUDA torch from PyPI
else
  .venv/bin/pip install -q torch==2.13.0           # the CPU build
  .venv/bin/pip install -q -e ".[dev]"
fi
exec .venv/bin/mptk-train "$@"
