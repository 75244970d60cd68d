# Sourced by tests/lib.sh and by the benchmark scripts that start TCP
# servers (swtpm); no side effects beyond defining the function.

# kh_free_port [N]: prints P such that the TCP ports P..P+N-1 are unused now.
# P lies below the kernel's ephemeral range, so an outgoing connection of a
# test running in parallel (ctest runs two at once) cannot take the port
# between this check and the server's bind.
kh_free_port() {
  local n="${1:-1}" lo _hi p i used
  read -r lo _hi </proc/sys/net/ipv4/ip_local_port_range
  used="$(awk 'FNR > 1 { split($2, a, ":"); print a[2] }' /proc/net/tcp /proc/net/tcp6 \
    2>/dev/null | sort -u)"
  for _ in $(seq 1 200); do
    p=$((10000 + RANDOM % (lo - 10000 - n)))
    for ((i = 0; i < n; i++)); do
      if grep -qx "$(printf %04X $((p + i)))" <<<"$used"; then continue 2; fi
    done
    echo "$p"
    return 0
  done
  echo "kh_free_port: no free port found" >&2
  return 1
}
