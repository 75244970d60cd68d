#!/bin/bash
# Two real uids (setpriv) against one keyholdd: neither can list, use, delete
# or detect the other's keys; a grant lets the grantee sign but not delete or
# re-share; admin operations are refused to non-admins.
source "$(dirname "$0")/lib.sh"
if [ "$(id -u)" -ne 0 ]; then
  echo "needs root for setpriv"; exit 1
fi
kh_start
W="$KH_DIR/work"
mkdir -p "$W"
chmod 777 "$W"
echo "hello from a test" >"$W/msg"
chmod 644 "$W/msg"

A=64101
B=64102
G=64200  # a group B is in
as_a() { setpriv --reuid=$A --regid=$A --clear-groups -- "$@"; }
as_b() { setpriv --reuid=$B --regid=$B --clear-groups -- "$@"; }
as_b_in_g() { setpriv --reuid=$B --regid=$B --groups=$G -- "$@"; }

check "A creates a key" as_a "$KEYHOLD" key create secret --type ec-p256
check "A's public key" as_a "$KEYHOLD" key public secret
cp "$KH_DIR/out" "$W/secret.pub"
check "B's list is empty" as_b "$KEYHOLD" key list --json
check "B sees nothing" test "$(tr -d '[:space:]' <"$KH_DIR/out")" = "[]"

# Not granted: reads exactly like a key that does not exist.
as_b "$KEYHOLD" sign "$A/secret" --in "$W/msg" --out "$W/sig.b" 2>"$W/err.hidden" || true
as_b "$KEYHOLD" sign "$A/nosuchkey" --in "$W/msg" --out "$W/sig.b" 2>"$W/err.missing" || true
check "hidden key and missing key give the same error" \
  test "$(sed 's/secret/X/; s/nosuchkey/X/' "$W/err.hidden")" = "$(sed 's/secret/X/; s/nosuchkey/X/' "$W/err.missing")"
fails "B cannot sign with A's key" "not found" as_b "$KEYHOLD" sign "$A/secret" --in "$W/msg" --out "$W/sig.b"
fails "B cannot read A's public key" "not found" as_b "$KEYHOLD" key public "$A/secret"
fails "B cannot delete A's key" "not found" as_b "$KEYHOLD" key delete secret
fails "B has no key of that name" "not found" as_b "$KEYHOLD" key public secret
fails "B cannot grant himself A's key" "" as_b "$KEYHOLD" key grant "$A/secret" --user $B
check "B may use the same name in his own namespace" as_b "$KEYHOLD" key create secret --type ed25519
check "A's list has one key" as_a "$KEYHOLD" key list --json
check "A's list holds only A's key" python3 -c \
  "import json; d=json.load(open('$KH_DIR/out')); assert [(k['owner'],k['name'],k['type']) for k in d]==[($A,'secret','ec-p256')], d"

# Grant to a user: B signs, A's public key verifies, B still cannot manage.
check "A grants use to B" as_a "$KEYHOLD" key grant secret --user $B
check "B signs with A's key" as_b "$KEYHOLD" sign "$A/secret" --in "$W/msg" --out "$W/sig.b"
check "openssl verifies B's signature with A's key" \
  openssl dgst -sha256 -verify "$W/secret.pub" -signature "$W/sig.b" "$W/msg"
check "B lists the shared key" as_b "$KEYHOLD" key list --json
check "shared key shows A as owner" python3 -c \
  "import json; d=json.load(open('$KH_DIR/out')); assert any(k['owner']==$A and k['name']=='secret' for k in d), d"
fails "grantee cannot delete" "permission denied" as_b "$KEYHOLD" key delete "$A/secret"
# The same through the OpenSSL provider (dev build): B's openssl lists the
# shared key beside his own and signs with keyhold:UID/NAME.
if [ -n "${KEYHOLD_PROVIDER:-}" ] && [ -f "$KEYHOLD_PROVIDER" ]; then
  sed "s|^# module = .*|module = $(realpath "$KEYHOLD_PROVIDER")|" \
    "$(dirname "$0")/../conf/openssl-keyhold.cnf" >"$W/kh.cnf"
  chmod 644 "$W/kh.cnf"
  check "B's openssl storeutl lists his key and A's shared one" sh -c \
    "setpriv --reuid=$B --regid=$B --clear-groups -- env OPENSSL_CONF='$W/kh.cnf' \
       openssl storeutl -keys keyhold: | grep -q 'Total found: 2'"
  check "B's openssl signs with keyhold:$A/secret" as_b env OPENSSL_CONF="$W/kh.cnf" \
    openssl dgst -sha256 -sign "keyhold:$A/secret" -out "$W/sig.p" "$W/msg"
  check "plain openssl verifies it with A's key" \
    openssl dgst -sha256 -verify "$W/secret.pub" -signature "$W/sig.p" "$W/msg"
fi
# A certificate for A's key (a test CA issues it for A's public key): A
# stores it, B sees it through the grant but can neither replace nor remove it.
openssl req -new -x509 -newkey EC -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$W/ca.key" \
  -subj /CN=ca -days 1 -out "$W/ca.pem" 2>/dev/null
openssl req -new -key "$W/ca.key" -subj /CN=a -out "$W/a.csr"
openssl x509 -req -in "$W/a.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial \
  -force_pubkey "$W/secret.pub" -days 1 -out "$W/secret.crt" 2>/dev/null
chmod 644 "$W/secret.crt"
check "A stores a certificate beside the key" as_a "$KEYHOLD" cert import secret --in "$W/secret.crt"
check "B sees A's certificate" as_b "$KEYHOLD" cert show "$A/secret"
check "it is A's certificate" cmp "$KH_DIR/out" "$W/secret.crt"
fails "grantee cannot replace the certificate" "permission denied" \
  as_b "$KEYHOLD" cert import "$A/secret" --in "$W/secret.crt"
fails "grantee cannot remove the certificate" "permission denied" \
  as_b "$KEYHOLD" cert delete "$A/secret"
fails "grantee cannot re-share" "permission denied" as_b "$KEYHOLD" key grant "$A/secret" --user 64103
check "revoke B" as_a "$KEYHOLD" key revoke secret --user $B
fails "revoked B cannot sign" "not found" as_b "$KEYHOLD" sign "$A/secret" --in "$W/msg" --out "$W/sig.b"
if [ -f "$W/kh.cnf" ]; then
  check "revoked B's openssl cannot sign with it either" sh -c \
    "! setpriv --reuid=$B --regid=$B --clear-groups -- env OPENSSL_CONF='$W/kh.cnf' \
       openssl dgst -sha256 -sign 'keyhold:$A/secret' -out '$W/sig.p2' '$W/msg' 2>'$W/p.err' &&
     grep -q 'not found' '$W/p.err'"
fi
fails "revoked B cannot see the certificate" "not found" as_b "$KEYHOLD" cert show "$A/secret"
fails "revoking twice" "not found" as_a "$KEYHOLD" key revoke secret --user $B

# Grant to a group: only B in that group may use it.
check "A grants use to group G" as_a "$KEYHOLD" key grant secret --group $G
check "B in G signs" as_b_in_g "$KEYHOLD" sign "$A/secret" --in "$W/msg" --out "$W/sig.g"
check "openssl verifies group signature" \
  openssl dgst -sha256 -verify "$W/secret.pub" -signature "$W/sig.g" "$W/msg"
fails "B outside G cannot sign" "not found" as_b "$KEYHOLD" sign "$A/secret" --in "$W/msg" --out "$W/sig.b"

# Admin operations: refused to users, allowed to root (the default admin).
fails "A cannot list clients" "permission denied" as_a "$KEYHOLD" admin clients
fails "B cannot delete A" "permission denied" as_b "$KEYHOLD" admin delete-client $A
fails "A cannot read the audit log" "permission denied" as_a "$KEYHOLD" admin audit show
check "root reads B's uses of A's key in the audit log" sh -c \
  "'$KEYHOLD' admin audit show --user $B --key $A/secret | grep -q '\"op\":\"sign\"'"
check "A still has the key" as_a "$KEYHOLD" key public secret
check "root lists clients" "$KEYHOLD" admin clients
check "client list shows A" grep -q "$A" "$KH_DIR/out"
check "root deletes client A" "$KEYHOLD" admin delete-client $A
check "delete-client reports one key" grep -q "deleted 1 key" "$KH_DIR/out"
fails "A's key is gone" "not found" as_a "$KEYHOLD" key public secret
check "B's own key is untouched" as_b "$KEYHOLD" key public secret
# Root is admin but cannot use user keys.
fails "root cannot use B's key" "not found" "$KEYHOLD" key public "$B/secret"

kh_summary
