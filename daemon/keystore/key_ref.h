// KeyRef{owner uid, name}: the only way the daemon names a key.
#ifndef KEYHOLD_DAEMON_KEYSTORE_KEY_REF_H_
#define KEYHOLD_DAEMON_KEYSTORE_KEY_REF_H_

#include <cstdint>
#include <string>

namespace keyhold::daemon {

struct KeyRef {
  uint32_t owner = 0;
  std::string name;

  // "1000/web" — used in logs and as AEAD associated data.
  std::string ToString() const { return std::to_string(owner) + "/" + name; }
  friend bool operator==(const KeyRef&, const KeyRef&) = default;
  friend auto operator<=>(const KeyRef&, const KeyRef&) = default;
};

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_KEYSTORE_KEY_REF_H_
