#!/usr/bin/env bash
# Model bench: candle vs PyTorch on the same random mPLUG-base weights, same run.
# Installs PyTorch into the ignored local venv ./bench-venv (never used by CI).
# Usage: scripts/bench-model.sh [ITERS]
set -euo pipefail
cd "$(dirname "$0")/.."
iters="${1:-3}"
venv=bench-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -c "import torch, safetensors, numpy" 2>/dev/null \
  || "$venv/bin/pip" install -q torch safetensors numpy
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "== candle (cargo bench) =="
cargo bench --bench model_bench -- --out "$out" --iters "$iters"
echo "== PyTorch on the same weights =="
"$venv/bin/python" benches/model_bench_torch.py "$out" "$iters"
