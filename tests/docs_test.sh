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
specs=("")
if [ -n "${KEYHOLD_PKCS11:-}" ]; then
  specs+=("pkcs11:MODULE=$(realpath "$KEYHOLD_PKCS11")")
fi
if [ -n "${KEYHOLD_PROVIDER:-}" ]; then
  cnf="$KH_DIR/openssl-keyhold.cnf"
  sed "s|^# module = .*|module = $(realpath "$KEYHOLD_PROVIDER")|" \
    "$docs_dir/../conf/openssl-keyhold.cnf" >"$cnf"
  specs+=("openssl:OPENSSL_CONF=$cnf")
fi
for doc in "$docs_dir"/*.md; do
  kh_stop
  rm -rf "$KH_DIR/state"
  kh_start
  work="$KH_DIR/work-$(basename "$doc" .md)"
  mkdir -p "$work"
  chmod 777 "$work"
  KH_DOC_BLOCKS_NONE_OK=1 kh_doc_blocks "$(basename "$doc")" "$work" "${specs[@]}"
done
kh_summary
