#!/bin/bash
# nginx full TLS handshakes with the server key in keyhold versus the same key
# as a plain PEM file, ECDSA P-256 and RSA-2048, in one run (issue 3).
#
#   bench/nginx_bench.sh [--seconds N] [--threads N] [--tls 1.3|1.2]
#                        [--build-dir DIR] [--configs LIST]
#                        [--worker-cpu-affinity] [--keyholdd-config FILE]
#                        [--floor]
#
# --worker-cpu-affinity adds `worker_cpu_affinity auto;` (each nginx worker
# pinned to its own CPU) for both the file and the keyhold configurations;
# keyholdd then serves each worker from an I/O thread on the worker's CPU
# (cpu_local_sessions). --keyholdd-config passes a config file to keyholdd
# (e.g. one with cpu_local_sessions = false).
#
# --floor puts bench/floor_signer in keyholdd's place for nginx: it answers
# the signatures itself (the same keys, in its own memory, one blocking thread
# per connection, no event loop, no authorization or audit) and relays the
# rest to keyholdd. The keyhold rows then show what crossing the process
# boundary costs with a signer that does nothing else; its CPU is counted in
# the keyholdd column.
#
# Starts its own keyholdd and nginx (2 workers, as www-data, the provider
# loaded through OPENSSL_CONF as in tests/ossl/nginx_test.sh) on 127.0.0.1,
# one server block per configuration, and drives each configuration with
# bench/tls_handshake_load. For every configuration it reads the CPU time
# (utime + stime from /proc/PID/stat) of the nginx master and workers and of
# keyholdd before and after, and prints a Markdown table. Needs root (nginx
# workers run as www-data), nginx and the www-data user. Every process it
# starts is stopped by its pid on exit. See bench/README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SECONDS_PER=10
THREADS=2
TLS=1.3
BUILD_DIR="$ROOT/build/dev"
CONFIGS="file-ec-p256,keyhold-ec-p256,file-rsa-2048,keyhold-rsa-2048"
WARMUP=1
AFFINITY=""
KH_CONFIG=""
FLOOR=""

usage() {
  sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//' >&2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --tls) TLS="$2"; shift 2 ;;
    --build-dir) BUILD_DIR="$(realpath "$2")"; shift 2 ;;
    --configs) CONFIGS="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --worker-cpu-affinity) AFFINITY="worker_cpu_affinity auto;"; shift ;;
    --keyholdd-config) KH_CONFIG="$(realpath "$2")"; shift 2 ;;
    --floor) FLOOR=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "nginx_bench: unknown option $1" >&2; usage; exit 2 ;;
  esac
done
case "$TLS" in 1.2|1.3) ;; *) echo "nginx_bench: --tls 1.3 or 1.2" >&2; exit 2 ;; esac

KEYHOLDD="$BUILD_DIR/daemon/keyholdd"
KEYHOLD="$BUILD_DIR/cli/keyhold"
PROVIDER="$BUILD_DIR/ossl-provider/keyhold.so"
LOAD="$BUILD_DIR/bench/tls_handshake_load"
FLOOR_SIGNER="$BUILD_DIR/bench/floor_signer"
for f in "$KEYHOLDD" "$KEYHOLD" "$PROVIDER" "$LOAD" ${FLOOR:+"$FLOOR_SIGNER"}; do
  if [ ! -x "$f" ] && [ ! -f "$f" ]; then
    echo "nginx_bench: $f not built; run: cmake --build $BUILD_DIR --target" \
      "keyholdd keyhold keyhold-provider tls_handshake_load floor_signer" >&2
    exit 2
  fi
done
if [ "$(id -u)" -ne 0 ] || ! command -v nginx >/dev/null || ! id www-data >/dev/null 2>&1; then
  echo "nginx_bench: needs root, nginx (nginx-light) and the www-data user" >&2
  exit 2
fi
if [ -e /etc/keyhold/keyholdd.toml ]; then
  echo "nginx_bench: warning: keyholdd also reads /etc/keyhold/keyholdd.toml" >&2
fi
calc() {  # calc EXPR [FORMAT]: floating-point arithmetic
  awk "BEGIN { printf \"${2:-%.6f}\", $1 }"
}

# Temp layout: $T is 0711 (www-data may traverse to the socket, not list);
# state, keys and nginx files are 0700 for root; the socket directory is
# created 0755 by keyholdd.
T="$(mktemp -d /tmp/keyhold-nginx-bench-XXXXXX)"
chmod 711 "$T"
mkdir -m 700 "$T/keys" "$T/nginx"
mkdir -p "$T/nginx/logs"
export KEYHOLD_SOCKET="$T/run/keyhold.sock"
KH_PID=""
NGINX_PID=""
FLOOR_PID=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  if [ -n "$NGINX_PID" ]; then
    kill "$NGINX_PID" 2>/dev/null || true
    wait "$NGINX_PID" 2>/dev/null || true
  fi
  if [ -n "$FLOOR_PID" ]; then
    kill "$FLOOR_PID" 2>/dev/null || true
    wait "$FLOOR_PID" 2>/dev/null || true
  fi
  if [ -n "$KH_PID" ]; then
    kill "$KH_PID" 2>/dev/null || true
    wait "$KH_PID" 2>/dev/null || true
  fi
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
die() {
  echo "nginx_bench: $*" >&2
  for log in "$T/keyholdd.log" "$T/nginx/logs/error.log"; do
    if [ -s "$log" ]; then echo "--- $log:" >&2; tail -20 "$log" >&2; fi
  done
  exit 1
}
plain() { env -u OPENSSL_CONF -u OPENSSL_MODULES openssl "$@"; }

"$KEYHOLDD" --socket "$KEYHOLD_SOCKET" --state-dir "$T/state" --log-level warn \
  ${KH_CONFIG:+--config "$KH_CONFIG"} 2>>"$T/keyholdd.log" &
KH_PID=$!
for _ in $(seq 1 100); do
  "$KEYHOLD" ping >/dev/null 2>&1 && break
  sleep 0.05
done
"$KEYHOLD" ping >/dev/null 2>&1 || die "keyholdd did not start"

# One key per type, generated as a plain PEM file and imported into keyhold:
# both configurations of a type sign with the same key and serve the same
# certificate.
for type in ec-p256 rsa-2048; do
  case "$type" in
    ec-p256) plain genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
      -out "$T/keys/$type.key" 2>/dev/null ;;
    rsa-2048) plain genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
      -out "$T/keys/$type.key" 2>/dev/null ;;
  esac
  "$KEYHOLD" key import "nginx-$type" --in "$T/keys/$type.key" >/dev/null ||
    die "key import $type failed"
  "$KEYHOLD" key grant "nginx-$type" --user www-data >/dev/null || die "key grant failed"
  "$KEYHOLD" key ref "nginx-$type" >"$T/keys/$type.ref.pem" || die "key ref failed"
  plain req -new -x509 -key "$T/keys/$type.key" -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1 -days 1 -out "$T/keys/$type.crt" 2>/dev/null ||
    die "certificate for $type failed"
done

# The processes that sign for nginx: keyholdd, and with --floor the floor
# signer in front of it (nginx then talks to the floor signer only).
SIGNER_PIDS=("$KH_PID")
NGINX_SOCKET="$KEYHOLD_SOCKET"
if [ -n "$FLOOR" ]; then
  mkdir -m 755 "$T/floor"
  NGINX_SOCKET="$T/floor/keyhold.sock"
  "$FLOOR_SIGNER" --listen "$NGINX_SOCKET" --upstream "$KEYHOLD_SOCKET" \
    --key "nginx-ec-p256=$T/keys/ec-p256.key" \
    --key "nginx-rsa-2048=$T/keys/rsa-2048.key" 2>>"$T/floor.log" &
  FLOOR_PID=$!
  for _ in $(seq 1 100); do [ -S "$NGINX_SOCKET" ] && break; sleep 0.05; done
  [ -S "$NGINX_SOCKET" ] || die "floor_signer did not start"
  SIGNER_PIDS+=("$FLOOR_PID")
fi
# The process that must sign for nginx (checked after the warm-up).
SIGNING_PID="${FLOOR_PID:-$KH_PID}"

CNF="$T/openssl-keyhold.cnf"
sed "s|^# module = .*|module = $PROVIDER|" "$ROOT/conf/openssl-keyhold.cnf" >"$CNF"

# Free ports: ask the kernel for 4 (bind to port 0), then release them.
read -r -a PORTS <<<"$(python3 -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')"
declare -A PORT_OF
i=0
for c in file-ec-p256 keyhold-ec-p256 file-rsa-2048 keyhold-rsa-2048; do
  PORT_OF[$c]=${PORTS[$i]}
  i=$((i + 1))
done

server_block() {  # server_block CONFIG
  local c="$1" type="${1#*-}" key
  case "$c" in
    file-*) key="$T/keys/$type.key" ;;
    keyhold-*) key="$T/keys/$type.ref.pem" ;;
  esac
  cat <<BLOCK
  server {
    listen 127.0.0.1:${PORT_OF[$c]} ssl;
    ssl_certificate $T/keys/$type.crt;
    ssl_certificate_key $key;
    location / { return 200 "ok\n"; }
  }
BLOCK
}
{
  cat <<CONF
user www-data;
worker_processes 2;
$AFFINITY
daemon off;
pid $T/nginx/nginx.pid;
error_log $T/nginx/logs/error.log warn;
env OPENSSL_CONF;
env KEYHOLD_SOCKET;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $T/nginx/body;
  proxy_temp_path $T/nginx/proxy;
  fastcgi_temp_path $T/nginx/fastcgi;
  uwsgi_temp_path $T/nginx/uwsgi;
  scgi_temp_path $T/nginx/scgi;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache off;
  ssl_session_tickets off;
CONF
  for c in file-ec-p256 keyhold-ec-p256 file-rsa-2048 keyhold-rsa-2048; do
    server_block "$c"
  done
  echo "}"
} >"$T/nginx/nginx.conf"

KEYHOLD_SOCKET="$NGINX_SOCKET" OPENSSL_CONF="$CNF" nginx -p "$T/nginx" -c "$T/nginx/nginx.conf" \
  2>>"$T/nginx/logs/error.log" &
NGINX_PID=$!
for _ in $(seq 1 100); do
  [ "$(pgrep -c -P "$NGINX_PID" 2>/dev/null || true)" -ge 2 ] &&
    "$LOAD" --port "${PORT_OF[file-ec-p256]}" --seconds 0.05 --threads 1 \
      --cafile "$T/keys/ec-p256.crt" | grep -q 'failures=0' && break
  sleep 0.1
done
mapfile -t WORKERS < <(pgrep -P "$NGINX_PID")
[ "${#WORKERS[@]}" -ge 2 ] || die "nginx did not start"
for w in "${WORKERS[@]}"; do
  [ "$(stat -c %U "/proc/$w")" = www-data ] || die "nginx worker $w is not www-data"
done

CLK_TCK="$(getconf CLK_TCK)"
ticks() {  # ticks PID...: utime + stime of the processes (all threads)
  local sum=0 p f
  for p in "$@"; do
    # Fields after "pid (comm) ": state is $1, utime $12, stime $13.
    f="$(sed 's/^.*) //' "/proc/$p/stat")"
    sum=$((sum + $(echo "$f" | awk '{print $12 + $13}')))
  done
  echo "$sum"
}

# Cross-check with nanosecond resolution: the scheduler's run time of every
# live thread (/proc/PID/task/*/schedstat, first field). Threads that exit
# during a segment would be missed; nginx workers are single-threaded and
# keyholdd's threads live as long as it does.
sched_ns() {  # sched_ns PID...
  local p
  for p in "$@"; do cat /proc/"$p"/task/*/schedstat; done |
    awk '{ s += $1 } END { printf "%.0f", s }'
}

declare -A HS FAIL WALL NG KH CLI RESUMED PROTO ERR SCHED
run_load() {  # run_load CONFIG SECONDS: one segment, added to the totals
  local c="$1" s="$2" type="${1#*-}" n0 k0 n1 k1 s0 s1 out
  n0="$(ticks "$NGINX_PID" "${WORKERS[@]}")"
  k0="$(ticks "${SIGNER_PIDS[@]}")"
  s0="$(sched_ns "$NGINX_PID" "${WORKERS[@]}" "${SIGNER_PIDS[@]}")"
  out="$("$LOAD" --port "${PORT_OF[$c]}" --seconds "$s" --threads "$THREADS" \
    --tls "$TLS" --cafile "$T/keys/$type.crt")" || die "load generator failed: $out"
  s1="$(sched_ns "$NGINX_PID" "${WORKERS[@]}" "${SIGNER_PIDS[@]}")"
  n1="$(ticks "$NGINX_PID" "${WORKERS[@]}")"
  k1="$(ticks "${SIGNER_PIDS[@]}")"
  val() { echo "$out" | sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p"; }
  HS[$c]=$(( ${HS[$c]:-0} + $(val handshakes) ))
  FAIL[$c]=$(( ${FAIL[$c]:-0} + $(val failures) ))
  RESUMED[$c]=$(( ${RESUMED[$c]:-0} + $(val resumed) ))
  WALL[$c]="$(calc "${WALL[$c]:-0} + $(val seconds)")"
  CLI[$c]="$(calc "${CLI[$c]:-0} + $(val client_cpu_s)")"
  NG[$c]=$(( ${NG[$c]:-0} + n1 - n0 ))
  KH[$c]=$(( ${KH[$c]:-0} + k1 - k0 ))
  SCHED[$c]=$(( ${SCHED[$c]:-0} + s1 - s0 ))
  PROTO[$c]="$(val protocol)"
  if [ "$(val failures)" != 0 ] && [ -z "${ERR[$c]:-}" ]; then
    ERR[$c]="$(echo "$out" | sed -n 's/.*first_error="\(.*\)"/\1/p')"
  fi
  echo "nginx_bench: $c ${s}s: $out (nginx +$((n1 - n0)) ticks, keyholdd +$((k1 - k0)) ticks)" >&2
}

IFS=, read -r -a WANT <<<"$CONFIGS"
for c in "${WANT[@]}"; do
  [ -n "${PORT_OF[$c]:-}" ] || { echo "nginx_bench: unknown config $c" >&2; exit 2; }
done

{
  echo "## nginx full TLS handshakes: key in keyhold vs key file"
  echo
  echo "- command: \`bench/nginx_bench.sh --seconds $SECONDS_PER --threads $THREADS --tls $TLS --build-dir ${BUILD_DIR#"$ROOT"/} --configs $CONFIGS${AFFINITY:+ --worker-cpu-affinity}${KH_CONFIG:+ --keyholdd-config $KH_CONFIG}${FLOOR:+ --floor}\`"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- machine: nproc $(nproc), CPU $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), kernel $(uname -sr)"
  echo "- load average at start: $(cat /proc/loadavg)"
  echo "- nginx: $(nginx -v 2>&1 | sed 's/.*: //'), 2 workers as www-data${AFFINITY:+ pinned one per CPU (worker_cpu_affinity auto)}, OPENSSL_CONF with the default and keyhold providers (\`?provider=default\`), ssl_session_cache off, ssl_session_tickets off, access_log off"
  echo "- OpenSSL: $(openssl version)"
  echo "- keyholdd: \`$KEYHOLDD --socket <tmp>/run/keyhold.sock --state-dir <tmp>/state --log-level warn${KH_CONFIG:+ --config $KH_CONFIG}\` (pid $KH_PID), software backend; keys generated as PEM files and imported, so both configurations of a type use the same key and certificate"
  if [ -n "$FLOOR" ]; then
    echo "- --floor: nginx's signatures come from \`bench/floor_signer\` (pid $FLOOR_PID; same keys in its own memory, blocking thread per connection, everything else relayed to keyholdd); the keyholdd columns count floor_signer + keyholdd"
  fi
  echo "- load: \`tls_handshake_load --threads $THREADS --tls $TLS\` on the same 2 cores: a fresh connection and full handshake per request (no session offered, no tickets), server certificate verified, then \`GET /\` with \`Connection: close\`"
  echo "- method: each configuration runs ${SECONDS_PER} s in two halves, ec-p256 in the order file, keyhold, keyhold, file and rsa-2048 keyhold, file, file, keyhold, after a ${WARMUP} s warm-up of each; server CPU = utime + stime (/proc/PID/stat, ${CLK_TCK} Hz ticks) of the nginx master and workers and of keyholdd over the measured segments; cross-checked with the run time of all their threads from /proc/PID/task/*/schedstat (ns)"
  echo
} >"$T/header.md"
cat "$T/header.md"

for c in "${WANT[@]}"; do
  before="$(ticks "$SIGNING_PID")"
  "$LOAD" --port "${PORT_OF[$c]}" --seconds "$WARMUP" --threads "$THREADS" --tls "$TLS" \
    --cafile "$T/keys/${c#*-}.crt" >/dev/null
  # Guard: a keyhold configuration must really sign in keyholdd (or, with
  # --floor, in the floor signer).
  if [[ "$c" == keyhold-* ]] && [ "$(ticks "$SIGNING_PID")" -le "$before" ]; then
    die "$c: pid $SIGNING_PID used no CPU during the warm-up; is nginx signing with the provider?"
  fi
done
HALF="$(calc "$SECONDS_PER / 2" %.3f)"
in_list() { [[ ",$CONFIGS," == *",$1,"* ]]; }
for type in ec-p256 rsa-2048; do
  if [ "$type" = ec-p256 ]; then
    order=("file-$type" "keyhold-$type" "keyhold-$type" "file-$type")
  else
    order=("keyhold-$type" "file-$type" "file-$type" "keyhold-$type")
  fi
  for c in "${order[@]}"; do
    if in_list "$c"; then run_load "$c" "$HALF"; fi
  done
done

us_per() {  # us_per TICKS HANDSHAKES
  if [ "$2" -eq 0 ]; then echo "-"; else
    calc "$1 * 1000000 / $CLK_TCK / $2" %.0f; fi
}
echo "| config | protocol | handshakes | failures | handshakes/s | nginx µs/hs | keyholdd µs/hs | server µs/hs | ratio keyhold/file (server µs/hs) | server µs/hs, schedstat | ratio, schedstat | load generator µs/hs |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
declare -A TOTAL_US
failed=0
for type in ec-p256 rsa-2048; do
  for c in "file-$type" "keyhold-$type"; do
    in_list "$c" || continue
    h=${HS[$c]}
    total="$(us_per $(( NG[$c] + KH[$c] )) "$h")"
    TOTAL_US[$c]="$total"
    ratio=""
    if [[ "$c" == keyhold-* ]] && [ -n "${TOTAL_US[file-$type]:-}" ] &&
        [ "${TOTAL_US[file-$type]}" != "-" ] && [ "$total" != "-" ]; then
      ratio="$(calc "(${NG[$c]} + ${KH[$c]}) / $h / ((${NG[file-$type]} + ${KH[file-$type]}) / ${HS[file-$type]})" %.2f)×"
    fi
    sched="-"
    sratio=""
    if [ "$h" -gt 0 ]; then sched="$(calc "${SCHED[$c]} / 1000 / $h" %.0f)"; fi
    if [[ "$c" == keyhold-* ]] && [ "${HS[file-$type]:-0}" -gt 0 ] && [ "$h" -gt 0 ]; then
      sratio="$(calc "${SCHED[$c]} / $h / (${SCHED[file-$type]} / ${HS[file-$type]})" %.2f)×"
    fi
    cli="-"
    if [ "$h" -gt 0 ]; then cli="$(calc "${CLI[$c]} * 1000000 / $h" %.0f)"; fi
    printf '| %s | %s | %d | %d | %.0f | %s | %s | %s | %s | %s | %s | %s |\n' "$c" "${PROTO[$c]}" \
      "$h" "${FAIL[$c]}" "$(calc "$h / ${WALL[$c]}")" "$(us_per "${NG[$c]}" "$h")" \
      "$(us_per "${KH[$c]}" "$h")" "$total" "$ratio" "$sched" "$sratio" "$cli"
    if [ "${FAIL[$c]}" -ne 0 ]; then
      failed=1
      echo "nginx_bench: $c: ${FAIL[$c]} failures, first: ${ERR[$c]:-}" >&2
    fi
    if [ "${RESUMED[$c]}" -ne 0 ]; then
      failed=1
      echo "nginx_bench: $c: ${RESUMED[$c]} resumed sessions" >&2
    fi
  done
done
echo
echo "Targets (issue 3): server CPU per handshake with keyhold ≤ 1.05× the file key for rsa-2048, ≤ 1.25× for ec-p256."
if grep -qE '\[(crit|alert|emerg)\]' "$T/nginx/logs/error.log"; then
  echo "nginx_bench: nginx logged errors:" >&2
  grep -E '\[(error|crit|alert|emerg)\]' "$T/nginx/logs/error.log" | tail -5 >&2
  failed=1
fi
exit "$failed"
