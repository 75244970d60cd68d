# Shared helpers for the shell scenarios: start a real keyholdd on a temporary
# socket and state directory, stop it by process id, and fail loudly.
# Expects KEYHOLDD and KEYHOLD (binary paths) in the environment.
set -euo pipefail

: "${KEYHOLDD:?path to keyholdd}"
: "${KEYHOLD:?path to keyhold}"

KH_DIR="$(mktemp -d /tmp/keyhold-sh-XXXXXX)"
chmod 755 "$KH_DIR"
export KEYHOLD_SOCKET="$KH_DIR/keyhold.sock"
KH_PID=""
KH_PASSED=0
KH_FAILED=0

kh_start() {
  "$KEYHOLDD" --socket "$KEYHOLD_SOCKET" --state-dir "$KH_DIR/state" \
    --log-level debug "$@" 2>>"$KH_DIR/keyholdd.log" &
  KH_PID=$!
  for _ in $(seq 1 100); do
    if "$KEYHOLD" ping >/dev/null 2>&1; then return 0; fi
    sleep 0.05
  done
  echo "keyholdd did not start; log:" >&2
  cat "$KH_DIR/keyholdd.log" >&2
  return 1
}

kh_stop() {
  if [ -n "$KH_PID" ]; then
    kill "$KH_PID" 2>/dev/null || true
    wait "$KH_PID" 2>/dev/null || true
    KH_PID=""
  fi
}

kh_cleanup() {
  kh_stop
  rm -rf "$KH_DIR"
}
trap kh_cleanup EXIT

# kh_free_port [N]: see free_port.sh.
source "$(dirname "${BASH_SOURCE[0]}")/free_port.sh"

# kh_doc_blocks DOC DIR TAG[:VAR=VALUE]...: runs, in document order and in
# DIR, every ```sh test TAG block of docs/DOC whose TAG is listed ("" names a
# plain ```sh test block), one check each, with `keyhold` and `keyholdd` on
# the PATH and that tag's VAR=VALUE set, so the commands a how-to shows are
# the ones a test runs. Finding no such block fails, unless
# KH_DOC_BLOCKS_NONE_OK is set (docs_test, which reads every how-to).
kh_doc_blocks() {
  local doc="$1" dir="$2"
  shift 2
  local specs=("$@")
  local bindir="$KH_DIR/doc-bin" blocks="$KH_DIR/doc-blocks"
  if [ ! -d "$bindir" ]; then
    mkdir -p "$bindir"
    ln -s "$(realpath "$KEYHOLD")" "$bindir/keyhold"
    ln -s "$(realpath "$KEYHOLDD")" "$bindir/keyholdd"
  fi
  rm -rf "$blocks"
  mkdir -p "$blocks" "$dir"
  # Block files are NNN.I.sh: the NNNth block run, for the Ith spec.
  python3 - "$(dirname "${BASH_SOURCE[0]}")/../docs/$doc" "$blocks" "$@" <<'PY'
import re, sys
path, out, tags = sys.argv[1], sys.argv[2], [s.split(":", 1)[0] for s in sys.argv[3:]]
n = 0
for m in re.finditer(r"```sh test( [a-z0-9]+)?\n(.*?)```", open(path).read(), re.S):
    tag = (m.group(1) or "").strip()
    if tag in tags:
        open(f"{out}/{n:03d}.{tags.index(tag)}.sh", "w").write(m.group(2))
        n += 1
PY
  local block spec name found=""
  for block in "$blocks"/*.sh; do
    [ -e "$block" ] || continue
    found=1
    name="$(basename "$block" .sh)"
    spec="${specs[${name#*.}]}"
    local env=()
    if [[ "$spec" == *:* ]]; then
      env=("${spec#*:}")
    fi
    check "$doc block ${name%%.*}${spec:+ (${spec%%:*})}" \
      env PATH="$bindir:$PATH" "${env[@]}" \
      bash -euo pipefail -c "cd '$dir' && source '$block'"
  done
  if [ -z "$found" ] && [ -z "${KH_DOC_BLOCKS_NONE_OK:-}" ]; then
    check "docs/$doc has sh test blocks for: ${specs[*]%%:*}" false
  fi
}

# check "description" command...: runs the command, counts pass/fail.
check() {
  local what="$1"
  shift
  # Write to new files and rename after, so a check may read the previous
  # command's output from $KH_DIR/out.
  local rc=0
  "$@" >"$KH_DIR/out.new" 2>"$KH_DIR/err.new" || rc=$?
  mv "$KH_DIR/out.new" "$KH_DIR/out"
  mv "$KH_DIR/err.new" "$KH_DIR/err"
  if [ "$rc" -eq 0 ]; then
    KH_PASSED=$((KH_PASSED + 1))
  else
    KH_FAILED=$((KH_FAILED + 1))
    echo "FAIL: $what" >&2
    echo "  command: $*" >&2
    sed 's/^/  stdout: /' "$KH_DIR/out" >&2
    sed 's/^/  stderr: /' "$KH_DIR/err" >&2
  fi
}

# fails: the command must exit non-zero with exactly one line on stderr
# containing the expected text.
fails() {
  local what="$1" expected="$2"
  shift 2
  local rc=0
  "$@" >"$KH_DIR/out.new" 2>"$KH_DIR/err.new" || rc=$?
  mv "$KH_DIR/out.new" "$KH_DIR/out"
  mv "$KH_DIR/err.new" "$KH_DIR/err"
  if [ "$rc" -eq 0 ]; then
    KH_FAILED=$((KH_FAILED + 1))
    echo "FAIL: $what (succeeded, expected failure)" >&2
    return
  fi
  if [ "$(wc -l <"$KH_DIR/err")" -ne 1 ] || ! grep -q -- "$expected" "$KH_DIR/err"; then
    KH_FAILED=$((KH_FAILED + 1))
    echo "FAIL: $what (stderr does not say '$expected' on one line)" >&2
    sed 's/^/  stderr: /' "$KH_DIR/err" >&2
    return
  fi
  KH_PASSED=$((KH_PASSED + 1))
}

# kh_exited_within PID SECONDS: true once PID has exited (gone, or a zombie:
# a child of this shell stays one until it is waited for).
kh_exited_within() {
  local stat
  for _ in $(seq 1 $(($2 * 10))); do
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    case "${stat##*) }" in Z*) return 0 ;; esac  # the state follows "(comm) "
    sleep 0.1
  done
  return 1
}

# kh_check_forced_exit CLIENT_PID CALL: SIGTERM to keyholdd while one of its
# TPM or HSM calls never returns (the call of CLIENT_PID's request). keyholdd
# must exit anyway, after io_timeout_seconds and 5 s more (docs/systemd.md),
# with status 1 and a log line naming the call (CALL: how the backend
# describes it); the cut-off client fails, not hangs.
kh_check_forced_exit() {
  local rc=0
  kill -TERM "$KH_PID"
  check "keyholdd exits on SIGTERM while a device call hangs" kh_exited_within "$KH_PID" 60
  wait "$KH_PID" || rc=$?
  KH_PID=""
  check "its exit status says it did not stop cleanly" test "$rc" = 1
  check "its log says why" grep -qF "a TPM or HSM call has not returned ($2" \
    "$KH_DIR/keyholdd.log"
  rc=0
  wait "$1" || rc=$?
  check "the cut-off request fails (not a hang)" test "$rc" -ne 0 -a "$rc" -ne 124
}

kh_summary() {
  kh_stop
  # Sanitizer builds: any report in the daemon's log is a failure.
  if grep -qE "ERROR: (Address|Leak)Sanitizer|WARNING: ThreadSanitizer|runtime error:" \
      "$KH_DIR/keyholdd.log" 2>/dev/null; then
    KH_FAILED=$((KH_FAILED + 1))
    echo "FAIL: sanitizer report in keyholdd's log:" >&2
    cat "$KH_DIR/keyholdd.log" >&2
  fi
  echo "$KH_PASSED passed, $KH_FAILED failed"
  [ "$KH_FAILED" -eq 0 ]
}
