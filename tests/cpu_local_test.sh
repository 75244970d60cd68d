#!/bin/bash
# CPU-local sessions (cpu_local_sessions, daemon/server.h): a client whose
# affinity allows one CPU only is served by the daemon's I/O thread pinned to
# that CPU; a keyhold client library connection by the thread on the CPU it
# was made on (its socket address says which, common/cpu_hint.h); other
# clients by the shared I/O threads. Checks the routing (the daemon's debug
# log), that pinned and unpinned clients sign correctly side by side, the
# switch to turn it off, and a shutdown with a CPU-local connection open.
source "$(dirname "$0")/lib.sh"

mapfile -t CPUS < <(taskset -c -p $$ | sed 's/.*: //' | tr ',' '\n' |
  awk -F- '{ if (NF == 2) for (i = $1; i <= $2; i++) print i; else print $1 }')
if [ "${#CPUS[@]}" -lt 2 ]; then
  echo "SKIP: needs at least 2 CPUs (with one, every client shares the daemon's CPU)"
  exit 77
fi
W="$KH_DIR/work"
mkdir -p "$W"
head -c 5000 /dev/urandom >"$W/msg"

served_on() {  # served_on PID CPU: the daemon logged that pid on that CPU
  grep -q "connection from uid [0-9]* pid $1, served on its CPU $2\$" "$KH_DIR/keyholdd.log"
}

kh_start
for cpu in "${CPUS[@]:0:2}"; do
  taskset -c "$cpu" sh -c 'echo $$ >"$1"; exec "$2" ping' _ "$W/pid" "$KEYHOLD" >/dev/null
  check "a client pinned to CPU $cpu is served on CPU $cpu" served_on "$(cat "$W/pid")" "$cpu"
done
# An unpinned client: the client library names the CPU it connected on in
# its socket address (common/cpu_hint.h), and the daemon serves it there.
sh -c 'echo $$ >"$1"; exec "$2" ping' _ "$W/pid" "$KEYHOLD" >/dev/null
pid="$(cat "$W/pid")"
check "an unpinned keyhold client is served on the CPU it connected from" sh -c \
  "grep -q 'connection from uid [0-9]* pid $pid, served on its CPU [0-9]*\$' '$KH_DIR/keyholdd.log'"
# Other client code (no hint, not pinned) is served by the shared threads.
python3 -c '
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
open(sys.argv[2], "w").write(str(os.getpid()))
time.sleep(0.3)' "$KEYHOLD_SOCKET" "$W/pid"
pid="$(cat "$W/pid")"
check "a client without a CPU hint is served by the shared threads" sh -c \
  "grep -q 'connection from uid [0-9]* pid $pid\$' '$KH_DIR/keyholdd.log'"

check "create a key" "$KEYHOLD" key create local-ec --type ec-p256
check "public key" "$KEYHOLD" key public local-ec
cp "$KH_DIR/out" "$W/local-ec.pub"
check "create an RSA key" "$KEYHOLD" key create local-rsa --type rsa-2048
check "public RSA key" "$KEYHOLD" key public local-rsa
cp "$KH_DIR/out" "$W/local-rsa.pub"
# Pinned clients on two CPUs and an unpinned one sign at the same time.
signer() {  # signer CPU|- KEY N: N signatures, each verified
  local cpu="$1" key="$2" n="$3" i run=()
  [ "$cpu" != - ] && run=(taskset -c "$cpu")
  for i in $(seq 1 "$n"); do
    "${run[@]}" "$KEYHOLD" sign "$key" --in "$W/msg" --out "$W/sig.$cpu.$key" --digest sha256 &&
      openssl dgst -sha256 -verify "$W/$key.pub" -signature "$W/sig.$cpu.$key" "$W/msg" \
        >/dev/null || return 1
  done
}
pids=()
signer "${CPUS[0]}" local-ec 40 & pids+=($!)
signer "${CPUS[1]}" local-rsa 20 & pids+=($!)
signer - local-ec 40 & pids+=($!)
for p in "${pids[@]}"; do
  check "concurrent signer $p: every signature verifies" wait "$p"
done

# A shutdown with a CPU-local connection open finishes.
taskset -c "${CPUS[1]}" python3 -c '
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
time.sleep(60)' "$KEYHOLD_SOCKET" &
holder=$!
sleep 0.5
kill "$KH_PID"
rc=0
timeout 30 tail --pid="$KH_PID" -f /dev/null || rc=$?
check "the daemon stops with a CPU-local connection open" test "$rc" = 0
wait "$KH_PID" 2>/dev/null || true
KH_PID=""
kill "$holder" 2>/dev/null || true
wait "$holder" 2>/dev/null || true

# cpu_local_sessions = false: pinned clients use the shared threads too.
printf 'cpu_local_sessions = false\n' >"$KH_DIR/off.toml"
chmod 600 "$KH_DIR/off.toml"
: >"$KH_DIR/keyholdd.log"
kh_start --config "$KH_DIR/off.toml"
taskset -c "${CPUS[0]}" sh -c 'echo $$ >"$1"; exec "$2" ping' _ "$W/pid" "$KEYHOLD" >/dev/null
pid="$(cat "$W/pid")"
check "switched off: a pinned client is served by the shared threads" sh -c \
  "grep -q 'connection from uid [0-9]* pid $pid\$' '$KH_DIR/keyholdd.log'"
check "switched off: the start-up line counts no CPU-local threads" \
  grep -q "0 CPU-local" "$KH_DIR/keyholdd.log"
check "switched off: pinned signing works" taskset -c "${CPUS[0]}" "$KEYHOLD" sign local-ec \
  --in "$W/msg" --out "$W/sig" --digest sha256
check "openssl verifies it" openssl dgst -sha256 -verify "$W/local-ec.pub" -signature "$W/sig" "$W/msg"

kh_summary
