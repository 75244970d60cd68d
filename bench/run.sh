#!/usr/bin/env bash
# Builds sign_bench and keyholdd (dev preset) and runs the signing benchmark.
# Every argument goes to sign_bench, e.g.:
#   bench/run.sh                      # 2 s per side and configuration
#   bench/run.sh --seconds 5          # longer, steadier figures
#   bench/run.sh --socket /run/keyhold/keyhold.sock   # against a running daemon
# The report (Markdown) goes to stdout, progress to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake --preset dev >/dev/null
cmake --build --preset dev --target sign_bench keyholdd
exec ./build/dev/bench/sign_bench "$@"
