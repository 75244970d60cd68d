#!/bin/bash
# Installs what is missing, builds and runs every test. .ci/run calls this.
#   scripts/test.sh              everything: dev build (unit + integration tests),
#                                fuzzer smoke run, then the same tests under
#                                ASan+UBSan and under TSan
#   scripts/test.sh dev          only the dev build's tests (fastest)
#   scripts/test.sh asan-ubsan   only under ASan+UBSan
#   scripts/test.sh tsan         only under TSan
#   scripts/test.sh fuzz         only the fuzzer smoke run
# KH_FUZZ_SECONDS (default 60) sets how long each fuzzer runs.
set -euo pipefail
cd "$(dirname "$0")/.."

stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
  stages=(dev fuzz asan-ubsan tsan)
fi
fuzz_seconds="${KH_FUZZ_SECONDS:-60}"

scripts/install-deps.sh --test

# These run as if-conditions, where set -e does not apply: chain with &&.
run_tests() {  # preset
  cmake --preset "$1" >/dev/null &&
    cmake --build --preset "$1" &&
    ctest --preset "$1" --timeout 900
}

run_fuzz() {
  cmake --preset fuzz >/dev/null &&
    cmake --build --preset fuzz --target fuzzers || return 1
  local ok=0
  for f in build/fuzz/fuzz/*_fuzzer; do
    local name work
    name="$(basename "$f")"
    work="$(mktemp -d)"
    if "$f" -max_total_time="$fuzz_seconds" -print_final_stats=1 "$work" \
        "fuzz/corpus/$name" >"$work/log" 2>&1; then
      echo "fuzz $name: ok ($(grep -m1 -o 'number_of_executed_units: *[0-9]*' "$work/log" | grep -o '[0-9]*$') runs in ${fuzz_seconds}s)"
    else
      echo "fuzz $name: FAILED"
      tail -40 "$work/log"
      ok=1
    fi
    rm -rf "$work"
  done
  return $ok
}

passed=0
failed=0
for stage in "${stages[@]}"; do
  echo "== $stage"
  start=$(date +%s)
  if case "$stage" in
       fuzz) run_fuzz ;;
       dev|asan-ubsan|tsan) run_tests "$stage" ;;
       *) echo "unknown stage '$stage'"; false ;;
     esac; then
    passed=$((passed + 1))
    echo "== $stage: passed in $(($(date +%s) - start)) s"
  else
    failed=$((failed + 1))
    echo "== $stage: FAILED after $(($(date +%s) - start)) s"
  fi
done
echo "stages: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
