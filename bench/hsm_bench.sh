#!/bin/bash
# HSM backend benchmark: sets up a SoftHSM2 token in a temporary directory,
# starts keyholdd (dev build) with a [[backend.pkcs11]] table for it, and runs
# build/dev/bench/hsm_bench against it; extra arguments go to hsm_bench
# (--seconds N, --threads LIST, --types LIST). Markdown report on stdout.
#   BUILD=build/dev bench/hsm_bench.sh --seconds 3
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${BUILD:-build/dev}"
M=/usr/lib/softhsm/libsofthsm2.so
D="$(mktemp -d /tmp/keyhold-hsm-bench-XXXXXX)"
PID=""
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$D"
}
trap cleanup EXIT
source tests/softhsm.sh
kh_softhsm_token "$D" kh-bench 1234
printf '1234\n' >"$D/pin"
chmod 600 "$D/pin"
cat >"$D/keyholdd.toml" <<TOML
[[backend.pkcs11]]
name = "hsm"
module = "$M"
allowed_modules = ["$M"]
token_label = "kh-bench"
pin_file = "$D/pin"
sessions = 4
TOML
"$BUILD/daemon/keyholdd" --config "$D/keyholdd.toml" --socket "$D/sock" \
  --state-dir "$D/state" --log-level warn 2>"$D/keyholdd.log" &
PID=$!
for _ in $(seq 1 100); do [ -S "$D/sock" ] && break; sleep 0.05; done
"$BUILD/bench/hsm_bench" --socket "$D/sock" --module "$M" --token-label kh-bench \
  --pin-file "$D/pin" "$@"
