# Sourced by the HSM test and the HSM benchmarks; no side effects beyond
# defining the function.

# kh_softhsm_token DIR LABEL PIN: a SoftHSM2 of its own in DIR (config
# DIR/softhsm2.conf, tokens in DIR/tokens), exported as SOFTHSM2_CONF, with
# one initialized token LABEL whose user PIN is PIN (SO PIN 5678). Nothing
# outside DIR is touched, so tests running at once cannot see each other's
# tokens.
kh_softhsm_token() {
  local dir="$1" label="$2" pin="$3"
  mkdir -p "$dir/tokens"
  printf '%s\n' "directories.tokendir = $dir/tokens" "objectstore.backend = file" \
    "log.level = ERROR" "slots.removable = false" >"$dir/softhsm2.conf"
  export SOFTHSM2_CONF="$dir/softhsm2.conf"
  softhsm2-util --init-token --free --label "$label" --pin "$pin" \
    --so-pin 5678 >/dev/null
}
