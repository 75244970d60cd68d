#!/bin/bash
# keyhold's PKCS#11 module versus the nearest existing design, SoftHSM2
# served through `p11-kit server` and used through p11-kit-client.so, in one
# run of frontend_bench (issue 4):
#
#   bench/p11_compare.sh [--build-dir DIR] [frontend_bench options...]
#
# Creates a SoftHSM2 token "bench" (user PIN 1234) in a temporary token
# directory, starts `p11-kit server` for it on a private socket, runs
# frontend_bench --frontends pkcs11,p11kit (the module against in-process,
# then the module against p11-kit-client.so) with the remaining arguments,
# and stops the server by its pid. The report (Markdown) goes to stdout.
# See bench/README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD_DIR="$ROOT/build/dev"
if [ "${1:-}" = "--build-dir" ]; then
  BUILD_DIR="$(realpath "$2")"
  shift 2
fi
BENCH="$BUILD_DIR/bench/frontend_bench"
SOFTHSM=/usr/lib/softhsm/libsofthsm2.so
CLIENT=""
for f in /usr/lib/*/pkcs11/p11-kit-client.so /usr/lib/pkcs11/p11-kit-client.so; do
  if [ -f "$f" ]; then CLIENT="$f"; break; fi
done
if [ ! -x "$BENCH" ]; then
  echo "p11_compare: $BENCH not built; run: cmake --build $BUILD_DIR --target frontend_bench" >&2
  exit 2
fi
if [ ! -f "$SOFTHSM" ] || [ -z "$CLIENT" ] || ! command -v p11-kit >/dev/null ||
    ! command -v softhsm2-util >/dev/null; then
  echo "p11_compare: needs softhsm2, p11-kit and p11-kit-modules" \
    "(scripts/install-deps.sh --test)" >&2
  exit 2
fi

T="$(mktemp -d /tmp/keyhold-p11-compare-XXXXXX)"  # 0700
SERVER_PID=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

source "$ROOT/tests/softhsm.sh"
kh_softhsm_token "$T" bench 1234

SOCK="$T/p11-kit.sock"
p11-kit server -f -n "$SOCK" --provider "$SOFTHSM" "pkcs11:token=bench" \
  >"$T/server.out" 2>"$T/server.err" &
SERVER_PID=$!
for _ in $(seq 1 100); do
  [ -S "$SOCK" ] && break
  sleep 0.05
done
if [ ! -S "$SOCK" ]; then
  echo "p11_compare: p11-kit server did not start:" >&2
  cat "$T/server.out" "$T/server.err" >&2
  exit 1
fi
export P11_KIT_SERVER_ADDRESS="unix:path=$SOCK"
echo "p11_compare: p11-kit server $(dpkg-query -W -f '${Version}' p11-kit 2>/dev/null || true) pid $SERVER_PID," \
  "SoftHSM2 $(softhsm2-util --version), $P11_KIT_SERVER_ADDRESS" >&2

rc=0
"$BENCH" --p11kit "$CLIENT" --p11kit-pin 1234 --frontends pkcs11,p11kit "$@" || rc=$?
if [ -s "$T/server.err" ]; then
  echo "p11_compare: p11-kit server's stderr:" >&2
  tail -20 "$T/server.err" >&2
fi
exit "$rc"
