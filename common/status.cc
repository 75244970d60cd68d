#include "common/status.h"

#include <cstdio>

namespace keyhold {

std::string_view CodeName(Code code) {
  switch (code) {
    case Code::kOk:
      return "ok";
    case Code::kInvalidArgument:
      return "invalid argument";
    case Code::kNotFound:
      return "not found";
    case Code::kPermissionDenied:
      return "permission denied";
    case Code::kAlreadyExists:
      return "already exists";
    case Code::kUnsupported:
      return "unsupported";
    case Code::kBackendUnavailable:
      return "backend unavailable";
    case Code::kInternal:
      return "internal error";
    case Code::kResourceExhausted:
      return "resource exhausted";
    case Code::kUnavailable:
      return "daemon unavailable";
    case Code::kDeadlineExceeded:
      return "deadline exceeded";
  }
  return "unknown";
}

Code CodeFromWire(int value) {
  if (value < 0 || value > kMaxCode) {
    return Code::kInternal;
  }
  return static_cast<Code>(value);
}

std::string Status::ToString() const {
  std::string out(CodeName(code_));
  if (!message_.empty()) {
    out += ": ";
    out += message_;
  }
  return out;
}

namespace internal {
void CheckFailed(const char* cond, const char* file, int line) {
  std::fprintf(stderr, "keyhold: check failed at %s:%d: %s\n", file, line,
               cond);
  std::abort();
}
}  // namespace internal

}  // namespace keyhold
