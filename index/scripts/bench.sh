#!/usr/bin/env bash
# Benchmarks the index against hnswlib on the same vectors and prints one table.
# Usage: index/scripts/bench.sh [sizes, default 100000] [extra flags for the bench binary,
# e.g. --data uniform|clustered --efs 16,32,64 --queries 1000]
# Creates index/.venv-bench (ignored) with hnswlib and numpy; data goes to index/.bench-data.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes="${1:-100000}"
shift || true

if [ ! -x .venv-bench/bin/python ]; then
    python3 -m venv .venv-bench
    .venv-bench/bin/pip install --quiet hnswlib numpy
fi

cargo build --release -p mplug-index --example bench
bin="${CARGO_TARGET_DIR:-../target}/release/examples/bench"
"$bin" --sizes "$sizes" --work-dir .bench-data --python .venv-bench/bin/python "$@"
