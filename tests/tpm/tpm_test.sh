#!/bin/bash
# The TPM backend end to end: a real keyholdd with a [[backend.tpm]] table
# talking to a swtpm started here on 127.0.0.1, driven by the keyhold CLI.
# Every signature is verified, every ciphertext made and every shared secret
# cross-checked by the plain openssl CLI. Also: software and TPM keys side by
# side, a daemon restart, a TPM restart (clear error, then recovery), a TPM
# that stops answering (one request held, the others "TPM busy"; SIGTERM
# still ends keyholdd), a
# copy of the state directory used with a fresh TPM (cannot sign), and the
# master key sealed by the TPM (moved from master.key, unsealed at every
# start, refused by another TPM).
# Optional: KEYHOLD_PROVIDER and KEYHOLD_PKCS11 (dev builds) also sign
# through the OpenSSL provider and the PKCS#11 module with TPM-backed keys.
# docs/tpm.md's `sh test tpm` blocks run here as written; its other steps
# are mirrored below.
source "$(dirname "$0")/../lib.sh"
if ! command -v swtpm >/dev/null; then
  echo "SKIP: swtpm is not installed"
  exit 77
fi

W="$KH_DIR/work"
mkdir -p "$W"
head -c 10000 /dev/urandom >"$W/msg"

SWTPM_PID=""
# start_swtpm STATE_DIR PORT
start_swtpm() {
  mkdir -p "$1"
  swtpm socket --tpm2 \
    --server "type=tcp,port=$2,bindaddr=127.0.0.1" \
    --ctrl "type=tcp,port=$(($2 + 1)),bindaddr=127.0.0.1" \
    --tpmstate "dir=$1" --flags "${SWTPM_FLAGS:-not-need-init,startup-clear}" \
    >>"$KH_DIR/swtpm.log" 2>&1 &
  SWTPM_PID=$!
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "swtpm did not start" >&2
  return 1
}
stop_swtpm() {
  if [ -n "$SWTPM_PID" ]; then
    kill -CONT "$SWTPM_PID" 2>/dev/null || true  # if a step stopped it
    kill "$SWTPM_PID" 2>/dev/null || true
    wait "$SWTPM_PID" 2>/dev/null || true
    SWTPM_PID=""
  fi
}
trap 'kh_cleanup; stop_swtpm' EXIT

PORT="$(kh_free_port 2)"
start_swtpm "$KH_DIR/tpm" "$PORT"
cat >"$KH_DIR/keyholdd.toml" <<EOF
[[backend.tpm]]
name = "tpm"
tcti = "swtpm:host=127.0.0.1,port=$PORT"
EOF
kh_start --config "$KH_DIR/keyholdd.toml"

kh_doc_blocks tpm.md "$KH_DIR/doc-tpm" tpm

fingerprint() {
  openssl pkey -pubin -in "$1" -outform DER | sha256sum | awk '{print "sha256:" $1}'
}

for type in rsa-2048 rsa-3072 ec-p256 ec-p384; do
  name="t-$type"
  check "create $type on the TPM" "$KEYHOLD" key create "$name" --type "$type" --backend tpm
  fp="$(cat "$KH_DIR/out")"
  check "public $type" "$KEYHOLD" key public "$name"
  cp "$KH_DIR/out" "$W/$name.pub"
  check "$type fingerprint matches" test "$fp" = "$(fingerprint "$W/$name.pub")"
  for d in sha256 sha384; do
    check "sign $type $d" "$KEYHOLD" sign "$name" --in "$W/msg" --out "$W/sig" --digest "$d"
    check "openssl verifies $type $d" openssl dgst "-$d" -verify "$W/$name.pub" -signature "$W/sig" "$W/msg"
  done
  case "$type" in
    rsa-*)
      check "sign $type pss" "$KEYHOLD" sign "$name" --in "$W/msg" --out "$W/sig" --digest sha256 --pss
      check "openssl verifies $type pss" openssl dgst -sha256 -sigopt rsa_padding_mode:pss \
        -sigopt rsa_pss_saltlen:-1 -verify "$W/$name.pub" -signature "$W/sig" "$W/msg"
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
      ;;
    ec-*)
      curve=$(case "$type" in ec-p256) echo P-256;; ec-p384) echo P-384;; esac)
      openssl genpkey -algorithm EC -pkeyopt "ec_paramgen_curve:$curve" -out "$W/peer.key"
      openssl pkey -in "$W/peer.key" -pubout -out "$W/peer.pub"
      check "derive $type" "$KEYHOLD" derive "$name" --peer "$W/peer.pub" --out "$W/ss"
      check "openssl derives the same secret ($type)" sh -c \
        "openssl pkeyutl -derive -inkey '$W/peer.key' -peerkey '$W/$name.pub' -out '$W/ss2' && cmp '$W/ss' '$W/ss2'"
      ;;
  esac
done
fails "ed25519 is not a TPM type" "not support" \
  "$KEYHOLD" key create t-ed --type ed25519 --backend tpm
fails "import into the TPM" "not supported" sh -c \
  "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 | '$KEYHOLD' key import t-imp --in - --backend tpm"

# Software and TPM keys side by side.
check "create software key" "$KEYHOLD" key create s-ec --type ec-p256
check "public software key" "$KEYHOLD" key public s-ec
cp "$KH_DIR/out" "$W/s-ec.pub"
check "sign software key" "$KEYHOLD" sign s-ec --in "$W/msg" --out "$W/sig" --digest sha256
check "openssl verifies software key" openssl dgst -sha256 -verify "$W/s-ec.pub" -signature "$W/sig" "$W/msg"
check "list shows both backends" sh -c "'$KEYHOLD' key list | grep -q tpm && '$KEYHOLD' key list | grep -q software"

# More keys than swtpm has object slots, many operations, in turn.
for i in $(seq 1 8); do
  check "create many-$i" "$KEYHOLD" key create "many-$i" --type ec-p256 --backend tpm
done
ok=0
for round in $(seq 1 5); do
  for i in $(seq 1 8); do
    "$KEYHOLD" sign "many-$i" --in "$W/msg" --out "$W/sig" --digest sha256 && ok=$((ok + 1))
  done
done
check "40 signatures over 8 TPM keys" test "$ok" = 40

# Daemon restart: keys stay usable.
kh_stop
kh_start --config "$KH_DIR/keyholdd.toml"
check "sign after daemon restart" "$KEYHOLD" sign t-ec-p256 --in "$W/msg" --out "$W/sig" --digest sha256
check "openssl verifies after daemon restart" openssl dgst -sha256 -verify "$W/t-ec-p256.pub" \
  -signature "$W/sig" "$W/msg"

# kill -9 with keys loaded: swtpm, like a TPM without resource manager,
# keeps the dead daemon's objects and its slots stay full. Without sole_user
# the restart refuses and names the way out; with it the leftovers are
# flushed and the keys sign again.
for i in 1 2 3 4; do
  "$KEYHOLD" sign "many-$i" --in "$W/msg" --out "$W/sig" --digest sha256 >/dev/null
done
kill -9 "$KH_PID"
wait "$KH_PID" 2>/dev/null || true
KH_PID=""
fails "restart after kill -9 names the full TPM and sole_user" "sole_user = true" \
  timeout 30 "$KEYHOLDD" --config "$KH_DIR/keyholdd.toml" --socket "$KH_DIR/other.sock" \
  --state-dir "$KH_DIR/state" --log-level error
{ cat "$KH_DIR/keyholdd.toml"; echo "sole_user = true"; } >"$KH_DIR/sole.toml"
kh_start --config "$KH_DIR/sole.toml"
check "sole_user flushed the dead daemon's objects" \
  grep -q "flushed [0-9]* transient objects and sessions left in the TPM" "$KH_DIR/keyholdd.log"
check "sign after kill -9 and restart" "$KEYHOLD" sign t-ec-p256 --in "$W/msg" --out "$W/sig" --digest sha256
check "openssl verifies after kill -9" openssl dgst -sha256 -verify "$W/t-ec-p256.pub" \
  -signature "$W/sig" "$W/msg"

# TPM restart: a clear error while it is gone, then recovery.
stop_swtpm
fails "sign while the TPM is down" "TPM" \
  "$KEYHOLD" sign t-ec-p256 --in "$W/msg" --out "$W/sig" --digest sha256
check "software key works while the TPM is down" "$KEYHOLD" sign s-ec --in "$W/msg" --out "$W/sig" --digest sha256
start_swtpm "$KH_DIR/tpm" "$PORT"
check "sign after TPM restart" "$KEYHOLD" sign t-ec-p256 --in "$W/msg" --out "$W/sig" --digest sha256
check "openssl verifies after TPM restart" openssl dgst -sha256 -verify "$W/t-ec-p256.pub" \
  -signature "$W/sig" "$W/msg"
# A TPM restarted without anyone sending TPM2_Startup (no startup-clear):
# the backend starts it itself on reconnecting. The TPM is shut down in
# order first (tpm2_shutdown), since every start after a disorderly stop
# counts as a failed authorization and this test's keys are DA-protected.
check "orderly TPM2_Shutdown" tpm2_shutdown -T "swtpm:host=127.0.0.1,port=$PORT"
stop_swtpm
SWTPM_FLAGS=not-need-init start_swtpm "$KH_DIR/tpm" "$PORT"
check "sign after a restart that left the TPM unstarted" "$KEYHOLD" sign t-ec-p256 \
  --in "$W/msg" --out "$W/sig" --digest sha256
check "the daemon sent TPM2_Startup" grep -q "the TPM was not started; sent TPM2_Startup" \
  "$KH_DIR/keyholdd.log"
check "openssl verifies after the unstarted restart" openssl dgst -sha256 \
  -verify "$W/t-ec-p256.pub" -signature "$W/sig" "$W/msg"

# No TPM yet when the daemon starts (a TPM device or resource manager that
# appears later in boot): keyholdd starts anyway, software keys work, TPM
# requests say the TPM is unavailable, and the first one after swtpm is up
# connects. Shut down in order first, as above.
kh_stop
check "orderly TPM2_Shutdown before starting without it" \
  tpm2_shutdown -T "swtpm:host=127.0.0.1,port=$PORT"
stop_swtpm
log_from=$(($(wc -l <"$KH_DIR/keyholdd.log") + 1))
kh_start --config "$KH_DIR/sole.toml"
check "keyholdd started without the TPM and says so" sh -c \
  "tail -n +$log_from '$KH_DIR/keyholdd.log' | grep -q 'starting without the TPM'"
check "software key works with no TPM since the start" "$KEYHOLD" sign s-ec --in "$W/msg" \
  --out "$W/sig" --digest sha256
fails "TPM key with no TPM since the start" "TPM unavailable" \
  "$KEYHOLD" sign t-ec-p256 --in "$W/msg" --out "$W/sig" --digest sha256
check "admin stats shows the TPM not connected" sh -c \
  "'$KEYHOLD' admin stats | grep -E '^tpm +not connected: TPM unavailable: cannot open TCTI'"
check "admin stats shows the software backend ready" sh -c \
  "'$KEYHOLD' admin stats | grep -E '^software +ready'"
start_swtpm "$KH_DIR/tpm" "$PORT"
check "TPM key works once the TPM is up" "$KEYHOLD" sign t-ec-p256 --in "$W/msg" \
  --out "$W/sig" --digest sha256
check "openssl verifies the late TPM's signature" openssl dgst -sha256 \
  -verify "$W/t-ec-p256.pub" -signature "$W/sig" "$W/msg"
check "keyholdd logged the connection" sh -c \
  "tail -n +$log_from '$KH_DIR/keyholdd.log' | grep -q 'connected to the TPM'"
check "admin stats shows the TPM connected" sh -c \
  "'$KEYHOLD' admin stats | grep -E '^tpm +connected \(swtpm:'"

# A TPM that stops answering (swtpm stopped with SIGSTOP: connections are
# accepted, commands never answered). The request inside the TPM waits for
# it; everything else is answered; other TPM requests get "TPM busy" after
# acquire_timeout_ms (at once when the TPM has already been silent that
# long) instead of each holding a blocking-pool thread for as long as the
# TPM stays silent, which would starve key generation and every other
# backend. Once the TPM answers again, so does the hung request.
{
  cat "$KH_DIR/sole.toml"
  echo "acquire_timeout_ms = 2000"
  printf '[limits]\nio_timeout_seconds = 2\n'
} >"$KH_DIR/hang.toml"
kh_stop
kh_start --config "$KH_DIR/hang.toml"
kill -STOP "$SWTPM_PID"
timeout 120 "$KEYHOLD" sign t-ec-p256 --in "$W/msg" --out "$W/hung.sig" --digest sha256 \
  2>"$W/hung.err" &
HUNG=$!
# A command is in swtpm's receive queue once the daemon has sent it.
command_queued() {
  ss -Htn state established "( sport = :$PORT )" | awk '$1 > 0 {f=1} END {exit !f}'
}
wait_command_queued() {
  for _ in $(seq 1 200); do
    command_queued && return 0
    sleep 0.05
  done
  return 1
}
check "a TPM command is waiting in the stopped swtpm" wait_command_queued
check "ping answers while the TPM is silent" timeout 10 "$KEYHOLD" ping
check "key list answers while the TPM is silent" timeout 10 "$KEYHOLD" key list
check "admin stats names the call waiting in the TPM" sh -c \
  "timeout 10 '$KEYHOLD' admin stats | grep -q \"TPM backend 'tpm': a request has been in the TPM for\""
check "a software key signs while the TPM is silent" \
  timeout 10 "$KEYHOLD" sign s-ec --in "$W/msg" --out "$W/sig" --digest sha256
fails "another TPM key use says the TPM is busy" "TPM busy" \
  timeout 30 "$KEYHOLD" sign t-ec-p384 --in "$W/msg" --out "$W/sig" --digest sha256
# A flood of TPM requests (more than the blocking pool has threads) gets
# its answers without delay, and leaves the pool to everyone else.
FLOOD=()
for i in $(seq 1 8); do
  timeout 60 "$KEYHOLD" sign "many-$i" --in "$W/msg" --out "$W/flood-$i.sig" --digest sha256 \
    2>"$W/flood-$i.err" &
  FLOOD+=($!)
done
sleep 1  # the flood reaches the daemon first (without the bound it held every pool thread)
check "a software key is created (blocking pool) during a flood of TPM requests" \
  timeout 20 "$KEYHOLD" key create s-during-hang --type rsa-2048
busy=0
for i in $(seq 1 8); do
  if ! wait "${FLOOD[$((i - 1))]}" && grep -q "TPM busy" "$W/flood-$i.err"; then
    busy=$((busy + 1))
  fi
done
check "all 8 flooding TPM requests were answered \"TPM busy\"" test "$busy" = 8
check "the daemon is still running" kill -0 "$KH_PID"
kill -CONT "$SWTPM_PID"
check "the hung request is answered once the TPM answers" wait "$HUNG"
check "openssl verifies the hung request's signature" openssl dgst -sha256 \
  -verify "$W/t-ec-p256.pub" -signature "$W/hung.sig" "$W/msg"
check "TPM keys sign again" "$KEYHOLD" sign t-ec-p384 --in "$W/msg" --out "$W/sig" --digest sha256
check "openssl verifies after the silent TPM" openssl dgst -sha256 \
  -verify "$W/t-ec-p384.pub" -signature "$W/sig" "$W/msg"
# SIGTERM while a TPM call never returns: keyholdd gives its sessions
# io_timeout_seconds (2 here), then 5 s more, then exits without the call
# instead of waiting for the TPM (systemd would kill it only after
# TimeoutStopSec). Nothing is lost: after a restart the keys sign.
kill -STOP "$SWTPM_PID"
timeout 120 "$KEYHOLD" sign t-ec-p256 --in "$W/msg" --out "$W/cut.sig" --digest sha256 \
  2>"$W/cut.err" &
CUT=$!
check "a TPM command is waiting in the stopped swtpm again" wait_command_queued
kh_check_forced_exit "$CUT" \
  "TPM backend 'tpm': a request has been in the TPM for"
kill -CONT "$SWTPM_PID"
kh_start --config "$KH_DIR/hang.toml"
check "sign after the forced exit and a restart" "$KEYHOLD" sign t-ec-p256 \
  --in "$W/msg" --out "$W/sig" --digest sha256
check "openssl verifies after the forced exit" openssl dgst -sha256 \
  -verify "$W/t-ec-p256.pub" -signature "$W/sig" "$W/msg"

# Through the OpenSSL provider (dev builds set KEYHOLD_PROVIDER).
if [ -n "${KEYHOLD_PROVIDER:-}" ]; then
  CNF="$KH_DIR/openssl-keyhold.cnf"
  sed "s|^# module = .*|module = $(realpath "$KEYHOLD_PROVIDER")|" \
    "$(dirname "$0")/../../conf/openssl-keyhold.cnf" >"$CNF"
  for type in ec-p256 rsa-2048; do
    check "provider signs with TPM key $type" env OPENSSL_CONF="$CNF" openssl dgst -sha256 \
      -sign "keyhold:t-$type" -out "$W/sig" "$W/msg"
    check "openssl verifies provider signature $type" openssl dgst -sha256 -verify "$W/t-$type.pub" \
      -signature "$W/sig" "$W/msg"
  done
fi

# Through the PKCS#11 module (dev builds set KEYHOLD_PKCS11).
if [ -n "${KEYHOLD_PKCS11:-}" ] && command -v pkcs11-tool >/dev/null; then
  key_id() {  # CKA_ID = SHA-256 of the DER SubjectPublicKeyInfo
    openssl pkey -pubin -in "$W/$1.pub" -outform DER | sha256sum | cut -c1-64
  }
  check "pkcs11-tool signs with TPM key ec-p256" timeout 20 pkcs11-tool --module "$KEYHOLD_PKCS11" \
    --sign -m ECDSA-SHA256 --id "$(key_id t-ec-p256)" -i "$W/msg" -o "$W/sig" --signature-format openssl
  check "openssl verifies the PKCS#11 signature" openssl dgst -sha256 -verify "$W/t-ec-p256.pub" \
    -signature "$W/sig" "$W/msg"
  check "pkcs11-tool signs with TPM key rsa-2048" timeout 20 pkcs11-tool --module "$KEYHOLD_PKCS11" \
    --sign -m SHA256-RSA-PKCS --id "$(key_id t-rsa-2048)" -i "$W/msg" -o "$W/sig"
  check "openssl verifies the PKCS#11 RSA signature" openssl dgst -sha256 -verify "$W/t-rsa-2048.pub" \
    -signature "$W/sig" "$W/msg"
fi

# A copy of the state directory (key store and master key) with a fresh TPM:
# the TPM keys are useless, the software key still works.
kh_stop
stop_swtpm
mv "$KH_DIR/state" "$KH_DIR/state.orig"
cp -a "$KH_DIR/state.orig" "$KH_DIR/state"
PORT2="$(kh_free_port 2)"
start_swtpm "$KH_DIR/fresh-tpm" "$PORT2"
sed "s/port=$PORT/port=$PORT2/" "$KH_DIR/keyholdd.toml" >"$KH_DIR/fresh.toml"
kh_start --config "$KH_DIR/fresh.toml"
fails "copied key store cannot sign on a fresh TPM" "TPM" \
  "$KEYHOLD" sign t-ec-p256 --in "$W/msg" --out "$W/sig" --digest sha256
check "software key from the copy still signs" "$KEYHOLD" sign s-ec --in "$W/msg" --out "$W/sig" --digest sha256

# The master key sealed by the TPM (master_key_sealed_by, docs/tpm.md): back
# on the original state directory and TPM, the existing master.key moves
# into the TPM, and from then on the state directory needs this TPM.
kh_stop
stop_swtpm
rm -rf "$KH_DIR/state"
mv "$KH_DIR/state.orig" "$KH_DIR/state"
start_swtpm "$KH_DIR/tpm" "$PORT"
S="$KH_DIR/state"
cp "$S/master.key" "$W/master.key.offline"
{ echo 'master_key_sealed_by = "tpm"'; cat "$KH_DIR/keyholdd.toml"; } >"$KH_DIR/sealed.toml"
kh_start --config "$KH_DIR/sealed.toml"
check "master.key moved into the TPM" sh -c "test ! -e '$S/master.key' && test -s '$S/master.key.tpm'"
check "master.key.tpm is 0600" test "$(stat -c %a "$S/master.key.tpm")" = 600
check "master.key.tpm does not hold the key in clear" python3 -c \
  "import sys; sys.exit(open(sys.argv[1], 'rb').read() in open(sys.argv[2], 'rb').read())" \
  "$W/master.key.offline" "$S/master.key.tpm"
check "the move is logged" grep -q "master key moved into TPM backend 'tpm'" "$KH_DIR/keyholdd.log"
check "software key from before signs" "$KEYHOLD" sign s-ec --in "$W/msg" --out "$W/sig" --digest sha256
check "openssl verifies it" openssl dgst -sha256 -verify "$W/s-ec.pub" -signature "$W/sig" "$W/msg"
check "TPM key from before signs" "$KEYHOLD" sign t-ec-p256 --in "$W/msg" --out "$W/sig" --digest sha256
check "openssl verifies the TPM key" openssl dgst -sha256 -verify "$W/t-ec-p256.pub" -signature "$W/sig" "$W/msg"
check "create a software key under the sealed master key" "$KEYHOLD" key create s-sealed --type rsa-2048
check "public s-sealed" "$KEYHOLD" key public s-sealed
cp "$KH_DIR/out" "$W/s-sealed.pub"
kh_stop
kh_start --config "$KH_DIR/sealed.toml"
check "after a restart the TPM unseals it" grep -q "master key unsealed by TPM backend 'tpm'" "$KH_DIR/keyholdd.log"
for k in s-ec s-sealed; do
  check "$k signs after the restart" "$KEYHOLD" sign "$k" --in "$W/msg" --out "$W/sig" --digest sha256
  check "openssl verifies $k" openssl dgst -sha256 -verify "$W/$k.pub" -signature "$W/sig" "$W/msg"
done
# A crash after master.key.tpm was written but before master.key was deleted
# (or the offline copy restored by mistake): the same key, so it goes.
kh_stop
cp "$W/master.key.offline" "$S/master.key"
kh_start --config "$KH_DIR/sealed.toml"
check "a leftover master.key with the same key is deleted" test ! -e "$S/master.key"
check "and keys still sign" "$KEYHOLD" sign s-sealed --in "$W/msg" --out "$W/sig" --digest sha256
kh_stop
# A different master.key next to the sealed one: refuse, delete nothing.
head -c 32 /dev/urandom >"$S/master.key"
chmod 600 "$S/master.key"
sum_before="$(sha256sum "$S/master.key" "$S/master.key.tpm")"
fails "conflicting master keys stop the start" "hold different master keys" \
  timeout 30 "$KEYHOLDD" --config "$KH_DIR/sealed.toml" --socket "$KH_DIR/other.sock" \
  --state-dir "$S" --log-level error
check "neither file was touched" test "$sum_before" = "$(sha256sum "$S/master.key" "$S/master.key.tpm")"
rm "$S/master.key"
# The setting removed while only the sealed key exists: refuse to start
# (a fresh master.key would orphan every key), create nothing.
fails "without master_key_sealed_by the sealed key is not replaced" \
  "master_key_sealed_by is not set" \
  timeout 30 "$KEYHOLDD" --config "$KH_DIR/keyholdd.toml" --socket "$KH_DIR/other.sock" \
  --state-dir "$S" --log-level error
check "and no new master.key was made" test ! -e "$S/master.key"
# The state directory with another TPM: the daemon does not start, says
# why, and keeps the sealed file.
stop_swtpm
start_swtpm "$KH_DIR/fresh-tpm" "$PORT2"
sed "s/port=$PORT/port=$PORT2/" "$KH_DIR/sealed.toml" >"$KH_DIR/sealed-fresh.toml"
sum_before="$(sha256sum "$S/master.key.tpm")"
fails "another TPM cannot unseal the master key" "another TPM" \
  timeout 30 "$KEYHOLDD" --config "$KH_DIR/sealed-fresh.toml" --socket "$KH_DIR/other.sock" \
  --state-dir "$S" --log-level error
check "the sealed file is kept" test "$sum_before" = "$(sha256sum "$S/master.key.tpm")"
check "no master.key appeared" test ! -e "$S/master.key"
# Without the TPM at all: a clear error too.
stop_swtpm
fails "no TPM: the daemon says so" "TPM" \
  timeout 30 "$KEYHOLDD" --config "$KH_DIR/sealed.toml" --socket "$KH_DIR/other.sock" \
  --state-dir "$S" --log-level error
# The right TPM again: everything is back.
start_swtpm "$KH_DIR/tpm" "$PORT"
kh_start --config "$KH_DIR/sealed.toml"
check "with its own TPM the key store works again" "$KEYHOLD" sign s-sealed --in "$W/msg" \
  --out "$W/sig" --digest sha256
check "openssl verifies s-sealed" openssl dgst -sha256 -verify "$W/s-sealed.pub" -signature "$W/sig" "$W/msg"
# A fresh state directory with sealing from the start never writes master.key.
kh_stop
mv "$S" "$KH_DIR/state.sealed"
kh_start --config "$KH_DIR/sealed.toml"
check "fresh install: only master.key.tpm" sh -c "test ! -e '$S/master.key' && test -s '$S/master.key.tpm'"
check "fresh install: keys work" "$KEYHOLD" key create s-fresh --type ec-p256
check "fresh install: sign" "$KEYHOLD" sign s-fresh --in "$W/msg" --out "$W/sig" --digest sha256
# Recovery on a new TPM from the offline copy (docs/tpm.md): restore it as
# master.key, delete master.key.tpm, start; the new TPM seals it.
kh_stop
rm -rf "$S"
mv "$KH_DIR/state.sealed" "$S"
stop_swtpm
start_swtpm "$KH_DIR/fresh-tpm" "$PORT2"
cp "$W/master.key.offline" "$S/master.key"
chmod 600 "$S/master.key"
rm "$S/master.key.tpm"
kh_start --config "$KH_DIR/sealed-fresh.toml"
check "recovered on a new TPM: software key signs" "$KEYHOLD" sign s-sealed --in "$W/msg" \
  --out "$W/sig" --digest sha256
check "openssl verifies the recovered key" openssl dgst -sha256 -verify "$W/s-sealed.pub" \
  -signature "$W/sig" "$W/msg"
check "recovered: sealed for the new TPM" sh -c "test ! -e '$S/master.key' && test -s '$S/master.key.tpm'"

kh_summary
