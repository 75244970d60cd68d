#!/bin/bash
# The PKCS#11 (HSM) backend against a real SoftHSM2 token made in a temporary
# directory: every key type and operation through the keyhold CLI with
# --backend, each signature verified by plain openssl; pkcs11-tool pointed
# straight at the token shows the private keys sensitive and never
# extractable; a software and an HSM backend together; start-up errors;
# concurrent clients; reconciliation and kill -9 during creation.
source "$(dirname "$0")/../lib.sh"
source "$(dirname "$0")/../softhsm.sh"

M=/usr/lib/softhsm/libsofthsm2.so
if [ ! -f "$M" ] || ! command -v softhsm2-util >/dev/null ||
  ! command -v pkcs11-tool >/dev/null; then
  echo "SoftHSM2 or pkcs11-tool not installed: skipping"
  exit 77
fi

H="$KH_DIR/hsm"
W="$KH_DIR/work"
mkdir -p "$W"
# Random PINs, so "the PIN is not in the log" cannot match a timestamp or a pid.
PIN="pin-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
BADPIN="bad-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
kh_softhsm_token "$H" kh-hsm "$PIN"
printf '%s\n' "$PIN" >"$H/pin"
chmod 600 "$H/pin"
printf '%s\n' "$BADPIN" >"$H/badpin"
chmod 600 "$H/badpin"
printf '%s\n' "$PIN" >"$H/openpin"
chmod 644 "$H/openpin"
head -c 10000 /dev/urandom >"$W/msg"
ME="$(id -u)"
# Sanitizer builds: SoftHSM2 2.6.1 leaks a few bytes per Ed25519 key it loads
# inside keyholdd; its frames are matched with slow unwinding (the backend
# keeps the module mapped). Ignored by uninstrumented builds.
printf 'leak:libsofthsm2.so\n' >"$H/lsan.supp"
export LSAN_OPTIONS="${LSAN_OPTIONS:+$LSAN_OPTIONS:}suppressions=$H/lsan.supp"
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}fast_unwind_on_malloc=0"

# write_config MODULE ALLOWED PIN_FILE [SESSIONS [EXTRA_LINE]]
write_config() {
  cat >"$H/keyholdd.toml" <<EOF
[[backend.pkcs11]]
name = "hsm"
module = "$1"
allowed_modules = ["$2"]
token_label = "kh-hsm"
pin_file = "$3"
sessions = ${4:-4}
${5:-}
EOF
}

# start_fails "what" "expected text": keyholdd must exit non-zero at start
# with the text in its log.
start_fails() {
  local what="$1" expected="$2" rc=0
  timeout 20 "$KEYHOLDD" --config "$H/keyholdd.toml" --socket "$KEYHOLD_SOCKET" \
    --state-dir "$KH_DIR/state" >"$W/start.log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && grep -q -- "$expected" "$W/start.log"; then
    KH_PASSED=$((KH_PASSED + 1))
  else
    KH_FAILED=$((KH_FAILED + 1))
    echo "FAIL: $what (rc $rc, expected '$expected')" >&2
    sed 's/^/  log: /' "$W/start.log" >&2
  fi
}

p11() {  # pkcs11-tool straight at the SoftHSM2 token
  pkcs11-tool --module "$M" --token-label kh-hsm --login --pin "$PIN" "$@"
}

# --- start-up errors ---------------------------------------------------------
write_config "$M" "$M" "$H/badpin"
start_fails "wrong PIN" "CKR_PIN_INCORRECT"
check "the PIN is not in the log" sh -c "! grep -qF -- '$BADPIN' '$W/start.log'"
write_config "$M" "/usr/lib/other/module.so" "$H/pin"
start_fails "module not allow-listed" "not in allowed_modules"
write_config "/nonexistent/libnope.so" "/nonexistent/libnope.so" "$H/pin"
start_fails "missing module" "No such file or directory"
write_config "$M" "$M" "$H/openpin"
start_fails "PIN file readable by others" "group or others"
write_config "$M" "$M" "$H/pin"

# A blocking pool no larger than the HSM's sessions (4) is warned about; the
# default one is sized for them.
{ echo "blocking_threads = 3"; cat "$H/keyholdd.toml"; } >"$H/small-pool.toml"
kh_start --config "$H/small-pool.toml"
check "a pool within the HSM sessions is warned about" grep -q \
  "blocking_threads = 3 is not more than the 4 device calls" "$KH_DIR/keyholdd.log"
kh_stop

# --- every key type and operation ------------------------------------------
kh_start --config "$H/keyholdd.toml"
kh_doc_blocks hsm.md "$KH_DIR/doc-hsm" hsm  # docs/hsm.md's keys, as written
for k in web tls old; do
  check "delete the how-to's key $k" "$KEYHOLD" key delete "$k"
done
check "the default pool gets no warning" sh -c "! grep -q 'device calls that may block' '$KH_DIR/keyholdd.log' ||
  test \"\$(grep -c 'device calls that may block' '$KH_DIR/keyholdd.log')\" = 1"
check "software key beside the HSM" "$KEYHOLD" key create soft --type ec-p256
check "software key public" "$KEYHOLD" key public soft
cp "$KH_DIR/out" "$W/soft.pub"
check "sign with the software key" "$KEYHOLD" sign soft --in "$W/msg" --out "$W/sig"
check "openssl verifies the software key" openssl dgst -sha256 -verify "$W/soft.pub" -signature "$W/sig" "$W/msg"

types="rsa-2048 rsa-3072 rsa-4096 ec-p256 ec-p384 ec-p521 ed25519"
for type in $types; do
  name="h-$type"
  check "create $type in the token" "$KEYHOLD" key create "$name" --type "$type" --backend hsm
  check "public $type" "$KEYHOLD" key public "$name"
  cp "$KH_DIR/out" "$W/$name.pub"
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
      check "openssl encrypts oaep sha1" openssl pkeyutl -encrypt -pubin -inkey "$W/$name.pub" \
        -pkeyopt rsa_padding_mode:oaep -in "$W/plain" -out "$W/ct"
      check "decrypt $type oaep" "$KEYHOLD" decrypt "$name" --in "$W/ct" --out "$W/dec" --oaep sha1
      check "oaep plaintext matches" cmp "$W/plain" "$W/dec"
      # SoftHSM2 2.6 takes OAEP with SHA-1 only: the rest is "unsupported",
      # never an internal error or a wrong plaintext.
      check "openssl encrypts oaep sha256" openssl pkeyutl -encrypt -pubin -inkey "$W/$name.pub" \
        -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -in "$W/plain" -out "$W/ct"
      fails "$type oaep sha256 is unsupported by SoftHSM2" "does not support" \
        "$KEYHOLD" decrypt "$name" --in "$W/ct" --out "$W/dec" --oaep sha256
      check "openssl encrypts pkcs1" openssl pkeyutl -encrypt -pubin -inkey "$W/$name.pub" \
        -in "$W/plain" -out "$W/ct"
      check "decrypt $type pkcs1" "$KEYHOLD" decrypt "$name" --in "$W/ct" --out "$W/dec"
      check "pkcs1 plaintext matches" cmp "$W/plain" "$W/dec"
      fails "$type cannot derive" "cannot derive" "$KEYHOLD" derive "$name" --peer "$W/$name.pub" --out "$W/ss"
      ;;
    ec-*)
      curve="P-${type#ec-p}"
      check "peer key $curve" openssl genpkey -algorithm EC -pkeyopt "ec_paramgen_curve:$curve" -out "$W/peer.key"
      openssl pkey -in "$W/peer.key" -pubout -out "$W/peer.pub"
      check "derive $type in the token" "$KEYHOLD" derive "$name" --peer "$W/peer.pub" --out "$W/ss"
      check "openssl derives the same secret ($type)" sh -c \
        "openssl pkeyutl -derive -inkey '$W/peer.key' -peerkey '$W/$name.pub' | cmp - '$W/ss'"
      fails "$type cannot decrypt" "cannot decrypt" "$KEYHOLD" decrypt "$name" --in "$W/msg" --out "$W/dec"
      ;;
    ed25519)
      check "sign ed25519 in the token" "$KEYHOLD" sign "$name" --in "$W/msg" --out "$W/sig"
      check "openssl verifies ed25519" openssl pkeyutl -verify -pubin -inkey "$W/$name.pub" -rawin \
        -in "$W/msg" -sigfile "$W/sig"
      ;;
  esac
done
fails "x25519 is not offered by the HSM backend" "unsupported" \
  "$KEYHOLD" key create h-x --type x25519 --backend hsm

# Import into the token; the plaintext never stays in the daemon.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$W/imp.key" 2>/dev/null
openssl pkey -in "$W/imp.key" -pubout -out "$W/imp.expected"
check "import into the token" "$KEYHOLD" key import h-imp --in "$W/imp.key" --backend hsm
check "public of imported key" "$KEYHOLD" key public h-imp
check "imported public key matches" cmp "$KH_DIR/out" "$W/imp.expected"
check "sign with the imported key" "$KEYHOLD" sign h-imp --in "$W/msg" --out "$W/sig"
check "openssl verifies the imported key" openssl dgst -sha256 -verify "$W/imp.expected" -signature "$W/sig" "$W/msg"

check "key list shows the backend" "$KEYHOLD" key list --json
check "8 hsm keys and 1 software key" python3 -c "
import json, sys
keys = json.load(open('$KH_DIR/out'))
keys = keys['keys'] if isinstance(keys, dict) else keys
hsm = [k for k in keys if k['backend'] == 'hsm']
soft = [k for k in keys if k['backend'] == 'software']
assert len(hsm) == 8 and len(soft) == 1, keys
"

# --- the token itself: sensitive, never extractable ------------------------
check "pkcs11-tool lists the private keys" p11 --list-objects --type privkey
cp "$KH_DIR/out" "$W/objects"
check "8 keyhold private keys on the token" test "$(grep -c "label:.*keyhold:$ME/h-" "$W/objects")" = 8
check "every one sensitive and never extractable" python3 - "$W/objects" <<'PY'
import sys
text = open(sys.argv[1]).read()
blocks = [b for b in text.split("Private Key Object") if "keyhold:" in b]
assert len(blocks) == 8, len(blocks)
for b in blocks:
    access = [l for l in b.splitlines() if "Access:" in l]
    assert access, b
    a = access[0]
    # pkcs11-tool prints "extractable" only for CKA_EXTRACTABLE=TRUE.
    assert "sensitive" in a, a
    assert "extractable" not in a.replace("never extractable", ""), a
    assert "Usage:" in b
PY
ID="$(awk '/keyhold:'"$ME"'\/h-ec-p256/{f=1} f&&/ID:/{print $2; exit}' "$W/objects")"
check "found the CKA_ID of h-ec-p256" test -n "$ID"
check "CKA_ID is 16 random bytes" test "${#ID}" = 32
# That the private values cannot be read (C_GetAttributeValue answers
# CKR_ATTRIBUTE_SENSITIVE) is checked at the PKCS#11 level by
# p11_backend_test's PrivateValuesCannotBeReadFromTheToken: pkcs11-tool
# refuses to read any private key, whatever its attributes.
URL_ID="$(echo "$ID" | sed 's/../%&/g')"
fails_export=0
GNUTLS_PIN="$PIN" p11tool --provider "$M" --login --export \
  "pkcs11:token=kh-hsm;id=$URL_ID;type=private" >"$W/leak2" 2>&1 || fails_export=1
check "p11tool --export of the private key fails" test "$fails_export" = 1
check "p11tool sees CKA_SENSITIVE and CKA_NEVER_EXTRACTABLE" sh -c \
  "GNUTLS_PIN='$PIN' p11tool --provider '$M' --login --list-all-privkeys \
     'pkcs11:token=kh-hsm;id=$URL_ID' | grep Flags: | grep CKA_SENSITIVE | grep -q CKA_NEVER_EXTRACTABLE"
check "no private key bytes in the key store" python3 - "$KH_DIR/state" "$W/imp.key" <<'PY'
import glob, subprocess, sys
der = subprocess.check_output(["openssl", "pkey", "-in", sys.argv[2], "-outform", "DER"])
# The P-256 private scalar sits after the version in the SEC1 structure.
text = subprocess.check_output(["openssl", "pkey", "-in", sys.argv[2], "-text", "-noout"]).decode()
hexpriv = "".join(l.strip() for l in text.split("priv:")[1].split("pub:")[0].splitlines()).replace(":", "")
priv = bytes.fromhex(hexpriv)[-32:]
for path in glob.glob(sys.argv[1] + "/keys.db*"):
    assert priv not in open(path, "rb").read(), path
PY

# --- concurrent clients -----------------------------------------------------
for c in 1 2 3 4; do
  (
    for i in $(seq 1 15); do
      "$KEYHOLD" sign h-ec-p256 --in "$W/msg" --out "$W/csig.$c.$i" || exit 1
      openssl dgst -sha256 -verify "$W/h-ec-p256.pub" -signature "$W/csig.$c.$i" "$W/msg" >/dev/null || exit 1
      "$KEYHOLD" sign h-rsa-2048 --in "$W/msg" --out "$W/rsig.$c.$i" || exit 1
      openssl dgst -sha256 -verify "$W/h-rsa-2048.pub" -signature "$W/rsig.$c.$i" "$W/msg" >/dev/null || exit 1
    done
  ) &
  eval "C$c=\$!"
done
check "concurrent client 1" wait "$C1"
check "concurrent client 2" wait "$C2"
check "concurrent client 3" wait "$C3"
check "concurrent client 4" wait "$C4"

# --- the front-ends against HSM-backed keys ---------------------------------
if [ -n "${KEYHOLD_PROVIDER:-}" ]; then
  CNF="$KH_DIR/openssl-keyhold.cnf"
  sed "s|^# module = .*|module = $(realpath "$KEYHOLD_PROVIDER")|" \
    "$(dirname "$0")/../../conf/openssl-keyhold.cnf" >"$CNF"
  for k in h-ec-p256 h-rsa-2048; do
    check "provider: openssl dgst -sign keyhold:$k" env OPENSSL_CONF="$CNF" \
      openssl dgst -sha256 -sign "keyhold:$k" -out "$W/psig" "$W/msg"
    check "plain openssl verifies the provider's $k signature" env -u OPENSSL_CONF \
      openssl dgst -sha256 -verify "$W/$k.pub" -signature "$W/psig" "$W/msg"
  done
  # openssl dgst signs PSS with the longest salt (222 bytes for rsa-2048).
  check "provider: RSA-PSS with keyhold:h-rsa-2048" env OPENSSL_CONF="$CNF" \
    openssl dgst -sha256 -sign keyhold:h-rsa-2048 -sigopt rsa_padding_mode:pss \
    -out "$W/psig" "$W/msg"
  check "plain openssl verifies the provider's PSS signature" env -u OPENSSL_CONF \
    openssl dgst -sha256 -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:222 \
    -verify "$W/h-rsa-2048.pub" -signature "$W/psig" "$W/msg"
fi
if [ -n "${KEYHOLD_PKCS11:-}" ]; then
  kid() { openssl pkey -pubin -in "$W/$1.pub" -outform DER | sha256sum | cut -c1-64; }
  check "module: C_Sign SHA256-RSA-PKCS with h-rsa-2048" timeout 20 pkcs11-tool \
    --module "$KEYHOLD_PKCS11" --sign -m SHA256-RSA-PKCS --id "$(kid h-rsa-2048)" \
    -i "$W/msg" -o "$W/msig"
  check "plain openssl verifies the module's RSA signature" \
    openssl dgst -sha256 -verify "$W/h-rsa-2048.pub" -signature "$W/msig" "$W/msg"
  openssl dgst -sha256 -binary "$W/msg" >"$W/msg.sha256"
  check "module: C_Sign ECDSA with h-ec-p256" timeout 20 pkcs11-tool \
    --module "$KEYHOLD_PKCS11" --sign -m ECDSA --id "$(kid h-ec-p256)" \
    -i "$W/msg.sha256" -o "$W/msig"
  check "plain openssl verifies the module's ECDSA signature" python3 - "$W/msig" "$W/msig.der" <<'PY'
import sys
raw = open(sys.argv[1], "rb").read()
half = len(raw) // 2
def integer(b):
    b = b.lstrip(b"\0") or b"\0"
    if b[0] & 0x80:
        b = b"\0" + b
    return b"\x02" + bytes([len(b)]) + b
body = integer(raw[:half]) + integer(raw[half:])
open(sys.argv[2], "wb").write(b"\x30" + bytes([len(body)]) + body)
PY
  check "ECDSA signature verifies" openssl dgst -sha256 -verify "$W/h-ec-p256.pub" \
    -signature "$W/msig.der" "$W/msg"
fi

# --- delete removes the token object ---------------------------------------
check "delete an HSM key" "$KEYHOLD" key delete h-rsa-3072
check "pkcs11-tool lists the private keys again" p11 --list-objects --type privkey
check "its token object is gone" sh -c "! grep -q 'keyhold:$ME/h-rsa-3072' '$KH_DIR/out'"
fails "deleted HSM key is gone" "not found" "$KEYHOLD" key public h-rsa-3072

# delete-client removes every token object of that uid.
U=64150
check "uid $U creates two HSM keys" sh -c \
  "setpriv --reuid=$U --regid=$U --clear-groups -- '$KEYHOLD' key create dc-1 --type ec-p256 --backend hsm &&
   setpriv --reuid=$U --regid=$U --clear-groups -- '$KEYHOLD' key create dc-2 --type rsa-2048 --backend hsm"
check "pkcs11-tool lists them" p11 --list-objects --type privkey
check "uid $U's objects are on the token" test "$(grep -c "label: *keyhold:$U/dc-" "$KH_DIR/out")" = 2
check "root deletes client $U" "$KEYHOLD" admin delete-client $U
check "delete-client reports two keys" grep -q "deleted 2 key" "$KH_DIR/out"
check "pkcs11-tool after delete-client" p11 --list-objects --type privkey
cp "$KH_DIR/out" "$W/after-dc"
check "uid $U's token objects are gone" sh -c "! grep -q 'keyhold[a-z-]*:$U/' '$W/after-dc'"
check "root's HSM keys are still there" grep -q "keyhold:$ME/h-ec-p256" "$W/after-dc"

# --- reconciliation at start -----------------------------------------------
kh_stop
# A key object marked pending that no row records (as after a crash before
# the insert), one a keyhold from before pending markers labelled pending, a
# final one no row records (as after restoring an older key store), and a
# foreign object keyhold must never touch.
check "orphan keyhold object" p11 --keypairgen --key-type EC:prime256v1 \
  --label "keyhold:$ME/ghost" --id 00112233445566778899aabbccddee01
printf '\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\x01' >"$W/ghost-id"
check "its pending marker" p11 --write-object "$W/ghost-id" --type data --private \
  --label "keyhold-pending:$ME/ghost" --application-label keyhold
check "orphan object labelled pending" p11 --keypairgen --key-type EC:prime256v1 \
  --label "keyhold-pending:$ME/old-ghost" --id 00112233445566778899aabbccddeeff
check "unrecorded final keyhold object" p11 --keypairgen --key-type EC:prime256v1 \
  --label "keyhold:$ME/stray" --id 00112233445566778899aabbccddee02
check "foreign object" p11 --keypairgen --key-type EC:prime256v1 --label foreign --id 01
# A recorded key whose token object disappears.
check "remove h-ec-p384's object behind keyhold's back" p11 --delete-object --type privkey \
  --label "keyhold:$ME/h-ec-p384"
kh_start --config "$H/keyholdd.toml"
check "the orphan was removed" grep -q "removed unrecorded pending token key 'keyhold:$ME/ghost'" "$KH_DIR/keyholdd.log"
check "the old-style orphan was removed" grep -q "removed unrecorded pending token key 'keyhold-pending:$ME/old-ghost'" "$KH_DIR/keyholdd.log"
check "the unrecorded final object was reported" grep -q "token key 'keyhold:$ME/stray' .* is not recorded in the key store; left in place" "$KH_DIR/keyholdd.log"
check "the lost object was reported" grep -q "key '$ME/h-ec-p384' is recorded but its token object" "$KH_DIR/keyholdd.log"
check "pkcs11-tool lists after reconciliation" p11 --list-objects --type privkey
cp "$KH_DIR/out" "$W/objects"
check "orphans gone from the token" sh -c "! grep -q 'ghost' '$W/objects'"
check "pkcs11-tool lists data objects" p11 --list-objects --type data
check "the orphan's marker is gone" sh -c "! grep -q 'keyhold-pending:' '$KH_DIR/out'"
check "foreign object untouched" grep -q "label:.*foreign" "$W/objects"
check "unrecorded final object untouched" grep -q "label:.*keyhold:$ME/stray" "$W/objects"
check "remove the stray object" p11 --delete-object --type privkey --label "keyhold:$ME/stray"
check "the reported key's row is kept" "$KEYHOLD" key public h-ec-p384
fails "its use says the object is gone" "not found" "$KEYHOLD" sign h-ec-p384 --in "$W/msg" --out "$W/sig"
check "sign after restart" "$KEYHOLD" sign h-ec-p256 --in "$W/msg" --out "$W/sig"
check "openssl verifies after restart" openssl dgst -sha256 -verify "$W/h-ec-p256.pub" -signature "$W/sig" "$W/msg"

# --- kill -9 during creation and deletion ----------------------------------
# Three rounds, killed at different points of six concurrent creations and,
# from the second round on, the deletions of the keys earlier rounds
# recorded. No key the store records may be lost (SoftHSM2 rewrites an
# object's file in place when an attribute changes, so keyhold never
# changes a key object after making it), and no token key or marker may be
# left that no row records.
keep=""
for round in 1 2 3; do
  made=0
  for n in $keep; do
    "$KEYHOLD" key delete "$n" >/dev/null 2>&1 &
  done
  for i in $(seq 1 6); do
    "$KEYHOLD" key create "crash-$round-$i" --type rsa-2048 --backend hsm >/dev/null 2>&1 &
  done
  # Killed once the round has recorded 1, then 2 of its keys (whatever the
  # machine's speed), then 0.15 s in, so creations are cut at different
  # steps.
  want="$(echo "1 2 0" | cut -d' ' -f$round)"
  [ "$want" -gt 0 ] || sleep 0.15
  for _ in $(seq 1 400); do
    got="$("$KEYHOLD" key list 2>/dev/null | grep -c "crash-$round-" || true)"
    [ "$got" -ge "$want" ] && break
    sleep 0.05
  done
  kill -9 "$KH_PID"
  wait "$KH_PID" 2>/dev/null || true
  KH_PID=""
  wait 2>/dev/null || true
  kh_start --config "$H/keyholdd.toml"
  check "list after kill -9 ($round)" "$KEYHOLD" key list --json
  cp "$KH_DIR/out" "$W/list.json"
  check "pkcs11-tool keys after kill -9 ($round)" p11 --list-objects --type privkey
  cp "$KH_DIR/out" "$W/objects"
  check "pkcs11-tool data objects after kill -9 ($round)" p11 --list-objects --type data
  cp "$KH_DIR/out" "$W/data-objects"
  check "token keys and recorded keys agree after kill -9 ($round)" python3 - \
    "$W/list.json" "$W/objects" "$W/data-objects" "$ME" <<'PY'
import json, re, sys
keys = json.load(open(sys.argv[1]))
keys = keys['keys'] if isinstance(keys, dict) else keys
recorded = {k['name'] for k in keys if k['backend'] == 'hsm'} - {'h-ec-p384'}
labels = set(re.findall(r"label:\s+keyhold:%s/(\S+)" % sys.argv[4], open(sys.argv[2]).read()))
assert "keyhold-pending:" not in open(sys.argv[2]).read()
assert "keyhold-pending:" not in open(sys.argv[3]).read(), "a pending marker was left"
assert recorded == labels, (sorted(recorded), sorted(labels))
PY
  for n in $(python3 -c "
import json
keys = json.load(open('$W/list.json'))
keys = keys['keys'] if isinstance(keys, dict) else keys
print(' '.join(k['name'] for k in keys if k['name'].startswith('crash-')))"); do
    check "recorded $n is usable" "$KEYHOLD" sign "$n" --in "$W/msg" --out "$W/sig"
    case "$n" in crash-$round-*) made=$((made + 1)) ;; esac
  done
  echo "kill -9 round $round: $made of 6 keys recorded before the kill;" \
    "$(echo $keep | wc -w) deletions sent"
  keep="$(python3 -c "
import json
keys = json.load(open('$W/list.json'))
keys = keys['keys'] if isinstance(keys, dict) else keys
print(' '.join(k['name'] for k in keys if k['name'].startswith('crash-')))")"
done

# --- two backend tables on one token ---------------------------------------
# One names the token by label, the other by serial. Reconciliation sees
# every row of the key store, so neither removes the other's keys, also
# when the second table is taken out of the config again.
SERIAL="$(pkcs11-tool --module "$M" -L 2>/dev/null |
  awk -F': *' '/token label *: *kh-hsm/{f=1} f && /serial num/{print $2; exit}')"
check "the token has a serial" test -n "$SERIAL"
kh_stop
cp "$H/keyholdd.toml" "$H/two.toml"
cat >>"$H/two.toml" <<EOF

[[backend.pkcs11]]
name = "hsm2"
module = "$M"
allowed_modules = ["$M"]
token_serial = "$SERIAL"
pin_file = "$H/pin"
sessions = 2
EOF
kh_start --config "$H/two.toml"
check "create through the table naming the serial" "$KEYHOLD" key create two-b --type ec-p256 --backend hsm2
check "create through the table naming the label" "$KEYHOLD" key create two-a --type ec-p256 --backend hsm
kh_stop
LINES="$(wc -l <"$KH_DIR/keyholdd.log")"
kh_start --config "$H/two.toml"
for k in two-a two-b h-ec-p256; do
  check "after a restart with both tables $k signs" "$KEYHOLD" sign "$k" --in "$W/msg" --out "$W/sig"
done
kh_stop
kh_start --config "$H/keyholdd.toml"
check "no key was removed at either start" sh -c \
  "! tail -n +$((LINES + 1)) '$KH_DIR/keyholdd.log' | grep -q 'removed unrecorded'"
check "the second table's key object survives its table's removal" sh -c \
  "pkcs11-tool --module '$M' --token-label kh-hsm --login --pin '$PIN' --list-objects \
     --type privkey 2>/dev/null | grep -q 'keyhold:$ME/two-b'"
check "the first table's key signs" "$KEYHOLD" sign two-a --in "$W/msg" --out "$W/sig"

# --- a module that hangs, a token that goes away ----------------------------
# The daemon loads the test-only fault module (SoftHSM2 behind it, so the same
# token and keys) through the same allow-list rules as any vendor module.
# While KH_P11_FAULT_HANG_FILE exists its C_Sign does not return; while
# KH_P11_FAULT_ABSENT_FILE exists the token is "removed". No timing is
# asserted: every command gets a generous timeout and only its answer counts.
if [ -n "${KH_P11_FAULT_MODULE:-}" ] && [ -f "$KH_P11_FAULT_MODULE" ]; then
  kh_stop
  FM="$KH_P11_FAULT_MODULE"
  write_config "$FM" "$M" "$H/pin"
  start_fails "fault module not allow-listed" "not in allowed_modules"
  write_config "$FM" "$FM" "$H/pin" 1 "acquire_timeout_ms = 2000"
  export KH_P11_FAULT_HANG_FILE="$W/hang" KH_P11_FAULT_ABSENT_FILE="$W/absent" \
    KH_P11_FAULT_CRASH_FILE="$W/crash"
  rm -f "$W/hang" "$W/hang.entered" "$W/absent" "$W/crash"
  kh_start --config "$H/keyholdd.toml"
  check "sign through the fault module" timeout 20 "$KEYHOLD" sign h-ec-p256 --in "$W/msg" --out "$W/sig"
  check "openssl verifies it" openssl dgst -sha256 -verify "$W/h-ec-p256.pub" -signature "$W/sig" "$W/msg"

  # hang_entered: the module has entered a hanging C_Sign (it touches
  # hang.entered), waiting up to 10 s for it.
  hang_entered() {
    for _ in $(seq 1 200); do
      [ -e "$W/hang.entered" ] && return 0
      sleep 0.05
    done
    return 1
  }
  touch "$W/hang"
  timeout 120 "$KEYHOLD" sign h-ec-p256 --in "$W/msg" --out "$W/hung.sig" 2>"$W/hung.err" &
  HUNG=$!
  check "the module's C_Sign is hanging" hang_entered
  check "ping answers while C_Sign hangs" timeout 10 "$KEYHOLD" ping
  check "key list answers while C_Sign hangs" timeout 10 "$KEYHOLD" key list
  check "admin stats names the hanging call" sh -c \
    "timeout 10 '$KEYHOLD' admin stats | grep -q \"backend 'hsm': 1 of 1 token sessions in a module call\""
  check "a software-key sign answers while C_Sign hangs" \
    timeout 10 "$KEYHOLD" sign soft --in "$W/msg" --out "$W/soft.sig"
  check "openssl verifies that signature" openssl dgst -sha256 -verify "$W/soft.pub" \
    -signature "$W/soft.sig" "$W/msg"
  # The one session is held by the hung call: another HSM request waits
  # acquire_timeout_ms for it, then fails instead of queueing forever.
  fails "another HSM request fails instead of waiting forever" "stayed busy" \
    timeout 30 "$KEYHOLD" sign h-rsa-2048 --in "$W/msg" --out "$W/sig2"
  check "ping still answers" timeout 10 "$KEYHOLD" ping
  # Device key uses may run on I/O threads (server.h); with one of them hung
  # and others asking for the session, an I/O thread is still free. The
  # session has been busy for acquire_timeout_ms by now, so a flood of HSM
  # requests (more than the blocking pool has threads) is answered without
  # waiting and leaves the pool to everyone else (key creation here).
  WAITERS=()
  for i in $(seq 1 8); do
    timeout 30 "$KEYHOLD" sign h-rsa-2048 --in "$W/msg" --out "$W/w$i.sig" \
      >/dev/null 2>"$W/w$i.err" &
    WAITERS+=($!)
  done
  check "ping answers while eight more HSM requests come in" timeout 10 "$KEYHOLD" ping
  check "a software-key sign answers meanwhile" \
    timeout 10 "$KEYHOLD" sign soft --in "$W/msg" --out "$W/soft.sig"
  check "a software key is created (blocking pool) meanwhile" \
    timeout 20 "$KEYHOLD" key create soft-during-hang --type rsa-2048
  busy=0
  for i in $(seq 1 8); do
    if ! wait "${WAITERS[$((i - 1))]}" && grep -q "stayed busy" "$W/w$i.err"; then
      busy=$((busy + 1))
    fi
  done
  check "all 8 HSM requests of the flood were answered \"stayed busy\"" test "$busy" = 8
  rm -f "$W/hang"
  check "the hung request is answered once the module returns" wait "$HUNG"
  check "and its signature verifies" openssl dgst -sha256 -verify "$W/h-ec-p256.pub" \
    -signature "$W/hung.sig" "$W/msg"
  check "the HSM serves requests again" timeout 20 "$KEYHOLD" sign h-rsa-2048 --in "$W/msg" --out "$W/sig2"

  # SIGTERM while C_Sign hangs: keyholdd does not wait for the module
  # (io_timeout_seconds, here the default 10 s, then 5 s more; see
  # docs/systemd.md). The restart finds every key.
  rm -f "$W/hang.entered"
  touch "$W/hang"
  timeout 120 "$KEYHOLD" sign h-ec-p256 --in "$W/msg" --out "$W/cut.sig" 2>/dev/null &
  CUT=$!
  check "the module's C_Sign is hanging again" hang_entered
  kh_check_forced_exit "$CUT" \
    "backend 'hsm': 1 of 1 token sessions in a module call"
  rm -f "$W/hang"
  kh_start --config "$H/keyholdd.toml"
  check "sign after the forced exit and a restart" timeout 20 "$KEYHOLD" sign h-ec-p256 \
    --in "$W/msg" --out "$W/sig"
  check "openssl verifies it after the forced exit" openssl dgst -sha256 \
    -verify "$W/h-ec-p256.pub" -signature "$W/sig" "$W/msg"

  # The token is removed: a clear one-line status, the daemon stays up; when
  # it is back the backend finds it, logs in again and the keys work.
  touch "$W/absent"
  fails "sign while the token is removed" "not present" \
    timeout 20 "$KEYHOLD" sign h-ec-p256 --in "$W/msg" --out "$W/sig"
  fails "create while the token is removed" "not present" \
    timeout 20 "$KEYHOLD" key create h-absent --type ec-p256 --backend hsm
  check "ping while the token is removed" timeout 10 "$KEYHOLD" ping
  check "software keys work while the token is removed" \
    timeout 10 "$KEYHOLD" sign soft --in "$W/msg" --out "$W/soft.sig"
  rm -f "$W/absent"
  check "sign after the token is back" timeout 20 "$KEYHOLD" sign h-ec-p256 --in "$W/msg" --out "$W/sig"
  check "openssl verifies it after the token came back" openssl dgst -sha256 \
    -verify "$W/h-ec-p256.pub" -signature "$W/sig" "$W/msg"
  check "the daemon logged the lost session" grep -q "session lost" "$KH_DIR/keyholdd.log"

  # No token when the daemon starts (plugged in later, its reader not up
  # yet): keyholdd starts anyway, software keys work, HSM requests say the
  # token is not present, and the first one after it is there finds it.
  kh_stop
  touch "$W/absent"
  log_from=$(($(wc -l <"$KH_DIR/keyholdd.log") + 1))
  kh_start --config "$H/keyholdd.toml"
  check "keyholdd started without the token and says so" sh -c \
    "tail -n +$log_from '$KH_DIR/keyholdd.log' | grep -q 'is not present .*; starting without it'"
  check "software keys work with no token since the start" \
    timeout 10 "$KEYHOLD" sign soft --in "$W/msg" --out "$W/soft.sig"
  fails "HSM key with no token since the start" "not present" \
    timeout 20 "$KEYHOLD" sign h-ec-p256 --in "$W/msg" --out "$W/sig"
  check "admin stats shows the token not found" sh -c \
    "'$KEYHOLD' admin stats | grep -E \"^hsm +token not found yet: .*label 'kh-hsm' is not present\""
  rm -f "$W/absent"
  check "HSM key works once the token is there" timeout 20 "$KEYHOLD" sign h-ec-p256 \
    --in "$W/msg" --out "$W/sig"
  check "openssl verifies it" openssl dgst -sha256 -verify "$W/h-ec-p256.pub" \
    -signature "$W/sig" "$W/msg"
  check "admin stats shows the token ready" sh -c \
    "'$KEYHOLD' admin stats | grep -E \"^hsm +ready \\(token serial '\""
  check "keyholdd logged finding the token" sh -c \
    "tail -n +$log_from '$KH_DIR/keyholdd.log' | grep -q \"token serial '.*' found\""
  check "the late reconciliation ran" sh -c \
    "tail -n +$log_from '$KH_DIR/keyholdd.log' | grep -q 'reconciled: '"

  # The crash window itself, deterministically: keyholdd dies right after
  # the token made the pair, before the key store's commit. The client gets
  # an error; after a restart the pending object is gone and no key by that
  # name exists, on the token or in the store.
  touch "$W/crash"
  fails "create while keyholdd dies after C_GenerateKeyPair" "daemon" \
    timeout 20 "$KEYHOLD" key create h-crashed --type ec-p256 --backend hsm
  check "keyholdd died in C_GenerateKeyPair" kh_exited_within "$KH_PID" 10
  kh_stop
  check "the key object is on the token after the crash" sh -c \
    "pkcs11-tool --module '$M' --token-label kh-hsm --login --pin '$PIN' --list-objects \
       --type privkey 2>/dev/null | grep -q 'keyhold:$ME/h-crashed'"
  check "and its pending marker" sh -c \
    "pkcs11-tool --module '$M' --token-label kh-hsm --login --pin '$PIN' --list-objects \
       --type data 2>/dev/null | grep -q 'keyhold-pending:$ME/h-crashed'"
  rm -f "$W/crash"
  kh_start --config "$H/keyholdd.toml"
  check "the restart removed it" grep -q \
    "removed unrecorded pending token key 'keyhold:$ME/h-crashed'" "$KH_DIR/keyholdd.log"
  check "pkcs11-tool after the restart" p11 --list-objects
  check "no h-crashed object on the token" sh -c "! grep -q 'h-crashed' '$KH_DIR/out'"
  fails "no h-crashed key in the store" "not found" "$KEYHOLD" key public h-crashed
  check "the name can be used again" timeout 20 "$KEYHOLD" key create h-crashed --type ec-p256 --backend hsm
  check "the new key signs" timeout 20 "$KEYHOLD" sign h-crashed --in "$W/msg" --out "$W/sig"
  unset KH_P11_FAULT_HANG_FILE KH_P11_FAULT_ABSENT_FILE KH_P11_FAULT_CRASH_FILE
else
  echo "KH_P11_FAULT_MODULE not set: hang and removal steps skipped"
fi

check "the PIN never reaches the log" sh -c "! grep -qF -- '$PIN' '$KH_DIR/keyholdd.log'"
kh_summary
