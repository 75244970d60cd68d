#!/bin/bash
# Every operation for every key type through the keyhold CLI against a real
# keyholdd; every signature is verified, every ciphertext made and every
# shared secret cross-checked by the plain openssl CLI, which never loads
# keyhold.
source "$(dirname "$0")/lib.sh"
kh_start
W="$KH_DIR/work"
mkdir -p "$W"
head -c 10000 /dev/urandom >"$W/msg"

fingerprint() {  # PEM public key -> sha256:<hex> of its DER SPKI
  openssl pkey -pubin -in "$1" -outform DER | sha256sum | awk '{print "sha256:" $1}'
}

for type in rsa-2048 rsa-3072 rsa-4096 ec-p256 ec-p384 ec-p521 ed25519 x25519; do
  name="k-$type"
  check "create $type" "$KEYHOLD" key create "$name" --type "$type"
  fp="$(cat "$KH_DIR/out")"
  check "public $type" "$KEYHOLD" key public "$name"
  cp "$KH_DIR/out" "$W/$name.pub"
  check "$type public key is a $type SPKI" grep -q "BEGIN PUBLIC KEY" "$W/$name.pub"
  check "$type fingerprint printed at create matches" test "$fp" = "$(fingerprint "$W/$name.pub")"

  case "$type" in
    rsa-*|ec-*)
      for d in sha256 sha384 sha512; do
        check "sign $type $d" "$KEYHOLD" sign "$name" --in "$W/msg" --out "$W/sig" --digest "$d"
        check "openssl verifies $type $d" openssl dgst "-$d" -verify "$W/$name.pub" -signature "$W/sig" "$W/msg"
      done
      ;;
  esac
  case "$type" in
    rsa-*)
      for d in sha256 sha512; do
        check "sign $type pss $d" "$KEYHOLD" sign "$name" --in "$W/msg" --out "$W/sig" --digest "$d" --pss
        check "openssl verifies $type pss $d" openssl dgst "-$d" -sigopt rsa_padding_mode:pss \
          -sigopt rsa_pss_saltlen:-1 -verify "$W/$name.pub" -signature "$W/sig" "$W/msg"
      done
      head -c 32 /dev/urandom >"$W/plain"
      for oaep in sha1 sha256; do
        check "openssl encrypts oaep $oaep" openssl pkeyutl -encrypt -pubin -inkey "$W/$name.pub" \
          -pkeyopt rsa_padding_mode:oaep -pkeyopt "rsa_oaep_md:$oaep" -pkeyopt "rsa_mgf1_md:$oaep" \
          -in "$W/plain" -out "$W/ct"
        check "decrypt $type oaep $oaep" "$KEYHOLD" decrypt "$name" --in "$W/ct" --out "$W/dec" --oaep "$oaep"
        check "oaep $oaep plaintext matches" cmp "$W/plain" "$W/dec"
      done
      check "openssl encrypts pkcs1" openssl pkeyutl -encrypt -pubin -inkey "$W/$name.pub" \
        -pkeyopt rsa_padding_mode:pkcs1 -in "$W/plain" -out "$W/ct"
      check "decrypt $type pkcs1" "$KEYHOLD" decrypt "$name" --in "$W/ct" --out "$W/dec"
      check "pkcs1 plaintext matches" cmp "$W/plain" "$W/dec"
      check "decrypted file is private" test "$(stat -c %a "$W/dec")" = 600
      fails "$type cannot derive" "cannot derive" "$KEYHOLD" derive "$name" --peer "$W/$name.pub" --out "$W/ss"
      ;;
    ec-*)
      curve=$(case "$type" in ec-p256) echo P-256;; ec-p384) echo P-384;; ec-p521) echo P-521;; esac)
      check "peer key $curve" openssl genpkey -algorithm EC -pkeyopt "ec_paramgen_curve:$curve" -out "$W/peer.key"
      openssl pkey -in "$W/peer.key" -pubout -out "$W/peer.pub"
      check "derive $type" "$KEYHOLD" derive "$name" --peer "$W/peer.pub" --out "$W/ss"
      check "openssl derives the same secret ($type)" sh -c \
        "openssl pkeyutl -derive -inkey '$W/peer.key' -peerkey '$W/$name.pub' -out '$W/ss2' && cmp '$W/ss' '$W/ss2'"
      fails "$type cannot decrypt" "cannot decrypt" "$KEYHOLD" decrypt "$name" --in "$W/msg" --out "$W/dec"
      fails "$type cannot pss" "" "$KEYHOLD" sign "$name" --in "$W/msg" --out "$W/sig" --pss
      ;;
    ed25519)
      check "sign ed25519" "$KEYHOLD" sign "$name" --in "$W/msg" --out "$W/sig"
      check "openssl verifies ed25519" openssl pkeyutl -verify -pubin -inkey "$W/$name.pub" -rawin \
        -in "$W/msg" -sigfile "$W/sig"
      fails "ed25519 cannot decrypt" "cannot decrypt" "$KEYHOLD" decrypt "$name" --in "$W/msg" --out "$W/dec"
      ;;
    x25519)
      check "peer x25519" openssl genpkey -algorithm X25519 -out "$W/peer.key"
      openssl pkey -in "$W/peer.key" -pubout -out "$W/peer.pub"
      check "derive x25519" "$KEYHOLD" derive "$name" --peer "$W/peer.pub" --out "$W/ss"
      check "openssl derives the same secret (x25519)" sh -c \
        "openssl pkeyutl -derive -inkey '$W/peer.key' -peerkey '$W/$name.pub' -out '$W/ss2' && cmp '$W/ss' '$W/ss2'"
      fails "x25519 cannot sign" "cannot sign" "$KEYHOLD" sign "$name" --in "$W/msg" --out "$W/sig"
      ;;
  esac
done

# Import keys made by openssl; the daemon's public key must be theirs.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$W/imp-rsa.pem" 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$W/imp-ec.pem"
openssl genpkey -algorithm ED25519 -out "$W/imp-ed.pem"
openssl genpkey -algorithm X25519 -out "$W/imp-x.pem"
openssl pkey -in "$W/imp-ec.pem" -outform DER -out "$W/imp-ec.der"
openssl ec -in "$W/imp-ec.pem" -out "$W/imp-ec-trad.pem" 2>/dev/null
for f in imp-rsa.pem imp-ec.pem imp-ed.pem imp-x.pem imp-ec.der imp-ec-trad.pem; do
  name="i-${f//./-}"
  check "import $f" "$KEYHOLD" key import "$name" --in "$W/$f"
  check "public of imported $f" "$KEYHOLD" key public "$name"
  cp "$KH_DIR/out" "$W/$name.pub"
  openssl pkey -in "$W/$f" -pubout -out "$W/$name.expected" 2>/dev/null ||
    openssl pkey -inform DER -in "$W/$f" -pubout -out "$W/$name.expected"
  check "imported $f public key matches" cmp "$W/$name.pub" "$W/$name.expected"
done
check "sign with imported rsa" "$KEYHOLD" sign i-imp-rsa-pem --in "$W/msg" --out "$W/sig"
check "openssl verifies imported rsa" openssl dgst -sha256 -verify "$W/i-imp-rsa-pem.pub" -signature "$W/sig" "$W/msg"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024 -out "$W/weak.pem" 2>/dev/null
fails "rsa-1024 import refused" "unsupported" "$KEYHOLD" key import weak --in "$W/weak.pem"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:secp256k1 -out "$W/k1.pem"
fails "secp256k1 import refused" "unsupported" "$KEYHOLD" key import k1 --in "$W/k1.pem"
fails "garbage import refused" "invalid argument" "$KEYHOLD" key import junk --in "$W/msg"
fails "import of a missing file" "imp-none" "$KEYHOLD" key import x --in "$W/imp-none.pem"

# List, JSON list, duplicates, bad names, delete.
check "list" "$KEYHOLD" key list
check "list shows rsa" grep -q "k-rsa-2048" "$KH_DIR/out"
check "list --json" "$KEYHOLD" key list --json
check "json parses with 14 keys" python3 -c \
  "import json,sys; d=json.load(open('$KH_DIR/out')); assert len(d)==14, len(d); assert all(k['fingerprint'].startswith('sha256:') for k in d)"
fails "duplicate name" "already exists" "$KEYHOLD" key create k-ec-p256 --type ec-p256
fails "bad name" "invalid argument" "$KEYHOLD" key create "bad/name/x" --type ec-p256
fails "bad type" "" "$KEYHOLD" key create t --type rsa-1024
fails "missing key" "not found" "$KEYHOLD" sign nope --in "$W/msg" --out "$W/sig"
# Certificates beside keys: stored, replaced, shown, refused when they do not
# belong to the key, removed with the key.
openssl req -new -x509 -newkey EC -pkeyopt ec_paramgen_curve:P-384 -nodes -keyout "$W/c384.key" \
  -subj /CN=c384 -days 1 -out "$W/c384.pem" 2>/dev/null
check "import the key of a certificate" "$KEYHOLD" key import k-cert --in "$W/c384.key"
check "cert import (PEM)" "$KEYHOLD" cert import k-cert --in "$W/c384.pem"
check "cert show prints the certificate" "$KEYHOLD" cert show k-cert
check "cert show gives back the same certificate" cmp "$KH_DIR/out" "$W/c384.pem"
openssl x509 -in "$W/c384.pem" -outform DER -out "$W/c384.der"
check "cert import (DER) replaces it" "$KEYHOLD" cert import k-cert --in "$W/c384.der"
check "key list --json says it has a certificate" sh -c \
  "'$KEYHOLD' key list --json | python3 -c \"import json,sys; d={k['name']: k for k in json.load(sys.stdin)}; assert d['k-cert']['certificate'] and not d['k-ec-p256']['certificate']\""
fails "a certificate for another key is refused" "not for this key" \
  "$KEYHOLD" cert import k-ec-p384 --in "$W/c384.pem"
fails "a non-certificate is refused" "not a PEM or DER X.509 certificate" \
  "$KEYHOLD" cert import k-cert --in "$W/msg"
fails "a certificate for a missing key" "not found" "$KEYHOLD" cert import nope --in "$W/c384.pem"
check "cert delete" "$KEYHOLD" cert delete k-cert
fails "cert show after delete" "no certificate" "$KEYHOLD" cert show k-cert
fails "cert delete twice" "no certificate" "$KEYHOLD" cert delete k-cert
check "the key stays after its certificate is removed" "$KEYHOLD" key public k-cert
check "cert import again" "$KEYHOLD" cert import k-cert --in "$W/c384.pem"
check "delete the key" "$KEYHOLD" key delete k-cert
check "re-import the key under the same name" "$KEYHOLD" key import k-cert --in "$W/c384.key"
fails "the new key starts without the old certificate" "no certificate" \
  "$KEYHOLD" cert show k-cert
check "clean up k-cert" "$KEYHOLD" key delete k-cert

check "delete" "$KEYHOLD" key delete k-ec-p384
fails "deleted key is gone" "not found" "$KEYHOLD" key public k-ec-p384
fails "delete twice" "not found" "$KEYHOLD" key delete k-ec-p384

# Keys, encrypted at rest, survive a restart.
check "no private key bytes in the store in clear" python3 - "$W/imp-ed.pem" "$KH_DIR/state" <<'PY'
import glob, subprocess, sys
der = subprocess.check_output(["openssl", "pkey", "-in", sys.argv[1], "-outform", "DER"])
seed = der[-32:]  # the Ed25519 private key
for path in glob.glob(sys.argv[2] + "/keys.db*"):
    assert seed not in open(path, "rb").read(), path
PY
kh_stop
kh_start
check "sign after restart" "$KEYHOLD" sign k-ec-p256 --in "$W/msg" --out "$W/sig"
check "openssl verifies after restart" openssl dgst -sha256 -verify "$W/k-ec-p256.pub" -signature "$W/sig" "$W/msg"
check "state files are private" sh -c \
  "test \$(stat -c %a '$KH_DIR/state/keys.db') = 600 && test \$(stat -c %a '$KH_DIR/state/master.key') = 600 && test \$(stat -c %a '$KH_DIR/state') = 700"
check "socket is world-connectable" test "$(stat -c %a "$KEYHOLD_SOCKET")" = 666

# The audit log: who did what with which key, hash-chained and keyed.
check "create a key to audit" "$KEYHOLD" key create k-audit --type ec-p256
check "use it" "$KEYHOLD" sign k-audit --in "$W/msg" --out "$W/sig"
check "delete a missing key (refused, and recorded)" sh -c \
  "! '$KEYHOLD' key delete k-none 2>/dev/null"
check "delete it" "$KEYHOLD" key delete k-audit
check "admin audit show --key k-audit" "$KEYHOLD" admin audit show --key k-audit
cp "$KH_DIR/out" "$W/audit"
check "creation, use and deletion are recorded, in order" python3 - "$W/audit" "$KEYHOLD" <<'PY'
import json, os, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
ops = [r["op"] for r in recs]
assert ops == ["generate-key", "sign", "destroy-key"], ops
for r in recs:
    assert r["uid"] == 0 and r["key"] == "0/k-audit" and r["result"] == "ok", r
    assert r["exe"] == os.path.realpath(sys.argv[2]), r["exe"]
    assert r["pid"] > 0 and r["time"].endswith("Z")
PY
check "a refused operation is recorded with its result" sh -c \
  "'$KEYHOLD' admin audit show --key k-none | grep -q '\"result\":\"not found\"'"
check "no secret in the audit log" sh -c "! grep -qi 'private' '$KH_DIR/state/audit.log'"
check "admin audit verify" "$KEYHOLD" admin audit verify
check "... says intact" grep -q "audit log intact" "$KH_DIR/out"
check "audit files are private" sh -c \
  "test \$(stat -c %a '$KH_DIR/state/audit.log') = 600 && test \$(stat -c %a '$KH_DIR/state/audit.key') = 600"
# Tampering: blame another uid for the deletion.
cp "$KH_DIR/state/audit.log" "$W/audit.bak"
sed -i '/"op":"destroy-key","key":"0\/k-audit"/s/"uid":0,/"uid":1000,/' "$KH_DIR/state/audit.log"
check "the edit happened" sh -c "! cmp -s '$KH_DIR/state/audit.log' '$W/audit.bak'"
fails "an edited record is found" "NOT intact" "$KEYHOLD" admin audit verify
check "... and named" grep -q "edited" "$KH_DIR/err"
cp "$W/audit.bak" "$KH_DIR/state/audit.log"
sed -i '2d' "$KH_DIR/state/audit.log"
fails "a removed record is found" "out of sequence" "$KEYHOLD" admin audit verify
cp "$W/audit.bak" "$KH_DIR/state/audit.log"

# The daemon log never holds key material: no PEM blocks, no hex of the
# imported private key.
check "no secrets in the log" sh -c "! grep -q 'PRIVATE KEY' '$KH_DIR/keyholdd.log'"

kh_stop
fails "daemon down gives a clear error" "daemon unavailable" "$KEYHOLD" ping
kh_summary
