#!/bin/bash
# libkeyhold-pkcs11.so through OpenSC pkcs11-tool and GnuTLS p11tool against a
# real keyholdd: the token and its objects, every signing mechanism (each
# signature verified by the plain openssl CLI with the key from
# `keyhold key public`), RSA decryption, a key shared by another uid, error
# codes, and a daemon that is down or restarted.
source "$(dirname "$0")/../lib.sh"
: "${KEYHOLD_PKCS11:?path to libkeyhold-pkcs11.so}"
M="$(realpath "$KEYHOLD_PKCS11")"  # p11-kit resolves relative paths elsewhere
kh_start
W="$KH_DIR/work"
mkdir -p "$W"
chmod 755 "$W"
head -c 10000 /dev/urandom >"$W/msg"

p11() { timeout 20 pkcs11-tool --module "$M" "$@"; }
key_id() {  # CKA_ID = SHA-256 of the DER SubjectPublicKeyInfo
  openssl pkey -pubin -in "$W/$1.pub" -outform DER | sha256sum | cut -c1-64
}
# Raw r||s (PKCS#11) -> DER ECDSA-Sig-Value, with openssl only.
raw_to_der() {
  local hex half
  hex=$(od -An -v -tx1 "$1" | tr -d ' \n')
  half=$((${#hex} / 2))
  printf 'asn1=SEQUENCE:sig\n[sig]\nr=INTEGER:0x%s\ns=INTEGER:0x%s\n' \
    "${hex:0:$half}" "${hex:$half}" >"$W/sig.cnf"
  openssl asn1parse -genconf "$W/sig.cnf" -out "$2" >/dev/null
}
contains() { grep -q -- "$2" "$1"; }

types="rsa-2048 rsa-3072 ec-p256 ec-p384 ec-p521 ed25519 x25519"
for t in $types; do
  check "create $t" "$KEYHOLD" key create "k-$t" --type "$t"
  "$KEYHOLD" key public "k-$t" >"$W/k-$t.pub"
done

# Token and objects.
check "pkcs11-tool -L" p11 -L
check "-L shows the keyhold token" contains "$KH_DIR/out" "token label *: keyhold"
check "pkcs11-tool -M" p11 -M
cp "$KH_DIR/out" "$W/mechanisms"
for m in RSA-PKCS SHA256-RSA-PKCS RSA-PKCS-PSS SHA512-RSA-PKCS-PSS RSA-PKCS-OAEP ECDSA ECDSA-SHA384 EDDSA ECDH1-DERIVE SHA256; do
  check "mechanism $m listed" grep -q "^  $m," "$W/mechanisms"
done
check "pkcs11-tool -O" p11 -O
cp "$KH_DIR/out" "$W/objects"
for t in $types; do
  check "-O lists k-$t twice (private + public)" \
    test "$(grep -c "label: *k-$t\$" "$W/objects")" = 2
  check "-O shows the CKA_ID of k-$t" contains "$W/objects" "ID: *$(key_id "k-$t")"
done
check "7 private key objects" test "$(grep -c '^Private Key Object' "$W/objects")" = 7
check "private keys are sensitive, never extractable" \
  test "$(grep -c 'Access: *sensitive, always sensitive, never extractable' "$W/objects")" = 7
check "Ed25519 public key presented as EC_EDWARDS" contains "$W/objects" "EC_EDWARDS"
check "P-256 EC_PARAMS is the curve OID" contains "$W/objects" "EC_PARAMS: *06082a8648ce3d030107"
check "only private keys by class" p11 -O --type privkey
check "--type privkey lists 7 objects" test "$(grep -c 'Object;' "$KH_DIR/out")" = 7

# ECDSA: raw digest and hashed variants, raw r||s and the openssl format.
for t in ec-p256 ec-p384 ec-p521; do
  id=$(key_id "k-$t")
  openssl dgst -sha256 -binary "$W/msg" >"$W/msg.sha256"
  check "ECDSA $t (raw digest)" p11 --sign -m ECDSA --id "$id" -i "$W/msg.sha256" -o "$W/sig"
  bits=${t#ec-p}
  want=$(( (bits + 7) / 8 * 2 ))
  check "ECDSA $t signature is r||s ($want bytes)" test "$(stat -c %s "$W/sig")" = "$want"
  raw_to_der "$W/sig" "$W/sig.der"
  check "openssl verifies ECDSA $t" openssl dgst -sha256 -verify "$W/k-$t.pub" -signature "$W/sig.der" "$W/msg"
  for d in sha256 sha384 sha512; do
    D=$(echo "$d" | tr a-z A-Z)
    check "ECDSA-$D $t" p11 --sign -m "ECDSA-$D" --id "$id" -i "$W/msg" -o "$W/sig" --signature-format openssl
    check "openssl verifies ECDSA-$D $t" openssl dgst "-$d" -verify "$W/k-$t.pub" -signature "$W/sig" "$W/msg"
  done
done

# RSA: PKCS#1 v1.5 (hashed and raw DigestInfo), PSS (hashed and raw).
for t in rsa-2048 rsa-3072; do
  id=$(key_id "k-$t")
  for d in sha256 sha384 sha512; do
    D=$(echo "$d" | tr a-z A-Z)
    check "$D-RSA-PKCS $t" p11 --sign -m "$D-RSA-PKCS" --id "$id" -i "$W/msg" -o "$W/sig"
    check "openssl verifies $D-RSA-PKCS $t" openssl dgst "-$d" -verify "$W/k-$t.pub" -signature "$W/sig" "$W/msg"
    len=$(openssl dgst "-$d" -binary "$W/msg" | wc -c)
    check "$D-RSA-PKCS-PSS $t" p11 --sign -m "$D-RSA-PKCS-PSS" --mgf "MGF1-$D" --salt-len "$len" \
      --id "$id" -i "$W/msg" -o "$W/sig"
    check "openssl verifies $D-RSA-PKCS-PSS $t" openssl dgst "-$d" -sigopt rsa_padding_mode:pss \
      -sigopt "rsa_pss_saltlen:$len" -verify "$W/k-$t.pub" -signature "$W/sig" "$W/msg"
  done
  openssl dgst -sha256 -binary "$W/msg" >"$W/msg.sha256"
  check "RSA-PKCS-PSS $t over a SHA-256 digest" p11 --sign -m RSA-PKCS-PSS --hash-algorithm SHA256 \
    --mgf MGF1-SHA256 --salt-len 32 --id "$id" -i "$W/msg.sha256" -o "$W/sig"
  check "openssl verifies RSA-PKCS-PSS $t" openssl dgst -sha256 -sigopt rsa_padding_mode:pss \
    -sigopt rsa_pss_saltlen:32 -verify "$W/k-$t.pub" -signature "$W/sig" "$W/msg"
  # CKM_RSA_PKCS over a DigestInfo (what TLS 1.2 clients send).
  printf '\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01\x05\x00\x04\x20' >"$W/di"
  cat "$W/msg.sha256" >>"$W/di"
  check "RSA-PKCS $t over a DigestInfo" p11 --sign -m RSA-PKCS --id "$id" -i "$W/di" -o "$W/sig"
  check "openssl verifies RSA-PKCS $t" openssl dgst -sha256 -verify "$W/k-$t.pub" -signature "$W/sig" "$W/msg"

  head -c 32 /dev/urandom >"$W/plain"
  for h in SHA-1 SHA256; do
    check "openssl encrypts OAEP $h" openssl pkeyutl -encrypt -pubin -inkey "$W/k-$t.pub" \
      -pkeyopt rsa_padding_mode:oaep -pkeyopt "rsa_oaep_md:${h/-/}" -pkeyopt "rsa_mgf1_md:${h/-/}" \
      -in "$W/plain" -out "$W/ct"
    check "RSA-PKCS-OAEP $h $t decrypts" p11 --decrypt -m RSA-PKCS-OAEP --hash-algorithm "$h" \
      --mgf "MGF1-${h/-/}" --id "$id" -i "$W/ct" -o "$W/dec"
    check "OAEP $h plaintext matches" cmp "$W/plain" "$W/dec"
  done
  check "openssl encrypts PKCS#1" openssl pkeyutl -encrypt -pubin -inkey "$W/k-$t.pub" -in "$W/plain" -out "$W/ct"
  check "RSA-PKCS $t decrypts" p11 --decrypt -m RSA-PKCS --id "$id" -i "$W/ct" -o "$W/dec"
  check "PKCS#1 plaintext matches" cmp "$W/plain" "$W/dec"
done

# EdDSA over the whole message.
check "EDDSA ed25519" p11 --sign -m EDDSA --id "$(key_id k-ed25519)" -i "$W/msg" -o "$W/sig"
check "openssl verifies EDDSA" openssl pkeyutl -verify -pubin -inkey "$W/k-ed25519.pub" -rawin \
  -in "$W/msg" -sigfile "$W/sig"

# C_Verify* (pkcs11-tool --verify): checked in the module with the public
# key; a signature over other data is rejected.
head -c 100 /dev/urandom >"$W/other"
verify_case() {  # verify_case NAME MECH-OPTIONS...  (signature in $W/sig over $W/msg)
  local what="$1"
  shift
  check "--verify $what" p11 --verify "$@" -i "$W/msg" --signature-file "$W/sig"
  check "... says the signature is valid ($what)" contains "$KH_DIR/out" "Signature is valid"
  # (pkcs11-tool 0.23 exits 0 either way; it prints the verdict.)
  check "--verify $what over other data runs" p11 --verify "$@" -i "$W/other" \
    --signature-file "$W/sig"
  check "... and says the signature is invalid ($what)" contains "$KH_DIR/out" "Invalid signature"
}
id=$(key_id k-ec-p384)
check "sign ECDSA-SHA384 for --verify" p11 --sign -m ECDSA-SHA384 --id "$id" -i "$W/msg" -o "$W/sig"
verify_case "ECDSA-SHA384 p384" -m ECDSA-SHA384 --id "$id"
id=$(key_id k-rsa-2048)
check "sign SHA256-RSA-PKCS for --verify" p11 --sign -m SHA256-RSA-PKCS --id "$id" -i "$W/msg" -o "$W/sig"
verify_case "SHA256-RSA-PKCS" -m SHA256-RSA-PKCS --id "$id"
check "sign SHA512-RSA-PKCS-PSS for --verify" p11 --sign -m SHA512-RSA-PKCS-PSS --mgf MGF1-SHA512 \
  --salt-len 64 --id "$id" -i "$W/msg" -o "$W/sig"
verify_case "SHA512-RSA-PKCS-PSS" -m SHA512-RSA-PKCS-PSS --mgf MGF1-SHA512 --salt-len 64 --id "$id"
id=$(key_id k-ed25519)
check "sign EDDSA for --verify" p11 --sign -m EDDSA --id "$id" -i "$W/msg" -o "$W/sig"
verify_case "EDDSA" -m EDDSA --id "$id"

# Errors are clean CKR_* codes.
check "ECDSA with an RSA key is refused" sh -c \
  "! timeout 20 pkcs11-tool --module '$M' --sign -m ECDSA --id $(key_id k-rsa-2048) -i '$W/msg.sha256' -o '$W/sig' 2>'$W/err'"
check "... with CKR_KEY_TYPE_INCONSISTENT" contains "$W/err" CKR_KEY_TYPE_INCONSISTENT
check "x25519 cannot sign" sh -c \
  "! timeout 20 pkcs11-tool --module '$M' --sign -m EDDSA --id $(key_id k-x25519) -i '$W/msg' -o '$W/sig' 2>'$W/err'"
check "... with CKR_KEY_FUNCTION_NOT_PERMITTED" contains "$W/err" CKR_KEY_FUNCTION_NOT_PERMITTED
check "PSS hash/mechanism mismatch is refused" sh -c \
  "! timeout 20 pkcs11-tool --module '$M' --sign -m SHA256-RSA-PKCS-PSS --hash-algorithm SHA384 --mgf MGF1-SHA256 --id $(key_id k-rsa-2048) -i '$W/msg' -o '$W/sig' 2>'$W/err'"
check "... with CKR_MECHANISM_PARAM_INVALID or refused by the tool" \
  sh -c "grep -q -e CKR_MECHANISM_PARAM_INVALID -e 'applicable only' '$W/err'"

# Key generation and deletion in the caller's namespace; the label is the name.
for spec in EC:prime256v1:gen-ec EC:secp384r1:gen-ec384 rsa:2048:gen-rsa EC:edwards25519:gen-ed; do
  kt=${spec%:*}
  label=${spec##*:}
  check "--keypairgen $kt" p11 --keypairgen --key-type "$kt" --label "$label"
  check "keyhold key list shows $label" sh -c "'$KEYHOLD' key list | grep -q '^[^ ]* *$label '"
  "$KEYHOLD" key public "$label" >"$W/$label.pub"
done
check "sign with a generated key" p11 --sign -m ECDSA-SHA256 --id "$(key_id gen-ec)" -i "$W/msg" \
  -o "$W/sig" --signature-format openssl
check "openssl verifies it" openssl dgst -sha256 -verify "$W/gen-ec.pub" -signature "$W/sig" "$W/msg"
check "generating an existing name fails" sh -c \
  "! timeout 20 pkcs11-tool --module '$M' --keypairgen --key-type EC:prime256v1 --label gen-ec 2>'$W/err'"
check "--delete-object" p11 --delete-object --type privkey --id "$(key_id gen-ec)"
check "the key is gone from the daemon" sh -c "! '$KEYHOLD' key public gen-ec 2>/dev/null"
check "and from the token" p11 -O
check "... no gen-ec object left" sh -c "! grep -q 'label: *gen-ec\$' '$KH_DIR/out'"
for label in gen-ec384 gen-rsa gen-ed; do
  check "delete $label" p11 --delete-object --type privkey --id "$(key_id "$label")"
done

# ECDH: the daemon computes the shared secret; openssl derives the same one.
for t in ec-p256 ec-p384; do
  curve=$(case "$t" in ec-p256) echo P-256;; ec-p384) echo P-384;; esac)
  openssl genpkey -algorithm EC -pkeyopt "ec_paramgen_curve:$curve" -out "$W/peer.key" 2>/dev/null
  openssl pkey -in "$W/peer.key" -pubout -outform DER -out "$W/peer.der"
  check "ECDH1-DERIVE $t" p11 --derive -m ECDH1-DERIVE --id "$(key_id "k-$t")" -i "$W/peer.der" -o "$W/ss"
  check "openssl derives the same secret ($t)" sh -c \
    "openssl pkeyutl -derive -inkey '$W/peer.key' -peerkey '$W/k-$t.pub' -out '$W/ss2' && cmp '$W/ss' '$W/ss2'"
done

# Digests are computed in the module.
for h in SHA256 SHA384 SHA512; do
  check "--hash -m $h" p11 --hash -m "$h" -i "$W/msg" -o "$W/digest"
  check "$h matches openssl" sh -c "openssl dgst -$(echo "$h" | tr "[:upper:]" "[:lower:]") -binary '$W/msg' | cmp - '$W/digest'"
done

# OpenSC's self test over every key on the token.
check "pkcs11-tool --test" p11 --test
check "... reports no errors" contains "$KH_DIR/out" "No errors"

# Login is accepted although no PIN is needed.
check "login with any PIN" p11 --login --pin 0000 -O --type privkey
check "login then sign" p11 --login --pin 0000 --sign -m EDDSA --id "$(key_id k-ed25519)" -i "$W/msg" -o "$W/sig"

# GnuTLS p11tool sees the token and the keys.
check "p11tool --list-all" timeout 20 p11tool --provider "$M" --list-all "pkcs11:token=keyhold"
cp "$KH_DIR/out" "$W/p11tool"
for t in rsa-2048 ec-p256 ed25519; do
  check "p11tool lists k-$t" contains "$W/p11tool" "object=k-$t"
done
check "p11tool --list-privkeys" timeout 20 p11tool --provider "$M" --list-privkeys --login \
  --set-pin 0000 "pkcs11:token=keyhold"
check "p11tool lists 7 private keys" test "$(grep -c 'type=private' "$KH_DIR/out")" = 7

# Certificates: C_CreateObject (pkcs11-tool --write-object) and `keyhold cert
# import` store a certificate beside its key; every program sees it with the
# key's CKA_ID and label; deleting it leaves the key.
plain_ossl() { env -u OPENSSL_CONF -u OPENSSL_MODULES openssl "$@"; }
plain_ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/ca.key" \
  -out "$W/ca.pem" -subj "/CN=keyhold test CA" -days 2 2>/dev/null
plain_ossl req -new -key "$W/ca.key" -subj /CN=csr -out "$W/any.csr"
for t in ec-p256 rsa-2048; do
  printf 'extendedKeyUsage=clientAuth\n' >"$W/ext"
  plain_ossl x509 -req -in "$W/any.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial \
    -force_pubkey "$W/k-$t.pub" -subj "/CN=client k-$t" -extfile "$W/ext" -days 1 \
    -out "$W/k-$t.crt" 2>/dev/null
  plain_ossl x509 -in "$W/k-$t.crt" -outform DER -out "$W/k-$t.der"
done
check "--write-object --type cert (C_CreateObject)" p11 --write-object "$W/k-ec-p256.der" \
  --type cert --id "$(key_id k-ec-p256)" --label k-ec-p256
check "keyhold cert show has the certificate written through PKCS#11" \
  "$KEYHOLD" cert show k-ec-p256
check "... the same one" cmp "$KH_DIR/out" "$W/k-ec-p256.crt"
check "keyhold cert import (rsa-2048)" "$KEYHOLD" cert import k-rsa-2048 --in "$W/k-rsa-2048.crt"
check "pkcs11-tool -O --type cert" p11 -O --type cert
cp "$KH_DIR/out" "$W/certs"
check "two certificate objects" test "$(grep -c '^Certificate Object' "$W/certs")" = 2
check "the certificate has its key's CKA_ID" contains "$W/certs" "ID: *$(key_id k-ec-p256)"
check "... and the key's label" contains "$W/certs" "label: *k-rsa-2048"
check "--read-object gives back the DER" p11 --read-object --type cert --id "$(key_id k-rsa-2048)" \
  -o "$W/read.der"
check "... byte for byte" cmp "$W/read.der" "$W/k-rsa-2048.der"
check "p11tool --list-all-certs" timeout 20 p11tool --provider "$M" --list-all-certs \
  "pkcs11:token=keyhold"
check "... shows both, typed cert" test "$(grep -c 'type=cert' "$KH_DIR/out")" = 2
check "a certificate whose CKA_ID is not its key's is refused" sh -c \
  "! p11 --write-object '$W/k-ec-p256.der' --type cert --id 0102 --label x 2>'$W/err'"
check "a certificate for a key the caller does not own is refused" sh -c \
  "! p11 --write-object '$W/ca.pem' --type cert --label ca 2>'$W/err'"
check "--delete-object --type cert" p11 --delete-object --type cert --id "$(key_id k-rsa-2048)"
check "the certificate is gone from the daemon" sh -c \
  "! '$KEYHOLD' cert show k-rsa-2048 2>/dev/null"
check "the key stays" "$KEYHOLD" key public k-rsa-2048
check "keep the rsa-2048 certificate for NSS" "$KEYHOLD" cert import k-rsa-2048 \
  --in "$W/k-rsa-2048.crt"

# NSS: modutil registers the module; certutil sees the token and its keys.
mkdir -p "$W/nssdb"
check "certutil -N" certutil -N -d "sql:$W/nssdb" --empty-password
check "modutil -add" timeout 20 modutil -dbdir "sql:$W/nssdb" -add keyhold -libfile "$M" -force
check "modutil -list" timeout 20 modutil -dbdir "sql:$W/nssdb" -list keyhold
check "... token keyhold, no login required" sh -c "grep -q \"Token Name: keyhold\" \"$KH_DIR/out\" && grep -q \"no login required\" \"$KH_DIR/out\""
check "certutil -K -h keyhold" timeout 20 certutil -K -d "sql:$W/nssdb" -h keyhold
cp "$KH_DIR/out" "$W/nss-keys"
for t in rsa-2048 ec-p256 ed25519; do
  check "NSS lists k-$t" grep -q " k-$t\$" "$W/nss-keys"
done
check "certutil -L -h all" timeout 20 certutil -L -d "sql:$W/nssdb" -h all
check "certutil -L -h all lists the token's certificates" sh -c \
  "grep -q 'keyhold:k-ec-p256' '$KH_DIR/out' && grep -q 'keyhold:k-rsa-2048' '$KH_DIR/out'"

# NSS TLS client authentication: tstclnt presents the token's certificate and
# signs with the keyhold key; a plain openssl s_server requires and verifies it.
plain_ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/srv.key" \
  -out "$W/srv.pem" -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
  -days 1 2>/dev/null
check "NSS trusts the test server's certificate" certutil -A -d "sql:$W/nssdb" -n srv -t "P,," \
  -i "$W/srv.pem"
port=$(kh_free_port 16)
for t in ec-p256 rsa-2048; do
  for v in tls1.3 tls1.2; do
    port=$((port + 1))
    : >"$W/srv.log"
    # Not through plain_ossl(): $! must be openssl's own pid (env execs it).
    env -u OPENSSL_CONF -u OPENSSL_MODULES openssl s_server -www -accept "127.0.0.1:$port" \
      -cert "$W/srv.pem" -key "$W/srv.key" \
      -Verify 1 -verify_return_error -CAfile "$W/ca.pem" >"$W/srv.log" 2>&1 < <(sleep 30) &
    srv=$!
    for _ in $(seq 1 100); do grep -q ACCEPT "$W/srv.log" && break; sleep 0.05; done
    printf 'GET / HTTP/1.0\r\n\r\n' >"$W/req"
    check "NSS tstclnt client auth with keyhold:k-$t ($v)" timeout 20 tstclnt -h 127.0.0.1 \
      -p "$port" -d "sql:$W/nssdb" -n "keyhold:k-$t" -V "$v:$v" -A "$W/req"
    sleep 0.2
    check "... s_server verified the client certificate (k-$t, $v)" \
      grep -q "CN = client k-$t" "$W/srv.log"
    kill "$srv" 2>/dev/null || true
    wait "$srv" 2>/dev/null || true
  done
done

# A key another uid shared with us appears as OWNER/NAME and signs.
if [ "$(id -u)" -eq 0 ]; then
  A=64111
  as_a() { setpriv --reuid=$A --regid=$A --clear-groups -- "$@"; }
  check "uid $A creates a key" as_a "$KEYHOLD" key create shared-ec --type ec-p256
  check "uid $A grants it to root" as_a "$KEYHOLD" key grant shared-ec --user 0
  as_a "$KEYHOLD" key public shared-ec >"$W/shared-ec.pub"
  check "root's token lists $A/shared-ec" p11 -O --type privkey
  check "label is OWNER/NAME" contains "$KH_DIR/out" "label: *$A/shared-ec\$"
  check "sign with the shared key" p11 --sign -m ECDSA-SHA256 --id "$(key_id shared-ec)" -i "$W/msg" \
    -o "$W/sig" --signature-format openssl
  check "openssl verifies the shared key's signature" openssl dgst -sha256 -verify "$W/shared-ec.pub" \
    -signature "$W/sig" "$W/msg"
  check "uid $A sees only its own key" as_a timeout 20 pkcs11-tool --module "$M" -O
  check "... one private key object" test "$(grep -c '^Private Key Object' "$KH_DIR/out")" = 1

  # p11-kit registration with conf/keyhold.module (module path pointed at the
  # build). p11-kit reads user module configs only for non-root programs.
  H="$W/home-$A"
  mkdir -p "$H/.config/pkcs11/modules"
  sed "s|^module: .*|module: $M|" "$(dirname "$0")/../../conf/keyhold.module" \
    >"$H/.config/pkcs11/modules/keyhold.module"
  chown -R "$A:$A" "$H"
  as_a_p11kit() { HOME="$H" setpriv --reuid=$A --regid=$A --clear-groups -- "$@"; }
  check "p11-kit list-modules" as_a_p11kit timeout 20 p11-kit list-modules
  check "... shows the keyhold token" contains "$KH_DIR/out" "token: keyhold"
  check "p11tool resolves a pkcs11: URI through p11-kit" \
    as_a_p11kit timeout 20 p11tool --list-all "pkcs11:token=keyhold;object=shared-ec;type=private"
  check "... to the private key" contains "$KH_DIR/out" "object=shared-ec;type=private"
  proxy="$(pkg-config --variable=proxy_module p11-kit-1 2>/dev/null || echo /usr/lib/x86_64-linux-gnu/p11-kit-proxy.so)"
  check "pkcs11-tool through p11-kit-proxy" as_a_p11kit timeout 20 pkcs11-tool --module "$proxy" \
    --token-label keyhold -O --type privkey
  check "... lists the key" contains "$KH_DIR/out" "label: *shared-ec"
  check "sign through p11-kit-proxy" as_a_p11kit timeout 20 pkcs11-tool --module "$proxy" \
    --token-label keyhold --sign -m ECDSA-SHA256 --id "$(key_id shared-ec)" -i "$W/msg" \
    -o "$H/sig.proxy" --signature-format openssl
  check "openssl verifies the proxy signature" openssl dgst -sha256 -verify "$W/shared-ec.pub" \
    -signature "$H/sig.proxy" "$W/msg"
fi

# Daemon down: the slot is still listed, object access fails cleanly, nothing hangs.
kh_stop
check "daemon down: -L still lists the slot" p11 -L
check "... with the keyhold token" contains "$KH_DIR/out" "token label *: keyhold"
rc=0
p11 -O >"$W/out" 2>"$W/err" || rc=$?
check "daemon down: -O fails (not a timeout)" test "$rc" -ne 0 -a "$rc" -ne 124
check "... with CKR_DEVICE_ERROR" contains "$W/err" CKR_DEVICE_ERROR

# Restarted daemon: keys come back.
kh_start
check "daemon restarted: -O" p11 -O --type privkey
check "... lists the keys again" test "$(grep -c '^Private Key Object' "$KH_DIR/out")" -ge 7

kh_summary
