#!/bin/bash
# The Debian package on this machine, as an admin would use it: cpack builds
# keyhold_*.deb from the build directory, `apt-get install ./keyhold_*.deb`
# installs it (the keyhold user, its directories, conffiles, the enabled
# socket unit), systemd-analyze checks the units, and the installed keyholdd
# runs as the keyhold user under systemd-socket-activate (no systemd needed)
# on its default socket. The installed CLI creates a key; the installed
# OpenSSL provider (with the shipped /etc/keyhold/openssl-keyhold.cnf) and
# the installed PKCS#11 module sign with it, and plain openssl verifies.
# `apt-get purge` then removes the user, the key store and every file; a
# second round with /etc/keyhold/keep-key-store-on-purge keeps the key store
# and user, and a reinstall serves the kept key.
#
# Root only (it installs a package); skips (77) otherwise, or when keyhold
# is already installed or left over from something else. The package is
# purged on every exit path. ctest runs it alone (RUN_SERIAL): while it is
# installed, p11-kit programs system-wide see the keyhold module.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "SKIP: deb_test installs a package and needs root"
  exit 77
fi
if dpkg-query -W -f='${Status}\n' keyhold 2>/dev/null | grep -qv "not-installed"; then
  echo "SKIP: a keyhold package is installed (or not purged) already; not touching it"
  exit 77
fi
for leftover in /etc/keyhold /var/lib/keyhold /run/keyhold; do
  if [ -e "$leftover" ]; then
    echo "SKIP: $leftover exists (not from this test); not touching it"
    exit 77
  fi
done
if getent passwd keyhold >/dev/null || getent group keyhold >/dev/null; then
  echo "SKIP: a keyhold user or group exists already (not from this test)"
  exit 77
fi

: "${KH_BUILD_DIR:?build directory to package}"
# Everything below uses the installed programs and their built-in defaults
# (socket /run/keyhold/keyhold.sock, state /var/lib/keyhold).
export KEYHOLDD=/usr/sbin/keyholdd KEYHOLD=/usr/bin/keyhold
source "$(dirname "$0")/lib.sh"
unset KEYHOLD_SOCKET KEYHOLD_DAEMON_UID OPENSSL_CONF OPENSSL_MODULES
export DEBIAN_FRONTEND=noninteractive
W="$KH_DIR/work"
mkdir -p "$W"
SOCK=/run/keyhold/keyhold.sock
MARKER=/etc/keyhold/keep-key-store-on-purge
modules="$(openssl version -m | sed -n 's/^MODULESDIR: "\(.*\)"$/\1/p')"
p11_modules="$(pkg-config p11-kit-1 --variable p11_module_path)"
p11_configs="$(pkg-config p11-kit-1 --variable p11_module_configs)"
MODULE="$p11_modules/libkeyhold-pkcs11.so"

DAEMON_PID=""
NOTIFY_PID=""
TOUCHED=0  # set once this test may have installed something

# The installed daemon as the keyhold user. systemd-socket-activate (as
# root, like systemd) binds the socket and execs setpriv, which execs
# keyholdd with LISTEN_FDS=1: the process id stays the same throughout. The
# socket file then gets the owner and mode keyholdd.socket gives it
# (SocketUser=keyhold, SocketMode=0666): clients check that the daemon
# answering runs as the socket file's owner. NOTIFY_SOCKET receives the
# daemon's sd_notify messages.
start_daemon() {
  rm -f "$KH_DIR/notify.log" "$KH_DIR/notify.sock"
  python3 - "$KH_DIR/notify.sock" "$KH_DIR/notify.log" <<'PY' &
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
s.settimeout(120)
with open(sys.argv[2], "a", buffering=1) as log:
    while True:
        try:
            msg = s.recv(4096)
        except socket.timeout:
            break
        log.write(msg.decode(errors="replace").replace("\n", " ") + "\n")
PY
  NOTIFY_PID=$!
  for _ in $(seq 1 100); do
    [ -S "$KH_DIR/notify.sock" ] && break
    sleep 0.05
  done
  systemd-socket-activate -l "$SOCK" -E NOTIFY_SOCKET="$KH_DIR/notify.sock" \
    /usr/bin/setpriv --reuid=keyhold --regid=keyhold --clear-groups \
    /usr/sbin/keyholdd 2>>"$KH_DIR/keyholdd.log" &
  DAEMON_PID=$!
  for _ in $(seq 1 100); do
    [ -S "$SOCK" ] && break
    sleep 0.05
  done
  chown keyhold:keyhold "$SOCK"
  chmod 0666 "$SOCK"
  # Like systemd, systemd-socket-activate starts the daemon on the first
  # connection, which it must then serve: that client sees the listening
  # socket's credentials from before keyholdd took it over.
  if timeout 30 /usr/bin/keyhold ping >/dev/null 2>"$KH_DIR/first-ping.err"; then
    return 0
  fi
  echo "the first connection, which started the installed keyholdd, failed:" >&2
  cat "$KH_DIR/first-ping.err" >&2
  echo "keyholdd's log:" >&2
  cat "$KH_DIR/keyholdd.log" >&2
  return 1
}

stop_daemon() {
  if [ -n "$DAEMON_PID" ]; then
    kill "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=""
  fi
  if [ -n "$NOTIFY_PID" ]; then
    kill "$NOTIFY_PID" 2>/dev/null || true
    wait "$NOTIFY_PID" 2>/dev/null || true
    NOTIFY_PID=""
  fi
}

# Waits until the daemon has sent MESSAGE (a line of $KH_DIR/notify.log)
# at least COUNT times.
notified() {
  local message="$1" count="${2:-1}"
  for _ in $(seq 1 100); do
    if [ "$(grep -c -- "$message" "$KH_DIR/notify.log" 2>/dev/null)" -ge "$count" ]; then
      return 0
    fi
    sleep 0.05
  done
  return 1
}

# Whatever happened: the daemon stopped, the package purged, nothing of
# keyhold left on the machine (none of it existed before, see the skips).
deb_cleanup() {
  stop_daemon
  if [ "$TOUCHED" = 1 ]; then
    rm -f "$MARKER"
    if dpkg-query -W -f='${Status}\n' keyhold 2>/dev/null | grep -qv "not-installed"; then
      apt-get purge -y -qq keyhold >/dev/null 2>&1 || dpkg --purge keyhold >/dev/null 2>&1 || true
    fi
    rm -rf /var/lib/keyhold /run/keyhold /etc/keyhold
    if getent passwd keyhold >/dev/null; then userdel keyhold || true; fi
    if getent group keyhold >/dev/null; then groupdel keyhold || true; fi
  fi
  kh_cleanup
}
trap deb_cleanup EXIT

install_deb() {
  TOUCHED=1
  apt-get install -y -q --no-install-recommends "$DEB"
}

# --- the package -----------------------------------------------------------
check "cpack builds the .deb" cpack -G DEB --config "$KH_BUILD_DIR/CPackConfig.cmake" -B "$KH_DIR/pkg"
DEB="$(find "$KH_DIR/pkg" -maxdepth 1 -name 'keyhold_*.deb' | head -n 1)"
if [ -z "$DEB" ]; then
  echo "FAIL: no keyhold_*.deb in $KH_DIR/pkg" >&2
  exit 1
fi
dpkg-deb -f "$DEB" Depends >"$W/depends"
check "Depends is computed (libc6, libssl3, ...) and names adduser" \
  sh -c "grep -q 'libc6' '$W/depends' && grep -q 'libssl3' '$W/depends' && grep -q 'adduser' '$W/depends'"
dpkg-deb -c "$DEB" | awk '{ print $6 }' | sed 's|^\./|/|' >"$W/contents"
grep -v '/$' "$W/contents" >"$W/files"
for f in /usr/sbin/keyholdd /usr/bin/keyhold "$modules/keyhold.so" "$MODULE" \
    "$p11_configs/keyhold.module" /etc/keyhold/keyholdd.toml.example \
    /etc/keyhold/openssl-keyhold.cnf /lib/systemd/system/keyholdd.service \
    /lib/systemd/system/keyholdd.socket /usr/lib/tmpfiles.d/keyhold.conf \
    /usr/lib/sysusers.d/keyhold.conf; do
  check "the package holds $f" grep -qx -- "$f" "$W/files"
done
check "the package holds nothing outside /usr, /lib and /etc/keyhold" \
  sh -c "! grep -vE '^/(usr|lib|etc/keyhold)(/|$)|^/(etc)?/?$' '$W/contents'"
check "the package holds no headers, static libraries or test programs" \
  sh -c "! grep -E '/include/|\\.a$|_test$|gtest' '$W/files'"
dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles >"$W/conffiles"
check "every /etc/keyhold file is a conffile" \
  bash -c "grep '^/etc/' '$W/files' | sort | cmp - <(sort '$W/conffiles')"

# --- install -----------------------------------------------------------------
check "apt-get install ./keyhold_*.deb" install_deb
check "the keyhold user exists" getent passwd keyhold
check "... is a system user without a login shell, home /var/lib/keyhold" sh -c \
  "getent passwd keyhold | awk -F: '\$3 < 1000 && \$6 == \"/var/lib/keyhold\" && \$7 ~ /nologin|false/' | grep -q ."
check "the keyhold group exists" getent group keyhold
check "/var/lib/keyhold is 0700 keyhold:keyhold" \
  sh -c "[ \"\$(stat -c '%a %U %G' /var/lib/keyhold)\" = '700 keyhold keyhold' ]"
check "/run/keyhold is 0755 keyhold:keyhold" \
  sh -c "[ \"\$(stat -c '%a %U %G' /run/keyhold)\" = '755 keyhold keyhold' ]"
while read -r f; do
  check "installed: $f" test -e "$f"
done <"$W/files"
check "dpkg records the /etc/keyhold files as conffiles" bash -c \
  "dpkg-query -W -f='\${Conffiles}\n' keyhold | awk '{print \$1}' | grep -v '^$' | sort | cmp - <(sort '$W/conffiles')"
check "the socket unit is enabled (sockets.target.wants)" \
  test -L /etc/systemd/system/sockets.target.wants/keyholdd.socket
check "systemd-analyze verify accepts the installed units" sh -c \
  "systemd-analyze verify /lib/systemd/system/keyholdd.socket /lib/systemd/system/keyholdd.service 2>&1 | tee /dev/stderr | (! grep -q .)"
check "systemd-analyze security rates the service's exposure at most 1.5" \
  systemd-analyze security --offline=true --threshold=15 /lib/systemd/system/keyholdd.service
check "... and it is SAFE" grep -q "Overall exposure level for keyholdd.service: [0-9.]* SAFE" "$KH_DIR/out"
check "systemd-tmpfiles accepts keyhold.conf" systemd-tmpfiles --create keyhold.conf
check "systemd-sysusers accepts keyhold.conf (the user exists already)" \
  systemd-sysusers --dry-run keyhold.conf

# --- the installed daemon, socket-activated, as the keyhold user ------------
# An admin's configuration: the shipped example (every default), readable
# by the daemon, so SIGHUP has a file to reload.
cp /etc/keyhold/keyholdd.toml.example /etc/keyhold/keyholdd.toml
chmod 0644 /etc/keyhold/keyholdd.toml
check "the installed keyholdd starts (/etc/keyhold/keyholdd.toml, socket from systemd-socket-activate)" start_daemon
check "it sent READY=1" notified "READY=1"
check "it runs as the keyhold user" sh -c \
  "[ \"\$(ps -o user= -p '$DAEMON_PID')\" = keyhold ]"
check "it took the state directory /var/lib/keyhold" test -f /var/lib/keyhold/keys.db
check "the installed CLI creates a key" /usr/bin/keyhold key create deb-k --type ec-p256
check "... and prints its public key" sh -c "/usr/bin/keyhold key public deb-k >'$W/k.pub'"
printf 'signed through the installed package\n' >"$W/msg"
openssl dgst -sha256 -binary "$W/msg" >"$W/msg.sha256"
check "the installed provider signs (OPENSSL_CONF=/etc/keyhold/openssl-keyhold.cnf)" \
  env OPENSSL_CONF=/etc/keyhold/openssl-keyhold.cnf \
  openssl pkeyutl -sign -inkey keyhold:deb-k -in "$W/msg.sha256" -out "$W/sig.ossl"
check "... and plain openssl verifies the signature" \
  openssl pkeyutl -verify -pubin -inkey "$W/k.pub" -in "$W/msg.sha256" -sigfile "$W/sig.ossl"
id="$(openssl pkey -pubin -in "$W/k.pub" -outform DER 2>/dev/null | sha256sum | cut -c1-64)"
check "the installed PKCS#11 module signs ($MODULE)" \
  timeout 20 pkcs11-tool --module "$MODULE" --sign -m ECDSA-SHA256 --id "$id" \
  -i "$W/msg" -o "$W/sig.p11" --signature-format openssl
check "... and plain openssl verifies the signature" \
  openssl dgst -sha256 -verify "$W/k.pub" -signature "$W/sig.p11" "$W/msg"
check "p11-kit loads the installed module from its registry" \
  sh -c "timeout 20 p11-kit list-modules | grep -q 'libkeyhold-pkcs11.so'"
check "SIGHUP: the daemon reloads (RELOADING=1, then READY=1 again)" \
  sh -c "kill -HUP '$DAEMON_PID'"
check "... RELOADING=1" notified "RELOADING=1"
check "... READY=1" notified "READY=1" 2
check "... the log says it reloaded the file" grep -q "reloaded /etc/keyhold/keyholdd.toml" "$KH_DIR/keyholdd.log"
check "... and still serves" /usr/bin/keyhold ping
kill -TERM "$DAEMON_PID"
check "SIGTERM: STOPPING=1" notified "STOPPING=1"
stop_daemon

# A secret of the daemon's own beside the config (an HSM PIN file): purge
# must not leave it behind, owned by a uid that no longer exists.
printf '1234\n' >/etc/keyhold/hsm.pin
chown keyhold:keyhold /etc/keyhold/hsm.pin
chmod 0600 /etc/keyhold/hsm.pin

# --- purge -------------------------------------------------------------------
check "apt-get purge keyhold" apt-get purge -y -q keyhold
check "dpkg no longer knows keyhold" sh -c \
  "! dpkg-query -W -f='\${Status}\n' keyhold 2>/dev/null | grep -qv not-installed"
check "the keyhold user is gone" sh -c "! getent passwd keyhold"
check "the keyhold group is gone" sh -c "! getent group keyhold"
check "the key store /var/lib/keyhold is gone" test ! -e /var/lib/keyhold
check "/run/keyhold is gone" test ! -e /run/keyhold
check "/etc/keyhold holds only the admin's own keyholdd.toml (conffiles and the keyhold-owned PIN file are gone)" \
  sh -c "[ \"\$(ls -A /etc/keyhold)\" = keyholdd.toml ]"
rm -rf /etc/keyhold
check "the socket unit is no longer enabled" \
  test ! -e /etc/systemd/system/sockets.target.wants/keyholdd.socket
left=0
while read -r f; do
  if [ -e "$f" ]; then
    echo "left after purge: $f" >&2
    left=1
  fi
done <"$W/files"
check "no installed file is left" test "$left" = 0

# --- purge with the key store kept, then reinstalled --------------------------
check "install again" install_deb
check "... and start" start_daemon
check "create a key to keep" sh -c "/usr/bin/keyhold key create deb-kept --type ed25519 >'$W/kept.fp'"
/usr/bin/keyhold key public deb-kept >"$W/kept.pub" || true
stop_daemon
uid="$(id -u keyhold)"
touch "$MARKER"
check "apt-get purge keyhold with $MARKER" apt-get purge -y -q keyhold
check "... the package is purged" sh -c \
  "! dpkg-query -W -f='\${Status}\n' keyhold 2>/dev/null | grep -qv not-installed"
check "... the key store stays" test -f /var/lib/keyhold/keys.db -a -f /var/lib/keyhold/master.key
check "... the keyhold user stays, same uid" test "$(id -u keyhold 2>/dev/null)" = "$uid"
check "... and still owns the key store, 0700" \
  sh -c "[ \"\$(stat -c '%a %U' /var/lib/keyhold)\" = '700 keyhold' ]"
check "... the installed programs are gone" test ! -e /usr/sbin/keyholdd
check "install once more over the kept key store" install_deb
check "... start" start_daemon
check "... the kept key is listed" sh -c "/usr/bin/keyhold key list | grep -q deb-kept"
check "... its public key is the same" sh -c "/usr/bin/keyhold key public deb-kept | cmp - '$W/kept.pub'"
printf 'kept\n' >"$W/kept.msg"
check "... it signs" /usr/bin/keyhold sign deb-kept --in "$W/kept.msg" --out "$W/kept.sig"
check "... verified by plain openssl" openssl pkeyutl -verify -pubin -inkey "$W/kept.pub" \
  -rawin -in "$W/kept.msg" -sigfile "$W/kept.sig"
stop_daemon
rm -f "$MARKER"
check "purge without the marker" apt-get purge -y -q keyhold
check "... removes the kept key store and the user" \
  sh -c "[ ! -e /var/lib/keyhold ] && ! getent passwd keyhold && [ ! -e /etc/keyhold ]"
kh_summary
