#!/bin/bash
# Runs every ```sh test block of docs/*.md, in order per file, against a real
# keyholdd (a fresh one per file: each how-to starts from an empty key
# store), so the how-tos cannot drift from the code. Blocks marked
# ```sh test pkcs11 need the PKCS#11 module: they run with $MODULE set to the
# built module when KEYHOLD_PKCS11 is given, and are skipped otherwise.
# Blocks marked ```sh test openssl need the OpenSSL provider: they run with
# OPENSSL_CONF pointing at conf/openssl-keyhold.cnf with the built
# keyhold.so when KEYHOLD_PROVIDER is given, and are skipped otherwise.
source "$(dirname "$0")/lib.sh"
docs_dir="$(cd "$(dirname "$0")/../docs" && pwd)"
bindir="$KH_DIR/bin"
mkdir -p "$bindir"
ln -s "$KEYHOLD" "$bindir/keyhold"
ln -s "$KEYHOLDD" "$bindir/keyholdd"
cnf=""
if [ -n "${KEYHOLD_PROVIDER:-}" ]; then
  cnf="$KH_DIR/openssl-keyhold.cnf"
  sed "s|^# module = .*|module = $(realpath "$KEYHOLD_PROVIDER")|" \
    "$docs_dir/../conf/openssl-keyhold.cnf" >"$cnf"
fi
for doc in "$docs_dir"/*.md; do
  kh_stop
  rm -rf "$KH_DIR/state"
  kh_start
  blocks="$KH_DIR/blocks"
  rm -rf "$blocks"
  mkdir -p "$blocks"
  python3 - "$doc" "$blocks" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
for i, m in enumerate(re.finditer(r"```sh test( pkcs11| openssl)?\n(.*?)```", text, re.S)):
    suffix = f".{m.group(1).strip()}.sh" if m.group(1) else ".sh"
    open(f"{sys.argv[2]}/{i:03d}{suffix}", "w").write(m.group(2))
PY
  work="$KH_DIR/work-$(basename "$doc" .md)"
  mkdir -p "$work"
  chmod 777 "$work"
  for block in "$blocks"/*.sh; do
    [ -e "$block" ] || continue
    module=""
    conf=()
    if [[ "$block" == *.pkcs11.sh ]]; then
      [ -n "${KEYHOLD_PKCS11:-}" ] || continue
      module="$(realpath "$KEYHOLD_PKCS11")"
    fi
    if [[ "$block" == *.openssl.sh ]]; then
      [ -n "$cnf" ] || continue
      conf=(OPENSSL_CONF="$cnf")
    fi
    check "$(basename "$doc") block $(basename "$block" .sh)" \
      env PATH="$bindir:$PATH" MODULE="$module" "${conf[@]}" \
      bash -euo pipefail -c "cd '$work' && source '$block'"
  done
done
kh_summary
