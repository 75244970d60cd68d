#!/bin/bash
# Start-up refusals and process hardening of a real keyholdd: a config file,
# state directory or master key that others could read or change stops the
# daemon with a message naming the file and the reason; a running daemon is
# not dumpable and writes no core file.
source "$(dirname "$0")/lib.sh"

if [ "$(id -u)" -ne 0 ]; then
  echo "SKIP: needs root (files owned by another uid, a second uid)"
  exit 77
fi
OTHER=65534  # nobody

# refuses "what" "expected text" keyholdd args...: the daemon must exit
# non-zero (not time out) with the text in its log.
refuses() {
  local what="$1" expected="$2" rc=0
  shift 2
  timeout 20 "$KEYHOLDD" --socket "$KH_DIR/r.sock" "$@" >"$KH_DIR/start.log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -q -- "$expected" "$KH_DIR/start.log"; then
    KH_PASSED=$((KH_PASSED + 1))
  else
    KH_FAILED=$((KH_FAILED + 1))
    echo "FAIL: $what (rc $rc, expected '$expected')" >&2
    sed 's/^/  log: /' "$KH_DIR/start.log" >&2
  fi
}

# --- the config file ---------------------------------------------------------
CFG="$KH_DIR/keyholdd.toml"
printf 'log_level = "info"\n' >"$CFG"
chmod 0666 "$CFG"
refuses "config writable by others" "has mode 0666: others than its owner could change it" \
  --config "$CFG" --state-dir "$KH_DIR/s1"
chmod 0664 "$CFG"
refuses "config writable by its group" "has mode 0664" --config "$CFG" --state-dir "$KH_DIR/s1"
chmod 0644 "$CFG"
chown "$OTHER" "$CFG"
refuses "config owned by another uid" "is owned by uid $OTHER; it must belong to root" \
  --config "$CFG" --state-dir "$KH_DIR/s1"
chown 0 "$CFG"

# --- the state directory -----------------------------------------------------
mkdir -m 0755 "$KH_DIR/open-state"
refuses "state directory readable by others" "is accessible to other users" \
  --state-dir "$KH_DIR/open-state"
mkdir -m 0700 "$KH_DIR/foreign-state"
chown "$OTHER" "$KH_DIR/foreign-state"
refuses "state directory owned by another uid" "is not owned by the daemon's uid" \
  --state-dir "$KH_DIR/foreign-state"

# --- the master key ----------------------------------------------------------
kh_start --config "$CFG"  # creates state/ and its master key, then stops
kh_stop
check "the master key was created 0600" test "$(stat -c %a "$KH_DIR/state/master.key")" = 600
chmod 0640 "$KH_DIR/state/master.key"
refuses "master key readable by its group" "gives access to group or others" \
  --state-dir "$KH_DIR/state"
chmod 0600 "$KH_DIR/state/master.key"
chown "$OTHER" "$KH_DIR/state/master.key"
refuses "master key owned by another uid" "is owned by uid $OTHER" --state-dir "$KH_DIR/state"
chown 0 "$KH_DIR/state/master.key"

# --- a running daemon, as an unprivileged uid --------------------------------
# Not dumpable: /proc/PID files of a non-dumpable process belong to root, so
# the daemon's own uid cannot ptrace it or read its memory; no core files.
mkdir -m 0700 "$KH_DIR/nobody-state"
chown "$OTHER" "$KH_DIR/nobody-state"
chmod 0777 "$KH_DIR"  # so nobody may create its socket here
mkdir -m 0755 "$KH_DIR/nobody-run"
chown "$OTHER" "$KH_DIR/nobody-run"
setpriv --reuid=$OTHER --regid=$OTHER --clear-groups \
  "$KEYHOLDD" --socket "$KH_DIR/nobody-run/k.sock" --state-dir "$KH_DIR/nobody-state" \
  2>"$KH_DIR/nobody.log" &
NOBODY_PID=$!
for _ in $(seq 1 100); do
  KEYHOLD_SOCKET="$KH_DIR/nobody-run/k.sock" "$KEYHOLD" ping >/dev/null 2>&1 && break
  sleep 0.05
done
chmod 0755 "$KH_DIR"
check "keyholdd runs as nobody" sh -c "KEYHOLD_SOCKET='$KH_DIR/nobody-run/k.sock' '$KEYHOLD' ping"
check "... and is not dumpable (its /proc files belong to root)" \
  test "$(stat -c %u "/proc/$NOBODY_PID/mem")" = 0
check "... so its own uid cannot read its memory" \
  setpriv --reuid=$OTHER --regid=$OTHER --clear-groups sh -c "! head -c1 /proc/$NOBODY_PID/environ 2>/dev/null"
check "... and its core file size limit is 0" \
  sh -c "grep '^Max core file size' /proc/$NOBODY_PID/limits | awk '{exit !(\$5 == 0 && \$6 == 0)}'"
kill "$NOBODY_PID"
wait "$NOBODY_PID" 2>/dev/null || true

# --- log lines name their component -------------------------------------------
# "<time> <level> [<component>] <message>": main (start-up, config, signals),
# server (connections), dispatch, pool, ops (key changes), pkcs11.
: >"$KH_DIR/keyholdd.log"
kh_start --config "$CFG"
"$KEYHOLD" key create log-k --type ec-p256 >/dev/null
printf 'x' >"$KH_DIR/log-msg"
"$KEYHOLD" sign log-k --in "$KH_DIR/log-msg" --out "$KH_DIR/log-sig" >/dev/null
"$KEYHOLD" sign no-such-key --in "$KH_DIR/log-msg" --out "$KH_DIR/log-sig" >/dev/null 2>&1 || true
kh_stop
check "the daemon logged something" test -s "$KH_DIR/keyholdd.log"
check "every log line names its component" sh -c "! grep -Ev \
  '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+ [a-z]+ \\[(main|server|dispatch|pool|ops|pkcs11)\\] .' \
  '$KH_DIR/keyholdd.log'"
for c in main server ops; do
  check "... including [$c]" grep -q " \[$c\] " "$KH_DIR/keyholdd.log"
done

kh_summary
