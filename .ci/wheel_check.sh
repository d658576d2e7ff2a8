#!/usr/bin/env bash
# Build mptk as a wheel, install it (not editable) into a fresh venv and train from a folder
# outside the repository: the config tree and the bundled recipes must come from the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }  # pip's notes on absent mirrors
quiet "$PY" -m pip wheel -q --no-deps -w "$work/wheel" .
rm -rf build
"$PY" -m venv "$work/venv"
quiet "$work/venv/bin/pip" install -q torch==2.13.0
quiet "$work/venv/bin/pip" install -q "$work"/wheel/mptk-*.whl
mkdir "$work/elsewhere"
cd "$work/elsewhere"
if "$work/venv/bin/python" -c "import recipes" 2>/dev/null; then
  echo "wheel: a top-level 'recipes' module is installed" >&2; exit 1
fi
WANDB_MODE=offline "$work/venv/bin/mptk-train" train.steps=4 train.eval_interval=2 optim.warmup_steps=1 \
  hydra.run.dir=run
test -s run/metrics.jsonl
grep -q '"loss"' run/metrics.jsonl
echo "wheel: installed $(ls "$work"/wheel) and trained 4 steps outside the repository: $(wc -l < run/metrics.jsonl) metric lines"
