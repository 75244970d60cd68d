// SecretBytes: a move-only byte buffer that is wiped when freed.
//
// Anything that holds private key material, plaintexts or shared secrets uses
// this type. There is no implicit copy and no way to print it; reading the
// bytes requires Expose(SecretAccess::kToken), which keeps every read
// greppable for review.
#ifndef KEYHOLD_COMMON_SECRET_H_
#define KEYHOLD_COMMON_SECRET_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace keyhold {

// Frees memory only after OPENSSL_cleanse()ing it.
template <typename T>
struct ZeroizingAllocator {
  using value_type = T;
  ZeroizingAllocator() = default;
  template <typename U>
  ZeroizingAllocator(const ZeroizingAllocator<U>&) {}  // NOLINT
  T* allocate(std::size_t n) { return std::allocator<T>().allocate(n); }
  void deallocate(T* p, std::size_t n);
  template <typename U>
  bool operator==(const ZeroizingAllocator<U>&) const {
    return true;
  }
};

void CleanseMemory(void* p, std::size_t n);

template <typename T>
void ZeroizingAllocator<T>::deallocate(T* p, std::size_t n) {
  CleanseMemory(p, n * sizeof(T));
  std::allocator<T>().deallocate(p, n);
}

// A capability token; grep for "SecretAccess::kToken" to audit every read.
enum class SecretAccess { kToken };

class SecretBytes {
 public:
  SecretBytes() = default;
  explicit SecretBytes(std::size_t size) : data_(size) {}
  SecretBytes(std::span<const uint8_t> bytes)  // NOLINT: implicit on purpose
      : data_(bytes.begin(), bytes.end()) {}
  // Takes the bytes of a std::string and wipes the string.
  static SecretBytes TakeFrom(std::string& s);

  SecretBytes(SecretBytes&&) noexcept = default;
  SecretBytes& operator=(SecretBytes&&) noexcept = default;
  SecretBytes(const SecretBytes&) = delete;
  SecretBytes& operator=(const SecretBytes&) = delete;
  ~SecretBytes() = default;

  SecretBytes Clone() const {
    return SecretBytes(std::span<const uint8_t>(data_));
  }

  std::size_t size() const { return data_.size(); }
  bool empty() const { return data_.empty(); }
  void resize(std::size_t n) { data_.resize(n); }

  std::span<const uint8_t> Expose(SecretAccess) const { return data_; }
  std::span<uint8_t> ExposeMutable(SecretAccess) { return data_; }
  uint8_t* data(SecretAccess) { return data_.data(); }

  // Constant-time comparison.
  bool Equals(const SecretBytes& other) const;

 private:
  std::vector<uint8_t, ZeroizingAllocator<uint8_t>> data_;
};

// Overwrites a std::string's buffer (used for protobuf bytes fields that held
// secrets) and clears it.
void CleanseString(std::string& s);

}  // namespace keyhold

#endif  // KEYHOLD_COMMON_SECRET_H_
