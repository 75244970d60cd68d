#!/bin/bash
# nginx 1.22 and curl, unmodified, with keys held by keyholdd through the
# OpenSSL provider: the server key belongs to root and is granted to
# www-data, nginx's master (root) reads a key reference file and its workers
# (www-data) sign; curl authenticates with a client key reference file.
source "$(dirname "$0")/../lib.sh"
: "${KEYHOLD_PROVIDER:?path to keyhold.so}"
KEYHOLD_PROVIDER="$(realpath "$KEYHOLD_PROVIDER")"

if ! command -v nginx >/dev/null || ! command -v curl >/dev/null || ! id www-data >/dev/null 2>&1 ||
    [ "$(id -u)" -ne 0 ]; then
  echo "SKIP: needs root, nginx, curl and the www-data user"
  exit 77
fi

W="$KH_DIR/work"
mkdir -p "$W"
CNF="$KH_DIR/openssl-keyhold.cnf"
sed "s|^# module = .*|module = $KEYHOLD_PROVIDER|" \
  "$(dirname "$0")/../../conf/openssl-keyhold.cnf" >"$CNF"
chmod 644 "$CNF"
plain() { env -u OPENSSL_CONF -u OPENSSL_MODULES openssl "$@"; }

NGINX_PID=""
stop_nginx() {
  if [ -n "$NGINX_PID" ]; then
    kill "$NGINX_PID" 2>/dev/null || true
    wait "$NGINX_PID" 2>/dev/null || true
    NGINX_PID=""
  fi
}
trap 'stop_nginx; kh_cleanup' EXIT

kh_start
check "create the server key" "$KEYHOLD" key create web --type ec-p256
check "grant it to www-data" "$KEYHOLD" key grant web --user www-data
check "create the rsa server key" "$KEYHOLD" key create web-rsa --type rsa-2048
check "grant it to www-data" "$KEYHOLD" key grant web-rsa --user www-data
check "create the client key" "$KEYHOLD" key create client --type ec-p256
"$KEYHOLD" key ref web >"$W/web.ref.pem"
"$KEYHOLD" key ref web-rsa >"$W/web-rsa.ref.pem"
"$KEYHOLD" key ref client >"$W/client.ref.pem"
check "server certificate" env OPENSSL_CONF="$CNF" openssl req -new -x509 -key "$W/web.ref.pem" \
  -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 -days 1 -out "$W/web.crt"
check "rsa server certificate" env OPENSSL_CONF="$CNF" openssl req -new -x509 \
  -key "$W/web-rsa.ref.pem" -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 -days 1 \
  -out "$W/web-rsa.crt"
check "client certificate" env OPENSSL_CONF="$CNF" openssl req -new -x509 \
  -key "$W/client.ref.pem" -subj /CN=client -days 1 -out "$W/client.crt"

P1=$(kh_free_port 4)
P2=$((P1 + 1))
P3=$((P1 + 2))
P4=$((P1 + 3))
mkdir -p "$KH_DIR/nginx/logs"
cat >"$KH_DIR/nginx/nginx.conf" <<CONF
user www-data;
worker_processes 2;
worker_cpu_affinity auto;  # docs/openssl.md: keyholdd serves each on its CPU
daemon off;
pid $KH_DIR/nginx/nginx.pid;
error_log $KH_DIR/nginx/logs/error.log warn;
env OPENSSL_CONF;
env KEYHOLD_SOCKET;
events { worker_connections 64; }
http {
  access_log $KH_DIR/nginx/logs/access.log;
  client_body_temp_path $KH_DIR/nginx/body;
  proxy_temp_path $KH_DIR/nginx/proxy;
  fastcgi_temp_path $KH_DIR/nginx/fastcgi;
  uwsgi_temp_path $KH_DIR/nginx/uwsgi;
  scgi_temp_path $KH_DIR/nginx/scgi;
  ssl_session_cache off;
  ssl_session_tickets off;
  # nginx 1.22's built-in default stops at TLS 1.2 (Debian's nginx.conf
  # adds TLSv1.3; this file does not include it).
  ssl_protocols TLSv1.2 TLSv1.3;
  server {
    listen 127.0.0.1:$P1 ssl;
    ssl_certificate $W/web.crt;
    ssl_certificate_key $W/web.ref.pem;
    location / { return 200 "ok\n"; }
  }
  server {
    listen 127.0.0.1:$P2 ssl;
    ssl_certificate $W/web-rsa.crt;
    ssl_certificate_key $W/web-rsa.ref.pem;
    location / { return 200 "ok\n"; }
  }
  server {
    listen 127.0.0.1:$P3 ssl;
    ssl_certificate $W/web.crt;
    ssl_certificate_key $W/web.ref.pem;
    ssl_verify_client on;
    ssl_client_certificate $W/client.crt;
    location / { return 200 "client \$ssl_client_s_dn\n"; }
  }
  server {
    listen 127.0.0.1:$P4 ssl;
    ssl_certificate $W/web.crt;
    ssl_certificate_key $W/web.ref.pem;
    ssl_session_tickets on;
    location / { return 200 "ok\n"; }
  }
}
CONF

OPENSSL_CONF="$CNF" nginx -p "$KH_DIR/nginx" -c "$KH_DIR/nginx/nginx.conf" \
  2>>"$KH_DIR/nginx/logs/error.log" &
NGINX_PID=$!
up() { curl -s -o /dev/null --cacert "$W/web.crt" "https://127.0.0.1:$P1/"; }
for _ in $(seq 1 100); do up && break; sleep 0.05; done
check "nginx workers run as www-data" sh -c "ps -o user= --ppid $NGINX_PID | grep -q www-data"

# Plain curl (no provider): every request is a full handshake signed by a
# worker running as www-data.
many() {  # many PORT CERT COUNT: all responses 200
  local port="$1" cert="$2" count="$3" codes
  codes=$(for _ in $(seq 1 "$count"); do
    env -u OPENSSL_CONF curl -s -o /dev/null -w '%{http_code}\n' --cacert "$cert" \
      "https://127.0.0.1:$port/"
  done | sort | uniq -c)
  echo "$codes"
  [ "$(echo "$codes" | awk '{print $2}')" = "200" ]
}
check "200 HTTPS requests (ec-p256, TLS 1.3) all 200" many "$P1" "$W/web.crt" 200
check "100 HTTPS requests (rsa-2048) all 200" many "$P2" "$W/web-rsa.crt" 100
check "TLS 1.2 requests all 200" sh -c "for i in \$(seq 1 20); do
    env -u OPENSSL_CONF curl -sf --tls-max 1.2 --cacert '$W/web.crt' https://127.0.0.1:$P1/ >/dev/null || exit 1
  done"

# worker_cpu_affinity pins each worker to one CPU; keyholdd serves a pinned
# worker on that CPU (cpu_local_sessions). Skipped on a single CPU.
if [ "$(nproc)" -ge 2 ]; then
  check "keyholdd serves each pinned worker on its own CPU" sh -c "
    for w in \$(pgrep -P $NGINX_PID); do
      cpu=\$(taskset -c -p \$w | sed 's/.*: //')
      grep -q \"pid \$w, served on its CPU \$cpu\\\$\" '$KH_DIR/keyholdd.log' || exit 1
    done"
fi

# curl mutual TLS with a key reference file (curl loads the provider).
check "curl --cert --key client.ref.pem authenticates" sh -c \
  "OPENSSL_CONF='$CNF' curl -sf --cacert '$W/web.crt' --cert '$W/client.crt' \
     --key '$W/client.ref.pem' https://127.0.0.1:$P3/ | grep -q 'client CN=client'"
check "without the client key the server refuses" sh -c \
  "! env -u OPENSSL_CONF curl -sf --cacert '$W/web.crt' https://127.0.0.1:$P3/ >/dev/null"

# docs/openssl.md: a resumed session makes no signature. One full TLS 1.3
# handshake (one more signature in the audit log), then the same session
# resumed from its ticket (none).
signs() { grep -c '"op":"sign"' "$KH_DIR/state/audit.log"; }
session() {  # session new|reused ARGS...: GET / with plain openssl s_client
  local want="$1"
  shift
  printf 'GET / HTTP/1.0\r\n\r\n' | env -u OPENSSL_CONF openssl s_client -tls1_3 \
    -connect "127.0.0.1:$P4" -CAfile "$W/web.crt" -verify_return_error -ign_eof "$@" \
    >"$W/session.out" 2>&1
  grep -E '^(New|Reused),|HTTP/1' "$W/session.out"
  grep -q "^$want, TLSv1.3" "$W/session.out" && grep -q '^HTTP/1.1 200' "$W/session.out"
}
S0=$(signs)
check "full handshake with a session ticket (ec-p256, TLS 1.3)" \
  session New -sess_out "$W/sess.pem"
S1=$(signs)
check "the session resumed from its ticket" session Reused -sess_in "$W/sess.pem"
S2=$(signs)
check "the full handshake signed once, the resumed one not at all ($S0, $S1, $S2)" \
  test "$((S1 - S0))" -eq 1 -a "$S2" -eq "$S1"

# Reload under load: three clients at once.
LOADS=()
for c in 1 2 3; do
  (for _ in $(seq 1 40); do
     env -u OPENSSL_CONF curl -s -o /dev/null -w '%{http_code}\n' --cacert "$W/web.crt" \
       "https://127.0.0.1:$P1/"
   done >"$W/load-$c.codes") &
  LOADS+=($!)
done
sleep 0.3
check "nginx -s reload" env OPENSSL_CONF="$CNF" nginx -p "$KH_DIR/nginx" -c "$KH_DIR/nginx/nginx.conf" -s reload
for p in "${LOADS[@]}"; do wait "$p"; done
check "every request during the reload got 200 (3 x 40)" sh -c \
  "[ \"\$(cat '$W'/load-*.codes | sort -u)\" = 200 ] && [ \$(cat '$W'/load-*.codes | wc -l) = 120 ]"

ERRORS='\[(error|crit|alert|emerg)\]'
check "no errors in nginx's log before the daemon restart" sh -c \
  "! grep -E '$ERRORS' '$KH_DIR/nginx/logs/error.log'"
# Daemon restart: while keyholdd is down a handshake fails at once (no hang)
# and the workers survive; once it is back nginx serves again without a
# restart of its own.
kh_stop
check "a request while keyholdd is down fails without hanging" sh -c \
  "rc=0; timeout 20 env -u OPENSSL_CONF curl -s -o /dev/null --cacert '$W/web.crt' \
     https://127.0.0.1:$P1/ || rc=\$?; [ \$rc -ne 0 ] && [ \$rc -ne 124 ]"
check "nginx's workers survived it" sh -c "[ \$(pgrep -c -P $NGINX_PID) -ge 2 ]"
OFFSET=$(stat -c %s "$KH_DIR/nginx/logs/error.log")
# It comes back with docs/openssl.md's setting for a busy server.
echo "audit_key_use_per_minute = true" >"$KH_DIR/busy.toml"
chmod 600 "$KH_DIR/busy.toml"
kh_start --config "$KH_DIR/busy.toml"
check "requests after a daemon restart all 200" many "$P1" "$W/web.crt" 20
kh_stop  # a clean stop writes the pending counts
check "with audit_key_use_per_minute the 20 signatures are counted, per worker" \
  python3 - "$KH_DIR/state/audit.log" <<'PY'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
counted = [r for r in recs if "count" in r]
print([(r["pid"], r["exe"], r["op"], r["key"], r["count"]) for r in counted])
assert sum(r["count"] for r in counted) == 20
assert len(counted) <= 4  # one per worker, two if a minute began meanwhile
assert all(r["op"] == "sign" and r["key"] == "0/web" and r["result"] == "ok"
           and r["exe"].endswith("/nginx") for r in counted)
PY

check "nginx logged at least 400 requests answered 200" sh -c \
  "[ \$(grep -c '\" 200 ' '$KH_DIR/nginx/logs/access.log') -ge 400 ]"
check "no errors in nginx's log after the daemon restart" sh -c \
  "! tail -c +$((OFFSET + 1)) '$KH_DIR/nginx/logs/error.log' | grep -E '$ERRORS'"
stop_nginx
kh_summary
