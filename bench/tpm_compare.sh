#!/bin/bash
# keyhold's TPM backend versus tpm2-openssl, signing with keys on the same
# swtpm, in one run (issue 6). Starts its own swtpm and keyholdd in a temporary
# directory; the two sides take turns on the TPM in ABBA order (swtpm serves
# one client connection at a time): tpm2-openssl, keyhold, keyhold,
# tpm2-openssl. The last keyhold round also does 10,000 signatures over 20
# keys. Prints a Markdown table for bench/RESULTS.md.
#   bench/tpm_compare.sh [--seconds N] [--api sign|digest-sign]
#     --seconds  per side and round (default 5)
#     --api      sign (default): EVP_PKEY_sign over a digest on tpm2-openssl's
#                side, the client library's Sign() on keyhold's;
#                digest-sign: EVP_DigestSign over a message through each
#                side's OpenSSL provider (tpm2-openssl, keyhold.so), as TLS
#                and X.509 signing do (see bench/tpm_bench.cc)
# Needs: swtpm, tpm2-openssl (Debian packages), a dev build (BUILD=build/dev).
set -euo pipefail
SECONDS_PER=5
API=sign
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER="$2"; shift 2 ;;
    --api) API="$2"; shift 2 ;;
    *) echo "usage: $0 [--seconds N] [--api sign|digest-sign]" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${BUILD:-$ROOT/build/dev}"
BENCH="$BUILD/bench/tpm_bench"
KEYHOLDD="${KEYHOLDD:-$BUILD/daemon/keyholdd}"
for f in "$BENCH" "$KEYHOLDD"; do
  [ -x "$f" ] || { echo "missing $f: cmake --build $BUILD --target tpm_bench keyholdd" >&2; exit 1; }
done

DIR="$(mktemp -d /tmp/kh-tpm-bench-XXXXXX)"
SWTPM_PID=""
KH_PID=""
cleanup() {
  [ -n "$KH_PID" ] && kill "$KH_PID" 2>/dev/null && wait "$KH_PID" 2>/dev/null
  [ -n "$SWTPM_PID" ] && kill "$SWTPM_PID" 2>/dev/null && wait "$SWTPM_PID" 2>/dev/null
  rm -rf "$DIR"
}
trap cleanup EXIT

# Two ports below the ephemeral range: the TIME-WAIT sockets the TCTI's
# connections leave behind cannot collide with them.
source "$ROOT/tests/free_port.sh"
PORT="$(kh_free_port 2)"
mkdir -p "$DIR/tpm"
swtpm socket --tpm2 --server "type=tcp,port=$PORT,bindaddr=127.0.0.1" \
  --ctrl "type=tcp,port=$((PORT + 1)),bindaddr=127.0.0.1" \
  --tpmstate "dir=$DIR/tpm" --flags not-need-init,startup-clear >"$DIR/swtpm.log" 2>&1 &
SWTPM_PID=$!
for _ in $(seq 1 200); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
  sleep 0.05
done
TCTI="swtpm:host=127.0.0.1,port=$PORT"
cat >"$DIR/keyholdd.toml" <<TOML
[[backend.tpm]]
name = "tpm"
tcti = "$TCTI"
TOML

keyhold_round() {
  "$KEYHOLDD" --config "$DIR/keyholdd.toml" --socket "$DIR/kh.sock" \
    --state-dir "$DIR/state" --log-level warn 2>>"$DIR/keyholdd.log" &
  KH_PID=$!
  for _ in $(seq 1 100); do [ -S "$DIR/kh.sock" ] && break; sleep 0.05; done
  "$BENCH" --side keyhold --socket "$DIR/kh.sock" --seconds "$SECONDS_PER" \
    --api "$API" "$@" >>"$DIR/results"
  kill "$KH_PID"; wait "$KH_PID" || true; KH_PID=""
}
openssl_round() {
  "$BENCH" --side tpm2-openssl --tcti "$TCTI" --seconds "$SECONDS_PER" \
    --api "$API" >>"$DIR/results"
}

openssl_round
keyhold_round
keyhold_round --many
openssl_round

echo "API: $API"
echo
echo "| key | tpm2-openssl ops/s (round 1, 2) | keyhold TPM backend ops/s (round 1, 2) | p50 µs tpm2-openssl / keyhold |"
echo "|---|---|---|---|"
for type in ec-p256 rsa-2048; do
  o=$(awk -v t="$type" '$1=="tpm2-openssl" && $2==t {printf "%s%s", sep, $5; sep=", "}' "$DIR/results")
  k=$(awk -v t="$type" '$1=="keyhold" && $2==t {printf "%s%s", sep, $5; sep=", "}' "$DIR/results")
  po=$(awk -v t="$type" '$1=="tpm2-openssl" && $2==t {print $6; exit}' "$DIR/results")
  pk=$(awk -v t="$type" '$1=="keyhold" && $2==t {print $6; exit}' "$DIR/results")
  echo "| $type | $o | $k | $po / $pk |"
done
echo
echo "| keyhold, 20 ec-p256 keys in turn (5 ops each), 10,000 ops | ops/s | p50 µs |"
echo "|---|---|---|"
awk '$2 ~ /^ec-p256x20/ {print "| " $2 " | " $5 " | " ($6 == 0 ? "" : $6) " |"}' "$DIR/results"
