#!/bin/bash
# The live demo: installs what is missing, builds keyholdd and keyhold, starts
# the daemon on its embedded defaults (software backend, SQLite store) with
# its socket and state in ./demo/, then creates an EC key, signs a message,
# verifies the signature with plain openssl and shows that a second uid sees
# no keys. Stops the daemon by process id at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

scripts/install-deps.sh
# Its own build directory: the demo needs no test packages, and must not
# change the test build's settings.
cmake --preset dev -B build/demo -DKH_BUILD_TESTS=OFF -DKH_BUILD_BENCH=OFF >/dev/null
cmake --build build/demo -j2 --target keyholdd keyhold

bin="$root/build/demo"
demo="$root/demo"
mkdir -p "$demo"
chmod 755 "$demo"
export KEYHOLD_SOCKET="$demo/keyhold.sock"
keyhold() { "$bin/cli/keyhold" "$@"; }

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

"$bin/daemon/keyholdd" --socket "$KEYHOLD_SOCKET" --state-dir "$demo/state" \
  2>"$demo/keyholdd.log" &
daemon_pid=$!
trap 'kill $daemon_pid 2>/dev/null; wait $daemon_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  keyhold ping >/dev/null 2>&1 && break
  sleep 0.05
done

say "keyhold ping"
keyhold ping
name="demo-$(date +%s)"
say "keyhold key create $name --type ec-p256"
keyhold key create "$name" --type ec-p256
echo "keyhold says hello" >"$demo/message.txt"
say "keyhold sign $name --in message.txt --out message.sig"
keyhold sign "$name" --in "$demo/message.txt" --out "$demo/message.sig"
say "keyhold key public $name > $name.pub.pem"
keyhold key public "$name" | tee "$demo/$name.pub.pem"
say "openssl dgst -sha256 -verify $name.pub.pem -signature message.sig message.txt"
openssl dgst -sha256 -verify "$demo/$name.pub.pem" -signature "$demo/message.sig" "$demo/message.txt"
say "keyhold key list"
keyhold key list
say "setpriv --reuid=65534 --regid=65534 --clear-groups keyhold key list   # another uid"
setpriv --reuid=65534 --regid=65534 --clear-groups -- "$bin/cli/keyhold" key list
say "setpriv --reuid=65534 ... keyhold sign $(id -u)/$name ...   # another uid, not shared"
setpriv --reuid=65534 --regid=65534 --clear-groups -- "$bin/cli/keyhold" \
  sign "$(id -u)/$name" --in "$demo/message.txt" --out /dev/null || true
echo
echo "demo done: the private key never left keyholdd (state in $demo/state, log in $demo/keyholdd.log)"
