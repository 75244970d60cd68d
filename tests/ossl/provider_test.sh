#!/bin/bash
# The OpenSSL provider keyhold.so against a real keyholdd, driven by the
# unmodified openssl CLI. Every signature is verified, every ciphertext made
# and every shared secret cross-checked by a plain openssl that never loads
# keyhold (no OPENSSL_CONF, no OPENSSL_MODULES).
source "$(dirname "$0")/../lib.sh"
: "${KEYHOLD_PROVIDER:?path to keyhold.so}"
KEYHOLD_PROVIDER="$(realpath "$KEYHOLD_PROVIDER")"

W="$KH_DIR/work"
mkdir -p "$W"
CNF="$KH_DIR/openssl-keyhold.cnf"
# conf/openssl-keyhold.cnf with the module path of this build.
sed "s|^# module = .*|module = $KEYHOLD_PROVIDER|" \
  "$(dirname "$0")/../../conf/openssl-keyhold.cnf" >"$CNF"

kossl() { OPENSSL_CONF="$CNF" openssl "$@"; }
plain() { env -u OPENSSL_CONF -u OPENSSL_MODULES openssl "$@"; }

# fails_with "description" "expected text" command...: the command must exit
# non-zero, print the text on stderr, and not crash (exit status < 128).
fails_with() {
  local what="$1" expected="$2"
  shift 2
  local rc=0
  timeout 30 "$@" >"$KH_DIR/out" 2>"$KH_DIR/err" || rc=$?
  if [ "$rc" -eq 0 ] || [ "$rc" -ge 124 ] || ! grep -q -- "$expected" "$KH_DIR/err"; then
    KH_FAILED=$((KH_FAILED + 1))
    echo "FAIL: $what (exit $rc, expected failure saying '$expected')" >&2
    sed 's/^/  stderr: /' "$KH_DIR/err" >&2
    return
  fi
  KH_PASSED=$((KH_PASSED + 1))
}

kh_start
head -c 10000 /dev/urandom >"$W/msg"

check "openssl list -providers shows keyhold" sh -c \
  "OPENSSL_CONF='$CNF' openssl list -providers | grep -A3 '^  keyhold' | grep -q 'status: active'"
# Lazy: loading the provider, and work that never touches a keyhold key,
# open no connection to the daemon (whose debug log names every client pid).
connected() { grep -Eq "connection from uid [0-9]+ pid $1(,|\$)" "$KH_DIR/keyholdd.log"; }
OPENSSL_CONF="$CNF" openssl list -providers >/dev/null &
P1=$!
wait "$P1"
OPENSSL_CONF="$CNF" openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
  -out "$W/lazy.key" &
P2=$!
wait "$P2"
OPENSSL_CONF="$CNF" openssl dgst -sha256 -sign "$W/lazy.key" -out "$W/lazy.sig" "$W/msg" &
P3=$!
wait "$P3"
OPENSSL_CONF="$CNF" openssl pkey -in keyhold:nosuchkey -pubout >/dev/null 2>&1 &
P4=$!
wait "$P4" || true
sleep 0.2
c1=no c23=no c4=no
connected "$P1" && c1=yes
{ connected "$P2" || connected "$P3"; } && c23=yes
connected "$P4" && c4=yes
check "loading the provider connects nowhere (list -providers)" test "$c1" = no
check "file keys with the provider loaded connect nowhere" test -s "$W/lazy.sig" -a "$c23" = no
check "(a keyhold: URI does connect: the log names its pid)" test "$c4" = yes

for type in ec-p256 ec-p384 ec-p521 rsa-2048 rsa-3072 ed25519 x25519; do
  check "create $type" "$KEYHOLD" key create "k-$type" --type "$type"
  "$KEYHOLD" key public "k-$type" >"$W/k-$type.pub"
  check "pkey -pubout $type equals keyhold key public" sh -c \
    "OPENSSL_CONF='$CNF' openssl pkey -in keyhold:k-$type -pubout | cmp - '$W/k-$type.pub'"
done

check "storeutl -keys keyhold: lists every key" sh -c \
  "OPENSSL_CONF='$CNF' openssl storeutl -keys keyhold: | grep -q 'Total found: 7'"

# --- signatures ---
for type in ec-p256 ec-p384 ec-p521 rsa-2048 rsa-3072; do
  for d in sha256 sha384 sha512; do
    check "dgst -$d -sign $type" kossl dgst "-$d" -sign "keyhold:k-$type" -out "$W/sig" "$W/msg"
    check "plain openssl verifies dgst $type $d" plain dgst "-$d" -verify "$W/k-$type.pub" \
      -signature "$W/sig" "$W/msg"
  done
  plain dgst -sha256 -binary "$W/msg" >"$W/msg.sha256"
  check "pkeyutl -sign (raw digest) $type" kossl pkeyutl -sign -inkey "keyhold:k-$type" \
    -pkeyopt digest:sha256 -in "$W/msg.sha256" -out "$W/sig"
  check "plain openssl verifies pkeyutl $type" plain pkeyutl -verify -pubin -inkey "$W/k-$type.pub" \
    -pkeyopt digest:sha256 -in "$W/msg.sha256" -sigfile "$W/sig"
  check "pkeyutl -sign -rawin -digest sha384 $type" kossl pkeyutl -sign -rawin -digest sha384 \
    -inkey "keyhold:k-$type" -in "$W/msg" -out "$W/sig"
  check "plain openssl verifies pkeyutl -rawin $type" plain dgst -sha384 -verify "$W/k-$type.pub" \
    -signature "$W/sig" "$W/msg"
done

check "pkeyutl -sign ec-p256 without digest option" kossl pkeyutl -sign -inkey keyhold:k-ec-p256 \
  -in "$W/msg.sha256" -out "$W/sig"
check "plain openssl verifies it" plain pkeyutl -verify -pubin -inkey "$W/k-ec-p256.pub" \
  -in "$W/msg.sha256" -sigfile "$W/sig"

# RSA-PSS: salt lengths and MGF1 digests.
for salt in digest max 20; do
  for mgf in sha256 sha512; do
    check "dgst rsa-pss salt=$salt mgf1=$mgf" kossl dgst -sha256 -sigopt rsa_padding_mode:pss \
      -sigopt "rsa_pss_saltlen:$salt" -sigopt "rsa_mgf1_md:$mgf" -sign keyhold:k-rsa-2048 \
      -out "$W/sig" "$W/msg"
    check "plain openssl verifies rsa-pss salt=$salt mgf1=$mgf" plain dgst -sha256 \
      -sigopt rsa_padding_mode:pss -sigopt "rsa_pss_saltlen:$salt" -sigopt "rsa_mgf1_md:$mgf" \
      -verify "$W/k-rsa-2048.pub" -signature "$W/sig" "$W/msg"
  done
done
check "pkeyutl rsa-pss" kossl pkeyutl -sign -inkey keyhold:k-rsa-3072 -pkeyopt digest:sha256 \
  -pkeyopt rsa_padding_mode:pss -pkeyopt rsa_pss_saltlen:digest -in "$W/msg.sha256" -out "$W/sig"
check "plain openssl verifies pkeyutl rsa-pss" plain pkeyutl -verify -pubin \
  -inkey "$W/k-rsa-3072.pub" -pkeyopt digest:sha256 -pkeyopt rsa_padding_mode:pss \
  -pkeyopt rsa_pss_saltlen:digest -in "$W/msg.sha256" -sigfile "$W/sig"

check "pkeyutl -sign -rawin ed25519" kossl pkeyutl -sign -rawin -inkey keyhold:k-ed25519 \
  -in "$W/msg" -out "$W/sig"
check "plain openssl verifies ed25519" plain pkeyutl -verify -rawin -pubin \
  -inkey "$W/k-ed25519.pub" -in "$W/msg" -sigfile "$W/sig"

# Verify and encrypt with the keyhold key itself (its public half, in the
# default provider): the URI as a public key (dgst -verify), as a private
# key (pkeyutl -verify/-encrypt -inkey). A changed message must fail.
printf 'tampered' >>"$W/msg.bad"
cat "$W/msg" "$W/msg.bad" >"$W/msg.changed"
for type in ec-p256 rsa-2048; do
  check "dgst -sign $type for verify" kossl dgst -sha256 -sign "keyhold:k-$type" -out "$W/sig" "$W/msg"
  check "dgst -verify keyhold:k-$type" kossl dgst -sha256 -verify "keyhold:k-$type" \
    -signature "$W/sig" "$W/msg"
  check "dgst -verify keyhold:k-$type refuses a changed message" sh -c \
    "! OPENSSL_CONF='$CNF' openssl dgst -sha256 -verify keyhold:k-$type -signature '$W/sig' \
       '$W/msg.changed' >/dev/null 2>&1"
  check "dgst -prverify keyhold:k-$type" kossl dgst -sha256 -prverify "keyhold:k-$type" \
    -signature "$W/sig" "$W/msg"
done
check "dgst -sign rsa-pss for verify" kossl dgst -sha256 -sigopt rsa_padding_mode:pss \
  -sigopt rsa_pss_saltlen:max -sign keyhold:k-rsa-2048 -out "$W/sig" "$W/msg"
check "dgst -verify rsa-pss with keyhold:k-rsa-2048" kossl dgst -sha256 \
  -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:max -verify keyhold:k-rsa-2048 \
  -signature "$W/sig" "$W/msg"
check "pkeyutl -sign -rawin ed25519 for verify" kossl pkeyutl -sign -rawin \
  -inkey keyhold:k-ed25519 -in "$W/msg" -out "$W/sig"
check "pkeyutl -verify -rawin -inkey keyhold:k-ed25519" kossl pkeyutl -verify -rawin \
  -inkey keyhold:k-ed25519 -in "$W/msg" -sigfile "$W/sig"
check "pkeyutl -verify ed25519 refuses a changed message" sh -c \
  "! OPENSSL_CONF='$CNF' openssl pkeyutl -verify -rawin -inkey keyhold:k-ed25519 \
     -in '$W/msg.changed' -sigfile '$W/sig' >/dev/null 2>&1"
head -c 32 /dev/urandom >"$W/plain"
check "pkeyutl -encrypt -inkey keyhold:k-rsa-2048 (PKCS#1 v1.5)" kossl pkeyutl -encrypt \
  -inkey keyhold:k-rsa-2048 -in "$W/plain" -out "$W/ct"
check "it decrypts in the daemon" sh -c \
  "OPENSSL_CONF='$CNF' openssl pkeyutl -decrypt -inkey keyhold:k-rsa-2048 -in '$W/ct' | cmp - '$W/plain'"
check "pkeyutl -encrypt -inkey keyhold:k-rsa-2048 (OAEP SHA-256, label)" kossl pkeyutl -encrypt \
  -inkey keyhold:k-rsa-2048 -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 \
  -pkeyopt rsa_oaep_label:00112233 -in "$W/plain" -out "$W/ct"
check "the OAEP ciphertext decrypts in the daemon" sh -c \
  "OPENSSL_CONF='$CNF' openssl pkeyutl -decrypt -inkey keyhold:k-rsa-2048 \
     -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 \
     -pkeyopt rsa_oaep_label:00112233 -in '$W/ct' | cmp - '$W/plain'"

# --- decrypt and derive ---
head -c 32 /dev/urandom >"$W/plain"
for oaep in sha1 sha256; do
  plain pkeyutl -encrypt -pubin -inkey "$W/k-rsa-2048.pub" -pkeyopt rsa_padding_mode:oaep \
    -pkeyopt "rsa_oaep_md:$oaep" -pkeyopt "rsa_mgf1_md:$oaep" -pkeyopt rsa_oaep_label:6b6579686f6c64 \
    -in "$W/plain" -out "$W/ct"
  rm -f "$W/dec"
  check "decrypt oaep $oaep with label" kossl pkeyutl -decrypt -inkey keyhold:k-rsa-2048 \
    -pkeyopt rsa_padding_mode:oaep -pkeyopt "rsa_oaep_md:$oaep" -pkeyopt "rsa_mgf1_md:$oaep" \
    -pkeyopt rsa_oaep_label:6b6579686f6c64 -in "$W/ct" -out "$W/dec"
  check "oaep $oaep plaintext matches" cmp "$W/plain" "$W/dec"
done
plain pkeyutl -encrypt -pubin -inkey "$W/k-rsa-2048.pub" -pkeyopt rsa_padding_mode:pkcs1 \
  -in "$W/plain" -out "$W/ct"
rm -f "$W/dec"
check "decrypt pkcs1" kossl pkeyutl -decrypt -inkey keyhold:k-rsa-2048 -in "$W/ct" -out "$W/dec"
check "pkcs1 plaintext matches" cmp "$W/plain" "$W/dec"

for type in ec-p256 ec-p384 x25519; do
  case "$type" in
    ec-p256) plain genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$W/peer.key" ;;
    ec-p384) plain genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$W/peer.key" ;;
    x25519) plain genpkey -algorithm X25519 -out "$W/peer.key" ;;
  esac
  plain pkey -in "$W/peer.key" -pubout -out "$W/peer.pub"
  check "pkeyutl -derive $type" kossl pkeyutl -derive -inkey "keyhold:k-$type" \
    -peerkey "$W/peer.pub" -out "$W/ss1"
  check "plain openssl derives the same secret ($type)" sh -c \
    "env -u OPENSSL_CONF openssl pkeyutl -derive -inkey '$W/peer.key' -peerkey '$W/k-$type.pub' -out '$W/ss2' && cmp '$W/ss1' '$W/ss2'"
done

# --- X.509 ---
for type in ec-p256 rsa-2048 ed25519; do
  check "req -new -x509 $type" kossl req -new -x509 -key "keyhold:k-$type" -subj /CN=test \
    -days 2 -out "$W/c-$type.pem"
  check "plain openssl verifies the self-signed $type certificate" plain verify \
    -CAfile "$W/c-$type.pem" "$W/c-$type.pem"
  check "certificate holds the $type key" sh -c \
    "env -u OPENSSL_CONF openssl x509 -in '$W/c-$type.pem' -noout -pubkey | cmp - '$W/k-$type.pub'"
  check "req -new $type" kossl req -new -key "keyhold:k-$type" -subj /CN=csr -out "$W/r-$type.csr"
  check "plain openssl verifies the $type CSR" plain req -verify -noout -in "$W/r-$type.csr"
done
# A CA key in the daemon signs a CSR made by plain openssl.
plain req -new -newkey EC -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/leaf.key" \
  -subj /CN=leaf -out "$W/leaf.csr" 2>/dev/null
check "x509 -req -CAkey keyhold:" kossl x509 -req -in "$W/leaf.csr" -CA "$W/c-ec-p256.pem" \
  -CAkey keyhold:k-ec-p256 -CAcreateserial -days 1 -out "$W/leaf.pem"
check "plain openssl verifies the leaf against the keyhold CA" plain verify \
  -CAfile "$W/c-ec-p256.pem" "$W/leaf.pem"

# CMS: sign with a keyhold key, decrypt for a keyhold key (PKCS#1 v1.5).
for type in ec-p256 rsa-2048; do
  check "cms -sign with keyhold:k-$type" kossl cms -sign -in "$W/msg" -signer "$W/c-$type.pem" \
    -inkey "keyhold:k-$type" -binary -outform DER -out "$W/m.cms"
  check "plain openssl verifies the $type CMS signature" plain cms -verify -in "$W/m.cms" \
    -inform DER -CAfile "$W/c-$type.pem" -binary -content "$W/msg" -out /dev/null
done
plain cms -encrypt -in "$W/plain" -binary -outform DER -out "$W/e.cms" "$W/c-rsa-2048.pem"
rm -f "$W/dec"
check "cms -decrypt with keyhold:k-rsa-2048" kossl cms -decrypt -in "$W/e.cms" -inform DER \
  -recip "$W/c-rsa-2048.pem" -inkey keyhold:k-rsa-2048 -binary -out "$W/dec"
check "cms plaintext matches" cmp "$W/plain" "$W/dec"
for md in sha1 sha256; do
  plain cms -encrypt -in "$W/plain" -binary -outform DER -out "$W/e.cms" \
    -recip "$W/c-rsa-2048.pem" -keyopt rsa_padding_mode:oaep -keyopt "rsa_oaep_md:$md"
  rm -f "$W/dec"
  check "cms -decrypt (RSA-OAEP $md key transport) with keyhold:k-rsa-2048" kossl cms -decrypt \
    -in "$W/e.cms" -inform DER -recip "$W/c-rsa-2048.pem" -inkey keyhold:k-rsa-2048 -binary \
    -out "$W/dec"
  check "cms OAEP $md plaintext matches" cmp "$W/plain" "$W/dec"
done

# X.509 with RSASSA-PSS signatures from an rsaEncryption key in keyhold.
for salt in digest max; do
  check "req -x509 -sigopt rsa_padding_mode:pss (salt $salt)" kossl req -new -x509 \
    -key keyhold:k-rsa-2048 -sha256 -sigopt rsa_padding_mode:pss -sigopt "rsa_pss_saltlen:$salt" \
    -subj /CN=pss -days 1 -out "$W/pss-$salt.pem"
  check "the PSS ($salt) certificate says RSASSA-PSS" sh -c \
    "openssl x509 -in '$W/pss-$salt.pem' -noout -text | grep -q 'Signature Algorithm: rsassaPss'"
  check "plain openssl verifies the PSS ($salt) certificate" plain verify \
    -CAfile "$W/pss-$salt.pem" "$W/pss-$salt.pem"
done

# --- TLS ---
SRV_PID=""
start_server() {  # start_server PORT CERT KEY [extra s_server options]
  local port="$1" cert="$2" key="$3"
  shift 3
  : >"$W/srv.log"
  OPENSSL_CONF="$CNF" openssl s_server -accept "127.0.0.1:$port" -cert "$cert" -key "$key" \
    "$@" >"$W/srv.log" 2>&1 < <(sleep 60) &
  SRV_PID=$!
  for _ in $(seq 1 100); do
    grep -q ACCEPT "$W/srv.log" && return 0
    sleep 0.05
  done
  return 1
}
stop_server() {
  if [ -n "$SRV_PID" ]; then
    kill "$SRV_PID" 2>/dev/null || true
    wait "$SRV_PID" 2>/dev/null || true
    SRV_PID=""
  fi
}
tls_check() {  # tls_check PORT CERT EXPECTED_SIG client options...
  local port="$1" cert="$2" sig="$3"
  shift 3
  plain s_client -connect "127.0.0.1:$port" -verify_return_error -CAfile "$cert" "$@" \
    </dev/null >"$W/cli.log" 2>&1 || return 1
  grep -q "Verification: OK" "$W/cli.log" && grep -q "Peer signature type: $sig" "$W/cli.log"
}

port=$(kh_free_port 16)
for type in ec-p256 rsa-2048 ed25519; do
  case "$type" in ec-p256) sig=ECDSA ;; rsa-2048) sig=RSA-PSS ;; ed25519) sig=ed25519 ;; esac
  for v in tls1_3 tls1_2; do
    port=$((port + 1))
    check "s_server starts ($type $v)" start_server "$port" "$W/c-$type.pem" "keyhold:k-$type"
    check "TLS $v handshake with $type key in keyhold" tls_check "$port" "$W/c-$type.pem" "$sig" "-$v"
    stop_server
  done
done
port=$((port + 1))
check "s_server starts (rsa-2048 pkcs1 sigalg)" start_server "$port" "$W/c-rsa-2048.pem" keyhold:k-rsa-2048
check "TLS 1.2 handshake with RSA PKCS#1 v1.5 sigalg" tls_check "$port" "$W/c-rsa-2048.pem" RSA \
  -tls1_2 -sigalgs RSA+SHA256
stop_server

# TLS 1.2 RSA key transport: the premaster is decrypted in the daemon, which
# answers a bad padding with random bytes (no padding oracle); the handshake
# then fails at Finished.
for cipher in AES128-GCM-SHA256 AES256-SHA256; do
  port=$((port + 1))
  check "s_server starts (rsa-2048, RSA key transport $cipher)" start_server "$port" \
    "$W/c-rsa-2048.pem" keyhold:k-rsa-2048 -cipher "$cipher"
  check "TLS 1.2 RSA key transport handshake ($cipher)" sh -c \
    "printf 'hello over kRSA\\n' | env -u OPENSSL_CONF openssl s_client -connect 127.0.0.1:$port \
       -tls1_2 -cipher $cipher -verify_return_error -CAfile '$W/c-rsa-2048.pem' \
       >'$W/cli.log' 2>&1 && grep -q 'Cipher is $cipher' '$W/cli.log' &&
     grep -q 'Verification: OK' '$W/cli.log'"
  sleep 0.2
  check "the server read the client's data ($cipher)" grep -q "hello over kRSA" "$W/srv.log"
  stop_server
done

# Mutual TLS: keyhold key on the client side, plain openssl as the server.
port=$((port + 1))
plain req -new -x509 -newkey EC -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/srv.key" \
  -subj /CN=server -days 1 -out "$W/srv.pem" 2>/dev/null
: >"$W/srv.log"
env -u OPENSSL_CONF openssl s_server -accept "127.0.0.1:$port" -cert "$W/srv.pem" -key "$W/srv.key" \
  -Verify 1 -verify_return_error -CAfile "$W/c-rsa-2048.pem" >"$W/srv.log" 2>&1 < <(sleep 60) &
SRV_PID=$!
for _ in $(seq 1 100); do grep -q ACCEPT "$W/srv.log" && break; sleep 0.05; done
# In TLS 1.3 the client may finish before the server has checked its
# CertificateVerify; only data the server reads proves it accepted the
# client's signature (-verify_return_error drops the connection otherwise).
check "mutual TLS: s_client -key keyhold:k-rsa-2048" sh -c \
  "(printf 'hello from a keyhold client\\n'; sleep 0.5) | OPENSSL_CONF='$CNF' openssl s_client \
     -connect 127.0.0.1:$port -CAfile '$W/srv.pem' -verify_return_error \
     -cert '$W/c-rsa-2048.pem' -key keyhold:k-rsa-2048 >'$W/cli.log' 2>&1 &&
   grep -q 'Verification: OK' '$W/cli.log'"
sleep 0.2
check "plain s_server verified the client certificate" grep -q "CN = test" "$W/srv.log"
check "plain s_server read the client's data" grep -q "hello from a keyhold client" "$W/srv.log"
stop_server

# --- key reference files (keyhold key ref) ---
for type in ec-p256 rsa-2048 ed25519; do
  check "keyhold key ref $type" "$KEYHOLD" key ref "k-$type"
  cp "$KH_DIR/out" "$W/$type.ref.pem"
  check "$type reference file is a KEYHOLD KEY REFERENCE" grep -q "BEGIN KEYHOLD KEY REFERENCE" \
    "$W/$type.ref.pem"
  check "pkey -in $type.ref.pem -pubout equals keyhold key public" sh -c \
    "OPENSSL_CONF='$CNF' openssl pkey -in '$W/$type.ref.pem' -pubout | cmp - '$W/k-$type.pub'"
  check "req -new -x509 -key $type.ref.pem" kossl req -new -x509 -key "$W/$type.ref.pem" \
    -subj /CN=ref -days 1 -out "$W/cref-$type.pem"
  check "plain openssl verifies the $type certificate made from the reference file" plain verify \
    -CAfile "$W/cref-$type.pem" "$W/cref-$type.pem"
done
check "dgst -sign with a reference file" kossl dgst -sha256 -sign "$W/ec-p256.ref.pem" \
  -out "$W/sig" "$W/msg"
check "plain openssl verifies it" plain dgst -sha256 -verify "$W/k-ec-p256.pub" \
  -signature "$W/sig" "$W/msg"
for type in ec-p256 rsa-2048; do
  case "$type" in ec-p256) sig=ECDSA ;; rsa-2048) sig=RSA-PSS ;; esac
  port=$((port + 1))
  check "s_server -key $type.ref.pem starts" start_server "$port" "$W/cref-$type.pem" \
    "$W/$type.ref.pem"
  check "TLS 1.3 handshake with s_server -key $type.ref.pem" tls_check "$port" \
    "$W/cref-$type.pem" "$sig" -tls1_3
  stop_server
done
check "a reference file holds no private key" sh -c \
  "! env -u OPENSSL_CONF openssl pkey -in '$W/ec-p256.ref.pem' -noout 2>/dev/null"

# Writing a keyhold key as a private key gives the same reference file.
check "pkey -in keyhold:k-ec-p256 -out writes a key reference" kossl pkey -in keyhold:k-ec-p256 \
  -out "$W/enc.ref.pem"
check "it equals keyhold key ref" cmp "$W/enc.ref.pem" "$W/ec-p256.ref.pem"

# genpkey creates keys in the daemon and writes reference files.
check "genpkey EC P-384 in the daemon" kossl genpkey -propquery provider=keyhold -algorithm EC \
  -pkeyopt group:P-384 -pkeyopt keyhold_name:gen-ec -out "$W/gen-ec.ref.pem"
check "genpkey RSA 3072 in the daemon" kossl genpkey -propquery provider=keyhold -algorithm RSA \
  -pkeyopt rsa_keygen_bits:3072 -pkeyopt keyhold_name:gen-rsa -out "$W/gen-rsa.ref.pem"
check "genpkey Ed25519 in the daemon" kossl genpkey -propquery provider=keyhold \
  -algorithm ED25519 -pkeyopt keyhold_name:gen-ed -out "$W/gen-ed.ref.pem"
check "the daemon lists the generated keys" sh -c \
  "'$KEYHOLD' key list | grep -q 'gen-ec .*ec-p384' && '$KEYHOLD' key list | grep -q 'gen-rsa .*rsa-3072' &&
   '$KEYHOLD' key list | grep -q 'gen-ed .*ed25519'"
"$KEYHOLD" key public gen-rsa >"$W/gen-rsa.pub"
check "sign with the generated reference file" kossl dgst -sha256 -sign "$W/gen-rsa.ref.pem" \
  -out "$W/sig" "$W/msg"
check "plain openssl verifies it" plain dgst -sha256 -verify "$W/gen-rsa.pub" -signature "$W/sig" \
  "$W/msg"
fails_with "genpkey without a name says how to name the key" "keyhold_name" \
  env OPENSSL_CONF="$CNF" openssl genpkey -propquery provider=keyhold -algorithm ED25519 \
  -out "$W/x.pem"

# OWNER/NAME URIs (owner by name and by uid).
check "keyhold:OWNER/NAME with a user name" sh -c \
  "OPENSSL_CONF='$CNF' openssl pkey -in keyhold:$(id -un)/k-ec-p256 -pubout | cmp - '$W/k-ec-p256.pub'"
check "keyhold:UID/NAME" sh -c \
  "OPENSSL_CONF='$CNF' openssl pkey -in keyhold:$(id -u)/k-ec-p256 -pubout | cmp - '$W/k-ec-p256.pub'"

# --- threads and fork ---
if [ -n "${KH_SIGN_STRESS:-}" ]; then
  for type in ec-p256 rsa-2048; do
    check "threads and forked children sign with keyhold:k-$type" \
      env OPENSSL_CONF="$CNF" "$KH_SIGN_STRESS" "keyhold:k-$type" "$W/k-$type.pub"
  done
fi

# --- provider order ---
# keyhold listed before default, and the default_properties preference of
# conf/openssl-keyhold.cnf: key files and keyhold keys both keep working.
REV="$KH_DIR/reversed.cnf"
cat >"$REV" <<CNF
openssl_conf = init
[init]
providers = prov
alg_section = algs
[algs]
default_properties = ?provider=default
[prov]
keyhold = keyhold_sect
default = default_sect
[keyhold_sect]
module = $KEYHOLD_PROVIDER
activate = 1
[default_sect]
activate = 1
CNF
check "keyhold first: genpkey with the default provider" env OPENSSL_CONF="$REV" openssl genpkey \
  -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$W/g.key"
plain pkey -in "$W/g.key" -pubout -out "$W/g.pub"
check "keyhold first: sign with a key file" env OPENSSL_CONF="$REV" openssl dgst -sha256 \
  -sign "$W/g.key" -out "$W/sig" "$W/msg"
check "plain openssl verifies it" plain dgst -sha256 -verify "$W/g.pub" -signature "$W/sig" "$W/msg"
check "keyhold first: sign with keyhold:k-rsa-2048" env OPENSSL_CONF="$REV" openssl dgst -sha256 \
  -sign keyhold:k-rsa-2048 -out "$W/sig" "$W/msg"
check "plain openssl verifies it" plain dgst -sha256 -verify "$W/k-rsa-2048.pub" \
  -signature "$W/sig" "$W/msg"

# --- errors ---
fails_with "missing key gives a clear error" "keyhold:nope: not found" \
  env OPENSSL_CONF="$CNF" openssl pkey -in keyhold:nope -pubout
fails_with "signing with a missing key gives a clear error" "keyhold:nope: not found" \
  env OPENSSL_CONF="$CNF" openssl dgst -sha256 -sign keyhold:nope -out "$W/sig" "$W/msg"
fails_with "x25519 cannot sign" "operation not supported" \
  env OPENSSL_CONF="$CNF" openssl pkeyutl -sign -rawin -inkey keyhold:k-x25519 -in "$W/msg" -out "$W/sig"

kh_stop
fails_with "daemon down gives a clear error naming the key" "keyhold:k-ec-p256: daemon unavailable" \
  env OPENSSL_CONF="$CNF" openssl pkey -in keyhold:k-ec-p256 -pubout
# A reference file loads without the daemon (it holds the public key), as
# nginx and curl load theirs; the signature then fails, naming the key.
check "reference file loads with the daemon down" kossl pkey -in "$W/ec-p256.ref.pem" -pubout \
  -out "$W/ref.pub"
fails_with "signing through a reference file, daemon down, names the key" \
  "/k-ec-p256: daemon unavailable" \
  timeout 30 env OPENSSL_CONF="$CNF" openssl dgst -sha256 -sign "$W/ec-p256.ref.pem" \
  -out "$W/sig" "$W/msg"
check "provider loaded, daemon down: list -providers works" kossl list -providers
check "provider loaded, daemon down: file keys still work (lazy)" sh -c \
  "OPENSSL_CONF='$CNF' openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out '$W/f.key' &&
   OPENSSL_CONF='$CNF' openssl dgst -sha256 -sign '$W/f.key' -out '$W/fsig' '$W/msg' &&
   env -u OPENSSL_CONF openssl pkey -in '$W/f.key' -pubout -out '$W/f.pub' &&
   env -u OPENSSL_CONF openssl dgst -sha256 -verify '$W/f.pub' -signature '$W/fsig' '$W/msg'"

kh_summary
