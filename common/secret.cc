#include "common/secret.h"

#include <openssl/crypto.h>

namespace keyhold {

void CleanseMemory(void* p, std::size_t n) {
  if (p != nullptr && n != 0) {
    OPENSSL_cleanse(p, n);
  }
}

SecretBytes SecretBytes::TakeFrom(std::string& s) {
  SecretBytes out(std::span<const uint8_t>(
      reinterpret_cast<const uint8_t*>(s.data()), s.size()));
  CleanseString(s);
  return out;
}

bool SecretBytes::Equals(const SecretBytes& other) const {
  return data_.size() == other.data_.size() &&
         CRYPTO_memcmp(data_.data(), other.data_.data(), data_.size()) == 0;
}

void CleanseString(std::string& s) {
  // capacity() covers bytes a shorter assignment may have left behind.
  if (s.capacity() > 0) {
    s.resize(s.capacity());
    CleanseMemory(s.data(), s.size());
  }
  s.clear();
}

}  // namespace keyhold
