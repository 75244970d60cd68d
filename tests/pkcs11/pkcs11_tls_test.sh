#!/bin/bash
# TLS client authentication with a keyhold key through libkeyhold-pkcs11.so:
# GnuTLS's gnutls-cli loads the module and presents a client certificate
# whose private key stays in keyholdd, to a plain
# `openssl s_server -Verify 1 -verify_return_error` on 127.0.0.1. For
# ec-p256 and rsa-2048 keys, with TLS 1.3 and TLS 1.2; a key of another
# name and a missing key make the client fail cleanly.
#
# The client certificates are issued by a test CA kept in files, for the
# public key `keyhold key public` prints (openssl x509 -force_pubkey), so the
# private key is never needed outside the daemon.
source "$(dirname "$0")/../lib.sh"
: "${KEYHOLD_PKCS11:?path to libkeyhold-pkcs11.so}"
M="$(realpath "$KEYHOLD_PKCS11")"
kh_start
W="$KH_DIR/work"
mkdir -p "$W"
SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap 'stop_server; kh_cleanup' EXIT

plain() { env -u OPENSSL_CONF -u OPENSSL_MODULES openssl "$@"; }
contains() { grep -q -- "$2" "$1" 2>/dev/null; }
# Signatures keyholdd has made so far (its debug log has one line each).
signs() { grep -c "op sign for uid .*: ok" "$KH_DIR/keyholdd.log" || true; }

# Test CA, server certificate (127.0.0.1), and a throwaway key that only
# signs the CSRs (its public key is replaced by the keyhold key's).
plain req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$W/ca.key" -out "$W/ca.pem" -subj "/CN=keyhold test CA" -days 2 \
  2>/dev/null
plain req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$W/server.key" -out "$W/server.csr" -subj "/CN=localhost" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' \
  >"$W/server.ext"
plain x509 -req -in "$W/server.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" \
  -CAcreateserial -days 2 -extfile "$W/server.ext" -out "$W/server.pem" 2>/dev/null
plain genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$W/dummy.key"
printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n' >"$W/client.ext"

for t in ec-p256 rsa-2048; do
  check "create k-$t" "$KEYHOLD" key create "k-$t" --type "$t"
  "$KEYHOLD" key public "k-$t" >"$W/k-$t.pub"
  plain req -new -key "$W/dummy.key" -subj "/CN=k-$t" -out "$W/k-$t.csr"
  check "CA issues a client certificate for k-$t" \
    plain x509 -req -in "$W/k-$t.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" \
    -CAserial "$W/ca.srl" -days 2 -extfile "$W/client.ext" \
    -force_pubkey "$W/k-$t.pub" -out "$W/k-$t.pem"
  check "certificate of k-$t holds the daemon's public key" sh -c \
    "openssl x509 -in '$W/k-$t.pem' -noout -pubkey | cmp - '$W/k-$t.pub'"
done
check "create k-other" "$KEYHOLD" key create k-other --type ec-p256

PORT=$(kh_free_port)
# -www answers "GET /" with a page naming the protocol and the client
# certificate; -Verify 1 -verify_return_error refuses clients without a
# certificate the CA issued, or whose CertificateVerify does not check out.
# Not through plain(): $! must be openssl's own pid (env execs it), so that
# stop_server stops the server and not a subshell.
env -u OPENSSL_CONF -u OPENSSL_MODULES openssl s_server -accept "127.0.0.1:$PORT" \
  -cert "$W/server.pem" \
  -key "$W/server.key" -CAfile "$W/ca.pem" -Verify 1 -verify_return_error \
  -www >"$W/s_server.log" 2>&1 </dev/null &
SERVER_PID=$!
for _ in $(seq 1 100); do
  if contains "$W/s_server.log" ACCEPT; then break; fi
  sleep 0.05
done
check "s_server is listening" contains "$W/s_server.log" ACCEPT

# gnutls_client VERSION KEY_OBJECT CERT: one request; the server's page
# lands in $KH_DIR/out.
gnutls_client() {
  local version="$1" object="$2" cert="$3"
  # At the end of its input gnutls-cli still reads the answer, until the
  # server closes the connection (s_server -www does after one page).
  printf 'GET / HTTP/1.0\r\n\r\n' |
    timeout 20 gnutls-cli --provider "$M" --x509cafile "$W/ca.pem" \
      --x509certfile "$cert" \
      --x509keyfile "pkcs11:token=keyhold;object=$object;type=private" \
      --priority "NORMAL:-VERS-ALL:+VERS-$version" -p "$PORT" 127.0.0.1
}

for t in ec-p256 rsa-2048; do
  for v in TLS1.3 TLS1.2; do
    before=$(signs)
    check "gnutls-cli $v with k-$t" gnutls_client "$v" "k-$t" "$W/k-$t.pem"
    cp "$KH_DIR/out" "$W/page-$t-$v"
    cp "$KH_DIR/err" "$W/err-$t-$v"
    check "$v k-$t: keyholdd made the CertificateVerify signature" \
      test "$(signs)" -gt "$before"
    check "$v k-$t: handshake completed" sh -c \
      "grep -q 'Handshake was completed' '$W/page-$t-$v' '$W/err-$t-$v'"
    want=${v/TLS1./TLSv1.}
    check "$v k-$t: the server saw $want" contains "$W/page-$t-$v" "Protocol *: *$want\$"
    check "$v k-$t: the server saw the client certificate" \
      contains "$W/page-$t-$v" "^Client certificate"
    check "$v k-$t: ... for CN=k-$t" contains "$W/page-$t-$v" "Subject: CN *= *k-$t"
  done
done

# The right certificate with another key: the client cannot prove
# possession, so no page and a non-zero exit, within the timeout.
for v in TLS1.3 TLS1.2; do
  rc=0
  gnutls_client "$v" k-other "$W/k-ec-p256.pem" >"$W/neg.out" 2>"$W/neg.err" || rc=$?
  check "$v: key of another name fails (exit $rc)" test "$rc" -ne 0 -a "$rc" -ne 124
  check "$v: ... and gets no page" sh -c "! grep -q '^Client certificate' '$W/neg.out'"
done
rc=0
gnutls_client TLS1.3 k-missing "$W/k-ec-p256.pem" >"$W/neg.out" 2>"$W/neg.err" || rc=$?
check "missing key fails (exit $rc)" test "$rc" -ne 0 -a "$rc" -ne 124
check "... and gets no page" sh -c "! grep -q '^Client certificate' '$W/neg.out'"
# The server is still fine.
check "gnutls-cli after the failures" gnutls_client TLS1.3 k-ec-p256 "$W/k-ec-p256.pem"
check "... is authenticated" contains "$KH_DIR/out" "Subject: CN *= *k-ec-p256"

stop_server
kh_summary
