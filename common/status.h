// Status and StatusOr<T>: the one error vocabulary inside keyhold.
//
// Code mirrors keyhold.v1.Code on the wire one to one, so converting between
// the two is a cast checked by a unit test. Messages are for humans and must
// never contain secrets or another uid's data.
#ifndef KEYHOLD_COMMON_STATUS_H_
#define KEYHOLD_COMMON_STATUS_H_

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace keyhold {

enum class Code : uint8_t {
  kOk = 0,
  kInvalidArgument = 1,
  kNotFound = 2,
  kPermissionDenied = 3,
  kAlreadyExists = 4,
  kUnsupported = 5,
  kBackendUnavailable = 6,
  kInternal = 7,
  kResourceExhausted = 8,
  kUnavailable = 9,
  kDeadlineExceeded = 10,
};
inline constexpr int kMaxCode = 10;

// Short lower-case name of a code ("not found"), for messages and logs.
std::string_view CodeName(Code code);

// Maps a wire value to a Code; unknown values become kInternal.
Code CodeFromWire(int value);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message)
      : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // "not found: key 'x'"
  std::string ToString() const;

  friend bool operator==(const Status&, const Status&) = default;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

inline Status InvalidArgument(std::string m) {
  return Status(Code::kInvalidArgument, std::move(m));
}
inline Status NotFound(std::string m) {
  return Status(Code::kNotFound, std::move(m));
}
inline Status PermissionDenied(std::string m) {
  return Status(Code::kPermissionDenied, std::move(m));
}
inline Status AlreadyExists(std::string m) {
  return Status(Code::kAlreadyExists, std::move(m));
}
inline Status Unsupported(std::string m) {
  return Status(Code::kUnsupported, std::move(m));
}
inline Status BackendUnavailable(std::string m) {
  return Status(Code::kBackendUnavailable, std::move(m));
}
inline Status Internal(std::string m) {
  return Status(Code::kInternal, std::move(m));
}
inline Status ResourceExhausted(std::string m) {
  return Status(Code::kResourceExhausted, std::move(m));
}
inline Status Unavailable(std::string m) {
  return Status(Code::kUnavailable, std::move(m));
}
inline Status DeadlineExceeded(std::string m) {
  return Status(Code::kDeadlineExceeded, std::move(m));
}

// Aborts, in release builds too: for invariants whose failure means a bug.
#define KH_CHECK(cond)                                             \
  do {                                                             \
    if (!(cond)) {                                                 \
      ::keyhold::internal::CheckFailed(#cond, __FILE__, __LINE__); \
    }                                                              \
  } while (0)

namespace internal {
[[noreturn]] void CheckFailed(const char* cond, const char* file, int line);
}  // namespace internal

template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(Status status) : status_(std::move(status)) {  // NOLINT
    KH_CHECK(!status_.ok());
  }
  StatusOr(T value) : value_(std::move(value)) {}  // NOLINT

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }

  T& value() & {
    KH_CHECK(ok());
    return *value_;
  }
  const T& value() const& {
    KH_CHECK(ok());
    return *value_;
  }
  T&& value() && {
    KH_CHECK(ok());
    return std::move(*value_);
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  Status status_;
  std::optional<T> value_;
};

#define KH_RETURN_IF_ERROR(expr)           \
  do {                                     \
    ::keyhold::Status kh_status_ = (expr); \
    if (!kh_status_.ok()) {                \
      return kh_status_;                   \
    }                                      \
  } while (0)

}  // namespace keyhold

#endif  // KEYHOLD_COMMON_STATUS_H_
