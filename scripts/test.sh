#!/bin/bash
# Installs what is missing, builds and runs every test. .ci/run calls this.
#   scripts/test.sh               dev build: unit + integration tests, fuzzer smoke run
#   scripts/test.sh asan-ubsan    the same tests under ASan+UBSan
#   scripts/test.sh tsan          the same tests under TSan
set -euo pipefail
cd "$(dirname "$0")/.."

preset="${1:-dev}"
fuzz_seconds="${KH_FUZZ_SECONDS:-60}"

scripts/install-deps.sh --test
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset"

status=0
ctest --preset "$preset" --timeout 600 || status=1

if [ "$preset" = "dev" ]; then
  echo "== fuzz: build and run each fuzzer for ${fuzz_seconds}s"
  cmake --preset fuzz >/dev/null
  cmake --build --preset fuzz --target fuzzers
  for f in build/fuzz/fuzz/*_fuzzer; do
    name="$(basename "$f")"
    corpus="fuzz/corpus/$name"
    work="$(mktemp -d)"
    if "$f" -max_total_time="$fuzz_seconds" -print_final_stats=1 "$work" "$corpus" \
        >"$work/log" 2>&1; then
      echo "fuzz $name: ok ($(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$work/log" | grep -o '[0-9]*$') runs)"
    else
      echo "fuzz $name: FAILED"; tail -40 "$work/log"; status=1
    fi
    rm -rf "$work"
  done
fi
exit $status
