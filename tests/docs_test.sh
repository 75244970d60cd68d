#!/bin/bash
# Runs every ```sh test block of docs/*.md, in order per file, against a real
# keyholdd, so the how-tos cannot drift from the code.
source "$(dirname "$0")/lib.sh"
docs_dir="$(cd "$(dirname "$0")/../docs" && pwd)"
kh_start
bindir="$KH_DIR/bin"
mkdir -p "$bindir"
ln -s "$KEYHOLD" "$bindir/keyhold"
ln -s "$KEYHOLDD" "$bindir/keyholdd"
for doc in "$docs_dir"/*.md; do
  blocks="$KH_DIR/blocks"
  rm -rf "$blocks"
  mkdir -p "$blocks"
  python3 - "$doc" "$blocks" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
for i, m in enumerate(re.finditer(r"```sh test\n(.*?)```", text, re.S)):
    open(f"{sys.argv[2]}/{i:03d}.sh", "w").write(m.group(1))
PY
  work="$KH_DIR/work-$(basename "$doc" .md)"
  mkdir -p "$work"
  chmod 777 "$work"
  for block in "$blocks"/*.sh; do
    [ -e "$block" ] || continue
    check "$(basename "$doc") block $(basename "$block" .sh)" \
      env PATH="$bindir:$PATH" bash -euo pipefail -c "cd '$work' && source '$block'"
  done
done
kh_summary
