#!/bin/bash
# OpenSSH with libkeyhold-pkcs11.so against a real keyholdd: ssh-keygen -D
# prints the daemon-held RSA and ECDSA public keys, `ssh -I` logs in to a
# private sshd on 127.0.0.1, and ssh-agent (`ssh-add -s`, with the -P
# allow-list) serves the same keys.
source "$(dirname "$0")/../lib.sh"
: "${KEYHOLD_PKCS11:?path to libkeyhold-pkcs11.so}"
M="$(realpath "$KEYHOLD_PKCS11")"
if [ "$(id -u)" -ne 0 ]; then
  echo "skipped: sshd needs root"
  exit 77
fi
SSHD="$(command -v sshd || echo /usr/sbin/sshd)"
kh_start
W="$KH_DIR/work"
mkdir -p "$W"
SSHD_PID=""
AGENT_PID=""
cleanup() {
  [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null && wait "$SSHD_PID" 2>/dev/null
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
  kh_cleanup
}
trap cleanup EXIT

types="rsa-2048 ec-p256 ec-p384 ec-p521 ed25519"
for t in $types; do
  check "create $t" "$KEYHOLD" key create "k-$t" --type "$t"
  "$KEYHOLD" key public "k-$t" >"$W/k-$t.pub"
done

# ssh-keygen -D prints each RSA and ECDSA key, as ssh-keygen -i converts the
# PEM that `keyhold key public` prints (OpenSSH 9.2 has no Ed25519 over PKCS#11).
check "ssh-keygen -D" timeout 20 ssh-keygen -D "$M"
cp "$KH_DIR/out" "$W/keygen-D"
check "ssh-keygen -D prints 4 keys" test "$(wc -l <"$W/keygen-D")" = 4
for t in rsa-2048 ec-p256 ec-p384 ec-p521; do
  want="$(ssh-keygen -i -m PKCS8 -f "$W/k-$t.pub")"
  check "ssh-keygen -D prints k-$t" grep -qxF "$want k-$t" "$W/keygen-D"
done

# A private sshd on 127.0.0.1 that accepts exactly those keys.
mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$W/host_key" >/dev/null
cp "$W/keygen-D" "$W/authorized_keys"
start_sshd() {
  local port
  for _ in 1 2 3 4 5; do
    port=$(kh_free_port)
    cat >"$W/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $W/host_key
PidFile $W/sshd.pid
AuthorizedKeysFile $W/authorized_keys
UsePAM no
StrictModes no
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
LogLevel VERBOSE
EOF
    "$SSHD" -f "$W/sshd_config" -D -e 2>"$W/sshd.log" &
    SSHD_PID=$!
    for _ in $(seq 1 50); do
      if grep -q "Server listening" "$W/sshd.log"; then
        SSH_PORT=$port
        return 0
      fi
      kill -0 "$SSHD_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill "$SSHD_PID" 2>/dev/null || true
    wait "$SSHD_PID" 2>/dev/null || true
    SSHD_PID=""
  done
  echo "sshd did not start:" >&2
  cat "$W/sshd.log" >&2
  return 1
}
start_sshd
SSH_OPTS=(-F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no
  -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -p "$SSH_PORT")

check "ssh -I logs in with a daemon-held key" \
  timeout 60 ssh "${SSH_OPTS[@]}" -I "$M" root@127.0.0.1 'echo logged-in'
check "... and ran the command" grep -qx logged-in "$KH_DIR/out"
check "sshd accepted a token key" grep -q "Accepted publickey for root" "$W/sshd.log"

# Only the ECDSA key left in authorized_keys: ssh must sign with ECDSA.
grep "k-ec-p256\$" "$W/keygen-D" >"$W/authorized_keys"
check "ssh -I logs in with ec-p256 only" \
  timeout 60 ssh "${SSH_OPTS[@]}" -I "$M" root@127.0.0.1 true
grep "k-rsa-2048\$" "$W/keygen-D" >"$W/authorized_keys"
check "ssh -I logs in with rsa-2048 only" \
  timeout 60 ssh "${SSH_OPTS[@]}" -I "$M" root@127.0.0.1 true
ssh-keygen -q -t ed25519 -N '' -f "$W/other" >/dev/null
cp "$W/other.pub" "$W/authorized_keys"
ssh_fails() { ! timeout 60 ssh "${SSH_OPTS[@]}" -I "$M" root@127.0.0.1 true; }
check "no login when no token key is authorized" ssh_fails
cp "$W/keygen-D" "$W/authorized_keys"

# ssh-agent: modules outside /usr/lib*/ and /usr/local/lib*/ must be allowed
# with -P. The token has no PIN; the empty answer comes from SSH_ASKPASS.
printf '#!/bin/sh\necho\n' >"$W/askpass"
chmod 755 "$W/askpass"
ssh-agent -D -a "$W/agent.sock" -P "$M" >/dev/null 2>"$W/agent.log" &
AGENT_PID=$!
export SSH_AUTH_SOCK="$W/agent.sock"
for _ in $(seq 1 50); do [ -S "$SSH_AUTH_SOCK" ] && break; sleep 0.1; done
check "ssh-add -s loads the token" env SSH_ASKPASS="$W/askpass" SSH_ASKPASS_REQUIRE=force \
  DISPLAY=:0 timeout 60 ssh-add -s "$M"
check "ssh-add -l" timeout 20 ssh-add -l
check "ssh-add -l lists the 4 token keys" test "$(wc -l <"$KH_DIR/out")" = 4
check "ssh through the agent logs in" timeout 60 ssh "${SSH_OPTS[@]}" -o IdentityAgent="$W/agent.sock" \
  root@127.0.0.1 true
check "ssh-add -e unloads the token" timeout 20 ssh-add -e "$M"
kill "$AGENT_PID" 2>/dev/null || true
wait "$AGENT_PID" 2>/dev/null || true
AGENT_PID=""

kh_summary
