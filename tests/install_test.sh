#!/bin/bash
# `cmake --install` (prefix /usr, into a scratch DESTDIR) puts every file
# where the system's own tools look: keyhold.so in the directory
# `openssl version -m` names, libkeyhold-pkcs11.so in p11-kit's module
# directory, keyhold.module in p11-kit's registry. Then the installed
# provider is found by name alone, with the shipped snippet (which names no
# module path) and OPENSSL_MODULES pointing at the installed directory, and
# the installed PKCS#11 module serves the daemon's keys.
source "$(dirname "$0")/lib.sh"
: "${KH_BUILD_DIR:?build directory to install from}"
root="$(cd "$(dirname "$0")/.." && pwd)"
D="$KH_DIR/destdir"

check "cmake --install --prefix /usr" env DESTDIR="$D" cmake --install "$KH_BUILD_DIR" --prefix /usr
modules="$(openssl version -m | sed -n 's/^MODULESDIR: "\(.*\)"$/\1/p')"
p11_modules="$(pkg-config p11-kit-1 --variable p11_module_path)"
p11_configs="$(pkg-config p11-kit-1 --variable p11_module_configs)"
check "keyhold.so is in OpenSSL's modules directory ($modules)" test -f "$D$modules/keyhold.so"
check "libkeyhold-pkcs11.so is in p11-kit's module directory ($p11_modules)" \
  test -f "$D$p11_modules/libkeyhold-pkcs11.so"
check "keyhold.module is in p11-kit's registry ($p11_configs)" test -f "$D$p11_configs/keyhold.module"
check "keyholdd is installed in /usr/sbin" test -x "$D/usr/sbin/keyholdd"
check "keyhold is installed in /usr/bin" test -x "$D/usr/bin/keyhold"
check "the config examples are in /etc/keyhold" \
  test -f "$D/etc/keyhold/keyholdd.toml.example" -a -f "$D/etc/keyhold/openssl-keyhold.cnf"
check "the installed config example is the shipped one" \
  cmp "$D/etc/keyhold/keyholdd.toml.example" "$root/conf/keyholdd.toml.example"

kh_start
check "create a key" "$KEYHOLD" key create k --type ec-p256
"$KEYHOLD" key public k >"$KH_DIR/k.pub"
installed_ossl() {
  OPENSSL_MODULES="$D$modules" OPENSSL_CONF="$D/etc/keyhold/openssl-keyhold.cnf" openssl "$@"
}
check "openssl finds the installed provider by name" installed_ossl list -providers
check "... and it is active" sh -c "grep -A3 '^  keyhold' '$KH_DIR/out' | grep -q 'status: active'"
check "the installed provider serves keyhold:k" sh -c \
  "OPENSSL_MODULES='$D$modules' OPENSSL_CONF='$D/etc/keyhold/openssl-keyhold.cnf' \
     openssl pkey -in keyhold:k -pubout | cmp - '$KH_DIR/k.pub'"
check "the installed PKCS#11 module lists the key" \
  timeout 20 pkcs11-tool --module "$D$p11_modules/libkeyhold-pkcs11.so" -O --type pubkey
check "... by its name" grep -q "label: *k$" "$KH_DIR/out"
check "the installed keyhold binary talks to the daemon" "$D/usr/bin/keyhold" ping
kh_summary
