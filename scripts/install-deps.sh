#!/bin/bash
# Installs the Debian 12 packages keyhold needs, only those that are missing.
#   scripts/install-deps.sh          build + run dependencies
#   scripts/install-deps.sh --test   also what the test suite uses
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  protobuf-compiler libprotobuf-dev
  libboost-dev libssl-dev openssl libsqlite3-dev
  libtomlplusplus-dev libcli11-dev libspdlog-dev
  libp11-kit-dev libp11-kit0 libsystemd-dev
  util-linux python3
  dpkg-dev
  libtss2-dev libtss2-esys-3.0.2-0 libtss2-tctildr0 libtss2-mu0 libtss2-rc0
  libtss2-tcti-device0 libtss2-tcti-swtpm0 libtss2-tcti-mssim0
)
if [ "${1:-}" = "--test" ]; then
  packages+=(libgtest-dev libgmock-dev libcmocka-dev libbenchmark-dev clang libclang-rt-14-dev
    curl nginx-light p11-kit p11-kit-modules libp11-kit-dev opensc gnutls-bin libnss3-tools
    openssh-client openssh-server softhsm2 swtpm swtpm-tools tpm2-openssl
    tpm2-abrmd libtss2-tcti-tabrmd0 dbus tpm2-tools iproute2 procps
    adduser systemd)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]} (run as root)" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Packages like nginx and openssh-server start their system service on
# install; the tests start their own instances on loopback, so forbid that.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  own_policy=1
fi
trap '[ "$own_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
