// The dispatcher: the one table of operations, the permission each needs, and
// the code that enforces it before a handler runs.
#ifndef KEYHOLD_DAEMON_DISPATCHER_H_
#define KEYHOLD_DAEMON_DISPATCHER_H_

#include <span>
#include <string_view>

#include "daemon/ops/ops.h"

namespace keyhold::daemon {

enum class Permission : uint8_t {
  kAnyone,        // no key involved (hello, ping, list own keys)
  kOwnNamespace,  // creates a key; the reference must be in the caller's namespace
  kKeyUse,        // the key's owner or a grantee
  kKeyOwner,      // the key's owner only
  kAdmin,         // a uid listed in the config's admins
};

struct OpEntry {
  v1::Request::OpCase op;
  std::string_view name;
  Permission permission;
  OpHandler handler;
  // Where the request names its key (kOwnNamespace, kKeyUse, kKeyOwner).
  const v1::KeyRef& (*key_of)(const v1::Request&);
};

// The table, for tests and docs.
std::span<const OpEntry> OpTable();
// Short name of an operation ("sign"), "unknown" if absent from the table.
std::string_view OpName(v1::Request::OpCase op);

class Dispatcher {
 public:
  explicit Dispatcher(OpContext* ctx) : ctx_(ctx) {}

  // Runs one request for caller and returns the response (same id). Never
  // throws: a handler exception becomes kInternal.
  v1::Response Handle(const Principal& caller, v1::Request& request);

 private:
  OpContext* ctx_;
};

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_DISPATCHER_H_
